//! The arguments and results of the [`Store`](crate::Store) verbs.

use std::collections::BTreeMap;

use orch_core::retry::RetryPolicy;
use orch_core::{Job, JobId, JobState, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Whose data an operation may see and touch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant (site administrators and the daemon itself).
    All,
    /// One tenant.
    Tenant(String),
}

impl Scope {
    /// Whether a tenant's data is visible in this scope.
    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(t) => t == tenant,
        }
    }

    /// The tenant, when the scope is one.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Tenant(t) => Some(t),
        }
    }
}

/// A job to create.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// The owning tenant.
    pub tenant: String,
    /// The project within the tenant.
    pub project: String,
    /// The job type (queue).
    pub queue: String,
    /// The upstream source, if any.
    pub source: Option<String>,
    /// Input for the worker.
    pub payload: Value,
    /// Higher runs first (default 0).
    pub priority: i32,
    /// Not before this instant (default: now).
    pub run_after: Option<Timestamp>,
    /// Attempts before dead-lettering (default: the store's).
    pub max_attempts: Option<u32>,
    /// Correlation id (default: a new random one).
    pub correlation_id: Option<String>,
    /// Idempotency key, unique per tenant.
    pub idempotency_key: Option<String>,
}

impl NewJob {
    /// A job with defaults for everything but its owner, queue and payload.
    pub fn new(tenant: &str, project: &str, queue: &str, payload: Value) -> Self {
        NewJob {
            tenant: tenant.into(),
            project: project.into(),
            queue: queue.into(),
            source: None,
            payload,
            priority: 0,
            run_after: None,
            max_attempts: None,
            correlation_id: None,
            idempotency_key: None,
        }
    }
}

/// The outcome of enqueueing one job.
#[derive(Clone, Debug, PartialEq)]
pub struct Enqueued {
    /// The job (the existing one if the idempotency key was already used).
    pub job: Job,
    /// Whether this call created it.
    pub created: bool,
}

/// A worker's request for work.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimRequest {
    /// Whose jobs may be leased.
    pub scope: Scope,
    /// The job types the worker runs.
    pub queues: Vec<String>,
    /// The worker's id.
    pub worker: String,
    /// At most this many jobs.
    pub limit: usize,
    /// Lease length in milliseconds (default: the store's).
    pub lease_ms: Option<u64>,
}

/// A leased job and what the worker needs to run it well.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Allocation {
    /// The job, with its lease (id, expiry), attempt number and idempotency key.
    pub job: Job,
    /// How failure of this attempt would be handled.
    pub retry: RetryHints,
}

/// What happens if the current attempt fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryHints {
    /// Attempts left after this one.
    pub attempts_left: u32,
    /// The backoff before the next attempt, without jitter, in milliseconds.
    pub backoff_ms: u64,
    /// Heartbeat at least this often (milliseconds) to keep the lease.
    pub heartbeat_ms: u64,
}

/// A heartbeat.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Heartbeat {
    /// The lease held.
    pub lease_id: String,
    /// Progress to record.
    pub progress: Option<Value>,
    /// New lease length from now, in milliseconds (default: the store's).
    pub extend_ms: Option<u64>,
}

/// An artifact as a worker sends it.
#[derive(Clone, Debug, PartialEq)]
pub struct ArtifactInput {
    /// Unique within the job.
    pub name: String,
    /// Media type.
    pub media_type: String,
    /// The bytes.
    pub content: Vec<u8>,
}

/// A success acknowledgement.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Ack {
    /// The lease held.
    pub lease_id: String,
    /// Outputs.
    pub artifacts: Vec<ArtifactInput>,
}

/// A failure report.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Failure {
    /// The lease held.
    pub lease_id: String,
    /// Error class, e.g. `http_429`.
    pub class: String,
    /// What went wrong.
    pub message: String,
    /// `false` dead-letters the job at once.
    pub retryable: bool,
    /// The worker's wish for the delay before the next attempt (e.g. an upstream `Retry-After`).
    pub retry_after_ms: Option<u64>,
}

/// Filters for listing jobs; `None` matches everything.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct JobFilter {
    /// State.
    pub state: Option<JobState>,
    /// Job type.
    pub queue: Option<String>,
    /// Project.
    pub project: Option<String>,
    /// Source.
    pub source: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Last changed at or after.
    pub updated_since: Option<Timestamp>,
    /// Last changed before.
    pub updated_before: Option<Timestamp>,
}

/// Filters for listing history; `None` matches everything.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HistoryFilter {
    /// Events of one job.
    pub job_id: Option<JobId>,
    /// Events of one type, e.g. `job.failed`.
    pub event_type: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// At or after.
    pub since: Option<Timestamp>,
    /// Before.
    pub before: Option<Timestamp>,
}

/// A page request: items after `after` (an id or sequence number), at most `limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Exclusive lower bound of the id or sequence.
    pub after: i64,
    /// Page size.
    pub limit: usize,
}

impl Default for PageRequest {
    fn default() -> Self {
        PageRequest { after: 0, limit: 100 }
    }
}

/// A page of results.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Where the next page starts, if there may be one.
    pub next_after: Option<i64>,
}

/// Job counts.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize)]
pub struct Stats {
    /// Jobs by state name.
    pub by_state: BTreeMap<String, u64>,
    /// Events in the history (in scope).
    pub events: u64,
}

/// The result of [`check_ledger`](crate::check_ledger).
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize)]
pub struct LedgerReport {
    /// Events checked.
    pub events: u64,
    /// Jobs compared.
    pub jobs: u64,
    /// Tenants (hash chains).
    pub tenants: usize,
    /// What is wrong; empty when the ledger holds.
    pub problems: Vec<String>,
}

impl LedgerReport {
    /// Whether the ledger holds.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Store-wide settings.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreOptions {
    /// Backoff for failed attempts.
    pub retry: RetryPolicy,
    /// Lease length when a claim names none, in milliseconds.
    pub default_lease_ms: u64,
    /// Longest lease a claim or heartbeat may ask for, in milliseconds.
    pub max_lease_ms: u64,
    /// Attempts when a job names none.
    pub default_max_attempts: u32,
    /// Largest payload, in bytes of JSON.
    pub max_payload_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            retry: RetryPolicy::default(),
            default_lease_ms: 30_000,
            max_lease_ms: 3_600_000,
            default_max_attempts: 5,
            max_payload_bytes: 1 << 20,
        }
    }
}
