//! Request extractors that answer with the error envelope: JSON bodies (malformed, unknown
//! fields, wrong content type, too large) and cursor pagination.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use base64::Engine;
use orch_store::PageRequest;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;

/// A JSON body whose rejections are error envelopes.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// An optional JSON body: an empty body is `None`, anything else must parse like [`ApiJson`].
pub struct MaybeJson<T>(pub Option<T>);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for MaybeJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the body is larger than the daemon accepts",
                )
            } else {
                ApiError::new(r.status(), "bad_request", r.body_text())
            }
        })?;
        if bytes.is_empty() {
            return Ok(MaybeJson(None));
        }
        if !json_type {
            return Err(json_rejection(JsonRejection::MissingJsonContentType(Default::default())));
        }
        axum::Json::<T>::from_bytes(&bytes).map(|axum::Json(v)| MaybeJson(Some(v))).map_err(json_rejection)
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let detail = r.body_text();
    match r {
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", "the body is not valid JSON")
                .with_details(json!({ "cause": detail }))
        }
        JsonRejection::JsonDataError(_) => ApiError::invalid(format!("the body does not fit the schema: {detail}"))
            .with_details(json!({ "cause": detail })),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ),
        JsonRejection::BytesRejection(_) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "the body is larger than the daemon accepts")
        }
        _ => ApiError::new(r.status(), "bad_request", detail),
    }
}

/// `limit` and `cursor` of a list request.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// Opaque cursor from a previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// `limit` (or `default`), refused with `422` unless it is between 1 and `max`.
pub fn limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(
            ApiError::invalid(format!("limit must be between 1 and {max}")).with_details(json!({"field": "limit"}))
        );
    }
    Ok(limit)
}

impl PageParams {
    /// The store's page request, or 400 for a cursor this daemon did not make.
    pub fn page(&self) -> Result<PageRequest, ApiError> {
        let limit = limit(self.limit, 100, 1000)?;
        let after = match &self.cursor {
            None => 0,
            Some(c) => decode_cursor(c).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_cursor", "the cursor is not one this API gave out")
            })?,
        };
        Ok(PageRequest { after, limit })
    }
}

/// A cursor: the position after which the next page starts, opaque to clients.
pub fn encode_cursor(after: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("after:{after}"))
}

fn decode_cursor(c: &str) -> Option<i64> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.strip_prefix("after:")?.parse().ok().filter(|n: &i64| *n >= 0)
}

/// A page of items and the cursor of the next page (also sent as a `Link: rel="next"` header).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"items": [], "next_cursor": "YWZ0ZXI6MTAw"}))]
pub struct PageOf<T> {
    /// The items.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A JSON page answer with a `Link: <…>; rel="next"` header when there is a next page.
pub fn paged<T: Serialize>(uri: &axum::http::Uri, items: Vec<T>, next_after: Option<i64>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let next_cursor = next_after.map(encode_cursor);
    let link = next_cursor.as_ref().map(|c| {
        let mut query: Vec<String> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|kv| !kv.is_empty() && !kv.starts_with("cursor="))
            .map(str::to_string)
            .collect();
        query.push(format!("cursor={c}"));
        format!("<{}?{}>; rel=\"next\"", uri.path(), query.join("&"))
    });
    let mut resp = axum::Json(PageOf { items, next_cursor }).into_response();
    if let Some(link) = link.and_then(|l| axum::http::HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(axum::http::header::LINK, link);
    }
    resp
}
