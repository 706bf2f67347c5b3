//! Takeover: a new daemon (`run --takeover`) takes over from the one running
//! in its network namespace without a connection lost (docs/takeover.md).
//!
//! The successor asks on the control socket (`takeover`); the predecessor
//! answers on that connection with an [`Offer`] and, in the same message
//! (SCM_RIGHTS), its listening sockets: the control socket itself, the
//! steered listeners, the CONNECT listeners and the admin listener. They
//! are the *same* sockets, accept queues and all. The successor loads its
//! own programs, puts the sockets in its own maps, adopts the routes and
//! rules, attaches, accepts, and says `ready`; the predecessor then stops
//! accepting, detaches its `steer`, disowns the routes, says `draining`,
//! and drains its own connections for its grace period. It keeps the
//! connection open until it exits: the successor keeps what the
//! predecessor's connections need until it reads end-of-file.
//!
//! A successor that fails before `ready` (its policy refused by this host,
//! a different `--fwmark`, a crash) leaves the predecessor serving: it only
//! ever added to what was there, and removes only what it added. One killed
//! before the predecessor read its `ready` cannot: the predecessor removes
//! what of ours it does not own
//! ([`crate::install::Installation::remove_unowned`]).
//!
//! `l4proxy upgrade` asks the daemon to start its successor itself: the
//! binary at the path it was started from (a newer one installed over it is
//! the one started), with its own arguments and `--takeover`.

use std::{
    ffi::OsString,
    io,
    mem::size_of,
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::PathBuf,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest},
    net::{TcpListener, UnixStream},
    sync::oneshot,
};

use crate::{
    control,
    install::Routing,
    intercept::{Family, delivery::Mark},
};

/// How long the predecessor waits for its successor's `ready` (it loads
/// its programs and applies its policy meanwhile), and the successor for
/// the predecessor's `draining`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const DRAINING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a predecessor that said `draining` keeps its programs attached
/// for a successor that does not say it attached its own.
const ATTACHED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a successor has to read the offer: the main loop waits while
/// it writes (reloads, signals and health checks with it).
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// The kernel passes at most this many descriptors in one message
/// (`SCM_MAX_FD`).
const MAX_FDS: usize = 253;

/// The longest offer read (JSON). Its bulk is the owned prefixes' routes,
/// one per rule prefix at most: up to `MAX_RULE_ENTRIES` of at most 46
/// bytes each (`"ffff:…:ffff/128",`), 48 MiB; the rest is a few hundred.
const MAX_OFFER: usize = l4proxy_common::MAX_RULE_ENTRIES as usize * 46 + (1 << 20);

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no daemon to take over from: {0}")]
    NoDaemon(String),
    #[error("the running daemon refused the takeover: {0}")]
    Refused(String),
    #[error(
        "the running daemon marks packets with {theirs} in routing table {their_table}, this one would use {ours} in table {our_table}: a takeover keeps both (give the same --fwmark and --routing-table, or stop the daemon first)"
    )]
    Incompatible {
        theirs: Mark,
        their_table: u32,
        ours: Mark,
        our_table: u32,
    },
    #[error("takeover: {what}: {error}")]
    Io {
        what: &'static str,
        error: io::Error,
    },
    #[error("takeover: the running daemon's offer is not understood: {0}")]
    Offer(String),
    #[error("takeover: the running daemon did not confirm that it drains: {0}")]
    NotDraining(String),
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> TakeoverError {
    move |error| TakeoverError::Io { what, error }
}

/// What the predecessor hands over, besides the descriptors (which follow
/// in this order: control, steered, CONNECT, admin).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Offer {
    pid: u32,
    mark: (u32, u32),
    table: u32,
    routing: Routing,
    /// The steered listeners' families.
    steered: Vec<Slot>,
    connect: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    /// This daemon keeps its programs attached until a successor that held
    /// its own says `attached` (absent from the offers of daemons before
    /// that exchange, which detach theirs before `draining`).
    #[serde(default)]
    waits_for_attached: bool,
    /// This daemon hears which CONNECT listeners the successor kept, and
    /// leaves their queues to it (absent from older offers: the successor
    /// does not say, and the predecessor reads every queue to its end).
    #[serde(default)]
    hears_kept: bool,
}

