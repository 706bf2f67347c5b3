//! Pipes for splice(2), and a pool of empty ones.
//!
//! Neither std, tokio nor socket2 wraps splice(2) or `F_SETPIPE_SZ`, so
//! both are called through libc, each call with its SAFETY note.
//!
//! A relay direction holds a pipe only while bytes are moving and gives it back
//! empty as soon as its socket has nothing more to read, so an idle connection
//! owns no pipe (as HAProxy does with its pipe pool). The pool turns the
//! `pipe2` + `fcntl` + two `close` calls of a fresh pipe into a mutex push/pop.
//!
//! Pipes cost descriptors, which the connections need: at most [`MAX_PIPES`]
//! exist at once (a burst that finds none copies through a buffer instead),
//! and [`trim`] closes the pooled ones no burst needed since its last call,
//! so a quiet daemon gives their descriptors back.

use std::{
    io::{self, PipeReader, PipeWriter, Read, Write},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::Mutex,
};

use socket2::SockRef;

use super::allowance::Allowance;

/// Capacity asked for each pipe: one splice moves at most this much. In
/// `cargo xtask bench`, one stream went ~15% faster with 256 KiB than with the
/// default 64 KiB, and 1 MiB gained nothing more; larger pipes would also use
/// up root's `fs.pipe-user-pages-soft` budget (64 MiB) after a few dozen busy
/// connections, past which the kernel shrinks every new pipe. Pages are only
/// pinned while data sits in the pipe.
const PIPE_SIZE: usize = 256 * 1024;

/// The most pipes open at once, in use or pooled. Each costs two descriptors
/// (counted in the daemon's descriptor budget) and about 10 KiB of kernel
/// memory (the pipe-buffer ring), whether or not it holds data.
pub const MAX_PIPES: usize = 256;

/// Pipes open now, in use or pooled.
static OPEN: Allowance = Allowance::new(MAX_PIPES);

/// Empty pipes kept for reuse, and the fewest the pool held since the last
/// [`trim`]: that many were not needed.
struct Pool {
    pipes: Vec<Pipe>,
    low: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    pipes: Vec::new(),
    low: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pipe, known to be empty whenever it is outside a relay direction.
#[derive(Debug)]
pub struct Pipe {
    reader: PipeReader,
    writer: PipeWriter,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        if !OPEN.take() {
            return Err(io::Error::other("all pipes in use"));
        }
        let (reader, writer) = io::pipe().inspect_err(|_| OPEN.give_back())?;
        // A pipe keeps its default size when the kernel refuses a larger one
        // (over fs.pipe-max-size or the user's pipe page budget).
        let capacity = set_pipe_size(writer.as_fd(), PIPE_SIZE).unwrap_or(DEFAULT_PIPE_SIZE);
        Ok(Pipe {
            reader,
            writer,
            capacity,
        })
    }

    /// Moves what `socket` has queued, up to the capacity, into the pipe
    /// without blocking. `Ok(0)` is the end of the stream.
    pub fn fill(&self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        splice(socket, self.writer.as_fd(), self.capacity)
    }

    /// Moves what `socket` has queued past TCP's urgent mark into the pipe,
    /// through a buffer: a splice stops at the mark, a read steps over the
    /// urgent byte. `Ok(0)` is the end of the stream. The pipe must be
    /// empty (it is between fills), so the write takes all that was read.
    pub fn fill_past_urgent_mark(&self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        let mut buffer = [0u8; 4096];
        let read = (&*SockRef::from(&socket)).read(&mut buffer)?;
        (&self.writer).write_all(&buffer[..read])?;
        Ok(read)
    }

    /// Moves up to `len` bytes from the pipe to `socket` without blocking.
    pub fn drain(&self, socket: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(self.reader.as_fd(), socket, len)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN.give_back();
    }
}

/// What Linux gives a pipe unless told otherwise (16 pages).
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// An empty pipe from the pool, or a new one while fewer than
/// [`MAX_PIPES`] are open.
pub fn take() -> io::Result<Pipe> {
    let pooled = {
        let mut pool = pool();
        let pipe = pool.pipes.pop();
        pool.low = pool.low.min(pool.pipes.len());
        pipe
    };
    match pooled {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Returns a pipe the caller has emptied to the pool.
pub fn give_back(pipe: Pipe) {
    pool().pipes.push(pipe);
}

/// Closes the pooled pipes that no burst took since the last call; returns
/// how many pipes stay open. The daemon calls it every few seconds.
pub fn trim() -> usize {
    let mut pool = pool();
    let keep = pool.pipes.len() - pool.low;
    let idle: Vec<Pipe> = pool.pipes.drain(keep..).collect();
    pool.low = keep;
    drop(pool);
    // Closed outside the lock: bursts need not wait for the close calls.
    drop(idle);
    OPEN.open()
}

/// `splice(from, to, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)`.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed from live owners for the call; the
    // offset pointers are null, which splice(2) requires for pipes and sockets.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `fcntl(F_SETPIPE_SZ)`; returns the size the kernel actually set (it rounds
/// up to a power-of-two number of pages).
fn set_pipe_size(pipe: BorrowedFd<'_>, size: usize) -> io::Result<usize> {
    let size = libc::c_int::try_from(size).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours;
    // the descriptor is borrowed from a live pipe.
    let set = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    if set < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(set as usize)
    }
}
