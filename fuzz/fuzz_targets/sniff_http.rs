//! `http::parse_request_head` and `sniff` on arbitrary bytes: no panic, and
//! the promises the callers rely on: a prefix never contradicts the whole,
//! at the size bound the answer is final, and a `HeadReader` or `Sniffer`
//! given the prefixes in turn answers as a fresh parse of each (the
//! `Sniffer` may wait where the parse refuses, never the other way).
#![no_main]

use l4proxy::sniff::{SniffResult, Sniffer, http, sniff};
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
    let mut reader = http::HeadReader::default();
    let mut sniffer = Sniffer::default();
    for cut in (1..=CUTS).map(|i| data.len() * i / (CUTS + 1)) {
        let prefix = http::parse_request_head(&data[..cut]);
        assert!(
            prefix == Ok(None) || prefix == whole,
            "prefix {cut}: {prefix:?}, whole: {whole:?}"
        );
        let read = reader.read(&data[..cut]);
        assert_eq!(read, prefix, "reader at {cut}");
        let prefix = sniff(&data[..cut]);
        assert!(
            matches!(prefix, SniffResult::NeedMore { .. }) || prefix == sniffed,
            "sniff prefix {cut}"
        );
        let looked = sniffer.look(&data[..cut]);
        assert!(
            matches!(looked, SniffResult::NeedMore { .. }) || looked == prefix,
            "sniffer at {cut}"
        );
        if matches!(read, Ok(Some(_))) {
            assert_eq!(looked, prefix, "a head's answer is never delayed");
        }
        if read != Ok(None) {
            break;
        }
    }
});
