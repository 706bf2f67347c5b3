//! The CONNECT front end: a client of an explicit proxy asks for its
//! destination with an HTTP/1.1 `CONNECT host:port` head, which is read,
//! checked against the rule's `connect` and taken off the stream; what the
//! client sent after it (the tunnel's first bytes) stays queued, untouched,
//! until the tunnel is open.
//!
//! A name is resolved once, here (`lookup`), within the rule's deadline, and every
//! address it resolved to is checked: the addresses the upstream stage
//! connects to are exactly the ones checked (no second resolution for a
//! rebinding DNS server to answer differently). This host, loopback,
//! link-local and unspecified addresses are refused unless the rule allows
//! them by prefix (`allow_reserved`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    connect_head::{self, HeadError, Host, Method, Request, Status},
    credentials::{self, Checked},
    hello::{self, GaveUp, Look},
    local_addrs::{self, LocalAddrs},
    lookup::{self, LookupError},
    policy::{ConnectFront, Htpasswd, no_tcp_to},
    sniff::Sniffed,
    stream::Stream,
    upstream,
};

/// What a CONNECT client asked for, checked.
#[derive(Debug)]
pub struct Tunnel {
    /// The name asked for, if it was a name (lower case, no trailing dot).
    pub name: Option<String>,
    /// The addresses allowed for it, in the order to try them: the
    /// client's family first, then alternating (RFC 8305 §4).
    pub addresses: Vec<SocketAddr>,
    /// Who the client said it is, when the rule asks.
    pub user: Option<String>,
}

/// Why a CONNECT request was not taken. Each maps to the answer the client
/// gets, if any.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("bad CONNECT request: {0}")]
    BadRequest(HeadError),
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("client not allowed by the rule's clients")]
    Client,
    #[error("no credentials")]
    NoCredentials,
    #[error("wrong credentials for user {0:?}")]
    WrongCredentials(String),
    #[error("port {0} not allowed by the rule's ports")]
    Port(u16),
    #[error("name {0} not allowed by the rule's names")]
    Name(String),
    #[error("destination {0} refused: {1}")]
    Destination(IpAddr, &'static str),
    #[error("{name} resolves only to refused addresses ({first}: {why})")]
    Resolved {
        name: String,
        first: IpAddr,
        why: &'static str,
    },
    #[error("resolving {0}: {1}")]
    Resolve(String, io::Error),
    #[error("resolving {0}: no answer within {1:?}")]
    ResolveTimeout(String, Duration),
    #[error("no complete CONNECT request within {0:?}")]
    HeadTimeout(Duration),
    #[error("client closed before a complete CONNECT request")]
    Closed,
    #[error("client error while reading the CONNECT request: {0}")]
    Io(#[from] io::Error),
    #[error("no password check free within {0:?}")]
    ChecksBusy(Duration),
}

impl Refused {
    /// The answer the client gets; `None`: it is closed without one (it
    /// never finished asking, or is gone).
    pub fn status(&self) -> Option<Status> {
        Some(match self {
            Refused::BadRequest(HeadError::UnsupportedVersion) => Status::VersionNotSupported,
            Refused::BadRequest(_) => Status::BadRequest,
            Refused::Method(_) => Status::MethodNotAllowed,
            Refused::NoCredentials | Refused::WrongCredentials(_) => {
                Status::ProxyAuthenticationRequired
            }
            Refused::Client
            | Refused::Port(_)
            | Refused::Name(_)
            | Refused::Destination(..)
            | Refused::Resolved { .. } => Status::Forbidden,
            Refused::Resolve(..) => Status::BadGateway,
            Refused::ResolveTimeout(..) => Status::GatewayTimeout,
            Refused::ChecksBusy(_) => Status::ServiceUnavailable,
            Refused::HeadTimeout(_) | Refused::Closed | Refused::Io(_) => return None,
        })
    }

    /// The connection's outcome in logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Refused::BadRequest(_)
            | Refused::Method(_)
            | Refused::HeadTimeout(_)
            | Refused::Closed
            | Refused::Io(_) => "client_failed",
            Refused::Client
            | Refused::NoCredentials
            | Refused::WrongCredentials(_)
            | Refused::Port(_)
            | Refused::Name(_)
            | Refused::Destination(..)
            | Refused::Resolved { .. } => "refused",
            Refused::Resolve(..) => "connect_failed",
            Refused::ResolveTimeout(..) => "connect_timeout",
            Refused::ChecksBusy(_) => "limited",
        }
    }
}

