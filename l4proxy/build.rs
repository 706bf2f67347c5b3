//! Embeds the kernel programs built by `cargo xtask build-ebpf`.
//!
//! They are built with Debian's rustc and `-Z build-std` for bpfel-unknown-none
//! (docs/development.md, "Toolchain"), which this crate's toolchain cannot do, so the
//! build is a separate step and this script only picks up its output.

use std::{env, fs, path::PathBuf};

use anyhow::{Context, bail};

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
    let out = PathBuf::from(env::var("OUT_DIR")?).join("l4proxy-ebpf.o");
    fs::copy(&object, &out).with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
