//! How long a relayed connection may live and how many one client may hold:
//! `timeouts` (rules and routes), `keepalive` and `limits` (rules). Each
//! value stands alone, so it is checked while the JSON is read and its
//! errors carry the line and column.
//!
//! A field left out inherits: a route's timeouts from its rule's, a rule's
//! from the daemon's flags (`--idle-timeout`, `--max-lifetime`,
//! `--tcp-keepalive`). A timeout of 0 is "none".

use std::time::Duration;

use serde::{Deserialize, Deserializer, de::Error as _};

/// Timeouts as a rule or route writes them; `None` inherits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Closed once no byte has moved either way for this long
    /// (HAProxy's `timeout client`/`server`/`tunnel`).
    #[serde(default, deserialize_with = "some_seconds")]
    pub idle: Option<Duration>,
    /// Closed this long after it was accepted, busy or not.
    #[serde(default, deserialize_with = "some_seconds")]
    pub lifetime: Option<Duration>,
}

impl Timeouts {
    /// These, with what they leave out taken from `outer`.
    pub fn or(self, outer: Timeouts) -> Timeouts {
        Timeouts {
            idle: self.idle.or(outer.idle),
            lifetime: self.lifetime.or(outer.lifetime),
        }
    }
}

/// The longest timeout a policy may give: about 30 years, far below what
/// `Instant` arithmetic can overflow.
const MAX_SECONDS: f64 = 1e9;

fn some_seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let seconds = f64::deserialize(deserializer)?;
    if !(0.0..=MAX_SECONDS).contains(&seconds) {
        return Err(D::Error::custom(format!(
            "expected seconds from 0 (none) to {MAX_SECONDS}, got {seconds}"
        )));
    }
    Ok(Some(Duration::from_secs_f64(seconds)))
}

/// TCP keepalive on both sides of a connection: a peer that vanished (its
/// host gone, a firewall forgetting the flow) is found even when the idle
/// timeout is long, and the connection is closed with a reset to the other
/// side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keepalive {
    Off,
    /// `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`: probes start after
    /// `idle` seconds of silence, every `interval` seconds, and the peer is
    /// given up after `count` unanswered ones.
    Probe {
        idle: u32,
        interval: u32,
        count: u32,
    },
}

/// Linux's bounds: `TCP_KEEPIDLE` and `TCP_KEEPINTVL` take 1-32767 seconds,
/// `TCP_KEEPCNT` 1-127.
const MAX_KEEPALIVE_SECONDS: u32 = 32767;
const MAX_KEEPALIVE_COUNT: u32 = 127;

impl Keepalive {
    /// `IDLE,INTERVAL,COUNT` or `off`, as `--tcp-keepalive` takes it.
    pub fn parse(text: &str) -> Result<Keepalive, String> {
        if text == "off" {
            return Ok(Keepalive::Off);
        }
        let numbers: Vec<u32> = text
            .split(',')
            .map(|n| n.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                format!(
                    "expected IDLE,INTERVAL,COUNT (seconds, seconds, probes) or off, got {text:?}"
                )
            })?;
        let [idle, interval, count] = numbers[..] else {
            return Err(format!(
                "expected IDLE,INTERVAL,COUNT (seconds, seconds, probes) or off, got {text:?}"
            ));
        };
        Keepalive::probe(idle, interval, count)
    }

    fn probe(idle: u32, interval: u32, count: u32) -> Result<Keepalive, String> {
        for (name, value, max) in [
            ("idle", idle, MAX_KEEPALIVE_SECONDS),
            ("interval", interval, MAX_KEEPALIVE_SECONDS),
            ("count", count, MAX_KEEPALIVE_COUNT),
        ] {
            if !(1..=max).contains(&value) {
                return Err(format!("keepalive {name} must be 1-{max}, got {value}"));
            }
        }
        Ok(Keepalive::Probe {
            idle,
            interval,
            count,
        })
    }
}

impl std::fmt::Display for Keepalive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keepalive::Off => f.write_str("off"),
            Keepalive::Probe {
                idle,
                interval,
                count,
            } => write!(f, "{idle},{interval},{count}"),
        }
    }
}

