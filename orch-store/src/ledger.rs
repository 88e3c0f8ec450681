//! What a write transaction does to a ledger, written once for every backend: sequencing and
//! chaining events, applying them with [`orch_core::apply`], enqueueing, claiming through a
//! gate, acking, auditing and cascading. A backend supplies only the row-level primitives
//! ([`Tx`]); the rules of the ledger, and the checks on what callers send, live here.

use std::collections::{BTreeSet, HashMap};

use orch_core::hash::GENESIS_HASH;
use orch_core::throttle::ThrottleRecord;
use orch_core::TransitionError;
use orch_core::{apply, Artifact, Event, EventDraft, EventKind, Job, JobId, JobSpec, JobState, Timestamp};

use crate::types::*;
use crate::StoreError;

/// The row-level operations of one backend's write transaction.
pub(crate) trait Tx {
    /// Serialises this transaction's appends with every other writer of the ledger (across
    /// processes too), so that sequence numbers and chain heads are read and moved by one
    /// writer at a time and commits land in sequence order. Called before the first read of a
    /// sequence or head; a backend whose transactions are already exclusive does nothing.
    fn lock_ledger(&mut self) -> Result<(), StoreError>;
    /// The highest history sequence number (0 for none).
    fn max_seq(&mut self) -> Result<u64, StoreError>;
    /// The highest job id (0 for none).
    fn max_job_id(&mut self) -> Result<JobId, StoreError>;
    /// The highest throttle record sequence number (0 for none).
    fn max_throttle_seq(&mut self) -> Result<u64, StoreError>;
    /// A tenant's chain head hash, if it has events.
    fn tenant_head(&mut self, tenant: &str) -> Result<Option<String>, StoreError>;
    /// Moves a tenant's chain head.
    fn set_tenant_head(&mut self, tenant: &str, seq: u64, hash: &str) -> Result<(), StoreError>;
    /// Appends a sealed event with its canonical line.
    fn insert_event(&mut self, ev: &Event, line: &str) -> Result<(), StoreError>;
    /// Inserts a job row, or rewrites one after a state change (`doc` is its canonical JSON).
    /// A rewrite need only store what a state change can change: state, `run_after`, lease,
    /// `updated_at`, the last error's class and the document; tenant, project, queue, source, priority, keys and run
    /// are fixed when the job is enqueued.
    fn write_job(&mut self, job: &Job, doc: &str, insert: bool) -> Result<(), StoreError>;
    /// One job in scope, locked against other writers until the transaction ends; another
    /// tenant's job is [`StoreError::NotFound`].
    fn load_job(&mut self, scope: &Scope, id: JobId) -> Result<Job, StoreError>;
    /// Locks jobs (those that exist) against other writers, in id order, before a batch works
    /// on them one by one; a backend whose transactions are exclusive does nothing.
    fn lock_jobs(&mut self, ids: &[JobId]) -> Result<(), StoreError>;
    /// The job a tenant enqueued with an idempotency key.
    fn job_by_key(&mut self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError>;
    /// A job's tenant and state, whoever owns it.
    fn job_tenant_state(&mut self, id: JobId) -> Result<Option<(String, String)>, StoreError>;
    /// Records that a tenant has a project.
    fn add_project(&mut self, tenant: &str, project: &str) -> Result<(), StoreError>;
    /// Records a DAG edge.
    fn add_edge(&mut self, parent: JobId, child: JobId) -> Result<(), StoreError>;
    /// Stores an artifact's content (once per digest) and links it to its job.
    fn add_artifact(&mut self, job: JobId, meta: &Artifact, content: &[u8]) -> Result<(), StoreError>;
    /// Appends a throttle record with its canonical line.
    fn insert_throttle(&mut self, r: &ThrottleRecord, line: &str) -> Result<(), StoreError>;
    /// The queued children of a job, by id.
    fn queued_children(&mut self, parent: JobId) -> Result<Vec<Job>, StoreError>;
    /// The best `limit` ready jobs of each of the request's queues, merged in claim order
    /// (priority, then `run_after`, then id), passing over excluded classes and jobs whose
    /// parents have not all succeeded. Backends that can lock rows lock these.
    fn ready_jobs(
        &mut self,
        req: &ClaimRequest,
        now: Timestamp,
        excluded: &BTreeSet<Exclusion>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError>;
    /// Jobs running now, by tenant, queue and source.
    fn running_counts(&mut self) -> Result<Vec<RunningCount>, StoreError>;
    /// Running jobs whose lease lapsed at or before `now`, oldest lease first, locked.
    fn expired_leases(&mut self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError>;
    /// Dead-lettered jobs in scope (and queue), by id, locked.
    fn dead_jobs(&mut self, scope: &Scope, queue: Option<&str>, limit: usize) -> Result<Vec<Job>, StoreError>;
    /// Creates or replaces a setting's row (`host`: a source's).
    fn put_setting_row(&mut self, change: &SettingChange, host: Option<&str>, doc: &str) -> Result<(), StoreError>;
    /// Removes a setting's row (and a schedule's cursor); returns how many rows it removed.
    fn delete_setting_row(&mut self, change: &SettingChange) -> Result<u64, StoreError>;
    /// The open incidents.
    fn open_incidents(&mut self) -> Result<Vec<Incident>, StoreError>;
    /// Records an incident opened at `at`; returns its id.
    fn insert_incident(&mut self, spec: &IncidentSpec, at: Timestamp) -> Result<i64, StoreError>;
    /// Closes an incident at `at`.
    fn close_incident(&mut self, id: i64, at: Timestamp) -> Result<(), StoreError>;
}

/// One write transaction: sequences and chains events, applies them, and writes jobs.
pub(crate) struct Writer<'t, T: Tx> {
    /// The backend's transaction, for the backend's own statements.
    pub tx: &'t mut T,
    /// The transaction's instant.
    pub now: Timestamp,
    /// The store's options.
    pub opts: &'t StoreOptions,
    next_seq: Option<u64>,
    /// Each tenant's chain head as this transaction moved it: (seq, hash).
    heads: HashMap<String, (u64, String)>,
    /// Jobs this transaction dead-lettered or cancelled: their children may follow.
    ended: Vec<JobId>,
}

impl<'t, T: Tx> Writer<'t, T> {
    pub fn new(tx: &'t mut T, now: Timestamp, opts: &'t StoreOptions) -> Self {
        Writer { tx, now, opts, next_seq: None, heads: HashMap::new(), ended: Vec::new() }
    }

    /// Cascades and moves the chain heads; the backend commits after this.
    pub fn finish(mut self) -> Result<(), StoreError> {
        self.cascade()?;
        for (tenant, (seq, hash)) in std::mem::take(&mut self.heads) {
            self.tx.set_tenant_head(&tenant, seq, &hash)?;
        }
        Ok(())
    }

    pub fn load_job(&mut self, scope: &Scope, id: JobId) -> Result<Job, StoreError> {
        self.tx.load_job(scope, id)
    }

    pub fn draft(&self, job: &Job, actor: &str, kind: EventKind) -> EventDraft {
        EventDraft {
            at: self.now,
            tenant: job.tenant.clone(),
            project: job.project.clone(),
            job_id: Some(job.id),
            actor: actor.to_string(),
            correlation_id: job.correlation_id.clone(),
            kind,
        }
    }

    fn next_seq(&mut self) -> Result<u64, StoreError> {
        match self.next_seq {
            Some(s) => Ok(s),
            None => {
                self.tx.lock_ledger()?;
                Ok(self.tx.max_seq()? + 1)
            }
        }
    }

    fn head(&mut self, tenant: &str) -> Result<String, StoreError> {
        if let Some((_, h)) = self.heads.get(tenant) {
            return Ok(h.clone());
        }
        Ok(self.tx.tenant_head(tenant)?.unwrap_or_else(|| GENESIS_HASH.to_string()))
    }

    /// Seals the draft as the next event, applies it to `prev`, and writes both. Nothing is
    /// written if the state machine refuses the event. Returns the event and the job.
    pub fn record(&mut self, draft: EventDraft, prev: Option<&Job>) -> Result<(Event, Option<Job>), StoreError> {
        let seq = self.next_seq()?;
        let prev_hash = self.head(&draft.tenant)?;
        let (ev, line) = draft.seal_with_line(seq, &prev_hash);
        let job = apply(prev, &ev).map_err(transition_error)?;
        self.tx.insert_event(&ev, &line)?;
        if let Some(job) = &job {
            let doc = orch_core::canonical::to_vec(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let doc = String::from_utf8(doc).expect("canonical JSON is UTF-8");
            self.tx.write_job(job, &doc, prev.is_none())?;
            let ended = matches!(job.state, JobState::Dead | JobState::Cancelled);
            if ended && prev.is_some_and(|p| p.state != job.state) {
                self.ended.push(job.id);
            }
        }
        self.next_seq = Some(seq + 1);
        self.heads.insert(ev.tenant.clone(), (seq, ev.hash.clone()));
        Ok((ev, job))
    }

    /// Records a job event that must change its job.
    pub fn record_job(&mut self, draft: EventDraft, prev: &Job) -> Result<Job, StoreError> {
        self.record(draft, Some(prev))?.1.ok_or_else(|| StoreError::Corrupt("job event changed no job".into()))
    }

    /// Applies a transition to one job in scope; `make` builds the event from the current job.
    /// `actor` defaults to the worker holding the job's lease (for worker calls).
    pub fn transition(
        &mut self,
        scope: &Scope,
        id: JobId,
        actor: Option<&str>,
        make: impl FnOnce(&Job, &Self) -> Result<EventKind, StoreError>,
    ) -> Result<Job, StoreError> {
        let job = self.load_job(scope, id)?;
        let kind = make(&job, self)?;
        let actor = actor.map_or_else(|| lease_holder(&job), str::to_string);
        let draft = self.draft(&job, &actor, kind);
        self.record_job(draft, &job)
    }

    /// Enqueues jobs (already checked), returning existing jobs for used idempotency keys.
    pub fn enqueue(&mut self, actor: &str, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, StoreError> {
        // Ids, keys and parents are read under the ledger lock, so that concurrent enqueues
        // (of other processes too) see each other.
        self.tx.lock_ledger()?;
        let mut next_id = self.tx.max_job_id()? + 1;
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs {
            if let Some(key) = &j.idempotency_key {
                if let Some(job) = self.tx.job_by_key(&j.tenant, key)? {
                    out.push(Enqueued { job, created: false });
                    continue;
                }
            }
            let mut parents = Vec::with_capacity(j.depends_on.len());
            for dep in &j.depends_on {
                let parent = match *dep {
                    Dep::Earlier(i) => out.get(i).map(|e: &Enqueued| e.job.id).ok_or_else(|| {
                        StoreError::Invalid(format!("job {} depends on a later job of its batch", out.len()))
                    })?,
                    Dep::Job(id) => {
                        let owner = self.tx.job_tenant_state(id)?.map(|(t, _)| t);
                        if owner.as_deref() != Some(j.tenant.as_str()) {
                            return Err(StoreError::Invalid(format!(
                                "depends_on names job {id}, which does not exist"
                            )));
                        }
                        id
                    }
                };
                parents.push(parent);
            }
            parents.sort_unstable();
            parents.dedup();
            let id = next_id;
            next_id += 1;
            let spec = JobSpec {
                queue: j.queue,
                source: j.source,
                payload: j.payload,
                priority: j.priority,
                run_after: j.run_after.unwrap_or(self.now),
                max_attempts: j.max_attempts.unwrap_or(self.opts.default_max_attempts),
                idempotency_key: j.idempotency_key,
                run: j.run,
                depends_on: parents.clone(),
                on_parent_failure: j.on_parent_failure,
            };
            self.tx.add_project(&j.tenant, &j.project)?;
            let draft = EventDraft {
                at: self.now,
                tenant: j.tenant,
                project: j.project,
                job_id: Some(id),
                actor: actor.to_string(),
                correlation_id: j.correlation_id.unwrap_or_else(new_token),
                kind: EventKind::Enqueued(spec),
            };
            let job = self.record(draft, None)?.1.expect("enqueue creates a job");
            for parent in &parents {
                self.tx.add_edge(*parent, id)?;
                // A parent that already ended takes the new child with it, as it would have.
                let state = self.tx.job_tenant_state(*parent)?.map(|(_, s)| s).unwrap_or_default();
                if matches!(state.as_str(), "dead" | "cancelled") {
                    self.ended.push(*parent);
                }
            }
            out.push(Enqueued { job, created: true });
        }
        Ok(out)
    }

    /// Leases up to `req.limit` ready jobs that `gate` admits, with the gate's throttle records.
    pub fn claim(&mut self, req: &ClaimRequest, gate: &mut dyn ClaimGate) -> Result<Vec<Allocation>, StoreError> {
        let limit = req.limit.min(10_000);
        let lease_ms = self.lease_ms(req.lease_ms)?;
        // The ledger lock before the gate's first question: running jobs are counted under it,
        // so that limits hold across processes, and a gate may hold its caller's own lock from
        // that question on (orchd's flow control), which must not wait here for another
        // process's write.
        self.tx.lock_ledger()?;
        let running = if gate.wants_running() { self.tx.running_counts()? } else { Vec::new() };
        let mut excluded: BTreeSet<Exclusion> = gate.begin(self.now, &running).into_iter().collect();
        let expires = self.now.plus_millis(lease_ms as i64);
        let mut out = Vec::with_capacity(limit.min(1024));
        // Rounds: take the best ready jobs not excluded; a refusal excludes its whole class,
        // and the next round looks past it. Each round ends with a full batch, a queue
        // exhausted, or a new exclusion, so the rounds are few.
        loop {
            let want = limit - out.len();
            let candidates = self.tx.ready_jobs(req, self.now, &excluded, want)?;
            let mut refused = false;
            for job in candidates {
                if out.len() == limit {
                    break;
                }
                if let Err(x) = gate.admit(&job) {
                    refused |= excluded.insert(x);
                    continue;
                }
                let kind = EventKind::Claimed {
                    lease_id: new_token(),
                    worker: req.worker.clone(),
                    lease_expires_at: expires,
                    attempt: job.attempt + 1,
                };
                let draft = self.draft(&job, &req.worker, kind);
                let job = self.record_job(draft, &job)?;
                let retry = RetryHints {
                    attempts_left: job.spec.max_attempts.saturating_sub(job.attempt),
                    backoff_ms: self.opts.retry.delay_ms(job.attempt, None, 1.0),
                    heartbeat_ms: lease_ms / 3,
                };
                out.push(Allocation { job, retry });
            }
            if out.len() == limit || !refused {
                break;
            }
        }
        self.throttles(gate.records())?;
        Ok(out)
    }

    /// Completes a leased job: its `job.succeeded` event and its artifacts.
    pub fn ack(&mut self, scope: &Scope, id: JobId, ack: Ack) -> Result<Job, StoreError> {
        let job = self.load_job(scope, id)?;
        let actor = lease_holder(&job);
        let metas: Vec<Artifact> =
            ack.artifacts.iter().map(|a| Artifact::of_content(&a.name, &a.media_type, &a.content)).collect();
        let draft = self.draft(&job, &actor, EventKind::Succeeded { lease_id: ack.lease_id, artifacts: metas.clone() });
        let job = self.record_job(draft, &job)?;
        for (a, m) in ack.artifacts.iter().zip(&metas) {
            self.tx.add_artifact(id, m, &a.content)?;
        }
        Ok(job)
    }

    /// Acks each job on its own (see [`crate::Store::ack_many`]).
    pub fn ack_many(
        &mut self,
        scope: &Scope,
        acks: Vec<(JobId, Ack)>,
    ) -> Result<Vec<Result<Job, StoreError>>, StoreError> {
        // An ack that is refused is refused before it writes anything (the job is read and the
        // transition checked first), so the others can go on; any other error rolls the whole
        // batch back.
        let mut ids: Vec<JobId> = acks.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        self.tx.lock_jobs(&ids)?;
        let mut out = Vec::with_capacity(acks.len());
        for (id, ack) in acks {
            match check_ack(&ack).and_then(|()| self.ack(scope, id, ack)) {
                Err(e) if e.is_backend() || matches!(e, StoreError::Corrupt(_)) => return Err(e),
                r => out.push(r),
            }
        }
        Ok(out)
    }

    /// Takes back up to `limit` lapsed leases.
    pub fn reap(&mut self, limit: usize) -> Result<usize, StoreError> {
        let jobs = self.tx.expired_leases(self.now, limit)?;
        for job in &jobs {
            let lease_id = job.lease.as_ref().map(|l| l.id.clone()).unwrap_or_default();
            let retry_at = self.retry_at(job, true, None);
            let draft = self.draft(job, "orchd", EventKind::LeaseExpired { lease_id, retry_at });
            self.record(draft, Some(job))?;
        }
        Ok(jobs.len())
    }

    /// Puts dead-lettered jobs back in the queue.
    pub fn retry_dead(
        &mut self,
        scope: &Scope,
        queue: Option<&str>,
        actor: &str,
        reason: Option<String>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let jobs = self.tx.dead_jobs(scope, queue, limit.min(100_000))?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let draft = self.draft(&job, actor, EventKind::Retried { run_after: self.now, reason: reason.clone() });
            out.push(self.record_job(draft, &job)?);
        }
        Ok(out)
    }

    /// Files an `audit` event in a tenant's chain; returns it.
    pub fn audit(
        &mut self,
        tenant: &str,
        project: &str,
        actor: &str,
        action: String,
        details: serde_json::Value,
    ) -> Result<Event, StoreError> {
        let draft = EventDraft {
            at: self.now,
            tenant: tenant.to_string(),
            project: project.to_string(),
            job_id: None,
            actor: actor.to_string(),
            correlation_id: new_token(),
            kind: EventKind::Audit { action, details },
        };
        Ok(self.record(draft, None)?.0)
    }

    /// Creates or replaces a setting (its document already checked) and audits it.
    pub fn put_setting(&mut self, actor: &str, change: &SettingChange, doc: &str) -> Result<Event, StoreError> {
        self.tx.lock_ledger()?;
        let host = if change.kind == SettingKind::Source { Some(source_host(change)?) } else { None };
        self.tx.put_setting_row(change, host, doc)?;
        let details = setting_details(change, true);
        self.audit(&change.tenant, &change.project, actor, format!("{}.put", change.kind.as_str()), details)
    }

    /// Removes a setting and audits it; one that does not exist is [`StoreError::Missing`].
    pub fn delete_setting(&mut self, actor: &str, change: &SettingChange) -> Result<Event, StoreError> {
        self.tx.lock_ledger()?;
        if self.tx.delete_setting_row(change)? == 0 {
            return Err(StoreError::Missing { what: change.kind.as_str(), id: change.id.clone() });
        }
        let details = setting_details(change, false);
        self.audit(&change.tenant, &change.project, actor, format!("{}.delete", change.kind.as_str()), details)
    }

    /// Opens and closes incidents of `kinds` to match the conditions that hold now (see
    /// [`crate::Store::sync_incidents`]).
    pub fn sync_incidents(&mut self, kinds: &[&str], now: Vec<IncidentSpec>) -> Result<IncidentChanges, StoreError> {
        // Under the ledger lock: daemons reconciling at once see each other's work.
        self.tx.lock_ledger()?;
        let mut out = IncidentChanges::default();
        let mut open: std::collections::BTreeMap<(String, String, String), Incident> = self
            .tx
            .open_incidents()?
            .into_iter()
            .filter(|i| kinds.contains(&i.kind.as_str()))
            .map(|i| ((i.tenant.clone(), i.kind.clone(), i.key.clone()), i))
            .collect();
        let at = self.now;
        let mut seen = BTreeSet::new();
        for c in now {
            let k = (c.tenant.clone(), c.kind.clone(), c.key.clone());
            if !seen.insert(k.clone()) || open.remove(&k).is_some() {
                continue;
            }
            let id = self.tx.insert_incident(&c, at)?;
            let i = Incident {
                id,
                tenant: c.tenant,
                kind: c.kind,
                key: c.key,
                opened_at: at,
                closed_at: None,
                details: c.details,
            };
            let details = serde_json::json!({"id": i.id, "kind": i.kind, "key": i.key, "details": i.details});
            self.audit(&i.tenant, "default", "orchd", "incident.opened".into(), details)?;
            out.opened.push(i);
        }
        for (_, mut i) in open {
            self.tx.close_incident(i.id, at)?;
            i.closed_at = Some(at);
            let details = serde_json::json!({"id": i.id, "kind": i.kind, "key": i.key});
            self.audit(&i.tenant, "default", "orchd", "incident.closed".into(), details)?;
            out.closed.push(i);
        }
        Ok(out)
    }

    /// Appends throttle records (their `seq` is assigned here).
    pub fn throttles(&mut self, records: Vec<ThrottleRecord>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.tx.lock_ledger()?;
        let mut seq = self.tx.max_throttle_seq()?;
        for mut r in records {
            seq += 1;
            r.seq = seq;
            check_text("throttle reason", &r.reason, 1024)?;
            let line = orch_core::canonical::to_vec(&r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let line = String::from_utf8(line).expect("canonical JSON is UTF-8");
            self.tx.insert_throttle(&r, &line)?;
        }
        Ok(())
    }

    /// Cancels the queued children (with `on_parent_failure: cancel`) of every job that ended
    /// in this transaction, and theirs in turn. Blocked children (the default) stay queued.
    fn cascade(&mut self) -> Result<(), StoreError> {
        while let Some(parent) = self.ended.pop() {
            for child in self.tx.queued_children(parent)? {
                if child.spec.on_parent_failure != orch_core::ParentFailure::Cancel {
                    continue;
                }
                let reason = Some(format!("parent job {parent} did not succeed"));
                let draft = self.draft(&child, "orchd", EventKind::Cancelled { reason });
                self.record(draft, Some(&child))?;
            }
        }
        Ok(())
    }

    /// The delay before the next attempt after `attempt` failed, with fresh jitter.
    pub fn retry_at(&self, job: &Job, retryable: bool, hint_ms: Option<u64>) -> Option<Timestamp> {
        if !retryable || job.attempt >= job.spec.max_attempts {
            return None;
        }
        let delay = self.opts.retry.delay_ms(job.attempt, hint_ms, rand::random::<f64>());
        Some(self.now.plus_millis(delay as i64))
    }

    pub fn lease_ms(&self, asked: Option<u64>) -> Result<u64, StoreError> {
        let ms = asked.unwrap_or(self.opts.default_lease_ms);
        if ms == 0 || ms > self.opts.max_lease_ms {
            return Err(StoreError::Invalid(format!(
                "lease length must be between 1 ms and {} ms, got {ms}",
                self.opts.max_lease_ms
            )));
        }
        Ok(ms)
    }
}

/// The event kinds of the worker and operator verbs, built the same way on every backend.
pub(crate) mod verbs {
    use super::*;

    pub fn heartbeat<T: Tx>(w: &mut Writer<'_, T>, scope: &Scope, id: JobId, hb: Heartbeat) -> Result<Job, StoreError> {
        w.transition(scope, id, None, |_, w| {
            let ms = w.lease_ms(hb.extend_ms)?;
            Ok(EventKind::Heartbeat {
                lease_id: hb.lease_id,
                lease_expires_at: w.now.plus_millis(ms as i64),
                progress: hb.progress,
            })
        })
    }

    pub fn fail<T: Tx>(w: &mut Writer<'_, T>, scope: &Scope, id: JobId, f: Failure) -> Result<Job, StoreError> {
        w.transition(scope, id, None, |job, w| {
            Ok(EventKind::Failed {
                lease_id: f.lease_id,
                class: f.class,
                message: f.message,
                retry_at: w.retry_at(job, f.retryable, f.retry_after_ms),
            })
        })
    }

    pub fn cancel<T: Tx>(
        w: &mut Writer<'_, T>,
        scope: &Scope,
        id: JobId,
        actor: &str,
        reason: Option<String>,
    ) -> Result<Job, StoreError> {
        w.transition(scope, id, Some(actor), |_, _| Ok(EventKind::Cancelled { reason }))
    }

    pub fn retry<T: Tx>(
        w: &mut Writer<'_, T>,
        scope: &Scope,
        id: JobId,
        actor: &str,
        reason: Option<String>,
    ) -> Result<Job, StoreError> {
        w.transition(scope, id, Some(actor), |_, w| Ok(EventKind::Retried { run_after: w.now, reason }))
    }
}

/// The [`Store`](crate::Store) verbs that are the same on every backend — their checks, then one
/// write transaction of the [`Writer`] — expanded inside `impl Store for …` of a backend that
/// has `fn write(&self, f)` and an `opts: StoreOptions` field.
macro_rules! write_verbs {
    () => {
        #[tracing::instrument(skip_all, fields(jobs = jobs.len()))]
        fn enqueue(&self, actor: &str, jobs: Vec<$crate::NewJob>) -> Result<Vec<$crate::Enqueued>, StoreError> {
            $crate::ledger::check_new_jobs(&self.opts, &jobs)?;
            self.write(|w| w.enqueue(actor, jobs))
        }

        #[tracing::instrument(skip_all, fields(worker = %req.worker, limit = req.limit))]
        fn claim_gated(
            &self,
            req: &$crate::ClaimRequest,
            gate: &mut dyn $crate::ClaimGate,
        ) -> Result<Vec<$crate::Allocation>, StoreError> {
            $crate::ledger::check_worker(req)?;
            if req.queues.is_empty() || req.limit == 0 {
                return Ok(Vec::new());
            }
            self.write(|w| w.claim(req, gate))
        }

        #[tracing::instrument(skip_all, fields(job.id = id))]
        fn heartbeat(
            &self,
            scope: &$crate::Scope,
            id: orch_core::JobId,
            hb: $crate::Heartbeat,
        ) -> Result<orch_core::Job, StoreError> {
            self.write(|w| $crate::ledger::verbs::heartbeat(w, scope, id, hb))
        }

        #[tracing::instrument(skip_all, fields(job.id = id))]
        fn ack(
            &self,
            scope: &$crate::Scope,
            id: orch_core::JobId,
            ack: $crate::Ack,
        ) -> Result<orch_core::Job, StoreError> {
            $crate::ledger::check_ack(&ack)?;
            self.write(|w| w.ack(scope, id, ack))
        }

        #[tracing::instrument(skip_all, fields(acks = acks.len()))]
        fn ack_many(
            &self,
            scope: &$crate::Scope,
            acks: Vec<(orch_core::JobId, $crate::Ack)>,
        ) -> Result<Vec<Result<orch_core::Job, StoreError>>, StoreError> {
            self.write(|w| w.ack_many(scope, acks))
        }

        #[tracing::instrument(skip_all, fields(job.id = id))]
        fn fail(
            &self,
            scope: &$crate::Scope,
            id: orch_core::JobId,
            f: $crate::Failure,
        ) -> Result<orch_core::Job, StoreError> {
            $crate::ledger::check_failure(&f)?;
            self.write(|w| $crate::ledger::verbs::fail(w, scope, id, f))
        }

        #[tracing::instrument(skip_all, fields(job.id = id))]
        fn cancel(
            &self,
            scope: &$crate::Scope,
            id: orch_core::JobId,
            actor: &str,
            reason: Option<String>,
        ) -> Result<orch_core::Job, StoreError> {
            $crate::ledger::check_reason(&reason)?;
            self.write(|w| $crate::ledger::verbs::cancel(w, scope, id, actor, reason))
        }

        #[tracing::instrument(skip_all, fields(job.id = id))]
        fn retry(
            &self,
            scope: &$crate::Scope,
            id: orch_core::JobId,
            actor: &str,
            reason: Option<String>,
        ) -> Result<orch_core::Job, StoreError> {
            $crate::ledger::check_reason(&reason)?;
            self.write(|w| $crate::ledger::verbs::retry(w, scope, id, actor, reason))
        }

        #[tracing::instrument(skip_all)]
        fn reap_expired_leases(&self, limit: usize) -> Result<usize, StoreError> {
            let n = self.write(|w| w.reap(limit))?;
            if n > 0 {
                tracing::info!(count = n, "took back expired leases");
            }
            Ok(n)
        }

        #[tracing::instrument(skip_all)]
        fn retry_dead(
            &self,
            scope: &$crate::Scope,
            queue: Option<&str>,
            actor: &str,
            reason: Option<String>,
            limit: usize,
        ) -> Result<Vec<orch_core::Job>, StoreError> {
            $crate::ledger::check_reason(&reason)?;
            self.write(|w| w.retry_dead(scope, queue, actor, reason, limit))
        }

        fn record_throttles(&self, records: Vec<orch_core::throttle::ThrottleRecord>) -> Result<(), StoreError> {
            self.write(|w| w.throttles(records))
        }

        #[tracing::instrument(skip_all, fields(kind = change.kind.as_str(), id = %change.id))]
        fn put_setting(&self, actor: &str, change: $crate::SettingChange) -> Result<orch_core::Event, StoreError> {
            let doc = $crate::ledger::check_setting(&change)?;
            self.write(|w| w.put_setting(actor, &change, &doc))
        }

        #[tracing::instrument(skip_all, fields(kind = change.kind.as_str(), id = %change.id))]
        fn delete_setting(&self, actor: &str, change: $crate::SettingChange) -> Result<orch_core::Event, StoreError> {
            $crate::ledger::check_name("tenant", &change.tenant)?;
            $crate::ledger::check_name("project", &change.project)?;
            $crate::ledger::check_audit_fields(&change.reason, &change.ticket)?;
            self.write(|w| w.delete_setting(actor, &change))
        }

        fn sync_incidents(
            &self,
            kinds: &[&str],
            now: Vec<$crate::IncidentSpec>,
        ) -> Result<$crate::IncidentChanges, StoreError> {
            $crate::ledger::check_incidents(kinds, &now)?;
            self.write(|w| w.sync_incidents(kinds, now))
        }
    };
}
pub(crate) use write_verbs;

pub(crate) fn transition_error(e: TransitionError) -> StoreError {
    let job = e.job_id();
    if e.is_lease_lost() {
        return StoreError::LeaseLost { job, reason: e.to_string() };
    }
    match e {
        TransitionError::InvalidState { .. } => StoreError::Conflict { job, reason: e.to_string() },
        TransitionError::InvalidSpec(..) => StoreError::Invalid(e.to_string()),
        _ => StoreError::Corrupt(e.to_string()),
    }
}

pub(crate) fn decode_job(doc: &str) -> Result<Job, StoreError> {
    serde_json::from_str(doc).map_err(|e| StoreError::Corrupt(format!("stored job does not decode: {e}")))
}

pub(crate) fn decode_event(line: &str) -> Result<Event, StoreError> {
    Event::from_line(line).map_err(decode_error)
}

/// Why a stored event line does not decode.
pub(crate) fn decode_error(e: orch_core::event::EventError) -> StoreError {
    StoreError::Corrupt(format!("stored event does not decode: {e}"))
}

/// A stored throttle line, as a record or as the JSON value a bundle carries.
pub(crate) fn decode_throttle<T: serde::de::DeserializeOwned>(line: &str) -> Result<T, StoreError> {
    serde_json::from_str(line).map_err(|e| StoreError::Corrupt(format!("throttle record: {e}")))
}

/// A snapshot query on this site's tables, turned to the history imported from another site
/// (the `imported_*` tables, which hold the same columns and a `site_id`).
pub(crate) fn on_imported(sql: &str) -> String {
    let mut sql = sql.to_string();
    for (own, imported) in [
        ("FROM history", "FROM imported_history"),
        ("FROM jobs", "FROM imported_jobs"),
        ("FROM throttles", "FROM imported_throttles"),
    ] {
        sql = sql.replace(own, imported);
    }
    sql
}

pub(crate) fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The actor of a worker event: the worker holding the job's lease.
pub(crate) fn lease_holder(job: &Job) -> String {
    job.lease.as_ref().map_or_else(|| "unknown-worker".to_string(), |l| l.worker.clone())
}

/// Names: tenants, projects, queues. Printable, short, no spaces or slashes.
pub(crate) fn check_name(what: &str, s: &str) -> Result<(), StoreError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} {s:?} must be 1-128 characters of letters, digits, '-', '_', '.', ':'"
        )))
    }
}

