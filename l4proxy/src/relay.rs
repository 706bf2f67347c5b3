//! Copies bytes between the client and the upstream until both directions end.
//!
//! Half-close is forwarded: when one side finishes sending (EOF), we shut down
//! our write side towards the other and keep the opposite direction flowing,
//! as a direct TCP connection would.

use std::{fmt, io};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_util::sync::CancellationToken;

const BUFFER_SIZE: usize = 16 * 1024;

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

/// Which side an I/O error happened on.
enum Side {
    Client,
    Upstream,
}

pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    shutdown: &CancellationToken,
) -> Relayed {
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let mut from_client = 0;
    let mut from_upstream = 0;
    let both = futures::future::try_join(
        copy(
            client_read,
            upstream_write,
            &mut from_client,
            Side::Client,
            Side::Upstream,
        ),
        copy(
            upstream_read,
            client_write,
            &mut from_upstream,
            Side::Upstream,
            Side::Client,
        ),
    );
    let outcome = tokio::select! {
        result = both => match result {
            Ok(_) => Outcome::Closed,
            Err((Side::Client, e)) => Outcome::ClientError(e),
            Err((Side::Upstream, e)) => Outcome::UpstreamError(e),
        },
        () = shutdown.cancelled() => Outcome::ShutDown,
    };
    Relayed {
        from_client,
        from_upstream,
        outcome,
    }
}

/// One direction: read until EOF, write everything, then half-close the writer.
/// `count` is updated as bytes are delivered so it is right even on error.
async fn copy(
    mut reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    count: &mut u64,
    reader_side: Side,
    writer_side: Side,
) -> Result<(), (Side, io::Error)> {
    let mut buffer = vec![0u8; BUFFER_SIZE];
    loop {
        let n = match reader.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Err((reader_side, e)),
        };
        if let Err(e) = writer.write_all(&buffer[..n]).await {
            return Err((writer_side, e));
        }
        *count += n as u64;
    }
    writer.shutdown().await.map_err(|e| (writer_side, e))
}
