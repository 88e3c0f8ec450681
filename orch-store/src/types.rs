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
    /// The run the job belongs to (set by [`Store::start_run`](crate::Store::start_run)).
    pub run: Option<i64>,
    /// Parents that must succeed first.
    #[serde(default)]
    pub depends_on: Vec<Dep>,
    /// What a dead-lettered or cancelled parent does to the job.
    #[serde(default)]
    pub on_parent_failure: orch_core::ParentFailure,
}

/// A parent of a job being enqueued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dep {
    /// A job that exists already (same tenant).
    Job(JobId),
    /// The job at this index of the same batch, which must come earlier in it.
    Earlier(usize),
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
            run: None,
            depends_on: Vec::new(),
            on_parent_failure: Default::default(),
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
    /// Run.
    pub run: Option<i64>,
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
    /// Events imported from other sites, checked the same way.
    pub imported_events: u64,
    /// Jobs of other sites reproduced by replaying their imported history.
    pub imported_jobs: u64,
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

/// An API token as stored: its secret only as a SHA-256 hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    /// Public id (for listing and revoking).
    pub id: String,
    /// The tenant the token is bound to, or `*` for a site administrator.
    pub tenant: String,
    /// What the token may do, e.g. `orch:read`.
    pub scopes: Vec<String>,
    /// A note saying whose token it is.
    pub label: String,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it stops working, if ever.
    pub expires_at: Option<Timestamp>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
}

/// A token to store: its record and the hex SHA-256 of its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewToken {
    /// Public id.
    pub id: String,
    /// Tenant or `*`.
    pub tenant: String,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Note.
    pub label: String,
    /// Expiry.
    pub expires_at: Option<Timestamp>,
    /// Hex SHA-256 of the secret.
    pub hash: String,
}

/// What [`Store::idempotency_begin`](crate::Store::idempotency_begin) found for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// The key is new and now reserved for this request.
    Started,
    /// The key was used with the same request, whose response this is.
    Replay {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: Vec<u8>,
    },
    /// The key was used with a different request.
    Mismatch,
    /// The key's first request is still being processed.
    InFlight,
}

/// The kinds of tenant settings kept by [`Store::put_setting`](crate::Store::put_setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettingKind {
    /// An upstream source (its host keys rate limits and breakers); the doc has a `host`.
    Source,
    /// Limits for a job type, or `*` for the whole tenant.
    Quota,
    /// A token bucket: id `tenant` for the whole tenant, `host:<host>` for a source host.
    RateLimit,
    /// Most jobs running at once: id `queue:<type>` or `source:<source>`.
    Concurrency,
    /// Nothing is claimed: id `tenant`, `queue:<type>` or `source:<source>`.
    Pause,
    /// A window in which nothing (of a queue or source, or at all) is claimed; id: its name.
    Blackout,
    /// A cron schedule that enqueues jobs from a template; id: its name.
    Schedule,
}

impl SettingKind {
    /// Every kind.
    pub const ALL: [SettingKind; 7] = [
        SettingKind::Source,
        SettingKind::Quota,
        SettingKind::RateLimit,
        SettingKind::Concurrency,
        SettingKind::Pause,
        SettingKind::Blackout,
        SettingKind::Schedule,
    ];

    /// The name used in audit actions (`source.put`, `pause.delete`).
    pub fn as_str(self) -> &'static str {
        match self {
            SettingKind::Source => "source",
            SettingKind::Quota => "quota",
            SettingKind::RateLimit => "rate_limit",
            SettingKind::Concurrency => "concurrency",
            SettingKind::Pause => "pause",
            SettingKind::Blackout => "blackout",
            SettingKind::Schedule => "schedule",
        }
    }
}

/// Decides, inside a claim's transaction, which ready jobs may be leased (rate limits, quotas,
/// concurrency, pauses, blackouts, breakers). A refusal names the class of jobs it refuses, so
/// the claim skips them all and looks further down the queue.
pub trait ClaimGate {
    /// Whether [`ClaimGate::begin`] needs the counts of running jobs.
    fn wants_running(&self) -> bool {
        false
    }

    /// Called once per claim, before any job is looked at: what is refused outright.
    fn begin(&mut self, now: Timestamp, running: &[RunningCount]) -> Vec<Exclusion> {
        let _ = (now, running);
        Vec::new()
    }

