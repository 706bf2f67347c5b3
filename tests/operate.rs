//! Operating the daemon: its Prometheus metrics, checked by Debian's
//! promtool and scraped by a real Prometheus server while the test sends
//! known traffic; `l4proxy status` against the connections the test holds;
//! `l4proxy reload` refusing a bad policy and taking a good one; the kernel
//! programs' log level, which costs nothing when debug is off.

mod lab;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lab::prometheus::{Prometheus, expect_sample, promtool_check};
use lab::tls::run_in;
use lab::{Daemon, Server, Topo, handlers, ip, sa};
use serde_json::{Value, json};

/// Where l4proxy serves metrics and Prometheus listens, inside px.
const ADMIN: &str = "127.0.0.1:9901";
const PROMETHEUS: &str = "127.0.0.1:9090";

/// Port 80 of the service goes to the echo server by the route `api`; port
/// 81 has no route and no default: refused.
fn policy(api: &str) -> Value {
    json!({
        "intercept": [ { "name": "svc", "prefixes": ["192.0.2.10/32"], "ports": [80, 81, 82] } ],
        "routes": [
            { "name": "api", "match": { "ports": [80] }, "upstream": "api" },
            { "name": "closed", "match": { "ports": [82] }, "reject": true }
        ],
        "upstreams": { "api": { "servers": [api] } }
    })
}

/// Runs the daemon's own binary in `ns` (a control-socket client).
fn l4proxy(t: &Topo, args: &[&str]) -> lab::tls::Output {
    lab::daemon::command(&t.px, args, Duration::from_secs(30))
}

/// One echoed exchange: connects, sends `line`, reads the server's hello
/// and the echo, closes. Returns the bytes sent.
fn exchange(t: &Topo, line: &str) -> usize {
    let mut c = lab::connect(&t.cl, sa("192.0.2.10:80"));
    c.write_all(line.as_bytes()).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, format!("api\n{line}"));
    line.len()
}

/// The daemon's metrics, as curl in px gets them.
fn scrape(t: &Topo) -> String {
    lab::prometheus::scrape(&t.px, ADMIN)
}

/// A connection no route takes: the daemon closes it.
fn refused(t: &Topo, port: u16) {
    let mut c = lab::connect(&t.cl, SocketAddr::new(ip("192.0.2.10"), port));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = lab::read_some(&mut c, &mut [0u8; 16]);
}

