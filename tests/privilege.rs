//! Least privilege and `l4proxy doctor`: after start-up the daemon keeps
//! only cap_net_admin and cap_net_bind_service, as `--user nobody` (an
//! existing unprivileged user: the test adds none to the machine) or as
//! root, and still relays transparently, reloads and cleans up; a reload
//! that needs a capability it does not hold is refused; `doctor` reports
//! what a host lacks without changing it. In the routed lab of tests/lab
//! (cl — px — sv), IPv4.

mod lab;

use std::time::Duration;

use lab::daemon::{Stray, command, field_string as field, message};
use lab::tls::Output;
use lab::{Daemon, Netns, Server, TempDir, Topo, addr, connect, sa, talk};
use serde_json::{Value, json};

const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
/// What the daemon keeps (README, "Least privilege").
const KEPT: u64 = 1 << CAP_NET_ADMIN | 1 << CAP_NET_BIND_SERVICE;
/// What starting a daemon takes: cap_bpf, cap_perfmon, cap_net_admin.
const START: u64 = 1 << 39 | 1 << 38 | 1 << CAP_NET_ADMIN;

/// A gateway rule on px's client side for sv's port(s), relayed to sv's
/// other address from the client's own address and port: every upstream
/// connect is a transparent bind.
fn policy(ports: &[u16]) -> Value {
    json!({
        "intercept": [{ "name": "gateway", "prefixes": ["203.0.113.0/24"], "ports": ports,
                        "interfaces": ["to-cl"], "upstream": "web" }],
        "upstreams": { "web": { "servers": [format!("{}:8080", addr::SV4_B)], "bind": "client" } }
    })
}

/// The credentials in /proc/PID/task/TID/status of one thread.
#[derive(Debug, PartialEq, Eq)]
struct Credentials {
    uid: String,
    gid: String,
    inheritable: u64,
    permitted: u64,
    effective: u64,
    bounding: u64,
    ambient: u64,
}

fn credentials(status: &str) -> Credentials {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_owned()
    };
    let mask = |name| u64::from_str_radix(&field(name), 16).unwrap();
    Credentials {
        uid: field("Uid:"),
        gid: field("Gid:"),
        inheritable: mask("CapInh:"),
        permitted: mask("CapPrm:"),
        effective: mask("CapEff:"),
        bounding: mask("CapBnd:"),
        ambient: mask("CapAmb:"),
    }
}

/// Every thread of `pid`: capabilities are per thread.
fn threads_credentials(pid: i32) -> Vec<(String, Credentials)> {
    let dir = format!("/proc/{pid}/task");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| {
            let path = entry.unwrap().path().join("status");
            let status = std::fs::read_to_string(&path).unwrap();
            (path.display().to_string(), credentials(&status))
        })
        .collect()
}

/// Every thread runs as uid and gid (all four of each) with exactly
/// `caps` permitted and effective, `bounding` in its bounding set, nothing
/// inheritable or ambient.
fn assert_credentials(d: &Daemon, (uid, gid): (u32, u32), caps: u64, bounding: u64) {
    let four = |id: u32| [id; 4].map(|n| n.to_string()).join("\t");
    let wanted = Credentials {
        uid: four(uid),
        gid: four(gid),
        inheritable: 0,
        permitted: caps,
        effective: caps,
        bounding,
        ambient: 0,
    };
    let threads = threads_credentials(d.pid());
    assert!(threads.len() > 1, "the runtime's threads: {threads:?}");
    for (path, creds) in threads {
        assert_eq!(creds, wanted, "{path} (the l4proxy log is printed below)");
    }
}

/// The crash guard (the daemon's only child) stays uid 0 with cap_net_admin.
fn assert_guard(d: &Daemon) {
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", d.pid())).unwrap();
    let guard: i32 = children
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("children: {children:?}"));
    let status = std::fs::read_to_string(format!("/proc/{guard}/status")).unwrap();
    let creds = credentials(&status);
    assert_eq!(creds.uid, "0\t0\t0\t0", "{status}");
    assert_eq!(
        (creds.permitted, creds.effective),
        (1 << CAP_NET_ADMIN, 1 << CAP_NET_ADMIN),
        "{status}"
    );
}

/// `nobody`'s uid and primary gid.
fn nobody() -> (u32, u32) {
    let id = |flag| lab::must("id", &[flag, "nobody"]).trim().parse().unwrap();
    (id("-u"), id("-g"))
}

