//! TLS on either side of a connection, with rustls: terminating a client's
//! (`server`, with the policy's certificates chosen by SNI) and originating
//! towards an upstream or a parent proxy (`client`). `files` reads what a
//! policy names.
//!
//! The crypto provider is ring (see `provider`).

pub mod client;
pub mod files;
pub mod server;

use std::sync::{Arc, LazyLock};

use rustls::crypto::CryptoProvider;
use tokio_rustls::TlsAcceptor;

use crate::policy::Policy;

/// The one crypto provider: ring, with TLS 1.3's AES-128-GCM first.
///
/// Measured here (2 cores, AMD EPYC with AVX2 but no AVX-512) against
/// aws-lc-rs, in memory: ring encrypts and decrypts AES-GCM 1.3 times as
/// fast (it has VAES/AVX2 code; aws-lc has it for AVX-512 only), and a
/// terminated connection pays that on every byte, while aws-lc-rs' lead
/// in handshakes is about 6 % (TLS 1.3, P-256; RSA even). ring also builds
/// in less than half the time, with Debian's C compiler alone.
///
/// AES-128-GCM-SHA256 first, in the server's order: SHA-384's handshake
/// hashing costs a quarter of a full handshake here, for no security a
/// 128-bit key does not already give.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
        let mut provider = rustls::crypto::ring::default_provider();
        provider
            .cipher_suites
            .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        Arc::new(provider)
    });
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
