//! Lifecycle: what the daemon leaves behind after SIGTERM and SIGKILL, and
//! the grace period for open connections.

mod lab;

use std::io::Write;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lab::{Daemon, Server, Topo, connect, sa, try_connect};
use serde_json::{Value, json};

fn policy() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80], "upstream": "pool-a" }
        ],
        "upstreams": { "pool-a": { "servers": ["203.0.113.2:8080"] } }
    })
}

/// Positive control before a teardown check: the daemon's routes and its
/// sk_lookup link are there and a connection gets through. Without it the
/// "gone afterwards" checks could pass vacuously.
fn assert_running(t: &Topo, srv: &Server) {
    let routes = t.px.proxy_routes();
    assert!(
        routes.iter().any(|r| r.contains("192.0.2.0/24")),
        "while running, px should have a proto 244 route for 192.0.2.0/24; has {routes:?}"
    );
    assert!(
        routes.iter().any(|r| r.contains("2001:db8:a::/64")),
        "while running, px should have a proto 244 route for 2001:db8:a::/64; has {routes:?}"
    );
    let links = t.px.bpf_netns_links();
    assert!(
        links.iter().any(|l| l.to_string().contains("sk_lookup")),
        "while running, an sk_lookup link should be attached to netns {} (ino {}); bpftool shows {links:?}",
        t.px.name(),
        t.px.inode()
    );
    let before = srv.accepted().len();
    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    assert_eq!(
        lab::read_line(&mut c).expect("greeting via the running proxy"),
        "upstream"
    );
    c.shutdown(Shutdown::Write).unwrap();
    let _ = lab::read_to_eof(&mut c);
    srv.wait_accepted(before + 1, Duration::from_secs(5));
}

/// After the daemon is gone: no link on the namespace, no route, and a
/// connection to a service address goes nowhere.
fn assert_gone(t: &Topo, srv: &Server, what: &str) {
    let px = &t.px;
    let links = px.wait_no_bpf_links(Duration::from_secs(10));
    assert!(
        links.is_empty(),
        "after {what}: BPF links still attached to netns {} (ino {}): {links:?}",
        px.name(),
        px.inode()
    );
    let routes = px.proxy_routes();
    assert!(
        routes.is_empty(),
        "after {what}: proto 244 routes left in {}: {routes:?}",
        px.name()
    );
    let before = srv.accepted().len();
    match try_connect(&t.cl, sa("192.0.2.10:80"), Duration::from_secs(2)) {
        Err(_) => {}
        Ok(c) => panic!(
            "after {what}: a connection to 192.0.2.10:80 was still established \
             (local {:?}, peer {:?})",
            c.local_addr(),
            c.peer_addr()
        ),
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        srv.accepted().len(),
        before,
        "after {what}: the upstream server accepted a new connection"
    );
}

/// SIGTERM: exit 0, link detached, routes removed, no more steering.
#[test]
fn sigterm_cleans_up() {
    let (t, srv) = Topo::with_echo("sigterm", "203.0.113.2:8080", "upstream");
    let mut d = Daemon::start_ready(&t.px, &policy(), &[]);
    assert_running(&t, &srv);

    let st = d.terminate(Duration::from_secs(10));
    d.assert_exit_ok(st);
    assert_gone(&t, &srv, "SIGTERM");
}

/// SIGKILL: the link dies with the process, the guard removes the routes.
#[test]
fn sigkill_cleans_up() {
    let (t, srv) = Topo::with_echo("sigkill", "203.0.113.2:8080", "upstream");
    let mut d = Daemon::start_ready(&t.px, &policy(), &[]);
    assert_running(&t, &srv);

    d.kill();
    let routes = t.px.wait_no_proxy_routes(Duration::from_secs(10));
    assert!(
        routes.is_empty(),
        "10 s after SIGKILL, the guard has not removed the proto 244 routes: {routes:?} (the l4proxy log is printed below)",
    );
    assert_gone(&t, &srv, "SIGKILL");
}

