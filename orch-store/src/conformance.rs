//! The store test suite every backend must pass, written once against the [`Store`] trait.
//!
//! A backend's tests call [`store_conformance!`](crate::store_conformance) with a function that
//! opens a fresh, empty store on a given clock; the macro expands to one `#[test]` per case.

use std::sync::Arc;
use std::time::Duration;

use orch_core::{Clock, JobId, JobState, ManualClock, Timestamp};
use serde_json::json;

use crate::*;

/// A fresh store and the clock it runs on.
pub struct Harness {
    /// The store under test.
    pub store: Arc<dyn Store>,
    /// Its clock.
    pub clock: Arc<ManualClock>,
    /// Keeps whatever backs the store (a temporary directory, a database) alive.
    pub guard: Box<dyn std::any::Any>,
}

/// Opens a fresh store on a clock with the given options.
pub type Opener = fn(Arc<ManualClock>, StoreOptions) -> (Arc<dyn Store>, Box<dyn std::any::Any>);

/// The start of test time.
pub const T0: Timestamp = Timestamp::from_millis(1_790_000_000_000);

/// A harness with default options except a 1 s base backoff and a 10 s lease.
pub fn harness(open: Opener) -> Harness {
    let opts = StoreOptions {
        default_lease_ms: 10_000,
        retry: orch_core::retry::RetryPolicy { base_ms: 1_000, max_ms: 60_000, max_hint_ms: 3_600_000 },
        ..StoreOptions::default()
    };
    let clock = Arc::new(ManualClock::new(T0));
    let (store, guard) = open(clock.clone(), opts);
    Harness { store, clock, guard }
}

fn t(tenant: &str) -> Scope {
    Scope::Tenant(tenant.into())
}

fn claim(h: &Harness, tenant: &str, queue: &str, n: usize) -> Vec<Allocation> {
    h.store
        .claim(&ClaimRequest {
            scope: t(tenant),
            queues: vec![queue.into()],
            worker: "w1".into(),
            limit: n,
            lease_ms: None,
        })
        .unwrap()
}

fn enqueue_one(h: &Harness, tenant: &str, queue: &str) -> orch_core::Job {
    let mut out = h.store.enqueue("test", vec![NewJob::new(tenant, "p", queue, json!({"n": 1}))]).unwrap();
    out.remove(0).job
}

fn assert_ledger_ok(h: &Harness) {
    let report = check_ledger(&*h.store).unwrap();
    assert!(report.ok(), "ledger check failed: {:?}", report.problems);
}

