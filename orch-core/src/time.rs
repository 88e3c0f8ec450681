//! Instants on the ledger: milliseconds since the Unix epoch, written as RFC 3339 UTC strings
//! with exactly three fractional digits (`2026-11-24T13:58:00.123Z`) so that their text is
//! canonical and sorts like the instant.

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A UTC instant with millisecond precision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The instant `ms` milliseconds after the Unix epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This instant plus `ms` milliseconds (saturating).
    pub fn plus_millis(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Parses an RFC 3339 instant (any offset; converted to UTC, truncated to milliseconds).
    pub fn parse(s: &str) -> Result<Self, TimestampError> {
        let dt = DateTime::parse_from_rfc3339(s)
            .map_err(|e| TimestampError { input: s.to_string(), reason: e.to_string() })?;
        Ok(Timestamp(dt.timestamp_millis()))
    }
}

/// A string that is not an RFC 3339 instant.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid timestamp {input:?}: {reason}")]
pub struct TimestampError {
    input: String,
    reason: String,
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match DateTime::<Utc>::from_timestamp_millis(self.0) {
            Some(dt) => f.write_str(&dt.to_rfc3339_opts(SecondsFormat::Millis, true)),
            None => write!(f, "@{}ms", self.0),
        }
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Timestamp::parse(s)
    }
}

impl Add<std::time::Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: std::time::Duration) -> Timestamp {
        self.plus_millis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

impl Sub for Timestamp {
    type Output = i64;
    /// Milliseconds between two instants.
    fn sub(self, rhs: Timestamp) -> i64 {
        self.0.saturating_sub(rhs.0)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "RFC 3339 UTC instant with exactly three fractional digits",
            "type": "string",
            "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_millis() {
        let t = Timestamp::parse("2026-11-24T13:58:00.123+01:00").unwrap();
        assert_eq!(t.to_string(), "2026-11-24T12:58:00.123Z");
        assert_eq!(Timestamp::parse(&t.to_string()).unwrap(), t);
        assert_eq!(Timestamp::from_millis(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert!(Timestamp::parse("yesterday").is_err());
    }
}
