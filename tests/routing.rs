//! Routing by what the client says: the daemon peeks at the first bytes of a
//! connection (TLS ClientHello: SNI and offered ALPN; HTTP/1.x: Host) and
//! picks a route's upstream, else the intercept rule's default, else closes
//! (TLS: reset, HTTP: 503, other: close).
//!
//! Real peers: nginx upstreams with self-signed certificates made per test,
//! curl and `openssl s_client` clients, all inside the lab's namespaces (see
//! lab/tls.rs). A client that verifies the certificate of the server it was
//! meant to reach (`--cacert`, never `-k`) proves which server answered, and
//! each server also answers with its own body.

mod lab;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use lab::TempDir;
use lab::daemon::{field, field_str, message};
use lab::tls::{self, Cert, Curl, Nginx, Site};
use lab::{Daemon, Server, Topo, connect, sa};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// The policy and the servers behind it
// ---------------------------------------------------------------------------

const A: &str = "203.0.113.2:8443";
const A_H2: &str = "203.0.113.2:8444";
const B: &str = "203.0.113.3:8443";
const FALLBACK: &str = "203.0.113.2:9443";
const A6: &str = "[2001:db8:5::2]:8443";
const B6: &str = "[2001:db8:5::3]:8443";
const WEB: &str = "203.0.113.2:8080";
const WEB_DEFAULT: &str = "203.0.113.3:8080";

const SVC4: &str = "192.0.2.10";
const SVC6: &str = "2001:db8:a::10";

/// The policy of these tests (the spec's example, with distinctive names so
/// that log fields and `explain` output can be matched without ambiguity).
fn policy() -> Value {
    json!({
        "intercept": [
            { "name": "https", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [443], "upstream": "pool-fallback" },
            { "name": "http", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80] },
            { "name": "http-alt", "prefixes": ["192.0.2.0/24"], "ports": [8080], "upstream": "pool-web-default" }
        ],
        "routes": [
            { "name": "h2-a", "match": { "sni": ["a.example.com"], "alpn": ["h2"] }, "upstream": "pool-a-h2" },
            { "name": "blocked", "match": { "sni": ["blocked.example.com"] }, "reject": true },
            { "name": "sni-a6", "match": { "destination": ["2001:db8:a::/64"], "sni": ["a.example.com"] }, "upstream": "pool-a6" },
            { "name": "sni-a", "match": { "sni": ["a.example.com"] }, "upstream": "pool-a" },
            { "name": "sni-b6", "match": { "destination": ["2001:db8:a::/64"], "sni": ["*.b.example.com"] }, "upstream": "pool-b6" },
            { "name": "sni-b", "match": { "sni": ["*.b.example.com"] }, "upstream": "pool-b" },
            { "name": "sni-mixed", "match": { "sni": ["mixed.example.com"] }, "upstream": "pool-b" },
            { "name": "http-on-443", "match": { "intercept": ["https"], "protocol": "http" }, "reject": true },
            { "name": "host-www", "match": { "host": ["www.example.com"] }, "upstream": "pool-web" }
        ],
        "upstreams": {
            "pool-a": { "servers": [A] },
            "pool-a-h2": { "servers": [A_H2] },
            "pool-b": { "servers": [B] },
            "pool-fallback": { "servers": [FALLBACK] },
            "pool-a6": { "servers": [A6] },
            "pool-b6": { "servers": [B6] },
            "pool-web": { "servers": [WEB] },
            "pool-web-default": { "servers": [WEB_DEFAULT] }
        }
    })
}

/// Self-signed certificates, one per server identity.
struct Certs {
    _dir: TempDir,
    a: Cert,
    b: Cert,
    fallback: Cert,
}

impl Certs {
    fn new() -> Certs {
        let dir = TempDir::new("routing-certs");
        let a = tls::make_cert(&dir, "a", "a.example.com", &["DNS:a.example.com"]);
        let b = tls::make_cert(
            &dir,
            "b",
            "x.b.example.com",
            &["DNS:x.b.example.com", "DNS:y.x.b.example.com"],
        );
        let fallback = tls::make_cert(
            &dir,
            "fallback",
            "fallback.example.com",
            &[
                "DNS:c.example.com",
                "DNS:b.example.com",
                // The rejected name too: a relay there would succeed, so
                // that a failing client shows the rejection.
                "DNS:blocked.example.com",
                "IP:192.0.2.10",
                "IP:2001:db8:a::10",
            ],
        );
        Certs {
            _dir: dir,
            a,
            b,
            fallback,
        }
    }

    fn path(cert: &Cert) -> String {
        cert.cert.display().to_string()
    }
}

/// Every upstream of `policy()` as an nginx site in `sv`.
fn start_upstreams(t: &Topo, c: &Certs) -> Nginx {
    Nginx::start(
        &t.sv,
        &[
            Site::tls(A, &c.a, "server-a"),
            Site::h2(A_H2, &c.a, "server-a-h2"),
            Site::tls(B, &c.b, "server-b"),
            Site::tls(FALLBACK, &c.fallback, "server-fallback"),
            Site::tls(A6, &c.a, "server-a6"),
            Site::tls(B6, &c.b, "server-b6"),
            Site::plain(WEB, "server-web"),
            Site::plain(WEB_DEFAULT, "server-web-default"),
        ],
    )
}

/// Namespaces, certificates, nginx upstreams and the daemon, torn down in
/// reverse order (daemon, nginx, certificates, namespaces).
struct Lab {
    d: Daemon,
    nginx: Nginx,
    certs: Certs,
    t: Topo,
}

impl Lab {
    fn new(test: &str) -> Lab {
        tls::require_tools();
        let t = Topo::new(test);
        let certs = Certs::new();
        let nginx = start_upstreams(&t, &certs);
        let d = Daemon::start_ready(&t.px, &policy(), &[]);
        Lab { d, nginx, certs, t }
    }

