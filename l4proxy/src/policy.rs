//! Policy files: the JSON an operator writes, checked into the [`Policy`] the
//! daemon runs.
//!
//! # Format
//!
//! ```json
//! {
//!   "intercept": [
//!     { "name": "web", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"],
//!       "ports": [80, "8000-8099"], "upstream": "web-servers" },
//!     { "name": "all-ports", "prefixes": ["192.0.2.10/32"], "ports": ["*"], "upstream": "web-servers" }
//!   ],
//!   "upstreams": {
//!     "web-servers": { "servers": ["203.0.113.2:8080", "[2001:db8:5::2]:8080"] }
//!   }
//! }
//! ```
//!
//! - `intercept`: at least one rule; a rule's index in this list is its
//!   [`RuleId`].
//!   - `name`: non-empty, unique among rules.
//!   - `prefixes`: at least one CIDR prefix (`192.0.2.0/24`, `2001:db8::/32`),
//!     without host bits, never IPv4-mapped IPv6 (write the IPv4 form).
//!   - `ports`: at least one of: a port number 1-65535, a range `"N-M"` with
//!     N < M, or `"*"` for any port.
//!   - `upstream`: the name of an entry of `upstreams`.
//! - `upstreams`: upstream name (non-empty, unique) → `{ "servers": [...] }`,
//!   at least one `ip:port` or `[ipv6]:port` each.
//!
//! Unknown fields are refused everywhere. A destination that several rules
//! match goes to the most specific one (see [`crate::route`]); two rules that
//! would tie are refused, as is an upstream server the policy itself would
//! intercept (the proxy's own connection would loop back into it).
//!
//! Checking has two passes: serde reads the text into the `raw` types, checking
//! each value that stands alone (names, prefixes, ports, servers) as it goes,
//! so those errors carry the JSON path and line:column; then [`check`] resolves
//! names and runs the checks across fields, whose errors carry the path only.

use std::{
    collections::HashMap,
    fmt, fs,
    net::{Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv6Net};
use l4proxy_common::MAX_RULE_ENTRIES;
use thiserror::Error;

use crate::{intercept::rules, route};

/// Index of an intercept rule in `Policy::rules`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub usize);

/// Index of an upstream in `Policy::upstreams`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(pub usize);

/// Which destination ports a rule intercepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortSpec {
    Any,
    /// A port 1-65535.
    Single(u16),
    /// Inclusive range, `1 <= first < last`.
    Range(u16, u16),
}

impl PortSpec {
    pub fn contains(self, port: u16) -> bool {
        match self {
            PortSpec::Any => true,
            PortSpec::Single(p) => p == port,
            PortSpec::Range(first, last) => (first..=last).contains(&port),
        }
    }

    /// How many ports it covers: the fewer, the more specific.
    pub fn width(self) -> u32 {
        match self {
            PortSpec::Any => 1 << 16,
            PortSpec::Single(_) => 1,
            PortSpec::Range(first, last) => u32::from(last - first) + 1,
        }
    }

    /// The ports both cover, if any.
    pub fn intersection(self, other: PortSpec) -> Option<PortSpec> {
        match (self, other) {
            (PortSpec::Any, spec) | (spec, PortSpec::Any) => Some(spec),
            (PortSpec::Single(p), spec) | (spec, PortSpec::Single(p)) => {
                spec.contains(p).then_some(PortSpec::Single(p))
            }
            (PortSpec::Range(a1, b1), PortSpec::Range(a2, b2)) => {
                let (first, last) = (a1.max(a2), b1.min(b2));
                match first.cmp(&last) {
                    std::cmp::Ordering::Less => Some(PortSpec::Range(first, last)),
                    std::cmp::Ordering::Equal => Some(PortSpec::Single(first)),
                    std::cmp::Ordering::Greater => None,
                }
            }
        }
    }
}

/// Reads as in a sentence: "any port", "port 80", "ports 8000-8099".
impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Any => f.write_str("any port"),
            PortSpec::Single(p) => write!(f, "port {p}"),
            PortSpec::Range(first, last) => write!(f, "ports {first}-{last}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterceptRule {
    pub name: String,
    /// Canonical (no host bits set), never IPv4-mapped IPv6.
    pub prefixes: Vec<IpNet>,
    pub ports: Vec<PortSpec>,
    pub upstream: UpstreamId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// At least one server.
    pub servers: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<InterceptRule>,
    /// Sorted by name.
    pub upstreams: Vec<Upstream>,
}

