//! The admin listener (`--admin ADDR`): Prometheus' scrape target. It
//! answers `GET /metrics` with the text exposition, anything else with a
//! 404, on the one address it is given; one request per connection.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

/// The longest request head read, and how long a scraper may take to send
/// it.
const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the daemon for the exposition text (it reads the kernel counters
/// as of now).
pub type Scrape = mpsc::Sender<oneshot::Sender<String>>;

/// Serves scrapes on `listener` until `stop`.
pub async fn serve(listener: TcpListener, scrape: Scrape, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &scrape).await {
                tracing::debug!(%peer, error = %e, "admin request failed");
            }
        });
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn answer(mut stream: TcpStream, scrape: &Scrape) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let (status, kind, body) = if head.starts_with(b"GET /metrics ") {
        let (tx, rx) = oneshot::channel();
        let text = match scrape.send(tx).await {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        match text {
            Some(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "shutting down\n".to_owned(),
            ),
        }
    } else {
        (
            "404 Not Found",
            "text/plain",
            "only GET /metrics here\n".to_owned(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