/// Reads the client's CONNECT head within `deadline`, takes it off the
/// stream and checks what it asks for against `front`. `asked` gets what
/// the head asks for (`host:port`) as soon as it is read, so that a
/// refusal's log names it too.
pub async fn open(
    client: &mut Stream,
    peer: IpAddr,
    front: &ConnectFront,
    local: &LocalAddrs,
    deadline: Duration,
    asked: &mut Option<String>,
) -> Result<Tunnel, Refused> {
    let request = read_head(client, deadline).await?;
    if let (Method::Connect, Some(target)) = (&request.method, &request.target) {
        *asked = Some(target.to_string());
    }
    if !front.admits(peer) {
        return Err(Refused::Client);
    }
    let target = match (request.method, request.target) {
        (Method::Connect, Some(target)) => target,
        (Method::Other(method), _) => return Err(Refused::Method(method)),
        (Method::Connect, None) => unreachable!("the parser gives every CONNECT its target"),
    };
    let user = match &front.users {
        Some(users) => {
            let authorization = request.proxy_authorization.as_deref();
            Some(authenticate(users, authorization, peer, deadline).await?)
        }
        None => None,
    };
    listed(front, &target)?;
    let port = target.port;
    let prefer_v4 = peer.to_canonical().is_ipv4();
    let is_local = |ip| local.contains(ip);
    match target.host {
        Host::Ip(ip) => {
            let ip = ip.to_canonical();
            allowed(front, ip, is_local, kernel_route)
                .map_err(|why| Refused::Destination(ip, why))?;
            let addr = SocketAddr::new(ip, port);
            Ok(Tunnel {
                name: None,
                addresses: vec![addr],
                user,
            })
        }
        Host::Name(name) => {
            let resolved = match lookup::resolve(peer, &name, port, front.resolve_timeout).await {
                Ok(resolved) => resolved,
                Err(LookupError::Failed(e)) => return Err(Refused::Resolve(name, e)),
                Err(LookupError::Timeout) => {
                    return Err(Refused::ResolveTimeout(name, front.resolve_timeout));
                }
            };
            let mut refused = None;
            // The first 16 of each family are checked, and of those that
            // pass no more than 16 are tried: a name with thousands of
            // addresses would cost a route query each. (One whose first 16
            // of a family are all refused is refused, where a later one
            // might have passed.)
            let checked: Vec<SocketAddr> = first_of_each_family(resolved, upstream::MAX_ADDRESSES)
                .filter(
                    |addr| match allowed(front, addr.ip(), is_local, kernel_route) {
                        Ok(()) => true,
                        Err(why) => {
                            refused.get_or_insert((addr.ip(), why));
                            false
                        }
                    },
                )
                .collect();
            if checked.is_empty() {
                let (first, why) =
                    refused.unwrap_or((IpAddr::V4(Ipv4Addr::UNSPECIFIED), "no address"));
                return Err(Refused::Resolved { name, first, why });
            }
            Ok(Tunnel {
                name: Some(name),
                addresses: happy_eyeballs_order(checked, prefer_v4),
                user,
            })
        }
    }
}

/// The first `most` addresses of each family, in their order.
fn first_of_each_family(
    addresses: Vec<SocketAddr>,
    most: usize,
) -> impl Iterator<Item = SocketAddr> {
    let (mut v4, mut v6) = (0, 0);
    addresses.into_iter().filter(move |addr| {
        let seen = if addr.ip().to_canonical().is_ipv4() {
            &mut v4
        } else {
            &mut v6
        };
        *seen += 1;
        *seen <= most
    })
}

