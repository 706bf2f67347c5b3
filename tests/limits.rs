//! Timeouts, keepalive, connection limits and close semantics: what a client
//! and a server see when the proxy, the other side or a limit ends a
//! connection. Each test builds the routed lab of tests/lab (cl — px — sv)
//! with a service prefix px owns (192.0.2.0/24, 2001:db8:a::/64).

mod lab;

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use lab::daemon::outcome;
use lab::daemon::{field_str, field_u64, message};
use lab::{Daemon, Server, Topo, addr, connect, connect_from, handlers, sa};
use serde_json::{Value, json};

/// One rule on port 80 of the service prefixes to the server's echo port
/// (both families), with `extra` merged into the rule.
fn policy(extra: Value) -> Value {
    let mut rule = json!({
        "name": "web",
        "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"],
        "ports": [80, 81],
        "upstream": "echo"
    });
    for (key, value) in extra.as_object().unwrap() {
        rule[key] = value.clone();
    }
    json!({
        "intercept": [rule],
        "upstreams": { "echo": { "servers": ["203.0.113.2:8080", "[2001:db8:5::2]:8080"] } }
    })
}

const SERVICES: [&str; 2] = ["192.0.2.10", "[2001:db8:a::10]"];

/// Where the daemon serves its metrics, inside px.
const ADMIN: &str = "127.0.0.1:9901";

/// `l4proxy_limited_connections_total` for `limit`, as scraped now.
fn limited(t: &Topo, limit: &str) -> f64 {
    let scraped = lab::prometheus::scrape(&t.px, ADMIN);
    let series = format!(r#"l4proxy_limited_connections_total{{limit="{limit}"}}"#);
    lab::prometheus::expect_sample(&scraped, &series)
}

fn service(host: &str, port: u16) -> SocketAddr {
    sa(&format!("{host}:{port}"))
}

/// The echo servers of `policy`, both families.
fn echo_servers(t: &Topo) -> [Server; 2] {
    [
        Server::start(&t.sv, sa("203.0.113.2:8080"), handlers::hello_echo("sv")),
        Server::start(
            &t.sv,
            sa("[2001:db8:5::2]:8080"),
            handlers::hello_echo("sv"),
        ),
    ]
}

/// Reads the greeting and one echoed line: the connection is relayed.
fn served(c: &mut TcpStream, what: &str) {
    assert_eq!(
        lab::read_line(c).unwrap_or_else(|e| panic!("{what}: greeting: {e}")),
        "sv",
        "{what}"
    );
    lab::echo(c, "ping", what);
}

/// A connection that must be reset at once: the reset may come before
/// connect() returns, or as the first read. Returns how long it took.
fn reset_at_once(connected: io::Result<TcpStream>, what: &str) -> Duration {
    let started = Instant::now();
    match connected {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => started.elapsed(),
        Err(e) => panic!("{what}: connect failed with {e}, not a reset"),
        Ok(mut c) => {
            let (got, after) = ends_with_reset(&mut c, Duration::from_secs(5), what);
            assert_eq!(got, 0, "{what}: bytes before the reset");
            after
        }
    }
}

/// Reads until the connection ends, which must be a reset within
/// `within`; returns the bytes that came first and how long it took.
fn ends_with_reset(c: &mut TcpStream, within: Duration, what: &str) -> (usize, Duration) {
    let started = Instant::now();
    c.set_read_timeout(Some(within)).unwrap();
    let mut got = 0;
    let mut buf = [0u8; 4096];
    loop {
        match lab::read_some(c, &mut buf) {
            Ok(0) => panic!("{what}: clean EOF after {got} bytes, not a reset"),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return (got, started.elapsed());
            }
            Err(e) => panic!(
                "{what}: {e} after {got} bytes and {:?}, not a reset",
                started.elapsed()
            ),
        }
    }
}

