//! Gateway rules (`interfaces`), source addresses (`bind`) and
//! original-destination upstreams: what is accepted, and what is refused
//! because it could not work.

use super::edited;
use crate::policy::*;

/// A gateway rule, a rule on this host's own prefix, and one upstream of each
/// kind; each line on its own so positions are easy to check.
const EXAMPLE: &str = r#"{
  "intercept": [
    { "name": "gateway", "prefixes": ["203.0.113.0/24", "2001:db8:5::/64"], "ports": [80], "interfaces": ["eth0", "eth1"], "upstream": "origin" },
    { "name": "local", "prefixes": ["192.0.2.0/24"], "ports": [443], "upstream": "web" }
  ],
  "routes": [
    { "name": "api", "match": { "intercept": ["gateway"], "ports": [80], "host": ["api.example.com"] }, "upstream": "api", "bind": "proxy" }
  ],
  "upstreams": {
    "origin": { "original_destination": true, "bind": "client-ip" },
    "web": { "servers": ["203.0.113.2:8443"], "bind": "client" },
    "api": { "servers": ["203.0.113.3:8080", "[2001:db8:5::3]:8080"], "bind": "client" }
  }
}"#;

fn error_with(from: &str, to: &str) -> String {
    super::error_in(EXAMPLE, from, to)
}

fn policy_with(from: &str, to: &str) -> Policy {
    let json = edited(EXAMPLE, from, to);
    Policy::from_json(&json).unwrap_or_else(|e| panic!("{e}\n{json}"))
}

#[test]
fn example_is_valid() {
    let policy = Policy::from_json(EXAMPLE).unwrap();
    assert_eq!(policy.rules[0].interfaces, ["eth0", "eth1"]);
    assert!(policy.rules[0].is_gateway());
    assert!(!policy.rules[1].is_gateway());
    let upstream = |name: &str| policy.upstreams.iter().find(|u| u.name == name).unwrap();
    assert_eq!(upstream("origin").target, Target::OriginalDestination);
    assert_eq!(upstream("origin").bind, Bind::ClientIp);
    assert_eq!(upstream("origin").servers(), []);
    assert_eq!(upstream("web").bind, Bind::Client);
    assert_eq!(policy.routes[0].bind, Some(Bind::Proxy));
    assert_eq!(policy.warnings(), Vec::<String>::new());
}

