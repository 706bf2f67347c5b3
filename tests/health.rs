//! Balancing and health: active checks and passive observation take a
//! server that stops out of its pool and bring it back; least-connections
//! and source-hash spread connections as they say; with every server down,
//! a connection is refused as when no route matches; a reload keeps the
//! health of the servers it keeps and stops the checks of those it drops.
//!
//! Servers greet each connection with their name, so a client knows where
//! the balance sent it. Where a test needs to know that a server got no
//! connection at all, its upstream has `"retries": 0`: a connection sent to
//! a server that is gone would fail instead of going on to another.

mod lab;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lab::daemon::{field_str, field_string, message, outcome};
use lab::{Daemon, Server, Topo, addr, connect, connect_from, handlers, sa};
use serde_json::{Value, json};

const SERVICE: &str = "192.0.2.10:80";
const A: &str = "203.0.113.2:8080";
const B: &str = "203.0.113.3:8080";
const C: &str = "203.0.113.2:8081";

/// One rule to the upstream `web`.
fn policy(web: Value) -> Value {
    json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "web" } ],
        "upstreams": { "web": web }
    })
}

/// The name of the server a new connection from `cl` reaches, after a
/// round trip through it.
fn greeting(t: &Topo) -> String {
    let mut c = connect(&t.cl, sa(SERVICE));
    let name = lab::read_line(&mut c).unwrap_or_else(|e| panic!("greeting: {e}"));
    lab::echo(&mut c, "through l4proxy", &name);
    lab::finish(&mut c, &name);
    name
}

/// The same from the client address `from`.
fn greeting_from(t: &Topo, from: IpAddr) -> String {
    let mut c = connect_from(&t.cl, SocketAddr::new(from, 0), sa(SERVICE));
    let name = lab::read_line(&mut c).unwrap_or_else(|e| panic!("greeting to {from}: {e}"));
    lab::finish(&mut c, &name);
    name
}

/// `server up` or `server down` for `server`.
fn is_transition(event: &Value, what: &str, server: &str) -> bool {
    message(event) == Some(what) && field_str(event, "server").as_deref() == Some(server)
}

/// How many `what` events the daemon logged for `server`.
fn transitions(d: &Daemon, what: &str, server: &str) -> usize {
    d.events()
        .iter()
        .filter(|e| is_transition(e, what, server))
        .count()
}

/// Waits for the `what` event for `server` after the first `n` (10 s).
fn transition(d: &mut Daemon, what: &str, server: &str, n: usize) -> Value {
    d.wait_nth_event(
        n,
        &format!("`{what}` number {} for {server}", n + 1),
        Duration::from_secs(10),
        |e| is_transition(e, what, server),
    )
}

