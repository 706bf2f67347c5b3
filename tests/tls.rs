//! TLS termination and origination (issue #12): l4proxy as the TLS server a
//! client talks to (a rule's or a route's `terminate`, certificates chosen
//! by SNI, ALPN, versions, client certificates, session resumption, reload)
//! and as the TLS client towards an upstream (`tls`: CA, server name, ALPN,
//! behind a PROXY header), and `check` on the files a policy names.
//!
//! Real peers: `openssl s_client`, curl and nginx (lab/tls.rs), and for
//! byte-exact bulk transfers rustls peers written for the test
//! (lab/tls_peer.rs). Certificates come from the lab's PKI (lab/pki.rs):
//! rustls refuses a self-signed `CA:TRUE` certificate as a server's.
//!
//! Each test builds the routed lab (`cl — px — sv`) and its own daemon;
//! connections in a test are made one after the other, and the daemon's
//! `connection closed` events are taken in that order.

mod lab;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lab::daemon::{field_str, field_string, field_u64, message};
use lab::pki::{self, Ca};
use lab::tls::{self as labtls, Nginx, Output, Site};
use lab::tls_peer::{self, Order, Serve, TlsServer};
use lab::{Daemon, Server, TempDir, Topo, handlers, recv_report, reports, sa};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

/// The service the rules take (px owns 192.0.2.0/24 and 2001:db8:a::/64).
const SVC4: &str = "192.0.2.10";
const SVC6: &str = "2001:db8:a::10";
/// Plain servers in sv.
const PLAIN: &str = "203.0.113.2:8000";
const PLAIN_B: &str = "203.0.113.2:8001";
/// TLS servers in sv (nginx, or the rustls server of lab/tls_peer.rs).
const TLS_UP: &str = "203.0.113.2:9443";
const TLS_UP_H2: &str = "203.0.113.2:9444";
const NGINX: &str = "203.0.113.3:8443";

fn svc(port: u16) -> String {
    format!("{SVC4}:{port}")
}

fn svc6(port: u16) -> String {
    format!("[{SVC6}]:{port}")
}

const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// The PKI
// ---------------------------------------------------------------------------

/// The lab's certificate authorities and the leaves the tests use.
///
/// - `front`: what l4proxy presents to clients (through an intermediate for
///   `a`, so that chains are sent and checked), the CA clients trust;
/// - `back`: what servers in sv present, the CA l4proxy trusts upstream;
/// - `clients`: client certificates (`alice`), `strangers` another one.
struct Pki {
    dir: TempDir,
    front: Ca,
    front_int: Ca,
    back: Ca,
    clients: Ca,
    strangers: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new("tls-pki");
        let front = Ca::new(&dir, "front");
        let front_int = front.issue_intermediate("front-int");
        let back = Ca::new(&dir, "back");
        let clients = Ca::new(&dir, "clients");
        let strangers = Ca::new(&dir, "strangers");
        Pki {
            dir,
            front,
            front_int,
            back,
            clients,
            strangers,
        }
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// `{ "chain": ..., "key": ... }` of a certificate.
fn files(cert: &pki::Cert) -> Value {
    json!({ "chain": p(&cert.chain), "key": p(&cert.key) })
}

// ---------------------------------------------------------------------------
// Peers and log events
// ---------------------------------------------------------------------------

/// A plain server in sv: writes `id\n`, half-closes, reads to the end.
fn greeter(id: &str) -> impl Fn(TcpStream) + Send + Sync + 'static {
    let id = id.to_owned();
    move |mut s: TcpStream| {
        if s.write_all(format!("{id}\n").as_bytes()).is_err() {
            return;
        }
        let _ = s.shutdown(Shutdown::Write);
        let _ = lab::read_to_eof(&mut s);
    }
}

/// An `openssl s_client` run and what it printed.
struct SClient {
    out: Output,
}

impl SClient {
    /// The CN of the certificate the server presented.
    fn cn(&self) -> Option<String> {
        let line = self
            .out
            .stdout
            .lines()
            .find(|l| l.starts_with("subject="))?;
        let cn = line.split("CN").nth(1)?;
        Some(
            cn.trim_start_matches([' ', '='])
                .split(',')
                .next()?
                .trim()
                .to_owned(),
        )
    }

    /// `ALPN protocol: X`.
    fn alpn(&self) -> Option<String> {
        self.out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("ALPN protocol: "))
            .map(|a| a.trim().to_owned())
    }

    /// `Protocol  : TLSv1.3` of the session.
    fn protocol(&self) -> Option<String> {
        self.out.stdout.lines().find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "Protocol").then(|| value.trim().to_owned())
        })
    }

    /// `Reused, TLSv1.3, Cipher is ...` rather than `New, ...`.
    fn reused(&self) -> bool {
        self.out.stdout.lines().any(|l| l.starts_with("Reused,"))
    }

    /// The server's certificate chained to the CA given (`-CAfile`).
    fn verified(&self) -> bool {
        self.out.stdout.contains("Verify return code: 0 (ok)")
    }

    /// The line the upstream greeter sent came through. (s_client writes
    /// what it receives straight to its stdout, and what it says itself
    /// through stdio's buffer: the two may interleave anywhere.)
    fn got(&self, greeting: &str) -> bool {
        self.out.stdout.contains(&format!("{greeting}\n"))
    }

    fn describe(&self) -> String {
        self.out.describe()
    }
}

/// `openssl s_client -connect ADDR -CAfile CA -verify_return_error ARGS...`
/// from cl, its stdin closed at once (`-ign_eof`: it reads until the server
/// closes), killed after 15 s.
fn s_client(t: &Topo, addr: &str, ca: &Path, args: &[&str]) -> SClient {
    let ca = p(ca);
    let mut full = vec![
        "s_client",
        "-connect",
        addr,
        "-ign_eof",
        "-CAfile",
        ca.as_str(),
        "-verify_return_error",
    ];
    full.extend_from_slice(args);
    SClient {
        out: labtls::run_in(&t.cl, "openssl", &full, b"", Duration::from_secs(15)),
    }
}

/// Asserts the run reached the upstream that greets with `greeting`, over a
/// TLS session whose certificate verified and has CN `cn`.
fn assert_through(run: &SClient, cn: &str, greeting: &str, what: &str) {
    assert!(
        run.verified() && run.got(greeting),
        "{what}: expected a verified session reaching {greeting:?}\n{}",
        run.describe()
    );
    assert_eq!(
        run.cn().as_deref(),
        Some(cn),
        "{what}: certificate presented\n{}",
        run.describe()
    );
}

/// Asserts the handshake was refused: no certificate, or (TLS 1.3, where a
/// client learns of a refusal after its Finished) at least nothing from the
/// upstream.
fn assert_refused(run: &SClient, greeting: &str, what: &str) {
    assert!(
        !run.got(greeting),
        "{what}: the upstream was reached\n{}",
        run.describe()
    );
}

/// The `n`-th (from 1) `connection closed` event.
fn closed(d: &mut Daemon, n: usize) -> Value {
    d.wait_closed_events(n, Duration::from_secs(15))
        .into_iter()
        .nth(n - 1)
        .unwrap()
}

/// The `connection closed` event of the client at `client`.
fn closed_of(d: &mut Daemon, client: SocketAddr) -> Value {
    d.closed_event(client)
}

