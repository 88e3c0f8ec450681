//! Webhook subscriptions of the caller's tenant: create, list, delete, the delivery log, and
//! redelivering one event.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use orch_core::Timestamp;
use orch_store::{HistoryFilter, PageRequest, Scope, Webhook};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::auth::{Principal, ADMIN, READ};
use super::error::{ApiError, ErrorEnvelope};
use super::extract::ApiJson;
use crate::AppState;

/// A subscription to make.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"url": "http://10.0.0.7:9000/orch", "types": ["job.succeeded", "job.failed"], "job_type": "ingest"}))]
pub struct WebhookBody {
    /// Where events are POSTed (a host in `webhooks.allowed_hosts`).
    pub url: String,
    /// The signing secret (default: a new random one, shown once).
    #[serde(default)]
    pub secret: Option<String>,
    /// Only these event types (default: all).
    #[serde(default)]
    pub types: Option<Vec<String>>,
    /// Only this project.
    #[serde(default)]
    pub project: Option<String>,
    /// Only this job type.
    #[serde(default)]
    pub job_type: Option<String>,
}

/// A subscription.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookOut {
    /// Its id.
    pub id: i64,
    /// The tenant.
    pub tenant: String,
    /// Where events go.
    pub url: String,
    /// Its filter.
    #[schema(value_type = Object)]
    pub filter: Value,
    /// The last event sequence number resolved (delivered, dead-lettered or filtered out).
    pub cursor: u64,
    /// No attempt before this (after a failure).
    #[schema(value_type = String, format = DateTime)]
    pub next_at: Timestamp,
    /// The signing secret: only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl WebhookOut {
    fn of(h: Webhook, secret: Option<String>) -> WebhookOut {
        WebhookOut {
            id: h.id,
            tenant: h.tenant,
            url: h.url,
            filter: h.filter,
            cursor: h.cursor,
            next_at: h.next_at,
            secret,
        }
    }
}

/// Subscriptions.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    /// By id.
    pub items: Vec<WebhookOut>,
}

/// A delivery log row.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryOut {
    /// The event.
    pub seq: u64,
    /// `pending` (retrying), `delivered` or `dead`.
    pub status: String,
    /// Attempts so far.
    pub attempts: u32,
    /// The receiver's last HTTP status.
    pub last_code: Option<u16>,
    /// The last error.
    pub last_error: Option<String>,
    /// When it last changed.
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
}

impl From<orch_store::Delivery> for DeliveryOut {
    fn from(d: orch_store::Delivery) -> Self {
        DeliveryOut {
            seq: d.seq,
            status: d.status,
            attempts: d.attempts,
            last_code: d.last_code,
            last_error: d.last_error,
            updated_at: d.updated_at,
        }
    }
}

/// A delivery log.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    /// Newest first.
    pub items: Vec<DeliveryOut>,
}

#[utoipa::path(post, path = "/api/v1/webhooks", tag = "webhooks", request_body = WebhookBody,
    responses((status = 201, description = "Created; `secret` is shown only here", body = WebhookOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Subscribe a URL to the tenant's events (from now on). Each is POSTed as an Envelope with
/// `Orch-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` and `Orch-Event-Id`.
pub async fn create(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(b): ApiJson<WebhookBody>,
) -> Result<Response, ApiError> {
    p.require(&[ADMIN])?;
    let tenant = p.write_tenant()?;
    crate::hooks::check_url(&b.url, &st.settings.webhooks.allowed_hosts)
        .map_err(|e| ApiError::invalid(e).with_details(json!({"field": "url"})))?;
    let secret = b.secret.unwrap_or_else(|| format!("whsec_{:032x}", rand::random::<u128>()));
    if secret.len() < 16 {
        return Err(
            ApiError::invalid("a webhook secret needs at least 16 characters").with_details(json!({"field": "secret"}))
        );
    }
    let mut filter = serde_json::Map::new();
    if let Some(t) = b.types {
        filter.insert("types".into(), json!(t));
    }
    if let Some(v) = b.project {
        filter.insert("project".into(), json!(v));
    }
    if let Some(v) = b.job_type {
        filter.insert("job_type".into(), json!(v));
    }
    let (url, s) = (b.url, secret.clone());
    let hook = st.blocking(move |store| store.create_webhook(&tenant, &url, &s, Value::Object(filter))).await?;
    Ok((StatusCode::CREATED, Json(WebhookOut::of(hook, Some(secret)))).into_response())
}

#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookList), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// The tenant's subscriptions.
pub async fn list(State(st): State<AppState>, p: Principal) -> Result<Json<WebhookList>, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let hooks = st.blocking(move |s| s.webhooks(&scope)).await?;
    Ok(Json(WebhookList { items: hooks.into_iter().map(|h| WebhookOut::of(h, None)).collect() }))
}

#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = i64, Path, description = "Webhook id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Remove a subscription and its delivery log.
pub async fn delete(State(st): State<AppState>, p: Principal, Path(id): Path<i64>) -> Result<StatusCode, ApiError> {
    p.require(&[ADMIN])?;
    let scope = p.scope();
    st.blocking(move |s| s.delete_webhook(&scope, id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", tag = "webhooks", params(("id" = i64, Path, description = "Webhook id")),
    responses((status = 200, body = DeliveryList), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// The delivery log: every event attempted, its status and attempts.
pub async fn deliveries(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<DeliveryList>, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let items = st.blocking(move |s| s.deliveries(&scope, id, 1000)).await?;
    Ok(Json(DeliveryList { items: items.into_iter().map(DeliveryOut::from).collect() }))
}

#[utoipa::path(post, path = "/api/v1/webhooks/{id}/deliveries/{seq}/redeliver", tag = "webhooks",
    params(("id" = i64, Path, description = "Webhook id"), ("seq" = u64, Path, description = "Event sequence number")),
    responses((status = 200, description = "The attempt, as logged", body = DeliveryOut), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:admin"])))]
/// Send one event of the tenant to the webhook again, now.
pub async fn redeliver(
    State(st): State<AppState>,
    p: Principal,
    Path((id, seq)): Path<(i64, u64)>,
) -> Result<Json<DeliveryOut>, ApiError> {
    p.require(&[ADMIN])?;
    let scope = p.scope();
    let hook = st
        .blocking(move |s| s.webhooks(&scope))
        .await?
        .into_iter()
        .find(|h| h.id == id)
        .ok_or_else(|| ApiError::not_found(format!("webhook {id} not found")))?;
    let (tenant, store) = (hook.tenant.clone(), st.store.clone());
    let event = st
        .blocking(move |s| {
            let page = s.history(
                &Scope::Tenant(tenant),
                &HistoryFilter::default(),
                PageRequest { after: seq.saturating_sub(1) as i64, limit: 1 },
            )?;
            Ok(page.items.into_iter().find(|e| e.seq == seq))
        })
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {seq} not found")))?;
    let mut site_id = String::new();
    st.store.snapshot(&mut |snap| {
        site_id = snap.site_id()?;
        Ok(())
    })?;
    let mut outbox = crate::hooks::Outbox::new(&site_id);
    let env = outbox.envelope(&event, &|job| store.job(&Scope::All, job).ok().map(|j| j.spec.queue));
    let d = crate::hooks::deliver(&st, &hook, &env).await?;
    Ok(Json(d.into()))
}
