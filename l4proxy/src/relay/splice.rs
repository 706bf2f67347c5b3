//! One burst of a direction through a pipe: socket → pipe → socket, so the
//! payload stays in the kernel.

use std::{io, os::fd::AsFd};

use tokio::{io::Interest, net::TcpStream};

use super::{Burst, Counter, Failed, pipe::Pipe};

/// Moves what `src` has queued to `dst` through `pipe`, until `src` has nothing
/// more to read or ends. Each fill is drained completely before the next, so
/// the pipe is empty whenever this returns `Ok`, and a would-block fill always
/// means an empty socket, never a full pipe.
pub(super) async fn burst(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    count: &Counter,
) -> Result<Burst, Failed> {
    loop {
        // A sender that never pauses must not keep this worker to itself.
        tokio::task::consume_budget().await;
        let filled = match src.try_io(Interest::READABLE, || pipe.fill(src.as_fd())) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(Failed::Read(e)),
        };
        let mut left = filled;
        while left > 0 {
            dst.writable().await.map_err(Failed::Write)?;
            match dst.try_io(Interest::WRITABLE, || pipe.drain(dst.as_fd(), left)) {
                // Cannot happen while the pipe holds bytes; never spin on it.
                Ok(0) => return Err(Failed::Write(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    left -= n;
                    count.add(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Failed::Write(e)),
            }
        }
    }
}
