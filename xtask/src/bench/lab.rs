//! The benchmark's hosts: three network namespaces joined by veth pairs, the
//! processes started in them, and their removal on every way out (normal end,
//! error, panic, Ctrl-C or SIGTERM).
//!
//! ```text
//! cl (198.51.100.2) — (198.51.100.1) px (203.0.113.1) — (203.0.113.2) sv
//! ```
//!
//! `cl` routes the service prefix 192.0.2.0/24 and the server side via `px`;
//! `sv`'s default route is `px`. Only the documentation ranges of
//! docs/development.md are used, and nothing is configured in the root namespace.

use std::{
    fs::File,
    future::Future,
    io::Read,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Every namespace of the benchmark is named `l4bench-<pid>-<role>`.
const PREFIX: &str = "l4bench-";

pub const CL: &str = "198.51.100.2";
/// The client's subnet (the link between `cl` and `px`).
pub const CL_NET: &str = "198.51.100.0/24";
pub const PX_CL: &str = "198.51.100.1";
pub const PX_SV: &str = "203.0.113.1";
pub const SV: &str = "203.0.113.2";

/// What must go when the process is interrupted: namespaces and child pids.
static LIVE: Mutex<Live> = Mutex::new(Live {
    namespaces: Vec::new(),
    children: Vec::new(),
});

struct Live {
    namespaces: Vec<String>,
    children: Vec<u32>,
}

fn live() -> std::sync::MutexGuard<'static, Live> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT or SIGTERM: kill what we started, delete the namespaces and the
/// work directory, exit 130.
/// (The normal paths clean up through `Drop`.)
pub fn clean_up_on_signal() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("bench: interrupted; removing the lab");
        let Live {
            namespaces,
            children,
        } = std::mem::replace(
            &mut *live(),
            Live {
                namespaces: Vec::new(),
                children: Vec::new(),
            },
        );
        for pid in children {
            signal(pid, libc::SIGKILL);
        }
        for ns in namespaces {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = std::fs::remove_dir_all(work_dir());
        std::process::exit(130);
    });
    Ok(())
}

/// Scratch space for configs and logs (the caller removes it at the end).
pub fn work_dir() -> PathBuf {
    std::env::temp_dir().join(format!("l4bench-{}", std::process::id()))
}

/// Deletes benchmark namespaces whose creating process is gone (SIGKILL).
pub fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            // Its peers run on in their own process groups, out of reach
            // once the name is gone.
            kill_all_in(&name);
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Kills every process in namespace `name` (a killed bench left them).
fn kill_all_in(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
    {
        // SAFETY: kill(2) takes no pointers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Signals the process group a child of ours leads (see [`Proc`]).
fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall; `pid` is a child we started and have not reaped,
    // so its group is still ours.
    unsafe { libc::kill(-(pid as i32), sig) };
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> anyhow::Result<Netns> {
        let name = format!("{PREFIX}{}-{role}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        live().namespaces.push(name.clone());
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NS ARGS...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
    }

    /// Runs a program inside the namespace to completion.
    pub fn exec(&self, prog: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["netns", "exec", &self.name, prog];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Like [`Netns::exec`] with `input` on standard input.
    pub fn exec_with_input(&self, prog: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, prog])
            .args(args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {prog} in {}", self.name))?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{prog} {} in {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(())
    }

    /// Runs `make()`'s future to completion on a thread inside the namespace,
    /// on a current-thread runtime: sockets it opens live in the namespace.
    pub fn block_on<F, Fut, T>(&self, make: F) -> anyhow::Result<T>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let file = self.file()?;
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&file)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(make()))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`Netns::block_on`], but on a thread that outlives the call.
    pub fn spawn<F, Fut>(&self, make: F) -> anyhow::Result<std::thread::JoinHandle<()>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let file = self.file()?;
        let name = self.name.clone();
        Ok(std::thread::spawn(move || {
            let runtime = enter(&file).and_then(|()| {
                Ok(tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?)
            });
            match runtime {
                Ok(runtime) => runtime.block_on(make()),
                Err(e) => eprintln!("bench: thread in {name}: {e:#}"),
            }
        }))
    }

    /// The namespace's file, for [`enter`] on a thread of one's own.
    pub fn file(&self) -> anyhow::Result<File> {
        let path = format!("/run/netns/{}", self.name);
        File::open(&path).with_context(|| format!("opening {path}"))
    }
}