/// Artifact names and media types of an ack: printable, bounded, names unique.
pub(crate) fn check_ack(ack: &Ack) -> Result<(), StoreError> {
    let mut names = BTreeSet::new();
    for a in &ack.artifacts {
        check_text("artifact name", &a.name, 256)?;
        check_text("media type", &a.media_type, 256)?;
        if a.name.is_empty() || !names.insert(a.name.as_str()) {
            return Err(StoreError::Invalid(format!("artifact names must be non-empty and unique: {:?}", a.name)));
        }
    }
    Ok(())
}

pub(crate) fn check_text(what: &str, s: &str, max: usize) -> Result<(), StoreError> {
    if s.len() > max || s.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!("{what} must be at most {max} bytes without control characters")));
    }
    Ok(())
}

/// Reason and ticket of audited operations: short single-line text.
pub(crate) fn check_audit_fields(reason: &Option<String>, ticket: &Option<String>) -> Result<(), StoreError> {
    if let Some(r) = reason {
        check_text("reason", r, 1024)?;
    }
    if let Some(t) = ticket {
        check_text("ticket", t, 256)?;
    }
    Ok(())
}

pub(crate) fn check_reason(reason: &Option<String>) -> Result<(), StoreError> {
    check_audit_fields(reason, &None)
}

