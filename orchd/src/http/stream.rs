//! Live views: the event stream (Server-Sent Events and WebSocket) with `Last-Event-ID`
//! resumption from the hub's bounded buffer, Prometheus metrics, and failure clusters.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use orch_core::failure::classify;
use orch_core::Timestamp;
use orch_store::Scope;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};

use super::auth::{Principal, READ};
use super::error::{ApiError, ErrorEnvelope};
use super::jobs::time_param;
use crate::events::{Envelope, Resume};
use crate::AppState;

/// Which events a stream carries (beyond the caller's tenant).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Project.
    pub project: Option<String>,
    /// Job type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub job_type: Option<String>,
    /// One job.
    pub job_id: Option<i64>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Resume after this event (WebSocket; SSE clients send the `Last-Event-ID` header).
    pub last_event_id: Option<u64>,
}

/// One message of a stream.
enum Item {
    Event(Arc<Envelope>),
    /// Events after the client's id were evicted from the buffer.
    Gap(u64),
    /// The client fell too far behind and is dropped.
    Dropped,
}

fn filter(p: &Principal, q: &StreamQuery) -> impl Fn(&Envelope) -> bool + Send + Sync + 'static {
    let scope = p.scope();
    let (project, job_type, job_id, corr) = (q.project.clone(), q.job_type.clone(), q.job_id, q.correlation_id.clone());
    move |e: &Envelope| {
        scope.allows(&e.tenant)
            && project.as_ref().is_none_or(|v| *v == e.project)
            && job_type.as_ref().is_none_or(|v| e.job_type.as_ref() == Some(v))
            && job_id.is_none_or(|v| e.job_id == Some(v))
            && corr.as_ref().is_none_or(|v| *v == e.correlation_id)
    }
}

/// The stream of items for a subscriber: buffered events after `after`, then live ones, ending
/// with `Dropped` if the subscriber lags beyond the hub's bound.
fn items(
    st: &AppState,
    p: &Principal,
    q: &StreamQuery,
    after: Option<u64>,
) -> impl Stream<Item = Item> + Send + 'static {
    let keep = filter(p, q);
    let (rx, buffered, resume) = st.events.subscribe(after, &keep);
    let mut first: Vec<Item> = Vec::new();
    if let Resume::Gap { oldest } = resume {
        first.push(Item::Gap(oldest));
    }
    let mut last = after.unwrap_or(0);
    if let Some(e) = buffered.last() {
        last = last.max(e.seq);
    }
    first.extend(buffered.into_iter().map(Item::Event));
    let live = stream::unfold(Some((rx, last, keep)), |state| async move {
        let (mut rx, mut last, keep) = state?;
        loop {
            match rx.recv().await {
                Ok(e) if e.seq <= last || !keep(&e) => continue,
                Ok(e) => {
                    last = e.seq;
                    return Some((Item::Event(e), Some((rx, last, keep))));
                }
                Err(RecvError::Lagged(_)) => return Some((Item::Dropped, None)),
                Err(RecvError::Closed) => return None,
            }
        }
    });
    stream::iter(first).chain(live)
}

fn last_event_id(headers: &HeaderMap, q: &StreamQuery) -> Option<u64> {
    headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).or(q.last_event_id)
}

