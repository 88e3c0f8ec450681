//! The event hub: one task tails the ledger's history and turns each event into an
//! [`Envelope`] (the event plus its job type and worker), which it keeps in a bounded buffer
//! (for `Last-Event-ID` resumption), broadcasts to live streams (SSE, WebSocket) and feeds to
//! the metrics. Tailing the ledger, rather than hooking writers, sees every writer — the API,
//! the reaper, `orchd import` in another process — and can never report a change that rolled back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use orch_core::{Event, EventKind, JobId, Timestamp};
use orch_store::{HistoryFilter, PageRequest, Scope};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::recent::{Interner, JobRuns};
use crate::AppState;

/// One event as streams and hooks carry it (`schemas/event-envelope.schema.json`).
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct Envelope {
    /// The envelope format's version (1).
    pub v: u32,
    /// The event's sequence number (the SSE id).
    pub seq: u64,
    /// When it happened.
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    /// Its type, e.g. `job.succeeded`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The tenant.
    pub tenant: String,
    /// The project.
    pub project: String,
    /// The job, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// The job's type (queue), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_type: Option<String>,
    /// The task runner (worker) the event concerns, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Who did it.
    pub actor: String,
    /// Correlation id.
    #[serde(rename = "correlationId")]
    pub correlation_id: String,
    /// The event's own data.
    #[schema(value_type = Object)]
    pub data: Value,
}

impl Envelope {
    /// About how many bytes of memory the envelope holds: its own size plus its strings and
    /// data (a JSON object counts as one B-tree node per eleven keys). Used to bound buffers
    /// by bytes; it errs on the high side.
    pub fn heap_bytes(&self) -> usize {
        fn value(v: &Value) -> usize {
            match v {
                Value::String(s) => s.len(),
                Value::Array(a) => a.len() * size_of::<Value>() + a.iter().map(value).sum::<usize>(),
                Value::Object(m) => {
                    const NODE: usize = 11 * (size_of::<String>() + size_of::<Value>()) + 16;
                    m.len().div_ceil(11).max(1) * NODE + m.iter().map(|(k, v)| k.len() + value(v)).sum::<usize>()
                }
                _ => 0,
            }
        }
        let strings = [&self.event_type, &self.tenant, &self.project, &self.actor, &self.correlation_id]
            .into_iter()
            .chain(&self.job_type)
            .chain(&self.worker)
            .map(|s| s.len().max(16))
            .sum::<usize>();
        // The Arc's counts, the envelope itself, its strings, its data.
        16 + size_of::<Envelope>() + strings + value(&self.data)
    }
}

struct Inner {
    /// Buffered envelopes with their estimated sizes ([`Envelope::heap_bytes`]).
    buffer: VecDeque<(Arc<Envelope>, usize)>,
    /// The sum of the buffered sizes.
    bytes: usize,
    /// The last sequence number seen by the tailer.
    head: u64,
}

/// The hub shared by the tailer, the streams and the metrics.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Mutex<Inner>>,
    tx: broadcast::Sender<Arc<Envelope>>,
    capacity: usize,
    max_bytes: usize,
    retention_ms: i64,
}

/// Where a resuming client stands relative to the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// Everything after the client's id is in the buffer (possibly nothing yet).
    Complete,
    /// Events after the client's id were evicted: it must re-read state (e.g. list jobs).
    Gap {
        /// The oldest sequence number still buffered.
        oldest: u64,
    },
}

impl Hub {
    /// A hub keeping up to `capacity` events for at most `retention_ms`; live subscribers may
    /// fall `lag` events behind before they are dropped. The buffer has no bound in bytes until
    /// [`Hub::with_max_bytes`].
    pub fn new(capacity: usize, retention_ms: u64, lag: usize) -> Hub {
        let (tx, _) = broadcast::channel(lag.max(1));
        Hub {
            inner: Arc::new(Mutex::new(Inner { buffer: VecDeque::new(), bytes: 0, head: 0 })),
            tx,
            capacity: capacity.max(1),
            max_bytes: usize::MAX,
            retention_ms: retention_ms.min(i64::MAX as u64) as i64,
        }
    }

