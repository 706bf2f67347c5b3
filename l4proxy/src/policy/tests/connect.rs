//! `connect` rules (explicit CONNECT listeners) and `parent` upstreams.

use std::time::Duration;

use crate::policy::*;

const EXAMPLE: &str = r#"{
  "intercept": [
    { "name": "explicit", "upstream": "direct",
      "connect": { "listen": ["198.51.100.1:3128", "[2001:db8:c::1]:3128"],
                   "clients": ["198.51.100.0/24"], "names": ["*.example.com"],
                   "resolve_timeout": 2 } }
  ],
  "routes": [
    { "match": { "target": ["*.partner.example.com"] }, "upstream": "parent" }
  ],
  "upstreams": {
    "direct": { "original_destination": true },
    "parent": { "parent": { "servers": ["203.0.113.8:3128"], "user": "u", "password": "p" } }
  }
}"#;

fn error_with(from: &str, to: &str) -> String {
    super::error_in(EXAMPLE, from, to)
}

#[test]
fn example_is_valid() {
    let policy = Policy::from_json(EXAMPLE).unwrap();
    let rule = &policy.rules[0];
    assert!(rule.prefixes.is_empty() && rule.ports.is_empty());
    let front = rule.connect.as_ref().unwrap();
    assert_eq!(front.listen.len(), 2);
    // Port 443 only unless the rule says otherwise.
    assert_eq!(front.ports, [PortSpec::Single(443)]);
    assert_eq!(front.resolve_timeout, Duration::from_secs(2));
    assert!(front.admits("198.51.100.7".parse().unwrap()));
    assert!(front.admits("::ffff:198.51.100.7".parse().unwrap()));
    assert!(!front.admits("203.0.113.7".parse().unwrap()));
    assert_eq!(
        policy.connect_rule("[2001:db8:c::1]:3128".parse().unwrap()),
        Some(RuleId(0))
    );
    assert_eq!(
        policy.connect_rule("198.51.100.1:80".parse().unwrap()),
        None
    );
    let parent = policy
        .upstreams
        .iter()
        .find(|u| u.name == "parent")
        .unwrap();
    match &parent.target {
        Target::Parent(p) => {
            assert_eq!(p.credentials, Some(("u".to_owned(), "p".to_owned())));
            // Credentials stay out of what is printed.
            assert!(!format!("{p:?}").contains("\"p\""), "{p:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(parent.servers(), ["203.0.113.8:3128".parse().unwrap()]);
}

#[test]
fn bad_connect_rules_name_their_place() {
    for (from, to, expected) in [
        (
            r#""clients": ["198.51.100.0/24"], "names": ["*.example.com"],"#,
            "",
            "intercept[0].connect: would be an open relay",
        ),
        (
            r#""upstream": "direct","#,
            r#""upstream": "direct", "prefixes": ["192.0.2.0/24"], "ports": [80],"#,
            "intercept[0]: a rule takes \"prefixes\" and \"ports\"",
        ),
        (
            r#""upstream": "direct","#,
            r#""upstream": "direct", "interfaces": ["eth0"],"#,
            "intercept[0].interfaces: a \"connect\" rule takes connections on its listeners",
        ),
        (
            r#""listen": ["198.51.100.1:3128", "[2001:db8:c::1]:3128"]"#,
            r#""listen": []"#,
            "intercept[0].connect.listen: must not be empty",
        ),
        (
            r#""resolve_timeout": 2"#,
            r#""resolve_timeout": 0"#,
            "intercept[0].connect.resolve_timeout: expected a duration above 0, at most 300 seconds, got 0",
        ),
        (
            r#""resolve_timeout": 2"#,
            r#""resolve_timeout": 2, "htpasswd": "/nonexistent/users""#,
            "intercept[0].connect.htpasswd: reading /nonexistent/users",
        ),
        (
            r#""clients": ["198.51.100.0/24"], "names": ["*.example.com"],"#,
            r#""clients": ["0.0.0.0/0", "::/0"],"#,
            "intercept[0].connect: would be an open relay",
        ),
        (
            r#""clients": ["198.51.100.0/24"], "names": ["*.example.com"],"#,
            r#""clients": ["0.0.0.0/0", "2001:db8:c::/64"],"#,
            "intercept[0].connect: would be an open relay",
        ),
        (
            r#""clients": ["198.51.100.0/24"], "names": ["*.example.com"],"#,
            r#""destinations": ["0.0.0.0/0", "2001:db8::/32"],"#,
            "intercept[0].connect: would be an open relay",
        ),
        (
            r#""resolve_timeout": 2"#,
            r#""resolve_timeout": 2, "htpasswd": null"#,
            "intercept[0].connect.htpasswd: invalid type: null",
        ),
        (
            r#""user": "u", "password": "p""#,
            r#""user": null, "password": null"#,
            "upstreams.parent.parent.user: invalid type: null",
        ),
        (
            r#""listen": ["198.51.100.1:3128", "#,
            r#""listen": ["0.0.0.0:3128", "#,
            "intercept[0].connect.listen[0]: an unspecified address listens on all of them",
        ),
        (
            r#""upstream": "direct","#,
            r#""upstream": "direct", "accept_proxy_protocol": { "from": ["198.51.100.0/24"] },"#,
            "intercept[0].accept_proxy_protocol: a \"connect\" rule reads CONNECT requests",
        ),
        (
            r#""servers": ["203.0.113.8:3128"], "user""#,
            r#""servers": ["198.51.100.1:3128"], "user""#,
            "upstreams.parent.parent.servers[0]: is one of this policy's CONNECT listeners",
        ),
        (
            r#""direct": { "original_destination": true }"#,
            r#""direct": { "servers": ["203.0.113.9:443", "[2001:db8:c::1]:3128"] }"#,
            "upstreams.direct.servers[1]: is one of this policy's CONNECT listeners",
        ),
        (
            // Halves that cover a family limit no more than its /0.
            r#""clients": ["198.51.100.0/24"], "names": ["*.example.com"],"#,
            r#""clients": ["0.0.0.0/1", "128.0.0.0/2", "192.0.0.0/2", "2001:db8:c::/64"],"#,
            "intercept[0].connect: would be an open relay",
        ),
        (
            r#""clients": ["198.51.100.0/24"], "names": ["*.example.com"],"#,
            r#""destinations": ["192.0.2.0/24", "::/1", "8000::/1"],"#,
            "intercept[0].connect: would be an open relay",
        ),
        (
            r#""user": "u", "password": "p""#,
            r#""user": "u""#,
            "upstreams.parent: a parent's \"user\" and \"password\" go together",
        ),
        (
            r#""original_destination": true"#,
            r#""original_destination": true, "parent": { "servers": ["203.0.113.8:3128"] }"#,
            "upstreams.direct: an upstream takes one of",
        ),
    ] {
        let err = error_with(from, to);
        assert!(err.contains(expected), "{to}: {err}");
    }
}

#[test]
fn target_routes_apply_to_connect_rules_only() {
    let policy = Policy::from_json(EXAMPLE).unwrap();
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
    // The same route on a steered rule can never match.
    let steered = edited_steered();
    assert!(
        steered.warnings().iter().any(|w| w.contains("routes[0]")),
        "{:?}",
        steered.warnings()
    );
}

/// A route for other CONNECT names than an earlier one's is reached; one
/// for names the earlier one has is not, and says so.
#[test]
fn a_route_after_one_for_other_names_is_reached() {
    let first = r#"{ "match": { "target": ["*.partner.example.com"] }, "upstream": "parent" }"#;
    let warnings = |second: &str| {
        Policy::from_json(&EXAMPLE.replace(first, &format!("{first}, {second}")))
            .unwrap()
            .warnings()
    };
    let other = warnings(r#"{ "match": { "target": ["*.other.example.com"] }, "reject": true }"#);
    assert!(other.is_empty(), "{other:?}");
    let shadowed =
        warnings(r#"{ "match": { "target": ["a.partner.example.com"] }, "reject": true }"#);
    assert!(
        shadowed
            .iter()
            .any(|w| w.contains("routes[1]") && w.contains("never matches")),
        "{shadowed:?}"
    );
}

#[test]
fn a_target_route_without_a_connect_rule_is_named_for_its_target() {
    let steered = r#"{
      "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [443], "upstream": "u" } ],
      "routes": [ { "match": { "target": ["*.example.com"] }, "upstream": "u" } ],
      "upstreams": { "u": { "servers": ["203.0.113.2:443"] } }
    }"#;
    assert_eq!(
        Policy::from_json(steered).unwrap().warnings(),
        [
            "routes[0]: never matches: its \"target\" condition holds only for CONNECT requests, \
          and no rule is a \"connect\" rule"
        ]
    );
}

#[test]
fn a_server_listed_twice_is_refused() {
    let err = error_with(
        r#""servers": ["203.0.113.8:3128"]"#,
        r#""servers": ["203.0.113.8:3128", "203.0.113.8:3128"]"#,
    );
    assert!(
        err.contains(
            "upstreams.parent.parent.servers[1]: 203.0.113.8:3128 is listed already ([0])"
        ),
        "{err}"
    );
}

#[test]
fn a_parent_server_a_rule_intercepts_is_named_where_it_is_written() {
    let err = Policy::from_json(
        r#"{ "intercept": [ { "name": "w", "prefixes": ["192.0.2.0/24"], "ports": [3128], "upstream": "p" } ],
             "upstreams": { "p": { "parent": { "servers": ["192.0.2.1:3128"] } } } }"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("upstreams.p.parent.servers[0]: 192.0.2.1:3128 is intercepted"),
        "{err}"
    );
}

fn edited_steered() -> Policy {
    Policy::from_json(
        r#"{
  "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [443], "upstream": "pool" } ],
  "routes": [ { "match": { "target": ["*.example.com"] }, "upstream": "pool" } ],
  "upstreams": { "pool": { "servers": ["203.0.113.2:443"] } }
}"#,
    )
    .unwrap()
}

#[test]
fn a_listener_is_one_rules_and_not_steered_elsewhere() {
    let two = EXAMPLE.replacen(
        r#"  ],
  "routes""#,
        r#"    , { "name": "again", "upstream": "direct",
        "connect": { "listen": ["198.51.100.1:3128"], "clients": ["198.51.100.0/24"] } }
  ],
  "routes""#,
        1,
    );
    let err = super::error_of(&two);
    assert!(
        err.contains(
            "intercept[1].connect.listen[0]: 198.51.100.1:3128 is also a listener of intercept[0]"
        ),
        "{err}"
    );
    let steered = EXAMPLE.replacen(
        r#"  ],
  "routes""#,
        r#"    , { "name": "web", "prefixes": ["198.51.100.1/32"], "ports": [3128], "upstream": "pool" }
  ],
  "routes""#,
        1,
    )
    .replacen(
        r#""direct": { "original_destination": true },"#,
        r#""direct": { "original_destination": true }, "pool": { "servers": ["203.0.113.2:80"] },"#,
        1,
    );
    let err = super::error_of(&steered);
    assert!(
        err.contains(
            "intercept[0].connect.listen[0]: 198.51.100.1:3128 is intercepted by rule \"web\""
        ),
        "{err}"
    );
}

#[test]
fn a_tunnel_to_anywhere_is_not_made_from_the_clients_address() {
    assert_eq!(
        error_with(
            r#""direct": { "original_destination": true }"#,
            r#""direct": { "original_destination": true, "bind": "client-ip" }"#
        ),
        "upstreams.direct.bind: \"client-ip\" cannot be used with upstream \"direct\" \
         (original_destination) for CONNECT rule \"explicit\" (intercept[0]): a tunnel's \
         destination can be anywhere, and the replies to a connection from the client's \
         address are taken for the proxy only from listed servers and gateway rules' \
         destinations"
    );
}
