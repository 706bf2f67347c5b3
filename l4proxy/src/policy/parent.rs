//! An upstream's `parent`: parent CONNECT proxies that l4proxy asks to
//! connect on (a chain of proxies: client → local proxy →
//! remote proxy → service). Like a pool, l4proxy connects to them in turn;
//! through the one that answers it asks for the connection's destination.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{
    raw::{Object, Server, non_empty, some},
    tls::{Originate, RawOriginate},
};

/// Where connections to a parent upstream go, and how they introduce
/// themselves.
#[derive(Clone, PartialEq, Eq)]
pub struct Parent {
    /// The parent proxies, taken in turn.
    pub servers: Vec<SocketAddr>,
    /// `Proxy-Authorization: Basic` user and password, if the parent asks.
    pub credentials: Option<(String, String)>,
    /// Reach the parents over TLS (the secured hop between a
    /// local and a remote proxy). Boxed: most parents are plain.
    pub tls: Option<Box<Originate>>,
}

/// Credentials stay out of logs and error messages.
impl std::fmt::Debug for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parent")
            .field("servers", &self.servers)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(user, _)| user),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawParent {
    #[serde(deserialize_with = "non_empty")]
    servers: Vec<Server>,
    #[serde(default, deserialize_with = "some")]
    user: Option<String>,
    #[serde(default, deserialize_with = "some")]
    password: Option<String>,
    #[serde(default, deserialize_with = "some")]
    tls: Option<Object<RawOriginate>>,
}

impl TryFrom<Object<RawParent>> for Parent {
    type Error = &'static str;
    fn try_from(Object(raw): Object<RawParent>) -> Result<Self, Self::Error> {
        let credentials = match (raw.user, raw.password) {
            (Some(user), Some(_)) if user.contains(':') => {
                return Err(r#"a Basic "user" has no colon"#);
            }
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            _ => return Err(r#"a parent's "user" and "password" go together"#),
        };
        Ok(Parent {
            servers: raw.servers.into_iter().map(|s| s.0).collect(),
            credentials,
            tls: raw.tls.map(|tls| Box::new(Originate::from(tls))),
        })
    }
}
