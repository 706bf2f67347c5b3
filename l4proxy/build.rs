//! Embeds the kernel programs built by `cargo xtask build-ebpf`, and names
//! what was built for `l4proxy --version`.
//!
//! They are built with Debian's rustc and `-Z build-std` for bpfel-unknown-none
//! (docs/development.md, "Toolchain"), which this crate's toolchain cannot do, so the
//! build is a separate step and this script only picks up its output.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let object = manifest.join("../target/ebpf/bpfel-unknown-none/release/l4proxy");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        bail!(
            "the kernel programs are not built yet ({} is missing): run `cargo xtask build-ebpf` first",
            object.display()
        );
    }
    let bytes = fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    let out = PathBuf::from(env::var("OUT_DIR")?).join("l4proxy-ebpf.o");
    fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    // Hashed here, from the very bytes embedded, so the daemon needs no
    // hashing code of its own to say which programs it carries.
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("cargo:rustc-env=L4PROXY_BPF_SHA256={digest}");
    println!("cargo:rustc-env=L4PROXY_COMMIT={}", commit(&manifest));
    println!("cargo:rerun-if-env-changed=L4PROXY_COMMIT");
    Ok(())
}

/// The commit being built: `L4PROXY_COMMIT` if set (a build from a source
/// tarball, e.g. a Debian source package, can name it), else git's HEAD,
/// else "unknown".
fn commit(manifest: &Path) -> String {
    if let Ok(commit) = env::var("L4PROXY_COMMIT") {
        return commit;
    }
    let git = |args: &[&str]| -> Option<String> {
        let output = Command::new("git")
            .current_dir(manifest)
            .args(args)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // Rebuild the version when HEAD moves: HEAD itself changes on a checkout,
    // the branch's ref (loose or packed) on a commit. A file named here that
    // does not exist would make cargo rerun this script on every build.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        // `--git-path` answers for worktrees too, where refs live elsewhere.
        if let Some(file) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
            && Path::new(&file).exists()
        {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    head
}
