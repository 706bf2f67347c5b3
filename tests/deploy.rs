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
