//! Where a connection goes once its intercept rule is known: the first route
//! whose conditions all hold, else the rule's default upstream, else nowhere.
//!
//! The client's first bytes are asked for only when they can change the
//! answer: the first route that applies by addresses alone has conditions on
//! them. A connection that no such route applies to is decided at accept, so
//! protocols where the server speaks first (SSH, SMTP) are never held up
//! waiting for a client that waits too.

use std::{borrow::Cow, fmt};

use crate::{
    addrs::{ClientAddr, OrigDstAddr},
    policy::{
        Action, Bind, Conditions, HelloConditions, Policy, RouteId, RouteLabel, RuleId,
        SniCondition, UpstreamId,
    },
};

/// What is known of a connection at accept, before it has sent anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection<'a> {
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
    /// The rule that steered it ([`super::match_rule`]), or whose CONNECT
    /// listener took it.
    pub rule: RuleId,
    /// The name a CONNECT client asked for, if it asked for a name.
    pub target: Option<&'a str>,
}

/// What the client sent first, as the sniffer read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hello<'a> {
    /// A TLS ClientHello: its server name, if any, and the ALPN protocols it
    /// offers.
    Tls {
        sni: Option<&'a str>,
        alpn: &'a [String],
    },
    /// An HTTP/1.x request head: its Host (lower-case, no port, no trailing
    /// dot), if it has one.
    Http { host: Option<&'a str> },
    /// Anything else, including nothing conclusive before the sniffer gave up
    /// (deadline, size bound, client closed).
    Other,
    /// TLS that the connection's rule terminated: the server name and the
    /// ALPN protocol its handshake agreed on, and what the decrypted stream
    /// starts with (`Http` or `Other`), once read. TLS conditions hold
    /// against the handshake, HTTP and other ones against the stream.
    Terminated {
        sni: Option<&'a str>,
        alpn: &'a [String],
        inner: Option<&'a Hello<'a>>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision<'p> {
    /// Relay to this upstream, connecting from `bind`.
    Upstream {
        upstream: UpstreamId,
        name: &'p str,
        bind: Bind,
        why: Why<'p>,
    },
    /// A route refuses the connection.
    Reject { why: Why<'p> },
    /// No route matched and the rule has no default upstream.
    NoRoute,
    /// The first route that applies by addresses has conditions on the
    /// client's first bytes: sniff them, then decide again with them.
    NeedHello,
}

/// Why a decision was made, for the log and `l4proxy explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why<'p> {
    Route(RouteLabel<'p>),
    /// No route matched; the intercept rule's default upstream.
    Default {
        rule: RuleId,
        name: &'p str,
    },
}

impl fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Route(route) => write!(f, "{route} matched"),
            Why::Default { name, .. } => {
                write!(f, "no route matched; default of intercept rule {name:?}")
            }
        }
    }
}

impl Why<'_> {
    /// Short name for logs: the route's name (or `routes[i]`), or `default`
    /// for the intercept rule's default upstream.
    pub fn route_name(&self) -> Cow<'static, str> {
        match self {
            Why::Route(label) => Cow::Owned(label.short()),
            Why::Default { .. } => Cow::Borrowed("default"),
        }
    }
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Upstream { name, why, .. } => write!(f, "upstream {name:?}: {why}"),
            Decision::Reject { why } => write!(f, "rejected: {why}"),
            Decision::NoRoute => {
                f.write_str("no route: none matched and the intercept rule has no default upstream")
            }
            Decision::NeedHello => f.write_str("undecided until the client's first bytes"),
        }
    }
}

/// Decides `conn`: with `hello: None` at accept, with the client's first
/// bytes after a [`Decision::NeedHello`].
pub fn decide<'p>(policy: &'p Policy, conn: &Connection, hello: Option<&Hello>) -> Decision<'p> {
    for (i, route) in policy.routes.iter().enumerate() {
        if !addresses_hold(&route.conditions, conn) {
            continue;
        }
        match (&route.conditions.hello, hello) {
            (None, _) => {}
            (Some(_), None) => return Decision::NeedHello,
            // The decrypted stream is read only for a route that needs it.
            (
                Some(HelloConditions::Http { .. } | HelloConditions::Other),
                Some(Hello::Terminated { inner: None, .. }),
            ) => return Decision::NeedHello,
            (Some(wanted), Some(hello)) => {
                if !hello_holds(wanted, hello) {
                    continue;
                }
            }
        }
        let why = Why::Route(policy.route_label(RouteId(i)));
        return match route.action {
            Action::Upstream(upstream) => relay_to(policy, upstream, route.bind, why),
            Action::Reject => Decision::Reject { why },
        };
    }
    let rule = &policy.rules[conn.rule.0];
    match rule.upstream {
        Some(upstream) => relay_to(
            policy,
            upstream,
            None,
            Why::Default {
                rule: conn.rule,
                name: &rule.name,
            },
        ),
        None => Decision::NoRoute,
    }
}

