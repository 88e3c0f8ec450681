//! Outbound hooks: signed webhooks and a NATS JetStream publisher. Both read the ledger's
//! history as their outbox, each with a cursor that moves only once an event is delivered (or,
//! for webhooks, dead-lettered), so nothing is lost across a crash — delivery is at least once,
//! de-duplicable by the event's id — and nothing is ever sent for a change that rolled back.
//! Payloads are [`Envelope`]s with the bundle export's redaction applied.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use orch_core::bundle::{RedactionPolicy, Redactor};
use orch_core::{Event, JobId, Timestamp};
use orch_store::{Delivery, DeliveryOutcome, HistoryFilter, PageRequest, Scope, Webhook};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use crate::events::{Enricher, Envelope};
use crate::AppState;

/// The `[webhooks]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Hosts webhooks may point at (the site's own network): exact names, or `.suffix` for a
    /// domain and its subdomains.
    pub allowed_hosts: Vec<String>,
    /// Attempts per event before it is dead-lettered.
    pub max_attempts: u32,
    /// Backoff between attempts (equal jitter).
    pub retry: orch_core::retry::RetryPolicy,
    /// How long a receiver may take to answer, in milliseconds.
    pub timeout_ms: u64,
    /// How often subscriptions are looked at, in milliseconds.
    pub poll_ms: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            allowed_hosts: vec!["127.0.0.1".into(), "localhost".into(), "::1".into()],
            max_attempts: 8,
            retry: orch_core::retry::RetryPolicy { base_ms: 1_000, max_ms: 300_000, ..Default::default() },
            timeout_ms: 5_000,
            poll_ms: 200,
        }
    }
}

/// The `[nats]` settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// The server, e.g. `nats://127.0.0.1:4222`; unset, nothing is published.
    pub url: Option<String>,
    /// The JetStream stream (created, for `<subject_prefix>.>`, if absent).
    pub stream: String,
    /// Subjects are `<prefix>.<tenant>.<event type>`.
    pub subject_prefix: String,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings { url: None, stream: "ORCH".into(), subject_prefix: "orch".into() }
    }
}

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "orch-signature";

/// Signs a body at time `t` (seconds).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Refuses URLs that are not http(s) to an allowed host.
pub fn check_url(url: &str, allowed: &[String]) -> Result<(), String> {
    let uri: axum::http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("webhook URLs must be http or https".into());
    }
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let ok = allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        match a.strip_prefix('.') {
            Some(domain) => host == domain || host.ends_with(&format!(".{domain}")),
            None => host == a,
        }
    });
    if ok {
        Ok(())
    } else {
        Err(format!("host {host:?} is not in webhooks.allowed_hosts"))
    }
}

/// Whether an envelope passes a webhook's filter.
pub fn wanted(filter: &Value, e: &Envelope) -> bool {
    let types_ok = match filter.get("types").and_then(Value::as_array) {
        Some(types) => types.iter().any(|t| t.as_str() == Some(&e.event_type)),
        None => true,
    };
    let eq =
        |key: &str, have: Option<&str>| filter.get(key).and_then(Value::as_str).is_none_or(|want| have == Some(want));
    types_ok && eq("project", Some(&e.project)) && eq("job_type", e.job_type.as_deref())
}

/// Envelopes with secrets redacted as in bundles (the key is the site's id: stable, and the
/// masked value never reveals the secret).
pub struct Outbox {
    enricher: Enricher,
    redactor: Redactor,
}

impl Outbox {
    /// An outbox for a site.
    pub fn new(site_id: &str) -> Outbox {
        Outbox {
            enricher: Enricher::default(),
            redactor: Redactor::new(RedactionPolicy::default(), site_id.as_bytes().to_vec()),
        }
    }

    /// The outbound envelope of an event.
    pub fn envelope(&mut self, ev: &Event, lookup: &dyn Fn(JobId) -> Option<String>) -> Envelope {
        let mut e = self.enricher.envelope(ev, lookup);
        e.data = self.redactor.redact_value(&e.data);
        e
    }
}