/// A server handler that reads until its connection ends and reports how:
/// `Ok(bytes)` for a clean EOF, the error otherwise.
fn report_end(tx: Sender<io::Result<usize>>) -> impl Fn(TcpStream) + Send + Sync + 'static {
    let tx = std::sync::Mutex::new(tx);
    move |mut s: TcpStream| {
        let mut got = 0;
        let mut buf = [0u8; 4096];
        let end = loop {
            match lab::read_some(&mut s, &mut buf) {
                Ok(0) => break Ok(got),
                Ok(n) => got += n,
                Err(e) => break Err(e),
            }
        };
        let _ = tx.lock().unwrap().send(end);
    }
}

fn expect_reset(rx: &Receiver<io::Result<usize>>, what: &str) {
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: the server saw {other:?}, not a reset"),
    }
}

/// A route's idle timeout overrides its rule's, which overrides the flag:
/// after 1 s of silence both sides get a reset, and the close is logged as
/// an idle timeout. A connection of the rule alone keeps its 30 s, silent
/// for twice the flag's 1 s.
#[test]
fn an_idle_connection_is_reset_on_both_sides_at_the_idle_timeout() {
    let t = Topo::new("idle");
    let (tx, rx) = mpsc::channel();
    let _srv4 = Server::start(&t.sv, sa("203.0.113.2:8080"), report_end(tx.clone()));
    let _srv6 = Server::start(&t.sv, sa("[2001:db8:5::2]:8080"), report_end(tx));
    let mut p = policy(json!({ "timeouts": { "idle": 30 } }));
    p["routes"] = json!([
        { "name": "quick", "match": { "ports": [80] }, "upstream": "echo", "timeouts": { "idle": 1 } }
    ]);
    let mut d = Daemon::start_ready(&t.px, &p, &["--idle-timeout", "1"]);
    for host in SERVICES {
        let mut c = connect(&t.cl, service(host, 80));
        c.write_all(b"hello").unwrap();
        // Before the relay moved the bytes: the idle time is at most the
        // time since (a reset before the timeout still shows, unless the
        // relay took longer than the 100 ms margin).
        let quiet = Instant::now();
        let mut slow = connect(&t.cl, service(host, 81));
        ends_with_reset(&mut c, Duration::from_secs(5), host);
        let after = quiet.elapsed();
        assert!(
            after >= Duration::from_millis(900),
            "{host}: reset after {after:?}, before the idle timeout"
        );
        expect_reset(&rx, host);
        let ev = d.closed_event(c.local_addr().unwrap());
        assert_eq!(
            outcome(&ev),
            "idle_timeout: no byte moved for 1s",
            "{host}: {ev}"
        );
        assert_eq!(field_u64(&ev, "bytes_from_client"), Some(5), "{ev}");
        // The rule's own 30 s, not the flag's 1 s: still open after 2 s of
        // silence (nothing to wait for but the time), and still relaying.
        std::thread::sleep(Duration::from_secs(1));
        slow.write_all(b"still here").unwrap();
        slow.shutdown(Shutdown::Write).unwrap();
        let ev = d.closed_event(slow.local_addr().unwrap());
        assert_eq!(outcome(&ev), "closed", "{host}: {ev}");
        assert_eq!(field_u64(&ev, "bytes_from_client"), Some(10), "{ev}");
        drop(slow);
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(10)) => {}
            other => panic!("{host}: the server of the rule's connection saw {other:?}"),
        }
    }
}

