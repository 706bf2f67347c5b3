//! The rule-scale case: l4proxy with 100 000 prefixes, and with a wide port
//! range on 1 000 prefixes, beside the same rules loaded as TPROXY rules
//! with `ip6tables-restore`: start-up and reload times, the kernel's RULES
//! map and the daemon's resident memory, and the connection rate to the last
//! rule against the same rule alone.
//!
//! The prefixes are IPv6 /128s in the services' documentation prefix
//! (2001:db8:a::/64): the IPv4 one holds only 256 addresses. The kernel
//! keys IPv4 IPv4-mapped in the same 128-bit trie, so the look-up is the same.

use std::{
    fmt::Write as _,
    net::{Ipv6Addr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{
    Bench,
    lab::{self, Netns, Proc},
    report::Report,
    stats::Spread,
    targets::{self, Service, Target},
};

/// The policies of the case.
#[derive(Clone, Copy)]
struct Shape {
    label: &'static str,
    /// Rules, one prefix each.
    rules: usize,
    ports: Ports,
}

#[derive(Clone, Copy)]
enum Ports {
    /// Port 443 only.
    One,
    /// 1024-65535.
    Wide,
}

impl Ports {
    fn json(self) -> Value {
        match self {
            Ports::One => json!([443]),
            Ports::Wide => json!(["1024-65535"]),
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Ports::One => "443",
            Ports::Wide => "1024:65535",
        }
    }

    /// Where the measured connections go.
    fn dialled(self) -> u16 {
        match self {
            Ports::One => 443,
            Ports::Wide => 40_000,
        }
    }
}

const SHAPES: [Shape; 2] = [
    Shape {
        label: "100 000 prefixes, one port",
        rules: 100_000,
        ports: Ports::One,
    },
    Shape {
        label: "1 000 prefixes × ports 1024–65535",
        rules: 1000,
        ports: Ports::Wide,
    },
];

/// How a policy of a shape differs from the shape's own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Base,
    /// The first [`MOVED`] rules on other prefixes: the port classes stay.
    Moved,
    /// The first rule has one more port (8443): new port classes.
    PortAdded,
}

/// Rules moved by [`Variant::Moved`].
const MOVED: usize = 10;

/// The address of rule `i`: every other address from 2001:db8:a::1:0:0, so
/// that no two prefixes are halves of a shorter one.
fn rule_addr(i: usize) -> Ipv6Addr {
    const BASE: u128 = 0x2001_0db8_000a_0000_0000_0001_0000_0000;
    Ipv6Addr::from(BASE + 2 * i as u128)
}

/// The address rule `i` has in `variant`.
fn variant_addr(shape: Shape, variant: Variant, i: usize) -> Ipv6Addr {
    match variant {
        Variant::Moved if i < MOVED => rule_addr(shape.rules + i),
        _ => rule_addr(i),
    }
}

/// The shape's policy, or with `alone` only its last rule.
fn policy(shape: Shape, variant: Variant, alone: bool) -> Value {
    let first = if alone { shape.rules - 1 } else { 0 };
    let intercept: Vec<Value> = (first..shape.rules)
        .map(|i| {
            let mut ports = shape.ports.json();
            if variant == Variant::PortAdded && i == 0 {
                ports.as_array_mut().expect("an array").push(json!(8443));
            }
            json!({
                "name": format!("s{i}"),
                "prefixes": [format!("{}/128", variant_addr(shape, variant, i))],
                "ports": ports,
                "upstream": "tls",
            })
        })
        .collect();
    let server = format!("{}:{}", lab::SV, Service::Tls.server_port());
    json!({ "intercept": intercept, "upstreams": { "tls": { "servers": [server] } } })
}

/// The same rules for `ip6tables-restore` (which replaces the table), after
/// [`targets::TPROXY_PRELUDE`].
fn tproxy_rules(shape: Shape, variant: Variant) -> String {
    let mut script = String::from(targets::TPROXY_PRELUDE);
    for i in 0..shape.rules {
        let mut ports = vec![shape.ports.iptables()];
        if variant == Variant::PortAdded && i == 0 {
            ports.push("8443");
        }
        for port in ports {
            let _ = writeln!(
                script,
                "-A PREROUTING -d {}/128 -p tcp -m tcp --dport {port} -j TPROXY \
                 --on-port {} --tproxy-mark 0x1/0x1",
                variant_addr(shape, variant, i),
                targets::TPROXY_PORT
            );
        }
    }
    script + "COMMIT\n"
}

/// What was measured for one shape.
struct ShapeResult {
    shape: Shape,
    /// Seconds from spawn to the `ready` log line: the shape's policy, and
    /// its last rule alone.
    start_up: Spread,
    start_up_one: Spread,
    /// Seconds of `l4proxy reload`.
    reload_moved: Spread,
    reload_ports: Spread,
    /// After start-up with the shape's policy.
    rules_map_bytes: u64,
    rss: u64,
    rss_one: u64,
    /// Connections per second to the last rule, and to it alone.
    rate: Spread,
    rate_one: Spread,
    /// Seconds of `ip6tables-restore`: into an empty table, and replacing
    /// the shape's rules with a variant.
    tproxy_load: Spread,
    tproxy_moved: Spread,
    tproxy_ports: Spread,
}

impl Bench<'_> {
    /// Measures every shape; the section goes to the report.
    pub(super) fn scale(&mut self, report: &mut Report) -> anyhow::Result<()> {
        self.l4proxy = None; // one l4proxy per namespace
        add_v6_path(self.lab)?;
        let mut results = Vec::new();
        for shape in SHAPES {
            results.push(self.scale_shape(shape, report)?);
        }
        report
            .sections
            .push(section(&results, self.plan.rules_concurrency));
        Ok(())
    }

    fn scale_shape(&mut self, shape: Shape, report: &mut Report) -> anyhow::Result<ShapeResult> {
        let reps = self.plan.repetitions;
        let tag = shape.rules;
        let write = |name: &str, value: &Value| -> anyhow::Result<std::path::PathBuf> {
            let path = self.work.join(format!("scale-{tag}-{name}.json"));
            std::fs::write(&path, serde_json::to_vec(value)?)?;
            Ok(path)
        };
        let one = write("one", &policy(shape, Variant::Base, true))?;
        let live = self.work.join(format!("scale-{tag}.json"));
        let [base, moved, ports] = [Variant::Base, Variant::Moved, Variant::PortAdded]
            .map(|variant| serde_json::to_vec(&policy(shape, variant, false)));
        let (base, moved, ports) = (base?, moved?, ports?);
        let dst = SocketAddr::from((rule_addr(shape.rules - 1), shape.ports.dialled()));

        // The rule alone and the whole policy take turns, so that both see
        // the same moments of the shared cores.
        std::fs::write(&live, &base)?;
        let (mut start_one, mut start, mut rate_one, mut rate) = (vec![], vec![], vec![], vec![]);
        let (mut rss_one, mut rss, mut rules_map_bytes) = (0, 0, 0);
        for rep in 1..=reps {
            eprintln!(
                "bench: scale {rep}/{reps}, {}: its last rule alone",
                shape.label
            );
            self.l4proxy = None;
            let (proc, seconds) = self.start_timed(&one, &format!("scale-{tag}-one"))?;
            start_one.push(seconds);
            rss_one = lab::tree_rss(proc.pid())?;
            self.l4proxy = Some(proc);
            rate_one.push(self.rate_to(dst, &format!("scale, {}, 1 rule", shape.label), report)?);

            eprintln!("bench: scale {rep}/{reps}, {}", shape.label);
            self.l4proxy = None;
            let (proc, seconds) = self.start_timed(&live, &format!("scale-{tag}"))?;
            start.push(seconds);
            rss = lab::tree_rss(proc.pid())?;
            rules_map_bytes = rules_map_bytes_of(proc.pid())?;
            self.l4proxy = Some(proc);
            rate.push(self.rate_to(dst, &format!("scale, {}", shape.label), report)?);
        }

        eprintln!("bench: scale, {}: reloads", shape.label);
        let mut reload_moved = Vec::new();
        let mut reload_ports = Vec::new();
        for _ in 0..reps {
            for (times, variant) in [(&mut reload_moved, &moved), (&mut reload_ports, &ports)] {
                for contents in [variant, &base] {
                    std::fs::write(&live, contents)?;
                    times.push(self.reload_timed()?);
                }
            }
        }
        // Still steering after the reloads.
        self.probe(dst.into(), Target::L4proxy)?;
        self.l4proxy = None;

        eprintln!("bench: scale, {}: ip6tables-restore", shape.label);
        let mut load = Vec::new();
        let mut tproxy_moved = Vec::new();
        let mut tproxy_ports = Vec::new();
        let [base, moved, ports] = [Variant::Base, Variant::Moved, Variant::PortAdded]
            .map(|variant| tproxy_rules(shape, variant));
        for _ in 0..reps {
            restore(&self.lab.px, "*mangle\nCOMMIT\n")?;
            load.push(restore(&self.lab.px, &base)?);
            tproxy_moved.push(restore(&self.lab.px, &moved)?);
            restore(&self.lab.px, &base)?;
            tproxy_ports.push(restore(&self.lab.px, &ports)?);
        }
        restore(&self.lab.px, "*mangle\nCOMMIT\n")?;

        let spread = |values: &[f64]| Spread::of(values).context("at least one repetition");
        Ok(ShapeResult {
            shape,
            start_up: spread(&start)?,
            start_up_one: spread(&start_one)?,
            reload_moved: spread(&reload_moved)?,
            reload_ports: spread(&reload_ports)?,
            rules_map_bytes,
            rss,
            rss_one,
            rate: spread(&rate)?,
            rate_one: spread(&rate_one)?,
            tproxy_load: spread(&load)?,
            tproxy_moved: spread(&tproxy_moved)?,
            tproxy_ports: spread(&tproxy_ports)?,
        })
    }

    /// Starts l4proxy with `policy` and waits (up to two minutes) for its
    /// `ready` log line; returns it and the seconds since the spawn.
    fn start_timed(&mut self, policy: &Path, name: &str) -> anyhow::Result<(Proc, f64)> {
        let log = self.work.join(format!("l4proxy-{name}.log"));
        let started = Instant::now();
        let mut proc = targets::start_l4proxy_logged(
            &self.lab.px,
            self.binary,
            policy,
            self.maxconn,
            &log,
            READY_FILTER,
        )?;
        let deadline = started + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().any(is_ready) {
                return Ok((proc, started.elapsed().as_secs_f64()));
            }
            proc.check_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "l4proxy ({name}) not ready after 120 s; its log: {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Seconds `l4proxy reload` takes (it answers once the policy is in
    /// force).
    fn reload_timed(&mut self) -> anyhow::Result<f64> {
        let started = Instant::now();
        let binary = self.binary.to_str().context("binary path is not UTF-8")?;
        self.lab.px.exec(binary, &["reload"])?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// One run of short connections to `dst`, in connections per second.
    fn rate_to(&mut self, dst: SocketAddr, what: &str, report: &mut Report) -> anyhow::Result<f64> {
        self.probe(dst.into(), Target::L4proxy)?;
        let rate = self.connection_rate(dst.into(), self.plan.rules_concurrency)?;
        self.note_failures(&rate, what, report);
        Ok(rate.per_second)
    }
}

/// The daemon's own lines at info level (for `ready`), everything else at
/// warn, as in the other cases.
const READY_FILTER: &str = "warn,l4proxy::server=info";

/// Whether a JSON log line is the daemon's `ready`.
fn is_ready(line: &str) -> bool {
    serde_json::from_str::<Value>(line)
        .is_ok_and(|v| v["fields"]["message"] == "ready" || v["message"] == "ready")
}

/// Client and proxy host get IPv6 addresses, and the client a route to the
/// services' IPv6 prefix through the proxy host.
fn add_v6_path(lab: &lab::Lab) -> anyhow::Result<()> {
    lab.cl
        .ip(&["addr", "add", "2001:db8:c::2/64", "dev", "to-px", "nodad"])?;
    lab.px
        .ip(&["addr", "add", "2001:db8:c::1/64", "dev", "to-cl", "nodad"])?;
    lab.cl
        .ip(&["route", "add", "2001:db8:a::/64", "via", "2001:db8:c::1"])
}

/// Seconds one `ip6tables-restore` of `script` takes in `px`.
fn restore(px: &Netns, script: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    px.exec_with_input("ip6tables-restore", &[], script)?;
    Ok(started.elapsed().as_secs_f64())
}

/// The memory the kernel accounts to the daemon's RULES map (`bpftool map
/// show`'s `bytes_memlock`; for an LPM trie, its nodes as they are now).
fn rules_map_bytes_of(pid: u32) -> anyhow::Result<u64> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let text = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        ids.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("map_id:"))
                .filter_map(|id| id.trim().parse::<u64>().ok()),
        );
    }
    let out = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let maps: Vec<Value> = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    maps.iter()
        .find(|m| m["name"] == "RULES" && m["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .and_then(|m| m["bytes_memlock"].as_u64())
        .context("no RULES map among the daemon's descriptors")
}

/// The case's section of the report.
fn section(results: &[ShapeResult], concurrency: usize) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mut md = format!(
        "\n## Rule scale: start-up, reload, memory and connection rate\n\n\
         Each rule is one IPv6 /128 in 2001:db8:a::/64 (the IPv4 service prefix holds 256 \
         addresses; IPv4 is keyed IPv4-mapped in the same trie). Start-up: from spawning \
         `l4proxy run` to its `ready` log line. Reload: `l4proxy reload` (it answers once \
         the new policy is in force), either moving {MOVED} rules to other prefixes (same \
         port classes) or adding port 8443 to one rule (new port classes: every entry is \
         written again). RULES map: `bpftool map show`'s `bytes_memlock`. RSS: the daemon and \
         its crash-guard child (VmRSS). Connection rate: concurrency {concurrency}, to the \
         last rule, ÷ the same daemon started with that rule alone. Each repetition starts the rule alone, then the whole policy. TPROXY: the same rules \
         with `ip6tables-restore` (nf_tables backend) in the proxy namespace, into an empty \
         table (load) and replacing them with the changed rules (reload); each prefix one \
         rule, a range `--dport 1024:65535`. Its connection rate is not measured here: \
         TPROXY rules are evaluated one after another for each connection's first packet \
         (`--only rules` shows the cost at 10 000). l4proxy's start-up includes loading and verifying its \
         BPF programs, which TPROXY rules do not need (their proxy runs already).\n\n\
         | policy | start-up s | reload s (moved) | reload s (ports) | RULES map MiB | RSS MiB | \
         conn/s | ÷ 1 rule |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in results {
        let _ = writeln!(
            md,
            "| l4proxy, {} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.3} |",
            r.shape.label,
            seconds(r.start_up),
            seconds(r.reload_moved),
            seconds(r.reload_ports),
            r.rules_map_bytes as f64 / MIB,
            r.rss as f64 / MIB,
            r.rate.median,
            r.rate.median / r.rate_one.median,
        );
        let _ = writeln!(
            md,
            "| l4proxy, its last rule alone | {} | | | | {:.1} | {:.0} | 1 |",
            seconds(r.start_up_one),
            r.rss_one as f64 / MIB,
            r.rate_one.median,
        );
        let _ = writeln!(
            md,
            "| ip6tables-restore, {} | {} | {} | {} | | | | |",
            r.shape.label,
            seconds(r.tproxy_load),
            seconds(r.tproxy_moved),
            seconds(r.tproxy_ports),
        );
    }
    md += "\n| policy | start-up ÷ TPROXY load | reload ÷ TPROXY reload (moved) | \
           reload ÷ TPROXY reload (ports) | target (< 2 s, faster than TPROXY, conn/s within 5 %) |\n\
           |---|---:|---:|---:|---|\n";
    for r in results {
        let met = r.start_up.median < 2.0
            && r.reload_moved.median < 2.0
            && r.reload_ports.median < 2.0
            && r.start_up.median < r.tproxy_load.median
            && r.reload_moved.median < r.tproxy_moved.median
            && r.reload_ports.median < r.tproxy_ports.median
            && r.rate.median >= 0.95 * r.rate_one.median;
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.2} | {:.2} | {} |",
            r.shape.label,
            r.start_up.median / r.tproxy_load.median,
            r.reload_moved.median / r.tproxy_moved.median,
            r.reload_ports.median / r.tproxy_ports.median,
            if met { "met" } else { "missed" }
        );
    }
    md
}

/// A median in seconds with its range.
fn seconds(s: Spread) -> String {
    format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max)
}
