//! HTTP/1.x: the method and target host of a request head (RFC 9112).
//!
//! Choices, where the RFC leaves room or real servers differ:
//! - A bare LF ends a line as CRLF does (RFC 9112 §2.2 allows it; HAProxy and
//!   nginx accept it); a CR anywhere else is an error.
//! - The host comes from an absolute-form target (`GET http://h/ HTTP/1.1`,
//!   which overrides Host, RFC 9112 §3.2.2), from the authority-form target of
//!   CONNECT, else from the Host header. Two Host headers are an error.
//! - The host is lower-cased, without port, userinfo or one trailing dot. An
//!   IPv6 literal loses its brackets and is written canonically
//!   (`[0:0::1]:80` gives `::1`), so a host is always a name or a bare address.
//!   What follows its first colon is the port, whatever it is: nginx picks
//!   its server by the name before it (`admin.example:x` is
//!   `admin.example`). A host that is not a name or address (bad characters)
//!   is an error, not `host: None`: nginx still picks a wildcard server for
//!   `x!.ads.example` (it refuses only `/`, controls, spaces and `..`), so
//!   taking it as "no host" would let it past a route that rejects
//!   `*.ads.example`. `host: None` is a head that names none: no authority
//!   (HTTP/1.0 without Host), or an empty Host (RFC 9112 §3.2: a target
//!   without an authority).
//! - What servers take, the sniffer takes, so that a client cannot make a
//!   request a server serves look like another protocol: empty lines before
//!   the request line (RFC 9112 §2.2: servers SHOULD ignore them) and runs of
//!   spaces between the request line's words (nginx takes both).
//! - Lines folded with leading whitespace (obs-fold) are an error, as is
//!   whitespace before a header's colon: nginx refuses both, and each is a
//!   request-smuggling vector.

use std::net::Ipv6Addr;

use thiserror::Error;

use super::normalize_host_name;

/// The longest request head accepted, request line and final empty line
/// included: Node's default limit and HAProxy's default buffer size. Real
/// heads are far shorter; a longer one is more likely an attack.
pub const MAX_HEAD_LEN: usize = 16 * 1024;
/// Longer than any registered method (`UPDATEREDIRECTREF` has 17 bytes), and
/// short so that the first word of another protocol is refused quickly.
pub(super) const MAX_METHOD_LEN: usize = 20;
const VERSION_PREFIX: &[u8] = b"HTTP/1.";

/// What a request head says about where the client wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequestInfo {
    /// The method token as sent (methods are case-sensitive).
    pub method: String,
    /// See the module notes for where it comes from and its normal form.
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpError {
    #[error("request head is longer than {MAX_HEAD_LEN} bytes")]
    TooLarge,
    #[error("request line does not start with a method token and a space")]
    BadMethod,
    #[error("invalid request target")]
    BadTarget,
    #[error("request line does not end with HTTP/1.x")]
    BadVersion,
    #[error("invalid header line")]
    BadHeader,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("the host the request names is not a host name or address")]
    BadHost,
}

/// Parses the request head at the start of `buf`, everything received so
/// far; bytes after the head (a body, a pipelined request) are ignored.
///
/// `Ok(None)`: `buf` is a prefix of a valid head, more bytes are needed.
/// `Err`: `buf` does not start with a valid HTTP/1.x head, whatever follows;
/// returned as soon as the offending byte is seen (the method is checked
/// byte by byte, so other protocols are refused within a few bytes). At
/// [`MAX_HEAD_LEN`] bytes the answer is never `Ok(None)`.
pub fn parse_request_head(buf: &[u8]) -> Result<Option<HttpRequestInfo>, HttpError> {
    HeadReader::default().read(buf)
}

/// [`parse_request_head`] for a head that arrives in pieces: each
/// [`HeadReader::read`] is given everything so far (the same bytes, and
/// more) and checks the lines that ended since the last call, and the one
/// not ended yet, so a head trickled a line at a time costs about what one
/// sent whole does.
#[derive(Debug, Default)]
pub struct HeadReader {
    /// Where the first line not yet complete starts.
    line_start: usize,
    /// The request line's method and target, once it is complete.
    request: Option<(Vec<u8>, Vec<u8>)>,
    host_header: Option<Vec<u8>>,
}

