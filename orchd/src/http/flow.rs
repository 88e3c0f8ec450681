//! Flow control over HTTP: rate limits and operator throttles, concurrency limits, pauses,
//! blackouts, schedules (all audited tenant settings), the live state of buckets and
//! breakers, the throttle records, bulk retry of dead-lettered jobs, DAG runs and run replay.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use orch_core::flow::{Blackout, BucketConfig};
use orch_core::schedule::{CronSpec, OverlapPolicy};
use orch_core::{Job, JobId, ParentFailure, Timestamp};
use orch_store::{Dep, JobFilter, NewJob, NewRun, PageRequest, SettingChange, SettingKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::auth::{Principal, ADMIN, OPERATE, READ, WORK};
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{paged, ApiJson, MaybeJson, PageParams};
use super::ops::{change_setting, list_settings, ChangeOut, RunOut, SettingList};
use crate::flow::{BlackoutDoc, RateLimitDoc, Target};
use crate::AppState;

/// Why a control was used (recorded in the audit history).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
    /// The change ticket.
    #[serde(default)]
    pub ticket: Option<String>,
}

fn change(
    p: &Principal,
    kind: SettingKind,
    id: String,
    doc: Value,
    why: ReasonBody,
) -> Result<SettingChange, ApiError> {
    Ok(SettingChange {
        tenant: p.write_tenant()?,
        project: "default".into(),
        kind,
        id,
        doc,
        reason: why.reason,
        ticket: why.ticket,
    })
}

fn target(id: &str) -> Result<Target, ApiError> {
    Target::parse(id).ok_or_else(|| {
        ApiError::invalid(format!("{id:?} is not a target: use `tenant`, `queue:<type>` or `source:<source>`"))
            .with_details(json!({"field": "target"}))
    })
}

fn milli(field: &str, per_s: f64) -> Result<u64, ApiError> {
    if !(per_s.is_finite() && (0.001..=1_000_000.0).contains(&per_s)) {
        return Err(ApiError::invalid(format!("{field} must be between 0.001 and 1000000 per second"))
            .with_details(json!({"field": field})));
    }
    Ok((per_s * 1000.0).round() as u64)
}

/// A token bucket: `burst` tokens, refilled at `rate_per_s`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"rate_per_s": 10.0, "burst": 5, "reason": "NVD asks for 10 req/s"}))]
pub struct RateLimitBody {
    /// Tokens per second.
    pub rate_per_s: f64,
    /// Bucket size.
    pub burst: u32,
    /// Lowest refill adaptive decrease may reach (default a tenth of the rate).
    #[serde(default)]
    pub min_rate_per_s: Option<f64>,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
    /// The change ticket.
    #[serde(default)]
    pub ticket: Option<String>,
}

