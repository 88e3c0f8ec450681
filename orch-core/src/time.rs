//! Instants on the ledger: milliseconds since the Unix epoch, written as RFC 3339 UTC strings
//! with exactly three fractional digits (`2026-11-24T13:58:00.123Z`) so that their text is
//! canonical and sorts like the instant.

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The instants that have a canonical text, whose year has four digits once in UTC:
/// 0000-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z.
const CANONICAL: std::ops::RangeInclusive<i64> = -62_167_219_200_000..=253_402_300_799_999;

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
    /// Instants that would need a five-digit or negative year in UTC (`9999-12-31T23:00:00-05:00`)
    /// are refused: their text could not be read back.
    pub fn parse(s: &str) -> Result<Self, TimestampError> {
        if let Some(ms) = parse_canonical(s.as_bytes()) {
            return Ok(Timestamp(ms));
        }
        let error = |reason: String| TimestampError { input: s.to_string(), reason };
        let ms = DateTime::parse_from_rfc3339(s).map_err(|e| error(e.to_string()))?.timestamp_millis();
        if !CANONICAL.contains(&ms) {
            return Err(error("outside the years 0000 to 9999 (UTC)".into()));
        }
        Ok(Timestamp(ms))
    }
}

/// A string that is not an RFC 3339 instant.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid timestamp {input:?}: {reason}")]
pub struct TimestampError {
    input: String,
    reason: String,
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// The date `days` after 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

const MS_PER_DAY: i64 = 86_400_000;

/// The canonical text of an instant in [`CANONICAL`]. Every event and job carries several
/// instants, so this and [`parse_canonical`] do by arithmetic what chrono does in general; the
/// tests hold them to chrono.
fn canonical_text(ms: i64) -> [u8; 24] {
    let (y, mo, d) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    let t = ms.rem_euclid(MS_PER_DAY);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, y);
    put(5, 2, mo);
    put(8, 2, d);
    put(11, 2, t / 3_600_000);
    put(14, 2, t / 60_000 % 60);
    put(17, 2, t / 1000 % 60);
    put(20, 3, t % 1000);
    out
}

