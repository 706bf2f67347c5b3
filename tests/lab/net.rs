//! Tiny TCP servers and clients living in namespaces, and test data.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::Netns;

/// Read/write timeout put on every test socket, so that a stuck relay turns
/// into an error instead of a hung test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub fn sa(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad socket address {s}: {e}"))
}

pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad IP address {s}: {e}"))
}

/// `ip_text` and `port` as one address (either family).
pub fn sock(ip_text: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(ip_text), port)
}

/// Deterministic pseudo-random bytes (splitmix64).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A seed that differs between runs.
pub fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one side read from a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub sha256: String,
}

impl Received {
    pub fn of(data: &[u8]) -> Received {
        Received {
            len: data.len(),
            sha256: sha256_hex(data),
        }
    }
}

/// Reads until EOF, hashing; the error says how much arrived before it.
pub fn read_to_eof(s: &mut TcpStream) -> io::Result<Received> {
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read_some(s, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("after {len} bytes read: {e}"),
                ));
            }
        }
    }
    Ok(Received {
        len,
        sha256: hex(&hasher.finalize()),
    })
}

/// Reads exactly `n` bytes.
pub fn read_exact_n(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// Reads an HTTP answer head byte by byte (nothing of a tunnel after it),
/// up to the blank line or the end of the stream.
pub fn answer_head(c: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match read_some(c, &mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// One `read`, again as long as it is interrupted: a read with a timeout
/// returns EINTR when the process is stopped and resumed (or frozen),
/// whatever the signal disposition, which is not the peer's doing.
/// What came of writing some bytes and reading to the end (or a timeout).
#[derive(Debug)]
pub struct Sent {
    pub got: Vec<u8>,
    pub wrote: io::Result<()>,
    pub end: io::Result<usize>,
}

impl Sent {
    /// Writes `bytes` to `s`, then reads until its end or `wait` passes.
    pub fn to(s: &mut TcpStream, bytes: &[u8], wait: Duration) -> Sent {
        let wrote = s.write_all(bytes);
        s.set_read_timeout(Some(wait)).unwrap();
        let mut got = Vec::new();
        let end = s.read_to_end(&mut got);
        Sent { got, wrote, end }
    }

    /// The peer reset the connection before sending anything: the read saw
    /// the reset, or the write already did (the read then finds the end).
    pub fn was_reset(&self) -> bool {
        let reset =
            |e: Option<&io::Error>| e.is_some_and(|e| e.kind() == io::ErrorKind::ConnectionReset);
        self.got.is_empty()
            && (reset(self.end.as_ref().err())
                || (reset(self.wrote.as_ref().err()) && self.end.is_ok()))
    }
}

pub fn read_some(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads one `\n`-terminated line (byte by byte, so nothing after it is lost).
pub fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match read_some(s, &mut b)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {:?}", String::from_utf8_lossy(&line)),
                ));
            }
            _ if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(b[0]),
        }
    }
}

/// Sends `line` (a newline is added) and expects it back whole: the
/// connection carries data both ways.
pub fn echo(s: &mut TcpStream, line: &str, what: &str) {
    let line = format!("{line}\n");
    s.write_all(line.as_bytes())
        .unwrap_or_else(|e| panic!("{what}: send: {e}"));
    let back = read_exact_n(s, line.len()).unwrap_or_else(|e| panic!("{what}: echo: {e}"));
    assert_eq!(back, line.as_bytes(), "{what}: echo differs");
}

/// Half-closes and reads to the end, expecting nothing more: the other side
/// saw our end and closed in turn.
pub fn finish(s: &mut TcpStream, what: &str) {
    s.shutdown(std::net::Shutdown::Write)
        .unwrap_or_else(|e| panic!("{what}: shutdown: {e}"));
    let rest = read_to_eof(s).unwrap_or_else(|e| panic!("{what}: EOF: {e}"));
    assert_eq!(rest.len, 0, "{what}: bytes after the exchange");
}

