//! l4proxy and other CONNECT proxies: Squid as the parent l4proxy asks to
//! connect on (with and without Basic credentials), Squid as a child that
//! asks l4proxy's CONNECT listener, and hand-written parents that refuse,
//! answer garbage, hang up or never answer. Each test builds the routed lab
//! of tests/lab (cl — px — sv); Squid runs through lab::squid.

mod lab;

use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lab::daemon::field_str;
use lab::daemon::{message, outcome};
use lab::origin::{APP, Origin};
use lab::squid::{Config, Squid};
use lab::tls::{curl, require_tools};
use lab::{Daemon, Server, Topo, poll_until, sa};
use serde_json::{Value, json};

/// The parent's address in sv.
const PARENT: &str = "203.0.113.8";
/// The service address px takes, and the name curl asks for there.
const SERVICE: &str = "192.0.2.10";

/// sv's side of every test: the parent's address, and nginx serving
/// `app.example.test` (body `app-v4`) on 203.0.113.2:443, and the lab's
/// resolver answering for it (used where l4proxy resolves it), with the
/// parent proxies' address on sv.
fn app_server(t: &Topo) -> Origin {
    t.sv.addr("to-px", &format!("{PARENT}/24"));
    Origin::start(
        t,
        &[("203.0.113.2:443", "app-v4")],
        &[],
        &[(APP, &["203.0.113.2"])],
    )
}

/// curl in cl asking for `SCHEME://NAME/` at the service address `at`
/// (as if DNS gave it), with `extra` before the URL; and how long it took.
fn curl_at(
    t: &Topo,
    at: &str,
    scheme: &str,
    name: &str,
    extra: &[&str],
) -> (lab::tls::Curl, Duration) {
    let port = if scheme == "https" { 443 } else { 80 };
    let resolve = format!("{name}:{port}:{at}");
    let url = format!("{scheme}://{name}/");
    let mut args = vec!["--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    let started = Instant::now();
    let got = curl(&t.cl, &args);
    (got, started.elapsed())
}

// ---------------------------------------------------------------------------
// Squid as the parent.

/// Squid in sv on 203.0.113.8: port 3128 open to px, port 3129 only with
/// Basic credentials (user `lab`, password `s3cret`); it resolves
/// app.example.test from its hosts file (px has no resolver at all).
fn squid_parent(t: &Topo) -> Squid {
    Squid::start(
        &t.sv,
        &Config {
            listen: vec![sa(&format!("{PARENT}:3128")), sa(&format!("{PARENT}:3129"))],
            hosts: vec![(APP, "203.0.113.2")],
            users: vec![("lab", "s3cret")],
            rules: "acl px src 203.0.113.1/32\n\
                    acl open_port localport 3128\n\
                    acl CONNECT method CONNECT\n\
                    acl tls_port port 443\n\
                    http_access deny !px\n\
                    http_access deny !CONNECT\n\
                    http_access deny !tls_port\n\
                    http_access allow open_port\n\
                    http_access allow authenticated\n\
                    http_access deny all",
        },
    )
}

/// px takes TLS to 192.0.2.10-12:443 and sends it by SNI to Squid: without
/// credentials (.10), with the right ones (.11), with wrong ones (.12).
fn child_policy() -> Value {
    let route = |name: &str, dst: &str, upstream: &str| {
        let conditions = json!({ "destination": [dst], "sni": [APP] });
        json!({ "name": name, "match": conditions, "upstream": upstream })
    };
    json!({
        "intercept": [
            { "name": "service", "prefixes": ["192.0.2.10/32", "192.0.2.11/32", "192.0.2.12/32"],
              "ports": [443] }
        ],
        "routes": [
            route("open", "192.0.2.10/32", "squid"),
            route("right", "192.0.2.11/32", "squid-auth"),
            route("wrong", "192.0.2.12/32", "squid-wrong-password")
        ],
        "upstreams": {
            "squid": { "parent": { "servers": [format!("{PARENT}:3128")] } },
            "squid-auth": { "parent": { "servers": [format!("{PARENT}:3129")],
                                        "user": "lab", "password": "s3cret" } },
            "squid-wrong-password": { "parent": { "servers": [format!("{PARENT}:3129")],
                                                  "user": "lab", "password": "wrong" } }
        }
    })
}

/// Squid as the parent: curl's TLS connection to the service address is
/// taken by px, whose l4proxy asks Squid for the SNI name; Squid resolves
/// it and tunnels to nginx, and both logs show it.
#[test]
fn squid_parent_is_asked_for_the_server_name() {
    let t = Topo::new("peers_sqparent");
    let app = app_server(&t);
    let squid = squid_parent(&t);
    let mut d = Daemon::start_ready(&t.px, &child_policy(), &[]);

    let (got, _) = curl_at(&t, SERVICE, "https", APP, &["--cacert", app.cacert()]);
    assert_eq!(got.body.trim(), "app-v4", "{}", got.describe());
    let ev = d.closed_event(got.local.expect("curl's own address"));
    assert_eq!(
        field_str(&ev, "upstream").as_deref(),
        Some("203.0.113.8:3128"),
        "{ev}"
    );
    assert_eq!(field_str(&ev, "route").as_deref(), Some("open"), "{ev}");
    assert_eq!(outcome(&ev), "closed", "{ev}");
    // `time elapsed client code/status bytes method URL user hierarchy/from`:
    // asked by px's address for the name, resolved and connected by Squid.
    let line = squid.wait_access(&["CONNECT app.example.test:443"]);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.get(2), Some(&"203.0.113.1"), "{line}");
    assert_eq!(fields.get(3), Some(&"TCP_TUNNEL/200"), "{line}");
    assert_eq!(fields.get(8), Some(&"HIER_DIRECT/203.0.113.2"), "{line}");
}

