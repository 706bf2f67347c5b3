//! Comments on any object, durations with units, and every error of a
//! policy at once.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;
use serde_json::Value;

use super::{
    edited, error_of,
    tls::{FAR, Files},
};
use crate::policy::{raw, *};

/// A policy with every kind of object the schema has, each with a comment,
/// and durations written with units.
fn commented(files: &Files) -> String {
    let (chain, key, ca) = files.leaf("app", &["app.example.test"], FAR);
    format!(
        r#"{{
  "comment": "the whole policy",
  "intercept": [
    {{ "comment": "a rule", "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [443], "upstream": "app",
      "accept_proxy_protocol": {{ "comment": "the balancers", "from": ["198.51.100.0/24"] }},
      "timeouts": {{ "comment": "long", "idle": "5m", "lifetime": "1d" }},
      "keepalive": {{ "comment": "probes", "idle": "1m", "interval": "10s", "count": 3 }},
      "limits": {{ "comment": "per client", "per_client": 10,
                  "per_client_prefix": {{ "comment": "per /24", "max": 100 }} }},
      "terminate": {{ "comment": "ours", "certificates": [ {{ "comment": "main", "chain": "{chain}", "key": "{key}" }} ],
                     "client_certificates": {{ "comment": "optional", "ca": "{ca}", "required": false }} }} }},
    {{ "comment": "explicit", "name": "explicit", "upstream": "parent",
      "connect": {{ "comment": "the office", "listen": ["198.51.100.1:3128"], "clients": ["198.51.100.0/24"],
                   "resolve_timeout": "1500ms" }} }}
  ],
  "routes": [
    {{ "comment": "a route", "match": {{ "comment": "TLS", "intercept": ["web"], "sni": ["app.example.test"] }},
      "upstream": "app", "timeouts": {{ "comment": "short", "idle": "250ms" }} }}
  ],
  "upstreams": {{
    "comment": "the pools",
    "app": {{ "comment": "servers", "servers": ["203.0.113.2:443"],
             "tls": {{ "comment": "re-encrypt", "ca": "{ca}",
                      "certificate": {{ "comment": "ours", "chain": "{chain}", "key": "{key}" }} }} }},
    "parent": {{ "comment": "upstream proxy", "parent": {{ "comment": "over TLS", "servers": ["203.0.113.8:3128"],
                "tls": {{ "comment": "its CA", "ca": "{ca}", "server_name": "app.example.test" }} }} }}
  }}
}}"#
    )
}

