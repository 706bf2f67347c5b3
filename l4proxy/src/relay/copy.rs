//! Copying through a user-space buffer: the first read of each burst (small
//! messages cost less copied than spliced, as HAProxy's `splice-auto` finds),
//! and a whole burst when no pipe can be had (out of descriptors).

use std::{
    cell::RefCell,
    io,
    task::{Context, Poll, Waker},
};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};

use super::{Burst, Counter, Failed};

/// The most a burst's first read takes; a read that fills it means more is
/// queued, and the rest of the burst is spliced.
pub(super) const FIRST_READ: usize = 16 * 1024;

thread_local! {
    /// One buffer per thread for first reads: it is only held while the read
    /// and a non-blocking write run, never across an await, so no connection
    /// owns it.
    static FIRST: RefCell<Vec<u8>> = RefCell::new(vec![0; FIRST_READ]);
}

/// How a burst's first read ended.
pub(super) enum First {
    /// Read this much and wrote all of it; `Some(rest)` when `dst` could not
    /// take everything at once, and the caller must write the rest. A read
    /// that filled the buffer means more is probably queued.
    Read { read: usize, rest: Option<Vec<u8>> },
    /// The source had nothing queued.
    Drained,
    /// The source finished sending.
    Eof,
}

/// Reads once into the thread's buffer and writes what came to `dst`
/// without waiting; what `dst` cannot take at once is copied out for the
/// caller. Never waits itself, so it adds nothing to the direction's future.
pub(super) fn first_read(
    src: &TcpStream,
    dst: &TcpStream,
    count: &Counter,
) -> Result<First, Failed> {
    FIRST.with_borrow_mut(|buffer| {
        let read = match read_once(src, buffer) {
            Ok(0) => return Ok(First::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(First::Drained),
            Err(e) => return Err(Failed::Read(e)),
        };
        let end_follows = read < buffer.len() && end_seen(src);
        let written = match try_send(dst, &buffer[..read], end_follows) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(Failed::Write(e)),
        };
        count.add(written);
        Ok(First::Read {
            read,
            rest: (written < read).then(|| buffer[written..read].to_vec()),
        })
    })
}

/// One read from `src`. A read that did not fill `buffer` took everything
/// queued, so the socket is marked not readable, as a read finding nothing
/// would mark it: the next wait is for new data, not a read that finds none
/// (one system call less per message). Data arriving after the read raises
/// a new readiness event (the reactor is edge-triggered), and tokio never
/// clears an end of stream seen with it.
fn read_once(src: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    let mut read = 0;
    match src.try_io(Interest::READABLE, || {
        read = src.try_read(buffer)?;
        if read > 0 && read < buffer.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    }) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => Ok(read),
        Ok(()) => Ok(read),
        Err(e) => Err(e),
    }
}

/// Whether the end of `src`'s stream has been seen, without waiting: after
/// a read that took everything queued, the next read will find the end.
fn end_seen(src: &TcpStream) -> bool {
    let ready = std::pin::pin!(src.ready(Interest::READABLE));
    matches!(
        ready.poll(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(Ok(ready)) if ready.is_read_closed()
    )
}

/// Writes what `dst` takes without waiting. When the source's end follows
/// (`end_follows`), the half-close comes right after: `MSG_MORE` holds the
/// data back so that the FIN leaves in the same segment (a server's last
/// reply and its close reach the client as one packet, not two).
fn try_send(dst: &TcpStream, data: &[u8], end_follows: bool) -> io::Result<usize> {
    if !end_follows {
        return dst.try_write(data);
    }
    dst.try_io(Interest::WRITABLE, || {
        SockRef::from(dst).send_with_flags(data, libc::MSG_MORE | libc::MSG_NOSIGNAL)
    })
}

/// Writes all of `data`, waiting for `dst` as needed. (tokio writes only
/// through an owned or split `TcpStream`; the relay holds shared ones.)
pub async fn write_all(dst: &TcpStream, data: &[u8]) -> io::Result<()> {
    write_counted(None, dst, data, &Counter::default())
        .await
        .map_err(|(Failed::Read(e) | Failed::Write(e))| e)
}

/// [`write_all`] for a relay direction from `src`: what was written is
/// counted also when it fails, and a reset of `src` while `dst` takes
/// nothing ends it ([`super::writable`]).
pub(super) async fn write_counted(
    src: Option<&TcpStream>,
    dst: &TcpStream,
    data: &[u8],
    count: &Counter,
) -> Result<(), Failed> {
    let mut sent = 0;
    while sent < data.len() {
        super::writable(dst, src).await?;
        match dst.try_write(&data[sent..]) {
            Ok(n) => {
                sent += n;
                count.add(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Failed::Write(e)),
        }
    }
    Ok(())
}

/// Allocated per burst and freed when the socket runs dry, so an idle
/// connection holds no buffer.
const BUFFER_SIZE: usize = 16 * 1024;

/// Moves what `src` has queued to `dst`, until `src` has nothing more to read
/// or ends; everything read has been written when this returns `Ok`.
pub(super) async fn burst(
    src: &TcpStream,
    dst: &TcpStream,
    count: &Counter,
) -> Result<Burst, Failed> {
    let mut buffer = vec![0u8; BUFFER_SIZE];
    loop {
        // A sender that never pauses must not keep this worker to itself.
        tokio::task::consume_budget().await;
        let read = match src.try_read(&mut buffer) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(Failed::Read(e)),
        };
        write_counted(Some(src), dst, &buffer[..read], count).await?;
    }
}
