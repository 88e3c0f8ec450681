//! Flow control through the HTTP API with an injected clock: the daemon's own router and
//! state over a real SQLite ledger, driven request by request while a `ManualClock` moves,
//! so rates, windows and breaker timings are checked exactly rather than against wall time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use orch_core::{Clock, ManualClock, Timestamp};
use orch_store::SqliteStore;
use serde_json::{json, Value};
use tower::ServiceExt;

/// 2026-11-02T00:00:00Z, a Monday.
const T0: i64 = 1_793_577_600_000;

struct Reply {
    status: u16,
    json: Value,
    retry_after: Option<String>,
}

struct Site {
    state: orchd::AppState,
    app: axum::Router,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        Site::with(orchd::config::Settings::default())
    }

    fn with(settings: orchd::config::Settings) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(T0)));
        let store =
            SqliteStore::open(dir.path().join("ledger.db"), clock.clone(), Default::default(), Default::default())
                .unwrap();
        let state = orchd::AppState::new(Arc::new(store), clock.clone(), settings);
        state.set_ready();
        let app = orchd::http::router(state.clone());
        Site { state, app, clock, _dir: dir }
    }

    fn client(&self, tenant: &str, scopes: &str) -> Client<'_> {
        let (id, secret) = orchd::http::auth::mint_token();
        self.state
            .store
            .put_token(orch_store::NewToken {
                id,
                tenant: tenant.into(),
                scopes: scopes.split(',').map(str::to_string).collect(),
                label: String::new(),
                expires_at: None,
                hash: orchd::http::auth::token_hash(&secret),
            })
            .unwrap();
        Client { site: self, token: secret }
    }

    fn advance_ms(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

struct Client<'a> {
    site: &'a Site,
    token: String,
}

impl Client<'_> {
    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json");
        req = req.header("host", "localhost");
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let resp = self.site.app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20).await.unwrap();
        Reply { status, json: serde_json::from_slice(&bytes).unwrap_or(Value::Null), retry_after }
    }

    async fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let r = self.send(method, path, Some(body)).await;
        assert!((200..300).contains(&r.status), "{method} {path}: {} {}", r.status, r.json);
        r.json
    }

    async fn get(&self, path: &str) -> Value {
        let r = self.send("GET", path, None).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.json);
        r.json
    }

    async fn enqueue(&self, queue: &str, source: Option<&str>, n: usize) -> Vec<i64> {
        let jobs: Vec<Value> = (0..n).map(|i| json!({"queue": queue, "source": source, "payload": {"i": i}})).collect();
        let r = self.ok("POST", "/api/v1/jobs/batch", json!({ "jobs": jobs })).await;
        r["items"].as_array().unwrap().iter().map(|e| e["job"]["id"].as_i64().unwrap()).collect()
    }

    /// Claims up to `limit`; returns (job id, lease id) pairs.
    async fn claim(&self, queues: &[&str], limit: usize) -> Vec<(i64, String)> {
        let r = self.ok("POST", "/api/v1/claims", json!({"worker_id": "w", "queues": queues, "limit": limit})).await;
        r["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["job"]["id"].as_i64().unwrap(), a["lease_id"].as_str().unwrap().to_string()))
            .collect()
    }

    async fn ack(&self, (id, lease): &(i64, String)) {
        self.ok("POST", &format!("/api/v1/jobs/{id}/ack"), json!({ "lease_id": lease })).await;
    }

    async fn fail(&self, (id, lease): &(i64, String), message: &str, retryable: bool) -> Value {
        let class = message.split(' ').take(2).collect::<Vec<_>>().join("_").to_lowercase();
        let body = json!({"lease_id": lease, "error_class": class, "message": message, "retryable": retryable});
        self.ok("POST", &format!("/api/v1/jobs/{id}/fail"), body).await
    }

    async fn job(&self, id: i64) -> Value {
        self.get(&format!("/api/v1/jobs/{id}")).await["job"].clone()
    }

    async fn bucket(&self, id: &str) -> Value {
        let flow = self.get("/api/v1/flow").await;
        flow["buckets"].as_array().unwrap().iter().find(|b| b["id"] == id).cloned().unwrap_or(Value::Null)
    }

    async fn throttle_actions(&self) -> Vec<String> {
        let r = self.get("/api/v1/throttles?limit=1000").await;
        r["items"].as_array().unwrap().iter().map(|t| t["action"].as_str().unwrap().to_string()).collect()
    }
}

fn why() -> Value {
    json!({"reason": "test", "ticket": "CHG-1"})
}

fn with_why(mut v: Value) -> Value {
    v.as_object_mut().unwrap().extend(why().as_object().unwrap().clone());
    v
}

