//! Live metrics in Prometheus' text format (`--admin ADDR`, `/metrics`).
//!
//! Names follow Prometheus' conventions and HAProxy's exporter where it has
//! one: `l4proxy_rule_*`, `l4proxy_route_*`, `l4proxy_upstream_*`,
//! `l4proxy_kernel_*`, `_total` counters, `_seconds` and `_bytes` units.
//! A connection never looks a metric up by its labels: each policy put in
//! force gets its handles once ([`PolicyMetrics`]), and a connection only
//! adds to them (an atomic add).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{policy::Policy, sniff::Sniffed};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleEnd {
    rule: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleBytes {
    rule: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamBytes {
    upstream: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleSniff {
    rule: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamFailure {
    upstream: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    upstream: String,
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KernelLabel {
    counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabel {
    result: &'static str,
}

/// How a connection ended, as metrics and logs name it: a stable set.
pub const OUTCOMES: [&str; 13] = [
    "closed",
    "client_error",
    "upstream_error",
    "idle_timeout",
    "lifetime_over",
    "shut_down",
    "refused",
    "no_route",
    "client_failed",
    "connect_failed",
    "connect_timeout",
    "upstream_tls_failed",
    "limited",
];

/// What the client's first bytes were, for `l4proxy_rule_sniffed_total`.
const SNIFF_RESULTS: [&str; 4] = ["tls", "http", "other", "gave_up"];

/// Why an upstream connection failed, for
/// `l4proxy_upstream_connect_failures_total`.
/// `local`: not the server's doing (see `ConnectError::on_this_host` and
/// `Fault::ThisHost`); `tls` and `client`: TLS to the server failed for
/// the server's doing or for what the client asked for (see `Fault`).
pub const CONNECT_FAILURES: [&str; 6] = ["refused", "timeout", "local", "parent", "tls", "client"];

/// Upstream connect times: 0.5 ms to about 33 s, past the default connect
/// deadline (5 s) and a TLS handshake's after it, over several servers
/// tried in turn: a slow connect lands in a bucket, not only in `+Inf`.
fn connect_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The daemon's metrics, registered once.
pub struct Metrics {
    registry: Registry,
    /// Handed (cloned: they share their series) to each policy's rules.
    rules: RuleFamilies,
    route_connections: Family<RouteLabel, Counter>,
    upstream_connections: Family<UpstreamLabel, Counter>,
    upstream_active: Family<UpstreamLabel, Gauge>,
    upstream_failures: Family<UpstreamFailure, Counter>,
    upstream_connect: HistogramFamily<UpstreamLabel>,
    upstream_bytes: Family<UpstreamBytes, Counter>,
    kernel: Family<KernelLabel, Counter>,
    server_up: Family<ServerLabel, Gauge>,
    server_active: Family<ServerLabel, Gauge>,
    server_check_failures: Family<ServerLabel, Counter>,
    server_connect_failures: Family<ServerLabel, Counter>,
    server_downs: Family<ServerLabel, Counter>,
    limited: Family<LimitLabel, Counter>,
    /// Cumulative values read from elsewhere (the kernel's counters, the
    /// servers' health), as of the last scrape: each scrape adds what grew.
    seen: Mutex<HashMap<String, u64>>,
    reloads: Family<ReloadLabel, Counter>,
    generation: Gauge,
    loaded: Gauge<f64, std::sync::atomic::AtomicU64>,
    started: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("l4proxy");
        let metrics = Metrics {
            rules: RuleFamilies::default(),
            route_connections: Family::default(),
            upstream_connections: Family::default(),
            upstream_active: Family::default(),
            upstream_failures: Family::default(),
            upstream_connect: Family::new_with_constructor(connect_buckets),
            upstream_bytes: Family::default(),
            kernel: Family::default(),
            server_up: Family::default(),
            server_active: Family::default(),
            server_check_failures: Family::default(),
            server_connect_failures: Family::default(),
            server_downs: Family::default(),
            limited: Family::default(),
            seen: Mutex::new(HashMap::new()),
            reloads: Family::default(),
            generation: Gauge::default(),
            loaded: Gauge::default(),
            started: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "rule_connections",
            "Connections an intercept rule took",
            metrics.rules.connections.clone(),
        );
        r.register(
            "rule_active_connections",
            "Connections of an intercept rule open now",
            metrics.rules.active.clone(),
        );
        r.register(
            "rule_default_connections",
            "Connections no route matched that went to the rule's default upstream",
            metrics.rules.default.clone(),
        );
        r.register(
            "rule_closed_connections",
            "Connections of an intercept rule that ended, by outcome",
            metrics.rules.ends.clone(),
        );
        r.register_with_unit(
            "rule",
            "Bytes relayed for an intercept rule's connections, by direction",
            Unit::Bytes,
            metrics.rules.bytes.clone(),
        );
        r.register(
            "rule_sniffed",
            "Client first bytes read for routing, by what they were",
            metrics.rules.sniffed.clone(),
        );
        r.register(
            "route_connections",
            "Connections a route matched",
            metrics.route_connections.clone(),
        );
        r.register(
            "upstream_connections",
            "Connections made to an upstream",
            metrics.upstream_connections.clone(),
        );
        r.register(
            "upstream_active_connections",
            "Connections to an upstream open now",
            metrics.upstream_active.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Connections that could not connect to an upstream, by reason (where servers were tried, the last attempt's)",
            metrics.upstream_failures.clone(),
        );
        r.register_with_unit(
            "upstream_connect",
            "Time to connect to an upstream (and its parent's answer, and TLS)",
            Unit::Seconds,
            metrics.upstream_connect.clone(),
        );
        r.register_with_unit(
            "upstream",
            "Bytes relayed for an upstream's connections, by direction",
            Unit::Bytes,
            metrics.upstream_bytes.clone(),
        );
        r.register(
            "kernel",
            "The kernel programs' counters (socket look-ups, packets marked)",
            metrics.kernel.clone(),
        );
        r.register(
            "server_up",
            "Whether a server is up (1) or down (0), by its checks and observed connects",
            metrics.server_up.clone(),
        );
        r.register(
            "server_active_connections",
            "Connections to a server open now, over all policies",
            metrics.server_active.clone(),
        );
        r.register(
            "server_check_failures",
            "A server's failed health checks",
            metrics.server_check_failures.clone(),
        );
        r.register(
            "server_connect_failures",
            "Connects and TLS handshakes to a server that failed for its doing (refused, timed out, its certificate), those another server then took too",
            metrics.server_connect_failures.clone(),
        );
        r.register(
            "server_downs",
            "Times a server was marked down",
            metrics.server_downs.clone(),
        );
        r.register(
            "limited_connections",
            "Connections reset over a connection limit before a byte was read, by limit",
            metrics.limited.clone(),
        );
        r.register(
            "reloads",
            "Policy reloads, by result",
            metrics.reloads.clone(),
        );
        r.register(
            "policy_generation",
            "How many policies were put in force since the start (1: the first)",
            metrics.generation.clone(),
        );
        r.register(
            "policy_loaded_timestamp_seconds",
            "When the policy in force was put in force (Unix time)",
            metrics.loaded.clone(),
        );
        r.register(
            "start_time_seconds",
            "When the daemon started (Unix time)",
            metrics.started.clone(),
        );
        // A gauge at 1 rather than an OpenMetrics info metric: the text
        // format Prometheus' own tools check has no info type.
        let build = Family::<BuildLabel, Gauge>::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "The daemon's version", build);
        metrics.started.set(now());
        Arc::new(Metrics {
            registry,
            ..metrics
        })
    }

    /// The counters of connections refused over each limit, by its label
    /// (`connections`: `--max-connections`; `per_client`,
    /// `per_client_prefix`).
    pub fn limited<const N: usize>(&self, limits: [&'static str; N]) -> [Counter; N] {
        limits.map(|limit| self.limited.get_or_create(&LimitLabel { limit }).clone())
    }

    /// The handles for a policy's connections. Every rule's, route's and
    /// upstream's series exist from now on (at zero), so a scrape shows
    /// what can happen.
    pub fn for_policy(&self, policy: &Policy) -> PolicyMetrics {
        let rules = RuleSeries {
            names: policy.rules.iter().map(|rule| rule.name.clone()).collect(),
            cells: policy.rules.iter().map(|_| OnceLock::new()).collect(),
            families: self.rules.clone(),
        };
        if policy.rules.len() <= EAGER_RULES {
            for i in 0..policy.rules.len() {
                let _ = &rules[i];
            }
        }
        let routes = (0..policy.routes.len())
            .map(|i| {
                let route = policy.route_label(crate::policy::RouteId(i)).short();
                self.route_connections
                    .get_or_create(&RouteLabel { route })
                    .clone()
            })
            .collect();
        let upstreams = policy
            .upstreams
            .iter()
            .map(|upstream| {
                let label = || UpstreamLabel {
                    upstream: upstream.name.clone(),
                };
                let bytes = |direction| {
                    self.upstream_bytes
                        .get_or_create(&UpstreamBytes {
                            upstream: upstream.name.clone(),
                            direction,
                        })
                        .clone()
                };
                UpstreamMetrics {
                    connections: self.upstream_connections.get_or_create(&label()).clone(),
                    active: self.upstream_active.get_or_create(&label()).clone(),
                    failures: CONNECT_FAILURES.map(|reason| {
                        self.upstream_failures
                            .get_or_create(&UpstreamFailure {
                                upstream: upstream.name.clone(),
                                reason,
                            })
                            .clone()
                    }),
                    connect: self.upstream_connect.get_or_create(&label()).clone(),
                    from_client: bytes("from_client"),
                    from_upstream: bytes("from_upstream"),
                }
            })
            .collect();
        PolicyMetrics {
            rules,
            routes,
            upstreams,
        }
    }

    /// A policy was put in force (at start, or by a reload).
    pub fn in_force(&self) {
        self.generation.inc();
        self.loaded.set(now());
    }

    /// How many policies were put in force since the start.
    pub fn generation(&self) -> u64 {
        self.generation.get() as u64
    }

    /// Counts a reload.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ReloadLabel { result }).inc();
    }

    /// The text exposition, with the kernel counters and the servers'
    /// health as they are now.
    pub fn encode(&self, kernel: &[(&'static str, u64)], servers: &[ServerReading]) -> String {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // What grew since the last scrape; a count that went down started
        // again, and all of it is new. (A server's counts do not, but for
        // one forgotten beyond the 4 096 kept: one a reload forgot goes on
        // from them when it comes back.)
        let mut grown = |key: String, value: u64| {
            let before = seen.insert(key, value).unwrap_or(0);
            value.checked_sub(before).unwrap_or(value)
        };
        for &(counter, value) in kernel {
            let added = grown(format!("kernel {counter}"), value);
            self.kernel
                .get_or_create(&KernelLabel { counter })
                .inc_by(added);
        }
        // Gauges of the servers the policy in force has, as they are now: a
        // server a reload removed has none (its last values would stay).
        self.server_up.clear();
        self.server_active.clear();
        for reading in servers {
            let label = ServerLabel {
                upstream: reading.upstream.to_owned(),
                server: reading.status.address.to_string(),
            };
            let health = &reading.status.health;
            self.server_up
                .get_or_create(&label)
                .set(i64::from(health.up));
            self.server_active
                .get_or_create(&label)
                .set(health.active as i64);
            let key = |what: &str| format!("{what} {} {}", label.upstream, label.server);
            let failures = grown(key("checks"), health.failed_checks);
            self.server_check_failures
                .get_or_create(&label)
                .inc_by(failures);
            let connects = grown(key("connects"), health.failed_connects);
            self.server_connect_failures
                .get_or_create(&label)
                .inc_by(connects);
            let downs = grown(key("downs"), health.went_down);
            self.server_downs.get_or_create(&label).inc_by(downs);
        }
        drop(seen);
        let mut text = String::new();
        // Writing to a String does not fail.
        let _ = encode(&mut text, &self.registry);
        text_format(&text)
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition, which
/// is what the crate writes: Prometheus reads both, but its own tools
/// (`promtool check metrics`) and many other scrapers only the older one.
/// There a counter's family is named as its samples (`…_total`), and there
/// are no `# UNIT` lines and no `# EOF`.
fn text_format(openmetrics: &str) -> String {
    let mut counters = Vec::new();
    for line in openmetrics.lines() {
        if let Some(family) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.push(family);
        }
    }
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (family, tail) = rest.split_once(' ')?;
            counters
                .contains(&family)
                .then(|| format!("{prefix}{family}_total {tail}"))
        });
        match renamed {
            Some(line) => text.push_str(&line),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// One server's state as a scrape reads it.
pub struct ServerReading<'a> {
    pub upstream: &'a str,
    pub status: crate::upstream::ServerStatus,
}

/// One policy's handles, by rule, route and upstream index.
pub struct PolicyMetrics {
    pub rules: RuleSeries,
    pub routes: Vec<Counter>,
    pub upstreams: Vec<UpstreamMetrics>,
}

/// Policies of up to this many rules have every rule's series from the
/// start (at zero). Beyond, a rule's series appear with its first
/// connection: 22 series per rule are 2.2 million at 100 000 rules, hundreds
/// of MiB and seconds at each start and reload.
const EAGER_RULES: usize = 1000;

/// Each rule's metrics, indexed by rule, made when first used.
pub struct RuleSeries {
    names: Vec<String>,
    cells: Vec<OnceLock<RuleMetrics>>,
    families: RuleFamilies,
}

impl RuleSeries {
    /// A rule's connections open now and since the start, without making
    /// its series: those of a rule by that name under an earlier policy
    /// (a reload of a large policy makes them anew only when used), or 0.
    pub fn readings(&self, rule: usize) -> (i64, u64) {
        if let Some(made) = self.cells[rule].get() {
            return (made.active.get(), made.connections.get());
        }
        let label = RuleLabel {
            rule: self.names[rule].clone(),
        };
        let active = self.families.active.get(&label).map_or(0, |g| g.get());
        let total = self.families.connections.get(&label).map_or(0, |c| c.get());
        (active, total)
    }
}

impl std::ops::Index<usize> for RuleSeries {
    type Output = RuleMetrics;

    fn index(&self, rule: usize) -> &RuleMetrics {
        self.cells[rule].get_or_init(|| self.families.series(&self.names[rule]))
    }
}

/// The families a rule's series are in.
#[derive(Clone, Default)]
struct RuleFamilies {
    connections: Family<RuleLabel, Counter>,
    active: Family<RuleLabel, Gauge>,
    default: Family<RuleLabel, Counter>,
    ends: Family<RuleEnd, Counter>,
    bytes: Family<RuleBytes, Counter>,
    sniffed: Family<RuleSniff, Counter>,
}

impl RuleFamilies {
    fn series(&self, rule: &str) -> RuleMetrics {
        let rule_label = || RuleLabel {
            rule: rule.to_owned(),
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&RuleBytes {
                    rule: rule.to_owned(),
                    direction,
                })
                .clone()
        };
        RuleMetrics {
            connections: self.connections.get_or_create(&rule_label()).clone(),
            active: self.active.get_or_create(&rule_label()).clone(),
            default: self.default.get_or_create(&rule_label()).clone(),
            ends: OUTCOMES.map(|outcome| {
                self.ends
                    .get_or_create(&RuleEnd {
                        rule: rule.to_owned(),
                        outcome,
                    })
                    .clone()
            }),
            from_client: bytes("from_client"),
            from_upstream: bytes("from_upstream"),
            sniffed: SNIFF_RESULTS.map(|result| {
                self.sniffed
                    .get_or_create(&RuleSniff {
                        rule: rule.to_owned(),
                        result,
                    })
                    .clone()
            }),
        }
    }
}

pub struct RuleMetrics {
    pub connections: Counter,
    pub active: Gauge,
    pub default: Counter,
    ends: [Counter; OUTCOMES.len()],
    pub from_client: Counter,
    pub from_upstream: Counter,
    sniffed: [Counter; SNIFF_RESULTS.len()],
}

impl RuleMetrics {
    /// Counts a connection's end under `outcome` (one of [`OUTCOMES`]).
    pub fn ended(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.ends[i].inc();
        }
    }

    /// Counts what the client's first bytes were (`None`: the sniffer
    /// gave up).
    pub fn sniffed(&self, said: &Sniffed, gave_up: bool) {
        let i = match said {
            _ if gave_up => 3,
            Sniffed::Tls(_) => 0,
            Sniffed::Http(_) => 1,
            Sniffed::Other => 2,
        };
        self.sniffed[i].inc();
    }
}

pub struct UpstreamMetrics {
    pub connections: Counter,
    pub active: Gauge,
    failures: [Counter; CONNECT_FAILURES.len()],
    pub connect: Histogram,
    pub from_client: Counter,
    pub from_upstream: Counter,
}

impl UpstreamMetrics {
    /// Counts a failed connection under `reason` (one of
    /// [`CONNECT_FAILURES`]).
    pub fn failed(&self, reason: &str) {
        if let Some(i) = CONNECT_FAILURES.iter().position(|r| *r == reason) {
            self.failures[i].inc();
        }
    }
}

/// Holds one on a gauge of open connections while it lives.
pub struct Open(Gauge);

impl Open {
    pub fn new(gauge: &Gauge) -> Open {
        gauge.inc();
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_the_text_format() {
        let openmetrics = "# HELP l4proxy_rule_connections Connections.\n\
             # TYPE l4proxy_rule_connections counter\n\
             l4proxy_rule_connections_total{rule=\"a\"} 3\n\
             # HELP l4proxy_upstream_connect_seconds Time.\n\
             # TYPE l4proxy_upstream_connect_seconds histogram\n\
             # UNIT l4proxy_upstream_connect_seconds seconds\n\
             l4proxy_upstream_connect_seconds_count 1\n\
             # EOF\n";
        assert_eq!(
            text_format(openmetrics),
            "# HELP l4proxy_rule_connections_total Connections.\n\
             # TYPE l4proxy_rule_connections_total counter\n\
             l4proxy_rule_connections_total{rule=\"a\"} 3\n\
             # HELP l4proxy_upstream_connect_seconds Time.\n\
             # TYPE l4proxy_upstream_connect_seconds histogram\n\
             l4proxy_upstream_connect_seconds_count 1\n"
        );
    }

    #[test]
    fn every_series_of_a_policy_is_there_from_the_start() {
        let policy = Policy::from_json(
            r#"{ "intercept": [ { "name": "r", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "u" } ],
                 "upstreams": { "u": { "servers": ["203.0.113.2:80"] } } }"#,
        )
        .unwrap();
        let metrics = Metrics::new();
        let handles = metrics.for_policy(&policy);
        handles.rules[0].ended("no_route");
        let text = metrics.encode(&[("steered", 7)], &[]);
        for line in [
            "l4proxy_rule_connections_total{rule=\"r\"} 0",
            "l4proxy_rule_closed_connections_total{rule=\"r\",outcome=\"no_route\"} 1",
            "l4proxy_rule_closed_connections_total{rule=\"r\",outcome=\"closed\"} 0",
            "l4proxy_upstream_connect_failures_total{upstream=\"u\",reason=\"timeout\"} 0",
            "l4proxy_kernel_total{counter=\"steered\"} 7",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        // A connect slower than the connect deadline and a handshake's after
        // it is in a bucket of its own, not only in +Inf.
        handles.upstreams[0].connect.observe(12.0);
        let text = metrics.encode(&[], &[]);
        let bucket = "l4proxy_upstream_connect_seconds_bucket{le=\"16.384\",upstream=\"u\"} 1";
        assert!(
            text.lines().any(|l| l == bucket),
            "{bucket} not in:\n{text}"
        );
        let below = "l4proxy_upstream_connect_seconds_bucket{le=\"8.192\",upstream=\"u\"} 0";
        assert!(text.lines().any(|l| l == below), "{below} not in:\n{text}");
        // Kernel counters are cumulative: a later scrape adds what grew.
        let text = metrics.encode(&[("steered", 9)], &[]);
        assert!(
            text.contains("l4proxy_kernel_total{counter=\"steered\"} 9"),
            "{text}"
        );
    }

    #[test]
    fn server_series_follow_the_servers_in_force() {
        let metrics = Metrics::new();
        let reading = |failed_checks| ServerReading {
            upstream: "u",
            status: crate::upstream::ServerStatus {
                address: "203.0.113.2:80".parse().unwrap(),
                weight: 1,
                backup: false,
                health: crate::health::Health {
                    up: false,
                    checked: true,
                    active: 3,
                    failed_checks,
                    went_down: 1,
                    failed_connects: 4,
                },
            },
        };
        let series = r#"{upstream="u",server="203.0.113.2:80"}"#;
        let text = metrics.encode(&[], &[reading(5)]);
        for line in [
            format!("l4proxy_server_up{series} 0"),
            format!("l4proxy_server_active_connections{series} 3"),
            format!("l4proxy_server_check_failures_total{series} 5"),
            format!("l4proxy_server_connect_failures_total{series} 4"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        // A reload removed it: no gauge says it is down or busy.
        let text = metrics.encode(&[], &[]);
        assert!(!text.contains("l4proxy_server_up{"), "{text}");
        assert!(
            !text.contains("l4proxy_server_active_connections{"),
            "{text}"
        );
        // Another added it back, with a new state: its failures count on.
        let text = metrics.encode(&[], &[reading(2)]);
        let line = format!("l4proxy_server_check_failures_total{series} 7");
        assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
    }

    #[test]
    fn a_large_policys_rule_series_appear_with_first_use() {
        let prefixes: Vec<String> = (0..=EAGER_RULES)
            .map(|i| format!("10.0.{}.{}/32", i / 256, i % 256))
            .collect();
        let prefixes: Vec<[&str; 1]> = prefixes.iter().map(|p| [p.as_str()]).collect();
        let ports = [crate::policy::PortSpec::Single(80)];
        let rules: Vec<(&[&str], &[crate::policy::PortSpec])> =
            prefixes.iter().map(|p| (&p[..], &ports[..])).collect();
        let policy = Policy::of_rules(&rules);
        let metrics = Metrics::new();
        let handles = metrics.for_policy(&policy);
        let series = |text: &str| text.matches("l4proxy_rule_connections_total{").count();
        assert_eq!(handles.rules.readings(7), (0, 0));
        assert_eq!(series(&metrics.encode(&[], &[])), 0, "read, not made");
        handles.rules[7].connections.inc();
        handles.rules[7].active.inc();
        let text = metrics.encode(&[], &[]);
        assert_eq!(series(&text), 1);
        assert!(
            text.contains("l4proxy_rule_connections_total{rule=\"r7\"} 1"),
            "{text}"
        );
        // A reload: the new policy's handles read what the rule of that
        // name counted before, still without making anything.
        let reloaded = metrics.for_policy(&policy);
        assert_eq!(reloaded.rules.readings(7), (1, 1));
        assert_eq!(series(&metrics.encode(&[], &[])), 1);
    }
}