/// A connection whose bytes keep moving is not cut by a 1 s idle timeout,
/// and the 3 s lifetime ends it all the same, with a reset.
#[test]
fn a_busy_connection_outlives_the_idle_timeout_and_the_lifetime_ends_it() {
    let t = Topo::new("lifetime");
    let _servers = echo_servers(&t);
    let p = policy(json!({ "timeouts": { "idle": 1, "lifetime": 3 } }));
    let mut d = Daemon::start_ready(&t.px, &p, &[]);
    for host in SERVICES {
        let mut c = connect(&t.cl, service(host, 80));
        let started = Instant::now();
        served(&mut c, host);
        let mut lines = 0;
        let ended = loop {
            std::thread::sleep(Duration::from_millis(300));
            if let Err(e) = c.write_all(b"tick\n") {
                break e;
            }
            match lab::read_line(&mut c) {
                Ok(line) if line == "tick" => lines += 1,
                Ok(other) => panic!("{host}: echoed {other:?}"),
                Err(e) => break e,
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{host}: never ended"
            );
        };
        let lived = started.elapsed();
        assert_eq!(
            ended.kind(),
            io::ErrorKind::ConnectionReset,
            "{host}: {ended}"
        );
        assert!(
            lived >= Duration::from_millis(2900) && lines >= 3,
            "{host}: ended after {lived:?} and {lines} lines"
        );
        let ev = d.closed_event(c.local_addr().unwrap());
        assert_eq!(outcome(&ev), "lifetime_over: open for 3s", "{host}: {ev}");
    }
}

/// Keepalive finds a client that vanished (its link gone, no FIN, no
/// reset) long before the idle timeout: the server gets a reset. Both of
/// the proxy's sockets carry the keepalive timer.
#[test]
fn keepalive_finds_a_vanished_client() {
    let t = Topo::new("keepalive");
    let (tx, rx) = mpsc::channel();
    let _srv = Server::start(&t.sv, sa("203.0.113.2:8080"), report_end(tx));
    let p = policy(json!({ "keepalive": { "idle": 1, "interval": 1, "count": 2 } }));
    let mut d = Daemon::start_ready(&t.px, &p, &["--idle-timeout", "600"]);
    let mut c = connect(&t.cl, service("192.0.2.10", 80));
    c.write_all(b"hello").unwrap();
    let sockets = lab::poll_until(
        Duration::from_secs(5),
        || t.px.ss(&["-tno", "state", "established"]),
        |sockets| sockets.matches("timer:(keepalive").count() >= 2,
    );
    assert!(
        sockets.matches("timer:(keepalive").count() >= 2,
        "the proxy's client and upstream sockets should both probe:\n{sockets}"
    );
    let vanished = Instant::now();
    t.cl.ip(&["link", "set", "to-px", "down"]);
    expect_reset(&rx, "after the client vanished");
    let found = vanished.elapsed();
    // idle 1 s + 2 probes 1 s apart, and the retransmit of the bytes in
    // flight; far below the 600 s idle timeout.
    assert!(found < Duration::from_secs(20), "found after {found:?}");
    let ev = d.closed_event(c.local_addr().unwrap());
    assert!(outcome(&ev).starts_with("client_error"), "{ev}");
}

