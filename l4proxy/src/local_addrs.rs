//! The addresses of this host, kept current: a connection from one of them
//! (a client on the proxy host itself) must not be spoofed, and an upstream
//! on one of them needs its replies routed back to the proxy.
//!
//! Read from the kernel's interface addresses (as `ip addr` shows them),
//! plus the loopback ranges and the prefixes the daemon made local itself;
//! reread whenever an address is added or removed (the daemon follows
//! rtnetlink's address groups, see `intercept::interfaces::watch`), so that a
//! DHCP renewal or a new VIP is seen.
//!
//! An address can be this host's without being an interface's: an
//! operator's `local` route (AnyIP, `ip route add local 192.0.2.0/24 dev
//! lo`) makes a whole prefix local. [`routed_here`] asks the kernel's
//! routing itself, one address at a time, where a snapshot of the local
//! table would cost a dump of every route in it.

use std::{
    cell::RefCell,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{intercept::netlink_batch, lpm::Lpm};
use rtnetlink::{
    packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    },
    sys::Socket,
};

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
    /// Entries the interfaces' addresses and loopback take in that copy.
    host_keys: AtomicUsize,
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
            host_keys: AtomicUsize::new(0),
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

    /// Entries this host's own addresses take in the kernel's copy, as of
    /// the last reread.
    pub fn host_keys(&self) -> usize {
        self.host_keys.load(Ordering::Relaxed)
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
        let keys = all[..host]
            .iter()
            .map(|&prefix| crate::lpm::prefix_keys(prefix).len())
            .sum();
        self.host_keys.store(keys, Ordering::Relaxed);
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

/// Whether the kernel delivers a connection to `ip` to this host (`ip
/// route get` says `local`): an interface's address, or one of a `local`
/// route's prefix. A route that refuses (no route, `unreachable`,
/// `blackhole`, `prohibit`, a family disabled here) is not local. Any other
/// error (the kernel out of memory or buffers) is one: the question could
/// not be asked, and the caller must not take the address for a remote one.
pub fn routed_here(ip: IpAddr) -> io::Result<bool> {
    let mut query = RouteMessage::default();
    (
        query.header.address_family,
        query.header.destination_prefix_length,
    ) = match ip {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    query
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(ip)));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetRoute(query)),
    );
    request.finalize();
    let answer = ROUTE_QUERIES.with_borrow_mut(|queries| {
        let asked = queries.ask(&request);
        if asked.is_err() {
            // An answer may be left queued: the next question opens anew.
            queries.socket = None;
        }
        asked
    })?;
    match answer.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
            Ok(route.header.kind == RouteType::Local)
        }
        NetlinkPayload::Error(error) if refuses(error.raw_code()) => Ok(false),
        NetlinkPayload::Error(error) => Err(error.to_io()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer to a route query: {other:?}"),
        )),
    }
}

/// Whether `code` (a netlink error, a negated errno) is the kernel's
/// answer for a route that does not deliver anywhere (as `ip route get`
/// shows them): no route or a `throw` (ENETUNREACH), `unreachable`
/// (EHOSTUNREACH), `blackhole` (EINVAL), `prohibit` (EACCES), or a family
/// this kernel does not have (EOPNOTSUPP: rtnetlink has no route handler
/// for it). EINVAL would also answer a malformed question; the unit test
/// below asks this very question and gets `local` routes' answers.
fn refuses(code: i32) -> bool {
    [
        libc::ENETUNREACH,
        libc::EHOSTUNREACH,
        libc::EINVAL,
        libc::EACCES,
        libc::EOPNOTSUPP,
    ]
    .contains(&-code)
}

thread_local! {
    /// One netlink socket per thread that asks, opened on first use (in the
    /// daemon's network namespace, as every worker is), and its buffers.
    static ROUTE_QUERIES: RefCell<RouteQueries> = const {
        RefCell::new(RouteQueries { socket: None, answer: Vec::new() })
    };
}

struct RouteQueries {
    socket: Option<Socket>,
    answer: Vec<u8>,
}

impl RouteQueries {
    /// Sends `request` and reads its answer, which the kernel queues before
    /// the send returns.
    fn ask(
        &mut self,
        request: &NetlinkMessage<RouteNetlinkMessage>,
    ) -> io::Result<NetlinkMessage<RouteNetlinkMessage>> {
        let socket = match &mut self.socket {
            Some(socket) => socket,
            None => self.socket.insert(netlink_batch::route_socket()?),
        };
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        socket.send(&bytes, 0)?;
        self.answer.clear();
        self.answer.reserve(4096);
        socket.recv(&mut self.answer, libc::MSG_DONTWAIT)?;
        NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.answer)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the routes of the namespace the tests run in, changing nothing:
    /// loopback's `local` routes are in every one.
    #[test]
    fn the_kernels_local_routes_say_what_is_routed_here() {
        for ip in ["127.0.0.5", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(routed_here(ip).unwrap(), "{ip}");
        }
        // Reserved (class E): never a host's, routed away or not at all.
        assert!(!routed_here("240.0.0.1".parse().unwrap()).unwrap());
        // The thread's socket is kept and asked again.
        assert!(routed_here("127.0.0.1".parse().unwrap()).unwrap());
    }

    /// The refusals of routes that deliver nowhere are answers (the lab's
    /// CONNECT test has each kind of route); a kernel short of memory or
    /// buffers did not answer.
    #[test]
    fn only_a_routes_refusal_says_not_local() {
        for errno in [
            libc::ENETUNREACH,
            libc::EHOSTUNREACH,
            libc::EINVAL,
            libc::EACCES,
            libc::EOPNOTSUPP,
        ] {
            assert!(refuses(-errno), "{errno}");
        }
        for errno in [libc::ENOBUFS, libc::ENOMEM, libc::EPERM, libc::EBUSY] {
            assert!(!refuses(-errno), "{errno}");
        }
    }
}
