//! Bulk throughput with iperf3: the server runs in the server namespace for the
//! whole benchmark, each measurement is one `iperf3 -c ... -J` from the client.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::lab::Netns;

/// What one iperf3 run moved, as its receiving end counted it.
pub struct Transfer {
    pub bits_per_second: f64,
    pub bytes: f64,
}

/// One run of `seconds`, with `streams` parallel streams; `reverse` sends
/// from the server to the client (`-R`).
pub fn throughput(
    cl: &Netns,
    target: SocketAddr,
    streams: usize,
    reverse: bool,
    seconds: u64,
) -> anyhow::Result<Transfer> {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", cl.name(), "iperf3", "-J", "-c"])
        .arg(target.ip().to_string())
        .args(["-p", &target.port().to_string()])
        .args(["-t", &seconds.to_string(), "-P", &streams.to_string()])
        .args(["--connect-timeout", "3000"]);
    if reverse {
        command.arg("-R");
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iperf3")?;
    // Bounded: a stuck run is killed well after its nominal length.
    let deadline = Instant::now() + Duration::from_secs(seconds + 15);
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("iperf3 to {target} did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 to {target}: no JSON report ({})",
            String::from_utf8_lossy(&out.stderr).trim_end()
        )
    })?;
    if let Some(error) = report.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 to {target}: {error}");
    }
    let received = &report["end"]["sum_received"];
    let field = |name: &str| {
        received[name].as_f64().with_context(|| {
            format!("iperf3 to {target}: no end.sum_received.{name} in the report")
        })
    };
    Ok(Transfer {
        bits_per_second: field("bits_per_second")?,
        bytes: field("bytes")?,
    })
}
