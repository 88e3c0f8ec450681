//! Flow control: what may be claimed now. Rate limits (token buckets per tenant and per source
//! host, with adaptive refill), quotas, concurrency limits, pauses, blackouts and circuit
//! breakers, applied as one [`ClaimGate`] inside each claim's transaction.
//!
//! The rules are tenant settings in the ledger (each change audited); [`FlowControl`] holds
//! them with the live state that is not worth a write per decision (bucket levels, breaker
//! windows). Every decision that refuses work and every change of a bucket or breaker becomes a
//! throttle record (what `throttles.jsonl` exports). Restarting the daemon refills the buckets
//! and closes the breakers.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use orch_core::failure::{classify, Cluster};
use orch_core::flow::{Blackout, Breaker, BreakerConfig, BreakerState, BucketConfig, TokenBucket, Transition};
use orch_core::throttle::ThrottleRecord;
use orch_core::{Job, Timestamp};
use orch_store::{
    Allocation, ClaimGate, ClaimRequest, Exclusion, IncidentSpec, RunningCount, Scope, SettingKind, Store, StoreError,
};

use crate::AppState;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The `[flow]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowSettings {
    /// Circuit breakers per source host.
    pub breaker: BreakerConfig,
    /// Queued jobs a tenant may have before enqueue answers 429 (a quota's `max_queued`
    /// overrides it per job type).
    pub max_queued_per_tenant: u64,
    /// `Retry-After` of a 429 from backpressure, in seconds.
    pub backpressure_retry_after_s: u64,
    /// How often the rules are re-read from the ledger (changes made by `orchd` commands on
    /// the same database), in milliseconds. Changes over the API apply at once.
    pub reload_ms: u64,
    /// At most one `denied` record per bucket per this many milliseconds.
    pub denial_record_ms: u64,
    /// When incidents open and close.
    pub incidents: IncidentSettings,
}

/// The `[flow.incidents]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IncidentSettings {
    /// How often conditions are checked, in milliseconds.
    pub check_ms: u64,
    /// A bucket whose refill stays below its configured rate this long opens a `throttled`
    /// incident, in milliseconds.
    pub throttled_after_ms: u64,
    /// A running job without a heartbeat this long is stuck, in milliseconds.
    pub stuck_after_ms: u64,
    /// A job whose lease lapsed this many times (the last attempt included) is stuck.
    pub stuck_lease_losses: u32,
}

impl Default for IncidentSettings {
    fn default() -> Self {
        IncidentSettings {
            check_ms: 5_000,
            throttled_after_ms: 300_000,
            stuck_after_ms: 1_800_000,
            stuck_lease_losses: 3,
        }
    }
}

impl FlowSettings {
    /// Refuses settings that cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.breaker.validate().map_err(|e| anyhow::anyhow!("flow.breaker: {e}"))?;
        let i = &self.incidents;
        if self.reload_ms == 0 || i.check_ms == 0 || i.stuck_lease_losses == 0 || i.stuck_after_ms == 0 {
            anyhow::bail!(
                "flow.reload_ms, flow.incidents.check_ms, stuck_after_ms and stuck_lease_losses must be at least 1"
            );
        }
        if self.max_queued_per_tenant == 0 {
            anyhow::bail!("flow.max_queued_per_tenant must be at least 1");
        }
        Ok(())
    }
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            breaker: BreakerConfig::default(),
            max_queued_per_tenant: 1_000_000,
            backpressure_retry_after_s: 5,
            reload_ms: 1_000,
            denial_record_ms: 1_000,
            incidents: IncidentSettings::default(),
        }
    }
}

/// A rate limit as stored (`rate_limit` setting): a bucket and, for a while, an operator's
/// lower rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitDoc {
    /// The bucket.
    #[serde(flatten)]
    pub bucket: BucketConfig,
    /// An operator's temporary throttle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleDoc>,
}

/// A temporary lower rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleDoc {
    /// The rate while it lasts, in thousandths of a token per second.
    pub rate_milli_per_s: u64,
    /// When it ends.
    pub until: Timestamp,
}

/// The longest an operator's throttle may last.
pub const MAX_THROTTLE_MS: u64 = 30 * 86_400_000;

