//! Bridged interception: the proxy host is a Linux bridge between the
//! clients and their router, and a gateway rule names the bridge or some of
//! its ports. `classify` runs on the ports (it must see a frame before the
//! bridge forwards it) and addresses what it takes to the bridge's MAC, so
//! the packet goes up this host's stack on the bridge device; `steer` then
//! takes the connection there (`VIA_BRIDGE_PORT` pairs).
//!
//! What the host needs besides: an address on the bridge in each family the
//! rules intercept (to resolve the router's and the clients' MAC addresses
//! and to have routes to them), and a route to the servers, usually through
//! the subnet's router. No forwarding sysctl: bridged frames are not routed.

use std::net::IpAddr;

use super::interfaces::Interface;

/// The bridge a port belongs to, as `classify` on the port needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeOfPort {
    pub index: u32,
    pub mac: [u8; 6],
}

/// The bridge `interface` is a port of, if it is one (a bond's or a VRF's
/// port is not).
pub fn bridge_of(interface: &Interface, all: &[Interface]) -> Option<BridgeOfPort> {
    let master = all.iter().find(|i| Some(i.index) == interface.master)?;
    match (master.is_bridge, master.mac) {
        (true, Some(mac)) => Some(BridgeOfPort {
            index: master.index,
            mac,
        }),
        _ => None,
    }
}

/// The ports of `bridge`.
pub fn ports<'a>(
    bridge: &'a Interface,
    all: &'a [Interface],
) -> impl Iterator<Item = &'a Interface> {
    all.iter().filter(move |i| i.master == Some(bridge.index))
}

/// A bridge some gateway rule intercepts on (itself or through its ports),
/// and the families of those rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeUse {
    pub name: String,
    pub index: u32,
    pub v4: bool,
    pub v6: bool,
}

/// What stops bridged interception on `bridge`, whose addresses are
/// `addresses`: one message per family it lacks an address of (IPv6: a
/// global one; a link-local address gives no route to the clients).
pub fn missing_addresses(bridge: &BridgeUse, addresses: &[IpAddr]) -> Vec<String> {
    let has_v4 = addresses.iter().any(IpAddr::is_ipv4);
    let has_v6 = addresses.iter().any(|ip| match ip {
        IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        IpAddr::V4(_) => false,
    });
    let name = &bridge.name;
    let mut errors = Vec::new();
    for (wanted, has, family, example) in [
        (bridge.v4, has_v4, "IPv4", "ip addr add 198.51.100.3/24 dev"),
        (
            bridge.v6,
            has_v6,
            "IPv6",
            "ip addr add 2001:db8:c::3/64 dev",
        ),
    ] {
        if wanted && !has {
            errors.push(format!(
                "bridge {name} has no {family} address: bridged interception needs one in the \
                 clients' subnet, so that this host reaches the clients and their router (for \
                 example `{example} {name}`), and a route to the servers through that router"
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(v4: bool, v6: bool) -> BridgeUse {
        BridgeUse {
            name: "br0".to_owned(),
            index: 3,
            v4,
            v6,
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn each_intercepted_family_needs_an_address_on_the_bridge() {
        assert!(
            missing_addresses(
                &bridge(true, true),
                &ips(&["198.51.100.3", "2001:db8:c::3"])
            )
            .is_empty()
        );
        let missing = missing_addresses(&bridge(true, true), &ips(&["fe80::1"]));
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(missing[0].starts_with("bridge br0 has no IPv4 address"));
        assert!(missing[1].starts_with("bridge br0 has no IPv6 address"));
        // A family no rule intercepts needs nothing.
        assert!(missing_addresses(&bridge(true, false), &ips(&["198.51.100.3"])).is_empty());
    }

    fn link(index: u32, master: Option<u32>, is_bridge: bool) -> Interface {
        Interface::ethernet(&format!("if{index}"), index, master, is_bridge)
    }

    #[test]
    fn ports_of_a_bridge_know_it_and_ports_of_a_bond_do_not() {
        let all = [
            link(2, None, true),
            link(3, Some(2), false),
            link(4, Some(5), false),
            link(5, None, false),
        ];
        assert_eq!(
            bridge_of(&all[1], &all),
            Some(BridgeOfPort {
                index: 2,
                mac: [2, 0, 0, 0, 0, 2]
            })
        );
        assert_eq!(bridge_of(&all[2], &all), None);
        assert_eq!(bridge_of(&all[0], &all), None);
        let ports: Vec<u32> = ports(&all[0], &all).map(|i| i.index).collect();
        assert_eq!(ports, [3]);
    }
}
