//! The paths under test and how to start them: the direct path, l4proxy
//! (steered by sk_lookup), HAProxy without and with splice and nginx's
//! stream module (listening on service addresses of the proxy
//! host), for the rule-count
//! case the classic iptables TPROXY recipe in front of a transparent HAProxy,
//! and for the CONNECT case l4proxy's and Squid's explicit-proxy listeners.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::Context;
use serde_json::{Value, json};

use super::{
    dial::Dial,
    lab::{self, Netns, Proc},
    nginx,
};

/// A way from the client to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Direct,
    L4proxy,
    Haproxy,
    HaproxySplice,
    /// nginx's stream module.
    Nginx,
    /// Squid as an explicit proxy (CONNECT case only).
    Squid,
}

impl Target {
    /// The transparent paths.
    pub const ALL: [Target; 5] = [
        Target::Direct,
        Target::L4proxy,
        Target::Haproxy,
        Target::HaproxySplice,
        Target::Nginx,
    ];

    /// The paths with a proxy process.
    pub const PROXIES: [Target; 5] = [
        Target::L4proxy,
        Target::Haproxy,
        Target::HaproxySplice,
        Target::Nginx,
        Target::Squid,
    ];

    /// The peers l4proxy's targets are set against (the better of them).
    pub const PEERS: [Target; 3] = [Target::Haproxy, Target::HaproxySplice, Target::Nginx];

    pub fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::L4proxy => "l4proxy",
            Target::Haproxy => "HAProxy",
            Target::HaproxySplice => "HAProxy+splice",
            Target::Nginx => "nginx",
            Target::Squid => "Squid",
        }
    }

    /// The service address clients connect to: the server's own, or one the
    /// proxy host owns.
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Target::Direct => lab::SV.parse().expect("a literal address"),
            Target::L4proxy => Ipv4Addr::new(192, 0, 2, 10),
            Target::Haproxy => Ipv4Addr::new(192, 0, 2, 20),
            Target::HaproxySplice => Ipv4Addr::new(192, 0, 2, 21),
            Target::Nginx => Ipv4Addr::new(192, 0, 2, 22),
            Target::Squid => unreachable!("Squid is reached by CONNECT only"),
        }
    }

    pub fn addr(self, service: Service) -> SocketAddr {
        let port = match self {
            Target::Direct => service.server_port(),
            _ => service.proxy_port(),
        };
        SocketAddr::from((self.ip(), port))
    }

    /// The CONNECT listener of a path that has one, on the proxy host's
    /// client-side address.
    pub fn connect_listener(self) -> Option<SocketAddr> {
        let port = match self {
            Target::L4proxy => 3128,
            Target::Squid => 3129,
            Target::Direct | Target::Haproxy | Target::HaproxySplice | Target::Nginx => {
                return None;
            }
        };
        let ip: Ipv4Addr = lab::PX_CL.parse().expect("a literal address");
        Some(SocketAddr::from((ip, port)))
    }

    /// How the CONNECT case reaches `server` on this path: through its
    /// CONNECT listener, or straight on the direct path.
    pub fn tunnel_to(self, server: SocketAddr) -> Dial {
        match self.connect_listener() {
            Some(proxy) => Dial::Tunnel { proxy, server },
            None => {
                assert_eq!(self, Target::Direct, "no CONNECT front end here");
                Dial::Straight(server)
            }
        }
    }
}

/// The paths of the CONNECT case.
pub const CONNECT_PATHS: [Target; 3] = [Target::Direct, Target::L4proxy, Target::Squid];

/// Server ports of the bulk streams through CONNECT tunnels (the responder's
/// sink and source).
pub const SINK_PORT: u16 = 8082;
pub const SOURCE_PORT: u16 = 8083;

/// The server ports a CONNECT tunnel may reach: the short-connection
/// responder's, the sink's and the source's.
fn tunnel_ports() -> [u16; 3] {
    [Service::Tls.server_port(), SINK_PORT, SOURCE_PORT]
}

/// What the client asks for.
#[derive(Clone, Copy, Debug)]
pub enum Service {
    /// The iperf3 server.
    Iperf,
    /// The responder behind an SNI route (`a.example.com`).
    Tls,
    /// The responder in hold mode, for idle connections.
    Idle,
}

