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
    ("etc/l4proxy/policy.json", 0o640),
    ("usr/share/man/man8/l4proxy.8.gz", 0o644),
    ("usr/share/man/man8/l4proxy-run.8.gz", 0o644),
    ("usr/share/man/man8/l4proxy-check.8.gz", 0o644),
    ("usr/share/man/man8/l4proxy-reload.8.gz", 0o644),
    ("usr/share/bash-completion/completions/l4proxy", 0o644),
    ("usr/share/zsh/vendor-completions/_l4proxy", 0o644),
    ("usr/share/fish/vendor_completions.d/l4proxy.fish", 0o644),
    ("usr/share/doc/l4proxy/copyright", 0o644),
    ("usr/share/doc/l4proxy/README.md", 0o644),
    ("usr/share/doc/l4proxy/docs/policy.md", 0o644),
    ("usr/share/doc/l4proxy/docs/takeover.md", 0o644),
    ("usr/share/doc/l4proxy/docs/bridged.md", 0o644),
    ("usr/share/doc/l4proxy/examples/tls-sni.json", 0o644),
];

/// The files an installed document points to, relative to its own
/// directory: its Markdown links (not to a web page or an anchor of its
/// own), and the example policies it names (`examples/NAME.json`, relative
/// to the doc directory).
fn pointed_to(text: &str) -> (Vec<String>, Vec<String>) {
    let links = text
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .map(|target| target.split('#').next().unwrap_or_default())
        .filter(|target| !target.is_empty() && !target.contains("://"))
        .map(str::to_owned)
        .collect();
    let examples = text
        .split("`examples/")
        .skip(1)
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.ends_with(".json"))
        .map(|name| format!("examples/{name}"))
        .collect();
    (links, examples)
}

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

/// A path as the `&str` lab::must takes (the test's are all UTF-8).
fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

#[test]
fn the_deb_installs_into_a_scratch_root_and_its_unit_verifies() {
    use std::os::unix::fs::PermissionsExt;

    let dir = lab::TempDir::new("deploy-package");
    let deb = package(&dir.join("out"));
    let arch = lab::must("dpkg", &["--print-architecture"]);
    assert_eq!(
        deb.file_name().unwrap().to_string_lossy(),
        format!("l4proxy_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim())
    );
    let fields = lab::must(
        "dpkg-deb",
        &["-f", text(&deb), "Package", "Version", "Depends"],
    );
    assert!(
        fields.contains("Package: l4proxy\n")
            && fields.contains(&format!("Version: {}\n", env!("CARGO_PKG_VERSION")))
            && fields.contains("Depends: libc6 (>= 2."),
        "{fields}"
    );

    // Installed as `dpkg --root` would lay it out, without running anything.
    let root = dir.join("root");
    lab::must("dpkg-deb", &["-x", text(&deb), text(&root)]);
    for (file, mode) in PACKAGED {
        let path = root.join(file);
        let meta = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{file} is not in the package: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, *mode, "mode of {file}");
    }
    // What the installed docs point to is installed too.
    let doc = root.join("usr/share/doc/l4proxy");
    for file in [
        "README.md",
        "docs/policy.md",
        "docs/takeover.md",
        "docs/bridged.md",
    ] {
        let path = doc.join(file);
        let (links, examples) = pointed_to(&std::fs::read_to_string(&path).unwrap());
        if file == "README.md" {
            assert!(
                links.contains(&"docs/policy.md".to_owned()) && !examples.is_empty(),
                "the README's links and examples were not found: the parse is wrong"
            );
        }
        for target in links {
            let to = path.parent().unwrap().join(&target);
            assert!(to.exists(), "{file} links {target}, not in the package");
        }
        for name in examples {
            assert!(
                doc.join(&name).exists(),
                "{file} names {name}, not in the package"
            );
        }
    }
    let control = dir.join("DEBIAN");
    lab::must("dpkg-deb", &["-e", text(&deb), text(&control)]);
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/l4proxy/policy.json\n",
        "the policy is the operator's: an upgrade keeps their changes"
    );
    for script in ["postinst", "prerm", "postrm"] {
        lab::must("sh", &["-n", text(&control.join(script))]);
    }

    // The installed binary is the one under test, and its default policy
    // passes the unit's ExecStartPre.
    let installed = root.join("usr/sbin/l4proxy");
    assert_eq!(
        lab::must(text(&installed), &["--version"]),
        lab::must(lab::daemon::binary(), &["--version"])
    );
    let policy = root.join("etc/l4proxy/policy.json");
    lab::must(text(&installed), &["check", "--strict", text(&policy)]);
    let page = root.join("usr/share/man/man8/l4proxy-run.8.gz");
    let page = lab::must("gzip", &["-dc", text(&page)]);
    assert!(
        page.contains(".TH l4proxy-run 8") && page.contains("grace\\-period"),
        "{page}"
    );
    let bash = std::fs::read_to_string(root.join("usr/share/bash-completion/completions/l4proxy"))
        .unwrap();
    assert!(bash.contains("complete -F _l4proxy"), "{bash}");
    assert!(
        bash.contains("reload") && !bash.contains("manual"),
        "every command but the packaging one: {bash}"
    );

    // systemd-analyze verify on the installed unit, with the scratch root as
    // `/`: its ExecStart binaries and man pages are the package's. The
    // root also gets this machine's own units (sysinit.target and the like),
    // which a real system has and the transaction check loads.
    let units = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    lab::must("cp", &["-a", "/usr/lib/systemd/system/.", text(&units)]);
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