/// With `user` and `password`, l4proxy sends Basic credentials: Squid
/// checks them with basic_ncsa_auth, serves the right ones, and answers
/// wrong ones with 407, which the TLS client sees as a reset and the log
/// names.
#[test]
fn squid_parent_checks_basic_credentials() {
    let t = Topo::new("peers_sqauth");
    let app = app_server(&t);
    let squid = squid_parent(&t);
    let mut d = Daemon::start_ready(&t.px, &child_policy(), &[]);

    let cacert = ["--cacert", app.cacert()];
    let (right, _) = curl_at(&t, "192.0.2.11", "https", APP, &cacert);
    assert_eq!(right.body.trim(), "app-v4", "{}", right.describe());
    let ev = d.closed_event(right.local.expect("curl's own address"));
    assert_eq!(
        field_str(&ev, "upstream").as_deref(),
        Some("203.0.113.8:3129"),
        "{ev}"
    );
    assert_eq!(outcome(&ev), "closed", "{ev}");
    let line = squid.wait_access(&["TCP_TUNNEL/200", "CONNECT app.example.test:443"]);
    assert_eq!(
        line.split_whitespace().nth(7),
        Some("lab"),
        "Squid's user: {line}"
    );

    let (wrong, took) = curl_at(&t, "192.0.2.12", "https", APP, &cacert);
    assert!(!wrong.out.success(), "{}", wrong.describe());
    assert!(wrong.body.is_empty(), "{}", wrong.describe());
    assert_tls_reset(&wrong);
    assert!(took < Duration::from_secs(3), "refused after {took:?}");
    let ev = d.closed_event(wrong.local.expect("curl's own address"));
    assert!(
        outcome(&ev).contains("parent proxy answered 407 to CONNECT app.example.test:443"),
        "{ev}"
    );
    squid.wait_access(&["TCP_DENIED/407", "CONNECT app.example.test:443"]);
}

