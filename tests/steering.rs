//! Steering: connections to intercepted (prefix, port)s reach the daemon via
//! sk_lookup and are relayed to the rule's upstream; other ports are left
//! alone. Each test builds its own cl — px — sv namespaces (see lab).

mod lab;

use std::io::Write;
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::time::Duration;

use lab::daemon::{field, field_str, field_u64};
use lab::{Daemon, Server, Topo, addr, connect, handlers, recv_report, reports, sa};
use serde_json::json;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Control for the lab itself, no daemon: cl reaches sv through px's
/// forwarding in both families, and sv sees cl's own address.
#[test]
fn lab_forwards_without_proxy() {
    let t = Topo::new("lab_fwd");
    for (listen, client) in [
        ("203.0.113.2:8080", addr::CL4),
        ("[2001:db8:5::2]:8080", addr::CL6),
    ] {
        let srv = Server::start(&t.sv, sa(listen), handlers::hello_echo("direct"));
        let mut c = connect(&t.cl, sa(listen));
        assert_eq!(
            lab::read_line(&mut c).unwrap_or_else(|e| panic!("greeting from {listen}: {e}")),
            "direct"
        );
        let acc = srv.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(acc[0].peer.ip(), ip(client), "peer seen by {listen}");
    }
}

/// Two rules on two service addresses and ports lead to two different
/// servers; the server sees the proxy's address as the peer.
#[test]
fn two_rules_reach_their_own_upstreams() {
    let (t, a) = Topo::with_echo("two_rules", "203.0.113.2:8080", "server-a");
    let b = Server::start(
        &t.sv,
        sa("203.0.113.2:9090"),
        handlers::hello_echo("server-b"),
    );
    let policy = json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "pool-a" },
            { "name": "alt", "prefixes": ["192.0.2.20/32"], "ports": [8443], "upstream": "pool-b" }
        ],
        "upstreams": {
            "pool-a": { "servers": ["203.0.113.2:8080"] },
            "pool-b": { "servers": ["203.0.113.2:9090"] }
        }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);

    for (dst, want) in [
        ("192.0.2.10:80", "server-a"),
        ("192.0.2.20:8443", "server-b"),
    ] {
        let mut c = connect(&t.cl, sa(dst));
        let hello = lab::read_line(&mut c)
            .unwrap_or_else(|e| panic!("{dst}: reading the server's greeting: {e}"));
        assert_eq!(hello, want, "connection to {dst} reached the wrong server");
        let msg = format!("hello through {dst}");
        c.write_all(msg.as_bytes()).unwrap();
        let back = lab::read_exact_n(&mut c, msg.len())
            .unwrap_or_else(|e| panic!("{dst}: reading the echo: {e}"));
        assert_eq!(back, msg.as_bytes(), "{dst}: echo differs");
        c.shutdown(Shutdown::Write).unwrap();
        let rest = lab::read_to_eof(&mut c).unwrap_or_else(|e| panic!("{dst}: EOF: {e}"));
        assert_eq!(rest.len, 0, "{dst}: unexpected bytes after the echo");
    }

    let acc_a = a.wait_accepted(1, Duration::from_secs(5));
    let acc_b = b.wait_accepted(1, Duration::from_secs(5));
    assert_eq!(acc_a.len(), 1, "server a accepted {acc_a:?}");
    assert_eq!(acc_b.len(), 1, "server b accepted {acc_b:?}");
    for acc in [acc_a[0], acc_b[0]] {
        assert_eq!(
            acc.peer.ip(),
            ip(addr::PX4_SV),
            "the upstream connection should come from the proxy (not transparent): {acc:?}"
        );
    }
}

/// 8 MiB of random bytes each way at the same time arrive intact (SHA-256
/// compared on both ends).
#[test]
fn bulk_8mib_each_way() {
    const SIZE: usize = 8 << 20;
    let t = Topo::new("bulk");
    let seed = lab::seed();
    let to_server = Arc::new(lab::random_bytes(SIZE, seed));
    let to_client = Arc::new(lab::random_bytes(SIZE, seed.wrapping_add(1)));
    let (tx, rx) = reports();
    let srv = Server::start(
        &t.sv,
        sa("203.0.113.2:8080"),
        handlers::bulk(to_client.clone(), tx),
    );
    let policy = json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "pool-a" } ],
        "upstreams": { "pool-a": { "servers": ["203.0.113.2:8080"] } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);

    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    let got_client = lab::exchange(&mut c, to_server.clone())
        .unwrap_or_else(|e| panic!("client side of the bulk exchange: {e}"));
    let got_server = recv_report(&rx, "bulk exchange");
    assert_eq!(
        got_server,
        lab::Received::of(&to_server),
        "server did not receive the client's 8 MiB intact"
    );
    assert_eq!(
        got_client,
        lab::Received::of(&to_client),
        "client did not receive the server's 8 MiB intact"
    );
    assert_eq!(srv.accepted().len(), 1);
}

