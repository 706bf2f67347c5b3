//! What the kernel's `TCP_INFO` says of a socket, for tests that count
//! what TCP did (segments received, segments not yet acknowledged).

use std::{io, os::fd::AsRawFd};

/// `TCP_INFO` of `socket`.
pub fn of(socket: &impl AsRawFd) -> libc::tcp_info {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // zeroed, so every field is initialised whatever the kernel fills.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
    // SAFETY: zeroed above, partly overwritten by the kernel.
    unsafe { info.assume_init() }
}
