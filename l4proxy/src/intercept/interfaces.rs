//! The network interfaces of this namespace, as the kernel programs need
//! them: index, how many bytes of link-layer header precede the IP header
//! at tc ingress, and for bridged interception which are bridges (with their
//! MAC address and IP addresses) and which are their ports.

use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::{
    MulticastGroup,
    packet_route::{
        address::AddressMessage,
        link::{
            InfoBridge, InfoData, InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage,
        },
    },
};
use tokio::sync::mpsc;

use super::routes::{RouteError, connect};

/// Ethernet header length: destination, source, EtherType.
const ETHERNET_HEADER: u32 = 14;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// 14 on Ethernet (and loopback), 0 on layer-3 devices (tun, WireGuard,
    /// IP tunnels); `None` for link types the kernel programs cannot read.
    pub l2_len: Option<u32>,
    /// The bridge, bond or VRF it is enslaved to: its IP traffic arrives on
    /// that device instead.
    pub master: Option<u32>,
    /// It is a Linux bridge.
    pub is_bridge: bool,
    /// Its Ethernet address, if it has one.
    pub mac: Option<[u8; 6]>,
}

impl Interface {
    pub fn is_loopback(&self) -> bool {
        self.index == 1
    }

    /// An Ethernet link as `list` would return it, for unit tests.
    #[cfg(test)]
    pub fn ethernet(name: &str, index: u32, master: Option<u32>, is_bridge: bool) -> Self {
        Self {
            name: name.to_owned(),
            index,
            l2_len: Some(14),
            master,
            is_bridge,
            // Fits: test indices are small.
            mac: Some([2, 0, 0, 0, 0, index as u8]),
        }
    }
}

/// Every interface of the calling thread's network namespace.
pub async fn list() -> Result<Vec<Interface>, RouteError> {
    let handle = connect()?;
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(RouteError::List)?;
    Ok(links.iter().filter_map(interface_of).collect())
}

/// The IP addresses of interface `index`.
pub async fn addresses(index: u32) -> Result<Vec<IpAddr>, RouteError> {
    let handle = connect()?;
    let messages: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(RouteError::List)?;
    Ok(messages
        .iter()
        .filter(|message| message.header.index == index)
        .filter_map(crate::local_addrs::address_of)
        .collect())
}

/// Bridge `index`'s own `nf_call_iptables` and `nf_call_ip6tables`: with
/// br_netfilter loaded, its frames pass the firewall when either these or
/// the global sysctls say so.
pub async fn bridge_nf_call(index: u32) -> Result<[bool; 2], RouteError> {
    let handle = connect()?;
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_collect()
        .await
        .map_err(RouteError::List)?;
    let mut nf_call = [false; 2];
    let options = links
        .iter()
        .flat_map(|link| &link.attributes)
        .filter_map(|attribute| match attribute {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })
        .flatten()
        .filter_map(|info| match info {
            LinkInfo::Data(InfoData::Bridge(options)) => Some(options),
            _ => None,
        })
        .flatten();
    for option in options {
        match option {
            InfoBridge::NfCallIpTables(on) => nf_call[0] = *on,
            InfoBridge::NfCallIp6Tables(on) => nf_call[1] = *on,
            _ => {}
        }
    }
    Ok(nf_call)
}

/// Tells the receiver whenever an interface comes, goes or changes, or an
/// address is added or removed (rtnetlink's link and address groups: a
/// VIP that moves, a DHCP renewal); several changes in a row may come as
/// one.
///
/// Should the subscription end (a netlink error ends its stream), it is
/// made again, said in the log, and the receiver told of a change: what
/// came meanwhile was missed.
pub fn watch() -> Result<mpsc::Receiver<()>, RouteError> {
    let mut changes = subscribe()?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            while changes.next().await.is_some() {
                // Full: a change is already waiting to be seen; this one
                // joins it.
                if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
            tracing::error!("the watch of interfaces and addresses ended; watching again");
            changes = loop {
                tokio::select! {
                    () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
                    () = tx.closed() => return,
                }
                match subscribe() {
                    Ok(changes) => break changes,
                    Err(e) => {
                        tracing::error!(error = %e, "watching interfaces and addresses again")
                    }
                }
            };
            if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                return;
            }
        }
    });
    Ok(rx)
}

/// How long a watch that ended waits before it subscribes again.
const RESUBSCRIBE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// rtnetlink's link and address groups, on the current runtime.
fn subscribe() -> Result<impl futures::Stream + Unpin + Send + 'static, RouteError> {
    let (connection, _, changes) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])?;
    tokio::spawn(connection);
    Ok(changes)
}

fn interface_of(link: &LinkMessage) -> Option<Interface> {
    let name = link
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })?;
    let master = link
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Controller(index) => Some(*index),
            _ => None,
        });
    let is_bridge = link.attributes.iter().any(|attribute| {
        matches!(attribute, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|info| matches!(info, LinkInfo::Kind(InfoKind::Bridge))))
    });
    let mac = link
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        });
    let l2_len = match link.header.link_layer_type {
        LinkLayerType::Ether | LinkLayerType::Loopback => Some(ETHERNET_HEADER),
        LinkLayerType::None
        | LinkLayerType::Rawip
        | LinkLayerType::Ppp
        | LinkLayerType::Tunnel
        | LinkLayerType::Tunnel6
        | LinkLayerType::Sit
        | LinkLayerType::Ipgre
        | LinkLayerType::Ip6gre => Some(0),
        _ => None,
    };
    Some(Interface {
        name,
        index: link.header.index,
        l2_len,
        master,
        is_bridge,
        mac,
    })
}
