//! The Task Runner bridge (what workers and producers call) and the job operations of the
//! operator API: enqueue, claim, heartbeat, ack, fail, cancel, retry, list and get.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use orch_core::{Job, JobId, JobState, Timestamp};
use orch_store::{Ack, ArtifactInput, ClaimRequest, Failure, Heartbeat, JobFilter, NewJob};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Principal, OPERATE, READ, WORK};
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{paged, ApiJson, MaybeJson, PageParams};
use super::openapi::refs;
use crate::AppState;

/// A job to enqueue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"queue": "ingest", "source": "nvd", "payload": {"url": "https://services.nvd.nist.gov/rest/json/cves/2.0"}, "idempotency_key": "nvd-2026-11-24"}))]
pub struct EnqueueRequest {
    /// Project within the tenant (default `default`).
    #[serde(default)]
    pub project: Option<String>,
    /// Job type: the queue workers claim from.
    pub queue: String,
    /// Upstream source id.
    #[serde(default)]
    pub source: Option<String>,
    /// Input for the worker.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Higher runs first (default 0).
    #[serde(default)]
    pub priority: i32,
    /// Not before this instant (RFC 3339; default now).
    #[serde(default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub run_after: Option<Timestamp>,
    /// Attempts before dead-lettering.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Correlation id carried by every event of the job (default: a new one).
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// Enqueueing the same key twice in a tenant returns the first job.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Jobs that must succeed before this one may be claimed.
    #[serde(default)]
    pub depends_on: Vec<JobId>,
    /// What a dead-lettered or cancelled parent does to this job: `block` (default) or `cancel`.
    #[serde(default)]
    #[schema(value_type = String)]
    pub on_parent_failure: orch_core::ParentFailure,
}

impl EnqueueRequest {
    fn into_new_job(self, tenant: &str) -> NewJob {
        NewJob {
            tenant: tenant.to_string(),
            project: self.project.unwrap_or_else(|| "default".into()),
            queue: self.queue,
            source: self.source,
            payload: self.payload,
            priority: self.priority,
            run_after: self.run_after,
            max_attempts: self.max_attempts,
            correlation_id: self.correlation_id,
            idempotency_key: self.idempotency_key,
            run: None,
            depends_on: self.depends_on.into_iter().map(orch_store::Dep::Job).collect(),
            on_parent_failure: self.on_parent_failure,
        }
    }
}

/// Several jobs to enqueue at once (all or nothing).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueBatchRequest {
    /// 1 to 1000 jobs.
    pub jobs: Vec<EnqueueRequest>,
}

/// One enqueued job.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnqueuedOut {
    /// The job.
    #[schema(schema_with = refs::job)]
    pub job: Job,
    /// `false` when the idempotency key was already used and this is the existing job.
    pub created: bool,
}

/// Enqueued jobs, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnqueuedBatchOut {
    /// One entry per requested job.
    pub items: Vec<EnqueuedOut>,
}

/// A job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobOut {
    /// The job.
    #[schema(schema_with = refs::job)]
    pub job: Job,
}

/// A worker's request for work.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"worker_id": "worker-7", "queues": ["ingest"], "limit": 10, "lease_seconds": 60}))]
pub struct ClaimBody {
    /// The worker's id (recorded as the actor of its events).
    pub worker_id: String,
    /// Job types the worker runs.
    pub queues: Vec<String>,
    /// At most this many jobs (1-1000, default 1).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Lease length (default: the daemon's).
    #[serde(default)]
    pub lease_seconds: Option<u64>,
}

/// A leased job and what the worker needs to run it well.
#[derive(Debug, Serialize, ToSchema)]
pub struct AllocationOut {
    /// The job.
    #[schema(schema_with = refs::job)]
    pub job: Job,
    /// Present with every heartbeat, ack and fail.
    pub lease_id: String,
    /// When the lease lapses unless extended.
    #[schema(value_type = String, format = DateTime)]
    pub lease_expires_at: Timestamp,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    /// The job's idempotency key, for the worker's own side effects.
    pub idempotency_key: Option<String>,
    /// Attempts left after this one.
    pub attempts_left: u32,
    /// The backoff before a retry if this attempt fails, without jitter.
    pub retry_backoff_ms: u64,
    /// Heartbeat at least this often to keep the lease.
    pub heartbeat_ms: u64,
}

