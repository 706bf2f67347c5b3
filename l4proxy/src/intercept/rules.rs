//! Compiles a [`Policy`] into the entries of the kernel's `RULES` LPM trie.
//!
//! The kernel (`l4proxy-ebpf/src/steer.rs`) looks up (exact port, address),
//! then ([`ANY_PORT`], address), and only decides steer-or-pass; userspace
//! [`route::match_rule`] picks the rule again for each connection. So the
//! entries must cover exactly the destinations some rule matches:
//! - the trie matches the port in full, so a port range becomes one entry per
//!   port;
//! - IPv4 is keyed IPv4-mapped (one trie serves both families), so an IPv6
//!   prefix that covers `::ffff:0:0/96`, such as `::/0`, is entered as the
//!   prefixes around that range, or it would steer IPv4 connections too.

use std::{cmp::Reverse, collections::BTreeMap, net::Ipv6Addr, ops::RangeInclusive};

use ipnet::{IpNet, Ipv6Net};
use l4proxy_common::{ANY_PORT, RULE_KEY_FIXED_BITS, RuleKey, RuleValue};

use crate::{
    policy::{IPV4_MAPPED, Policy, PortSpec, RuleId},
    route::{self, Specificity},
};

/// One entry of the `RULES` trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// Key bits matched: [`RULE_KEY_FIXED_BITS`] plus the address prefix.
    pub prefix_len: u32,
    pub key: RuleKey,
    /// The rule route precedence prefers among those claiming this key.
    pub value: RuleValue,
}

/// The trie entries for `policy`, ordered by prefix length, address, port.
pub fn compile(policy: &Policy) -> Vec<KernelEntry> {
    let mut entries = Vec::new();
    for (prefix, mut claims) in claims_by_prefix(policy) {
        // Best first: of the claims on one port, the first to reach it keeps it.
        claims.sort_by_key(|claim| Reverse(claim.rank));
        let mut owners: BTreeMap<u16, RuleId> = BTreeMap::new();
        for claim in &claims {
            for port in key_ports(claim.ports) {
                owners.entry(port).or_insert(claim.rule);
            }
        }
        entries.extend(owners.into_iter().map(|(port, RuleId(rule))| KernelEntry {
            prefix_len: prefix.len,
            key: RuleKey::new(port, prefix.addr),
            // Fits: a checked policy compiles to at most MAX_RULE_ENTRIES (a u32)
            // entries, and a rule owning one has an index below that.
            value: RuleValue {
                rule_id: rule as u32,
            },
        }));
    }
    entries
}

/// `compile(policy).len()`, without expanding port ranges: the policy check
/// uses it to refuse a policy before it is expanded.
pub fn entry_count(policy: &Policy) -> usize {
    claims_by_prefix(policy)
        .values()
        .map(|claims| distinct_ports(claims))
        .sum()
}

/// An address prefix as the trie keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TriePrefix {
    len: u32,
    addr: [u8; 16],
}

/// A rule's ports under one trie prefix.
struct Claim {
    rule: RuleId,
    ports: PortSpec,
    /// Route precedence (of the rule's own prefix, not of the trie prefix it
    /// may have been split into), greater wins.
    rank: (Specificity, Reverse<usize>),
}

fn claims_by_prefix(policy: &Policy) -> BTreeMap<TriePrefix, Vec<Claim>> {
    let mut claims: BTreeMap<TriePrefix, Vec<Claim>> = BTreeMap::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        for prefix in &rule.prefixes {
            for trie_prefix in trie_prefixes(prefix) {
                let under = claims.entry(trie_prefix).or_default();
                under.extend(rule.ports.iter().map(|&ports| Claim {
                    rule: RuleId(i),
                    ports,
                    rank: (route::specificity(prefix, ports), Reverse(i)),
                }));
            }
        }
    }
    claims
}

/// The key ports a port spec takes: each port of it, or just [`ANY_PORT`].
fn key_ports(ports: PortSpec) -> RangeInclusive<u16> {
    match ports {
        PortSpec::Any => ANY_PORT..=ANY_PORT,
        PortSpec::Single(port) => port..=port,
        PortSpec::Range(first, last) => first..=last,
    }
}

/// How many distinct key ports the claims under one prefix take.
fn distinct_ports(claims: &[Claim]) -> usize {
    let mut spans: Vec<RangeInclusive<u16>> =
        claims.iter().map(|claim| key_ports(claim.ports)).collect();
    spans.sort_by_key(|span| *span.start());
    let mut count = 0;
    // First port not counted yet; spans are sorted by start, so all below it are.
    let mut next = 0u32;
    for span in spans {
        let (start, end) = (u32::from(*span.start()).max(next), u32::from(*span.end()));
        if start <= end {
            count += (end - start + 1) as usize;
            next = end + 1;
        }
    }
    count
}

