//! nginx's stream module as a peer, for the main cases (TCP relay, SNI
//! routing by `ssl_preread`) and the TLS case (`listen … ssl`): the part of
//! the configuration they share and how nginx is started.

use std::path::Path;

use anyhow::{Context, bail};

use super::lab::{Netns, Proc};

const NGINX: &str = "/usr/sbin/nginx";
/// Debian builds the stream module as a dynamic module, packaged apart
/// (libnginx-mod-stream).
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Parameters of every `listen` here: a listening socket per worker
/// (`reuseport`: the kernel spreads connections by hash, no worker wakes for
/// another's connection), and l4proxy's listen backlog (nginx's default is
/// 511).
pub const LISTEN: &str = "reuseport backlog=4096";

/// Worker processes: one per core, as `auto` would give and as many as
/// l4proxy's workers and HAProxy's threads.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Connection slots per worker for `idle` idle connections: two each
/// (client and upstream), all of them on one worker if the kernel's hash
/// puts them there, and a reserve for the short-connection cases.
pub fn worker_connections(idle: usize) -> usize {
    2 * idle + 1024
}

/// Writes `nginx.conf` into `dir` (its prefix: pid file and error log) with
/// `stream` (the servers, upstreams and maps) in the `stream` block, checks
/// it with `nginx -t` and starts nginx in the foreground in `ns`. Its
/// descriptor limit is the bench's, as the other proxies'.
pub fn start(
    ns: &Netns,
    dir: &Path,
    stream: &str,
    worker_connections: usize,
    fd_limit: u64,
    log: &Path,
) -> anyhow::Result<Proc> {
    if !Path::new(STREAM_MODULE).exists() {
        bail!(
            "{STREAM_MODULE} is missing: Debian's nginx has its stream module in the package \
             libnginx-mod-stream (`cargo xtask setup` installs it)"
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let prefix = dir.to_str().context("work path is not UTF-8")?;
    let config = format!(
        "load_module {STREAM_MODULE};\n\
         worker_processes {workers};\n\
         worker_rlimit_nofile {fd_limit};\n\
         pid {prefix}/nginx.pid;\n\
         error_log {prefix}/error.log warn;\n\
         events {{ worker_connections {worker_connections}; }}\n\
         stream {{\n\
         \x20   proxy_connect_timeout 5s;\n\
         \x20   proxy_timeout 120s;\n\
         {stream}}}\n",
        workers = workers(),
    );
    let file = format!("{prefix}/nginx.conf");
    std::fs::write(&file, config).with_context(|| format!("writing {file}"))?;
    let error_log = format!("{prefix}/error.log");
    ns.exec(
        NGINX,
        &["-t", "-q", "-p", prefix, "-c", &file, "-e", &error_log],
    )
    .context("nginx -t")?;
    Proc::start(
        ns,
        "nginx",
        &[
            NGINX,
            "-p",
            prefix,
            "-c",
            &file,
            "-e",
            &error_log,
            "-g",
            "daemon off;",
        ],
        &[],
        log.to_owned(),
    )
}

/// nginx's version and how the stream module is loaded, for the report's
/// set-up lines (`nginx -v` prints to standard error).
pub fn version() -> String {
    let Ok(out) = std::process::Command::new(NGINX).arg("-v").output() else {
        return "nginx: version unknown".to_owned();
    };
    let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    format!(
        "{} with its stream module (`load_module {STREAM_MODULE}`)",
        text.trim_start_matches("nginx version: ")
    )
}

/// How nginx runs and why, for the report's notes.
pub fn choice(worker_connections: usize) -> String {
    format!(
        "nginx: {} worker processes (one per core), `listen … {LISTEN}`, \
         `worker_connections {worker_connections}` (two per idle connection of the memory case, \
         on one worker if the hash puts them there; nginx allocates these slots at start, so \
         they are in its RSS before, not per connection), the bench's descriptor limit \
         (`worker_rlimit_nofile`), no access log.",
        workers()
    )
}
