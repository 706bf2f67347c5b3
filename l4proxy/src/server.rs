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
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    admission::{Admission, Refusal},
    conn_id::ConnectionIds,
    control,
    explicit::{ExplicitListeners, ListenError, Opened},
    install::{self, Applied, InstallError, Installation},
    intercept::{delivery::Mark, interfaces, routes::RouteError},
    metrics::Metrics,
    notify,
    policy::{Keepalive, Policy, PolicyError},
    relay,
    session::{self, Defaults, Front, Shared},
    status,
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error("installing signal handlers: {0}")]
    Signals(io::Error),
    #[error("watching the interfaces: {0}")]
    Links(#[from] RouteError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("admin listener on {addr}: {error}")]
    Admin {
        addr: std::net::SocketAddr,
        error: io::Error,
    },
}

/// How often to look for replaced policies whose connections are all closed.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// How often to close the splice pipes nothing needed since the last time.
const TRIM_PIPES_EVERY: Duration = Duration::from_secs(5);

/// Run-time settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Reread on SIGHUP.
    pub policy_path: PathBuf,
    pub grace_period: Duration,
    pub connect_timeout: Duration,
    /// Already fitted to the open-files limit (`descriptors`).
    pub max_connections: usize,
    pub max_connections_per_client: Option<u32>,
    pub sniff_timeout: Duration,
    pub defaults: Defaults,
    /// The packet mark of local delivery, and its routing table.
    pub mark: Mark,
    pub routing_table: u32,
    /// Where Prometheus scrapes `/metrics`, if anywhere.
    pub admin: Option<std::net::SocketAddr>,
}