#[tokio::test]
async fn a_10_per_s_bucket_with_burst_5_never_exceeds_5_plus_10t() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:work,orch:read");
    admin.ok("PUT", "/api/v1/rate-limits/tenant", with_why(json!({"rate_per_s": 10.0, "burst": 5}))).await;
    admin.enqueue("ingest", None, 400).await;

    // Claim greedily at uneven moments for 20 s of daemon time; ack at once so that only the
    // bucket limits what is dispatched.
    let mut dispatched: Vec<(i64, usize)> = Vec::new();
    let mut step = 7u64;
    while site.now().as_millis() - T0 < 20_000 {
        let got = admin.claim(&["ingest"], 50).await;
        for a in &got {
            admin.ack(a).await;
        }
        dispatched.push((site.now().as_millis(), got.len()));
        step = (step * 37 + 11) % 173; // 0..172 ms, deterministic but irregular
        site.advance_ms(step);
    }
    let total: usize = dispatched.iter().map(|d| d.1).sum();
    // Over every interval [a, b] of claim times: at most 5 + 10 (b - a).
    for i in 0..dispatched.len() {
        let mut n = 0;
        for j in i..dispatched.len() {
            n += dispatched[j].1;
            let t = (dispatched[j].0 - dispatched[i].0) as f64 / 1000.0;
            assert!(n as f64 <= 5.0 + 10.0 * t, "{n} jobs in {t} s");
        }
    }
    // And the bucket is not stingy: 20 s give 5 + 200 less the last partial token.
    assert!(total >= 200, "only {total} dispatched in 20 s");
    let b = admin.bucket("tenant").await;
    assert_eq!((b["burst"].as_u64(), b["rate_milli_per_s"].as_u64()), (Some(5), Some(10_000)), "{b}");
    assert!(admin.throttle_actions().await.contains(&"denied".to_string()));
}

#[tokio::test]
async fn upstream_429s_lower_a_hosts_refill_and_successes_restore_it() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:work,orch:read");
    admin.ok("PUT", "/api/v1/sources/nvd", json!({"host": "services.nvd.nist.gov"})).await;
    let host = "host:services.nvd.nist.gov";
    admin.ok("PUT", &format!("/api/v1/rate-limits/{host}"), json!({"rate_per_s": 10.0, "burst": 5})).await;
    admin.enqueue("ingest", Some("nvd"), 200).await;

    // Two 429s halve the refill twice: 10/s → 5/s → 2.5/s.
    for expected in [5_000, 2_500] {
        let a = admin.claim(&["ingest"], 1).await;
        assert_eq!(a.len(), 1);
        admin.fail(&a[0], "HTTP 429 Too Many Requests", true).await;
        assert_eq!(admin.bucket(host).await["rate_milli_per_s"], expected);
        site.advance_ms(1_000);
    }
    // A throttled bucket is emptied: right after a 429 nothing of the host is dispatched.
    let a = admin.claim(&["ingest"], 1).await;
    admin.fail(&a[0], "http_429", true).await;
    assert_eq!(admin.bucket(host).await["rate_milli_per_s"], 1_250);
    assert!(admin.claim(&["ingest"], 10).await.is_empty(), "an emptied bucket dispatches nothing");

    // Each success adds back a tenth of the configured rate, up to it and no further.
    let mut rates = Vec::new();
    for _ in 0..12 {
        site.advance_ms(2_000);
        for a in admin.claim(&["ingest"], 1).await {
            admin.ack(&a).await;
        }
        rates.push(admin.bucket(host).await["rate_milli_per_s"].as_u64().unwrap());
    }
    assert!(rates.windows(2).all(|w| w[0] <= w[1]), "recovery only goes up: {rates:?}");
    assert_eq!(*rates.last().unwrap(), 10_000, "{rates:?}");
    assert!(rates.iter().filter(|r| **r == 10_000).count() >= 2, "and stays at the configured rate: {rates:?}");

    let r = admin.get("/api/v1/throttles?limit=1000").await;
    let items = r["items"].as_array().unwrap();
    let decreased: Vec<&Value> = items.iter().filter(|t| t["action"] == "refill_decreased").collect();
    assert_eq!(decreased.len(), 3);
    assert_eq!(decreased[0]["host"], "services.nvd.nist.gov");
    assert_eq!(decreased[0]["tenant"], "acme");
    assert_eq!(decreased[0]["refill_milli_per_s"], 5_000);
    assert!(decreased[0]["reason"].as_str().unwrap().contains("429"), "{}", decreased[0]);
    assert_eq!(items.iter().filter(|t| t["action"] == "refill_increased").count(), 9, "1.25 → 10 in steps of 1");

    // Another tenant's token sees none of it.
    let globex = site.client("globex", "orch:read");
    assert_eq!(globex.get("/api/v1/throttles").await["items"], json!([]));
    assert_eq!(globex.get("/api/v1/flow").await["buckets"], json!([]));
}

#[tokio::test]
async fn a_429_retry_after_holds_the_host_until_it_passes() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:work,orch:read");
    admin.ok("PUT", "/api/v1/rate-limits/host:api.example.test", json!({"rate_per_s": 100.0, "burst": 100})).await;
    admin.ok("PUT", "/api/v1/sources/ex", json!({"host": "api.example.test"})).await;
    admin.enqueue("ingest", Some("ex"), 10).await;
    let a = admin.claim(&["ingest"], 1).await;
    let body = json!({"lease_id": a[0].1, "error_class": "http_429", "message": "slow down",
        "retryable": true, "retry_after_seconds": 30});
    admin.ok("POST", &format!("/api/v1/jobs/{}/fail", a[0].0), body).await;
    site.advance_ms(29_000);
    assert!(admin.claim(&["ingest"], 10).await.is_empty(), "held by Retry-After");
    site.advance_ms(1_100);
    assert_eq!(admin.claim(&["ingest"], 1).await.len(), 1, "released when it passes");
}

