//! The control socket: `l4proxy status`, `reload` and `upgrade` talk to the
//! daemon of their network namespace over an abstract Unix socket (scoped
//! to the namespace, as the daemon's kernel programs are; nothing on the
//! file system to clean up), answered only for root holding cap_net_admin
//! in the daemon's user namespace (uid 0 alone could be a container's root
//! sharing the namespace, which a takeover would hand the listeners to;
//! such a root holds every capability in a user namespace it makes). One request line per
//! connection, one JSON answer; a `takeover` request's connection is handed
//! to the daemon whole (`takeover`).
//!
//! Holding the socket's name is also the one-daemon-per-namespace rule: a
//! second daemon cannot bind it, and is told which process has it. A
//! takeover hands the listening socket itself on, so the name is never free
//! in between.
//!
//! An abstract name has no permissions: any local user can bind it while it
//! is free (before the daemon starts, in a restart's gap). So clients trust
//! only a socket that root listens on (the kernel's record of the listener,
//! `SO_PEERCRED`, which nobody can fake): another holder is named, not
//! taken for a daemon whose answers count.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::{fd::AsRawFd, linux::net::SocketAddrExt},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::logging::Throttle;

/// The socket's abstract name.
const NAME: &[u8] = b"l4proxy-control";

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client asks of the daemon's main loop.
#[derive(Debug)]
pub enum Request {
    /// The daemon's state, as JSON.
    Status,
    /// Reread the policy, as on SIGHUP; the answer says whether it is in
    /// force.
    Reload,
    /// Start the successor (`l4proxy upgrade`); the answer comes once it has
    /// taken over, or failed to.
    Upgrade,
    /// A successor (`run --takeover`) asks for the listeners; it is
    /// answered on this connection, not with a JSON value.
    Takeover(UnixStream),
}

/// What a client (`l4proxy status`, ...) sends with [`ask`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    Status,
    Reload,
    Upgrade,
    /// The daemon's process ID (answered without its main loop).
    Pid,
}

impl Query {
    fn line(self) -> &'static str {
        match self {
            Query::Status => "status\n",
            Query::Reload => "reload\n",
            Query::Upgrade => "upgrade\n",
            Query::Pid => "pid\n",
        }
    }
}

/// The request line of a takeover.
pub const TAKEOVER: &str = "takeover\n";

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "{0} already runs in this network namespace; one daemon per namespace: stop it, or replace it with `l4proxy run --takeover ...` or `l4proxy upgrade`"
    )]
    Running(Running),
    #[error("the control socket's name @l4proxy-control is taken, by no daemon: {0}")]
    Taken(NotDaemon),
    #[error("binding the control socket @l4proxy-control: {0}")]
    Io(#[from] io::Error),
}

/// A daemon that holds the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Running {
    /// Its process ID, if it said.
    pub pid: Option<u32>,
}

impl std::fmt::Display for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "an l4proxy daemon (pid {pid})"),
            None => write!(f, "an l4proxy daemon (which did not give its pid)"),
        }
    }
}

/// Requests for the daemon's main loop, each with where its JSON answer
/// goes.
pub type Requests = mpsc::Sender<(Request, oneshot::Sender<serde_json::Value>)>;

/// Binds the socket; refused, naming it, if another daemon in this
/// namespace has it.
pub fn bind() -> Result<UnixListener, BindError> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(NAME)?;
    let listener = match std::os::unix::net::UnixListener::bind_addr(&addr) {
        Ok(listener) => listener,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            return Err(match running() {
                Ok(daemon) => BindError::Running(daemon),
                Err(why) => BindError::Taken(why),
            });
        }
        Err(e) => return Err(e.into()),
    };
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

/// Why no daemon answers on the control socket.
#[derive(Debug, thiserror::Error)]
pub enum NotDaemon {
    /// Nothing holds the name (or the connection failed).
    #[error("no l4proxy daemon answers in this network namespace ({0})")]
    Nobody(io::Error),
    /// A process not run by root holds the name.
    #[error(
        "the control socket @l4proxy-control is held by pid {pid} (uid {uid}), not by root: no l4proxy daemon; stop that process"
    )]
    NotRoot { pid: i32, uid: u32 },
    #[error("who holds the control socket @l4proxy-control: {0}")]
    Unknown(io::Error),
}

