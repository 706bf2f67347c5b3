//! Prometheus from Debian as the metrics tests' scraper: a server in a
//! namespace scraping one target every second, asked over its HTTP API
//! (with curl), and `promtool check metrics` as the exposition's judge.
//! Killed and its data removed on drop.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::tls::{kill_group, ns_command, require_tool, run_in, wait_listening};
use super::{Netns, TempDir, poll_until};

pub struct Prometheus {
    child: Child,
    dir: TempDir,
    ns: String,
    listen: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus in `ns` on `listen`, scraping `target`'s
    /// `/metrics` every second.
    pub fn start(ns: &Netns, listen: SocketAddr, target: SocketAddr) -> Prometheus {
        require_tool("prometheus", "prometheus");
        let dir = TempDir::new("prometheus");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: l4proxy\n    static_configs:\n      - targets: ['{target}']\n"
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let args = [
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={listen}"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = ns_command(ns, "prometheus", &args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus in {}: {e}", ns.name()));
        wait_listening(ns, &mut child, "prometheus", &[listen], || {
            std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
        });
        Prometheus {
            child,
            dir,
            ns: ns.name().to_owned(),
            listen,
        }
    }

    /// The value of the instant query `query` (one series), once
    /// `ready(value)` holds (within 20 s: scrapes come every second).
    pub fn wait_value(&self, ns: &Netns, query: &str, ready: impl Fn(f64) -> bool) -> f64 {
        let last = poll_until(
            Duration::from_secs(20),
            || self.query(ns, query),
            |value| value.is_some_and(&ready),
        );
        match last {
            Some(value) if ready(value) => value,
            _ => panic!(
                "query {query}: last value {last:?}\n{}",
                std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
            ),
        }
    }

    /// The value of `query` now, if it has exactly one series.
    fn query(&self, ns: &Netns, query: &str) -> Option<f64> {
        let url = format!("http://{}/api/v1/query", self.listen);
        let expr = format!("query={query}");
        let out = run_in(
            ns,
            "curl",
            &["-sS", "--max-time", "5", "--data-urlencode", &expr, &url],
            b"",
            Duration::from_secs(10),
        );
        let answer: Value = serde_json::from_str(&out.stdout).ok()?;
        let result = answer["data"]["result"].as_array()?;
        match result.as_slice() {
            [series] => series["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

/// Runs `promtool check metrics` on `exposition`: its verdict and output.
pub fn promtool_check(ns: &Netns, exposition: &str) -> (bool, String) {
    require_tool("promtool", "prometheus");
    let out = run_in(
        ns,
        "promtool",
        &["check", "metrics"],
        exposition.as_bytes(),
        Duration::from_secs(20),
    );
    (out.success(), out.describe())
}

/// The daemon's metrics as curl in `ns` gets them from `admin`
/// (`--admin`).
pub fn scrape(ns: &Netns, admin: &str) -> String {
    let scraped = run_in(
        ns,
        "curl",
        &["-sS", "--max-time", "5", &format!("http://{admin}/metrics")],
        b"",
        Duration::from_secs(10),
    );
    assert!(scraped.success(), "{}", scraped.describe());
    scraped.stdout
}

/// [`sample`], which must be there.
pub fn expect_sample(scraped: &str, series: &str) -> f64 {
    sample(scraped, series).unwrap_or_else(|| panic!("no {series} in:\n{scraped}"))
}

/// The value of `series` (its name and labels as the exposition writes
/// them) in `scraped`, if it is there.
pub fn sample(scraped: &str, series: &str) -> Option<f64> {
    scraped.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "---- prometheus (netns {}) ----\n{}",
                self.ns,
                std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
            );
        }
    }
}
