//! Proxy credentials: an htpasswd file of bcrypt hashes (`htpasswd -B`),
//! read when the policy is, so a file that cannot be read or holds another
//! kind of hash refuses the policy (and a reload keeps the old one).

use std::{collections::HashMap, fmt, sync::Arc};

use serde::Deserialize;

/// Users and their bcrypt hashes.
#[derive(Clone, PartialEq, Eq)]
pub struct Htpasswd {
    pub path: String,
    /// Shared: each connection that authenticates takes a copy of it to a
    /// blocking thread.
    users: Arc<HashMap<String, String>>,
}

/// Neither hashes nor user names go to logs.
impl fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Htpasswd({}, {} users)", self.path, self.users.len())
    }
}

impl Htpasswd {
    /// Whether `password` is `user`'s. Slow on purpose (bcrypt): call it
    /// off the runtime's worker threads.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                // As long as for a user who exists: the time taken must not
                // tell which names do.
                let any = self.users.values().next();
                let _ = any.map(|hash| bcrypt::verify(password, hash));
                false
            }
        }
    }

    /// `user`'s hash in the file.
    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }

    /// Reads `text`, an htpasswd file's lines: `user:hash`, blank lines and
    /// `#` comments.
    pub fn parse(path: &str, text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("{path}:{}: expected user:hash", n + 1));
            };
            if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p))
                || hash.parse::<bcrypt::HashParts>().is_err()
            {
                return Err(format!(
                    "{path}:{}: user {user:?}: only bcrypt hashes are taken (make them with htpasswd -B)",
                    n + 1
                ));
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(format!("{path}:{}: user {user:?} listed twice", n + 1));
            }
        }
        if users.is_empty() {
            return Err(format!("{path}: no users"));
        }
        Ok(Htpasswd {
            path: path.to_owned(),
            users: Arc::new(users),
        })
    }
}

/// A path in the policy, read as it is checked.
impl<'de> Deserialize<'de> for Htpasswd {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let path = String::deserialize(deserializer)?;
        let text = super::file::read_small_file(&path).map_err(serde::de::Error::custom)?;
        Htpasswd::parse(&path, &text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_users_are_taken_and_checked() {
        let hash = bcrypt::hash("open sesame", 4).unwrap();
        let file = Htpasswd::parse("users", &format!("# proxy users\n\nalice:{hash}\n")).unwrap();
        assert!(file.verify("alice", "open sesame"));
        assert!(!file.verify("alice", "open sesame!"));
        assert!(!file.verify("bob", "open sesame"));
    }

    #[test]
    fn a_user_listed_twice_is_refused() {
        let hash = bcrypt::hash("x", 4).unwrap();
        let err = Htpasswd::parse("users", &format!("a:{hash}\na:{hash}\n")).unwrap_err();
        assert!(err.starts_with("users:2: user \"a\" listed twice"), "{err}");
    }

    #[test]
    fn what_is_not_bcrypt_is_refused_with_its_line() {
        for (text, reason) in [
            (
                "alice:$apr1$abc$def\n",
                "users:1: user \"alice\": only bcrypt hashes",
            ),
            ("\nalice\n", "users:2: expected user:hash"),
            (
                "alice:$2y$x\n",
                "users:1: user \"alice\": only bcrypt hashes",
            ),
            ("# nobody\n", "users: no users"),
        ] {
            let err = Htpasswd::parse("users", text).unwrap_err();
            assert!(err.starts_with(reason), "{text:?}: {err}");
        }
    }
}
