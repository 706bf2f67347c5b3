//! Hardening, seen from outside the daemon: the destinations a trusted front
//! proxy's PROXY header may name, the descriptor budget under a low
//! open-files limit, the splice pipes a quiet daemon gives back, and scale
//! within bounds (9 000 connections held at once, 1 GiB each way on one
//! connection). Each test builds the routed lab of tests/lab (cl — px — sv).

mod lab;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lab::daemon::{field_str, field_string, field_u64, message};
use lab::{Daemon, Received, Server, Topo, addr, connect, handlers, sa};
use serde_json::{Value, json};

/// How many of the daemon's open descriptors are pipe ends (a descriptor
/// closed while the directory is read is not counted).
fn pipe_descriptors(d: &Daemon) -> usize {
    d.descriptor_entries()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// An address as the daemon logs a PROXY header's: IPv4-mapped IPv6 as
/// IPv4.
fn unmapped(addr: SocketAddr) -> String {
    SocketAddr::new(addr.ip().to_canonical(), addr.port()).to_string()
}

/// Reads until the peer ends the connection, which must come within 5 s,
/// as a FIN with nothing before it or as a reset.
fn closed_by_peer(c: &mut TcpStream, what: &str) {
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    match c.read_to_end(&mut got) {
        Ok(_) => assert!(got.is_empty(), "{what}: the client got {got:?}"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: the connection was not closed: {e}"),
    }
}

// ---------------------------------------------------------------------------
// PROXY header destinations

/// A PROXY v2 header for a TCP connection from `client` to `dst` (one
/// family), written byte by byte after the spec (proxy-protocol.txt 2.2)
/// rather than with l4proxy's own encoder.
fn v2(client: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut addresses = Vec::new();
    let family = match (client, dst) {
        (SocketAddr::V4(c), SocketAddr::V4(d)) => {
            addresses.extend(c.ip().octets());
            addresses.extend(d.ip().octets());
            0x11 // AF_INET, STREAM
        }
        (SocketAddr::V6(c), SocketAddr::V6(d)) => {
            addresses.extend(c.ip().octets());
            addresses.extend(d.ip().octets());
            0x21 // AF_INET6, STREAM
        }
        _ => panic!("a v2 header's addresses are of one family: {client} {dst}"),
    };
    addresses.extend(client.port().to_be_bytes());
    addresses.extend(dst.port().to_be_bytes());
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x21); // version 2, PROXY
    header.push(family);
    header.extend(u16::try_from(addresses.len()).unwrap().to_be_bytes());
    header.extend(addresses);
    header
}

/// One header a front proxy sends: the client and destination it names.
struct Announced {
    header: Vec<u8>,
    client: SocketAddr,
    dst: SocketAddr,
}

/// A v1 header, as text.
fn announce_v1(line: &str) -> Announced {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [_, _, client, dst, client_port, dst_port] = words[..] else {
        panic!("not a v1 line: {line}");
    };
    let at = |ip: &str, port: &str| SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap());
    Announced {
        header: format!("{line}\r\n").into_bytes(),
        client: at(client, client_port),
        dst: at(dst, dst_port),
    }
}

/// A v2 header, built by [`v2`].
fn announce_v2(client: &str, dst: &str) -> Announced {
    let (client, dst) = (sa(client), sa(dst));
    Announced {
        header: v2(client, dst),
        client,
        dst,
    }
}

const LOOPBACK: &str = "is loopback or unspecified";
const OUTSIDE: &str = "is outside the rule's prefixes and ports";
const OWN: &str = "is this host's, which a gateway rule never takes";

/// A gateway rule on px for sv's prefixes, ports 80 and 8080, relaying to
/// the original destination, trusting PROXY headers from cl's IPv4 address
/// (the front proxy) only.
fn gateway_behind_front_proxy() -> Value {
    json!({
        "intercept": [ { "name": "gateway", "prefixes": ["203.0.113.0/24", "2001:db8:5::/64"],
                         "ports": [80, 8080], "interfaces": ["to-cl"], "upstream": "origin",
                         "accept_proxy_protocol": { "from": [format!("{}/32", addr::CL4)] } } ],
        "upstreams": { "origin": { "original_destination": true } }
    })
}

