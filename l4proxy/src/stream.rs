//! One side of a connection: plain TCP, or TLS over it (terminated from a
//! client, or originated towards an upstream or a parent proxy).
//!
//! The stages before the relay look at what a peer sent without taking it
//! (a CONNECT head, a parent's answer, a hello): on TCP with `MSG_PEEK`
//! (`hello`), so the relay can still splice it; on TLS by reading the
//! decrypted bytes ahead into a buffer that later reads drain first.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsStream;

use crate::hello::{self, GaveUp, Look};

pub enum Stream {
    Tcp(TcpStream),
    /// Boxed: rustls' state is kilobytes, and most connections are plain.
    Tls(Box<Tls>),
}

pub struct Tls {
    stream: TlsStream<TcpStream>,
    /// Decrypted bytes looked at but not taken: reads get them first.
    ahead: Vec<u8>,
}

impl From<TlsStream<TcpStream>> for Stream {
    fn from(stream: TlsStream<TcpStream>) -> Self {
        Stream::Tls(Box::new(Tls {
            stream,
            ahead: Vec::new(),
        }))
    }
}

/// What a TLS session agreed on, for the close log.
#[derive(Clone, Debug, Default)]
pub struct TlsInfo {
    pub version: Option<&'static str>,
    pub cipher: Option<&'static str>,
    pub alpn: Option<String>,
    /// The server name the client asked for (on a terminated side).
    pub sni: Option<String>,
    /// The subject of the peer's certificate, when it sent one (a client's,
    /// on a terminated side).
    pub peer_subject: Option<String>,
}

