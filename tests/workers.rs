//! Workers: each worker has its own steered listener per family in one
//! reuseport group, and its own listener of each CONNECT address in that
//! address's group; the kernel spreads connections over them, drain waits
//! for every worker's connections, and a takeover between daemons with
//! different worker counts serves every handed listener.

mod lab;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use lab::daemon::{field, field_string, message};
use lab::{Daemon, Topo, sa};
use serde_json::{Value, json};

/// The service on both families, relayed to the server's echo.
fn policy() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80], "upstream": "pool" }
        ],
        "upstreams": { "pool": { "servers": ["203.0.113.2:8080"] } }
    })
}

/// Connections each worker accepted, from `l4proxy status --json`.
fn accepted(t: &Topo) -> Vec<u64> {
    let status = lab::daemon::status(&t.px);
    status["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no workers: {status}"))
        .iter()
        .map(|w| w["accepted"].as_u64().expect("accepted"))
        .collect()
}

/// A steered connection that got the server's greeting.
fn open(t: &Topo, to: &str) -> TcpStream {
    let mut c = lab::connect(&t.cl, sa(to));
    assert_eq!(
        lab::read_line(&mut c).unwrap_or_else(|e| panic!("greeting through {to}: {e}")),
        "upstream"
    );
    c
}

/// Bytes both ways on an open connection.
fn echoes(c: &mut TcpStream, line: &str) {
    c.write_all(line.as_bytes()).unwrap();
    assert_eq!(
        lab::read_exact_n(c, line.len()).unwrap_or_else(|e| panic!("echo of {line:?}: {e}")),
        line.as_bytes()
    );
}

/// The `ready` event's listener addresses.
fn ready_listeners(d: &Daemon) -> Vec<String> {
    let ready = d
        .events()
        .into_iter()
        .find(|e| message(e) == Some("ready"))
        .expect("ready logged");
    field_string(&ready, "listeners")
        .trim_matches(['[', ']'])
        .split(", ")
        .map(str::to_owned)
        .collect()
}

/// How many of `listeners` are IPv4 / IPv6, and that each family's are on
/// one address (one reuseport group).
fn per_family(listeners: &[String]) -> (usize, usize) {
    let (v6, v4): (Vec<&String>, Vec<&String>) = listeners.iter().partition(|l| l.starts_with('['));
    for family in [&v4, &v6] {
        assert!(
            family.iter().all(|l| *l == family[0]),
            "a family's listeners share one address and port: {listeners:?}"
        );
    }
    (v4.len(), v6.len())
}

/// `--workers 2`: two listeners per family on one address, and a burst of
/// connections (both families) is accepted by both workers, every one
/// served.
#[test]
fn connections_are_spread_over_the_workers() {
    let (t, _srv) = Topo::with_echo("workers_spread", "203.0.113.2:8080", "upstream");
    let d = Daemon::start_ready(&t.px, &policy(), &["--workers", "2"]);
    assert_eq!(per_family(&ready_listeners(&d)), (2, 2));

    spread_over_two_workers(&t, |n| {
        let to = if n % 2 == 0 {
            "192.0.2.10:80"
        } else {
            "[2001:db8:a::10]:80"
        };
        open(&t, to)
    });
}

/// Opens a burst of connections with `open` (each greeted), echoes on each,
/// and checks that both workers accepted and every one was counted.
fn spread_over_two_workers(t: &Topo, open: impl Fn(u64) -> TcpStream) {
    const BURST: u64 = 32;
    for n in 0..BURST {
        let mut c = open(n);
        echoes(&mut c, &format!("connection {n}\n"));
    }
    let accepted = accepted(t);
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert_eq!(accepted.iter().sum::<u64>(), BURST, "{accepted:?}");
    // Each of the 32 lands on either with a hash of its 4-tuple: all on
    // one is a 2^-31 chance.
    assert!(
        accepted.iter().all(|&n| n > 0),
        "every connection went to one worker: {accepted:?}"
    );
}

/// A CONNECT tunnel through `proxy` to the server's echo, greeted.
fn tunnel(t: &Topo, proxy: &str) -> TcpStream {
    let mut c = lab::connect(&t.cl, sa(proxy));
    c.write_all(b"CONNECT 203.0.113.2:8080 HTTP/1.1\r\nHost: 203.0.113.2:8080\r\n\r\n")
        .unwrap();
    let head = lab::answer_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 200 "), "{head:?}");
    assert_eq!(lab::read_line(&mut c).unwrap(), "upstream");
    c
}

