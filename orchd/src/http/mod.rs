//! The HTTP control plane (axum): the Task Runner bridge and operator API under `/api/v1`, the
//! deprecated `/api/v0` aliases, probes, and the OpenAPI document. Cross-cutting behaviour lives
//! in layers: request ids, the API version header and the error envelope for every 4xx/5xx
//! ([`envelope`]), authentication ([`auth`]) and `Idempotency-Key` ([`idempotency`]).

pub mod auth;
pub mod error;
pub mod extract;
pub mod flow;
pub mod hooks;
pub mod idempotency;
pub mod jobs;
pub mod legacy;
pub mod openapi;
pub mod ops;
pub mod stream;

use axum::body::{to_bytes, Body};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use error::{ApiError, ErrorBody, ErrorEnvelope};

/// The API version every answer names in `Orch-Api-Version`.
pub const API_VERSION: &str = "1";
/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/openapi/orchestrator.json";

/// The documented routes that need no credentials.
fn public() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(console))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(well_known))
}

/// The documented routes behind authentication, and the document's fixed parts.
#[allow(deprecated)]
fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(jobs::enqueue, jobs::list))
        .routes(routes!(jobs::enqueue_batch))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::claim))
        .routes(routes!(jobs::heartbeat))
        .routes(routes!(jobs::ack))
        .routes(routes!(jobs::ack_batch))
        .routes(routes!(jobs::fail))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::retry))
        .routes(routes!(jobs::artifact))
        .routes(routes!(jobs::stats))
        .routes(routes!(ops::history))
        .routes(routes!(ops::run))
        .routes(routes!(ops::sources))
        .routes(routes!(ops::source, ops::put_source))
        .routes(routes!(ops::quotas))
        .routes(routes!(ops::put_quota))
        .routes(routes!(ops::backfill))
        .routes(routes!(ops::import))
        .routes(routes!(stream::sse))
        .routes(routes!(stream::ws))
        .routes(routes!(stream::errors))
        .routes(routes!(stream::metrics))
        .routes(routes!(stream::dashboard))
        .routes(routes!(hooks::create, hooks::list))
        .routes(routes!(hooks::delete))
        .routes(routes!(hooks::deliveries))
        .routes(routes!(hooks::redeliver))
        .routes(routes!(flow::state))
        .routes(routes!(flow::throttles))
        .routes(routes!(flow::incidents))
        .routes(routes!(flow::put_rate_limit, flow::delete_rate_limit))
        .routes(routes!(flow::throttle))
        .routes(routes!(flow::put_concurrency, flow::delete_concurrency))
        .routes(routes!(flow::pause, flow::resume))
        .routes(routes!(flow::put_blackout, flow::delete_blackout))
        .routes(routes!(flow::put_schedule, flow::delete_schedule))
        .routes(routes!(flow::list))
        .routes(routes!(flow::retry_dead))
        .routes(routes!(flow::start_run, ops::runs))
        .routes(routes!(flow::replay))
        .routes(routes!(legacy::job))
        .routes(routes!(legacy::summary))
        .split_for_parts()
}

/// Both route sets and the whole document.
fn parts() -> (Router<AppState>, Router<AppState>, Value) {
    let (api, mut doc) = api();
    let (public, public_doc) = public().split_for_parts();
    doc.merge(public_doc);
    (public, api, openapi::document(doc))
}

/// The OpenAPI 3.1 document this build serves.
pub fn openapi_document() -> Value {
    parts().2
}

/// The daemon's routes.
pub fn router(state: AppState) -> Router {
    let (public, api, doc) = parts();
    let doc = std::sync::Arc::new(doc);
    let api = api
        .layer(from_fn_with_state(state.clone(), idempotency::idempotency))
        .layer(from_fn_with_state(state.clone(), auth::authenticate));
    public
        .route(OPENAPI_PATH, get(move || async move { Json((*doc).clone()) }))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), limit_body))
        .layer(from_fn(envelope))
        .with_state(state)
}

/// The console page: one file with its script and styles, embedded in the binary (air-gapped
/// sites fetch nothing). It holds no data; everything it shows comes from the API with the
/// user's token.
const CONSOLE: &str = include_str!("../../console/index.html");

