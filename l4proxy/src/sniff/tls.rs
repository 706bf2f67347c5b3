//! TLS: the server name (SNI) and ALPN protocols of a client's ClientHello.
//!
//! Hand-written rather than with tls-parser: for routing, a malformed hello
//! must never yield a wrong answer, and tls-parser (0.12) is lenient where it
//! matters: a truncated extensions block parses as "no extensions", a
//! truncated SNI entry as an empty name list. It also parses every other
//! extension, so an odd but harmless one would reject the whole hello. Here
//! only the framing, the fixed fields and the two extensions we use are read,
//! every length is checked, and anything else is skipped.
//!
//! Leniency that is kept on purpose: bytes after the ClientHello (in its last
//! record or later ones) are ignored, and a host_name that is not a valid DNS
//! name gives `sni: None` rather than an error, since the hello is still TLS.
//! Only the first [`MAX_ALPN_PROTOCOLS`] ALPN protocols are kept, while their
//! names take at most [`MAX_ALPN_BYTES`] (the rest are checked, not kept):
//! what is kept lives as long as the connection and is logged when it ends,
//! and a hello can list thousands.

use std::{borrow::Cow, collections::HashSet};

use thiserror::Error;

use super::normalize_host_name;

/// TLS record content type of handshake records; the first byte of any TLS
/// client's first flight.
pub(super) const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_LEN: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// The most bytes, record headers included, that a ClientHello may take on
/// the wire. Browsers' hellos are under 2 KiB even with a hybrid
/// post-quantum key share (X25519MLKEM768 adds 1216 bytes); 64 KiB leaves room
/// for several large shares, padding and small records, and bounds what the
/// caller buffers. Beyond it the answer is [`TlsError::TooLarge`].
pub const MAX_CLIENT_HELLO_LEN: usize = 64 * 1024;

/// The ALPN protocols of a ClientHello that routes and logs see: browsers
/// and HTTP clients offer two or three, of a few bytes each.
pub const MAX_ALPN_PROTOCOLS: usize = 16;

/// The bytes of the ALPN protocol names kept, at most (a name has up to 255,
/// and each byte that is not UTF-8 becomes three).
pub const MAX_ALPN_BYTES: usize = 512;

/// What a ClientHello says about where the client wants to go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The host_name of the server_name extension: lower-cased, one trailing
    /// dot removed. `None` without the extension, or if the name is not a
    /// valid DNS host name (see `normalize_host_name`).
    pub sni: Option<String>,
    /// The ALPN protocol names in the client's order, the first
    /// [`MAX_ALPN_PROTOCOLS`] (within [`MAX_ALPN_BYTES`]); empty without the
    /// extension. Names that are not UTF-8 are converted lossily, so they never
    /// equal an ASCII name such as `h2`.
    pub alpn: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TlsError {
    #[error("record type {0} is not handshake ({CONTENT_TYPE_HANDSHAKE})")]
    NotHandshake(u8),
    #[error("record version {0:#06x} is not 3.x")]
    BadRecordVersion(u16),
    #[error("record length {0} is not 1 to {MAX_RECORD_LEN}")]
    BadRecordLength(usize),
    #[error("handshake message type {0} is not ClientHello ({HANDSHAKE_CLIENT_HELLO})")]
    NotClientHello(u8),
    #[error("ClientHello takes more than {MAX_CLIENT_HELLO_LEN} bytes")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello has extension {0} twice")]
    DuplicateExtension(u16),
}

/// How far [`parse_client_hello`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    Parsed(ClientHelloInfo),
    /// `buf` is a prefix of a ClientHello, and no answer can come before it
    /// holds `until` bytes (more than it has, at most
    /// [`MAX_CLIENT_HELLO_LEN`]): what is still missing of the declared
    /// message, and one more record header if it cannot fit in the record
    /// that has begun. Waiting for that, rather than for each byte, keeps a
    /// client that trickles its hello in tiny records from making us parse
    /// it again at every piece (quadratic, seconds of CPU for 64 KiB).
    /// While the length is not known yet it is one byte more, so that what
    /// is not TLS is refused within a few bytes.
    Partial {
        until: usize,
    },
}

