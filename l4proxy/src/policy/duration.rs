//! Durations as a policy and the command line write them: a number of
//! seconds (`30`, `2.5`), or a number with a unit (`"250ms"`, `"30s"`,
//! `"5m"`, `"1h"`, `"1d"`). One reader for every duration field and flag, so
//! that what `--idle-timeout` takes, `timeouts.idle` takes too.
//!
//! Written by hand rather than with `humantime`: that crate refuses a bare
//! number (which must stay seconds, as policies and flags have always been
//! written) and fractions (`2.5`, `0.5s`), and takes compound forms
//! (`1h 30m`) and months and years that no timeout here needs.
//!
//! Reading and bounds are apart: each field has its own range (a timeout
//! may be 0, a name look-up may not; keepalive is whole seconds), and its
//! message says which, with the value as it was written.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, de};

/// Each unit's length in seconds, as a fraction: `ms` divides, so that
/// `250ms` is exactly 0.25 s (1e-3 is not exact in binary). Longest suffix
/// first, so that `ms` is not read as minutes.
const UNITS: [(&str, f64, f64); 5] = [
    ("ms", 1.0, 1000.0),
    ("s", 1.0, 1.0),
    ("m", 60.0, 1.0),
    ("h", 3600.0, 1.0),
    ("d", 86400.0, 1.0),
];

/// What any duration may be written as, for messages.
pub const SYNTAX: &str = r#"seconds, or a number with a unit: "250ms", "30s", "5m", "1h", "1d""#;

/// A duration as written, before its field's bounds are checked: the
/// seconds may be negative or huge (a JSON number is taken as it is), so
/// that the field's message can say what it takes.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    pub seconds: f64,
    /// As the operator wrote it, for messages: `-1`, `"40000d"`.
    pub text: String,
}

/// `text` as seconds: a number (`30`, `2.5`, `1e3`) with an optional unit,
/// nothing else (no sign, no space, no compound `1h30m`).
pub fn parse(text: &str) -> Result<Written, String> {
    let (number, times, per) = UNITS
        .iter()
        .find_map(|&(unit, times, per)| Some((text.strip_suffix(unit)?, times, per)))
        .unwrap_or((text, 1.0, 1.0));
    // f64's own parser also takes "inf", "NaN", "+5" and ".5": only the
    // JSON number grammar, unsigned, is a duration.
    if !is_unsigned_number(number) {
        return Err(format!("expected a duration ({SYNTAX}), got {text:?}"));
    }
    let seconds = number
        .parse::<f64>()
        .map_err(|_| format!("expected a duration ({SYNTAX}), got {text:?}"))?
        * times
        / per;
    Ok(Written {
        seconds,
        text: format!("{text:?}"),
    })
}

/// `digits [. digits] [e|E [+|-] digits]`.
fn is_unsigned_number(text: &str) -> bool {
    fn digits(text: &str) -> (&str, bool) {
        let rest = text.trim_start_matches(|c: char| c.is_ascii_digit());
        (rest, rest.len() < text.len())
    }
    let (rest, whole) = digits(text);
    if !whole {
        return false;
    }
    let rest = match rest.strip_prefix('.') {
        Some(fraction) => match digits(fraction) {
            (rest, true) => rest,
            (_, false) => return false,
        },
        None => rest,
    };
    match rest.strip_prefix(['e', 'E']) {
        Some(exponent) => {
            let exponent = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            matches!(digits(exponent), ("", true))
        }
        None => rest.is_empty(),
    }
}

/// The range a field takes, and how its message says it.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub min: Duration,
    pub max: Duration,
    /// Completes "expected a duration ...": `from 0 (none) to 1000000000
    /// seconds`.
    pub says: &'static str,
}

/// The longest duration a policy or a flag may give: about 30 years, far
/// below what `Instant` arithmetic can overflow.
pub const MAX: Duration = Duration::from_secs(1_000_000_000);

impl Bounds {
    /// 0 to [`MAX`], where 0 means none: a policy's timeouts.
    pub const TIMEOUT: Bounds = Bounds {
        min: Duration::ZERO,
        max: MAX,
        says: "from 0 (none) to 1000000000 seconds",
    };

    /// 0 to [`MAX`]: the duration flags of `l4proxy run`.
    pub const FLAG: Bounds = Bounds {
        min: Duration::ZERO,
        max: MAX,
        says: "from 0 to 1000000000 seconds",
    };

    /// Why `written` is refused.
    pub fn refusal(&self, written: &Written) -> String {
        format!("expected a duration {}, got {}", self.says, written.text)
    }

    /// The duration `written` is, if within these bounds. Compared once
    /// made a `Duration` (whole nanoseconds), so that a value that rounds
    /// to 0 is not "above 0".
    pub fn check(&self, written: &Written) -> Result<Duration, String> {
        // Negative, NaN and overflowing seconds are no `Duration`. A value
        // above 0 that rounds to 0 ns is refused: 0 may mean "none".
        match Duration::try_from_secs_f64(written.seconds) {
            // -0 has a sign, which durations do not.
            _ if written.seconds.is_sign_negative() => Err(self.refusal(written)),
            Ok(duration) if duration.is_zero() && written.seconds > 0.0 => {
                Err(self.refusal(written))
            }
            Ok(duration) if (self.min..=self.max).contains(&duration) => Ok(duration),
            _ => Err(self.refusal(written)),
        }
    }

