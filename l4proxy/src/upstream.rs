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
//!
//! Which server of a pool (or which parent) is the upstream's `balance`
//! ([`crate::balance`]), among those [`crate::health`] has not marked down;
//! a failed connect is tried again on the next one the balance gives, at
//! most `retries` times.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::{io::Interest, net::TcpStream};

use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

pub use crate::health::Lease;

use crate::{
    addrs::{ClientAddr, OrigDstAddr, UpstreamAddr},
    balance::{Picker, Slot},
    health::{self, ServerState},
    local_addrs::LocalAddrs,
    parent,
    policy::{Bind, Keepalive, Observe, Originate, ServerOptions, Target, Upstream},
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
    /// A client's address and any port but its own, bound transparently:
    /// towards the client's original destination, its own port would make
    /// the client's connection again (a firewall's connection tracking
    /// would take the two for one).
    ClientOtherPort(SocketAddr),
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
    /// The client's address is IPv6 link-local: binding it needs a zone,
    /// which neither a steered connection nor a PROXY header gives.
    LinkLocalClient,
    /// `client`, but the client's port is taken here.
    PortInUse,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fallback::LocalClient => "client is this host: not spoofed",
            Fallback::LinkLocalClient => "client is link-local (no zone to bind it with): not spoofed",
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
        Bind::ClientIp | Bind::Client if matches!(client.ip(), IpAddr::V6(v6) if v6.is_unicast_link_local()) => {
            (Source::Kernel, Some(Fallback::LinkLocalClient))
        }
        Bind::ClientIp if server.0 == request.orig_dst.0 => (Source::ClientOtherPort(client), None),
        Bind::ClientIp => (Source::Client(SocketAddr::new(client.ip(), 0)), None),
        Bind::Client if server.0 == request.orig_dst.0 => (
            Source::ClientOtherPort(client),
            Some(Fallback::SameFourTuple),
        ),
        Bind::Client => (Source::Client(client), None),
    }
}

/// An upstream's servers (or parents), with their health and load and the
/// state of its balance; none for the original destination.
pub struct Pool {
    /// The upstream's name, for messages.
    name: String,
    target: PoolTarget,
    /// In the policy's order.
    servers: Vec<PoolServer>,
    picker: Picker,
    /// Further servers a connection tries when one fails to connect.
    retries: usize,
    observe: Option<Observe>,
    /// TLS to the server, begun once connected (after the PROXY header).
    pub origination: Option<Origination>,
}

/// A server of a pool, or a parent proxy.
struct PoolServer {
    address: UpstreamAddr,
    options: ServerOptions,
    /// Its rendezvous key (see [`crate::balance`]).
    key: u64,
    /// Shared with the policies before and after this one that keep it.
    state: Arc<ServerState>,
}

/// A pool's server as [`Pool::servers_state`] shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerStatus {
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    pub health: health::Health,
}

/// How an upstream is reached over TLS.
pub struct Origination {
    pub connector: TlsConnector,
    /// The name its certificate must have; `None`: the client's.
    pub server_name: Option<ServerName<'static>>,
    /// The ALPN protocols the policy offers (else the client's negotiated
    /// one is).
    pub policy_alpn: Option<Vec<String>>,
}

/// TLS to a parent proxy: its connector, and the name its certificate must
/// have (`None`: the parent's address).
struct ParentTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

enum PoolTarget {
    Servers,
    OriginalDestination,
    /// The servers are parent proxies: the `Proxy-Authorization` to give
    /// them, and TLS to them.
    Parent {
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
    #[error("no {family} server: a connection from {from} is made in its family")]
    NoServerOfFamily {
        family: &'static str,
        from: &'static str,
    },
    #[error("original destination {0} is this host or unspecified: not connected to")]
    LocalDestination(UpstreamAddr),
    #[error("no server of upstream {upstream:?} is up")]
    NoServerUp { upstream: String },
    /// Connected, but what is made over the connection failed: TLS to the
    /// server (or the PROXY header before it).
    #[error("{error}")]
    Secure {
        upstream: UpstreamAddr,
        error: String,
        /// Whose doing it was ([`Unsecured::fault`]).
        fault: Fault,
    },
}

impl ConnectError {
    /// Whether no server was tried because every one is down: the
    /// connection is refused as when no route matches.
    pub fn all_down(&self) -> bool {
        matches!(self, ConnectError::NoServerUp { .. })
    }

    /// Whether the last server tried did not answer in time.
    pub fn timed_out(&self) -> bool {
        matches!(self, ConnectError::Failed { error, .. } if error.kind() == io::ErrorKind::TimedOut)
    }

    /// Whose doing a failure of what is made over the connection was, if
    /// that is what failed.
    pub fn secure_fault(&self) -> Option<Fault> {
        match self {
            ConnectError::Secure { fault, .. } => Some(*fault),
            _ => None,
        }
    }

    /// Whether the failure says nothing of the servers: none was tried
    /// (this host as destination, no server of the client's family), or the
    /// connect could not be made from here ([`this_hosts_fault`]). What
    /// goes over a connection is judged by its [`Fault`].
    pub fn on_this_host(&self) -> bool {
        match self {
            ConnectError::LocalDestination(_) | ConnectError::NoServerOfFamily { .. } => true,
            ConnectError::Failed { error, .. } => this_hosts_fault(error),
            ConnectError::NoServerUp { .. } | ConnectError::Secure { .. } => false,
        }
    }

