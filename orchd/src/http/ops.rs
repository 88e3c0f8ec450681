//! The rest of the operator API: history, runs, sources, quotas and backfills. Quota and
//! backfill changes need `reason` and `ticket`; with the actor they land in the audit history.

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use orch_core::{Event, Timestamp};
use orch_store::{HistoryFilter, NewJob, NewRun, Run, SettingChange, SettingKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Principal, ADMIN, BACKFILL, QUOTA, READ};
use super::error::{ApiError, ErrorEnvelope};
use super::extract::{paged, ApiJson, PageParams};
use super::jobs::time_param;
use super::openapi::refs;
use crate::AppState;

/// Filters for the history.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Events of one job.
    pub job_id: Option<i64>,
    /// Events of one type, e.g. `job.failed`, `audit`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// At or after (RFC 3339).
    pub since: Option<String>,
    /// Before (RFC 3339).
    pub before: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
}

/// A page of history events.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    /// Events by ascending sequence number.
    #[schema(schema_with = refs::events)]
    pub items: Vec<Event>,
    /// Cursor of the next page; absent on the last.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/history", tag = "history", params(HistoryQuery),
    responses((status = 200, body = EventPage), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// The hash-chained history (the lines of `history.jsonl`), with filters and cursor pagination.
pub async fn history(
    State(st): State<AppState>,
    p: Principal,
    uri: Uri,
    q: Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let q = q.0;
    let page = PageParams { limit: q.limit, cursor: q.cursor.clone() }.page()?;
    let filter = HistoryFilter {
        job_id: q.job_id,
        event_type: q.event_type,
        correlation_id: q.correlation_id,
        since: time_param("since", &q.since)?,
        before: time_param("before", &q.before)?,
    };
    let scope = p.scope();
    let page = st.blocking(move |s| s.history(&scope, &filter, page)).await?;
    Ok(paged(&uri, page.items, page.next_after))
}

/// A run: the jobs one operation made.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunOut {
    /// Its id.
    pub id: i64,
    /// The tenant.
    pub tenant: String,
    /// The project.
    pub project: String,
    /// What made it, e.g. `backfill`.
    pub kind: String,
    /// Who started it.
    pub created_by: String,
    /// When.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// Its parameters.
    #[schema(value_type = Object)]
    pub params: Value,
    /// Why.
    pub reason: Option<String>,
    /// The change ticket.
    pub ticket: Option<String>,
    /// `active`, `completed` or `failed`.
    pub state: String,
    /// Its jobs by state.
    pub jobs: std::collections::BTreeMap<String, u64>,
}

impl From<Run> for RunOut {
    fn from(r: Run) -> RunOut {
        RunOut {
            id: r.id,
            tenant: r.tenant,
            project: r.project,
            kind: r.kind,
            created_by: r.created_by,
            created_at: r.created_at,
            params: r.params,
            reason: r.reason,
            ticket: r.ticket,
            state: r.state,
            jobs: r.jobs,
        }
    }
}

/// A page of runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunPage {
    /// Runs by ascending id.
    pub items: Vec<RunOut>,
    /// Cursor of the next page; absent on the last.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/runs", tag = "runs", params(PageParams),
    responses((status = 200, body = RunPage), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// List runs.
pub async fn runs(
    State(st): State<AppState>,
    p: Principal,
    uri: Uri,
    q: Query<PageParams>,
) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let page = q.0.page()?;
    let scope = p.scope();
    let page = st.blocking(move |s| s.runs(&scope, page)).await?;
    Ok(paged(&uri, page.items.into_iter().map(RunOut::from).collect(), page.next_after))
}

#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs", params(("id" = i64, Path, description = "Run id")),
    responses((status = 200, body = RunOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// One run with its job counts.
pub async fn run(State(st): State<AppState>, p: Principal, Path(id): Path<i64>) -> Result<Json<RunOut>, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    Ok(Json(st.blocking(move |s| s.run(&scope, id)).await?.into()))
}

/// A source: an upstream feed; its host keys rate limits and breakers.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"host": "services.nvd.nist.gov", "config": {"kind": "nvd"}}))]
pub struct SourceBody {
    /// The upstream host.
    pub host: String,
    /// Free-form settings for workers.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub config: Option<Value>,
    /// Why (recorded in the history).
    #[serde(default)]
    pub reason: Option<String>,
}

/// A setting (a source or a quota).
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingOut {
    /// The tenant.
    pub tenant: String,
    /// Its id (a source id, a job type or `*`).
    pub id: String,
    /// Its value.
    #[schema(value_type = Object)]
    pub value: Value,
}

/// Settings of one kind.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingList {
    /// By tenant and id.
    pub items: Vec<SettingOut>,
}

