//! The daemon: kernel set-up, listeners, the accept loop (one `session` task
//! per connection), and an orderly shutdown.
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
    time::Duration,
};

use ipnet::IpNet;
use socket2::{Domain, Socket, Type};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    conn_id::ConnectionIds,
    intercept::{
        ClassifyRole, Family, InterceptError, Interceptor,
        delivery::{Delivery, DeliveryError, Mark},
        interfaces::{self, Interface},
        routes::{self, LocalRoutes, RouteError},
        rules::{self, RuleIndex},
        sysctl,
    },
    local_addrs::{self, LocalAddrs, LocalAddrsError},
    policy::{Bind, Policy},
    session::{self, Shared},
    upstream::Pool,
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
    #[error(
        "{path}: interface {name:?} is a port of {master:?} (a bridge, bond or VRF): its IP traffic arrives on {master:?}; list that instead"
    )]
    Enslaved {
        path: String,
        name: String,
        master: String,
    },
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

    let entries = rules::compile(&policy);
    let mut interceptor = Interceptor::load(&policy, &entries, settings.mark)?;
    let owned = owned_prefixes(&policy);
    let listeners = bind_listeners(&policy, &mut interceptor)?;
    let mut local_map = interceptor
        .take_local_map()
        .expect("a freshly loaded interceptor has its map");
    let sink: local_addrs::Sink = Box::new(move |prefixes| {
        if let Err(e) = local_map.set(prefixes) {
            tracing::warn!(error = %e, "updating this host's addresses in the kernel");
        }
    });
    let local = LocalAddrs::load(&owned, Some(sink)).await?;
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
        // Undo what can be undone, and report the error that stopped us.
        if let Err(undo) = interceptor.detach() {
            tracing::warn!(error = %undo, "detaching after a failed start");
        }
        if let Err(undo) = installed.remove().await {
            tracing::warn!(error = %undo, "removing routes after a failed start");
        }
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
        rules: RuleIndex::new(&entries),
        pools: policy.upstreams.iter().map(Pool::new).collect(),
        policy,
        local,
        ids: ConnectionIds::new(),
        connect_timeout: settings.connect_timeout,
        sniff_timeout: settings.sniff_timeout,
        shutdown: CancellationToken::new(),
    });
    let limit = Limit {
        permits: Arc::new(Semaphore::new(settings.max_connections)),
        max: settings.max_connections,
    };
    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    for listener in listeners {
        tracker.spawn(accept_loop(
            listener,
            shared.clone(),
            limit.clone(),
            tracker.clone(),
            stop_accepting.clone(),
        ));
    }

    signals.recv().await;
    interceptor.drain()?;
    stop_accepting.cancel();
    tracker.close();
    tracing::info!(
        open_connections = limit.max - limit.permits.available_permits(),
        grace_period = ?settings.grace_period,
        "draining: no new connections are taken"
    );
    if tokio::time::timeout(settings.grace_period, tracker.wait())
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
            let path = || format!("intercept[{r}].interfaces[{k}]");
            let interface =
                all.iter()
                    .find(|i| &i.name == name)
                    .ok_or_else(|| ServerError::NoInterface {
                        path: path(),
                        name: name.clone(),
                    })?;
            // `steer` checks the interface a connection arrived on, which
            // for a port is its master, not the port `classify` ran on.
            if let Some(master) = interface.master {
                return Err(ServerError::Enslaved {
                    path: path(),
                    name: name.clone(),
                    master: all
                        .iter()
                        .find(|i| i.index == master)
                        .map_or_else(|| format!("ifindex {master}"), |i| i.name.clone()),
                });
            }
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
        .any(|target| spoofs(target.bind, local));
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

/// Whether connections under `bind` come from an address that is not this
/// host's, whose replies the kernel must be told to deliver here.
fn spoofs(bind: Bind, local: &LocalAddrs) -> bool {
    match bind {
        Bind::Proxy => false,
        Bind::ClientIp | Bind::Client => true,
        Bind::Address(ip) => !local.contains(ip),
    }
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

/// Servers on this host that connections are made to from addresses that
/// are not this host's (a client's, or a fixed one): their replies need a
/// routing rule of their own.
fn local_transparent_servers(policy: &Policy, local: &LocalAddrs) -> Vec<SocketAddr> {
    let mut servers: Vec<SocketAddr> = policy
        .bind_targets()
        .iter()
        .filter(|target| spoofs(target.bind, local))
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
    // Accepted sockets inherit it: one setsockopt here instead of one per
    // connection.
    socket.set_tcp_nodelay(true)?;
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

/// At most `max` connections at once.
#[derive(Clone)]
struct Limit {
    permits: Arc<Semaphore>,
    max: usize,
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Limit,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
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
        let Ok(permit) = limit.permits.clone().try_acquire_owned() else {
            tracing::warn!(
                client = %peer,
                limit = limit.max,
                "connection limit reached; closing"
            );
            continue;
        };
        let shared = shared.clone();
        tracker.spawn(async move {
            session::serve(stream, peer, &shared).await;
            drop(permit);
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `serve` relies on it: sockets accepted from our listeners have
    /// `TCP_NODELAY` without a setsockopt of their own.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), false).unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