    /// Whether `job` may be leased now (and, if so, the gate counts it as leased).
    fn admit(&mut self, job: &Job) -> Result<(), Exclusion>;

    /// Called once, after the last [`ClaimGate::admit`]: the throttle records to append in the
    /// claim's transaction. The gate is done with from here on (though the claim may still
    /// wait for its commit), and may let go of what it holds.
    fn records(&mut self) -> Vec<orch_core::throttle::ThrottleRecord> {
        Vec::new()
    }
}

/// A gate that admits every job.
pub struct OpenGate;

impl ClaimGate for OpenGate {
    fn admit(&mut self, _: &Job) -> Result<(), Exclusion> {
        Ok(())
    }
}

/// Jobs running now, by tenant, queue and source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningCount {
    /// The tenant.
    pub tenant: String,
    /// The job type.
    pub queue: String,
    /// The source, if any.
    pub source: Option<String>,
    /// How many.
    pub count: u64,
}

/// A class of ready jobs a claim must pass over.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exclusion {
    /// Every job of a tenant.
    Tenant(String),
    /// A tenant's jobs of one type.
    Queue(String, String),
    /// A tenant's jobs of one source.
    Source(String, String),
}

/// A change of one setting, recorded as an `audit` event in the tenant's history.
#[derive(Clone, Debug, PartialEq)]
pub struct SettingChange {
    /// The tenant.
    pub tenant: String,
    /// The project the audit event is filed under.
    pub project: String,
    /// Which setting.
    pub kind: SettingKind,
    /// Its id (a source id, a job type).
    pub id: String,
    /// The new value.
    pub doc: Value,
    /// Why (required for quotas by the API).
    pub reason: Option<String>,
    /// The change ticket.
    pub ticket: Option<String>,
}

/// A stored setting.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Setting {
    /// The tenant.
    pub tenant: String,
    /// Which setting.
    pub kind: SettingKind,
    /// Its id.
    pub id: String,
    /// Its value.
    pub doc: Value,
}

/// A run to start: a group of jobs made by one operation (a backfill, a schedule firing).
#[derive(Clone, Debug, PartialEq)]
pub struct NewRun {
    /// The tenant.
    pub tenant: String,
    /// The project.
    pub project: String,
    /// What made it, e.g. `backfill`; the audit action is `<kind>.started`.
    pub kind: String,
    /// Its parameters, as recorded.
    pub params: Value,
    /// Why.
    pub reason: Option<String>,
    /// The change ticket.
    pub ticket: Option<String>,
}

/// A run and where its jobs are.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Run {
    /// Its id.
    pub id: i64,
    /// The tenant.
    pub tenant: String,
    /// The project.
    pub project: String,
    /// What made it.
    pub kind: String,
    /// Who started it.
    pub created_by: String,
    /// When.
    pub created_at: Timestamp,
    /// Its parameters.
    pub params: Value,
    /// Why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The change ticket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// `active` while a job is queued or running, else `completed` (all succeeded) or `failed`.
    pub state: String,
    /// Its jobs by state name.
    pub jobs: BTreeMap<String, u64>,
}

/// How far imports from one origin site (and bundle scope) got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImportState {
    /// The origin site.
    pub site_id: String,
    /// `*` for whole-site bundles, else the tenant.
    pub scope: String,
    /// The last sequence number imported.
    pub to_seq: u64,
    /// SHA-256 of the last imported bundle's `manifest.json`.
    pub manifest_sha256: String,
    /// The highest time anchor seen; never moves backwards.
    pub anchor_at: Timestamp,
    /// The trust root version that verified the last import; never moves backwards.
    pub root_version: u64,
    /// Bundles imported.
    pub bundles: u64,
    /// Each tenant's last imported event hash (the next bundle's `first_prev_hash`).
    pub heads: BTreeMap<String, String>,
}

