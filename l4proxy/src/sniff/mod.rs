//! What did the client say? Classifies the first bytes of a connection as a
//! TLS ClientHello, an HTTP/1.x request head, or something else, so that
//! `route` can pick a rule by SNI, ALPN or Host.
//!
//! Everything here is pure: the caller peeks (never consumes) the bytes and
//! asks again with everything received so far once as much more as
//! [`SniffResult::NeedMore`] said has arrived ([`Sniffer`] for one
//! connection). For any input, every prefix of it gives `NeedMore` or the
//! same answer as the whole: a split across TCP segments never changes the
//! outcome. At [`MAX_SNIFF_LEN`] bytes the answer is always final: a verdict,
//! or [`SniffResult::TooLarge`].

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
    /// Neither a valid ClientHello nor a valid HTTP/1.x head: route it on
    /// addresses alone. Call the parsers directly to learn why.
    Other,
}

/// A parser's verdict on the bytes so far. Not a `Result`: for `sniff` a parse
/// error is an answer ([`Sniffed::Other`]), not a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniffResult {
    Done(Sniffed),
    /// Everything so far is a prefix of a ClientHello or a request head, and
    /// no answer can come before the client has sent `until` bytes in all
    /// (see [`tls::Hello::Partial`]; one more byte for a request head).
    NeedMore {
        until: usize,
    },
    /// A ClientHello or request head larger than its bound: the sniffer
    /// gives up on it (it is not "another protocol").
    TooLarge,
}

/// Classifies `buf`, everything the client has sent so far.
pub fn sniff(buf: &[u8]) -> SniffResult {
    Sniffer::default().look(buf)
}

/// [`sniff`] for one connection's bytes as they arrive, with work that does
/// not grow with the number of pieces they come in: a ClientHello is parsed
/// again only once as much as it needs has come
/// ([`tls::Hello::Partial`]), a request head's lines are checked once
/// ([`http::HeadReader`]), and a line is looked at again only when one
/// ends: past the method (checked byte by byte, so that other protocols are
/// turned away at once), an unfinished line can only turn out malformed,
/// which is then found once its line ends (or at the bound, the deadline or
/// the client's close). Parsing everything at every piece would let a
/// client that trickles 64 KiB a byte at a time take a core for seconds.
#[derive(Debug, Default)]
pub struct Sniffer {
    head: http::HeadReader,
    /// The bytes the head reader saw last.
    read: usize,
    /// No line ends in the bytes from `read` to here.
    scanned: usize,
}

impl Sniffer {
    /// The answer for `buf`, which must start with the bytes of the calls
    /// before.
    pub fn look(&mut self, buf: &[u8]) -> SniffResult {
        match buf.first() {
            None => SniffResult::NeedMore { until: 1 },
            Some(&tls::CONTENT_TYPE_HANDSHAKE) => match tls::parse_client_hello(buf) {
                Ok(tls::Hello::Parsed(hello)) => SniffResult::Done(Sniffed::Tls(hello)),
                Ok(tls::Hello::Partial { until }) => SniffResult::NeedMore { until },
                Err(tls::TlsError::TooLarge) => SniffResult::TooLarge,
                Err(_) => SniffResult::Done(Sniffed::Other),
            },
            // No extensions: a hello without a server name.
            Some(&b) if b & 0x80 != 0 => match tls::is_sslv2_compatible_hello(buf) {
                None => SniffResult::NeedMore {
                    until: tls::SSL2_HELLO_PREFIX,
                },
                Some(true) => SniffResult::Done(Sniffed::Tls(tls::ClientHelloInfo::default())),
                Some(false) => SniffResult::Done(Sniffed::Other),
            },
            // Every method is a token, and empty lines may come first; 0x16
            // and bytes with the high bit set are neither, so the paths never
            // compete for input.
            Some(&b) if http::is_token_byte(b) || b == b'\r' || b == b'\n' => {
                let more = SniffResult::NeedMore {
                    until: buf.len() + 1,
                };
                if self.read > http::MAX_METHOD_LEN && buf.len() < http::MAX_HEAD_LEN {
                    let line_ended = buf[self.scanned..].contains(&b'\n');
                    self.scanned = buf.len();
                    if !line_ended {
                        return more;
                    }
                }
                (self.read, self.scanned) = (buf.len(), buf.len());
                match self.head.read(buf) {
                    Ok(Some(request)) => SniffResult::Done(Sniffed::Http(request)),
                    Ok(None) => more,
                    Err(http::HttpError::TooLarge) => SniffResult::TooLarge,
                    Err(_) => SniffResult::Done(Sniffed::Other),
                }
            }
            Some(_) => SniffResult::Done(Sniffed::Other),
        }
    }
}

