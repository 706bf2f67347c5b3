//! The results as a Markdown report and two hand-written SVG charts.

use std::{fmt::Write as _, path::Path};

use anyhow::Context;

use super::{stats::Spread, targets::Target};

/// One bulk-throughput case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub streams: usize,
    /// Server to client (`iperf3 -R`).
    pub reverse: bool,
}

/// The condition a figure was measured under: the first column of its table.
pub trait Condition: Copy + PartialEq {
    /// The column's header and Markdown alignment.
    const COLUMN: (&'static str, &'static str);
    fn label(self) -> String;

    /// The condition in a sentence ("concurrency 64").
    fn named(self) -> String {
        format!("{} {}", Self::COLUMN.0, self.label())
    }
}

impl Condition for Flow {
    const COLUMN: (&'static str, &'static str) = ("case", "---");

    fn label(self) -> String {
        let streams = match self.streams {
            1 => "1 stream".to_owned(),
            n => format!("{n} streams"),
        };
        let way = if self.reverse {
            "server→client"
        } else {
            "client→server"
        };
        format!("{streams}, {way}")
    }

    fn named(self) -> String {
        self.label()
    }
}

/// Concurrency: connections in flight at once.
impl Condition for usize {
    const COLUMN: (&'static str, &'static str) = ("concurrency", "---:");

    fn label(self) -> String {
        self.to_string()
    }
}

/// How a table shows a figure: the unit, its factor from the measured one
/// (per second), and the decimals.
struct Unit {
    name: &'static str,
    scale: f64,
    decimals: usize,
}

const GBIT: Unit = Unit {
    name: "Gbit/s",
    scale: 1e-9,
    decimals: 2,
};

const CONN: Unit = Unit {
    name: "conn/s",
    scale: 1.0,
    decimals: 0,
};

/// CPU cost, measured in seconds per connection.
const CPU_PER_CONN: Unit = Unit {
    name: "CPU µs/conn",
    scale: 1e6,
    decimals: 0,
};

const CPU_PER_TUNNEL: Unit = Unit {
    name: "CPU µs/tunnel",
    ..CPU_PER_CONN
};

/// The kernel's part of a proxy's CPU cost (its system time).
const SYSTEM_PER_CONN: Unit = Unit {
    name: "system CPU µs/conn",
    ..CPU_PER_CONN
};

const SYSTEM_PER_TUNNEL: Unit = Unit {
    name: "system CPU µs/tunnel",
    ..CPU_PER_TUNNEL
};

/// CPU cost, measured in seconds per GiB received.
const CPU_PER_GIB: Unit = Unit {
    name: "CPU s/GiB",
    scale: 1.0,
    decimals: 2,
};

/// A share of the machine's cores, in percent.
const BUSY: Unit = Unit {
    name: "cores busy, %",
    scale: 100.0,
    decimals: 0,
};

/// The whole machine's busy CPU over each run, per unit of work and as a
/// share of the cores' time.
pub struct MachineRows<K> {
    pub per_unit: Vec<Row<K>>,
    pub share: Vec<Row<K>>,
}

impl<K> Default for MachineRows<K> {
    fn default() -> Self {
        MachineRows {
            per_unit: Vec::new(),
            share: Vec::new(),
        }
    }
}

/// The machine's CPU per `unit_name` and how busy its cores were.
fn machine_tables<K: Condition>(
    rows: &MachineRows<K>,
    unit_name: &str,
    unit: &Unit,
    versus: &[Target],
) -> String {
    if rows.per_unit.is_empty() {
        return String::new();
    }
    let mut md = format!(
        "\n### The whole machine's CPU per {unit_name}, and how busy its cores were\n\n\
         Busy CPU time of all cores over each run (/proc/stat: client, server, proxy and \
         the kernel's own work, softirqs included) per {unit_name}, and as a share of the \
         cores' time. Where the cores were busy throughout on two paths, the cores were \
         the limit: one path's rate ÷ the other's is the other's CPU per {unit_name} ÷ its \
         own, and what a proxy adds per {unit_name} is what it costs in rate.\n\n"
    );
    md += &figure_table(&rows.per_unit, unit, versus);
    md.push('\n');
    md += &figure_table(&rows.share, &BUSY, &[]);
    md
}

/// A measured figure of one path in one case.
pub struct Row<K> {
    pub case: K,
    pub target: Target,
    pub value: Spread,
}

pub struct LatencyRow {
    pub target: Target,
    /// p50, p99, p99.9 in microseconds.
    pub quantiles: [Spread; 3],
}

pub struct MemoryRow {
    pub target: Target,
    pub connections: usize,
    pub rss_before: u64,
    pub rss_with: u64,
}

