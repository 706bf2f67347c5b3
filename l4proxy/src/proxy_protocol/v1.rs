//! Version 1: one US-ASCII line,
//! `PROXY SP (TCP4|TCP6) SP src SP dst SP sport SP dport CRLF` or
//! `PROXY SP UNKNOWN [anything] CRLF`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str,
};

use super::{Addresses, DecodeError, Endpoints, Header, Tlvs, unmapped};
use crate::addrs::{ClientAddr, OrigDstAddr};

/// What every v1 header starts with.
pub const SIGNATURE: &[u8] = b"PROXY";

/// The longest line, CRLF included (the spec's worst case, an `UNKNOWN` line
/// with IPv6-length fields).
pub const MAX_LEN: usize = 107;

pub(super) fn encode(header: &Header) -> Vec<u8> {
    let Header::Proxy { addresses, .. } = header else {
        // The spec's short form; v1 cannot say LOCAL.
        return b"PROXY UNKNOWN\r\n".to_vec();
    };
    let line = match Endpoints::new(addresses) {
        Endpoints::V4 { src, dst } => format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            src.ip(),
            dst.ip(),
            src.port(),
            dst.port()
        ),
        Endpoints::V6 { src, dst } => format!(
            "PROXY TCP6 {} {} {} {}\r\n",
            HexGroups(*src.ip()),
            HexGroups(*dst.ip()),
            src.port(),
            dst.port()
        ),
    };
    line.into_bytes()
}

/// An IPv6 address in the spec's form: colon-separated hex groups only. std
/// writes IPv4-mapped addresses as `::ffff:192.0.2.1`, which a strict
/// receiver may refuse; everything else it already writes that way.
struct HexGroups(Ipv6Addr);

impl fmt::Display for HexGroups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.to_ipv4_mapped() {
            Some(v4) => {
                let [a, b, c, d] = v4.octets();
                let (hi, lo) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
                write!(f, "::ffff:{hi:x}:{lo:x}")
            }
            None => self.0.fmt(f),
        }
    }
}

pub(super) fn decode(buf: &[u8]) -> Result<Option<(Header, usize)>, DecodeError> {
    // The spec: wait for the CRLF before decoding anything.
    let Some(len) = line_len(buf)? else {
        return Ok(None);
    };
    let line = &buf[..len - 2];
    let rest = line
        .strip_prefix(b"PROXY ")
        .ok_or(DecodeError::V1Field("separator after PROXY"))?;
    // The spec: after UNKNOWN the receiver ignores the rest of the line.
    if rest == b"UNKNOWN" || rest.starts_with(b"UNKNOWN ") {
        return Ok(Some((Header::Unknown, len)));
    }
    let mut fields = rest.split(|&b| b == b' ');
    let parse_ip: fn(&str) -> Option<IpAddr> = match fields.next() {
        Some(b"TCP4") => |s| s.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        Some(b"TCP6") => |s| s.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        _ => return Err(DecodeError::V1Field("protocol")),
    };
    let src_ip = parse_field(fields.next(), "source address", parse_ip)?;
    let dst_ip = parse_field(fields.next(), "destination address", parse_ip)?;
    let src_port = parse_field(fields.next(), "source port", parse_port)?;
    let dst_port = parse_field(fields.next(), "destination port", parse_port)?;
    if fields.next().is_some() {
        return Err(DecodeError::V1Field("field count"));
    }
    let addresses = Addresses {
        client: ClientAddr(unmapped(SocketAddr::new(src_ip, src_port))),
        orig_dst: OrigDstAddr(unmapped(SocketAddr::new(dst_ip, dst_port))),
    };
    Ok(Some((
        Header::Proxy {
            addresses,
            tlvs: Tlvs::default(),
        },
        len,
    )))
}

/// The length of the line up to and including its CRLF; `None` while the CRLF
/// may still come within [`MAX_LEN`].
fn line_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    for (i, &byte) in buf.iter().enumerate().take(MAX_LEN) {
        match byte {
            // A CR in the last allowed byte leaves no room for its LF.
            b'\r' if i + 2 > MAX_LEN => return Err(DecodeError::V1TooLong),
            b'\r' => {
                return match buf.get(i + 1) {
                    Some(b'\n') => Ok(Some(i + 2)),
                    Some(_) => Err(DecodeError::V1StrayCrLf),
                    None => Ok(None),
                };
            }
            // The spec: a lone LF must not end the line.
            b'\n' => return Err(DecodeError::V1StrayCrLf),
            _ => {}
        }
    }
    if buf.len() >= MAX_LEN {
        Err(DecodeError::V1TooLong)
    } else {
        Ok(None)
    }
}