#[test]
fn a_server_that_stops_is_checked_out_after_fall_checks_and_back_in_after_rise() {
    let (t, a) = Topo::with_echo("health_checks", A, "a");
    let _b = Server::start(&t.sv, sa(B), handlers::hello_echo("b"));
    let mut d = Daemon::start_ready(
        &t.px,
        &policy(json!({
            "servers": [A, B], "retries": 0,
            "health": { "interval": "200ms", "rise": 2, "fall": 3 }
        })),
        &[],
    );
    let turns: Vec<String> = (0..4).map(|_| greeting(&t)).collect();
    assert_eq!(turns, ["a", "b", "a", "b"], "round-robin");

    let stopped = Instant::now();
    drop(a);
    let down = transition(&mut d, "server down", A, 0);
    // Three failed checks take at least two intervals.
    let took = stopped.elapsed();
    assert!(took >= Duration::from_millis(400), "down after {took:?}");
    assert_eq!(field_string(&down, "upstream"), "web");
    let reason = field_string(&down, "reason");
    assert!(
        reason.starts_with("3 checks failed in a row, the last: "),
        "{reason}"
    );
    for _ in 0..6 {
        assert_eq!(greeting(&t), "b", "a is down");
    }

    let _a = Server::start(&t.sv, sa(A), handlers::hello_echo("a"));
    let up = transition(&mut d, "server up", A, 0);
    assert_eq!(field_string(&up, "reason"), "2 checks passed in a row");
    let turns: BTreeSet<String> = (0..4).map(|_| greeting(&t)).collect();
    assert_eq!(turns, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
}

/// A check this host cannot make (out of descriptors: the daemon's limit
/// lowered with prlimit) says nothing of the server: it stays up, with a
/// warning, and serves once descriptors can be had again.
#[test]
fn checks_this_host_cannot_make_do_not_take_a_server_down() {
    let (t, _a) = Topo::with_echo("health_emfile", A, "a");
    let mut d = Daemon::start_ready(
        &t.px,
        &policy(json!({ "servers": [A], "health": { "interval": "100ms", "fall": 2 } })),
        &[],
    );
    assert_eq!(greeting(&t), "a");
    // Below every descriptor it holds: each new socket fails with EMFILE.
    let soft = d.set_open_files_limit("3");
    let warned = d.wait_event("a warning of unmade checks", Duration::from_secs(10), |e| {
        message(e) == Some("health checks could not be made on this host; not counted")
    });
    assert_eq!(field_str(&warned, "server").as_deref(), Some(A), "{warned}");
    // Ten intervals: five times `fall`, had they counted.
    std::thread::sleep(Duration::from_secs(1));
    d.set_open_files_limit(&soft);
    assert_eq!(transitions(&d, "server down", A), 0, "{}", d.log_text());
    assert_eq!(greeting(&t), "a");
}

#[test]
fn with_observation_only_a_server_is_out_after_the_error_limit_and_tried_again_later() {
    let (t, a) = Topo::with_echo("health_observe", A, "a");
    let _b = Server::start(&t.sv, sa(B), handlers::hello_echo("b"));
    let mut d = Daemon::start_ready(
        &t.px,
        &policy(json!({
            "servers": [A, B],
            "observe": { "errors": 2, "down_for": "5s" }
        })),
        &[],
    );
    assert_eq!(greeting(&t), "a");
    assert_eq!(greeting(&t), "b");

    drop(a);
    // Clients see nothing of it: a refused connect is tried on b.
    for sent in 1.. {
        assert_eq!(greeting(&t), "b");
        if transitions(&d, "server down", A) > 0 {
            break;
        }
        assert!(sent < 10, "a still up after {sent} connections");
    }
    let down = transition(&mut d, "server down", A, 0);
    let reason = field_string(&down, "reason");
    assert!(
        reason.starts_with("2 connects failed in a row, the last: "),
        "{reason}"
    );

    // a listens again, but is down for 5 s: nothing reaches it.
    let _a = Server::start(&t.sv, sa(A), handlers::hello_echo("a"));
    for _ in 0..4 {
        assert_eq!(greeting(&t), "b", "a is down");
    }
    assert_eq!(
        transitions(&d, "server up", A),
        0,
        "the connections above took longer than down_for, and prove nothing"
    );
    let up = transition(&mut d, "server up", A, 0);
    assert_eq!(
        field_string(&up, "reason"),
        "down for 5s after failed connects: tried again"
    );
    let turns: BTreeSet<String> = (0..4).map(|_| greeting(&t)).collect();
    assert!(turns.contains("a"), "{turns:?}");
}

#[test]
fn least_connections_balances_connections_that_stay_open() {
    let t = Topo::new("health_leastconn");
    let _servers = [(A, "a"), (B, "b"), (C, "c")]
        .map(|(at, name)| Server::start(&t.sv, sa(at), handlers::hello_echo(name)));
    let mut d = Daemon::start_ready(
        &t.px,
        &policy(json!({ "servers": [A, B, C], "balance": "least-connections" })),
        &[],
    );
    let open = |t: &Topo| {
        let mut c = connect(&t.cl, sa(SERVICE));
        let name = lab::read_line(&mut c).unwrap();
        (name, c)
    };
    let mut held: Vec<(String, TcpStream)> = (0..6).map(|_| open(&t)).collect();
    let mut count = BTreeMap::<String, usize>::new();
    for (name, _) in &held {
        *count.entry(name.clone()).or_default() += 1;
    }
    assert_eq!(
        count,
        BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 2)])
    );

    // a's connections end: a has the fewest, and takes the next two.
    let (to_a, to_others): (Vec<_>, Vec<_>) = held.drain(..).partition(|(name, _)| name == "a");
    for (name, mut c) in to_a {
        let client = c.local_addr().unwrap();
        lab::finish(&mut c, &name);
        d.closed_event(client);
    }
    held = (0..2).map(|_| open(&t)).collect();
    let names: Vec<&str> = held.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["a", "a"]);
    // All even again: one each.
    held.extend((0..3).map(|_| open(&t)));
    let names: BTreeSet<&str> = held[2..].iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["a", "b", "c"]));
    drop(to_others);
}