/// The daemon of this network namespace, or why there is none.
pub fn running() -> Result<Running, NotDaemon> {
    let stream = connect()?;
    let answer = ask_on(stream, Query::Pid, REQUEST_TIMEOUT).ok();
    let pid = answer
        .and_then(|answer| answer["pid"].as_u64())
        .and_then(|pid| u32::try_from(pid).ok());
    Ok(Running { pid })
}

/// Connects to the daemon of this network namespace: a socket root
/// listens on (see the module's header).
pub fn connect() -> Result<std::os::unix::net::UnixStream, NotDaemon> {
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(NAME).map_err(NotDaemon::Nobody)?;
    let stream = std::os::unix::net::UnixStream::connect_addr(&addr).map_err(NotDaemon::Nobody)?;
    let listener = listener_of(&stream).map_err(NotDaemon::Unknown)?;
    if listener.uid != 0 {
        return Err(NotDaemon::NotRoot {
            pid: listener.pid,
            uid: listener.uid,
        });
    }
    Ok(stream)
}

/// The credentials `stream`'s listener had when it began to listen
/// (`SO_PEERCRED` on a connected client; std's `peer_cred` is unstable).
fn listener_of(stream: &std::os::unix::net::UnixStream) -> io::Result<libc::ucred> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `length` bytes, one ucred, into
    // the buffer; the descriptor is borrowed from a live stream.
    let done = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut credentials).cast(),
            &mut length,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(credentials)
}

/// Answers clients on `listener` until `stop`, each in a task of
/// `answers` (the daemon waits for them before it exits: an `upgrade` is
/// answered as the daemon hands over). Once `requests` is closed, what
/// goes to the main loop is answered that the daemon is stopping.
pub async fn serve(
    listener: UnixListener,
    requests: Requests,
    stop: CancellationToken,
    answers: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if crate::server::after_accept_error(&e, "control", stop.cancelled()).await {
                        return;
                    }
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let requests = requests.clone();
        answers.spawn(async move {
            if let Err(e) = answer(stream, &requests).await {
                tracing::debug!(error = %e, "control request failed");
            }
        });
    }
}

/// Whether process `pid` is in this daemon's user namespace, where alone
/// its capabilities count: a root process without cap_net_admin has every
/// capability in a user namespace it makes (`unshare -U`), and `capget`
/// reports them alike. Told by its namespace where /proc shows it (this
/// daemon's ptrace rights over it: not over a client holding capabilities
/// the daemon gave up, as under the shipped unit), else by its uid and gid
/// maps, which a process in another namespace shows as this one's only if
/// it held cap_setuid and cap_setgid where it made them. `None`: /proc
/// shows neither (`hidepid`, `ProtectProc=`).
fn in_our_user_namespace(pid: i32) -> Option<bool> {
    let theirs = UserNamespace::of(&format!("/proc/{pid}"));
    let ours = OURS.get_or_init(|| UserNamespace::of("/proc/self"));
    match (&theirs.link, &ours.link) {
        (Some(theirs), Some(ours)) => Some(theirs == ours),
        _ => Some(theirs.maps.as_ref()? == ours.maps.as_ref()?),
    }
}

/// A process's user namespace as /proc shows it: its link (where ptrace
/// rights allow) and its uid and gid maps.
struct UserNamespace {
    link: Option<std::path::PathBuf>,
    maps: Option<(Vec<u8>, Vec<u8>)>,
}

impl UserNamespace {
    fn of(proc: &str) -> UserNamespace {
        let map = |name: &str| std::fs::read(format!("{proc}/{name}")).ok();
        UserNamespace {
            link: std::fs::read_link(format!("{proc}/ns/user")).ok(),
            maps: map("uid_map").zip(map("gid_map")),
        }
    }
}

/// This daemon's own, read at its first client: it does not change.
static OURS: std::sync::OnceLock<UserNamespace> = std::sync::OnceLock::new();