impl Service {
    const ALL: [Service; 3] = [Service::Iperf, Service::Tls, Service::Idle];

    pub fn server_port(self) -> u16 {
        match self {
            Service::Iperf => 5201,
            Service::Tls => 8080,
            Service::Idle => 8081,
        }
    }

    fn proxy_port(self) -> u16 {
        match self {
            Service::Iperf => 5201,
            Service::Tls => 443,
            Service::Idle => 8081,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Service::Iperf => "iperf",
            Service::Tls => "tls",
            Service::Idle => "idle",
        }
    }
}

/// The server name the load generator sends and the proxies route on.
pub const SNI: &str = "a.example.com";

/// l4proxy's policy: one rule per service; the TLS one sends `SNI` to the
/// responder by a route (`sni_routes`), or straight on if the daemon has no
/// SNI routing yet. With `connect`, also a CONNECT rule for the lab's
/// clients to the server ports of the CONNECT case, each tunnel to the
/// address asked for (the server's own, so no `allow_reserved`).
pub fn l4proxy_policy(sni_routes: bool, connect: bool) -> Value {
    let ip = Target::L4proxy.ip();
    let mut intercept: Vec<Value> = Service::ALL
        .iter()
        .map(|&s| {
            let mut rule = json!({
                "name": s.name(),
                "prefixes": [format!("{ip}/32")],
                "ports": [s.proxy_port()],
                "upstream": s.name(),
            });
            if sni_routes && matches!(s, Service::Tls) {
                rule.as_object_mut().expect("an object").remove("upstream");
            }
            rule
        })
        .collect();
    let mut upstreams: serde_json::Map<String, Value> = Service::ALL
        .iter()
        .map(|&s| {
            let server = format!("{}:{}", lab::SV, s.server_port());
            (s.name().to_owned(), json!({ "servers": [server] }))
        })
        .collect();
    if connect {
        let listener = Target::L4proxy.connect_listener().expect("l4proxy has one");
        intercept.push(json!({
            "name": "connect",
            "upstream": "asked",
            "connect": {
                "listen": [listener.to_string()],
                "clients": [lab::CL_NET],
                "ports": tunnel_ports(),
            },
        }));
        upstreams.insert("asked".to_owned(), json!({ "original_destination": true }));
    }
    let mut policy = json!({ "intercept": intercept, "upstreams": upstreams });
    if sni_routes {
        policy["routes"] = json!([{
            "name": "a",
            "match": { "intercept": [Service::Tls.name()], "sni": [SNI] },
            "upstream": Service::Tls.name(),
        }]);
    }
    policy
}

/// Writes `policy` and asks the binary whether it accepts it; the error is
/// the checker's message.
pub fn check_policy(binary: &Path, file: &Path, policy: &Value) -> anyhow::Result<()> {
    std::fs::write(file, serde_json::to_vec_pretty(policy)?)?;
    let out = std::process::Command::new(binary)
        .arg("check")
        .arg(file)
        .output()
        .with_context(|| format!("running {} check", binary.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{}",
            String::from_utf8_lossy(&out.stderr).trim_end().to_owned()
                + String::from_utf8_lossy(&out.stdout).trim_end()
        );
    }
    Ok(())
}

/// Starts `l4proxy run` in the proxy namespace with HAProxy's `maxconn` (the
/// daemon refuses a `--max-connections` its descriptor limit cannot cover).
/// Per-connection log lines are off (`RUST_LOG=warn`), as HAProxy here has no
/// `log` line either.
pub fn start_l4proxy(
    px: &Netns,
    binary: &Path,
    policy: &Path,
    maxconn: u64,
    log: &Path,
) -> anyhow::Result<Proc> {
    start_l4proxy_logged(px, binary, policy, maxconn, log, "warn")
}