#[test]
fn source_hash_keeps_a_client_on_its_server_and_a_removed_server_moves_only_its_clients() {
    let t = Topo::new("health_hash");
    let _servers = [(A, "a"), (B, "b"), (C, "c")]
        .map(|(at, name)| Server::start(&t.sv, sa(at), handlers::hello_echo(name)));
    let clients: Vec<IpAddr> = (10..34)
        .map(|host| format!("198.51.100.{host}").parse().unwrap())
        .collect();
    for client in &clients {
        t.cl.addr("to-px", &format!("{client}/24"));
    }
    let web = json!({ "servers": [A, B, C], "balance": "source-hash" });
    let mut d = Daemon::start_ready(&t.px, &policy(web), &[]);
    let first: Vec<String> = clients.iter().map(|&c| greeting_from(&t, c)).collect();
    let again: Vec<String> = clients.iter().map(|&c| greeting_from(&t, c)).collect();
    assert_eq!(again, first, "each client keeps its server");
    let used: BTreeSet<&String> = first.iter().collect();
    assert_eq!(used.len(), 3, "24 clients over 3 servers: {first:?}");

    let without_b = json!({ "servers": [A, C], "balance": "source-hash" });
    assert_eq!(
        message(&d.reload(&policy(without_b))),
        Some("policy reloaded")
    );
    for (client, was) in clients.iter().zip(&first) {
        let now = greeting_from(&t, *client);
        if was == "b" {
            assert_ne!(now, "b", "{client}");
        } else {
            assert_eq!(&now, was, "{client} was on a server the reload kept");
        }
    }
}

