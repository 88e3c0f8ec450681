//! Flow-control primitives, pure and clock-free: token buckets with adaptive refill (AIMD),
//! circuit breakers and blackout windows. Callers pass `now`; nothing here reads a clock or
//! draws a random number, so tests drive them with plain timestamps.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::schedule::CronSpec;
use crate::Timestamp;

/// A flow-control rule that cannot work as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// A bucket, breaker or window with values out of range.
    #[error("{0}")]
    Invalid(String),
    /// A cron expression that does not parse.
    #[error("cron expression {expr:?}: {message}")]
    Cron {
        /// The expression.
        expr: String,
        /// What is wrong with it.
        message: String,
    },
    /// An unknown time zone.
    #[error("unknown time zone {0:?} (use an IANA name such as Europe/Paris)")]
    TimeZone(String),
}

/// A token bucket's configuration. Rates are in thousandths of a token per second, so that
/// fractional rates are exact integers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Most tokens the bucket holds (the burst).
    pub burst: u32,
    /// Refill rate.
    pub rate_milli_per_s: u64,
    /// Lowest rate multiplicative decrease may reach.
    pub min_rate_milli_per_s: u64,
    /// On upstream throttling the rate is multiplied by this many thousandths (500: halved).
    pub decrease_permille: u32,
    /// Each success adds this much rate back, up to the configured rate.
    pub increase_milli_per_s: u64,
}

impl BucketConfig {
    /// A bucket of `burst` refilled at `rate_milli_per_s`, decreasing to half on throttling
    /// (never below a tenth) and recovering a tenth of the rate per success.
    pub fn new(burst: u32, rate_milli_per_s: u64) -> BucketConfig {
        let tenth = (rate_milli_per_s / 10).max(1);
        BucketConfig {
            burst,
            rate_milli_per_s,
            min_rate_milli_per_s: tenth,
            decrease_permille: 500,
            increase_milli_per_s: tenth,
        }
    }

    /// Refuses values that cannot work.
    pub fn validate(&self) -> Result<(), FlowError> {
        if self.burst == 0 || self.rate_milli_per_s == 0 {
            return Err(FlowError::Invalid("a bucket needs a burst and a rate of at least 1".into()));
        }
        if self.min_rate_milli_per_s == 0 || self.min_rate_milli_per_s > self.rate_milli_per_s {
            return Err(FlowError::Invalid("the minimum rate must be between 1 and the rate".into()));
        }
        if self.decrease_permille == 0 || self.decrease_permille > 1000 {
            return Err(FlowError::Invalid("decrease_permille must be between 1 and 1000".into()));
        }
        Ok(())
    }
}

/// How a bucket's refill changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketChange {
    /// The rate before.
    pub from_rate_milli_per_s: u64,
    /// The rate after.
    pub to_rate_milli_per_s: u64,
    /// Tokens after, in thousandths.
    pub tokens_milli: i64,
}

