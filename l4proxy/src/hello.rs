//! Waiting for what the client says first (its "hello": a TLS ClientHello, an
//! HTTP request head) without consuming it, so the upstream later receives
//! exactly the bytes the client sent, and the relay can splice them.
//!
//! The bytes are read with `MSG_PEEK`. Since a peek leaves the socket readable,
//! `SO_RCVLOWAT` is raised to one byte more than we have seen: the socket then
//! only turns readable again when more data (or the end of the stream) arrives,
//! instead of waking us in a loop. It is set back to 1 when we are done.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};

/// Why peeking stopped before the classifier could decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// The deadline passed (a silent or slow client).
    Timeout,
    /// The client sent the most bytes we look at without a verdict.
    TooLarge,
    /// The client finished sending (or reset) before a verdict.
    Closed,
}

impl GaveUp {
    pub fn as_str(self) -> &'static str {
        match self {
            GaveUp::Timeout => "sniff timeout",
            GaveUp::TooLarge => "sniff size limit",
            GaveUp::Closed => "client closed before a verdict",
        }
    }
}

/// Peeks at the client's bytes until `classify` returns `Some`, the deadline
/// passes, `limit` bytes gave no verdict, or the client stops sending.
/// `classify` is called with everything received so far, each time more arrives.
pub async fn peek_until<T>(
    stream: &TcpStream,
    limit: usize,
    deadline: Duration,
    mut classify: impl FnMut(&[u8]) -> Option<T>,
) -> io::Result<Result<T, GaveUp>> {
    let mut buffer = vec![0u8; limit];
    // Raised only when the first bytes were not enough; then set back.
    let mut lowat_raised = false;
    let peeked = tokio::time::timeout(deadline, async {
        let mut seen = 0;
        loop {
            let ready = stream.ready(Interest::READABLE).await?;
            // Inside try_io, a WouldBlock clears only the readiness observed
            // before the peek, so data arriving meanwhile still wakes us.
            let step = stream.try_io(Interest::READABLE, || {
                let n = peek(stream.as_raw_fd(), &mut buffer)?;
                if n > seen {
                    seen = n;
                    if let Some(verdict) = classify(&buffer[..n]) {
                        return Ok(Ok(verdict));
                    }
                    if n == limit {
                        return Ok(Err(GaveUp::TooLarge));
                    }
                }
                if n == 0 || ready.is_read_closed() {
                    return Ok(Err(GaveUp::Closed));
                }
                set_recv_lowat(stream.as_raw_fd(), n + 1)?;
                lowat_raised = true;
                Err(io::ErrorKind::WouldBlock.into())
            });
            match step {
                Ok(done) => return Ok(done),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    if lowat_raised {
        set_recv_lowat(stream.as_raw_fd(), 1)?;
    }
    match peeked {
        Ok(result) => result,
        Err(_elapsed) => Ok(Err(GaveUp::Timeout)),
    }
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)`: copies what is queued without taking it.
fn peek(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is valid, initialised and writable for its whole length,
    // and `fd` is an open socket borrowed from a live TcpStream.
    let n = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `setsockopt(SO_RCVLOWAT)`: the socket reads as readable only from `bytes`
/// queued bytes on (or at the end of the stream).
fn set_recv_lowat(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair over loopback: (what the proxy accepted, the client).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.set_nodelay(true).unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (accepted, client)
    }

    /// The classifier of these tests: a verdict once a line is complete.
    fn line(bytes: &[u8]) -> Option<usize> {
        bytes.iter().position(|&b| b == b'\n')
    }

    #[tokio::test]
    async fn waits_for_more_and_consumes_nothing() {
        let (accepted, mut client) = pair().await;
        let writer = tokio::spawn(async move {
            for part in [&b"GET / H"[..], b"TTP/1.1\r", b"\nrest"] {
                client.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            client
        });
        let verdict = peek_until(&accepted, 1024, Duration::from_secs(5), line)
            .await
            .unwrap();
        assert_eq!(verdict, Ok(15), "the newline ends the first line");
        let mut client = writer.await.unwrap();
        client.shutdown().await.unwrap();
        let mut all = Vec::new();
        let mut accepted = accepted;
        accepted.read_to_end(&mut all).await.unwrap();
        assert_eq!(
            all, b"GET / HTTP/1.1\r\nrest",
            "peeking must leave every byte in place"
        );
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let (accepted, _client) = pair().await;
        let verdict = peek_until(&accepted, 1024, Duration::from_millis(100), line)
            .await
            .unwrap();
        assert_eq!(verdict, Err(GaveUp::Timeout));
    }

    #[tokio::test]
    async fn client_closing_early_is_reported() {
        let (accepted, mut client) = pair().await;
        client.write_all(b"no newline").await.unwrap();
        client.shutdown().await.unwrap();
        let verdict = peek_until(&accepted, 1024, Duration::from_secs(5), line)
            .await
            .unwrap();
        assert_eq!(verdict, Err(GaveUp::Closed));
    }

    #[tokio::test]
    async fn limit_without_verdict_is_too_large() {
        let (accepted, mut client) = pair().await;
        client.write_all(&[b'x'; 64]).await.unwrap();
        let verdict = peek_until(&accepted, 32, Duration::from_secs(5), line)
            .await
            .unwrap();
        assert_eq!(verdict, Err(GaveUp::TooLarge));
    }
}
