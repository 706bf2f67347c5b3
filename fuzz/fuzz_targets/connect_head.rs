//! `connect_head::parse` on arbitrary bytes: no panic, and the promises the
//! CONNECT listener relies on: a prefix never contradicts the whole (it gives
//! "need more", the same request or the same error), at `MAX_HEAD_LEN` the
//! answer is final, a `Reader` given the prefixes in turn answers as a fresh
//! parse of each, and a request's `head_len` lies within the input, the
//! head alone gives the same request and one byte less is not a head. A
//! CONNECT target written back in authority form parses to itself, and
//! `basic_credentials` takes any text without panicking.
#![no_main]

use l4proxy::connect_head::{MAX_HEAD_LEN, Reader, basic_credentials, parse};
use libfuzzer_sys::fuzz_target;

/// Enough cut points to catch a prefix that disagrees, few enough to keep
/// each run linear-ish.
const CUTS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if data.len() >= MAX_HEAD_LEN {
        assert_ne!(whole, Ok(None), "no answer at the bound");
    }
    let mut reader = Reader::default();
    for cut in (1..=CUTS).map(|i| data.len() * i / (CUTS + 1)) {
        let prefix = parse(&data[..cut]);
        assert!(
            prefix == Ok(None) || prefix == whole,
            "prefix {cut}: {prefix:?}, whole: {whole:?}"
        );
        let read = reader.read(&data[..cut]);
        assert_eq!(read, prefix, "reader at {cut}");
        if read != Ok(None) {
            break;
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = basic_credentials(text);
    }
    let Ok(Some(request)) = &whole else { return };
    assert!(request.head_len <= data.len(), "head_len past the input");
    assert_eq!(parse(&data[..request.head_len]), whole, "the head alone");
    assert_eq!(
        parse(&data[..request.head_len - 1]),
        Ok(None),
        "one byte less"
    );
    if let Some(value) = &request.proxy_authorization {
        let _ = basic_credentials(value);
    }
    if let Some(target) = &request.target {
        let again = parse(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("{target} written back: {e}"))
            .unwrap_or_else(|| panic!("{target} written back is incomplete"));
        assert_eq!(again.target.as_ref(), Some(target), "written back");
    }
});