/// The values of `key=` in the unit, split on spaces (all its lines).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// The system calls a `SystemCallFilter=` list allows, its groups expanded
/// by systemd-analyze (which lists nested groups by name).
fn allowed_syscalls(filter: &[String]) -> std::collections::BTreeSet<String> {
    let mut allowed = std::collections::BTreeSet::new();
    let mut groups: Vec<String> = Vec::new();
    for entry in filter {
        if entry.starts_with('@') {
            groups.push(entry.clone());
        } else {
            allowed.insert(entry.clone());
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    while let Some(group) = groups.pop() {
        if !seen.insert(group.clone()) {
            continue;
        }
        let listing = lab::must("systemd-analyze", &["syscall-filter", &group]);
        for line in listing.lines().skip(1) {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('@') {
                groups.push(line.to_owned());
            } else {
                allowed.insert(line.to_owned());
            }
        }
    }
    allowed
}

/// The pid of `parent`'s only child (the daemon strace started).
fn only_child(parent: i32) -> i32 {
    let children = lab::poll_until(
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                .unwrap_or_default()
        },
        |c| !c.trim().is_empty(),
    );
    children
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no child of {parent}: {children:?}"))
}

/// A gateway rule relaying from the client's address: the tc program,
/// routing rules and transparent binds, besides sk_lookup and local routes.
fn gateway_policy() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "a" },
            { "name": "gateway", "prefixes": ["203.0.113.0/24"], "ports": [9000],
              "interfaces": ["to-cl"], "upstream": "b" }
        ],
        "upstreams": { "a": { "servers": ["203.0.113.2:8080"] },
                       "b": { "servers": ["203.0.113.2:8081"], "bind": "client" } }
    })
}

