//! sd_notify(3): tells a service manager (systemd's `Type=notify`) when the
//! daemon is ready, reloading or stopping, with a `STATUS=` line for
//! `systemctl status`. Nothing happens unless `NOTIFY_SOCKET` is set.
//!
//! A few lines over std's `UnixDatagram` rather than a crate: std already
//! reaches abstract addresses (`@name`), and the messages are ours to format.
//!
//! Every ready message carries `MAINPID=`: a successor started by
//! `l4proxy upgrade` is a child of the old daemon, and this is how it
//! becomes the service's main process (the unit has `NotifyAccess=all`).
//! The old daemon names its successor too, the moment it hands over: it may
//! drain and exit before the successor's READY=1 arrives, and the exit of
//! what systemd still takes for the main process would end the service.

use std::{
    os::{
        linux::net::SocketAddrExt,
        unix::{
            ffi::OsStrExt,
            net::{SocketAddr, UnixDatagram},
        },
    },
    sync::OnceLock,
    time::Duration,
};

/// What the daemon tells the service manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State<'a> {
    /// Started: listeners open, programs attached, policy `generation` in force.
    Ready { generation: u64 },
    /// A reload began, at this `CLOCK_MONOTONIC` time.
    Reloading { monotonic_usec: u64 },
    /// A reload put policy `generation` in force.
    Reloaded { generation: u64 },
    /// A reload was refused; policy `generation` stays in force.
    Refused { reason: &'a str, generation: u64 },
    /// Handed over to `successor`, now the service's main process; nothing
    /// else is said, the service's status is the successor's to tell.
    HandedOver { successor: u32 },
    /// SIGTERM/SIGINT: draining `open_connections` for up to `grace_period`.
    Stopping {
        open_connections: usize,
        grace_period: Duration,
    },
}

impl State<'_> {
    /// The datagram: `KEY=value` lines (sd_notify(3)).
    pub fn message(&self, pid: u32) -> String {
        match self {
            State::Ready { generation } => format!(
                "READY=1\nMAINPID={pid}\nSTATUS=serving; policy generation {generation} in force"
            ),
            State::Reloading { monotonic_usec } => {
                format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS=reloading the policy")
            }
            State::Reloaded { generation } => {
                format!("READY=1\nSTATUS=serving; policy generation {generation} in force")
            }
            State::Refused { reason, generation } => format!(
                "READY=1\nSTATUS=serving; reload refused, policy generation {generation} stays in force: {}",
                // STATUS= is one line.
                reason.replace('\n', " ")
            ),
            State::HandedOver { successor } => format!("MAINPID={successor}"),
            State::Stopping {
                open_connections,
                grace_period,
            } => format!(
                "STOPPING=1\nSTATUS=draining {open_connections} open connections for up to {grace_period:?}"
            ),
        }
    }
}

/// [`State::Ready`]: serving policy `generation`.
pub fn ready(generation: u64) {
    send(State::Ready { generation });
}

/// [`State::Reloading`], now.
pub fn reloading() {
    send(State::Reloading {
        monotonic_usec: monotonic_usec(),
    });
}

/// [`State::Reloaded`]: policy `generation` put in force.
pub fn reloaded(generation: u64) {
    send(State::Reloaded { generation });
}

/// [`State::Refused`]: policy `generation` stays.
pub fn refused(reason: &str, generation: u64) {
    send(State::Refused { reason, generation });
}

/// [`State::HandedOver`]: instead of [`stopping`] after a handover.
pub fn handed_over(successor: u32) {
    send(State::HandedOver { successor });
}

/// [`State::Stopping`]. Only for a stop: a daemon that handed its sockets
/// to a successor does not stop the service.
pub fn stopping(open_connections: usize, grace_period: Duration) {
    send(State::Stopping {
        open_connections,
        grace_period,
    });
}

/// Tells the service manager, if there is one; a failure is logged, never
/// fatal (the daemon serves the same either way).
fn send(state: State) {
    let Some(manager) = manager() else { return };
    let message = state.message(std::process::id());
    if let Err(e) = manager
        .socket
        .send_to_addr(message.as_bytes(), &manager.addr)
    {
        tracing::warn!(error = %e, "telling the service manager (NOTIFY_SOCKET)");
    }
}

struct Manager {
    socket: UnixDatagram,
    addr: SocketAddr,
}

/// `NOTIFY_SOCKET`'s socket, looked up once. It stays in the environment:
/// a successor the daemon starts needs it too.
fn manager() -> Option<&'static Manager> {
    static MANAGER: OnceLock<Option<Manager>> = OnceLock::new();
    MANAGER
        .get_or_init(|| {
            let value = std::env::var_os("NOTIFY_SOCKET")?;
            let connected = socket_addr(value.as_encoded_bytes()).and_then(|addr| {
                Ok(Manager {
                    socket: UnixDatagram::unbound()?,
                    addr,
                })
            });
            connected
                .inspect_err(|e| {
                    tracing::warn!(error = %e, notify_socket = ?value, "NOTIFY_SOCKET unusable; the service manager will not hear from l4proxy")
                })
                .ok()
        })
        .as_ref()
}

/// `/path` or `@abstract-name` (sd_notify(3)).
fn socket_addr(value: &[u8]) -> std::io::Result<SocketAddr> {
    match value {
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        [b'/', ..] => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(value)),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "only a path or an @abstract name is supported",
        )),
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it (std's
/// `Instant` reads this clock but does not show it).
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which lives
    // across the call; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(
            State::Ready { generation: 1 }.message(42),
            "READY=1\nMAINPID=42\nSTATUS=serving; policy generation 1 in force"
        );
        assert_eq!(
            State::Reloading {
                monotonic_usec: 123456
            }
            .message(42),
            "RELOADING=1\nMONOTONIC_USEC=123456\nSTATUS=reloading the policy"
        );
        assert_eq!(
            State::Reloaded { generation: 2 }.message(42),
            "READY=1\nSTATUS=serving; policy generation 2 in force"
        );
        assert_eq!(
            State::Refused {
                reason: "policy.json:3:4: bad\nport",
                generation: 2
            }
            .message(42),
            "READY=1\nSTATUS=serving; reload refused, policy generation 2 stays in force: policy.json:3:4: bad port"
        );
        assert_eq!(
            State::HandedOver { successor: 43 }.message(42),
            "MAINPID=43"
        );
        assert_eq!(
            State::Stopping {
                open_connections: 7,
                grace_period: Duration::from_secs(30)
            }
            .message(42),
            "STOPPING=1\nSTATUS=draining 7 open connections for up to 30s"
        );
    }

    #[test]
    fn addresses() {
        let abstract_name = socket_addr(b"@l4proxy/notify").unwrap();
        assert_eq!(
            abstract_name.as_abstract_name(),
            Some(&b"l4proxy/notify"[..])
        );
        let path = socket_addr(b"/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(socket_addr(b"vsock:2:1234").is_err());
        assert!(socket_addr(b"").is_err());
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let before = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_usec() >= before + 2_000);
    }
}
