//! The kernel and routing state a policy needs, set up and kept equal to the
//! policy in force: the BPF maps and where `classify` is attached, the
//! listeners, the `local` routes of the prefixes this host takes, and the
//! policy routing of local delivery.
//!
//! [`Installation::apply`] changes only what differs from what is there. It
//! checks what can be checked (interfaces, kernel settings, room in the rule
//! map) before it changes anything: a policy it refuses leaves the running
//! one in place. A replaced policy's connections keep working: what only
//! they need (local routes, routing rules, `classify` on their interfaces,
//! which marks their packets by socket while `RETAINING` is on) stays until
//! [`Installation::settle`] finds them all closed.
//!
//! A takeover (docs/takeover.md) hands the listeners and the routing state
//! from one daemon to the next: the successor adopts them
//! ([`Installation::adopt_listeners`], [`Installation::adopt_routing`]) and
//! keeps what its predecessor's connections need until the predecessor has
//! exited; the predecessor disowns them ([`Installation::disown`]), so that
//! its exit removes nothing the successor uses.
//!
//! Order matters: listeners go into the socket map, and routes and routing
//! rules go in, before `steer` is attached, so the first steered SYN already
//! finds a socket; `steer` before `classify` marks anything; new rule
//! entries (and their interface pairs) in before stale ones out.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use ipnet::IpNet;
use l4proxy_common::{
    MAX_INTERFACE_RULES, MAX_INTERFACES, MAX_LOCAL_ADDRS, MAX_RULE_ENTRIES, MAX_UPSTREAM_SERVERS,
};
use socket2::{Domain, SockRef, Socket, Type};

use crate::{
    health,
    intercept::{
        ClassifyPlan, ClassifyRole, Family, InterceptError, Interceptor,
        bridge::{self, BridgeUse},
        delivery::{Delivery, DeliveryError, Mark},
        interfaces::{self, Interface},
        routes::{self, LocalRoutes, RouteError},
        rules::{self, Compiled, RuleIndex},
        sysctl,
    },
    kernel_version,
    local_addrs::{self, LocalAddrs, LocalAddrsError},
    metrics::Metrics,
    policy::{Bind, InterceptRule, Keepalive, Policy, RuleId, Target},
    session::Active,
    upstream,
};

const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Intercept(#[from] InterceptError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    LocalAddrs(#[from] LocalAddrsError),
    #[error("creating the {family:?} listener: {source}")]
    Listen { family: Family, source: io::Error },
    #[error("{path}: no interface {name:?} in this network namespace")]
    NoInterface { path: String, name: String },
    #[error(
        "{path}: interface {name:?} is a port of {master:?} (a bond or VRF): its IP traffic arrives on {master:?}; list that instead"
    )]
    Enslaved {
        path: String,
        name: String,
        master: String,
    },
    #[error("this host is not set up for the policy:\n  {}", .0.join("\n  "))]
    Sysctl(Vec<String>),
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Kernel(String),
    #[error("{}", .0.join("; "))]
    Unreachable(Vec<String>),
    #[error(
        "the rule map would hold {peak} entries while the new policy replaces the running one, more than its {MAX_RULE_ENTRIES}; restart l4proxy with the new policy instead"
    )]
    TooManyEntries { peak: usize },
    #[error(
        "gateway rules need {peak} (interface, rule) pairs in the kernel (a bridge counts each of its ports too), more than its {MAX_INTERFACE_RULES}, while the new policy replaces the running one; list fewer interfaces, or restart l4proxy with the new policy"
    )]
    TooManyInterfacePairs { peak: usize },
    #[error(
        "the tc program would run on {peak} interfaces while the new policy replaces the running one, more than its map's {MAX_INTERFACES}; list fewer interfaces (a policy binding to client addresses takes them all), or restart l4proxy with the new policy"
    )]
    TooManyInterfaces { peak: usize },
    #[error(
        "the upstream servers' map would hold {peak} addresses while the new policy replaces the running one, more than its {MAX_UPSTREAM_SERVERS}; restart l4proxy with the new policy instead"
    )]
    TooManyUpstreamServers { peak: usize },
    #[error(
        "this host's addresses in the kernel (for gateway rules) would be {peak} prefixes, more than its {MAX_LOCAL_ADDRS}: with those the new policy makes local count those of policies still serving (a replaced policy's until its connections end; in a takeover, the running daemon's); reload once they have ended, or stop l4proxy and start it with the new policy"
    )]
    TooManyLocalAddresses { peak: usize },
}

/// Everything this daemon set up in its network namespace.
pub struct Installation {
    interceptor: Interceptor,
    /// Given to the listeners, so accepted connections have it.
    keepalive: Keepalive,
    /// How many listeners a family's reuseport group has at least: one per
    /// worker (`workers`).
    workers: usize,
    /// The steered listeners, by family (IPv4, IPv6), the first of each the
    /// one in the socket map: copies of their descriptors, to hand over in
    /// a takeover.
    listening: [Vec<OwnedFd>; 2],
    /// A predecessor's steered listeners (a takeover), until this daemon's
    /// policy is in force ([`Installation::join_adopted`]).
    adopted: Vec<(usize, Family, Vec<TcpListener>)>,
    local_routes: LocalRoutes,
    delivery: Delivery,
    local: Arc<LocalAddrs>,
    /// `steer` is attached once the first policy is in.
    attached: bool,
    /// A successor's programs wait for its predecessor to stop accepting
    /// ([`Installation::hold_programs`]).
    held: bool,
    /// The policy in force.
    current: Option<Generation>,
    /// Policies a reload replaced whose connections may still be open: what
    /// they need from the kernel is kept until they are gone.
    older: Vec<Generation>,
    /// Where each policy's connections are counted.
    metrics: Arc<Metrics>,
    /// The upstream servers' health and load, kept across policies.
    health: health::Registry,
    /// What a predecessor (a takeover) installed for its connections, kept
    /// until it has exited.
    inherited: Option<Routing>,
}

/// The routes and routing rules a daemon added (not fd-owned: they outlive
/// it), as handed over in a takeover.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Routing {
    /// `local` routes of owned prefixes.
    pub prefixes: Vec<IpNet>,
    /// The fwmark rules and the delivery table's routes.
    pub delivery: bool,
    /// Rules for the replies of servers on this host.
    pub local_servers: Vec<SocketAddr>,
}

/// A policy and what it needs from this host.
struct Generation {
    active: Arc<Active>,
    rules: Compiled,
    needs: Needs,
    /// When a reload replaced it (`None`: in force).
    replaced: Option<std::time::Instant>,
}