/// The unit's sandbox, as far as it can be had without systemd as PID 1:
/// the daemon runs with the unit's capability bounding set and
/// no_new_privs (enforced, by setpriv), and strace records every system
/// call through start-up, transparent relaying, a refused and an accepted
/// `l4proxy reload` (the unit's ExecReload) and a stop; the record must fit
/// SystemCallFilter=, RestrictAddressFamilies=, RestrictNamespaces=,
/// MemoryDenyWriteExecute=, ProtectSystem=strict (no file opened for
/// writing) and ProtectHome=.
#[test]
fn the_daemon_works_inside_the_units_sandbox() {
    let unit = std::fs::read_to_string(workspace_root().join("dist/l4proxy.service")).unwrap();
    let caps = unit_values(&unit, "CapabilityBoundingSet");
    assert!(!caps.is_empty(), "the unit bounds the capabilities");
    let bounding = std::iter::once("-all".to_owned())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.to_lowercase().trim_start_matches("cap_"))),
        )
        .collect::<Vec<_>>()
        .join(",");
    let t = Topo::new("sandbox");
    let _a = Server::start(&t.sv, sa("203.0.113.2:8080"), handlers::hello_echo("a"));
    let b = Server::start(&t.sv, sa("203.0.113.2:8081"), handlers::hello_echo("b"));
    let dir = lab::TempDir::new("deploy-sandbox");
    let trace = dir.join("strace");
    let trace_arg = trace.to_string_lossy().into_owned();
    let wrapper = [
        // A unit's environment has no cargo in it (its library path points
        // into /root).
        "env",
        "-u",
        "LD_LIBRARY_PATH",
        "setpriv",
        "--bounding-set",
        &bounding,
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
        "strace",
        "-f",
        "-qq",
        "-o",
        &trace_arg,
        "--",
    ];
    let mut d = Daemon::start_wrapped(
        &t.px,
        &gateway_policy(),
        &["--grace-period", "5s"],
        &wrapper,
    );
    d.wait_ready(Duration::from_secs(30));
    let daemon = only_child(d.pid());
    let status = std::fs::read_to_string(format!("/proc/{daemon}/status")).unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    // CAP_NET_BIND_SERVICE 10, CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(
        bnd & !(1 << 10 | 1 << 12 | 1 << 38 | 1 << 39),
        0,
        "{status}"
    );

    // Relayed from the client's own address: tc, rules, IP_TRANSPARENT.
    let mut c = connect(&t.cl, sa("203.0.113.3:9000"));
    let client = c.local_addr().unwrap();
    assert_eq!(lab::read_line(&mut c).unwrap(), "b");
    assert_eq!(b.accepted().last().unwrap().peer, client);
    lab::finish(&mut c, "the gateway connection");
    assert_eq!(
        lab::read_line(&mut connect(&t.cl, sa("192.0.2.10:80"))).unwrap(),
        "a"
    );

    // ExecReload: fails when the policy is refused, succeeds when applied.
    let reload = || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                t.px.name(),
                lab::daemon::binary(),
                "reload",
            ])
            .output()
            .expect("run l4proxy reload")
    };
    std::fs::write(d.policy_path(), "{ \"intercept\": [ }").unwrap();
    let refused = reload();
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("l4proxy reload: refused: "),
        "{refused:?}"
    );
    let mut second = gateway_policy();
    second["intercept"][0]["ports"] = json!([80, 81]);
    std::fs::write(d.policy_path(), second.to_string()).unwrap();
    let applied = reload();
    assert!(applied.status.success(), "{applied:?}");
    assert_eq!(
        lab::read_line(&mut connect(&t.cl, sa("192.0.2.10:81"))).unwrap(),
        "a",
        "the reloaded policy is in force"
    );

    // SIGTERM to the daemon itself; strace exits with its status.
    // SAFETY: plain syscall on a pid of this test's process tree.
    assert_eq!(unsafe { libc::kill(daemon, libc::SIGTERM) }, 0);
    let st = d.wait_exit(Duration::from_secs(30));
    d.assert_exit_ok(st);
    assert!(t.px.wait_no_proxy_routes(Duration::from_secs(5)).is_empty());

    let record = std::fs::read_to_string(&trace).unwrap();
    let calls: Vec<(&str, &str)> = record
        .lines()
        .filter_map(|line| {
            // "PID  name(args) = result"; signals, exits and resumptions aside.
            let call = line.split_once(char::is_whitespace)?.1.trim_start();
            let (name, _) = call.split_once('(')?;
            name.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                .then_some((name, call))
        })
        .collect();
    assert!(
        calls.len() > 1000,
        "strace recorded the daemon: {} calls",
        calls.len()
    );
    let allowed = allowed_syscalls(&unit_values(&unit, "SystemCallFilter"));
    let refused: std::collections::BTreeSet<&str> = calls
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !allowed.contains(*name))
        .collect();
    assert!(
        refused.is_empty(),
        "system calls SystemCallFilter= refuses: {refused:?}"
    );
    assert!(calls.iter().any(|(name, _)| *name == "bpf"));
    let families = unit_values(&unit, "RestrictAddressFamilies");
    assert!(
        calls
            .iter()
            .any(|(name, call)| *name == "socket" && call.contains("AF_NETLINK")),
        "strace saw the daemon's sockets"
    );
    for (_, call) in calls
        .iter()
        .filter(|(name, _)| *name == "socket" || *name == "socketpair")
    {
        let family = call
            .split_once('(')
            .and_then(|(_, args)| args.split(',').next())
            .unwrap_or_default();
        assert!(
            families.iter().any(|f| f == family),
            "RestrictAddressFamilies= refuses {call}"
        );
    }
    for (name, call) in &calls {
        assert!(
            !call.contains("CLONE_NEW") && *name != "setns" && *name != "unshare",
            "RestrictNamespaces= refuses {call}"
        );
        assert!(
            !(call.contains("PROT_WRITE") && call.contains("PROT_EXEC")),
            "MemoryDenyWriteExecute= refuses {call}"
        );
        let opens = matches!(*name, "open" | "openat" | "openat2" | "creat");
        assert!(
            !(opens
                && (call.contains("O_WRONLY")
                    || call.contains("O_RDWR")
                    || call.contains("O_CREAT")))
                || call.contains("\"/dev/null\""),
            "ProtectSystem=strict: a file opened for writing: {call}"
        );
        assert!(
            !call.contains("\"/home") && !call.contains("\"/root") && !call.contains("\"/run/user"),
            "ProtectHome=: {call}"
        );
    }
}
