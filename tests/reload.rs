//! SIGHUP: the daemon rereads its policy. A policy that is refused (by the
//! check, or because the host cannot do it) leaves the running one in force;
//! an accepted one changes the kernel state to match (rules, local routes,
//! tc programs, routing rules) while open connections go on.

mod lab;

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lab::daemon::{field_string, message};
use lab::{Daemon, Server, Topo, connect, handlers, sa, try_connect};
use serde_json::{Value, json};

/// Rules on 192.0.2.0/25 (ports 80, 81) to server a.
fn policy_a() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/25"], "ports": [80], "upstream": "a" },
            { "name": "old", "prefixes": ["192.0.2.0/25"], "ports": [81], "upstream": "a" }
        ],
        "upstreams": { "a": { "servers": ["203.0.113.2:8080"] }, "b": { "servers": ["203.0.113.2:8081"] } }
    })
}

/// Port 80 on both halves of 192.0.2.0/24 and port 82 on the upper half, to
/// server b; port 81 is gone.
fn policy_b() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/25", "192.0.2.128/25"], "ports": [80], "upstream": "b" },
            { "name": "new", "prefixes": ["192.0.2.128/25"], "ports": [82], "upstream": "b" }
        ],
        "upstreams": { "a": { "servers": ["203.0.113.2:8080"] }, "b": { "servers": ["203.0.113.2:8081"] } }
    })
}

/// A gateway rule on px's client side, relaying from the client's address.
fn policy_gateway() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/25"], "ports": [80], "upstream": "a" },
            { "name": "gateway", "prefixes": ["203.0.113.0/24"], "ports": [9000],
              "interfaces": ["to-cl"], "upstream": "b" }
        ],
        "upstreams": { "a": { "servers": ["203.0.113.2:8080"] },
                       "b": { "servers": ["203.0.113.2:8081"], "bind": "client" } }
    })
}

/// Which server a new connection to `dst` reaches (its greeting).
fn greeting(t: &Topo, dst: &str) -> String {
    let mut c = connect(&t.cl, sa(dst));
    let line = lab::read_line(&mut c).unwrap_or_else(|e| panic!("{dst}: greeting: {e}"));
    lab::finish(&mut c, dst);
    line
}

fn refused(t: &Topo, dst: &str) -> bool {
    try_connect(&t.cl, sa(dst), Duration::from_secs(2)).is_err()
}