impl MemoryRow {
    fn per_connection(&self) -> f64 {
        self.rss_with.saturating_sub(self.rss_before) as f64 / self.connections as f64
    }
}

pub struct RulesRow {
    pub steering: &'static str,
    pub rules: usize,
    pub rate: Spread,
}

/// TCP segments the proxy host sent and received per connection, by
/// concurrency.
#[derive(Default)]
pub struct SegmentRows {
    pub sent: Vec<Row<usize>>,
    pub received: Vec<Row<usize>>,
}

#[derive(Default)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub setup: Vec<String>,
    pub throughput: Vec<Row<Flow>>,
    /// CPU seconds of each proxy per GiB relayed, by case.
    pub throughput_cpu: Vec<Row<Flow>>,
    /// The whole machine's busy CPU per GiB relayed.
    pub throughput_machine: MachineRows<Flow>,
    pub rate: Vec<Row<usize>>,
    /// CPU seconds of each proxy per connection, by concurrency.
    pub rate_cpu: Vec<Row<usize>>,
    /// The system (kernel) part of `rate_cpu`.
    pub rate_cpu_system: Vec<Row<usize>>,
    /// TCP segments on the proxy host per connection.
    pub rate_segments: SegmentRows,
    /// The whole machine's busy CPU per connection.
    pub rate_machine: MachineRows<usize>,
    pub rate_title: String,
    pub latency: Vec<LatencyRow>,
    pub latency_requests: usize,
    pub memory: Vec<MemoryRow>,
    pub rules: Vec<RulesRow>,
    pub rules_concurrency: usize,
    /// CONNECT case: tunnel set-up rate by concurrency, one stream's throughput.
    pub connect_rate: Vec<Row<usize>>,
    /// CPU seconds of each proxy per tunnel, by concurrency.
    pub connect_rate_cpu: Vec<Row<usize>>,
    /// The system (kernel) part of `connect_rate_cpu`.
    pub connect_rate_cpu_system: Vec<Row<usize>>,
    /// TCP segments on the proxy host per tunnel.
    pub connect_segments: SegmentRows,
    /// The whole machine's busy CPU per tunnel.
    pub connect_machine: MachineRows<usize>,
    pub connect_throughput: Vec<Row<Flow>>,
    /// How the CONNECT case measures, as a paragraph.
    pub connect_how: String,
    /// Sections written by their cases as Markdown (the TLS case's), put
    /// before the notes.
    pub sections: Vec<String>,
    pub notes: Vec<String>,
}