/// enqueue → claim → heartbeat → ack, with artifacts hashed from their content.
pub fn enqueue_claim_heartbeat_ack(h: Harness) {
    let job = enqueue_one(&h, "acme", "ingest");
    assert_eq!(job.state, JobState::Queued);
    let alloc = claim(&h, "acme", "ingest", 10);
    assert_eq!(alloc.len(), 1);
    let a = &alloc[0];
    let lease = a.job.lease.clone().expect("allocation carries its lease");
    assert_eq!(a.job.id, job.id);
    assert_eq!(a.job.attempt, 1);
    assert_eq!(lease.expires_at, T0.plus_millis(10_000));
    assert_eq!(a.retry.attempts_left, 4);
    assert!(claim(&h, "acme", "ingest", 10).is_empty(), "a leased job is not claimed twice");

    h.clock.advance(Duration::from_secs(8));
    let hb = Heartbeat { lease_id: lease.id.clone(), progress: Some(json!({"pct": 50})), extend_ms: None };
    let after = h.store.heartbeat(&t("acme"), job.id, hb).unwrap();
    assert_eq!(after.lease.as_ref().unwrap().expires_at, T0.plus_millis(18_000));
    assert_eq!(after.progress, Some(json!({"pct": 50})));

    h.clock.advance(Duration::from_secs(8)); // past the original expiry, within the extended one
    let ack = Ack {
        lease_id: lease.id,
        artifacts: vec![ArtifactInput {
            name: "out.json".into(),
            media_type: "application/json".into(),
            content: b"{}".to_vec(),
        }],
    };
    let done = h.store.ack(&t("acme"), job.id, ack).unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    assert!(done.lease.is_none());
    assert_eq!(done.artifacts[0].sha256, "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
    assert_eq!(done.artifacts[0].size, 2);
    let (meta, content) = h.store.artifact(&t("acme"), job.id, "out.json").unwrap();
    assert_eq!((meta, content), (done.artifacts[0].clone(), b"{}".to_vec()));

    let types: Vec<String> = h
        .store
        .history(&t("acme"), &HistoryFilter { job_id: Some(job.id), ..Default::default() }, PageRequest::default())
        .unwrap()
        .items
        .iter()
        .map(|e| e.event.type_name().to_string())
        .collect();
    assert_eq!(types, ["job.enqueued", "job.claimed", "job.heartbeat", "job.succeeded"]);
    assert_ledger_ok(&h);
}

/// fail → retry with backoff → … → dead-letter after the last attempt.
pub fn fail_retry_dead_letter(h: Harness) {
    let mut nj = NewJob::new("acme", "p", "ingest", json!({}));
    nj.max_attempts = Some(3);
    let job = h.store.enqueue("test", vec![nj]).unwrap().remove(0).job;
    for attempt in 1..=3u32 {
        let a = claim(&h, "acme", "ingest", 1);
        assert_eq!(a.len(), 1, "attempt {attempt} is claimable");
        assert_eq!(a[0].job.attempt, attempt);
        let failure = Failure {
            lease_id: a[0].job.lease.clone().unwrap().id,
            class: "http_5xx".into(),
            message: "upstream said 503".into(),
            retryable: true,
            retry_after_ms: None,
        };
        let after = h.store.fail(&t("acme"), job.id, failure).unwrap();
        assert_eq!(after.last_error.as_ref().unwrap().class, "http_5xx");
        if attempt < 3 {
            assert_eq!(after.state, JobState::Queued);
            // Equal jitter: between half and all of base·2^(attempt-1).
            let full = 1_000i64 << (attempt - 1);
            let delay = after.spec.run_after - h.clock.now();
            assert!((full / 2..=full).contains(&delay), "attempt {attempt}: delay {delay} ms");
            assert!(claim(&h, "acme", "ingest", 1).is_empty(), "not claimable during backoff");
            h.clock.advance(Duration::from_millis(full as u64));
        } else {
            assert_eq!(after.state, JobState::Dead);
            assert!(after.finished_at.is_some());
        }
    }
    assert!(claim(&h, "acme", "ingest", 1).is_empty(), "a dead job is not claimed");

    // A retry hint (upstream Retry-After) sets the delay; a non-retryable failure dead-letters at once.
    let job2 = enqueue_one(&h, "acme", "ingest");
    let a = claim(&h, "acme", "ingest", 1);
    let lease = a[0].job.lease.clone().unwrap().id;
    let f = Failure {
        lease_id: lease,
        class: "http_429".into(),
        message: "slow down".into(),
        retryable: true,
        retry_after_ms: Some(30_000),
    };
    let after = h.store.fail(&t("acme"), job2.id, f).unwrap();
    let delay = after.spec.run_after - h.clock.now();
    assert!((30_000..=33_000).contains(&delay), "hinted delay {delay}");
    h.clock.advance(Duration::from_secs(40));
    let a = claim(&h, "acme", "ingest", 1);
    let lease = a[0].job.lease.clone().unwrap().id;
    let f = Failure {
        lease_id: lease,
        class: "schema_mismatch".into(),
        message: "bad".into(),
        retryable: false,
        retry_after_ms: None,
    };
    assert_eq!(h.store.fail(&t("acme"), job2.id, f).unwrap().state, JobState::Dead);

    // An operator retry puts it back with fresh attempts.
    let back = h.store.retry(&t("acme"), job2.id, "operator", Some("fixed upstream".into())).unwrap();
    assert_eq!((back.state, back.attempt), (JobState::Queued, 0));
    assert_eq!(claim(&h, "acme", "ingest", 1)[0].job.attempt, 1);
    assert_ledger_ok(&h);
}

/// A lease that lapses is taken back by the reaper and the job is claimed again.
pub fn lease_expiry_reclaim(h: Harness) {
    let mut nj = NewJob::new("acme", "p", "ingest", json!({}));
    nj.max_attempts = Some(2);
    let job = h.store.enqueue("test", vec![nj]).unwrap().remove(0).job;
    let first = claim(&h, "acme", "ingest", 1).remove(0);
    let old_lease = first.job.lease.clone().unwrap().id;

    h.clock.advance(Duration::from_millis(9_999));
    assert_eq!(h.store.reap_expired_leases(100).unwrap(), 0, "not yet expired");
    h.clock.advance(Duration::from_millis(1));
    assert_eq!(h.store.reap_expired_leases(100).unwrap(), 1);
    let j = h.store.job(&t("acme"), job.id).unwrap();
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.last_error.as_ref().unwrap().class, "lease_expired");

    h.clock.advance(Duration::from_secs(5));
    let second = claim(&h, "acme", "ingest", 1).remove(0);
    assert_eq!(second.job.attempt, 2);
    assert_ne!(second.job.lease.as_ref().unwrap().id, old_lease);

    // The first worker comes back: its lease is gone.
    let late = h.store.ack(&t("acme"), job.id, Ack { lease_id: old_lease, artifacts: vec![] });
    assert!(matches!(late, Err(StoreError::LeaseLost { .. })), "{late:?}");

    // The second lease lapses too: out of attempts, dead-lettered.
    h.clock.advance(Duration::from_secs(11));
    assert_eq!(h.store.reap_expired_leases(100).unwrap(), 1);
    assert_eq!(h.store.job(&t("acme"), job.id).unwrap().state, JobState::Dead);
    assert_ledger_ok(&h);
}

/// Stuck jobs: unfinished jobs whose lease lapsed on each of their last `lease_losses` or more
/// attempts, and jobs running without a heartbeat since a given instant.
pub fn stuck_jobs(h: Harness) {
    let mut lapsing = NewJob::new("acme", "p", "ingest", json!({"n": 1}));
    lapsing.max_attempts = Some(5);
    let lapsing = h.store.enqueue("test", vec![lapsing]).unwrap().remove(0).job;
    for _ in 0..2 {
        claim(&h, "acme", "ingest", 1);
        h.clock.advance(Duration::from_secs(11));
        assert_eq!(h.store.reap_expired_leases(100).unwrap(), 1);
        h.clock.advance(Duration::from_secs(60));
    }
    // Another job fails for another reason: not stuck.
    let failing = enqueue_one(&h, "globex", "ingest");
    let a = claim(&h, "globex", "ingest", 1).remove(0);
    let f = Failure {
        lease_id: a.job.lease.unwrap().id,
        class: "upstream".into(),
        message: "503".into(),
        retryable: true,
        retry_after_ms: None,
    };
    assert_eq!(h.store.fail(&t("globex"), failing.id, f).unwrap().last_error.unwrap().class, "upstream");

    let ids = |losses: u32, since: Timestamp| -> Vec<JobId> {
        h.store.stuck_jobs(since, losses, 10).unwrap().iter().map(|j| j.id).collect()
    };
    let long_ago = T0;
    assert_eq!(ids(2, long_ago), vec![lapsing.id], "two lapsed leases in a row");
    assert_eq!(ids(3, long_ago), Vec::<JobId>::new(), "not three");
    // Claimed again and heartbeating: still counted by its lapsed leases, and by its silence once
    // the instant given is after its last change.
    let running = claim(&h, "acme", "ingest", 1).remove(0).job;
    assert_eq!(ids(2, long_ago), vec![lapsing.id]);
    assert_eq!(ids(9, h.clock.now().plus_millis(1)), vec![running.id], "running, quiet since then");
    // Succeeded: no longer stuck.
    h.store.ack(&t("acme"), running.id, Ack { lease_id: running.lease.unwrap().id, artifacts: vec![] }).unwrap();
    assert_eq!(ids(2, long_ago), Vec::<JobId>::new());
    assert_ledger_ok(&h);
}

