//! Routes, and intercept rules without a default upstream.

use crate::policy::*;

/// The routes of the feature's description, one per line so that positions
/// in the tests below are easy to check.
const ROUTES: &str = r#"{
  "intercept": [
    { "name": "https", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [443], "upstream": "fallback" },
    { "name": "http", "prefixes": ["192.0.2.0/24"], "ports": [80] }
  ],
  "routes": [
    { "name": "api-h2", "match": { "sni": ["api.example.com"], "alpn": ["h2"] }, "upstream": "api-h2" },
    { "name": "api", "match": { "sni": ["api.example.com", "*.api.example.com"] }, "upstream": "api" },
    { "name": "no-sni", "match": { "intercept": ["https"], "no_sni": true }, "reject": true },
    { "name": "www", "match": { "host": ["WWW.Example.com."] }, "upstream": "web" },
    { "match": { "source": ["198.51.100.0/24"], "destination": ["192.0.2.10/32"], "ports": [80], "protocol": "other" }, "upstream": "raw" },
    { "match": {}, "upstream": "fallback" }
  ],
  "upstreams": {
    "api-h2": { "servers": ["203.0.113.1:8443"] },
    "api": { "servers": ["203.0.113.2:8443"] },
    "web": { "servers": ["203.0.113.3:8080"] },
    "raw": { "servers": ["203.0.113.4:9000"] },
    "fallback": { "servers": ["203.0.113.9:443"] }
  }
}"#;

/// The error message for `ROUTES` with `from` replaced by `to`.
fn error_with(from: &str, to: &str) -> String {
    super::error_in(ROUTES, from, to)
}

fn names(patterns: &[&str]) -> Vec<NamePattern> {
    patterns
        .iter()
        .map(|p| NamePattern::parse(p).unwrap())
        .collect()
}

#[test]
fn example_is_valid() {
    let policy = Policy::from_json(ROUTES).unwrap();
    let upstream = |name: &str| {
        UpstreamId(
            policy
                .upstreams
                .iter()
                .position(|u| u.name == name)
                .unwrap(),
        )
    };
    assert_eq!(policy.rules[0].upstream, Some(upstream("fallback")));
    assert_eq!(policy.rules[1].upstream, None);
    let expected = [
        Route {
            name: Some("api-h2".to_owned()),
            conditions: Conditions {
                hello: Some(HelloConditions::Tls {
                    sni: SniCondition::Names(names(&["api.example.com"])),
                    alpn: Some(vec!["h2".to_owned()]),
                }),
                ..Conditions::default()
            },
            action: Action::Upstream(upstream("api-h2")),
            bind: None,
            timeouts: Timeouts::default(),
            terminate: None,
        },
        Route {
            name: Some("api".to_owned()),
            conditions: Conditions {
                hello: Some(HelloConditions::Tls {
                    sni: SniCondition::Names(names(&["api.example.com", "*.api.example.com"])),
                    alpn: None,
                }),
                ..Conditions::default()
            },
            action: Action::Upstream(upstream("api")),
            bind: None,
            timeouts: Timeouts::default(),
            terminate: None,
        },
        Route {
            name: Some("no-sni".to_owned()),
            conditions: Conditions {
                intercept: Some(vec![RuleId(0)]),
                hello: Some(HelloConditions::Tls {
                    sni: SniCondition::Absent,
                    alpn: None,
                }),
                ..Conditions::default()
            },
            action: Action::Reject,
            bind: None,
            timeouts: Timeouts::default(),
            terminate: None,
        },
        Route {
            name: Some("www".to_owned()),
            conditions: Conditions {
                hello: Some(HelloConditions::Http {
                    host: Some(vec![NamePattern::Exact("www.example.com".to_owned())]),
                }),
                ..Conditions::default()
            },
            action: Action::Upstream(upstream("web")),
            bind: None,
            timeouts: Timeouts::default(),
            terminate: None,
        },
        Route {
            name: None,
            conditions: Conditions {
                source: Some(vec!["198.51.100.0/24".parse().unwrap()]),
                destination: Some(vec!["192.0.2.10/32".parse().unwrap()]),
                ports: Some(vec![PortSpec::Single(80)]),
                hello: Some(HelloConditions::Other),
                ..Conditions::default()
            },
            action: Action::Upstream(upstream("raw")),
            bind: None,
            timeouts: Timeouts::default(),
            terminate: None,
        },
        Route {
            name: None,
            conditions: Conditions::default(),
            action: Action::Upstream(upstream("fallback")),
            bind: None,
            timeouts: Timeouts::default(),
            terminate: None,
        },
    ];
    assert_eq!(policy.routes, expected);
    assert_eq!(policy.warnings(), Vec::<String>::new());
    assert_eq!(
        policy.route_label(RouteId(1)).to_string(),
        r#"routes[1] ("api")"#
    );
    assert_eq!(policy.route_label(RouteId(4)).to_string(), "routes[4]");
}