/// A client at its per-address limit gets a reset for the next connection,
/// at once and before sending anything, while another client is served
/// throughout; a slot given back can be taken again. Same for a prefix.
#[test]
fn a_client_over_its_limit_is_reset_at_once_while_another_is_served() {
    let t = Topo::new("client_limit");
    t.cl.addr("to-px", "198.51.100.3/24");
    t.cl.addr("to-px", "2001:db8:c::3/64");
    let _servers = echo_servers(&t);
    let p = policy(json!({
        "limits": { "per_client": 3, "per_client_prefix": { "ipv6": 64, "max": 4 } }
    }));
    let mut d = Daemon::start_ready(&t.px, &p, &["--admin", ADMIN]);
    let from = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 0);

    for (greedy, other, host) in [
        (addr::CL4, "198.51.100.3", SERVICES[0]),
        (addr::CL6, "2001:db8:c::3", SERVICES[1]),
    ] {
        let to = service(host, 80);
        let mut held: Vec<TcpStream> = (0..3)
            .map(|i| {
                let mut c = connect_from(&t.cl, from(greedy), to);
                served(&mut c, &format!("{greedy} #{i}"));
                c
            })
            .collect();
        let counted = limited(&t, "per_client");
        let after = reset_at_once(
            lab::try_connect_from(&t.cl, from(greedy), to),
            "over the limit",
        );
        assert!(
            after < Duration::from_secs(3),
            "{greedy}: reset after {after:?}"
        );
        assert_eq!(limited(&t, "per_client"), counted + 1.0, "{greedy}");
        // Another client is not affected.
        let mut c = connect_from(&t.cl, from(other), to);
        served(&mut c, other);
        drop(c);
        // A slot given back is free again.
        drop(held.pop());
        held.push(served_soon(&t, from(greedy), to, "in a freed slot"));
        drop(held);
    }
    let refused = d.wait_event("a refusal line", Duration::from_secs(5), |e| {
        message(e).is_some_and(|m| m.starts_with("over a connection limit"))
            && field_str(e, "limit").as_deref() == Some("per-client connection limit")
    });
    assert!(field_u64(&refused, "refused").is_some(), "{refused}");

    // IPv6: 2001:db8:c::2 holds 3 (its own limit), ::3 may add one more
    // before the /64 is full.
    let to = service(SERVICES[1], 80);
    // The connections of the loop above give their slots back as their
    // closes reach the daemon.
    let _three: Vec<TcpStream> = (0..3)
        .map(|i| served_soon(&t, from(addr::CL6), to, &format!("::2 #{i}")))
        .collect();
    let _fourth = served_soon(&t, from("2001:db8:c::3"), to, "::3 within the prefix");
    let counted = limited(&t, "per_client_prefix");
    reset_at_once(
        lab::try_connect_from(&t.cl, from("2001:db8:c::3"), to),
        "over the prefix limit",
    );
    assert_eq!(limited(&t, "per_client_prefix"), counted + 1.0);
    d.wait_event("a prefix refusal line", Duration::from_secs(5), |e| {
        field_str(e, "limit").as_deref() == Some("per-client-prefix connection limit")
    });
    // (A connection tried again until a slot is free, `served_soon`, may
    // be refused a few times more.) None over the daemon's limit.
    assert_eq!(limited(&t, "connections"), 0.0);
}

/// A connection from `local` that is served once a slot is free (5 s).
fn served_soon(t: &Topo, local: SocketAddr, to: SocketAddr, what: &str) -> TcpStream {
    let c = lab::poll_until(
        Duration::from_secs(5),
        || {
            let mut c = lab::try_connect_from(&t.cl, local, to).ok()?;
            (lab::read_line(&mut c).ok()? == "sv").then_some(c)
        },
        Option::is_some,
    );
    let mut c = c.unwrap_or_else(|| panic!("{what}: never served"));
    lab::echo(&mut c, "ping", what);
    c
}

/// Over `--max-connections`, a new connection is reset at once rather than
/// left in the accept queue; the held ones keep working.
#[test]
fn over_the_global_limit_a_connection_is_reset_at_once() {
    let t = Topo::new("global_limit");
    let _servers = echo_servers(&t);
    let mut d = Daemon::start_ready(
        &t.px,
        &policy(json!({})),
        &["--max-connections", "2", "--admin", ADMIN],
    );
    let to = service(SERVICES[0], 80);
    let mut held: Vec<TcpStream> = (0..2)
        .map(|i| {
            let mut c = connect(&t.cl, to);
            served(&mut c, &format!("held #{i}"));
            c
        })
        .collect();
    let after = reset_at_once(
        lab::try_connect(&t.cl, to, Duration::from_secs(5)),
        "over the limit",
    );
    assert!(after < Duration::from_secs(3), "reset after {after:?}");
    for (i, c) in held.iter_mut().enumerate() {
        lab::echo(c, "still", &format!("held #{i}"));
    }
    d.wait_event("the refusal line", Duration::from_secs(5), |e| {
        field_str(e, "limit").as_deref() == Some("connection limit")
    });
    assert_eq!(limited(&t, "connections"), 1.0);
}

