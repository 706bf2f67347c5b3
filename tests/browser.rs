//! A real browser through the CONNECT front end: Debian's headless Chromium
//! in cl with l4proxy's CONNECT listener on px as its proxy, nginx (TLS) and
//! dnsmasq in sv. Chromium's NetLog (`--log-net-log`) says which of its
//! connections were tunnels, what it asked for, what l4proxy answered and
//! which certificate came back through each: each tunnel is matched to
//! l4proxy's close event by Chromium's own address.

mod lab;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use lab::daemon::field_str;
use lab::origin::Origin;
use lab::tls::{Output, chromium};
use lab::{Daemon, TempDir, Topo};
use serde_json::{Value, json};

const PROXY: &str = "198.51.100.1:3128";
const URL: &str = "https://app.example.test/";
const TARGET: &str = "app.example.test:443";
/// What nginx serves for app.example.test, as the page's text.
const MARKER: &str = "l4proxy-browser-marker-5b1e";

/// The routed lab with nginx serving app.example.test on 203.0.113.2:443,
/// dnsmasq answering for it, and the daemon with one CONNECT rule whose
/// tunnels go where the client asked.
struct BrowserLab {
    t: Topo,
    origin: Origin,
    d: Daemon,
}

impl BrowserLab {
    fn start(test: &str) -> BrowserLab {
        let t = Topo::new(test);
        // The lab's nginx answers text/plain: Chromium shows it in a <pre>.
        let origin = Origin::start(
            &t,
            &[("203.0.113.2:443", MARKER)],
            &[],
            &[("app.example.test", &["203.0.113.2"])],
        );
        let policy = json!({
            "intercept": [
                { "name": "explicit", "upstream": "direct",
                  "connect": { "listen": [PROXY], "clients": ["198.51.100.0/24"] } }
            ],
            "upstreams": { "direct": { "original_destination": true } }
        });
        let d = Daemon::start_with_resolver(&t.px, &policy, &[], &origin.resolv_conf());
        BrowserLab { t, origin, d }
    }

    /// Requests nginx answered for app.example.test so far.
    fn served(&self) -> Vec<String> {
        self.origin
            .nginx
            .requests_on("203.0.113.2:443")
            .into_iter()
            .filter(|l| l.contains("\"GET / HTTP/"))
            .collect()
    }
}

/// One connection of Chromium to the proxy, from its NetLog.
#[derive(Debug, Default)]
struct Socket {
    local: Option<SocketAddr>,
    /// `CONNECT host:port HTTP/1.1` (a tunnel), with its headers.
    connect: Option<String>,
    /// The proxy's status line.
    answer: Option<String>,
    /// The server's certificate as received through the tunnel (PEM).
    certificate: Option<String>,
}

/// What one Chromium run did.
struct Run {
    out: Output,
    sockets: Vec<Socket>,
}

impl Run {
    /// Tunnels asked for `target`.
    fn tunnels_to(&self, target: &str) -> Vec<&Socket> {
        let line = format!("CONNECT {target} HTTP/1.1");
        self.sockets
            .iter()
            .filter(|s| s.connect.as_deref().is_some_and(|c| c.starts_with(&line)))
            .collect()
    }

    fn describe(&self) -> String {
        format!("{}\nsockets: {:#?}", self.out.describe(), self.sockets)
    }
}

/// Runs Chromium in cl with the lab's proxy and `extra` flags, dumping the
/// DOM of [`URL`]; reads its NetLog once it has exited.
fn browse(lab: &BrowserLab, extra: &[&str]) -> Run {
    let profile = TempDir::new("browser-profile");
    let netlog = profile.join("netlog.json");
    let proxy = format!("--proxy-server=http://{PROXY}");
    let log_arg = format!("--log-net-log={}", netlog.display());
    let mut args = vec![proxy.as_str(), log_arg.as_str()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--dump-dom", URL]);
    let out = chromium(&lab.t.cl, &profile, &args);
    assert!(!out.timed_out, "{}", out.describe());
    let text = std::fs::read_to_string(&netlog)
        .unwrap_or_else(|e| panic!("NetLog {}: {e}\n{}", netlog.display(), out.describe()));
    let log: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("NetLog is not JSON ({e})\n{}", out.describe()));
    Run {
        sockets: sockets(&log),
        out,
    }
}