/// Parses the ClientHello at the start of `buf`, everything received so far.
///
/// `Err`: `buf` does not start with a valid ClientHello, whatever follows.
/// It is returned as soon as the offending byte is seen, but for the
/// headers of records after the first: those are checked once
/// [`Hello::Partial`]'s bound is reached. At [`MAX_CLIENT_HELLO_LEN`] bytes
/// the answer is never `Partial`.
pub fn parse_client_hello(buf: &[u8]) -> Result<Hello, TlsError> {
    match handshake_message(buf)? {
        Reassembly::Message(message) => {
            parse_client_hello_body(&message[HANDSHAKE_HEADER_LEN..]).map(Hello::Parsed)
        }
        Reassembly::Partial { missing } => Ok(Hello::Partial {
            until: (buf.len() + missing).min(MAX_CLIENT_HELLO_LEN),
        }),
    }
}

/// The first handshake message, or how many more bytes it needs at least.
enum Reassembly<'a> {
    Message(Cow<'a, [u8]>),
    Partial { missing: usize },
}

/// Reassembles the first handshake message (header included) from the
/// handshake records at the start of `buf`: a ClientHello may span records.
fn handshake_message(buf: &[u8]) -> Result<Reassembly<'_>, TlsError> {
    // Bytes past the bound cannot be part of an acceptable ClientHello.
    let mut records = &buf[..buf.len().min(MAX_CLIENT_HELLO_LEN)];
    // Borrowed while the message fits in its first record, as it usually does.
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut declared = None;
    // Payload bytes the last record declared that have not arrived.
    let mut in_record = 0;
    while let Some(Fragment { payload, missing }) = next_fragment(&mut records)? {
        in_record = missing;
        if message.is_empty() {
            message = Cow::Borrowed(payload);
        } else {
            message.to_mut().extend_from_slice(payload);
        }
        if let Some(&msg_type) = message.first()
            && msg_type != HANDSHAKE_CLIENT_HELLO
        {
            return Err(TlsError::NotClientHello(msg_type));
        }
        let Some(&[_, a, b, c]) = message.get(..HANDSHAKE_HEADER_LEN) else {
            continue;
        };
        let len = HANDSHAKE_HEADER_LEN + usize::from_be_bytes([0, 0, 0, 0, 0, a, b, c]);
        // Fail now rather than wait for bytes that would be refused anyway.
        if RECORD_HEADER_LEN + len > MAX_CLIENT_HELLO_LEN {
            return Err(TlsError::TooLarge);
        }
        if message.len() >= len {
            return Ok(Reassembly::Message(match message {
                Cow::Borrowed(m) => Cow::Borrowed(&m[..len]),
                Cow::Owned(mut m) => {
                    m.truncate(len);
                    Cow::Owned(m)
                }
            }));
        }
        declared = Some(len);
    }
    if buf.len() >= MAX_CLIENT_HELLO_LEN {
        // Many small records can exceed the bound however short the message.
        return Err(TlsError::TooLarge);
    }
    let missing = match declared {
        None => 1,
        Some(len) => {
            let rest = len - message.len();
            if rest <= in_record {
                rest
            } else {
                // `records` holds the part of the next header that came.
                rest + RECORD_HEADER_LEN - records.len()
            }
        }
    };
    Ok(Reassembly::Partial { missing })
}

/// A handshake record's payload, or as much of it as has arrived.
struct Fragment<'a> {
    payload: &'a [u8],
    /// How many of the payload's declared bytes have not arrived.
    missing: usize,
}

/// Takes the next handshake record off `records`. `None` when `records`
/// has no complete header (it is left there).
fn next_fragment<'a>(records: &mut &'a [u8]) -> Result<Option<Fragment<'a>>, TlsError> {
    // Check each header field as soon as it is there, so that what is not TLS
    // is refused after a byte or three.
    if let Some(&content_type) = records.first()
        && content_type != CONTENT_TYPE_HANDSHAKE
    {
        // Handshake messages cannot be interleaved with other records.
        return Err(TlsError::NotHandshake(content_type));
    }
    if let Some(&[_, major, minor]) = records.get(..3)
        && major != 3
    {
        return Err(TlsError::BadRecordVersion(u16::from_be_bytes([
            major, minor,
        ])));
    }
    let Some((&[_, _, _, hi, lo], rest)) = records.split_first_chunk::<RECORD_HEADER_LEN>() else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    // RFC 8446 §5.1 forbids empty handshake fragments.
    if len == 0 || len > MAX_RECORD_LEN {
        return Err(TlsError::BadRecordLength(len));
    }
    let (payload, rest) = rest.split_at(len.min(rest.len()));
    *records = rest;
    Ok(Some(Fragment {
        payload,
        missing: len - payload.len(),
    }))
}