/// Reads the client's head within `deadline` and takes it off the stream,
/// leaving what follows it queued. It nearly always comes whole; when it
/// comes in pieces, each is taken as it comes (every byte before the head's
/// end is the head's) and acknowledged at once: the listener delays ACKs
/// (`install::set_inherited`), and a client that holds its next small piece
/// until the last one is acknowledged (Nagle) would wait for the kernel's
/// delayed-ACK timer.
async fn read_head(client: &mut Stream, deadline: Duration) -> Result<Request, Refused> {
    let give_up = Instant::now() + deadline;
    // The pieces taken so far, then the one looked at.
    let mut head: Vec<u8> = Vec::new();
    let mut reader = connect_head::Reader::default();
    loop {
        let taken = head.len();
        let limit = connect_head::MAX_HEAD_LEN - taken;
        let mut seen = 0;
        // Always a verdict: a head still incomplete is a piece to take.
        let verdict = client
            .peek_until(
                limit,
                give_up.saturating_duration_since(Instant::now()),
                |bytes| {
                    seen = bytes.len();
                    head.truncate(taken);
                    head.extend_from_slice(bytes);
                    Look::Verdict(reader.read(&head))
                },
            )
            .await?;
        match verdict {
            Ok(Ok(Some(request))) => {
                let len = request.head_len - taken;
                client
                    .consume(len, hello::nothing_follows(len, seen, limit))
                    .await?;
                return Ok(request);
            }
            Ok(Ok(None)) => {
                // The piece is in `head` already.
                client.consume(seen, true).await?;
                if let Err(e) = upstream::release_ack(client.tcp()) {
                    tracing::debug!(error = %e, "acknowledging a piece of a CONNECT head");
                }
            }
            Ok(Err(e)) => return Err(Refused::BadRequest(e)),
            Err(GaveUp::Timeout) => return Err(Refused::HeadTimeout(deadline)),
            Err(GaveUp::Closed) => return Err(Refused::Closed),
            // The head's classifier answers at each line: never in more
            // pieces than the most looks.
            Err(GaveUp::TooLarge | GaveUp::TooManyPieces) => {
                return Err(Refused::BadRequest(HeadError::TooLarge));
            }
        }
    }
}

/// The user a `Proxy-Authorization: Basic` value names, if its password is
/// right (see `credentials`).
async fn authenticate(
    users: &Htpasswd,
    authorization: Option<&str>,
    client: IpAddr,
    deadline: Duration,
) -> Result<String, Refused> {
    let (user, password) = authorization
        .and_then(connect_head::basic_credentials)
        .ok_or(Refused::NoCredentials)?;
    match credentials::check(users, &user, &password, client, deadline).await {
        Checked::Right => Ok(user),
        Checked::Wrong => Err(Refused::WrongCredentials(as_logged(user))),
        Checked::Busy => Err(Refused::ChecksBusy(deadline)),
    }
}

/// A user name a client sent, as its refusal's log shows it: the client
/// chose it (any length its head allows), so at most [`LOGGED_USER`]
/// characters of it.
fn as_logged(mut user: String) -> String {
    if let Some((cut, _)) = user.char_indices().nth(LOGGED_USER) {
        user.truncate(cut);
        user.push('…');
    }
    user
}

/// The characters of a refused user name that are logged.
const LOGGED_USER: usize = 64;

/// 169.254.0.0/16 and fe80::/10: link-local, where cloud metadata services
/// answer (169.254.169.254).
const LINK_LOCAL: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16)),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
    )),
];

/// Cloud services outside link-local that hand out an instance's
/// credentials or configuration to whoever asks from it: AWS's IPv6
/// metadata endpoint and its EKS Pod Identity agent, Google Cloud's IPv6
/// metadata endpoint, Scaleway's, Alibaba Cloud's, Oracle Cloud Classic's
/// and Azure's WireServer. A tunnel from a proxy on the instance would hand
/// them to any client.
const METADATA: [IpAddr; 7] = [
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
    IpAddr::V6(Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x42, 0, 0, 0, 0, 0, 0x42)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
];