/// How long a replaced policy is kept at least, connections or not: a
/// client the kernel steered by it may still wait in an accept queue, and
/// is served under it once accepted, if it is the policy replaced last
/// (`session::Shared::rule_for` looks at that one only).
const REPLACED_KEPT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a policy needs that depends on this host (its interfaces and
/// addresses) as well as on the policy.
struct Needs {
    /// Prefixes made local (rules without `interfaces`).
    owned: Vec<IpNet>,
    /// Upstream servers on this host connected to from other addresses.
    local_servers: Vec<SocketAddr>,
    classify: Vec<ClassifyPlan>,
    /// Bridges gateway rules intercept on (for the start-up checks).
    bridges: Vec<BridgeUse>,
    /// Gateway rules route IPv4 / IPv6 (for the start-up checks).
    routed_v4: bool,
    routed_v6: bool,
}

impl Needs {
    /// The fwmark rule and its table: for marked packets, or for the
    /// replies of local servers.
    fn delivery(&self) -> bool {
        !self.classify.is_empty() || !self.local_servers.is_empty()
    }
}

/// The prefixes the daemon makes local for `needs` (policies in force and
/// replaced ones still serving) and for what it took over, each once.
fn all_owned<'a>(needs: impl Iterator<Item = &'a Needs>, inherited: &[IpNet]) -> Vec<IpNet> {
    let mut owned: Vec<IpNet> = needs
        .flat_map(|needs| needs.owned.iter().copied())
        .chain(inherited.iter().copied())
        .collect();
    owned.sort();
    owned.dedup();
    owned
}

/// Whether `policy` has gateway rules, which read the kernel's copy of this
/// host's addresses.
fn has_gateway(policy: &Policy) -> bool {
    policy.rules.iter().any(InterceptRule::is_gateway)
}

/// Entries of the kernel's `LOCAL_ADDRS` for this host's own `host_keys`
/// and the prefixes `owned`, each key once (an IPv6 prefix that holds the
/// IPv4-mapped range is several, and nested ones share some). The map's
/// contents only grow during a change: the replaced policies' prefixes
/// stay until their connections end.
fn local_addrs_peak(host_keys: usize, owned: &[IpNet]) -> usize {
    let keys: std::collections::HashSet<(u128, u8)> = owned
        .iter()
        .flat_map(|&prefix| crate::lpm::prefix_keys(prefix))
        .collect();
    host_keys + keys.len()
}

/// What applying a policy produced.
pub struct Applied {
    /// The policy in force, for new connections.
    pub active: Arc<Active>,
    /// Listeners created for it, by family, for the caller to accept on.
    pub new_listeners: Vec<(Family, TcpListener)>,
}

