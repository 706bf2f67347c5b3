//! The listeners of CONNECT rules: one per address a rule's `connect`
//! lists, opened when a policy names it and closed when a reload drops it.
//! New ones are bound before a policy is applied, so a policy whose address
//! cannot be bound is refused and the running one stays.

use std::{collections::HashMap, io, net::SocketAddr};

use tokio::net::TcpListener;
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

/// The CONNECT listeners open now, each with the token that stops its
/// accept loop.
#[derive(Default)]
pub struct ExplicitListeners {
    open: HashMap<SocketAddr, CancellationToken>,
}

/// Listeners a policy needs that are not open yet.
pub struct Opened(Vec<(SocketAddr, TcpListener)>);

impl ExplicitListeners {
    /// Binds what `policy` lists and is not open yet.
    pub fn bind_new(&self, policy: &Policy, keepalive: Keepalive) -> Result<Opened, ListenError> {
        let mut opened = Vec::new();
        for addr in wanted(policy) {
            if self.open.contains_key(&addr) || opened.iter().any(|(a, _)| *a == addr) {
                continue;
            }
            let listener = install::listen(addr, keepalive, false)
                .map_err(|error| ListenError { addr, error })?;
            opened.push((addr, listener));
        }
        Ok(Opened(opened))
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
        self.open.retain(|addr, stop| {
            let keep = wanted.contains(addr);
            if !keep {
                tracing::info!(listener = %addr, "CONNECT listener closed");
                stop.cancel();
            }
            keep
        });
        for (addr, listener) in opened.0 {
            let stop = stop.child_token();
            self.open.insert(addr, stop.clone());
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
