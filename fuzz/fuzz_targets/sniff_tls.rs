//! `tls::parse_client_hello` and `sniff` on arbitrary bytes: no panic, no
//! unbounded allocation (libFuzzer's -rss_limit_mb), and the promises the
//! callers rely on: a prefix never contradicts the whole, and at the size
//! bound the answer is final.
#![no_main]

use l4proxy::sniff::{SniffResult, sniff, tls};
use libfuzzer_sys::fuzz_target;

/// Enough cut points to catch a prefix that disagrees, few enough to keep
/// each run linear-ish.
const CUTS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let whole = tls::parse_client_hello(data);
    if data.len() >= tls::MAX_CLIENT_HELLO_LEN {
        assert_ne!(whole, Ok(None), "no answer at the bound");
    }
    let sniffed = sniff(data);
    for cut in (1..=CUTS).map(|i| data.len() * i / (CUTS + 1)) {
        let prefix = tls::parse_client_hello(&data[..cut]);
        assert!(
            prefix == Ok(None) || prefix == whole,
            "prefix {cut}: {prefix:?}, whole: {whole:?}"
        );
        let prefix = sniff(&data[..cut]);
        assert!(
            prefix == SniffResult::NeedMore || prefix == sniffed,
            "sniff prefix {cut}"
        );
    }
});
