//! `cargo xtask demo`: builds everything and runs demo/demo.sh, which shows
//! l4proxy steering and relaying connections in a namespace lab.

use std::process::Command;

use crate::{build_release_daemon, run_command, setup, workspace_root};

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    let root = workspace_root();
    let daemon = build_release_daemon(&root)?;
    run_command(
        Command::new("bash")
            .current_dir(&root)
            .arg("demo/demo.sh")
            .arg(daemon)
            .arg("examples/demo.json")
            .arg("examples/demo-gateway.json")
            .arg("examples/demo-bridged.json"),
    )
}
