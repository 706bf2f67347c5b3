//! Real TLS and HTTP peers for the routing tests: certificates made with
//! `openssl req`, nginx as the upstream servers, curl and `openssl s_client`
//! as clients, all run inside the lab's namespaces with `ip netns exec`.
//!
//! Every process started here runs in a process group of its own and is
//! killed (the whole group) and reaped on drop, also while a failing test
//! unwinds; every temporary directory is removed on drop. Client runs are
//! bounded by a deadline after which they are killed.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Netns, TempDir, try_connect};

/// Panics, loudly, unless `tool` is on the PATH (these tests need real
/// clients and servers; a missing one must not look like a daemon bug).
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed (PATH={:?}); install the Debian package `{package}`",
        std::env::var_os("PATH")
    );
}

/// The clients and servers of the routing tests.
pub fn require_tools() {
    require_tool("openssl", "openssl");
    require_tool("curl", "curl");
    require_tool("nginx", "nginx-light");
    require_tool("ip", "iproute2");
}

/// A self-signed certificate and its key (PEM files). The certificate is its
/// own CA: a client given it with `--cacert`/`-CAfile` trusts exactly this
/// server and no other.
#[derive(Clone, Debug)]
pub struct Cert {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a P-256 self-signed certificate `CN=<cn>` valid one day, with the
/// given subjectAltName entries (`DNS:...`, `IP:...`), as `<name>.crt` and
/// `<name>.key` in `dir`.
pub fn make_cert(dir: &TempDir, name: &str, cn: &str, sans: &[&str]) -> Cert {
    let cert = dir.join(&format!("{name}.crt"));
    let key = dir.join(&format!("{name}.key"));
    let subj = format!("/CN={cn}");
    let san = format!("subjectAltName={}", sans.join(","));
    let args: Vec<&str> = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        &subj,
        "-addext",
        &san,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-days",
        "1",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ];
    super::must("openssl", &args);
    Cert {
        name: name.to_owned(),
        cert,
        key,
    }
}