/// A connection from cl to sv:`port` through the daemon: the server sees
/// the client's own address and port (a transparent bind by the daemon).
fn transparent_connection(t: &Topo, d: &mut Daemon, server: &Server, port: u16) {
    let seen_before = server.accepted().len();
    let to = sa(&format!("{}:{port}", addr::SV4));
    let mut c = connect(&t.cl, to);
    let client = c.local_addr().unwrap();
    talk(&mut c, "server", &format!("to {to}"));
    drop(c);
    let accepted = server.wait_accepted(seen_before + 1, Duration::from_secs(5));
    assert_eq!(
        accepted[seen_before].peer, client,
        "the server sees the client"
    );
    let closed = d.closed_event(client);
    assert_eq!(field(&closed, "source"), client.to_string(), "{closed}");
}

/// SIGTERM: exit 0, and nothing of the daemon's left in px.
fn assert_clean_shutdown(t: &Topo, d: &mut Daemon) {
    let st = d.terminate(Duration::from_secs(10));
    d.assert_exit_ok(st);
    let routes = t.px.wait_no_proxy_routes(Duration::from_secs(10));
    assert!(routes.is_empty(), "{routes:?}");
    assert!(t.px.proxy_rules().is_empty(), "{:?}", t.px.proxy_rules());
    let tc =
        t.px.wait_no_tc_programs(&["to-cl", "to-sv"], Duration::from_secs(10));
    assert!(tc.is_empty(), "{tc:?}");
    let links = t.px.wait_no_bpf_links(Duration::from_secs(10));
    assert!(links.is_empty(), "{links:?}");
}

#[test]
fn as_user_nobody_only_the_documented_capabilities_remain() {
    let (t, server) = Topo::with_echo("privuser", "203.0.113.3:8080", "server");
    let mut d = Daemon::start_ready(&t.px, &policy(&[8080]), &["--user", "nobody"]);
    let nobody = nobody();
    assert_credentials(&d, nobody, KEPT, KEPT);
    assert_guard(&d);
    transparent_connection(&t, &mut d, &server, 8080);

    // A new port: the policy file is read again as nobody (the lab's temp
    // dir is world-readable), a new rule goes into the kernel's map.
    let verdict = d.reload(&policy(&[8080, 8081]));
    assert_eq!(message(&verdict), Some("policy reloaded"), "{verdict}");
    transparent_connection(&t, &mut d, &server, 8081);
    assert_credentials(&d, nobody, KEPT, KEPT);
    // The control socket still answers root.
    let asked = command(&t.px, &["status"], Duration::from_secs(30));
    assert!(asked.success(), "{asked:?}");
    // A successor it started could not load its programs: `upgrade` is
    // refused, saying what to do instead.
    let upgrade = command(&t.px, &["upgrade"], Duration::from_secs(30));
    assert!(
        !upgrade.success() && upgrade.stderr.contains("l4proxy run --takeover"),
        "{upgrade:?}"
    );
    transparent_connection(&t, &mut d, &server, 8081);
    assert_clean_shutdown(&t, &mut d);
}

#[test]
fn as_root_the_same_capabilities_remain_and_what_a_successor_needs_is_bounded() {
    let (t, server) = Topo::with_echo("privroot", "203.0.113.3:8080", "server");
    let mut d = Daemon::start_ready(&t.px, &policy(&[8080]), &[]);
    // The bounding set keeps what a start takes: `l4proxy upgrade` has the
    // daemon start its successor.
    assert_credentials(&d, (0, 0), KEPT, KEPT | START);
    transparent_connection(&t, &mut d, &server, 8080);
    assert_clean_shutdown(&t, &mut d);
}

/// Runs `f` on a thread of its own without `caps` in its bounding set
/// (per thread, and inherited by what it starts).
fn without_caps<T: Send>(caps: &[u32], f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            for &cap in caps {
                // SAFETY: plain syscall; only this thread's bounding set changes.
                let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
                assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap()
    })
}

/// The control socket answers root holding cap_net_admin, not uid 0 alone
/// (a container's root sharing the network namespace, say).
#[test]
fn the_control_socket_answers_root_with_cap_net_admin_only() {
    let (t, _server) = Topo::with_echo("privctl", "203.0.113.3:8080", "server");
    let _d = Daemon::start_ready(&t.px, &policy(&[8080]), &[]);
    // The bounding set is per thread and inherited: `status` started from
    // this thread is root without cap_net_admin.
    let without = without_caps(&[CAP_NET_ADMIN], || {
        command(&t.px, &["status"], Duration::from_secs(30))
    });
    assert!(
        !without.success()
            && without
                .stderr
                .contains("only root with cap_net_admin may ask"),
        "{without:?}"
    );
    let with = command(&t.px, &["status"], Duration::from_secs(30));
    assert!(with.success(), "{with:?}");
}

