//! Connecting to an upstream: which server, and from which source address.
//!
//! The source follows the upstream's (or the route's) `bind`:
//! - `proxy`: the kernel's choice, one of this host's addresses;
//! - `client-ip`: the client's IP address, a port the kernel picks;
//! - `client`: the client's IP address and port;
//! - an address: that address, a port the kernel picks.
//!
//! A client address is bound with `IP_TRANSPARENT` (`IPV6_TRANSPARENT`): it is
//! not one of this host's, and the kernel programs deliver the server's
//! replies back here. A connection is made in the client's family then, so
//! only servers of that family are tried, and no IPv4-mapped address is ever
//! used. A client that is this host itself (or loopback) is never spoofed:
//! the source is the kernel's choice, as the client would have had it
//! (HAProxy gist, "connections from local sources").
//!
//! An original destination is never this host (its own addresses, loopback,
//! l4proxy's listeners) nor the unspecified address, however it was learnt:
//! the kernel programs leave this host's addresses alone, and a trusted
//! front proxy's PROXY header could name anything.
//!
//! And `client` becomes `client-ip` where the client's own port cannot be
//! used: towards the client's original destination (the connection would
//! have the client connection's four addresses and ports, HAProxy gist
//! footnote 6), or when the port is taken.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::{
    addrs::{ClientAddr, OrigDstAddr, UpstreamAddr},
    local_addrs::LocalAddrs,
    parent,
    policy::{Bind, Keepalive, Originate, Target, Upstream},
    stream::Stream,
    tls,
};

/// What the proxy connects from: the address to bind, if any, and whether it
/// needs `IP_TRANSPARENT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// No bind: the kernel picks address and port.
    Kernel,
    /// A client's address (port 0: any port), bound transparently.
    Client(SocketAddr),
    /// A fixed address, any port; transparently, since it may not be local.
    Fixed(IpAddr),
}

/// Why the source differs from what `bind` asked for, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The client is this host: not spoofed.
    LocalClient,
    /// `client` towards the original destination: the client's 4-tuple.
    SameFourTuple,
    /// `client`, but the client's port is taken here.
    PortInUse,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fallback::LocalClient => "client is this host: not spoofed",
            Fallback::SameFourTuple => {
                "client port towards the original destination repeats the client's connection: client-ip"
            }
            Fallback::PortInUse => "client port taken here: client-ip",
        })
    }
}

/// The source for a connection under `request` to `server`.
pub fn source(
    request: &Request,
    server: UpstreamAddr,
    local: &LocalAddrs,
) -> (Source, Option<Fallback>) {
    let client = SocketAddr::new(
        request.client.0.ip().to_canonical(),
        request.client.0.port(),
    );
    match request.bind {
        Bind::Proxy => (Source::Kernel, None),
        Bind::Address(ip) => (Source::Fixed(ip), None),
        Bind::ClientIp | Bind::Client if local.contains(client.ip()) => {
            (Source::Kernel, Some(Fallback::LocalClient))
        }
        Bind::ClientIp => (Source::Client(SocketAddr::new(client.ip(), 0)), None),
        Bind::Client if server.0 == request.orig_dst.0 => (
            Source::Client(SocketAddr::new(client.ip(), 0)),
            Some(Fallback::SameFourTuple),
        ),
        Bind::Client => (Source::Client(client), None),
    }
}

/// An upstream's servers with a round-robin cursor; none for the original
/// destination.
pub struct Pool {
    target: PoolTarget,
    next: AtomicUsize,
    /// TLS to the server, begun once connected (after the PROXY header).
    pub origination: Option<Origination>,
}

/// How an upstream is reached over TLS.
pub struct Origination {
    pub connector: TlsConnector,
    /// The name its certificate must have; `None`: the client's.
    pub server_name: Option<ServerName<'static>>,
    /// Whether ALPN is the policy's (else the client's negotiated one).
    pub fixed_alpn: bool,
}

/// TLS to a parent proxy: its connector, and the name its certificate must
/// have (`None`: the parent's address).
struct ParentTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

enum PoolTarget {
    Servers(Vec<UpstreamAddr>),
    OriginalDestination,
    /// Parent proxies, and the `Proxy-Authorization` to give them.
    Parent {
        servers: Vec<UpstreamAddr>,
        authorization: Option<String>,
        tls: Option<ParentTls>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {upstream}: {error}")]
    Failed {
        upstream: UpstreamAddr,
        error: io::Error,
    },
    #[error(
        "no {family} server: a connection from the client's address is made in the client's family"
    )]
    NoServerOfFamily { family: &'static str },
    #[error("original destination {0} is this host or unspecified: not connected to")]
    LocalDestination(UpstreamAddr),
}

