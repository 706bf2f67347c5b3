//! tc ingress program (attached with tcx): marks the packets the kernel must
//! deliver to this host although their destination is not one of its
//! addresses. The daemon's policy-routing rule (`fwmark` → a table whose only
//! route is `local default dev lo`) then delivers them locally, where
//! `sk_lookup` (new connections) or the socket table (established ones) finds
//! their socket. It replaces the iptables rules of the classic TPROXY recipe:
//!
//! - `-j TPROXY`: a packet arriving on an interface that a gateway rule lists,
//!   to a destination that rule intercepts (the `RULES` trie, as in `steer`)
//!   and that is not this host's own: a SYN (a new connection), or a later
//!   packet of a connection the daemon has. A packet of a connection that was
//!   forwarded before the daemon started is left alone, so a start or a
//!   restart does not reset it; only the final ACK of a handshake the
//!   listener answered with a SYN cookie goes to the listener;
//! - `-m socket -j MARK`: a packet from an upstream server to a local socket
//!   that is not listening, that is, a reply to one of the daemon's upstream
//!   connections made from a client's address (transparent bind);
//! - and for both, an ICMP error (fragmentation needed, packet too big,
//!   unreachable, time exceeded) about a packet one of those sockets sent,
//!   so that path-MTU discovery works through the proxy.
//!
//! While the daemon drains, SYNs are no longer marked: new connections are
//! forwarded to their destination as if l4proxy were not there, and open ones
//! keep working until they close. After a reload, while connections opened
//! under the replaced policy are open, any packet but a SYN that a local
//! connection owns is marked (`-m socket` for all), so that they keep working
//! whatever the new rules say; the daemon turns this off once they are gone.
//!
//! On a port of a bridge (bridged interception) a packet is marked the same
//! way, and its destination MAC becomes the bridge's: the bridge, which runs
//! after tc ingress, then passes it up to this host's stack on the bridge
//! device (as for a frame addressed to the host itself) instead of
//! forwarding it to the router's or the client's MAC. The stack routes it
//! by the mark as above. What is not marked is bridged untouched, and a
//! packet already marked on a port is not looked at again on the bridge.
//!
//! Everything else is left alone. The program never drops: it returns
//! `TC_ACT_UNSPEC` (tcx's "next"), so programs after it and the stack decide.
//!
//! Its functions are `#[inline(always)]`: the verifier adds up the stack
//! frames of calls, and a program gets 512 bytes in all.

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, TC_ACT_UNSPEC, bpf_sock, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6, tcphdr,
    },
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie},
    macros::classifier,
    programs::TcContext,
};
use l4proxy_common::{
    Counter, DRAINING, INTERFACE_BRIDGE_PORT, INTERFACE_REPLIES, InterfaceConfig, MARK_MASK,
    MARK_VALUE, RETAINING, RULE_ON_INTERFACES, RuleKey,
};