fn parse_field<T>(
    field: Option<&[u8]>,
    name: &'static str,
    parse: fn(&str) -> Option<T>,
) -> Result<T, DecodeError> {
    field
        .and_then(|field| str::from_utf8(field).ok())
        .and_then(parse)
        .ok_or(DecodeError::V1Field(name))
}

/// A port in decimal, without a sign or heading zeroes (the spec forbids them
/// so nobody reads octal).
fn parse_port(s: &str) -> Option<u16> {
    let canonical = s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_protocol::{
        Decoded, Version, decode,
        tests::{all_tlvs, assert_prefixes_incomplete, decoded_as, proxy},
    };

    fn decoded(bytes: &[u8]) -> Result<Option<Header>, DecodeError> {
        decoded_as(Version::V1, bytes)
    }

    #[test]
    fn encode_tcp4_spec_example() {
        let expected = [
            "PROXY",         // signature
            " TCP4",         // protocol and family
            " 192.168.0.1",  // source address
            " 192.168.0.11", // destination address
            " 56324",        // source port
            " 443",          // destination port
            "\r\n",          // end of line
        ]
        .concat();
        // TLVs have no place in v1 and are left out.
        let header = proxy("192.168.0.1:56324", "192.168.0.11:443", all_tlvs());
        assert_eq!(encode(&header), expected.as_bytes());
    }

    #[test]
    fn encode_tcp6() {
        let expected = [
            "PROXY",            // signature
            " TCP6",            // protocol and family
            " 2001:db8::1",     // source address
            " 2001:db8:0:1::7", // destination address, compressed once
            " 56324",           // source port
            " 443",             // destination port
            "\r\n",             // end of line
        ]
        .concat();
        let header = proxy(
            "[2001:db8::1]:56324",
            "[2001:db8:0:1:0:0:0:7]:443",
            Default::default(),
        );
        assert_eq!(encode(&header), expected.as_bytes());
    }

    #[test]
    fn encode_mixed_family_as_tcp6_with_hex_mapped() {
        let expected = [
            "PROXY",            // signature
            " TCP6",            // one family for both: IPv6
            " ::ffff:c000:201", // source 192.0.2.1, IPv4-mapped, in hex groups
            " 2001:db8::7",     // destination address
            " 56324",           // source port
            " 443",             // destination port
            "\r\n",             // end of line
        ]
        .concat();
        let header = proxy("192.0.2.1:56324", "[2001:db8::7]:443", Default::default());
        assert_eq!(encode(&header), expected.as_bytes());
    }

    #[test]
    fn encode_both_mapped_as_tcp4() {
        let header = proxy(
            "[::ffff:192.0.2.1]:56324",
            "[::ffff:198.51.100.7]:443",
            Default::default(),
        );
        assert_eq!(
            encode(&header),
            b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
        );
    }

    #[test]
    fn encode_local_and_unknown_short_form() {
        assert_eq!(encode(&Header::Local), b"PROXY UNKNOWN\r\n");
        assert_eq!(encode(&Header::Unknown), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn decode_spec_example() {
        let bytes = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            decode(bytes),
            Ok(Some(Decoded {
                header: proxy("192.168.0.1:56324", "192.168.0.11:443", Default::default()),
                version: Version::V1,
                len: 47,
            }))
        );
        assert_prefixes_incomplete(&bytes[..47]);
    }

    #[test]
    fn decode_tcp6() {
        let line = b"PROXY TCP6 2001:DB8::1 2001:db8:0:0:0:0:0:7 0 65535\r\n";
        assert_eq!(
            decoded(line),
            Ok(Some(proxy(
                "[2001:db8::1]:0",
                "[2001:db8::7]:65535",
                Default::default()
            )))
        );
        assert_prefixes_incomplete(line);
    }

    #[test]
    fn decode_mapped_as_ipv4() {
        // Hex groups as l4proxy writes them, and the dotted form that
        // inet_ntop (so HAProxy) writes for a mixed pair.
        assert_eq!(
            decoded(b"PROXY TCP6 ::ffff:c000:201 ::ffff:198.51.100.7 1 2\r\n"),
            Ok(Some(proxy(
                "192.0.2.1:1",
                "198.51.100.7:2",
                Default::default()
            )))
        );
        assert_eq!(
            decoded(b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::7 1 2\r\n"),
            Ok(Some(proxy(
                "192.0.2.1:1",
                "[2001:db8::7]:2",
                Default::default()
            )))
        );
    }

    #[test]
    fn decode_unknown_ignores_the_rest() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n",
            b"PROXY UNKNOWN \xff not even text\r\n",
        ] {
            assert_eq!(decoded(line), Ok(Some(Header::Unknown)), "{line:02x?}");
            assert_prefixes_incomplete(line);
        }
    }

    #[test]
    fn longest_lines() {
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {f} {f} 65535 65535\r\n");
        assert_eq!(tcp6.len(), 104);
        assert!(matches!(
            decoded(tcp6.as_bytes()),
            Ok(Some(Header::Proxy { .. }))
        ));
        let unknown = format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n");
        assert_eq!(unknown.len(), MAX_LEN);
        assert_eq!(decoded(unknown.as_bytes()), Ok(Some(Header::Unknown)));
        // One byte more and the CRLF ends too late.
        let over = format!("PROXY UNKNOWN {f} {f} 65535 655350\r\n");
        assert_eq!(decode(over.as_bytes()), Err(DecodeError::V1TooLong));
        assert_eq!(
            decode(&over.as_bytes()[..MAX_LEN]),
            Err(DecodeError::V1TooLong)
        );
    }

    #[test]
    fn no_crlf_in_107_bytes_is_too_long() {
        let mut bytes = b"PROXY TCP4 ".to_vec();
        bytes.resize(MAX_LEN - 1, b'1');
        assert_eq!(decode(&bytes), Ok(None));
        bytes.push(b'1');
        assert_eq!(decode(&bytes), Err(DecodeError::V1TooLong));
    }

    #[test]
    fn stray_cr_or_lf() {
        for line in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\r\r\n",
            b"PROXY TCP4 192.0.2.1\r 198.51.100.7 1 2\r\n",
            b"PROXY UNKNOWN\n\r\n",
        ] {
            assert_eq!(decode(line), Err(DecodeError::V1StrayCrLf), "{line:02x?}");
        }
    }

    #[test]
    fn malformed_fields() {
        for (line, field) in [
            (
                &b"PROXYTCP4 192.0.2.1 198.51.100.7 1 2\r\n"[..],
                "separator after PROXY",
            ),
            (b"PROXY\r\n", "separator after PROXY"),
            (b"PROXY  TCP4 192.0.2.1 198.51.100.7 1 2\r\n", "protocol"),
            (b"PROXY tcp4 192.0.2.1 198.51.100.7 1 2\r\n", "protocol"),
            (b"PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n", "protocol"),
            (b"PROXY UDP4 192.0.2.1 198.51.100.7 1 2\r\n", "protocol"),
            (b"PROXY UNKNOWNX\r\n", "protocol"),
            (b"PROXY TCP4\r\n", "source address"),
            (
                b"PROXY TCP4 2001:db8::1 198.51.100.7 1 2\r\n",
                "source address",
            ),
            (
                b"PROXY TCP4 192.0.02.1 198.51.100.7 1 2\r\n",
                "source address",
            ),
            (
                b"PROXY TCP4 192.0.2.256 198.51.100.7 1 2\r\n",
                "source address",
            ),
            (
                b"PROXY TCP4 192.0.2.1  198.51.100.7 1 2\r\n",
                "destination address",
            ),
            (
                b"PROXY TCP6 2001:db8::1 198.51.100.7 1 2\r\n",
                "destination address",
            ),
            (
                b"PROXY TCP6 2001:db8::1 fe80::1%2 1 2\r\n",
                "destination address",
            ),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7\r\n", "source port"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 01 2\r\n", "source port"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 +1 2\r\n", "source port"),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 65536 2\r\n",
                "source port",
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n",
                "destination port",
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 1 \r\n",
                "destination port",
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 1 00\r\n",
                "destination port",
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 1 \xff\r\n",
                "destination port",
            ),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 \r\n", "field count"),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 3\r\n",
                "field count",
            ),
        ] {
            assert_eq!(
                decode(line),
                Err(DecodeError::V1Field(field)),
                "{}",
                line.escape_ascii()
            );
        }
    }
}
