//! `tls::parse_client_hello` and `sniff` on arbitrary bytes: no panic, no
//! unbounded allocation (libFuzzer's -rss_limit_mb), and the promises the
//! callers rely on: a prefix never contradicts the whole, a prefix waits
//! for more than it has and, if the whole is a ClientHello, for no more than
//! the whole, and at the size bound the answer is final.
#![no_main]

use l4proxy::sniff::{
    SniffResult, sniff,
    tls::{self, Hello},
};
use libfuzzer_sys::fuzz_target;

/// Enough cut points to catch a prefix that disagrees, few enough to keep
/// each run linear-ish.
const CUTS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let whole = tls::parse_client_hello(data);
    if data.len() >= tls::MAX_CLIENT_HELLO_LEN {
        assert!(
            !matches!(whole, Ok(Hello::Partial { .. })),
            "no answer at the bound"
        );
    }
    let sniffed = sniff(data);
    for cut in (1..=CUTS).map(|i| data.len() * i / (CUTS + 1)) {
        let prefix = tls::parse_client_hello(&data[..cut]);
        match prefix {
            Ok(Hello::Partial { until }) => {
                assert!(until > cut, "prefix {cut} waits for {until}");
                // No answer comes before `until`: one byte less is a
                // prefix still (a valid hello's answer comes at its end).
                if let Ok(Hello::Parsed(_)) = whole {
                    assert!(until <= data.len(), "prefix {cut} waits past the input");
                    assert!(
                        matches!(
                            tls::parse_client_hello(&data[..until - 1]),
                            Ok(Hello::Partial { .. })
                        ),
                        "prefix {cut} waits for {until}, past the hello's end"
                    );
                }
            }
            _ => assert_eq!(prefix, whole, "prefix {cut}"),
        }
        let prefix = sniff(&data[..cut]);
        assert!(
            matches!(prefix, SniffResult::NeedMore { .. }) || prefix == sniffed,
            "sniff prefix {cut}"
        );
    }
});