/// Root without cap_net_admin that makes a user namespace of its own
/// (`unshare -U`) holds every capability there, cap_net_admin too: it is
/// still refused, its capabilities counting only in its namespace. Told
/// by the client's namespace where the daemon may read it (as root), else
/// by its uid and gid maps (a daemon run as nobody, as one that gave up
/// capabilities the client holds); root in the daemon's namespace is
/// answered either way.
#[test]
fn a_user_namespace_of_its_own_does_not_make_root_an_admin() {
    let binary = lab::daemon::binary();
    for (test, daemon_args) in [
        ("privuserns", &[][..]),
        ("privusernsmap", &["--user", "nobody"]),
    ] {
        let (t, _server) = Topo::with_echo(test, "203.0.113.3:8080", "server");
        let _d = Daemon::start_ready(&t.px, &policy(&[8080]), daemon_args);
        let without_cap_net_admin = |args: &[&str]| {
            without_caps(&[CAP_NET_ADMIN], || {
                lab::tls::run_in(&t.px, "unshare", args, b"", Duration::from_secs(30))
            })
        };
        // What the namespace gives it: cap_net_admin among the rest.
        let caps = without_cap_net_admin(&["-U", "-r", "grep", "CapEff", "/proc/self/status"]);
        let effective = caps
            .stdout
            .split_whitespace()
            .nth(1)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        assert!(
            caps.success() && effective.is_some_and(|set| set & 1 << CAP_NET_ADMIN != 0),
            "{caps:?}"
        );
        // Root in its namespace (`-r`), as the daemon sees it through
        // SO_PEERCRED.
        let refused = without_cap_net_admin(&["-U", "-r", binary, "status"]);
        assert!(
            !refused.success()
                && refused.stderr.contains(
                    "only root with cap_net_admin may ask (in the daemon's user namespace)"
                ),
            "{test}: {refused:?}"
        );
        let answered = command(&t.px, &["status"], Duration::from_secs(30));
        assert!(answered.success(), "{test}: {answered:?}");
    }
}

/// Under no_new_privs (the unit's `NoNewPrivileges=yes`), `l4proxy upgrade`
/// works: the successor the daemon starts can load its programs.
#[test]
fn under_no_new_privs_an_upgrade_works() {
    let (t, server) = Topo::with_echo("privnnp", "203.0.113.3:8080", "server");
    // no_new_privs is per thread and inherited: a thread of its own starts
    // the daemon with it.
    let mut d = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscall; only this thread's flag changes.
            let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            Daemon::start_ready(&t.px, &policy(&[8080]), &[])
        })
        .join()
        .unwrap()
    });
    // What a start takes stays permitted, for the successor, not effective.
    assert_root_threads(d.pid(), KEPT | START, KEPT);
    transparent_connection(&t, &mut d, &server, 8080);
    // The successor serves, its threads as the first daemon's were.
    let successor = upgrade(&t, &mut d);
    assert_root_threads(successor.0, KEPT | START, KEPT);
    successor.terminate(Duration::from_secs(30));
}

/// `l4proxy upgrade`: the daemon `d` exits cleanly, and its successor,
/// returned, serves.
fn upgrade(t: &Topo, d: &mut Daemon) -> Stray {
    let upgrade = command(&t.px, &["upgrade"], Duration::from_secs(60));
    assert!(upgrade.success(), "{upgrade:?}\n{}", d.log_text());
    let status = d.wait_exit(Duration::from_secs(30));
    d.assert_exit_ok(status);
    let successor = Stray::upgraded(&upgrade);
    let mut c = connect(&t.cl, sa("203.0.113.3:8080"));
    assert_eq!(lab::read_line(&mut c).unwrap(), "server");
    successor
}

