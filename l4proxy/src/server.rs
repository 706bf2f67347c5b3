//! The daemon: listeners, the accept loop, one task per connection, and an
//! orderly shutdown.
//!
//! Start-up order matters: listeners go into the socket map before the programs
//! are attached, and the routes and routing rules go in before them too, so the
//! first steered SYN already finds a socket. Shutdown runs the other way round:
//! stop taking new connections first (they are refused, or forwarded past us
//! on a gateway) instead of dropping them while we drain, and keep delivering
//! the open ones' packets until they are done.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use socket2::{Domain, Socket, Type};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    addrs::{ClientAddr, OrigDstAddr},
    hello,
    intercept::{
        ClassifyRole, Family, InterceptError, Interceptor,
        delivery::{Delivery, DeliveryError, Mark},
        interfaces::{self, Interface},
        routes::{self, LocalRoutes, RouteError},
        sysctl,
    },
    local_addrs::{LocalAddrs, LocalAddrsError},
    policy::{Bind, Policy},
    relay, route, sniff,
    upstream::{self, Pool},
};

const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Intercept(#[from] InterceptError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    LocalAddrs(#[from] LocalAddrsError),
    #[error("creating the {family:?} listener: {source}")]
    Listen { family: Family, source: io::Error },
    #[error("installing signal handlers: {0}")]
    Signals(io::Error),
    #[error("{path}: no interface {name:?} in this network namespace")]
    NoInterface { path: String, name: String },
    #[error("this host is not set up for the policy:\n  {}", .0.join("\n  "))]
    Sysctl(Vec<String>),
}

/// Run-time settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub grace_period: Duration,
    pub connect_timeout: Duration,
    pub max_connections: usize,
    pub sniff_timeout: Duration,
    /// The packet mark of local delivery, and its routing table.
    pub mark: Mark,
    pub routing_table: u32,
}

/// What every connection task shares.
struct Shared {
    policy: Policy,
    pools: Vec<Pool>,
    local: Arc<LocalAddrs>,
    settings: Settings,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
}

