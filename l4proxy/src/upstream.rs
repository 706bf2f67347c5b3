//! Connecting to an upstream pool's servers.

use std::{
    io,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use tokio::net::TcpStream;

use crate::{addrs::UpstreamAddr, policy::Upstream};

/// A pool's servers with a round-robin cursor.
pub struct Pool {
    servers: Vec<UpstreamAddr>,
    next: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
#[error("connecting to {upstream}: {source}")]
pub struct ConnectError {
    pub upstream: UpstreamAddr,
    pub source: io::Error,
}

impl Pool {
    pub fn new(upstream: &Upstream) -> Self {
        Self {
            servers: upstream.servers.iter().copied().map(UpstreamAddr).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Connects to the next server in turn; if it fails, tries each other server
    /// once before giving up with the last error.
    pub async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<(TcpStream, UpstreamAddr), ConnectError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..self.servers.len() {
            let upstream = self.servers[(start + i) % self.servers.len()];
            match connect_one(upstream, timeout).await {
                Ok(stream) => return Ok((stream, upstream)),
                Err(source) => {
                    tracing::debug!(%upstream, error = %source, "upstream connect failed");
                    last_error = Some(ConnectError { upstream, source });
                }
            }
        }
        Err(last_error.expect("a checked policy gives every pool at least one server"))
    }
}

async fn connect_one(upstream: UpstreamAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(upstream.0))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
