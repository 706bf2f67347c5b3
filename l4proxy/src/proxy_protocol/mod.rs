//! The PROXY protocol header (HAProxy's `doc/proxy-protocol.txt`, versions 1
//! and 2): sent to upstreams so they see the client, accepted from trusted
//! front proxies. Pure codec, no I/O: the caller owns sockets and deadlines.
//!
//! - [`encode`] writes a whole header; [`decode`] reads one from the start of a
//!   buffer and says how many bytes it took, `Ok(None)` while the bytes so far
//!   are a prefix of a valid header, and tells [`DecodeError::NotProxy`] (not a
//!   PROXY header at all) from the other variants (a broken one).
//! - One module per wire format: [`v1`] (text line) and [`v2`] (binary).
//!
//! Choices the spec leaves open, made here:
//! - Both addresses of a header are in one family. A mixed pair (an IPv4 client
//!   reaching an IPv6 original destination, or the reverse) is sent as TCP6 /
//!   AF_INET6 with the IPv4 one IPv4-mapped, the only form that keeps both; a
//!   pair that is IPv4 once mapped addresses are unmapped is sent as TCP4 /
//!   AF_INET. Decoding unmaps IPv4-mapped addresses, so the daemon never puts a
//!   mapped address on a socket.
//! - Only TCP over IPv4/IPv6 carries addresses. v1 `UNKNOWN` and v2 PROXY
//!   headers for other families or protocols decode as [`Header::Unknown`]:
//!   accepted, and the receiver uses the connection's real endpoints, as the
//!   spec asks.
//! - v2 payloads are bounded by [`V2_MAX_PAYLOAD`] both ways, so everything the
//!   daemon sends, its own decoder accepts.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::addrs::{ClientAddr, OrigDstAddr};

pub mod v1;
pub mod v2;

/// The largest v2 payload (address block and TLVs, after the 16 fixed bytes)
/// accepted or sent. The spec sets none; senders fit an address block and a few
/// short TLVs in a few hundred bytes, and a bound keeps a broken or hostile
/// length field from making the receiver wait for (and buffer) 64 KiB.
pub const V2_MAX_PAYLOAD: usize = 4096;

/// The longest header [`decode`] accepts: given this many bytes it never asks
/// for more, so a reader needs no bigger buffer.
pub const MAX_HEADER_LEN: usize = v2::FIXED_LEN + V2_MAX_PAYLOAD;

/// Which header format to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// The text line: addresses only, no TLVs.
    V1,
    /// The binary header, with TLVs.
    V2,
}

/// A decoded header, or one to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Header {
    /// v2 LOCAL: the sender opened the connection for itself (a health check);
    /// the receiver uses the real endpoints. v1 cannot say LOCAL and sends
    /// `UNKNOWN` instead.
    Local,
    /// v1 `UNKNOWN`, or v2 PROXY for something other than TCP over IPv4/IPv6:
    /// the receiver uses the real endpoints.
    Unknown,
    /// TCP relayed on behalf of a client.
    Proxy { addresses: Addresses, tlvs: Tlvs },
}

impl Header {
    /// The endpoints to use instead of the connection's own, if the header
    /// names any.
    pub fn addresses(&self) -> Option<Addresses> {
        match self {
            Header::Proxy { addresses, .. } => Some(*addresses),
            Header::Local | Header::Unknown => None,
        }
    }
}

/// The header's source and destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses {
    /// Source: the client.
    pub client: ClientAddr,
    /// Destination: where the client meant to go.
    pub orig_dst: OrigDstAddr,
}

/// The v2 TLVs l4proxy uses; others are skipped on decode. v1 carries none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tlvs {
    /// `PP2_TYPE_ALPN`: the application protocol, as opaque bytes.
    pub alpn: Option<Vec<u8>>,
    /// `PP2_TYPE_AUTHORITY`: the host name the client asked for (TLS SNI).
    pub authority: Option<String>,
    /// `PP2_TYPE_UNIQUE_ID`: an opaque connection ID, at most
    /// [`v2::UNIQUE_ID_MAX_LEN`] bytes.
    pub unique_id: Option<Vec<u8>>,
}