/// Runs until SIGTERM or SIGINT, then drains and cleans up.
pub async fn run(policy: Policy, settings: Settings) -> Result<(), ServerError> {
    let leftovers = routes::remove_leftovers().await?;
    if leftovers > 0 {
        tracing::warn!(
            routes = leftovers,
            "removed routes and rules left by an earlier daemon"
        );
    }
    let mut signals = Signals::new()?;

    let mut interceptor = Interceptor::load(&policy, settings.mark)?;
    let owned = owned_prefixes(&policy);
    let listeners = bind_listeners(&policy, &mut interceptor)?;
    let local = LocalAddrs::load(&owned).await?;
    local.watch()?;
    let classify = classify_plan(&policy, &interfaces::list().await?, &local)?;
    let marking: Vec<String> = classify.iter().map(|(i, ..)| i.name.clone()).collect();
    let findings = sysctl::check(&sysctl::Plan {
        gateway_v4: gateway_family(&policy, true),
        gateway_v6: gateway_family(&policy, false),
        marking: &marking,
    });
    for warning in &findings.warnings {
        tracing::warn!("{warning}");
    }
    if !findings.errors.is_empty() {
        return Err(ServerError::Sysctl(findings.errors));
    }
    let local_servers = local_transparent_servers(&policy, &local);

    let mut installed = Installed {
        local_routes: LocalRoutes::install(&owned).await?,
        delivery: None,
    };
    let attached = async {
        if !classify.is_empty() || !local_servers.is_empty() {
            installed.delivery = Some(
                Delivery::install(settings.mark, settings.routing_table, &local_servers).await?,
            );
        }
        for (interface, role, rules) in &classify {
            interceptor.attach_classify(interface, *role, rules)?;
        }
        interceptor.attach()?;
        Ok::<_, ServerError>(())
    }
    .await;
    if let Err(e) = attached {
        interceptor.detach()?;
        installed.remove().await?;
        return Err(e);
    }
    tracing::info!(
        rules = policy.rules.len(),
        kernel_entries = interceptor.rule_entries(),
        routes = ?installed.local_routes.added(),
        tc_interfaces = ?interceptor.classify_interfaces(),
        local_servers = ?local_servers,
        listeners = ?listeners.iter().map(|l| l.local_addr().ok()).collect::<Vec<_>>(),
        "ready"
    );

    let shared = Arc::new(Shared {
        pools: policy.upstreams.iter().map(Pool::new).collect(),
        policy,
        local,
        limit: Arc::new(Semaphore::new(settings.max_connections)),
        settings,
        shutdown: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    for listener in listeners {
        tracker.spawn(accept_loop(
            listener,
            shared.clone(),
            tracker.clone(),
            stop_accepting.clone(),
        ));
    }

    signals.recv().await;
    interceptor.drain()?;
    stop_accepting.cancel();
    tracker.close();
    tracing::info!(
        open_connections = shared.settings.max_connections - shared.limit.available_permits(),
        grace_period = ?shared.settings.grace_period,
        "draining: no new connections are taken"
    );
    if tokio::time::timeout(shared.settings.grace_period, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the connections still open");
        shared.shutdown.cancel();
        tracker.wait().await;
    }
    interceptor.detach()?;
    log_counters(&interceptor);
    installed.remove().await?;
    tracing::info!("stopped");
    Ok(())
}

/// The routing state this daemon added, removed on exit (and on a failed
/// start).
struct Installed {
    local_routes: LocalRoutes,
    delivery: Option<Delivery>,
}

impl Installed {
    async fn remove(&mut self) -> Result<(), RouteError> {
        if let Some(delivery) = &mut self.delivery {
            delivery.remove().await?;
        }
        self.local_routes.remove().await
    }
}

/// Where `classify` goes, and what it does there: every interface a gateway
/// rule lists (with those rules), and, when some upstream connection is made
/// from an address that is not this host's own (a client's, or a fixed one),
/// every interface but loopback whose packets it can read, since a server's
/// replies may come in on any.
fn classify_plan(
    policy: &Policy,
    all: &[Interface],
    local: &LocalAddrs,
) -> Result<Vec<(Interface, ClassifyRole, Vec<usize>)>, ServerError> {
    let mut plan: Vec<(Interface, ClassifyRole, Vec<usize>)> = Vec::new();
    for (r, rule) in policy.rules.iter().enumerate() {
        for (k, name) in rule.interfaces.iter().enumerate() {
            let interface =
                all.iter()
                    .find(|i| &i.name == name)
                    .ok_or_else(|| ServerError::NoInterface {
                        path: format!("intercept[{r}].interfaces[{k}]"),
                        name: name.clone(),
                    })?;
            match plan.iter_mut().find(|(i, ..)| i == interface) {
                Some((_, _, rules)) => rules.push(r),
                None => plan.push((
                    interface.clone(),
                    ClassifyRole {
                        intercept: true,
                        replies: false,
                    },
                    vec![r],
                )),
            }
        }
    }
    let spoofing = policy
        .bind_targets()
        .iter()
        .any(|target| match target.bind {
            Bind::Proxy => false,
            Bind::ClientIp | Bind::Client => true,
            Bind::Address(ip) => !local.contains(ip),
        });
    if spoofing {
        let readable = all
            .iter()
            .filter(|i| !i.is_loopback() && i.l2_len.is_some());
        for interface in readable {
            match plan.iter_mut().find(|(i, ..)| i == interface) {
                Some((_, role, _)) => role.replies = true,
                None => plan.push((
                    interface.clone(),
                    ClassifyRole {
                        intercept: false,
                        replies: true,
                    },
                    Vec::new(),
                )),
            }
        }
    }
    Ok(plan)
}

/// Whether gateway rules intercept prefixes of one family.
fn gateway_family(policy: &Policy, v4: bool) -> bool {
    policy
        .rules
        .iter()
        .filter(|rule| rule.is_gateway())
        .flat_map(|rule| &rule.prefixes)
        .any(|prefix| prefix.addr().is_ipv4() == v4)
}

/// Servers on this host that connections are made to from client
/// addresses: their replies need a routing rule of their own.
fn local_transparent_servers(policy: &Policy, local: &LocalAddrs) -> Vec<SocketAddr> {
    let mut servers: Vec<SocketAddr> = policy
        .bind_targets()
        .iter()
        .filter(|target| target.bind.is_client())
        .flat_map(|target| policy.upstreams[target.upstream.0].servers())
        .copied()
        .filter(|server| local.contains(server.ip()))
        .collect();
    servers.sort();
    servers.dedup();
    servers
}

/// One listener per family among the intercepted prefixes, bound to loopback on a free
/// port: `sk_lookup` assigns it whatever the connection's destination. With
/// gateway rules they are transparent: a connection's local address is then
/// not this host's, and the kernel sends the SYN-ACK from it only for a
/// transparent socket.
fn bind_listeners(
    policy: &Policy,
    interceptor: &mut Interceptor,
) -> Result<Vec<TcpListener>, ServerError> {
    let prefixes: Vec<IpNet> = policy
        .rules
        .iter()
        .flat_map(|r| r.prefixes.iter().copied())
        .collect();
    let transparent = policy.rules.iter().any(|rule| rule.is_gateway());
    let mut listeners = Vec::new();
    for (family, wanted, addr) in [
        (
            Family::V4,
            prefixes.iter().any(|p| matches!(p, IpNet::V4(_))),
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        ),
        (
            Family::V6,
            prefixes.iter().any(|p| matches!(p, IpNet::V6(_))),
            SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
        ),
    ] {
        if !wanted {
            continue;
        }
        let listener =
            listen(addr, transparent).map_err(|source| ServerError::Listen { family, source })?;
        interceptor.set_listener(family, &listener)?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn listen(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        // Each family has its own listener; never see IPv4-mapped addresses.
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(transparent)?;
    } else {
        socket.set_ip_transparent_v4(transparent)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The prefixes this host takes as its own (rules without `interfaces`):
/// they get `local` routes.
fn owned_prefixes(policy: &Policy) -> Vec<IpNet> {
    let mut prefixes: Vec<IpNet> = policy
        .rules
        .iter()
        .filter(|r| !r.is_gateway())
        .flat_map(|r| r.prefixes.iter().copied())
        .collect();
    prefixes.sort();
    prefixes.dedup();
    prefixes
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
            tracing::warn!(
                client = ?stream.peer_addr().ok(),
                limit = shared.settings.max_connections,
                "connection limit reached; closing"
            );
            continue;
        };
        let shared = shared.clone();
        tracker.spawn(async move {
            serve(stream, &shared).await;
            drop(permit);
        });
    }
}

/// Relays one client connection and logs one line when it ends.
async fn serve(client: TcpStream, shared: &Shared) {
    let started = Instant::now();
    let (Ok(peer), Ok(local)) = (client.peer_addr(), client.local_addr()) else {
        return; // The client is already gone.
    };
    let (client_addr, orig_dst) = (ClientAddr(peer), OrigDstAddr(local));
    let _ = client.set_nodelay(true);

    let Some(rule_id) = route::match_rule(&shared.policy, orig_dst.0) else {
        // The kernel steered it, so a rule matched there; userspace disagreeing
        // would be a bug in one of the two matchers.
        tracing::error!(client = %client_addr, orig_dst = %orig_dst, "steered connection matches no rule; closing");
        return;
    };
    let rule = &shared.policy.rules[rule_id.0];
    let conn = route::Connection {
        client: client_addr,
        orig_dst,
        rule: rule_id,
    };
    let mut sniffed = None;
    let mut sniff_gave_up = None;
    let mut decision = route::decide(&shared.policy, &conn, None);
    if matches!(decision, route::Decision::NeedHello) {
        let said = match hello::peek_until(
            &client,
            sniff::MAX_SNIFF_LEN,
            shared.settings.sniff_timeout,
            |bytes| match sniff::sniff(bytes) {
                sniff::SniffResult::Done(said) => Some(said),
                sniff::SniffResult::NeedMore => None,
            },
        )
        .await
        {
            Ok(Ok(said)) => said,
            Ok(Err(gave_up)) => {
                sniff_gave_up = Some(gave_up.as_str());
                sniff::Sniffed::Other
            }
            Err(e) => {
                tracing::info!(client = %client_addr, error = %e, "client failed while sniffing");
                return;
            }
        };
        decision = route::decide(&shared.policy, &conn, Some(&hello_of(&said)));
        sniffed = Some(said);
    }
    let (upstream_id, bind, route_why) = match decision {
        route::Decision::Upstream {
            upstream,
            bind,
            why,
            ..
        } => (upstream, bind, why.route_name()),
        refused => {
            refuse(client, sniffed.as_ref()).await;
            tracing::info!(
                client = %client_addr,
                orig_dst = %orig_dst,
                rule = %rule.name,
                sni = sniffed.as_ref().and_then(sni_of),
                host = sniffed.as_ref().and_then(host_of),
                alpn = sniffed.as_ref().and_then(alpn_of),
                sniff_gave_up,
                route = match &refused {
                    route::Decision::Reject { why } => why.route_name(),
                    _ => "none".to_owned(),
                },
                decision = %refused,
                duration_ms = started.elapsed().as_millis() as u64,
                outcome = "refused",
                "connection closed"
            );
            return;
        }
    };
    let pool = &shared.pools[upstream_id.0];
    let request = upstream::Request {
        client: client_addr,
        orig_dst,
        bind,
    };
    let connected = match pool
        .connect(&request, &shared.local, shared.settings.connect_timeout)
        .await
    {
        Ok(connected) => connected,
        Err(e) => {
            tracing::warn!(
                client = %client_addr,
                orig_dst = %orig_dst,
                rule = %rule.name,
                route = %route_why,
                upstream = e.upstream().map(tracing::field::display),
                bind = %bind,
                bytes_from_client = 0,
                bytes_from_upstream = 0,
                duration_ms = started.elapsed().as_millis() as u64,
                outcome = %format!("upstream connect failed: {e}"),
                "connection closed"
            );
            return;
        }
    };
    let upstream_addr = connected.upstream;
    let source = connected.stream.local_addr().ok();
    let relayed = relay::relay(client, connected.stream, &shared.shutdown).await;
    tracing::info!(
        client = %client_addr,
        orig_dst = %orig_dst,
        rule = %rule.name,
        route = %route_why,
        sni = sniffed.as_ref().and_then(sni_of),
        host = sniffed.as_ref().and_then(host_of),
        alpn = sniffed.as_ref().and_then(alpn_of),
        sniff_gave_up,
        upstream = %upstream_addr,
        bind = %bind,
        source = source.map(tracing::field::display),
        bind_fallback = connected.fallback.map(tracing::field::display),
        bytes_from_client = relayed.from_client,
        bytes_from_upstream = relayed.from_upstream,
        duration_ms = started.elapsed().as_millis() as u64,
        outcome = %relayed.outcome,
        "connection closed"
    );
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

fn host_of(said: &sniff::Sniffed) -> Option<&str> {
    match said {
        sniff::Sniffed::Http(request) => request.host.as_deref(),
        _ => None,
    }
}

const SERVICE_UNAVAILABLE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\n\
no route to service\n";

/// No route, or a rejecting one: TLS gets a reset, HTTP/1.x a 503, the rest a close.
async fn refuse(mut client: TcpStream, sniffed: Option<&sniff::Sniffed>) {
    match sniffed {
        Some(sniff::Sniffed::Tls(_)) => {
            // Linger 0: close() sends a reset instead of a FIN.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        }
        Some(sniff::Sniffed::Http(_)) => {
            let _ = client.write_all(SERVICE_UNAVAILABLE).await;
            let _ = client.shutdown().await;
        }
        _ => {}
    }
}

fn log_counters(interceptor: &Interceptor) {
    match interceptor.counters() {
        Ok(counters) => {
            let summary: Vec<String> = counters
                .iter()
                .map(|(c, n)| format!("{}={n}", c.name()))
                .collect();
            tracing::info!(counters = %summary.join(" "), "kernel counters");
        }
        Err(e) => tracing::warn!(error = %e, "reading kernel counters"),
    }
}

/// SIGTERM and SIGINT, the two ways to ask the daemon to stop.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, ServerError> {
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(ServerError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(ServerError::Signals)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
