//! The request head an explicit proxy's client sends (RFC 9110 §9.3.6
//! CONNECT, with the authority-form target of RFC 9112 §3.2.3), and the fixed
//! answers the CONNECT listener sends back.
//!
//! Pure, no I/O: the listener peeks at the socket, calls [`parse`] with
//! everything received so far, and once it has a [`Request`] consumes exactly
//! [`Request::head_len`] bytes; what follows is the tunnel's early data. Bytes
//! are checked one by one and each is refused as soon as no valid head can
//! contain it, so a client speaking something else is turned away at once, and
//! every prefix of an input gives `Ok(None)` or the same answer as the whole.
//!
//! Accepted and refused, where the RFCs leave room:
//! - A bare LF ends a line as CRLF does (RFC 9112 §2.2 lets a recipient accept
//!   it); a CR anywhere but before LF is a control character.
//! - HTTP/1.0 and HTTP/1.1 only. Methods are case-sensitive (RFC 9110 §9.1):
//!   only `CONNECT` is CONNECT; any other token, `connect` included, is
//!   [`Method::Other`] with its head parsed in full, so the caller can answer
//!   405. Its target is checked for syntax only.
//! - Refused, as no real client sends them and each is a smuggling vector:
//!   empty lines before the request line, separators other than one SP,
//!   whitespace before a header's colon (RFC 9112 §5.1), obs-fold.
//! - The CONNECT target is `host:port` and nothing else: no userinfo, no
//!   percent-encoding, no IPv6 zone ID. The port is required, decimal, 1 to
//!   65535, without leading zeros (RFC 3986 allows them, no client sends them,
//!   and one spelling per port keeps logs unambiguous).
//! - A host name has labels of 1 to 63 letters, digits, `-` or `_`
//!   (underscores occur in real internal names, and `sniff` accepts them too),
//!   none starting or ending with `-`, at most 253 bytes once one trailing dot
//!   is removed; it is lower-cased. A name whose last label is a number
//!   (`127.1`, `0x7f.0.0.1`, `010.0.0.1`) must be a plain dotted quad:
//!   resolvers read the others as IPv4 addresses, which would slip past rules
//!   on addresses.
//! - An IPv6 literal is kept as written, IPv4-mapped ones included: the caller
//!   canonicalises.
//! - Only Proxy-Authorization is kept: one at most, ASCII, surrounding
//!   whitespace trimmed. Other fields are checked for syntax and ignored.
//! - Host is ignored too (the target is what counts), but one at most, and
//!   `host[:port]` (RFC 9112 §3.2): a second one or a malformed one is a
//!   head another HTTP parser on the way may read otherwise. A missing Host
//!   is accepted, as Squid accepts it on CONNECT: its authority is the
//!   target.

#![forbid(unsafe_code)]

use base64::Engine as _;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::sniff::normalize_host_name;

/// The longest head accepted, request line and final empty line included:
/// the same bound as `sniff::http`. Real CONNECT heads are a few hundred
/// bytes.
pub const MAX_HEAD_LEN: usize = 16 * 1024;
/// Longer than any registered method (`UPDATEREDIRECTREF` has 17 bytes), and
/// short so that the first word of another protocol is refused quickly.
const MAX_METHOD_LEN: usize = 20;
/// A 253-byte name with its trailing dot, `:` and five digits. A bracketed
/// IPv6 literal with port is at most 53 bytes.
const MAX_AUTHORITY_LEN: usize = 253 + 1 + 1 + 5;
const CONNECT: &[u8] = b"CONNECT";
const VERSION_NAME: &[u8] = b"HTTP/";
/// `HTTP/1.x`.
const VERSION_LEN: usize = 8;

/// A complete request head.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Where to connect: `Some` exactly when the method is
    /// [`Method::Connect`]. Other methods' targets are not kept.
    pub target: Option<Target>,
    /// `(1, 0)` or `(1, 1)`.
    pub version: (u8, u8),
    /// The Proxy-Authorization value without surrounding whitespace; see
    /// [`basic_credentials`]. `Debug` does not show it.
    pub proxy_authorization: Option<String>,
    /// The bytes the head takes, final empty line included: what the listener
    /// consumes before the tunnel's data.
    pub head_len: usize,
}

// By hand, so that a logged request never carries credentials.
impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("version", &self.version)
            .field(
                "proxy_authorization",
                &self.proxy_authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("head_len", &self.head_len)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Connect,
    /// Any other method token, as sent: the caller answers 405.
    Other(String),
}

/// The authority of a CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lower-cased, without a trailing dot.
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(addr)) => write!(f, "{addr}"),
            Host::Ip(IpAddr::V6(addr)) => write!(f, "[{addr}]"),
        }
    }
}

/// `host:port` in authority form: what a CONNECT line carries.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Why a head is refused. Every variant is answered with
/// [`Status::BadRequest`]; the message is for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HeadError {
    #[error("request head is longer than {MAX_HEAD_LEN} bytes")]
    TooLarge,
    #[error("control character {0:#04x} in the request head")]
    ControlCharacter(u8),
    #[error("request line is not `method SP target SP HTTP-version`")]
    BadRequestLine,
    #[error("method is not a token of 1 to {MAX_METHOD_LEN} bytes")]
    BadMethod,
    #[error("HTTP version other than 1.x")]
    UnsupportedVersion,
    #[error("CONNECT target: {0}")]
    BadAuthority(#[from] AuthorityError),
    #[error("header line: {0}")]
    BadHeaderLine(#[from] HeaderLineError),
    #[error("more than one Proxy-Authorization field")]
    DuplicateProxyAuthorization,
    #[error("more than one Host field")]
    DuplicateHost,
    #[error("Host value is not host[:port]")]
    BadHost,
    #[error("Proxy-Authorization value is not ASCII")]
    NonAsciiProxyAuthorization,
}

/// What is wrong with a CONNECT target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AuthorityError {
    #[error("longer than {MAX_AUTHORITY_LEN} bytes")]
    TooLong,
    #[error("userinfo (`user@`) is not allowed")]
    Userinfo,
    #[error("IPv6 zone identifiers are not allowed")]
    ZoneId,
    #[error("byte {0:#04x} cannot appear in host:port")]
    BadByte(u8),
    #[error("no port")]
    MissingPort,
    #[error("port is not a decimal number from 1 to 65535 without leading zeros")]
    BadPort,
    #[error("host is not a DNS name, an IPv4 address or a bracketed IPv6 address")]
    BadHost,
    #[error("a host name ending in a number must be a dotted-quad IPv4 address")]
    NumericName,
}

