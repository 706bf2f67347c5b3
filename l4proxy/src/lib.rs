//! l4proxy: a layer-4 transparent proxy whose interception is done by eBPF
//! (`sk_lookup`) instead of iptables TPROXY rules.
//!
//! Module map, in the order of the data path: `policy` (raw JSON → checked
//! `Policy`), `intercept` (BPF programs, maps, local routes), `server` (listen,
//! accept), `route` (which rule and upstream a connection takes), `upstream`
//! (connect), `relay` (copy bytes both ways).
//!
//! `unsafe` is confined to three places, each saying why at the call:
//! `intercept::guard` (fork before the runtime starts), `hello` (`MSG_PEEK`
//! and `SO_RCVLOWAT`) and `relay::pipe` (splice(2) and `F_SETPIPE_SZ`), which
//! neither std, tokio nor socket2 offer safely.

pub mod addrs;
pub mod cli;
pub mod hello;
pub mod intercept;
pub mod logging;
pub mod policy;
pub mod proxy_protocol;
pub mod relay;
pub mod route;
pub mod server;
pub mod sniff;
pub mod upstream;
