//! The daemon: kernel set-up, listeners, the accept loops on the workers
//! (`workers`; one `session` task per connection, on the worker that
//! accepted it), and an orderly shutdown.
//!
//! Start-up order matters: listeners go into the socket map before the programs
//! are attached, and the routes and routing rules go in before them too, so the
//! first steered SYN already finds a socket. Shutdown runs the other way round:
//! stop taking new connections first (they are refused, or forwarded past us
//! on a gateway) instead of dropping them while we drain, and keep delivering
//! the open ones' packets until they are done.
//!
//! A takeover (`takeover`, docs/takeover.md) replaces the first and last
//! steps: a successor starts from its predecessor's listeners and routing
//! state instead of a clean namespace, and a predecessor that handed over
//! drains without removing what its successor uses. A service manager is
//! told (`notify`) when the daemon is ready, reloads, stops, or has handed
//! over.

use std::{
    io,
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    admission::{Admission, Refusal},
    allocator,
    conn_id::ConnectionIds,
    control,
    explicit::{ExplicitListeners, ListenError, Opened},
    install::{self, Applied, InstallError, Installation},
    intercept::{Family, delivery::Mark, guard::Guard, interfaces, routes::RouteError},
    metrics::Metrics,
    notify,
    policy::{Keepalive, Policy, PolicyError},
    privilege::{self, PrivilegeError},
    relay,
    session::{self, Defaults, Front, Shared},
    status,
    takeover::{self, Handover, Listeners, Restart, TakeoverError},
    upstream,
    workers::{self, Workers},
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
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error("admin listener on {addr}: {error}")]
    Admin {
        addr: std::net::SocketAddr,
        error: io::Error,
    },
    #[error(transparent)]
    Control(#[from] control::BindError),
    #[error(transparent)]
    Takeover(#[from] TakeoverError),
    #[error("keeping a copy of the {what} descriptor for a takeover: {error}")]
    Descriptor {
        what: &'static str,
        error: io::Error,
    },
    #[error("stopped by SIGTERM or SIGINT while starting")]
    StoppedStarting,
}

/// How the daemon ended. Only `Stopped` is a stop: after `HandedOver` the
/// service goes on in the successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// SIGTERM or SIGINT: drained, everything removed.
    Stopped,
    /// A successor took over (this pid); this daemon drained its own
    /// connections and removed only its programs.
    HandedOver { successor: u32 },
}

/// How often to look for replaced policies whose connections are all closed.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// How often to close the splice pipes nothing needed since the last time,
/// and give back the pages the allocator kept longer than its decay time.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// How long an exiting daemon waits for its control answers to go out.
const ANSWERS_GRACE: Duration = Duration::from_secs(1);

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
    /// Who to run as once started (`--user`); root if none.
    pub user: Option<privilege::User>,
    /// Take over from the daemon running in this network namespace.
    pub takeover: bool,
    /// How `l4proxy upgrade` starts this daemon's successor.
    pub restart: Restart,
}

