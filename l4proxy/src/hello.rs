//! Waiting for what the client says first (its "hello": a TLS ClientHello, an
//! HTTP request head) without consuming it, so the upstream later receives
//! exactly the bytes the client sent, and the relay can splice them.
//!
//! The bytes are read with `MSG_PEEK`. Since a peek leaves the socket readable,
//! `SO_RCVLOWAT` is raised to what the classifier waits for (one byte more
//! than it has seen, or as much as a TLS record header says is coming): the
//! socket then only turns readable again when that much (or the end of the
//! stream) has arrived, instead of waking us in a loop or at every piece of a
//! client that trickles. It is set back to 1 when we are done.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};

/// The peek buffer's first size; it doubles while a peek fills it.
const INITIAL_BUFFER: usize = 4096;

/// The most looks without a verdict: each copies everything queued, so a
/// client sending its hello a byte per segment (a classifier that cannot
/// tell how much more it needs waits for the next byte) would cost
/// looks × bytes copied. Real clients send a hello in a few segments.
const MAX_LOOKS: u32 = 256;

/// Why peeking stopped before the classifier could decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// The deadline passed (a silent or slow client).
    Timeout,
    /// The client sent the most bytes we look at without a verdict.
    TooLarge,
    /// The client's bytes came in more than [`MAX_LOOKS`] pieces without a
    /// verdict.
    TooManyPieces,
    /// The client finished sending (or reset) before a verdict.
    Closed,
}

impl GaveUp {
    pub fn as_str(self) -> &'static str {
        match self {
            GaveUp::Timeout => "sniff timeout",
            GaveUp::TooLarge => "sniff size limit",
            GaveUp::TooManyPieces => "sniff piece limit",
            GaveUp::Closed => "client closed before a verdict",
        }
    }
}

/// What a classifier makes of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Look<T> {
    Verdict(T),
    /// No verdict can come before the peer has sent `until` bytes in all:
    /// the classifier is asked again only then (or at the end of the
    /// stream, or at `limit`). One more byte than it had, if it cannot
    /// tell.
    Wait {
        until: usize,
    },
    /// What is there starts something longer than the limit lets through
    /// (a ClientHello's declared length, say): given up at once.
    TooLarge,
}

impl<T> Look<T> {
    /// `verdict` if there is one, else ask again at the next byte: for a
    /// classifier that cannot tell how much more it needs.
    pub fn or_next_byte(verdict: Option<T>, bytes: &[u8]) -> Self {
        verdict.map_or(
            Look::Wait {
                until: bytes.len() + 1,
            },
            Look::Verdict,
        )
    }
}

/// What to wait for after a classifier's `Wait { until }`, with `seen`
/// bytes looked at and at most `limit` to look at: at least one more, at
/// most the limit (where the answer is final).
pub(crate) fn next_wait(until: usize, seen: usize, limit: usize) -> usize {
    until.min(limit).max(seen + 1)
}