/// A connection open at SIGTERM keeps flowing both ways; no new connection is
/// taken; `status` and `reload` are answered that the daemon stops; the
/// daemon exits 0 once the last connection closes, well before the grace
/// period ends.
#[test]
fn sigterm_grace_period() {
    const GRACE_SECS: u64 = 30;
    let (t, srv) = Topo::with_echo("grace", "203.0.113.2:8080", "upstream");
    let grace = GRACE_SECS.to_string();
    let mut d = Daemon::start_ready(&t.px, &policy(), &["--grace-period", &grace]);

    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    assert_eq!(lab::read_line(&mut c).expect("greeting"), "upstream");
    c.write_all(b"before").unwrap();
    assert_eq!(
        lab::read_exact_n(&mut c, 6).expect("echo before SIGTERM"),
        b"before"
    );

    let term_at = Instant::now();
    d.drain();
    assert!(
        d.try_exit().is_none(),
        "daemon exited at SIGTERM with a connection open (grace {GRACE_SECS} s) (the l4proxy log is printed below)",
    );

    // The open connection still flows, both ways.
    let data = Arc::new(lab::random_bytes(256 * 1024, lab::seed()));
    let mut w = c.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let back = lab::read_exact_n(&mut c, data.len())
        .unwrap_or_else(|e| panic!("echo of bytes sent after SIGTERM: {e}"));
    writer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("sending after SIGTERM: {e}"));
    assert!(
        back == *data,
        "bytes sent after SIGTERM came back different"
    );

    // A new connection is not taken.
    match try_connect(&t.cl, sa("192.0.2.10:80"), Duration::from_secs(2)) {
        Err(_) => {}
        Ok(n) => panic!(
            "a new connection after SIGTERM was established (local {:?}): the proxy still \
             accepts (or holds a listening socket) during the grace period",
            n.local_addr()
        ),
    }
    assert_eq!(
        srv.accepted().len(),
        1,
        "upstream got a second connection after SIGTERM"
    );
    assert!(
        d.try_exit().is_none(),
        "daemon exited while a connection was still open (the l4proxy log is printed below)",
    );

    // Asked meanwhile, it says at once why it does nothing.
    for (ask, told) in [("status", "l4proxy status"), ("reload", "l4proxy reload")] {
        let asked = Instant::now();
        let out = lab::daemon::command(&t.px, &[ask], Duration::from_secs(20));
        assert!(
            out.status.is_some_and(|s| s.code() == Some(1))
                && out.stderr.contains(told)
                && out.stderr.contains("the daemon is stopping"),
            "{ask} while draining: {out:?}"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "{ask} while draining took {:?}",
            asked.elapsed()
        );
    }

    // The client closes; the daemon exits 0 soon after, not at the grace end.
    c.shutdown(Shutdown::Write).unwrap();
    let rest = lab::read_to_eof(&mut c).expect("EOF after closing");
    assert_eq!(rest.len, 0);
    drop(c);
    let closed_at = Instant::now();
    let st = d.wait_exit(Duration::from_secs(GRACE_SECS + 10));
    d.assert_exit_ok(st);
    let after_close = closed_at.elapsed();
    assert!(
        after_close < Duration::from_secs(5),
        "daemon took {after_close:?} to exit after the last connection closed \
         ({:?} after SIGTERM, grace {GRACE_SECS} s)",
        term_at.elapsed()
    );
    d.wait_closed_events(1, Duration::from_secs(1));
    assert!(
        t.px.proxy_routes().is_empty(),
        "routes left after the graceful exit: {:?}",
        t.px.proxy_routes()
    );
}

