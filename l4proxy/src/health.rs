//! Whether each upstream server is up, and how many connections it has:
//! active checks (a TCP connection every `interval`, HAProxy's `inter`,
//! `fastinter`, `downinter`, `rise` and `fall`) and passive observation
//! (failed connects of relayed connections, HAProxy's `observe layer4`).
//!
//! A server's state is kept in a [`Registry`] that the daemon holds across
//! policies, by upstream name and address: a reload that keeps a server
//! keeps whether it is up, its open connections and its checks; a reload
//! that drops it stops its checks. Servers start up, as in HAProxy: a new
//! server is given connections until its checks say otherwise.
//!
//! Checks run as tasks on the daemon's runtime, from the upstream's fixed
//! `bind` address if it has one, else from the kernel's choice: never from a
//! client's address, as there is no client. Transitions are logged at INFO
//! (`server up`, `server down`, with the upstream, the server and why).

use std::{
    collections::HashMap,
    fmt, io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::{io::AsyncWriteExt, task::AbortHandle};

use crate::{
    addrs::UpstreamAddr,
    policy::{Bind, HealthCheck, Keepalive, Observe, Policy, Upstream},
    proxy_protocol::{self, Header},
    upstream::{self, Source},
};

/// A server of an upstream, as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ServerKey {
    upstream: String,
    address: SocketAddr,
}

/// The health and load of one server of one upstream, shared by every
/// policy that has it and by its checks.
pub struct ServerState {
    key: ServerKey,
    up: AtomicBool,
    /// Connections to it open now or being opened, over all policies.
    active: AtomicUsize,
    /// Failed connects of relayed connections since the last one that
    /// worked.
    errors: AtomicU32,
    /// Whether checks run for it: then they, not observation's `down_for`,
    /// bring it back up.
    checked: AtomicBool,
    failed_checks: AtomicU64,
    /// Connects to it that failed for its doing, since the daemon started.
    failed_connects: AtomicU64,
    went_down: AtomicU64,
}

/// What a server's state is now, for metrics and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    /// Whether active checks run for it.
    pub checked: bool,
    /// Connections to it open now (or being opened), over all policies.
    pub active: usize,
    /// Checks that failed, since the daemon started.
    pub failed_checks: u64,
    /// Connects (and TLS handshakes) to it that failed for its doing,
    /// those a retry hid too, since the daemon started.
    pub failed_connects: u64,
    /// Times it was marked down, since the daemon started.
    pub went_down: u64,
}

