//! Port classes: the ports a policy's port specs cover alike.
//!
//! Two ports that exactly the same specs (`80`, `"8000-8099"`, …) cover are
//! the same to every rule, so the kernel's `RULES` trie is keyed by a port's
//! class instead of the port: a range is one entry per prefix however wide
//! it is (`1024-65535` on 1 000 prefixes: 1 000 entries, not 64 million), and
//! a look-up is still one array read and two trie look-ups. `*` specs are not
//! part of any class: their entries have the class `ANY_PORT_CLASS`, which is
//! also the class of a port no other spec covers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use l4proxy_common::{ANY_PORT_CLASS, PORT_COUNT};

use crate::policy::{Policy, PortSpec};

/// Each port's class, numbered from 1 in port order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortClasses {
    /// Indexed by port.
    of_port: Vec<u32>,
    /// The lowest port of each class (index: class - 1): every port of a
    /// class is covered by the same specs, so it stands for them all.
    first_port: Vec<u16>,
}

impl PortClasses {
    /// The classes of the ports `policy`'s rules name.
    pub fn of(policy: &Policy) -> Self {
        Self::of_specs(
            policy
                .rules
                .iter()
                .flat_map(|rule| rule.ports.iter().copied()),
        )
    }

    fn of_specs(specs: impl Iterator<Item = PortSpec>) -> Self {
        let spans: BTreeSet<(u32, u32)> = specs
            .filter_map(|spec| match spec {
                PortSpec::Any => None,
                PortSpec::Single(port) => Some((u32::from(port), u32::from(port))),
                PortSpec::Range(first, last) => Some((u32::from(first), u32::from(last))),
            })
            .collect();
        // Where the set of covering spans changes: spans start, or end.
        let mut starting: BTreeMap<u32, Vec<(u32, u32)>> = BTreeMap::new();
        let mut ending: BTreeMap<u32, Vec<(u32, u32)>> = BTreeMap::new();
        for &span in &spans {
            starting.entry(span.0).or_default().push(span);
            ending.entry(span.1 + 1).or_default().push(span);
        }
        let cuts: BTreeSet<u32> = starting.keys().chain(ending.keys()).copied().collect();
        let mut of_port = vec![ANY_PORT_CLASS; PORT_COUNT as usize];
        let mut first_port = Vec::new();
        let mut ids: HashMap<Vec<(u32, u32)>, u32> = HashMap::new();
        let mut covering: BTreeSet<(u32, u32)> = BTreeSet::new();
        let mut cuts = cuts.into_iter().peekable();
        while let Some(cut) = cuts.next() {
            for span in ending.get(&cut).into_iter().flatten() {
                covering.remove(span);
            }
            covering.extend(starting.get(&cut).into_iter().flatten());
            let Some(&next) = cuts.peek() else { break };
            if covering.is_empty() {
                continue;
            }
            let class = *ids
                .entry(covering.iter().copied().collect())
                .or_insert_with(|| {
                    // Fits: ports are below 65 536.
                    first_port.push(cut as u16);
                    // Fits: at most one class per port.
                    first_port.len() as u32
                });
            of_port[cut as usize..next as usize].fill(class);
        }
        Self {
            of_port,
            first_port,
        }
    }

    /// The class of `port`; [`ANY_PORT_CLASS`] if no spec but `*` covers it.
    pub fn of_port(&self, port: u16) -> u32 {
        self.of_port[usize::from(port)]
    }

    /// The lowest port of `class` (not [`ANY_PORT_CLASS`]).
    pub fn first_port(&self, class: u32) -> u16 {
        self.first_port[class as usize - 1]
    }

    /// The classes of the ports `spec` covers, in order (none for `*`).
    pub fn covered_by(&self, spec: PortSpec) -> Vec<u32> {
        let ports = match spec {
            PortSpec::Any => return Vec::new(),
            PortSpec::Single(port) => usize::from(port)..=usize::from(port),
            PortSpec::Range(first, last) => usize::from(first)..=usize::from(last),
        };
        let classes: BTreeSet<u32> = self.of_port[ports].iter().copied().collect();
        classes.into_iter().collect()
    }

    /// Every port's class, indexed by port.
    pub fn table(&self) -> &[u32] {
        &self.of_port
    }
}

#[cfg(test)]
mod tests {
    use PortSpec::{Any, Range, Single};

    use super::*;

    fn classes(specs: &[PortSpec]) -> PortClasses {
        PortClasses::of_specs(specs.iter().copied())
    }

    #[test]
    fn ports_covered_by_the_same_specs_share_a_class() {
        let c = classes(&[Range(1024, 65535), Single(443), Single(8080), Any]);
        assert_eq!(c.of_port(80), ANY_PORT_CLASS);
        assert_eq!(c.of_port(443), 1);
        assert_eq!(c.of_port(1023), ANY_PORT_CLASS);
        // The range, alone, on both sides of 8080.
        assert_eq!(c.of_port(1024), 2);
        assert_eq!(c.of_port(8079), 2);
        assert_eq!(c.of_port(8081), 2);
        assert_eq!(c.of_port(65535), 2);
        // The range and the single port.
        assert_eq!(c.of_port(8080), 3);
        assert_eq!(
            [1, 2, 3].map(|class| c.first_port(class)),
            [443, 1024, 8080]
        );
        assert_eq!(c.covered_by(Range(1024, 65535)), [2, 3]);
        assert_eq!(c.covered_by(Single(8080)), [3]);
        assert!(c.covered_by(Any).is_empty());
    }

    #[test]
    fn overlapping_ranges_make_a_class_per_overlap() {
        let c = classes(&[Range(10, 20), Range(15, 30), Range(10, 20)]);
        let of: Vec<u32> = [9, 10, 14, 15, 20, 21, 30, 31]
            .map(|p| c.of_port(p))
            .to_vec();
        assert_eq!(of, [0, 1, 1, 2, 2, 3, 3, 0]);
    }

    #[test]
    fn no_specs_no_classes() {
        let c = classes(&[Any]);
        assert!(c.table().iter().all(|&class| class == ANY_PORT_CLASS));
        assert!(c.first_port.is_empty());
    }
}
