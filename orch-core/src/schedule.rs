//! Cron schedules: when a schedule fires, in its time zone, and which missed firings to catch
//! up after downtime. Expressions are the `cron` crate's (6 or 7 fields, with seconds) or the
//! classic 5 fields (minute hour day-of-month month day-of-week, day-of-week 0-7 with Sunday
//! as 0 or 7), which are translated.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::flow::FlowError;
use crate::Timestamp;

/// What a schedule does when its previous firing's job has not finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlapPolicy {
    /// Skip this firing.
    #[default]
    Skip,
    /// Enqueue anyway.
    Queue,
    /// Cancel the previous job, then enqueue.
    CancelPrevious,
}

/// A parsed cron expression with its time zone.
#[derive(Clone, Debug)]
pub struct CronSpec {
    schedule: cron::Schedule,
    tz: chrono_tz::Tz,
}

/// Turns a classic 5-field expression into the crate's 6-field form (seconds first, day of
/// week 1-7 from Sunday).
fn six_fields(expr: &str) -> String {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() != 5 {
        return expr.to_string();
    }
    let dow = if fields[4] == "*" {
        "*".to_string()
    } else {
        fields[4]
            .split(',')
            .map(|part| classic_days(part).unwrap_or_else(|| shifted(part)))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("0 {} {} {} {} {dow}", fields[0], fields[1], fields[2], fields[3])
}

/// The days a numeric classic day-of-week part names (`3`, `1-5`, `*/2`, `1-7/2`, `5/2`; 0-7,
/// Sunday 0 or 7), as a list of the crate's numbers. A range or step that reaches 7 includes
/// Sunday, which in the crate's numbering is 1, not after 7 (Saturday): `1-7` is every day, not
/// `2-7`. `None` for anything else (names, descending ranges), which [`shifted`] translates.
fn classic_days(part: &str) -> Option<String> {
    let (range, step) = match part.split_once('/') {
        Some((r, s)) => (r, s.parse::<usize>().ok().filter(|&s| s >= 1)?),
        None => (part, 1),
    };
    let day = |d: &str| d.parse::<u8>().ok().filter(|&n| n <= 7);
    let (from, to) = match range.split_once('-') {
        Some((a, b)) => (day(a)?, day(b)?),
        None if range == "*" => (0, 7),
        None if part.contains('/') => (day(range)?, 7),
        None => (day(range)?, day(range)?),
    };
    if from > to {
        return None;
    }
    let mut days: Vec<u8> = (from..=to).step_by(step).map(|d| d % 7 + 1).collect();
    days.sort_unstable();
    days.dedup();
    Some(days.iter().map(u8::to_string).collect::<Vec<_>>().join(","))
}

/// A day-of-week part with each number moved to the crate's numbering, names left alone.
fn shifted(part: &str) -> String {
    let (range, step) = match part.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (part, None),
    };
    let shift = |d: &str| match d.parse::<u8>() {
        Ok(n @ 0..=7) => ((n % 7) + 1).to_string(),
        _ => d.to_string(),
    };
    let range = match range.split_once('-') {
        Some((a, b)) => format!("{}-{}", shift(a), shift(b)),
        None => shift(range),
    };
    match step {
        Some(s) => format!("{range}/{s}"),
        None => range,
    }
}

fn to_utc(t: Timestamp) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(t.as_millis()).single()
}

impl CronSpec {
    /// Parses an expression and an IANA time zone name.
    pub fn parse(expr: &str, tz: &str) -> Result<CronSpec, FlowError> {
        let tz = chrono_tz::Tz::from_str(tz).map_err(|_| FlowError::TimeZone(tz.to_string()))?;
        let schedule = cron::Schedule::from_str(&six_fields(expr))
            .map_err(|e| FlowError::Cron { expr: expr.to_string(), message: e.to_string() })?;
        Ok(CronSpec { schedule, tz })
    }

    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let at = to_utc(t)?.with_timezone(&self.tz);
        self.schedule.after(&at).next().map(|d| Timestamp::from_millis(d.timestamp_millis()))
    }

    /// Firings in `(after, until]`, at most `max`, earliest first.
    pub fn fires(&self, after: Timestamp, until: Timestamp, max: usize) -> Vec<Timestamp> {
        let Some(at) = to_utc(after) else { return Vec::new() };
        self.schedule
            .after(&at.with_timezone(&self.tz))
            .map(|d| Timestamp::from_millis(d.timestamp_millis()))
            .take_while(|t| *t <= until)
            .take(max)
            .collect()
    }
}

/// What to fire now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatchUp {
    /// Firings to run, earliest first: at most the bound, the most recent ones.
    pub fire: Vec<Timestamp>,
    /// Firings dropped by the bound.
    pub missed: usize,
}

