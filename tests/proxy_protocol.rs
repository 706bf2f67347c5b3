//! The PROXY protocol with real peers: l4proxy sending v1 and v2 to nginx
//! (`listen ... proxy_protocol`) and HAProxy (`accept-proxy`), and accepting
//! them from HAProxy (`send-proxy`, `send-proxy-v2`) in front of it; and
//! what it does with headers from untrusted, silent, slow or broken peers.

mod lab;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use l4proxy::proxy_protocol::{self, Header, Version};
use lab::daemon::{field_str, field_string as field};
use lab::haproxy::Haproxy;
use lab::tls::{Nginx, Site, curl, require_tools};
use lab::{Daemon, Server, Topo, connect, handlers, sa};
use serde_json::json;

/// nginx behind l4proxy logs the real client (`$proxy_protocol_addr:port`)
/// for v1 and v2 headers, IPv4 and IPv6 clients.
#[test]
fn nginx_logs_the_client_from_v1_and_v2() {
    require_tools();
    let t = Topo::new("pp_nginx");
    let nginx = Nginx::start(
        &t.sv,
        &[
            Site::proxy_protocol("203.0.113.2:8081", "pp-v1"),
            Site::proxy_protocol("[2001:db8:5::2]:8081", "pp-v1"),
            Site::proxy_protocol("203.0.113.2:8082", "pp-v2"),
            Site::proxy_protocol("[2001:db8:5::2]:8082", "pp-v2"),
        ],
    );
    let policy = json!({
        "intercept": [
            { "name": "v1", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [81], "upstream": "nginx-v1" },
            { "name": "v2", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [82], "upstream": "nginx-v2" }
        ],
        "upstreams": {
            "nginx-v1": { "servers": ["203.0.113.2:8081", "[2001:db8:5::2]:8081"], "proxy_protocol": "v1" },
            "nginx-v2": { "servers": ["203.0.113.2:8082", "[2001:db8:5::2]:8082"], "proxy_protocol": "v2" }
        }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);
    for url in [
        "http://192.0.2.10:81/",
        "http://[2001:db8:a::10]:81/",
        "http://192.0.2.10:82/",
        "http://[2001:db8:a::10]:82/",
    ] {
        let version = if url.ends_with(":81/") {
            "pp-v1"
        } else {
            "pp-v2"
        };
        let got = curl(&t.cl, &[url]);
        assert_eq!(got.body.trim(), version, "{url}: {}", got.describe());
        let client = got
            .local
            .unwrap_or_else(|| panic!("{url}: {}", got.describe()));
        let want = format!("pp={}", lab::tls::logged(client));
        assert!(
            nginx.access_log().iter().any(|l| l.ends_with(&want)),
            "{url}: no nginx log line ending in {want}:\n{}",
            nginx.logs()
        );
    }
}

/// HAProxy `accept-proxy` behind l4proxy logs the client and original
/// destination (v1 and v2), and from v2 the authority (the Host that routed
/// the connection) and the unique ID l4proxy logs as `conn_id`.
#[test]
fn haproxy_accept_proxy_sees_client_destination_and_tlvs() {
    let (t, _backend) = Topo::with_echo("pp_haproxy", "127.0.0.1:9000", "backend");
    let haproxy = Haproxy::start(
        &t.sv,
        "frontend receiver\n\
         \x20 bind 203.0.113.2:8081 accept-proxy\n\
         \x20 bind [2001:db8:5::2]:8081 accept-proxy\n\
         \x20 log-format \"pp client=%ci:%cp dst=%fi:%fp authority=%[fc_pp_authority] id=%[fc_pp_unique_id] end\"\n\
         \x20 default_backend echo\n\
         backend echo\n\
         \x20 server echo 127.0.0.1:9000\n",
        &[sa("203.0.113.2:8081"), sa("[2001:db8:5::2]:8081")],
    );
    let policy = json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80, 81] } ],
        "routes": [
            { "name": "v2", "match": { "ports": [80], "host": ["www.example.com"] }, "upstream": "haproxy-v2" },
            { "name": "v1", "match": { "ports": [81] }, "upstream": "haproxy-v1" }
        ],
        "upstreams": {
            "haproxy-v1": { "servers": ["203.0.113.2:8081"], "proxy_protocol": "v1" },
            "haproxy-v2": { "servers": ["[2001:db8:5::2]:8081"], "proxy_protocol": "v2" }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    for (dst, version) in [
        ("192.0.2.10:80", "v2"),
        ("[2001:db8:a::10]:80", "v2"),
        ("192.0.2.10:81", "v1"),
        ("[2001:db8:a::10]:81", "v1"),
    ] {
        let dst = sa(dst);
        let mut c = connect(&t.cl, dst);
        let client = c.local_addr().unwrap();
        let request = b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n";
        c.write_all(request).unwrap();
        assert_eq!(lab::read_line(&mut c).unwrap(), "backend", "{dst}");
        assert_eq!(lab::read_exact_n(&mut c, request.len()).unwrap(), request);
        lab::finish(&mut c, &dst.to_string());
        let closed = d.closed_event(client);
        assert_eq!(field(&closed, "route"), version, "{closed}");
        let line = haproxy.wait_log_line(&format!("client={} ", lab::tls::logged(client)));
        let tlvs = match version {
            "v2" => format!("authority=www.example.com id={}", field(&closed, "conn_id")),
            _ => "authority=- id=-".to_owned(),
        };
        assert_eq!(
            line,
            format!(
                "pp client={} dst={} {tlvs} end",
                lab::tls::logged(client),
                lab::tls::logged(dst)
            ),
            "{version} through l4proxy"
        );
    }
}

