//! `cargo xtask bench`: l4proxy side by side with the direct path, HAProxy
//! and nginx's stream module, in one namespace lab, and the steering cost of
//! sk_lookup against the classic iptables TPROXY recipe as rules grow.
//!
//! Cases: bulk throughput (iperf3), connection rate of short TLS connections
//! routed by SNI, each with every proxy's CPU time (per GiB relayed, per
//! connection; see `cpu`), added time to first byte, memory per idle connection,
//! connection rate against the number of rules, and l4proxy as an explicit
//! CONNECT proxy beside Squid (tunnel set-up rate, one stream through a
//! tunnel), TLS termination beside HAProxy and nginx (handshakes,
//! resumptions, one stream; see `tls`), and rule scale: 100 000 prefixes
//! and a wide port range against `ip6tables-restore` of the same rules (see
//! `scale`). The report goes to
//! `bench/results/<date>.md` and `bench/results/latest.md`, with SVG charts.
//!
//! On this 2-core machine the client, the proxy and the server share the
//! cores, so the figures are for comparing paths with each other, as ratios.

mod cpu;
mod dial;
mod hello;
mod iperf;
mod lab;
mod load;
mod nginx;
mod report;
mod scale;
mod segments;
mod stats;
mod targets;
mod tls;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use self::{
    dial::Dial,
    lab::{Lab, Proc},
    load::{Mode, Responder},
    report::{
        Condition, Flow, LatencyRow, MachineRows, MemoryRow, Report, Row, RulesRow, SegmentRows,
    },
    stats::{Spread, quantile},
    targets::{Service, Target},
};
use crate::{build_release_daemon, setup, workspace_root};

/// Measure l4proxy against the direct path and HAProxy in a namespace lab.
#[derive(clap::Args)]
pub struct Args {
    /// A short smoke run: one repetition, short runs, fewer idle connections.
    #[arg(long)]
    quick: bool,
    /// Measure this l4proxy binary instead of building target/release/l4proxy.
    #[arg(long, value_name = "PATH")]
    l4proxy: Option<PathBuf>,
    /// Run only these cases (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Case>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Case {
    Memory,
    Throughput,
    Rate,
    Latency,
    Rules,
    Connect,
    Tls,
    Scale,
}

/// How much of each case to run.
struct Plan {
    repetitions: usize,
    iperf_seconds: u64,
    rate_duration: Duration,
    /// Bound on connections per rate run, besides the duration.
    rate_max: u64,
    concurrencies: [usize; 3],
    latency_requests: usize,
    idle_connections: usize,
    rule_counts: [usize; 3],
    rules_concurrency: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        Plan {
            repetitions: if quick { 1 } else { 3 },
            iperf_seconds: if quick { 1 } else { 3 },
            rate_duration: Duration::from_secs(if quick { 1 } else { 3 }),
            rate_max: 200_000,
            concurrencies: [1, 64, 512],
            latency_requests: if quick { 300 } else { 2000 },
            idle_connections: if quick { 1000 } else { 10_000 },
            rule_counts: [1, 1000, 10_000],
            rules_concurrency: 64,
        }
    }
}

/// Descriptors wanted for this process and the daemons it starts (which
/// inherit the limit): 10 000 idle connections take two in each.
const NOFILE: u64 = 200_000;

/// After each connection-rate run: TIME_WAIT and closing sockets settle
/// before the next. The proxy's work then counts, the pause not in the
/// cores' busy share.
const SETTLE: Duration = Duration::from_millis(500);

pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::new(args.quick);
    let wanted_idle = plan.idle_connections;
    let root = workspace_root();
    setup::run()?;
    let binary = match &args.l4proxy {
        Some(path) => path
            .canonicalize()
            .with_context(|| format!("{}", path.display()))?,
        None => build_release_daemon(&root)?,
    };
    let fd_limit = lab::raise_nofile(NOFILE)?;
    // Each idle connection takes two descriptors in this process (client and
    // responder) and two in the proxy, which also needs some for pipes.
    let fit = idle_fit(fd_limit) as usize;
    let mut plan = plan;
    if plan.idle_connections > fit {
        plan.idle_connections = fit;
    }
    lab::sweep_stale();
    lab::clean_up_on_signal()?;
    let work = WorkDir::new()?;

    let mut report = Report {
        date: output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?,
        command: command_line(args),
        setup: machine_description(&root, &binary),
        latency_requests: plan.latency_requests,
        rules_concurrency: plan.rules_concurrency,
        ..Report::default()
    };
    let wanted = |case| args.only.is_empty() || args.only.contains(&case);
    if plan.idle_connections < wanted_idle && wanted(Case::Memory) {
        report.notes.push(format!(
            "Memory: {} idle connections instead of {wanted_idle}: the descriptor limit here is \
             {fd_limit} (no CAP_SYS_RESOURCE to raise the hard limit), and a proxy needs two \
             descriptors per connection.",
            plan.idle_connections
        ));
    }
    report.setup.push(format!(
        "descriptor limit (RLIMIT_NOFILE) for every process: {fd_limit}"
    ));
    {
        let lab = Lab::new()?;
        let mut bench = Bench::start(
            &lab,
            &binary,
            &work.0,
            &plan,
            fd_limit,
            wanted(Case::Connect),
            &mut report,
        )?;
        report.notes.extend(targets::haproxy_choice(bench.maxconn));
        report.notes.push(nginx::choice(bench.nginx_connections));
        // Memory first: on freshly started proxies, before other cases have
        // grown their allocators' free lists.
        if wanted(Case::Memory) {
            bench.memory(&mut report)?;
        }
        if wanted(Case::Throughput) {
            bench.throughput(&mut report)?;
        }
        if wanted(Case::Rate) {
            bench.rate(&mut report)?;
        }
        if wanted(Case::Latency) {
            bench.latency(&mut report)?;
        }
        // Before the rules case, which replaces the l4proxy that has the
        // CONNECT rule.
        if wanted(Case::Connect) {
            bench.connect(&mut report)?;
        }
        // After every case that uses the first l4proxy: it starts its own.
        if wanted(Case::Tls) {
            bench.tls(&mut report)?;
        }
        if wanted(Case::Rules) {
            bench.rules(&mut report)?;
        }
        // Last: it adds IPv6 to the lab and starts its own l4proxy.
        if wanted(Case::Scale) {
            bench.scale(&mut report)?;
        }
    }
    report.notes.push(format!(
        "Total run time {:.0} s.",
        started.elapsed().as_secs_f64()
    ));
    let stamp = output_of("date", &["-u", "+%Y-%m-%d-%H%M"])?;
    let dir = root.join("bench/results");
    let markdown = report.write(&dir, &stamp)?;
    println!("{markdown}");
    eprintln!(
        "bench: written to {} and latest.md",
        dir.join(format!("{stamp}.md")).display()
    );
    Ok(())
}

/// The lab with everything that runs for the whole benchmark.
struct Bench<'a> {
    lab: &'a Lab,
    plan: &'a Plan,
    work: &'a Path,
    binary: &'a Path,
    hello: Arc<[u8]>,
    maxconn: u64,
    fd_limit: u64,
    /// nginx's `worker_connections`.
    nginx_connections: usize,
    // Dropped (stopped) before the lab's namespaces go.
    l4proxy: Option<Proc>,
    haproxy: Proc,
    haproxy_splice: Proc,
    nginx: Proc,
    /// Only during the CONNECT case.
    squid: Option<Proc>,
    _iperf: Proc,
    _responder: Responder,
}

impl<'a> Bench<'a> {
    fn start(
        lab: &'a Lab,
        binary: &'a Path,
        work: &'a Path,
        plan: &'a Plan,
        fd_limit: u64,
        connect: bool,
        report: &mut Report,
    ) -> anyhow::Result<Bench<'a>> {
        eprintln!("bench: starting the server side, l4proxy, HAProxy and nginx");
        let responder = Responder::start(
            &lab.sv,
            &[
                (Service::Tls.server_port(), Mode::Close),
                (Service::Idle.server_port(), Mode::Hold),
            ],
        )?;
        let iperf = Proc::start(
            &lab.sv,
            "iperf3 server",
            &[
                "iperf3",
                "-s",
                "-p",
                &Service::Iperf.server_port().to_string(),
            ],
            &[],
            work.join("iperf3.log"),
        )?;