/// Runs until SIGTERM or SIGINT, then drains and cleans up, or until a
/// successor has taken over, then drains; rereads the policy on SIGHUP.
/// `guard` is told when the routes become this daemon's, and when they are
/// handed on. Connections are accepted and served on `workers`; this
/// function (the control plane) runs on a runtime of its own.
pub async fn run(
    policy: Policy,
    settings: Settings,
    guard: &Guard,
    workers: &Workers,
) -> Result<Ended, ServerError> {
    // First: a start can take long (a takeover waits for the running
    // daemon). A SIGHUP that comes meanwhile rereads the policy once the
    // daemon serves. A SIGTERM or SIGINT during a takeover ends the start,
    // undone, while the running daemon it would take over from has not
    // taken our `ready` (it serves on): while asking it, while the policy
    // is applied (looked for after), and while waiting for its answer. One
    // that comes to a fresh start is a stop once the daemon serves.
    let mut signals = Signals::new()?;
    // The namespace's kernel state is nobody's (a clean start: what a
    // crashed daemon left goes), or the running daemon's, which hands it on.
    let (mut predecessor, handed) = if settings.takeover {
        let asked = tokio::select! {
            asked = takeover::request(settings.mark, settings.routing_table) => asked,
            () = signals.stopped() => return Err(ServerError::StoppedStarting),
        };
        let (predecessor, handed) = asked?;
        tracing::info!(
            predecessor = predecessor.pid,
            "takeover: the running daemon handed over its listeners"
        );
        (Some(predecessor), handed)
    } else {
        let control = control::bind()?;
        // This namespace's routes are ours from here on.
        arm(guard);
        install::remove_leftovers().await?;
        (None, takeover::Handed::fresh(control))
    };
    let takeover::Handed {
        control: control_listener,
        steered: handed_steered,
        connect: handed_connect,
        admin: handed_admin,
        routing: handed_routing,
    } = handed;
    let mut host_changes = interfaces::watch()?;
    let started = std::time::Instant::now();
    let metrics = Metrics::new();
    let admin = match settings.admin {
        Some(addr) => Some(match handed_admin {
            Some((handed, listener)) if handed == addr => listener,
            _ => admin::bind(addr)
                .await
                .map_err(|error| ServerError::Admin { addr, error })?,
        }),
        None => None,
    };
    let mut installation = Installation::new(
        settings.mark,
        settings.routing_table,
        settings.defaults.keepalive,
        workers.count(),
        metrics.clone(),
    )
    .await?;
    if predecessor.is_some() {
        installation.adopt_routing(handed_routing);
        installation.adopt_listeners(handed_steered)?;
    }
    if predecessor.as_ref().is_some_and(|p| p.holds) {
        installation.hold_programs();
    }
    let mut explicit = ExplicitListeners::new(workers.count());
    explicit.adopt(handed_connect);
    // A predecessor's listeners change (their settings, more members in
    // their groups) only once the policy is in force.
    // The CONNECT listeners a policy adds are bound before the handed
    // groups take members of ours: one that cannot be bound (its address
    // in use) fails the start before a handed group deals connections to
    // members that would close with it.
    let in_force = async {
        let applied = installation.apply(policy, |_| {}).await?;
        let opened = explicit.bind_new(&applied.active.policy, settings.defaults.keepalive)?;
        let adopted = installation.join_adopted()?;
        Ok::<_, ServerError>((applied, adopted, opened))
    }
    .await;
    let (
        Applied {
            active,
            new_listeners,
        },
        mut steered,
        opened,
    ) = match in_force {
        Ok(in_force) => in_force,
        Err(e) => {
            // Undo what can be undone (what a predecessor handed over stays
            // its own), and report the error that stopped us.
            installation.release_inherited();
            if let Err(undo) = installation.remove().await {
                tracing::warn!(error = %undo, "removing what a failed start set up");
            }
            return Err(e);
        }
    };

    let shared = Arc::new(Shared {
        // Moved, not cloned: a replaced policy is forgotten once only its
        // connections held it (see `Installation::settle`).
        active: std::sync::RwLock::new(active),
        other: std::sync::RwLock::new(std::sync::Weak::new()),
        local: installation.local_addrs().clone(),
        ids: ConnectionIds::new(),
        connect_timeout: settings.connect_timeout,
        sniff_timeout: settings.sniff_timeout,
        shutdown: CancellationToken::new(),
        admission: Admission::new(settings.max_connections_per_client, &metrics),
        defaults: settings.defaults,
    });
    let accepting = Accepting {
        shared: shared.clone(),
        limit: Limit::new(settings.max_connections),
        tracker: TaskTracker::new(),
        stop: CancellationToken::new(),
        handed_over: Arc::default(),
        workers,
    };
    metrics.in_force();
    // What can fail is done before a predecessor hears that we are ready:
    // it stops taking connections then, and a failure of ours after that
    // would leave nobody serving.
    let prepared = prepare(&control_listener, admin.as_ref(), &settings);
    let addresses = opened.addresses();
    let ready = match (prepared, &mut predecessor) {
        (Ok(_), Some(_)) if signals.stop_pending() => Err(ServerError::StoppedStarting),
        // A predecessor that reads our `ready` after we gave up finds us
        // gone, and serves on (below). One that answered `draining` has
        // stopped taking connections: that answer wins over a stop, which
        // is then the service's, once we serve.
        (Ok(prepared), Some(predecessor)) => tokio::select! {
            biased;
            ready = predecessor.ready(&addresses) => {
                ready.map(|()| prepared).map_err(Into::into)
            }
            () = signals.stopped() => Err(ServerError::StoppedStarting),
        },
        (prepared, _) => prepared,
    };
    let Prepared {
        control_fd,
        admin_fd,
        capabilities,
    } = match ready {
        Ok(prepared) => prepared,
        Err(e) => {
            // A predecessor may still be serving: hang up first, so that one
            // reading our `ready` late finds us gone and serves on, and leave
            // it what is its.
            drop(predecessor.take());
            accepting.stop.cancel();
            installation.release_inherited();
            if let Err(undo) = installation.remove().await {
                tracing::warn!(error = %undo, "removing what a failed start set up");
            }
            return Err(e);
        }
    };
    // The routes are ours since the predecessor said `draining` (it let go
    // of them then): guarded at once.
    if predecessor.is_some() {
        arm(guard);
    }
    // Our programs run only now: until the predecessor stopped accepting,
    // it took what they steered. Its own steer on meanwhile.
    let attached = match &predecessor {
        Some(predecessor) if predecessor.holds => match installation.run_held_programs() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "takeover: attaching steer; the predecessor's steers until it exits, ours is tried again when it exits, or at the next change of policy or host");
                false
            }
        },
        _ => false,
    };
    // Accepting only now: until the predecessor has stopped, the queues
    // are its, and a failed takeover took nothing from them.
    steered.extend(new_listeners);
    let listeners = accepting.start(steered);
    accepting.start_explicit(&mut explicit, &shared.active().policy, opened);
    if let Some(predecessor) = predecessor.as_mut().filter(|_| attached) {
        predecessor.attached().await;
    }
    let (scrape, mut scrapes) = tokio::sync::mpsc::channel(4);
    let admin_loop =
        admin.map(|listener| tokio::spawn(admin::serve(listener, scrape, accepting.stop.clone())));
    let (ask, mut requests) = tokio::sync::mpsc::channel(4);
    let answers = TaskTracker::new();
    // Through the drain after a stop, so that a client asking then hears
    // why nothing is done (the name stays bound, by our copy, until we
    // exit: a client would otherwise wait in its queue).
    let control_stop = CancellationToken::new();
    tokio::spawn(control::serve(
        control_listener,
        ask,
        control_stop.clone(),
        answers.clone(),
    ));
    tracing::info!(
        listeners = ?listeners,
        workers = workers.count(),
        capabilities = %privilege::names(capabilities),
        max_connections = settings.max_connections,
        admin = settings.admin.map(tracing::field::display),
        predecessor = predecessor.as_ref().map(|p| p.pid),
        "ready"
    );
    notify::ready(metrics.generation());
    // Start-up's peak (policy, maps, listeners) is not needed again.
    allocator::give_back_all();
    let mut listening = steered_names(&listeners);
    listening.extend(connect_listeners(&shared.active().policy));

    let mut settle = tokio::time::interval(SETTLE_EVERY);
    let mut trim = tokio::time::interval(TRIM_EVERY);
    // While a successor is taking over, the kernel state stays as offered.
    let mut handover = Handover::default();
    let successor = loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Stop => {
                    notify::stopping(accepting.limit.open(), settings.grace_period);
                    break None;
                }
                Signal::Reload => {
                    let _ = reload_now(&settings, &mut installation, &mut explicit, &accepting, &shared, &mut listening, handover.busy()).await;
                }
            },
            Some((request, reply)) = requests.recv() => {
                let answer = match request {
                    control::Request::Reload => match reload_now(&settings, &mut installation, &mut explicit, &accepting, &shared, &mut listening, handover.busy()).await {
                        Ok(()) => serde_json::json!({ "ok": true }),
                        Err(error) => serde_json::json!({ "ok": false, "error": error }),
                    },
                    // Its successor would start with this daemon's user
                    // and none of the capabilities a start takes.
                    control::Request::Upgrade if settings.user.is_some() => {
                        serde_json::json!({ "ok": false, "error": "this daemon runs with --user: it cannot start a successor that loads programs; start one as root with `l4proxy run --takeover` and the same arguments" })
                    }
                    control::Request::Upgrade => {
                        handover.upgrade(&settings.restart, reply);
                        continue;
                    }
                    control::Request::Takeover(stream) => {
                        let listeners = offered(&control_fd, &installation, &explicit, admin_fd.as_ref());
                        let kernel = (settings.mark, settings.routing_table);
                        handover.offer(stream, installation.routing(), kernel, listeners).await;
                        continue;
                    }
                    control::Request::Status => {
                        let daemon = status::Daemon {
                            policy_file: &settings.policy_path,
                            generation: metrics.generation(),
                            started,
                            listeners: listening.clone(),
                            workers: workers.accepted(),
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
            Some(()) = host_changes.recv(), if !handover.busy() => {
                if let Err(e) = installation.refresh().await {
                    tracing::error!(error = %e, "following a change of interfaces or addresses");
                }
            }
            _ = settle.tick(), if !handover.busy() => {
                if let Err(e) = installation.settle().await {
                    tracing::error!(error = %e, "removing what a replaced policy needed");
                }
            }
            event = handover.next() => match event {
                takeover::Event::Ready(successor) => break Some(successor),
                // Once no successor is left: another may still hold the
                // offer (a `run --takeover` beside an `upgrade`'s child).
                takeover::Event::Failed if handover.busy() => {}
                takeover::Event::Failed => match installation.remove_unowned().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::warn!(removed, "takeover: removed the routes and rules the failed successor left"),
                    Err(e) => tracing::error!(error = %e, "takeover: removing what the failed successor left; `l4proxy cleanup` after the daemon stops removes it"),
                },
            },
            () = takeover::gone(&mut predecessor), if !handover.busy() => {
                tracing::info!(predecessor = predecessor.as_ref().map(|p| p.pid), "takeover: the predecessor has exited");
                predecessor = None;
                if let Err(e) = installation.predecessor_gone().await {
                    tracing::error!(error = %e, "removing what the predecessor's connections needed");
                }
            }
            _ = trim.tick() => {
                upstream::reread_local_port_range();
                let open = relay::trim_pipes();
                tracing::debug!(open, "splice pipes");
                allocator::give_back_unused();
            }
        }
    };

    // Requests waiting for the main loop, and those to come, are answered
    // that the daemon stops; after a handover the successor answers.
    // A takeover under way when the daemon stops is given up.
    drop(requests);
    match successor {
        Some(_) => control_stop.cancel(),
        None => handover.abandon(),
    }
    // Nobody answers scrapes any more: the admin port closes (its accept
    // loop ended, then this copy, the last) and a scrape waiting for an
    // answer fails, rather than both hanging through the drain. A
    // successor has its own copy.
    if let Some(admin_loop) = admin_loop {
        admin_loop.abort();
        let _ = admin_loop.await;
    }
    drop(admin_fd);
    drop(scrapes);
    // After a handover to a successor that held its programs, ours steer
    // on until its run (below). A failure here must not end the daemon at
    // once: its open connections get their grace period, and after a
    // takeover its exit path keeps its guard from removing what is the
    // successor's now.
    if !successor.as_ref().is_some_and(|s| s.held)
        && let Err(e) = installation.drain()
    {
        tracing::error!(error = %e, "detaching steer for the drain; new connections to the steered addresses are dropped (no listener) until the daemon exits");
    }
    // A successor accepts on the same queues: what waits there is its.
    if let Some(successor) = &successor {
        accepting.handed_over.to(successor.kept.clone());
    }
    accepting.stop.cancel();
    accepting.tracker.close();
    installation.close_listeners();
    // A CONNECT listener closes once its accept loops have read its queue
    // (each holds a copy), or left it to a successor that kept it: a client
    // that comes later is refused, not left in a queue nobody reads until
    // the grace period ends. A successor has its own copies.
    drop(explicit);
    // Held until we exit: the successor watches for our end of it.
    let (ended, _handed_over) = match successor {
        Some(successor) => {
            // Routes and rules are the successor's now: neither our exit
            // nor our guard may remove them.
            installation.disown(&installation.routing());
            if let Err(e) = guard.disarm() {
                tracing::error!(error = %e, "the crash guard may remove the successor's routes when we exit");
            }
            let pid = successor.pid;
            // The service goes on in the successor: no STOPPING.
            notify::handed_over(pid);
            tracing::info!(
                successor = pid,
                "handed over: the successor takes new connections"
            );
            let held = successor.held;
            let mut handed_over = successor.confirm().await;
            if held
                && handed_over.attached().await
                && let Err(e) = installation.drain()
            {
                tracing::error!(error = %e, "detaching steer after the handover: it steers on into the successor's listeners until we exit");
            }
            (Ended::HandedOver { successor: pid }, Some(handed_over))
        }
        None => (Ended::Stopped, None),
    };
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
    if let Some(predecessor) = &mut predecessor {
        // Its connections use the routes we took over (and may have handed
        // on): they stay until it is gone.
        tracing::info!(
            predecessor = predecessor.pid,
            "waiting for the predecessor to finish draining"
        );
        predecessor.gone().await;
    }
    installation.remove().await?;
    // Nothing of ours is left for the crash guard to remove once we exit,
    // and a daemon started meanwhile (the control socket is free soon)
    // may have routes of its own by then.
    if ended == Ended::Stopped
        && let Err(e) = guard.disarm()
    {
        tracing::warn!(error = %e, "the crash guard may remove routes of a daemon started after us");
    }
    // Answers under way go out first: an `upgrade` is answered as this
    // daemon hands over, which it may finish at once.
    control_stop.cancel();
    answers.close();
    if tokio::time::timeout(ANSWERS_GRACE, answers.wait())
        .await
        .is_err()
    {
        tracing::warn!("control socket: answers still unsent at exit");
    }
    tracing::info!(refused = %shared.admission.summary(), "connections refused over limits");
    tracing::info!(handed_over = ended != Ended::Stopped, "stopped");
    Ok(ended)
}

