//! Which server of a pool a connection goes to: the choice alone, over a
//! view of the servers ([`Slot`]s) that the pool builds from their health
//! and load. Nothing here connects, sleeps or logs.
//!
//! - `round-robin`: smooth weighted round-robin (nginx's): every server
//!   gets its weight's share of turns, spread out rather than in runs, and
//!   a server that is down or already tried gives its turns to the others
//!   in proportion to theirs.
//! - `least-connections`: the fewest connections open per unit of weight
//!   (HAProxy's `leastconn`); ties go round, so idle servers share short
//!   connections.
//! - `source-hash`: rendezvous (highest random weight) hashing of the
//!   client's IP address: a client keeps its server while the server is
//!   there, and a server that goes (down, or out of the policy) moves only
//!   its own clients; weights scale a server's share of clients.
//! - `random-two`: two different servers drawn at random by weight, the one
//!   with fewer connections per unit of weight (the "power of two
//!   choices").
//!
//! Backup servers are candidates only while no other server the
//! connection could use is up.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use crate::policy::Balance;

/// One server as a choice sees it, at its place in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// At least 1.
    pub weight: u32,
    /// Connections to it open now, or being opened.
    pub active: usize,
    pub backup: bool,
    /// Not marked down by checks or observation.
    pub up: bool,
    /// Whether this connection can go there at all: a connection from the
    /// client's address goes to servers of the client's family only.
    pub usable: bool,
    /// This connection tried it already.
    pub tried: bool,
    /// Its rendezvous key, [`server_key`] of its address.
    pub key: u64,
}

/// What a connection may choose from: untried, usable servers that are up;
/// backups instead of the others only when none of the others that it
/// could use is up (tried or not: a failed attempt does not make a server
/// down, observation does).
fn candidates(slots: &[Slot]) -> impl Iterator<Item = usize> + Clone + '_ {
    let backups = !slots.iter().any(|s| !s.backup && s.usable && s.up);
    slots
        .iter()
        .enumerate()
        .filter(move |(_, s)| s.usable && s.up && !s.tried && s.backup == backups)
        .map(|(k, _)| k)
}

/// The choice's state that outlives one connection, shared by all of a
/// pool's connections.
pub struct Picker {
    balance: Balance,
    /// Smooth weighted round-robin's running scores, one per server.
    scores: Mutex<Vec<i64>>,
    /// Where least-connections starts looking, so that ties go round.
    cursor: AtomicUsize,
    /// splitmix64's state, for random-two.
    random: AtomicU64,
}

impl Picker {
    /// For a pool of `servers`; `seed` starts random-two's sequence.
    pub fn new(balance: Balance, servers: usize, seed: u64) -> Picker {
        Picker {
            balance,
            scores: Mutex::new(vec![0; servers]),
            cursor: AtomicUsize::new(0),
            random: AtomicU64::new(seed),
        }
    }

    /// The server (its index in `slots`) the connection from `client`
    /// goes to next, or `None` when no candidate is left.
    pub fn pick(&self, slots: &[Slot], client: IpAddr) -> Option<usize> {
        match self.balance {
            Balance::RoundRobin => {
                let mut scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
                round_robin(&mut scores, slots)
            }
            Balance::LeastConnections => {
                least_connections(slots, self.cursor.fetch_add(1, Ordering::Relaxed))
            }
            Balance::SourceHash => source_hash(slots, client_key(client)),
            Balance::RandomTwo => random_two(slots, || self.next_random()),
        }
    }

    /// splitmix64, lock-free: each caller takes its own step.
    fn next_random(&self) -> u64 {
        mix(self.random.fetch_add(GOLDEN_GAMMA, Ordering::Relaxed))
    }
}

/// Smooth weighted round-robin: each candidate's score grows by its
/// weight, the highest is chosen and set back by the candidates' total.
/// Over any run in which the candidates stay the same, each is chosen in
/// proportion to its weight, spread out.
fn round_robin(scores: &mut [i64], slots: &[Slot]) -> Option<usize> {
    let mut total = 0;
    let mut best: Option<usize> = None;
    for k in candidates(slots) {
        scores[k] += i64::from(slots[k].weight);
        total += i64::from(slots[k].weight);
        if best.is_none_or(|b| scores[k] > scores[b]) {
            best = Some(k);
        }
    }
    let best = best?;
    scores[best] -= total;
    Some(best)
}

/// Whether `a` carries less than `b` per unit of weight.
fn less_loaded(a: &Slot, b: &Slot) -> bool {
    (a.active as u128) * u128::from(b.weight) < (b.active as u128) * u128::from(a.weight)
}

