//! Prefixes by which others they enclose: a prefix's enclosing ones are
//! looked up, one per prefix length in use, not searched for among them all
//! (100 000 rules' prefixes are checked against each other at every load).

use std::collections::BTreeSet;

use foldhash::HashMap;
use ipnet::IpNet;

/// Values by prefix, and the prefix lengths in use per family.
pub(super) struct Enclosing<V> {
    by_prefix: HashMap<IpNet, V>,
    lengths: [BTreeSet<u8>; 2],
}

impl<V: Default> Enclosing<V> {
    pub(super) fn new() -> Self {
        Enclosing {
            by_prefix: HashMap::default(),
            lengths: [BTreeSet::new(), BTreeSet::new()],
        }
    }

    /// The value of `prefix`, made (default) if it has none yet.
    pub(super) fn entry(&mut self, prefix: IpNet) -> &mut V {
        self.lengths[family(&prefix)].insert(prefix.prefix_len());
        self.by_prefix.entry(prefix).or_default()
    }

    /// The prefixes that hold `prefix` (itself included), shortest first,
    /// with their values.
    pub(super) fn of(&self, prefix: &IpNet) -> impl Iterator<Item = (IpNet, &V)> {
        self.lengths[family(prefix)]
            .range(..=prefix.prefix_len())
            .filter_map(|&len| IpNet::new(prefix.addr(), len).ok().map(|net| net.trunc()))
            .filter_map(|outer| self.by_prefix.get(&outer).map(|value| (outer, value)))
    }
}

fn family(net: &IpNet) -> usize {
    usize::from(matches!(net, IpNet::V6(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefixes_holding_one_shortest_first() {
        let mut index = Enclosing::<Vec<u32>>::new();
        for (net, value) in [
            ("10.0.0.0/8", 1),
            ("10.1.0.0/16", 2),
            ("10.2.0.0/16", 3),
            ("2001:db8::/32", 4),
        ] {
            index.entry(net.parse().unwrap()).push(value);
        }
        let held = |net: &str| -> Vec<(String, Vec<u32>)> {
            index
                .of(&net.parse().unwrap())
                .map(|(outer, values)| (outer.to_string(), values.clone()))
                .collect()
        };
        assert_eq!(
            held("10.1.2.0/24"),
            [
                ("10.0.0.0/8".to_owned(), vec![1]),
                ("10.1.0.0/16".to_owned(), vec![2])
            ]
        );
        assert_eq!(held("10.1.0.0/16").len(), 2, "itself included");
        assert_eq!(held("10.0.0.0/7"), []);
        assert_eq!(held("2001:db8:1::/48").len(), 1, "families apart");
    }
}