/// Every listening socket of this daemon, for a successor.
fn offered<'a>(
    control: &'a OwnedFd,
    installation: &'a Installation,
    explicit: &'a ExplicitListeners,
    admin: Option<&'a (std::net::SocketAddr, OwnedFd)>,
) -> Listeners<'a> {
    Listeners {
        control: control.as_fd(),
        steered: installation
            .listeners()
            .into_iter()
            .map(|(family, fd)| (family, fd.as_fd()))
            .collect(),
        connect: explicit.listeners(),
        admin: admin.map(|(addr, fd)| (*addr, fd.as_fd())),
    }
}

/// What start-up keeps once it serves: copies of the control and admin
/// listeners (for a successor; the tasks that answer own the listeners),
/// and the capabilities left after dropping the rest.
struct Prepared {
    control_fd: OwnedFd,
    admin_fd: Option<(std::net::SocketAddr, OwnedFd)>,
    capabilities: privilege::CapSet,
}

/// The last steps of start-up that can fail: the listeners' copies, and
/// dropping privileges (and switching to `--user`).
fn prepare(
    control: &tokio::net::UnixListener,
    admin: Option<&tokio::net::TcpListener>,
    settings: &Settings,
) -> Result<Prepared, ServerError> {
    let descriptor = |what| move |error| ServerError::Descriptor { what, error };
    let control_fd = control
        .as_fd()
        .try_clone_to_owned()
        .map_err(descriptor("control socket"))?;
    let admin_fd = match (admin, settings.admin) {
        (Some(listener), Some(addr)) => Some((
            addr,
            listener
                .as_fd()
                .try_clone_to_owned()
                .map_err(descriptor("admin listener"))?,
        )),
        _ => None,
    };
    let capabilities = privilege::drop_to(settings.user.as_ref())?;
    Ok(Prepared {
        control_fd,
        admin_fd,
        capabilities,
    })
}