/// HAProxy `send-proxy` and `send-proxy-v2` in front of l4proxy: l4proxy
/// routes by the client address HAProxy announces (its loopback clients)
/// and logs it, with HAProxy as the peer; an IPv6 client announced over an
/// IPv4 connection included.
#[test]
fn routes_and_logs_the_client_haproxy_announces() {
    let (t, _direct) = Topo::with_echo("pp_front", "203.0.113.2:8080", "direct");
    let _announced = Server::start(
        &t.sv,
        sa("203.0.113.2:8081"),
        handlers::hello_echo("announced"),
    );
    let _front = Haproxy::start(
        &t.cl,
        "frontend v1\n\
         \x20 bind 127.0.0.1:9001\n\
         \x20 bind [::1]:9001\n\
         \x20 default_backend to-l4proxy-v1\n\
         frontend v2\n\
         \x20 bind 127.0.0.1:9002\n\
         \x20 bind [::1]:9002\n\
         \x20 default_backend to-l4proxy-v2\n\
         backend to-l4proxy-v1\n\
         \x20 server l4proxy 192.0.2.10:80 send-proxy\n\
         backend to-l4proxy-v2\n\
         \x20 server l4proxy 192.0.2.10:80 send-proxy-v2\n",
        &[sa("127.0.0.1:9001"), sa("127.0.0.1:9002")],
    );
    let policy = json!({
        "intercept": [ { "name": "front", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "direct",
                         "accept_proxy_protocol": { "from": ["198.51.100.2/32"] } } ],
        "routes": [ { "name": "loopback-clients", "match": { "source": ["127.0.0.0/8", "::1/128"] }, "upstream": "announced" } ],
        "upstreams": {
            "direct": { "servers": ["203.0.113.2:8080"] },
            "announced": { "servers": ["203.0.113.2:8081"] }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    for (front, kind) in [
        ("127.0.0.1:9001", "v1"),
        ("[::1]:9001", "v1"),
        ("127.0.0.1:9002", "v2"),
        ("[::1]:9002", "v2"),
    ] {
        let front = sa(front);
        let mut c = connect(&t.cl, front);
        let client = c.local_addr().unwrap();
        assert_eq!(lab::read_line(&mut c).unwrap(), "announced", "via {front}");
        lab::finish(&mut c, &format!("via {front}"));
        let closed = d.closed_event(client);
        assert_eq!(field(&closed, "orig_dst"), front.to_string(), "{closed}");
        assert_eq!(field(&closed, "route"), "loopback-clients", "{closed}");
        assert_eq!(field(&closed, "proxy_header"), kind, "{closed}");
        let peer: SocketAddr = field(&closed, "peer").parse().unwrap();
        assert_eq!(
            peer.ip(),
            "198.51.100.2".parse::<IpAddr>().unwrap(),
            "{closed}"
        );
    }
}

/// What a test server read after a PROXY header: the header, then the rest.
type Report = (Header, Vec<u8>);

/// Reads everything, then reports the PROXY header at its start (l4proxy's
/// decoder: these tests check what l4proxy sends in cases no real receiver
/// reports) and the rest, or what was wrong, and answers `ok\n`.
fn header_reader(tx: Sender<Result<Report, String>>) -> impl Fn(TcpStream) + Send + Sync + 'static {
    let tx = Mutex::new(tx);
    move |mut s: TcpStream| {
        let mut all = Vec::new();
        let report = match s.read_to_end(&mut all) {
            Err(e) => Err(format!("reading: {e}")),
            Ok(_) => match proxy_protocol::decode(&all) {
                Ok(Some(decoded)) => Ok((decoded.header, all[decoded.len..].to_vec())),
                Ok(None) => Err(format!("half a PROXY header: {all:02x?}")),
                Err(e) => Err(format!("no PROXY header ({e}): {all:02x?}")),
            },
        };
        let _ = tx.lock().unwrap().send(report);
        let _ = s.write_all(b"ok\n");
    }
}

fn report(rx: &Receiver<Result<Report, String>>) -> Report {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("a report from the test server")
        .unwrap_or_else(|e| panic!("the test server got {e}"))
}

/// A v1 header a client on cl sends itself.
const FORGED: &[u8] = b"PROXY TCP4 198.51.100.77 192.0.2.99 5555 80\r\n";

/// A connection from a source the rule does not trust that starts with a
/// PROXY header is an ordinary client: the header is relayed as data.
#[test]
fn an_untrusted_header_is_data() {
    let t = Topo::new("pp_untrusted");
    let (tx, rx) = lab::reports();
    let reply = Arc::new(b"reply".to_vec());
    let _srv = Server::start(
        &t.sv,
        sa("203.0.113.2:8080"),
        handlers::sink_then_send(reply, tx),
    );
    let policy = json!({
        "intercept": [ { "name": "front", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "web",
                         "accept_proxy_protocol": { "from": ["198.51.100.99/32"] } } ],
        "upstreams": { "web": { "servers": ["203.0.113.2:8080"] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    let client = c.local_addr().unwrap();
    let sent = [FORGED, b"data after it"].concat();
    lab::send_and_shutdown(&mut c, &sent).unwrap();
    assert_eq!(lab::recv_report(&rx, "untrusted"), lab::Received::of(&sent));
    assert_eq!(lab::read_to_eof(&mut c).unwrap().len, 5);
    let closed = d.closed_event(client);
    assert_eq!(field_str(&closed, "proxy_header"), None, "{closed}");
}

/// From a trusted source, a missing, broken or slow header closes that
/// connection (with a log line saying why) and nothing goes upstream; the
/// next good one is served.
#[test]
fn a_trusted_peer_without_a_good_header_is_closed() {
    let t = Topo::new("pp_bad");
    let (tx, rx) = mpsc::channel();
    let srv = Server::start(&t.sv, sa("203.0.113.2:8080"), header_reader(tx));
    let policy = json!({
        "intercept": [ { "name": "front", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "web",
                         "accept_proxy_protocol": { "from": ["198.51.100.0/24"] } } ],
        "upstreams": { "web": { "servers": ["203.0.113.2:8080"], "proxy_protocol": "v1" } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &["--sniff-timeout", "1"]);
    for (sends, why) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], "no PROXY protocol header"),
        (
            b"PROXY TCP4 198.51.100.77 nope 5555 80\r\n",
            "malformed PROXY protocol header",
        ),
        (
            b"PROXY TCP4 198.51.100.77 ",
            "no complete PROXY protocol header within 1s",
        ),
    ] {
        let mut c = connect(&t.cl, sa("192.0.2.10:80"));
        let client = c.local_addr().unwrap();
        c.write_all(sends).unwrap();
        // Closed with our bytes unread: a FIN or a reset, never a timeout.
        let mut got = Vec::new();
        match c.read_to_end(&mut got) {
            Ok(_) => assert!(got.is_empty(), "{why}: the client got {got:?}"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{why}: the connection was not closed: {e}"),
        }
        // The front proxy is both client and peer: no header named another.
        let closed = d.closed_event(client);
        assert!(lab::daemon::outcome(&closed).contains(why), "{closed}");
        assert_eq!(field(&closed, "peer"), client.to_string(), "{closed}");
    }
    assert!(srv.accepted().is_empty(), "nothing may go upstream");

    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    c.write_all(FORGED).unwrap();
    c.write_all(b"hello").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(lab::read_line(&mut c).unwrap(), "ok");
    let (header, rest) = report(&rx);
    assert_eq!(
        header.addresses().map(|a| (a.client.0, a.orig_dst.0)),
        Some((sa("198.51.100.77:5555"), sa("192.0.2.99:80")))
    );
    assert_eq!(rest, b"hello");
    assert_eq!(
        srv.accepted().len(),
        1,
        "only the good connection went upstream"
    );
}

/// A `LOCAL` header (a health check of the front proxy) leaves the real
/// endpoints in place, and goes on upstream as `LOCAL`.
#[test]
fn local_uses_the_real_endpoints_and_goes_on_as_local() {
    let t = Topo::new("pp_local");
    let (tx, rx) = mpsc::channel();
    let _srv = Server::start(&t.sv, sa("203.0.113.2:8080"), header_reader(tx));
    let policy = json!({
        "intercept": [ { "name": "front", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "web",
                         "accept_proxy_protocol": { "from": ["198.51.100.2/32"] } } ],
        "upstreams": { "web": { "servers": ["203.0.113.2:8080"], "proxy_protocol": "v2" } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    let client = c.local_addr().unwrap();
    c.write_all(&proxy_protocol::encode(Version::V2, &Header::Local).unwrap())
        .unwrap();
    c.write_all(b"health").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(lab::read_line(&mut c).unwrap(), "ok");
    assert_eq!(report(&rx), (Header::Local, b"health".to_vec()));
    let closed = d.closed_event(client);
    assert_eq!(field(&closed, "orig_dst"), "192.0.2.10:80", "{closed}");
    assert_eq!(field(&closed, "proxy_header"), "v2 LOCAL", "{closed}");
}

/// The client a trusted header names is the one a transparent bind uses:
/// the server sees the announced address and port.
#[test]
fn the_announced_client_is_bound_transparently() {
    let (t, srv) = Topo::with_echo("pp_bind", "203.0.113.2:8080", "server");
    let policy = json!({
        "intercept": [ { "name": "front", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "web",
                         "accept_proxy_protocol": { "from": ["198.51.100.2/32"] } } ],
        "upstreams": { "web": { "servers": ["203.0.113.2:8080"], "bind": "client" } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);
    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    c.write_all(FORGED).unwrap();
    assert_eq!(lab::read_line(&mut c).unwrap(), "server");
    let accepted = srv.wait_accepted(1, Duration::from_secs(5));
    assert_eq!(accepted[0].peer, sa("198.51.100.77:5555"));
}

/// A client a trusted front proxy names is held to its rule's limits as
/// soon as it is named, before anything else is read: over its limit (one
/// connection), of two connections naming it, each with its ClientHello
/// sent, one is reset without a byte of the handshake the rule terminates
/// (which one is the daemon's order of naming them), while the other's
/// handshake goes on.
#[test]
fn a_named_client_over_its_limit_is_reset_before_the_handshake() {
    let (t, _srv) = Topo::with_echo("pp_limit", "203.0.113.2:8080", "a");
    let dir = lab::TempDir::new("pp_limit");
    let ca = lab::pki::Ca::new(&dir, "front");
    let cert = ca.issue_server("app.example.test", &["DNS:app.example.test"]);
    let policy = json!({
        "intercept": [ { "name": "fronted", "prefixes": ["192.0.2.10/32"], "ports": [443],
            "accept_proxy_protocol": { "from": [format!("{}/32", lab::addr::CL4)] },
            "limits": { "per_client": 1 },
            "terminate": { "certificates": [ { "chain": cert.chain, "key": cert.key } ] },
            "upstream": "a" } ],
        "upstreams": { "a": { "servers": ["203.0.113.2:8080"] } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let header = b"PROXY TCP4 192.0.2.99 192.0.2.10 5555 443\r\n";
    let hello_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/sniff/fixtures/tls13_openssl.bin");
    let hello = std::fs::read(hello_path).unwrap();
    let mut both: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = connect(&t.cl, sa("192.0.2.10:443"));
            c.write_all(header).unwrap();
            c
        })
        .collect();
    // What each got before its end, or before 2 s passed (a handshake the
    // client does not go on with stays open), and how its write and read
    // ended.
    let ends: Vec<lab::Sent> = both
        .iter_mut()
        .map(|c| lab::Sent::to(c, &hello, Duration::from_secs(2)))
        .collect();
    let reset_ones = ends.iter().filter(|e| e.was_reset()).count();
    // The other got the start of its handshake: the ServerHello's record.
    let shaking = ends
        .iter()
        .filter(|sent| sent.got.first() == Some(&22))
        .count();
    assert!(
        reset_ones == 1 && shaking == 1,
        "one reset and one handshake expected: {:?}",
        ends.iter()
            .map(|sent| format!(
                "{} bytes, the write {:?}, the read {:?}",
                sent.got.len(),
                sent.wrote,
                sent.end
            ))
            .collect::<Vec<_>>()
    );
    let limited = d.wait_event("the limit's refusal", Duration::from_secs(10), |e| {
        lab::daemon::message(e).is_some_and(|m| m.starts_with("over a connection limit"))
    });
    assert_eq!(field(&limited, "client"), "192.0.2.99:5555", "{limited}");
    drop(both);
}

/// A CONNECT tunnel whose name has two addresses, the first refusing: the
/// header names the address Happy Eyeballs reached, as the close log does,
/// not the first one tried.
#[test]
fn a_tunnel_announces_the_address_it_reached() {
    let t = Topo::new("pp_eyeballs");
    let dns = lab::origin::resolver(
        &t,
        &[("fallback.example.test", &["203.0.113.3", "2001:db8:5::2"])],
    );
    let (tx, rx) = mpsc::channel();
    // Nothing listens on 203.0.113.3:8090: that attempt is refused.
    let _srv = Server::start(&t.sv, sa("[2001:db8:5::2]:8090"), header_reader(tx));
    let policy = json!({
        "intercept": [ { "name": "explicit", "upstream": "announced",
            "connect": { "listen": ["198.51.100.1:3128"], "clients": ["198.51.100.0/24"],
                         "ports": [8090] } } ],
        "upstreams": { "announced": { "original_destination": true, "proxy_protocol": "v2" } }
    });
    let mut d = Daemon::start_with_resolver(&t.px, &policy, &[], &lab::origin::resolv_conf(&dns));
    let mut c = connect(&t.cl, sa("198.51.100.1:3128"));
    let client = c.local_addr().unwrap();
    c.write_all(
        b"CONNECT fallback.example.test:8090 HTTP/1.1\r\nHost: fallback.example.test:8090\r\n\r\n",
    )
    .unwrap();
    let answer = lab::answer_head(&mut c);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    c.write_all(b"hello").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(lab::read_line(&mut c).unwrap(), "ok");
    let (header, rest) = report(&rx);
    let reached = sa("[2001:db8:5::2]:8090");
    assert_eq!(
        header.addresses().map(|a| (a.client.0, a.orig_dst.0)),
        Some((client, reached))
    );
    assert_eq!(rest, b"hello");
    let closed = d.closed_event(client);
    assert_eq!(field(&closed, "upstream"), reached.to_string(), "{closed}");
    assert_eq!(field(&closed, "orig_dst"), reached.to_string(), "{closed}");
}
