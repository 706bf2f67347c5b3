//! The daemon under test, started inside a namespace with `--log-format json`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::tls::{Output, run_in};
use super::{Netns, TempDir};

/// Path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_l4proxy")
}

/// Runs the binary under test in `ns` as a command (`status`, `upgrade`,
/// `cleanup`, `doctor` ...), bounded by `timeout`.
pub fn command(ns: &Netns, args: &[&str], timeout: Duration) -> Output {
    run_in(ns, binary(), args, b"", timeout)
}

/// The running daemon's `l4proxy status --json` in `ns`; panics with the
/// output if it is not JSON.
pub fn status(ns: &Netns) -> Value {
    let out = command(ns, &["status", "--json"], Duration::from_secs(30));
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}{}", out.stdout, out.stderr))
}

/// A kernel counter of a `status` (see [`status`]), if it has it.
pub fn kernel_counter(status: &Value, name: &str) -> Option<u64> {
    status["kernel"]
        .as_array()?
        .iter()
        .find(|k| k["counter"] == name)
        .and_then(|k| k["value"].as_u64())
}

/// A process this test did not start (the successor `upgrade` made),
/// killed if it still runs when the test ends.
pub struct Stray(pub i32);

impl Stray {
    /// The successor a successful `l4proxy upgrade` names.
    pub fn upgraded(upgrade: &Output) -> Stray {
        let pid = upgrade
            .stdout
            .strip_prefix("upgraded: pid ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("upgrade should name the successor: {upgrade:?}"));
        Stray(pid)
    }

    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.0))
            .is_ok_and(|stat| !stat.contains(") Z "))
    }

    pub fn terminate(&self, timeout: Duration) {
        // SAFETY: plain syscall.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
        let gone = super::poll_until(timeout, || self.alive(), |alive| !alive);
        assert!(!gone, "pid {} did not exit within {timeout:?}", self.0);
    }
}

impl Drop for Stray {
    fn drop(&mut self) {
        if self.alive() {
            // SAFETY: plain syscall.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// A running `l4proxy run`. Dropping it kills the daemon if it still runs;
/// while a test panics, the collected log is printed.
pub struct Daemon {
    child: Child,
    exited: Option<ExitStatus>,
    log: Arc<Mutex<Vec<String>>>,
    /// Holds the policy file; removed on drop.
    dir: TempDir,
    ns: String,
    /// The `conn_id`s of the close events `closed_event` returned.
    closes_returned: std::collections::HashSet<String>,
    /// The threads reading its stdout and stderr into `log`.
    collectors: Vec<std::thread::JoinHandle<()>>,
}

/// Reads lines from a pipe into the shared log until EOF.
fn collect<R: Read + Send + 'static>(
    pipe: R,
    tag: &'static str,
    log: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            match line {
                Ok(l) => log.lock().unwrap().push(format!("{tag}{l}")),
                Err(_) => break,
            }
        }
    })
}

/// How the daemon's process is set up before it runs.
#[derive(Default)]
struct Setup {
    /// `RLIMIT_NOFILE`, soft and hard.
    open_files: Option<u64>,
    /// A file bind-mounted over /etc/resolv.conf.
    resolv_conf: Option<std::ffi::CString>,
    /// Another l4proxy binary than the one under test (a second build).
    binary: Option<PathBuf>,
    /// Environment variables added to the test's.
    env: Vec<(String, String)>,
    /// A command line that runs the daemon's (`setpriv ... --`, say).
    wrapper: Vec<String>,
}

/// In the child before exec: a private mount namespace in which
/// `resolv_conf` is /etc/resolv.conf.
fn bind_resolv_conf(resolv_conf: &std::ffi::CStr) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls on NUL-terminated strings that live across them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Nothing mounted here propagates back to the machine's namespace.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            resolv_conf.as_ptr(),
            c"/etc/resolv.conf".as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ))
    }
}

impl Daemon {
    /// Writes `policy` to a temporary file and starts
    /// `l4proxy run --policy FILE --log-format json EXTRA...` inside `ns`.
    pub fn start(ns: &Netns, policy: &Value, extra: &[&str]) -> Daemon {
        let mut d = Daemon::spawn(ns, policy, extra);
        d.collect_stderr();
        d
    }