/// A trusted front proxy cannot send a gateway rule's connection to
/// loopback (also IPv4-mapped), the unspecified address, the proxy host's
/// own addresses, or outside the rule's prefixes and ports: each such
/// header closes the connection with a WARN naming why, and a listener at
/// that destination (reachable from px, as checked first) gets nothing.
/// Headers naming a destination inside the rule are still relayed there.
#[test]
fn trusted_proxy_headers_cannot_name_this_host_or_leave_the_rule() {
    let t = Topo::new("pp_dst");
    // A destination outside the rule's prefixes that px can reach: on sv.
    t.sv.addr("to-px", "192.0.2.10/32");
    t.px.route("192.0.2.10/32", addr::SV4);
    let decoys: Vec<(&lab::Netns, Server)> = [
        (&t.px, "127.0.0.1:9999"),
        (&t.px, "[::1]:9999"),
        (&t.px, "203.0.113.1:8080"),
        (&t.px, "[2001:db8:5::1]:80"),
        (&t.px, "0.0.0.0:80"),
        (&t.sv, "192.0.2.10:80"),
        (&t.sv, "203.0.113.2:9000"),
        (&t.sv, "[2001:db8:5::2]:9000"),
    ]
    .into_iter()
    .map(|(ns, at)| (ns, Server::start(ns, sa(at), handlers::hello_echo("decoy"))))
    .collect();
    for (ns, decoy) in &decoys {
        drop(connect(ns, decoy.addr()));
        decoy.wait_accepted(1, Duration::from_secs(5));
    }
    let origins = [
        Server::start(&t.sv, sa("203.0.113.2:8080"), handlers::hello_echo("v4")),
        Server::start(&t.sv, sa("[2001:db8:5::2]:80"), handlers::hello_echo("v6")),
    ];
    let mut d = Daemon::start_ready(&t.px, &gateway_behind_front_proxy(), &[]);
    // The front proxy's own connection: to a destination the rule takes.
    let through = sa("203.0.113.2:80");

    for (announced, why) in [
        (
            announce_v1("PROXY TCP4 198.51.100.77 127.0.0.1 5001 9999"),
            LOOPBACK,
        ),
        (
            announce_v1("PROXY TCP6 2001:db8:c::77 ::1 5002 9999"),
            LOOPBACK,
        ),
        (
            announce_v1("PROXY TCP6 2001:db8:c::77 ::ffff:127.0.0.1 5003 9999"),
            LOOPBACK,
        ),
        (
            announce_v2("198.51.100.77:5004", "127.0.0.1:9999"),
            LOOPBACK,
        ),
        (
            announce_v1("PROXY TCP4 198.51.100.77 0.0.0.0 5005 80"),
            LOOPBACK,
        ),
        (
            announce_v1("PROXY TCP4 198.51.100.77 203.0.113.1 5006 8080"),
            OWN,
        ),
        (
            announce_v2("[2001:db8:c::77]:5007", "[2001:db8:5::1]:80"),
            OWN,
        ),
        (
            announce_v1("PROXY TCP4 198.51.100.77 192.0.2.10 5008 80"),
            OUTSIDE,
        ),
        (
            announce_v1("PROXY TCP4 198.51.100.77 203.0.113.2 5009 9000"),
            OUTSIDE,
        ),
        (
            announce_v2("[2001:db8:c::77]:5010", "[2001:db8:5::2]:9000"),
            OUTSIDE,
        ),
    ] {
        let what = format!("a header naming {}", announced.dst);
        let mut c = connect(&t.cl, through);
        let front = c.local_addr().unwrap();
        c.write_all(&announced.header).unwrap();
        closed_by_peer(&mut c, &what);
        let closed = d.closed_event(announced.client);
        assert_eq!(
            lab::daemon::outcome(&closed),
            format!(
                "refused: PROXY header refused: destination {} {why}",
                unmapped(announced.dst)
            ),
            "{what}: {closed}"
        );
        assert_eq!(
            field_str(&closed, "level").as_deref(),
            Some("WARN"),
            "{closed}"
        );
        assert_eq!(field_string(&closed, "peer"), front.to_string(), "{closed}");
        assert_eq!(field_str(&closed, "upstream"), None, "{what}: {closed}");
    }

    // Inside the rule, both families and both versions: relayed there.
    for (announced, origin, id) in [
        (
            announce_v1("PROXY TCP4 198.51.100.77 203.0.113.2 5020 8080"),
            &origins[0],
            "v4",
        ),
        (
            announce_v2("[2001:db8:c::77]:5021", "[2001:db8:5::2]:80"),
            &origins[1],
            "v6",
        ),
    ] {
        let what = format!("a header naming {}", announced.dst);
        let mut c = connect(&t.cl, through);
        c.write_all(&announced.header).unwrap();
        lab::talk(&mut c, id, &what);
        origin.wait_accepted(1, Duration::from_secs(5));
        let closed = d.closed_event(announced.client);
        assert_eq!(lab::daemon::outcome(&closed), "closed", "{closed}");
        assert_eq!(field_string(&closed, "orig_dst"), announced.dst.to_string());
        assert_eq!(field_string(&closed, "upstream"), announced.dst.to_string());
    }

    // A connection to a decoy would have been made before its close was
    // logged; leave the accept threads a moment to see it all the same.
    std::thread::sleep(Duration::from_millis(200));
    for (_, decoy) in &decoys {
        assert_eq!(
            decoy.accepted().len(),
            1,
            "{}: only the reachability check may connect: {:?}",
            decoy.addr(),
            decoy.accepted()
        );
    }
}