#[test]
fn reload_changes_the_policy_and_keeps_open_connections() {
    let (t, _a) = Topo::with_echo("reload", "203.0.113.2:8080", "a");
    let b = Server::start(&t.sv, sa("203.0.113.2:8081"), handlers::hello_echo("b"));
    let mut d = Daemon::start_ready(&t.px, &policy_a(), &[]);
    let mut open = connect(&t.cl, sa("192.0.2.10:80"));
    let open_client = open.local_addr().unwrap();
    assert_eq!(lab::read_line(&mut open).unwrap(), "a");
    assert_eq!(greeting(&t, "192.0.2.10:81"), "a");

    // Refused by the check: the error names the place, a keeps serving.
    let refused_by_check = d.reload(&Value::String(
        policy_a().to_string().replace("[80]", "[70000]"),
    ));
    let text = message(&refused_by_check).unwrap().to_owned();
    assert!(
        text.contains("intercept[0].ports[0]: port must be 1-65535, got 70000")
            && text.contains("the running policy stays in force"),
        "{refused_by_check}"
    );
    // Refused by the host: an interface that does not exist.
    let missing = policy_gateway().to_string().replace("to-cl", "nope0");
    let refused_by_host = d.reload(&Value::String(missing));
    assert!(
        message(&refused_by_host)
            .unwrap()
            .contains(r#"intercept[1].interfaces[0]: no interface "nope0""#),
        "{refused_by_host}"
    );
    assert_eq!(greeting(&t, "192.0.2.10:80"), "a", "the running policy");
    assert!(t.px.tc_programs(&["to-cl", "to-sv"]).is_empty());

    assert_eq!(
        message(&d.reload(&policy_b())),
        Some("policy reloaded"),
        "{}",
        d.log_text()
    );
    assert_eq!(greeting(&t, "192.0.2.10:80"), "b");
    assert_eq!(
        greeting(&t, "192.0.2.200:80"),
        "b",
        "a prefix new to the policy"
    );
    assert_eq!(
        greeting(&t, "192.0.2.200:82"),
        "b",
        "a rule new to the policy"
    );
    assert!(refused(&t, "192.0.2.10:81"), "a rule gone from the policy");
    let routes = t.px.proxy_routes();
    assert!(
        routes.iter().any(|r| r.contains("192.0.2.0/25"))
            && routes.iter().any(|r| r.contains("192.0.2.128/25")),
        "{routes:?}"
    );
    // The connection opened under the first policy still flows, to a.
    lab::echo(&mut open, "still here", "the connection opened before");

    // To a gateway and back: tc programs and routing rules come and go.
    assert_eq!(
        message(&d.reload(&policy_gateway())),
        Some("policy reloaded")
    );
    let tc = t.px.tc_programs(&["to-cl", "to-sv"]);
    assert_eq!(tc, ["to-cl: classify", "to-sv: classify"]);
    assert!(t.px.proxy_rules().iter().any(|r| r.contains("fwmark")));
    let mut c = connect(&t.cl, sa("203.0.113.3:9000"));
    let client = c.local_addr().unwrap();
    assert_eq!(lab::read_line(&mut c).unwrap(), "b");
    assert_eq!(
        b.accepted().last().unwrap().peer,
        client,
        "from the client's address"
    );
    drop(c);
    assert!(refused(&t, "192.0.2.200:80"), "192.0.2.128/25 is gone");

    assert_eq!(message(&d.reload(&policy_a())), Some("policy reloaded"));
    // The gateway policy's tc programs and rules stay until its (closed)
    // connection's session has ended and the daemon notices (once a second).
    assert_only_local_route(&t, "192.0.2.0/25");
    assert_eq!(greeting(&t, "192.0.2.10:81"), "a");

    lab::finish(&mut open, "the connection opened before");
    let closed = d.closed_event(open_client);
    assert_eq!(
        field_string(&closed, "upstream"),
        "203.0.113.2:8080",
        "it kept the upstream it started with: {closed}"
    );
    let status = d.terminate(Duration::from_secs(10));
    d.assert_exit_ok(status);
    assert_eq!(t.px.proxy_routes(), Vec::<String>::new());
}

/// Connections a reload's policy no longer takes keep working until they
/// close (their local route, the routing rules and the tc programs stay);
/// then what only they needed is removed.
/// A client of a rule that a reload adds is served from the first
/// connection the kernel steers, also before the new policy is in force:
/// the reload adds 60 000 prefixes' routes as well, which keeps the kernel
/// steering by the new rules for a while before the daemon is done.
#[test]
fn clients_steered_while_a_reload_changes_the_kernel_are_served() {
    let (t, _a) = Topo::with_echo("reload-race", "203.0.113.2:8080", "a");
    let mut d = Daemon::start_ready(&t.px, &policy_a(), &[]);
    let many = lab::many_prefixes(60_000);
    let added = json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/25"], "ports": [80], "upstream": "a" },
            { "name": "added", "prefixes": ["192.0.2.0/25"], "ports": [83], "upstream": "a" },
            { "name": "many", "prefixes": many, "ports": [80], "upstream": "a" }
        ],
        "upstreams": { "a": { "servers": ["203.0.113.2:8080"] } }
    });
    let done = AtomicBool::new(false);
    // Until stopped: connects to the added rule's port as fast as it is
    // refused; each connection it gets must bring the server's greeting.
    let client = || {
        let (mut served, mut failed) = (0, Vec::new());
        let give_up = Instant::now() + Duration::from_secs(60);
        while !done.load(Ordering::Relaxed) && Instant::now() < give_up {
            let Ok(mut c) =
                TcpStream::connect_timeout(&sa("192.0.2.10:83"), Duration::from_secs(1))
            else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut greeting = [0u8; 2];
            match c.read_exact(&mut greeting) {
                Ok(()) if &greeting == b"a\n" => served += 1,
                other => failed.push(format!("{:?}: {other:?} {greeting:?}", c.local_addr())),
            }
        }
        (served, failed)
    };
    let (served, failed) = std::thread::scope(|s| {
        let clients = s.spawn(|| t.cl.run(client));
        let verdict = d.reload(&added);
        assert_eq!(message(&verdict), Some("policy reloaded"), "{verdict}");
        std::thread::sleep(Duration::from_millis(500));
        done.store(true, Ordering::Relaxed);
        clients.join().unwrap()
    });
    assert!(
        failed.is_empty(),
        "{} of {} connections to the added rule were not served, first: {:?}\n{}",
        failed.len(),
        served + failed.len(),
        &failed[..failed.len().min(3)],
        d.log_text()
    );
    assert!(served > 0, "no connection to the added rule was served");
    assert!(
        !d.log_text().contains("matches no rule"),
        "{}",
        d.log_text()
    );
}