impl RateLimitDoc {
    /// Starts an operator's throttle: `rate_per_s` (0.001 to 1,000,000) from `now` for
    /// `for_ms` (1 s to 30 days). The same rules for the API and `orchd throttle`; an error
    /// names what is wrong: `rate` or `duration`, and why.
    pub fn throttle(&mut self, rate_per_s: f64, for_ms: u64, now: Timestamp) -> Result<(), (&'static str, String)> {
        if !(rate_per_s.is_finite() && (0.001..=1_000_000.0).contains(&rate_per_s)) {
            return Err(("rate", "a throttle's rate must be between 0.001 and 1000000 per second".into()));
        }
        if !(1_000..=MAX_THROTTLE_MS).contains(&for_ms) {
            return Err(("duration", "a throttle lasts 1 s to 30 days".into()));
        }
        let until = now.plus_millis(for_ms as i64);
        self.throttle = Some(ThrottleDoc { rate_milli_per_s: (rate_per_s * 1000.0).round() as u64, until });
        Ok(())
    }

    /// The bucket in force at `now`.
    pub fn effective(&self, now: Timestamp) -> BucketConfig {
        match &self.throttle {
            Some(t) if now < t.until => {
                let rate = t.rate_milli_per_s.min(self.bucket.rate_milli_per_s).max(1);
                BucketConfig {
                    rate_milli_per_s: rate,
                    min_rate_milli_per_s: self.bucket.min_rate_milli_per_s.min(rate),
                    ..self.bucket.clone()
                }
            }
            _ => self.bucket.clone(),
        }
    }
}

/// A blackout as stored: its window and what it covers (everything of the tenant when neither
/// `queue` nor `source` is given).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlackoutDoc {
    /// When.
    pub window: Blackout,
    /// Only this job type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Only this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// What a pause, limit or blackout applies to, parsed from a setting id: `tenant`,
/// `queue:<type>`, `source:<source>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The whole tenant.
    Tenant,
    /// One job type.
    Queue(String),
    /// One source.
    Source(String),
}

impl Target {
    /// Parses a setting id.
    pub fn parse(id: &str) -> Option<Target> {
        match id.split_once(':') {
            None if id == "tenant" => Some(Target::Tenant),
            Some(("queue", q)) if !q.is_empty() => Some(Target::Queue(q.into())),
            Some(("source", s)) if !s.is_empty() => Some(Target::Source(s.into())),
            _ => None,
        }
    }

    fn exclusion(&self, tenant: &str) -> Exclusion {
        match self {
            Target::Tenant => Exclusion::Tenant(tenant.into()),
            Target::Queue(q) => Exclusion::Queue(tenant.into(), q.clone()),
            Target::Source(s) => Exclusion::Source(tenant.into(), s.clone()),
        }
    }
}

/// Which bucket: a tenant's or a tenant's source host's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BucketKey {
    /// The tenant.
    pub tenant: String,
    /// `tenant` or `host:<host>`.
    pub id: String,
}

/// A tenant's (or one job type's) quota; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Quota {
    max_active: Option<u64>,
    max_queued: Option<u64>,
    max_per_hour: Option<u64>,
}

/// The rules, as last read from the ledger.
#[derive(Debug, Default)]
struct Rules {
    rate_limits: BTreeMap<BucketKey, RateLimitDoc>,
    /// (tenant, job type or `*`) → its quota.
    quotas: BTreeMap<(String, String), Quota>,
    concurrency: BTreeMap<(String, Target), u64>,
    pauses: BTreeSet<(String, Target)>,
    blackouts: Vec<(String, String, BlackoutDoc)>,
    /// (tenant, source id) → host.
    hosts: HashMap<(String, String), String>,
    /// Tenants with any rule above (worked out once per load, not per claimed job).
    limited: BTreeSet<String>,
}

impl Rules {
    fn load(store: &dyn Store) -> Result<Rules, StoreError> {
        let mut r = Rules::default();
        let all = |kind| store.settings(&Scope::All, kind);
        for s in all(SettingKind::Source)? {
            // The stored doc of a source is its config; the host is in the setting's doc too.
            if let Some(host) = s.doc.get("host").and_then(Value::as_str) {
                r.hosts.insert((s.tenant.clone(), s.id.clone()), host.to_string());
            }
        }
        for s in all(SettingKind::RateLimit)? {
            match serde_json::from_value::<RateLimitDoc>(s.doc.clone()) {
                Ok(doc) => {
                    r.rate_limits.insert(BucketKey { tenant: s.tenant, id: s.id }, doc);
                }
                Err(e) => tracing::warn!(tenant = %s.tenant, id = %s.id, error = %e, "ignoring a rate limit"),
            }
        }
        for s in all(SettingKind::Quota)? {
            let n = |k: &str| s.doc.get(k).and_then(Value::as_u64);
            let q = Quota { max_active: n("max_active"), max_queued: n("max_queued"), max_per_hour: n("max_per_hour") };
            r.quotas.insert((s.tenant, s.id), q);
        }
        for s in all(SettingKind::Concurrency)? {
            match (Target::parse(&s.id), s.doc.get("max").and_then(Value::as_u64)) {
                (Some(t), Some(max)) => {
                    r.concurrency.insert((s.tenant, t), max);
                }
                _ => tracing::warn!(tenant = %s.tenant, id = %s.id, "ignoring a concurrency limit"),
            }
        }
        for s in all(SettingKind::Pause)? {
            if let Some(t) = Target::parse(&s.id) {
                r.pauses.insert((s.tenant, t));
            }
        }
        for s in all(SettingKind::Blackout)? {
            match serde_json::from_value::<BlackoutDoc>(s.doc.clone()) {
                Ok(doc) => r.blackouts.push((s.tenant, s.id, doc)),
                Err(e) => tracing::warn!(tenant = %s.tenant, id = %s.id, error = %e, "ignoring a blackout"),
            }
        }
        r.limited = (r.rate_limits.keys().map(|k| &k.tenant))
            .chain(r.quotas.keys().map(|(t, _)| t))
            .chain(r.concurrency.keys().map(|(t, _)| t))
            .chain(r.pauses.iter().map(|(t, _)| t))
            .chain(r.blackouts.iter().map(|(t, _, _)| t))
            .cloned()
            .collect();
        Ok(r)
    }