async fn answer(mut stream: UnixStream, requests: &Requests) -> io::Result<()> {
    let peer = stream.peer_cred()?;
    let (uid, pid) = (peer.uid(), peer.pid().unwrap_or(0));
    // A pid of 0: the client is in a pid namespace this daemon cannot see.
    let capable = uid == 0
        && pid > 0
        && crate::privilege::held_by(pid)
            .is_ok_and(|held| held.effective.contains(crate::privilege::CAP_NET_ADMIN));
    let refused = match capable.then(|| in_our_user_namespace(pid)) {
        Some(Some(true)) => None,
        Some(None) => Some(
            "the daemon cannot see the client's /proc entry (hidepid, ProtectProc=), \
             so not its user namespace",
        ),
        _ => Some("only root with cap_net_admin may ask (in the daemon's user namespace)"),
    };
    if let Some(why) = refused {
        // Any local user can connect to an abstract socket: its refusals
        // must not crowd the log.
        static REFUSALS: Throttle = Throttle::new(Duration::from_secs(1));
        if let Some(refused) = REFUSALS.event() {
            tracing::warn!(
                uid,
                pid,
                refused,
                why,
                "control socket: refused a client (refused counts this one and those not \
                 logged since the last such line)"
            );
        }
        let refusal = serde_json::json!({ "ok": false, "error": why });
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
        "upgrade" => Request::Upgrade,
        "pid" => {
            let answer = serde_json::json!({ "ok": true, "pid": std::process::id() });
            return reply(&mut stream, &answer).await;
        }
        "takeover" => {
            // Answered by the main loop, on this connection.
            let (tx, _) = oneshot::channel();
            return match requests.reserve().await {
                Ok(place) => {
                    place.send((Request::Takeover(stream), tx));
                    Ok(())
                }
                Err(_) => reply(&mut stream, &stopping()).await,
            };
        }
        other => {
            let error = format!("unknown request {other:?}: status, reload, upgrade or pid");
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
    reply(&mut stream, &answer.unwrap_or_else(stopping)).await
}

/// The answer once the main loop takes no more requests: the daemon stops
/// (it drains its connections) or has handed over to a successor.
fn stopping() -> serde_json::Value {
    serde_json::json!({
        "ok": false,
        "error": "the daemon is stopping: it drains its connections and takes no requests",
    })
}

async fn reply(stream: &mut UnixStream, answer: &serde_json::Value) -> io::Result<()> {
    let mut text = answer.to_string();
    text.push('\n');
    stream.write_all(text.as_bytes()).await?;
    stream.shutdown().await
}

/// Asks the daemon of this network namespace (a client: `l4proxy status`,
/// `l4proxy reload`, `l4proxy upgrade`) and waits up to `timeout` for its
/// answer.
pub fn ask(query: Query, timeout: Duration) -> Result<serde_json::Value, String> {
    ask_on(connect().map_err(|e| e.to_string())?, query, timeout)
}

fn ask_on(
    mut stream: std::os::unix::net::UnixStream,
    query: Query,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // A refusal (of who asks) may come before the question is read, and
    // the daemon closes: then the write fails, and the answer is there.
    let asked = stream.write_all(query.line().as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if answer.is_empty() {
        asked.map_err(|e| format!("asking the daemon: {e}"))?;
        read.map_err(|e| format!("reading the daemon's answer: {e}"))?;
    }
    serde_json::from_str(&answer).map_err(|e| format!("the daemon's answer is not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon refuses who asks before it reads the question, and
    /// closes: the client's write fails, and the refusal is its answer.
    #[test]
    fn a_refusal_before_the_question_is_the_answer() {
        let (client, daemon) = std::os::unix::net::UnixStream::pair().unwrap();
        let refusal = serde_json::json!({ "ok": false, "error": "only root with cap_net_admin may ask (in the daemon's user namespace)" });
        (&daemon)
            .write_all(format!("{refusal}\n").as_bytes())
            .unwrap();
        drop(daemon);
        let answer = ask_on(client, Query::Status, Duration::from_secs(1));
        assert_eq!(answer, Ok(refusal));
    }
}
