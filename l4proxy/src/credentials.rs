//! Checking a CONNECT client's password against the rule's htpasswd.
//!
//! bcrypt is slow on purpose (tens of milliseconds of a core per check), so
//! checks run on blocking threads, [`CHECKS`] at a time, one per client at a
//! time (`share`: a client that floods wrong passwords waits for its own
//! turn, not everyone's); a client that waits its deadline for one is
//! refused, so a flood cannot hold every client's connection.
//!
//! A browser opens tens of tunnels, each with the same
//! `Proxy-Authorization`: credentials that passed are remembered for
//! [`REMEMBERED_FOR`] (Squid's `authenticate_ttl` does the same), so only
//! the first of them costs a check. What is remembered is an HMAC of the
//! user, the password and the user's hash in the file, under a key made at
//! start: no password is kept, and a changed file (a new hash, a user
//! removed) matches none of it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use ring::hmac;
use tokio::sync::Semaphore;

use crate::{policy::Htpasswd, share::ClientShare};

/// bcrypt checks at a time: a flood of them must not take the relay's
/// cores too.
pub const CHECKS: usize = 2;

/// How long credentials that passed are taken without a check.
pub const REMEMBERED_FOR: Duration = Duration::from_secs(600);

/// Credentials remembered at most (past that, the expired ones go, and if
/// none has, all).
const REMEMBERED: usize = 4096;

static CHECKING: Semaphore = Semaphore::const_new(CHECKS);

/// One check at a time per client.
static CLIENTS: ClientShare = ClientShare::new(1);

/// What a check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    Right,
    Wrong,
    /// No check was free within the deadline.
    Busy,
}

/// Whether `password` is `user`'s in `users`, asked by `client`, within
/// `deadline` (for a turn to check).
pub async fn check(
    users: &Htpasswd,
    user: &str,
    password: &str,
    client: IpAddr,
    deadline: Duration,
) -> Checked {
    let tag = users.hash_of(user).map(|hash| tag(user, password, hash));
    if tag.as_ref().is_some_and(remembered) {
        return Checked::Right;
    }
    let turns = tokio::time::timeout(deadline, async {
        let own = CLIENTS.turn(client).await;
        // A browser's tunnels come at once with the same credentials, and
        // wait here for the client's turn: the first one's check passes
        // them all.
        if tag.as_ref().is_some_and(remembered) {
            return Err(Checked::Right);
        }
        Ok((own, CHECKING.acquire().await))
    });
    let turns = match turns.await {
        Ok(Ok((own, Ok(turn)))) => (own, turn),
        Ok(Err(passed_meanwhile)) => return passed_meanwhile,
        Ok(Ok((_, Err(_)))) | Err(_) => return Checked::Busy,
    };
    let (users, user, password) = (users.clone(), user.to_owned(), password.to_owned());
    // The turns go with the hash's thread: a connection cut meanwhile (the
    // grace period's end) leaves its check running, and it still counts.
    let right = tokio::task::spawn_blocking(move || {
        let _turns = turns;
        users.verify(&user, &password)
    })
    .await
    .unwrap_or(false);
    if !right {
        return Checked::Wrong;
    }
    if let Some(tag) = tag {
        remember(tag);
    }
    Checked::Right
}

/// Tags of credentials that passed, and when.
static PASSED: LazyLock<Mutex<HashMap<Vec<u8>, Instant>>> = LazyLock::new(Mutex::default);

fn tag(user: &str, password: &str, hash: &str) -> hmac::Tag {
    static KEY: LazyLock<hmac::Key> = LazyLock::new(|| {
        hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("the system's random source")
    });
    let mut context = hmac::Context::with_key(&KEY);
    // Lengths first: no two (user, password, hash) give the same bytes.
    for part in [user, password, hash] {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part.as_bytes());
    }
    context.sign()
}

fn passed() -> std::sync::MutexGuard<'static, HashMap<Vec<u8>, Instant>> {
    PASSED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn remembered(tag: &hmac::Tag) -> bool {
    passed()
        .get(tag.as_ref())
        .is_some_and(|at| at.elapsed() < REMEMBERED_FOR)
}

