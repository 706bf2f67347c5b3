//! Version 2: 12-byte signature, version/command, family/protocol, payload
//! length (big-endian), then the payload: the address block and TLVs.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{
    Addresses, DecodeError, EncodeError, Endpoints, Header, Tlvs, V2_MAX_PAYLOAD, unmapped,
};
use crate::addrs::{ClientAddr, OrigDstAddr};

/// What every v2 header starts with; it contains a NUL, so it is no C string.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, version/command, family/protocol, and the 2-byte length.
pub(super) const FIXED_LEN: usize = 16;

const VERSION: u8 = 0x2;
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;

/// Family (high nibble) and protocol (low nibble).
const FAM_UNSPEC: u8 = 0x00;
const FAM_TCP4: u8 = 0x11;
const FAM_TCP6: u8 = 0x21;
/// The highest family (AF_UNIX) and protocol (DGRAM) the spec defines.
const MAX_FAMILY: u8 = 0x3;
const MAX_PROTOCOL: u8 = 0x2;

const PP2_TYPE_ALPN: u8 = 0x01;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_UNIQUE_ID: u8 = 0x05;

/// The spec's bound on `PP2_TYPE_UNIQUE_ID`.
pub const UNIQUE_ID_MAX_LEN: usize = 128;

pub(super) fn encode(header: &Header) -> Result<Vec<u8>, EncodeError> {
    let (command, family, payload) = match header {
        // The spec: LOCAL and UNSPEC senders present no address.
        Header::Local => (CMD_LOCAL, FAM_UNSPEC, Vec::new()),
        Header::Unknown => (CMD_PROXY, FAM_UNSPEC, Vec::new()),
        Header::Proxy { addresses, tlvs } => {
            let (family, mut payload) = encode_addresses(addresses);
            encode_tlvs(tlvs, &mut payload)?;
            (CMD_PROXY, family, payload)
        }
    };
    let len = u16::try_from(payload.len())
        .ok()
        .filter(|&len| usize::from(len) <= V2_MAX_PAYLOAD)
        .ok_or(EncodeError::TooLong(payload.len()))?;
    let mut out = Vec::with_capacity(FIXED_LEN + payload.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION << 4 | command);
    out.push(family);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The family/protocol byte and the address block, addresses then ports.
fn encode_addresses(addresses: &Addresses) -> (u8, Vec<u8>) {
    let mut block = Vec::new();
    let (family, ports) = match Endpoints::new(addresses) {
        Endpoints::V4 { src, dst } => {
            block.extend_from_slice(&src.ip().octets());
            block.extend_from_slice(&dst.ip().octets());
            (FAM_TCP4, [src.port(), dst.port()])
        }
        Endpoints::V6 { src, dst } => {
            block.extend_from_slice(&src.ip().octets());
            block.extend_from_slice(&dst.ip().octets());
            (FAM_TCP6, [src.port(), dst.port()])
        }
    };
    for port in ports {
        block.extend_from_slice(&port.to_be_bytes());
    }
    (family, block)
}

fn encode_tlvs(tlvs: &Tlvs, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if let Some(id) = &tlvs.unique_id
        && id.len() > UNIQUE_ID_MAX_LEN
    {
        return Err(EncodeError::UniqueIdTooLong(id.len()));
    }
    let values = [
        (PP2_TYPE_ALPN, tlvs.alpn.as_deref()),
        (
            PP2_TYPE_AUTHORITY,
            tlvs.authority.as_ref().map(|s| s.as_bytes()),
        ),
        (PP2_TYPE_UNIQUE_ID, tlvs.unique_id.as_deref()),
    ];
    for (kind, value) in values {
        let Some(value) = value else { continue };
        // Over 64 KiB is over V2_MAX_PAYLOAD too.
        let len = u16::try_from(value.len()).map_err(|_| EncodeError::TooLong(value.len()))?;
        out.push(kind);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(value);
    }
    Ok(())
}

/// Reads a header from `buf`, whose first bytes (up to 12) the caller has
/// matched against [`SIGNATURE`]. Each check runs as soon as its byte is in,
/// so a broken header is refused without waiting for the rest.
pub(super) fn decode(buf: &[u8]) -> Result<Option<(Header, usize)>, DecodeError> {
    let Some(&ver_cmd) = buf.get(SIGNATURE.len()) else {
        return Ok(None);
    };
    if ver_cmd >> 4 != VERSION {
        return Err(DecodeError::V2Version(ver_cmd >> 4));
    }
    let local = match ver_cmd & 0x0f {
        CMD_LOCAL => true,
        CMD_PROXY => false,
        command => return Err(DecodeError::V2Command(command)),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // The spec: for LOCAL the family is ignored, along with the whole block.
    if !local && (family >> 4 > MAX_FAMILY || family & 0x0f > MAX_PROTOCOL) {
        return Err(DecodeError::V2Family(family));
    }
    let Some(&[len_hi, len_lo]) = buf.get(14..FIXED_LEN) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if len > V2_MAX_PAYLOAD {
        return Err(DecodeError::V2TooLong(len));
    }
    let Some(payload) = buf.get(FIXED_LEN..FIXED_LEN + len) else {
        return Ok(None);
    };
    let header = match family {
        _ if local => Header::Local,
        FAM_TCP4 => {
            let (src, dst, [src_port, dst_port], tlvs) = split_addresses::<4>(payload)?;
            proxy(
                SocketAddrV4::new(Ipv4Addr::from(src), src_port).into(),
                SocketAddrV4::new(Ipv4Addr::from(dst), dst_port).into(),
                tlvs,
            )?
        }
        FAM_TCP6 => {
            let (src, dst, [src_port, dst_port], tlvs) = split_addresses::<16>(payload)?;
            proxy(
                SocketAddrV6::new(Ipv6Addr::from(src), src_port, 0, 0).into(),
                SocketAddrV6::new(Ipv6Addr::from(dst), dst_port, 0, 0).into(),
                tlvs,
            )?
        }
        // UNSPEC, UDP, UNIX: accepted, and the real endpoints are used. The
        // payload is skipped unread: an UNSPEC block has no defined length,
        // and the TLVs of a connection l4proxy does not relay are of no use.
        _ => Header::Unknown,
    };
    Ok(Some((header, FIXED_LEN + len)))
}

/// The address block of `N`-byte addresses (source, destination, source port,
/// destination port), and the TLV bytes after it.
type AddressBlock<'a, const N: usize> = ([u8; N], [u8; N], [u16; 2], &'a [u8]);

fn split_addresses<const N: usize>(payload: &[u8]) -> Result<AddressBlock<'_, N>, DecodeError> {
    let split = || {
        let (src, rest) = payload.split_first_chunk::<N>()?;
        let (dst, rest) = rest.split_first_chunk::<N>()?;
        let (&[a, b, c, d], tlvs) = rest.split_first_chunk::<4>()?;
        let ports = [u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d])];
        Some((*src, *dst, ports, tlvs))
    };
    split().ok_or(DecodeError::V2AddressesTruncated {
        len: payload.len(),
        need: 2 * N + 4,
    })
}

