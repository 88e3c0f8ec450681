//! Jobs as the ledger sees them: what a client asks for ([`JobSpec`]) and the state a job is in
//! after its events so far ([`Job`]).
//!
//! Fields are declared in the order of their JSON keys, so that canonical JSON
//! ([`crate::canonical`]) writes them as they come, with nothing to reorder.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Timestamp;

/// A job's identifier, unique within one site's ledger.
pub type JobId = i64;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to be claimed (possibly not before its `run_after`).
    Queued,
    /// Leased to a worker.
    Running,
    /// Acknowledged by a worker; terminal.
    Succeeded,
    /// Failed its last attempt (or failed without retry); terminal until an operator retries it.
    Dead,
    /// Cancelled; terminal.
    Cancelled,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Dead, JobState::Cancelled];

    /// The state's name as stored and exported.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses a state name.
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether no further work happens without an operator.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Dead | JobState::Cancelled)
    }
}

/// What a client asks to run: the content of a `job.enqueued` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Jobs that must succeed before this one may be claimed (its parents in a DAG).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<JobId>,
    /// The client's key; enqueueing the same key twice in one tenant returns the first job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Attempts before the job is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// What a dead-lettered or cancelled parent does to this job.
    #[serde(default, skip_serializing_if = "ParentFailure::is_block")]
    pub on_parent_failure: ParentFailure,
    /// Free-form input for the worker.
    pub payload: Value,
    /// Higher runs first.
    pub priority: i32,
    /// The job type, which is also the queue workers claim from.
    pub queue: String,
    /// The run (a backfill, a schedule firing) the job belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
    /// Not claimable before this instant.
    pub run_after: Timestamp,
    /// The upstream feed the job reads, if any (rate limits and breakers key on its host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// What happens to a job whose parent is dead-lettered or cancelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParentFailure {
    /// It stays queued and unclaimable until the parent is retried and succeeds.
    #[default]
    Block,
    /// It is cancelled, and so are its own descendants that say `cancel`.
    Cancel,
}

impl ParentFailure {
    /// Whether this is the default, [`ParentFailure::Block`].
    pub fn is_block(&self) -> bool {
        *self == ParentFailure::Block
    }
}

/// A worker's hold on a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Lease {
    /// When the lease lapses unless extended.
    pub expires_at: Timestamp,
    /// The token a worker presents with every heartbeat, ack and fail.
    pub id: String,
    /// The worker (task runner) holding the lease.
    pub worker: String,
}

/// An output of a job, identified by the SHA-256 of its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Its media type, e.g. `application/json`.
    pub media_type: String,
    /// The name the worker gave it, unique within the job.
    pub name: String,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
    /// Content length in bytes.
    pub size: u64,
}

impl Artifact {
    /// The metadata of `content`, hashed the one way orch hashes artifacts.
    pub fn of_content(name: &str, media_type: &str, content: &[u8]) -> Artifact {
        Artifact {
            name: name.to_string(),
            media_type: media_type.to_string(),
            size: content.len() as u64,
            sha256: crate::hash::sha256_hex(content),
        }
    }
}

/// The last failure of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobError {
    /// The attempt that failed.
    pub attempt: u32,
    /// A machine class such as `http_429`, `timeout` or `lease_expired`.
    pub class: String,
    /// What the worker said.
    pub message: String,
}

/// A job's state after its events so far. This is exactly what `jobs.jsonl` exports and what
/// replay must reproduce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Outputs recorded by the successful attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    /// Claims so far (the current one included while running).
    pub attempt: u32,
    /// Ties the job's events, logs and notifications together.
    pub correlation_id: String,
    /// When the job was enqueued.
    pub created_at: Timestamp,
    /// When it reached a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The job's id.
    pub id: JobId,
    /// The most recent failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<JobError>,
    /// Sequence number of its last event.
    pub last_seq: u64,
    /// The current lease, while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The last progress report of the current or last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
    /// The project within the tenant.
    pub project: String,
    /// What was asked for.
    pub spec: JobSpec,
    /// Where the job is.
    pub state: JobState,
    /// The tenant that owns it.
    pub tenant: String,
    /// When its last event happened.
    pub updated_at: Timestamp,
}

#[cfg(test)]
impl JobSpec {
    /// A spec for tests: queue `q`, this payload, three attempts, nothing else set.
    pub(crate) fn for_test(payload: Value) -> JobSpec {
        JobSpec {
            queue: "q".into(),
            source: None,
            payload,
            priority: 0,
            run_after: Timestamp::from_millis(0),
            max_attempts: 3,
            idempotency_key: None,
            run: None,
            depends_on: Vec::new(),
            on_parent_failure: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Declared in key order: serde's own order is the canonical one (the test fails when a
    /// field is added out of order, which would cost every job write a reordering).
    #[test]
    fn fields_are_declared_in_key_order() {
        let spec = JobSpec {
            depends_on: vec![1],
            idempotency_key: Some("k".into()),
            max_attempts: 3,
            on_parent_failure: ParentFailure::Cancel,
            payload: serde_json::json!({"b": 1, "a": [true]}),
            priority: 1,
            queue: "q".into(),
            run: Some(2),
            run_after: Timestamp::from_millis(0),
            source: Some("s".into()),
        };
        let job = Job {
            artifacts: vec![Artifact::of_content("a", "text/plain", b"x")],
            attempt: 1,
            correlation_id: "c".into(),
            created_at: Timestamp::from_millis(0),
            finished_at: Some(Timestamp::from_millis(2)),
            id: 7,
            last_error: Some(JobError { attempt: 1, class: "c".into(), message: "m".into() }),
            last_seq: 3,
            lease: Some(Lease { expires_at: Timestamp::from_millis(1), id: "l".into(), worker: "w".into() }),
            progress: Some(serde_json::json!({"done": 1})),
            project: "p".into(),
            spec,
            state: JobState::Running,
            tenant: "t".into(),
            updated_at: Timestamp::from_millis(1),
        };
        assert_eq!(
            String::from_utf8(serde_json::to_vec(&job).unwrap()).unwrap(),
            String::from_utf8(crate::canonical::to_vec(&job).unwrap()).unwrap()
        );
    }
}
