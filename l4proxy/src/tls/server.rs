//! Terminating a client's TLS: the certificate chosen by the client's
//! server name (exact, then a wildcard one label up), the first one for no
//! name or an unknown one (or a refusal, as the policy says); the ALPN
//! protocols and versions the policy offers; client certificates checked
//! against its CA file. Sessions resume with tickets (keys rotated by
//! rustls, kept for the daemon's life, so a reload does not end them; one
//! set per client-certificate requirement, see [`tickets`]) and, for TLS
//! 1.2 clients without tickets, a session cache per configuration.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use rustls::{
    ServerConfig,
    server::{
        ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache,
        WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    version::{TLS12, TLS13},
};

use super::provider;
use crate::policy::{ClientCertificates, Terminate, TlsVersion};

/// Sessions a terminating configuration remembers for TLS 1.2 resumption
/// by ID (about 100 bytes each).
const SESSION_CACHE: usize = 4096;

/// Ticketers made so far, by the client certificates their sessions had to
/// show (see [`tickets`]).
type Ticketers = Vec<(Option<ClientCertificates>, Arc<dyn ProducesTickets>)>;

static TICKETS: Mutex<Ticketers> = Mutex::new(Vec::new());

/// The ticket keys for terminators that ask `clients` of their clients:
/// one rotating ticketer per requirement (none, or a CA and whether a
/// certificate is required), kept for the daemon's life so that tickets
/// outlive reloads. Not one for all: rustls resumes a session without
/// asking for a certificate (it takes the client's from the ticket), so a
/// ticket from a terminator that asked for none, or trusts another CA,
/// must not resume where a certificate is required. `None` if a ticketer
/// could not be made (then sessions resume from the cache only, until a
/// reload makes one).
fn tickets(clients: &Option<ClientCertificates>) -> Option<Arc<dyn ProducesTickets>> {
    let mut made = TICKETS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, ticketer)) = made.iter().find(|(asked, _)| asked == clients) {
        return Some(ticketer.clone());
    }
    let ticketer: Arc<dyn ProducesTickets> = rustls::crypto::ring::Ticketer::new()
        .inspect_err(|e| tracing::warn!(error = %e, "no TLS session tickets"))
        .ok()?;
    made.push((clients.clone(), ticketer.clone()));
    Some(ticketer)
}

/// The rustls configuration for a `terminate`.
pub fn config(terminate: &Terminate) -> Result<Arc<ServerConfig>, String> {
    let versions: &[_] = match terminate.min_version {
        TlsVersion::V1_2 => &[&TLS13, &TLS12],
        TlsVersion::V1_3 => &[&TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match &terminate.client_certificates {
        None => builder.with_no_client_auth(),
        Some(clients) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(clients.ca.store()?),
                provider(),
            );
            let verifier = if clients.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(BySni::new(terminate)));
    config.alpn_protocols = terminate
        .alpn
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    // The provider's suite order (see `provider`), not the client's.
    config.ignore_client_order = true;
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    if let Some(ticketer) = tickets(&terminate.client_certificates) {
        config.ticketer = ticketer;
    }
    Ok(Arc::new(config))
}

/// Certificates by the names they are for.
#[derive(Debug)]
struct BySni {
    certificates: Vec<Arc<CertifiedKey>>,
    /// Lower-case name → certificate; the first listed wins.
    exact: Names,
    /// `*.example.com` as `example.com` → certificate.
    wildcard: Names,
    /// For a client without a known name; `None`: refused.
    default: Option<usize>,
}

impl BySni {
    fn new(terminate: &Terminate) -> Self {
        let (exact, wildcard) = index(terminate.certificates.iter().map(|c| &c.names[..]));
        BySni {
            certificates: terminate
                .certificates
                .iter()
                .map(|c| c.key.clone())
                .collect(),
            exact,
            wildcard,
            default: (!terminate.refuse_unknown_names).then_some(0),
        }
    }

    /// The certificate for `name`: one made for it, else a wildcard one
    /// for its parent (a wildcard covers one label).
    fn find(&self, name: &str) -> Option<usize> {
        let name = name.to_ascii_lowercase();
        self.exact.get(&name).copied().or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.wildcard.get(parent).copied()
        })
    }
}

type Names = HashMap<String, usize>;

/// Each certificate's names (by position): exact ones, and wildcards by
/// the parent they cover; the first listed wins.
fn index<'a>(certificates: impl Iterator<Item = &'a [String]>) -> (Names, Names) {
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for (i, names) in certificates.enumerate() {
        for name in names {
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()).or_insert(i),
                None => exact.entry(name.clone()).or_insert(i),
            };
        }
    }
    (exact, wildcard)
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = hello.server_name().and_then(|name| self.find(name));
        found.or(self.default).map(|i| self.certificates[i].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_sni(names: &[&[&str]]) -> BySni {
        let names: Vec<Vec<String>> = names
            .iter()
            .map(|list| list.iter().map(|n| n.to_string()).collect())
            .collect();
        let (exact, wildcard) = index(names.iter().map(|n| &n[..]));
        BySni {
            certificates: Vec::new(),
            exact,
            wildcard,
            default: Some(0),
        }
    }

    #[test]
    fn terminators_share_ticket_keys_only_when_they_ask_the_same_of_clients() {
        let asking = |path: &str, required| {
            Some(ClientCertificates {
                ca: crate::tls::files::Roots::File {
                    path: path.to_owned(),
                    certs: Vec::new(),
                },
                required,
            })
        };
        let keys = |clients: &Option<ClientCertificates>| tickets(clients).expect("a ticketer");
        let same = |a: Option<ClientCertificates>, b: Option<ClientCertificates>| {
            Arc::ptr_eq(&keys(&a), &keys(&b))
        };
        assert!(same(None, None), "no client certificates, a reload later");
        assert!(same(asking("/ca.pem", true), asking("/ca.pem", true)));
        assert!(!same(None, asking("/ca.pem", true)));
        assert!(!same(asking("/ca.pem", false), asking("/ca.pem", true)));
        assert!(!same(asking("/ca.pem", true), asking("/other.pem", true)));
    }

    #[test]
    fn a_name_finds_its_certificate_exact_first_then_one_label_of_wildcard() {
        let certs = by_sni(&[
            &["app.example.test"],
            &["*.example.test", "api.example.test"],
            &["app.example.test"],
        ]);
        for (name, want) in [
            ("app.example.test", Some(0)),
            ("APP.Example.Test", Some(0)),
            ("api.example.test", Some(1)),
            ("other.example.test", Some(1)),
            ("a.b.example.test", None),
            ("example.test", None),
        ] {
            assert_eq!(certs.find(name), want, "{name}");
        }
    }
}
