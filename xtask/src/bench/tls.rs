//! `cargo xtask bench --only tls`: TLS termination by l4proxy (rustls,
//! ring) beside HAProxy (`bind … ssl crt`) and nginx's stream module
//! (`listen … ssl`), in the same run, all three in TCP mode in front of the
//! same plain servers; and the direct path, a TLS server with no proxy: the
//! bench's own rustls server (the same library and provider as l4proxy) on
//! the server host, which answers itself.
//!
//! Measured: full TLS 1.3 handshakes per second with an ECDSA P-256 and an
//! RSA 2048 certificate, resumed ones (tickets; each client worker keeps its
//! own session), both with a small request and reply after the handshake and
//! a close; and one stream each way through a terminated connection, to a
//! plain server and re-encrypted to a TLS one. The proxies' CPU time per
//! handshake is read from /proc, which the shared cores disturb less than
//! the rate.
//!
//! The client is rustls too: a small tokio client on two threads in the
//! client namespace; every handshake verifies the server's certificate
//! against the bench CA, made with `openssl ca` in the work directory.

use std::{
    fmt::Write as _,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, LazyLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use rustls::{
    CipherSuite, ClientConfig, HandshakeKind, RootCertStore, ServerConfig,
    client::Resumption,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::ServerSessionMemoryCache,
    version::TLS13,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Barrier, oneshot},
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{
    Bench,
    cpu::{threads_cpu, tree_cpu},
    lab::{self, Netns, Proc, ServerThread, enter},
    load::count_for,
    nginx,
    report::Report,
    stats::Spread,
    targets::{self, Service, Target},
};

/// The name the client asks for (SNI) and verifies.
const NAME: &str = "tls.bench.test";
/// The name the proxies verify on the TLS upstream.
const UPSTREAM_NAME: &str = "upstream.bench.test";

/// What the client sends after the handshake, and what it must get back
/// before the server closes.
const REQUEST: &[u8] = b"GET /tls-bench\n";
const REPLY: &[u8] = b"hello from the TLS bench server\n";

/// How long one exchange (connect, handshake, request, reply, close) may
/// take before it counts as failed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes a bulk sender hands the stream per write (as the other cases).
const BULK_CHUNK: usize = 128 * 1024;

/// The proxy-host addresses of HAProxy and nginx for this case (l4proxy's is
/// its usual service address, steered by sk_lookup).
const HAPROXY_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
const NGINX_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);

/// The paths compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path4 {
    Direct,
    L4proxy,
    Haproxy,
    Nginx,
}

impl Path4 {
    const ALL: [Path4; 4] = [Path4::Direct, Path4::L4proxy, Path4::Haproxy, Path4::Nginx];

    fn label(self) -> &'static str {
        match self {
            Path4::Direct => "direct (rustls server)",
            Path4::L4proxy => "l4proxy",
            Path4::Haproxy => "HAProxy",
            Path4::Nginx => "nginx",
        }
    }

    fn ip(self) -> Ipv4Addr {
        match self {
            Path4::Direct => lab::SV.parse().expect("a literal address"),
            Path4::L4proxy => match Target::L4proxy.addr(Service::Tls).ip() {
                std::net::IpAddr::V4(ip) => ip,
                std::net::IpAddr::V6(_) => unreachable!("the lab is IPv4"),
            },
            Path4::Haproxy => HAPROXY_IP,
            Path4::Nginx => NGINX_IP,
        }
    }

    /// Where the client connects for `listener`.
    fn addr(self, listener: Listener) -> SocketAddr {
        let port = match self {
            Path4::Direct => listener.direct_port(),
            _ => listener.proxy_port(),
        };
        SocketAddr::from((self.ip(), port))
    }
}

/// The certificate a handshake is made with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyType {
    Ecdsa,
    Rsa,
}

impl KeyType {
    fn label(self) -> &'static str {
        match self {
            KeyType::Ecdsa => "ECDSA P-256",
            KeyType::Rsa => "RSA 2048",
        }
    }
}

/// What a proxy listener (or the direct server's port) is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    /// Handshake (ECDSA, RSA certificate), request, reply, close.
    HsEcdsa,
    HsRsa,
    /// One stream from the client to a plain sink, or to the client from a
    /// plain source.
    Sink,
    Source,
    /// The same, re-encrypted to a TLS sink or source.
    SinkTls,
    SourceTls,
}

impl Listener {
    const ALL: [Listener; 6] = [
        Listener::HsEcdsa,
        Listener::HsRsa,
        Listener::Sink,
        Listener::Source,
        Listener::SinkTls,
        Listener::SourceTls,
    ];

    fn handshake(key: KeyType) -> Listener {
        match key {
            KeyType::Ecdsa => Listener::HsEcdsa,
            KeyType::Rsa => Listener::HsRsa,
        }
    }

    fn bulk(upstream_tls: bool, reverse: bool) -> Listener {
        match (upstream_tls, reverse) {
            (false, false) => Listener::Sink,
            (false, true) => Listener::Source,
            (true, false) => Listener::SinkTls,
            (true, true) => Listener::SourceTls,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Listener::HsEcdsa => "hs-ecdsa",
            Listener::HsRsa => "hs-rsa",
            Listener::Sink => "sink",
            Listener::Source => "source",
            Listener::SinkTls => "sink-tls",
            Listener::SourceTls => "source-tls",
        }
    }

    /// The certificate the client's TLS is terminated with.
    fn key_type(self) -> KeyType {
        match self {
            Listener::HsRsa => KeyType::Rsa,
            _ => KeyType::Ecdsa,
        }
    }

    fn proxy_port(self) -> u16 {
        8443 + Listener::ALL
            .iter()
            .position(|&l| l == self)
            .expect("listed") as u16
    }

    /// The direct path: the server's own TLS port. A bulk stream's direct
    /// path is a TLS connection straight to the TLS sink or source, whether
    /// the proxied row's upstream is plain or TLS.
    fn direct_port(self) -> u16 {
        match self {
            Listener::HsEcdsa => Port::DIRECT_ECDSA,
            Listener::HsRsa => Port::DIRECT_RSA,
            Listener::Sink | Listener::SinkTls => Port::SINK_TLS,
            Listener::Source | Listener::SourceTls => Port::SOURCE_TLS,
        }
    }

    /// The server port the proxies relay this listener's connections to.
    fn upstream_port(self) -> u16 {
        match self {
            Listener::HsEcdsa | Listener::HsRsa => Port::REPLY,
            Listener::Sink => Port::SINK,
            Listener::Source => Port::SOURCE,
            Listener::SinkTls => Port::SINK_TLS,
            Listener::SourceTls => Port::SOURCE_TLS,
        }
    }

