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
//! of its own, within its deadline (`share`).

use std::{
    io,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    time::Duration,
};

use tokio::sync::Semaphore;

use crate::share::ClientShare;

/// Names resolved at a time.
pub const MAX_RESOLVING: usize = 64;

/// Names one client has resolved at a time.
pub const MAX_RESOLVING_PER_CLIENT: usize = 8;

/// Has the resolver look names up as they are, never under resolv.conf's
/// search domains (`search`, `domain`, or the host's own domain): a CONNECT
/// name that does not resolve must not become another name under a local
/// domain (a wildcard there answers anything), whose address the rule's
/// `names` never checked. Squid's `dns_defnames off`, its default. glibc
/// takes the search list from `LOCALDOMAIN` when it is set: empty, none.
/// (glibc's own DNS look-up, `hosts: … dns`; systemd-resolved, `hosts:
/// resolve`, applies its own search domains to names without a dot.)
///
/// # Safety
///
/// No other thread may read or write the environment meanwhile: call it
/// while the process has one thread.
pub unsafe fn without_search_domains() {
    // SAFETY: the caller's promise.
    unsafe { std::env::set_var("LOCALDOMAIN", "") }
}

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
    static CLIENTS: ClientShare = ClientShare::new(MAX_RESOLVING_PER_CLIENT);
    let lookup = async {
        let own = CLIENTS.turn(client).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_resolves_once_per_address() {
        let client = "192.0.2.1".parse().unwrap();
        let addrs = resolve(client, "localhost", 443, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!addrs.is_empty());
        let mut unique = addrs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), addrs.len(), "{addrs:?}");
    }
}
