//! `cargo xtask demo`: builds everything and runs demo/demo.sh, which shows
//! l4proxy steering and relaying connections in a namespace lab.

use std::process::Command;

use crate::{ebpf, run_command, setup, workspace_root};

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    ebpf::build()?;
    let root = workspace_root();
    run_command(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--locked",
        "--package",
        "l4proxy",
    ]))?;
    run_command(
        Command::new("bash")
            .current_dir(&root)
            .arg("demo/demo.sh")
            .arg("target/release/l4proxy")
            .arg("examples/demo.json"),
    )
}