impl Stream {
    /// The TCP connection beneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(tcp) => tcp,
            Stream::Tls(tls) => tls.stream.get_ref().0,
        }
    }

    /// What the TLS session agreed on; `None` for plain TCP.
    pub fn tls_info(&self) -> Option<TlsInfo> {
        let Stream::Tls(tls) = self else {
            return None;
        };
        let (_, state) = tls.stream.get_ref();
        let sni = match &tls.stream {
            TlsStream::Server(server) => server.get_ref().1.server_name().map(str::to_owned),
            TlsStream::Client(_) => None,
        };
        Some(TlsInfo {
            version: state.protocol_version().and_then(|v| v.as_str()),
            cipher: state
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str()),
            alpn: state
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            sni,
            peer_subject: state
                .peer_certificates()
                .and_then(<[CertificateDer]>::first)
                .and_then(subject_of),
        })
    }

    /// Looks at the peer's bytes until `classify` returns `Some`, the
    /// deadline passes, `limit` bytes gave no verdict, or the peer stops
    /// sending; takes none of them (see [`hello::peek_until`]).
    pub async fn peek_until<T>(
        &mut self,
        limit: usize,
        deadline: Duration,
        classify: impl FnMut(&[u8]) -> Look<T>,
    ) -> io::Result<Result<T, GaveUp>> {
        match self {
            Stream::Tcp(tcp) => hello::peek_until(tcp, limit, deadline, classify).await,
            Stream::Tls(tls) => tokio::time::timeout(deadline, tls.read_ahead(limit, classify))
                .await
                .unwrap_or(Ok(Err(GaveUp::Timeout))),
        }
    }

    /// Takes `len` bytes that were looked at off the stream and returns
    /// them; `drained`: no bytes followed them (see [`hello::consume`]).
    pub async fn consume(&mut self, len: usize, drained: bool) -> io::Result<Vec<u8>> {
        match self {
            Stream::Tcp(tcp) => hello::consume(tcp, len, drained).await,
            Stream::Tls(tls) => {
                // Taken whole, the buffer itself goes (see `drop_ahead`).
                let rest = tls.ahead.split_off(len.min(tls.ahead.len()));
                Ok(std::mem::replace(&mut tls.ahead, rest))
            }
        }
    }

    /// Writes all of `bytes` and pushes them out (a TLS record is sent, not
    /// kept for more).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await?;
        self.flush().await
    }

    /// Sends an answer that ends the connection (an error status), then its
    /// end, then reads and drops what the peer still sends until it closes
    /// (at most [`LINGER_BYTES`], for [`LINGER_TIME`]): a close with unread
    /// bytes sends a reset, which can discard the answer before the peer
    /// reads it (RFC 9112, 9.6), or unsent, if it was still going out.
    pub async fn answer_and_close(&mut self, answer: &[u8]) -> io::Result<()> {
        self.send(answer).await?;
        self.shutdown().await?;
        let mut dropped = vec![0u8; 4096];
        let mut left = LINGER_BYTES;
        let _ = tokio::time::timeout(LINGER_TIME, async {
            while left > 0 {
                match self.read(&mut dropped).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
        Ok(())
    }
}

/// How much of what a peer sends after an error answer is read and dropped
/// before the connection is closed anyway.
const LINGER_BYTES: usize = 64 * 1024;
/// How long a peer has to close after an error answer.
const LINGER_TIME: Duration = Duration::from_secs(2);

impl Tls {
    /// Drops the first `n` bytes read ahead, and the buffer with the last
    /// of them: it can hold tens of KiB, and the stream lives as long as
    /// its connection.
    fn drop_ahead(&mut self, n: usize) {
        if n >= self.ahead.len() {
            self.ahead = Vec::new();
        } else {
            self.ahead.drain(..n);
        }
    }

    /// Reads decrypted bytes into `ahead` until `classify` has a verdict on
    /// them.
    async fn read_ahead<T>(
        &mut self,
        limit: usize,
        mut classify: impl FnMut(&[u8]) -> Look<T>,
    ) -> io::Result<Result<T, GaveUp>> {
        let mut until = 1;
        loop {
            if self.ahead.len() >= until {
                match classify(&self.ahead) {
                    Look::Verdict(verdict) => return Ok(Ok(verdict)),
                    Look::TooLarge => return Ok(Err(GaveUp::TooLarge)),
                    Look::Wait { until: more } => {
                        until = hello::next_wait(more, self.ahead.len(), limit);
                    }
                }
            }
            if self.ahead.len() >= limit {
                return Ok(Err(GaveUp::TooLarge));
            }
            let room = limit - self.ahead.len();
            let read = (&mut self.stream)
                .take(room as u64)
                .read_buf(&mut self.ahead)
                .await;
            match read {
                Ok(0) => return Ok(Err(GaveUp::Closed)),
                Ok(_) => {}
                // Closed without close_notify: as closed, for the verdict.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(Err(GaveUp::Closed));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A certificate's subject, as the log shows it.
fn subject_of(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(cert)
        .ok()
        .map(|(_, cert)| cert.subject().to_string())
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) if !tls.ahead.is_empty() => {
                let n = tls.ahead.len().min(buf.remaining());
                buf.put_slice(&tls.ahead[..n]);
                tls.drop_ahead(n);
                Poll::Ready(Ok(()))
            }
            Stream::Tls(tls) => Pin::new(&mut tls.stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(&mut tls.stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(&mut tls.stream).poll_flush(cx),
        }
    }

    /// TLS: close_notify, then the TCP write side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(&mut tls.stream).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// A terminated TLS connection over loopback: (the server's stream,
    /// the client's).
    async fn tls_pair() -> (Stream, tokio_rustls::client::TlsStream<TcpStream>) {
        let cert = rcgen::generate_simple_self_signed(vec!["a.example".to_owned()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, connected) = tokio::join!(listener.accept(), connecting);
        let name = ServerName::try_from("a.example").unwrap();
        let (server, client) = tokio::join!(
            TlsAcceptor::from(Arc::new(server)).accept(accepted.unwrap().0),
            TlsConnector::from(Arc::new(client)).connect(name, connected.unwrap()),
        );
        (
            Stream::from(TlsStream::Server(server.unwrap())),
            client.unwrap(),
        )
    }

    #[tokio::test]
    async fn bytes_read_ahead_are_freed_once_taken() {
        let (mut server, mut client) = tls_pair().await;
        client.write_all(&[b'x'; 20_000]).await.unwrap();
        client.flush().await.unwrap();
        let ahead = |server: &Stream| match server {
            Stream::Tls(tls) => tls.ahead.capacity(),
            Stream::Tcp(_) => unreachable!(),
        };
        let seen = server
            .peek_until(32_768, Duration::from_secs(5), |bytes| {
                if bytes.len() >= 20_000 {
                    Look::Verdict(bytes.len())
                } else {
                    Look::Wait { until: 20_000 }
                }
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, 20_000);
        assert!(ahead(&server) >= 20_000);
        // Taken in part, then read to the end: nothing is held after.
        assert_eq!(server.consume(100, false).await.unwrap().len(), 100);
        let mut rest = vec![0u8; 19_900];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(ahead(&server), 0, "the read-ahead buffer is freed");
        // And taken whole.
        client.write_all(b"more").await.unwrap();
        client.flush().await.unwrap();
        let seen = server
            .peek_until(32_768, Duration::from_secs(5), |bytes| {
                Look::or_next_byte((bytes.len() >= 4).then_some(bytes.len()), bytes)
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(server.consume(seen, false).await.unwrap(), b"more");
        assert_eq!(ahead(&server), 0);
    }
}
