//! One client connection, from accept to close, front → decide → back →
//! relay: the client's limits; where it wants to go (its CONNECT request,
//! or a trusted front proxy's PROXY header, or the steered destination);
//! the route (sniffing the client's first bytes when a route needs them);
//! the upstream connection (direct, Happy Eyeballs, through a parent) and
//! its PROXY header; the relay with its deadlines; one log line when it
//! ends.

use std::{
    borrow::Cow,
    net::SocketAddr,
    sync::{Arc, RwLock, Weak},
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    addrs::{ClientAddr, OrigDstAddr, UpstreamAddr},
    admission::{Admission, Slot},
    conn_id::{ConnectionId, ConnectionIds},
    connect_head::Status,
    hello::{self, Look},
    intercept::rules::RuleIndex,
    local_addrs::LocalAddrs,
    metrics::{self, Metrics, PolicyMetrics},
    policy::{Bind, InterceptRule, Keepalive, Policy, RuleId, Target, Timeouts, UpstreamId},
    proxy_header,
    proxy_protocol::{self, Addresses, Header, Tlvs, Version},
    relay::{self, Deadlines},
    route, sniff,
    stream::{Stream, TlsInfo},
    tls::Terminators,
    tunnel,
    upstream::{self, Fallback, Fault, Pool, Unsecured},
};

/// The policy in force, with what is built from it once. A connection takes
/// the one in force when it is accepted and keeps it: a reload changes what
/// new connections get.
pub struct Active {
    pub policy: Policy,
    /// Its rules', routes' and upstreams' metrics.
    pub metrics: PolicyMetrics,
    /// The policy's rules, indexed as the kernel looks them up.
    pub rules: RuleIndex,
    pub pools: Vec<Pool>,
    pub terminators: Terminators,
}

impl Active {
    /// Builds what `policy` needs beyond its rule index: the upstreams'
    /// pools and every TLS configuration. An error names what could not be
    /// built (the policy is then refused).
    pub fn new(
        policy: Policy,
        rules: RuleIndex,
        metrics: &Metrics,
        health: &crate::health::Registry,
    ) -> Result<Active, String> {
        let pools = policy
            .upstreams
            .iter()
            .map(|upstream| Pool::new(upstream, health))
            .collect::<Result<_, _>>()?;
        let terminators = Terminators::new(&policy)?;
        Ok(Active {
            metrics: metrics.for_policy(&policy),
            rules,
            pools,
            terminators,
            policy,
        })
    }
}

/// What every connection shares.
pub struct Shared {
    pub active: RwLock<Arc<Active>>,
    /// The policy a reload is moving the kernel from or to, while it may
    /// still steer by it: the coming one until it is in force, then the
    /// replaced one, for clients steered before the kernel changed and
    /// accepted after (see [`Shared::rule_for`]). Weak: it does not keep a
    /// replaced policy, or what the kernel keeps for it, alive.
    pub other: RwLock<Weak<Active>>,
    pub local: Arc<LocalAddrs>,
    pub ids: ConnectionIds,
    pub connect_timeout: Duration,
    /// The deadline for a client's first bytes: its hello, or a front
    /// proxy's PROXY header.
    pub sniff_timeout: Duration,
    /// Cancelled when the grace period is over. Connections watch a child
    /// per accept loop (see [`serve`]).
    pub shutdown: CancellationToken,
    pub admission: Arc<Admission>,
    /// What rules and routes leave out: the daemon's flags.
    pub defaults: Defaults,
}

/// How a connection reached the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Front {
    /// Steered by the kernel: its local address is the original destination.
    Steered,
    /// On a CONNECT rule's listener: the client names its destination. With
    /// the listener's address when it is one address (not a wildcard): every
    /// client's local address, known without asking the kernel.
    Connect(Option<SocketAddr>),
}

/// The daemon's timeouts and keepalive, for connections of rules and routes
/// that do not set their own.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub timeouts: Timeouts,
    pub keepalive: Keepalive,
}

impl Shared {
    /// The policy in force now.
    pub fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts a new policy in force for the connections to come; the
    /// replaced one becomes the other.
    pub fn set_active(&self, active: Arc<Active>) {
        let replaced = std::mem::replace(
            &mut *self
                .active
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            active,
        );
        self.set_other(&replaced);
    }

    /// `coming` is about to be written to the kernel, which may steer by
    /// it before it is in force.
    pub fn announce(&self, coming: &Arc<Active>) {
        self.set_other(coming);
    }

    fn set_other(&self, other: &Arc<Active>) {
        *self
            .other
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::downgrade(other);
    }

    /// The policy and rule a connection to `local` is served under. The
    /// kernel steered it (or a listener took it), so a rule matched there:
    /// in the policy in force, or, while a reload changes the kernel's
    /// rules, in the other one. That is the one the kernel steered by when
    /// the client connected: a rule the reload adds steers before the new
    /// policy is in force, and a client of a rule it removes may wait in
    /// the accept queue until after.
    fn rule_for(&self, front: Front, local: SocketAddr) -> Option<(Arc<Active>, RuleId)> {
        let find = |active: &Active| match front {
            Front::Steered => active.rules.lookup(local),
            Front::Connect(_) => active.policy.connect_rule(local),
        };
        let active = self.active();
        if let Some(rule) = find(&active) {
            return Some((active, rule));
        }
        let other = self
            .other
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .upgrade()?;
        find(&other).map(|rule| (other, rule))
    }
}

/// Everything the close log line says, filled in as the connection goes.
/// An idle connection's task holds it: what only some connections have is
/// boxed (`fronted`, `sniffed`, the TLS), and the route's name is borrowed
/// when it is the default.
struct Record {
    started: Instant,
    conn_id: ConnectionId,
    client: ClientAddr,
    orig_dst: OrigDstAddr,
    /// A front proxy's header or a CONNECT request, when there was one.
    fronted: Option<Box<FrontRecord>>,
    rule_id: Option<RuleId>,
    upstream_id: Option<UpstreamId>,
    route: Option<Cow<'static, str>>,
    /// The client's TLS, when l4proxy terminated it.
    tls: Option<Box<TlsInfo>>,
    /// The upstream's TLS, when l4proxy originated it.
    upstream_tls: Option<Box<TlsInfo>>,
    sniffed: Option<Box<sniff::Sniffed>>,
    sniff_gave_up: Option<hello::GaveUp>,
    upstream: Option<UpstreamAddr>,
    bind: Option<Bind>,
    source: Option<SocketAddr>,
    bind_fallback: Option<Fallback>,
    from_client: u64,
    from_upstream: u64,
}

/// What the front stage learnt from a front proxy or a CONNECT client.
#[derive(Default)]
struct FrontRecord {
    /// The front proxy, when its PROXY header named the client.
    peer: Option<SocketAddr>,
    proxy_header: Option<&'static str>,
    /// What a CONNECT client asked for, as it wrote it, and who it said it
    /// is, when its rule asks.
    target: Option<String>,
    user: Option<String>,
}

/// A connection without a front proxy or a CONNECT request.
static NOT_FRONTED: FrontRecord = FrontRecord {
    peer: None,
    proxy_header: None,
    target: None,
    user: None,
};