#[test]
fn protocol_alone_and_protocol_that_agrees() {
    let policy = Policy::from_json(
        &ROUTES
            .replacen(r#""match": {}"#, r#""match": { "protocol": "http" }"#, 1)
            .replacen(
                r#""no_sni": true }"#,
                r#""no_sni": true, "protocol": "tls" }"#,
                1,
            ),
    )
    .unwrap();
    assert_eq!(
        policy.routes[5].conditions.hello,
        Some(HelloConditions::Http { host: None })
    );
    assert_eq!(
        policy.routes[2].conditions.hello,
        Some(HelloConditions::Tls {
            sni: SniCondition::Absent,
            alpn: None
        })
    );
}

#[test]
fn routes_and_rule_upstreams_are_optional() {
    let json = r#"{ "intercept": [ { "name": "r", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "u" } ],
                    "upstreams": { "u": { "servers": ["203.0.113.2:80"] } } }"#;
    assert_eq!(Policy::from_json(json).unwrap().routes, []);
    let json = json.replacen(r#""intercept""#, r#""routes": [], "intercept""#, 1);
    assert_eq!(Policy::from_json(&json).unwrap().routes, []);
}

#[test]
fn unknown_fields() {
    assert_eq!(
        error_with(
            r#""sni": ["api.example.com"], "alpn""#,
            r#""server_name": ["api.example.com"], "alpn""#
        ),
        "7:48: routes[0].match.server_name: unknown field `server_name`, expected one of \
         `intercept`, `destination`, `ports`, `source`, `target`, `protocol`, `sni`, `no_sni`, `alpn`, `host`"
    );
    assert_eq!(
        error_with(r#""name": "api","#, r#""name": "api", "backend": "api","#),
        "8:30: routes[1].backend: unknown field `backend`, expected one of `name`, `match`, `upstream`, `reject`, `bind`, `timeouts`, `terminate`"
    );
}

#[test]
fn bad_name_patterns() {
    assert_eq!(
        error_with(r#""*.api.example.com""#, r#""api.*.example.com""#),
        r#"8:79: routes[1].match.sni[1]: wildcard must be a leading label, like *.example.com, got "api.*.example.com""#
    );
    assert_eq!(
        error_with(r#""WWW.Example.com.""#, r#""www..example.com""#),
        r#"10:60: routes[3].match.host[0]: empty label in "www..example.com""#
    );
    let err = error_with(r#""WWW.Example.com.""#, r#""www.example.com:8080""#);
    assert!(
        err.starts_with("10:64: routes[3].match.host[0]: ':' in \"www.example.com:8080\": a name has letters, digits, '-' and '_' only"),
        "{err}"
    );
    let long = format!("{}.example.com", vec!["a".repeat(60); 4].join("."));
    let err = error_with(r#""WWW.Example.com.""#, &format!("{long:?}"));
    assert!(
        err.ends_with("routes[3].match.host[0]: a name is at most 253 characters, got 255"),
        "{err}"
    );
}

#[test]
fn false_flags() {
    assert_eq!(
        error_with(r#""no_sni": true"#, r#""no_sni": false"#),
        "9:76: routes[2].match.no_sni: only true means something here; omit the field instead of writing false"
    );
    assert_eq!(
        error_with(r#""reject": true"#, r#""reject": false"#),
        "9:94: routes[2].reject: only true means something here; omit the field instead of writing false"
    );
}

#[test]
fn conditions_that_never_hold_together() {
    assert_eq!(
        error_with(
            r#""sni": ["api.example.com"], "alpn""#,
            r#""sni": ["api.example.com"], "no_sni": true, "alpn""#
        ),
        r#"7:95: routes[0].match: "sni" and "no_sni" never hold together: a ClientHello has a server name or not"#
    );
    assert_eq!(
        error_with(
            r#""host": ["WWW.Example.com."]"#,
            r#""host": ["WWW.Example.com."], "alpn": ["http/1.1"]"#
        ),
        r#"10:84: routes[3].match: "host" (HTTP) and "alpn" (TLS) never hold together: a connection starts with one protocol; write two routes"#
    );
    let err = error_with(
        r#""intercept": ["https"], "no_sni": true"#,
        r#""intercept": ["https"], "no_sni": true, "host": ["www.example.com"]"#,
    );
    assert!(
        err.contains(r#"routes[2].match: "host" (HTTP) and "no_sni" (TLS) never hold together"#),
        "{err}"
    );
    assert_eq!(
        error_with(
            r#""host": ["WWW.Example.com."]"#,
            r#""host": ["WWW.Example.com."], "protocol": "tls""#
        ),
        r#"10:81: routes[3].match: "protocol": "tls" contradicts "host", which means "http""#
    );
    let err = error_with(
        r#""alpn": ["h2"]"#,
        r#""alpn": ["h2"], "protocol": "other""#,
    );
    assert!(
        err.ends_with(
            r#"routes[0].match: "protocol": "other" contradicts "sni", which means "tls""#
        ),
        "{err}"
    );
}

#[test]
fn bad_condition_values() {
    assert_eq!(
        error_with(r#""protocol": "other""#, r#""protocol": "ssh""#),
        "11:116: routes[4].match.protocol: unknown variant `ssh`, expected one of `tls`, `http`, `other`"
    );
    // A word is a string, never serde's one-key object form of it.
    assert_eq!(
        error_with(r#""protocol": "other""#, r#""protocol": { "other": null }"#),
        "11:109: routes[4].match.protocol: invalid type: map, expected a string"
    );
    assert_eq!(
        error_with(r#""alpn": ["h2"]"#, r#""alpn": [""]"#),
        "7:75: routes[0].match.alpn[0]: an ALPN protocol must not be empty"
    );
    let err = error_with(
        r#""alpn": ["h2"]"#,
        &format!(r#""alpn": ["{}"]"#, "x".repeat(256)),
    );
    assert!(
        err.ends_with("routes[0].match.alpn[0]: an ALPN protocol is at most 255 bytes, got 256"),
        "{err}"
    );
    for (list, path) in [
        (r#""sni": ["api.example.com"]"#, "routes[0].match.sni"),
        (r#""alpn": ["h2"]"#, "routes[0].match.alpn"),
        (r#""intercept": ["https"]"#, "routes[2].match.intercept"),
        (r#""source": ["198.51.100.0/24"]"#, "routes[4].match.source"),
    ] {
        let key = list.split(':').next().unwrap();
        let err = error_with(list, &format!("{key}: []"));
        assert!(
            err.ends_with(&format!("{path}: must not be empty")),
            "{err}"
        );
        let err = error_with(list, &format!("{key}: null"));
        assert!(
            err.contains(&format!("{path}: invalid type: null, expected a sequence")),
            "{err}"
        );
    }
}

#[test]
fn address_conditions_are_checked_like_rules() {
    assert_eq!(
        error_with(r#""192.0.2.10/32""#, r#""192.0.2.10/24""#),
        "11:80: routes[4].match.destination[0]: host bits set; did you mean 192.0.2.0/24?"
    );
    let err = error_with(r#""198.51.100.0/24""#, r#""::ffff:198.51.100.0/120""#);
    assert!(
        err.ends_with(
            "routes[4].match.source[0]: IPv4-mapped IPv6 prefix; use the IPv4 form 198.51.100.0/24"
        ),
        "{err}"
    );
    assert_eq!(
        error_with(
            r#""ports": [80], "protocol""#,
            r#""ports": ["90-80"], "protocol""#
        ),
        r#"11:99: routes[4].match.ports[0]: a port range must be "N-M" with N < M, got "90-80""#
    );
}

#[test]
fn actions() {
    assert_eq!(
        error_with(r#""reject": true"#, r#""reject": true, "upstream": "web""#),
        r#"9:112: routes[2]: a route takes "upstream" or "reject", not both"#
    );
    assert_eq!(
        error_with(r#", "upstream": "raw""#, ""),
        r#"11:120: routes[4]: a route needs an action: "upstream": NAME or "reject": true"#
    );
    assert_eq!(
        error_with(r#""match": {}, "#, ""),
        "12:30: routes[5]: missing field `match`"
    );
    let err = error_with(
        r#"{ "match": {}, "upstream": "fallback" }"#,
        r#"["fallback"]"#,
    );
    assert!(
        err.ends_with("routes[5]: invalid type: sequence, expected a route object"),
        "{err}"
    );
    let err = error_with(r#""match": {}"#, r#""match": []"#);
    assert!(
        err.ends_with("routes[5].match: invalid type: sequence, expected an object of conditions"),
        "{err}"
    );
    let err = error_with(r#""upstream": "raw""#, r#""upstream": null"#);
    assert!(
        err.contains("routes[4].upstream: invalid type: null, expected a string"),
        "{err}"
    );
    let err = error_with(r#"[80] }"#, r#"[80], "upstream": null }"#);
    assert!(
        err.contains("intercept[1].upstream: invalid type: null, expected a string"),
        "{err}"
    );
}

#[test]
fn names_are_resolved() {
    assert_eq!(
        error_with(r#""upstream": "web""#, r#""upstream": "www""#),
        r#"routes[3].upstream: no upstream named "www"; known: api, api-h2, fallback, raw, web"#
    );
    assert_eq!(
        error_with(r#"["https"]"#, r#"["https", "ssh"]"#),
        r#"routes[2].match.intercept[1]: no intercept rule named "ssh"; known: https, http"#
    );
    assert_eq!(
        error_with(r#""name": "www""#, r#""name": "api""#),
        r#"routes[3].name: duplicate route name "api" (also routes[1])"#
    );
    assert!(
        error_with(r#""name": "www""#, r#""name": """#)
            .contains("routes[3].name: name must not be empty")
    );
}

/// Logs and metrics call an unnamed route `routes[i]`, a rule's default
/// upstream `default` and no route `none`: a route may not take those.
#[test]
fn generated_labels_are_no_route_names() {
    for taken in ["routes[0]", "routes[12]", "default", "none"] {
        assert_eq!(
            error_with(r#""name": "www""#, &format!(r#""name": "{taken}""#)),
            format!(
                r#"routes[3].name: "{taken}" is how logs and metrics name an unnamed route, a rule's default upstream ("default") or no route ("none"): choose another"#
            )
        );
    }
    for fine in ["routes", "routes[]", "routes[x]", "defaults"] {
        Policy::from_json(&super::edited(
            ROUTES,
            r#""name": "www""#,
            &format!(r#""name": "{fine}""#),
        ))
        .unwrap();
    }
}

#[test]
fn route_upstreams_must_not_loop_either() {
    assert_eq!(
        error_with("203.0.113.4:9000", "192.0.2.10:80"),
        r#"upstreams.raw.servers[0]: 192.0.2.10:80 is intercepted by rule "http" (intercept[1]); connecting to it would loop back into the proxy"#
    );
}