/// Each object's `comment` in `value`, by its path as messages write it.
fn comments(value: &Value, path: &str, found: &mut Vec<String>) {
    let join = |key: &str| match path {
        "" => key.to_owned(),
        _ => format!("{path}.{key}"),
    };
    match value {
        Value::Object(fields) => {
            assert!(
                fields.contains_key("comment"),
                "every object of the example has a comment: {path}"
            );
            for (key, field) in fields {
                match key.as_str() {
                    "comment" => found.push(join(key)),
                    _ => comments(field, &join(key), found),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                comments(item, &format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

/// `value` with the comment at `path` (as [`comments`] names it) set to
/// `with`.
fn set_comment(value: &mut Value, path: &str, with: Value) {
    let mut node = value;
    for part in path.split('.') {
        let (key, indexes) = part.split_once('[').unwrap_or((part, ""));
        node = &mut node[key];
        for index in indexes.split('[').filter(|i| !i.is_empty()) {
            node = &mut node[index.trim_end_matches(']').parse::<usize>().unwrap()];
        }
    }
    *node = with;
}

fn without_comments(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            fields.remove("comment");
            fields.values_mut().for_each(without_comments);
        }
        Value::Array(items) => items.iter_mut().for_each(without_comments),
        _ => {}
    }
}

#[test]
fn a_comment_is_allowed_on_every_object_and_changes_nothing() {
    let files = Files::new("comments");
    let text = commented(&files);
    let with = Policy::from_json(&text).unwrap_or_else(|e| panic!("{e}"));
    let mut value: Value = serde_json::from_str(&text).unwrap();
    without_comments(&mut value);
    assert_eq!(Policy::from_json(&value.to_string()).unwrap(), with);
    let mut found = Vec::new();
    comments(&serde_json::from_str(&text).unwrap(), "", &mut found);
    assert_eq!(found.len(), 22, "{found:?}");
}

#[test]
fn a_comment_that_is_not_a_string_is_refused_at_its_place_at_every_depth() {
    let files = Files::new("bad-comments");
    let text = commented(&files);
    let value: Value = serde_json::from_str(&text).unwrap();
    let mut found = Vec::new();
    comments(&value, "", &mut found);
    for path in found {
        let mut edited = value.clone();
        set_comment(&mut edited, &path, Value::from(5));
        let pretty = serde_json::to_string_pretty(&edited).unwrap();
        let err = error_of(&pretty);
        // `5` is on its own line in the pretty text: the error is there.
        let line = 1 + pretty
            .lines()
            .position(|l| l.trim().trim_end_matches(',') == r#""comment": 5"#)
            .unwrap();
        assert!(
            err.starts_with(&format!("{line}:")),
            "{path}: expected line {line}: {err}"
        );
        assert!(
            err.contains(&format!(
                "{path}: invalid type: integer `5`, expected a string (\"comment\" is a note"
            )),
            "{path}: {err}"
        );
    }
}

#[test]
fn a_comment_comes_once_and_names_no_upstream() {
    let text = r#"{
  "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "web" } ],
  "upstreams": { "web": { "servers": ["203.0.113.2:80"] } }
}"#;
    let err = error_of(&edited(
        text,
        r#"{ "name": "web""#,
        r#"{ "comment": "a", "comment": "b", "name": "web""#,
    ));
    assert_eq!(err, "2:44: intercept[0].comment: duplicate field `comment`");
    // "comment" is a note on the upstreams' object too, so not a name.
    let err = error_of(&edited(
        text,
        r#""upstreams": { "#,
        r#""upstreams": { "comment": { "servers": ["203.0.113.3:80"] }, "#,
    ));
    assert!(
        err.starts_with("3:28: upstreams.comment: invalid type: map, expected a string"),
        "{err}"
    );
    // Only objects take one: a list is not an object.
    let err = error_of(&edited(
        text,
        r#""ports": [80]"#,
        r#""ports": [80, { "comment": "http" }]"#,
    ));
    assert!(
        err.contains("intercept[0].ports[1]: invalid type: map"),
        "{err}"
    );
}

#[test]
fn durations_take_units_in_every_field() {
    let files = Files::new("durations");
    let policy = Policy::from_json(&commented(&files)).unwrap();
    let (web, explicit) = (&policy.rules[0], &policy.rules[1]);
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
            idle: 60,
            interval: 10,
            count: 3
        })
    );
    assert_eq!(
        explicit.connect.as_ref().unwrap().resolve_timeout,
        Duration::from_millis(1500)
    );
    assert_eq!(
        policy.routes[0].timeouts.idle,
        Some(Duration::from_millis(250))
    );
}

#[test]
fn durations_out_of_bounds_name_the_field_and_the_value_as_written() {
    let text = r#"{
  "intercept": [
    { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "web",
      "timeouts": { "idle": "5m" }, "keepalive": { "idle": 30, "interval": 10, "count": 3 } },
    { "name": "explicit", "upstream": "web",
      "connect": { "listen": ["198.51.100.1:3128"], "clients": ["198.51.100.0/24"], "resolve_timeout": 2 } }
  ],
  "upstreams": { "web": { "servers": ["203.0.113.2:80"] } }
}"#;
    Policy::from_json(text).unwrap();
    for (from, to, line, expected) in [
        (
            r#""idle": "5m""#,
            r#""idle": "40000d""#,
            4,
            r#"intercept[0].timeouts.idle: expected a duration from 0 (none) to 1000000000 seconds, got "40000d""#,
        ),
        (
            r#""idle": "5m""#,
            r#""idle": "5 min""#,
            4,
            r#"intercept[0].timeouts.idle: expected a duration (seconds, or a number with a unit: "250ms", "30s", "5m", "1h", "1d"), got "5 min""#,
        ),
        (
            r#""idle": "5m""#,
            r#""idle": true"#,
            4,
            r#"intercept[0].timeouts.idle: invalid type: boolean `true`, expected a duration: seconds, or a number with a unit"#,
        ),
        (
            r#""idle": 30"#,
            r#""idle": "1500ms""#,
            4,
            r#"intercept[0].keepalive.idle: expected a duration of 1-32767 whole seconds, got "1500ms""#,
        ),
        (
            r#""resolve_timeout": 2"#,
            r#""resolve_timeout": "6m""#,
            6,
            r#"intercept[1].connect.resolve_timeout: expected a duration above 0, at most 300 seconds, got "6m""#,
        ),
    ] {
        let err = error_of(&edited(text, from, to));
        let (place, message) = err.split_once(' ').unwrap();
        assert!(place.starts_with(&format!("{line}:")), "{to}: {err}");
        assert!(message.starts_with(expected), "{to}: {err}");
    }
}

