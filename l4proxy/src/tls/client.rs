//! Originating TLS towards an upstream or a parent proxy: the server's
//! certificate verified against the policy's CA file or the system's store,
//! a client certificate where the policy gives one. Sessions resume from
//! rustls' in-memory store (per configuration, so per policy).

use std::sync::Arc;

use rustls::{ClientConfig, sign::SingleCertAndKey};

use super::provider;
use crate::policy::Originate;

/// The rustls configuration for an upstream's or a parent's `tls`.
pub fn config(originate: &Originate) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(originate.roots.store()?);
    let mut config = match &originate.certificate {
        Some(certificate) => builder
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certificate.key.clone()))),
        None => builder.with_no_client_auth(),
    };
    if let Some(alpn) = &originate.alpn {
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    }
    Ok(Arc::new(config))
}
