//! Policy files: the JSON an operator writes, checked into the [`Policy`] the
//! daemon runs. `docs/policy.md` is the operator's reference; this is the
//! summary.
//!
//! # Format
//!
//! ```json
//! {
//!   "intercept": [
//!     { "name": "https", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"],
//!       "ports": [443], "upstream": "fallback" },
//!     { "name": "http", "prefixes": ["192.0.2.0/24"], "ports": [80, "8000-8099"] }
//!   ],
//!   "routes": [
//!     { "name": "api", "match": { "sni": ["api.example.com", "*.api.example.com"] },
//!       "upstream": "api" },
//!     { "match": { "intercept": ["https"], "no_sni": true }, "reject": true },
//!     { "match": { "host": ["www.example.com"] }, "upstream": "web" }
//!   ],
//!   "upstreams": {
//!     "api": { "servers": ["203.0.113.2:8443"] },
//!     "web": { "servers": ["203.0.113.3:8080", "[2001:db8:5::3]:8080"] },
//!     "fallback": { "servers": ["203.0.113.4:443"] }
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
//!   - `upstream` (optional): the name of an entry of `upstreams`, where the
//!     rule's connections go when no route matches.
//!   - `interfaces` (optional): gateway interception; only forwarded
//!     connections arriving on these interfaces are taken, and the prefixes
//!     are not made local.
//!   - `accept_proxy_protocol` (optional): `{ "from": [prefixes] }`, front
//!     proxies whose connections start with a PROXY header.
//! - `routes` (optional): tried in order, the first that matches wins; see
//!   [`Route`] and [`crate::route`]. A route's `bind` overrides its
//!   upstream's.
//! - `upstreams`: upstream name (non-empty, unique) → `{ "servers": [...] }`
//!   (at least one `ip:port` or `[ipv6]:port`) or
//!   `{ "original_destination": true }`, an optional `bind`: `"proxy"`
//!   (default), `"client-ip"`, `"client"` or an IP address, and an optional
//!   `proxy_protocol`: `"v1"` or `"v2"`. A pool's server may be an object,
//!   `{ "address": ..., "weight": 1-256, "backup": true }`; `balance`,
//!   `retries`, `health` and `observe` say how connections are spread over
//!   the servers and how a server that is down is found (see [`Balancing`]).
//!
//! Unknown fields are refused everywhere. A destination that several rules
//! match goes to the most specific one (see [`crate::route`]); two rules that
//! would tie are refused, as is an upstream server the policy itself would
//! intercept on this host (the proxy's own connection would loop back into
//! it), and an original-destination upstream for a rule that is not a
//! gateway rule (for the same reason). What is
//! legal but almost certainly a mistake, such as a route no connection can
//! reach, is reported by [`Policy::warnings`].
//!
//! Every object may carry a `"comment"` string, which is skipped; durations
//! are seconds or strings with a unit (`"30s"`, see [`duration`]).
//!
//! Checking has two passes: serde reads the text into the `raw` types, checking
//! each value that stands alone (names, prefixes, ports, servers, name
//! patterns, a route's conditions among themselves) as it goes, so those
//! errors carry the JSON path and line:column; then `check` resolves names and
//! runs the checks across fields, whose errors carry the path only. The
//! first pass reads each rule, route and upstream on its own (see `parse`),
//! so that [`Policy::from_json_all`] can report the errors of all of them.

mod balance;
mod check;
mod connect;
pub mod duration;
mod enclosing;
pub(crate) mod file;
mod htpasswd;
mod limits;
mod name;
mod parent;
mod parse;
mod raw;
mod tls;
mod tls_checks;
mod warnings;

use std::{
    fmt, fs,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv6Net};
use thiserror::Error;

/// A multicast or the broadcast address: no TCP connection is made to or
/// from one.
pub fn no_tcp_to(ip: std::net::IpAddr) -> bool {
    ip.is_multicast() || ip == std::net::IpAddr::V4(std::net::Ipv4Addr::BROADCAST)
}

pub use balance::{Balance, Balancing, HealthCheck, Observe, ServerOptions};
pub use check::BindTarget;
pub use connect::ConnectFront;
pub use htpasswd::Htpasswd;
pub use limits::{ClientLimits, Keepalive, PrefixLimit, Timeouts};
pub use name::NamePattern;
pub use parent::Parent;
pub use tls::{ClientCertificates, Originate, Terminate, TlsVersion};

/// Index of an intercept rule in `Policy::rules`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub usize);

/// Index of a route in `Policy::routes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(pub usize);

/// Index of an upstream in `Policy::upstreams`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(pub usize);

