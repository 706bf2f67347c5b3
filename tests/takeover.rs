//! Takeover: a new daemon takes over from the running one (`run --takeover`,
//! `l4proxy upgrade`) with no connection lost, a failed takeover leaves the
//! old one serving, and one daemon runs per network namespace.

mod lab;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lab::daemon::{Stray, command, field, message};
use lab::{Daemon, Netns, Server, Topo, handlers, sa};
use serde_json::{Value, json};

/// The service 192.0.2.0/24 port 80, relayed to the server's echo.
fn policy() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "pool" }
        ],
        "upstreams": { "pool": { "servers": ["203.0.113.2:8080"] } }
    })
}

/// A changed policy: the same service, plus IPv6 and port 81.
fn changed_policy() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80, 81], "upstream": "pool" }
        ],
        "upstreams": { "pool": { "servers": ["203.0.113.2:8080"] } }
    })
}

/// How a client reaches the server through the proxy.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// Connecting to an address the proxy intercepts.
    Steered(SocketAddr),
    /// Asking the proxy's CONNECT listener for `target`.
    Connect {
        proxy: SocketAddr,
        target: SocketAddr,
    },
}

impl Via {
    /// A stream to the server, from a thread in the client's namespace:
    /// the next thing to read is the server's hello.
    fn open_here(self) -> Result<TcpStream, String> {
        let to = match self {
            Via::Steered(dst) => dst,
            Via::Connect { proxy, .. } => proxy,
        };
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if let Via::Connect { target, .. } = self {
            let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
            c.write_all(head.as_bytes())
                .map_err(|e| format!("send CONNECT: {e}"))?;
            let mut answer = Vec::new();
            let mut byte = [0u8; 1];
            while !answer.ends_with(b"\r\n\r\n") && answer.len() < 4096 {
                c.read_exact(&mut byte)
                    .map_err(|e| format!("CONNECT answer: {e}"))?;
                answer.push(byte[0]);
            }
            if !answer.starts_with(b"HTTP/1.1 200") {
                return Err(format!(
                    "CONNECT answered {:?}",
                    String::from_utf8_lossy(&answer)
                ));
            }
        }
        Ok(c)
    }

    /// A short exchange, from a thread in the client's namespace: the
    /// server's hello, an echoed line.
    fn exchange_here(self, line: &str) -> Result<(), String> {
        let mut c = self.open_here()?;
        c.write_all(line.as_bytes())
            .and_then(|()| c.shutdown(Shutdown::Write))
            .map_err(|e| format!("send: {e}"))?;
        let mut got = String::new();
        c.read_to_string(&mut got)
            .map_err(|e| format!("receive: {e}"))?;
        if got != format!("upstream\n{line}") {
            return Err(format!("received {got:?}"));
        }
        Ok(())
    }
}

/// [`Via::exchange_here`] from `cl`.
fn exchange(cl: &Netns, via: impl Into<Via>, line: &str) -> Result<(), String> {
    let via = via.into();
    cl.run(|| via.exchange_here(line))
}

impl From<SocketAddr> for Via {
    fn from(dst: SocketAddr) -> Via {
        Via::Steered(dst)
    }
}

/// Clients opening connections at a steady rate from `cl` until stopped
/// (or a bound on time and count is reached), each checked end to end.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

#[derive(Default)]
struct Tally {
    ok: usize,
    failures: Vec<String>,
    /// How long the load ran.
    ran: Duration,
}

/// Per thread; four threads: 500 connections a second.
const RATE: u32 = 125;
const LOAD_THREADS: usize = 4;
const LOAD_LIMIT: Duration = Duration::from_secs(90);