/// The same idempotency key in one tenant returns the first job; another tenant gets its own.
pub fn idempotent_enqueue(h: Harness) {
    let mut nj = NewJob::new("acme", "p", "ingest", json!({"v": 1}));
    nj.idempotency_key = Some("feed-2026-11-24".into());
    let first = h.store.enqueue("test", vec![nj.clone()]).unwrap().remove(0);
    assert!(first.created);
    let mut again = nj.clone();
    again.payload = json!({"v": 2});
    let second = h.store.enqueue("test", vec![again.clone(), again]).unwrap();
    assert!(second.iter().all(|e| !e.created && e.job == first.job));
    let mut other = nj;
    other.tenant = "globex".into();
    let third = h.store.enqueue("test", vec![other]).unwrap().remove(0);
    assert!(third.created);
    assert_ne!(third.job.id, first.job.id);
    let stats = h.store.stats(&Scope::All).unwrap();
    assert_eq!(stats.by_state.get("queued"), Some(&2));
    assert_eq!(stats.events, 2);
}

/// Wrong, expired and re-issued leases change nothing.
pub fn stale_lease_rejected(h: Harness) {
    let job = enqueue_one(&h, "acme", "ingest");
    let a = claim(&h, "acme", "ingest", 1).remove(0);
    let lease = a.job.lease.clone().unwrap().id;
    let before = h.store.stats(&Scope::All).unwrap();

    let wrong = Heartbeat { lease_id: "not-the-lease".into(), ..Default::default() };
    assert!(matches!(h.store.heartbeat(&t("acme"), job.id, wrong), Err(StoreError::LeaseLost { .. })));
    h.clock.advance(Duration::from_secs(10));
    let expired = Ack { lease_id: lease.clone(), artifacts: vec![] };
    assert!(matches!(h.store.ack(&t("acme"), job.id, expired), Err(StoreError::LeaseLost { .. })));
    let f = Failure { lease_id: lease, class: "x".into(), message: "m".into(), retryable: true, retry_after_ms: None };
    assert!(matches!(h.store.fail(&t("acme"), job.id, f), Err(StoreError::LeaseLost { .. })));

    assert_eq!(h.store.stats(&Scope::All).unwrap(), before, "rejected calls wrote nothing");
    assert_eq!(h.store.job(&t("acme"), job.id).unwrap(), a.job);
    assert_ledger_ok(&h);
}

/// Claims follow priority, then run_after, then id, and skip jobs not yet due.
pub fn claim_order_and_run_after(h: Harness) {
    let mk = |prio: i32, delay_ms: i64| {
        let mut nj = NewJob::new("acme", "p", "q", json!({}));
        nj.priority = prio;
        nj.run_after = Some(T0.plus_millis(delay_ms));
        nj
    };
    let jobs = h.store.enqueue("test", vec![mk(0, 0), mk(5, 0), mk(0, -1_000), mk(9, 60_000), mk(5, 0)]).unwrap();
    let ids: Vec<_> = jobs.iter().map(|e| e.job.id).collect();
    let got: Vec<_> = claim(&h, "acme", "q", 10).iter().map(|a| a.job.id).collect();
    assert_eq!(got, vec![ids[1], ids[4], ids[2], ids[0]], "priority desc, run_after, id; future job skipped");
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(claim(&h, "acme", "q", 10)[0].job.id, ids[3]);

    // Several queues merge into one order.
    let mut a = NewJob::new("acme", "p", "a", json!({}));
    a.priority = 1;
    let mut b = NewJob::new("acme", "p", "b", json!({}));
    b.priority = 2;
    let e = h.store.enqueue("test", vec![a, b]).unwrap();
    let got: Vec<_> = h
        .store
        .claim(&ClaimRequest {
            scope: t("acme"),
            queues: vec!["a".into(), "b".into()],
            worker: "w".into(),
            limit: 1,
            lease_ms: Some(1_000),
        })
        .unwrap()
        .iter()
        .map(|a| a.job.id)
        .collect();
    assert_eq!(got, vec![e[1].job.id]);
}

/// One tenant never sees or touches another's jobs.
pub fn tenant_isolation(h: Harness) {
    let a = enqueue_one(&h, "acme", "ingest");
    let g = enqueue_one(&h, "globex", "ingest");
    assert!(matches!(h.store.job(&t("globex"), a.id), Err(StoreError::NotFound(id)) if id == a.id));
    assert!(matches!(h.store.cancel(&t("globex"), a.id, "op", None), Err(StoreError::NotFound(_))));
    let page = h.store.jobs(&t("globex"), &JobFilter::default(), PageRequest::default()).unwrap();
    assert_eq!(page.items.iter().map(|j| j.id).collect::<Vec<_>>(), vec![g.id]);
    let hist = h.store.history(&t("globex"), &HistoryFilter::default(), PageRequest::default()).unwrap();
    assert!(hist.items.iter().all(|e| e.tenant == "globex"));
    let claimed = claim(&h, "globex", "ingest", 10);
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].job.tenant, "globex");
    let lease = claimed[0].job.lease.clone().unwrap().id;
    let hb = Heartbeat { lease_id: lease, ..Default::default() };
    assert!(matches!(h.store.heartbeat(&t("acme"), g.id, hb), Err(StoreError::NotFound(_))));
    assert_eq!(h.store.stats(&t("acme")).unwrap().events, 1);
}