/// Which destination ports a rule intercepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// The rule's default route (HAProxy's `default_backend`): where its
    /// connections go when no route matches. Without one they get the
    /// no-route treatment.
    pub upstream: Option<UpstreamId>,
    /// Gateway interception: the interfaces on which forwarded connections to
    /// the rule's destinations are taken. Empty: the destinations are made
    /// local to this host instead, and taken however they arrive.
    pub interfaces: Vec<String>,
    /// Front proxies whose connections start with a PROXY protocol header
    /// (v1 or v2), by source prefix. Empty: no header is read from anyone.
    pub accept_proxy_from: Vec<IpNet>,
    /// What it leaves out comes from the daemon's flags.
    pub timeouts: Timeouts,
    /// `None`: the daemon's `--tcp-keepalive`.
    pub keepalive: Option<Keepalive>,
    pub limits: ClientLimits,
    /// An explicit front end: clients connect to its listeners and name
    /// their destination with CONNECT. Such a rule has no prefixes, ports
    /// or interfaces: the kernel steers nothing to it.
    pub connect: Option<ConnectFront>,
    /// Terminate the client's TLS before anything else is read: a CONNECT
    /// client's head comes over it, and routes match on its server name,
    /// negotiated ALPN and the decrypted stream.
    pub terminate: Option<Terminate>,
}

impl InterceptRule {
    /// Whether the rule intercepts forwarded traffic on its interfaces (and
    /// its destinations stay where they are) rather than owning its prefixes.
    pub fn is_gateway(&self) -> bool {
        !self.interfaces.is_empty()
    }

    /// Whether a connection from `peer` must start with a PROXY header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.accept_proxy_from
            .iter()
            .any(|prefix| prefix.contains(&peer))
    }
}

/// Where connections go that match all of `conditions`, judged by addresses
/// and by what the client sends first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// As written; messages call an unnamed route `routes[i]`.
    pub name: Option<String>,
    pub conditions: Conditions,
    pub action: Action,
    /// Overrides the upstream's `bind` for the connections this route sends.
    pub bind: Option<Bind>,
    /// Override the rule's, field by field.
    pub timeouts: Timeouts,
    /// Terminate the client's TLS once this route is chosen by its
    /// ClientHello.
    pub terminate: Option<Terminate>,
}

impl Route {
    /// Whether some connection `rule` steers might match this route, judged
    /// by the conditions on the rule and the destination. Overestimates (it
    /// ignores that a more specific rule may take part of `rule`'s
    /// destinations), so a `false` is certain.
    pub fn may_apply(&self, id: RuleId, rule: &InterceptRule) -> bool {
        let when = &self.conditions;
        // A CONNECT client may ask for any destination, and so may a front
        // proxy announce one for a rule without interfaces (on a gateway
        // rule, it must be one the rule takes).
        let explicit = rule.connect.is_some();
        let any_destination =
            explicit || (!rule.accept_proxy_from.is_empty() && !rule.is_gateway());
        when.intercept
            .as_ref()
            .is_none_or(|rules| rules.contains(&id))
            && (explicit || when.target.is_none())
            && (any_destination
                || when.destination.as_ref().is_none_or(|prefixes| {
                    prefixes
                        .iter()
                        .any(|p| rule.prefixes.iter().any(|q| overlap(p, q)))
                }))
            && (any_destination
                || when.ports.as_ref().is_none_or(|ports| {
                    ports
                        .iter()
                        .any(|&p| rule.ports.iter().any(|&q| p.intersection(q).is_some()))
                }))
    }
}

/// Whether two prefixes share an address (one holds the other).
fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Upstream(UpstreamId),
    /// Refuse the connection (the same treatment as no route).
    Reject,
}

/// A route's `match`: every condition given must hold; `None` is "not
/// given", which holds for every connection. A list holds when any of its
/// elements does; lists are never empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    /// The intercept rule that steered the connection.
    pub intercept: Option<Vec<RuleId>>,
    /// Prefixes containing the original destination address; checked as for
    /// intercept rules.
    pub destination: Option<Vec<IpNet>>,
    /// The original destination port.
    pub ports: Option<Vec<PortSpec>>,
    /// Prefixes containing the client's address.
    pub source: Option<Vec<IpNet>>,
    /// Patterns for the name a CONNECT client asked for; a connection
    /// without one (steered, or a CONNECT to an address) never matches.
    pub target: Option<Vec<NamePattern>>,
    /// Conditions on the client's first bytes; the only ones that need them.
    pub hello: Option<HelloConditions>,
}