        let policy = work.join("l4proxy.json");
        let sni = targets::check_policy(binary, &policy, &targets::l4proxy_policy(true, connect));
        report.rate_title =
            "short connections: TLS ClientHello routed by SNI, small reply, close".to_owned();
        if let Err(e) = &sni {
            targets::check_policy(binary, &policy, &targets::l4proxy_policy(false, connect))?;
            report.rate_title +=
                "; l4proxy: SNI routing PENDING, plain forwarding of the same connections";
            report.notes.push(format!(
                "l4proxy's SNI routing is pending: this binary refused the policy with `routes` \
                 ({}), so its connection-rate and latency rows forward the TLS connections \
                 without SNI routing. HAProxy's rows do route by `req.ssl_sni`.",
                e.to_string().lines().next().unwrap_or_default()
            ));
        }
        let l4proxy = targets::start_l4proxy(
            &lab.px,
            binary,
            &policy,
            maxconn(fd_limit),
            &work.join("l4proxy.log"),
        )?;

        let mut haproxies = Vec::new();
        for (target, name) in [
            (Target::Haproxy, "haproxy"),
            (Target::HaproxySplice, "haproxy-splice"),
        ] {
            let ip = target.addr(Service::Tls).ip().to_string();
            lab.px
                .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
            let config = work.join(format!("{name}.cfg"));
            std::fs::write(&config, targets::haproxy_config(target, maxconn(fd_limit)))?;
            haproxies.push(targets::start_haproxy(
                &lab.px,
                name,
                &config,
                &work.join(format!("{name}.log")),
            )?);
        }
        let haproxy_splice = haproxies.pop().expect("two started");
        let haproxy = haproxies.pop().expect("two started");