impl Load {
    fn start(cl: &Netns, via: Via) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..LOAD_THREADS)
            .map(|n| {
                let stop = stop.clone();
                let netns = cl.path();
                std::thread::spawn(move || {
                    let file = File::open(&netns).expect("open the client's namespace");
                    // SAFETY: plain syscall on a valid fd; only this thread moves.
                    assert_eq!(
                        unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                        0,
                        "setns"
                    );
                    let mut tally = Tally::default();
                    let started = Instant::now();
                    let every = Duration::from_secs(1) / RATE;
                    let mut i: u64 = 0;
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
                        let line = format!("load {n} {i}\n");
                        match via.exchange_here(&line) {
                            Ok(()) => tally.ok += 1,
                            Err(e) => tally.failures.push(format!("connection {n}/{i}: {e}")),
                        }
                        i += 1;
                        let due = every * u32::try_from(i).unwrap_or(u32::MAX);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                    tally.ran = started.elapsed();
                    tally
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for thread in self.threads.drain(..) {
            let tally = thread.join().expect("a load thread panicked");
            all.ok += tally.ok;
            all.failures.extend(tally.failures);
            all.ran = all.ran.max(tally.ran);
        }
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A connection opened before a takeover, finished after it.
struct LongStream {
    stream: TcpStream,
    client: SocketAddr,
}

impl LongStream {
    fn open(cl: &Netns, via: impl Into<Via>) -> LongStream {
        let via = via.into();
        let mut stream = cl
            .run(|| via.open_here())
            .unwrap_or_else(|e| panic!("a long stream via {via:?}: {e}"));
        assert_eq!(
            lab::read_line(&mut stream).expect("the server's hello"),
            "upstream"
        );
        let client = stream.local_addr().unwrap();
        LongStream { stream, client }
    }

    /// Sends 256 KiB and checks the echo byte for byte; `old` logs its
    /// close: it was served there to the end.
    fn finish(mut self, seed: u64, old: &mut Daemon) {
        let data = lab::random_bytes(256 * 1024, seed);
        let got = lab::exchange(&mut self.stream, Arc::new(data.clone()))
            .unwrap_or_else(|e| panic!("the stream opened before the takeover: {e}"));
        assert_eq!(
            got,
            lab::Received::of(&data),
            "the stream opened before the takeover was not echoed byte-exact"
        );
        let closed = old.closed_event(self.client);
        assert_eq!(lab::daemon::outcome(&closed), "closed", "{closed}");
    }
}

/// Waits until `new` (started with `--takeover`) serves and `old` drains.
fn take_over(old: &mut Daemon, new: Daemon) -> Daemon {
    let mut new = new;
    new.wait_ready(Duration::from_secs(20));
    old.wait_event("`handed over`", Duration::from_secs(10), |e| {
        message(e).is_some_and(|m| m.starts_with("handed over"))
    });
    let ready = |d: &Daemon| d.event("ready").unwrap();
    let (old_ready, new_ready) = (ready(old), ready(&new));
    assert_eq!(
        field(&new_ready, "predecessor").and_then(Value::as_i64),
        Some(i64::from(old.pid())),
        "the successor names its predecessor: {new_ready}"
    );
    // The same sockets (and so their queues), not new ones on new ports.
    let listeners = |ev: &Value| lab::daemon::field_string(ev, "listeners");
    let old_listeners = listeners(&old_ready);
    for listener in old_listeners.trim_matches(['[', ']']).split(", ") {
        assert!(
            listeners(&new_ready).contains(listener),
            "the successor steers into the old listener {listener}: {new_ready}"
        );
    }
    new
}

/// The old daemon finished its connections, exited 0 through the handover
/// path (not a stop), and its successor let go of what it kept for it.
fn assert_handed_over_and_gone(old: &mut Daemon, new: &mut Daemon) {
    let status = old.wait_exit(Duration::from_secs(30));
    old.assert_exit_ok(status);
    let stopped = old.wait_event("`stopped`", Duration::from_secs(1), |e| {
        message(e) == Some("stopped")
    });
    assert_eq!(
        field(&stopped, "handed_over").and_then(Value::as_bool),
        Some(true),
        "{stopped}"
    );
    new.wait_event("the predecessor's exit", Duration::from_secs(10), |e| {
        message(e) == Some("takeover: the predecessor has exited")
    });
}

/// Stops `d` (SIGTERM, exit 0), the last daemon: nothing of ours is left.
fn stop_last(d: &mut Daemon, px: &Netns) {
    d.stop(Duration::from_secs(30));
    assert_nothing_left(px);
}

/// Nothing of ours is left once the last daemon stopped.
fn assert_nothing_left(px: &Netns) {
    let links = px.wait_no_bpf_links(Duration::from_secs(5));
    assert!(links.is_empty(), "BPF links left: {links:?}");
    let routes = px.wait_no_proxy_routes(Duration::from_secs(5));
    assert!(routes.is_empty(), "proto 244 routes left: {routes:?}");
    let rules = px.proxy_rules();
    assert!(rules.is_empty(), "routing rules left: {rules:?}");
}

/// The "second build" the third takeover starts: `cargo xtask test` builds
/// l4proxy a second time (its own profile, commit name `second-build`) and
/// names it in `L4PROXY_SECOND_BUILD`; a bare `cargo test` has only the
/// binary under test, and a copy of it stands in (said on stderr). Copied
/// into the test's directory either way: the successor runs a file of its
/// own, which an upgrade would have installed.
fn second_build(dir: &lab::TempDir) -> std::path::PathBuf {
    let built = std::env::var_os("L4PROXY_SECOND_BUILD").map(std::path::PathBuf::from);
    let source = built.clone().unwrap_or_else(|| {
        eprintln!(
            "L4PROXY_SECOND_BUILD is not set (`cargo xtask test` sets it): \
             the second build is a copy of the binary under test"
        );
        lab::daemon::binary().into()
    });
    let path = dir.join("l4proxy-second-build");
    std::fs::copy(&source, &path).unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    if built.is_some() {
        let version = |binary: &str| lab::must(binary, &["--version"]);
        let (under_test, second) = (
            version(lab::daemon::binary()),
            version(path.to_str().unwrap()),
        );
        assert!(
            second.contains("second-build") && second != under_test,
            "not another build: {second:?} vs {under_test:?}"
        );
    }
    path
}

/// One takeover: the successor's policy, binary (None: the one under
/// test), and a way in its policy adds, checked once it serves.
struct Step {
    policy: Value,
    binary: Option<std::path::PathBuf>,
    adds: Option<Via>,
}

/// Starts a daemon with `first`, then takes over three times (the same
/// binary and policy; the same binary with `changed`, whose new way in
/// `adds` is checked; a second build, copied into `dir`, with `changed`)
/// while clients come `via` (and `also`, if given) at a steady rate: no
/// connection fails, each stream opened before a takeover finishes
/// byte-exact on the old daemon, and the last daemon serves alone with its
/// routes. Returns it.
fn takeovers_under_load(
    t: &Topo,
    (first, changed): (&Value, &Value),
    (via, also): (Via, Option<Via>),
    adds: Via,
    dir: &lab::TempDir,
) -> Daemon {
    let steps = [
        Step {
            policy: first.clone(),
            binary: None,
            adds: None,
        },
        Step {
            policy: changed.clone(),
            binary: None,
            adds: Some(adds),
        },
        Step {
            policy: changed.clone(),
            binary: Some(second_build(dir)),
            adds: None,
        },
    ];
    let grace = ["--grace-period", "30"];
    let mut old = Daemon::start_ready(&t.px, first, &grace);
    let loads: Vec<Load> = std::iter::once(via)
        .chain(also)
        .map(|via| Load::start(&t.cl, via))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    for (n, step) in steps.into_iter().enumerate() {
        let long = LongStream::open(&t.cl, via);
        let args = ["--takeover", "--grace-period", "30"];
        let new = match step.binary {
            Some(binary) => Daemon::start_binary(&t.px, &step.policy, &args, binary),
            None => Daemon::start(&t.px, &step.policy, &args),
        };
        let mut new = take_over(&mut old, new);
        // The old daemon let its steer go once the successor's ran, while
        // it still drains (the long stream is open).
        let links = lab::poll_until(
            Duration::from_secs(5),
            || t.px.bpf_netns_links(),
            |links| links.len() == 1,
        );
        assert_eq!(links.len(), 1, "takeover {n}: steer links: {links:?}");
        assert!(
            old.try_exit().is_none(),
            "takeover {n}: the old daemon left"
        );
        assert!(
            !old.log_text().contains("did not say its programs run"),
            "takeover {n}: the old daemon heard no `attached`"
        );
        if let Some(added) = step.adds {
            exchange(&t.cl, added, &format!("added by takeover {n}\n"))
                .unwrap_or_else(|e| panic!("takeover {n}: what its policy adds: {e}"));
        }
        long.finish(n as u64, &mut old);
        assert_handed_over_and_gone(&mut old, &mut new);
        // The successor alone, before the next one.
        std::thread::sleep(Duration::from_secs(1));
        old = new;
    }
    for (load, via) in loads.into_iter().zip(std::iter::once(via).chain(also)) {
        let tally = load.finish();
        assert!(
            tally.failures.is_empty(),
            "via {via:?}: {} of {} connections failed through the takeovers, first: {:?}",
            tally.failures.len(),
            tally.ok + tally.failures.len(),
            &tally.failures[..tally.failures.len().min(5)]
        );
        let rate = tally.ok as f64 / tally.ran.as_secs_f64();
        assert!(
            // Enough to have crossed every takeover: what a loaded 2-core
            // runner makes with a debug test binary, not a speed check.
            tally.ok >= 300 && rate >= 50.0,
            "via {via:?}: only {} connections in {:?} ({rate:.0}/s): the load did not run at its rate",
            tally.ok,
            tally.ran
        );
        eprintln!(
            "load via {via:?}: {} connections in {:?} ({rate:.0}/s), none failed",
            tally.ok, tally.ran
        );
    }
    exchange(&t.cl, via, "after\n").expect("served after every takeover");
    old
}

/// Three successive takeovers (same binary, changed policy, a second
/// build) of a daemon that owns a service prefix (sk_lookup steering).
#[test]
fn steered_takeovers_under_load_lose_no_connection() {
    let (t, _srv) = Topo::with_echo("takeover-load", "203.0.113.2:8080", "upstream");
    let via = Via::Steered(sa("192.0.2.10:80"));
    let adds = Via::Steered(sa("[2001:db8:a::10]:81"));
    let dir = lab::TempDir::new("takeover-build");
    let policies = (&policy(), &changed_policy());
    let mut last = takeovers_under_load(&t, policies, (via, None), adds, &dir);
    let routes = t.px.proxy_routes();
    assert!(
        routes.iter().any(|r| r.contains("192.0.2.0/24")),
        "the successor's routes after its predecessors left: {routes:?}"
    );
    exchange(&t.cl, sa("[2001:db8:a::10]:80"), "after v6\n").expect("IPv6 after the takeovers");

    stop_last(&mut last, &t.px);
}

/// A fully transparent gateway (`interfaces`, `bind: client`): the tc
/// programs of both daemons and the fwmark routing they share keep every
/// connection's packets flowing through three takeovers. Also those to
/// port 81, which the first policy leaves to the server's own answer there
/// and the changed one intercepts: none of them is lost while both daemons
/// run.
#[test]
fn gateway_takeovers_under_load_lose_no_connection() {
    let (t, _srv) = Topo::with_echo("takeover-gw", "203.0.113.2:8080", "upstream");
    let _direct = Server::start(
        &t.sv,
        sa("203.0.113.3:81"),
        handlers::hello_echo("upstream"),
    );
    let gateway = |ports: Value| {
        json!({
            "intercept": [
                { "name": "gw", "prefixes": ["203.0.113.0/24"], "ports": ports, "interfaces": ["to-cl"], "upstream": "pool" }
            ],
            "upstreams": { "pool": { "servers": ["203.0.113.2:8080"], "bind": "client" } }
        })
    };
    let via = Via::Steered(sa("203.0.113.3:80"));
    let adds = Via::Steered(sa("203.0.113.3:81"));
    let dir = lab::TempDir::new("takeover-gw-build");
    let policies = (&gateway(json!([80])), &gateway(json!([80, 81])));
    let mut last = takeovers_under_load(&t, policies, (via, Some(adds)), adds, &dir);
    let rules = t.px.proxy_rules();
    assert!(
        rules.iter().any(|r| r.contains("fwmark")),
        "the successor's fwmark rule after its predecessors left: {rules:?}"
    );
    let tc = t.px.tc_programs(&["to-cl", "to-sv"]);
    assert_eq!(
        tc,
        ["to-cl: classify", "to-sv: classify"],
        "only the last daemon's classify is left"
    );

    stop_last(&mut last, &t.px);
    assert_eq!(
        t.px.wait_no_tc_programs(&["to-cl", "to-sv"], Duration::from_secs(5)),
        Vec::<String>::new(),
        "tc programs left"
    );
}

/// A daemon that owns tens of thousands of service prefixes hands them
/// over: the offer listing their routes (1.5 MB of JSON here, more than
/// the first versions read) comes whole, and the successor steers into
/// the last of them and keeps their routes.
#[test]
fn a_takeover_hands_over_many_owned_prefixes() {
    const PREFIXES: u32 = 60_000;
    let (t, _srv) = Topo::with_echo("takeover-many", "203.0.113.2:8080", "upstream");
    t.cl.route("2001:db8:100::/48", lab::addr::PX6_CL);
    let many = lab::many_prefixes(PREFIXES);
    let policy = json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "pool" },
            { "name": "many", "prefixes": many, "ports": [80], "upstream": "pool" }
        ],
        "upstreams": { "pool": { "servers": ["203.0.113.2:8080"] } }
    });
    let last = sa(&format!("[2001:db8:100:{:x}::10]:80", PREFIXES - 1));
    let mut old = Daemon::start(&t.px, &policy, &[]);
    old.wait_ready(Duration::from_secs(60));
    exchange(&t.cl, last, "before\n").expect("the first daemon steers the last prefix");

    let mut new = Daemon::start(&t.px, &policy, &["--takeover"]);
    new.wait_ready(Duration::from_secs(60));
    let mut new = take_over(&mut old, new);
    assert_handed_over_and_gone(&mut old, &mut new);
    exchange(&t.cl, last, "after\n").expect("the successor steers the last prefix");
    let routes = t.px.proxy_routes();
    assert!(
        routes.len() > PREFIXES as usize,
        "the successor keeps every prefix's route: {} routes",
        routes.len()
    );
    drop(old);
    stop_last(&mut new, &t.px);
}

