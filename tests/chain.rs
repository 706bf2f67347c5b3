//! Proxies in a chain over TLS, a "local ingress proxy"
//! forwarding to a "remote proxy": l4proxy on the client's host (cl) takes
//! the client's TLS connections to a service address and asks a remote
//! l4proxy (px), over TLS verified against a CA, to CONNECT on by the SNI
//! name; the remote one terminates that TLS on its CONNECT listener,
//! resolves the name with the lab's dnsmasq and reaches nginx in sv. And
//! curl itself through the remote's TLS listener (`--proxy https://`).

mod lab;

use std::io::ErrorKind;
use std::time::Duration;

use lab::daemon::field_str;
use lab::daemon::outcome;
use lab::origin::{APP, Origin};
use lab::pki::{Ca, Cert};
use lab::tls::{Curl, Nginx, Site, curl};
use lab::{Daemon, TempDir, Topo};
use serde_json::{Value, json};

/// The remote proxy's TLS CONNECT listeners on px, plain onward (3128) and
/// with a PROXY header to the server (3129).
const REMOTE4: &str = "198.51.100.1:3128";
const REMOTE6: &str = "[2001:db8:c::1]:3128";
const REMOTE_PP: &str = "198.51.100.1:3129";
/// The remote's TLS CONNECT listener whose upstream TLS it originates.
const REMOTE_TLS_UP: &str = "198.51.100.1:3130";
/// The remote's plain CONNECT listener, where a route terminates the TLS
/// inside tunnels to the app.
const REMOTE_PLAIN: &str = "198.51.100.1:3131";
/// The name the remote proxy's certificate is for.
const REMOTE_NAME: &str = "proxy.example.test";
/// Another name of the app's address, which its certificates do not have.
const ALIAS: &str = "alias.example.test";
/// The service address cl's l4proxy takes (cl routes it via px; the local
/// rule makes it this host's own).
const SERVICE: &str = "192.0.2.10";

/// Both proxies, the origin, and the CA the remote proxy's certificate
/// chains to; all removed on drop.
struct Chain {
    t: Topo,
    origin: Origin,
    /// nginx on 203.0.113.2:8443: TLS behind a PROXY header; on 9443, TLS
    /// with a certificate of `ca`.
    pp_site: Nginx,
    ca: Ca,
    remote: Daemon,
    local: Daemon,
    _dir: TempDir,
}

/// The remote proxy's rules, its certificates issued by `ca` (as is the
/// certificate of nginx's site on 9443, which it re-encrypts to).
fn remote_policy(ca: &Ca, cert: &Cert) -> Value {
    let terminate = json!({ "certificates": [ { "chain": cert.chain, "key": cert.key } ] });
    let app = ca.issue_server("app", &[&format!("DNS:{APP}")]);
    let connect = |listen: Value| {
        json!({ "listen": listen, "clients": ["198.51.100.0/24", "2001:db8:c::/64"],
                "ports": [443, 8443, 9443] })
    };
    json!({
        "intercept": [
            { "name": "remote", "upstream": "direct", "terminate": terminate,
              "connect": connect(json!([REMOTE4, REMOTE6])) },
            { "name": "remote-pp", "upstream": "direct-pp", "terminate": terminate,
              "connect": connect(json!([REMOTE_PP])) },
            { "name": "remote-tls-up", "upstream": "reencrypt", "terminate": terminate,
              "connect": connect(json!([REMOTE_TLS_UP])) },
            { "name": "remote-plain", "upstream": "direct", "connect": connect(json!([REMOTE_PLAIN])) }
        ],
        "routes": [
            { "name": "app-inside", "match": { "intercept": ["remote-plain"], "target": [APP] },
              "terminate": { "certificates": [ { "chain": app.chain, "key": app.key } ] },
              "upstream": "reencrypt" }
        ],
        "upstreams": {
            "direct": { "original_destination": true },
            "direct-pp": { "original_destination": true, "proxy_protocol": "v2" },
            "reencrypt": { "original_destination": true, "tls": { "ca": ca.cert } }
        }
    })
}