/// Started where the bounding set has cap_sys_admin but not cap_bpf or
/// cap_perfmon (what loading programs took before Linux 5.8, and what some
/// units still grant), `l4proxy upgrade` works: the bounding set keeps the
/// cap_sys_admin the start loaded with, for the successor to load with.
#[test]
fn with_cap_sys_admin_for_bpf_an_upgrade_works() {
    const CAP_SYS_ADMIN: u32 = 21;
    let (t, server) = Topo::with_echo("privsysadm", "203.0.113.3:8080", "server");
    // The bounding set is per thread and inherited: a thread of its own
    // starts the daemon without cap_bpf and cap_perfmon.
    let mut d = without_caps(&[38, 39], || {
        Daemon::start_ready(&t.px, &policy(&[8080]), &[])
    });
    assert_credentials(&d, (0, 0), KEPT, KEPT | 1 << CAP_SYS_ADMIN);
    transparent_connection(&t, &mut d, &server, 8080);
    upgrade(&t, &mut d).terminate(Duration::from_secs(30));
}

/// Every thread of `pid` runs as root with `permitted` and `effective`
/// capabilities, nothing inheritable or ambient.
fn assert_root_threads(pid: i32, permitted: u64, effective: u64) {
    let threads = threads_credentials(pid);
    assert!(threads.len() > 1, "the runtime's threads: {threads:?}");
    for (path, c) in threads {
        assert_eq!(
            (
                c.uid.as_str(),
                c.permitted,
                c.effective,
                c.inheritable,
                c.ambient
            ),
            ("0\t0\t0\t0", permitted, effective, 0, 0),
            "{path}"
        );
    }
}

/// Started without cap_net_bind_service (as a unit's bounding set would
/// do), the daemon refuses a reload that adds a CONNECT listener on port 80
/// before it changes anything: the old policy stays in force.
#[test]
fn a_reload_needing_a_capability_not_held_is_refused() {
    let (t, server) = Topo::with_echo("privrefuse", "203.0.113.3:8080", "server");
    // The bounding set is per thread and inherited: a thread of its own
    // starts the daemon without the capability.
    let mut d = without_caps(&[CAP_NET_BIND_SERVICE], || {
        Daemon::start_ready(&t.px, &policy(&[8080]), &[])
    });
    assert_credentials(&d, (0, 0), 1 << CAP_NET_ADMIN, START);

    let mut with_connect = policy(&[8080]);
    with_connect["intercept"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "explicit", "upstream": "web",
            "connect": { "listen": [format!("{}:80", addr::PX4_CL)], "clients": ["198.51.100.0/24"],
                         "ports": [8080], "destinations": ["203.0.113.0/24"] }
        }));
    let verdict = d.reload(&with_connect);
    let said = message(&verdict).unwrap_or_default();
    assert!(
        said.starts_with("policy not reloaded")
            && said.contains("cap_net_bind_service")
            && said.contains(&format!("{}:80", addr::PX4_CL)),
        "{verdict}"
    );
    // `l4proxy reload` (a unit's ExecReload) fails with the same reason.
    let asked = command(&t.px, &["reload"], Duration::from_secs(30));
    let stderr = &asked.stderr;
    assert_eq!(asked.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refused") && stderr.contains("cap_net_bind_service"),
        "{stderr}"
    );
    // Nothing of the new policy: no listener on port 80; the old one works.
    let listening = t.px.ss(&["-Htln", "sport", "= :80"]);
    assert!(listening.trim().is_empty(), "{listening}");
    transparent_connection(&t, &mut d, &server, 8080);
    assert_clean_shutdown(&t, &mut d);
}

/// `l4proxy doctor --policy FILE` in `ns`.
fn doctor(ns: &Netns, policy: &Value, dir: &TempDir) -> Output {
    let path = dir.join("policy.json");
    std::fs::write(&path, serde_json::to_vec_pretty(policy).unwrap()).unwrap();
    let path = path.to_str().unwrap();
    command(ns, &["doctor", "--policy", path], Duration::from_secs(30))
}