    /// Like `start`, but the daemon's stderr (its log) is handed to the
    /// caller unread, to stall it or read it at will; the log this `Daemon`
    /// collects and waits on then has stdout only.
    pub fn start_stderr_unread(
        ns: &Netns,
        policy: &Value,
        extra: &[&str],
    ) -> (Daemon, ChildStderr) {
        let mut d = Daemon::spawn(ns, policy, extra);
        let stderr = d.child.stderr.take().unwrap();
        (d, stderr)
    }

    /// Like `start`, with the daemon's open-files limit (`RLIMIT_NOFILE`,
    /// soft and hard) set to `limit` before it runs.
    pub fn start_with_open_files_limit(
        ns: &Netns,
        policy: &Value,
        extra: &[&str],
        limit: u64,
    ) -> Daemon {
        let setup = Setup {
            open_files: Some(limit),
            ..Setup::default()
        };
        let mut d = Daemon::spawn_with(ns, policy, extra, setup);
        d.collect_stderr();
        d
    }

    /// Like `start`, with another binary than the one under test (an
    /// upgrade's second build).
    pub fn start_binary(ns: &Netns, policy: &Value, extra: &[&str], binary: PathBuf) -> Daemon {
        let setup = Setup {
            binary: Some(binary),
            ..Setup::default()
        };
        let mut d = Daemon::spawn_with(ns, policy, extra, setup);
        d.collect_stderr();
        d
    }

    /// Like `start_ready`, with `resolv_conf` as the daemon's
    /// /etc/resolv.conf: bind-mounted in a mount namespace of its own, as
    /// `ip netns exec` does with /etc/netns/NS/, without touching /etc.
    pub fn start_with_resolver(
        ns: &Netns,
        policy: &Value,
        extra: &[&str],
        resolv_conf: &std::path::Path,
    ) -> Daemon {
        let resolv_conf = std::ffi::CString::new(resolv_conf.as_os_str().as_encoded_bytes())
            .expect("a path without NUL");
        let mut d = Daemon::spawn_with(
            ns,
            policy,
            extra,
            Setup {
                resolv_conf: Some(resolv_conf),
                ..Setup::default()
            },
        );
        d.collect_stderr();
        d.wait_ready(Duration::from_secs(30));
        d
    }

    /// Like `start`, with `env` added to the daemon's environment.
    pub fn start_with_env(
        ns: &Netns,
        policy: &Value,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let setup = Setup {
            env: env
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Setup::default()
        };
        let mut d = Daemon::spawn_with(ns, policy, extra, setup);
        d.collect_stderr();
        d
    }

    /// Like `start`, run by `wrapper` (`strace -f --`, say): the process
    /// this `Daemon` signals and waits for is the wrapper's.
    pub fn start_wrapped(ns: &Netns, policy: &Value, extra: &[&str], wrapper: &[&str]) -> Daemon {
        let setup = Setup {
            wrapper: wrapper.iter().map(|&w| w.to_owned()).collect(),
            ..Setup::default()
        };
        let mut d = Daemon::spawn_with(ns, policy, extra, setup);
        d.collect_stderr();
        d
    }

    /// Starts the daemon with both pipes; collects stdout.
    fn spawn(ns: &Netns, policy: &Value, extra: &[&str]) -> Daemon {
        Daemon::spawn_with(ns, policy, extra, Setup::default())
    }