/// A steered listener's family, as the offer names it.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
enum Slot {
    V4,
    V6,
}

impl From<Family> for Slot {
    fn from(family: Family) -> Slot {
        match family {
            Family::V4 => Slot::V4,
            Family::V6 => Slot::V6,
        }
    }
}

impl From<Slot> for Family {
    fn from(slot: Slot) -> Family {
        match slot {
            Slot::V4 => Family::V4,
            Slot::V6 => Family::V6,
        }
    }
}

/// The predecessor's listening sockets, lent for an offer.
pub struct Listeners<'a> {
    pub control: BorrowedFd<'a>,
    pub steered: Vec<(Family, BorrowedFd<'a>)>,
    pub connect: Vec<(SocketAddr, BorrowedFd<'a>)>,
    pub admin: Option<(SocketAddr, BorrowedFd<'a>)>,
}

/// What the successor received: the same sockets, now its own too. The
/// steered (every member of each family's reuseport group) and CONNECT
/// listeners are not registered with a runtime yet: the workers accept on
/// them.
pub struct Handed {
    pub control: tokio::net::UnixListener,
    pub steered: Vec<(Family, std::net::TcpListener)>,
    pub connect: Vec<(SocketAddr, std::net::TcpListener)>,
    pub admin: Option<(SocketAddr, TcpListener)>,
    pub routing: Routing,
}

impl Handed {
    /// Nothing handed over: a clean start, with the control socket just
    /// bound.
    pub fn fresh(control: tokio::net::UnixListener) -> Handed {
        Handed {
            control,
            steered: Vec::new(),
            connect: Vec::new(),
            admin: None,
            routing: Routing::default(),
        }
    }
}

// ---- the successor's side ----

/// The running daemon, seen from its successor.
pub struct Predecessor {
    stream: BufReader<UnixStream>,
    pub pid: u32,
    /// It keeps its programs until we say `attached`: ours are held until
    /// it has stopped accepting (else attached with our policy, as a
    /// predecessor that detaches its own before `draining` needs).
    pub holds: bool,
    /// It understands `kept` in our `ready`.
    hears_kept: bool,
}

/// Asks the daemon of this network namespace for its sockets and routing
/// state; refuses a daemon whose packet mark or table differ from ours.
pub async fn request(mark: Mark, table: u32) -> Result<(Predecessor, Handed), TakeoverError> {
    let stream = control::connect().map_err(|e| TakeoverError::NoDaemon(e.to_string()))?;
    tracing::info!("takeover: asking the running daemon for its listeners");
    stream
        .set_nonblocking(true)
        .map_err(io_error("the control socket"))?;
    let mut stream = UnixStream::from_std(stream).map_err(io_error("the control socket"))?;
    stream
        .write_all(control::TAKEOVER.as_bytes())
        .await
        .map_err(io_error("asking the running daemon"))?;
    let (mut text, fds) = stream
        .async_io(Interest::READABLE, || receive_with_fds(stream.as_raw_fd()))
        .await
        .map_err(io_error("receiving the sockets"))?;
    let mut stream = BufReader::new(stream);
    if !text.ends_with(b"\n") {
        let room = MAX_OFFER.saturating_sub(text.len()) as u64;
        let read = (&mut stream)
            .take(room)
            .read_until(b'\n', &mut text)
            .await
            .map_err(io_error("receiving the offer"))?;
        if !text.ends_with(b"\n") {
            return Err(TakeoverError::Offer(if read as u64 == room {
                format!("it is longer than {MAX_OFFER} bytes")
            } else {
                "it ended early".to_owned()
            }));
        }
    }
    let message: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| TakeoverError::Offer(e.to_string()))?;
    if message["ok"] != true {
        let reason = message["error"].as_str().unwrap_or("no reason given");
        return Err(TakeoverError::Refused(reason.to_owned()));
    }
    let offer: Offer = serde_json::from_value(message["offer"].clone())
        .map_err(|e| TakeoverError::Offer(e.to_string()))?;
    let theirs = Mark {
        value: offer.mark.0,
        mask: offer.mark.1,
    };
    if theirs != mark || offer.table != table {
        return Err(TakeoverError::Incompatible {
            theirs,
            their_table: offer.table,
            ours: mark,
            our_table: table,
        });
    }
    let predecessor = Predecessor {
        stream,
        pid: offer.pid,
        holds: offer.waits_for_attached,
        hears_kept: offer.hears_kept,
    };
    Ok((predecessor, handed(offer, fds)?))
}

/// The descriptors, as the offer names them.
fn handed(offer: Offer, fds: Vec<OwnedFd>) -> Result<Handed, TakeoverError> {
    let wanted = 1 + offer.steered.len() + offer.connect.len() + usize::from(offer.admin.is_some());
    if fds.len() != wanted {
        return Err(TakeoverError::Offer(format!(
            "{} sockets came with an offer that names {wanted}",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let control = {
        let listener = std::os::unix::net::UnixListener::from(fds.next().expect("counted above"));
        listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener))
            .map_err(io_error("the handed control socket"))?
    };
    let mut next_tcp = || -> Result<std::net::TcpListener, TakeoverError> {
        let listener = std::net::TcpListener::from(fds.next().expect("counted above"));
        listener
            .set_nonblocking(true)
            .map(|()| listener)
            .map_err(io_error("a handed listener"))
    };
    let steered = offer
        .steered
        .iter()
        .map(|&slot| Ok((Family::from(slot), next_tcp()?)))
        .collect::<Result<_, TakeoverError>>()?;
    let connect = offer
        .connect
        .iter()
        .map(|addr| Ok((*addr, next_tcp()?)))
        .collect::<Result<_, TakeoverError>>()?;
    let admin = match offer.admin {
        Some(addr) => Some((
            addr,
            TcpListener::from_std(next_tcp()?).map_err(io_error("the handed admin listener"))?,
        )),
        None => None,
    };
    Ok(Handed {
        control,
        steered,
        connect,
        admin,
        routing: offer.routing,
    })
}

impl Predecessor {
    /// Tells the predecessor that this daemon is ready (its policy in the
    /// maps, its listeners bound, `connect` the CONNECT listeners' addresses;
    /// its programs not attached yet) and waits until it says it has
    /// stopped accepting and drains.
    pub async fn ready(&mut self, connect: &[SocketAddr]) -> Result<(), TakeoverError> {
        let held = if self.holds { " held" } else { "" };
        let kept = if self.hears_kept {
            let addresses: Vec<String> = connect.iter().map(SocketAddr::to_string).collect();
            format!(" kept={}", addresses.join(","))
        } else {
            String::new()
        };
        let line = format!("ready {}{held}{kept}\n", std::process::id());
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .map_err(io_error("telling the running daemon we are ready"))?;
        tracing::info!("takeover: ready; waiting for the running daemon to drain");
        let mut answer = String::new();
        match tokio::time::timeout(DRAINING_TIMEOUT, self.stream.read_line(&mut answer)).await {
            Ok(Ok(_)) if answer.trim() == "draining" => Ok(()),
            Ok(Ok(_)) => Err(TakeoverError::NotDraining(format!(
                "it answered {:?}",
                answer.trim()
            ))),
            Ok(Err(e)) => Err(TakeoverError::NotDraining(e.to_string())),
            Err(_) => Err(TakeoverError::NotDraining(format!(
                "no answer within {DRAINING_TIMEOUT:?}"
            ))),
        }
    }

    /// Tells the predecessor that this daemon's programs run (its `steer`
    /// and `classify` take over from the predecessor's, which it detaches
    /// now).
    pub async fn attached(&mut self) {
        if let Err(e) = self.stream.get_mut().write_all(b"attached\n").await {
            tracing::warn!(error = %e, "takeover: telling the predecessor that our programs run");
        }
    }

    /// Returns once the predecessor has exited (its end of the connection
    /// closes with the process).
    pub async fn gone(&mut self) {
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest).await;
    }
}

/// Waits for `predecessor` to exit; never returns without one.
pub async fn gone(predecessor: &mut Option<Predecessor>) {
    match predecessor {
        Some(predecessor) => predecessor.gone().await,
        None => std::future::pending().await,
    }
}

// ---- the predecessor's side ----

/// A takeover under way, and the `l4proxy upgrade` that may have asked
/// for it, seen from the running daemon.
#[derive(Default)]
pub struct Handover {
    /// Offered the sockets; waiting for its `ready`.
    successor: Option<Offered>,
    /// The successor `upgrade` started, and where its answer goes.
    upgrade: Option<Upgrade>,
}

/// A successor that has the sockets, and what it said so far (kept across
/// the main loop's turns, which may interrupt a read).
struct Offered {
    stream: BufReader<UnixStream>,
    line: Vec<u8>,
    deadline: tokio::time::Instant,
}

struct Upgrade {
    child: tokio::process::Child,
    reply: oneshot::Sender<serde_json::Value>,
}

/// What happened to a takeover under way.
pub enum Event {
    /// The successor (this pid) is ready to take over: stop accepting,
    /// confirm with [`Successor::confirm`], drain (and, for one that held
    /// its programs, let ours go once it says they run).
    Ready(Box<Successor>),
    /// It failed (logged); this daemon keeps serving.
    Failed,
}

/// A successor that is ready; this daemon's connection to it stays open
/// until the process exits.
pub struct Successor {
    stream: BufReader<UnixStream>,
    pub pid: u32,
    /// Its programs wait for our stop, and it says `attached` once they
    /// run: ours steer until then (else they let go before `draining`).
    pub held: bool,
    /// The CONNECT listeners it accepts on (`None`: it did not say).
    pub kept: Option<Vec<SocketAddr>>,
    upgrade: Option<Upgrade>,
}

impl Handover {
    /// Whether a takeover is under way (the daemon keeps its kernel state as
    /// it is meanwhile: the offer described it).
    pub fn busy(&self) -> bool {
        self.successor.is_some() || self.upgrade.is_some()
    }

    /// Answers a successor's request: the offer and the sockets, or a
    /// refusal while another takeover is under way.
    pub async fn offer(
        &mut self,
        mut stream: UnixStream,
        routing: Routing,
        (mark, table): (Mark, u32),
        listeners: Listeners<'_>,
    ) {
        if self.successor.is_some() {
            let refusal =
                serde_json::json!({ "ok": false, "error": "another takeover is under way" });
            let _ = stream.write_all(format!("{refusal}\n").as_bytes()).await;
            return;
        }
        let offer = Offer {
            pid: std::process::id(),
            mark: (mark.value, mark.mask),
            table,
            routing,
            steered: listeners
                .steered
                .iter()
                .map(|(family, _)| Slot::from(*family))
                .collect(),
            connect: listeners.connect.iter().map(|(addr, _)| *addr).collect(),
            admin: listeners.admin.map(|(addr, _)| addr),
            waits_for_attached: true,
            hears_kept: true,
        };
        let fds: Vec<RawFd> = std::iter::once(listeners.control)
            .chain(listeners.steered.iter().map(|(_, fd)| *fd))
            .chain(listeners.connect.iter().map(|(_, fd)| *fd))
            .chain(listeners.admin.map(|(_, fd)| fd))
            .map(|fd| fd.as_raw_fd())
            .collect();
        let text = format!("{}\n", serde_json::json!({ "ok": true, "offer": offer }));
        let sent = async {
            if fds.len() > MAX_FDS {
                return Err(io::Error::other(format!(
                    "{} listening sockets, more than the {MAX_FDS} one message can pass",
                    fds.len()
                )));
            }
            let n = stream
                .async_io(Interest::WRITABLE, || {
                    send_with_fds(stream.as_raw_fd(), text.as_bytes(), &fds)
                })
                .await?;
            stream.write_all(&text.as_bytes()[n..]).await
        };
        let sent = match tokio::time::timeout(OFFER_TIMEOUT, sent).await {
            Ok(sent) => sent,
            Err(_elapsed) => {
                // The connection is closed unanswered: a refusal would
                // queue behind the offer that nobody reads.
                tracing::error!(
                    "takeover: the successor did not read the offer within {OFFER_TIMEOUT:?}; still serving"
                );
                return;
            }
        };
        match sent {
            Ok(()) => {
                tracing::info!(
                    sockets = fds.len(),
                    "takeover: listeners offered to a successor"
                );
                self.successor = Some(Offered {
                    stream: BufReader::new(stream),
                    line: Vec::new(),
                    deadline: tokio::time::Instant::now() + READY_TIMEOUT,
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "takeover: offering the listeners failed; still serving");
                let refusal = serde_json::json!({ "ok": false, "error": e.to_string() });
                let _ = stream.write_all(format!("{refusal}\n").as_bytes()).await;
            }
        }
    }

    /// `l4proxy upgrade`: starts the successor; `reply` is answered when it
    /// has taken over or failed to.
    pub fn upgrade(&mut self, command: &Restart, reply: oneshot::Sender<serde_json::Value>) {
        if self.busy() {
            let _ = reply.send(failure("a takeover is already under way"));
            return;
        }
        match command.spawn() {
            Ok(child) => {
                tracing::info!(pid = child.id(), binary = %command.binary.display(), "upgrade: successor started");
                self.upgrade = Some(Upgrade { child, reply });
            }
            Err(e) => {
                let error = format!("starting {}: {e}", command.binary.display());
                tracing::error!("upgrade failed: {error}; still serving");
                let _ = reply.send(failure(&error));
            }
        }
    }

    /// The next thing that happens to the takeover under way; never
    /// returns while none is.
    pub async fn next(&mut self) -> Event {
        tokio::select! {
            Some(ready) = wait_ready(&mut self.successor) => match ready {
                // Read late (this daemon was held up): the successor waited
                // its DRAINING_TIMEOUT for our answer and gave up. Draining
                // now would leave nobody serving.
                Ok(Ready { pid, .. }) if hung_up(self.successor.as_ref().expect("ready came from it")) => {
                    self.successor = None;
                    self.fail(format!(
                        "the successor ({pid}) had given up by the time its ready was read"
                    ))
                }
                Ok(Ready { pid, held, kept }) => {
                    let stream = self.successor.take().expect("ready came from it").stream;
                    tracing::info!(successor = pid, held, "takeover: the successor is ready");
                    Event::Ready(Box::new(Successor {
                        stream,
                        pid,
                        held,
                        kept,
                        upgrade: self.upgrade.take(),
                    }))
                }
                Err(reason) => {
                    self.successor = None;
                    self.fail(reason)
                }
            },
            // Its connection, if it made one, ends too: `wait_ready` sees it.
            Some(status) = wait_exit(&mut self.upgrade) => self.fail(format!(
                "the successor exited ({status}) before it took over; its log says why"
            )),
            else => std::future::pending().await,
        }
    }

    /// The daemon stops: a takeover under way is given up (its successor
    /// reads end-of-file, and exits removing what it added), and the
    /// `upgrade` that asked is told why.
    pub fn abandon(&mut self) {
        if self.busy() {
            tracing::warn!("takeover given up: this daemon is stopping");
        }
        self.successor = None;
        if let Some(upgrade) = self.upgrade.take() {
            let _ = upgrade.reply.send(failure("the daemon is stopping"));
        }
    }

    /// Logs why a takeover failed, and answers the `upgrade` that asked.
    fn fail(&mut self, reason: String) -> Event {
        tracing::error!("takeover failed: {reason}; still serving");
        if let Some(upgrade) = self.upgrade.take() {
            let _ = upgrade.reply.send(failure(&reason));
        }
        Event::Failed
    }
}

/// The successor's `ready`; `None` while there is no successor.
async fn wait_ready(successor: &mut Option<Offered>) -> Option<Result<Ready, String>> {
    let Offered {
        stream,
        line,
        deadline,
    } = successor.as_mut()?;
    let read = tokio::time::timeout_at(*deadline, stream.read_until(b'\n', line)).await;
    let line = String::from_utf8_lossy(line);
    Some(match read {
        Err(_) => Err(format!(
            "the successor did not say it was ready within {READY_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("reading from the successor: {e}")),
        Ok(Ok(_)) if !line.ends_with('\n') => {
            Err("the successor gave up (its log says why)".to_owned())
        }
        Ok(Ok(_)) => {
            parse_ready(line.trim()).ok_or_else(|| format!("the successor said {:?}", line.trim()))
        }
    })
}

/// What a successor's `ready` says.
#[derive(Debug, PartialEq)]
struct Ready {
    pid: u32,
    /// Its programs wait for our stop.
    held: bool,
    /// The CONNECT listeners it accepts on, if it says (to a predecessor
    /// whose offer `hears_kept`).
    kept: Option<Vec<SocketAddr>>,
}

/// `ready PID`, then `held` if it holds its programs, then
/// `kept=ADDRESS,…` (possibly empty) if it says what it kept.
fn parse_ready(line: &str) -> Option<Ready> {
    let mut words = line.split(' ');
    if words.next()? != "ready" {
        return None;
    }
    let pid = words.next()?.parse().ok()?;
    let mut next = words.next();
    let held = next == Some("held");
    if held {
        next = words.next();
    }
    let kept = match next {
        None => None,
        Some(word) => {
            let list = word.strip_prefix("kept=")?;
            let addresses = list.split(',').filter(|a| !a.is_empty());
            Some(
                addresses
                    .map(|a| a.parse().ok())
                    .collect::<Option<Vec<_>>>()?,
            )
        }
    };
    if words.next().is_some() {
        return None;
    }
    Some(Ready { pid, held, kept })
}

/// Whether the successor has closed its end: nothing more is queued and the
/// stream is at its end (or reset: it left data of ours unread). A peek
/// past tokio's readiness, which may not have seen the end yet.
fn hung_up(successor: &Offered) -> bool {
    if !successor.stream.buffer().is_empty() {
        return false;
    }
    // The stream is non-blocking: a peek that finds nothing would block.
    let mut byte = [std::mem::MaybeUninit::uninit()];
    match socket2::SockRef::from(successor.stream.get_ref()).peek(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// The exit status of the successor `upgrade` started; `None` while there
/// is none.
async fn wait_exit(upgrade: &mut Option<Upgrade>) -> Option<std::process::ExitStatus> {
    let upgrade = upgrade.as_mut()?;
    upgrade.child.wait().await.ok()
}

impl Successor {
    /// Tells the successor this daemon has stopped accepting and drains
    /// (its connection stays open until this process exits), and answers
    /// the `upgrade` that asked, if one did.
    pub async fn confirm(mut self: Box<Self>) -> HandedOver {
        if let Err(e) = self.stream.get_mut().write_all(b"draining\n").await {
            tracing::warn!(error = %e, "takeover: telling the successor that we drain");
        }
        if let Some(upgrade) = self.upgrade.take() {
            let answer = serde_json::json!({ "ok": true, "pid": self.pid, "predecessor": std::process::id() });
            let _ = upgrade.reply.send(answer);
        }
        HandedOver(self.stream)
    }
}

/// Kept until the process exits: the successor reads end-of-file then.
pub struct HandedOver(BufReader<UnixStream>);

impl HandedOver {
    /// Whether the successor says its programs run, within
    /// [`ATTACHED_TIMEOUT`]: this daemon's `steer` and `classify` let go
    /// then. Otherwise they steer on (into the listeners the successor
    /// accepts on) until this daemon exits.
    pub async fn attached(&mut self) -> bool {
        let mut line = String::new();
        let why = match tokio::time::timeout(ATTACHED_TIMEOUT, self.0.read_line(&mut line)).await {
            Ok(Ok(_)) if line.trim() == "attached" => return true,
            Ok(Ok(0)) => "it has gone".to_owned(),
            Ok(Ok(_)) => format!("it said {:?}", line.trim()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no word within {ATTACHED_TIMEOUT:?}"),
        };
        tracing::warn!(
            why,
            "takeover: the successor did not say its programs run; ours steer until we exit"
        );
        false
    }
}

fn failure(error: &str) -> serde_json::Value {
    serde_json::json!({ "ok": false, "error": error })
}

// ---- the successor's command line ----

/// How `l4proxy upgrade` starts the successor: the binary at the path this
/// one was started from, resolved at start-up (after an upgrade installed
/// a new file there, `/proc/self/exe` names the deleted old one), with the
/// same arguments and `--takeover`.
#[derive(Clone, Debug)]
pub struct Restart {
    pub binary: PathBuf,
    args: Vec<OsString>,
}

impl Restart {
    /// From this process's `argv`, at start-up (the working directory a
    /// relative path depends on may change later).
    pub fn from_start_up() -> io::Result<Restart> {
        let mut argv = std::env::args_os();
        let argv0 = PathBuf::from(argv.next().unwrap_or_default());
        let binary = if argv0.components().count() > 1 {
            std::path::absolute(&argv0)?
        } else {
            // Found on PATH: the file it found.
            std::fs::read_link("/proc/self/exe")?
        };
        let mut args: Vec<OsString> = argv.filter(|arg| arg != "--takeover").collect();
        args.push("--takeover".into());
        Ok(Restart { binary, args })
    }

    fn spawn(&self) -> io::Result<tokio::process::Child> {
        // stdin, stdout and stderr are inherited: the successor logs where
        // this daemon does.
        tokio::process::Command::new(&self.binary)
            .args(&self.args)
            .spawn()
    }
}

// ---- descriptors over a Unix socket ----

/// `sendmsg` with `fds` as SCM_RIGHTS; returns how many bytes of `data`
/// went (the descriptors go with the first).
fn send_with_fds(socket: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let payload = std::mem::size_of_val(fds);
    // u64 words: the control buffer must be aligned for `cmsghdr`.
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at a control buffer of `space` bytes, room for
    // one header with `payload` bytes of data, which are written within it;
    // `sendmsg` reads `data`, `control` and `msg`, all alive across the call.
    let sent = unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(header), payload);
        libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// `recvmsg` of what [`send_with_fds`] sent: the bytes read, and the
/// descriptors (close-on-exec).
fn receive_with_fds(socket: RawFd) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; 64 * 1024];
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` describes `data` and `control`, both alive and writable
    // for their lengths across the call.
    let read = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` with `msg.msg_controllen` bytes
    // of well-formed headers, which the CMSG macros walk within; an
    // SCM_RIGHTS header's data is an array of descriptors now ours.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*header).cmsg_len - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "more sockets than one message can pass were sent",
        ));
    }
    data.truncate(read as usize);
    Ok((data, fds))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use ipnet::IpNet;

    use super::*;

    /// Daemons from before the `attached` exchange and after it tell
    /// each other apart: a `ready` without `held`, an offer without
    /// `waits_for_attached`, are the older exchange.
    #[test]
    fn the_exchange_tells_older_daemons_apart() {
        let ready = |pid, held, kept: Option<&[&str]>| {
            Some(Ready {
                pid,
                held,
                kept: kept.map(|k| k.iter().map(|a| a.parse().unwrap()).collect()),
            })
        };
        assert_eq!(parse_ready("ready 42"), ready(42, false, None));
        assert_eq!(parse_ready("ready 42 held"), ready(42, true, None));
        assert_eq!(
            parse_ready("ready 42 held kept=192.0.2.1:3128,[2001:db8::1]:3128"),
            ready(42, true, Some(&["192.0.2.1:3128", "[2001:db8::1]:3128"]))
        );
        assert_eq!(parse_ready("ready 42 kept="), ready(42, false, Some(&[])));
        for bad in [
            "ready",
            "ready held",
            "ready 42 attached",
            "ready x held",
            "ready 42 kept=192.0.2.1",
            "ready 42 kept=192.0.2.1:3128 held",
            "ready 42 held kept= more",
        ] {
            assert_eq!(parse_ready(bad), None, "{bad:?}");
        }
        let older = r#"{"pid":1,"mark":[1,1],"table":244,"routing":{"prefixes":[],"delivery":false,"local_servers":[]},"steered":[],"connect":[],"admin":null}"#;
        let offer: Offer = serde_json::from_str(older).unwrap();
        assert!(!offer.waits_for_attached && !offer.hears_kept);
    }

    /// What goes in one message comes out of it: the bytes, and the same
    /// sockets (same local addresses), in order.
    #[test]
    fn descriptors_pass_with_their_message() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let listeners: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
        let sent = send_with_fds(a.as_raw_fd(), b"offer\n", &fds).unwrap();
        assert_eq!(sent, 6);
        let (data, received) = receive_with_fds(b.as_raw_fd()).unwrap();
        assert_eq!(data, b"offer\n");
        assert_eq!(received.len(), 3);
        for (listener, fd) in listeners.iter().zip(received) {
            let handed = std::net::TcpListener::from(fd);
            assert_eq!(handed.local_addr().unwrap(), listener.local_addr().unwrap());
            assert_ne!(handed.as_fd().as_raw_fd(), listener.as_raw_fd());
        }
    }

    /// Offers `routing` and no listener but `control` over `ours`.
    async fn offer_only_control(
        handover: &mut Handover,
        ours: UnixStream,
        routing: Routing,
        control: &std::net::TcpListener,
    ) {
        let listeners = Listeners {
            control: control.as_fd(),
            steered: Vec::new(),
            connect: Vec::new(),
            admin: None,
        };
        let mark = Mark { value: 1, mask: 1 };
        handover.offer(ours, routing, (mark, 100), listeners).await;
    }

    /// A successor that does not read its offer (here: 60 000 prefixes'
    /// routes, more than the socket buffers) holds the main loop only
    /// until `OFFER_TIMEOUT`; no takeover is then under way.
    #[tokio::test(start_paused = true)]
    async fn an_offer_nobody_reads_is_given_up() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let control = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let routing = Routing {
            prefixes: (0..60_000u32)
                .map(|i| {
                    let addr = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i));
                    IpNet::V6(addr.into())
                })
                .collect(),
            delivery: false,
            local_servers: Vec::new(),
        };
        let mut handover = Handover::default();
        let started = tokio::time::Instant::now();
        let offered = offer_only_control(&mut handover, ours, routing, &control);
        tokio::time::timeout(2 * OFFER_TIMEOUT, offered)
            .await
            .expect("the offer is still being written");
        assert_eq!(started.elapsed(), OFFER_TIMEOUT);
        assert!(!handover.busy());
        drop(theirs);
    }

    /// A successor's `ready` read only after it gave up waiting for our
    /// `draining` (this daemon was held up) fails the takeover: draining
    /// then would leave nobody serving.
    #[tokio::test]
    async fn a_ready_read_after_the_successor_left_fails_the_takeover() {
        for leaves in [false, true] {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            let control = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut handover = Handover::default();
            offer_only_control(&mut handover, ours, Routing::default(), &control).await;
            assert!(handover.busy(), "offered");
            let mut offer = String::new();
            BufReader::new(&mut theirs)
                .read_line(&mut offer)
                .await
                .unwrap();
            assert!(offer.contains("\"ok\":true"), "{offer}");
            theirs.write_all(b"ready 4242\n").await.unwrap();
            if leaves {
                drop(theirs);
                let event = handover.next().await;
                assert!(matches!(event, Event::Failed), "{leaves}");
            } else {
                let event = handover.next().await;
                assert!(matches!(event, Event::Ready(_)), "{leaves}");
            }
        }
    }

    /// A message without descriptors (a refusal) reads as such.
    #[test]
    fn a_message_without_descriptors() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        send_with_fds(a.as_raw_fd(), b"{\"ok\":false}\n", &[]).unwrap();
        let (data, received) = receive_with_fds(b.as_raw_fd()).unwrap();
        assert_eq!(data, b"{\"ok\":false}\n");
        assert!(received.is_empty());
    }
}