#[utoipa::path(get, path = "/", tag = "health", responses((status = 200, description = "The web console", content_type = "text/html")))]
/// The web console.
async fn console() -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
        ),
    ];
    (headers, CONSOLE).into_response()
}

#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "The process is alive", body = Object)))]
/// Liveness.
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Migrations ran and the services run", body = Object), (status = 503, body = ErrorEnvelope)))]
/// Readiness: ready once the ledger is migrated and the services started. `leader` says whether
/// this daemon runs the site's once-per-site services (always, on SQLite; one of several
/// daemons sharing a PostgreSQL ledger).
async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        Json(json!({"status": "ready", "leader": state.is_leader()})).into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "starting").into_response()
    }
}

#[utoipa::path(get, path = "/.well-known/openapi", tag = "health",
    responses((status = 302, description = "`Location` is the OpenAPI document", headers(("Location" = String)))))]
/// Where the OpenAPI document is.
async fn well_known() -> Response {
    let mut resp = (StatusCode::FOUND, Json(json!({ "openapi": OPENAPI_PATH }))).into_response();
    resp.headers_mut().insert(header::LOCATION, HeaderValue::from_static(OPENAPI_PATH));
    resp
}

const REQUEST_ID: &str = "x-request-id";
const VERSION: &str = "orch-api-version";

/// Middleware around everything: gives the request an id (the client's `X-Request-Id` if
/// sensible), names the API version, and makes every 4xx/5xx an error envelope carrying the id.
async fn envelope(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{:016x}", rand::random::<u64>()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    req.headers_mut().insert(REQUEST_ID, HeaderValue::from_str(&id).expect("checked ASCII"));
    // Every log line of the request (store transitions included) carries its id.
    let span = tracing::info_span!("request", request_id = %id, %method, %path);
    let resp = tracing::Instrument::instrument(next.run(req), span).await;
    let status = resp.status();
    let mut resp = if status.is_client_error() || status.is_server_error() {
        if status.is_server_error() {
            tracing::warn!(request_id = %id, %method, %path, %status, "request failed");
        }
        with_request_id(resp, &id).await
    } else {
        resp
    };
    let h = resp.headers_mut();
    h.insert(HeaderName::from_static(VERSION), HeaderValue::from_static(API_VERSION));
    h.insert(REQUEST_ID, HeaderValue::from_str(&id).expect("checked ASCII"));
    resp
}

/// How much of an oversized body is read and thrown away before the 413 goes out. Closing a
/// socket with unread data in it resets the connection, and the client then sees a reset
/// instead of the answer; draining a bounded excess lets ordinary clients read the 413.
const DRAIN_BYTES: usize = 4 << 20;

/// Middleware: buffers a request body up to the configured limit. A larger body is refused with
/// 413 `body_too_large` (after draining at most [`DRAIN_BYTES`] more) and `Connection: close`.
async fn limit_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    use futures_util::StreamExt;
    let limit = state.settings.max_body_bytes;
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut excess = 0usize;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "the request body could not be read")
                .into_response();
        };
        if excess > 0 || buf.len() + chunk.len() > limit {
            excess += chunk.len();
            if excess > DRAIN_BYTES {
                break;
            }
        } else {
            buf.extend_from_slice(&chunk);
        }
    }
    if excess > 0 {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the body is larger than the daemon accepts",
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(buf))).await
}

/// Puts the request id into an error envelope, or replaces a body that is not one.
async fn with_request_id(resp: Response, id: &str) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = to_bytes(body, 1 << 20).await.unwrap_or_default();
    let envelope = match serde_json::from_slice::<ErrorEnvelope>(&bytes) {
        Ok(mut e) => {
            e.error.request_id = id.to_string();
            e
        }
        Err(_) => {
            let text = String::from_utf8_lossy(&bytes).trim().to_string();
            let message = if parts.status.is_server_error() || text.is_empty() {
                parts.status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text
            };
            ErrorEnvelope {
                error: ErrorBody {
                    code: error::code_for_status(parts.status).to_string(),
                    message,
                    details: json!({}),
                    request_id: id.to_string(),
                },
            }
        }
    };
    let body = serde_json::to_vec(&envelope).expect("envelopes encode");
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
