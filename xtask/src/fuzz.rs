//! `cargo xtask fuzz [--seconds N]`: runs every fuzz target in fuzz/ for a
//! bounded time each, seeded from the parsers' fixtures. Needs the nightly
//! toolchain (sanitizers) and cargo-fuzz, which it installs when missing.

use std::{fs, process::Command};

use crate::{ebpf, run_command, workspace_root};

const TARGETS: &[(&str, &[&str])] = &[
    ("sniff_tls", &["bin"]),
    ("sniff_http", &["http"]),
    ("proxy_protocol_decode", &[]),
];

pub fn run(seconds: u64) -> anyhow::Result<()> {
    ebpf::build()?;
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !installed {
        run_command(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let root = workspace_root();
    let fixtures = root.join("l4proxy/src/sniff/fixtures");
    for (target, seed_extensions) in TARGETS {
        let corpus = root.join("fuzz/corpus").join(target);
        fs::create_dir_all(&corpus)?;
        for entry in fs::read_dir(&fixtures)?.flatten() {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if seed_extensions.contains(&ext) {
                fs::copy(&path, corpus.join(entry.file_name()))?;
            }
        }
        run_command(
            Command::new("cargo")
                .current_dir(root.join("fuzz"))
                .args(["+nightly", "fuzz", "run", target, "--"])
                .arg(format!("-max_total_time={seconds}"))
                .arg("-max_len=8192"),
        )?;
    }
    Ok(())
}