/// Bad input gets a clear error and writes nothing.
pub fn bad_input_changes_nothing(h: Harness) {
    enqueue_one(&h, "acme", "ingest");
    let before = h.store.stats(&Scope::All).unwrap();
    assert!(matches!(h.store.job(&Scope::All, 999), Err(StoreError::NotFound(999))));
    let hb = Heartbeat { lease_id: "x".into(), ..Default::default() };
    assert!(matches!(h.store.heartbeat(&Scope::All, 999, hb), Err(StoreError::NotFound(999))));
    let bad_tenant = NewJob::new("bad tenant!", "p", "q", json!({}));
    let good = NewJob::new("acme", "p", "q", json!({}));
    let res = h.store.enqueue("test", vec![good.clone(), bad_tenant]);
    assert!(matches!(res, Err(StoreError::Invalid(_))), "{res:?}");
    let mut zero = good.clone();
    zero.max_attempts = Some(0);
    assert!(matches!(h.store.enqueue("test", vec![good.clone(), zero]), Err(StoreError::Invalid(_))));
    let mut big = good;
    big.payload = json!("x".repeat(2 << 20));
    assert!(matches!(h.store.enqueue("test", vec![big]), Err(StoreError::Invalid(_))));
    let silly_lease = ClaimRequest {
        scope: Scope::All,
        queues: vec!["ingest".into()],
        worker: "w".into(),
        limit: 1,
        lease_ms: Some(0),
    };
    assert!(matches!(h.store.claim(&silly_lease), Err(StoreError::Invalid(_))));
    assert_eq!(h.store.stats(&Scope::All).unwrap(), before, "nothing written");
    assert_ledger_ok(&h);
}

/// Cancel stops a queued or running job; finished jobs cannot be cancelled.
pub fn cancel_and_conflicts(h: Harness) {
    let queued = enqueue_one(&h, "acme", "q");
    let c = h.store.cancel(&t("acme"), queued.id, "operator", Some("not needed".into())).unwrap();
    assert_eq!(c.state, JobState::Cancelled);
    assert!(matches!(h.store.cancel(&t("acme"), queued.id, "operator", None), Err(StoreError::Conflict { .. })));
    let running = enqueue_one(&h, "acme", "q");
    let a = claim(&h, "acme", "q", 1).remove(0);
    h.store.cancel(&t("acme"), running.id, "operator", None).unwrap();
    let ack = Ack { lease_id: a.job.lease.unwrap().id, artifacts: vec![] };
    assert!(matches!(h.store.ack(&t("acme"), running.id, ack), Err(StoreError::LeaseLost { .. })));
    assert!(matches!(h.store.retry(&t("acme"), running.id, "op", None), Ok(j) if j.state == JobState::Queued));
    let fresh = enqueue_one(&h, "acme", "other");
    assert!(matches!(h.store.retry(&t("acme"), fresh.id, "op", None), Err(StoreError::Conflict { .. })));
    assert_ledger_ok(&h);
}

/// Pages walk a list without repeats or gaps.
pub fn pagination(h: Harness) {
    let jobs: Vec<_> = (0..25).map(|i| NewJob::new("acme", "p", "q", json!({"i": i}))).collect();
    h.store.enqueue("test", jobs).unwrap();
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = h.store.jobs(&t("acme"), &JobFilter::default(), PageRequest { after, limit: 10 }).unwrap();
        seen.extend(page.items.iter().map(|j| j.id));
        match page.next_after {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    let filtered = h
        .store
        .jobs(&t("acme"), &JobFilter { state: Some(JobState::Running), ..Default::default() }, PageRequest::default())
        .unwrap();
    assert!(filtered.items.is_empty());
}

/// The operations the replay property draws from.
#[derive(Clone, Debug)]
pub enum Op {
    /// Enqueue a job for tenant index, with an optional idempotency key index.
    Enqueue(u8, Option<u8>),
    /// Claim up to n jobs for tenant index.
    Claim(u8, u8),
    /// Heartbeat the k-th running job.
    Heartbeat(u8),
    /// Ack the k-th running job.
    Ack(u8),
    /// Fail the k-th running job (retryable or not).
    Fail(u8, bool),
    /// Cancel the k-th job.
    Cancel(u8),
    /// Retry the k-th job.
    Retry(u8),
    /// Present a stale lease for the k-th job.
    StaleAck(u8),
    /// Move time forward (ms) and run the reaper.
    Advance(u16),
}

/// Strategy for random operation sequences.
pub fn ops() -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        4 => (0u8..3, proptest::option::of(0u8..4)).prop_map(|(t, k)| Op::Enqueue(t, k)),
        3 => (0u8..3, 1u8..4).prop_map(|(t, n)| Op::Claim(t, n)),
        1 => any::<u8>().prop_map(Op::Heartbeat),
        2 => any::<u8>().prop_map(Op::Ack),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(k, r)| Op::Fail(k, r)),
        1 => any::<u8>().prop_map(Op::Cancel),
        1 => any::<u8>().prop_map(Op::Retry),
        1 => any::<u8>().prop_map(Op::StaleAck),
        2 => (0u16..15_000).prop_map(Op::Advance),
    ];
    proptest::collection::vec(op, 1..60)
}