/// A header decoded from the start of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub header: Header,
    pub version: Version,
    /// How many bytes the header took; what follows is the client's data.
    pub len: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("PROXY v2 unique ID of {0} bytes is over the spec's {max}", max = v2::UNIQUE_ID_MAX_LEN)]
    UniqueIdTooLong(usize),
    #[error("PROXY v2 payload of {0} bytes is over the {V2_MAX_PAYLOAD}-byte limit")]
    TooLong(usize),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes cannot start a v1 or v2 header: the peer does not speak the
    /// PROXY protocol at all.
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 line has no CRLF within {max} bytes", max = v1::MAX_LEN)]
    V1TooLong,
    #[error("PROXY v1 line has a CR or LF that is not its final CRLF")]
    V1StrayCrLf,
    #[error("PROXY v1 line has a bad {0}")]
    V1Field(&'static str),
    #[error("PROXY v2 version {0} (only 2 exists)")]
    V2Version(u8),
    #[error("PROXY v2 command {0} (only LOCAL 0 and PROXY 1 exist)")]
    V2Command(u8),
    #[error("PROXY v2 family/protocol byte {0:#04x} is not in the spec")]
    V2Family(u8),
    #[error("PROXY v2 payload of {0} bytes is over the {V2_MAX_PAYLOAD}-byte limit")]
    V2TooLong(usize),
    #[error("PROXY v2 payload of {len} bytes is shorter than its {need}-byte address block")]
    V2AddressesTruncated { len: usize, need: usize },
    #[error("PROXY v2 TLV runs past the end of the header")]
    V2TlvOverrun,
    #[error("PROXY v2 TLV {kind:#04x}: {reason}")]
    V2Tlv { kind: u8, reason: &'static str },
}

/// Writes `header` in the `version` format. Only v2 can fail, on a TLV the spec
/// or [`V2_MAX_PAYLOAD`] does not allow; v1 leaves TLVs out.
pub fn encode(version: Version, header: &Header) -> Result<Vec<u8>, EncodeError> {
    match version {
        Version::V1 => Ok(v1::encode(header)),
        Version::V2 => v2::encode(header),
    }
}

/// Reads a v1 or v2 header from the start of `buf`. `Ok(None)`: `buf` is a
/// prefix of a valid header, read more.
pub fn decode(buf: &[u8]) -> Result<Option<Decoded>, DecodeError> {
    // The first byte tells the versions apart ('\r' or 'P'), so at most one
    // prefix test passes; an empty buffer passes the first and waits.
    let (version, decoded) = if is_partial_prefix(buf, &v2::SIGNATURE) {
        (Version::V2, v2::decode(buf)?)
    } else if is_partial_prefix(buf, v1::SIGNATURE) {
        (Version::V1, v1::decode(buf)?)
    } else {
        return Err(DecodeError::NotProxy);
    };
    Ok(decoded.map(|(header, len)| Decoded {
        header,
        version,
        len,
    }))
}

/// Whether `buf` and `signature` agree on the bytes both have.
fn is_partial_prefix(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

/// `addr` with an IPv4-mapped IPv6 address turned into the IPv4 one.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A header's two endpoints in the one family both header formats require.
enum Endpoints {
    V4 {
        src: SocketAddrV4,
        dst: SocketAddrV4,
    },
    V6 {
        src: SocketAddrV6,
        dst: SocketAddrV6,
    },
}

impl Endpoints {
    /// IPv4 when both are IPv4 once unmapped; otherwise IPv6, mapping an IPv4
    /// one (see the module comment).
    fn new(addresses: &Addresses) -> Self {
        fn v6(addr: SocketAddr) -> SocketAddrV6 {
            match addr {
                SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
                SocketAddr::V6(v6) => v6,
            }
        }
        match (unmapped(addresses.client.0), unmapped(addresses.orig_dst.0)) {
            (SocketAddr::V4(src), SocketAddr::V4(dst)) => Endpoints::V4 { src, dst },
            (src, dst) => Endpoints::V6 {
                src: v6(src),
                dst: v6(dst),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PROXY header from `client` to `orig_dst`.
    pub(super) fn proxy(client: &str, orig_dst: &str, tlvs: Tlvs) -> Header {
        Header::Proxy {
            addresses: Addresses {
                client: ClientAddr(client.parse().unwrap()),
                orig_dst: OrigDstAddr(orig_dst.parse().unwrap()),
            },
            tlvs,
        }
    }

    pub(super) fn all_tlvs() -> Tlvs {
        Tlvs {
            alpn: Some(b"h2".to_vec()),
            authority: Some("example.com".to_owned()),
            unique_id: Some(vec![0xde, 0xad, 0xbe, 0xef]),
        }
    }

    /// The header of `bytes`, which must be whole and of `version`.
    pub(super) fn decoded_as(
        version: Version,
        bytes: &[u8],
    ) -> Result<Option<Header>, DecodeError> {
        decode(bytes).map(|d| {
            d.map(|decoded| {
                assert_eq!(decoded.version, version);
                assert_eq!(decoded.len, bytes.len(), "the whole header, no more");
                decoded.header
            })
        })
    }

    /// Asserts that every proper prefix of `bytes` asks for more.
    pub(super) fn assert_prefixes_incomplete(bytes: &[u8]) {
        for n in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..n]),
                Ok(None),
                "prefix of {n} bytes of {bytes:02x?}"
            );
        }
    }

    #[test]
    fn other_protocols_are_not_proxy() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[0x16, 0x03, 0x01, 0x02, 0x00], // TLS handshake record
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"PROXZ",
            b"proxy TCP4",
            b"\r\n\r\n\0\r\nQUIX",
            b"\n",
        ] {
            assert_eq!(decode(bytes), Err(DecodeError::NotProxy), "{bytes:02x?}");
        }
    }

    #[test]
    fn empty_buffer_waits() {
        assert_eq!(decode(b""), Ok(None));
    }

    #[test]
    fn round_trips_and_every_prefix_waits() {
        let headers = [
            proxy("192.0.2.1:56324", "198.51.100.7:443", Tlvs::default()),
            proxy("192.0.2.1:56324", "198.51.100.7:443", all_tlvs()),
            proxy("[2001:db8::1]:56324", "[2001:db8:1::7]:443", all_tlvs()),
            // Mixed families, both ways round.
            proxy("192.0.2.1:56324", "[2001:db8:1::7]:443", all_tlvs()),
            proxy("[2001:db8::1]:56324", "198.51.100.7:443", Tlvs::default()),
            // Extremes.
            proxy("0.0.0.0:0", "255.255.255.255:65535", Tlvs::default()),
            proxy(
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                "[::]:0",
                Tlvs {
                    alpn: Some(Vec::new()),
                    authority: Some(String::new()),
                    unique_id: Some(vec![0xff; v2::UNIQUE_ID_MAX_LEN]),
                },
            ),
            Header::Unknown,
            Header::Local,
        ];
        for header in headers {
            for version in [Version::V1, Version::V2] {
                let bytes = encode(version, &header).unwrap();
                let expected = match (&header, version) {
                    // v1 has no LOCAL and no TLVs.
                    (Header::Local, Version::V1) => Header::Unknown,
                    (Header::Proxy { addresses, .. }, Version::V1) => Header::Proxy {
                        addresses: *addresses,
                        tlvs: Tlvs::default(),
                    },
                    _ => header.clone(),
                };
                let decoded = Decoded {
                    header: expected,
                    version,
                    len: bytes.len(),
                };
                assert_eq!(
                    decode(&bytes),
                    Ok(Some(decoded.clone())),
                    "{version:?} {header:?}"
                );
                // The client's first bytes stay where they are.
                let mut with_data = bytes.clone();
                with_data.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(decode(&with_data), Ok(Some(decoded)));
                assert_prefixes_incomplete(&bytes);
            }
        }
    }

    #[test]
    fn mapped_addresses_come_back_unmapped() {
        let mapped = proxy(
            "[::ffff:192.0.2.1]:1",
            "[::ffff:198.51.100.7]:2",
            Tlvs::default(),
        );
        for version in [Version::V1, Version::V2] {
            let decoded = decode(&encode(version, &mapped).unwrap()).unwrap().unwrap();
            assert_eq!(
                decoded.header,
                proxy("192.0.2.1:1", "198.51.100.7:2", Tlvs::default())
            );
        }
    }

    #[test]
    fn addresses_only_for_proxy() {
        let header = proxy("192.0.2.1:1", "198.51.100.7:2", Tlvs::default());
        assert_eq!(
            header.addresses().map(|a| (a.client.0, a.orig_dst.0)),
            Some((
                "192.0.2.1:1".parse().unwrap(),
                "198.51.100.7:2".parse().unwrap()
            ))
        );
        assert_eq!(Header::Local.addresses(), None);
        assert_eq!(Header::Unknown.addresses(), None);
    }
}
