//! A test PKI for TLS termination and origination: a root CA, intermediates,
//! and the leaves issued by them (server, client, about to expire, expired),
//! plus broken files for `check`. All made with the `openssl` command line in
//! a lab [`TempDir`], as PEM files.
//!
//! [`super::tls::make_cert`] makes certificates that are their own CA
//! (`CA:TRUE`), which rustls (webpki) refuses as a server's certificate
//! (`CaUsedAsEndEntity`); these leaves are `CA:FALSE`, have the extended key
//! usage of their role, and chain to a CA a client can be given as its only
//! trust anchor (`-CAfile`, `--cacert`).
//!
//! Every certificate, the root's too, is issued with `openssl ca` from a
//! throwaway database per CA, because that is the one command of Debian's
//! OpenSSL 3.0 that sets a certificate's dates: `openssl x509 -req` and
//! `openssl req -x509` only count `-days` from now (`-not_before` and
//! `-not_after` came with OpenSSL 3.4). Leaves are valid from an hour ago,
//! backdated as real CAs do, so that no verifier whose clock lags a little
//! finds them not yet valid.
//!
//! A CA's database is not locked: issue from one [`Ca`] on one thread at a
//! time.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::TempDir;
use super::tls::{self, require_tool};

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

/// A certificate authority: a root made by [`Ca::new`] or an intermediate
/// made by [`Ca::issue_intermediate`]. It issues into the directory it was
/// made in, each certificate named by the caller; names must be unique in
/// that directory.
pub struct Ca {
    pub name: String,
    /// The CA's certificate; a root's is the trust anchor to give clients.
    pub cert: PathBuf,
    key: PathBuf,
    /// Where issued certificates and keys go.
    dir: PathBuf,
    /// The `openssl ca` configuration, database, requests and extensions.
    db: PathBuf,
    /// What follows a leaf of this CA in its chain file: this CA's
    /// certificate and those above it, up to but without the root (empty
    /// for a root).
    above_leaf: Vec<PathBuf>,
}

/// An issued certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Cert {
    pub name: String,
    /// The certificate alone.
    pub cert: PathBuf,
    /// The certificate then its intermediates: the full chain file an
    /// operator configures (the certificate alone if a root issued it).
    pub chain: PathBuf,
    /// The private key, PKCS#8 (`BEGIN PRIVATE KEY`).
    pub key: PathBuf,
    /// The intermediates in `chain`, leaf's issuer first.
    intermediates: Vec<PathBuf>,
}

/// The key types a test needs: P-256 everywhere, RSA where a test wants the
/// other signature family.
#[derive(Clone, Copy)]
enum KeyType {
    P256,
    Rsa2048,
}

impl KeyType {
    fn genpkey_args(self) -> [&'static str; 4] {
        match self {
            KeyType::P256 => ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            KeyType::Rsa2048 => ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        }
    }
}

/// A certificate's validity, in seconds from now.
struct Validity {
    from: i64,
    until: i64,
}

/// A CA is valid from a week ago, so that the expired leaf lies within it,
/// for ten years, longer than any leaf a test asks for.
const CA_VALIDITY: Validity = Validity {
    from: -7 * DAY,
    until: 3650 * DAY,
};

impl Validity {
    /// From an hour ago until `days` days from now.
    fn days(days: i64) -> Validity {
        Validity {
            from: -HOUR,
            until: days * DAY,
        }
    }
}

/// Extensions of a CA certificate (an intermediate adds the identifier of
/// its issuer's key).
const CA_EXTENSIONS: &str = "basicConstraints = critical, CA:TRUE\n\
                             keyUsage = critical, keyCertSign, cRLSign\n\
                             subjectKeyIdentifier = hash\n";

/// Extensions every leaf has; the role adds its extended key usage.
const LEAF_EXTENSIONS: &str = "basicConstraints = critical, CA:FALSE\n\
                               keyUsage = critical, digitalSignature\n\
                               subjectKeyIdentifier = hash\n\
                               authorityKeyIdentifier = keyid:always\n";