    fn host_of(&self, tenant: &str, source: &str) -> String {
        self.hosts.get(&(tenant.to_string(), source.to_string())).cloned().unwrap_or_else(|| source.to_string())
    }

    /// Whether anything at all limits this tenant's claims.
    fn touches(&self, tenant: &str) -> bool {
        self.limited.contains(tenant)
    }
}

/// The state of one breaker, for the API.
#[derive(Clone, Debug, Serialize)]
pub struct BreakerView {
    /// The tenant.
    pub tenant: String,
    /// The source host.
    pub host: String,
    /// `closed`, `open` or `half_open`.
    pub state: BreakerState,
    /// While open: when it half-opens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_until: Option<Timestamp>,
}

/// The state of one bucket, for the API.
#[derive(Clone, Debug, Serialize)]
pub struct BucketView {
    /// Which.
    #[serde(flatten)]
    pub key: BucketKey,
    /// Tokens now, in thousandths.
    pub tokens_milli: i64,
    /// Refill now (after adaptive changes), in thousandths of a token per second.
    pub rate_milli_per_s: u64,
    /// The configured refill (an operator's throttle included).
    pub configured_milli_per_s: u64,
    /// The burst.
    pub burst: u32,
}

/// Flow-control rules and live state; one per daemon, behind a mutex.
pub struct FlowControl {
    settings: FlowSettings,
    rules: Rules,
    buckets: HashMap<BucketKey, (BucketConfig, TokenBucket)>,
    breakers: HashMap<(String, String), Breaker>,
    last_denial: HashMap<BucketKey, Timestamp>,
    /// Records made outside a claim (feedback, breakers), written by [`FlowControl::take_pending`]'s caller.
    pending: Vec<ThrottleRecord>,
    /// Queued jobs by (tenant, job type or all), as last counted and moved since.
    depths: HashMap<(String, Option<String>), (u64, Timestamp)>,
    /// Start times within the last hour, by (tenant, quota id: a job type or `*`), for
    /// `max_per_hour`.
    starts: HashMap<(String, String), VecDeque<Timestamp>>,
    /// Since when each bucket's refill has been below its configured rate.
    throttled_since: HashMap<BucketKey, Timestamp>,
    /// Claims each bucket refused, ever (for `/metrics`).
    refused: HashMap<BucketKey, u64>,
}

/// What a worker reported about a job, as flow control sees it.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The job succeeded.
    Succeeded,
    /// An attempt failed.
    Failed {
        /// The worker's error class.
        class: String,
        /// Its message.
        message: String,
        /// The upstream's `Retry-After`, if the worker passed it on.
        retry_after_ms: Option<u64>,
    },
}

impl Outcome {
    /// What a worker's failure report tells flow control.
    pub fn failed(f: &orch_store::Failure) -> Outcome {
        Outcome::Failed { class: f.class.clone(), message: f.message.clone(), retry_after_ms: f.retry_after_ms }
    }
}

fn record(
    at: Timestamp,
    key: &BucketKey,
    action: &str,
    bucket: &TokenBucket,
    reason: String,
    details: Value,
) -> ThrottleRecord {
    ThrottleRecord {
        seq: 0,
        at,
        tenant: key.tenant.clone(),
        host: key.id.strip_prefix("host:").map(str::to_string),
        action: action.into(),
        tokens_milli: bucket.tokens_milli(at),
        refill_milli_per_s: bucket.rate_milli_per_s() as i64,
        reason,
        details,
    }
}

