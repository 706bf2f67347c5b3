//! Least privilege: once its programs are loaded and attached, its routing
//! is in place and its listeners are bound, the daemon keeps only the
//! capabilities it still needs to run and to reload, optionally as an
//! unprivileged user (`--user`).
//!
//! What it keeps ([`KEPT`]), found by experiment on Linux 6.18 (a gateway
//! with client-address binds, reloaded to add a port, an owned prefix, a
//! gateway rule on a new interface and a CONNECT listener on port 80):
//!
//! - `CAP_NET_ADMIN`: the `local` routes, the fwmark rules and their table
//!   (rtnetlink) that a reload changes; `IP_TRANSPARENT` on the listeners a
//!   reload adds and on every upstream connection bound to a client's or a
//!   fixed address (without it those connects fail: `connect_failed`);
//!   attaching `classify` (tcx) to the interfaces a reload, or a new
//!   interface, adds.
//! - `CAP_NET_BIND_SERVICE`: a CONNECT listener on a port below
//!   `net.ipv4.ip_unprivileged_port_start` that a reload adds.
//!
//! What it no longer needs: `CAP_BPF`, `CAP_PERFMON` and `CAP_NET_ADMIN`
//! are what starting takes ([`START`]; `CAP_SYS_ADMIN` is not needed);
//! after that, every map update (rules, sockets, interfaces, this host's
//! addresses), new tcx links and detaching its own links worked with
//! `CAP_NET_ADMIN` alone. No sysctl is written (they are only read, and
//! /proc/sys is readable by anyone), so no `CAP_DAC_OVERRIDE`; the
//! open-files limit is raised before (soft to hard: no
//! `CAP_SYS_RESOURCE`); `CAP_NET_RAW` is not used. Files a reload reads
//! (the policy, certificates, keys, htpasswd files) must be readable by the
//! daemon's user: `CAP_DAC_READ_SEARCH` is dropped too. The uid change
//! makes the process non-dumpable: its /proc files stay root's.
//!
//! One cost: without `CAP_SYS_RESOURCE`, the splice pipes count against
//! the user's `fs.pipe-user-pages-soft` (16384 pages by default, what
//! `relay`'s 256 pipes of 256 KiB take), shared with that user's other
//! processes; past it the kernel refuses larger pipes and new ones get two
//! pages: bulk transfers splice in smaller steps, nothing fails. A user of
//! its own for the daemon keeps the budget its own.
//!
//! The kept capabilities are the permitted and effective sets; inheritable
//! and ambient sets are emptied. The bounding set keeps them too, and, for a
//! daemon that stays root, what a start takes ([`START`], and
//! `CAP_SYS_ADMIN` where it stood in for `CAP_BPF` or `CAP_PERFMON`): `l4proxy
//! upgrade` has the daemon start its successor, which must load and attach
//! its programs (as root, exec regains the bounding set). With `--user`
//! nothing the daemon could exec would regain more than it keeps, and a
//! successor is started by root instead (`run --takeover`). Capabilities are per thread,
//! and the runtime's threads exist by then: every thread makes the change
//! itself, on a signal, as glibc does for `setuid` (see [`drop_to`]). A
//! daemon started without one of [`KEPT`] (say, a service manager's
//! bounding set) runs without it, and a reload that needs it is refused
//! before anything changes ([`check_policy`]).
//!
//! The crash guard, forked before any of this, keeps uid 0 (it needs no
//! other user's files) and only `CAP_NET_ADMIN` ([`GUARD`]): removing
//! routes and routing rules is all it does.

use std::{
    cell::Cell,
    ffi::CString,
    fmt, fs, io,
    sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::policy::Policy;

/// A capability: its number in the kernel's masks, and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    number: u32,
    name: &'static str,
}

pub const CAP_SETGID: Capability = Capability::new(6, "cap_setgid");
pub const CAP_SETUID: Capability = Capability::new(7, "cap_setuid");
pub const CAP_SETPCAP: Capability = Capability::new(8, "cap_setpcap");
pub const CAP_NET_BIND_SERVICE: Capability = Capability::new(10, "cap_net_bind_service");
pub const CAP_NET_ADMIN: Capability = Capability::new(12, "cap_net_admin");
pub const CAP_SYS_ADMIN: Capability = Capability::new(21, "cap_sys_admin");
pub const CAP_PERFMON: Capability = Capability::new(38, "cap_perfmon");
pub const CAP_BPF: Capability = Capability::new(39, "cap_bpf");