/// Errors in three rules, a route and an upstream, with the upstreams
/// written first: each element's first error, in the order of the text.
const SEVERAL: &str = r#"{
  "upstreams": {
    "web": { "servers": ["203.0.113.2:0"] },
    "ok": { "servers": ["203.0.113.3:80"] }
  },
  "intercept": [
    { "name": "a", "prefixes": ["192.0.2.1/24"], "ports": [70001], "upstream": "ok" },
    { "name": "b", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "ok" },
    { "name": "c", "prefixes": ["192.0.2.0/24"], "ports": [70000], "upstream": "ok" },
    { "name": "d", "prefixes": ["192.0.2.0/24"], "ports": [81],
      "upstream": "nowhere", "colour": "red" }
  ],
  "routes": [
    { "match": { "sni": ["a.*.example.com"] }, "upstream": "ok" },
    { "match": {}, "upstream": "ok", "reject": true }
  ]
}"#;

#[test]
fn every_element_s_first_error_is_reported_in_the_order_of_the_text() {
    let errors: Vec<String> = match Policy::from_json_all(SEVERAL) {
        Ok(_) => panic!("accepted"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    assert_eq!(
        errors,
        [
            "3:41: upstreams.web.servers[0]: port must be 1-65535, got 0",
            "7:47: intercept[0].prefixes[0]: host bits set; did you mean 192.0.2.0/24?",
            "9:64: intercept[2].ports[0]: port must be 1-65535, got 70000",
            "11:37: intercept[3].colour: unknown field `colour`, expected one of `name`, `prefixes`, `ports`, `connect`, `upstream`, `interfaces`, `accept_proxy_protocol`, `timeouts`, `keepalive`, `limits`, `terminate`",
            "14:43: routes[0].match.sni[0]: wildcard must be a leading label, like *.example.com, got \"a.*.example.com\"",
            "15:53: routes[1]: a route takes \"upstream\" or \"reject\", not both",
        ]
    );
    // The daemon shows the first.
    assert_eq!(error_of(SEVERAL), errors[0]);
}

#[test]
fn checks_across_elements_run_once_every_element_reads() {
    // Fixed, but for the unknown upstream, which only a check across
    // elements can see: it was not reported above (with an element
    // missing it could be wrong), and is now.
    let fixed = SEVERAL
        .replace("203.0.113.2:0", "203.0.113.2:80")
        .replace("192.0.2.1/24", "192.0.2.0/24")
        .replace("[70001]", "[79]")
        .replace("[70000]", "[82]")
        .replace(", \"colour\": \"red\"", "")
        .replace("a.*.example.com", "*.example.com")
        .replace(", \"reject\": true", "");
    let errors = Policy::from_json_all(&fixed).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "intercept[3].upstream: no upstream named \"nowhere\"; known: ok, web"
    );
}

#[test]
fn a_syntax_error_is_reported_alone() {
    // The element errors above are not reported: past a syntax error the
    // text cannot be trusted.
    let broken = SEVERAL.replace("\"reject\": true }", "\"reject\": true },");
    let errors = Policy::from_json_all(&broken).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(
        errors
            .to_string()
            .starts_with("16:3: routes: trailing comma"),
        "{errors}"
    );
    let errors = Policy::from_json_all(&format!("{SEVERAL} {{}}")).unwrap_err();
    assert_eq!(errors.to_string(), "17:3: trailing characters");
}

/// The policy's text read in one pass, with no element read apart: what the
/// places of errors were before elements were read one by one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SinglePass {
    intercept: Vec<raw::Object<raw::Rule>>,
    #[serde(default)]
    routes: Vec<raw::Route>,
    upstreams: BTreeMap<String, raw::Upstream>,
}