    fn upstream_tls(self) -> bool {
        matches!(self, Listener::SinkTls | Listener::SourceTls)
    }

    fn upstream(self) -> SocketAddr {
        SocketAddr::from((
            lab::SV.parse::<Ipv4Addr>().expect("a literal address"),
            self.upstream_port(),
        ))
    }
}

/// The server host's ports (all served by [`ServerSide`]).
struct Port;

impl Port {
    /// TLS (ECDSA, RSA) handshake, request, reply: the direct path.
    const DIRECT_ECDSA: u16 = 8443;
    const DIRECT_RSA: u16 = 8444;
    /// Plain request, reply: the proxies' upstream for handshakes.
    const REPLY: u16 = 9080;
    /// Plain bulk sink and source.
    const SINK: u16 = 9082;
    const SOURCE: u16 = 9083;
    /// TLS (ECDSA) bulk sink and source: the re-encrypted upstream, and the
    /// direct path of the bulk rows.
    const SINK_TLS: u16 = 9443;
    const SOURCE_TLS: u16 = 9444;
}

// ---------------------------------------------------------------------------
// Certificates

/// The bench CA and its two server leaves, as PEM files.
struct Pki {
    ca: PathBuf,
    ecdsa: Leaf,
    rsa: Leaf,
}

struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    /// Certificate then key in one file, as HAProxy's `crt` takes them.
    combined: PathBuf,
}

impl Pki {
    fn leaf(&self, key: KeyType) -> &Leaf {
        match key {
            KeyType::Ecdsa => &self.ecdsa,
            KeyType::Rsa => &self.rsa,
        }
    }

    /// A P-256 root CA and two leaves it signs, for both names: P-256 and
    /// RSA 2048, `CA:FALSE`, serverAuth. Issued with `openssl ca` (as
    /// tests/lab/pki.rs does), valid from an hour ago for 90 days (under 30
    /// days left would be a `check` warning).
    fn make(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir.join("db"))?;
        std::fs::write(dir.join("db/index.txt"), "")?;
        let cnf = dir.join("db/openssl.cnf");
        std::fs::write(
            &cnf,
            format!(
                "[ca]\ndefault_ca = bench\n[bench]\ndatabase = {db}/index.txt\n\
                 new_certs_dir = {db}\nrand_serial = yes\nunique_subject = no\n\
                 default_md = sha256\nemail_in_dn = no\ncopy_extensions = none\n\
                 policy = policy\n[policy]\ncommonName = supplied\n",
                db = dir.join("db").display()
            ),
        )?;
        let start = asn1_time(-3600)?;
        let end = asn1_time(90 * 24 * 3600)?;
        let issue = |name: &str, cn: &str, genpkey: &[&str], ext: &str| -> anyhow::Result<()> {
            let key = dir.join(format!("{name}.key"));
            let csr = dir.join(format!("db/{name}.csr"));
            let crt = dir.join(format!("{name}.crt"));
            let extfile = dir.join(format!("db/{name}.ext"));
            std::fs::write(&extfile, format!("[ext]\n{ext}"))?;
            let mut args = vec!["genpkey"];
            args.extend_from_slice(genpkey);
            args.extend(["-out", path(&key)?]);
            lab::run("openssl", &args)?;
            let subject = format!("/CN={cn}");
            lab::run(
                "openssl",
                &[
                    "req",
                    "-new",
                    "-key",
                    path(&key)?,
                    "-subj",
                    &subject,
                    "-out",
                    path(&csr)?,
                ],
            )?;
            let ca_key = dir.join("ca.key");
            let ca_crt = dir.join("ca.crt");
            let mut sign = vec![
                "ca",
                "-batch",
                "-notext",
                "-config",
                path(&cnf)?,
                "-in",
                path(&csr)?,
                "-out",
                path(&crt)?,
                "-keyfile",
                path(&ca_key)?,
                "-startdate",
                &start,
                "-enddate",
                &end,
                "-extfile",
                path(&extfile)?,
                "-extensions",
                "ext",
            ];
            if name == "ca" {
                sign.push("-selfsign");
            } else {
                sign.extend(["-cert", path(&ca_crt)?]);
            }
            lab::run("openssl", &sign)
        };
        const P256: [&str; 4] = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
        const RSA: [&str; 4] = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
        issue(
            "ca",
            "l4proxy bench CA",
            &P256,
            "basicConstraints = critical, CA:TRUE\n\
             keyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n",
        )?;
        let leaf_ext = format!(
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid:always\n\
             subjectAltName = DNS:{NAME}, DNS:{UPSTREAM_NAME}\n"
        );
        issue("ecdsa", NAME, &P256, &leaf_ext)?;
        issue("rsa", NAME, &RSA, &leaf_ext)?;
        let leaf = |name: &str| -> anyhow::Result<Leaf> {
            let cert = dir.join(format!("{name}.crt"));
            let key = dir.join(format!("{name}.key"));
            let combined = dir.join(format!("{name}.pem"));
            std::fs::write(
                &combined,
                std::fs::read_to_string(&cert)? + &std::fs::read_to_string(&key)?,
            )?;
            Ok(Leaf {
                cert,
                key,
                combined,
            })
        };
        Ok(Pki {
            ca: dir.join("ca.crt"),
            ecdsa: leaf("ecdsa")?,
            rsa: leaf("rsa")?,
        })
    }
}

/// Now plus `offset` seconds as `openssl ca -startdate` takes it.
fn asn1_time(offset: i64) -> anyhow::Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    super::output_of(
        "date",
        &["-u", "-d", &format!("@{}", now + offset), "+%Y%m%d%H%M%SZ"],
    )
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("not UTF-8: {}", p.display()))
}

// ---------------------------------------------------------------------------
// rustls configurations

/// The client's provider: ring (the daemon's), offering one cipher suite,
/// TLS_AES_128_GCM_SHA256, and one group, X25519, so that every path
/// negotiates the same: l4proxy prefers that suite (its own order), while
/// HAProxy (server order) and nginx (client order) would otherwise take
/// OpenSSL's first, TLS_AES_256_GCM_SHA384, whose SHA-384 handshake hashing
/// costs more. OpenSSL 3.0 has no ML-KEM hybrid group.
fn client_provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
        let mut provider = ring::default_provider();
        provider.kx_groups = vec![ring::kx_group::X25519];
        provider
            .cipher_suites
            .retain(|suite| suite.suite() == CipherSuite::TLS13_AES_128_GCM_SHA256);
        Arc::new(provider)
    });
    PROVIDER.clone()
}

