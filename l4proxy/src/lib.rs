//! l4proxy: a layer-4 transparent proxy whose interception is done by eBPF
//! (`sk_lookup`) instead of iptables TPROXY rules.
//!
//! Module map, in the order of the data path: `policy` (raw JSON → checked
//! `Policy`), `intercept` (BPF programs, maps, local routes), `server` (listen,
//! accept), `route` (which rule and upstream a connection takes), `upstream`
//! (connect), `relay` (copy bytes both ways).
//!
//! `unsafe` is confined to `intercept::guard` (fork before the runtime starts),
//! which says why at the call.

pub mod addrs;
pub mod cli;
pub mod intercept;
pub mod logging;
pub mod policy;
pub mod relay;
pub mod route;
pub mod server;
pub mod upstream;