impl Installation {
    /// Loads the programs and reads this host's addresses; sets up nothing
    /// a policy asks for yet.
    /// `keepalive`: what the listeners give every accepted connection;
    /// `workers`: how many listeners each family's group has at least.
    pub async fn new(
        mark: Mark,
        routing_table: u32,
        keepalive: Keepalive,
        workers: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, InstallError> {
        let (mut interceptor, mut local_map) = Interceptor::load(mark)?;
        if let Some(log) = interceptor.take_kernel_log() {
            tokio::spawn(log.forward());
        }
        let sink: local_addrs::Sink = Box::new(move |prefixes| {
            if let Err(e) = local_map.set(prefixes) {
                tracing::warn!(error = %e, "updating this host's addresses in the kernel");
            }
        });
        let local = LocalAddrs::load(Some(sink)).await?;
        Ok(Self {
            interceptor,
            keepalive,
            workers,
            listening: [Vec::new(), Vec::new()],
            adopted: Vec::new(),
            local_routes: LocalRoutes::default(),
            delivery: Delivery::new(mark, routing_table)?,
            local,
            attached: false,
            held: false,
            current: None,
            older: Vec::new(),
            metrics,
            health: health::Registry::default(),
            inherited: None,
        })
    }

    /// Where each policy's connections are counted.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The kernel programs' counters now, by name (empty if they cannot be
    /// read: the error is logged).
    pub fn kernel_counters(&self) -> Vec<(&'static str, u64)> {
        match self.interceptor.counters() {
            Ok(counters) => counters.iter().map(|(c, n)| (c.name(), *n)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading kernel counters");
                Vec::new()
            }
        }
    }

    /// This host's addresses, kept current.
    pub fn local_addrs(&self) -> &Arc<LocalAddrs> {
        &self.local
    }

    /// Puts `policy` in force. Refuses, changing nothing, a policy whose
    /// interfaces are missing, whose kernel settings are wrong, or that does
    /// not fit the rule map beside the running one. What the replaced policy
    /// needs stays until its connections are gone ([`Installation::settle`]).
    /// If a change fails part way, the replaced policy is put back (as far
    /// as it goes) and the error returned. `announce` is handed the new
    /// policy just before the kernel may steer by it.
    pub async fn apply(
        &mut self,
        policy: Policy,
        announce: impl FnOnce(&Arc<Active>),
    ) -> Result<Applied, InstallError> {
        let HostCheck { needs, findings } = check_host(&policy, &self.local).await?;
        for warning in &findings.warnings {
            tracing::warn!("{warning}");
        }
        if !findings.errors.is_empty() {
            return Err(InstallError::Sysctl(findings.errors));
        }
        let mut unreachable = unreachable_listeners(&policy, &self.local, &needs.owned);
        unreachable.extend(unanswered_tunnels(&policy, &self.local, &needs.owned));
        if !unreachable.is_empty() {
            return Err(InstallError::Unreachable(unreachable));
        }
        // Before anything changes: attaching the tc program is the last step.
        if !needs.classify.is_empty()
            && let Some(why) = kernel_version::tcx_missing(&kernel_version::release())
        {
            return Err(InstallError::Kernel(why));
        }
        for planned in &needs.classify {
            planned.l2_len()?;
        }
        let compiled = rules::compile(&policy);
        let peak = self.interceptor.peak_rule_entries(&compiled);
        if peak > MAX_RULE_ENTRIES as usize {
            return Err(InstallError::TooManyEntries { peak });
        }
        let peak = self.interceptor.peak_interface_pairs(&needs.classify);
        if peak > MAX_INTERFACE_RULES as usize {
            return Err(InstallError::TooManyInterfacePairs { peak });
        }
        let peak = self.interceptor.peak_interfaces(&needs.classify);
        if peak > MAX_INTERFACES as usize {
            return Err(InstallError::TooManyInterfaces { peak });
        }
        let peak = self
            .interceptor
            .peak_upstream_servers(&upstream_servers(&policy));
        if peak > MAX_UPSTREAM_SERVERS as usize {
            return Err(InstallError::TooManyUpstreamServers { peak });
        }
        // The kernel's copy of this host's addresses holds every policy's
        // own prefixes while one still serves, when gateway rules read it.
        let serving = self.current.iter().chain(&self.older);
        if has_gateway(&policy) || serving.clone().any(|g| has_gateway(&g.active.policy)) {
            let inherited = self.inherited.as_ref().map_or(&[][..], |r| &r.prefixes);
            let owned = all_owned(serving.map(|g| &g.needs).chain([&needs]), inherited);
            let peak = local_addrs_peak(self.local.host_keys(), &owned);
            if peak > MAX_LOCAL_ADDRS as usize {
                return Err(InstallError::TooManyLocalAddresses { peak });
            }
        }
        for warning in rules::unreachable(&policy, &compiled) {
            tracing::warn!("{warning}");
        }

        let active = Arc::new(
            Active::new(
                policy,
                RuleIndex::new(&compiled),
                &self.metrics,
                &self.health,
            )
            .map_err(InstallError::Tls)?,
        );
        let (new_listeners, families) = self.listen(&active.policy)?;
        let generation = Generation {
            active: active.clone(),
            rules: compiled,
            needs,
            replaced: None,
        };
        let replaced = self.current.replace(generation);
        self.older.extend(replaced.map(|old| Generation {
            replaced: Some(std::time::Instant::now()),
            ..old
        }));
        announce(&active);
        if let Err(e) = self.enforce().await {
            // Back to the replaced policy, if there was one.
            self.current = self.older.pop().map(|old| Generation {
                replaced: None,
                ..old
            });
            if self.current.is_some()
                && let Err(undo) = self.enforce().await
            {
                tracing::error!(error = %undo, "putting the replaced policy back");
            }
            return Err(e);
        }
        for (slot, fds) in families {
            self.listening[slot] = fds;
        }
        // Only once it is in force: a refused policy leaves the checks as
        // they were.
        self.health.update(&active.policy);
        Ok(Applied {
            active,
            new_listeners,
        })
    }

    /// The host changed (an interface or an address came or went): what the
    /// policies in force need of it is worked out again and applied.
    pub async fn refresh(&mut self) -> Result<(), InstallError> {
        self.local.reload().await?;
        if let Some(current) = &self.current {
            let policy = current.active.policy.clone();
            let needs = needs(&policy, &self.local, Listed::AsTheyAre).await?;
            if let Some(current) = &mut self.current {
                current.needs = needs;
            }
        }
        self.enforce().await
    }

    /// Forgets replaced policies none of whose connections are open any
    /// more (and replaced at least `REPLACED_KEPT` ago), and removes what
    /// only they needed.
    pub async fn settle(&mut self) -> Result<(), InstallError> {
        let before = self.older.len();
        // Strong count 1: only this list holds it; no session does.
        self.older.retain(|generation| {
            Arc::strong_count(&generation.active) > 1
                || generation
                    .replaced
                    .is_some_and(|at| at.elapsed() < REPLACED_KEPT)
        });
        if self.older.len() == before {
            return Ok(());
        }
        tracing::info!(
            still_open = self.older.len(),
            "replaced policies without open connections forgotten"
        );
        self.enforce().await
    }

    /// Makes the kernel state that of the current policy, plus what older
    /// ones with open connections still need: new entries in before stale
    /// ones out, and `steer` attached before `classify` marks anything.
    async fn enforce(&mut self) -> Result<(), InstallError> {
        let Some(current) = &self.current else {
            return Ok(());
        };
        let generations: Vec<&Generation> = std::iter::once(current).chain(&self.older).collect();
        let inherited = self.inherited.clone().unwrap_or_default();
        let owned = all_owned(generations.iter().map(|g| &g.needs), &inherited.prefixes);
        let mut local_servers: Vec<SocketAddr> = generations
            .iter()
            .flat_map(|g| g.needs.local_servers.iter().copied())
            .chain(inherited.local_servers)
            .collect();
        local_servers.sort();
        local_servers.dedup();
        let delivery = inherited.delivery || generations.iter().any(|g| g.needs.delivery());
        // The kernel reads LOCAL_ADDRS only for gateway rules: the entries of
        // the rules in force and of replaced ones still serving.
        let gateway = generations.iter().any(|g| has_gateway(&g.active.policy));
        let classify = self.classify_plan();
        let compiled = current.rules.clone();
        let upstream_servers = upstream_servers(&current.active.policy);
        let retaining = !self.older.is_empty();

        // The routes are added while the maps are written: each takes a
        // second or more at 100 000 prefixes, on a core of its own.
        let adding = self.local_routes.begin(&owned)?;
        let written = async {
            self.local.set_owned(&owned, gateway).await?;
            self.delivery.set(delivery, &local_servers).await?;
            self.interceptor.set_retaining(retaining)?;
            self.interceptor.set_upstream_servers(upstream_servers)?;
            self.interceptor.prepare_classify(&classify)?;
            self.interceptor.set_rules(&compiled)?;
            Ok::<_, InstallError>(())
        }
        .await;
        let routed = self.local_routes.finish(adding).await;
        written?;
        routed?;
        if !self.held {
            self.run_programs(&classify)?;
        }
        tracing::info!(
            kernel_entries = self.interceptor.rule_entries(),
            routes = self.local_routes.added().len(),
            tc_interfaces = ?self.interceptor.classify_interfaces(),
            local_servers = ?local_servers,
            retaining,
            "kernel state set"
        );
        Ok(())
    }

    /// Where `classify` runs: the current policy's interfaces, and those
    /// of replaced policies still serving.
    fn classify_plan(&self) -> Vec<ClassifyPlan> {
        match &self.current {
            Some(current) => with_older_interfaces(
                &current.needs.classify,
                self.older.iter().map(|g| g.needs.classify.as_slice()),
            ),
            None => Vec::new(),
        }
    }

    /// `steer` attached (once), and `classify` moved to `classify`.
    fn run_programs(&mut self, classify: &[ClassifyPlan]) -> Result<(), InstallError> {
        self.attach_steer()?;
        Ok(self.interceptor.finish_classify(classify)?)
    }

    fn attach_steer(&mut self) -> Result<(), InstallError> {
        if !self.attached {
            self.interceptor.attach()?;
            self.attached = true;
        }
        Ok(())
    }

    /// A successor's policy goes into its maps, its routes and listeners
    /// are set up, but its programs are attached only by
    /// [`Installation::run_held_programs`], once its predecessor has
    /// stopped accepting: until then that daemon takes the connections its
    /// own programs steer, and would close one that only this policy has a
    /// rule for.
    pub fn hold_programs(&mut self) {
        self.held = true;
    }

    /// Attaches what [`Installation::hold_programs`] held back; the error
    /// is `steer`'s (which the next change of policy or host tries
    /// again). An interface `classify` cannot be attached to is logged:
    /// it is one interface, as in a reload, and the predecessor's
    /// `classify` could not run there either.
    pub fn run_held_programs(&mut self) -> Result<(), InstallError> {
        self.held = false;
        self.attach_steer()?;
        if let Err(e) = self.interceptor.finish_classify(&self.classify_plan()) {
            tracing::error!(error = %e, "takeover: attaching classify; the other interfaces are intercepted");
        }
        Ok(())
    }

    /// A reuseport group of listeners, one per worker, per family the
    /// policy's rules take and that has none yet, bound to loopback on a
    /// free port (`sk_lookup` assigns the first, and the kernel picks
    /// within its group, whatever the connection's destination).
    /// Transparent: a gateway connection's local address is not this
    /// host's, and the kernel sends the SYN-ACK from it only for a
    /// transparent socket. Returns them with their family slots (and
    /// copies of their descriptors), to be marked as listening once the
    /// policy is in.
    #[expect(
        clippy::type_complexity,
        reason = "one private caller, which splits the pair at once"
    )]
    fn listen(
        &mut self,
        policy: &Policy,
    ) -> Result<(Vec<(Family, TcpListener)>, Vec<(usize, Vec<OwnedFd>)>), InstallError> {
        let mut listeners = Vec::new();
        let mut slots = Vec::new();
        for (slot, family, addr) in [
            (0, Family::V4, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            (1, Family::V6, SocketAddr::from((Ipv6Addr::LOCALHOST, 0))),
        ] {
            let wanted = policy
                .rules
                .iter()
                .flat_map(|rule| &rule.prefixes)
                .any(|prefix| prefix.addr().is_ipv4() == addr.is_ipv4());
            if !wanted || !self.listening[slot].is_empty() {
                continue;
            }
            let listen_error = |source| InstallError::Listen { family, source };
            let first = listen(addr, self.keepalive, Role::Steered).map_err(listen_error)?;
            self.interceptor.set_listener(family, &first)?;
            let group = fill_group(vec![first], self.keepalive, Role::Steered, self.workers)
                .map_err(listen_error)?;
            let fds = copies(&group).map_err(listen_error)?;
            listeners.extend(group.into_iter().map(|listener| (family, listener)));
            slots.push((slot, fds));
        }
        Ok((listeners, slots))
    }

    /// The steered listeners, by family, for a successor (a takeover).
    pub fn listeners(&self) -> Vec<(Family, &OwnedFd)> {
        [Family::V4, Family::V6]
            .into_iter()
            .zip(&self.listening)
            .flat_map(|(family, fds)| fds.iter().map(move |fd| (family, fd)))
            .collect()
    }

    /// Puts a predecessor's steered listeners (a takeover) in the socket
    /// map (the first of each family), and keeps them for
    /// [`Installation::join_adopted`]. Nothing about them changes yet: the
    /// predecessor serves on them until this daemon's policy is in force.
    pub fn adopt_listeners(
        &mut self,
        handed: Vec<(Family, TcpListener)>,
    ) -> Result<(), InstallError> {
        let (v4, v6): (Vec<_>, Vec<_>) = handed
            .into_iter()
            .partition(|(family, _)| matches!(family, Family::V4));
        for (slot, family, group) in [(0, Family::V4, v4), (1, Family::V6, v6)] {
            let listen_error = |source| InstallError::Listen { family, source };
            let group: Vec<TcpListener> = group.into_iter().map(|(_, listener)| listener).collect();
            let Some(first) = group.first() else {
                continue;
            };
            self.interceptor.set_listener(family, first)?;
            // The family has its listeners: a policy binds no others.
            self.listening[slot] = copies(&group).map_err(listen_error)?;
            self.adopted.push((slot, family, group));
        }
        Ok(())
    }

    /// Once this daemon's policy is in force: gives the adopted listeners
    /// this daemon's keepalive for the connections they accept, and adds to
    /// each family's group up to one per worker; returns them all for the
    /// caller to accept on. (Done earlier, a start that then failed would
    /// have left the predecessor's listeners with its settings, and reset
    /// the connections the kernel had queued on the members it added.)
    pub fn join_adopted(&mut self) -> Result<Vec<(Family, TcpListener)>, InstallError> {
        let mut listeners = Vec::new();
        for (slot, family, group) in std::mem::take(&mut self.adopted) {
            let listen_error = |source| InstallError::Listen { family, source };
            for listener in &group {
                set_inherited(SockRef::from(listener), self.keepalive, Role::Steered)
                    .map_err(listen_error)?;
            }
            let group = fill_group(group, self.keepalive, Role::Steered, self.workers)
                .map_err(listen_error)?;
            self.listening[slot] = copies(&group).map_err(listen_error)?;
            listeners.extend(group.into_iter().map(|listener| (family, listener)));
        }
        Ok(listeners)
    }

    /// The routes and routing rules this daemon owns now.
    pub fn routing(&self) -> Routing {
        Routing {
            prefixes: self.local_routes.added().to_vec(),
            delivery: self.delivery.installed(),
            local_servers: self.delivery.servers(),
        }
    }

    /// Takes a predecessor's routes and rules (a takeover) as this daemon's,
    /// and keeps them at least until [`Installation::predecessor_gone`]:
    /// the predecessor's connections need them while it drains.
    pub fn adopt_routing(&mut self, routing: Routing) {
        self.local_routes.adopt(&routing.prefixes);
        self.delivery
            .adopt(routing.delivery, &routing.local_servers);
        self.inherited = Some(routing);
    }

    /// Forgets `routing`: its routes and rules stay in place for whoever
    /// owns them now (the successor after a takeover; the predecessor when
    /// a takeover failed), and [`Installation::remove`] leaves them.
    pub fn disown(&mut self, routing: &Routing) {
        self.local_routes.disown(&routing.prefixes);
        self.delivery
            .disown(routing.delivery, &routing.local_servers);
        self.inherited = None;
    }

    /// A successor's takeover failed: removes the routes and rules of ours
    /// that this daemon does not own, those the successor added for its
    /// policy. One that exits removes them itself; one that was killed
    /// (its guard not armed yet: the routes were ours) would leave them,
    /// a service prefix made local with no listener, a local server's
    /// replies turned to a proxy that is not there. Returns how many.
    pub async fn remove_unowned(&self) -> Result<usize, InstallError> {
        let keep_route = self.local_routes.keeps();
        let removed = routes::remove_ours_except(
            |route| keep_route(route) || self.delivery.keeps_route(route),
            |rule| self.delivery.keeps_rule(rule),
        )
        .await?;
        Ok(removed)
    }

    /// A takeover failed: what the predecessor handed over is its own again.
    pub fn release_inherited(&mut self) {
        if let Some(routing) = self.inherited.take() {
            self.disown(&routing);
        }
    }

    /// The predecessor has exited: what only its connections needed goes.
    pub async fn predecessor_gone(&mut self) -> Result<(), InstallError> {
        if self.inherited.take().is_some() {
            self.enforce().await?;
        }
        Ok(())
    }

    /// Takes no new connection, keeps delivering the open ones' packets.
    pub fn drain(&mut self) -> Result<(), InstallError> {
        Ok(self.interceptor.drain()?)
    }

    /// Lets go of the steered listeners (the accept loops hold their own
    /// until they have read the queues): a handshake that completes after
    /// that, its SYN steered before the drain, is refused then, not left in
    /// a queue nobody reads until the grace period ends. A successor holds
    /// its own.
    pub fn close_listeners(&mut self) {
        self.listening = [Vec::new(), Vec::new()];
    }

    /// Detaches the programs, logs their counters, removes the routes and
    /// rules: every step is tried, the first error returned.
    pub async fn remove(&mut self) -> Result<(), InstallError> {
        let detached = self.interceptor.detach().map_err(InstallError::from);
        log_counters(self);
        let delivery = self.delivery.remove().await.map_err(InstallError::from);
        let routes = self.local_routes.remove().await.map_err(InstallError::from);
        detached.and(delivery).and(routes)
    }
}

