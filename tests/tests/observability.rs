//! Observability against the real daemon: metrics after a known workload, failure clusters, the
//! event stream (tenant filtering, resumption, the buffer bound) over SSE and WebSocket.

use std::time::{Duration, Instant};

use orch_e2e::api::Client;
use orch_e2e::{token, Daemon};
use serde_json::{json, Value};

struct Site {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    db: std::path::PathBuf,
}

fn site(env: &[(&str, &str)]) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orchd.db");
    token(&db, "bootstrap", "orch:read");
    let mut env = env.to_vec();
    env.push(("ORCHD_EVENTS__POLL_MS", "20"));
    let daemon = Daemon::start_env(&db, &[], &env);
    Site { _dir: dir, daemon, db }
}

impl Site {
    fn client(&self, tenant: &str, scopes: &str) -> Client {
        Client::new(&self.daemon.url, Some(&token(&self.db, tenant, scopes)))
    }

    /// Waits until the daemon's event hub has seen every event written so far.
    fn settle(&self) {
        let admin = self.client("*", "orch:read");
        let events = admin.get("/api/v1/stats").json["events"].as_u64().unwrap();
        let start = Instant::now();
        while admin.get("/api/v1/dashboard").json["head_seq"].as_u64().unwrap() < events {
            assert!(start.elapsed() < Duration::from_secs(10), "the event hub did not catch up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// acme: 5 ingest jobs claimed; 3 acked, 1 fails fatally with a 503, 1 fails retryably with a
/// 429. globex: 2 jobs left queued.
fn workload(acme: &Client, globex: &Client) -> Vec<i64> {
    let jobs: Vec<Value> = (0..5).map(|i| json!({"queue": "ingest", "source": "nvd", "payload": {"i": i}})).collect();
    acme.post("/api/v1/jobs/batch", &json!({ "jobs": jobs }));
    globex.post("/api/v1/jobs/batch", &json!({"jobs": [{"queue": "ingest"}, {"queue": "ingest"}]}));
    let r = acme.post("/api/v1/claims", &json!({"worker_id": "w-acme", "queues": ["ingest"], "limit": 5}));
    let allocs = r.json["allocations"].as_array().unwrap().clone();
    assert_eq!(allocs.len(), 5);
    let mut ids = Vec::new();
    for (i, a) in allocs.iter().enumerate() {
        let (id, lease) = (a["job"]["id"].as_i64().unwrap(), a["lease_id"].as_str().unwrap());
        ids.push(id);
        let body = match i {
            3 => {
                json!({"lease_id": lease, "error_class": "upstream", "message": "server answered 503", "retryable": false})
            }
            4 => {
                json!({"lease_id": lease, "error_class": "http_429", "message": "slow down", "retry_after_seconds": 600})
            }
            _ => json!({"lease_id": lease}),
        };
        let verb = if i < 3 { "ack" } else { "fail" };
        assert_eq!(acme.post(&format!("/api/v1/jobs/{id}/{verb}"), &body).status, 200);
    }
    ids
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

#[test]
fn metrics_and_failure_clusters_after_a_known_workload() {
    let s = site(&[]);
    let (acme, globex) = (s.client("acme", "orch:work,orch:read"), s.client("globex", "orch:work,orch:read"));
    workload(&acme, &globex);
    s.settle();
    let admin = s.client("*", "orch:read");
    let r = admin.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.bytes).unwrap();
    let a = r#"tenant="acme",queue="ingest""#;
    for (series, want) in [
        (format!(r#"orch_jobs{{{a},state="succeeded"}}"#), 3.0),
        (format!(r#"orch_jobs{{{a},state="dead"}}"#), 1.0),
        (format!(r#"orch_jobs{{{a},state="queued"}}"#), 1.0),
        (r#"orch_jobs{tenant="globex",queue="ingest",state="queued"}"#.to_string(), 2.0),
        (format!("orch_job_attempts_total{{{a}}}"), 5.0),
        (format!(r#"orch_job_failures_total{{{a},cluster="http_5xx"}}"#), 1.0),
        (format!(r#"orch_job_failures_total{{{a},cluster="http_429"}}"#), 1.0),
        (format!(r#"orch_jobs_finished_total{{{a},outcome="succeeded"}}"#), 3.0),
        (format!(r#"orch_jobs_finished_total{{{a},outcome="dead"}}"#), 1.0),
        (format!("orch_job_start_latency_seconds_count{{{a}}}"), 5.0),
        (format!("orch_job_run_seconds_count{{{a}}}"), 5.0),
        // 1 of 4 finished jobs dead against a 99% objective: 0.25 / 0.01.
        (r#"orch_slo_burn_rate{tenant="acme",window="5m"}"#.to_string(), 25.0),
    ] {
        let got = sample(&text, &series);
        assert!(got.is_some_and(|g| (g - want).abs() < 1e-6), "{series} = {got:?}, want {want}, in\n{text}");
    }
    // A tenant's scrape holds its own series only.
    let text = String::from_utf8(globex.get("/metrics").bytes).unwrap();
    assert!(!text.contains("acme"), "{text}");
    assert_eq!(sample(&text, r#"orch_jobs{tenant="globex",queue="ingest",state="queued"}"#), Some(2.0));
    assert_eq!(Client::new(&s.daemon.url, None).get("/metrics").status, 401);

    // Failure clusters per source, with counts and an example.
    let r = acme.get("/api/v1/errors");
    let items = r.json["items"].as_array().unwrap();
    let kinds: Vec<(&str, &str, u64)> = items
        .iter()
        .map(|c| (c["source"].as_str().unwrap(), c["cluster"].as_str().unwrap(), c["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(kinds.len(), 2, "{items:?}");
    assert!(kinds.contains(&("nvd", "http_5xx", 1)) && kinds.contains(&("nvd", "http_429", 1)), "{kinds:?}");
    let five = items.iter().find(|c| c["cluster"] == "http_5xx").unwrap();
    assert_eq!(five["example"]["message"], "server answered 503");
    assert_eq!(globex.get("/api/v1/errors").json["items"], json!([]));
}

#[test]
fn event_streams_are_per_tenant_resumable_and_bounded() {
    let s = site(&[("ORCHD_EVENTS__BUFFER_SIZE", "8")]);
    let (acme, globex) = (s.client("acme", "orch:work,orch:read"), s.client("globex", "orch:work,orch:read"));
    let stream = acme.sse("/api/v1/events", &[]);
    workload(&acme, &globex);
    // acme's stream: 5 enqueued, 5 claimed, 3 succeeded, 2 failed; never a globex event.
    let mut got = Vec::new();
    while got.len() < 15 {
        let m = stream.next(Duration::from_secs(10)).expect("an event within 10 s");
        let e: Value = serde_json::from_str(&m.data).unwrap();
        assert_eq!(e["tenant"], "acme", "{e}");
        assert_eq!(m.id, e["seq"].as_u64());
        assert_eq!(m.event, e["type"].as_str().unwrap());
        for field in ["correlationId", "project", "job_type", "at"] {
            assert!(e.get(field).is_some_and(|v| !v.is_null()), "{field} missing in {e}");
        }
        if m.event != "job.enqueued" {
            assert_eq!(e["worker"], "w-acme", "{e}");
        }
        got.push((m.id.unwrap(), m.event));
    }
    let count = |t: &str| got.iter().filter(|(_, e)| e == t).count();
    assert_eq!(
        (count("job.enqueued"), count("job.claimed"), count("job.succeeded"), count("job.failed")),
        (5, 5, 3, 2)
    );
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "in sequence order");
    assert!(stream.next(Duration::from_millis(300)).is_none(), "nothing of globex follows");

    // Resuming: the events after Last-Event-ID that are still buffered (8), in order.
    let last = got[got.len() - 4].0;
    let resumed = acme.sse("/api/v1/events", &[("last-event-id", &last.to_string())]);
    let ids: Vec<u64> = (0..3).map(|_| resumed.next(Duration::from_secs(5)).unwrap().id.unwrap()).collect();
    assert_eq!(ids, got[got.len() - 3..].iter().map(|(id, _)| *id).collect::<Vec<_>>());
    // From too far back, the stream says that events were lost before sending what it has.
    let old = acme.sse("/api/v1/events", &[("last-event-id", "1")]);
    let first = old.next(Duration::from_secs(5)).unwrap();
    assert_eq!(first.event, "gap", "{first:?}");
    let mut replayed = 0;
    while let Some(m) = old.next(Duration::from_millis(300)) {
        assert_eq!(serde_json::from_str::<Value>(&m.data).unwrap()["tenant"], "acme");
        replayed += 1;
    }
    assert!(replayed <= 8, "the buffer holds 8 events, {replayed} were replayed");

    // The same over a WebSocket, filtered by job type, resuming after the first acme event.
    let url = s.daemon.url.replace("http://", "ws://")
        + &format!("/api/v1/events/ws?type=ingest&last_event_id={}", got[10].0);
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).unwrap();
    let token = token(&s.db, "acme", "orch:read");
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tungstenite::connect(req).unwrap();
    let frame = ws.read().unwrap();
    let v: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    assert_eq!(v["id"].as_u64(), Some(got[11].0), "{v}");
    assert_eq!(v["data"]["tenant"], "acme");
}
