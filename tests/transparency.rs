//! Transparency: gateway interception (the tc program and policy routing),
//! upstream connections from the client's address (`bind`), passthrough to the
//! original destination, and the pitfalls around them. Each test builds the
//! routed lab of tests/lab (cl — px — sv, sv's default route via px) and runs
//! every case in IPv4 and IPv6.

mod lab;

use std::net::{IpAddr, Shutdown, SocketAddr};
use std::time::Duration;

use lab::daemon::{field_str, field_string as field, message};
use lab::{
    Daemon, Server, Topo, addr, connect, connect_from, handlers, ip, sa, sock, talk, try_connect,
};
use serde_json::{Value, json};

/// The lab's addresses of one family.
#[derive(Clone, Copy, Debug)]
struct Family {
    name: &'static str,
    client: &'static str,
    /// px's address on the client side.
    px_client_side: &'static str,
    /// px's address on the server side.
    px_server_side: &'static str,
    server: &'static str,
    server_b: &'static str,
    loopback: &'static str,
    /// An address of the service prefix px takes as its own (192.0.2.0/24,
    /// 2001:db8:a::/64).
    service: &'static str,
}

const V4: Family = Family {
    name: "IPv4",
    client: addr::CL4,
    px_client_side: addr::PX4_CL,
    px_server_side: addr::PX4_SV,
    server: addr::SV4,
    server_b: addr::SV4_B,
    loopback: "127.0.0.1",
    service: "192.0.2.10",
};

const V6: Family = Family {
    name: "IPv6",
    client: addr::CL6,
    px_client_side: addr::PX6_CL,
    px_server_side: addr::PX6_SV,
    server: addr::SV6,
    server_b: addr::SV6_B,
    loopback: "::1",
    service: "2001:db8:a::10",
};

const FAMILIES: [Family; 2] = [V4, V6];

/// `ADDR:PORT` of both families, as a policy writes servers.
fn both(port: u16, pick: impl Fn(Family) -> &'static str) -> Vec<String> {
    FAMILIES
        .iter()
        .map(|&f| sock(pick(f), port).to_string())
        .collect()
}

/// One echo server per family in `ns`, on `pick`'s address and `port`,
/// greeting with `id`.
fn servers(
    ns: &lab::Netns,
    pick: impl Fn(Family) -> &'static str,
    port: u16,
    id: &str,
) -> Vec<Server> {
    Server::echo_each(ns, FAMILIES.map(|f| sock(pick(f), port)), id).into()
}

/// A gateway rule on px's client-side interface for sv's prefixes.
fn gateway_rule(ports: Value, upstream: &str) -> Value {
    json!({ "name": "gateway", "prefixes": ["203.0.113.0/24", "2001:db8:5::/64"],
            "ports": ports, "interfaces": ["to-cl"], "upstream": upstream })
}

/// One of the four proxy types of the seed slides: the client connects to
/// `dst`, px relays to the server on sv:8080 with `bind`; returns what the
/// server saw (peer, local) and the client's own address.
struct Seen {
    client: SocketAddr,
    peer: SocketAddr,
    local: SocketAddr,
    closed: Value,
}