/// Runs a sequence of operations (errors are part of the game) and checks that replaying the
/// history reproduces the jobs exactly and every chain verifies.
pub fn replay_reproduces_jobs(h: Harness, ops: Vec<Op>) {
    const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
    let running = |h: &Harness| -> Vec<orch_core::Job> {
        h.store
            .jobs(
                &Scope::All,
                &JobFilter { state: Some(JobState::Running), ..Default::default() },
                PageRequest { after: 0, limit: 1000 },
            )
            .unwrap()
            .items
    };
    let all = |h: &Harness| {
        h.store.jobs(&Scope::All, &JobFilter::default(), PageRequest { after: 0, limit: 1000 }).unwrap().items
    };
    for op in ops {
        match op {
            Op::Enqueue(ti, key) => {
                let mut nj = NewJob::new(TENANTS[ti as usize], "p", "q", json!({"k": key}));
                nj.idempotency_key = key.map(|k| format!("key-{k}"));
                nj.max_attempts = Some(2);
                h.store.enqueue("test", vec![nj]).unwrap();
            }
            Op::Claim(ti, n) => {
                let req = ClaimRequest {
                    scope: t(TENANTS[ti as usize]),
                    queues: vec!["q".into()],
                    worker: format!("w{ti}"),
                    limit: n as usize,
                    lease_ms: None,
                };
                h.store.claim(&req).unwrap();
            }
            Op::Heartbeat(k) | Op::Ack(k) | Op::Fail(k, _) => {
                let r = running(&h);
                if r.is_empty() {
                    continue;
                }
                let job = &r[k as usize % r.len()];
                let lease_id = job.lease.clone().unwrap().id;
                let scope = t(&job.tenant);
                let res = match op {
                    Op::Heartbeat(_) => h.store.heartbeat(
                        &scope,
                        job.id,
                        Heartbeat { lease_id, progress: Some(json!(k)), extend_ms: None },
                    ),
                    Op::Ack(_) => h.store.ack(
                        &scope,
                        job.id,
                        Ack {
                            lease_id,
                            artifacts: vec![ArtifactInput {
                                name: "a".into(),
                                media_type: "text/plain".into(),
                                content: vec![k],
                            }],
                        },
                    ),
                    Op::Fail(_, retryable) => h.store.fail(
                        &scope,
                        job.id,
                        Failure {
                            lease_id,
                            class: "other".into(),
                            message: "m".into(),
                            retryable,
                            retry_after_ms: None,
                        },
                    ),
                    _ => unreachable!(),
                };
                // An expired-but-unreaped lease is refused: that is correct behaviour too.
                assert!(matches!(res, Ok(_) | Err(StoreError::LeaseLost { .. })), "{res:?}");
            }
            Op::Cancel(k) | Op::Retry(k) | Op::StaleAck(k) => {
                let js = all(&h);
                if js.is_empty() {
                    continue;
                }
                let job = &js[k as usize % js.len()];
                let scope = t(&job.tenant);
                let res = match op {
                    Op::Cancel(_) => h.store.cancel(&scope, job.id, "op", None),
                    Op::Retry(_) => h.store.retry(&scope, job.id, "op", None),
                    _ => {
                        let r = h.store.ack(&scope, job.id, Ack { lease_id: "stale".into(), artifacts: vec![] });
                        assert!(matches!(r, Err(StoreError::LeaseLost { .. })), "{r:?}");
                        r
                    }
                };
                assert!(
                    matches!(res, Ok(_) | Err(StoreError::Conflict { .. }) | Err(StoreError::LeaseLost { .. })),
                    "{res:?}"
                );
            }
            Op::Advance(ms) => {
                h.clock.advance(Duration::from_millis(ms as u64));
                h.store.reap_expired_leases(1000).unwrap();
            }
        }
    }
    assert_ledger_ok(&h);
}

fn fail_dead(h: &Harness, tenant: &str, a: &Allocation) -> orch_core::Job {
    let lease_id = a.job.lease.as_ref().unwrap().id.clone();
    let f = Failure {
        lease_id,
        class: "parse_error".into(),
        message: "bad".into(),
        retryable: false,
        retry_after_ms: None,
    };
    h.store.fail(&t(tenant), a.job.id, f).unwrap()
}

fn ack(h: &Harness, tenant: &str, a: &Allocation) {
    let lease_id = a.job.lease.as_ref().unwrap().id.clone();
    h.store.ack(&t(tenant), a.job.id, Ack { lease_id, artifacts: vec![] }).unwrap();
}