fn proxy(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Result<Header, DecodeError> {
    Ok(Header::Proxy {
        addresses: Addresses {
            client: ClientAddr(unmapped(src)),
            orig_dst: OrigDstAddr(unmapped(dst)),
        },
        tlvs: decode_tlvs(tlvs)?,
    })
}

/// Type, 2-byte big-endian length, value; repeated to the end of the payload.
/// Types l4proxy does not use are skipped, among them `PP2_TYPE_CRC32C`, which
/// the spec lets a receiver leave unchecked, and `PP2_TYPE_NOOP` padding.
fn decode_tlvs(mut rest: &[u8]) -> Result<Tlvs, DecodeError> {
    let mut tlvs = Tlvs::default();
    while !rest.is_empty() {
        let (&[kind, len_hi, len_lo], after) = rest
            .split_first_chunk::<3>()
            .ok_or(DecodeError::V2TlvOverrun)?;
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        let (value, after) = after
            .split_at_checked(len)
            .ok_or(DecodeError::V2TlvOverrun)?;
        let bad = |reason| DecodeError::V2Tlv { kind, reason };
        match kind {
            PP2_TYPE_ALPN => set_once(&mut tlvs.alpn, value.to_vec()).map_err(bad)?,
            PP2_TYPE_AUTHORITY => {
                let authority = String::from_utf8(value.to_vec()).map_err(|_| bad("not UTF-8"))?;
                set_once(&mut tlvs.authority, authority).map_err(bad)?;
            }
            PP2_TYPE_UNIQUE_ID if len > UNIQUE_ID_MAX_LEN => return Err(bad("over 128 bytes")),
            PP2_TYPE_UNIQUE_ID => set_once(&mut tlvs.unique_id, value.to_vec()).map_err(bad)?,
            _ => {}
        }
        rest = after;
    }
    Ok(tlvs)
}

/// Fills `slot`, refusing a second value: which of two the sender meant is
/// anyone's guess.
fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), &'static str> {
    match slot.replace(value) {
        Some(_) => Err("repeated"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_protocol::{
        Decoded, MAX_HEADER_LEN, Version, decode,
        tests::{all_tlvs, assert_prefixes_incomplete, decoded_as, proxy},
    };

    #[rustfmt::skip]
    const SIG: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

    fn decoded(bytes: &[u8]) -> Result<Option<Header>, DecodeError> {
        decoded_as(Version::V2, bytes)
    }

    /// A header: signature, then the rest as given.
    fn with_sig(rest: &[u8]) -> Vec<u8> {
        [&SIG[..], rest].concat()
    }

    #[test]
    #[rustfmt::skip]
    fn encode_tcp4() {
        let expected = with_sig(&[
            0x21,                   // version 2, command PROXY
            0x11,                   // AF_INET, STREAM
            0x00, 0x0C,             // payload length: 12
            192, 0, 2, 1,           // source address
            198, 51, 100, 7,        // destination address
            0xDC, 0x04,             // source port 56324
            0x01, 0xBB,             // destination port 443
        ]);
        let header = proxy("192.0.2.1:56324", "198.51.100.7:443", Tlvs::default());
        assert_eq!(encode(&header).unwrap(), expected);
    }

    #[test]
    #[rustfmt::skip]
    fn encode_tcp6() {
        let expected = with_sig(&[
            0x21,                   // version 2, command PROXY
            0x21,                   // AF_INET6, STREAM
            0x00, 0x24,             // payload length: 36
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // source 2001:db8::1
            0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07, // destination 2001:db8:1::7
            0xDC, 0x04,             // source port 56324
            0x01, 0xBB,             // destination port 443
        ]);
        let header = proxy("[2001:db8::1]:56324", "[2001:db8:1::7]:443", Tlvs::default());
        assert_eq!(encode(&header).unwrap(), expected);
    }

    #[test]
    #[rustfmt::skip]
    fn encode_mixed_family_as_inet6() {
        let expected = with_sig(&[
            0x21,                   // version 2, command PROXY
            0x21,                   // AF_INET6, STREAM: one family for both
            0x00, 0x24,             // payload length: 36
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1, // source ::ffff:192.0.2.1
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07, // destination 2001:db8::7
            0xDC, 0x04,             // source port 56324
            0x01, 0xBB,             // destination port 443
        ]);
        let header = proxy("192.0.2.1:56324", "[2001:db8::7]:443", Tlvs::default());
        assert_eq!(encode(&header).unwrap(), expected);
    }

    #[test]
    fn encode_both_mapped_as_inet() {
        let header = proxy(
            "[::ffff:192.0.2.1]:56324",
            "[::ffff:198.51.100.7]:443",
            Tlvs::default(),
        );
        let bytes = encode(&header).unwrap();
        assert_eq!(bytes[13], FAM_TCP4);
        assert_eq!(bytes[16..24], [192, 0, 2, 1, 198, 51, 100, 7]);
    }

    #[test]
    #[rustfmt::skip]
    fn encode_tlvs_in_type_order() {
        let expected = with_sig(&[
            0x21,                   // version 2, command PROXY
            0x11,                   // AF_INET, STREAM
            0x00, 0x26,             // payload length: 12 + 5 + 14 + 7 = 38
            192, 0, 2, 1,           // source address
            198, 51, 100, 7,        // destination address
            0xDC, 0x04,             // source port 56324
            0x01, 0xBB,             // destination port 443
            0x01,                   // PP2_TYPE_ALPN
            0x00, 0x02,             //   length 2
            b'h', b'2',             //   "h2"
            0x02,                   // PP2_TYPE_AUTHORITY
            0x00, 0x0B,             //   length 11
            b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm', // "example.com"
            0x05,                   // PP2_TYPE_UNIQUE_ID
            0x00, 0x04,             //   length 4
            0xDE, 0xAD, 0xBE, 0xEF, //   the ID
        ]);
        let header = proxy("192.0.2.1:56324", "198.51.100.7:443", all_tlvs());
        assert_eq!(encode(&header).unwrap(), expected);
    }

    #[test]
    #[rustfmt::skip]
    fn encode_local_and_unknown() {
        let local = with_sig(&[
            0x20,                   // version 2, command LOCAL
            0x00,                   // AF_UNSPEC, UNSPEC
            0x00, 0x00,             // payload length: none
        ]);
        assert_eq!(encode(&Header::Local).unwrap(), local);
        let unknown = with_sig(&[
            0x21,                   // version 2, command PROXY
            0x00,                   // AF_UNSPEC, UNSPEC
            0x00, 0x00,             // payload length: none
        ]);
        assert_eq!(encode(&Header::Unknown).unwrap(), unknown);
    }

    #[test]
    fn encode_refuses_what_the_spec_or_the_bound_refuses() {
        let long_id = Tlvs {
            unique_id: Some(vec![0; UNIQUE_ID_MAX_LEN + 1]),
            ..Tlvs::default()
        };
        assert_eq!(
            encode(&proxy("192.0.2.1:1", "198.51.100.7:2", long_id)),
            Err(EncodeError::UniqueIdTooLong(129))
        );
        // 12 address bytes, 3 TLV header bytes: one value byte over the bound.
        let long_alpn = Tlvs {
            alpn: Some(vec![0; V2_MAX_PAYLOAD - 12 - 3 + 1]),
            ..Tlvs::default()
        };
        assert_eq!(
            encode(&proxy("192.0.2.1:1", "198.51.100.7:2", long_alpn)),
            Err(EncodeError::TooLong(V2_MAX_PAYLOAD + 1))
        );
        let huge_authority = Tlvs {
            authority: Some("a".repeat(70_000)),
            ..Tlvs::default()
        };
        assert_eq!(
            encode(&proxy("192.0.2.1:1", "198.51.100.7:2", huge_authority)),
            Err(EncodeError::TooLong(70_000))
        );
    }

    #[test]
    fn decode_haproxy_capture() {
        // HAProxy's send-proxy-v2 before an HTTP request, as captured in
        // seriousben/experiment-proxy-protocol's README.
        #[rustfmt::skip]
        let bytes = [
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
            0x21, 0x11, 0x00, 0x0c, 0xac, 0x13, 0x00, 0x01, 0xac, 0x13, 0x00, 0x03,
            0xa6, 0x52, 0x00, 0x50, 0x47, 0x45, 0x54, 0x20, 0x2f, 0x20, 0x48, 0x54,
        ];
        assert_eq!(
            decode(&bytes),
            Ok(Some(Decoded {
                header: proxy("172.19.0.1:42578", "172.19.0.3:80", Tlvs::default()),
                version: Version::V2,
                len: 28,
            }))
        );
        assert_prefixes_incomplete(&bytes[..28]);
    }

    #[test]
    #[rustfmt::skip]
    fn decode_skips_tlvs_it_does_not_use() {
        let bytes = with_sig(&[
            0x21, 0x11, 0x00, 0x22, // PROXY, TCP4, length 12 + 7 + 3 + 4 + 8 = 34
            192, 0, 2, 1, 198, 51, 100, 7, 0xDC, 0x04, 0x01, 0xBB,
            0x03, 0x00, 0x04, 1, 2, 3, 4,           // PP2_TYPE_CRC32C, not checked
            0x04, 0x00, 0x00,                       // PP2_TYPE_NOOP, empty
            0xE0, 0x00, 0x01, 0xAA,                 // PP2_TYPE_MIN_CUSTOM
            0x20, 0x00, 0x05, 0x00, 0, 0, 0, 0,     // PP2_TYPE_SSL: client, verify
        ]);
        assert_eq!(
            decoded(&bytes),
            Ok(Some(proxy("192.0.2.1:56324", "198.51.100.7:443", Tlvs::default())))
        );
        assert_prefixes_incomplete(&bytes);
    }

    #[test]
    #[rustfmt::skip]
    fn decode_mapped_as_ipv4() {
        let bytes = with_sig(&[
            0x21, 0x21, 0x00, 0x24, // PROXY, TCP6, length 36
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1,
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07,
            0x00, 0x01, 0x00, 0x02,
        ]);
        assert_eq!(
            decoded(&bytes),
            Ok(Some(proxy("192.0.2.1:1", "[2001:db8::7]:2", Tlvs::default())))
        );
    }

    #[test]
    fn decode_local_skips_the_payload_whatever_the_family() {
        // A sender may present addresses with LOCAL; the family byte is
        // ignored, even one the spec does not define.
        for family in [FAM_UNSPEC, FAM_TCP4, 0xFF] {
            let bytes = with_sig(&[0x20, family, 0x00, 0x03, 0xAA, 0xBB, 0xCC]);
            assert_eq!(
                decoded(&bytes),
                Ok(Some(Header::Local)),
                "family {family:#04x}"
            );
            assert_prefixes_incomplete(&bytes);
        }
    }

    #[test]
    fn decode_other_families_as_unknown() {
        for (family, len) in [
            (0x00, 0),   // UNSPEC
            (0x00, 5),   // UNSPEC, with address bytes anyway
            (0x12, 12),  // UDP over IPv4
            (0x22, 36),  // UDP over IPv6
            (0x10, 12),  // IPv4, UNSPEC protocol
            (0x31, 216), // UNIX stream
            (0x32, 216), // UNIX datagram
        ] {
            let mut bytes = with_sig(&[0x21, family, 0x00, len]);
            bytes.resize(FIXED_LEN + usize::from(len), 0xEE);
            assert_eq!(
                decoded(&bytes),
                Ok(Some(Header::Unknown)),
                "family {family:#04x}"
            );
        }
    }

    #[test]
    fn bad_signature_byte_is_not_proxy() {
        let good = encode(&Header::Local).unwrap();
        for i in 0..SIGNATURE.len() {
            let mut bytes = good.clone();
            bytes[i] ^= 0x40;
            assert_eq!(decode(&bytes), Err(DecodeError::NotProxy), "byte {i}");
            // Refused as soon as the bad byte is in.
            assert_eq!(decode(&bytes[..=i]), Err(DecodeError::NotProxy), "byte {i}");
        }
    }

    #[test]
    fn bad_version_command_family() {
        for (ver_cmd, family, error) in [
            (0x11, 0x11, DecodeError::V2Version(1)),
            (0x31, 0x11, DecodeError::V2Version(3)),
            (0x01, 0x11, DecodeError::V2Version(0)),
            (0x22, 0x11, DecodeError::V2Command(2)),
            (0x2F, 0x11, DecodeError::V2Command(0xF)),
            (0x21, 0x41, DecodeError::V2Family(0x41)),
            (0x21, 0x13, DecodeError::V2Family(0x13)),
            (0x21, 0xFF, DecodeError::V2Family(0xFF)),
        ] {
            let bytes = with_sig(&[ver_cmd, family, 0x00, 0x00]);
            assert_eq!(decode(&bytes), Err(error.clone()));
            // Refused as soon as the bad byte is in.
            let at = if matches!(error, DecodeError::V2Family(_)) {
                14
            } else {
                13
            };
            assert_eq!(decode(&bytes[..at]), Err(error));
        }
    }

    #[test]
    fn length_over_the_bound_is_refused_without_waiting() {
        let [hi, lo] = u16::try_from(V2_MAX_PAYLOAD + 1).unwrap().to_be_bytes();
        let bytes = with_sig(&[0x21, 0x11, hi, lo]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::V2TooLong(V2_MAX_PAYLOAD + 1))
        );
        let bytes = with_sig(&[0x20, 0x00, 0xFF, 0xFF]);
        assert_eq!(decode(&bytes), Err(DecodeError::V2TooLong(0xFFFF)));
        // The bound itself is fine.
        let [hi, lo] = u16::try_from(V2_MAX_PAYLOAD).unwrap().to_be_bytes();
        let mut bytes = with_sig(&[0x20, 0x00, hi, lo]);
        assert_eq!(decode(&bytes), Ok(None));
        bytes.resize(MAX_HEADER_LEN, 0);
        assert_eq!(decoded(&bytes), Ok(Some(Header::Local)));
    }

    #[test]
    fn address_block_shorter_than_the_family_needs() {
        let bytes = with_sig(&[
            0x21, 0x11, 0x00, 0x0B, 192, 0, 2, 1, 198, 51, 100, 7, 0, 1, 0,
        ]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::V2AddressesTruncated { len: 11, need: 12 })
        );
        let bytes = with_sig(&[
            0x21, 0x21, 0x00, 0x0C, 192, 0, 2, 1, 198, 51, 100, 7, 0, 1, 0, 2,
        ]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::V2AddressesTruncated { len: 12, need: 36 })
        );
    }

    #[test]
    fn tlv_overruns() {
        let addresses = [192, 0, 2, 1, 198, 51, 100, 7, 0, 1, 0, 2];
        for tlvs in [
            &[0x01, 0x00, 0x05, b'h', b'2'][..], // value runs past the end
            &[0x01, 0x00][..],                   // length cut short
            &[0x04][..],                         // only a type
            &[0x04, 0x00, 0x00, 0x01][..],       // a valid NOOP, then a stray byte
        ] {
            let payload = [&addresses[..], tlvs].concat();
            let len = u8::try_from(payload.len()).unwrap();
            let bytes = with_sig(&[&[0x21, 0x11, 0x00, len][..], &payload].concat());
            assert_eq!(
                decode(&bytes),
                Err(DecodeError::V2TlvOverrun),
                "{tlvs:02x?}"
            );
        }
    }

    #[test]
    fn bad_tlv_values() {
        let addresses = [192, 0, 2, 1, 198, 51, 100, 7, 0, 1, 0, 2];
        let mut long_id = vec![0x05, 0x00, 129];
        long_id.resize(3 + 129, 0);
        for (tlvs, kind, reason) in [
            (vec![0x02, 0x00, 0x02, 0xC3, 0x28], 0x02, "not UTF-8"),
            (long_id, 0x05, "over 128 bytes"),
            (vec![0x01, 0x00, 0x00, 0x01, 0x00, 0x00], 0x01, "repeated"),
            (
                vec![0x02, 0x00, 0x01, b'a', 0x02, 0x00, 0x01, b'a'],
                0x02,
                "repeated",
            ),
            (
                vec![0x05, 0x00, 0x01, 0x07, 0x05, 0x00, 0x01, 0x07],
                0x05,
                "repeated",
            ),
        ] {
            let payload = [&addresses[..], &tlvs].concat();
            let len = u8::try_from(payload.len()).unwrap();
            let bytes = with_sig(&[&[0x21, 0x11, 0x00, len][..], &payload].concat());
            assert_eq!(
                decode(&bytes),
                Err(DecodeError::V2Tlv { kind, reason }),
                "{tlvs:02x?}"
            );
        }
    }
}
