//! A log reader that stalls does not stall the proxy: with its stderr on a
//! pipe nobody reads, the daemon serves every connection, and the lines it
//! could not write are counted and reported once the pipe is read again.

mod lab;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use l4proxy::logging::QUEUE_LINES;
use lab::daemon::{field_u64, message};
use lab::{Daemon, Topo, sa};
use serde_json::{Value, json};

/// One `connection closed` line each: more than the log queue and a 64 KiB
/// pipe hold together, so lines must be dropped.
const CONNECTIONS: usize = QUEUE_LINES + 2000;

/// Clients at once: enough to keep the server's accept loop from idling.
const CLIENTS: usize = 8;

/// Every connection must be through well before this; a proxy blocked on its
/// log would serve none after the first few hundred.
const SERVE_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn unread_log_drops_lines_instead_of_stalling() {
    let (t, srv) = Topo::with_echo("log_stall", "203.0.113.2:8080", "upstream");
    let policy = json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.10/32"], "ports": [80], "upstream": "pool" } ],
        "upstreams": { "pool": { "servers": ["203.0.113.2:8080"] } }
    });
    let (mut d, stderr) = Daemon::start_stderr_unread(&t.px, &policy, &[]);
    let mut log = BufReader::new(stderr);
    // Read up to `ready`, then leave the pipe alone.
    let mut lines = Vec::new();
    loop {
        let event = next_event(&mut log).expect("the daemon's log ended before `ready`");
        let ready = message(&event) == Some("ready");
        lines.push(event);
        if ready {
            break;
        }
    }

    let started = Instant::now();
    // Each client checks every one of its connections got its greeting
    // (a panic there fails the test through the join).
    let served = CONNECTIONS / CLIENTS * CLIENTS;
    t.cl.run(|| {
        std::thread::scope(|s| {
            let clients: Vec<_> = (0..CLIENTS)
                .map(|_| s.spawn(|| serve_share(CONNECTIONS / CLIENTS, started)))
                .collect();
            for c in clients {
                c.join()
                    .expect("a client's connections were not all served");
            }
        })
    });
    srv.wait_accepted(served, Duration::from_secs(10));

    let reading = std::thread::spawn(move || {
        let mut rest = Vec::new();
        while let Some(event) = next_event(&mut log) {
            rest.push(event);
        }
        rest
    });
    let st = d.terminate(Duration::from_secs(30));
    d.assert_exit_ok(st);
    lines.extend(reading.join().expect("log reader panicked"));

    let dropped: u64 = lines
        .iter()
        .filter(|e| message(e).is_some_and(|m| m.starts_with("log lines dropped")))
        .map(|e| field_u64(e, "dropped").unwrap_or_else(|| panic!("no count in {e}")))
        .sum();
    assert!(dropped > 0, "no `log lines dropped` line with a count");
    let closed = lines
        .iter()
        .filter(|e| message(e) == Some("connection closed"))
        .count() as u64;
    assert!(
        closed + dropped >= served as u64,
        "{served} connections, but {closed} `connection closed` lines and {dropped} dropped ones"
    );
}

/// Makes `n` connections one after the other, each reading the server's
/// greeting through the proxy; panics at the first that is not.
fn serve_share(n: usize, started: Instant) {
    for i in 0..n {
        assert!(
            started.elapsed() < SERVE_TIMEOUT,
            "only {i} of {n} connections served in {SERVE_TIMEOUT:?}"
        );
        let mut c = TcpStream::connect_timeout(&sa("192.0.2.10:80"), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connection {i}: connect: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hello = lab::read_line(&mut c).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(hello, "upstream", "connection {i}");
    }
}

/// The next line of the daemon's log, which must be a JSON object (a torn or
/// interleaved line would not be); None at the end.
fn next_event(log: &mut impl BufRead) -> Option<Value> {
    let mut line = String::new();
    if log
        .read_line(&mut line)
        .expect("reading the daemon's stderr")
        == 0
    {
        return None;
    }
    let event: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("not a JSON line in the daemon's log ({e}): {line}"));
    assert!(event.is_object(), "not a JSON object: {line}");
    Some(event)
}