/// Whether the rule's lists let a tunnel go to `target`, before anything
/// is resolved or asked of this host: its port, and a name in `names`, or
/// an address where the rule does not take names only (one that names the
/// names it allows allows no bare address, unless it names the prefixes
/// too).
pub fn listed(front: &ConnectFront, target: &connect_head::Target) -> Result<(), Refused> {
    if !front.ports.iter().any(|ports| ports.contains(target.port)) {
        return Err(Refused::Port(target.port));
    }
    match &target.host {
        Host::Ip(ip) if front.names.is_some() && front.destinations.is_none() => Err(
            Refused::Destination(ip.to_canonical(), "only names are allowed"),
        ),
        Host::Name(name)
            if front
                .names
                .as_ref()
                .is_some_and(|names| !names.iter().any(|pattern| pattern.matches(name))) =>
        {
            Err(Refused::Name(name.clone()))
        }
        _ => Ok(()),
    }
}

/// Whether a tunnel may go to `ip`, and why not. `is_local`: whether it is
/// this host's. `routed_locally` is asked last, of an address that passed
/// everything else: whether the kernel's routing delivers it here
/// ([`kernel_route`]), and why not.
pub fn allowed(
    front: &ConnectFront,
    ip: IpAddr,
    is_local: impl Fn(IpAddr) -> bool,
    routed_locally: impl Fn(IpAddr) -> Result<(), &'static str>,
) -> Result<(), &'static str> {
    let allowed_reserved = front.allow_reserved.iter().any(|p| p.contains(&ip));
    if !allowed_reserved {
        if ip.is_unspecified() || no_tcp_to(ip) {
            return Err("not a unicast address");
        }
        if ip.is_loopback() {
            return Err("loopback");
        }
        if LINK_LOCAL.iter().any(|p| p.contains(&ip)) {
            return Err("link-local");
        }
        if METADATA.contains(&ip) {
            return Err("a cloud metadata service");
        }
        if is_local(ip) {
            return Err("this host's address");
        }
    }
    if let Some(destinations) = &front.destinations
        && !destinations.iter().any(|p| p.contains(&ip))
    {
        return Err("outside the rule's destinations");
    }
    if allowed_reserved {
        return Ok(());
    }
    routed_locally(ip)
}

/// Refuses an address the kernel routes to this host without it being an
/// interface's (a prefix an operator made local: AnyIP), asking the
/// kernel; an address whose route cannot be asked is refused too.
fn kernel_route(ip: IpAddr) -> Result<(), &'static str> {
    match local_addrs::routed_here(ip) {
        Ok(false) => Ok(()),
        Ok(true) => Err("this host's address"),
        Err(e) => {
            if let Some(count) = UNASKED_ROUTES.event() {
                tracing::warn!(%ip, error = %e, count, "asking the kernel's route to a tunnel's address");
            }
            Err("its route could not be read")
        }
    }
}

/// Route queries that failed, for a throttled warning.
static UNASKED_ROUTES: crate::logging::Throttle =
    crate::logging::Throttle::new(std::time::Duration::from_secs(1));

/// RFC 8305 §4: the preferred family first, then the families alternate,
/// each in the resolver's order.
fn happy_eyeballs_order(addrs: Vec<SocketAddr>, prefer_v4: bool) -> Vec<SocketAddr> {
    let (first, second): (Vec<_>, Vec<_>) =
        addrs.into_iter().partition(|a| a.is_ipv4() == prefer_v4);
    let mut ordered = Vec::with_capacity(first.len() + second.len());
    let (mut first, mut second) = (first.into_iter(), second.into_iter());
    loop {
        match (first.next(), second.next()) {
            (None, None) => return ordered,
            (a, b) => ordered.extend(a.into_iter().chain(b)),
        }
    }
}