/// Chromium's connections to the proxy, by NetLog source: its address
/// (`TCP_CONNECT`), the tunnel head and answer, the certificate.
fn sockets(log: &Value) -> Vec<Socket> {
    let names: BTreeMap<u64, &str> = log["constants"]["logEventTypes"]
        .as_object()
        .expect("NetLog constants")
        .iter()
        .filter_map(|(name, n)| Some((n.as_u64()?, name.as_str())))
        .collect();
    let mut by_source: BTreeMap<u64, Socket> = BTreeMap::new();
    for ev in log["events"].as_array().expect("NetLog events") {
        let (Some(kind), Some(source)) = (
            ev["type"].as_u64().and_then(|t| names.get(&t)),
            ev["source"]["id"].as_u64(),
        ) else {
            continue;
        };
        let p = &ev["params"];
        let text = |v: &Value| v.as_str().map(str::to_owned);
        match *kind {
            "TCP_CONNECT" if p["remote_address"].as_str() == Some(PROXY) => {
                let local = p["local_address"].as_str().and_then(|a| a.parse().ok());
                by_source.entry(source).or_default().local = local;
            }
            "HTTP_TRANSACTION_SEND_TUNNEL_HEADERS" => {
                let head = p["headers"].as_array().map(|h| {
                    h.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("\r\n")
                });
                by_source.entry(source).or_default().connect =
                    text(&p["line"]).map(|line| format!("{line}{}", head.unwrap_or_default()));
            }
            "HTTP_TRANSACTION_READ_TUNNEL_RESPONSE_HEADERS" => {
                by_source.entry(source).or_default().answer = text(&p["headers"][0]);
            }
            "SSL_CERTIFICATES_RECEIVED" => {
                by_source.entry(source).or_default().certificate = text(&p["certificates"][0]);
            }
            _ => {}
        }
    }
    by_source
        .into_values()
        .filter(|s| s.local.is_some())
        .collect()
}

/// The same PEM text, whatever the line ends.
fn same_pem(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.split_whitespace().collect::<String>();
    norm(a) == norm(b)
}

/// Checks what every tunnel to app.example.test of `run` shows: l4proxy
/// answered 200 (where Chromium read the answer), the certificate that came through is nginx's own (the TLS
/// is Chromium's with nginx, end to end), and l4proxy's close event for
/// Chromium's address has the name as its target and nginx as upstream.
/// Returns those close events.
fn check_tunnels(lab: &mut BrowserLab, run: &Run) -> Vec<Value> {
    let pem = std::fs::read_to_string(&lab.origin.cert.cert).unwrap();
    let tunnels = run.tunnels_to(TARGET);
    assert!(
        !tunnels.is_empty(),
        "no tunnel to {TARGET}: {}",
        run.describe()
    );
    let mut closed = Vec::new();
    // A tunnel Chromium opened on speculation and dropped at its exit may
    // have no answer read; one that has must have l4proxy's 200.
    assert!(
        tunnels.iter().any(|t| t.answer.is_some()),
        "no tunnel's answer was read: {}",
        run.describe()
    );
    for tunnel in tunnels {
        if let Some(answer) = &tunnel.answer {
            assert_eq!(answer, "HTTP/1.1 200 Connection established", "{tunnel:#?}");
        }
        if let Some(got) = &tunnel.certificate {
            assert!(same_pem(got, &pem), "not nginx's certificate: {tunnel:#?}");
        }
        let ev = lab.d.closed_event(tunnel.local.unwrap());
        assert_eq!(
            field_str(&ev, "connect_target").as_deref(),
            Some(TARGET),
            "{ev}"
        );
        assert_eq!(field_str(&ev, "rule").as_deref(), Some("explicit"), "{ev}");
        assert_eq!(
            field_str(&ev, "upstream").as_deref(),
            Some("203.0.113.2:443"),
            "{ev}"
        );
        closed.push(ev);
    }
    // At least one handshake got as far as the certificate.
    assert!(
        run.tunnels_to(TARGET)
            .iter()
            .any(|t| t.certificate.is_some()),
        "no certificate came through a tunnel: {}",
        run.describe()
    );
    closed
}