/// [`start_l4proxy`] with JSON log lines that `rust_log` (a `RUST_LOG`
/// filter) lets through.
pub fn start_l4proxy_logged(
    px: &Netns,
    binary: &Path,
    policy: &Path,
    maxconn: u64,
    log: &Path,
    rust_log: &str,
) -> anyhow::Result<Proc> {
    let binary = binary.to_str().context("binary path is not UTF-8")?;
    let policy = policy.to_str().context("policy path is not UTF-8")?;
    Proc::start(
        px,
        "l4proxy",
        &[
            binary,
            "run",
            "--policy",
            policy,
            "--log-format",
            "json",
            "--grace-period",
            "1",
            "--max-connections",
            &maxconn.to_string(),
            // As the peers: neither sets keepalive by default.
            "--tcp-keepalive",
            "off",
        ],
        &[("RUST_LOG", rust_log)],
        log.to_owned(),
    )
}

/// HAProxy in TCP mode on its service address, one frontend per service;
/// the TLS one routes by `req.ssl_sni`. Without splice, larger buffers; with
/// it, splicing both ways (see [`haproxy_choice`] for both).
pub fn haproxy_config(target: Target, maxconn: u64) -> String {
    let ip = target.ip();
    let mut config = if target == Target::HaproxySplice {
        haproxy_common(maxconn, &format!("    tune.pipesize {}\n", PIPE_KIB * 1024))
            + "    option splice-request\n    option splice-response\n"
    } else {
        haproxy_common(
            maxconn,
            &format!("    tune.bufsize {}\n", BUFFER_KIB * 1024),
        )
    };
    for s in Service::ALL {
        let (name, server) = (s.name(), format!("{}:{}", lab::SV, s.server_port()));
        config += &format!("frontend {name}\n");
        config += &haproxy_binds(&format!("{ip}:{}", s.proxy_port()), "");
        match s {
            Service::Tls => {
                config += "    tcp-request inspect-delay 5s\n\
                           \x20   tcp-request content accept if { req.ssl_hello_type 1 }\n";
                config += &format!("    use_backend {name} if {{ req.ssl_sni -i {SNI} }}\n");
            }
            Service::Iperf | Service::Idle => config += &format!("    default_backend {name}\n"),
        }
        config += &format!("backend {name}\n    server s {server}\n");
    }
    config
}

/// The `stream` block of nginx (see `nginx` for the rest): one server per
/// service on its service address; the TLS one reads the ClientHello
/// (`ssl_preread`) and picks the upstream by a `map` of the server name, as
/// HAProxy's `req.ssl_sni` (other names get no upstream: closed). Buffers as
/// HAProxy's without splice.
pub fn nginx_stream() -> String {
    let ip = Target::Nginx.ip();
    let mut config = format!(
        "    proxy_buffer_size {BUFFER_KIB}k;\n    \
         map $ssl_preread_server_name $sni_upstream {{\n        {SNI} {};\n    }}\n",
        Service::Tls.name()
    );
    for s in Service::ALL {
        let (name, server) = (s.name(), format!("{}:{}", lab::SV, s.server_port()));
        config += &format!("    upstream {name} {{\n        server {server};\n    }}\n");
        config += &format!(
            "    server {{\n        listen {ip}:{} {};\n",
            s.proxy_port(),
            nginx::LISTEN
        );
        match s {
            Service::Tls => {
                config += "        ssl_preread on;\n        proxy_pass $sni_upstream;\n";
            }
            Service::Iperf | Service::Idle => config += &format!("        proxy_pass {name};\n"),
        }
        config += "    }\n";
    }
    config
}

/// A frontend's `bind` lines on `addr`, each followed by `options`: one per
/// thread (`thread N`), a listener per thread that the kernel picks among
/// (SO_REUSEPORT), as nginx's `reuseport` and l4proxy's workers have.
pub fn haproxy_binds(addr: &str, options: &str) -> String {
    (1..=cores())
        .map(|thread| format!("    bind {addr}{options} thread {thread}\n"))
        .collect()
}

/// HAProxy accepting whatever TPROXY hands its transparent listeners,
/// relaying it to the responder.
pub fn haproxy_tproxy_config(maxconn: u64) -> String {
    format!(
        "{}frontend tproxy\n{}    default_backend tls\nbackend tls\n    server s {}:{}\n",
        haproxy_common(maxconn, ""),
        haproxy_binds(&format!("0.0.0.0:{TPROXY_PORT}"), " transparent"),
        lab::SV,
        Service::Tls.server_port()
    )
}

