//! The CONNECT front end: an explicit proxy on px's client-side addresses,
//! names resolved by dnsmasq (a real resolver, in sv), TLS servers in nginx,
//! curl and openssl as clients, and hand-written heads for what clients
//! should not send. Each test builds the routed lab of tests/lab.

mod lab;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lab::daemon::field_str;
use lab::origin::Origin;
use lab::tls::{curl, s_client};
use lab::{Daemon, Server, TempDir, Topo, handlers, recv_report, reports, sa};
use serde_json::{Value, json};

const PROXY4: &str = "198.51.100.1:3128";
const PROXY6: &str = "[2001:db8:c::1]:3128";
/// The rule that refuses domain fronting.
const STRICT4: &str = "198.51.100.1:3129";
/// The rule that lets a client hold one tunnel.
const LIMITED4: &str = "198.51.100.1:3130";

/// The lab with dnsmasq, nginx serving `app.example.test` on 443 in both
/// families, and the daemon with two CONNECT rules.
struct ConnectLab {
    t: Topo,
    origin: Origin,
    d: Daemon,
}

fn policy() -> Value {
    let listen = json!([PROXY4, PROXY6]);
    json!({
        "intercept": [
            { "name": "explicit", "upstream": "direct",
              "connect": { "listen": listen, "clients": ["198.51.100.0/24", "2001:db8:c::/64"],
                           "ports": [443, 444, 8443] } },
            { "name": "strict", "upstream": "direct",
              "connect": { "listen": [STRICT4], "clients": ["198.51.100.0/24"],
                           "names": ["app.example.test"], "refuse_fronting": true } },
            { "name": "limited", "upstream": "direct", "limits": { "per_client": 1 },
              "connect": { "listen": [LIMITED4], "clients": ["198.51.100.0/24"] } }
        ],
        "routes": [
            { "name": "routed", "match": { "target": ["*.routed.example.test"] }, "upstream": "routed" }
        ],
        "upstreams": {
            "direct": { "original_destination": true },
            "routed": { "servers": ["203.0.113.3:8443"] }
        }
    })
}

impl ConnectLab {
    fn start(test: &str) -> ConnectLab {
        let t = Topo::new(test);
        let origin = Origin::start(
            &t,
            &[
                ("203.0.113.2:443", "app-v4"),
                ("[2001:db8:5::2]:443", "app-v6"),
            ],
            &["IP:203.0.113.2", "IP:2001:db8:5::2"],
            &[
                ("app.example.test", &["203.0.113.2", "2001:db8:5::2"]),
                ("v6only.example.test", &["2001:db8:5::2"]),
                ("x.routed.example.test", &["203.0.113.2"]),
                ("rebind.example.test", &["127.0.0.1"]),
                ("metadata.example.test", &["169.254.169.254"]),
                ("anyip.example.test", &["203.0.113.241"]),
            ],
        );
        let d = Daemon::start_with_resolver(
            &t.px,
            &policy(),
            // Short enough for the tests of the deadlines, long enough for
            // a client that is not scheduled for a while on a loaded runner.
            &["--sniff-timeout", "3", "--connect-timeout", "1"],
            &origin.resolv_conf(),
        );
        ConnectLab { t, origin, d }
    }

    /// The `connection closed` event of the client at `local`.
    fn closed(&mut self, local: SocketAddr) -> Value {
        self.d.closed_event(local)
    }
}

/// Sends `head` (and anything after it) to the proxy at `proxy`, and reads
/// its answer head; returns the status line and the open connection.
fn ask(t: &Topo, proxy: &str, head: &[u8]) -> (String, TcpStream) {
    let mut c = lab::connect(&t.cl, sa(proxy));
    c.write_all(head).unwrap();
    let answer = lab::answer_head(&mut c);
    (answer.lines().next().unwrap_or_default().to_owned(), c)
}

fn connect_head(target: &str) -> Vec<u8> {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: lab\r\n\r\n").into_bytes()
}