    fn curl(&self, args: &[&str]) -> Curl {
        tls::curl(&self.t.cl, args)
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `--resolve NAME:PORT:ADDR` for `ip` (IPv6 in brackets).
fn resolve(name: &str, port: u16, ip: &str) -> String {
    if ip.contains(':') {
        format!("{name}:{port}:[{ip}]")
    } else {
        format!("{name}:{port}:{ip}")
    }
}

/// curl over HTTPS to `https://NAME/` resolved to `ip`, trusting only
/// `cacert`, with extra `args` (e.g. `--http1.1`).
fn curl_https(lab: &Lab, name: &str, ip: &str, cacert: &Cert, args: &[&str]) -> Curl {
    let resolve = resolve(name, 443, ip);
    let cacert = Certs::path(cacert);
    let url = format!("https://{name}/");
    let mut full = vec!["--resolve", resolve.as_str(), "--cacert", cacert.as_str()];
    full.extend_from_slice(args);
    full.push(url.as_str());
    lab.curl(&full)
}

/// Asserts a curl run succeeded with status 200, a verified certificate and
/// body `want`; panics with curl's and nginx's output otherwise (the daemon's
/// log is printed by its Drop).
fn assert_reached(lab: &Lab, what: &str, c: &Curl, want: &str) {
    assert!(
        c.out.success(),
        "{what}: curl failed (expected to reach {want} with a verified certificate)\n{}\n{}",
        c.describe(),
        lab.nginx.logs()
    );
    assert_eq!(
        c.http_code,
        Some(200),
        "{what}: HTTP status\n{}",
        c.describe()
    );
    assert_eq!(
        c.body.trim(),
        want,
        "{what}: reached the wrong server\n{}\n{}",
        c.describe(),
        lab.nginx.logs()
    );
}

/// Like `assert_reached`, for HTTPS: also the certificate verified.
fn assert_reached_tls(lab: &Lab, what: &str, c: &Curl, want: &str) {
    assert_reached(lab, what, c, want);
    assert_eq!(
        c.ssl_verify_result,
        Some(0),
        "{what}: certificate verification result\n{}",
        c.describe()
    );
}

/// Waits for the `connection closed` event of the client at `client`.
fn closed_event(d: &mut Daemon, client: SocketAddr) -> Value {
    let want = client.to_string();
    d.wait_event(
        &format!("`connection closed` for client {want}"),
        Duration::from_secs(10),
        |e| {
            message(e) == Some("connection closed")
                && field_str(e, "client").as_deref() == Some(want.as_str())
        },
    )
}

/// The `connection closed` event of a curl run (its local address).
fn closed_event_of(lab: &mut Lab, c: &Curl) -> Value {
    let client = c.local.unwrap_or_else(|| {
        panic!(
            "curl did not report its local address (-w %{{local_ip}} %{{local_port}})\n{}",
            c.describe()
        )
    });
    closed_event(&mut lab.d, client)
}

/// Words of a text: runs of alphanumerics, `-`, `_`, `.`, `/` (so that
/// `pool-a` is not found inside `pool-a-h2`, whatever the output format).
fn words(text: &str) -> Vec<String> {
    text.split(|ch: char| !(ch.is_ascii_alphanumeric() || "-_./*".contains(ch)))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

fn has_word(text: &str, word: &str) -> bool {
    words(text).iter().any(|w| w == word)
}

/// Asserts the event's string field `name` equals `want`.
fn assert_field(ev: &Value, name: &str, want: &str) {
    assert_eq!(
        field_str(ev, name).as_deref(),
        Some(want),
        "field `{name}` of the `connection closed` event {ev}"
    );
}

/// Which route decided a connection, read from its `connection closed`
/// event: the spec'd `route` field (a route name or `default`), or the
/// decision sentence the daemon writes (`routes[3] ("sni-a") matched`, `no
/// route matched; default of intercept rule "https"`, in `route` or
/// `decision`). The behaviour tests check the decision with this; the exact
/// log format is checked by `closed_log_fields_per_spec` alone.
fn route_of(ev: &Value) -> Option<String> {
    let text = field_str(ev, "route").or_else(|| field_str(ev, "decision"))?;
    if let Some(start) = text.find("(\"") {
        let rest = &text[start + 2..];
        if let Some(end) = rest.find("\")") {
            return Some(rest[..end].to_owned());
        }
    }
    if text.contains("default of intercept rule") {
        return Some("default".to_owned());
    }
    Some(text)
}

/// Asserts the connection was decided by `route` (a name or `default`).
fn assert_route(ev: &Value, route: &str) {
    assert_eq!(
        route_of(ev).as_deref(),
        Some(route),
        "route that decided the connection, from its `connection closed` event {ev}"
    );
}

/// Asserts the event has no (non-null) field `name`.
fn assert_no_field(ev: &Value, name: &str) {
    let v = field(ev, name);
    assert!(
        v.is_none() || v == Some(&Value::Null),
        "field `{name}` should be absent from the `connection closed` event (nothing was \
         offered): {ev}"
    );
}

/// Every JSON event of the daemon whose text mentions `needle`.
fn events_mentioning(d: &Daemon, needle: &str) -> Vec<Value> {
    d.events()
        .into_iter()
        .filter(|e| e.to_string().contains(needle))
        .collect()
}

/// Waits (10 s) until the close line of a connection mentioning `needle`
/// is logged (a connection's last line), and returns every event that
/// mentions it.
fn wait_events_mentioning(d: &mut Daemon, needle: &str, what: &str) -> Vec<Value> {
    let n = needle.to_owned();
    d.wait_event(what, Duration::from_secs(10), move |e| {
        message(e) == Some("connection closed") && e.to_string().contains(&n)
    });
    events_mentioning(d, needle)
}

/// Reads until the peer closes: the bytes, and how it ended (Ok = FIN, Err =
/// reset or timeout).
fn read_until_closed(s: &mut TcpStream, timeout: Duration) -> (Vec<u8>, io::Result<()>) {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match lab::read_some(s, &mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// For a daemon whose client trickles its hello: thousands of pauses take
/// seconds on a loaded machine, and the sniff deadline is not what those
/// tests are about.
const TRICKLE_FLAGS: &[&str] = &["--sniff-timeout", "60"];

/// Writes `data` in pieces of `chunk` bytes, each its own segment
/// (TCP_NODELAY) with `pause` in between.
fn trickle(s: &mut TcpStream, data: &[u8], chunk: usize, pause: Duration) -> io::Result<()> {
    s.set_nodelay(true)?;
    for piece in data.chunks(chunk) {
        s.write_all(piece)?;
        std::thread::sleep(pause);
    }
    Ok(())
}

/// An in-process upstream: reads everything to EOF, reports the exact bytes,
/// then answers `reply\n` and closes.
type Recorded = Receiver<io::Result<Vec<u8>>>;

fn recording_server(t: &Topo, addr: &str, reply: &str) -> (Server, Recorded) {
    let (tx, rx): (Sender<io::Result<Vec<u8>>>, _) = mpsc::channel();
    let tx = Mutex::new(tx);
    let reply = format!("{reply}\n");
    let srv = Server::start(&t.sv, sa(addr), move |mut s: TcpStream| {
        let mut got = Vec::new();
        let res = s.read_to_end(&mut got).map(|_| got);
        let ok = res.is_ok();
        let _ = tx.lock().unwrap().send(res);
        if ok {
            let _ = s.write_all(reply.as_bytes());
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    (srv, rx)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/sniff/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()))
}

/// First index where two byte strings differ, for messages.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}"),
        None => format!(
            "one is a prefix of the other ({} vs {} bytes)",
            a.len(),
            b.len()
        ),
    }
}

// ---------------------------------------------------------------------------
// 0. Control: the real peers work without the proxy
// ---------------------------------------------------------------------------

/// Control for the lab itself, no daemon: curl and s_client in `cl` reach
/// the nginx upstreams in `sv` directly (routed through px), certificates
/// verify, HTTP/2 is negotiated with the h2 server, and a captured
/// ClientHello carries the name. Without it a broken lab would look like a
/// daemon bug.
#[test]
fn lab_control_real_peers_without_proxy() {
    tls::require_tools();
    let t = Topo::new("rt_ctl");
    let certs = Certs::new();
    let nginx = start_upstreams(&t, &certs);
    let ca_a = Certs::path(&certs.a);
    let ca_b = Certs::path(&certs.b);

    let c = tls::curl(
        &t.cl,
        &[
            "--http1.1",
            "--resolve",
            "a.example.com:8443:203.0.113.2",
            "--cacert",
            &ca_a,
            "https://a.example.com:8443/",
        ],
    );
    assert!(
        c.out.success() && c.body.trim() == "server-a" && c.ssl_verify_result == Some(0),
        "direct curl to server A\n{}\n{}",
        c.describe(),
        nginx.logs()
    );
    assert!(c.local.is_some_and(|l| l.ip() == sa("198.51.100.2:1").ip()));

    // The wrong CA must fail: proves --cacert is what decides.
    let c = tls::curl(
        &t.cl,
        &[
            "--resolve",
            "a.example.com:8443:203.0.113.2",
            "--cacert",
            &ca_b,
            "https://a.example.com:8443/",
        ],
    );
    assert!(
        !c.out.success(),
        "curl must refuse server A's certificate when trusting only B's\n{}",
        c.describe()
    );

    let c = tls::curl(
        &t.cl,
        &[
            "--http2",
            "--resolve",
            "a.example.com:8444:203.0.113.2",
            "--cacert",
            &ca_a,
            "https://a.example.com:8444/",
        ],
    );
    assert!(
        c.out.success() && c.body.trim() == "server-a-h2" && c.http_version.as_deref() == Some("2"),
        "direct curl --http2 to the h2 server\n{}\n{}",
        c.describe(),
        nginx.logs()
    );

    let c = tls::curl(
        &t.cl,
        &[
            "--resolve",
            "x.b.example.com:8443:[2001:db8:5::3]",
            "--cacert",
            &ca_b,
            "https://x.b.example.com:8443/",
        ],
    );
    assert!(
        c.out.success() && c.body.trim() == "server-b6",
        "direct curl to server B6\n{}\n{}",
        c.describe(),
        nginx.logs()
    );

    let c = tls::curl(
        &t.cl,
        &["-H", "Host: www.example.com", "http://203.0.113.2:8080/"],
    );
    assert!(
        c.out.success() && c.body.trim() == "server-web",
        "direct curl to the web server\n{}",
        c.describe()
    );

    let out = tls::s_client(
        &t.cl,
        &[
            "-connect",
            "203.0.113.2:8443",
            "-noservername",
            "-CAfile",
            &ca_a,
            "-verify_return_error",
        ],
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.stdout.contains("Verify return code: 0 (ok)") && out.stdout.contains("server-a\n"),
        "direct s_client to server A\n{}",
        out.describe()
    );
    let log = nginx.requests_on(A);
    assert!(
        log.iter().any(|l| l.contains("sni=a.example.com"))
            && log.iter().any(|l| l.contains("sni=- ")),
        "nginx access log of A should show the SNI request and the no-SNI one: {log:?}"
    );

    let hello = tls::capture_client_hello(&t.cl, &["-servername", "a.example.com"]);
    assert!(
        hello.windows(13).any(|w| w == b"a.example.com"),
        "captured ClientHello should carry the name ({} bytes)",
        hello.len()
    );
}

// ---------------------------------------------------------------------------
// 1. SNI
// ---------------------------------------------------------------------------

/// Two SNI names reach two servers; the wildcard `*.b.example.com` matches
/// one label and several, but not `b.example.com` itself. The daemon logs
/// the route and the SNI.
fn sni_two_servers(test: &str, svc: &str, want_a: &str, want_b: &str, routes: (&str, &str)) {
    let mut lab = Lab::new(test);
    let (route_a, route_b) = routes;

    let c = curl_https(&lab, "a.example.com", svc, &lab.certs.a, &["--http1.1"]);
    assert_reached_tls(&lab, "a.example.com", &c, want_a);
    let ev = closed_event_of(&mut lab, &c);
    assert_route(&ev, route_a);
    assert_field(&ev, "sni", "a.example.com");

    for name in ["x.b.example.com", "y.x.b.example.com"] {
        let c = curl_https(&lab, name, svc, &lab.certs.b, &["--http1.1"]);
        assert_reached_tls(&lab, name, &c, want_b);
        let ev = closed_event_of(&mut lab, &c);
        assert_route(&ev, route_b);
        assert_field(&ev, "sni", name);
    }

    // `*.b.example.com` needs at least one label before b.example.com.
    let c = curl_https(
        &lab,
        "b.example.com",
        svc,
        &lab.certs.fallback,
        &["--http1.1"],
    );
    assert_reached_tls(
        &lab,
        "b.example.com (not matched by *.b.example.com)",
        &c,
        "server-fallback",
    );
    let ev = closed_event_of(&mut lab, &c);
    assert_route(&ev, "default");

    // nginx saw the names the client sent (the ClientHello arrived whole).
    let on_a = lab
        .nginx
        .requests_on(if svc.contains(':') { A6 } else { A });
    assert!(
        on_a.iter().any(|l| l.contains("sni=a.example.com")),
        "server A should log a request with SNI a.example.com: {on_a:?}"
    );
}

#[test]
fn sni_routes_to_two_servers_v4() {
    sni_two_servers("sni_v4", SVC4, "server-a", "server-b", ("sni-a", "sni-b"));
}

/// The same over IPv6: 2001:db8:a::10 to the IPv6 upstreams (routes with a
/// `destination` condition).
#[test]
fn sni_routes_to_two_servers_v6() {
    sni_two_servers(
        "sni_v6",
        SVC6,
        "server-a6",
        "server-b6",
        ("sni-a6", "sni-b6"),
    );
}

/// SNI matching ignores case and a trailing dot: `openssl s_client
/// -servername A.Example.COM.` reaches server A (verified against A's
/// certificate only).
#[test]
fn sni_case_insensitive_trailing_dot() {
    let lab = Lab::new("sni_case");
    let connect = format!("{SVC4}:443");
    let ca = Certs::path(&lab.certs.a);
    let out = tls::s_client(
        &lab.t.cl,
        &[
            "-connect",
            &connect,
            "-servername",
            "A.Example.COM.",
            "-CAfile",
            &ca,
            "-verify_return_error",
            "-alpn",
            "http/1.1",
        ],
        b"GET / HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.stdout.contains("Verify return code: 0 (ok)") && out.stdout.contains("server-a\n"),
        "s_client -servername A.Example.COM. should reach server A with A's certificate\n{}\n{}",
        out.describe(),
        lab.nginx.logs()
    );
}

// ---------------------------------------------------------------------------
// 2. Default
// ---------------------------------------------------------------------------

/// An unknown name and a ClientHello without SNI (s_client -noservername;
/// curl to an IP literal) take the rule's default upstream.
#[test]
fn default_for_unknown_name_and_no_sni() {
    let mut lab = Lab::new("default");

    let c = curl_https(
        &lab,
        "c.example.com",
        SVC4,
        &lab.certs.fallback,
        &["--http1.1"],
    );
    assert_reached_tls(&lab, "unknown name c.example.com", &c, "server-fallback");
    let ev = closed_event_of(&mut lab, &c);
    assert_route(&ev, "default");
    assert_field(&ev, "sni", "c.example.com");
    assert_field(&ev, "upstream", FALLBACK);

    // curl sends no SNI to an IP literal (RFC 6066); the certificate's IP
    // SAN is what it verifies.
    for (ip, url) in [
        (SVC4, format!("https://{SVC4}/")),
        (SVC6, format!("https://[{SVC6}]/")),
    ] {
        let ca = Certs::path(&lab.certs.fallback);
        let c = lab.curl(&["--http1.1", "--cacert", &ca, &url]);
        assert_reached_tls(
            &lab,
            &format!("IP literal {ip}, no SNI"),
            &c,
            "server-fallback",
        );
        let ev = closed_event_of(&mut lab, &c);
        assert_route(&ev, "default");
        assert_no_field(&ev, "sni");
    }

    let connect = format!("{SVC4}:443");
    let ca = Certs::path(&lab.certs.fallback);
    let out = tls::s_client(
        &lab.t.cl,
        &[
            "-connect",
            &connect,
            "-noservername",
            "-CAfile",
            &ca,
            "-verify_return_error",
        ],
        b"GET / HTTP/1.1\r\nHost: 192.0.2.10\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.stdout.contains("Verify return code: 0 (ok)")
            && out.stdout.contains("server-fallback\n"),
        "s_client -noservername should reach the fallback server with its certificate\n{}\n{}",
        out.describe(),
        lab.nginx.logs()
    );
}

// ---------------------------------------------------------------------------
// 3. ALPN
// ---------------------------------------------------------------------------

/// curl --http2 offers h2 and http/1.1 and is routed to the h2 server (and
/// speaks HTTP/2 to it); curl --http1.1 offers only http/1.1 and reaches the
/// plain A server. Same name, same certificate, different bodies.
#[test]
fn alpn_h2_and_http11_routed_apart() {
    let mut lab = Lab::new("alpn");

    let c = curl_https(&lab, "a.example.com", SVC4, &lab.certs.a, &["--http2"]);
    assert_reached_tls(&lab, "--http2 (offers h2)", &c, "server-a-h2");
    assert_eq!(
        c.http_version.as_deref(),
        Some("2"),
        "--http2 through the proxy should negotiate HTTP/2 with the h2 server\n{}",
        c.describe()
    );
    let ev = closed_event_of(&mut lab, &c);
    assert_route(&ev, "h2-a");

    let c = curl_https(&lab, "a.example.com", SVC4, &lab.certs.a, &["--http1.1"]);
    assert_reached_tls(&lab, "--http1.1 (offers only http/1.1)", &c, "server-a");
    assert_eq!(c.http_version.as_deref(), Some("1.1"), "{}", c.describe());
    let ev = closed_event_of(&mut lab, &c);
    assert_route(&ev, "sni-a");
}

// ---------------------------------------------------------------------------
// The `connection closed` line
// ---------------------------------------------------------------------------

/// The per-connection `connection closed` log line as specified: `route` is
/// the route's name or `default` (also for a rejected connection), and,
/// when known, `sni`, `alpn` (the list the client offered) and `host`.
#[test]
fn closed_log_fields_per_spec() {
    let mut lab = Lab::new("closed_fields");

    let c = curl_https(&lab, "a.example.com", SVC4, &lab.certs.a, &["--http2"]);
    assert_reached_tls(&lab, "--http2", &c, "server-a-h2");
    let ev = closed_event_of(&mut lab, &c);
    assert_field(&ev, "route", "h2-a");
    assert_field(&ev, "sni", "a.example.com");
    let alpn = field_str(&ev, "alpn").unwrap_or_default();
    assert!(
        has_word(&alpn, "h2") && has_word(&alpn, "http/1.1"),
        "`alpn` should list what curl --http2 offered (h2, http/1.1): {ev}"
    );

    let c = curl_https(&lab, "a.example.com", SVC4, &lab.certs.a, &["--http1.1"]);
    assert_reached_tls(&lab, "--http1.1", &c, "server-a");
    let ev = closed_event_of(&mut lab, &c);
    assert_field(&ev, "route", "sni-a");
    let alpn = field_str(&ev, "alpn").unwrap_or_default();
    assert!(
        has_word(&alpn, "http/1.1") && !has_word(&alpn, "h2"),
        "`alpn` should list only http/1.1 for curl --http1.1: {ev}"
    );

    let c = curl_https(
        &lab,
        "c.example.com",
        SVC4,
        &lab.certs.fallback,
        &["--http1.1"],
    );
    assert_reached_tls(&lab, "unknown name", &c, "server-fallback");
    let ev = closed_event_of(&mut lab, &c);
    assert_field(&ev, "route", "default");
    assert_field(&ev, "sni", "c.example.com");

    let url = format!("http://{SVC4}/");
    let c = lab.curl(&["-H", "Host: www.example.com:80", &url]);
    assert_reached(&lab, "Host www.example.com:80", &c, "server-web");
    let ev = closed_event_of(&mut lab, &c);
    assert_field(&ev, "route", "host-www");
    assert_field(&ev, "host", "www.example.com");
    assert_no_field(&ev, "sni");

    let c = curl_https(
        &lab,
        "blocked.example.com",
        SVC4,
        &lab.certs.fallback,
        &["--http1.1"],
    );
    assert!(
        !c.out.success(),
        "blocked.example.com must fail\n{}",
        c.describe()
    );
    let ev = lab.d.wait_event(
        "`connection closed` with sni blocked.example.com",
        Duration::from_secs(10),
        |e| {
            message(e) == Some("connection closed")
                && field_str(e, "sni").as_deref() == Some("blocked.example.com")
        },
    );
    assert_field(&ev, "route", "blocked");
}

// ---------------------------------------------------------------------------
// 4, 5. Host
// ---------------------------------------------------------------------------

/// Plain HTTP/1.1 routed by Host, case-insensitive and with the port
/// stripped; an unknown host on a rule with a default goes there.
#[test]
fn host_routing_plain_http() {
    let mut lab = Lab::new("host");
    let url80 = format!("http://{SVC4}/");
    let url8080 = format!("http://{SVC4}:8080/");
    for (host, url) in [
        ("www.example.com", &url80),
        ("www.example.com:80", &url80),
        ("WWW.Example.COM", &url80),
        ("www.example.com:8080", &url8080),
    ] {
        let h = format!("Host: {host}");
        let c = lab.curl(&["-H", &h, url]);
        assert_reached(&lab, &format!("{url} with {h}"), &c, "server-web");
        let ev = closed_event_of(&mut lab, &c);
        assert_route(&ev, "host-www");
        assert_eq!(
            field_str(&ev, "host").as_deref(),
            Some("www.example.com"),
            "`host` of the `connection closed` event for {h}: {ev}"
        );
    }

    let c = lab.curl(&["-H", "Host: other.example.com", &url8080]);
    assert_reached(
        &lab,
        "unknown host on the rule with a default",
        &c,
        "server-web-default",
    );
    let ev = closed_event_of(&mut lab, &c);
    assert_route(&ev, "default");
}

/// HTTP with no route and no default: `503 Service Unavailable`, then the
/// connection is closed; no upstream is contacted; the refusal is logged.
#[test]
fn http_without_route_or_default_gets_503() {
    let mut lab = Lab::new("http503");
    let url = format!("http://{SVC4}/");
    let c = lab.curl(&["-H", "Host: other.example.com", &url]);
    assert_eq!(
        c.http_code,
        Some(503),
        "curl should see 503 for an HTTP request no route takes\n{}",
        c.describe()
    );
    closed_without_route(&mut lab, &c);

    // The exact response, then the close (raw socket, HTTP/1.1 keep-alive
    // request: the close must come from the proxy). The request has a body
    // the proxy never reads, and the client reads only once the proxy has
    // answered and closed: a close with the body unread would be a reset,
    // which the client would see instead of the end (RFC 9112, 9.6).
    let mut s = connect(&lab.t.cl, sa(&format!("{SVC4}:80")));
    let client = s.local_addr().unwrap();
    let body = "x".repeat(2000);
    s.write_all(
        format!(
            "POST / HTTP/1.1\r\nHost: nobody.example.com\r\nUser-Agent: test\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (got, end) = read_until_closed(&mut s, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "response to an unroutable HTTP request: {text:?} (end: {end:?})"
    );
    assert!(
        end.is_ok(),
        "after the 503 the proxy should close the connection, got {end:?} after {text:?}"
    );
    // Linux shows a reset that comes after the FIN only as the socket's
    // error (EPIPE); other stacks drop the unread answer.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.take_error().unwrap().is_none(),
        "the proxy reset the connection after its 503"
    );
    let ev = lab.d.closed_event(client);
    assert_eq!(
        field_str(&ev, "outcome").as_deref(),
        Some("no_route"),
        "{ev}"
    );
    let web = lab.nginx.requests_on(WEB);
    let web_default = lab.nginx.requests_on(WEB_DEFAULT);
    assert!(
        web.is_empty() && web_default.is_empty(),
        "no upstream should have been asked: web {web:?}, web-default {web_default:?}"
    );
}

/// The close line of curl's connection, which no route took.
fn closed_without_route(lab: &mut Lab, c: &Curl) -> Value {
    let ev = closed_event_of(lab, c);
    assert_eq!(
        field_str(&ev, "outcome").as_deref(),
        Some("no_route"),
        "{ev}"
    );
    ev
}

/// A Host that is not a host name (`x!.www.example.com`, which nginx would
/// still serve from a `*.www.example.com` server) is not an HTTP request
/// without a name: it is `"other"`, which routes that reject by name should
/// reject too. On a rule without a default it is closed, not answered 503.
#[test]
fn a_host_that_is_not_a_name_is_other() {
    let mut lab = Lab::new("badhost");
    let url = format!("http://{SVC4}/");
    let c = lab.curl(&["-H", "Host: x!.www.example.com", &url]);
    assert!(
        c.http_code.is_none() && !c.out.success(),
        "no HTTP answer for a Host that is not a name\n{}",
        c.describe()
    );
    let ev = closed_without_route(&mut lab, &c);
    assert_eq!(field_str(&ev, "host"), None, "{ev}");
    assert!(
        lab.nginx.requests_on(WEB).is_empty(),
        "no upstream is contacted"
    );
}

// ---------------------------------------------------------------------------
// Reject and reset
// ---------------------------------------------------------------------------

/// A `reject` route: the TLS client fails, no upstream is contacted, and the
/// route is logged.
#[test]
fn reject_route_closes_without_upstream() {
    let mut lab = Lab::new("reject");
    let c = curl_https(
        &lab,
        "blocked.example.com",
        SVC4,
        &lab.certs.fallback,
        &["--http1.1"],
    );
    assert!(
        !c.out.success() && c.http_code.is_none(),
        "a rejected TLS connection must not get an answer\n{}",
        c.describe()
    );
    let blocked = wait_events_mentioning(
        &mut lab.d,
        "blocked.example.com",
        "an event for the rejected SNI blocked.example.com",
    );
    let closed = blocked
        .iter()
        .find(|e| message(e) == Some("connection closed"))
        .unwrap_or_else(|| panic!("a `connection closed` event: {blocked:#?}"));
    assert_eq!(route_of(closed).as_deref(), Some("blocked"), "{closed}");
    assert_eq!(
        field_str(closed, "outcome").as_deref(),
        Some("refused"),
        "{closed}"
    );
    assert_no_field(closed, "upstream");
    let log = lab.nginx.access_log();
    assert!(
        log.is_empty(),
        "no upstream should have served the rejected connection: {log:?}"
    );
}

/// A `reject` route for plain HTTP sent to the TLS port (`"protocol":
/// "http"`): the client gets `503 Service Unavailable`, even with a Host
/// another route would take, and no upstream is contacted.
#[test]
fn reject_plain_http_on_tls_port_gets_503() {
    let mut lab = Lab::new("reject_http");
    let mut s = connect(&lab.t.cl, sa(&format!("{SVC4}:443")));
    let client = s.local_addr().unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        .unwrap();
    let (got, end) = read_until_closed(&mut s, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "plain HTTP to port 443 should be rejected by route http-on-443 with a 503: {text:?} \
         (end: {end:?})"
    );
    let evs = wait_events_mentioning(
        &mut lab.d,
        &client.to_string(),
        "an event naming the rejected client",
    );
    assert!(
        evs.iter()
            .any(|e| route_of(e).as_deref() == Some("http-on-443")),
        "the rejection should be logged with route `http-on-443`: {evs:#?}"
    );
    let log = lab.nginx.access_log();
    assert!(
        log.is_empty(),
        "no upstream should have been asked: {log:?}"
    );
}

/// TLS with no route and no default: the client's connection is reset, and
/// nothing reaches any upstream.
#[test]
fn tls_without_route_or_default_is_reset() {
    tls::require_tools();
    let t = Topo::new("tls_reset");
    let (a, a_rx) = recording_server(&t, A, "server-a");
    let policy = json!({
        "intercept": [ { "name": "https", "prefixes": ["192.0.2.0/24"], "ports": [443] } ],
        "routes": [ { "name": "sni-a", "match": { "sni": ["a.example.com"] }, "upstream": "pool-a" } ],
        "upstreams": { "pool-a": { "servers": [A] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);

    for (what, hello) in [
        ("no SNI", fixture("tls13_openssl_no_sni.bin")),
        ("SNI Mixed.Example.COM.", fixture("tls13_openssl.bin")),
    ] {
        let mut s = connect(&t.cl, sa(&format!("{SVC4}:443")));
        let client = s.local_addr().unwrap();
        s.write_all(&hello).unwrap();
        let (got, end) = read_until_closed(&mut s, Duration::from_secs(10));
        assert!(
            got.is_empty(),
            "{what}: nothing should come back, got {} bytes",
            got.len()
        );
        match &end {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!(
                "{what}: a TLS connection without route or default should be reset, got {other:?}"
            ),
        }
        let ev = d.closed_event(client);
        assert_eq!(
            field_str(&ev, "outcome").as_deref(),
            Some("no_route"),
            "{what}: {ev}"
        );
    }
    assert!(
        a.accepted().is_empty(),
        "server A should not have been contacted: {:?}",
        a.accepted()
    );
    assert!(a_rx.try_recv().is_err());
}

// ---------------------------------------------------------------------------
// 6. Fragmented first flights; exact bytes upstream
// ---------------------------------------------------------------------------

/// A real ClientHello (captured from `openssl s_client -servername
/// a.example.com`) written one byte per segment still goes to server A, and
/// server A receives exactly the bytes the client sent.
#[test]
fn client_hello_one_byte_per_write() {
    tls::require_tools();
    let t = Topo::new("hello_bytes");
    let hello = tls::capture_client_hello(
        &t.cl,
        &["-servername", "a.example.com", "-alpn", "http/1.1"],
    );
    let (a, a_rx) = recording_server(&t, A, "server-a");
    let (b, _b_rx) = recording_server(&t, B, "server-b");
    let (fb, _fb_rx) = recording_server(&t, FALLBACK, "server-fallback");
    let (h2, _h2_rx) = recording_server(&t, A_H2, "server-a-h2");
    let mut d = Daemon::start_ready(&t.px, &policy(), TRICKLE_FLAGS);

    let mut s = connect(&t.cl, sa(&format!("{SVC4}:443")));
    let client = s.local_addr().unwrap();
    trickle(&mut s, &hello, 1, Duration::from_millis(2)).expect("writing the ClientHello");
    s.shutdown(Shutdown::Write).unwrap();
    let (reply, end) = read_until_closed(&mut s, Duration::from_secs(15));
    assert!(
        end.is_ok() && reply == b"server-a\n",
        "the byte-by-byte ClientHello for a.example.com should reach server A; client got \
         {:?} then {end:?}; accepted: A {:?}, B {:?}, fallback {:?}, a-h2 {:?}",
        String::from_utf8_lossy(&reply),
        a.accepted(),
        b.accepted(),
        fb.accepted(),
        h2.accepted()
    );
    let got = match a_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(got)) => got,
        other => panic!("server A's report: {other:?}"),
    };
    assert!(
        got == hello,
        "server A should receive exactly the {} bytes the client sent, got {} ({})",
        hello.len(),
        got.len(),
        first_difference(&got, &hello)
    );
    for (name, srv) in [("B", &b), ("fallback", &fb), ("a-h2", &h2)] {
        assert!(
            srv.accepted().is_empty(),
            "server {name} should not be contacted: {:?}",
            srv.accepted()
        );
    }
    let ev = closed_event(&mut d, client);
    assert_route(&ev, "sni-a");
    assert_field(&ev, "sni", "a.example.com");
}

/// A ClientHello of 6 KB split over several TLS records (the sniff fixture,
/// SNI `Mixed.Example.COM.`), written in 7-byte segments: routed by its SNI
/// (case and trailing dot ignored) to server B, which gets every byte.
#[test]
fn multi_record_client_hello_routed() {
    let hello = fixture("tls13_large_multi_record.bin");
    assert_hello_reaches_b("hello_multi", &hello, 7);
}

/// The same ClientHello in records of one byte each (36 KB on the wire),
/// a record per segment, as a client would send it to make the proxy parse
/// it again at every piece: routed as well (the sniffer waits for what the
/// message still lacks, not for each byte).
#[test]
fn client_hello_in_one_byte_records_routed() {
    let mut message = Vec::new();
    let mut records = &fixture("tls13_large_multi_record.bin")[..];
    while let [22, 3, _, hi, lo, rest @ ..] = records {
        let (payload, next) = rest.split_at(usize::from(u16::from_be_bytes([*hi, *lo])));
        message.extend_from_slice(payload);
        records = next;
    }
    assert!(
        records.is_empty() && message.len() > 6000,
        "the fixture's records"
    );
    let hello: Vec<u8> = message.iter().flat_map(|&b| [22, 3, 1, 0, 1, b]).collect();
    assert_hello_reaches_b("hello_tiny", &hello, 6);
}

/// `hello` (SNI `Mixed.Example.COM.`) written in `chunk`-byte segments goes
/// to server B (route sni-mixed), which receives every byte.
fn assert_hello_reaches_b(topo: &str, hello: &[u8], chunk: usize) {
    let t = Topo::new(topo);
    let (a, _a_rx) = recording_server(&t, A, "server-a");
    let (b, b_rx) = recording_server(&t, B, "server-b");
    let (fb, _fb_rx) = recording_server(&t, FALLBACK, "server-fallback");
    let mut d = Daemon::start_ready(&t.px, &policy(), TRICKLE_FLAGS);

    let mut s = connect(&t.cl, sa(&format!("{SVC4}:443")));
    let client = s.local_addr().unwrap();
    trickle(&mut s, hello, chunk, Duration::from_micros(200)).expect("writing the ClientHello");
    s.shutdown(Shutdown::Write).unwrap();
    let (reply, end) = read_until_closed(&mut s, Duration::from_secs(15));
    assert!(
        end.is_ok() && reply == b"server-b\n",
        "the ClientHello for Mixed.Example.COM. should reach server B (route sni-mixed); \
         client got {:?} then {end:?}; accepted: A {:?}, B {:?}, fallback {:?}",
        String::from_utf8_lossy(&reply),
        a.accepted(),
        b.accepted(),
        fb.accepted()
    );
    let got = match b_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(got)) => got,
        other => panic!("server B's report: {other:?}"),
    };
    assert!(
        got == hello,
        "server B should receive exactly the {} bytes the client sent, got {} ({})",
        hello.len(),
        got.len(),
        first_difference(&got, hello)
    );
    let ev = closed_event(&mut d, client);
    assert_route(&ev, "sni-mixed");
}

/// An HTTP request written one byte per segment is routed by its Host, and
/// the web server receives exactly the request.
#[test]
fn http_request_one_byte_per_write() {
    let t = Topo::new("http_bytes");
    let (web, web_rx) = recording_server(&t, WEB, "server-web");
    let mut d = Daemon::start_ready(&t.px, &policy(), TRICKLE_FLAGS);
    let request: &[u8] =
        b"GET /index.html HTTP/1.1\r\nUser-Agent: routing-test\r\nHost: Www.Example.Com:80\r\nAccept: */*\r\n\r\n";

    let mut s = connect(&t.cl, sa(&format!("{SVC4}:80")));
    let client = s.local_addr().unwrap();
    trickle(&mut s, request, 1, Duration::from_millis(2)).expect("writing the request");
    s.shutdown(Shutdown::Write).unwrap();
    let (reply, end) = read_until_closed(&mut s, Duration::from_secs(15));
    assert!(
        end.is_ok() && reply == b"server-web\n",
        "the byte-by-byte request for www.example.com should reach the web server; client got \
         {:?} then {end:?}; web accepted {:?}",
        String::from_utf8_lossy(&reply),
        web.accepted()
    );
    let got = match web_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(got)) => got,
        other => panic!("web server's report: {other:?}"),
    };
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(request),
        "the web server should receive exactly the request"
    );
    let ev = closed_event(&mut d, client);
    assert_route(&ev, "host-www");
}