impl Ca {
    /// A root CA `CN=l4proxy lab <name>` (P-256) as `<name>.crt` and
    /// `<name>.key` in `dir`, its database in `<name>.ca/`.
    pub fn new(dir: &TempDir, name: &str) -> Ca {
        require_tool("openssl", "openssl");
        let ca = Ca::empty(dir.path(), name, Vec::new());
        let cn = format!("l4proxy lab {name}");
        ca.issue(name, &cn, KeyType::P256, CA_EXTENSIONS, CA_VALIDITY);
        ca
    }

    /// An intermediate CA `CN=l4proxy lab <name>` (P-256) signed by this
    /// one, in the same directory. The chain files of its leaves hold the
    /// leaf, then it, then any intermediates above it.
    pub fn issue_intermediate(&self, name: &str) -> Ca {
        let mut above_leaf = vec![self.dir.join(format!("{name}.crt"))];
        above_leaf.extend(self.above_leaf.iter().cloned());
        let ca = Ca::empty(&self.dir, name, above_leaf);
        let cn = format!("l4proxy lab {name}");
        let extensions = format!("{CA_EXTENSIONS}authorityKeyIdentifier = keyid:always\n");
        self.issue(name, &cn, KeyType::P256, &extensions, CA_VALIDITY);
        ca
    }

    /// A server leaf `CN=<name>` (P-256), extended key usage serverAuth,
    /// with these subjectAltName entries (`DNS:app.example.test`,
    /// `DNS:*.example.test`, `IP:192.0.2.1`; none: no subjectAltName at all),
    /// valid from an hour ago until a day from now.
    pub fn issue_server(&self, name: &str, sans: &[&str]) -> Cert {
        self.issue_server_with(name, sans, KeyType::P256, Validity::days(1))
    }

    /// [`Ca::issue_server`] with an RSA 2048 key.
    pub fn issue_server_rsa(&self, name: &str, sans: &[&str]) -> Cert {
        self.issue_server_with(name, sans, KeyType::Rsa2048, Validity::days(1))
    }

    /// [`Ca::issue_server`] valid until `days_left` days from now (to the
    /// second, as of this call).
    pub fn issue_server_expiring(&self, name: &str, sans: &[&str], days_left: u32) -> Cert {
        let validity = Validity::days(days_left.into());
        self.issue_server_with(name, sans, KeyType::P256, validity)
    }

    /// [`Ca::issue_server`] that expired a day ago (valid for the day
    /// before).
    pub fn issue_server_expired(&self, name: &str, sans: &[&str]) -> Cert {
        let validity = Validity {
            from: -2 * DAY,
            until: -DAY,
        };
        self.issue_server_with(name, sans, KeyType::P256, validity)
    }

    /// A client leaf `CN=<cn>` (P-256), extended key usage clientAuth, no
    /// subjectAltName, valid from an hour ago until a day from now.
    pub fn issue_client(&self, name: &str, cn: &str) -> Cert {
        let extensions = format!("{LEAF_EXTENSIONS}extendedKeyUsage = clientAuth\n");
        self.issue_leaf(name, cn, KeyType::P256, &extensions, Validity::days(1))
    }

    /// A CA with its paths set and an empty database, its key and
    /// certificate yet to be made.
    fn empty(dir: &Path, name: &str, above_leaf: Vec<PathBuf>) -> Ca {
        let db = unused(dir.join(format!("{name}.ca")));
        fs::create_dir(&db).unwrap_or_else(|e| panic!("create {}: {e}", db.display()));
        write(&db.join("index.txt"), "");
        // `unique_subject = no`: tests may well issue two leaves with one
        // subject. Random serials: no serial file to keep.
        let config = format!(
            "[ca]\n\
             default_ca = lab\n\
             [lab]\n\
             database = {db}/index.txt\n\
             new_certs_dir = {db}\n\
             rand_serial = yes\n\
             unique_subject = no\n\
             default_md = sha256\n\
             email_in_dn = no\n\
             copy_extensions = none\n\
             policy = policy\n\
             [policy]\n\
             commonName = supplied\n",
            db = db.display()
        );
        write(&db.join("openssl.cnf"), &config);
        Ca {
            name: name.to_owned(),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            dir: dir.to_owned(),
            db,
            above_leaf,
        }
    }

