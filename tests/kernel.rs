//! The kernel side on its own, driven through the library: what the
//! `sk_lookup` program steers, what it passes, the counter for a rule whose
//! listener is missing, and the `local` routes the daemon adds.

mod lab;

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use ipnet::IpNet;
use l4proxy::{
    intercept::{
        Family, Interceptor,
        delivery::DEFAULT_MARK,
        routes::{LocalRoutes, RouteError},
        rules,
    },
    policy::Policy,
};
use l4proxy_common::Counter;

const POLICY: &str = r#"{
  "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "a" } ],
  "upstreams": { "a": { "servers": ["203.0.113.2:8080"] } }
}"#;

fn counter(interceptor: &Interceptor, which: Counter) -> u64 {
    let counters = interceptor.counters().expect("reading the kernel counters");
    counters
        .iter()
        .find(|(c, _)| *c == which)
        .map(|(_, n)| *n)
        .expect("every counter is reported")
}

#[test]
fn missing_listener_drops_and_counts_then_a_listener_is_steered() {
    let topo = lab::Topo::new("kernel");
    // The daemon installs this route itself; here the test drives the program alone.
    topo.px
        .ip(&["route", "add", "local", "192.0.2.0/24", "dev", "lo"]);
    let policy = Policy::from_json(POLICY).expect("test policy is valid");
    let steered: SocketAddr = "192.0.2.10:80".parse().unwrap();

    let mut interceptor = topo.px.run(|| {
        let (mut interceptor, _local_addrs) =
            Interceptor::load(DEFAULT_MARK).expect("loading the BPF programs");
        interceptor
            .set_rules(&rules::compile(&policy))
            .expect("filling the rule map");
        interceptor
            .attach()
            .expect("attaching sk_lookup to the px namespace");
        interceptor
    });

    // Something else listens on the intercepted port itself.
    let bystander = topo
        .px
        .run(|| TcpListener::bind("0.0.0.0:80").expect("binding the bystander listener"));
    bystander.set_nonblocking(true).unwrap();

    // A rule matches but no listener is in the map: the lookup fails (the
    // client gets a reset) instead of falling through to the bystander, which
    // would bypass the policy.
    match lab::try_connect(&topo.cl, steered, Duration::from_secs(5)) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("connect with no listener in the map should be refused, got {other:?}"),
    }
    assert_eq!(
        bystander.accept().map_err(|e| e.kind()).err(),
        Some(ErrorKind::WouldBlock),
        "the connection reached the bystander listener"
    );
    assert_eq!(
        counter(&interceptor, Counter::NoSocket),
        1,
        "the drop was not counted"
    );
    assert_eq!(counter(&interceptor, Counter::Steered), 0);
    assert_eq!(counter(&interceptor, Counter::Passed), 0);

    // A port no rule names passes to whatever listens there.
    let plain = topo
        .px
        .run(|| TcpListener::bind("0.0.0.0:2222").expect("binding the plain listener"));
    lab::try_connect(
        &topo.cl,
        "192.0.2.10:2222".parse().unwrap(),
        Duration::from_secs(5),
    )
    .expect("a port outside the policy reaches its own listener");
    let (accepted, _) = plain.accept().expect("accept on the plain listener");
    assert_eq!(
        accepted.local_addr().unwrap(),
        "192.0.2.10:2222".parse().unwrap()
    );
    assert!(counter(&interceptor, Counter::Passed) >= 1);

    // With the listener in the map, the connection is steered into it and its
    // local address is the destination the client asked for.
    let listener = topo
        .px
        .run(|| TcpListener::bind("127.0.0.1:0").expect("binding the proxy listener"));
    interceptor
        .set_listener(Family::V4, &listener)
        .expect("putting the listener in the socket map");
    lab::try_connect(&topo.cl, steered, Duration::from_secs(5)).expect("steered connect");
    let (accepted, _) = listener.accept().expect("accept on the proxy listener");
    assert_eq!(accepted.local_addr().unwrap(), steered);
    assert_eq!(counter(&interceptor, Counter::Steered), 1);

    // Detached, the program steers nothing: the bystander gets the next one.
    // The link goes when its last descriptor closes: a process another test
    // of this binary forks at that moment holds a copy until its exec, so a
    // connection may still be steered for that long.
    interceptor.detach().expect("detaching");
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let accepted = loop {
        lab::try_connect(&topo.cl, steered, Duration::from_secs(5)).expect("connect after detach");
        std::thread::sleep(Duration::from_millis(20));
        match bystander.accept() {
            Ok((accepted, _)) => break accepted,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept on the bystander: {e}"),
        }
        let _ = listener.accept();
        assert!(
            std::time::Instant::now() < deadline,
            "still steered 5 s after detaching"
        );
    };
    assert_eq!(accepted.local_addr().unwrap(), steered);
}