/// The result of an audited change.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangeOut {
    /// The setting as it now is.
    pub setting: SettingOut,
    /// The audit event that records the change.
    #[schema(schema_with = refs::event)]
    pub audit: Event,
}

pub(super) async fn list_settings(
    st: &AppState,
    p: &Principal,
    kind: SettingKind,
) -> Result<Json<SettingList>, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let items = st.blocking(move |s| s.settings(&scope, kind)).await?;
    Ok(Json(SettingList {
        items: items.into_iter().map(|s| SettingOut { tenant: s.tenant, id: s.id, value: s.doc }).collect(),
    }))
}

/// Applies an audited setting change (`delete`: removes it) and has flow control re-read its
/// rules before answering, so the change holds for the next claim.
pub(super) async fn change_setting(
    st: &AppState,
    p: &Principal,
    change: SettingChange,
    delete: bool,
) -> Result<Response, ApiError> {
    let setting = SettingOut { tenant: change.tenant.clone(), id: change.id.clone(), value: change.doc.clone() };
    let actor = p.actor.clone();
    let audit = st
        .blocking(move |s| if delete { s.delete_setting(&actor, change) } else { s.put_setting(&actor, change) })
        .await?;
    crate::flow::reload(st).await?;
    Ok((StatusCode::OK, Json(ChangeOut { setting, audit })).into_response())
}

async fn put_setting(st: &AppState, p: &Principal, change: SettingChange) -> Result<Response, ApiError> {
    change_setting(st, p, change, false).await
}