/// A record's version must be 3.x, a ClientHello's legacy_version 3.0 or
/// above: as servers check them (OpenSSL and BoringSSL look at a record's
/// major byte only, and answer a higher legacy_version with the highest
/// they have, RFC 8446 Appendix D.1). A hello that a server accepts must not
/// be "other" here: a route that rejects by server name would not see it.
const SSL3: u16 = 0x0300;

/// Whether `buf` starts an SSL 2.0-compatible ClientHello (RFC 5246
/// Appendix E.2: a two-byte length with its high bit set, message type 1,
/// version 3.x), which OpenSSL still takes for TLS up to 1.2; `None` until
/// [`SSL2_HELLO_PREFIX`] bytes are there. It has no extensions: no server
/// name, no ALPN.
pub(super) fn is_sslv2_compatible_hello(buf: &[u8]) -> Option<bool> {
    let &[first, _, message_type, major, _] = buf.first_chunk::<SSL2_HELLO_PREFIX>()?;
    Some(first & 0x80 != 0 && message_type == HANDSHAKE_CLIENT_HELLO && major == 3)
}

/// Length, message type and version of an SSL 2.0-compatible hello.
pub(super) const SSL2_HELLO_PREFIX: usize = 5;

/// RFC 8446 §4.1.2 (the same layout since SSL 3.0).
fn parse_client_hello_body(body: &[u8]) -> Result<ClientHelloInfo, TlsError> {
    let mut r = Reader(body);
    if r.u16("legacy_version")? < SSL3 {
        return Err(TlsError::Malformed("legacy_version is below SSL 3.0"));
    }
    r.take(32, "random")?;
    if r.vec_u8("legacy_session_id")?.len() > 32 {
        return Err(TlsError::Malformed(
            "legacy_session_id longer than 32 bytes",
        ));
    }
    let suites = r.vec_u16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(TlsError::Malformed("cipher_suites"));
    }
    if r.vec_u8("legacy_compression_methods")?.is_empty() {
        return Err(TlsError::Malformed("legacy_compression_methods is empty"));
    }
    // Before TLS 1.3 the extensions block may be absent altogether.
    if r.is_empty() {
        return Ok(ClientHelloInfo::default());
    }
    let extensions = r.vec_u16("extensions")?;
    if !r.is_empty() {
        return Err(TlsError::Malformed("bytes after the extensions"));
    }
    parse_extensions(extensions)
}