/// cl's ingress: TLS to the service on 443 goes to the remote's plain
/// listener, on 8443 to the one that sends a PROXY header; a route on the
/// SNI makes the local proxy read it, so the remote is asked for the name.
fn local_policy(ca: &Ca) -> Value {
    let parent = |server: &str| {
        json!({ "parent": { "servers": [server],
                            "tls": { "ca": ca.cert, "server_name": REMOTE_NAME } } })
    };
    json!({
        "intercept": [
            { "name": "ingress", "prefixes": [format!("{SERVICE}/32")], "ports": [443, 8443] }
        ],
        "routes": [
            { "name": "app", "match": { "sni": [APP], "ports": [443] }, "upstream": "remote" },
            { "name": "app-pp", "match": { "sni": [APP], "ports": [8443] }, "upstream": "remote-pp" }
        ],
        "upstreams": { "remote": parent(REMOTE4), "remote-pp": parent(REMOTE_PP) }
    })
}

impl Chain {
    fn start(test: &str) -> Chain {
        let t = Topo::new(test);
        let origin = Origin::start(
            &t,
            &[("203.0.113.2:443", "app-v4")],
            &[],
            &[(APP, &["203.0.113.2"]), (ALIAS, &["203.0.113.2"])],
        );
        let dir = TempDir::new("chain-pki");
        let ca = Ca::new(&dir, "proxies");
        let issued = ca.issue_server("app-by-ca", &[&format!("DNS:{APP}"), "IP:203.0.113.2"]);
        let by_ca = lab::tls::Cert {
            name: issued.name,
            cert: issued.chain,
            key: issued.key,
        };
        let pp_site = Nginx::start(
            &t.sv,
            &[
                Site {
                    proxy_protocol: true,
                    ..Site::tls("203.0.113.2:8443", &origin.cert, "app-pp")
                },
                Site::tls("203.0.113.2:9443", &by_ca, "app-by-ca"),
            ],
        );
        let cert = ca.issue_server(
            "remote",
            &[
                &format!("DNS:{REMOTE_NAME}"),
                "IP:198.51.100.1",
                "IP:2001:db8:c::1",
            ],
        );
        let remote = Daemon::start_with_resolver(
            &t.px,
            &remote_policy(&ca, &cert),
            &[],
            &origin.resolv_conf(),
        );
        let local = Daemon::start_ready(&t.cl, &local_policy(&ca), &[]);
        Chain {
            t,
            origin,
            pp_site,
            ca,
            remote,
            local,
            _dir: dir,
        }
    }
}

/// curl in cl to the service by name: the local proxy asks the remote one
/// over verified TLS for `app.example.test:443`, the remote resolves it and
/// nginx serves the page to the remote proxy's address; both close logs
/// say so, and the remote's names the TLS the local one spoke.
#[test]
fn local_proxy_reaches_the_server_through_the_remote_over_tls() {
    let mut c = Chain::start("chain_tls");
    let resolve = format!("{APP}:443:{SERVICE}");
    let url = format!("https://{APP}/");
    let got = curl(
        &c.t.cl,
        &["--resolve", &resolve, "--cacert", c.origin.cacert(), &url],
    );
    assert_eq!(got.body.trim(), "app-v4", "{}", got.describe());

    let local = c.local.closed_event(got.local.expect("curl's own address"));
    assert_eq!(outcome(&local), "closed", "{local}");
    assert_eq!(
        field_str(&local, "upstream").as_deref(),
        Some(REMOTE4),
        "{local}"
    );
    let remote = c.remote.wait_event(
        "the remote's close event",
        std::time::Duration::from_secs(10),
        |ev| lab::daemon::message(ev) == Some("connection closed"),
    );
    assert_eq!(
        field_str(&remote, "connect_target").as_deref(),
        Some("app.example.test:443"),
        "{remote}"
    );
    assert_eq!(
        field_str(&remote, "upstream").as_deref(),
        Some("203.0.113.2:443"),
        "{remote}"
    );
    assert_eq!(
        field_str(&remote, "tls_version").as_deref(),
        Some("TLSv1_3"),
        "{remote}"
    );
    assert_eq!(
        field_str(&remote, "tls_sni").as_deref(),
        Some(REMOTE_NAME),
        "{remote}"
    );
    // nginx saw the remote proxy, not the client.
    let requests = c.origin.nginx.requests_on("203.0.113.2:443");
    assert_eq!(requests.len(), 1, "{}", c.origin.nginx.logs());
    assert!(
        requests[0].contains(" from=203.0.113.1 "),
        "{}",
        requests[0]
    );
}