    /// Server leaves differ only in their key and their dates.
    fn issue_server_with(
        &self,
        name: &str,
        sans: &[&str],
        key_type: KeyType,
        validity: Validity,
    ) -> Cert {
        let mut extensions = format!("{LEAF_EXTENSIONS}extendedKeyUsage = serverAuth\n");
        if !sans.is_empty() {
            extensions += &format!("subjectAltName = {}\n", sans.join(", "));
        }
        self.issue_leaf(name, name, key_type, &extensions, validity)
    }

    /// [`Ca::issue`] and the leaf's chain file.
    fn issue_leaf(
        &self,
        name: &str,
        cn: &str,
        key_type: KeyType,
        extensions: &str,
        validity: Validity,
    ) -> Cert {
        let (cert, key) = self.issue(name, cn, key_type, extensions, validity);
        let leaf = Cert {
            name: name.to_owned(),
            cert,
            chain: self.dir.join(format!("{name}.fullchain.crt")),
            key,
            intermediates: self.above_leaf.clone(),
        };
        concatenate(
            &leaf.chain,
            std::iter::once(&leaf.cert).chain(&leaf.intermediates),
        );
        leaf
    }

    /// Makes a key `<name>.key` and a certificate `<name>.crt` for it,
    /// `CN=<cn>` with `extensions`, signed by this CA: by its own key when
    /// it is this CA's own certificate (a root's, self-signed).
    fn issue(
        &self,
        name: &str,
        cn: &str,
        key_type: KeyType,
        extensions: &str,
        validity: Validity,
    ) -> (PathBuf, PathBuf) {
        let cert = unused(self.dir.join(format!("{name}.crt")));
        let key = unused(self.dir.join(format!("{name}.key")));
        let mut genpkey = vec!["genpkey"];
        genpkey.extend(key_type.genpkey_args());
        genpkey.extend(["-out", path(&key)]);
        must_openssl(&genpkey);
        let csr = self.db.join(format!("{name}.csr"));
        let subject = format!("/CN={cn}");
        must_openssl(&[
            "req",
            "-new",
            "-key",
            path(&key),
            "-subj",
            &subject,
            "-out",
            path(&csr),
        ]);
        let ext = self.db.join(format!("{name}.ext"));
        write(&ext, &format!("[ext]\n{extensions}"));
        let config = self.db.join("openssl.cnf");
        let start = asn1_time(validity.from);
        let end = asn1_time(validity.until);
        let mut sign = vec![
            "ca",
            "-batch",
            "-notext",
            "-config",
            path(&config),
            "-in",
            path(&csr),
            "-out",
            path(&cert),
            "-keyfile",
            path(&self.key),
            "-startdate",
            &start,
            "-enddate",
            &end,
            "-extfile",
            path(&ext),
            "-extensions",
            "ext",
        ];
        if cert == self.cert {
            sign.push("-selfsign");
        } else {
            sign.extend(["-cert", path(&self.cert)]);
        }
        must_openssl(&sign);
        (cert, key)
    }
}

impl Cert {
    /// Writes the chain with the leaf last, after its intermediates, as
    /// `<name>.misordered.crt`: a mistake `check` must name, since rustls
    /// takes the first certificate for the leaf and only reports that the
    /// key does not match it. Panics for a leaf with no intermediate, which
    /// has no wrong order.
    pub fn write_misordered_chain(&self) -> PathBuf {
        assert!(
            !self.intermediates.is_empty(),
            "{}: issued by a root, its chain has no wrong order",
            self.name
        );
        let out = self
            .cert
            .with_file_name(format!("{}.misordered.crt", self.name));
        concatenate(&out, self.intermediates.iter().chain([&self.cert]));
        out
    }