/// What a missing (or enslaved) interface a rule lists means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listed {
    /// The policy is refused (putting it in force).
    Required,
    /// It is left out until it is back, with a warning (following a
    /// host change: the rest of the host is still followed).
    AsTheyAre,
}

/// What `policy` needs of this host now, `local` being its addresses.
async fn needs(policy: &Policy, local: &LocalAddrs, listed: Listed) -> Result<Needs, InstallError> {
    let owned = owned_prefixes(policy);
    let is_local = |ip: IpAddr| local_under(local, &owned, ip);
    let all = interfaces::list().await?;
    Ok(Needs {
        classify: classify_plan(policy, &all, &is_local, listed)?,
        bridges: bridge_uses(policy, &all),
        routed_v4: routed_family(policy, &all, true),
        routed_v6: routed_family(policy, &all, false),
        local_servers: local_transparent_servers(policy, &is_local),
        owned,
    })
}

/// What a policy needs of this host, and what the kernel settings say of it.
pub struct HostCheck {
    needs: Needs,
    pub findings: sysctl::Findings,
}

impl HostCheck {
    /// Whether `classify` (tc) runs anywhere for the policy.
    pub fn uses_tc(&self) -> bool {
        !self.needs.classify.is_empty()
    }
}

/// The checks [`Installation::apply`] makes of this host before it changes
/// anything for `policy` (`local` being the host's addresses), also run by
/// `l4proxy doctor`: the interfaces it names (an error), then the kernel
/// settings (in the findings).
pub async fn check_host(policy: &Policy, local: &LocalAddrs) -> Result<HostCheck, InstallError> {
    let needs = needs(policy, local, Listed::Required).await?;
    // The bridges too: what `classify` takes on a port goes up the stack
    // (and through its reverse-path check) on the bridge.
    let marking: Vec<String> = needs
        .classify
        .iter()
        .map(|p| p.interface.name.clone())
        .chain(needs.bridges.iter().map(|b| b.name.clone()))
        .collect();
    let mut bridges = Vec::new();
    for bridge in &needs.bridges {
        let nf_call = interfaces::bridge_nf_call(bridge.index).await?;
        bridges.push(sysctl::Bridged { bridge, nf_call });
    }
    let mut findings = sysctl::check(&sysctl::Plan {
        gateway_v4: needs.routed_v4,
        gateway_v6: needs.routed_v6,
        marking: &marking,
        bridges: &bridges,
    });
    for bridge in &needs.bridges {
        let addresses = interfaces::addresses(bridge.index).await?;
        findings
            .errors
            .extend(bridge::missing_addresses(bridge, &addresses));
    }
    Ok(HostCheck { needs, findings })
}

