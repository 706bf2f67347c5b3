//! Log output through tracing: text for people, JSON lines for machines.
//!
//! Logging never blocks the relay: the threads that log only put each
//! formatted line on a bounded queue, and one writer thread writes the lines
//! to stderr, those that gathered in the last 10 ms in as few writes as the
//! output takes whole ([`batch_limit`]). When
//! stderr does not keep up (a pipe nobody reads, a stalled journald) the
//! queue fills, and further lines are dropped and counted; the next line
//! queued after them is preceded on the queue by a note of how many, which
//! the writer logs in a line of the same format: in their place, after the
//! lines queued before them.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Lines the queue holds: enough for a burst (every connection closing at
/// the end of a grace period logs a line) to wait out a slow reader, while a
/// full queue of lines, each well under 1 KiB, stays a few MiB.
pub const QUEUE_LINES: usize = 4096;

/// How long exit waits for the queued lines: a stuck stderr must not keep a
/// stopping daemon alive.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How much to log (`--log-level`), when `RUST_LOG` does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// The level `init` was given, for [`direct`]'s child.
static LEVEL: std::sync::OnceLock<LogLevel> = std::sync::OnceLock::new();

/// `RUST_LOG`'s filter if it is set (it can name modules), else `level`.
fn filter(level: LogLevel) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.directive()))
}

/// At most one log line per interval for one kind of event, with how many
/// there were since the last line: a flood of events (refused clients)
/// must not become a flood of lines that crowds out the others.
pub struct Throttle {
    every: Duration,
    unlogged: AtomicU64,
    next: std::sync::Mutex<Option<Instant>>,
}

