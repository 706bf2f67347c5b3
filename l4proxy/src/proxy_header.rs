//! The PROXY protocol on the wire: reading the header a trusted front proxy
//! sends before its client's bytes, and writing one to an upstream before
//! ours. The format is `proxy_protocol`'s (a pure codec); this is the I/O.

use std::{io, time::Duration};

use tokio::net::TcpStream;

use crate::{
    hello::{self, GaveUp, Look},
    proxy_protocol::{self, DecodeError, Decoded, MAX_HEADER_LEN},
    relay, upstream,
};

/// Why no header could be taken; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no PROXY protocol header from a trusted front proxy")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(DecodeError),
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("front proxy closed before a complete PROXY protocol header")]
    Closed,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

/// Reads the header at the start of `stream` within `deadline` and takes it
/// off the stream; the client's own bytes stay queued behind it.
pub async fn read(stream: &TcpStream, deadline: Duration) -> Result<Decoded, ReadError> {
    let mut seen = 0;
    let verdict = hello::peek_until(stream, MAX_HEADER_LEN, deadline, |bytes| {
        seen = bytes.len();
        Look::or_next_byte(proxy_protocol::decode(bytes).transpose(), bytes)
    })
    .await?;
    let decoded = match verdict {
        Ok(Ok(decoded)) => decoded,
        Ok(Err(DecodeError::NotProxy)) => return Err(ReadError::Missing),
        Ok(Err(e)) => return Err(ReadError::Malformed(e)),
        Err(GaveUp::Timeout) => return Err(ReadError::Timeout(deadline)),
        Err(GaveUp::Closed) => return Err(ReadError::Closed),
        // The decoder has a verdict by MAX_HEADER_LEN bytes, and within far
        // fewer looks than the most (a v1 line is at most 107 bytes, a v2
        // header waits for its declared length): either would be a bug,
        // and the header is refused either way.
        Err(GaveUp::TooLarge | GaveUp::TooManyPieces) => {
            return Err(ReadError::Malformed(DecodeError::V2TooLong(MAX_HEADER_LEN)));
        }
    };
    let drained = hello::nothing_follows(decoded.len, seen, MAX_HEADER_LEN);
    hello::consume(stream, decoded.len, drained).await?;
    // A header that came alone is acknowledged now: on a listener that
    // delays ACKs (a CONNECT rule's), a front proxy holding its client's
    // small first bytes for that ACK (Nagle) would otherwise wait for the
    // kernel's delayed-ACK timer.
    if drained && let Err(e) = upstream::release_ack(stream) {
        tracing::debug!(error = %e, "acknowledging a PROXY header");
    }
    Ok(decoded)
}

/// Room for the client bytes sent along with the header (a read takes what
/// is queued, up to this much).
const WITH_HEADER: usize = 16 * 1024;

/// Which side failed while the header went out.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("client error: reading its first bytes to send with the PROXY header: {0}")]
    Client(io::Error),
    #[error("upstream error: sending the PROXY header: {0}")]
    Upstream(io::Error),
}

