//! TLS peers written with rustls, for the termination and origination tests
//! that need what no command-line client or nginx reports: bulk transfers
//! compared byte for byte (by hash), half-close in a chosen order, and a
//! PROXY v2 header read in clear before the TLS handshake.
//!
//! The peers run tokio (a current-thread runtime per client run, one per
//! server) over sockets made inside a lab namespace: a socket stays in the
//! namespace it was created in. Every run is bounded by a deadline; a
//! server stops on drop.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::pki;
use super::{Netns, Received, try_connect};

/// How long one client run or one server connection may take, all of it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn certificates(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// A TLS server presenting `cert`'s chain, offering `alpn`.
pub fn server_config(cert: &pki::Cert, alpn: &[&str]) -> Arc<ServerConfig> {
    let key = PrivateKeyDer::from_pem_file(&cert.key)
        .unwrap_or_else(|e| panic!("read {}: {e}", cert.key.display()));
    // The crypto provider is the one rustls is built with (the daemon's).
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certificates(&cert.chain), key)
        .unwrap_or_else(|e| panic!("server config for {}: {e}", cert.name));
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A TLS client trusting only the CA certificates in `ca`, offering `alpn`.
pub fn client_config(ca: &Path, alpn: &[&str]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca) {
        roots
            .add(cert)
            .unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
    }
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// Who half-closes first in a bulk exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Send everything and half-close, then read to the end.
    SendFirst,
    /// Read to the end, then send everything and half-close.
    ReceiveFirst,
    /// Both at once.
    Both,
}

/// Plays `order` on `stream` with `data`; returns what was read. A TLS
/// stream half-closes with close_notify then FIN, and a peer's FIN without
/// close_notify is an error (tokio-rustls: `UnexpectedEof`).
pub async fn play<S>(stream: S, data: &[u8], order: Order) -> io::Result<Received>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let send = async {
        w.write_all(data)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("sending: {e}")))?;
        w.shutdown()
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("half-closing: {e}")))
    };
    match order {
        Order::SendFirst => {
            send.await?;
            read_to_end(&mut r).await
        }
        Order::ReceiveFirst => {
            let got = read_to_end(&mut r).await?;
            send.await?;
            Ok(got)
        }
        Order::Both => {
            let (sent, got) = tokio::join!(send, read_to_end(&mut r));
            sent?;
            got
        }
    }
}