/// `::ffff:0:0/96`: IPv4 addresses written as IPv6. The kernel keys IPv4 rules
/// there, so a policy names them in their IPv4 form only.
pub(crate) const IPV4_MAPPED: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96);

#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("{}: {error}", file.display())]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("{at}{reason}")]
    Invalid { at: Location, reason: String },
}

/// Where in a policy an error is; each part is shown when known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    pub file: Option<PathBuf>,
    /// 1-based line and column, known for errors found while parsing.
    pub line_column: Option<(usize, usize)>,
    /// JSON path such as `intercept[0].ports[1]`.
    pub path: Option<String>,
}

/// The message prefix: `file:line:col: path: `.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line_column) {
            (Some(file), Some((line, col))) => write!(f, "{}:{line}:{col}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some((line, col))) => write!(f, "{line}:{col}: ")?,
            (None, None) => {}
        }
        match &self.path {
            Some(path) => write!(f, "{path}: "),
            None => Ok(()),
        }
    }
}

impl PolicyError {
    /// An error found after parsing, at a JSON path.
    fn at(path: impl Into<String>, reason: impl Into<String>) -> Self {
        PolicyError::Invalid {
            at: Location {
                path: Some(path.into()),
                ..Location::default()
            },
            reason: reason.into(),
        }
    }

    fn json(error: serde_json::Error, path: Option<String>) -> Self {
        let (line, col) = (error.line(), error.column());
        let message = error.to_string();
        // serde_json appends the position; it goes in front instead. Column 0
        // means "before the first character" there.
        let reason = message
            .strip_suffix(&format!(" at line {line} column {col}"))
            .unwrap_or(&message)
            .to_owned();
        PolicyError::Invalid {
            at: Location {
                file: None,
                line_column: (line != 0).then_some((line, col.max(1))),
                path,
            },
            reason,
        }
    }

    fn in_file(self, file: &Path) -> Self {
        match self {
            PolicyError::Invalid { mut at, reason } => {
                at.file = Some(file.to_owned());
                PolicyError::Invalid { at, reason }
            }
            read @ PolicyError::Read { .. } => read,
        }
    }
}

impl Policy {
    pub fn from_json(text: &str) -> Result<Policy, PolicyError> {
        if text.trim().is_empty() {
            return Err(PolicyError::Invalid {
                at: Location::default(),
                reason:
                    "policy is empty; expected a JSON object with \"intercept\" and \"upstreams\""
                        .to_owned(),
            });
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let raw::Object(raw) = serde_path_to_error::deserialize(&mut de).map_err(|err| {
            let path = err
                .path()
                .iter()
                .next()
                .is_some()
                .then(|| err.path().to_string());
            PolicyError::json(err.into_inner(), path)
        })?;
        de.end().map_err(|err| PolicyError::json(err, None))?;
        check(raw)
    }

    pub fn load(file: &Path) -> Result<Policy, PolicyError> {
        let text = fs::read_to_string(file).map_err(|error| PolicyError::Read {
            file: file.to_owned(),
            error,
        })?;
        Policy::from_json(&text).map_err(|err| err.in_file(file))
    }
}

/// Raw → checked: resolves upstream names, then runs the checks that span
/// several fields.
fn check(raw: raw::Policy) -> Result<Policy, PolicyError> {
    // BTreeMap order: upstreams sorted by name, so they can be found by binary search.
    let upstreams: Vec<Upstream> = raw
        .upstreams
        .into_iter()
        .map(|(name, raw::Object(upstream))| Upstream {
            name,
            servers: upstream.servers.into_iter().map(|s| s.0).collect(),
        })
        .collect();

    let mut rules = Vec::with_capacity(raw.intercept.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, raw::Object(rule)) in raw.intercept.into_iter().enumerate() {
        if let Some(first) = names.insert(rule.name.0.clone(), i) {
            return Err(PolicyError::at(
                format!("intercept[{i}].name"),
                format!(
                    "duplicate rule name {:?} (also intercept[{first}])",
                    rule.name.0
                ),
            ));
        }
        let upstream = upstreams
            .binary_search_by(|u| u.name.as_str().cmp(&rule.upstream))
            .map_err(|_| {
                let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                let known = if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                };
                PolicyError::at(
                    format!("intercept[{i}].upstream"),
                    format!("no upstream named {:?}; known: {known}", rule.upstream),
                )
            })?;
        rules.push(InterceptRule {
            name: rule.name.0,
            prefixes: rule.prefixes.into_iter().map(|p| p.0).collect(),
            ports: rule.ports.into_iter().map(|p| p.0).collect(),
            upstream: UpstreamId(upstream),
        });
    }

