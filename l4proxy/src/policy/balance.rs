//! How an upstream spreads its connections over its servers, and how it
//! learns which are down: `balance`, servers with a `weight` or as a
//! `backup`, `retries`, `health` (active TCP checks, with HAProxy's knobs
//! and defaults) and `observe` (passive: failed connects of real traffic).
//!
//! ```json
//! "web": {
//!   "servers": ["203.0.113.2:443", { "address": "203.0.113.3:443", "weight": 3 },
//!               { "address": "203.0.113.9:443", "backup": true }],
//!   "balance": "least-connections",
//!   "health": { "interval": "2s", "rise": 2, "fall": 3 },
//!   "observe": { "errors": 5 }
//! }
//! ```
//!
//! Each value is checked where it is read (its errors carry line and
//! column); what depends on the whole upstream (the number of servers, a
//! PROXY header to send) is checked with it, in [`Balancing::of`].

use std::{fmt, time::Duration};

use serde::{
    Deserialize, Deserializer,
    de::{self, Error as _, MapAccess, Visitor},
};

use super::{
    duration::{self, Bounds},
    raw::{Object, Server, fields_of, some},
};

/// How the next server is chosen (see [`crate::balance`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// In turn, each server as often as its weight says.
    #[default]
    RoundRobin,
    /// The fewest open connections per unit of weight.
    LeastConnections,
    /// By the client's IP address (rendezvous hashing): a client keeps its
    /// server, and a server that goes moves only its own clients.
    SourceHash,
    /// The less loaded of two servers drawn at random.
    RandomTwo,
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-connections",
            Balance::SourceHash => "source-hash",
            Balance::RandomTwo => "random-two",
        })
    }
}

/// What a pool's server is besides its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// 1-256: its share of connections, against the others' (HAProxy's
    /// `weight`).
    pub weight: u32,
    /// Used only while no other server is up.
    pub backup: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            weight: 1,
            backup: false,
        }
    }
}

/// Active checks: a TCP connection to each server, every `interval`. A
/// server that is up is marked down after `fall` failed checks in a row, a
/// server that is down is marked up after `rise` good ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Between checks of a server that is up (HAProxy's `inter`, 2 s).
    pub interval: Duration,
    /// Between checks while a server is on its way up or down, from its
    /// first check that differs until `rise` or `fall` is reached
    /// (`fastinter`; default: `interval`).
    pub fast_interval: Duration,
    /// Between checks of a server that is down (`downinter`; default:
    /// `interval`).
    pub down_interval: Duration,
    /// Good checks in a row that bring a server up (2).
    pub rise: u32,
    /// Failed checks in a row that take a server down (3).
    pub fall: u32,
    /// How long a check's connection may take (default: `interval`).
    pub timeout: Duration,
    /// Send the upstream's PROXY header (the LOCAL command; `UNKNOWN` in
    /// v1) on the check's connection, for servers that require one
    /// (HAProxy's `check-send-proxy`).
    pub send_proxy: bool,
}

/// Passive observation: `errors` failed connects in a row of relayed
/// connections mark a server down (HAProxy's `observe layer4` with
/// `error-limit` and `on-error mark-down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observe {
    pub errors: u32,
    /// How long a server that observation took down stays down when no
    /// `health` checks run to bring it back (30 s); then connections try it
    /// again.
    pub down_for: Duration,
}

/// An upstream's balancing and health, as checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balancing {
    pub balance: Balance,
    /// One per server of the pool, in the order of `Upstream::servers`;
    /// empty when every server has weight 1 and none is a backup (always
    /// so for parents and the original destination).
    pub servers: Vec<ServerOptions>,
    /// Further servers a connection tries when one fails to connect;
    /// `None`: every other server once.
    pub retries: Option<usize>,
    pub health: Option<HealthCheck>,
    pub observe: Option<Observe>,
}