fn level(ev: &Value) -> String {
    ev.get("level")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// The outcome of a `connection closed` event as one lower-case text: the
/// `outcome` field, words apart (`upstream TLS failed: ...`, or a code
/// such as `upstream_tls_failed`), then the `error` field if there is one.
fn outcome(ev: &Value) -> String {
    let mut text = field_string(ev, "outcome").replace('_', " ");
    if let Some(error) = field_str(ev, "error") {
        text = format!("{text}: {error}");
    }
    text.to_lowercase()
}

/// Asserts a connection ended cleanly: INFO, `closed`.
fn assert_closed_clean(ev: &Value, what: &str) {
    assert_eq!(outcome(ev), "closed", "{what}: {ev}");
    assert_eq!(level(ev), "INFO", "{what}: {ev}");
}

/// Asserts a handshake with the client failed and was logged as such.
fn assert_handshake_failed(ev: &Value, what: &str) {
    let outcome = outcome(ev);
    assert!(
        outcome.starts_with("client") && outcome.contains("tls handshake"),
        "{what}: outcome {outcome:?}: {ev}"
    );
    assert_eq!(level(ev), "WARN", "{what}: {ev}");
    assert_eq!(field_str(ev, "upstream"), None, "{what}: {ev}");
}

/// A rule taking port `port` of the service addresses.
fn rule(name: &str, port: u16, upstream: &str) -> Value {
    json!({ "name": name, "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [port], "upstream": upstream })
}

/// app.example.test's certificate, from `issuer`: what the client is shown.
fn app_cert(issuer: &pki::Ca) -> pki::Cert {
    issuer.issue_server("app.example.test", &["DNS:app.example.test"])
}

/// inner.example.test's certificate, from the back CA: what an upstream
/// l4proxy re-encrypts to shows.
fn inner_cert(pki: &Pki) -> pki::Cert {
    pki.back
        .issue_server("inner.example.test", &["DNS:inner.example.test"])
}

/// `rule` with a `terminate`.
/// Two terminating rules for app.example.test (a certificate `issuer`
/// makes): port 443 to the plain server `plain`, port 444 re-encrypted to
/// `tls`, verified as inner.example.test. The policy, and the inner
/// server's certificate.
fn plain_and_reencrypting(
    pki: &Pki,
    issuer: &pki::Ca,
    plain: &str,
    tls: &str,
) -> (Value, pki::Cert) {
    let app = app_cert(issuer);
    let inner = inner_cert(pki);
    let policy = json!({
        "intercept": [
            terminating("to-plain", 443, "plain", json!({ "certificates": [files(&app)] })),
            terminating("to-tls", 444, "tls", json!({ "certificates": [files(&app)] })),
        ],
        "upstreams": {
            "plain": { "servers": [plain] },
            "tls": { "servers": [tls], "tls": {
                "ca": p(&pki.back.cert), "server_name": "inner.example.test" } }
        }
    });
    (policy, inner)
}

/// A TLS server on sv at `at` with `cert`, agreeing to `alpn`, that sends
/// `data` while it reads everything.
fn bulk_server(
    t: &Topo,
    at: &str,
    cert: &pki::Cert,
    alpn: &[&str],
    data: &Arc<Vec<u8>>,
) -> TlsServer {
    TlsServer::start(
        &t.sv,
        sa(at),
        tls_peer::server_config(cert, alpn),
        false,
        Serve::Bulk {
            data: data.clone(),
            order: Order::Both,
        },
    )
}

/// A client of app.example.test on the service port `port`, offering
/// `alpn`, sending `data` while it reads everything.
fn app_client(
    t: &Topo,
    pki: &Pki,
    port: u16,
    alpn: &[&str],
    data: &[u8],
) -> Result<tls_peer::ClientRun, String> {
    tls_peer::tls_client(
        &t.cl,
        sa(&svc(port)),
        tls_peer::client_config(&pki.front.cert, alpn),
        "app.example.test",
        data,
        Order::Both,
    )
}

fn terminating(name: &str, port: u16, upstream: &str, terminate: Value) -> Value {
    let mut r = rule(name, port, upstream);
    r["terminate"] = terminate;
    r
}

// ---------------------------------------------------------------------------
// 1. Certificates by SNI
// ---------------------------------------------------------------------------

/// Two certificates on a rule: each name gets its own, an unknown name or
/// none the first; with `refuse_unknown_names` an unknown name is refused
/// and logged. Over IPv4 and IPv6.
#[test]
fn sni_chooses_the_certificate() {
    let t = Topo::new("tls_sni");
    let pki = Pki::new();
    let a = pki
        .front_int
        .issue_server("a.example.test", &["DNS:a.example.test"]);
    let b = pki
        .front
        .issue_server_rsa("b.example.test", &["DNS:b.example.test"]);
    let greeter_srv = Server::start(&t.sv, sa(PLAIN), greeter("plain-upstream"));
    let certs = json!([files(&a), files(&b)]);
    let policy = json!({
        "intercept": [
            terminating("tls", 443, "plain", json!({ "certificates": certs })),
            terminating("strict", 444, "plain",
                json!({ "certificates": certs, "refuse_unknown_names": true })),
        ],
        "upstreams": { "plain": { "servers": [PLAIN] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let ca = &pki.front.cert;
    let mut n = 0;
    let mut next = |d: &mut Daemon| {
        n += 1;
        closed(d, n)
    };

    for (addr, family) in [(svc(443), "IPv4"), (svc6(443), "IPv6")] {
        for (name, cn) in [
            ("a.example.test", "a.example.test"),
            ("b.example.test", "b.example.test"),
            ("A.Example.TEST", "a.example.test"),
        ] {
            let what = format!("{family}, SNI {name}");
            let run = s_client(
                &t,
                &addr,
                ca,
                &["-servername", name, "-verify_hostname", cn],
            );
            assert_through(&run, cn, "plain-upstream", &what);
            let ev = next(&mut d);
            assert_closed_clean(&ev, &what);
            assert_eq!(
                field_str(&ev, "tls_sni").map(|s| s.to_ascii_lowercase()),
                Some(name.to_ascii_lowercase()),
                "{what}: {ev}"
            );
            assert_eq!(field_str(&ev, "rule").as_deref(), Some("tls"), "{ev}");
            assert_eq!(field_str(&ev, "upstream").as_deref(), Some(PLAIN), "{ev}");
            assert!(field_str(&ev, "tls_version").is_some(), "{what}: {ev}");
            assert!(field_str(&ev, "tls_cipher").is_some(), "{what}: {ev}");
        }
    }

    // An unknown name, and none at all: the first certificate.
    let run = s_client(&t, &svc(443), ca, &["-servername", "c.example.test"]);
    assert_through(&run, "a.example.test", "plain-upstream", "unknown name");
    assert_closed_clean(&next(&mut d), "unknown name");
    let run = s_client(&t, &svc(443), ca, &["-noservername"]);
    assert_through(&run, "a.example.test", "plain-upstream", "no SNI");
    let ev = next(&mut d);
    assert_closed_clean(&ev, "no SNI");
    assert_eq!(field_str(&ev, "tls_sni"), None, "no SNI: {ev}");

    // refuse_unknown_names: a known name passes, others are refused.
    let run = s_client(&t, &svc(444), ca, &["-servername", "b.example.test"]);
    assert_through(
        &run,
        "b.example.test",
        "plain-upstream",
        "strict, known name",
    );
    assert_closed_clean(&next(&mut d), "strict, known name");
    let accepted = greeter_srv.accepted().len();
    for (args, what) in [
        (
            &["-servername", "c.example.test"][..],
            "strict, unknown name",
        ),
        (&["-noservername"][..], "strict, no SNI"),
    ] {
        let run = s_client(&t, &svc(444), ca, args);
        assert!(
            !run.out.success() && run.cn().is_none(),
            "{what}: expected the handshake to fail without a certificate\n{}",
            run.describe()
        );
        let ev = next(&mut d);
        assert_handshake_failed(&ev, what);
        assert_eq!(field_str(&ev, "rule").as_deref(), Some("strict"), "{ev}");
    }
    assert_eq!(
        greeter_srv.accepted().len(),
        accepted,
        "a refused client must not reach the upstream"
    );
}

// ---------------------------------------------------------------------------
// 2. ALPN
// ---------------------------------------------------------------------------

/// The rule offers h2 and http/1.1: the client gets what it asked for, the
/// log says what was negotiated, and routes match the negotiated protocol.
#[test]
fn alpn_is_negotiated_logged_and_routed_on() {
    let t = Topo::new("tls_alpn");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let _h1 = Server::start(&t.sv, sa(PLAIN), greeter("upstream-h1"));
    let _h2 = Server::start(&t.sv, sa(PLAIN_B), greeter("upstream-h2"));
    let policy = json!({
        "intercept": [
            terminating("tls", 443, "h1", json!({
                "certificates": [files(&app)], "alpn": ["h2", "http/1.1"] })),
        ],
        "routes": [
            { "name": "by-h2", "match": { "alpn": ["h2"] }, "upstream": "h2" }
        ],
        "upstreams": {
            "h1": { "servers": [PLAIN] },
            "h2": { "servers": [PLAIN_B] }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let ca = &pki.front.cert;
    let name = ["-servername", "app.example.test"];

    let mut n = 0;
    for (offer, want, greeting, route) in [
        ("h2", Some("h2"), "upstream-h2", "by-h2"),
        ("http/1.1", Some("http/1.1"), "upstream-h1", "default"),
        ("http/1.1,h2", None, "", ""),
    ] {
        let mut args = name.to_vec();
        args.extend(["-alpn", offer]);
        let run = s_client(&t, &svc(443), ca, &args);
        n += 1;
        let ev = closed(&mut d, n);
        let Some(want) = want else {
            // Both offered: one of them is chosen, and the log agrees.
            let got = run.alpn();
            assert!(
                matches!(got.as_deref(), Some("h2" | "http/1.1")),
                "offer {offer}\n{}",
                run.describe()
            );
            assert_eq!(field_str(&ev, "tls_alpn"), got, "offer {offer}: {ev}");
            continue;
        };
        assert_through(&run, "app.example.test", greeting, &format!("ALPN {offer}"));
        assert_eq!(
            run.alpn().as_deref(),
            Some(want),
            "offer {offer}\n{}",
            run.describe()
        );
        assert_closed_clean(&ev, offer);
        assert_eq!(
            field_str(&ev, "tls_alpn").as_deref(),
            Some(want),
            "offer {offer}: {ev}"
        );
        let logged_route = field_string(&ev, "route");
        assert!(
            logged_route.contains(route),
            "offer {offer}: route {logged_route:?}, expected {route}: {ev}"
        );
    }

    // No ALPN offered: none negotiated, none logged.
    let run = s_client(&t, &svc(443), ca, &name);
    assert_through(&run, "app.example.test", "upstream-h1", "no ALPN");
    assert_eq!(run.alpn(), None, "{}", run.describe());
    let ev = closed(&mut d, n + 1);
    assert_closed_clean(&ev, "no ALPN");
    assert_eq!(field_str(&ev, "tls_alpn"), None, "{ev}");
}

// ---------------------------------------------------------------------------
// 3. Versions
// ---------------------------------------------------------------------------

/// `min_version: 1.3` refuses a TLS 1.2 client and takes a TLS 1.3 one; a
/// rule without it takes TLS 1.2. The log says which version.
#[test]
fn min_version_refuses_older_clients() {
    let t = Topo::new("tls_version");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let upstream = Server::start(&t.sv, sa(PLAIN), greeter("plain-upstream"));
    let policy = json!({
        "intercept": [
            terminating("modern", 443, "plain", json!({
                "certificates": [files(&app)], "min_version": "1.3" })),
            terminating("default", 444, "plain", json!({ "certificates": [files(&app)] })),
        ],
        "upstreams": { "plain": { "servers": [PLAIN] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let ca = &pki.front.cert;
    let name = ["-servername", "app.example.test"];

    let mut args = name.to_vec();
    args.push("-tls1_2");
    let run = s_client(&t, &svc(443), ca, &args);
    assert!(
        !run.out.success() && run.cn().is_none(),
        "TLS 1.2 against min_version 1.3 should fail\n{}",
        run.describe()
    );
    assert_handshake_failed(&closed(&mut d, 1), "TLS 1.2 client");
    assert_eq!(
        upstream.accepted().len(),
        0,
        "refused clients reach nothing"
    );

    let mut args = name.to_vec();
    args.push("-tls1_3");
    let run = s_client(&t, &svc(443), ca, &args);
    assert_through(&run, "app.example.test", "plain-upstream", "TLS 1.3 client");
    assert_eq!(
        run.protocol().as_deref(),
        Some("TLSv1.3"),
        "{}",
        run.describe()
    );
    let ev = closed(&mut d, 2);
    assert_closed_clean(&ev, "TLS 1.3 client");
    assert_eq!(
        field_str(&ev, "tls_version").as_deref(),
        Some("TLSv1_3"),
        "{ev}"
    );
    assert!(
        field_string(&ev, "tls_cipher").starts_with("TLS13_"),
        "{ev}"
    );

    // The default minimum is 1.2.
    let mut args = name.to_vec();
    args.push("-tls1_2");
    let run = s_client(&t, &svc(444), ca, &args);
    assert_through(
        &run,
        "app.example.test",
        "plain-upstream",
        "TLS 1.2, default",
    );
    assert_eq!(
        run.protocol().as_deref(),
        Some("TLSv1.2"),
        "{}",
        run.describe()
    );
    let ev = closed(&mut d, 3);
    assert_closed_clean(&ev, "TLS 1.2, default");
    assert_eq!(
        field_str(&ev, "tls_version").as_deref(),
        Some("TLSv1_2"),
        "{ev}"
    );
    assert!(
        field_string(&ev, "tls_cipher").starts_with("TLS_ECDHE_"),
        "{ev}"
    );
}

// ---------------------------------------------------------------------------
// 4. Client certificates
// ---------------------------------------------------------------------------

/// `client_certificates`: required refuses a client without one (or with
/// one of another CA) and logs the subject of a good one; optional takes a
/// client without one.
#[test]
fn client_certificates_required_and_optional() {
    let t = Topo::new("tls_mtls");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let alice = pki.clients.issue_client("alice", "alice");
    let mallory = pki.strangers.issue_client("mallory", "mallory");
    let upstream = Server::start(&t.sv, sa(PLAIN), greeter("plain-upstream"));
    let clients_ca = p(&pki.clients.cert);
    let policy = json!({
        "intercept": [
            terminating("required", 443, "plain", json!({
                "certificates": [files(&app)],
                "client_certificates": { "ca": clients_ca, "required": true } })),
            terminating("optional", 444, "plain", json!({
                "certificates": [files(&app)],
                "client_certificates": { "ca": clients_ca, "required": false } })),
            terminating("implicit", 445, "plain", json!({
                "certificates": [files(&app)],
                "client_certificates": { "ca": clients_ca } })),
        ],
        "upstreams": { "plain": { "servers": [PLAIN] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let ca = &pki.front.cert;
    let alice_cert = p(&alice.cert);
    let alice_key = p(&alice.key);
    let mallory_cert = p(&mallory.cert);
    let mallory_key = p(&mallory.key);
    let base = ["-servername", "app.example.test"];
    let with = |cert: &str, key: &str| {
        let mut a: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        a.extend(["-cert".into(), cert.into(), "-key".into(), key.into()]);
        a
    };
    let s = |port: u16, args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        s_client(&t, &svc(port), ca, &args)
    };
    let none: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    let mut n = 0;
    let mut next = |d: &mut Daemon| {
        n += 1;
        closed(d, n)
    };

    for (port, rule_name) in [(443, "required"), (445, "implicit")] {
        let what = format!("{rule_name}, no certificate");
        let run = s(port, &none);
        assert_refused(&run, "plain-upstream", &what);
        let ev = next(&mut d);
        assert_handshake_failed(&ev, &what);
        assert_eq!(field_str(&ev, "rule").as_deref(), Some(rule_name), "{ev}");
    }

    let run = s(443, &with(&mallory_cert, &mallory_key));
    assert_refused(&run, "plain-upstream", "required, a stranger's certificate");
    assert_handshake_failed(&next(&mut d), "required, a stranger's certificate");
    assert_eq!(
        upstream.accepted().len(),
        0,
        "refused clients reach nothing"
    );

    for port in [443, 444] {
        let what = format!("port {port}, alice");
        let run = s(port, &with(&alice_cert, &alice_key));
        assert_through(&run, "app.example.test", "plain-upstream", &what);
        let ev = next(&mut d);
        assert_closed_clean(&ev, &what);
        let subject = field_str(&ev, "client_cert").unwrap_or_default();
        assert!(subject.contains("CN=alice"), "{what}: {ev}");
    }

    let run = s(444, &none);
    assert_through(&run, "app.example.test", "plain-upstream", "optional, none");
    let ev = next(&mut d);
    assert_closed_clean(&ev, "optional, none");
    assert_eq!(field_str(&ev, "client_cert"), None, "{ev}");
}

// ---------------------------------------------------------------------------
// 5. Bulk transfers through termination
// ---------------------------------------------------------------------------

/// Sends and receives `len` bytes each way through l4proxy's termination
/// at `addr`, the client half-closing first and then the server; asserts
/// both ends got every byte and the log counts them.
#[allow(clippy::too_many_arguments)]
fn bulk_both_orders(
    t: &Topo,
    d: &mut Daemon,
    addr: &str,
    ca: &Path,
    name: &str,
    len: usize,
    up: Upstream,
    what: &str,
) {
    let config = tls_peer::client_config(ca, &[]);
    for (order, server_order) in [
        // The client finishes sending first, while the server has not
        // sent yet; then the server sends and closes.
        (Order::SendFirst, Order::ReceiveFirst),
        // The server sends everything and closes while the client is still
        // to send; then the client sends and closes.
        (Order::ReceiveFirst, Order::SendFirst),
    ] {
        let what = format!("{what}, client {order:?}");
        let to_server = Arc::new(lab::random_bytes(len, lab::seed()));
        let to_client = Arc::new(lab::random_bytes(len, lab::seed() ^ 0x5a5a));
        let server = up.start(t, to_client.clone(), server_order);
        let run = tls_peer::tls_client(&t.cl, sa(addr), config.clone(), name, &to_server, order)
            .unwrap_or_else(|e| panic!("{what}: client: {e}"));
        let got = server.report(&what);
        assert_eq!(
            got,
            lab::Received::of(&to_server),
            "{what}: what the server read"
        );
        assert_eq!(
            run.received,
            lab::Received::of(&to_client),
            "{what}: what the client read"
        );
        let ev = closed_of(d, run.local);
        assert_closed_clean(&ev, &what);
        assert_eq!(
            field_u64(&ev, "bytes_from_client"),
            Some(len as u64),
            "{ev}"
        );
        assert_eq!(
            field_u64(&ev, "bytes_from_upstream"),
            Some(len as u64),
            "{ev}"
        );
        assert_eq!(
            field_str(&ev, "tls_version").as_deref(),
            Some(run.version.as_str()),
            "{ev}"
        );
        if up.is_tls() {
            assert!(field_str(&ev, "upstream_tls_version").is_some(), "{ev}");
        } else {
            assert_eq!(field_str(&ev, "upstream_tls_version"), None, "{ev}");
        }
    }
}

/// The upstream of a bulk test: plain (lab::Server) or TLS (rustls).
#[derive(Clone, Copy)]
enum Upstream<'a> {
    Plain(&'a str),
    Tls(&'a str, &'a pki::Cert),
}

/// A started upstream of a bulk test, reporting what it read.
enum Started {
    Plain {
        /// Held until the exchange is over.
        _server: Server,
        reports: std::sync::mpsc::Receiver<std::io::Result<lab::Received>>,
    },
    Tls(TlsServer),
}

impl Started {
    fn report(&self, what: &str) -> lab::Received {
        match self {
            Started::Plain { reports, .. } => recv_report(reports, what),
            Started::Tls(server) => {
                let report = server.report();
                report
                    .received
                    .unwrap_or_else(|e| panic!("{what}: the TLS server failed: {e}"))
            }
        }
    }
}

impl Upstream<'_> {
    fn is_tls(&self) -> bool {
        matches!(self, Upstream::Tls(..))
    }

    /// Starts the server for one exchange, sending `data` in `order`.
    fn start(&self, t: &Topo, data: Arc<Vec<u8>>, order: Order) -> Started {
        match *self {
            Upstream::Plain(addr) => {
                let (tx, rx) = reports();
                let server = match order {
                    Order::ReceiveFirst => {
                        Server::start(&t.sv, sa(addr), handlers::sink_then_send(data, tx))
                    }
                    Order::SendFirst => {
                        Server::start(&t.sv, sa(addr), handlers::send_then_sink(data, tx))
                    }
                    Order::Both => Server::start(&t.sv, sa(addr), handlers::bulk(data, tx)),
                };
                Started::Plain {
                    _server: server,
                    reports: rx,
                }
            }
            Upstream::Tls(addr, cert) => Started::Tls(TlsServer::start(
                &t.sv,
                sa(addr),
                tls_peer::server_config(cert, &[]),
                false,
                Serve::Bulk { data, order },
            )),
        }
    }
}

/// 64 MiB each way, byte-exact, with half-close in each order: through a
/// rule's termination to a plain server, and re-encrypted to a TLS server.
#[test]
fn bulk_through_termination_both_half_closes() {
    let t = Topo::new("tls_bulk");
    let pki = Pki::new();
    let (policy, inner) = plain_and_reencrypting(&pki, &pki.front_int, PLAIN, TLS_UP);
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let ca = &pki.front.cert;
    bulk_both_orders(
        &t,
        &mut d,
        &svc(443),
        ca,
        "app.example.test",
        64 * MIB,
        Upstream::Plain(PLAIN),
        "terminate → plain",
    );
    bulk_both_orders(
        &t,
        &mut d,
        &svc(444),
        ca,
        "app.example.test",
        64 * MIB,
        Upstream::Tls(TLS_UP, &inner),
        "terminate → TLS",
    );
}

/// The same over IPv6 (client and service), smaller.
#[test]
fn bulk_through_termination_ipv6() {
    let t = Topo::new("tls_bulk6");
    let pki = Pki::new();
    const PLAIN6: &str = "[2001:db8:5::2]:8000";
    const TLS6: &str = "[2001:db8:5::2]:9443";
    let (policy, inner) = plain_and_reencrypting(&pki, &pki.front_int, PLAIN6, TLS6);
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let ca = &pki.front.cert;
    bulk_both_orders(
        &t,
        &mut d,
        &svc6(443),
        ca,
        "app.example.test",
        8 * MIB,
        Upstream::Plain(PLAIN6),
        "IPv6 terminate → plain",
    );
    bulk_both_orders(
        &t,
        &mut d,
        &svc6(444),
        ca,
        "app.example.test",
        8 * MIB,
        Upstream::Tls(TLS6, &inner),
        "IPv6 terminate → TLS",
    );
}

/// A TLS peer that closes without close_notify may have been cut short:
/// l4proxy passes it on as a failure (a reset), never as a clean end, both
/// when the client does it (the plain server sees a reset) and when the
/// TLS server does (the client sees a reset).
#[test]
fn a_close_without_close_notify_is_a_failure() {
    let t = Topo::new("tls_trunc");
    let pki = Pki::new();
    let (policy, inner) = plain_and_reencrypting(&pki, &pki.front, PLAIN, TLS_UP);
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let config = tls_peer::client_config(&pki.front.cert, &[]);

    // The client truncates.
    let (tx, rx) = reports();
    let _plain = Server::start(
        &t.sv,
        sa(PLAIN),
        handlers::sink_then_send(Arc::new(b"unused".to_vec()), tx),
    );
    let sent = lab::random_bytes(MIB, lab::seed());
    let run = tls_peer::tls_client_truncating(
        &t.cl,
        sa(&svc(443)),
        config.clone(),
        "app.example.test",
        &sent,
    )
    .unwrap_or_else(|e| panic!("truncating client: {e}"));
    let server_saw = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a report from the plain server");
    match &server_saw {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the plain server should see a reset, not {other:?}"),
    }
    let ev = closed_of(&mut d, run.local);
    let said = outcome(&ev);
    assert!(
        said.starts_with("client error") && said.contains("close_notify"),
        "client truncation: outcome {said:?}: {ev}"
    );

    // The TLS server truncates.
    let server = TlsServer::start(
        &t.sv,
        sa(TLS_UP),
        tls_peer::server_config(&inner, &[]),
        false,
        Serve::Truncate {
            data: Arc::new(lab::random_bytes(MIB, lab::seed())),
        },
    );
    let cut = tls_peer::tls_client(
        &t.cl,
        sa(&svc(444)),
        config,
        "app.example.test",
        b"",
        Order::ReceiveFirst,
    );
    let _ = server.report();
    let err = match cut {
        Ok(run) => panic!(
            "the client read a clean end after the server's truncation: {run:?}\n{}",
            d.log_text()
        ),
        Err(e) => e,
    };
    assert!(
        err.contains("Connection reset"),
        "the client should see a reset: {err}"
    );
    let ev = d.wait_closed_events(2, Duration::from_secs(10))[1].clone();
    let said = outcome(&ev);
    assert!(
        said.starts_with("upstream error") && said.contains("close_notify"),
        "server truncation: outcome {said:?}: {ev}"
    );
}

// ---------------------------------------------------------------------------
// 6. Re-encryption to nginx
// ---------------------------------------------------------------------------

/// curl through l4proxy's termination to nginx over TLS: the page comes
/// back; an upstream `tls` with the wrong CA or the wrong server name is
/// refused before a byte of the request goes out, and logged.
#[test]
fn reencrypt_to_nginx_verifies_the_server() {
    labtls::require_tools();
    let t = Topo::new("tls_nginx");
    let pki = Pki::new();
    let app = app_cert(&pki.front_int);
    let back_int = pki.back.issue_intermediate("back-int");
    let origin = back_int.issue_server("origin.example.test", &["DNS:app.example.test"]);
    let nginx = Nginx::start(&t.sv, &[Site::tls(NGINX, &origin.served(), "nginx-origin")]);
    let terminate = json!({ "certificates": [files(&app)], "alpn": ["http/1.1"] });
    let back_ca = p(&pki.back.cert);
    let policy = json!({
        "intercept": [
            terminating("good", 443, "origin", terminate.clone()),
            terminating("wrong-ca", 444, "origin-wrong-ca", terminate.clone()),
            terminating("wrong-name", 445, "origin-wrong-name", terminate),
        ],
        "upstreams": {
            "origin": { "servers": [NGINX], "tls": { "ca": back_ca } },
            "origin-wrong-ca": { "servers": [NGINX], "tls": { "ca": p(&pki.strangers.cert) } },
            "origin-wrong-name": { "servers": [NGINX],
                "tls": { "ca": back_ca, "server_name": "other.example.test" } }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let cacert = p(&pki.front.cert);
    let get = |port: u16| {
        let resolve = format!("app.example.test:{port}:{SVC4}");
        let url = format!("https://app.example.test:{port}/");
        labtls::curl(
            &t.cl,
            &["--resolve", &resolve, "--cacert", &cacert, url.as_str()],
        )
    };

    let c = get(443);
    assert!(
        c.out.success() && c.http_code == Some(200) && c.body.trim() == "nginx-origin",
        "through l4proxy to nginx\n{}\n{}",
        c.describe(),
        nginx.logs()
    );
    assert_eq!(c.ssl_verify_result, Some(0), "{}", c.describe());
    let good = closed_of(&mut d, c.local.expect("curl's local address"));
    let ev = good.clone();
    assert_eq!(
        field_str(&ev, "tls_sni").as_deref(),
        Some("app.example.test"),
        "{ev}"
    );
    assert_eq!(
        field_str(&ev, "tls_alpn").as_deref(),
        Some("http/1.1"),
        "{ev}"
    );
    assert!(field_str(&ev, "upstream_tls_version").is_some(), "{ev}");
    assert_eq!(
        field_str(&ev, "upstream_tls_alpn").as_deref(),
        Some("http/1.1"),
        "the client's ALPN, passed on: {ev}"
    );
    let served = nginx.requests_on(NGINX);
    assert_eq!(served.len(), 1, "{}", nginx.logs());
    assert!(
        served[0].contains("sni=app.example.test") && served[0].contains("\"GET / HTTP/1.1\" 200"),
        "{}",
        nginx.logs()
    );

    for (port, what) in [(444, "wrong CA"), (445, "wrong server name")] {
        let c = get(port);
        assert!(
            !c.out.success() && c.body.trim() != "nginx-origin",
            "{what}: curl should fail\n{}",
            c.describe()
        );
        let ev = closed_of(&mut d, c.local.expect("curl's local address"));
        let outcome = outcome(&ev);
        assert!(
            outcome.starts_with("upstream tls failed") && outcome.contains("certificate"),
            "{what}: outcome {outcome:?}: {ev}"
        );
        assert_eq!(level(&ev), "WARN", "{what}: {ev}");
        assert_eq!(field_u64(&ev, "bytes_from_client"), Some(0), "{what}: {ev}");
    }
    assert_eq!(
        nginx.requests_on(NGINX).len(),
        1,
        "nginx must not see a request from the refused connections\n{}",
        nginx.logs()
    );
    // Last: curl closes first (close_notify, FIN), l4proxy passes that on
    // to nginx, and nginx, having received close_notify, closes without
    // sending one (it sets `no_send_shutdown` on a peer's close_notify).
    // The exchange was complete: it ends `closed`.
    assert_closed_clean(&good, "good (curl → l4proxy → nginx, curl closes first)");
}

// ---------------------------------------------------------------------------
// 7. Route-level termination beside passthrough
// ---------------------------------------------------------------------------

/// One rule, two routes by SNI: `app.example.test` is terminated by its
/// route (its own certificate) and relayed in clear; `pass.example.test`
/// goes through untouched to nginx, whose own certificate the client sees.
#[test]
fn route_terminates_one_name_and_passes_another() {
    labtls::require_tools();
    let t = Topo::new("tls_route");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let pass = pki
        .back
        .issue_server("pass.example.test", &["DNS:pass.example.test"]);
    let nginx = Nginx::start(&t.sv, &[Site::tls(NGINX, &pass.served(), "nginx-pass")]);
    let policy = json!({
        "intercept": [ rule("edge", 443, "passthrough") ],
        "routes": [
            { "name": "app", "match": { "sni": ["app.example.test"] },
              "terminate": { "certificates": [files(&app)] }, "upstream": "plain" },
            { "name": "pass", "match": { "sni": ["pass.example.test"] }, "upstream": "passthrough" }
        ],
        "upstreams": {
            "plain": { "servers": [PLAIN] },
            "passthrough": { "servers": [NGINX] }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);

    let up = Upstream::Plain(PLAIN);
    bulk_both_orders(
        &t,
        &mut d,
        &svc(443),
        &pki.front.cert,
        "app.example.test",
        4 * MIB,
        up,
        "route terminate → plain",
    );
    // The route's log fields: the sniffed hello and the terminated session.
    let events = d.wait_closed_events(2, Duration::from_secs(10));
    for ev in &events {
        assert_eq!(field_str(ev, "route").as_deref(), Some("app"), "{ev}");
        assert_eq!(
            field_str(ev, "tls_sni").as_deref(),
            Some("app.example.test"),
            "{ev}"
        );
    }

    let back_ca = p(&pki.back.cert);
    let c = labtls::curl(
        &t.cl,
        &[
            "--resolve",
            &format!("pass.example.test:443:{SVC4}"),
            "--cacert",
            &back_ca,
            "https://pass.example.test/",
        ],
    );
    assert!(
        c.out.success() && c.body.trim() == "nginx-pass" && c.ssl_verify_result == Some(0),
        "passthrough beside a terminating route\n{}\n{}",
        c.describe(),
        nginx.logs()
    );
    let ev = closed_of(&mut d, c.local.expect("curl's local address"));
    assert_closed_clean(&ev, "passthrough");
    assert_eq!(field_str(&ev, "route").as_deref(), Some("pass"), "{ev}");
    assert_eq!(
        field_str(&ev, "sni").as_deref(),
        Some("pass.example.test"),
        "{ev}"
    );
    assert_eq!(field_str(&ev, "tls_version"), None, "not terminated: {ev}");
    let served = nginx.requests_on(NGINX);
    assert!(
        served.len() == 1 && served[0].contains("sni=pass.example.test"),
        "{}",
        nginx.logs()
    );
}

/// A client whose TLS the rule terminated, with a name no route takes and
/// no default: reset, as a passed-through ClientHello no route takes is
/// (a close would be a FIN without close_notify, which its TLS reads as a
/// truncation, not a refusal).
#[test]
fn a_terminated_client_no_route_takes_is_reset() {
    let t = Topo::new("tls_noroute");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let mut edge = rule("edge", 443, "unused");
    edge.as_object_mut().unwrap().remove("upstream");
    edge["terminate"] = json!({ "certificates": [files(&app)] });
    let policy = json!({
        "intercept": [edge],
        "routes": [
            { "name": "other-name", "match": { "sni": ["other.example.test"] }, "upstream": "plain" }
        ],
        "upstreams": { "plain": { "servers": [PLAIN] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let run = tls_peer::tls_client(
        &t.cl,
        sa(&svc(443)),
        tls_peer::client_config(&pki.front.cert, &[]),
        "app.example.test",
        b"",
        Order::ReceiveFirst,
    );
    let error = run.expect_err("no route takes app.example.test");
    assert!(
        error.contains("reset"),
        "the client should see a reset after its handshake: {error}"
    );
    let ev = closed(&mut d, 1);
    assert!(outcome(&ev).starts_with("no route"), "{ev}");
}

// ---------------------------------------------------------------------------
// 8. Plain to TLS
// ---------------------------------------------------------------------------

/// A steered plain connection to an upstream with `tls`: l4proxy is the TLS
/// client, with the policy's server name, and every byte arrives.
#[test]
fn plain_client_to_tls_upstream() {
    let t = Topo::new("tls_originate");
    let pki = Pki::new();
    let inner = inner_cert(&pki);
    let policy = json!({
        "intercept": [ rule("plain", 80, "tls"), rule("nameless", 81, "tls-nameless") ],
        "upstreams": {
            "tls": { "servers": [TLS_UP], "tls": {
                "ca": p(&pki.back.cert), "server_name": "inner.example.test", "alpn": ["x-test"] } },
            "tls-nameless": { "servers": [TLS_UP], "tls": { "ca": p(&pki.back.cert) } }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let len = 16 * MIB;
    let to_server = lab::random_bytes(len, lab::seed());
    let to_client = Arc::new(lab::random_bytes(len, lab::seed() ^ 1));
    let server = TlsServer::start(
        &t.sv,
        sa(TLS_UP),
        tls_peer::server_config(&inner, &["x-test"]),
        false,
        Serve::Bulk {
            data: to_client.clone(),
            order: Order::Both,
        },
    );
    let mut c = lab::connect(&t.cl, sa(&svc(80)));
    let client = c.local_addr().unwrap();
    let got = lab::exchange(&mut c, Arc::new(to_server.clone())).expect("the plain client");
    let report = server.report();
    assert_eq!(
        report.received.expect("the TLS server"),
        lab::Received::of(&to_server)
    );
    assert_eq!(got, lab::Received::of(&to_client));
    assert_eq!(report.sni.as_deref(), Some("inner.example.test"));
    assert_eq!(report.alpn.as_deref(), Some("x-test"));
    let ev = closed_of(&mut d, client);
    assert_closed_clean(&ev, "plain → TLS");
    assert_eq!(field_str(&ev, "tls_version"), None, "{ev}");
    assert_eq!(
        field_str(&ev, "upstream_tls_version").as_deref(),
        Some("TLSv1_3"),
        "{ev}"
    );
    assert_eq!(
        field_str(&ev, "upstream_tls_alpn").as_deref(),
        Some("x-test"),
        "{ev}"
    );
    assert_eq!(
        field_u64(&ev, "bytes_from_client"),
        Some(len as u64),
        "{ev}"
    );
    assert_eq!(
        field_u64(&ev, "bytes_from_upstream"),
        Some(len as u64),
        "{ev}"
    );

    // No server name in the policy, none from a plain client: the
    // connection fails before any server is connected to, and says why.
    // (l4proxy may accept, fail and reset before connect() has returned
    // here: a reset at connect is fine.)
    if let Ok(mut c) = lab::try_connect(&t.cl, sa(&svc(81)), Duration::from_secs(5)) {
        let _ = c.write_all(b"hello?\n");
        let rest = lab::read_to_eof(&mut c);
        assert!(
            rest.as_ref().map_or(true, |r| r.len == 0),
            "nothing should come back: {rest:?}"
        );
    }
    let ev = closed(&mut d, 2);
    assert_eq!(field_str(&ev, "rule").as_deref(), Some("nameless"), "{ev}");
    let said = outcome(&ev);
    assert!(
        said.starts_with("upstream tls failed") && said.contains("server name"),
        "no server name: outcome {said:?}: {ev}"
    );
    assert_eq!(level(&ev), "WARN", "{ev}");
    assert_eq!(
        server.accepted(),
        1,
        "the TLS server should see only the first connection"
    );
}

// ---------------------------------------------------------------------------
// 9. PROXY header, then TLS
// ---------------------------------------------------------------------------

/// Terminated, then re-encrypted behind a PROXY v2 header: the server reads
/// the header in clear (the client's address, the original destination,
/// the connection ID), then does TLS.
#[test]
fn proxy_header_before_originated_tls() {
    let t = Topo::new("tls_pp");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let inner = inner_cert(&pki);
    let policy = json!({
        "intercept": [
            terminating("tls", 443, "pp-tls", json!({ "certificates": [files(&app)] })),
        ],
        "upstreams": {
            "pp-tls": { "servers": [TLS_UP], "proxy_protocol": "v2", "tls": {
                "ca": p(&pki.back.cert), "server_name": "inner.example.test" } }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let len = MIB;
    let to_server = lab::random_bytes(len, lab::seed());
    let to_client = Arc::new(lab::random_bytes(len, lab::seed() ^ 2));
    let server = TlsServer::start(
        &t.sv,
        sa(TLS_UP),
        tls_peer::server_config(&inner, &[]),
        true,
        Serve::Bulk {
            data: to_client.clone(),
            order: Order::Both,
        },
    );
    let mut headers = Vec::new();
    for (addr, family) in [(svc(443), "IPv4"), (svc6(443), "IPv6")] {
        let run = tls_peer::tls_client(
            &t.cl,
            sa(&addr),
            tls_peer::client_config(&pki.front.cert, &[]),
            "app.example.test",
            &to_server,
            Order::Both,
        )
        .unwrap_or_else(|e| panic!("{family}: client: {e}"));
        let report = server.report();
        assert_eq!(
            report.received.clone().expect("the TLS server"),
            lab::Received::of(&to_server),
            "{family}: {report:?}"
        );
        assert_eq!(run.received, lab::Received::of(&to_client), "{family}");
        let header = report.proxy.clone().expect("a PROXY header");
        assert_eq!(header.command, 1, "{family}: {header:?}");
        assert_eq!(
            header.source,
            Some(run.local),
            "{family}: the client's address, in clear before TLS: {header:?}"
        );
        assert_eq!(header.destination, Some(sa(&addr)), "{family}: {header:?}");
        assert_eq!(report.sni.as_deref(), Some("inner.example.test"));
        let ev = closed_of(&mut d, run.local);
        assert_closed_clean(&ev, family);
        let conn_id = field_string(&ev, "conn_id");
        assert_eq!(
            header
                .tlv(0x05)
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            Some(conn_id),
            "{family}: the connection ID TLV: {header:?}"
        );
        headers.push((family, header));
    }
    // Last: the name the client asked for (its SNI, known from the
    // terminated handshake) as the v2 AUTHORITY TLV, as l4proxy sends it
    // when it sniffed the SNI from a ClientHello it did not terminate.
    for (family, header) in headers {
        assert_eq!(
            header
                .tlv(0x02)
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            Some("app.example.test".to_owned()),
            "{family}: the AUTHORITY TLV should carry the terminated SNI: {header:?}"
        );
    }
}

/// A client that negotiated h2 with l4proxy is not relayed to a server that
/// did not agree to h2 (this one ignores ALPN): it would speak h2 to a
/// server expecting something else. The log says why. A client without
/// ALPN or with http/1.1 (what HTTPS is without ALPN) goes through, and
/// an h2 client to a server that agrees.
#[test]
fn a_server_that_does_not_agree_to_the_clients_alpn_is_a_tls_failure() {
    let t = Topo::new("tls_alpn_up");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let inner = inner_cert(&pki);
    let terminate = json!({ "certificates": [files(&app)], "alpn": ["h2", "http/1.1"] });
    let policy = json!({
        "intercept": [
            terminating("ignores", 443, "ignores-alpn", terminate.clone()),
            terminating("agrees", 444, "agrees-h2", terminate),
        ],
        "upstreams": {
            "ignores-alpn": { "servers": [TLS_UP], "tls": {
                "ca": p(&pki.back.cert), "server_name": "inner.example.test" } },
            "agrees-h2": { "servers": [TLS_UP_H2], "tls": {
                "ca": p(&pki.back.cert), "server_name": "inner.example.test" } }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let data = Arc::new(b"hello".to_vec());
    let ignores = bulk_server(&t, TLS_UP, &inner, &[], &data);
    let agrees = bulk_server(&t, TLS_UP_H2, &inner, &["h2"], &data);
    let client = |port: u16, alpn: &[&str]| app_client(&t, &pki, port, alpn, &data);

    let refused = client(443, &["h2"]);
    assert!(
        refused.is_err(),
        "h2 to a server that ignores ALPN: {refused:?}"
    );
    assert!(
        ignores.report().received.is_err(),
        "the server must get nothing of the client's"
    );
    let ev = closed(&mut d, 1);
    let outcome = outcome(&ev);
    assert!(
        outcome.starts_with("upstream tls failed")
            && outcome.contains("alpn protocol is none, the client's h2"),
        "outcome {outcome:?}: {ev}"
    );
    assert_eq!(field_u64(&ev, "bytes_from_client"), Some(0), "{ev}");

    for alpn in [&[][..], &["http/1.1"]] {
        let run = client(443, alpn).unwrap_or_else(|e| panic!("ALPN {alpn:?}: {e}"));
        assert_eq!(run.alpn.as_deref(), alpn.first().copied(), "{alpn:?}");
        assert_eq!(run.received, lab::Received::of(&data), "{alpn:?}");
        assert!(ignores.report().received.is_ok(), "{alpn:?}");
        assert_closed_clean(&closed_of(&mut d, run.local), "no ALPN or http/1.1");
    }

    let h2 = client(444, &["h2"]).expect("h2 to a server that agrees");
    assert_eq!(h2.alpn.as_deref(), Some("h2"));
    assert_eq!(h2.received, lab::Received::of(&data));
    assert_eq!(agrees.report().alpn.as_deref(), Some("h2"));
    let ev = closed_of(&mut d, h2.local);
    assert_closed_clean(&ev, "h2 agreed");
    assert_eq!(
        field_str(&ev, "upstream_tls_alpn").as_deref(),
        Some("h2"),
        "{ev}"
    );
}

/// Clients on 443, terminated with `app`, to a pool of `TLS_UP` and
/// `TLS_UP_H2` with upstream `tls`, each server taken down at its first
/// error.
fn observed_pool(app: &pki::Cert, tls: Value) -> Value {
    json!({
        "intercept": [terminating("web", 443, "pool", json!({ "certificates": [files(app)] }))],
        "upstreams": {
            "pool": { "servers": [TLS_UP, TLS_UP_H2], "observe": { "errors": 1, "down_for": "1m" },
                      "tls": tls }
        }
    })
}

/// A server whose TLS fails (its certificate is not the one the policy
/// asks for) is the server's failure, as a refused connect is: the next
/// server is tried, so every client gets through, and observation takes
/// the failing server out.
#[test]
fn a_server_whose_tls_fails_is_passed_over_and_observed_down() {
    let pki = Pki::new();
    let inner = inner_cert(&pki);
    // Another name than inner.example.test, from another CA.
    let tls = json!({ "ca": p(&pki.back.cert), "server_name": "inner.example.test" });
    passed_over_and_observed_down("tls_failover", &pki, tls, &inner);
}

/// Without `server_name` (the client's name is verified), a certificate
/// with that name from a CA the upstream does not trust is still the
/// server's failure: only a name the client chose is the client's doing.
#[test]
fn an_untrusted_certificate_for_the_clients_name_is_the_servers_failure() {
    let pki = Pki::new();
    let trusted = pki
        .back
        .issue_server("app-by-back", &["DNS:app.example.test"]);
    let tls = json!({ "ca": p(&pki.back.cert) });
    passed_over_and_observed_down("tls_untrusted", &pki, tls, &trusted);
}

/// Clients to [`observed_pool`] (terminated with the front CA's
/// app.example.test) with `tls`, whose `TLS_UP` shows that same
/// certificate (wrong for `tls`) and `TLS_UP_H2` `right`: each gets through
/// the right one, and the wrong one is taken down for its certificate.
fn passed_over_and_observed_down(test: &str, pki: &Pki, tls: Value, right: &pki::Cert) {
    let app = app_cert(&pki.front);
    let t = Topo::new(test);
    let mut d = Daemon::start_ready(&t.px, &observed_pool(&app, tls), &[]);
    let data = Arc::new(b"hello".to_vec());
    let _wrong = bulk_server(&t, TLS_UP, &app, &[], &data);
    let _right = bulk_server(&t, TLS_UP_H2, right, &[], &data);
    for i in 0..4 {
        let run =
            app_client(&t, pki, 443, &[], &data).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(run.received, lab::Received::of(&data), "client {i}");
        let ev = closed_of(&mut d, run.local);
        assert_closed_clean(&ev, "through the right server");
        assert_eq!(
            field_str(&ev, "upstream").as_deref(),
            Some(TLS_UP_H2),
            "{ev}"
        );
    }
    let down = d.wait_event("the failing server down", Duration::from_secs(5), |e| {
        message(e) == Some("server down") && field_str(e, "server").as_deref() == Some(TLS_UP)
    });
    let why = field_string(&down, "reason");
    assert!(why.contains("certificate"), "{down}");
}

/// Without `server_name`, the name the upstream's certificate must have is
/// the client's: a client asking for a name the servers' certificates do
/// not have fails on any server alike, so it is not the server's failure:
/// no server is taken down for it, and no other is tried.
#[test]
fn a_certificate_refused_for_the_clients_name_takes_no_server_down() {
    let t = Topo::new("tls_client_name");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let inner = inner_cert(&pki);
    let tls = json!({ "ca": p(&pki.back.cert) });
    let mut d = Daemon::start_ready(&t.px, &observed_pool(&app, tls), &[]);
    let data = Arc::new(b"hello".to_vec());
    let servers = [TLS_UP, TLS_UP_H2].map(|at| bulk_server(&t, at, &inner, &[], &data));
    for i in 0..2 {
        // app.example.test: the servers' certificates are inner.example.test's.
        let refused = app_client(&t, &pki, 443, &[], &data);
        assert!(refused.is_err(), "client {i}: {refused:?}");
        let ev = closed(&mut d, i + 1);
        assert!(
            outcome(&ev).starts_with("upstream tls failed"),
            "client {i}: {ev}"
        );
    }
    assert!(
        !d.events().iter().any(|e| message(e) == Some("server down")),
        "{}",
        d.log_text()
    );
    // Round robin gave each server one client, and none was tried again.
    assert_eq!(servers.each_ref().map(TlsServer::accepted), [1, 1]);
}

/// An upstream `alpn` list offers a client that negotiated one of its
/// protocols only that one: a server that prefers h2 must not choose it
/// for a client speaking http/1.1.
#[test]
fn a_policy_alpn_list_offers_the_clients_protocol_alone() {
    let t = Topo::new("tls_alpn_list");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let inner = inner_cert(&pki);
    let both = ["h2", "http/1.1"];
    let policy = json!({
        "intercept": [terminating("web", 443, "both",
            json!({ "certificates": [files(&app)], "alpn": both }))],
        "upstreams": {
            "both": { "servers": [TLS_UP], "tls": {
                "ca": p(&pki.back.cert), "server_name": "inner.example.test", "alpn": both } }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let data = Arc::new(b"hello".to_vec());
    let server = bulk_server(&t, TLS_UP, &inner, &both, &data);
    let run = app_client(&t, &pki, 443, &["http/1.1"], &data)
        .unwrap_or_else(|e| panic!("an http/1.1 client: {e}"));
    assert_eq!(run.alpn.as_deref(), Some("http/1.1"));
    assert_eq!(run.received, lab::Received::of(&data));
    assert_eq!(server.report().alpn.as_deref(), Some("http/1.1"));
    let ev = closed_of(&mut d, run.local);
    assert_closed_clean(&ev, "http/1.1 offered alone");
    assert_eq!(
        field_str(&ev, "upstream_tls_alpn").as_deref(),
        Some("http/1.1"),
        "{ev}"
    );
}

// ---------------------------------------------------------------------------
// 10. `check` on certificate files
// ---------------------------------------------------------------------------

struct Checked {
    policy: String,
    ok: bool,
    stderr: String,
}

/// Writes `policy` as a file in `dir` and runs `l4proxy check` on it.
fn check(dir: &TempDir, name: &str, policy: &Value) -> Checked {
    let path = dir.join(&format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(policy).unwrap()).unwrap();
    let out = std::process::Command::new(lab::daemon::binary())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("run {} check: {e}", lab::daemon::binary()));
    Checked {
        policy: p(&path),
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A policy whose rule terminates with `certificate`, trusts `client_ca`
/// for client certificates and `upstream_ca` upstream, when given.
fn tls_policy(certificate: Value, client_ca: Option<&str>, upstream_ca: Option<&str>) -> Value {
    let mut terminate = json!({ "certificates": [certificate] });
    if let Some(ca) = client_ca {
        terminate["client_certificates"] = json!({ "ca": ca });
    }
    let mut upstream = json!({ "servers": [PLAIN] });
    if let Some(ca) = upstream_ca {
        upstream["tls"] = json!({ "ca": ca, "server_name": "inner.example.test" });
    }
    json!({
        "intercept": [ terminating("tls", 443, "up", terminate) ],
        "upstreams": { "up": upstream }
    })
}

/// Every kind of bad file is refused by `check` with the JSON path, the
/// file and the reason; certificates about to expire, or expired, are
/// warned about.
#[test]
fn check_names_bad_certificate_files() {
    let pki = Pki::new();
    let dir = TempDir::new("tls-check");
    let good = app_cert(&pki.front_int);
    let other = pki
        .front
        .issue_server("other.example.test", &["DNS:other.example.test"]);
    let garbage = pki::write_garbage(&pki.dir, "garbage");
    let empty = pki::write_empty(&pki.dir, "empty");
    let missing = pki.dir.join("missing.pem");
    let mismatched = pki::mismatched(&good, &other);
    let misordered = good.write_misordered_chain();
    let cert_path = "intercept[0].terminate.certificates[0]";
    let good_ca = p(&pki.front.cert);

    let cases: Vec<(&str, Value, &str, String, &[&str])> = vec![
        (
            "missing chain",
            tls_policy(
                json!({ "chain": p(&missing), "key": p(&good.key) }),
                None,
                None,
            ),
            cert_path,
            p(&missing),
            &["no such file"],
        ),
        (
            "missing key",
            tls_policy(
                json!({ "chain": p(&good.chain), "key": p(&missing) }),
                None,
                None,
            ),
            cert_path,
            p(&missing),
            &["no such file"],
        ),
        (
            "garbage chain",
            tls_policy(
                json!({ "chain": p(&garbage), "key": p(&good.key) }),
                None,
                None,
            ),
            cert_path,
            p(&garbage),
            &["base64"],
        ),
        (
            "garbage key",
            tls_policy(
                json!({ "chain": p(&good.chain), "key": p(&garbage) }),
                None,
                None,
            ),
            cert_path,
            p(&garbage),
            &["key"],
        ),
        (
            "empty chain",
            tls_policy(
                json!({ "chain": p(&empty), "key": p(&good.key) }),
                None,
                None,
            ),
            cert_path,
            p(&empty),
            &["no certificate"],
        ),
        (
            "empty key",
            tls_policy(
                json!({ "chain": p(&good.chain), "key": p(&empty) }),
                None,
                None,
            ),
            cert_path,
            p(&empty),
            &["key"],
        ),
        (
            "key of another certificate",
            tls_policy(files(&mismatched), None, None),
            cert_path,
            p(&mismatched.key),
            &["does not match"],
        ),
        (
            "chain out of order",
            tls_policy(
                json!({ "chain": p(&misordered), "key": p(&good.key) }),
                None,
                None,
            ),
            cert_path,
            p(&misordered),
            &["out of order"],
        ),
        (
            "garbage client CA",
            tls_policy(files(&good), Some(&p(&garbage)), None),
            "intercept[0].terminate.client_certificates.ca",
            p(&garbage),
            &["base64"],
        ),
        (
            "empty client CA",
            tls_policy(files(&good), Some(&p(&empty)), None),
            "intercept[0].terminate.client_certificates.ca",
            p(&empty),
            &["no certificate"],
        ),
        (
            "missing upstream CA",
            tls_policy(files(&good), None, Some(&p(&missing))),
            "upstreams.up.tls.ca",
            p(&missing),
            &["no such file"],
        ),
        (
            "garbage upstream CA",
            tls_policy(files(&good), Some(&good_ca), Some(&p(&garbage))),
            "upstreams.up.tls.ca",
            p(&garbage),
            &["base64"],
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, policy, path, file, reasons)) in cases.iter().enumerate() {
        let c = check(&dir, &format!("case{i}"), policy);
        let lower = c.stderr.to_lowercase();
        let lines: Vec<&str> = c.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut wrong = Vec::new();
        if c.ok {
            wrong.push("exit 0".to_owned());
        }
        if lines.len() != 1 {
            wrong.push(format!("{} lines on stderr", lines.len()));
        }
        if !c.stderr.starts_with(&c.policy) {
            wrong.push("does not start with the policy file".to_owned());
        }
        if !c.stderr.contains(path) {
            wrong.push(format!("no JSON path {path}"));
        }
        if !c.stderr.contains(file.as_str()) {
            wrong.push(format!("no file {file}"));
        }
        for reason in reasons.iter() {
            if !lower.contains(reason) {
                wrong.push(format!("no reason {reason:?}"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{what}: {}:\n  {}",
                wrong.join(", "),
                c.stderr.trim_end()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "check on bad files:\n{}",
        failures.join("\n")
    );

    // Soon to expire, and expired: warned about, not refused.
    let expiring = pki.front.issue_server_expiring(
        "expiring.example.test",
        &["DNS:expiring.example.test"],
        10,
    );
    let expired = pki
        .front
        .issue_server_expired("expired.example.test", &["DNS:expired.example.test"]);
    for (cert, words) in [
        (&expiring, &["expires in", "days"][..]),
        (&expired, &["expired"][..]),
    ] {
        let c = check(&dir, &cert.name, &tls_policy(files(cert), None, None));
        let ctx = format!("{}: stderr:\n{}", cert.name, c.stderr);
        assert!(c.ok, "a warning only; {ctx}");
        assert!(
            c.stderr.contains("warning") && c.stderr.contains(cert_path),
            "{ctx}"
        );
        assert!(c.stderr.contains(&p(&cert.chain)), "{ctx}");
        for word in words {
            assert!(c.stderr.contains(word), "{ctx}");
        }
    }
    let c = check(
        &dir,
        "expiring-days",
        &tls_policy(files(&expiring), None, None),
    );
    assert!(
        c.stderr.contains("expires in 9 days") || c.stderr.contains("expires in 10 days"),
        "ten days left: {}",
        c.stderr
    );
}

// ---------------------------------------------------------------------------
// 11. Reload
// ---------------------------------------------------------------------------

/// Copies a certificate's chain and key to the files a policy names.
fn install(cert: &pki::Cert, chain: &Path, key: &Path) {
    std::fs::copy(&cert.chain, chain).unwrap();
    std::fs::copy(&cert.key, key).unwrap();
}

/// SIGHUP with a broken certificate file keeps the certificates in force;
/// a good new one replaces them for new connections.
#[test]
fn reload_replaces_certificates_and_keeps_them_on_error() {
    let t = Topo::new("tls_reload");
    let pki = Pki::new();
    let v1 = app_cert(&pki.front);
    let v2 = pki
        .front_int
        .issue_server("renewed.example.test", &["DNS:app.example.test"]);
    let live = TempDir::new("tls-live");
    let chain: PathBuf = live.join("app.pem");
    let key: PathBuf = live.join("app.key");
    install(&v1, &chain, &key);
    let _upstream = Server::start(&t.sv, sa(PLAIN), greeter("plain-upstream"));
    let policy = json!({
        "intercept": [
            terminating("tls", 443, "plain", json!({
                "certificates": [{ "chain": p(&chain), "key": p(&key) }] })),
        ],
        "upstreams": { "plain": { "servers": [PLAIN] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let ca = &pki.front.cert;
    let run = || {
        s_client(
            &t,
            &svc(443),
            ca,
            &[
                "-servername",
                "app.example.test",
                "-verify_hostname",
                "app.example.test",
            ],
        )
    };
    assert_through(
        &run(),
        "app.example.test",
        "plain-upstream",
        "before reload",
    );

    // The file is broken (a renewal half done): the old one stays.
    std::fs::write(&chain, "-----BEGIN CERTIFICATE-----\nnot yet\n").unwrap();
    let verdict = d.reload(&policy);
    let text = message(&verdict).unwrap_or_default().to_owned();
    assert!(
        text.starts_with("policy not reloaded") && text.contains(&p(&chain)),
        "a broken certificate file: {verdict}"
    );
    assert_through(
        &run(),
        "app.example.test",
        "plain-upstream",
        "after a refused reload",
    );
    // The key no longer matches (the chain renewed, not yet the key).
    std::fs::copy(&v2.chain, &chain).unwrap();
    let verdict = d.reload(&policy);
    assert!(
        message(&verdict)
            .unwrap_or_default()
            .starts_with("policy not reloaded"),
        "a key that does not match: {verdict}"
    );
    assert_through(
        &run(),
        "app.example.test",
        "plain-upstream",
        "after a second refused reload",
    );

    install(&v2, &chain, &key);
    let verdict = d.reload(&policy);
    assert_eq!(
        message(&verdict),
        Some("policy reloaded"),
        "the renewed certificate: {verdict}"
    );
    assert_through(
        &run(),
        "renewed.example.test",
        "plain-upstream",
        "after the reload",
    );
}

// ---------------------------------------------------------------------------
// 12. Resumption
// ---------------------------------------------------------------------------

/// A session made where no client certificate was asked does not resume
/// where one is required (rustls takes a resumed session's client
/// certificate from its ticket and asks for none): the client must show
/// one. On the terminator that made it, it resumes.
#[test]
fn a_session_resumes_only_where_it_showed_what_is_asked() {
    let t = Topo::new("tls_resume_mtls");
    let pki = Pki::new();
    let app = app_cert(&pki.front);
    let _upstream = Server::start(&t.sv, sa(PLAIN), greeter("plain-upstream"));
    let policy = json!({
        "intercept": [
            terminating("open", 443, "plain", json!({ "certificates": [files(&app)] })),
            terminating("required", 444, "plain", json!({
                "certificates": [files(&app)],
                "client_certificates": { "ca": p(&pki.clients.cert), "required": true } })),
        ],
        "upstreams": { "plain": { "servers": [PLAIN] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let sessions = TempDir::new("tls-sessions-mtls");
    let ca = &pki.front.cert;
    for (round, version) in ["-tls1_3", "-tls1_2"].into_iter().enumerate() {
        let session = p(&sessions.join(&format!("{version}.pem")));
        let run = |port: u16, session_arg: &str| {
            let args = [
                "-servername",
                "app.example.test",
                version,
                session_arg,
                &session,
            ];
            s_client(&t, &svc(port), ca, &args)
        };
        let first = run(443, "-sess_out");
        assert!(
            first.got("plain-upstream") && !first.reused(),
            "{version}: a new session\n{}",
            first.describe()
        );
        let elsewhere = run(444, "-sess_in");
        assert_refused(
            &elsewhere,
            "plain-upstream",
            &format!("{version}: the open terminator's session, where a certificate is required"),
        );
        assert!(!elsewhere.reused(), "{version}\n{}", elsewhere.describe());
        // Its close, the second of each round's three: refused in the
        // handshake by the terminator that requires a certificate.
        let ev = closed(&mut d, round * 3 + 2);
        assert_eq!(field_str(&ev, "rule").as_deref(), Some("required"), "{ev}");
        assert_handshake_failed(
            &ev,
            &format!("{version}: resumed where a certificate is required"),
        );
        let again = run(443, "-sess_in");
        assert!(
            again.got("plain-upstream") && again.reused(),
            "{version}: the session resumes where it was made\n{}",
            again.describe()
        );
    }
}

/// TLS 1.3 tickets: a second connection resumes the first's session, and
/// so does one after a reload that renewed the certificate.
#[test]
fn sessions_resume_also_across_a_reload() {
    let t = Topo::new("tls_resume");
    let pki = Pki::new();
    let v1 = app_cert(&pki.front);
    let v2 = pki
        .front
        .issue_server("renewed.example.test", &["DNS:app.example.test"]);
    let _upstream = Server::start(&t.sv, sa(PLAIN), greeter("plain-upstream"));
    let policy = |cert: &pki::Cert| {
        json!({
            "intercept": [
                terminating("tls", 443, "plain", json!({ "certificates": [files(cert)] })),
            ],
            "upstreams": { "plain": { "servers": [PLAIN] } }
        })
    };
    let mut d = Daemon::start_ready(&t.px, &policy(&v1), &[]);
    let sessions = TempDir::new("tls-sessions");
    let ca = &pki.front.cert;
    let run = |version: &str, sess_in: Option<&Path>, sess_out: &Path| {
        let mut args = vec![
            "-servername".to_owned(),
            "app.example.test".to_owned(),
            version.to_owned(),
            "-sess_out".to_owned(),
            p(sess_out),
        ];
        if let Some(sess_in) = sess_in {
            args.extend(["-sess_in".to_owned(), p(sess_in)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        s_client(&t, &svc(443), ca, &args)
    };
    // TLS 1.3 (tickets), and TLS 1.2 (tickets too: s_client offers the
    // extension, and rustls issues them when it has a ticketer).
    let versions = [("-tls1_3", "TLSv1_3"), ("-tls1_2", "TLSv1_2")];
    let mut n = 0;
    for (version, logged) in versions {
        let session = |k: u32| sessions.join(&format!("{logged}-{k}.pem"));
        let first = run(version, None, &session(1));
        assert!(
            first.got("plain-upstream") && !first.reused(),
            "{version}: a new session\n{}",
            first.describe()
        );
        assert!(
            session(1).exists(),
            "{version}: no session saved\n{}",
            first.describe()
        );
        let second = run(version, Some(&session(1)), &session(2));
        assert!(
            second.got("plain-upstream") && second.reused(),
            "{version}: the second connection should resume\n{}",
            second.describe()
        );
        n += 2;
        let ev = closed(&mut d, n);
        assert_closed_clean(&ev, "resumed");
        assert_eq!(
            field_str(&ev, "tls_version").as_deref(),
            Some(logged),
            "{ev}"
        );
        assert_eq!(
            field_str(&ev, "tls_sni").as_deref(),
            Some("app.example.test"),
            "{ev}"
        );
    }

    assert_eq!(
        message(&d.reload(&policy(&v2))),
        Some("policy reloaded"),
        "{}",
        d.log_text()
    );
    for (version, logged) in versions {
        let session = |k: u32| sessions.join(&format!("{logged}-{k}.pem"));
        // A resumed TLS 1.2 session is not a new one: s_client saves none.
        let latest = [session(2), session(1)]
            .into_iter()
            .find(|s| s.exists())
            .unwrap();
        let after = run(version, Some(&latest), &session(3));
        assert!(
            after.got("plain-upstream") && after.reused(),
            "{version}: a session from before the reload should still resume\n{}",
            after.describe()
        );
    }
    // A new session after the reload gets the renewed certificate.
    let fresh = run("-tls1_3", None, &sessions.join("fresh.pem"));
    assert_through(
        &fresh,
        "renewed.example.test",
        "plain-upstream",
        "fresh after reload",
    );
    assert!(!fresh.reused(), "{}", fresh.describe());
}

// ---------------------------------------------------------------------------
// Descriptors
// ---------------------------------------------------------------------------

/// A relayed connection with a TLS side holds two descriptors in the daemon,
/// as its descriptor budget counts every connection: the reset watch of the
/// TLS relay duplicates a socket's only once that side has ended. Twenty
/// terminated connections, each past its handshake and the server's hello,
/// held open.
#[test]
fn a_terminated_connection_holds_two_descriptors() {
    labtls::require_tools();
    const HELD: usize = 20;
    let (t, _plain) = Topo::with_echo("tls_fds", PLAIN, "plain");
    let pki = Pki::new();
    let app = app_cert(&pki.front_int);
    let policy = json!({
        "intercept": [ terminating("fds", 443, "plain", json!({ "certificates": [files(&app)] })) ],
        "upstreams": { "plain": { "servers": [PLAIN] } }
    });
    let d = Daemon::start_ready(&t.px, &policy, &[]);
    let before = d.descriptors();
    let config = tls_peer::client_config(&pki.front.cert, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let held: Vec<_> = (0..HELD)
        .map(|i| {
            let tcp = lab::connect(&t.cl, sa(&svc(443)));
            tcp.set_nonblocking(true).unwrap();
            runtime.block_on(async {
                let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
                let name = rustls::pki_types::ServerName::try_from("app.example.test").unwrap();
                let mut tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                let mut hello = [0u8; 6];
                tokio::io::AsyncReadExt::read_exact(&mut tls, &mut hello)
                    .await
                    .unwrap_or_else(|e| panic!("connection {i}: the server's hello: {e}"));
                assert_eq!(&hello, b"plain\n", "connection {i}");
                tls
            })
        })
        .collect();
    let during = d.descriptors();
    assert!(
        during <= before + 2 * HELD + 2,
        "{during} descriptors with {HELD} connections held, {before} before"
    );
    drop(held);
}