#[tokio::test]
async fn a_breaker_opens_half_opens_on_schedule_and_closes_on_success() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:work,orch:read");
    admin.ok("PUT", "/api/v1/sources/nvd", json!({"host": "services.nvd.nist.gov"})).await;
    admin.enqueue("ingest", Some("nvd"), 40).await;
    let breaker = |flow: &Value| flow["breakers"][0]["state"].as_str().unwrap_or("none").to_string();

    // Default: 10 outcomes in 60 s at ≥ 50 % errors open it for 30 s.
    for i in 0..10 {
        let a = admin.claim(&["ingest"], 1).await;
        assert_eq!(a.len(), 1, "closed: work flows ({i})");
        if i % 2 == 0 {
            admin.ack(&a[0]).await;
        } else {
            admin.fail(&a[0], "HTTP 503 Service Unavailable", true).await;
        }
        site.advance_ms(100);
    }
    let flow = admin.get("/api/v1/flow").await;
    assert_eq!(breaker(&flow), "open", "{flow}");
    let opened = site.now().as_millis();
    assert!(admin.claim(&["ingest"], 10).await.is_empty(), "open: nothing of the host is dispatched");
    site.advance_ms(29_000);
    assert!(admin.claim(&["ingest"], 10).await.is_empty(), "still open at 29 s");
    site.advance_ms(1_100);

    // Half-open: exactly one probe.
    let probe = admin.claim(&["ingest"], 10).await;
    assert_eq!(probe.len(), 1, "one probe when half-open");
    assert_eq!(breaker(&admin.get("/api/v1/flow").await), "half_open");
    assert!(admin.claim(&["ingest"], 10).await.is_empty(), "no second probe");
    // A failed probe opens it again for another 30 s.
    admin.fail(&probe[0], "HTTP 502", true).await;
    assert_eq!(breaker(&admin.get("/api/v1/flow").await), "open");
    site.advance_ms(30_100);
    let probe = admin.claim(&["ingest"], 10).await;
    assert_eq!(probe.len(), 1);
    admin.ack(&probe[0]).await;
    assert_eq!(breaker(&admin.get("/api/v1/flow").await), "closed");
    assert!(admin.claim(&["ingest"], 10).await.len() > 1, "closed: work flows again");

    // Each transition is a throttle record.
    let r = admin.get("/api/v1/throttles?limit=1000").await;
    let transitions: Vec<(String, i64)> = r["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["action"].as_str().unwrap().starts_with("breaker_"))
        .map(|t| (t["action"].as_str().unwrap().to_string(), ms(&t["at"])))
        .collect();
    let names: Vec<&str> = transitions.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(names, ["breaker_open", "breaker_half_open", "breaker_open", "breaker_half_open", "breaker_closed"]);
    assert!(transitions[0].1 <= opened && transitions[1].1 >= opened + 30_000, "{transitions:?}");
}

fn ms(v: &Value) -> i64 {
    serde_json::from_value::<Timestamp>(v.clone()).unwrap().as_millis()
}

#[tokio::test]
async fn a_blackout_window_dispatches_nothing() {
    let site = Site::new();
    let op = site.client("acme", "orch:operate,orch:work,orch:read");
    op.enqueue("ingest", None, 5).await;
    op.enqueue("report", None, 5).await;
    let from = site.now();
    let to = from.plus_millis(3_600_000);
    let body = json!({"window": {"kind": "once", "from": from, "to": to}, "queue": "ingest", "reason": "maintenance"});
    op.ok("PUT", "/api/v1/blackouts/maint", body).await;
    assert!(op.claim(&["ingest"], 10).await.is_empty(), "inside the window");
    assert_eq!(op.claim(&["report"], 10).await.len(), 5, "other job types are not covered");
    let flow = op.get("/api/v1/flow").await;
    assert_eq!(flow["blackouts"][0]["name"], "maint");
    site.advance_ms(3_599_000);
    assert!(op.claim(&["ingest"], 10).await.is_empty(), "one second before the end");
    site.advance_ms(1_000);
    assert_eq!(op.claim(&["ingest"], 10).await.len(), 5, "after the window");

    // Recurring: every day 02:00–03:00 in Paris (01:00–02:00 UTC in November).
    op.enqueue("nightly", None, 3).await;
    let body =
        json!({"window": {"kind": "recurring", "cron": "0 2 * * *", "duration_ms": 3_600_000, "tz": "Europe/Paris"}});
    op.ok("PUT", "/api/v1/blackouts/nightly", with_why(body)).await;
    site.clock.set(Timestamp::from_millis(T0 + 86_400_000 + 3_600_000 + 60_000)); // 01:01 UTC next day
    assert!(op.claim(&["nightly"], 10).await.is_empty());
    site.clock.set(Timestamp::from_millis(T0 + 86_400_000 + 2 * 3_600_000)); // 02:00 UTC
    assert_eq!(op.claim(&["nightly"], 10).await.len(), 3);

    // A malformed window is refused.
    let bad = json!({"window": {"kind": "once", "from": to, "to": from}});
    let r = op.send("PUT", "/api/v1/blackouts/bad", Some(bad)).await;
    assert_eq!((r.status, r.json["error"]["code"].as_str()), (422, Some("invalid_request")), "{}", r.json);
}