/// What is wrong with a header line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HeaderLineError {
    #[error("no colon")]
    NoColon,
    #[error("whitespace before the colon")]
    WhitespaceBeforeColon,
    #[error("field name is not a token")]
    BadFieldName,
    #[error("line starts with whitespace (obs-fold)")]
    ObsFold,
}

/// Parses the request head at the start of `bytes`, everything received so
/// far; bytes after the head are not looked at.
///
/// `Ok(None)`: `bytes` is a prefix of a valid head, more are needed (never
/// when `bytes` holds [`MAX_HEAD_LEN`] or more). `Err`: no valid head starts
/// with `bytes`, whatever follows.
pub fn parse(bytes: &[u8]) -> Result<Option<Request>, HeadError> {
    Reader::default().read(bytes)
}

/// [`parse`] for a head that arrives in pieces: each [`Reader::read`] is
/// given everything so far (the same bytes, and more) and looks only at
/// what is new, so a head trickled a byte at a time costs no more than one
/// sent whole.
#[derive(Debug, Default)]
pub struct Reader {
    head: HeadParser,
    /// The bytes looked at so far.
    read: usize,
}

impl Reader {
    /// [`parse`]'s answer for `bytes`, which must start with the bytes of
    /// the calls before; once it is an answer, not `Ok(None)`, the reader
    /// is done.
    pub fn read(&mut self, bytes: &[u8]) -> Result<Option<Request>, HeadError> {
        let window = &bytes[..bytes.len().min(MAX_HEAD_LEN)];
        for at in self.read..window.len() {
            self.read = at + 1;
            if let Some(request) = self.head.step(window, at, window[at])? {
                return Ok(Some(request));
            }
        }
        if bytes.len() >= MAX_HEAD_LEN {
            Err(HeadError::TooLarge)
        } else {
            Ok(None)
        }
    }
}

/// Where in the head the next byte falls. Offsets index the parsed window.
#[derive(Debug, Clone, Copy, Default)]
enum State {
    #[default]
    Method,
    Target {
        start: usize,
    },
    Version {
        start: usize,
    },
    /// The start of a header line, or of the empty line that ends the head.
    LineStart,
    FieldName {
        start: usize,
    },
    /// Whitespace after a field name: only more of it, or an error, follows.
    AfterFieldName,
    FieldValue {
        name_start: usize,
        colon: usize,
    },
}

/// A one-pass, byte-at-a-time parser: whether a byte is refused depends only
/// on the bytes before it, which is what makes prefixes agree with the whole.
#[derive(Debug, Default)]
struct HeadParser {
    state: State,
    /// The last byte was a CR: only LF may follow.
    after_cr: bool,
    /// The method is `window[..method_end]`.
    method_end: usize,
    target: Option<Target>,
    minor_version: u8,
    proxy_authorization: Option<String>,
    /// A Host field was seen.
    host: bool,
}

impl HeadParser {
    fn step(&mut self, window: &[u8], at: usize, byte: u8) -> Result<Option<Request>, HeadError> {
        if self.after_cr {
            if byte != b'\n' {
                return Err(HeadError::ControlCharacter(b'\r'));
            }
            self.after_cr = false;
            return self.line_end(window, at, at - 1);
        }
        match byte {
            b'\r' => {
                self.after_cr = true;
                Ok(None)
            }
            b'\n' => self.line_end(window, at, at),
            // HTAB is whitespace in header lines; the states refuse it elsewhere.
            b'\t' => self.content(window, at, byte).map(|()| None),
            0..=0x1f | 0x7f => Err(HeadError::ControlCharacter(byte)),
            _ => self.content(window, at, byte).map(|()| None),
        }
    }

    /// A byte inside a line (not CR or LF).
    fn content(&mut self, window: &[u8], at: usize, byte: u8) -> Result<(), HeadError> {
        match self.state {
            State::Method => match byte {
                b' ' if at == 0 => Err(HeadError::BadMethod),
                b' ' => {
                    self.method_end = at;
                    self.state = State::Target { start: at + 1 };
                    Ok(())
                }
                _ if is_token_byte(byte) && at < MAX_METHOD_LEN => Ok(()),
                _ => Err(HeadError::BadMethod),
            },
            State::Target { start } => match byte {
                b' ' if at == start => Err(HeadError::BadRequestLine),
                b' ' => {
                    if self.is_connect(window) {
                        self.target = Some(authority(&window[start..at])?);
                    }
                    self.state = State::Version { start: at + 1 };
                    Ok(())
                }
                b'\t' => Err(HeadError::BadRequestLine),
                _ if self.is_connect(window) => Ok(authority_byte(&window[start..at], byte)?),
                // Other targets: visible ASCII, and the raw UTF-8 some
                // clients send unencoded.
                _ => Ok(()),
            },
            State::Version { start } => version_byte(at - start, byte),
            State::LineStart => match byte {
                b' ' | b'\t' => Err(HeaderLineError::ObsFold.into()),
                _ if is_token_byte(byte) => {
                    self.state = State::FieldName { start: at };
                    Ok(())
                }
                _ => Err(HeaderLineError::BadFieldName.into()),
            },
            State::FieldName { start } => match byte {
                b':' => {
                    self.state = State::FieldValue {
                        name_start: start,
                        colon: at,
                    };
                    Ok(())
                }
                b' ' | b'\t' => {
                    self.state = State::AfterFieldName;
                    Ok(())
                }
                _ if is_token_byte(byte) => Ok(()),
                _ => Err(HeaderLineError::BadFieldName.into()),
            },
            State::AfterFieldName => match byte {
                b' ' | b'\t' => Ok(()),
                b':' => Err(HeaderLineError::WhitespaceBeforeColon.into()),
                _ => Err(HeaderLineError::BadFieldName.into()),
            },
            // SP, HTAB, visible ASCII and obs-text (RFC 9110 §5.5); the
            // controls were refused before.
            State::FieldValue { .. } => Ok(()),
        }
    }