/// curl through the proxy to nginx, by name and by literal address, from
/// both families: the client's family picks the server's (Happy Eyeballs
/// order), and the close log names the target and the address used.
#[test]
fn curl_reaches_tls_servers_by_name_and_by_address() {
    let mut lab = ConnectLab::start("connect_curl");
    let cacert = lab.origin.cacert().to_owned();
    for (proxy, url, body, target, upstream) in [
        (
            PROXY4,
            "https://app.example.test/",
            "app-v4",
            "app.example.test:443",
            "203.0.113.2:443",
        ),
        (
            PROXY6,
            "https://app.example.test/",
            "app-v6",
            "app.example.test:443",
            "[2001:db8:5::2]:443",
        ),
        (
            PROXY4,
            "https://v6only.example.test/",
            "app-v6",
            "v6only.example.test:443",
            "[2001:db8:5::2]:443",
        ),
        (
            PROXY4,
            "https://203.0.113.2/",
            "app-v4",
            "203.0.113.2:443",
            "203.0.113.2:443",
        ),
        (
            PROXY6,
            "https://[2001:db8:5::2]/",
            "app-v6",
            "[2001:db8:5::2]:443",
            "[2001:db8:5::2]:443",
        ),
    ] {
        let proxy_url = format!("http://{proxy}");
        let mut args = vec!["-p", "-x", &proxy_url, "--cacert", &cacert];
        // The certificate names app.example.test; v6only is the same server.
        if url.contains("v6only") {
            args.push("-k");
        }
        args.push(url);
        let got = curl(&lab.t.cl, &args);
        assert_eq!(
            got.body.trim(),
            body,
            "{url} via {proxy}: {}",
            got.describe()
        );
        let local = got.local.expect("curl's own address");
        let ev = lab.closed(local);
        assert_eq!(
            field_str(&ev, "connect_target").as_deref(),
            Some(target),
            "{ev}"
        );
        assert_eq!(
            field_str(&ev, "upstream").as_deref(),
            Some(upstream),
            "{ev}"
        );
        assert_eq!(field_str(&ev, "rule").as_deref(), Some("explicit"), "{ev}");
        assert_eq!(
            Some(lab::daemon::outcome(&ev)).as_deref(),
            Some("closed"),
            "{ev}"
        );
    }
    assert!(
        lab.origin.dns.log().contains("app.example.test"),
        "{}",
        lab.origin.dns.log()
    );
}