/// The CONNECT listeners whose address is not this host's once `policy` is
/// in force (`owned`: the prefixes it makes local): an address of an
/// interface, in `owned`, or one the host's routes make local (an operator's
/// `local` route) — but not one only a prefix of the running policies makes
/// local, which goes when they do. The listeners are bound before the
/// policy's routes exist (`IP_FREEBIND`), so this is where such an address
/// is found out, before anything changes.
fn unreachable_listeners(policy: &Policy, local: &LocalAddrs, owned: &[IpNet]) -> Vec<String> {
    let bindable = |ip: IpAddr| {
        let addr = SocketAddr::new(ip, 0);
        Socket::new(Domain::for_address(addr), Type::STREAM, None)
            .and_then(|socket| socket.bind(&addr.into()))
            .is_ok()
    };
    let ours_only = |ip: IpAddr| local.contains(ip) && !local.is_host_address(ip);
    let reachable = |ip: IpAddr| local_under(local, owned, ip) || (!ours_only(ip) && bindable(ip));
    let mut unreachable = Vec::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        let Some(front) = &rule.connect else {
            continue;
        };
        for (k, addr) in front.listen.iter().enumerate() {
            if !reachable(addr.ip()) {
                unreachable.push(format!(
                    "intercept[{i}].connect.listen[{k}]: {} is not an address of this host, nor \
                     in a prefix the policy makes local: no client could reach the listener",
                    addr.ip()
                ));
            }
        }
    }
    unreachable
}

/// Routes and rules a crashed daemon left in this namespace, removed.
pub async fn remove_leftovers() -> Result<(), InstallError> {
    let leftovers = routes::remove_leftovers().await?;
    if leftovers > 0 {
        tracing::warn!(
            routes = leftovers,
            "removed routes and rules left by an earlier daemon"
        );
    }
    Ok(())
}

/// What a listener is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Steered connections: transparent (it may accept connections to
    /// addresses that are not this host's, on a gateway), and in a
    /// reuseport group with the other workers' listeners.
    Steered,
    /// CONNECT clients, on the address a rule lists, in a reuseport group
    /// with the other workers' listeners of that address.
    Connect,
}