/// `connection closed` at a level, with every field of a [`Record`].
macro_rules! closed {
    ($level:expr, $record:expr, $rule:expr, $outcome:expr, $error:expr) => {{
        // `display` is in scope inside tracing's macros.
        let r = $record;
        let fronted = r.fronted.as_deref().unwrap_or(&NOT_FRONTED);
        tracing::event!(
            $level,
            conn_id = %r.conn_id,
            client = %r.client,
            orig_dst = %r.orig_dst,
            peer = fronted.peer.map(display),
            proxy_header = fronted.proxy_header,
            rule = $rule,
            connect_target = fronted.target.as_deref(),
            user = fronted.user.as_deref(),
            route = r.route.as_deref(),
            tls_version = r.tls.as_ref().and_then(|t| t.version),
            tls_cipher = r.tls.as_ref().and_then(|t| t.cipher),
            tls_sni = r.tls.as_ref().and_then(|t| t.sni.as_deref()),
            tls_alpn = r.tls.as_ref().and_then(|t| t.alpn.as_deref()),
            client_cert = r.tls.as_ref().and_then(|t| t.peer_subject.as_deref()),
            upstream_tls_version = r.upstream_tls.as_ref().and_then(|t| t.version),
            upstream_tls_alpn = r.upstream_tls.as_ref().and_then(|t| t.alpn.as_deref()),
            sni = r.sniffed.as_deref().and_then(sni_of),
            host = r.sniffed.as_deref().and_then(host_of),
            alpn = r.sniffed.as_deref().and_then(alpn_of),
            sniff_gave_up = r.sniff_gave_up.map(hello::GaveUp::as_str),
            upstream = r.upstream.map(display),
            bind = r.bind.map(display),
            source = r.source.map(display),
            bind_fallback = r.bind_fallback.map(display),
            bytes_from_client = r.from_client,
            bytes_from_upstream = r.from_upstream,
            duration_ms = r.started.elapsed().as_millis() as u64,
            outcome = $outcome,
            error = $error.map(display),
            "connection closed"
        )
    }};
}

impl Record {
    /// A connection's record as it is accepted: nothing learnt yet.
    fn new(conn_id: ConnectionId, client: ClientAddr, orig_dst: OrigDstAddr) -> Record {
        Record {
            started: Instant::now(),
            conn_id,
            client,
            orig_dst,
            fronted: None,
            rule_id: None,
            upstream_id: None,
            route: None,
            tls: None,
            upstream_tls: None,
            sniffed: None,
            sniff_gave_up: None,
            upstream: None,
            bind: None,
            source: None,
            bind_fallback: None,
            from_client: 0,
            from_upstream: 0,
        }
    }

    /// What the client's TLS with l4proxy agreed, where l4proxy terminated
    /// it, unless that TLS is a CONNECT rule's (`hop_tls`): the hop to the
    /// proxy, whose name and protocol say nothing of the server the client
    /// asked for inside the tunnel.
    fn tls_inside(&self, hop_tls: bool) -> Option<&TlsInfo> {
        self.tls.as_deref().filter(|_| !hop_tls)
    }

    /// Logs the close line with `outcome` (one of `metrics::OUTCOMES`) and
    /// what went wrong, if anything, and counts the connection's end and
    /// bytes under its rule and upstream. A connection refused or failed
    /// before its relay is a warning; how a relayed one ended, or that no
    /// route wanted it, is not.
    fn end(&self, active: &Active, outcome: &'static str, error: Option<&dyn std::fmt::Display>) {
        let failed = matches!(
            outcome,
            "refused"
                | "client_failed"
                | "connect_failed"
                | "connect_timeout"
                | "upstream_tls_failed"
        );
        let rule = self.rule_id.map(|r| active.policy.rules[r.0].name.as_str());
        if failed {
            closed!(tracing::Level::WARN, self, rule, outcome, error);
        } else {
            closed!(tracing::Level::INFO, self, rule, outcome, error);
        }
        if let Some(rule) = self.rule_id {
            let rule = &active.metrics.rules[rule.0];
            rule.ended(outcome);
            rule.from_client.inc_by(self.from_client);
            rule.from_upstream.inc_by(self.from_upstream);
        }
        if let Some(upstream) = self.upstream_id {
            let upstream = &active.metrics.upstreams[upstream.0];
            upstream.from_client.inc_by(self.from_client);
            upstream.from_upstream.inc_by(self.from_upstream);
        }
    }
}

/// Relays one client connection (`peer`: its address, from accept) and logs
/// one line when it ends; `held` (what the caller counts the connection
/// with) is dropped then. `shutdown`: the end of the grace period (its
/// accept loop's child of [`Shared::shutdown`]). `TCP_NODELAY` comes
/// from the listener.
///
/// A plain function: the task, held for the connection's whole life, keeps
/// only the relay and what the close needs. The arguments and every step
/// before the relay (header, sniff, connect) are in a box that is freed
/// when the relay starts; an `async fn` would keep its arguments too.
pub fn serve(
    client: TcpStream,
    peer: SocketAddr,
    front: Front,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    held: impl Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let starting = Box::pin(start(client, peer, front, shared, shutdown.clone()));
    async move {
        let Some(Started {
            opened:
                Opened {
                    client,
                    upstream,
                    open,
                    deadlines,
                    slot,
                    lease,
                },
            mut record,
            active,
        }) = starting.await
        else {
            return; // `start` logged why.
        };
        let relayed = relay::relay_streams(client, upstream, deadlines, &shutdown).await;
        drop(slot);
        drop(open);
        drop(lease);
        record.from_client += relayed.from_client;
        record.from_upstream = relayed.from_upstream;
        let error = relayed.outcome.error();
        record.end(
            &active,
            relayed.outcome.kind(),
            error.as_ref().map(|e| e as &dyn std::fmt::Display),
        );
        drop(held);
    }
}

/// A connection ready to relay, with what its close needs.
struct Started {
    opened: Opened,
    record: Record,
    /// The policy it was accepted under.
    active: Arc<Active>,
}