impl Report {
    /// Writes `<stamp>.md` and its charts into `dir`, and the same as
    /// `latest.md`, `latest-*.svg`; returns the Markdown.
    pub fn write(&self, dir: &Path, stamp: &str) -> anyhow::Result<String> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for name in [stamp, "latest"] {
            let markdown = self.markdown(name);
            std::fs::write(dir.join(format!("{name}.md")), &markdown)?;
            if !self.throughput.is_empty() {
                std::fs::write(
                    dir.join(format!("{name}-throughput.svg")),
                    self.throughput_svg(),
                )?;
            }
            if !self.rules.is_empty() {
                std::fs::write(dir.join(format!("{name}-rules.svg")), self.rules_svg())?;
            }
        }
        Ok(self.markdown(stamp))
    }

    fn markdown(&self, name: &str) -> String {
        let mut md = format!("# l4proxy benchmark, {}\n\n", self.date);
        let _ = writeln!(md, "`{}`\n", self.command);
        for line in &self.setup {
            let _ = writeln!(md, "- {line}");
        }
        md += "\nEach figure is the median of the runs, with their range (min–max). \
               Ratios divide the median by the same case's median on another path. \
               CPU: the proxy's CPU time (user + system of all its processes and threads, \
               from /proc) over each run, divided by the GiB its receiving end counted or by \
               the connections completed; lower is better. It is less disturbed than the \
               rates by the client and the server sharing the cores.\n";
        md += &self.targets();

        if !self.throughput.is_empty() {
            md += "\n## Bulk throughput (iperf3, Gbit/s, higher is better)\n\n";
            let mut versus = vec![Target::Direct];
            versus.extend(Target::PEERS);
            md += &figure_table(&self.throughput, &GBIT, &versus);
            let _ = writeln!(md, "\n![throughput]({name}-throughput.svg)");
            if !self.throughput_cpu.is_empty() {
                md += "\n### CPU per GiB relayed (lower is better)\n\n";
                md += &figure_table(&self.throughput_cpu, &CPU_PER_GIB, &Target::PEERS);
            }
            md += &machine_tables(
                &self.throughput_machine,
                "GiB",
                &CPU_PER_GIB,
                &[Target::Direct],
            );
        }

        if !self.rate.is_empty() {
            let _ = write!(
                md,
                "\n## Connection rate ({}; conn/s, higher is better)\n\n",
                self.rate_title
            );
            md += &figure_table(
                &self.rate,
                &CONN,
                &[Target::Direct, Target::Haproxy, Target::Nginx],
            );
            if !self.rate_cpu.is_empty() {
                md += "\n### CPU per connection (lower is better)\n\n";
                md += &figure_table(
                    &self.rate_cpu,
                    &CPU_PER_CONN,
                    &[Target::Haproxy, Target::Nginx],
                );
            }
            md += &system_table(
                &self.rate_cpu_system,
                &SYSTEM_PER_CONN,
                &[Target::Haproxy, Target::Nginx],
            );
            md += &segments_tables(
                &self.rate_segments,
                "connection",
                &[Target::Haproxy, Target::Nginx],
            );
            md += &machine_tables(
                &self.rate_machine,
                "connection",
                &CPU_PER_CONN,
                &[Target::Direct, Target::Haproxy, Target::Nginx],
            );
        }

        if !self.latency.is_empty() {
            let _ = write!(
                md,
                "\n## Latency: time to first byte ({} sequential short connections; µs, lower is better)\n\n\
                 \"added\" is the path's figure minus the direct path's.\n\n\
                 | path | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 | \
                 added p99 ÷ HAProxy's | added p99 ÷ nginx's |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
                self.latency_requests
            );
            for row in &self.latency {
                let q = |i: usize| {
                    let s = row.quantiles[i];
                    format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max)
                };
                let a = |i: usize| {
                    self.added(row.target, i)
                        .map_or("–".to_owned(), |v| format!("{v:+.0}"))
                };
                let vs = |peer: Target| match (row.target, self.added(row.target, 1)) {
                    (Target::Direct, _) | (_, None) => "–".to_owned(),
                    (_, Some(mine)) => ratio(mine, self.added(peer, 1)),
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    row.target.label(),
                    q(0),
                    q(1),
                    q(2),
                    a(0),
                    a(1),
                    a(2),
                    vs(Target::Haproxy),
                    vs(Target::Nginx),
                );
            }
        }

        if !self.memory.is_empty() {
            md += "\n## Memory with idle connections (RSS of the proxy's processes; lower is better)\n\n\
                   Each connection sent a ClientHello and got its answer, then stayed open and idle. \
                   One measurement per proxy, on a freshly started process.\n\n\
                   | path | idle connections | RSS before | RSS with them | per connection | ÷ HAProxy | ÷ nginx |\n\
                   |---|---:|---:|---:|---:|---:|---:|\n";
            for row in &self.memory {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {} | {} |",
                    row.target.label(),
                    row.connections,
                    row.rss_before as f64 / MIB,
                    row.rss_with as f64 / MIB,
                    row.per_connection() / 1024.0,
                    ratio(row.per_connection(), self.memory_of(Target::Haproxy)),
                    ratio(row.per_connection(), self.memory_of(Target::Nginx)),
                );
            }
        }

        if !self.rules.is_empty() {
            let _ = write!(
                md,
                "\n## Steering cost as rules grow (conn/s at concurrency {}, to the last rule; higher is better)\n\n\
                 | steering | rules | conn/s | min–max | ÷ same steering at 1 rule |\n\
                 |---|---:|---:|---:|---:|\n",
                self.rules_concurrency
            );
            for row in &self.rules {
                let one = self
                    .rules
                    .iter()
                    .find(|r| r.steering == row.steering && r.rules == 1)
                    .map(|r| r.rate.median);
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.0}–{:.0} | {} |",
                    row.steering,
                    row.rules,
                    row.rate.median,
                    row.rate.min,
                    row.rate.max,
                    ratio(row.rate.median, one)
                );
            }
            let _ = writeln!(md, "\n![rules]({name}-rules.svg)");
        }

        if !self.connect_rate.is_empty() || !self.connect_throughput.is_empty() {
            let _ = write!(
                md,
                "\n## CONNECT tunnels: l4proxy and Squid as explicit proxies\n\n{}\n\n",
                self.connect_how
            );
            md += &self.connect_summary();
            let versus = [Target::Direct, Target::Squid];
            if !self.connect_rate.is_empty() {
                md += "\n### Tunnel set-up rate (conn/s, higher is better)\n\n";
                md += &figure_table(&self.connect_rate, &CONN, &versus);
            }
            if !self.connect_rate_cpu.is_empty() {
                md += "\n### CPU per tunnel (lower is better)\n\n";
                md += &figure_table(&self.connect_rate_cpu, &CPU_PER_TUNNEL, &[Target::Squid]);
            }
            md += &system_table(
                &self.connect_rate_cpu_system,
                &SYSTEM_PER_TUNNEL,
                &[Target::Squid],
            );
            md += &segments_tables(&self.connect_segments, "tunnel", &[Target::Squid]);
            md += &machine_tables(
                &self.connect_machine,
                "tunnel",
                &CPU_PER_TUNNEL,
                &[Target::Direct, Target::Squid],
            );
            if !self.connect_throughput.is_empty() {
                md += "\n### One stream through the tunnel (Gbit/s, higher is better)\n\n";
                md += &figure_table(&self.connect_throughput, &GBIT, &versus);
            }
        }

        for section in &self.sections {
            md += section;
        }

        if !self.notes.is_empty() {
            md += "\n## Notes\n\n";
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        md
    }

    /// l4proxy's CONNECT figures against their targets, in the
    /// README's table shape.
    fn connect_summary(&self) -> String {
        /// Tunnel set-up rate wanted, as a multiple of Squid's.
        const RATE_TARGET: f64 = 1.5;
        let mut md =
            "| | l4proxy | ÷ direct | ÷ Squid | target |\n|---|---:|---:|---:|---|\n".to_owned();
        let rates: Vec<(usize, f64)> = self
            .connect_rate
            .iter()
            .filter(|r| r.target == Target::L4proxy)
            .map(|r| (r.case, r.value.median))
            .collect();
        if !rates.is_empty() {
            let other = |c, t| find(&self.connect_rate, c, t);
            let cells = |cell: &dyn Fn(usize, f64) -> String| {
                let all: Vec<String> = rates.iter().map(|&(c, v)| cell(c, v)).collect();
                all.join(" / ")
            };
            let _ = writeln!(
                md,
                "| tunnel set-up, conn/s at concurrency {} | {} | {} | {} | ≥ {RATE_TARGET}× Squid: {} |",
                cells(&|c, _| c.to_string()),
                cells(&|_, v| format!("{v:.0}")),
                cells(&|c, v| ratio(v, other(c, Target::Direct))),
                cells(&|c, v| ratio(v, other(c, Target::Squid))),
                met(rates
                    .iter()
                    .map(|&(c, v)| other(c, Target::Squid).map(|s| v >= RATE_TARGET * s))),
            );
        }
        let cpu: Vec<&Row<usize>> = self
            .connect_rate_cpu
            .iter()
            .filter(|r| r.target == Target::L4proxy)
            .collect();
        if !cpu.is_empty() {
            let cells = |cell: &dyn Fn(&Row<usize>) -> String| {
                let all: Vec<String> = cpu.iter().map(|r| cell(r)).collect();
                all.join(" / ")
            };
            let squid = |r: &Row<usize>| find(&self.connect_rate_cpu, r.case, Target::Squid);
            let _ = writeln!(
                md,
                "| CPU per tunnel, µs at concurrency {} | {} | – | {} | – |",
                cells(&|r| r.case.to_string()),
                cells(&|r| format!("{:.0}", r.value.median * CPU_PER_TUNNEL.scale)),
                cells(&|r| ratio(r.value.median, squid(r))),
            );
        }
        for row in &self.connect_throughput {
            if row.target != Target::L4proxy {
                continue;
            }
            let v = row.value.median;
            let other = |t| find(&self.connect_throughput, row.case, t);
            let _ = writeln!(
                md,
                "| throughput, {} | {:.2} Gbit/s | {} | {} | ≥ Squid: {} |",
                row.case.label(),
                v * GBIT.scale,
                ratio(v, other(Target::Direct)),
                ratio(v, other(Target::Squid)),
                met([other(Target::Squid).map(|s| v >= s)]),
            );
        }
        md
    }

    /// The path's time to first byte at quantile `i` (p50, p99, p99.9) minus
    /// the direct path's, in µs (medians).
    fn added(&self, target: Target, i: usize) -> Option<f64> {
        let of = |t: Target| {
            self.latency
                .iter()
                .find(|r| r.target == t)
                .map(|r| r.quantiles[i].median)
        };
        Some(of(target)? - of(Target::Direct)?)
    }

    fn memory_of(&self, target: Target) -> Option<f64> {
        self.memory
            .iter()
            .find(|r| r.target == target)
            .map(MemoryRow::per_connection)
    }

    /// l4proxy against the performance targets, each measured against the
    /// better of the peers (HAProxy, with and without splice, and nginx):
    /// one line per target with its figures; none for a case not run.
    fn targets(&self) -> String {
        let mut lines: Vec<String> = Vec::new();
        let rate_peers = [Target::Haproxy, Target::Nginx];
        if let Some(line) = target_line(
            "SNI-routed conn/s ≥ 1.1× the better peer's",
            &self.rate,
            |_| true,
            &rate_peers,
            Better::Higher,
            |_| 1.1,
            &CONN,
        ) {
            lines.push(line);
        }
        if let Some(line) = target_line(
            "CPU per connection ≤ 0.8× the cheaper peer's",
            &self.rate_cpu,
            |_| true,
            &rate_peers,
            Better::Lower,
            |_| 0.8,
            &CPU_PER_CONN,
        ) {
            lines.push(line);
        }
        if let Some(line) = target_line(
            "CPU per GiB relayed ≤ 0.8× the cheaper peer's",
            &self.throughput_cpu,
            |_| true,
            &Target::PEERS,
            Better::Lower,
            |_| 0.8,
            &CPU_PER_GIB,
        ) {
            lines.push(line);
        }
        for (streams, wanted) in [(1, 0.9), (8, 0.7)] {
            if let Some(line) = target_line(
                &format!(
                    "throughput with {streams} stream{}, each way, ≥ {wanted}× the direct path",
                    if streams == 1 { "" } else { "s" }
                ),
                &self.throughput,
                |flow| flow.streams == streams,
                &[Target::Direct],
                Better::Higher,
                |_| wanted,
                &GBIT,
            ) {
                lines.push(line);
            }
        }
        if let Some(mine) = self.added(Target::L4proxy, 1) {
            let best = rate_peers
                .iter()
                .filter_map(|&t| Some((t, self.added(t, 1)?)))
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((peer, theirs)) = best {
                lines.push(added_p99_line(mine, peer, theirs));
            }
        }
        if let Some(mine) = self.memory_of(Target::L4proxy) {
            let peers: Vec<String> = Target::PEERS
                .iter()
                .filter_map(|&t| {
                    let theirs = self.memory_of(t)?;
                    Some(format!("{} {:.1} KiB", t.label(), theirs / 1024.0))
                })
                .collect();
            lines.push(format!(
                "- memory per idle connection ≤ 2 KiB: {}: l4proxy {:.1} KiB ({})",
                met([Some(mine <= 2048.0)]),
                mine / 1024.0,
                peers.join(", ")
            ));
        }
        if lines.is_empty() {
            return String::new();
        }
        format!(
            "\n## Against the targets\n\n\
             Medians of this run; \"the better peer\" is the best of HAProxy (with and without \
             splice where both ran) and nginx in the same case: the higher rate, the lower CPU, \
             time to first byte or memory.\n\n{}\n",
            lines.join("\n")
        )
    }

    /// Grouped bars: one group per case, one bar per path, min–max whiskers.
    fn throughput_svg(&self) -> String {
        let mut cases: Vec<Flow> = Vec::new();
        for row in &self.throughput {
            if !cases.contains(&row.case) {
                cases.push(row.case);
            }
        }
        let top = self
            .throughput
            .iter()
            .map(|r| r.value.max * 1e-9)
            .fold(1.0, f64::max)
            .ceil();
        let (width, height, left, bottom, plot_h) = (760.0, 380.0, 60.0, 330.0, 280.0);
        let group_w = (width - left - 20.0) / cases.len().max(1) as f64;
        let bar_w = group_w / (Target::ALL.len() as f64 + 1.5);
        let y = |gbit: f64| bottom - gbit / top * plot_h;
        let mut svg = svg_head(width, height, "Bulk throughput, Gbit/s (median, min–max)");
        axis(&mut svg, left, bottom, width, top, plot_h, "Gbit/s");
        for (c, case) in cases.iter().enumerate() {
            let x0 = left + c as f64 * group_w + bar_w * 0.75;
            for (t, target) in Target::ALL.iter().enumerate() {
                let Some(row) = self
                    .throughput
                    .iter()
                    .find(|r| r.case == *case && r.target == *target)
                else {
                    continue;
                };
                let v = row.value.scaled(1e-9);
                let x = x0 + t as f64 * bar_w;
                let _ = write!(
                    svg,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"/><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                    y(v.median),
                    bar_w * 0.9,
                    bottom - y(v.median),
                    COLORS[t],
                    x + bar_w * 0.45,
                    x + bar_w * 0.45,
                    y(v.min),
                    y(v.max)
                );
            }
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                left + (c as f64 + 0.5) * group_w,
                bottom + 18.0,
                case.label()
            );
        }
        for (t, target) in Target::ALL.iter().enumerate() {
            let x = left + 10.0 + t as f64 * 150.0;
            let _ = write!(
                svg,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                height - 22.0,
                COLORS[t],
                x + 16.0,
                height - 12.0,
                target.label()
            );
        }
        svg + "</svg>\n"
    }

    /// Connection rate relative to one rule, per steering mechanism.
    fn rules_svg(&self) -> String {
        let mut steerings: Vec<&str> = Vec::new();
        let mut counts: Vec<usize> = Vec::new();
        for row in &self.rules {
            if !steerings.contains(&row.steering) {
                steerings.push(row.steering);
            }
            if !counts.contains(&row.rules) {
                counts.push(row.rules);
            }
        }
        counts.sort_unstable();
        let (width, height, left, bottom, plot_h) = (760.0, 380.0, 60.0, 330.0, 280.0);
        let top = 1.25;
        // Room on the right for the last point's label.
        let step = (width - left - 160.0) / (counts.len().max(2) - 1) as f64;
        let x = |i: usize| left + 40.0 + i as f64 * step;
        let y = |relative: f64| bottom - relative / top * plot_h;
        let mut svg = svg_head(
            width,
            height,
            "Connection rate vs. number of rules (÷ rate at 1 rule)",
        );
        axis(&mut svg, left, bottom, width, top, plot_h, "÷ 1 rule");
        for (i, count) in counts.iter().enumerate() {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{count} rule{}</text>"#,
                x(i),
                bottom + 18.0,
                if *count == 1 { "" } else { "s" }
            );
        }
        for (s, steering) in steerings.iter().enumerate() {
            let one = self
                .rules
                .iter()
                .find(|r| r.steering == *steering && r.rules == 1)
                .map(|r| r.rate.median);
            let Some(one) = one.filter(|v| *v > 0.0) else {
                continue;
            };
            let points: Vec<(f64, f64, f64)> = counts
                .iter()
                .enumerate()
                .filter_map(|(i, count)| {
                    let row = self
                        .rules
                        .iter()
                        .find(|r| r.steering == *steering && r.rules == *count)?;
                    Some((x(i), y(row.rate.median / one), row.rate.median))
                })
                .collect();
            let path: Vec<String> = points
                .iter()
                .map(|(px, py, _)| format!("{px:.1},{py:.1}"))
                .collect();
            let _ = write!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                path.join(" "),
                COLORS[s + 1]
            );
            // The first series labels its points above, the others below.
            let label_dy = if s == 0 { -8.0 } else { 18.0 };
            for (px, py, rate) in points {
                let _ = write!(
                    svg,
                    r#"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{}"/><text x="{:.1}" y="{:.1}">{rate:.0} conn/s</text>"#,
                    COLORS[s + 1],
                    px + 6.0,
                    py + label_dy
                );
            }
            let lx = left + 10.0 + s as f64 * 300.0;
            let _ = write!(
                svg,
                r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{steering}</text>"#,
                height - 22.0,
                COLORS[s + 1],
                lx + 16.0,
                height - 12.0
            );
        }
        svg + "</svg>\n"
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// One color per path (in `Target::ALL` order), reused for the rule chart.
const COLORS: [&str; 5] = ["#7f7f7f", "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c"];

