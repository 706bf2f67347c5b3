//! Kernel programs of l4proxy. One program per module; the maps they share live here.
#![no_std]
#![no_main]

mod steer;

use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, PerCpuArray, SockMap},
};
use l4proxy_common::{Counter, MAX_RULE_ENTRIES, RuleKey, RuleValue};

/// Intercept rules, filled by the daemon from the policy: (port, address prefix)
/// to rule id. Port ranges arrive expanded; `ANY_PORT` entries are the wildcards.
#[map]
static RULES: LpmTrie<RuleKey, RuleValue> = LpmTrie::with_max_entries(MAX_RULE_ENTRIES, 0);

/// The daemon's listening sockets, one per family (`SOCKET_V4`, `SOCKET_V6`).
#[map]
static SOCKETS: SockMap = SockMap::with_max_entries(2, 0);

/// Named per-CPU counters, indexed by `Counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

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
