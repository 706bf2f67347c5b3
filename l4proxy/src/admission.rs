//! Admission: whether a new connection may have a slot. The daemon's global
//! maximum (`--max-connections`) is checked at accept; a client's own limits
//! (`--max-connections-per-client`, and a rule's `limits` per address and per
//! prefix) once the rule, and a trusted front proxy's client, are known.
//!
//! A connection over a limit is reset at once, before a byte is read: a
//! client that is refused should know it now, not after a timeout, and must
//! not wait in the accept queue. The ones it already has are not touched.
//! Refusals are counted (`l4proxy_limited_connections_total`, and in the
//! shutdown summary) and logged at most once a second per kind, with how
//! many were not logged in between: a flood must not turn into a flood of
//! log lines.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use ipnet::IpNet;

use prometheus_client::metrics::counter::Counter;

use crate::{
    logging::Throttle,
    metrics::Metrics,
    policy::{ClientLimits, InterceptRule},
    relay,
};

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-connections`.
    Global,
    /// `--max-connections-per-client`, or a rule's `per_client`.
    Client,
    /// A rule's `per_client_prefix`.
    ClientPrefix,
}

impl Refusal {
    const ALL: [Refusal; 3] = [Refusal::Global, Refusal::Client, Refusal::ClientPrefix];

    fn as_str(self) -> &'static str {
        match self {
            Refusal::Global => "connection limit",
            Refusal::Client => "per-client connection limit",
            Refusal::ClientPrefix => "per-client-prefix connection limit",
        }
    }

    /// The `limit` label of `l4proxy_limited_connections_total`.
    fn label(self) -> &'static str {
        match self {
            Refusal::Global => "connections",
            Refusal::Client => "per_client",
            Refusal::ClientPrefix => "per_client_prefix",
        }
    }
}

/// What one kind of refusal has counted, and its log lines' pace.
struct Tally {
    total: Counter,
    log: Throttle,
}

/// At most one log line a second per kind of refusal.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Counts of the connections each client holds, by the limits in force.
pub struct Admission {
    per_client: Option<u32>,
    held: Mutex<HashMap<Key, u32>>,
    tallies: [Tally; 3],
}

/// What a count is kept for. Rules are told apart by their name's hash, so
/// counts carry over a reload that keeps the rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    Client(IpAddr),
    RuleClient(u64, IpAddr),
    RulePrefix(u64, IpNet),
}

/// A connection's place under the limits; given back when dropped. Small:
/// every open connection's task holds it.
pub struct Slot {
    admission: Arc<Admission>,
    keys: Box<[Key]>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.admission.held();
        for key in &self.keys {
            if let Some(count) = held.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    held.remove(key);
                }
            }
        }
    }
}

impl Admission {
    /// `per_client`: `--max-connections-per-client`, over all rules.
    pub fn new(per_client: Option<u32>, metrics: &Metrics) -> Arc<Admission> {
        let totals = metrics.limited(Refusal::ALL.map(Refusal::label));
        Arc::new(Admission {
            per_client,
            held: Mutex::new(HashMap::new()),
            tallies: totals.map(|total| Tally {
                total,
                log: Throttle::new(LOG_EVERY),
            }),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Key, u32>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a slot for a connection of `rule` from `client`, or says which
    /// limit it is over. `None` when no per-client limit is in force: then
    /// nothing is counted at all.
    pub fn admit(
        self: &Arc<Self>,
        rule: &InterceptRule,
        client: IpAddr,
    ) -> Result<Option<Slot>, Refusal> {
        let limits = &rule.limits;
        if self.per_client.is_none() && limits.is_none() {
            return Ok(None);
        }
        let client = client.to_canonical();
        let wanted = self.keys(rule, limits, client);
        let mut held = self.held();
        for (key, max, refusal) in wanted.iter().flatten() {
            if held.get(key).is_some_and(|count| count >= max) {
                return Err(*refusal);
            }
        }
        for (key, _, _) in wanted.iter().flatten() {
            *held.entry(*key).or_insert(0) += 1;
        }
        Ok(Some(Slot {
            admission: self.clone(),
            keys: wanted.iter().flatten().map(|&(key, _, _)| key).collect(),
        }))
    }

    /// The counts a connection takes, with their limits.
    fn keys(
        &self,
        rule: &InterceptRule,
        limits: &ClientLimits,
        client: IpAddr,
    ) -> [Option<(Key, u32, Refusal)>; 3] {
        let rule_id = || {
            let mut hasher = DefaultHasher::new();
            rule.name.hash(&mut hasher);
            hasher.finish()
        };
        [
            self.per_client
                .map(|max| (Key::Client(client), max, Refusal::Client)),
            limits
                .per_client
                .map(|max| (Key::RuleClient(rule_id(), client), max, Refusal::Client)),
            limits.per_client_prefix.map(|limit| {
                let len = if client.is_ipv4() {
                    limit.ipv4
                } else {
                    limit.ipv6
                };
                let prefix = IpNet::new_assert(client, len).trunc();
                (
                    Key::RulePrefix(rule_id(), prefix),
                    limit.max,
                    Refusal::ClientPrefix,
                )
            }),
        ]
    }

    /// Resets a connection over a limit, counts it, and logs it unless a
    /// line for this kind went out less than a second ago.
    pub fn refuse(&self, stream: &tokio::net::TcpStream, client: SocketAddr, refusal: Refusal) {
        relay::reset_on_close(stream);
        let tally = &self.tallies[refusal as usize];
        tally.total.inc();
        let Some(refused) = tally.log.event() else {
            return;
        };
        tracing::warn!(
            %client,
            refused,
            limit = refusal.as_str(),
            "over a connection limit: reset (refused counts this one and those not logged since the last such line)"
        );
    }

    /// `limit=count` for each kind of refusal, for the shutdown summary:
    /// named as the metric's `limit` label names them.
    pub fn summary(&self) -> String {
        Refusal::ALL
            .iter()
            .map(|&r| {
                let count = self.tallies[r as usize].total.get();
                format!("{}={count}", r.label())
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PrefixLimit, Timeouts};

    fn rule(name: &str, limits: ClientLimits) -> InterceptRule {
        InterceptRule {
            name: name.to_owned(),
            prefixes: vec!["192.0.2.0/24".parse().unwrap()],
            ports: vec![crate::policy::PortSpec::Single(80)],
            upstream: None,
            interfaces: vec![],
            accept_proxy_from: vec![],
            timeouts: Timeouts::default(),
            keepalive: None,
            limits,
            connect: None,
            terminate: None,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn without_limits_nothing_is_counted() {
        let admission = Admission::new(None, &Metrics::new());
        let slot = admission
            .admit(&rule("r", ClientLimits::default()), ip("198.51.100.2"))
            .unwrap();
        assert!(slot.is_none());
        assert!(admission.held().is_empty());
    }

    #[tokio::test]
    async fn the_summary_names_the_limits_as_the_metric_does() {
        let admission = Admission::new(None, &Metrics::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let peer = client.local_addr().unwrap();
        admission.refuse(&client, peer, Refusal::ClientPrefix);
        admission.refuse(&client, peer, Refusal::ClientPrefix);
        assert_eq!(
            admission.summary(),
            "connections=0 per_client=0 per_client_prefix=2"
        );
    }

    #[test]
    fn a_client_over_its_limit_is_refused_and_others_are_not() {
        let admission = Admission::new(None, &Metrics::new());
        let web = rule(
            "web",
            ClientLimits {
                per_client: Some(2),
                per_client_prefix: None,
            },
        );
        let first = admission.admit(&web, ip("198.51.100.2")).unwrap();
        let second = admission.admit(&web, ip("198.51.100.2")).unwrap();
        assert_eq!(
            admission.admit(&web, ip("198.51.100.2")).err(),
            Some(Refusal::Client)
        );
        // IPv4-mapped is the same client.
        assert_eq!(
            admission.admit(&web, ip("::ffff:198.51.100.2")).err(),
            Some(Refusal::Client)
        );
        assert!(admission.admit(&web, ip("198.51.100.3")).unwrap().is_some());
        // Another rule counts on its own.
        let other = rule(
            "other",
            ClientLimits {
                per_client: Some(1),
                per_client_prefix: None,
            },
        );
        assert!(
            admission
                .admit(&other, ip("198.51.100.2"))
                .unwrap()
                .is_some()
        );
        drop(first);
        assert!(admission.admit(&web, ip("198.51.100.2")).unwrap().is_some());
        drop(second);
    }

    #[test]
    fn a_prefix_counts_all_its_addresses_and_slots_are_given_back() {
        let admission = Admission::new(None, &Metrics::new());
        let web = rule(
            "web",
            ClientLimits {
                per_client: None,
                per_client_prefix: Some(PrefixLimit {
                    ipv4: 24,
                    ipv6: 64,
                    max: 2,
                }),
            },
        );
        let a = admission.admit(&web, ip("2001:db8:c::1")).unwrap();
        let b = admission.admit(&web, ip("2001:db8:c::2:3")).unwrap();
        assert_eq!(
            admission.admit(&web, ip("2001:db8:c::99")).err(),
            Some(Refusal::ClientPrefix)
        );
        assert!(
            admission
                .admit(&web, ip("2001:db8:d::1"))
                .unwrap()
                .is_some()
        );
        drop((a, b));
        assert!(admission.held().is_empty(), "{:?}", admission.held());
    }

    #[test]
    fn the_global_per_client_limit_spans_rules() {
        let admission = Admission::new(Some(1), &Metrics::new());
        let held = admission
            .admit(&rule("a", ClientLimits::default()), ip("198.51.100.2"))
            .unwrap();
        assert!(held.is_some());
        assert_eq!(
            admission
                .admit(&rule("b", ClientLimits::default()), ip("198.51.100.2"))
                .err(),
            Some(Refusal::Client)
        );
    }
}
