//! `Idempotency-Key` on POST and PUT: the first response to a key is kept (per tenant, for
//! `idempotency_ttl_ms`); the same key with the same request replays it, with a different request
//! it is refused, and while the first is still running a second one waits its turn (409).

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use orch_store::IdempotencyBegin;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::auth::Principal;
use super::error::ApiError;
use crate::AppState;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// Set on a replayed response.
pub const REPLAYED: &str = "idempotent-replayed";

/// Middleware: runs after authentication.
pub async fn idempotency(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !matches!(*req.method(), Method::POST | Method::PUT) {
        return next.run(req).await;
    }
    let Some(key) = req.headers().get(HEADER).cloned() else {
        return next.run(req).await;
    };
    match run(state, key, req, next).await {
        Ok(r) | Err(r) => r,
    }
}

async fn run(state: AppState, key: HeaderValue, req: Request, next: Next) -> Result<Response, Response> {
    let key =
        key.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255).map(str::to_string).ok_or_else(|| {
            ApiError::invalid("Idempotency-Key must be 1-255 visible ASCII characters").into_response()
        })?;
    let Some(principal) = req.extensions().get::<Principal>().cloned() else {
        return Ok(next.run(req).await);
    };
    let (parts, body) = req.into_parts();
    let bytes = to_bytes(body, state.settings.max_body_bytes).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "the body is larger than the daemon accepts")
            .into_response()
    })?;
    let mut h = Sha256::new();
    h.update(parts.method.as_str());
    h.update([0]);
    h.update(parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or_default());
    h.update([0]);
    h.update(&bytes);
    let fingerprint = hex::encode(h.finalize());
    let tenant = principal.idempotency_tenant();
    let (t, k, f) = (tenant.clone(), key.clone(), fingerprint);
    let begun = state
        .blocking(move |s| s.idempotency_begin(&t, &k, &f))
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    match begun {
        IdempotencyBegin::Started => {}
        IdempotencyBegin::Replay { status, body } => {
            let mut resp = Response::new(Body::from(body));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            let headers = resp.headers_mut();
            headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(REPLAYED, HeaderValue::from_static("true"));
            return Ok(resp);
        }
        IdempotencyBegin::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request",
            )
            .with_details(json!({ "idempotency_key": key }))
            .into_response())
        }
        IdempotencyBegin::InFlight => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_in_flight",
                "a request with this Idempotency-Key is still being processed; retry later",
            )
            .into_response())
        }
    }
    let resp = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    let (parts, body) = resp.into_parts();
    let bytes = match to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            let _ = state.blocking(move |s| s.idempotency_release(&tenant, &key)).await;
            return Err(ApiError::internal(e).into_response());
        }
    };
    let status = parts.status;
    let stored = bytes.clone();
    // Server errors are not remembered: the client may retry them with the same key.
    let saved = if status.is_server_error() {
        state.blocking(move |s| s.idempotency_release(&tenant, &key)).await
    } else {
        state.blocking(move |s| s.idempotency_finish(&tenant, &key, status.as_u16(), &stored)).await
    };
    if let Err(e) = saved {
        tracing::warn!(error = %e, "could not record the idempotent response");
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}