/// `false`, or `{ "idle": S, "interval": S, "count": N }`.
impl<'de> Deserialize<'de> for Keepalive {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Probe {
            idle: u32,
            interval: u32,
            count: u32,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Flag(bool),
            Probe(Probe),
        }
        match Written::deserialize(deserializer).map_err(|_| {
            D::Error::custom(
                "expected false, or an object with \"idle\" and \"interval\" (seconds) and \"count\" (probes)",
            )
        })? {
            Written::Flag(false) => Ok(Keepalive::Off),
            Written::Flag(true) => Err(D::Error::custom(
                "write the probe timing, { \"idle\": S, \"interval\": S, \"count\": N }, or false",
            )),
            Written::Probe(p) => {
                Keepalive::probe(p.idle, p.interval, p.count).map_err(D::Error::custom)
            }
        }
    }
}

/// How many connections of one rule a client may hold at once. Over a
/// limit a new connection is reset before a byte is read; the ones it has
/// are left alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientLimits {
    /// Per client address.
    #[serde(default, deserialize_with = "some_count")]
    pub per_client: Option<u32>,
    /// Per client prefix: many addresses of one network (an IPv6 client
    /// has a /64 to pick from).
    #[serde(default, deserialize_with = "some_prefix_limit")]
    pub per_client_prefix: Option<PrefixLimit>,
}

impl ClientLimits {
    pub fn is_none(&self) -> bool {
        self.per_client.is_none() && self.per_client_prefix.is_none()
    }
}

/// At most `max` connections from the addresses of one `/ipv4` or `/ipv6`
/// prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixLimit {
    #[serde(default = "default_ipv4_len")]
    pub ipv4: u8,
    #[serde(default = "default_ipv6_len")]
    pub ipv6: u8,
    pub max: u32,
}

fn default_ipv4_len() -> u8 {
    24
}

fn default_ipv6_len() -> u8 {
    64
}

fn some_count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    match u32::deserialize(deserializer)? {
        0 => Err(D::Error::custom(
            "0 would refuse every connection; leave the limit out for none",
        )),
        n => Ok(Some(n)),
    }
}

fn some_prefix_limit<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PrefixLimit>, D::Error> {
    let limit = super::raw::Object::<PrefixLimit>::deserialize(deserializer)?.0;
    if !(1..=32).contains(&limit.ipv4) {
        return Err(D::Error::custom(format!(
            "\"ipv4\" is a prefix length 1-32, got {}",
            limit.ipv4
        )));
    }
    if !(1..=128).contains(&limit.ipv6) {
        return Err(D::Error::custom(format!(
            "\"ipv6\" is a prefix length 1-128, got {}",
            limit.ipv6
        )));
    }
    if limit.max == 0 {
        return Err(D::Error::custom(
            "\"max\": 0 would refuse every connection; leave the limit out for none",
        ));
    }
    Ok(Some(limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_flag_text() {
        assert_eq!(Keepalive::parse("off"), Ok(Keepalive::Off));
        assert_eq!(
            Keepalive::parse("60,10,6"),
            Ok(Keepalive::Probe {
                idle: 60,
                interval: 10,
                count: 6
            })
        );
        for bad in [
            "",
            "60",
            "60,10",
            "60,10,6,1",
            "0,10,6",
            "60,10,128",
            "a,b,c",
        ] {
            assert!(Keepalive::parse(bad).is_err(), "{bad:?}");
        }
        let probe = Keepalive::parse("1,2,3").unwrap();
        assert_eq!(Keepalive::parse(&probe.to_string()), Ok(probe));
    }

    #[test]
    fn route_timeouts_inherit_what_they_leave_out() {
        let rule = Timeouts {
            idle: Some(Duration::from_secs(30)),
            lifetime: Some(Duration::from_secs(600)),
        };
        let route = Timeouts {
            idle: Some(Duration::from_secs(5)),
            lifetime: None,
        };
        assert_eq!(
            route.or(rule),
            Timeouts {
                idle: Some(Duration::from_secs(5)),
                lifetime: Some(Duration::from_secs(600)),
            }
        );
    }
}
