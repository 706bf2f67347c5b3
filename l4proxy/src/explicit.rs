//! The listeners of CONNECT rules: one per address a rule's `connect`
//! lists, opened when a policy names it and closed when a reload drops it.
//! New ones are bound before a policy is applied, so a policy whose address
//! cannot be bound is refused and the running one stays. A successor in a
//! takeover is handed its predecessor's listeners ([`ExplicitListeners::adopt`])
//! and takes those its policy lists instead of binding them again. Each is
//! one socket, which every worker accepts on (`workers`).

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
    upstream,
};

#[derive(Debug, thiserror::Error)]
#[error("listening on {addr} for CONNECT clients: {error}")]
pub struct ListenError {
    addr: SocketAddr,
    error: io::Error,
}

/// The CONNECT listeners open now, each with the token that stops its
/// accept loop and a copy of its descriptor (to hand over in a takeover).
#[derive(Default)]
pub struct ExplicitListeners {
    open: HashMap<SocketAddr, (CancellationToken, OwnedFd)>,
    /// A predecessor's listeners, until the first policy takes them.
    handed: HashMap<SocketAddr, TcpListener>,
}

/// Listeners a policy needs that are not open yet, with copies of their
/// descriptors.
pub struct Opened(Vec<(SocketAddr, TcpListener, OwnedFd)>);

impl ExplicitListeners {
    /// A predecessor's listeners (a takeover), for [`Self::bind_new`] to
    /// take instead of binding their addresses again.
    pub fn adopt(&mut self, handed: Vec<(SocketAddr, TcpListener)>) {
        self.handed = handed.into_iter().collect();
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
        for addr in wanted(policy) {
            if self.open.contains_key(&addr) || opened.iter().any(|(a, _, _)| *a == addr) {
                continue;
            }
            let listener = match handed.remove(&addr) {
                // The accepted connections get this daemon's keepalive.
                Some(listener) => {
                    upstream::set_keepalive(&SockRef::from(&listener), keepalive).map(|()| listener)
                }
                None => install::listen(addr, keepalive, install::Role::Connect),
            }
            .and_then(|listener| Ok((listener.as_fd().try_clone_to_owned()?, listener)))
            .map_err(|error| ListenError { addr, error })?;
            opened.push((addr, listener.1, listener.0));
        }
        Ok(Opened(opened))
    }

    /// The listeners open now, for a successor (a takeover).
    pub fn listeners(&self) -> Vec<(SocketAddr, BorrowedFd<'_>)> {
        self.open
            .iter()
            .map(|(addr, (_, fd))| (*addr, fd.as_fd()))
            .collect()
    }

    /// Once `policy` is in force: hands the new listeners to `accept` with
    /// their stop tokens (children of `stop`, the daemon's), and stops those
    /// the policy no longer lists.
    pub fn commit(
        &mut self,
        policy: &Policy,
        opened: Opened,
        stop: &CancellationToken,
        mut accept: impl FnMut(TcpListener, CancellationToken),
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
        for (addr, listener, fd) in opened.0 {
            let stop = stop.child_token();
            self.open.insert(addr, (stop.clone(), fd));
            tracing::info!(listener = %addr, "CONNECT listener open");
            accept(listener, stop);
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
