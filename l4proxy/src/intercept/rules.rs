//! Compiles a [`Policy`] into the entries of the kernel's `RULES` LPM trie.
//!
//! The kernel (`l4proxy-ebpf`) looks up (the port's class, address) and
//! ([`ANY_PORT_CLASS`], address), each in the class half the port is in
//! (`CLASS_HALF`, see `Interceptor::set_rules`), and keeps the entry of
//! higher rank; it must
//! find the rule [`route::match_rule`] picks, because whether a gateway rule
//! takes a packet depends on which rule it is. So:
//! - the trie is keyed by port class ([`PortClasses`]): ports the same specs
//!   cover share an entry, so a port range is one entry per prefix;
//! - IPv4 is keyed IPv4-mapped (one trie serves both families), so an IPv6
//!   prefix that covers `::ffff:0:0/96`, such as `::/0`, is entered as the
//!   prefixes around that range, or it would steer IPv4 connections too;
//! - the entry for (class, trie prefix P) holds the best rule among all those
//!   whose own prefix contains P, not only those entered at P: a piece of a
//!   split `::/0` is longer than a `::/80` rule that contains it, yet the
//!   `::/80` rule is the more specific one.
//!
//! Ranks order as route precedence does: longer prefix, then narrower port
//! spec, then lower rule index. The class entries never hold a `*` claim: the
//! wildcard look-up finds the best of those itself.
//!
//! [`RuleIndex`] is the same look-up in userspace, over the same entries: the
//! daemon finds each connection's rule in a few hash probes, however many
//! rules there are. [`route::match_rule`], a plain scan, stays the reference
//! both are tested against.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use foldhash::HashMap;
use ipnet::IpNet;
use l4proxy_common::{
    ANY_PORT_CLASS, ClassKey, RULE_KEY_FIXED_BITS, RULE_ON_INTERFACES, RuleKey, RuleValue,
};

use super::port_classes::PortClasses;
use crate::{
    lpm::{self, Lpm},
    policy::{IPV4_MAPPED, Policy, PortSpec, RuleId},
    route::{self, Specificity},
};

/// One entry of the `RULES` trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// Key bits matched: [`RULE_KEY_FIXED_BITS`] plus the address prefix.
    pub prefix_len: u32,
    pub key: ClassKey,
    /// The rule route precedence prefers for this key.
    pub value: RuleValue,
}

/// What the kernel needs of a policy's rules: the port classes and the
/// trie entries keyed by them.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub classes: PortClasses,
    /// Ordered by prefix length, address, class.
    pub entries: Vec<KernelEntry>,
}

/// The kernel's rules for `policy`.
pub fn compile(policy: &Policy) -> Compiled {
    let classes = PortClasses::of(policy);
    let claims = claims(policy);
    let by_prefix = by_original_prefix(&claims);
    let lengths = prefix_lengths(&by_prefix);
    let mut keys = KeyClasses::new(&classes);
    let mut entries = Vec::new();
    for (trie_prefix, at) in by_trie_prefix(&claims) {
        // Best first: every claim whose own prefix contains this piece.
        let mut containing: Vec<&Claim> = ancestors(trie_prefix.net, &lengths)
            .filter_map(|net| by_prefix.get(&net))
            .flatten()
            .map(|&i| &claims[i])
            .collect();
        containing.sort_by_key(|claim| Reverse(claim.rank));
        for class in keys.union(at.iter().map(|&i| claims[i].ports)) {
            let best = containing
                .iter()
                .find(|claim| covers_key(&classes, claim.ports, class))
                .expect("a claim at this prefix covers each of its key classes");
            entries.push(KernelEntry {
                prefix_len: trie_prefix.len,
                key: ClassKey::new(class, trie_prefix.addr),
                value: RuleValue {
                    // Fits: a checked policy compiles to at most
                    // MAX_RULE_ENTRIES (a u32) entries, and a rule owning one
                    // has an index below that.
                    rule_id: best.rule.0 as u32,
                    flags: if policy.rules[best.rule.0].is_gateway() {
                        RULE_ON_INTERFACES
                    } else {
                        0
                    },
                    rank: best.rank_value(),
                },
            });
        }
    }
    Compiled { classes, entries }
}

