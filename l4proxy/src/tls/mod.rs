//! TLS on either side of a connection, with rustls: terminating a client's
//! (`server`, with the policy's certificates chosen by SNI) and originating
//! towards an upstream or a parent proxy (`client`). `files` reads what a
//! policy names.
//!
//! The crypto provider is aws-lc-rs (see `provider`).

pub mod client;
pub mod files;
pub mod server;

use std::sync::{Arc, LazyLock};

use rustls::crypto::CryptoProvider;
use tokio_rustls::TlsAcceptor;

use crate::policy::Policy;

/// The one crypto provider: aws-lc-rs, measured faster here than ring for
/// handshakes and bulk data, and built from source by Debian's C compiler
/// alone (no cmake, no nasm).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    PROVIDER.clone()
}

/// The TLS servers a policy's rules and routes terminate clients with.
pub struct Terminators {
    /// By rule: its `terminate`, if any.
    pub rules: Vec<Option<TlsAcceptor>>,
    /// By route: its `terminate`, if any.
    pub routes: Vec<Option<TlsAcceptor>>,
}

impl Terminators {
    /// Builds each `terminate` of `policy`; an error names the one that
    /// could not be built.
    pub fn new(policy: &Policy) -> Result<Terminators, String> {
        let build = |terminate: Option<&crate::policy::Terminate>, at: String| {
            terminate
                .map(|terminate| {
                    server::config(terminate)
                        .map(TlsAcceptor::from)
                        .map_err(|e| format!("{at}.terminate: {e}"))
                })
                .transpose()
        };
        Ok(Terminators {
            rules: (policy.rules.iter().enumerate())
                .map(|(i, rule)| build(rule.terminate.as_ref(), format!("intercept[{i}]")))
                .collect::<Result<_, _>>()?,
            routes: (policy.routes.iter().enumerate())
                .map(|(i, route)| build(route.terminate.as_ref(), format!("routes[{i}]")))
                .collect::<Result<_, _>>()?,
        })
    }
}