#[test]
fn a_reload_keeps_connections_the_new_policy_drops() {
    let (t, _a) = Topo::with_echo("reload_keep", "203.0.113.2:8080", "a");
    let b = Server::start(&t.sv, sa("203.0.113.2:8081"), handlers::hello_echo("b"));
    let mut d = Daemon::start_ready(&t.px, &policy_gateway(), &[]);
    let mut local = connect(&t.cl, sa("192.0.2.10:80"));
    assert_eq!(lab::read_line(&mut local).unwrap(), "a");
    let mut gateway = connect(&t.cl, sa("203.0.113.3:9000"));
    let client = gateway.local_addr().unwrap();
    assert_eq!(lab::read_line(&mut gateway).unwrap(), "b");
    assert_eq!(b.accepted()[0].peer, client, "from the client's address");

    // The new policy has neither 192.0.2.0/25 nor the gateway rule.
    let other = json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.128/25"], "ports": [80], "upstream": "a" } ],
        "upstreams": { "a": { "servers": ["203.0.113.2:8080"] } }
    });
    assert_eq!(message(&d.reload(&other)), Some("policy reloaded"));
    for (c, what) in [(&mut local, "local prefix"), (&mut gateway, "gateway")] {
        for round in 0..3 {
            lab::echo(
                c,
                &format!("{what} after the reload, {round}"),
                &format!("{what}: the open connection"),
            );
        }
    }
    assert!(
        refused(&t, "192.0.2.10:80"),
        "no new connection to a dropped rule"
    );
    assert_eq!(greeting(&t, "192.0.2.200:80"), "a", "the new policy");
    assert!(!t.px.tc_programs(&["to-cl", "to-sv"]).is_empty());

    for (mut c, what) in [(local, "local prefix"), (gateway, "gateway")] {
        lab::finish(&mut c, what);
    }
    d.wait_event("settled", Duration::from_secs(10), |e| {
        message(e) == Some("replaced policies without open connections forgotten")
            && lab::daemon::field_u64(e, "still_open") == Some(0)
    });
    // What only the old policy needed is gone.
    assert_only_local_route(&t, "192.0.2.128/25");
}

/// Waits for the gateway policy's tc programs to go, then asserts that no
/// policy rule is left and the only local routes are `prefix`'s.
fn assert_only_local_route(t: &Topo, prefix: &str) {
    assert_eq!(
        t.px.wait_no_tc_programs(&["to-cl", "to-sv"], Duration::from_secs(5)),
        Vec::<String>::new()
    );
    assert_eq!(t.px.proxy_rules(), Vec::<String>::new());
    let routes = t.px.proxy_routes();
    assert!(
        !routes.is_empty() && routes.iter().all(|r| r.contains(prefix)),
        "{prefix}'s local route only: {routes:?}"
    );
}

/// The policy's warnings are logged when the daemon starts, and again each
/// time it rereads the file.
#[test]
fn policy_warnings_are_logged_at_start_and_on_reload() {
    let t = Topo::new("reload_warn");
    let mut policy = policy_a();
    policy["intercept"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "idle", "prefixes": ["192.0.2.200/32"], "ports": [80] }));
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let warning = "warning: intercept[2]: no upstream and no route applies to it";
    let count = |d: &Daemon| d.log_text().matches(warning).count();
    assert_eq!(count(&d), 1, "at start: {}", d.log_text());
    assert_eq!(message(&d.reload(&policy)), Some("policy reloaded"));
    assert_eq!(count(&d), 2, "on reload: {}", d.log_text());
}