/// Clients queued when the daemon stops are served even while it is out of
/// descriptors (its open-files limit lowered with prlimit): the drain waits
/// for descriptors to come back, as they do when its connections end,
/// rather than leaving the rest of the queue to be reset.
#[test]
fn clients_queued_at_the_stop_wait_out_a_lack_of_descriptors() {
    let (t, _srv) = Topo::with_echo("drain_emfile", "203.0.113.2:8080", "upstream");
    let mut d = Daemon::start_ready(&t.px, &policy(), &["--workers", "1"]);
    let soft = d.set_open_files_limit("3");
    let mut queued: Vec<_> = (0..3)
        .map(|_| connect(&t.cl, sa("192.0.2.10:80")))
        .collect();
    d.wait_event("a failed accept", Duration::from_secs(10), |e| {
        lab::daemon::message(e).is_some_and(|m| m.starts_with("accept failed"))
    });
    d.drain();
    // The drain meets the same lack, and waits (for 2 s at most).
    d.wait_event("the drain waiting", Duration::from_secs(10), |e| {
        lab::daemon::message(e).is_some_and(|m| m.starts_with("accept failed while draining"))
    });
    d.set_open_files_limit(&soft);
    for (i, c) in queued.iter_mut().enumerate() {
        assert_eq!(
            lab::read_line(c).unwrap_or_else(|e| panic!("queued client {i}: {e}")),
            "upstream",
            "queued client {i}"
        );
    }
    drop(queued);
    let st = d.wait_exit(Duration::from_secs(10));
    d.assert_exit_ok(st);
}

/// The grace period's end also cuts a connection still being set up: a
/// client that connected and says nothing, on a rule whose routes wait for
/// its first bytes (a minute here), does not keep the daemon beyond it.
#[test]
fn the_grace_period_also_ends_connections_still_being_set_up() {
    let (t, _srv) = Topo::with_echo("grace_setup", "203.0.113.2:8080", "a");
    let mut policy = policy();
    policy["routes"] = json!([
        { "name": "named", "match": { "sni": ["a.example"] }, "upstream": "pool-a" },
        { "name": "rest", "match": {}, "upstream": "pool-a" }
    ]);
    let mut d = Daemon::start_ready(
        &t.px,
        &policy,
        &["--grace-period", "1", "--sniff-timeout", "60"],
    );
    // Queued or accepted by now: the drain's last sweep of the queues
    // takes it, and its routes wait for its first bytes.
    let silent = connect(&t.cl, sa("192.0.2.10:80"));
    d.drain();
    let st = d.wait_exit(Duration::from_secs(20));
    d.assert_exit_ok(st);
    let closed = d.closed_event(silent.local_addr().unwrap());
    assert_eq!(
        lab::daemon::field_str(&closed, "outcome").as_deref(),
        Some("shut_down"),
        "{closed}"
    );
}

/// A handshake that completes after SIGTERM's last sweep of the listening
/// queues (its SYN came before the stop, its final ACK after) is refused at
/// once, as a new connection is, not left in a queue nobody reads until the
/// grace period ends. The client's final ACK is held back by a firewall
/// rule in its own namespace until the daemon drains (an open connection
/// keeps it draining).
#[test]
fn a_handshake_completed_after_the_stop_is_refused_at_once() {
    let (t, _srv) = Topo::with_echo("late_ack", "203.0.113.2:8080", "a");
    let mut d = Daemon::start_ready(&t.px, &policy(), &["--grace-period", "30"]);
    let mut open = lab::connect_greeted(&t.cl, sa("192.0.2.10:80"), "a");
    // Only the SYN goes out: the ACK that completes the handshake does not.
    let hold = [
        "-p",
        "tcp",
        "-d",
        "192.0.2.10",
        "--dport",
        "80",
        "--tcp-flags",
        "SYN,ACK",
        "ACK",
        "-j",
        "DROP",
    ];
    let iptables = |action: &str| {
        let mut args = vec!["netns", "exec", t.cl.name(), "iptables", action, "OUTPUT"];
        args.extend(hold);
        let out = lab::run_cmd("ip", &args);
        assert!(out.status.success(), "iptables {action}: {out:?}");
    };
    iptables("-A");
    let mut late = connect(&t.cl, sa("192.0.2.10:80"));
    d.drain();
    iptables("-D");
    // The request carries the ACK; the daemon no longer listens.
    late.write_all(b"late\n").unwrap();
    late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let read = std::io::Read::read(&mut late, &mut [0u8; 64]);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    lab::echo(
        &mut open,
        "still served",
        "the connection open before the stop",
    );
    drop(open);
    let st = d.wait_exit(Duration::from_secs(20));
    d.assert_exit_ok(st);
}