#[tokio::test]
async fn pause_stops_claims_and_resume_restarts_them() {
    let site = Site::new();
    let op = site.client("acme", "orch:operate,orch:work,orch:read");
    op.enqueue("ingest", Some("nvd"), 3).await;
    op.enqueue("report", None, 3).await;
    for (target, blocked, free) in [
        ("queue:ingest", "ingest", Some("report")),
        ("source:nvd", "ingest", Some("report")),
        ("tenant", "report", None),
    ] {
        let r = op.ok("POST", &format!("/api/v1/pauses/{target}"), json!({"reason": "upstream incident"})).await;
        assert_eq!(r["audit"]["event"]["data"]["action"], "pause.put");
        assert!(op.claim(&[blocked], 10).await.is_empty(), "{target} paused");
        if let Some(q) = free {
            let got = op.claim(&[q], 1).await;
            assert_eq!(got.len(), 1, "{q} is not paused by {target}");
            op.ack(&got[0]).await;
        }
        let listed = op.get("/api/v1/pauses").await;
        assert_eq!(listed["items"][0]["id"], target);
        op.ok("DELETE", &format!("/api/v1/pauses/{target}"), json!({})).await;
    }
    assert_eq!(op.claim(&["ingest", "report"], 10).await.len(), 4, "resumed");
    let r = op.send("POST", "/api/v1/pauses/everything", None).await;
    assert_eq!(r.status, 422);
    let reader = site.client("acme", "orch:read");
    assert_eq!(reader.send("POST", "/api/v1/pauses/tenant", None).await.status, 403);
}

#[tokio::test]
async fn concurrency_limits_and_quotas_bound_what_runs_at_once() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:quota,orch:work,orch:read");
    admin.ok("PUT", "/api/v1/concurrency/queue:ingest", json!({"max": 2})).await;
    admin.enqueue("ingest", None, 6).await;
    let first = admin.claim(&["ingest"], 10).await;
    assert_eq!(first.len(), 2, "max 2 running");
    assert!(admin.claim(&["ingest"], 10).await.is_empty());
    admin.ack(&first[0]).await;
    assert_eq!(admin.claim(&["ingest"], 10).await.len(), 1, "one slot freed");

    // A tenant quota: at most 3 running in all; and at most 4 `report` jobs started in any hour.
    admin.ok("PUT", "/api/v1/quotas/*", with_why(json!({"max_active": 3}))).await;
    admin.ok("PUT", "/api/v1/quotas/report", with_why(json!({"max_per_hour": 4}))).await;
    admin.enqueue("report", None, 10).await;
    let report = admin.claim(&["report"], 10).await;
    assert_eq!(report.len(), 1, "2 ingest jobs run: one slot left under max_active 3");
    assert!(admin.claim(&["report", "ingest"], 10).await.is_empty());
    let r = admin.get("/api/v1/jobs?state=running").await;
    for j in r["items"].as_array().unwrap() {
        let lease = j["lease"]["id"].as_str().unwrap().to_string();
        admin.ack(&(j["id"].as_i64().unwrap(), lease)).await;
    }
    // Every 5 minutes for an hour, take what is allowed (max_active no longer binds: jobs are
    // acked at once).
    let mut started = vec![1];
    for _ in 0..12 {
        site.advance_ms(5 * 60_000);
        let mut n = 0;
        for a in admin.claim(&["report"], 10).await {
            n += 1;
            admin.ack(&a).await;
        }
        started.push(n);
    }
    // t=0: 1 (max_active), t=5: 3 more (4 in the hour), nothing until the first start is an
    // hour old at t=60, when one more may start (t=5's three become free at t=65).
    assert_eq!(started, [1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
}

#[tokio::test]
async fn backpressure_answers_429_with_retry_after() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:quota,orch:work,orch:read");
    admin.ok("PUT", "/api/v1/quotas/ingest", with_why(json!({"max_queued": 5}))).await;
    admin.enqueue("ingest", None, 5).await;
    let r = admin.send("POST", "/api/v1/jobs", Some(json!({"queue": "ingest"}))).await;
    assert_eq!(r.status, 429, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "backpressure");
    assert_eq!(r.retry_after.as_deref(), Some("5"));
    let r = admin
        .send("POST", "/api/v1/jobs/batch", Some(json!({"jobs": [{"queue": "other"}, {"queue": "ingest"}]})))
        .await;
    assert_eq!(r.status, 429, "a batch that would pass the bound is refused whole");
    assert_eq!(admin.get("/api/v1/jobs?type=other").await["items"], json!([]), "nothing of it was written");
    admin.enqueue("other", None, 3).await;

    // Working the queue down makes room again.
    site.advance_ms(1_000);
    for a in admin.claim(&["ingest"], 2).await {
        admin.ack(&a).await;
    }
    site.advance_ms(1_000);
    assert_eq!(admin.enqueue("ingest", None, 2).await.len(), 2);
    let r = admin.send("POST", "/api/v1/jobs", Some(json!({"queue": "ingest"}))).await;
    assert_eq!(r.status, 429);
}

