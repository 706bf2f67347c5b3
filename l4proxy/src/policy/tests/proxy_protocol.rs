//! `accept_proxy_protocol` on rules and `proxy_protocol` on upstreams.

use crate::{policy::*, proxy_protocol::Version};

const EXAMPLE: &str = r#"{
  "intercept": [
    { "name": "front", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "v1",
      "accept_proxy_protocol": { "from": ["198.51.100.0/24", "2001:db8:c::/64"] } },
    { "name": "plain", "prefixes": ["192.0.2.20/32"], "ports": [80], "upstream": "v2" }
  ],
  "upstreams": {
    "v1": { "servers": ["203.0.113.2:8080"], "proxy_protocol": "v1" },
    "v2": { "servers": ["203.0.113.2:8081"], "proxy_protocol": "v2" },
    "none": { "servers": ["203.0.113.2:8082"] }
  }
}"#;

fn error_with(from: &str, to: &str) -> String {
    super::error_in(EXAMPLE, from, to)
}

#[test]
fn example_is_valid() {
    let policy = Policy::from_json(EXAMPLE).unwrap();
    assert_eq!(
        policy.rules[0].accept_proxy_from,
        [
            "198.51.100.0/24".parse().unwrap(),
            "2001:db8:c::/64".parse().unwrap()
        ] as [ipnet::IpNet; 2]
    );
    assert_eq!(policy.rules[1].accept_proxy_from, []);
    let version = |name: &str| {
        policy
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .unwrap()
            .proxy_protocol
    };
    assert_eq!(version("v1"), Some(Version::V1));
    assert_eq!(version("v2"), Some(Version::V2));
    assert_eq!(version("none"), None);
}

#[test]
fn trust_is_by_prefix_and_sees_through_mapped_addresses() {
    let policy = Policy::from_json(EXAMPLE).unwrap();
    let front = &policy.rules[0];
    for (peer, trusted) in [
        ("198.51.100.7", true),
        ("::ffff:198.51.100.7", true),
        ("2001:db8:c::9", true),
        ("198.51.101.7", false),
        ("2001:db8:d::9", false),
    ] {
        assert_eq!(front.trusts(peer.parse().unwrap()), trusted, "{peer}");
    }
    assert!(!policy.rules[1].trusts("198.51.100.7".parse().unwrap()));
}

#[test]
fn bad_values_name_their_place() {
    assert!(
        error_with(r#""proxy_protocol": "v1""#, r#""proxy_protocol": "v3""#)
            .ends_with("upstreams.v1.proxy_protocol: unknown variant `v3`, expected `v1` or `v2`")
    );
    let err = error_with(
        r#"{ "from": ["198.51.100.0/24", "2001:db8:c::/64"] }"#,
        r#"{ "from": [] }"#,
    );
    assert!(
        err.ends_with("intercept[0].accept_proxy_protocol.from: must not be empty"),
        "{err}"
    );
    let err = error_with(r#""198.51.100.0/24", "2001"#, r#""198.51.100.1/24", "2001"#);
    assert!(
        err.ends_with("intercept[0].accept_proxy_protocol.from[0]: host bits set; did you mean 198.51.100.0/24?"),
        "{err}"
    );
    let err = error_with(r#"{ "from": ["#, r#"{ "versions": [1], "from": ["#);
    assert!(
        err.contains("intercept[0].accept_proxy_protocol.versions: unknown field `versions`"),
        "{err}"
    );
    let err = error_with(
        r#"{ "from": ["198.51.100.0/24", "2001:db8:c::/64"] }"#,
        r#"["198.51.100.0/24", "2001:db8:c::/64"]"#,
    );
    assert!(
        err.contains("intercept[0].accept_proxy_protocol: invalid type: sequence"),
        "{err}"
    );
}

#[test]
fn a_route_to_the_original_destination_cannot_take_what_a_front_proxy_announces() {
    // The route's destination lies outside the rule's prefix, but a front
    // proxy may announce any destination for a rule without interfaces:
    // the upstream would connect wherever the header says.
    let policy = r#"{
      "intercept": [
        { "name": "front", "prefixes": ["192.0.2.10/32"], "ports": [443], "upstream": "web",
          "accept_proxy_protocol": { "from": ["198.51.100.0/24"] } }
      ],
      "routes": [ { "match": { "destination": ["10.0.0.0/8"], "ports": [22] }, "upstream": "orig" } ],
      "upstreams": {
        "web": { "servers": ["203.0.113.2:8443"] },
        "orig": { "original_destination": true }
      }
    }"#;
    assert_eq!(
        super::error_of(policy),
        "routes[0].upstream: upstream \"orig\" sends connections to their original destination, \
         but rule \"front\" (intercept[0]) has no \"interfaces\": its destinations are what its \
         front proxies announce, which may be anything; limit the route to gateway rules with \
         \"intercept\""
    );
}
