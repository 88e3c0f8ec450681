//! Throttle records: every rate-limit decision and bucket change, as exported in
//! `throttles.jsonl`. Quantities are integers (milli-tokens) so their canonical JSON is exact.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Timestamp;

/// One rate-limit decision or bucket change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ThrottleRecord {
    /// Position among throttle records, starting at 1.
    pub seq: u64,
    /// When.
    pub at: Timestamp,
    /// The tenant whose bucket it is.
    pub tenant: String,
    /// The source host, for per-host buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// What happened, e.g. `denied`, `refill_decreased`, `refill_increased`, `operator_throttle`.
    pub action: String,
    /// Tokens in the bucket after the change, in thousandths.
    pub tokens_milli: i64,
    /// Refill rate after the change, in thousandths of a token per second.
    pub refill_milli_per_s: i64,
    /// Why (e.g. `upstream 429`, `bucket empty`).
    pub reason: String,
    /// Anything else worth keeping.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
}
