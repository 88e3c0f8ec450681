//! The job state machine: the one function that turns events into job states.
//!
//! The daemon builds an event, calls [`apply`], and stores the job it returns together with the
//! event in one transaction; replay folds a history through the same function. A transition the
//! machine refuses (a stale lease, a claim of a finished job) is how the daemon learns that a
//! request is invalid, so the daemon and an auditor can never disagree about what a history means.

use std::collections::BTreeMap;

use crate::event::{Event, EventKind};
use crate::job::{Job, JobError, JobId, JobSpec, JobState, Lease};

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
        check_spec(id, spec)?;
        let Event { at, seq, tenant, project, correlation_id, .. } = ev;
        return Ok(Some(created(
            id,
            (*at, *seq),
            tenant.clone(),
            project.clone(),
            correlation_id.clone(),
            spec.clone(),
        )));
    }

    let mut next = job.ok_or(TransitionError::UnknownJob(id))?.clone();
    transition(&mut next, ev)?;
    Ok(Some(next))
}

/// Refuses a spec that can never run.
fn check_spec(id: JobId, spec: &JobSpec) -> Result<(), TransitionError> {
    if spec.max_attempts == 0 {
        return Err(TransitionError::InvalidSpec(id, "max_attempts must be at least 1"));
    }
    Ok(())
}

/// The job a `job.enqueued` event creates, from the event's time and sequence number and the
/// parts it carries (copied from a borrowed event, moved from an owned one).
fn created(
    id: JobId,
    (at, seq): (crate::Timestamp, u64),
    tenant: String,
    project: String,
    correlation_id: String,
    spec: JobSpec,
) -> Job {
    Job {
        id,
        tenant,
        project,
        correlation_id,
        spec,
        state: JobState::Queued,
        attempt: 0,
        lease: None,
        progress: None,
        artifacts: Vec::new(),
        last_error: None,
        created_at: at,
        updated_at: at,
        finished_at: None,
        last_seq: seq,
    }
}