fn proxy_type(
    test: &str,
    rule: Value,
    bind: &str,
    dst: impl Fn(Family) -> SocketAddr,
) -> Vec<Seen> {
    let t = Topo::new(test);
    let servers: Vec<Server> = servers(&t.sv, |f| f.server, 8080, "server");
    let policy = json!({
        "intercept": [rule],
        "upstreams": { "web": { "servers": both(8080, |f| f.server), "bind": bind } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let mut seen = Vec::new();
    for (f, server) in FAMILIES.iter().zip(&servers) {
        let to = dst(*f);
        let mut c = connect(&t.cl, to);
        assert_eq!(c.peer_addr().unwrap(), to, "{}: the client's peer", f.name);
        let client = c.local_addr().unwrap();
        assert_eq!(
            client.ip(),
            ip(f.client),
            "{}: the client's address",
            f.name
        );
        talk(&mut c, "server", &format!("{test} {} to {to}", f.name));
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(accepted.len(), 1, "{}: {accepted:?}", f.name);
        let closed = d.closed_event(client);
        assert_eq!(field(&closed, "orig_dst"), to.to_string(), "{closed}");
        assert_eq!(field(&closed, "bind"), bind, "{closed}");
        assert_eq!(
            field(&closed, "source"),
            accepted[0].peer.to_string(),
            "the logged source is what the server saw: {closed}"
        );
        seen.push(Seen {
            client,
            peer: accepted[0].peer,
            local: accepted[0].local,
            closed,
        });
    }
    seen
}

/// With `bind: proxy`, the server sees px's own address.
fn server_sees_px(seen: &[Seen]) {
    for (f, s) in FAMILIES.iter().zip(seen) {
        assert_eq!(
            s.peer.ip(),
            ip(f.px_server_side),
            "{}: the server sees px",
            f.name
        );
    }
}

/// Fully transparent (gateway interception, `bind: client`): the client
/// connects to a server address and port of its own choosing behind the
/// gateway; the server sees the client's address and port.
#[test]
fn fully_transparent() {
    let seen = proxy_type("full", gateway_rule(json!([80]), "web"), "client", |f| {
        sock(f.server_b, 80)
    });
    for (f, s) in FAMILIES.iter().zip(&seen) {
        assert_eq!(
            s.peer, s.client,
            "{}: the server sees the client itself",
            f.name
        );
        assert_eq!(s.local, sock(f.server, 8080), "{}", f.name);
        assert_eq!(field(&s.closed, "rule"), "gateway");
    }
}

/// Inbound transparent (gateway interception, `bind: proxy`): the client
/// connects to the server's address; the server sees the proxy.
#[test]
fn inbound_transparent() {
    let seen = proxy_type("inbound", gateway_rule(json!([80]), "web"), "proxy", |f| {
        sock(f.server_b, 80)
    });
    server_sees_px(&seen);
}

/// A rule on px's own client-side addresses, port 8000: the client names
/// the proxy.
fn explicit_rule() -> Value {
    json!({ "name": "explicit", "prefixes": ["198.51.100.1/32", "2001:db8:c::1/128"],
            "ports": [8000], "upstream": "web" })
}

/// Outbound transparent (the client names the proxy, `bind: client-ip`): the
/// server sees the client's address.
#[test]
fn outbound_transparent() {
    let seen = proxy_type("outbound", explicit_rule(), "client-ip", |f| {
        sock(f.px_client_side, 8000)
    });
    for (f, s) in FAMILIES.iter().zip(&seen) {
        assert_eq!(
            s.peer.ip(),
            s.client.ip(),
            "{}: the server sees the client's address",
            f.name
        );
    }
}

/// Explicit (not transparent): the client names the proxy, the server sees
/// the proxy.
#[test]
fn explicit_proxy() {
    let seen = proxy_type("explicit", explicit_rule(), "proxy", |f| {
        sock(f.px_client_side, 8000)
    });
    server_sees_px(&seen);
}

/// Passthrough (`original_destination`): connections to two different
/// servers behind the gateway each reach the server the client named, from
/// the client's address.
#[test]
fn passthrough_to_the_original_destination() {
    let t = Topo::new("passthrough");
    let mut servers = Vec::new();
    for f in FAMILIES {
        for (addr, id) in [(f.server, "a"), (f.server_b, "b")] {
            servers.push((
                f,
                sock(addr, 8080),
                id,
                Server::start(&t.sv, sock(addr, 8080), handlers::hello_echo(id)),
            ));
        }
    }
    let policy = json!({
        "intercept": [gateway_rule(json!([8080]), "origin")],
        "upstreams": { "origin": { "original_destination": true, "bind": "client-ip" } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    for (f, to, id, server) in &servers {
        let mut c = connect(&t.cl, *to);
        let client = c.local_addr().unwrap();
        talk(&mut c, id, &format!("{} passthrough to {to}", f.name));
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(
            accepted[0].peer.ip(),
            client.ip(),
            "{to} sees the client's address"
        );
        let closed = d.closed_event(client);
        assert_eq!(field(&closed, "upstream"), to.to_string(), "{closed}");
        assert_eq!(field(&closed, "orig_dst"), to.to_string(), "{closed}");
    }
    for (_, to, _, server) in &servers {
        assert_eq!(
            server.accepted().len(),
            1,
            "{to} got exactly its own connection"
        );
    }
}

/// A gateway rule takes forwarded connections only: a client reaching px's
/// own address inside the rule's prefixes gets px's own service, untouched;
/// and the proxy's own connection to an upstream on px inside those prefixes
/// (it arrives on loopback, not on the rule's interface) is not taken again.
#[test]
fn own_addresses_and_own_connections_are_not_taken() {
    let t = Topo::new("not_taken");
    let own_service = servers(&t.px, |f| f.px_server_side, 8080, "px-local");
    let _upstream = servers(&t.px, |f| f.px_server_side, 8081, "px-upstream");
    let _forwarded_to = servers(&t.sv, |f| f.server, 8080, "sv");
    let policy = json!({
        "intercept": [gateway_rule(json!([8080, 8081]), "on-px")],
        "upstreams": { "on-px": { "servers": both(8081, |f| f.px_server_side) } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    for (f, server) in FAMILIES.iter().zip(&own_service) {
        let to = sock(f.px_server_side, 8080);
        let mut c = connect(&t.cl, to);
        let client = c.local_addr().unwrap();
        talk(&mut c, "px-local", &format!("{} to px's own {to}", f.name));
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(accepted[0].peer, client, "{}: not proxied", f.name);

        // Forwarded traffic is taken, and relayed to the upstream on px.
        let mut c = connect(&t.cl, sock(f.server, 8080));
        let client = c.local_addr().unwrap();
        talk(
            &mut c,
            "px-upstream",
            &format!("{} through the gateway", f.name),
        );
        d.closed_event(client);
    }
    let closed = d
        .events()
        .into_iter()
        .filter(|e| message(e) == Some("connection closed"))
        .count();
    assert_eq!(closed, 2, "one relayed connection per family, no loop");
    d.stop(Duration::from_secs(10));
    // sk_lookup passed the two connections to px's own address and the
    // proxy's own two.
    assert_eq!(d.exit_counter("passed_local"), 2);
    assert_eq!(d.exit_counter("passed_other_interface"), 2);
}

/// An address px takes while the daemon runs (a VIP moving in) is one of
/// its own from then on: a client reaching it inside a gateway rule's
/// prefixes gets px's own service, not the proxy.
#[test]
fn an_address_added_later_is_left_alone() {
    let t = Topo::new("addr_later");
    let _upstream = servers(&t.px, |f| f.px_server_side, 8081, "px-upstream");
    let policy = json!({
        "intercept": [gateway_rule(json!([8080]), "on-px")],
        "upstreams": { "on-px": { "servers": both(8081, |f| f.px_server_side) } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);
    let vip = sa("203.0.113.77:8080");
    let greeting = || {
        let mut c = connect(&t.cl, vip);
        lab::read_line(&mut c).unwrap_or_else(|e| panic!("{vip}: greeting: {e}"))
    };
    // Not px's yet: forwarded, so taken by the gateway rule.
    assert_eq!(greeting(), "px-upstream", "before the address is px's");
    t.px.addr("to-sv", "203.0.113.77/32");
    let _own = Server::start(&t.px, vip, handlers::hello_echo("px-new"));
    let seen = lab::poll_until(Duration::from_secs(5), greeting, |g| g == "px-new");
    assert_eq!(
        seen, "px-new",
        "an address px took later is still taken by the proxy"
    );
}

/// With a gateway rule and transparent upstreams in force, a port the policy
/// does not name is forwarded as before: the server sees the client's own
/// connection, and the daemon never sees it.
#[test]
fn unlisted_port_is_forwarded_untouched() {
    let t = Topo::new("fwd_untouched");
    let _proxied = servers(&t.sv, |f| f.server, 8080, "proxied");
    let direct = servers(&t.sv, |f| f.server, 9090, "direct");
    let mut d = Daemon::start_ready(&t.px, &full_policy_on(80, 8080), &[]);
    for (i, f) in FAMILIES.iter().enumerate() {
        // Control: port 80 is intercepted.
        let mut c = connect(&t.cl, sock(f.server, 80));
        let proxied_client = c.local_addr().unwrap();
        talk(&mut c, "proxied", &format!("{} port 80", f.name));
        d.closed_event(proxied_client);

        let mut c = connect(&t.cl, sock(f.server, 9090));
        let client = c.local_addr().unwrap();
        talk(&mut c, "direct", &format!("{} port 9090", f.name));
        let accepted = direct[i].wait_accepted(1, Duration::from_secs(5));
        assert_eq!(
            accepted[0].peer, client,
            "{}: the server sees the client's own connection",
            f.name
        );
        std::thread::sleep(Duration::from_millis(200));
        let logged = d.events().into_iter().any(|e| {
            message(&e) == Some("connection closed")
                && field_str(&e, "client").as_deref() == Some(client.to_string().as_str())
        });
        assert!(
            !logged,
            "{}: the daemon relayed a connection to port 9090",
            f.name
        );
    }
}

/// A client on the proxy host itself (its own addresses, loopback) reaching
/// an intercepted address is relayed but not spoofed: the server sees the
/// proxy's address. A remote client of the same rule is spoofed (control).
#[test]
fn local_client_is_not_spoofed() {
    let t = Topo::new("local_client");
    let servers: Vec<Server> = servers(&t.sv, |f| f.server, 8080, "server");
    // One pool per family: a client that is not spoofed may be relayed to a
    // server of the other family, and each server must see its own.
    let policy = json!({
        "intercept": [
            { "name": "svc4", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "web4" },
            { "name": "svc6", "prefixes": ["2001:db8:a::/64"], "ports": [80], "upstream": "web6" }
        ],
        "upstreams": {
            "web4": { "servers": [sock(V4.server, 8080).to_string()], "bind": "client" },
            "web6": { "servers": [sock(V6.server, 8080).to_string()], "bind": "client" }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    for (f, server) in FAMILIES.iter().zip(&servers) {
        let to = sock(f.service, 80);
        let mut c = connect(&t.cl, to);
        let remote = c.local_addr().unwrap();
        talk(&mut c, "server", &format!("{} remote client", f.name));
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(
            accepted[0].peer, remote,
            "{}: a remote client is spoofed",
            f.name
        );

        for from in [f.px_client_side, f.loopback, f.px_server_side] {
            let mut c = connect_from(&t.px, sock(from, 0), to);
            let local_client = c.local_addr().unwrap();
            talk(&mut c, "server", &format!("{} from px's {from}", f.name));
            let closed = d.closed_event(local_client);
            let accepted = server.accepted();
            let last = accepted.last().unwrap();
            assert_eq!(
                last.peer.ip(),
                ip(f.px_server_side),
                "{}: a client on px ({local_client}) must not be spoofed",
                f.name
            );
            assert_eq!(
                field(&closed, "bind_fallback"),
                "client is this host: not spoofed",
                "{closed}"
            );
        }
    }
}

/// Proxy and server on the same host: the daemon routes the server's replies
/// to a client's address back to itself, so the server sees the client.
/// Servers on loopback and on px's own address.
#[test]
fn server_on_the_proxy_host_sees_the_client() {
    let t = Topo::new("same_host");
    let mut servers = Vec::new();
    for f in FAMILIES {
        for (addr, port) in [(f.loopback, 8080), (f.px_server_side, 8081)] {
            let listen = sock(addr, port);
            servers.push((
                f,
                listen,
                Server::start(&t.px, listen, handlers::hello_echo("on-px")),
            ));
        }
    }
    let policy = json!({
        "intercept": [
            { "name": "lo", "prefixes": ["192.0.2.10/32", "2001:db8:a::10/128"], "ports": [80], "upstream": "loopback" },
            { "name": "own", "prefixes": ["192.0.2.20/32", "2001:db8:a::20/128"], "ports": [80], "upstream": "own" }
        ],
        "upstreams": {
            "loopback": { "servers": ["127.0.0.1:8080", "[::1]:8080"], "bind": "client" },
            "own": { "servers": both(8081, |f| f.px_server_side), "bind": "client" }
        }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);
    for (f, listen, server) in &servers {
        let service = if listen.port() == 8080 {
            f.service
        } else {
            &f.service.replace("10", "20")
        };
        let mut c = connect(&t.cl, sock(service, 80));
        let client = c.local_addr().unwrap();
        talk(
            &mut c,
            "on-px",
            &format!("{} to the server on px at {listen}", f.name),
        );
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(
            accepted[0].peer, client,
            "the server at {listen} sees the client"
        );
    }
    let rules = t.px.proxy_rules();
    for (_, listen, _) in &servers {
        assert!(
            rules
                .iter()
                .any(|r| r.contains(&format!("from {}", listen.ip()))
                    && r.contains(&format!("sport {}", listen.port()))),
            "a rule for the replies of {listen}: {rules:#?}"
        );
    }
}

/// `bind: client` towards the original destination would repeat the
/// client's own 4-tuple: the port is left to the kernel (client-ip).
#[test]
fn client_port_to_the_original_destination_falls_back_to_client_ip() {
    let t = Topo::new("four_tuple");
    let servers: Vec<Server> = servers(&t.sv, |f| f.server, 8080, "server");
    let policy = json!({
        "intercept": [ { "name": "gateway", "prefixes": ["203.0.113.2/32", "2001:db8:5::2/128"],
                         "ports": [8080], "interfaces": ["to-cl"], "upstream": "web" } ],
        "upstreams": { "web": { "servers": both(8080, |f| f.server), "bind": "client" } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    for (f, server) in FAMILIES.iter().zip(&servers) {
        let mut c = connect(&t.cl, sock(f.server, 8080));
        let client = c.local_addr().unwrap();
        talk(
            &mut c,
            "server",
            &format!("{} to {}:8080", f.name, f.server),
        );
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(
            accepted[0].peer.ip(),
            client.ip(),
            "{}: the client's address",
            f.name
        );
        assert_ne!(
            accepted[0].peer.port(),
            client.port(),
            "{}: not the client's port",
            f.name
        );
        let closed = d.closed_event(client);
        assert!(
            field(&closed, "bind_fallback").contains("client-ip"),
            "{closed}"
        );
    }
}

/// Towards the client's original destination with `client-ip`, the kernel
/// would take the client's own port now and then (it sees no clash: the
/// client's connection is held on px the other way round), and the
/// upstream connection would be the client's again, which a firewall's
/// connection tracking takes for one. px's ports narrowed to two, the
/// client on one of them: every upstream connection takes the other.
#[test]
fn client_ip_to_the_original_destination_never_takes_the_clients_port() {
    const PORTS: std::ops::Range<u16> = 8080..8085;
    let t = Topo::new("other_port");
    let servers: Vec<(Family, u16, Server)> = FAMILIES
        .iter()
        .flat_map(|&f| PORTS.map(move |port| (f, port)))
        .map(|(f, port)| {
            let server = Server::start(&t.sv, sock(f.server, port), handlers::hello_echo("origin"));
            (f, port, server)
        })
        .collect();
    let policy = json!({
        "intercept": [gateway_rule(json!(["8080-8084"]), "origin")],
        "upstreams": { "origin": { "original_destination": true, "bind": "client-ip" } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);
    // Narrowed once the daemon's listeners have their ports (from the
    // default range, which ends at 60999); a reload has the daemon read the
    // range again at once (it does every few seconds too).
    t.px.sysctl("net.ipv4.ip_local_port_range", "61000 61001");
    let reload = lab::daemon::command(&t.px, &["reload"], Duration::from_secs(10));
    assert!(reload.success(), "{reload:?}");
    for (f, port, server) in &servers {
        let to = sock(f.server, *port);
        let from = sock(f.client, 61000);
        // Reused at once for the next destination (the helper allows it).
        let mut c = connect_from(&t.cl, from, to);
        talk(&mut c, "origin", &format!("{} to {to}", f.name));
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(
            accepted[0].peer,
            sock(f.client, 61001),
            "{to}: the client's address, px's other port"
        );
    }
}

/// A connection forwarded through px before the daemon starts is not reset
/// by the start: only new connections (SYNs) and those the daemon owns are
/// taken. A new connection to the same port is. The kernel's `steered`
/// counts the new connections only, not the forwarded one's packets
/// (`classify` looks up their sockets, which runs `steer`).
#[test]
fn a_start_leaves_forwarded_connections_alone() {
    let t = Topo::new("start_keeps");
    let _servers = servers(&t.sv, |f| f.server, 8080, "server");
    let mut before = Vec::new();
    for f in FAMILIES {
        let mut c = connect(&t.cl, sock(f.server, 8080));
        assert_eq!(lab::read_line(&mut c).unwrap(), "server", "{}", f.name);
        before.push(c);
    }
    let mut d = Daemon::start_ready(&t.px, &full_policy_on(8080, 9090), &[]);
    let _proxied = servers(&t.sv, |f| f.server, 9090, "proxied");
    for (f, c) in FAMILIES.iter().zip(&mut before) {
        lab::echo(
            c,
            &format!("{} after the start", f.name),
            &format!("{}: the forwarded connection", f.name),
        );
        let mut n = connect(&t.cl, sock(f.server, 8080));
        talk(&mut n, "proxied", &format!("{} new connection", f.name));
    }
    drop(before);
    d.stop(Duration::from_secs(15));
    assert_eq!(d.exit_counter("steered"), 2, "{}", d.log_text());
}

/// Under a SYN flood the listener answers with SYN cookies and keeps no
/// state: the handshake's last ACK, which no socket owns yet, must still
/// reach it (`net.ipv4.tcp_syncookies=2` sends cookies always).
#[test]
fn syn_cookie_handshakes_complete() {
    let t = Topo::new("syncookies");
    t.px.sysctl("net.ipv4.tcp_syncookies", "2");
    let _proxied = servers(&t.sv, |f| f.server, 9090, "proxied");
    let _d = Daemon::start_ready(&t.px, &full_policy_on(8080, 9090), &[]);
    let before = syncookies_received(&t.px);
    for f in FAMILIES {
        let mut c = connect(&t.cl, sock(f.server, 8080));
        talk(&mut c, "proxied", &format!("{} with SYN cookies", f.name));
    }
    let received = syncookies_received(&t.px) - before;
    assert!(
        received >= 2,
        "the listener must have answered with SYN cookies and seen them back: \
         TcpExt SyncookiesRecv rose by {received}"
    );
}

/// `TcpExt: SyncookiesRecv` of `ns`: handshakes completed from a valid cookie.
fn syncookies_received(ns: &lab::Netns) -> u64 {
    let netstat = lab::must(
        "ip",
        &["netns", "exec", ns.name(), "cat", "/proc/net/netstat"],
    );
    let tcp_ext: Vec<&str> = netstat
        .lines()
        .filter(|line| line.starts_with("TcpExt:"))
        .collect();
    let [names, values] = tcp_ext[..] else {
        panic!(
            "no TcpExt lines in /proc/net/netstat of {}:\n{netstat}",
            ns.name()
        );
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "SyncookiesRecv")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or_else(|| panic!("no SyncookiesRecv in /proc/net/netstat:\n{netstat}"))
}

/// `dev` in `ns` gets a tc program within 5 s (`log`: the daemon's, for
/// the failure message).
fn assert_tc_soon(ns: &lab::Netns, dev: &str, log: &str) {
    let programs = lab::poll_until(
        Duration::from_secs(5),
        || ns.tc_programs(&[dev]),
        |p| !p.is_empty(),
    );
    assert!(
        !programs.is_empty(),
        "no tc program on {dev} 5 s after it appeared\n{log}"
    );
}

/// An interface that appears after start-up (a VPN, a new link) gets the tc
/// program: a server behind it, connected to from the client's address,
/// answers through it.
#[test]
fn an_interface_added_later_carries_replies() {
    let t = Topo::new("new_link");
    let policy = json!({
        "intercept": [ { "name": "svc", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "late" } ],
        "upstreams": { "late": { "servers": ["203.0.113.200:8080"], "bind": "client" } }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);
    assert_eq!(t.px.tc_programs(&["to-cl", "to-sv"]).len(), 2);

    let sv2 = lab::Netns::new("new_link", "sv2");
    lab::veth(&t.px, "to-sv2", &sv2, "to-px2");
    t.px.ip(&["route", "add", "203.0.113.200/32", "dev", "to-sv2"]);
    sv2.addr("to-px2", "203.0.113.200/32");
    sv2.ip(&[
        "route",
        "add",
        "default",
        "via",
        addr::PX4_SV,
        "dev",
        "to-px2",
        "onlink",
    ]);
    let server = Server::start(
        &sv2,
        sock("203.0.113.200", 8080),
        handlers::hello_echo("late"),
    );

    assert_tc_soon(&t.px, "to-sv2", "");
    let mut c = connect(&t.cl, sock(V4.service, 80));
    let client = c.local_addr().unwrap();
    talk(&mut c, "late", "through the new interface");
    assert_eq!(
        server.wait_accepted(1, Duration::from_secs(5))[0].peer,
        client
    );
}

/// An interface a gateway rule lists that goes away (a VPN taken down)
/// does not stop the daemon following the host: a link added afterwards
/// still gets the tc program.
#[test]
fn a_listed_interface_gone_does_not_stop_following_the_host() {
    let t = Topo::new("gone_link");
    // A veth pair within px stands for it (no dummy driver here).
    t.px.ip(&[
        "link", "add", "dum0", "type", "veth", "peer", "name", "dum1",
    ]);
    t.px.ip(&["link", "set", "dum0", "up"]);
    let mut rule = gateway_rule(json!([8080]), "web");
    rule["interfaces"] = json!(["to-cl", "dum0"]);
    let policy = json!({
        "intercept": [rule],
        "upstreams": { "web": { "servers": both(8080, |f| f.server), "bind": "client" } }
    });
    let d = Daemon::start_ready(&t.px, &policy, &[]);
    t.px.ip(&["link", "del", "dum0"]);
    let sv2 = lab::Netns::new("gone_link", "sv2");
    lab::veth(&t.px, "to-sv2", &sv2, "to-px2");
    assert_tc_soon(&t.px, "to-sv2", &d.log_text());
}

/// A gateway rule on `port` relaying to sv's `to_port` from the client's
/// address: gateway interception and transparent upstreams, so that every
/// kind of kernel state is in use.
fn full_policy_on(port: u16, to_port: u16) -> Value {
    json!({
        "intercept": [gateway_rule(json!([port]), "web")],
        "upstreams": { "web": { "servers": both(to_port, |f| f.server), "bind": "client" } }
    })
}

/// Path-MTU discovery through the proxy: between px and the server a router
/// (rt) has a 1280-byte link; the server itself has 1500 and says so in its
/// MSS. The proxy's upstream connection, from the client's address, sends
/// full-size segments; rt answers "fragmentation needed" / "packet too big"
/// to the client's address, which the tc program must deliver to the proxy's
/// socket (as `-m socket` does): otherwise the transfer stalls.
#[test]
fn path_mtu_discovery_works_for_connections_from_the_clients_address() {
    use lab::{Netns, veth};
    const SIZE: usize = 2 << 20;
    let cl = Netns::new("pmtu", "cl");
    let px = Netns::new("pmtu", "px");
    let rt = Netns::new("pmtu", "rt");
    let sv = Netns::new("pmtu", "sv");
    veth(&cl, "to-px", &px, "to-cl");
    veth(&px, "to-rt", &rt, "to-px");
    veth(&rt, "to-sv", &sv, "to-rt");
    for (ns, dev, cidrs) in [
        (&cl, "to-px", ["198.51.100.2/24", "2001:db8:c::2/64"]),
        (&px, "to-cl", ["198.51.100.1/24", "2001:db8:c::1/64"]),
        (&px, "to-rt", ["203.0.113.1/25", "2001:db8:5::1/112"]),
        (&rt, "to-px", ["203.0.113.2/25", "2001:db8:5::2/112"]),
        (&rt, "to-sv", ["203.0.113.129/25", "2001:db8:5::1:1/112"]),
        (&sv, "to-rt", ["203.0.113.130/25", "2001:db8:5::1:2/112"]),
    ] {
        for cidr in cidrs {
            ns.addr(dev, cidr);
        }
    }
    rt.ip(&["link", "set", "to-sv", "mtu", "1280"]);
    for ns in [&px, &rt] {
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    }
    cl.route("default", "198.51.100.1");
    cl.route("default", "2001:db8:c::1");
    px.route("203.0.113.128/25", "203.0.113.2");
    px.route("2001:db8:5::1:0/112", "2001:db8:5::2");
    rt.route("default", "203.0.113.1");
    rt.route("default", "2001:db8:5::1");
    sv.route("default", "203.0.113.129");
    sv.route("default", "2001:db8:5::1:1");

    let (tx, rx) = lab::reports();
    let reply = std::sync::Arc::new(b"done".to_vec());
    let _sinks: Vec<Server> = ["203.0.113.130:8080", "[2001:db8:5::1:2]:8080"]
        .iter()
        .map(|a| {
            Server::start(
                &sv,
                lab::sa(a),
                handlers::sink_then_send(reply.clone(), tx.clone()),
            )
        })
        .collect();
    let policy = json!({
        "intercept": [ { "name": "gateway", "prefixes": ["203.0.113.128/25", "2001:db8:5::1:0/112"],
                         "ports": [8080], "interfaces": ["to-cl"], "upstream": "origin" } ],
        "upstreams": { "origin": { "original_destination": true, "bind": "client-ip" } }
    });
    let mut d = Daemon::start_ready(&px, &policy, &[]);
    let data = lab::random_bytes(SIZE, lab::seed());
    for to in ["203.0.113.130:8080", "[2001:db8:5::1:2]:8080"] {
        let mut c = connect(&cl, lab::sa(to));
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let client = c.local_addr().unwrap();
        lab::send_and_shutdown(&mut c, &data)
            .unwrap_or_else(|e| panic!("{to}: sending {SIZE} bytes: {e}"));
        let got = lab::recv_report(&rx, to);
        assert_eq!(got, lab::Received::of(&data), "{to}: the server's copy");
        assert_eq!(lab::read_to_eof(&mut c).unwrap().len, 4, "{to}: the reply");
        // Through the proxy (px forwards too: without it the kernel's own
        // path-MTU discovery would carry the transfer).
        let ev = d.closed_event(client);
        assert_eq!(field_str(&ev, "outcome").as_deref(), Some("closed"), "{ev}");
    }
    // The router's errors reached the proxy's upstream sockets.
    d.stop(Duration::from_secs(10));
    assert!(
        d.exit_counter("marked_icmp") > 0,
        "no ICMP error was delivered to l4proxy"
    );
}

/// Starts the daemon with `full_policy_on(80, 8080)`, checks that its kernel state is
/// there and works, ends it with `signal`, and checks that nothing is left:
/// no tc program, routing rule or route, and traffic is forwarded as before.
fn nothing_left_after(test: &str, signal: i32) {
    let t = Topo::new(test);
    let servers: Vec<Server> = servers(&t.sv, |f| f.server, 8080, "server");
    let rules_before = t.px.all_rules();
    let mut d = Daemon::start_ready(&t.px, &full_policy_on(80, 8080), &[]);

    let tc = t.px.tc_programs(&["to-cl", "to-sv"]);
    assert_eq!(
        tc,
        ["to-cl: classify", "to-sv: classify"],
        "while running, classify should be on both interfaces"
    );
    let rules = t.px.proxy_rules();
    assert!(
        rules.iter().any(|r| r.contains("fwmark")),
        "fwmark rule: {rules:#?}"
    );
    let routes = t.px.proxy_routes();
    assert!(
        routes.iter().any(|r| r.contains("table 244")),
        "table 244 routes: {routes:#?}"
    );
    let mut c = connect(&t.cl, sock(V4.server_b, 80));
    talk(&mut c, "server", "while running");

    d.end_with(signal);
    t.px.assert_nothing_left(&["to-cl", "to-sv"], &rules_before);
    for (f, server) in FAMILIES.iter().zip(&servers) {
        // Port 80 on sv has no listener: without the proxy it is refused.
        let what = format!("{} forwarded after the end", f.name);
        lab::assert_no_proxy(&t.cl, sock(f.server_b, 80), server, "server", &what);
    }
}

/// 802.1p priority tags (VLAN ID 0, as VoIP phones and DCB switches send)
/// carry no VLAN: the kernel takes such a frame as untagged on the same
/// interface, so a gateway rule must take it too. The client sends one
/// SYN, tagged with priority 5, to an intercepted destination (a raw
/// frame: this kernel has neither 8021q nor act_vlan); `classify` marks it.
#[test]
fn priority_tagged_frames_are_intercepted() {
    let t = Topo::new("prio_tag");
    let mut d = Daemon::start_ready(&t.px, &full_policy_on(8080, 9090), &[]);
    let frame = syn_frame(
        mac(&t.px, "to-cl"),
        mac(&t.cl, "to-px"),
        Some(0xa000),
        sock(V4.client, 40_000),
        sock(V4.server_b, 8080),
    );
    send_from_client(&t, &frame);
    wait_until_steered(&t);
    d.stop(Duration::from_secs(15));
    // The SYN was marked and steered to the daemon (the client's reset
    // of the daemon's SYN-ACK, untagged, is marked too).
    assert_eq!(d.exit_counter("steered"), 1, "{}", d.log_text());
    assert!(d.exit_counter("marked_intercept") >= 1, "{}", d.log_text());
}

/// An Ethernet frame holding a TCP SYN from `src` to `dst` (IPv4 or IPv6,
/// one family), with an 802.1Q tag `tci` if one is given.
fn syn_frame(
    to: [u8; 6],
    from: [u8; 6],
    tci: Option<u16>,
    src: SocketAddr,
    dst: SocketAddr,
) -> Vec<u8> {
    let sum = |bytes: &[u8], mut acc: u32| {
        for pair in bytes.chunks(2) {
            acc += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    };
    let octets = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let mut tcp = Vec::new();
    tcp.extend(src.port().to_be_bytes());
    tcp.extend(dst.port().to_be_bytes());
    tcp.extend(1u32.to_be_bytes()); // sequence
    tcp.extend(0u32.to_be_bytes()); // acknowledgement
    tcp.extend([5 << 4, 0x02]); // 20 bytes, SYN
    tcp.extend(64_240u16.to_be_bytes()); // window
    tcp.extend([0, 0, 0, 0]); // checksum, urgent pointer
    let mut pseudo = octets(src);
    pseudo.extend(octets(dst));
    if src.is_ipv4() {
        pseudo.extend([0, 6]);
        pseudo.extend((tcp.len() as u16).to_be_bytes());
    } else {
        pseudo.extend((tcp.len() as u32).to_be_bytes());
        pseudo.extend([0, 0, 0, 6]);
    }
    pseudo.extend(&tcp);
    let check = sum(&pseudo, 0);
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    let (ethertype, mut ip) = if src.is_ipv4() {
        let mut ip = vec![0x45, 0];
        ip.extend(((20 + tcp.len()) as u16).to_be_bytes());
        ip.extend([0, 1, 0x40, 0, 64, 6, 0, 0]); // id, DF, TTL, TCP, checksum
        ip.extend(octets(src));
        ip.extend(octets(dst));
        let check = sum(&ip, 0);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        (0x0800u16, ip)
    } else {
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend((tcp.len() as u16).to_be_bytes());
        ip.extend([6, 64]); // TCP, hop limit
        ip.extend(octets(src));
        ip.extend(octets(dst));
        (0x86ddu16, ip)
    };
    ip.extend(tcp);
    let mut frame = Vec::new();
    frame.extend(to);
    frame.extend(from);
    if let Some(tci) = tci {
        frame.extend(0x8100u16.to_be_bytes());
        frame.extend(tci.to_be_bytes());
    }
    frame.extend(ethertype.to_be_bytes());
    frame.extend(ip);
    frame
}

/// An IPv6 SYN to an IPv4-mapped address (`::ffff:203.0.113.3`) on a
/// gateway interface matches no IPv4 rule, though the kernel's rule map
/// keys IPv4 prefixes IPv4-mapped: `classify` leaves it alone and `steer`
/// takes none (without l4proxy it goes nowhere; with, it would reach an
/// IPv4 server through the proxy).
#[test]
fn an_ipv6_syn_to_an_ipv4_mapped_address_matches_no_ipv4_rule() {
    let t = Topo::new("v4_mapped");
    let mapped = V4
        .server_b
        .parse::<std::net::Ipv4Addr>()
        .unwrap()
        .to_ipv6_mapped();
    // The mapped SYN, then a positive control: the same SYN to the IPv4
    // address, sent after it on the same link. Once the control is
    // counted, the mapped one has been through the kernel's look-up too.
    let mut d = Daemon::start_ready(&t.px, &full_policy_on(8080, 9090), &[]);
    for (src, dst) in [
        (
            sock(V6.client, 40_000),
            SocketAddr::new(mapped.into(), 8080),
        ),
        (sock(V4.client, 40_001), sock(V4.server_b, 8080)),
    ] {
        let frame = syn_frame(mac(&t.px, "to-cl"), mac(&t.cl, "to-px"), None, src, dst);
        send_from_client(&t, &frame);
    }
    wait_until_steered(&t);
    d.stop(Duration::from_secs(15));
    assert_eq!(
        d.exit_counter("steered"),
        1,
        "only the IPv4 SYN: {}",
        d.log_text()
    );
}

/// The MAC address of `dev` in `ns`.
fn mac(ns: &lab::Netns, dev: &str) -> [u8; 6] {
    let bytes: Vec<u8> = ns.link(dev)["address"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// Sends `frame` out of the client's interface towards px.
fn send_from_client(t: &Topo, frame: &[u8]) {
    let index = t.cl.link("to-px")["ifindex"].as_i64().unwrap() as i32;
    t.cl.run(|| send_frame(index, frame)).unwrap();
}

/// Waits until the running daemon's kernel counts a steered connection
/// (its `status`), so that the exact count read at its exit is final.
fn wait_until_steered(t: &Topo) {
    let steered = |status: &Value| lab::daemon::kernel_counter(status, "steered");
    let status = lab::poll_until(
        Duration::from_secs(10),
        || lab::daemon::status(&t.px),
        |status| steered(status) >= Some(1),
    );
    assert!(
        steered(&status) >= Some(1),
        "nothing steered within 10 s: {status}"
    );
}

/// Sends `frame` as it is out of interface `index` (an AF_PACKET socket
/// of the calling thread's namespace).
fn send_frame(index: i32, frame: &[u8]) -> std::io::Result<()> {
    // SAFETY: plain socket calls; `address` and `frame` outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut address: libc::sockaddr_ll = std::mem::zeroed();
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = index;
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&frame[..6]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if sent == frame.len() as isize {
            Ok(())
        } else {
            Err(error)
        }
    }
}

/// Another program's routing rule that looks the daemon's table up would
/// have its packets delivered to this host: the daemon refuses to start,
/// says why, and leaves nothing behind.
#[test]
fn a_routing_rule_on_the_table_refuses_the_start() {
    let t = Topo::new("table_taken");
    t.px.ip(&[
        "rule",
        "add",
        "pref",
        "500",
        "from",
        "192.0.2.99",
        "lookup",
        "244",
    ]);
    assert_start_refused(
        &t,
        "routing table 244 is looked up by a routing rule l4proxy did not add",
    );
}

/// A daemon started in px with [`full_policy_on`] exits with a failure,
/// having logged `why`, and leaves nothing behind.
fn assert_start_refused(t: &Topo, why: &str) {
    let rules_before = t.px.all_rules();
    let mut d = Daemon::start(&t.px, &full_policy_on(80, 8080), &[]);
    let status = d.wait_exit(Duration::from_secs(15));
    assert!(!status.success(), "{status}");
    let log = d.log_text();
    assert!(log.contains(why), "{log}");
    t.px.assert_nothing_left(&["to-cl", "to-sv"], &rules_before);
}

/// Another program's routing rule before the daemon's that looks at its
/// packet mark (here its top byte only: `fwmark 0x4c000000/0xff000000`)
/// would route what `classify` marks: the daemon refuses to start, says
/// why, and leaves nothing behind.
#[test]
fn a_routing_rule_on_the_mark_refuses_the_start() {
    let t = Topo::new("mark_taken");
    t.px.ip(&[
        "rule",
        "add",
        "pref",
        "100",
        "fwmark",
        "0x4c000000/0xff000000",
        "lookup",
        "100",
    ]);
    assert_start_refused(&t, "a routing rule already uses fwmark 0x4c340000");

    // Rules on bits the mark leaves alone, or that the mark does not
    // satisfy (Calico's `not fwmark 0x100000/0x100000`, which it does), or
    // after the daemon's: no conflict.
    t.px.ip(&["rule", "del", "pref", "100"]);
    for rule in [
        "pref 99 not fwmark 0x100000/0x100000 lookup 101",
        "pref 98 fwmark 0x4000/0x4000 lookup 102",
        "pref 300 fwmark 0x4c000000/0xff000000 lookup 103",
    ] {
        let mut args = vec!["rule", "add"];
        args.extend(rule.split(' '));
        t.px.ip(&args);
    }
    let _servers = servers(&t.sv, |f| f.server, 8080, "server");
    let _d = Daemon::start_ready(&t.px, &full_policy_on(80, 8080), &[]);
    let mut c = connect(&t.cl, sock(V4.server_b, 80));
    talk(&mut c, "server", "beside other programs' mark rules");
}

#[test]
fn nothing_left_after_sigterm() {
    nothing_left_after("left_term", libc::SIGTERM);
}

#[test]
fn nothing_left_after_sigkill() {
    nothing_left_after("left_kill", libc::SIGKILL);
}

/// SIGTERM on a gateway: an open intercepted connection, relayed from the
/// client's address, keeps working through the grace period; a new
/// connection is forwarded to its destination as if l4proxy were not there;
/// the daemon exits once the open one closes.
#[test]
fn draining_keeps_open_connections_and_forwards_new_ones() {
    let t = Topo::new("drain");
    let direct = servers(&t.sv, |f| f.server, 8080, "direct");
    let _proxied = servers(&t.sv, |f| f.server, 9090, "proxied");
    let mut d = Daemon::start_ready(
        &t.px,
        &full_policy_on(8080, 9090),
        &["--grace-period", "30"],
    );
    let mut open = FAMILIES.map(|f| lab::connect_greeted(&t.cl, sock(f.server, 8080), "proxied"));

    d.drain();
    for ((f, c), server) in FAMILIES.iter().zip(&mut open).zip(&direct) {
        lab::echo(
            c,
            &format!("{} after SIGTERM", f.name),
            &format!("{}: during the drain", f.name),
        );

        lab::assert_reaches_directly(
            &t.cl,
            server,
            "direct",
            &format!("{} new connection while draining", f.name),
        );
    }
    assert!(d.try_exit().is_none(), "exited with connections open");

    for mut c in open {
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(lab::read_to_eof(&mut c).unwrap().len, 0);
    }
    let status = d.wait_exit(Duration::from_secs(10));
    d.assert_exit_ok(status);
    assert_eq!(t.px.proxy_rules(), Vec::<String>::new());
    assert_eq!(t.px.tc_programs(&["to-cl", "to-sv"]), Vec::<String>::new());
}

/// While draining, a new connection that reuses the addresses and ports of
/// one the proxy closed first (its socket is in TIME-WAIT here) is
/// forwarded like any other: its SYN was, and so are the packets after it,
/// which the TIME-WAIT socket took and dropped (clients that pick ports at
/// random reuse one within a minute now and then). With the kernel's early
/// demultiplexing on (its default), the kernel itself drops such forwarded
/// packets (it hands them to the local socket, and a packet with one is
/// not forwarded): the test turns it off to see what `classify` does.
#[test]
fn draining_forwards_a_new_connection_on_a_closed_ones_ports() {
    let t = Topo::new("drain-tw");
    t.px.sysctl("net.ipv4.tcp_early_demux", "0");
    let direct = Server::start(&t.sv, sock(addr::SV4, 8080), handlers::hello_echo("direct"));
    let (tx, rx) = lab::reports();
    // The server ends first: the proxy then ends towards the client first,
    // and its client-side socket is left in TIME-WAIT.
    let bye = std::sync::Arc::new(b"bye\n".to_vec());
    let _closing = Server::start(
        &t.sv,
        sock(addr::SV4, 9090),
        handlers::send_then_sink(bye, tx),
    );
    let mut d = Daemon::start_ready(
        &t.px,
        &full_policy_on(8080, 9090),
        &["--grace-period", "30"],
    );
    let from = sock(addr::CL4, 40_000);
    let mut closed = lab::connect_from(&t.cl, from, direct.addr());
    assert_eq!(
        lab::read_to_eof(&mut closed).unwrap().len,
        4,
        "the proxied reply"
    );
    drop(closed);
    lab::recv_report(&rx, "the proxied connection");
    let time_wait = t.px.ss(&["-Htn", "state", "time-wait", "sport", "= :8080"]);
    assert!(
        time_wait.contains(&format!("{}:{}", addr::CL4, from.port())),
        "the proxy's side is in TIME-WAIT: {time_wait:?}"
    );
    // An intercepted connection holds the drain open.
    let open = lab::connect_greeted(&t.cl, direct.addr(), "bye");
    d.drain();
    let mut again = lab::connect_from(&t.cl, from, direct.addr());
    talk(&mut again, "direct", "the new connection on the same ports");
    assert_eq!(direct.accepted().last().unwrap().peer, from, "forwarded");
    drop((again, open));
    let status = d.wait_exit(Duration::from_secs(10));
    d.assert_exit_ok(status);
}

/// The start-up checks: an interface the policy names must exist, and
/// `src_valid_mark` (which makes marked packets fail the reverse-path check)
/// is refused with what to change; none of them leaves anything behind.
#[test]
fn start_up_refuses_a_host_not_set_up_for_the_policy() {
    let t = Topo::new("startup");
    let missing = json!({
        "intercept": [ { "name": "gw", "prefixes": ["203.0.113.0/24"], "ports": [80], "interfaces": ["to-cl", "nope0"], "upstream": "web" } ],
        "upstreams": { "web": { "servers": ["203.0.113.2:8080"] } }
    });
    refuses_to_start(
        &t,
        &missing,
        r#"intercept[0].interfaces[1]: no interface \"nope0\""#,
    );

    t.px.sysctl("net.ipv4.conf.to-cl.src_valid_mark", "1");
    refuses_to_start(
        &t,
        &full_policy_on(80, 8080),
        "net.ipv4.conf.to-cl.src_valid_mark (or .all.) is 1",
    );
}

/// Starts the daemon with `policy` and asserts that it exits with an error
/// whose log says `reason`, leaving no rule, route or tc program behind.
fn refuses_to_start(t: &Topo, policy: &Value, reason: &str) {
    let mut d = Daemon::start(&t.px, policy, &[]);
    assert!(
        !d.wait_exit(Duration::from_secs(10)).success(),
        "started although {reason}"
    );
    assert!(d.log_text().contains(reason), "{}", d.log_text());
    assert_eq!(t.px.proxy_rules(), Vec::<String>::new(), "{reason}");
    assert_eq!(t.px.proxy_routes(), Vec::<String>::new(), "{reason}");
    assert_eq!(
        t.px.tc_programs(&["to-cl", "to-sv"]),
        Vec::<String>::new(),
        "{reason}"
    );
}

/// Forwarding off on a gateway is only a warning: what the rules intercept
/// is delivered here and still works.
#[test]
fn forwarding_off_is_a_warning() {
    let t = Topo::new("no_forward");
    t.px.sysctl("net.ipv4.ip_forward", "0");
    t.px.sysctl("net.ipv6.conf.all.forwarding", "0");
    let servers: Vec<Server> = servers(&t.sv, |f| f.server, 8080, "server");
    let policy = json!({
        "intercept": [gateway_rule(json!([80]), "web")],
        "upstreams": { "web": { "servers": both(8080, |f| f.server) } }
    });
    let d = Daemon::start_ready(&t.px, &policy, &[]);
    for key in [
        "net.ipv4.ip_forward is 0",
        "net.ipv6.conf.all.forwarding is 0",
    ] {
        assert!(
            d.log_text().contains(key),
            "warning {key:?}: {}",
            d.log_text()
        );
    }
    for (f, server) in FAMILIES.iter().zip(&servers) {
        let mut c = connect(&t.cl, sock(f.server_b, 80));
        talk(&mut c, "server", &format!("{} without forwarding", f.name));
        assert_eq!(server.wait_accepted(1, Duration::from_secs(5)).len(), 1);
    }
}

/// Strict reverse-path filtering is fine; `src_valid_mark` is not: set
/// after start-up (which would have refused it), new intercepted connections
/// are dropped as martians. This is the failure the start-up check prevents.
#[test]
fn strict_rp_filter_works_and_src_valid_mark_breaks_interception() {
    let t = Topo::new("rp_filter");
    let _servers: Vec<Server> = servers(&t.sv, |f| f.server, 8080, "server");
    for key in ["all", "default", "to-cl", "to-sv"] {
        t.px.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "1");
    }
    let _d = Daemon::start_ready(&t.px, &full_policy_on(80, 8080), &[]);
    let mut c = connect(&t.cl, sock(V4.server_b, 80));
    talk(&mut c, "server", "with strict rp_filter");

    t.px.sysctl("net.ipv4.conf.to-cl.src_valid_mark", "1");
    match try_connect(&t.cl, sock(V4.server_b, 80), Duration::from_secs(2)) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("with src_valid_mark the SYN should be dropped, got {other:?}"),
    }
}

/// A fixed source address that is not px's own works like a client's: the
/// server sees it, and its replies are routed back to px.
#[test]
fn fixed_source_address() {
    let t = Topo::new("fixed_source");
    let servers: Vec<Server> = servers(&t.sv, |f| f.server, 8080, "server");
    let sources = ["192.0.2.99", "2001:db8:a::99"];
    let policy = json!({
        "intercept": [
            { "name": "gw4", "prefixes": ["203.0.113.0/24"], "ports": [80], "interfaces": ["to-cl"], "upstream": "web4" },
            { "name": "gw6", "prefixes": ["2001:db8:5::/64"], "ports": [80], "interfaces": ["to-cl"], "upstream": "web6" }
        ],
        "upstreams": {
            "web4": { "servers": [sock(V4.server, 8080).to_string()], "bind": sources[0] },
            "web6": { "servers": [sock(V6.server, 8080).to_string()], "bind": sources[1] }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    for ((f, server), source) in FAMILIES.iter().zip(&servers).zip(sources) {
        let mut c = connect(&t.cl, sock(f.server_b, 80));
        let client = c.local_addr().unwrap();
        talk(&mut c, "server", &format!("{} from {source}", f.name));
        let accepted = server.wait_accepted(1, Duration::from_secs(5));
        assert_eq!(accepted[0].peer.ip(), ip(source), "{}", f.name);
        assert_eq!(field(&d.closed_event(client), "bind"), source);
    }
}

/// On a host without IPv6 (`disable_ipv6` on every interface, `lo` too,
/// where the kernel refuses IPv6 routes) an IPv4 policy that connects from
/// its clients' addresses starts, relays from the client's address, and
/// leaves nothing when it stops: the IPv6 half of its delivery rules and
/// routes is not asked for.
#[test]
fn an_ipv4_only_host_runs_an_ipv4_policy() {
    let (t, server) = Topo::with_echo("ipv4_only", "203.0.113.2:8080", "server");
    for conf in ["all", "default", "lo", "to-cl", "to-sv"] {
        t.px.sysctl(&format!("net.ipv6.conf.{conf}.disable_ipv6"), "1");
    }
    let rules_before = t.px.all_rules();
    let policy = json!({
        "intercept": [ { "name": "svc", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "web" } ],
        "upstreams": { "web": { "servers": ["203.0.113.2:8080"], "bind": "client-ip" } }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    let mut c = connect(&t.cl, sa("192.0.2.10:80"));
    let client = c.local_addr().unwrap();
    talk(&mut c, "server", "IPv4 on a host without IPv6");
    let accepted = server.wait_accepted(1, Duration::from_secs(5));
    assert_eq!(
        accepted[0].peer.ip(),
        client.ip(),
        "from the client's address"
    );
    drop(c);
    d.stop(Duration::from_secs(10));
    t.px.assert_nothing_left(&["to-cl", "to-sv"], &rules_before);
}

/// A gateway address on a macvlan above a listed interface (keepalived's
/// `use_vmac`): frames to the macvlan's MAC reach the listed interface's
/// ingress first, but they are the macvlan's. With only the lower
/// interface listed, they are forwarded as without l4proxy (they were
/// marked there, then found no listener for the macvlan and were reset);
/// with the macvlan listed, they are intercepted.
#[test]
fn a_macvlan_above_a_gateway_interface_is_its_own() {
    const VMAC: &str = "198.51.100.254";
    let (t, _proxied) = Topo::with_echo("gw-macvlan", "203.0.113.2:8080", "proxied");
    let _direct = Server::start(
        &t.sv,
        sa("203.0.113.3:9000"),
        handlers::hello_echo("direct"),
    );
    t.px.ip(&[
        "link", "add", "vmac", "link", "to-cl", "type", "macvlan", "mode", "bridge",
    ]);
    t.px.addr("vmac", &format!("{VMAC}/32"));
    t.px.ip(&["link", "set", "vmac", "up"]);
    // Only the macvlan answers for its address: the client's frames go to
    // its MAC.
    t.px.sysctl("net.ipv4.conf.to-cl.arp_ignore", "1");
    t.cl.ip(&["route", "replace", "203.0.113.0/24", "via", VMAC]);
    let policy = |interfaces: &[&str]| {
        json!({
            "intercept": [ { "name": "gw", "prefixes": ["203.0.113.3/32"], "ports": [9000],
                             "interfaces": interfaces, "upstream": "a" } ],
            "upstreams": { "a": { "servers": ["203.0.113.2:8080"] } }
        })
    };
    let greeting = || {
        let mut c = connect(&t.cl, sa("203.0.113.3:9000"));
        let line = lab::read_line(&mut c).unwrap_or_else(|e| panic!("greeting: {e}"));
        lab::finish(&mut c, "through the macvlan");
        line
    };
    let mut d = Daemon::start_ready(&t.px, &policy(&["to-cl"]), &[]);
    assert_eq!(greeting(), "direct", "forwarded: the macvlan is not listed");
    let mac = t.px.link("vmac")["address"].as_str().unwrap().to_owned();
    let neighbours = t.cl.ip(&["neigh", "show", VMAC]);
    assert!(
        neighbours.contains(&mac),
        "the client sends to the macvlan's MAC {mac}: {neighbours}"
    );
    assert_eq!(
        message(&d.reload(&policy(&["to-cl", "vmac"]))),
        Some("policy reloaded")
    );
    assert_eq!(greeting(), "proxied", "intercepted on the macvlan");
    let status = d.terminate(Duration::from_secs(10));
    d.assert_exit_ok(status);
}