    /// A line ends at `window[at]` (its LF); its content ends before
    /// `content_end`.
    fn line_end(
        &mut self,
        window: &[u8],
        at: usize,
        content_end: usize,
    ) -> Result<Option<Request>, HeadError> {
        match self.state {
            State::Method | State::Target { .. } => Err(HeadError::BadRequestLine),
            State::Version { start } => {
                if content_end - start != VERSION_LEN {
                    return Err(HeadError::BadRequestLine);
                }
                self.minor_version = (window[content_end - 1] - b'0').min(1);
                self.state = State::LineStart;
                Ok(None)
            }
            State::FieldName { .. } | State::AfterFieldName => Err(HeaderLineError::NoColon.into()),
            State::FieldValue { name_start, colon } => {
                self.field(&window[name_start..colon], &window[colon + 1..content_end])?;
                self.state = State::LineStart;
                Ok(None)
            }
            State::LineStart => Ok(Some(Request {
                method: if self.is_connect(window) {
                    Method::Connect
                } else {
                    Method::Other(ascii_string(&window[..self.method_end]))
                },
                target: self.target.take(),
                version: (1, self.minor_version),
                proxy_authorization: self.proxy_authorization.take(),
                head_len: at + 1,
            })),
        }
    }

    /// A complete header field.
    fn field(&mut self, name: &[u8], value: &[u8]) -> Result<(), HeadError> {
        if name.eq_ignore_ascii_case(b"host") {
            if std::mem::replace(&mut self.host, true) {
                return Err(HeadError::DuplicateHost);
            }
            if !is_host_value(value.trim_ascii()) {
                return Err(HeadError::BadHost);
            }
            return Ok(());
        }
        if !name.eq_ignore_ascii_case(b"proxy-authorization") {
            return Ok(());
        }
        if self.proxy_authorization.is_some() {
            return Err(HeadError::DuplicateProxyAuthorization);
        }
        // Credentials are ASCII (RFC 9110 §11.4); anything else cannot match
        // and would have to be logged lossily.
        let value = value.trim_ascii();
        if !value.is_ascii() {
            return Err(HeadError::NonAsciiProxyAuthorization);
        }
        self.proxy_authorization = Some(ascii_string(value));
        Ok(())
    }

    /// Only meaningful once the method has ended.
    fn is_connect(&self, window: &[u8]) -> bool {
        &window[..self.method_end] == CONNECT
    }
}

/// Whether a Host value is `uri-host [ ":" port ]` (RFC 9110 §7.2): a host
/// name or IPv4 address as targets take them, or a bracketed IPv6 address,
/// and a port of digits (possibly none).
fn is_host_value(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        // A colon inside brackets is the IPv6 address's own.
        Some(colon) if !value[colon..].contains(&b']') => (&value[..colon], &value[colon + 1..]),
        _ => (value, &b""[..]),
    };
    if !port.iter().all(u8::is_ascii_digit) {
        return false;
    }
    match host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        Some(ipv6) => std::str::from_utf8(ipv6).is_ok_and(|a| a.parse::<Ipv6Addr>().is_ok()),
        None => normalize_host_name(host).is_some(),
    }
}

/// Token characters (RFC 9110 §5.6.2): what methods and field names are made
/// of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Callers pass only ASCII bytes.
fn ascii_string(bytes: &[u8]) -> String {
    bytes.iter().copied().map(char::from).collect()
}

/// Byte `pos` of the version, `HTTP/1.d`: a later minor version is read as
/// 1.1, the highest this parser knows (RFC 9110 §2.5); a well-formed
/// `HTTP/d.d` of another major version is unsupported, anything else is
/// not a request line.
fn version_byte(pos: usize, byte: u8) -> Result<(), HeadError> {
    match (pos, byte) {
        (0..5, _) if byte == VERSION_NAME[pos] => Ok(()),
        (5, b'1') | (6, b'.') | (7, b'0'..=b'9') => Ok(()),
        (5, b'0'..=b'9') => Err(HeadError::UnsupportedVersion),
        _ => Err(HeadError::BadRequestLine),
    }
}

/// The next byte of a CONNECT target, after `so_far`: refuses at once what
/// no `host:port` can hold. [`authority`] checks the structure at the end.
fn authority_byte(so_far: &[u8], byte: u8) -> Result<(), AuthorityError> {
    if so_far.len() >= MAX_AUTHORITY_LEN {
        return Err(AuthorityError::TooLong);
    }
    let in_brackets = so_far.first() == Some(&b'[') && !so_far.contains(&b']');
    match byte {
        b'@' => Err(AuthorityError::Userinfo),
        b'%' if in_brackets => Err(AuthorityError::ZoneId),
        _ if byte.is_ascii_alphanumeric() || b"-._:[]".contains(&byte) => Ok(()),
        _ => Err(AuthorityError::BadByte(byte)),
    }
}

/// A whole CONNECT target whose bytes [`authority_byte`] let through.
fn authority(target: &[u8]) -> Result<Target, AuthorityError> {
    let (host, port) = if let Some(rest) = target.strip_prefix(b"[") {
        let close = rest
            .iter()
            .position(|&b| b == b']')
            .ok_or(AuthorityError::BadHost)?;
        let addr: Ipv6Addr = std::str::from_utf8(&rest[..close])
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or(AuthorityError::BadHost)?;
        let port = match &rest[close + 1..] {
            [] => return Err(AuthorityError::MissingPort),
            [b':', port @ ..] => port,
            _ => return Err(AuthorityError::BadHost),
        };
        (Host::Ip(addr.into()), port)
    } else {
        let colon = target
            .iter()
            .position(|&b| b == b':')
            .ok_or(AuthorityError::MissingPort)?;
        (host(&target[..colon])?, &target[colon + 1..])
    };
    Ok(Target {
        host,
        port: port_number(port)?,
    })
}

/// A host outside brackets: a DNS name or a dotted-quad IPv4 address.
fn host(raw: &[u8]) -> Result<Host, AuthorityError> {
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    let last_label = name.rsplit(|&b| b == b'.').next().unwrap_or_default();
    if ends_in_number(last_label) {
        return std::str::from_utf8(name)
            .ok()
            .and_then(|text| text.parse::<Ipv4Addr>().ok())
            .map(|addr| Host::Ip(addr.into()))
            .ok_or(AuthorityError::NumericName);
    }
    // The same names SNI and Host may carry.
    normalize_host_name(raw)
        .map(Host::Name)
        .ok_or(AuthorityError::BadHost)
}

/// The WHATWG URL standard's test for a host that resolvers read as IPv4:
/// a last label of decimal digits, or `0x` and hex digits.
fn ends_in_number(label: &[u8]) -> bool {
    match label {
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        [] => false,
        _ => label.iter().all(u8::is_ascii_digit),
    }
}

