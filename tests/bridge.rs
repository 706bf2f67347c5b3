//! Bridged interception: the proxy host is a Linux bridge between the
//! client and its router (the lab's `Bridged` topology: cl — br — rt — sv).
//! Neither the client nor the router changes a route; a gateway rule names
//! a bridge port (or the bridge) and l4proxy takes the connections crossing
//! it, everything else is bridged untouched. Every case runs in IPv4 and
//! IPv6.

mod lab;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use lab::bridged_addr::*;
use lab::daemon::{field_str, field_string as field, message};
use lab::tls::{Nginx, Site, curl, make_cert, s_client};
use lab::{Bridged, Daemon, Netns, Server, connect, handlers, ip, sock, talk};
use serde_json::{Value, json};

/// The lab's addresses of one family.
#[derive(Clone, Copy, Debug)]
struct Family {
    name: &'static str,
    client: &'static str,
    server: &'static str,
    router: &'static str,
}

const V4: Family = Family {
    name: "IPv4",
    client: CL4,
    server: SV4,
    router: RT4_CL,
};

const V6: Family = Family {
    name: "IPv6",
    client: CL6,
    server: SV6,
    router: RT6_CL,
};

const FAMILIES: [Family; 2] = [V4, V6];

/// `port` on the server's address of each family, in `FAMILIES` order.
fn server_side(port: u16) -> [SocketAddr; 2] {
    FAMILIES.map(|f| sock(f.server, port))
}

/// A gateway rule for the server side's prefixes on `ports`, on the
/// interfaces `on` (bridge ports or the bridge), relaying to the original
/// destination from the client's address (fully transparent).
fn bridged_policy(on: &[&str], ports: Value) -> Value {
    bridged_policy_via(
        on,
        ports,
        json!({ "original_destination": true, "bind": "client-ip" }),
    )
}

/// The same rule, relaying with `upstream`.
fn bridged_policy_via(on: &[&str], ports: Value, upstream: Value) -> Value {
    json!({
        "intercept": [ { "name": "bridged", "prefixes": ["203.0.113.0/24", "2001:db8:5::/64"],
                         "ports": ports, "interfaces": on, "upstream": "upstream" } ],
        "upstreams": { "upstream": upstream }
    })
}

/// Relaying to `port` of the server, from the client's address.
fn to_server_port(port: u16) -> Value {
    json!({ "servers": server_side(port).map(|at| at.to_string()), "bind": "client-ip" })
}

/// Whether the daemon logged a connection from `client`.
fn relayed(d: &Daemon, client: SocketAddr) -> bool {
    d.events().into_iter().any(|e| {
        message(&e) == Some("connection closed")
            && field_str(&e, "client").as_deref() == Some(client.to_string().as_str())
    })
}

/// curl (HTTP) and openssl s_client (TLS) in cl to nginx on sv, through
/// the bridge: l4proxy relays both, and nginx sees the client's address.
#[test]
fn curl_and_openssl_reach_the_server_from_the_clients_address() {
    lab::tls::require_tools();
    let t = Bridged::new("br_peers");
    let certs = lab::TempDir::new("br_peers");
    let cert = make_cert(
        &certs,
        "sv",
        "sv.example.test",
        &[
            "DNS:sv.example.test",
            &format!("IP:{SV4}"),
            &format!("IP:{SV6}"),
        ],
    );
    let sites: Vec<Site> = FAMILIES
        .iter()
        .flat_map(|f| {
            [
                Site::plain(&sock(f.server, 80).to_string(), "plain"),
                Site::tls(&sock(f.server, 443).to_string(), &cert, "tls"),
            ]
        })
        .collect();
    let nginx = Nginx::start(&t.sv, &sites);
    let mut d = Daemon::start_ready(&t.br, &bridged_policy(&["to-cl"], json!([80, 443])), &[]);

    for f in FAMILIES {
        let plain = sock(f.server, 80);
        let got = curl(&t.cl, &[&format!("http://{}/", plain)]);
        assert_eq!(got.body, "plain\n", "{}: curl: {}", f.name, got.describe());
        let local = got.local.expect("curl's own address");
        let closed = d.closed_event(local);
        assert_eq!(field(&closed, "orig_dst"), plain.to_string(), "{closed}");
        assert_eq!(
            field(&closed, "source").parse::<SocketAddr>().unwrap().ip(),
            ip(f.client),
            "{closed}"
        );
        let seen_from_client = |listen: SocketAddr, what: &str| {
            let lines = nginx.requests_on(&listen.to_string());
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(&format!(" from={} ", f.client))),
                "{}: nginx should see the client's address {what}: {lines:#?}\n{}",
                f.name,
                nginx.logs()
            );
        };
        seen_from_client(plain, "over HTTP");

        let tls = sock(f.server, 443);
        let out = s_client(
            &t.cl,
            &[
                "-connect",
                &tls.to_string(),
                "-servername",
                "sv.example.test",
                "-quiet",
            ],
            b"GET / HTTP/1.0\r\nHost: sv.example.test\r\n\r\n",
        );
        assert!(
            out.stdout.ends_with("\r\n\r\ntls\n"),
            "{}: {}",
            f.name,
            out.describe()
        );
        d.wait_event("the TLS connection's close", Duration::from_secs(10), |e| {
            message(e) == Some("connection closed")
                && field_str(e, "orig_dst").as_deref() == Some(tls.to_string().as_str())
        });
        seen_from_client(tls, "over TLS");
    }
}