/// A non-blocking listener on `addr`, for a worker to accept on (it
/// registers it with its own runtime).
pub(crate) fn listen(
    addr: SocketAddr,
    keepalive: Keepalive,
    role: Role,
) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        // Each family has its own listener; never see IPv4-mapped addresses.
        socket.set_only_v6(true)?;
    }
    match (role, addr.is_ipv6()) {
        (Role::Steered, true) => socket.set_ip_transparent_v6(true)?,
        (Role::Steered, false) => socket.set_ip_transparent_v4(true)?,
        // Bound before the policy's own routes make the address local, at
        // a reload; `Installation::apply` has made sure it will be.
        (Role::Connect, true) => socket.set_freebind_v6(true)?,
        (Role::Connect, false) => socket.set_freebind_v4(true)?,
    }
    // The kernel lets only sockets of the same user join a reuseport group:
    // those created at start-up are root's.
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    // Accepted sockets inherit it: a setsockopt here instead of on every
    // connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    // After `listen`, which resets the ACK mode.
    set_inherited(SockRef::from(&socket), keepalive, role)?;
    Ok(socket.into())
}

/// Sets on a listening socket what the sockets it accepts inherit, instead
/// of a setsockopt on every connection: the daemon's keepalive and, on a
/// CONNECT listener, delayed ACKs (HAProxy's `tcp-smart-accept`). A CONNECT
/// client sends its head and waits for the answer, so the head's ACK rides
/// on the answer instead of going alone; after it the kernel's own rules
/// apply. (A head that comes in pieces is acknowledged piece by piece:
/// `tunnel::read_head`.) Not on steered listeners: their clients' first
/// bytes may be anything, from clients that write more small pieces
/// before any answer, which Nagle's algorithm would hold for the ACK.
pub(crate) fn set_inherited(
    socket: SockRef<'_>,
    keepalive: Keepalive,
    role: Role,
) -> io::Result<()> {
    upstream::set_keepalive(&socket, keepalive)?;
    if role == Role::Connect {
        socket.set_tcp_quickack(false)?;
    }
    Ok(())
}

/// `group` and, if it has fewer than `workers`, listeners of `role` bound
/// into its reuseport group up to that. A group whose sockets lack
/// `SO_REUSEPORT` (handed over by an older daemon) cannot grow: its
/// listeners are shared out among the workers as they are.
pub(crate) fn fill_group(
    mut group: Vec<TcpListener>,
    keepalive: Keepalive,
    role: Role,
    workers: usize,
) -> io::Result<Vec<TcpListener>> {
    let addr = group[0].local_addr()?;
    if !SockRef::from(&group[0]).reuse_port()? {
        tracing::info!(
            %addr,
            listeners = group.len(),
            workers,
            "the handed listeners are not a reuseport group: the workers share them"
        );
        return Ok(group);
    }
    while group.len() < workers {
        group.push(listen(addr, keepalive, role)?);
    }
    Ok(group)
}

/// Copies of the listeners' descriptors.
pub(crate) fn copies(listeners: &[TcpListener]) -> io::Result<Vec<OwnedFd>> {
    listeners
        .iter()
        .map(|listener| listener.as_fd().try_clone_to_owned())
        .collect()
}

/// Where `classify` goes, and what it does there: every interface a gateway
/// rule lists (with those rules; for a bridge, also each of its ports, where
/// bridged traffic is seen), and, when some upstream connection is made
/// from an address that is not this host's own (a client's, or a fixed one),
/// every interface but loopback whose packets it can read, since a server's
/// replies may come in on any.
fn classify_plan(
    policy: &Policy,
    all: &[Interface],
    is_local: &impl Fn(IpAddr) -> bool,
    listed_as: Listed,
) -> Result<Vec<ClassifyPlan>, InstallError> {
    let mut plan: Vec<ClassifyPlan> = Vec::new();
    let mut plan_on = |interface: &Interface, rule: Option<usize>| {
        let planned = match plan.iter_mut().position(|p| &p.interface == interface) {
            Some(at) => &mut plan[at],
            None => {
                plan.push(ClassifyPlan {
                    interface: interface.clone(),
                    role: ClassifyRole {
                        intercept: false,
                        replies: false,
                    },
                    rules: Vec::new(),
                    bridge: bridge::bridge_of(interface, all),
                });
                plan.last_mut().expect("just pushed")
            }
        };
        match rule {
            Some(r) => {
                planned.role.intercept = true;
                planned.rules.push(r);
            }
            None => planned.role.replies = true,
        }
    };
    for (r, rule) in policy.rules.iter().enumerate() {
        for (k, name) in rule.interfaces.iter().enumerate() {
            let interface = match listed(all, name, r, k) {
                Ok(interface) => interface,
                Err(e) if listed_as == Listed::AsTheyAre => {
                    tracing::warn!("{e}: not intercepted on until it is back");
                    continue;
                }
                Err(e) => return Err(e),
            };
            plan_on(interface, Some(r));
            if interface.is_bridge {
                for port in bridge::ports(interface, all) {
                    plan_on(port, Some(r));
                }
            }
        }
    }
    let spoofing = policy
        .bind_targets()
        .iter()
        .any(|target| spoofs(target.bind, is_local));
    if spoofing {
        let readable = all
            .iter()
            .filter(|i| !i.is_loopback() && i.l2_len.is_some());
        for interface in readable {
            plan_on(interface, None);
        }
    }
    Ok(plan)
}

/// The interface `intercept[r].interfaces[k]` names. A port of a bond or a
/// VRF is refused: `steer` checks the interface a connection arrived on,
/// which for such a port is its master. (A bridge's port is fine:
/// `classify` runs there and `steer` knows the bridge.)
fn listed<'a>(
    all: &'a [Interface],
    name: &str,
    r: usize,
    k: usize,
) -> Result<&'a Interface, InstallError> {
    let path = || format!("intercept[{r}].interfaces[{k}]");
    let interface =
        all.iter()
            .find(|i| i.name == name)
            .ok_or_else(|| InstallError::NoInterface {
                path: path(),
                name: name.to_owned(),
            })?;
    match interface.master {
        Some(master) if bridge::bridge_of(interface, all).is_none() => {
            Err(InstallError::Enslaved {
                path: path(),
                name: name.to_owned(),
                master: all
                    .iter()
                    .find(|i| i.index == master)
                    .map_or_else(|| format!("ifindex {master}"), |i| i.name.clone()),
            })
        }
        _ => Ok(interface),
    }
}