impl HeadReader {
    /// [`parse_request_head`]'s answer for `buf`, which must start with the
    /// bytes of the calls before; once it is an answer, not `Ok(None)`, the
    /// reader is done.
    pub fn read(&mut self, buf: &[u8]) -> Result<Option<HttpRequestInfo>, HttpError> {
        let window = &buf[..buf.len().min(MAX_HEAD_LEN)];
        let fresh = &window[self.line_start.min(window.len())..];
        for raw in fresh.split_inclusive(|&b| b == b'\n') {
            let (line, complete) = split_eol(raw);
            match &self.request {
                // Empty lines before the request line are skipped.
                None if complete && line.is_empty() => {}
                None => {
                    let Some(RequestLine { method, target }) = request_line(line, complete)? else {
                        return need_more(buf);
                    };
                    self.request = Some((method.to_vec(), target.to_vec()));
                }
                Some((method, target)) if complete && line.is_empty() => {
                    let target_authority = absolute_form_authority(target)
                        .or_else(|| (method == b"CONNECT").then_some(&target[..]));
                    let host = match (target_authority, self.host_header.as_deref()) {
                        // An empty Host: a target without an authority.
                        (None, None | Some(b"")) => None,
                        // An empty authority in the target is refused by
                        // servers (RFC 9110 §4.2.1), or replaced by Host.
                        (Some(authority), _) | (None, Some(authority)) => {
                            Some(host_of(authority).ok_or(HttpError::BadHost)?)
                        }
                    };
                    return Ok(Some(HttpRequestInfo {
                        method: String::from_utf8_lossy(method).into_owned(),
                        host,
                    }));
                }
                Some(_) => {
                    let Some(Field { name, value }) = header_line(line, complete)? else {
                        return need_more(buf);
                    };
                    if name.eq_ignore_ascii_case(b"host")
                        && self.host_header.replace(value.to_vec()).is_some()
                    {
                        return Err(HttpError::DuplicateHost);
                    }
                }
            }
            self.line_start += raw.len();
        }
        need_more(buf)
    }
}

/// Token characters (RFC 9110 §5.6.2): what methods and field names are
/// made of.
pub(super) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn need_more(buf: &[u8]) -> Result<Option<HttpRequestInfo>, HttpError> {
    if buf.len() >= MAX_HEAD_LEN {
        Err(HttpError::TooLarge)
    } else {
        Ok(None)
    }
}

/// A line without its end, and whether the end has arrived. An unfinished
/// line loses a trailing CR too, as the LF may follow.
fn split_eol(raw: &[u8]) -> (&[u8], bool) {
    let (line, complete) = match raw.strip_suffix(b"\n") {
        Some(line) => (line, true),
        None => (raw, false),
    };
    (line.strip_suffix(b"\r").unwrap_or(line), complete)
}

struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
}

/// `method SP request-target SP HTTP/1.x`, checked as far as it has arrived;
/// a run of spaces where a space goes, and after the version.
fn request_line(line: &[u8], complete: bool) -> Result<Option<RequestLine<'_>>, HttpError> {
    let (method, rest) = word(line);
    if method.len() > MAX_METHOD_LEN || !method.iter().all(|&b| is_token_byte(b)) {
        return Err(HttpError::BadMethod);
    }
    let Some(rest) = rest else {
        return if complete {
            Err(HttpError::BadMethod)
        } else {
            Ok(None)
        };
    };
    if method.is_empty() {
        return Err(HttpError::BadMethod);
    }
    let (target, rest) = word(rest);
    // Visible ASCII, plus the raw UTF-8 that some clients send unencoded.
    if !target.iter().all(|&b| b > b' ' && b != 0x7f) {
        return Err(HttpError::BadTarget);
    }
    let Some(rest) = rest else {
        return match (complete, target.is_empty()) {
            (false, _) => Ok(None),
            (true, true) => Err(HttpError::BadTarget),
            (true, false) => Err(HttpError::BadVersion),
        };
    };
    let (version, after) = word(rest);
    let version_so_far_ok = version.len() <= VERSION_PREFIX.len() + 1
        && version
            .iter()
            .enumerate()
            .all(|(i, &b)| match VERSION_PREFIX.get(i) {
                Some(&want) => b == want,
                None => b.is_ascii_digit(),
            });
    let ended = after.is_some();
    if !version_so_far_ok
        || after.is_some_and(|after| !after.is_empty())
        || ((complete || ended) && version.len() != VERSION_PREFIX.len() + 1)
    {
        return Err(HttpError::BadVersion);
    }
    Ok(complete.then_some(RequestLine { method, target }))
}