impl ConnectError {
    /// Whether the last server tried did not answer in time.
    pub fn timed_out(&self) -> bool {
        matches!(self, ConnectError::Failed { error, .. } if error.kind() == io::ErrorKind::TimedOut)
    }

    /// The server tried last, if any.
    pub fn upstream(&self) -> Option<UpstreamAddr> {
        match self {
            ConnectError::Failed { upstream, .. } => Some(*upstream),
            ConnectError::LocalDestination(upstream) => Some(*upstream),
            ConnectError::NoServerOfFamily { .. } => None,
        }
    }
}

/// An open upstream connection.
pub struct Connected {
    pub stream: Stream,
    pub upstream: UpstreamAddr,
    /// Why the source is not what `bind` asked for, if it is not.
    pub fallback: Option<Fallback>,
}

/// What a connection needs to know to pick its server and source.
pub struct Request {
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
    /// The destinations a CONNECT front end checked for the client, in the
    /// order to try them (the original destination first); empty for
    /// steered connections.
    pub checked: Vec<SocketAddr>,
    /// The name the client gave for its destination (CONNECT, SNI, Host):
    /// what a parent proxy is asked for, so that it resolves it.
    pub name: Option<String>,
    pub bind: Bind,
    pub keepalive: Keepalive,
}

impl Pool {
    /// The pool of `upstream`, with its TLS configurations built; an error
    /// says which could not be.
    pub fn new(upstream: &Upstream) -> Result<Self, String> {
        let tls = |originate: &Originate, at: &str| {
            let config = tls::client::config(originate)
                .map_err(|e| format!("upstreams.{}.{at}: {e}", upstream.name))?;
            let server_name = originate
                .server_name
                .as_deref()
                .map(|name| ServerName::try_from(name.to_owned()))
                .transpose()
                .map_err(|e| format!("upstreams.{}.{at}.server_name: {e}", upstream.name))?;
            Ok::<_, String>((TlsConnector::from(config), server_name))
        };
        let target = match &upstream.target {
            Target::Servers(servers) => {
                PoolTarget::Servers(servers.iter().copied().map(UpstreamAddr).collect())
            }
            Target::OriginalDestination => PoolTarget::OriginalDestination,
            Target::Parent(parent) => PoolTarget::Parent {
                servers: parent.servers.iter().copied().map(UpstreamAddr).collect(),
                authorization: parent
                    .credentials
                    .as_ref()
                    .map(|(user, password)| parent::basic_authorization(user, password)),
                tls: parent
                    .tls
                    .as_ref()
                    .map(|originate| tls(originate, "parent.tls"))
                    .transpose()?
                    .map(|(connector, server_name)| ParentTls {
                        connector,
                        server_name,
                    }),
            },
        };
        let origination = upstream
            .tls
            .as_ref()
            .map(|originate| {
                tls(originate, "tls").map(|(connector, server_name)| Origination {
                    connector,
                    server_name,
                    fixed_alpn: originate.alpn.is_some(),
                })
            })
            .transpose()?;
        Ok(Self {
            target,
            next: AtomicUsize::new(0),
            origination,
        })
    }