impl Balancing {
    /// The `k`th server's weight and role.
    pub fn options(&self, k: usize) -> ServerOptions {
        self.servers.get(k).copied().unwrap_or_default()
    }
}

/// What an upstream object says about balancing, read; checked against the
/// rest of the upstream by [`Balancing::of`].
pub(super) struct RawBalancing {
    pub balance: Option<Balance>,
    pub retries: Option<u32>,
    pub health: Option<Object<RawHealth>>,
    pub observe: Option<Object<RawObserve>>,
}

impl Balancing {
    /// The balancing of an upstream with `count` servers, `servers` their
    /// options as written (empty for parents, whose servers have none), and
    /// if `proxy_header`, a PROXY header to send.
    pub(super) fn of(
        raw: RawBalancing,
        servers: Vec<ServerOptions>,
        count: usize,
        proxy_header: bool,
    ) -> Result<Balancing, &'static str> {
        let written = raw.balance.is_some()
            || raw.retries.is_some()
            || raw.health.is_some()
            || raw.observe.is_some();
        if count == 0 && written {
            return Err(
                r#"an "original_destination" upstream has no servers to balance or check: "balance", "retries", "health" and "observe" need "servers" or "parent""#,
            );
        }
        let health = raw.health.map(|Object(raw)| HealthCheck::from(raw));
        let observe = match raw.observe {
            Some(Object(raw)) if raw.down_for.is_some() && health.is_some() => {
                return Err(
                    r#""observe.down_for" is for upstreams without "health": with checks, a server observation took down comes back after "rise" good checks"#,
                );
            }
            Some(Object(raw)) => Some(Observe {
                errors: raw.errors.map_or(DEFAULT_ERRORS, |c| c.0),
                down_for: raw.down_for.unwrap_or(DEFAULT_DOWN_FOR),
            }),
            None => None,
        };
        if health.is_some_and(|h| h.send_proxy) && !proxy_header {
            return Err(
                r#""health.send_proxy" sends the upstream's PROXY header, but it has no "proxy_protocol""#,
            );
        }
        if !servers.is_empty() && servers.iter().all(|s| s.backup) {
            return Err("every server is a backup: at least one must not be");
        }
        if servers.iter().any(|s| s.backup) && health.is_none() && observe.is_none() {
            return Err(
                r#"a backup server is used only when no other is up, which only "health" or "observe" can tell: add one"#,
            );
        }
        let retries = raw.retries.map(|r| r as usize);
        if retries.is_some_and(|r| r >= count) {
            return Err(
                r#""retries" must be less than the number of servers: a connection tries each server at most once"#,
            );
        }
        // Options only where one differs from the default, so that plain
        // pools compare equal however they were written.
        let servers = if servers.iter().all(|s| *s == ServerOptions::default()) {
            Vec::new()
        } else {
            servers
        };
        Ok(Balancing {
            balance: raw.balance.unwrap_or_default(),
            servers,
            retries,
            health,
            observe,
        })
    }
}

/// HAProxy's `error-limit` default.
const DEFAULT_ERRORS: u32 = 10;
/// Envoy's outlier detection's base ejection time.
const DEFAULT_DOWN_FOR: Duration = Duration::from_secs(30);
/// HAProxy's `inter`, `rise` and `fall` defaults.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;

/// A pool's server: `"address:port"`, or an object with its address and
/// options.
pub(super) struct PoolServer {
    pub address: Server,
    pub options: ServerOptions,
}

impl<'de> Deserialize<'de> for PoolServer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // The address is checked once read, as for a plain server list, so
        // that its error is placed as it always was (after the string).
        match deserializer.deserialize_any(PoolServerVisitor)? {
            Written::Address(text) => Ok(PoolServer {
                address: Server::try_from(text).map_err(D::Error::custom)?,
                options: ServerOptions::default(),
            }),
            Written::Object(fields) => Ok(PoolServer {
                address: fields.address,
                options: ServerOptions {
                    weight: fields.weight.map_or(1, |w| w.0),
                    backup: fields.backup.unwrap_or(false),
                },
            }),
        }
    }
}