/// Client sends, then shuts its write side; the server reads to EOF and only
/// then answers: the answer must still reach the client.
#[test]
fn half_close_client_first() {
    const N: usize = 100_000;
    const M: usize = 300_000;
    let t = Topo::new("hc_client");
    let seed = lab::seed();
    let request = lab::random_bytes(N, seed);
    let reply = Arc::new(lab::random_bytes(M, seed ^ 0x55));
    let (tx, rx) = reports();
    let _srv = Server::start(
        &t.sv,
        sa("203.0.113.2:8080"),
        handlers::sink_then_send(reply.clone(), tx),
    );
    let policy = json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "pool-a" } ],
        "upstreams": { "pool-a": { "servers": ["203.0.113.2:8080"] } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);

    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    lab::send_and_shutdown(&mut c, &request).expect("client sending then shutdown(Write)");
    let got_server = recv_report(&rx, "server reading the client's half-closed stream");
    assert_eq!(
        got_server,
        lab::Received::of(&request),
        "server should read all {N} bytes, then EOF"
    );
    let got_client = lab::read_to_eof(&mut c)
        .unwrap_or_else(|e| panic!("client reading the reply after its own shutdown(Write): {e}"));
    assert_eq!(
        got_client,
        lab::Received::of(&reply),
        "client should get all {M} bytes sent after its half-close"
    );
}

/// The server sends, then shuts its write side; the client reads that EOF and
/// keeps sending afterwards: the server must receive everything.
#[test]
fn half_close_server_first() {
    const K: usize = 200_000;
    const L: usize = 150_000;
    let t = Topo::new("hc_server");
    let seed = lab::seed();
    let from_server = Arc::new(lab::random_bytes(K, seed));
    let late = lab::random_bytes(L, seed ^ 0xaa);
    let (tx, rx) = reports();
    let _srv = Server::start(
        &t.sv,
        sa("203.0.113.2:8080"),
        handlers::send_then_sink(from_server.clone(), tx),
    );
    let policy = json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "pool-a" } ],
        "upstreams": { "pool-a": { "servers": ["203.0.113.2:8080"] } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);

    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    let got_client = lab::read_to_eof(&mut c)
        .unwrap_or_else(|e| panic!("client reading the server's half-closed stream: {e}"));
    assert_eq!(
        got_client,
        lab::Received::of(&from_server),
        "client should read all {K} bytes, then EOF"
    );
    lab::send_and_shutdown(&mut c, &late)
        .unwrap_or_else(|e| panic!("client sending after the server's half-close: {e}"));
    let got_server = recv_report(&rx, "server reading after its own shutdown(Write)");
    assert_eq!(
        got_server,
        lab::Received::of(&late),
        "server should receive all {L} bytes sent after its half-close"
    );
}

/// A port the policy does not name is not steered: a plain listener of the
/// proxy host on 0.0.0.0:2222 gets it, with the service address as local
/// address (the daemon's local route makes it local).
#[test]
fn unlisted_port_is_not_steered() {
    let (t, upstream) = Topo::with_echo("unlisted", "203.0.113.2:8080", "upstream");
    let plain = Server::start(&t.px, sa("0.0.0.0:2222"), handlers::hello_echo("px-plain"));
    let policy = json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80, "8000-8099"], "upstream": "pool-a" } ],
        "upstreams": { "pool-a": { "servers": ["203.0.113.2:8080"] } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);

    let mut c = connect(&t.cl, sa("192.0.2.10:2222"));
    let hello = lab::read_line(&mut c).expect("greeting on 192.0.2.10:2222");
    assert_eq!(
        hello, "px-plain",
        "192.0.2.10:2222 should reach the plain listener of px"
    );
    drop(c);
    let acc = plain.wait_accepted(1, Duration::from_secs(5));
    assert_eq!(
        acc[0].local,
        sa("192.0.2.10:2222"),
        "plain listener's local address"
    );
    assert_eq!(acc[0].peer.ip(), ip(addr::CL4), "plain listener's peer");

    // Control: the steered port still goes to the upstream.
    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    assert_eq!(
        lab::read_line(&mut c).expect("greeting on 192.0.2.10:80"),
        "upstream"
    );
    assert_eq!(
        plain.accepted().len(),
        1,
        "port 80 must not reach the plain listener"
    );
    assert_eq!(upstream.wait_accepted(1, Duration::from_secs(5)).len(), 1);
}

