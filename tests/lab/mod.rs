//! Test lab: network namespaces as hosts, the daemon under test, tiny servers.
//!
//! Every namespace a test builds is named `l4p-<pid>-<test>-<role>` and deleted
//! when its `Netns` is dropped, also while a failing test unwinds. Nothing is
//! ever configured in the root namespace: commands run as `ip -n NS ...`, and
//! in-process code enters a namespace on a thread of its own (`Netns::run`).
//! Only the documentation ranges of docs/development.md are used.
//!
//! The daemon runs with `RUST_LOG=info` (override with `L4PROXY_TEST_LOG`); its
//! log is printed when a test fails.
//!
//! Each test target does `mod lab;` and uses a part of this, hence the
//! `dead_code` allowance.
#![allow(dead_code, unused_imports)]

pub mod daemon;
pub mod dns;
pub mod haproxy;
pub mod net;
pub mod origin;
pub mod pki;
pub mod prometheus;
pub mod squid;
pub mod tls;
pub mod tls_peer;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;
use std::time::{Duration, Instant};

pub use daemon::Daemon;
pub use net::*;

/// Calls `probe` every 50 ms until `done` holds for its result or `timeout`
/// passes; returns the last result either way, for the caller to assert on.
pub fn poll_until<T>(
    timeout: Duration,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let found = probe();
        if done(&found) || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory under the system temp dir, removed (recursively) on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `l4proxy-<what>-<pid>-<n>`, fresh.
    pub fn new(what: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        sweep_stale_temp_dirs();
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("l4proxy-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether the test process `pid` that named something of the lab's is gone.
fn gone(pid: u32) -> bool {
    !PathBuf::from(format!("/proc/{pid}")).exists()
}

/// Removes the directories of earlier test processes that died without
/// unwinding (a Ctrl-C of `cargo xtask test`): `l4proxy-<what>-<pid>-<n>`
/// whose process is gone. They hold keys and policies.
fn sweep_stale_temp_dirs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("l4proxy-") {
                continue;
            }
            let mut from_end = name.rsplitn(3, '-');
            let (Some(n), Some(pid)) = (from_end.next(), from_end.next()) else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            if n.parse::<u64>().is_ok() && gone(pid) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// Prefix of every namespace this lab creates.
const NS_PREFIX: &str = "l4p-";

/// Runs a command, returning its output; panics if it cannot be started at all
/// (missing tool), saying which.
pub fn run_cmd(prog: &str, args: &[&str]) -> Output {
    match Command::new(prog).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run `{prog} {}`: {e} (is `{prog}` installed? \
             `ip` is in iproute2, `bpftool` in the Debian package bpftool)",
            args.join(" ")
        ),
    }
}

/// Runs a command and panics, with its output, if it fails.
pub fn must(prog: &str, args: &[&str]) -> String {
    succeed(prog, args).unwrap_or_else(|failure| panic!("{failure}"))
}

/// `must` for a command that lists kernel objects (`bpftool link show`, all
/// of the machine's): tried again when it fails, see [`retry_listing`].
pub fn must_list(prog: &str, args: &[&str]) -> String {
    retry_listing(|| succeed(prog, args))
}

/// A command's stdout if it succeeded, else the command and its output.
fn succeed(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = run_cmd(prog, args);
    if !out.status.success() {
        return Err(format!(
            "`{prog} {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `list`, a listing of kernel objects, until it succeeds, at most 5
/// times, 100 ms apart; then panics with its last error. Such a listing
/// takes ids first and looks each one up after: an object that goes away in
/// between (another test's BPF link, a program being detached) fails it
/// whole, with ENOENT or EAGAIN.
fn retry_listing<T>(mut list: impl FnMut() -> Result<T, String>) -> T {
    const TRIES: u32 = 5;
    for _ in 1..TRIES {
        if let Ok(found) = list() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    list().unwrap_or_else(|failure| panic!("{failure} (tried {TRIES} times)"))
}

/// Deletes namespaces left by earlier test processes that died without
/// unwinding (SIGKILL, abort). Only names of this lab whose creating process
/// is gone are touched.
fn sweep_stale_namespaces() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(NS_PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if gone(pid) {
                // Its peers run on in their own process groups, out of
                // reach once the name is gone.
                kill_what_is_left(&name);
                let _ = run_cmd("ip", &["netns", "del", &name]);
            }
        }
    });
}

/// A network namespace created with `ip netns add`, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `l4p-<pid>-<test>-<role>`, brings `lo` up and turns IPv6 DAD
    /// off so that addresses are usable at once.
    pub fn new(test: &str, role: &str) -> Netns {
        sweep_stale_namespaces();
        let name = format!("{NS_PREFIX}{}-{test}-{role}", std::process::id());
        assert!(name.len() < 200, "namespace name too long: {name}");
        must("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Inode of the namespace (what `bpftool link` shows as `netns_ino`).
    pub fn inode(&self) -> u64 {
        let path = self.path();
        std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
            .ino()
    }

    /// `ip -n NS ARGS...`, panicking with the output on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        must("ip", &full)
    }

    /// `ss ARGS...` inside the namespace (its sockets); returns stdout.
    pub fn ss(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str(), "ss"];
        full.extend_from_slice(args);
        must("ip", &full)
    }

    /// `ip -j link show DEV`: the link's attributes (`address`, `ifindex`, ...).
    pub fn link(&self, dev: &str) -> serde_json::Value {
        let links: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show", dev])).unwrap();
        links[0].clone()
    }

    /// Sets a sysctl inside the namespace (writes /proc/sys from a thread that
    /// entered it: /proc/sys/net is per network namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let ns = self.name.clone();
        let value = value.to_owned();
        self.run(move || {
            std::fs::write(&path, &value)
                .unwrap_or_else(|e| panic!("sysctl {path} = {value} in netns {ns}: {e}"))
        });
    }

    /// Adds an address; IPv6 ones with `nodad`.
    pub fn addr(&self, dev: &str, cidr: &str) {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev]);
        }
    }

    /// `ip route add PREFIX via GW` (family taken from the prefix).
    pub fn route(&self, prefix: &str, via: &str) {
        let fam = if via.contains(':') { "-6" } else { "-4" };
        self.ip(&[fam, "route", "add", prefix, "via", via]);
    }

    /// Runs `f` on a thread that has entered this namespace and returns its
    /// result (a panic in `f` is resumed here). Sockets created in `f` stay in
    /// this namespace wherever they are used afterwards.
    pub fn run<R, F>(&self, f: F) -> R
    where
        R: Send,
        F: FnOnce() -> R + Send,
    {
        let path = self.path();
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: plain syscall on a valid fd; only this thread moves.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    panic!(
                        "setns into {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                }
                f()
            })
            .join()
        });
        match result {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Routes installed by the daemon (protocol 244), both families, any table.
    pub fn proxy_routes(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for fam in ["-4", "-6"] {
            let out = self.ip(&[fam, "route", "show", "table", "all", "proto", "244"]);
            lines.extend(
                out.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| format!("{fam} {l}")),
            );
        }
        lines
    }

    /// Routing rules installed by the daemon (protocol 244), both families.
    /// (iproute2 6.1 lists every rule whatever `proto` filter it is given.)
    pub fn proxy_rules(&self) -> Vec<String> {
        self.all_rules()
            .into_iter()
            .filter(|l| l.ends_with("proto 244"))
            .collect()
    }

    /// Every routing rule, both families (to compare before and after).
    pub fn all_rules(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for fam in ["-4", "-6"] {
            let out = self.ip(&[fam, "rule", "show"]);
            lines.extend(out.lines().map(|l| format!("{fam} {l}")));
        }
        lines
    }

    /// Programs attached to the ingress of these interfaces, as
    /// `DEV: NAME`: tcx ones (asked through aya: Debian's bpftool 7.1 does
    /// not know tcx) and legacy tc filters (`bpftool net show`).
    pub fn tc_programs(&self, devs: &[&str]) -> Vec<String> {
        use aya::programs::{SchedClassifier, TcAttachType};
        let mut found = Vec::new();
        for dev in devs {
            let dev = dev.to_string();
            let tcx = retry_listing(|| {
                self.run(|| SchedClassifier::query_tcx(&dev, TcAttachType::Ingress))
                    .map_err(|e| format!("querying tcx programs on {dev} in {}: {e}", self.name))
            });
            found.extend(
                tcx.1
                    .iter()
                    .map(|program| format!("{dev}: {}", program.name_as_str().unwrap_or("?"))),
            );
        }
        let out = must_list(
            "ip",
            &["netns", "exec", &self.name, "bpftool", "-j", "net", "show"],
        );
        let all: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("bpftool -j net show: bad JSON ({e}): {out}"));
        let text = |filter: &serde_json::Value, key: &str| {
            filter
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        found.extend(
            all.as_array()
                .unwrap_or_else(|| panic!("bpftool -j net show: not an array: {out}"))
                .iter()
                .filter_map(|section| section.get("tc").and_then(|tc| tc.as_array()))
                .flatten()
                // Legacy filters only: a bpftool that knows tcx lists those
                // too, and they are counted above.
                .filter(|filter| {
                    let kind = text(filter, "kind");
                    devs.contains(&text(filter, "devname").as_str())
                        && kind.ends_with("ingress")
                        && !kind.starts_with("tcx")
                })
                .map(|filter| {
                    format!(
                        "{}: {} (tc filter)",
                        text(filter, "devname"),
                        text(filter, "name")
                    )
                }),
        );
        found
    }

    /// Nothing of a daemon that ended is left here: no proto 244 rule or
    /// route (polled: after SIGKILL the route guard removes what the daemon
    /// could not), no tc program on `devs`, the routing rules as
    /// `rules_before`, no BPF link.
    pub fn assert_nothing_left(&self, devs: &[&str], rules_before: &[String]) {
        let (rules, routes) = poll_until(
            Duration::from_secs(10),
            || (self.proxy_rules(), self.proxy_routes()),
            |(rules, routes)| rules.is_empty() && routes.is_empty(),
        );
        assert_eq!(rules, Vec::<String>::new(), "proto 244 rules left");
        assert_eq!(routes, Vec::<String>::new(), "proto 244 routes left");
        assert_eq!(
            self.wait_no_tc_programs(devs, Duration::from_secs(10)),
            Vec::<String>::new(),
            "tc programs left"
        );
        assert_eq!(
            self.all_rules(),
            rules_before,
            "routing rules differ from before the start"
        );
        assert_eq!(
            self.wait_no_bpf_links(Duration::from_secs(10)),
            Vec::<serde_json::Value>::new()
        );
    }

    /// Polls until the daemon's routes are gone; returns what is left on timeout.
    pub fn wait_no_proxy_routes(&self, timeout: Duration) -> Vec<String> {
        poll_until(timeout, || self.proxy_routes(), Vec::is_empty)
    }

    /// Polls until the tc programs on `devs` are gone; returns what is left on
    /// timeout.
    pub fn wait_no_tc_programs(&self, devs: &[&str], timeout: Duration) -> Vec<String> {
        poll_until(timeout, || self.tc_programs(devs), Vec::is_empty)
    }

    /// BPF links attached to this namespace (`bpftool -j link show`, entries of
    /// type `netns` whose `netns_ino` is ours; every link on the machine is
    /// listed, see [`must_list`]). Panics if bpftool is missing.
    pub fn bpf_netns_links(&self) -> Vec<serde_json::Value> {
        let ino = self.inode();
        let out = must_list("bpftool", &["-j", "link", "show"]);
        let all: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("bpftool -j link show: bad JSON ({e}): {out}"));
        let all = all
            .as_array()
            .unwrap_or_else(|| panic!("bpftool -j link show: not an array: {out}"));
        all.iter()
            .filter(|l| {
                l.get("type").and_then(|t| t.as_str()) == Some("netns")
                    && l.get("netns_ino").and_then(|i| i.as_u64()) == Some(ino)
            })
            .cloned()
            .collect()
    }

    /// Polls until no BPF link is attached to this namespace; returns what is
    /// left on timeout.
    pub fn wait_no_bpf_links(&self, timeout: Duration) -> Vec<serde_json::Value> {
        poll_until(timeout, || self.bpf_netns_links(), Vec::is_empty)
    }
}