/// The buffer size of HAProxy without splice and of nginx (their default is
/// 16 KiB; see [`haproxy_choice`]).
const BUFFER_KIB: usize = 64;

/// HAProxy+splice's pipes: as large as l4proxy's (256 KiB), rather than
/// the 64 KiB default.
const PIPE_KIB: usize = 256;

/// HAProxy's `maxpipes` (its default, `maxconn`/4, would not fit the
/// descriptor limit here); the splice cases use a few dozen.
pub const MAX_PIPES: u64 = 1024;

/// `global` (with `tuning`'s lines) and `defaults`: one thread per core,
/// TCP mode, ACKs riding on data where they can, and `maxconn` both
/// process-wide and per frontend (whose own default would be lower); see
/// [`haproxy_choice`].
pub fn haproxy_common(maxconn: u64, tuning: &str) -> String {
    format!(
        "global\n    nbthread {}\n    maxconn {maxconn}\n    maxpipes {MAX_PIPES}\n{tuning}\
         defaults\n    mode tcp\n    maxconn {maxconn}\n    timeout connect 5s\n    \
         timeout client 120s\n    timeout server 120s\n    option tcp-smart-accept\n    \
         option tcp-smart-connect\n",
        cores()
    )
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// How HAProxy runs and why (and nginx's buffers, chosen with HAProxy's),
/// one note each, for the report.
pub fn haproxy_choice(maxconn: u64) -> Vec<String> {
    vec![
        format!(
            "HAProxy: `nbthread {}`, one thread per core (its default here, written out), as \
             many as l4proxy's workers and nginx's worker processes.",
            cores()
        ),
        format!(
            "HAProxy: `maxconn {maxconn}` process-wide and per frontend (whose own default \
             would be lower), so that no limit caps the memory case; `maxpipes {MAX_PIPES}`, as \
             its default (`maxconn`/4) would not fit the descriptor limit."
        ),
        "HAProxy+splice: `option splice-request` and `option splice-response` (splice each \
         way whenever it can), not `option splice-auto`: in quick trial runs on this machine \
         (2026-11-27) they took about half the CPU per GiB of `splice-auto` (0.5–1.0 against \
         1.2–1.9 s/GiB) and beat HAProxy without splice in every bulk case, which \
         `splice-auto` did not; memory per idle connection was the same."
            .to_owned(),
        format!(
            "HAProxy+splice: `tune.pipesize {}`, pipes as large as l4proxy's (the default is \
             64 KiB; its manual advises larger pipes where many splice calls are made).",
            PIPE_KIB * 1024
        ),
        format!(
            "HAProxy: one `bind` line per thread (`thread 1` … `thread {}`) on each frontend's \
             address (in every case but TLS termination, whose note says why): a listener per thread that the kernel picks among (SO_REUSEPORT), as \
             nginx's `reuseport` and l4proxy's per-worker listeners; one shared listener would \
             hand connections between threads.",
            cores()
        ),
        "Every proxy without TCP keepalive: HAProxy's and nginx's defaults, and l4proxy run \
         with `--tcp-keepalive off` (its own default sets it on both sockets)."
            .to_owned(),
        "HAProxy: `option tcp-smart-accept` and `option tcp-smart-connect` on (off by default \
         in TCP mode): they hold ACKs back to ride on data, as l4proxy holds its upstream \
         handshake's last ACK until the first bytes. They leave HAProxy's sockets in \
         delayed-ACK mode, where a server that writes its answer in two small writes without \
         `TCP_NODELAY` waits for the delayed-ACK timer (44 ms in a trial in namespaces, \
         2026-11-27); the bench's responder sets `TCP_NODELAY`, so that cost does not arise \
         here."
            .to_owned(),
        format!(
            "HAProxy (without splice): `tune.bufsize {}`, and nginx: `proxy_buffer_size \
             {BUFFER_KIB}k` (both default to 16 KiB): in the same trial runs their CPU per GiB \
             relayed fell by about a fifth (HAProxy) and a third (nginx), while CPU per short \
             connection and memory per idle connection did not change beyond the noise. \
             HAProxy+splice keeps the default: its bulk bytes go through pipes. The rule-count \
             and TLS cases keep the defaults.",
            BUFFER_KIB * 1024
        ),
    ]
}

pub fn start_haproxy(px: &Netns, name: &str, config: &Path, log: &Path) -> anyhow::Result<Proc> {
    let config = config.to_str().context("config path is not UTF-8")?;
    Proc::start(
        px,
        name,
        &["haproxy", "-db", "-f", config],
        &[],
        log.to_owned(),
    )
}

const SQUID: &str = "/usr/sbin/squid";

/// Squid's `workers` (see `squid_choice` for why).
const SQUID_WORKERS: usize = 2;

/// How Squid runs and why, for the report.
pub fn squid_choice() -> String {
    format!(
        "Squid: on {}, {SQUID_WORKERS} workers (SMP, `squid --foreground`), as many as the \
         cores and as l4proxy's runtime threads: in alternating trial runs on this machine the \
         second worker raised Squid's set-up rate at concurrency 64 and 512 by about a third \
         and changed nothing at concurrency 1 (one tunnel stays on one worker). No cache, no \
         access log (l4proxy and HAProxy log no connections here either), CONNECT only, to the \
         case's server ports, from the client subnet.",
        Target::Squid.connect_listener().expect("Squid has one")
    )
}

/// Squid as a CONNECT-only explicit proxy on its listener: no cache, tunnels
/// for the lab's clients to the CONNECT case's server ports, no access log,
/// its files in `dir`.
fn squid_config(dir: &Path) -> String {
    let d = dir.display();
    let listener = Target::Squid.connect_listener().expect("Squid has one");
    let ports: Vec<String> = tunnel_ports().iter().map(u16::to_string).collect();
    // The clients ask for IP literals: Squid resolves nothing, and its
    // resolver (loopback, nothing there) never leaves the namespace.
    format!(
        "http_port {listener}\n\
         workers {SQUID_WORKERS}\n\
         pid_filename {d}/squid.pid\n\
         cache_log {d}/cache.log\n\
         access_log none\n\
         cache_store_log none\n\
         coredump_dir {d}\n\
         netdb_filename none\n\
         pinger_enable off\n\
         logfile_rotate 0\n\
         cache deny all\n\
         visible_hostname l4bench-squid\n\
         hosts_file none\n\
         dns_nameservers 127.0.0.1\n\
         shutdown_lifetime 0 seconds\n\
         acl clients src {}\n\
         acl tunnel method CONNECT\n\
         acl server_ports port {}\n\
         http_access allow tunnel clients server_ports\n\
         http_access deny all\n",
        lab::CL_NET,
        ports.join(" ")
    )
}

/// Writes Squid's config into `dir`, has `squid -k parse` check it and
/// starts Squid in the foreground in the proxy namespace. Squid drops root
/// for the user `proxy`, so `dir` becomes that user's. Its workers share
/// memory segments in /dev/shm and talk over sockets in /run/squid, which
/// stay behind when it is killed: it gets a tmpfs of its own on each, in
/// the mount namespace `ip netns exec` makes for it, gone with it.
pub fn start_squid(px: &Netns, dir: &Path, log: &Path) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("squid.conf");
    std::fs::write(&config, squid_config(dir))?;
    let (dir, config) = (
        dir.to_str().context("work path is not UTF-8")?,
        config.to_str().context("work path is not UTF-8")?,
    );
    lab::run("chown", &["-R", "proxy:proxy", dir])?;
    px.exec(SQUID, &["-k", "parse", "-f", config])?;
    let script = format!(
        "mount -t tmpfs -o size=16m,mode=1777 l4bench-squid-shm /dev/shm \
         && mount -t tmpfs -o size=1m,mode=0755 l4bench-squid-run /run/squid \
         && chown proxy:proxy /run/squid \
         && exec {SQUID} --foreground -f {config}"
    );
    Proc::start(px, "squid", &["sh", "-c", &script], &[], log.to_owned())
}

