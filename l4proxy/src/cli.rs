//! Command line of the `l4proxy` binary.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    intercept::delivery::{self, Mark},
    logging::{LogFormat, LogLevel},
    policy::Keepalive,
};

/// `-V`: the version and the commit it was built from.
const SHORT_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("L4PROXY_COMMIT"),
    ")"
);

/// `--version`: also the SHA-256 of the embedded kernel programs, which can
/// differ between builds of one commit (another bpf-linker or LLVM).
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("L4PROXY_COMMIT"),
    "\nbpf object sha256: ",
    env!("L4PROXY_BPF_SHA256")
);

#[derive(Debug, Parser)]
#[command(version = SHORT_VERSION, long_version = LONG_VERSION, about = "Layer-4 transparent proxy steered by eBPF sk_lookup")]
pub struct Cli {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// How much to log; `RUST_LOG`, when set, decides instead (and can name
    /// modules: `RUST_LOG=l4proxy::session=debug`).
    #[arg(long, value_enum, default_value_t = LogLevel::Info, global = true)]
    pub log_level: LogLevel,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Intercept the flows named in a policy and relay them to their upstreams.
    Run(RunArgs),
    /// Validate a policy file: exit 0, or print each error's place and
    /// reason and exit 1.
    Check {
        /// Policy file (JSON).
        file: PathBuf,
        /// Refuse the policy (exit 1) when it has warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Print which rule, route and upstream a connection would take, and why.
    Explain(ExplainArgs),
    /// Show the running daemon of this network namespace: its policy,
    /// listeners, connections per rule, route and upstream, kernel counters.
    Status {
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon of this network namespace to reread its
    /// policy; exit non-zero with the reason if it is refused.
    Reload,
    /// Check this host for what `run` needs (kernel, BPF programs,
    /// capabilities, and a policy's interfaces and kernel settings) without
    /// changing anything: one line per check, exit 1 if something is missing.
    Doctor {
        /// Also check what this policy needs of the host.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Also check that the daemon could switch to this user (`run --user`).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Ask the running daemon of this network namespace to start its
    /// successor (the binary at the path it was started from, with its
    /// arguments and `--takeover`); exit 0 once the successor serves and
    /// the old daemon drains, non-zero with the reason otherwise.
    Upgrade,
    /// Remove routes and routing rules left in this network namespace by a
    /// daemon that was killed before it could clean up (they carry protocol
    /// 244); refused while a daemon runs.
    Cleanup,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Policy file (JSON).
    pub file: PathBuf,
    /// The client's address.
    #[arg(long)]
    pub src: SocketAddr,
    /// The destination the client connects to.
    #[arg(long)]
    pub dst: SocketAddr,
    /// TLS server name the client sends (implies TLS).
    #[arg(long)]
    pub sni: Option<String>,
    /// An ALPN protocol the client offers (implies TLS; repeatable).
    #[arg(long)]
    pub alpn: Vec<String>,
    /// A TLS ClientHello without SNI.
    #[arg(long, conflicts_with = "sni")]
    pub tls: bool,
    /// HTTP/1.x Host the client sends (implies HTTP, unless a TLS option is
    /// given: then the Host inside the TLS, which matters where the rule
    /// terminates it).
    #[arg(long)]
    pub host: Option<String>,
    /// The target of a CONNECT request sent to --dst, one of the policy's
    /// CONNECT listeners: `name:port` or `address:port`, as the request
    /// line has it.
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: Option<String>,
    /// The address a --connect name resolves to: what the rule's
    /// `destinations` and the routes' `destination` conditions see.
    #[arg(long, value_name = "ADDR", requires = "connect")]
    pub resolved: Option<std::net::IpAddr>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file (JSON).
    #[arg(long)]
    pub policy: PathBuf,
    /// After SIGTERM/SIGINT, how long open connections may finish (seconds,
    /// or with a unit: 250ms, 30s, 5m, 1h).
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub grace_period: Duration,
    /// How long to wait for an upstream to accept a connection (a duration).
    #[arg(long, default_value = "5", value_parser = parse_deadline)]
    pub connect_timeout: Duration,
    /// Most client connections relayed at once; further ones are reset at
    /// accept. [default: 16384, lowered with a warning to what the
    /// open-files limit allows; a number given here that the limit cannot
    /// cover is refused]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// Most connections one client address may hold at once, over all rules
    /// (a rule's `limits` can set its own); further ones are reset at once.
    /// [default: no limit]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: Option<u32>,
    /// Reset a connection (both sides) when no byte has moved either way for
    /// this long (a duration; 0: never). A rule or route's `timeouts.idle`
    /// overrides it.
    #[arg(long, default_value = "3600", value_parser = parse_seconds)]
    pub idle_timeout: Duration,
    /// Reset a connection (both sides) this long after it was accepted, busy
    /// or not (a duration; 0: never). A rule or route's `timeouts.lifetime`
    /// overrides it.
    #[arg(long, default_value = "0", value_parser = parse_seconds)]
    pub max_lifetime: Duration,
    /// TCP keepalive on both sides of every connection, IDLE,INTERVAL,COUNT
    /// (silence before the first probe and time between probes, in whole
    /// seconds or with a unit, unanswered probes before the peer is given
    /// up), or `off`. A rule's
    /// `keepalive` overrides it.
    #[arg(long, default_value = "60,10,6", value_parser = Keepalive::parse)]
    pub tcp_keepalive: Keepalive,
    /// How long to wait for a client's first bytes (TLS ClientHello, HTTP
    /// request head) when a route needs them, then routed as "other"; also
    /// the deadline of a trusted front proxy's PROXY header, a terminated
    /// TLS handshake and a CONNECT request head (a duration).
    #[arg(long, default_value = "10", value_parser = parse_deadline)]
    pub sniff_timeout: Duration,
    /// Packet mark (VALUE/MASK) that routes intercepted forwarded packets and
    /// replies to transparent connections to this host; only the MASK bits
    /// of a packet's mark are changed.
    #[arg(long, default_value_t = delivery::DEFAULT_MARK)]
    pub fwmark: Mark,
    /// Routing table that holds the `local default dev lo` routes for marked
    /// packets; it must not be used by anything else.
    #[arg(long, default_value_t = delivery::DEFAULT_TABLE, value_parser = clap::value_parser!(u32).range(1..=0xfffffffe))]
    pub routing_table: u32,
    /// Serve Prometheus metrics (`GET /metrics`) on this address and port;
    /// off unless given. It answers anyone who reaches it: give an address
    /// only your scraper can.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Once started, run as this user (and its primary group), with only
    /// the capabilities a running daemon needs (README, "Least
    /// privilege"). Without it the daemon stays root, with the same
    /// capabilities.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Take over from the daemon running in this network namespace: its
    /// listening sockets (with their queued connections) and routing state
    /// are handed over, it drains its own connections and exits. Without a
    /// running daemon, or if this one cannot start, nothing changes.
    #[arg(long)]
    pub takeover: bool,
    /// Worker threads, each accepting and serving its own connections
    /// [default: the cores this process may run on]
    #[arg(long, value_name = "N")]
    pub workers: Option<std::num::NonZeroUsize>,
}

/// Seconds or a number with a unit (`250ms`, `30s`, `5m`, `1h`), as in a
/// policy, from 0 to about 30 years: deadlines are added to the clock, and
/// anything longer would overflow it.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    crate::policy::duration::Bounds::FLAG.parse(text)
}

/// A deadline something must be done within: 0 would be no time at all,
/// not "never" as for the idle timeout and lifetime.
fn parse_deadline(text: &str) -> Result<Duration, String> {
    match parse_seconds(text)? {
        Duration::ZERO => Err("must be more than 0".to_owned()),
        deadline => Ok(deadline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_of_zero_is_refused() {
        assert_eq!(parse_deadline("0"), Err("must be more than 0".to_owned()));
        assert!(parse_deadline("0ms").is_err());
        assert_eq!(parse_deadline("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
    }
}