/// From now on the crash guard removes the routes if this daemon dies.
fn arm(guard: &Guard) {
    if let Err(e) = guard.arm() {
        tracing::warn!(error = %e, "the crash guard did not take the routes on; after a crash, run `l4proxy cleanup`");
    }
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
/// puts it in force for new connections, unless a takeover is under way
/// (the kernel state stays as offered); counted, and logged either way.
/// The error says why the running policy stays.
async fn reload_now(
    settings: &Settings,
    installation: &mut Installation,
    explicit: &mut ExplicitListeners,
    accepting: &Accepting<'_>,
    shared: &Shared,
    listening: &mut Vec<String>,
    taking_over: bool,
) -> Result<(), String> {
    if taking_over {
        installation.metrics().reloaded(false);
        tracing::error!("policy not reloaded: a takeover is under way");
        return Err("a takeover is under way".to_owned());
    }
    upstream::reread_local_port_range();
    let keepalive = settings.defaults.keepalive;
    notify::reloading();
    let reloaded = reload(
        &settings.policy_path,
        installation,
        explicit,
        keepalive,
        shared,
    )
    .await;
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
    listening.extend(steered_names(&steered));
    listening.retain(|l| l.starts_with("steered "));
    listening.extend(connect_listeners(&applied.active.policy));
    tracing::info!("policy reloaded");
    notify::reloaded(metrics.generation());
    // The old and new policy's peak, likewise.
    allocator::give_back_all();
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

/// How `status` names the steered listeners: each family's group once.
fn steered_names(addresses: &[std::net::SocketAddr]) -> Vec<String> {
    let mut names: Vec<String> = addresses
        .iter()
        .map(|addr| format!("steered {addr}"))
        .collect();
    names.dedup();
    names
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
    explicit: &mut ExplicitListeners,
    keepalive: Keepalive,
    shared: &Shared,
) -> Result<(Applied, Opened), String> {
    let refused = |e: &dyn std::fmt::Display| {
        tracing::error!("policy not reloaded: {e}; the running policy stays in force");
        e.to_string()
    };
    let policy = load_policy(path).map_err(|e| refused(&e))?;
    privilege::check_policy(&policy).map_err(|e| refused(&e))?;
    let opened = explicit
        .bind_new(&policy, keepalive)
        .map_err(|e| refused(&e))?;
    // Connections the new rules steer before the policy is in force
    // find them (`Shared::rule_for`).
    let applied = installation
        .apply(policy, |coming| shared.announce(coming))
        .await
        .map_err(|e| {
            tracing::error!(
                "policy not reloaded: {e}; the running policy stays in force for new connections"
            );
            e.to_string()
        })?;
    Ok((applied, opened))
}

/// What the accept loops share.
struct Accepting<'a> {
    shared: Arc<Shared>,
    limit: Limit,
    tracker: TaskTracker,
    stop: CancellationToken,
    /// Set before `stop` when a successor took over.
    handed_over: Arc<HandedOver>,
    workers: &'a Workers,
}

impl Accepting<'_> {
    /// Accepts on the steered `listeners` until stopped, a family's
    /// listeners shared out among the workers in turn; returns their
    /// addresses.
    fn start(&self, listeners: Vec<(Family, StdListener)>) -> Vec<std::net::SocketAddr> {
        let addresses = listeners
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect();
        let mut next = [0, 0];
        for (family, listener) in listeners {
            let turn = &mut next[usize::from(matches!(family, Family::V6))];
            self.accept(*turn, listener, Front::Steered, self.stop.clone());
            *turn += 1;
        }
        addresses
    }

    /// Accepts on the CONNECT listeners `policy` adds, an address's group
    /// shared out among the workers in turn, and stops those it drops.
    fn start_explicit(&self, explicit: &mut ExplicitListeners, policy: &Policy, opened: Opened) {
        explicit.commit(policy, opened, &self.stop, |group, stop| {
            // One address per group: its clients' local address.
            let front = Front::Connect(
                group
                    .first()
                    .and_then(|listener| listener.local_addr().ok())
                    .filter(|listening| !listening.ip().is_unspecified()),
            );
            if let [listener] = &group[..]
                && self.workers.count() > 1
            {
                // A predecessor's listener that no group can join: every
                // worker accepts on it.
                for worker in 1..self.workers.count() {
                    match listener.try_clone() {
                        Ok(copy) => self.accept(worker, copy, front, stop.clone()),
                        Err(e) => {
                            tracing::error!(error = %e, worker, "a worker cannot accept on a CONNECT listener: the others do");
                        }
                    }
                }
            }
            for (worker, listener) in group.into_iter().enumerate() {
                self.accept(worker, listener, front, stop.clone());
            }
        });
    }

    /// Runs an accept loop on worker `worker`.
    fn accept(&self, worker: usize, listener: StdListener, front: Front, stop: CancellationToken) {
        self.tracker.spawn_on(
            accept_loop(
                listener,
                Acceptor {
                    front,
                    shared: self.shared.clone(),
                    limit: self.limit.clone(),
                    tracker: self.tracker.clone(),
                    accepted: self.workers.counter(worker),
                    shutdown: self.shared.shutdown.child_token(),
                },
                stop,
                self.handed_over.clone(),
            ),
            self.workers.handle(worker),
        );
    }
}

