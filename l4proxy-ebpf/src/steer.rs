//! `sk_lookup` program: steers new TCP connections whose destination matches an
//! intercept rule into the daemon's listener for that family.
//!
//! Pass what isn't ours; drop and count what is ours but broken (after
//! cloudflare/tubular): no rule → `SK_PASS` so the normal socket lookup runs; a
//! rule whose listener is missing → `SK_DROP`, because handing the SYN to whatever
//! else listens on that address would silently bypass the policy. (For TCP the
//! failed lookup makes the kernel answer the SYN with a reset.)
//!
//! A gateway rule (one with `interfaces`) takes only connections that arrived
//! on one of its interfaces: `classify` delivered them locally for exactly
//! that reason, and the same destination reached any other way (from this
//! host, from the server side) is not the rule's. Nor is a connection to one
//! of this host's own addresses: it is not forwarded traffic.
//!
//! A connection `classify` took on a bridge port arrives on the bridge: the
//! rule's `VIA_BRIDGE_PORT` pair for that bridge says it is the rule's.
//!
//! The two failures are rare and worth a line in the daemon's debug log
//! (aya-log). The daemon sets the programs' log level when it loads them; with
//! debug off the level is a constant of a frozen map, so the verifier removes
//! the logging code from the loaded program.

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use aya_log_ebpf::debug;
use l4proxy_common::{Counter, RULE_HALF, RULE_ON_INTERFACES, RuleKey, SOCKET_V4, SOCKET_V6};

use crate::{SOCKETS, count, in_classify_lookup, is_local, on_bridge_port, on_interface, rule_for};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const ENOENT: i32 = 2;

/// Reads one field of the `sk_lookup` context with a load of its own.
macro_rules! read_field {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: the kernel passes a valid bpf_sk_lookup for the program's run.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx).$($field)+)) }
    };
}

#[sk_lookup]
pub fn steer(ctx: SkLookupContext) -> u32 {
    // Every context field is read here, in straight-line code before any
    // branch: the verifier allows context loads only at a constant offset from
    // the context pointer, and loads inside branches let LLVM share one
    // `ctx + offset` register between paths ("dereference of modified ctx ptr").
    let lookup = ctx.lookup;
    let protocol = read_field!(lookup, protocol);
    let family = read_field!(lookup, family);
    // local_ip4 and local_ip6 hold network-byte-order words; local_port is in
    // host byte order.
    let ip4 = read_field!(lookup, local_ip4);
    let ip6 = [
        read_field!(lookup, local_ip6[0]),
        read_field!(lookup, local_ip6[1]),
        read_field!(lookup, local_ip6[2]),
        read_field!(lookup, local_ip6[3]),
    ];
    let port = read_field!(lookup, local_port) as u16;
    let ifindex = read_field!(lookup, ingress_ifindex);

    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // Inside `classify`'s look-up the decision stands (it tells whose the
    // packet is), but it is not a connection to count or log.
    let counted = !in_classify_lookup();
    let count = |counter| {
        if counted {
            count(counter);
        }
    };
    let (socket, addr) = match family {
        AF_INET => (SOCKET_V4, RuleKey::mapped_v4(ip4.to_ne_bytes())),
        AF_INET6 => {
            let addr = ip6_bytes(ip6);
            // IPv4 rules are keyed IPv4-mapped: an IPv6 connection to such an
            // address must not match them.
            if RuleKey::is_mapped_v4(&addr) {
                count(Counter::Passed);
                return SK_PASS;
            }
            (SOCKET_V6, addr)
        }
        _ => return SK_PASS,
    };

    let Some(rule) = rule_for(port, addr) else {
        count(Counter::Passed);
        return SK_PASS;
    };
    if rule.flags & RULE_ON_INTERFACES != 0 {
        if !on_interface(ifindex, rule.rule_id) && !on_bridge_port(ifindex, rule.rule_id) {
            count(Counter::OtherInterface);
            return SK_PASS;
        }
        if is_local(addr) {
            count(Counter::PassedLocal);
            return SK_PASS;
        }
    }

    match SOCKETS.redirect_sk_lookup(&ctx, socket, 0) {
        Ok(()) => {
            count(Counter::Steered);
            SK_PASS
        }
        Err(err) => {
            let counter = if err == -ENOENT {
                Counter::NoSocket
            } else {
                Counter::AssignFailed
            };
            count(counter);
            if counted {
                log_refused(
                    &ctx,
                    counter,
                    rule.rule_id & !RULE_HALF,
                    family,
                    ip4,
                    addr,
                    port,
                    err,
                );
            }
            SK_DROP
        }
    }
}

/// One debug line for a connection a rule took but no listener could: the
/// counter says how often, this says which.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn log_refused(
    ctx: &SkLookupContext,
    counter: Counter,
    rule_id: u32,
    family: u32,
    ip4: u32,
    addr: [u8; 16],
    port: u16,
    err: i32,
) {
    let why = match counter {
        Counter::NoSocket => "no listener in the socket map",
        _ => "socket assignment failed",
    };
    if family == AF_INET {
        debug!(
            ctx,
            "refused {:i}:{} (rule {}): {}, error {}",
            u32::from_be(ip4),
            port,
            rule_id,
            why,
            err
        );
    } else {
        debug!(
            ctx,
            "refused [{:i}]:{} (rule {}): {}, error {}", addr, port, rule_id, why, err
        );
    }
}

fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}