    /// The server tried last, if any.
    pub fn upstream(&self) -> Option<UpstreamAddr> {
        match self {
            ConnectError::Failed { upstream, .. } | ConnectError::Secure { upstream, .. } => {
                Some(*upstream)
            }
            ConnectError::LocalDestination(upstream) => Some(*upstream),
            ConnectError::NoServerOfFamily { .. } | ConnectError::NoServerUp { .. } => None,
        }
    }
}

/// Why what [`Pool::connect`]'s `secure` makes over a new connection (TLS
/// to the server, the PROXY header before it) failed.
pub struct Unsecured {
    pub error: String,
    pub fault: Fault,
}

/// Whose doing a failure over a new connection was. Only the server's
/// tries the next server and counts for `observe`: the others would be the
/// same on every server, and nothing is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Its handshake, its certificate for a name the policy gives, a reset.
    Server,
    /// What the client asked for: the name the certificate must have, its
    /// ALPN protocol.
    Client,
    /// This host's: a header it could not encode, TLS it cannot stack.
    ThisHost,
}

impl Fault {
    /// The failure's `reason` in the upstream's failed-connect count.
    pub fn reason(self) -> &'static str {
        match self {
            Fault::Server => "tls",
            Fault::Client => "client",
            Fault::ThisHost => "local",
        }
    }
}

/// An open upstream connection.
pub struct Connected {
    pub stream: Stream,
    pub upstream: UpstreamAddr,
    /// Why the source is not what `bind` asked for, if it is not.
    pub fallback: Option<Fallback>,
    /// Counts the connection as active on its server (a pool's) while it
    /// is held: to be kept as long as the connection is relayed.
    pub lease: Option<Lease>,
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
    /// Bytes go upstream the moment it is connected (the client's first
    /// bytes, already read or due a round trip after a CONNECT answer; a
    /// PROXY header; a TLS handshake; a parent's CONNECT): its handshake's
    /// last ACK is held to ride on them ([`hold_handshake_ack`]).
    pub sends_first: bool,
}

impl Pool {
    /// The pool of `upstream`, with its TLS configurations built (an error
    /// says which could not be), and its servers' states from `health`.
    pub fn new(upstream: &Upstream, health: &health::Registry) -> Result<Self, String> {
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
            Target::Servers(_) => PoolTarget::Servers,
            Target::OriginalDestination => PoolTarget::OriginalDestination,
            Target::Parent(parent) => PoolTarget::Parent {
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
                    policy_alpn: originate.alpn.clone(),
                })
            })
            .transpose()?;
        let servers: Vec<PoolServer> = upstream
            .servers()
            .iter()
            .enumerate()
            .map(|(k, &address)| PoolServer {
                address: UpstreamAddr(address),
                options: upstream.balancing.options(k),
                key: crate::balance::server_key(address),
                state: health.server(&upstream.name, address),
            })
            .collect();
        // For random-two's draws: any seed, not the same at each start.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos() as u64);
        Ok(Self {
            name: upstream.name.clone(),
            target,
            picker: Picker::new(upstream.balancing.balance, servers.len(), seed),
            retries: upstream
                .balancing
                .retries
                .unwrap_or(servers.len().saturating_sub(1)),
            observe: upstream.balancing.observe,
            servers,
            origination,
        })
    }

    /// Each server's weight, role, health and load now, in the policy's
    /// order (the parents for a parent upstream; none for the original
    /// destination): what metrics and status show. Reading changes nothing.
    pub fn servers_state(&self) -> Vec<ServerStatus> {
        self.servers
            .iter()
            .map(|server| ServerStatus {
                address: server.address.0,
                weight: server.options.weight,
                backup: server.options.backup,
                health: server.state.health(),
            })
            .collect()
    }

    /// Connects to the server the balance picks among those up (of the
    /// client's family when the source is the client's address), and makes
    /// `secure` over the connection (TLS to the server, when the upstream
    /// has it); if either fails, the next it picks among the rest, `retries`
    /// times at most, before giving up with the last error (as HAProxy
    /// counts a failed TLS handshake as the server's error and
    /// redispatches). With every server down, none is tried
    /// ([`ConnectError::NoServerUp`]).
    pub async fn connect<Secured>(
        &self,
        request: &Request,
        local: &Arc<LocalAddrs>,
        timeout: Duration,
        secure: impl Fn(Stream, UpstreamAddr) -> Secured,
    ) -> Result<Connected, ConnectError>
    where
        Secured: Future<Output = Result<Stream, Unsecured>>,
    {
        let target;
        let via = match &self.target {
            PoolTarget::OriginalDestination => {
                let connected = original_destination(request, local, timeout).await?;
                return match secure(connected.stream, connected.upstream).await {
                    Ok(stream) => Ok(Connected {
                        stream,
                        ..connected
                    }),
                    Err(Unsecured { error, fault }) => Err(ConnectError::Secure {
                        upstream: connected.upstream,
                        error,
                        fault,
                    }),
                };
            }
            PoolTarget::Servers => None,
            PoolTarget::Parent { authorization, tls } => {
                target = parent_target(request);
                Some(Via {
                    target: &target,
                    authorization: authorization.as_deref(),
                    tls: tls.as_ref(),
                })
            }
        };
        let client = request.client.0.ip();
        let client_v4 = client.to_canonical().is_ipv4();
        // What kind of source it is does not depend on the server: one look
        // at this host's addresses, not one a server.
        let from = self
            .servers
            .first()
            .map(|server| source(request, server.address, local).0);
        let mut slots: Vec<Slot> = self
            .servers
            .iter()
            .map(|server| Slot {
                weight: server.options.weight,
                active: 0,
                backup: server.options.backup,
                up: true,
                usable: from.is_none_or(|from| family_fits(from, server.address, client_v4)),
                tried: false,
                key: server.key,
            })
            .collect();
        let mut last_error = None;
        for _ in 0..=self.retries {
            // Health and load as they are now: a retry may come a connect
            // timeout after the first choice.
            for (slot, server) in slots.iter_mut().zip(&self.servers) {
                slot.up = server.state.is_up();
                slot.active = server.state.active();
            }
            let Some(k) = self.picker.pick(&slots, client) else {
                break;
            };
            slots[k].tried = true;
            let server = &self.servers[k];
            // Counted from the choice on, so that connections chosen at the
            // same moment see each other.
            let lease = server.state.lease();
            let (from, fallback) = source(request, server.address, local);
            let connected =
                match connect_from(server.address, from, fallback, request, via, timeout).await {
                    Ok(connected) => connected,
                    Err(failed) => {
                        last_error = Some(self.connect_failed(server, failed));
                        continue;
                    }
                };
            match secure(connected.stream, server.address).await {
                Ok(stream) => {
                    server.state.connect_succeeded(self.observe.as_ref());
                    return Ok(Connected {
                        stream,
                        lease: Some(lease),
                        ..connected
                    });
                }
                Err(Unsecured { error, fault }) => {
                    let failed = ConnectError::Secure {
                        upstream: server.address,
                        error,
                        fault,
                    };
                    // Through a parent, it is the destination's failure
                    // (the same through every parent): the parent worked.
                    if via.is_some() || fault != Fault::Server {
                        server.state.connect_succeeded(self.observe.as_ref());
                        return Err(failed);
                    }
                    tracing::debug!(upstream = %server.address, error = %failed, "TLS to the upstream failed");
                    server.state.connect_failed(self.observe.as_ref(), &failed);
                    last_error = Some(failed);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            if slots.iter().any(|slot| slot.usable) {
                ConnectError::NoServerUp {
                    upstream: self.name.clone(),
                }
            } else {
                no_server_of_family(from, client_v4)
            }
        }))
    }

    /// A failed connect to `server`, counted against it (and by
    /// observation): a parent that answered is alive, whatever it
    /// answered; one this host could not even try is not at fault.
    fn connect_failed(&self, server: &PoolServer, failed: AttemptFailed) -> ConnectError {
        let AttemptFailed { error, alive } = failed;
        tracing::debug!(upstream = %server.address, %error, "upstream connect failed");
        if alive {
            server.state.connect_succeeded(self.observe.as_ref());
        } else if !this_hosts_fault(&error) {
            server.state.connect_failed(self.observe.as_ref(), &error);
        }
        ConnectError::Failed {
            upstream: server.address,
            error,
        }
    }
}

