//! When a failed job runs again: capped exponential backoff with jitter, or the worker's hint.
//!
//! The daemon draws the jitter and records the resulting instant in the `job.failed` event, so
//! replay never needs randomness.

use serde::{Deserialize, Serialize};

/// Backoff settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RetryPolicy {
    /// Delay before the second attempt, in milliseconds.
    pub base_ms: u64,
    /// Largest computed delay, in milliseconds.
    pub max_ms: u64,
    /// Largest delay a worker's hint may ask for, in milliseconds.
    pub max_hint_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { base_ms: 1_000, max_ms: 10 * 60 * 1_000, max_hint_ms: 24 * 3_600 * 1_000 }
    }
}

impl RetryPolicy {
    /// The delay after attempt `attempt` (1-based) failed.
    ///
    /// Without a hint: "equal jitter" — half of `min(max, base·2^(attempt-1))` plus up to the other
    /// half, scaled by `jitter` in `[0, 1)`. With a hint (e.g. an upstream `Retry-After`): the hint,
    /// capped at `max_hint_ms`, plus up to 10% jitter so that many workers told the same instant do
    /// not return together.
    pub fn delay_ms(&self, attempt: u32, hint_ms: Option<u64>, jitter: f64) -> u64 {
        let jitter = jitter.clamp(0.0, 1.0);
        match hint_ms {
            Some(h) => {
                let h = h.min(self.max_hint_ms);
                h + (h as f64 * 0.1 * jitter) as u64
            }
            None => {
                let exp = attempt.saturating_sub(1).min(62);
                let d = self.base_ms.saturating_mul(1u64 << exp).min(self.max_ms);
                d / 2 + ((d - d / 2) as f64 * jitter) as u64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_equal_jitter_and_caps() {
        let p = RetryPolicy { base_ms: 1_000, max_ms: 8_000, max_hint_ms: 60_000 };
        assert_eq!(p.delay_ms(1, None, 0.0), 500);
        assert_eq!(p.delay_ms(1, None, 0.999_999), 999);
        assert_eq!(p.delay_ms(3, None, 0.0), 2_000);
        assert_eq!(p.delay_ms(10, None, 0.0), 4_000);
        assert_eq!(p.delay_ms(60, None, 1.0), 8_000);
        assert_eq!(p.delay_ms(2, Some(30_000), 0.0), 30_000);
        assert_eq!(p.delay_ms(2, Some(30_000), 1.0), 33_000);
        assert_eq!(p.delay_ms(2, Some(10_000_000), 0.0), 60_000);
    }
}