/// Why the tunnel to `name` of a rule that refuses domain fronting is
/// refused, if it is. Its first bytes must name that server: a
/// ClientHello's server name, or an HTTP request's Host. Bytes that name
/// none (a ClientHello without one, another protocol, a hello the sniffer
/// could not parse, or nothing read within the sniff deadline) cannot be
/// checked, and are refused too: otherwise a client could wait out the
/// deadline, or send a hello only its server parses, and front at will.
pub fn fronting(name: &str, said: &Sniffed, gave_up: Option<GaveUp>) -> Option<String> {
    let (what, named) = match (gave_up, said) {
        (Some(gave_up), _) => {
            return Some(format!(
                "domain fronting not ruled out: the tunnel's first bytes were not read ({}), so their server name is unknown",
                gave_up.as_str()
            ));
        }
        (None, Sniffed::Tls(hello)) => ("TLS server name", hello.sni.as_deref()),
        (None, Sniffed::Http(request)) => ("HTTP Host", request.host.as_deref()),
        (None, Sniffed::Other) => {
            return Some(
                "domain fronting not ruled out: the tunnel's first bytes are not a ClientHello or an HTTP request that names a host, so they name no server".to_owned(),
            );
        }
    };
    match named {
        Some(named) if named.eq_ignore_ascii_case(name) => None,
        Some(named) => Some(format!(
            "domain fronting: {what} {named} differs from the CONNECT name {name}"
        )),
        None => Some(format!(
            "domain fronting not ruled out: no {what} to compare with the CONNECT name {name}"
        )),
    }
}

/// Sends `status` to the client; an error answer also ends the connection
/// ([`Stream::answer_and_close`]).
pub async fn answer(client: &mut Stream, status: Status) -> io::Result<()> {
    let head = connect_head::answer(status);
    if status == Status::Established {
        client.send(head).await
    } else {
        client.answer_and_close(head).await
    }
}