/// With a PROXY header on the last hop the server learns the client (the
/// remote proxy's client: cl, where the local proxy runs) through both
/// proxies.
#[test]
fn a_proxy_header_on_the_last_hop_names_the_client() {
    let c = Chain::start("chain_pp");
    let resolve = format!("{APP}:8443:{SERVICE}");
    let url = format!("https://{APP}:8443/");
    let got = curl(
        &c.t.cl,
        &["--resolve", &resolve, "--cacert", c.origin.cacert(), &url],
    );
    assert_eq!(got.body.trim(), "app-pp", "{}", got.describe());
    let requests = c.pp_site.requests_on("203.0.113.2:8443");
    assert_eq!(requests.len(), 1, "{}", c.pp_site.logs());
    assert!(
        requests[0].contains("pp=198.51.100.2:"),
        "the header names cl: {}",
        requests[0]
    );
}

/// A remote proxy whose certificate does not chain to the local one's CA
/// is never asked: the local proxy resets the client, logs why, and the
/// remote sees only a failed handshake; observed, the remote is marked
/// down for it (the parent's TLS is the parent's doing).
#[test]
fn a_remote_with_an_untrusted_certificate_is_refused() {
    let mut c = Chain::start("chain_untrusted");
    let dir = TempDir::new("chain-other-ca");
    let other = Ca::new(&dir, "other");
    let mut policy = local_policy(&other);
    policy["upstreams"]["remote"]["observe"] = json!({ "errors": 1, "down_for": "1m" });
    let verdict = c.local.reload(&policy);
    assert_eq!(
        lab::daemon::message(&verdict),
        Some("policy reloaded"),
        "{verdict}"
    );
    let resolve = format!("{APP}:443:{SERVICE}");
    let url = format!("https://{APP}/");
    let got = curl(
        &c.t.cl,
        &["--resolve", &resolve, "--cacert", c.origin.cacert(), &url],
    );
    assert!(!got.out.success(), "{}", got.describe());
    let local = c.local.closed_event(got.local.expect("curl's own address"));
    let why = outcome(&local);
    assert!(
        why.contains("TLS to the parent proxy") && why.contains("certificate"),
        "{local}"
    );
    assert!(
        c.origin.nginx.access_log().is_empty(),
        "{}",
        c.origin.nginx.logs()
    );
    // The remote saw a TLS handshake fail, and was asked for nothing.
    let remote = c.remote.wait_event(
        "the remote's close event",
        std::time::Duration::from_secs(10),
        |ev| lab::daemon::message(ev) == Some("connection closed"),
    );
    assert!(outcome(&remote).contains("TLS handshake"), "{remote}");
    assert_eq!(field_str(&remote, "connect_target"), None, "{remote}");
    let down = c.local.wait_event(
        "the remote marked down",
        std::time::Duration::from_secs(10),
        |ev| {
            lab::daemon::message(ev) == Some("server down")
                && field_str(ev, "server").as_deref() == Some(REMOTE4)
        },
    );
    assert!(
        field_str(&down, "reason").is_some_and(|why| why.contains("TLS to the parent")),
        "{down}"
    );
}

/// curl through the remote's TLS listener itself (`--proxy https://`), from
/// both families: the hop to the proxy is TLS, the tunnel inside it curl's
/// own TLS to nginx.
#[test]
fn curl_speaks_tls_to_the_connect_listener() {
    let mut c = Chain::start("chain_https_proxy");
    for proxy in [REMOTE4, REMOTE6] {
        let proxy_addr = proxy.rsplit_once(':').unwrap().0.trim_matches(['[', ']']);
        let url = format!("https://{APP}/");
        let got = curl_via_tls_proxy(
            &c,
            (proxy_addr, 3128),
            &["--cacert", c.origin.cacert()],
            &url,
        );
        assert_eq!(got.body.trim(), "app-v4", "{proxy}: {}", got.describe());
        let ev = c
            .remote
            .closed_event(got.local.expect("curl's own address"));
        assert_eq!(outcome(&ev), "closed", "{ev}");
        assert_eq!(
            field_str(&ev, "connect_target").as_deref(),
            Some("app.example.test:443"),
            "{ev}"
        );
        assert!(field_str(&ev, "tls_cipher").is_some(), "{ev}");
    }
}