/// What the proxy refuses, by status, with the server never seeing a
/// connection: reserved addresses and this host's (also behind a name,
/// also where only a `local` route makes them the host's), a port not
/// allowed, another method, an oversized head, two Host fields; and what
/// it cannot do: an unknown name, a refused port, a silent address.
#[test]
fn denials_and_failures_are_answered_by_status() {
    let mut lab = ConnectLab::start("connect_deny");
    // Listeners where a refused tunnel would have gone.
    let loopback = Server::start(
        &lab.t.px,
        sa("127.0.0.1:443"),
        handlers::hello_echo("px-lo"),
    );
    let own = Server::start(
        &lab.t.px,
        sa("198.51.100.1:443"),
        handlers::hello_echo("px"),
    );
    // Prefixes px takes as its own without an address on them (AnyIP),
    // added while the daemon runs: a service there is this host's too.
    lab.t
        .px
        .ip(&["route", "add", "local", "203.0.113.240/28", "dev", "lo"]);
    lab.t.px.ip(&[
        "-6",
        "route",
        "add",
        "local",
        "2001:db8:5:f::/64",
        "dev",
        "lo",
    ]);
    // Routes that deliver nowhere: the kernel refuses to route to them
    // (each kind with its own error), and the tunnel fails as a connect.
    for (kind, ip) in REFUSED_ROUTES {
        lab.t.px.ip(&["route", "add", kind, ip]);
    }
    let anyip = Server::start(
        &lab.t.px,
        sa("203.0.113.241:443"),
        handlers::hello_echo("px-anyip"),
    );
    let oversized = {
        let mut head = b"CONNECT app.example.test:443 HTTP/1.1\r\n".to_vec();
        while head.len() < 17 * 1024 {
            head.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        head.extend_from_slice(b"\r\n");
        head
    };
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (connect_head("127.0.0.1:443"), "403", "loopback"),
        (connect_head("[::1]:443"), "403", "loopback"),
        (
            connect_head("198.51.100.1:443"),
            "403",
            "this host's address",
        ),
        (
            connect_head("203.0.113.241:443"),
            "403",
            "this host's address",
        ),
        (
            connect_head("[2001:db8:5:f::1]:443"),
            "403",
            "this host's address",
        ),
        (
            connect_head("anyip.example.test:443"),
            "403",
            "resolves only to refused addresses",
        ),
        (connect_head("169.254.169.254:443"), "403", "link-local"),
        (
            connect_head("rebind.example.test:443"),
            "403",
            "resolves only to refused addresses",
        ),
        (
            connect_head("metadata.example.test:443"),
            "403",
            "link-local",
        ),
        (
            connect_head("app.example.test:22"),
            "403",
            "port 22 not allowed",
        ),
        (
            b"GET http://app.example.test/ HTTP/1.1\r\nHost: app.example.test\r\n\r\n".to_vec(),
            "405",
            "is not CONNECT",
        ),
        (oversized, "400", "bad CONNECT request"),
        // Two Host fields: a head another parser on the way may read
        // otherwise (its target is one the rule allows).
        (
            b"CONNECT app.example.test:443 HTTP/1.1\r\nHost: app.example.test:443\r\n\
              Host: other.example.test:443\r\n\r\n"
                .to_vec(),
            "400",
            "more than one Host field",
        ),
        (
            connect_head("missing.example.test:443"),
            "502",
            "resolving missing.example.test",
        ),
        (
            connect_head("app.example.test:444"),
            "502",
            "connect_failed: connecting to",
        ),
        (
            connect_head("203.0.113.99:443"),
            "504",
            "connect_timeout: connecting to",
        ),
    ];
    let cases = cases.into_iter().chain(REFUSED_ROUTES.map(|(_, ip)| {
        let target = std::net::SocketAddr::new(ip.parse().unwrap(), 443);
        (
            connect_head(&target.to_string()),
            "502",
            "connect_failed: connecting to",
        )
    }));
    for (head, status, reason) in cases {
        let what = String::from_utf8_lossy(&head[..head.len().min(48)]).into_owned();
        let (answer, c) = ask(&lab.t, PROXY4, &head);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: answered {answer:?}, expected {status}"
        );
        if status == "405" {
            // The listener says what it takes.
            let mut again = lab::connect(&lab.t.cl, sa(PROXY4));
            again.write_all(&head).unwrap();
            let full = lab::answer_head(&mut again);
            assert!(full.contains("\r\nAllow: CONNECT\r\n"), "{what}: {full:?}");
        }
        // Closed here: the daemon, having answered, waits (at most 2 s) for
        // the client to close first.
        let local = c.local_addr().unwrap();
        drop(c);
        let ev = lab.closed(local);
        assert!(lab::daemon::outcome(&ev).contains(reason), "{what}: {ev}");
        // What a CONNECT asked for is logged, refused or not.
        if let Some(asked) = what.strip_prefix("CONNECT ").filter(|_| status != "400") {
            let asked = asked.split(' ').next().unwrap();
            assert_eq!(
                field_str(&ev, "connect_target").as_deref(),
                Some(asked),
                "{ev}"
            );
        }
    }
    assert!(
        loopback.accepted().is_empty(),
        "a tunnel reached px's loopback"
    );
    assert!(
        own.accepted().is_empty(),
        "a tunnel reached px's own address"
    );
    assert!(
        anyip.accepted().is_empty(),
        "a tunnel reached a prefix px routes to itself"
    );
}

/// Addresses `denials_and_failures_are_answered_by_status` routes to
/// nowhere, by the kind of route.
const REFUSED_ROUTES: [(&str, &str); 6] = [
    ("blackhole", "203.0.113.224"),
    ("unreachable", "203.0.113.225"),
    ("prohibit", "203.0.113.226"),
    ("blackhole", "2001:db8:5:e::1"),
    ("unreachable", "2001:db8:5:e::2"),
    ("prohibit", "2001:db8:5:e::3"),
];

/// A client that never finishes its head is closed at the deadline
/// (`--sniff-timeout 3`), without an answer.
#[test]
fn a_head_that_never_ends_is_closed_at_the_deadline() {
    let mut lab = ConnectLab::start("connect_slow");
    // Before the connection: the deadline runs from its accept.
    let started = Instant::now();
    let mut c = lab::connect(&lab.t.cl, sa(PROXY4));
    c.write_all(b"CONNECT app.example.test:443 HTTP/1.1\r\nHost: app")
        .unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    let took = started.elapsed();
    assert!(
        got.is_empty(),
        "answered {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(10),
        "closed after {took:?}"
    );
    let ev = lab.closed(c.local_addr().unwrap());
    assert!(
        lab::daemon::outcome(&ev).contains("no complete CONNECT request"),
        "{ev}"
    );
}

