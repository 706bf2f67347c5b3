//! In-process traffic: the responder on the server host, and the client-side
//! load generators (connection rate, time to first byte, idle connections,
//! one bulk stream). Every loop is bounded in time and in count.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::oneshot,
    task::JoinSet,
};

use super::{
    dial::Dial,
    hello,
    lab::{Netns, ServerThread},
};

/// What the responder answers to a ClientHello.
pub const REPLY: &[u8] = b"hello from the bench responder\n";

/// How long one exchange may take before it counts as failed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the responder does after its reply.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Closes at once: one short connection.
    Close,
    /// Keeps the connection until the client closes it: an idle connection.
    Hold,
    /// No ClientHello: counts what the client sends for this long from its
    /// first bytes on, then answers the count and the time it took (bytes
    /// and microseconds, 8 bytes each, big-endian) and reads on until the
    /// client goes. (Squid ends a tunnel on a half-close, so the end cannot
    /// be the client's FIN.)
    Sink(Duration),
    /// No ClientHello: once the client has sent a byte, sends until the
    /// client goes.
    Source,
}

/// Bytes a bulk sender hands the socket per write (iperf3's default).
const BULK_CHUNK: usize = 128 * 1024;

/// The server side of the connection-rate, latency and memory cases: reads one
/// TLS record (the ClientHello), answers [`REPLY`], then acts per [`Mode`];
/// and of the bulk streams ([`Mode::Sink`], [`Mode::Source`]).
/// Runs on a thread inside the server namespace until dropped.
pub struct Responder {
    _running: ServerThread,
}

impl Responder {
    pub fn start(sv: &Netns, ports: &[(u16, Mode)]) -> anyhow::Result<Responder> {
        let ports = ports.to_vec();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = sv.spawn(move || async move {
            let mut listeners = Vec::new();
            for (port, mode) in ports {
                match listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
                    Ok(listener) => listeners.push((listener, mode)),
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
            }
            let _ = ready_tx.send(Ok(()));
            for (listener, mode) in listeners {
                tokio::spawn(accept_loop(listener, mode));
            }
            let _ = stopped.await;
        })?;
        ready_rx
            .recv()
            .context("the responder thread ended before listening")?
            .context("responder: listening")?;
        Ok(Responder {
            _running: ServerThread::new(stop, thread),
        })
    }
}

/// A listener for the bench's own servers: a deep backlog, reusable.
pub(super) fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}

async fn accept_loop(listener: TcpListener, mode: Mode) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                match mode {
                    Mode::Close | Mode::Hold => tokio::spawn(answer(stream, mode)),
                    Mode::Sink(duration) => tokio::spawn(sink(stream, duration)),
                    Mode::Source => tokio::spawn(source(stream)),
                };
            }
            // Out of descriptors and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn answer(mut stream: TcpStream, mode: Mode) {
    let _ = stream.set_nodelay(true);
    let mut buffer = [0u8; 2048];
    let mut have = 0;
    loop {
        match stream.read(&mut buffer[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
        match hello::record_len(&buffer[..have]) {
            Some(len) if have >= len => break,
            // Not a record this responder can hold: not ours to answer.
            Some(len) if len > buffer.len() => return,
            _ => {}
        }
    }
    if stream.write_all(REPLY).await.is_err() {
        return;
    }
    if let Mode::Hold = mode {
        let mut rest = [0u8; 64];
        while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
    }
}

async fn sink(mut stream: TcpStream, duration: Duration) {
    let mut buffer = vec![0u8; BULK_CHUNK];
    let Ok((received, elapsed)) = count_for(&mut stream, &mut buffer, duration).await else {
        return;
    };
    let mut answer = [0u8; 16];
    answer[..8].copy_from_slice(&received.to_be_bytes());
    answer[8..].copy_from_slice(&(elapsed.as_micros() as u64).to_be_bytes());
    if stream.write_all(&answer).await.is_err() {
        return;
    }
    // Closing with unread bytes would reset the connection, and the reset
    // could overtake the answer.
    while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
}

/// Bytes read for `duration` after the first read (the clock starts once
/// data flows), and the time that took.
pub(super) async fn count_for<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut [u8],
    duration: Duration,
) -> io::Result<(u64, Duration)> {
    if stream.read(buffer).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let started = Instant::now();
    let mut received = 0u64;
    while started.elapsed() < duration {
        match stream.read(buffer).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => received += n as u64,
        }
    }
    Ok((received, started.elapsed()))
}

async fn source(mut stream: TcpStream) {
    let mut go = [0u8; 1];
    if !matches!(stream.read(&mut go).await, Ok(1)) {
        return;
    }
    let chunk = vec![0x5a; BULK_CHUNK];
    while stream.write_all(&chunk).await.is_ok() {}
}

/// One short connection: connect (through a tunnel: open it), send `hello`,
/// read the whole reply until the server closes. Returns the time to the
/// reply's first byte, from before the connect.
async fn exchange(target: Dial, hello: &[u8]) -> io::Result<Duration> {
    let started = Instant::now();
    let mut stream = open(target, hello).await?;
    let mut reply = [0u8; 64];
    let mut got = stream.read(&mut reply).await?;
    let first_byte = started.elapsed();
    if got == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    loop {
        match stream.read(&mut reply[got..]).await? {
            0 => break,
            n => got += n,
        }
        if got == reply.len() {
            return Err(io::Error::other("reply longer than expected"));
        }
    }
    if &reply[..got] != REPLY {
        return Err(io::Error::other("unexpected reply"));
    }
    Ok(first_byte)
}