// ---------------------------------------------------------------------------
// Descriptor budget

/// Descriptors the daemon keeps beside its connections (2 each), with two
/// workers (`WORKERS`): 1088, and 7 per worker.
const RESERVE: u64 = 1088 + 2 * 7;
const WORKERS: [&str; 2] = ["--workers", "2"];

/// The open-files limit the budget tests give the daemon: room for
/// (1152 - 1102) / 2 = 25 connections.
const LOW_LIMIT: u64 = 1152;
const FITS_LOW_LIMIT: usize = ((LOW_LIMIT - RESERVE) / 2) as usize;

/// A rule on px's service prefix, and a gateway rule relaying from the
/// client's address: together they need local routes, routing rules and tc
/// programs, all of which a refused start must not leave behind.
fn budget_policy() -> Value {
    json!({
        "intercept": [
            { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "echo" },
            { "name": "gateway", "prefixes": ["203.0.113.0/24"], "ports": [9000],
              "interfaces": ["to-cl"], "upstream": "origin" }
        ],
        "upstreams": {
            "echo": { "servers": ["203.0.113.2:8080"] },
            "origin": { "original_destination": true, "bind": "client-ip" }
        }
    })
}

/// What a daemon of `budget_policy` sets up in px: routes, routing rules,
/// tc programs, the sk_lookup link.
fn installed(t: &Topo) -> Vec<String> {
    let mut all = t.px.proxy_routes();
    all.extend(t.px.proxy_rules());
    all.extend(t.px.tc_programs(&["to-cl", "to-sv"]));
    all.extend(t.px.bpf_netns_links().iter().map(Value::to_string));
    all
}

/// A `--max-connections` the open-files limit cannot cover: the daemon
/// exits non-zero at once, naming the limit and the flag, and leaves
/// nothing; the same check finds what a daemon whose number fits installs.
#[test]
fn a_max_connections_beyond_the_open_files_limit_is_refused() {
    let t = Topo::new("budget_refused");
    let started = Instant::now();
    let mut d = Daemon::start_with_open_files_limit(
        &t.px,
        &budget_policy(),
        &["--max-connections", "5000", WORKERS[0], WORKERS[1]],
        LOW_LIMIT,
    );
    let status = d.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(
        !status.success(),
        "started with 5000 connections in 1152 descriptors"
    );
    assert!(took < Duration::from_secs(5), "took {took:?} to refuse");
    let error = d
        .events()
        .into_iter()
        .find(|e| field_str(e, "level").as_deref() == Some("ERROR"))
        .unwrap_or_else(|| panic!("no error logged: {}", d.log_text()));
    let text = message(&error).unwrap_or_default();
    for names in ["open-files limit (1152)", "--max-connections 5000"] {
        assert!(text.contains(names), "the error names {names:?}: {error}");
    }
    assert_eq!(
        installed(&t),
        Vec::<String>::new(),
        "left by the refused start"
    );

    let fitting = FITS_LOW_LIMIT.to_string();
    let mut d = Daemon::start_with_open_files_limit(
        &t.px,
        &budget_policy(),
        &["--max-connections", &fitting, WORKERS[0], WORKERS[1]],
        LOW_LIMIT,
    );
    d.wait_ready(Duration::from_secs(30));
    let running = installed(&t);
    for kind in ["192.0.2.0/24", "proto 244", "classify", "sk_lookup"] {
        assert!(
            running.iter().any(|item| item.contains(kind)),
            "a running daemon has {kind:?}: {running:?}"
        );
    }
    let status = d.terminate(Duration::from_secs(10));
    d.assert_exit_ok(status);
}