// ---------------------------------------------------------------------------
// 7. Sniff deadline
// ---------------------------------------------------------------------------

/// A client that says nothing, on a rule with routes only (no default), is
/// closed by the proxy once `--sniff-timeout 1` expires, and the log says it
/// timed out.
#[test]
fn silent_client_closed_after_sniff_timeout() {
    let t = Topo::new("silent");
    let (web, _rx) = recording_server(&t, WEB, "server-web");
    let mut d = Daemon::start_ready(&t.px, &policy(), &["--sniff-timeout", "1"]);

    let started = Instant::now();
    let mut s = connect(&t.cl, sa(&format!("{SVC4}:80")));
    let client = s.local_addr().unwrap();
    let (got, end) = read_until_closed(&mut s, Duration::from_secs(6));
    let took = started.elapsed();
    match &end {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "a silent client should be closed by the proxy after the 1 s sniff deadline; \
             after {took:?} the read ended with {e} (kind {:?})",
            e.kind()
        ),
    }
    assert!(
        got.is_empty(),
        "nothing should be sent to a silent client: {got:?}"
    );
    assert!(
        took >= Duration::from_millis(800) && took <= Duration::from_millis(3500),
        "closed after {took:?}; expected about 1 s (--sniff-timeout 1)"
    );
    assert!(web.accepted().is_empty(), "no upstream should be contacted");

    let evs = wait_events_mentioning(
        &mut d,
        &client.to_string(),
        "an event naming the silent client",
    );
    let says_why = evs.iter().any(|e| {
        let text = e.to_string().to_ascii_lowercase();
        ["timeout", "timed out", "deadline"]
            .iter()
            .any(|w| text.contains(w))
    });
    assert!(
        says_why,
        "the log should say the silent client timed out while sniffing: {evs:#?}"
    );
}

