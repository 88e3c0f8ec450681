//! History events: one per state change, hash-chained per tenant.
//!
//! An event's `hash` is the SHA-256 of the canonical JSON of the event without its `hash` field
//! (so it covers `prev_hash`, which is the `hash` of the tenant's previous event, or
//! [`GENESIS_HASH`](crate::hash::GENESIS_HASH)). The canonical JSON of the whole event is one line
//! of `history.jsonl`.
//!
//! Fields are declared in the order of their JSON keys, so that canonical JSON writes them as
//! they come (see [`crate::job`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical;
use crate::hash::sha256_hex;
use crate::job::{Artifact, JobId, JobSpec};
use crate::Timestamp;

/// What happened. Every decision the daemon took (lease token, expiry, retry time) is data here,
/// so that [`apply`](crate::apply) needs nothing but the event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", content = "data", deny_unknown_fields)]
pub enum EventKind {
    /// A job was created.
    #[serde(rename = "job.enqueued")]
    Enqueued(JobSpec),
    /// A worker leased a job.
    #[serde(rename = "job.claimed")]
    Claimed {
        /// The attempt this claim starts (1 for the first).
        attempt: u32,
        /// When it lapses unless extended.
        lease_expires_at: Timestamp,
        /// The new lease's token.
        lease_id: String,
        /// The worker holding it.
        worker: String,
    },
    /// A worker extended its lease, perhaps reporting progress.
    #[serde(rename = "job.heartbeat")]
    Heartbeat {
        /// The new expiry.
        lease_expires_at: Timestamp,
        /// The lease presented.
        lease_id: String,
        /// Progress, if reported.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<Value>,
    },
    /// A worker acknowledged success.
    #[serde(rename = "job.succeeded")]
    Succeeded {
        /// Outputs recorded.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        artifacts: Vec<Artifact>,
        /// The lease presented.
        lease_id: String,
    },
    /// A worker reported failure.
    #[serde(rename = "job.failed")]
    Failed {
        /// The failure's class.
        class: String,
        /// The lease presented.
        lease_id: String,
        /// The failure's message.
        message: String,
        /// When the job runs again; `None` dead-letters it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at: Option<Timestamp>,
    },
    /// A lease lapsed without ack or fail; the reaper took the job back.
    #[serde(rename = "job.lease_expired")]
    LeaseExpired {
        /// The lease that lapsed.
        lease_id: String,
        /// When the job runs again; `None` dead-letters it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at: Option<Timestamp>,
    },
    /// An operator or client cancelled the job.
    #[serde(rename = "job.cancelled")]
    Cancelled {
        /// Why, if given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An operator put a dead or cancelled job back in the queue with a fresh set of attempts.
    #[serde(rename = "job.retried")]
    Retried {
        /// Why, if given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// When it may run.
        run_after: Timestamp,
    },
    /// A site or tenant event that changes no job (quota changes, pauses, imports…): its
    /// meaning is for the subsystem named by `action`, and it is chained and exported like any
    /// other.
    #[serde(rename = "audit")]
    Audit {
        /// What was done, e.g. `quota.set`.
        action: String,
        /// The details.
        #[serde(default)]
        details: Value,
    },
}

impl EventKind {
    /// The event's type name, as in `history.jsonl`.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Enqueued(_) => "job.enqueued",
            EventKind::Claimed { .. } => "job.claimed",
            EventKind::Heartbeat { .. } => "job.heartbeat",
            EventKind::Succeeded { .. } => "job.succeeded",
            EventKind::Failed { .. } => "job.failed",
            EventKind::LeaseExpired { .. } => "job.lease_expired",
            EventKind::Cancelled { .. } => "job.cancelled",
            EventKind::Retried { .. } => "job.retried",
            EventKind::Audit { .. } => "audit",
        }
    }
}

/// An event before it is sequenced and chained.
#[derive(Clone, Debug, PartialEq)]
pub struct EventDraft {
    /// When it happened.
    pub at: Timestamp,
    /// The tenant whose chain it joins.
    pub tenant: String,
    /// The project, if it concerns one.
    pub project: String,
    /// The job it changes, if any.
    pub job_id: Option<JobId>,
    /// Who did it: a worker id, an operator's token id, or `orchd` for the daemon itself.
    pub actor: String,
    /// The correlation id of the job or request.
    pub correlation_id: String,
    /// What happened.
    pub kind: EventKind,
}