async fn open(target: Dial, hello: &[u8]) -> io::Result<TcpStream> {
    let mut stream = target.connect().await?;
    stream.write_all(hello).await?;
    Ok(stream)
}

async fn exchange_in_time(target: Dial, hello: &[u8]) -> io::Result<Duration> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(target, hello))
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// One exchange succeeded: the target answers end to end. Tries for `wait`.
pub async fn probe(target: Dial, hello: &[u8], wait: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        let tried = tokio::time::timeout(Duration::from_secs(1), exchange(target, hello)).await;
        match tried {
            Ok(Ok(_)) => return Ok(()),
            _ if Instant::now() >= deadline => {
                bail!("{target} did not answer within {wait:?}: {tried:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Result of a connection-rate run.
#[derive(Debug)]
pub struct Rate {
    pub per_second: f64,
    pub completed: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// Short connections from `concurrency` workers until `duration` has passed or
/// `max` connections were started.
pub async fn connection_rate(
    target: Dial,
    hello: Arc<[u8]>,
    concurrency: usize,
    duration: Duration,
    max: u64,
) -> Rate {
    let started = Instant::now();
    let deadline = started + duration;
    let per_worker = max.div_ceil(concurrency as u64);
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let hello = hello.clone();
        workers.spawn(async move {
            let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
            for _ in 0..per_worker {
                if Instant::now() >= deadline {
                    break;
                }
                match exchange_in_time(target, &hello).await {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (ok, failed, first_error)
        });
    }
    let (mut ok, mut failed, mut first_error) = (0, 0, None);
    while let Some(done) = workers.join_next().await {
        let (o, f, e) = done.expect("a load worker panicked");
        ok += o;
        failed += f;
        first_error = first_error.or(e);
    }
    Rate {
        per_second: ok as f64 / started.elapsed().as_secs_f64(),
        completed: ok,
        failed,
        first_error,
    }
}

/// Times to first byte of `count` sequential exchanges (at most `budget` long).
pub async fn first_byte_times(
    target: SocketAddr,
    hello: &[u8],
    count: usize,
    budget: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let deadline = Instant::now() + budget;
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        if Instant::now() >= deadline {
            break;
        }
        let time = exchange_in_time(target.into(), hello)
            .await
            .with_context(|| format!("exchange with {target}"))?;
        times.push(time);
    }
    Ok(times)
}

/// Opens `count` connections that each send `hello` and read the reply, keeps
/// them open and idle while `measure` runs, then closes them.
pub async fn while_idle<T>(
    target: SocketAddr,
    hello: Arc<[u8]>,
    count: usize,
    measure: impl FnOnce() -> T,
) -> anyhow::Result<T> {
    const OPENERS: usize = 64;
    let mut openers = JoinSet::new();
    for i in 0..OPENERS {
        let hello = hello.clone();
        let share = count / OPENERS + usize::from(i < count % OPENERS);
        openers.spawn(async move {
            let mut held = Vec::with_capacity(share);
            for _ in 0..share {
                let opened = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
                    let mut stream = open(target.into(), &hello).await?;
                    let mut reply = [0u8; REPLY.len()];
                    stream.read_exact(&mut reply).await?;
                    io::Result::Ok(stream)
                })
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))?;
                held.push(opened);
            }
            io::Result::Ok(held)
        });
    }
    let mut held = Vec::with_capacity(count);
    while let Some(done) = openers.join_next().await {
        held.extend(
            done.expect("an opener panicked")
                .with_context(|| format!("opening idle connections to {target}"))?,
        );
    }
    // Let the proxy finish its side (upstream connect, first relay burst).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let measured = measure();
    drop(held);
    Ok(measured)
}

/// Received bits per second of one stream through `target`, counted by the
/// receiver for `duration`: the client sends to a [`Mode::Sink`] (started
/// with the same duration), or with `reverse` receives from a
/// [`Mode::Source`]. Bounded by `duration` and a margin.
pub async fn bulk(target: Dial, reverse: bool, duration: Duration) -> anyhow::Result<f64> {
    let run = async {
        let mut stream = target.connect().await?;
        if reverse {
            stream.write_all(b"g").await?;
            count_for(&mut stream, &mut vec![0u8; BULK_CHUNK], duration).await
        } else {
            send(stream).await
        }
    };
    let (bytes, elapsed) = tokio::time::timeout(duration + Duration::from_secs(10), run)
        .await
        .with_context(|| format!("bulk stream through {target}: timed out"))?
        .with_context(|| format!("bulk stream through {target}"))?;
    Ok(bytes as f64 * 8.0 / elapsed.as_secs_f64())
}

/// Sends until the sink answers its count.
async fn send(mut stream: TcpStream) -> io::Result<(u64, Duration)> {
    let chunk = vec![0x5a; BULK_CHUNK];
    let (mut from, mut to) = stream.split();
    let mut answer = [0u8; 16];
    let sending = async {
        loop {
            to.write_all(&chunk).await?;
        }
    };
    tokio::select! {
        sent = sending => sent,
        read = from.read_exact(&mut answer) => read.map(drop),
    }?;
    let field = |i: usize| u64::from_be_bytes(answer[i..i + 8].try_into().expect("8 bytes"));
    Ok((field(0), Duration::from_micros(field(8))))
}