impl FlowControl {
    /// Flow control with the rules in `store`.
    pub fn load(settings: FlowSettings, store: &dyn Store) -> Result<FlowControl, StoreError> {
        let mut flow = FlowControl::empty(settings);
        flow.rules = Rules::load(store)?;
        Ok(flow)
    }

    /// Flow control with no rules (until [`reload`]).
    pub fn empty(settings: FlowSettings) -> FlowControl {
        FlowControl {
            settings,
            rules: Rules::default(),
            buckets: HashMap::new(),
            breakers: HashMap::new(),
            last_denial: HashMap::new(),
            pending: Vec::new(),
            depths: HashMap::new(),
            starts: HashMap::new(),
            throttled_since: HashMap::new(),
            refused: HashMap::new(),
        }
    }

    /// The bucket for `key` as configured at `now`, created full; `None` when no rate limit
    /// covers it. A configuration change (an operator's throttle starting or ending) is
    /// applied and recorded.
    fn bucket(&mut self, key: &BucketKey, now: Timestamp) -> Option<&mut TokenBucket> {
        let config = self.rules.rate_limits.get(key)?.effective(now);
        let entry =
            self.buckets.entry(key.clone()).or_insert_with(|| (config.clone(), TokenBucket::new(config.clone(), now)));
        if entry.0 != config {
            entry.1.reconfigure(config.clone(), now);
            entry.0 = config;
            let r = record(now, key, "reconfigured", &entry.1, "the configured rate changed".into(), Value::Null);
            self.pending.push(r);
        }
        Some(&mut self.buckets.get_mut(key).expect("just inserted").1)
    }

    /// The quota set for a job type, or for the whole tenant (`*`).
    fn quota(&self, tenant: &str, id: &str) -> Quota {
        self.rules.quotas.get(&(tenant.to_string(), id.to_string())).copied().unwrap_or_default()
    }

    /// The most jobs a tenant may have queued in all (`queue` = `*`) or of a job type.
    pub fn max_queued(&self, tenant: &str, queue: &str) -> u64 {
        self.quota(tenant, queue).max_queued.unwrap_or(self.settings.max_queued_per_tenant)
    }

    /// The `max_queued` of a job type's own quota, if it has one.
    pub fn queue_max_queued(&self, tenant: &str, queue: &str) -> Option<u64> {
        self.rules.quotas.get(&(tenant.to_string(), queue.to_string())).and_then(|q| q.max_queued)
    }

    /// `Retry-After` for backpressure, in seconds.
    pub fn backpressure_retry_after_s(&self) -> u64 {
        self.settings.backpressure_retry_after_s
    }

    /// How often rules are re-read.
    pub fn reload_ms(&self) -> u64 {
        self.settings.reload_ms
    }

    /// Takes in what a worker reported: upstream throttling lowers the host's refill, success
    /// restores it, and the host's breaker counts the outcome.
    pub fn observe(&mut self, job: &Job, outcome: &Outcome, now: Timestamp) {
        let Some(source) = &job.spec.source else { return };
        let host = self.rules.host_of(&job.tenant, source);
        let key = BucketKey { tenant: job.tenant.clone(), id: format!("host:{host}") };
        let (ok, throttled, retry_after_ms, why) = match outcome {
            Outcome::Succeeded => (true, false, None, String::new()),
            Outcome::Failed { class, message, retry_after_ms } => {
                let cluster = classify(class, message);
                let retry_after_ms = *retry_after_ms;
                let upstream = matches!(cluster, Cluster::Http429 | Cluster::Http5xx);
                (false, upstream, retry_after_ms, format!("upstream {}", cluster.as_str()))
            }
        };
        if let Some(bucket) = self.bucket(&key, now) {
            let change = if throttled {
                Some((bucket.on_throttled(now, retry_after_ms), "refill_decreased", why.clone()))
            } else if ok {
                bucket.on_success(now).map(|c| (c, "refill_increased", "upstream success".to_string()))
            } else {
                None
            };
            let below = bucket.rate_milli_per_s() < bucket.config().rate_milli_per_s;
            if let Some((c, action, reason)) = change {
                let details = json!({"from_milli_per_s": c.from_rate_milli_per_s, "job": job.id, "retry_after_ms": retry_after_ms});
                let r = record(now, &key, action, bucket, reason, details);
                self.pending.push(r);
            }
            if below {
                self.throttled_since.entry(key.clone()).or_insert(now);
            } else {
                self.throttled_since.remove(&key);
            }
        }
        let breaker_error = !ok && {
            let Outcome::Failed { class, message, .. } = outcome else { unreachable!() };
            matches!(classify(class, message), Cluster::Http429 | Cluster::Http5xx | Cluster::Timeout)
        };
        let config = self.settings.breaker.clone();
        let breaker = self.breakers.entry((job.tenant.clone(), host.clone())).or_insert_with(|| Breaker::new(config));
        if ok || breaker_error {
            if let Some(t) = breaker.record(now, ok) {
                self.pending.push(breaker_record(&job.tenant, &host, &t));
            }
        }
    }

