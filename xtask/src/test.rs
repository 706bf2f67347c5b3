//! `cargo xtask test`: what CI runs, from a fresh machine to a verdict.

use std::process::Command;

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
    run_command(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    run_command(
        cargo()
            .args(["test", "--workspace", "--locked", "--"])
            .args(cargo_test_args),
    )?;
    Ok(())
}
