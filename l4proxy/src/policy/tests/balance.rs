//! An upstream's `balance`, server objects (`weight`, `backup`),
//! `retries`, `health` and `observe`: old policies read as before, and
//! each mistake is refused with its place.

use std::time::Duration;

use super::error_of;
use crate::policy::*;

/// Each upstream on its own line, so that positions are easy to check.
const EXAMPLE: &str = r#"{
  "intercept": [
    { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [443], "upstream": "web" },
    { "name": "api", "prefixes": ["192.0.2.0/24"], "ports": [8443], "upstream": "api" }
  ],
  "upstreams": {
    "web": { "servers": ["203.0.113.2:443", { "address": "203.0.113.3:443", "weight": 3 }, { "address": "203.0.113.9:443", "backup": true }], "balance": "least-connections", "retries": 1, "health": { "interval": "500ms", "fast_interval": 0.1, "rise": 3, "send_proxy": true }, "proxy_protocol": "v2" },
    "api": { "servers": ["203.0.113.4:8443", "203.0.113.5:8443"], "balance": "source-hash", "observe": { "errors": 5 } }
  }
}"#;

fn error_with(from: &str, to: &str) -> String {
    super::error_in(EXAMPLE, from, to)
}

fn upstream<'p>(policy: &'p Policy, name: &str) -> &'p Upstream {
    policy.upstreams.iter().find(|u| u.name == name).unwrap()
}

#[test]
fn example_is_valid() {
    let policy = Policy::from_json(EXAMPLE).unwrap();
    let web = upstream(&policy, "web");
    assert_eq!(
        web.servers(),
        ["203.0.113.2:443", "203.0.113.3:443", "203.0.113.9:443"].map(|s| s.parse().unwrap())
    );
    assert_eq!(
        web.balancing,
        Balancing {
            balance: Balance::LeastConnections,
            servers: vec![
                ServerOptions::default(),
                ServerOptions {
                    weight: 3,
                    backup: false
                },
                ServerOptions {
                    weight: 1,
                    backup: true
                },
            ],
            retries: Some(1),
            // Seconds or with a unit; what is left out from HAProxy's
            // defaults, or from the interval.
            health: Some(HealthCheck {
                interval: Duration::from_millis(500),
                fast_interval: Duration::from_millis(100),
                down_interval: Duration::from_millis(500),
                rise: 3,
                fall: 3,
                timeout: Duration::from_millis(500),
                send_proxy: true,
            }),
            observe: None,
        }
    );
    let api = upstream(&policy, "api");
    assert_eq!(
        api.balancing,
        Balancing {
            balance: Balance::SourceHash,
            servers: Vec::new(),
            retries: None,
            health: None,
            observe: Some(Observe {
                errors: 5,
                down_for: Duration::from_secs(30),
            }),
        }
    );
}

#[test]
fn plain_pools_are_round_robin_without_checks_however_written() {
    let plain = r#"{ "intercept": [ { "name": "r", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "u" } ],
                     "upstreams": { "u": { "servers": ["203.0.113.2:80", "203.0.113.3:80"] } } }"#;
    let objects = plain.replace(
        r#""203.0.113.3:80""#,
        r#"{ "address": "203.0.113.3:80", "weight": 1, "backup": false }"#,
    );
    let defaults = plain.replace(
        r#""] } }"#,
        r#""], "balance": "round-robin", "health": {} } }"#,
    );
    let plain = Policy::from_json(plain).unwrap();
    assert_eq!(Policy::from_json(&objects).unwrap(), plain);
    assert_eq!(plain.upstreams[0].balancing, Balancing::default());
    let health = Policy::from_json(&defaults).unwrap().upstreams[0]
        .balancing
        .health
        .unwrap();
    assert_eq!(
        health,
        HealthCheck {
            interval: Duration::from_secs(2),
            fast_interval: Duration::from_secs(2),
            down_interval: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            timeout: Duration::from_secs(2),
            send_proxy: false,
        }
    );
}