#[tokio::test]
async fn a_diamond_dag_runs_in_order_and_a_failed_parent_blocks_or_cancels() {
    let site = Site::new();
    let w = site.client("acme", "orch:work,orch:operate,orch:read");
    let diamond = |policy: &str| {
        json!({"on_parent_failure": policy, "jobs": [
            {"key": "merge", "queue": "merge", "depends_on": ["left", "right"]},
            {"key": "left", "queue": "parse", "depends_on": ["fetch"]},
            {"key": "right", "queue": "parse", "depends_on": ["fetch"]},
            {"key": "fetch", "queue": "fetch", "max_attempts": 1},
        ]})
    };
    let all = ["fetch", "parse", "merge"];
    let run = w.ok("POST", "/api/v1/runs", diamond("block")).await;
    let ids: BTreeMap<String, i64> =
        run["jobs"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_i64().unwrap())).collect();
    let mut order = Vec::new();
    loop {
        let got = w.claim(&all, 10).await;
        if got.is_empty() {
            break;
        }
        let mut wave: Vec<&str> =
            got.iter().map(|(id, _)| ids.iter().find(|(_, v)| *v == id).unwrap().0.as_str()).collect();
        wave.sort();
        order.push(wave.join(","));
        for a in &got {
            w.ack(a).await;
        }
    }
    assert_eq!(order, ["fetch", "left,right", "merge"]);
    let run_id = run["run"]["id"].as_i64().unwrap();
    assert_eq!(w.get(&format!("/api/v1/runs/{run_id}")).await["state"], "completed");

    // block: a dead-lettered parent leaves its descendants waiting, until it is retried.
    let run = w.ok("POST", "/api/v1/runs", diamond("block")).await;
    let fetch = w.claim(&all, 10).await;
    assert_eq!(fetch.len(), 1);
    assert_eq!(w.fail(&fetch[0], "parse error", false).await["job"]["state"], "dead");
    assert!(w.claim(&all, 10).await.is_empty(), "children of a dead parent are not claimable");
    for k in ["left", "right", "merge"] {
        assert_eq!(w.job(run["jobs"][k].as_i64().unwrap()).await["state"], "queued");
    }
    w.ok("POST", &format!("/api/v1/jobs/{}/retry", fetch[0].0), json!({})).await;
    let again = w.claim(&all, 10).await;
    assert_eq!(again.len(), 1, "the retried parent runs first");
    w.ack(&again[0]).await;
    assert_eq!(w.claim(&all, 10).await.len(), 2, "then its children");

    // cancel: a dead-lettered parent cancels every descendant.
    let run = w.ok("POST", "/api/v1/runs", diamond("cancel")).await;
    let fetch = w.claim(&["fetch"], 10).await;
    w.fail(&fetch[0], "HTTP 404", false).await;
    for k in ["left", "right", "merge"] {
        assert_eq!(w.job(run["jobs"][k].as_i64().unwrap()).await["state"], "cancelled", "{k}");
    }
    let run_id = run["run"]["id"].as_i64().unwrap();
    assert_eq!(w.get(&format!("/api/v1/runs/{run_id}")).await["state"], "failed");

    // A cycle is refused, naming it, and writes nothing.
    let before = w.get("/api/v1/jobs?limit=1000").await["items"].as_array().unwrap().len();
    let cyclic = json!({"jobs": [
        {"key": "a", "queue": "q", "depends_on": ["c"]},
        {"key": "b", "queue": "q", "depends_on": ["a"]},
        {"key": "c", "queue": "q", "depends_on": ["b"]},
        {"key": "d", "queue": "q"},
    ]});
    let r = w.send("POST", "/api/v1/runs", Some(cyclic)).await;
    assert_eq!((r.status, r.json["error"]["code"].as_str()), (422, Some("dag_cycle")), "{}", r.json);
    assert_eq!(r.json["error"]["details"]["cycle"], json!(["a", "c", "b", "a"]));
    assert!(r.json["error"]["message"].as_str().unwrap().contains("a -> c -> b -> a"));
    assert_eq!(w.get("/api/v1/jobs?limit=1000").await["items"].as_array().unwrap().len(), before);

    // Replay makes a new run with the same shape.
    let first = order.len();
    let r = w.ok("POST", &format!("/api/v1/runs/{run_id}/replay"), json!({"reason": "rerun after fix"})).await;
    assert_eq!(r["run"]["kind"], "replay");
    assert_eq!(r["jobs"].as_object().unwrap().len(), 4);
    let got = w.claim(&all, 10).await;
    assert_eq!(got.len(), 1, "the replayed run starts from its root ({first} waves before)");
}