fn port_number(digits: &[u8]) -> Result<u16, AuthorityError> {
    match digits {
        [] => Err(AuthorityError::MissingPort),
        [b'0', ..] => Err(AuthorityError::BadPort),
        _ if digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit) => {
            let value = digits
                .iter()
                .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
            u16::try_from(value).map_err(|_| AuthorityError::BadPort)
        }
        _ => Err(AuthorityError::BadPort),
    }
}

/// The answers the CONNECT listener sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200: the tunnel is up; the client's next bytes go to the target.
    Established,
    /// 400: the head was refused ([`HeadError`]).
    BadRequest,
    /// 403: the policy does not allow the target.
    Forbidden,
    /// 405: not CONNECT.
    MethodNotAllowed,
    /// 407: credentials missing or wrong.
    ProxyAuthenticationRequired,
    /// 502: the target refused the connection or could not be resolved.
    BadGateway,
    /// 504: the target did not answer in time.
    GatewayTimeout,
    /// 503: the proxy cannot check the credentials now (too many waiting).
    ServiceUnavailable,
    /// 505: an HTTP version other than 1.x.
    VersionNotSupported,
}

#[cfg(test)]
impl Status {
    /// The status code, which the answers' tests check.
    pub fn code(self) -> u16 {
        match self {
            Status::Established => 200,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::MethodNotAllowed => 405,
            Status::ProxyAuthenticationRequired => 407,
            Status::BadGateway => 502,
            Status::GatewayTimeout => 504,
            Status::ServiceUnavailable => 503,
            Status::VersionNotSupported => 505,
        }
    }
}