/// One entry of the history: a line of `history.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Who did it.
    pub actor: String,
    /// When it happened.
    pub at: Timestamp,
    /// Ties related events together.
    pub correlation_id: String,
    /// What happened.
    pub event: EventKind,
    /// SHA-256 of this event's canonical JSON without this field.
    pub hash: String,
    /// The job it changes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// The `hash` of the tenant's previous event.
    pub prev_hash: String,
    /// The project.
    pub project: String,
    /// Position in the site's history, starting at 1, without gaps.
    pub seq: u64,
    /// The tenant whose chain it belongs to.
    pub tenant: String,
}

/// Errors encoding or decoding events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// A line is not a valid event.
    #[error("invalid event: {0}")]
    Decode(#[from] serde_json::Error),
    /// Canonical encoding failed.
    #[error(transparent)]
    Encode(#[from] canonical::CanonicalError),
}

impl EventDraft {
    /// Seals the draft as event `seq`, chained after `prev_hash`.
    pub fn seal(self, seq: u64, prev_hash: &str) -> Event {
        self.seal_with_line(seq, prev_hash).0
    }

    /// Seals the draft and returns its `history.jsonl` line too, encoding the event once.
    pub fn seal_with_line(self, seq: u64, prev_hash: &str) -> (Event, String) {
        let mut ev = Event {
            seq,
            at: self.at,
            tenant: self.tenant,
            project: self.project,
            job_id: self.job_id,
            actor: self.actor,
            correlation_id: self.correlation_id,
            event: self.kind,
            prev_hash: prev_hash.to_string(),
            hash: String::new(),
        };
        // One encoding for both: the line with an empty hash, whose `hash` member is cut out
        // to hash and then filled in.
        let (mut line, member) = canonical::to_vec_locating(&ev, "hash").expect("events always encode");
        let member = member.expect("events have a hash");
        let mut unsealed = Vec::with_capacity(line.len());
        unsealed.extend_from_slice(&line[..member.span.start]);
        unsealed.extend_from_slice(&line[member.span.end..]);
        ev.hash = sha256_hex(&unsealed);
        line.splice(member.value.start + 1..member.value.end - 1, ev.hash.bytes());
        (ev, String::from_utf8(line).expect("canonical JSON is UTF-8"))
    }
}

impl Event {
    /// The hash this event should carry.
    pub fn compute_hash(&self) -> String {
        sha256_hex(&canonical::to_vec_without(self, "hash").expect("events always encode"))
    }

    /// Whether the carried hash matches the content.
    pub fn hash_is_valid(&self) -> bool {
        self.compute_hash() == self.hash
    }

    /// The event's canonical JSON: its line in `history.jsonl` (without the newline).
    pub fn to_line(&self) -> String {
        let bytes = canonical::to_vec(self).expect("events always encode");
        // The canonical writer writes only valid UTF-8.
        String::from_utf8(bytes).expect("canonical JSON is UTF-8")
    }

    /// Parses one line of `history.jsonl`.
    pub fn from_line(line: &str) -> Result<Event, EventError> {
        Ok(serde_json::from_str(line)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::GENESIS_HASH;
    use serde_json::json;

    fn draft() -> EventDraft {
        EventDraft {
            at: Timestamp::from_millis(1_000),
            tenant: "acme".into(),
            project: "feeds".into(),
            job_id: Some(1),
            actor: "api".into(),
            correlation_id: "c-1".into(),
            kind: EventKind::Enqueued(JobSpec {
                queue: "ingest".into(),
                source: None,
                payload: json!({"url": "https://example.test/a"}),
                priority: 0,
                run_after: Timestamp::from_millis(1_000),
                max_attempts: 3,
                idempotency_key: None,
                run: None,
                depends_on: Vec::new(),
                on_parent_failure: Default::default(),
            }),
        }
    }

    #[test]
    fn line_round_trips_and_hash_covers_content() {
        let ev = draft().seal(1, GENESIS_HASH);
        let line = ev.to_line();
        assert!(line.starts_with(r#"{"actor":"api","at":"1970-01-01T00:00:01.000Z""#), "{line}");
        let back = Event::from_line(&line).unwrap();
        assert_eq!(back, ev);
        assert!(back.hash_is_valid());
        let mut tampered = back.clone();
        tampered.actor = "mallory".into();
        assert!(!tampered.hash_is_valid());
        assert_eq!(draft().seal_with_line(1, GENESIS_HASH).1, line, "one encoding, same line");
        let mut rechained = back;
        rechained.prev_hash = "1".repeat(64);
        assert!(!rechained.hash_is_valid());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let ev = draft().seal(1, GENESIS_HASH);
        let mut v: Value = serde_json::from_str(&ev.to_line()).unwrap();
        v["extra"] = json!(1);
        assert!(Event::from_line(&v.to_string()).is_err());
    }
}