#[tokio::test]
async fn a_job_depending_on_another_tenants_job_is_refused() {
    let site = Site::new();
    let acme = site.client("acme", "orch:work,orch:read");
    let globex = site.client("globex", "orch:work,orch:read");
    let theirs = globex.enqueue("q", None, 1).await[0];
    // Refused exactly as a job that does not exist is: nothing says that it does.
    let r = acme.send("POST", "/api/v1/jobs", Some(json!({"queue": "q", "depends_on": [theirs]}))).await;
    let none = acme.send("POST", "/api/v1/jobs", Some(json!({"queue": "q", "depends_on": [theirs + 1000]}))).await;
    assert_eq!(r.status, 422, "{}", r.json);
    assert_eq!(
        r.json["error"]["message"],
        none.json["error"]["message"].as_str().unwrap().replace(&(theirs + 1000).to_string(), &theirs.to_string())
    );
    assert_eq!(acme.get("/api/v1/jobs").await["items"], json!([]), "nothing written");
    let mine = acme.enqueue("q", None, 1).await[0];
    let child = acme.ok("POST", "/api/v1/jobs", json!({"queue": "q", "depends_on": [mine]})).await;
    assert_eq!(child["job"]["spec"]["depends_on"], json!([mine]));
    let got = acme.claim(&["q"], 10).await;
    assert_eq!(got.iter().map(|a| a.0).collect::<Vec<_>>(), [mine], "the child waits for its parent");
}

#[tokio::test]
async fn a_backfill_of_30_daily_windows_enqueues_30_once_and_tracks_the_watermark() {
    let site = Site::new();
    let bf = site.client("acme", "orch:backfill,orch:work,orch:read");
    let body = json!({"queue": "ingest", "source": "nvd", "from": "2026-10-01T00:00:00Z",
        "to": "2026-10-31T00:00:00Z", "window_seconds": 86400, "reason": "NVD outage", "ticket": "INC-7"});
    let r = bf.ok("POST", "/api/v1/backfills", body.clone()).await;
    assert_eq!((r["enqueued"].as_u64(), r["existing"].as_u64()), (Some(30), Some(0)));
    let r = bf.ok("POST", "/api/v1/backfills", body.clone()).await;
    assert_eq!((r["enqueued"].as_u64(), r["existing"].as_u64()), (Some(0), Some(30)));

    // Finish the first ten windows: the watermark moves to the end of the tenth.
    let mut done = 0;
    while done < 10 {
        let got = bf.claim(&["ingest"], 10 - done).await;
        for a in &got {
            bf.ack(a).await;
        }
        done += got.len();
    }
    let mut dry = body.clone();
    dry["dry_run"] = json!(true);
    let plan = bf.ok("POST", "/api/v1/backfills", dry.clone()).await;
    assert_eq!(plan["watermark"], "2026-10-11T00:00:00.000Z", "{plan}");
    let statuses: Vec<&str> =
        plan["windows"].as_array().unwrap().iter().map(|w| w["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "complete").count(), 10, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == "pending").count(), 20, "{statuses:?}");

    // Asked to, it re-runs completed windows (and only those).
    let mut rerun = body.clone();
    rerun["rerun_complete"] = json!(true);
    let r = bf.ok("POST", "/api/v1/backfills", rerun).await;
    assert_eq!((r["enqueued"].as_u64(), r["existing"].as_u64()), (Some(10), Some(20)), "{r}");
}

#[tokio::test]
async fn a_cron_schedule_fires_on_time_once_and_catches_up_to_its_bound() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:work,orch:read");
    let body = json!({"cron": "*/15 * * * *", "tz": "Europe/Paris", "overlap": "queue", "max_catch_up": 2,
        "job": {"queue": "ingest", "source": "nvd", "payload": {"feed": "recent"}}});
    admin.ok("PUT", "/api/v1/schedules/nvd-recent", body).await;
    let fire = || async { orchd::schedules::fire_due(&site.state).await.unwrap() };
    assert_eq!(fire().await.enqueued, 0, "created on a boundary: the next firing is 15 min away");
    site.advance_ms(14 * 60_000);
    assert_eq!(fire().await.enqueued, 0);
    site.advance_ms(60_000);
    assert_eq!(fire().await.enqueued, 1);
    assert_eq!(fire().await.enqueued, 0, "a firing enqueues once");
    let jobs = admin.get("/api/v1/jobs?type=ingest").await;
    let job = &jobs["items"][0];
    assert_eq!(job["spec"]["payload"]["scheduled_for"], "2026-11-02T00:15:00.000Z");
    assert_eq!(job["spec"]["idempotency_key"], format!("schedule:nvd-recent:{}", T0 + 15 * 60_000));

    // Down for two hours: 8 firings missed, the 2 most recent enqueued.
    site.advance_ms(2 * 3_600_000);
    let f = fire().await;
    assert_eq!((f.enqueued, f.missed), (2, 6));
    let jobs = admin.get("/api/v1/jobs?type=ingest&limit=100").await;
    let mut when: Vec<String> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["spec"]["payload"]["scheduled_for"].as_str().unwrap().to_string())
        .collect();
    when.sort();
    assert_eq!(when, ["2026-11-02T00:15:00.000Z", "2026-11-02T02:00:00.000Z", "2026-11-02T02:15:00.000Z"]);

    // skip: while the last firing's job is not done, the next firing is skipped.
    let mut body = admin.get("/api/v1/schedules").await["items"][0]["value"].clone();
    body["overlap"] = json!("skip");
    body.as_object_mut().unwrap().remove("created_at");
    admin.ok("PUT", "/api/v1/schedules/nvd-recent", body).await;
    site.advance_ms(15 * 60_000);
    assert_eq!(fire().await, orchd::schedules::Fired { enqueued: 0, skipped: 1, missed: 0 });

    // A bad expression or zone is refused.
    for (cron, tz) in [("61 * * * *", "UTC"), ("* * * * *", "Mars/Olympus")] {
        let r = admin
            .send("PUT", "/api/v1/schedules/x", Some(json!({"cron": cron, "tz": tz, "job": {"queue": "q"}})))
            .await;
        assert_eq!(r.status, 422, "{cron} {tz}: {}", r.json);
    }
}