#[utoipa::path(get, path = "/api/v1/sources", tag = "sources",
    responses((status = 200, body = SettingList), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// List sources.
pub async fn sources(State(st): State<AppState>, p: Principal) -> Result<Json<SettingList>, ApiError> {
    list_settings(&st, &p, SettingKind::Source).await
}

#[utoipa::path(get, path = "/api/v1/sources/{id}", tag = "sources", params(("id" = String, Path, description = "Source id")),
    responses((status = 200, body = SettingOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// One source.
pub async fn source(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<SettingOut>, ApiError> {
    let Json(list) = list_settings(&st, &p, SettingKind::Source).await?;
    list.items.into_iter().find(|s| s.id == id).map(Json).ok_or_else(|| ApiError::not_found("source not found"))
}

#[utoipa::path(put, path = "/api/v1/sources/{id}", tag = "sources", request_body = SourceBody,
    params(("id" = String, Path, description = "Source id"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first response to the same key and body")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Create or replace a source (audited).
pub async fn put_source(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SourceBody>,
) -> Result<Response, ApiError> {
    p.require(&[ADMIN])?;
    let doc = json!({ "host": body.host, "config": body.config.unwrap_or_else(|| json!({})) });
    let change = SettingChange {
        tenant: p.write_tenant()?,
        project: "default".into(),
        kind: SettingKind::Source,
        id,
        doc,
        reason: body.reason,
        ticket: None,
    };
    put_setting(&st, &p, change).await
}

/// Limits for a job type (or `*`: the whole tenant). Enforced at claim and enqueue time by the
/// flow-control layer.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"max_active": 20, "max_queued": 10000, "max_per_hour": 5000, "reason": "NVD mirror backlog", "ticket": "CHG-1042"}))]
pub struct QuotaBody {
    /// Most jobs running at once.
    #[serde(default)]
    pub max_active: Option<u64>,
    /// Most jobs waiting.
    #[serde(default)]
    pub max_queued: Option<u64>,
    /// Most jobs started per hour.
    #[serde(default)]
    pub max_per_hour: Option<u64>,
    /// Why (required).
    #[serde(default)]
    pub reason: Option<String>,
    /// The change ticket (required).
    #[serde(default)]
    pub ticket: Option<String>,
}

/// 422 unless both `reason` and `ticket` are present and non-empty.
pub(super) fn require_reason_ticket(
    reason: &Option<String>,
    ticket: &Option<String>,
) -> Result<(String, String), ApiError> {
    let present = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
    match (present(reason), present(ticket)) {
        (Some(r), Some(t)) => Ok((r, t)),
        (r, t) => {
            let missing: Vec<&str> = [("reason", r.is_none()), ("ticket", t.is_none())]
                .into_iter()
                .filter(|(_, m)| *m)
                .map(|(f, _)| f)
                .collect();
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "reason_required",
                format!("this operation is audited: give {}", missing.join(" and ")),
            )
            .with_details(json!({ "missing": missing })))
        }
    }
}

#[utoipa::path(get, path = "/api/v1/quotas", tag = "quotas",
    responses((status = 200, body = SettingList), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// List quotas.
pub async fn quotas(State(st): State<AppState>, p: Principal) -> Result<Json<SettingList>, ApiError> {
    list_settings(&st, &p, SettingKind::Quota).await
}

#[utoipa::path(put, path = "/api/v1/quotas/{queue}", tag = "quotas", request_body = QuotaBody,
    params(("queue" = String, Path, description = "Job type, or `*` for the whole tenant"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first response to the same key and body")),
    responses((status = 200, body = ChangeOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:quota"])))]
/// Set a quota (needs `reason` and `ticket`; audited).
pub async fn put_quota(
    State(st): State<AppState>,
    p: Principal,
    Path(queue): Path<String>,
    ApiJson(body): ApiJson<QuotaBody>,
) -> Result<Response, ApiError> {
    p.require(&[QUOTA])?;
    let (reason, ticket) = require_reason_ticket(&body.reason, &body.ticket)?;
    let doc =
        json!({ "max_active": body.max_active, "max_queued": body.max_queued, "max_per_hour": body.max_per_hour });
    let change = SettingChange {
        tenant: p.write_tenant()?,
        project: "default".into(),
        kind: SettingKind::Quota,
        id: queue,
        doc,
        reason: Some(reason),
        ticket: Some(ticket),
    };
    put_setting(&st, &p, change).await
}

/// A backfill: one job per event-time window of `[from, to)`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"queue": "ingest", "source": "nvd", "from": "2026-10-01T00:00:00Z", "to": "2026-10-31T00:00:00Z", "window_seconds": 86400, "reason": "NVD outage 2026-10", "ticket": "INC-778"}))]
pub struct BackfillBody {
    /// Project (default `default`).
    #[serde(default)]
    pub project: Option<String>,
    /// Job type of the window jobs.
    pub queue: String,
    /// Source the windows are read from.
    #[serde(default)]
    pub source: Option<String>,
    /// Start of the first window (inclusive).
    #[schema(value_type = String, format = DateTime)]
    pub from: Timestamp,
    /// End of the last window (exclusive).
    #[schema(value_type = String, format = DateTime)]
    pub to: Timestamp,
    /// Window length.
    pub window_seconds: u64,
    /// Merged into each job's payload beside `window_start` and `window_end`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
    /// Priority of the window jobs.
    #[serde(default)]
    pub priority: i32,
    /// Only show the plan.
    #[serde(default)]
    pub dry_run: bool,
    /// Enqueue windows whose job already succeeded again (default: they are skipped).
    #[serde(default)]
    pub rerun_complete: bool,
    /// Why (required).
    #[serde(default)]
    pub reason: Option<String>,
    /// The change ticket (required).
    #[serde(default)]
    pub ticket: Option<String>,
}

/// One event-time window.
#[derive(Debug, Serialize, ToSchema)]
pub struct Window {
    /// Inclusive start.
    #[schema(value_type = String, format = DateTime)]
    pub start: Timestamp,
    /// Exclusive end.
    #[schema(value_type = String, format = DateTime)]
    pub end: Timestamp,
    /// `new` (a job is made), `pending` (an earlier backfill's job has not succeeded yet: left
    /// alone), `complete` (its job succeeded: skipped unless `rerun_complete`), or `rerun`.
    pub status: String,
    /// The window's job, when one exists already.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<i64>,
}

/// What a backfill did (or, for a dry run, would do).
#[derive(Debug, Serialize, ToSchema)]
pub struct BackfillOut {
    /// The run grouping the window jobs (absent for a dry run).
    pub run: Option<RunOut>,
    /// The windows.
    pub windows: Vec<Window>,
    /// Jobs made now (0 for a dry run).
    pub enqueued: usize,
    /// Windows left as they are because an earlier backfill's job covers them (complete or
    /// pending).
    pub existing: usize,
    /// The source's watermark for this job type: the end of the latest window such that it and
    /// every window before it (from `from`) succeeded.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub watermark: Option<Timestamp>,
}

/// The most windows one backfill may make.
const MAX_WINDOWS: u64 = 10_000;

#[utoipa::path(post, path = "/api/v1/backfills", tag = "backfills", request_body = BackfillBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response to the same key and body")),
    responses((status = 201, body = BackfillOut), (status = 200, description = "Dry run: the plan", body = BackfillOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:backfill"])))]
/// Start a backfill (needs `reason` and `ticket`; audited). A window whose job an earlier
/// backfill made is not enqueued again.
pub async fn backfill(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(b): ApiJson<BackfillBody>,
) -> Result<Response, ApiError> {
    p.require(&[BACKFILL])?;
    let (reason, ticket) = require_reason_ticket(&b.reason, &b.ticket)?;
    if b.window_seconds == 0 || b.to <= b.from {
        return Err(ApiError::invalid("a backfill needs from < to and window_seconds >= 1"));
    }
    let step = b.window_seconds.saturating_mul(1000);
    let span = (b.to.as_millis() - b.from.as_millis()) as u64;
    if span.div_ceil(step) > MAX_WINDOWS {
        return Err(ApiError::invalid(format!("a backfill makes at most {MAX_WINDOWS} windows")));
    }
    if b.payload.as_ref().is_some_and(|v| !v.is_object()) {
        return Err(ApiError::invalid("payload must be a JSON object").with_details(json!({"field": "payload"})));
    }
    let tenant = p.write_tenant()?;
    let source_key = b.source.clone().unwrap_or_else(|| "-".into());
    let spans: Vec<(Timestamp, Timestamp)> = (0..span.div_ceil(step))
        .map(|i| {
            let start = b.from.plus_millis((i * step) as i64);
            (start, start.plus_millis(step as i64).min(b.to))
        })
        .collect();
    // A window's job is found by its key; a window is complete when that job succeeded.
    let key = |(start, end): (Timestamp, Timestamp)| format!("backfill:{}:{source_key}:{start}:{end}", b.queue);
    let keys: Vec<String> = spans.iter().map(|w| key(*w)).collect();
    let t = tenant.clone();
    let found: Vec<Option<orch_core::Job>> =
        st.blocking(move |s| keys.iter().map(|k| s.job_by_key(&t, k)).collect()).await?;
    let now = st.clock.now();
    let mut watermark = None;
    let mut leading = true;
    let mut windows = Vec::with_capacity(spans.len());
    let mut jobs = Vec::new();
    for ((start, end), job) in spans.into_iter().zip(found) {
        let done = job.as_ref().is_some_and(|j| j.state == orch_core::JobState::Succeeded);
        leading &= done;
        if leading {
            watermark = Some(end);
        }
        let status = match (&job, done) {
            (None, _) => "new",
            (Some(_), true) if b.rerun_complete => "rerun",
            (Some(_), true) => "complete",
            (Some(_), false) => "pending",
        };
        if matches!(status, "new" | "rerun") {
            let mut payload = b.payload.clone().unwrap_or_else(|| json!({}));
            payload["window_start"] = json!(start);
            payload["window_end"] = json!(end);
            let k = key((start, end));
            let k = if status == "rerun" { format!("{k}:rerun:{}", now.as_millis()) } else { k };
            jobs.push(NewJob {
                source: b.source.clone(),
                priority: b.priority,
                idempotency_key: Some(k),
                ..NewJob::new(&tenant, b.project.as_deref().unwrap_or("default"), &b.queue, payload)
            });
        }
        windows.push(Window { start, end, status: status.into(), job: job.map(|j| j.id) });
    }
    let existing = windows.iter().filter(|w| matches!(w.status.as_str(), "complete" | "pending")).count();
    if b.dry_run {
        return Ok(Json(BackfillOut { run: None, windows, enqueued: 0, existing, watermark }).into_response());
    }
    let run = NewRun {
        tenant,
        project: b.project.unwrap_or_else(|| "default".into()),
        kind: "backfill".into(),
        params: json!({
            "queue": b.queue, "source": b.source, "from": b.from, "to": b.to, "window_seconds": b.window_seconds,
            "rerun_complete": b.rerun_complete,
        }),
        reason: Some(reason),
        ticket: Some(ticket),
    };
    let actor = p.actor.clone();
    let (run, enqueued) = st.blocking(move |s| s.start_run(&actor, run, jobs)).await?;
    let made = enqueued.iter().filter(|e| e.created).count();
    let out = BackfillOut { run: Some(run.into()), windows, enqueued: made, existing, watermark };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// How to import.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    /// Only plan.
    #[serde(default)]
    pub dry_run: bool,
    /// Accept a bundle older (anchor or trust root) than what was imported (needs reason and ticket).
    #[serde(default)]
    pub allow_rollback: bool,
    /// Why (recorded).
    pub reason: Option<String>,
    /// The change ticket (recorded).
    pub ticket: Option<String>,
}

/// The plan, and what was written when it was applied.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportOut {
    /// What the bundle does to this ledger; `status` is `new` or `already_imported`.
    #[schema(value_type = Object)]
    pub plan: crate::import::Plan,
    /// Events and jobs written, and the audit event; absent for a dry run or a no-op.
    #[schema(value_type = Option<Object>)]
    pub outcome: Option<orch_store::ImportOutcome>,
}

#[utoipa::path(post, path = "/api/v1/imports", tag = "imports", params(ImportQuery),
    request_body(content = Vec<u8>, content_type = "application/zstd", description = "A bundle (.tar.zst)"),
    responses((status = 201, description = "Imported", body = ImportOut), (status = 200, description = "Dry run, or already imported", body = ImportOut),
        (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Import a bundle from another site (site administrators): verified against the configured
/// trust root, planned, and applied in one transaction.
pub async fn import(
    State(st): State<AppState>,
    p: Principal,
    q: Query<ImportQuery>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    p.require(&[ADMIN])?;
    if p.tenant.is_some() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "imports are for site administrators (tenant *)",
        ));
    }
    let settings = st.settings.import.clone();
    let Some(root_path) = settings.root.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "import_not_configured",
            "no trust root is configured for imports (set import.root)",
        ));
    };
    let bytes = axum::body::to_bytes(body, settings.max_bundle_bytes).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the bundle is larger than import.max_bundle_bytes",
        )
    })?;
    let q = q.0;
    let now = st.clock.now();
    let actor = p.actor.clone();
    let dry_run = q.dry_run;
    let result = st
        .blocking(move |store| {
            let (root, root_chain) = orch_verify::load_roots(&root_path, settings.root_chain.as_deref())
                .map_err(|e| orch_store::StoreError::Invalid(format!("the configured trust root: {e}")))?;
            let opts = crate::import::ImportOptions {
                root,
                root_chain,
                now,
                max_age_ms: settings.max_age_ms,
                allow_rollback: q.allow_rollback,
                reason: q.reason,
                ticket: q.ticket,
            };
            Ok(crate::import::import(store, &actor, &bytes, &opts, !dry_run))
        })
        .await?;
    match result {
        Ok((plan, outcome)) => {
            let status = if outcome.is_some() { StatusCode::CREATED } else { StatusCode::OK };
            Ok((status, Json(ImportOut { plan, outcome })).into_response())
        }
        Err(crate::import::ImportError::Store(e)) => Err(e.into()),
        Err(e) => {
            let status = match e {
                crate::import::ImportError::Verify(_) | crate::import::ImportError::ReasonRequired => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                _ => StatusCode::CONFLICT,
            };
            Err(ApiError::new(status, e.code(), e.to_string()))
        }
    }
}