        let ip = Target::Nginx.ip().to_string();
        lab.px
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        let nginx_connections = nginx::worker_connections(plan.idle_connections);
        let nginx = nginx::start(
            &lab.px,
            &work.join("nginx"),
            &targets::nginx_stream(),
            nginx_connections,
            fd_limit,
            &work.join("nginx.log"),
        )?;
        let mut bench = Bench {
            lab,
            plan,
            work,
            binary,
            hello: hello::client_hello(targets::SNI).into(),
            maxconn: maxconn(fd_limit),
            fd_limit,
            nginx_connections,
            l4proxy: Some(l4proxy),
            haproxy,
            haproxy_splice,
            nginx,
            squid: None,
            _iperf: iperf,
            _responder: responder,
        };
        for target in Target::ALL {
            bench.probe(target.addr(Service::Tls).into(), target)?;
        }
        Ok(bench)
    }

    fn proc(&mut self, target: Target) -> Option<&mut Proc> {
        match target {
            Target::Direct => None,
            Target::L4proxy => self.l4proxy.as_mut(),
            Target::Haproxy => Some(&mut self.haproxy),
            Target::HaproxySplice => Some(&mut self.haproxy_splice),
            Target::Nginx => Some(&mut self.nginx),
            Target::Squid => self.squid.as_mut(),
        }
    }

    /// Only `target`'s proxy runs (none on the direct path) until
    /// [`Self::all_running`]: the others are stopped (SIGSTOP), so that work
    /// a proxy puts off is done in its own runs, not in another path's. Squid
    /// does: idle after its runs, it spent spells of up to 0.4 s of a core
    /// (its timed events, up to half a minute after the load), which landed
    /// in the direct path's and l4proxy's runs.
    fn only_running(&mut self, target: Target) {
        self.pause(|each| each != target);
    }

    /// Continues every proxy [`Self::only_running`] stopped.
    fn all_running(&mut self) {
        self.pause(|_| false);
    }

    fn pause(&mut self, paused: impl Fn(Target) -> bool) {
        for each in Target::PROXIES {
            if let Some(proc) = self.proc(each) {
                proc.pause(paused(each));
            }
        }
    }

    /// CPU time the path's proxy has used so far (none on the direct
    /// path).
    fn proxy_cpu(&mut self, target: Target) -> Option<cpu::CpuTime> {
        self.proc(target).map(|p| cpu::tree_times(p.pid()))
    }

    /// TCP segments counted so far in the proxy host's namespace, read
    /// through the path's proxy (none on the direct path).
    fn proxy_segments(&mut self, target: Target) -> Option<segments::Segments> {
        self.proc(target)
            .and_then(|p| segments::of_namespace(p.pid()))
    }

    /// Waits (up to a minute) until one exchange through `target` works;
    /// fails with the proxy's log if it dies meanwhile.
    fn probe(&mut self, addr: Dial, target: Target) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let hello = self.hello.clone();
            let probed = self.lab.cl.block_on(move || async move {
                load::probe(addr, &hello, Duration::from_secs(1)).await
            })?;
            if let Some(proc) = self.proc(target) {
                proc.check_running()?;
            }
            match probed {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("{} is not answering", target.label())));
                }
                Err(_) => {}
            }
        }
    }

    fn memory(&mut self, report: &mut Report) -> anyhow::Result<()> {
        let count = self.plan.idle_connections;
        for target in [
            Target::L4proxy,
            Target::Haproxy,
            Target::HaproxySplice,
            Target::Nginx,
        ] {
            eprintln!(
                "bench: memory, {count} idle connections through {}",
                target.label()
            );
            let pid = self.proc(target).context("a proxy")?.pid();
            let rss_before = lab::tree_rss(pid)?;
            let (addr, hello) = (target.addr(Service::Idle), self.hello.clone());
            let rss_with = self.lab.cl.block_on(move || {
                load::while_idle(addr, hello, count, move || lab::tree_rss(pid))
            })???;
            report.memory.push(MemoryRow {
                target,
                connections: count,
                rss_before,
                rss_with,
            });
            // The proxy closes its side as the client's closes arrive.
            std::thread::sleep(Duration::from_secs(1));
            self.proc(target).context("a proxy")?.check_running()?;
        }
        Ok(())
    }

    fn throughput(&mut self, report: &mut Report) -> anyhow::Result<()> {
        let flows = [
            Flow {
                streams: 1,
                reverse: false,
            },
            Flow {
                streams: 1,
                reverse: true,
            },
            Flow {
                streams: 8,
                reverse: false,
            },
            Flow {
                streams: 8,
                reverse: true,
            },
        ];
        let mut samples: Vec<(Flow, Target, f64)> = Vec::new();
        let mut cpu_samples: Vec<(Flow, Target, f64)> = Vec::new();
        let mut machine = MachineSamples::default();
        for rep in 1..=self.plan.repetitions {
            for flow in flows {
                for target in Target::ALL {
                    eprintln!(
                        "bench: throughput {rep}/{}, {} streams{}, {}",
                        self.plan.repetitions,
                        flow.streams,
                        if flow.reverse { " reverse" } else { "" },
                        target.label()
                    );
                    self.only_running(target);
                    let (transfer, cpu, busy) = self.iperf(target, flow).or_else(|e| {
                        // A failed run can leave the iperf3 server busy for a moment.
                        eprintln!("bench: {e:#}; retrying once");
                        std::thread::sleep(Duration::from_secs(2));
                        self.iperf(target, flow)
                    })?;
                    samples.push((flow, target, transfer.bits_per_second));
                    let gib = transfer.bytes / cpu::GIB;
                    if let Some(seconds) = cpu {
                        cpu_samples.push((flow, target, seconds / gib));
                    }
                    machine.add(flow, target, busy, gib);
                }
            }
        }
        self.all_running();
        report.throughput = spread_rows(&samples);
        report.throughput_cpu = spread_rows(&cpu_samples);
        report.throughput_machine = machine.rows();
        Ok(())
    }

    /// One iperf3 run through `target`, the CPU seconds its proxy spent
    /// meanwhile, and the whole machine's.
    fn iperf(
        &mut self,
        target: Target,
        flow: Flow,
    ) -> anyhow::Result<(iperf::Transfer, Option<f64>, Option<cpu::MachineBusy>)> {
        let before = self.proxy_cpu(target);
        let machine = cpu::MachineWatch::start();
        let transfer = iperf::throughput(
            &self.lab.cl,
            target.addr(Service::Iperf),
            flow.streams,
            flow.reverse,
            self.plan.iperf_seconds,
        )?;
        let machine = machine.and_then(|watch| watch.stop(Duration::ZERO));
        let cpu = before
            .zip(self.proxy_cpu(target))
            .map(|(b, a)| a.since(b).total());
        Ok((transfer, cpu, machine))
    }

    fn rate(&mut self, report: &mut Report) -> anyhow::Result<()> {
        let paths = RATE_PATHS.map(|target| (target, target.addr(Service::Tls).into()));
        let rates = self.rates(&paths, "connection rate", report)?;
        (report.rate, report.rate_cpu) = (rates.per_second, rates.cpu);
        report.rate_cpu_system = rates.cpu_system;
        report.rate_segments = rates.segments;
        report.rate_machine = rates.machine;
        Ok(())
    }

    /// Short connections through each of `paths` at each concurrency, every
    /// repetition; failures go to the notes. The rates, and the CPU seconds
    /// per completed connection of each path's proxy.
    fn rates(
        &mut self,
        paths: &[(Target, Dial)],
        what: &str,
        report: &mut Report,
    ) -> anyhow::Result<Rates> {
        let mut samples: Vec<(usize, Target, f64)> = Vec::new();
        let mut cpu_samples: Vec<(usize, Target, f64)> = Vec::new();
        let mut system_samples: Vec<(usize, Target, f64)> = Vec::new();
        let (mut sent_samples, mut received_samples) = (Vec::new(), Vec::new());
        let mut machine = MachineSamples::default();
        for rep in 1..=self.plan.repetitions {
            for concurrency in self.plan.concurrencies {
                for &(target, dial) in paths {
                    eprintln!(
                        "bench: {what} {rep}/{}, concurrency {concurrency}, {}",
                        self.plan.repetitions,
                        target.label()
                    );
                    self.only_running(target);
                    let before = self.proxy_cpu(target);
                    let segments_before = self.proxy_segments(target);
                    let watch = cpu::MachineWatch::start();
                    // Its closing half-second included: the proxy closes the
                    // last connections then.
                    let rate = self.connection_rate(dial, concurrency)?;
                    let spent = before.zip(self.proxy_cpu(target));
                    let counted = segments_before.zip(self.proxy_segments(target));
                    if rate.completed > 0 {
                        let per = |n: f64| (concurrency, target, n / rate.completed as f64);
                        if let Some((before, after)) = spent {
                            let spent = after.since(before);
                            cpu_samples.push(per(spent.total()));
                            system_samples.push(per(spent.system));
                        }
                        if let Some((before, after)) = counted {
                            let counted = after.since(before);
                            sent_samples.push(per(counted.sent as f64));
                            received_samples.push(per(counted.received as f64));
                        }
                    }
                    let busy = watch.and_then(|watch| watch.stop(SETTLE));
                    machine.add(concurrency, target, busy, rate.completed as f64);
                    self.note_failures(
                        &rate,
                        &format!("{what}, {} at concurrency {concurrency}", target.label()),
                        report,
                    );
                    if let Some(proc) = self.proc(target) {
                        proc.check_running()?;
                    }
                    samples.push((concurrency, target, rate.per_second));
                }
            }
        }
        self.all_running();
        Ok(Rates {
            per_second: spread_rows(&samples),
            cpu: spread_rows(&cpu_samples),
            cpu_system: spread_rows(&system_samples),
            segments: SegmentRows {
                sent: spread_rows(&sent_samples),
                received: spread_rows(&received_samples),
            },
            machine: machine.rows(),
        })
    }

    /// Connections from `concurrency` clients, then [`SETTLE`].
    fn connection_rate(&self, addr: Dial, concurrency: usize) -> anyhow::Result<load::Rate> {
        let (hello, duration, max) = (
            self.hello.clone(),
            self.plan.rate_duration,
            self.plan.rate_max,
        );
        let rate = self
            .lab
            .cl
            .block_on(move || load::connection_rate(addr, hello, concurrency, duration, max))?;
        std::thread::sleep(SETTLE);
        Ok(rate)
    }

    fn note_failures(&self, rate: &load::Rate, what: &str, report: &mut Report) {
        if rate.failed > 0 {
            report.notes.push(format!(
                "{what}: {} connections failed (first error: {}); only completed ones are counted.",
                rate.failed,
                rate.first_error.as_deref().unwrap_or("?")
            ));
        }
    }

    fn latency(&mut self, report: &mut Report) -> anyhow::Result<()> {
        let paths = RATE_PATHS;
        let mut samples: Vec<(Target, [f64; 3])> = Vec::new();
        for rep in 1..=self.plan.repetitions {
            for target in paths {
                eprintln!(
                    "bench: latency {rep}/{}, {}",
                    self.plan.repetitions,
                    target.label()
                );
                self.only_running(target);
                let (addr, hello, count) = (
                    target.addr(Service::Tls),
                    self.hello.clone(),
                    self.plan.latency_requests,
                );
                let times = self.lab.cl.block_on(move || async move {
                    load::first_byte_times(addr, &hello, count, Duration::from_secs(60)).await
                })??;
                let micros: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
                samples.push((target, [0.5, 0.99, 0.999].map(|q| quantile(&micros, q))));
            }
        }
        self.all_running();
        for target in paths {
            let of = |i: usize| {
                let values: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.0 == target)
                    .map(|s| s.1[i])
                    .collect();
                Spread::of(&values)
            };
            if let (Some(p50), Some(p99), Some(p999)) = (of(0), of(1), of(2)) {
                report.latency.push(LatencyRow {
                    target,
                    quantiles: [p50, p99, p999],
                });
            }
        }
        Ok(())
    }

    /// l4proxy's CONNECT front end beside Squid and the direct path: the
    /// set-up rate of short tunnels, then one stream through a tunnel each
    /// way (sent and counted by the bench: iperf3 cannot speak CONNECT).
    fn connect(&mut self, report: &mut Report) -> anyhow::Result<()> {
        eprintln!("bench: CONNECT, starting Squid and the bulk sink and source");
        let seconds = Duration::from_secs(self.plan.iperf_seconds);
        let _bulk = Responder::start(
            &self.lab.sv,
            &[
                (targets::SINK_PORT, Mode::Sink(seconds)),
                (targets::SOURCE_PORT, Mode::Source),
            ],
        )?;
        self.squid = Some(targets::start_squid(
            &self.lab.px,
            &self.work.join("squid"),
            &self.work.join("squid.log"),
        )?);
        report.setup.push(
            output_of("/usr/sbin/squid", &["-v"])?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        );
        // The direct path's address is the server's own.
        let tls = Target::Direct.addr(Service::Tls);
        let server = |port| std::net::SocketAddr::new(tls.ip(), port);
        for target in targets::CONNECT_PATHS {
            self.probe(target.tunnel_to(tls), target)?;
        }
        report.connect_how = format!(
            "Short tunnels: each connection sends `CONNECT {tls} HTTP/1.1` (the server's IP \
             literal, so that neither proxy resolves a name) to the proxy, reads its `200`, sends \
             the connection-rate case's TLS ClientHello through the tunnel, reads the small reply \
             and closes; the direct path does the same without the CONNECT step. Throughput: one \
             stream through a tunnel each way, sent and counted by the bench in 128 KiB writes \
             (iperf3 cannot speak CONNECT); the receiving end counts for {seconds} s from its \
             first bytes on (client→server: a sink on the server, which then answers its count). \
             l4proxy: a `connect` rule on {l4proxy} for the client subnet and the server ports, \
             upstream `original_destination`. {squid} CPU per tunnel: the proxy's CPU time \
             (user + system of its processes, from /proc) over a run, divided by the tunnels \
             completed.",
            seconds = self.plan.iperf_seconds,
            l4proxy = Target::L4proxy.connect_listener().expect("l4proxy has one"),
            squid = targets::squid_choice(),
        );
        let paths = targets::CONNECT_PATHS.map(|target| (target, target.tunnel_to(tls)));
        let rates = self.rates(&paths, "tunnel set-up", report)?;
        (report.connect_rate, report.connect_rate_cpu) = (rates.per_second, rates.cpu);
        report.connect_rate_cpu_system = rates.cpu_system;
        report.connect_segments = rates.segments;
        report.connect_machine = rates.machine;

        let mut samples: Vec<(Flow, Target, f64)> = Vec::new();
        for rep in 1..=self.plan.repetitions {
            for reverse in [false, true] {
                let flow = Flow {
                    streams: 1,
                    reverse,
                };
                let port = if reverse {
                    targets::SOURCE_PORT
                } else {
                    targets::SINK_PORT
                };
                for target in targets::CONNECT_PATHS {
                    eprintln!(
                        "bench: CONNECT throughput {rep}/{}, 1 stream{}, {}",
                        self.plan.repetitions,
                        if reverse { " reverse" } else { "" },
                        target.label()
                    );
                    self.only_running(target);
                    let dial = target.tunnel_to(server(port));
                    match self
                        .lab
                        .cl
                        .block_on(move || load::bulk(dial, reverse, seconds))?
                    {
                        Ok(bits) => samples.push((flow, target, bits)),
                        Err(e) => report.notes.push(format!(
                            "CONNECT throughput, {}, {}: {e:#}; this run is left out.",
                            flow.label(),
                            target.label()
                        )),
                    }
                    if let Some(proc) = self.proc(target) {
                        proc.check_running()?;
                    }
                }
            }
        }
        self.all_running();
        report.connect_throughput = spread_rows(&samples);
        self.squid = None;
        Ok(())
    }

    /// Connection rate to the last of N rules: l4proxy (sk_lookup) restarted
    /// with each policy, then iptables TPROXY rules in front of HAProxy.
    fn rules(&mut self, report: &mut Report) -> anyhow::Result<()> {
        self.l4proxy = None; // one l4proxy per namespace
        const L4PROXY: &str = "l4proxy (sk_lookup)";
        const TPROXY: &str = "iptables TPROXY + HAProxy";
        for rules in self.plan.rule_counts {
            eprintln!("bench: {rules} rules, {L4PROXY}");
            let policy = self.work.join(format!("rules-{rules}.json"));
            std::fs::write(&policy, serde_json::to_vec(&targets::rules_policy(rules))?)?;
            self.l4proxy = Some(targets::start_l4proxy(
                &self.lab.px,
                self.binary,
                &policy,
                self.maxconn,
                &self.work.join(format!("l4proxy-rules-{rules}.log")),
            )?);
            let rate = self.rules_rate(rules, Target::L4proxy, L4PROXY, report)?;
            report.rules.push(RulesRow {
                steering: L4PROXY,
                rules,
                rate,
            });
            self.l4proxy = None;
        }

        targets::install_tproxy_routing(&self.lab.px)?;
        let config = self.work.join("haproxy-tproxy.cfg");
        std::fs::write(&config, targets::haproxy_tproxy_config(self.maxconn))?;
        // Stands in the HAProxy slot of `proc` so a crash shows its log.
        let plain = std::mem::replace(
            &mut self.haproxy,
            targets::start_haproxy(
                &self.lab.px,
                "haproxy-tproxy",
                &config,
                &self.work.join("haproxy-tproxy.log"),
            )?,
        );
        drop(plain);
        for rules in self.plan.rule_counts {
            eprintln!("bench: {rules} rules, {TPROXY}");
            targets::install_tproxy(&self.lab.px, rules)?;
            let rate = self.rules_rate(rules, Target::Haproxy, TPROXY, report)?;
            report.rules.push(RulesRow {
                steering: TPROXY,
                rules,
                rate,
            });
        }
        // Every IPv4 packet without a socket here (each connection's first)
        // would still walk the last count's rules (10 000): the cases after
        // this one, whose upstreams are IPv4, would measure that walk.
        targets::remove_tproxy(&self.lab.px)
    }

    fn rules_rate(
        &mut self,
        rules: usize,
        target: Target,
        steering: &str,
        report: &mut Report,
    ) -> anyhow::Result<Spread> {
        let addr = targets::rule_dst(rules - 1).into();
        self.probe(addr, target)?;
        let mut values = Vec::new();
        self.only_running(target);
        for _ in 0..self.plan.repetitions {
            let rate = self.connection_rate(addr, self.plan.rules_concurrency)?;
            self.note_failures(&rate, &format!("{steering} with {rules} rules"), report);
            values.push(rate.per_second);
        }
        self.all_running();
        Spread::of(&values).context("at least one repetition")
    }
}