/// Runs until SIGTERM or SIGINT, then drains and cleans up; rereads the
/// policy on SIGHUP.
pub async fn run(policy: Policy, settings: Settings) -> Result<(), ServerError> {
    install::remove_leftovers().await?;
    let mut signals = Signals::new()?;
    let mut host_changes = interfaces::watch()?;
    let started = std::time::Instant::now();
    let metrics = Metrics::new();
    let admin = match settings.admin {
        Some(addr) => Some(
            admin::bind(addr)
                .await
                .map_err(|error| ServerError::Admin { addr, error })?,
        ),
        None => None,
    };
    let mut installation = Installation::new(
        settings.mark,
        settings.routing_table,
        settings.defaults.keepalive,
        metrics.clone(),
    )
    .await?;
    let mut explicit = ExplicitListeners::default();
    let opened = explicit.bind_new(&policy, settings.defaults.keepalive)?;
    let Applied {
        active,
        new_listeners,
    } = match installation.apply(policy).await {
        Ok(applied) => applied,
        Err(e) => {
            // Undo what can be undone, and report the error that stopped us.
            if let Err(undo) = installation.remove().await {
                tracing::warn!(error = %undo, "removing what a failed start set up");
            }
            return Err(e.into());
        }
    };

    let shared = Arc::new(Shared {
        // Moved, not cloned: a replaced policy is forgotten once only its
        // connections held it (see `Installation::settle`).
        active: std::sync::RwLock::new(active),
        local: installation.local_addrs().clone(),
        ids: ConnectionIds::new(),
        connect_timeout: settings.connect_timeout,
        sniff_timeout: settings.sniff_timeout,
        shutdown: CancellationToken::new(),
        admission: Admission::new(settings.max_connections_per_client),
        defaults: settings.defaults,
    });
    let accepting = Accepting {
        shared: shared.clone(),
        limit: Limit {
            permits: Arc::new(Semaphore::new(settings.max_connections)),
            max: settings.max_connections,
        },
        tracker: TaskTracker::new(),
        stop: CancellationToken::new(),
    };
    metrics.in_force();
    let listeners = accepting.start(new_listeners);
    accepting.start_explicit(&mut explicit, &shared.active().policy, opened);
    let (scrape, mut scrapes) = tokio::sync::mpsc::channel(4);
    if let Some(listener) = admin {
        tokio::spawn(admin::serve(listener, scrape, accepting.stop.clone()));
    }
    let (ask, mut requests) = tokio::sync::mpsc::channel(4);
    match control::bind() {
        Ok(listener) => {
            tokio::spawn(control::serve(listener, ask, accepting.stop.clone()));
        }
        // The daemon works without it; `status` and `reload` do not.
        Err(e) => {
            tracing::warn!(error = %e, "no control socket: l4proxy status and reload will not reach this daemon")
        }
    }
    tracing::info!(
        listeners = ?listeners,
        max_connections = settings.max_connections,
        admin = settings.admin.map(tracing::field::display),
        "ready"
    );
    notify::ready(metrics.generation());
    let mut listening: Vec<String> = listeners
        .iter()
        .flatten()
        .map(|addr| format!("steered {addr}"))
        .collect();
    listening.extend(connect_listeners(&shared.active().policy));

    let mut settle = tokio::time::interval(SETTLE_EVERY);
    let mut trim_pipes = tokio::time::interval(TRIM_PIPES_EVERY);
    loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Stop => {
                    notify::stopping(accepting.limit.open(), settings.grace_period);
                    break;
                }
                Signal::Reload => {
                    let _ = reload_now(&settings, &mut installation, &mut explicit, &accepting, &shared, &mut listening).await;
                }
            },
            Some((request, reply)) = requests.recv() => {
                let answer = match request {
                    control::Request::Reload => match reload_now(&settings, &mut installation, &mut explicit, &accepting, &shared, &mut listening).await {
                        Ok(()) => serde_json::json!({ "ok": true }),
                        Err(error) => serde_json::json!({ "ok": false, "error": error }),
                    },
                    control::Request::Status => {
                        let daemon = status::Daemon {
                            policy_file: &settings.policy_path,
                            generation: metrics.generation(),
                            started,
                            listeners: listening.clone(),
                            kernel: installation.kernel_counters(),
                        };
                        status::snapshot(&daemon, &shared.active())
                    }
                };
                let _ = reply.send(answer);
            }
            Some(reply) = scrapes.recv() => {
                let active = shared.active();
                let servers = server_readings(&active);
                let _ = reply.send(metrics.encode(&installation.kernel_counters(), &servers));
            }
            // An interface or an address came or went: where `classify` must
            // run, and what is this host's, may have changed (a new VPN
            // interface, a VIP).
            Some(()) = host_changes.recv() => {
                if let Err(e) = installation.refresh().await {
                    tracing::error!(error = %e, "following a change of interfaces or addresses");
                }
            }
            _ = settle.tick() => {
                if let Err(e) = installation.settle().await {
                    tracing::error!(error = %e, "removing what a replaced policy needed");
                }
            }
            _ = trim_pipes.tick() => {
                let open = relay::trim_pipes();
                tracing::debug!(open, "splice pipes");
            }
        }
    }

    installation.drain()?;
    accepting.stop.cancel();
    accepting.tracker.close();
    let limit = &accepting.limit;
    tracing::info!(
        open_connections = limit.open(),
        grace_period = ?settings.grace_period,
        "draining: no new connections are taken"
    );
    if tokio::time::timeout(settings.grace_period, accepting.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the connections still open");
        shared.shutdown.cancel();
        accepting.tracker.wait().await;
    }
    installation.remove().await?;
    tracing::info!(refused = %shared.admission.summary(), "connections refused over limits");
    tracing::info!("stopped");
    Ok(())
}

/// Reads and checks a policy file, and logs its warnings.
pub fn load_policy(path: &Path) -> Result<Policy, PolicyError> {
    let policy = Policy::load(path)?;
    for warning in policy.warnings() {
        tracing::warn!("{}: warning: {warning}", path.display());
    }
    Ok(policy)
}

/// Reloads the policy (on SIGHUP, or asked on the control socket) and
/// puts it in force for new connections; counted, and logged either way.
/// The error says why the running policy stays.
async fn reload_now(
    settings: &Settings,
    installation: &mut Installation,
    explicit: &mut ExplicitListeners,
    accepting: &Accepting,
    shared: &Shared,
    listening: &mut Vec<String>,
) -> Result<(), String> {
    let keepalive = settings.defaults.keepalive;
    notify::reloading();
    let reloaded = reload(&settings.policy_path, installation, explicit, keepalive).await;
    let metrics = installation.metrics();
    metrics.reloaded(reloaded.is_ok());
    if let Err(reason) = &reloaded {
        notify::refused(reason, metrics.generation());
    }
    let (applied, opened) = reloaded?;
    metrics.in_force();
    // The new listeners' queued clients find their rules.
    shared.set_active(applied.active.clone());
    accepting.start_explicit(explicit, &applied.active.policy, opened);
    let steered = accepting.start(applied.new_listeners);
    listening.extend(
        steered
            .iter()
            .flatten()
            .map(|addr| format!("steered {addr}")),
    );
    listening.retain(|l| l.starts_with("steered "));
    listening.extend(connect_listeners(&applied.active.policy));
    tracing::info!("policy reloaded");
    notify::reloaded(metrics.generation());
    Ok(())
}

