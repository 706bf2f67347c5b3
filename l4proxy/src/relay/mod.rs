//! Moves bytes between the client and the upstream until both directions end.
//!
//! Half-close is forwarded: when one side finishes sending (EOF), we shut down
//! our write side towards the other and keep the opposite direction flowing,
//! as a direct TCP connection would. An error on either side ends both.
//!
//! Each direction sleeps on its socket's readiness holding nothing. When bytes
//! arrive, the first read goes through a per-thread buffer (`copy`): a small
//! message (a request, a reply, a ClientHello) costs less copied than spliced.
//! Once a read fills that buffer the direction is bulk for good: it takes a
//! pipe from a pool (`pipe`) for each burst, splices it socket → pipe → socket
//! without copying it through user space (`splice`), and gives the empty pipe
//! back once the socket runs dry. If no pipe can be had (out of descriptors),
//! that burst goes through a buffer instead. Bytes the daemon peeked at are
//! still queued in the client socket and go out first.
//!
//! `unsafe` is confined to `pipe`, which calls splice(2) and `F_SETPIPE_SZ`
//! through libc, and `splice`, which asks `SIOCATMARK` (neither std, tokio
//! nor socket2 wraps them).

mod allowance;
pub mod buffered;
mod copy;
mod pipe;
mod splice;
#[cfg(test)]
mod tests;

use std::{
    io,
    net::Shutdown,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use futures::future::Either;
use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

pub use self::buffered::MAX_RESET_WATCHES;
pub use self::copy::write_all;
use self::pipe::Pipe;
pub use self::pipe::{MAX_PIPES, trim as trim_pipes};
use crate::stream::Stream;

/// How a relayed connection ended, and what the other side was told: a
/// FIN for a FIN (half-close), a reset for a reset or any other failure
/// (so a truncated transfer never looks complete), and a reset to both
/// sides when the proxy ends it.
#[derive(Debug)]
pub enum Outcome {
    /// Both sides finished sending and every byte was delivered.
    Closed,
    /// Reading from or writing to the client failed; the upstream is reset.
    ClientError(io::Error),
    /// Reading from or writing to the upstream failed; the client is reset.
    UpstreamError(io::Error),
    /// The daemon's grace period ran out while the connection was open.
    ShutDown,
    /// No byte moved either way for this long.
    IdleTimeout(Duration),
    /// Open this long, the most its rule allows.
    LifetimeOver(Duration),
}

impl Outcome {
    /// The outcome's name in logs and metrics (see `metrics::OUTCOMES`).
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::ClientError(_) => "client_error",
            Outcome::UpstreamError(_) => "upstream_error",
            Outcome::ShutDown => "shut_down",
            Outcome::IdleTimeout(_) => "idle_timeout",
            Outcome::LifetimeOver(_) => "lifetime_over",
        }
    }
}

impl Outcome {
    /// What went wrong, beyond [`Outcome::kind`]; `None` for a clean close.
    pub fn error(&self) -> Option<String> {
        match self {
            Outcome::Closed => None,
            Outcome::ClientError(e) | Outcome::UpstreamError(e) => Some(e.to_string()),
            Outcome::ShutDown => Some("the grace period ran out".to_owned()),
            Outcome::IdleTimeout(after) => Some(format!("no byte moved for {after:?}")),
            Outcome::LifetimeOver(after) => Some(format!("open for {after:?}")),
        }
    }
}

/// When the proxy ends a connection itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Deadlines {
    /// After no byte moved either way for this long.
    pub idle: Option<Duration>,
    /// At this time, busy or not, and the lifetime that gave it.
    pub end: Option<(Instant, Duration)>,
}

/// What a relay did.
#[derive(Debug)]
pub struct Relayed {
    pub from_client: u64,
    pub from_upstream: u64,
    pub outcome: Outcome,
}

/// Bytes delivered in one direction. Only that direction adds to it; the
/// idle watch reads it.
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn add(&self, n: usize) {
        // One writer: a load and a store, not a locked add.
        let now = self.0.load(Ordering::Relaxed);
        self.0.store(now + n as u64, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Relays until both directions have ended, either side failed, a deadline
/// passed, or `shutdown` is cancelled. Byte counts are of bytes delivered,
/// also when it fails. (A plain function: an `async fn` wrapper would add
/// its own state to every connection's task.)
pub fn relay(
    client: TcpStream,
    upstream: TcpStream,
    deadlines: Deadlines,
    shutdown: &CancellationToken,
) -> impl Future<Output = Relayed> + '_ {
    relay_with(client, upstream, deadlines, shutdown, &pipe::take)
}

/// [`relay`] for plain sides; a connection with a TLS side goes through
/// buffers ([`buffered`], boxed: only such connections carry them).
pub fn relay_streams(
    client: Stream,
    upstream: Stream,
    deadlines: Deadlines,
    shutdown: &CancellationToken,
) -> impl Future<Output = Relayed> + '_ {
    match (client, upstream) {
        (Stream::Tcp(client), Stream::Tcp(upstream)) => {
            Either::Left(relay(client, upstream, deadlines, shutdown))
        }
        (client, upstream) => Either::Right(Box::pin(buffered::relay(
            client, upstream, deadlines, shutdown,
        ))),
    }
}

