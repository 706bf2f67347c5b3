//! The running kernel's version, and the features l4proxy needs of it.

/// Where `sk_lookup` came: Linux 5.9.
pub const SK_LOOKUP: (u32, u32) = (5, 9);
/// Where tcx (the attachment `classify` uses) came: Linux 6.6.
pub const TCX: (u32, u32) = (6, 6);

/// The kernel's release, as `uname -r` prints it (empty if unreadable).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// `6.18.0-1-amd64` → (6, 18).
pub fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    Some((numbers.next()??, numbers.next()??))
}

/// Why a policy that needs the tc program cannot have it on `release`: a
/// kernel older than tcx. `None` when it can, or when the version cannot
/// be read (the attachment then says for itself).
pub fn tcx_missing(release: &str) -> Option<String> {
    let version = version_of(release)?;
    (version < TCX).then(|| {
        format!(
            "Linux {release}: gateway rules and transparent upstream binds attach a tc program \
             with tcx, which needs 6.6 or later; upgrade the kernel"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_read_from_the_release() {
        assert_eq!(version_of("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(version_of("5.10.0"), Some((5, 10)));
        assert_eq!(version_of("six"), None);
    }

    #[test]
    fn tcx_is_missing_before_6_6() {
        assert!(tcx_missing("6.1.0-13-amd64").is_some_and(|why| why.contains("6.1.0-13-amd64")));
        assert!(tcx_missing("5.15.0").is_some());
        assert_eq!(tcx_missing("6.6.0"), None);
        assert_eq!(tcx_missing("6.18.44-fc-v857"), None);
        assert_eq!(tcx_missing("unknown"), None);
    }
}
