//! Files a policy names (credentials, certificates, keys, CA bundles), read
//! when the policy is, so that a file that cannot be read refuses the
//! policy (and a reload keeps the old one).

use std::fs;

/// The most such a file may hold: a few thousand users, or a system's CA
/// bundle several times over.
const MAX_FILE_LEN: u64 = 1 << 20;

/// A regular file's text, if it is at most [`MAX_FILE_LEN`] bytes: a FIFO
/// or a device must not stall or fill the daemon.
pub fn read_small_file(path: &str) -> Result<String, String> {
    let meta = fs::metadata(path).map_err(|e| format!("reading {path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{path}: not a regular file"));
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(format!("{path}: over {MAX_FILE_LEN} bytes"));
    }
    fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))
}