/// The fewest connections per unit of weight; among equals, the first
/// from the `start`th candidate on (taken modulo the candidates, so that
/// each of them takes its turn: a server that cannot be chosen, down, a
/// backup or tried, passes its turn to none of them).
fn least_connections(slots: &[Slot], start: usize) -> Option<usize> {
    let count = candidates(slots).count();
    let mut best: Option<usize> = None;
    for k in candidates(slots)
        .cycle()
        .skip(start.checked_rem(count)?)
        .take(count)
    {
        if best.is_none_or(|b| less_loaded(&slots[k], &slots[b])) {
            best = Some(k);
        }
    }
    best
}

/// Weighted rendezvous hashing: each candidate scores `weight / -ln(u)`,
/// `u` uniform in (0, 1) from the hash of client and server; the highest
/// wins. A server's score for a client never depends on the other
/// servers, so taking one away moves only the clients it had.
fn source_hash(slots: &[Slot], client: u64) -> Option<usize> {
    let score = |slot: &Slot| {
        // 53 bits, centred in their interval: never 0 nor 1.
        let u = ((mix(client ^ slot.key) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        f64::from(slot.weight) / -u.ln()
    };
    candidates(slots).max_by(|&a, &b| score(&slots[a]).total_cmp(&score(&slots[b])))
}

/// Two different candidates drawn at random by weight (`random` gives the
/// draws), the less loaded one per unit of weight; the first drawn on a
/// tie (both idle, say), so that weights hold then too.
fn random_two(slots: &[Slot], mut random: impl FnMut() -> u64) -> Option<usize> {
    let one = weighted_draw(slots, None, random())?;
    let Some(two) = weighted_draw(slots, Some(one), random()) else {
        return Some(one);
    };
    Some(if less_loaded(&slots[two], &slots[one]) {
        two
    } else {
        one
    })
}

/// A candidate other than `except`, each as likely as its weight, by the
/// random number `draw`.
fn weighted_draw(slots: &[Slot], except: Option<usize>, draw: u64) -> Option<usize> {
    let eligible = candidates(slots).filter(|&k| Some(k) != except);
    let total: u64 = eligible.clone().map(|k| u64::from(slots[k].weight)).sum();
    let mut point = draw % total.max(1);
    for k in eligible {
        let weight = u64::from(slots[k].weight);
        if point < weight {
            return Some(k);
        }
        point -= weight;
    }
    None
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finaliser: every input bit changes about half the output
/// bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over `bytes`, then mixed: written out rather than std's hasher,
/// whose output may change between Rust releases, so that a client keeps
/// its server across an upgrade of l4proxy too.
fn hash(bytes: &[u8]) -> u64 {
    let fnv = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    mix(fnv)
}

/// A server's rendezvous key: from its address and port only, so that it
/// stays the same across reloads and restarts.
pub fn server_key(address: SocketAddr) -> u64 {
    let mut bytes = [0u8; 18];
    let ip = match address.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    bytes[..16].copy_from_slice(&ip);
    bytes[16..].copy_from_slice(&address.port().to_be_bytes());
    hash(&bytes)
}

/// A client's key: its IP address (an IPv4-mapped one as IPv4), never its
/// port, which changes with every connection.
pub fn client_key(client: IpAddr) -> u64 {
    match client.to_canonical() {
        IpAddr::V4(v4) => hash(&v4.octets()),
        IpAddr::V6(v6) => hash(&v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Servers of these weights, up, idle and untried.
    fn pool(weights: &[u32]) -> Vec<Slot> {
        weights
            .iter()
            .enumerate()
            .map(|(k, &weight)| Slot {
                weight,
                active: 0,
                backup: false,
                up: true,
                usable: true,
                tried: false,
                key: server_key(server(k)),
            })
            .collect()
    }

    fn server(k: usize) -> SocketAddr {
        SocketAddr::new([203, 0, 113, 10 + k as u8].into(), 443)
    }

    fn client(k: u32) -> IpAddr {
        // 198.51.100.0/24 and beyond, as many as asked.
        IpAddr::from((0xc633_6400_u32).wrapping_add(k).to_be_bytes())
    }

    /// How often each server is chosen over `picks` picks.
    fn counts(picker: &Picker, slots: &[Slot], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; slots.len()];
        for _ in 0..picks {
            counts[picker.pick(slots, client(0)).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_gives_each_server_its_weights_share_spread_out() {
        let slots = pool(&[5, 1, 1]);
        let picker = Picker::new(Balance::RoundRobin, slots.len(), 0);
        let first: Vec<usize> = (0..7)
            .map(|_| picker.pick(&slots, client(0)).unwrap())
            .collect();
        // nginx's sequence for 5, 1, 1: no run of the heavy server longer
        // than its share needs.
        assert_eq!(first, [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&picker, &slots, 7000), [5000, 1000, 1000]);

        let slots = pool(&[1, 2, 3, 4]);
        let picker = Picker::new(Balance::RoundRobin, slots.len(), 0);
        assert_eq!(counts(&picker, &slots, 10_000), [1000, 2000, 3000, 4000]);
    }

    #[test]
    fn round_robin_shares_a_down_servers_turns_in_proportion() {
        let mut slots = pool(&[1, 1, 1, 3]);
        slots[1].up = false;
        let picker = Picker::new(Balance::RoundRobin, slots.len(), 0);
        assert_eq!(counts(&picker, &slots, 5000), [1000, 0, 1000, 3000]);
    }

    #[test]
    fn least_connections_takes_the_least_loaded_per_unit_of_weight() {
        let mut slots = pool(&[1, 1, 2]);
        for (slot, active) in slots.iter_mut().zip([3, 2, 5]) {
            slot.active = active;
        }
        // 3/1, 2/1, 5/2: the second.
        for start in 0..3 {
            assert_eq!(least_connections(&slots, start), Some(1));
        }
        slots[1].active = 3;
        // 3/1, 3/1, 5/2: the third, whatever the start.
        for start in 0..3 {
            assert_eq!(least_connections(&slots, start), Some(2));
        }
    }

    #[test]
    fn least_connections_rotates_among_equals() {
        let slots = pool(&[1, 1, 1]);
        let picker = Picker::new(Balance::LeastConnections, slots.len(), 0);
        assert_eq!(counts(&picker, &slots, 300), [100, 100, 100]);
    }

    /// Servers that cannot be chosen (a backup, a down one) do not give
    /// their turns to the candidate after them.
    #[test]
    fn least_connections_rotates_among_the_candidates_only() {
        let mut slots = pool(&[1, 1, 1]);
        slots[2].backup = true;
        let picker = Picker::new(Balance::LeastConnections, slots.len(), 0);
        assert_eq!(counts(&picker, &slots, 300), [150, 150, 0]);
        let mut slots = pool(&[1, 1, 1, 1]);
        slots[1].up = false;
        slots[2].up = false;
        let picker = Picker::new(Balance::LeastConnections, slots.len(), 0);
        assert_eq!(counts(&picker, &slots, 300), [150, 0, 0, 150]);
    }

    #[test]
    fn least_connections_balances_connections_that_stay_open() {
        // Each pick opens a connection that stays: the pool fills evenly,
        // by weight.
        let mut slots = pool(&[1, 1, 2]);
        let picker = Picker::new(Balance::LeastConnections, slots.len(), 0);
        for _ in 0..40 {
            let k = picker.pick(&slots, client(0)).unwrap();
            slots[k].active += 1;
        }
        let active: Vec<usize> = slots.iter().map(|s| s.active).collect();
        assert_eq!(active, [10, 10, 20]);
    }

    #[test]
    fn source_hash_keeps_a_client_on_its_server_and_moves_only_a_removed_servers_clients() {
        let slots = pool(&[1, 1, 1, 1, 1]);
        let picker = Picker::new(Balance::SourceHash, slots.len(), 0);
        let clients = 10_000;
        let before: Vec<usize> = (0..clients)
            .map(|c| picker.pick(&slots, client(c)).unwrap())
            .collect();
        // Again: the same server for every client.
        for c in 0..clients {
            assert_eq!(picker.pick(&slots, client(c)), Some(before[c as usize]));
        }
        let mut shares = vec![0; slots.len()];
        for &k in &before {
            shares[k] += 1;
        }
        for share in &shares {
            assert!((1700..2300).contains(share), "{shares:?}");
        }

        // Server 2 removed from the pool (a reload): the others keep their
        // keys at other places.
        let removed: Vec<Slot> = [0, 1, 3, 4].iter().map(|&k| slots[k]).collect();
        let address_of_place = [0, 1, 3, 4];
        // Server 3 down (checks): the pool as it is.
        let mut down = slots.clone();
        down[3].up = false;
        for c in 0..clients {
            let was = before[c as usize];
            let now = address_of_place[picker.pick(&removed, client(c)).unwrap()];
            if was == 2 {
                assert_ne!(now, 2);
            } else {
                assert_eq!(now, was, "client {c} moved off a server that stayed");
            }
            let now = picker.pick(&down, client(c)).unwrap();
            if was != 3 {
                assert_eq!(now, was, "client {c} moved off a server that is up");
            }
        }
    }

    #[test]
    fn source_hash_weights_scale_a_servers_share_of_clients() {
        let slots = pool(&[1, 3]);
        let picker = Picker::new(Balance::SourceHash, slots.len(), 0);
        let heavy = (0..10_000)
            .filter(|&c| picker.pick(&slots, client(c)) == Some(1))
            .count();
        assert!((7200..7800).contains(&heavy), "{heavy} of 10000");
    }

    #[test]
    fn random_two_never_takes_the_busiest_of_two_and_spreads_equals() {
        let mut slots = pool(&[1, 1, 1, 1]);
        for (slot, active) in slots.iter_mut().zip([4, 0, 4, 9]) {
            slot.active = active;
        }
        let picker = Picker::new(Balance::RandomTwo, slots.len(), 7);
        let counts = counts(&picker, &slots, 6000);
        // The busiest loses every draw it is in; the idle one wins every
        // draw it is in: half of them.
        assert_eq!(counts[3], 0, "{counts:?}");
        assert!((2700..3300).contains(&counts[1]), "{counts:?}");

        let idle = pool(&[1, 1, 1]);
        let counts = self::counts(&picker, &idle, 6000);
        for count in &counts {
            assert!((1700..2300).contains(count), "{counts:?}");
        }
        // Weights hold among idle servers too: 1 to 9.
        let weighted = pool(&[1, 9]);
        let counts = self::counts(&picker, &weighted, 10000);
        assert!((8700..9300).contains(&counts[1]), "{counts:?}");
        // One candidate: that one.
        let mut one = pool(&[1, 1]);
        one[0].tried = true;
        assert_eq!(picker.pick(&one, client(0)), Some(1));
    }

    #[test]
    fn backups_only_when_no_other_server_is_up() {
        let mut slots = pool(&[1, 1, 1, 1]);
        slots[2].backup = true;
        slots[3].backup = true;
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::SourceHash,
            Balance::RandomTwo,
        ] {
            let picker = Picker::new(balance, slots.len(), 1);
            let mut slots = slots.clone();
            let chosen: Vec<usize> = (0..100)
                .map(|c| picker.pick(&slots, client(c)).unwrap())
                .collect();
            assert!(chosen.iter().all(|&k| k < 2), "{balance:?}: {chosen:?}");

            // One of the others up, though tried: still no backup.
            slots[0].up = false;
            slots[1].tried = true;
            assert_eq!(picker.pick(&slots, client(0)), None, "{balance:?}");

            // None up: the backups.
            slots[1].up = false;
            slots[1].tried = false;
            let chosen: HashMap<usize, usize> = (0..100).fold(HashMap::new(), |mut seen, c| {
                *seen
                    .entry(picker.pick(&slots, client(c)).unwrap())
                    .or_default() += 1;
                seen
            });
            assert!(chosen.keys().all(|&k| k >= 2), "{balance:?}: {chosen:?}");
            // Up, but of the other family for this connection: as if down.
            slots[1].up = true;
            slots[1].usable = false;
            assert!(picker.pick(&slots, client(0)).unwrap() >= 2, "{balance:?}");
        }
    }

    #[test]
    fn tried_unusable_and_down_servers_are_never_chosen() {
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::SourceHash,
            Balance::RandomTwo,
        ] {
            let mut slots = pool(&[1, 1, 1]);
            slots[0].tried = true;
            slots[1].usable = false;
            let picker = Picker::new(balance, slots.len(), 3);
            for c in 0..50 {
                assert_eq!(picker.pick(&slots, client(c)), Some(2), "{balance:?}");
            }
            slots[2].up = false;
            assert_eq!(picker.pick(&slots, client(0)), None, "{balance:?}");
        }
    }

    #[test]
    fn keys_depend_on_the_address_only() {
        assert_eq!(
            server_key("203.0.113.2:443".parse().unwrap()),
            server_key("203.0.113.2:443".parse().unwrap())
        );
        assert_ne!(
            server_key("203.0.113.2:443".parse().unwrap()),
            server_key("203.0.113.2:444".parse().unwrap())
        );
        assert_eq!(
            client_key("::ffff:198.51.100.7".parse().unwrap()),
            client_key("198.51.100.7".parse().unwrap())
        );
    }
}