/// A server that resets mid-transfer: the client sees a reset, never a
/// clean end; a client that resets mid-upload: the server sees a reset.
/// Both families.
#[test]
fn resets_are_passed_on_as_resets() {
    let t = Topo::new("resets");
    let resetting = |mut s: TcpStream| {
        let _ = s.write_all(&[7u8; 1000]);
        std::thread::sleep(Duration::from_millis(200));
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    };
    let _r4 = Server::start(&t.sv, sa("203.0.113.2:8080"), resetting);
    let _r6 = Server::start(&t.sv, sa("[2001:db8:5::2]:8080"), resetting);
    let (tx, rx) = mpsc::channel();
    let _s4 = Server::start(&t.sv, sa("203.0.113.2:9090"), report_end(tx.clone()));
    let _s6 = Server::start(&t.sv, sa("[2001:db8:5::2]:9090"), report_end(tx));
    let mut p = policy(json!({}));
    p["upstreams"]["sink"] = json!({ "servers": ["203.0.113.2:9090", "[2001:db8:5::2]:9090"] });
    p["routes"] = json!([{ "match": { "ports": [81] }, "upstream": "sink" }]);
    let mut d = Daemon::start_ready(&t.px, &p, &[]);
    for host in SERVICES {
        let mut c = connect(&t.cl, service(host, 80));
        let (got, _) = ends_with_reset(&mut c, Duration::from_secs(10), "server reset");
        assert!(got <= 1000, "{host}: {got} bytes");
        let ev = d.closed_event(c.local_addr().unwrap());
        assert!(outcome(&ev).starts_with("upstream_error"), "{host}: {ev}");

        let mut c = connect(&t.cl, service(host, 81));
        c.write_all(&[1u8; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let client = c.local_addr().unwrap();
        drop(c);
        expect_reset(&rx, &format!("{host}: client reset"));
        let ev = d.closed_event(client);
        assert!(outcome(&ev).starts_with("client_error"), "{host}: {ev}");
    }
}

/// An upstream that refuses, or does not answer within the connect
/// timeout: the client gets a reset, as it would from the server itself,
/// never an accepted connection closed clean.
#[test]
fn a_refused_or_silent_upstream_resets_the_client() {
    let t = Topo::new("refused");
    let mut p = policy(json!({}));
    // Nothing listens on 8080 (refused); 203.0.113.99 does not exist.
    p["upstreams"]["silent"] = json!({ "servers": ["203.0.113.99:8080"] });
    p["routes"] = json!([{ "match": { "ports": [81] }, "upstream": "silent" }]);
    let mut d = Daemon::start_ready(&t.px, &p, &["--connect-timeout", "1"]);
    for (port, expected) in [(80, "Connection refused"), (81, "timed out")] {
        let to = service(SERVICES[0], port);
        // The reset may come before connect() returns or the bytes are sent.
        match lab::try_connect(&t.cl, to, Duration::from_secs(5)) {
            // A reset that comes before the write is reported by it (and
            // a read after that sees only the end).
            Ok(mut c) => match c.write_all(b"hello") {
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{port}: {e}"),
                Ok(()) => {
                    ends_with_reset(&mut c, Duration::from_secs(10), expected);
                }
            },
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{port}: {e}"),
        }
        let ev = d.wait_event("the connect failure", Duration::from_secs(10), |e| {
            outcome(e).contains(expected)
        });
        assert_eq!(field_str(&ev, "orig_dst"), Some(to.to_string()), "{ev}");
    }
}

/// Connections still open when the grace period ends are reset on both
/// sides (their transfer did not finish), and the daemon exits cleanly.
#[test]
fn connections_open_after_the_grace_period_are_reset() {
    let t = Topo::new("grace_reset");
    let (tx, rx) = mpsc::channel();
    let _srv = Server::start(&t.sv, sa("203.0.113.2:8080"), report_end(tx));
    let mut d = Daemon::start_ready(&t.px, &policy(json!({})), &["--grace-period", "1"]);
    let mut c = connect(&t.cl, service(SERVICES[0], 80));
    c.write_all(b"unfinished").unwrap();
    d.signal(libc::SIGTERM);
    ends_with_reset(&mut c, Duration::from_secs(10), "after the grace period");
    expect_reset(&rx, "server after the grace period");
    let st = d.wait_exit(Duration::from_secs(10));
    d.assert_exit_ok(st);
}