/// The proxies' system time per unit, under a heading that says what it
/// is; nothing when it was not measured.
fn system_table<K: Condition>(rows: &[Row<K>], unit: &Unit, versus: &[Target]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    "\n#### Of which in the kernel (system time)\n\n\
     The kernel's work in the proxy's own context: its system calls and the TCP work \
     done in them. The proxy's own code lowers it only by making fewer calls and \
     sending fewer packets.\n\n"
        .to_owned()
        + &figure_table(rows, unit, versus)
}

/// Segments sent and received on the proxy host per connection (or
/// `per` what), each path's against `versus`.
fn segments_tables(rows: &SegmentRows, per: &str, versus: &[Target]) -> String {
    if rows.sent.is_empty() {
        return String::new();
    }
    let unit = |name| Unit {
        name,
        scale: 1.0,
        decimals: 1,
    };
    format!(
        "\n#### TCP segments on the proxy host, per {per} (lower is better)\n\n\
         Counted in the proxy host's namespace (`/proc/net/snmp`) over each run, only the \
         measured proxy running: its two TCP connections' packets. Each segment is kernel \
         work on the proxy host and at the peer that takes it.\n\n"
    ) + &figure_table(&rows.sent, &unit("segments sent"), versus)
        + "\n"
        + &figure_table(&rows.received, &unit("segments received"), versus)
}

