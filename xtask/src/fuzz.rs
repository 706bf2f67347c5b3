//! `cargo xtask fuzz [--seconds N]`: runs every fuzz target in fuzz/ for a
//! bounded time each, seeded from the parsers' fixtures and the example
//! policies. Needs the nightly toolchain (sanitizers) and cargo-fuzz, which
//! it installs when missing.

use std::{fs, process::Command};

use crate::{ebpf, run_command, workspace_root};

const SNIFF_FIXTURES: &str = "l4proxy/src/sniff/fixtures";

/// Each target and its seeds: the files of a folder (from the workspace
/// root) with an extension.
const TARGETS: &[(&str, &[(&str, &str)])] = &[
    ("sniff_tls", &[(SNIFF_FIXTURES, "bin")]),
    ("sniff_http", &[(SNIFF_FIXTURES, "http")]),
    ("proxy_protocol_decode", &[]),
    (
        "policy_from_json",
        &[("examples", "json"), ("tests/policies", "json")],
    ),
    (
        "connect_head",
        &[("l4proxy/src/connect_head/fixtures", "bin")],
    ),
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
    for (target, seeds) in TARGETS {
        let corpus = root.join("fuzz/corpus").join(target);
        fs::create_dir_all(&corpus)?;
        for (folder, extension) in *seeds {
            for entry in fs::read_dir(root.join(folder))?.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) == Some(*extension) {
                    fs::copy(&path, corpus.join(entry.file_name()))?;
                }
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