#[tokio::test]
async fn an_operator_throttle_lowers_a_rate_for_a_while() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:operate,orch:work,orch:read");
    admin.ok("PUT", "/api/v1/rate-limits/tenant", json!({"rate_per_s": 10.0, "burst": 1})).await;
    admin.enqueue("q", None, 1000).await;
    let r = admin
        .send("POST", "/api/v1/rate-limits/tenant/throttle", Some(json!({"rate_per_s": 1.0, "seconds": 60})))
        .await;
    assert_eq!(r.status, 422, "a throttle needs a reason: {}", r.json);
    admin
        .ok(
            "POST",
            "/api/v1/rate-limits/tenant/throttle",
            json!({"rate_per_s": 1.0, "seconds": 60, "reason": "upstream asked"}),
        )
        .await;
    let slow = count_over(&site, &admin, 30).await;
    assert!((29..=31).contains(&slow), "1/s while throttled: {slow}");
    site.advance_ms(30_000);
    let fast = count_over(&site, &admin, 10).await;
    assert!((99..=101).contains(&fast), "10/s after it ends: {fast}");
}

/// Claims (and acks) as much as allowed every 100 ms for `secs` seconds; returns how many.
async fn count_over(site: &Site, client: &Client<'_>, secs: u64) -> usize {
    let mut n = 0;
    for _ in 0..secs * 10 {
        for a in client.claim(&["q"], 100).await {
            client.ack(&a).await;
            n += 1;
        }
        site.advance_ms(100);
    }
    n
}

#[tokio::test]
async fn incidents_open_when_conditions_start_and_close_when_they_clear() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:work,orch:read");
    let check = || async { orchd::incidents::check(&site.state).await.unwrap() };
    let open = |kind: &'static str| {
        let admin = &admin;
        async move {
            let r = admin.get("/api/v1/incidents?state=open").await;
            r["items"].as_array().unwrap().iter().filter(|i| i["kind"] == kind).cloned().collect::<Vec<Value>>()
        }
    };
    assert_eq!(check().await, Default::default(), "nothing to report");

    // A breaker opens: so does an incident; it closes with the breaker.
    admin.ok("PUT", "/api/v1/sources/nvd", json!({"host": "services.nvd.nist.gov"})).await;
    admin.enqueue("ingest", Some("nvd"), 20).await;
    for _ in 0..10 {
        let a = admin.claim(&["ingest"], 1).await;
        admin.fail(&a[0], "HTTP 503", true).await;
        site.advance_ms(100);
    }
    let c = check().await;
    assert_eq!(c.opened.len(), 1, "{c:?}");
    assert_eq!(check().await, Default::default(), "an open incident is not opened twice");
    let breaker = open("breaker_open").await;
    assert_eq!(breaker.len(), 1);
    assert_eq!(breaker[0]["key"], "host:services.nvd.nist.gov");
    assert_eq!(breaker[0]["tenant"], "acme");

    // The 503s also lowered the host's refill? No rate limit is set, so no bucket: only the
    // breaker. Let it half-open and close.
    site.advance_ms(30_100);
    let probe = admin.claim(&["ingest"], 1).await;
    admin.ack(&probe[0]).await;
    let c = check().await;
    assert_eq!((c.opened.len(), c.closed.len()), (0, 1), "{c:?}");
    assert!(open("breaker_open").await.is_empty());
    let closed = admin.get("/api/v1/incidents?state=closed").await;
    assert_eq!(closed["items"][0]["id"], breaker[0]["id"]);
    assert!(closed["items"][0]["closed_at"].is_string());

    // Sustained throttling: a host's refill below its rate for 5 minutes.
    admin.ok("PUT", "/api/v1/rate-limits/host:services.nvd.nist.gov", json!({"rate_per_s": 10.0, "burst": 5})).await;
    let a = admin.claim(&["ingest"], 1).await;
    admin.fail(&a[0], "HTTP 429", true).await;
    site.advance_ms(299_000);
    check().await;
    assert!(open("throttled").await.is_empty(), "not yet: 4 min 59 s");
    site.advance_ms(1_000);
    check().await;
    let throttled = open("throttled").await;
    assert_eq!(throttled.len(), 1);
    assert_eq!(throttled[0]["details"]["rate_milli_per_s"], 5_000);
    for _ in 0..5 {
        for a in admin.claim(&["ingest"], 1).await {
            admin.ack(&a).await;
        }
        site.advance_ms(1_000);
    }
    check().await;
    assert!(open("throttled").await.is_empty(), "recovered: {}", admin.bucket("host:services.nvd.nist.gov").await);

    // A job whose lease keeps lapsing is stuck; it stops being stuck when it finishes.
    let id = admin.ok("POST", "/api/v1/jobs", json!({"queue": "slow", "max_attempts": 10})).await["job"]["id"]
        .as_i64()
        .unwrap();
    for _ in 0..3 {
        let got = admin
            .send("POST", "/api/v1/claims", Some(json!({"worker_id": "w", "queues": ["slow"], "lease_seconds": 1})))
            .await;
        assert_eq!(got.json["allocations"].as_array().unwrap().len(), 1, "{}", got.json);
        site.advance_ms(1_001);
        assert_eq!(site.state.store.reap_expired_leases(100).unwrap(), 1);
        site.advance_ms(600_000); // past the retry backoff
    }
    check().await;
    let stuck = open("job_stuck").await;
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(stuck[0]["key"], format!("job:{id}"));
    assert!(stuck[0]["details"]["why"].as_str().unwrap().contains("lapsed"), "{}", stuck[0]);
    let a = admin.claim(&["slow"], 1).await;
    admin.ack(&a[0]).await;
    check().await;
    assert!(open("job_stuck").await.is_empty());

    // A running job with a long lease and no heartbeat for 30 minutes is stuck too; a
    // heartbeat clears it.
    admin.enqueue("long", None, 1).await;
    let got =
        admin.ok("POST", "/api/v1/claims", json!({"worker_id": "w", "queues": ["long"], "lease_seconds": 3600})).await;
    let (id, lease) = (got["allocations"][0]["job"]["id"].as_i64().unwrap(), got["allocations"][0]["lease_id"].clone());
    site.advance_ms(1_800_001);
    check().await;
    assert_eq!(open("job_stuck").await.len(), 1);
    admin
        .ok("POST", &format!("/api/v1/jobs/{id}/heartbeat"), json!({"lease_id": lease, "progress": {"pct": 50}}))
        .await;
    check().await;
    assert!(open("job_stuck").await.is_empty());

    // Every opening and closing is in the audit history; another tenant sees none of it.
    let h = admin.get("/api/v1/history?type=audit&limit=1000").await;
    let actions: Vec<&str> = h["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["data"]["action"].as_str().unwrap())
        .filter(|a| a.starts_with("incident."))
        .collect();
    assert_eq!(actions, ["incident.opened", "incident.closed"].repeat(4));
    let globex = site.client("globex", "orch:read");
    assert_eq!(globex.get("/api/v1/incidents").await["items"], json!([]));
    let r = admin.send("GET", "/api/v1/incidents?state=maybe", None).await;
    assert_eq!(r.status, 422);
}

