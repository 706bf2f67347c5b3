//! `timeouts` on rules and routes, `keepalive` and `limits` on rules.

use std::time::Duration;

use crate::policy::*;

const EXAMPLE: &str = r#"{
  "intercept": [
    { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [443], "upstream": "web",
      "timeouts": { "idle": 300, "lifetime": 86400 },
      "keepalive": { "idle": 30, "interval": 10, "count": 3 },
      "limits": { "per_client": 100, "per_client_prefix": { "ipv4": 22, "ipv6": 56, "max": 1000 } } },
    { "name": "plain", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "web",
      "keepalive": false,
      "limits": { "per_client_prefix": { "max": 50 } } }
  ],
  "routes": [
    { "name": "quick", "match": { "sni": ["quick.example.com"] }, "upstream": "web",
      "timeouts": { "idle": 2.5 } }
  ],
  "upstreams": { "web": { "servers": ["203.0.113.2:443"] } }
}"#;

fn error_with(from: &str, to: &str) -> String {
    super::error_in(EXAMPLE, from, to)
}

#[test]
fn example_is_valid() {
    let policy = Policy::from_json(EXAMPLE).unwrap();
    let [web, plain] = &policy.rules[..] else {
        panic!("two rules")
    };
    assert_eq!(
        web.timeouts,
        Timeouts {
            idle: Some(Duration::from_secs(300)),
            lifetime: Some(Duration::from_secs(86400)),
        }
    );
    assert_eq!(
        web.keepalive,
        Some(Keepalive::Probe {
            idle: 30,
            interval: 10,
            count: 3
        })
    );
    assert_eq!(
        web.limits,
        ClientLimits {
            per_client: Some(100),
            per_client_prefix: Some(PrefixLimit {
                ipv4: 22,
                ipv6: 56,
                max: 1000
            }),
        }
    );
    assert_eq!(plain.timeouts, Timeouts::default());
    assert_eq!(plain.keepalive, Some(Keepalive::Off));
    // Prefix lengths default to /24 and /64.
    assert_eq!(
        plain.limits.per_client_prefix,
        Some(PrefixLimit {
            ipv4: 24,
            ipv6: 64,
            max: 50
        })
    );
    assert_eq!(
        policy.routes[0].timeouts,
        Timeouts {
            idle: Some(Duration::from_millis(2500)),
            lifetime: None,
        }
    );
}

#[test]
fn bad_values_name_their_place() {
    for (from, to, expected) in [
        (
            r#""idle": 300"#,
            r#""idle": -1"#,
            "intercept[0].timeouts.idle: expected a duration from 0 (none) to 1000000000 seconds, got -1",
        ),
        (
            r#""lifetime": 86400"#,
            r#""lifetime": "1 day""#,
            r#"intercept[0].timeouts.lifetime: expected a duration (seconds, or a number with a unit: "250ms", "30s", "5m", "1h", "1d"), got "1 day""#,
        ),
        (
            r#""lifetime": 86400"#,
            r#""life": 86400"#,
            "intercept[0].timeouts.life: unknown field `life`, expected `idle` or `lifetime`",
        ),
        (
            r#""keepalive": false"#,
            r#""keepalive": true"#,
            "intercept[1].keepalive: write the probe timing",
        ),
        (
            r#""count": 3"#,
            r#""count": 0"#,
            "intercept[0].keepalive.count: expected 1-127 probes, got 0",
        ),
        (
            r#""interval": 10"#,
            r#""interval": 40000"#,
            "intercept[0].keepalive.interval: expected a duration of 1-32767 whole seconds, got 40000",
        ),
        (
            r#""per_client": 100"#,
            r#""per_client": 0"#,
            "intercept[0].limits.per_client: 0 would refuse every connection",
        ),
        (
            r#""ipv4": 22"#,
            r#""ipv4": 33"#,
            "intercept[0].limits.per_client_prefix: \"ipv4\" is a prefix length 1-32, got 33",
        ),
        (
            r#""max": 50"#,
            r#""maximum": 50"#,
            "intercept[1].limits.per_client_prefix.maximum: unknown field `maximum`",
        ),
        (
            r#""timeouts": { "idle": 2.5 }"#,
            r#""timeouts": { "idle": 2.5, "lifetime": -2 }"#,
            "routes[0].timeouts.lifetime: expected a duration from 0 (none) to 1000000000 seconds, got -2",
        ),
        (
            r#""upstream": "web",
      "timeouts": { "idle": 2.5 }"#,
            r#""reject": true,
      "timeouts": { "idle": 2.5 }"#,
            "routes[0]: a rejecting route relays nothing: \"timeouts\" needs \"upstream\"",
        ),
    ] {
        let err = error_with(from, to);
        assert!(err.contains(expected), "{to}: {err}");
    }
}