/// The connection's record and everything before its relay ([`open`]);
/// `None` once it is refused or failed and logged.
async fn start(
    client: TcpStream,
    peer: SocketAddr,
    front: Front,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Option<Started> {
    let local = match front {
        Front::Connect(Some(listening)) => listening,
        _ => match client.local_addr() {
            Ok(local) => local,
            Err(_) => return None, // The client is already gone.
        },
    };
    let mut record = Record::new(shared.ids.next(), ClientAddr(peer), OrigDstAddr(local));
    let Some((active, rule_id)) = shared.rule_for(front, local) else {
        // Userspace disagreeing with the kernel would be a bug.
        tracing::error!(client = %peer, orig_dst = %local, ?front, "connection matches no rule; closing");
        return None;
    };
    // The grace period's end cuts a connection still being set up too (a
    // silent client, a server that does not answer): dropping `open` closes
    // its sockets.
    let opened = tokio::select! {
        opened = open(client, peer, rule_id, &shared, &active, &mut record) => opened?,
        () = shutdown.cancelled() => {
            let why = "the grace period ended before the connection was relayed";
            record.end(&active, "shut_down", Some(&why));
            return None;
        }
    };
    Some(Started {
        opened,
        record,
        active,
    })
}

/// A connection ready to relay.
struct Opened {
    client: Stream,
    upstream: Stream,
    /// Counts it as open under its rule and upstream until it ends (boxed:
    /// one pointer in every connection's task).
    open: Box<(metrics::Open, metrics::Open)>,
    deadlines: Deadlines,
    /// Held until the connection ends, when the client has limits.
    slot: Option<Slot>,
    /// Counts the connection on its server until it ends.
    lease: Option<upstream::Lease>,
}

/// Everything before the relay: the client's limits, the front stage
/// ([`front`]), the route, the upstream connection, its header and its TLS.
/// Returns both sides, or `None` once the connection is refused or failed
/// and logged.
async fn open(
    client: TcpStream,
    peer: SocketAddr,
    rule_id: RuleId,
    shared: &Shared,
    active: &Active,
    record: &mut Record,
) -> Option<Opened> {
    let rule = &active.policy.rules[rule_id.0];
    // A CONNECT rule's own TLS is the hop to the proxy: it names the proxy,
    // and what routes, the upstream and its header care for is inside the
    // tunnel (see `Record::tls_inside`).
    let hop_tls = rule.connect.is_some() && rule.terminate.is_some();
    record.rule_id = Some(rule_id);
    let rule_metrics = &active.metrics.rules[rule_id.0];
    rule_metrics.connections.inc();
    let rule_open = metrics::Open::new(&rule_metrics.active);

    // The client's limits: before a byte is read, unless a trusted front
    // proxy is still to name the client.
    let slot = if rule.trusts(peer.ip()) {
        None
    } else {
        Some(admit(&client, shared, active, rule, record)?)
    };
    let Fronted {
        mut client,
        tunnel,
        onward_local,
        named_slot,
    } = Box::pin(self::front(
        client,
        peer,
        (rule_id, rule),
        active,
        shared,
        record,
    ))
    .await?;
    let (target_name, checked) = match tunnel {
        Some(tunnel) => (tunnel.name, tunnel.addresses),
        None => (None, Vec::new()),
    };
    // A steered client sends when it likes; a CONNECT client once told the
    // tunnel is open.
    let mut established = rule.connect.is_none();

    // A client a trusted front proxy named was admitted once named.
    let slot = slot.unwrap_or(named_slot);
    let keepalive = rule.keepalive.unwrap_or(shared.defaults.keepalive);
    // The listener gave the client socket the daemon's keepalive.
    if keepalive != shared.defaults.keepalive
        && let Err(e) = upstream::set_keepalive(&socket2::SockRef::from(client.tcp()), keepalive)
    {
        tracing::warn!(error = %e, "setting the rule's keepalive on a client connection");
    }

    let conn = route::Connection {
        client: record.client,
        orig_dst: record.orig_dst,
        rule: rule_id,
        target: target_name.as_deref(),
    };
    // What routes see of a client whose TLS the rule terminated.
    let handshake: Option<(Option<String>, Vec<String>)> = record
        .tls_inside(hop_tls)
        .map(|tls| (tls.sni.clone(), tls.alpn.iter().cloned().collect()));
    let terminated = handshake
        .as_ref()
        .map(|(sni, alpn)| route::Hello::Terminated {
            sni: sni.as_deref(),
            alpn,
            inner: None,
        });
    let mut decision = route::decide(&active.policy, &conn, terminated.as_ref());
    let fronting = target_name
        .as_deref()
        .filter(|_| rule.connect.as_ref().is_some_and(|c| c.refuse_fronting));
    if matches!(decision, route::Decision::NeedHello) || fronting.is_some() {
        open_tunnel(&mut client, &mut established, active, record).await?;
        let said = sniff_hello(&mut client, shared, active, record).await?;
        let fronted = fronting.and_then(|name| tunnel::fronting(name, &said, record.sniff_gave_up));
        if matches!(decision, route::Decision::NeedHello) {
            let inner = hello_of(&said);
            let hello = match terminated {
                Some(route::Hello::Terminated { sni, alpn, .. }) => route::Hello::Terminated {
                    sni,
                    alpn,
                    inner: Some(&inner),
                },
                _ => inner,
            };
            decision = route::decide(&active.policy, &conn, Some(&hello));
        }
        record.sniffed = Some(Box::new(said));
        if let Some(refused) = fronted {
            relay::reset_on_close(client.tcp());
            record.end(active, "refused", Some(&refused));
            return None;
        }
    }
    // What matched is counted whether it relays or rejects.
    if let route::Decision::Upstream { why, .. } | route::Decision::Reject { why } = &decision {
        match why {
            route::Why::Route(label) => active.metrics.routes[label.id.0].inc(),
            route::Why::Default { .. } => rule_metrics.default.inc(),
        };
    }
    let (upstream_id, bind, route_timeouts) = match decision {
        route::Decision::Upstream {
            upstream,
            bind,
            why,
            ..
        } => {
            record.route = Some(why.route_name());
            let timeouts = match why {
                route::Why::Route(label) => active.policy.routes[label.id.0].timeouts,
                route::Why::Default { .. } => Timeouts::default(),
            };
            if let route::Why::Route(label) = why
                && let Some(acceptor) = &active.terminators.routes[label.id.0]
            {
                // A route chosen without the client's bytes (by its CONNECT
                // name, say) still needs its ClientHello.
                open_tunnel(&mut client, &mut established, active, record).await?;
                client = terminate(client, acceptor, shared, active, record).await?;
            }
            (upstream, bind, timeouts)
        }
        refused => {
            record.route = Some(match &refused {
                route::Decision::Reject { why } => why.route_name(),
                _ => Cow::Borrowed("none"),
            });
            if established {
                refuse(&mut client, record.sniffed.as_deref()).await;
            } else {
                let _ = tunnel::answer(&mut client, Status::Forbidden).await;
            }
            let outcome = match refused {
                route::Decision::Reject { .. } => "refused",
                _ => "no_route",
            };
            record.end(active, outcome, Some(&refused));
            return None;
        }
    };
    record.bind = Some(bind);
    // Happy Eyeballs may connect to any checked address: only those the
    // routes decide alike for (a route on `destination` saw the first).
    let checked: Vec<SocketAddr> = checked
        .into_iter()
        .enumerate()
        // The first is the one decided on.
        .filter(|&(k, addr)| {
            if k == 0 {
                return true;
            }
            let conn = route::Connection {
                orig_dst: OrigDstAddr(addr),
                ..conn
            };
            let hello = record.sniffed.as_deref().map(hello_of);
            route::decide(&active.policy, &conn, hello.as_ref()) == decision
        })
        .map(|(_, addr)| addr)
        .collect();

    // The name the client asked for: the server name of its TLS to the
    // server (as its handshake with l4proxy or its ClientHello gave it),
    // else (below) its CONNECT name.
    let client_name = record
        .tls_inside(hop_tls)
        .and_then(|tls| tls.sni.clone())
        .or_else(|| {
            record
                .sniffed
                .as_deref()
                .and_then(sni_of)
                .map(str::to_owned)
        });
    let pool = &active.pools[upstream_id.0];
    let upstream_config = &active.policy.upstreams[upstream_id.0];
    // Bytes of the proxy's own go upstream the moment it is connected.
    let proxy_speaks = upstream_config.proxy_protocol.is_some()
        || pool.origination.is_some()
        || matches!(upstream_config.target, Target::Parent(_));
    let plain_client = matches!(client, Stream::Tcp(_));
    // A CONNECT client answered once the upstream is connected speaks a
    // round trip after the answer.
    let awaits_client = !established && plain_client && !proxy_speaks;
    // Then the upstream's handshake ACK waits to ride on the first bytes.
    let sends_first = proxy_speaks
        || awaits_client
        || (plain_client && record.sniffed.is_some() && record.sniff_gave_up.is_none());
    let request = upstream::Request {
        client: record.client,
        orig_dst: record.orig_dst,
        checked,
        // What a parent proxy is asked for: the name a CONNECT client gave
        // (checked by its rule; never one named inside the tunnel), or on a
        // steered connection the SNI or Host, when read.
        name: match active.policy.upstreams[upstream_id.0].target {
            Target::Parent(_) if rule.connect.is_some() => target_name.clone(),
            Target::Parent(_) => client_name.clone().or_else(|| {
                record
                    .sniffed
                    .as_deref()
                    .and_then(host_of)
                    .map(str::to_owned)
            }),
            _ => None,
        },
        bind,
        keepalive,
        sends_first,
    };
    record.upstream_id = Some(upstream_id);
    let upstream_metrics = &active.metrics.upstreams[upstream_id.0];
    let proxy_protocol = upstream_config.proxy_protocol;
    // With TLS to the upstream, the PROXY header (which comes first) and
    // the handshake are part of each attempt: a server whose TLS fails is
    // counted as failed, and the next one tried. The name its certificate
    // must have is settled first: without one, no server is tried.
    let tls_name = match &pool.origination {
        Some(origination) => {
            // A CONNECT to an address: the server's certificate must name it,
            // as a client's own TLS to it would ask.
            let asked = client_name.or(target_name).or_else(|| {
                rule.connect
                    .as_ref()
                    .and_then(|_| request.checked.first())
                    .map(|addr| addr.ip().to_string())
            });
            match tls_server_name(origination, asked) {
                Ok(name) => Some(name),
                Err(e) => {
                    // The client gave no name, or one that is none.
                    let failed = TlsFailed(upstream_id, "client", &e);
                    tls_failed(&mut client, established, record, active, failed).await;
                    return None;
                }
            }
        }
        None => None,
    };
    let tls_alpn = record.tls_inside(hop_tls).map(|tls| tls.alpn.clone());
    let (told, checked) = (&*record, &request.checked);
    let secure =
        |mut upstream: Stream, reached: UpstreamAddr| {
            let (name, alpn) = (tls_name.clone(), tls_alpn.clone());
            async move {
                let (Some(origination), Some(name)) = (&pool.origination, name) else {
                    return Ok(upstream);
                };
                if let Some(version) = proxy_protocol {
                    let orig_dst = reached_destination(checked, reached).unwrap_or(told.orig_dst);
                    let bytes = header_bytes(version, told, orig_dst, hop_tls, onward_local)
                        .map_err(|e| Unsecured {
                            error: format!("encoding the PROXY header: {e}"),
                            fault: Fault::ThisHost,
                        })?;
                    upstream.send(&bytes).await.map_err(|e| Unsecured {
                        error: format!("sending the PROXY header: {e}"),
                        fault: Fault::Server,
                    })?;
                }
                originate(upstream, origination, name, alpn, shared.connect_timeout).await
            }
        };
    let connecting = Instant::now();
    let connected = match pool
        .connect(&request, &shared.local, shared.connect_timeout, secure)
        .await
    {
        Ok(connected) => connected,
        // Every server down: refused as when no route matches.
        Err(e) if e.all_down() => {
            if established {
                refuse(&mut client, record.sniffed.as_deref()).await;
            } else {
                let _ = tunnel::answer(&mut client, Status::BadGateway).await;
            }
            record.end(active, "refused", Some(&e));
            return None;
        }
        Err(e) if let Some(fault) = e.secure_fault() => {
            record.upstream = e.upstream();
            let failed = TlsFailed(upstream_id, fault.reason(), &e);
            tls_failed(&mut client, established, record, active, failed).await;
            return None;
        }
        Err(e) => {
            let timed_out = e.timed_out();
            record.upstream = e.upstream();
            let metrics = &active.metrics.upstreams[upstream_id.0];
            metrics.failed(match &active.policy.upstreams[upstream_id.0].target {
                _ if timed_out => "timeout",
                _ if e.on_this_host() => "local",
                Target::Parent(_) => "parent",
                _ => "refused",
            });
            upstream_failed(&mut client, established, timed_out, record).await;
            let outcome = if timed_out {
                "connect_timeout"
            } else {
                "connect_failed"
            };
            record.end(active, outcome, Some(&e));
            return None;
        }
    };
    upstream_metrics.connections.inc();
    let upstream_open = metrics::Open::new(&upstream_metrics.active);
    record.upstream = Some(connected.upstream);
    if let Some(reached) = reached_destination(&request.checked, connected.upstream) {
        record.orig_dst = reached;
    }
    // Only the close log needs it: no getsockname per connection without it.
    if tracing::enabled!(tracing::Level::INFO) {
        record.source = connected.stream.tcp().local_addr().ok();
    }
    record.bind_fallback = connected.fallback;
    let lease = connected.lease;
    let mut upstream = connected.stream;
    if pool.origination.is_some() {
        record.upstream_tls = upstream.tls_info().map(Box::new);
    }
    if !established && let Err(e) = tunnel::answer(&mut client, Status::Established).await {
        relay::reset_on_close(upstream.tcp());
        record.end(
            active,
            "client_failed",
            Some(&format!("answering CONNECT: {e}")),
        );
        return None;
    }

    // With TLS to the upstream, the header went in each attempt (`secure`).
    if let Some(version) = proxy_protocol.filter(|_| pool.origination.is_none()) {
        let bytes = match header_bytes(version, record, record.orig_dst, hop_tls, onward_local) {
            Ok(bytes) => bytes,
            Err(e) => {
                record.end(
                    active,
                    "refused",
                    Some(&format!("encoding the PROXY header: {e}")),
                );
                return None;
            }
        };
        match (&client, &upstream) {
            // With the client's first bytes in one segment, where no TLS
            // (a terminated client's, or a parent's) is in the way.
            (Stream::Tcp(from), Stream::Tcp(to)) => {
                match proxy_header::write(from, to, bytes).await {
                    Ok(taken) => record.from_client = taken,
                    Err(e) => {
                        // The other side is reset, as in a relay.
                        let outcome = match e {
                            proxy_header::WriteError::Client(_) => {
                                relay::reset_on_close(upstream.tcp());
                                "client_error"
                            }
                            proxy_header::WriteError::Upstream(_) => {
                                relay::reset_on_close(client.tcp());
                                "upstream_error"
                            }
                        };
                        record.end(active, outcome, Some(&e));
                        return None;
                    }
                }
            }
            _ => {
                if let Err(e) = upstream.send(&bytes).await {
                    relay::reset_on_close(client.tcp());
                    let error = format!("sending the PROXY header: {e}");
                    record.end(active, "upstream_error", Some(&error));
                    return None;
                }
            }
        }
    }
    upstream_metrics
        .connect
        .observe(connecting.elapsed().as_secs_f64());
    // Not in the connect time: the client's turn.
    if awaits_client {
        await_first_bytes(client.tcp(), upstream.tcp()).await;
    }
    let timeouts = route_timeouts
        .or(rule.timeouts)
        .or(shared.defaults.timeouts);
    let set = |timeout: Option<Duration>| timeout.filter(|t| !t.is_zero());
    Some(Opened {
        client,
        upstream,
        open: Box::new((rule_open, upstream_open)),
        deadlines: Deadlines {
            idle: set(timeouts.idle),
            end: set(timeouts.lifetime).map(|lifetime| {
                (
                    tokio::time::Instant::from_std(record.started) + lifetime,
                    lifetime,
                )
            }),
        },
        slot,
        lease,
    })
}

/// How long the upstream's held handshake ACK waits for a CONNECT
/// client's first bytes (its answer to the `200`, a round trip away) before
/// it goes alone: a nearby client's round trip fits, and a server that
/// speaks first waits no longer than this for its connection.
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(5);

/// Leaves the upstream's held ACK to ride on the client's first bytes if
/// they come within [`FIRST_BYTES_WAIT`] (the relay sends them on at
/// once), else sends it alone.
async fn await_first_bytes(client: &TcpStream, upstream: &TcpStream) {
    if tokio::time::timeout(FIRST_BYTES_WAIT, client.readable())
        .await
        .is_err()
        && let Err(e) = upstream::release_ack(upstream)
    {
        tracing::debug!(error = %e, "sending the upstream's held handshake ACK");
    }
}

/// TLS to this upstream failed, the failure's count (`tls`, or `client`:
/// what the client asked for, or `local`: this host's, neither held
/// against the upstream; see [`Fault::reason`]), and why.
struct TlsFailed<'a>(UpstreamId, &'static str, &'a (dyn std::fmt::Display + Sync));

/// TLS to the upstream failed, or could not start (no name to verify
/// against): counted, told the client as a failed connect, and logged.
async fn tls_failed(
    client: &mut Stream,
    established: bool,
    record: &Record,
    active: &Active,
    TlsFailed(upstream_id, reason, error): TlsFailed<'_>,
) {
    active.metrics.upstreams[upstream_id.0].failed(reason);
    upstream_failed(client, established, false, record).await;
    record.end(active, "upstream_tls_failed", Some(error));
}

/// Tells the client its upstream could not be reached, as it would have
/// learnt it directly: an HTTP client reads a 502, a CONNECT client not yet
/// answered a 502 (504 for a timeout), any other a reset (never an accepted
/// connection closed clean).
async fn upstream_failed(client: &mut Stream, established: bool, timed_out: bool, record: &Record) {
    if let Some(sniff::Sniffed::Http(_)) = record.sniffed.as_deref() {
        let _ = client.answer_and_close(BAD_GATEWAY).await;
    } else if established {
        relay::reset_on_close(client.tcp());
    } else {
        let status = if timed_out {
            Status::GatewayTimeout
        } else {
            Status::BadGateway
        };
        let _ = tunnel::answer(client, status).await;
    }
}

/// The name the upstream's certificate must have: `origination`'s, or else
/// the one the client asked for (`client_name`).
fn tls_server_name(
    origination: &upstream::Origination,
    client_name: Option<String>,
) -> Result<ServerName<'static>, String> {
    match (&origination.server_name, client_name) {
        (Some(name), _) => Ok(name.clone()),
        (None, Some(name)) => ServerName::try_from(name.clone())
            .map_err(|e| format!("the client's server name {name:?}: {e}")),
        (None, None) => Err("no server name: the client gave none and the upstream's \
                             \"tls\" names none"
            .to_owned()),
    }
}