/// A stopping daemon's admin port closes at once: during the drain a
/// scraper is refused, not left waiting until the grace period ends.
#[test]
fn a_draining_daemon_refuses_scrapes() {
    let t = Topo::new("op_drain_admin");
    let _srv = Server::start(&t.sv, sa("203.0.113.2:8080"), handlers::hello_echo("api"));
    let mut d = Daemon::start_ready(&t.px, &policy("203.0.113.2:8080"), &["--admin", ADMIN]);
    assert!(scrape(&t).contains("l4proxy_"));
    // An open connection keeps the drain going.
    let mut held = lab::connect(&t.cl, sa("192.0.2.10:80"));
    assert_eq!(lab::read_line(&mut held).unwrap(), "api");
    d.drain();
    let tried =
        t.px.run(|| TcpStream::connect_timeout(&sa(ADMIN), Duration::from_secs(2)));
    assert!(
        matches!(&tried, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{tried:?}"
    );
    drop(held);
    let status = d.wait_exit(Duration::from_secs(10));
    d.assert_exit_ok(status);
}

/// The metrics pass promtool, and Prometheus, scraping them, counts what
/// the test sent: connections per route, bytes, refusals by outcome, and
/// the kernel's steering.
#[test]
fn prometheus_scrapes_what_the_test_sent() {
    let (t, _api) = Topo::with_echo("operate_metrics", "203.0.113.2:8080", "api");
    let _d = Daemon::start_ready(&t.px, &policy("203.0.113.2:8080"), &["--admin", ADMIN]);
    let prometheus = Prometheus::start(&t.px, sa(PROMETHEUS), sa(ADMIN));

    let sent: usize = (0..3).map(|i| exchange(&t, &format!("hello {i}\n"))).sum();
    refused(&t, 81);
    refused(&t, 81);
    refused(&t, 82);

    let scraped = scrape(&t);
    let (valid, report) = promtool_check(&t.px, &scraped);
    assert!(
        valid,
        "promtool refuses the exposition:\n{report}\n{}",
        scraped
    );
    let other = run_in(
        &t.px,
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{ADMIN}/"),
        ],
        b"",
        Duration::from_secs(10),
    );
    assert_eq!(other.stdout, "404", "{}", other.describe());

    let exactly = |n: f64| move |v: f64| v == n;
    let queries = [
        (r#"l4proxy_route_connections_total{route="api"}"#, 3.0),
        // Matched, and rejected.
        (r#"l4proxy_route_connections_total{route="closed"}"#, 1.0),
        (r#"l4proxy_rule_connections_total{rule="svc"}"#, 6.0),
        (
            r#"l4proxy_rule_closed_connections_total{rule="svc",outcome="refused"}"#,
            1.0,
        ),
        (
            r#"l4proxy_rule_closed_connections_total{rule="svc",outcome="closed"}"#,
            3.0,
        ),
        (
            r#"l4proxy_rule_closed_connections_total{rule="svc",outcome="no_route"}"#,
            2.0,
        ),
        (r#"l4proxy_upstream_connections_total{upstream="api"}"#, 3.0),
        (
            r#"l4proxy_rule_bytes_total{rule="svc",direction="from_client"}"#,
            sent as f64,
        ),
        (
            // The server's hello and the echo.
            r#"l4proxy_upstream_bytes_total{upstream="api",direction="from_upstream"}"#,
            (sent + 3 * "api\n".len()) as f64,
        ),
        (
            r#"l4proxy_upstream_connect_seconds_count{upstream="api"}"#,
            3.0,
        ),
        (r#"l4proxy_rule_active_connections{rule="svc"}"#, 0.0),
        (r#"l4proxy_policy_generation"#, 1.0),
        (
            r#"l4proxy_server_up{upstream="api",server="203.0.113.2:8080"}"#,
            1.0,
        ),
        (
            r#"l4proxy_server_active_connections{upstream="api",server="203.0.113.2:8080"}"#,
            0.0,
        ),
    ];
    for (query, want) in queries {
        prometheus.wait_value(&t.px, query, exactly(want));
    }
    prometheus.wait_value(&t.px, r#"l4proxy_kernel_total{counter="steered"}"#, |v| {
        v >= 5.0
    });
}

/// Failed upstream connects are counted by whose doing they were: a
/// server that refuses is `refused`; a connection no server could take
/// (from the client's IPv4 address, to a pool of IPv6 servers) is
/// `local`, not held against the pool's servers; TLS to the server for a
/// client that named no server, where the upstream names none, is
/// `client`.
#[test]
fn connect_failures_are_counted_by_whose_doing() {
    let (t, _api) = Topo::with_echo("operate_failures", "203.0.113.2:8080", "api");
    let _d = Daemon::start_ready(
        &t.px,
        &json!({
            "intercept": [ { "name": "svc", "prefixes": ["192.0.2.10/32"], "ports": [83, 84, 85] } ],
            "routes": [
                { "name": "gone", "match": { "ports": [83] }, "upstream": "gone" },
                { "name": "v6", "match": { "ports": [84] }, "upstream": "v6" },
                { "name": "tls", "match": { "ports": [85] }, "upstream": "tls" }
            ],
            "upstreams": {
                // Nothing listens there.
                "gone": { "servers": ["203.0.113.2:8081"] },
                "v6": { "servers": ["[2001:db8:2::2]:8080"], "bind": "client-ip" },
                "tls": { "servers": ["203.0.113.2:8080"], "tls": {} }
            }
        }),
        &["--admin", ADMIN],
    );
    for port in [83, 84, 85] {
        // The daemon resets the client as soon as the upstream fails,
        // which `connect` may already report.
        if let Ok(mut c) = lab::try_connect(
            &t.cl,
            sa(&format!("192.0.2.10:{port}")),
            Duration::from_secs(5),
        ) {
            let _ = lab::read_some(&mut c, &mut [0u8; 16]);
        }
    }
    let failures = |scraped: &str, upstream: &str, reason: &str| {
        expect_sample(
            scraped,
            &format!(
                r#"l4proxy_upstream_connect_failures_total{{upstream="{upstream}",reason="{reason}"}}"#
            ),
        )
    };
    let counted = |scraped: &str| {
        ["gone", "v6", "tls"].map(|upstream| {
            ["refused", "local", "tls", "client"].map(|reason| failures(scraped, upstream, reason))
        })
    };
    let mut scraped = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Both failures counted, under some reason.
    while Instant::now() < deadline {
        scraped = scrape(&t);
        if counted(&scraped)
            .iter()
            .all(|reasons| reasons.contains(&1.0))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        counted(&scraped),
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0]
        ],
        "upstreams gone, v6, tls: refused, local, tls, client\n{scraped}"
    );
    // Per server: the refusal counts against its server. The others were
    // never tried (no source of the family; no name to verify): nothing
    // is counted against a server before an attempt.
    let server = |upstream: &str, server: &str| {
        expect_sample(
            &scraped,
            &format!(
                r#"l4proxy_server_connect_failures_total{{upstream="{upstream}",server="{server}"}}"#
            ),
        )
    };
    assert_eq!(
        [
            server("gone", "203.0.113.2:8081"),
            server("v6", "[2001:db8:2::2]:8080"),
            server("tls", "203.0.113.2:8080"),
        ],
        [1.0, 0.0, 0.0],
        "{scraped}"
    );
}

/// `status` shows the connections the test holds open, and the totals;
/// `reload` says why a bad policy is refused (exit 1) and takes a good one
/// (exit 0), which `status` then shows.
#[test]
fn status_and_reload_answer_from_the_running_daemon() {
    let (t, _api) = Topo::with_echo("operate_status", "203.0.113.2:8080", "api");
    let _other = Server::start(&t.sv, sa("203.0.113.3:8080"), handlers::hello_echo("other"));
    let mut d = Daemon::start_ready(&t.px, &policy("203.0.113.2:8080"), &[]);

    // Two held open (the server's hello read: they are relaying), one done.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = lab::connect(&t.cl, sa("192.0.2.10:80"));
            let mut hello = [0u8; 4];
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.read_exact(&mut hello).unwrap();
            c
        })
        .collect();
    exchange(&t, "done\n");
    refused(&t, 82);
    // Their counts are let go just before their close lines.
    d.wait_closed_events(2, Duration::from_secs(10));

    let status = lab::daemon::status(&t.px);
    assert_eq!(status["rules"][0]["name"], "svc", "{status}");
    assert_eq!(status["rules"][0]["active"], 2, "{status}");
    assert_eq!(status["rules"][0]["total"], 4, "{status}");
    assert_eq!(status["upstreams"][0]["active"], 2, "{status}");
    let server = &status["upstreams"][0]["servers"][0];
    assert_eq!(server["address"], "203.0.113.2:8080", "{status}");
    assert_eq!(server["up"], true, "{status}");
    assert_eq!(server["active"], 2, "{status}");
    assert_eq!(status["routes"][0]["total"], 3, "{status}");
    assert_eq!(status["routes"][1]["name"], "closed", "{status}");
    assert_eq!(status["routes"][1]["total"], 1, "{status}");
    assert_eq!(status["generation"], 1, "{status}");
    assert!(
        lab::daemon::kernel_counter(&status, "steered") >= Some(3),
        "{status}"
    );
    let table = l4proxy(&t, &["status"]);
    assert!(table.success(), "{}", table.describe());
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["svc", "2", "4"]),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["203.0.113.2:8080", "2", "up"]),
        "{}",
        table.stdout
    );
    drop(held);

    // A bad policy: refused with the reason, the old one stays.
    std::fs::write(d.policy_path(), "{ \"intercept\": [ ").unwrap();
    let refused = l4proxy(&t, &["reload"]);
    assert_eq!(refused.code(), Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.contains("refused") && refused.stderr.contains("EOF"),
        "{}",
        refused.describe()
    );
    assert_eq!(exchange(&t, "still\n"), "still\n".len());

    // A good one: the route now goes to the other server.
    let good = serde_json::to_string_pretty(&policy("203.0.113.3:8080")).unwrap();
    std::fs::write(d.policy_path(), good).unwrap();
    let reloaded = l4proxy(&t, &["reload"]);
    assert!(reloaded.success(), "{}", reloaded.describe());
    let mut c = lab::connect(&t.cl, sa("192.0.2.10:80"));
    let mut hello = [0u8; 6];
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"other\n");
    let status = lab::daemon::status(&t.px);
    assert_eq!(status["generation"], 2, "{status}");
    d.wait_event("the reload", Duration::from_secs(5), |ev| {
        lab::daemon::message(ev) == Some("policy reloaded")
    });
}