/// Rules that steer nothing: no entry of `compiled` holds them, so every
/// destination and port they name goes to a rule that wins over them (a
/// more specific prefix, or the same prefix with narrower port specs).
/// Conservative: a rule taken from by several more specific ones together
/// still holds the entry of its own prefix, and is not named. One message
/// per rule, starting with its JSON path (as `Policy::warnings`).
pub fn unreachable(policy: &Policy, compiled: &Compiled) -> Vec<String> {
    let mut reached = vec![false; policy.rules.len()];
    for entry in &compiled.entries {
        reached[entry.value.rule_id as usize] = true;
    }
    policy
        .rules
        .iter()
        .enumerate()
        .filter(|&(i, rule)| !reached[i] && rule.connect.is_none())
        .map(|(i, rule)| {
            format!(
                "intercept[{i}]: never matches: rules that win over rule {:?} (a more specific prefix, or narrower ports) take every destination and port it names",
                rule.name
            )
        })
        .collect()
}

/// Everything `l4proxy check` warns of: [`Policy::warnings`] and the
/// rules that never match ([`unreachable`]).
pub fn warnings(policy: &Policy) -> Vec<String> {
    let mut warnings = policy.warnings();
    warnings.extend(unreachable(policy, &compile(policy)));
    warnings
}

/// The rule of a destination, found as the kernel finds it.
pub struct RuleIndex {
    classes: PortClasses,
    by_class: HashMap<u32, Lpm<RuleValue>>,
}

impl RuleIndex {
    pub fn new(compiled: &Compiled) -> Self {
        let mut by_class: HashMap<u32, Lpm<RuleValue>> = HashMap::default();
        for entry in &compiled.entries {
            let len = entry.prefix_len - RULE_KEY_FIXED_BITS;
            by_class
                .entry(u32::from_be_bytes(entry.key.class))
                .or_default()
                .insert(
                    u128::from_be_bytes(entry.key.addr),
                    u8::try_from(len).expect("an address prefix is at most 128 bits"),
                    entry.value,
                );
        }
        Self {
            classes: compiled.classes.clone(),
            by_class,
        }
    }

    /// The rule a connection to `dst` belongs to: the better-ranked of the
    /// longest matches for its port's class and for any port, the port's
    /// class's on a tie (as the kernel's `rule_for` decides).
    pub fn lookup(&self, dst: SocketAddr) -> Option<RuleId> {
        let addr = lpm::key(dst.ip());
        [self.classes.of_port(dst.port()), ANY_PORT_CLASS]
            .iter()
            .filter_map(|class| self.by_class.get(class)?.longest(addr))
            .reduce(|exact, wildcard| {
                if wildcard.rank > exact.rank {
                    wildcard
                } else {
                    exact
                }
            })
            .map(|value| RuleId(value.rule_id as usize))
    }
}

/// `compile(policy).entries.len()`, without ranking the claims: the policy
/// check refuses a policy the map cannot hold before it is compiled.
pub fn entry_count(policy: &Policy) -> usize {
    let classes = PortClasses::of(policy);
    let claims = claims(policy);
    let mut keys = KeyClasses::new(&classes);
    by_trie_prefix(&claims)
        .values()
        .map(|at| keys.union(at.iter().map(|&i| claims[i].ports)).len())
        .sum()
}

/// The key classes of port specs, each spec's worked out once (a policy
/// repeats a few specs over many prefixes).
struct KeyClasses<'c> {
    classes: &'c PortClasses,
    of_spec: HashMap<PortSpec, Vec<u32>>,
}

impl<'c> KeyClasses<'c> {
    fn new(classes: &'c PortClasses) -> Self {
        Self {
            classes,
            of_spec: HashMap::default(),
        }
    }

    /// The key classes some claims at one trie piece take: the classes
    /// their ports cover, and [`ANY_PORT_CLASS`] for a `*`.
    fn union(&mut self, specs: impl Iterator<Item = PortSpec>) -> BTreeSet<u32> {
        let mut union = BTreeSet::new();
        for spec in specs {
            let classes = self.classes;
            let of = self.of_spec.entry(spec).or_insert_with(|| match spec {
                PortSpec::Any => vec![ANY_PORT_CLASS],
                _ => classes.covered_by(spec),
            });
            union.extend(of.iter().copied());
        }
        union
    }
}

/// An address prefix as the trie keys it, and as written in its own family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TriePrefix {
    len: u32,
    addr: [u8; 16],
    net: IpNet,
}

/// One (prefix, ports) pair of a rule, under one trie piece of that prefix.
struct Claim {
    rule: RuleId,
    /// The rule's own prefix (a trie piece may be longer).
    prefix: IpNet,
    piece: TriePrefix,
    ports: PortSpec,
    /// Route precedence of the rule's own prefix and ports, greater wins.
    rank: (Specificity, Reverse<usize>),
}