#[cfg(test)]
mod tests {
    use socket2::SockRef;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    #[test]
    fn only_the_addresses_that_may_be_tried_are_checked() {
        let v4 = |i: u8| SocketAddr::from(([203, 0, 113, i], 443));
        let v6 = |i: u16| SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, i], 443));
        let resolved: Vec<SocketAddr> = (1..=40).flat_map(|i| [v4(i), v6(u16::from(i))]).collect();
        let kept: Vec<SocketAddr> = first_of_each_family(resolved, 3).collect();
        assert_eq!(kept, [v4(1), v6(1), v4(2), v6(2), v4(3), v6(3)]);
    }
    use crate::{install, policy::Keepalive};

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    const HEAD: &[u8] = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n";

    #[test]
    fn credentials_that_found_no_check_free_get_a_503() {
        let refused = Refused::ChecksBusy(Duration::from_secs(10));
        assert_eq!(refused.status(), Some(Status::ServiceUnavailable));
    }

    #[test]
    fn a_refused_user_name_is_logged_short() {
        assert_eq!(as_logged("alice".to_owned()), "alice");
        let long = "é".repeat(10_000);
        let logged = as_logged(long);
        assert_eq!(logged.chars().count(), LOGGED_USER + 1);
        assert!(logged.ends_with("é…"));
    }

    #[test]
    fn only_first_bytes_that_name_the_connect_name_rule_out_fronting() {
        use crate::sniff::{ClientHelloInfo, HttpRequestInfo};
        let tls = |sni: Option<&str>| {
            Sniffed::Tls(ClientHelloInfo {
                sni: sni.map(String::from),
                alpn: Vec::new(),
            })
        };
        let http = |host: Option<&str>| {
            Sniffed::Http(HttpRequestInfo {
                method: "GET".to_owned(),
                host: host.map(String::from),
            })
        };
        let name = "app.example.test";
        assert_eq!(fronting(name, &tls(Some(name)), None), None);
        assert_eq!(fronting("App.Example.Test", &tls(Some(name)), None), None);
        assert_eq!(fronting(name, &http(Some(name)), None), None);
        for (said, gave_up, why) in [
            (
                tls(Some("other.example.test")),
                None,
                "TLS server name other.example.test differs",
            ),
            (
                http(Some("other.example.test")),
                None,
                "HTTP Host other.example.test differs",
            ),
            (tls(None), None, "no TLS server name"),
            (http(None), None, "no HTTP Host"),
            (
                Sniffed::Other,
                None,
                "not a ClientHello or an HTTP request that names a host",
            ),
            // What the sniffer makes of a client that waited out the
            // deadline, or sent more than it reads, whatever came later.
            (
                Sniffed::Other,
                Some(GaveUp::Timeout),
                "not read (sniff timeout)",
            ),
            (
                Sniffed::Other,
                Some(GaveUp::TooLarge),
                "not read (sniff size limit)",
            ),
        ] {
            let refused = fronting(name, &said, gave_up);
            assert!(
                refused.as_deref().is_some_and(|r| r.contains(why)),
                "{said:?} {gave_up:?}: {refused:?}"
            );
        }
    }

    /// What [`head_in`] saw on the listener's end.
    struct HeadRead {
        target: String,
        /// The socket left delayed-ACK mode.
        quick: bool,
        /// The bytes left queued after the head.
        after: Vec<u8>,
        /// From the first piece written to the head read.
        took: Duration,
    }

    /// Writes `pieces` as a client of a CONNECT listener (with Nagle's
    /// algorithm, as a client without `TCP_NODELAY`), then `early`, and
    /// reads the head on the listener's end.
    async fn head_in(pieces: &[&[u8]], early: &[u8]) -> HeadRead {
        let listener = install::listen(sa("127.0.0.1:0"), Keepalive::Off, install::Role::Connect);
        let listener = TcpListener::from_std(listener.unwrap()).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut proxy_end = Stream::Tcp(accepted);
        let reading = tokio::spawn(async move {
            let request = read_head(&mut proxy_end, Duration::from_secs(5)).await;
            (request.unwrap(), proxy_end)
        });
        let started = Instant::now();
        for piece in pieces {
            client.write_all(piece).await.unwrap();
        }
        client.write_all(early).await.unwrap();
        let (request, proxy_end) = reading.await.unwrap();
        let took = started.elapsed();
        let Stream::Tcp(mut proxy_end) = proxy_end else {
            unreachable!("a plain TCP stream stays one")
        };
        // Before the client's FIN, which puts the socket in delayed-ACK
        // mode; and the FIN not before, as it pushes out what Nagle holds.
        let quick = SockRef::from(&proxy_end).tcp_quickack().unwrap();
        client.shutdown().await.unwrap();
        let mut after = Vec::new();
        proxy_end.read_to_end(&mut after).await.unwrap();
        HeadRead {
            target: request.target.unwrap().to_string(),
            quick,
            after,
            took,
        }
    }

    #[tokio::test]
    async fn a_whole_head_leaves_its_ack_to_the_answer() {
        let read = head_in(&[HEAD], b"").await;
        assert_eq!(read.target, "a.example:443");
        assert!(!read.quick, "the head's ACK did not wait for the answer");
        assert_eq!(read.after, b"");
    }

    /// Each piece is acknowledged as it is taken, so a client holding the
    /// next small piece for that ACK (Nagle) does not wait for the kernel's
    /// delayed-ACK timer (40 ms; without the ACK every attempt takes that
    /// long at least, so one quick attempt of five shows it). What follows
    /// the head stays queued, exact.
    #[tokio::test]
    async fn a_head_in_pieces_is_taken_and_acknowledged_piece_by_piece() {
        let (line, rest) = HEAD.split_at(32);
        let (headers, end) = rest.split_at(10);
        let mut took = Vec::new();
        for _ in 0..5 {
            let read = head_in(&[line, headers, end], b"early bytes").await;
            assert_eq!(read.target, "a.example:443");
            assert_eq!(read.after, b"early bytes");
            took.push(read.took);
            if read.took < Duration::from_millis(30) {
                return;
            }
        }
        panic!("every head in pieces waited for the delayed-ACK timer: {took:?}");
    }

    #[test]
    fn the_clients_family_goes_first_then_they_alternate() {
        let resolved = vec![
            sa("[2001:db8::1]:443"),
            sa("[2001:db8::2]:443"),
            sa("192.0.2.1:443"),
            sa("[2001:db8::3]:443"),
        ];
        assert_eq!(
            happy_eyeballs_order(resolved.clone(), true),
            [
                sa("192.0.2.1:443"),
                sa("[2001:db8::1]:443"),
                sa("[2001:db8::2]:443"),
                sa("[2001:db8::3]:443"),
            ]
        );
        assert_eq!(
            happy_eyeballs_order(resolved, false),
            [
                sa("[2001:db8::1]:443"),
                sa("192.0.2.1:443"),
                sa("[2001:db8::2]:443"),
                sa("[2001:db8::3]:443"),
            ]
        );
    }

    #[tokio::test]
    async fn reserved_addresses_are_refused_unless_allowed_and_destinations_hold() {
        let local = LocalAddrs::load(None).await.unwrap();
        let policy = crate::policy::Policy::from_json(
            r#"{ "intercept": [ { "name": "c", "connect": { "listen": ["127.0.0.1:3128"],
                   "clients": ["198.51.100.0/24"], "allow_reserved": ["127.0.0.2/32"] } } ],
                 "upstreams": {} }"#,
        )
        .unwrap();
        let front = policy.rules[0].connect.as_ref().unwrap();
        // The kernel's routes, as a prefix made local (AnyIP) would have
        // them: asked last, and only of what passed everything else.
        let asked = std::cell::RefCell::new(Vec::new());
        let kernel = |ip: IpAddr| {
            asked.borrow_mut().push(ip);
            if "203.0.113.128/25"
                .parse::<ipnet::IpNet>()
                .unwrap()
                .contains(&ip)
            {
                Err("this host's address")
            } else {
                Ok(())
            }
        };
        for (ip, expected) in [
            ("127.0.0.1", Err("loopback")),
            ("::1", Err("loopback")),
            ("127.0.0.2", Ok(())),
            ("169.254.169.254", Err("link-local")),
            ("fe80::1", Err("link-local")),
            ("fd00:ec2::254", Err("a cloud metadata service")),
            ("fd00:ec2::23", Err("a cloud metadata service")),
            ("fd20:ce::254", Err("a cloud metadata service")),
            ("fd00:42::42", Err("a cloud metadata service")),
            ("100.100.100.200", Err("a cloud metadata service")),
            ("192.0.0.192", Err("a cloud metadata service")),
            ("168.63.129.16", Err("a cloud metadata service")),
            ("fd20:ce::253", Ok(())),
            ("100.100.100.201", Ok(())),
            ("0.0.0.0", Err("not a unicast address")),
            ("224.0.0.1", Err("not a unicast address")),
            ("203.0.113.7", Ok(())),
            ("203.0.113.200", Err("this host's address")),
        ] {
            assert_eq!(
                allowed(front, ip.parse().unwrap(), |ip| local.contains(ip), kernel),
                expected,
                "{ip}"
            );
        }
        let names: Vec<String> = asked.take().iter().map(IpAddr::to_string).collect();
        assert_eq!(
            names,
            [
                "fd20:ce::253",
                "100.100.100.201",
                "203.0.113.7",
                "203.0.113.200"
            ],
            "only what passed the rest is asked of the kernel, allowed reserved addresses never"
        );
        let mut limited = front.clone();
        limited.destinations = Some(vec!["203.0.113.0/24".parse().unwrap()]);
        assert_eq!(
            allowed(
                &limited,
                "203.0.113.7".parse().unwrap(),
                |ip| local.contains(ip),
                kernel
            ),
            Ok(())
        );
        assert_eq!(
            allowed(
                &limited,
                "192.0.2.7".parse().unwrap(),
                |ip| local.contains(ip),
                kernel
            ),
            Err("outside the rule's destinations")
        );
        // The kernel heard of the allowed one, never of the refused one.
        assert_eq!(asked.take(), ["203.0.113.7".parse::<IpAddr>().unwrap()]);
    }
}
