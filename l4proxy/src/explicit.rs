//! The listeners of CONNECT rules: one reuseport group per address a
//! rule's `connect` lists, opened when a policy names it and closed when a
//! reload drops it. New ones are bound before a policy is applied, so a
//! policy whose address cannot be bound is refused and the running one
//! stays. A successor in a takeover is handed its predecessor's listeners
//! ([`ExplicitListeners::adopt`]) and takes those its policy lists instead
//! of binding them again. Each address has one listener per worker, bound
//! with `SO_REUSEPORT`: the kernel spreads the clients over them, and each
//! worker is woken only for its own (`workers`).

use std::{
    collections::HashMap,
    io,
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use socket2::SockRef;
use tokio_util::sync::CancellationToken;

use crate::{
    install,
    policy::{Keepalive, Policy},
};

#[derive(Debug, thiserror::Error)]
#[error("listening on {addr} for CONNECT clients: {error}")]
pub struct ListenError {
    addr: SocketAddr,
    error: io::Error,
}

/// The CONNECT listeners open now, each address with the token that stops
/// its accept loops and copies of its descriptors (to hand over in a
/// takeover).
pub struct ExplicitListeners {
    open: HashMap<SocketAddr, (CancellationToken, Vec<OwnedFd>)>,
    /// A predecessor's listeners, until the first policy takes them.
    handed: HashMap<SocketAddr, Vec<TcpListener>>,
    /// Listeners per address: one per worker.
    workers: usize,
}

/// Listeners a policy needs that are not open yet: each address's group,
/// with copies of their descriptors.
pub struct Opened(Vec<(SocketAddr, Vec<TcpListener>, Vec<OwnedFd>)>);

impl Opened {
    /// The addresses listened on.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.0.iter().map(|(addr, _, _)| *addr).collect()
    }
}

impl ExplicitListeners {
    /// None open yet; each address will have one listener per worker.
    pub fn new(workers: usize) -> ExplicitListeners {
        ExplicitListeners {
            open: HashMap::new(),
            handed: HashMap::new(),
            workers,
        }
    }

    /// A predecessor's listeners (a takeover), for [`Self::bind_new`] to
    /// take instead of binding their addresses again.
    pub fn adopt(&mut self, handed: Vec<(SocketAddr, TcpListener)>) {
        for (addr, listener) in handed {
            self.handed.entry(addr).or_default().push(listener);
        }
    }

    /// Binds (or takes from a predecessor) what `policy` lists and is not
    /// open yet. Handed listeners the policy does not list are closed.
    pub fn bind_new(
        &mut self,
        policy: &Policy,
        keepalive: Keepalive,
    ) -> Result<Opened, ListenError> {
        let mut handed = std::mem::take(&mut self.handed);
        let mut opened = Vec::new();
        // New addresses first: one that cannot be bound fails the start
        // before a handed group (a running daemon's) gets members of ours.
        let (from_handed, new): (Vec<SocketAddr>, Vec<SocketAddr>) =
            wanted(policy).partition(|addr| handed.contains_key(addr));
        for addr in new.into_iter().chain(from_handed) {
            if self.open.contains_key(&addr) || opened.iter().any(|(a, _, _)| *a == addr) {
                continue;
            }
            let (fds, group) = match handed.remove(&addr) {
                // The accepted connections get what this daemon gives them.
                Some(group) => group
                    .iter()
                    .try_for_each(|listener| {
                        install::set_inherited(
                            SockRef::from(listener),
                            keepalive,
                            install::Role::Connect,
                        )
                    })
                    .map(|()| group),
                None => install::listen(addr, keepalive, install::Role::Connect)
                    .map(|first| vec![first]),
            }
            .and_then(|group| {
                install::fill_group(group, keepalive, install::Role::Connect, self.workers)
            })
            .and_then(|group| Ok((install::copies(&group)?, group)))
            .map_err(|error| ListenError { addr, error })?;
            opened.push((addr, group, fds));
        }
        Ok(Opened(opened))
    }

    /// The listeners open now, for a successor (a takeover): an address
    /// once per listener of its group.
    pub fn listeners(&self) -> Vec<(SocketAddr, BorrowedFd<'_>)> {
        self.open
            .iter()
            .flat_map(|(addr, (_, fds))| fds.iter().map(|fd| (*addr, fd.as_fd())))
            .collect()
    }

    /// Once `policy` is in force: hands each new address's listeners to
    /// `accept` with their stop token (a child of `stop`, the daemon's), and
    /// stops those the policy no longer lists.
    pub fn commit(
        &mut self,
        policy: &Policy,
        opened: Opened,
        stop: &CancellationToken,
        mut accept: impl FnMut(Vec<TcpListener>, CancellationToken),
    ) {
        let wanted: Vec<SocketAddr> = wanted(policy).collect();
        self.open.retain(|addr, (stop, _)| {
            let keep = wanted.contains(addr);
            if !keep {
                tracing::info!(listener = %addr, "CONNECT listener closed");
                stop.cancel();
            }
            keep
        });
        for (addr, group, fds) in opened.0 {
            let stop = stop.child_token();
            self.open.insert(addr, (stop.clone(), fds));
            tracing::info!(listener = %addr, "CONNECT listener open");
            accept(group, stop);
        }
    }
}

fn wanted(policy: &Policy) -> impl Iterator<Item = SocketAddr> + '_ {
    policy
        .rules
        .iter()
        .filter_map(|rule| rule.connect.as_ref())
        .flat_map(|front| front.listen.iter().copied())
}
