//! What did the client say? Classifies the first bytes of a connection as a
//! TLS ClientHello, an HTTP/1.x request head, or something else, so that
//! `route` can pick a rule by SNI, ALPN or Host.
//!
//! Everything here is pure: the caller peeks (never consumes) the bytes and
//! calls [`sniff`] again with everything received so far whenever more arrive.
//! For any input, every prefix of it gives [`SniffResult::NeedMore`] or the
//! same answer as the whole: a split across TCP segments never changes the
//! outcome. At [`MAX_SNIFF_LEN`] bytes the answer is always final.

pub mod http;
pub mod tls;

pub use http::HttpRequestInfo;
pub use tls::ClientHelloInfo;

/// The most bytes [`sniff`] will ever wait for: with this many, it never says
/// [`SniffResult::NeedMore`]. The caller's peek buffer needs this size.
pub const MAX_SNIFF_LEN: usize = if tls::MAX_CLIENT_HELLO_LEN > http::MAX_HEAD_LEN {
    tls::MAX_CLIENT_HELLO_LEN
} else {
    http::MAX_HEAD_LEN
};

/// What the client's first bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    Tls(ClientHelloInfo),
    Http(HttpRequestInfo),
    /// Neither a valid ClientHello nor a valid HTTP/1.x head (too large
    /// included): route it on addresses alone. Call the parsers directly to
    /// learn why.
    Other,
}

/// A parser's verdict on the bytes so far. Not a `Result`: for `sniff` a parse
/// error is an answer ([`Sniffed::Other`]), not a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniffResult {
    Done(Sniffed),
    /// Everything so far is a prefix of a ClientHello or a request head.
    NeedMore,
}

/// Classifies `buf`, everything the client has sent so far.
pub fn sniff(buf: &[u8]) -> SniffResult {
    match buf.first() {
        None => SniffResult::NeedMore,
        Some(&tls::CONTENT_TYPE_HANDSHAKE) => match tls::parse_client_hello(buf) {
            Ok(Some(hello)) => SniffResult::Done(Sniffed::Tls(hello)),
            Ok(None) => SniffResult::NeedMore,
            Err(_) => SniffResult::Done(Sniffed::Other),
        },
        // Every method is a token; 0x16 is not a token byte, so the two paths
        // never compete for the same input.
        Some(&b) if http::is_token_byte(b) => match http::parse_request_head(buf) {
            Ok(Some(request)) => SniffResult::Done(Sniffed::Http(request)),
            Ok(None) => SniffResult::NeedMore,
            Err(_) => SniffResult::Done(Sniffed::Other),
        },
        Some(_) => SniffResult::Done(Sniffed::Other),
    }
}

/// Normalises a DNS host name as sent in SNI or a Host header: one trailing
/// dot removed, ASCII lower-cased. `None` if it is not a host name: labels of
/// 1 to 63 letters, digits, `-` or `_` (underscores occur in real internal
/// names), no label starting or ending with `-`, 253 bytes at most. An IPv4
/// literal passes as a name; nothing else (IDNs must arrive as A-labels).
pub(crate) fn normalize_host_name(raw: &[u8]) -> Option<String> {
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let label_ok = |label: &[u8]| {
        (1..=63).contains(&label.len())
            && label.first() != Some(&b'-')
            && label.last() != Some(&b'-')
            && label
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    if !name.split(|&c| c == b'.').all(label_ok) {
        return None;
    }
    // Only ASCII bytes passed the check above.
    Some(
        name.to_ascii_lowercase()
            .into_iter()
            .map(char::from)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TLS13: &[u8] = include_bytes!("fixtures/tls13_openssl.bin");
    const HTTP: &[u8] = include_bytes!("fixtures/http_curl.http");

    #[test]
    fn classifies_tls() {
        let SniffResult::Done(Sniffed::Tls(hello)) = sniff(TLS13) else {
            panic!("tls13_openssl.bin not sniffed as TLS");
        };
        assert_eq!(hello.sni.as_deref(), Some("mixed.example.com"));
    }

    #[test]
    fn classifies_http() {
        let SniffResult::Done(Sniffed::Http(request)) = sniff(HTTP) else {
            panic!("http_curl.http not sniffed as HTTP");
        };
        assert_eq!(request.host.as_deref(), Some("web.example.test"));
    }

    #[test]
    fn prefixes_need_more() {
        for input in [TLS13, HTTP] {
            for end in 0..input.len() {
                assert_eq!(sniff(&input[..end]), SniffResult::NeedMore, "prefix {end}");
            }
        }
    }

    #[test]
    fn other_traffic_is_other_at_once() {
        // SSH banner, SSLv2-style hello, PostgreSQL startup, HTTP/2 preface,
        // a RESP command, and a broken ClientHello.
        for input in [
            &b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"[..],
            b"\x80\x2e\x01\x00\x02",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"\x16\x03\x01\x00\x00",
        ] {
            assert_eq!(sniff(input), SniffResult::Done(Sniffed::Other), "{input:?}");
        }
        // A few bytes are enough to give up on a protocol the client speaks
        // first, without waiting for a whole line.
        assert_eq!(sniff(b"SSH-2.0-"), SniffResult::NeedMore);
        assert_eq!(
            sniff(b"SSH-2.0-OpenSSH_9.2p1"),
            SniffResult::Done(Sniffed::Other)
        );
    }

    #[test]
    fn never_needs_more_than_the_bound() {
        // A head that never ends (tls.rs tests the same for a ClientHello).
        let mut http = b"GET / HTTP/1.1\r\nX: ".to_vec();
        http.resize(MAX_SNIFF_LEN, b'a');
        assert_eq!(sniff(&http), SniffResult::Done(Sniffed::Other));
    }

    #[test]
    fn host_names() {
        let norm = |s: &str| normalize_host_name(s.as_bytes());
        assert_eq!(norm("Example.COM.").as_deref(), Some("example.com"));
        assert_eq!(
            norm("my_host.internal").as_deref(),
            Some("my_host.internal")
        );
        assert_eq!(norm("10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(
            norm(&format!("{}.com", "a".repeat(63))).map(|n| n.len()),
            Some(67)
        );
        for bad in [
            "",
            ".",
            "example.com..",
            "a..b",
            ".example.com",
            "-a.com",
            "a-.com",
            "exa mple.com",
            "ex\0ample.com",
            "bücher.de",
            "user@host",
            "host:80",
            &"a".repeat(64),
            &["abc"; 64].join("."),
        ] {
            assert_eq!(norm(bad), None, "{bad:?}");
        }
    }
}