/// A TLS 1.3-only client that verifies servers against the bench CA
/// (rustls's webpki verifier) and resumes (`resume`: its own cache of
/// tickets) or never does.
fn client_config(roots: &Arc<RootCertStore>, resume: bool) -> anyhow::Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(client_provider())
        .with_protocol_versions(&[&TLS13])?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.resumption = if resume {
        Resumption::in_memory_sessions(4)
    } else {
        Resumption::disabled()
    };
    Ok(Arc::new(config))
}

fn roots(pki: &Pki) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca)? {
        roots.add(cert?)?;
    }
    Ok(Arc::new(roots))
}

/// The bench's TLS server as l4proxy's is configured (tls/mod.rs,
/// tls/server.rs): ring, TLS_AES_128_GCM_SHA256 first in the server's
/// order, TLS 1.3 and 1.2, tickets and a session cache.
fn server_config(leaf: &Leaf) -> anyhow::Result<Arc<ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&leaf.cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&leaf.key)?;
    let mut provider = ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.ignore_client_order = true;
    config.session_storage = ServerSessionMemoryCache::new(4096);
    config.ticketer = ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------
// Threads in a namespace

/// Runs `f` on a new thread moved into `ns` (threads it starts, a tokio
/// runtime's workers, are in `ns` too) and returns its result.
fn in_netns<T: Send>(
    ns: &Netns,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let file = ns.file()?;
    std::thread::scope(|s| {
        s.spawn(move || {
            enter(&file)?;
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A two-thread runtime (as l4proxy's on this 2-core machine), its threads
/// named `name` so that their CPU time can be found.
fn runtime(name: &str) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
}

/// The client threads' name.
const CLIENT_THREADS: &str = "l4b-tls-cl";
/// The server side's threads' name (the direct path's CPU time).
const SERVER_THREADS: &str = "l4b-tls-sv";

/// Runs `make()`'s future on a fresh client runtime in the client namespace.
fn on_client<F, Fut, T>(cl: &Netns, make: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    in_netns(cl, move || {
        let runtime = runtime(CLIENT_THREADS)?;
        let out = runtime.block_on(make());
        runtime.shutdown_timeout(Duration::from_secs(1));
        Ok(out)
    })
}

// ---------------------------------------------------------------------------
// The server side

/// What a server port does with a connection (after its TLS handshake, if
/// it has TLS).
#[derive(Clone, Copy, Debug)]
enum Serve {
    /// Reads [`REQUEST`], answers [`REPLY`], closes its side (TLS:
    /// close_notify then FIN), reads until the client has closed too.
    Reply,
    /// Counts what the client sends for this long from its first bytes on,
    /// answers the count and the time it took (8 bytes each, big-endian),
    /// then reads until the client closes.
    Sink(Duration),
    /// Once the client has sent a byte, sends for this long, then closes its
    /// side and reads until the client closes.
    Source(Duration),
}

/// The server host's side of the case, on a two-thread runtime in its
/// namespace until dropped: the direct path's TLS servers and the proxies'
/// upstreams (see [`Port`]).
struct ServerSide {
    _running: ServerThread,
}

impl ServerSide {
    fn start(sv: &Netns, pki: &Pki, bulk: Duration) -> anyhow::Result<ServerSide> {
        let ecdsa = TlsAcceptor::from(server_config(&pki.ecdsa)?);
        let rsa = TlsAcceptor::from(server_config(&pki.rsa)?);
        // The source sends a little longer than the client counts.
        let source = Serve::Source(bulk + Duration::from_secs(1));
        let ports = vec![
            (Port::DIRECT_ECDSA, Some(ecdsa.clone()), Serve::Reply),
            (Port::DIRECT_RSA, Some(rsa), Serve::Reply),
            (Port::REPLY, None, Serve::Reply),
            (Port::SINK, None, Serve::Sink(bulk)),
            (Port::SOURCE, None, source),
            (Port::SINK_TLS, Some(ecdsa.clone()), Serve::Sink(bulk)),
            (Port::SOURCE_TLS, Some(ecdsa), source),
        ];
        let file = sv.file()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = match enter(&file).and_then(|()| Ok(runtime(SERVER_THREADS)?)) {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let mut listeners = Vec::new();
                for (port, tls, serve) in ports {
                    match super::load::listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
                        Ok(listener) => listeners.push((listener, tls, serve)),
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::Error::from(e)
                                .context(format!("TLS bench server: listening on {port}"))));
                            return;
                        }
                    }
                }
                for (listener, tls, serve) in listeners {
                    tokio::spawn(accept_loop(listener, tls, serve));
                }
                let _ = ready_tx.send(Ok(()));
                let _ = stopped.await;
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        });
        ready_rx
            .recv()
            .context("the TLS server thread ended before listening")??;
        Ok(ServerSide {
            _running: ServerThread::new(stop, thread),
        })
    }
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, serve: Serve) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    match tls {
                        None => serve.run(stream).await,
                        Some(acceptor) => {
                            let accepted =
                                tokio::time::timeout(EXCHANGE_TIMEOUT, acceptor.accept(stream))
                                    .await;
                            if let Ok(Ok(stream)) = accepted {
                                serve.run(stream).await;
                            }
                        }
                    }
                });
            }
            // Out of descriptors and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