#[utoipa::path(put, path = "/api/v1/rate-limits/{id}", tag = "flow", request_body = RateLimitBody,
    params(("id" = String, Path, description = "`tenant`, or `host:<source host>`")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Set a rate limit, applied at claim time (audited).
pub async fn put_rate_limit(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<RateLimitBody>,
) -> Result<Response, ApiError> {
    p.require(&[ADMIN])?;
    if id != "tenant" && id.strip_prefix("host:").is_none_or(str::is_empty) {
        return Err(ApiError::invalid("a rate limit is `tenant` or `host:<host>`").with_details(json!({"field": "id"})));
    }
    let rate = milli("rate_per_s", b.rate_per_s)?;
    let mut bucket = BucketConfig::new(b.burst, rate);
    if let Some(min) = b.min_rate_per_s {
        bucket.min_rate_milli_per_s = milli("min_rate_per_s", min)?.min(rate);
    }
    bucket.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    let doc = serde_json::to_value(RateLimitDoc { bucket, throttle: None }).expect("encodes");
    let why = ReasonBody { reason: b.reason, ticket: b.ticket };
    change_setting(&st, &p, change(&p, SettingKind::RateLimit, id, doc, why)?, false).await
}

/// A temporary lower rate.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"rate_per_s": 1.0, "seconds": 3600, "reason": "upstream maintenance"}))]
pub struct ThrottleBody {
    /// The rate while it lasts (at most the configured one).
    pub rate_per_s: f64,
    /// How long.
    pub seconds: u64,
    /// Why (required).
    pub reason: String,
    /// The change ticket.
    #[serde(default)]
    pub ticket: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/rate-limits/{id}/throttle", tag = "flow", request_body = ThrottleBody,
    params(("id" = String, Path, description = "`tenant`, or `host:<source host>`")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:operate"])))]
/// Lower a rate limit for a while (audited); it returns to its configured rate by itself.
pub async fn throttle(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<ThrottleBody>,
) -> Result<Response, ApiError> {
    p.require(&[OPERATE])?;
    let scope = p.scope();
    let tenant = p.write_tenant()?;
    let key = id.clone();
    let current = st
        .blocking(move |s| s.settings(&scope, SettingKind::RateLimit))
        .await?
        .into_iter()
        .find(|s| s.tenant == tenant && s.id == key)
        .ok_or_else(|| ApiError::not_found("no such rate limit: set one before throttling it"))?;
    let mut doc: RateLimitDoc = serde_json::from_value(current.doc).map_err(|e| ApiError::internal(e.to_string()))?;
    if b.reason.trim().is_empty() {
        return Err(ApiError::invalid("a throttle needs a reason").with_details(json!({"field": "reason"})));
    }
    doc.throttle(b.rate_per_s, b.seconds.saturating_mul(1000), st.clock.now()).map_err(|(what, message)| {
        let field = if what == "rate" { "rate_per_s" } else { "seconds" };
        ApiError::invalid(message).with_details(json!({ "field": field }))
    })?;
    let doc = serde_json::to_value(doc).expect("encodes");
    let why = ReasonBody { reason: Some(b.reason), ticket: b.ticket };
    change_setting(&st, &p, change(&p, SettingKind::RateLimit, id, doc, why)?, false).await
}

/// A concurrency limit.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyBody {
    /// Most jobs running at once, across all workers.
    pub max: u64,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
    /// The change ticket.
    #[serde(default)]
    pub ticket: Option<String>,
}

#[utoipa::path(put, path = "/api/v1/concurrency/{target}", tag = "flow", request_body = ConcurrencyBody,
    params(("target" = String, Path, description = "`queue:<type>` or `source:<source>`")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Limit how many jobs of a type or source run at once (audited).
pub async fn put_concurrency(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<ConcurrencyBody>,
) -> Result<Response, ApiError> {
    p.require(&[ADMIN])?;
    if target(&id)? == Target::Tenant {
        return Err(ApiError::invalid("a tenant's running jobs are limited by its quota (`max_active` of `*`)"));
    }
    let why = ReasonBody { reason: b.reason, ticket: b.ticket };
    change_setting(&st, &p, change(&p, SettingKind::Concurrency, id, json!({"max": b.max}), why)?, false).await
}

#[utoipa::path(post, path = "/api/v1/pauses/{target}", tag = "flow", request_body(content = Option<ReasonBody>, description = "Optional"),
    params(("target" = String, Path, description = "`tenant`, `queue:<type>` or `source:<source>`")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:operate"])))]
/// Pause: nothing of the target is claimed until it is resumed (audited).
pub async fn pause(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    MaybeJson(b): MaybeJson<ReasonBody>,
) -> Result<Response, ApiError> {
    p.require(&[OPERATE])?;
    target(&id)?;
    let doc = json!({"since": st.clock.now()});
    change_setting(&st, &p, change(&p, SettingKind::Pause, id, doc, b.unwrap_or_default())?, false).await
}

#[utoipa::path(delete, path = "/api/v1/pauses/{target}", tag = "flow", request_body(content = Option<ReasonBody>, description = "Optional"),
    params(("target" = String, Path, description = "`tenant`, `queue:<type>` or `source:<source>`")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:operate"])))]
/// Resume a paused target (audited).
pub async fn resume(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    MaybeJson(b): MaybeJson<ReasonBody>,
) -> Result<Response, ApiError> {
    p.require(&[OPERATE])?;
    target(&id)?;
    change_setting(&st, &p, change(&p, SettingKind::Pause, id, Value::Null, b.unwrap_or_default())?, true).await
}

/// A blackout window.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"window": {"kind": "recurring", "cron": "0 2 * * *", "duration_ms": 3600000, "tz": "Europe/Paris"}, "source": "nvd", "reason": "upstream maintenance window"}))]
pub struct BlackoutBody {
    /// `{"kind": "once", "from", "to"}` or `{"kind": "recurring", "cron", "duration_ms", "tz"}`.
    #[schema(value_type = Object)]
    pub window: Blackout,
    /// Only this job type.
    #[serde(default)]
    pub queue: Option<String>,
    /// Only this source.
    #[serde(default)]
    pub source: Option<String>,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
    /// The change ticket.
    #[serde(default)]
    pub ticket: Option<String>,
}

#[utoipa::path(put, path = "/api/v1/blackouts/{name}", tag = "flow", request_body = BlackoutBody,
    params(("name" = String, Path, description = "The blackout's name")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:operate"])))]
/// Create or replace a blackout: nothing it covers is dispatched inside its windows (audited).
pub async fn put_blackout(
    State(st): State<AppState>,
    p: Principal,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<BlackoutBody>,
) -> Result<Response, ApiError> {
    p.require(&[OPERATE])?;
    b.window.validate().map_err(|e| ApiError::invalid(e.to_string()).with_details(json!({"field": "window"})))?;
    let doc =
        serde_json::to_value(BlackoutDoc { window: b.window, queue: b.queue, source: b.source }).expect("encodes");
    let why = ReasonBody { reason: b.reason, ticket: b.ticket };
    change_setting(&st, &p, change(&p, SettingKind::Blackout, name, doc, why)?, false).await
}

/// The setting kinds listed at `GET /api/v1/{kind}`.
fn listed(kind: &str) -> Result<SettingKind, ApiError> {
    match kind {
        "rate-limits" => Ok(SettingKind::RateLimit),
        "concurrency" => Ok(SettingKind::Concurrency),
        "pauses" => Ok(SettingKind::Pause),
        "blackouts" => Ok(SettingKind::Blackout),
        "schedules" => Ok(SettingKind::Schedule),
        _ => Err(ApiError::not_found("no such endpoint")),
    }
}

/// Removes a setting of the caller's tenant (audited); one that does not exist is a 404.
async fn remove(
    st: &AppState,
    p: &Principal,
    kind: SettingKind,
    scope: &'static str,
    id: String,
    why: Option<ReasonBody>,
) -> Result<Response, ApiError> {
    p.require(&[scope])?;
    change_setting(st, p, change(p, kind, id, Value::Null, why.unwrap_or_default())?, true).await
}

#[utoipa::path(delete, path = "/api/v1/rate-limits/{id}", tag = "flow", request_body(content = Option<ReasonBody>, description = "Optional"),
    params(("id" = String, Path, description = "`tenant`, or `host:<source host>`")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Remove a rate limit (audited).
pub async fn delete_rate_limit(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    MaybeJson(b): MaybeJson<ReasonBody>,
) -> Result<Response, ApiError> {
    remove(&st, &p, SettingKind::RateLimit, ADMIN, id, b).await
}

#[utoipa::path(delete, path = "/api/v1/concurrency/{target}", tag = "flow", request_body(content = Option<ReasonBody>, description = "Optional"),
    params(("target" = String, Path, description = "`queue:<type>` or `source:<source>`")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Remove a concurrency limit (audited).
pub async fn delete_concurrency(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    MaybeJson(b): MaybeJson<ReasonBody>,
) -> Result<Response, ApiError> {
    remove(&st, &p, SettingKind::Concurrency, ADMIN, id, b).await
}

#[utoipa::path(delete, path = "/api/v1/blackouts/{name}", tag = "flow", request_body(content = Option<ReasonBody>, description = "Optional"),
    params(("name" = String, Path, description = "The blackout's name")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:operate"])))]
/// Remove a blackout (audited).
pub async fn delete_blackout(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    MaybeJson(b): MaybeJson<ReasonBody>,
) -> Result<Response, ApiError> {
    remove(&st, &p, SettingKind::Blackout, OPERATE, id, b).await
}

#[utoipa::path(delete, path = "/api/v1/schedules/{name}", tag = "flow", request_body(content = Option<ReasonBody>, description = "Optional"),
    params(("name" = String, Path, description = "The schedule's name")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Remove a schedule and its cursor (audited).
pub async fn delete_schedule(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    MaybeJson(b): MaybeJson<ReasonBody>,
) -> Result<Response, ApiError> {
    remove(&st, &p, SettingKind::Schedule, ADMIN, id, b).await
}

#[utoipa::path(get, path = "/api/v1/{kind}", tag = "flow",
    params(("kind" = String, Path, description = "`rate-limits`, `concurrency`, `pauses`, `blackouts` or `schedules`")),
    responses((status = 200, body = SettingList), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// List rate limits, concurrency limits, pauses, blackouts or schedules.
pub async fn list(State(st): State<AppState>, p: Principal, Path(kind): Path<String>) -> Result<Response, ApiError> {
    Ok(list_settings(&st, &p, listed(&kind)?).await?.into_response())
}

/// The live state of flow control.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlowOut {
    /// Token buckets in use.
    #[schema(value_type = Vec<Object>)]
    pub buckets: Vec<crate::flow::BucketView>,
    /// Circuit breakers of source hosts.
    #[schema(value_type = Vec<Object>)]
    pub breakers: Vec<crate::flow::BreakerView>,
    /// Blackouts in force now: tenant, name, end.
    #[schema(value_type = Vec<Object>)]
    pub blackouts: Vec<Value>,
}

#[utoipa::path(get, path = "/api/v1/flow", tag = "flow",
    responses((status = 200, body = FlowOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// Bucket levels and refill rates, breaker states and active blackouts.
pub async fn state(State(st): State<AppState>, p: Principal) -> Result<Json<FlowOut>, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    Ok(Json(crate::flow::view(&st, |f, now| FlowOut {
        buckets: f.buckets(&scope, now),
        breakers: f.breakers(&scope),
        blackouts: f
            .active_blackouts(&scope, now)
            .into_iter()
            .map(|(tenant, name, until)| json!({"tenant": tenant, "name": name, "until": until}))
            .collect(),
    })))
}

#[utoipa::path(get, path = "/api/v1/throttles", tag = "flow", params(PageParams),
    responses((status = 200, description = "Throttle records (the lines of `throttles.jsonl`), oldest first"), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// Rate-limit decisions, bucket and breaker changes.
pub async fn throttles(
    State(st): State<AppState>,
    p: Principal,
    uri: Uri,
    Query(q): Query<PageParams>,
) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let page = q.page()?;
    let scope = p.scope();
    let page = st.blocking(move |s| s.throttles(&scope, page)).await?;
    Ok(paged(&uri, page.items, page.next_after))
}

/// Which dead-lettered jobs to retry.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryDeadBody {
    /// Only this job type (default: every type).
    #[serde(default)]
    pub queue: Option<String>,
    /// At most this many (default 1000, at most 100000).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Why (recorded on each job's `job.retried` event).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Jobs retried.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetriedOut {
    /// How many.
    pub retried: usize,
    /// Their ids.
    pub ids: Vec<JobId>,
}

#[utoipa::path(post, path = "/api/v1/jobs/retry", tag = "jobs", request_body = RetryDeadBody,
    responses((status = 200, body = RetriedOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:operate"])))]
/// Retry dead-lettered jobs: all of them, or those of a job type.
pub async fn retry_dead(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(b): ApiJson<RetryDeadBody>,
) -> Result<Json<RetriedOut>, ApiError> {
    p.require(&[OPERATE])?;
    let limit = super::extract::limit(b.limit, 1000, 100_000)?;
    let (scope, actor) = (p.scope(), p.actor.clone());
    let jobs = st.blocking(move |s| s.retry_dead(&scope, b.queue.as_deref(), &actor, b.reason, limit)).await?;
    Ok(Json(RetriedOut { retried: jobs.len(), ids: jobs.iter().map(|j| j.id).collect() }))
}

/// One job of a DAG run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunJobBody {
    /// Its name within the run (what `depends_on` refers to).
    pub key: String,
    /// Job type.
    pub queue: String,
    /// Source.
    #[serde(default)]
    pub source: Option<String>,
    /// Input.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Priority.
    #[serde(default)]
    pub priority: i32,
    /// Attempts before dead-lettering.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Keys of jobs of this run that must succeed first.
    #[serde(default)]
    pub depends_on: Vec<String>,
}

/// A run of jobs with dependencies.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"jobs": [
    {"key": "fetch", "queue": "ingest"},
    {"key": "parse-a", "queue": "parse", "depends_on": ["fetch"]},
    {"key": "parse-b", "queue": "parse", "depends_on": ["fetch"]},
    {"key": "merge", "queue": "merge", "depends_on": ["parse-a", "parse-b"]}],
    "on_parent_failure": "cancel"}))]
pub struct RunBody {
    /// Project (default `default`).
    #[serde(default)]
    pub project: Option<String>,
    /// The jobs, 1 to 1000, in any order.
    pub jobs: Vec<RunJobBody>,
    /// What a dead-lettered or cancelled parent does to its descendants: `block` (default;
    /// they wait for it to be retried) or `cancel`.
    #[serde(default)]
    #[schema(value_type = String)]
    pub on_parent_failure: ParentFailure,
}

/// A started run.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunStarted {
    /// The run.
    pub run: RunOut,
    /// Job id by key.
    pub jobs: BTreeMap<String, JobId>,
}

#[utoipa::path(post, path = "/api/v1/runs", tag = "runs", request_body = RunBody,
    responses((status = 201, body = RunStarted), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:work"])))]
/// Start a run of jobs with dependencies (a DAG). A job becomes claimable once all its
/// parents succeeded; a cycle is refused with `422 dag_cycle` naming it.
pub async fn start_run(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(b): ApiJson<RunBody>,
) -> Result<Response, ApiError> {
    p.require(&[WORK])?;
    if b.jobs.is_empty() || b.jobs.len() > 1000 {
        return Err(ApiError::invalid("a run holds 1 to 1000 jobs"));
    }
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for j in &b.jobs {
        if edges.insert(j.key.clone(), j.depends_on.clone()).is_some() {
            return Err(ApiError::invalid(format!("job key {:?} is used twice", j.key)));
        }
    }
    for j in &b.jobs {
        if let Some(missing) = j.depends_on.iter().find(|d| !edges.contains_key(*d)) {
            return Err(ApiError::invalid(format!("job {:?} depends on {missing:?}, which is not in the run", j.key))
                .with_details(json!({"job": j.key, "missing": missing})));
        }
    }
    let order = orch_core::dag::topo_order(&edges).map_err(|cycle| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "dag_cycle",
            format!("the jobs form a cycle: {}", cycle.join(" -> ")),
        )
        .with_details(json!({"cycle": cycle}))
    })?;
    let tenant = p.write_tenant()?;
    let project = b.project.unwrap_or_else(|| "default".into());
    let mut by_key: BTreeMap<String, RunJobBody> = b.jobs.into_iter().map(|j| (j.key.clone(), j)).collect();
    let index: BTreeMap<String, usize> = order.iter().enumerate().map(|(i, k)| (k.clone(), i)).collect();
    let jobs: Vec<NewJob> = order
        .iter()
        .map(|k| {
            let j = by_key.remove(k).expect("every key is a job");
            NewJob {
                source: j.source,
                priority: j.priority,
                max_attempts: j.max_attempts,
                depends_on: j.depends_on.iter().map(|d| Dep::Earlier(index[d])).collect(),
                on_parent_failure: b.on_parent_failure,
                ..NewJob::new(&tenant, &project, &j.queue, if j.payload.is_null() { json!({}) } else { j.payload })
            }
        })
        .collect();
    let run = NewRun {
        tenant,
        project,
        kind: "dag".into(),
        params: json!({"jobs": order, "on_parent_failure": b.on_parent_failure}),
        reason: None,
        ticket: None,
    };
    let actor = p.actor.clone();
    let (run, enqueued) = st.blocking(move |s| s.start_run(&actor, run, jobs)).await?;
    let jobs = order.into_iter().zip(enqueued).map(|(k, e)| (k, e.job.id)).collect();
    Ok((StatusCode::CREATED, Json(RunStarted { run: run.into(), jobs })).into_response())
}

#[utoipa::path(post, path = "/api/v1/runs/{id}/replay", tag = "runs", request_body(content = Option<ReasonBody>, description = "Optional"),
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 201, body = RunStarted), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:operate"])))]
/// Replay a run: a new run with the same jobs and dependencies, from the start (audited as
/// `replay.started`, naming the original).
pub async fn replay(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
    MaybeJson(b): MaybeJson<ReasonBody>,
) -> Result<Response, ApiError> {
    p.require(&[OPERATE])?;
    let b = b.unwrap_or_default();
    let (scope, actor) = (p.scope(), p.actor.clone());
    let (run, enqueued) = st.blocking(move |s| replay_run(s, &scope, &actor, id, b.reason, b.ticket)).await?;
    let jobs = enqueued.into_iter().map(|(old, new)| (old.to_string(), new)).collect();
    Ok((StatusCode::CREATED, Json(RunStarted { run: run.into(), jobs })).into_response())
}

/// Starts a copy of run `id`: its jobs (in id order, so parents come first) with the same
/// specs and dependencies among them. Returns the new run and (old id, new id) pairs. Shared
/// by the API and `orchd replay`.
pub fn replay_run(
    s: &dyn orch_store::Store,
    scope: &orch_store::Scope,
    actor: &str,
    id: i64,
    reason: Option<String>,
    ticket: Option<String>,
) -> Result<(orch_store::Run, Vec<(JobId, JobId)>), orch_store::StoreError> {
    let original = s.run(scope, id)?;
    let mut jobs: Vec<Job> = Vec::new();
    let mut page = PageRequest { after: 0, limit: 1000 };
    loop {
        let filter = JobFilter { run: Some(id), ..Default::default() };
        let p = s.jobs(scope, &filter, page)?;
        jobs.extend(p.items);
        match p.next_after {
            Some(a) => page.after = a,
            None => break,
        }
    }
    jobs.sort_by_key(|j| j.id);
    let index: BTreeMap<JobId, usize> = jobs.iter().enumerate().map(|(i, j)| (j.id, i)).collect();
    let new_jobs = jobs
        .iter()
        .map(|j| NewJob {
            source: j.spec.source.clone(),
            priority: j.spec.priority,
            max_attempts: Some(j.spec.max_attempts),
            depends_on: j
                .spec
                .depends_on
                .iter()
                .map(|d| index.get(d).map_or(Dep::Job(*d), |i| Dep::Earlier(*i)))
                .collect(),
            on_parent_failure: j.spec.on_parent_failure,
            ..NewJob::new(&j.tenant, &j.project, &j.spec.queue, j.spec.payload.clone())
        })
        .collect();
    let run = NewRun {
        tenant: original.tenant.clone(),
        project: original.project.clone(),
        kind: "replay".into(),
        params: json!({"of": id, "kind": original.kind, "params": original.params}),
        reason,
        ticket,
    };
    let (run, enqueued) = s.start_run(actor, run, new_jobs)?;
    Ok((run, jobs.iter().zip(enqueued).map(|(o, e)| (o.id, e.job.id)).collect()))
}

/// A cron schedule.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"cron": "*/15 * * * *", "tz": "Europe/Paris", "overlap": "skip", "max_catch_up": 3,
    "job": {"queue": "ingest", "source": "nvd", "payload": {"feed": "recent"}}}))]