/// A token bucket: continuous refill in integer milli-tokens, a current rate that adapts to
/// upstream feedback, and an optional hold (an upstream `Retry-After`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    config: BucketConfig,
    tokens_milli: i64,
    rate_milli_per_s: u64,
    last: Timestamp,
    hold_until: Option<Timestamp>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(config: BucketConfig, now: Timestamp) -> TokenBucket {
        TokenBucket {
            tokens_milli: i64::from(config.burst) * 1000,
            rate_milli_per_s: config.rate_milli_per_s,
            config,
            last: now,
            hold_until: None,
        }
    }

    fn refill(&mut self, now: Timestamp) {
        let elapsed = now.as_millis() - self.last.as_millis();
        if elapsed <= 0 {
            // A clock that stands still or goes back adds nothing.
            return;
        }
        let add = (elapsed as i128 * self.rate_milli_per_s as i128 / 1000) as i64;
        if add == 0 {
            // Keep the remainder: move `last` only when whole milli-tokens were added.
            return;
        }
        let cap = i64::from(self.config.burst) * 1000;
        self.tokens_milli = (self.tokens_milli.saturating_add(add)).min(cap);
        // Advance by the time those tokens took, so sub-milli-token remainders are not lost.
        let used_ms = (add as i128 * 1000 / self.rate_milli_per_s.max(1) as i128) as i64;
        self.last = Timestamp::from_millis(self.last.as_millis() + used_ms.min(elapsed));
        if self.tokens_milli == cap {
            self.last = now;
        }
    }

    /// Takes one token, or says in how many milliseconds one will be there (at least 1).
    pub fn try_take(&mut self, now: Timestamp) -> Result<(), u64> {
        if let Some(h) = self.hold_until {
            if now < h {
                return Err((h.as_millis() - now.as_millis()).max(1) as u64);
            }
            self.hold_until = None;
            self.last = self.last.max(h);
        }
        self.refill(now);
        if self.tokens_milli >= 1000 {
            self.tokens_milli -= 1000;
            return Ok(());
        }
        let missing = (1000 - self.tokens_milli) as u64;
        Err((missing * 1000).div_ceil(self.rate_milli_per_s.max(1)).max(1))
    }

    /// Upstream throttling (429, 5xx): the rate drops multiplicatively (not below the minimum),
    /// the bucket empties, and with a `Retry-After` nothing is granted before it ends.
    pub fn on_throttled(&mut self, now: Timestamp, retry_after_ms: Option<u64>) -> BucketChange {
        self.refill(now);
        let from = self.rate_milli_per_s;
        let lowered = from * u64::from(self.config.decrease_permille) / 1000;
        self.rate_milli_per_s = lowered.max(self.config.min_rate_milli_per_s).min(from);
        self.tokens_milli = 0;
        self.last = now.max(self.last);
        if let Some(ms) = retry_after_ms {
            let until = now.plus_millis(ms.min(i64::MAX as u64) as i64);
            self.hold_until = Some(self.hold_until.map_or(until, |h| h.max(until)));
        }
        BucketChange { from_rate_milli_per_s: from, to_rate_milli_per_s: self.rate_milli_per_s, tokens_milli: 0 }
    }

    /// An upstream success: the rate recovers additively toward the configured one. `None`
    /// when it is there already.
    pub fn on_success(&mut self, now: Timestamp) -> Option<BucketChange> {
        if self.rate_milli_per_s >= self.config.rate_milli_per_s {
            return None;
        }
        self.refill(now);
        let from = self.rate_milli_per_s;
        self.rate_milli_per_s = (from + self.config.increase_milli_per_s.max(1)).min(self.config.rate_milli_per_s);
        Some(BucketChange {
            from_rate_milli_per_s: from,
            to_rate_milli_per_s: self.rate_milli_per_s,
            tokens_milli: self.tokens_milli,
        })
    }

    /// A new configuration (an operator's throttle starting or ending): the rate becomes the
    /// configured one and the tokens are clamped to the new burst.
    pub fn reconfigure(&mut self, config: BucketConfig, now: Timestamp) {
        self.refill(now);
        self.tokens_milli = self.tokens_milli.min(i64::from(config.burst) * 1000);
        self.rate_milli_per_s = config.rate_milli_per_s;
        self.config = config;
    }

    /// Tokens at `now`, in thousandths (without taking any).
    pub fn tokens_milli(&self, now: Timestamp) -> i64 {
        let mut b = self.clone();
        b.refill(now);
        b.tokens_milli
    }

    /// The current refill rate.
    pub fn rate_milli_per_s(&self) -> u64 {
        self.rate_milli_per_s
    }

    /// The configuration.
    pub fn config(&self) -> &BucketConfig {
        &self.config
    }
}

/// `delay / 2 + unit · delay / 2` for `unit` in `[0, 1)`: equal jitter on a delay.
pub fn equal_jitter_ms(delay_ms: u64, unit: f64) -> u64 {
    let half = delay_ms / 2;
    half + ((delay_ms - half) as f64 * unit.clamp(0.0, 1.0)) as u64
}