/// Peeks at the client's bytes until `classify` gives a verdict, the
/// deadline passes, `limit` bytes gave no verdict, or the client stops
/// sending. `classify` is called with everything received so far, each
/// time as much more as it waits for has arrived.
pub async fn peek_until<T>(
    stream: &TcpStream,
    limit: usize,
    deadline: Duration,
    mut classify: impl FnMut(&[u8]) -> Look<T>,
) -> io::Result<Result<T, GaveUp>> {
    let fd = stream.as_raw_fd();
    let mut peeker = Peeker::new(limit);
    let peeked = tokio::time::timeout(deadline, async {
        // Speculative first look: the bytes are often queued by the time the
        // connection is accepted (nearly always under load), and waiting for
        // epoll to report them would cost a wake-up.
        match peeker.look(fd, false, &mut classify) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
        loop {
            let ready = stream.ready(Interest::READABLE).await?;
            // Inside try_io, a WouldBlock clears only the readiness observed
            // before the peek, so data arriving meanwhile still wakes us.
            let step = stream.try_io(Interest::READABLE, || {
                peeker.look(fd, ready.is_read_closed(), &mut classify)
            });
            match step {
                Ok(done) => return Ok(done),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    if peeker.lowat > 1 {
        set_recv_lowat(fd, 1)?;
    }
    match peeked {
        Ok(result) => result,
        Err(_elapsed) => Ok(Err(GaveUp::Timeout)),
    }
}

/// Whether a look that gave `seen` bytes to its classifier, with at most
/// `limit` looked at, saw exactly a `len`-byte header and nothing after it:
/// a look takes everything queued unless it stops at `limit`.
pub fn nothing_follows(len: usize, seen: usize, limit: usize) -> bool {
    seen == len && seen < limit
}

/// Reads `len` bytes that are already queued (they were peeked) and
/// returns them: a header the proxy takes off the stream, leaving what
/// follows it queued. `drained`: nothing followed the header when it was
/// peeked (see [`nothing_follows`]); the socket is then marked not
/// readable, so that the next read waits for more instead of finding
/// nothing.
pub async fn consume(stream: &TcpStream, len: usize, drained: bool) -> io::Result<Vec<u8>> {
    let fd = stream.as_raw_fd();
    // On the heap: a buffer in this future would be in every connection's
    // task, header or not, for the connection's whole life.
    let mut buffer = vec![0u8; len];
    let mut read_so_far = 0;
    // The bytes are queued, so they are read at once, without a readiness
    // check that could yield to the reactor between the peek and the mark.
    let mut waited = false;
    while read_so_far < len {
        let rest = &mut buffer[read_so_far..];
        let read = if waited {
            stream.readable().await?;
            stream.try_io(Interest::READABLE, || recv(fd, rest, libc::MSG_DONTWAIT))
        } else {
            recv(fd, rest, libc::MSG_DONTWAIT)
        };
        match read {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => read_so_far += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => waited = true,
            Err(e) => return Err(e),
        }
    }
    if drained && !waited {
        // Clears the readiness the reactor reported so far, which is all
        // the peek saw: bytes that came after it have an epoll event not yet
        // reported (this task has not yielded since), which sets it again.
        let _ = stream.try_io(Interest::READABLE, || {
            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
        });
    }
    Ok(buffer)
}

/// The state of one `peek_until`.
struct Peeker {
    limit: usize,
    /// The bytes the classifier waits for (at least one more than it saw).
    until: usize,
    /// `SO_RCVLOWAT` as last set (raised only when the first bytes were not
    /// enough; set back when done). Each setting wakes the socket if what
    /// is queued reaches the mark, or if the receive buffer is nearly full
    /// whatever the mark: set only when `until` changes, or a wake-up with
    /// nothing new would set it again, and wake again.
    lowat: usize,
    /// The kernel would not hold `SO_RCVLOWAT` at `until` (it caps it at
    /// half the most a receive buffer may hold): every arrival wakes us.
    lowat_capped: bool,
    /// Looks that asked the classifier and got no verdict.
    looks: u32,
}

thread_local! {
    /// Where each look copies what is queued: a look is synchronous and
    /// starts afresh (the socket keeps the bytes), so one buffer serves
    /// every connection of the thread, instead of a zeroed allocation per
    /// connection. Most hellos fit in a few KiB: it starts there and grows
    /// towards the largest limit asked only for the rare big one.
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0u8; INITIAL_BUFFER]);
}

impl Peeker {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            until: 1,
            lowat: 1,
            lowat_capped: false,
            looks: 0,
        }
    }

    /// Peeks at everything queued and asks `classify` if there is as much
    /// as it waits for. `WouldBlock`: wait for more (`SO_RCVLOWAT` is set so
    /// that only that much, or the end, wakes the socket). `closed`: the peer
    /// has finished sending.
    fn look<T>(
        &mut self,
        fd: RawFd,
        closed: bool,
        classify: &mut impl FnMut(&[u8]) -> Look<T>,
    ) -> io::Result<Result<T, GaveUp>> {
        let (n, decided) = BUFFER.with_borrow_mut(|buffer| {
            let mut size = buffer.len().min(self.limit);
            let mut n = peek(fd, &mut buffer[..size])?;
            while n == size && size < self.limit {
                size = (2 * size).min(self.limit);
                if buffer.len() < size {
                    buffer.resize(size, 0);
                }
                n = peek(fd, &mut buffer[..size])?;
            }
            if n < self.until {
                return Ok((n, None));
            }
            let decided = match classify(&buffer[..n]) {
                Look::Verdict(verdict) => Some(Ok(verdict)),
                Look::TooLarge => Some(Err(GaveUp::TooLarge)),
                Look::Wait { .. } if n == self.limit => Some(Err(GaveUp::TooLarge)),
                Look::Wait { .. } if self.looks + 1 >= MAX_LOOKS => {
                    Some(Err(GaveUp::TooManyPieces))
                }
                Look::Wait { until } => {
                    self.looks += 1;
                    self.until = next_wait(until, n, self.limit);
                    None
                }
            };
            io::Result::Ok((n, decided))
        })?;
        if let Some(decided) = decided {
            return Ok(decided);
        }
        if n == 0 || closed {
            return Ok(Err(GaveUp::Closed));
        }
        if !self.lowat_capped && self.lowat != self.until {
            self.lowat = self.until;
            set_recv_lowat(fd, self.until)?;
            if recv_lowat(fd)? < self.until {
                // A capped mark the queue may already reach would wake us at
                // once, and each setting again: a busy loop.
                self.lowat_capped = true;
                set_recv_lowat(fd, 1)?;
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)`: copies what is queued without taking it.
fn peek(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    recv(fd, buffer, libc::MSG_PEEK | libc::MSG_DONTWAIT)
}

/// `recv(2)` on the descriptor itself, past tokio's readiness state.
fn recv(fd: RawFd, buffer: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buffer` is valid, initialised and writable for its whole length,
    // and `fd` is an open socket borrowed from a live TcpStream.
    let n = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `setsockopt(SO_RCVLOWAT)`: the socket reads as readable only from `bytes`
/// queued bytes on (or at the end of the stream). The kernel may keep a
/// lower mark ([`recv_lowat`]).
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
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The `SO_RCVLOWAT` mark the kernel keeps.
fn recv_lowat(fd: RawFd) -> io::Result<usize> {
    let mut kept: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw mut kept).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(kept).unwrap_or(0))
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
    fn line(bytes: &[u8]) -> Look<usize> {
        Look::or_next_byte(bytes.iter().position(|&b| b == b'\n'), bytes)
    }

    /// What a wait for a known size saw: a classifier that knows its
    /// answer needs `size` bytes (as a TLS record header tells) peeks at
    /// `accepted` until `limit` or `deadline`.
    struct SizedWait {
        verdict: Result<usize, GaveUp>,
        /// How often the classifier was asked.
        asked: usize,
        /// How often the task was polled: each poll after the first is a
        /// wake-up.
        polls: usize,
    }

    async fn wait_for_size(
        accepted: &TcpStream,
        limit: usize,
        deadline: Duration,
        size: usize,
    ) -> SizedWait {
        let (mut asked, mut polls) = (0, 0);
        let classify = |bytes: &[u8]| {
            asked += 1;
            if bytes.len() >= size {
                Look::Verdict(bytes.len())
            } else {
                Look::Wait { until: size }
            }
        };
        let verdict = {
            let mut looking = std::pin::pin!(peek_until(accepted, limit, deadline, classify));
            std::future::poll_fn(|cx| {
                polls += 1;
                looking.as_mut().poll(cx)
            })
            .await
            .unwrap()
        };
        SizedWait {
            verdict,
            asked,
            polls,
        }
    }

    #[tokio::test]
    async fn a_known_size_is_waited_for_not_each_piece() {
        let (accepted, mut client) = pair().await;
        let writer = tokio::spawn(async move {
            for _ in 0..100 {
                client.write_all(&[b'x'; 10]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client
        });
        let seen = wait_for_size(&accepted, 4096, Duration::from_secs(5), 1000).await;
        assert_eq!(seen.verdict, Ok(1000));
        // Once at the first piece, once when all had come: a client that
        // trickles must not make us wake up and look at every piece.
        assert_eq!(seen.asked, 2, "looks for 100 pieces");
        assert!(seen.polls <= 3, "{} wake-ups for 100 pieces", seen.polls);
        drop(writer.await.unwrap());
    }

    /// A classifier that waits for each next byte, and a client that sends
    /// one at a time, each once the last was looked at: given up after
    /// [`MAX_LOOKS`] looks, not one per byte up to the limit.
    #[tokio::test]
    async fn a_hello_in_too_many_pieces_is_given_up() {
        use std::sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        };
        let (accepted, mut client) = pair().await;
        client.set_nodelay(true).unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        let looked = asked.clone();
        let writer = tokio::spawn(async move {
            for sent in 1..=2 * MAX_LOOKS as usize {
                if client.write_all(b"x").await.is_err() {
                    break;
                }
                while looked.load(Ordering::Relaxed) < sent {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            client
        });
        let verdict = peek_until(&accepted, 64 * 1024, Duration::from_secs(20), |bytes| {
            asked.fetch_add(1, Ordering::Relaxed);
            line(bytes)
        })
        .await
        .unwrap();
        assert_eq!(verdict, Err(GaveUp::TooManyPieces));
        assert_eq!(asked.load(Ordering::Relaxed), MAX_LOOKS as usize);
        // The writer waits for a look that no longer comes.
        writer.abort();
    }

    #[tokio::test]
    async fn a_wait_the_kernel_caps_does_not_spin() {
        let (accepted, mut client) = pair().await;
        // A locked receive buffer caps SO_RCVLOWAT at half its size, below
        // what the classifier waits for, and what is queued reaches it.
        socket2::SockRef::from(&accepted)
            .set_recv_buffer_size(4096)
            .unwrap();
        set_recv_lowat(accepted.as_raw_fd(), 1 << 20).unwrap();
        let cap = recv_lowat(accepted.as_raw_fd()).unwrap();
        set_recv_lowat(accepted.as_raw_fd(), 1).unwrap();
        assert!(cap < 10_000, "the kernel keeps a mark of {cap}");
        client.write_all(&[b'x'; 6000]).await.unwrap();
        let seen = wait_for_size(&accepted, 16_384, Duration::from_millis(300), 10_000).await;
        assert_eq!(seen.verdict, Err(GaveUp::Timeout), "{cap}");
        assert!(
            seen.polls < 20,
            "{} wake-ups with nothing new (mark capped at {cap})",
            seen.polls
        );
    }

    #[tokio::test]
    async fn the_end_of_the_stream_ends_a_wait_for_a_size() {
        let (accepted, mut client) = pair().await;
        client.write_all(&[b'x'; 10]).await.unwrap();
        let looked = wait_for_size(&accepted, 4096, Duration::from_secs(5), 1000);
        let close = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(&[b'x'; 10]).await.unwrap();
            client.shutdown().await.unwrap();
        };
        let (seen, ()) = tokio::join!(looked, close);
        assert_eq!(seen.verdict, Err(GaveUp::Closed));
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

    /// Peeks a line and consumes it, as a header is taken off; returns what
    /// the peek saw.
    async fn take_line(accepted: &TcpStream) -> usize {
        // Readiness reported first, as when the head woke the task.
        accepted.readable().await.unwrap();
        let mut seen = 0;
        let end = peek_until(accepted, 1024, Duration::from_secs(5), |bytes| {
            seen = bytes.len();
            line(bytes)
        })
        .await
        .unwrap()
        .unwrap();
        consume(accepted, end + 1, nothing_follows(end + 1, seen, 1024))
            .await
            .unwrap();
        seen
    }

    #[tokio::test]
    async fn a_header_with_nothing_after_it_leaves_the_socket_waiting_for_more() {
        let (accepted, mut client) = pair().await;
        client.write_all(b"CONNECT x\n").await.unwrap();
        assert_eq!(take_line(&accepted).await, 10);
        // Nothing queued: not readable (the next read waits, not tries).
        assert!(
            futures::poll!(std::pin::pin!(accepted.readable())).is_pending(),
            "a drained socket must not read as readable"
        );
        // What comes next wakes it.
        client.write_all(b"hello").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), accepted.readable())
            .await
            .expect("bytes after the header make the socket readable")
            .unwrap();
        let mut buffer = [0u8; 16];
        assert_eq!(accepted.try_read(&mut buffer).unwrap(), 5);
    }

    #[tokio::test]
    async fn bytes_after_a_header_stay_readable() {
        let (accepted, mut client) = pair().await;
        client.write_all(b"CONNECT x\nearly").await.unwrap();
        assert_eq!(take_line(&accepted).await, 15);
        let mut buffer = [0u8; 16];
        assert_eq!(accepted.try_read(&mut buffer).unwrap(), 5);
        assert_eq!(&buffer[..5], b"early");
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

    /// A line three times the peek buffer's first size, under a 64 KiB limit.
    async fn see_a_big_hello() {
        let (accepted, mut client) = pair().await;
        let mut big = vec![b'x'; 3 * INITIAL_BUFFER];
        big.push(b'\n');
        client.write_all(&big).await.unwrap();
        let verdict = peek_until(&accepted, 64 * 1024, Duration::from_secs(5), line)
            .await
            .unwrap();
        assert_eq!(verdict, Ok(3 * INITIAL_BUFFER));
    }

    #[tokio::test]
    async fn a_hello_larger_than_the_first_buffer_is_seen_whole() {
        see_a_big_hello().await;
    }

    #[tokio::test]
    async fn a_buffer_grown_by_a_big_hello_keeps_the_next_ones_limit() {
        // Same thread, so the same buffer: the big hello grows it past the
        // small limit of the next look.
        see_a_big_hello().await;

        let (accepted, mut client) = pair().await;
        client.write_all(&[b'x'; 64]).await.unwrap();
        let mut seen = 0;
        let verdict = peek_until(&accepted, 32, Duration::from_secs(5), |bytes| {
            seen = bytes.len();
            line(bytes)
        })
        .await
        .unwrap();
        assert_eq!(verdict, Err(GaveUp::TooLarge));
        assert_eq!(seen, 32, "the classifier sees no more than the limit");
    }

    #[tokio::test]
    async fn a_classifier_that_sees_too_much_coming_gives_up_at_once() {
        let (accepted, mut client) = pair().await;
        client.write_all(b"x").await.unwrap();
        let verdict = peek_until(&accepted, 32, Duration::from_secs(5), |_| {
            Look::<usize>::TooLarge
        })
        .await
        .unwrap();
        assert_eq!(verdict, Err(GaveUp::TooLarge));
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