/// A silent client on a rule with a default is relayed to the default once
/// the deadline expires (a server-speaks-first protocol keeps working).
#[test]
fn silent_client_gets_rule_default_after_sniff_timeout() {
    let (t, srv) = Topo::with_echo("silent_def", WEB_DEFAULT, "server-web-default");
    let mut d = Daemon::start_ready(&t.px, &policy(), &["--sniff-timeout", "1"]);

    let started = Instant::now();
    let mut s = connect(&t.cl, sa(&format!("{SVC4}:8080")));
    let client = s.local_addr().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let greeting = lab::read_line(&mut s);
    let took = started.elapsed();
    assert_eq!(
        greeting.as_deref().ok(),
        Some("server-web-default"),
        "a silent client on a rule with a default should be relayed to it after the sniff \
         deadline (waited {took:?}): {greeting:?}"
    );
    assert!(
        took >= Duration::from_millis(800) && took <= Duration::from_millis(3500),
        "relayed after {took:?}; expected about 1 s (--sniff-timeout 1)"
    );
    s.write_all(b"ping\n").unwrap();
    assert_eq!(lab::read_line(&mut s).expect("echo"), "ping");
    s.shutdown(Shutdown::Write).unwrap();
    let _ = read_until_closed(&mut s, Duration::from_secs(5));
    srv.wait_accepted(1, Duration::from_secs(1));
    let ev = closed_event(&mut d, client);
    assert_route(&ev, "default");
}

