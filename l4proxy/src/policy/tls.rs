//! TLS in a policy: `terminate` on a rule or a route (l4proxy is the TLS
//! server the client talks to, with the policy's certificates) and `tls` on
//! an upstream or a parent (l4proxy is the TLS client towards it). Every
//! file is read and checked as the policy is.

use serde::{Deserialize, Deserializer, de::Error as _};

use super::raw::{Alpn, Object, non_empty, some, some_non_empty, some_word};
use crate::tls::files::{Certificate, Roots};

/// How l4proxy terminates a client's TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terminate {
    /// Chosen by the client's server name (SNI) against each one's names,
    /// exact or wildcard; the first is the default.
    pub certificates: Vec<Certificate>,
    /// Refuse a client whose server name no certificate has (or that sends
    /// none) instead of presenting the first.
    pub refuse_unknown_names: bool,
    /// ALPN protocols offered, in order of preference; empty: none.
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
    /// Client certificates, checked against a CA file.
    pub client_certificates: Option<ClientCertificates>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificates {
    pub ca: Roots,
    /// Without one a client is refused; otherwise one is checked if sent.
    pub required: bool,
}

/// How l4proxy reaches an upstream (or a parent proxy) over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Originate {
    /// What the server's certificate must chain to.
    pub roots: Roots,
    /// The name the server's certificate must have, sent as SNI. `None`:
    /// the name the client asked for (its SNI, else its CONNECT name); for
    /// a parent, its address.
    pub server_name: Option<String>,
    /// ALPN protocols offered. `None`: the one negotiated with the client,
    /// when l4proxy terminated its TLS.
    pub alpn: Option<Vec<String>>,
    /// A client certificate, for servers that ask for one.
    pub certificate: Option<Certificate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawTerminate {
    #[serde(deserialize_with = "non_empty")]
    certificates: Vec<Object<CertificateFiles>>,
    #[serde(default)]
    refuse_unknown_names: bool,
    #[serde(default, deserialize_with = "some_non_empty")]
    alpn: Option<Vec<Alpn>>,
    #[serde(default, deserialize_with = "some_word")]
    min_version: Option<TlsVersion>,
    #[serde(default, deserialize_with = "some")]
    client_certificates: Option<Object<RawClientCertificates>>,
}

impl From<Object<RawTerminate>> for Terminate {
    fn from(Object(raw): Object<RawTerminate>) -> Self {
        Terminate {
            certificates: raw.certificates.into_iter().map(|c| c.0.0).collect(),
            refuse_unknown_names: raw.refuse_unknown_names,
            alpn: alpn(raw.alpn).unwrap_or_default(),
            min_version: raw.min_version.unwrap_or(TlsVersion::V1_2),
            client_certificates: raw.client_certificates.map(|Object(c)| ClientCertificates {
                ca: c.ca.0,
                required: c.required,
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
struct RawClientCertificates {
    ca: CaFile,
    #[serde(default = "yes")]
    required: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawOriginate {
    #[serde(default, deserialize_with = "some")]
    ca: Option<CaFile>,
    #[serde(default, deserialize_with = "some")]
    server_name: Option<ServerName>,
    #[serde(default, deserialize_with = "some_non_empty")]
    alpn: Option<Vec<Alpn>>,
    #[serde(default, deserialize_with = "some")]
    certificate: Option<Object<CertificateFiles>>,
}

impl From<Object<RawOriginate>> for Originate {
    fn from(Object(raw): Object<RawOriginate>) -> Self {
        Originate {
            roots: raw.ca.map_or(Roots::System, |ca| ca.0),
            server_name: raw.server_name.map(|n| n.0),
            alpn: alpn(raw.alpn),
            certificate: raw.certificate.map(|c| c.0.0),
        }
    }
}

fn alpn(list: Option<Vec<Alpn>>) -> Option<Vec<String>> {
    list.map(|list| list.into_iter().map(|a| a.0).collect())
}

/// `{ "chain": PEM file, "key": PEM file }`, read and checked.
struct CertificateFiles(Certificate);

impl<'de> Deserialize<'de> for CertificateFiles {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, expecting = "an object")]
        struct Files {
            chain: String,
            key: String,
        }
        let files = Files::deserialize(deserializer)?;
        Certificate::load(&files.chain, &files.key)
            .map(CertificateFiles)
            .map_err(D::Error::custom)
    }
}

/// A CA file's path, read.
struct CaFile(Roots);

impl<'de> Deserialize<'de> for CaFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let path = String::deserialize(deserializer)?;
        Roots::load(&path).map(CaFile).map_err(D::Error::custom)
    }
}

/// A DNS name or an IP address, as a certificate names a server.
struct ServerName(String);

impl<'de> Deserialize<'de> for ServerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        rustls::pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
            D::Error::custom(format!("{name:?} is not a DNS name or an IP address"))
        })?;
        Ok(ServerName(name.to_ascii_lowercase()))
    }
}
