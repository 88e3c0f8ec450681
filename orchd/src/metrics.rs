//! Prometheus metrics: counters and histograms fed by the event hub as history is tailed, queue
//! depth and SLO burn rates computed at scrape time. Every series carries a `tenant` label, so a
//! tenant's scrape can be cut down to its own series (site administrators see all).

use std::collections::BTreeMap;
use std::sync::Mutex;

use orch_core::failure::classify;
use orch_core::{JobId, Timestamp};
use orch_store::Depth;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::events::Envelope;
use crate::recent::JobRuns;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    tenant: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    tenant: String,
    queue: String,
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    tenant: String,
    queue: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DepthLabels {
    tenant: String,
    queue: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    tenant: String,
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BurnLabels {
    tenant: String,
    window: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BucketLabels {
    tenant: String,
    bucket: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    tenant: String,
    host: String,
}

/// Flow control as of a scrape: what [`Metrics::render`] shows of it.
#[derive(Clone, Debug, Default)]
pub struct FlowGauges {
    /// (tenant, bucket id, tokens, current refill per second, claims refused so far).
    pub buckets: Vec<(String, String, f64, f64, u64)>,
    /// (tenant, host, state: 0 closed, 1 half-open, 2 open).
    pub breakers: Vec<(String, String, i64)>,
}

/// One burn rate.
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct BurnRate {
    /// The tenant.
    pub tenant: String,
    /// `5m`, `1h` or `6h`.
    pub window: &'static str,
    /// Burn rate: 1 spends the error budget exactly over the objective's period.
    pub rate: f64,
    /// Jobs that finished in the window.
    pub jobs: u64,
}

/// The SLO windows burn rates are given for (name, milliseconds).
pub const BURN_WINDOWS: [(&str, i64); 3] = [("5m", 300_000), ("1h", 3_600_000), ("6h", 21_600_000)];

/// How many runs of enqueue times (see [`JobRuns`]) and running attempts the metrics keep.
const TIMED_JOBS: usize = 65_536;

struct Timing {
    /// When jobs were enqueued, for the start latency of their first claim: one entry per run
    /// of consecutive job ids enqueued at the same instant, the newest [`TIMED_JOBS`] runs.
    enqueued: JobRuns<Timestamp>,
    /// When each running attempt started, for its run time; the newest [`TIMED_JOBS`].
    started: BTreeMap<JobId, Timestamp>,
    /// Jobs finished per minute and tenant over the longest SLO window: (all, dead-lettered).
    /// Memory stays at tenants × 360 minutes whatever the throughput.
    finished: BTreeMap<(i64, String), (u64, u64)>,
}

const MINUTE_MS: i64 = 60_000;

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    start_latency: Family<JobLabels, Histogram>,
    run_time: Family<JobLabels, Histogram>,
    attempts: Family<JobLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    leases_lost: Family<JobLabels, Counter>,
    finished: Family<OutcomeLabels, Counter>,
    events: Family<EventLabels, Counter>,
    depth: Family<DepthLabels, Gauge>,
    burn: Family<BurnLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    bucket_tokens: Family<BucketLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    bucket_refill: Family<BucketLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    rate_limited: Family<BucketLabels, Counter>,
    breakers: Family<HostLabels, Gauge>,
    timing: Mutex<Timing>,
    objective: f64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

impl Metrics {
    /// Metrics with a success objective (e.g. 0.99) for the burn rates.
    pub fn new(objective: f64) -> Metrics {
        let mut registry = Registry::with_prefix("orch");
        let start_latency =
            Family::<JobLabels, Histogram>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let run_time = Family::<JobLabels, Histogram>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let attempts = Family::<JobLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let leases_lost = Family::<JobLabels, Counter>::default();
        let finished = Family::<OutcomeLabels, Counter>::default();
        let events = Family::<EventLabels, Counter>::default();
        let depth = Family::<DepthLabels, Gauge>::default();
        let burn = Family::<BurnLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register("jobs", "Jobs by tenant, type and state (queue depth)", depth.clone());
        registry.register("job_start_latency_seconds", "From enqueue to the first claim", start_latency.clone());
        registry.register("job_run_seconds", "From claim to ack or fail, per attempt", run_time.clone());
        registry.register("job_attempts", "Attempts started (claims)", attempts.clone());
        registry.register("job_failures", "Failed attempts by failure cluster", failures.clone());
        registry.register("leases_lost", "Leases that lapsed without a heartbeat", leases_lost.clone());
        registry.register("jobs_finished", "Jobs that reached a terminal state, by outcome", finished.clone());
        registry.register("events", "History events by type", events.clone());
        let bucket_tokens = Family::<BucketLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let bucket_refill = Family::<BucketLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let rate_limited = Family::<BucketLabels, Counter>::default();
        let breakers = Family::<HostLabels, Gauge>::default();
        registry.register("rate_limit_tokens", "Tokens in a rate-limit bucket", bucket_tokens.clone());
        registry.register(
            "rate_limit_refill_per_second",
            "A bucket's current refill (lowered by upstream throttling)",
            bucket_refill.clone(),
        );
        registry.register("rate_limited", "Claims a bucket refused", rate_limited.clone());
        registry.register(
            "breaker_state",
            "Circuit breaker per source host: 0 closed, 1 half-open, 2 open",
            breakers.clone(),
        );
        registry.register(
            "slo_burn_rate",
            "Error-budget burn rate of the job success objective over a window (1 = on budget)",
            burn.clone(),
        );
        Metrics {
            registry,
            start_latency,
            run_time,
            attempts,
            failures,
            leases_lost,
            finished,
            events,
            depth,
            burn,
            bucket_tokens,
            bucket_refill,
            rate_limited,
            breakers,
            timing: Mutex::new(Timing {
                enqueued: JobRuns::new(TIMED_JOBS),
                started: BTreeMap::new(),
                finished: BTreeMap::new(),
            }),
            objective: objective.clamp(0.0, 0.999_999),
        }
    }

    /// Counts one event.
    pub fn observe(&self, e: &Envelope) {
        let tenant = e.tenant.clone();
        self.events.get_or_create(&EventLabels { tenant: tenant.clone(), r#type: e.event_type.clone() }).inc();
        let (Some(id), Some(queue)) = (e.job_id, e.job_type.clone()) else { return };
        let labels = JobLabels { tenant: tenant.clone(), queue: queue.clone() };
        let mut t = self.timing.lock().unwrap_or_else(|p| p.into_inner());
        let secs = |from: Timestamp| (e.at.as_millis() - from.as_millis()).max(0) as f64 / 1000.0;
        match e.event_type.as_str() {
            "job.enqueued" => {
                t.enqueued.insert(id, e.at);
            }
            "job.claimed" => {
                self.attempts.get_or_create(&labels).inc();
                if e.data.get("attempt").and_then(|a| a.as_u64()) == Some(1) {
                    if let Some(enqueued) = t.enqueued.get(id) {
                        self.start_latency.get_or_create(&labels).observe(secs(*enqueued));
                    }
                }
                t.started.insert(id, e.at);
                while t.started.len() > TIMED_JOBS {
                    t.started.pop_first();
                }
            }
            "job.succeeded" | "job.failed" | "job.lease_expired" => {
                // The attempt is over, whether or not the job will run again.
                if let Some(claimed) = t.started.remove(&id) {
                    self.run_time.get_or_create(&labels).observe(secs(claimed));
                }
                if e.event_type == "job.failed" {
                    let class = e.data.get("class").and_then(|c| c.as_str()).unwrap_or_default();
                    let message = e.data.get("message").and_then(|c| c.as_str()).unwrap_or_default();
                    let cluster = classify(class, message).as_str().to_string();
                    self.failures
                        .get_or_create(&FailureLabels { tenant: tenant.clone(), queue: queue.clone(), cluster })
                        .inc();
                }
                if e.event_type == "job.lease_expired" {
                    self.leases_lost.get_or_create(&labels).inc();
                }
                let terminal = match e.event_type.as_str() {
                    "job.succeeded" => Some(true),
                    // A failure without a retry instant dead-letters the job.
                    _ => e.data.get("retry_at").is_none_or(|r| r.is_null()).then_some(false),
                };
                if let Some(ok) = terminal {
                    let outcome = if ok { "succeeded" } else { "dead" };
                    self.finished
                        .get_or_create(&OutcomeLabels { tenant: tenant.clone(), queue, outcome: outcome.into() })
                        .inc();
                    let counts = t.finished.entry((e.at.as_millis().div_euclid(MINUTE_MS), tenant)).or_default();
                    counts.0 += 1;
                    counts.1 += u64::from(!ok);
                }
            }
            "job.cancelled" => {
                t.started.remove(&id);
            }
            _ => {}
        }
        // Keep the longest window only.
        let horizon = e.at.plus_millis(-BURN_WINDOWS[2].1).as_millis().div_euclid(MINUTE_MS);
        while t.finished.first_key_value().is_some_and(|((minute, _), _)| *minute < horizon) {
            t.finished.pop_first();
        }
    }

    /// Error-budget burn rates per tenant and window as of `now`: the share of jobs that ended
    /// dead in the window, divided by the share the objective allows.
    pub fn burn_rates(&self, now: Timestamp) -> Vec<BurnRate> {
        let t = self.timing.lock().unwrap_or_else(|p| p.into_inner());
        let mut per: std::collections::BTreeMap<(String, &'static str), (u64, u64)> = Default::default();
        // Whole minutes: a window covers the minute it starts in.
        let now_minute = now.as_millis().div_euclid(MINUTE_MS);
        for (window, ms) in BURN_WINDOWS {
            let from = now.plus_millis(-ms).as_millis().div_euclid(MINUTE_MS);
            for ((_, tenant), (all, dead)) in
                t.finished.range((from, String::new())..).take_while(|((m, _), _)| *m <= now_minute)
            {
                let e = per.entry((tenant.clone(), window)).or_default();
                e.0 += all;
                e.1 += dead;
            }
        }
        per.into_iter()
            .map(|((tenant, window), (total, bad))| BurnRate {
                tenant,
                window,
                rate: bad as f64 / total as f64 / (1.0 - self.objective),
                jobs: total,
            })
            .collect()
    }

    /// The text exposition: depth and burn rates as of `now`, then everything; lines of other
    /// tenants left out when `tenant` is given.
    pub fn render(&self, depth: &[Depth], flow: &FlowGauges, now: Timestamp, tenant: Option<&str>) -> String {
        for f in [&self.bucket_tokens, &self.bucket_refill] {
            f.clear();
        }
        self.breakers.clear();
        for (tenant, bucket, tokens, refill, refused) in &flow.buckets {
            let labels = BucketLabels { tenant: tenant.clone(), bucket: bucket.clone() };
            self.bucket_tokens.get_or_create(&labels).set(*tokens);
            self.bucket_refill.get_or_create(&labels).set(*refill);
            let counter = self.rate_limited.get_or_create(&labels);
            counter.inc_by(refused.saturating_sub(counter.get()));
        }
        for (tenant, host, state) in &flow.breakers {
            self.breakers.get_or_create(&HostLabels { tenant: tenant.clone(), host: host.clone() }).set(*state);
        }
        self.depth.clear();
        for d in depth {
            let labels = DepthLabels { tenant: d.tenant.clone(), queue: d.queue.clone(), state: d.state.clone() };
            self.depth.get_or_create(&labels).set(d.jobs as i64);
        }
        self.burn.clear();
        for b in self.burn_rates(now) {
            self.burn.get_or_create(&BurnLabels { tenant: b.tenant, window: b.window.into() }).set(b.rate);
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            return String::new();
        }
        match tenant {
            None => text,
            Some(t) => {
                // Tenant names are restricted to [A-Za-z0-9._:-]: no escaping to worry about.
                let mine = format!("tenant=\"{t}\"");
                text.lines().filter(|l| l.starts_with('#') || l.contains(&mine)).flat_map(|l| [l, "\n"]).collect()
            }
        }
    }
}