#[test]
fn bind_defaults_to_proxy_and_takes_an_address() {
    let policy = policy_with(r#", "bind": "client" }"#, " }");
    let web = policy.upstreams.iter().find(|u| u.name == "web").unwrap();
    assert_eq!(web.bind, Bind::Proxy);
    let policy = policy_with(r#""bind": "client" }"#, r#""bind": "203.0.113.1" }"#);
    let web = policy.upstreams.iter().find(|u| u.name == "web").unwrap();
    assert_eq!(web.bind, Bind::Address("203.0.113.1".parse().unwrap()));
}

#[test]
fn bad_bind_values() {
    for (bad, reason) in [
        (
            r#""client_ip""#,
            r#"expected "proxy", "client-ip", "client" or an IP address, got "client_ip""#,
        ),
        (
            r#""0.0.0.0""#,
            r#"0.0.0.0 is the kernel's choice: write "proxy" instead"#,
        ),
        (
            r#""224.0.0.1""#,
            "224.0.0.1 is a multicast or broadcast address",
        ),
        (
            r#""255.255.255.255""#,
            "255.255.255.255 is a multicast or broadcast address",
        ),
        (
            r#""::ffff:203.0.113.1""#,
            "IPv4-mapped IPv6 address; use the IPv4 form 203.0.113.1",
        ),
        (
            r#""fe80::1""#,
            "fe80::1 is link-local: binding it needs its interface, which a bind address cannot name; use a global address",
        ),
    ] {
        let err = error_with(r#""bind": "client" }"#, &format!(r#""bind": {bad} }}"#));
        assert!(
            err.ends_with(&format!("upstreams.web.bind: {reason}")),
            "{bad}: {err}"
        );
    }
}

#[test]
fn interfaces_are_names() {
    for (bad, reason) in [
        (r#"[]"#, "must not be empty"),
        (
            r#"["eth0", ""]"#,
            r#"an interface name is 1-15 bytes, got """#,
        ),
        (
            r#"["a-very-long-interface"]"#,
            r#"an interface name is 1-15 bytes, got "a-very-long-interface""#,
        ),
        (r#"["eth/0"]"#, r#""eth/0" is not a valid interface name"#),
        (r#"["eth 0"]"#, r#""eth 0" is not a valid interface name"#),
        (
            r#"["eth0\u0000"]"#,
            r#""eth0\0" is not a valid interface name"#,
        ),
        (
            r#"["lo"]"#,
            r#""lo" carries no forwarded traffic; a rule without "interfaces" takes connections made on this host"#,
        ),
    ] {
        let err = error_with(r#"["eth0", "eth1"]"#, bad);
        assert!(err.contains("intercept[0].interfaces"), "{bad}: {err}");
        assert!(err.ends_with(reason), "{bad}: {err}");
    }
}

#[test]
fn an_upstream_has_exactly_one_target() {
    let err = error_with(
        r#""original_destination": true, "#,
        r#""servers": ["203.0.113.9:80"], "original_destination": true, "#,
    );
    assert!(
        err.ends_with(
            r#"upstreams.origin: an upstream takes one of "servers", "original_destination" and "parent""#
        ),
        "{err}"
    );
    let err = error_with(r#""original_destination": true, "#, "");
    assert!(
        err.ends_with(
            r#"upstreams.origin: an upstream needs "servers": [...], "original_destination": true or "parent": {...}"#
        ),
        "{err}"
    );
    let err = error_with(
        r#""original_destination": true"#,
        r#""original_destination": false"#,
    );
    assert!(err.contains("only true means something here"), "{err}");
    assert!(err.starts_with("10:45: "), "{err}");
}

#[test]
fn original_destination_needs_a_gateway_rule() {
    // The rule's default: its destinations are this host's own.
    let err = error_with(
        r#""ports": [443], "upstream": "web""#,
        r#""ports": [443], "upstream": "origin""#,
    );
    assert_eq!(
        err,
        r#"intercept[1].upstream: upstream "origin" sends connections to their original destination, but rule "local" (intercept[1]) has no "interfaces": its destinations are local to this host, so the connection would come back into the proxy"#
    );
    // A route that may apply to that rule.
    let err = error_with(
        r#""match": { "intercept": ["gateway"], "ports": [80], "host": ["api.example.com"] }, "upstream": "api""#,
        r#""match": { "host": ["api.example.com"] }, "upstream": "origin""#,
    );
    assert!(
        err.starts_with(r#"routes[0].upstream: upstream "origin" sends connections"#),
        "{err}"
    );
    assert!(
        err.ends_with(r#"; limit the route to gateway rules with "intercept""#),
        "{err}"
    );
}

#[test]
fn original_destination_with_the_client_port_is_refused() {
    let message = r#""client" cannot be used with upstream "origin" (original_destination): a connection from the client's address and port to its original destination has the four addresses and ports of the client's own connection; use "client-ip""#;
    assert_eq!(
        error_with(r#""bind": "client-ip" }"#, r#""bind": "client" }"#),
        format!("upstreams.origin.bind: {message}")
    );
    // A route's bind is checked against the upstream it sends to.
    let err = error_with(
        r#""upstream": "api", "bind": "proxy""#,
        r#""upstream": "origin", "bind": "client""#,
    );
    assert_eq!(err, format!("routes[0].bind: {message}"));
}

#[test]
fn a_fixed_source_is_of_its_servers_family() {
    let err = error_with(
        r#""[2001:db8:5::3]:8080"], "bind": "client""#,
        r#""[2001:db8:5::3]:8080"], "bind": "203.0.113.1""#,
    );
    assert_eq!(
        err,
        "upstreams.api.bind: source address 203.0.113.1 is IPv4 but server [2001:db8:5::3]:8080 (upstreams.api.servers[1]) is not: a connection is made in one family"
    );
    let err = error_with(r#""bind": "client-ip""#, r#""bind": "2001:db8:5::1""#);
    assert_eq!(
        err,
        r#"upstreams.origin.bind: source address 2001:db8:5::1 is IPv6 but prefix 203.0.113.0/24 of rule "gateway" (intercept[0]) is not: a connection is made in one family"#
    );
    // A loopback source reaches loopback servers only, of its family.
    let err = error_with(r#""bind": "client-ip""#, r#""bind": "127.0.0.1""#);
    assert_eq!(
        err,
        r#"upstreams.origin.bind: source address 127.0.0.1 is loopback but prefix 203.0.113.0/24 of rule "gateway" (intercept[0]) is not: a loopback source reaches only this host"#
    );
    let err = error_with(
        r#""[2001:db8:5::3]:8080"], "bind": "client""#,
        r#""[2001:db8:5::3]:8080"], "bind": "::1""#,
    );
    assert!(
        err.ends_with("source address ::1 is IPv6 but server 203.0.113.3:8080 (upstreams.api.servers[0]) is not: a connection is made in one family"),
        "{err}"
    );
}

#[test]
fn a_rejecting_route_takes_no_bind() {
    let err = error_with(r#""upstream": "api", "bind""#, r#""reject": true, "bind""#);
    assert!(
        err.ends_with(
            r#"routes[0]: a rejecting route makes no upstream connection: "bind" needs "upstream""#
        ),
        "{err}"
    );
}

#[test]
fn servers_in_a_gateway_prefix_do_not_loop() {
    // 203.0.113.2 is inside the gateway rule's prefix: the proxy's own
    // connections never arrive on the rule's interfaces.
    let policy = policy_with(
        r#""ports": [80], "interfaces""#,
        r#""ports": [8443], "interfaces""#,
    );
    assert!(policy.rules[0].is_gateway());
    // Without interfaces the prefix is this host's, and the server would loop.
    let err = error_with(
        r#""ports": [80], "interfaces": ["eth0", "eth1"], "upstream": "origin""#,
        r#""ports": [8443], "upstream": "web""#,
    );
    assert!(
        err.starts_with(
            "upstreams.web.servers[0]: 203.0.113.2:8443 is intercepted by rule \"gateway\""
        ),
        "{err}"
    );
}

#[test]
fn a_client_bind_without_a_server_of_the_clients_family_is_warned() {
    let json = edited(
        &edited(EXAMPLE, r#", "bind": "proxy""#, ""),
        r#"["203.0.113.3:8080", "[2001:db8:5::3]:8080"]"#,
        r#"["203.0.113.3:8080"]"#,
    );
    let policy = Policy::from_json(&json).unwrap();
    assert_eq!(
        policy.warnings(),
        [
            r#"routes[0].upstream: bind "client" connects from the client's address, but upstream "api" has no IPv6 server for the clients of rule "gateway" (intercept[0]) prefix 2001:db8:5::/64: they are refused"#
        ]
    );
}

#[test]
fn the_family_warning_follows_a_routes_destination_condition() {
    // The route only ever sees IPv4 destinations: an IPv4 pool is enough.
    let json = edited(
        &edited(
            &edited(EXAMPLE, r#", "bind": "proxy""#, ""),
            r#""intercept": ["gateway"], "ports": [80]"#,
            r#""intercept": ["gateway"], "destination": ["203.0.113.0/25"], "ports": [80]"#,
        ),
        r#"["203.0.113.3:8080", "[2001:db8:5::3]:8080"]"#,
        r#"["203.0.113.3:8080"]"#,
    );
    assert_eq!(
        Policy::from_json(&json).unwrap().warnings(),
        Vec::<String>::new()
    );
}

#[test]
fn a_local_prefix_inside_a_gateway_rule_is_warned_of() {
    let policy = policy_with(
        r#""prefixes": ["192.0.2.0/24"], "ports": [443]"#,
        r#""prefixes": ["192.0.2.0/24", "203.0.113.128/25"], "ports": [443]"#,
    );
    assert_eq!(
        policy.warnings(),
        [
            "intercept[1].prefixes[1]: 203.0.113.128/25 becomes this host's own, and gateway \
             rule \"gateway\" (intercept[0], 203.0.113.0/24) takes only connections this host \
             forwards: its connections to 203.0.113.128/25 are this host's, reset where \
             nothing listens"
        ]
    );
    assert!(Policy::from_json(EXAMPLE).unwrap().warnings().is_empty());
}
