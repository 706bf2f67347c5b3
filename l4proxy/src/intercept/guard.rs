//! Crash guard: a forked child that removes our routes if the daemon dies
//! without removing them itself (SIGKILL, OOM kill, panic with abort).
//!
//! The BPF link is owned by a file descriptor and dies with the process; routes
//! are not, so without this a killed daemon would leave its prefixes local and
//! black-holed. The child waits for end-of-file on a pipe whose only write end
//! the daemon holds: the kernel closes it however the daemon ends.
//!
//! The guard cleans up only while its daemon owns the namespace's routes:
//! the daemon writes [`ARM`] once it does (it holds the control socket, the
//! one-daemon lock, or a predecessor handed them over in a takeover,
//! docs/takeover.md) and [`DISARM`] once it has handed them on. A daemon
//! refused because another runs, or a successor that dies before the
//! handover, leaves the routes to their owner (which removes those the
//! successor added, `Installation::remove_unowned`).

use std::{
    fs::File,
    io::{self, Read, Write},
    os::fd::{FromRawFd, OwnedFd},
};

use super::routes;
use crate::logging::{self, LogFormat};

/// Written on the pipe: the routes are the daemon's now.
const ARM: u8 = b'A';
/// Written on the pipe: the routes belong to a successor; leave them.
const DISARM: u8 = b'D';

/// Held by the daemon for its whole life; dropping it (or dying) wakes the guard.
pub struct Guard {
    write_end: File,
}

impl Guard {
    /// From now on, the guard removes the routes if the daemon dies.
    pub fn arm(&self) -> io::Result<()> {
        (&self.write_end).write_all(&[ARM])
    }

    /// From now on, the guard leaves the routes alone: a successor owns them.
    pub fn disarm(&self) -> io::Result<()> {
        (&self.write_end).write_all(&[DISARM])
    }
}

/// Forks the guard process, disarmed.
///
/// # Safety
/// Must be called while the process has a single thread (before the log
/// writer and the tokio runtime start): the child of a multi-threaded fork
/// may only call async-signal-safe functions, and the guard builds a runtime
/// of its own. The guard logs in `format`, straight to stderr.
pub unsafe fn spawn(format: LogFormat) -> io::Result<Guard> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded per this function's contract.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(write_end);
            let _log = logging::direct(format);
            // Removing routes and rules is all it does (see `privilege`).
            if let Err(e) = crate::privilege::keep_only(crate::privilege::GUARD) {
                tracing::warn!(error = %e, "the guard keeps its capabilities");
            }
            watch(read_end)
        }
        _ => Ok(Guard {
            write_end: File::from(write_end),
        }),
    }
}

fn watch(read_end: OwnedFd) -> ! {
    // A terminal's Ctrl-C or a service manager's SIGTERM reaches the whole
    // process group; the guard must outlive the daemon to clean up after it.
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: setting a signal to SIG_IGN has no handler to be unsafe in.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    let mut pipe = File::from(read_end);
    let mut byte = [0u8; 1];
    let mut armed = false;
    loop {
        match pipe.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == ARM => armed = true,
            Ok(_) if byte[0] == DISARM => armed = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(_) | Err(_) => break,
        }
    }
    if !armed {
        std::process::exit(0)
    }
    let removed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(routes::RouteError::Socket)
        .and_then(|runtime| runtime.block_on(routes::remove_leftovers()));
    match removed {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            routes = n,
            "daemon ended without cleaning up; guard removed its routes"
        ),
        Err(e) => {
            tracing::error!(error = %e, "guard could not remove the daemon's routes; run `l4proxy cleanup`")
        }
    }
    std::process::exit(0)
}