/// Without `--max-connections`, the default is lowered to what the
/// open-files limit covers (26), with a WARN, and `ready` says so; past
/// 26 open connections, new ones are reset at once while the 26 are
/// still relayed, and a freed slot is taken again.
#[test]
fn the_default_max_connections_is_lowered_to_the_open_files_limit() {
    let (t, _echo) = Topo::with_echo("budget_lowered", "203.0.113.2:8080", "sv");
    let mut d = Daemon::start_with_open_files_limit(&t.px, &budget_policy(), &WORKERS, LOW_LIMIT);
    d.wait_ready(Duration::from_secs(30));
    let ready = d.wait_event("`ready`", Duration::ZERO, |e| message(e) == Some("ready"));
    assert_eq!(
        field_u64(&ready, "max_connections"),
        Some(FITS_LOW_LIMIT as u64),
        "{ready}"
    );
    let lowered = d.wait_event("the warning", Duration::ZERO, |e| {
        message(e).is_some_and(|m| m.contains("does not fit the open-files limit"))
    });
    assert_eq!(
        field_str(&lowered, "level").as_deref(),
        Some("WARN"),
        "{lowered}"
    );
    assert_eq!(
        field_u64(&lowered, "open_files_limit"),
        Some(LOW_LIMIT),
        "{lowered}"
    );
    assert_eq!(
        field_u64(&lowered, "max_connections"),
        Some(FITS_LOW_LIMIT as u64),
        "{lowered}"
    );

    let service = sa("192.0.2.10:80");
    let mut relayed: Vec<TcpStream> = (0..FITS_LOW_LIMIT)
        .map(|i| {
            let mut c = connect(&t.cl, service);
            let hello = lab::read_line(&mut c)
                .unwrap_or_else(|e| panic!("connection {i} of {FITS_LOW_LIMIT}: {e}"));
            assert_eq!(hello, "sv", "connection {i}");
            c
        })
        .collect();
    for extra in 0..8 {
        let started = Instant::now();
        // The reset may already be there when connect() looks at the socket.
        let got = lab::try_connect(&t.cl, service, Duration::from_secs(5)).and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            lab::read_some(&mut c, &mut [0u8; 64])
        });
        let took = started.elapsed();
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "connection {} over the limit: {got:?} after {took:?}, not a reset",
            FITS_LOW_LIMIT + extra
        );
        assert!(took < Duration::from_secs(3), "reset after {took:?}");
    }
    let refusal = d.wait_event("the refusal", Duration::from_secs(5), |e| {
        message(e).is_some_and(|m| m.starts_with("over a connection limit"))
    });
    assert_eq!(
        field_string(&refusal, "limit"),
        "connection limit",
        "{refusal}"
    );
    for (i, c) in relayed.iter_mut().enumerate() {
        lab::echo(c, "still relayed", &format!("connection {i}"));
    }

    let mut first = relayed.remove(0);
    let client = first.local_addr().unwrap();
    lab::finish(&mut first, "the first connection");
    d.closed_event(client);
    // The slot is given back just after the close is logged.
    let again = lab::poll_until(
        Duration::from_secs(5),
        || {
            let mut c = lab::try_connect(&t.cl, service, Duration::from_secs(5)).ok()?;
            (lab::read_line(&mut c).ok()? == "sv").then_some(c)
        },
        Option::is_some,
    );
    let mut again = again.expect("a connection in the freed slot");
    lab::echo(&mut again, "in the freed slot", "the new connection");
}

// ---------------------------------------------------------------------------
// Splice pipes