/// curl's TLS handshake failed on a reset (curl's error 35, the peer reset
/// the connection).
fn assert_tls_reset(got: &lab::tls::Curl) {
    assert_eq!(got.out.code(), Some(35), "{}", got.describe());
    assert!(
        got.out.stderr.contains("reset by peer"),
        "{}",
        got.describe()
    );
}

// ---------------------------------------------------------------------------
// Squid as the child.

/// Squid as the child: Squid in cl (on its own address 198.51.100.3) sends
/// everything to l4proxy's CONNECT listener on px as its parent
/// (`cache_peer`, `never_direct`); curl asks Squid, l4proxy resolves the
/// name with the lab's dnsmasq and connects to nginx; its log shows
/// Squid as the client and the name as the target.
#[test]
fn squid_child_asks_l4proxy() {
    let t = Topo::new("peers_sqchild");
    let app = app_server(&t);
    let policy = json!({
        "intercept": [
            { "name": "explicit", "upstream": "direct",
              "connect": { "listen": ["198.51.100.1:3128"], "clients": ["198.51.100.0/24"] } }
        ],
        "upstreams": { "direct": { "original_destination": true } }
    });
    let mut d = Daemon::start_with_resolver(&t.px, &policy, &[], &app.resolv_conf());
    t.cl.addr("to-px", "198.51.100.3/24");
    let squid = Squid::start(
        &t.cl,
        &Config {
            listen: vec![sa("198.51.100.3:3128")],
            // Squid resolves nothing itself: l4proxy does.
            rules: "acl lab_clients src 198.51.100.0/24\n\
                    acl CONNECT method CONNECT\n\
                    http_access deny !lab_clients\n\
                    http_access allow CONNECT\n\
                    http_access deny all\n\
                    cache_peer 198.51.100.1 parent 3128 0 no-query no-digest default name=l4proxy\n\
                    never_direct allow all\n\
                    tcp_outgoing_address 198.51.100.3",
            ..Config::default()
        },
    );

    let got = curl(
        &t.cl,
        &[
            "-p",
            "-x",
            "http://198.51.100.3:3128",
            "--cacert",
            app.cacert(),
            "https://app.example.test/",
        ],
    );
    assert_eq!(got.body.trim(), "app-v4", "{}", got.describe());
    let ev = d.wait_event("the tunnel Squid asked for", Duration::from_secs(10), |e| {
        lab::daemon::message(e) == Some("connection closed")
            && field_str(e, "connect_target").as_deref() == Some("app.example.test:443")
    });
    assert!(
        field_str(&ev, "client")
            .unwrap_or_default()
            .starts_with("198.51.100.3:"),
        "{ev}"
    );
    assert_eq!(
        field_str(&ev, "upstream").as_deref(),
        Some("203.0.113.2:443"),
        "{ev}"
    );
    assert_eq!(field_str(&ev, "rule").as_deref(), Some("explicit"), "{ev}");
    assert_eq!(outcome(&ev), "closed", "{ev}");
    let line = squid.wait_access(&["TCP_TUNNEL/200", "CONNECT app.example.test:443"]);
    assert!(line.contains("_PARENT/198.51.100.1"), "{line}");
    assert!(app.dns.log().contains(APP), "{}", app.dns.log());
}

// ---------------------------------------------------------------------------
// Parents that misbehave.

/// What the fake parent saw on one connection: the CONNECT head, and how
/// many bytes came after it (l4proxy must send none before a 2xx).
#[derive(Clone, Debug)]
struct Asked {
    head: String,
    after: usize,
}

