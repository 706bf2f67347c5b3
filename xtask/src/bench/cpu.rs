//! CPU time from /proc: user + system seconds of a proxy's whole process
//! tree, or of this process's threads of one name (the bench's own TLS
//! client and server). Read before and after a measured run, the difference
//! is what the run cost, which the 2 shared cores disturb less than a rate.
//! A proxy's system time is kept apart too: the kernel's work for it (its
//! system calls and the TCP work done in them), which its own code lowers
//! only by making fewer calls and sending fewer packets.

use std::time::Duration;

use super::lab;

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU seconds, in user space and in the kernel.
#[derive(Clone, Copy, Debug)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    pub fn total(self) -> f64 {
        self.user + self.system
    }

    /// What was spent since `before`.
    pub fn since(self, before: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - before.user,
            system: self.system - before.system,
        }
    }
}

/// (utime, stime), in ticks, from a `stat` file's text.
fn stat_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name: state is field 3; utime and stime are 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// CPU time used so far by a process and its live descendants (nginx's
/// and Squid's workers; a process's own figure covers all its threads).
pub fn tree_times(pid: u32) -> CpuTime {
    let (user, system) = lab::tree_pids(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| stat_ticks(&stat))
        .fold((0, 0), |(u, s), (user, system)| (u + user, s + system));
    let hz = clock_ticks();
    CpuTime {
        user: user as f64 / hz,
        system: system as f64 / hz,
    }
}

/// CPU seconds used so far by a process and its live descendants.
pub fn tree_cpu(pid: u32) -> f64 {
    tree_times(pid).total()
}

/// CPU seconds used so far by this process's threads named `name`.
pub fn threads_cpu(name: &str) -> f64 {
    let mut ticks = 0;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let task = entry.path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if comm.trim_end() == name
                && let Ok(stat) = std::fs::read_to_string(task.join("stat"))
            {
                ticks += stat_ticks(&stat).map_or(0, |(user, system)| user + system);
            }
        }
    }
    ticks as f64 / clock_ticks()
}

/// The whole machine's busy CPU seconds so far (every process and the
/// kernel's own work, softirqs included, over all cores) and how many cores
/// there are, from /proc/stat. Over a bulk run it says whether the cores
/// were the limit, and what a byte cost all told on each path.
fn machine_busy() -> Option<(f64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cores = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    busy_ticks(stat.lines().next()?).map(|ticks| (ticks as f64 / clock_ticks(), cores))
}

/// Busy ticks of /proc/stat's `cpu` line: user, nice, system, irq and
/// softirq (guest time is already inside user and nice; idle, iowait and
/// the hypervisor's steal are not work done here).
fn busy_ticks(line: &str) -> Option<u64> {
    let fields: Vec<u64> = line
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(7)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq] = fields[..] else {
        return None;
    };
    Some(user + nice + system + irq + softirq)
}

/// The whole machine's busy CPU over a measured run.
pub struct MachineBusy {
    /// Busy CPU seconds, all cores together.
    pub seconds: f64,
    /// Of all the cores' time (1.0: every core busy throughout).
    pub share: f64,
}

/// Started before a measured run, stopped after it.
pub struct MachineWatch {
    busy: f64,
    cores: usize,
    started: std::time::Instant,
}

impl MachineWatch {
    pub fn start() -> Option<MachineWatch> {
        let (busy, cores) = machine_busy()?;
        Some(MachineWatch {
            busy,
            cores,
            started: std::time::Instant::now(),
        })
    }

    /// Stopped `idle` after the load ended (a pause for closing sockets to
    /// settle): its work counts, its time not in the share of the cores.
    pub fn stop(self, idle: Duration) -> Option<MachineBusy> {
        let elapsed = (self.started.elapsed().saturating_sub(idle)).as_secs_f64();
        let (busy, _) = machine_busy()?;
        let seconds = busy - self.busy;
        Some(MachineBusy {
            seconds,
            share: seconds / (elapsed * self.cores as f64),
        })
    }
}

/// Bytes in a GiB, the unit CPU per byte relayed is given in.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_from_a_stat_line() {
        let stat = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 2 0 5";
        assert_eq!(stat_ticks(stat), Some((250, 75)));
    }

    #[test]
    fn busy_ticks_leave_out_idle_iowait_and_steal() {
        let line = "cpu  100 5 40 1000 7 2 3 1 0 0";
        assert_eq!(busy_ticks(line), Some(100 + 5 + 40 + 2 + 3));
        assert_eq!(busy_ticks("cpu0 1 2 3 4 5 6 7 8"), None);
    }

    #[test]
    fn this_process_has_spent_cpu() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {}
        assert!(tree_times(std::process::id()).user > 0.0);
    }
}
