//! The orch ledger store: the [`Store`] trait, whose domain verbs are everything the daemon,
//! the exporter and the importer may do to a ledger, and its two backends: SQLite
//! ([`SqliteStore`], one file, one daemon) and PostgreSQL ([`PgStore`], one database that
//! several daemons share). The ledger's rules are written once (module `ledger`); a backend
//! supplies rows.
//!
//! Every state change goes through [`orch_core::apply`] and is written together with its
//! hash-chained history event in one transaction: a job row is always what its events say.
//! Methods are synchronous; async callers run them on a blocking thread, or in place where
//! nothing can make them wait (see [`wait`]).
#![deny(missing_docs)]

mod copy;
mod error;
mod ledger;
mod location;
mod pg;
mod sqlite;
mod types;
pub mod wait;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use copy::{copy_ledger, CopyReport};
pub use error::StoreError;
pub use location::Location;
pub use pg::{PgStore, PG_SCHEMA_VERSION};
pub use sqlite::{SqliteStore, Synchronous, SCHEMA_VERSION};
pub use types::*;

use orch_core::{Event, Job, JobId, Timestamp};

/// A ledger backend. All reads and writes are confined to the caller's [`Scope`]: a job of
/// another tenant is [`StoreError::NotFound`], exactly like a job that does not exist.
pub trait Store: Send + Sync + 'static {
    /// Creates jobs, or returns the existing job for an idempotency key already used in the
    /// tenant. All or nothing: one invalid job fails the batch.
    fn enqueue(&self, actor: &str, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, StoreError>;

    /// Leases up to `req.limit` ready jobs of the given queues, highest priority first, then
    /// earliest `run_after`, then lowest id. A job is ready when its `run_after` has come and
    /// every job it depends on succeeded.
    fn claim(&self, req: &ClaimRequest) -> Result<Vec<Allocation>, StoreError> {
        self.claim_gated(req, &mut OpenGate)
    }

    /// [`Store::claim`], leasing only the jobs `gate` admits (in the same transaction, with
    /// the gate's throttle records).
    fn claim_gated(&self, req: &ClaimRequest, gate: &mut dyn ClaimGate) -> Result<Vec<Allocation>, StoreError>;

    /// Extends a lease, optionally recording progress.
    fn heartbeat(&self, scope: &Scope, job: JobId, hb: Heartbeat) -> Result<Job, StoreError>;

    /// Completes a leased job with its artifacts.
    fn ack(&self, scope: &Scope, job: JobId, ack: Ack) -> Result<Job, StoreError>;

    /// Completes several leased jobs, each on its own: one refused (lease lost, not found,
    /// invalid) does not stop the others. The outer error is for a failure of the store
    /// itself, after which nothing was written. Backends commit them together where they can.
    fn ack_many(&self, scope: &Scope, acks: Vec<(JobId, Ack)>) -> Result<Vec<Result<Job, StoreError>>, StoreError> {
        Ok(acks.into_iter().map(|(id, ack)| self.ack(scope, id, ack)).collect())
    }

    /// Records a failed attempt: schedules a retry or dead-letters the job.
    fn fail(&self, scope: &Scope, job: JobId, failure: Failure) -> Result<Job, StoreError>;

    /// Cancels a job that has not finished.
    fn cancel(&self, scope: &Scope, job: JobId, actor: &str, reason: Option<String>) -> Result<Job, StoreError>;

    /// Puts a dead or cancelled job back in the queue with fresh attempts.
    fn retry(&self, scope: &Scope, job: JobId, actor: &str, reason: Option<String>) -> Result<Job, StoreError>;

    /// Takes back up to `limit` leases that lapsed, retrying or dead-lettering their jobs.
    /// Returns how many it took back.
    fn reap_expired_leases(&self, limit: usize) -> Result<usize, StoreError>;

    /// One job.
    fn job(&self, scope: &Scope, id: JobId) -> Result<Job, StoreError>;

    /// Jobs matching a filter, by ascending id.
    fn jobs(&self, scope: &Scope, filter: &JobFilter, page: PageRequest) -> Result<Page<Job>, StoreError>;

    /// History events matching a filter, by ascending sequence.
    fn history(&self, scope: &Scope, filter: &HistoryFilter, page: PageRequest) -> Result<Page<Event>, StoreError>;

    /// An artifact's metadata and content.
    fn artifact(&self, scope: &Scope, job: JobId, name: &str) -> Result<(orch_core::Artifact, Vec<u8>), StoreError>;

    /// Runs `f` against one consistent read snapshot of the ledger (safe while writers run).
    fn snapshot(&self, f: &mut dyn FnMut(&dyn SnapshotReader) -> Result<(), StoreError>) -> Result<(), StoreError>;

    /// Counts of jobs by state in a scope.
    fn stats(&self, scope: &Scope) -> Result<Stats, StoreError>;

    /// Job counts by tenant, type and state in a scope.
    fn depth(&self, scope: &Scope) -> Result<Vec<Depth>, StoreError>;

    /// Failed attempts and lapsed leases at or after `since`, newest last, at most `limit`
    /// (the newest ones).
    fn failures(&self, scope: &Scope, since: Timestamp, limit: usize) -> Result<Vec<FailureRecord>, StoreError>;

    /// Starts a run: records it, files a `<kind>.started` audit event (with reason and ticket)
    /// and enqueues its jobs, all in one transaction. Jobs whose idempotency key was already used
    /// are returned as they are, not enqueued again.
    fn start_run(&self, actor: &str, run: NewRun, jobs: Vec<NewJob>) -> Result<(Run, Vec<Enqueued>), StoreError>;

    /// One run with its job counts.
    fn run(&self, scope: &Scope, id: i64) -> Result<Run, StoreError>;

    /// Runs, by ascending id.
    fn runs(&self, scope: &Scope, page: PageRequest) -> Result<Page<Run>, StoreError>;

    /// Creates or replaces a tenant setting and files a `<kind>.put` audit event with the actor,
    /// reason and ticket, in one transaction. Returns the audit event.
    fn put_setting(&self, actor: &str, change: SettingChange) -> Result<Event, StoreError>;

    /// Removes a tenant setting (`change.doc` is ignored) and files a `<kind>.delete` audit
    /// event. A setting that does not exist is [`StoreError::Missing`].
    fn delete_setting(&self, actor: &str, change: SettingChange) -> Result<Event, StoreError>;

    /// The settings of one kind in a scope, by tenant and id.
    fn settings(&self, scope: &Scope, kind: SettingKind) -> Result<Vec<Setting>, StoreError>;

    /// Appends throttle records (rate-limit decisions, bucket and breaker changes); their
    /// `seq` is assigned by the store.
    fn record_throttles(&self, records: Vec<orch_core::throttle::ThrottleRecord>) -> Result<(), StoreError>;

    /// Throttle records in a scope, oldest first, after `page.after`.
    fn throttles(
        &self,
        scope: &Scope,
        page: PageRequest,
    ) -> Result<Page<orch_core::throttle::ThrottleRecord>, StoreError>;

    /// The job a tenant enqueued with an idempotency key, if any.
    fn job_by_key(&self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError>;

    /// How many jobs of a tenant (and queue) are queued, counting at most to `cap`.
    fn queued(&self, tenant: &str, queue: Option<&str>, cap: u64) -> Result<u64, StoreError>;

    /// Puts up to `limit` dead-lettered jobs back in the queue (those of `queue`, or all),
    /// in one transaction, each with its own `job.retried` event. Returns them.
    fn retry_dead(
        &self,
        scope: &Scope,
        queue: Option<&str>,
        actor: &str,
        reason: Option<String>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError>;

    /// When a schedule last fired, and the job that firing made.
    fn schedule_fired(&self, tenant: &str, id: &str) -> Result<Option<(Timestamp, Option<JobId>)>, StoreError>;

    /// Records that a schedule fired at `at`, making (or keeping) `job`.
    fn set_schedule_fired(&self, tenant: &str, id: &str, at: Timestamp, job: Option<JobId>) -> Result<(), StoreError>;

    /// Brings the incidents of `kinds` in line with the conditions that hold now, in one
    /// transaction: a condition with no open incident opens one, an open incident whose
    /// condition is gone closes. Each opening and closing files an `incident.opened` /
    /// `incident.closed` audit event in the tenant's history.
    fn sync_incidents(&self, kinds: &[&str], now: Vec<IncidentSpec>) -> Result<IncidentChanges, StoreError>;

    /// Incidents in a scope, newest first (`open`: only open or only closed ones).
    fn incidents(&self, scope: &Scope, open: Option<bool>, page: PageRequest) -> Result<Page<Incident>, StoreError>;

    /// Unfinished jobs that look stuck: running without a heartbeat since `quiet_since`, or
    /// whose lease lapsed on each of their last `lease_losses` or more attempts. At most `limit`.
    fn stuck_jobs(&self, quiet_since: Timestamp, lease_losses: u32, limit: usize) -> Result<Vec<Job>, StoreError>;

    /// Stores a new API token.
    fn put_token(&self, token: NewToken) -> Result<TokenRecord, StoreError>;

    /// The token whose secret hashes to `hash`, revoked or expired ones included.
    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// A stamp for remembering tokens: it moves whenever a token may have changed since it was
    /// last taken, whoever changed it (this process or another one on the same ledger), so a
    /// token read under one stamp is current while the stamp stays the same. `None` when the
    /// store cannot tell at once; the caller then reads the token. Never blocks, so it may be
    /// called on an async thread. By default, `None`.
    fn token_stamp(&self) -> Option<u64> {
        None
    }

    /// Revokes a token by id (revoking twice keeps the first instant).
    fn revoke_token(&self, id: &str) -> Result<TokenRecord, StoreError>;

    /// All tokens, by id.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Reserves an idempotency key for a request with the given fingerprint, or reports what
    /// an earlier request with the key left.
    fn idempotency_begin(&self, tenant: &str, key: &str, fingerprint: &str) -> Result<IdempotencyBegin, StoreError>;

    /// Records the response to a request that reserved a key.
    fn idempotency_finish(&self, tenant: &str, key: &str, status: u16, body: &[u8]) -> Result<(), StoreError>;

    /// Frees a reserved key whose request did not complete (so a retry can run it again).
    fn idempotency_release(&self, tenant: &str, key: &str) -> Result<(), StoreError>;

    /// Forgets idempotency records made before `before`; returns how many.
    fn purge_idempotency(&self, before: orch_core::Timestamp) -> Result<usize, StoreError>;

    /// How far imports from an origin site (and scope) got.
    fn import_state(&self, site_id: &str, scope: &str) -> Result<Option<ImportState>, StoreError>;

    /// Whether the bundle with this manifest digest was imported already.
    fn bundle_imported(&self, manifest_sha256: &str) -> Result<bool, StoreError>;

    /// Appends a planned bundle to the imported history, replays its jobs, moves the import
    /// state forward and files an `import.applied` audit event, all in one transaction.
    fn apply_import(&self, actor: &str, batch: ImportBatch) -> Result<ImportOutcome, StoreError>;

    /// Imported events of an origin site with `from <= seq <= to`, as canonical lines, in order.
    fn imported_history(&self, site_id: &str, from: u64, to: u64) -> Result<Vec<String>, StoreError>;

    /// The jobs of an origin site as replaying its imported history gives them, by id.
    fn imported_jobs(&self, site_id: &str) -> Result<Vec<Job>, StoreError>;

    /// Subscribes a URL to a tenant's events from the current head on.
    fn create_webhook(
        &self,
        tenant: &str,
        url: &str,
        secret: &str,
        filter: serde_json::Value,
    ) -> Result<Webhook, StoreError>;

    /// Webhooks in a scope, by id.
    fn webhooks(&self, scope: &Scope) -> Result<Vec<Webhook>, StoreError>;

    /// Removes a webhook and its delivery log.
    fn delete_webhook(&self, scope: &Scope, id: i64) -> Result<(), StoreError>;

    /// Records an attempt to deliver event `seq` and returns its log row; a delivered or dead
    /// event moves the cursor to it (never backwards).
    fn record_delivery(&self, webhook: i64, seq: u64, outcome: DeliveryOutcome) -> Result<Delivery, StoreError>;

    /// Moves a webhook's cursor past events it does not want (never backwards).
    fn skip_to(&self, webhook: i64, seq: u64) -> Result<(), StoreError>;

    /// A webhook's delivery log, newest first.
    fn deliveries(&self, scope: &Scope, webhook: i64, limit: usize) -> Result<Vec<Delivery>, StoreError>;

    /// A publisher's cursor into the history (0 if it never published).
    fn publisher_cursor(&self, name: &str) -> Result<u64, StoreError>;

    /// Moves a publisher's cursor forward.
    fn set_publisher_cursor(&self, name: &str, seq: u64) -> Result<(), StoreError>;

    /// Whether this process should run the ledger's once-per-site services now (lease reaper,
    /// scheduler, incident checks, webhook and NATS delivery). A backend that several daemons
    /// share elects one of them; a backend only one daemon can open always leads.
    fn leads(&self) -> Result<bool, StoreError> {
        Ok(true)
    }
}

/// A consistent view of a ledger for export and checking.
pub trait SnapshotReader {
    /// The site's id (chosen at random when the ledger was created).
    fn site_id(&self) -> Result<String, StoreError>;
    /// The sequence number of the last event.
    fn head_seq(&self) -> Result<u64, StoreError>;
    /// Visits the lines (as in `history.jsonl`) of events with `from <= seq <= to` in the scope,
    /// by ascending sequence.
    fn for_each_event_line(
        &self,
        scope: &Scope,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// [`for_each_event_line`](Self::for_each_event_line), each line decoded.
    fn for_each_event(
        &self,
        scope: &Scope,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(Event) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.for_each_event_line(scope, from, to, &mut |line| f(ledger::decode_event(line)?))
    }
    /// Visits the stored jobs in the scope, by ascending id.
    fn for_each_job(&self, scope: &Scope, f: &mut dyn FnMut(Job) -> Result<(), StoreError>) -> Result<(), StoreError>;
    /// Visits throttle records (lines of `throttles.jsonl`) with `from <= seq <= to` in the scope.
    fn for_each_throttle(
        &self,
        scope: &Scope,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(serde_json::Value) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// The same view of the history imported from another site (in the same snapshot), so that
    /// it can be exported again exactly as that site exported it.
    fn imported(&self, site_id: &str) -> Result<Box<dyn SnapshotReader + '_>, StoreError>;
    /// The sites history was imported from, by id.
    fn imported_sites(&self) -> Result<Vec<String>, StoreError>;
}

/// Checks a whole ledger: every event's hash, each tenant's chain, and that replaying the history
/// reproduces the stored jobs exactly; then the same for the history imported from each other
/// site.
pub fn check_ledger(store: &dyn Store) -> Result<LedgerReport, StoreError> {
    let mut report = LedgerReport::default();
    store.snapshot(&mut |snap| {
        let (events, tenants, jobs) = check_snapshot(snap, "", &mut report.problems)?;
        (report.events, report.tenants, report.jobs) = (events, tenants, jobs);
        for site in snap.imported_sites()? {
            let imported = snap.imported(&site)?;
            let (events, _, jobs) =
                check_snapshot(&*imported, &format!("imported from {site}: "), &mut report.problems)?;
            report.imported_events += events;
            report.imported_jobs += jobs;
        }
        Ok(())
    })?;
    Ok(report)
}

/// Checks history lines as a snapshot yields them: they are gathered in batches, each read on
/// all cores by [`orch_core::chain::read_events`] and checked in order by one verifier.
struct LineChecker {
    verifier: orch_core::chain::ChainVerifier,
    /// The first failed check: the rest of the lines are not looked at.
    problem: Option<String>,
    /// The batch's lines, one after the other (a line is not split at any byte of its own).
    batch: Vec<u8>,
    /// Where each line of the batch ends.
    ends: Vec<usize>,
    batch_lines: usize,
}

impl LineChecker {
    /// Lines read at a time: enough to keep the readers busy, a few MiB of text.
    const BATCH: usize = 1 << 13;

    fn new(batch_lines: usize) -> Self {
        let verifier = orch_core::chain::ChainVerifier::new();
        LineChecker { verifier, problem: None, batch: Vec::new(), ends: Vec::new(), batch_lines }
    }

    fn push(&mut self, line: &str) -> Result<(), StoreError> {
        if self.problem.is_some() {
            return Ok(());
        }
        self.batch.extend_from_slice(line.as_bytes());
        self.ends.push(self.batch.len());
        if self.ends.len() == self.batch_lines {
            self.check_batch()?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Self, StoreError> {
        self.check_batch()?;
        Ok(self)
    }

    fn check_batch(&mut self) -> Result<(), StoreError> {
        let (batch, ends) = (std::mem::take(&mut self.batch), std::mem::take(&mut self.ends));
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let lines = starts.zip(&ends).map(|(start, &end)| &batch[start..end]);
        let mut undecodable = None;
        orch_core::chain::read_events(lines, orch_core::chain::readers(), |read| {
            let outcome = match read {
                // As `for_each_event` would have said: a stored line that does not decode is a
                // corrupt store, not a failed check.
                Err(e) => Err(undecodable.insert(ledger::decode_error(e)).to_string()),
                Ok(read) => self.verifier.push_read(read).map_err(|e| e.to_string()),
            };
            match outcome {
                Ok(()) => std::ops::ControlFlow::Continue(()),
                Err(problem) => {
                    self.problem = Some(problem);
                    std::ops::ControlFlow::Break(())
                }
            }
        });
        if let Some(e) = undecodable {
            return Err(e);
        }
        (self.batch, self.ends) = (batch, ends);
        self.batch.clear();
        self.ends.clear();
        Ok(())
    }
}

/// Checks one view; returns (events, chains, jobs) and records problems with `prefix`.
fn check_snapshot(
    snap: &dyn SnapshotReader,
    prefix: &str,
    problems: &mut Vec<String>,
) -> Result<(u64, usize, u64), StoreError> {
    let head = snap.head_seq()?;
    let mut lines = LineChecker::new(LineChecker::BATCH);
    snap.for_each_event_line(&Scope::All, 1, head, &mut |line| lines.push(line))?;
    let LineChecker { verifier, problem, .. } = lines.finish()?;
    let counts = (verifier.events(), verifier.heads().len());
    if let Some(p) = problem {
        problems.push(format!("{prefix}{p}"));
        return Ok((counts.0, counts.1, 0));
    }
    let mut stored = Vec::new();
    snap.for_each_job(&Scope::All, &mut |job| {
        stored.push(job);
        Ok(())
    })?;
    if let Some(d) = orch_core::chain::first_job_difference(verifier.jobs(), &stored) {
        problems.push(format!(
            "{prefix}job {}: replayed history gives {} but the jobs table holds {}",
            d.id,
            d.replayed.map_or("nothing".into(), |j| serde_json::to_string(&j).unwrap_or_default()),
            d.stored.map_or("nothing".into(), |j| serde_json::to_string(&j).unwrap_or_default()),
        ));
    }
    Ok((counts.0, counts.1, stored.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::hash::GENESIS_HASH;
    use orch_core::{EventDraft, EventKind, Timestamp};

    /// `n` chained audit events of one tenant, as lines.
    fn lines(n: u64) -> Vec<String> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let draft = EventDraft {
                    at: Timestamp::from_millis(seq as i64),
                    tenant: "acme".into(),
                    project: "p".into(),
                    job_id: None,
                    actor: "orchd".into(),
                    correlation_id: format!("c-{seq}"),
                    kind: EventKind::Audit { action: "test".into(), details: serde_json::json!(seq) },
                };
                let (ev, line) = draft.seal_with_line(seq, &prev);
                prev = ev.hash;
                line
            })
            .collect()
    }

    fn check(lines: &[String], batch: usize) -> Result<(u64, Option<String>), String> {
        let mut checker = LineChecker::new(batch);
        for l in lines {
            checker.push(l).map_err(|e| e.to_string())?;
        }
        let checker = checker.finish().map_err(|e| e.to_string())?;
        Ok((checker.verifier.events(), checker.problem))
    }

    /// Whatever the batch size, and wherever a bad line falls in a batch, the checker finds
    /// what checking event by event finds: the first problem, or a corrupt store for a line
    /// that does not decode.
    #[test]
    fn lines_checked_in_batches_give_the_verdict_of_one_by_one() {
        let good = lines(20);
        for batch in [1, 3, 7, 20, 64] {
            assert_eq!(check(&good, batch), Ok((20, None)), "batch {batch}");
            for bad in [0, 2, 3, 6, 13, 19] {
                let mut spoilt = good.clone();
                spoilt[bad] = spoilt[bad].replace("orchd", "other");
                let want = format!("event {}: hash does not match content", bad + 1);
                assert_eq!(check(&spoilt, batch), Ok((bad as u64, Some(want))), "batch {batch}, bad {bad}");
                spoilt[bad].truncate(10);
                let err = check(&spoilt, batch).unwrap_err();
                assert!(err.contains("stored event does not decode"), "batch {batch}, bad {bad}: {err}");
            }
        }
        assert_eq!(check(&[], 3), Ok((0, None)));
        // A stored line is one line whatever bytes it holds: a newline between its members is
        // JSON whitespace, as it was when lines were decoded one by one.
        let mut spaced = good.clone();
        spaced[4] = spaced[4].replacen(",", ",\n", 1);
        assert_eq!(check(&spaced, 3), Ok((20, None)));
    }
}