impl ServerState {
    fn new(key: ServerKey, counts: Counts) -> ServerState {
        ServerState {
            key,
            up: AtomicBool::new(true),
            active: AtomicUsize::new(0),
            errors: AtomicU32::new(0),
            checked: AtomicBool::new(false),
            failed_checks: AtomicU64::new(counts.failed_checks),
            failed_connects: AtomicU64::new(counts.failed_connects),
            went_down: AtomicU64::new(counts.went_down),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn health(&self) -> Health {
        Health {
            up: self.is_up(),
            checked: self.checked.load(Ordering::Relaxed),
            active: self.active(),
            failed_checks: self.failed_checks.load(Ordering::Relaxed),
            failed_connects: self.failed_connects.load(Ordering::Relaxed),
            went_down: self.went_down.load(Ordering::Relaxed),
        }
    }

    /// Counts a connection to it as active until the lease is dropped.
    pub fn lease(self: &Arc<Self>) -> Lease {
        self.active.fetch_add(1, Ordering::Relaxed);
        Lease(self.clone())
    }

    /// Marks it up or down, logging why, unless it already is. On a
    /// change, how many times it went down with this one (which time down
    /// a timer ends).
    fn mark(&self, up: bool, why: &dyn fmt::Display) -> Option<u64> {
        if self
            .up
            .compare_exchange(!up, up, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        // A fresh count for observation either way.
        self.errors.store(0, Ordering::Relaxed);
        let (upstream, server) = (&self.key.upstream, self.key.address);
        if up {
            tracing::info!(upstream, %server, reason = %why, "server up");
            Some(self.went_down.load(Ordering::Relaxed))
        } else {
            let downs = self.went_down.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(upstream, %server, reason = %why, "server down");
            Some(downs)
        }
    }

    /// A relayed connection reached it: where its upstream observes, the
    /// failed connects in a row start again from none (without, nothing is
    /// written: a store every worker would make on every connection).
    pub fn connect_succeeded(&self, observe: Option<&Observe>) {
        if observe.is_some() {
            self.errors.store(0, Ordering::Relaxed);
        }
    }

    /// A relayed connection could not connect to it, for its doing: counted
    /// and, where its upstream observes, `observe.errors` in a row mark it
    /// down. Without checks to bring it back, it is up again after
    /// `observe.down_for`, for connections to try it.
    pub fn connect_failed(self: &Arc<Self>, observe: Option<&Observe>, error: &dyn fmt::Display) {
        self.failed_connects.fetch_add(1, Ordering::Relaxed);
        let Some(observe) = observe else {
            return;
        };
        let errors = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        if errors < observe.errors {
            return;
        }
        let why = format!("{errors} connects failed in a row, the last: {error}");
        let Some(downs) = self.mark(false, &why) else {
            return;
        };
        if self.checked.load(Ordering::Relaxed) {
            return;
        }
        let down_for = observe.down_for;
        // The timer ends this time down (`downs`), not a later one, should
        // a reload have tried the server again meanwhile and it failed
        // again.
        let state = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(down_for).await;
            // Checks started meanwhile (a reload) bring it back themselves.
            if let Some(state) = state.upgrade()
                && !state.checked.load(Ordering::Relaxed)
                && state.went_down.load(Ordering::Relaxed) == downs
            {
                state.mark(
                    true,
                    &format!("down for {down_for:?} after failed connects: tried again"),
                );
            }
        });
    }
}

/// A connection to a server, counted as active while this is held.
pub struct Lease(Arc<ServerState>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every server's state, kept across policies, and the checks that run.
#[derive(Default)]
pub struct Registry {
    servers: Mutex<Servers>,
}

#[derive(Default)]
struct Servers {
    entries: HashMap<ServerKey, Entry>,
    /// The counts of servers forgotten: one a later policy brings back
    /// goes on from them, so that its counters never go back (a scrape
    /// would take the new counts for what grew since the last). At most
    /// [`MAX_RETIRED`]: policies whose servers change all the time must not
    /// grow it for ever (one dropped starts again from none, which the
    /// scrape then counts as all new).
    retired: HashMap<ServerKey, Counts>,
}

/// Forgotten servers whose counts are kept.
const MAX_RETIRED: usize = 4096;

/// What a server's counters held.
#[derive(Clone, Copy, Default)]
struct Counts {
    failed_checks: u64,
    went_down: u64,
    failed_connects: u64,
}

impl Servers {
    /// The entry of `key`: the one in force, else a new one (up, idle,
    /// unchecked) with the counts it had, if it was forgotten.
    fn entry(&mut self, key: &ServerKey) -> &mut Entry {
        let retired = &mut self.retired;
        self.entries.entry(key.clone()).or_insert_with(|| {
            let counts = retired.remove(key).unwrap_or_default();
            Entry {
                state: Arc::new(ServerState::new(key.clone(), counts)),
                checks: None,
                observe: None,
            }
        })
    }
}

struct Entry {
    state: Arc<ServerState>,
    checks: Option<Checks>,
    /// Its upstream's `observe` in the policy in force.
    observe: Option<Observe>,
}

/// A server's running checks, and what they were started with.
struct Checks {
    plan: Plan,
    task: AbortHandle,
}

impl Entry {
    /// Stops the server's checks; their last verdict stands (a replaced
    /// policy's pool may still pick it) until a policy has the server
    /// again: [`Registry::update`] then restarts them, or ends them.
    fn pause_checks(&mut self) {
        if let Some(checks) = self.checks.take() {
            checks.task.abort();
        }
    }

    /// Ends the server's checks: a server that had them is up, since
    /// nothing would bring it back.
    fn stop_checks(&mut self, why: &dyn fmt::Display) {
        self.pause_checks();
        if self.state.checked.swap(false, Ordering::Relaxed) {
            self.state.mark(true, why);
        }
    }
}

/// How a server is checked: the policy's settings, the source and the
/// PROXY header, if any. A reload that changes any restarts its checks
/// (its state stays).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plan {
    settings: HealthCheck,
    source: Source,
    header: Option<Vec<u8>>,
}

impl Registry {
    /// The state of `upstream`'s server at `address`: the one a policy
    /// before had, if any, else a new one (up, idle, unchecked).
    pub fn server(&self, upstream: &str, address: SocketAddr) -> Arc<ServerState> {
        let key = ServerKey {
            upstream: upstream.to_owned(),
            address,
        };
        self.lock().entry(&key).state.clone()
    }

