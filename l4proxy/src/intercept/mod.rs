//! Kernel side of interception: the embedded BPF object, its maps and
//! program links, and the routing state that makes intercepted packets
//! deliverable to this host.
//!
//! Two programs: `steer` (`sk_lookup`, attached to the network namespace)
//! hands new connections to intercepted destinations to the daemon's
//! listeners; `classify` (tcx ingress, attached to interfaces) marks
//! forwarded packets that must be delivered locally instead (gateway rules,
//! and replies to the daemon's transparent upstream connections). Both links
//! are owned by file descriptors of this process, so they go away with the
//! process, however it ends. Routes and rules are not fd-owned: `routes` and
//! `delivery` mark them with our own protocol number and `guard` removes them
//! if the daemon dies without doing so itself.

pub mod delivery;
pub mod guard;
pub mod interfaces;
pub mod routes;
pub mod rules;
pub mod sysctl;

use std::{fs::File, os::fd::AsRawFd};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, SockMap, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, SkLookup, TcAttachType,
        sk_lookup::SkLookupLinkId,
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use l4proxy_common::{
    Counter, DRAINING, INTERFACE_REPLIES, InterfaceConfig, InterfaceRuleKey, MARK_MASK, MARK_VALUE,
    RuleKey, RuleValue, SOCKET_V4, SOCKET_V6,
};

use ipnet::IpNet;

use self::{delivery::Mark, interfaces::Interface};
use crate::{lpm, policy::Policy};

/// The kernel programs, built by `cargo xtask build-ebpf` and embedded by build.rs.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/l4proxy-ebpf.o"));

const STEER_PROGRAM: &str = "steer";
const CLASSIFY_PROGRAM: &str = "classify";

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("attaching the tc program to {interface} (tcx needs Linux 6.6 or later): {source}")]
    Classify {
        interface: String,
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("BPF object has no {0}")]
    Missing(&'static str),
    #[error("opening this thread's network namespace: {0}")]
    Netns(std::io::Error),
    #[error(
        "interface {name} has a link-layer type the tc program cannot read (only Ethernet and layer-3 devices)"
    )]
    LinkType { name: String },
}

/// Address family of a listener, naming its slot in the `SOCKETS` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn socket_index(self) -> u32 {
        match self {
            Family::V4 => SOCKET_V4,
            Family::V6 => SOCKET_V6,
        }
    }
}

/// What `classify` does on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassifyRole {
    /// Gateway rules that list the interface: their packets are marked.
    pub intercept: bool,
    /// Replies to the daemon's transparent sockets are marked.
    pub replies: bool,
}

/// This host's own addresses in the kernel (`LOCAL_ADDRS`), which gateway
/// rules leave alone; [`LocalMap::set`] keeps it equal to a list.
pub struct LocalMap {
    trie: LpmTrie<MapData, [u8; 16], u8>,
    current: Vec<IpNet>,
}

impl LocalMap {
    /// Makes the map hold exactly `prefixes`.
    pub fn set(&mut self, prefixes: &[IpNet]) -> Result<(), InterceptError> {
        let key = |prefix: &IpNet| {
            let (addr, len) = lpm::prefix_key(*prefix);
            Key::new(u32::from(len), addr.to_be_bytes())
        };
        for gone in self.current.iter().filter(|p| !prefixes.contains(p)) {
            self.trie
                .remove(&key(gone))
                .map_err(map_error("LOCAL_ADDRS"))?;
        }
        for new in prefixes.iter().filter(|p| !self.current.contains(p)) {
            self.trie
                .insert(&key(new), 1, 0)
                .map_err(map_error("LOCAL_ADDRS"))?;
        }
        self.current = prefixes.to_vec();
        Ok(())
    }
}

/// The loaded programs with their maps and links.
pub struct Interceptor {
    ebpf: Ebpf,
    link: Option<SkLookupLinkId>,
    classify_links: Vec<(String, SchedClassifierLinkId)>,
    rules: LpmTrie<MapData, RuleKey, RuleValue>,
    sockets: SockMap<MapData>,
    interface_rules: HashMap<MapData, InterfaceRuleKey, u8>,
    interfaces: HashMap<MapData, u32, InterfaceConfig>,
    settings: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    local: Option<LocalMap>,
}

impl Interceptor {
    /// Loads the embedded programs and fills the rule map with `entries`
    /// (`rules::compile` of `policy`), the upstream map from `policy` and the
    /// mark. Nothing is attached yet: call [`Interceptor::attach`] once the
    /// listeners are in.
    pub fn load(
        policy: &Policy,
        entries: &[rules::KernelEntry],
        mark: Mark,
    ) -> Result<Self, InterceptError> {
        let mut ebpf = Ebpf::load(BPF_OBJECT)?;
        let mut rules: LpmTrie<MapData, RuleKey, RuleValue> = take_map(&mut ebpf, "RULES")?;
        for entry in entries {
            rules
                .insert(&Key::new(entry.prefix_len, entry.key), entry.value, 0)
                .map_err(map_error("RULES"))?;
        }
        let mut upstream_servers: HashMap<MapData, RuleKey, u8> =
            take_map(&mut ebpf, "UPSTREAM_SERVERS")?;
        for server in policy.upstreams.iter().flat_map(|u| u.servers()) {
            let addr = match server.ip() {
                std::net::IpAddr::V4(v4) => RuleKey::mapped_v4(v4.octets()),
                std::net::IpAddr::V6(v6) => v6.octets(),
            };
            upstream_servers
                .insert(RuleKey::new(server.port(), addr), 1, 0)
                .map_err(map_error("UPSTREAM_SERVERS"))?;
        }
        let mut settings: Array<MapData, u32> = take_map(&mut ebpf, "SETTINGS")?;
        settings
            .set(MARK_VALUE, mark.value, 0)
            .and_then(|()| settings.set(MARK_MASK, mark.mask, 0))
            .map_err(map_error("SETTINGS"))?;
        let sockets = take_map(&mut ebpf, "SOCKETS")?;
        let interface_rules = take_map(&mut ebpf, "INTERFACE_RULES")?;
        let interfaces = take_map(&mut ebpf, "INTERFACES")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let local = LocalMap {
            trie: take_map(&mut ebpf, "LOCAL_ADDRS")?,
            current: Vec::new(),
        };
        let steer: &mut SkLookup = program(&mut ebpf, STEER_PROGRAM)?.try_into()?;
        steer.load()?;
        let classify: &mut SchedClassifier = program(&mut ebpf, CLASSIFY_PROGRAM)?.try_into()?;
        classify.load()?;
        Ok(Self {
            ebpf,
            link: None,
            classify_links: Vec::new(),
            rules,
            sockets,
            interface_rules,
            interfaces,
            settings,
            counters,
            local: Some(local),
        })
    }

