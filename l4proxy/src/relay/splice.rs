//! One burst of a direction through a pipe: socket → pipe → socket, so the
//! payload stays in the kernel.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

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
    let mut first = true;
    loop {
        // A sender that never pauses must not keep this worker to itself.
        tokio::task::consume_budget().await;
        let filled = src.try_io(Interest::READABLE, || {
            let filled = pipe.fill(src.as_fd());
            // A splice stops at TCP's urgent mark as if the socket had run
            // dry, or ended once the peer's FIN is queued behind it; a read
            // steps over the urgent byte (a receiver of the direct
            // connection that does not ask for urgent data skips it too).
            // Looked for where bytes would be lost or wait for nothing: at
            // an end, and when a burst its socket's readiness began finds
            // nothing at once. Here, inside the readiness check: once a
            // fill has cleared the readiness, tokio reads no more.
            let ended = matches!(filled, Ok(0));
            let dry = matches!(&filled, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            if (ended || (dry && first)) && at_urgent_mark(src) {
                return pipe.fill_past_urgent_mark(src.as_fd());
            }
            filled
        });
        first = false;
        let filled = match filled {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(Failed::Read(e)),
        };
        let mut left = filled;
        while left > 0 {
            super::writable(dst, Some(src)).await?;
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

/// Linux's `SIOCATMARK` (asm-generic/sockios.h), which the libc crate lacks.
const SIOCATMARK: libc::Ioctl = 0x8905;

/// Whether `src`'s next byte is TCP urgent data (sent with `MSG_OOB`).
fn at_urgent_mark(src: &TcpStream) -> bool {
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int through the pointer.
    let done = unsafe { libc::ioctl(src.as_raw_fd(), SIOCATMARK, &mut at) };
    done == 0 && at != 0
}