/// Reads to EOF, hashing; the error says how much came before it.
pub async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Received> {
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("after {len} bytes read: {e}"),
                ));
            }
        }
    }
    Ok(Received {
        len,
        sha256: hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// What a TLS client run saw.
#[derive(Debug)]
pub struct ClientRun {
    /// The client's own address, as the daemon logs it.
    pub local: SocketAddr,
    pub received: Received,
    /// `TLSv1_3`, ...
    pub version: String,
    pub alpn: Option<String>,
    /// The subject (CN) of the certificate the server presented.
    pub peer_cn: Option<String>,
}

/// Connects from `ns` to `addr`, does TLS as `config` says for `name`, and
/// plays `order` with `data`, all within [`RUN_TIMEOUT`]. The error names
/// the step that failed (and the local address once known).
pub fn tls_client(
    ns: &Netns,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
    data: &[u8],
    order: Order,
) -> Result<ClientRun, String> {
    let tcp = try_connect(ns, addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let local = tcp.local_addr().unwrap();
    let name = ServerName::try_from(name.to_owned()).expect("a valid server name");
    let rt = runtime();
    rt.block_on(async move {
        tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let run = async {
            let tls = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("{local}: TLS handshake: {e}"))?;
            let (_, session) = tls.get_ref();
            let version = format!("{:?}", session.protocol_version().unwrap());
            let alpn = session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            let peer_cn = session
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| common_name(c));
            let received = play(tls, data, order)
                .await
                .map_err(|e| format!("{local}: {e}"))?;
            Ok(ClientRun {
                local,
                received,
                version,
                alpn,
                peer_cn,
            })
        };
        tokio::time::timeout(RUN_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err(format!("{local}: not done within {RUN_TIMEOUT:?}")))
    })
}

/// The CN of a certificate's subject.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// A PROXY protocol v2 header as a server read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyV2 {
    /// `PROXY` (1) or `LOCAL` (0).
    pub command: u8,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// (type, value) in the order sent.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl ProxyV2 {
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Reads a PROXY v2 header off `r`, exactly its bytes.
async fn read_proxy_v2<R: AsyncRead + Unpin>(r: &mut R) -> Result<ProxyV2, String> {
    let mut fixed = [0u8; 16];
    r.read_exact(&mut fixed)
        .await
        .map_err(|e| format!("reading a PROXY v2 header: {e}"))?;
    if &fixed[..12] != V2_SIGNATURE {
        return Err(format!("no PROXY v2 signature: {fixed:02x?}"));
    }
    if fixed[12] >> 4 != 2 {
        return Err(format!("PROXY header version {}", fixed[12] >> 4));
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut rest = vec![0u8; len];
    r.read_exact(&mut rest)
        .await
        .map_err(|e| format!("reading the PROXY v2 addresses: {e}"))?;
    let mut header = ProxyV2 {
        command: fixed[12] & 0x0f,
        ..ProxyV2::default()
    };
    // TCP4: two 4-byte addresses, TCP6: two 16-byte ones, then both ports.
    let (width, family) = match fixed[13] {
        0x11 => (4, "TCP4"),
        0x21 => (16, "TCP6"),
        _ => (0, ""),
    };
    let addr_len = if width == 0 {
        0
    } else {
        let need = 2 * width + 4;
        if rest.len() < need {
            return Err(format!("short {family} addresses: {rest:02x?}"));
        }
        let ip = |b: &[u8]| match <[u8; 4]>::try_from(b) {
            Ok(v4) => IpAddr::from(v4),
            Err(_) => IpAddr::from(<[u8; 16]>::try_from(b).unwrap()),
        };
        let port = |at: usize| u16::from_be_bytes([rest[at], rest[at + 1]]);
        header.source = Some(SocketAddr::new(ip(&rest[..width]), port(2 * width)));
        header.destination = Some(SocketAddr::new(
            ip(&rest[width..2 * width]),
            port(2 * width + 2),
        ));
        need
    };
    let mut tlvs = &rest[addr_len.min(rest.len())..];
    while tlvs.len() >= 3 {
        let kind = tlvs[0];
        let n = u16::from_be_bytes([tlvs[1], tlvs[2]]) as usize;
        if tlvs.len() < 3 + n {
            return Err(format!("truncated TLV {kind:#x}"));
        }
        header.tlvs.push((kind, tlvs[3..3 + n].to_vec()));
        tlvs = &tlvs[3 + n..];
    }
    Ok(header)
}

/// What a [`TlsServer`] connection does once its handshake is done.
#[derive(Clone)]
pub enum Serve {
    /// Plays `order` with `data` (see [`play`]).
    Bulk { data: Arc<Vec<u8>>, order: Order },
    /// Sends `data`, then half-closes the TCP connection without
    /// close_notify (a truncation, as far as TLS can tell), and reads in
    /// clear until the peer closes.
    Truncate { data: Arc<Vec<u8>> },
}

/// What one connection of a [`TlsServer`] saw.
#[derive(Debug)]
pub struct ServerReport {
    pub peer: SocketAddr,
    /// The PROXY header read before the handshake, when the server takes one.
    pub proxy: Option<ProxyV2>,
    /// The server name and ALPN protocol of the handshake.
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// What it read, or where it failed.
    pub received: Result<Received, String>,
}

/// A rustls TLS server in a namespace, one task per connection. Each
/// connection reports once on the server's channel.
pub struct TlsServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    reports: Mutex<Receiver<ServerReport>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TlsServer {
    /// Listens on `addr` in `ns`; a connection starts with a PROXY v2
    /// header in clear when `proxy_header`, then the TLS handshake with
    /// `config`, then `serve`.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        config: Arc<ServerConfig>,
        proxy_header: bool,
        serve: Serve,
    ) -> TlsServer {
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in netns {}: {e}", ns.name()));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                runtime().block_on(accept_loop(
                    listener,
                    TlsAcceptor::from(config),
                    proxy_header,
                    serve,
                    accepted,
                    tx,
                    stopped,
                ))
            })
        };
        TlsServer {
            addr,
            accepted,
            reports: Mutex::new(rx),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The next connection's report; panics if none comes within
    /// [`RUN_TIMEOUT`] and a little.
    pub fn report(&self) -> ServerReport {
        self.reports
            .lock()
            .unwrap()
            .recv_timeout(RUN_TIMEOUT + Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("no report from the TLS server on {}: {e}", self.addr))
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    proxy_header: bool,
    serve: Serve,
    accepted: Arc<AtomicUsize>,
    tx: Sender<ServerReport>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let acceptor = acceptor.clone();
        let serve = serve.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let report = tokio::time::timeout(
                RUN_TIMEOUT,
                serve_one(tcp, peer, acceptor, proxy_header, serve),
            )
            .await
            .unwrap_or_else(|_| ServerReport {
                peer,
                proxy: None,
                sni: None,
                alpn: None,
                received: Err(format!("not done within {RUN_TIMEOUT:?}")),
            });
            let _ = tx.send(report);
        });
    }
}

