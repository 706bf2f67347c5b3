//! How long a relayed connection may live and how many one client may hold:
//! `timeouts` (rules and routes), `keepalive` and `limits` (rules). Each
//! value stands alone, so it is checked while the JSON is read and its
//! errors carry the line and column.
//!
//! A field left out inherits: a route's timeouts from its rule's, a rule's
//! from the daemon's flags (`--idle-timeout`, `--max-lifetime`,
//! `--tcp-keepalive`). A timeout of 0 is "none".

use std::time::Duration;

use serde::{
    Deserialize, Deserializer,
    de::{self, Error as _, MapAccess, Visitor},
};

use super::duration::{self, Bounds, Written};

/// Timeouts as a rule or route writes them; `None` inherits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct Timeouts {
    /// Reset (both sides) once no byte has moved either way for this long
    /// (HAProxy's `timeout client`/`server`/`tunnel`).
    #[serde(default, deserialize_with = "some_timeout")]
    pub idle: Option<Duration>,
    /// Reset (both sides) this long after it was accepted, busy or not.
    #[serde(default, deserialize_with = "some_timeout")]
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

/// Seconds or a duration with a unit, 0 (none) to about 30 years: the
/// bounds of the flags these override.
fn some_timeout<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let written = Written::deserialize(deserializer)?;
    Bounds::TIMEOUT
        .check(&written)
        .map(Some)
        .map_err(D::Error::custom)
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

/// Linux's bounds: `TCP_KEEPIDLE` and `TCP_KEEPINTVL` take 1-32767 whole
/// seconds, `TCP_KEEPCNT` 1-127.
const KEEPALIVE_SECONDS: Bounds = Bounds {
    min: Duration::from_secs(1),
    max: Duration::from_secs(32767),
    says: "of 1-32767 whole seconds",
};
const MAX_KEEPALIVE_COUNT: u32 = 127;

/// `TCP_KEEPIDLE` or `TCP_KEEPINTVL`: the kernel counts whole seconds, and
/// rounding `1.5s` either way would not be what was written.
fn keepalive_seconds(written: &Written) -> Result<u32, String> {
    let duration = KEEPALIVE_SECONDS.check(written)?;
    match u32::try_from(duration.as_secs()) {
        Ok(seconds) if duration.subsec_nanos() == 0 => Ok(seconds),
        _ => Err(KEEPALIVE_SECONDS.refusal(written)),
    }
}

fn keepalive_count(count: u32) -> Result<u32, String> {
    if !(1..=MAX_KEEPALIVE_COUNT).contains(&count) {
        return Err(format!(
            "expected 1-{MAX_KEEPALIVE_COUNT} probes, got {count}"
        ));
    }
    Ok(count)
}

impl Keepalive {
    /// `IDLE,INTERVAL,COUNT` or `off`, as `--tcp-keepalive` takes it; IDLE
    /// and INTERVAL are durations, as in a policy (`60`, `1m`).
    pub fn parse(text: &str) -> Result<Keepalive, String> {
        if text == "off" {
            return Ok(Keepalive::Off);
        }
        let [idle, interval, count] = text.split(',').map(str::trim).collect::<Vec<_>>()[..] else {
            return Err(format!(
                "expected IDLE,INTERVAL,COUNT (durations, durations, probes) or off, got {text:?}"
            ));
        };
        let seconds = |name: &str, text: &str| {
            duration::parse(text)
                .and_then(|written| keepalive_seconds(&written))
                .map_err(|reason| format!("keepalive {name}: {reason}"))
        };
        Ok(Keepalive::Probe {
            idle: seconds("idle", idle)?,
            interval: seconds("interval", interval)?,
            count: count
                .parse()
                .map_err(|_| format!("not a number of probes: {count:?}"))
                .and_then(keepalive_count)
                .map_err(|reason| format!("keepalive count: {reason}"))?,
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

/// `false`, or `{ "idle": D, "interval": D, "count": N }`. Read by a
/// visitor rather than an untagged enum: the object's fields are then read
/// in place, so that an error names the field and its line, and a
/// `comment` is skipped as in any other object.
impl<'de> Deserialize<'de> for Keepalive {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KeepaliveVisitor)
    }
}

struct KeepaliveVisitor;

impl<'de> Visitor<'de> for KeepaliveVisitor {
    type Value = Keepalive;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(
            "false, or an object with \"idle\" and \"interval\" (durations) and \"count\" (probes)",
        )
    }

    fn visit_bool<E: de::Error>(self, on: bool) -> Result<Keepalive, E> {
        match on {
            false => Ok(Keepalive::Off),
            true => Err(E::custom(
                "write the probe timing, { \"idle\": S, \"interval\": S, \"count\": N }, or false",
            )),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Keepalive, A::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, expecting = "an object")]
        struct Probe {
            #[serde(deserialize_with = "probe_seconds")]
            idle: u32,
            #[serde(deserialize_with = "probe_seconds")]
            interval: u32,
            #[serde(deserialize_with = "probe_count")]
            count: u32,
        }
        let Probe {
            idle,
            interval,
            count,
        } = super::raw::fields_of(map)?;
        Ok(Keepalive::Probe {
            idle,
            interval,
            count,
        })
    }
}

fn probe_seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    keepalive_seconds(&Written::deserialize(deserializer)?).map_err(D::Error::custom)
}

fn probe_count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    keepalive_count(u32::deserialize(deserializer)?).map_err(D::Error::custom)
}

/// How many connections of one rule a client may hold at once. Over a
/// limit a new connection is reset before a byte is read; the ones it has
/// are left alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
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
#[serde(deny_unknown_fields, expecting = "an object")]
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
        assert_eq!(Keepalive::parse("1m, 10s,6"), Keepalive::parse("60,10,6"));
        for bad in [
            "",
            "60",
            "60,10",
            "60,10,6,1",
            "0,10,6",
            "60,10,128",
            "a,b,c",
            "1.5,10,6",
            "60,1500ms,6",
            "10h,10,6",
            "60,10,6s",
        ] {
            assert!(Keepalive::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Keepalive::parse("60,1500ms,6").unwrap_err(),
            r#"keepalive interval: expected a duration of 1-32767 whole seconds, got "1500ms""#
        );
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