fn remember(tag: hmac::Tag) {
    let mut passed = passed();
    if passed.len() >= REMEMBERED {
        passed.retain(|_, at| at.elapsed() < REMEMBERED_FOR);
        if passed.len() >= REMEMBERED {
            passed.clear();
        }
    }
    passed.insert(tag.as_ref().to_vec(), Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(password: &str) -> Htpasswd {
        let hash = bcrypt::hash(password, 4).unwrap();
        Htpasswd::parse("users", &format!("alice:{hash}\n")).unwrap()
    }

    /// The checks and their turns are the process's: one test at a time.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    /// While both checks are taken (a flood of them), credentials that
    /// wait the whole deadline for one are refused, without a check; once
    /// one is free, they are checked.
    #[tokio::test(start_paused = true)]
    async fn credentials_that_wait_out_the_deadline_for_a_check_are_refused() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let users = users("secret");
        let taken = CHECKING.acquire_many(CHECKS as u32).await.unwrap();
        let deadline = Duration::from_secs(10);
        let checked = check(&users, "alice", "secret", CLIENT, deadline).await;
        assert_eq!(checked, Checked::Busy);
        drop(taken);
        let checked = check(&users, "alice", "secret", CLIENT, deadline).await;
        assert_eq!(checked, Checked::Right);
    }

    #[tokio::test]
    async fn credentials_that_passed_are_taken_without_a_check_until_the_file_changes() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let users = users("remembered");
        let long = Duration::from_secs(10);
        assert_eq!(
            check(&users, "alice", "remembered", CLIENT, long).await,
            Checked::Right
        );
        // No check free now: passed credentials need none ...
        let taken = CHECKING.acquire_many(CHECKS as u32).await.unwrap();
        let quick = Duration::from_millis(50);
        let again = check(&users, "alice", "remembered", CLIENT, quick);
        assert_eq!(again.await, Checked::Right);
        // ... a wrong password does, and so does the same password once
        // the file has another hash for alice.
        let wrong = check(&users, "alice", "remembered!", CLIENT, quick);
        assert_eq!(wrong.await, Checked::Busy);
        let changed = self::users("remembered");
        let after_change = check(&changed, "alice", "remembered", CLIENT, quick);
        assert_eq!(after_change.await, Checked::Busy);
        drop(taken);
        assert_eq!(
            check(&changed, "alice", "remembered", CLIENT, long).await,
            Checked::Right
        );
    }

    #[tokio::test]
    async fn tunnels_that_wait_together_are_passed_by_one_check() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let users = std::sync::Arc::new(users("together"));
        let client: IpAddr = "192.0.2.9".parse().unwrap();
        // Five tunnels with new credentials wait for the client's turn ...
        let under_way = CLIENTS.turn(client).await;
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let users = users.clone();
                tokio::spawn(async move {
                    check(&users, "alice", "together", client, Duration::from_secs(5)).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ... while the one ahead of them passes: no other check is free,
        // and none is needed.
        remember(tag("alice", "together", users.hash_of("alice").unwrap()));
        let taken = CHECKING.acquire_many(CHECKS as u32).await.unwrap();
        drop(under_way);
        for tunnel in waiting {
            assert_eq!(tunnel.await.unwrap(), Checked::Right);
        }
        drop(taken);
    }

    /// A check whose connection is cut keeps its turn until its hash is
    /// done: the turns count the hashing threads, not the waiting tasks.
    #[tokio::test]
    async fn a_cut_check_keeps_its_turn_until_the_hash_is_done() {
        let _alone = ONE_AT_A_TIME.lock().await;
        // Cost 12: a few hundred milliseconds of hashing.
        let hash = bcrypt::hash("slow", 12).unwrap();
        let users = Htpasswd::parse("users", &format!("alice:{hash}\n")).unwrap();
        let cut = tokio::time::timeout(
            Duration::from_millis(20),
            check(&users, "alice", "slow", CLIENT, Duration::from_secs(10)),
        )
        .await;
        assert!(cut.is_err(), "the check ended within 20 ms: {cut:?}");
        assert_eq!(CHECKING.available_permits(), CHECKS - 1, "the hash's turn");
        let deadline = Instant::now() + Duration::from_secs(30);
        while CHECKING.available_permits() < CHECKS {
            assert!(Instant::now() < deadline, "the turn never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_client_has_one_check_at_a_time() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let users = users("x");
        let flooder: IpAddr = "198.51.100.9".parse().unwrap();
        // The flooder's check under way: its next waits, another client's
        // does not.
        let under_way = CLIENTS.turn(flooder).await;
        let quick = Duration::from_millis(50);
        assert_eq!(
            check(&users, "alice", "y", flooder, quick).await,
            Checked::Busy
        );
        let long = Duration::from_secs(10);
        assert_eq!(
            check(&users, "alice", "y", CLIENT, long).await,
            Checked::Wrong
        );
        drop(under_way);
        assert_eq!(
            check(&users, "bob", "x", flooder, long).await,
            Checked::Wrong
        );
    }
}