/// Writes `header` to `upstream` before anything else, in one write with
/// whatever the client has sent so far (taken off the client socket), so the
/// upstream sees header and first bytes in one segment where they fit.
/// Returns how many of the client's bytes went with it.
pub async fn write(
    client: &TcpStream,
    upstream: &TcpStream,
    header: Vec<u8>,
) -> Result<u64, WriteError> {
    let mut out = header;
    // Read into the spare capacity: nothing to zero first.
    out.reserve_exact(WITH_HEADER);
    let taken = match client.try_read_buf(&mut out) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(WriteError::Client(e)),
    };
    relay::write_all(upstream, &out)
        .await
        .map_err(WriteError::Upstream)?;
    Ok(taken as u64)
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::{
        addrs::{ClientAddr, OrigDstAddr},
        proxy_protocol::{Addresses, Header, Tlvs, Version, encode},
    };

    /// A connected pair over loopback: (what the proxy accepted, the peer).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (accepted, peer)
    }

    fn header() -> Header {
        Header::Proxy {
            addresses: Addresses {
                client: ClientAddr("198.51.100.7:40000".parse().unwrap()),
                orig_dst: OrigDstAddr("192.0.2.10:443".parse().unwrap()),
            },
            tlvs: Tlvs::default(),
        }
    }

    #[tokio::test]
    async fn read_takes_the_header_in_pieces_and_leaves_the_data() {
        let (accepted, mut peer) = pair().await;
        let mut bytes = encode(Version::V2, &header()).unwrap();
        bytes.extend_from_slice(b"client data");
        tokio::spawn(async move {
            for chunk in bytes.chunks(5) {
                peer.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peer.shutdown().await.unwrap();
            peer
        });
        let decoded = read(&accepted, Duration::from_secs(5)).await.unwrap();
        assert_eq!(decoded.header, header());
        let mut rest = Vec::new();
        let mut accepted = accepted;
        accepted.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"client data");
    }

    /// A header written alone on a listener that delays ACKs (a CONNECT
    /// rule's) is acknowledged once taken, so a front proxy holding its
    /// client's small first bytes for that ACK (Nagle) does not wait for
    /// the kernel's 40 ms delayed-ACK timer: without it every attempt takes
    /// that long at least, so one quick attempt of five shows it.
    #[tokio::test]
    async fn a_header_that_came_alone_is_acknowledged_at_once() {
        let mut took = Vec::new();
        for _ in 0..5 {
            let listener = crate::install::listen(
                "127.0.0.1:0".parse().unwrap(),
                crate::policy::Keepalive::Off,
                crate::install::Role::Connect,
            );
            let listener = TcpListener::from_std(listener.unwrap()).unwrap();
            let mut front = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (mut accepted, _) = listener.accept().await.unwrap();
            let started = std::time::Instant::now();
            front
                .write_all(&encode(Version::V1, &header()).unwrap())
                .await
                .unwrap();
            front
                .write_all(b"CONNECT a:443 HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(
                read(&accepted, Duration::from_secs(5))
                    .await
                    .unwrap()
                    .header,
                header()
            );
            let mut head = [0u8; 26];
            accepted.read_exact(&mut head).await.unwrap();
            took.push(started.elapsed());
            if started.elapsed() < Duration::from_millis(30) {
                return;
            }
        }
        panic!("every client byte after a lone header waited for the delayed-ACK timer: {took:?}");
    }

    #[tokio::test]
    async fn read_refuses_missing_malformed_slow_and_short() {
        let (accepted, mut peer) = pair().await;
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(matches!(
            read(&accepted, Duration::from_secs(5)).await,
            Err(ReadError::Missing)
        ));

        let (accepted, mut peer) = pair().await;
        peer.write_all(b"PROXY TCP4 192.0.2.1 nope 1 2\r\n")
            .await
            .unwrap();
        assert!(matches!(
            read(&accepted, Duration::from_secs(5)).await,
            Err(ReadError::Malformed(DecodeError::V1Field(_)))
        ));

        let (accepted, mut peer) = pair().await;
        peer.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
        assert!(matches!(
            read(&accepted, Duration::from_millis(100)).await,
            Err(ReadError::Timeout(_))
        ));

        let (accepted, mut peer) = pair().await;
        peer.write_all(b"PROXY TCP4").await.unwrap();
        peer.shutdown().await.unwrap();
        assert!(matches!(
            read(&accepted, Duration::from_secs(5)).await,
            Err(ReadError::Closed)
        ));
    }

    #[tokio::test]
    async fn write_sends_header_and_queued_client_bytes_together() {
        let (to_proxy, mut client) = pair().await;
        let (to_upstream, mut upstream) = pair().await;
        client.write_all(b"hello").await.unwrap();
        to_proxy.readable().await.unwrap();
        let header = encode(Version::V1, &header()).unwrap();
        let taken = write(&to_proxy, &to_upstream, header.clone())
            .await
            .unwrap();
        assert_eq!(taken, 5);
        drop(to_upstream);
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [&header[..], b"hello"].concat());
    }

    #[tokio::test]
    async fn write_without_client_bytes_sends_the_header_alone() {
        let (to_proxy, _client) = pair().await;
        let (to_upstream, mut upstream) = pair().await;
        let header = encode(Version::V2, &header()).unwrap();
        assert_eq!(
            write(&to_proxy, &to_upstream, header.clone())
                .await
                .unwrap(),
            0
        );
        let mut got = vec![0u8; header.len()];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, header);
    }
}