/// TLS to the upstream over `upstream`, within `deadline`: its certificate
/// must have `name` ([`tls_server_name`]). ALPN is the policy's, or else
/// the one the client negotiated with l4proxy (`client_alpn`: `None` when
/// l4proxy did not end the client's TLS, or it had none); either way the
/// server must agree to the client's: relaying a client that speaks h2 to
/// a server that did not agree to it (one that ignores ALPN, or a policy
/// that offers only http/1.1) would fail later, inside the protocol, with
/// nothing logged. A failure is the server's unless it comes of what the
/// client asked for: a certificate without the client's name, its ALPN.
async fn originate(
    upstream: Stream,
    origination: &upstream::Origination,
    name: ServerName<'static>,
    client_alpn: Option<Option<String>>,
    deadline: Duration,
) -> Result<Stream, Unsecured> {
    let terminated = client_alpn.is_some();
    let client_alpn = client_alpn.flatten();
    let Stream::Tcp(tcp) = upstream else {
        // The policy check refuses it; should one get through, it is ours.
        return Err(Unsecured {
            error: "TLS inside TLS to a parent proxy is not supported".to_owned(),
            fault: Fault::ThisHost,
        });
    };
    // The client's protocol alone, where it has one the policy's list (if
    // any) has: the server must choose it anyway, and offered the whole
    // list it might choose another (h2 for a client that chose http/1.1).
    let offered = client_alpn.as_ref().filter(|alpn| {
        origination
            .policy_alpn
            .as_ref()
            .is_none_or(|list| list.contains(alpn))
    });
    let connect = match offered {
        Some(alpn) => origination
            .connector
            .with_alpn(vec![alpn.as_bytes().to_vec()])
            .connect(name, tcp),
        None => origination.connector.connect(name, tcp),
    };
    let secured = match tokio::time::timeout(deadline, connect).await {
        Ok(Ok(secured)) => secured,
        Ok(Err(e)) => {
            let tls = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            let clients = tls.is_some_and(|tls| {
                clients_doing(tls, origination.server_name.is_none(), offered.is_some())
            });
            return Err(Unsecured {
                error: e.to_string(),
                fault: if clients {
                    Fault::Client
                } else {
                    Fault::Server
                },
            });
        }
        Err(_) => {
            return Err(Unsecured {
                error: format!("no TLS handshake within {deadline:?}"),
                fault: Fault::Server,
            });
        }
    };
    let agreed = secured.get_ref().1.alpn_protocol();
    if !alpn_compatible(
        client_alpn.as_deref().map(str::as_bytes),
        terminated,
        agreed,
    ) {
        let agreed = agreed.map_or("none".into(), String::from_utf8_lossy);
        let client = client_alpn.as_deref().unwrap_or("none");
        return Err(Unsecured {
            error: format!("the server's ALPN protocol is {agreed}, the client's {client}"),
            fault: Fault::Client,
        });
    }
    Ok(Stream::from(tokio_rustls::TlsStream::Client(secured)))
}

