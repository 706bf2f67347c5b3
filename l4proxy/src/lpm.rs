//! Longest-prefix match in userspace, for the per-connection look-ups that
//! must not grow with the size of a policy: which intercept rule a
//! destination belongs to (`intercept::rules::RuleIndex`), whether an
//! address is this host's (`local_addrs`).
//!
//! One hash map per prefix length in use, probed longest first: a policy of
//! ten thousand /32 rules costs one probe, not ten thousand comparisons.
//! Addresses are 128-bit, IPv4 ones IPv4-mapped (as the kernel's `RULES`
//! trie keys them), so one table serves both families.

use std::net::IpAddr;

use foldhash::HashMap;

use ipnet::IpNet;

/// An address as the tables key it: IPv6 as is, IPv4 mapped.
pub fn key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// A prefix as the tables key it: its key and its length out of 128.
pub fn prefix_key(net: IpNet) -> (u128, u8) {
    match net {
        IpNet::V4(v4) => (key(IpAddr::V4(v4.network())), 96 + v4.prefix_len()),
        IpNet::V6(v6) => (u128::from(v6.network()), v6.prefix_len()),
    }
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
        for prefix in prefixes {
            let (addr, len) = prefix_key(prefix);
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
            let (addr, len) = prefix_key(net(prefix));
            lpm.insert(addr, len, value);
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
        // ::/0 is also keyed as 0/0 of the 128-bit space: it holds the mapped
        // range, as a v6 default would; the rule compiler splits it around.
        let mut v6_only = Lpm::default();
        let (addr, len) = prefix_key(net("2001:db8::/32"));
        v6_only.insert(addr, len, ());
        assert!(v6_only.longest(key(ip("192.0.2.7"))).is_none());
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