fn trie_prefixes(prefix: &IpNet) -> Vec<TriePrefix> {
    match prefix {
        IpNet::V4(v4) => vec![TriePrefix {
            len: RULE_KEY_FIXED_BITS + u32::from(IPV4_MAPPED.prefix_len() + v4.prefix_len()),
            addr: RuleKey::mapped_v4(v4.network().octets()),
        }],
        IpNet::V6(v6) => outside_ipv4_mapped(*v6)
            .into_iter()
            .map(|net| TriePrefix {
                len: RULE_KEY_FIXED_BITS + u32::from(net.prefix_len()),
                addr: net.network().octets(),
            })
            .collect(),
    }
}

/// `net` less the IPv4-mapped range, as prefixes: an IPv6 rule never matches
/// an IPv4 connection.
fn outside_ipv4_mapped(net: Ipv6Net) -> Vec<Ipv6Net> {
    if IPV4_MAPPED.contains(&net) {
        return Vec::new();
    }
    if !net.contains(&IPV4_MAPPED) {
        return vec![net];
    }
    // Each step from `net` down towards the mapped range leaves one half
    // outside it: the sibling of the half that holds it.
    let mapped = u128::from(IPV4_MAPPED.network());
    (net.prefix_len()..IPV4_MAPPED.prefix_len())
        .map(|len| {
            let bit = 1u128 << (127 - len);
            let sibling = (mapped & !(u128::MAX >> len)) | (!mapped & bit);
            Ipv6Net::new_assert(Ipv6Addr::from(sibling), len + 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use PortSpec::{Any, Range, Single};

    use super::*;

    fn policy(rules: &[(&[&str], &[PortSpec])]) -> Policy {
        Policy::of_rules(rules)
    }

    fn entry(prefix_len: u32, port: u16, addr: &str, rule: u32) -> KernelEntry {
        let addr = match addr.parse().unwrap() {
            IpAddr::V4(v4) => RuleKey::mapped_v4(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        KernelEntry {
            prefix_len,
            key: RuleKey::new(port, addr),
            value: RuleValue { rule_id: rule },
        }
    }

    #[test]
    fn v4_is_keyed_mapped_with_96_more_bits() {
        let p = policy(&[(&["192.0.2.0/24", "2001:db8::/32"], &[Single(80)])]);
        assert_eq!(
            compile(&p),
            [
                entry(32 + 32, 80, "2001:db8::", 0),
                entry(32 + 96 + 24, 80, "192.0.2.0", 0)
            ]
        );
        let key = compile(&p)[1].key;
        assert_eq!(key.port, [0, 80]);
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 0]
        );
    }

    #[test]
    fn ranges_expand_and_any_is_the_wildcard_port() {
        let p = policy(&[(&["10.0.0.0/8"], &[Range(8000, 8002), Any])]);
        let ports: Vec<u16> = compile(&p)
            .iter()
            .map(|e| u16::from_be_bytes(e.key.port))
            .collect();
        assert_eq!(ports, [ANY_PORT, 8000, 8001, 8002]);
        assert_eq!(entry_count(&p), 4);
    }

    #[test]
    fn dedupe_keeps_the_rule_route_prefers() {
        let p = policy(&[
            (&["192.0.2.0/24"], &[Range(80, 82), Single(81)]),
            (&["192.0.2.0/24"], &[Single(80)]),
            (&["192.0.2.0/24"], &[Range(82, 84)]),
        ]);
        let owners: Vec<(u16, u32)> = compile(&p)
            .iter()
            .map(|e| (u16::from_be_bytes(e.key.port), e.value.rule_id))
            .collect();
        // 80: a single port beats a range; 82: equal widths, the lowest index.
        assert_eq!(owners, [(80, 1), (81, 0), (82, 0), (83, 2), (84, 2)]);
        assert_eq!(entry_count(&p), 5);
    }

    #[test]
    fn v6_default_leaves_out_the_ipv4_mapped_range() {
        let p = policy(&[(&["::/0"], &[Single(80)])]);
        let entries = compile(&p);
        assert_eq!(entries.len(), 96);
        assert_eq!(entry_count(&p), 96);
        assert!(kernel_steers(&entries, "[2001:db8::1]:80".parse().unwrap()));
        assert!(kernel_steers(&entries, "[::1]:80".parse().unwrap()));
        assert!(!kernel_steers(&entries, "192.0.2.1:80".parse().unwrap()));
    }

    /// The kernel's look-up: longest-prefix match over the whole key, exact port
    /// first, then the wildcard; only whether anything matched counts.
    fn kernel_steers(entries: &[KernelEntry], dst: SocketAddr) -> bool {
        let addr = match dst.ip().to_canonical() {
            IpAddr::V4(v4) => RuleKey::mapped_v4(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        [dst.port(), ANY_PORT].into_iter().any(|port| {
            let key = key_bytes(&RuleKey::new(port, addr));
            entries
                .iter()
                .any(|e| same_prefix(&key_bytes(&e.key), &key, e.prefix_len))
        })
    }

    fn key_bytes(key: &RuleKey) -> Vec<u8> {
        [&key.port[..], &key._pad[..], &key.addr[..]].concat()
    }

    fn same_prefix(a: &[u8], b: &[u8], bits: u32) -> bool {
        let (whole, rest) = ((bits / 8) as usize, bits % 8);
        let mask = !(0xffu8 >> rest);
        a[..whole] == b[..whole] && (rest == 0 || (a[whole] ^ b[whole]) & mask == 0)
    }

    /// Addresses around the edges of every prefix in `policy` and of the
    /// IPv4-mapped range, and a few inside; IPv4 ones also written mapped.
    fn probe_addrs(policy: &Policy) -> Vec<IpAddr> {
        let mut nets: Vec<IpNet> = policy
            .rules
            .iter()
            .flat_map(|r| r.prefixes.iter().copied())
            .collect();
        nets.extend(
            ["::ffff:0:0/96", "::/0", "0.0.0.0/0", "::/96"].map(|n| n.parse::<IpNet>().unwrap()),
        );
        let mut addrs = Vec::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for net in nets {
            let (first, last, bits) = match net {
                IpNet::V4(n) => (
                    u128::from(u32::from(n.network())),
                    u128::from(u32::from(n.broadcast())),
                    32,
                ),
                IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast()), 128),
            };
            let mut around = vec![first, last, first.wrapping_sub(1), last.wrapping_add(1)];
            for _ in 0..4 {
                // xorshift: a fixed sequence of addresses inside the prefix.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                around.push(first + (u128::from(seed) % (last - first).saturating_add(1).max(1)));
            }
            for value in around {
                if bits == 32 {
                    let v4 = std::net::Ipv4Addr::from(value as u32);
                    addrs.push(IpAddr::V4(v4));
                    addrs.push(IpAddr::V6(v4.to_ipv6_mapped()));
                } else {
                    addrs.push(IpAddr::V6(Ipv6Addr::from(value)));
                }
            }
        }
        addrs
    }

    fn probe_ports(policy: &Policy) -> Vec<u16> {
        let mut ports = vec![1, 22, 80, 443, 8080, 65535];
        for spec in policy.rules.iter().flat_map(|r| r.ports.iter()) {
            if let Single(first) | Range(first, _) = *spec {
                ports.extend([first.wrapping_sub(1), first, first.wrapping_add(1)]);
            }
            if let Range(_, last) = *spec {
                ports.extend([last.wrapping_sub(1), last, last.wrapping_add(1)]);
            }
        }
        ports.retain(|&p| p != 0);
        ports
    }

    #[test]
    fn kernel_steers_exactly_what_route_matches() {
        let checked = [
            r#"{ "intercept": [
                { "name": "web", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"],
                  "ports": [80, "8000-8099"], "upstream": "u" },
                { "name": "all-ports", "prefixes": ["192.0.2.10/32"], "ports": ["*"], "upstream": "u" } ],
               "upstreams": { "u": { "servers": ["203.0.113.2:8080", "[2001:db8:5::2]:8080"] } } }"#,
            r#"{ "intercept": [
                { "name": "a", "prefixes": ["10.0.0.0/8"], "ports": ["*"], "upstream": "u" },
                { "name": "b", "prefixes": ["10.1.0.0/16", "2001:db8::/32"], "ports": [80, 443], "upstream": "u" },
                { "name": "c", "prefixes": ["10.1.2.0/24"], "ports": ["8000-8010"], "upstream": "u" },
                { "name": "d", "prefixes": ["10.1.2.3/32", "2001:db8:1::/48"], "ports": [22, "1000-1002"], "upstream": "u" } ],
               "upstreams": { "u": { "servers": ["203.0.113.2:8080"] } } }"#,
            r#"{ "intercept": [
                { "name": "v6-web", "prefixes": ["::/0"], "ports": [80], "upstream": "u" },
                { "name": "low", "prefixes": ["::/80", "::/96"], "ports": ["*"], "upstream": "u" },
                { "name": "v4-all", "prefixes": ["0.0.0.0/0"], "ports": [8080], "upstream": "u" },
                { "name": "nat64", "prefixes": ["64:ff9b::/96"], "ports": [53], "upstream": "u" } ],
               "upstreams": { "u": { "servers": ["203.0.113.2:9"] } } }"#,
        ]
        .map(|json| Policy::from_json(json).unwrap());
        let unchecked = policy(&[
            (&["192.0.2.0/24"], &[Single(80), Range(80, 90)]),
            (&["192.0.2.0/24"], &[Single(80)]),
            (&["192.0.2.128/25", "::/1"], &[Any]),
        ]);
        for policy in checked.iter().chain([&unchecked]) {
            let entries = compile(policy);
            assert_eq!(entry_count(policy), entries.len());
            for ip in probe_addrs(policy) {
                for port in probe_ports(policy) {
                    let dst = SocketAddr::new(ip, port);
                    assert_eq!(
                        kernel_steers(&entries, dst),
                        route::match_rule(policy, dst).is_some(),
                        "{dst} in {policy:?}"
                    );
                }
            }
        }
    }
}