fn parse_extensions(extensions: &[u8]) -> Result<ClientHelloInfo, TlsError> {
    let mut info = ClientHelloInfo::default();
    // RFC 8446 §4.2: no extension type twice. Two SNIs could route one way
    // and be served another.
    let mut seen = HashSet::new();
    let mut r = Reader(extensions);
    while !r.is_empty() {
        let ext_type = r.u16("extension type")?;
        let data = r.vec_u16("extension data")?;
        if !seen.insert(ext_type) {
            return Err(TlsError::DuplicateExtension(ext_type));
        }
        match ext_type {
            EXT_SERVER_NAME => info.sni = parse_server_name(data)?,
            EXT_ALPN => info.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok(info)
}

/// RFC 6066 §3: a list of (name_type, name), at most one host_name.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, TlsError> {
    let mut r = Reader(whole_vec_u16(data, "server_name list")?);
    let mut host_name = None;
    while !r.is_empty() {
        let name_type = r.u8("server_name name_type")?;
        let name = r.vec_u16("server_name name")?;
        if name.is_empty() {
            return Err(TlsError::Malformed("server_name name is empty"));
        }
        if name_type == NAME_TYPE_HOST_NAME && host_name.replace(name).is_some() {
            return Err(TlsError::Malformed("server_name has two host_names"));
        }
    }
    Ok(host_name.and_then(normalize_host_name))
}

/// RFC 7301 §3.1: a non-empty list of non-empty protocol names.
fn parse_alpn(data: &[u8]) -> Result<Vec<String>, TlsError> {
    let mut r = Reader(whole_vec_u16(data, "ALPN protocol list")?);
    let mut protocols = Vec::new();
    let (mut kept, mut full) = (0, false);
    while !r.is_empty() {
        let name = r.vec_u8("ALPN protocol name")?;
        if name.is_empty() {
            return Err(TlsError::Malformed("ALPN protocol name is empty"));
        }
        let name = String::from_utf8_lossy(name);
        full = full || protocols.len() == MAX_ALPN_PROTOCOLS || kept + name.len() > MAX_ALPN_BYTES;
        if !full {
            kept += name.len();
            protocols.push(name.into_owned());
        }
    }
    Ok(protocols)
}

/// An extension body that is exactly one non-empty u16-length vector.
fn whole_vec_u16<'a>(data: &'a [u8], what: &'static str) -> Result<&'a [u8], TlsError> {
    let mut r = Reader(data);
    let list = r.vec_u16(what)?;
    if list.is_empty() || !r.is_empty() {
        return Err(TlsError::Malformed(what));
    }
    Ok(list)
}

/// Reads TLS presentation-language fields off a complete message; running
/// out of bytes means a length lied.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TlsError> {
        let (head, tail) = self
            .0
            .split_at_checked(n)
            .ok_or(TlsError::Malformed(what))?;
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, TlsError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, TlsError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec_u8(&mut self, what: &'static str) -> Result<&'a [u8], TlsError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    fn vec_u16(&mut self, what: &'static str) -> Result<&'a [u8], TlsError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TLS12_OPENSSL: &[u8] = include_bytes!("fixtures/tls12_openssl.bin");
    const TLS13_OPENSSL: &[u8] = include_bytes!("fixtures/tls13_openssl.bin");
    const TLS13_NO_SNI: &[u8] = include_bytes!("fixtures/tls13_openssl_no_sni.bin");
    const TLS_CURL: &[u8] = include_bytes!("fixtures/tls_curl.bin");
    const TLS_PYTHON: &[u8] = include_bytes!("fixtures/tls_python.bin");
    const TLS13_LARGE: &[u8] = include_bytes!("fixtures/tls13_large_multi_record.bin");

    const H2_H11: &[&str] = &["h2", "http/1.1"];

    struct Fixture {
        name: &'static str,
        bytes: &'static [u8],
        sni: Option<&'static str>,
        alpn: &'static [&'static str],
    }

    /// Each fixture with the SNI and ALPN its client was told to send.
    const FIXTURES: &[Fixture] = &[
        Fixture {
            name: "tls12_openssl",
            bytes: TLS12_OPENSSL,
            sni: Some("tls12.example.com"),
            alpn: H2_H11,
        },
        Fixture {
            name: "tls13_openssl",
            bytes: TLS13_OPENSSL,
            // Sent as "Mixed.Example.COM.".
            sni: Some("mixed.example.com"),
            alpn: H2_H11,
        },
        Fixture {
            name: "tls13_openssl_no_sni",
            bytes: TLS13_NO_SNI,
            sni: None,
            alpn: &[],
        },
        Fixture {
            name: "tls_curl",
            bytes: TLS_CURL,
            sni: Some("curl.example.test"),
            alpn: H2_H11,
        },
        Fixture {
            name: "tls_python",
            bytes: TLS_PYTHON,
            sni: Some("python.example.org"),
            alpn: &["http/1.1"],
        },
        Fixture {
            name: "tls13_large_multi_record",
            bytes: TLS13_LARGE,
            sni: Some("mixed.example.com"),
            alpn: H2_H11,
        },
    ];

    /// The answer, without the bound of a partial one.
    fn parsed(buf: &[u8]) -> Result<Option<ClientHelloInfo>, TlsError> {
        parse_client_hello(buf).map(|hello| match hello {
            Hello::Parsed(info) => Some(info),
            Hello::Partial { .. } => None,
        })
    }

    fn expected(sni: Option<&str>, alpn: &[&str]) -> ClientHelloInfo {
        ClientHelloInfo {
            sni: sni.map(String::from),
            alpn: alpn.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// Every strict prefix needs more; the whole gives `want`.
    fn assert_prefixes_then(input: &[u8], want: &ClientHelloInfo, name: &str) {
        for end in 0..input.len() {
            assert_eq!(
                parsed(&input[..end]),
                Ok(None),
                "{name}: prefix of {end} bytes"
            );
        }
        assert_eq!(parsed(input), Ok(Some(want.clone())), "{name}: whole");
    }

    /// The handshake message of a single-record ClientHello.
    fn message_of(record: &[u8]) -> &[u8] {
        &record[RECORD_HEADER_LEN..]
    }

    /// Frames a handshake message into handshake records of `chunk` bytes.
    fn records(message: &[u8], chunk: usize) -> Vec<u8> {
        message
            .chunks(chunk)
            .flat_map(|fragment| {
                let len = u16::try_from(fragment.len()).unwrap().to_be_bytes();
                [&[CONTENT_TYPE_HANDSHAKE, 3, 1][..], &len, fragment].concat()
            })
            .collect()
    }

    /// A ClientHello handshake message with the given raw extensions block
    /// (`None`: no block at all).
    fn message(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![3, 3]; // legacy_version TLS 1.2
        body.extend([0x5a; 32]); // random
        body.push(0); // legacy_session_id: empty
        body.extend([0, 2, 0x13, 0x01]); // cipher_suites: TLS_AES_128_GCM_SHA256
        body.extend([1, 0]); // legacy_compression_methods: null
        if let Some(extensions) = extensions {
            body.extend(u16::try_from(extensions.len()).unwrap().to_be_bytes());
            body.extend(extensions);
        }
        handshake(&body)
    }

    fn handshake(body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        [&[HANDSHAKE_CLIENT_HELLO][..], &len[1..], body].concat()
    }

    fn ext(ext_type: u16, data: &[u8]) -> Vec<u8> {
        let len = u16::try_from(data.len()).unwrap().to_be_bytes();
        [&ext_type.to_be_bytes()[..], &len, data].concat()
    }

    fn vec_u16(items: &[u8]) -> Vec<u8> {
        [
            &u16::try_from(items.len()).unwrap().to_be_bytes()[..],
            items,
        ]
        .concat()
    }

    fn sni(names: &[(u8, &[u8])]) -> Vec<u8> {
        let list: Vec<u8> = names
            .iter()
            .flat_map(|&(name_type, name)| [&[name_type][..], &vec_u16(name)].concat())
            .collect();
        ext(EXT_SERVER_NAME, &vec_u16(&list))
    }

    fn alpn(protocols: &[&[u8]]) -> Vec<u8> {
        let list: Vec<u8> = protocols
            .iter()
            .flat_map(|p| [&[u8::try_from(p.len()).unwrap()][..], p].concat())
            .collect();
        ext(EXT_ALPN, &vec_u16(&list))
    }

    fn parse_message(message: &[u8]) -> Result<Option<ClientHelloInfo>, TlsError> {
        parsed(&records(message, MAX_RECORD_LEN))
    }

    #[test]
    fn fixtures_parse_after_every_prefix() {
        for f in FIXTURES {
            assert_prefixes_then(f.bytes, &expected(f.sni, f.alpn), f.name);
        }
    }

    /// A hello whose answer comes at its last byte: every shorter prefix
    /// waits for more than it has and no more than the whole.
    fn assert_bounds_within(input: &[u8], name: &str) {
        for end in 0..input.len() {
            match parse_client_hello(&input[..end]) {
                Ok(Hello::Partial { until }) => assert!(
                    end < until && until <= input.len(),
                    "{name}: prefix of {end} waits for {until} of {}",
                    input.len()
                ),
                other => panic!("{name}: prefix of {end} gave {other:?}"),
            }
        }
    }

    /// How often a client that sends exactly what is waited for, no more,
    /// makes us parse before the answer.
    fn parses_when_trickled(input: &[u8]) -> usize {
        let (mut end, mut parses) = (1, 1);
        while let Ok(Hello::Partial { until }) = parse_client_hello(&input[..end]) {
            end = until;
            parses += 1;
        }
        parses
    }

    #[test]
    fn partial_hellos_wait_for_no_more_than_the_hello() {
        for f in FIXTURES {
            assert_bounds_within(f.bytes, f.name);
        }
        let hello = message(Some(&sni(&[(0, b"a.example")])));
        for chunk in [1, 2, 7, 100, MAX_RECORD_LEN] {
            assert_bounds_within(&records(&hello, chunk), &format!("records of {chunk}"));
        }
    }

    #[test]
    fn a_trickled_hello_is_parsed_a_few_times_not_at_each_byte() {
        // The record and message headers byte by byte, then the rest at once.
        assert_eq!(parses_when_trickled(TLS13_OPENSSL), 10);
        // 8 000 bytes of padding in records of one byte, 48 KiB on the wire:
        // each wait is for the rest of the message and one record header,
        // so what is missing shrinks by a sixth at each parse.
        let padding = ext(21, &[0; 8000]);
        let input = records(&message(Some(&padding)), 1);
        assert!(input.len() > 48_000);
        let parses = parses_when_trickled(&input);
        assert!(parses < 100, "{parses} parses of {} bytes", input.len());
    }

    #[test]
    fn large_fixture_spans_records() {
        // A padding extension of 6000 bytes, in records of 1000.
        assert!(TLS13_LARGE.len() > 5 * 1024);
        assert!(TLS13_LARGE[RECORD_HEADER_LEN..].starts_with(&[
            HANDSHAKE_CLIENT_HELLO,
            0,
            0x18,
            0x79
        ]));
        assert_eq!(
            TLS13_LARGE[RECORD_HEADER_LEN + 1000],
            CONTENT_TYPE_HANDSHAKE
        );
    }

    #[test]
    fn one_byte_records() {
        for f in FIXTURES.iter().filter(|f| f.bytes != TLS13_LARGE) {
            let split = records(message_of(f.bytes), 1);
            assert_prefixes_then(&split, &expected(f.sni, f.alpn), f.name);
        }
    }

    /// A record version above TLS 1.3's (`03 05`): servers look at its major
    /// byte only, so the hello is read, not taken as another protocol.
    #[test]
    fn a_record_version_of_3_x_is_a_hello() {
        let mut input = TLS13_OPENSSL.to_vec();
        input[2] = 5;
        assert_eq!(
            parsed(&input),
            Ok(Some(expected(Some("mixed.example.com"), H2_H11)))
        );
    }

    #[test]
    fn ignores_what_follows_the_hello() {
        let mut input = TLS13_OPENSSL.to_vec();
        input.extend(b"\x17\x03\x03\x00\x10 early data...");
        assert_eq!(
            parsed(&input),
            Ok(Some(expected(Some("mixed.example.com"), H2_H11)))
        );
    }

    #[test]
    fn record_layer_errors() {
        let cases: &[(&[u8], TlsError)] = &[
            (
                b"\x15\x03\x03\x00\x02\x02\x28",
                TlsError::NotHandshake(0x15),
            ),
            (b"\x16\x02\x00", TlsError::BadRecordVersion(0x0200)),
            (b"\x16\x04\x01", TlsError::BadRecordVersion(0x0401)),
            (b"\x16\x03\x01\x00\x00", TlsError::BadRecordLength(0)),
            (b"\x16\x03\x01\x40\x01", TlsError::BadRecordLength(0x4001)),
            (b"\x16\x03\x01\x00\x04\x02", TlsError::NotClientHello(2)),
            // A 16 MiB hello is refused from its header.
            (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", TlsError::TooLarge),
            // 64 KiB - 8 of message plus the first record header is too much.
            (b"\x16\x03\x01\x00\x04\x01\x00\xff\xf8", TlsError::TooLarge),
        ];
        for (input, want) in cases {
            assert_eq!(parsed(input).as_ref(), Err(want), "{input:x?}");
        }
    }

    #[test]
    fn no_interleaving_inside_the_hello() {
        let mut input = TLS13_LARGE.to_vec();
        // The second record, 1000 bytes into the message, becomes alert.
        input[RECORD_HEADER_LEN + 1000] = 21;
        assert_eq!(parsed(&input), Err(TlsError::NotHandshake(21)));
    }

    #[test]
    fn too_many_small_records() {
        // A 20000-byte message in 1-byte records takes 6 bytes per byte.
        let input = records(&handshake(&[0; 20_000]), 1);
        let at_bound = &input[..MAX_CLIENT_HELLO_LEN];
        assert_eq!(parsed(&at_bound[..at_bound.len() - 1]), Ok(None));
        assert_eq!(parsed(at_bound), Err(TlsError::TooLarge));
    }

    #[test]
    fn largest_hello_fits() {
        let host = sni(&[(0, b"big.example")]);
        let fill = MAX_CLIENT_HELLO_LEN - RECORD_HEADER_LEN * 4 - message(Some(&host)).len() - 4;
        let exts = [host, ext(21, &vec![0; fill])].concat();
        let input = records(&message(Some(&exts)), MAX_RECORD_LEN);
        assert_eq!(input.len(), MAX_CLIENT_HELLO_LEN);
        let want = expected(Some("big.example"), &[]);
        assert_eq!(parsed(&input), Ok(Some(want)));
    }

    #[test]
    fn extensions() {
        let hello = |exts: &[Vec<u8>]| parse_message(&message(Some(&exts.concat())));
        assert_eq!(
            parse_message(&message(None)),
            Ok(Some(ClientHelloInfo::default()))
        );
        assert_eq!(hello(&[]), Ok(Some(ClientHelloInfo::default())));
        assert_eq!(
            hello(&[
                ext(0x0a0a, &[]),
                sni(&[(0, b"WWW.Example.org.")]),
                alpn(&[b"h2"])
            ]),
            Ok(Some(expected(Some("www.example.org"), &["h2"])))
        );
        // A name that is not a host name is not routed by, but still TLS.
        assert_eq!(
            hello(&[sni(&[(0, b"bad name")]), alpn(&[b"\xff", b"h2"])]),
            Ok(Some(expected(None, &["\u{fffd}", "h2"])))
        );
        // Unknown name types are skipped.
        assert_eq!(
            hello(&[sni(&[(7, b"x"), (0, b"a.example")])]),
            Ok(Some(expected(Some("a.example"), &[])))
        );
    }

    #[test]
    fn a_long_alpn_list_keeps_its_first_protocols() {
        // 30 000 one-byte names: what routes and the log keep is bounded.
        let names: Vec<[u8; 1]> = (0..30_000).map(|i| [b'a' + (i % 26) as u8]).collect();
        let list: Vec<&[u8]> = names.iter().map(|n| &n[..]).collect();
        let long = message(Some(&alpn(&list)));
        let Ok(Some(hello)) = parsed(&records(&long, MAX_RECORD_LEN)) else {
            panic!("a long ALPN list is still a ClientHello");
        };
        assert_eq!(hello.alpn.len(), MAX_ALPN_PROTOCOLS);
        assert_eq!(hello.alpn[..3], ["a", "b", "c"]);
        // Long names, not UTF-8: kept while they fit in the bytes kept.
        let long = [0xffu8; 255];
        let names = [&b"h2"[..], &long, &long, b"http/1.1"];
        let Ok(Some(hello)) = parsed(&records(&message(Some(&alpn(&names))), MAX_RECORD_LEN))
        else {
            panic!("long ALPN names are still a ClientHello");
        };
        assert_eq!(hello.alpn.len(), 1, "{} bytes", hello.alpn.concat().len());
        // The names past those are still checked.
        let mut bad = list.clone();
        bad.push(b"");
        assert_eq!(
            parsed(&records(&message(Some(&alpn(&bad))), MAX_RECORD_LEN)),
            Err(TlsError::Malformed("ALPN protocol name is empty"))
        );
    }

    #[test]
    fn malformed_hellos() {
        let malformed = |what| Err(TlsError::Malformed(what));
        let with_exts = |exts: &[u8]| parse_message(&message(Some(exts)));
        let host = sni(&[(0, b"a.example")]);

        // Extensions block: claims one byte more than there is, or is
        // followed by a stray byte.
        let mut m = message(Some(&host));
        let block = m.len() - host.len() - 2;
        m[block + 1] += 1;
        assert_eq!(parse_message(&m), malformed("extensions"));
        let mut m = message(Some(&host));
        m.push(0);
        m[3] += 1;
        assert_eq!(parse_message(&m), malformed("bytes after the extensions"));

        // One extension claims more than the block holds.
        assert_eq!(
            with_exts(&host[..host.len() - 1]),
            malformed("extension data")
        );
        assert_eq!(with_exts(&[0]), malformed("extension type"));

        // server_name: list length off, empty list, empty name, two hosts.
        assert_eq!(
            with_exts(&ext(0, &[0, 4, 0, 0, 1])),
            malformed("server_name list")
        );
        assert_eq!(
            with_exts(&ext(0, &[0, 4, 0, 0, 1, b'a', 0])),
            malformed("server_name list")
        );
        assert_eq!(with_exts(&ext(0, &[0, 0])), malformed("server_name list"));
        assert_eq!(
            with_exts(&ext(0, &[0, 4, 0, 0, 2, b'a'])),
            malformed("server_name name")
        );
        assert_eq!(
            with_exts(&sni(&[(0, b"")])),
            malformed("server_name name is empty")
        );
        assert_eq!(
            with_exts(&sni(&[(0, b"a.example"), (0, b"b.example")])),
            malformed("server_name has two host_names")
        );
        assert_eq!(
            with_exts(&[host.clone(), host].concat()),
            Err(TlsError::DuplicateExtension(EXT_SERVER_NAME))
        );

        // ALPN: empty list, empty name, name longer than the list.
        assert_eq!(
            with_exts(&ext(16, &[0, 0])),
            malformed("ALPN protocol list")
        );
        assert_eq!(
            with_exts(&alpn(&[b"h2", b""])),
            malformed("ALPN protocol name is empty")
        );
        assert_eq!(
            with_exts(&ext(16, &[0, 3, 5, b'h', b'2'])),
            malformed("ALPN protocol name")
        );

        // Fixed fields.
        let mut m = message(None);
        m[4] = 2; // legacy_version 2.3
        assert_eq!(
            parse_message(&m),
            malformed("legacy_version is below SSL 3.0")
        );
        // Above TLS 1.3 (servers answer with their highest): still a hello.
        let mut m = message(None);
        m[4..6].copy_from_slice(&[3, 5]);
        assert_eq!(parse_message(&m), Ok(Some(ClientHelloInfo::default())));
        let long_session_id = [
            &[3, 3][..],
            &[0; 32],
            &[33],
            &[0; 33],
            &[0, 2, 0x13, 1, 1, 0],
        ]
        .concat();
        assert_eq!(
            parse_message(&handshake(&long_session_id)),
            malformed("legacy_session_id longer than 32 bytes")
        );
        let mut m = message(None);
        m[38] = 7; // session id longer than what follows
        assert_eq!(parse_message(&m), malformed("legacy_session_id"));
        let mut m = message(None);
        m[40] = 3; // odd cipher_suites length
        assert_eq!(parse_message(&m), malformed("cipher_suites"));
        let mut m = message(None);
        m[43] = 0; // no compression method, and a stray byte
        assert_eq!(
            parse_message(&m),
            malformed("legacy_compression_methods is empty")
        );
        // The handshake length cuts the fixed fields short.
        assert_eq!(parse_message(&handshake(&[3, 3, 0])), malformed("random"));
    }

    #[test]
    fn garbage_never_panics() {
        // A small xorshift so the test needs no crate and is repeatable.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let len = (next() % 600) as usize;
            let mut input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Mostly keep a plausible header so the body parser is reached.
            if next() % 4 != 0 && input.len() >= 9 {
                let body_len = u16::try_from(input.len() - 5).unwrap().to_be_bytes();
                input[..5].copy_from_slice(&[22, 3, 1, body_len[0], body_len[1]]);
                let msg_len = u32::try_from(input.len() - 9).unwrap().to_be_bytes();
                input[5..9].copy_from_slice(&[1, msg_len[1], msg_len[2], msg_len[3]]);
            }
            let _ = parsed(&input);
        }
    }
}