/// Connects from `ns` to `to` and reads the greeting, which must be `want`:
/// an open connection to that server.
pub fn connect_greeted(ns: &Netns, to: SocketAddr, want: &str) -> TcpStream {
    let mut c = connect(ns, to);
    let hello = read_line(&mut c).unwrap_or_else(|e| panic!("{to}: greeting: {e}"));
    assert_eq!(hello, want, "{to}: reached the wrong server");
    c
}

/// Reads the server's greeting, has one line echoed, and finishes: the
/// connection reached `want` and works in both directions.
pub fn talk(s: &mut TcpStream, want: &str, what: &str) {
    let hello = read_line(s).unwrap_or_else(|e| panic!("{what}: greeting: {e}"));
    assert_eq!(hello, want, "{what}: reached the wrong server");
    echo(s, &format!("through l4proxy: {what}"), what);
    finish(s, what);
}

/// Connects from `ns` to `server` (a [`handlers::hello_echo`] greeting
/// with `hello`) and [`talk`]s: the server saw the client's own address and
/// port, nothing between them took the connection.
pub fn assert_reaches_directly(ns: &Netns, server: &Server, hello: &str, what: &str) {
    let mut c = connect(ns, server.addr());
    let client = c.local_addr().unwrap();
    talk(&mut c, hello, what);
    assert_eq!(server.accepted().last().unwrap().peer, client, "{what}");
}

/// With no proxy in the way: nothing answers at `refused` (a port only the
/// proxy served), and `server` is reached directly
/// ([`assert_reaches_directly`]).
pub fn assert_no_proxy(ns: &Netns, refused: SocketAddr, server: &Server, hello: &str, what: &str) {
    assert!(
        try_connect(ns, refused, Duration::from_secs(2)).is_err(),
        "{what}: {refused} still answered"
    );
    assert_reaches_directly(ns, server, hello, what);
}

fn set_timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// Connects from inside `ns` (the socket stays there), with timeouts set.
pub fn try_connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = ns.run(move || TcpStream::connect_timeout(&addr, timeout))?;
    set_timeouts(&s);
    Ok(s)
}

/// Connects from inside `ns` from the given local address (port 0: any),
/// with timeouts set; panics saying what failed.
pub fn connect_from(ns: &Netns, local: SocketAddr, addr: SocketAddr) -> TcpStream {
    try_connect_from(ns, local, addr)
        .unwrap_or_else(|e| panic!("connect from {local} in netns {} to {addr}: {e}", ns.name()))
}

/// [`connect_from`], returning the error.
pub fn try_connect_from(ns: &Netns, local: SocketAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = ns.run(move || -> io::Result<TcpStream> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        // A fixed port may be reused at once: the last connection from it
        // left it in TIME_WAIT here.
        socket.set_reuse_address(true)?;
        socket.bind(&local.into())?;
        socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        Ok(socket.into())
    })?;
    set_timeouts(&s);
    Ok(s)
}

/// Connects from inside `ns`; panics saying where to if it fails.
pub fn connect(ns: &Netns, addr: SocketAddr) -> TcpStream {
    try_connect(ns, addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect from netns {} to {addr}: {e}", ns.name()))
}

/// Sends all of `data` and then shuts the write side down.
pub fn send_and_shutdown(s: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    s.write_all(data)?;
    s.shutdown(Shutdown::Write)
}

/// Sends `data` on a clone of the stream from another thread (then shuts the
/// write side down) while the caller reads to EOF: both directions at once.
pub fn exchange(s: &mut TcpStream, data: Arc<Vec<u8>>) -> io::Result<Received> {
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || send_and_shutdown(&mut w, &data));
    let got = read_to_eof(s);
    let sent = writer.join().expect("writer thread panicked");
    sent.map_err(|e| io::Error::new(e.kind(), format!("sending: {e}")))?;
    got
}