/// The translated size of the `steer` program daemon `pid` holds.
fn steer_size(pid: i32) -> u32 {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("the daemon's fdinfo") {
        let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        ids.extend(info.lines().filter_map(|line| {
            line.strip_prefix("prog_id:")
                .and_then(|id| id.trim().parse::<u32>().ok())
        }));
    }
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| ids.contains(&program.id()))
        .find(|program| program.name_as_str() == Some("steer"))
        .expect("the daemon holds its steer program")
        .size_translated()
        .expect("the kernel reports the program's size")
}

#[test]
fn the_kernel_log_costs_nothing_when_debug_is_off() {
    let policy = policy("203.0.113.2:8080");
    let quiet_lab = Topo::new("klog_info");
    let quiet = Daemon::start_ready(&quiet_lab.px, &policy, &[]);
    let verbose_lab = Topo::new("klog_debug");
    let verbose = Daemon::start_ready(&verbose_lab.px, &policy, &["--log-level", "debug"]);
    let (off, on) = (steer_size(quiet.pid()), steer_size(verbose.pid()));
    // The verifier drops the logging code when the level is a constant that
    // turns it off: the program at info level is smaller by all of it.
    assert!(
        off < on,
        "steer at info level has {off} bytes, at debug {on}: the logging code was not removed"
    );
    // What is left at info level is the counters' path alone; the README
    // quotes these sizes.
    eprintln!("steer: {off} bytes translated at info level, {on} at debug");
}