/// [`relay`] with the pipe source as a parameter, so tests can make it fail.
/// (The relay is an `async move` block, not an `async fn`, here and below:
/// an `async fn` keeps a second copy of its arguments in every idle
/// connection's task.)
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn relay_with<'a>(
    client: TcpStream,
    upstream: TcpStream,
    deadlines: Deadlines,
    shutdown: &'a CancellationToken,
    pipes: &'a impl Fn() -> io::Result<Pipe>,
) -> impl Future<Output = Relayed> + 'a {
    async move {
        let from_client = Counter::default();
        let from_upstream = Counter::default();
        let to_upstream = std::pin::pin!(async {
            forward(&client, &upstream, &from_client, pipes)
                .await
                .map_err(|failed| match failed {
                    Failed::Read(e) => Outcome::ClientError(e),
                    Failed::Write(e) => Outcome::UpstreamError(e),
                })
        });
        let to_client = std::pin::pin!(async {
            forward(&upstream, &client, &from_upstream, pipes)
                .await
                .map_err(|failed| match failed {
                    Failed::Read(e) => Outcome::UpstreamError(e),
                    Failed::Write(e) => Outcome::ClientError(e),
                })
        });
        let both = both_directions(to_upstream, to_client, &client, &upstream);
        // Biased: a connection that ended as a deadline passed ended.
        let outcome = tokio::select! {
            biased;
            ended = both => ended.err().unwrap_or(Outcome::Closed),
            () = shutdown.cancelled() => Outcome::ShutDown,
            expired = expiry(&deadlines, || from_client.get() + from_upstream.get()) => expired,
        };
        tell(&outcome, &client, &upstream);
        Relayed {
            from_client: from_client.get(),
            from_upstream: from_upstream.get(),
            outcome,
        }
    }
}

/// Shows each side what a direct connection would have: a reset where the
/// other side failed or the proxy ended it (once the streams are dropped).
fn tell(outcome: &Outcome, client: &TcpStream, upstream: &TcpStream) {
    let (reset_client, reset_upstream) = match outcome {
        Outcome::Closed => (false, false),
        Outcome::ClientError(_) => (false, true),
        Outcome::UpstreamError(_) => (true, false),
        Outcome::ShutDown | Outcome::IdleTimeout(_) | Outcome::LifetimeOver(_) => (true, true),
    };
    for (stream, reset) in [(client, reset_client), (upstream, reset_upstream)] {
        if reset {
            reset_on_close(stream);
        }
    }
}

/// Linger 0: the close that follows (when the stream is dropped) sends a
/// reset instead of a FIN.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Runs both directions until both have ended or one failed. The first
/// to end is passed on as a half-close; the second needs none: both
/// sockets are closed next, each read to its end, and a close sends the
/// FIN. While one runs on alone, the finished one's source is watched for
/// a reset: a peer that half-closed and then reset has its reset passed on
/// now, not when the other side next writes. (The watch is boxed: only
/// half-closed connections carry it.)
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn both_directions<'a>(
    to_upstream: Pin<&'a mut impl Future<Output = Result<(), Outcome>>>,
    to_client: Pin<&'a mut impl Future<Output = Result<(), Outcome>>>,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
) -> impl Future<Output = Result<(), Outcome>> + 'a {
    async move {
        match futures::future::select(to_upstream, to_client).await {
            Either::Left((ended, to_client)) => {
                ended?;
                half_close(upstream).map_err(Outcome::UpstreamError)?;
                tokio::select! {
                    ended = to_client => ended,
                    e = Box::pin(reset_of(client)) => Err(Outcome::ClientError(e)),
                }
            }
            Either::Right((ended, to_upstream)) => {
                ended?;
                half_close(client).map_err(Outcome::ClientError)?;
                tokio::select! {
                    ended = to_upstream => ended,
                    e = Box::pin(reset_of(upstream)) => Err(Outcome::UpstreamError(e)),
                }
            }
        }
    }
}

/// Waits until `dst` takes bytes; with `src`, the source of the direction
/// writing, fails meanwhile with the reset `src` gets. A direction waiting
/// for a full `dst` reads nothing from `src`, and the other direction
/// waits on `dst`'s side: nothing else would see the reset until `dst`
/// reads again (or the idle timeout), where a direct connection's server
/// would have had it at once.
async fn writable(dst: &TcpStream, src: Option<&TcpStream>) -> Result<(), Failed> {
    let Some(src) = src else {
        return dst.writable().await.map_err(Failed::Write);
    };
    tokio::select! {
        biased;
        ready = dst.writable() => ready.map_err(Failed::Write),
        e = reset_of(src) => Err(Failed::Read(e)),
    }
}

/// The error (a reset) the socket gets, once it gets one.
async fn reset_of(stream: &TcpStream) -> io::Error {
    loop {
        if let Err(e) = stream.ready(Interest::ERROR).await {
            return e;
        }
        // Readiness without a pending error is cleared by the WouldBlock.
        match stream.try_io(Interest::ERROR, || match stream.take_error() {
            Ok(Some(e)) | Err(e) => Ok(e),
            Ok(None) => Err(io::ErrorKind::WouldBlock.into()),
        }) {
            Ok(e) => return e,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return e,
        }
    }
}