/// Takeovers that fail (a policy the check refuses, one this host cannot
/// apply, another packet mark) exit non-zero saying why, and leave the
/// running daemon serving with all its state.
#[test]
fn refused_takeover_leaves_the_old_daemon_serving() {
    let (t, _srv) = Topo::with_echo("takeover-refused", "203.0.113.2:8080", "upstream");
    let dst = sa("192.0.2.10:80");
    let mut old = Daemon::start_ready(&t.px, &policy(), &[]);
    let routes = t.px.proxy_routes();

    let unknown_upstream = json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "nowhere" } ],
        "upstreams": { "pool": { "servers": ["203.0.113.2:8080"] } }
    });
    let missing_interface = json!({
        "intercept": [ { "name": "gw", "prefixes": ["203.0.113.0/24"], "ports": [80], "interfaces": ["nope0"], "upstream": "pool" } ],
        "upstreams": { "pool": { "servers": ["203.0.113.2:8080"] } }
    });
    let cases: [(&str, Value, &[&str], &str); 3] = [
        (
            "a policy the check refuses",
            unknown_upstream,
            &[],
            "nowhere",
        ),
        (
            "a policy this host cannot apply",
            missing_interface,
            &[],
            r#"no interface \"nope0\""#,
        ),
        (
            "another packet mark",
            policy(),
            &["--fwmark", "0x1000/0xf000"],
            "give the same --fwmark",
        ),
    ];
    let assert_refused = |what: &str, mut new: Daemon, reason: &str, old: &mut Daemon| {
        let status = new.wait_exit(Duration::from_secs(20));
        assert!(!status.success(), "{what}: the takeover should fail");
        assert!(
            new.log_text().contains(reason),
            "{what}: the failed successor should say why ({reason:?}); its log:\n{}",
            new.log_text()
        );
        exchange(&t.cl, dst, &format!("after {what}\n"))
            .unwrap_or_else(|e| panic!("after {what}, the old daemon should still serve: {e}"));
        assert_eq!(
            t.px.proxy_routes(),
            routes,
            "after {what}, the old daemon's routes should be as they were"
        );
        assert!(
            old.try_exit().is_none(),
            "after {what}, the old daemon exited"
        );
    };
    for (what, refused, extra, reason) in cases {
        let mut args = vec!["--takeover"];
        args.extend_from_slice(extra);
        assert_refused(
            what,
            Daemon::start(&t.px, &refused, &args),
            reason,
            &mut old,
        );
    }
    // A successor that could not finish its start-up, dropping privileges
    // (to a user, without cap_setuid in its bounding set), says so before
    // it begins.
    let without_setuid = start_without_setuid(&t.px, &["--takeover", "--user", "nobody"]);
    assert_refused(
        "a successor that cannot switch user",
        without_setuid,
        "cap_setuid",
        &mut old,
    );
    stop_last(&mut old, &t.px);
    let stopped = old.event("stopped").expect("a `stopped` event");
    assert_eq!(
        field(&stopped, "handed_over").and_then(Value::as_bool),
        Some(false),
        "{stopped}"
    );
}