/// What a bounded client run produced.
#[derive(Debug)]
pub struct Output {
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub command: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Everything, for panic messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` -> {}{}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.command,
            match self.status {
                Some(s) => s.to_string(),
                None => "no exit status".to_owned(),
            },
            if self.timed_out {
                " (killed at the deadline)"
            } else {
                ""
            },
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// `ip netns exec NS prog args...` in a process group of its own.
pub fn ns_command(ns: &Netns, prog: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), prog]).args(args);
    cmd.process_group(0);
    cmd
}

/// Waits until each of `addrs` accepts a connection from inside `ns` (30 s
/// in all); panics with `logs()` if `child` (`what`) exits first or the time
/// runs out.
pub fn wait_listening(
    ns: &Netns,
    child: &mut Child,
    what: &str,
    addrs: &[SocketAddr],
    logs: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &addr in addrs {
        while try_connect(ns, addr, Duration::from_millis(500)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{what} in {} exited ({status}) at start\n{}",
                    ns.name(),
                    logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what} in {} does not accept on {addr} after 30 s\n{}",
                ns.name(),
                logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn kill_group(child: &mut Child) {
    // SAFETY: plain syscall; the group is the one this child leads.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Runs `prog args...` inside `ns`, feeding `stdin` (then closing it), and
/// waits at most `timeout`; on the deadline the process group is killed.
pub fn run_in(ns: &Netns, prog: &str, args: &[&str], stdin: &[u8], timeout: Duration) -> Output {
    let command = format!("ip netns exec {} {prog} {}", ns.name(), args.join(" "));
    let mut child = ns_command(ns, prog, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => panic!("waitpid `{command}`: {e}"),
        }
        if Instant::now() >= deadline {
            timed_out = true;
            kill_group(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Children of the client (none expected) could hold the pipes open: the
    // group is gone once killed, and a clean exit closes them.
    if !timed_out {
        // SAFETY: as above; the group may already be empty (ESRCH is fine).
        unsafe {
            libc::kill(-(child.id() as i32), libc::SIGKILL);
        }
    }
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
    Output {
        status,
        timed_out,
        stdout,
        stderr,
        command,
    }
}

/// A curl run and its `-w` report.
#[derive(Debug)]
pub struct Curl {
    pub out: Output,
    /// Response body (stdout before the `-w` marker).
    pub body: String,
    pub http_code: Option<u16>,
    pub ssl_verify_result: Option<i64>,
    /// `1.1`, `2`, ...
    pub http_version: Option<String>,
    /// The client's own address, as the daemon logs it.
    pub local: Option<SocketAddr>,
}

const CURL_MARK: &str = "\n@@curl-write-out@@";

impl Curl {
    pub fn describe(&self) -> String {
        self.out.describe()
    }
}

/// Runs `curl -sS --max-time 10 ARGS...` inside `ns` and parses a `-w`
/// report appended to stdout (also on failure: curl writes it regardless).
pub fn curl(ns: &Netns, args: &[&str]) -> Curl {
    let w = format!(
        "{CURL_MARK} %{{http_code}} %{{ssl_verify_result}} %{{http_version}} %{{local_ip}} %{{local_port}}"
    );
    let mut full: Vec<&str> = vec![
        "-sS",
        "--max-time",
        "10",
        "--connect-timeout",
        "5",
        "-w",
        &w,
    ];
    full.extend_from_slice(args);
    let out = run_in(ns, "curl", &full, b"", Duration::from_secs(20));
    let (body, report) = match out.stdout.rfind(CURL_MARK) {
        Some(i) => (
            out.stdout[..i].to_owned(),
            out.stdout[i + CURL_MARK.len()..].trim().to_owned(),
        ),
        None => (out.stdout.clone(), String::new()),
    };
    let parts: Vec<&str> = report.split_whitespace().collect();
    let http_code = parts
        .first()
        .and_then(|c| c.parse().ok())
        .filter(|&c| c != 0);
    let ssl_verify_result = parts.get(1).and_then(|c| c.parse().ok());
    let http_version = parts.get(2).map(|v| v.to_string()).filter(|v| v != "0");
    let local = match (parts.get(3), parts.get(4)) {
        (Some(ip), Some(port)) => match (ip.parse(), port.parse::<u16>()) {
            (Ok(ip), Ok(port)) if port != 0 => Some(SocketAddr::new(ip, port)),
            _ => None,
        },
        _ => None,
    };
    Curl {
        out,
        body,
        http_code,
        ssl_verify_result,
        http_version,
        local,
    }
}

/// Runs Debian's headless Chromium (`chromium`, the launcher script) inside
/// `ns` as root: no sandbox, no GPU, shared memory in `profile` rather than
/// /dev/shm, and `profile` as its HOME and user data dir, so nothing of the
/// machine's own profile is read or written. `args` go before the rest
/// (`--dump-dom URL`, say); the whole process group is killed at 60 s.
pub fn chromium(ns: &Netns, profile: &TempDir, args: &[&str]) -> Output {
    require_tool("chromium", "chromium");
    let dir = profile.path().display().to_string();
    let home = format!("HOME={dir}");
    let tmp = format!("TMPDIR={dir}");
    let data = format!("--user-data-dir={dir}/data");
    let mut full: Vec<&str> = vec![
        "-u",
        "DBUS_SESSION_BUS_ADDRESS",
        "-u",
        "DISPLAY",
        "-u",
        "WAYLAND_DISPLAY",
        &home,
        &tmp,
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--metrics-recording-only",
        &data,
    ];
    full.extend_from_slice(args);
    run_in(ns, "env", &full, b"", Duration::from_secs(60))
}

/// Runs `openssl s_client ARGS...` inside `ns` with `stdin` as what to send
/// (`-ign_eof` keeps it reading until the server closes).
pub fn s_client(ns: &Netns, args: &[&str], stdin: &[u8]) -> Output {
    let mut full = vec!["s_client", "-ign_eof"];
    full.extend_from_slice(args);
    run_in(ns, "openssl", &full, stdin, Duration::from_secs(15))
}

/// Records the first TLS record(s) a real `openssl s_client ARGS...` sends:
/// a listener on 127.0.0.1 inside `ns` (loopback of a lab namespace) accepts
/// the client, reads whole TLS records until the ClientHello handshake
/// message is complete, and hangs up (the client then fails, as intended).
pub fn capture_client_hello(ns: &Netns, s_client_args: &[&str]) -> Vec<u8> {
    let listener = ns
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap_or_else(|e| panic!("bind 127.0.0.1:0 in netns {}: {e}", ns.name()));
    let port = listener.local_addr().unwrap().port();
    let connect = format!("127.0.0.1:{port}");
    let mut args = vec!["s_client", "-connect", connect.as_str()];
    args.extend_from_slice(s_client_args);
    let command = format!("openssl {}", args.join(" "));
    let mut child = ns_command(ns, "openssl", &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let got = (|| -> io::Result<Vec<u8>> {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client did not connect",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut data = Vec::new();
        let mut handshake = Vec::new();
        loop {
            let mut header = [0u8; 5];
            s.read_exact(&mut header)?;
            if header[0] != 22 {
                return Err(io::Error::other(format!(
                    "not a handshake record: {header:02x?}"
                )));
            }
            let len = u16::from_be_bytes([header[3], header[4]]) as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body)?;
            data.extend_from_slice(&header);
            data.extend_from_slice(&body);
            handshake.extend_from_slice(&body);
            if handshake.len() >= 4 {
                let msg_len = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]);
                if handshake.len() >= 4 + msg_len as usize {
                    return Ok(data);
                }
            }
        }
    })();
    kill_group(&mut child);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    match got {
        Ok(data) => {
            assert_eq!(data[5], 1, "captured handshake is not a ClientHello");
            data
        }
        Err(e) => panic!(
            "capturing the ClientHello of `{command}` in {}: {e}\nstderr: {err}",
            ns.name()
        ),
    }
}

/// One `server` block of nginx: a listen address, TLS (with `http2`) or
/// plain, and a fixed body `<body>\n` for every request.
#[derive(Clone, Debug)]
pub struct Site {
    pub listen: SocketAddr,
    pub tls: Option<Cert>,
    pub http2: bool,
    /// `listen ... proxy_protocol`: every connection starts with a PROXY
    /// header (v1 or v2), logged as `pp=ADDR:PORT`.
    pub proxy_protocol: bool,
    pub body: String,
}

impl Site {
    pub fn tls(listen: &str, cert: &Cert, body: &str) -> Site {
        Site {
            listen: super::sa(listen),
            tls: Some(cert.clone()),
            http2: false,
            proxy_protocol: false,
            body: body.to_owned(),
        }
    }

    pub fn h2(listen: &str, cert: &Cert, body: &str) -> Site {
        Site {
            http2: true,
            ..Site::tls(listen, cert, body)
        }
    }

    pub fn plain(listen: &str, body: &str) -> Site {
        Site {
            listen: super::sa(listen),
            tls: None,
            http2: false,
            proxy_protocol: false,
            body: body.to_owned(),
        }
    }

    /// Plain HTTP behind a PROXY protocol header.
    pub fn proxy_protocol(listen: &str, body: &str) -> Site {
        Site {
            proxy_protocol: true,
            ..Site::plain(listen, body)
        }
    }
}

/// nginx in a namespace (single process: `master_process off`, `daemon off`),
/// configured and logging in its own temp dir. Killed and reaped on drop.
pub struct Nginx {
    child: Child,
    dir: TempDir,
    ns: String,
}

/// How nginx and HAProxy print an address and port: IPv6 without brackets.
pub fn logged(addr: SocketAddr) -> String {
    format!("{}:{}", addr.ip(), addr.port())
}

impl Nginx {
    /// Starts nginx in `ns` serving `sites`, and waits until every listen
    /// address accepts a TCP connection from inside `ns` (30 s).
    pub fn start(ns: &Netns, sites: &[Site]) -> Nginx {
        let dir = TempDir::new("nginx");
        let d = dir.path().display().to_string();
        let mut conf = format!(
            "worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             \x20 default_type text/plain;\n\
             \x20 ssl_protocols TLSv1.2 TLSv1.3;\n\
             \x20 log_format routing '$server_addr:$server_port sni=$ssl_server_name tls=$ssl_protocol alpn=$ssl_alpn_protocol host=$host \"$request\" $status from=$remote_addr pp=$proxy_protocol_addr:$proxy_protocol_port';\n\
             \x20 access_log {d}/access.log routing;\n\
             \x20 client_body_temp_path {d}/body;\n\
             \x20 proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n"
        );
        for site in sites {
            let listen = site.listen.to_string();
            let mut flags = String::new();
            if site.tls.is_some() {
                flags.push_str(" ssl");
            }
            if site.http2 {
                flags.push_str(" http2");
            }
            if site.proxy_protocol {
                flags.push_str(" proxy_protocol");
            }
            conf.push_str(&format!("  server {{\n    listen {listen}{flags};\n"));
            if let Some(cert) = &site.tls {
                conf.push_str(&format!(
                    "    ssl_certificate {};\n    ssl_certificate_key {};\n",
                    cert.cert.display(),
                    cert.key.display()
                ));
            }
            conf.push_str(&format!(
                "    location / {{ return 200 \"{}\\n\"; }}\n  }}\n",
                site.body
            ));
        }
        conf.push_str("}\n");
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, &conf)
            .unwrap_or_else(|e| panic!("write {}: {e}", conf_path.display()));
        let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let conf_arg = conf_path.display().to_string();
        let args = [
            "-p",
            d.as_str(),
            "-c",
            conf_arg.as_str(),
            "-e",
            "stderr",
            "-g",
            "daemon off; master_process off;",
        ];
        let mut child = ns_command(ns, "nginx", &args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nginx in {}: {e}", ns.name()));
        let listening: Vec<SocketAddr> = sites.iter().map(|site| site.listen).collect();
        wait_listening(ns, &mut child, "nginx", &listening, || {
            format!("config:\n{conf}\n{}", nginx_logs(dir.path()))
        });
        Nginx {
            child,
            dir,
            ns: ns.name().to_owned(),
        }
    }

    /// Lines of the access log:
    /// `ADDR:PORT sni=... tls=... alpn=... host=... "REQUEST" STATUS from=PEER pp=ADDR:PORT`.
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Access log lines of requests served on `listen`.
    pub fn requests_on(&self, listen: &str) -> Vec<String> {
        let prefix = format!("{} ", logged(super::sa(listen)));
        self.access_log()
            .into_iter()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    /// Error log, stderr and access log, for panic messages.
    pub fn logs(&self) -> String {
        nginx_logs(self.dir.path())
    }
}

fn nginx_logs(dir: &Path) -> String {
    server_logs(dir, "nginx", &["stderr.log", "error.log", "access.log"])
}

/// A server's log files in `dir`, each under a heading, for panic messages.
pub fn server_logs(dir: &Path, server: &str, files: &[&str]) -> String {
    let mut out = String::new();
    for name in files {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        out += &format!("--- {server} {name} ---\n{}\n", text.trim_end());
    }
    out + "--------------------"
}

impl Drop for Nginx {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        if std::thread::panicking() {
            eprintln!("---- nginx (netns {}) ----\n{}", self.ns, self.logs());
        }
    }
}
