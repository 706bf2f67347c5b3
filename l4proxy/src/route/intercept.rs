//! Which intercept rule a connection belongs to, by its destination alone.
//!
//! Precedence, most specific first: the longest prefix containing the
//! destination address; then the narrowest port spec containing its port (a
//! single port, then ranges from narrow to wide, then `*`); then the lowest rule
//! index. The policy check refuses two rules that tie on both (equal prefix,
//! overlapping ports of equal width), so the index only keeps the answer
//! deterministic for policies built by hand.

use std::{cmp::Reverse, net::SocketAddr};

use ipnet::IpNet;

use crate::policy::{Policy, PortSpec, RuleId};

/// How specifically one (prefix, ports) pair of a rule matches; greater wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    prefix_len: u8,
    port_width: Reverse<u32>,
}

impl Specificity {
    pub fn prefix_len(self) -> u8 {
        self.prefix_len
    }

    /// How many ports the spec covers (1 to 65536).
    pub fn port_width(self) -> u32 {
        self.port_width.0
    }
}

pub fn specificity(prefix: &IpNet, ports: PortSpec) -> Specificity {
    Specificity {
        prefix_len: prefix.prefix_len(),
        port_width: Reverse(ports.width()),
    }
}

/// The rule a connection to `dst` belongs to, if any.
pub fn match_rule(policy: &Policy, dst: SocketAddr) -> Option<RuleId> {
    // An IPv4 client of a dual-stack socket shows up as ::ffff:a.b.c.d; rules
    // name it in its IPv4 form.
    let ip = dst.ip().to_canonical();
    // A plain scan, the reference: the policy check and `explain` use it, and
    // the daemon's per-connection look-up (`intercept::rules::RuleIndex`, a
    // few hash probes at any policy size) is tested against it.
    let mut best = None;
    for (i, rule) in policy.rules.iter().enumerate() {
        for prefix in rule.prefixes.iter().filter(|prefix| prefix.contains(&ip)) {
            for &ports in rule.ports.iter().filter(|ports| ports.contains(dst.port())) {
                best = best.max(Some((specificity(prefix, ports), Reverse(i))));
            }
        }
    }
    best.map(|(_, Reverse(i))| RuleId(i))
}

#[cfg(test)]
mod tests {
    use PortSpec::{Any, Range, Single};

    use super::*;

    fn policy(rules: &[(&[&str], &[PortSpec])]) -> Policy {
        Policy::of_rules(rules)
    }

    fn rule_for(policy: &Policy, dst: &str) -> Option<usize> {
        match_rule(policy, dst.parse().unwrap()).map(|RuleId(i)| i)
    }

    #[test]
    fn longest_prefix_beats_port_exactness() {
        let p = policy(&[
            (&["192.0.2.0/24"], &[Single(80)]),
            (&["192.0.2.0/25"], &[Any]),
        ]);
        assert_eq!(rule_for(&p, "192.0.2.1:80"), Some(1));
        assert_eq!(rule_for(&p, "192.0.2.200:80"), Some(0));
    }

    #[test]
    fn exact_port_beats_range_beats_any() {
        let p = policy(&[
            (&["192.0.2.0/24"], &[Any]),
            (&["192.0.2.0/24"], &[Range(80, 90)]),
            (&["192.0.2.0/24"], &[Single(80)]),
        ]);
        assert_eq!(rule_for(&p, "192.0.2.1:80"), Some(2));
        assert_eq!(rule_for(&p, "192.0.2.1:85"), Some(1));
        assert_eq!(rule_for(&p, "192.0.2.1:443"), Some(0));
    }

    #[test]
    fn narrower_range_wins() {
        let p = policy(&[
            (&["2001:db8::/32"], &[Range(1, 65535)]),
            (&["2001:db8::/32"], &[Range(8000, 8099)]),
            (&["2001:db8::/32"], &[Range(8050, 8059)]),
        ]);
        assert_eq!(rule_for(&p, "[2001:db8::1]:8055"), Some(2));
        assert_eq!(rule_for(&p, "[2001:db8::1]:8000"), Some(1));
        assert_eq!(rule_for(&p, "[2001:db8::1]:22"), Some(0));
    }

    #[test]
    fn best_spec_within_one_rule_counts() {
        // Rule 0's exact port beats rule 1's range although rule 0 also has `*`.
        let p = policy(&[
            (&["192.0.2.0/24"], &[Any, Single(80)]),
            (&["192.0.2.0/24"], &[Range(80, 81)]),
        ]);
        assert_eq!(rule_for(&p, "192.0.2.1:80"), Some(0));
        assert_eq!(rule_for(&p, "192.0.2.1:81"), Some(1));
    }

    #[test]
    fn families_do_not_mix() {
        let p = policy(&[(&["0.0.0.0/0"], &[Any]), (&["::/0"], &[Any])]);
        assert_eq!(rule_for(&p, "192.0.2.1:80"), Some(0));
        assert_eq!(rule_for(&p, "[2001:db8::1]:80"), Some(1));
    }

    #[test]
    fn mapped_v4_destination_matches_as_v4() {
        let p = policy(&[(&["192.0.2.0/24"], &[Single(80)]), (&["::/0"], &[Any])]);
        assert_eq!(rule_for(&p, "[::ffff:192.0.2.7]:80"), Some(0));
        assert_eq!(rule_for(&p, "[::ffff:198.51.100.7]:80"), None);
    }

    #[test]
    fn no_match() {
        let p = policy(&[(&["192.0.2.0/24"], &[Single(80), Range(8000, 8099)])]);
        assert_eq!(rule_for(&p, "192.0.2.1:81"), None);
        assert_eq!(rule_for(&p, "192.0.3.1:80"), None);
        assert_eq!(rule_for(&p, "[2001:db8::1]:80"), None);
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        // Refused by the policy check; still deterministic.
        let p = policy(&[
            (&["192.0.2.0/24"], &[Single(80)]),
            (&["192.0.2.0/24"], &[Single(80)]),
        ]);
        assert_eq!(rule_for(&p, "192.0.2.1:80"), Some(0));
    }
}