/// Bulk transfers open splice pipes; once the transfers are over, the
/// pooled pipes are closed within a few trim periods (5 s each), and the
/// daemon's descriptors come back to what it had idle.
#[test]
fn a_quiet_daemon_closes_its_splice_pipes() {
    const CONNECTIONS: usize = 20;
    // Each way on each connection; well past the 16 KiB first read, after
    // which a direction splices.
    const BYTES: usize = 2 << 20;
    let (t, _echo) = Topo::with_echo("pipes", "203.0.113.2:8080", "sv");
    let (tx, rx) = lab::reports();
    let from_server = Arc::new(lab::random_bytes(BYTES, lab::seed()));
    let from_client = Arc::new(lab::random_bytes(BYTES, lab::seed() ^ 1));
    let (server_sent, client_sent) = (Received::of(&from_server), Received::of(&from_client));
    let _bulk = Server::start(
        &t.sv,
        sa("203.0.113.2:8081"),
        handlers::bulk(from_server.clone(), tx),
    );
    let policy = json!({
        "intercept": [
            { "name": "echo", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "echo" },
            { "name": "bulk", "prefixes": ["192.0.2.0/24"], "ports": [81], "upstream": "bulk" }
        ],
        "upstreams": {
            "echo": { "servers": ["203.0.113.2:8080"] },
            "bulk": { "servers": ["203.0.113.2:8081"] }
        }
    });
    let mut d = Daemon::start_ready(&t.px, &policy, &[]);
    // One small exchange first, so that whatever the first connection
    // opens for good counts as idle.
    let mut warm = connect(&t.cl, sa("192.0.2.10:80"));
    lab::talk(&mut warm, "sv", "warm-up");
    d.wait_closed_events(1, Duration::from_secs(5));
    let idle = d.descriptors();
    let idle_pipes = pipe_descriptors(&d);

    // The server starts sending as soon as it accepts.
    let transfers: Vec<JoinHandle<io::Result<Received>>> = (0..CONNECTIONS)
        .map(|_| {
            let mut c = connect(&t.cl, sa("192.0.2.10:81"));
            let data = from_client.clone();
            std::thread::spawn(move || lab::exchange(&mut c, data))
        })
        .collect();
    let (mut peak, mut peak_pipes) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while transfers.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        peak = peak.max(d.descriptors());
        peak_pipes = peak_pipes.max(pipe_descriptors(&d));
        std::thread::sleep(Duration::from_millis(5));
    }
    for (i, transfer) in transfers.into_iter().enumerate() {
        let got = transfer
            .join()
            .expect("transfer thread")
            .unwrap_or_else(|e| panic!("transfer {i}: {e}"));
        assert_eq!(got, server_sent, "transfer {i}: from the server");
        let sent = lab::recv_report(&rx, &format!("transfer {i}"));
        assert_eq!(sent, client_sent, "transfer {i}: from the client");
    }
    // At least one pipe (two descriptors) taken for the transfers. Not all
    // the connections need be open at once: on a quick machine the first
    // transfers end before the last begin.
    assert!(
        peak_pipes >= idle_pipes + 2,
        "no pipe seen: at most {peak_pipes} pipe ends during the transfers, {idle_pipes} idle \
         ({peak} descriptors at most, {idle} idle)"
    );
    d.wait_closed_events(1 + CONNECTIONS, Duration::from_secs(10));
    let after_close = d.descriptors();
    let started = Instant::now();
    let settled = lab::poll_until(Duration::from_secs(20), || d.descriptors(), |&n| n <= idle);
    let report = format!(
        "descriptors: {idle} idle, {peak} at the peak of the transfers ({peak_pipes} pipe \
         ends), {after_close} when the connections had closed, {settled} {:?} later",
        started.elapsed()
    );
    assert!(settled <= idle, "{report}");
    eprintln!("{report}");
}

// ---------------------------------------------------------------------------
// Scale

/// Raises this process's soft open-files limit to the hard one and returns
/// it.
fn raise_own_open_files_limit() -> u64 {
    let (soft, hard) = rlimit::Resource::NOFILE.get().expect("getrlimit");
    if soft < hard {
        rlimit::Resource::NOFILE
            .set(hard, hard)
            .unwrap_or_else(|e| panic!("raising the open-files limit from {soft} to {hard}: {e}"));
    }
    hard
}