impl Throttle {
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            unlogged: AtomicU64::new(0),
            next: std::sync::Mutex::new(None),
        }
    }

    /// Counts one event; `Some(n)` when a line may go out now, `n` the
    /// events since the last line, this one included.
    pub fn event(&self) -> Option<u64> {
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if next.is_some_and(|next| now < next) {
            return None;
        }
        *next = Some(now + self.every);
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

/// Logs to stderr at `level` unless `RUST_LOG` says otherwise. Lines queue
/// up until [`LogGuard::start_writer`] (the daemon forks its route guard
/// first, while it has a single thread); keep the guard until exit:
/// dropping it writes out what is still queued.
pub fn init(format: LogFormat, level: LogLevel) -> LogGuard {
    let _ = LEVEL.set(level);
    let ansi = io::stderr().is_terminal();
    // A descriptor of its own: the writer thread never holds std's stderr lock.
    let stderr = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .expect("duplicating stderr for the log writer");
    let (queue, guard) = queue(QUEUE_LINES, File::from(stderr), format, ansi);
    subscriber(format, ansi, filter(level), queue).init();
    // Through the queue: the default hook writes to stderr on the
    // panicking thread, which a blocked stderr would stall with every
    // connection of its worker, and in no log format.
    std::panic::set_hook(Box::new(|panic| {
        let payload = panic.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(a value that is not text)");
        let location = panic.location().map(ToString::to_string);
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
            .then(|| backtrace.to_string());
        tracing::error!(
            panic = message,
            location,
            thread = std::thread::current().name(),
            backtrace,
            "panicked"
        );
    }));
    guard
}

/// Logs of a forked child (the route guard) straight to stderr: it has no
/// writer thread, and nothing to stall. For the calling thread, while the
/// returned guard lives.
pub fn direct(format: LogFormat) -> tracing::dispatcher::DefaultGuard {
    let filter = filter(LEVEL.get().copied().unwrap_or(LogLevel::Info));
    let ansi = io::stderr().is_terminal();
    tracing::dispatcher::set_default(&Dispatch::new(subscriber(format, ansi, filter, io::stderr)))
}

/// Held until exit; dropping it waits, at most `FLUSH_TIMEOUT` (2 s), until every
/// line queued before has been written.
#[must_use = "dropping the guard flushes the log: keep it until exit"]
pub struct LogGuard {
    messages: SyncSender<Message>,
    /// The writer thread's work, until it is started.
    writer: Option<Box<dyn FnOnce() + Send>>,
}

impl LogGuard {
    /// Starts the thread that writes the queued lines (once).
    pub fn start_writer(&mut self) {
        if let Some(write) = self.writer.take() {
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(write)
                .expect("starting the log writer thread");
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.start_writer();
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let (done, written) = mpsc::channel();
        let mut message = Message::Flush(done);
        // Not a blocking send: with stderr stuck, the queue stays full.
        loop {
            match self.messages.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// What the writer thread is handed.
enum Message {
    Line(Vec<u8>),
    /// This many lines were dropped here, between the lines before and after.
    Dropped(u64),
    /// Answered once everything queued before it has been written.
    Flush(mpsc::Sender<()>),
}

/// The tracing writer: puts each event's line on the queue, or counts it as
/// dropped when the queue is full.
struct Queue {
    messages: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl Queue {
    fn push(&self, line: &[u8]) {
        // A plain load first: the count is shared by every thread that logs,
        // and is almost always 0.
        if self.dropped.load(Ordering::Relaxed) > 0 {
            let gap = self.dropped.swap(0, Ordering::Relaxed);
            if gap > 0 && self.messages.try_send(Message::Dropped(gap)).is_err() {
                self.dropped.fetch_add(gap + 1, Ordering::Relaxed);
                return;
            }
        }
        if self
            .messages
            .try_send(Message::Line(line.to_vec()))
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> MakeWriter<'a> for Queue {
    type Writer = Queued<'a>;

    fn make_writer(&'a self) -> Queued<'a> {
        Queued(self)
    }
}

/// One event's line, on its way to the queue.
struct Queued<'a>(&'a Queue);

impl Write for Queued<'_> {
    /// The fmt layer writes each event as one `write_all` of one whole line:
    /// taking all of it at once keeps it one queued line.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A queue of `capacity` lines, and the guard holding the writer thread's
/// work: writing them to `out` once started.
fn queue(capacity: usize, out: File, format: LogFormat, ansi: bool) -> (Queue, LogGuard) {
    let (messages, queued) = mpsc::sync_channel(capacity);
    let dropped = Arc::new(AtomicU64::new(0));
    let queue = Queue {
        messages: messages.clone(),
        dropped: dropped.clone(),
    };
    let out = Arc::new(out);
    // The writer thread's own line goes straight to `out`, formatted like the
    // rest (through the queue it would wait behind the lines it is about),
    // whatever RUST_LOG says (the lines it is about were not filtered out).
    let own = Dispatch::new(subscriber(
        format,
        ansi,
        EnvFilter::new("warn"),
        out.clone(),
    ));
    let write = move || {
        let _own = tracing::dispatcher::set_default(&own);
        write_lines(queued, &dropped, &out);
    };
    (
        queue,
        LogGuard {
            messages,
            writer: Some(Box::new(write)),
        },
    )
}

/// [`queue`] with its writer started.
#[cfg(test)]
fn start(capacity: usize, out: File, format: LogFormat, ansi: bool) -> (Queue, LogGuard) {
    let (queue, mut guard) = queue(capacity, out, format, ansi);
    guard.start_writer();
    (queue, guard)
}

/// How long the writer lets lines gather after writing: meanwhile the
/// threads that log queue their lines without waking it (a wake-up per line
/// cost a futex call and a context switch per connection), and a busy
/// daemon's lines go out in a few writes per interval ([`batch_limit`]). A line waits at most
/// this long; after a quiet spell the first is written at once.
const GATHER: Duration = Duration::from_millis(10);

/// The most bytes one write takes (a line longer goes alone), by what the
/// output is: during an upgrade the successor writes to the same stderr,
/// and a longer write could interleave with its lines mid-line. A pipe
/// takes a write whole up to `PIPE_BUF`; a Unix stream socket (journald's)
/// in pieces of some 36 KiB (a socket buffer's page fragments), 32 KiB
/// whole; a file opened for appending (or a terminal) any write.
fn batch_limit(out: &File) -> usize {
    use std::os::unix::fs::FileTypeExt;
    match out.metadata().map(|m| m.file_type()) {
        Ok(kind) if kind.is_fifo() => libc::PIPE_BUF,
        Ok(kind) if kind.is_file() || kind.is_char_device() => 64 * 1024,
        _ => 32 * 1024,
    }
}

/// The writer thread: writes the queued lines to `out`, and where lines
/// were dropped a line saying how many (at the end, for those dropped after
/// the last line queued). Ends when every sender is gone.
fn write_lines(queued: Receiver<Message>, dropped: &AtomicU64, out: &File) {
    let limit = batch_limit(out);
    let mut batch = Vec::with_capacity(limit);
    let tell = |batch: &mut Vec<u8>, count: u64| {
        write_out(batch, out, dropped);
        tracing::warn!(
            dropped = count,
            "log lines dropped: the log output was not keeping up"
        );
    };
    // Blocks only when the queue is empty: the next line wakes it.
    while let Ok(first) = queued.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    if batch.len() + line.len() > limit {
                        write_out(&mut batch, out, dropped);
                    }
                    batch.extend_from_slice(&line);
                }
                Message::Dropped(count) => tell(&mut batch, count),
                Message::Flush(done) => {
                    write_out(&mut batch, out, dropped);
                    let count = dropped.swap(0, Ordering::Relaxed);
                    if count > 0 {
                        tell(&mut batch, count);
                    }
                    _ = done.send(());
                }
            }
            next = queued.try_recv().ok();
        }
        write_out(&mut batch, out, dropped);
        std::thread::sleep(GATHER);
    }
}

/// Writes out and empties `batch`. What does not go out (an error; an
/// output someone made non-blocking that stays full for a second) is
/// counted in `dropped`, by its lines, as lines the queue had no room for.
fn write_out(batch: &mut Vec<u8>, mut out: &File, dropped: &AtomicU64) {
    let mut rest = &batch[..];
    while !rest.is_empty() {
        match out.write(rest) {
            Ok(0) => break,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && writable(out) => {}
            Err(_) => break,
        }
    }
    let lost = rest.iter().filter(|&&b| b == b'\n').count() as u64;
    if lost > 0 {
        dropped.fetch_add(lost, Ordering::Relaxed);
    }
    batch.clear();
}

/// Waits at most a second for `out` to take bytes again.
fn writable(out: &File) -> bool {
    let mut poll = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(out),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call.
    unsafe { libc::poll(&mut poll, 1, 1000) == 1 }
}

/// The fmt subscriber in `format`: one definition for the daemon's lines and
/// the writer thread's own, so that both look alike.
fn subscriber<W>(
    format: LogFormat,
    ansi: bool,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        // Fields at the top level, beside `timestamp`, `level` and
        // `message`: what log shippers index without a mapping.
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, PipeReader, Read};
    use std::os::fd::{AsRawFd, OwnedFd};

    #[test]
    fn a_throttle_lets_one_line_out_per_interval_with_the_count() {
        let throttle = Throttle::new(Duration::from_millis(200));
        assert_eq!(throttle.event(), Some(1), "the first event is logged");
        assert_eq!(throttle.event(), None);
        assert_eq!(throttle.event(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            throttle.event(),
            Some(3),
            "the next line counts the two held back and itself"
        );
    }

    fn pipe() -> (PipeReader, File) {
        let (reader, writer) = io::pipe().unwrap();
        (reader, File::from(OwnedFd::from(writer)))
    }

    /// Bytes waiting in the pipe.
    fn unread(reader: &PipeReader) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer.
        let rc = unsafe { libc::ioctl(reader.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "FIONREAD: {}", io::Error::last_os_error());
        n as usize
    }

    /// A line longer than any pipe's default capacity: the writer is stuck in
    /// it until the test reads.
    fn stuck_line() -> Vec<u8> {
        let mut line = vec![b'x'; 1 << 20];
        line.push(b'\n');
        line
    }

    /// Queues `line`, then waits until the writer thread has started writing
    /// it (so the queue is empty again).
    fn push_and_wait_written(queue: &Queue, reader: &PipeReader, line: &[u8]) {
        queue.push(line);
        let deadline = Instant::now() + Duration::from_secs(5);
        while unread(reader) == 0 {
            assert!(Instant::now() < deadline, "the writer never wrote");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How much one write may take, by the output's kind.
    #[test]
    fn a_write_takes_what_the_output_takes_whole() {
        let (_reader, fifo) = pipe();
        assert_eq!(batch_limit(&fifo), libc::PIPE_BUF);
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(batch_limit(&File::from(OwnedFd::from(socket))), 32 * 1024);
        let file = tempfile_in_tmp();
        assert_eq!(batch_limit(&file), 64 * 1024);
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("l4proxy-log-test-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    /// Each write is whole lines, within the output's limit (a datagram
    /// socket shows each write apart).
    #[test]
    fn writes_are_whole_lines_within_the_limit() {
        const LINES: usize = 2000;
        let (reader, writer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        reader
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let sizes = std::thread::spawn(move || {
            let mut sizes = Vec::new();
            let mut buffer = vec![0u8; 1 << 16];
            while sizes.iter().sum::<usize>() < LINES * 100 {
                let n = reader.recv(&mut buffer).expect("the next write");
                assert_eq!(buffer[n - 1], b'\n', "a write of {n} bytes ends a line");
                sizes.push(n);
            }
            sizes
        });
        let out = File::from(OwnedFd::from(writer));
        let limit = batch_limit(&out);
        let (queue, guard) = start(LINES, out, LogFormat::Text, false);
        let line = [vec![b'x'; 99], vec![b'\n']].concat();
        for _ in 0..LINES {
            queue.push(&line);
        }
        let sizes = sizes.join().unwrap();
        drop(guard);
        assert!(
            sizes.iter().all(|&n| n <= limit),
            "writes of {sizes:?} bytes, more than {limit}"
        );
        assert_eq!(sizes.iter().sum::<usize>(), LINES * 100);
    }

    /// Lines a write could not put out are counted as dropped.
    #[test]
    fn lines_a_failed_write_lost_are_counted() {
        let (reader, writer) = pipe();
        drop(reader);
        // Queued before the writer starts: one batch, one failed write.
        let (queue, mut guard) = queue(64, writer, LogFormat::Text, false);
        for line in ["a\n", "b\n", "c\n"] {
            queue.push(line.as_bytes());
        }
        guard.start_writer();
        let deadline = Instant::now() + Duration::from_secs(5);
        while queue.dropped.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "lost lines not counted");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn full_queue_counts_dropped_lines() {
        let (messages, _queued) = mpsc::sync_channel(2);
        let queue = Queue {
            messages,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        for line in ["a\n", "b\n", "c\n", "d\n", "e\n"] {
            queue.make_writer().write_all(line.as_bytes()).unwrap();
        }
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn each_event_is_one_queued_line() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let (messages, queued) = mpsc::sync_channel(8);
            let queue = Queue {
                messages,
                dropped: Arc::new(AtomicU64::new(0)),
            };
            let events = subscriber(format, false, EnvFilter::new("info"), queue);
            tracing::subscriber::with_default(events, || {
                tracing::info!(
                    client = "198.51.100.2:40000",
                    bytes = 10,
                    "connection closed"
                );
                tracing::warn!("grace period over");
            });
            let lines: Vec<String> = queued
                .try_iter()
                .map(|message| match message {
                    Message::Line(line) => String::from_utf8(line).unwrap(),
                    Message::Flush(_) | Message::Dropped(_) => panic!("only lines were queued"),
                })
                .collect();
            assert_eq!(lines.len(), 2, "{format:?}: {lines:?}");
            for line in &lines {
                assert!(
                    line.ends_with('\n') && line.matches('\n').count() == 1,
                    "{format:?}: not one line: {line:?}"
                );
            }
        }
    }

    /// Fills the queue while the writer is stuck, then lets it write: the
    /// line saying how many were dropped comes where they were, after the
    /// lines queued before them and before the next one queued.
    fn dropped_lines_are_reported(format: LogFormat) -> String {
        let (reader, out) = pipe();
        let (queue, guard) = start(2, out, format, false);
        let stuck = stuck_line();
        push_and_wait_written(&queue, &reader, &stuck);
        for line in ["first\n", "second\n", "lost 1\n", "lost 2\n", "lost 3\n"] {
            queue.push(line.as_bytes());
        }
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 3);

        let (lines, read) = mpsc::channel();
        let reading = std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                lines.send(line.unwrap()).unwrap();
            }
        });
        let next = || read.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(next().len(), stuck.len() - 1);
        assert_eq!([next(), next()], ["first", "second"], "{format:?}");
        queue.push(b"after\n");
        let notice = next();
        assert_eq!(next(), "after", "{format:?}");
        drop(guard);
        drop(queue);
        reading.join().unwrap();
        assert_eq!(read.try_iter().count(), 0, "{format:?}: one notice");
        notice
    }

    /// Lines dropped after the last one queued are told of at exit, after
    /// the lines queued before them.
    #[test]
    fn lines_dropped_last_are_told_at_exit() {
        let (reader, out) = pipe();
        let (queue, guard) = start(2, out, LogFormat::Text, false);
        let stuck = stuck_line();
        push_and_wait_written(&queue, &reader, &stuck);
        for line in ["first\n", "second\n", "lost 1\n", "lost 2\n"] {
            queue.push(line.as_bytes());
        }
        // Read only now: the writer was stuck in the long line throughout.
        let reading = std::thread::spawn(move || {
            let mut all = String::new();
            BufReader::new(reader).read_to_string(&mut all).unwrap();
            all
        });
        drop(guard);
        drop(queue);
        let all = reading.join().unwrap();
        let lines: Vec<&str> = all.lines().skip(1).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[..2], ["first", "second"]);
        assert!(
            lines[2].contains("log lines dropped") && lines[2].ends_with("dropped=2"),
            "{lines:?}"
        );
    }

    #[test]
    fn dropped_lines_are_reported_in_json() {
        let notice = dropped_lines_are_reported(LogFormat::Json);
        let event: serde_json::Value = serde_json::from_str(&notice)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {notice}"));
        assert_eq!(event["level"], "WARN", "{notice}");
        assert_eq!(event["dropped"], 3, "{notice}");
        assert_eq!(
            event["message"],
            "log lines dropped: the log output was not keeping up"
        );
        assert!(event["timestamp"].is_string(), "{notice}");
    }

    #[test]
    fn dropped_lines_are_reported_in_text() {
        let notice = dropped_lines_are_reported(LogFormat::Text);
        assert!(
            notice.contains(" WARN ")
                && notice.contains("log lines dropped: the log output was not keeping up")
                && notice.ends_with("dropped=3"),
            "{notice}"
        );
    }

    #[test]
    fn exit_writes_out_queued_lines() {
        let (mut reader, out) = pipe();
        let (queue, guard) = start(4, out, LogFormat::Text, false);
        let stuck = stuck_line();
        push_and_wait_written(&queue, &reader, &stuck);
        queue.push(b"queued\n");
        let flushing = std::thread::spawn(move || drop(guard));
        let mut first = vec![0; stuck.len()];
        reader.read_exact(&mut first).unwrap();
        flushing.join().unwrap();
        // Everything the flush waited for is in the pipe now.
        let mut rest = vec![0; unread(&reader)];
        reader.read_exact(&mut rest).unwrap();
        assert_eq!(rest, b"queued\n");
        drop(queue);
    }

    #[test]
    fn exit_gives_up_on_a_stuck_output() {
        let (reader, out) = pipe();
        let (queue, guard) = start(4, out, LogFormat::Text, false);
        push_and_wait_written(&queue, &reader, &stuck_line());
        queue.push(b"never written\n");
        let started = Instant::now();
        drop(guard);
        let waited = started.elapsed();
        assert!(
            waited >= FLUSH_TIMEOUT && waited < FLUSH_TIMEOUT + Duration::from_secs(1),
            "exit waited {waited:?} for a stuck output"
        );
        // The writer's write fails once nobody can read: its thread ends.
        drop(reader);
        drop(queue);
    }
}