/// The leased jobs (possibly none).
#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimOut {
    /// Leased jobs, highest priority first.
    pub allocations: Vec<AllocationOut>,
}

/// A heartbeat.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    /// The lease held.
    pub lease_id: String,
    /// Progress to record (any JSON).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub progress: Option<Value>,
    /// New lease length from now (default: the daemon's).
    #[serde(default)]
    pub extend_seconds: Option<u64>,
}

/// An output of the job.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactUpload {
    /// Unique within the job.
    pub name: String,
    /// Media type (default `application/octet-stream`).
    #[serde(default)]
    pub media_type: Option<String>,
    /// The content, base64 (standard alphabet, padded).
    pub content_base64: String,
}

/// A success acknowledgement.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// The lease held.
    pub lease_id: String,
    /// Outputs, hashed (SHA-256) and stored content-addressed.
    #[serde(default)]
    pub artifacts: Vec<ArtifactUpload>,
}

/// One acknowledgement in a batch.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckItem {
    /// The job.
    pub job_id: i64,
    /// The lease held.
    pub lease_id: String,
    /// Outputs.
    #[serde(default)]
    pub artifacts: Vec<ArtifactUpload>,
}

/// Several acknowledgements; each succeeds or fails on its own.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBatchBody {
    /// 1 to 1000 acknowledgements.
    pub items: Vec<AckItem>,
}

/// The outcome of one acknowledgement in a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct AckItemOut {
    /// The job.
    pub job_id: i64,
    /// The job after the ack, when it was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = refs::job)]
    pub job: Option<Job>,
    /// Why it was refused, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<super::error::ErrorBody>,
}

/// Outcomes in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct AckBatchOut {
    /// One entry per acknowledgement.
    pub items: Vec<AckItemOut>,
}

/// A failed attempt.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"lease_id": "5d0c…", "error_class": "http_429", "message": "upstream throttled", "retryable": true, "retry_after_seconds": 30}))]
pub struct FailBody {
    /// The lease held.
    pub lease_id: String,
    /// Error class, e.g. `http_429`, `timeout`.
    pub error_class: String,
    /// What went wrong.
    #[serde(default)]
    pub message: String,
    /// `false` dead-letters the job at once (default true).
    #[serde(default = "yes")]
    pub retryable: bool,
    /// The worker's wish for the delay before the next attempt (e.g. an upstream `Retry-After`).
    #[serde(default)]
    pub retry_after_seconds: Option<u64>,
}

fn yes() -> bool {
    true
}

/// An operator's cancel or retry.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    /// Why (recorded in the history).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Filters for listing jobs.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    /// `queued`, `running`, `succeeded`, `dead` or `cancelled`.
    pub state: Option<String>,
    /// Job type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub queue: Option<String>,
    /// Project.
    pub project: Option<String>,
    /// Source id.
    pub source: Option<String>,
    /// Run id.
    pub run: Option<i64>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Changed at or after (RFC 3339).
    pub updated_since: Option<String>,
    /// Changed before (RFC 3339).
    pub updated_before: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
}