/// What the README asks of a unit whose daemon runs as a user: its
/// capability bounding set plus cap_setuid and cap_setgid, nothing more.
/// `doctor --user` finds nothing missing there, and `run --user` starts.
#[test]
fn as_a_user_under_the_units_bounding_set_doctor_and_run_agree() {
    let (t, server) = Topo::with_echo("privunit", "203.0.113.3:8080", "server");
    let dir = TempDir::new("privunit");
    let path = dir.join("policy.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&policy(&[8080])).unwrap()).unwrap();
    let bounding = "-all,+net_admin,+bpf,+perfmon,+net_bind_service,+setuid,+setgid";
    let sandbox = [
        "setpriv",
        "--bounding-set",
        bounding,
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
    ];
    let mut args: Vec<&str> = sandbox[1..].to_vec();
    args.extend([
        lab::daemon::binary(),
        "doctor",
        "--user",
        "nobody",
        "--policy",
        path.to_str().unwrap(),
    ]);
    let doctor = lab::tls::run_in(&t.px, sandbox[0], &args, b"", Duration::from_secs(30));
    assert_eq!(doctor.code(), Some(0), "{}", doctor.describe());
    assert!(
        !doctor.stdout.lines().any(|l| l.starts_with("missing")),
        "{}",
        doctor.stdout
    );

    let mut d = Daemon::start_wrapped(&t.px, &policy(&[8080]), &["--user", "nobody"], &sandbox);
    d.wait_ready(Duration::from_secs(30));
    // Without cap_setpcap the bounding set stays the sandbox's:
    // cap_setgid (6) and cap_setuid (7) beside what a start takes.
    assert_credentials(&d, nobody(), KEPT, START | KEPT | 1 << 6 | 1 << 7);
    transparent_connection(&t, &mut d, &server, 8080);
}

/// `doctor --user` checks that the user can read what a reload rereads: a
/// TLS key only root can read is missing, named; made readable, it is ok.
#[test]
fn doctor_checks_that_the_user_can_read_the_policys_files() {
    use std::os::unix::fs::PermissionsExt;
    let t = Topo::new("doctoruser");
    let dir = TempDir::new("doctoruser");
    let ca = lab::pki::Ca::new(&dir, "front");
    let cert = ca.issue_server("app.example.test", &["DNS:app.example.test"]);
    let mut terminating = policy(&[8443]);
    terminating["intercept"][0]["terminate"] =
        json!({ "certificates": [ { "chain": cert.chain, "key": cert.key } ] });
    let path = dir.join("policy.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&terminating).unwrap()).unwrap();
    let doctor = || {
        let args = [
            "doctor",
            "--user",
            "nobody",
            "--policy",
            path.to_str().unwrap(),
        ];
        command(&t.px, &args, Duration::from_secs(30))
    };
    let key = cert.key.to_str().unwrap();
    for (mode, code, line) in [
        (0o600, 1, "missing files readable by nobody:"),
        (0o644, 0, "ok      files readable by nobody:"),
    ] {
        std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = doctor();
        let text = &out.stdout;
        assert_eq!(out.code(), Some(code), "{mode:o}: {text}{}", out.stderr);
        let said = text.lines().find(|l| l.starts_with(line));
        assert!(said.is_some(), "{mode:o}: no {line:?} in:\n{text}");
        if code == 1 {
            assert!(said.unwrap().contains(key), "{mode:o}: {text}");
        }
    }
}

#[test]
fn doctor_reports_what_a_host_lacks() {
    let t = Topo::new("doctor");
    let dir = TempDir::new("doctor");
    let rules_before = t.px.all_rules();

    let ready = doctor(&t.px, &policy(&[8080]), &dir);
    let text = &ready.stdout;
    assert_eq!(ready.code(), Some(0), "{text}");
    for line in [
        "ok      kernel:",
        "ok      BPF programs:",
        "ok      capability cap_bpf:",
        "ok      interfaces:",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }

    let mut elsewhere = policy(&[8080]);
    elsewhere["intercept"][0]["interfaces"] = json!(["eth9"]);
    let missing = doctor(&t.px, &elsewhere, &dir);
    let text = &missing.stdout;
    assert_eq!(missing.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("missing")
            && l.contains("intercept[0].interfaces[0]: no interface \"eth9\"")),
        "{text}"
    );

    // src_valid_mark on the interface the tc program marks on: its marked
    // packets would be dropped as martians.
    t.px.sysctl("net.ipv4.conf.to-cl.src_valid_mark", "1");
    let marked = doctor(&t.px, &policy(&[8080]), &dir);
    let text = &marked.stdout;
    assert_eq!(marked.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l
            .starts_with("missing kernel setting: net.ipv4.conf.to-cl.src_valid_mark")
            && l.contains("set net.ipv4.conf.all.src_valid_mark=0")),
        "{text}"
    );

    // Nothing was changed: no route, rule, tc program or link of ours.
    assert!(t.px.proxy_routes().is_empty(), "{:?}", t.px.proxy_routes());
    assert_eq!(t.px.all_rules(), rules_before);
    assert!(t.px.tc_programs(&["to-cl", "to-sv"]).is_empty());
    assert!(t.px.bpf_netns_links().is_empty());
}