/// A pool's server as written.
enum Written {
    Address(String),
    Object(ServerFields),
}

struct PoolServerVisitor;

impl<'de> Visitor<'de> for PoolServerVisitor {
    type Value = Written;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            r#"a server address like "203.0.113.2:8080", or an object with "address" and "weight" or "backup""#,
        )
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Written, E> {
        Ok(Written::Address(text.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Written, A::Error> {
        fields_of(map).map(Written::Object)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
struct ServerFields {
    address: Server,
    #[serde(default, deserialize_with = "some")]
    weight: Option<Weight>,
    #[serde(default, deserialize_with = "some")]
    backup: Option<bool>,
}

/// 1-256, as HAProxy takes them (without its 0, which would be a server
/// that never gets a connection: leave it out, or make it a backup).
#[derive(Deserialize)]
#[serde(try_from = "u64")]
struct Weight(u32);

const MAX_WEIGHT: u32 = 256;

impl TryFrom<u64> for Weight {
    type Error = String;
    fn try_from(weight: u64) -> Result<Self, Self::Error> {
        match u32::try_from(weight) {
            Ok(weight @ 1..=MAX_WEIGHT) => Ok(Weight(weight)),
            _ => Err(format!("a weight is 1-{MAX_WEIGHT}, got {weight}")),
        }
    }
}

/// A check's count: `rise`, `fall`, `errors`.
#[derive(Deserialize)]
#[serde(try_from = "u64")]
struct Count(u32);

const MAX_COUNT: u32 = 1000;

impl TryFrom<u64> for Count {
    type Error = String;
    fn try_from(count: u64) -> Result<Self, Self::Error> {
        match u32::try_from(count) {
            Ok(count @ 1..=MAX_COUNT) => Ok(Count(count)),
            _ => Err(format!("expected 1-{MAX_COUNT}, got {count}")),
        }
    }
}

/// A check's interval or timeout: at least 10 ms (more often would be a
/// flood, not a check), at most a day.
const CHECK_TIME: Bounds = Bounds {
    min: Duration::from_millis(10),
    max: Duration::from_secs(86400),
    says: "from 10ms to 1d",
};

fn some_check_time<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let written = duration::Written::deserialize(deserializer)?;
    CHECK_TIME
        .check(&written)
        .map(Some)
        .map_err(D::Error::custom)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawHealth {
    #[serde(default, deserialize_with = "some_check_time")]
    interval: Option<Duration>,
    #[serde(default, deserialize_with = "some_check_time")]
    fast_interval: Option<Duration>,
    #[serde(default, deserialize_with = "some_check_time")]
    down_interval: Option<Duration>,
    #[serde(default, deserialize_with = "some")]
    rise: Option<Count>,
    #[serde(default, deserialize_with = "some")]
    fall: Option<Count>,
    #[serde(default, deserialize_with = "some_check_time")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "some")]
    send_proxy: Option<bool>,
}

impl From<RawHealth> for HealthCheck {
    fn from(raw: RawHealth) -> Self {
        let interval = raw.interval.unwrap_or(DEFAULT_INTERVAL);
        HealthCheck {
            interval,
            fast_interval: raw.fast_interval.unwrap_or(interval),
            down_interval: raw.down_interval.unwrap_or(interval),
            rise: raw.rise.map_or(DEFAULT_RISE, |c| c.0),
            fall: raw.fall.map_or(DEFAULT_FALL, |c| c.0),
            timeout: raw.timeout.unwrap_or(interval),
            send_proxy: raw.send_proxy.unwrap_or(false),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawObserve {
    #[serde(default, deserialize_with = "some")]
    errors: Option<Count>,
    #[serde(default, deserialize_with = "some_check_time")]
    down_for: Option<Duration>,
}