#[tokio::test]
async fn removing_a_rule_lifts_it_and_is_audited() {
    let site = Site::new();
    let admin = site.client("acme", "orch:admin,orch:operate,orch:work,orch:read");
    let reader = site.client("acme", "orch:read");
    admin.enqueue("q", None, 20).await;
    let until = site.now().plus_millis(3_600_000);
    admin
        .ok("PUT", "/api/v1/blackouts/all", json!({"window": {"kind": "once", "from": site.now(), "to": until}}))
        .await;
    admin.ok("PUT", "/api/v1/concurrency/queue:q", json!({"max": 1})).await;
    admin.ok("PUT", "/api/v1/rate-limits/tenant", json!({"rate_per_s": 0.001, "burst": 1})).await;
    let sched = json!({"cron": "* * * * *", "job": {"queue": "cron"}});
    admin.ok("PUT", "/api/v1/schedules/every-minute", sched).await;
    assert!(admin.claim(&["q"], 10).await.is_empty(), "blacked out");

    assert_eq!(reader.send("DELETE", "/api/v1/blackouts/all", None).await.status, 403);
    let r = admin.ok("DELETE", "/api/v1/blackouts/all", json!({"reason": "maintenance over"})).await;
    assert_eq!(r["audit"]["event"]["data"]["action"], "blackout.delete");
    let first = admin.claim(&["q"], 10).await;
    assert_eq!(first.len(), 1, "concurrency 1 (and a bucket of 1)");
    admin.ack(&first[0]).await;
    assert!(admin.claim(&["q"], 10).await.is_empty(), "the bucket is empty");
    admin.ok("DELETE", "/api/v1/rate-limits/tenant", json!({})).await;
    admin.ok("DELETE", "/api/v1/concurrency/queue:q", json!({})).await;
    assert_eq!(admin.claim(&["q"], 10).await.len(), 10, "no limit left");

    admin.ok("DELETE", "/api/v1/schedules/every-minute", json!({})).await;
    site.advance_ms(10 * 60_000);
    assert_eq!(orchd::schedules::fire_due(&site.state).await.unwrap().enqueued, 0, "a removed schedule never fires");
    for path in ["/api/v1/schedules/every-minute", "/api/v1/blackouts/none", "/api/v1/rate-limits/host:x"] {
        let r = admin.send("DELETE", path, None).await;
        assert_eq!((r.status, r.json["error"]["code"].as_str()), (404, Some("not_found")), "{path}");
    }
    for kind in ["blackouts", "concurrency", "rate-limits", "schedules"] {
        assert_eq!(reader.get(&format!("/api/v1/{kind}")).await["items"], json!([]), "{kind}");
    }
}