/// A failure's class and message.
pub(crate) fn check_failure(f: &Failure) -> Result<(), StoreError> {
    check_name("error class", &f.class)?;
    check_text("error message", &f.message.replace(['\n', '\t'], " "), 4096)
}

/// A claim's worker id.
pub(crate) fn check_worker(req: &ClaimRequest) -> Result<(), StoreError> {
    check_text("worker id", &req.worker, 256)?;
    if req.worker.is_empty() {
        return Err(StoreError::Invalid("worker id must not be empty".into()));
    }
    Ok(())
}

/// Refuses a batch with any invalid job, before anything is written.
pub(crate) fn check_new_jobs(opts: &StoreOptions, jobs: &[NewJob]) -> Result<(), StoreError> {
    for j in jobs {
        check_name("tenant", &j.tenant)?;
        check_name("project", &j.project)?;
        check_name("queue", &j.queue)?;
        if let Some(s) = &j.source {
            check_text("source", s, 512)?;
        }
        if let Some(k) = &j.idempotency_key {
            check_text("idempotency key", k, 256)?;
        }
        if let Some(c) = &j.correlation_id {
            check_text("correlation id", c, 256)?;
        }
        if j.max_attempts == Some(0) {
            return Err(StoreError::Invalid("max_attempts must be at least 1".into()));
        }
        let size = serde_json::to_vec(&j.payload).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > opts.max_payload_bytes {
            return Err(StoreError::Invalid(format!(
                "payload is {size} bytes, the limit is {}",
                opts.max_payload_bytes
            )));
        }
    }
    Ok(())
}