#[test]
fn an_element_s_error_is_placed_where_a_single_pass_places_it() {
    let base = r#"{ "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "web" },
    { "name": "alt",
      "prefixes": ["192.0.2.0/24"],
      "ports": [8080],
      "upstream": "web" } ],
  "routes": [ { "match": { "host": ["www.example.com"] }, "upstream": "web" },
    {
      "match": { "sni": ["a.example.com"] },
      "upstream": "web"
    } ],
  "upstreams": { "web": { "servers": ["203.0.113.2:80"] },
    "alt": {
      "servers": ["203.0.113.3:80"] } } }"#;
    Policy::from_json(base).unwrap();
    for (from, to) in [
        // On an element's first line, where columns are shifted.
        (
            r#"["192.0.2.0/24"], "ports": [80]"#,
            r#"["192.0.2.1/24"], "ports": [80]"#,
        ),
        (r#""name": "web""#, r#""name": "web", "x": 1"#),
        (r#"["www.example.com"]"#, r#"["www.*.com"]"#),
        (r#""servers": ["203.0.113.2:80"]"#, r#""servers": []"#),
        (
            r#""name": "web""#,
            r#""name": "web", "timeouts": { "idle": "40000d" }"#,
        ),
        (
            r#""name": "web""#,
            r#""name": "web", "keepalive": { "comment": 1 }"#,
        ),
        // On its later lines.
        (r#"[8080]"#, r#"[0]"#),
        (
            r#""name": "alt","#,
            r#""name": "alt", "timeouts": { "comment": "x", "idle": "5 m" },"#,
        ),
        (
            r#"{
      "match""#,
            r#"{ "comment": ["not", "text"],
      "match""#,
        ),
        (
            r#"["a.example.com"] }"#,
            r#"["a.example.com"], "no_sni": true }"#,
        ),
        (r#"["203.0.113.3:80"]"#, r#"["203.0.113.3"]"#),
        // About an element as a whole: just past its closing brace.
        (
            r#""upstream": "web"
    } ]"#,
            r#""upstream": "web", "reject": true
    } ]"#,
        ),
        (
            r#""servers": ["203.0.113.3:80"] }"#,
            r#""servers": ["203.0.113.3:80"], "original_destination": true }"#,
        ),
    ] {
        let text = edited(base, from, to);
        let mut de = serde_json::Deserializer::from_str(&text);
        let single = match serde_path_to_error::deserialize::<_, SinglePass>(&mut de) {
            Ok(_) => panic!("{to}: accepted in one pass"),
            Err(err) => err.into_inner(),
        };
        let place = format!("{}:{}: ", single.line(), single.column().max(1));
        let err = error_of(&text);
        assert!(err.starts_with(&place), "{to}: one pass at {place}; {err}");
    }
}

#[test]
fn check_all_names_the_file_in_each_error() {
    let dir = std::env::temp_dir().join(format!("l4proxy-{}-friendly", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("several.json");
    std::fs::write(&file, SEVERAL).unwrap();
    let errors = Policy::load_all(&file).unwrap_err();
    assert_eq!(errors.len(), 6);
    for error in errors.iter() {
        assert!(
            error
                .to_string()
                .starts_with(&format!("{}:", file.display())),
            "{error}"
        );
    }
    assert_eq!(
        Policy::load(&file).unwrap_err().to_string(),
        errors.iter().next().unwrap().to_string()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn duration_flags_take_what_policies_take() {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    let parse = |flags: &[&str]| {
        let args = ["l4proxy", "run", "--policy", "p.json"];
        Cli::try_parse_from(args.iter().chain(flags)).map(|cli| match cli.command {
            Command::Run(run) => run,
            other => panic!("{other:?}"),
        })
    };
    let run = parse(&[
        "--grace-period",
        "1h",
        "--connect-timeout",
        "2.5",
        "--idle-timeout",
        "5m",
        "--max-lifetime",
        "1d",
        "--sniff-timeout",
        "250ms",
        "--tcp-keepalive",
        "1m,10s,3",
    ])
    .unwrap();
    assert_eq!(run.grace_period, Duration::from_secs(3600));
    assert_eq!(run.connect_timeout, Duration::from_millis(2500));
    assert_eq!(run.idle_timeout, Duration::from_secs(300));
    assert_eq!(run.max_lifetime, Duration::from_secs(86400));
    assert_eq!(run.sniff_timeout, Duration::from_millis(250));
    assert_eq!(
        run.tcp_keepalive,
        Keepalive::Probe {
            idle: 60,
            interval: 10,
            count: 3
        }
    );
    // The defaults are still plain seconds.
    let run = parse(&[]).unwrap();
    assert_eq!(run.idle_timeout, Duration::from_secs(3600));
    for flag in [
        "--grace-period",
        "--connect-timeout",
        "--idle-timeout",
        "--max-lifetime",
        "--sniff-timeout",
    ] {
        for bad in ["-1", "5 m", "40000d"] {
            let err = parse(&[&format!("{flag}={bad}")]).unwrap_err().to_string();
            assert!(err.contains("expected a duration"), "{flag} {bad}: {err}");
        }
    }
}