    /// `text` read and checked: what a flag's value parser does.
    pub fn parse(&self, text: &str) -> Result<Duration, String> {
        self.check(&parse(text)?)
    }
}

/// A JSON number is seconds; a string is read by [`parse`].
impl<'de> Deserialize<'de> for Written {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(WrittenVisitor)
    }
}

struct WrittenVisitor;

impl de::Visitor<'_> for WrittenVisitor {
    type Value = Written;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a duration: {SYNTAX}")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Written, E> {
        Ok(Written {
            seconds: n as f64,
            text: n.to_string(),
        })
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Written, E> {
        Ok(Written {
            seconds: n as f64,
            text: n.to_string(),
        })
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Written, E> {
        // `1e300` as written, not as its 301 digits.
        let text = if n.abs() >= 1e15 {
            format!("{n:e}")
        } else {
            n.to_string()
        };
        Ok(Written { seconds: n, text })
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Written, E> {
        parse(text).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Duration, String> {
        Bounds::TIMEOUT.parse(text)
    }

    #[test]
    fn numbers_are_seconds_and_units_scale_them() {
        for (text, expected) in [
            ("30", Duration::from_secs(30)),
            ("2.5", Duration::from_millis(2500)),
            ("0", Duration::ZERO),
            ("1e3", Duration::from_secs(1000)),
            ("250ms", Duration::from_millis(250)),
            ("100ms", Duration::from_millis(100)),
            ("1ms", Duration::from_millis(1)),
            ("0.5ms", Duration::from_micros(500)),
            ("30s", Duration::from_secs(30)),
            ("1.5s", Duration::from_millis(1500)),
            ("5m", Duration::from_secs(300)),
            ("0.1m", Duration::from_secs(6)),
            ("1h", Duration::from_secs(3600)),
            ("1d", Duration::from_secs(86400)),
            ("1000000000s", MAX),
        ] {
            assert_eq!(read(text), Ok(expected), "{text:?}");
        }
    }

    #[test]
    fn anything_else_is_refused_with_the_syntax() {
        for text in [
            "", "s", "ms", "-1", "+1", "-1s", ".5", "5.", "1e", "inf", "NaN", "infs", "30 s",
            " 30", "30S", "5M", "1h30m", "1w", "30sec", "0x10", "1_000",
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(r#""250ms", "30s""#), "{text:?}: {err}");
            assert!(err.ends_with(&format!("got {text:?}")), "{text:?}: {err}");
        }
    }

    #[test]
    fn bounds_name_the_value_as_written() {
        assert_eq!(
            read("40000d").unwrap_err(),
            r#"expected a duration from 0 (none) to 1000000000 seconds, got "40000d""#
        );
        assert!(read("1000000001").is_err());
        assert!(read("1e300").is_err());
        // Above 0 but 0 ns: it would read as "no timeout".
        assert_eq!(
            read("0.0000000001").unwrap_err(),
            r#"expected a duration from 0 (none) to 1000000000 seconds, got "0.0000000001""#
        );
        assert_eq!(read("0"), Ok(Duration::ZERO));
        let negative = Written {
            seconds: -1.0,
            text: "-1".to_owned(),
        };
        assert_eq!(
            Bounds::TIMEOUT.check(&negative).unwrap_err(),
            "expected a duration from 0 (none) to 1000000000 seconds, got -1"
        );
        let above_zero = Bounds {
            min: Duration::from_nanos(1),
            max: Duration::from_secs(300),
            says: "above 0, at most 300 seconds",
        };
        assert!(above_zero.parse("0").is_err());
        // Rounds to 0 ns: not above 0.
        assert!(above_zero.parse("0.0000000001").is_err());
        assert_eq!(above_zero.parse("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(above_zero.parse("5m"), Ok(Duration::from_secs(300)));
        assert!(above_zero.parse("5.1m").is_err());
    }

    #[test]
    fn json_numbers_are_seconds_and_strings_are_parsed() {
        let written = |json: &str| serde_json::from_str::<Written>(json);
        assert_eq!(written("30").unwrap().seconds, 30.0);
        assert_eq!(written("-2").unwrap().text, "-2");
        assert_eq!(written("2.5").unwrap().seconds, 2.5);
        // JSON's -0 is no duration: a duration has no sign.
        for minus_zero in ["-0", "-0.0"] {
            let written = written(minus_zero).unwrap();
            assert_eq!(
                Bounds::TIMEOUT.check(&written).unwrap_err(),
                "expected a duration from 0 (none) to 1000000000 seconds, got -0"
            );
        }
        // A huge number is echoed short, not as its 301 digits.
        assert_eq!(written("1e300").unwrap().text, "1e300");
        assert_eq!(written("-2.5e20").unwrap().text, "-2.5e20");
        assert_eq!(written(r#""5m""#).unwrap().seconds, 300.0);
        assert_eq!(written(r#""5m""#).unwrap().text, r#""5m""#);
        let err = written(r#""5 minutes""#).unwrap_err().to_string();
        assert!(err.contains(r#"got "5 minutes""#), "{err}");
        let err = written("true").unwrap_err().to_string();
        assert!(err.contains("expected a duration: seconds"), "{err}");
    }
}
