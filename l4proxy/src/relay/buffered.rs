//! The relay for a connection with a TLS side: its bytes are decrypted or
//! encrypted in user space, so they go through buffers (tokio's
//! bidirectional copy, 16 KiB each way: one TLS record) instead of pipes.
//! The rest is as on the splice path: half-close passed on (close_notify
//! then FIN on a TLS side), a reset after it passed on too (the finished
//! side's socket is watched for one), the same deadlines, and a reset for
//! a failure.
//! A TLS peer that closes without close_notify has failed: a truncated
//! transfer must not look complete to the other side. Once l4proxy has
//! sent a peer its own close_notify, though, that peer's bare FIN is an
//! end like any other: it has nothing left to say, and many servers
//! (nginx among them) close so.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Notify,
};
use tokio_util::sync::CancellationToken;

use super::{Counter, Deadlines, Outcome, Relayed, allowance::Allowance, expiry, reset_of, tell};
use crate::stream::Stream;

/// One TLS record.
const BUFFER: usize = 16 * 1024;

/// Relays until both directions have ended, either side failed, a deadline
/// passed, or `shutdown` is cancelled.
pub async fn relay(
    mut client: Stream,
    mut upstream: Stream,
    deadlines: Deadlines,
    shutdown: &CancellationToken,
) -> Relayed {
    let from_client = Counter::default();
    let from_upstream = Counter::default();
    let client_failed = AtomicBool::new(false);
    let upstream_failed = AtomicBool::new(false);
    let (client_ended, upstream_ended) = (Ended::default(), Ended::default());
    let outcome = {
        let mut client_side = Side {
            stream: &mut client,
            written: &from_upstream,
            failed: &client_failed,
            ended: &client_ended,
            shut: false,
        };
        let mut upstream_side = Side {
            stream: &mut upstream,
            written: &from_client,
            failed: &upstream_failed,
            ended: &upstream_ended,
            shut: false,
        };
        let both = tokio::io::copy_bidirectional_with_sizes(
            &mut client_side,
            &mut upstream_side,
            BUFFER,
            BUFFER,
        );
        // Biased: a connection that ended as a deadline passed ended.
        tokio::select! {
            biased;
            ended = both => match ended {
                Ok(_) => Outcome::Closed,
                Err(e) if client_failed.load(Ordering::Relaxed) => Outcome::ClientError(e),
                Err(e) => Outcome::UpstreamError(e),
            },
            e = reset_after_end(&client_ended) => Outcome::ClientError(e),
            e = reset_after_end(&upstream_ended) => Outcome::UpstreamError(e),
            () = shutdown.cancelled() => Outcome::ShutDown,
            expired = expiry(&deadlines, || from_client.get() + from_upstream.get()) => expired,
        }
    };
    tell(&outcome, client.tcp(), upstream.tcp());
    Relayed {
        from_client: from_client.get(),
        from_upstream: from_upstream.get(),
        outcome,
    }
}

/// A side's end (its peer finished sending, and the copy reads from it no
/// more): a duplicate of its socket's descriptor, made then, for the reset
/// watch (the copy holds the stream itself), and the wake-up for it. The
/// duplicate is closed with the watch, before the streams: left open, it
/// would hold the socket open past their close.
#[derive(Default)]
struct Ended {
    copy: Mutex<Option<io::Result<(OwnedFd, WatchPlace)>>>,
    notify: Notify,
}

/// The most duplicates for reset watches open at once (each a descriptor
/// beyond its connection's two, counted in the daemon's budget). Past it, a
/// half-closed TLS connection has no watch: a reset after its end is seen
/// when the other direction next writes.
pub const MAX_RESET_WATCHES: usize = 64;

static WATCHES: Allowance = Allowance::new(MAX_RESET_WATCHES);

impl Ended {
    /// Notes the end of `stream`'s peer (once).
    fn reached(&self, stream: &Stream) {
        let mut copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        if copy.is_none() {
            *copy = Some(duplicate(stream.tcp()));
            self.notify.notify_one();
        }
    }
}

/// A reset watch's place under [`MAX_RESET_WATCHES`], given back when
/// dropped.
struct WatchPlace;

impl Drop for WatchPlace {
    fn drop(&mut self) {
        WATCHES.give_back();
    }
}

/// A duplicate of `socket`'s descriptor, within [`MAX_RESET_WATCHES`].
fn duplicate(socket: &TcpStream) -> io::Result<(OwnedFd, WatchPlace)> {
    if !WATCHES.take() {
        return Err(io::Error::other("all reset watches in use"));
    }
    let place = WatchPlace;
    Ok((socket.as_fd().try_clone_to_owned()?, place))
}

/// Once `ended` is reached, the reset that side's socket then gets, seen
/// through the duplicate (registered only then); without one (out of
/// descriptors) there is no watch.
async fn reset_after_end(ended: &Ended) -> io::Error {
    ended.notify.notified().await;
    let copy = ended.copy.lock().unwrap_or_else(|p| p.into_inner()).take();
    // The duplicate shares the socket, non-blocking already; its place is
    // held while the watch lasts.
    let watched = copy.map(|copy| {
        copy.and_then(|(fd, place)| {
            Ok((TcpStream::from_std(std::net::TcpStream::from(fd))?, place))
        })
    });
    match watched {
        Some(Ok((watched, _place))) => reset_of(&watched).await,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "no reset watch for a half-closed TLS connection");
            std::future::pending().await
        }
        None => std::future::pending().await,
    }
}

/// A side as the copy sees it: what is written to it is counted (for the
/// log and the idle watch), a failure on it is noted (to tell which side
/// failed), and so is its end (for the reset watch).
struct Side<'a> {
    stream: &'a mut Stream,
    written: &'a Counter,
    failed: &'a AtomicBool,
    ended: &'a Ended,
    /// l4proxy has finished sending to it (close_notify and FIN).
    shut: bool,
}

impl Side<'_> {
    fn note<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &polled {
            self.failed.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncRead for Side<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match Pin::new(&mut *this.stream).poll_read(cx, buf) {
            // Told we are done, it closed without a word: the end.
            Poll::Ready(Err(e)) if this.shut && e.kind() == io::ErrorKind::UnexpectedEof => {
                Poll::Ready(Ok(()))
            }
            polled => polled,
        };
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            this.ended.reached(this.stream);
        }
        this.note(polled)
    }
}

impl AsyncWrite for Side<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.written.add(n);
        }
        this.note(polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.stream).poll_flush(cx);
        this.note(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.stream).poll_shutdown(cx);
        if let Poll::Ready(Ok(())) = polled {
            this.shut = true;
        }
        this.note(polled)
    }
}
