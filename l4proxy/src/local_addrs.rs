//! The addresses of this host, kept current: a connection from one of them
//! (a client on the proxy host itself) must not be spoofed, and an upstream
//! on one of them needs its replies routed back to the proxy.
//!
//! Read from the kernel's interface addresses (as `ip addr` shows them),
//! plus the loopback ranges and the prefixes the daemon made local itself;
//! reread whenever an address is added or removed (the daemon follows
//! rtnetlink's address groups, see `intercept::interfaces::watch`), so that a
//! DHCP renewal or a new VIP is seen.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, RwLock},
};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::lpm::Lpm;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};

/// 127.0.0.0/8 and ::1: local whether or not `lo` lists them.
const LOOPBACK: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
];

#[derive(Debug, thiserror::Error)]
pub enum LocalAddrsError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("listing this host's addresses: {0}")]
    List(rtnetlink::Error),
}

/// Told this host's addresses after every reread.
pub type Sink = Box<dyn FnMut(&[IpNet]) + Send>;

/// A snapshot of this host's addresses, replaced as a whole on each change.
pub struct LocalAddrs {
    /// Prefixes the daemon made local (they do not show as addresses), and
    /// whether the kernel's copy needs them.
    owned: Mutex<(Vec<IpNet>, bool)>,
    current: RwLock<Arc<Lpm<()>>>,
    /// The interfaces' addresses and loopback only.
    host: RwLock<Arc<Lpm<()>>>,
    /// The kernel programs' copy (`intercept::LocalMap`), if any.
    sink: Mutex<Option<Sink>>,
}

impl LocalAddrs {
    /// Reads the addresses now; `sink` is told them now and after every
    /// change. The daemon's own prefixes come later ([`LocalAddrs::set_owned`]).
    pub async fn load(sink: Option<Sink>) -> Result<Arc<LocalAddrs>, LocalAddrsError> {
        let local = LocalAddrs {
            owned: Mutex::new((Vec::new(), false)),
            current: RwLock::new(Arc::new(Lpm::default())),
            host: RwLock::new(Arc::new(Lpm::default())),
            sink: Mutex::new(sink),
        };
        local.reload().await?;
        Ok(Arc::new(local))
    }

    /// Whether `ip` is an address of this host, the prefixes the daemon
    /// made local (for every policy still in force) included.
    pub fn contains(&self, ip: IpAddr) -> bool {
        read(&self.current).contains(ip)
    }

    /// Whether `ip` is an address of one of this host's interfaces (or
    /// loopback): what a policy can count on whatever the daemon's other
    /// policies made local.
    pub fn is_host_address(&self, ip: IpAddr) -> bool {
        read(&self.host).contains(ip)
    }

    /// Takes the prefixes the daemon now makes local (after a new policy).
    /// `in_kernel`: the sink is told them too. The kernel programs look an
    /// address up only for gateway rules, and a policy without any need not
    /// write its prefixes there (100 000 trie entries take half a second).
    pub async fn set_owned(&self, owned: &[IpNet], in_kernel: bool) -> Result<(), LocalAddrsError> {
        *self
            .owned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = (owned.to_vec(), in_kernel);
        self.reload().await
    }

    /// Rereads the addresses (after the kernel reported a change). A failed
    /// reread keeps the last snapshot.
    pub async fn reload(&self) -> Result<(), LocalAddrsError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let driver = tokio::spawn(connection);
        let messages: Result<Vec<AddressMessage>, _> =
            handle.address().get().execute().try_collect().await;
        driver.abort();
        let addresses: Vec<IpNet> = messages
            .map_err(LocalAddrsError::List)?
            .iter()
            .filter_map(address_of)
            .map(IpNet::from)
            .collect();
        let (owned, in_kernel) = self
            .owned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let host = addresses.len() + LOOPBACK.len();
        let all: Vec<IpNet> = addresses.into_iter().chain(LOOPBACK).chain(owned).collect();
        if let Some(sink) = self
            .sink
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_mut()
        {
            sink(if in_kernel { &all } else { &all[..host] });
        }
        let host_only = Lpm::of(all[..host].iter().copied());
        let prefixes = Lpm::of(all);
        *self
            .host
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(host_only);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(prefixes);
        Ok(())
    }
}

/// A snapshot, without holding the lock while it is used.
fn read(lock: &RwLock<Arc<Lpm<()>>>) -> Arc<Lpm<()>> {
    lock.read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// The host's own address of an `ip addr` entry: IFA_LOCAL where given (on a
/// point-to-point link IFA_ADDRESS is the peer), else IFA_ADDRESS.
pub(crate) fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}