/// The bridges gateway rules intercept on (named, or through a port), with
/// the families of those rules.
fn bridge_uses(policy: &Policy, all: &[Interface]) -> Vec<BridgeUse> {
    let mut uses: Vec<BridgeUse> = Vec::new();
    for rule in &policy.rules {
        let v4 = rule.prefixes.iter().any(|p| p.addr().is_ipv4());
        let v6 = rule.prefixes.iter().any(|p| p.addr().is_ipv6());
        for name in &rule.interfaces {
            let Some(interface) = all.iter().find(|i| &i.name == name) else {
                continue;
            };
            let bridge = match bridge::bridge_of(interface, all) {
                Some(of_port) => all.iter().find(|i| i.index == of_port.index),
                None => interface.is_bridge.then_some(interface),
            };
            let Some(bridge) = bridge else { continue };
            match uses.iter_mut().find(|u| u.index == bridge.index) {
                Some(found) => {
                    found.v4 |= v4;
                    found.v6 |= v6;
                }
                None => uses.push(BridgeUse {
                    name: bridge.name.clone(),
                    index: bridge.index,
                    v4,
                    v6,
                }),
            }
        }
    }
    uses
}

/// Whether a gateway rule that routes (lists an interface that is neither a
/// bridge nor a bridge's port) intercepts prefixes of one family: such a
/// host forwards.
fn routed_family(policy: &Policy, all: &[Interface], v4: bool) -> bool {
    let routed = |name: &String| {
        all.iter()
            .find(|i| &i.name == name)
            .is_none_or(|i| !i.is_bridge && bridge::bridge_of(i, all).is_none())
    };
    policy
        .rules
        .iter()
        .filter(|rule| rule.interfaces.iter().any(routed))
        .flat_map(|rule| &rule.prefixes)
        .any(|prefix| prefix.addr().is_ipv4() == v4)
}

/// Whether `ip` is this host's under a policy that makes `owned` local: an
/// address of an interface (or loopback), or in one of those prefixes. Not
/// what other policies made local: a replaced one's prefixes go with it.
fn local_under(local: &LocalAddrs, owned: &[IpNet], ip: IpAddr) -> bool {
    local.is_host_address(ip) || owned.iter().any(|prefix| prefix.contains(&ip))
}

/// CONNECT rules whose tunnels go to their original destination from a fixed
/// address that is not this host's: the replies to such a connection are
/// taken for the proxy only from listed servers and gateway rules'
/// destinations, and a tunnel's destination can be anywhere, so no tunnel
/// would ever open.
fn unanswered_tunnels(policy: &Policy, local: &LocalAddrs, owned: &[IpNet]) -> Vec<String> {
    policy
        .bind_targets()
        .iter()
        .filter(|target| policy.upstreams[target.upstream.0].target == Target::OriginalDestination)
        .filter_map(|target| {
            let Bind::Address(ip) = target.bind else {
                return None;
            };
            let RuleId(r) = *target
                .rules
                .iter()
                .find(|r| policy.rules[r.0].connect.is_some())?;
            (!local_under(local, owned, ip)).then(|| {
                format!(
                    "{}: {ip} is not an address of this host: tunnels of CONNECT rule {:?} \
                     (intercept[{r}]) to their original destination would get no replies from it \
                     (those are taken only from listed servers and gateway rules' destinations)",
                    target.bind_path(policy),
                    policy.rules[r].name
                )
            })
        })
        .collect()
}

/// Whether connections under `bind` come from an address that is not this
/// host's, whose replies the kernel must be told to deliver here.
fn spoofs(bind: Bind, is_local: &impl Fn(IpAddr) -> bool) -> bool {
    match bind {
        Bind::Proxy => false,
        Bind::ClientIp | Bind::Client => true,
        Bind::Address(ip) => !is_local(ip),
    }
}

/// Servers on this host that connections are made to from addresses that
/// are not this host's (a client's, or a fixed one): their replies need a
/// routing rule of their own.
fn local_transparent_servers(
    policy: &Policy,
    is_local: &impl Fn(IpAddr) -> bool,
) -> Vec<SocketAddr> {
    let mut servers: Vec<SocketAddr> = policy
        .bind_targets()
        .iter()
        .filter(|target| spoofs(target.bind, is_local))
        .flat_map(|target| policy.upstreams[target.upstream.0].servers())
        .copied()
        .filter(|server| is_local(server.ip()))
        .collect();
    servers.sort();
    servers.dedup();
    servers
}

/// The prefixes this host takes as its own (rules without `interfaces`):
/// they get `local` routes.
fn owned_prefixes(policy: &Policy) -> Vec<IpNet> {
    let mut prefixes: Vec<IpNet> = policy
        .rules
        .iter()
        .filter(|r| !r.is_gateway())
        .flat_map(|r| r.prefixes.iter().copied())
        .collect();
    prefixes.sort();
    prefixes.dedup();
    prefixes
}

/// Every upstream's servers, as `UPSTREAM_SERVERS` holds them.
fn upstream_servers(policy: &Policy) -> Vec<SocketAddr> {
    policy
        .upstreams
        .iter()
        .flat_map(|upstream| upstream.servers().iter().copied())
        .collect()
}

/// The current policy's plan, and the interfaces of older plans with no
/// rule of their own: `classify` keeps their connections' packets
/// (`RETAINING`). An interface is the same by its index: an older plan's
/// copy of it may be stale (a new MAC or master since), and a second entry
/// for one index would overwrite the current one's configuration.
fn with_older_interfaces<'a>(
    current: &[ClassifyPlan],
    older: impl Iterator<Item = &'a [ClassifyPlan]>,
) -> Vec<ClassifyPlan> {
    let mut classify = current.to_vec();
    for planned in older.flatten() {
        if !classify
            .iter()
            .any(|p| p.interface.index == planned.interface.index)
        {
            classify.push(ClassifyPlan {
                interface: planned.interface.clone(),
                role: ClassifyRole {
                    intercept: false,
                    replies: planned.role.replies,
                },
                rules: Vec::new(),
                bridge: planned.bridge,
            });
        }
    }
    classify
}

