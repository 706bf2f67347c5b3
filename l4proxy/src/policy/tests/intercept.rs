//! Intercept rules and upstreams as written before routes existed: all of it
//! must keep working, and keep being refused, as it was.

use l4proxy_common::{MAX_INTERFACE_RULES, MAX_RULE_ENTRIES, MAX_UPSTREAM_SERVERS};

use super::error_of;
use crate::policy::*;

/// The example of the module doc, each rule on its own line so that
/// positions in the tests below are easy to check.
const EXAMPLE: &str = r#"{
  "intercept": [
    { "name": "web", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80, "8000-8099"], "upstream": "web-servers" },
    { "name": "all-ports", "prefixes": ["192.0.2.10/32"], "ports": ["*"], "upstream": "web-servers" }
  ],
  "upstreams": {
    "web-servers": { "servers": ["203.0.113.2:8080", "[2001:db8:5::2]:8080"] }
  }
}"#;

/// The error message for `EXAMPLE` with `from` replaced by `to`.
fn error_with(from: &str, to: &str) -> String {
    super::error_in(EXAMPLE, from, to)
}

#[test]
fn example_is_valid() {
    let policy = Policy::from_json(EXAMPLE).unwrap();
    assert_eq!(
        policy,
        Policy {
            rules: vec![
                InterceptRule {
                    name: "web".to_owned(),
                    prefixes: vec![
                        "192.0.2.0/24".parse().unwrap(),
                        "2001:db8:a::/64".parse().unwrap()
                    ],
                    ports: vec![PortSpec::Single(80), PortSpec::Range(8000, 8099)],
                    upstream: Some(UpstreamId(0)),
                    interfaces: vec![],
                    accept_proxy_from: vec![],
                    timeouts: Timeouts::default(),
                    keepalive: None,
                    limits: ClientLimits::default(),
                    connect: None,
                    terminate: None,
                },
                InterceptRule {
                    name: "all-ports".to_owned(),
                    prefixes: vec!["192.0.2.10/32".parse().unwrap()],
                    ports: vec![PortSpec::Any],
                    upstream: Some(UpstreamId(0)),
                    interfaces: vec![],
                    accept_proxy_from: vec![],
                    timeouts: Timeouts::default(),
                    keepalive: None,
                    limits: ClientLimits::default(),
                    connect: None,
                    terminate: None,
                },
            ],
            routes: vec![],
            upstreams: vec![Upstream {
                name: "web-servers".to_owned(),
                target: Target::Servers(vec![
                    "203.0.113.2:8080".parse().unwrap(),
                    "[2001:db8:5::2]:8080".parse().unwrap()
                ]),
                bind: Bind::Proxy,
                proxy_protocol: None,
                tls: None,
                balancing: Balancing::default(),
            }],
        }
    );
}

#[test]
fn upstreams_are_sorted_by_name() {
    let json = EXAMPLE
        .replacen(r#""upstream": "web-servers" }"#, r#""upstream": "b" }"#, 1)
        .replacen(
            r#""web-servers": {"#,
            r#""b": { "servers": ["203.0.113.3:80"] }, "a": { "servers": ["203.0.113.4:80"] }, "web-servers": {"#,
            1,
        );
    let policy = Policy::from_json(&json).unwrap();
    let names: Vec<&str> = policy.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "web-servers"]);
    assert_eq!(policy.rules[0].upstream, Some(UpstreamId(1)));
    assert_eq!(policy.rules[1].upstream, Some(UpstreamId(2)));
}