#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(StreamQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event")),
    responses((status = 200, description = "`text/event-stream`: `id` is the event's sequence number, `event` its type, `data` an Envelope. \
        `event: gap` says events after Last-Event-ID were evicted (re-read state); `event: dropped` ends the stream of a client that fell too far behind.",
        content_type = "text/event-stream", body = Envelope),
        (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// Live events of the caller's tenant as Server-Sent Events.
pub async fn sse(
    State(st): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    q: Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    p.require(&[READ])?;
    let after = last_event_id(&headers, &q);
    let stream = items(&st, &p, &q, after).map(|item| {
        Ok(match item {
            Item::Event(e) => SseEvent::default()
                .id(e.seq.to_string())
                .event(e.event_type.clone())
                .data(serde_json::to_string(&*e).unwrap_or_default()),
            Item::Gap(oldest) => SseEvent::default().event("gap").data(
                json!({"oldest": oldest, "message": "events after Last-Event-ID were evicted; re-read state"})
                    .to_string(),
            ),
            Item::Dropped => SseEvent::default()
                .event("dropped")
                .data(json!({"message": "this client fell too far behind and is disconnected"}).to_string()),
        })
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[utoipa::path(get, path = "/api/v1/events/ws", tag = "events", params(StreamQuery),
    responses((status = 101, description = "WebSocket: text frames `{\"id\", \"event\", \"data\"}` with the same content as the SSE stream"),
        (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// Live events of the caller's tenant over a WebSocket.
pub async fn ws(
    State(st): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    q: Query<StreamQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let after = last_event_id(&headers, &q);
    let items = items(&st, &p, &q, after);
    Ok(upgrade.on_upgrade(move |socket| pump(socket, items)))
}

async fn pump(mut socket: WebSocket, items: impl Stream<Item = Item> + Send + 'static) {
    let mut items = std::pin::pin!(items);
    while let Some(item) = items.next().await {
        let (frame, last) = match item {
            Item::Event(e) => (json!({"id": e.seq, "event": e.event_type, "data": &*e}), false),
            Item::Gap(oldest) => (json!({"event": "gap", "data": {"oldest": oldest}}), false),
            Item::Dropped => (json!({"event": "dropped", "data": {}}), true),
        };
        if socket.send(Message::Text(frame.to_string().into())).await.is_err() || last {
            break;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format. Site tokens see every tenant; a tenant token only its own series.",
        content_type = "text/plain"), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// Prometheus metrics.
pub async fn metrics(State(st): State<AppState>, p: Principal) -> Result<Response, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let depth = st.blocking(move |s| s.depth(&scope)).await?;
    let tenant = match p.scope() {
        Scope::Tenant(t) => Some(t),
        Scope::All => None,
    };
    let scope = p.scope();
    let flow = crate::flow::view(&st, |f, now| f.gauges(&scope, now));
    let text = st.metrics.render(&depth, &flow, st.clock.now(), tenant.as_deref());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

/// Filters for failure clusters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ErrorQuery {
    /// Only this source.
    pub source: Option<String>,
    /// At or after (RFC 3339; default: 24 hours ago).
    pub since: Option<String>,
}

/// Failures of one kind from one source.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterOut {
    /// The source (`-` for jobs without one).
    pub source: String,
    /// `http_429`, `http_5xx`, `timeout`, `schema_mismatch`, `parse_error` or `other`.
    pub cluster: String,
    /// Failed attempts.
    pub count: u64,
    /// The first one.
    #[schema(value_type = String, format = DateTime)]
    pub first_seen: Timestamp,
    /// The last one.
    #[schema(value_type = String, format = DateTime)]
    pub last_seen: Timestamp,
    /// The most recent example.
    pub example: ClusterExample,
}

/// An example failure.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterExample {
    /// The job.
    pub job_id: i64,
    /// The job type.
    pub job_type: String,
    /// The worker's error class.
    pub class: String,
    /// The message.
    pub message: String,
}

/// Failure clusters.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterList {
    /// By source, then by count (largest first).
    pub items: Vec<ClusterOut>,
}

#[utoipa::path(get, path = "/api/v1/errors", tag = "events", params(ErrorQuery),
    responses((status = 200, body = ClusterList), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// Failed attempts grouped by source and kind, with counts, first and last seen and an example.
pub async fn errors(
    State(st): State<AppState>,
    p: Principal,
    q: Query<ErrorQuery>,
) -> Result<Json<ClusterList>, ApiError> {
    p.require(&[READ])?;
    let since = time_param("since", &q.since)?.unwrap_or_else(|| st.clock.now().plus_millis(-86_400_000));
    let scope = p.scope();
    let records = st.blocking(move |s| s.failures(&scope, since, 100_000)).await?;
    let mut clusters: BTreeMap<(String, &'static str), ClusterOut> = BTreeMap::new();
    for r in records {
        let source = r.source.clone().unwrap_or_else(|| "-".into());
        if q.source.as_ref().is_some_and(|s| *s != source) {
            continue;
        }
        let cluster = classify(&r.class, &r.message).as_str();
        let example = ClusterExample { job_id: r.job_id, job_type: r.queue, class: r.class, message: r.message };
        // Records come oldest first: the last one seen is the example.
        match clusters.entry((source.clone(), cluster)) {
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let c = o.get_mut();
                c.count += 1;
                c.last_seen = r.at;
                c.example = example;
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(ClusterOut {
                    source,
                    cluster: cluster.into(),
                    count: 1,
                    first_seen: r.at,
                    last_seen: r.at,
                    example,
                });
            }
        }
    }
    let mut items: Vec<ClusterOut> = clusters.into_values().collect();
    items.sort_by(|a, b| a.source.cmp(&b.source).then(b.count.cmp(&a.count)));
    Ok(Json(ClusterList { items }))
}

/// What the console's overview shows.
#[derive(Debug, Serialize, ToSchema)]
pub struct Dashboard {
    /// Jobs by tenant, type and state.
    #[schema(value_type = Vec<Object>)]
    pub depth: Vec<orch_store::Depth>,
    /// Error-budget burn rates by tenant and window (tenants with jobs finished recently).
    pub burn_rates: Vec<crate::metrics::BurnRate>,
    /// The last event sequence number the daemon has seen.
    pub head_seq: u64,
}

#[utoipa::path(get, path = "/api/v1/dashboard", tag = "events",
    responses((status = 200, body = Dashboard), (status = "4XX", body = ErrorEnvelope)),
    security(("bearer" = ["orch:read"])))]
/// The console's overview: queue depth and SLO burn rates in the caller's scope.
pub async fn dashboard(State(st): State<AppState>, p: Principal) -> Result<Json<Dashboard>, ApiError> {
    p.require(&[READ])?;
    let scope = p.scope();
    let depth = st.blocking(move |s| s.depth(&scope)).await?;
    let scope = p.scope();
    let burn_rates = st.metrics.burn_rates(st.clock.now()).into_iter().filter(|b| scope.allows(&b.tenant)).collect();
    Ok(Json(Dashboard { depth, burn_rates, head_seq: st.events.head() }))
}