/// `--workers 2`: a CONNECT address has a listener per worker (one
/// reuseport group: a client wakes only the worker whose listener the
/// kernel picked), and a burst of tunnels is accepted by both workers,
/// every one served.
#[test]
fn connect_tunnels_are_spread_over_the_workers() {
    let (t, _srv) = Topo::with_echo("workers_connect", "203.0.113.2:8080", "upstream");
    let policy = json!({
        "intercept": [
            { "name": "connect", "upstream": "asked",
              "connect": { "listen": ["198.51.100.1:3128"], "clients": ["198.51.100.0/24"], "ports": [8080] } }
        ],
        "upstreams": { "asked": { "original_destination": true } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &["--workers", "2"]);
    let listening = t.px.ss(&["-Hltn", "src", "198.51.100.1:3128"]);
    assert_eq!(listening.lines().count(), 2, "{listening}");

    spread_over_two_workers(&t, |_| tunnel(&t, "198.51.100.1:3128"));
}

/// SIGTERM with a connection open on each worker: the daemon keeps both
/// flowing, stays while either is open, and exits once both are closed.
#[test]
fn drain_waits_for_every_workers_connections() {
    let (t, _srv) = Topo::with_echo("workers_drain", "203.0.113.2:8080", "upstream");
    let mut d = Daemon::start_ready(
        &t.px,
        &policy(),
        &["--workers", "2", "--grace-period", "30"],
    );

    // One connection held on each worker: open until each has one, keeping
    // the first a worker accepted and closing the rest.
    let mut held: [Option<TcpStream>; 2] = [None, None];
    let mut before = accepted(&t);
    for _ in 0..40 {
        if held.iter().all(Option::is_some) {
            break;
        }
        let c = open(&t, "192.0.2.10:80");
        let now = accepted(&t);
        let worker = (0..2)
            .find(|&w| now[w] > before[w])
            .unwrap_or_else(|| panic!("no worker counted the connection: {before:?} -> {now:?}"));
        before = now;
        if held[worker].is_none() {
            held[worker] = Some(c);
        }
    }
    let [Some(mut first), Some(mut second)] = held else {
        panic!("40 connections did not reach both workers: {before:?}");
    };

    d.signal(libc::SIGTERM);
    d.wait_event("draining", Duration::from_secs(5), |e| {
        message(e) == Some("draining: no new connections are taken")
    });
    echoes(&mut first, "worker 0 after SIGTERM\n");
    echoes(&mut second, "worker 1 after SIGTERM\n");

    first.shutdown(Shutdown::Write).unwrap();
    assert_eq!(lab::read_to_eof(&mut first).expect("EOF").len, 0);
    drop(first);
    // Worker 0's connection closes; worker 1's is still served.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        d.try_exit().is_none(),
        "the daemon exited with a connection open on worker 1 (the l4proxy log is printed below)"
    );
    echoes(&mut second, "worker 1 still\n");

    second.shutdown(Shutdown::Write).unwrap();
    assert_eq!(lab::read_to_eof(&mut second).expect("EOF").len, 0);
    drop(second);
    let closed_at = Instant::now();
    let st = d.wait_exit(Duration::from_secs(40));
    d.assert_exit_ok(st);
    assert!(
        closed_at.elapsed() < Duration::from_secs(5),
        "the daemon took {:?} to exit after the last connection closed",
        closed_at.elapsed()
    );
}

/// Takeovers between daemons with different worker counts: a successor
/// with more workers adds its own listeners to the handed group, one with
/// fewer accepts on several per worker; every listener of the group is
/// served (a connection the kernel queues on an unserved one would get no
/// greeting).
#[test]
fn a_successor_with_another_worker_count_serves_every_listener() {
    let (t, _srv) = Topo::with_echo("workers_takeover", "203.0.113.2:8080", "upstream");
    let mut old = Daemon::start_ready(&t.px, &policy(), &["--workers", "2"]);
    let first = ready_listeners(&old);
    for (workers, listeners) in [("3", 3), ("1", 3)] {
        let mut new = Daemon::start(&t.px, &policy(), &["--takeover", "--workers", workers]);
        new.wait_ready(Duration::from_secs(20));
        old.wait_event("`handed over`", Duration::from_secs(10), |e| {
            message(e).is_some_and(|m| m.starts_with("handed over"))
        });
        let ready = new
            .events()
            .into_iter()
            .find(|e| message(e) == Some("ready"))
            .expect("ready logged");
        assert_eq!(
            field(&ready, "workers").and_then(Value::as_u64),
            workers.parse().ok(),
            "{ready}"
        );
        let now = ready_listeners(&new);
        assert_eq!(
            per_family(&now),
            (listeners, listeners),
            "{workers} workers"
        );
        assert!(
            now.contains(&first[0]),
            "the group is the first daemon's: {first:?} {now:?}"
        );
        // 3 listeners per family: a given one is missed by 30 connections
        // with a (2/3)^30 chance.
        for n in 0..60 {
            let to = if n % 2 == 0 {
                "192.0.2.10:80"
            } else {
                "[2001:db8:a::10]:80"
            };
            let mut c = open(&t, to);
            echoes(&mut c, &format!("{workers} workers, connection {n}\n"));
        }
        let st = old.wait_exit(Duration::from_secs(30));
        old.assert_exit_ok(st);
        old = new;
    }
    let st = old.terminate(Duration::from_secs(30));
    old.assert_exit_ok(st);
}