/// Every server of the policy in force, with its health and load.
fn server_readings(active: &session::Active) -> Vec<crate::metrics::ServerReading<'_>> {
    active
        .policy
        .upstreams
        .iter()
        .zip(&active.pools)
        .flat_map(|(upstream, pool)| {
            pool.servers_state()
                .into_iter()
                .map(|status| crate::metrics::ServerReading {
                    upstream: &upstream.name,
                    status,
                })
        })
        .collect()
}

/// How `status` names a policy's CONNECT listeners.
fn connect_listeners(policy: &Policy) -> Vec<String> {
    policy
        .rules
        .iter()
        .filter_map(|rule| Some((rule, rule.connect.as_ref()?)))
        .flat_map(|(rule, connect)| {
            connect
                .listen
                .iter()
                .map(move |addr| format!("CONNECT {addr} ({})", rule.name))
        })
        .collect()
}

/// Rereads the policy file and applies it, with the CONNECT listeners it
/// adds. A policy that is refused, by the check or by the host, is logged
/// with why, and the running one stays; the error says why.
async fn reload(
    path: &Path,
    installation: &mut Installation,
    explicit: &ExplicitListeners,
    keepalive: Keepalive,
) -> Result<(Applied, Opened), String> {
    let refused = |e: &dyn std::fmt::Display| {
        tracing::error!("policy not reloaded: {e}; the running policy stays in force");
        e.to_string()
    };
    let policy = load_policy(path).map_err(|e| refused(&e))?;
    let opened = explicit
        .bind_new(&policy, keepalive)
        .map_err(|e| refused(&e))?;
    let applied = installation.apply(policy).await.map_err(|e| {
        tracing::error!(
            "policy not reloaded: {e}; the running policy stays in force for new connections"
        );
        e.to_string()
    })?;
    Ok((applied, opened))
}

/// What the accept loops share.
struct Accepting {
    shared: Arc<Shared>,
    limit: Limit,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Accepting {
    /// Accepts on the steered `listeners` until stopped; returns their
    /// addresses.
    fn start(&self, listeners: Vec<TcpListener>) -> Vec<Option<std::net::SocketAddr>> {
        let addresses = listeners.iter().map(|l| l.local_addr().ok()).collect();
        for listener in listeners {
            self.accept(listener, Front::Steered, self.stop.clone());
        }
        addresses
    }

    /// Accepts on the CONNECT listeners `policy` adds, and stops those it
    /// drops.
    fn start_explicit(&self, explicit: &mut ExplicitListeners, policy: &Policy, opened: Opened) {
        explicit.commit(policy, opened, &self.stop, |listener, stop| {
            self.accept(listener, Front::Connect, stop);
        });
    }

    fn accept(&self, listener: TcpListener, front: Front, stop: CancellationToken) {
        self.tracker.spawn(accept_loop(
            listener,
            front,
            self.shared.clone(),
            self.limit.clone(),
            self.tracker.clone(),
            stop,
        ));
    }
}

/// At most `max` connections at once.
#[derive(Clone)]
struct Limit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Limit {
    /// Connections open now.
    fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

async fn accept_loop(
    listener: TcpListener,
    front: Front,
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
            shared.admission.refuse(&stream, peer, Refusal::Global);
            continue;
        };
        let shared = shared.clone();
        tracker.spawn(async move {
            session::serve(stream, peer, front, &shared).await;
            drop(permit);
        });
    }
}

/// What a signal asks of the daemon.
enum Signal {
    /// SIGHUP: reread the policy.
    Reload,
    /// SIGTERM, SIGINT: drain and stop.
    Stop,
}

/// The signals the daemon answers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, ServerError> {
        let listen = |kind| signal(kind).map_err(ServerError::Signals);
        Ok(Self {
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
            hup: listen(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
