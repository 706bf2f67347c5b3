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

pub mod bridge;
pub mod delivery;
pub mod guard;
pub mod interfaces;
pub mod kernel_log;
mod mirror;
pub(crate) mod netlink_batch;
pub mod port_classes;
pub mod routes;
pub mod rules;
pub mod sysctl;

use std::{cmp::Reverse, fs::File, os::fd::AsRawFd};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockMap},
    programs::{
        LinkOrder, SchedClassifier, SkLookup, TcAttachType,
        sk_lookup::SkLookupLinkId,
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use l4proxy_common::{
    CLASS_HALF, ClassKey, Counter, DRAINING, INTERFACE_BRIDGE_PORT, INTERFACE_REPLIES,
    InterfaceConfig, InterfaceRuleKey, MARK_MASK, MARK_VALUE, RETAINING, RULE_HALF, RuleKey,
    RuleValue, SOCKET_V4, SOCKET_V6, VIA_BRIDGE_PORT,
};

use ipnet::IpNet;

use self::{
    bridge::BridgeOfPort,
    delivery::Mark,
    interfaces::Interface,
    kernel_log::KernelLog,
    mirror::{Contents, Mirrored, MirroredArray, MirroredHash, MirroredTrie},
};
use crate::lpm;

/// The kernel programs, built by `cargo xtask build-ebpf` and embedded by build.rs.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/l4proxy-ebpf.o"));

const STEER_PROGRAM: &str = "steer";
const CLASSIFY_PROGRAM: &str = "classify";

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the kernel programs' log: {0}")]
    KernelLog(#[from] aya_log::Error),
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
pub struct LocalMap(MirroredTrie<[u8; 16], u8>);

impl LocalMap {
    /// Makes the map hold exactly `prefixes` (repeats allowed).
    pub fn set(&mut self, prefixes: &[IpNet]) -> Result<(), InterceptError> {
        let wanted: Contents<(u32, [u8; 16]), u8> = prefixes
            .iter()
            .flat_map(|&prefix| lpm::prefix_keys(prefix))
            .map(|(addr, len)| ((u32::from(len), addr.to_be_bytes()), 1))
            .collect();
        self.0.set(&wanted)
    }
}

/// The loaded programs with their maps and links. The maps and the
/// attachments of `classify` are set from a policy by the `set_*` methods,
/// each of which changes only what differs from what is there (a reload).
pub struct Interceptor {
    ebpf: Ebpf,
    link: Option<SkLookupLinkId>,
    rules: MirroredTrie<ClassKey, RuleValue>,
    port_classes: MirroredArray,
    /// Added to every class in the kernel's keys: [`CLASS_HALF`] or 0 (see
    /// `set_rules`).
    class_offset: u32,
    /// Added to every rule id in `RULES` and `INTERFACE_RULES`: [`RULE_HALF`]
    /// or 0 (see `prepare_classify`).
    rule_half: u32,
    sockets: SockMap<MapData>,
    interface_rules: MirroredHash<InterfaceRuleKey, u8>,
    interfaces: HashMap<MapData, u32, InterfaceConfig>,
    upstream_servers: MirroredHash<RuleKey, u8>,
    settings: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    /// Where `classify` is attached.
    classify: Vec<Attached>,
    /// The programs' log lines, until someone reads them.
    kernel_log: Option<KernelLog>,
}

/// `classify` on one interface.
struct Attached {
    index: u32,
    name: String,
    link: SchedClassifierLinkId,
}

/// Where `classify` goes and what it does there.
#[derive(Clone, Debug)]
pub struct ClassifyPlan {
    pub interface: Interface,
    pub role: ClassifyRole,
    /// Gateway rules that list the interface (indices into the policy).
    pub rules: Vec<usize>,
    /// The bridge the interface is a port of: what `classify` takes there
    /// is addressed to the bridge, and `steer` takes it on the bridge.
    pub bridge: Option<BridgeOfPort>,
}

impl ClassifyPlan {
    /// How many bytes of link-layer header precede the IP header there;
    /// refused for a link type `classify` cannot read.
    pub fn l2_len(&self) -> Result<u32, InterceptError> {
        self.interface
            .l2_len
            .ok_or_else(|| InterceptError::LinkType {
                name: self.interface.name.clone(),
            })
    }
}

impl Interceptor {
    /// Loads the embedded programs and sets the packet mark. The maps are
    /// empty and nothing is attached yet. Returns, apart, the map of this
    /// host's addresses, for whoever keeps it current.
    pub fn load(mark: Mark) -> Result<(Self, LocalMap), InterceptError> {
        let log_level = kernel_log::level();
        let mut ebpf = EbpfLoader::new()
            .override_global(kernel_log::LEVEL_GLOBAL, &log_level, true)
            .load(BPF_OBJECT)?;
        let mut settings: Array<MapData, u32> = take_map(&mut ebpf, "SETTINGS")?;
        settings
            .set(MARK_VALUE, mark.value, 0)
            .and_then(|()| settings.set(MARK_MASK, mark.mask, 0))
            .map_err(map_error("SETTINGS"))?;
        let local = LocalMap(Mirrored::new(
            take_map(&mut ebpf, "LOCAL_ADDRS")?,
            "LOCAL_ADDRS",
        ));
        let steer: &mut SkLookup = program(&mut ebpf, STEER_PROGRAM)?.try_into()?;
        steer.load()?;
        let classify: &mut SchedClassifier = program(&mut ebpf, CLASSIFY_PROGRAM)?.try_into()?;
        classify.load()?;
        let kernel_log = KernelLog::open(&mut ebpf, log_level)?;
        let interceptor = Self {
            rules: Mirrored::new(take_map(&mut ebpf, "RULES")?, "RULES"),
            port_classes: MirroredArray::new(take_map(&mut ebpf, "PORT_CLASSES")?, "PORT_CLASSES"),
            class_offset: 0,
            rule_half: 0,
            sockets: take_map(&mut ebpf, "SOCKETS")?,
            interface_rules: Mirrored::new(
                take_map(&mut ebpf, "INTERFACE_RULES")?,
                "INTERFACE_RULES",
            ),
            interfaces: take_map(&mut ebpf, "INTERFACES")?,
            upstream_servers: Mirrored::new(
                take_map(&mut ebpf, "UPSTREAM_SERVERS")?,
                "UPSTREAM_SERVERS",
            ),
            counters: take_map(&mut ebpf, "COUNTERS")?,
            settings,
            link: None,
            classify: Vec::new(),
            kernel_log,
            ebpf,
        };
        Ok((interceptor, local))
    }

    /// The programs' log, for whoever forwards it (once); none when the
    /// daemon's level logs nothing of theirs.
    pub fn take_kernel_log(&mut self) -> Option<KernelLog> {
        self.kernel_log.take()
    }

    /// Makes `RULES` and `PORT_CLASSES` hold `compiled` (`rules::compile` of
    /// a policy), so that no destination both policies take goes unsteered
    /// in between: new and changed entries first, then the ports' classes,
    /// then stale entries out. A policy whose port classes differ from the
    /// running one's is keyed in the other half of the class numbers, its
    /// wildcard entries too, so each port moves from complete old entries
    /// to complete new ones. Within one half, entries go in from the highest
    /// rank down and out from the lowest up ([`going_in`]), a rewrite that
    /// lowers a key's rank (an IPv6 piece of a split prefix a shorter one
    /// takes over) with the removals: at every step a connection takes the
    /// rule the old policy or the new one gives it.
    pub fn set_rules(&mut self, compiled: &rules::Compiled) -> Result<(), InterceptError> {
        let offset = self.class_offset_for(compiled);
        let wanted = rule_entries(&compiled.entries, offset, self.rule_half);
        self.rules.add_by(&wanted, going_in)?;
        self.port_classes.set(&kernel_table(compiled, offset))?;
        self.class_offset = offset;
        self.rules.remove_stale_by(&wanted, going_out)
    }

    /// How many `RULES` entries the map holds while it changes to
    /// `compiled`: the new ones go in before the stale ones go out.
    pub fn peak_rule_entries(&self, compiled: &rules::Compiled) -> usize {
        self.rules.peak(&rule_entries(
            &compiled.entries,
            self.class_offset_for(compiled),
            self.rule_half,
        ))
    }

    /// How many `INTERFACE_RULES` pairs the map holds while it changes to
    /// `plan`'s: the new ones go in before the stale ones go out.
    pub fn peak_interface_pairs(&self, plan: &[ClassifyPlan]) -> usize {
        self.interface_rules.peak(&self.next_pairs(plan).1)
    }

    /// How many `INTERFACES` entries the map holds while `classify` moves
    /// to `plan`'s interfaces: the new ones go in before the gone ones out
    /// (those of interfaces it could not attach to included).
    pub fn peak_interfaces(&self, plan: &[ClassifyPlan]) -> usize {
        let held = self.interfaces.keys().filter_map(Result::ok);
        let planned = plan.iter().map(|p| p.interface.index);
        held.chain(planned)
            .collect::<std::collections::BTreeSet<u32>>()
            .len()
    }

    /// The class offset `compiled` is keyed with: the running one's if its
    /// port classes are the same, else the other half.
    fn class_offset_for(&self, compiled: &rules::Compiled) -> u32 {
        offset_for(
            compiled.classes.table(),
            self.port_classes.held(),
            self.class_offset,
        )
    }

    /// How many `UPSTREAM_SERVERS` entries the map holds while it changes
    /// to `servers`: the new ones go in before the stale ones go out.
    pub fn peak_upstream_servers(&self, servers: &[std::net::SocketAddr]) -> usize {
        self.upstream_servers
            .peak(&upstream_server_entries(servers.iter().copied()))
    }

    /// Makes `UPSTREAM_SERVERS` hold exactly `servers`.
    pub fn set_upstream_servers(
        &mut self,
        servers: impl IntoIterator<Item = std::net::SocketAddr>,
    ) -> Result<(), InterceptError> {
        self.upstream_servers
            .set(&upstream_server_entries(servers.into_iter()))
    }

    /// Keeps connections opened under a replaced policy working, whatever
    /// the rules now say (see `classify`), or stops doing so.
    pub fn set_retaining(&mut self, retaining: bool) -> Result<(), InterceptError> {
        self.settings
            .set(RETAINING, u32::from(retaining), 0)
            .map_err(map_error("SETTINGS"))
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

    /// First half of moving `classify` to `plan`: the configuration of each
    /// interface and every (interface, rule) pair the plan adds, before the
    /// rule map changes, so that no rule is ever looked up without its pairs.
    pub fn prepare_classify(&mut self, plan: &[ClassifyPlan]) -> Result<(), InterceptError> {
        for planned in plan {
            let interface = &planned.interface;
            let l2_len = planned.l2_len()?;
            let replies = if planned.role.replies {
                INTERFACE_REPLIES
            } else {
                0
            };
            let config = match planned.bridge {
                Some(bridge) => InterfaceConfig {
                    l2_len,
                    flags: replies | INTERFACE_BRIDGE_PORT,
                    bridge_mac: bridge.mac,
                    _pad: [0; 2],
                },
                None => InterfaceConfig {
                    l2_len,
                    flags: replies,
                    bridge_mac: [0; 6],
                    _pad: [0; 2],
                },
            };
            self.interfaces
                .insert(interface.index, config, 0)
                .map_err(map_error("INTERFACES"))?;
        }
        let (half, wanted) = self.next_pairs(plan);
        self.rule_half = half;
        self.interface_rules.add(&wanted)
    }

    /// The rule ids' half `plan`'s pairs go in, and the pairs: the running
    /// half, unless a rule id would then name both a running rule's
    /// interfaces and other ones of the new policy's rule at that place
    /// (rules are numbered by their place in the policy): with both
    /// policies' pairs in the map during the change, a running policy's
    /// entry would take connections on the new one's interfaces, or the
    /// other way round. The other half is empty once a change is complete
    /// (`set_rules` then writes the entries with its ids); a change that
    /// failed part way may have left pairs there, which are looked at too.
    fn next_pairs(&self, plan: &[ClassifyPlan]) -> (u32, Contents<InterfaceRuleKey, u8>) {
        let wanted = wanted_pairs(plan, self.rule_half);
        if !pairs_alias(self.interface_rules.keys(), &wanted) {
            return (self.rule_half, wanted);
        }
        let other = self.rule_half ^ RULE_HALF;
        let wanted = wanted_pairs(plan, other);
        if pairs_alias(self.interface_rules.keys(), &wanted) {
            tracing::warn!(
                "a change that failed part way left gateway rules' interface pairs in both \
                 halves: while this one is made, a gateway rule may take connections on \
                 another's interfaces"
            );
        }
        (other, wanted)
    }

    /// Second half: attaches `classify` (tcx, after any program already
    /// there) to the interfaces new to the plan, then removes the pairs and
    /// the attachments the plan no longer has. An interface it cannot attach
    /// to does not keep the rest from being done; the first such error is
    /// returned at the end.
    pub fn finish_classify(&mut self, plan: &[ClassifyPlan]) -> Result<(), InterceptError> {
        let mut failed = None;
        for planned in plan {
            let interface = &planned.interface;
            if self.classify.iter().any(|a| a.index == interface.index) {
                continue;
            }
            let classify: &mut SchedClassifier =
                program(&mut self.ebpf, CLASSIFY_PROGRAM)?.try_into()?;
            let attached = classify.attach_with_options(
                &interface.name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            );
            let link = match attached {
                Ok(link) => link,
                Err(source) => {
                    failed.get_or_insert(InterceptError::Classify {
                        interface: interface.name.clone(),
                        source,
                    });
                    continue;
                }
            };
            self.classify.push(Attached {
                index: interface.index,
                name: interface.name.clone(),
                link,
            });
        }
        self.interface_rules
            .remove_stale(&wanted_pairs(plan, self.rule_half))?;
        let (kept, gone): (Vec<Attached>, Vec<Attached>) = std::mem::take(&mut self.classify)
            .into_iter()
            .partition(|attached| plan.iter().any(|p| p.interface.index == attached.index));
        self.classify = kept;
        for attached in gone {
            self.detach_classify(attached)?;
        }
        // Configurations of interfaces neither attached nor planned: one
        // classify could not attach to, or one a change that was undone
        // had prepared.
        let stale: Vec<u32> = self
            .interfaces
            .keys()
            .filter_map(Result::ok)
            .filter(|index| {
                !self.classify.iter().any(|a| a.index == *index)
                    && !plan.iter().any(|p| p.interface.index == *index)
            })
            .collect();
        for index in stale {
            let _ = self.interfaces.remove(&index);
        }
        failed.map_or(Ok(()), Err)
    }

    fn detach_classify(&mut self, attached: Attached) -> Result<(), InterceptError> {
        let classify: &mut SchedClassifier =
            program(&mut self.ebpf, CLASSIFY_PROGRAM)?.try_into()?;
        // An interface that is gone took the link with it: nothing to undo.
        if let Err(e) = classify.detach(attached.link) {
            tracing::debug!(interface = %attached.name, error = %e, "detaching classify");
        }
        let _ = self.interfaces.remove(&attached.index);
        Ok(())
    }

    /// Names of the interfaces `classify` is attached to.
    pub fn classify_interfaces(&self) -> Vec<&str> {
        self.classify
            .iter()
            .map(|attached| attached.name.as_str())
            .collect()
    }

    /// Takes no new connection, keeps the open ones: detaches `steer` (new
    /// connections to this host's prefixes take the normal socket lookup,
    /// and find nothing, unless a service of this host listens on their port
    /// on every address) and has `classify` mark a gateway rule's packets
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
        for attached in std::mem::take(&mut self.classify) {
            self.detach_classify(attached)?;
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

    /// Number of entries in the rule map (for the log).
    pub fn rule_entries(&self) -> usize {
        self.rules.len()
    }
}

/// The order `RULES` entries go in (the highest rank first; [`going_out`]:
/// out, the lowest first) within one class half. The kernel's choice for a
/// destination is the highest-ranked entry it finds: written from the top
/// down, the first of the new entries for a destination to go in is the new
/// policy's choice for it, and removed from the bottom up, the last of the
/// old ones to go is the old policy's: never a rule neither policy gives.
fn going_in(value: &RuleValue) -> Reverse<u64> {
    Reverse(value.rank)
}

/// See [`going_in`].
fn going_out(value: &RuleValue) -> u64 {
    value.rank
}

/// The class offset of a policy with the ports' classes `table`, where the
/// kernel's `PORT_CLASSES` holds `held`, keyed with `offset`: the same if
/// the classes are, else the other half.
fn offset_for(table: &[u32], held: &[u32], offset: u32) -> u32 {
    let same = table
        .iter()
        .zip(held)
        .all(|(&class, &held)| kernel_class(class, offset) == held);
    if same { offset } else { offset ^ CLASS_HALF }
}

/// `PORT_CLASSES` for `compiled`, its classes in the half `offset` names.
fn kernel_table(compiled: &rules::Compiled, offset: u32) -> Vec<u32> {
    compiled
        .classes
        .table()
        .iter()
        .map(|&class| kernel_class(class, offset))
        .collect()
}

/// `class` as the kernel keys it, in the half `offset` names
/// ([`CLASS_HALF`]), the wildcard class too.
fn kernel_class(class: u32, offset: u32) -> u32 {
    class | offset
}

/// `UPSTREAM_SERVERS` entries of `servers`.
fn upstream_server_entries(
    servers: impl Iterator<Item = std::net::SocketAddr>,
) -> Contents<RuleKey, u8> {
    servers
        .map(|server| {
            let key = RuleKey::new(server.port(), lpm::key(server.ip()).to_be_bytes());
            (key, 1)
        })
        .collect()
}

/// `RULES` entries keyed as the trie keys them, classes in the half `offset`
/// names.
fn rule_entries(
    entries: &[rules::KernelEntry],
    offset: u32,
    rule_half: u32,
) -> Contents<(u32, ClassKey), RuleValue> {
    entries
        .iter()
        .map(|entry| {
            let class = kernel_class(u32::from_be_bytes(entry.key.class), offset);
            let key = ClassKey::new(class, entry.key.addr);
            let value = RuleValue {
                rule_id: entry.value.rule_id | rule_half,
                ..entry.value
            };
            ((entry.prefix_len, key), value)
        })
        .collect()
}

/// The `INTERFACE_RULES` entries of gateway rules in `plan`: one per
/// (interface, rule), and on a bridge port one more for its bridge, where
/// `steer` sees the connection arrive; rule ids in `rule_half`.
fn wanted_pairs(plan: &[ClassifyPlan], rule_half: u32) -> Contents<InterfaceRuleKey, u8> {
    plan.iter()
        .filter(|planned| planned.role.intercept)
        .flat_map(|planned| {
            planned.rules.iter().flat_map(|&r| {
                // Fits: rule indices are below MAX_RULE_ENTRIES (see
                // rules::compile).
                let rule_id = r as u32 | rule_half;
                let on_port = InterfaceRuleKey {
                    ifindex: planned.interface.index,
                    rule_id,
                };
                let on_bridge = planned.bridge.map(|bridge| InterfaceRuleKey {
                    ifindex: bridge.index,
                    rule_id: rule_id | VIA_BRIDGE_PORT,
                });
                std::iter::once(on_port)
                    .chain(on_bridge)
                    .map(|key| (key, 1))
            })
        })
        .collect()
}

/// Whether a rule id has pairs in both `held` and `wanted` (ids in the same
/// half), with other interfaces in each.
fn pairs_alias<'a>(
    held: impl Iterator<Item = &'a InterfaceRuleKey>,
    wanted: &Contents<InterfaceRuleKey, u8>,
) -> bool {
    type ByRule = std::collections::HashMap<u32, std::collections::BTreeSet<(u32, u32)>>;
    let by_rule = |keys: &mut dyn Iterator<Item = &InterfaceRuleKey>| {
        let mut by_rule = ByRule::new();
        for key in keys {
            let rule = key.rule_id & !VIA_BRIDGE_PORT;
            let place = (key.ifindex, key.rule_id & VIA_BRIDGE_PORT);
            by_rule.entry(rule).or_default().insert(place);
        }
        by_rule
    };
    let held = by_rule(&mut { held });
    let wanted = by_rule(&mut wanted.keys());
    held.iter()
        .any(|(rule, places)| wanted.get(rule).is_some_and(|wanted| wanted != places))
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

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use aya::maps::MapError;

    use super::*;

    /// Interface `index` with gateway rules `rules` (by place), on bridge
    /// 100 if `bridged`.
    fn planned(index: u32, rules: &[usize], bridged: bool) -> ClassifyPlan {
        ClassifyPlan {
            interface: Interface {
                name: format!("eth{index}"),
                index,
                l2_len: Some(14),
                master: None,
                is_bridge: false,
                mac: None,
            },
            role: ClassifyRole {
                intercept: true,
                replies: false,
            },
            rules: rules.to_vec(),
            bridge: bridged.then_some(bridge::BridgeOfPort {
                index: 100,
                mac: [2, 0, 0, 0, 0, 1],
            }),
        }
    }

    /// `RULES` entries, as the map holds them.
    type RuleMap = foldhash::HashMap<(u32, ClassKey), RuleValue>;

    /// The kernel's `RULES` in user space: its entries, and a look at every
    /// probe after each change.
    struct Trie {
        entries: std::rc::Rc<std::cell::RefCell<RuleMap>>,
        after_each: Box<dyn FnMut(&RuleMap)>,
    }

    impl mirror::Entries<(u32, ClassKey), RuleValue> for Trie {
        fn write(&mut self, key: &(u32, ClassKey), value: &RuleValue) -> Result<(), MapError> {
            self.entries.borrow_mut().insert(*key, *value);
            (self.after_each)(&self.entries.borrow());
            Ok(())
        }

        fn delete(&mut self, key: &(u32, ClassKey)) -> Result<(), MapError> {
            self.entries.borrow_mut().remove(key);
            (self.after_each)(&self.entries.borrow());
            Ok(())
        }
    }

    /// `steer`'s `rule_for` over `entries`, the ports' classes `table`: the
    /// rule id it gives a connection to `port` at `addr`.
    fn kernel_rule(entries: &RuleMap, table: &[u32], port: u16, addr: IpAddr) -> Option<u32> {
        let entries = entries.iter().map(|((len, key), value)| (*len, key, value));
        rules::kernel_lookup(entries, table[usize::from(port)], addr)
    }

    fn policy_of(json: &str) -> crate::policy::Policy {
        crate::policy::Policy::from_json(&format!(
            r#"{{ "intercept": {json}, "upstreams": {{ "u": {{ "servers": ["203.0.113.2:80"] }} }} }}"#
        ))
        .unwrap()
    }

    /// Replaces `old` with `new` as `set_rules` does (entries in, the ports'
    /// classes, entries out) and looks at each probe after every single
    /// change: it always has the rule one of the two policies gives it (new
    /// rule ids are in the other rule half, to tell the policies apart).
    fn reload_keeps_every_probe_on_a_policys_rule(
        old: &str,
        new: &str,
        probes: &[(u16, &str)],
    ) -> u32 {
        let (old_policy, new_policy) = (policy_of(old), policy_of(new));
        let (old, new) = (rules::compile(&old_policy), rules::compile(&new_policy));
        let old_offset = 0;
        let old_table = kernel_table(&old, old_offset);
        let new_offset = offset_for(new.classes.table(), &old_table, old_offset);
        let new_table = kernel_table(&new, new_offset);
        let old_entries = rule_entries(&old.entries, old_offset, 0);
        let new_entries = rule_entries(&new.entries, new_offset, RULE_HALF);
        let probes: Vec<(u16, IpAddr)> = probes
            .iter()
            .map(|&(port, ip)| (port, ip.parse().unwrap()))
            .collect();
        // What each policy gives (route's plain scan, the reference), and
        // the kernel with each policy's entries alone gives the same.
        let answers: Vec<[Option<u32>; 2]> = probes
            .iter()
            .map(|&(port, ip)| {
                let dst = std::net::SocketAddr::new(ip, port);
                let rule = |policy, half| {
                    crate::route::match_rule(policy, dst).map(|rule| rule.0 as u32 | half)
                };
                let answer = [rule(&old_policy, 0), rule(&new_policy, RULE_HALF)];
                let kernel = [
                    kernel_rule(&old_entries, &old_table, port, ip),
                    kernel_rule(&new_entries, &new_table, port, ip),
                ];
                assert_eq!(
                    kernel, answer,
                    "{dst}: the kernel's look-up, each policy alone"
                );
                answer
            })
            .collect();
        let table = std::rc::Rc::new(std::cell::RefCell::new(old_table));
        let looking = std::rc::Rc::new(std::cell::Cell::new(false));
        let trie_entries = std::rc::Rc::new(std::cell::RefCell::new(RuleMap::default()));
        let trie = Trie {
            entries: trie_entries.clone(),
            after_each: {
                let (table, looking, probes) = (table.clone(), looking.clone(), probes.clone());
                let answers = answers.clone();
                Box::new(move |entries| {
                    if !looking.get() {
                        return;
                    }
                    for (&(port, ip), allowed) in probes.iter().zip(&answers) {
                        let got = kernel_rule(entries, &table.borrow(), port, ip);
                        assert!(
                            allowed.contains(&got),
                            "{ip} port {port}: rule {got:?} in between, the policies give {allowed:?}"
                        );
                    }
                })
            },
        };
        let mut rules = mirror::Mirrored::new(trie, "RULES");
        rules.add_by(&old_entries, going_in).unwrap();
        looking.set(true);
        rules.add_by(&new_entries, going_in).unwrap();
        *table.borrow_mut() = new_table;
        rules.remove_stale_by(&new_entries, going_out).unwrap();
        assert_eq!(rules.len(), new_entries.len());
        assert!(
            *trie_entries.borrow() == new_entries,
            "the map holds the new policy's entries"
        );
        new_offset
    }

    /// Both policies take 10.0.5.1:80 by a rule on port 80; the new one
    /// adds a wider prefix on every port, whose wildcard entry must not take
    /// it while the new /24 is not yet in: with new classes (the other
    /// half), and with the same ones (one half).
    #[test]
    fn a_reload_never_gives_a_rule_neither_policy_does() {
        let offset = reload_keeps_every_probe_on_a_policys_rule(
            r#"[ { "name": "svc", "prefixes": ["10.0.0.0/8"], "ports": [80], "upstream": "u" } ]"#,
            r#"[ { "name": "wide", "prefixes": ["10.0.0.0/16"], "ports": ["*"], "upstream": "u" },
                { "name": "svc", "prefixes": ["10.0.5.0/24"], "ports": [80], "upstream": "u" },
                { "name": "gone", "prefixes": ["10.0.9.0/24"], "ports": [22], "upstream": "u" } ]"#,
            &[
                (80, "10.0.5.1"),
                (80, "10.0.7.1"),
                (22, "10.0.5.1"),
                (22, "10.0.9.9"),
                (80, "10.9.0.1"),
            ],
        );
        assert_eq!(offset, CLASS_HALF, "new classes (port 22): the other half");
        reload_keeps_every_probe_on_a_policys_rule(
            r#"[ { "name": "svc", "prefixes": ["10.0.0.0/8"], "ports": [80], "upstream": "u" } ]"#,
            r#"[ { "name": "wide", "prefixes": ["10.0.0.0/16"], "ports": ["*"], "upstream": "u" },
                { "name": "svc", "prefixes": ["10.0.5.0/24"], "ports": [80], "upstream": "u" } ]"#,
            &[
                (80, "10.0.5.1"),
                (80, "10.0.7.1"),
                (22, "10.0.5.1"),
                (80, "10.9.0.1"),
            ],
        );
    }

    /// An IPv6 prefix that holds the IPv4-mapped range is split into
    /// pieces around it, each keyed longer than the prefix: a shorter
    /// prefix of the new policy rewrites a piece the old one held with a
    /// higher rank, and that rewrite goes with the removals, not before a
    /// wildcard of the old policy that the lower rank would let win.
    #[test]
    fn a_reload_that_lowers_a_pieces_rank_never_lets_a_third_rule_win() {
        let probes = [
            (443, "2001:db8::1"),
            (80, "2001:db8::1"),
            (443, "fe80::1"),
            (443, "::2"),
            (443, "10.0.0.1"),
        ];
        let offset = reload_keeps_every_probe_on_a_policys_rule(
            r#"[ { "name": "web", "prefixes": ["2000::/3"], "ports": [443], "upstream": "u" },
                { "name": "all", "prefixes": ["2000::/3"], "ports": ["*"], "upstream": "u" } ]"#,
            r#"[ { "name": "web", "prefixes": ["::/1"], "ports": [443], "upstream": "u" } ]"#,
            &probes,
        );
        assert_eq!(offset, 0, "the same classes: one half");
        reload_keeps_every_probe_on_a_policys_rule(
            r#"[ { "name": "web", "prefixes": ["::/1"], "ports": [443], "upstream": "u" } ]"#,
            r#"[ { "name": "web", "prefixes": ["2000::/3"], "ports": [443], "upstream": "u" },
                { "name": "all", "prefixes": ["2000::/3"], "ports": ["*"], "upstream": "u" } ]"#,
            &probes,
        );
    }

    /// Classes that differ: the new policy's wildcard entries are keyed in
    /// its half too, so a port still in the old half does not see them.
    #[test]
    fn a_reload_to_other_classes_moves_the_wildcards_with_them() {
        let offset = reload_keeps_every_probe_on_a_policys_rule(
            r#"[ { "name": "s", "prefixes": ["10.0.0.0/8"], "ports": [443], "upstream": "u" } ]"#,
            r#"[ { "name": "w", "prefixes": ["10.0.0.0/16"], "ports": ["*"], "upstream": "u" },
                { "name": "s", "prefixes": ["10.0.1.0/24"], "ports": [443, 8443], "upstream": "u" } ]"#,
            &[
                (443, "10.0.1.1"),
                (443, "10.0.2.1"),
                (8443, "10.0.1.1"),
                (22, "10.0.1.1"),
                (443, "10.5.0.1"),
            ],
        );
        assert_eq!(offset, CLASS_HALF);
    }

    #[test]
    fn pairs_name_rules_in_the_half_given() {
        let pairs = wanted_pairs(&[planned(2, &[0, 3], true)], RULE_HALF);
        let mut keys: Vec<(u32, u32)> = pairs.keys().map(|k| (k.ifindex, k.rule_id)).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                (2, RULE_HALF),
                (2, RULE_HALF | 3),
                (100, VIA_BRIDGE_PORT | RULE_HALF),
                (100, VIA_BRIDGE_PORT | RULE_HALF | 3),
            ]
        );
    }

    #[test]
    fn a_rule_id_naming_other_interfaces_in_the_new_policy_aliases() {
        let running = wanted_pairs(&[planned(2, &[0], false)], 0);
        let alias = |plan: &[ClassifyPlan]| pairs_alias(running.keys(), &wanted_pairs(plan, 0));
        // The same rule on the same interface, or a rule added at a new
        // place: no id means two things.
        assert!(!alias(&[planned(2, &[0], false)]));
        assert!(!alias(&[planned(2, &[0], false), planned(3, &[1], false)]));
        // Rule 0 dropped (its place now a rule without interfaces).
        assert!(!alias(&[]));
        // A rule put first: place 0 is now another rule on eth3.
        assert!(alias(&[planned(3, &[0], false), planned(2, &[1], false)]));
        // Rule 0 on eth2 and on a bridge port now.
        assert!(alias(&[planned(2, &[0], false), planned(4, &[0], true)]));
    }
}