/// Connection rates by concurrency, and the proxies' CPU seconds per
/// connection (all, and the kernel's part).
struct Rates {
    per_second: Vec<Row<usize>>,
    cpu: Vec<Row<usize>>,
    cpu_system: Vec<Row<usize>>,
    segments: SegmentRows,
    machine: MachineRows<usize>,
}

/// The whole machine's busy CPU over each run, per unit of work done (GiB,
/// connection) and as a share of the cores' time, by case and path.
struct MachineSamples<K> {
    per_unit: Vec<(K, Target, f64)>,
    share: Vec<(K, Target, f64)>,
}

impl<K> Default for MachineSamples<K> {
    fn default() -> Self {
        MachineSamples {
            per_unit: Vec::new(),
            share: Vec::new(),
        }
    }
}

impl<K: PartialEq + Copy> MachineSamples<K> {
    fn add(&mut self, case: K, target: Target, busy: Option<cpu::MachineBusy>, units: f64) {
        if let Some(busy) = busy
            && units > 0.0
        {
            self.per_unit.push((case, target, busy.seconds / units));
            self.share.push((case, target, busy.share));
        }
    }

    fn rows(&self) -> MachineRows<K> {
        MachineRows {
            per_unit: spread_rows(&self.per_unit),
            share: spread_rows(&self.share),
        }
    }
}