/// A page of jobs.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"items": [], "next_cursor": "YWZ0ZXI6MTAw"}))]
pub struct JobPage {
    /// Jobs by ascending id.
    #[schema(schema_with = refs::jobs)]
    pub items: Vec<Job>,
    /// Cursor of the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// Parses an RFC 3339 query parameter.
pub fn time_param(name: &str, v: &Option<String>) -> Result<Option<Timestamp>, ApiError> {
    v.as_deref()
        .map(|s| {
            Timestamp::parse(s).map_err(|_| {
                ApiError::invalid(format!("{name} must be an RFC 3339 time")).with_details(json!({ "field": name }))
            })
        })
        .transpose()
}

#[utoipa::path(post, path = "/api/v1/jobs", tag = "worker", request_body = EnqueueRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response to the same key and body")),
    responses((status = 201, description = "Created", body = EnqueuedOut), (status = 200, description = "Existing job for the idempotency key", body = EnqueuedOut),
        (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:work"])))]
/// Enqueue one job.
pub async fn enqueue(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(body): ApiJson<EnqueueRequest>,
) -> Result<Response, ApiError> {
    p.require(&[WORK, OPERATE])?;
    let tenant = p.write_tenant()?;
    let job = body.into_new_job(&tenant);
    super::flow::check_backpressure(&st, &tenant, std::slice::from_ref(&job)).await?;
    let actor = p.actor.clone();
    let mut out = st.call(move |s| s.enqueue(&actor, vec![job.clone()])).await?;
    let e = out.pop().ok_or_else(|| ApiError::internal("enqueue returned nothing"))?;
    let status = if e.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(EnqueuedOut { job: e.job, created: e.created })).into_response())
}

#[utoipa::path(post, path = "/api/v1/jobs/batch", tag = "worker", request_body = EnqueueBatchRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response to the same key and body")),
    responses((status = 200, body = EnqueuedBatchOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:work"])))]
/// Enqueue up to 1000 jobs in one transaction (all or nothing).
pub async fn enqueue_batch(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(body): ApiJson<EnqueueBatchRequest>,
) -> Result<Json<EnqueuedBatchOut>, ApiError> {
    p.require(&[WORK, OPERATE])?;
    if body.jobs.is_empty() || body.jobs.len() > 1000 {
        return Err(ApiError::invalid("a batch holds 1 to 1000 jobs"));
    }
    let tenant = p.write_tenant()?;
    let jobs: Vec<NewJob> = body.jobs.into_iter().map(|j| j.into_new_job(&tenant)).collect();
    super::flow::check_backpressure(&st, &tenant, &jobs).await?;
    let actor = p.actor.clone();
    let out = st.blocking(move |s| s.enqueue(&actor, jobs)).await?;
    Ok(Json(EnqueuedBatchOut {
        items: out.into_iter().map(|e| EnqueuedOut { job: e.job, created: e.created }).collect(),
    }))
}

#[utoipa::path(post, path = "/api/v1/claims", tag = "worker", request_body = ClaimBody,
    responses((status = 200, body = ClaimOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:work"])))]
/// Lease up to `limit` ready jobs of the given types.
pub async fn claim(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(body): ApiJson<ClaimBody>,
) -> Result<Json<ClaimOut>, ApiError> {
    p.require(&[WORK])?;
    let limit = super::extract::limit(body.limit, 1, 1000)?;
    let req = ClaimRequest {
        scope: p.scope(),
        queues: body.queues,
        worker: body.worker_id,
        limit,
        lease_ms: body.lease_seconds.map(|s| s.saturating_mul(1000)),
    };
    let allocs = crate::flow::claim(&st, req).await?;
    let allocations = allocs
        .into_iter()
        .filter_map(|a| {
            let lease = a.job.lease.clone()?;
            Some(AllocationOut {
                lease_id: lease.id,
                lease_expires_at: lease.expires_at,
                attempt: a.job.attempt,
                idempotency_key: a.job.spec.idempotency_key.clone(),
                attempts_left: a.retry.attempts_left,
                retry_backoff_ms: a.retry.backoff_ms,
                heartbeat_ms: a.retry.heartbeat_ms,
                job: a.job,
            })
        })
        .collect();
    Ok(Json(ClaimOut { allocations }))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/heartbeat", tag = "worker", request_body = HeartbeatBody,
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, body = JobOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:work"])))]
/// Extend a lease and record progress.
pub async fn heartbeat(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<JobId>,
    ApiJson(body): ApiJson<HeartbeatBody>,
) -> Result<Json<JobOut>, ApiError> {
    p.require(&[WORK])?;
    let scope = p.scope();
    let hb = Heartbeat {
        lease_id: body.lease_id,
        progress: body.progress,
        extend_ms: body.extend_seconds.map(|s| s.saturating_mul(1000)),
    };
    let job = st.call(move |s| s.heartbeat(&scope, id, hb.clone())).await?;
    Ok(Json(JobOut { job }))
}

fn artifacts(list: Vec<ArtifactUpload>) -> Result<Vec<ArtifactInput>, ApiError> {
    list.into_iter()
        .map(|a| {
            let content = base64::engine::general_purpose::STANDARD.decode(&a.content_base64).map_err(|e| {
                ApiError::invalid(format!("artifact {:?}: content_base64 is not base64: {e}", a.name))
                    .with_details(json!({"field": "content_base64", "artifact": a.name}))
            })?;
            Ok(ArtifactInput {
                name: a.name,
                media_type: a.media_type.unwrap_or_else(|| "application/octet-stream".into()),
                content,
            })
        })
        .collect()
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/ack", tag = "worker", request_body = AckBody,
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, body = JobOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:work"])))]
/// Complete a leased job with its artifacts.
pub async fn ack(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<JobId>,
    ApiJson(body): ApiJson<AckBody>,
) -> Result<Json<JobOut>, ApiError> {
    p.require(&[WORK])?;
    let scope = p.scope();
    let ack = Ack { lease_id: body.lease_id, artifacts: artifacts(body.artifacts)? };
    // Artifacts are written whole: such an ack is not a short call, and running it in place
    // would copy them for the pool's second try.
    let job = if ack.artifacts.is_empty() {
        st.call(move |s| s.ack(&scope, id, ack.clone())).await?
    } else {
        st.blocking(move |s| s.ack(&scope, id, ack)).await?
    };
    crate::flow::observe(&st, &[&job], crate::flow::Outcome::Succeeded).await;
    Ok(Json(JobOut { job }))
}

#[utoipa::path(post, path = "/api/v1/acks", tag = "worker", request_body = AckBatchBody,
    responses((status = 200, body = AckBatchOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:work"])))]
/// Complete up to 1000 leased jobs; each acknowledgement succeeds or fails on its own.
pub async fn ack_batch(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(body): ApiJson<AckBatchBody>,
) -> Result<Json<AckBatchOut>, ApiError> {
    p.require(&[WORK])?;
    if body.items.is_empty() || body.items.len() > 1000 {
        return Err(ApiError::invalid("a batch holds 1 to 1000 acknowledgements"));
    }
    let scope = p.scope();
    let mut acks = Vec::with_capacity(body.items.len());
    for item in body.items {
        acks.push((item.job_id, Ack { lease_id: item.lease_id, artifacts: artifacts(item.artifacts)? }));
    }
    let ids: Vec<JobId> = acks.iter().map(|(id, _)| *id).collect();
    let results = st.blocking(move |s| s.ack_many(&scope, acks)).await?;
    let done: Vec<&orch_core::Job> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    crate::flow::observe(&st, &done, crate::flow::Outcome::Succeeded).await;
    let results: Vec<(JobId, Result<orch_core::Job, orch_store::StoreError>)> = ids.into_iter().zip(results).collect();
    let items = results
        .into_iter()
        .map(|(job_id, r)| match r {
            Ok(job) => AckItemOut { job_id, job: Some(job), error: None },
            Err(e) => {
                let e = ApiError::from(e);
                let error = super::error::ErrorBody {
                    code: e.code.to_string(),
                    message: e.message,
                    details: e.details,
                    request_id: String::new(),
                };
                AckItemOut { job_id, job: None, error: Some(error) }
            }
        })
        .collect();
    Ok(Json(AckBatchOut { items }))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/fail", tag = "worker", request_body = FailBody,
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, body = JobOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:work"])))]
/// Report a failed attempt: the job is retried with backoff and jitter, or dead-lettered.
pub async fn fail(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<JobId>,
    ApiJson(body): ApiJson<FailBody>,
) -> Result<Json<JobOut>, ApiError> {
    p.require(&[WORK])?;
    let scope = p.scope();
    let f = Failure {
        lease_id: body.lease_id,
        class: body.error_class,
        message: body.message,
        retryable: body.retryable,
        retry_after_ms: body.retry_after_seconds.map(|s| s.saturating_mul(1000)),
    };
    let outcome = crate::flow::Outcome::failed(&f);
    let job = st.call(move |s| s.fail(&scope, id, f.clone())).await?;
    crate::flow::observe(&st, &[&job], outcome).await;
    Ok(Json(JobOut { job }))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", request_body(content = Option<ReasonBody>, description = "Optional"),
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, body = JobOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:operate"]), ("bearer" = ["orch:work"])))]
/// Cancel a job that has not finished.
pub async fn cancel(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<JobId>,
    MaybeJson(body): MaybeJson<ReasonBody>,
) -> Result<Json<JobOut>, ApiError> {
    p.require(&[OPERATE, WORK])?;
    let scope = p.scope();
    let reason = body.and_then(|b| b.reason);
    let actor = p.actor.clone();
    let job = st.blocking(move |s| s.cancel(&scope, id, &actor, reason)).await?;
    Ok(Json(JobOut { job }))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "jobs", request_body(content = Option<ReasonBody>, description = "Optional"),
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, body = JobOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:operate"])))]
/// Put a dead or cancelled job back in the queue with fresh attempts.
pub async fn retry(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<JobId>,
    MaybeJson(body): MaybeJson<ReasonBody>,
) -> Result<Json<JobOut>, ApiError> {
    p.require(&[OPERATE])?;
    let scope = p.scope();
    let reason = body.and_then(|b| b.reason);
    let actor = p.actor.clone();
    let job = st.blocking(move |s| s.retry(&scope, id, &actor, reason)).await?;
    Ok(Json(JobOut { job }))
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(JobQuery),
    responses((status = 200, body = JobPage, headers(("Link" = String, description = "<…?cursor=…>; rel=\"next\" when there is a next page"))),
        (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// List jobs, by ascending id, with filters and cursor pagination.
pub async fn list(
    State(st): State<AppState>,
    p: Principal,
    uri: Uri,
    q: Query<JobQuery>,
) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let q = q.0;
    let page = PageParams { limit: q.limit, cursor: q.cursor.clone() }.page()?;
    let state = q
        .state
        .as_deref()
        .map(|s| JobState::parse(s).ok_or_else(|| ApiError::invalid(format!("unknown state {s:?}"))))
        .transpose()?;
    let filter = JobFilter {
        state,
        queue: q.queue,
        project: q.project,
        source: q.source,
        correlation_id: q.correlation_id,
        run: q.run,
        updated_since: time_param("updated_since", &q.updated_since)?,
        updated_before: time_param("updated_before", &q.updated_before)?,
    };
    let scope = p.scope();
    let page = st.blocking(move |s| s.jobs(&scope, &filter, page)).await?;
    Ok(paged(&uri, page.items, page.next_after))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, body = JobOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// One job.
pub async fn get(State(st): State<AppState>, p: Principal, Path(id): Path<JobId>) -> Result<Json<JobOut>, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let job = st.blocking(move |s| s.job(&scope, id)).await?;
    Ok(Json(JobOut { job }))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/artifacts/{name}", tag = "jobs",
    params(("id" = i64, Path, description = "Job id"), ("name" = String, Path, description = "Artifact name")),
    responses((status = 200, description = "The artifact's bytes, with its media type; `ETag` is its SHA-256", content_type = "application/octet-stream"),
        (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// An artifact's content.
pub async fn artifact(
    State(st): State<AppState>,
    p: Principal,
    Path((id, name)): Path<(JobId, String)>,
) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let (meta, content) = st.blocking(move |s| s.artifact(&scope, id, &name)).await?;
    let headers = [(header::CONTENT_TYPE, meta.media_type), (header::ETAG, format!("\"sha256:{}\"", meta.sha256))];
    Ok((headers, content).into_response())
}

/// Job counts by state.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsOut {
    /// Jobs by state name.
    pub jobs: BTreeMap<String, u64>,
    /// Events in the history.
    pub events: u64,
}

#[utoipa::path(get, path = "/api/v1/stats", tag = "jobs",
    responses((status = 200, body = StatsOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// Job counts by state in the caller's scope.
pub async fn stats(State(st): State<AppState>, p: Principal) -> Result<Json<StatsOut>, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let s = st.blocking(move |s| s.stats(&scope)).await?;
    Ok(Json(StatsOut { jobs: s.by_state, events: s.events }))
}