    /// Records made since the last flush.
    pub fn take_pending(&mut self) -> Vec<ThrottleRecord> {
        std::mem::take(&mut self.pending)
    }

    /// The buckets of a scope.
    pub fn buckets(&self, scope: &Scope, now: Timestamp) -> Vec<BucketView> {
        let mut out: Vec<BucketView> = self
            .buckets
            .iter()
            .filter(|(k, _)| scope.allows(&k.tenant))
            .map(|(k, (c, b))| BucketView {
                key: k.clone(),
                tokens_milli: b.tokens_milli(now),
                rate_milli_per_s: b.rate_milli_per_s(),
                configured_milli_per_s: c.rate_milli_per_s,
                burst: c.burst,
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Bucket levels, refusals and breaker states of a scope, for `/metrics`.
    pub fn gauges(&self, scope: &Scope, now: Timestamp) -> crate::metrics::FlowGauges {
        let buckets = self
            .buckets(scope, now)
            .into_iter()
            .map(|b| {
                let refused = self.refused.get(&b.key).copied().unwrap_or(0);
                (b.key.tenant, b.key.id, b.tokens_milli as f64 / 1000.0, b.rate_milli_per_s as f64 / 1000.0, refused)
            })
            .collect();
        let breakers = self
            .breakers(scope)
            .into_iter()
            .map(|b| {
                let state = match b.state {
                    BreakerState::Closed => 0,
                    BreakerState::HalfOpen => 1,
                    BreakerState::Open => 2,
                };
                (b.tenant, b.host, state)
            })
            .collect();
        crate::metrics::FlowGauges { buckets, breakers }
    }

    /// The breakers of a scope.
    pub fn breakers(&self, scope: &Scope) -> Vec<BreakerView> {
        let mut out: Vec<BreakerView> = self
            .breakers
            .iter()
            .filter(|((t, _), _)| scope.allows(t))
            .map(|((tenant, host), b)| BreakerView {
                tenant: tenant.clone(),
                host: host.clone(),
                state: b.state(),
                open_until: b.open_until(),
            })
            .collect();
        out.sort_by(|a, b| (&a.tenant, &a.host).cmp(&(&b.tenant, &b.host)));
        out
    }

    /// The conditions behind `breaker_open` and `throttled` incidents at `now`: breakers not
    /// closed, and buckets whose refill has stayed below the configured rate for
    /// `incidents.throttled_after_ms`.
    pub fn incident_conditions(&mut self, now: Timestamp) -> Vec<IncidentSpec> {
        let buckets = &self.buckets;
        self.throttled_since
            .retain(|k, _| buckets.get(k).is_some_and(|(_, b)| b.rate_milli_per_s() < b.config().rate_milli_per_s));
        let mut out: Vec<IncidentSpec> = self
            .breakers
            .iter()
            .filter(|(_, b)| b.state() != BreakerState::Closed)
            .map(|((tenant, host), b)| IncidentSpec {
                tenant: tenant.clone(),
                kind: "breaker_open".into(),
                key: format!("host:{host}"),
                details: json!({"host": host, "state": b.state(), "open_until": b.open_until()}),
            })
            .collect();
        let after = self.settings.incidents.throttled_after_ms as i64;
        for (key, since) in &self.throttled_since {
            if now.as_millis() - since.as_millis() < after {
                continue;
            }
            let Some((config, bucket)) = self.buckets.get(key) else { continue };
            out.push(IncidentSpec {
                tenant: key.tenant.clone(),
                kind: "throttled".into(),
                key: key.id.clone(),
                details: json!({
                    "since": since,
                    "rate_milli_per_s": bucket.rate_milli_per_s(),
                    "configured_milli_per_s": config.rate_milli_per_s,
                }),
            });
        }
        out
    }

    /// The blackouts of a scope active at `now`, with their ends.
    pub fn active_blackouts(&self, scope: &Scope, now: Timestamp) -> Vec<(String, String, Timestamp)> {
        self.rules
            .blackouts
            .iter()
            .filter(|(t, _, _)| scope.allows(t))
            .filter_map(|(t, id, b)| b.window.active_until(now).map(|end| (t.clone(), id.clone(), end)))
            .collect()
    }
}

fn breaker_record(tenant: &str, host: &str, t: &Transition) -> ThrottleRecord {
    let name = |s: &BreakerState| {
        serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    };
    ThrottleRecord {
        seq: 0,
        at: t.at,
        tenant: tenant.into(),
        host: Some(host.into()),
        action: format!("breaker_{}", name(&t.to)),
        tokens_milli: 0,
        refill_milli_per_s: 0,
        reason: t.reason.clone(),
        details: json!({"from": name(&t.from)}),
    }
}

/// The gate of one claim.
pub struct Gate<'a> {
    flow: Held<'a>,
    now: Timestamp,
    /// Running jobs by (tenant, what) — queue, source, or the tenant as a whole.
    running: HashMap<(String, Target), u64>,
    records: Vec<ThrottleRecord>,
}

/// The flow lock as a claim's gate holds it: taken the first time the gate is asked anything,
/// which is inside the claim's transaction, and let go when the claim asks for its records,
/// last. A claim then holds it only while it runs with the ledger's writer, never while it
/// waits for the writer or for its group's commit: the async side takes the same lock (to count
/// queues for backpressure, for metrics) and must not wait behind an import or another
/// process's lock on the ledger, and the next claim of a group needs it.
struct Held<'a> {
    mutex: &'a Mutex<FlowControl>,
    guard: std::cell::OnceCell<MutexGuard<'a, FlowControl>>,
}

impl std::ops::Deref for Held<'_> {
    type Target = FlowControl;