/// Checks a run before it starts.
pub(crate) fn check_run(opts: &StoreOptions, run: &NewRun, jobs: &[NewJob]) -> Result<(), StoreError> {
    check_name("tenant", &run.tenant)?;
    check_name("project", &run.project)?;
    check_name("run kind", &run.kind)?;
    check_audit_fields(&run.reason, &run.ticket)?;
    if jobs.iter().any(|j| j.tenant != run.tenant) {
        return Err(StoreError::Invalid("a run's jobs must belong to its tenant".into()));
    }
    check_new_jobs(opts, jobs)
}

/// A run's stored document.
pub(crate) fn run_doc(run: &NewRun, actor: &str, now: Timestamp) -> serde_json::Value {
    serde_json::json!({
        "kind": run.kind,
        "created_by": actor,
        "created_at": now,
        "params": run.params,
        "reason": run.reason,
        "ticket": run.ticket,
    })
}

/// Records a started run: its audit event and its jobs, which join the run.
pub(crate) fn start_run<T: Tx>(
    w: &mut Writer<'_, T>,
    actor: &str,
    id: i64,
    run: &NewRun,
    jobs: Vec<NewJob>,
) -> Result<Vec<Enqueued>, StoreError> {
    let details = serde_json::json!({
        "run": id, "params": run.params, "reason": run.reason, "ticket": run.ticket, "jobs": jobs.len(),
    });
    w.audit(&run.tenant, &run.project, actor, format!("{}.started", run.kind), details)?;
    let jobs = jobs.into_iter().map(|j| NewJob { run: Some(id), ..j }).collect();
    w.enqueue(actor, jobs)
}