use crate::{
    INTERFACES, SETTINGS, UPSTREAM_SERVERS, classify_lookup_flag, count, is_local, on_interface,
    rule_for,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETHERNET_HEADER: usize = 14;
/// The VLAN ID in a tag (the rest is priority and drop eligibility).
const VLAN_VID_MASK: u32 = 0x0fff;
/// `skb->pkt_type` of a frame to a MAC address that is not the device's.
const PACKET_OTHERHOST: u32 = 3;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_HEADER: usize = 20;
/// Type, code, checksum and four more bytes precede the quoted packet.
const ICMP_HEADER: usize = 8;
const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
/// Deepest header offset `packet_at` serves: Ethernet, IP with options, TCP.
const MAX_HEADERS: usize = 128;
/// IPv4 fragment offset bits: a non-first fragment has no TCP header.
const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The addresses and ports of a TCP packet, addresses as 16 bytes (IPv4
/// mapped, as `RULES` keys them), and where its headers start.
struct Flow {
    v4: bool,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    flags: u8,
    l3: usize,
    l4: usize,
}

/// What the packet is, for this program.
enum Packet {
    Tcp(Flow),
    /// An ICMP error about a TCP packet sent from this host: the quoted
    /// packet's flow, as this host sent it.
    IcmpError(Flow),
}

/// What a socket look-up found for a packet's 4-tuple.
enum Owner {
    Nobody,
    /// A connection (or a handshake) of this host.
    Connection,
    /// A connection of this host that has closed (TIME-WAIT): its late
    /// packets, or those of a new connection with its addresses and ports.
    TimeWait,
    /// A listener, which answered this ACK's handshake with a SYN cookie.
    CookieAck,
    /// A listener, and the packet is no cookie ACK.
    Listener,
}

#[classifier]
pub fn classify(ctx: TcContext) -> i32 {
    // Context fields first, in straight-line code (see `steer`).
    let skb = ctx.skb.skb;
    // SAFETY: the kernel passes a valid __sk_buff for the program's run.
    let (ifindex, protocol, mark, vlan_id, pkt_type) = unsafe {
        (
            (*skb).ifindex,
            (*skb).protocol,
            (*skb).mark,
            if (*skb).vlan_present != 0 {
                (*skb).vlan_tci & VLAN_VID_MASK
            } else {
                0
            },
            (*skb).pkt_type,
        )
    };

    // SAFETY: INTERFACES values are plain data the daemon wrote.
    let Some(config) = (unsafe { INTERFACES.get(&ifindex) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    // A tagged frame belongs to the VLAN device above this one, whose own
    // ingress (and `steer`'s interface check) sees it next. A priority tag
    // (VLAN ID 0, 802.1p) does not: the kernel takes that frame as
    // untagged, here.
    if vlan_id != 0 || classified_on_port(mark) {
        return TC_ACT_UNSPEC;
    }
    // A frame to another MAC is not this device's to route: a macvlan
    // above it that has that MAC (keepalived's `use_vmac`) receives it
    // next, through its own ingress and `steer`'s interface check. On a
    // bridge port, such frames are the ones the bridge forwards.
    if pkt_type == PACKET_OTHERHOST && config.flags & INTERFACE_BRIDGE_PORT == 0 {
        return TC_ACT_UNSPEC;
    }
    // A constant per branch: the verifier must bound packet offsets.
    let l3 = if config.l2_len == 0 {
        0
    } else {
        ETHERNET_HEADER
    };
    // skb->protocol is the EtherType in network byte order, in the low 16 bits.
    let marked = match read_packet(&ctx, l3, u16::from_be(protocol as u16)) {
        Some(Packet::Tcp(flow)) => tcp_verdict(&ctx, ifindex, &config, &flow),
        Some(Packet::IcmpError(quoted)) => icmp_verdict(&ctx, &quoted),
        None => None,
    };
    if let Some(counter) = marked {
        set_mark(&ctx, mark);
        count(counter);
        if config.flags & INTERFACE_BRIDGE_PORT != 0 {
            to_bridge(&ctx, &config);
        }
    }
    TC_ACT_UNSPEC
}

/// Whether (and as what) to mark a TCP packet.
#[inline(always)]
fn tcp_verdict(
    ctx: &TcContext,
    ifindex: u32,
    config: &InterfaceConfig,
    flow: &Flow,
) -> Option<Counter> {
    if let Some(rule) = rule_for(flow.dport, flow.dst)
        && rule.flags & RULE_ON_INTERFACES != 0
        && on_interface(ifindex, rule.rule_id)
    {
        if is_local(flow.dst) {
            // Delivered here anyway, and not the rule's (see `steer`).
            return None;
        }
        let draining = draining();
        if flow.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            return (!draining).then_some(Counter::MarkedIntercept);
        }
        return match owner(ctx, flow, !draining) {
            Owner::Connection | Owner::CookieAck => Some(Counter::MarkedIntercept),
            // While draining, new connections are forwarded (their SYN
            // was): one that reuses a closed one's ports is not its late
            // packets, and the TIME-WAIT would swallow it.
            Owner::TimeWait => (!draining).then_some(Counter::MarkedIntercept),
            Owner::Listener | Owner::Nobody => None,
        };
    }
    if config.flags & INTERFACE_REPLIES != 0
        && from_upstream(flow)
        && matches!(owner(ctx, flow, false), Owner::Connection | Owner::TimeWait)
    {
        return Some(Counter::MarkedReply);
    }
    if retaining()
        && flow.flags & (TCP_SYN | TCP_ACK) != TCP_SYN
        && matches!(owner(ctx, flow, false), Owner::Connection | Owner::TimeWait)
    {
        return Some(Counter::MarkedRetained);
    }
    None
}

/// An ICMP error is marked when the packet it quotes came from one of this
/// host's connections: the error is that connection's.
#[inline(always)]
fn icmp_verdict(ctx: &TcContext, quoted: &Flow) -> Option<Counter> {
    // The quoted packet left this host; a packet arriving for its socket
    // would carry the reverse flow.
    let arriving = Flow {
        v4: quoted.v4,
        src: quoted.dst,
        dst: quoted.src,
        sport: quoted.dport,
        dport: quoted.sport,
        flags: 0,
        l3: quoted.l3,
        l4: quoted.l4,
    };
    match owner(ctx, &arriving, false) {
        Owner::Connection | Owner::TimeWait => Some(Counter::MarkedIcmp),
        _ => None,
    }
}

#[inline(always)]
fn read_packet(ctx: &TcContext, l3: usize, ethertype: u16) -> Option<Packet> {
    let (proto, l4) = match ethertype {
        ETH_P_IP => {
            let header: [u8; IPV4_HEADER] = ctx.load(l3).ok()?;
            let fragment = u16::from_be_bytes([header[6], header[7]]);
            // A non-first fragment has no transport header. (TCP sends with
            // DF; a first fragment, if any, is taken as a whole packet.)
            if fragment & IP_OFFSET_MASK != 0 {
                return None;
            }
            (header[9], l3 + usize::from(header[0] & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let next: u8 = ctx.load(l3 + 6).ok()?;
            // Extension headers before the transport header are not followed:
            // such packets are left to the stack (no TCP stack sends them on
            // a plain connection).
            (next, l3 + IPV6_HEADER)
        }
        _ => return None,
    };
    match (ethertype, proto) {
        (_, IPPROTO_TCP) => read_tcp(ctx, ethertype == ETH_P_IP, l3, l4).map(Packet::Tcp),
        (ETH_P_IP, IPPROTO_ICMP) => {
            let icmp_type: u8 = ctx.load(l4).ok()?;
            // Destination unreachable (with fragmentation needed), time
            // exceeded, parameter problem: the errors TCP acts on.
            if !matches!(icmp_type, 3 | 11 | 12) {
                return None;
            }
            let inner = l4 + ICMP_HEADER;
            let header: [u8; IPV4_HEADER] = ctx.load(inner).ok()?;
            if header[9] != IPPROTO_TCP {
                return None;
            }
            let inner_l4 = inner + usize::from(header[0] & 0x0f) * 4;
            read_tcp(ctx, true, inner, inner_l4).map(Packet::IcmpError)
        }
        (ETH_P_IPV6, IPPROTO_ICMPV6) => {
            let icmp_type: u8 = ctx.load(l4).ok()?;
            // Destination unreachable, packet too big, time exceeded,
            // parameter problem.
            if !matches!(icmp_type, 1..=4) {
                return None;
            }
            let inner = l4 + ICMP_HEADER;
            let next: u8 = ctx.load(inner + 6).ok()?;
            if next != IPPROTO_TCP {
                return None;
            }
            read_tcp(ctx, false, inner, inner + IPV6_HEADER).map(Packet::IcmpError)
        }
        _ => None,
    }
}

/// The flow of the TCP packet (or quoted TCP packet) whose IP header is at
/// `l3` and TCP header at `l4`. An ICMP error quotes only the first eight
/// bytes of TCP: the ports and the sequence number, no flags.
#[inline(always)]
fn read_tcp(ctx: &TcContext, v4: bool, l3: usize, l4: usize) -> Option<Flow> {
    let (src, dst) = if v4 {
        let addrs: [u8; 8] = ctx.load(l3 + 12).ok()?;
        (
            RuleKey::mapped_v4([addrs[0], addrs[1], addrs[2], addrs[3]]),
            RuleKey::mapped_v4([addrs[4], addrs[5], addrs[6], addrs[7]]),
        )
    } else {
        let (src, dst) = (ctx.load(l3 + 8).ok()?, ctx.load(l3 + 24).ok()?);
        // An IPv6 packet to an IPv4-mapped address (IPv4 rules are keyed so)
        // is not for any rule: the stack routes it nowhere.
        if RuleKey::is_mapped_v4(&dst) {
            return None;
        }
        (src, dst)
    };
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    let flags = ctx.load::<u8>(l4 + 13).unwrap_or(0);
    Some(Flow {
        v4,
        src,
        dst,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        flags,
        l3,
        l4,
    })
}

/// Whether the packet comes from a server the daemon connects to: a listed
/// upstream server, or an address and port a gateway rule intercepts (an
/// original destination the daemon may pass connections on to).
#[inline(always)]
fn from_upstream(flow: &Flow) -> bool {
    UPSTREAM_SERVERS
        .get_ptr(RuleKey::new(flow.sport, flow.src))
        .is_some()
        || rule_for(flow.sport, flow.src).is_some_and(|rule| rule.flags & RULE_ON_INTERFACES != 0)
}

/// Which local socket owns the packet's 4-tuple. A listener is a wildcard one
/// on the destination port, or the daemon's own (the look-up runs `steer`):
/// never a connection of ours, but with `cookies`, an ACK it must see to
/// finish a handshake it answered with a SYN cookie.
#[inline(always)]
fn owner(ctx: &TcContext, flow: &Flow, cookies: bool) -> Owner {
    // SAFETY: zeroed is a valid bpf_sock_tuple (plain integers).
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if flow.v4 {
        tuple.__bindgen_anon_1.ipv4 = Tuple4 {
            saddr: u32::from_ne_bytes([flow.src[12], flow.src[13], flow.src[14], flow.src[15]]),
            daddr: u32::from_ne_bytes([flow.dst[12], flow.dst[13], flow.dst[14], flow.dst[15]]),
            sport: flow.sport.to_be(),
            dport: flow.dport.to_be(),
        };
        core::mem::size_of::<Tuple4>()
    } else {
        tuple.__bindgen_anon_1.ipv6 = Tuple6 {
            saddr: words(&flow.src),
            daddr: words(&flow.dst),
            sport: flow.sport.to_be(),
            dport: flow.dport.to_be(),
        };
        core::mem::size_of::<Tuple6>()
    };
    let flag = classify_lookup_flag();
    // SAFETY (both writes): this CPU's slot; tc and the look-up it makes
    // run on it without a switch in between.
    if let Some(flag) = flag {
        unsafe { *flag = 1 };
    }
    // SAFETY: the helper reads `size` bytes of `tuple` and returns a
    // reference-counted socket or null; every non-null one is released below.
    let sk: *mut bpf_sock = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb.cast(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if let Some(flag) = flag {
        unsafe { *flag = 0 };
    }
    if sk.is_null() {
        return Owner::Nobody;
    }
    // SAFETY: `sk` is a valid socket until released; `state` is readable on
    // every kind the lookup returns (full, request and timewait sockets).
    let state = unsafe { (*sk).state };
    let owner = if state == TCP_TIME_WAIT {
        Owner::TimeWait
    } else if state != TCP_LISTEN {
        Owner::Connection
    } else if cookies && cookie_ack(ctx, sk, flow) {
        Owner::CookieAck
    } else {
        Owner::Listener
    };
    // SAFETY: `sk` came from the lookup above and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    owner
}

/// Whether the packet is the ACK of a handshake `listener` answered with a
/// valid SYN cookie (under a SYN flood the listener keeps no state, so no
/// socket owns it yet).
#[inline(always)]
fn cookie_ack(ctx: &TcContext, listener: *mut bpf_sock, flow: &Flow) -> bool {
    let ip_len = if flow.v4 { IPV4_HEADER } else { IPV6_HEADER };
    let (Some(iph), Some(th)) = (
        packet_at(ctx, flow.l3, ip_len),
        packet_at(ctx, flow.l4, TCP_HEADER),
    ) else {
        return false;
    };
    // SAFETY: both pointers lie within the packet for the lengths passed
    // (checked by `packet_at`); the helper only reads them.
    let verdict = unsafe {
        bpf_tcp_check_syncookie(
            listener.cast(),
            iph.cast(),
            ip_len as u32,
            th.cast::<tcphdr>(),
            TCP_HEADER as u32,
        )
    };
    verdict == 0
}

/// A pointer to `len` bytes of the packet at `offset`, if the linear part of
/// the packet holds them.
#[inline(always)]
fn packet_at(ctx: &TcContext, offset: usize, len: usize) -> Option<*mut u8> {
    // The verifier accepts packet pointer arithmetic only with a bounded
    // offset; ours are at most a few headers deep.
    if offset > MAX_HEADERS {
        return None;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + len > end {
        return None;
    }
    Some((start + offset) as *mut u8)
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// Sets our bits of the packet mark, keeping the others.
#[inline(always)]
fn set_mark(ctx: &TcContext, mark: u32) {
    let (Some(&value), Some(&mask)) = (SETTINGS.get(MARK_VALUE), SETTINGS.get(MARK_MASK)) else {
        return;
    };
    ctx.set_mark((mark & !mask) | value);
}

#[inline(always)]
fn draining() -> bool {
    SETTINGS.get(DRAINING).is_some_and(|&flag| flag != 0)
}

#[inline(always)]
fn retaining() -> bool {
    SETTINGS.get(RETAINING).is_some_and(|&flag| flag != 0)
}

/// Whether the packet carries our mark already: `classify` took it on a port
/// of the bridge it now arrives on (no one else sets our bits on ingress).
#[inline(always)]
fn classified_on_port(mark: u32) -> bool {
    let (Some(&value), Some(&mask)) = (SETTINGS.get(MARK_VALUE), SETTINGS.get(MARK_MASK)) else {
        return false;
    };
    mark & mask == value
}

/// Addresses the frame to the bridge `config` names: the bridge then hands
/// it to this host's stack (and sets it `PACKET_HOST`) instead of forwarding
/// it. Bridge ports are Ethernet: the destination MAC is the first 6 bytes.
#[inline(always)]
fn to_bridge(ctx: &TcContext, config: &InterfaceConfig) {
    if ctx.store(0, &config.bridge_mac, 0).is_err() {
        count(Counter::BridgeRewriteFailed);
    }
}