/// A listener in `ns` on `at` with a deep accept queue, whose accept
/// gives up after `timeout` (accept(2) honours SO_RCVTIMEO).
fn deep_listener(ns: &lab::Netns, at: SocketAddr, timeout: Duration) -> TcpListener {
    ns.run(move || -> io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.bind(&at.into())?;
        socket.listen(4096)?;
        socket.set_read_timeout(Some(timeout))?;
        Ok(socket.into())
    })
    .unwrap_or_else(|e| panic!("listen on {at} in netns {}: {e}", ns.name()))
}

/// Serves `n` connections in turn on one thread, echoing one byte on
/// each and holding it open; once `clients_gone` says so, reads each
/// one's end and closes it. Returns how many ended cleanly. (The lab's
/// `Server`, a thread per connection and accepts polled every 10 ms, is
/// made for tens of connections.)
fn hold_open_echo(
    listener: TcpListener,
    n: usize,
    clients_gone: Receiver<()>,
) -> JoinHandle<Result<usize, String>> {
    std::thread::spawn(move || {
        let mut held = Vec::with_capacity(n);
        for i in 0..n {
            let (mut s, _) = listener
                .accept()
                .map_err(|e| format!("accepting connection {i}: {e}"))?;
            s.set_read_timeout(Some(lab::IO_TIMEOUT)).unwrap();
            s.set_write_timeout(Some(lab::IO_TIMEOUT)).unwrap();
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte)
                .and_then(|()| s.write_all(&byte))
                .map_err(|e| format!("echoing on connection {i}: {e}"))?;
            held.push(s);
        }
        clients_gone
            .recv_timeout(Duration::from_secs(120))
            .map_err(|e| format!("waiting for the clients to close: {e}"))?;
        let mut ended = 0;
        for (i, mut s) in held.into_iter().enumerate() {
            match lab::read_some(&mut s, &mut [0u8; 1]) {
                Ok(0) => ended += 1,
                other => return Err(format!("connection {i} at the end: {other:?}")),
            }
        }
        Ok(ended)
    })
}