impl Capability {
    const fn new(number: u32, name: &'static str) -> Self {
        Self { number, name }
    }

    pub fn name(self) -> &'static str {
        self.name
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// A set of capabilities, as the kernel's 64-bit mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    pub const fn of(caps: &[Capability]) -> Self {
        let mut mask = 0;
        let mut i = 0;
        while i < caps.len() {
            mask |= 1 << caps[i].number;
            i += 1;
        }
        Self(mask)
    }

    pub fn contains(self, cap: Capability) -> bool {
        self.0 & (1 << cap.number) != 0
    }

    fn intersect(self, other: CapSet) -> CapSet {
        CapSet(self.0 & other.0)
    }
}

/// The daemon's capabilities once it runs (see the module's comment).
pub const KEPT: CapSet = CapSet::of(&[CAP_NET_ADMIN, CAP_NET_BIND_SERVICE]);

/// The crash guard's: it only removes routes and routing rules.
pub const GUARD: CapSet = CapSet::of(&[CAP_NET_ADMIN]);

/// What starting the daemon takes (without one of them, loading fails):
/// `CAP_BPF` to create maps and load programs, `CAP_PERFMON` for the
/// verifier to accept `steer`'s stack reads, `CAP_NET_ADMIN` to create the
/// socket map (and for routes, rules and transparent listeners).
pub const START: &[Capability] = &[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN];

/// What `--user` takes on top: changing uid and gid. (`CAP_SETPCAP`, where
/// held, also empties the bounding set; without it that set stays what it
/// was given, which a unit's `CapabilityBoundingSet=` already bounds.)
pub const SWITCH_USER: &[Capability] = &[CAP_SETUID, CAP_SETGID];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--user {0}: no such user in the password database")]
    NoUser(String),
    #[error("--user {name}: looking it up: {error}")]
    Lookup { name: String, error: io::Error },
    #[error("reading this process's capabilities: {0}")]
    Read(io::Error),
    #[error("dropping privileges ({step}): {error}")]
    Drop {
        step: &'static str,
        error: io::Error,
    },
    #[error("--user needs {0}, which this process does not hold; start l4proxy as root")]
    CannotSwitch(&'static str),
    #[error(
        "dropping privileges: thread(s) {0:?} did not take the change; refusing to run with threads that keep root's capabilities"
    )]
    Threads(Vec<i32>),
}

/// An unprivileged user to run as: its uid and its primary group (the only
/// group the daemon keeps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl User {
    /// Looks `name` up in the password database (NSS).
    pub fn lookup(name: &str) -> Result<User, PrivilegeError> {
        let c_name = CString::new(name).map_err(|_| PrivilegeError::NoUser(name.to_owned()))?;
        // SAFETY: a zeroed passwd (null pointers, zero ids) is valid.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let mut buffer = vec![0u8; 16 * 1024];
        // SAFETY: every pointer is valid for the call; the entry's strings
        // point into `buffer`, which is not read here.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut found,
            )
        };
        if rc != 0 {
            return Err(PrivilegeError::Lookup {
                name: name.to_owned(),
                error: io::Error::from_raw_os_error(rc),
            });
        }
        if found.is_null() {
            return Err(PrivilegeError::NoUser(name.to_owned()));
        }
        Ok(User {
            name: name.to_owned(),
            uid: entry.pw_uid,
            gid: entry.pw_gid,
        })
    }
}

/// The capabilities of the calling thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub effective: CapSet,
    pub permitted: CapSet,
}

pub fn held() -> io::Result<Held> {
    held_by(0)
}

/// The capabilities of process `pid` (0: the calling thread).
pub fn held_by(pid: libc::c_int) -> io::Result<Held> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills two data structs for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |low: u32, high: u32| CapSet(u64::from(low) | (u64::from(high) << 32));
    Ok(Held {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
    })
}