/// Port of the transparent listener the TPROXY rules point at.
pub const TPROXY_PORT: u16 = 7000;

/// The (address, port) of rule `i` of the rule-count case: 100 addresses of
/// 192.0.2.100-199, then the next port. The measured connections go to the
/// last rule, the one iptables reaches last.
pub fn rule_dst(i: usize) -> SocketAddr {
    let host = 100 + (i % 100) as u8;
    let port = 20_000 + (i / 100) as u16;
    SocketAddr::from((Ipv4Addr::new(192, 0, 2, host), port))
}

/// l4proxy with `rules` intercept rules, each to the responder.
pub fn rules_policy(rules: usize) -> Value {
    let intercept: Vec<Value> = (0..rules)
        .map(|i| {
            let dst = rule_dst(i);
            json!({
                "name": format!("r{i}"),
                "prefixes": [format!("{}/32", dst.ip())],
                "ports": [dst.port()],
                "upstream": "tls",
            })
        })
        .collect();
    let server = format!("{}:{}", lab::SV, Service::Tls.server_port());
    json!({ "intercept": intercept, "upstreams": { "tls": { "servers": [server] } } })
}

/// The recipe's first part (the kernel's tproxy documentation): a packet
/// of a connection that has a socket here is marked and taken at once, so
/// only a connection's first packet walks the TPROXY rules after it (one
/// per destination: what an iptables user writes without ipset or nft
/// sets). Not a SYN: one that finds the TIME-WAIT socket of an earlier
/// connection with the same addresses and ports (the bench's one client
/// reuses them within the minute) must reach its TPROXY rule, which ends
/// that socket and hands the SYN to the listener; taken here, it found no
/// listener, and the client sent it again a second later.
pub const TPROXY_PRELUDE: &str = "*mangle\n:PREROUTING ACCEPT [0:0]\n:DIVERT - [0:0]\n\
     -A PREROUTING -p tcp ! --syn -m socket -j DIVERT\n-A DIVERT -j MARK --set-mark 1\n\
     -A DIVERT -j ACCEPT\n";

