//! A BPF map the daemon fills, with a record of what it holds: moving the map
//! to new contents writes only the difference, and the record is kept true
//! entry by entry, so a failure part way leaves it right for the next try.

use std::hash::Hash;

use foldhash::HashMap;

use aya::{
    Pod,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};

use super::{InterceptError, map_error};

/// What a map is to hold.
pub(super) type Contents<K, V> = HashMap<K, V>;

/// An LPM trie, its entries keyed by (prefix length in bits, key data).
pub(super) type MirroredTrie<K, V> = Mirrored<LpmTrie<MapData, K, V>, (u32, K), V>;

/// A BPF hash map.
pub(super) type MirroredHash<K, V> = Mirrored<BpfHashMap<MapData, K, V>, K, V>;

/// How a kind of BPF map takes one entry.
pub(super) trait Entries<K, V> {
    fn write(&mut self, key: &K, value: &V) -> Result<(), MapError>;
    fn delete(&mut self, key: &K) -> Result<(), MapError>;
}

impl<K: Pod, V: Pod> Entries<K, V> for BpfHashMap<MapData, K, V> {
    fn write(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.insert(key, value, 0)
    }

    fn delete(&mut self, key: &K) -> Result<(), MapError> {
        self.remove(key)
    }
}

/// A trie entry is keyed by (prefix length in bits, key data).
impl<K: Pod, V: Pod> Entries<(u32, K), V> for LpmTrie<MapData, K, V> {
    fn write(&mut self, &(len, data): &(u32, K), value: &V) -> Result<(), MapError> {
        self.insert(&Key::new(len, data), value, 0)
    }

    fn delete(&mut self, &(len, data): &(u32, K)) -> Result<(), MapError> {
        self.remove(&Key::new(len, data))
    }
}

/// A map and what it holds.
pub(super) struct Mirrored<M, K, V> {
    map: M,
    /// The map's name, for errors.
    name: &'static str,
    held: HashMap<K, V>,
}

impl<M, K, V> Mirrored<M, K, V>
where
    M: Entries<K, V>,
    K: Eq + Hash + Copy,
    V: PartialEq + Copy,
{
    /// `map`, which must be empty.
    pub fn new(map: M, name: &'static str) -> Self {
        Self {
            map,
            name,
            held: HashMap::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn holds(&self, key: &K) -> bool {
        self.held.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.held.keys()
    }

    /// How many entries the map holds while it changes to `wanted`: the new
    /// ones go in before the stale ones go out.
    pub fn peak(&self, wanted: &Contents<K, V>) -> usize {
        self.held.len() + wanted.keys().filter(|key| !self.holds(key)).count()
    }

    /// Makes the map hold exactly `wanted`: new and changed entries first,
    /// then the stale ones out, so that what both contents hold is never
    /// missing in between.
    pub fn set(&mut self, wanted: &Contents<K, V>) -> Result<(), InterceptError> {
        self.add(wanted)?;
        self.remove_stale(wanted)
    }

    /// Writes the entries of `wanted` the map lacks or holds with another
    /// value.
    pub fn add(&mut self, wanted: &Contents<K, V>) -> Result<(), InterceptError> {
        self.add_by(wanted, |_| ())
    }

    /// [`Mirrored::add`], writing the entries in the order `order` gives
    /// their values; an entry held with a value that `order` puts first
    /// (its rewrite takes out what comes first) is rewritten by
    /// [`Mirrored::remove_stale_by`] instead.
    pub fn add_by<O: Ord>(
        &mut self,
        wanted: &Contents<K, V>,
        order: impl Fn(&V) -> O,
    ) -> Result<(), InterceptError> {
        let mut adding: Vec<(&K, &V)> = wanted
            .iter()
            .filter(|&(key, value)| match self.held.get(key) {
                Some(held) => held != value && order(value) <= order(held),
                None => true,
            })
            .collect();
        adding.sort_by_key(|&(_, value)| order(value));
        for (key, value) in adding {
            self.map.write(key, value).map_err(map_error(self.name))?;
            self.held.insert(*key, *value);
        }
        Ok(())
    }

    /// Removes the entries `wanted` lacks (one that is already gone counts as
    /// removed), and writes those it holds with another value, if any are
    /// left (after [`Mirrored::add`], none are).
    pub fn remove_stale(&mut self, wanted: &Contents<K, V>) -> Result<(), InterceptError> {
        self.remove_stale_by(wanted, |_| ())
    }

    /// [`Mirrored::remove_stale`], and the rewrites [`Mirrored::add_by`] left,
    /// in the order `order` gives the values held.
    pub fn remove_stale_by<O: Ord>(
        &mut self,
        wanted: &Contents<K, V>,
        order: impl Fn(&V) -> O,
    ) -> Result<(), InterceptError> {
        let mut stale: Vec<(K, V)> = self
            .held
            .iter()
            .filter(|&(key, value)| wanted.get(key) != Some(value))
            .map(|(&key, &value)| (key, value))
            .collect();
        stale.sort_by_key(|(_, value)| order(value));
        for (key, _) in stale {
            if let Some(value) = wanted.get(&key) {
                self.map.write(&key, value).map_err(map_error(self.name))?;
                self.held.insert(key, *value);
                continue;
            }
            match self.map.delete(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(InterceptError::Map {
                        name: self.name,
                        source,
                    });
                }
            }
            self.held.remove(&key);
        }
        Ok(())
    }
}

/// A BPF array of `u32`, all of it written by the daemon (it starts zeroed).
pub(super) struct MirroredArray {
    map: Array<MapData, u32>,
    name: &'static str,
    held: Vec<u32>,
}

impl MirroredArray {
    pub fn new(map: Array<MapData, u32>, name: &'static str) -> Self {
        let held = vec![0; map.len() as usize];
        Self { map, name, held }
    }

    pub fn held(&self) -> &[u32] {
        &self.held
    }

    /// Makes the array hold `wanted` (one value per index), writing only the
    /// indices whose value changes.
    pub fn set(&mut self, wanted: &[u32]) -> Result<(), InterceptError> {
        for (index, (&value, held)) in wanted.iter().zip(self.held.iter_mut()).enumerate() {
            if value != *held {
                // Fits: an array's indices are u32.
                self.map
                    .set(index as u32, value, 0)
                    .map_err(map_error(self.name))?;
                *held = value;
            }
        }
        Ok(())
    }
}