/// One connection a server accepted.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// A listener in a namespace, accepting on a thread, one thread per
/// connection running `handler`. Stops on drop.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start<H>(ns: &Netns, addr: SocketAddr, handler: H) -> Server
    where
        H: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in netns {}: {e}", ns.name()));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let thread = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, peer)) => {
                            s.set_nonblocking(false).unwrap();
                            set_timeouts(&s);
                            let local = s.local_addr().unwrap();
                            accepted.lock().unwrap().push(Accepted { peer, local });
                            let h = handler.clone();
                            std::thread::spawn(move || h(s));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => panic!("accept on {addr}: {e}"),
                    }
                }
            })
        };
        Server {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// One [`handlers::hello_echo`] server greeting with `hello` on each
    /// of `addrs`.
    pub fn echo_each<const N: usize>(
        ns: &Netns,
        addrs: [SocketAddr; N],
        hello: &str,
    ) -> [Server; N] {
        addrs.map(|addr| Server::start(ns, addr, handlers::hello_echo(hello)))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().unwrap().clone()
    }

    /// Waits until `n` connections were accepted; panics on timeout.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> Vec<Accepted> {
        let deadline = Instant::now() + timeout;
        loop {
            let acc = self.accepted();
            if acc.len() >= n {
                return acc;
            }
            if Instant::now() >= deadline {
                panic!(
                    "server {} accepted {} connections within {timeout:?}, expected {n}",
                    self.addr,
                    acc.len()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // An accept loop that died made every later check of what it
            // accepted meaningless: fail the test (unless it fails already).
            if t.join().is_err() && !std::thread::panicking() {
                panic!("a lab server's accept loop panicked (its message is above)");
            }
        }
    }
}

/// Connection handlers for `Server::start`. Those that report send one
/// `Result` per connection on their channel (a dropped sender — a panicked
/// handler — shows as a receive error).
pub mod handlers {
    use super::*;

    /// Writes `id\n`, then echoes everything until EOF, then shuts down.
    pub fn hello_echo(id: &str) -> impl Fn(TcpStream) + Send + Sync + 'static {
        let id = id.to_owned();
        move |mut s: TcpStream| {
            if s.write_all(format!("{id}\n").as_bytes()).is_err() {
                return;
            }
            let mut r = match s.try_clone() {
                Ok(r) => r,
                Err(_) => return,
            };
            let _ = io::copy(&mut r, &mut s);
            let _ = s.shutdown(Shutdown::Write);
        }
    }

    /// Reads to EOF, reports what came, THEN sends `reply` and closes.
    pub fn sink_then_send(
        reply: Arc<Vec<u8>>,
        tx: Sender<io::Result<Received>>,
    ) -> impl Fn(TcpStream) + Send + Sync + 'static {
        let tx = Mutex::new(tx);
        move |mut s: TcpStream| {
            let got = read_to_eof(&mut s);
            let ok = got.is_ok();
            let _ = tx.lock().unwrap().send(got);
            if ok {
                let _ = send_and_shutdown(&mut s, &reply);
            }
        }
    }

    /// Sends `data`, shuts its write side down, then reads to EOF and
    /// reports what came.
    pub fn send_then_sink(
        data: Arc<Vec<u8>>,
        tx: Sender<io::Result<Received>>,
    ) -> impl Fn(TcpStream) + Send + Sync + 'static {
        let tx = Mutex::new(tx);
        move |mut s: TcpStream| {
            let res = send_and_shutdown(&mut s, &data)
                .map_err(|e| io::Error::new(e.kind(), format!("server sending: {e}")))
                .and_then(|()| read_to_eof(&mut s));
            let _ = tx.lock().unwrap().send(res);
        }
    }

    /// Sends `data` and reads to EOF at the same time; reports what came.
    pub fn bulk(
        data: Arc<Vec<u8>>,
        tx: Sender<io::Result<Received>>,
    ) -> impl Fn(TcpStream) + Send + Sync + 'static {
        let tx = Mutex::new(tx);
        move |mut s: TcpStream| {
            let res = exchange(&mut s, data.clone());
            let _ = tx.lock().unwrap().send(res);
        }
    }
}

/// A channel for handler reports.
pub fn reports() -> (Sender<io::Result<Received>>, Receiver<io::Result<Received>>) {
    mpsc::channel()
}

/// Receives one handler report; panics if none comes or it is an error.
pub fn recv_report(rx: &Receiver<io::Result<Received>>, what: &str) -> Received {
    match rx.recv_timeout(IO_TIMEOUT + Duration::from_secs(5)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{what}: server side failed: {e}"),
        Err(e) => panic!("{what}: no report from the server side: {e}"),
    }
}
