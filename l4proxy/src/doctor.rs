//! `l4proxy doctor`: the checks `run` makes of this host, made without
//! changing anything, each printed with what to do when it fails.
//!
//! The kernel programs are loaded (the verifier sees every helper they
//! call) but never attached, and dropped on return; interfaces and kernel
//! settings are checked by the same code `run` and a reload use
//! (`install::check_host`).

use std::path::Path;

use crate::{
    install::{self, InstallError},
    intercept::{Interceptor, delivery},
    kernel_version::{self, SK_LOOKUP, TCX, version_of},
    local_addrs::LocalAddrs,
    policy::Policy,
    privilege::{self, Capability, User},
};

/// One check's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// `run` would work, but perhaps not as meant.
    Warning,
    /// `run` would fail, or connections would.
    Missing,
}

/// A checked thing, its outcome, and what was seen or what to do.
#[derive(Debug)]
pub struct Finding {
    pub status: Status,
    pub what: String,
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match self.status {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Missing => "missing",
        };
        write!(f, "{status:<8}{}: {}", self.what, self.detail)
    }
}

fn finding(status: Status, what: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding {
        status,
        what: what.into(),
        detail: detail.into(),
    }
}

/// Every check, in order: kernel, programs, capabilities, then what the
/// policy (if any) needs of this host.
pub async fn examine(policy_path: Option<&Path>, user: Option<&str>) -> Vec<Finding> {
    let mut found = Vec::new();
    let policy = match policy_path.map(Policy::load) {
        None => None,
        Some(Ok(policy)) => Some(policy),
        Some(Err(e)) => {
            found.push(finding(
                Status::Missing,
                "policy",
                format!("{e} (l4proxy check FILE lists every error)"),
            ));
            None
        }
    };
    let host = match &policy {
        Some(policy) => Some(check_host(policy).await),
        None => None,
    };
    let uses_tc = match &host {
        Some(Ok(check)) => Some(check.uses_tc()),
        _ => None,
    };
    found.push(kernel(uses_tc));
    found.push(programs());
    found.extend(capabilities(policy.as_ref(), user));
    if let (Some(path), Some(_), Some(Ok(user))) = (policy_path, &policy, user.map(User::lookup)) {
        found.push(readable_by(&user, path));
    }
    match (policy, host) {
        (Some(_), Some(Ok(check))) => {
            found.push(finding(
                Status::Ok,
                "interfaces",
                "every interface the policy names is here, and not a port of another",
            ));
            found.extend(sysctls(&check.findings));
        }
        (Some(_), Some(Err(e))) => found.push(finding(
            Status::Missing,
            "interfaces and kernel settings",
            e.to_string(),
        )),
        _ if policy_path.is_none() => found.push(finding(
            Status::Ok,
            "interfaces and kernel settings",
            "not checked: they depend on a policy (--policy FILE)",
        )),
        _ => {}
    }
    found
}

async fn check_host(policy: &Policy) -> Result<install::HostCheck, InstallError> {
    let local = LocalAddrs::load(None).await?;
    install::check_host(policy, &local).await
}

fn kernel(uses_tc: Option<bool>) -> Finding {
    let release = kernel_version::release();
    let Some(version) = version_of(&release) else {
        return finding(
            Status::Warning,
            "kernel",
            format!("cannot read its version ({release:?})"),
        );
    };
    let at_least = |(major, minor): (u32, u32)| version >= (major, minor);
    if !at_least(SK_LOOKUP) {
        return finding(
            Status::Missing,
            "kernel",
            format!("Linux {release}: sk_lookup needs 5.9 or later; upgrade the kernel"),
        );
    }
    match (at_least(TCX), uses_tc) {
        (true, _) => finding(
            Status::Ok,
            "kernel",
            format!("Linux {release} (sk_lookup: 5.9, tcx: 6.6)"),
        ),
        (false, Some(false)) => finding(
            Status::Ok,
            "kernel",
            format!("Linux {release}: the policy needs no tc program (tcx needs 6.6)"),
        ),
        (false, _) => finding(
            Status::Missing,
            "kernel",
            kernel_version::tcx_missing(&release).unwrap_or_default(),
        ),
    }
}