pub struct ScheduleBody {
    /// A cron expression (5 fields, or 6-7 with seconds).
    pub cron: String,
    /// IANA time zone (default `UTC`).
    #[serde(default = "utc")]
    pub tz: String,
    /// When the previous firing's job has not finished: `skip` (default), `queue` or
    /// `cancel_previous`.
    #[serde(default)]
    #[schema(value_type = String)]
    pub overlap: OverlapPolicy,
    /// Missed firings (the daemon was down) enqueued at most, the most recent ones.
    #[serde(default = "one")]
    pub max_catch_up: usize,
    /// The job each firing enqueues; its payload gains `scheduled_for`.
    #[schema(value_type = Object)]
    pub job: ScheduleJob,
    /// Why.
    #[serde(default, skip_serializing)]
    pub reason: Option<String>,
    /// The change ticket.
    #[serde(default, skip_serializing)]
    pub ticket: Option<String>,
}

/// The job template of a schedule.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleJob {
    /// Job type.
    pub queue: String,
    /// Project (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Input.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Priority.
    #[serde(default)]
    pub priority: i32,
    /// Attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

fn utc() -> String {
    "UTC".into()
}

fn one() -> usize {
    1
}

#[utoipa::path(put, path = "/api/v1/schedules/{name}", tag = "flow", request_body = ScheduleBody,
    params(("name" = String, Path, description = "The schedule's name")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Create or replace a cron schedule that enqueues a job from a template (audited).
pub async fn put_schedule(
    State(st): State<AppState>,
    p: Principal,
    Path(name): Path<String>,
    ApiJson(mut b): ApiJson<ScheduleBody>,
) -> Result<Response, ApiError> {
    p.require(&[ADMIN])?;
    CronSpec::parse(&b.cron, &b.tz)
        .map_err(|e| ApiError::invalid(e.to_string()).with_details(json!({"field": "cron"})))?;
    if b.max_catch_up > 1000 {
        return Err(ApiError::invalid("max_catch_up is at most 1000").with_details(json!({"field": "max_catch_up"})));
    }
    if b.job.payload.is_null() {
        b.job.payload = json!({});
    }
    if !b.job.payload.is_object() {
        return Err(
            ApiError::invalid("job.payload must be a JSON object").with_details(json!({"field": "job.payload"}))
        );
    }
    let why = ReasonBody { reason: b.reason.take(), ticket: b.ticket.take() };
    let mut doc = serde_json::to_value(&b).expect("encodes");
    doc["created_at"] = json!(st.clock.now());
    change_setting(&st, &p, change(&p, SettingKind::Schedule, name, doc, why)?, false).await
}

/// A stored schedule, as the scheduler reads it.
#[derive(Debug, Deserialize)]
pub struct StoredSchedule {
    /// Expression.
    pub cron: String,
    /// Zone.
    pub tz: String,
    /// Overlap policy.
    pub overlap: OverlapPolicy,
    /// Catch-up bound.
    pub max_catch_up: usize,
    /// Template.
    pub job: ScheduleJob,
    /// When it was made.
    pub created_at: Timestamp,
}

/// Backpressure: `429 backpressure` with `Retry-After` when enqueueing `jobs` would take a
/// tenant's queued jobs (of a type with a `max_queued` quota, or in all) past their bound.
/// Depths are counted at most every [`crate::flow::DEPTH_MAX_AGE_MS`] per bound, and moved by
/// what is enqueued in between.
pub async fn check_backpressure(st: &AppState, tenant: &str, jobs: &[NewJob]) -> Result<(), ApiError> {
    let mut per_queue: BTreeMap<Option<String>, u64> = BTreeMap::new();
    for j in jobs {
        *per_queue.entry(Some(j.queue.clone())).or_default() += 1;
    }
    let total: u64 = per_queue.values().sum();
    let (checks, retry_after) = crate::flow::view(st, |f, _| {
        let mut checks: Vec<(Option<String>, u64, u64)> = per_queue
            .iter()
            .filter_map(|(q, n)| f.queue_max_queued(tenant, q.as_deref().unwrap_or("*")).map(|b| (q.clone(), b, *n)))
            .collect();
        checks.push((None, f.max_queued(tenant, "*"), total));
        (checks, f.backpressure_retry_after_s())
    });
    for (queue, bound, n) in checks {
        let queued = crate::flow::depth(st, tenant, queue.as_deref(), bound).await?;
        if queued + n > bound {
            let scope = queue.map_or_else(|| format!("tenant {tenant}"), |q| format!("job type {q}"));
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "backpressure",
                format!("{scope} has {queued} queued jobs; the bound is {bound}: retry later"),
            )
            .with_details(json!({"queued": queued, "bound": bound, "retry_after_s": retry_after, "scope": scope})));
        }
        crate::flow::add_depth(st, tenant, queue.as_deref(), n);
    }
    Ok(())
}

/// Which incidents to list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct IncidentQuery {
    /// `open`, `closed` or `all` (default).
    pub state: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// Opaque cursor from a previous page's `next_cursor`.
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/incidents", tag = "flow", params(IncidentQuery),
    responses((status = 200, description = "Incidents, newest first: `{items: [{id, tenant, kind, key, opened_at, closed_at, details}], next_cursor}`"), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// Incidents: jobs stuck, breakers open, hosts throttled for long. Each opens when its
/// condition starts and closes when it clears.
pub async fn incidents(
    State(st): State<AppState>,
    p: Principal,
    uri: Uri,
    Query(q): Query<IncidentQuery>,
) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let open = match q.state.as_deref() {
        None | Some("all") => None,
        Some("open") => Some(true),
        Some("closed") => Some(false),
        Some(other) => {
            return Err(ApiError::invalid(format!("state must be open, closed or all, not {other:?}"))
                .with_details(json!({"field": "state"})))
        }
    };
    let page = PageParams { limit: q.limit, cursor: q.cursor }.page()?;
    let scope = p.scope();
    let page = st.blocking(move |s| s.incidents(&scope, open, page)).await?;
    Ok(paged(&uri, page.items, page.next_after))
}