/// The instant a canonical text names, if `s` is one (`YYYY-MM-DDTHH:MM:SS.mmmZ`, a real date,
/// no leap second); anything else is left to chrono.
fn parse_canonical(s: &[u8]) -> Option<i64> {
    if s.len() != 24 || s[4] != b'-' || s[7] != b'-' || s[10] != b'T' || s[13] != b':' || s[16] != b':' {
        return None;
    }
    if s[19] != b'.' || s[23] != b'Z' {
        return None;
    }
    let num = |at: usize, width: usize| -> Option<i64> {
        s[at..at + width].iter().try_fold(0i64, |n, &b| b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0')))
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (h, mi, sec, ms) = (num(11, 2)?, num(14, 2)?, num(17, 2)?, num(20, 3)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if d < 1 || d > month_days || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * MS_PER_DAY + ((h * 60 + mi) * 60 + sec) * 1000 + ms)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if CANONICAL.contains(&self.0) {
            let text = canonical_text(self.0);
            return f.write_str(std::str::from_utf8(&text).expect("ASCII"));
        }
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
        if CANONICAL.contains(&self.0) {
            let text = canonical_text(self.0);
            return s.serialize_str(std::str::from_utf8(&text).expect("ASCII"));
        }
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than `Cow<str>`, whose `Deserialize` always copies the text: every
        // event carries a timestamp or two, and the text is parsed where it lies.
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Timestamp;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an RFC 3339 timestamp")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Timestamp, E> {
                Timestamp::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
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

    // ---- Fuzzing ------------------------------------------------------------------------------

    use proptest::prelude::*;

    /// The first and last instants whose canonical text has the four-digit year the schema's
    /// pattern allows.
    const FIRST: i64 = *CANONICAL.start();
    const LAST: i64 = *CANONICAL.end();

    /// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`), an
    /// independent check of what chrono computes.
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = if y >= 0 { y } else { y - 399 } / 400;
        let yoe = y - era * 400;
        let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
        era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
    }

    fn days_in_month(y: i64, m: i64) -> i64 {
        match m {
            2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    /// The canonical text: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    fn is_canonical(s: &str) -> bool {
        let shape = "dddd-dd-ddTdd:dd:dd.dddZ";
        s.len() == shape.len() && s.bytes().zip(shape.bytes()).all(|(c, p)| c == p || (p == b'd' && c.is_ascii_digit()))
    }

    /// Text shaped like RFC 3339, often not quite it.
    const NEAR_RFC3339: &str = "[0-9]{1,5}-[0-9]{1,2}-[0-9]{1,2}[Tt ][0-9:.]{5,14}([Zz]|[+-][0-9]{2}:?[0-9]{2})?";

    /// A number in `lo..=hi`, often one of the ends (dates and offsets go wrong at the edges).
    fn edgy(lo: i64, hi: i64) -> impl Strategy<Value = i64> {
        prop_oneof![3 => lo..=hi, 1 => Just(lo), 1 => Just(hi)]
    }

    /// An RFC 3339 text built from its parts (a second of 60 being a leap second), and the
    /// instant it names (milliseconds, the fraction truncated).
    fn rfc3339() -> impl Strategy<Value = (String, i64)> {
        (
            edgy(0, 9999),
            edgy(1, 12),
            edgy(1, 31),
            edgy(0, 23),
            edgy(0, 59),
            edgy(0, 60),
            "[0-9]{0,9}",
            prop::option::of(edgy(-1439, 1439)),
        )
            .prop_map(|(y, mo, d, h, mi, s, frac, offset)| {
                let d = d.min(days_in_month(y, mo));
                let zone = match offset {
                    None => "Z".to_string(),
                    Some(o) => format!("{}{:02}:{:02}", if o < 0 { '-' } else { '+' }, o.abs() / 60, o.abs() % 60),
                };
                let dot = if frac.is_empty() { String::new() } else { format!(".{frac}") };
                let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{dot}{zone}");
                let millis: i64 = format!("{frac:0<3}")[..3].parse().unwrap();
                let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - offset.unwrap_or(0) * 60;
                (text, secs * 1000 + millis)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever `parse` accepts, its canonical text gives back: a timestamp read from an API
        /// body or a flag can always be written to the ledger and read again.
        #[test]
        fn accepted_text_round_trips(s in prop_oneof![any::<String>(), NEAR_RFC3339]) {
            if let Ok(t) = Timestamp::parse(&s) {
                prop_assert!(is_canonical(&t.to_string()), "{s:?} gives {t}");
                prop_assert_eq!(Timestamp::parse(&t.to_string()).ok(), Some(t), "{:?}", s);
            }
        }

        #[test]
        fn rfc3339_names_the_instant_computed_independently((text, millis) in rfc3339()) {
            match Timestamp::parse(&text) {
                Ok(t) => {
                    prop_assert_eq!(t.as_millis(), millis, "{}", text);
                    prop_assert!((FIRST..=LAST).contains(&millis), "{text} is {t}, which has no canonical text");
                }
                Err(e) => prop_assert!(!(FIRST..=LAST).contains(&millis), "{text} refused: {e}"),
            }
        }

        /// The arithmetic fast paths write and read exactly what chrono does.
        #[test]
        fn fast_paths_agree_with_chrono(ms in FIRST..=LAST, shape in "[0-9]{4}-(0[0-9]|1[0-3])-([0-2][0-9]|3[0-2])T([01][0-9]|2[0-4]):[0-6][0-9]:[0-6][0-9]\\.[0-9]{3}Z") {
            let text = canonical_text(ms);
            let chrono = DateTime::<Utc>::from_timestamp_millis(ms).unwrap().to_rfc3339_opts(SecondsFormat::Millis, true);
            prop_assert_eq!(std::str::from_utf8(&text).unwrap(), chrono.as_str());
            prop_assert_eq!(parse_canonical(&text), Some(ms));
            let by_chrono = DateTime::parse_from_rfc3339(&shape).ok().map(|t| t.timestamp_millis());
            match parse_canonical(shape.as_bytes()) {
                Some(fast) => prop_assert_eq!(Some(fast), by_chrono, "{}", shape),
                // Left to chrono: not a date, or a leap second.
                None => prop_assert!(by_chrono.is_none() || &shape[17..19] == "60", "{}", shape),
            }
        }

        /// The canonical text round-trips and sorts like the instant.
        #[test]
        fn canonical_text_round_trips_and_sorts(a in FIRST..=LAST, b in FIRST..=LAST) {
            let (ta, tb) = (Timestamp::from_millis(a), Timestamp::from_millis(b));
            let (sa, sb) = (ta.to_string(), tb.to_string());
            prop_assert!(is_canonical(&sa), "{}", sa);
            prop_assert_eq!(Timestamp::parse(&sa).unwrap(), ta);
            prop_assert_eq!(sa.cmp(&sb), a.cmp(&b), "{} vs {}", sa, sb);
            let json = serde_json::to_string(&ta).unwrap();
            prop_assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), ta);
        }

        /// Outside the canonical range the text is refused, never read as another instant.
        #[test]
        fn no_text_reads_back_as_another_instant(ms in any::<i64>()) {
            let t = Timestamp::from_millis(ms);
            match Timestamp::parse(&t.to_string()) {
                Ok(back) => prop_assert_eq!(back, t),
                Err(_) => prop_assert!(!(FIRST..=LAST).contains(&ms), "{} refused", t),
            }
        }
    }

    #[test]
    fn the_canonical_range_ends_where_four_digit_years_do() {
        assert_eq!(Timestamp::from_millis(FIRST).to_string(), "0000-01-01T00:00:00.000Z");
        assert_eq!(Timestamp::from_millis(LAST).to_string(), "9999-12-31T23:59:59.999Z");
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(
            days_from_civil(2026, 11, 24) * 86_400_000,
            Timestamp::parse("2026-11-24T00:00:00Z").unwrap().as_millis()
        );
    }
}