/// Connects to the connection's original destination: the addresses a
/// CONNECT front end checked, by Happy Eyeballs, or the one it was steered
/// to, never this host.
async fn original_destination(
    request: &Request,
    local: &Arc<LocalAddrs>,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    if request.checked.len() > 1 {
        let candidates: Vec<UpstreamAddr> = request
            .checked
            .iter()
            .map(|to| UpstreamAddr(SocketAddr::new(to.ip().to_canonical(), to.port())))
            .collect();
        return race(&candidates, request, local, timeout).await;
    }
    let to = UpstreamAddr(SocketAddr::new(
        request.orig_dst.0.ip().to_canonical(),
        request.orig_dst.0.port(),
    ));
    // A CONNECT front end checked its one address itself (reserved ones
    // only where its rule allows them).
    if request.checked.is_empty() && (to.0.ip().is_unspecified() || local.contains(to.0.ip())) {
        return Err(ConnectError::LocalDestination(to));
    }
    let client_v4 = request.client.0.ip().to_canonical().is_ipv4();
    let (from, fallback) = source(request, to, local);
    if !family_fits(from, to, client_v4) {
        return Err(no_server_of_family(Some(from), client_v4));
    }
    connect_from(to, from, fallback, request, None, timeout)
        .await
        .map_err(|failed| {
            tracing::debug!(upstream = %to, error = %failed.error, "upstream connect failed");
            ConnectError::Failed {
                upstream: to,
                error: failed.error,
            }
        })
}

/// Whether a connection from `from` may go to `server`: one from the
/// client's own address or a fixed one is made in that address's family.
fn family_fits(from: Source, server: UpstreamAddr, client_v4: bool) -> bool {
    match from {
        Source::Kernel => true,
        Source::Client(_) | Source::ClientOtherPort(_) => server.0.is_ipv4() == client_v4,
        Source::Fixed(ip) => server.0.is_ipv4() == ip.is_ipv4(),
    }
}