async fn serve_one(
    mut tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    proxy_header: bool,
    serve: Serve,
) -> ServerReport {
    let mut report = ServerReport {
        peer,
        proxy: None,
        sni: None,
        alpn: None,
        received: Err("not started".to_owned()),
    };
    if proxy_header {
        match read_proxy_v2(&mut tcp).await {
            Ok(header) => report.proxy = Some(header),
            Err(e) => {
                report.received = Err(e);
                return report;
            }
        }
    }
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            report.received = Err(format!("TLS handshake: {e}"));
            return report;
        }
    };
    let (_, session) = tls.get_ref();
    report.sni = session.server_name().map(str::to_owned);
    report.alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    report.received = match serve {
        Serve::Bulk { data, order } => play(tls, &data, order).await.map_err(|e| e.to_string()),
        Serve::Truncate { data } => truncate(tls, &data)
            .await
            .map(|rest| Received::of(&rest))
            .map_err(|e| e.to_string()),
    };
    report
}

/// Sends `data` over `tls`, then FIN without close_notify; returns what
/// came afterwards, in clear, until the peer closed (or reset).
async fn truncate<S>(mut tls: S, data: &[u8]) -> io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin + IntoTcp,
{
    tls.write_all(data).await?;
    tls.flush().await?;
    let mut tcp = tls.into_tcp();
    tcp.shutdown().await?;
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await?;
    Ok(rest)
}

/// The TCP connection under a TLS stream, its TLS state dropped.
pub trait IntoTcp {
    fn into_tcp(self) -> tokio::net::TcpStream;
}

impl IntoTcp for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn into_tcp(self) -> tokio::net::TcpStream {
        self.into_inner().0
    }
}

impl IntoTcp for tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    fn into_tcp(self) -> tokio::net::TcpStream {
        self.into_inner().0
    }
}

/// What a truncating client saw.
#[derive(Debug)]
pub struct Truncated {
    pub local: SocketAddr,
    /// What it read in clear after its FIN, until the proxy closed: an
    /// error (a reset) is what a failure looks like.
    pub after: io::Result<Vec<u8>>,
}

/// Connects from `ns` to `addr`, does TLS for `name`, sends `data`, then
/// FIN without close_notify; all within [`RUN_TIMEOUT`].
pub fn tls_client_truncating(
    ns: &Netns,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
    data: &[u8],
) -> Result<Truncated, String> {
    let tcp = try_connect(ns, addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let local = tcp.local_addr().unwrap();
    let name = ServerName::try_from(name.to_owned()).expect("a valid server name");
    runtime().block_on(async move {
        tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let run = async {
            let tls = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("{local}: TLS handshake: {e}"))?;
            Ok(Truncated {
                local,
                after: truncate(tls, data).await,
            })
        };
        tokio::time::timeout(RUN_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err(format!("{local}: not done within {RUN_TIMEOUT:?}")))
    })
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Connections still running are dropped with the runtime.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