/// A table of one figure per (condition, path): the median, the range, and
/// the median divided by the same condition's median on each of `versus`.
fn figure_table<K: Condition>(rows: &[Row<K>], unit: &Unit, versus: &[Target]) -> String {
    let (column, align) = K::COLUMN;
    let mut md = format!("| {column} | path | {} | min–max |", unit.name);
    for target in versus {
        let _ = write!(md, " ÷ {} |", target.label());
    }
    let _ = writeln!(
        md,
        "\n|{align}|---|---:|---:|{}",
        "---:|".repeat(versus.len())
    );
    let p = unit.decimals;
    for row in rows {
        let v = row.value.scaled(unit.scale);
        let _ = write!(
            md,
            "| {} | {} | {:.p$} | {:.p$}–{:.p$} |",
            row.case.label(),
            row.target.label(),
            v.median,
            v.min,
            v.max,
        );
        for &target in versus {
            let _ = write!(
                md,
                " {} |",
                ratio(row.value.median, find(rows, row.case, target))
            );
        }
        md.push('\n');
    }
    md
}

/// Which way a figure is better.
#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

/// One target line: for each case of `rows` that `case` keeps and where
/// l4proxy has a figure, l4proxy's median against the best of `peers`'
/// medians, which must be at least (`Higher`) or at most (`Lower`)
/// `factor(case)` times it. `None` if l4proxy or every peer is missing.
fn target_line<K: Condition>(
    what: &str,
    rows: &[Row<K>],
    case: impl Fn(K) -> bool,
    peers: &[Target],
    better: Better,
    factor: impl Fn(K) -> f64,
    unit: &Unit,
) -> Option<String> {
    let p = unit.decimals;
    let mut checks = Vec::new();
    let mut figures = Vec::new();
    for row in rows
        .iter()
        .filter(|r| r.target == Target::L4proxy && case(r.case))
    {
        let theirs = peers
            .iter()
            .filter_map(|&t| Some((t, find(rows, row.case, t)?)))
            .reduce(|a, b| match better {
                Better::Higher if b.1 > a.1 => b,
                Better::Lower if b.1 < a.1 => b,
                _ => a,
            });
        let Some((peer, theirs)) = theirs else {
            continue;
        };
        let (mine, wanted) = (row.value.median, factor(row.case) * theirs);
        checks.push(Some(match better {
            Better::Higher => mine >= wanted,
            Better::Lower => mine <= wanted,
        }));
        figures.push(format!(
            "{}: {:.p$} vs {}'s {:.p$} {} ({})",
            row.case.named(),
            mine * unit.scale,
            peer.label(),
            theirs * unit.scale,
            unit.name,
            ratio(mine, Some(theirs)),
        ));
    }
    if checks.is_empty() {
        return None;
    }
    Some(format!("- {what}: {}: {}", met(checks), figures.join("; ")))
}