/// DAG dependencies: a job is claimable once all its parents succeeded; a dead parent
/// blocks its descendants or (by policy) cancels them, transitively, in the same
/// transaction; parents of another tenant are refused.
pub fn dag_dependencies(h: Harness) {
    let new = |queue: &str, deps: Vec<Dep>, policy: orch_core::ParentFailure| NewJob {
        depends_on: deps,
        on_parent_failure: policy,
        max_attempts: Some(1),
        ..NewJob::new("acme", "p", queue, json!({}))
    };
    use orch_core::ParentFailure::{Block, Cancel};
    // root → a, b → join (a diamond), all in one batch.
    let jobs = h
        .store
        .enqueue(
            "test",
            vec![
                new("dag", vec![], Block),
                new("dag", vec![Dep::Earlier(0)], Block),
                new("dag", vec![Dep::Earlier(0)], Block),
                new("dag", vec![Dep::Earlier(1), Dep::Earlier(2)], Block),
            ],
        )
        .unwrap();
    let ids: Vec<JobId> = jobs.iter().map(|e| e.job.id).collect();
    assert_eq!(jobs[3].job.spec.depends_on, vec![ids[1], ids[2]]);
    let mut order = Vec::new();
    loop {
        let got = claim(&h, "acme", "dag", 10);
        if got.is_empty() {
            break;
        }
        let mut wave: Vec<JobId> = got.iter().map(|a| a.job.id).collect();
        wave.sort();
        order.push(wave);
        for a in &got {
            ack(&h, "acme", a);
        }
    }
    assert_eq!(order, vec![vec![ids[0]], vec![ids[1], ids[2]], vec![ids[3]]]);

    // Block: a dead parent leaves its child queued and unclaimable.
    let parent = enqueue_one(&h, "acme", "p1");
    let child = h.store.enqueue("test", vec![new("c1", vec![Dep::Job(parent.id)], Block)]).unwrap().remove(0).job;
    let a = claim(&h, "acme", "p1", 1);
    assert_eq!(fail_dead(&h, "acme", &a[0]).state, JobState::Dead);
    assert!(claim(&h, "acme", "c1", 1).is_empty());
    assert_eq!(h.store.job(&t("acme"), child.id).unwrap().state, JobState::Queued);

    // Cancel: a dead parent cancels children and grandchildren.
    let parent = enqueue_one(&h, "acme", "p2");
    let kids = h
        .store
        .enqueue("test", vec![new("c2", vec![Dep::Job(parent.id)], Cancel), new("c2", vec![Dep::Earlier(0)], Cancel)])
        .unwrap();
    let a = claim(&h, "acme", "p2", 1);
    fail_dead(&h, "acme", &a[0]);
    for k in &kids {
        assert_eq!(h.store.job(&t("acme"), k.job.id).unwrap().state, JobState::Cancelled);
    }
    // A child enqueued after its parent died (with policy cancel) is cancelled at once.
    let late = h.store.enqueue("test", vec![new("c2", vec![Dep::Job(parent.id)], Cancel)]).unwrap();
    assert_eq!(h.store.job(&t("acme"), late[0].job.id).unwrap().state, JobState::Cancelled);

    // Another tenant's job, or none, as a parent: refused, nothing written, not even the
    // good job before it in the batch (the transaction rolls back, and the next one starts).
    let theirs = enqueue_one(&h, "globex", "q");
    let before = h.store.jobs(&t("acme"), &JobFilter::default(), PageRequest { after: 0, limit: 1000 }).unwrap();
    let good = NewJob::new("acme", "p", "q", json!({}));
    for dep in [Dep::Job(theirs.id), Dep::Job(999_999), Dep::Earlier(5)] {
        let err = h.store.enqueue("test", vec![good.clone(), enqueue_new("acme", dep)]).unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    }
    let after = h.store.jobs(&t("acme"), &JobFilter::default(), PageRequest { after: 0, limit: 1000 }).unwrap();
    assert_eq!(before.items.len(), after.items.len());
    assert_ledger_ok(&h);
}

fn enqueue_new(tenant: &str, dep: Dep) -> NewJob {
    NewJob { depends_on: vec![dep], ..NewJob::new(tenant, "p", "q", json!({})) }
}

/// A claim gate's exclusions and refusals are honoured, and its records are written with
/// the claim.
pub fn claim_gate(h: Harness) {
    struct Gate(Vec<JobId>);
    impl ClaimGate for Gate {
        fn begin(&mut self, _: Timestamp, _: &[RunningCount]) -> Vec<Exclusion> {
            vec![Exclusion::Queue("acme".into(), "paused".into())]
        }
        fn admit(&mut self, job: &orch_core::Job) -> Result<(), Exclusion> {
            if self.0.len() >= 2 {
                return Err(Exclusion::Tenant(job.tenant.clone()));
            }
            self.0.push(job.id);
            Ok(())
        }
        fn records(&mut self) -> Vec<orch_core::throttle::ThrottleRecord> {
            vec![orch_core::throttle::ThrottleRecord {
                seq: 0,
                at: T0,
                tenant: "acme".into(),
                host: None,
                action: "denied".into(),
                tokens_milli: 0,
                refill_milli_per_s: 1000,
                reason: "test".into(),
                details: json!({}),
            }]
        }
    }
    let paused = enqueue_one(&h, "acme", "paused");
    for _ in 0..3 {
        enqueue_one(&h, "acme", "open");
    }
    let req = |queues: Vec<&str>| ClaimRequest {
        scope: t("acme"),
        queues: queues.into_iter().map(String::from).collect(),
        worker: "w1".into(),
        limit: 10,
        lease_ms: None,
    };
    let mut gate = Gate(Vec::new());
    let got = h.store.claim_gated(&req(vec!["paused", "open"]), &mut gate).unwrap();
    assert_eq!(got.len(), 2, "two admitted, the paused queue skipped");
    assert!(got.iter().all(|a| a.job.spec.queue == "open"));
    assert_eq!(h.store.job(&t("acme"), paused.id).unwrap().state, JobState::Queued);
    let throttles = h.store.throttles(&t("acme"), PageRequest { after: 0, limit: 10 }).unwrap();
    assert_eq!(throttles.items.len(), 1);
    assert_eq!(throttles.items[0].seq, 1);
    assert!(h.store.throttles(&t("globex"), PageRequest { after: 0, limit: 10 }).unwrap().items.is_empty());
    // An open gate takes what is left.
    assert_eq!(h.store.claim(&req(vec!["paused", "open"])).unwrap().len(), 2);
    assert_ledger_ok(&h);
}