/// The firings due after `last_fired` (or the schedule's creation) up to `now`, keeping at
/// most `max_catch_up` (the most recent; at least one when any is due).
pub fn catch_up(
    spec: &CronSpec,
    last_fired: Option<Timestamp>,
    created_at: Timestamp,
    now: Timestamp,
    max_catch_up: usize,
) -> CatchUp {
    const SCAN: usize = 100_000;
    let from = last_fired.map_or(created_at, |l| l.max(created_at));
    let mut due = spec.fires(from, now, SCAN);
    let keep = max_catch_up.max(1);
    let missed = due.len().saturating_sub(keep);
    due.drain(..missed);
    CatchUp { fire: due, missed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse(s).unwrap()
    }

    #[test]
    fn five_fields_with_a_zone() {
        let s = CronSpec::parse("30 2 * * *", "America/New_York").unwrap();
        // 2026-03-08 is the spring-forward day in New York: 02:30 does not exist that day.
        let fires = s.fires(ts("2026-03-07T00:00:00Z"), ts("2026-03-10T00:00:00Z"), 10);
        assert_eq!(fires[0], ts("2026-03-07T07:30:00Z"), "02:30 EST");
        assert!(fires.contains(&ts("2026-03-09T06:30:00Z")), "02:30 EDT the day after");
        assert!(fires.iter().all(|f| *f != ts("2026-03-08T07:30:00Z")));
    }

    #[test]
    fn day_of_week_numbers_are_classic() {
        // 2026-11-23 is a Monday; `1-5` is Monday to Friday.
        let s = CronSpec::parse("0 9 * * 1-5", "UTC").unwrap();
        let fires = s.fires(ts("2026-11-21T00:00:00Z"), ts("2026-11-29T00:00:00Z"), 10);
        assert_eq!(fires.len(), 5);
        assert_eq!(fires[0], ts("2026-11-23T09:00:00Z"));
        let sunday = CronSpec::parse("0 9 * * 0", "UTC").unwrap();
        assert_eq!(sunday.next_after(ts("2026-11-23T00:00:00Z")), Some(ts("2026-11-29T09:00:00Z")));
    }

    /// Found writing the `cron` fuzz target's field-by-field oracle: a day-of-week range or step
    /// reaching 7 (Sunday) lost Sunday, `1-7` becoming the crate's `2-7` (Monday to Saturday).
    #[test]
    fn day_of_week_ranges_and_steps_reaching_seven_include_sunday() {
        // 2026-11-29 is a Sunday.
        let sunday = ts("2026-11-29T09:00:00Z");
        for expr in ["0 9 * * 1-7", "0 9 * * 5-7", "0 9 * * 1-7/2", "0 9 * * 1/2", "0 9 * * 0-7", "0 9 * * 6,7"] {
            let s = CronSpec::parse(expr, "UTC").unwrap();
            let fires = s.fires(ts("2026-11-23T00:00:00Z"), ts("2026-11-30T00:00:00Z"), 10);
            assert!(fires.contains(&sunday), "{expr}: {fires:?}");
        }
        // And nothing else moved: Monday to Friday, every other day from Sunday, Saturday alone.
        let days = |expr: &str| {
            CronSpec::parse(expr, "UTC")
                .unwrap()
                .fires(ts("2026-11-22T00:00:00Z"), ts("2026-11-29T00:00:00Z"), 10)
                .len()
        };
        assert_eq!(days("0 9 * * 1-5"), 5);
        assert_eq!(days("0 9 * * */2"), 4);
        assert_eq!(days("0 9 * * 6"), 1);
        assert_eq!(days("0 9 * * 5-7"), 3);
        assert!(CronSpec::parse("0 9 * * 8", "UTC").is_err());
        assert!(CronSpec::parse("0 9 * * MON-FRI", "UTC").is_ok());
    }

    #[test]
    fn bad_expressions_and_zones_are_refused() {
        assert!(matches!(CronSpec::parse("61 * * * *", "UTC"), Err(FlowError::Cron { .. })));
        assert!(matches!(CronSpec::parse("not cron", "UTC"), Err(FlowError::Cron { .. })));
        assert!(matches!(CronSpec::parse("* * * * *", "Nowhere/City"), Err(FlowError::TimeZone(_))));
    }

    #[test]
    fn catch_up_keeps_the_most_recent_within_the_bound() {
        let s = CronSpec::parse("0 * * * *", "UTC").unwrap();
        let created = ts("2026-11-24T00:00:00Z");
        let now = ts("2026-11-24T10:30:00Z");
        let c = catch_up(&s, None, created, now, 3);
        assert_eq!(c.fire, vec![ts("2026-11-24T08:00:00Z"), ts("2026-11-24T09:00:00Z"), ts("2026-11-24T10:00:00Z")]);
        assert_eq!(c.missed, 7);
        let again = catch_up(&s, Some(ts("2026-11-24T10:00:00Z")), created, now, 3);
        assert!(again.fire.is_empty() && again.missed == 0, "nothing twice");
    }

    proptest::proptest! {
        /// The cron and time-zone parsers refuse or accept any text without panicking, and
        /// an accepted schedule's next firing is after the instant asked about.
        #[test]
        fn parsing_any_text_never_panics(expr in "[0-9*/,LW#?A-Za-z -]{0,40}", tz in "[A-Za-z/_+-]{0,20}", at in 0i64..4_000_000_000_000) {
            if let Ok(spec) = CronSpec::parse(&expr, &tz) {
                if let Some(next) = spec.next_after(Timestamp::from_millis(at)) {
                    proptest::prop_assert!(next.as_millis() > at);
                }
            }
        }
    }
}
