//! tc ingress program (attached with tcx): marks the packets the kernel must
//! deliver to this host although their destination is not one of its
//! addresses. The daemon's policy-routing rule (`fwmark` → a table whose only
//! route is `local default dev lo`) then delivers them locally, where
//! `sk_lookup` (new connections) or the socket table (established ones) finds
//! their socket. It replaces both iptables rules of the classic TPROXY recipe:
//!
//! - `-j TPROXY`: a packet arriving on an interface that a gateway rule lists,
//!   to a destination that rule intercepts (the `RULES` trie, as in `steer`);
//! - `-m socket -j MARK`: a packet from an upstream server to a local
//!   socket that is not listening, that is, a reply to one of the daemon's
//!   upstream connections made from a client's address (transparent bind).
//!
//! While the daemon drains, a gateway rule's packets are marked only if they
//! belong to a connection the daemon already has (a local socket): new
//! connections are forwarded to their destination as if l4proxy were not
//! there, and open ones keep working until they close.
//!
//! Everything else is left alone. The program never drops: it returns
//! `TC_ACT_UNSPEC` (tcx's "next"), so programs after it and the stack decide.

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, TC_ACT_UNSPEC, bpf_sock, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6,
    },
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use l4proxy_common::{
    Counter, DRAINING, INTERFACE_REPLIES, MARK_MASK, MARK_VALUE, RULE_ON_INTERFACES, RuleKey,
};

use crate::{INTERFACES, SETTINGS, UPSTREAM_SERVERS, count, on_interface, rule_for};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_LISTEN: u32 = 10;
/// IPv4 fragment offset bits: a non-first fragment has no TCP header.
const IP_OFFSET_MASK: u16 = 0x1fff;

/// The addresses and ports of a TCP packet, addresses as 16 bytes (IPv4
/// mapped, as `RULES` keys them).
struct Flow {
    v4: bool,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
}

#[classifier]
pub fn classify(ctx: TcContext) -> i32 {
    // Context fields first, in straight-line code (see `steer`).
    let skb = ctx.skb.skb;
    // SAFETY: the kernel passes a valid __sk_buff for the program's run.
    let (ifindex, protocol, mark) = unsafe { ((*skb).ifindex, (*skb).protocol, (*skb).mark) };

    // SAFETY: INTERFACES values are plain data the daemon wrote.
    let Some(config) = (unsafe { INTERFACES.get(&ifindex) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    // skb->protocol is the EtherType in network byte order, in the low 16 bits.
    let Some(flow) = read_flow(&ctx, config.l2_len as usize, u16::from_be(protocol as u16)) else {
        return TC_ACT_UNSPEC;
    };

    if let Some(rule) = rule_for(flow.dport, flow.dst)
        && rule.flags & RULE_ON_INTERFACES != 0
        && on_interface(ifindex, rule.rule_id)
        && (!draining() || to_local_socket(&ctx, &flow))
    {
        set_mark(&ctx, mark);
        count(Counter::MarkedIntercept);
    } else if config.flags & INTERFACE_REPLIES != 0
        && from_upstream(&flow)
        && to_local_socket(&ctx, &flow)
    {
        set_mark(&ctx, mark);
        count(Counter::MarkedReply);
    }
    TC_ACT_UNSPEC
}

fn read_flow(ctx: &TcContext, l3: usize, ethertype: u16) -> Option<Flow> {
    let (v4, src, dst, l4) = match ethertype {
        ETH_P_IP => {
            let header: [u8; 20] = ctx.load(l3).ok()?;
            let fragment = u16::from_be_bytes([header[6], header[7]]);
            if header[9] != IPPROTO_TCP || fragment & IP_OFFSET_MASK != 0 {
                return None;
            }
            let ihl = usize::from(header[0] & 0x0f) * 4;
            (
                true,
                RuleKey::mapped_v4([header[12], header[13], header[14], header[15]]),
                RuleKey::mapped_v4([header[16], header[17], header[18], header[19]]),
                l3 + ihl,
            )
        }
        ETH_P_IPV6 => {
            let header: [u8; 40] = ctx.load(l3).ok()?;
            // Extension headers before TCP are not followed: such packets are
            // left to the stack (no TCP stack sends them on a plain connection).
            if header[6] != IPPROTO_TCP {
                return None;
            }
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&header[8..24]);
            dst.copy_from_slice(&header[24..40]);
            (false, src, dst, l3 + 40)
        }
        _ => return None,
    };
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    Some(Flow {
        v4,
        src,
        dst,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
    })
}

/// Whether the packet comes from a server the daemon connects to: a listed
/// upstream server, or an address and port a gateway rule intercepts (an
/// original destination the daemon may pass connections on to).
fn from_upstream(flow: &Flow) -> bool {
    UPSTREAM_SERVERS
        .get_ptr(RuleKey::new(flow.sport, flow.src))
        .is_some()
        || rule_for(flow.sport, flow.src).is_some_and(|rule| rule.flags & RULE_ON_INTERFACES != 0)
}

/// Whether a local socket other than a listener owns the packet's 4-tuple. A
/// listener would be any wildcard one on the destination port (or the
/// daemon's own, through `steer`), not a connection of ours.
fn to_local_socket(ctx: &TcContext, flow: &Flow) -> bool {
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
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a valid socket until released; `state` is readable on
    // every kind the lookup returns (full, request and timewait sockets).
    let state = unsafe { (*sk).state };
    // SAFETY: `sk` came from the lookup above and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    state != TCP_LISTEN
}

fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// Sets our bits of the packet mark, keeping the others.
fn set_mark(ctx: &TcContext, mark: u32) {
    let (Some(&value), Some(&mask)) = (SETTINGS.get(MARK_VALUE), SETTINGS.get(MARK_MASK)) else {
        return;
    };
    ctx.set_mark((mark & !mask) | value);
}

fn draining() -> bool {
    SETTINGS.get(DRAINING).is_some_and(|&flag| flag != 0)
}
