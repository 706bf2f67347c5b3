//! The kernel programs' own log lines (aya-log), passed on to the daemon's log
//! under the target `l4proxy::kernel`.
//!
//! The programs log only rare events (see `steer`); the counters say how
//! often, a line says which connection. Their level is fixed when they are
//! loaded, from the daemon's own filter: aya-log keeps it in a frozen
//! read-only map, so the verifier knows it and drops the logging code of
//! levels that are off. With the daemon's default level (info) the loaded
//! programs hold no logging instructions at all.

use std::os::fd::{AsRawFd, RawFd};

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

/// Where the programs' lines appear in the daemon's log.
pub const TARGET: &str = "l4proxy::kernel";

/// The global aya-log's programs read their level from.
pub const LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";

/// aya-log's level for the programs: the most verbose one the daemon logs
/// for [`TARGET`] (error 1 … trace 5), 0 for none.
pub fn level() -> u8 {
    use tracing::{Level, enabled};
    if enabled!(target: TARGET, Level::TRACE) {
        5
    } else if enabled!(target: TARGET, Level::DEBUG) {
        4
    } else if enabled!(target: TARGET, Level::INFO) {
        3
    } else if enabled!(target: TARGET, Level::WARN) {
        2
    } else if enabled!(target: TARGET, Level::ERROR) {
        1
    } else {
        0
    }
}

/// The programs' log buffer, read into the daemon's log.
pub struct KernelLog(EbpfLogger<Forward>);

impl KernelLog {
    /// The reader of `ebpf`'s log buffer, if its programs log anything at
    /// `level` (see [`level`]).
    pub fn open(ebpf: &mut Ebpf, level: u8) -> Result<Option<Self>, aya_log::Error> {
        if level == 0 {
            return Ok(None);
        }
        Ok(Some(Self(EbpfLogger::init_with_logger(ebpf, Forward)?)))
    }

    /// Logs every line the programs wrote since the last time.
    pub fn flush(&mut self) {
        self.0.flush();
    }

    /// Logs the programs' lines as they come, until the runtime stops.
    pub async fn forward(self) {
        // SAFETY: the descriptor is the ring buffer map's, owned by the
        // logger inside `self`: open and the same for as long as `ready` lives.
        let registered = unsafe { AsyncFd::register_with_interest(self, Interest::READABLE) };
        let mut ready = match registered {
            Ok(ready) => ready,
            Err(e) => {
                tracing::warn!(error = %e, "the kernel programs' log will not be read");
                return;
            }
        };
        loop {
            match ready.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the kernel programs' log");
                    return;
                }
            }
        }
    }
}

impl AsRawFd for KernelLog {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Passes aya-log's records to `tracing` under [`TARGET`], naming the
/// program's module.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata) -> bool {
        // The programs hold only the levels the daemon logs.
        true
    }

    fn log(&self, record: &log::Record) {
        let program = record.module_path().unwrap_or_default();
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, program, "{message}"),
            log::Level::Warn => tracing::warn!(target: TARGET, program, "{message}"),
            log::Level::Info => tracing::info!(target: TARGET, program, "{message}"),
            log::Level::Debug => tracing::debug!(target: TARGET, program, "{message}"),
            log::Level::Trace => tracing::trace!(target: TARGET, program, "{message}"),
        }
    }

    fn flush(&self) {}
}
