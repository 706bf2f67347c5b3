//! A real resolver for the lab: dnsmasq in a namespace, answering only for
//! the names a test gives it, and the resolv.conf that points at it.

use std::fs;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::tls::{kill_group, ns_command, require_tool};
use super::{Netns, TempDir};

/// dnsmasq serving fixed records; killed and reaped on drop.
pub struct Dnsmasq {
    child: Child,
    dir: TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq in `ns` on `listen` (UDP and TCP port 53) answering
    /// `records` (a name and its addresses, both families as given) and
    /// nothing else: every other name is refused, never forwarded.
    pub fn start(ns: &Netns, listen: IpAddr, records: &[(&str, &[&str])]) -> Dnsmasq {
        require_tool("dnsmasq", "dnsmasq-base");
        let dir = TempDir::new("dnsmasq");
        let listen_arg = format!("--listen-address={listen}");
        let mut args = vec![
            "--keep-in-foreground".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--no-poll".to_owned(),
            "--bind-interfaces".to_owned(),
            "--except-interface=lo".to_owned(),
            listen_arg,
            "--user=root".to_owned(),
            "--pid-file".to_owned(),
            "--log-facility=-".to_owned(),
            "--log-queries".to_owned(),
        ];
        for (name, addrs) in records {
            args.push(format!("--host-record={name},{}", addrs.join(",")));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = fs::File::create(dir.join("dnsmasq.log")).unwrap();
        let child = ns_command(ns, "dnsmasq", &args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting dnsmasq in {}: {e}", ns.name()));
        let dnsmasq = Dnsmasq { child, dir };
        dnsmasq.wait_started();
        dnsmasq
    }

    /// dnsmasq says when it reads its records and listens.
    fn wait_started(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains("started, version") {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // It binds before it logs; a moment more for the sockets.
        std::thread::sleep(Duration::from_millis(50));
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }

    /// A resolv.conf naming only `server`, in this resolver's temp dir.
    pub fn resolv_conf(&self, server: IpAddr) -> PathBuf {
        let path = self.dir.join("resolv.conf");
        // One try: a name dnsmasq does not know is answered at once; a
        // dnsmasq slow to answer on a loaded machine has 3 s.
        fs::write(
            &path,
            format!("nameserver {server}\noptions timeout:3 attempts:1\n"),
        )
        .unwrap();
        path
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        if std::thread::panicking() {
            eprintln!("---- dnsmasq ----\n{}\n---- end ----", self.log());
        }
    }
}