impl Serve {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(self, mut stream: S) {
        match self {
            Serve::Reply => {
                let mut request = [0u8; REQUEST.len()];
                let read = tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read_exact(&mut request));
                if !matches!(read.await, Ok(Ok(_))) || request != REQUEST {
                    return;
                }
                if stream.write_all(REPLY).await.is_err() || stream.shutdown().await.is_err() {
                    return;
                }
            }
            Serve::Sink(duration) => {
                let mut buffer = vec![0u8; BULK_CHUNK];
                let Ok((received, elapsed)) = count_for(&mut stream, &mut buffer, duration).await
                else {
                    return;
                };
                let mut answer = [0u8; 16];
                answer[..8].copy_from_slice(&received.to_be_bytes());
                answer[8..].copy_from_slice(&(elapsed.as_micros() as u64).to_be_bytes());
                if stream.write_all(&answer).await.is_err() || stream.flush().await.is_err() {
                    return;
                }
            }
            Serve::Source(duration) => {
                let mut go = [0u8; 1];
                if !matches!(stream.read(&mut go).await, Ok(1)) {
                    return;
                }
                let chunk = vec![0x5a; BULK_CHUNK];
                let started = Instant::now();
                while started.elapsed() < duration {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                if stream.shutdown().await.is_err() {
                    return;
                }
            }
        }
        // Until the client has closed as well (bounded): closing with unread
        // bytes would reset the connection.
        let mut rest = vec![0u8; BULK_CHUNK];
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

// ---------------------------------------------------------------------------
// The client

/// How one exchange went.
struct Exchange {
    resumed: bool,
    /// The negotiated cipher suite and key exchange group.
    suite: Option<CipherSuite>,
    group: Option<rustls::NamedGroup>,
    /// The server's side ended with close_notify (else with a bare FIN,
    /// after the whole reply).
    clean: bool,
}

/// Connect, TLS handshake (the certificate verified), [`REQUEST`], the whole
/// [`REPLY`] until the server closes, close (close_notify, FIN).
async fn exchange(addr: SocketAddr, connector: &TlsConnector) -> Result<Exchange, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(NAME).expect("a valid name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let session = tls.get_ref().1;
    let resumed = session.handshake_kind() == Some(HandshakeKind::Resumed);
    let suite = session.negotiated_cipher_suite().map(|s| s.suite());
    let group = session.negotiated_key_exchange_group().map(|g| g.name());
    tls.write_all(REQUEST)
        .await
        .map_err(|e| format!("request: {e}"))?;
    tls.flush().await.map_err(|e| format!("request: {e}"))?;
    let mut reply = Vec::with_capacity(64);
    let mut buffer = [0u8; 256];
    let clean = loop {
        match tls.read(&mut buffer).await {
            Ok(0) => break true,
            Ok(n) => {
                reply.extend_from_slice(&buffer[..n]);
                if reply.len() > REPLY.len() {
                    return Err("reply longer than expected".to_owned());
                }
            }
            // A FIN without close_notify: fine if the reply is whole.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break false,
            Err(e) => return Err(format!("reply: {e}")),
        }
    };
    if reply != REPLY {
        return Err(format!(
            "reply: {} bytes, not the expected ones",
            reply.len()
        ));
    }
    let _ = tls.shutdown().await;
    Ok(Exchange {
        resumed,
        suite,
        group,
        clean,
    })
}

async fn exchange_in_time(addr: SocketAddr, connector: &TlsConnector) -> Result<Exchange, String> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(addr, connector))
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// The result of a handshake-rate run.
#[derive(Debug, Default)]
struct Rate {
    /// Completed exchanges per second (resumed ones only, when resuming).
    per_second: f64,
    completed: u64,
    /// Completed exchanges that resumed a session.
    resumed: u64,
    failed: u64,
    /// Completed exchanges whose server ended without close_notify.
    unclean: u64,
    first_error: Option<String>,
    /// CPU seconds the client's threads used while the clock ran.
    client_cpu: f64,
    /// What the proxy's [`CpuReader`] said as the clock started.
    proxy_cpu_at_start: Option<f64>,
}

/// The CPU seconds a proxy has used so far, if known.
type CpuReader = Box<dyn Fn() -> Option<f64> + Send>;

/// Exchanges from `concurrency` workers until `duration` has passed or `max`
/// were started. With `resume`, each worker has its own client with a
/// session cache and makes one full handshake before the clock starts.
async fn handshakes(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    resume: bool,
    concurrency: usize,
    duration: Duration,
    max: u64,
    proxy_cpu: CpuReader,
) -> anyhow::Result<Rate> {
    let per_worker = max.div_ceil(concurrency as u64);
    let shared = client_config(&roots, false)?;
    // The workers, then this task, once every worker is primed.
    let barrier = Arc::new(Barrier::new(concurrency + 1));
    let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Instant>);
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let config = if resume {
            client_config(&roots, true)?
        } else {
            shared.clone()
        };
        let connector = TlsConnector::from(config);
        let barrier = barrier.clone();
        let mut start_rx = start_rx.clone();
        workers.spawn(async move {
            let mut rate = Rate::default();
            if resume {
                // The first, full handshake gets the tickets.
                if let Err(e) = exchange_in_time(addr, &connector).await {
                    rate.failed += 1;
                    rate.first_error = Some(format!("priming: {e}"));
                }
            }
            barrier.wait().await;
            let deadline = match start_rx.wait_for(Option::is_some).await {
                Ok(started) => started.expect("set") + duration,
                Err(_) => return rate,
            };
            for _ in 0..per_worker {
                if Instant::now() >= deadline {
                    break;
                }
                match exchange_in_time(addr, &connector).await {
                    Ok(exchange) => {
                        rate.completed += 1;
                        rate.resumed += u64::from(exchange.resumed);
                        rate.unclean += u64::from(!exchange.clean);
                    }
                    Err(e) => {
                        rate.failed += 1;
                        rate.first_error.get_or_insert(e);
                    }
                }
            }
            rate
        });
    }
    barrier.wait().await;
    let proxy_cpu_at_start = proxy_cpu();
    let started = Instant::now();
    let client_cpu = threads_cpu(CLIENT_THREADS);
    start_tx.send_replace(Some(started));
    let mut total = Rate::default();
    while let Some(done) = workers.join_next().await {
        let rate = done.expect("a load worker panicked");
        total.completed += rate.completed;
        total.resumed += rate.resumed;
        total.failed += rate.failed;
        total.unclean += rate.unclean;
        total.first_error = total.first_error.or(rate.first_error);
    }
    let counted = if resume {
        total.resumed
    } else {
        total.completed
    };
    total.per_second = counted as f64 / started.elapsed().as_secs_f64();
    total.client_cpu = threads_cpu(CLIENT_THREADS) - client_cpu;
    total.proxy_cpu_at_start = proxy_cpu_at_start;
    Ok(total)
}