/// A run from its stored document and its job counts by state.
pub(crate) fn decode_run(
    id: i64,
    tenant: String,
    project: String,
    doc: &str,
    jobs: std::collections::BTreeMap<String, u64>,
) -> Result<Run, StoreError> {
    let doc: serde_json::Value =
        serde_json::from_str(doc).map_err(|e| StoreError::Corrupt(format!("run {id} does not decode: {e}")))?;
    let text = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let active = ["queued", "running"].iter().any(|s| jobs.contains_key(*s));
    let all_ok = jobs.keys().all(|s| s == "succeeded");
    let state = if active {
        "active"
    } else if all_ok {
        "completed"
    } else {
        "failed"
    };
    let created_at = doc
        .get("created_at")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("run {id} has no created_at")))?;
    Ok(Run {
        id,
        tenant,
        project,
        kind: text("kind").unwrap_or_default(),
        created_by: text("created_by").unwrap_or_default(),
        created_at,
        params: doc.get("params").cloned().unwrap_or_default(),
        reason: text("reason"),
        ticket: text("ticket"),
        state: state.to_string(),
        jobs,
    })
}

/// A failed attempt or lapsed lease, from its event and its job's source and queue.
pub(crate) fn failure_record(line: &str, source: Option<String>, queue: String) -> Result<FailureRecord, StoreError> {
    let ev = decode_event(line)?;
    let (class, message) = match ev.event {
        EventKind::Failed { class, message, .. } => (class, message),
        _ => ("lease_expired".to_string(), "the lease lapsed without a heartbeat".to_string()),
    };
    Ok(FailureRecord {
        job_id: ev.job_id.unwrap_or_default(),
        tenant: ev.tenant,
        source,
        queue,
        class,
        message,
        at: ev.at,
    })
}

