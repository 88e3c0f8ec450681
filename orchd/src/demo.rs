//! The demo workload behind `orchd serve --demo`: a trickle of jobs for two tenants and an
//! in-process worker that runs them (one in five fails its first attempt with an upstream 429),
//! so that a newcomer sees jobs move through the ledger in the logs and over the API. The
//! worker claims through flow control, and tenant `acme` has a rate limit on the upstream host,
//! so the console also shows a bucket whose refill drops on 429s and recovers.

use std::time::Duration;

use orch_store::{Ack, ArtifactInput, ClaimRequest, Failure, Heartbeat, NewJob, Scope, SettingChange, SettingKind};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::AppState;

const QUEUES: [&str; 2] = ["ingest.nvd", "analyze"];
const TENANTS: [&str; 2] = ["acme", "globex"];
const HOST: &str = "services.nvd.nist.gov";

/// Makes a read-only site token for this demo and says on stderr how to use it.
fn announce_token(state: &AppState) {
    let (id, secret) = crate::http::auth::mint_token();
    let token = orch_store::NewToken {
        id,
        tenant: "*".into(),
        scopes: vec![crate::http::auth::READ.into()],
        label: "orchd serve --demo".into(),
        expires_at: Some(state.clock.now().plus_millis(24 * 3_600_000)),
        hash: crate::http::auth::token_hash(&secret),
    };
    match state.store.put_token(token) {
        Ok(_) => eprintln!(
            "demo: a read-only site token, valid for 24 h: {secret}\n\
             demo: console  http://{addr}/#token={secret}\n\
             demo: try  curl -H 'Authorization: Bearer {secret}' 'http://{addr}/api/v1/jobs?limit=5'",
            addr = state.settings.listen
        ),
        Err(e) => tracing::error!(error = %e, "could not make the demo token"),
    }
}

/// Gives `acme` a rate limit on the demo's upstream host, unless it has one.
fn set_rate_limit(state: &AppState) {
    let id = format!("host:{HOST}");
    let scope = Scope::Tenant("acme".into());
    let exists = state.store.settings(&scope, SettingKind::RateLimit).map(|s| s.iter().any(|r| r.id == id));
    if !matches!(exists, Ok(false)) {
        return;
    }
    let doc = crate::flow::RateLimitDoc { bucket: orch_core::flow::BucketConfig::new(8, 12_000), throttle: None };
    let change = SettingChange {
        tenant: "acme".into(),
        project: "demo".into(),
        kind: SettingKind::RateLimit,
        id,
        doc: serde_json::to_value(doc).unwrap_or_default(),
        reason: Some("demo: NVD asks for a few requests per second".into()),
        ticket: None,
    };
    if let Err(e) = state.store.put_setting("demo", change).and_then(|_| crate::flow::reload_now(state)) {
        tracing::error!(error = %e, "could not set the demo rate limit");
    }
}

/// Starts the demo producer and worker.
pub fn spawn(state: &AppState, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    announce_token(state);
    set_rate_limit(state);
    let producer = {
        let mut n = 0u64;
        crate::services::spawn_periodic(
            "demo-producer",
            state.clone(),
            Duration::from_millis(500),
            stop.clone(),
            move |st| {
                n += 1;
                let batch = n;
                async move {
                    let jobs = (0..4u64)
                        .map(|i| {
                            let tenant = TENANTS[(i % 2) as usize];
                            let queue = QUEUES[((i / 2) % 2) as usize];
                            let mut j = NewJob::new(tenant, "demo", queue, json!({"batch": batch, "item": i}));
                            j.source = Some(HOST.into());
                            j.max_attempts = Some(3);
                            j.idempotency_key = Some(format!("demo-{batch}-{i}"));
                            j
                        })
                        .collect();
                    match st.blocking(move |s| s.enqueue("demo", jobs)).await {
                        Ok(out) => tracing::info!(batch, jobs = out.len(), "demo enqueued"),
                        Err(e) => tracing::error!(error = %e, "demo enqueue failed"),
                    }
                }
            },
        )
    };
    let worker = crate::services::spawn_periodic(
        "demo-worker",
        state.clone(),
        Duration::from_millis(100),
        stop,
        |st| async move {
            if let Err(e) = work_once(&st).await {
                tracing::error!(error = %e, "demo worker failed");
            }
        },
    );
    vec![producer, worker]
}

async fn work_once(st: &AppState) -> Result<(), orch_store::StoreError> {
    let req = ClaimRequest {
        scope: Scope::All,
        queues: QUEUES.iter().map(|q| q.to_string()).collect(),
        worker: "demo-worker".into(),
        limit: 4,
        lease_ms: Some(10_000),
    };
    let allocations = crate::flow::claim(st, req).await?;
    for a in allocations {
        let job = a.job;
        let lease_id = job.lease.clone().map(|l| l.id).unwrap_or_default();
        let scope = Scope::Tenant(job.tenant.clone());
        tracing::info!(job.id = job.id, tenant = %job.tenant, queue = %job.spec.queue, attempt = job.attempt, "demo job claimed");
        let (sc, lid) = (scope.clone(), lease_id.clone());
        let hb = Heartbeat { lease_id: lid, progress: Some(json!({"pct": 50})), extend_ms: None };
        st.blocking(move |s| s.heartbeat(&sc, job.id, hb)).await?;
        let flaky = job.id % 5 == 0 && job.attempt == 1;
        if flaky {
            let f = Failure {
                lease_id,
                class: "http_429".into(),
                message: "upstream answered 429 Too Many Requests".into(),
                retryable: true,
                retry_after_ms: Some(500),
            };
            let outcome = crate::flow::Outcome::failed(&f);
            let after = st.blocking(move |s| s.fail(&scope, job.id, f)).await?;
            crate::flow::observe(st, &[&after], outcome).await;
            tracing::info!(job.id = job.id, state = after.state.as_str(), "demo job failed, will retry");
        } else {
            let content = serde_json::to_vec(&json!({"job": job.id, "records": job.id * 7 % 100})).unwrap_or_default();
            let ack = Ack {
                lease_id,
                artifacts: vec![ArtifactInput {
                    name: "result.json".into(),
                    media_type: "application/json".into(),
                    content,
                }],
            };
            let done = st.blocking(move |s| s.ack(&scope, job.id, ack)).await?;
            crate::flow::observe(st, &[&done], crate::flow::Outcome::Succeeded).await;
            tracing::info!(job.id = job.id, tenant = %job.tenant, queue = %job.spec.queue, "demo job succeeded");
        }
    }
    Ok(())
}