    /// Writes the key in OpenSSL's traditional format, as `<key
    /// stem>.traditional.key`: SEC1 (`BEGIN EC PRIVATE KEY`) for P-256,
    /// PKCS#1 (`BEGIN RSA PRIVATE KEY`) for RSA; operators have both.
    pub fn write_traditional_key(&self) -> PathBuf {
        let out = self.key.with_extension("traditional.key");
        must_openssl(&[
            "pkey",
            "-in",
            path(&self.key),
            "-traditional",
            "-out",
            path(&out),
        ]);
        out
    }

    /// This certificate as nginx serves it ([`tls::Site`]): the chain file
    /// as the certificate, so that intermediates are sent.
    pub fn served(&self) -> tls::Cert {
        tls::Cert {
            name: self.name.clone(),
            cert: self.chain.clone(),
            key: self.key.clone(),
        }
    }
}

/// `a`'s certificate (and chain) with `b`'s key: a pair that does not match.
pub fn mismatched(a: &Cert, b: &Cert) -> Cert {
    Cert {
        name: format!("{}-with-key-of-{}", a.name, b.name),
        key: b.key.clone(),
        ..a.clone()
    }
}

/// Writes `<name>.pem` in `dir`: a PEM `CERTIFICATE` whose body is not
/// base64, so that a loader fails parsing it (rather than finding no PEM
/// section, as in [`write_empty`]'s file).
pub fn write_garbage(dir: &TempDir, name: &str) -> PathBuf {
    let out = dir.join(&format!("{name}.pem"));
    write(
        &out,
        "-----BEGIN CERTIFICATE-----\n\
         this is not a certificate!\n\
         -----END CERTIFICATE-----\n",
    );
    out
}

/// Writes `<name>.pem` in `dir`, empty.
pub fn write_empty(dir: &TempDir, name: &str) -> PathBuf {
    let out = dir.join(&format!("{name}.pem"));
    write(&out, "");
    out
}

/// base64 of the SHA-256 of the certificate's SubjectPublicKeyInfo (DER),
/// the form Chromium's `--ignore-certificate-errors-spki-list` takes.
pub fn spki_sha256_base64(cert: &Path) -> String {
    // `-pubkey` prints the SubjectPublicKeyInfo as PEM: its body is the DER.
    let pem = must_openssl(&["x509", "-in", path(cert), "-noout", "-pubkey"]);
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = STANDARD
        .decode(&body)
        .unwrap_or_else(|e| panic!("public key of {}: {e}\n{pem}", cert.display()));
    STANDARD.encode(Sha256::digest(&der))
}

fn must_openssl(args: &[&str]) -> String {
    super::must("openssl", args)
}

/// Now plus `offset` seconds as `openssl ca -startdate`/`-enddate` take it,
/// `YYYYMMDDHHMMSSZ` (UTC; GNU date does the calendar).
fn asn1_time(offset: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = format!("@{}", now + offset);
    super::must("date", &["-u", "-d", &at, "+%Y%m%d%H%M%SZ"])
        .trim()
        .to_owned()
}

/// Writes `out` as the files of `parts` one after the other.
fn concatenate<'a>(out: &Path, parts: impl IntoIterator<Item = &'a PathBuf>) {
    let mut text = String::new();
    for part in parts {
        text +=
            &fs::read_to_string(part).unwrap_or_else(|e| panic!("read {}: {e}", part.display()));
    }
    write(out, &text);
}

/// `path`, which must not exist yet: names are unique in a PKI's directory,
/// and a test that used one twice would silently replace a file in use.
fn unused(path: PathBuf) -> PathBuf {
    assert!(
        !path.exists(),
        "{} exists: names must be unique in a PKI's directory",
        path.display()
    );
    path
}

fn write(out: &Path, text: &str) {
    fs::write(out, text).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
}

/// A path as a command-line argument (the lab's paths are UTF-8).
fn path(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("not UTF-8: {}", p.display()))
}