    let policy = Policy { rules, upstreams };
    check_overlaps(&policy)?;
    check_size(&policy)?;
    check_loops(&policy)?;
    Ok(policy)
}

/// Two rules that match the same destination with equal precedence would leave
/// the choice to their order in the file; make the operator say which wins.
fn check_overlaps(policy: &Policy) -> Result<(), PolicyError> {
    let mut claims: HashMap<IpNet, Vec<(usize, PortSpec)>> = HashMap::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        for prefix in &rule.prefixes {
            let earlier = claims.entry(*prefix).or_default();
            for &ports in &rule.ports {
                let precedence = route::specificity(prefix, ports);
                let tie = earlier.iter().find_map(|&(j, other)| {
                    let overlap = ports.intersection(other)?;
                    (j != i && route::specificity(prefix, other) == precedence)
                        .then_some((j, overlap))
                });
                if let Some((j, overlap)) = tie {
                    return Err(PolicyError::at(
                        format!("intercept[{i}]"),
                        format!(
                            "overlaps intercept[{j}] ({:?}) on {prefix} {overlap} with equal precedence",
                            policy.rules[j].name
                        ),
                    ));
                }
                earlier.push((i, ports));
            }
        }
    }
    Ok(())
}

/// The proxy's own connection to an intercepted address would be steered back
/// into the proxy.
fn check_loops(policy: &Policy) -> Result<(), PolicyError> {
    for upstream in &policy.upstreams {
        for (k, &server) in upstream.servers.iter().enumerate() {
            if let Some(RuleId(r)) = route::match_rule(policy, server) {
                return Err(PolicyError::at(
                    format!("upstreams.{}.servers[{k}]", upstream.name),
                    format!(
                        "{server} is intercepted by rule {:?} (intercept[{r}]); connecting to it would loop back into the proxy",
                        policy.rules[r].name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The kernel's rule map has a fixed size; port ranges take one entry per port.
fn check_size(policy: &Policy) -> Result<(), PolicyError> {
    let count = rules::entry_count(policy);
    if count > MAX_RULE_ENTRIES as usize {
        return Err(PolicyError::at(
            "intercept",
            format!(
                "compiles to {count} kernel entries, more than the limit of {MAX_RULE_ENTRIES} \
                 (each port of a range takes one entry per prefix)"
            ),
        ));
    }
    Ok(())
}

/// The file as written. Each type checks what it can alone while serde reads
/// it, so those errors carry the JSON path and line:column.
mod raw {
    use std::{collections::BTreeMap, fmt, net::SocketAddr};

    use ipnet::IpNet;
    use serde::{
        Deserialize, Deserializer,
        de::{self, Error as _, MapAccess, Visitor},
        forward_to_deserialize_any,
    };

    use super::{IPV4_MAPPED, PortSpec};

    /// A struct read from a JSON object only: serde_json would also take an
    /// array of the field values, which no one means to write in a policy.
    pub(super) struct Object<T>(pub T);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            T::deserialize(ObjectOnly(deserializer)).map(Object)
        }
    }

    struct ObjectOnly<D>(D);

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
        type Error = D::Error;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_any(visitor)
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_map(visitor)
        }

        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }

    #[derive(Deserialize)]
    #[serde(
        deny_unknown_fields,
        expecting = "a policy object with \"intercept\" and \"upstreams\""
    )]
    pub(super) struct Policy {
        #[serde(deserialize_with = "non_empty")]
        pub intercept: Vec<Object<Rule>>,
        #[serde(deserialize_with = "unique_upstreams")]
        pub upstreams: BTreeMap<String, Object<Upstream>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Rule {
        pub name: Name,
        #[serde(deserialize_with = "non_empty")]
        pub prefixes: Vec<Prefix>,
        #[serde(deserialize_with = "non_empty")]
        pub ports: Vec<Port>,
        pub upstream: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Upstream {
        #[serde(deserialize_with = "non_empty")]
        pub servers: Vec<Server>,
    }

    #[derive(Deserialize)]
    #[serde(try_from = "String")]
    pub(super) struct Name(pub String);

    impl TryFrom<String> for Name {
        type Error = &'static str;
        fn try_from(name: String) -> Result<Self, Self::Error> {
            if name.is_empty() {
                return Err("name must not be empty");
            }
            Ok(Name(name))
        }
    }

    #[derive(Deserialize)]
    #[serde(try_from = "String")]
    pub(super) struct Prefix(pub IpNet);

    impl TryFrom<String> for Prefix {
        type Error = String;
        fn try_from(text: String) -> Result<Self, Self::Error> {
            let net: IpNet = text.parse().map_err(|_| {
                format!("expected an address prefix like 192.0.2.0/24, got {text:?}")
            })?;
            if net.trunc() != net {
                return Err(format!("host bits set; did you mean {}?", net.trunc()));
            }
            if let IpNet::V6(v6) = net
                && IPV4_MAPPED.contains(&v6)
                && let Some(v4) = v6.network().to_ipv4_mapped()
            {
                return Err(format!(
                    "IPv4-mapped IPv6 prefix; use the IPv4 form {v4}/{}",
                    v6.prefix_len() - IPV4_MAPPED.prefix_len()
                ));
            }
            Ok(Prefix(net))
        }
    }

    #[derive(Deserialize)]
    #[serde(try_from = "String")]
    pub(super) struct Server(pub SocketAddr);

    impl TryFrom<String> for Server {
        type Error = String;
        fn try_from(text: String) -> Result<Self, Self::Error> {
            let addr: SocketAddr = text.parse().map_err(|_| {
                format!("expected a server address like 203.0.113.2:8080 or [2001:db8::2]:8080, got {text:?}")
            })?;
            if addr.port() == 0 {
                return Err("port must be 1-65535, got 0".to_owned());
            }
            if let SocketAddr::V6(v6) = addr
                && let Some(v4) = v6.ip().to_ipv4_mapped()
            {
                return Err(format!(
                    "IPv4-mapped IPv6 address; use the IPv4 form {v4}:{}",
                    addr.port()
                ));
            }
            Ok(Server(addr))
        }
    }

    /// A number, `"N-M"` or `"*"`.
    pub(super) struct Port(pub PortSpec);

    impl<'de> Deserialize<'de> for Port {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(PortVisitor).map(Port)
        }
    }

    struct PortVisitor;

    impl Visitor<'_> for PortVisitor {
        type Value = PortSpec;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a port number, a \"N-M\" range or \"*\"")
        }

        fn visit_u64<E: de::Error>(self, port: u64) -> Result<PortSpec, E> {
            port_number(port).map(PortSpec::Single).map_err(E::custom)
        }

        fn visit_i64<E: de::Error>(self, port: i64) -> Result<PortSpec, E> {
            match u64::try_from(port) {
                Ok(port) => self.visit_u64(port),
                Err(_) => Err(E::custom(format!("port must be 1-65535, got {port}"))),
            }
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<PortSpec, E> {
            if text == "*" {
                return Ok(PortSpec::Any);
            }
            let not_a_port = || {
                E::custom(format!(
                    "expected a port number, a \"N-M\" range or \"*\", got {text:?}"
                ))
            };
            let (first, last) = text.split_once('-').ok_or_else(not_a_port)?;
            let first: u64 = first.parse().map_err(|_| not_a_port())?;
            let last: u64 = last.parse().map_err(|_| not_a_port())?;
            let (first, last) = (
                port_number(first).map_err(E::custom)?,
                port_number(last).map_err(E::custom)?,
            );
            if first >= last {
                return Err(E::custom(format!(
                    "a port range must be \"N-M\" with N < M, got {text:?}"
                )));
            }
            Ok(PortSpec::Range(first, last))
        }
    }

    fn port_number(port: u64) -> Result<u16, String> {
        match u16::try_from(port) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(format!("port must be 1-65535, got {port}")),
        }
    }

    fn non_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let items = Vec::<T>::deserialize(deserializer)?;
        if items.is_empty() {
            return Err(D::Error::custom("must not be empty"));
        }
        Ok(items)
    }

    /// Like a map, but a repeated name is an error rather than the last one winning.
    fn unique_upstreams<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Object<Upstream>>, D::Error> {
        struct Upstreams;

        impl<'de> Visitor<'de> for Upstreams {
            type Value = BTreeMap<String, Object<Upstream>>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping upstream names to upstreams")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut upstreams = BTreeMap::new();
                while let Some(Name(name)) = map.next_key()? {
                    if upstreams.contains_key(&name) {
                        return Err(A::Error::custom(format!(
                            "duplicate upstream name {name:?}"
                        )));
                    }
                    let upstream = map.next_value()?;
                    upstreams.insert(name, upstream);
                }
                Ok(upstreams)
            }
        }

        deserializer.deserialize_map(Upstreams)
    }
}