    fn deref(&self) -> &FlowControl {
        self.guard.get_or_init(|| lock(self.mutex))
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut FlowControl {
        let mutex = self.mutex;
        let _ = self.guard.get_or_init(|| lock(mutex));
        self.guard.get_mut().expect("the lock was just taken")
    }
}

impl<'a> Gate<'a> {
    /// A gate for one claim at `now`, on `flow`, or on the lock already taken (`held`).
    pub fn new(flow: &'a Mutex<FlowControl>, held: Option<MutexGuard<'a, FlowControl>>, now: Timestamp) -> Gate<'a> {
        let guard = held.map(std::cell::OnceCell::from).unwrap_or_default();
        Gate { flow: Held { mutex: flow, guard }, now, running: HashMap::new(), records: Vec::new() }
    }

    fn deny(&mut self, key: &BucketKey, wait_ms: u64) {
        *self.flow.refused.entry(key.clone()).or_default() += 1;
        let every = self.flow.settings.denial_record_ms as i64;
        let last = self.flow.last_denial.get(key).copied();
        if last.is_some_and(|l| self.now.as_millis() - l.as_millis() < every) {
            return;
        }
        self.flow.last_denial.insert(key.clone(), self.now);
        if let Some((_, b)) = self.flow.buckets.get(key) {
            let r = record(self.now, key, "denied", b, "bucket empty".into(), json!({"wait_ms": wait_ms}));
            self.records.push(r);
        }
    }

    /// `max_per_hour`: at most that many starts in any sliding hour, of a job type (its own
    /// quota) and of the whole tenant (`*`).
    fn per_hour(&mut self, tenant: &str, queue: &str, commit: bool) -> Result<(), Exclusion> {
        let hour_ago = self.now.plus_millis(-3_600_000);
        for (id, target) in [(queue, Target::Queue(queue.into())), ("*", Target::Tenant)] {
            let Some(max) = self.flow.quota(tenant, id).max_per_hour else { continue };
            let starts = self.flow.starts.entry((tenant.to_string(), id.to_string())).or_default();
            while starts.front().is_some_and(|t| *t <= hour_ago) {
                starts.pop_front();
            }
            if starts.len() as u64 >= max {
                return Err(target.exclusion(tenant));
            }
            if commit {
                starts.push_back(self.now);
            }
        }
        Ok(())
    }

    /// Takes a token from `key`'s bucket (when `commit`), or only checks that one is there.
    fn take(&mut self, key: &BucketKey, commit: bool) -> Result<(), u64> {
        let now = self.now;
        let result = match self.flow.bucket(key, now) {
            None => return Ok(()),
            Some(b) if commit => b.try_take(now),
            Some(b) => b.clone().try_take(now),
        };
        if let Err(wait) = result {
            self.deny(key, wait);
        }
        result
    }

    fn count(&self, tenant: &str, t: Target) -> u64 {
        self.running.get(&(tenant.to_string(), t)).copied().unwrap_or(0)
    }
}

