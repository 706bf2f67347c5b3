//! HAProxy from Debian's package as a real PROXY protocol peer: a receiver
//! (`accept-proxy`) behind l4proxy, or a sender (`send-proxy`,
//! `send-proxy-v2`) in front of it. Runs in the foreground inside a lab
//! namespace, logging to stdout (a file in its temp dir); the process group
//! is killed and reaped on drop.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::tls::{TempDir, kill_group, ns_command, require_tool};
use super::{Netns, try_connect};

pub struct Haproxy {
    child: Child,
    dir: TempDir,
    ns: String,
}

/// `global` and `defaults` of every test config: TCP mode, logs on stdout.
const COMMON: &str = "global\n\
  log stdout format raw local0\n\
defaults\n\
  mode tcp\n\
  log global\n\
  timeout connect 5s\n\
  timeout client 30s\n\
  timeout server 30s\n";

impl Haproxy {
    /// Starts `haproxy -db` in `ns` with `sections` (frontends, backends)
    /// after the common part, and waits until each of `listening` accepts.
    pub fn start(ns: &Netns, sections: &str, listening: &[SocketAddr]) -> Haproxy {
        require_tool("haproxy", "haproxy");
        let dir = TempDir::new("haproxy");
        let config = format!("{COMMON}{sections}");
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(&config_path, &config)
            .unwrap_or_else(|e| panic!("write {}: {e}", config_path.display()));
        let log = std::fs::File::create(dir.join("out.log")).unwrap();
        let config_arg = config_path.display().to_string();
        let child = ns_command(ns, "haproxy", &["-db", "-f", &config_arg])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start haproxy in {}: {e}", ns.name()));
        let mut haproxy = Haproxy {
            child,
            dir,
            ns: ns.name().to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for &addr in listening {
            while try_connect(ns, addr, Duration::from_millis(500)).is_err() {
                if let Some(status) = haproxy.child.try_wait().unwrap() {
                    panic!(
                        "haproxy in {} exited ({status}) at start\nconfig:\n{config}\n{}",
                        haproxy.ns,
                        haproxy.log()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "haproxy in {} does not accept on {addr} after 10 s\n{}",
                    haproxy.ns,
                    haproxy.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        haproxy
    }

    /// Everything HAProxy printed: its log lines and messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("out.log")).unwrap_or_default()
    }

    /// Waits until a log line contains `needle` (10 s) and returns it.
    pub fn wait_log_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no haproxy log line with {needle:?} in 10 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        if std::thread::panicking() {
            eprintln!("---- haproxy (netns {}) ----\n{}", self.ns, self.log());
        }
    }
}