    /// Makes the registry that of `policy`, now in force: stops the checks
    /// of the servers it does not have (a down one stays down for a
    /// replaced policy's pool), and forgets those of them that nothing
    /// uses any more (a replaced policy's pools and connections hold their
    /// state: should a later policy bring one back, its open connections
    /// still count), starts the checks of servers that are to have them,
    /// and restarts those whose settings changed or that come back. A
    /// server whose checks are gone is up again, since nothing would bring
    /// it back. On the daemon's runtime, which the checks run on.
    pub fn update(&self, policy: &Policy) {
        let mut wanted: HashMap<ServerKey, (Option<Plan>, Option<Observe>)> = HashMap::new();
        for upstream in &policy.upstreams {
            let plan = plan(upstream);
            for &address in upstream.servers() {
                let key = ServerKey {
                    upstream: upstream.name.clone(),
                    address,
                };
                wanted.insert(key, (plan.clone(), upstream.balancing.observe));
            }
        }
        let mut servers = self.lock();
        let Servers { entries, retired } = &mut *servers;
        entries.retain(|key, entry| {
            if wanted.contains_key(key) {
                return true;
            }
            entry.pause_checks();
            let kept = Arc::strong_count(&entry.state) > 1;
            if !kept {
                let health = entry.state.health();
                let counts = Counts {
                    failed_checks: health.failed_checks,
                    went_down: health.went_down,
                    failed_connects: health.failed_connects,
                };
                if retired.len() >= MAX_RETIRED
                    && let Some(any) = retired.keys().next().cloned()
                {
                    retired.remove(&any);
                }
                retired.insert(key.clone(), counts);
            }
            kept
        });
        for (key, (plan, observe)) in wanted {
            let entry = servers.entry(&key);
            // Observation took it down, for a time its settings said: with
            // other settings (or none), it is tried again at once.
            if std::mem::replace(&mut entry.observe, observe) != observe
                && !entry.state.checked.load(Ordering::Relaxed)
            {
                entry
                    .state
                    .mark(true, &"its observe settings changed: tried again");
            }
            // Paused (a policy before dropped it): to be restarted or ended.
            let paused = entry.checks.is_none() && entry.state.checked.load(Ordering::Relaxed);
            if entry.checks.as_ref().map(|c| &c.plan) == plan.as_ref() && !paused {
                continue;
            }
            match plan {
                Some(plan) => {
                    entry.pause_checks();
                    entry.state.checked.store(true, Ordering::Relaxed);
                    let task = tokio::spawn(run(entry.state.clone(), plan.clone()));
                    entry.checks = Some(Checks {
                        plan,
                        task: task.abort_handle(),
                    });
                }
                None => entry.stop_checks(&"its health checks were removed"),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Servers> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks end with the registry (at exit), not with the runtime only.
impl Drop for Registry {
    fn drop(&mut self) {
        for entry in self.lock().entries.values_mut() {
            entry.pause_checks();
        }
    }
}

/// How `upstream`'s servers are checked, if they are.
fn plan(upstream: &Upstream) -> Option<Plan> {
    let settings = upstream.balancing.health?;
    // The upstream's own source when it is a fixed address (a server may
    // accept only that one); a client's address has no client here.
    let source = match upstream.bind {
        Bind::Address(ip) => Source::Fixed(ip),
        Bind::Proxy | Bind::ClientIp | Bind::Client => Source::Kernel,
    };
    let header = upstream
        .proxy_protocol
        .filter(|_| settings.send_proxy)
        // LOCAL has no addresses to encode: it always fits.
        .and_then(|version| proxy_protocol::encode(version, &Header::Local).ok());
    Some(Plan {
        settings,
        source,
        header,
    })
}

/// Checks one server until aborted: after `fall` failed checks in a row
/// it is marked down, after `rise` good ones up; `fast_interval` between
/// checks while a change is under way, `down_interval` while it is down.
async fn run(state: Arc<ServerState>, plan: Plan) {
    let settings = plan.settings;
    // Checks in a row that disagree with the state; from none again when
    // observation changed the state meanwhile.
    let mut streak = 0;
    let mut was_up = state.is_up();
    loop {
        let up = state.is_up();
        if up != was_up {
            streak = 0;
            was_up = up;
        }
        let result = check(state.key.address, &plan).await;
        // Out of descriptors, memory or source ports: the server is not at
        // fault, and the check counts neither way. (A refused connect is
        // counted: a `prohibit` route to the server is the server
        // unreachable from here.)
        if let Err(error) = &result
            && upstream::this_host_ran_out(error)
        {
            if let Some(count) = UNMADE_CHECKS.event() {
                tracing::warn!(server = %state.key.address, %error, count,
                    "health checks could not be made on this host; not counted");
            }
        } else {
            if result.is_err() {
                state.failed_checks.fetch_add(1, Ordering::Relaxed);
            }
            match (up, result) {
                (true, Ok(())) | (false, Err(_)) => streak = 0,
                (true, Err(error)) => {
                    streak += 1;
                    if streak >= settings.fall {
                        state.mark(
                            false,
                            &format!("{streak} checks failed in a row, the last: {error}"),
                        );
                        (streak, was_up) = (0, false);
                    }
                }
                (false, Ok(())) => {
                    streak += 1;
                    if streak >= settings.rise {
                        state.mark(true, &format!("{streak} checks passed in a row"));
                        (streak, was_up) = (0, true);
                    }
                }
            }
        }
        let wait = match (streak, state.is_up()) {
            (1.., _) => settings.fast_interval,
            (0, true) => settings.interval,
            (0, false) => settings.down_interval,
        };
        tokio::time::sleep(wait).await;
    }
}

/// Checks this host could not make, for a throttled warning.
static UNMADE_CHECKS: crate::logging::Throttle =
    crate::logging::Throttle::new(std::time::Duration::from_secs(1));

/// Checks in flight at once, over all servers: each holds a descriptor,
/// which the daemon's budget counts (`descriptors`). A policy may check
/// thousands of servers; past this, a check waits its turn (its timeout
/// starts once it has one), so silent servers slow the rounds down rather
/// than take the descriptors relayed connections need.
pub const MAX_CHECKS: usize = 128;

static CHECKING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CHECKS);

/// One check: a TCP connection within the timeout, and the PROXY header
/// sent on it if the plan has one; then closed.
async fn check(address: SocketAddr, plan: &Plan) -> io::Result<()> {
    let _turn = CHECKING
        .acquire()
        .await
        .expect("the checks' semaphore is never closed");
    let attempt = async {
        let mut stream =
            upstream::connect_one(UpstreamAddr(address), plan.source, Keepalive::Off, false)
                .await?;
        if let Some(header) = &plan.header {
            stream.write_all(header).await?;
        }
        Ok(())
    };
    tokio::time::timeout(plan.settings.timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {:?}", plan.settings.timeout),
            ))
        })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::net::TcpListener;

