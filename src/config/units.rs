//! Human-friendly units in the config: durations (`"30s"`) and byte sizes
//! (`"512MiB"`), with parsers whose errors say what would be valid.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest duration accepted anywhere in the config, so that deadlines
/// computed from it never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// A duration written as text: `"250ms"`, `"30s"`, `"5m"`, `"1h 30m"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses `text`, given as `what` (e.g. `--for`), as a duration above
    /// zero and at most `max`.
    ///
    /// # Errors
    /// What is wrong, and what would be valid.
    pub fn parse_within(text: &str, what: &str, max: Duration) -> Result<Self, String> {
        let valid = format!(
            "valid: more than 0s, up to {}",
            humantime::format_duration(max)
        );
        let parsed: Self = match text.parse() {
            Ok(parsed) => parsed,
            // Longer than any duration at all: the limit here is shorter.
            Err(_) if humantime::parse_duration(text.trim()).is_ok() => {
                return Err(format!("{what} {text:?} is out of range; {valid}"));
            }
            Err(error) => return Err(format!("{what}: {error}")),
        };
        if parsed.get().is_zero() || parsed.get() > max {
            return Err(format!(
                "{what} {parsed} is out of range; valid: more than 0s, up to {}",
                humantime::format_duration(max)
            ));
        }
        Ok(parsed)
    }

    /// From whole seconds.
    pub const fn secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// From milliseconds.
    pub const fn millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    /// The wrapped duration.
    pub const fn get(self) -> Duration {
        self.0
    }

    /// In whole milliseconds (saturating).
    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let duration = humantime::parse_duration(text.trim()).map_err(|error| {
            format!(
                "invalid duration {text:?} ({error}): expected a number with a unit, like \"250ms\", \"30s\", \"5m\", \"1h\" or \"7d\""
            )
        })?;
        if duration > MAX_DURATION {
            return Err(format!(
                "duration {text:?} is too long; at most 3650d (ten years)"
            ));
        }
        Ok(Self(duration))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string like \"30s\", \"5m\" or \"250ms\"")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration: a number and a unit (ms, s, m, h, d), e.g. \"250ms\", \"30s\", \"1h 30m\".",
            "pattern": "^\\s*([0-9]+(\\.[0-9]+)?\\s*(nsec|ns|usec|us|µs|msec|ms|seconds|second|secs|sec|s|minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|w|months|month|M|years|year|y)\\s*)+$",
            "examples": ["250ms", "30s", "5m", "1h 30m"]
        })
    }
}

/// A size in bytes, written as an integer or as text: `"64KiB"`, `"512MiB"`,
/// `"2GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` kibibytes.
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }

    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// The size in bytes as a `usize` (saturating).
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

const BYTE_UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("kb", 1_000),
    ("kib", 1 << 10),
    ("k", 1 << 10),
    ("mb", 1_000_000),
    ("mib", 1 << 20),
    ("m", 1 << 20),
    ("gb", 1_000_000_000),
    ("gib", 1 << 30),
    ("g", 1 << 30),
    ("tb", 1_000_000_000_000),
    ("tib", 1 << 40),
];

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            format!(
                "invalid size {text:?}: expected a whole number of bytes or a number with a unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), like \"512MiB\""
            )
        };
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(split);
        let number: u64 = digits.parse().map_err(|_| invalid())?;
        let unit = unit.trim().to_ascii_lowercase();
        let multiplier = if unit.is_empty() {
            1
        } else {
            BYTE_UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, value)| *value)
                .ok_or_else(invalid)?
        };
        number.checked_mul(multiplier).map(Self).ok_or_else(invalid)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The unit that writes the size with the smallest whole number.
        let bytes = self.0;
        let units: [(&str, u64); 8] = [
            ("TiB", 1 << 40),
            ("TB", 1_000_000_000_000),
            ("GiB", 1 << 30),
            ("GB", 1_000_000_000),
            ("MiB", 1 << 20),
            ("MB", 1_000_000),
            ("KiB", 1 << 10),
            ("KB", 1_000),
        ];
        let best = units
            .iter()
            .filter(|(_, size)| bytes >= *size && bytes.is_multiple_of(*size))
            .min_by_key(|(_, size)| bytes / size);
        match best {
            Some((unit, size)) => write!(f, "{}{unit}", bytes / size),
            None => write!(f, "{bytes}B"),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"512MiB\" or a whole number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                text.parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Self::Value, E> {
                u64::try_from(value)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {value}: must not be negative")))
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Self::Value, E> {
                Ok(ByteSize(value))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size: whole bytes, or a number with a unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB).",
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^\\s*[0-9]+\\s*([bB]|[kKmMgG]|[kKmMgGtT][bB]|[kKmMgGtT][iI][bB])?\\s*$"}
            ],
            "examples": ["64KiB", "512MiB", 1048576]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_explain_errors() {
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap(),
            HumanDuration::millis(250)
        );
        assert_eq!(
            "1h 30m".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(5400)
        );
        assert_eq!(
            "1.5h".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(5400)
        );
        assert!(
            "20000d"
                .parse::<HumanDuration>()
                .unwrap_err()
                .contains("too long")
        );
        let error = "5 parsecs".parse::<HumanDuration>().unwrap_err();
        assert!(
            error.contains("\"5 parsecs\"") && error.contains("30s"),
            "{error}"
        );
    }

    #[test]
    fn sizes_parse_and_explain_errors() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(512));
        assert_eq!("2 kb".parse::<ByteSize>().unwrap(), ByteSize(2000));
        assert_eq!("100".parse::<ByteSize>().unwrap(), ByteSize(100));
        for bad in ["", "MiB", "12 parsecs", "99999999999999999999GiB"] {
            let error = bad.parse::<ByteSize>().unwrap_err();
            assert!(error.contains("512MiB"), "{error}");
        }
        assert_eq!(ByteSize::mib(3).to_string(), "3MiB");
        assert_eq!("1 TB".parse::<ByteSize>().unwrap().to_string(), "1TB");
        assert_eq!(ByteSize(1000).to_string(), "1KB");
        assert_eq!(ByteSize(1001).to_string(), "1001B");
    }
}
