//! l4proxy: a layer-4 transparent proxy whose interception is done by eBPF
//! (`sk_lookup`) instead of iptables TPROXY rules.
//!
//! Module map, in the order of the data path: `policy` (raw JSON → checked
//! `Policy`), `intercept` (BPF programs, maps, local routes and policy
//! routing) with `kernel_version` (what the kernel must have),
//! `local_addrs` (this host's addresses), `server` (set-up, listen,
//! accept, shutdown) with `explicit` (the CONNECT rules' listeners)
//! and `takeover` (handing the listeners and routing state to a successor),
//! `descriptors` (the open-files budget) and `admission` (connection
//! limits), `session` (one connection from accept to its log line: front →
//! decide → back → relay), `proxy_header` (PROXY protocol headers in and
//! out, over the `proxy_protocol` codec), `tunnel` (the CONNECT front end,
//! over the `connect_head` parser), `hello` and `sniff` (the client's first
//! bytes), `route` (which rule and upstream a connection takes), `upstream`
//! (connect, from which source) with `balance` (which server of a pool)
//! and `health` (which servers are up: checks and observation, kept across
//! reloads), `relay` (copy bytes both ways, with deadlines), `logging` (a
//! log that never blocks the relay), `notify` (what the service manager
//! hears: ready, reloading, stopping).
//!
//! `unsafe` is confined to these places, each saying why at the call:
//! `allocator` (jemalloc's options and controls), `intercept::guard` (fork
//! before the runtime starts), `intercept::kernel_log` (the programs' ring
//! buffer registered with tokio), `hello` (`MSG_PEEK` and `SO_RCVLOWAT`),
//! `relay::pipe` (splice(2) and `F_SETPIPE_SZ`), `relay::splice`
//! (`SIOCATMARK`), `privilege` (the user's entry, capabilities, the
//! signal that changes every thread's), `upstream`
//! (`IP_BIND_ADDRESS_NO_PORT`), `takeover` (descriptors passed with
//! SCM_RIGHTS), `notify` (`CLOCK_MONOTONIC`'s value) and, in tests,
//! `tcp_info` (`TCP_INFO`) and `logging` (`FIONREAD`), which neither std,
//! tokio nor socket2 offer safely.

pub mod addrs;
pub mod admin;
pub mod admission;
pub mod allocator;
pub mod balance;
pub mod cli;
pub mod conn_id;
pub mod connect_head;
pub mod control;
pub mod credentials;
pub mod descriptors;
pub mod doctor;
pub mod explain;
pub mod explicit;
pub mod health;
pub mod hello;
pub mod install;
pub mod intercept;
pub mod kernel_version;
pub mod local_addrs;
pub mod logging;
pub mod lookup;
pub mod lpm;
pub mod manual;
pub mod metrics;
pub mod notify;
pub mod parent;
pub mod policy;
pub mod privilege;
pub mod proxy_header;
pub mod proxy_protocol;
pub mod relay;
pub mod route;
pub mod server;
pub mod session;
pub mod share;
pub mod sniff;
pub mod status;
pub mod stream;
pub mod takeover;
#[cfg(test)]
mod tcp_info;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod workers;