/// Incidents open once per condition, close when it clears, and are audited and scoped.
pub fn incidents_reconcile(h: Harness) {
    let spec = |tenant: &str, kind: &str, key: &str| IncidentSpec {
        tenant: tenant.into(),
        kind: kind.into(),
        key: key.into(),
        details: json!({"seen": key}),
    };
    let kinds = ["breaker_open", "job_stuck"];
    let c = h
        .store
        .sync_incidents(&kinds, vec![spec("acme", "breaker_open", "host:a"), spec("globex", "job_stuck", "job:1")])
        .unwrap();
    assert_eq!((c.opened.len(), c.closed.len()), (2, 0));
    let again = h.store.sync_incidents(&kinds, vec![spec("acme", "breaker_open", "host:a")]).unwrap();
    assert_eq!((again.opened.len(), again.closed.len()), (0, 1), "still open: not reopened; globex's cleared");
    assert_eq!(again.closed[0].tenant, "globex");
    assert!(h.store.sync_incidents(&kinds, vec![spec("acme", "other", "x")]).is_err(), "unknown kind");
    h.clock.advance(Duration::from_secs(5));
    // A condition that clears and comes back is a new incident.
    h.store.sync_incidents(&kinds, vec![]).unwrap();
    let c = h.store.sync_incidents(&kinds, vec![spec("acme", "breaker_open", "host:a")]).unwrap();
    assert_eq!(c.opened.len(), 1);
    let page = PageRequest { after: 0, limit: 10 };
    let acme = h.store.incidents(&t("acme"), None, page).unwrap().items;
    assert_eq!(acme.len(), 2);
    assert!(acme[0].id > acme[1].id, "newest first");
    assert_eq!(acme[0].closed_at, None);
    assert_eq!(acme[1].closed_at, Some(T0.plus_millis(5_000)));
    assert_eq!(acme[1].details, json!({"seen": "host:a"}));
    assert_eq!(h.store.incidents(&t("acme"), Some(true), page).unwrap().items.len(), 1);
    assert_eq!(h.store.incidents(&t("globex"), Some(false), page).unwrap().items.len(), 1);
    assert!(h.store.incidents(&Scope::All, None, PageRequest { after: 0, limit: 2 }).unwrap().next_after.is_some());
    let audit =
        h.store.history(&t("acme"), &HistoryFilter { event_type: Some("audit".into()), ..Default::default() }, page);
    let actions: Vec<String> = audit
        .unwrap()
        .items
        .iter()
        .map(|e| match &e.event {
            orch_core::EventKind::Audit { action, .. } => action.clone(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(actions, ["incident.opened", "incident.closed", "incident.opened"]);
    assert_ledger_ok(&h);
}

/// A batch of acks: each succeeds or is refused on its own, and the chain stays whole.
pub fn ack_many_item_by_item(h: Harness) {
    for _ in 0..3 {
        enqueue_one(&h, "acme", "q");
    }
    let got = claim(&h, "acme", "q", 3);
    let lease = |i: usize| got[i].job.lease.as_ref().unwrap().id.clone();
    let bad_artifacts = Ack {
        lease_id: lease(2),
        artifacts: vec![
            ArtifactInput { name: "a".into(), media_type: "text/plain".into(), content: b"1".to_vec() },
            ArtifactInput { name: "a".into(), media_type: "text/plain".into(), content: b"2".to_vec() },
        ],
    };
    let results = h
        .store
        .ack_many(
            &t("acme"),
            vec![
                (got[0].job.id, Ack { lease_id: lease(0), artifacts: vec![] }),
                (got[1].job.id, Ack { lease_id: "not-the-lease".into(), artifacts: vec![] }),
                (999_999, Ack { lease_id: lease(1), artifacts: vec![] }),
                (got[2].job.id, bad_artifacts),
                (got[1].job.id, Ack { lease_id: lease(1), artifacts: vec![] }),
            ],
        )
        .unwrap();
    assert_eq!(results.len(), 5);
    assert_eq!(results[0].as_ref().unwrap().state, JobState::Succeeded);
    assert!(matches!(results[1], Err(StoreError::LeaseLost { .. })), "{:?}", results[1]);
    assert!(matches!(results[2], Err(StoreError::NotFound(_))), "{:?}", results[2]);
    assert!(matches!(results[3], Err(StoreError::Invalid(_))), "{:?}", results[3]);
    assert_eq!(results[4].as_ref().unwrap().state, JobState::Succeeded);
    assert_eq!(h.store.job(&t("acme"), got[2].job.id).unwrap().state, JobState::Running);
    // Another tenant's scope acks nothing of acme's.
    let other = h.store.ack_many(&t("globex"), vec![(got[2].job.id, Ack { lease_id: lease(2), artifacts: vec![] })]);
    assert!(matches!(other.unwrap()[0], Err(StoreError::NotFound(_))));
    assert_ledger_ok(&h);
}

/// Every filter of the job and history listings selects exactly what it names, in the scope.
pub fn listing_filters(h: Harness) {
    let mut a = NewJob::new("acme", "p1", "ingest", json!({}));
    a.source = Some("nvd".into());
    a.correlation_id = Some("corr-a".into());
    let b = NewJob::new("acme", "p2", "report", json!({}));
    let c = NewJob::new("globex", "p1", "ingest", json!({}));
    let out = h.store.enqueue("test", vec![a, b, c]).unwrap();
    let (ja, jb) = (out[0].job.id, out[1].job.id);
    h.clock.advance(Duration::from_secs(10));
    assert_eq!(claim(&h, "acme", "report", 1).len(), 1);
    let mid = T0.plus_millis(5_000);
    let jobs = |f: JobFilter| -> Vec<i64> {
        h.store.jobs(&t("acme"), &f, PageRequest::default()).unwrap().items.iter().map(|j| j.id).collect()
    };
    assert_eq!(jobs(JobFilter::default()), vec![ja, jb], "only the tenant's jobs");
    assert_eq!(jobs(JobFilter { queue: Some("ingest".into()), ..Default::default() }), vec![ja]);
    assert_eq!(jobs(JobFilter { project: Some("p2".into()), ..Default::default() }), vec![jb]);
    assert_eq!(jobs(JobFilter { source: Some("nvd".into()), ..Default::default() }), vec![ja]);
    assert_eq!(jobs(JobFilter { correlation_id: Some("corr-a".into()), ..Default::default() }), vec![ja]);
    assert_eq!(jobs(JobFilter { state: Some(JobState::Running), ..Default::default() }), vec![jb]);
    assert_eq!(jobs(JobFilter { updated_since: Some(mid), ..Default::default() }), vec![jb]);
    assert_eq!(jobs(JobFilter { updated_before: Some(mid), ..Default::default() }), vec![ja]);
    assert_eq!(jobs(JobFilter { run: Some(1), ..Default::default() }), Vec::<i64>::new());
    let events = |f: HistoryFilter| -> Vec<(Option<i64>, String)> {
        let page = h.store.history(&t("acme"), &f, PageRequest::default()).unwrap();
        page.items.iter().map(|e| (e.job_id, e.event.type_name().to_string())).collect()
    };
    let enq = |id| (Some(id), "job.enqueued".to_string());
    let claimed = (Some(jb), "job.claimed".to_string());
    assert_eq!(events(HistoryFilter::default()), vec![enq(ja), enq(jb), claimed.clone()]);
    assert_eq!(events(HistoryFilter { job_id: Some(jb), ..Default::default() }), vec![enq(jb), claimed.clone()]);
    assert_eq!(
        events(HistoryFilter { event_type: Some("job.claimed".into()), ..Default::default() }),
        vec![claimed.clone()]
    );
    assert_eq!(events(HistoryFilter { correlation_id: Some("corr-a".into()), ..Default::default() }), vec![enq(ja)]);
    assert_eq!(events(HistoryFilter { since: Some(mid), ..Default::default() }), vec![claimed]);
    assert_eq!(events(HistoryFilter { before: Some(mid), ..Default::default() }), vec![enq(ja), enq(jb)]);
}

/// Workers of two tenants enqueue, claim, ack and fail at once from several threads, with
/// refused requests among them: each job ends exactly once, a refusal leaves nothing behind,
/// and the history replays to the jobs (the SQLite backend commits such writers together).
pub fn concurrent_writers(h: Harness) {
    const THREADS: usize = 6;
    const JOBS: usize = 40;
    let ended = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|w| {
                let (store, tenant) = (&h.store, if w % 2 == 0 { "acme" } else { "globex" });
                s.spawn(move || {
                    let scope = t(tenant);
                    let mut ended = Vec::new();
                    for i in 0..JOBS {
                        let bad = NewJob::new(tenant, "p", "bad queue", json!({}));
                        assert!(matches!(store.enqueue("test", vec![bad]), Err(StoreError::Invalid(_))));
                        let job = NewJob::new(tenant, "p", &format!("q{w}"), json!({"w": w, "i": i}));
                        store.enqueue("test", vec![job]).unwrap();
                        let req = ClaimRequest {
                            scope: scope.clone(),
                            queues: vec![format!("q{w}")],
                            worker: format!("w{w}"),
                            limit: 1,
                            lease_ms: None,
                        };
                        let got = store.claim(&req).unwrap();
                        assert_eq!(got.len(), 1, "the job this worker enqueued is ready");
                        let (id, lease) = (got[0].job.id, got[0].job.lease.clone().unwrap().id);
                        let stale = Ack { lease_id: "not-the-lease".into(), artifacts: vec![] };
                        assert!(matches!(store.ack(&scope, id, stale), Err(StoreError::LeaseLost { .. })));
                        let done = if i % 4 == 3 {
                            let failure = Failure {
                                lease_id: lease,
                                class: "boom".into(),
                                message: "failed on purpose".into(),
                                retryable: false,
                                retry_after_ms: None,
                            };
                            store.fail(&scope, id, failure).unwrap()
                        } else {
                            store.ack(&scope, id, Ack { lease_id: lease, artifacts: vec![] }).unwrap()
                        };
                        ended.push((id, done.state));
                    }
                    ended
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect::<Vec<_>>()
    });
    assert_eq!(ended.len(), THREADS * JOBS);
    let ids: std::collections::BTreeSet<JobId> = ended.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), ended.len(), "every job was claimed once");
    for (id, state) in &ended {
        let tenant = h.store.job(&Scope::All, *id).unwrap().tenant;
        assert_eq!(h.store.job(&t(&tenant), *id).unwrap().state, *state);
    }
    let stats = h.store.stats(&Scope::All).unwrap();
    assert_eq!(stats.events, (THREADS * JOBS * 3) as u64, "enqueued, claimed and ended: nothing else");
    let count = |state: &str| stats.by_state.get(state).copied().unwrap_or(0);
    assert_eq!((count("succeeded"), count("dead")), ((THREADS * JOBS * 3 / 4) as u64, (THREADS * JOBS / 4) as u64));
    assert_ledger_ok(&h);
}

/// Expands to one `#[test]` per conformance case for a backend, given an [`Opener`] expression;
/// optionally a function that says why the backend cannot be tested here (`skip = f`: when it
/// gives `Some(reason)`, each case prints it and passes without testing) and how many random
/// operation sequences the replay property tries (`cases = n`, default 64).
#[macro_export]
macro_rules! store_conformance {
    ($open:expr) => {
        $crate::store_conformance!($open, skip = || -> Option<String> { None }, cases = 64);
    };
    ($open:expr, skip = $skip:expr) => {
        $crate::store_conformance!($open, skip = $skip, cases = 64);
    };
    ($open:expr, skip = $skip:expr, cases = $cases:expr) => {
        $crate::store_conformance!(@cases $open; $skip;
            enqueue_claim_heartbeat_ack, fail_retry_dead_letter, lease_expiry_reclaim,
            idempotent_enqueue, stale_lease_rejected, claim_order_and_run_after,
            tenant_isolation, bad_input_changes_nothing, cancel_and_conflicts, pagination,
            dag_dependencies, claim_gate, incidents_reconcile, ack_many_item_by_item, listing_filters, stuck_jobs,
            concurrent_writers);

        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig::with_cases($cases))]
            /// Replaying the history of any operation sequence reproduces the jobs table.
            #[test]
            fn replay_reproduces_jobs(ops in $crate::conformance::ops()) {
                if let Some(why) = ($skip)() {
                    eprintln!("SKIP: {why}");
                    return Ok(());
                }
                $crate::conformance::replay_reproduces_jobs($crate::conformance::harness($open), ops);
            }
        }
    };
    (@cases $open:expr; $skip:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                if let Some(why) = ($skip)() {
                    eprintln!("SKIP: {why}");
                    return;
                }
                $crate::conformance::$case($crate::conformance::harness($open));
            }
        )*
    };
}
