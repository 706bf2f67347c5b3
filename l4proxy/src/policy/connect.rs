//! A rule's `connect`: an explicit proxy front end. Clients connect to one of
//! its `listen` addresses and ask for a destination with HTTP `CONNECT`
//! (a "remote explicit proxy"), instead of being steered by
//! the kernel. Closed by default: destination ports default to 443 only,
//! and this host, loopback and link-local addresses (where cloud metadata
//! services live) are refused unless named in `allow_reserved`.

use std::{net::SocketAddr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de::Error as _};

use super::{
    NamePattern, PortSpec,
    duration::{Bounds, Written},
    htpasswd::Htpasswd,
    raw::{Object, Pattern, Port, Prefix, Server, non_empty, some, some_non_empty},
};

/// How an explicit rule takes connections and which it lets through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectFront {
    /// Where l4proxy listens for CONNECT clients.
    pub listen: Vec<SocketAddr>,
    /// Client prefixes allowed to use it; empty: any client.
    pub clients: Vec<IpNet>,
    /// Destination ports a tunnel may go to.
    pub ports: Vec<PortSpec>,
    /// Destination names a tunnel may ask for; `None`: any name (unless
    /// `destinations` is given, when names must resolve into it).
    pub names: Option<Vec<NamePattern>>,
    /// Prefixes every destination address must be in (literal, or what a
    /// name resolved to); `None`: any address that is not reserved.
    pub destinations: Option<Vec<IpNet>>,
    /// Reserved addresses (this host's, loopback, link-local, unspecified)
    /// a tunnel may go to all the same.
    pub allow_reserved: Vec<IpNet>,
    /// Refuse a tunnel whose TLS server name differs from the name it
    /// asked for (domain fronting).
    pub refuse_fronting: bool,
    /// How long a name may take to resolve.
    pub resolve_timeout: Duration,
    /// Users who must say who they are (`Proxy-Authorization: Basic`);
    /// `None`: no authentication.
    pub users: Option<Htpasswd>,
}

impl ConnectFront {
    /// Whether a client may use this front end.
    pub fn admits(&self, client: std::net::IpAddr) -> bool {
        let client = client.to_canonical();
        self.clients.is_empty() || self.clients.iter().any(|p| p.contains(&client))
    }

    /// Whether nothing limits who may use it or where to: an open relay. A
    /// list that covers a whole family (`0.0.0.0/0`, or halves that add up
    /// to it) limits nothing, in that family at least.
    pub fn is_open_relay(&self) -> bool {
        let limits = |prefixes: &[IpNet]| {
            !prefixes.is_empty()
                && !covers_a_family(prefixes, true)
                && !covers_a_family(prefixes, false)
        };
        !limits(&self.clients)
            && self.names.is_none()
            && !self.destinations.as_deref().is_some_and(limits)
    }
}

/// Whether `prefixes` together hold every address of a family (IPv4 or
/// IPv6): their ranges, sorted, leave no gap from the first address to the
/// last.
pub(super) fn covers_a_family(prefixes: &[IpNet], ipv4: bool) -> bool {
    let mut ranges: Vec<(u128, u128)> = prefixes
        .iter()
        .filter_map(|prefix| match (prefix, ipv4) {
            (IpNet::V4(p), true) => Some((
                u128::from(u32::from(p.network())),
                u128::from(u32::from(p.broadcast())),
            )),
            (IpNet::V6(p), false) => Some((u128::from(p.network()), u128::from(p.broadcast()))),
            _ => None,
        })
        .collect();
    ranges.sort_unstable();
    let last = if ipv4 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    // The first address the ranges so far leave out.
    let mut next = 0u128;
    for (start, end) in ranges {
        if start > next {
            return false;
        }
        if end >= last {
            return true;
        }
        next = next.max(end + 1);
    }
    false
}

/// The JSON form; each value checked alone as it is read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawConnectFront {
    #[serde(deserialize_with = "non_empty")]
    listen: Vec<Server>,
    #[serde(default, deserialize_with = "some_non_empty")]
    clients: Option<Vec<Prefix>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    ports: Option<Vec<Port>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    names: Option<Vec<Pattern>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    destinations: Option<Vec<Prefix>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    allow_reserved: Option<Vec<Prefix>>,
    #[serde(default)]
    refuse_fronting: bool,
    #[serde(default, deserialize_with = "some_timeout")]
    resolve_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "some")]
    htpasswd: Option<Htpasswd>,
}

/// Ports a tunnel may reach when the policy does not say: HTTPS only, as
/// Squid's `SSL_ports` and Traffic Server's `connect_ports` do.
const DEFAULT_PORTS: [PortSpec; 1] = [PortSpec::Single(443)];

/// How long a name may take to resolve when the policy does not say.
const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

impl From<Object<RawConnectFront>> for ConnectFront {
    fn from(Object(raw): Object<RawConnectFront>) -> Self {
        let prefixes = |list: Option<Vec<Prefix>>| {
            list.map(|list| list.into_iter().map(|p| p.0).collect::<Vec<_>>())
        };
        ConnectFront {
            listen: raw.listen.into_iter().map(|s| s.0).collect(),
            clients: prefixes(raw.clients).unwrap_or_default(),
            ports: raw.ports.map_or(DEFAULT_PORTS.to_vec(), |ports| {
                ports.into_iter().map(|p| p.0).collect()
            }),
            names: raw
                .names
                .map(|names| names.into_iter().map(|n| n.0).collect()),
            destinations: prefixes(raw.destinations),
            allow_reserved: prefixes(raw.allow_reserved).unwrap_or_default(),
            refuse_fronting: raw.refuse_fronting,
            resolve_timeout: raw.resolve_timeout.unwrap_or(DEFAULT_RESOLVE_TIMEOUT),
            users: raw.htpasswd,
        }
    }
}

/// 0 would fail every look-up; one that takes minutes holds its client
/// (and one of the 64 look-ups at once) for nothing.
const RESOLVE_TIMEOUT: Bounds = Bounds {
    min: Duration::from_nanos(1),
    max: Duration::from_secs(300),
    says: "above 0, at most 300 seconds",
};

fn some_timeout<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let written = Written::deserialize(deserializer)?;
    RESOLVE_TIMEOUT
        .check(&written)
        .map(Some)
        .map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn a_family_is_covered_only_without_a_gap() {
        for (list, v4, v6) in [
            (&["0.0.0.0/0"][..], true, false),
            (&["0.0.0.0/1", "128.0.0.0/1"], true, false),
            (&["128.0.0.0/1", "0.0.0.0/2", "64.0.0.0/2"], true, false),
            (&["0.0.0.0/1", "0.0.0.0/2", "128.0.0.0/1"], true, false),
            (&["0.0.0.0/1", "128.0.0.0/2"], false, false),
            (
                &["0.0.0.0/1", "192.0.0.0/2", "255.255.255.255/32"],
                false,
                false,
            ),
            (&["192.0.2.0/24", "::/0"], false, true),
            (&["::/1", "8000::/1"], false, true),
            (&["::/1", "8000::/2", "ffff::/16"], false, false),
        ] {
            let prefixes = nets(list);
            assert_eq!(covers_a_family(&prefixes, true), v4, "{list:?} IPv4");
            assert_eq!(covers_a_family(&prefixes, false), v6, "{list:?} IPv6");
        }
    }
}
