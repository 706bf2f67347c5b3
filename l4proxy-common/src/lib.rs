//! Map keys, values and constants shared by the kernel programs and the daemon.
//!
//! Everything here is `#[repr(C)]` and `no_std` so that both sides agree on the
//! byte layout of the BPF maps.
#![no_std]

/// Index of the IPv4 listener in the `SOCKETS` sockmap.
pub const SOCKET_V4: u32 = 0;
/// Index of the IPv6 listener in the `SOCKETS` sockmap.
pub const SOCKET_V6: u32 = 1;

/// Port value that stands for "every port" in a [`RuleKey`].
pub const ANY_PORT: u16 = 0;

/// Bits of a [`RuleKey`] before the address: the port and the padding are always
/// matched in full, so an LPM look-up only ever varies the address prefix.
pub const RULE_KEY_FIXED_BITS: u32 = 32;

/// Most entries the `RULES` trie holds (port ranges are expanded into it).
pub const MAX_RULE_ENTRIES: u32 = 262_144;

/// Data part of the `RULES` LPM-trie key: destination port, then the destination
/// address as 16 bytes (IPv4 as an IPv4-mapped IPv6 address, so one trie serves
/// both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleKey {
    /// Destination port in network byte order; [`ANY_PORT`] for a wildcard.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}

impl RuleKey {
    pub const fn new(port: u16, addr: [u8; 16]) -> Self {
        Self {
            port: port.to_be_bytes(),
            _pad: [0; 2],
            addr,
        }
    }

    /// IPv4 address in network byte order as its IPv4-mapped IPv6 form.
    pub const fn mapped_v4(octets: [u8; 4]) -> [u8; 16] {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
        ]
    }
}

/// Value of the `RULES` trie: which intercept rule matched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleValue {
    pub rule_id: u32,
}

/// Named per-CPU counters of the `sk_lookup` program (index into `COUNTERS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connection matched a rule and was assigned to the proxy's listener.
    Steered = 0,
    /// A connection matched no rule and was left to the normal socket lookup.
    Passed = 1,
    /// A connection matched a rule but the listener for its family was missing.
    NoSocket = 2,
    /// The kernel refused to assign the listener (`bpf_sk_assign` failed).
    AssignFailed = 3,
}

impl Counter {
    pub const ALL: [Counter; 4] = [
        Counter::Steered,
        Counter::Passed,
        Counter::NoSocket,
        Counter::AssignFailed,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Steered => "steered",
            Counter::Passed => "passed",
            Counter::NoSocket => "dropped_no_socket",
            Counter::AssignFailed => "dropped_assign_failed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data without padding holes or pointers.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleValue {}
}