    /// Also evicts the oldest events while the buffer holds more than `max_bytes` (estimated
    /// by [`Envelope::heap_bytes`]); the newest event is kept whatever its size.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Hub {
        self.max_bytes = max_bytes.max(1);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to live events, and returns the buffered ones after `after` (that pass
    /// `keep`) and whether the buffer still held everything after it. Subscribing first means
    /// nothing falls between the two; the caller skips live events it already sent.
    pub fn subscribe(
        &self,
        after: Option<u64>,
        keep: &dyn Fn(&Envelope) -> bool,
    ) -> (broadcast::Receiver<Arc<Envelope>>, Vec<Arc<Envelope>>, Resume) {
        let rx = self.tx.subscribe();
        let inner = self.lock();
        let Some(after) = after else { return (rx, Vec::new(), Resume::Complete) };
        let oldest = inner.buffer.front().map(|(e, _)| e.seq);
        let resume = match oldest {
            Some(o) if after + 1 < o => Resume::Gap { oldest: o },
            None if after < inner.head => Resume::Gap { oldest: inner.head + 1 },
            _ => Resume::Complete,
        };
        let events = inner.buffer.iter().map(|(e, _)| e).filter(|e| e.seq > after && keep(e)).cloned().collect();
        (rx, events, resume)
    }

    /// The last sequence number the hub has seen.
    pub fn head(&self) -> u64 {
        self.lock().head
    }

    /// How many events are buffered.
    pub fn buffered(&self) -> usize {
        self.lock().buffer.len()
    }

    /// The estimated size of the buffered events, in bytes.
    pub fn buffered_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Adds events (in sequence order), evicting beyond the bounds, and broadcasts them.
    pub fn publish(&self, events: Vec<Envelope>) {
        let sized: Vec<(Arc<Envelope>, usize)> = events
            .into_iter()
            .map(|e| {
                let size = e.heap_bytes();
                (Arc::new(e), size)
            })
            .collect();
        let mut inner = self.lock();
        for (e, size) in sized {
            inner.head = inner.head.max(e.seq);
            inner.bytes += size;
            inner.buffer.push_back((e.clone(), size));
            let _ = self.tx.send(e);
        }
        let horizon = inner.buffer.back().map(|(e, _)| e.at.plus_millis(-self.retention_ms));
        while let Some((oldest, size)) = inner.buffer.front().map(|(e, size)| (e.at, *size)) {
            let over = inner.buffer.len() > self.capacity || (inner.bytes > self.max_bytes && inner.buffer.len() > 1);
            if !over && horizon.is_none_or(|h| oldest >= h) {
                break;
            }
            inner.bytes -= size;
            inner.buffer.pop_front();
        }
    }

    /// Starts at the ledger's current head (history before start is read from the API).
    pub fn start_at(&self, head: u64) {
        self.lock().head = head;
    }
}

/// How many runs of job ids (see [`JobRuns`]) an [`Enricher`] keeps the type of: a batch
/// enqueued together is one run, so this covers millions of jobs enqueued in batches and the
/// last 65,536 enqueued one by one, in a few megabytes at most.
pub const JOB_TYPE_RUNS: usize = 65_536;

/// Makes envelopes from events, remembering the type of recent jobs (in bounded memory; a job
/// it has forgotten is looked up).
pub struct Enricher {
    job_types: JobRuns<Arc<str>>,
    names: Interner,
}

impl Default for Enricher {
    fn default() -> Self {
        Enricher { job_types: JobRuns::new(JOB_TYPE_RUNS), names: Interner::new(1_024) }
    }
}

impl Enricher {
    /// The envelope of `ev`; `lookup` finds the type of a job this enricher does not remember.
    pub fn envelope(&mut self, ev: &Event, lookup: &dyn Fn(JobId) -> Option<String>) -> Envelope {
        let job_type = ev.job_id.and_then(|id| {
            if let EventKind::Enqueued(spec) = &ev.event {
                let t = self.names.get(&spec.queue);
                self.job_types.insert(id, t);
            }
            if let Some(t) = self.job_types.get(id) {
                return Some(t.to_string());
            }
            let t = lookup(id)?;
            let shared = self.names.get(&t);
            self.job_types.insert(id, shared);
            Some(t)
        });
        let worker = match &ev.event {
            EventKind::Claimed { worker, .. } => Some(worker.clone()),
            EventKind::Heartbeat { .. } | EventKind::Succeeded { .. } | EventKind::Failed { .. } => {
                Some(ev.actor.clone())
            }
            _ => None,
        };
        let data = serde_json::to_value(&ev.event).ok().and_then(|v| v.get("data").cloned()).unwrap_or(Value::Null);
        Envelope {
            v: 1,
            seq: ev.seq,
            at: ev.at,
            event_type: ev.event.type_name().to_string(),
            tenant: ev.tenant.clone(),
            project: ev.project.clone(),
            job_id: ev.job_id,
            job_type,
            worker,
            actor: ev.actor.clone(),
            correlation_id: ev.correlation_id.clone(),
            data,
        }
    }
}

/// One tailer pass: reads history after the hub's head and publishes it. Returns how many
/// events it published.
pub async fn tail_once(state: &AppState, enricher: &Arc<Mutex<Enricher>>) -> Result<usize, orch_store::StoreError> {
    let hub = state.events.clone();
    let after = hub.head();
    let store = state.store.clone();
    let enricher = enricher.clone();
    let metrics = state.metrics.clone();
    state
        .blocking(move |s| {
            let page =
                s.history(&Scope::All, &HistoryFilter::default(), PageRequest { after: after as i64, limit: 1000 })?;
            let n = page.items.len();
            let mut e = enricher.lock().unwrap_or_else(|p| p.into_inner());
            let lookup = |id: JobId| store.job(&Scope::All, id).ok().map(|j| j.spec.queue);
            let envelopes: Vec<Envelope> = page.items.iter().map(|ev| e.envelope(ev, &lookup)).collect();
            for env in &envelopes {
                metrics.observe(env);
            }
            hub.publish(envelopes);
            Ok(n)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(seq: u64, at_ms: i64, tenant: &str) -> Envelope {
        Envelope {
            v: 1,
            seq,
            at: Timestamp::from_millis(at_ms),
            event_type: "job.enqueued".into(),
            tenant: tenant.into(),
            project: "p".into(),
            job_id: Some(seq as i64),
            job_type: Some("q".into()),
            worker: None,
            actor: "a".into(),
            correlation_id: "c".into(),
            data: Value::Null,
        }
    }

    /// `schemas/event-envelope.schema.json` is the envelope's schema. `ORCH_UPDATE_SCHEMAS=1`
    /// rewrites it.
    #[test]
    fn committed_envelope_schema_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/event-envelope.schema.json");
        let mut schema = serde_json::to_value(schemars::schema_for!(Envelope)).unwrap();
        schema["$id"] = "https://orch.invalid/schemas/event-envelope.schema.json".into();
        let want = orch_core::schema::to_file_text(&schema);
        if std::env::var_os("ORCH_UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        assert!(std::fs::read_to_string(&path).unwrap_or_default() == want, "{} is stale", path.display());
    }

    #[test]
    fn the_buffer_keeps_the_newest_within_its_bounds() {
        let hub = Hub::new(5, 10_000, 16);
        hub.publish((1..=20).map(|s| env(s, 1_000 * s as i64, "acme")).collect());
        assert_eq!(hub.buffered(), 5);
        let all = |_: &Envelope| true;
        let (_, events, resume) = hub.subscribe(Some(17), &all);
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [18, 19, 20]);
        assert_eq!(resume, Resume::Complete);
        let (_, events, resume) = hub.subscribe(Some(3), &all);
        assert_eq!(resume, Resume::Gap { oldest: 16 });
        assert_eq!(events.len(), 5);
        // Retention by event time: 10 s behind the newest at most.
        let hub = Hub::new(1_000, 10_000, 16);
        hub.publish((1..=30).map(|s| env(s, 1_000 * s as i64, "acme")).collect());
        assert_eq!(hub.buffered(), 11);
    }

    #[test]
    fn the_buffer_is_bounded_in_bytes_too() {
        let big = |seq: u64| Envelope {
            data: serde_json::json!({"payload": "x".repeat(100_000)}),
            ..env(seq, seq as i64, "acme")
        };
        let one = big(1).heap_bytes();
        assert!(one > 100_000, "{one}");
        let hub = Hub::new(1_000, 60_000, 16).with_max_bytes(one * 3);
        hub.publish((1..=10).map(big).collect());
        assert_eq!(hub.buffered(), 3);
        assert_eq!(hub.buffered_bytes(), 3 * one);
        let (_, events, resume) = hub.subscribe(Some(5), &|_: &Envelope| true);
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [8, 9, 10]);
        assert_eq!(resume, Resume::Gap { oldest: 8 });
        // An event larger than the bound on its own is still kept, as the newest.
        let hub = Hub::new(1_000, 60_000, 16).with_max_bytes(10);
        hub.publish((1..=3).map(big).collect());
        assert_eq!(hub.buffered(), 1);
        // Small events: the count bound applies first.
        let hub = Hub::new(5, 60_000, 16).with_max_bytes(16 << 20);
        hub.publish((1..=20).map(|s| env(s, s as i64, "acme")).collect());
        assert_eq!((hub.buffered(), hub.buffered_bytes()), (5, 5 * env(1, 1, "acme").heap_bytes()));
    }

    #[test]
    fn a_subscriber_that_lags_past_the_bound_is_told_so() {
        let hub = Hub::new(100, 60_000, 4);
        let (mut rx, _, _) = hub.subscribe(None, &|_: &Envelope| true);
        hub.publish((1..=10).map(|s| env(s, s as i64, "acme")).collect());
        assert!(matches!(rx.try_recv(), Err(broadcast::error::TryRecvError::Lagged(6))));
    }
}
