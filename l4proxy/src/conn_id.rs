//! Connection IDs: one per accepted connection, in its close log line and in
//! the PROXY v2 `UNIQUE_ID` sent upstream, so a backend's log and ours can be
//! joined. Unique across restarts: a random per-process half, then a counter.

use std::{
    fmt,
    hash::{BuildHasher, RandomState},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

/// 16 bytes, written as 32 lower-case hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionId([u8; 16]);

impl ConnectionId {
    /// The ID as it is logged and sent (ASCII hex: receivers log TLV values
    /// as strings).
    pub fn to_ascii(self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

/// Hands out the IDs of one daemon.
pub struct ConnectionIds {
    process: u64,
    next: AtomicU64,
}

impl ConnectionIds {
    pub fn new() -> Self {
        // RandomState is seeded from the OS's randomness; the time and pid
        // make two daemons differ even if it were not.
        let process = RandomState::new().hash_one((SystemTime::now(), std::process::id()));
        Self {
            process,
            next: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> ConnectionId {
        let count = self.next.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.process.to_be_bytes());
        id[8..].copy_from_slice(&count.to_be_bytes());
        ConnectionId(id)
    }
}

impl Default for ConnectionIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_hex_and_fit_the_unique_id_tlv() {
        let ids = ConnectionIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        let text = a.to_string();
        assert_eq!(text.len(), 32);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(a.to_ascii().len() <= crate::proxy_protocol::v2::UNIQUE_ID_MAX_LEN);
        // Another daemon's IDs differ in their first half.
        assert_ne!(ConnectionIds::new().next().0[..8], a.0[..8]);
    }
}
