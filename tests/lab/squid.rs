//! Squid (Debian's squid 5) as a real CONNECT peer: a parent that l4proxy
//! asks to connect on, or a child that asks l4proxy. Runs in the foreground
//! (`squid -N`) inside a lab namespace with a generated minimal config in a
//! temp dir of its own: no cache, its names from a hosts file (never the
//! machine's resolver), its logs in the temp dir. The process group (squid
//! and its helpers) is killed and reaped on drop; while a test panics, the
//! config and logs are printed.
//!
//! Squid drops its privileges to the user `proxy` (it refuses to run as
//! root), so the temp dir is handed to that user. Squid 5 keeps shared
//! memory segments in /dev/shm even without SMP workers, named after the
//! service and left behind when it is killed: it runs with a private tmpfs
//! on /dev/shm, in the mount namespace `ip netns exec` makes for it, so
//! parallel tests do not collide and nothing outlives it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::tls::{kill_group, ns_command, require_tool, run_in, wait_listening};
use super::{Netns, TempDir, poll_until};

const SQUID: &str = "/usr/sbin/squid";
const NCSA_AUTH: &str = "/usr/lib/squid/basic_ncsa_auth";

/// What a test asks of squid beyond the common part of the config.
#[derive(Default)]
pub struct Config<'a> {
    /// `http_port` addresses; squid is ready once each accepts.
    pub listen: Vec<SocketAddr>,
    /// `(name, address)` lines of squid's hosts file.
    pub hosts: Vec<(&'a str, &'a str)>,
    /// Basic-auth users and passwords (an htpasswd file checked by
    /// `basic_ncsa_auth`); with any, the acl `authenticated` (`proxy_auth
    /// REQUIRED`) is defined for `rules` to use.
    pub users: Vec<(&'a str, &'a str)>,
    /// The rest, as squid.conf lines: `acl`, `http_access`, `cache_peer`,
    /// `never_direct`, `tcp_outgoing_address`...
    pub rules: &'a str,
}

pub struct Squid {
    child: Child,
    dir: TempDir,
    ns: String,
    config: String,
}

impl Squid {
    /// Writes the config, has `squid -k parse` check it, starts squid in
    /// `ns` and waits until every `listen` address accepts (10 s).
    pub fn start(ns: &Netns, config: &Config<'_>) -> Squid {
        assert!(
            Path::new(SQUID).is_file(),
            "{SQUID} is missing: install the Debian package `squid`"
        );
        require_tool("openssl", "openssl");
        let dir = TempDir::new("squid");
        let d = dir.path().display().to_string();
        let mut conf = format!(
            "pid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\n\
             access_log stdio:{d}/access.log\n\
             cache_store_log none\n\
             coredump_dir {d}\n\
             netdb_filename none\n\
             pinger_enable off\n\
             logfile_rotate 0\n\
             cache deny all\n\
             visible_hostname lab-squid\n\
             hosts_file {d}/hosts\n\
             dns_nameservers 127.0.0.1\n\
             shutdown_lifetime 0 seconds\n"
        );
        for listen in &config.listen {
            writeln!(conf, "http_port {listen}").unwrap();
        }
        let mut hosts = String::new();
        for (name, addr) in &config.hosts {
            writeln!(hosts, "{addr} {name}").unwrap();
        }
        write(&dir.join("hosts"), &hosts);
        if !config.users.is_empty() {
            assert!(
                Path::new(NCSA_AUTH).is_file(),
                "{NCSA_AUTH} is missing (Debian's `squid` package has it)"
            );
            let mut passwd = String::new();
            for (user, password) in &config.users {
                let hash = super::must("openssl", &["passwd", "-apr1", password]);
                writeln!(passwd, "{user}:{}", hash.trim()).unwrap();
            }
            write(&dir.join("passwd"), &passwd);
            writeln!(
                conf,
                "auth_param basic program {NCSA_AUTH} {d}/passwd\n\
                 auth_param basic children 2 startup=1 idle=1\n\
                 auth_param basic realm lab\n\
                 acl authenticated proxy_auth REQUIRED"
            )
            .unwrap();
        }
        conf.push_str(config.rules);
        conf.push('\n');
        let conf_path = dir.join("squid.conf");
        write(&conf_path, &conf);
        give_to_proxy_user(dir.path());

        let conf_arg = conf_path.display().to_string();
        let parsed = run_in(
            ns,
            SQUID,
            &["-k", "parse", "-f", &conf_arg],
            b"",
            Duration::from_secs(10),
        );
        assert!(
            parsed.success(),
            "squid refuses its config:\n{conf}\n{}",
            parsed.describe()
        );

        let out = std::fs::File::create(dir.join("stderr.log")).unwrap();
        // `ip netns exec` runs the shell in a mount namespace of its own:
        // the tmpfs is squid's alone and goes away with it.
        let script = format!(
            "mount -t tmpfs -o size=16m,mode=1777 lab-squid-shm /dev/shm && exec {SQUID} -N -f {conf_arg}"
        );
        let mut child = ns_command(ns, "sh", &["-c", &script])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start squid in {}: {e}", ns.name()));
        wait_listening(ns, &mut child, "squid", &config.listen, || {
            format!("config:\n{conf}\n{}", squid_logs(dir.path()))
        });
        Squid {
            child,
            dir,
            ns: ns.name().to_owned(),
            config: conf,
        }
    }

    /// Lines of the access log (squid's native format: `time elapsed
    /// client code/status bytes method URL user hierarchy/from type`).
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits (10 s) for an access log line with every one of `needles`
    /// (squid logs a tunnel when it ends) and returns it.
    pub fn wait_access(&self, needles: &[&str]) -> String {
        let found = |log: &[String]| {
            log.iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned()
        };
        poll_until(
            Duration::from_secs(10),
            || found(&self.access_log()),
            Option::is_some,
        )
        .unwrap_or_else(|| {
            panic!(
                "no squid access log line with {needles:?} in 10 s:\n{}",
                self.logs()
            )
        })
    }

    /// The config, cache.log, stderr and access log, for panic messages.
    pub fn logs(&self) -> String {
        format!(
            "--- squid.conf ---\n{}\n{}",
            self.config.trim_end(),
            squid_logs(self.dir.path())
        )
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Makes `dir` (and what is in it) the `proxy` user's, which squid becomes.
fn give_to_proxy_user(dir: &Path) {
    // SAFETY: getpwnam with a NUL-terminated name; the fields are read at
    // once, before any other call could reuse its static buffer.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(c"proxy".as_ptr());
        assert!(
            !pw.is_null(),
            "no user `proxy` (Debian's squid package creates it)"
        );
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    let chown = |path: &Path| {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()))
    };
    chown(dir);
    for entry in std::fs::read_dir(dir).unwrap() {
        chown(&entry.unwrap().path());
    }
}

fn squid_logs(dir: &Path) -> String {
    super::tls::server_logs(dir, "squid", &["stderr.log", "cache.log", "access.log"])
}

impl Drop for Squid {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        if std::thread::panicking() {
            eprintln!("---- squid (netns {}) ----\n{}", self.ns, self.logs());
        }
    }
}