/// "met" when every check holds, "**not met**" when one fails, "–" without
/// anything to compare with.
fn met(checks: impl IntoIterator<Item = Option<bool>>) -> &'static str {
    match checks.into_iter().collect::<Option<Vec<bool>>>() {
        Some(all) if all.is_empty() => "–",
        Some(all) if all.iter().all(|&ok| ok) => "met",
        Some(_) => "**not met**",
        None => "–",
    }
}

/// The time-to-first-byte target's line, from l4proxy's and the better
/// peer's added p99 (µs over the direct path's). A direct path whose p99
/// was not below a proxy's (a disturbed direct run) leaves nothing to
/// compare: a negative figure "met" 0.8× of a more negative one.
fn added_p99_line(mine: f64, peer: Target, theirs: f64) -> String {
    let verdict = if mine <= 0.0 || theirs <= 0.0 {
        "not measured (the direct path's p99 was not below every proxy's)"
    } else {
        met([Some(mine <= 0.8 * theirs)])
    };
    format!(
        "- added time to first byte p99 ≤ 0.8× the better peer's: {verdict}: l4proxy \
         {mine:+.0} µs, {}'s {theirs:+.0} µs ({})",
        peer.label(),
        ratio(mine, Some(theirs)),
    )
}

fn find<K: PartialEq + Copy>(rows: &[Row<K>], case: K, target: Target) -> Option<f64> {
    rows.iter()
        .find(|r| r.case == case && r.target == target)
        .map(|r| r.value.median)
}

