//! Start-up checks of the kernel settings interception depends on, each
//! saying what is wrong and what to set (the `rp_filter`, `ip_forward` and
//! `src_valid_mark` pitfalls of every TPROXY guide, found before the first
//! connection silently fails).
//!
//! - A gateway forwards: with forwarding off, what the rules intercept still
//!   works (it is delivered here), but nothing else passes. A warning.
//! - `src_valid_mark` on an interface where `classify` marks packets makes
//!   the reverse-path check of those packets look up the client by the mark,
//!   find the `local default` route of our table, and drop the packet as a
//!   martian source (unless `accept_local` is on). An error. Strict
//!   `rp_filter` without it is fine: the check then uses the main table, and
//!   a client's route points back out of the interface it came in on.
//! - Bridged interception with `br_netfilter` loaded and
//!   `net.bridge.bridge-nf-call-iptables` (or `-ip6tables`) on, or the
//!   bridge's own `nf_call_iptables` (`ip link set BR type bridge
//!   nf_call_iptables 1`, which br_netfilter honours whatever the sysctl
//!   says): every frame crossing the bridge also goes through
//!   iptables/ip6tables (and conntrack), whose FORWARD and INPUT rules may
//!   drop what l4proxy takes or passes. A warning: it works unless a
//!   firewall there says otherwise.

use std::{fs, io, path::PathBuf};

use super::bridge::BridgeUse;

/// What the checks found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Interception cannot work: refuse to start.
    pub errors: Vec<String>,
    /// It works, but the host is probably not set up as meant.
    pub warnings: Vec<String>,
}

/// What the daemon is about to do.
pub struct Plan<'a> {
    /// Gateway rules intercept IPv4 / IPv6 prefixes.
    pub gateway_v4: bool,
    pub gateway_v6: bool,
    /// Interfaces where `classify` marks packets.
    pub marking: &'a [String],
    /// The bridges gateway rules intercept on.
    pub bridges: &'a [Bridged<'a>],
}

/// A bridge gateway rules intercept on, and its own `nf_call_iptables` /
/// `nf_call_ip6tables`.
pub struct Bridged<'a> {
    pub bridge: &'a BridgeUse,
    pub nf_call: [bool; 2],
}

pub fn check(plan: &Plan) -> Findings {
    check_with(plan, &|key| read(key))
}

/// [`check`] with the sysctl reader as a parameter, for tests. Keys are
/// `/proc/sys` paths (`net/ipv4/conf/eth0.100/rp_filter`): an interface
/// name may hold dots.
fn check_with(plan: &Plan, sysctl: &dyn Fn(&str) -> io::Result<u32>) -> Findings {
    let mut findings = Findings::default();
    for (wanted, key) in [
        (plan.gateway_v4, "net.ipv4.ip_forward"),
        (plan.gateway_v6, "net.ipv6.conf.all.forwarding"),
    ] {
        if wanted && sysctl(&key.replace('.', "/")).is_ok_and(|value| value == 0) {
            findings.warnings.push(format!(
                "{key} is 0: connections the gateway rules intercept work, but nothing else \
                 the clients send through this host is forwarded; set {key}=1 on a gateway"
            ));
        }
    }
    for Bridged { bridge, nf_call } in plan.bridges {
        let name = &bridge.name;
        for (wanted, key, own, option) in [
            (
                bridge.v4,
                "net.bridge.bridge-nf-call-iptables",
                nf_call[0],
                "nf_call_iptables",
            ),
            (
                bridge.v6,
                "net.bridge.bridge-nf-call-ip6tables",
                nf_call[1],
                "nf_call_ip6tables",
            ),
        ] {
            if !wanted {
                continue;
            }
            // The key exists only while br_netfilter is loaded; without it
            // neither setting calls a firewall.
            let Ok(global) = sysctl(&key.replace('.', "/")) else {
                continue;
            };
            let on = match (global != 0, own) {
                (true, _) => format!("{key} is 1"),
                (false, true) => format!("bridge {name}'s {option} is on"),
                (false, false) => continue,
            };
            findings.warnings.push(format!(
                "{on} (br_netfilter): every frame crossing bridge {name} also passes the \
                 firewall (iptables/ip6tables FORWARD, and INPUT for what l4proxy takes); rules \
                 there that drop it stop interception or bridging; set {key}=0 and `ip link set \
                 {name} type bridge {option} 0` unless a firewall on the bridge is meant"
            ));
        }
    }
    for interface in plan.marking {
        let either = |name: &str| {
            let all = sysctl(&format!("net/ipv4/conf/all/{name}")).unwrap_or(0);
            let own = sysctl(&format!("net/ipv4/conf/{interface}/{name}")).unwrap_or(0);
            all != 0 || own != 0
        };
        if either("src_valid_mark") && !either("accept_local") {
            findings.errors.push(format!(
                "net.ipv4.conf.{interface}.src_valid_mark (or .all.) is 1: the reverse-path check \
                 of the packets l4proxy marks on {interface} would use the mark, find this host's \
                 own route and drop them as martians; set net.ipv4.conf.all.src_valid_mark=0 and \
                 net.ipv4.conf.{interface}.src_valid_mark=0 (or accept_local=1)"
            ));
        }
    }
    findings
}

