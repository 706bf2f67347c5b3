use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use l4proxy::{
    cli::{Cli, Command, ExplainArgs, RunArgs},
    control, descriptors, health,
    intercept::{guard, routes},
    logging::{self, LogFormat, LogGuard},
    policy::{Policy, Timeouts},
    privilege::{self, User},
    server::{self, Ended, Settings},
    session::Defaults,
    takeover::Restart,
    tls::Terminators,
    upstream::Pool,
    workers::{self, Workers},
};

fn main() -> ExitCode {
    // SAFETY: first thing in `main`: nothing in this process has started a
    // thread (no constructors; jemalloc runs without background threads).
    unsafe { l4proxy::lookup::without_search_domains() };
    if let Some(out) = l4proxy::manual::requested() {
        return match l4proxy::manual::write(&out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("l4proxy manual: writing to {}: {e}", out.display());
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    // Dropped last, after any error below is logged: flushes the log.
    let mut log = logging::init(cli.log_format, cli.log_level);
    let result = match cli.command {
        Command::Run(args) => run(args, cli.log_format, &mut log),
        // `check` speaks to a person or a CI job: one plain line, no log prefix.
        Command::Check { file, strict } => return check(&file, strict),
        Command::Explain(args) => {
            log.start_writer();
            explain(&args)
        }
        Command::Status { json } => return status(json),
        Command::Reload => return reload(),
        Command::Doctor { policy, user } => return doctor(policy.as_deref(), user.as_deref()),
        Command::Upgrade => return upgrade(),
        Command::Cleanup => {
            log.start_writer();
            cleanup()
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs, format: LogFormat, log: &mut LogGuard) -> anyhow::Result<()> {
    // Before anything can change the working directory or the file.
    let restart = Restart::from_start_up().context("finding this binary's path")?;
    let policy = server::load_policy(&args.policy)?;
    let user = args.user.as_deref().map(User::lookup).transpose()?;
    if user.is_some() {
        privilege::check_switch()?;
    }
    let asked = args
        .max_connections
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let worker_count = args.workers.unwrap_or_else(workers::default_count);
    let reserve = descriptors::Reserve::new(worker_count.get(), policy.connect_addresses());
    let max_connections = descriptors::max_connections(asked, reserve)?;
    // SAFETY: no thread has been started yet: the log writer and the runtime
    // start below.
    let guard = unsafe { guard::spawn(format) }.context("starting the route guard")?;
    log.start_writer();
    let settings = Settings {
        policy_path: args.policy.clone(),
        grace_period: args.grace_period,
        connect_timeout: args.connect_timeout,
        max_connections,
        max_connections_per_client: args.max_connections_per_client,
        sniff_timeout: args.sniff_timeout,
        defaults: Defaults {
            timeouts: Timeouts {
                idle: Some(args.idle_timeout),
                lifetime: Some(args.max_lifetime),
            },
            keepalive: args.tcp_keepalive,
        },
        mark: args.fwmark,
        routing_table: args.routing_table,
        admin: args.admin,
        user,
        takeover: args.takeover,
        restart,
    };
    let workers = Workers::start(worker_count).context("starting the worker threads")?;
    // The control plane's: the workers serve the connections.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let ran = runtime.block_on(server::run(policy, settings, &guard, &workers));
    // Name look-ups and password checks still running on blocking threads
    // must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    workers.stop();
    match ran? {
        Ended::Stopped => {}
        Ended::HandedOver { successor } => {
            tracing::info!(successor, "exiting after a takeover");
        }
    }
    Ok(())
}

/// Every error found, one per line (`FILE:LINE:COL: PATH: reason`), or
/// the warnings and a summary; `strict` refuses a policy with warnings, for
/// CI jobs that keep policies free of them.
fn check(file: &std::path::Path, strict: bool) -> ExitCode {
    match Policy::load_all(file) {
        Ok(policy) => {
            if let Err(e) = tls_configs(&policy) {
                eprintln!("{}: {e}", file.display());
                return ExitCode::FAILURE;
            }
            let warnings = l4proxy::intercept::rules::warnings(&policy);
            for warning in &warnings {
                eprintln!("{}: warning: {warning}", file.display());
            }
            if strict && !warnings.is_empty() {
                eprintln!(
                    "{}: refused: {} warning{} and --strict",
                    file.display(),
                    warnings.len(),
                    if warnings.len() == 1 { "" } else { "s" }
                );
                return ExitCode::FAILURE;
            }
            println!(
                "{}: ok ({} intercept rules, {} upstreams)",
                file.display(),
                policy.rules.len(),
                policy.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in errors.iter() {
                eprintln!("{error}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Builds the TLS configurations the daemon builds from `policy`: what
/// reading the file does not find out (an empty system CA store, say).
fn tls_configs(policy: &Policy) -> Result<(), String> {
    let health = health::Registry::default();
    for upstream in &policy.upstreams {
        Pool::new(upstream, &health)?;
    }
    Terminators::new(policy).map(drop)
}

fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let policy = Policy::load(&args.file)?;
    print!("{}", l4proxy::explain::explain(&policy, args)?);
    Ok(())
}

/// One line per check on stdout; exit 1 if `run` would miss something.
fn doctor(policy: Option<&std::path::Path>, user: Option<&str>) -> ExitCode {
    let findings = match runtime() {
        Ok(runtime) => runtime.block_on(l4proxy::doctor::examine(policy, user)),
        Err(e) => {
            eprintln!("l4proxy doctor: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    for finding in &findings {
        println!("{finding}");
    }
    let missing = findings
        .iter()
        .filter(|f| f.status == l4proxy::doctor::Status::Missing)
        .count();
    if missing == 0 {
        println!("this host has what l4proxy run needs");
        ExitCode::SUCCESS
    } else {
        println!("{missing} thing(s) missing: see above");
        ExitCode::FAILURE
    }
}

fn cleanup() -> anyhow::Result<()> {
    // Its routes are in use, not left over.
    match control::running() {
        Ok(daemon) => anyhow::bail!(
            "{daemon} runs in this network namespace: its routes are in use; stop it first (it removes them itself)"
        ),
        // Perhaps a daemon after all (root in another user namespace, or
        // started without root): its routes would go.
        Err(holder @ control::NotDaemon::NotRoot { .. }) => {
            anyhow::bail!("{holder}; cleanup leaves the routes to it until then")
        }
        Err(_) => {}
    }
    let removed = runtime()?.block_on(routes::remove_leftovers())?;
    println!(
        "removed {removed} route(s) and routing rule(s) with protocol {}",
        routes::ROUTE_PROTOCOL
    );
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// How long `status` and `reload` wait for the daemon (a reload reads files
/// and changes the kernel's state).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

fn status(json: bool) -> ExitCode {
    match control::ask(control::Query::Status, CONTROL_TIMEOUT) {
        Ok(answer) if answer["ok"] == true => {
            if json {
                println!("{answer:#}");
            } else {
                print!("{}", l4proxy::status::render(&answer));
            }
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!(
                "l4proxy status: {}",
                answer["error"].as_str().unwrap_or("refused")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("l4proxy status: {e}");
            ExitCode::FAILURE
        }
    }
}

fn reload() -> ExitCode {
    match control::ask(control::Query::Reload, CONTROL_TIMEOUT) {
        Ok(answer) if answer["ok"] == true => {
            println!("policy reloaded");
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!(
                "l4proxy reload: refused: {}",
                answer["error"].as_str().unwrap_or("no reason given")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("l4proxy reload: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long `upgrade` waits: the successor loads its programs and applies
/// its policy, and the daemon gives it a minute to say it is ready.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(90);

fn upgrade() -> ExitCode {
    match control::ask(control::Query::Upgrade, UPGRADE_TIMEOUT) {
        Ok(answer) if answer["ok"] == true => {
            println!(
                "upgraded: pid {} serves, pid {} drains",
                answer["pid"], answer["predecessor"]
            );
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!(
                "l4proxy upgrade: failed, the running daemon goes on: {}",
                answer["error"].as_str().unwrap_or("no reason given")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("l4proxy upgrade: {e}");
            ExitCode::FAILURE
        }
    }
}
