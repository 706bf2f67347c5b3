//! The man pages and shell completions, generated from the command line's
//! definition (clap_mangen, clap_complete) so they never drift from it.
//! A package build runs `l4proxy manual --out DIR`, with the very binary it
//! packages. That command is not part of [`Cli`]: the pages and completions
//! it writes do not list it, and the daemon's own paths never reach it.

use std::{
    ffi::OsStr,
    fs::File,
    io,
    path::{Path, PathBuf},
};

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use crate::cli::Cli;

/// `l4proxy manual --out DIR`, a command line of its own.
#[derive(Parser)]
#[command(name = "l4proxy")]
struct ManualCli {
    #[command(subcommand)]
    command: ManualCommand,
}

#[derive(Subcommand)]
enum ManualCommand {
    /// Write the man pages and shell completions (for packaging).
    Manual {
        /// Directory to write `man8/` and `completions/` into.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where to write, when this process was started as `l4proxy manual`;
/// every other command line is [`Cli`]'s.
pub fn requested() -> Option<PathBuf> {
    if std::env::args_os().nth(1).as_deref() != Some(OsStr::new("manual")) {
        return None;
    }
    let ManualCli {
        command: ManualCommand::Manual { out },
    } = ManualCli::parse();
    Some(out)
}

/// Section 8: system administration commands (the binary is in /usr/sbin).
const SECTION: &str = "8";

/// The shells completed, with the file name each one's completion
/// directory expects.
pub const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "l4proxy"),
    (Shell::Zsh, "_l4proxy"),
    (Shell::Fish, "l4proxy.fish"),
];

/// Writes `out/man8/l4proxy.8` and one page per subcommand
/// (`l4proxy-run.8`, ...), and `out/completions/` for each shell of
/// [`COMPLETIONS`].
pub fn write(out: &Path) -> io::Result<()> {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let pages = out.join(format!("man{SECTION}"));
    std::fs::create_dir_all(&pages)?;
    write_pages(&command, &pages)?;
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in COMPLETIONS {
        let mut file = File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut command, "l4proxy", &mut file);
    }
    Ok(())
}

/// A page for `command` and each visible subcommand, recursively.
fn write_pages(command: &clap::Command, dir: &Path) -> io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir)?;
    }
    clap_mangen::Man::new(command.clone())
        .section(SECTION)
        .manual("l4proxy")
        .generate_to(dir)?;
    Ok(())
}
