//! The job state machine: the one function that turns events into job states.
//!
//! The daemon builds an event, calls [`apply`], and stores the job it returns together with the
//! event in one transaction; replay folds a history through the same function. A transition the
//! machine refuses (a stale lease, a claim of a finished job) is how the daemon learns that a
//! request is invalid, so the daemon and an auditor can never disagree about what a history means.

use std::collections::BTreeMap;

use crate::event::{Event, EventKind};
use crate::job::{Job, JobError, JobId, JobState, Lease};

/// Why an event cannot apply to a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// The event names a job that does not exist.
    #[error("job {0} does not exist")]
    UnknownJob(JobId),
    /// An enqueue names a job that already exists.
    #[error("job {0} already exists")]
    JobExists(JobId),
    /// A job event carries no job id.
    #[error("event {0} of type {1} has no job id")]
    MissingJobId(u64, &'static str),
    /// The event belongs to another tenant than the job.
    #[error("event for job {0} names tenant {1:?}, the job belongs to another tenant")]
    TenantMismatch(JobId, String),
    /// The job is not in a state the event can apply to.
    #[error("job {id} is {state}, {event} does not apply")]
    InvalidState {
        /// The job.
        id: JobId,
        /// Its state.
        state: &'static str,
        /// The event's type.
        event: &'static str,
    },
    /// The lease presented is not the job's current lease.
    #[error("lease lost: job {0} is not leased under that lease id")]
    LeaseMismatch(JobId),
    /// The lease presented had already lapsed when the event happened.
    #[error("lease lost: the lease on job {0} expired")]
    LeaseExpired(JobId),
    /// The reaper took back a lease that had not lapsed yet.
    #[error("lease on job {0} has not expired")]
    LeaseNotExpired(JobId),
    /// A claim's attempt number does not follow the job's.
    #[error("claim of job {id} says attempt {got}, expected {expected}")]
    AttemptMismatch {
        /// The job.
        id: JobId,
        /// The attempt the job is due.
        expected: u32,
        /// The attempt the event names.
        got: u32,
    },
    /// A spec that can never run.
    #[error("job {0}: {1}")]
    InvalidSpec(JobId, &'static str),
}

impl TransitionError {
    /// The job the error is about.
    pub fn job_id(&self) -> JobId {
        match self {
            TransitionError::UnknownJob(id)
            | TransitionError::JobExists(id)
            | TransitionError::TenantMismatch(id, _)
            | TransitionError::LeaseMismatch(id)
            | TransitionError::LeaseExpired(id)
            | TransitionError::LeaseNotExpired(id)
            | TransitionError::InvalidSpec(id, _)
            | TransitionError::InvalidState { id, .. }
            | TransitionError::AttemptMismatch { id, .. } => *id,
            TransitionError::MissingJobId(..) => 0,
        }
    }

    /// Whether the error means a worker's lease is no longer valid.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, TransitionError::LeaseMismatch(_) | TransitionError::LeaseExpired(_))
    }
}