/// One exchange through `addr` works; tries for up to a minute. Returns
/// what it negotiated, e.g. "TLS13_AES_128_GCM_SHA256, X25519".
async fn probe(addr: SocketAddr, roots: Arc<RootCertStore>) -> anyhow::Result<String> {
    let connector = TlsConnector::from(client_config(&roots, false)?);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match exchange_in_time(addr, &connector).await {
            Ok(exchange) => {
                return Ok(format!(
                    "{}, {}",
                    exchange.suite.map_or("?".to_owned(), |s| format!("{s:?}")),
                    exchange.group.map_or("?".to_owned(), |g| format!("{g:?}"))
                ));
            }
            Err(e) if Instant::now() >= deadline => bail!("{addr} did not answer: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A bulk listener answers: the handshake, and for a source its first
/// bytes (through a TLS upstream, after the proxy's own handshake there).
async fn probe_bulk(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    reverse: bool,
) -> anyhow::Result<()> {
    let connector = TlsConnector::from(client_config(&roots, false)?);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tried = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from(NAME).expect("a valid name");
            let mut tls = connector.connect(name, tcp).await?;
            if reverse {
                tls.write_all(b"g").await?;
                tls.flush().await?;
                let mut first = [0u8; 1024];
                if tls.read(&mut first).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            io::Result::Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
        match tried {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => bail!("{addr} did not answer: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Received bits per second of one TLS stream through `addr`, counted by
/// the receiver for `duration` (the sink, or this client with `reverse`).
async fn bulk(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    reverse: bool,
    duration: Duration,
) -> anyhow::Result<f64> {
    let connector = TlsConnector::from(client_config(&roots, false)?);
    let run = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(NAME).expect("a valid name");
        let mut tls = connector.connect(name, tcp).await?;
        let mut buffer = vec![0u8; BULK_CHUNK];
        let counted = if reverse {
            tls.write_all(b"g").await?;
            tls.flush().await?;
            let counted = count_for(&mut tls, &mut buffer, duration).await?;
            // The rest, until the source closes.
            while tls.read(&mut buffer).await? > 0 {}
            counted
        } else {
            let (mut from, mut to) = tokio::io::split(tls);
            let chunk = vec![0x5a; BULK_CHUNK];
            let mut answer = [0u8; 16];
            {
                let sending = async {
                    loop {
                        to.write_all(&chunk).await?;
                    }
                };
                tokio::select! {
                    sent = sending => sent,
                    read = from.read_exact(&mut answer) => read.map(drop),
                }?;
            }
            tls = from.unsplit(to);
            let field =
                |i: usize| u64::from_be_bytes(answer[i..i + 8].try_into().expect("8 bytes"));
            (field(0), Duration::from_micros(field(8)))
        };
        let _ = tls.shutdown().await;
        io::Result::Ok(counted)
    };
    let (bytes, elapsed) = tokio::time::timeout(duration + Duration::from_secs(10), run)
        .await
        .with_context(|| format!("TLS stream through {addr}: timed out"))?
        .with_context(|| format!("TLS stream through {addr}"))?;
    Ok(bytes as f64 * 8.0 / elapsed.as_secs_f64())
}

// ---------------------------------------------------------------------------
// The peers' configurations

fn l4proxy_policy(pki: &Pki) -> Value {
    let ip = Path4::L4proxy.ip();
    let intercept: Vec<Value> = Listener::ALL
        .iter()
        .map(|&l| {
            let leaf = pki.leaf(l.key_type());
            json!({
                "name": l.name(),
                "prefixes": [format!("{ip}/32")],
                "ports": [l.proxy_port()],
                "upstream": l.name(),
                "terminate": { "certificates": [
                    { "chain": leaf.cert, "key": leaf.key }
                ] },
            })
        })
        .collect();
    let upstreams: serde_json::Map<String, Value> = Listener::ALL
        .iter()
        .map(|&l| {
            let mut upstream = json!({ "servers": [l.upstream().to_string()] });
            if l.upstream_tls() {
                upstream["tls"] = json!({ "ca": pki.ca, "server_name": UPSTREAM_NAME });
            }
            (l.name().to_owned(), upstream)
        })
        .collect();
    json!({ "intercept": intercept, "upstreams": upstreams })
}

/// HAProxy in TCP mode (the `global` and `defaults` of the other cases):
/// one `bind … ssl crt` frontend per listener, to a plain server, or `ssl
/// verify required` to the TLS one. One `bind` line, not one per thread
/// as in the other cases: each line has a TLS context of its own, and
/// with a line per thread HAProxy resumed only about half of the
/// sessions (two thirds with one `tls-ticket-keys` file for all lines),
/// where with one it resumes all.
fn haproxy_config(pki: &Pki, maxconn: u64) -> String {
    let mut config = targets::haproxy_common(maxconn, "");
    for l in Listener::ALL {
        let name = l.name();
        let _ = write!(
            config,
            "frontend {name}\n    bind {HAPROXY_IP}:{} ssl crt {}\n    default_backend {name}\n\
             backend {name}\n    server s {}",
            l.proxy_port(),
            pki.leaf(l.key_type()).combined.display(),
            l.upstream()
        );
        if l.upstream_tls() {
            let _ = write!(
                config,
                " ssl verify required ca-file {} sni str({UPSTREAM_NAME}) verifyhost {UPSTREAM_NAME}",
                pki.ca.display()
            );
        }
        config.push('\n');
    }
    config
}

/// nginx's stream module (see `nginx` for what every case shares): one
/// `listen … ssl` server per listener, `proxy_pass` to the plain server, or
/// `proxy_ssl on` with verification to the TLS one, and TLS 1.3 on both
/// sides (nginx 1.22's default `ssl_protocols` stop at TLS 1.2).
fn nginx_servers(pki: &Pki) -> String {
    let mut config = "    ssl_protocols TLSv1.2 TLSv1.3;\n    \
                      proxy_ssl_protocols TLSv1.2 TLSv1.3;\n"
        .to_owned();
    for l in Listener::ALL {
        let leaf = pki.leaf(l.key_type());
        let _ = write!(
            config,
            "    server {{\n        listen {NGINX_IP}:{} ssl {};\n        \
             ssl_certificate {};\n        ssl_certificate_key {};\n        proxy_pass {};\n",
            l.proxy_port(),
            nginx::LISTEN,
            leaf.cert.display(),
            leaf.key.display(),
            l.upstream()
        );
        if l.upstream_tls() {
            let _ = write!(
                config,
                "        proxy_ssl on;\n        proxy_ssl_verify on;\n        \
                 proxy_ssl_trusted_certificate {};\n        proxy_ssl_name {UPSTREAM_NAME};\n        \
                 proxy_ssl_server_name on;\n",
                pki.ca.display()
            );
        }
        config += "    }\n";
    }
    config
}

/// HAProxy and nginx with this case's configurations.
struct Peers {
    haproxy: Proc,
    nginx: Proc,
}

impl Peers {
    fn start(bench: &Bench, pki: &Pki, dir: &Path) -> anyhow::Result<Peers> {
        let px = &bench.lab.px;
        for ip in [HAPROXY_IP, NGINX_IP] {
            px.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        }
        let config = dir.join("haproxy-tls.cfg");
        std::fs::write(&config, haproxy_config(pki, bench.maxconn))?;
        let haproxy = targets::start_haproxy(
            px,
            "haproxy-tls",
            &config,
            &bench.work.join("haproxy-tls.log"),
        )?;

        let nginx = nginx::start(
            px,
            &dir.join("nginx"),
            &nginx_servers(pki),
            bench.nginx_connections,
            bench.fd_limit,
            &bench.work.join("nginx-tls.log"),
        )?;
        Ok(Peers { haproxy, nginx })
    }
}

// ---------------------------------------------------------------------------
// The case

/// What a handshake row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HsCase {
    key: KeyType,
    resumed: bool,
    concurrency: usize,
}

/// What a bulk row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BulkCase {
    upstream_tls: bool,
    reverse: bool,
}

impl BulkCase {
    fn listener(self) -> Listener {
        Listener::bulk(self.upstream_tls, self.reverse)
    }

    fn upstream_label(self) -> &'static str {
        if self.upstream_tls {
            "re-encrypted to a TLS server"
        } else {
            "to a plain server"
        }
    }

    fn way_label(self) -> &'static str {
        if self.reverse {
            "server→client"
        } else {
            "client→server"
        }
    }
}

/// One measurement: the figure, and the CPU seconds per handshake of the
/// path's proxy (or the direct path's server) and of the client.
struct Sample<K> {
    case: K,
    path: Path4,
    value: f64,
    cpu: Option<f64>,
    client_cpu: Option<f64>,
}

/// The median and range of each (case, path), in the order first measured.
struct Figure<K> {
    case: K,
    path: Path4,
    value: Spread,
    cpu: Option<Spread>,
    client_cpu: Option<Spread>,
}

fn figures<K: PartialEq + Copy>(samples: &[Sample<K>]) -> Vec<Figure<K>> {
    let mut figures: Vec<Figure<K>> = Vec::new();
    for s in samples {
        if figures.iter().any(|f| f.case == s.case && f.path == s.path) {
            continue;
        }
        let same: Vec<&Sample<K>> = samples
            .iter()
            .filter(|o| o.case == s.case && o.path == s.path)
            .collect();
        let values: Vec<f64> = same.iter().map(|o| o.value).collect();
        let cpus: Vec<f64> = same.iter().filter_map(|o| o.cpu).collect();
        let client_cpus: Vec<f64> = same.iter().filter_map(|o| o.client_cpu).collect();
        if let Some(value) = Spread::of(&values) {
            figures.push(Figure {
                case: s.case,
                path: s.path,
                value,
                cpu: Spread::of(&cpus),
                client_cpu: Spread::of(&client_cpus),
            });
        }
    }
    figures
}

fn find<K: PartialEq + Copy>(figures: &[Figure<K>], case: K, path: Path4) -> Option<f64> {
    figures
        .iter()
        .find(|f| f.case == case && f.path == path)
        .map(|f| f.value.median)
}

/// `a ÷ b` as "0.93×", or "–".
fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".to_owned(),
    }
}