/// The bytes before the first space, and those after the run of spaces
/// that follows them (`None`: no space yet).
fn word(text: &[u8]) -> (&[u8], Option<&[u8]>) {
    match text.iter().position(|&b| b == b' ') {
        None => (text, None),
        Some(space) => {
            let spaces = text[space..].iter().take_while(|&&b| b == b' ').count();
            (&text[..space], Some(&text[space + spaces..]))
        }
    }
}

struct Field<'a> {
    name: &'a [u8],
    value: &'a [u8],
}

/// `field-name ":" OWS field-value OWS`, checked as far as it has arrived.
fn header_line(line: &[u8], complete: bool) -> Result<Option<Field<'_>>, HttpError> {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return if complete || !line.iter().all(|&b| is_token_byte(b)) {
            Err(HttpError::BadHeader)
        } else {
            Ok(None)
        };
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    // No controls but HTAB in a value: a NUL or stray CR here is an attack.
    let value_ok = value
        .iter()
        .all(|&b| b == b'\t' || (b >= b' ' && b != 0x7f));
    if name.is_empty() || !name.iter().all(|&b| is_token_byte(b)) || !value_ok {
        return Err(HttpError::BadHeader);
    }
    Ok(complete.then_some(Field {
        name,
        value: value.trim_ascii(),
    }))
}

/// The authority of an absolute-form target (`scheme://authority/...`),
/// without userinfo. `None` for the other forms.
fn absolute_form_authority(target: &[u8]) -> Option<&[u8]> {
    let sep = target.windows(3).position(|w| w == b"://")?;
    let (scheme, rest) = (&target[..sep], &target[sep + 3..]);
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok {
        return None;
    }
    let end = rest
        .iter()
        .position(|b| b"/?#".contains(b))
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    Some(match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    })
}