/// At most `max` connections at once, over all workers. A count, not a
/// semaphore: nothing waits for a place, and a semaphore's release takes
/// its waiters' lock, which every worker shares, at every close.
#[derive(Clone)]
struct Limit {
    open: Arc<AtomicUsize>,
    max: usize,
}

impl Limit {
    fn new(max: usize) -> Self {
        Self {
            open: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Connections open now.
    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A place for one more connection, if there is one.
    fn take(&self) -> Option<Place> {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()?;
        Some(Place(self.open.clone()))
    }
}

/// One connection's place under the [`Limit`], given back when dropped.
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an accept loop gives each connection it accepts.
struct Acceptor {
    front: Front,
    shared: Arc<Shared>,
    limit: Limit,
    tracker: TaskTracker,
    /// Counts the connections this worker accepted.
    accepted: workers::Counter,
    /// The end of the grace period, as this loop's connections see it: a
    /// child of `Shared::shutdown` per accept loop, so that a relay waiting
    /// for it takes locks of its own worker's, not ones all workers share.
    shutdown: CancellationToken,
}

impl Acceptor {
    fn admit(&self, (stream, peer): (tokio::net::TcpStream, std::net::SocketAddr)) {
        self.accepted.add();
        let Some(place) = self.limit.take() else {
            self.shared.admission.refuse(&stream, peer, Refusal::Global);
            return;
        };
        self.tracker.spawn(session::serve(
            stream,
            peer,
            self.front,
            self.shared.clone(),
            self.shutdown.clone(),
            place,
        ));
    }
}

/// What a successor that took over accepts on, for the accept loops that
/// stop: whose queues are left to it. Set when a successor took over: it
/// accepts on every steered listener, and on the CONNECT listeners it
/// named (`None`: it did not say, an older successor; their queues are
/// read here then).
#[derive(Default)]
struct HandedOver(OnceLock<Option<Vec<SocketAddr>>>);

impl HandedOver {
    /// Set before the accept loops stop.
    fn to(&self, connect: Option<Vec<SocketAddr>>) {
        let _ = self.0.set(connect);
    }

    /// Whether the successor accepts on `listener` (of `front`) too.
    fn shares(&self, front: Front, listener: &TcpListener) -> bool {
        let Some(connect) = self.0.get() else {
            return false;
        };
        match front {
            Front::Steered => true,
            Front::Connect(_) => connect.as_ref().is_some_and(|kept| {
                listener
                    .local_addr()
                    .is_ok_and(|listening| kept.contains(&listening))
            }),
        }
    }
}

/// Accepts on `listener` until stopped; runs on a worker, which serves the
/// connections it accepts. Then it reads the rest of the queue, unless
/// `handed_over` says a successor accepts on the same one.
async fn accept_loop(
    listener: StdListener,
    acceptor: Acceptor,
    stop: CancellationToken,
    handed_over: Arc<HandedOver>,
) {
    // Registered with this worker's runtime.
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "a worker cannot accept on a listener: the others do");
            return;
        }
    };
    // Looked at before each accept, so that a flood cannot keep the loop
    // from stopping: a child token, whose locks are this worker's alone, and
    // one wait, not a new registration with the token per accept.
    let stop = stop.child_token();
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        tokio::select! {
            biased;
            () = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => acceptor.admit(accepted),
                Err(e) => {
                    if after_accept_error(&e, "proxy", &mut stopped).await {
                        break;
                    }
                }
            },
        }
    }
    // A successor accepts on the same steered sockets (its `steer` goes on
    // filling their queues), and on the CONNECT listeners its policy kept:
    // a connection taken from them now would be served under this daemon's
    // policy and cut at the end of its grace period. (A CONNECT listener
    // its policy dropped it has closed: those queues are read.)
    if handed_over.shares(acceptor.front, &listener) {
        return;
    }
    // Clients whose handshakes completed before the stop are served, not
    // reset when the listener closes: nothing new is steered here now, and
    // the queue is read to its end with plain non-blocking accepts (the
    // runtime may not have seen the last ones arrive yet).
    let Ok(listener) = listener.into_std() else {
        return;
    };
    let mut backed_off = Duration::ZERO;
    let mut accepted = 0u32;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                match stream
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(stream))
                {
                    Ok(stream) => acceptor.admit((stream, peer)),
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                }
                // A long queue must not keep this worker from its relays.
                accepted += 1;
                if accepted.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if one_connections(&e) => {
                tracing::debug!(error = %e, listener = "proxy", "accept failed");
            }
            // Out of descriptors (connections of the drain end and give
            // theirs back): waited out for a while, then the rest is reset.
            Err(e) if backed_off < DRAIN_BACK_OFF => {
                static WAITING: crate::logging::Throttle =
                    crate::logging::Throttle::new(Duration::from_secs(1));
                if let Some(count) = WAITING.event() {
                    tracing::warn!(error = %e, count, "accept failed while draining; waiting for descriptors");
                }
                tokio::time::sleep(ACCEPT_BACK_OFF).await;
                backed_off += ACCEPT_BACK_OFF;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; the clients still queued are reset");
                return;
            }
        }
    }
}