impl Claim {
    /// `rank` as one number the kernel compares: prefix length, then port
    /// width (narrower is greater), then rule index (lower is greater).
    fn rank_value(&self) -> u64 {
        let (specificity, Reverse(index)) = self.rank;
        let narrowness = u64::from((1u32 << 16) - specificity.port_width());
        (u64::from(specificity.prefix_len()) << 56)
            | (narrowness << 32)
            | u64::from(u32::MAX - u32::try_from(index).unwrap_or(u32::MAX))
    }
}

fn claims(policy: &Policy) -> Vec<Claim> {
    let mut claims = Vec::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        for prefix in &rule.prefixes {
            for piece in trie_prefixes(prefix) {
                claims.extend(rule.ports.iter().map(|&ports| Claim {
                    rule: RuleId(i),
                    prefix: *prefix,
                    piece,
                    ports,
                    rank: (route::specificity(prefix, ports), Reverse(i)),
                }));
            }
        }
    }
    claims
}

/// Claims (indices) by the trie piece they are entered at.
fn by_trie_prefix(claims: &[Claim]) -> BTreeMap<TriePrefix, Vec<usize>> {
    let mut by: BTreeMap<TriePrefix, Vec<usize>> = BTreeMap::new();
    for (i, claim) in claims.iter().enumerate() {
        by.entry(claim.piece).or_default().push(i);
    }
    by
}

/// Claims (indices) by their rule's own prefix.
fn by_original_prefix(claims: &[Claim]) -> HashMap<IpNet, Vec<usize>> {
    let mut by: HashMap<IpNet, Vec<usize>> = HashMap::default();
    for (i, claim) in claims.iter().enumerate() {
        by.entry(claim.prefix).or_default().push(i);
    }
    by
}

/// The prefix lengths rules use, per family (IPv4 first).
type Lengths = [Vec<u8>; 2];

fn prefix_lengths(by_prefix: &HashMap<IpNet, Vec<usize>>) -> Lengths {
    let mut lengths: [BTreeSet<u8>; 2] = Default::default();
    for net in by_prefix.keys() {
        lengths[usize::from(net.addr().is_ipv6())].insert(net.prefix_len());
    }
    lengths.map(|set| set.into_iter().collect())
}

/// `net` and every shorter prefix containing it, of the lengths rules use
/// (the only ones that can be a rule's own prefix): a policy of /128s
/// probes one length, not 129.
fn ancestors<'l>(net: IpNet, lengths: &'l Lengths) -> impl Iterator<Item = IpNet> + 'l {
    lengths[usize::from(net.addr().is_ipv6())]
        .iter()
        .filter(move |&&len| len <= net.prefix_len())
        .map(move |&len| IpNet::new_assert(net.addr(), len).trunc())
}

/// Whether a claim's ports belong in the entry for key class `class`: `*`
/// claims only in the wildcard entries, the others in those of the classes
/// their ports cover (a class's ports are all covered by a spec, or none).
fn covers_key(classes: &PortClasses, ports: PortSpec, class: u32) -> bool {
    match ports {
        PortSpec::Any => class == ANY_PORT_CLASS,
        _ => class != ANY_PORT_CLASS && ports.contains(classes.first_port(class)),
    }
}

fn trie_prefixes(prefix: &IpNet) -> Vec<TriePrefix> {
    match prefix {
        IpNet::V4(v4) => vec![TriePrefix {
            len: RULE_KEY_FIXED_BITS + u32::from(IPV4_MAPPED.prefix_len() + v4.prefix_len()),
            addr: RuleKey::mapped_v4(v4.network().octets()),
            net: *prefix,
        }],
        IpNet::V6(v6) => lpm::outside_ipv4_mapped(*v6)
            .into_iter()
            .map(|net| TriePrefix {
                len: RULE_KEY_FIXED_BITS + u32::from(net.prefix_len()),
                addr: net.network().octets(),
                net: IpNet::V6(net),
            })
            .collect(),
    }
}