/// Applies `ev` to `job` (the job's state before the event, `None` if it does not exist yet) and
/// returns the job after it. Events that change no job ([`EventKind::Audit`]) return `Ok(None)`.
pub fn apply(job: Option<&Job>, ev: &Event) -> Result<Option<Job>, TransitionError> {
    let kind = &ev.event;
    if let EventKind::Audit { .. } = kind {
        return Ok(None);
    }
    let id = ev.job_id.ok_or(TransitionError::MissingJobId(ev.seq, kind.type_name()))?;

    if let EventKind::Enqueued(spec) = kind {
        if job.is_some() {
            return Err(TransitionError::JobExists(id));
        }
        if spec.max_attempts == 0 {
            return Err(TransitionError::InvalidSpec(id, "max_attempts must be at least 1"));
        }
        return Ok(Some(Job {
            id,
            tenant: ev.tenant.clone(),
            project: ev.project.clone(),
            correlation_id: ev.correlation_id.clone(),
            spec: spec.clone(),
            state: JobState::Queued,
            attempt: 0,
            lease: None,
            progress: None,
            artifacts: Vec::new(),
            last_error: None,
            created_at: ev.at,
            updated_at: ev.at,
            finished_at: None,
            last_seq: ev.seq,
        }));
    }

    let prev = job.ok_or(TransitionError::UnknownJob(id))?;
    if prev.tenant != ev.tenant {
        return Err(TransitionError::TenantMismatch(id, ev.tenant.clone()));
    }
    let invalid = || TransitionError::InvalidState { id, state: prev.state.as_str(), event: kind.type_name() };
    let mut next = prev.clone();
    next.updated_at = ev.at;
    next.last_seq = ev.seq;

    match kind {
        EventKind::Claimed { lease_id, worker, lease_expires_at, attempt } => {
            if prev.state != JobState::Queued {
                return Err(invalid());
            }
            if *attempt != prev.attempt + 1 {
                return Err(TransitionError::AttemptMismatch { id, expected: prev.attempt + 1, got: *attempt });
            }
            next.state = JobState::Running;
            next.attempt = *attempt;
            next.progress = None;
            next.lease = Some(Lease { id: lease_id.clone(), worker: worker.clone(), expires_at: *lease_expires_at });
        }
        EventKind::Heartbeat { lease_id, lease_expires_at, progress } => {
            let lease = live_lease(prev, lease_id, ev)?;
            next.lease = Some(Lease { expires_at: *lease_expires_at, ..lease.clone() });
            if progress.is_some() {
                next.progress = progress.clone();
            }
        }
        EventKind::Succeeded { lease_id, artifacts } => {
            live_lease(prev, lease_id, ev)?;
            next.state = JobState::Succeeded;
            next.lease = None;
            next.artifacts = artifacts.clone();
            next.finished_at = Some(ev.at);
        }
        EventKind::Failed { lease_id, class, message, retry_at } => {
            live_lease(prev, lease_id, ev)?;
            fail(&mut next, class, message, *retry_at, ev);
        }
        EventKind::LeaseExpired { lease_id, retry_at } => {
            let lease = prev.lease.as_ref().filter(|_| prev.state == JobState::Running);
            let lease = lease.ok_or_else(invalid)?;
            if &lease.id != lease_id {
                return Err(TransitionError::LeaseMismatch(id));
            }
            if lease.expires_at > ev.at {
                return Err(TransitionError::LeaseNotExpired(id));
            }
            fail(&mut next, "lease_expired", "lease expired without heartbeat", *retry_at, ev);
        }
        EventKind::Cancelled { .. } => {
            if prev.state.is_terminal() {
                return Err(invalid());
            }
            next.state = JobState::Cancelled;
            next.lease = None;
            next.finished_at = Some(ev.at);
        }
        EventKind::Retried { run_after, .. } => {
            if !matches!(prev.state, JobState::Dead | JobState::Cancelled) {
                return Err(invalid());
            }
            next.state = JobState::Queued;
            next.attempt = 0;
            next.spec.run_after = *run_after;
            next.finished_at = None;
        }
        EventKind::Enqueued(_) | EventKind::Audit { .. } => unreachable!("handled above"),
    }
    Ok(Some(next))
}

/// The lease a worker event may act under: the job's current lease, if the ids match and it had
/// not lapsed when the event happened.
fn live_lease<'a>(job: &'a Job, lease_id: &str, ev: &Event) -> Result<&'a Lease, TransitionError> {
    let lease = job
        .lease
        .as_ref()
        .filter(|l| job.state == JobState::Running && l.id == lease_id)
        .ok_or(TransitionError::LeaseMismatch(job.id))?;
    if lease.expires_at <= ev.at {
        return Err(TransitionError::LeaseExpired(job.id));
    }
    Ok(lease)
}

fn fail(next: &mut Job, class: &str, message: &str, retry_at: Option<crate::Timestamp>, ev: &Event) {
    next.lease = None;
    next.last_error = Some(JobError { class: class.to_string(), message: message.to_string(), attempt: next.attempt });
    match retry_at {
        Some(at) => {
            next.state = JobState::Queued;
            next.spec.run_after = at;
        }
        None => {
            next.state = JobState::Dead;
            next.finished_at = Some(ev.at);
        }
    }
}

/// Why a history cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {seq}: {source}")]
pub struct ReplayError {
    /// The event that did not apply.
    pub seq: u64,
    /// Why.
    #[source]
    pub source: TransitionError,
}

/// Folds events (in sequence order) into the jobs they describe, by id.
pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Result<BTreeMap<JobId, Job>, ReplayError> {
    let mut jobs = BTreeMap::new();
    for ev in events {
        replay_one(&mut jobs, ev)?;
    }
    Ok(jobs)
}

/// Applies one event to a map of jobs; the streaming form of [`replay`].
pub fn replay_one(jobs: &mut BTreeMap<JobId, Job>, ev: &Event) -> Result<(), ReplayError> {
    let prev = ev.job_id.and_then(|id| jobs.get(&id));
    match apply(prev, ev) {
        Ok(Some(job)) => {
            jobs.insert(job.id, job);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(source) => Err(ReplayError { seq: ev.seq, source }),
    }
}
