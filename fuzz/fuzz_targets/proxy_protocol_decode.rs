//! `proxy_protocol::decode` on arbitrary bytes: no panic, and the promises the
//! daemon relies on: a prefix never contradicts the whole, at
//! `MAX_HEADER_LEN` the answer is final, the bytes after a header do not
//! change it, and an accepted header re-encodes, in the version it came in, to
//! bytes that decode to the same header (exact in both versions, since a v1
//! header never holds LOCAL or TLVs).
#![no_main]

use l4proxy::proxy_protocol::{MAX_HEADER_LEN, decode, encode};
use libfuzzer_sys::fuzz_target;

/// Enough cut points to catch a prefix that disagrees, few enough to keep
/// each run linear-ish.
const CUTS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let whole = decode(data);
    if data.len() >= MAX_HEADER_LEN {
        assert_ne!(whole, Ok(None), "no answer at the bound");
    }
    for cut in (1..=CUTS).map(|i| data.len() * i / (CUTS + 1)) {
        let prefix = decode(&data[..cut]);
        assert!(
            prefix == Ok(None) || prefix == whole,
            "prefix {cut}: {prefix:?}, whole: {whole:?}"
        );
    }
    let Ok(Some(decoded)) = whole else { return };
    assert_eq!(
        decode(&data[..decoded.len]),
        Ok(Some(decoded.clone())),
        "the header alone"
    );
    let bytes = encode(decoded.version, &decoded.header)
        .unwrap_or_else(|e| panic!("re-encoding {decoded:?}: {e}"));
    let again = decode(&bytes)
        .unwrap_or_else(|e| panic!("decoding re-encoded {decoded:?}: {e}"))
        .unwrap_or_else(|| panic!("re-encoded {decoded:?} is incomplete"));
    assert_eq!(again.header, decoded.header);
    assert_eq!(again.version, decoded.version);
    assert_eq!(again.len, bytes.len());
});
