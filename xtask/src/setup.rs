//! Installs what a fresh Debian 12 machine lacks, and nothing that is already there
//! (docs/development.md, "Toolchain", says why these exact pieces).

use std::process::Command;

use crate::run_command;

/// Debian packages: Debian's Rust 1.96 with its std source (for -Z build-std),
/// LLVM 22 for bpf-linker, and the real peers and tools the tests use.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
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

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing {}", missing.join(" "));
        run_command(Command::new("apt-get").args(["update", "-q"]))?;
        run_command(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if !bpf_linker_ready() {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about 3 minutes)");
        run_command(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--version",
                    BPF_LINKER_VERSION,
                ])
                .args(["--no-default-features", "--features", "llvm-22"])
                // Without it bpf-linker's build script cannot find libLLVM.
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn bpf_linker_ready() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
}