/// A circuit breaker's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// The sliding window of outcomes, in milliseconds.
    pub window_ms: u64,
    /// Outcomes in the window before the breaker may open.
    pub min_requests: u32,
    /// Error rate, in thousandths, at which it opens.
    pub error_rate_permille: u32,
    /// How long it stays open before a probe, in milliseconds.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { window_ms: 60_000, min_requests: 10, error_rate_permille: 500, open_ms: 30_000 }
    }
}

impl BreakerConfig {
    /// Refuses values that cannot work.
    pub fn validate(&self) -> Result<(), FlowError> {
        if self.window_ms == 0 || self.min_requests == 0 || self.open_ms == 0 {
            return Err(FlowError::Invalid("a breaker needs a window, min_requests and open_ms of at least 1".into()));
        }
        if self.error_rate_permille == 0 || self.error_rate_permille > 1000 {
            return Err(FlowError::Invalid("error_rate_permille must be between 1 and 1000".into()));
        }
        Ok(())
    }
}

/// Where a breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Work flows; outcomes are counted.
    Closed,
    /// Nothing is dispatched until `open_until`.
    Open,
    /// One probe is let through; its outcome closes or re-opens the breaker.
    HalfOpen,
}

/// A change of a breaker's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// From.
    pub from: BreakerState,
    /// To.
    pub to: BreakerState,
    /// When.
    pub at: Timestamp,
    /// Why.
    pub reason: String,
}

/// Whether a breaker lets one job through now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// Yes or no.
    pub allowed: bool,
    /// The change this caused (open → half-open), if any.
    pub transition: Option<Transition>,
}

/// A circuit breaker over a sliding window of outcomes.
#[derive(Clone, Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    open_until: Option<Timestamp>,
    probe_out: bool,
    outcomes: VecDeque<(Timestamp, bool)>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker { config, state: BreakerState::Closed, open_until: None, probe_out: false, outcomes: VecDeque::new() }
    }

    fn go(&mut self, to: BreakerState, at: Timestamp, reason: String) -> Transition {
        let t = Transition { from: self.state, to, at, reason };
        self.state = to;
        self.open_until = (to == BreakerState::Open).then(|| at.plus_millis(self.config.open_ms as i64));
        self.probe_out = false;
        if to != BreakerState::Closed {
            self.outcomes.clear();
        }
        t
    }

    /// Whether one job may go now. An open breaker half-opens once `open_ms` passed, then lets
    /// exactly one probe through until its outcome is recorded.
    pub fn allow(&mut self, now: Timestamp) -> Admission {
        let mut transition = None;
        if self.state == BreakerState::Open && self.open_until.is_some_and(|u| now >= u) {
            transition = Some(self.go(BreakerState::HalfOpen, now, "open period over: probing".into()));
        }
        let allowed = match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if self.probe_out => false,
            BreakerState::HalfOpen => {
                self.probe_out = true;
                true
            }
        };
        Admission { allowed, transition }
    }

    /// Counts an outcome; returns the change it caused.
    pub fn record(&mut self, now: Timestamp, ok: bool) -> Option<Transition> {
        match self.state {
            BreakerState::HalfOpen if ok => Some(self.go(BreakerState::Closed, now, "probe succeeded".into())),
            BreakerState::HalfOpen => Some(self.go(BreakerState::Open, now, "probe failed".into())),
            BreakerState::Open => None,
            BreakerState::Closed => {
                self.outcomes.push_back((now, ok));
                let since = now.as_millis() - self.config.window_ms as i64;
                while self.outcomes.front().is_some_and(|(t, _)| t.as_millis() <= since) {
                    self.outcomes.pop_front();
                }
                let n = self.outcomes.len() as u64;
                let errors = self.outcomes.iter().filter(|(_, ok)| !ok).count() as u64;
                if n >= u64::from(self.config.min_requests)
                    && errors * 1000 >= n * u64::from(self.config.error_rate_permille)
                {
                    let reason = format!("{errors} errors in {n} outcomes within {} ms", self.config.window_ms);
                    return Some(self.go(BreakerState::Open, now, reason));
                }
                None
            }
        }
    }

    /// The state as of the last call (an open breaker whose time is up half-opens on the
    /// next [`Breaker::allow`]).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// While open: when it half-opens.
    pub fn open_until(&self) -> Option<Timestamp> {
        self.open_until
    }
}