/// Whether the calling thread runs under no_new_privs.
fn no_new_privs() -> bool {
    // SAFETY: a query with no pointer argument.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// Whether `held` gives what `cap` allows: `CAP_SYS_ADMIN` still allows
/// what `CAP_BPF` and `CAP_PERFMON` were split from.
pub fn covers(held: CapSet, cap: Capability) -> bool {
    held.contains(cap) || ([CAP_BPF, CAP_PERFMON].contains(&cap) && held.contains(CAP_SYS_ADMIN))
}

/// What of `held` a start takes: [`START`]'s, and `CAP_SYS_ADMIN` where it
/// stands in for `CAP_BPF` or `CAP_PERFMON` (a bounding set that grants it
/// instead), which a successor needs as much.
fn started_with(held: CapSet) -> CapSet {
    let start = CapSet::of(START).intersect(held);
    let stands_in = [CAP_BPF, CAP_PERFMON]
        .iter()
        .any(|&cap| !held.contains(cap));
    if stands_in && held.contains(CAP_SYS_ADMIN) {
        CapSet(start.0 | CapSet::of(&[CAP_SYS_ADMIN]).0)
    } else {
        start
    }
}

/// What a running daemon needs to put `policy` in force, each with why.
pub fn needed(policy: &Policy) -> Vec<(Capability, String)> {
    needed_below(policy, unprivileged_port_start())
}

/// [`needed`], with ports from `first_unprivileged` up open to anyone.
fn needed_below(policy: &Policy, first_unprivileged: u16) -> Vec<(Capability, String)> {
    let mut needed = vec![(
        CAP_NET_ADMIN,
        "routes, routing rules, transparent sockets and tc attachments".to_owned(),
    )];
    let privileged: Vec<String> = policy
        .rules
        .iter()
        .filter_map(|rule| rule.connect.as_ref())
        .flat_map(|connect| &connect.listen)
        .filter(|addr| addr.port() < first_unprivileged)
        .map(ToString::to_string)
        .collect();
    if !privileged.is_empty() {
        needed.push((
            CAP_NET_BIND_SERVICE,
            format!(
                "CONNECT listener(s) {} below net.ipv4.ip_unprivileged_port_start ({first_unprivileged})",
                privileged.join(", ")
            ),
        ));
    }
    needed
}

/// Refuses a policy that needs a capability this process does not hold,
/// before anything is changed for it: the running policy stays.
pub fn check_policy(policy: &Policy) -> Result<(), String> {
    let held = held().map_err(|e| format!("reading this process's capabilities: {e}"))?;
    let missing: Vec<String> = needed(policy)
        .into_iter()
        .filter(|(cap, _)| !held.effective.contains(*cap))
        .map(|(cap, why)| format!("{cap} ({why})"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the policy needs {}, which this daemon does not hold (it keeps only what it held at \
         start-up, of {}); start it with the capability, or change the policy",
        missing.join(" and "),
        names(KEPT)
    ))
}

/// `net.ipv4.ip_unprivileged_port_start` of this network namespace (for
/// both families); 1024 if it cannot be read.
fn unprivileged_port_start() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1024)
}

/// The names of the capabilities in `set`, comma-separated.
pub fn names(set: CapSet) -> String {
    let names: Vec<&str> = (0..64)
        .filter(|&n| set.0 & (1 << n) != 0)
        .map(|n| name_of(n).unwrap_or("cap_?"))
        .collect();
    names.join(",")
}

fn name_of(number: u32) -> Option<&'static str> {
    [
        CAP_SETGID,
        CAP_SETUID,
        CAP_SETPCAP,
        CAP_NET_BIND_SERVICE,
        CAP_NET_ADMIN,
        CAP_SYS_ADMIN,
        CAP_PERFMON,
        CAP_BPF,
    ]
    .iter()
    .find(|cap| cap.number == number)
    .map(|cap| cap.name)
}

/// Keeps only `keep` (of what it holds) in the calling process, which must
/// have a single thread (the crash guard, just forked).
pub fn keep_only(keep: CapSet) -> Result<(), PrivilegeError> {
    let held = held().map_err(PrivilegeError::Read)?;
    let keep = keep.intersect(held.permitted);
    let change = Change {
        keep,
        permitted: keep,
        bounding: held.effective.contains(CAP_SETPCAP),
        bounding_keep: keep,
        user: None,
    };
    change.apply()
}

/// Whether this process may switch to a user (`--user`): `run` asks at
/// start, before it changes anything, so that a daemon (or a successor in a
/// takeover) that could not finish its start-up does not begin it.
pub fn check_switch() -> Result<(), PrivilegeError> {
    can_switch(held().map_err(PrivilegeError::Read)?)
}