/// Reads `/proc/sys/KEY` of the calling thread's network namespace.
fn read(key: &str) -> io::Result<u32> {
    let path = PathBuf::from("/proc/sys").join(key);
    let text = fs::read_to_string(&path)?;
    text.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{text:?}")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn findings(plan: &Plan, set: &[(&str, u32)]) -> Findings {
        let values: HashMap<&str, u32> = set.iter().copied().collect();
        check_with(plan, &|key| {
            values
                .get(key)
                .copied()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        })
    }

    fn gateway(marking: &[String]) -> Plan<'_> {
        Plan {
            gateway_v4: true,
            gateway_v6: true,
            marking,
            bridges: &[],
        }
    }

    #[test]
    fn forwarding_off_is_a_warning_per_family() {
        let eth = ["eth0".to_owned()];
        let found = findings(
            &gateway(&eth),
            &[
                ("net/ipv4/ip_forward", 0),
                ("net/ipv6/conf/all/forwarding", 1),
            ],
        );
        assert!(found.errors.is_empty());
        assert_eq!(found.warnings.len(), 1);
        assert!(found.warnings[0].starts_with("net.ipv4.ip_forward is 0"));
    }

    #[test]
    fn forwarding_is_not_checked_without_gateway_rules() {
        let plan = Plan {
            gateway_v4: false,
            gateway_v6: false,
            marking: &[],
            bridges: &[],
        };
        assert_eq!(
            findings(&plan, &[("net/ipv4/ip_forward", 0)]),
            Findings::default()
        );
    }

    #[test]
    fn br_netfilter_is_a_warning_per_bridge_and_bridged_family() {
        let br0 = BridgeUse {
            name: "br0".to_owned(),
            index: 2,
            v4: true,
            v6: false,
        };
        let bridged = |nf_call| Bridged {
            bridge: &br0,
            nf_call,
        };
        fn plan<'a>(bridges: &'a [Bridged<'a>]) -> Plan<'a> {
            Plan {
                gateway_v4: false,
                gateway_v6: false,
                marking: &[],
                bridges,
            }
        }
        let on = [
            ("net/bridge/bridge-nf-call-iptables", 1),
            ("net/bridge/bridge-nf-call-ip6tables", 1),
        ];
        let found = findings(&plan(&[bridged([false, false])]), &on);
        assert!(found.errors.is_empty());
        assert_eq!(found.warnings.len(), 1, "{found:?}");
        assert!(found.warnings[0].starts_with("net.bridge.bridge-nf-call-iptables is 1"));
        // The bridge's own setting, with the sysctl off: br_netfilter
        // honours it.
        let off = [("net/bridge/bridge-nf-call-iptables", 0)];
        let found = findings(&plan(&[bridged([true, false])]), &off);
        assert_eq!(found.warnings.len(), 1, "{found:?}");
        assert!(found.warnings[0].starts_with("bridge br0's nf_call_iptables is on"));
        // Not loaded (no key), or both off: nothing to say.
        assert_eq!(
            findings(&plan(&[bridged([true, true])]), &[]),
            Findings::default()
        );
        assert_eq!(
            findings(&plan(&[bridged([false, false])]), &off),
            Findings::default()
        );
    }

    #[test]
    fn src_valid_mark_on_a_marking_interface_is_an_error() {
        let eth = ["eth0".to_owned(), "eth1".to_owned()];
        let base = [
            ("net/ipv4/ip_forward", 1),
            ("net/ipv6/conf/all/forwarding", 1),
        ];
        let with = |extra: &[(&str, u32)]| {
            let mut set = base.to_vec();
            set.extend_from_slice(extra);
            findings(&gateway(&eth), &set)
        };
        assert_eq!(with(&[]), Findings::default());
        let one = with(&[("net/ipv4/conf/eth1/src_valid_mark", 1)]);
        assert_eq!(one.errors.len(), 1, "{one:?}");
        assert!(one.errors[0].starts_with("net.ipv4.conf.eth1.src_valid_mark"));
        assert_eq!(
            with(&[("net/ipv4/conf/all/src_valid_mark", 1)])
                .errors
                .len(),
            2
        );
        // accept_local lets the local route pass the check.
        assert_eq!(
            with(&[
                ("net/ipv4/conf/all/src_valid_mark", 1),
                ("net/ipv4/conf/all/accept_local", 1)
            ]),
            Findings::default()
        );
        // Strict rp_filter alone is fine.
        assert_eq!(
            with(&[("net/ipv4/conf/all/rp_filter", 1)]),
            Findings::default()
        );
    }
}