/// Bytes sent right behind the CONNECT head, before the 200, reach the
/// server once, after the tunnel is open; then 8 MiB each way with
/// half-close, byte-exact, in both families.
#[test]
fn early_data_arrives_once_after_the_answer_and_bulk_flows_both_ways() {
    let lab = ConnectLab::start("connect_early");
    const SIZE: usize = 8 << 20;
    let down = Arc::new(lab::random_bytes(SIZE, lab::seed()));
    let (tx, rx) = reports();
    let _srv4 = Server::start(
        &lab.t.sv,
        sa("203.0.113.2:8443"),
        handlers::bulk(down.clone(), tx.clone()),
    );
    let _srv6 = Server::start(
        &lab.t.sv,
        sa("[2001:db8:5::2]:8443"),
        handlers::bulk(down.clone(), tx),
    );
    for proxy in [PROXY4, PROXY6] {
        let up = lab::random_bytes(SIZE, lab::seed());
        let mut c = lab::connect(&lab.t.cl, sa(proxy));
        let mut first = connect_head("app.example.test:8443");
        first.extend_from_slice(&up[..64 * 1024]);
        c.write_all(&first).unwrap();
        let answer = lab::answer_head(&mut c);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{proxy}: {answer:?}");
        let mut w = c.try_clone().unwrap();
        let rest = up[64 * 1024..].to_vec();
        let writer = std::thread::spawn(move || {
            w.write_all(&rest).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let got = lab::read_to_eof(&mut c).unwrap();
        writer.join().unwrap();
        assert_eq!(got, lab::Received::of(&down), "{proxy}: download");
        let at_server = recv_report(&rx, proxy);
        assert_eq!(
            at_server,
            lab::Received::of(&up),
            "{proxy}: upload (early data once, in order)"
        );
    }
}

/// Routes match on the name a client asked for: `*.routed.example.test`
/// goes to its own pool, not to the address the name resolves to.
#[test]
fn routes_match_the_connect_name() {
    let mut lab = ConnectLab::start("connect_route");
    let _direct = Server::start(
        &lab.t.sv,
        sa("203.0.113.2:8443"),
        handlers::hello_echo("direct"),
    );
    let _routed = Server::start(
        &lab.t.sv,
        sa("203.0.113.3:8443"),
        handlers::hello_echo("routed"),
    );
    let (answer, mut c) = ask(&lab.t, PROXY4, &connect_head("x.routed.example.test:8443"));
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert_eq!(lab::read_line(&mut c).unwrap(), "routed");
    lab::finish(&mut c, "routed tunnel");
    let ev = lab.closed(c.local_addr().unwrap());
    assert_eq!(field_str(&ev, "route").as_deref(), Some("routed"), "{ev}");
}

/// With `refuse_fronting`, a TLS server name other than the CONNECT name
/// is refused (after the 200, with a reset); the same name is served.
#[test]
fn domain_fronting_is_refused_when_the_rule_says_so() {
    let mut lab = ConnectLab::start("connect_fronting");
    let cafile = lab.origin.cacert().to_owned();
    let fronted = s_client(
        &lab.t.cl,
        &[
            "-proxy",
            STRICT4,
            "-connect",
            "app.example.test:443",
            "-servername",
            "other.example.test",
            "-CAfile",
            &cafile,
        ],
        b"GET / HTTP/1.0\r\n\r\n",
    );
    assert!(!fronted.stdout.contains("app-v4"), "{}", fronted.describe());
    assert!(
        fronted.stderr.contains("errno=104"),
        "a reset: {}",
        fronted.describe()
    );
    let refused = lab
        .d
        .wait_event("the fronting refusal", Duration::from_secs(10), |e| {
            Some(lab::daemon::outcome(e)).is_some_and(|o| o.contains("domain fronting"))
        });
    assert_eq!(
        field_str(&refused, "sni").as_deref(),
        Some("other.example.test"),
        "{refused}"
    );
    let same = s_client(
        &lab.t.cl,
        &[
            "-proxy",
            STRICT4,
            "-connect",
            "app.example.test:443",
            "-servername",
            "app.example.test",
            "-CAfile",
            &cafile,
        ],
        b"GET / HTTP/1.0\r\nHost: app.example.test\r\n\r\n",
    );
    assert!(same.stdout.contains("app-v4"), "{}", same.describe());
    // Names only: an address is refused.
    let (answer, _) = ask(&lab.t, STRICT4, &connect_head("203.0.113.2:443"));
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer:?}");
}

/// With `refuse_fronting`, a tunnel whose first bytes cannot be checked
/// against the CONNECT name is refused as well: a client that waits out the
/// sniff deadline (`--sniff-timeout 3`) and then sends a ClientHello for
/// another name, and one that speaks something other than TLS or HTTP.
#[test]
fn fronting_that_cannot_be_ruled_out_is_refused() {
    let mut lab = ConnectLab::start("connect_unchecked");
    let fronted = lab::tls::capture_client_hello(&lab.t.cl, &["-servername", "other.example.test"]);
    let head = connect_head("app.example.test:443");
    for (first, waits_out_deadline, why) in [
        (&fronted[..], true, "not read (sniff timeout)"),
        (
            &b"SSH-2.0-OpenSSH_9.2p1\r\n"[..],
            false,
            "not a ClientHello or an HTTP request that names a host",
        ),
    ] {
        let (answer, mut c) = ask(&lab.t, STRICT4, &head);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
        let local = c.local_addr().unwrap();
        // The refusal is logged as the deadline passes: the hello comes
        // after it, however late the daemon's timer fires.
        let waited = waits_out_deadline.then(|| lab.closed(local));
        // The refusal may already be there (a reset) when the client writes.
        let _ = c.write_all(first);
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(got.is_empty(), "{why}: the server answered {got:?}");
        let ev = waited.unwrap_or_else(|| lab.closed(local));
        assert_eq!(
            field_str(&ev, "outcome").as_deref(),
            Some("refused"),
            "{ev}"
        );
        assert!(lab::daemon::outcome(&ev).contains(why), "{ev}");
    }
}

/// A draining daemon (SIGTERM, a tunnel still open) refuses new CONNECT
/// clients at once, while the open tunnel flows on.
#[test]
fn a_draining_daemon_refuses_new_tunnels() {
    let mut lab = ConnectLab::start("connect_drain");
    let (answer, mut open) = ask(&lab.t, PROXY4, &connect_head("app.example.test:443"));
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    lab.d.drain();
    // The accept loops read their queues to the end first: give them a
    // moment, then every new client must be refused.
    let refused_by = Instant::now() + Duration::from_secs(10);
    loop {
        match lab::try_connect(&lab.t.cl, sa(PROXY4), Duration::from_secs(1)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                Instant::now() < refused_by,
                "10 s into the drain a new CONNECT client still gets {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The tunnel opened before is still relayed: nginx answers through it.
    let hello = lab::tls::capture_client_hello(&lab.t.cl, &["-servername", "app.example.test"]);
    open.write_all(&hello).unwrap();
    let mut record = [0u8; 1];
    open.read_exact(&mut record)
        .expect("the server's answer through the open tunnel");
    assert_eq!(record[0], 0x16, "a TLS handshake record from nginx");
}

/// A chain of proxies (local proxy → remote proxy): px
/// takes TLS connections to a service address, reads their SNI and asks a
/// parent l4proxy in sv, by CONNECT, for the name; the parent resolves it
/// and connects. A name the parent refuses is a reset for the TLS client,
/// and the log says what the parent answered.
#[test]
fn a_parent_proxy_is_asked_for_the_server_name() {
    let t = Topo::new("connect_parent");
    t.sv.addr("to-px", "203.0.113.8/24");
    let origin = Origin::start(
        &t,
        &[("203.0.113.2:443", "app-v4")],
        &[],
        &[
            ("app.example.test", &["203.0.113.2"]),
            ("other.example.test", &["203.0.113.2"]),
        ],
    );
    let parent_policy = json!({
        "intercept": [
            { "name": "remote", "upstream": "direct",
              "connect": { "listen": ["203.0.113.8:3128"], "clients": ["203.0.113.1/32"],
                           "names": ["app.example.test"], "allow_reserved": ["203.0.113.2/32"] } }
        ],
        "upstreams": { "direct": { "original_destination": true } }
    });
    let mut parent = Daemon::start_with_resolver(&t.sv, &parent_policy, &[], &origin.resolv_conf());
    let child_policy = json!({
        "intercept": [
            { "name": "local", "prefixes": ["192.0.2.10/32"], "ports": [443] }
        ],
        "routes": [
            { "name": "by-name", "match": { "sni": ["*.example.test"] }, "upstream": "remote" }
        ],
        "upstreams": { "remote": { "parent": { "servers": ["203.0.113.8:3128"] } } }
    });
    let mut child = Daemon::start_ready(&t.px, &child_policy, &[]);
    let cacert = origin.cacert();
    let got = curl(
        &t.cl,
        &[
            "--resolve",
            "app.example.test:443:192.0.2.10",
            "--cacert",
            cacert,
            "https://app.example.test/",
        ],
    );
    assert_eq!(got.body.trim(), "app-v4", "{}", got.describe());
    let ev = child.closed_event(got.local.expect("curl's own address"));
    assert_eq!(
        field_str(&ev, "upstream").as_deref(),
        Some("203.0.113.8:3128"),
        "{ev}"
    );
    assert_eq!(
        Some(lab::daemon::outcome(&ev)).as_deref(),
        Some("closed"),
        "{ev}"
    );
    let asked = parent.wait_event("the parent's tunnel", Duration::from_secs(10), |e| {
        field_str(e, "connect_target").as_deref() == Some("app.example.test:443")
    });
    assert_eq!(
        field_str(&asked, "upstream").as_deref(),
        Some("203.0.113.2:443"),
        "{asked}"
    );
    assert!(
        field_str(&asked, "client")
            .unwrap()
            .starts_with("203.0.113.1:"),
        "{asked}"
    );

    let refused = curl(
        &t.cl,
        &[
            "--resolve",
            "other.example.test:443:192.0.2.10",
            "-k",
            "https://other.example.test/",
        ],
    );
    assert!(!refused.out.success(), "{}", refused.describe());
    let ev = child.closed_event(refused.local.expect("curl's own address"));
    assert!(
        lab::daemon::outcome(&ev)
            .contains("parent proxy answered 403 to CONNECT other.example.test:443"),
        "{ev}"
    );
}

/// With `htpasswd`, a client without credentials, or with a wrong
/// password, gets 407 and a Basic challenge; the right ones open the
/// tunnel, and the close log names the user. curl's --proxy-user works.
#[test]
fn proxy_authentication_with_bcrypt_htpasswd() {
    let t = Topo::new("connect_auth");
    let origin = Origin::start(
        &t,
        &[("203.0.113.2:443", "app-v4")],
        &[],
        &[("app.example.test", &["203.0.113.2"])],
    );
    let users_dir = TempDir::new("connect-users");
    let users = users_dir.join("users");
    let hash = bcrypt::hash("open sesame", 4).unwrap();
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let policy = json!({
        "intercept": [
            { "name": "explicit", "upstream": "direct",
              "connect": { "listen": [PROXY4], "clients": ["198.51.100.0/24"],
                           "htpasswd": users.to_str().unwrap() } }
        ],
        "upstreams": { "direct": { "original_destination": true } }
    });
    let mut d = Daemon::start_with_resolver(&t.px, &policy, &[], &origin.resolv_conf());
    let head = |credentials: Option<&str>| {
        let mut head =
            b"CONNECT app.example.test:443 HTTP/1.1\r\nHost: app.example.test:443\r\n".to_vec();
        if let Some(credentials) = credentials {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            head.extend_from_slice(format!("Proxy-Authorization: Basic {encoded}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    };
    use base64::Engine as _;
    for (credentials, reason) in [
        (None, "no credentials"),
        (
            Some("alice:open sesame!"),
            "wrong credentials for user \"alice\"",
        ),
        (
            Some("mallory:open sesame"),
            "wrong credentials for user \"mallory\"",
        ),
    ] {
        let mut c = lab::connect(&t.cl, sa(PROXY4));
        c.write_all(&head(credentials)).unwrap();
        let answer = lab::answer_head(&mut c);
        assert!(
            answer.starts_with("HTTP/1.1 407 "),
            "{credentials:?}: {answer:?}"
        );
        assert!(
            answer.contains("Proxy-Authenticate: Basic realm="),
            "{credentials:?}: {answer:?}"
        );
        let ev = d.closed_event(c.local_addr().unwrap());
        assert!(lab::daemon::outcome(&ev).contains(reason), "{ev}");
    }
    let (answer, c) = ask(&t, PROXY4, &head(Some("alice:open sesame")));
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    drop(c);
    let cacert = origin.cacert();
    let got = curl(
        &t.cl,
        &[
            "-p",
            "-x",
            &format!("http://{PROXY4}"),
            "--proxy-user",
            "alice:open sesame",
            "--cacert",
            cacert,
            "https://app.example.test/",
        ],
    );
    assert_eq!(got.body.trim(), "app-v4", "{}", got.describe());
    let ev = d.closed_event(got.local.expect("curl's own address"));
    assert_eq!(field_str(&ev, "user").as_deref(), Some("alice"), "{ev}");
}

/// A CONNECT client over its limit is reset at once, before its head is
/// read: the limit needs no head, the client is the peer.
#[test]
fn a_connect_client_over_its_limit_is_reset_before_its_head_is_read() {
    let mut lab = ConnectLab::start("connect_limit");
    // Its tunnel open, the client holds its one slot (sessions take slots
    // in the order their tasks run, not the order of accept).
    let (answer, held) = ask(&lab.t, LIMITED4, &connect_head("app.example.test:443"));
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    let over =
        lab::try_connect(&lab.t.cl, sa(LIMITED4), Duration::from_secs(5)).and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(3)))?;
            lab::read_some(&mut c, &mut [0u8; 64])
        });
    assert!(
        matches!(&over, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{over:?}"
    );
    lab.d
        .wait_event("the refusal", Duration::from_secs(5), |e| {
            field_str(e, "limit").as_deref() == Some("per-client connection limit")
        });
    // The held tunnel is untouched: still open, nothing to read yet.
    held.set_nonblocking(true).unwrap();
    let still = lab::read_some(&mut &held, &mut [0u8; 1]);
    assert!(
        matches!(&still, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{still:?}"
    );
}

/// Name look-ups are bounded (64 at once, each a thread with its own
/// resolver socket, in the daemon's descriptor budget) also when they time
/// out: a look-up the client gave up on still runs until the resolver does.
/// One client takes at most 8 of them, so that its names that never
/// resolve cannot take every other client's turns. The nameserver here
/// never answers (a socket that never reads), and resolves time out after
/// 200 ms while the resolver waits 30 s: 150 CONNECTs for distinct names
/// from one client leave at most 8 look-up threads.
#[test]
fn name_look_ups_stay_bounded_when_they_time_out() {
    let t = Topo::new("connect_dns_bound");
    let _silent =
        t.px.run(|| std::net::UdpSocket::bind("127.0.0.1:53"))
            .expect("a nameserver socket that never answers");
    let dir = lab::TempDir::new("connect_dns_bound");
    let resolv_conf = dir.join("resolv.conf");
    std::fs::write(
        &resolv_conf,
        "nameserver 127.0.0.1\noptions timeout:30 attempts:1\n",
    )
    .unwrap();
    let policy = json!({
        "intercept": [
            { "name": "explicit", "upstream": "direct",
              "connect": { "listen": [PROXY4], "clients": ["198.51.100.0/24"],
                           "resolve_timeout": "200ms" } }
        ],
        "upstreams": { "direct": { "original_destination": true } }
    });
    let d = Daemon::start_with_resolver(&t.px, &policy, &[], &resolv_conf);
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .unwrap()
            .count()
    };
    let before = threads();
    std::thread::scope(|scope| {
        let asking: Vec<_> = (0..150)
            .map(|i| {
                let t = &t;
                scope.spawn(move || {
                    let head = connect_head(&format!("n{i}.slow.example.test:443"));
                    ask(t, PROXY4, &head).0
                })
            })
            .collect();
        for asked in asking {
            let status = asked.join().unwrap();
            assert!(status.contains(" 504 "), "{status}");
        }
    });
    let after = threads();
    // A few more for other blocking work the daemon may start meanwhile.
    assert!(
        after <= before + l4proxy::lookup::MAX_RESOLVING_PER_CLIENT + 4,
        "{after} threads, {before} before one client's 150 look-ups that timed out"
    );
}

/// A name whose first two addresses (one of each family) never answer: an
/// attempt has half the connect timeout while other addresses wait, so the
/// third is reached in time (with both silent ones holding the whole
/// deadline, it was started with none left).
#[test]
fn two_silent_addresses_in_front_do_not_hold_out_the_third() {
    let t = Topo::new("connect_silent");
    t.sv.addr("to-px", "203.0.113.200/24");
    // Nothing has 203.0.113.9 or 2001:db8:5::77: no neighbour answers, and a
    // connect to either is silent for seconds. .9 also shares the longer
    // prefix with px's 203.0.113.1, so address sorting keeps it first.
    let dns = lab::origin::resolver(
        &t,
        &[
            ("silent.example.test", &["203.0.113.9", "2001:db8:5::77"]),
            ("silent.example.test", &["203.0.113.200"]),
        ],
    );
    let _good = Server::start(
        &t.sv,
        sa("203.0.113.200:8090"),
        handlers::hello_echo("good"),
    );
    let policy = json!({
        "intercept": [ { "name": "explicit", "upstream": "direct",
            "connect": { "listen": [PROXY4], "clients": ["198.51.100.0/24"], "ports": [8090] } } ],
        "upstreams": { "direct": { "original_destination": true } }
    });
    let mut d = Daemon::start_with_resolver(
        &t.px,
        &policy,
        &["--connect-timeout", "2"],
        &lab::origin::resolv_conf(&dns),
    );
    let started = Instant::now();
    let (status, mut c) = ask(&t, PROXY4, &connect_head("silent.example.test:8090"));
    let took = started.elapsed();
    assert_eq!(
        status, "HTTP/1.1 200 Connection established",
        "after {took:?}"
    );
    // The silent ones were tried first, for their half of the timeout; the
    // third before the deadline (the 200 above says so: at the deadline
    // the answer is a 504).
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert_eq!(lab::read_line(&mut c).unwrap(), "good");
    let local = c.local_addr().unwrap();
    lab::finish(&mut c, "the tunnel");
    let ev = d.closed_event(local);
    assert_eq!(
        field_str(&ev, "upstream").as_deref(),
        Some("203.0.113.200:8090"),
        "{ev}"
    );
}

/// Names are looked up as given, never under resolv.conf's search domains:
/// a name the rule allows that does not exist does not become one under a
/// local domain (where a wildcard would answer; an exact record stands in
/// for it here).
#[test]
fn names_are_not_looked_up_under_search_domains() {
    let t = Topo::new("connect_search");
    let _dns = lab::origin::resolver(
        &t,
        &[
            ("nx.partner.test.corp.example.test", &["203.0.113.2"]),
            ("ok.partner.test", &["203.0.113.2"]),
        ],
    );
    let server = Server::start(
        &t.sv,
        sa("203.0.113.2:8090"),
        handlers::hello_echo("internal"),
    );
    let dir = TempDir::new("connect_search");
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "nameserver {}\nsearch corp.example.test\noptions timeout:3 attempts:1\n",
            lab::origin::RESOLVER
        ),
    )
    .unwrap();
    let policy = json!({
        "intercept": [ { "name": "explicit", "upstream": "direct",
            "connect": { "listen": [PROXY4], "names": ["*.partner.test"], "ports": [8090] } } ],
        "upstreams": { "direct": { "original_destination": true } }
    });
    let _d = Daemon::start_with_resolver(&t.px, &policy, &[], &resolv);
    // The resolver answers for a name that exists.
    let (status, mut c) = ask(&t, PROXY4, &connect_head("ok.partner.test:8090"));
    assert_eq!(status, "HTTP/1.1 200 Connection established");
    assert_eq!(lab::read_line(&mut c).unwrap(), "internal");
    lab::finish(&mut c, "ok.partner.test");
    let (status, _c) = ask(&t, PROXY4, &connect_head("nx.partner.test:8090"));
    assert!(status.starts_with("HTTP/1.1 502 "), "{status}");
    assert_eq!(
        server.accepted().len(),
        1,
        "only the first tunnel reached it"
    );
}