/// A window in which nothing is dispatched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Blackout {
    /// One window, `[from, to)`.
    Once {
        /// Start.
        from: Timestamp,
        /// End (exclusive).
        to: Timestamp,
    },
    /// A window starting at each firing of a cron expression, lasting `duration_ms`.
    Recurring {
        /// When each window starts.
        cron: String,
        /// How long each lasts.
        duration_ms: u64,
        /// The time zone of the expression (IANA name).
        #[serde(default = "utc")]
        tz: String,
    },
}

fn utc() -> String {
    "UTC".into()
}

impl Blackout {
    /// Refuses windows that cannot work.
    pub fn validate(&self) -> Result<(), FlowError> {
        match self {
            Blackout::Once { from, to } if from >= to => Err(FlowError::Invalid("a blackout needs from < to".into())),
            Blackout::Once { .. } => Ok(()),
            Blackout::Recurring { duration_ms: 0, .. } => {
                Err(FlowError::Invalid("a recurring blackout needs duration_ms of at least 1".into()))
            }
            Blackout::Recurring { cron, tz, .. } => CronSpec::parse(cron, tz).map(|_| ()),
        }
    }

    /// When `now` is inside a window: its end.
    pub fn active_until(&self, now: Timestamp) -> Option<Timestamp> {
        match self {
            Blackout::Once { from, to } => (*from <= now && now < *to).then_some(*to),
            Blackout::Recurring { cron, duration_ms, tz } => {
                let spec = CronSpec::parse(cron, tz).ok()?;
                let d = (*duration_ms).min(i64::MAX as u64 / 2) as i64;
                // The first firing after (now - duration) starts the window now is in, if any.
                let start = spec.next_after(now.plus_millis(-d))?;
                (start <= now).then(|| start.plus_millis(d))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    proptest! {
        /// A 10/s bucket with burst 5 never grants more than 5 + 10·t over any t seconds.
        #[test]
        fn bucket_never_exceeds_burst_plus_rate(gaps in proptest::collection::vec(0i64..400, 1..300)) {
            let mut b = TokenBucket::new(BucketConfig::new(5, 10_000), t(0));
            let mut now = 0;
            let mut grants = Vec::new();
            for g in gaps {
                now += g;
                if b.try_take(t(now)).is_ok() {
                    grants.push(now);
                }
            }
            for i in 0..grants.len() {
                for j in i..grants.len() {
                    let span_ms = grants[j] - grants[i];
                    let n = (j - i + 1) as i64;
                    // n grants within span_ms: at most 5 + 10 * span_ms / 1000.
                    prop_assert!(n * 1000 <= 5_000 + 10 * span_ms, "{n} grants in {span_ms} ms");
                }
            }
        }
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let mut b = TokenBucket::new(BucketConfig::new(5, 10_000), t(0));
        for _ in 0..5 {
            assert!(b.try_take(t(0)).is_ok());
        }
        assert_eq!(b.try_take(t(0)), Err(100), "the next token is 100 ms away at 10/s");
        assert!(b.try_take(t(100)).is_ok());
        assert!(b.try_take(t(150)).is_err());
        // A clock going backwards adds nothing and does not panic.
        assert!(b.try_take(t(-5_000)).is_err());
        assert!(b.try_take(t(10_000)).is_ok());
        assert_eq!(b.tokens_milli(t(10_000)), 4_000);
    }

    #[test]
    fn throttling_lowers_the_rate_and_success_restores_it() {
        let mut b = TokenBucket::new(BucketConfig::new(5, 10_000), t(0));
        let c = b.on_throttled(t(0), None);
        assert_eq!((c.from_rate_milli_per_s, c.to_rate_milli_per_s), (10_000, 5_000));
        b.on_throttled(t(0), None);
        b.on_throttled(t(0), None);
        b.on_throttled(t(0), None);
        assert_eq!(b.rate_milli_per_s(), 1_000, "never below the minimum (a tenth)");
        let mut steps = 0;
        while let Some(c) = b.on_success(t(1)) {
            assert!(c.to_rate_milli_per_s > c.from_rate_milli_per_s);
            steps += 1;
        }
        assert_eq!((b.rate_milli_per_s(), steps), (10_000, 9), "additive: a tenth per success");
    }

    #[test]
    fn retry_after_holds_the_bucket() {
        let mut b = TokenBucket::new(BucketConfig::new(5, 10_000), t(0));
        b.on_throttled(t(0), Some(2_000));
        assert_eq!(b.try_take(t(1_000)), Err(1_000));
        assert!(b.try_take(t(1_999)).is_err());
        assert!(b.try_take(t(2_000)).is_err(), "empty at the end of the hold");
        assert!(b.try_take(t(2_200)).is_ok(), "then refilled at the lowered 5/s");
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let cfg = BreakerConfig { window_ms: 10_000, min_requests: 4, error_rate_permille: 500, open_ms: 5_000 };
        let mut b = Breaker::new(cfg);
        assert!(b.record(t(0), true).is_none());
        assert!(b.record(t(1), false).is_none());
        assert!(b.record(t(2), true).is_none());
        let open = b.record(t(3), false).expect("2 errors of 4 is 50%");
        assert_eq!((open.from, open.to), (BreakerState::Closed, BreakerState::Open));
        assert!(!b.allow(t(4_999)).allowed, "open until 5003");
        let a = b.allow(t(5_003));
        assert!(a.allowed, "one probe");
        assert_eq!(a.transition.map(|t| t.to), Some(BreakerState::HalfOpen));
        assert!(!b.allow(t(5_004)).allowed, "only one probe at a time");
        assert_eq!(b.record(t(5_100), false).map(|t| t.to), Some(BreakerState::Open), "failed probe re-opens");
        assert!(!b.allow(t(6_000)).allowed);
        assert!(b.allow(t(10_100)).allowed);
        assert_eq!(b.record(t(10_200), true).map(|t| t.to), Some(BreakerState::Closed));
        assert!(b.allow(t(10_201)).allowed);
    }

    #[test]
    fn breaker_forgets_outcomes_outside_its_window() {
        let cfg = BreakerConfig { window_ms: 1_000, min_requests: 2, error_rate_permille: 1000, open_ms: 5_000 };
        let mut b = Breaker::new(cfg);
        assert!(b.record(t(0), false).is_none());
        assert!(b.record(t(2_000), false).is_none(), "the first error left the window");
        assert!(b.record(t(2_500), false).is_some());
    }

    #[test]
    fn blackouts_once_and_recurring_in_a_time_zone() {
        let once = Blackout::Once { from: t(1_000), to: t(2_000) };
        assert_eq!(once.active_until(t(1_500)), Some(t(2_000)));
        assert_eq!(once.active_until(t(2_000)), None);
        assert_eq!(once.active_until(t(999)), None);
        let nightly =
            Blackout::Recurring { cron: "0 2 * * *".into(), duration_ms: 3_600_000, tz: "Europe/Paris".into() };
        nightly.validate().unwrap();
        // 2026-07-01 02:30 in Paris is 00:30 UTC (summer time).
        let inside = Timestamp::parse("2026-07-01T00:30:00Z").unwrap();
        let after = Timestamp::parse("2026-07-01T01:30:00Z").unwrap();
        assert_eq!(nightly.active_until(inside), Some(Timestamp::parse("2026-07-01T01:00:00Z").unwrap()));
        assert_eq!(nightly.active_until(after), None);
        let bad = Blackout::Recurring { cron: "0 2 * * *".into(), duration_ms: 1, tz: "Mars/Olympus".into() };
        assert!(matches!(bad.validate(), Err(FlowError::TimeZone(_))));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        assert_eq!(equal_jitter_ms(1000, 0.0), 500);
        assert_eq!(equal_jitter_ms(1000, 0.999_999), 999);
    }
}