/// A verified, planned bundle to append to the imported history in one transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportBatch {
    /// The origin site.
    pub site_id: String,
    /// `*` or the tenant.
    pub scope: String,
    /// What the import state must still be (`None`: no import yet); another import in between
    /// makes the batch a conflict.
    pub expect_to_seq: Option<u64>,
    /// First and last sequence numbers of the bundle.
    pub from_seq: u64,
    /// Last sequence number.
    pub to_seq: u64,
    /// SHA-256 of its `manifest.json`.
    pub manifest_sha256: String,
    /// Its time anchor.
    pub anchor_at: Timestamp,
    /// The trust root version that verified it.
    pub root_version: u64,
    /// Its events with their canonical lines, in sequence order.
    pub events: Vec<(orch_core::Event, String)>,
    /// Jobs as they were before the first event (`base.jsonl`), for jobs not imported yet.
    pub base: Vec<Job>,
    /// Its throttle records: (seq, tenant, canonical line).
    pub throttles: Vec<(u64, String, String)>,
    /// The `import.applied` audit event's details (reason, ticket, overrides…).
    pub details: Value,
}

/// What an import wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImportOutcome {
    /// Events appended.
    pub events: u64,
    /// Jobs created or changed by replay.
    pub jobs: u64,
    /// The `import.applied` audit event's sequence number in this site's own history.
    pub audit_seq: u64,
}

/// The tenant whose hash chain holds site-level audit events (imports).
pub const SITE_TENANT: &str = "_site";

/// Jobs of one tenant, type and state (a queue-depth sample).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Depth {
    /// The tenant.
    pub tenant: String,
    /// The job type.
    pub queue: String,
    /// The state name.
    pub state: String,
    /// How many.
    pub jobs: u64,
}

/// A failed attempt (or lapsed lease), with the job's source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailureRecord {
    /// The job.
    pub job_id: JobId,
    /// The tenant.
    pub tenant: String,
    /// The job's source, if any.
    pub source: Option<String>,
    /// The job type.
    pub queue: String,
    /// The error class (`lease_expired` for a lapsed lease).
    pub class: String,
    /// The message.
    pub message: String,
    /// When.
    pub at: Timestamp,
}

/// A webhook subscription.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Webhook {
    /// Its id.
    pub id: i64,
    /// The tenant whose events it receives.
    pub tenant: String,
    /// Where they are POSTed.
    pub url: String,
    /// The HMAC-SHA256 signing secret.
    #[serde(skip)]
    pub secret: String,
    /// Which events: `{"types": [...], "project": ..., "job_type": ...}` (absent keys match all).
    pub filter: Value,
    /// The last history sequence number resolved.
    pub cursor: u64,
    /// No attempt before this instant (after a failure).
    pub next_at: Timestamp,
    /// When it was made.
    pub created_at: Timestamp,
}

/// What became of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx: the cursor moves past the event.
    Delivered {
        /// HTTP status.
        code: u16,
    },
    /// It failed: retried at `retry_at`, or dead-lettered (and the cursor moves past it) once
    /// this was attempt `max_attempts`.
    Failed {
        /// HTTP status, if there was an answer.
        code: Option<u16>,
        /// What went wrong.
        error: String,
        /// The next attempt, if there is one.
        retry_at: Timestamp,
        /// Attempts before the event is dead-lettered.
        max_attempts: u32,
    },
}

/// A row of a webhook's delivery log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// The event.
    pub seq: u64,
    /// `pending`, `delivered` or `dead`.
    pub status: String,
    /// Attempts so far.
    pub attempts: u32,
    /// The last HTTP status.
    pub last_code: Option<u16>,
    /// The last error.
    pub last_error: Option<String>,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// A condition that needs an operator's eyes: a job stuck, a breaker open, a host throttled
/// for long. At most one incident per (tenant, kind, key) is open at a time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Incident {
    /// Its id.
    pub id: i64,
    /// The tenant.
    pub tenant: String,
    /// `job_stuck`, `breaker_open`, `throttled`.
    pub kind: String,
    /// What it is about within its kind (a job, a host, a bucket).
    pub key: String,
    /// When it opened.
    pub opened_at: Timestamp,
    /// When it closed (the condition cleared), if it has.
    pub closed_at: Option<Timestamp>,
    /// What the detector saw when it opened.
    pub details: Value,
}

/// A condition that holds now, as a detector reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct IncidentSpec {
    /// The tenant.
    pub tenant: String,
    /// The kind.
    pub kind: String,
    /// The key within the kind.
    pub key: String,
    /// What the detector saw.
    pub details: Value,
}

/// What [`crate::Store::sync_incidents`] changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IncidentChanges {
    /// Incidents opened now.
    pub opened: Vec<Incident>,
    /// Incidents closed now.
    pub closed: Vec<Incident>,
}