/// 9 000 connections open through the proxy at once, each with one byte
/// echoed, then all closed: every one is served, the daemon logs each
/// close, and its descriptors come back to the idle level.
#[test]
fn nine_thousand_connections_at_once() {
    const CONNECTIONS: usize = 9_000;
    // The daemon (which inherits this process's limit) needs 2 descriptors
    // per connection of --max-connections and its `RESERVE`; this process
    // holds both ends' sockets, 2 per connection too.
    const MAX_CONNECTIONS: u64 = 9_400;
    const NEEDED: u64 = 2 * MAX_CONNECTIONS + RESERVE;
    let limit = raise_own_open_files_limit();
    assert!(
        limit >= NEEDED,
        "this test needs an open-files limit of {NEEDED}, the hard limit is {limit}"
    );
    let t = Topo::new("scale_conns");
    let upstream = sa("203.0.113.2:8080");
    let listener = deep_listener(&t.sv, upstream, Duration::from_secs(10));
    let policy = json!({
        "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "echo" } ],
        "upstreams": { "echo": { "servers": [upstream.to_string()] } }
    });
    let d = Daemon::start_ready(
        &t.px,
        &policy,
        &[
            "--max-connections",
            &MAX_CONNECTIONS.to_string(),
            WORKERS[0],
            WORKERS[1],
        ],
    );
    // The fewest over half a second: a descriptor the daemon holds for a
    // moment just after start (once, in a full parallel run, the idle count
    // was one more than the daemon's steady state) is not part of it.
    let idle = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            d.descriptors()
        })
        .min()
        .expect("ten samples");
    let (gone, clients_gone) = mpsc::channel();
    let server = hold_open_echo(listener, CONNECTIONS, clients_gone);

    let started = Instant::now();
    let service = sa("192.0.2.10:80");
    let clients: Vec<TcpStream> = t.cl.run(move || {
        (0..CONNECTIONS)
            .map(|i| {
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "{i} connections after {:?}",
                    started.elapsed()
                );
                let mut c = TcpStream::connect_timeout(&service, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let byte = [b'0' + (i % 10) as u8];
                let mut back = [0u8; 1];
                c.write_all(&byte)
                    .and_then(|()| c.read_exact(&mut back))
                    .unwrap_or_else(|e| panic!("connection {i}: echo: {e}"));
                assert_eq!(back, byte, "connection {i}: echo");
                c
            })
            .collect()
    });
    let opened_in = started.elapsed();
    let held = d.descriptors();
    assert!(
        held >= idle + 2 * CONNECTIONS,
        "{CONNECTIONS} connections open, the daemon has {held} descriptors ({idle} idle)"
    );

    drop(clients);
    gone.send(()).unwrap();
    let ended = server
        .join()
        .expect("server thread")
        .unwrap_or_else(|e| panic!("server: {e}"));
    assert_eq!(
        ended, CONNECTIONS,
        "connections whose end reached the server"
    );
    let settled = lab::poll_until(Duration::from_secs(30), || d.descriptors(), |&n| n <= idle);
    assert!(
        settled <= idle,
        "descriptors: {idle} idle, {held} held, {settled} 30 s after the close"
    );

    // Every close is logged, or counted among the dropped lines; the log
    // is written behind the connections, and may lag their descriptors.
    /// The close lines, and the lines counted as dropped.
    fn closes(events: &[Value]) -> (Vec<&Value>, u64) {
        let closed = events
            .iter()
            .filter(|e| message(e) == Some("connection closed"))
            .collect();
        let dropped = events
            .iter()
            .filter(|e| message(e).is_some_and(|m| m.starts_with("log lines dropped")))
            .filter_map(|e| field_u64(e, "dropped"))
            .sum();
        (closed, dropped)
    }
    let events = lab::poll_until(
        Duration::from_secs(10),
        || d.events(),
        |events| {
            let (closed, dropped) = closes(events);
            closed.len() as u64 + dropped >= CONNECTIONS as u64
        },
    );
    let (closed, dropped) = closes(&events);
    assert_eq!(
        closed.len() as u64 + dropped,
        CONNECTIONS as u64,
        "{} closes logged, {dropped} lines dropped",
        closed.len()
    );
    let unclean: Vec<&&Value> = closed
        .iter()
        .filter(|e| Some(lab::daemon::outcome(e)).as_deref() != Some("closed"))
        .collect();
    assert!(
        unclean.is_empty(),
        "{} not closed cleanly, first: {:?}",
        unclean.len(),
        unclean.first()
    );
    eprintln!(
        "{CONNECTIONS} connections opened and echoed in {opened_in:?}; descriptors {idle} idle, \
         {held} held, {settled} after; {dropped} log lines dropped"
    );
}

/// SHA-256 of a stream by `openssl dgst`: the test binary's sha2 is built
/// without optimisation and hashes about 25 MB/s, too slow for GiBs.
struct StreamHash {
    child: Child,
    stdin: Option<ChildStdin>,
    len: usize,
}

impl StreamHash {
    fn new() -> StreamHash {
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-r"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running openssl dgst: {e} (is openssl installed?)"));
        let stdin = child.stdin.take();
        StreamHash {
            child,
            stdin,
            len: 0,
        }
    }

    fn update(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.len += bytes.len();
        self.stdin.as_mut().unwrap().write_all(bytes)
    }

    fn finish(mut self) -> io::Result<Received> {
        drop(self.stdin.take());
        let mut out = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut out)?;
        let sha256 = out.split_whitespace().next().unwrap_or_default().to_owned();
        if sha256.len() != 64 {
            return Err(io::Error::other(format!("openssl dgst said {out:?}")));
        }
        Ok(Received {
            len: self.len,
            sha256,
        })
    }
}

impl Drop for StreamHash {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// xorshift64*: the sizes, offsets and pauses of one side's stream.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }

    /// Now and then (one call in 256), a pause of 1-5 ms.
    fn maybe_pause(&mut self) {
        if self.below(256) == 0 {
            std::thread::sleep(Duration::from_millis(1 + self.below(5) as u64));
        }
    }
}

/// The most one write or read moves.
const MAX_PIECE: usize = 256 * 1024;

/// How long one side of a large transfer may take.
const TRANSFER_TIME: Duration = Duration::from_secs(150);