/// The normal form of the host of `host [":" port]` (RFC 9110 §7.2), `None`
/// if it is not a name or address. The port is not looked at: servers pick
/// by the host before it.
fn host_of(host_port: &[u8]) -> Option<String> {
    if let Some(rest) = host_port.strip_prefix(b"[") {
        let close = rest.iter().position(|&b| b == b']')?;
        if !matches!(rest.get(close + 1), None | Some(b':')) {
            return None;
        }
        let addr: Ipv6Addr = std::str::from_utf8(&rest[..close]).ok()?.parse().ok()?;
        return Some(addr.to_string());
    }
    let colon = host_port
        .iter()
        .position(|&b| b == b':')
        .unwrap_or(host_port.len());
    normalize_host_name(&host_port[..colon])
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURL: &[u8] = include_bytes!("fixtures/http_curl.http");
    const CURL_UPPER_HOST: &[u8] = include_bytes!("fixtures/http_curl_upper_host.http");
    const CURL_PROXY: &[u8] = include_bytes!("fixtures/http_curl_proxy.http");
    const CURL_10_NO_HOST: &[u8] = include_bytes!("fixtures/http_curl_10_no_host.http");
    const CURL_POST: &[u8] = include_bytes!("fixtures/http_curl_post.http");

    /// Each fixture with the method and host its head should give.
    const FIXTURES: &[(&str, &[u8], &str, Option<&str>)] = &[
        // Host: web.example.test:<port>
        ("http_curl", CURL, "GET", Some("web.example.test")),
        (
            "http_curl_upper_host",
            CURL_UPPER_HOST,
            "GET",
            Some("upper.example.com"),
        ),
        // GET http://Proxied.Example.ORG/some/path?q=1
        (
            "http_curl_proxy",
            CURL_PROXY,
            "GET",
            Some("proxied.example.org"),
        ),
        ("http_curl_10_no_host", CURL_10_NO_HOST, "GET", None),
        // A body follows the head.
        (
            "http_curl_post",
            CURL_POST,
            "POST",
            Some("post.example.net"),
        ),
    ];

    fn info(method: &str, host: Option<&str>) -> HttpRequestInfo {
        HttpRequestInfo {
            method: method.into(),
            host: host.map(String::from),
        }
    }

    fn host(head: &str) -> Option<String> {
        match parse_request_head(head.as_bytes()) {
            Ok(Some(info)) => info.host,
            other => panic!("{head:?} gave {other:?}"),
        }
    }

    fn err(head: &str) -> HttpError {
        match parse_request_head(head.as_bytes()) {
            Err(e) => e,
            other => panic!("{head:?} gave {other:?}"),
        }
    }

    #[test]
    fn fixtures_parse_after_every_prefix() {
        for &(name, input, method, host) in FIXTURES {
            let head_len = input.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            for end in 0..head_len {
                assert_eq!(
                    parse_request_head(&input[..end]),
                    Ok(None),
                    "{name}: prefix of {end} bytes"
                );
            }
            for end in head_len..=input.len() {
                assert_eq!(
                    parse_request_head(&input[..end]),
                    Ok(Some(info(method, host))),
                    "{name}: {end} bytes"
                );
            }
        }
    }

    #[test]
    fn host_header_forms() {
        let cases = [
            ("example.com", Some("example.com")),
            ("example.com:8080", Some("example.com")),
            ("example.com:", Some("example.com")),
            ("WWW.Example.COM.:443", Some("www.example.com")),
            ("192.0.2.7:80", Some("192.0.2.7")),
            ("[::1]", Some("::1")),
            ("[0:0::1]:8080", Some("::1")),
            ("[2001:DB8::A]:80", Some("2001:db8::a")),
            // The port is not looked at, as nginx picks by the name.
            ("example.com:http", Some("example.com")),
            ("exa_mple.com:80:80", Some("exa_mple.com")),
        ];
        let head =
            |value: &str| format!("GET / HTTP/1.1\r\nAccept: */*\r\nhOsT: \t{value} \r\n\r\n");
        for (value, want) in cases {
            assert_eq!(host(&head(value)).as_deref(), want, "Host: {value:?}");
        }
        // Empty: a target without an authority (RFC 9112 §3.2) names none.
        assert_eq!(host(&head("")), None);
        // Not a name or address: an error, not "no host" (nginx would pick
        // the `*.ads.example` server for the first).
        for value in [
            "x!.ads.example",
            "-x.ads.example",
            "%78.ads.example",
            "\u{fc}.ads.example",
            "::1",
            "[::1",
            "[::1]x",
            "[example.com]",
            "user@example.com",
            "bad!name",
        ] {
            assert_eq!(err(&head(value)), HttpError::BadHost, "Host: {value:?}");
        }
    }

    #[test]
    fn target_forms() {
        let cases = [
            (
                "GET http://Example.COM:8080/x HTTP/1.1\r\nHost: other\r\n\r\n",
                Some("example.com"),
            ),
            (
                "GET HTTPS://user:pw@secure.example/ HTTP/1.1\r\n\r\n",
                Some("secure.example"),
            ),
            (
                "GET http://q.example?x=1 HTTP/1.1\r\n\r\n",
                Some("q.example"),
            ),
            ("OPTIONS http://[::1]:80 HTTP/1.1\r\n\r\n", Some("::1")),
            (
                "CONNECT Tunnel.Example:443 HTTP/1.1\r\nHost: other\r\n\r\n",
                Some("tunnel.example"),
            ),
            (
                "OPTIONS * HTTP/1.1\r\nHost: star.example\r\n\r\n",
                Some("star.example"),
            ),
            // Not a scheme: an origin-form path that happens to contain "://".
            (
                "GET /r?u=http://x.example HTTP/1.1\r\nHost: real.example\r\n\r\n",
                Some("real.example"),
            ),
            ("GET / HTTP/1.1\r\n\r\n", None),
        ];
        for (head, want) in cases {
            assert_eq!(host(head).as_deref(), want, "{head:?}");
        }
        // The target's authority is what the server goes by: a bad one is
        // an error whatever Host says.
        for head in [
            "GET http:///nohost HTTP/1.1\r\nHost: a.ads.example\r\n\r\n",
            "GET http://x!.ads.example/ HTTP/1.1\r\nHost: fine.example\r\n\r\n",
            "CONNECT bad!name:443 HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(err(head), HttpError::BadHost, "{head:?}");
        }
    }

    #[test]
    fn bare_lf_ends_lines() {
        let head = "PUT /x HTTP/1.0\nHost: lf.example\nX: 1\r\n\n";
        assert_eq!(
            parse_request_head(head.as_bytes()),
            Ok(Some(info("PUT", Some("lf.example"))))
        );
        for end in 0..head.len() {
            assert_eq!(
                parse_request_head(&head.as_bytes()[..end]),
                Ok(None),
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn too_large() {
        let mut head = b"GET / HTTP/1.1\r\nHost: a.example\r\nCookie: ".to_vec();
        head.resize(MAX_HEAD_LEN - 1, b'c');
        assert_eq!(parse_request_head(&head), Ok(None));
        head.push(b'c');
        assert_eq!(parse_request_head(&head), Err(HttpError::TooLarge));
        // Exactly at the bound, a complete head is still accepted.
        head.truncate(MAX_HEAD_LEN - 4);
        head.extend(b"\r\n\r\n");
        assert_eq!(
            parse_request_head(&head),
            Ok(Some(info("GET", Some("a.example"))))
        );
    }

    /// What nginx takes: empty lines before the request line, runs of
    /// spaces between its words and after the version.
    #[test]
    fn heads_servers_take() {
        for head in [
            "\r\nGET / HTTP/1.1\r\nHost: admin.example\r\n\r\n",
            "\n\r\n\r\nGET / HTTP/1.1\r\nHost: admin.example\r\n\r\n",
            "GET  /x   HTTP/1.1\r\nHost: admin.example\r\n\r\n",
            "GET / HTTP/1.1  \r\nHost: admin.example\r\n\r\n",
        ] {
            assert_eq!(host(head).as_deref(), Some("admin.example"), "{head:?}");
        }
    }

    #[test]
    fn malformed_heads() {
        let cases = [
            ("get / http/1.1\r\n\r\n", HttpError::BadVersion),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", HttpError::BadVersion),
            ("GET /\r\n", HttpError::BadVersion),
            ("GET / HTTP/1.1 x\r\n", HttpError::BadVersion),
            ("GET / HTTP/1.11\r\n", HttpError::BadVersion),
            ("GET / HTTP/1.1\r\r\n", HttpError::BadVersion),
            ("GET\r\n", HttpError::BadMethod),
            (" GET / HTTP/1.1\r\n", HttpError::BadMethod),
            ("G(T / HTTP/1.1\r\n", HttpError::BadMethod),
            ("GET  \r\n", HttpError::BadTarget),
            ("GET /a\tb HTTP/1.1\r\n", HttpError::BadTarget),
            ("GET /\x7f HTTP/1.1\r\n", HttpError::BadTarget),
            (
                "GET / HTTP/1.1\r\nHost : a.example\r\n\r\n",
                HttpError::BadHeader,
            ),
            (
                "GET / HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n",
                HttpError::BadHeader,
            ),
            ("GET / HTTP/1.1\r\nNo colon\r\n\r\n", HttpError::BadHeader),
            (
                "GET / HTTP/1.1\r\n: empty name\r\n\r\n",
                HttpError::BadHeader,
            ),
            ("GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", HttpError::BadHeader),
            ("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", HttpError::BadHeader),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHOST: b\r\n\r\n",
                HttpError::DuplicateHost,
            ),
        ];
        for (head, want) in cases {
            assert_eq!(err(head), want, "{head:?}");
        }
    }

    #[test]
    fn refuses_early() {
        // Each is refused at its last byte, before any line end.
        let cases = [
            ("SSH-2.0-OpenSSH_9.2p1", HttpError::BadMethod),
            ("GET /x\0", HttpError::BadTarget),
            ("GET / X", HttpError::BadVersion),
            ("GET / HTTP/2", HttpError::BadVersion),
            ("GET / HTTP/1.1\r\nX:\x01", HttpError::BadHeader),
            ("GET / HTTP/1.1\r\nX ", HttpError::BadHeader),
        ];
        for (head, want) in cases {
            assert_eq!(err(head), want, "{head:?}");
            assert_eq!(
                parse_request_head(&head.as_bytes()[..head.len() - 1]),
                Ok(None),
                "{head:?}"
            );
        }
    }
}