/// Whether a failed TLS handshake with a server came of what the client
/// asked for rather than of the server: a certificate without the name
/// the client chose (`name_chosen`: no name in the policy), or a server
/// that knows no such name; a server with none of the client's protocol
/// (`alpn_chosen`: the client's was offered). An expired or untrusted
/// certificate, or any other failure, is the server's, whoever chose the
/// name: it fails over to the next server and counts against this one.
fn clients_doing(error: &rustls::Error, name_chosen: bool, alpn_chosen: bool) -> bool {
    use rustls::{AlertDescription, CertificateError, Error};
    match error {
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )
        | Error::AlertReceived(AlertDescription::UnrecognisedName) => name_chosen,
        Error::AlertReceived(AlertDescription::NoApplicationProtocol) => alpn_chosen,
        _ => false,
    }
}

/// Whether a client that negotiated `client` (ALPN) with l4proxy can be
/// relayed to a server that chose `server`: the same protocol, or HTTP/1.x
/// to a server that chose none (without ALPN, HTTPS is HTTP/1.x). A client
/// that named no protocol is relayed whatever the server chose from the
/// policy's `alpn`, the operator's word (a plain IMAP client to a server
/// reached with `"alpn": ["imap"]`, a plain client with h2 from the start),
/// but h2 to one whose TLS l4proxy ended (`terminated`) without a
/// protocol: over TLS, h2 is spoken only once ALPN agreed on it (RFC 9113,
/// 3.2), so that client speaks another.
fn alpn_compatible(client: Option<&[u8]>, terminated: bool, server: Option<&[u8]>) -> bool {
    match (client, server) {
        (Some(client), Some(server)) => client == server,
        (Some(client), None) => client == b"http/1.1" || client == b"http/1.0",
        (None, Some(server)) => !(terminated && server == b"h2"),
        (None, None) => true,
    }
}

/// Answers a CONNECT client `200` unless it was (`established`): the
/// tunnel's first bytes come only once it is open. `None` once that failed
/// and it is logged.
async fn open_tunnel(
    client: &mut Stream,
    established: &mut bool,
    active: &Active,
    record: &mut Record,
) -> Option<()> {
    if !*established {
        if let Err(e) = tunnel::answer(client, Status::Established).await {
            let error = format!("answering CONNECT: {e}");
            record.end(active, "client_failed", Some(&error));
            return None;
        }
        *established = true;
    }
    Some(())
}