#[cfg(test)]
impl Policy {
    /// A policy built by hand, unchecked, for tests of the matchers: rules given
    /// as (prefixes, ports), all to one upstream.
    pub(crate) fn of_rules(rules: &[(&[&str], &[PortSpec])]) -> Policy {
        Policy {
            rules: rules
                .iter()
                .enumerate()
                .map(|(i, (prefixes, ports))| InterceptRule {
                    name: format!("r{i}"),
                    prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
                    ports: ports.to_vec(),
                    upstream: UpstreamId(0),
                })
                .collect(),
            upstreams: vec![Upstream {
                name: "u".to_owned(),
                servers: vec!["198.51.100.1:80".parse().unwrap()],
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(EXAMPLE.contains(from), "{from:?} is not in the example");
        error_of(&EXAMPLE.replacen(from, to, 1))
    }

    fn error_of(json: &str) -> String {
        match Policy::from_json(json) {
            Ok(policy) => panic!("accepted: {policy:?}"),
            Err(err) => err.to_string(),
        }
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
                        upstream: UpstreamId(0),
                    },
                    InterceptRule {
                        name: "all-ports".to_owned(),
                        prefixes: vec!["192.0.2.10/32".parse().unwrap()],
                        ports: vec![PortSpec::Any],
                        upstream: UpstreamId(0),
                    },
                ],
                upstreams: vec![Upstream {
                    name: "web-servers".to_owned(),
                    servers: vec![
                        "203.0.113.2:8080".parse().unwrap(),
                        "[2001:db8:5::2]:8080".parse().unwrap()
                    ],
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
        assert_eq!(policy.rules[0].upstream, UpstreamId(1));
        assert_eq!(policy.rules[1].upstream, UpstreamId(2));
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
        for bad in [r#""http""#, r#""80""#, "80.5", "-1", "null"] {
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
            error_with(r#"[80, "8000-8099"]"#, "[]")
                .contains("intercept[0].ports: must not be empty")
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
            err.contains(r#"upstreams.web-servers.servers[0]: expected a server address like 203.0.113.2:8080"#),
            "{err}"
        );
        let err = error_with("203.0.113.2:8080", "203.0.113.2:0");
        assert!(
            err.ends_with("upstreams.web-servers.servers[0]: port must be 1-65535, got 0"),
            "{err}"
        );
        let err = error_with("203.0.113.2:8080", "[::ffff:203.0.113.2]:8080");
        assert!(
            err.ends_with(
                "servers[0]: IPv4-mapped IPv6 address; use the IPv4 form 203.0.113.2:8080"
            ),
            "{err}"
        );
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
        let prefixes =
            r#"["10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16", "10.4.0.0/16"]"#;
        let err = error_with(
            r#"["192.0.2.10/32"], "ports": ["*"]"#,
            &format!(r#"{prefixes}, "ports": ["1-65535"]"#),
        );
        assert_eq!(
            err,
            format!(
                "intercept: compiles to {} kernel entries, more than the limit of {MAX_RULE_ENTRIES} \
                 (each port of a range takes one entry per prefix)",
                5 * 65535 + 2 * 101
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
}