/// A ClientHello captured from openssl (SNI `Mixed.Example.COM.`).
fn client_hello() -> Vec<u8> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/sniff/fixtures/tls13_openssl.bin");
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Everything the peer sends until it closes, and how it closed.
fn read_until_closed(c: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match lab::read_some(c, &mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

#[test]
fn with_every_server_down_connections_are_refused_as_without_a_route() {
    let t = Topo::new("health_all_down");
    let proxy = "198.51.100.1:3128";
    let mut d = Daemon::start_ready(
        &t.px,
        &json!({
            "intercept": [
                { "name": "http", "prefixes": ["192.0.2.10/32"], "ports": [80] },
                { "name": "tls", "prefixes": ["192.0.2.10/32"], "ports": [443] },
                { "name": "other", "prefixes": ["192.0.2.10/32"], "ports": [81], "upstream": "web" },
                { "name": "explicit", "upstream": "web",
                  "connect": { "listen": [proxy], "clients": ["198.51.100.0/24"] } }
            ],
            "routes": [
                { "match": { "intercept": ["http"], "host": ["www.example.com"] }, "upstream": "web" },
                { "match": { "intercept": ["tls"], "sni": ["*.example.com"] }, "upstream": "web" }
            ],
            // Nothing listens there.
            "upstreams": { "web": { "servers": [A], "health": { "interval": "200ms", "fall": 1 } } }
        }),
        &[],
    );
    transition(&mut d, "server down", A, 0);

    let refused = |d: &mut Daemon, c: &TcpStream| {
        let closed = d.closed_event(c.local_addr().unwrap());
        assert_eq!(
            outcome(&closed),
            r#"refused: no server of upstream "web" is up"#,
            "{closed}"
        );
    };
    let mut http = connect(&t.cl, sa("192.0.2.10:80"));
    http.write_all(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        .unwrap();
    let (answer, _) = read_until_closed(&mut http);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    refused(&mut d, &http);

    let mut tls = connect(&t.cl, sa("192.0.2.10:443"));
    tls.write_all(&client_hello()).unwrap();
    let (answer, end) = read_until_closed(&mut tls);
    assert!(answer.is_empty(), "{answer:?}");
    assert!(
        matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "TLS is reset: {end:?}"
    );
    refused(&mut d, &tls);

    let mut other = connect(&t.cl, sa("192.0.2.10:81"));
    let (answer, end) = read_until_closed(&mut other);
    assert!(answer.is_empty() && end.is_ok(), "{answer:?} {end:?}");
    refused(&mut d, &other);

    let mut tunnel = connect(&t.cl, sa(proxy));
    tunnel
        .write_all(b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n")
        .unwrap();
    let (answer, _) = read_until_closed(&mut tunnel);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    refused(&mut d, &tunnel);
}

#[test]
fn a_reload_keeps_the_health_of_the_servers_it_keeps_and_stops_checking_the_others() {
    let (t, a) = Topo::with_echo("health_reload", A, "a");
    let b = Server::start(&t.sv, sa(B), handlers::hello_echo("b"));
    let _c = Server::start(&t.sv, sa(C), handlers::hello_echo("c"));
    let health = json!({ "interval": "200ms", "rise": 2, "fall": 2 });
    let mut d = Daemon::start_ready(
        &t.px,
        &policy(json!({ "servers": [A, B], "retries": 0, "health": health })),
        &[],
    );
    drop(a);
    transition(&mut d, "server down", A, 0);

    // a stays in the pool, and down: no connection is sent to it (it
    // would fail) and it is not marked down again.
    let kept = policy(json!({ "servers": [A, B, C], "retries": 0, "health": health }));
    assert_eq!(message(&d.reload(&kept)), Some("policy reloaded"));
    let turns: BTreeSet<String> = (0..6).map(|_| greeting(&t)).collect();
    assert_eq!(turns, BTreeSet::from(["b".to_owned(), "c".to_owned()]));
    assert_eq!(transitions(&d, "server down", A), 1);
    assert_eq!(transitions(&d, "server up", A), 0);

    // a leaves the pool: its checks stop. Something listens there again;
    // while b is checked three more times, a is not checked once.
    let dropped = policy(json!({ "servers": [B, C], "health": health }));
    assert_eq!(message(&d.reload(&dropped)), Some("policy reloaded"));
    let a = Server::start(&t.sv, sa(A), handlers::hello_echo("a"));
    let checked = b.accepted().len();
    b.wait_accepted(checked + 3, Duration::from_secs(5));
    assert_eq!(a.accepted().len(), 0, "a is checked still");
}

#[test]
fn checks_send_the_proxy_header_as_local_and_never_come_from_the_client() {
    let t = Topo::new("health_proxy");
    let (tx, rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>();
    let tx = Mutex::new(tx);
    let _a = Server::start(&t.sv, sa(A), move |mut s: TcpStream| {
        let peer = s.peer_addr().unwrap();
        let mut start = vec![0; 16];
        if s.read_exact(&mut start).is_ok() {
            let _ = tx.lock().unwrap().send((peer, start));
            let _ = s.write_all(b"a\n");
            let _ = io::copy(&mut s, &mut io::sink());
        }
    });
    let _d = Daemon::start_ready(
        &t.px,
        &policy(json!({
            "servers": [A], "bind": "client-ip", "proxy_protocol": "v2",
            "health": { "interval": "200ms", "send_proxy": true }
        })),
        &[],
    );
    // The v2 signature, then version 2 with LOCAL, no family, no length.
    let local: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let (peer, start) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a check's connection");
    assert_eq!(start, local);
    assert_eq!(peer.ip(), sa(&format!("{}:0", addr::PX4_SV)).ip());

    // A relayed connection, from the client's address, with a PROXY command.
    let mut c = connect(&t.cl, sa(SERVICE));
    assert_eq!(lab::read_line(&mut c).unwrap(), "a");
    let relayed = (0..20)
        .map_while(|_| rx.recv_timeout(Duration::from_secs(5)).ok())
        .find(|(peer, _)| peer.ip() == sa(&format!("{}:0", addr::CL4)).ip())
        .expect("the relayed connection, among the checks");
    assert_eq!(relayed.1[12], 0x21, "v2 PROXY: {:02x?}", relayed.1);
}