/// Terminates the client's TLS with `acceptor`, within the deadline for its
/// first bytes; `None` once it failed (the client got an alert) and it is
/// logged.
async fn terminate(
    client: Stream,
    acceptor: &TlsAcceptor,
    shared: &Shared,
    active: &Active,
    record: &mut Record,
) -> Option<Stream> {
    let Stream::Tcp(tcp) = client else {
        let error = "TLS inside TLS from a client is not supported";
        record.end(active, "client_failed", Some(&error));
        return None;
    };
    match tokio::time::timeout(shared.sniff_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            let client = Stream::from(tokio_rustls::TlsStream::Server(tls));
            record.tls = client.tls_info().map(Box::new);
            Some(client)
        }
        Ok(Err(e)) => {
            record.end(
                active,
                "client_failed",
                Some(&format!("TLS handshake: {e}")),
            );
            None
        }
        Err(_) => {
            let error = format!("no TLS handshake within {:?}", shared.sniff_timeout);
            record.end(active, "client_failed", Some(&error));
            None
        }
    }
}

/// A slot under the client's limits (`None` inside: none apply), or `None`
/// once the connection is reset and counted.
fn admit(
    client: &TcpStream,
    shared: &Shared,
    active: &Active,
    rule: &InterceptRule,
    record: &Record,
) -> Option<Option<Slot>> {
    match shared.admission.admit(rule, record.client.0.ip()) {
        Ok(slot) => Some(slot),
        Err(refusal) => {
            shared.admission.refuse(client, record.client.0, refusal);
            if let Some(rule) = record.rule_id {
                active.metrics.rules[rule.0].ended("limited");
            }
            None
        }
    }
}

/// What the front stage learnt beyond the accepted socket's addresses.
struct Fronted {
    /// The client, its TLS terminated if the rule says so.
    client: Stream,
    /// What a CONNECT client asked for, checked.
    tunnel: Option<tunnel::Tunnel>,
    /// A front proxy's `LOCAL` header, passed on as `LOCAL`.
    onward_local: bool,
    /// The limits' slot of the client a trusted front proxy named, taken
    /// as soon as it was named (before any TLS handshake).
    named_slot: Option<Slot>,
}

/// The front stage, in the order the client speaks: a trusted front
/// proxy's PROXY header (naming the client and where it meant to go), the
/// client's TLS when the rule terminates it, and a CONNECT client's
/// request. `None` once the connection is refused and logged.
async fn front(
    client: TcpStream,
    peer: SocketAddr,
    (rule_id, rule): (RuleId, &InterceptRule),
    active: &Active,
    shared: &Shared,
    record: &mut Record,
) -> Option<Fronted> {
    let mut onward_local = false;
    let mut named_slot = None;
    if rule.connect.is_none() && rule.trusts(peer.ip()) {
        record.fronted.get_or_insert_default().peer = Some(peer);
        match proxy_header::read(&client, shared.sniff_timeout).await {
            Ok(decoded) => {
                record.fronted.get_or_insert_default().proxy_header = Some(header_kind(&decoded));
                onward_local = decoded.header == Header::Local;
                if let Some(addresses) = decoded.header.addresses() {
                    record.client = addresses.client;
                    record.orig_dst = addresses.orig_dst;
                    let dst = record.orig_dst;
                    if let Err(why) = announced_destination(active, rule_id, dst, &shared.local) {
                        let error = format!(
                            "PROXY header refused: destination {} {why}",
                            record.orig_dst
                        );
                        record.end(active, "refused", Some(&error));
                        return None;
                    }
                    // The client's limits, before anything else is read.
                    // (A header without addresses, LOCAL or UNKNOWN, names
                    // no client: the front proxy itself is not limited.)
                    named_slot = admit(&client, shared, active, rule, record)?;
                }
            }
            Err(e) => {
                record.end(active, "client_failed", Some(&e));
                return None;
            }
        }
    }
    let acceptor = &active.terminators.rules[rule_id.0];
    // A client the CONNECT rule does not take is refused before its TLS:
    // the handshake (a private-key operation) is not spent on it. Without
    // TLS it is read and answered 403, which tells it why.
    if acceptor.is_some()
        && let Some(connect) = &rule.connect
        && !connect.admits(peer.ip())
    {
        relay::reset_on_close(&client);
        record.end(active, "refused", Some(&tunnel::Refused::Client));
        return None;
    }
    let mut client = Stream::Tcp(client);
    if let Some(acceptor) = acceptor {
        client = terminate(client, acceptor, shared, active, record).await?;
    }
    let mut tunnel = None;
    if let Some(connect) = &rule.connect {
        match tunnel::open(
            &mut client,
            peer.ip(),
            connect,
            &shared.local,
            shared.sniff_timeout,
            &mut record.fronted.get_or_insert_default().target,
        )
        .await
        {
            Ok(mut opened) => {
                record.orig_dst = OrigDstAddr(opened.addresses[0]);
                record.fronted.get_or_insert_default().user = opened.user.take();
                tunnel = Some(opened);
            }
            Err(refused) => {
                if let Some(status) = refused.status() {
                    let _ = tunnel::answer(&mut client, status).await;
                }
                record.end(active, refused.outcome(), Some(&refused));
                return None;
            }
        }
    }
    Some(Fronted {
        client,
        tunnel,
        onward_local,
        named_slot,
    })
}

/// Why a destination a trusted front proxy announced may not be taken, if
/// it may not. On a gateway rule, whose upstream may be the original
/// destination, it must be one the rule intercepts, and never one the kernel
/// programs would not have steered (loopback, unspecified, this host's own
/// addresses, which include the listeners). On any other rule it only
/// routes and is logged: connections go to the servers the policy lists,
/// and a front proxy announces its own address (often not the rule's).
fn announced_destination(
    active: &Active,
    rule_id: RuleId,
    dst: OrigDstAddr,
    local: &LocalAddrs,
) -> Result<(), &'static str> {
    if !active.policy.rules[rule_id.0].is_gateway() {
        return Ok(());
    }
    let ip = dst.0.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return Err("is loopback or unspecified");
    }
    // The rule that would have taken it, by the kernel's precedence.
    if active.rules.lookup(dst.0) != Some(rule_id) {
        return Err("is outside the rule's prefixes and ports");
    }
    if local.contains(ip) {
        return Err("is this host's, which a gateway rule never takes");
    }
    Ok(())
}

/// The client's first bytes, as the sniffer reads them within the sniff
/// deadline (`Other` when it gave up); `None` once the client failed and
/// it is logged.
async fn sniff_hello(
    client: &mut Stream,
    shared: &Shared,
    active: &Active,
    record: &mut Record,
) -> Option<sniff::Sniffed> {
    let mut sniffer = sniff::Sniffer::default();
    let peeked = client
        .peek_until(
            sniff::MAX_SNIFF_LEN,
            shared.sniff_timeout,
            |bytes| match sniffer.look(bytes) {
                sniff::SniffResult::Done(said) => Look::Verdict(said),
                sniff::SniffResult::NeedMore { until } => Look::Wait { until },
                sniff::SniffResult::TooLarge => Look::TooLarge,
            },
        )
        .await;
    let rule = record.rule_id.map(|rule| &active.metrics.rules[rule.0]);
    match peeked {
        Ok(Ok(said)) => {
            rule.inspect(|rule| rule.sniffed(&said, false));
            Some(said)
        }
        Ok(Err(gave_up)) => {
            record.sniff_gave_up = Some(gave_up);
            let said = sniff::Sniffed::Other;
            rule.inspect(|rule| rule.sniffed(&said, true));
            Some(said)
        }
        Err(e) => {
            let error = format!("reading its first bytes: {e}");
            record.end(active, "client_failed", Some(&error));
            None
        }
    }
}

