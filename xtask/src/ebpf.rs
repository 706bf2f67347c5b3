//! Builds l4proxy-ebpf for bpfel-unknown-none.
//!
//! rustup's toolchains here have no `rust-src`, so `-Z build-std=core` uses
//! Debian's rustc-web (1.96, LLVM 22) and its library source, with
//! RUSTC_BOOTSTRAP for the unstable flag. Output:
//! target/ebpf/bpfel-unknown-none/release/l4proxy, picked up by l4proxy/build.rs.

use std::process::Command;

use crate::{run_command, workspace_root};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

pub fn build() -> anyhow::Result<()> {
    let root = workspace_root();
    run_command(
        Command::new("cargo")
            .current_dir(root.join("l4proxy-ebpf"))
            .args(["build", "--release", "--locked", "-Z", "build-std=core"])
            .args(["--target", "bpfel-unknown-none"])
            .env("RUSTC", DEBIAN_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", root.join("target/ebpf"))
            // rustup's proxies would otherwise pick their own rustc for build scripts.
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC_WRAPPER"),
    )
}