/// The paths of the connection-rate and latency cases (HAProxy+splice would
/// copy these short exchanges as HAProxy does).
const RATE_PATHS: [Target; 4] = [
    Target::Direct,
    Target::L4proxy,
    Target::Haproxy,
    Target::Nginx,
];

/// One row per (case, path) of `samples`: the spread of its values, in the
/// order the pairs first appear.
fn spread_rows<K: PartialEq + Copy>(samples: &[(K, Target, f64)]) -> Vec<Row<K>> {
    let mut rows: Vec<Row<K>> = Vec::new();
    for &(case, target, _) in samples {
        if rows.iter().any(|r| r.case == case && r.target == target) {
            continue;
        }
        let values: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 == case && s.1 == target)
            .map(|s| s.2)
            .collect();
        if let Some(value) = Spread::of(&values) {
            rows.push(Row {
                case,
                target,
                value,
            });
        }
    }
    rows
}

/// Idle connections that fit a descriptor limit: two descriptors each, after
/// HAProxy's pipes (`targets::MAX_PIPES`, two descriptors each) and a reserve.
fn idle_fit(fd_limit: u64) -> u64 {
    fd_limit.saturating_sub(2 * targets::MAX_PIPES + 256) / 2 / 100 * 100
}

/// HAProxy's `maxconn`: the idle connections and some to spare, so that it
/// starts under the descriptor limit (it refuses to if the limit is lower than
/// what `maxconn` and `maxpipes` need).
fn maxconn(fd_limit: u64) -> u64 {
    idle_fit(fd_limit) + 100
}