    /// Connects to the next server in turn (of the client's family when the
    /// source is the client's address); if it fails, tries each other such
    /// server once before giving up with the last error.
    pub async fn connect(
        &self,
        request: &Request,
        local: &Arc<LocalAddrs>,
        timeout: Duration,
    ) -> Result<Connected, ConnectError> {
        let original_destination;
        let target;
        let mut via = None;
        let (servers, start) = match &self.target {
            PoolTarget::OriginalDestination if request.checked.len() > 1 => {
                let candidates: Vec<UpstreamAddr> = request
                    .checked
                    .iter()
                    .map(|to| UpstreamAddr(SocketAddr::new(to.ip().to_canonical(), to.port())))
                    .collect();
                return race(&candidates, request, local, timeout).await;
            }
            PoolTarget::OriginalDestination => {
                let to = UpstreamAddr(SocketAddr::new(
                    request.orig_dst.0.ip().to_canonical(),
                    request.orig_dst.0.port(),
                ));
                // A CONNECT front end checked its one address itself
                // (reserved ones only where its rule allows them).
                if request.checked.is_empty()
                    && (to.0.ip().is_unspecified() || local.contains(to.0.ip()))
                {
                    return Err(ConnectError::LocalDestination(to));
                }
                original_destination = [to];
                (&original_destination[..], 0)
            }
            PoolTarget::Servers(servers) => {
                (&servers[..], self.next.fetch_add(1, Ordering::Relaxed))
            }
            PoolTarget::Parent {
                servers,
                authorization,
                tls,
            } => {
                target = parent_target(request);
                via = Some(Via {
                    target: &target,
                    authorization: authorization.as_deref(),
                    tls: tls.as_ref(),
                });
                (&servers[..], self.next.fetch_add(1, Ordering::Relaxed))
            }
        };
        let client_v4 = request.client.0.ip().to_canonical().is_ipv4();
        let mut last_error = None;
        for i in 0..servers.len() {
            let upstream = servers[(start + i) % servers.len()];
            let (from, fallback) = source(request, upstream, local);
            // Only a connection from the client's own address is held to
            // its family.
            if matches!(from, Source::Client(_)) && upstream.0.is_ipv4() != client_v4 {
                continue;
            }
            match connect_from(upstream, from, fallback, request.keepalive, via, timeout).await {
                Ok(connected) => return Ok(connected),
                Err(error) => {
                    tracing::debug!(%upstream, %error, "upstream connect failed");
                    last_error = Some(ConnectError::Failed { upstream, error });
                }
            }
        }
        // None tried: every server is of the other family.
        Err(last_error.unwrap_or(ConnectError::NoServerOfFamily {
            family: if client_v4 { "IPv4" } else { "IPv6" },
        }))
    }
}

/// RFC 8305's Connection Attempt Delay: how long an attempt has before the
/// next address is tried beside it.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Attempts of one connection at a time.
const MAX_ATTEMPTS: usize = 2;

/// Attempts made beside another of the same connection, over all
/// connections: each holds a descriptor beyond the two of its connection,
/// which the daemon's budget counts (`descriptors`). Past it, the next
/// address waits for the attempt in flight to fail.
pub const MAX_SECOND_ATTEMPTS: usize = 64;

static SECOND_ATTEMPTS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_SECOND_ATTEMPTS);

/// Happy Eyeballs (RFC 8305 §5) over `candidates`, in their order: the
/// first attempt starts at once, each next one when the previous failed or
/// after [`ATTEMPT_DELAY`] (at most [`MAX_ATTEMPTS`] at a time), and the
/// first connection made wins; the others are dropped. All within
/// `timeout`.
async fn race(
    candidates: &[UpstreamAddr],
    request: &Request,
    local: &LocalAddrs,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let client_v4 = request.client.0.ip().to_canonical().is_ipv4();
    let mut waiting = candidates.iter().copied().filter_map(|upstream| {
        let (from, fallback) = source(request, upstream, local);
        // As for pools: only a connection from the client's own address is
        // held to its family.
        (!matches!(from, Source::Client(_)) || upstream.0.is_ipv4() == client_v4)
            .then_some((upstream, from, fallback))
    });
    let mut attempts = futures::stream::FuturesUnordered::new();
    let mut last_error = None;
    let mut next = waiting.next();
    // Starts the next address, if any: alone, or beside the one in flight
    // when a second-attempt descriptor can be had. Says whether more wait.
    let mut start =
        |attempts: &mut futures::stream::FuturesUnordered<_>,
         next: &mut Option<(UpstreamAddr, Source, Option<Fallback>)>| {
            let beside = if attempts.is_empty() {
                None
            } else {
                match SECOND_ATTEMPTS.try_acquire() {
                    Ok(permit) => Some(permit),
                    Err(_) => return next.is_some(),
                }
            };
            let Some((upstream, from, fallback)) = next.take() else {
                return false;
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            attempts.push(async move {
                let connected =
                    connect_from(upstream, from, fallback, request.keepalive, None, left).await;
                drop(beside);
                (upstream, connected)
            });
            *next = waiting.next();
            next.is_some()
        };
    let mut more = start(&mut attempts, &mut next);
    let delay = tokio::time::sleep(ATTEMPT_DELAY);
    tokio::pin!(delay);
    while !attempts.is_empty() {
        tokio::select! {
            Some((upstream, result)) = futures::StreamExt::next(&mut attempts) => match result {
                Ok(connected) => return Ok(connected),
                Err(error) => {
                    tracing::debug!(%upstream, %error, "upstream connect failed");
                    last_error = Some(ConnectError::Failed { upstream, error });
                    if more {
                        more = start(&mut attempts, &mut next);
                    }
                    delay.as_mut().reset(tokio::time::Instant::now() + ATTEMPT_DELAY);
                }
            },
            () = &mut delay, if more && attempts.len() < MAX_ATTEMPTS => {
                more = start(&mut attempts, &mut next);
                delay.as_mut().reset(tokio::time::Instant::now() + ATTEMPT_DELAY);
            }
        }
    }
    Err(last_error.unwrap_or(ConnectError::NoServerOfFamily {
        family: if client_v4 { "IPv4" } else { "IPv6" },
    }))
}

/// What a parent proxy is asked to connect to.
#[derive(Clone, Copy)]
struct Via<'a> {
    target: &'a str,
    authorization: Option<&'a str>,
    tls: Option<&'a ParentTls>,
}

