//! `cargo xtask test`: what CI runs, from a fresh machine to a verdict.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::{ebpf, run_command, setup, workspace_root};

pub fn run(cargo_test_args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    ebpf::build()?;
    let root = workspace_root();
    let cargo = || {
        let mut command = Command::new("cargo");
        command.current_dir(&root);
        command
    };
    run_command(cargo().args(["fmt", "--all", "--check"]))?;
    // The fuzz targets are a workspace of their own (nightly builds them):
    // their formatting is checked here all the same.
    run_command(cargo().args(["fmt", "--check", "--manifest-path", "fuzz/Cargo.toml"]))?;
    run_command(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The takeover tests hand over to a second build of the daemon: the
    // same source built again, apart, under another commit name.
    run_command(cargo().env("L4PROXY_COMMIT", "second-build").args([
        "build",
        "--locked",
        "--profile",
        "second-build",
        "-p",
        "l4proxy",
        "--bin",
        "l4proxy",
    ]))?;
    let mut test = cargo();
    test.env(
        "L4PROXY_SECOND_BUILD",
        root.join("target/second-build/l4proxy"),
    )
    .args(["test", "--workspace", "--locked", "--"])
    .args(cargo_test_args);
    let totals = run_counting(&mut test)?;
    // cargo prints one `test result` line per test binary, the last often a
    // crate with no tests; one total line tells a reader (and CI) what ran.
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

/// Runs `cargo test`, passing its output through, and adds up its
/// `test result: ok. N passed; M failed; ...` lines.
fn run_counting(command: &mut Command) -> anyhow::Result<Totals> {
    let description = format!("{command:?}");
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {description}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut totals = Totals::default();
    // Bytes, not text: a test may print what is not UTF-8, and the run
    // must be read (and its process reaped) to its end whatever it prints.
    for line in BufReader::new(stdout).split(b'\n') {
        let line = match line {
            Ok(line) => String::from_utf8_lossy(&line).into_owned(),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e).context("reading cargo test output");
            }
        };
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            totals.passed += count(result, " passed");
            totals.failed += count(result, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("tests: {} passed, {} failed", totals.passed, totals.failed);
        bail!("{description} failed with {status}");
    }
    Ok(totals)
}

/// The number before `what` in "ok. 40 passed; 0 failed; ...".
fn count(result: &str, what: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| part.trim().strip_suffix(what))
        .and_then(|n| n.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