/// Scratch space for configs and logs, removed at the end.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> anyhow::Result<WorkDir> {
        let dir = lab::work_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn output_of(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!("{prog} {} failed: {}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn command_line(args: &Args) -> String {
    let mut line = "cargo xtask bench".to_owned();
    if args.quick {
        line += " --quick";
    }
    if let Some(binary) = &args.l4proxy {
        line += &format!(" --l4proxy {}", binary.display());
    }
    if !args.only.is_empty() {
        let only: Vec<String> = args
            .only
            .iter()
            .map(|c| format!("{c:?}").to_lowercase())
            .collect();
        line += &format!(" --only {}", only.join(","));
    }
    line
}

/// What the figures were measured on.
fn machine_description(root: &Path, binary: &Path) -> Vec<String> {
    let first_line = |prog: &str, args: &[&str]| {
        output_of(prog, args)
            .map(|s| s.lines().next().unwrap_or_default().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let tree = first_line(
        "git",
        &[
            "-C",
            &root.to_string_lossy(),
            "describe",
            "--always",
            "--dirty",
        ],
    );
    // The binary names the commit it was built from: with `--l4proxy` that
    // need not be the checkout the bench runs from.
    let built = output_of(&binary.to_string_lossy(), &["--version"])
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("commit: ").map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    vec![
        format!(
            "{cores} cores shared by client, proxy and server; Linux {}",
            first_line("uname", &["-r"])
        ),
        format!(
            "l4proxy: {} (built from commit {built}; the bench ran from tree {tree})",
            binary.display()
        ),
        first_line("haproxy", &["-v"]),
        nginx::version(),
        first_line("iperf3", &["-v"]),
        "lab: client 198.51.100.2 → proxy host (services 192.0.2.10 l4proxy, .20 HAProxy, \
         .21 HAProxy+splice, .22 nginx) → server 203.0.113.2; direct = client to the server \
         through the proxy host's forwarding; the server keeps no TIME_WAIT \
         (`tcp_max_tw_buckets` 0), so that one run's closed connections do not slow the next's; \
         while one path is measured (throughput, rates, latency, CONNECT, rule counts), every \
         other proxy is \
         stopped (SIGSTOP), so that work one puts off (Squid's timed events after its runs) is \
         done in its own runs"
            .to_owned(),
    ]
}
