//! The connection path: one worker thread per core, each a current-thread
//! tokio runtime that accepts connections and serves them to the end.
//!
//! Design. `run` starts N workers (N = the cores this process may run on,
//! or `--workers`). Each has its own steered listener per family; all of a
//! family's listeners are bound to the same loopback address and port with
//! `SO_REUSEPORT`, so they form one reuseport group. The socket map holds
//! one member per family: `steer`'s `bpf_sk_assign` of a reuseport member
//! makes the kernel pick within its group (by a hash of the 4-tuple), so
//! steered connections are spread over the workers' accept queues without
//! any program of ours choosing. A connection lives and dies on the thread
//! that accepted it: its task, timers, name look-ups (`spawn_blocking` on
//! that runtime's pool) and I/O registrations stay there, with no
//! cross-thread wake-up and no work stealing.
//!
//! A member of a group that closes takes the connections queued on it but
//! not accepted with it (no `tcp_migrate_req`), and, if it is the one in the
//! socket map, the map entry too. So no listener closes while the daemon
//! serves: they all stay open until the daemon exits (it drains first, with
//! `steer` no longer assigning). A takeover hands every member to the
//! successor (the same sockets, queues and all); a successor with fewer
//! workers accepts on several per worker, one with more binds its own into
//! the same group (the predecessor's sockets must have `SO_REUSEPORT`).
//!
//! A CONNECT address has a reuseport group of its own, one listener per
//! worker (`explicit`), so a client wakes only the worker whose listener the
//! kernel picked (one socket accepted on by every worker woke them all, and
//! all but one found the queue empty). On a public address a group could be
//! joined by another socket: the kernel allows that only to sockets of the
//! same user, and the listeners bound at start-up are root's; those a reload
//! binds after `--user` are that user's, which should run nothing else. A
//! predecessor's single CONNECT socket (from a daemon before groups) cannot
//! be joined: every worker accepts on it, as before.
//!
//! The control plane (signals, control socket, admin, reloads, settling,
//! health checks) runs on the main thread's runtime. What the workers share
//! is `Arc`ed and thread-safe: the policy in force, metrics, admission, the
//! global connection limit (one atomic count), the task tracker that drain
//! waits on, and the stop tokens. What a connection looks at on every
//! wake-up is the worker's own: its relay waits for the end of the grace
//! period on a child token of its accept loop, so the locks of that wait
//! are not passed between the cores.

use std::{
    io,
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How long a stopping worker waits for its blocking tasks (name look-ups,
/// password checks) before its thread exits anyway.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// How far ahead a worker always has a timer due (see [`keep_a_timer_near`]).
const NEAR: Duration = Duration::from_millis(500);

/// Ticks every [`NEAR`], for nothing but being due. tokio's timer wakes its
/// own thread (an eventfd write, and an epoll wake-up) whenever a timer is
/// set that is due before every timer it holds: on a worker whose timers
/// were all minutes away (idle deadlines) or none, every connection's
/// connect deadline, seconds away, cost that write. With a timer always
/// due within half a second, deadlines of a second or more never do; the
/// price is two wake-ups a second of an idle worker.
async fn keep_a_timer_near() -> std::convert::Infallible {
    let mut tick = tokio::time::interval(NEAR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// The worker threads, running until [`Workers::stop`].
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    /// Connections each worker accepted.
    accepted: Vec<Counter>,
    exit: CancellationToken,
}

/// How many workers when `--workers` is not given: the cores this process
/// may run on (its affinity and CPU quota), at least one.
pub fn default_count() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

impl Workers {
    /// Starts `count` workers, each with its runtime running.
    pub fn start(count: NonZeroUsize) -> io::Result<Workers> {
        let exit = CancellationToken::new();
        let mut handles = Vec::with_capacity(count.get());
        let mut threads = Vec::with_capacity(count.get());
        for index in 0..count.get() {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let exit = exit.clone();
            let thread = std::thread::Builder::new()
                .name(format!("l4proxy-w{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        tokio::select! {
                            () = exit.cancelled() => {}
                            never = keep_a_timer_near() => match never {},
                        }
                    });
                    runtime.shutdown_timeout(BLOCKING_GRACE);
                })?;
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended at its start"))??;
            handles.push(handle);
            threads.push(thread);
        }
        Ok(Workers {
            handles,
            threads,
            accepted: (0..count.get()).map(|_| Counter::default()).collect(),
            exit,
        })
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Worker `index`'s runtime, to spawn its accept loops on.
    pub fn handle(&self, index: usize) -> &Handle {
        &self.handles[index % self.handles.len()]
    }

    /// Worker `index`'s count of accepted connections.
    pub fn counter(&self, index: usize) -> Counter {
        self.accepted[index % self.accepted.len()].clone()
    }

    /// Connections each worker accepted so far, by worker.
    pub fn accepted(&self) -> Vec<u64> {
        self.accepted
            .iter()
            .map(|counter| counter.0.0.load(Ordering::Relaxed))
            .collect()
    }

    /// Ends every worker's runtime (tasks still there are dropped) and
    /// waits for their threads.
    pub fn stop(self) {
        self.exit.cancel();
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

/// One worker's count of accepted connections.
#[derive(Clone, Default)]
pub struct Counter(Arc<Padded>);

/// A cache line of its own: workers count without sharing one.
#[derive(Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

impl Counter {
    pub fn add(&self) {
        self.0.0.fetch_add(1, Ordering::Relaxed);
    }
}