/// 8 MiB each way at once, each side half-closing when done, byte-exact,
/// through l4proxy on the bridge; the server sees the client's address.
#[test]
fn eight_mib_each_way_with_half_close() {
    const SIZE: usize = 8 << 20;
    let t = Bridged::new("br_bulk");
    let down = Arc::new(lab::random_bytes(SIZE, lab::seed()));
    let (tx, rx) = lab::reports();
    let servers = server_side(9000)
        .map(|at| Server::start(&t.sv, at, handlers::bulk(down.clone(), tx.clone())));
    let mut d = Daemon::start_ready(&t.br, &bridged_policy(&["to-cl"], json!([9000])), &[]);
    for (f, server) in FAMILIES.iter().zip(&servers) {
        let up = Arc::new(lab::random_bytes(SIZE, lab::seed() + 1));
        let mut c = connect(&t.cl, sock(f.server, 9000));
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let client = c.local_addr().unwrap();
        let got = lab::exchange(&mut c, up.clone())
            .unwrap_or_else(|e| panic!("{}: exchange: {e}", f.name));
        assert_eq!(got, lab::Received::of(&down), "{}: download", f.name);
        let at_server = lab::recv_report(&rx, f.name);
        assert_eq!(at_server, lab::Received::of(&up), "{}: upload", f.name);
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(
            accepted[0].peer.ip(),
            ip(f.client),
            "{}: the server sees the client",
            f.name
        );
        let closed = d.closed_event(client);
        assert_eq!(
            field(&closed, "orig_dst"),
            sock(f.server, 9000).to_string(),
            "{closed}"
        );
    }
}

/// A port the policy does not take, ICMP echo, and ARP/ND cross the bridge
/// untouched while l4proxy runs: the server sees the client's own
/// connection, the daemon logs none, pings are answered, and the client
/// resolves the router's MAC (not the bridge's) after its neighbour table
/// was flushed.
#[test]
fn other_ports_icmp_and_neighbour_discovery_are_bridged_untouched() {
    let t = Bridged::new("br_untouched");
    let direct = Server::echo_each(&t.sv, server_side(7000), "direct");
    let _proxied = Server::echo_each(&t.sv, server_side(80), "proxied");
    let mut d = Daemon::start_ready(
        &t.br,
        &bridged_policy(&["to-cl", "to-rt"], json!([80])),
        &[],
    );
    for ns in [&t.cl, &t.rt] {
        ns.ip(&["neigh", "flush", "all"]);
    }
    let router_mac = mac_of(&t.rt, "to-br");
    for (f, server) in FAMILIES.iter().zip(&direct) {
        // Control: port 80 is taken.
        let mut c = connect(&t.cl, sock(f.server, 80));
        let proxied = c.local_addr().unwrap();
        talk(&mut c, "proxied", &format!("{} port 80", f.name));
        d.closed_event(proxied);

        let mut c = connect(&t.cl, sock(f.server, 7000));
        let client = c.local_addr().unwrap();
        talk(&mut c, "direct", &format!("{} port 7000", f.name));
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(
            accepted[0].peer, client,
            "{}: the server sees the client's own connection",
            f.name
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !relayed(&d, client),
            "{}: the daemon relayed port 7000",
            f.name
        );

        assert!(
            ping(&t.cl, ip(f.server)),
            "{}: no echo reply from the server",
            f.name
        );

        let neighbours = t.cl.ip(&["neigh", "show", f.router]);
        assert!(
            neighbours.contains(&router_mac),
            "{}: the client should know the router's MAC {router_mac}: {neighbours:?}",
            f.name
        );
    }
}