fn can_switch(held: Held) -> Result<(), PrivilegeError> {
    for cap in SWITCH_USER {
        if !held.effective.contains(*cap) {
            return Err(PrivilegeError::CannotSwitch(cap.name));
        }
    }
    Ok(())
}

/// Drops every capability but [`KEPT`] (those of it held) on every thread
/// of this process, and switches to `user` if given; returns what is kept.
///
/// Under no_new_privs (systemd's `NoNewPrivileges=yes`) a process gains no
/// capability at exec beyond its permitted set: there a daemon that stays
/// root keeps what a start takes ([`START`]) in its permitted set, not
/// effective, so that the successor `l4proxy upgrade` has it start can
/// load its programs. (Without no_new_privs root regains its bounding set
/// at exec anyway.)
///
/// Each thread has its own credentials, so each thread must make the change
/// itself: the calling thread does it after every other thread did, in a
/// handler of [`change_signal`] (raw system calls only: async-signal-safe). A
/// thread is done when /proc/self/task/TID/status shows the new state;
/// threads started meanwhile by one not yet done are found in the next
/// round.
pub fn drop_to(user: Option<&User>) -> Result<CapSet, PrivilegeError> {
    let held = held().map_err(PrivilegeError::Read)?;
    if user.is_some() {
        can_switch(held)?;
    }
    let keep = KEPT.intersect(held.permitted);
    let for_a_successor = user.is_none() && no_new_privs();
    let start = started_with(held.permitted);
    let change = Change {
        keep,
        permitted: if for_a_successor {
            CapSet(keep.0 | start.0)
        } else {
            keep
        },
        bounding: held.effective.contains(CAP_SETPCAP),
        bounding_keep: match user {
            Some(_) => KEPT,
            None => CapSet(KEPT.0 | CapSet::of(START).0 | start.0),
        },
        user: user.map(|u| (u.uid, u.gid)),
    };
    BROADCAST_KEEP.store(change.keep.0, Ordering::SeqCst);
    BROADCAST_PERMITTED.store(change.permitted.0, Ordering::SeqCst);
    BROADCAST_BOUNDING_KEEP.store(change.bounding_keep.0, Ordering::SeqCst);
    if let Some((uid, gid)) = change.user {
        BROADCAST_UID.store(uid, Ordering::SeqCst);
        BROADCAST_GID.store(gid, Ordering::SeqCst);
    }
    BROADCAST_USER.store(change.user.is_some(), Ordering::SeqCst);
    BROADCAST_BOUNDING.store(change.bounding, Ordering::SeqCst);
    BROADCAST_ERROR.store(0, Ordering::SeqCst);
    let signal = change_signal();
    set_handler(
        signal,
        on_signal as *const () as libc::sighandler_t,
        "installing the handler",
    )?;
    let others = broadcast(signal, &change);
    // A late signal must not run the change again.
    set_handler(signal, libc::SIG_IGN, "removing the handler")?;
    others?;
    change.apply()?;
    Ok(change.keep)
}

/// The signal that asks a thread to make the change (glibc keeps the first
/// two real-time signals for itself, `SIGRTMIN()` is above them).
fn change_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

/// Rounds of signalling the threads not done yet, and how long each round
/// waits for their answers.
const ROUNDS: usize = 20;
const ROUND_WAIT: Duration = Duration::from_secs(1);

fn broadcast(signal: libc::c_int, change: &Change) -> Result<(), PrivilegeError> {
    // SAFETY: plain system calls.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let mut pending = Vec::new();
    for _ in 0..ROUNDS {
        pending = threads()
            .map_err(|error| PrivilegeError::Drop {
                step: "listing this process's threads in /proc/self/task",
                error,
            })?
            .into_iter()
            .filter(|&tid| tid != me && !change.done(tid))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let before = BROADCAST_DONE.load(Ordering::SeqCst);
        let mut sent = 0;
        for &tid in &pending {
            // SAFETY: a signal to a thread of this process; ESRCH (it ended
            // meanwhile) is harmless.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) } == 0 {
                sent += 1;
            }
        }
        let deadline = Instant::now() + ROUND_WAIT;
        while BROADCAST_DONE.load(Ordering::SeqCst) - before < sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let errno = BROADCAST_ERROR.load(Ordering::SeqCst);
        if errno != 0 {
            return Err(PrivilegeError::Drop {
                step: "in another thread",
                error: io::Error::from_raw_os_error(errno),
            });
        }
    }
    Err(PrivilegeError::Threads(pending))
}

