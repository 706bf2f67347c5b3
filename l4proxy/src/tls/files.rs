//! Certificates, keys and CA bundles as a policy names them: PEM files read
//! and checked when the policy is (`check`, start, reload), so that a bad
//! file refuses the policy with its path and the reason.

use std::{fmt, sync::Arc};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::policy::file::read_small_file;

/// A certificate chain and its private key, ready to present.
#[derive(Clone)]
pub struct Certificate {
    /// The files, as the policy names them.
    pub chain_file: String,
    pub key_file: String,
    pub key: Arc<CertifiedKey>,
    /// The leaf's DNS names (subjectAltName), lower case; a wildcard is
    /// kept as written (`*.example.com`).
    pub names: Vec<String>,
    /// The leaf's subject, for messages.
    pub subject: String,
    /// When the leaf expires, in seconds since the epoch.
    pub not_after: i64,
}

/// Two certificates are the same when they come from the same files with
/// the same contents (a reload that changes nothing changes nothing).
impl PartialEq for Certificate {
    fn eq(&self, other: &Self) -> bool {
        self.chain_file == other.chain_file
            && self.key_file == other.key_file
            && self.key.cert == other.key.cert
    }
}

impl Eq for Certificate {}

/// The key stays out of logs and messages.
impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("chain_file", &self.chain_file)
            .field("names", &self.names)
            .finish()
    }
}

impl Certificate {
    /// Reads `chain_file` (the leaf first, then the certificates that issue
    /// it, in order) and `key_file` (its private key: PKCS#8, SEC1 or
    /// PKCS#1), and checks that the key is the leaf's and the chain is in
    /// order.
    pub fn load(chain_file: &str, key_file: &str) -> Result<Certificate, String> {
        let chain = read_certificates(chain_file)?;
        let key_text = read_small_file(key_file)?;
        let key = PrivateKeyDer::from_pem_slice(key_text.as_bytes())
            .map_err(|e| format!("{key_file}: no private key: {e}"))?;
        let signing = super::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("{key_file}: unusable private key: {e}"))?;
        let parsed = chain
            .iter()
            .enumerate()
            .map(|(i, der)| {
                X509Certificate::from_der(der)
                    .map(|(_, cert)| cert)
                    .map_err(|e| format!("{chain_file}: certificate {}: {e}", i + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, pair) in parsed.windows(2).enumerate() {
            if pair[0].issuer() != pair[1].subject() {
                return Err(format!(
                    "{chain_file}: chain out of order: certificate {} ({}) is not the issuer of certificate {} ({}); \
                     the leaf goes first, then each issuer",
                    i + 2,
                    pair[1].subject(),
                    i + 1,
                    pair[0].subject()
                ));
            }
        }
        let leaf = &parsed[0];
        let names = dns_names(leaf);
        let subject = leaf.subject().to_string();
        let not_after = leaf.validity().not_after.timestamp();
        let key = CertifiedKey::new(chain, signing);
        key.keys_match().map_err(|e| {
            format!("{key_file}: the key does not match the certificate in {chain_file}: {e}")
        })?;
        Ok(Certificate {
            chain_file: chain_file.to_owned(),
            key_file: key_file.to_owned(),
            key: Arc::new(key),
            names,
            subject,
            not_after,
        })
    }
}

/// The DNS names a certificate is for (subjectAltName dNSName entries),
/// lower case.
fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Every certificate in a PEM file; at least one.
fn read_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = read_small_file(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path}: no certificate (PEM \"CERTIFICATE\")"));
    }
    Ok(certs)
}

/// The certificates a peer's must chain to: a CA file's, or the system's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roots {
    /// A PEM file of CA certificates, read.
    File {
        path: String,
        certs: Vec<CertificateDer<'static>>,
    },
    /// The system's store (`/etc/ssl/certs` on Debian), read when a
    /// policy that uses it is put in force.
    System,
}

impl Roots {
    /// Reads a CA file; each certificate in it must be usable as a trust
    /// anchor.
    pub fn load(path: &str) -> Result<Roots, String> {
        let certs = read_certificates(path)?;
        let mut store = RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            store
                .add(cert.clone())
                .map_err(|e| format!("{path}: certificate {}: {e}", i + 1))?;
        }
        Ok(Roots::File {
            path: path.to_owned(),
            certs,
        })
    }

    /// The trust anchors.
    pub fn store(&self) -> Result<RootCertStore, String> {
        let mut store = RootCertStore::empty();
        match self {
            Roots::File { certs, .. } => {
                store.add_parsable_certificates(certs.iter().cloned());
            }
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                if let Some(e) = found.errors.first() {
                    tracing::warn!(error = %e, "reading the system's CA certificates");
                }
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err("no CA certificates found in the system's store \
                                (install Debian's ca-certificates, or name a CA file)"
                        .to_owned());
                }
            }
        }
        Ok(store)
    }
}