impl ClaimGate for Gate<'_> {
    fn wants_running(&self) -> bool {
        let r = &self.flow.rules;
        !r.concurrency.is_empty() || r.quotas.values().any(|q| q.max_active.is_some())
    }

    fn begin(&mut self, now: Timestamp, running: &[RunningCount]) -> Vec<Exclusion> {
        self.now = now;
        for c in running {
            *self.running.entry((c.tenant.clone(), Target::Tenant)).or_default() += c.count;
            *self.running.entry((c.tenant.clone(), Target::Queue(c.queue.clone()))).or_default() += c.count;
            if let Some(s) = &c.source {
                *self.running.entry((c.tenant.clone(), Target::Source(s.clone()))).or_default() += c.count;
            }
        }
        let rules = &self.flow.rules;
        let mut out: Vec<Exclusion> = rules.pauses.iter().map(|(t, target)| target.exclusion(t)).collect();
        for (tenant, _, b) in &rules.blackouts {
            if b.window.active_until(now).is_some() {
                out.push(match (&b.queue, &b.source) {
                    (Some(q), _) => Exclusion::Queue(tenant.clone(), q.clone()),
                    (None, Some(s)) => Exclusion::Source(tenant.clone(), s.clone()),
                    (None, None) => Exclusion::Tenant(tenant.clone()),
                });
            }
        }
        out
    }

    fn admit(&mut self, job: &Job) -> Result<(), Exclusion> {
        let tenant = job.tenant.as_str();
        let queue = job.spec.queue.as_str();
        let host = job.spec.source.as_ref().map(|s| (s.clone(), self.flow.rules.host_of(tenant, s)));
        if let Some((source, host)) = &host {
            if let Some(b) = self.flow.breakers.get_mut(&(tenant.to_string(), host.clone())) {
                let a = b.allow(self.now);
                if let Some(t) = &a.transition {
                    self.records.push(breaker_record(tenant, host, t));
                }
                if !a.allowed {
                    return Err(Exclusion::Source(tenant.into(), source.clone()));
                }
            }
        }
        if !self.flow.rules.touches(tenant) {
            return Ok(());
        }
        // Limits on what runs at once.
        // Quotas: a job type's own, and the tenant's (`*`) over all its types.
        for (id, target) in [(queue, Target::Queue(queue.into())), ("*", Target::Tenant)] {
            if let Some(max) = self.flow.quota(tenant, id).max_active {
                if self.count(tenant, target.clone()) >= max {
                    return Err(target.exclusion(tenant));
                }
            }
        }
        let mut targets = vec![Target::Queue(queue.into())];
        if let Some(s) = &job.spec.source {
            targets.push(Target::Source(s.clone()));
        }
        for t in &targets {
            if let Some(max) = self.flow.rules.concurrency.get(&(tenant.to_string(), t.clone())) {
                if self.count(tenant, t.clone()) >= *max {
                    return Err(t.exclusion(tenant));
                }
            }
        }
        // Rates: the host's bucket, the tenant's, the hourly quota. All are checked before any
        // is charged, so a refusal by one costs the others nothing.
        let mut buckets = Vec::new();
        if let Some((source, host)) = &host {
            let key = BucketKey { tenant: tenant.into(), id: format!("host:{host}") };
            buckets.push((key, Exclusion::Source(tenant.into(), source.clone())));
        }
        buckets.push((BucketKey { tenant: tenant.into(), id: "tenant".into() }, Exclusion::Tenant(tenant.into())));
        for (key, excl) in &buckets {
            if self.take(key, false).is_err() {
                return Err(excl.clone());
            }
        }
        self.per_hour(tenant, queue, false)?;
        for (key, _) in &buckets {
            let taken = self.take(key, true);
            debug_assert!(taken.is_ok(), "checked just before");
        }
        self.per_hour(tenant, queue, true)?;
        targets.push(Target::Tenant);
        for t in targets {
            *self.running.entry((tenant.to_string(), t)).or_default() += 1;
        }
        Ok(())
    }

    fn records(&mut self) -> Vec<ThrottleRecord> {
        let mut out = std::mem::take(&mut self.flow.pending);
        out.append(&mut self.records);
        // The claim is done with the gate, but may still wait for its group to commit, and
        // another claim of that group needs the lock.
        self.flow.guard.take();
        out
    }
}

pub(crate) fn lock(flow: &std::sync::Mutex<FlowControl>) -> std::sync::MutexGuard<'_, FlowControl> {
    flow.lock().unwrap_or_else(|p| p.into_inner())
}

