//! `cargo xtask package`: a .deb for operators who do not build eBPF.
//!
//! `target/package/l4proxy_<version>_<arch>.deb` holds the binary (with the
//! kernel programs embedded), the systemd unit, a default policy (a
//! conffile), the man pages and completions the binary generates from its
//! own command line (`l4proxy manual`), and the copyright, docs and example
//! policies. Built
//! with `dpkg-deb` from a staging tree; the service is not enabled on
//! install (the policy comes first), and an upgrade of a running service
//! hands over to the new binary with `l4proxy upgrade` (dist/postinst).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{build_release_daemon, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Package this binary instead of building the release one (e.g. the
    /// debug build, for a quick check); its man pages and completions come
    /// from it too.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Directory for the .deb (and its staging tree).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A file of the package: where it goes, and its mode.
struct Entry<'a> {
    from: &'a Path,
    to: &'a str,
    mode: u32,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let root = workspace_root();
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => build_release_daemon(&root)?,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/package"));
    let deb = build(&root, &binary, &out)?;
    println!("{}", deb.display());
    Ok(())
}

/// Stages the package's tree under `out` and builds the .deb; returns its
/// path.
fn build(root: &Path, binary: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let version = version(binary)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let name = format!("l4proxy_{version}_{arch}");
    let stage = out.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let dist = root.join("dist");
    let files = [
        Entry {
            from: &dist.join("l4proxy.service"),
            to: "lib/systemd/system/l4proxy.service",
            mode: 0o644,
        },
        Entry {
            from: &dist.join("policy.json"),
            to: "etc/l4proxy/policy.json",
            // A policy may hold a parent proxy's password.
            mode: 0o640,
        },
        Entry {
            from: &dist.join("copyright"),
            to: "usr/share/doc/l4proxy/copyright",
            mode: 0o644,
        },
        Entry {
            from: &root.join("README.md"),
            to: "usr/share/doc/l4proxy/README.md",
            mode: 0o644,
        },
    ];
    for entry in &files {
        install(entry.from, &stage.join(entry.to), entry.mode)?;
    }
    // The docs and examples the README and policy.md point to, in the
    // source tree's layout, so that their relative links hold.
    let doc = stage.join("usr/share/doc/l4proxy");
    for dir in ["docs", "examples"] {
        for entry in fs::read_dir(root.join(dir))? {
            let from = entry?.path();
            let name = from.file_name().context("a file name")?;
            install(&from, &doc.join(dir).join(name), 0o644)?;
        }
    }
    // Debug information stays out of the package (the release profile
    // keeps some for profiling).
    let sbin = stage.join("usr/sbin/l4proxy");
    install(binary, &sbin, 0o755)?;
    run_command(Command::new("strip").arg("--strip-debug").arg(&sbin))?;
    generated(binary, &out.join(format!("{name}.generated")), &stage)?;
    control(&dist, &stage, &version, &arch, &sbin)?;

    let deb = out.join(format!("{name}.deb"));
    run_command(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    Ok(deb)
}

/// Man pages (gzipped, as Debian has them) and completions, from the
/// packaged binary itself.
fn generated(binary: &Path, scratch: &Path, stage: &Path) -> anyhow::Result<()> {
    if scratch.exists() {
        fs::remove_dir_all(scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    run_command(Command::new(binary).arg("manual").arg("--out").arg(scratch)).with_context(|| {
        format!(
            "generating the man pages and completions with {} (a build of this source tree has the hidden `manual` command)",
            binary.display()
        )
    })?;
    let man8 = stage.join("usr/share/man/man8");
    fs::create_dir_all(&man8)?;
    for page in fs::read_dir(scratch.join("man8"))? {
        let page = page?.path();
        let name = page
            .file_name()
            .expect("a page has a name")
            .to_string_lossy();
        let gz = fs::File::create(man8.join(format!("{name}.gz")))?;
        // -n: no name or time stamp inside, so the package is reproducible.
        run_command(
            Command::new("gzip")
                .args(["-9n", "-c"])
                .arg(&page)
                .stdout(gz),
        )?;
    }
    let completions = scratch.join("completions");
    for (file, to) in [
        ("l4proxy", "usr/share/bash-completion/completions/l4proxy"),
        ("_l4proxy", "usr/share/zsh/vendor-completions/_l4proxy"),
        (
            "l4proxy.fish",
            "usr/share/fish/vendor_completions.d/l4proxy.fish",
        ),
    ] {
        install(&completions.join(file), &stage.join(to), 0o644)?;
    }
    fs::remove_dir_all(scratch)?;
    Ok(())
}

/// DEBIAN/: control, conffiles and the maintainer scripts.
fn control(
    dist: &Path,
    stage: &Path,
    version: &str,
    arch: &str,
    binary: &Path,
) -> anyhow::Result<()> {
    let debian = stage.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install(&dist.join(script), &debian.join(script), 0o755)?;
    }
    fs::write(debian.join("conffiles"), "/etc/l4proxy/policy.json\n")?;
    let glibc = glibc_needed(binary)?;
    let installed_kib = size_of(stage)?.div_ceil(1024);
    let control = format!(
        "Package: l4proxy
Version: {version}
Architecture: {arch}
Maintainer: l4proxy maintainers <maintainers@l4proxy.invalid>
Installed-Size: {installed_kib}
Depends: libc6 (>= {glibc}), libgcc-s1
Section: net
Priority: optional
Description: layer-4 transparent proxy steered by eBPF sk_lookup
 l4proxy intercepts the TCP flows a JSON policy names (by prefix and port,
 or forwarded through this host) with its own eBPF programs, and relays them
 to upstreams chosen by SNI, ALPN, Host, source or destination, optionally
 from the client's own address. No iptables rules: it installs and removes
 the routing it needs itself. Needs Linux 6.6 or later (sk_lookup, tcx).
"
    );
    fs::write(debian.join("control"), control)?;
    Ok(())
}

/// The newest glibc symbol version the binary links against.
fn glibc_needed(binary: &Path) -> anyhow::Result<String> {
    let bytes = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let mut newest: Option<Vec<u32>> = None;
    for at in find_all(&bytes, b"GLIBC_2.") {
        let digits = &bytes[at + b"GLIBC_".len()..];
        let text: String = digits
            .iter()
            .take_while(|b| b.is_ascii_digit() || **b == b'.')
            .map(|&b| b as char)
            .collect();
        let parsed: Option<Vec<u32>> = text.split('.').map(|n| n.parse().ok()).collect();
        if let Some(parsed) = parsed
            && newest.as_ref().is_none_or(|n| parsed > *n)
        {
            newest = Some(parsed);
        }
    }
    let Some(newest) = newest else {
        bail!(
            "{} names no GLIBC_ symbol version: not a glibc binary?",
            binary.display()
        );
    };
    Ok(newest
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join("."))
}

/// Every offset where `needle` starts in `haystack`.
fn find_all<'a>(haystack: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(move |(_, w)| *w == needle)
        .map(|(at, _)| at)
}

/// The version the binary reports (`l4proxy -V`: "l4proxy 0.1.0 (commit …)").
fn version(binary: &Path) -> anyhow::Result<String> {
    let line = output(Command::new(binary).arg("-V"))?;
    line.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("no version in `{} -V`: {line:?}", binary.display()))
}

/// Copies `from` to `to` (creating its directory) with `mode`.
fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Bytes of the files under `dir`, for Installed-Size.
fn size_of(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            size_of(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// A command's standard output, trimmed; fails if the command does.
fn output(command: &mut Command) -> anyhow::Result<String> {
    let description = format!("{command:?}");
    let output = command
        .output()
        .with_context(|| format!("starting {description}"))?;
    if !output.status.success() {
        bail!(
            "{description} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