/// No server could be tried: every one is of the other family than the
/// source's (`from`, if known; else the client's).
fn no_server_of_family(from: Option<Source>, client_v4: bool) -> ConnectError {
    let (v4, whose) = match from {
        Some(Source::Fixed(ip)) => (ip.is_ipv4(), "the upstream's fixed source address"),
        _ => (client_v4, "the client's address"),
    };
    ConnectError::NoServerOfFamily {
        family: if v4 { "IPv4" } else { "IPv6" },
        from: whose,
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

/// The addresses of one name tried at most (Squid's `forward_max_tries`
/// is 25): a name with hundreds must not become a SYN to each.
pub(crate) const MAX_ADDRESSES: usize = 16;

/// Happy Eyeballs (RFC 8305 §5) over the first [`MAX_ADDRESSES`] of
/// `candidates`, in their order: the first attempt starts at once, each
/// next one when the previous failed or after [`ATTEMPT_DELAY`] (at most
/// [`MAX_ATTEMPTS`] at a time), and the first connection made wins; the
/// others are dropped. All within `timeout`; while an address would wait
/// behind the two in flight, an attempt has half of it, so that two silent
/// addresses in front do not hold the rest out, and none starts once the
/// time is up.
async fn race(
    candidates: &[UpstreamAddr],
    request: &Request,
    local: &LocalAddrs,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let client_v4 = request.client.0.ip().to_canonical().is_ipv4();
    let mut waiting = candidates
        .iter()
        .copied()
        .filter_map(|upstream| {
            let (from, fallback) = source(request, upstream, local);
            family_fits(from, upstream, client_v4).then_some((upstream, from, fallback))
        })
        .take(MAX_ADDRESSES)
        .peekable();
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
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let Some((upstream, from, fallback)) = next.take() else {
                return false;
            };
            *next = waiting.next();
            // Halved only when an address would wait behind the pair in
            // flight: a second one starts beside this one anyway.
            let budget = if next.is_some() && waiting.peek().is_some() {
                left.min(timeout / 2)
            } else {
                left
            };
            attempts.push(async move {
                let connected = connect_from(upstream, from, fallback, request, None, budget).await;
                drop(beside);
                (upstream, connected)
            });
            next.is_some()
        };
    let mut more = start(&mut attempts, &mut next);
    let delay = tokio::time::sleep(ATTEMPT_DELAY);
    tokio::pin!(delay);
    while !attempts.is_empty() {
        tokio::select! {
            Some((upstream, result)) = futures::StreamExt::next(&mut attempts) => match result {
                Ok(connected) => return Ok(connected),
                Err(AttemptFailed { error, .. }) => {
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
    Err(last_error.unwrap_or_else(|| {
        let from = candidates.first().map(|&to| source(request, to, local).0);
        no_server_of_family(from, client_v4)
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

/// Why an attempt failed, and whether the server showed itself alive all
/// the same: a parent that refused the tunnel (which may be its
/// destination's doing) or waits on its destination.
struct AttemptFailed {
    error: io::Error,
    alive: bool,
}

/// Connects from `from` within `timeout`, the socket set up as `request`
/// asks (keepalive, the handshake's ACK held), and through a parent proxy
/// if `via` says so; a client port that is taken here falls back to any
/// port of the client's address, in what is left of it.
async fn connect_from(
    upstream: UpstreamAddr,
    from: Source,
    fallback: Option<Fallback>,
    request: &Request,
    via: Option<Via<'_>>,
    timeout: Duration,
) -> Result<Connected, AttemptFailed> {
    // One deadline for the connection and a parent's answer: a parent
    // that does not answer is told apart from one that cannot be reached.
    let deadline = tokio::time::Instant::now() + timeout;
    let (keepalive, hold_ack) = (request.keepalive, request.sends_first);
    let attempt = async {
        match (connect_one(upstream, from, keepalive, hold_ack).await, from) {
            (Ok(stream), _) => Ok((stream, fallback)),
            (Err(e), Source::Client(client))
                if client.port() != 0
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
                    ) =>
            {
                let any_port = Source::Client(SocketAddr::new(client.ip(), 0));
                let stream = connect_one(upstream, any_port, keepalive, hold_ack).await?;
                Ok((stream, Some(Fallback::PortInUse)))
            }
            (Err(e), _) => Err(e),
        }
    };
    let (stream, fallback) = tokio::time::timeout_at(deadline, attempt)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
        .map_err(|error| AttemptFailed {
            error,
            alive: false,
        })?;
    let stream = match via {
        Some(via) => through_parent(stream, upstream, via, deadline).await?,
        None => Stream::Tcp(stream),
    };
    Ok(Connected {
        stream,
        upstream,
        fallback,
        lease: None,
    })
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
}

/// Over TCP to the parent proxy `upstream`: TLS if `via` says so, then
/// its answer to the CONNECT for `via.target`, all by `deadline`. TLS to
/// the parent is the parent's alone (its name and certificate are the
/// policy's, nothing the client sent): a failure there counts against it,
/// as does an answer it garbles or closes before; a refusal may be the
/// destination's doing, and does not.
async fn through_parent(
    tcp: TcpStream,
    upstream: UpstreamAddr,
    via: Via<'_>,
    deadline: tokio::time::Instant,
) -> Result<Stream, AttemptFailed> {
    let mut stream = match via.tls {
        Some(tls) => {
            let name = tls
                .server_name
                .clone()
                .unwrap_or_else(|| ServerName::IpAddress(upstream.0.ip().into()));
            let secured = tokio::time::timeout_at(deadline, tls.connector.connect(name, tcp))
                .await
                .unwrap_or_else(|_| Err(timed_out()))
                .map_err(|e| AttemptFailed {
                    error: io::Error::new(e.kind(), format!("TLS to the parent proxy: {e}")),
                    alive: false,
                })?;
            Stream::from(tokio_rustls::TlsStream::Client(secured))
        }
        None => Stream::Tcp(tcp),
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    parent::open(&mut stream, via.target, via.authorization, left)
        .await
        .map_err(|error| AttemptFailed {
            // An answer, or none yet while it may wait on its destination,
            // says nothing against the parent; closing or garbling does.
            alive: matches!(
                error,
                parent::ParentError::Refused { .. } | parent::ParentError::Timeout { .. }
            ),
            error: error.into(),
        })?;
    Ok(stream)
}

/// A TCP connection to `upstream` from `from`, with `keepalive` and the
/// handshake's last ACK held if `hold_ack`: what relayed connections and
/// health checks make.
pub(crate) async fn connect_one(
    upstream: UpstreamAddr,
    from: Source,
    keepalive: Keepalive,
    hold_ack: bool,
) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(upstream.0),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    // A new socket has no keepalive: one system call less when it stays so.
    if keepalive != Keepalive::Off {
        set_keepalive(&SockRef::from(&socket), keepalive)?;
    }
    socket.set_tcp_nodelay(true)?;
    if hold_ack {
        hold_handshake_ack(&socket)?;
    }
    match from {
        Source::Kernel => {}
        Source::Client(addr) => bind_transparent(&socket, addr)?,
        Source::ClientOtherPort(client) => {
            bind_transparent(&socket, SocketAddr::new(client.ip(), 0))?;
            leave_out_port(&socket, client.port())?;
        }
        Source::Fixed(ip) => bind_transparent(&socket, SocketAddr::new(ip, 0))?,
    }
    establish(socket, upstream.0).await
}

/// Connects the non-blocking `socket` to `to`, once the handshake is done.
/// Unlike tokio's `TcpSocket::connect`, which reads the socket's error
/// (`SO_ERROR`) on every connection, the error is read only when epoll
/// reported the connect failed: that comes as a hang-up with the error.
async fn establish(socket: Socket, to: SocketAddr) -> io::Result<TcpStream> {
    match socket.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    if ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection closed while it was being made",
            )
        }));
    }
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

/// `IP_LOCAL_PORT_RANGE` (linux/in.h, Linux 6.3), which the libc crate
/// lacks.
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

/// Keeps `connect` from picking `port`: the socket's own port range is the
/// larger part of this namespace's that leaves it out. (`connect` sees no
/// clash with the client's port by itself: the client's connection is held
/// here with its addresses the other way round.)
fn leave_out_port(socket: &Socket, port: u16) -> io::Result<()> {
    let (low, high) = known_local_port_range()?;
    if !(low..=high).contains(&port) {
        return Ok(());
    }
    let (from, to) = if port - low >= high - port {
        (low, port - 1)
    } else {
        (port + 1, high)
    };
    if from > to {
        return Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL));
    }
    // The option's u32, as the c_int of the same bits.
    set_int_option(
        socket,
        libc::IPPROTO_IP,
        IP_LOCAL_PORT_RANGE,
        packed_port_range(from, to) as libc::c_int,
    )
}

/// A port range as `IP_LOCAL_PORT_RANGE` takes it: `low | high << 16`.
fn packed_port_range(low: u16, high: u16) -> u32 {
    u32::from(low) | (u32::from(high) << 16)
}

/// This network namespace's `net.ipv4.ip_local_port_range` as last read
/// ([`packed_port_range`]; 0 before the first read), so that a connection
/// reads no file.
static LOCAL_PORT_RANGE: AtomicU32 = AtomicU32::new(0);

/// Reads this network namespace's port range again: the daemon does at
/// start-up, on each reload and every few seconds (a changed sysctl is
/// seen that late).
pub fn reread_local_port_range() {
    if let Err(e) = read_local_port_range() {
        tracing::warn!(error = %e, "reading net.ipv4.ip_local_port_range");
    }
}

/// Reads the port range into [`LOCAL_PORT_RANGE`], and gives it.
fn read_local_port_range() -> io::Result<(u16, u16)> {
    let (low, high) = local_port_range()?;
    LOCAL_PORT_RANGE.store(packed_port_range(low, high), Ordering::Relaxed);
    Ok((low, high))
}

/// [`LOCAL_PORT_RANGE`], read now if it never was.
fn known_local_port_range() -> io::Result<(u16, u16)> {
    match LOCAL_PORT_RANGE.load(Ordering::Relaxed) {
        0 => read_local_port_range(),
        range => Ok((range as u16, (range >> 16) as u16)),
    }
}

/// This network namespace's `net.ipv4.ip_local_port_range` (both families).
fn local_port_range() -> io::Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Ok((low, high)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ip_local_port_range {text:?}"),
        )),
    }
}