/// POSTs one envelope; `Ok(status)` for any answer, `Err` when there was none.
fn post(url: &str, secret: &str, env: &Envelope, timeout: Duration, now: Timestamp) -> Result<u16, String> {
    let body = serde_json::to_vec(env).map_err(|e| e.to_string())?;
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .max_redirects(0)
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let signature = sign(secret, now.as_millis() / 1000, &body);
    let resp = agent
        .post(url)
        .header("content-type", "application/json")
        .header("orch-event-id", &env.seq.to_string())
        .header("orch-event-type", &env.event_type)
        .header(SIGNATURE_HEADER, &signature)
        .send(&body[..])
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

/// Delivers one event to one webhook and records the attempt.
pub async fn deliver(st: &AppState, hook: &Webhook, env: &Envelope) -> Result<Delivery, orch_store::StoreError> {
    let settings = st.settings.webhooks.clone();
    let (url, secret, env_owned, now) = (hook.url.clone(), hook.secret.clone(), env.clone(), st.clock.now());
    let timeout = Duration::from_millis(settings.timeout_ms);
    let result = tokio::task::spawn_blocking(move || post(&url, &secret, &env_owned, timeout, now))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    let (id, seq, retry, max_attempts) = (hook.id, env.seq, settings.retry, settings.max_attempts);
    st.blocking(move |s| {
        let outcome = match result {
            Ok(code) if (200..300).contains(&code) => DeliveryOutcome::Delivered { code },
            other => {
                let (code, error) = match other {
                    Ok(code) => (Some(code), format!("the receiver answered {code}")),
                    Err(e) => (None, e),
                };
                // The event being retried is the newest in the log (later ones wait for it).
                let attempt =
                    s.deliveries(&Scope::All, id, 1)?.first().filter(|d| d.seq == seq).map_or(1, |d| d.attempts + 1);
                let delay = retry.delay_ms(attempt, None, rand::random::<f64>());
                DeliveryOutcome::Failed { code, error, retry_at: now.plus_millis(delay as i64), max_attempts }
            }
        };
        s.record_delivery(id, seq, outcome)
    })
    .await
}

/// One pass over every webhook: each gets the events after its cursor, in order, until one
/// fails (later events wait for it: per-webhook order is kept).
pub async fn deliver_once(st: &AppState, outbox: &Arc<Mutex<Outbox>>) -> Result<(), orch_store::StoreError> {
    let hooks = st.blocking(|s| s.webhooks(&Scope::All)).await?;
    let now = st.clock.now();
    for hook in hooks {
        if hook.next_at > now {
            continue;
        }
        let (tenant, after) = (hook.tenant.clone(), hook.cursor);
        let store = st.store.clone();
        let outbox = outbox.clone();
        let envelopes = st
            .blocking(move |s| {
                let page = s.history(
                    &Scope::Tenant(tenant),
                    &HistoryFilter::default(),
                    PageRequest { after: after as i64, limit: 100 },
                )?;
                let mut o = outbox.lock().unwrap_or_else(|p| p.into_inner());
                let lookup = |id: JobId| store.job(&Scope::All, id).ok().map(|j| j.spec.queue);
                Ok(page.items.iter().map(|ev| o.envelope(ev, &lookup)).collect::<Vec<_>>())
            })
            .await?;
        let mut skipped = None;
        for env in envelopes {
            if !wanted(&hook.filter, &env) {
                skipped = Some(env.seq);
                continue;
            }
            if let Some(seq) = skipped.take() {
                st.blocking(move |s| s.skip_to(hook.id, seq)).await?;
            }
            let d = deliver(st, &hook, &env).await?;
            if d.status == "pending" {
                tracing::info!(webhook = hook.id, seq = d.seq, attempts = d.attempts, error = ?d.last_error, "webhook delivery failed; will retry");
                break;
            }
            if d.status == "dead" {
                tracing::warn!(webhook = hook.id, seq = d.seq, attempts = d.attempts, "webhook delivery dead-lettered");
            }
        }
        if let Some(seq) = skipped {
            st.blocking(move |s| s.skip_to(hook.id, seq)).await?;
        }
    }
    Ok(())
}

/// Publishes the events after the NATS cursor to JetStream, each awaited (acknowledged) before
/// the cursor moves; the message id `<site>:<seq>` lets JetStream drop duplicates.
pub async fn publish_once(
    st: &AppState,
    js: &async_nats::jetstream::Context,
    site_id: &str,
    outbox: &Arc<Mutex<Outbox>>,
) -> Result<usize, String> {
    let after = st.blocking(|s| s.publisher_cursor("nats")).await.map_err(|e| e.to_string())?;
    let store = st.store.clone();
    let outbox = outbox.clone();
    let envelopes = st
        .blocking(move |s| {
            let page =
                s.history(&Scope::All, &HistoryFilter::default(), PageRequest { after: after as i64, limit: 500 })?;
            let mut o = outbox.lock().unwrap_or_else(|p| p.into_inner());
            let lookup = |id: JobId| store.job(&Scope::All, id).ok().map(|j| j.spec.queue);
            Ok(page.items.iter().map(|ev| o.envelope(ev, &lookup)).collect::<Vec<_>>())
        })
        .await
        .map_err(|e| e.to_string())?;
    let prefix = &st.settings.nats.subject_prefix;
    for env in &envelopes {
        let subject = format!("{prefix}.{}.{}", env.tenant, env.event_type);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{site_id}:{}", env.seq).as_str());
        let body = serde_json::to_vec(env).map_err(|e| e.to_string())?;
        let ack = js.publish_with_headers(subject, headers, body.into()).await.map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())?;
        let seq = env.seq;
        st.blocking(move |s| s.set_publisher_cursor("nats", seq)).await.map_err(|e| e.to_string())?;
    }
    Ok(envelopes.len())
}
