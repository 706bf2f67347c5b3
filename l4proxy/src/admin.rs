//! The admin listener (`--admin ADDR`): Prometheus' scrape target. It
//! answers `GET /metrics` (a query, as a scrape job's `params` add, is
//! ignored) with the text exposition, `HEAD` with its head alone, another
//! method with a 405 and another path with a 404, on the one address it
//! is given; one request per connection. A few
//! connections at a time, each with deadlines, so that clients that send
//! or read slowly cannot pile up descriptors and rendered answers.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

/// The longest request head read, and how long a scraper may take to send
/// it.
const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client may take to read the answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once (a scraper or two, and an operator's curl);
/// one more is closed at once: its descriptor is not in the budget the
/// relay's connections are counted in.
const MAX_OPEN: usize = 8;

/// Asks the daemon for the exposition text (it reads the kernel counters
/// as of now).
pub type Scrape = mpsc::Sender<oneshot::Sender<String>>;

/// Serves scrapes on `listener` until `stop`.
pub async fn serve(listener: TcpListener, scrape: Scrape, stop: CancellationToken) {
    let open = Arc::new(Semaphore::new(MAX_OPEN));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if crate::server::after_accept_error(&e, "admin", stop.cancelled()).await {
                        return;
                    }
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let Ok(place) = open.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin listener: {MAX_OPEN} connections open, closed another");
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &scrape).await {
                tracing::debug!(%peer, error = %e, "admin request failed");
            }
            drop(place);
        });
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Whether `head` holds a whole request head: an empty line after the
/// request line, its lines ended by CRLF or a bare LF (as `printf … | nc`
/// and some health checkers send, and servers take); empty lines before
/// the request line do not end it.
fn head_ends(head: &[u8]) -> bool {
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(head.len());
    let head = &head[start..];
    head.windows(2).any(|w| w == b"\n\n") || head.windows(3).any(|w| w == b"\n\r\n")
}

async fn answer(mut stream: TcpStream, scrape: &Scrape) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head_ends(&head) && head.len() < MAX_HEAD {
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
    let asked = Asked::of(&head);
    let (status, kind, body) = match asked {
        Asked::Metrics { .. } => {
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
        }
        Asked::Elsewhere { .. } => (
            "404 Not Found",
            "text/plain",
            "only GET /metrics here\n".to_owned(),
        ),
        Asked::OtherMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics here\n".to_owned(),
        ),
    };
    let allow = match asked {
        Asked::OtherMethod => "Allow: GET, HEAD\r\n",
        _ => "",
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\n{allow}Content-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !asked.head_only() {
        response += &body;
    }
    let written = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, written).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the answer was not read in time",
        )),
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq)]
enum Asked {
    /// `GET` or `HEAD /metrics`, with or without a query.
    Metrics { head_only: bool },
    /// `GET` or `HEAD` of another path, or of none.
    Elsewhere { head_only: bool },
    /// Another method, or no request line at all.
    OtherMethod,
}

impl Asked {
    fn of(head: &[u8]) -> Asked {
        // Empty lines before the request line are tolerated (RFC 9112 §2.2).
        let line = head
            .split(|&b| b == b'\r' || b == b'\n')
            .find(|line| !line.is_empty())
            .unwrap_or_default();
        let mut parts = line.split(|&b| b == b' ');
        let (method, target) = (parts.next().unwrap_or_default(), parts.next());
        let head_only = match method {
            b"GET" => false,
            b"HEAD" => true,
            _ => return Asked::OtherMethod,
        };
        let path = target.and_then(|target| target.split(|&b| b == b'?').next());
        if path == Some(b"/metrics") {
            Asked::Metrics { head_only }
        } else {
            Asked::Elsewhere { head_only }
        }
    }