/// Binds to an address that need not be this host's. Port 0 waits for
/// `connect` to pick the port (`IP_BIND_ADDRESS_NO_PORT`), so one source
/// address can have as many connections as there are distinct destinations;
/// a given port is bound with `SO_REUSEADDR`, as the same client port may be
/// in use towards another destination.
fn bind_transparent(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    if addr.port() == 0 {
        set_bind_address_no_port(socket)?;
    } else {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&addr.into())
}

/// `IP_BIND_ADDRESS_NO_PORT`, which socket2 does not wrap (it applies to
/// IPv6 sockets too).
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    set_int_option(socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// Holds back the last ACK of the handshake `socket` is about to make, so
/// that it rides on the first bytes sent instead of going alone: one
/// segment fewer for the proxy to send and the server to take, and the
/// server's accept and first read come with one wake-up (HAProxy's
/// `tcp-smart-connect`). `TCP_DEFER_ACCEPT` on a connecting socket does it
/// (the kernel's SYN-SENT handling) and, unlike `TCP_QUICKACK` 0, leaves no
/// delayed-ACK mode behind that would stall a server writing small pieces
/// without `TCP_NODELAY`. Nothing sent, the kernel sends the ACK after
/// 200 ms; [`release_ack`] sends it at once.
fn hold_handshake_ack(socket: &Socket) -> io::Result<()> {
    // The value is in seconds; it means nothing more on a connecting socket.
    set_int_option(socket, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, 1)
}

/// Sends an ACK the kernel is holding back for `stream`, and leaves
/// delayed-ACK mode: the handshake's that [`hold_handshake_ack`] held, for
/// a connection whose first bytes are late; or the ACK of bytes read, on a
/// socket accepted in delayed-ACK mode (only once they are read: the kernel
/// sends none while bytes are queued).
pub fn release_ack(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_tcp_quickack(true)
}

/// An integer socket option socket2 does not wrap.
fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int,
    // on a descriptor the socket owns for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a failed connect is not counted against the server by
/// observation: this host ran out of descriptors, memory or source ports
/// (one busy client's address has only so many towards a server), or may
/// not bind or send (`EPERM`, `EACCES`: mostly a bind to the client's
/// address this host may not make, though a `prohibit` route to one
/// server gives them too; health checks, which bind nothing, count those).
/// Counted against the server, these would mark a healthy pool down for
/// every client.
fn this_hosts_fault(error: &io::Error) -> bool {
    this_host_ran_out(error) || matches!(error.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

/// Whether this host ran out of descriptors, memory or source ports: a
/// pinch that passes, which says nothing of where it connects to. (A
/// refusal, `EPERM` or `EACCES`, may be of the destination itself: a
/// `prohibit` route, a firewall rule.)
pub(crate) fn this_host_ran_out(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EADDRNOTAVAIL
                | libc::EADDRINUSE
        )
    )
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
            sends_first: false,
        }
    }

    fn server(addr: &str) -> UpstreamAddr {
        UpstreamAddr(addr.parse().unwrap())
    }

    #[test]
    fn only_what_the_server_or_the_path_did_counts_against_it() {
        let os = io::Error::from_raw_os_error;
        for ours in [
            libc::EMFILE,
            libc::EADDRNOTAVAIL,
            libc::EADDRINUSE,
            libc::EPERM,
        ] {
            assert!(this_hosts_fault(&os(ours)), "{}", os(ours));
            // A refusal may be of the destination: health checks count it.
            let refusal = matches!(ours, libc::EPERM);
            assert_eq!(this_host_ran_out(&os(ours)), !refusal, "{}", os(ours));
        }
        for theirs in [
            os(libc::ECONNREFUSED),
            os(libc::EHOSTUNREACH),
            os(libc::ECONNRESET),
            timed_out(),
        ] {
            assert!(!this_hosts_fault(&theirs), "{theirs}");
        }
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
            (
                "[fe80::7]:40000",
                Bind::ClientIp,
                server("[2001:db8:5::2]:80"),
                Source::Kernel,
                Some(Fallback::LinkLocalClient),
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
                Source::ClientOtherPort(remote.parse().unwrap()),
                Some(Fallback::SameFourTuple),
            ),
            // Any port but the client's own towards its original
            // destination, with client-ip too.
            (
                remote,
                Bind::ClientIp,
                server(to),
                Source::ClientOtherPort(remote.parse().unwrap()),
                None,
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
        let pool = Pool::new(
            &Upstream {
                name: "pass".to_owned(),
                target: Target::OriginalDestination,
                bind: Bind::Proxy,
                proxy_protocol: None,
                tls: None,
                balancing: Default::default(),
            },
            &health::Registry::default(),
        )
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
                    plain,
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
        let pool = Pool::new(
            &Upstream {
                name: "v6".to_owned(),
                target: Target::Servers(vec!["[2001:db8:5::2]:80".parse().unwrap()]),
                bind: Bind::ClientIp,
                proxy_protocol: None,
                tls: None,
                balancing: Default::default(),
            },
            &health::Registry::default(),
        )
        .unwrap();
        let refused = pool
            .connect(
                &request("192.0.2.7:40000", "192.0.2.10:80", Bind::ClientIp),
                &local,
                Duration::from_secs(1),
                plain,
            )
            .await
            .err()
            .expect("no IPv4 server to connect to");
        assert!(
            matches!(
                refused,
                ConnectError::NoServerOfFamily { family: "IPv4", .. }
            ),
            "{refused}"
        );
    }

    /// A tunnel's addresses of the other family than a fixed source's are
    /// not tried: a connection is made in the source's family.
    #[tokio::test]
    async fn a_fixed_source_tries_only_the_destinations_of_its_family() {
        let local = LocalAddrs::load(None).await.unwrap();
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let v6 = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let bind = Bind::Address("127.0.0.1".parse().unwrap());
        let pool = Pool::new(
            &Upstream {
                name: "tunnels".to_owned(),
                target: Target::OriginalDestination,
                bind,
                proxy_protocol: None,
                tls: None,
                balancing: Default::default(),
            },
            &health::Registry::default(),
        )
        .unwrap();
        let tunnel = |checked: Vec<SocketAddr>| Request {
            orig_dst: OrigDstAddr(checked[0]),
            checked,
            ..request("192.0.2.7:40000", "192.0.2.10:80", bind)
        };
        let both = tunnel(vec![v6.local_addr().unwrap(), v4.local_addr().unwrap()]);
        let connected = pool
            .connect(&both, &local, Duration::from_secs(1), plain)
            .await
            .unwrap();
        assert_eq!(connected.upstream.0, v4.local_addr().unwrap());
        let v6_only = tunnel(vec![v6.local_addr().unwrap(), v6.local_addr().unwrap()]);
        let refused = pool
            .connect(&v6_only, &local, Duration::from_secs(1), plain)
            .await
            .err()
            .expect("no IPv4 destination");
        assert!(
            matches!(
                refused,
                ConnectError::NoServerOfFamily {
                    family: "IPv4",
                    from: "the upstream's fixed source address"
                }
            ),
            "{refused}"
        );
    }

    /// Nothing made over the connection: a pool without `tls`.
    async fn plain(stream: Stream, _: UpstreamAddr) -> Result<Stream, Unsecured> {
        Ok(stream)
    }

    /// A pool of `servers` on loopback, its upstream written as in a
    /// policy (`fields` after `servers`).
    fn pool_of(servers: &[SocketAddr], fields: &str, health: &health::Registry) -> Pool {
        let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        let policy = crate::policy::Policy::from_json(&format!(
            r#"{{ "intercept": [ {{ "name": "r", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "u" }} ],
                 "upstreams": {{ "u": {{ "servers": [{}] {fields} }} }} }}"#,
            servers.join(", ")
        ))
        .unwrap();
        Pool::new(&policy.upstreams[0], health).unwrap()
    }

    /// Addresses on loopback that refuse connections: listeners bound and
    /// closed again.
    async fn refusing(count: usize) -> Vec<SocketAddr> {
        let mut addresses = Vec::new();
        for _ in 0..count {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addresses.push(listener.local_addr().unwrap());
        }
        addresses
    }

    #[tokio::test]
    async fn failed_connects_are_retried_retries_times_and_observed() {
        let local = LocalAddrs::load(None).await.unwrap();
        let registry = health::Registry::default();
        let servers = refusing(4).await;
        let pool = pool_of(
            &servers,
            r#", "retries": 1, "observe": { "errors": 1 }"#,
            &registry,
        );
        let request = request("192.0.2.7:40000", "192.0.2.10:80", Bind::Proxy);
        let failed = pool
            .connect(&request, &local, Duration::from_secs(1), plain)
            .await
            .err()
            .expect("every server refuses");
        assert!(matches!(failed, ConnectError::Failed { .. }), "{failed}");
        // Two tried (the first and one retry), each marked down at its
        // first error, and each failure counted against its server.
        let down = |pool: &Pool| pool.servers_state().iter().filter(|s| !s.health.up).count();
        assert_eq!(down(&pool), 2);
        let failed_connects = |pool: &Pool| {
            let state = pool.servers_state();
            state
                .iter()
                .map(|s| s.health.failed_connects)
                .collect::<Vec<_>>()
        };
        let mut counted = failed_connects(&pool);
        counted.sort();
        assert_eq!(counted, [0, 0, 1, 1]);
        // No lease outlives its failed attempt.
        assert!(pool.servers_state().iter().all(|s| s.health.active == 0));
        pool.connect(&request, &local, Duration::from_secs(1), plain)
            .await
            .err()
            .expect("every server refuses");
        assert_eq!(down(&pool), 4);
        let refused = pool
            .connect(&request, &local, Duration::from_secs(1), plain)
            .await
            .err()
            .expect("every server is down");
        assert!(refused.all_down(), "{refused}");
        assert_eq!(refused.to_string(), r#"no server of upstream "u" is up"#);
    }

    /// Without observation too, a failure a retry hides is counted against
    /// its server (the connection's own counters see only its success).
    #[tokio::test]
    async fn a_failure_another_server_hides_is_counted_against_its_server() {
        let local = LocalAddrs::load(None).await.unwrap();
        let registry = health::Registry::default();
        let refusing = refusing(1).await[0];
        let listening = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listening.local_addr().unwrap();
        let pool = pool_of(&[refusing, good], "", &registry);
        let request = request("192.0.2.7:40000", "192.0.2.10:80", Bind::Proxy);
        // Round robin tries each first once.
        for _ in 0..2 {
            let connected = pool
                .connect(&request, &local, Duration::from_secs(1), plain)
                .await
                .expect("the listening server, tried next");
            assert_eq!(connected.upstream.0, good);
        }
        let counted: Vec<(SocketAddr, u64, bool)> = pool
            .servers_state()
            .iter()
            .map(|s| (s.address, s.health.failed_connects, s.health.up))
            .collect();
        assert_eq!(counted, [(refusing, 1, true), (good, 0, true)]);
    }

    #[tokio::test]
    async fn tls_that_fails_is_the_servers_failure_and_the_next_is_tried() {
        let local = LocalAddrs::load(None).await.unwrap();
        let registry = health::Registry::default();
        let bad = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (bad, good) = (bad.local_addr().unwrap(), good.local_addr().unwrap());
        let pool = pool_of(&[bad, good], r#", "observe": { "errors": 1 }"#, &registry);
        let request = request("192.0.2.7:40000", "192.0.2.10:80", Bind::Proxy);
        let failing = |fault| {
            move |stream: Stream, upstream: UpstreamAddr| async move {
                if upstream.0 == bad {
                    Err(Unsecured {
                        error: "invalid peer certificate: Expired".to_owned(),
                        fault,
                    })
                } else {
                    Ok(stream)
                }
            }
        };
        let secure = failing(Fault::Server);
        // Round robin starts with one, then the other: one of the two
        // picks the bad server first.
        for _ in 0..2 {
            let connected = pool
                .connect(&request, &local, Duration::from_secs(1), secure)
                .await
                .expect("the good server, tried next");
            assert_eq!(connected.upstream.0, good);
        }
        let state = pool.servers_state();
        assert!(!state[0].health.up, "{:?}", state[0].health);
        assert!(state[1].health.up, "{:?}", state[1].health);
        assert_eq!(state[0].health.failed_connects, 1, "{:?}", state[0].health);
        assert_eq!(state[1].health.failed_connects, 0, "{:?}", state[1].health);

        // A registry of its own: the first one has the bad server down.
        let pool = pool_of(&[bad], "", &health::Registry::default());
        let failed = pool
            .connect(&request, &local, Duration::from_secs(1), secure)
            .await
            .err()
            .expect("TLS fails");
        assert_eq!(failed.secure_fault(), Some(Fault::Server), "{failed}");
        assert_eq!(failed.upstream(), Some(UpstreamAddr(bad)));
        assert_eq!(failed.to_string(), "invalid peer certificate: Expired");

        // What the client asked for, or this host could not do, fails alike
        // everywhere: no other server is tried, and the server is not
        // counted as failed.
        for fault in [Fault::Client, Fault::ThisHost] {
            let registry = health::Registry::default();
            let pool = pool_of(&[bad, good], r#", "observe": { "errors": 1 }"#, &registry);
            let mut failed = Vec::new();
            for _ in 0..2 {
                let outcome = pool
                    .connect(&request, &local, Duration::from_secs(1), failing(fault))
                    .await;
                failed.extend(outcome.err().and_then(|e| e.upstream()));
            }
            // Round robin picked the bad server first once, and stopped there.
            assert_eq!(failed, [UpstreamAddr(bad)], "{fault:?}");
            assert!(
                pool.servers_state()
                    .iter()
                    .all(|s| s.health.up && s.health.failed_connects == 0),
                "{fault:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_connection_counts_on_its_server_while_its_lease_is_held() {
        let local = LocalAddrs::load(None).await.unwrap();
        let registry = health::Registry::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut servers = refusing(1).await;
        servers.push(listener.local_addr().unwrap());
        let pool = pool_of(
            &servers,
            r#", "balance": "least-connections", "observe": { "errors": 2 }"#,
            &registry,
        );
        let request = request("192.0.2.7:40000", "192.0.2.10:80", Bind::Proxy);
        let mut held = Vec::new();
        for _ in 0..3 {
            let connected = pool
                .connect(&request, &local, Duration::from_secs(1), plain)
                .await
                .expect("the listening server");
            assert_eq!(connected.upstream.0, servers[1]);
            held.push(connected);
        }
        let state = pool.servers_state();
        assert_eq!(state[1].health.active, 3);
        // The refusing one was tried first (idle, least loaded) until
        // observation took it down.
        assert!(!state[0].health.up, "{state:?}");
        held.truncate(1);
        assert_eq!(pool.servers_state()[1].health.active, 1);
    }

    /// Whether the server has a connection to accept within `wait`: it
    /// has one only once the handshake's last ACK reached it.
    async fn accepted(listener: &tokio::net::TcpListener, wait: Duration) -> Option<TcpStream> {
        tokio::time::timeout(wait, listener.accept())
            .await
            .ok()
            .map(|accepted| accepted.unwrap().0)
    }

    /// Well inside the kernel's 200 ms delayed-ACK timer, which would send
    /// a held ACK by itself; and far beyond loopback's handshake.
    const WELL_BEFORE_THE_KERNEL: Duration = Duration::from_millis(100);

    /// A server, and a connection to it, its handshake's ACK held or not.
    async fn connection(hold_ack: bool) -> (tokio::net::TcpListener, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = UpstreamAddr(listener.local_addr().unwrap());
        let stream = connect_one(to, Source::Kernel, Keepalive::Off, hold_ack)
            .await
            .unwrap();
        (listener, stream)
    }

    #[tokio::test]
    async fn a_held_handshake_ack_rides_on_the_first_bytes() {
        let (listener, _plain) = connection(false).await;
        assert!(
            accepted(&listener, WELL_BEFORE_THE_KERNEL).await.is_some(),
            "without holding, the handshake completes at once"
        );

        let (listener, held) = connection(true).await;
        assert!(
            accepted(&listener, WELL_BEFORE_THE_KERNEL).await.is_none(),
            "the server has no connection while its last ACK is held"
        );
        held.try_write(b"first").unwrap();
        let server = accepted(&listener, Duration::from_secs(5))
            .await
            .expect("the first bytes carry the ACK");
        // The bytes came with it, and the socket acknowledges as usual
        // afterwards (no delayed-ACK mode that would stall a Nagle server).
        server.readable().await.unwrap();
        let mut got = [0u8; 8];
        assert_eq!(server.try_read(&mut got).unwrap(), 5);
        assert!(SockRef::from(&held).tcp_quickack().unwrap());
    }

    /// Off is the new socket's own state (no `setsockopt` for it); probes
    /// are set as asked.
    #[tokio::test]
    async fn an_upstream_connection_has_the_keepalive_asked_for() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = UpstreamAddr(listener.local_addr().unwrap());
        let off = connect_one(to, Source::Kernel, Keepalive::Off, false)
            .await
            .unwrap();
        assert!(!SockRef::from(&off).keepalive().unwrap());
        let probe = Keepalive::Probe {
            idle: 30,
            interval: 5,
            count: 3,
        };
        let probing = connect_one(to, Source::Kernel, probe, false).await.unwrap();
        let socket = SockRef::from(&probing);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
    }

    #[tokio::test]
    async fn a_released_ack_completes_the_handshake_without_bytes() {
        let (listener, held) = connection(true).await;
        release_ack(&held).unwrap();
        assert!(
            accepted(&listener, WELL_BEFORE_THE_KERNEL).await.is_some(),
            "the released ACK reached the server"
        );
    }
}