/// `bind`: the route's override of the upstream's source address, if any.
fn relay_to<'p>(
    policy: &'p Policy,
    upstream: UpstreamId,
    bind: Option<Bind>,
    why: Why<'p>,
) -> Decision<'p> {
    let target = &policy.upstreams[upstream.0];
    Decision::Upstream {
        upstream,
        name: &target.name,
        bind: bind.unwrap_or(target.bind),
        why,
    }
}

/// A list condition holds when it is not given or any element holds.
fn any<T>(list: &Option<Vec<T>>, holds: impl FnMut(&T) -> bool) -> bool {
    list.as_ref().is_none_or(|list| list.iter().any(holds))
}

fn addresses_hold(when: &Conditions, conn: &Connection) -> bool {
    // A dual-stack socket shows an IPv4 peer as ::ffff:a.b.c.d; policies name
    // it in its IPv4 form.
    let client = conn.client.0.ip().to_canonical();
    let dst = conn.orig_dst.0.ip().to_canonical();
    let port = conn.orig_dst.0.port();
    any(&when.intercept, |&rule| rule == conn.rule)
        && any(&when.destination, |prefix| prefix.contains(&dst))
        && any(&when.ports, |ports| ports.contains(port))
        && any(&when.source, |prefix| prefix.contains(&client))
        && any(&when.target, |pattern| {
            conn.target.is_some_and(|name| pattern.matches(name))
        })
}

