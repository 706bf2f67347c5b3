//! Installs what a fresh Debian 12 machine lacks, and nothing that is already there
//! (docs/development.md, "Toolchain", says why these exact pieces).

use std::process::Command;

use crate::run_command;

/// The LLVM major version bpf-linker is built against: the compiler's
/// (Debian's Rust 1.96 uses LLVM 22). One literal, for `concat!`.
macro_rules! llvm_major {
    () => {
        "22"
    };
}

/// Debian packages: Debian's Rust 1.96 with its std source (for -Z build-std),
/// LLVM 22 for bpf-linker, and the real peers and tools the tests use.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    concat!("llvm-", llvm_major!(), "-dev"),
    concat!("libpolly-", llvm_major!(), "-dev"),
    "zlib1g-dev",
    "libzstd-dev",
    // jemalloc, the daemon's allocator, is built from C by its crate with make.
    "make",
    "iproute2",
    "bpftool",
    "curl",
    "openssl",
    // The system CA store: an upstream's `tls` without `ca` trusts it, and
    // tests/policy_check.rs checks such a policy with and without it.
    "ca-certificates",
    "nginx-light",
    // nginx's stream module (a dynamic module in Debian), a peer in the bench.
    "libnginx-mod-stream",
    "haproxy",
    "iperf3",
    "iptables",
    "dnsmasq-base",
    "squid",
    "chromium",
    // Prometheus and promtool: the metrics tests scrape l4proxy with them.
    "prometheus",
    // `cargo xtask package` and tests/deploy.rs: strip, and systemd-analyze
    // to verify the unit (no systemd runs as PID 1 here; it is not needed),
    // which looks up the unit's man pages with man.
    "binutils",
    "systemd",
    "man-db",
    // tests/deploy.rs: every system call the daemon makes, against the
    // unit's SystemCallFilter= and the like.
    "strace",
];

/// The services of the peers' packages, by package: installing one would
/// start it, and enable it at boot, on this host (nginx on port 80, Squid
/// on 3128, …). The tests and the bench start the programs themselves, in
/// their own namespaces.
const SERVICES: &[(&str, &str)] = &[
    ("nginx-light", "nginx"),
    ("haproxy", "haproxy"),
    ("squid", "squid"),
    ("prometheus", "prometheus"),
    ("iperf3", "iperf3"),
];

/// Debian's hook that tells maintainer scripts whether they may start a
/// service: exit 101 is "no".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where bpf-linker's LLVM lives (the packages above).
const LLVM_PREFIX: &str = concat!("/usr/lib/llvm-", llvm_major!());

pub fn run() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing {}", missing.join(" "));
        run_command(Command::new("apt-get").args(["update", "-q"]))?;
        let no_starts = NoServiceStarts::new()?;
        run_command(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        drop(no_starts);
        for (package, unit) in SERVICES {
            if missing.contains(package) {
                // Off at boot too; where no systemd manages the host there
                // is nothing to disable, and nothing said.
                let _ = Command::new("systemctl")
                    .args(["disable", "--quiet", unit])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
    if !bpf_linker_ready() {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about 3 minutes)");
        run_command(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    // Over one of the same version built against another LLVM.
                    "--force",
                    "--locked",
                    "--version",
                    BPF_LINKER_VERSION,
                ])
                .args([
                    "--no-default-features",
                    "--features",
                    concat!("llvm-", llvm_major!()),
                ])
                // Without it bpf-linker's build script cannot find libLLVM.
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }
    Ok(())
}

/// While it lives, packages' maintainer scripts start no service (a
/// `policy-rc.d` that says no, unless the host has one of its own).
struct NoServiceStarts {
    ours: bool,
}

/// The line that marks the `policy-rc.d` as ours: one a killed setup left
/// is ours to remove, the host's own is not.
const OURS: &str = "# cargo xtask setup: no service starts";

impl NoServiceStarts {
    fn new() -> anyhow::Result<NoServiceStarts> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::read_to_string(POLICY_RC_D) {
            Ok(text) if !text.contains(OURS) => return Ok(NoServiceStarts { ours: false }),
            Ok(_) | Err(_) => {}
        }
        std::fs::write(POLICY_RC_D, format!("#!/bin/sh\n{OURS}\nexit 101\n"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
        Ok(NoServiceStarts { ours: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.ours {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// bpf-linker of our version, linked against our LLVM (one built against
/// another LLVM links objects the compiler's LLVM cannot read back).
fn bpf_linker_ready() -> bool {
    let version = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION));
    // The library it needs, as its ELF header names it (whatever the
    // loader would find now).
    let needed = Command::new("sh")
        .args(["-c", "readelf -d \"$(command -v bpf-linker)\""])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    version && needed.contains(concat!("[libLLVM.so.", llvm_major!()))
}
