//! Developer tasks: `cargo xtask <task>`. Each task installs what it needs first.

mod bench;
mod demo;
mod ebpf;
mod fuzz;
mod package;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "l4proxy developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and tools the project needs (Debian packages, bpf-linker).
    Setup,
    /// Build the kernel programs (l4proxy-ebpf) that the l4proxy binary embeds.
    BuildEbpf,
    /// Build everything and show l4proxy at work in a network-namespace lab.
    Demo,
    Bench(bench::Args),
    /// Run every fuzz target for a bounded time (nightly + cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Build the release binary (and the kernel programs it embeds) and
    /// package it: target/package/l4proxy_<version>_<arch>.deb.
    Package(package::Args),
    /// Everything CI checks: set-up, build, fmt, clippy, unit and integration tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => setup::run().and_then(|()| ebpf::build()),
        Task::Demo => demo::run(),
        Task::Fuzz { seconds } => setup::run().and_then(|()| fuzz::run(seconds)),
        Task::Bench(args) => {
            // The load generators share the machine with what they measure:
            // a debug build of them would take CPU from the proxies and
            // squeeze every ratio towards 1. Benches run optimised.
            if cfg!(debug_assertions) {
                return rerun_optimised();
            }
            bench::run(&args)
        }
        Task::Package(args) => setup::run().and_then(|()| package::run(&args)),
        Task::Test { cargo_test_args } => test::run(&cargo_test_args),
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs this same command line again from an optimised build of xtask.
fn rerun_optimised() -> anyhow::Result<()> {
    eprintln!("xtask: the bench runs from an optimised build of xtask");
    run_command(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args([
                "run",
                "--quiet",
                "--release",
                "--locked",
                "--package",
                "xtask",
                "--",
            ])
            .args(std::env::args_os().skip(1)),
    )
}

/// Builds the release daemon (and the kernel programs it embeds); returns its path.
fn build_release_daemon(root: &Path) -> anyhow::Result<PathBuf> {
    ebpf::build()?;
    run_command(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--locked",
        "--package",
        "l4proxy",
    ]))?;
    Ok(root.join("target/release/l4proxy"))
}

/// Runs a command to completion and fails with its command line if it fails.
fn run_command(command: &mut Command) -> anyhow::Result<()> {
    let description = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("starting {description}"))?;
    if !status.success() {
        bail!("{description} failed with {status}");
    }
    Ok(())
}