/// A value a listing is filtered by.
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// One condition of a listing: `<column> <operator>` and its value.
pub(crate) type Cond = (&'static str, Arg);

fn push(conds: &mut Vec<Cond>, lhs: &'static str, v: Option<Arg>) {
    if let Some(v) = v {
        conds.push((lhs, v));
    }
}

/// The conditions of a job listing in a scope, the same on every backend.
pub(crate) fn job_conditions(scope: &Scope, f: &JobFilter) -> Vec<Cond> {
    let text = |s: Option<&str>| s.map(|s| Arg::Text(s.to_string()));
    let mut c = Vec::new();
    push(&mut c, "tenant =", text(scope.tenant()));
    push(&mut c, "state =", text(f.state.map(|s| s.as_str())));
    push(&mut c, "queue =", text(f.queue.as_deref()));
    push(&mut c, "project =", text(f.project.as_deref()));
    push(&mut c, "source =", text(f.source.as_deref()));
    push(&mut c, "correlation_id =", text(f.correlation_id.as_deref()));
    push(&mut c, "run_id =", f.run.map(Arg::Int));
    push(&mut c, "updated_at >=", f.updated_since.map(|t| Arg::Int(t.as_millis())));
    push(&mut c, "updated_at <", f.updated_before.map(|t| Arg::Int(t.as_millis())));
    c
}

/// The conditions of a history listing in a scope, the same on every backend.
pub(crate) fn history_conditions(scope: &Scope, f: &HistoryFilter) -> Vec<Cond> {
    let mut c = Vec::new();
    push(&mut c, "tenant =", scope.tenant().map(|t| Arg::Text(t.to_string())));
    push(&mut c, "job_id =", f.job_id.map(Arg::Int));
    push(&mut c, "type =", f.event_type.clone().map(Arg::Text));
    push(&mut c, "correlation_id =", f.correlation_id.clone().map(Arg::Text));
    push(&mut c, "at >=", f.since.map(|t| Arg::Int(t.as_millis())));
    push(&mut c, "at <", f.before.map(|t| Arg::Int(t.as_millis())));
    c
}

/// The document an incident row stores.
pub(crate) fn incident_doc(spec: &IncidentSpec) -> Result<String, StoreError> {
    serde_json::to_string(&spec.details).map_err(|e| StoreError::Invalid(e.to_string()))
}

/// Checks a setting change; returns its document as stored.
pub(crate) fn check_setting(change: &SettingChange) -> Result<String, StoreError> {
    check_name("tenant", &change.tenant)?;
    check_name("project", &change.project)?;
    check_audit_fields(&change.reason, &change.ticket)?;
    if change.kind != SettingKind::Quota || change.id != "*" {
        check_name(change.kind.as_str(), &change.id)?;
    }
    if !change.doc.is_object() {
        return Err(StoreError::Invalid(format!("a {} must be a JSON object", change.kind.as_str())));
    }
    Ok(change.doc.to_string())
}

/// The source host a source setting names.
pub(crate) fn source_host(change: &SettingChange) -> Result<&str, StoreError> {
    let host = change.doc.get("host").and_then(|h| h.as_str()).unwrap_or_default();
    check_text("source host", host, 253)?;
    if host.is_empty() {
        return Err(StoreError::Invalid("a source needs a host".into()));
    }
    Ok(host)
}

/// The audit details of a setting change.
pub(crate) fn setting_details(change: &SettingChange, put: bool) -> serde_json::Value {
    if put {
        serde_json::json!({"id": change.id, "value": change.doc, "reason": change.reason, "ticket": change.ticket})
    } else {
        serde_json::json!({ "id": change.id, "reason": change.reason, "ticket": change.ticket })
    }
}

/// Checks the conditions given to `sync_incidents`.
pub(crate) fn check_incidents(kinds: &[&str], now: &[IncidentSpec]) -> Result<(), StoreError> {
    for c in now {
        check_name("tenant", &c.tenant)?;
        if !kinds.contains(&c.kind.as_str()) {
            return Err(StoreError::Invalid(format!("incident kind {:?} is not among {kinds:?}", c.kind)));
        }
    }
    Ok(())
}

/// Checks a new token.
pub(crate) fn check_token(t: &NewToken) -> Result<(), StoreError> {
    if t.tenant != "*" {
        check_name("tenant", &t.tenant)?;
    }
    check_name("token id", &t.id)?;
    check_text("label", &t.label, 256)?;
    for s in &t.scopes {
        check_name("scope", s)?;
    }
    Ok(())
}

/// Checks a new webhook.
pub(crate) fn check_webhook(tenant: &str, url: &str, filter: &serde_json::Value) -> Result<(), StoreError> {
    check_name("tenant", tenant)?;
    check_text("url", url, 2048)?;
    if !filter.is_object() {
        return Err(StoreError::Invalid("a webhook filter must be a JSON object".into()));
    }
    Ok(())
}

/// What the `attempts`-th delivery attempt with this outcome stores: (status, code, error,
/// next attempt at).
pub(crate) fn delivery_status(
    outcome: &DeliveryOutcome,
    attempts: u32,
) -> (&'static str, Option<u16>, Option<String>, i64) {
    match outcome {
        DeliveryOutcome::Delivered { code } => ("delivered", Some(*code), None, 0),
        DeliveryOutcome::Failed { code, error, max_attempts, .. } if attempts >= *max_attempts => {
            ("dead", *code, Some(error.clone()), 0)
        }
        DeliveryOutcome::Failed { code, error, retry_at, .. } => {
            ("pending", *code, Some(error.clone()), retry_at.as_millis())
        }
    }
}

/// The import batch's details for its `import.applied` audit event.
pub(crate) fn import_details(batch: &ImportBatch) -> serde_json::Value {
    let mut details = batch.details.clone();
    if let Some(obj) = details.as_object_mut() {
        obj.insert("site_id".into(), batch.site_id.clone().into());
        obj.insert("scope".into(), batch.scope.clone().into());
        obj.insert("from_seq".into(), batch.from_seq.into());
        obj.insert("to_seq".into(), batch.to_seq.into());
        obj.insert("manifest_sha256".into(), batch.manifest_sha256.clone().into());
        obj.insert("events".into(), (batch.events.len() as u64).into());
    }
    details
}

/// Replays an import batch's events on what was imported before (`stored` looks a job up).
/// Returns the jobs it changed.
pub(crate) fn replay_import(
    batch: &ImportBatch,
    mut stored: impl FnMut(JobId) -> Result<Option<Job>, StoreError>,
) -> Result<Vec<Job>, StoreError> {
    let base: HashMap<JobId, &Job> = batch.base.iter().map(|j| (j.id, j)).collect();
    let mut jobs: HashMap<JobId, Option<Job>> = HashMap::new();
    for (ev, _) in &batch.events {
        let Some(id) = ev.job_id else { continue };
        let prev = match jobs.remove(&id) {
            Some(known) => known,
            None => match stored(id)? {
                Some(job) => Some(job),
                None => base.get(&id).map(|j| (*j).clone()),
            },
        };
        let next = apply(prev.as_ref(), ev).map_err(|e| {
            StoreError::Refused(format!("event {} of site {} does not replay: {e}", ev.seq, batch.site_id))
        })?;
        jobs.insert(id, next);
    }
    let mut out: Vec<Job> = jobs.into_values().flatten().collect();
    out.sort_by_key(|j| j.id);
    Ok(out)
}