/// Applies a job event other than `job.enqueued` to the job it names, in place. Every arm checks
/// before it changes anything, so a refused event leaves the job as it was.
fn transition(job: &mut Job, ev: &Event) -> Result<(), TransitionError> {
    let id = job.id;
    if job.tenant != ev.tenant {
        return Err(TransitionError::TenantMismatch(id, ev.tenant.clone()));
    }
    let invalid =
        |job: &Job| TransitionError::InvalidState { id, state: job.state.as_str(), event: ev.event.type_name() };
    match &ev.event {
        EventKind::Claimed { lease_id, worker, lease_expires_at, attempt } => {
            if job.state != JobState::Queued {
                return Err(invalid(job));
            }
            if *attempt != job.attempt + 1 {
                return Err(TransitionError::AttemptMismatch { id, expected: job.attempt + 1, got: *attempt });
            }
            job.state = JobState::Running;
            job.attempt = *attempt;
            job.progress = None;
            job.lease = Some(Lease { id: lease_id.clone(), worker: worker.clone(), expires_at: *lease_expires_at });
        }
        EventKind::Heartbeat { lease_id, lease_expires_at, progress } => {
            live_lease(job, lease_id, ev)?;
            if let Some(lease) = &mut job.lease {
                lease.expires_at = *lease_expires_at;
            }
            if progress.is_some() {
                job.progress = progress.clone();
            }
        }
        EventKind::Succeeded { lease_id, artifacts } => {
            live_lease(job, lease_id, ev)?;
            job.state = JobState::Succeeded;
            job.lease = None;
            job.artifacts = artifacts.clone();
            job.finished_at = Some(ev.at);
        }
        EventKind::Failed { lease_id, class, message, retry_at } => {
            live_lease(job, lease_id, ev)?;
            fail(job, class, message, *retry_at, ev);
        }
        EventKind::LeaseExpired { lease_id, retry_at } => {
            let lease = job.lease.as_ref().filter(|_| job.state == JobState::Running);
            let lease = lease.ok_or_else(|| invalid(job))?;
            if &lease.id != lease_id {
                return Err(TransitionError::LeaseMismatch(id));
            }
            if lease.expires_at > ev.at {
                return Err(TransitionError::LeaseNotExpired(id));
            }
            fail(job, "lease_expired", "lease expired without heartbeat", *retry_at, ev);
        }
        EventKind::Cancelled { .. } => {
            if job.state.is_terminal() {
                return Err(invalid(job));
            }
            job.state = JobState::Cancelled;
            job.lease = None;
            job.finished_at = Some(ev.at);
        }
        EventKind::Retried { run_after, .. } => {
            if !matches!(job.state, JobState::Dead | JobState::Cancelled) {
                return Err(invalid(job));
            }
            job.state = JobState::Queued;
            job.attempt = 0;
            job.spec.run_after = *run_after;
            job.finished_at = None;
        }
        EventKind::Enqueued(_) | EventKind::Audit { .. } => unreachable!("handled by apply"),
    }
    job.updated_at = ev.at;
    job.last_seq = ev.seq;
    Ok(())
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

/// [`replay_one`] for an event the caller has no more use for: a new job takes the event's spec,
/// tenant, project and correlation id instead of copies of them. Creating a job is where replay
/// by reference copies most (the spec with its payload), so this is the form a verifier uses.
pub fn replay_owned(jobs: &mut BTreeMap<JobId, Job>, ev: Event) -> Result<(), ReplayError> {
    use std::collections::btree_map::Entry;
    match ev {
        Event {
            at, seq, tenant, project, correlation_id, job_id: Some(id), event: EventKind::Enqueued(spec), ..
        } => {
            let refused = |source| ReplayError { seq, source };
            let Entry::Vacant(slot) = jobs.entry(id) else {
                return Err(refused(TransitionError::JobExists(id)));
            };
            check_spec(id, &spec).map_err(refused)?;
            slot.insert(created(id, (at, seq), tenant, project, correlation_id, spec));
            Ok(())
        }
        ev => replay_one(jobs, &ev),
    }
}

/// Applies one event to a map of jobs; the streaming form of [`replay`].
pub fn replay_one(jobs: &mut BTreeMap<JobId, Job>, ev: &Event) -> Result<(), ReplayError> {
    // A job that exists changes in place; creating one, and refusing, is `apply`'s.
    let is_change = !matches!(ev.event, EventKind::Enqueued(_) | EventKind::Audit { .. });
    if let Some(job) = ev.job_id.filter(|_| is_change).and_then(|id| jobs.get_mut(&id)) {
        return transition(job, ev).map_err(|source| ReplayError { seq: ev.seq, source });
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::GENESIS_HASH;
    use crate::{EventDraft, JobSpec, Timestamp};

    fn event(seq: u64, at: i64, kind: EventKind) -> Event {
        EventDraft {
            at: Timestamp::from_millis(at),
            tenant: "acme".into(),
            project: "feeds".into(),
            job_id: Some(1),
            actor: "w".into(),
            correlation_id: "c".into(),
            kind,
        }
        .seal(seq, GENESIS_HASH)
    }

    fn claimed(seq: u64, at: i64, lease: &str, attempt: u32) -> Event {
        let kind = EventKind::Claimed {
            lease_id: lease.into(),
            worker: "w".into(),
            lease_expires_at: Timestamp::from_millis(at + 1000),
            attempt,
        };
        event(seq, at, kind)
    }

    fn history() -> Vec<Event> {
        let spec = JobSpec::for_test(serde_json::json!({"n": 1}));
        vec![
            event(1, 10, EventKind::Enqueued(spec)),
            claimed(2, 20, "l1", 1),
            event(
                3,
                30,
                EventKind::Heartbeat {
                    lease_id: "l1".into(),
                    lease_expires_at: Timestamp::from_millis(2000),
                    progress: Some(serde_json::json!(0.5)),
                },
            ),
            event(
                4,
                40,
                EventKind::Failed {
                    lease_id: "l1".into(),
                    class: "upstream".into(),
                    message: "429".into(),
                    retry_at: Some(Timestamp::from_millis(100)),
                },
            ),
            claimed(5, 100, "l2", 2),
            event(6, 110, EventKind::Succeeded { lease_id: "l2".into(), artifacts: Vec::new() }),
        ]
    }

    /// Replay changes jobs in place; `apply` returns a changed copy. Both give the same jobs.
    #[test]
    fn in_place_replay_matches_apply() {
        let mut by_apply: Option<Job> = None;
        let mut jobs = BTreeMap::new();
        for ev in history() {
            by_apply = apply(by_apply.as_ref(), &ev).unwrap();
            replay_one(&mut jobs, &ev).unwrap();
            assert_eq!(jobs.get(&1), by_apply.as_ref(), "after event {}", ev.seq);
        }
        let job = &jobs[&1];
        assert_eq!((job.state, job.attempt, job.last_seq), (JobState::Succeeded, 2, 6));
    }

    /// A refused event leaves the job as it was, whichever check refuses it.
    #[test]
    fn a_refused_event_changes_nothing() {
        let mut jobs = BTreeMap::new();
        for ev in &history()[..2] {
            replay_one(&mut jobs, ev).unwrap();
        }
        let before = jobs.clone();
        let refused = [
            event(3, 30, EventKind::Succeeded { lease_id: "other".into(), artifacts: Vec::new() }),
            event(3, 5000, EventKind::Succeeded { lease_id: "l1".into(), artifacts: Vec::new() }),
            claimed(3, 30, "l9", 2),
            event(3, 30, EventKind::LeaseExpired { lease_id: "l1".into(), retry_at: None }),
            event(3, 30, EventKind::Retried { run_after: Timestamp::from_millis(0), reason: None }),
        ];
        for ev in &refused {
            let err = replay_one(&mut jobs, ev).unwrap_err();
            assert_eq!(err.seq, 3);
            assert_eq!(jobs, before, "{:?} changed the job", ev.event);
        }
    }

    /// Replay by value gives what replay by reference gives, refusals included.
    #[test]
    fn owned_replay_matches_replay_by_reference() {
        let mut by_ref = BTreeMap::new();
        let mut owned = BTreeMap::new();
        for ev in history() {
            replay_one(&mut by_ref, &ev).unwrap();
            replay_owned(&mut owned, ev).unwrap();
            assert_eq!(owned, by_ref);
        }
        let EventKind::Enqueued(spec) = history()[0].event.clone() else { unreachable!() };
        let never = JobSpec { max_attempts: 0, ..spec.clone() };
        let mut other = event(7, 120, EventKind::Enqueued(never));
        other.job_id = Some(2);
        for ev in [event(7, 120, EventKind::Enqueued(spec)), other] {
            let want = replay_one(&mut by_ref.clone(), &ev).unwrap_err();
            assert_eq!(replay_owned(&mut owned, ev), Err(want));
            assert_eq!(owned, by_ref);
        }
    }
}
