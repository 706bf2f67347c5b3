//! Kernel side of interception: the embedded BPF object, its maps, and the local
//! routes that make intercepted prefixes deliverable.
//!
//! The `sk_lookup` link is owned by a file descriptor of this process, so it goes
//! away with the process, however it ends. Routes are not fd-owned: `routes`
//! marks them with our own protocol number and `guard` removes them if the
//! daemon dies without doing so itself.

pub mod guard;
pub mod routes;
pub mod rules;

use std::{fs::File, os::fd::AsRawFd};

use aya::{
    Ebpf,
    maps::{LpmTrie, MapData, PerCpuArray, SockMap, lpm_trie::Key},
    programs::{SkLookup, sk_lookup::SkLookupLinkId},
};
use l4proxy_common::{Counter, RuleKey, RuleValue, SOCKET_V4, SOCKET_V6};

use crate::policy::Policy;

/// The kernel programs, built by `cargo xtask build-ebpf` and embedded by build.rs.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/l4proxy-ebpf.o"));

const STEER_PROGRAM: &str = "steer";

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {STEER_PROGRAM}: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("BPF object has no {0}")]
    Missing(&'static str),
    #[error("opening this thread's network namespace: {0}")]
    Netns(std::io::Error),
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

/// The loaded and attached `sk_lookup` program with its maps.
pub struct Interceptor {
    ebpf: Ebpf,
    link: Option<SkLookupLinkId>,
    rules: LpmTrie<MapData, RuleKey, RuleValue>,
    sockets: SockMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
}

impl Interceptor {
    /// Loads the embedded programs and fills the rule map from `policy`. Nothing
    /// is attached yet: call [`Interceptor::attach`] once the listeners are in.
    pub fn load(policy: &Policy) -> Result<Self, InterceptError> {
        let mut ebpf = Ebpf::load(BPF_OBJECT)?;
        let mut rules: LpmTrie<MapData, RuleKey, RuleValue> = take_map(&mut ebpf, "RULES")?;
        for entry in rules::compile(policy) {
            rules
                .insert(&Key::new(entry.prefix_len, entry.key), entry.value, 0)
                .map_err(|source| InterceptError::Map {
                    name: "RULES",
                    source,
                })?;
        }
        let sockets = take_map(&mut ebpf, "SOCKETS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let program: &mut SkLookup = ebpf
            .program_mut(STEER_PROGRAM)
            .ok_or(InterceptError::Missing("program steer"))?
            .try_into()?;
        program.load()?;
        Ok(Self {
            ebpf,
            link: None,
            rules,
            sockets,
            counters,
        })
    }

    /// Puts a listening socket into the program's socket map.
    pub fn set_listener(
        &mut self,
        family: Family,
        listener: &impl AsRawFd,
    ) -> Result<(), InterceptError> {
        self.sockets
            .set(family.socket_index(), listener, 0)
            .map_err(|source| InterceptError::Map {
                name: "SOCKETS",
                source,
            })
    }

    /// Attaches the program to the network namespace of the calling thread.
    pub fn attach(&mut self) -> Result<(), InterceptError> {
        // thread-self, not self: tests enter namespaces per thread with setns.
        let netns = File::open("/proc/thread-self/ns/net").map_err(InterceptError::Netns)?;
        let link = self.steer_program()?.attach(netns)?;
        self.link = Some(link);
        Ok(())
    }

    /// Detaches the program: new connections take the normal socket lookup
    /// again. Dropping the `Interceptor` (or the process ending) does the same.
    pub fn detach(&mut self) -> Result<(), InterceptError> {
        if let Some(link) = self.link.take() {
            self.steer_program()?.detach(link)?;
        }
        Ok(())
    }

    /// Current value of every named kernel counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, InterceptError> {
        Counter::ALL
            .iter()
            .map(|&counter| {
                let per_cpu = self.counters.get(&(counter as u32), 0).map_err(|source| {
                    InterceptError::Map {
                        name: "COUNTERS",
                        source,
                    }
                })?;
                Ok((counter, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Number of entries in the rule map (for the start-up log).
    pub fn rule_entries(&self) -> usize {
        self.rules.keys().count()
    }

    fn steer_program(&mut self) -> Result<&mut SkLookup, InterceptError> {
        Ok(self
            .ebpf
            .program_mut(STEER_PROGRAM)
            .ok_or(InterceptError::Missing("program steer"))?
            .try_into()?)
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, InterceptError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(InterceptError::Missing(name))?;
    T::try_from(map).map_err(|source| InterceptError::Map { name, source })
}