/// What a reloaded policy needs of the host is worked out from the host's
/// own addresses, not from prefixes only the replaced policy made local:
/// here the new policy's upstream is bound to 192.0.2.50, an address the
/// old policy owned and the new one does not. Once the old one is
/// forgotten (its route gone), the server's replies to 192.0.2.50 must
/// still reach the daemon (`classify` marks them), as after a fresh start.
#[test]
fn a_reload_does_not_count_the_replaced_policys_prefixes_as_this_hosts() {
    let (t, a) = Topo::with_echo("reload_bind", "203.0.113.2:8080", "a");
    let old = json!({
        "intercept": [ { "name": "old", "prefixes": ["192.0.2.50/32"], "ports": [80], "upstream": "a" } ],
        "upstreams": { "a": { "servers": ["203.0.113.2:8080"] } }
    });
    let new = json!({
        "intercept": [ { "name": "new", "prefixes": ["192.0.2.10/32"], "ports": [81], "upstream": "fixed" } ],
        "upstreams": { "fixed": { "servers": ["203.0.113.2:8080"], "bind": "192.0.2.50" } }
    });
    let mut d = Daemon::start_ready(&t.px, &old, &[]);
    assert_eq!(message(&d.reload(&new)), Some("policy reloaded"));
    d.wait_event("settled", Duration::from_secs(10), |e| {
        message(e) == Some("replaced policies without open connections forgotten")
            && lab::daemon::field_u64(e, "still_open") == Some(0)
    });
    assert_eq!(greeting(&t, "192.0.2.10:81"), "a");
    let peer = a.accepted().last().expect("a connection").peer;
    assert_eq!(
        peer.ip().to_string(),
        "192.0.2.50",
        "from the fixed address"
    );
}

/// Sends a CONNECT for `target` through `proxy` and reads the answer's
/// status line; on `200`, the server's greeting too.
fn tunnel(t: &Topo, proxy: &str, target: &str) -> (String, Option<String>) {
    use std::io::Write;
    let mut c = connect(&t.cl, sa(proxy));
    write!(c, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let status = lab::read_line(&mut c).unwrap_or_else(|e| panic!("{proxy}: answer: {e}"));
    let status = status.trim_end().to_owned();
    if !status.starts_with("HTTP/1.1 200") {
        return (status, None);
    }
    // The rest of the head, then the server's first line.
    while !lab::read_line(&mut c).unwrap().trim().is_empty() {}
    let greeting = lab::read_line(&mut c).unwrap();
    (status, Some(greeting))
}

/// A CONNECT listener on an address a prefix of the new policy makes this
/// host's: bound at the reload, before the policy's routes exist, and
/// reached once they do. A later policy that keeps the listener but drops
/// the prefix is refused: nothing would make the address local then.
#[test]
fn a_connect_listener_may_be_in_a_prefix_the_reload_makes_local() {
    let (t, _a) = Topo::with_echo("reload_connect", "203.0.113.2:8080", "a");
    let explicit = |listen: &str| {
        json!({ "name": "explicit", "upstream": "direct",
                "connect": { "listen": [listen], "clients": ["198.51.100.0/24"], "ports": [8080] } })
    };
    let upstreams = json!({ "direct": { "original_destination": true },
                            "a": { "servers": ["203.0.113.2:8080"] } });
    let first = json!({ "intercept": [explicit("198.51.100.1:3128")], "upstreams": upstreams });
    let owned = json!({
        "intercept": [
            { "name": "svc", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "a" },
            explicit("192.0.2.1:3128")
        ],
        "upstreams": upstreams
    });
    let mut d = Daemon::start_ready(&t.px, &first, &[]);
    assert_eq!(
        message(&d.reload(&owned)),
        Some("policy reloaded"),
        "{}",
        d.log_text()
    );
    assert_eq!(
        tunnel(&t, "192.0.2.1:3128", "203.0.113.2:8080"),
        (
            "HTTP/1.1 200 Connection established".to_owned(),
            Some("a".to_owned())
        )
    );
    let dropped = json!({ "intercept": [explicit("192.0.2.1:3128")], "upstreams": upstreams });
    let refused = d.reload(&dropped);
    let text = message(&refused).unwrap_or_default().to_owned();
    assert!(
        text.contains("intercept[0].connect.listen[0]: 192.0.2.1 is not an address of this host")
            && text.contains("the running policy stays in force"),
        "{refused}"
    );
    assert_eq!(greeting(&t, "192.0.2.10:80"), "a", "the running policy");
}
