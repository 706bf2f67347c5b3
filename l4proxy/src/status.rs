//! `l4proxy status`: the daemon's state as JSON (built by the daemon, for
//! the control socket) and as the table the command prints.

use std::time::Instant;

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde_json::{Value, json};

use crate::session::Active;

/// What the daemon says of itself.
pub struct Daemon<'a> {
    pub policy_file: &'a std::path::Path,
    pub generation: u64,
    pub started: Instant,
    pub listeners: Vec<String>,
    /// Connections each worker accepted, by worker.
    pub workers: Vec<u64>,
    pub kernel: Vec<(&'static str, u64)>,
}

/// The state as JSON: the daemon, then each rule, route and upstream of the
/// policy in force with its connections open now and in all (totals count
/// from the start, across reloads).
pub fn snapshot(daemon: &Daemon, active: &Active) -> Value {
    let policy = &active.policy;
    let m = &active.metrics;
    let total = |c: &Counter| c.get();
    let open = |g: &Gauge| g.get();
    json!({
        "ok": true,
        "pid": std::process::id(),
        "policy_file": daemon.policy_file.display().to_string(),
        "generation": daemon.generation,
        "uptime_seconds": daemon.started.elapsed().as_secs(),
        "listeners": daemon.listeners,
        "workers": daemon.workers.iter().map(|n| json!({ "accepted": n })).collect::<Vec<_>>(),
        "rules": policy.rules.iter().enumerate().map(|(i, rule)| {
            let (active, total) = m.rules.readings(i);
            json!({ "name": rule.name, "active": active, "total": total })
        }).collect::<Vec<_>>(),
        "routes": m.routes.iter().enumerate().map(|(i, m)| json!({
            "name": policy.route_label(crate::policy::RouteId(i)).short(),
            "total": total(m),
        })).collect::<Vec<_>>(),
        "upstreams": policy.upstreams.iter().zip(&m.upstreams).zip(&active.pools).map(|((upstream, m), pool)| json!({
            "name": upstream.name,
            "active": open(&m.active),
            "total": total(&m.connections),
            "servers": pool.servers_state().iter().map(|server| json!({
                "address": server.address.to_string(),
                "up": server.health.up,
                "checked": server.health.checked,
                "active": server.health.active,
                "weight": server.weight,
                "backup": server.backup,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "kernel": daemon.kernel.iter().map(|(name, n)| json!({ "counter": name, "value": n })).collect::<Vec<_>>(),
    })
}

/// The table `l4proxy status` prints.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    out.push_str(&format!(
        "l4proxy pid {}, up {} s, policy {} (generation {})\n",
        text(&status["pid"]),
        text(&status["uptime_seconds"]),
        text(&status["policy_file"]),
        text(&status["generation"]),
    ));
    if let Some(listeners) = status["listeners"].as_array() {
        let listeners: Vec<String> = listeners.iter().map(text).collect();
        out.push_str(&format!("listeners: {}\n", listeners.join(", ")));
    }
    if let Some(workers) = status["workers"].as_array() {
        let accepted: Vec<String> = workers.iter().map(|w| text(&w["accepted"])).collect();
        out.push_str(&format!(
            "workers: {} (connections accepted: {})\n",
            workers.len(),
            accepted.join(", ")
        ));
    }
    for (section, with_active) in [("rules", true), ("routes", false), ("upstreams", true)] {
        let Some(rows) = status[section].as_array().filter(|rows| !rows.is_empty()) else {
            continue;
        };
        out.push_str(&format!(
            "\n{:<32} {:>8} {:>12}\n",
            section.to_uppercase(),
            "ACTIVE",
            "TOTAL"
        ));
        for row in rows {
            let active = if with_active {
                text(&row["active"])
            } else {
                "-".to_owned()
            };
            out.push_str(&format!(
                "{:<32} {:>8} {:>12}\n",
                text(&row["name"]),
                active,
                text(&row["total"])
            ));
            for server in row["servers"].as_array().into_iter().flatten() {
                let state = match (server["up"].as_bool(), server["backup"].as_bool()) {
                    (Some(false), _) => "DOWN",
                    (_, Some(true)) => "up, backup",
                    _ => "up",
                };
                out.push_str(&format!(
                    "  {:<30} {:>8} {:>12}\n",
                    text(&server["address"]),
                    text(&server["active"]),
                    state
                ));
            }
        }
    }
    if let Some(kernel) = status["kernel"].as_array().filter(|k| !k.is_empty()) {
        out.push_str(&format!("\n{:<32} {:>21}\n", "KERNEL COUNTER", "VALUE"));
        for row in kernel {
            out.push_str(&format!(
                "{:<32} {:>21}\n",
                text(&row["counter"]),
                text(&row["value"])
            ));
        }
    }
    out
}
