//! The daemon's allocator: jemalloc, and when its unused pages go back to
//! the kernel.
//!
//! jemalloc instead of glibc's malloc: tokio's tasks and socket
//! registrations are cache-line aligned, and glibc carves each aligned
//! block out of a larger one and leaves the rest as fragments; jemalloc's
//! size classes are aligned as they are (idle connections: 1.9 KiB each
//! instead of 2.3).
//!
//! Pages freed on the connection path are kept for a second and reused
//! (`dirty_decay_ms:1000`): giving each back at once (`madvise`, with a
//! TLB flush on every core the daemon runs on) cost about a tenth of the
//! CPU per short connection at 64 concurrent clients. jemalloc only ages
//! pages when it is called, so the control plane also asks it every few
//! seconds ([`give_back_unused`]), which returns what an idle daemon holds
//! after a burst, and gives back everything unused after start-up and each
//! reload ([`give_back_all`]), whose peaks would otherwise stay until then.

use std::ffi::CStr;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts. Muzzy pages (`MADV_FREE`) stay
/// in the RSS until the kernel needs them, so none are kept.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf = MallocConf(c"dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc reads once: `const char *malloc_conf`.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points at a string literal, never written.
unsafe impl Sync for MallocConf {}

/// Gives back the unused pages older than the decay time, in every arena.
pub fn give_back_unused() {
    arenas_call(c"arena.4096.decay");
}

/// Gives back every unused page, in every arena.
pub fn give_back_all() {
    arenas_call(c"arena.4096.purge");
}

/// Runs one of jemalloc's argument-less controls (4096 is
/// `MALLCTL_ARENAS_ALL`). They do not fail on a running allocator; if one
/// did, the pages would stay until jemalloc's own decay.
fn arenas_call(name: &CStr) {
    let status = control(name);
    if status != 0 {
        tracing::debug!(control = ?name, status, "jemalloc control failed");
    }
}

/// `mallctl(name)` with nothing read or written; its status.
fn control(name: &CStr) -> std::ffi::c_int {
    // SAFETY: a NUL-terminated control name; the controls named here take
    // and return nothing, so every other argument is null.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controls_exist() {
        for name in [c"arena.4096.decay", c"arena.4096.purge"] {
            assert_eq!(control(name), 0, "{name:?}");
        }
        assert_ne!(control(c"arena.4096.no_such_control"), 0);
    }
}