/// A connection open before l4proxy starts is bridged on untouched: it
/// keeps working, and the daemon never sees it; a new one is taken.
#[test]
fn a_start_leaves_open_connections_alone() {
    let t = Bridged::new("br_before");
    let servers = Server::echo_each(&t.sv, server_side(80), "server");
    let mut before = Vec::new();
    for f in FAMILIES {
        let mut c = connect(&t.cl, sock(f.server, 80));
        assert_eq!(lab::read_line(&mut c).unwrap(), "server", "{}", f.name);
        before.push(c);
    }
    let mut d = Daemon::start_ready(&t.br, &bridged_policy(&["to-cl"], json!([80])), &[]);
    for ((f, c), server) in FAMILIES.iter().zip(&mut before).zip(&servers) {
        let what = format!("{}: opened before the start", f.name);
        lab::echo(c, "still bridged", &what);
        lab::finish(c, &what);
        let client = c.local_addr().unwrap();
        assert_eq!(server.accepted()[0].peer, client, "{what}");
        assert!(!relayed(&d, client), "{what}: the daemon relayed it");

        let mut c = connect(&t.cl, sock(f.server, 80));
        let client = c.local_addr().unwrap();
        talk(
            &mut c,
            "server",
            &format!("{}: opened after the start", f.name),
        );
        d.closed_event(client);
    }
}

/// Inbound transparent on a bridge (`bind: proxy`): the server sees the
/// bridge's own address, and its replies to it come back to this host.
#[test]
fn inbound_transparent_server_sees_the_bridge_address() {
    let t = Bridged::new("br_inbound");
    let servers = Server::echo_each(&t.sv, server_side(80), "server");
    let policy = bridged_policy_via(
        &["to-cl"],
        json!([80]),
        json!({ "original_destination": true, "bind": "proxy" }),
    );
    let mut d = Daemon::start_ready(&t.br, &policy, &[]);
    for ((f, server), bridge) in FAMILIES.iter().zip(&servers).zip([BR4, BR6]) {
        let mut c = connect(&t.cl, sock(f.server, 80));
        let client = c.local_addr().unwrap();
        talk(&mut c, "server", &format!("{} inbound transparent", f.name));
        d.closed_event(client);
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(
            accepted[0].peer.ip(),
            ip(bridge),
            "{}: the server sees the bridge",
            f.name
        );
    }
}

/// The MAC address of `dev` in `ns`.
fn mac_of(ns: &Netns, dev: &str) -> String {
    ns.link(dev)["address"].as_str().unwrap().to_owned()
}

