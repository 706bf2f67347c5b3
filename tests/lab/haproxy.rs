//! HAProxy from Debian's package as a real PROXY protocol peer: a receiver
//! (`accept-proxy`) behind l4proxy, or a sender (`send-proxy`,
//! `send-proxy-v2`) in front of it. Runs in the foreground inside a lab
//! namespace, logging to stdout (a file in its temp dir); the process group
//! is killed and reaped on drop.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::tls::{kill_group, ns_command, require_tool, wait_listening};
use super::{Netns, TempDir, poll_until};

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
        let mut child = ns_command(ns, "haproxy", &["-db", "-f", &config_arg])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start haproxy in {}: {e}", ns.name()));
        wait_listening(ns, &mut child, "haproxy", listening, || {
            format!("config:\n{config}\n{}", haproxy_log(dir.path()))
        });
        Haproxy {
            child,
            dir,
            ns: ns.name().to_owned(),
        }
    }

    /// Everything HAProxy printed: its log lines and messages.
    pub fn log(&self) -> String {
        haproxy_log(self.dir.path())
    }

    /// Waits until a log line contains `needle` (10 s) and returns it.
    pub fn wait_log_line(&self, needle: &str) -> String {
        let line = |log: &str| log.lines().find(|l| l.contains(needle)).map(str::to_owned);
        poll_until(
            Duration::from_secs(10),
            || line(&self.log()),
            Option::is_some,
        )
        .unwrap_or_else(|| {
            panic!(
                "no haproxy log line with {needle:?} in 10 s:\n{}",
                self.log()
            )
        })
    }
}

fn haproxy_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("out.log")).unwrap_or_default()
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        if std::thread::panicking() {
            eprintln!("---- haproxy (netns {}) ----\n{}", self.ns, self.log());
        }
    }
}