/// The log lines a `tracing` subscriber wrote, for the test to read.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// A subscriber that logs `level` and below into this buffer.
    fn subscriber(&self, level: tracing::Level) -> impl tracing::Subscriber + Send + Sync {
        let buffer = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || buffer.clone())
            .finish()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[test]
fn a_missing_listener_is_a_debug_line_of_the_kernel_log() {
    let topo = lab::Topo::new("klog");
    topo.px
        .ip(&["route", "add", "local", "192.0.2.0/24", "dev", "lo"]);
    let policy = Policy::from_json(POLICY).expect("test policy is valid");
    let captured = Captured::default();

    // Loaded while the (test's) daemon logs debug lines: the programs log too.
    let (interceptor, mut log) = topo.px.run(|| {
        tracing::subscriber::with_default(captured.subscriber(tracing::Level::DEBUG), || {
            let (mut interceptor, _local_addrs) =
                Interceptor::load(DEFAULT_MARK).expect("loading the BPF programs");
            interceptor
                .set_rules(&rules::compile(&policy))
                .expect("filling the rule map");
            interceptor.attach().expect("attaching sk_lookup");
            let log = interceptor
                .take_kernel_log()
                .expect("at debug level the programs' log is read");
            (interceptor, log)
        })
    });

    match lab::try_connect(
        &topo.cl,
        "192.0.2.10:80".parse().unwrap(),
        Duration::from_secs(5),
    ) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("connect with no listener in the map should be refused, got {other:?}"),
    }
    assert_eq!(counter(&interceptor, Counter::NoSocket), 1);
    tracing::subscriber::with_default(captured.subscriber(tracing::Level::DEBUG), || log.flush());
    let text = captured.text();
    assert!(
        text.contains("DEBUG l4proxy::kernel")
            && text.contains(
                "refused 192.0.2.10:80 (rule 0): no listener in the socket map, error -2"
            ),
        "the kernel's line is missing from the log:\n{text}"
    );
}

/// A policy of one rule on 192.0.2.0/24 with these ports.
fn ports_policy(ports: &str) -> Policy {
    Policy::from_json(&format!(
        r#"{{
  "intercept": [ {{ "name": "web", "prefixes": ["192.0.2.0/24"], "ports": {ports}, "upstream": "a" }} ],
  "upstreams": {{ "a": {{ "servers": ["203.0.113.2:8080"] }} }}
}}"#
    ))
    .expect("test policy is valid")
}