/// How the close log names the header a front proxy sent.
fn header_kind(decoded: &proxy_protocol::Decoded) -> &'static str {
    match (decoded.version, &decoded.header) {
        (Version::V1, Header::Proxy { .. }) => "v1",
        (Version::V2, Header::Proxy { .. }) => "v2",
        (Version::V1, _) => "v1 UNKNOWN",
        (Version::V2, Header::Local) => "v2 LOCAL",
        (Version::V2, _) => "v2 UNSPEC",
    }
}

/// The PROXY header's bytes for a connection that reached `orig_dst`
/// (`LOCAL` for one a front proxy sent as its own).
fn header_bytes(
    version: proxy_protocol::Version,
    record: &Record,
    orig_dst: OrigDstAddr,
    hop_tls: bool,
    onward_local: bool,
) -> Result<Vec<u8>, proxy_protocol::EncodeError> {
    let header = if onward_local {
        Header::Local
    } else {
        announce(record, orig_dst, hop_tls)
    };
    proxy_protocol::encode(version, &header)
}

/// The header sent upstream: the client and where it meant to go
/// (`orig_dst`), and (v2 only) the ALPN protocol (negotiated with l4proxy,
/// or the one the client wants most) and the name it asked for, when
/// known, and the connection's ID.
fn announce(record: &Record, orig_dst: OrigDstAddr, hop_tls: bool) -> Header {
    let said = record.sniffed.as_deref();
    // Where l4proxy terminated the client's TLS: what its handshake agreed.
    let tls = record.tls_inside(hop_tls);
    Header::Proxy {
        addresses: Addresses {
            client: record.client,
            orig_dst,
        },
        tlvs: Tlvs {
            alpn: tls
                .and_then(|tls| tls.alpn.as_deref())
                .or_else(|| said.and_then(first_alpn))
                .map(|p| p.as_bytes().to_vec()),
            authority: tls
                .and_then(|tls| tls.sni.as_deref())
                .or_else(|| said.and_then(|said| sni_of(said).or_else(|| host_of(said))))
                .map(str::to_owned),
            unique_id: Some(record.conn_id.to_ascii()),
        },
    }
}

/// Which of the addresses a CONNECT front end checked the connection
/// reached, when Happy Eyeballs had several to try: that one, not the first
/// tried, is where the client went (the log's `orig_dst`, the PROXY
/// header's destination).
fn reached_destination(checked: &[SocketAddr], upstream: UpstreamAddr) -> Option<OrigDstAddr> {
    checked
        .iter()
        .find(|to| SocketAddr::new(to.ip().to_canonical(), to.port()) == upstream.0)
        .map(|&to| OrigDstAddr(to))
}

/// What the decision needs from the sniffed hello.
fn hello_of(said: &sniff::Sniffed) -> route::Hello<'_> {
    match said {
        sniff::Sniffed::Tls(hello) => route::Hello::Tls {
            sni: hello.sni.as_deref(),
            alpn: &hello.alpn,
        },
        sniff::Sniffed::Http(request) => route::Hello::Http {
            host: request.host.as_deref(),
        },
        sniff::Sniffed::Other => route::Hello::Other,
    }
}

fn sni_of(said: &sniff::Sniffed) -> Option<&str> {
    match said {
        sniff::Sniffed::Tls(hello) => hello.sni.as_deref(),
        _ => None,
    }
}

/// The protocols the ClientHello offered, comma-separated.
fn alpn_of(said: &sniff::Sniffed) -> Option<String> {
    match said {
        sniff::Sniffed::Tls(hello) if !hello.alpn.is_empty() => Some(hello.alpn.join(",")),
        _ => None,
    }
}

fn first_alpn(said: &sniff::Sniffed) -> Option<&str> {
    match said {
        sniff::Sniffed::Tls(hello) => hello.alpn.first().map(String::as_str),
        _ => None,
    }
}

fn host_of(said: &sniff::Sniffed) -> Option<&str> {
    match said {
        sniff::Sniffed::Http(request) => request.host.as_deref(),
        _ => None,
    }
}

const SERVICE_UNAVAILABLE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\n\
no route to service\n";

const BAD_GATEWAY: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\n\
Content-Type: text/plain\r\nContent-Length: 22\r\nConnection: close\r\n\r\n\
upstream unreachable\r\n";