/// What the client's first bytes must be. Built so that conditions that could
/// never hold together (`host` with `sni`, `sni` with `no_sni`) cannot be
/// written down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelloConditions {
    /// A TLS ClientHello (`protocol: "tls"`, or implied by `sni`, `no_sni`,
    /// `alpn`).
    Tls {
        sni: SniCondition,
        /// Holds when the ClientHello offers any of these (exact bytes).
        alpn: Option<Vec<String>>,
    },
    /// An HTTP/1.x request head (`protocol: "http"`, or implied by `host`).
    Http {
        /// Patterns for the Host header; a request without one never matches.
        host: Option<Vec<NamePattern>>,
    },
    /// Neither, including when sniffing gave up (`protocol: "other"`).
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SniCondition {
    /// Any ClientHello, with or without SNI.
    Any,
    /// An SNI that one of these patterns matches.
    Names(Vec<NamePattern>),
    /// No SNI at all (`no_sni: true`).
    Absent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub target: Target,
    /// The source address of connections to it, unless a route overrides it.
    pub bind: Bind,
    /// The PROXY protocol header sent before the client's bytes, if any.
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// Reach it over TLS (after the PROXY header, if any).
    pub tls: Option<Originate>,
    /// How its servers share connections and how their health is known.
    pub balancing: Balancing,
}

impl Upstream {
    /// The servers of a pool; none for the original destination.
    pub fn servers(&self) -> &[SocketAddr] {
        match &self.target {
            Target::Servers(servers) | Target::Parent(Parent { servers, .. }) => servers,
            Target::OriginalDestination => &[],
        }
    }

    /// Where the `k`-th of [`Upstream::servers`] is written in the policy.
    pub fn server_path(&self, k: usize) -> String {
        match &self.target {
            Target::Parent(_) => format!("upstreams.{}.parent.servers[{k}]", self.name),
            _ => format!("upstreams.{}.servers[{k}]", self.name),
        }
    }
}

/// Where an upstream's connections go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A pool: at least one server, shared as its `balancing` says.
    Servers(Vec<SocketAddr>),
    /// The address and port the client connected to (Traffic Server's
    /// `tr-pass`), for gateway and CONNECT rules only.
    OriginalDestination,
    /// Parent CONNECT proxies, asked to connect to the connection's
    /// destination: the name the client gave (CONNECT, SNI, Host), else
    /// its original destination.
    Parent(Parent),
}

/// The source address of the proxy's connection to an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    /// The proxy's own address, chosen by the kernel.
    Proxy,
    /// The client's IP address, any port (HAProxy `usesrc clientip`).
    ClientIp,
    /// The client's IP address and port (HAProxy `usesrc client`).
    Client,
    /// This address, any port.
    Address(IpAddr),
}

impl Bind {
    /// Whether connections are made from the client's address, which needs
    /// `IP_TRANSPARENT` and replies steered back to this host.
    pub fn is_client(self) -> bool {
        matches!(self, Bind::ClientIp | Bind::Client)
    }
}

/// As written in a policy: `proxy`, `client-ip`, `client` or the address.
impl fmt::Display for Bind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bind::Proxy => f.write_str("proxy"),
            Bind::ClientIp => f.write_str("client-ip"),
            Bind::Client => f.write_str("client"),
            Bind::Address(addr) => addr.fmt(f),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<InterceptRule>,
    /// In the order written: the first that matches wins.
    pub routes: Vec<Route>,
    /// Sorted by name.
    pub upstreams: Vec<Upstream>,
}

/// How messages name a route: `routes[1] ("api")`, or `routes[1]` when it has
/// no name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteLabel<'p> {
    pub id: RouteId,
    pub name: Option<&'p str>,
}

impl RouteLabel<'_> {
    /// The route's name, or `routes[i]` when it has none: how logs,
    /// metrics and `status` name it.
    pub fn short(&self) -> String {
        match self.name {
            Some(name) => name.to_owned(),
            None => format!("routes[{}]", self.id.0),
        }
    }
}

impl fmt::Display for RouteLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "routes[{}]", self.id.0)?;
        match self.name {
            Some(name) => write!(f, " ({name:?})"),
            None => Ok(()),
        }
    }
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

/// Every error a policy was refused for, in the order of the text; never
/// none. One per line, each as [`PolicyError`] shows it.
#[derive(Debug)]
pub struct PolicyErrors(Vec<PolicyError>);