fn log_counters(installation: &Installation) {
    let summary: Vec<String> = installation
        .kernel_counters()
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    tracing::info!(counters = %summary.join(" "), "kernel counters");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::intercept::bridge::BridgeOfPort;

    fn link(name: &str, index: u32, master: Option<u32>, is_bridge: bool) -> Interface {
        Interface::ethernet(name, index, master, is_bridge)
    }

    /// Every serving policy's prefixes count once, an IPv6 prefix split
    /// around the IPv4-mapped range as its pieces.
    #[test]
    fn the_host_addresses_peak_counts_every_serving_policys_prefixes_once() {
        let needs = |owned: &[&str]| Needs {
            owned: owned.iter().map(|p| p.parse().unwrap()).collect(),
            local_servers: Vec::new(),
            classify: Vec::new(),
            bridges: Vec::new(),
            routed_v4: false,
            routed_v6: false,
        };
        let running = needs(&["192.0.2.0/24", "2001:db8::/32"]);
        let replaced = needs(&["192.0.2.0/24", "198.51.100.0/24"]);
        let taken_over = Routing {
            prefixes: vec!["203.0.113.0/24".parse().unwrap()],
            ..Routing::default()
        };
        let owned = all_owned([&running, &replaced].into_iter(), &taken_over.prefixes);
        assert_eq!(owned.len(), 4, "{owned:?}");
        assert_eq!(local_addrs_peak(3, &owned), 3 + 4);
        let pieces = crate::lpm::prefix_keys("::/0".parse().unwrap()).len();
        // ::/1 is made of pieces ::/0 has too: they count once.
        let nested = needs(&["::/0", "::/1"]);
        let owned = all_owned([&nested].into_iter(), &[]);
        assert_eq!(local_addrs_peak(0, &owned), pieces);
    }

    /// Tunnels to their original destination from a fixed address that is
    /// not this host's would get no replies: refused, naming the bind.
    #[tokio::test]
    async fn tunnels_from_a_fixed_address_not_this_hosts_are_refused() {
        let local = LocalAddrs::load(None).await.unwrap();
        let policy = |bind: &str| {
            Policy::from_json(&format!(
                r#"{{ "intercept": [ {{ "name": "explicit", "upstream": "out",
                       "connect": {{ "listen": ["127.0.0.1:3128"], "clients": ["127.0.0.0/8"] }} }} ],
                     "upstreams": {{ "out": {{ "original_destination": true, "bind": "{bind}" }} }} }}"#
            ))
            .unwrap()
        };
        let refused = unanswered_tunnels(&policy("192.0.2.77"), &local, &[]);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].starts_with("upstreams.out.bind: 192.0.2.77 is not an address of this host"),
            "{refused:?}"
        );
        assert!(unanswered_tunnels(&policy("127.0.0.1"), &local, &[]).is_empty());
    }

    /// A bridge's port may be listed (bridged interception); a bond's may
    /// not: its traffic arrives on the bond, where `classify` is not.
    #[test]
    fn a_bridge_port_is_listed_and_a_bond_port_refused() {
        let all = [
            link("br0", 2, None, true),
            link("eth0", 3, Some(2), false),
            link("bond0", 4, None, false),
            link("eth1", 5, Some(4), false),
        ];
        assert_eq!(listed(&all, "eth0", 0, 0).unwrap().index, 3);
        assert_eq!(listed(&all, "br0", 0, 1).unwrap().index, 2);
        let refused = listed(&all, "eth1", 1, 0).unwrap_err().to_string();
        assert_eq!(
            refused,
            r#"intercept[1].interfaces[0]: interface "eth1" is a port of "bond0" (a bond or VRF): its IP traffic arrives on "bond0"; list that instead"#
        );
        assert!(matches!(
            listed(&all, "nope0", 0, 0),
            Err(InstallError::NoInterface { .. })
        ));
    }

    /// After a reload, an interface both plans have is configured once, as
    /// the current plan says, even when the older plan's copy of it is
    /// stale (here: made a bridge port since, its MAC changed); one only
    /// the older plan has is kept, retaining, with no rule.
    #[test]
    fn older_plans_add_only_interfaces_the_current_one_lacks() {
        let plan =
            |interface: Interface, intercept: bool, bridge: Option<BridgeOfPort>| ClassifyPlan {
                interface,
                role: ClassifyRole {
                    intercept,
                    replies: true,
                },
                rules: if intercept { vec![0] } else { Vec::new() },
                bridge,
            };
        let port = BridgeOfPort {
            index: 2,
            mac: [2, 0, 0, 0, 0, 2],
        };
        let current = [plan(link("eth0", 3, Some(2), false), true, Some(port))];
        let mut stale_eth0 = link("eth0", 3, None, false);
        stale_eth0.mac = Some([2, 0, 0, 0, 0, 9]);
        let older = [
            plan(stale_eth0, true, None),
            plan(link("eth1", 4, None, false), true, None),
        ];
        let merged = with_older_interfaces(&current, [older.as_slice()].into_iter());
        let indices: Vec<u32> = merged.iter().map(|p| p.interface.index).collect();
        assert_eq!(indices, [3, 4]);
        assert_eq!(merged[0].bridge, Some(port));
        assert!(merged[0].role.intercept);
        assert_eq!(
            (merged[1].role.intercept, merged[1].rules.len()),
            (false, 0)
        );
    }

    /// A listener of `role` on loopback, a client connected to it and the
    /// accepted end.
    async fn accepted(
        keepalive: Keepalive,
        role: Role,
    ) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), keepalive, role).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    }

    /// Sessions rely on it: sockets accepted from our listeners have
    /// `TCP_NODELAY` and the daemon's keepalive without setsockopts of
    /// their own, and a CONNECT listener's delay their ACKs.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_keepalive_and_their_ack_mode() {
        let keepalive = Keepalive::Probe {
            idle: 7,
            interval: 3,
            count: 4,
        };
        for role in [Role::Steered, Role::Connect] {
            let (_client, accepted) = accepted(keepalive, role).await;
            assert!(accepted.nodelay().unwrap());
            let sock = SockRef::from(&accepted);
            assert!(sock.keepalive().unwrap());
            assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
            assert_eq!(
                sock.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(3)
            );
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
            assert_eq!(
                sock.tcp_quickack().unwrap(),
                role == Role::Steered,
                "{role:?}"
            );
        }
    }

    /// A CONNECT client's head is acknowledged by the answer: the client
    /// receives one segment, not an ACK and then the answer. A steered
    /// client's first bytes are acknowledged at once.
    #[tokio::test]
    async fn a_connect_clients_head_is_acknowledged_by_the_answer() {
        const HEAD: &[u8] = b"CONNECT a.example:443 HTTP/1.1\r\n\r\n";
        const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";
        for (role, segments) in [(Role::Steered, 2), (Role::Connect, 1)] {
            let (mut client, mut accepted) = accepted(Keepalive::Off, role).await;
            let before = crate::tcp_info::of(&client).tcpi_segs_in;
            client.write_all(HEAD).await.unwrap();
            accepted.read_exact(&mut [0u8; HEAD.len()]).await.unwrap();
            accepted.write_all(ANSWER).await.unwrap();
            client.read_exact(&mut [0u8; ANSWER.len()]).await.unwrap();
            let info = crate::tcp_info::of(&client);
            assert_eq!(
                info.tcpi_unacked, 0,
                "{role:?}: the head is not acknowledged"
            );
            assert_eq!(info.tcpi_segs_in - before, segments, "{role:?}");
        }
    }
}