/// IPv6: a connection to 2001:db8:a::10 is steered to an IPv6 upstream, bytes
/// both ways intact, the server sees the proxy's IPv6 address.
#[test]
fn ipv6_steering() {
    const SIZE: usize = 1 << 20;
    let (t, srv) = Topo::with_echo("ipv6", "[2001:db8:5::2]:8080", "server-v6");
    let policy = json!({
        "intercept": [ { "name": "web6", "prefixes": ["2001:db8:a::/64"], "ports": [80], "upstream": "pool-6" } ],
        "upstreams": { "pool-6": { "servers": ["[2001:db8:5::2]:8080"] } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);

    let mut c = connect(&t.cl, sa("[2001:db8:a::10]:80"));
    assert_eq!(
        lab::read_line(&mut c).expect("greeting over IPv6"),
        "server-v6"
    );
    let data = Arc::new(lab::random_bytes(SIZE, lab::seed()));
    let back = lab::exchange(&mut c, data.clone()).expect("echo exchange over IPv6");
    assert_eq!(
        back,
        lab::Received::of(&data),
        "echoed 1 MiB over IPv6 differs"
    );
    let acc = srv.wait_accepted(1, Duration::from_secs(5));
    assert_eq!(
        acc[0].peer.ip(),
        ip(addr::PX6_SV),
        "upstream peer should be the proxy"
    );
}

/// Every closed connection is logged as `connection closed` with its
/// addresses and byte counts.
#[test]
fn connection_closed_log_has_byte_counts() {
    let t = Topo::new("closed_log");
    let (tx4, rx4) = reports();
    let (tx6, rx6) = reports();
    let reply4 = Arc::new(lab::random_bytes(5678, 4));
    let reply6 = Arc::new(lab::random_bytes(8765, 6));
    let _s4 = Server::start(
        &t.sv,
        sa("203.0.113.2:8080"),
        handlers::sink_then_send(reply4, tx4),
    );
    let _s6 = Server::start(
        &t.sv,
        sa("[2001:db8:5::2]:8080"),
        handlers::sink_then_send(reply6, tx6),
    );
    let policy = json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "pool-a" },
            { "name": "web6", "prefixes": ["2001:db8:a::/64"], "ports": [80], "upstream": "pool-6" }
        ],
        "upstreams": {
            "pool-a": { "servers": ["203.0.113.2:8080"] },
            "pool-6": { "servers": ["[2001:db8:5::2]:8080"] }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);

    let cases = [
        (
            "192.0.2.10:80",
            1234usize,
            5678usize,
            "203.0.113.2:8080",
            &rx4,
        ),
        (
            "[2001:db8:a::10]:80",
            4321,
            8765,
            "[2001:db8:5::2]:8080",
            &rx6,
        ),
    ];
    let mut expected = Vec::new();
    for (dst, up, down, upstream, rx) in cases {
        let mut c = connect(&t.cl, sa(dst));
        let client_addr = c.local_addr().unwrap();
        lab::send_and_shutdown(&mut c, &lab::random_bytes(up, 9)).unwrap();
        let got = recv_report(rx, dst);
        assert_eq!(got.len, up, "{dst}: server got");
        let back = lab::read_to_eof(&mut c).unwrap();
        assert_eq!(back.len, down, "{dst}: client got");
        drop(c);
        expected.push((client_addr, dst, upstream, up as u64, down as u64));
    }

    let closed = d.wait_closed_events(2, Duration::from_secs(10));
    for (client, dst, upstream, up, down) in expected {
        let ev = closed
            .iter()
            .find(|e| field_str(e, "client").as_deref() == Some(client.to_string().as_str()))
            .unwrap_or_else(|| {
                panic!("no `connection closed` event with client = {client}; events: {closed:#?}")
            });
        assert_eq!(
            field_str(ev, "orig_dst").as_deref(),
            Some(sa(dst).to_string().as_str()),
            "orig_dst in {ev}"
        );
        assert_eq!(
            field_str(ev, "upstream").as_deref(),
            Some(upstream),
            "upstream in {ev}"
        );
        assert_eq!(
            field_u64(ev, "bytes_from_client"),
            Some(up),
            "bytes_from_client in {ev}"
        );
        assert_eq!(
            field_u64(ev, "bytes_from_upstream"),
            Some(down),
            "bytes_from_upstream in {ev}"
        );
        assert!(
            field_u64(ev, "duration_ms").is_some(),
            "duration_ms (a number) missing in {ev}"
        );
        assert_eq!(
            field(ev, "outcome").and_then(|o| o.as_str()),
            Some("closed"),
            "outcome of a cleanly closed connection in {ev}"
        );
    }
    assert_eq!(
        closed.len(),
        2,
        "exactly two connections were made: {closed:#?}"
    );
}
