//! Longest-prefix match in userspace, for the per-connection look-ups that
//! must not grow with the size of a policy: which intercept rule a
//! destination belongs to (`intercept::rules::RuleIndex`), whether an
//! address is this host's (`local_addrs`).
//!
//! One hash map per prefix length in use, probed longest first: a policy of
//! ten thousand /32 rules costs one probe, not ten thousand comparisons.
//! Addresses are 128-bit, IPv4 ones IPv4-mapped (as the kernel's `RULES`
//! trie keys them), so one table serves both families.

use std::net::{IpAddr, Ipv6Addr};

use foldhash::HashMap;

use ipnet::{IpNet, Ipv6Net};

use crate::policy::IPV4_MAPPED;

/// An address as the tables key it: IPv6 as is, IPv4 mapped.
pub fn key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// A prefix as the tables key it: its keys and lengths out of 128. An IPv6
/// one that holds the IPv4-mapped range (`::/0` to `::/80`) is keyed
/// without it, as pieces: whole, it would hold every IPv4 address.
pub fn prefix_keys(net: IpNet) -> Vec<(u128, u8)> {
    match net {
        IpNet::V4(v4) => vec![(key(IpAddr::V4(v4.network())), 96 + v4.prefix_len())],
        IpNet::V6(v6) => outside_ipv4_mapped(v6)
            .into_iter()
            .map(|piece| (u128::from(piece.network()), piece.prefix_len()))
            .collect(),
    }
}

/// `net` less the IPv4-mapped range, as prefixes: an IPv6 prefix never
/// holds an IPv4 address.
pub fn outside_ipv4_mapped(net: Ipv6Net) -> Vec<Ipv6Net> {
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

/// Values by prefix; [`Lpm::longest`] finds the longest prefix that holds an
/// address.
#[derive(Clone, Debug)]
pub struct Lpm<V> {
    /// Longest first.
    by_len: Vec<(u8, HashMap<u128, V>)>,
}

impl<V> Default for Lpm<V> {
    fn default() -> Self {
        Self { by_len: Vec::new() }
    }
}

fn mask(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl<V> Lpm<V> {
    /// Sets the value of `addr/len` (host bits are ignored), replacing one
    /// there was.
    pub fn insert(&mut self, addr: u128, len: u8, value: V) {
        assert!(len <= 128, "prefix length {len} over 128");
        let at = match self.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(at) => at,
            Err(at) => {
                self.by_len.insert(at, (len, HashMap::default()));
                at
            }
        };
        self.by_len[at].1.insert(addr & mask(len), value);
    }

    /// The value of the longest prefix holding `addr`.
    pub fn longest(&self, addr: u128) -> Option<&V> {
        self.by_len
            .iter()
            .find_map(|(len, table)| table.get(&(addr & mask(*len))))
    }
}

impl Lpm<()> {
    /// A set of prefixes.
    pub fn of(prefixes: impl IntoIterator<Item = IpNet>) -> Self {
        let mut lpm = Lpm::default();
        for (addr, len) in prefixes.into_iter().flat_map(prefix_keys) {
            lpm.insert(addr, len, ());
        }
        lpm
    }

    /// Whether a prefix of the set holds `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.longest(key(ip)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let mut lpm = Lpm::default();
        for (prefix, value) in [
            ("0.0.0.0/0", "v4 default"),
            ("192.0.2.0/24", "/24"),
            ("192.0.2.128/25", "/25"),
            ("192.0.2.7/32", "/32"),
            ("::/0", "v6 default"),
            ("2001:db8::/32", "2001:db8::/32"),
        ] {
            for (addr, len) in prefix_keys(net(prefix)) {
                lpm.insert(addr, len, value);
            }
        }
        for (addr, want) in [
            ("192.0.2.7", Some("/32")),
            ("192.0.2.200", Some("/25")),
            ("192.0.2.8", Some("/24")),
            ("198.51.100.1", Some("v4 default")),
            ("::ffff:192.0.2.7", Some("/32")),
            ("2001:db8:1::1", Some("2001:db8::/32")),
            ("2001:db9::1", Some("v6 default")),
        ] {
            assert_eq!(lpm.longest(key(ip(addr))).copied(), want, "{addr}");
        }
        // Without IPv4 prefixes, an IPv6 default holds no IPv4 address:
        // whole, ::/0 would hold the IPv4-mapped range.
        let v6 = Lpm::of([net("::/0"), net("::/80"), net("2001:db8::/32")]);
        for v4 in ["192.0.2.7", "::ffff:192.0.2.7", "0.0.0.0"] {
            assert!(!v6.contains(ip(v4)), "{v4}");
        }
        for v6_addr in ["::1", "::ffff:0:0:1", "::1:0:0:0", "2001:db9::1"] {
            assert!(v6.contains(ip(v6_addr)), "{v6_addr}");
        }
    }

    #[test]
    fn sets_of_prefixes() {
        let set = Lpm::of([net("127.0.0.0/8"), net("::1/128"), net("192.0.2.10/32")]);
        assert!(set.contains(ip("127.1.2.3")));
        assert!(set.contains(ip("::1")));
        assert!(set.contains(ip("192.0.2.10")));
        assert!(!set.contains(ip("192.0.2.11")));
        assert!(!set.contains(ip("::2")));
        assert!(!Lpm::of([]).contains(ip("192.0.2.10")));
    }
}
