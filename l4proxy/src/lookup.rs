//! Name look-ups for CONNECT: the system's resolver (getaddrinfo:
//! /etc/hosts, /etc/resolv.conf), each on a blocking thread with its own
//! resolver socket, so bounded in number ([`MAX_RESOLVING`]) and counted in
//! the daemon's descriptor budget.
//!
//! A look-up cannot be cancelled: one the client no longer waits for runs
//! on until the resolver gives up (seconds, by resolv.conf's `timeout` and
//! `attempts`), and keeps its turn. So that one client asking for names
//! that never resolve (and hanging up) cannot take every turn, and every
//! other client's names time out, a client holds at most
//! [`MAX_RESOLVING_PER_CLIENT`] turns at a time; past that it waits for one
//! of its own, within its deadline. A client is its address, an IPv6 one
//! its /64 (what one host usually holds).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs},
    sync::{Arc, LazyLock, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Names resolved at a time.
pub const MAX_RESOLVING: usize = 64;

/// Names one client has resolved at a time.
pub const MAX_RESOLVING_PER_CLIENT: usize = 8;

/// Why a name has no addresses.
#[derive(Debug)]
pub enum LookupError {
    /// The resolver said so (no such name, no address, a failure).
    Failed(io::Error),
    /// No answer within the deadline (a turn included).
    Timeout,
}

/// `name`'s addresses (both families, each once, IPv4-mapped ones as
/// IPv4), asked for by `client`, within `deadline`.
pub async fn resolve(
    client: IpAddr,
    name: &str,
    port: u16,
    deadline: Duration,
) -> Result<Vec<SocketAddr>, LookupError> {
    static RESOLVING: Semaphore = Semaphore::const_new(MAX_RESOLVING);
    let lookup = async {
        let own = ClientTurn::take(client).await;
        let turn = RESOLVING.acquire().await.map_err(io::Error::other)?;
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let _turns = (turn, own);
            (name.as_str(), port)
                .to_socket_addrs()
                .map(Iterator::collect::<Vec<_>>)
        })
        .await
        .map_err(io::Error::other)?
    };
    let addrs = match tokio::time::timeout(deadline, lookup).await {
        Err(_) => return Err(LookupError::Timeout),
        Ok(Err(e)) => return Err(LookupError::Failed(e)),
        Ok(Ok(addrs)) => addrs,
    };
    let mut addrs: Vec<SocketAddr> = addrs
        .into_iter()
        .map(|addr| SocketAddr::new(addr.ip().to_canonical(), addr.port()))
        .collect();
    // getaddrinfo lists an address once per socket type unless told.
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|addr| seen.insert(*addr));
    Ok(addrs)
}

/// Each client's turns, and how many of its look-ups hold or wait for one
/// (the entry goes when none does).
type Clients = HashMap<IpAddr, (Arc<Semaphore>, usize)>;

static CLIENTS: LazyLock<Mutex<Clients>> = LazyLock::new(Mutex::default);

fn clients() -> MutexGuard<'static, Clients> {
    CLIENTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One of a client's [`MAX_RESOLVING_PER_CLIENT`] turns, or the wait for
/// one.
struct ClientTurn {
    client: IpAddr,
    permit: Option<OwnedSemaphorePermit>,
}

impl ClientTurn {
    async fn take(client: IpAddr) -> ClientTurn {
        let client = match client.to_canonical() {
            IpAddr::V6(ip) => {
                let [a, b, c, d, ..] = ip.segments();
                IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
            ip => ip,
        };
        let turns = {
            let mut clients = clients();
            let (turns, users) = clients
                .entry(client)
                .or_insert_with(|| (Arc::new(Semaphore::new(MAX_RESOLVING_PER_CLIENT)), 0));
            *users += 1;
            turns.clone()
        };
        // Counted from here: given up while waiting, it is dropped too.
        let mut turn = ClientTurn {
            client,
            permit: None,
        };
        turn.permit = turns.acquire_owned().await.ok();
        turn
    }
}

impl Drop for ClientTurn {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut clients = clients();
        if let Some((_, users)) = clients.get_mut(&self.client) {
            *users -= 1;
            if *users == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

/// Whether `client` (as keyed) has turns taken or awaited, for tests.
#[cfg(test)]
fn known(client: &str) -> bool {
    clients().contains_key(&client.parse().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_holds_at_most_its_share_of_turns() {
        let client: IpAddr = "2001:db8:1::7".parse().unwrap();
        let neighbour: IpAddr = "2001:db8:1::8".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..MAX_RESOLVING_PER_CLIENT {
            held.push(ClientTurn::take(client).await);
        }
        // Its /64 is the same client: no turn left.
        let more = tokio::time::timeout(Duration::from_millis(50), ClientTurn::take(neighbour));
        assert!(more.await.is_err(), "a ninth turn for the same /64");
        // Another client is not held up.
        let other = tokio::time::timeout(
            Duration::from_millis(50),
            ClientTurn::take("192.0.2.7".parse().unwrap()),
        );
        drop(other.await.expect("another client's turn"));
        // A turn given back goes to the client's next look-up ...
        let waiting = tokio::spawn(ClientTurn::take(client));
        tokio::task::yield_now().await;
        held.pop();
        let next = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the client's turn given back")
            .unwrap();
        // ... and the entry goes with the client's last turn, also when
        // a look-up gave up waiting for one.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), ClientTurn::take(client));
        assert!(gave_up.await.is_err());
        drop(next);
        held.clear();
        assert!(!known("2001:db8:1::"));
    }

    #[tokio::test]
    async fn a_name_resolves_once_per_address() {
        let addrs = resolve(
            "192.0.2.1".parse().unwrap(),
            "localhost",
            443,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(!addrs.is_empty());
        let mut unique = addrs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), addrs.len(), "{addrs:?}");
        assert!(!known("192.0.2.1"));
    }
}