fn hello_holds(wanted: &HelloConditions, hello: &Hello) -> bool {
    match (wanted, hello) {
        (
            HelloConditions::Tls { sni, alpn },
            Hello::Tls {
                sni: name,
                alpn: offered,
            }
            | Hello::Terminated {
                sni: name,
                alpn: offered,
                ..
            },
        ) => {
            let sni = match (sni, name) {
                (SniCondition::Any, _) | (SniCondition::Absent, None) => true,
                (SniCondition::Names(patterns), Some(name)) => {
                    patterns.iter().any(|pattern| pattern.matches(name))
                }
                (SniCondition::Names(_), None) | (SniCondition::Absent, Some(_)) => false,
            };
            sni && any(alpn, |protocol| offered.contains(protocol))
        }
        (HelloConditions::Http { host }, Hello::Http { host: name }) => match host {
            None => true,
            Some(patterns) => name.is_some_and(|name| patterns.iter().any(|p| p.matches(name))),
        },
        (HelloConditions::Other, Hello::Other) => true,
        (
            _,
            Hello::Terminated {
                inner: Some(inner), ..
            },
        ) => hello_holds(wanted, inner),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::match_rule;

    /// Three rules (HTTPS with a default, HTTP and SSH without) around the
    /// routes under test.
    fn policy(routes: &str) -> Policy {
        let json = format!(
            r#"{{
  "intercept": [
    {{ "name": "https", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [443], "upstream": "fallback" }},
    {{ "name": "http", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80] }},
    {{ "name": "ssh", "prefixes": ["192.0.2.0/24"], "ports": [22] }}
  ],
  "routes": [{routes}],
  "upstreams": {{
    "a": {{ "servers": ["203.0.113.1:8000"] }},
    "b": {{ "servers": ["203.0.113.2:8000"] }},
    "c": {{ "servers": ["203.0.113.3:8000"] }},
    "fallback": {{ "servers": ["203.0.113.9:443"] }}
  }}
}}"#
        );
        Policy::from_json(&json).unwrap_or_else(|e| panic!("{e}\n{json}"))
    }

    fn conn(policy: &Policy, client: &str, orig_dst: &str) -> Connection<'static> {
        let orig_dst = orig_dst.parse().unwrap();
        Connection {
            client: ClientAddr(client.parse().unwrap()),
            orig_dst: OrigDstAddr(orig_dst),
            rule: match_rule(policy, orig_dst)
                .unwrap_or_else(|| panic!("no rule steers {orig_dst}")),
            target: None,
        }
    }

    /// The decision with `hello`, in a short form: the upstream's name,
    /// "reject" or "no route". Also checks the decision at accept: either it
    /// asks for the hello or it is the same.
    fn with(policy: &Policy, conn: &Connection, hello: Hello) -> String {
        let decision = decide(policy, conn, Some(&hello));
        let early = decide(policy, conn, None);
        assert!(
            early == Decision::NeedHello || early == decision,
            "at accept: {early}; with {hello:?}: {decision}"
        );
        short(decision)
    }

    fn short(decision: Decision) -> String {
        match decision {
            Decision::Upstream { name, .. } => name.to_owned(),
            Decision::Reject { .. } => "reject".to_owned(),
            Decision::NoRoute => "no route".to_owned(),
            Decision::NeedHello => panic!("asked for the hello again"),
        }
    }

    fn tls<'a>(sni: Option<&'a str>, alpn: &'a [String]) -> Hello<'a> {
        Hello::Tls { sni, alpn }
    }

    fn sni(name: &str) -> Hello<'_> {
        tls(Some(name), &[])
    }

    fn host(name: &str) -> Hello<'_> {
        Hello::Http { host: Some(name) }
    }

    const CLIENT: &str = "198.51.100.7:40000";
    const HTTPS: &str = "192.0.2.10:443";
    const HTTP: &str = "192.0.2.10:80";
    const SSH: &str = "192.0.2.10:22";

    #[test]
    fn first_match_wins() {
        let p = policy(
            r#"{ "match": { "sni": ["api.example.com"] }, "upstream": "a" },
               { "match": { "sni": ["*.example.com"] }, "upstream": "b" },
               { "match": {}, "upstream": "c" }"#,
        );
        let c = conn(&p, CLIENT, HTTPS);
        assert_eq!(with(&p, &c, sni("api.example.com")), "a");
        assert_eq!(with(&p, &c, sni("www.example.com")), "b");
        assert_eq!(with(&p, &c, sni("www.example.net")), "c");
        assert_eq!(with(&p, &c, Hello::Other), "c");
    }

    #[test]
    fn rule_default_then_no_route() {
        let p = policy(r#"{ "match": { "sni": ["api.example.com"] }, "upstream": "a" }"#);
        let https = conn(&p, CLIENT, HTTPS);
        let decision = decide(&p, &https, Some(&sni("www.example.com")));
        assert_eq!(
            decision,
            Decision::Upstream {
                upstream: UpstreamId(3),
                name: "fallback",
                bind: Bind::Proxy,
                why: Why::Default {
                    rule: RuleId(0),
                    name: "https"
                },
            }
        );
        let http = conn(&p, CLIENT, HTTP);
        assert_eq!(with(&p, &http, host("www.example.com")), "no route");
        assert_eq!(with(&p, &http, Hello::Other), "no route");
    }

    #[test]
    fn asks_for_the_hello_only_when_the_first_route_that_applies_needs_it() {
        let p = policy(
            r#"{ "match": { "intercept": ["https"], "sni": ["api.example.com"] }, "upstream": "a" },
               { "match": { "ports": [22] }, "upstream": "c" },
               { "match": { "intercept": ["http"] }, "upstream": "b" },
               { "match": { "host": ["www.example.com"] }, "upstream": "a" }"#,
        );
        assert_eq!(
            decide(&p, &conn(&p, CLIENT, HTTPS), None),
            Decision::NeedHello
        );
        // Routes 1 and 2 need addresses only: SSH and HTTP are decided at accept.
        assert_eq!(short(decide(&p, &conn(&p, CLIENT, SSH), None)), "c");
        assert_eq!(short(decide(&p, &conn(&p, CLIENT, HTTP), None)), "b");

        // No route applies by addresses: the default, or no route, at accept.
        let p = policy(
            r#"{ "match": { "ports": [80], "host": ["www.example.com"] }, "upstream": "a" }"#,
        );
        assert_eq!(
            short(decide(&p, &conn(&p, CLIENT, HTTPS), None)),
            "fallback"
        );
        assert_eq!(short(decide(&p, &conn(&p, CLIENT, SSH), None)), "no route");
        assert_eq!(
            decide(&p, &conn(&p, CLIENT, HTTP), None),
            Decision::NeedHello
        );
    }

    #[test]
    fn address_conditions() {
        let p = policy(
            r#"{ "match": { "source": ["198.51.100.0/24", "2001:db8:c::/48"] }, "upstream": "a" },
               { "match": { "destination": ["192.0.2.128/25"] }, "upstream": "b" },
               { "match": { "ports": ["20-23"] }, "upstream": "c" },
               { "match": { "intercept": ["https"] }, "reject": true }"#,
        );
        let to = |client, dst| with(&p, &conn(&p, client, dst), Hello::Other);
        assert_eq!(to(CLIENT, HTTPS), "a");
        assert_eq!(to("[2001:db8:c::7]:40000", "[2001:db8:a::1]:443"), "a");
        assert_eq!(to("203.0.113.50:40000", "192.0.2.200:80"), "b");
        assert_eq!(to("203.0.113.50:40000", "192.0.2.1:22"), "c");
        assert_eq!(to("203.0.113.50:40000", "192.0.2.1:443"), "reject");
        assert_eq!(to("[2001:db8:d::7]:40000", "[2001:db8:a::1]:443"), "reject");
        assert_eq!(to("203.0.113.50:40000", "192.0.2.1:80"), "no route");
    }

    #[test]
    fn mapped_ipv4_addresses_match_as_ipv4() {
        let p = policy(
            r#"{ "match": { "source": ["198.51.100.0/24"], "destination": ["192.0.2.10/32"] }, "upstream": "a" }"#,
        );
        let c = conn(&p, "[::ffff:198.51.100.7]:40000", "[::ffff:192.0.2.10]:80");
        assert_eq!(with(&p, &c, Hello::Other), "a");
        let c = conn(&p, "[::ffff:203.0.113.7]:40000", "[::ffff:192.0.2.10]:80");
        assert_eq!(with(&p, &c, Hello::Other), "no route");
    }

    #[test]
    fn a_routes_bind_overrides_its_upstreams() {
        let p = policy(
            r#"{ "match": { "sni": ["api.example.com"] }, "upstream": "a", "bind": "client-ip" },
               { "match": { "sni": ["*.example.com"] }, "upstream": "a" }"#,
        );
        let c = conn(&p, CLIENT, HTTPS);
        let bind = |hello: Hello| match decide(&p, &c, Some(&hello)) {
            Decision::Upstream { bind, .. } => bind,
            other => panic!("{other}"),
        };
        assert_eq!(bind(sni("api.example.com")), Bind::ClientIp);
        assert_eq!(bind(sni("www.example.com")), Bind::Proxy);
        assert_eq!(
            bind(sni("www.example.net")),
            Bind::Proxy,
            "the rule's default"
        );
    }

    #[test]
    fn sni_patterns() {
        let p = policy(
            r#"{ "match": { "sni": ["api.example.com", "*.api.example.com"] }, "upstream": "a" },
               { "match": { "sni": ["*.example.org"] }, "upstream": "b" }"#,
        );
        let c = conn(&p, CLIENT, HTTPS);
        assert_eq!(with(&p, &c, sni("api.example.com")), "a");
        assert_eq!(with(&p, &c, sni("v2.api.example.com")), "a");
        assert_eq!(with(&p, &c, sni("API.Example.COM.")), "a");
        assert_eq!(with(&p, &c, sni("a.example.org")), "b");
        assert_eq!(with(&p, &c, sni("a.b.example.org")), "b");
        assert_eq!(with(&p, &c, sni("example.org")), "fallback");
        assert_eq!(with(&p, &c, sni("xapi.example.com")), "fallback");
        // A name condition never holds without a name, or for another protocol.
        assert_eq!(with(&p, &c, tls(None, &[])), "fallback");
        assert_eq!(with(&p, &c, host("api.example.com")), "fallback");
    }

    #[test]
    fn alpn_holds_when_any_is_offered() {
        let p = policy(r#"{ "match": { "alpn": ["h2", "spdy/3"] }, "upstream": "a" }"#);
        let c = conn(&p, CLIENT, HTTPS);
        let offered = |list: &[&str]| list.iter().map(|&s| s.to_owned()).collect::<Vec<_>>();
        let h2 = offered(&["http/1.1", "h2"]);
        assert_eq!(with(&p, &c, tls(Some("www.example.com"), &h2)), "a");
        assert_eq!(with(&p, &c, tls(None, &offered(&["spdy/3"]))), "a");
        assert_eq!(with(&p, &c, tls(None, &offered(&["http/1.1"]))), "fallback");
        assert_eq!(with(&p, &c, tls(None, &offered(&["H2"]))), "fallback");
        assert_eq!(with(&p, &c, tls(None, &[])), "fallback");
    }

    #[test]
    fn sni_and_alpn_together() {
        let p = policy(
            r#"{ "match": { "sni": ["api.example.com"], "alpn": ["h2"] }, "upstream": "a" },
               { "match": { "sni": ["api.example.com"] }, "upstream": "b" }"#,
        );
        let c = conn(&p, CLIENT, HTTPS);
        let h2 = ["h2".to_owned()];
        assert_eq!(with(&p, &c, tls(Some("api.example.com"), &h2)), "a");
        assert_eq!(with(&p, &c, tls(Some("api.example.com"), &[])), "b");
        assert_eq!(with(&p, &c, tls(Some("www.example.com"), &h2)), "fallback");
    }

    #[test]
    fn no_sni() {
        let p = policy(r#"{ "match": { "no_sni": true }, "reject": true }"#);
        let c = conn(&p, CLIENT, HTTPS);
        assert_eq!(with(&p, &c, tls(None, &[])), "reject");
        assert_eq!(with(&p, &c, sni("www.example.com")), "fallback");
        assert_eq!(with(&p, &c, Hello::Http { host: None }), "fallback");
        assert_eq!(with(&p, &c, Hello::Other), "fallback");
    }

    #[test]
    fn host_patterns() {
        let p = policy(
            r#"{ "match": { "host": ["www.example.com", "*.www.example.com"] }, "upstream": "a" },
               { "match": { "protocol": "http" }, "upstream": "b" }"#,
        );
        let c = conn(&p, CLIENT, HTTP);
        assert_eq!(with(&p, &c, host("www.example.com")), "a");
        assert_eq!(with(&p, &c, host("static.www.example.com")), "a");
        assert_eq!(with(&p, &c, host("example.com")), "b");
        // HTTP/1.0 without Host: only protocol conditions hold.
        assert_eq!(with(&p, &c, Hello::Http { host: None }), "b");
        assert_eq!(with(&p, &c, sni("www.example.com")), "no route");
    }

    #[test]
    fn protocols() {
        let p = policy(
            r#"{ "match": { "protocol": "tls" }, "upstream": "a" },
               { "match": { "protocol": "http" }, "upstream": "b" },
               { "match": { "protocol": "other" }, "upstream": "c" }"#,
        );
        let c = conn(&p, CLIENT, HTTP);
        assert_eq!(with(&p, &c, tls(None, &[])), "a");
        assert_eq!(with(&p, &c, Hello::Http { host: None }), "b");
        // Also what the daemon passes when sniffing gave up.
        assert_eq!(with(&p, &c, Hello::Other), "c");
    }

    #[test]
    fn sentences() {
        let p = policy(
            r#"{ "name": "api", "match": { "sni": ["api.example.com"] }, "upstream": "a" },
               { "match": { "no_sni": true }, "reject": true }"#,
        );
        let https = conn(&p, CLIENT, HTTPS);
        let said =
            |conn: &Connection, hello: Option<Hello>| decide(&p, conn, hello.as_ref()).to_string();
        assert_eq!(
            said(&https, Some(sni("api.example.com"))),
            r#"upstream "a": routes[0] ("api") matched"#
        );
        assert_eq!(
            said(&https, Some(tls(None, &[]))),
            "rejected: routes[1] matched"
        );
        assert_eq!(
            said(&https, Some(sni("www.example.com"))),
            r#"upstream "fallback": no route matched; default of intercept rule "https""#
        );
        assert_eq!(
            said(&conn(&p, CLIENT, HTTP), Some(Hello::Other)),
            "no route: none matched and the intercept rule has no default upstream"
        );
        assert_eq!(
            said(&https, None),
            "undecided until the client's first bytes"
        );
    }
}