/// Normalises a DNS host name as sent in SNI or a Host header: one trailing
/// dot removed, ASCII lower-cased. `None` if it is not a host name: labels of
/// 1 to 63 letters, digits, `-` or `_` (underscores occur in real internal
/// names), no label starting or ending with `-`, 253 bytes at most. An IPv4
/// literal passes as a name; nothing else (IDNs must arrive as A-labels).
pub fn normalize_host_name(raw: &[u8]) -> Option<String> {
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
                assert!(
                    matches!(sniff(&input[..end]), SniffResult::NeedMore { until } if until > end),
                    "prefix {end}"
                );
            }
        }
    }

    /// An SSL 2.0-compatible hello of a TLS client (version 3.1, as old
    /// clients send it) is TLS without a server name; SSL 2.0's own is not.
    #[test]
    fn an_sslv2_compatible_hello_is_tls_without_a_name() {
        assert_eq!(
            sniff(b"\x80\x2e\x01\x03\x01\x00\x15"),
            SniffResult::Done(Sniffed::Tls(tls::ClientHelloInfo::default()))
        );
        assert_eq!(sniff(b"\x80\x2e\x01"), SniffResult::NeedMore { until: 5 });
    }

    #[test]
    fn a_head_after_empty_lines_is_http() {
        assert_eq!(
            sniff(b"\r\nGET / HTTP/1.1\r\nHost: admin.example\r\n\r\n"),
            SniffResult::Done(Sniffed::Http(http::HttpRequestInfo {
                method: "GET".to_owned(),
                host: Some("admin.example".to_owned()),
            }))
        );
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
        assert_eq!(sniff(b"SSH-2.0-"), SniffResult::NeedMore { until: 9 });
        assert_eq!(
            sniff(b"SSH-2.0-OpenSSH_9.2p1"),
            SniffResult::Done(Sniffed::Other)
        );
    }

    /// A `Sniffer` given `input` a byte at a time: its answer, and the
    /// length at which it came.
    fn trickled(input: &[u8]) -> (SniffResult, usize) {
        let mut sniffer = Sniffer::default();
        for end in 1..input.len() {
            match sniffer.look(&input[..end]) {
                SniffResult::NeedMore { until } => assert!(until > end, "{until} at {end}"),
                done => return (done, end),
            }
        }
        (sniffer.look(input), input.len())
    }

    #[test]
    fn a_trickled_head_is_answered_as_the_whole() {
        let bad_field = b"GET / HTTP/1.1\r\nX-Pad: 0123456789\r\nHost: a\x00b\r\n\r\n";
        for input in [
            TLS13,
            HTTP,
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            bad_field,
        ] {
            assert_eq!(trickled(input).0, sniff(input), "{input:?}");
        }
        // The method is checked byte by byte: another protocol is turned
        // away within a few bytes ...
        assert_eq!(trickled(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n").1, 21);
        // ... a malformed line once it ends.
        let line_end = bad_field.len() - 2;
        assert_eq!(trickled(bad_field).1, line_end);
        assert_eq!(
            sniff(&bad_field[..line_end - 3]),
            SniffResult::Done(Sniffed::Other)
        );
    }

    #[test]
    fn never_needs_more_than_the_bound() {
        // A head that never ends (tls.rs tests the same for a ClientHello).
        let mut http = b"GET / HTTP/1.1\r\nX: ".to_vec();
        http.resize(MAX_SNIFF_LEN, b'a');
        assert_eq!(sniff(&http), SniffResult::TooLarge);
        // A ClientHello whose header declares 16 MiB: at once.
        assert_eq!(
            sniff(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff"),
            SniffResult::TooLarge
        );
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
