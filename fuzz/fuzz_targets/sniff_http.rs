//! `http::parse_request_head` and `sniff` on arbitrary bytes: no panic, and
//! the promises the callers rely on: a prefix never contradicts the whole,
//! and at the size bound the answer is final.
#![no_main]

use l4proxy::sniff::{SniffResult, http, sniff};
use libfuzzer_sys::fuzz_target;

/// Enough cut points to catch a prefix that disagrees, few enough to keep
/// each run linear-ish.
const CUTS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let whole = http::parse_request_head(data);
    if data.len() >= http::MAX_HEAD_LEN {
        assert_ne!(whole, Ok(None), "no answer at the bound");
    }
    let sniffed = sniff(data);
    for cut in (1..=CUTS).map(|i| data.len() * i / (CUTS + 1)) {
        let prefix = http::parse_request_head(&data[..cut]);
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
