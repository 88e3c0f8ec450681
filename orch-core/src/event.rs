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
use sha2::{Digest, Sha256};

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
    /// A line is not UTF-8.
    #[error(transparent)]
    Utf8(#[from] std::str::Utf8Error),
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
        self.hash_is_valid_with(&mut Vec::new())
    }

    /// [`hash_is_valid`](Self::hash_is_valid) with a buffer of the caller's for the encoding,
    /// kept from one event to the next: the canonical bytes are hashed around the `hash` member,
    /// with no copy and no hex string.
    pub fn hash_is_valid_with(&self, buf: &mut Vec<u8>) -> bool {
        let member = canonical::write_locating(buf, self, "hash").expect("events always encode");
        let mut h = Sha256::new();
        match member {
            Some(m) => {
                h.update(&buf[..m.span.start]);
                h.update(&buf[m.span.end..]);
            }
            None => h.update(&buf[..]),
        }
        let mut hex = [0u8; 64];
        hex::encode_to_slice(h.finalize(), &mut hex).expect("64 hex digits for 32 bytes");
        hex == self.hash.as_bytes()
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

    /// Every variant, with optional fields both absent and present.
    fn kinds() -> Vec<EventKind> {
        let at = Timestamp::from_millis(5_000);
        let EventKind::Enqueued(spec) = draft().kind else { unreachable!() };
        let full = JobSpec {
            depends_on: vec![1, 2],
            idempotency_key: Some("k".into()),
            on_parent_failure: crate::job::ParentFailure::Cancel,
            run: Some(7),
            source: Some("https://feeds.example".into()),
            ..spec.clone()
        };
        let artifact = Artifact::of_content("out", "text/plain", b"abc");
        vec![
            EventKind::Enqueued(spec),
            EventKind::Enqueued(full),
            EventKind::Claimed { attempt: 1, lease_expires_at: at, lease_id: "l".into(), worker: "w".into() },
            EventKind::Heartbeat { lease_expires_at: at, lease_id: "l".into(), progress: None },
            EventKind::Heartbeat { lease_expires_at: at, lease_id: "l".into(), progress: Some(json!({"p": 0.5})) },
            EventKind::Succeeded { artifacts: vec![], lease_id: "l".into() },
            EventKind::Succeeded { artifacts: vec![artifact], lease_id: "l".into() },
            EventKind::Failed { class: "c".into(), lease_id: "l".into(), message: "m".into(), retry_at: None },
            EventKind::Failed { class: "c".into(), lease_id: "l".into(), message: "m".into(), retry_at: Some(at) },
            EventKind::LeaseExpired { lease_id: "l".into(), retry_at: None },
            EventKind::LeaseExpired { lease_id: "l".into(), retry_at: Some(at) },
            EventKind::Cancelled { reason: None },
            EventKind::Cancelled { reason: Some("r".into()) },
            EventKind::Retried { reason: None, run_after: at },
            EventKind::Retried { reason: Some("r".into()), run_after: at },
            EventKind::Audit { action: "quota.set".into(), details: Value::Null },
            EventKind::Audit { action: "quota.set".into(), details: json!({"limit": 3, "x": [1, "two"]}) },
        ]
    }

    /// `{"type":…,"data":…}`: the order canonical JSON does not use.
    fn type_first(kind: &EventKind) -> String {
        let v = serde_json::to_value(kind).unwrap();
        format!(r#"{{"type":{},"data":{}}}"#, v["type"], v["data"])
    }

    #[test]
    fn kinds_read_back_in_either_key_order() {
        for kind in kinds() {
            let canonical = String::from_utf8(canonical::to_vec(&kind).unwrap()).unwrap();
            assert!(canonical.starts_with(r#"{"data":"#), "{canonical}");
            assert_eq!(serde_json::from_str::<EventKind>(&canonical).unwrap(), kind, "{canonical}");
            let swapped = type_first(&kind);
            assert_eq!(serde_json::from_str::<EventKind>(&swapped).unwrap(), kind, "{swapped}");
            // Other deserializers than text: a `Value`, and a reader (no borrowing).
            let value = serde_json::to_value(&kind).unwrap();
            assert_eq!(serde_json::from_value::<EventKind>(value).unwrap(), kind);
            assert_eq!(serde_json::from_reader::<_, EventKind>(canonical.as_bytes()).unwrap(), kind);
        }
    }

    #[test]
    fn kinds_refuse_what_the_format_does_not_allow() {
        let err = |text: &str| serde_json::from_str::<EventKind>(text).unwrap_err().to_string();
        let cases = [
            // Unknown type, in either order: the message names it and the known ones.
            (r#"{"data":{},"type":"job.exploded"}"#, "unknown variant `job.exploded`, expected one of"),
            (r#"{"type":"job.exploded","data":{}}"#, "unknown variant `job.exploded`, expected one of"),
            // Missing members.
            (r#"{"type":"job.cancelled"}"#, "missing field `data`"),
            (r#"{"data":{}}"#, "missing field `type`"),
            (r#"{}"#, "missing field `type`"),
            // Unknown and repeated members, of the event and of its data.
            (r#"{"data":{},"type":"job.cancelled","x":1}"#, r#"string "x", expected "type" or "data""#),
            (r#"{"data":{},"data":{},"type":"job.cancelled"}"#, "duplicate field `data`"),
            (r#"{"type":"job.cancelled","type":"job.cancelled","data":{}}"#, "duplicate field `type`"),
            (r#"{"data":{"reason":"r","x":1},"type":"job.cancelled"}"#, "unknown field `x`, expected `reason`"),
            (r#"{"type":"job.cancelled","data":{"reason":"r","x":1}}"#, "unknown field `x`, expected `reason`"),
            // Missing and mistyped fields of the data.
            (r#"{"data":{"lease_id":"l"},"type":"job.claimed"}"#, "missing field `attempt`"),
            (r#"{"type":"job.claimed","data":{"lease_id":"l"}}"#, "missing field `attempt`"),
            (r#"{"data":{"lease_id":5},"type":"job.succeeded"}"#, "invalid type: integer `5`, expected a string"),
            (r#"{"data":{"run_after":"yesterday"},"type":"job.retried"}"#, "invalid timestamp \"yesterday\""),
            (r#"{"data":[],"type":"job.claimed"}"#, "invalid type: sequence, expected struct variant"),
            (r#"{"data":{},"type":5}"#, ""),
            ("[]", "expected adjacently tagged enum EventKind"),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .map(|(text, want)| (text, want, err(text)))
            .filter(|(_, want, got)| !got.contains(*want))
            .map(|(text, want, got)| format!("{text}: {got:?} does not say {want:?}"))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
        // An error inside buffered data gives the position in the whole input, once.
        let got = err(r#"{"data":{"lease_id":5},"type":"job.succeeded"}"#);
        assert_eq!(got.matches(" at line ").count(), 1, "{got}");
    }

    proptest::proptest! {
        /// Any event's line reads back as the event, and so does the same JSON with `type`
        /// before `data`.
        #[test]
        fn lines_round_trip(
            pick in 0usize..17,
            actor in "[a-z]{0,8}",
            reason in proptest::option::of("\\PC{0,12}"),
            n in proptest::num::i64::ANY,
            ms in 0i64..253_402_300_799_999,
        ) {
            let mut kind = kinds().swap_remove(pick);
            match &mut kind {
                EventKind::Cancelled { reason: r } | EventKind::Retried { reason: r, .. } => *r = reason,
                EventKind::Enqueued(spec) => {
                    spec.payload = json!({"n": n, "s": reason});
                    spec.run_after = Timestamp::from_millis(ms);
                }
                EventKind::Audit { details, .. } => *details = json!([n, reason]),
                _ => {}
            }
            let ev = EventDraft { actor, kind, ..draft() }.seal(1, GENESIS_HASH);
            let line = ev.to_line();
            proptest::prop_assert_eq!(&Event::from_line(&line).unwrap(), &ev);
            proptest::prop_assert!(ev.hash_is_valid());
            let swapped = type_first(&ev.event);
            proptest::prop_assert_eq!(serde_json::from_str::<EventKind>(&swapped).unwrap(), ev.event);
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let ev = draft().seal(1, GENESIS_HASH);
        let mut v: Value = serde_json::from_str(&ev.to_line()).unwrap();
        v["extra"] = json!(1);
        assert!(Event::from_line(&v.to_string()).is_err());
    }
}