/// Sends one ICMP echo request from `ns` to `to` (a raw socket: the lab
/// has no `ping`) and waits 3 s for the matching reply.
fn ping(ns: &Netns, to: IpAddr) -> bool {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    ns.run(move || {
        let (domain, protocol, request, reply) = match to {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
        };
        let socket = Socket::new(domain, Type::RAW, Some(protocol)).expect("raw ICMP socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let id = (std::process::id() & 0xffff) as u16;
        let mut packet = vec![request, 0, 0, 0];
        packet.extend_from_slice(&id.to_be_bytes());
        packet.extend_from_slice(&1u16.to_be_bytes());
        packet.extend_from_slice(b"l4proxy bridge test");
        if to.is_ipv4() {
            // The kernel fills in ICMPv6 checksums, not ICMPv4 ones.
            let sum = internet_checksum(&packet);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        socket
            .send_to(&packet, &SockAddr::from(SocketAddr::new(to, 0)))
            .expect("sending the echo request");
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while std::time::Instant::now() < deadline {
            let Ok((n, _)) = socket.recv_from(&mut buf) else {
                return false;
            };
            // SAFETY: recv_from initialised the first n bytes.
            let got: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            // An IPv4 raw socket receives the IP header too.
            let icmp = if to.is_ipv4() {
                &got[usize::from(got[0] & 0x0f) * 4..]
            } else {
                &got[..]
            };
            if icmp.len() >= 6 && icmp[0] == reply && icmp[4..6] == id.to_be_bytes() {
                return true;
            }
        }
        false
    })
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Path MTU on the server side: the router's link to the server has 1280
/// bytes, the server says 1460 in its MSS. l4proxy's upstream connection,
/// from the client's address, sends full-size segments; the router's
/// "fragmentation needed" / "packet too big" goes to the client's address
/// and MAC, and must reach l4proxy's socket across the bridge.
#[test]
fn path_mtu_discovery_works_with_a_smaller_mtu_on_the_server_side() {
    const SIZE: usize = 2 << 20;
    let t = Bridged::new("br_pmtu");
    t.rt.ip(&["link", "set", "to-sv", "mtu", "1280"]);
    let (tx, rx) = lab::reports();
    let reply = Arc::new(b"done".to_vec());
    let _sinks = server_side(8080).map(|at| {
        Server::start(
            &t.sv,
            at,
            handlers::sink_then_send(reply.clone(), tx.clone()),
        )
    });
    let mut d = Daemon::start_ready(&t.br, &bridged_policy(&["to-cl"], json!([8080])), &[]);
    let data = lab::random_bytes(SIZE, lab::seed());
    for f in FAMILIES {
        let to = sock(f.server, 8080);
        let mut c = connect(&t.cl, to);
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let client = c.local_addr().unwrap();
        lab::send_and_shutdown(&mut c, &data)
            .unwrap_or_else(|e| panic!("{to}: sending {SIZE} bytes: {e}"));
        let got = lab::recv_report(&rx, f.name);
        assert_eq!(got, lab::Received::of(&data), "{to}: the server's copy");
        assert_eq!(lab::read_to_eof(&mut c).unwrap().len, 4, "{to}: the reply");
        d.closed_event(client);
    }
    // The router's errors did reach l4proxy's sockets across the bridge.
    d.stop(Duration::from_secs(10));
    assert!(
        d.exit_counter("marked_icmp") > 0,
        "no ICMP error was delivered to l4proxy"
    );
}

/// The bridge's interfaces, where `classify` may be attached.
const BRIDGE_DEVS: [&str; 3] = ["to-cl", "to-rt", "br0"];

/// Starts the daemon on the bridge, checks that its kernel state is there
/// and works, ends it with `signal`, and checks that nothing is left and the
/// bridge forwards as before: port 80 (no server there) is refused again,
/// another port reaches the server from the client itself.
fn nothing_left_after(test: &str, signal: i32) {
    let t = Bridged::new(test);
    let servers = Server::echo_each(&t.sv, server_side(8080), "server");
    let policy = bridged_policy_via(&["to-cl"], json!([80]), to_server_port(8080));
    let rules_before = t.br.all_rules();
    let mut d = Daemon::start_ready(&t.br, &policy, &[]);
    let tc = t.br.tc_programs(&BRIDGE_DEVS);
    assert_eq!(
        tc,
        ["to-cl: classify", "to-rt: classify", "br0: classify"],
        "while running, classify should be on the ports (and the bridge, for replies)"
    );
    assert!(
        t.br.proxy_rules().iter().any(|r| r.contains("fwmark")),
        "fwmark rule"
    );
    for f in FAMILIES {
        let mut c = connect(&t.cl, sock(f.server, 80));
        talk(&mut c, "server", &format!("{} while running", f.name));
    }

    d.end_with(signal);
    t.br.assert_nothing_left(&BRIDGE_DEVS, &rules_before);
    for (f, server) in FAMILIES.iter().zip(&servers) {
        let what = format!("{} bridged after the end", f.name);
        lab::assert_no_proxy(&t.cl, sock(f.server, 80), server, "server", &what);
    }
}

#[test]
fn nothing_left_after_sigterm() {
    nothing_left_after("br_left_term", libc::SIGTERM);
}

#[test]
fn nothing_left_after_sigkill() {
    nothing_left_after("br_left_kill", libc::SIGKILL);
}

/// SIGTERM with the bridge itself named in the rule: an open intercepted
/// connection keeps working through the grace period; one opened during
/// the drain is bridged past the proxy to its destination.
#[test]
fn draining_keeps_open_connections_and_bridges_new_ones_past() {
    let t = Bridged::new("br_drain");
    let direct = Server::echo_each(&t.sv, server_side(8080), "direct");
    let _proxied = Server::echo_each(&t.sv, server_side(9090), "proxied");
    let policy = bridged_policy_via(&["br0"], json!([8080]), to_server_port(9090));
    let mut d = Daemon::start_ready(&t.br, &policy, &["--grace-period", "30"]);
    let mut open = FAMILIES.map(|f| lab::connect_greeted(&t.cl, sock(f.server, 8080), "proxied"));

    d.drain();
    for (f, server) in FAMILIES.iter().zip(&direct) {
        let c = lab::connect_greeted(&t.cl, server.addr(), "direct");
        let client = c.local_addr().unwrap();
        assert_eq!(
            server.accepted().last().unwrap().peer,
            client,
            "{}: opened during the drain",
            f.name
        );
    }
    for (f, c) in FAMILIES.iter().zip(&mut open) {
        let what = format!("{}: open through the drain", f.name);
        lab::echo(c, "still here", &what);
        lab::finish(c, &what);
    }
    let status = d.wait_exit(Duration::from_secs(15));
    d.assert_exit_ok(status);
}

/// A bridge without an address of an intercepted family: the start-up
/// check says so and nothing is left behind.
#[test]
fn start_up_refuses_a_bridge_without_an_address() {
    let t = Bridged::bare("br_noaddr");
    let mut d = Daemon::start(&t.br, &bridged_policy(&["to-cl"], json!([80])), &[]);
    assert!(
        !d.wait_exit(Duration::from_secs(10)).success(),
        "started without an address on br0"
    );
    for reason in [
        "bridge br0 has no IPv4 address",
        "bridge br0 has no IPv6 address",
    ] {
        assert!(d.log_text().contains(reason), "{reason}: {}", d.log_text());
    }
    assert_eq!(t.br.proxy_rules(), Vec::<String>::new());
    assert_eq!(t.br.tc_programs(&BRIDGE_DEVS), Vec::<String>::new());
}

/// br_netfilter calls the firewall for a bridge whose own `nf_call_iptables`
/// is on, whatever the sysctl says: start-up warns naming the bridge and
/// the setting, and serves; the bridge's settings read as set. Without
/// br_netfilter (no `/proc/sys/net/bridge`: the tests do not load it, as
/// it would send every bridge of the host through iptables; where it is
/// loaded, as on these machines, the warning is asserted) the setting does
/// nothing, and there is no warning: the run says which it checked.
#[test]
fn start_up_warns_of_a_bridge_that_calls_the_firewall() {
    let t = Bridged::new("br_nfcall");
    let loaded = std::path::Path::new("/proc/sys/net/bridge").exists();
    if loaded {
        t.br.sysctl("net.bridge.bridge-nf-call-iptables", "0");
        t.br.sysctl("net.bridge.bridge-nf-call-ip6tables", "0");
    }
    t.br.ip(&[
        "link",
        "set",
        "br0",
        "type",
        "bridge",
        "nf_call_iptables",
        "1",
    ]);
    let mut d = Daemon::start_ready(&t.br, &bridged_policy(&["to-cl"], json!([80])), &[]);
    let warned =
        |e: &Value| message(e).is_some_and(|m| m.contains("bridge br0's nf_call_iptables is on"));
    eprintln!(
        "br_netfilter loaded: {loaded} ({})",
        if loaded {
            "the warning is asserted"
        } else {
            "only its absence can be"
        }
    );
    assert_eq!(
        d.events().iter().any(warned),
        loaded,
        "a warning of br0's nf_call_iptables only with br_netfilter loaded: {}",
        d.log_text()
    );
    assert!(
        !d.log_text().contains("nf_call_ip6tables is on"),
        "only the family whose setting is on: {}",
        d.log_text()
    );
    d.stop(Duration::from_secs(10));
    // What start-up reads, whether or not the module makes it matter: the
    // bridge's own settings, one on, one off.
    let index = t.br.link("br0")["ifindex"]
        .as_u64()
        .and_then(|index| u32::try_from(index).ok())
        .expect("br0's index");
    let nf_call = t.br.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(l4proxy::intercept::interfaces::bridge_nf_call(index))
            .expect("reading br0's settings")
    });
    assert_eq!(
        nf_call,
        [true, false],
        "br0's nf_call_iptables, nf_call_ip6tables"
    );
}
