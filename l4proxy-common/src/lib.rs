//! Map keys, values and constants shared by the kernel programs and the daemon.
//!
//! Everything here is `#[repr(C)]` and `no_std` so that both sides agree on the
//! byte layout of the BPF maps.
#![no_std]

/// Index of the IPv4 listener in the `SOCKETS` sockmap.
pub const SOCKET_V4: u32 = 0;
/// Index of the IPv6 listener in the `SOCKETS` sockmap.
pub const SOCKET_V6: u32 = 1;

/// The port class of `*` port specs in a [`ClassKey`]; also the class
/// `PORT_CLASSES` gives a port no spec names, whose only look-up is then the
/// wildcard one. In the kernel's keys and `PORT_CLASSES`, as every class, it
/// carries its half ([`CLASS_HALF`] or 0).
pub const ANY_PORT_CLASS: u32 = 0;

/// The high bit of a port class: the running policy's classes, its
/// wildcard class among them, are in one half, and a policy replacing them
/// with other classes is written in the other, so that each port moves at
/// once from complete old entries to complete new ones (`PORT_CLASSES`
/// says which half a port's look-ups, the wildcard one too, are in).
pub const CLASS_HALF: u32 = 1 << 31;

/// Entries of `PORT_CLASSES`: one per port.
pub const PORT_COUNT: u32 = 65_536;

/// Bits of a [`ClassKey`] before the address: the port class is always
/// matched in full, so an LPM look-up only ever varies the address prefix.
pub const RULE_KEY_FIXED_BITS: u32 = 32;

/// Most entries the `RULES` trie holds: one per (port class, prefix), and a
/// reload holds the old and the new policy's for a moment. An LPM trie is
/// not preallocated: entries not used cost nothing.
pub const MAX_RULE_ENTRIES: u32 = 1_048_576;

/// Most (interface, rule) pairs in `INTERFACE_RULES`.
pub const MAX_INTERFACE_RULES: u32 = 65_536;

/// Most interfaces the `classify` program is attached to.
pub const MAX_INTERFACES: u32 = 4_096;

/// Most upstream servers in `UPSTREAM_SERVERS`.
pub const MAX_UPSTREAM_SERVERS: u32 = 65_536;

/// Most prefixes in `LOCAL_ADDRS`: the host's addresses and every prefix
/// the rules make local, which may be as many as the rules' entries (an LPM
/// trie allocates only what it holds).
pub const MAX_LOCAL_ADDRS: u32 = MAX_RULE_ENTRIES + 16_384;

/// Data part of the `RULES` LPM-trie key: a port class (big-endian; see
/// `PORT_CLASSES`), then the destination address as 16 bytes (IPv4 as an
/// IPv4-mapped IPv6 address, so one trie serves both families). Keyed by
/// class, not port, a port range is one entry per prefix however wide it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClassKey {
    pub class: [u8; 4],
    pub addr: [u8; 16],
}

impl ClassKey {
    pub const fn new(class: u32, addr: [u8; 16]) -> Self {
        Self {
            class: class.to_be_bytes(),
            addr,
        }
    }
}

/// Key of `UPSTREAM_SERVERS`: a server's port (big-endian), then its address
/// as in a [`ClassKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
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

    /// Whether `addr` is IPv4-mapped (`::ffff:0:0/96`): the form IPv4 rules
    /// are keyed by, so never an IPv6 packet's or connection's own (one
    /// sent there goes nowhere without l4proxy; with, it would match IPv4
    /// rules).
    pub const fn is_mapped_v4(addr: &[u8; 16]) -> bool {
        let mut i = 0;
        while i < 10 {
            if addr[i] != 0 {
                return false;
            }
            i += 1;
        }
        addr[10] == 0xff && addr[11] == 0xff
    }
}

#[cfg(test)]
mod tests {
    use super::RuleKey;

    #[test]
    fn ipv4_mapped_addresses_are_told_apart() {
        assert!(RuleKey::is_mapped_v4(&RuleKey::mapped_v4([192, 0, 2, 10])));
        let mut v6 = [0u8; 16];
        v6[0] = 0x20;
        v6[1] = 0x01;
        v6[10] = 0xff;
        v6[11] = 0xff;
        assert!(!RuleKey::is_mapped_v4(&v6), "2001::ffff:...");
        // IPv4-compatible (::a.b.c.d) and ::ffff:0:a.b.c.d (SIIT) are not.
        let mut compatible = [0u8; 16];
        compatible[15] = 1;
        assert!(!RuleKey::is_mapped_v4(&compatible));
        let mut siit = [0u8; 16];
        siit[8] = 0xff;
        siit[9] = 0xff;
        assert!(!RuleKey::is_mapped_v4(&siit));
    }
}

/// [`RuleValue::flags`]: the rule takes only connections that arrive on the
/// interfaces listed for it in `INTERFACE_RULES` (gateway interception).
pub const RULE_ON_INTERFACES: u32 = 1;

/// Value of the `RULES` trie: which intercept rule matched, and how it applies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleValue {
    pub rule_id: u32,
    /// [`RULE_ON_INTERFACES`] or 0.
    pub flags: u32,
    /// The rule's precedence for this entry, greater wins: the kernel looks up
    /// the port's class and the wildcard class separately and keeps the higher.
    pub rank: u64,
}

