//! The one JSON error envelope every 4xx and 5xx answer carries, and the mapping of store and
//! request failures onto it. Codes are stable: clients branch on `code`, never on `message`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use orch_store::StoreError;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

/// An error answer: `{"error": {"code", "message", "details", "request_id"}}`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable machine code.
    pub code: &'static str,
    /// What went wrong, for a human.
    pub message: String,
    /// Structured context (the field at fault, limits…).
    pub details: Value,
}

/// The error envelope as it is sent.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
#[schema(example = json!({"error": {"code": "not_found", "message": "job 42 not found", "details": {}, "request_id": "req-5f1c0a9e2b7d4c31"}}))]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

/// The content of the error envelope.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine code, e.g. `not_found`, `forbidden`, `invalid_request`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Structured details (may be empty).
    #[schema(value_type = Object)]
    pub details: Value,
    /// The request's id (also in the `X-Request-Id` header); quote it when reporting a problem.
    /// Absent on the per-item errors of a batch answer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
}

impl ApiError {
    /// An error with empty details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), details: Value::Object(Default::default()) }
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = details;
        self
    }

    /// 400/422: the request is not acceptable.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// 404 for anything outside the caller's tenant or missing: the two are indistinguishable.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500: says little to the client; the cause goes to the log.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the daemon's log")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let status = match &e {
            StoreError::NotFound(_) | StoreError::Missing { .. } | StoreError::ArtifactNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            StoreError::LeaseLost { .. } | StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            // The database cannot serve the call now: say so plainly; the transaction rolled back.
            StoreError::Backend(_) | StoreError::Postgres(_) | StoreError::Corrupt(_) | StoreError::WouldWait => {
                let (status, message, retry) = match e.code() {
                    "storage_full" => (
                        StatusCode::INSUFFICIENT_STORAGE,
                        "the ledger's disk is full: nothing was written; free space and retry",
                        true,
                    ),
                    "read_only" => {
                        (StatusCode::SERVICE_UNAVAILABLE, "the ledger is read-only: nothing was written", true)
                    }
                    "busy" => (StatusCode::SERVICE_UNAVAILABLE, "the ledger is busy: nothing was written; retry", true),
                    "unavailable" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the ledger's database cannot be reached: nothing was written; retry",
                        true,
                    ),
                    "corrupt_ledger" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the ledger is damaged: nothing was written; stop orchd, run `orchd check` and restore from a backup",
                        false,
                    ),
                    _ => return ApiError::internal(e),
                };
                tracing::error!(error = %e, "the database refused an operation");
                let details = if retry { json!({"retry_after_s": 1}) } else { json!({}) };
                return ApiError::new(status, e.code(), message).with_details(details);
            }
            _ => return ApiError::internal(e),
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The request id is filled in by the envelope middleware, which knows it.
        let body = ErrorEnvelope {
            error: ErrorBody {
                code: self.code.to_string(),
                message: self.message,
                details: self.details,
                request_id: String::new(),
            },
        };
        let retry_after = body.error.details.get("retry_after_s").and_then(Value::as_u64);
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = retry_after {
            // Backpressure and rate limits say when to come back.
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body stays unread, so the connection cannot carry another
            // request: say so, or a client reusing it from its pool sees a reset.
            resp.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The code used for a status when a layer below the handlers produced the error.
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthenticated",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}