/// How long an accept loop waits after an error that is not one
/// connection's (out of descriptors, buffers or memory) before accepting
/// again, instead of spinning.
const ACCEPT_BACK_OFF: Duration = Duration::from_millis(50);

/// How long a stopping accept loop waits out such errors in all, reading
/// the rest of its queue.
const DRAIN_BACK_OFF: Duration = Duration::from_secs(2);

/// An accept error that is one connection's, not the listener's or this
/// host's: Linux passes a queued connection's network error on as
/// accept's, to be retried at once (accept(2)).
fn one_connections(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPERM
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EINTR
        )
    )
}

/// Logs an accept error that is not one connection's, at most once a
/// second for the whole daemon.
fn accept_failed(e: &io::Error, listener: &'static str) {
    static FAILED: crate::logging::Throttle = crate::logging::Throttle::new(Duration::from_secs(1));
    if let Some(count) = FAILED.event() {
        tracing::warn!(error = %e, listener, count, "accept failed; backing off");
    }
}

/// What an accept loop (the proxy's, the admin port's, the control
/// socket's) does after `accept` failed: an error that is one queued
/// connection's is passed over at once; any other (EMFILE and friends) is
/// warned of and waited out for [`ACCEPT_BACK_OFF`] instead of spinning,
/// unless `stopped` comes first. Returns whether it did.
pub(crate) async fn after_accept_error(
    e: &io::Error,
    listener: &'static str,
    stopped: impl Future<Output = ()>,
) -> bool {
    if one_connections(e) {
        tracing::debug!(error = %e, listener, "accept failed");
        return false;
    }
    accept_failed(e, listener);
    tokio::select! {
        biased;
        () = stopped => true,
        () = tokio::time::sleep(ACCEPT_BACK_OFF) => false,
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

    /// When SIGTERM or SIGINT comes.
    async fn stopped(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    /// Whether SIGTERM or SIGINT came, without waiting (and taking it).
    fn stop_pending(&mut self) -> bool {
        futures::FutureExt::now_or_never(self.stopped()).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a takeover, the accept loops leave to the successor the queues
    /// it reads too: every steered one, the CONNECT listeners it said it
    /// kept, and none it did not name or when it said nothing (an older
    /// successor).
    #[tokio::test]
    async fn queues_a_successor_reads_are_left_to_it() {
        let kept = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dropped = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = Front::Connect(None);
        let before = HandedOver::default();
        assert!(!before.shares(Front::Steered, &kept));
        assert!(!before.shares(connect, &kept));

        let said = HandedOver::default();
        said.to(Some(vec![kept.local_addr().unwrap()]));
        assert!(said.shares(Front::Steered, &dropped));
        assert!(said.shares(connect, &kept));
        assert!(!said.shares(connect, &dropped));

        let silent = HandedOver::default();
        silent.to(None);
        assert!(silent.shares(Front::Steered, &kept));
        assert!(!silent.shares(connect, &kept));
    }

    #[test]
    fn the_limit_gives_places_up_to_its_max_and_takes_them_back() {
        let limit = Limit::new(2);
        let first = limit.take().expect("a first place");
        let second = limit.take().expect("a second place");
        assert!(limit.take().is_none(), "no third place under a limit of 2");
        assert_eq!(limit.open(), 2);
        drop(first);
        assert_eq!(limit.open(), 1);
        let again = limit.take().expect("a place given back is taken again");
        drop((second, again));
        assert_eq!(limit.open(), 0);
    }
}