#[test]
fn port_ranges_are_classes_and_a_reload_moves_ports_between_them() {
    let topo = lab::Topo::new("kclass");
    topo.px
        .ip(&["route", "add", "local", "192.0.2.0/24", "dev", "lo"]);
    let listener = topo
        .px
        .run(|| TcpListener::bind("127.0.0.1:0").expect("binding the proxy listener"));
    // A whole range is one entry for the prefix.
    let wide = rules::compile(&ports_policy(r#"["1024-65535"]"#));
    assert_eq!(wide.entries.len(), 1);
    let mut interceptor = topo.px.run(|| {
        let (mut interceptor, _local_addrs) =
            Interceptor::load(DEFAULT_MARK).expect("loading the BPF programs");
        interceptor
            .set_listener(Family::V4, &listener)
            .expect("putting the listener in the socket map");
        interceptor.set_rules(&wide).expect("setting the rules");
        // In px's namespace: the thread's namespace is the one attached to.
        interceptor.attach().expect("attaching sk_lookup");
        interceptor
    });
    // A bystander on every port the policies below leave alone at some point.
    let bystander = topo
        .px
        .run(|| TcpListener::bind("0.0.0.0:0").expect("binding the bystander"));
    let free_port = bystander.local_addr().unwrap().port();
    let steered = |interceptor: &Interceptor, port: u16| {
        lab::try_connect(
            &topo.cl,
            SocketAddr::from(([192, 0, 2, 10], port)),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("connect to port {port}: {e}; {:?}", interceptor.counters()));
        let (accepted, _) = listener.accept().expect("accept on the proxy listener");
        assert_eq!(accepted.local_addr().unwrap().port(), port);
    };

    assert_eq!(interceptor.rule_entries(), 1);
    for port in [1024, 8080, 40000, 65535] {
        steered(&interceptor, port);
    }

    // Other classes ({80}, the range, and 8080 in the range: three): the new
    // entries go in beside the old, the ports move, the old go out.
    let split = rules::compile(&ports_policy(r#"[80, "1024-65535", 8080]"#));
    assert_eq!(split.entries.len(), 3);
    interceptor
        .set_rules(&split)
        .expect("moving to other classes");
    assert_eq!(interceptor.rule_entries(), 3);
    for port in [80, 1024, 8080, 8081, 65535] {
        steered(&interceptor, port);
    }

    // Every port of 192.0.2.0/25 (the wildcard class), and one port of the
    // other half of the /24, twice with other classes: the classes move
    // between the halves of their numbers each time, and a named port
    // (80, then 443) of 192.0.2.10 is steered by the wildcard entry of the
    // half it is in.
    for named in [80, 443] {
        let policy = Policy::from_json(&format!(
            r#"{{ "intercept": [
                {{ "name": "all", "prefixes": ["192.0.2.0/25"], "ports": ["*"], "upstream": "a" }},
                {{ "name": "web", "prefixes": ["192.0.2.128/25"], "ports": [{named}], "upstream": "a" }} ],
              "upstreams": {{ "a": {{ "servers": ["203.0.113.2:8080"] }} }} }}"#
        ))
        .expect("test policy is valid");
        interceptor
            .set_rules(&rules::compile(&policy))
            .expect("moving to the wildcard");
        assert_eq!(interceptor.rule_entries(), 2);
        for port in [22, named, 65535] {
            steered(&interceptor, port);
        }
    }

    // Back to fewer classes, and the same classes again (no change at all).
    let narrow = rules::compile(&ports_policy(&format!("[{}]", free_port.wrapping_add(1))));
    interceptor.set_rules(&narrow).expect("moving back");
    interceptor
        .set_rules(&narrow)
        .expect("the same rules again");
    assert_eq!(interceptor.rule_entries(), 1);
    steered(&interceptor, free_port.wrapping_add(1));
    // Ports the policy no longer names reach their own listeners.
    lab::try_connect(
        &topo.cl,
        SocketAddr::from(([192, 0, 2, 10], free_port)),
        Duration::from_secs(5),
    )
    .expect("a port outside the policy reaches its own listener");
    bystander.accept().expect("accept on the bystander");
    assert_eq!(counter(&interceptor, Counter::NoSocket), 0);
}

/// A runtime for the library's async parts, on the calling thread (in its
/// network namespace).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// `n` /128 prefixes, every other address from 2001:db8:a::1:0:0.
fn host_prefixes(n: u128) -> Vec<IpNet> {
    const BASE: u128 = 0x2001_0db8_000a_0000_0000_0001_0000_0000;
    (0..n)
        .map(|i| IpNet::new(std::net::Ipv6Addr::from(BASE + 2 * i).into(), 128).unwrap())
        .collect()
}

/// The daemon's routes in the namespace whose addresses are in 2001:db8:a::/64.
fn routes_for_prefixes(ns: &lab::Netns) -> usize {
    ns.proxy_routes()
        .iter()
        .filter(|route| route.contains("2001:db8:a:"))
        .count()
}

#[test]
fn local_routes_go_in_and_out_many_per_send_and_a_refusal_undoes_the_change() {
    let topo = lab::Topo::new("kroutes");
    let all = host_prefixes(300);
    // The operator's own route for one of them: left alone, also on exit.
    let operators = all[2].to_string();
    topo.px.ip(&[
        "-6", "route", "add", "local", &operators, "dev", "lo", "table", "local",
    ]);
    let mut routes = LocalRoutes::default();

    // 300 prefixes: more than one send's worth of requests.
    topo.px
        .run(|| runtime().block_on(routes.set(&all)))
        .expect("adding 300 local routes");
    assert_eq!(routes_for_prefixes(&topo.px), 299);
    assert_eq!(routes.added().len(), 299);

    // Fewer: the others' routes go.
    topo.px
        .run(|| runtime().block_on(routes.set(&all[..100])))
        .expect("keeping 100");
    assert_eq!(routes_for_prefixes(&topo.px), 99);

    // A prefix the kernel refuses (host bits set): nothing of the change
    // stays, and what was there is untouched.
    let refused: IpNet = "192.0.2.1/24".parse().unwrap();
    let mut wanted = all.clone();
    wanted.push(refused);
    match topo.px.run(|| runtime().block_on(routes.set(&wanted))) {
        Err(RouteError::Add { prefix, .. }) => assert_eq!(prefix, refused),
        other => panic!("a refused route should fail the change, got {other:?}"),
    }
    assert_eq!(routes_for_prefixes(&topo.px), 99);
    assert!(
        topo.px
            .proxy_routes()
            .iter()
            .all(|r| !r.contains("192.0.2."))
    );

    // Removed: exactly ours.
    topo.px
        .run(|| runtime().block_on(routes.remove()))
        .expect("removing the routes");
    assert_eq!(routes_for_prefixes(&topo.px), 0);
    let left = topo.px.ip(&["-6", "route", "show", "table", "local"]);
    assert!(
        left.contains(&format!("local {} dev lo", all[2].addr())),
        "the operator's route must stay; table local:\n{left}"
    );
}

#[test]
fn the_kernel_is_told_the_daemons_own_prefixes_only_when_gateway_rules_need_them() {
    let topo = lab::Topo::new("klocal");
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink: l4proxy::local_addrs::Sink = {
        let told = told.clone();
        Box::new(move |prefixes: &[IpNet]| told.lock().unwrap().push(prefixes.to_vec()))
    };
    let owned = host_prefixes(3);
    let last = || {
        told.lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the sink was told")
    };
    topo.px.run(|| {
        runtime().block_on(async {
            let local = l4proxy::local_addrs::LocalAddrs::load(Some(sink))
                .await
                .expect("reading px's addresses");
            let host = last();
            assert!(host.iter().all(|p| !owned.contains(p)));

            // No gateway rule: the daemon knows its prefixes are local, the
            // kernel's copy is not told them.
            local.set_owned(&owned, false).await.unwrap();
            assert_eq!(last(), host);
            assert!(local.contains(owned[1].addr()));

            // A gateway rule: the kernel's copy has them too.
            local.set_owned(&owned, true).await.unwrap();
            let told = last();
            assert_eq!(told.len(), host.len() + owned.len());
            assert!(owned.iter().all(|p| told.contains(p)));
        });
    });
}