/// A successor's policy that adds a service prefix's route and a gateway's
/// fwmark rules and table routes to `policy()`.
fn grown_policy() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80], "upstream": "pool" },
            { "name": "gw", "prefixes": ["203.0.113.0/24"], "ports": [80], "interfaces": ["to-cl"], "upstream": "pool" }
        ],
        "upstreams": { "pool": { "servers": ["203.0.113.2:8080"] } }
    })
}

/// After a takeover that failed: the old daemon's routes and rules (as
/// they were before it), no more, and it serves.
fn assert_serving_as_before(t: &Topo, (routes, rules): (&[String], &[String]), what: &str) {
    assert_eq!(
        t.px.proxy_routes(),
        routes,
        "{what}: the old daemon's routes, no more"
    );
    assert_eq!(
        t.px.proxy_rules(),
        rules,
        "{what}: the old daemon's rules, no more"
    );
    exchange(&t.cl, sa("192.0.2.10:80"), "after\n")
        .unwrap_or_else(|e| panic!("{what}: the old daemon should serve: {e}"));
}

/// A successor killed before the running daemon took its `ready` (SIGKILL,
/// the OOM killer) leaves nothing behind: its guard was not armed (the
/// routes were still the running daemon's), so the running daemon removes
/// what the successor added for its own policy: a service prefix's route,
/// which would make the prefix local with nobody listening, and a
/// gateway's fwmark rules and table routes.
#[test]
fn a_successor_killed_before_the_handover_leaves_nothing() {
    let (t, _srv) = Topo::with_echo("takeover-killed", "203.0.113.2:8080", "upstream");
    let mut old = Daemon::start_ready(&t.px, &policy(), &[]);
    let (routes, rules) = (t.px.proxy_routes(), t.px.proxy_rules());
    let mut new = Daemon::start(&t.px, &grown_policy(), &["--takeover"]);
    old.wait_event("the offer", Duration::from_secs(20), |e| {
        message(e) == Some("takeover: listeners offered to a successor")
    });
    // Until the successor is killed: it cannot hear `draining`.
    old.signal(libc::SIGSTOP);
    let added = |px: &Netns| {
        px.proxy_routes()
            .iter()
            .any(|r| r.contains("2001:db8:a::/64"))
            && px.proxy_routes().iter().any(|r| r.contains("table 244"))
            && px.proxy_rules().iter().any(|r| r.contains("fwmark"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !added(&t.px) {
        assert!(
            Instant::now() < deadline,
            "the successor did not add its routes and rules; its log:\n{}",
            new.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    new.kill();
    old.signal(libc::SIGCONT);
    old.wait_event("the failed takeover", Duration::from_secs(10), |e| {
        message(e).is_some_and(|m| m.starts_with("takeover failed"))
    });
    let swept = old.wait_event("the clean-up", Duration::from_secs(10), |e| {
        message(e) == Some("takeover: removed the routes and rules the failed successor left")
    });
    assert!(
        field(&swept, "removed").and_then(Value::as_u64) >= Some(3),
        "a prefix's route, the table's route and the fwmark rule at least: {swept}"
    );
    assert_serving_as_before(&t, (&routes, &rules), "killed");
    stop_last(&mut old, &t.px);
}

/// SIGTERM to a successor before the running daemon stopped taking
/// connections (`systemctl stop` during an upgrade, Ctrl-C of `run
/// --takeover`) ends the successor's start: it exits non-zero saying so,
/// and the running daemon serves on with its routes and rules. Both while
/// the successor asks for the listeners and while it waits for the running
/// daemon's `draining` (having applied a policy with more routes).
#[test]
fn a_stop_during_a_takeover_leaves_the_old_daemon_serving() {
    let (t, _srv) = Topo::with_echo("takeover-term", "203.0.113.2:8080", "upstream");
    let mut old = Daemon::start_ready(&t.px, &policy(), &[]);
    let (routes, rules) = (t.px.proxy_routes(), t.px.proxy_rules());
    for (stage, line) in [
        (
            "asking",
            "takeover: asking the running daemon for its listeners",
        ),
        (
            "waiting",
            "takeover: ready; waiting for the running daemon to drain",
        ),
    ] {
        if stage == "asking" {
            // It answers only once continued.
            old.signal(libc::SIGSTOP);
        }
        let mut new = Daemon::start(&t.px, &grown_policy(), &["--takeover"]);
        if stage == "waiting" {
            old.wait_event("the offer", Duration::from_secs(20), |e| {
                message(e) == Some("takeover: listeners offered to a successor")
            });
            // It hears `ready` only once continued.
            old.signal(libc::SIGSTOP);
        }
        new.wait_event(line, Duration::from_secs(20), |e| message(e) == Some(line));
        new.signal(libc::SIGTERM);
        let status = new.wait_exit(Duration::from_secs(10));
        assert!(
            !status.success()
                && new
                    .log_text()
                    .contains("stopped by SIGTERM or SIGINT while starting"),
            "{stage}: the successor should end its start, saying why: {status:?}\n{}",
            new.log_text()
        );
        old.signal(libc::SIGCONT);
        if stage == "waiting" {
            old.wait_event("the failed takeover", Duration::from_secs(10), |e| {
                message(e).is_some_and(|m| m.starts_with("takeover failed"))
            });
        }
        assert_serving_as_before(&t, (&routes, &rules), stage);
    }
    stop_last(&mut old, &t.px);
}

/// A reload while a successor takes over is refused (the kernel state
/// stays as it was offered), says why, and counts as a failed reload; the
/// running daemon serves on once the successor gives up.
#[test]
fn a_reload_during_a_takeover_is_refused_and_counted() {
    const ADMIN: &str = "127.0.0.1:9901";
    let (t, _srv) = Topo::with_echo("takeover-reload", "203.0.113.2:8080", "upstream");
    let mut old = Daemon::start_ready(&t.px, &policy(), &["--admin", ADMIN]);
    // A successor that asks, reads the offer and says nothing more: the
    // takeover stays under way while it holds the connection.
    let successor = t.px.run(|| {
        use std::io::BufRead;
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
        let name = UnixAddr::from_abstract_name(b"l4proxy-control").unwrap();
        let mut stream = UnixStream::connect_addr(&name).expect("the control socket");
        stream.write_all(b"takeover\n").unwrap();
        let mut offer = String::new();
        std::io::BufReader::new(&stream)
            .read_line(&mut offer)
            .unwrap();
        assert!(offer.contains(r#""ok":true"#), "the offer: {offer}");
        stream
    });
    let reload = command(&t.px, &["reload"], Duration::from_secs(10));
    assert!(
        !reload.success() && reload.stderr.contains("a takeover is under way"),
        "{reload:?}"
    );
    let failed = lab::prometheus::sample(
        &lab::prometheus::scrape(&t.px, ADMIN),
        r#"l4proxy_reloads_total{result="failed"}"#,
    );
    assert_eq!(failed, Some(1.0), "the refused reload is counted");
    drop(successor);
    old.wait_event("the failed takeover", Duration::from_secs(10), |e| {
        message(e).is_some_and(|m| m.starts_with("takeover failed"))
    });
    exchange(&t.cl, sa("192.0.2.10:80"), "after\n").expect("the old daemon serves");
    stop_last(&mut old, &t.px);
}

/// A SIGHUP while a successor waits for the running daemon's answer (`pkill
/// -HUP l4proxy` during an upgrade) does not end it: it takes over, then
/// rereads its policy.
#[test]
fn a_hangup_during_a_takeover_is_a_reload_once_it_serves() {
    let (t, _srv) = Topo::with_echo("takeover-hup", "203.0.113.2:8080", "upstream");
    let dst = sa("192.0.2.10:80");
    let mut old = Daemon::start_ready(&t.px, &policy(), &[]);
    // The running daemon answers only once continued.
    old.signal(libc::SIGSTOP);
    let mut new = Daemon::start(&t.px, &policy(), &["--takeover"]);
    new.wait_event("the takeover's request", Duration::from_secs(20), |e| {
        message(e) == Some("takeover: asking the running daemon for its listeners")
    });
    new.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    assert!(new.try_exit().is_none(), "the SIGHUP ended the successor");
    old.signal(libc::SIGCONT);
    let mut new = take_over(&mut old, new);
    new.wait_event("the reload", Duration::from_secs(10), |e| {
        message(e) == Some("policy reloaded")
    });
    exchange(&t.cl, dst, "after the reload\n").expect("the successor serves");
    assert_handed_over_and_gone(&mut old, &mut new);
    stop_last(&mut new, &t.px);
}

/// A second `run` in the namespace is refused naming the running daemon's
/// pid; `cleanup` refuses while it runs, and works once it is gone.
#[test]
fn one_daemon_per_namespace() {
    let (t, _srv) = Topo::with_echo("takeover-one", "203.0.113.2:8080", "upstream");
    let dst = sa("192.0.2.10:80");
    let mut first = Daemon::start_ready(&t.px, &policy(), &[]);
    let pid = format!("pid {}", first.pid());

    let mut second = Daemon::start(&t.px, &policy(), &[]);
    let status = second.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "a second daemon should be refused");
    let log = second.log_text();
    assert!(
        log.contains(&pid) && log.contains("already runs in this network namespace"),
        "the refusal should name the running daemon ({pid}); log:\n{log}"
    );

    let cleanup = command(&t.px, &["cleanup"], Duration::from_secs(30));
    assert!(!cleanup.success(), "cleanup should refuse: {cleanup:?}");
    assert!(
        cleanup.stderr.contains(&pid),
        "cleanup's refusal should name the daemon ({pid}): {cleanup:?}"
    );
    assert!(
        t.px.proxy_routes()
            .iter()
            .any(|r| r.contains("192.0.2.0/24")),
        "cleanup must not have removed the running daemon's routes"
    );
    exchange(&t.cl, dst, "still one\n").expect("the first daemon still serves");

    first.stop(Duration::from_secs(30));
    let cleanup = command(&t.px, &["cleanup"], Duration::from_secs(30));
    assert!(cleanup.success(), "cleanup without a daemon: {cleanup:?}");
    assert_nothing_left(&t.px);
}

/// Any local user can bind the control socket's abstract name while it is
/// free (before a start, in a restart's gap): its holder, not root, is no
/// daemon. `reload` and `status` do not take its answers (it says a reload
/// worked), `run` names it instead of a daemon, and so does `cleanup`,
/// which leaves the routes alone (the holder may be a daemon root started
/// in another user namespace).
#[test]
fn a_control_socket_name_held_by_another_user_is_no_daemon() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
    const NOBODY: libc::uid_t = 65534;
    let (t, _srv) = Topo::with_echo("takeover-squat", "203.0.113.2:8080", "upstream");
    let squatter = t.px.run(|| {
        // This thread only (the raw call, not libc's, which would change
        // every thread): the listener records the uid it listens with.
        // SAFETY: plain syscall; this thread ends right after.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY) };
        assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
        let name = UnixAddr::from_abstract_name(b"l4proxy-control").unwrap();
        UnixListener::bind_addr(&name).expect("bind the control socket's name")
    });
    // It answers whatever is asked as a daemon would: `reload`, `status`,
    // `run` and `cleanup` each connect once.
    let answering = std::thread::spawn(move || {
        for stream in squatter.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.write_all(b"{\"ok\":true,\"pid\":1}\n");
        }
    });
    let who = format!("uid {NOBODY}), not by root");
    for ask in ["reload", "status"] {
        let out = command(&t.px, &[ask], Duration::from_secs(10));
        assert!(
            !out.success() && out.stderr.contains(&who),
            "`{ask}` should name the holder, not take its answer: {out:?}"
        );
    }
    let mut refused = Daemon::start(&t.px, &policy(), &[]);
    let status = refused.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "a daemon cannot bind the name");
    let log = refused.log_text();
    assert!(
        log.contains(&who) && !log.contains("already runs"),
        "the refusal names the holder, not a daemon; log:\n{log}"
    );
    let cleanup = command(&t.px, &["cleanup"], Duration::from_secs(30));
    assert!(
        !cleanup.success() && cleanup.stderr.contains(&who),
        "cleanup names the holder and removes nothing: {cleanup:?}"
    );
    // Every client asked it (a hang would be a missing one): within 10 s.
    assert!(
        lab::poll_until(
            Duration::from_secs(10),
            || answering.is_finished(),
            |done| *done
        ),
        "not all four clients asked the holder"
    );
    answering.join().unwrap();
}

/// `l4proxy upgrade`: the daemon starts its successor from its own binary
/// path and arguments; `upgrade` exits 0 once the successor serves; the
/// old daemon finishes its open stream and exits.
#[test]
fn upgrade_starts_the_successor() {
    let (t, _srv) = Topo::with_echo("takeover-upgrade", "203.0.113.2:8080", "upstream");
    let dst = sa("192.0.2.10:80");
    // The successor gets the same `--admin`: it must be handed the
    // listener, the old daemon still has the address.
    let admin = sa("127.0.0.1:9100");
    let args = ["--grace-period", "30", "--admin", "127.0.0.1:9100"];
    let mut old = Daemon::start_ready(&t.px, &policy(), &args);
    let long = LongStream::open(&t.cl, dst);

    // A successor that cannot start (its policy file is broken now): the
    // upgrade fails saying so, and the old daemon goes on.
    let good = std::fs::read(old.policy_path()).unwrap();
    std::fs::write(old.policy_path(), "{ broken").unwrap();
    let failed = command(&t.px, &["upgrade"], Duration::from_secs(120));
    assert!(!failed.success(), "the upgrade should fail: {failed:?}");
    assert!(
        failed.stderr.contains("the successor exited")
            && failed.stderr.contains("the running daemon goes on"),
        "the failed upgrade should say why: {failed:?}"
    );
    exchange(&t.cl, dst, "after a failed upgrade\n").expect("the old daemon still serves");
    std::fs::write(old.policy_path(), good).unwrap();

    let upgrade = command(&t.px, &["upgrade"], Duration::from_secs(120));
    assert!(upgrade.success(), "l4proxy upgrade: {upgrade:?}");
    let successor = Stray::upgraded(&upgrade);
    assert!(successor.alive(), "the successor runs");
    assert_ne!(successor.0, old.pid());

    long.finish(7, &mut old);
    let status = old.wait_exit(Duration::from_secs(30));
    old.assert_exit_ok(status);
    exchange(&t.cl, dst, "after the upgrade\n").expect("the successor steers");
    let scraped = t.px.run(|| -> std::io::Result<String> {
        let mut c = TcpStream::connect(admin)?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: px\r\n\r\n")?;
        let mut text = String::new();
        c.read_to_string(&mut text)?;
        Ok(text)
    });
    let scraped = scraped.expect("scraping the successor's admin listener");
    assert!(
        scraped.starts_with("HTTP/1.1 200") && scraped.contains("l4proxy_"),
        "the successor serves metrics on the handed admin listener: {scraped:.200}"
    );
    let routes = t.px.proxy_routes();
    assert!(
        routes.iter().any(|r| r.contains("192.0.2.0/24")),
        "the successor keeps the routes: {routes:?}"
    );

    successor.terminate(Duration::from_secs(30));
    assert_nothing_left(&t.px);
}

/// A daemon that hands over while its own predecessor still drains: the
/// first daemon's stream still works after two takeovers, the middle one
/// waits for it before it exits, and the last one serves alone.
#[test]
fn a_chain_of_takeovers_keeps_the_first_daemons_connections() {
    let (t, _srv) = Topo::with_echo("takeover-chain", "203.0.113.2:8080", "upstream");
    let dst = sa("192.0.2.10:80");
    let args = ["--takeover", "--grace-period", "30"];
    let mut first = Daemon::start_ready(&t.px, &policy(), &["--grace-period", "30"]);
    let long = LongStream::open(&t.cl, dst);
    let mut second = take_over(&mut first, Daemon::start(&t.px, &policy(), &args));
    let mut third = take_over(&mut second, Daemon::start(&t.px, &changed_policy(), &args));
    second.wait_event(
        "waiting for its predecessor",
        Duration::from_secs(10),
        |e| message(e) == Some("waiting for the predecessor to finish draining"),
    );
    assert!(first.try_exit().is_none() && second.try_exit().is_none());
    exchange(&t.cl, dst, "while two drain\n").expect("the last daemon serves");

    long.finish(11, &mut first);
    let status = first.wait_exit(Duration::from_secs(30));
    first.assert_exit_ok(status);
    assert_handed_over_and_gone(&mut second, &mut third);
    let routes = t.px.proxy_routes();
    assert!(
        routes.iter().any(|r| r.contains("192.0.2.0/24")),
        "the last daemon's routes: {routes:?}"
    );
    exchange(&t.cl, dst, "alone\n").expect("the last daemon serves alone");
    stop_last(&mut third, &t.px);
}

/// CONNECT listeners are handed over too: three takeovers (the second adds
/// a listener) under a steady load of CONNECT tunnels.
#[test]
fn connect_takeovers_under_load_lose_no_connection() {
    let (t, _srv) = Topo::with_echo("takeover-connect", "203.0.113.2:443", "upstream");
    let explicit = |listen: Value| {
        json!({
            "intercept": [
                { "name": "explicit", "upstream": "direct",
                  "connect": { "listen": listen, "clients": ["198.51.100.0/24"] } }
            ],
            "upstreams": { "direct": { "original_destination": true } }
        })
    };
    let target = sa("203.0.113.2:443");
    let first = explicit(json!(["198.51.100.1:3128"]));
    let changed = explicit(json!(["198.51.100.1:3128", "198.51.100.1:3129"]));
    let tunnel = |proxy| Via::Connect {
        proxy: sa(proxy),
        target,
    };
    let (via, adds) = (tunnel("198.51.100.1:3128"), tunnel("198.51.100.1:3129"));
    let dir = lab::TempDir::new("takeover-connect-build");
    let mut last = takeovers_under_load(&t, (&first, &changed), (via, None), adds, &dir);
    stop_last(&mut last, &t.px);
}

/// Takeovers that fail lose no connection of the running daemon, under
/// load throughout: a successor with more workers adds members to the
/// reuseport groups (where the kernel then queues connections) only once
/// its policy is in force, and here its policy cannot be applied; one that
/// could not drop its privileges (no cap_setuid for `--user`) fails before
/// it begins.
#[test]
fn a_failed_takeover_with_more_workers_loses_no_connection() {
    let (t, _srv) = Topo::with_echo("takeover-wider", "203.0.113.2:8080", "upstream");
    let dst = sa("192.0.2.10:80");
    let mut old = Daemon::start_ready(&t.px, &policy(), &["--workers", "1"]);
    let missing_interface = json!({
        "intercept": [ { "name": "gw", "prefixes": ["203.0.113.0/24"], "ports": [80], "interfaces": ["nope0"], "upstream": "pool" } ],
        "upstreams": { "pool": { "servers": ["203.0.113.2:8080"] } }
    });
    let load = Load::start(&t.cl, Via::Steered(dst));
    std::thread::sleep(Duration::from_millis(300));
    let failed =
        |e: &Value| lab::daemon::message(e).is_some_and(|m| m.starts_with("takeover failed: "));
    for round in 0..3 {
        let mut new = Daemon::start(&t.px, &missing_interface, &["--takeover", "--workers", "4"]);
        let status = new.wait_exit(Duration::from_secs(20));
        assert!(!status.success(), "round {round}: the takeover should fail");
        assert!(
            new.log_text().contains("nope0"),
            "round {round}: {}",
            new.log_text()
        );
        // It asked, and was refused for its policy: the old daemon says so.
        old.wait_nth_event(
            round,
            "the old daemon's `takeover failed`",
            Duration::from_secs(10),
            failed,
        );
        let mut new = start_without_setuid(&t.px, &["--takeover", "--user", "nobody"]);
        let status = new.wait_exit(Duration::from_secs(20));
        assert!(!status.success(), "round {round}: the takeover should fail");
        assert!(
            new.log_text().contains("cap_setuid"),
            "round {round}: {}",
            new.log_text()
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let tally = load.finish();
    // The successors without cap_setuid never asked (counted once the last
    // one's end would have been read).
    assert_eq!(
        old.events().iter().filter(|e| failed(e)).count(),
        3,
        "{}",
        old.log_text()
    );
    assert!(
        tally.failures.is_empty() && tally.ok > 0,
        "{} served, failed: {:#?}",
        tally.ok,
        tally.failures
    );
    assert!(old.try_exit().is_none(), "the old daemon exited");
}

/// The daemon with `policy()` and `args`, started from a thread without
/// cap_setuid in its bounding set (what the daemon inherits).
fn start_without_setuid(px: &Netns, args: &[&str]) -> Daemon {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscall; only this thread's bounding set changes.
            let rc = unsafe {
                libc::prctl(libc::PR_CAPBSET_DROP, 7 /* CAP_SETUID */, 0, 0, 0)
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            Daemon::start(px, &policy(), args)
        })
        .join()
        .unwrap()
    })
}