/// Chromium loads an HTTPS page through the CONNECT listener: it asks for
/// the name (l4proxy resolves it), trusts nginx's key by its SPKI hash, and
/// the page's text is in the DOM; l4proxy logs each tunnel as
/// `app.example.test:443`, closed normally or by Chromium's exit. Without
/// the SPKI flag the same tunnel carries the same certificate and Chromium
/// refuses it (ERR_CERT_AUTHORITY_INVALID): nothing is served.
#[test]
fn chromium_loads_a_page_through_the_connect_listener() {
    let mut lab = BrowserLab::start("browser_page");
    let spki = format!(
        "--ignore-certificate-errors-spki-list={}",
        lab::pki::spki_sha256_base64(&lab.origin.cert.cert)
    );

    let trusted = browse(&lab, &[&spki]);
    assert!(trusted.out.success(), "{}", trusted.describe());
    assert!(
        trusted.out.stdout.contains(MARKER),
        "the page is not in the DOM: {}",
        trusted.describe()
    );
    // Closed, or cut by Chromium: at exit it drops its sockets, and one
    // with nginx's last bytes unread (a close_notify) resets, so l4proxy's
    // write of them fails on the client's side. Never the upstream's fault.
    for ev in check_tunnels(&mut lab, &trusted) {
        let outcome = lab::daemon::outcome(&ev);
        assert!(
            outcome == "closed"
                || outcome == "client_error: Broken pipe (os error 32)"
                || outcome == "client_error: Connection reset by peer (os error 104)",
            "{ev}"
        );
    }
    // The name went to the proxy as it was: l4proxy (203.0.113.1) asked.
    assert!(
        lab.origin
            .dns
            .log()
            .contains("query[A] app.example.test from 203.0.113.1"),
        "{}",
        lab.origin.dns.log()
    );
    let served = lab.served();
    assert_eq!(served.len(), 1, "{served:?}\n{}", lab.origin.nginx.logs());
    assert!(
        served[0].contains("sni=app.example.test") && served[0].contains("host=app.example.test"),
        "{served:?}"
    );

    let untrusted = browse(&lab, &[]);
    assert!(
        !untrusted.out.stdout.contains(MARKER),
        "loaded with an untrusted certificate: {}",
        untrusted.describe()
    );
    assert!(
        untrusted.out.stderr.contains("ERR_CERT_AUTHORITY_INVALID"),
        "{}",
        untrusted.describe()
    );
    check_tunnels(&mut lab, &untrusted);
    assert_eq!(
        lab.served().len(),
        1,
        "nginx served the untrusting browser: {}",
        lab.origin.nginx.logs()
    );
}

/// Chromium loads a page through a route that terminates TLS: it connects
/// to the service address (its resolver mapped there), l4proxy presents a
/// test CA's certificate for app.example.test (trusted by its SPKI hash)
/// and relays the decrypted HTTP/1.1 to plain nginx. The certificate that
/// reached Chromium is l4proxy's, and the close event has the TLS agreed.
#[test]
fn chromium_loads_a_page_through_a_terminating_route() {
    let t = Topo::new("browser_terminate");
    let nginx = lab::tls::Nginx::start(&t.sv, &[lab::tls::Site::plain("203.0.113.2:80", MARKER)]);
    let dir = TempDir::new("browser-pki");
    let ca = lab::pki::Ca::new(&dir, "browser");
    let cert = ca.issue_server("app", &["DNS:app.example.test"]);
    let policy = json!({
        "intercept": [
            { "name": "service", "prefixes": ["192.0.2.10/32"], "ports": [443] }
        ],
        "routes": [
            { "name": "app", "match": { "sni": ["app.example.test"] }, "upstream": "web",
              "terminate": { "certificates": [ { "chain": cert.chain, "key": cert.key } ],
                             "alpn": ["http/1.1"] } }
        ],
        "upstreams": { "web": { "servers": ["203.0.113.2:80"] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);

    let profile = TempDir::new("browser-profile");
    let spki = format!(
        "--ignore-certificate-errors-spki-list={}",
        lab::pki::spki_sha256_base64(&cert.cert)
    );
    let out = chromium(
        &t.cl,
        &profile,
        &[
            "--host-resolver-rules=MAP app.example.test 192.0.2.10",
            &spki,
            "--dump-dom",
            URL,
        ],
    );
    assert!(
        out.success() && out.stdout.contains(MARKER),
        "the page is not in the DOM: {}\n{}",
        out.describe(),
        nginx.logs()
    );
    let served: Vec<String> = nginx
        .requests_on("203.0.113.2:80")
        .into_iter()
        .filter(|l| l.contains("\"GET / HTTP/1.1\"") && l.contains("host=app.example.test"))
        .collect();
    assert_eq!(served.len(), 1, "{}", nginx.logs());
    // Chromium's page connection, as l4proxy logged it.
    let ev = d.wait_event(
        "the page's close event",
        std::time::Duration::from_secs(10),
        |ev| {
            lab::daemon::message(ev) == Some("connection closed")
                && field_str(ev, "bytes_from_upstream").is_some_and(|n| n != "0")
        },
    );
    assert_eq!(field_str(&ev, "route").as_deref(), Some("app"), "{ev}");
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
    assert!(field_str(&ev, "tls_version").is_some(), "{ev}");

    // Without trusting the test CA, Chromium refuses l4proxy's certificate.
    let untrusting = TempDir::new("browser-profile");
    let out = chromium(
        &t.cl,
        &untrusting,
        &[
            "--host-resolver-rules=MAP app.example.test 192.0.2.10",
            "--dump-dom",
            URL,
        ],
    );
    assert!(
        !out.stdout.contains(MARKER) && out.stderr.contains("ERR_CERT_AUTHORITY_INVALID"),
        "{}",
        out.describe()
    );
}