/// Sends `len` bytes of a stream cut from `block` at seeded offsets, in
/// writes of seeded sizes (1 B to 256 KiB) with pauses now and then; shuts
/// the write side down; returns what was sent.
fn send_stream(s: &mut TcpStream, block: &[u8], seed: u64, len: usize) -> io::Result<Received> {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut hash = StreamHash::new();
    while hash.len < len {
        if started.elapsed() > TRANSFER_TIME {
            return Err(io::Error::other(format!(
                "{} of {len} bytes sent in {TRANSFER_TIME:?}",
                hash.len
            )));
        }
        let n = (1 + rng.below(MAX_PIECE)).min(len - hash.len);
        let at = rng.below(block.len() - n);
        let piece = &block[at..at + n];
        s.write_all(piece)?;
        hash.update(piece)?;
        rng.maybe_pause();
    }
    s.shutdown(Shutdown::Write)?;
    hash.finish()
}

/// Reads to EOF in reads of seeded sizes with pauses now and then;
/// returns what came.
fn receive_stream(s: &mut TcpStream, seed: u64) -> io::Result<Received> {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut hash = StreamHash::new();
    let mut buf = vec![0u8; MAX_PIECE];
    loop {
        if started.elapsed() > TRANSFER_TIME {
            return Err(io::Error::other(format!(
                "{} bytes received in {TRANSFER_TIME:?}",
                hash.len
            )));
        }
        let want = 1 + rng.below(MAX_PIECE);
        match lab::read_some(s, &mut buf[..want]) {
            Ok(0) => return hash.finish(),
            Ok(n) => hash.update(&buf[..n])?,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("after {} bytes: {e}", hash.len),
                ));
            }
        }
        rng.maybe_pause();
    }
}

/// Both at once on one connection: what was sent, what came.
fn both_ways(
    s: &mut TcpStream,
    block: Arc<Vec<u8>>,
    seed: u64,
    len: usize,
) -> io::Result<(Received, Received)> {
    let mut w = s.try_clone()?;
    let sender = std::thread::spawn(move || send_stream(&mut w, &block, seed, len));
    let received = receive_stream(s, seed.rotate_left(32));
    let sent = sender.join().expect("sender thread");
    Ok((sent?, received?))
}

/// 1 GiB each way at once on one connection, IPv4 then IPv6, with random
/// write and read sizes and pauses on both ends: each end receives exactly
/// what the other sent (length and SHA-256).
#[test]
fn a_gibibyte_each_way_arrives_byte_exact() {
    let t = Topo::new("scale_bytes");
    let policy = json!({
        "intercept": [
            { "name": "web4", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "sv4" },
            { "name": "web6", "prefixes": ["2001:db8:a::/64"], "ports": [80], "upstream": "sv6" }
        ],
        "upstreams": {
            "sv4": { "servers": ["203.0.113.2:8080"] },
            "sv6": { "servers": ["[2001:db8:5::2]:8080"] }
        }
    });
    let _d = Daemon::start_ready(&t.px, &policy, &[]);
    let seed = lab::seed();
    eprintln!("seed {seed}");
    // Offsets into 8 MiB of random bytes, chosen afresh for every write.
    let block = Arc::new(lab::random_bytes(8 << 20, seed));
    for (service, upstream, len) in [
        ("192.0.2.10:80", "203.0.113.2:8080", 1usize << 30),
        ("[2001:db8:a::10]:80", "[2001:db8:5::2]:8080", 1 << 30),
    ] {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let server_block = block.clone();
        let server_seed = seed.wrapping_add(1);
        let _server = Server::start(&t.sv, sa(upstream), move |mut s: TcpStream| {
            let _ =
                tx.lock()
                    .unwrap()
                    .send(both_ways(&mut s, server_block.clone(), server_seed, len));
        });
        let started = Instant::now();
        let mut c = connect(&t.cl, sa(service));
        let (sent, received) = both_ways(&mut c, block.clone(), seed, len)
            .unwrap_or_else(|e| panic!("{service}: client: {e}"));
        let (server_sent, server_received) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{service}: no report from the server: {e}"))
            .unwrap_or_else(|e| panic!("{service}: server: {e}"));
        eprintln!("{service}: {len} bytes each way in {:?}", started.elapsed());
        assert_eq!(sent.len, len, "{service}");
        assert_eq!(server_sent.len, len, "{service}");
        assert_eq!(server_received, sent, "{service}: client to server");
        assert_eq!(received, server_sent, "{service}: server to client");
    }
}