/// Set in [`InterfaceRuleKey::rule_id`]: the pair names a bridge one of whose
/// ports the rule intercepts on. `classify` runs on the port; `steer` sees
/// the connection arrive on the bridge, and takes it only with this pair (a
/// plain pair for the bridge would also take connections routed through it).
/// Rule ids stay far below this bit (`MAX_RULE_ENTRIES`).
pub const VIA_BRIDGE_PORT: u32 = 1 << 31;

/// Set in the rule ids ([`RuleValue::rule_id`], [`InterfaceRuleKey::rule_id`])
/// of every other policy whose gateway rules list interfaces differently
/// from the running one's: during a reload both policies' pairs are in the
/// map, and a rule id names one policy's rule, never both.
pub const RULE_HALF: u32 = 1 << 30;

/// Key of `INTERFACE_RULES`: a gateway rule intercepts on this interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InterfaceRuleKey {
    pub ifindex: u32,
    pub rule_id: u32,
}

/// [`InterfaceConfig::flags`]: mark packets of a local transparent socket
/// (replies to l4proxy's upstream connections made from a client's address).
pub const INTERFACE_REPLIES: u32 = 1;

/// [`InterfaceConfig::flags`]: the interface is a port of a bridge. A packet
/// `classify` marks there gets the bridge's MAC address as its destination,
/// so that the bridge passes it up to this host's stack instead of
/// forwarding it to the client's or the router's MAC.
pub const INTERFACE_BRIDGE_PORT: u32 = 2;

/// Value of `INTERFACES`, keyed by ifindex: how `classify` reads packets there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// Bytes before the IP header at tc ingress: 14 on Ethernet, 0 on layer-3
    /// devices (tun, WireGuard).
    pub l2_len: u32,
    /// [`INTERFACE_REPLIES`], [`INTERFACE_BRIDGE_PORT`], or 0.
    pub flags: u32,
    /// With [`INTERFACE_BRIDGE_PORT`]: the bridge's MAC address.
    pub bridge_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Index into the `SETTINGS` array: the value `classify` sets in `skb->mark`.
pub const MARK_VALUE: u32 = 0;
/// Index into the `SETTINGS` array: the bits of `skb->mark` that are ours.
pub const MARK_MASK: u32 = 1;
/// Index into the `SETTINGS` array: non-zero while the daemon drains, when
/// gateway rules take no new connections but keep their open ones.
pub const DRAINING: u32 = 2;
/// Index into the `SETTINGS` array: non-zero while connections opened under
/// a replaced policy are open; their packets are marked by the socket that
/// owns them, whatever the rules now say.
pub const RETAINING: u32 = 3;
/// Entries of the `SETTINGS` array.
pub const SETTINGS_COUNT: u32 = 4;

/// Named per-CPU counters of the kernel programs (index into `COUNTERS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connection matched a rule and was assigned to the proxy's listener.
    Steered = 0,
    /// A socket lookup matched no rule and was left to the normal lookup.
    Passed = 1,
    /// A connection matched a rule but the listener for its family was missing.
    NoSocket = 2,
    /// The kernel refused to assign the listener (`bpf_sk_assign` failed).
    AssignFailed = 3,
    /// A connection matched a gateway rule but arrived on an interface the
    /// rule does not list, and was left to the normal lookup.
    OtherInterface = 4,
    /// `classify` marked a packet of an intercepted flow for local delivery.
    MarkedIntercept = 5,
    /// `classify` marked a reply to one of l4proxy's transparent sockets.
    MarkedReply = 6,
    /// `classify` marked an ICMP error about one of l4proxy's connections
    /// (path MTU, unreachable), which would otherwise be forwarded.
    MarkedIcmp = 7,
    /// A connection matched a gateway rule but is to one of this host's own
    /// addresses (not forwarded traffic), and was left to the normal lookup.
    PassedLocal = 8,
    /// `classify` marked a packet of a connection opened under a policy a
    /// reload replaced.
    MarkedRetained = 9,
    /// `classify` marked a packet on a bridge port but could not address it
    /// to the bridge: the bridge forwards it as if l4proxy were not there.
    BridgeRewriteFailed = 10,
}

impl Counter {
    pub const ALL: [Counter; 11] = [
        Counter::Steered,
        Counter::Passed,
        Counter::NoSocket,
        Counter::AssignFailed,
        Counter::OtherInterface,
        Counter::MarkedIntercept,
        Counter::MarkedReply,
        Counter::MarkedIcmp,
        Counter::PassedLocal,
        Counter::MarkedRetained,
        Counter::BridgeRewriteFailed,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Steered => "steered",
            Counter::Passed => "passed",
            Counter::NoSocket => "dropped_no_socket",
            Counter::AssignFailed => "dropped_assign_failed",
            Counter::OtherInterface => "passed_other_interface",
            Counter::MarkedIntercept => "marked_intercept",
            Counter::MarkedReply => "marked_reply",
            Counter::MarkedIcmp => "marked_icmp",
            Counter::PassedLocal => "passed_local",
            Counter::MarkedRetained => "marked_retained",
            Counter::BridgeRewriteFailed => "bridge_rewrite_failed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data without padding holes or pointers.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClassKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InterfaceRuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InterfaceConfig {}
}