/// A server thread that runs until this is dropped: the drop tells it to
/// stop (its `stopped` end of the channel) and waits for it.
pub struct ServerThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    pub fn new(
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    ) -> ServerThread {
        ServerThread {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Moves the calling thread into the namespace `file` refers to.
pub fn enter(file: &File) -> anyhow::Result<()> {
    // SAFETY: plain syscall on an open namespace descriptor; it changes only the
    // calling thread, which is one of ours.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        live().namespaces.retain(|n| *n != self.name);
    }
}

/// The three hosts. Fields drop (namespaces are deleted) in order.
pub struct Lab {
    pub cl: Netns,
    pub px: Netns,
    pub sv: Netns,
}

impl Lab {
    pub fn new() -> anyhow::Result<Lab> {
        let lab = Lab {
            cl: Netns::new("cl")?,
            px: Netns::new("px")?,
            sv: Netns::new("sv")?,
        };
        let (cl, px, sv) = (&lab.cl, &lab.px, &lab.sv);
        cl.ip(&[
            "link", "add", "to-px", "type", "veth", "peer", "name", "to-cl", "netns", &px.name,
        ])?;
        px.ip(&[
            "link", "add", "to-sv", "type", "veth", "peer", "name", "to-px", "netns", &sv.name,
        ])?;
        for (ns, dev, addr) in [
            (cl, "to-px", CL),
            (px, "to-cl", PX_CL),
            (px, "to-sv", PX_SV),
            (sv, "to-px", SV),
        ] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        cl.ip(&["route", "add", "192.0.2.0/24", "via", PX_CL])?;
        cl.ip(&["route", "add", "203.0.113.0/24", "via", PX_CL])?;
        sv.ip(&["route", "add", "default", "via", PX_SV])?;
        px.sysctl("net.ipv4.ip_forward", "1")?;
        // TPROXY delivers packets for addresses px does not own; strict
        // reverse-path filtering would drop them.
        for conf in ["all", "default", "to-cl", "lo"] {
            px.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }
        // Many short connections: a wide port range, and ports in TIME_WAIT
        // reused for new outgoing connections.
        for ns in [cl, px] {
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        for ns in [cl, px, sv] {
            ns.sysctl("net.core.somaxconn", "8192")?;
            ns.sysctl("net.ipv4.tcp_max_syn_backlog", "8192")?;
        }
        // The server closes first, so its side of every connection would
        // wait in TIME_WAIT for a minute, and the next runs' SYNs (every
        // path's upstream connections come from the proxy host's one
        // address) would land on those entries and cost more: in trial runs
        // of the rule-count case (2026-11-27) the runs after the first
        // reached 0.81–0.88× its rate, whichever rule count ran first. No
        // TIME_WAIT on the server: each run starts from the same state.
        sv.sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
        Ok(lab)
    }
}

/// A process started inside a namespace, its output in a log file; stopped
/// (SIGTERM, then SIGKILL) on drop. It leads a process group of its own, and
/// the signals go to the group, so that what it forks (Squid's workers) goes
/// with it.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn start(
        ns: &Netns,
        name: &str,
        command: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        // `ip netns exec` enters the namespace and execs the program, so the
        // pid is the program's.
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(command)
            .envs(env.iter().copied())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}: {}", command.join(" ")))?;
        live().children.push(child.id());
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the process and its group.
    pub fn pause(&self, paused: bool) {
        signal(
            self.pid(),
            if paused { libc::SIGSTOP } else { libc::SIGCONT },
        );
    }

    /// Fails, with the end of its log, if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); end of its log ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id();
        if self.child.try_wait().ok().flatten().is_none() {
            signal(pid, libc::SIGTERM);
            // A paused one acts on it only once continued.
            signal(pid, libc::SIGCONT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            signal(pid, libc::SIGKILL);
            let _ = self.child.wait();
        }
        live().children.retain(|&p| p != pid);
    }
}