/// `name:port` for a name the client gave, else the original destination.
fn parent_target(request: &Request) -> String {
    let port = request.orig_dst.0.port();
    match &request.name {
        // A Host may be an address: an IPv6 one goes in brackets.
        Some(name) => match name.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port).to_string(),
            Err(_) => format!("{name}:{port}"),
        },
        None => SocketAddr::new(request.orig_dst.0.ip().to_canonical(), port).to_string(),
    }
}

/// Connects from `from` within `timeout`, and through a parent proxy if
/// `via` says so; a client port that is taken here
/// falls back to any port of the client's address, in what is left of it.
async fn connect_from(
    upstream: UpstreamAddr,
    from: Source,
    fallback: Option<Fallback>,
    keepalive: Keepalive,
    via: Option<Via<'_>>,
    timeout: Duration,
) -> io::Result<Connected> {
    // One deadline for the connection and a parent's answer: a parent
    // that does not answer is told apart from one that cannot be reached.
    let deadline = tokio::time::Instant::now() + timeout;
    let attempt = async {
        match (connect_one(upstream, from, keepalive).await, from) {
            (Ok(stream), _) => Ok((stream, fallback)),
            (Err(e), Source::Client(client))
                if client.port() != 0
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
                    ) =>
            {
                let any_port = Source::Client(SocketAddr::new(client.ip(), 0));
                let stream = connect_one(upstream, any_port, keepalive).await?;
                Ok((stream, Some(Fallback::PortInUse)))
            }
            (Err(e), _) => Err(e),
        }
    };
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    let (stream, fallback) = tokio::time::timeout_at(deadline, attempt)
        .await
        .map_err(|_| timed_out())??;
    let mut stream = Stream::Tcp(stream);
    if let Some(via) = via {
        if let Some(tls) = via.tls {
            let name = tls
                .server_name
                .clone()
                .unwrap_or_else(|| ServerName::IpAddress(upstream.0.ip().into()));
            let Stream::Tcp(tcp) = stream else {
                unreachable!("made plain just above")
            };
            let secured = tokio::time::timeout_at(deadline, tls.connector.connect(name, tcp))
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| io::Error::new(e.kind(), format!("TLS to the parent proxy: {e}")))?;
            stream = Stream::from(tokio_rustls::TlsStream::Client(secured));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        parent::open(&mut stream, via.target, via.authorization, left).await?;
    }
    Ok(Connected {
        stream,
        upstream,
        fallback,
    })
}

async fn connect_one(
    upstream: UpstreamAddr,
    from: Source,
    keepalive: Keepalive,
) -> io::Result<TcpStream> {
    let socket = if upstream.0.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    set_keepalive(&SockRef::from(&socket), keepalive)?;
    match from {
        Source::Kernel => {}
        Source::Client(addr) => bind_transparent(&socket, addr)?,
        Source::Fixed(ip) => bind_transparent(&socket, SocketAddr::new(ip, 0))?,
    }
    let stream = socket.connect(upstream.0).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Probes a silent peer as `keepalive` says.
pub fn set_keepalive(socket: &SockRef<'_>, keepalive: Keepalive) -> io::Result<()> {
    match keepalive {
        Keepalive::Off => socket.set_keepalive(false),
        Keepalive::Probe {
            idle,
            interval,
            count,
        } => socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(Duration::from_secs(idle.into()))
                .with_interval(Duration::from_secs(interval.into()))
                .with_retries(count),
        ),
    }
}