#[test]
fn parents_are_balanced_and_checked_too() {
    let policy = Policy::from_json(
        r#"{ "intercept": [ { "name": "r", "prefixes": ["192.0.2.0/24"], "ports": [443], "interfaces": ["eth1"], "upstream": "p" } ],
             "upstreams": { "p": { "parent": { "servers": ["203.0.113.8:3128", "203.0.113.9:3128"] },
                                   "balance": "random-two", "health": { "fall": 2 } } } }"#,
    )
    .unwrap();
    let balancing = &policy.upstreams[0].balancing;
    assert_eq!(balancing.balance, Balance::RandomTwo);
    assert_eq!(balancing.health.unwrap().fall, 2);
}

#[test]
fn values_are_refused_where_they_are() {
    for (from, to, reason) in [
        (
            r#""weight": 3"#,
            r#""weight": 0"#,
            "7:89: upstreams.web.servers[1].weight: a weight is 1-256, got 0",
        ),
        (
            r#""weight": 3"#,
            r#""weight": 257"#,
            "7:91: upstreams.web.servers[1].weight: a weight is 1-256, got 257",
        ),
        (
            r#""least-connections""#,
            r#""fastest""#,
            "7:162: upstreams.web.balance: unknown variant `fastest`, expected one of `round-robin`, `least-connections`, `source-hash`, `random-two`",
        ),
        (
            r#""backup": true"#,
            r#""spare": true"#,
            "7:130: upstreams.web.servers[2].spare: unknown field `spare`, expected one of `address`, `weight`, `backup`",
        ),
        (
            r#""rise": 3"#,
            r#""rise": 0"#,
            "7:252: upstreams.web.health.rise: expected 1-1000, got 0",
        ),
        (
            r#""interval": "500ms""#,
            r#""interval": "5ms""#,
            r#"7:217: upstreams.web.health.interval: expected a duration from 10ms to 1d, got "5ms""#,
        ),
        (
            r#""interval": "500ms""#,
            r#""inter": "500ms""#,
            "7:207: upstreams.web.health.inter: unknown field `inter`, expected one of `interval`",
        ),
        (
            r#""203.0.113.2:443""#,
            r#""203.0.113.2""#,
            "7:40: upstreams.web.servers[0]: expected a server address like 203.0.113.2:8080",
        ),
    ] {
        let error = error_with(from, to);
        assert!(error.starts_with(reason), "{to}: {error}");
    }
}

#[test]
fn what_cannot_work_together_is_refused_with_the_upstream() {
    for (from, to, reason) in [
        (
            r#", "proxy_protocol": "v2""#,
            "",
            r#""health.send_proxy" sends the upstream's PROXY header, but it has no "proxy_protocol""#,
        ),
        (
            r#""retries": 1"#,
            r#""retries": 3"#,
            r#""retries" must be less than the number of servers"#,
        ),
        (
            r#""203.0.113.2:443", { "address": "203.0.113.3:443", "weight": 3 }"#,
            r#"{ "address": "203.0.113.2:443", "backup": true }"#,
            "every server is a backup: at least one must not be",
        ),
        (
            r#", "health": { "interval": "500ms", "fast_interval": 0.1, "rise": 3, "send_proxy": true }"#,
            "",
            r#"a backup server is used only when no other is up, which only "health" or "observe" can tell: add one"#,
        ),
        (
            r#""proxy_protocol": "v2" }"#,
            r#""proxy_protocol": "v2", "observe": { "down_for": "1m" } }"#,
            r#""observe.down_for" is for upstreams without "health""#,
        ),
    ] {
        let error = error_with(from, to);
        assert!(
            error.contains(&format!("upstreams.web: {reason}")),
            "{to}: {error}"
        );
    }
    let error = error_of(
        r#"{ "intercept": [ { "name": "r", "prefixes": ["192.0.2.0/24"], "ports": [80], "interfaces": ["eth1"], "upstream": "o" } ],
             "upstreams": { "o": { "original_destination": true, "balance": "source-hash" } } }"#,
    );
    assert!(
        error.contains(r#"an "original_destination" upstream has no servers to balance or check"#),
        "{error}"
    );
}