/// The classic recipe, inside the proxy namespace: marked packets are
/// delivered locally, [`TPROXY_PRELUDE`], and one TPROXY rule per
/// (address, port).
pub fn install_tproxy(px: &Netns, rules: usize) -> anyhow::Result<()> {
    let mut script = String::from(TPROXY_PRELUDE);
    for i in 0..rules {
        let dst = rule_dst(i);
        script += &format!(
            "-A PREROUTING -d {}/32 -p tcp -m tcp --dport {} -j TPROXY --on-port {TPROXY_PORT} --tproxy-mark 0x1/0x1\n",
            dst.ip(),
            dst.port()
        );
    }
    script += "COMMIT\n";
    // Without --noflush, iptables-restore replaces the table: rerunning with
    // another count leaves exactly `rules` rules.
    px.exec_with_input("iptables-restore", &[], &script)
}

/// The routing half of the recipe (once per lab).
pub fn install_tproxy_routing(px: &Netns) -> anyhow::Result<()> {
    px.ip(&["rule", "add", "fwmark", "1", "lookup", "100"])?;
    px.ip(&[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ])
}

/// Takes the whole recipe out again: no rules (an empty mangle table), and
/// the routing half.
pub fn remove_tproxy(px: &Netns) -> anyhow::Result<()> {
    // An empty table: the recipe's socket rule goes too.
    px.exec_with_input("iptables-restore", &[], "*mangle\nCOMMIT\n")?;
    px.ip(&["rule", "del", "fwmark", "1", "lookup", "100"])?;
    px.ip(&["route", "flush", "table", "100"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_routes_the_tls_service_by_its_server_name() {
        let config = nginx_stream();
        assert!(config.contains(&format!(
            "map $ssl_preread_server_name $sni_upstream {{\n        {SNI} tls;\n    }}"
        )));
        assert!(config.contains(
            "listen 192.0.2.22:443 reuseport backlog=4096;\n        ssl_preread on;\n        \
             proxy_pass $sni_upstream;"
        ));
        assert!(
            config.contains(
                "listen 192.0.2.22:5201 reuseport backlog=4096;\n        proxy_pass iperf;"
            )
        );
        assert!(config.contains("upstream tls {\n        server 203.0.113.2:8080;\n    }"));
    }
}
