//! The control socket: `l4proxy status` and `l4proxy reload` talk to the
//! daemon of their network namespace over an abstract Unix socket (scoped
//! to the namespace, as the daemon's kernel programs are; nothing on the
//! file system to clean up), answered only for root. One request line per
//! connection, one JSON answer.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::linux::net::SocketAddrExt,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

/// The socket's abstract name.
const NAME: &[u8] = b"l4proxy-control";

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The daemon's state, as JSON.
    Status,
    /// Reread the policy, as on SIGHUP; the answer says whether it is in
    /// force.
    Reload,
}

/// Requests for the daemon's main loop, each with where its JSON answer
/// goes.
pub type Requests = mpsc::Sender<(Request, oneshot::Sender<serde_json::Value>)>;

/// Binds the socket; fails if another daemon in this namespace has it.
pub fn bind() -> io::Result<UnixListener> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(NAME)?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Answers clients on `listener` until `stop`.
pub async fn serve(listener: UnixListener, requests: Requests, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &requests).await {
                tracing::debug!(error = %e, "control request failed");
            }
        });
    }
}

async fn answer(mut stream: UnixStream, requests: &Requests) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    if uid != 0 {
        tracing::warn!(uid, "control socket: refused a client that is not root");
        let refusal = serde_json::json!({ "ok": false, "error": "only root may ask" });
        return reply(&mut stream, &refusal).await;
    }
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(&mut stream);
    if tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .is_err()
    {
        return Ok(());
    }
    let request = match line.trim() {
        "status" => Request::Status,
        "reload" => Request::Reload,
        other => {
            let error = format!("unknown request {other:?}: status or reload");
            return reply(
                &mut stream,
                &serde_json::json!({ "ok": false, "error": error }),
            )
            .await;
        }
    };
    let (tx, rx) = oneshot::channel();
    let answer = match requests.send((request, tx)).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    let answer =
        answer.unwrap_or_else(|| serde_json::json!({ "ok": false, "error": "shutting down" }));
    reply(&mut stream, &answer).await
}

async fn reply(stream: &mut UnixStream, answer: &serde_json::Value) -> io::Result<()> {
    let mut text = answer.to_string();
    text.push('\n');
    stream.write_all(text.as_bytes()).await?;
    stream.shutdown().await
}

/// Asks the daemon of this network namespace (a client: `l4proxy status`,
/// `l4proxy reload`) and waits up to `timeout` for its answer.
pub fn ask(request: Request, timeout: Duration) -> Result<serde_json::Value, String> {
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(NAME).map_err(|e| e.to_string())?;
    let mut stream = std::os::unix::net::UnixStream::connect_addr(&addr)
        .map_err(|e| format!("no l4proxy daemon answers in this network namespace ({e})"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let line = match request {
        Request::Status => "status\n",
        Request::Reload => "reload\n",
    };
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("asking the daemon: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("reading the daemon's answer: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("the daemon's answer is not JSON: {e}"))
}