/// "1.02× (0.95–1.10×)": the ratio of the medians, and the range from the
/// worst to the best pairing of the runs' extremes.
fn ratio_range(a: Spread, b: Option<Spread>) -> String {
    match b {
        Some(b) if b.min > 0.0 && b.median > 0.0 => format!(
            "{:.2}× ({:.2}–{:.2}×)",
            a.median / b.median,
            a.min / b.max,
            a.max / b.min
        ),
        _ => "–".to_owned(),
    }
}

/// The case's results.
#[derive(Default)]
struct Results {
    /// What each path's handshake negotiated (from the probes).
    negotiated: Vec<String>,
    handshakes: Vec<Sample<HsCase>>,
    bulk: Vec<Sample<BulkCase>>,
    notes: Vec<String>,
}

impl Bench<'_> {
    /// The TLS case. Replaces the running l4proxy by one with this case's
    /// policy (one l4proxy per namespace; the rules case, after this one,
    /// starts its own too).
    pub(super) fn tls(&mut self, report: &mut Report) -> anyhow::Result<()> {
        eprintln!("bench: TLS, making certificates, starting the TLS servers, HAProxy and nginx");
        let load_before = load_average();
        let dir = self.work.join("tls");
        let pki = Pki::make(&dir)?;
        let roots = roots(&pki)?;
        let seconds = Duration::from_secs(self.plan.iperf_seconds);
        let _servers = ServerSide::start(&self.lab.sv, &pki, seconds)?;

        self.l4proxy = None;
        let policy = dir.join("l4proxy-tls.json");
        targets::check_policy(self.binary, &policy, &l4proxy_policy(&pki))
            .context("l4proxy refused the TLS case's policy")?;
        let l4proxy_log = self.work.join("l4proxy-tls.log");
        self.l4proxy = Some(targets::start_l4proxy(
            &self.lab.px,
            self.binary,
            &policy,
            self.maxconn,
            &l4proxy_log,
        )?);
        let mut peers = Peers::start(self, &pki, &dir)?;
        let mut results = Results::default();

        for path in Path4::ALL {
            for listener in Listener::ALL {
                let (addr, roots) = (path.addr(listener), roots.clone());
                let probed = on_client(&self.lab.cl, move || async move {
                    match listener {
                        Listener::HsEcdsa | Listener::HsRsa => probe(addr, roots).await.map(Some),
                        Listener::Sink | Listener::SinkTls => {
                            probe_bulk(addr, roots, false).await.map(|()| None)
                        }
                        Listener::Source | Listener::SourceTls => {
                            probe_bulk(addr, roots, true).await.map(|()| None)
                        }
                    }
                })?;
                self.check_tls_path(path, &mut peers)?;
                let negotiated =
                    probed.with_context(|| format!("{} ({})", path.label(), listener.name()))?;
                if let Some(negotiated) = negotiated {
                    results.negotiated.push(format!(
                        "{}, {}: {negotiated}",
                        path.label(),
                        listener.key_type().label()
                    ));
                }
            }
        }
        // The probes of sources end their streams abruptly: not counted.
        let warnings_before = log_warnings(&l4proxy_log).len();

        for rep in 1..=self.plan.repetitions {
            for key in [KeyType::Ecdsa, KeyType::Rsa] {
                for concurrency in self.plan.concurrencies {
                    let case = HsCase {
                        key,
                        resumed: false,
                        concurrency,
                    };
                    self.tls_rates(rep, case, &roots, &mut peers, &mut results)?;
                }
            }
            for concurrency in self.plan.concurrencies {
                let case = HsCase {
                    key: KeyType::Ecdsa,
                    resumed: true,
                    concurrency,
                };
                self.tls_rates(rep, case, &roots, &mut peers, &mut results)?;
            }
            for upstream_tls in [false, true] {
                for reverse in [false, true] {
                    let case = BulkCase {
                        upstream_tls,
                        reverse,
                    };
                    for path in Path4::ALL {
                        eprintln!(
                            "bench: TLS throughput {rep}/{}, {}, {}, {}",
                            self.plan.repetitions,
                            case.upstream_label(),
                            case.way_label(),
                            path.label()
                        );
                        let (addr, roots) = (path.addr(case.listener()), roots.clone());
                        let bits = on_client(&self.lab.cl, move || {
                            bulk(addr, roots, case.reverse, seconds)
                        })?;
                        match bits {
                            Ok(value) => results.bulk.push(Sample {
                                case,
                                path,
                                value,
                                cpu: None,
                                client_cpu: None,
                            }),
                            Err(e) => results.notes.push(format!(
                                "TLS throughput, {}, {}, {}: {e:#}; this run is left out.",
                                case.upstream_label(),
                                case.way_label(),
                                path.label()
                            )),
                        }
                        self.check_tls_path(path, &mut peers)?;
                    }
                }
            }
        }

        let all = log_warnings(&l4proxy_log);
        let warnings = all.get(warnings_before..).unwrap_or_default();
        if !warnings.is_empty() {
            results.notes.push(format!(
                "l4proxy logged {} warning or error lines during the TLS case (RUST_LOG=warn), \
                 first: `{}`",
                warnings.len(),
                warnings[0]
            ));
        }
        results.notes.push(format!(
            "Load average (1, 5, 15 min) at the start of the TLS case: {load_before}; at its end: \
             {} (2 cores: above 2, other work competed for them).",
            load_average()
        ));
        report
            .sections
            .push(markdown(&results, self.plan, &self.lab_description()));
        Ok(())
    }

    fn lab_description(&self) -> String {
        format!(
            "client {} → proxy host (l4proxy {}, HAProxy {HAPROXY_IP}, nginx {NGINX_IP}) → \
             server {}",
            lab::CL,
            Path4::L4proxy.ip(),
            lab::SV
        )
    }

    /// Fails with the proxy's log if the path's proxy has exited.
    fn check_tls_path(&mut self, path: Path4, peers: &mut Peers) -> anyhow::Result<()> {
        match path {
            Path4::Direct => Ok(()),
            Path4::L4proxy => self.l4proxy.as_mut().context("l4proxy")?.check_running(),
            Path4::Haproxy => peers.haproxy.check_running(),
            Path4::Nginx => peers.nginx.check_running(),
        }
    }

    /// Reads the CPU seconds `path`'s proxy (the direct path: the server's
    /// threads) has used, from any thread.
    fn cpu_reader(&self, path: Path4, peers: &Peers) -> CpuReader {
        let pid = match path {
            Path4::Direct => return Box::new(|| Some(threads_cpu(SERVER_THREADS))),
            Path4::L4proxy => self.l4proxy.as_ref().map(|p| p.pid()),
            Path4::Haproxy => Some(peers.haproxy.pid()),
            Path4::Nginx => Some(peers.nginx.pid()),
        };
        Box::new(move || pid.map(tree_cpu))
    }

    /// One handshake-rate run per path for `case`.
    fn tls_rates(
        &mut self,
        rep: usize,
        case: HsCase,
        roots: &Arc<RootCertStore>,
        peers: &mut Peers,
        results: &mut Results,
    ) -> anyhow::Result<()> {
        for path in Path4::ALL {
            eprintln!(
                "bench: TLS {} handshakes {rep}/{}, {}, concurrency {}, {}",
                if case.resumed { "resumed" } else { "full" },
                self.plan.repetitions,
                case.key.label(),
                case.concurrency,
                path.label()
            );
            let addr = path.addr(Listener::handshake(case.key));
            let (roots, duration, max) =
                (roots.clone(), self.plan.rate_duration, self.plan.rate_max);
            // Read when the clock starts: the resumed case's priming full
            // handshakes are not the resumed ones' cost.
            let cpu = self.cpu_reader(path, peers);
            let rate = on_client(&self.lab.cl, move || {
                handshakes(
                    addr,
                    roots,
                    case.resumed,
                    case.concurrency,
                    duration,
                    max,
                    cpu,
                )
            })??;
            let (cpu_before, cpu_after) = (rate.proxy_cpu_at_start, self.cpu_reader(path, peers)());
            self.check_tls_path(path, peers)?;
            let what = format!(
                "TLS {} handshakes, {}, concurrency {}, {}",
                if case.resumed { "resumed" } else { "full" },
                case.key.label(),
                case.concurrency,
                path.label()
            );
            if rate.failed > 0 {
                results.notes.push(format!(
                    "{what}: {} exchanges failed (first error: {}); only completed ones are \
                     counted.",
                    rate.failed,
                    rate.first_error.as_deref().unwrap_or("?")
                ));
            }
            if rate.unclean > 0 {
                results.notes.push(format!(
                    "{what}: {} of {} replies ended with a FIN without close_notify (counted: \
                     the reply was whole).",
                    rate.unclean, rate.completed
                ));
            }
            if case.resumed && rate.resumed < rate.completed {
                results.notes.push(format!(
                    "{what}: {} of {} handshakes resumed; only resumed ones are counted.",
                    rate.resumed, rate.completed
                ));
            }
            if !case.resumed && rate.resumed > 0 {
                results.notes.push(format!(
                    "{what}: {} handshakes resumed although the client keeps no session.",
                    rate.resumed
                ));
            }
            let counted = if case.resumed {
                rate.resumed
            } else {
                rate.completed
            };
            let per_handshake = |seconds: f64| (counted > 0).then(|| seconds / counted as f64);
            let cpu = match (cpu_before, cpu_after) {
                (Some(before), Some(after)) => per_handshake(after - before),
                _ => None,
            };
            results.handshakes.push(Sample {
                case,
                path,
                value: rate.per_second,
                cpu,
                client_cpu: per_handshake(rate.client_cpu),
            });
            // Let TIME_WAIT and closing sockets of this run settle.
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    }
}

fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    fields.join(", ")
}

/// WARN and ERROR lines of a log.
fn log_warnings(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(|l| l.chars().take(400).collect())
        .collect()
}

/// The case's section of the report.
fn markdown(results: &Results, plan: &super::Plan, lab: &str) -> String {
    let hs = figures(&results.handshakes);
    let bulk = figures(&results.bulk);
    let mut md = String::from("\n## TLS termination: l4proxy, HAProxy and nginx\n\n");
    let _ = write!(
        md,
        "Each path terminates the client's TLS 1.3 and relays in TCP mode: l4proxy (a \
         `terminate` rule, rustls with ring), HAProxy (`bind … ssl crt`, OpenSSL 3.0, one \
         listener for its threads: with one per thread it resumed only part of the sessions) \
         and nginx \
         (stream module, `listen … ssl`, two worker processes), in front of the same plain \
         servers ({lab}). The direct path is a TLS server without a proxy: the bench's own \
         rustls server (ring, configured as l4proxy's: its cipher order, tickets and a session \
         cache) on the server host, answering itself, on two threads as l4proxy runs. The \
         client is rustls (ring) on two threads; it offers TLS 1.3 with TLS_AES_128_GCM_SHA256 \
         and X25519 only, so that every path negotiates the same (l4proxy prefers that suite; \
         HAProxy and nginx would otherwise take OpenSSL's first, TLS_AES_256_GCM_SHA384), and \
         verifies every certificate against the bench CA (P-256; the leaves are P-256 or RSA \
         2048, names in subjectAltName). An exchange is: connect, handshake, a {req}-byte \
         request, a {rep}-byte reply, the server side closes (close_notify, FIN), the client \
         closes. Resumed: each client worker keeps its own session cache, makes one full \
         handshake before the clock starts, then resumes with the server's tickets (only \
         resumed handshakes count). Runs of {secs} s (at most {max} exchanges). \"CPU µs/hs\" \
         is the CPU time (user + system, /proc) of the proxy's processes (or of the direct \
         server's threads) during the run divided by the handshakes counted: less disturbed \
         than the rate by the client sharing the 2 cores (the client spends about as much CPU \
         per handshake as a proxy, so rates are squeezed towards each other).\n\n",
        req = REQUEST.len(),
        rep = REPLY.len(),
        secs = plan.rate_duration.as_secs(),
        max = plan.rate_max,
    );

    // The summary: l4proxy's ratios, one line per case.
    md += "| | l4proxy | ÷ HAProxy | ÷ nginx | ÷ direct | l4proxy CPU µs/hs | CPU ÷ HAProxy's | \
           CPU ÷ nginx's |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for f in hs.iter().filter(|f| f.path == Path4::L4proxy) {
        let of = |p: Path4| hs.iter().find(|o| o.case == f.case && o.path == p);
        let cpu_vs = |p: Path4| match f.cpu {
            Some(mine) => ratio_range(mine, of(p).and_then(|o| o.cpu)),
            None => "–".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} handshakes/s, {}, concurrency {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            if f.case.resumed { "resumed" } else { "full" },
            f.case.key.label(),
            f.case.concurrency,
            f.value.median,
            ratio_range(f.value, of(Path4::Haproxy).map(|o| o.value)),
            ratio_range(f.value, of(Path4::Nginx).map(|o| o.value)),
            ratio(f.value.median, of(Path4::Direct).map(|o| o.value.median)),
            f.cpu
                .map_or("–".to_owned(), |c| format!("{:.0}", c.median * 1e6)),
            cpu_vs(Path4::Haproxy),
            cpu_vs(Path4::Nginx),
        );
    }
    for f in bulk.iter().filter(|f| f.path == Path4::L4proxy) {
        let of = |p: Path4| bulk.iter().find(|o| o.case == f.case && o.path == p);
        let _ = writeln!(
            md,
            "| one stream {}, {}, Gbit/s | {:.2} | {} | {} | {} | | | |",
            f.case.upstream_label(),
            f.case.way_label(),
            f.value.median * 1e-9,
            ratio_range(f.value, of(Path4::Haproxy).map(|o| o.value)),
            ratio_range(f.value, of(Path4::Nginx).map(|o| o.value)),
            ratio(f.value.median, of(Path4::Direct).map(|o| o.value.median)),
        );
    }
    md += "\nRatios: of the medians, and in parentheses from l4proxy's worst run against the \
           other's best to its best against the other's worst. CPU: lower is better.\n";

    for resumed in [false, true] {
        let _ = write!(
            md,
            "\n### {} TLS 1.3 handshakes (handshakes/s, higher is better)\n\n\
             | certificate | concurrency | path | hs/s | min–max | ÷ HAProxy | ÷ nginx | ÷ direct | \
             CPU µs/hs (min–max) | client CPU µs/hs |\n\
             |---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
            if resumed { "Resumed" } else { "Full" }
        );
        for f in hs.iter().filter(|f| f.case.resumed == resumed) {
            let cpu = f.cpu.map_or("–".to_owned(), |c| {
                format!(
                    "{:.0} ({:.0}–{:.0})",
                    c.median * 1e6,
                    c.min * 1e6,
                    c.max * 1e6
                )
            });
            let client_cpu = f
                .client_cpu
                .map_or("–".to_owned(), |c| format!("{:.0}", c.median * 1e6));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {cpu} | {client_cpu} |",
                f.case.key.label(),
                f.case.concurrency,
                f.path.label(),
                f.value.median,
                f.value.min,
                f.value.max,
                ratio(f.value.median, find(&hs, f.case, Path4::Haproxy)),
                ratio(f.value.median, find(&hs, f.case, Path4::Nginx)),
                ratio(f.value.median, find(&hs, f.case, Path4::Direct)),
            );
        }
    }

    let _ = write!(
        md,
        "\n### One stream through a terminated connection (Gbit/s, higher is better)\n\n\
         The client's TLS stream is terminated by the proxy and relayed to a plain sink or \
         source on the server host, or re-encrypted to a TLS one (the bench's rustls server; \
         l4proxy: upstream `tls` with the bench CA and `server_name`; HAProxy: `ssl verify \
         required ca-file … sni … verifyhost …`; nginx: `proxy_ssl on`, `proxy_ssl_verify on`). \
         The receiver counts for {} s from its first bytes, 128 KiB writes. The direct path is \
         the client's TLS straight to the TLS sink or source (in both rows).\n\n\
         | upstream | direction | path | Gbit/s | min–max | ÷ HAProxy | ÷ nginx | ÷ direct |\n\
         |---|---|---|---:|---:|---:|---:|---:|\n",
        plan.iperf_seconds
    );
    for f in &bulk {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} | {:.2}–{:.2} | {} | {} | {} |",
            f.case.upstream_label(),
            f.case.way_label(),
            f.path.label(),
            f.value.median * 1e-9,
            f.value.min * 1e-9,
            f.value.max * 1e-9,
            ratio(f.value.median, find(&bulk, f.case, Path4::Haproxy)),
            ratio(f.value.median, find(&bulk, f.case, Path4::Nginx)),
            ratio(f.value.median, find(&bulk, f.case, Path4::Direct)),
        );
    }
    let _ = write!(
        md,
        "\nNegotiated (client handshakes): {}.\n",
        results.negotiated.join("; ")
    );
    let ulp = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    let _ = write!(
        md,
        "\nKernel TLS: not measured; this kernel's `tcp_available_ulp` lists `{}` (no `tls`).\n",
        ulp.trim()
    );
    if !results.notes.is_empty() {
        md += "\nTLS case notes:\n\n";
        for note in &results.notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_have_distinct_ports_and_names() {
        let ports: Vec<u16> = Listener::ALL.iter().map(|l| l.proxy_port()).collect();
        assert_eq!(ports, [8443, 8444, 8445, 8446, 8447, 8448]);
        let mut names: Vec<&str> = Listener::ALL.iter().map(|l| l.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 6);
    }

    #[test]
    fn a_ratio_range_pairs_the_extremes() {
        let a = Spread {
            median: 10.0,
            min: 9.0,
            max: 12.0,
        };
        let b = Spread {
            median: 5.0,
            min: 4.0,
            max: 6.0,
        };
        assert_eq!(ratio_range(a, Some(b)), "2.00× (1.50–3.00×)");
        assert_eq!(ratio_range(a, None), "–");
    }
}