impl PolicyErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false (a refusal has a reason); beside `len`, as clippy asks.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first, for callers that show one (the daemon's start and reload).
    pub fn into_first(self) -> PolicyError {
        self.0
            .into_iter()
            .next()
            .expect("a refused policy has at least one error")
    }

    fn in_file(self, file: &Path) -> Self {
        PolicyErrors(self.0.into_iter().map(|e| e.in_file(file)).collect())
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

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

    /// serde_json's `error` in reading a part of the text whose first byte
    /// is at `origin` (line, and bytes before it on its line; `(1, 0)` for
    /// the whole text), placed in the whole text.
    fn json(error: serde_json::Error, path: Option<String>, origin: (usize, usize)) -> Self {
        let (line, col) = (error.line(), error.column());
        let message = error.to_string();
        // serde_json appends the position; it goes in front instead. And
        // it names a plain number field by its Rust type.
        let mut reason = message
            .strip_suffix(&format!(" at line {line} column {col}"))
            .unwrap_or(&message)
            .to_owned();
        for (rust, max) in [
            ("u8", u64::from(u8::MAX)),
            ("u16", u64::from(u16::MAX)),
            ("u32", u64::from(u32::MAX)),
            ("u64", u64::MAX),
        ] {
            if let Some(said) = reason.strip_suffix(&format!(", expected {rust}")) {
                reason = format!("{said}, expected a whole number from 0 to {max}");
            }
        }
        // Line 0: serde_json knows no place. Columns count bytes, from the
        // part's first byte on its first line; column 0 means "before the
        // first character".
        let line_column = (line != 0).then(|| {
            let (first_line, first_col) = origin;
            let col = if line == 1 { first_col + col } else { col };
            (first_line + line - 1, col.max(1))
        });
        PolicyError::Invalid {
            at: Location {
                file: None,
                line_column,
                path,
            },
            reason,
        }
    }

    /// Where in the text, if known: what errors are sorted by.
    fn line_column(&self) -> Option<(usize, usize)> {
        match self {
            PolicyError::Invalid { at, .. } => at.line_column,
            PolicyError::Read { .. } => None,
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
    /// The policy in `text`, or the first error [`Policy::from_json_all`]
    /// finds.
    pub fn from_json(text: &str) -> Result<Policy, PolicyError> {
        Policy::from_json_all(text).map_err(PolicyErrors::into_first)
    }

    /// The policy in `text`, or the errors found: a syntax error or an
    /// error in the top level alone; else the first error of each rule,
    /// route and upstream; else, once those all read, the first error of
    /// the checks across them.
    pub fn from_json_all(text: &str) -> Result<Policy, PolicyErrors> {
        let raw = parse::read(text).map_err(PolicyErrors)?;
        check::check(raw).map_err(|err| PolicyErrors(vec![err]))
    }

    pub fn load(file: &Path) -> Result<Policy, PolicyError> {
        Policy::load_all(file).map_err(PolicyErrors::into_first)
    }

    /// [`Policy::from_json_all`] on a file's text, the errors naming the
    /// file.
    pub fn load_all(file: &Path) -> Result<Policy, PolicyErrors> {
        let text = fs::read_to_string(file).map_err(|error| {
            PolicyErrors(vec![PolicyError::Read {
                file: file.to_owned(),
                error,
            }])
        })?;
        Policy::from_json_all(&text).map_err(|errors| errors.in_file(file))
    }

    /// How many addresses CONNECT rules listen on.
    pub fn connect_addresses(&self) -> usize {
        self.rules
            .iter()
            .filter_map(|rule| rule.connect.as_ref())
            .map(|c| c.listen.len())
            .sum()
    }

    /// The CONNECT rule listening on `addr`.
    pub fn connect_rule(&self, addr: SocketAddr) -> Option<RuleId> {
        self.rules
            .iter()
            .position(|rule| {
                rule.connect
                    .as_ref()
                    .is_some_and(|c| c.listen.contains(&addr))
            })
            .map(RuleId)
    }

    pub fn route_label(&self, id: RouteId) -> RouteLabel<'_> {
        RouteLabel {
            id,
            name: self.routes[id.0].name.as_deref(),
        }
    }
}

#[cfg(test)]
impl Policy {
    /// A policy built by hand, unchecked, for tests of the matchers: rules given
    /// as (prefixes, ports), all to one upstream, and no routes.
    pub(crate) fn of_rules(rules: &[(&[&str], &[PortSpec])]) -> Policy {
        Policy {
            rules: rules
                .iter()
                .enumerate()
                .map(|(i, (prefixes, ports))| InterceptRule {
                    name: format!("r{i}"),
                    prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
                    ports: ports.to_vec(),
                    upstream: Some(UpstreamId(0)),
                    interfaces: Vec::new(),
                    accept_proxy_from: Vec::new(),
                    timeouts: Timeouts::default(),
                    keepalive: None,
                    limits: ClientLimits::default(),
                    connect: None,
                    terminate: None,
                })
                .collect(),
            routes: Vec::new(),
            upstreams: vec![Upstream {
                name: "u".to_owned(),
                target: Target::Servers(vec!["198.51.100.1:80".parse().unwrap()]),
                bind: Bind::Proxy,
                proxy_protocol: None,
                tls: None,
                balancing: Balancing::default(),
            }],
        }
    }
}

#[cfg(test)]
mod tests;