/// Kills what still runs in namespace `name`: deleting the name would
/// leave such a process serving in a namespace nobody can reach (a
/// successor a failed `upgrade` started, a route guard still at work, the
/// peers of a test process that was killed).
fn kill_what_is_left(name: &str) {
    let out = run_cmd("ip", &["netns", "pids", name]);
    let ours = std::process::id();
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<u32>().ok())
        .filter(|&pid| pid != ours)
    {
        let command = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .replace('\0', " ");
        eprintln!(
            "lab: killing {pid} ({}), left in netns {name}",
            command.trim_end()
        );
        // SAFETY: kill(2) takes no pointers.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_what_is_left(&self.name);
        let out = run_cmd("ip", &["netns", "del", &self.name]);
        if !out.status.success() {
            // Never panic in drop (it may run while unwinding): say it loudly.
            eprintln!(
                "lab: `ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
    }
}

/// Creates a veth pair with one end in each namespace and brings both up.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) {
    a.ip(&[
        "link",
        "add",
        a_dev,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", a_dev, "up"]);
    b.ip(&["link", "set", b_dev, "up"]);
}

/// `n` (at most 65 536) IPv6 /64 prefixes in 2001:db8:100::/48, which no
/// topology uses: a large policy's service prefixes.
pub fn many_prefixes(n: u32) -> Vec<String> {
    (0..n).map(|i| format!("2001:db8:100:{i:x}::/64")).collect()
}

/// Addresses of the standard topology.
pub mod addr {
    pub const CL4: &str = "198.51.100.2";
    pub const PX4_CL: &str = "198.51.100.1";
    pub const PX4_SV: &str = "203.0.113.1";
    pub const SV4: &str = "203.0.113.2";
    pub const SV4_B: &str = "203.0.113.3";
    pub const CL6: &str = "2001:db8:c::2";
    pub const PX6_CL: &str = "2001:db8:c::1";
    pub const PX6_SV: &str = "2001:db8:5::1";
    pub const SV6: &str = "2001:db8:5::2";
    pub const SV6_B: &str = "2001:db8:5::3";
}

/// The standard topology:
///
/// ```text
/// cl (198.51.100.2, 2001:db8:c::2)
///  | to-px / to-cl
/// px (198.51.100.1, 2001:db8:c::1 | 203.0.113.1, 2001:db8:5::1), forwarding on
///  | to-sv / to-px
/// sv (203.0.113.2 + .3, 2001:db8:5::2 + ::3), default routes via px
/// ```
///
/// cl routes the service prefixes (192.0.2.0/24, 2001:db8:a::/64) and the
/// server side via px. Fields drop (namespaces are deleted) in order.
pub struct Topo {
    pub cl: Netns,
    pub px: Netns,
    pub sv: Netns,
}

impl Topo {
    pub fn new(test: &str) -> Topo {
        use addr::*;
        let cl = Netns::new(test, "cl");
        let px = Netns::new(test, "px");
        let sv = Netns::new(test, "sv");
        veth(&cl, "to-px", &px, "to-cl");
        veth(&px, "to-sv", &sv, "to-px");

        cl.addr("to-px", &format!("{CL4}/24"));
        cl.addr("to-px", &format!("{CL6}/64"));
        px.addr("to-cl", &format!("{PX4_CL}/24"));
        px.addr("to-cl", &format!("{PX6_CL}/64"));
        px.addr("to-sv", &format!("{PX4_SV}/24"));
        px.addr("to-sv", &format!("{PX6_SV}/64"));
        sv.addr("to-px", &format!("{SV4}/24"));
        sv.addr("to-px", &format!("{SV4_B}/24"));
        sv.addr("to-px", &format!("{SV6}/64"));
        sv.addr("to-px", &format!("{SV6_B}/64"));

        px.sysctl("net.ipv4.ip_forward", "1");
        px.sysctl("net.ipv6.conf.all.forwarding", "1");

        cl.route("192.0.2.0/24", PX4_CL);
        cl.route("203.0.113.0/24", PX4_CL);
        cl.route("2001:db8:a::/64", PX6_CL);
        cl.route("2001:db8:5::/64", PX6_CL);
        sv.route("default", PX4_SV);
        sv.route("default", PX6_SV);

        Topo { cl, px, sv }
    }

    /// The topology with one [`handlers::hello_echo`] server on sv, on `at`,
    /// greeting with `hello`.
    pub fn with_echo(test: &str, at: &str, hello: &str) -> (Topo, Server) {
        let t = Topo::new(test);
        let server = Server::start(&t.sv, sa(at), handlers::hello_echo(hello));
        (t, server)
    }
}

/// Addresses of the bridged topology ([`Bridged`]).
pub mod bridged_addr {
    pub const CL4: &str = "198.51.100.2";
    pub const BR4: &str = "198.51.100.3";
    pub const RT4_CL: &str = "198.51.100.1";
    pub const RT4_SV: &str = "203.0.113.1";
    pub const SV4: &str = "203.0.113.2";
    pub const CL6: &str = "2001:db8:c::2";
    pub const BR6: &str = "2001:db8:c::3";
    pub const RT6_CL: &str = "2001:db8:c::1";
    pub const RT6_SV: &str = "2001:db8:5::1";
    pub const SV6: &str = "2001:db8:5::2";
}

/// The bridged topology: the proxy host is a Linux bridge between the
/// client and its router, in one subnet; the router routes to the server.
///
/// ```text
/// cl (198.51.100.2, 2001:db8:c::2), default routes via rt
///  | to-br / to-cl
/// br: bridge br0 (198.51.100.3, 2001:db8:c::3) with ports to-cl and to-rt,
///  |  default routes via rt; no forwarding sysctl
///  | to-rt / to-br
/// rt (198.51.100.1, 2001:db8:c::1 | 203.0.113.1, 2001:db8:5::1), forwarding on
///  | to-sv / to-rt
/// sv (203.0.113.2, 2001:db8:5::2), default routes via rt
/// ```
///
/// Neither cl nor rt knows of br: their routes are those they would have
/// without it. Fields drop (namespaces are deleted) in order.
pub struct Bridged {
    pub cl: Netns,
    pub br: Netns,
    pub rt: Netns,
    pub sv: Netns,
}

impl Bridged {
    /// The topology, with br's address on the bridge (see [`Bridged::bare`]).
    pub fn new(test: &str) -> Bridged {
        use bridged_addr::*;
        let t = Bridged::bare(test);
        t.br.addr("br0", &format!("{BR4}/24"));
        t.br.addr("br0", &format!("{BR6}/64"));
        t.br.route("default", RT4_CL);
        t.br.route("default", RT6_CL);
        t
    }

    /// The topology without an address or route on br: a plain bridge.
    pub fn bare(test: &str) -> Bridged {
        use bridged_addr::*;
        let cl = Netns::new(test, "cl");
        let br = Netns::new(test, "br");
        let rt = Netns::new(test, "rt");
        let sv = Netns::new(test, "sv");
        veth(&cl, "to-br", &br, "to-cl");
        veth(&br, "to-rt", &rt, "to-br");
        veth(&rt, "to-sv", &sv, "to-rt");
        // A fixed MAC: the bridge's would otherwise follow its ports'.
        br.ip(&[
            "link",
            "add",
            "br0",
            "address",
            "02:00:5e:10:00:01",
            "type",
            "bridge",
        ]);
        for port in ["to-cl", "to-rt"] {
            br.ip(&["link", "set", port, "master", "br0"]);
        }
        br.ip(&["link", "set", "br0", "up"]);
        br.sysctl("net.ipv6.conf.br0.accept_dad", "0");

        cl.addr("to-br", &format!("{CL4}/24"));
        cl.addr("to-br", &format!("{CL6}/64"));
        rt.addr("to-br", &format!("{RT4_CL}/24"));
        rt.addr("to-br", &format!("{RT6_CL}/64"));
        rt.addr("to-sv", &format!("{RT4_SV}/24"));
        rt.addr("to-sv", &format!("{RT6_SV}/64"));
        sv.addr("to-rt", &format!("{SV4}/24"));
        sv.addr("to-rt", &format!("{SV6}/64"));
        rt.sysctl("net.ipv4.ip_forward", "1");
        rt.sysctl("net.ipv6.conf.all.forwarding", "1");
        cl.route("default", RT4_CL);
        cl.route("default", RT6_CL);
        sv.route("default", RT4_SV);
        sv.route("default", RT6_SV);
        Bridged { cl, br, rt, sv }
    }
}