    use super::*;

    /// With every turn taken, a check waits (it makes no connection) until
    /// one is given back.
    #[tokio::test]
    async fn checks_wait_for_a_turn() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let second = Duration::from_secs(1);
        let plan = Plan {
            settings: HealthCheck {
                interval: second,
                fast_interval: second,
                down_interval: second,
                rise: 1,
                fall: 1,
                timeout: second,
                send_proxy: false,
            },
            source: Source::Kernel,
            header: None,
        };
        let taken = CHECKING.acquire_many(MAX_CHECKS as u32).await.unwrap();
        let mut checking = std::pin::pin!(check(address, &plan));
        let waited = tokio::time::timeout(Duration::from_millis(200), &mut checking).await;
        assert!(waited.is_err(), "a check ran without a turn: {waited:?}");
        let early = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(early.is_err(), "a check connected without a turn");
        drop(taken);
        checking.await.expect("the check, given its turn");
        listener.accept().await.expect("the check's connection");
    }

    fn policy(upstream: &str, servers: &[SocketAddr], fields: &str) -> Policy {
        let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        Policy::from_json(&format!(
            r#"{{ "intercept": [ {{ "name": "r", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "{upstream}" }} ],
                 "upstreams": {{ "{upstream}": {{ "servers": [{}] {fields} }} }} }}"#,
            servers.join(", ")
        ))
        .unwrap()
    }

    /// Polls until `state` is up (or down), at most `within`.
    async fn until_up(state: &ServerState, up: bool, within: Duration) {
        let deadline = Instant::now() + within;
        while state.is_up() != up {
            assert!(
                Instant::now() < deadline,
                "still {} after {within:?}",
                if up { "down" } else { "up" }
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn checks_take_a_server_down_after_fall_and_up_after_rise() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let registry = Registry::default();
        let state = registry.server("web", address);
        registry.update(&policy(
            "web",
            &[address],
            r#", "health": { "interval": "50ms", "down_interval": "2s", "rise": 2, "fall": 3 }"#,
        ));
        assert!(state.health().checked);
        // A check that passes.
        tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("a check's connection")
            .unwrap();
        assert!(state.is_up());
        assert_eq!(state.health().failed_checks, 0);

        drop(listener);
        until_up(&state, false, Duration::from_secs(5)).await;
        // Down at the third failed check, and not checked again for the
        // down interval.
        assert_eq!(state.health().failed_checks, 3);
        assert_eq!(state.health().went_down, 1);

        let listener = TcpListener::bind(address).await.unwrap();
        until_up(&state, true, Duration::from_secs(5)).await;
        // Two checks reached it: one a down interval after the last
        // failure, the second a fast interval (the interval) later.
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(1), listener.accept())
                .await
                .expect("a check's connection")
                .unwrap();
        }
        assert_eq!(state.health().failed_checks, 3);
    }

    #[tokio::test]
    async fn observation_takes_a_server_down_and_without_checks_tries_it_again() {
        let registry = Registry::default();
        let state = registry.server("web", "192.0.2.1:80".parse().unwrap());
        let observe = Observe {
            errors: 3,
            down_for: Duration::from_millis(200),
        };
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        state.connect_failed(Some(&observe), &refused);
        state.connect_failed(Some(&observe), &refused);
        // A connect that works starts the count again.
        state.connect_succeeded(Some(&observe));
        state.connect_failed(Some(&observe), &refused);
        state.connect_failed(Some(&observe), &refused);
        assert!(state.is_up());
        state.connect_failed(Some(&observe), &refused);
        assert!(!state.is_up());
        until_up(&state, true, Duration::from_secs(5)).await;
        assert_eq!(state.health().went_down, 1);
    }

    const OBSERVED: &str = "127.0.0.1:80";

    /// The `observe` of a policy with `fields` for upstream `web`'s
    /// [`OBSERVED`] server.
    fn observe_of(fields: &str) -> Observe {
        let policy = policy("web", &[OBSERVED.parse().unwrap()], fields);
        policy.upstreams[0].balancing.observe.unwrap()
    }

    /// A registry with the [`OBSERVED`] server's state, and an error that
    /// observation counts against it.
    fn observed() -> (SocketAddr, Registry, Arc<ServerState>, io::Error) {
        let address: SocketAddr = OBSERVED.parse().unwrap();
        let registry = Registry::default();
        let state = registry.server("web", address);
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        (address, registry, state, refused)
    }

    /// A reload that removes or changes `observe` tries a server that
    /// observation took down again at once: it would have stayed down for
    /// the old `down_for`.
    #[tokio::test]
    async fn a_reload_that_changes_observe_tries_a_downed_server_again() {
        let (address, registry, state, refused) = observed();
        for (old, new) in [
            (r#", "observe": { "errors": 1, "down_for": "1h" }"#, ""),
            (
                r#", "observe": { "errors": 1, "down_for": "1h" }"#,
                r#", "observe": { "errors": 1, "down_for": "10s" }"#,
            ),
        ] {
            registry.update(&policy("web", &[address], old));
            state.connect_failed(Some(&observe_of(old)), &refused);
            assert!(!state.is_up(), "{old}");
            registry.update(&policy("web", &[address], old));
            assert!(!state.is_up(), "the same settings: still down");
            registry.update(&policy("web", &[address], new));
            assert!(state.is_up(), "{old} → {new}");
        }
    }

    /// A `down_for` timer ends the time down it began with, not a later
    /// one: here the server was tried again (a reload) and went down anew,
    /// for an hour.
    #[tokio::test]
    async fn a_timer_ends_only_its_own_time_down() {
        let (address, registry, state, refused) = observed();
        let short = r#", "observe": { "errors": 1, "down_for": "200ms" }"#;
        let long = r#", "observe": { "errors": 1, "down_for": "1h" }"#;
        registry.update(&policy("web", &[address], short));
        state.connect_failed(Some(&observe_of(short)), &refused);
        registry.update(&policy("web", &[address], long));
        assert!(state.is_up(), "tried again");
        state.connect_failed(Some(&observe_of(long)), &refused);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!state.is_up(), "the first timer ended the second time down");
    }

    #[tokio::test]
    async fn a_reload_keeps_a_kept_servers_state_and_forgets_the_others() {
        let listeners = [
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ];
        let [a, b] = listeners.each_ref().map(|l| l.local_addr().unwrap());
        let registry = Registry::default();
        let observe = Observe {
            errors: 1,
            down_for: Duration::from_secs(3600),
        };
        let state_a = registry.server("web", a);
        let state_b = registry.server("web", b);
        registry.update(&policy("web", &[a, b], r#", "observe": { "errors": 1 }"#));
        state_a.connect_failed(Some(&observe), &io::Error::from(io::ErrorKind::TimedOut));
        let lease = state_a.lease();
        assert!(!state_a.is_up());

        // b goes; a stays, down, with its connection.
        registry.update(&policy("web", &[a], r#", "observe": { "errors": 1 }"#));
        let again = registry.server("web", a);
        assert!(Arc::ptr_eq(&again, &state_a));
        assert!(!again.is_up());
        assert_eq!(again.active(), 1);
        drop(lease);
        assert_eq!(again.active(), 0);
        // b's state is held (a replaced policy's pool, a connection): a
        // policy that brings b back has it, connection and all ...
        let lease_b = state_b.lease();
        state_b.connect_failed(Some(&observe), &io::Error::from(io::ErrorKind::TimedOut));
        registry.update(&policy("web", &[a, b], r#", "observe": { "errors": 1 }"#));
        assert!(Arc::ptr_eq(&registry.server("web", b), &state_b));
        assert_eq!(registry.server("web", b).active(), 1);
        // ... and once nothing holds it, b is forgotten.
        registry.update(&policy("web", &[a], ""));
        drop((lease_b, state_b));
        registry.update(&policy("web", &[a], ""));
        assert!(registry.server("web", b).is_up(), "a new state, up");
        // Its counts go on from the forgotten one's: a scrape never sees
        // them go back.
        assert_eq!(registry.server("web", b).health().went_down, 1);
        // The same address in another upstream is another server.
        assert!(!Arc::ptr_eq(&registry.server("api", a), &state_a));

        // Checks added, then removed again: nothing would bring it back,
        // so it is up.
        registry.update(&policy("web", &[a], r#", "health": {}"#));
        assert!(again.health().checked);
        registry.update(&policy("web", &[a], ""));
        assert!(!again.health().checked);
        assert!(again.is_up());
    }

    #[tokio::test]
    async fn a_checked_server_dropped_and_brought_back_unchecked_is_up() {
        // Down by its checks (nothing listens), dropped by a reload while a
        // connection holds its state, back in a later policy without
        // checks: nothing would ever bring it up.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = gone.local_addr().unwrap();
        drop(gone);
        let registry = Registry::default();
        let state = registry.server("web", a);
        registry.update(&policy(
            "web",
            &[a],
            r#", "health": { "interval": "20ms", "fall": 1 }"#,
        ));
        until_up(&state, false, Duration::from_secs(5)).await;
        let lease = state.lease();
        registry.update(&policy("web", &["203.0.113.9:80".parse().unwrap()], ""));
        // The replaced policy's pool, which holds it, does not pick it.
        assert!(!state.is_up());
        registry.update(&policy("web", &[a], ""));
        assert!(Arc::ptr_eq(&registry.server("web", a), &state));
        assert!(!state.health().checked);
        assert!(state.is_up());
        drop(lease);
    }
}