/// Runs a command to completion, failing with its stderr.
pub fn run(prog: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("starting {prog}"))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

/// Resident memory of a process and all its descendants, in bytes.
pub fn tree_rss(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for p in tree_pids(pid) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status"))
            .with_context(|| format!("reading /proc/{p}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        total += kib * 1024;
    }
    Ok(total)
}

/// A process and all its live descendants (nginx's and Squid's workers).
pub fn tree_pids(pid: u32) -> Vec<u32> {
    let parents = parent_map();
    let mut tree = vec![pid];
    let mut next = 0;
    while let Some(&p) = tree.get(next) {
        tree.extend(
            parents
                .iter()
                .filter(|(_, parent)| *parent == p)
                .map(|(c, _)| *c),
        );
        next += 1;
    }
    tree
}

/// (pid, parent pid) of every process.
fn parent_map() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name is in parentheses and may contain spaces.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// Raises this process's descriptor limit towards `wanted` (children inherit
/// it) and returns the limit in force. Without CAP_SYS_RESOURCE only the soft
/// limit can go up, to the hard one.
pub fn raise_nofile(wanted: u64) -> anyhow::Result<u64> {
    let mut value = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: wanted,
    };
    // SAFETY: passes a pointer to a live, initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &value) } == 0 {
        return Ok(wanted);
    }
    // SAFETY: as above; getrlimit fills it in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut value) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    value.rlim_cur = value.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &value) } != 0 {
        bail!(
            "raising RLIMIT_NOFILE to {}: {}",
            value.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok(value.rlim_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state letter of `/proc/PID/stat` (`T`: stopped).
    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 1..].trim_start().chars().next()
    }

    /// Polls for up to 2 s until every process of `pid`'s tree satisfies
    /// `wanted`, with the tree's states.
    fn settle(pid: u32, wanted: impl Fn(char) -> bool) -> (bool, Vec<Option<char>>) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let states: Vec<Option<char>> = tree_pids(pid).into_iter().map(state).collect();
            let done = states.len() >= 2 && states.iter().all(|s| s.is_some_and(&wanted));
            if done || Instant::now() > deadline {
                return (done, states);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pausing stops the process and its children (a proxy's workers)
    /// until it is continued; a paused process still ends when dropped.
    #[test]
    fn a_paused_process_and_its_children_stop_until_continued() {
        let ns = Netns::new("pause").expect("ip netns add (needs root)");
        let log = std::env::temp_dir().join(format!("l4bench-pause-{}.log", std::process::id()));
        // Removed when the test ends, also when it fails.
        struct Removed(std::path::PathBuf);
        impl Drop for Removed {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let _removed = Removed(log.clone());
        let proc = Proc::start(
            &ns,
            "sleepers",
            // The shell handles SIGTERM, as the proxies do: a stopped
            // process acts on it only once continued.
            &["sh", "-c", "trap 'exit 0' TERM; sleep 30 & wait"],
            &[],
            log.clone(),
        )
        .expect("starting sh");
        let pid = proc.pid();
        let (running, states) = settle(pid, |s| s != 'T');
        assert!(
            running,
            "the shell and its sleeps before the pause: {states:?}"
        );
        proc.pause(true);
        let (stopped, states) = settle(pid, |s| s == 'T');
        assert!(stopped, "every process of the group stopped: {states:?}");
        proc.pause(false);
        let (continued, states) = settle(pid, |s| s != 'T');
        assert!(
            continued,
            "every process of the group continued: {states:?}"
        );
        proc.pause(true);
        let started = Instant::now();
        drop(proc);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "a paused process ends on SIGTERM without waiting for SIGKILL"
        );
        assert_eq!(state(pid), None, "the process is gone");
        drop(ns);
    }
}
