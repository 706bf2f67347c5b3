//! The origin the CONNECT tests reach: `app.example.test` served over TLS
//! by nginx in sv, and dnsmasq in sv (on [`RESOLVER`]) answering for it and
//! whatever other names a test gives.

use std::path::PathBuf;

use super::dns::Dnsmasq;
use super::tls::{Cert, Nginx, Site, make_cert, require_tools};
use super::{TempDir, Topo};

pub const APP: &str = "app.example.test";
pub const RESOLVER: &str = "203.0.113.53";

/// nginx, its certificate, and the resolver; all stopped and removed on drop.
pub struct Origin {
    pub cert: Cert,
    pub nginx: Nginx,
    pub dns: Dnsmasq,
    _certs: TempDir,
}

impl Origin {
    /// nginx serves `sites` (listen address, body) with one certificate for
    /// [`APP`] and `extra_sans`; dnsmasq answers `records`.
    pub fn start(
        t: &Topo,
        sites: &[(&str, &str)],
        extra_sans: &[&str],
        records: &[(&str, &[&str])],
    ) -> Origin {
        require_tools();
        let certs = TempDir::new("origin-certs");
        let app = format!("DNS:{APP}");
        let sans: Vec<&str> = std::iter::once(app.as_str())
            .chain(extra_sans.iter().copied())
            .collect();
        let cert = make_cert(&certs, "app", APP, &sans);
        let sites: Vec<Site> = sites
            .iter()
            .map(|(listen, body)| Site::tls(listen, &cert, body))
            .collect();
        let nginx = Nginx::start(&t.sv, &sites);
        let dns = resolver(t, records);
        Origin {
            cert,
            nginx,
            dns,
            _certs: certs,
        }
    }

    /// A resolv.conf naming only the lab's resolver.
    pub fn resolv_conf(&self) -> PathBuf {
        resolv_conf(&self.dns)
    }

    /// The certificate, for `--cacert` and `-CAfile`.
    pub fn cacert(&self) -> &str {
        self.cert.cert.to_str().unwrap()
    }
}

/// dnsmasq in sv on [`RESOLVER`], answering `records` (see
/// [`Dnsmasq::start`]); its resolv.conf is `resolv_conf(&dns)`.
pub fn resolver(t: &Topo, records: &[(&str, &[&str])]) -> Dnsmasq {
    t.sv.addr("to-px", &format!("{RESOLVER}/24"));
    Dnsmasq::start(&t.sv, RESOLVER.parse().unwrap(), records)
}

/// A resolv.conf naming only [`RESOLVER`], where `dns` answers.
pub fn resolv_conf(dns: &Dnsmasq) -> PathBuf {
    dns.resolv_conf(RESOLVER.parse().unwrap())
}