/// The kernel's look-up (`rule_for` in l4proxy-ebpf) in user space, for
/// tests: over `entries` (each a prefix length over the whole key, the
/// key, the value), the longest-prefix match for `addr` in the port's
/// `class` and in the wildcard class of that class's half; the wildcard's
/// wins only with a higher rank. The rule id it gives.
#[cfg(test)]
pub(super) fn kernel_lookup<'a>(
    entries: impl Iterator<Item = (u32, &'a ClassKey, &'a RuleValue)> + Clone,
    class: u32,
    addr: std::net::IpAddr,
) -> Option<u32> {
    let addr = lpm::key(addr).to_be_bytes();
    let key_bytes = |key: &ClassKey| [&key.class[..], &key.addr[..]].concat();
    let same_prefix = |a: &[u8], b: &[u8], bits: u32| {
        let (whole, rest) = ((bits / 8) as usize, bits % 8);
        let mask = !(0xffu8 >> rest);
        a[..whole] == b[..whole] && (rest == 0 || (a[whole] ^ b[whole]) & mask == 0)
    };
    let longest = |class: u32| {
        let key = key_bytes(&ClassKey::new(class, addr));
        entries
            .clone()
            .filter(|(len, k, _)| same_prefix(&key_bytes(k), &key, *len))
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, _, value)| *value)
    };
    let exact = longest(class);
    let wildcard = longest(ANY_PORT_CLASS | (class & l4proxy_common::CLASS_HALF));
    match (exact, wildcard) {
        (Some(exact), Some(wildcard)) if wildcard.rank > exact.rank => Some(wildcard),
        (Some(exact), _) => Some(exact),
        (None, wildcard) => wildcard,
    }
    .map(|value| value.rule_id)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};

    use PortSpec::{Any, Range, Single};

    use super::*;

    fn policy(rules: &[(&[&str], &[PortSpec])]) -> Policy {
        Policy::of_rules(rules)
    }

    #[test]
    fn a_rule_no_entry_holds_is_named_as_never_matching() {
        let unreachable_of = |rules: &[(&[&str], &[PortSpec])]| {
            let policy = policy(rules);
            unreachable(&policy, &compile(&policy))
        };
        // A range whose every port another rule names singly, on the same
        // prefix: single ports win, wherever the rules are in the list.
        let found = unreachable_of(&[
            (&["192.0.2.0/24"], &[Range(80, 81)]),
            (&["192.0.2.0/24"], &[Single(80), Single(81)]),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("intercept[0]: never matches: rules that win over rule \"r0\""),
            "{found:?}"
        );
        // A port of its own, or a prefix of its own: it matches.
        for rules in [
            &[
                (&["192.0.2.0/24"][..], &[Single(80)][..]),
                (&["192.0.2.0/24"], &[Single(80), Single(443)]),
            ][..],
            &[
                (&["192.0.2.0/24"], &[Single(80)]),
                (&["192.0.2.0/24", "198.51.100.0/24"], &[Single(80)]),
            ],
            // Earlier, but less specific: the later, narrower rule wins.
            &[
                (&["192.0.2.0/24"], &[Any]),
                (&["192.0.2.0/25"], &[Range(1, 1023)]),
            ],
        ] {
            assert_eq!(unreachable_of(rules), Vec::<String>::new(), "{rules:?}");
        }
        // Taken from by two more specific rules together: not found (its own
        // prefix's entry is still its).
        let found = unreachable_of(&[
            (&["192.0.2.0/24"], &[Single(80)]),
            (&["192.0.2.0/25"], &[Single(80)]),
            (&["192.0.2.128/25"], &[Single(80)]),
        ]);
        assert_eq!(found, Vec::<String>::new());
    }

    /// An entry as (key prefix length, key, rule).
    fn entry(prefix_len: u32, class: u32, addr: &str, rule: u32) -> (u32, ClassKey, u32) {
        let addr = match addr.parse().unwrap() {
            IpAddr::V4(v4) => RuleKey::mapped_v4(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        (prefix_len, ClassKey::new(class, addr), rule)
    }

    fn entries(policy: &Policy) -> Vec<(u32, ClassKey, u32)> {
        compile(policy)
            .entries
            .iter()
            .map(|e| (e.prefix_len, e.key, e.value.rule_id))
            .collect()
    }

    #[test]
    fn v4_is_keyed_mapped_with_96_more_bits() {
        let p = policy(&[(&["192.0.2.0/24", "2001:db8::/32"], &[Single(80)])]);
        assert_eq!(
            entries(&p),
            [
                entry(32 + 32, 1, "2001:db8::", 0),
                entry(32 + 96 + 24, 1, "192.0.2.0", 0)
            ]
        );
        let key = compile(&p).entries[1].key;
        assert_eq!(key.class, [0, 0, 0, 1]);
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 0]
        );
    }

    #[test]
    fn a_range_is_one_entry_and_any_is_the_wildcard_class() {
        let p = policy(&[(&["10.0.0.0/8"], &[Range(1024, 65535), Any])]);
        let compiled = compile(&p);
        let classes: Vec<u32> = compiled
            .entries
            .iter()
            .map(|e| u32::from_be_bytes(e.key.class))
            .collect();
        assert_eq!(classes, [ANY_PORT_CLASS, 1]);
        assert_eq!(entry_count(&p), 2);
        assert_eq!(compiled.classes.of_port(1024), 1);
        assert_eq!(compiled.classes.of_port(65535), 1);
        assert_eq!(compiled.classes.of_port(1023), ANY_PORT_CLASS);
    }

    #[test]
    fn a_wide_range_on_many_prefixes_stays_one_entry_each() {
        let prefixes: Vec<String> = (0..1000)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let p = policy(&[(&prefixes, &[Range(1024, 65535)])]);
        assert_eq!(entry_count(&p), 1000);
        assert_eq!(compile(&p).entries.len(), 1000);
    }

    #[test]
    fn dedupe_keeps_the_rule_route_prefers() {
        let p = policy(&[
            (&["192.0.2.0/24"], &[Range(80, 82), Single(81)]),
            (&["192.0.2.0/24"], &[Single(80)]),
            (&["192.0.2.0/24"], &[Range(82, 84)]),
        ]);
        let compiled = compile(&p);
        let owners: Vec<Option<u32>> = (80..=84)
            .map(|port| kernel_rule(&compiled, SocketAddr::from(([192, 0, 2, 1], port))))
            .collect();
        // 80: a single port beats a range; 82: equal widths, the lowest index.
        assert_eq!(owners, [Some(1), Some(0), Some(0), Some(2), Some(2)]);
        // One entry per class: {80}, {81}, {82}, {83, 84}.
        assert_eq!(entry_count(&p), 4);
        assert_eq!(compiled.entries.len(), 4);
    }

    #[test]
    fn v6_default_leaves_out_the_ipv4_mapped_range() {
        let p = policy(&[(&["::/0"], &[Single(80)])]);
        let entries = compile(&p);
        assert_eq!(entries.entries.len(), 96);
        assert_eq!(entry_count(&p), 96);
        assert_eq!(
            kernel_rule(&entries, "[2001:db8::1]:80".parse().unwrap()),
            Some(0)
        );
        assert_eq!(kernel_rule(&entries, "[::1]:80".parse().unwrap()), Some(0));
        assert_eq!(kernel_rule(&entries, "192.0.2.1:80".parse().unwrap()), None);
    }

    #[test]
    fn a_containing_rule_beats_a_longer_piece_of_a_split_prefix() {
        // ::/0 is entered as pieces, one of them ::/96 (longer than ::/80),
        // yet ::/80 is the more specific rule for ::1.
        let p = policy(&[(&["::/0"], &[Single(80)]), (&["::/80"], &[Single(80)])]);
        let entries = compile(&p);
        assert_eq!(kernel_rule(&entries, "[::1]:80".parse().unwrap()), Some(1));
        assert_eq!(
            kernel_rule(&entries, "[2001:db8::1]:80".parse().unwrap()),
            Some(0)
        );
    }

    #[test]
    fn gateway_rules_are_flagged() {
        let mut p = policy(&[
            (&["192.0.2.0/24"], &[Single(80)]),
            (&["203.0.113.0/24"], &[Any]),
        ]);
        p.rules[1].interfaces = vec!["eth0".to_owned()];
        let flags: Vec<(u32, u32)> = compile(&p)
            .entries
            .iter()
            .map(|e| (e.value.rule_id, e.value.flags))
            .collect();
        assert_eq!(flags, [(0, 0), (1, RULE_ON_INTERFACES)]);
    }

    /// [`kernel_lookup`] over `compiled`'s entries.
    fn kernel_rule(compiled: &Compiled, dst: SocketAddr) -> Option<u32> {
        let entries = compiled
            .entries
            .iter()
            .map(|e| (e.prefix_len, &e.key, &e.value));
        kernel_lookup(entries, compiled.classes.of_port(dst.port()), dst.ip())
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
    fn kernel_picks_the_rule_route_matches() {
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
                { "name": "v6-web", "prefixes": ["::/0"], "ports": [80], "upstream": "u",
                  "interfaces": ["eth0"] },
                { "name": "low", "prefixes": ["::/80", "::/96"], "ports": ["*"], "upstream": "u" },
                { "name": "v4-all", "prefixes": ["0.0.0.0/0"], "ports": [8080], "upstream": "u",
                  "interfaces": ["eth0"] },
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
            let index = RuleIndex::new(&entries);
            assert_eq!(entry_count(policy), entries.entries.len());
            for ip in probe_addrs(policy) {
                for port in probe_ports(policy) {
                    let dst = SocketAddr::new(ip, port);
                    let reference = route::match_rule(policy, dst);
                    assert_eq!(
                        kernel_rule(&entries, dst),
                        reference.map(|RuleId(r)| r as u32),
                        "kernel: {dst} in {policy:?}"
                    );
                    assert_eq!(index.lookup(dst), reference, "index: {dst} in {policy:?}");
                }
            }
        }
    }
}