/// A hand-written parent: reads the CONNECT head, then acts by the first
/// label of the name asked for: `forbidden` (403), `badgateway` (502),
/// `garbage` (an SSH banner), `hangup` (closes), `silent` (keeps the
/// connection open, saying nothing). Then reads to EOF (5 s at most).
fn fake_parent(seen: Arc<Mutex<Vec<Asked>>>) -> impl Fn(TcpStream) + Send + Sync + 'static {
    use std::io::Write;
    move |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
            match lab::read_some(&mut s, &mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let name = head.split_whitespace().nth(1).unwrap_or_default();
        let answer: Option<&[u8]> = match name.split('.').next().unwrap_or_default() {
            "forbidden" => Some(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"),
            "badgateway" => Some(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"),
            "garbage" => Some(b"SSH-2.0-x\r\n"),
            "hangup" => {
                let _ = s.shutdown(std::net::Shutdown::Both);
                None
            }
            _ => None,
        };
        if let Some(answer) = answer {
            let _ = s.write_all(answer);
        }
        let mut after = 0;
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = lab::read_some(&mut s, &mut buf) {
            after += n;
        }
        seen.lock().unwrap().push(Asked { head, after });
    }
}

/// The hand-written parent in sv and px's l4proxy sending TLS (by SNI)
/// and HTTP (by Host) for the service address to it, `--connect-timeout 1`.
/// Fields drop in order: the daemon and the parent before the namespaces.
struct FakeParentLab {
    d: Daemon,
    policy: Value,
    seen: Arc<Mutex<Vec<Asked>>>,
    _parent: Server,
    t: Topo,
}

impl FakeParentLab {
    fn start(test: &str) -> FakeParentLab {
        require_tools();
        let t = Topo::new(test);
        t.sv.addr("to-px", &format!("{PARENT}/24"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let parent = Server::start(
            &t.sv,
            sa(&format!("{PARENT}:3128")),
            fake_parent(seen.clone()),
        );
        let policy = json!({
            "intercept": [
                { "name": "tls", "prefixes": [format!("{SERVICE}/32")], "ports": [443] },
                { "name": "http", "prefixes": [format!("{SERVICE}/32")], "ports": [80] }
            ],
            "routes": [
                { "name": "by-sni", "match": { "intercept": ["tls"], "sni": ["*.example.test"] },
                  "upstream": "parent" },
                { "name": "by-host", "match": { "intercept": ["http"], "host": ["*.example.test"] },
                  "upstream": "parent" }
            ],
            "upstreams": { "parent": { "parent": { "servers": [format!("{PARENT}:3128")] } } }
        });
        let d = Daemon::start_ready(&t.px, &policy, &["--connect-timeout", "1"]);
        FakeParentLab {
            d,
            policy,
            seen,
            _parent: parent,
            t,
        }
    }

    /// curl asks for `LABEL.example.test` over TLS and over plain HTTP:
    /// each fails within `[fastest, slowest)`, TLS with a reset, HTTP with
    /// l4proxy's 502; the close log has `says` and the target; the parent
    /// got the CONNECT head for the name and nothing after it.
    fn expect_failure(&mut self, label: &str, says: &str, fastest: Duration, slowest: Duration) {
        let name = format!("{label}.example.test");
        for (scheme, port) in [("https", 443), ("http", 80)] {
            let what = format!("{scheme}://{name}/");
            let (got, took) = curl_at(&self.t, SERVICE, scheme, &name, &["-k", "--max-time", "8"]);
            assert!(
                took >= fastest && took < slowest,
                "{what}: failed after {took:?}\n{}",
                got.describe()
            );
            if scheme == "https" {
                assert_tls_reset(&got);
            } else {
                assert_eq!(got.http_code, Some(502), "{what}: {}", got.describe());
                assert_eq!(
                    got.body.trim(),
                    "upstream unreachable",
                    "{what}: {}",
                    got.describe()
                );
            }
            let ev = self.d.closed_event(got.local.expect("curl's own address"));
            let target = format!("{name}:{port}");
            assert!(
                outcome(&ev).contains(&format!("{says} {target}")),
                "{what}: expected {says:?} in the outcome: {ev}"
            );
            let asked = poll_until(
                Duration::from_secs(5),
                || {
                    self.seen
                        .lock()
                        .unwrap()
                        .iter()
                        .find(|a| {
                            a.head
                                .starts_with(&format!("CONNECT {target} HTTP/1.1\r\n"))
                        })
                        .cloned()
                },
                Option::is_some,
            )
            .unwrap_or_else(|| {
                panic!(
                    "{what}: the parent saw no CONNECT {target}: {:?}",
                    self.seen.lock().unwrap()
                )
            });
            assert!(
                asked.head.contains(&format!("\r\nHost: {target}\r\n")),
                "{what}: {asked:?}"
            );
            assert_eq!(asked.after, 0, "{what}: client bytes reached the parent");
        }
    }
}

/// Parents that refuse (403, 502), answer garbage or hang up: a TLS client
/// is reset at once, an HTTP client gets l4proxy's 502, the parent never
/// gets a byte of the client's, and the log names what the parent did.
#[test]
fn parents_that_refuse_or_garble_fail_the_client_at_once() {
    let mut lab = FakeParentLab::start("peers_refuse");
    let at_once = (Duration::ZERO, Duration::from_secs(3));
    for (label, says) in [
        ("forbidden", "parent proxy answered 403 to CONNECT"),
        ("badgateway", "parent proxy answered 502 to CONNECT"),
        ("garbage", "parent proxy sent a malformed answer to CONNECT"),
        ("hangup", "parent proxy closed before answering CONNECT"),
    ] {
        lab.expect_failure(label, says, at_once.0, at_once.1);
    }
}

/// Observed (`observe`), a parent that refuses tunnels is working (the
/// refusal may be its destination's doing), and one that hangs up before
/// answering is failing: marked down after two in a row.
#[test]
fn a_parent_that_hangs_up_is_observed_down_and_one_that_refuses_is_not() {
    let mut lab = FakeParentLab::start("peers_observe");
    let mut policy = lab.policy.clone();
    policy["upstreams"]["parent"]["observe"] = json!({ "errors": 2, "down_for": "1m" });
    let verdict = lab.d.reload(&policy);
    assert_eq!(message(&verdict), Some("policy reloaded"), "{verdict}");
    let ask = |lab: &FakeParentLab, label: &str| {
        let name = format!("{label}.example.test");
        let (got, _) = curl_at(&lab.t, SERVICE, "http", &name, &["--max-time", "8"]);
        assert_eq!(got.http_code, Some(502), "{name}: {}", got.describe());
    };
    for _ in 0..3 {
        ask(&lab, "forbidden");
    }
    let down = |e: &Value| message(e) == Some("server down");
    assert!(!lab.d.events().iter().any(down), "{}", lab.d.log_text());
    for _ in 0..2 {
        ask(&lab, "hangup");
    }
    let ev = lab
        .d
        .wait_event("the parent down", Duration::from_secs(10), down);
    assert!(
        field_str(&ev, "reason").is_some_and(|why| why.contains("closed before answering")),
        "{ev}"
    );
}

/// A parent that accepts and never answers: after `--connect-timeout 1`
/// the TLS client is reset and the HTTP client gets a 502, and the log says
/// the parent did not answer (not that the connect timed out: the TCP
/// connection to the parent was made at once).
#[test]
fn a_silent_parent_fails_the_client_at_the_connect_timeout() {
    let mut lab = FakeParentLab::start("peers_silent");
    lab.expect_failure(
        "silent",
        "no answer from the parent proxy to CONNECT",
        Duration::from_millis(900),
        Duration::from_secs(4),
    );
    let closed: Vec<Value> = lab
        .d
        .events()
        .into_iter()
        .filter(|e| {
            lab::daemon::message(e) == Some("connection closed")
                && [field_str(e, "sni"), field_str(e, "host")]
                    .contains(&Some("silent.example.test".to_owned()))
        })
        .collect();
    assert_eq!(closed.len(), 2, "{closed:?}");
    for ev in closed {
        assert!(
            outcome(&ev).ends_with(" within the connect timeout"),
            "{ev}"
        );
    }
}
