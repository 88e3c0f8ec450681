//! Deprecated aliases of the first job endpoints (`/api/v0/...`), kept for old clients. They
//! answer as before and say, in `Deprecation`, `Sunset` and `Link` headers, what replaces them.

use axum::extract::{Path, State};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use orch_core::{Job, JobId};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::{Principal, READ};
use super::error::{ApiError, ErrorEnvelope};
use crate::AppState;

/// When the aliases were deprecated (RFC 9745: `@` and seconds since the epoch): 2026-11-01.
const DEPRECATED_AT: &str = "@1793491200";
/// When they go away (RFC 8594, an HTTP date).
const SUNSET: &str = "Mon, 31 May 2027 00:00:00 GMT";

fn deprecated(resp: impl IntoResponse, successor: &str) -> Response {
    let mut resp = resp.into_response();
    let h = resp.headers_mut();
    h.insert(HeaderName::from_static("deprecation"), HeaderValue::from_static(DEPRECATED_AT));
    h.insert(HeaderName::from_static("sunset"), HeaderValue::from_static(SUNSET));
    if let Ok(link) = HeaderValue::from_str(&format!("<{successor}>; rel=\"successor-version\"")) {
        h.insert(axum::http::header::LINK, link);
    }
    resp
}

#[utoipa::path(get, path = "/api/v0/jobs/{id}", tag = "legacy", params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, description = "The job, unwrapped (as v0 answered)", body = Object), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
#[deprecated = "use GET /api/v1/jobs/{id}"]
/// Deprecated: use `GET /api/v1/jobs/{id}`.
pub async fn job(State(st): State<AppState>, p: Principal, Path(id): Path<JobId>) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let job: Job = st.blocking(move |s| s.job(&scope, id)).await?;
    Ok(deprecated(Json(job), &format!("/api/v1/jobs/{id}")))
}

/// A job in brief (v0).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobSummary {
    /// Id.
    pub id: i64,
    /// Job type.
    pub queue: String,
    /// State name.
    pub state: String,
    /// Attempts so far.
    pub attempt: u32,
    /// Last change.
    pub updated_at: String,
}

#[utoipa::path(get, path = "/api/v0/jobs/{id}/summary", tag = "legacy", params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, body = JobSummary), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
#[deprecated = "use GET /api/v1/jobs/{id}"]
/// Deprecated: use `GET /api/v1/jobs/{id}`.
pub async fn summary(State(st): State<AppState>, p: Principal, Path(id): Path<JobId>) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let job = st.blocking(move |s| s.job(&scope, id)).await?;
    let s = JobSummary {
        id: job.id,
        queue: job.spec.queue,
        state: job.state.as_str().into(),
        attempt: job.attempt,
        updated_at: job.updated_at.to_string(),
    };
    Ok(deprecated(Json(s), &format!("/api/v1/jobs/{id}")))
}
