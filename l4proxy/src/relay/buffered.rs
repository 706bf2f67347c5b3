//! The relay for a connection with a TLS side: its bytes are decrypted or
//! encrypted in user space, so they go through buffers (tokio's
//! bidirectional copy, 16 KiB each way: one TLS record) instead of pipes.
//! The rest is as on the splice path: half-close passed on (close_notify
//! then FIN on a TLS side), the same deadlines, and a reset for a failure.
//! A TLS peer that closes without close_notify has failed: a truncated
//! transfer must not look complete to the other side. Once l4proxy has
//! sent a peer its own close_notify, though, that peer's bare FIN is an
//! end like any other: it has nothing left to say, and many servers
//! (nginx among them) close so.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::{Counter, Deadlines, Outcome, Relayed, expiry, tell};
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
    let outcome = {
        let mut client_side = Side {
            stream: &mut client,
            written: &from_upstream,
            failed: &client_failed,
            shut: false,
        };
        let mut upstream_side = Side {
            stream: &mut upstream,
            written: &from_client,
            failed: &upstream_failed,
            shut: false,
        };
        let both = tokio::io::copy_bidirectional_with_sizes(
            &mut client_side,
            &mut upstream_side,
            BUFFER,
            BUFFER,
        );
        tokio::select! {
            ended = both => match ended {
                Ok(_) => Outcome::Closed,
                Err(e) if client_failed.load(Ordering::Relaxed) => Outcome::ClientError(e),
                Err(e) => Outcome::UpstreamError(e),
            },
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

/// A side as the copy sees it: what is written to it is counted (for the
/// log and the idle watch), and a failure on it is noted (to tell which
/// side failed).
struct Side<'a> {
    stream: &'a mut Stream,
    written: &'a Counter,
    failed: &'a AtomicBool,
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
        let polled = match Pin::new(&mut *this.stream).poll_read(cx, buf) {
            // Told we are done, it closed without a word: the end.
            Poll::Ready(Err(e)) if this.shut && e.kind() == io::ErrorKind::UnexpectedEof => {
                Poll::Ready(Ok(()))
            }
            polled => polled,
        };
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