    /// `spawn`, with the process set up as `setup` says.
    fn spawn_with(ns: &Netns, policy: &Value, extra: &[&str], setup: Setup) -> Daemon {
        let Setup {
            open_files,
            resolv_conf,
            binary: other_binary,
            env,
            wrapper,
        } = setup;
        let dir = TempDir::new(&format!("daemon-{}", ns.name()));
        let policy_path = dir.join("policy.json");
        std::fs::write(&policy_path, serde_json::to_vec_pretty(policy).unwrap())
            .unwrap_or_else(|e| panic!("write {}: {e}", policy_path.display()));

        let ns_path = ns.path();
        let ns_file =
            File::open(&ns_path).unwrap_or_else(|e| panic!("open {}: {e}", ns_path.display()));
        let ns_fd = ns_file.as_raw_fd();

        let daemon: PathBuf = other_binary.unwrap_or_else(|| binary().into());
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&daemon);
                cmd
            }
            None => Command::new(&daemon),
        };
        cmd.arg("run")
            .arg("--policy")
            .arg(&policy_path)
            .args(["--log-format", "json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // `ready` and `connection closed` are info events: make sure a
        // RUST_LOG of the caller does not hide them. A test that passes
        // `--log-level` chooses the level itself (RUST_LOG would override it).
        if extra.contains(&"--log-level") {
            cmd.env_remove("RUST_LOG");
        } else {
            cmd.env(
                "RUST_LOG",
                std::env::var("L4PROXY_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            );
        }
        // After RUST_LOG: a test's own environment wins.
        cmd.envs(env);
        // SAFETY: only plain syscalls (setns, unshare, mount, setrlimit)
        // between fork and exec, on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(resolv_conf) = &resolv_conf {
                    bind_resolv_conf(resolv_conf)?;
                }
                if let Some(limit) = open_files {
                    let both = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &both) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "spawn {} run in netns {}: {e} (is the daemon built?)",
                binary(),
                ns.name()
            )
        });
        drop(ns_file);

        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = collect(child.stdout.take().unwrap(), "stdout: ", log.clone());
        Daemon {
            child,
            exited: None,
            log,
            dir,
            ns: ns.name().to_owned(),
            closes_returned: Default::default(),
            collectors: vec![stdout],
        }
    }

    /// Reads its stderr (its log) into the log.
    fn collect_stderr(&mut self) {
        let stderr = self.child.stderr.take().unwrap();
        self.collectors.push(collect(stderr, "", self.log.clone()));
    }

    /// Starts the daemon and waits for `ready` (30 s: loading and
    /// verifying its programs takes longer on a loaded machine).
    pub fn start_ready(ns: &Netns, policy: &Value, extra: &[&str]) -> Daemon {
        let mut d = Daemon::start(ns, policy, extra);
        d.wait_ready(Duration::from_secs(30));
        d
    }

    /// The policy file the daemon reads (again on SIGHUP).
    pub fn policy_path(&self) -> PathBuf {
        self.dir.join("policy.json")
    }

    /// Writes `policy` (or, for a string, that text as is) to the daemon's
    /// policy file, sends SIGHUP, and waits for the daemon's verdict:
    /// `policy reloaded` or `policy not reloaded`. Returns that event.
    pub fn reload(&mut self, policy: &Value) -> Value {
        let text = match policy {
            Value::String(text) => text.clone().into_bytes(),
            other => serde_json::to_vec_pretty(other).unwrap(),
        };
        std::fs::write(self.policy_path(), text)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.policy_path().display()));
        let seen = self
            .events()
            .iter()
            .filter(|e| is_reload_verdict(e))
            .count();
        self.signal(libc::SIGHUP);
        self.wait_nth_event(
            seen,
            "a reload verdict",
            Duration::from_secs(10),
            is_reload_verdict,
        )
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The daemon's open descriptors: the entries of `/proc/PID/fd`.
    pub fn descriptor_entries(&self) -> std::fs::ReadDir {
        let dir = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {dir}: {e}"))
    }

    /// How many descriptors the daemon has open.
    pub fn descriptors(&self) -> usize {
        self.descriptor_entries().count()
    }

    /// A kernel counter as the daemon logged it at exit (`kernel
    /// counters`); panics if it is not there.
    pub fn exit_counter(&self, name: &str) -> u64 {
        let counters = self
            .event("kernel counters")
            .and_then(|e| field_str(&e, "counters"))
            .unwrap_or_else(|| panic!("no kernel counters logged at exit\n{}", self.log_text()));
        counters
            .split_whitespace()
            .find_map(|item| item.strip_prefix(name)?.strip_prefix('='))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter {name} in {counters:?}"))
    }

    /// All lines collected so far (stderr, and stdout prefixed `stdout: `).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The log as text, for panic messages.
    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Every log line that parses as a JSON object.
    pub fn events(&self) -> Vec<Value> {
        self.log_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.is_object())
            .collect()
    }

    /// The first event logged (so far) with the message `wanted`.
    pub fn event(&self, wanted: &str) -> Option<Value> {
        self.events()
            .into_iter()
            .find(|e| message(e) == Some(wanted))
    }

    /// Has the process exited? (Reaps it if so.)
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waitpid daemon: {e}"));
            if self.exited.is_some() {
                self.read_to_the_end();
            }
        }
        self.exited
    }

    /// Once it has exited: waits (up to 2 s) until its last lines are in
    /// the log. Its pipes may stay open longer, held by what it started
    /// (its crash guard, a successor), hence the bound.
    fn read_to_the_end(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.collectors.iter().all(|c| c.is_finished()) {
            if Instant::now() >= deadline {
                eprintln!(
                    "lab: the exited daemon's output is still open after 2 s (held by what it started?): its last lines may be missing"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for an event matching `pred`; panics with the log on timeout or
    /// if the daemon exits first.
    pub fn wait_event(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_nth_event(0, what, timeout, pred)
    }

    /// Waits for the event after the first `n` that match `pred` (counting
    /// from 0); panics with the log on timeout or if the daemon exits first.
    pub fn wait_nth_event(
        &mut self,
        n: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let nth = |d: &Daemon| d.events().into_iter().filter(|e| pred(e)).nth(n);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = nth(self) {
                return ev;
            }
            if let Some(st) = self.try_exit() {
                if let Some(ev) = nth(self) {
                    return ev;
                }
                panic!(
                    "daemon exited ({st}) before logging {what} (the l4proxy log is printed below)",
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "daemon did not log {what} within {timeout:?} (the l4proxy log is printed below)",
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the `connection closed` event of the connection from
    /// `client` (10 s): the first one not returned before, as a client's
    /// next connection may get the same port from the kernel.
    pub fn closed_event(&mut self, client: std::net::SocketAddr) -> Value {
        let wanted = client.to_string();
        let returned = self.closes_returned.clone();
        let event = self.wait_event(
            &format!("`connection closed` for {client}"),
            Duration::from_secs(10),
            |e| {
                message(e) == Some("connection closed")
                    && field_str(e, "client").as_deref() == Some(wanted.as_str())
                    && field_str(e, "conn_id").is_none_or(|id| !returned.contains(&id))
            },
        );
        if let Some(id) = field_str(&event, "conn_id") {
            self.closes_returned.insert(id);
        }
        event
    }

    /// Waits for the `ready` message.
    pub fn wait_ready(&mut self, timeout: Duration) {
        self.wait_event("`ready`", timeout, |e| message(e) == Some("ready"));
    }

    /// Waits until `n` (at least 1) `connection closed` events are logged
    /// and returns them all.
    pub fn wait_closed_events(&mut self, n: usize, timeout: Duration) -> Vec<Value> {
        let closed = |e: &Value| message(e) == Some("connection closed");
        self.wait_nth_event(
            n - 1,
            &format!("{n} `connection closed` events"),
            timeout,
            closed,
        );
        self.events().into_iter().filter(closed).collect()
    }

    /// Sets the daemon's soft open-files limit (prlimit) and returns the
    /// one it had: a limit below every descriptor it holds makes each new
    /// socket fail with EMFILE.
    pub fn set_open_files_limit(&self, soft: &str) -> String {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).unwrap();
        let had = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .expect("the open-files limit")
            .to_owned();
        let pid = self.pid().to_string();
        super::must("prlimit", &["--pid", &pid, &format!("--nofile={soft}:")]);
        had
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain syscall on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        if rc != 0 {
            panic!(
                "kill({}, {sig}): {}",
                self.pid(),
                std::io::Error::last_os_error()
            );
        }
    }

    /// Waits for the process to exit; panics with the log on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return st;
            }
            if Instant::now() >= deadline {
                panic!("daemon did not exit within {timeout:?} (the l4proxy log is printed below)",);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits (up to `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// SIGTERM, and asserts a clean exit 0 within `timeout`.
    pub fn stop(&mut self, timeout: Duration) {
        let status = self.terminate(timeout);
        self.assert_exit_ok(status);
    }

    /// SIGTERM, and waits (15 s) for `draining`: the daemon has stopped
    /// steering and accepting, open connections go on.
    pub fn drain(&mut self) {
        self.signal(libc::SIGTERM);
        self.wait_event("draining", Duration::from_secs(15), |e| {
            message(e) == Some("draining: no new connections are taken")
        });
    }

    /// Sends `signal` and asserts that the daemon ended as it makes it
    /// (10 s): exit 0 after SIGTERM, killed by any other.
    pub fn end_with(&mut self, signal: i32) {
        self.signal(signal);
        let status = self.wait_exit(Duration::from_secs(10));
        if signal == libc::SIGTERM {
            self.assert_exit_ok(status);
        } else {
            assert_eq!(status.signal(), Some(signal), "{status}");
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        if self.try_exit().is_none() {
            self.signal(libc::SIGKILL);
        }
        self.wait_exit(Duration::from_secs(10))
    }

    /// Panics with the log unless `st` is a clean exit 0.
    pub fn assert_exit_ok(&self, st: ExitStatus) {
        assert!(
            st.success(),
            "daemon exit status {st} (signal {:?}), expected 0 (the l4proxy log is printed below)",
            st.signal()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- l4proxy log (netns {}) ----\n{}\n---- end of log ----",
                self.ns,
                self.log_text()
            );
        } else {
            self.assert_close_lines_follow_the_schema();
        }
    }
}

impl Daemon {
    /// Every `connection closed` line of every test: a JSON object with the
    /// connection's ID and an `outcome` of the documented set, with an
    /// `error` exactly when it is not `closed` (README, "Logging").
    fn assert_close_lines_follow_the_schema(&self) {
        for line in self.log_lines() {
            let Ok(ev) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if message(&ev) != Some("connection closed") {
                continue;
            }
            let outcome = field_str(&ev, "outcome").unwrap_or_default();
            assert!(
                l4proxy::metrics::OUTCOMES.contains(&outcome.as_str()),
                "undocumented outcome in {line}"
            );
            assert!(field_str(&ev, "conn_id").is_some(), "no conn_id in {line}");
            assert_eq!(
                field(&ev, "error").is_some(),
                outcome != "closed",
                "`error` goes with every outcome but `closed`: {line}"
            );
        }
    }
}

/// `policy reloaded`, or an error saying the policy was not.
fn is_reload_verdict(ev: &Value) -> bool {
    message(ev).is_some_and(|m| m == "policy reloaded" || m.starts_with("policy not reloaded"))
}

/// `fields.message` of a tracing-subscriber JSON event (or a top-level
/// `message` if the events are flattened).
pub fn message(ev: &Value) -> Option<&str> {
    field(ev, "message").and_then(|m| m.as_str())
}

/// A field of a JSON event: at the top level (the daemon's JSON lines are
/// flat), else in `span`.
pub fn field<'a>(ev: &'a Value, name: &str) -> Option<&'a Value> {
    ev.get(name)
        .or_else(|| ev.get("span").and_then(|s| s.get(name)))
}

/// How a connection ended, with what went wrong: `outcome` and, when there
/// is one, `: error` (the close line's two fields).
pub fn outcome(ev: &Value) -> String {
    let outcome = field_str(ev, "outcome").unwrap_or_default();
    match field_str(ev, "error") {
        Some(error) => format!("{outcome}: {error}"),
        None => outcome,
    }
}

/// A field as a string (JSON strings as they are, other values rendered).
pub fn field_str(ev: &Value, name: &str) -> Option<String> {
    field(ev, name).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// A field as a string; panics, showing the event, if it is missing.
pub fn field_string(ev: &Value, name: &str) -> String {
    field_str(ev, name).unwrap_or_else(|| panic!("no field {name} in {ev}"))
}

/// A field as an unsigned number (accepts numbers and numeric strings).
pub fn field_u64(ev: &Value, name: &str) -> Option<u64> {
    match field(ev, name)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}