/// `a ÷ b` as "0.93×", or "–" when there is nothing to divide by.
fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".to_owned(),
    }
}

fn svg_head(width: f64, height: f64, title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>"#,
        width / 2.0
    )
}

/// The y axis with five grid lines from 0 to `top`.
fn axis(svg: &mut String, left: f64, bottom: f64, width: f64, top: f64, plot_h: f64, unit: &str) {
    for i in 0..=5 {
        let value = top * i as f64 / 5.0;
        let y = bottom - plot_h * i as f64 / 5.0;
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{value:.2}</text>"##,
            width - 20.0,
            left - 6.0,
            y + 4.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">{unit}</text>"#,
        bottom - plot_h / 2.0,
        bottom - plot_h / 2.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<K>(case: K, target: Target, median: f64) -> Row<K> {
        Row {
            case,
            target,
            value: Spread {
                median,
                min: median - 1.0,
                max: median + 1.0,
            },
        }
    }

    #[test]
    fn a_figure_table_has_a_ratio_column_per_path_compared_with() {
        let rows = [
            row(64, Target::Direct, 4000.0),
            row(64, Target::L4proxy, 3000.0),
            row(64, Target::Squid, 2000.0),
        ];
        let table = figure_table(&rows, &CONN, &[Target::Direct, Target::Squid]);
        assert_eq!(
            table,
            "| concurrency | path | conn/s | min–max | ÷ direct | ÷ Squid |\n\
             |---:|---|---:|---:|---:|---:|\n\
             | 64 | direct | 4000 | 3999–4001 | 1.00× | 2.00× |\n\
             | 64 | l4proxy | 3000 | 2999–3001 | 0.75× | 1.50× |\n\
             | 64 | Squid | 2000 | 1999–2001 | 0.50× | 1.00× |\n"
        );
    }

    #[test]
    fn a_target_line_sets_l4proxy_against_the_better_peer() {
        let rates = [
            row(64, Target::L4proxy, 1200.0),
            row(64, Target::Haproxy, 1000.0),
            row(64, Target::Nginx, 1100.0),
        ];
        let line = target_line(
            "conn/s ≥ 1.1×",
            &rates,
            |_| true,
            &[Target::Haproxy, Target::Nginx],
            Better::Higher,
            |_| 1.1,
            &CONN,
        );
        assert_eq!(
            line.as_deref(),
            Some(
                "- conn/s ≥ 1.1×: **not met**: concurrency 64: 1200 vs nginx's 1100 conn/s (1.09×)"
            )
        );
        let cpu = [
            row(64, Target::L4proxy, 80e-6),
            row(64, Target::Haproxy, 120e-6),
            row(64, Target::Nginx, 100e-6),
        ];
        let line = target_line(
            "CPU ≤ 0.8×",
            &cpu,
            |_| true,
            &[Target::Haproxy, Target::Nginx],
            Better::Lower,
            |_| 0.8,
            &CPU_PER_CONN,
        );
        assert_eq!(
            line.as_deref(),
            Some("- CPU ≤ 0.8×: met: concurrency 64: 80 vs nginx's 100 CPU µs/conn (0.80×)")
        );
        let alone = [row(64, Target::L4proxy, 1.0)];
        let none = target_line(
            "x",
            &alone,
            |_| true,
            &[Target::Nginx],
            Better::Lower,
            |_| 1.0,
            &CONN,
        );
        assert_eq!(none, None);
    }

    #[test]
    fn an_added_p99_is_compared_only_over_a_quicker_direct_path() {
        assert_eq!(
            added_p99_line(70.0, Target::Nginx, 100.0),
            "- added time to first byte p99 ≤ 0.8× the better peer's: met: l4proxy +70 µs, \
             nginx's +100 µs (0.70×)"
        );
        assert_eq!(
            added_p99_line(90.0, Target::Nginx, 100.0),
            "- added time to first byte p99 ≤ 0.8× the better peer's: **not met**: l4proxy \
             +90 µs, nginx's +100 µs (0.90×)"
        );
        // The 2026-11-29 09:21 run: the direct path's p99 above every proxy's.
        assert_eq!(
            added_p99_line(-155.0, Target::Nginx, -165.0),
            "- added time to first byte p99 ≤ 0.8× the better peer's: not measured (the direct \
             path's p99 was not below every proxy's): l4proxy -155 µs, nginx's -165 µs (–)"
        );
        assert!(added_p99_line(20.0, Target::Haproxy, -5.0).contains("not measured"));
    }

    #[test]
    fn a_target_is_met_when_every_check_holds() {
        assert_eq!(met([Some(true), Some(true)]), "met");
        assert_eq!(met([Some(true), Some(false)]), "**not met**");
        assert_eq!(met([Some(true), None]), "–");
        assert_eq!(met([]), "–");
    }
}
