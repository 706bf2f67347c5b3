//! One burst of a direction through a user-space buffer: the fallback when no
//! pipe can be had (out of descriptors).

use std::io;

use tokio::net::TcpStream;

use super::{Burst, Failed};

/// Allocated per burst and freed when the socket runs dry, so an idle
/// connection holds no buffer.
const BUFFER_SIZE: usize = 16 * 1024;

/// Moves what `src` has queued to `dst`, until `src` has nothing more to read
/// or ends; everything read has been written when this returns `Ok`.
pub(super) async fn burst(
    src: &TcpStream,
    dst: &TcpStream,
    count: &mut u64,
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
        let mut sent = 0;
        while sent < read {
            dst.writable().await.map_err(Failed::Write)?;
            match dst.try_write(&buffer[sent..read]) {
                Ok(n) => {
                    sent += n;
                    *count += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Failed::Write(e)),
            }
        }
    }
}