/// A client outside the TLS listener's `clients` is reset before any TLS:
/// no ServerHello (no private-key operation) for a host the rule does not
/// take; the log says why.
#[test]
fn a_client_the_tls_listener_does_not_take_gets_no_handshake() {
    let mut c = Chain::start("chain_tls_clients");
    let hello = lab::tls::capture_client_hello(&c.t.sv, &["-servername", REMOTE_NAME]);
    // The server's host is outside the rule's clients. The reset may come
    // before connect() returns (which reports it), or before the hello is
    // written.
    let local = lab::sa("203.0.113.2:47001");
    match lab::try_connect_from(&c.t.sv, local, lab::sa(REMOTE4)) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "connect: {e}"),
        Ok(mut s) => {
            let sent = lab::Sent::to(&mut s, &hello, Duration::from_secs(10));
            assert!(sent.was_reset(), "a reset and no handshake: {sent:?}");
        }
    }
    let ev = c.remote.closed_event(local);
    assert_eq!(
        outcome(&ev),
        "refused: client not allowed by the rule's clients",
        "{ev}"
    );
    assert_eq!(field_str(&ev, "tls_cipher"), None, "{ev}");
}

/// Plain HTTP through the remote's TLS listener (`--proxy https://`,
/// `--proxytunnel`) to a rule whose upstream is TLS: l4proxy verifies the
/// server against the CONNECT name (or address), not against the name of
/// the hop's TLS (the proxy's own).
#[test]
fn upstream_tls_of_a_tls_connect_listener_verifies_the_connect_name() {
    let mut c = Chain::start("chain_tls_up");
    let url = format!("http://{APP}:9443/");
    let got = curl_via_tls_proxy(&c, ("198.51.100.1", 3130), &["--proxytunnel"], &url);
    assert_reencrypted(
        &mut c,
        &got,
        &[("rule", "remote-tls-up"), ("tls_sni", REMOTE_NAME)],
    );
    // The same server by its address, which its certificate names too.
    let got = curl_via_tls_proxy(
        &c,
        ("198.51.100.1", 3130),
        &["--proxytunnel"],
        "http://203.0.113.2:9443/",
    );
    assert_reencrypted(&mut c, &got, &[("rule", "remote-tls-up")]);
    // By a name its certificate does not have: refused, though the hop's
    // name verified.
    let url = format!("http://{ALIAS}:9443/");
    let got = curl_via_tls_proxy(&c, ("198.51.100.1", 3130), &["--proxytunnel"], &url);
    assert!(!got.body.contains("app-by-ca"), "{}", got.describe());
    let ev = c
        .remote
        .closed_event(got.local.expect("curl's own address"));
    assert!(
        outcome(&ev).starts_with("upstream_tls_failed") && outcome(&ev).contains("certificate"),
        "{ev}"
    );
}

/// A route chosen by the CONNECT name alone that terminates the TLS inside
/// the tunnel: the client gets its `200` first (its ClientHello comes only
/// then), l4proxy terminates with the route's certificate and re-encrypts
/// to the server.
#[test]
fn a_route_by_connect_name_terminates_the_tls_inside_the_tunnel() {
    let mut c = Chain::start("chain_bump");
    let proxy_url = format!("http://{REMOTE_PLAIN}");
    let ca = c.ca.cert.display().to_string();
    let url = format!("https://{APP}:9443/");
    let got = curl(&c.t.cl, &["--proxy", &proxy_url, "--cacert", &ca, &url]);
    assert_reencrypted(&mut c, &got, &[("route", "app-inside"), ("tls_sni", APP)]);
}

/// curl got the page of nginx's site on 9443 through the remote, whose
/// close event says `closed`, has TLS to the server, and the `fields`.
fn assert_reencrypted(c: &mut Chain, got: &Curl, fields: &[(&str, &str)]) {
    assert_eq!(got.body.trim(), "app-by-ca", "{}", got.describe());
    let ev = c
        .remote
        .closed_event(got.local.expect("curl's own address"));
    assert_eq!(outcome(&ev), "closed", "{ev}");
    for &(name, value) in fields {
        assert_eq!(field_str(&ev, name).as_deref(), Some(value), "{ev}");
    }
    assert!(field_str(&ev, "upstream_tls_version").is_some(), "{ev}");
}

/// curl in cl to `url` through the remote's TLS listener at `(ip, port)`,
/// which it knows as [`REMOTE_NAME`] and checks against the proxies' CA,
/// with `extra` arguments.
fn curl_via_tls_proxy(c: &Chain, (ip, port): (&str, u16), extra: &[&str], url: &str) -> Curl {
    let proxy_url = format!("https://{REMOTE_NAME}:{port}");
    let resolve = format!("{REMOTE_NAME}:{port}:{ip}");
    let ca = c.ca.cert.display().to_string();
    let mut args = vec![
        "--proxy",
        proxy_url.as_str(),
        "--proxy-cacert",
        ca.as_str(),
        "--resolve",
        resolve.as_str(),
    ];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&c.t.cl, &args)
}