/// Claims through the daemon's flow control. The claim holds the flow lock while it runs in its
/// transaction, so the gate's counts are the ledger's; on the blocking pool it takes the lock
/// only once the transaction has begun (see `Held`).
pub async fn claim(st: &AppState, req: ClaimRequest) -> Result<Vec<Allocation>, StoreError> {
    let (flow, clock) = (st.flow.clone(), st.clock.clone());
    let single = req.limit <= 1;
    let claim = move |s: &dyn Store| {
        // In place the lock is taken now, if it is free (see `Held` for the pool).
        let held = if orch_store::wait::allowed() { None } else { Some(orch_store::wait::lock(&flow)?) };
        let mut gate = Gate::new(&flow, held, clock.now());
        s.claim_gated(&req, &mut gate)
    };
    if single {
        st.call(claim).await
    } else {
        st.blocking(claim).await
    }
}

/// Feeds workers' reports on `jobs` to flow control and writes the records it made. In place if
/// the flow lock is free; if a claim holds it, on the blocking pool, where waiting for it holds
/// up no request but this one.
pub async fn observe(st: &AppState, jobs: &[&Job], outcome: Outcome) {
    fn feed(flow: &mut FlowControl, now: Timestamp, jobs: &[&Job], outcome: &Outcome) -> Vec<ThrottleRecord> {
        for job in jobs {
            flow.observe(job, outcome, now);
        }
        flow.take_pending()
    }
    let now = st.clock.now();
    let fed = orch_store::wait::without_waiting(|| orch_store::wait::lock(&st.flow))
        .map(|mut flow| feed(&mut flow, now, jobs, &outcome));
    let records = match fed {
        Ok(records) => records,
        Err(_) => {
            let (flow, owned) = (st.flow.clone(), jobs.iter().map(|&j| j.clone()).collect::<Vec<Job>>());
            crate::off_thread(move || {
                let jobs: Vec<&Job> = owned.iter().collect();
                feed(&mut lock(&flow), now, &jobs, &outcome)
            })
            .await
        }
    };
    if records.is_empty() {
        return;
    }
    if let Err(e) = st.call(move |s| s.record_throttles(records.clone())).await {
        tracing::warn!(error = %e, "throttle records could not be written");
    }
}

/// Re-reads the rules after a change, on the blocking pool (see [`reload_now`]).
pub async fn reload(st: &AppState) -> Result<(), StoreError> {
    let st = st.clone();
    crate::off_thread(move || reload_now(&st)).await
}

/// Re-reads the rules after a change: buckets keep their levels, and a changed configuration
/// applies now. The read waits for the store (on PostgreSQL, for the server) without holding
/// the flow-control lock, which enqueues take to count their queue and `/metrics` to read the
/// gauges; only the swap is done under it. Re-reads take turns, so the rules of an earlier
/// read never replace those of a later one.
pub fn reload_now(st: &AppState) -> Result<(), StoreError> {
    let _turn = st.flow_reloads.lock().unwrap_or_else(|p| p.into_inner());
    let rules = Rules::load(&*st.store)?;
    lock(&st.flow).rules = rules;
    Ok(())
}

/// A read-only look at the flow state of a scope.
pub fn view<T>(st: &AppState, f: impl FnOnce(&FlowControl, Timestamp) -> T) -> T {
    f(&lock(&st.flow), st.clock.now())
}

/// Like [`view`], for upkeep that changes the live state.
pub fn view_mut<T>(st: &AppState, f: impl FnOnce(&mut FlowControl, Timestamp) -> T) -> T {
    f(&mut lock(&st.flow), st.clock.now())
}

/// How old a counted queue depth may be before backpressure counts again.
pub const DEPTH_MAX_AGE_MS: i64 = 250;

/// Queued jobs of a tenant (and job type), counted to at most `bound + 1`, or as counted less
/// than [`DEPTH_MAX_AGE_MS`] ago plus what was enqueued since.
pub async fn depth(st: &AppState, tenant: &str, queue: Option<&str>, bound: u64) -> Result<u64, StoreError> {
    let now = st.clock.now();
    let key = (tenant.to_string(), queue.map(str::to_string));
    if let Some((n, at)) = lock(&st.flow).depths.get(&key) {
        if (0..DEPTH_MAX_AGE_MS).contains(&(now.as_millis() - at.as_millis())) {
            return Ok(*n);
        }
    }
    let (t, q) = key.clone();
    let n = st.call(move |s| s.queued(&t, q.as_deref(), bound.saturating_add(1))).await?;
    lock(&st.flow).depths.insert(key, (n, now));
    Ok(n)
}

/// Moves a counted depth by jobs just admitted.
pub fn add_depth(st: &AppState, tenant: &str, queue: Option<&str>, n: u64) {
    if let Some((d, _)) = lock(&st.flow).depths.get_mut(&(tenant.to_string(), queue.map(str::to_string))) {
        *d += n;
    }
}
