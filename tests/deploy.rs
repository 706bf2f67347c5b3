//! Deploying l4proxy: what a service manager hears from the daemon
//! (sd_notify), what `--version` names, the systemd unit, and the .deb.

mod lab;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lab::daemon::message;
use lab::{Daemon, Server, Topo, connect, handlers, sa};
use serde_json::{Value, json};

fn policy() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "a" }
        ],
        "upstreams": { "a": { "servers": ["203.0.113.2:8080"] } }
    })
}

/// The service manager's end of `NOTIFY_SOCKET`, as systemd has it.
struct Manager {
    socket: UnixDatagram,
}

impl Manager {
    /// The next datagram as `KEY=value` lines; panics after 10 s.
    fn next(&self, what: &str) -> Vec<String> {
        let mut buf = vec![0; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for {what} on NOTIFY_SOCKET: {e}"));
        let text = String::from_utf8(buf[..n].to_vec()).expect("a notification is text");
        text.lines().map(str::to_owned).collect()
    }
}

/// The value of `KEY=` in a notification, if it has one.
fn value<'a>(lines: &'a [String], key: &str) -> Option<&'a str> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn the_service_manager_hears_ready_reloading_and_stopping() {
    let t = Topo::new("notify");
    let _server = Server::start(&t.sv, sa("203.0.113.2:8080"), handlers::hello_echo("a"));
    // An abstract name, like systemd's in a container: abstract Unix
    // sockets belong to the network namespace, so it is bound in px.
    let name = format!("l4proxy-test-notify-{}", std::process::id());
    let manager = t.px.run(|| {
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap_or_else(|e| panic!("bind @{name}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Manager { socket }
    });
    let notify_socket = format!("@{name}");
    let mut d = Daemon::start_with_env(
        &t.px,
        &policy(),
        &["--grace-period", "10s"],
        &[("NOTIFY_SOCKET", &notify_socket)],
    );

    let ready = manager.next("READY=1");
    assert_eq!(value(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(
        value(&ready, "MAINPID"),
        Some(d.pid().to_string().as_str()),
        "the daemon names itself the main process: {ready:?}"
    );
    assert_eq!(
        value(&ready, "STATUS"),
        Some("serving; policy generation 1 in force")
    );
    d.wait_ready(Duration::from_secs(5));
    let mut open = connect(&t.cl, sa("192.0.2.10:80"));
    assert_eq!(
        lab::read_line(&mut open).unwrap(),
        "a",
        "steered and relayed"
    );

    // A refused reload: RELOADING, then READY with the reason, and the
    // first policy still in force.
    let refused = d.reload(&Value::String(
        policy().to_string().replace("[80]", "[70000]"),
    ));
    assert!(
        message(&refused)
            .unwrap()
            .starts_with("policy not reloaded"),
        "{refused}"
    );
    let reloading = manager.next("RELOADING=1");
    assert_eq!(value(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let usec: u64 = value(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    let after_refusal = manager.next("READY=1 after a refused reload");
    assert_eq!(value(&after_refusal, "READY"), Some("1"));
    let status = value(&after_refusal, "STATUS").unwrap_or_default();
    assert!(
        status.starts_with("serving; reload refused, policy generation 1 stays in force: ")
            && status.contains("port must be 1-65535, got 70000"),
        "{after_refusal:?}"
    );

    // An accepted reload: RELOADING, then READY with the new generation.
    let mut second = policy();
    second["intercept"][0]["ports"] = json!([80, 81]);
    assert_eq!(message(&d.reload(&second)), Some("policy reloaded"));
    let reloading = manager.next("RELOADING=1");
    assert_eq!(value(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let later: u64 = value(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading:?}"));
    assert!(later > usec, "the monotonic clock moved on");
    let reloaded = manager.next("READY=1 after a reload");
    assert_eq!(value(&reloaded, "READY"), Some("1"));
    assert_eq!(
        value(&reloaded, "STATUS"),
        Some("serving; policy generation 2 in force")
    );

    // SIGTERM with a connection open: STOPPING, with what is drained.
    d.signal(libc::SIGTERM);
    let stopping = manager.next("STOPPING=1");
    assert_eq!(value(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    assert_eq!(
        value(&stopping, "STATUS"),
        Some("draining 1 open connections for up to 10s")
    );
    lab::echo(&mut open, "still here", "the connection open at SIGTERM");
    lab::finish(&mut open, "the connection open at SIGTERM");
    let st = d.wait_exit(Duration::from_secs(15));
    d.assert_exit_ok(st);
    manager
        .socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut rest = [0; 64];
    assert!(
        manager.socket.recv(&mut rest).is_err(),
        "nothing after STOPPING=1"
    );
}

/// The workspace's root (this file's crate is one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn version_names_the_commit_and_the_embedded_bpf_object() {
    let output = Command::new(lab::daemon::binary())
        .arg("--version")
        .output()
        .expect("run l4proxy --version");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let object = workspace_root().join("target/ebpf/bpfel-unknown-none/release/l4proxy");
    let bytes = std::fs::read(&object).unwrap_or_else(|e| panic!("read {}: {e}", object.display()));
    let head = Command::new("git")
        .current_dir(workspace_root())
        .args(["rev-parse", "HEAD"])
        .output()
        .expect("run git rev-parse HEAD");
    assert!(head.status.success(), "the tests run in a git checkout");
    let head = String::from_utf8(head.stdout).unwrap();
    assert_eq!(
        text,
        format!(
            "l4proxy {}\ncommit: {}\nbpf object sha256: {}\n",
            env!("CARGO_PKG_VERSION"),
            head.trim(),
            lab::sha256_hex(&bytes)
        )
    );
}

/// What the .deb installs, with each file's mode.
const PACKAGED: &[(&str, u32)] = &[
    ("usr/sbin/l4proxy", 0o755),
    ("lib/systemd/system/l4proxy.service", 0o644),
    ("etc/l4proxy/policy.json", 0o644),
    ("usr/share/man/man8/l4proxy.8.gz", 0o644),
    ("usr/share/man/man8/l4proxy-run.8.gz", 0o644),
    ("usr/share/man/man8/l4proxy-check.8.gz", 0o644),
    ("usr/share/man/man8/l4proxy-reload.8.gz", 0o644),
    ("usr/share/bash-completion/completions/l4proxy", 0o644),
    ("usr/share/zsh/vendor-completions/_l4proxy", 0o644),
    ("usr/share/fish/vendor_completions.d/l4proxy.fish", 0o644),
    ("usr/share/doc/l4proxy/copyright", 0o644),
    ("usr/share/doc/l4proxy/README.md", 0o644),
    ("usr/share/doc/l4proxy/policy.md", 0o644),
];

/// `cargo xtask package` with the binary under test: the debug build, not
/// a release one (the packaging is the same, the build minutes cheaper).
fn package(out: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let built = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["run", "--quiet", "--locked", "--package", "xtask", "--"])
        .args(["package", "--binary", lab::daemon::binary(), "--out"])
        .arg(out)
        .output()
        .expect("run cargo xtask package");
    assert!(
        built.status.success(),
        "cargo xtask package: {}\n{}",
        built.status,
        String::from_utf8_lossy(&built.stderr)
    );
    // The .deb's path is the last line (dpkg-deb speaks first).
    let stdout = String::from_utf8(built.stdout).unwrap();
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default());
    assert!(deb.starts_with(out) && deb.exists(), "{deb:?}");
    deb
}

/// Runs a command, panicking with its output if it fails; returns stdout.
fn must(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_deb_installs_into_a_scratch_root_and_its_unit_verifies() {
    use std::os::unix::fs::PermissionsExt;

    let dir = lab::TempDir::new("deploy-package");
    let deb = package(&dir.join("out"));
    let arch = must(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(
        deb.file_name().unwrap().to_string_lossy(),
        format!("l4proxy_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim())
    );
    let fields = must(
        Command::new("dpkg-deb")
            .arg("-f")
            .arg(&deb)
            .args(["Package", "Version", "Depends"]),
    );
    assert!(
        fields.contains("Package: l4proxy\n")
            && fields.contains(&format!("Version: {}\n", env!("CARGO_PKG_VERSION")))
            && fields.contains("Depends: libc6 (>= 2."),
        "{fields}"
    );

    // Installed as `dpkg --root` would lay it out, without running anything.
    let root = dir.join("root");
    must(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    for (file, mode) in PACKAGED {
        let path = root.join(file);
        let meta = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{file} is not in the package: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, *mode, "mode of {file}");
    }
    let control = dir.join("DEBIAN");
    must(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/l4proxy/policy.json\n",
        "the policy is the operator's: an upgrade keeps their changes"
    );
    for script in ["postinst", "prerm", "postrm"] {
        must(Command::new("sh").arg("-n").arg(control.join(script)));
    }

    // The installed binary is the one under test, and its default policy
    // passes the unit's ExecStartPre.
    let installed = root.join("usr/sbin/l4proxy");
    assert_eq!(
        must(Command::new(&installed).arg("--version")),
        must(Command::new(lab::daemon::binary()).arg("--version"))
    );
    must(
        Command::new(&installed)
            .args(["check", "--strict"])
            .arg(root.join("etc/l4proxy/policy.json")),
    );
    let page = must(
        Command::new("gzip")
            .arg("-dc")
            .arg(root.join("usr/share/man/man8/l4proxy-run.8.gz")),
    );
    assert!(
        page.contains(".TH l4proxy-run 8") && page.contains("grace\\-period"),
        "{page}"
    );
    let bash = std::fs::read_to_string(root.join("usr/share/bash-completion/completions/l4proxy"))
        .unwrap();
    assert!(bash.contains("complete -F _l4proxy"), "{bash}");

    // systemd-analyze verify on the installed unit, with the scratch root as
    // `/`: its ExecStart binaries and man pages are the package's. The
    // root also gets this machine's own units (sysinit.target and the like),
    // which a real system has and the transaction check loads.
    let units = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    must(
        Command::new("cp")
            .arg("-a")
            .arg("/usr/lib/systemd/system/.")
            .arg(&units),
    );
    std::fs::remove_file(units.join("l4proxy.service")).ok();
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("l4proxy.service")
        .env("MANPATH", root.join("usr/share/man"))
        .current_dir(dir.path())
        .output()
        .expect("run systemd-analyze verify (xtask setup installs systemd)");
    let complaints = String::from_utf8_lossy(&verified.stderr);
    // It exits 0 for unknown or malformed settings too, with a warning.
    assert!(
        verified.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify: {}\n{complaints}",
        verified.status
    );
}