/// Without `--sniff-timeout`, the deadline is 10 s: a client that waits 3 s
/// before sending its request is still routed by Host.
#[test]
fn default_sniff_timeout_lets_slow_clients_speak() {
    let t = Topo::new("slow_client");
    let (web, web_rx) = recording_server(&t, WEB, "server-web");
    let _d = Daemon::start_ready(&t.px, &policy(), &[]);

    let mut s = connect(&t.cl, sa(&format!("{SVC4}:80")));
    // Silent for 3 s: the read must time out, not see the end. A signal to
    // this test process interrupts a read with a timeout (no restart), so
    // the wait goes on for what is left of the 3 s.
    let silent_until = Instant::now() + Duration::from_secs(3);
    let mut b = [0u8; 1];
    let waited = loop {
        let left = silent_until.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        // Not `lab::read_some`: its retry would wait a whole `left` again.
        match s.read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other,
        }
    };
    match waited {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!(
            "with the default sniff deadline (10 s) a client silent for 3 s must still be \
             open, got {other:?}"
        ),
    }
    let request: &[u8] = b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n";
    s.write_all(request).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (reply, end) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(
        end.is_ok() && reply == b"server-web\n",
        "the late request should reach the web server: got {:?} then {end:?}; web accepted {:?}",
        String::from_utf8_lossy(&reply),
        web.accepted()
    );
    match web_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(got)) => assert_eq!(got, request, "web server received"),
        other => panic!("web server's report: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 8. explain
// ---------------------------------------------------------------------------

/// `l4proxy explain` names the route and upstream a connection would take,
/// exits 0, and sets nothing up (run in an empty namespace, which stays
/// empty).
#[test]
fn explain_names_route_and_upstream() {
    tls::require_tools();
    let ns = lab::Netns::new("explain", "ex");
    let dir = TempDir::new("routing-explain");
    let file = dir.join("policy.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&policy()).unwrap()).unwrap();
    let file = file.display().to_string();

    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["--dst", "192.0.2.10:443", "--sni", "a.example.com"],
            "sni-a",
            "pool-a",
        ),
        (
            &[
                "--dst",
                "192.0.2.10:443",
                "--sni",
                "a.example.com",
                "--alpn",
                "h2",
            ],
            "h2-a",
            "pool-a-h2",
        ),
        (
            &[
                "--dst",
                "192.0.2.10:443",
                "--sni",
                "a.example.com",
                "--alpn",
                "http/1.1",
            ],
            "sni-a",
            "pool-a",
        ),
        (
            &["--dst", "[2001:db8:a::10]:443", "--sni", "a.example.com"],
            "sni-a6",
            "pool-a6",
        ),
        (
            &["--dst", "192.0.2.10:443", "--sni", "y.x.b.example.com"],
            "sni-b",
            "pool-b",
        ),
        (
            &["--dst", "192.0.2.10:443", "--sni", "c.example.com"],
            "default",
            "pool-fallback",
        ),
        (&["--dst", "192.0.2.10:443"], "default", "pool-fallback"),
        (
            &["--dst", "192.0.2.10:80", "--host", "www.example.com"],
            "host-www",
            "pool-web",
        ),
        // As the daemon reads them: a Host with a port and a name with a
        // trailing dot and capitals are the same name.
        (
            &["--dst", "192.0.2.10:80", "--host", "WWW.example.com:8080"],
            "host-www",
            "pool-web",
        ),
        (
            &["--dst", "192.0.2.10:443", "--sni", "A.example.com."],
            "sni-a",
            "pool-a",
        ),
    ];
    let bin = lab::daemon::binary();
    for &(args, route, upstream) in cases {
        let mut full = vec!["explain", file.as_str(), "--src", "198.51.100.2:40000"];
        full.extend_from_slice(args);
        let out = tls::run_in(&ns, bin, &full, b"", Duration::from_secs(10));
        assert!(out.success(), "explain should exit 0\n{}", out.describe());
        assert!(
            has_word(&out.stdout, route) && has_word(&out.stdout, upstream),
            "explain {} should name route `{route}` and upstream `{upstream}` on stdout\n{}",
            args.join(" "),
            out.describe()
        );
    }
    assert!(
        ns.proxy_routes().is_empty() && ns.bpf_netns_links().is_empty(),
        "explain must not set anything up: routes {:?}, links {:?}",
        ns.proxy_routes(),
        ns.bpf_netns_links()
    );
}