/// Binds to an address that need not be this host's. Port 0 waits for
/// `connect` to pick the port (`IP_BIND_ADDRESS_NO_PORT`), so one source
/// address can have as many connections as there are distinct destinations;
/// a given port is bound with `SO_REUSEADDR`, as the same client port may be
/// in use towards another destination.
fn bind_transparent(socket: &TcpSocket, addr: SocketAddr) -> io::Result<()> {
    let sock = SockRef::from(socket);
    if addr.is_ipv4() {
        sock.set_ip_transparent_v4(true)?;
    } else {
        sock.set_ip_transparent_v6(true)?;
    }
    if addr.port() == 0 {
        set_bind_address_no_port(socket)?;
    } else {
        sock.set_reuse_address(true)?;
    }
    socket.bind(addr)
}

/// `IP_BIND_ADDRESS_NO_PORT`, which socket2 does not wrap (it applies to
/// IPv6 sockets too).
fn set_bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int,
    // on a descriptor the socket owns for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(client: &str, orig_dst: &str, bind: Bind) -> Request {
        Request {
            client: ClientAddr(client.parse().unwrap()),
            orig_dst: OrigDstAddr(orig_dst.parse().unwrap()),
            checked: Vec::new(),
            name: None,
            bind,
            keepalive: Keepalive::Off,
        }
    }

    fn server(addr: &str) -> UpstreamAddr {
        UpstreamAddr(addr.parse().unwrap())
    }

    #[tokio::test]
    async fn the_source_follows_bind_unless_spoofing_cannot_work() {
        let local = LocalAddrs::load(None).await.unwrap();
        let remote = "192.0.2.7:40000";
        let to = "192.0.2.10:80";
        let cases = [
            (
                remote,
                Bind::Proxy,
                server("203.0.113.2:80"),
                Source::Kernel,
                None,
            ),
            (
                remote,
                Bind::Address("198.51.100.1".parse().unwrap()),
                server("203.0.113.2:80"),
                Source::Fixed("198.51.100.1".parse().unwrap()),
                None,
            ),
            (
                remote,
                Bind::ClientIp,
                server("203.0.113.2:80"),
                Source::Client("192.0.2.7:0".parse().unwrap()),
                None,
            ),
            (
                remote,
                Bind::Client,
                server("203.0.113.2:80"),
                Source::Client(remote.parse().unwrap()),
                None,
            ),
            // Loopback is this host's, whatever the interfaces say.
            (
                "127.0.0.5:40000",
                Bind::Client,
                server("203.0.113.2:80"),
                Source::Kernel,
                Some(Fallback::LocalClient),
            ),
            (
                remote,
                Bind::Client,
                server(to),
                Source::Client("192.0.2.7:0".parse().unwrap()),
                Some(Fallback::SameFourTuple),
            ),
        ];
        for (client, bind, to_server, want, fallback) in cases {
            assert_eq!(
                source(&request(client, to, bind), to_server, &local),
                (want, fallback),
                "{client} {bind} to {to_server}"
            );
        }
    }

    #[tokio::test]
    async fn an_original_destination_on_this_host_is_never_connected_to() {
        let local = LocalAddrs::load(None).await.unwrap();
        let pool = Pool::new(&Upstream {
            name: "pass".to_owned(),
            target: Target::OriginalDestination,
            bind: Bind::Proxy,
            proxy_protocol: None,
            tls: None,
        })
        .unwrap();
        for to in [
            "127.0.0.1:9999",
            "[::1]:9999",
            "[::ffff:127.0.0.1]:80",
            "0.0.0.0:80",
            "[::]:80",
        ] {
            let refused = pool
                .connect(
                    &request("192.0.2.7:40000", to, Bind::Proxy),
                    &local,
                    Duration::from_secs(1),
                )
                .await
                .err()
                .unwrap_or_else(|| panic!("{to} was connected to"));
            assert!(
                matches!(refused, ConnectError::LocalDestination(_)),
                "{to}: {refused}"
            );
        }
    }

    #[tokio::test]
    async fn a_connection_from_the_clients_address_needs_a_server_of_its_family() {
        let local = LocalAddrs::load(None).await.unwrap();
        let pool = Pool::new(&Upstream {
            name: "v6".to_owned(),
            target: Target::Servers(vec!["[2001:db8:5::2]:80".parse().unwrap()]),
            bind: Bind::ClientIp,
            proxy_protocol: None,
            tls: None,
        })
        .unwrap();
        let refused = pool
            .connect(
                &request("192.0.2.7:40000", "192.0.2.10:80", Bind::ClientIp),
                &local,
                Duration::from_secs(1),
            )
            .await
            .err()
            .expect("no IPv4 server to connect to");
        assert!(
            matches!(refused, ConnectError::NoServerOfFamily { family: "IPv4" }),
            "{refused}"
        );
    }
}
