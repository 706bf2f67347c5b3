//! Kernel programs of l4proxy. One program per module; the maps they share live here.
#![no_std]
#![no_main]

mod classify;
mod steer;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, SockMap, lpm_trie::Key},
};
use l4proxy_common::{
    ANY_PORT_CLASS, CLASS_HALF, ClassKey, Counter, InterfaceConfig, InterfaceRuleKey,
    MAX_INTERFACE_RULES, MAX_INTERFACES, MAX_LOCAL_ADDRS, MAX_RULE_ENTRIES, MAX_UPSTREAM_SERVERS,
    PORT_COUNT, RULE_KEY_FIXED_BITS, RuleKey, RuleValue, SETTINGS_COUNT, VIA_BRIDGE_PORT,
};

/// Intercept rules, filled by the daemon from the policy: (port class,
/// address prefix) to rule. `ANY_PORT_CLASS` entries are the wildcards (in
/// each half of the class numbers: see `CLASS_HALF`).
#[map]
static RULES: LpmTrie<ClassKey, RuleValue> = LpmTrie::with_max_entries(MAX_RULE_ENTRIES, 0);

/// Each destination port's class (indexed by port), filled by the daemon:
/// ports the policy's port specs cover alike share a class, so `RULES` holds
/// one entry per prefix for a whole port range.
#[map]
static PORT_CLASSES: Array<u32> = Array::with_max_entries(PORT_COUNT, 0);

/// The daemon's listening sockets, one per family (`SOCKET_V4`, `SOCKET_V6`).
#[map]
static SOCKETS: SockMap = SockMap::with_max_entries(2, 0);

/// (interface, rule) pairs of gateway rules: where each may intercept.
#[map]
static INTERFACE_RULES: HashMap<InterfaceRuleKey, u8> =
    HashMap::with_max_entries(MAX_INTERFACE_RULES, 0);

/// The interfaces `classify` is attached to, by ifindex.
#[map]
static INTERFACES: HashMap<u32, InterfaceConfig> = HashMap::with_max_entries(MAX_INTERFACES, 0);

/// Upstream servers (port, address), whose packets may be replies to one of
/// the daemon's transparent sockets.
#[map]
static UPSTREAM_SERVERS: HashMap<RuleKey, u8> = HashMap::with_max_entries(MAX_UPSTREAM_SERVERS, 0);

/// This host's own addresses (IPv4 mapped), kept current by the daemon: a
/// gateway rule takes forwarded connections, not those to the host itself.
#[map]
static LOCAL_ADDRS: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// Settings the daemon writes: the packet mark that routes a packet to local
/// delivery (`MARK_VALUE`, `MARK_MASK`), whether it drains (`DRAINING`), and
/// whether connections of a replaced policy are still open (`RETAINING`).
#[map]
static SETTINGS: Array<u32> = Array::with_max_entries(SETTINGS_COUNT, 0);

/// Named per-CPU counters, indexed by `Counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Set on a CPU while `classify` looks up a packet's socket there: the
/// look-up runs `steer`, whose counters and log are for connections, not
/// for these look-ups (every packet of a forwarded flow would count).
#[map]
static CLASSIFY_LOOKUP: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Whether `steer` runs inside `classify`'s socket look-up.
fn in_classify_lookup() -> bool {
    CLASSIFY_LOOKUP.get(0).is_some_and(|set| *set != 0)
}

/// This CPU's `CLASSIFY_LOOKUP` flag, for `classify` to set around its
/// look-up (one map access for both writes).
fn classify_lookup_flag() -> Option<*mut u32> {
    CLASSIFY_LOOKUP.get_ptr_mut(0)
}

/// A full-length `RULES` key: port and all 128 address bits.
const FULL_PREFIX: u32 = RULE_KEY_FIXED_BITS + 128;

/// The rule a connection to (`port`, `addr`) belongs to: the better of the
/// longest-prefix matches for the port's class and for the wildcard class
/// (the daemon ranks each entry, so this is the same rule it picks itself).
fn rule_for(port: u16, addr: [u8; 16]) -> Option<RuleValue> {
    let class = PORT_CLASSES
        .get(u32::from(port))
        .copied()
        .unwrap_or(ANY_PORT_CLASS);
    let exact = RULES
        .get(&Key::new(FULL_PREFIX, ClassKey::new(class, addr)))
        .copied();
    // The wildcard class of the half the port's class is in.
    let any = ANY_PORT_CLASS | (class & CLASS_HALF);
    let wildcard = RULES
        .get(&Key::new(FULL_PREFIX, ClassKey::new(any, addr)))
        .copied();
    match (exact, wildcard) {
        (Some(exact), Some(wildcard)) if wildcard.rank > exact.rank => Some(wildcard),
        (Some(exact), _) => Some(exact),
        (None, wildcard) => wildcard,
    }
}

/// Whether `addr` is one of this host's own addresses.
fn is_local(addr: [u8; 16]) -> bool {
    LOCAL_ADDRS.get(&Key::new(128, addr)).is_some()
}

/// Whether gateway rule `rule_id` lists interface `ifindex`.
fn on_interface(ifindex: u32, rule_id: u32) -> bool {
    INTERFACE_RULES
        .get_ptr(InterfaceRuleKey { ifindex, rule_id })
        .is_some()
}

/// Whether gateway rule `rule_id` intercepts on a port of bridge `ifindex`
/// (see `VIA_BRIDGE_PORT`).
fn on_bridge_port(ifindex: u32, rule_id: u32) -> bool {
    INTERFACE_RULES
        .get_ptr(InterfaceRuleKey {
            ifindex,
            rule_id: rule_id | VIA_BRIDGE_PORT,
        })
        .is_some()
}

fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