/// No route, or a rejecting one: TLS gets a reset, HTTP/1.x a 503, the rest
/// a close (when the caller drops `client`). TLS is a ClientHello passed
/// through or a client whose TLS l4proxy ended: a close would end that with
/// a FIN without close_notify, which the client reads as a truncation.
async fn refuse(client: &mut Stream, sniffed: Option<&sniff::Sniffed>) {
    match sniffed {
        Some(sniff::Sniffed::Http(_)) => {
            let _ = client.answer_and_close(SERVICE_UNAVAILABLE).await;
        }
        _ if matches!(sniffed, Some(sniff::Sniffed::Tls(_)))
            || matches!(client, Stream::Tls(_)) =>
        {
            relay::reset_on_close(client.tcp());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::intercept::rules;

    /// A client and the proxy's end of it, its request read (nothing
    /// queued after it), and a server with the proxy's upstream connection
    /// to it, its handshake's ACK held.
    async fn held_tunnel() -> (TcpStream, TcpStream, TcpListener, TcpStream) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (mut proxy_end, _) = front.accept().await.unwrap();
        client.write_all(b"request").await.unwrap();
        let mut request = [0u8; 7];
        proxy_end.read_exact(&mut request).await.unwrap();
        // Nothing more: the proxy's end waits for new bytes.
        let e = proxy_end.try_read(&mut request).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = upstream::connect_one(
            UpstreamAddr(server.local_addr().unwrap()),
            upstream::Source::Kernel,
            crate::policy::Keepalive::Off,
            true,
        )
        .await
        .unwrap();
        (client, proxy_end, server, upstream)
    }

    #[test]
    fn alpn_compatibility() {
        let ok = |c: Option<&str>, s: Option<&str>| {
            alpn_compatible(c.map(str::as_bytes), true, s.map(str::as_bytes))
        };
        assert!(ok(Some("h2"), Some("h2")));
        assert!(ok(None, None));
        assert!(ok(Some("http/1.1"), None), "a server that ignores ALPN");
        assert!(ok(Some("http/1.0"), None));
        assert!(
            ok(None, Some("imap")),
            "the policy's alpn, for a plain client"
        );
        assert!(!ok(Some("h2"), None), "h2 to a server that ignores ALPN");
        assert!(
            !ok(Some("h2"), Some("http/1.1")),
            "a policy alpn without h2"
        );
        assert!(!ok(Some("http/1.1"), Some("h2")));
        assert!(
            !ok(None, Some("h2")),
            "a terminated client without ALPN to a server that chose h2 from the policy's alpn"
        );
        assert!(
            alpn_compatible(None, false, Some(b"h2")),
            "a plain client (h2 with prior knowledge) to a server that chose h2"
        );
    }

    #[test]
    fn a_failed_upstream_handshake_is_the_clients_only_for_what_it_chose() {
        use rustls::{AlertDescription, CertificateError, Error};
        let wrong_name = Error::InvalidCertificate(CertificateError::NotValidForName);
        let unknown_name = Error::AlertReceived(AlertDescription::UnrecognisedName);
        let no_protocol = Error::AlertReceived(AlertDescription::NoApplicationProtocol);
        assert!(clients_doing(&wrong_name, true, false));
        assert!(clients_doing(&unknown_name, true, false));
        assert!(clients_doing(&no_protocol, false, true));
        // The policy named the server, or offered the protocols.
        assert!(!clients_doing(&wrong_name, false, true));
        assert!(!clients_doing(&unknown_name, false, true));
        assert!(!clients_doing(&no_protocol, true, false));
        // The server's, whoever chose the name.
        for servers in [
            Error::InvalidCertificate(CertificateError::Expired),
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
            Error::AlertReceived(AlertDescription::HandshakeFailure),
        ] {
            assert!(!clients_doing(&servers, true, true), "{servers:?}");
        }
    }

    /// A PROXY v2 header names what the client asked for: the name and
    /// protocol its terminated TLS agreed, but not those of a CONNECT
    /// rule's TLS (the hop to the proxy, naming the proxy): there, the
    /// ClientHello inside the tunnel.
    #[test]
    fn the_proxy_header_names_the_tunnels_server_not_the_proxy() {
        let mut record = Record::new(
            crate::conn_id::ConnectionIds::new().next(),
            ClientAddr("198.51.100.2:40000".parse().unwrap()),
            OrigDstAddr("203.0.113.2:443".parse().unwrap()),
        );
        record.tls = Some(Box::new(crate::stream::TlsInfo {
            sni: Some("proxy.example.test".to_owned()),
            alpn: Some("http/1.1".to_owned()),
            ..Default::default()
        }));
        record.sniffed = Some(Box::new(sniff::Sniffed::Tls(sniff::tls::ClientHelloInfo {
            sni: Some("app.example.test".to_owned()),
            alpn: vec!["h2".to_owned(), "http/1.1".to_owned()],
        })));
        let tlvs = |hop_tls| match announce(&record, record.orig_dst, hop_tls) {
            Header::Proxy { tlvs, .. } => (tlvs.authority, tlvs.alpn),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            tlvs(true),
            (Some("app.example.test".to_owned()), Some(b"h2".to_vec()))
        );
        assert_eq!(
            tlvs(false),
            (
                Some("proxy.example.test".to_owned()),
                Some(b"http/1.1".to_vec())
            )
        );
    }

    /// The address Happy Eyeballs reached is the destination, mapped or
    /// not; a server that is none of them (a listed one, a parent) leaves
    /// the first.
    #[test]
    fn the_reached_address_is_the_destination() {
        let checked: Vec<SocketAddr> = ["203.0.113.3:8090", "[::ffff:203.0.113.2]:8090"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let reached = |to: &str| reached_destination(&checked, UpstreamAddr(to.parse().unwrap()));
        assert_eq!(reached("203.0.113.3:8090"), Some(OrigDstAddr(checked[0])));
        assert_eq!(reached("203.0.113.2:8090"), Some(OrigDstAddr(checked[1])));
        assert_eq!(reached("203.0.113.2:3128"), None);
    }

    #[tokio::test]
    async fn a_silent_clients_tunnel_reaches_a_server_that_speaks_first() {
        let (_client, proxy_end, server, upstream) = held_tunnel().await;
        let started = Instant::now();
        await_first_bytes(&proxy_end, &upstream).await;
        assert!(started.elapsed() >= FIRST_BYTES_WAIT);
        // The ACK went alone: the server has its connection long before
        // the kernel's 200 ms delayed-ACK timer would have sent it.
        let accepted = tokio::time::timeout(Duration::from_millis(100), server.accept()).await;
        assert!(accepted.is_ok(), "the server got no connection");
    }

    #[tokio::test]
    async fn a_speaking_clients_bytes_carry_the_held_ack() {
        let (client, proxy_end, server, upstream) = held_tunnel().await;
        client.try_write(b"hello").unwrap();
        await_first_bytes(&proxy_end, &upstream).await;
        // Not sent alone: the server has no connection until the bytes go.
        let accepted = tokio::time::timeout(Duration::from_millis(100), server.accept()).await;
        assert!(accepted.is_err(), "the ACK went without the bytes");
        let mut bytes = [0u8; 8];
        let n = proxy_end.try_read(&mut bytes).unwrap();
        upstream.try_write(&bytes[..n]).unwrap();
        assert!(server.accept().await.is_ok());
    }

    /// A policy of one rule for 192.0.2.0/24 on `port`, ready to be in force.
    fn active_on(port: u16) -> Arc<Active> {
        let policy = Policy::from_json(&format!(
            r#"{{ "intercept": [ {{ "name": "r{port}", "prefixes": ["192.0.2.0/24"], "ports": [{port}], "upstream": "u" }} ],
                 "upstreams": {{ "u": {{ "servers": ["203.0.113.2:80"] }} }} }}"#
        ))
        .unwrap();
        Arc::new(
            Active::new(
                policy.clone(),
                RuleIndex::new(&rules::compile(&policy)),
                &Metrics::new(),
                &crate::health::Registry::default(),
            )
            .unwrap(),
        )
    }

    async fn shared_with(active: Arc<Active>) -> Arc<Shared> {
        Arc::new(Shared {
            active: RwLock::new(active),
            local: LocalAddrs::load(None).await.unwrap(),
            ids: ConnectionIds::new(),
            connect_timeout: Duration::from_secs(1),
            sniff_timeout: Duration::from_secs(1),
            other: RwLock::new(Weak::new()),
            shutdown: CancellationToken::new(),
            admission: Admission::new(None, &crate::metrics::Metrics::new()),
            defaults: Defaults {
                timeouts: Timeouts {
                    idle: Some(Duration::from_secs(3600)),
                    lifetime: None,
                },
                keepalive: Keepalive::Off,
            },
        })
    }

    /// While a reload moves the kernel from one policy to another, a
    /// connection is served under the one its rule is in, for as long as
    /// that one is alive.
    #[tokio::test]
    async fn a_connection_finds_its_rule_in_either_policy_of_a_reload() {
        let (old, new) = (active_on(80), active_on(81));
        let shared = shared_with(old.clone()).await;
        let to = |port| SocketAddr::from(([192, 0, 2, 10], port));
        let policy_of = |port| {
            shared
                .rule_for(Front::Steered, to(port))
                .map(|(active, _)| active.policy.rules[0].name.clone())
        };
        assert_eq!(policy_of(80).as_deref(), Some("r80"));
        assert_eq!(policy_of(81), None);
        // The new rules are in the kernel before the policy is in force.
        shared.announce(&new);
        assert_eq!(policy_of(81).as_deref(), Some("r81"));
        assert_eq!(policy_of(80).as_deref(), Some("r80"));
        // In force: a client the old rule steered is still served.
        shared.set_active(new);
        assert_eq!(policy_of(81).as_deref(), Some("r81"));
        assert_eq!(policy_of(80).as_deref(), Some("r80"));
        // Until the replaced policy is forgotten.
        drop(old);
        assert_eq!(policy_of(80), None);
    }

    /// Every open connection holds its `serve` future for its whole life:
    /// what the future holds across its awaits is memory per idle connection.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let shared = shared_with(active_on(80)).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let peer = stream.local_addr().unwrap();
        let shutdown = shared.shutdown.child_token();
        let task = serve(stream, peer, Front::Steered, shared, shutdown, ());
        let size = std::mem::size_of_val(&task);
        println!("serve future: {size} bytes");
        // 1368 bytes when written; 1792 with the idle and lifetime watch,
        // the reset watch of half-closed connections, the CONNECT target and
        // user in the log record, a TLS side possible and the per-connection
        // metrics; 1120 once the relay's steps were `async move` blocks (an
        // `async fn` keeps a second copy of its arguments), the arguments
        // went into the boxed start, and the record boxed its rare fields.
        // tokio adds 96 bytes and the task tracker 8, rounded up to 128: a
        // task of 1280 bytes. HAProxy takes about 3.3 KiB a connection.
        assert!(size <= 1120, "serve's future is {size} bytes");
    }
}