    /// A `HEAD` is answered without the body.
    fn head_only(&self) -> bool {
        matches!(
            self,
            Asked::Metrics { head_only: true } | Asked::Elsewhere { head_only: true }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape target answering `text`, on a loopback port.
    async fn serving(text: String) -> (SocketAddr, CancellationToken) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (scrape, mut scrapes) = mpsc::channel::<oneshot::Sender<String>>(4);
        tokio::spawn(async move {
            while let Some(reply) = scrapes.recv().await {
                let _ = reply.send(text.clone());
            }
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, scrape, stop.clone()));
        (addr, stop)
    }

    async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
        let mut c = TcpStream::connect(addr).await?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut answer = String::new();
        c.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    #[test]
    fn request_lines_are_read_by_method_and_path() {
        for (head, asked) in [
            (
                &b"GET /metrics HTTP/1.1\r\n"[..],
                Asked::Metrics { head_only: false },
            ),
            (
                b"GET /metrics?job=l4proxy HTTP/1.1\r\n",
                Asked::Metrics { head_only: false },
            ),
            (
                b"HEAD /metrics HTTP/1.1\r\n",
                Asked::Metrics { head_only: true },
            ),
            (b"GET / HTTP/1.1\r\n", Asked::Elsewhere { head_only: false }),
            (
                b"GET /metricsx HTTP/1.1\r\n",
                Asked::Elsewhere { head_only: false },
            ),
            (
                b"HEAD /x HTTP/1.1\r\n",
                Asked::Elsewhere { head_only: true },
            ),
            (b"GET\r\n", Asked::Elsewhere { head_only: false }),
            (b"POST /metrics HTTP/1.1\r\n", Asked::OtherMethod),
            (b"get /metrics HTTP/1.1\r\n", Asked::OtherMethod),
            (
                b"\r\nGET /metrics HTTP/1.1\r\n",
                Asked::Metrics { head_only: false },
            ),
            (b"", Asked::OtherMethod),
        ] {
            assert_eq!(
                Asked::of(head),
                asked,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_head_ends_at_its_first_empty_line_whatever_the_line_ends() {
        for (head, ends) in [
            (&b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..], true),
            (b"GET /metrics HTTP/1.1\nHost: x\n\n", true),
            (b"GET /metrics HTTP/1.1\n\r\n", true),
            (b"\r\n\nGET /metrics HTTP/1.1\r\n\r\n", true),
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", false),
            (b"\r\n\r\n", false),
            (b"", false),
        ] {
            assert_eq!(head_ends(head), ends, "{:?}", String::from_utf8_lossy(head));
        }
    }

    /// What each kind of request gets back, whole.
    #[tokio::test]
    async fn a_head_gets_no_body_and_another_method_a_405() {
        let (addr, stop) = serving("l4proxy_x 1\n".to_owned()).await;
        let ask = |request: &'static [u8]| async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(request).await.unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let got = ask(b"GET /metrics?x=y HTTP/1.1\r\n\r\n").await;
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("\r\n\r\nl4proxy_x 1\n"),
            "{got:?}"
        );
        // Bare LF line ends: answered at once, not at the head's timeout
        // (the client does not half-close).
        let got =
            tokio::time::timeout(HEAD_TIMEOUT / 2, ask(b"GET /metrics HTTP/1.1\nHost: x\n\n"))
                .await
                .expect("an answer before the head's timeout");
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
        let got = ask(b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n")
                && got.contains("Content-Length: 12\r\n")
                && got.ends_with("\r\n\r\n"),
            "{got:?}"
        );
        let got = ask(b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            got.starts_with("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\n"),
            "{got:?}"
        );
        let got = ask(b"HEAD /nothing HTTP/1.1\r\n\r\n").await;
        assert!(
            got.starts_with("HTTP/1.1 404 Not Found\r\n") && got.ends_with("\r\n\r\n"),
            "{got:?}"
        );
        stop.cancel();
    }

    /// Clients that never read their (large) answers hold a place each
    /// until the answer deadline; one more is closed at once meanwhile, and
    /// a scrape is answered again once their places are free.
    #[tokio::test(start_paused = true)]
    async fn readers_that_stall_hold_their_places_until_the_deadline() {
        let (addr, stop) = serving("x".repeat(32 << 20)).await;
        let mut stalled = Vec::new();
        for _ in 0..MAX_OPEN {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
            stalled.push(c);
        }
        // Give the answers time to fill the sockets' buffers, not the
        // deadline (the clock is paused: it moves only when all is idle).
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let answer = scrape(addr).await;
        assert!(
            answer.as_ref().is_ok_and(String::is_empty) || answer.is_err(),
            "a connection past {MAX_OPEN} was answered: {:.40?}",
            answer.map(|a| a.len())
        );
        tokio::time::sleep(ANSWER_TIMEOUT + Duration::from_secs(1)).await;
        let answer = scrape(addr).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{:.60}", answer);
        stop.cancel();
        drop(stalled);
    }
}