/// The whole response for `status`. Every answer but 200 has no body and
/// closes the connection: the listener serves one CONNECT per connection.
pub fn answer(status: Status) -> &'static [u8] {
    match status {
        Status::Established => b"HTTP/1.1 200 Connection established\r\n\r\n",
        Status::BadRequest => {
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
        Status::Forbidden => {
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
        Status::MethodNotAllowed => {
            b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n"
        }
        Status::ProxyAuthenticationRequired => {
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\
              Proxy-Authenticate: Basic realm=\"l4proxy\"\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n"
        }
        Status::BadGateway => {
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
        Status::GatewayTimeout => {
            b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
        Status::ServiceUnavailable => {
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n"
        }
        Status::VersionNotSupported => {
            b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Length: 0\r\n\
              Connection: close\r\n\r\n"
        }
    }
}

/// The user and password of a `Basic` Proxy-Authorization value (RFC 7617):
/// the scheme in any case, one or more SP, then `base64(user:password)` in
/// the standard alphabet with its padding. `None` for any other scheme, bad
/// base64, decoded text that is not UTF-8, has no colon, or holds a control
/// character (RFC 7617 §2 forbids them; they would also reach the log). The
/// password may contain colons, the user may not.
pub fn basic_credentials(header_value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header_value.trim_matches([' ', '\t']).split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(decode_base64(encoded.trim_start_matches(' '))?).ok()?;
    if decoded.chars().any(char::is_control) {
        return None;
    }
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Standard base64 (RFC 4648 §4), padded, canonical: the bits after the last
/// byte must be zero, so each byte string has one encoding.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURL: &[u8] = include_bytes!("fixtures/connect_curl.bin");
    const CURL_AUTH: &[u8] = include_bytes!("fixtures/connect_curl_auth.bin");
    const CURL_IPV6: &[u8] = include_bytes!("fixtures/connect_curl_ipv6.bin");
    const CURL_HTTP10: &[u8] = include_bytes!("fixtures/connect_curl_http10.bin");
    const CURL_TUNNEL: &[u8] = include_bytes!("fixtures/connect_curl_tunnel.bin");
    const CHROMIUM: &[u8] = include_bytes!("fixtures/connect_chromium.bin");
    const GET_CURL: &[u8] = include_bytes!("fixtures/get_curl.bin");
    const GET_CHROMIUM: &[u8] = include_bytes!("fixtures/get_chromium.bin");
    /// A real TLS ClientHello (sniff's fixture): early data a client may send
    /// right behind its head.
    const CLIENT_HELLO: &[u8] = include_bytes!("../sniff/fixtures/tls_curl.bin");

    fn name(host: &str, port: u16) -> Option<Target> {
        Some(Target {
            host: Host::Name(host.into()),
            port,
        })
    }

    fn ip(addr: &str, port: u16) -> Option<Target> {
        Some(Target {
            host: Host::Ip(addr.parse().unwrap()),
            port,
        })
    }

    fn head_len(input: &[u8]) -> usize {
        input.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4
    }

    /// Each fixture with the request its head should give (`head_len` is
    /// filled in from the first CRLFCRLF).
    fn fixtures() -> Vec<(&'static str, &'static [u8], Request)> {
        let request = |input: &[u8], method: Method, target, minor, auth: Option<&str>| Request {
            method,
            target,
            version: (1, minor),
            proxy_authorization: auth.map(String::from),
            head_len: head_len(input),
        };
        let get = || Method::Other("GET".into());
        vec![
            // CONNECT example.test:443 HTTP/1.1, Host, User-Agent, Proxy-Connection.
            (
                "connect_curl",
                CURL,
                request(CURL, Method::Connect, name("example.test", 443), 1, None),
            ),
            // As connect_curl, with Proxy-Authorization: Basic dTpw (u:p).
            (
                "connect_curl_auth",
                CURL_AUTH,
                request(
                    CURL_AUTH,
                    Method::Connect,
                    name("example.test", 443),
                    1,
                    Some("Basic dTpw"),
                ),
            ),
            // CONNECT [2001:db8::1]:443 HTTP/1.1, sent over IPv6.
            (
                "connect_curl_ipv6",
                CURL_IPV6,
                request(CURL_IPV6, Method::Connect, ip("2001:db8::1", 443), 1, None),
            ),
            // CONNECT Tunnel.Example.TEST.:8443 HTTP/1.0: case and dot go.
            (
                "connect_curl_http10",
                CURL_HTTP10,
                request(
                    CURL_HTTP10,
                    Method::Connect,
                    name("tunnel.example.test", 8443),
                    0,
                    None,
                ),
            ),
            // The head, then the ClientHello curl sent once it had its 200.
            (
                "connect_curl_tunnel",
                CURL_TUNNEL,
                request(
                    CURL_TUNNEL,
                    Method::Connect,
                    name("tunnel.example.test", 443),
                    1,
                    None,
                ),
            ),
            // Chromium's own field order and user agent.
            (
                "connect_chromium",
                CHROMIUM,
                request(
                    CHROMIUM,
                    Method::Connect,
                    name("example.test", 443),
                    1,
                    None,
                ),
            ),
            // GET http://example.test/some/path?q=1: a plain proxy request.
            (
                "get_curl",
                GET_CURL,
                request(GET_CURL, get(), None, 1, None),
            ),
            // Chromium's network-time GET, a long absolute-form target.
            (
                "get_chromium",
                GET_CHROMIUM,
                request(GET_CHROMIUM, get(), None, 1, None),
            ),
        ]
    }

    /// `input` is refused with `want` at its last byte, and not before.
    #[track_caller]
    fn refused_at_last_byte(input: &[u8], want: HeadError) {
        assert_eq!(
            parse(input),
            Err(want),
            "{:?}",
            input.escape_ascii().to_string()
        );
        for end in 0..input.len() {
            assert_eq!(
                parse(&input[..end]),
                Ok(None),
                "{:?}: prefix of {end} bytes",
                input.escape_ascii().to_string()
            );
        }
    }

    #[track_caller]
    fn accepted(head: &str) -> Request {
        match parse(head.as_bytes()) {
            Ok(Some(request)) => request,
            other => panic!("{head:?} gave {other:?}"),
        }
    }

    #[test]
    fn fixtures_parse_after_every_prefix() {
        for (name, input, want) in fixtures() {
            for end in 0..want.head_len {
                assert_eq!(
                    parse(&input[..end]),
                    Ok(None),
                    "{name}: prefix of {end} bytes"
                );
            }
            for end in want.head_len..=input.len() {
                assert_eq!(
                    parse(&input[..end]),
                    Ok(Some(want.clone())),
                    "{name}: {end} bytes"
                );
            }
        }
    }

    /// One `Reader` given `input` in pieces of `piece` bytes: its first
    /// answer that is not `Ok(None)`, at the length where it came.
    fn read_in_pieces(input: &[u8], piece: usize) -> (Result<Option<Request>, HeadError>, usize) {
        let mut reader = Reader::default();
        let mut end = 0;
        loop {
            end = (end + piece).min(input.len());
            let answer = reader.read(&input[..end]);
            if answer != Ok(None) || end == input.len() {
                return (answer, end);
            }
        }
    }

    #[test]
    fn a_reader_in_pieces_answers_as_parse_of_the_whole() {
        for (name, input, want) in fixtures() {
            let head = &input[..want.head_len];
            for piece in [1, 2, 3, 7, 64] {
                assert_eq!(
                    read_in_pieces(input, piece).0,
                    Ok(Some(want.clone())),
                    "{name} in pieces of {piece}"
                );
                // With a byte changed, refused or accepted as `parse` does,
                // as soon as the piece with the change is in.
                for pos in (0..head.len()).step_by(5) {
                    for byte in [0, b' ', b':', b'\r', b'\n'] {
                        let mut mutated = head.to_vec();
                        mutated[pos] = byte;
                        let (answer, at) = read_in_pieces(&mutated, piece);
                        assert_eq!(answer, parse(&mutated), "{name}, {pos} = {byte}, {piece}");
                        assert_eq!(
                            answer,
                            parse(&mutated[..at]),
                            "{name}, {pos} = {byte}, {piece}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn early_data_is_not_part_of_the_head() {
        assert_eq!(
            CURL_TUNNEL.len() - head_len(CURL_TUNNEL),
            517,
            "curl's ClientHello"
        );
        for (name, input, want) in fixtures() {
            let mut with_data = input[..want.head_len].to_vec();
            with_data.extend_from_slice(CLIENT_HELLO);
            assert_eq!(
                parse(&with_data),
                Ok(Some(want.clone())),
                "{name} + ClientHello"
            );
            // Early data that looks like more header lines changes nothing
            // either: the head ended at its empty line.
            with_data.truncate(want.head_len);
            with_data.extend_from_slice(b"Proxy-Authorization: x\r\n\r\n");
            assert_eq!(
                parse(&with_data),
                Ok(Some(want)),
                "{name} + header-like data"
            );
        }
    }

    #[test]
    fn mutated_fixtures_keep_prefixes_consistent() {
        // A cheap deterministic cousin of the fuzz target: one byte of each
        // fixture's head replaced, then the whole compared with prefixes
        // ending around the change and at the head's end.
        for (name, input, want) in fixtures() {
            let head = &input[..want.head_len];
            for pos in 0..head.len() {
                for byte in [0, b'\t', b' ', b':', b'@', b'%', b'\r', b'\n', b'A', 0x80] {
                    let mut mutated = head.to_vec();
                    mutated[pos] = byte;
                    let whole = parse(&mutated);
                    for cut in [pos, pos + 1, head.len() - 1] {
                        let prefix = parse(&mutated[..cut]);
                        assert!(
                            prefix == Ok(None) || prefix == whole,
                            "{name}, byte {pos} = {byte:#04x}, prefix {cut}: {prefix:?} vs {whole:?}"
                        );
                    }
                    if let Ok(Some(request)) = &whole {
                        assert_eq!(parse(&mutated[..request.head_len]), whole, "{name}");
                    }
                }
            }
        }
    }

    #[test]
    fn bare_lf_ends_lines() {
        let head = b"CONNECT a.example:443 HTTP/1.1\nHost: a.example:443\r\nX: 1\n\nearly";
        let want = Request {
            method: Method::Connect,
            target: name("a.example", 443),
            version: (1, 1),
            proxy_authorization: None,
            head_len: head.len() - b"early".len(),
        };
        assert_eq!(parse(head), Ok(Some(want)));
        for end in 0..head.len() - b"early".len() {
            assert_eq!(parse(&head[..end]), Ok(None), "prefix of {end} bytes");
        }
        // CRLF then a bare LF is an end too.
        assert_eq!(accepted("CONNECT a:1 HTTP/1.1\r\n\n").head_len, 23);
    }

    #[test]
    fn connect_targets() {
        let cases = [
            ("example.com:443", name("example.com", 443)),
            ("WWW.Example.COM.:8443", name("www.example.com", 8443)),
            ("my_host.internal:22", name("my_host.internal", 22)),
            ("_srv.example:1", name("_srv.example", 1)),
            (
                "xn--bcher-kva.example:65535",
                name("xn--bcher-kva.example", 65535),
            ),
            ("123.example.com:443", name("123.example.com", 443)),
            ("localhost:80", name("localhost", 80)),
            ("192.0.2.7:443", ip("192.0.2.7", 443)),
            ("192.0.2.7.:443", ip("192.0.2.7", 443)),
            ("[2001:DB8::1]:443", ip("2001:db8::1", 443)),
            // Kept as written: the caller canonicalises.
            ("[::ffff:192.0.2.7]:443", ip("::ffff:192.0.2.7", 443)),
            ("[::]:9", ip("::", 9)),
            (
                &format!("{}.example:443", "a".repeat(63)),
                name(&format!("{}.example", "a".repeat(63)), 443),
            ),
        ];
        for (target, want) in cases {
            let request = accepted(&format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
            ));
            assert_eq!(request.method, Method::Connect, "{target}");
            assert_eq!(request.target, want, "{target}");
        }
        // The longest name: 253 bytes, plus a trailing dot.
        let longest = ["a".repeat(63).as_str(); 4].join(".")[..253].to_string();
        let request = accepted(&format!("CONNECT {longest}.:1 HTTP/1.1\r\n\r\n"));
        assert_eq!(request.target, name(&longest, 1));
    }

    #[test]
    fn target_display_is_authority_form() {
        for (target, shown) in [
            (name("example.com", 443), "example.com:443"),
            (ip("192.0.2.7", 80), "192.0.2.7:80"),
            (ip("2001:db8::1", 443), "[2001:db8::1]:443"),
        ] {
            let target = target.unwrap();
            assert_eq!(target.to_string(), shown);
            let request = accepted(&format!("CONNECT {target} HTTP/1.1\r\n\r\n"));
            assert_eq!(request.target, Some(target));
        }
    }

    #[test]
    fn bad_authority() {
        use AuthorityError::*;
        // Each input ends at the byte that refuses it: structural errors at
        // the SP after the target, bad bytes at once.
        let cases: Vec<(String, AuthorityError)> = vec![
            ("example.com ".into(), MissingPort),
            ("example.com: ".into(), MissingPort),
            ("[::1] ".into(), MissingPort),
            ("example.com:0 ".into(), BadPort),
            ("example.com:0443 ".into(), BadPort),
            ("example.com:65536 ".into(), BadPort),
            ("example.com:123456 ".into(), BadPort),
            ("example.com:https ".into(), BadPort),
            ("example.com:443:443 ".into(), BadPort),
            ("example.com:+".into(), BadByte(b'+')),
            ("example.com:443/".into(), BadByte(b'/')),
            ("http:/".into(), BadByte(b'/')),
            ("ex%".into(), BadByte(b'%')),
            ("user@".into(), Userinfo),
            ("[fe80::1%".into(), ZoneId),
            (":443 ".into(), BadHost),
            ("::1:443 ".into(), BadHost),
            ("[::1:443 ".into(), BadHost),
            ("[::1]443 ".into(), BadHost),
            ("[example.com]:443 ".into(), BadHost),
            ("[192.0.2.7]:443 ".into(), BadHost),
            ("[:::1]:443 ".into(), BadHost),
            ("a]:443 ".into(), BadHost),
            ("-a.example:443 ".into(), BadHost),
            ("a-.example:443 ".into(), BadHost),
            ("a..example:443 ".into(), BadHost),
            (".example:443 ".into(), BadHost),
            ("example..:443 ".into(), BadHost),
            (format!("{}.example:443 ", "a".repeat(64)), BadHost),
            (format!("{}:443 ", ["abc"; 64].join(".")), BadHost),
            ("127.1:443 ".into(), NumericName),
            ("0x7f.0.0.1:443 ".into(), NumericName),
            ("010.0.0.1:443 ".into(), NumericName),
            ("192.0.2.256:443 ".into(), NumericName),
            ("2130706433:443 ".into(), NumericName),
            ("example.0x:443 ".into(), NumericName),
            ("example.123:443 ".into(), NumericName),
            ("a".repeat(MAX_AUTHORITY_LEN + 1), TooLong),
        ];
        for (target, want) in cases {
            refused_at_last_byte(
                format!("CONNECT {target}").as_bytes(),
                HeadError::BadAuthority(want),
            );
        }
        // Raw UTF-8 (IDNs must come as A-labels): refused at its first byte.
        refused_at_last_byte(b"CONNECT b\xc3", HeadError::BadAuthority(BadByte(0xc3)));
    }

    #[test]
    fn bad_request_line() {
        for head in [
            "\r\n",
            "\n",
            "CONNECT\r\n",
            "CONNECT a:1\n",
            "CONNECT  ",
            "GET /\t",
            "CONNECT a:1 \r\n",
            "CONNECT a:1 h",
            "CONNECT a:1 HTTP/1.1 ",
            "CONNECT a:1 HTTP/1.11",
            "CONNECT a:1 HTTP/1.\r\n",
            "CONNECT a:1 HTTP/1,",
            "CONNECT a:1 HTTP/10",
            "CONNECT a:1 HTTP/x",
            "CONNECT a:1 HTTP/1.1\t",
        ] {
            refused_at_last_byte(head.as_bytes(), HeadError::BadRequestLine);
        }
    }

    #[test]
    fn bad_method() {
        for head in [
            &b" "[..],
            b"G(",
            b"CONNECT:",
            b"GET\t",
            b"G\xc3",
            b"\x80",
            // Another protocol's first word, refused at its 21st byte.
            b"SSH-2.0-OpenSSH_9.2p1",
        ] {
            refused_at_last_byte(head, HeadError::BadMethod);
        }
    }

    #[test]
    fn unsupported_version() {
        for head in ["CONNECT a:1 HTTP/2", "CONNECT a:1 HTTP/0", "PRI * HTTP/2"] {
            refused_at_last_byte(head.as_bytes(), HeadError::UnsupportedVersion);
        }
        assert_eq!(
            crate::tunnel::Refused::BadRequest(HeadError::UnsupportedVersion).status(),
            Some(Status::VersionNotSupported)
        );
    }

    /// A later HTTP/1 minor version is read as 1.1 (RFC 9110 §2.5).
    #[test]
    fn a_later_minor_version_is_read_as_1_1() {
        for version in ["1.2", "1.9"] {
            let head = format!("CONNECT a.example:443 HTTP/{version}\r\n\r\n");
            let request = parse(head.as_bytes()).unwrap().unwrap();
            assert_eq!(request.version, (1, 1), "{version}");
        }
    }

    #[test]
    fn bad_header_line() {
        use HeaderLineError::*;
        let line = "CONNECT a:1 HTTP/1.1\r\n";
        for (rest, want) in [
            (&b"NoColon\r\n"[..], NoColon),
            (b"NoColon\n", NoColon),
            (b"Host \r\n", NoColon),
            (b"Host :", WhitespaceBeforeColon),
            (b"Proxy-Authorization\t:", WhitespaceBeforeColon),
            (b":", BadFieldName),
            (b"Ho(", BadFieldName),
            (b"X y", BadFieldName),
            (b"F\xc3", BadFieldName),
            (b"\"", BadFieldName),
            (b" ", ObsFold),
            (b"\t", ObsFold),
            (b"X: 1\r\n ", ObsFold),
            (b"X: 1\r\n\t", ObsFold),
        ] {
            let head = [line.as_bytes(), rest].concat();
            refused_at_last_byte(&head, HeadError::BadHeaderLine(want));
        }
    }

    #[test]
    fn control_characters() {
        for (head, byte) in [
            // A TLS ClientHello sent to the proxy port.
            (&b"\x16"[..], 0x16),
            (b"\0", 0),
            (b"CONNECT a:1\x01", 1),
            (b"GET /\x7f", 0x7f),
            (b"CONNECT a:1 HTTP/1.1\r\r", b'\r'),
            (b"CONNECT a:1 HTTP/1.1\rX", b'\r'),
            (b"CONNECT a:1 HTTP/1.1\r\nX\x1b", 0x1b),
            (b"CONNECT a:1 HTTP/1.1\r\nX: a\0", 0),
            (b"CONNECT a:1 HTTP/1.1\r\nX: a\rb", b'\r'),
            (b"CONNECT a:1 HTTP/1.1\r\nX: a\x7f", 0x7f),
            (b"CONNECT a:1 HTTP/1.1\r\n\r\r", b'\r'),
        ] {
            refused_at_last_byte(head, HeadError::ControlCharacter(byte));
        }
    }

    #[test]
    fn proxy_authorization() {
        // Name in any case, value trimmed of spaces and tabs.
        for field in [
            "Proxy-Authorization: Basic dTpw",
            "PROXY-AUTHORIZATION:Basic dTpw",
            "proxy-authorization: \t Basic dTpw \t",
        ] {
            let request = accepted(&format!(
                "CONNECT a:1 HTTP/1.1\r\n{field}\r\nHost: a:1\r\n\r\n"
            ));
            assert_eq!(
                request.proxy_authorization.as_deref(),
                Some("Basic dTpw"),
                "{field}"
            );
        }
        let empty = accepted("CONNECT a:1 HTTP/1.1\r\nProxy-Authorization:\r\n\r\n");
        assert_eq!(empty.proxy_authorization.as_deref(), Some(""));
        // Similar names are other fields.
        let other = accepted(
            "CONNECT a:1 HTTP/1.1\r\nAuthorization: x\r\nProxy-Authorization-X: y\r\n\r\n",
        );
        assert_eq!(other.proxy_authorization, None);
    }

    #[test]
    fn proxy_authorization_is_not_in_debug() {
        let request = parse(CURL_AUTH).unwrap().unwrap();
        let shown = format!("{request:?}");
        assert!(!shown.contains("dTpw"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn duplicate_proxy_authorization() {
        refused_at_last_byte(
            b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic dTpw\r\nHost: a:1\r\n\
              proxy-authorization: Basic dTpw\r\n",
            HeadError::DuplicateProxyAuthorization,
        );
    }

    #[test]
    fn one_well_formed_host_at_most() {
        for host in [
            "a.example:443",
            "A.Example",
            "a.example:",
            "192.0.2.7:443",
            "[2001:db8::1]:443",
            "[2001:db8::1]",
        ] {
            accepted(&format!("CONNECT a:1 HTTP/1.1\r\nHost: {host} \r\n\r\n"));
        }
        // None: the target is the authority.
        accepted("CONNECT a:1 HTTP/1.1\r\n\r\n");
        refused_at_last_byte(
            b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nX: y\r\nhost: a:1\r\n",
            HeadError::DuplicateHost,
        );
        for bad in [
            "",
            "a.example:44x",
            "user@a.example",
            "a.example/path",
            "a..example",
            "[2001:db8::1",
            "2001:db8::1",
            "[a.example]:443",
        ] {
            refused_at_last_byte(
                format!("CONNECT a:1 HTTP/1.1\r\nHost: {bad}\r\n").as_bytes(),
                HeadError::BadHost,
            );
        }
    }

    #[test]
    fn non_ascii_proxy_authorization() {
        refused_at_last_byte(
            b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic \xc3\xa9\r\n",
            HeadError::NonAsciiProxyAuthorization,
        );
        // obs-text elsewhere is fine (RFC 9110 §5.5).
        accepted("CONNECT a:1 HTTP/1.1\r\nX-Name: caf\u{e9}\r\n\r\n");
    }

    #[test]
    fn other_methods_are_parsed_in_full() {
        let cases = [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", "GET", 1),
            (
                "POST /submit HTTP/1.0\r\nContent-Length: 3\r\n\r\n",
                "POST",
                0,
            ),
            ("OPTIONS * HTTP/1.1\r\n\r\n", "OPTIONS", 1),
            // Methods are case-sensitive, and other targets are not
            // authorities: no error for the userinfo here.
            ("connect user@a:1 HTTP/1.1\r\n\r\n", "connect", 1),
            ("GET /caf\u{e9}?x=%41 HTTP/1.1\r\n\r\n", "GET", 1),
            (
                "UPDATEREDIRECTREF /x HTTP/1.1\r\n\r\n",
                "UPDATEREDIRECTREF",
                1,
            ),
        ];
        for (head, method, minor) in cases {
            // A body or the next request follows: not part of the head.
            let request = parse(format!("{head}abc").as_bytes()).unwrap().unwrap();
            assert_eq!(
                request,
                Request {
                    method: Method::Other(method.into()),
                    target: None,
                    version: (1, minor),
                    proxy_authorization: None,
                    head_len: head.len(),
                },
                "{head:?}"
            );
        }
    }

    #[test]
    fn too_large() {
        let start = b"CONNECT a.example:443 HTTP/1.1\r\nX-Filler: ".to_vec();
        // A head of exactly MAX_HEAD_LEN bytes is accepted.
        let mut head = start.clone();
        head.resize(MAX_HEAD_LEN - 4, b'f');
        head.extend(b"\r\n\r\n");
        assert_eq!(parse(&head).unwrap().unwrap().head_len, MAX_HEAD_LEN);
        // One byte more, and its end comes too late.
        let mut head = start.clone();
        head.resize(MAX_HEAD_LEN - 3, b'f');
        head.extend(b"\r\n\r\n");
        assert_eq!(parse(&head), Err(HeadError::TooLarge));
        assert_eq!(parse(&head[..MAX_HEAD_LEN - 1]), Ok(None));
        assert_eq!(parse(&head[..MAX_HEAD_LEN]), Err(HeadError::TooLarge));
        // An error inside the bound is still reported as itself.
        head[start.len()] = 0;
        assert_eq!(parse(&head), Err(HeadError::ControlCharacter(0)));
    }

    #[test]
    fn errors_say_why() {
        let shown = HeadError::BadAuthority(AuthorityError::MissingPort).to_string();
        assert_eq!(shown, "CONNECT target: no port");
        let shown = HeadError::BadHeaderLine(HeaderLineError::WhitespaceBeforeColon).to_string();
        assert_eq!(shown, "header line: whitespace before the colon");
        assert_eq!(
            HeadError::ControlCharacter(0x16).to_string(),
            "control character 0x16 in the request head"
        );
    }

    #[test]
    fn answers_are_byte_exact() {
        let cases: [(Status, &[&str]); 7] = [
            (
                Status::Established,
                &[
                    // No fields: the tunnel's bytes follow at once.
                    "HTTP/1.1 200 Connection established\r\n",
                    // End of head.
                    "\r\n",
                ],
            ),
            (
                Status::BadRequest,
                &[
                    "HTTP/1.1 400 Bad Request\r\n",
                    // No body: the client need not wait for one.
                    "Content-Length: 0\r\n",
                    // One CONNECT per connection: nothing more is read.
                    "Connection: close\r\n",
                    "\r\n",
                ],
            ),
            (
                Status::Forbidden,
                &[
                    "HTTP/1.1 403 Forbidden\r\n",
                    "Content-Length: 0\r\n",
                    "Connection: close\r\n",
                    "\r\n",
                ],
            ),
            (
                Status::MethodNotAllowed,
                &[
                    "HTTP/1.1 405 Method Not Allowed\r\n",
                    // Required with 405 (RFC 9110 §15.5.6).
                    "Allow: CONNECT\r\n",
                    "Content-Length: 0\r\n",
                    "Connection: close\r\n",
                    "\r\n",
                ],
            ),
            (
                Status::ProxyAuthenticationRequired,
                &[
                    "HTTP/1.1 407 Proxy Authentication Required\r\n",
                    // Required with 407 (RFC 9110 §15.5.8): the challenge.
                    "Proxy-Authenticate: Basic realm=\"l4proxy\"\r\n",
                    "Content-Length: 0\r\n",
                    "Connection: close\r\n",
                    "\r\n",
                ],
            ),
            (
                Status::BadGateway,
                &[
                    "HTTP/1.1 502 Bad Gateway\r\n",
                    "Content-Length: 0\r\n",
                    "Connection: close\r\n",
                    "\r\n",
                ],
            ),
            (
                Status::GatewayTimeout,
                &[
                    "HTTP/1.1 504 Gateway Timeout\r\n",
                    "Content-Length: 0\r\n",
                    "Connection: close\r\n",
                    "\r\n",
                ],
            ),
        ];
        for (status, lines) in cases {
            let bytes = answer(status);
            assert_eq!(
                bytes.escape_ascii().to_string(),
                lines.concat().as_bytes().escape_ascii().to_string()
            );
            let code = format!("HTTP/1.1 {} ", status.code());
            assert!(bytes.starts_with(code.as_bytes()), "{status:?}");
        }
    }

    #[test]
    fn base64() {
        // RFC 4648 §10.
        for (encoded, decoded) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
        ] {
            assert_eq!(
                decode_base64(encoded).as_deref(),
                Some(decoded.as_bytes()),
                "{encoded}"
            );
        }
        // All 64 symbols, and bytes above 0x7f.
        assert_eq!(
            decode_base64("+/+/").as_deref(),
            Some(&[0xfb, 0xff, 0xbf][..])
        );
        for bad in [
            "Zg", "Zg=", "Zm9", "Zm9v=", "Z===", "====", "=Zm9", "Zm=v", "Zh==", "Zm9=", "Zm-v",
            "Zm_v", "Zm9v\n", " Zm9v", "Zm 9v",
        ] {
            assert_eq!(decode_base64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn basic_credentials_decode() {
        let creds = |u: &str, p: &str| Some((u.to_owned(), p.to_owned()));
        for (value, want) in [
            ("Basic dTpw", creds("u", "p")),
            ("bAsIc dTpw", creds("u", "p")),
            ("Basic   dTpw", creds("u", "p")),
            (" \tBasic dTpw\t ", creds("u", "p")),
            // RFC 7617 §2 and §2.1.
            (
                "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
                creds("Aladdin", "open sesame"),
            ),
            ("Basic dGVzdDoxMjPCow==", creds("test", "123\u{a3}")),
            // u:p:q: the first colon splits.
            ("Basic dTpwOnE=", creds("u", "p:q")),
            // ":" alone: empty user and password, for the caller to refuse.
            ("Basic Og==", creds("", "")),
        ] {
            assert_eq!(basic_credentials(value), want, "{value:?}");
        }
        for bad in [
            "Basic",
            "Basic ",
            "Basicx dTpw",
            "Bearer dTpw",
            "Basic\tdTpw",
            "Basic dTpw extra",
            // "user": no colon.
            "Basic dXNlcg==",
            // "u\x01:p": a control character.
            "Basic dQE6cA==",
            // 0xff 0x3a 0x70: not UTF-8.
            "Basic /zpw",
            "Basic dTpw=",
        ] {
            assert_eq!(basic_credentials(bad), None, "{bad:?}");
        }
    }
}