/// How many times per idle timeout the watch looks for moved bytes: a
/// connection is closed between `idle` and `idle` + 1/8 of it after its
/// last byte. (Bytes are counted, not timed: reading a clock on every
/// burst would cost the busy connections what the idle ones need.)
const IDLE_LOOKS: u32 = 8;

/// Ends with the deadline that passed first; never, without deadlines.
/// The timer is boxed: only a connection with deadlines carries it.
/// Unconstrained by tokio's budget: a relay's directions take a unit of it
/// per burst, and a flow that never pauses uses it all on every poll, so
/// the watch, polled after them, would never see its timer fire.
fn expiry<'a>(
    deadlines: &'a Deadlines,
    moved: impl Fn() -> u64 + 'a,
) -> impl Future<Output = Outcome> + 'a {
    tokio::task::unconstrained(async move {
        if deadlines.idle.is_none() && deadlines.end.is_none() {
            return std::future::pending().await;
        }
        let mut watch = Watch {
            seen: moved(),
            last_move: Instant::now(),
        };
        let mut timer = Box::pin(tokio::time::sleep_until(watch.last_move));
        loop {
            match watch.look(deadlines, moved()) {
                Ok(wake) => timer.as_mut().reset(wake),
                Err(expired) => return expired,
            }
            timer.as_mut().await;
        }
    })
}

/// What the deadline watch knows between its looks.
struct Watch {
    /// Bytes moved, as of the last look.
    seen: u64,
    /// The look that first saw them.
    last_move: Instant,
}

impl Watch {
    /// Notes whether bytes moved (`moved`: the count now); returns when to
    /// look next, or the deadline that passed.
    fn look(&mut self, deadlines: &Deadlines, moved: u64) -> Result<Instant, Outcome> {
        let now = Instant::now();
        if let Some((end, lifetime)) = deadlines.end
            && now >= end
        {
            return Err(Outcome::LifetimeOver(lifetime));
        }
        if moved != self.seen {
            self.seen = moved;
            self.last_move = now;
        }
        let next_look = match deadlines.idle {
            Some(idle) if now >= self.last_move + idle => return Err(Outcome::IdleTimeout(idle)),
            Some(idle) => Some((self.last_move + idle).min(now + idle / IDLE_LOOKS)),
            None => None,
        };
        Ok(match (next_look, deadlines.end) {
            (Some(look), Some((end, _))) => look.min(end),
            (Some(look), None) => look,
            (None, Some((end, _))) => end,
            (None, None) => unreachable!("a watch runs only with deadlines"),
        })
    }
}

/// How a burst ended when nothing failed.
enum Burst {
    /// The source has nothing queued; everything read was delivered.
    Drained,
    /// The source finished sending; everything read was delivered.
    Eof,
}

/// Which end of a direction failed.
enum Failed {
    Read(io::Error),
    Write(io::Error),
}

/// One direction: bursts until the source ends. `count` grows as bytes
/// are delivered.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn forward<'a>(
    src: &'a TcpStream,
    dst: &'a TcpStream,
    count: &'a Counter,
    pipes: &'a impl Fn() -> io::Result<Pipe>,
) -> impl Future<Output = Result<(), Failed>> + 'a {
    async move {
        // Once a read fills the buffer the direction carries bulk data: from
        // then on every burst is spliced whole. What waits inside a burst is
        // boxed: only a burst in progress holds it, not the task of every idle
        // connection (the task is sized for its largest await).
        let mut bulk = false;
        loop {
            // The socket's own reader slot: a `readable()` future would add
            // its waiter (152 bytes) to every idle connection's task.
            std::future::poll_fn(|cx| src.poll_read_ready(cx))
                .await
                .map_err(Failed::Read)?;
            if !bulk {
                // Only `rest` waits: the read's result is gone before the await.
                let rest = match copy::first_read(src, dst, count)? {
                    copy::First::Eof => return Ok(()),
                    copy::First::Drained => continue,
                    copy::First::Read { read, rest } => {
                        bulk = read == copy::FIRST_READ;
                        rest
                    }
                };
                if let Some(rest) = rest {
                    Box::pin(copy::write_counted(Some(src), dst, &rest, count)).await?;
                }
                continue;
            }
            let burst = match pipes() {
                Ok(pipe) => {
                    // On error the pipe may still hold bytes: it is dropped, not pooled.
                    let burst = Box::pin(splice::burst(src, dst, &pipe, count)).await?;
                    pipe::give_back(pipe);
                    burst
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for splice; copying through a buffer");
                    Box::pin(copy::burst(src, dst, count)).await?
                }
            };
            if let Burst::Eof = burst {
                return Ok(());
            }
        }
    }
}

/// A direction's source ended: so does what we send to the other side.
fn half_close(dst: &TcpStream) -> io::Result<()> {
    SockRef::from(dst).shutdown(Shutdown::Write)
}