#[test]
fn unknown_field_at_top_level() {
    let err = error_with(r#""upstreams": {"#, r#""intercepts": [], "upstreams": {"#);
    assert!(
        err.starts_with("6:14: intercepts: unknown field `intercepts`"),
        "{err}"
    );
}

#[test]
fn unknown_field_in_rule() {
    let err = error_with(r#""name": "web","#, r#""name": "web", "port": 80,"#);
    assert!(
        err.starts_with("3:27: intercept[0].port: unknown field `port`"),
        "{err}"
    );
}

#[test]
fn unknown_field_in_upstream() {
    let err = error_with(r#""servers": ["203"#, r#""weight": 1, "servers": ["203"#);
    assert!(
        err.contains("upstreams.web-servers.weight: unknown field `weight`"),
        "{err}"
    );
}

#[test]
fn bad_prefix() {
    assert_eq!(
        error_with(r#""192.0.2.0/24""#, r#""192.0.2""#),
        r#"3:45: intercept[0].prefixes[0]: expected an address prefix like 192.0.2.0/24, got "192.0.2""#
    );
}

#[test]
fn bare_address_is_not_a_prefix() {
    let err = error_with(r#""192.0.2.10/32""#, r#""192.0.2.10""#);
    assert!(
        err.ends_with(r#"intercept[1].prefixes[0]: expected an address prefix like 192.0.2.0/24, got "192.0.2.10""#),
        "{err}"
    );
}

#[test]
fn prefix_with_host_bits() {
    assert_eq!(
        error_with(r#""192.0.2.0/24""#, r#""192.0.2.1/24""#),
        "3:50: intercept[0].prefixes[0]: host bits set; did you mean 192.0.2.0/24?"
    );
}

/// Read as decimal here, as octal by `inet_aton` and the tools built on
/// it: refused, with the form meant.
#[test]
fn prefix_with_a_leading_zero() {
    for (bad, number, meant) in [
        ("010.0.0.0/8", "010", "10.0.0.0/8"),
        ("192.0.2.010/32", "010", "192.0.2.10/32"),
        ("2001:db8::/064", "064", "2001:db8::/64"),
    ] {
        let err = error_with(r#""192.0.2.0/24""#, &format!("{bad:?}"));
        assert!(
            err.ends_with(&format!(
                "intercept[0].prefixes[0]: {number} in {bad:?} has a leading zero, which other tools read as octal; write {meant}"
            )),
            "{err}"
        );
    }
    let zeros = EXAMPLE.replace("192.0.2.0/24", "10.0.0.0/8");
    Policy::from_json(&zeros).unwrap_or_else(|e| panic!("0 alone is no leading zero: {e}"));
}

#[test]
fn ipv4_mapped_prefix() {
    let err = error_with(r#""192.0.2.0/24""#, r#""::ffff:192.0.2.0/120""#);
    assert!(
        err.ends_with(
            "intercept[0].prefixes[0]: IPv4-mapped IPv6 prefix; use the IPv4 form 192.0.2.0/24"
        ),
        "{err}"
    );
}

#[test]
fn prefixes_no_tcp_connection_goes_to() {
    for (prefix, said) in [
        ("224.0.0.0/4", "224.0.0.0/4 is multicast or broadcast"),
        ("239.1.2.0/24", "239.1.2.0/24 is multicast or broadcast"),
        ("ff02::/16", "ff02::/16 is multicast or broadcast"),
        (
            "255.255.255.255/32",
            "255.255.255.255/32 is multicast or broadcast",
        ),
    ] {
        let err = error_with(r#""192.0.2.0/24""#, &format!("{prefix:?}"));
        assert!(
            err.ends_with(&format!(
                "intercept[0].prefixes[0]: {said}: no TCP connection goes there"
            )),
            "{err}"
        );
    }
    // One that only holds them among others is taken.
    Policy::from_json(&EXAMPLE.replace(r#""192.0.2.10/32""#, r#""224.0.0.0/3""#)).unwrap();
}

#[test]
fn a_local_rule_cannot_take_every_address() {
    for (prefixes, family) in [
        (r#"["0.0.0.0/0", "2001:db8:a::/64"]"#, "IPv4"),
        (r#"["192.0.2.0/24", "::/0"]"#, "IPv6"),
        // In halves, as in one.
        (r#"["0.0.0.0/1", "128.0.0.0/1"]"#, "IPv4"),
    ] {
        let err = error_with(r#"["192.0.2.0/24", "2001:db8:a::/64"]"#, prefixes);
        assert!(
            err.contains(&format!(
                "intercept[0].prefixes: hold every {family} address: on a rule without \"interfaces\""
            )),
            "{err}"
        );
    }
    // Half of the addresses is the operator's business.
    Policy::from_json(
        &EXAMPLE.replace(r#"["192.0.2.0/24", "2001:db8:a::/64"]"#, r#"["0.0.0.0/1"]"#),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // A gateway's may: it intercepts what it forwards, and makes nothing local.
    let gateway = EXAMPLE.replace(
        r#""prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80, "8000-8099"],"#,
        r#""prefixes": ["0.0.0.0/0", "::/0"], "ports": [80, "8000-8099"], "interfaces": ["eth0"],"#,
    );
    Policy::from_json(&gateway).unwrap();
}

#[test]
fn a_field_of_the_wrong_kind_is_named_in_words() {
    for (field, said) in [
        (
            r#""limits": { "per_client": "x" }"#,
            r#"intercept[0].limits.per_client: invalid type: string "x", expected a whole number from 0 to 4294967295"#,
        ),
        (
            r#""limits": { "per_client": -1 }"#,
            "intercept[0].limits.per_client: invalid value: integer `-1`, expected a whole number from 0 to 4294967295",
        ),
        (
            r#""limits": { "per_client_prefix": { "ipv4": 300, "max": 4 } }"#,
            "intercept[0].limits.per_client_prefix.ipv4: invalid value: integer `300`, expected a whole number from 0 to 255",
        ),
        // An object where another type came: Rust's struct names stay out.
        (
            r#""timeouts": 1"#,
            "intercept[0].timeouts: invalid type: integer `1`, expected an object",
        ),
        (
            r#""terminate": true"#,
            "intercept[0].terminate: invalid type: boolean `true`, expected an object",
        ),
        (
            r#""limits": "x""#,
            "intercept[0].limits: invalid type: string \"x\", expected an object",
        ),
    ] {
        let err = error_with(
            r#""ports": [80, "8000-8099"],"#,
            &format!(r#""ports": [80, "8000-8099"], {field},"#),
        );
        assert!(err.ends_with(said), "{err}");
    }
}

#[test]
fn a_rule_lists_each_prefix_port_and_interface_once() {
    for (from, to, said) in [
        (
            r#"["192.0.2.0/24", "2001:db8:a::/64"]"#,
            r#"["192.0.2.0/24", "2001:db8:a::/64", "192.0.2.0/24"]"#,
            "intercept[0].prefixes[2]: repeats intercept[0].prefixes[0]: list each once",
        ),
        (
            r#"[80, "8000-8099"]"#,
            r#"[80, "8000-8099", "8000-8099"]"#,
            "intercept[0].ports[2]: repeats intercept[0].ports[1]: list each once",
        ),
        (
            r#""ports": [80, "8000-8099"],"#,
            r#""ports": [80, "8000-8099"], "interfaces": ["eth0", "eth1", "eth0"],"#,
            "intercept[0].interfaces[2]: repeats intercept[0].interfaces[0]: list each once",
        ),
    ] {
        let err = error_with(from, to);
        assert!(err.ends_with(said), "{err}");
    }
}

#[test]
fn port_zero() {
    assert_eq!(
        error_with(r#"[80, "8000-8099"]"#, "[80, 0]"),
        "3:85: intercept[0].ports[1]: port must be 1-65535, got 0"
    );
}

#[test]
fn port_too_large() {
    assert_eq!(
        error_with(r#"[80, "8000-8099"]"#, "[80, 70000]"),
        "3:89: intercept[0].ports[1]: port must be 1-65535, got 70000"
    );
    let err = error_with(r#"[80, "8000-8099"]"#, r#"[80, "8000-70000"]"#);
    assert!(
        err.ends_with("intercept[0].ports[1]: port must be 1-65535, got 70000"),
        "{err}"
    );
}

#[test]
fn backwards_port_range() {
    let err = error_with(r#""8000-8099""#, r#""80-70""#);
    assert!(
        err.ends_with(
            r#"intercept[0].ports[1]: a port range must be "N-M" with N < M, got "80-70""#
        ),
        "{err}"
    );
    let err = error_with(r#""8000-8099""#, r#""80-80""#);
    assert!(err.contains("with N < M"), "{err}");
}

#[test]
fn port_that_is_no_port() {
    for bad in [
        r#""http""#,
        r#""80""#,
        "80.5",
        "-1",
        "null",
        r#""+80-+90""#,
        r#""0080-0090""#,
        r#""80- 90""#,
    ] {
        let err = error_with(r#""8000-8099""#, bad);
        assert!(err.contains("intercept[0].ports[1]: "), "{err}");
    }
}

#[test]
fn empty_file() {
    for text in ["", " \n\t"] {
        assert_eq!(
            error_of(text),
            r#"policy is empty; expected a JSON object with "intercept" and "upstreams""#
        );
    }
}

#[test]
fn empty_object() {
    assert_eq!(error_of("{}"), "1:2: missing field `intercept`");
}

#[test]
fn not_an_object() {
    assert_eq!(
        error_of("[]"),
        r#"1:1: invalid type: sequence, expected a policy object with "intercept" and "upstreams""#
    );
    // serde_json would take a struct's fields as an array too; a policy doesn't.
    let err = error_with(
        r#"{ "name": "all-ports", "prefixes": ["192.0.2.10/32"], "ports": ["*"], "upstream": "web-servers" }"#,
        r#"["all-ports", ["192.0.2.10/32"], ["*"], "web-servers"]"#,
    );
    assert!(
        err.contains("intercept[1]: invalid type: sequence"),
        "{err}"
    );
}

#[test]
fn trailing_text() {
    assert_eq!(
        error_of(&format!("{EXAMPLE} {{}}")),
        "9:3: trailing characters"
    );
}

#[test]
fn empty_lists() {
    assert_eq!(
        error_of(r#"{ "intercept": [], "upstreams": {} }"#),
        "1:17: intercept: must not be empty"
    );
    assert!(
        error_with(r#"[80, "8000-8099"]"#, "[]").contains("intercept[0].ports: must not be empty")
    );
    assert!(
        error_with(r#"["192.0.2.10/32"]"#, "[]")
            .contains("intercept[1].prefixes: must not be empty")
    );
    let err = error_with(r#"["203.0.113.2:8080", "[2001:db8:5::2]:8080"]"#, "[]");
    assert!(
        err.contains("upstreams.web-servers.servers: must not be empty"),
        "{err}"
    );
}

#[test]
fn empty_names() {
    assert!(
        error_with(r#""name": "web""#, r#""name": """#)
            .contains("intercept[0].name: name must not be empty")
    );
    assert!(error_with(r#""web-servers": {"#, r#""": {"#).contains("name must not be empty"));
}

#[test]
fn bad_servers() {
    let err = error_with("203.0.113.2:8080", "203.0.113.2");
    assert!(
        err.contains(
            r#"upstreams.web-servers.servers[0]: expected a server address like 203.0.113.2:8080"#
        ),
        "{err}"
    );
    let err = error_with("203.0.113.2:8080", "203.0.113.2:0");
    assert!(
        err.ends_with("upstreams.web-servers.servers[0]: port must be 1-65535, got 0"),
        "{err}"
    );
    let err = error_with("203.0.113.2:8080", "[::ffff:203.0.113.2]:8080");
    assert!(
        err.ends_with("servers[0]: IPv4-mapped IPv6 address; use the IPv4 form 203.0.113.2:8080"),
        "{err}"
    );
    for (server, reason) in [
        (
            "224.0.0.1:8080",
            "224.0.0.1 is a multicast or broadcast address",
        ),
        (
            "255.255.255.255:8080",
            "255.255.255.255 is a multicast or broadcast address",
        ),
        (
            "[ff02::1]:8080",
            "ff02::1 is a multicast or broadcast address",
        ),
        (
            "[2001:db8:5::2%7]:8080",
            "a zone (%7) belongs only to a link-local address (fe80::/10)",
        ),
        (
            "[fe80::2]:8080",
            "a link-local address needs its zone, the index of its interface (`ip -6 link` lists them): [fe80::2%2]:8080",
        ),
        (
            "0.0.0.0:8080",
            "0.0.0.0:8080 is unspecified: a connection to it reaches this host itself; name the server's address",
        ),
        (
            "[::]:8080",
            "[::]:8080 is unspecified: a connection to it reaches this host itself; name the server's address",
        ),
        (
            "203.0.113.02:8080",
            r#"02 in "203.0.113.02:8080" has a leading zero, which other tools read as octal"#,
        ),
        (
            "203.0.113.2:08080",
            r#"the port in "203.0.113.2:08080" has a leading zero"#,
        ),
        (
            "[2001:db8:5::2]:0443",
            r#"the port in "[2001:db8:5::2]:0443" has a leading zero"#,
        ),
    ] {
        let err = error_with("203.0.113.2:8080", server);
        assert!(
            err.ends_with(&format!("servers[0]: {reason}")),
            "{server}: {err}"
        );
    }
}

#[test]
fn duplicate_upstream_name() {
    let err = error_with(
        r#""web-servers": {"#,
        r#""web-servers": { "servers": ["203.0.113.9:80"] }, "web-servers": {"#,
    );
    assert!(
        err.contains(r#"upstreams: duplicate upstream name "web-servers""#),
        "{err}"
    );
}

#[test]
fn loop_back_into_the_proxy() {
    assert_eq!(
        error_with("203.0.113.2:8080", "192.0.2.10:9"),
        "upstreams.web-servers.servers[0]: 192.0.2.10:9 is intercepted by rule \"all-ports\" (intercept[1]); \
         connecting to it would loop back into the proxy"
    );
    // A port the rules don't take is fine.
    Policy::from_json(&EXAMPLE.replacen("203.0.113.2:8080", "192.0.2.1:9", 1)).unwrap();
}

#[test]
fn unknown_upstream() {
    assert_eq!(
        error_with(
            r#""ports": ["*"], "upstream": "web-servers""#,
            r#""ports": ["*"], "upstream": "web""#
        ),
        r#"intercept[1].upstream: no upstream named "web"; known: web-servers"#
    );
}

#[test]
fn duplicate_rule_name() {
    assert_eq!(
        error_with(r#""name": "all-ports""#, r#""name": "web""#),
        r#"intercept[1].name: duplicate rule name "web" (also intercept[0])"#
    );
}

#[test]
fn overlap_with_equal_precedence() {
    let second = r#""prefixes": ["192.0.2.10/32"], "ports": ["*"]"#;
    assert_eq!(
        error_with(second, r#""prefixes": ["192.0.2.0/24"], "ports": [80]"#),
        r#"intercept[1]: overlaps intercept[0] ("web") on 192.0.2.0/24 port 80 with equal precedence"#
    );
    assert_eq!(
        error_with(
            second,
            r#""prefixes": ["192.0.2.0/24"], "ports": ["8050-8149"]"#
        ),
        r#"intercept[1]: overlaps intercept[0] ("web") on 192.0.2.0/24 ports 8050-8099 with equal precedence"#
    );
    // "1-65535" is every port, as "*" is: the same precedence.
    let every_port = EXAMPLE.replacen(r#"[80, "8000-8099"]"#, r#"["1-65535"]"#, 1);
    assert_eq!(
        super::error_in(&every_port, r#"["192.0.2.10/32"]"#, r#"["192.0.2.0/24"]"#),
        r#"intercept[1]: overlaps intercept[0] ("web") on 192.0.2.0/24 any port with equal precedence"#
    );
    // Different precedence (narrower range, longer prefix) or no common port: fine.
    for ok in [
        r#""prefixes": ["192.0.2.0/24"], "ports": ["8050-8059", 81]"#,
        r#""prefixes": ["192.0.2.0/25"], "ports": [80]"#,
        r#""prefixes": ["192.0.2.0/24"], "ports": ["8100-8199"]"#,
    ] {
        Policy::from_json(&EXAMPLE.replacen(second, ok, 1)).unwrap();
    }
}

#[test]
fn too_many_kernel_entries() {
    // Each distinct port is a class of its own: 96 000 prefixes × 11 ports.
    let prefixes: Vec<String> = (0..96_000)
        .map(|i: u32| format!(r#""10.{}.{}.{}/32""#, i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let ports: Vec<String> = (1..=11).map(|port: u32| port.to_string()).collect();
    let err = error_with(
        r#"["192.0.2.10/32"], "ports": ["*"]"#,
        &format!(
            r#"[{}], "ports": [{}]"#,
            prefixes.join(", "),
            ports.join(", ")
        ),
    );
    assert_eq!(
        err,
        format!(
            "intercept: compiles to {} kernel entries, more than the limit of {MAX_RULE_ENTRIES} \
             (one entry per prefix and port class: ports named by the same specs share a class)",
            2 * 2 + 96_000 * 11
        )
    );
}

#[test]
fn too_many_interface_pairs_or_servers() {
    // 66 gateway rules of 1 000 interfaces: 66 000 (interface, rule) pairs.
    let interfaces: Vec<String> = (0..1000).map(|k| format!(r#""e{k}""#)).collect();
    let rules: Vec<String> = (0..66)
        .map(|i| {
            format!(
                r#"{{ "name": "gw{i}", "prefixes": ["203.0.113.{i}/32"], "ports": [80],
                     "interfaces": [{}], "upstream": "origin" }}"#,
                interfaces.join(", ")
            )
        })
        .collect();
    let policy = format!(
        r#"{{ "intercept": [{}],
             "upstreams": {{ "origin": {{ "original_destination": true }} }} }}"#,
        rules.join(", ")
    );
    assert_eq!(
        error_of(&policy),
        format!(
            "intercept[65].interfaces: gateway rules list 66000 (interface, rule) pairs up to \
             here, more than the kernel's limit of {MAX_INTERFACE_RULES}"
        )
    );
    // 65 537 server addresses over two upstreams.
    let servers = |base: u32, count: u32| -> String {
        (base..base + count)
            .map(|i| format!(r#""[2001:db8:5::{:x}:{:x}]:80""#, i >> 16, i & 0xffff))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let policy = format!(
        r#"{{ "intercept": [{{ "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "a" }}],
             "upstreams": {{ "a": {{ "servers": [{}] }}, "b": {{ "servers": [{}] }} }} }}"#,
        servers(0, 40_000),
        servers(40_000, 25_537)
    );
    assert_eq!(
        error_of(&policy),
        format!(
            "upstreams: 65537 server addresses, more than the kernel's limit of \
             {MAX_UPSTREAM_SERVERS}"
        )
    );
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("l4proxy-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.json");
    std::fs::write(&file, EXAMPLE.replacen("[80, ", "[70000, ", 1)).unwrap();
    let err = Policy::load(&file).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}:3:85: intercept[0].ports[0]: port must be 1-65535, got 70000",
            file.display()
        )
    );
    let missing = dir.join("missing.json");
    let err = Policy::load(&missing).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: ", missing.display())),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two rules, each `{prefixes, ports, interfaces}` as JSON fragments.
fn two_rules(first: &str, second: &str) -> String {
    format!(
        r#"{{ "intercept": [
               {{ "name": "first", {first}, "upstream": "web" }},
               {{ "name": "second", {second}, "upstream": "web" }} ],
             "upstreams": {{ "web": {{ "servers": ["203.0.113.2:80"] }} }} }}"#
    )
}

/// A gateway rule within a rule without interfaces takes nothing: the
/// other's prefixes are this host's addresses. On any port.
#[test]
fn a_gateway_rule_within_an_owned_prefix_is_refused() {
    let owned = r#""prefixes": ["192.0.2.0/24"], "ports": [80]"#;
    for gateway in [
        r#""prefixes": ["192.0.2.128/25"], "ports": [80], "interfaces": ["eth0"]"#,
        r#""prefixes": ["192.0.2.0/24"], "ports": [443], "interfaces": ["eth0"]"#,
    ] {
        let refused = error_of(&two_rules(owned, gateway));
        assert!(
            refused.starts_with("intercept[1].prefixes[0]: 192.0.2.")
                && refused.contains(
                    r#"is within 192.0.2.0/24 of intercept[0] ("first"), a rule without interfaces"#
                ),
            "{refused}"
        );
    }
    // An owned prefix within a gateway rule's is a service of this host
    // among forwarded destinations: fine.
    let wide_gateway = r#""prefixes": ["192.0.2.0/24"], "ports": [80], "interfaces": ["eth0"]"#;
    let one_service = r#""prefixes": ["192.0.2.10/32"], "ports": [80]"#;
    Policy::from_json(&two_rules(wide_gateway, one_service)).unwrap();
}

/// A gateway rule more specific than another (by prefix or by ports) takes
/// their common connections, so it must list every interface the other
/// does; listing more, or the same, is fine.
#[test]
fn a_more_specific_gateway_rule_lists_the_others_interfaces() {
    let wide = r#""prefixes": ["203.0.113.0/24"], "ports": [80], "interfaces": ["eth0"]"#;
    let refused = error_of(&two_rules(
        wide,
        r#""prefixes": ["203.0.113.0/25"], "ports": [80], "interfaces": ["eth1"]"#,
    ));
    assert_eq!(
        refused,
        r#"intercept[1].interfaces: on 203.0.113.0/25 port 80 this rule is more specific than intercept[0] ("first", 203.0.113.0/24) and takes their connections, but only on its own interfaces: those arriving on "eth0", which intercept[0] lists, would be forwarded untouched; list "eth0" here too, or keep the prefixes apart"#
    );
    // More specific by ports, on the same prefix; the narrower one first.
    let refused = error_of(&two_rules(
        r#""prefixes": ["203.0.113.0/24"], "ports": [80], "interfaces": ["eth1"]"#,
        r#""prefixes": ["203.0.113.0/24"], "ports": ["1-1024"], "interfaces": ["eth0"]"#,
    ));
    assert!(
        refused.starts_with(r#"intercept[0].interfaces: on 203.0.113.0/24 port 80 this rule is more specific than intercept[1] ("second""#),
        "{refused}"
    );
    for fine in [
        r#""prefixes": ["203.0.113.0/25"], "ports": [80], "interfaces": ["eth0", "eth1"]"#,
        r#""prefixes": ["203.0.113.0/25"], "ports": [443], "interfaces": ["eth1"]"#,
        r#""prefixes": ["198.51.100.0/24"], "ports": [80], "interfaces": ["eth1"]"#,
    ] {
        Policy::from_json(&two_rules(wide, fine)).unwrap();
    }
}
