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
//! through libc (neither std, tokio nor socket2 wraps them).

mod copy;
mod pipe;
mod splice;
#[cfg(test)]
mod tests;

use std::{fmt, io, net::Shutdown};

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use self::copy::write_all;
use self::pipe::Pipe;

/// How a relayed connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both sides finished sending and every byte was delivered.
    Closed,
    /// Reading from or writing to the client failed.
    ClientError(io::Error),
    /// Reading from or writing to the upstream failed.
    UpstreamError(io::Error),
    /// The daemon's grace period ran out while the connection was open.
    ShutDown,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Closed => f.write_str("closed"),
            Outcome::ClientError(e) => write!(f, "client error: {e}"),
            Outcome::UpstreamError(e) => write!(f, "upstream error: {e}"),
            Outcome::ShutDown => f.write_str("shut down after grace period"),
        }
    }
}

/// What a relay did.
#[derive(Debug)]
pub struct Relayed {
    pub from_client: u64,
    pub from_upstream: u64,
    pub outcome: Outcome,
}

/// Relays until both directions have ended, either side failed, or `shutdown`
/// is cancelled. Byte counts are of bytes delivered, also when it fails.
/// (A plain function: an `async fn` wrapper would add its own state to every
/// connection's task.)
pub fn relay(
    client: TcpStream,
    upstream: TcpStream,
    shutdown: &CancellationToken,
) -> impl Future<Output = Relayed> + '_ {
    relay_with(client, upstream, shutdown, &pipe::take)
}

/// [`relay`] with the pipe source as a parameter, so tests can make it fail.
async fn relay_with(
    client: TcpStream,
    upstream: TcpStream,
    shutdown: &CancellationToken,
    pipes: &impl Fn() -> io::Result<Pipe>,
) -> Relayed {
    let mut from_client = 0;
    let mut from_upstream = 0;
    let both = futures::future::try_join(
        async {
            forward(&client, &upstream, &mut from_client, pipes)
                .await
                .map_err(|failed| match failed {
                    Failed::Read(e) => Outcome::ClientError(e),
                    Failed::Write(e) => Outcome::UpstreamError(e),
                })
        },
        async {
            forward(&upstream, &client, &mut from_upstream, pipes)
                .await
                .map_err(|failed| match failed {
                    Failed::Read(e) => Outcome::UpstreamError(e),
                    Failed::Write(e) => Outcome::ClientError(e),
                })
        },
    );
    let outcome = tokio::select! {
        result = both => result.err().unwrap_or(Outcome::Closed),
        () = shutdown.cancelled() => Outcome::ShutDown,
    };
    Relayed {
        from_client,
        from_upstream,
        outcome,
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

/// One direction: bursts until the source ends, then half-closes towards the
/// destination. `count` grows as bytes are delivered.
async fn forward(
    src: &TcpStream,
    dst: &TcpStream,
    count: &mut u64,
    pipes: &impl Fn() -> io::Result<Pipe>,
) -> Result<(), Failed> {
    // Once a read fills the buffer the direction carries bulk data: from
    // then on every burst is spliced whole. What waits inside a burst is
    // boxed: only a burst in progress holds it, not the task of every idle
    // connection (the task is sized for its largest await).
    let mut bulk = false;
    loop {
        src.readable().await.map_err(Failed::Read)?;
        if !bulk {
            match copy::first_read(src, dst, count)? {
                copy::First::Eof => return half_close(dst),
                copy::First::Drained => continue,
                copy::First::Read { read, rest } => {
                    if let Some(rest) = rest {
                        Box::pin(copy::write_all(dst, &rest, count))
                            .await
                            .map_err(Failed::Write)?;
                    }
                    bulk = read == copy::FIRST_READ;
                    continue;
                }
            }
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
            return half_close(dst);
        }
    }
}

/// The source ended: so does what we send to the other side.
fn half_close(dst: &TcpStream) -> Result<(), Failed> {
    SockRef::from(dst)
        .shutdown(Shutdown::Write)
        .map_err(Failed::Write)
}
