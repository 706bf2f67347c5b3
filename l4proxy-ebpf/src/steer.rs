//! `sk_lookup` program: steers new TCP connections whose destination matches an
//! intercept rule into the daemon's listener for that family.
//!
//! Pass what isn't ours; drop and count what is ours but broken (after
//! cloudflare/tubular): no rule → `SK_PASS` so the normal socket lookup runs; a
//! rule whose listener is missing → `SK_DROP`, because handing the SYN to whatever
//! else listens on that address would silently bypass the policy.

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    maps::lpm_trie::Key,
    programs::SkLookupContext,
};
use l4proxy_common::{ANY_PORT, Counter, RULE_KEY_FIXED_BITS, RuleKey, SOCKET_V4, SOCKET_V6};

use crate::{RULES, SOCKETS, count};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const ENOENT: i32 = 2;

/// A full-length key: port and all 128 address bits.
const FULL_PREFIX: u32 = RULE_KEY_FIXED_BITS + 128;

#[sk_lookup]
pub fn steer(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid bpf_sk_lookup for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (socket, addr) = match lookup.family {
        // local_ip4 and local_ip6 hold network-byte-order words.
        AF_INET => (
            SOCKET_V4,
            RuleKey::mapped_v4(lookup.local_ip4.to_ne_bytes()),
        ),
        AF_INET6 => (SOCKET_V6, ip6_bytes(lookup.local_ip6)),
        _ => return SK_PASS,
    };
    // local_port is in host byte order.
    let port = lookup.local_port as u16;

    let exact = Key::new(FULL_PREFIX, RuleKey::new(port, addr));
    let wildcard = Key::new(FULL_PREFIX, RuleKey::new(ANY_PORT, addr));
    if RULES.get(&exact).is_none() && RULES.get(&wildcard).is_none() {
        count(Counter::Passed);
        return SK_PASS;
    }

    match SOCKETS.redirect_sk_lookup(&ctx, socket, 0) {
        Ok(()) => {
            count(Counter::Steered);
            SK_PASS
        }
        Err(err) if err == -ENOENT => {
            count(Counter::NoSocket);
            SK_DROP
        }
        Err(_) => {
            count(Counter::AssignFailed);
            SK_DROP
        }
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