    /// The map of this host's addresses, for whoever keeps it current (once).
    pub fn take_local_map(&mut self) -> Option<LocalMap> {
        self.local.take()
    }

    /// Puts a listening socket into the program's socket map.
    pub fn set_listener(
        &mut self,
        family: Family,
        listener: &impl AsRawFd,
    ) -> Result<(), InterceptError> {
        self.sockets
            .set(family.socket_index(), listener, 0)
            .map_err(map_error("SOCKETS"))
    }

    /// Attaches `steer` to the network namespace of the calling thread.
    pub fn attach(&mut self) -> Result<(), InterceptError> {
        // thread-self, not self: tests enter namespaces per thread with setns.
        let netns = File::open("/proc/thread-self/ns/net").map_err(InterceptError::Netns)?;
        let steer: &mut SkLookup = program(&mut self.ebpf, STEER_PROGRAM)?.try_into()?;
        self.link = Some(steer.attach(netns)?);
        Ok(())
    }

    /// Attaches `classify` to an interface's ingress (tcx, after any program
    /// already there), with the gateway rules that list it.
    pub fn attach_classify(
        &mut self,
        interface: &Interface,
        role: ClassifyRole,
        gateway_rules: &[usize],
    ) -> Result<(), InterceptError> {
        let l2_len = interface.l2_len.ok_or_else(|| InterceptError::LinkType {
            name: interface.name.clone(),
        })?;
        for &rule in gateway_rules.iter().filter(|_| role.intercept) {
            let key = InterfaceRuleKey {
                ifindex: interface.index,
                // Fits: rule indices are below MAX_RULE_ENTRIES (see rules::compile).
                rule_id: rule as u32,
            };
            self.interface_rules
                .insert(key, 1, 0)
                .map_err(map_error("INTERFACE_RULES"))?;
        }
        let config = InterfaceConfig {
            l2_len,
            flags: if role.replies { INTERFACE_REPLIES } else { 0 },
        };
        self.interfaces
            .insert(interface.index, config, 0)
            .map_err(map_error("INTERFACES"))?;
        let classify: &mut SchedClassifier =
            program(&mut self.ebpf, CLASSIFY_PROGRAM)?.try_into()?;
        let link = classify
            .attach_with_options(
                &interface.name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| InterceptError::Classify {
                interface: interface.name.clone(),
                source,
            })?;
        self.classify_links.push((interface.name.clone(), link));
        Ok(())
    }

    /// Names of the interfaces `classify` is attached to.
    pub fn classify_interfaces(&self) -> Vec<&str> {
        self.classify_links
            .iter()
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// Takes no new connection, keeps the open ones: detaches `steer` (new
    /// connections to this host's prefixes take the normal socket lookup,
    /// and find nothing) and has `classify` mark a gateway rule's packets
    /// only for connections the daemon already has (new ones are forwarded).
    pub fn drain(&mut self) -> Result<(), InterceptError> {
        self.settings
            .set(DRAINING, 1, 0)
            .map_err(map_error("SETTINGS"))?;
        if let Some(link) = self.link.take() {
            let steer: &mut SkLookup = program(&mut self.ebpf, STEER_PROGRAM)?.try_into()?;
            steer.detach(link)?;
        }
        Ok(())
    }

    /// Detaches every program: new connections take the normal socket lookup
    /// and forwarded packets are forwarded again. Dropping the `Interceptor`
    /// (or the process ending) does the same.
    pub fn detach(&mut self) -> Result<(), InterceptError> {
        self.drain()?;
        let classify: &mut SchedClassifier =
            program(&mut self.ebpf, CLASSIFY_PROGRAM)?.try_into()?;
        for (_, link) in self.classify_links.drain(..) {
            classify.detach(link)?;
        }
        Ok(())
    }

    /// Current value of every named kernel counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, InterceptError> {
        Counter::ALL
            .iter()
            .map(|&counter| {
                let per_cpu = self
                    .counters
                    .get(&(counter as u32), 0)
                    .map_err(map_error("COUNTERS"))?;
                Ok((counter, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Number of entries in the rule map (for the start-up log).
    pub fn rule_entries(&self) -> usize {
        self.rules.keys().count()
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, InterceptError> {
    ebpf.program_mut(name).ok_or(InterceptError::Missing(name))
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> InterceptError {
    move |source| InterceptError::Map { name, source }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, InterceptError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(InterceptError::Missing(name))?;
    T::try_from(map).map_err(map_error(name))
}