fn programs() -> Finding {
    match Interceptor::load(delivery::DEFAULT_MARK) {
        Ok(_) => finding(
            Status::Ok,
            "BPF programs",
            "the kernel accepts steer (sk_lookup) and classify (tc), with their maps and helpers",
        ),
        // The verifier's log follows the first line: too long for a report.
        Err(e) => finding(
            Status::Missing,
            "BPF programs",
            format!(
                "the kernel refused them: {}; run as root (or with cap_bpf, cap_perfmon and \
                 cap_net_admin), on a kernel with BPF syscall, sk_lookup and tc programs",
                e.to_string().lines().next().unwrap_or_default()
            ),
        ),
    }
}

/// The capabilities this process holds against what `run` needs: to start
/// (load, attach), to switch to `user`, and what the policy needs.
fn capabilities(policy: Option<&Policy>, user: Option<&str>) -> Vec<Finding> {
    let held = match privilege::held() {
        Ok(held) => held.effective,
        Err(e) => {
            return vec![finding(
                Status::Missing,
                "capabilities",
                format!("cannot read them: {e}"),
            )];
        }
    };
    let mut wanted: Vec<(Capability, String)> = privilege::START
        .iter()
        .map(|&cap| (cap, "loading and attaching the programs".to_owned()))
        .collect();
    if let Some(policy) = policy {
        wanted.extend(privilege::needed(policy));
    }
    let mut found = Vec::new();
    if let Some(name) = user {
        wanted.extend(
            privilege::SWITCH_USER
                .iter()
                .map(|&cap| (cap, format!("switching to --user {name}"))),
        );
        found.push(match User::lookup(name) {
            Ok(user) => finding(
                Status::Ok,
                "user",
                format!("{} is uid {}, gid {}", user.name, user.uid, user.gid),
            ),
            Err(e) => finding(Status::Missing, "user", e.to_string()),
        });
    }
    let mut seen = Vec::new();
    for (cap, why) in wanted {
        if seen.contains(&cap) {
            continue;
        }
        seen.push(cap);
        found.push(if privilege::covers(held, cap) {
            finding(Status::Ok, format!("capability {cap}"), why)
        } else {
            finding(
                Status::Missing,
                format!("capability {cap}"),
                format!("needed for {why}; start l4proxy as root (a unit's CapabilityBoundingSet= must keep it), with `--user NAME` to run as another user after start-up"),
            )
        });
    }
    found
}

/// Whether `user` can read what a reload rereads: the policy and every
/// file it names (certificates, keys, CA files, htpasswd files). `l4proxy
/// check` runs as that user, with its primary group and no other, as
/// `run --user` switches (std drops root's other groups when it sets the
/// uid), and reads them all.
fn readable_by(user: &User, policy: &Path) -> Finding {
    use std::os::unix::process::CommandExt;
    let what = format!("files readable by {}", user.name);
    let checked = std::env::current_exe().and_then(|exe| {
        let policy = std::path::absolute(policy)?;
        std::process::Command::new(exe)
            .arg("check")
            .arg(policy)
            .uid(user.uid)
            .gid(user.gid)
            .output()
    });
    match checked {
        Ok(out) if out.status.success() => finding(
            Status::Ok,
            what,
            "the policy and every file it names (a reload rereads them as that user)",
        ),
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stderr);
            let error = said
                .lines()
                .find(|line| !line.contains(": warning: "))
                .unwrap_or("l4proxy check failed");
            finding(
                Status::Missing,
                what,
                format!(
                    "as {}, {error}; a reload would fail the same way",
                    user.name
                ),
            )
        }
        Err(e) => finding(
            Status::Warning,
            what,
            format!("not checked: running l4proxy check as {}: {e}", user.name),
        ),
    }
}

fn sysctls(findings: &crate::intercept::sysctl::Findings) -> Vec<Finding> {
    let mut found: Vec<Finding> = findings
        .errors
        .iter()
        .map(|e| finding(Status::Missing, "kernel setting", e))
        .chain(
            findings
                .warnings
                .iter()
                .map(|w| finding(Status::Warning, "kernel setting", w)),
        )
        .collect();
    if found.is_empty() {
        found.push(finding(
            Status::Ok,
            "kernel settings",
            "forwarding and src_valid_mark fit the policy",
        ));
    }
    found
}