/// The thread ids of this process.
fn threads() -> io::Result<Vec<i32>> {
    let mut tids = Vec::new();
    for entry in fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

fn set_handler(
    signal: libc::c_int,
    handler: libc::sighandler_t,
    step: &'static str,
) -> Result<(), PrivilegeError> {
    // SAFETY: a zeroed sigaction is valid; the handler (if any) only makes
    // raw system calls and touches atomics.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(PrivilegeError::Drop {
                step,
                error: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The change the handler makes, shared with it through atomics.
static BROADCAST_KEEP: AtomicU64 = AtomicU64::new(0);
static BROADCAST_PERMITTED: AtomicU64 = AtomicU64::new(0);
static BROADCAST_USER: AtomicBool = AtomicBool::new(false);
static BROADCAST_BOUNDING: AtomicBool = AtomicBool::new(false);
static BROADCAST_BOUNDING_KEEP: AtomicU64 = AtomicU64::new(0);
static BROADCAST_UID: AtomicU32 = AtomicU32::new(0);
static BROADCAST_GID: AtomicU32 = AtomicU32::new(0);
/// Threads that made it, and the first error one of them met.
static BROADCAST_DONE: AtomicUsize = AtomicUsize::new(0);
static BROADCAST_ERROR: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// This thread made the change: a signal of a later round, queued
    /// while it was busy, must not make it again (the ids could not be
    /// set twice).
    static CHANGED: Cell<bool> = const { Cell::new(false) };
}

extern "C" fn on_signal(_: libc::c_int) {
    if CHANGED.get() {
        BROADCAST_DONE.fetch_add(1, Ordering::SeqCst);
        return;
    }
    // SAFETY: errno is thread-local; restored before returning.
    let saved = unsafe { *libc::__errno_location() };
    let change = Change {
        keep: CapSet(BROADCAST_KEEP.load(Ordering::SeqCst)),
        permitted: CapSet(BROADCAST_PERMITTED.load(Ordering::SeqCst)),
        bounding: BROADCAST_BOUNDING.load(Ordering::SeqCst),
        bounding_keep: CapSet(BROADCAST_BOUNDING_KEEP.load(Ordering::SeqCst)),
        user: BROADCAST_USER.load(Ordering::SeqCst).then(|| {
            (
                BROADCAST_UID.load(Ordering::SeqCst),
                BROADCAST_GID.load(Ordering::SeqCst),
            )
        }),
    };
    match change.apply_raw() {
        Ok(()) => CHANGED.set(true),
        Err(errno) => {
            let _ = BROADCAST_ERROR.compare_exchange(0, errno, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
    BROADCAST_DONE.fetch_add(1, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// The credentials one thread changes to.
struct Change {
    /// Effective (and permitted).
    keep: CapSet,
    /// Permitted: `keep`, and what a successor needs under no_new_privs.
    permitted: CapSet,
    /// Whether to drop the rest from the bounding set too: it takes
    /// `CAP_SETPCAP` (a process started without it has a bounding set
    /// someone chose already).
    bounding: bool,
    /// What the bounding set keeps (at least `keep`).
    bounding_keep: CapSet,
    /// uid and gid.
    user: Option<(u32, u32)>,
}

impl Change {
    fn apply(&self) -> Result<(), PrivilegeError> {
        self.apply_raw().map_err(|errno| PrivilegeError::Drop {
            step: "in the main thread",
            error: io::Error::from_raw_os_error(errno),
        })
    }

    /// The change for the calling thread, with raw system calls only (no
    /// allocation, no lock: it runs in a signal handler). Order: the
    /// bounding set while `CAP_SETPCAP` is effective, groups and ids while
    /// `CAP_SETGID`/`CAP_SETUID` are (keeping the permitted set across the
    /// uid change), then the sets.
    fn apply_raw(&self) -> Result<(), i32> {
        let check = |rc: libc::c_long| {
            if rc == -1 {
                // SAFETY: errno is thread-local.
                Err(unsafe { *libc::__errno_location() })
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on values that live across them.
        unsafe {
            for number in 0..64u32 {
                if self.bounding
                    && self.bounding_keep.0 & (1 << number) == 0
                    && libc::prctl(libc::PR_CAPBSET_READ, number) == 1
                {
                    check(libc::prctl(libc::PR_CAPBSET_DROP, number).into())?;
                }
            }
            check(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                )
                .into(),
            )?;
            if let Some((uid, gid)) = self.user {
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0).into())?;
                let groups = [gid];
                check(libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()))?;
                check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
                check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0).into())?;
            }
            let header = CapHeader {
                version: CAP_VERSION_3,
                pid: 0,
            };
            let (low, high) = (self.keep.0 as u32, (self.keep.0 >> 32) as u32);
            let permitted = (self.permitted.0 as u32, (self.permitted.0 >> 32) as u32);
            let data = [
                CapData {
                    effective: low,
                    permitted: permitted.0,
                    inheritable: 0,
                },
                CapData {
                    effective: high,
                    permitted: permitted.1,
                    inheritable: 0,
                },
            ];
            check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()))
        }
    }

    /// Whether thread `tid` shows the change in its status.
    fn done(&self, tid: i32) -> bool {
        let status = match fs::read_to_string(format!("/proc/self/task/{tid}/status")) {
            Ok(status) => status,
            // Gone: nothing left to change.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                return true;
            }
            // Unread (out of descriptors or memory): not known to be done,
            // so it is asked again, and the drop fails if it stays unread.
            Err(_) => return false,
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
        };
        let mask = |name| field(name).and_then(|v| u64::from_str_radix(v, 16).ok());
        let ids_done = match self.user {
            None => true,
            Some((uid, gid)) => {
                let all = |name, id: u32| {
                    field(name).is_some_and(|v| v.split_whitespace().all(|x| x == id.to_string()))
                };
                all("Uid:", uid) && all("Gid:", gid)
            }
        };
        ids_done
            && mask("CapPrm:") == Some(self.permitted.0)
            && mask("CapEff:") == Some(self.keep.0)
            && (!self.bounding
                || mask("CapBnd:").is_some_and(|bounding| bounding & !self.bounding_keep.0 == 0))
    }
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two 32-bit halves.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_policy(port: u16) -> Policy {
        Policy::from_json(&format!(
            r#"{{"intercept": [{{"name": "explicit", "upstream": "direct",
                "connect": {{"listen": ["198.51.100.1:{port}"], "clients": ["198.51.100.0/24"],
                             "destinations": ["203.0.113.0/24"]}}}}],
               "upstreams": {{"direct": {{"original_destination": true}}}}}}"#
        ))
        .unwrap()
    }

    fn caps(needed: &[(Capability, String)]) -> Vec<Capability> {
        needed.iter().map(|(cap, _)| *cap).collect()
    }

    #[test]
    fn a_connect_listener_below_the_unprivileged_ports_needs_net_bind_service() {
        let low = needed_below(&connect_policy(80), 1024);
        assert_eq!(caps(&low), [CAP_NET_ADMIN, CAP_NET_BIND_SERVICE]);
        assert!(low[1].1.contains("198.51.100.1:80"), "{low:?}");
        assert_eq!(
            caps(&needed_below(&connect_policy(3128), 1024)),
            [CAP_NET_ADMIN]
        );
        assert_eq!(
            caps(&needed_below(&connect_policy(80), 80)),
            [CAP_NET_ADMIN]
        );
    }

    #[test]
    fn a_start_on_sys_admin_keeps_it_for_a_successor() {
        let full = CapSet::of(&[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN]);
        assert_eq!(started_with(full), CapSet::of(START));
        let admin = CapSet::of(&[CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SETUID]);
        assert_eq!(
            started_with(admin),
            CapSet::of(&[CAP_SYS_ADMIN, CAP_NET_ADMIN])
        );
    }

    #[test]
    fn sys_admin_covers_what_bpf_and_perfmon_were_split_from() {
        let admin = CapSet::of(&[CAP_SYS_ADMIN]);
        assert!(covers(admin, CAP_BPF) && covers(admin, CAP_PERFMON));
        assert!(!covers(admin, CAP_NET_ADMIN));
        assert_eq!(names(KEPT), "cap_net_bind_service,cap_net_admin");
    }
}
