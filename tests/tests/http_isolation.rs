//! Tenant isolation as a property: random requests with tenant B's all-powerful token, many of
//! them aimed at tenant A's jobs, leases, runs, sources and correlation ids, never return anything
//! of A, never touch A's jobs, and answer 404 whenever they name one of A's things.

use orch_e2e::api::{Client, Reply};
use orch_e2e::{token, Daemon};
use proptest::prelude::*;
use serde_json::{json, Value};

/// What tenant A ("alpha") owns; every string here is a marker that must never reach B.
struct World {
    _dir: tempfile::TempDir,
    _daemon: Daemon,
    a: Client,
    b: Client,
    a_jobs: Vec<i64>,
    a_leases: Vec<(i64, String)>,
    a_run: i64,
    b_jobs: Vec<i64>,
    markers: Vec<String>,
    a_before: Value,
}

fn world() -> World {
    {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("orchd.db");
        let a_token = token(&db, "alpha", "orch:admin");
        let b_token = token(&db, "bravo", "orch:admin");
        let daemon = Daemon::start(&db, &[]);
        let a = Client::new(&daemon.url, Some(&a_token));
        let b = Client::new(&daemon.url, Some(&b_token));
        let jobs: Vec<Value> = (0..6)
            .map(|n| {
                json!({"queue": "ingest", "source": "alpha-src", "correlation_id": format!("A-CORR-{n}"),
                            "payload": {"secret": format!("A-SECRET-{n}")}, "idempotency_key": format!("A-KEY-{n}")})
            })
            .collect();
        let r = a.post("/api/v1/jobs/batch", &json!({ "jobs": jobs }));
        let a_jobs: Vec<i64> =
            r.json["items"].as_array().unwrap().iter().map(|e| e["job"]["id"].as_i64().unwrap()).collect();
        let r = a.post("/api/v1/claims", &json!({"worker_id": "A-WORKER", "queues": ["ingest"], "limit": 3}));
        let a_leases: Vec<(i64, String)> = r.json["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| (x["job"]["id"].as_i64().unwrap(), x["lease_id"].as_str().unwrap().to_string()))
            .collect();
        let (id, lease) = &a_leases[0];
        let r = a.post(
            &format!("/api/v1/jobs/{id}/ack"),
            &json!({"lease_id": lease, "artifacts": [{"name": "out", "content_base64": "QS1BUlRJRkFDVA=="}]}),
        );
        assert_eq!(r.status, 200, "{:?}", r.json);
        a.put("/api/v1/sources/alpha-src", &json!({"host": "alpha.example.test"}));
        a.put("/api/v1/quotas/ingest", &json!({"max_active": 3, "reason": "A-REASON", "ticket": "A-TICKET"}));
        let r = a.post(
            "/api/v1/backfills",
            &json!({"queue": "ingest", "from": "2026-10-01T00:00:00Z", "to": "2026-10-03T00:00:00Z",
                    "window_seconds": 86400, "reason": "A-REASON", "ticket": "A-TICKET"}),
        );
        let a_run = r.json["run"]["id"].as_i64().unwrap();
        // Flow control of A's: a host rate limit that a 429 lowers (throttle records, a bucket),
        // a pause, a blackout, a schedule.
        let why = |mut v: Value| {
            v["reason"] = json!("A-REASON");
            v
        };
        for (method, path, body) in [
            ("PUT", "/api/v1/rate-limits/host:alpha.example.test", json!({"rate_per_s": 5.0, "burst": 5})),
            ("POST", "/api/v1/pauses/queue:shared-q", json!({})),
            (
                "PUT",
                "/api/v1/blackouts/alpha-blackout",
                json!({"window": {"kind": "once", "from": "2026-01-01T00:00:00Z", "to": "2036-01-01T00:00:00Z"}, "queue": "alpha-q"}),
            ),
            ("PUT", "/api/v1/schedules/nightly", json!({"cron": "0 0 1 1 *", "job": {"queue": "alpha-q"}})),
        ] {
            let r = a.send(method, path, Some(why(body).to_string().into_bytes()), &[]);
            assert_eq!(r.status, 200, "{path}: {:?}", r.json);
        }
        let (id, lease) = &a_leases[1];
        let body =
            json!({"lease_id": lease, "error_class": "http_429", "message": "A-SECRET upstream", "retryable": true});
        assert_eq!(a.post(&format!("/api/v1/jobs/{id}/fail"), &body).status, 200);
        let r = b.post("/api/v1/jobs/batch", &json!({"jobs": [{"queue": "ingest"}, {"queue": "other"}]}));
        let b_jobs = r.json["items"].as_array().unwrap().iter().map(|e| e["job"]["id"].as_i64().unwrap()).collect();
        let mut markers: Vec<String> = [
            "alpha",
            "A-SECRET",
            "A-CORR",
            "A-KEY",
            "A-WORKER",
            "A-REASON",
            "A-TICKET",
            "A-ARTIFACT",
            "QS1BUlRJRkFDVA",
        ]
        .map(String::from)
        .to_vec();
        markers.extend(a_leases.iter().map(|(_, l)| l.clone()));
        let a_before = a.get("/api/v1/jobs?limit=1000").json;
        World { _dir: dir, _daemon: daemon, a, b, a_jobs, a_leases, a_run, b_jobs, markers, a_before }
    }
}

/// A request B may send; ids index into A's or B's things.
#[derive(Clone, Debug)]
enum Req {
    GetJob(usize, bool),
    ListJobs(u8, usize),
    History(u8, usize),
    GetRun(bool),
    ListRuns,
    Settings(u8),
    Artifact(usize),
    Legacy(usize, bool),
    Worker(u8, usize),
    Operate(bool, usize),
    Claim(u8),
    Stats,
    ActFor(u8),
}

fn req() -> impl Strategy<Value = Req> {
    prop_oneof![
        (0..8usize, any::<bool>()).prop_map(|(i, mine)| Req::GetJob(i, mine)),
        (0..6u8, 0..8usize).prop_map(|(f, i)| Req::ListJobs(f, i)),
        (0..4u8, 0..8usize).prop_map(|(f, i)| Req::History(f, i)),
        any::<bool>().prop_map(Req::GetRun),
        Just(Req::ListRuns),
        (0..14u8).prop_map(Req::Settings),
        (0..8usize).prop_map(Req::Artifact),
        (0..8usize, any::<bool>()).prop_map(|(i, s)| Req::Legacy(i, s)),
        (0..3u8, 0..4usize).prop_map(|(k, i)| Req::Worker(k, i)),
        (any::<bool>(), 0..8usize).prop_map(|(c, i)| Req::Operate(c, i)),
        (0..3u8).prop_map(Req::Claim),
        Just(Req::Stats),
        (0..3u8).prop_map(Req::ActFor),
    ]
}

/// Sends the request as B; returns the reply and whether it named one of A's things.
fn send(w: &World, r: &Req) -> (Reply, bool) {
    let a_job = |i: usize| w.a_jobs[i % w.a_jobs.len()];
    match r {
        Req::GetJob(i, mine) => {
            let id = if *mine { w.b_jobs[i % w.b_jobs.len()] } else { a_job(*i) };
            (w.b.get(&format!("/api/v1/jobs/{id}")), !mine)
        }
        Req::ListJobs(f, i) => {
            let q = match f {
                0 => String::new(),
                1 => format!("correlation_id=A-CORR-{}", i % 6),
                2 => "source=alpha-src".into(),
                3 => format!("run={}", w.a_run),
                4 => "state=running".into(),
                _ => "type=ingest&limit=1".into(),
            };
            (w.b.get(&format!("/api/v1/jobs?{q}")), false)
        }
        Req::History(f, i) => {
            let q = match f {
                0 => format!("job_id={}", a_job(*i)),
                1 => format!("correlation_id=A-CORR-{}", i % 6),
                2 => "type=audit".into(),
                _ => String::new(),
            };
            (w.b.get(&format!("/api/v1/history?{q}")), false)
        }
        Req::GetRun(mine) => {
            let id = if *mine { 999_999 } else { w.a_run };
            (w.b.get(&format!("/api/v1/runs/{id}")), true)
        }
        Req::ListRuns => (w.b.get("/api/v1/runs"), false),
        Req::Settings(k) => match k {
            0 => (w.b.get("/api/v1/sources"), false),
            1 => (w.b.get("/api/v1/sources/alpha-src"), true),
            2 => (w.b.get("/api/v1/quotas"), false),
            3 => (w.b.get("/api/v1/flow"), false),
            4 => (w.b.get("/api/v1/throttles"), false),
            5 => (w.b.get("/api/v1/incidents"), false),
            6 => (w.b.get("/api/v1/rate-limits"), false),
            7 => (w.b.get("/api/v1/pauses"), false),
            8 => (w.b.get("/api/v1/blackouts"), false),
            9 => (w.b.get("/api/v1/schedules"), false),
            10 => (w.b.send("DELETE", "/api/v1/pauses/queue:shared-q", None, &[]), true),
            11 => (w.b.send("DELETE", "/api/v1/schedules/nightly", None, &[]), true),
            12 => (w.b.get("/metrics"), false),
            _ => (w.b.get("/api/v1/stats"), false),
        },
        Req::Artifact(i) => (w.b.get(&format!("/api/v1/jobs/{}/artifacts/out", a_job(*i))), true),
        Req::Legacy(i, summary) => {
            let suffix = if *summary { "/summary" } else { "" };
            (w.b.get(&format!("/api/v0/jobs/{}{suffix}", a_job(*i))), true)
        }
        Req::Worker(kind, i) => {
            let (id, lease) = &w.a_leases[i % w.a_leases.len()];
            let (path, body) = match kind {
                0 => ("heartbeat", json!({"lease_id": lease, "progress": {"b": 1}})),
                1 => ("ack", json!({"lease_id": lease})),
                _ => ("fail", json!({"lease_id": lease, "error_class": "b", "retryable": false})),
            };
            (w.b.post(&format!("/api/v1/jobs/{id}/{path}"), &body), true)
        }
        Req::Operate(cancel, i) => {
            let verb = if *cancel { "cancel" } else { "retry" };
            (w.b.post(&format!("/api/v1/jobs/{}/{verb}", a_job(*i)), &json!({"reason": "b"})), true)
        }
        Req::Claim(n) => {
            // B's worker claims from the queue A uses; B's own jobs go back by failing retryably now.
            let r =
                w.b.post("/api/v1/claims", &json!({"worker_id": "b", "queues": ["ingest", "other"], "limit": 1 + n}));
            for a in r.json["allocations"].as_array().cloned().unwrap_or_default() {
                let id = a["job"]["id"].as_i64().unwrap();
                w.b.post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}));
                w.b.post(&format!("/api/v1/jobs/{id}/retry"), &json!({}));
            }
            (r, false)
        }
        Req::Stats => (w.b.get("/api/v1/stats"), false),
        Req::ActFor(k) => {
            let c = w.b.with_header("orch-tenant", "alpha");
            let r = match k {
                0 => c.get("/api/v1/jobs"),
                1 => c.get("/api/v1/history"),
                _ => c.post("/api/v1/jobs", &json!({"queue": "ingest"})),
            };
            (r, true)
        }
    }
}

fn check(w: &World, reqs: &[Req]) -> Result<(), TestCaseError> {
    for r in reqs {
        let (reply, names_a) = send(w, r);
        let text = String::from_utf8_lossy(&reply.bytes);
        for m in &w.markers {
            prop_assert!(!text.contains(m.as_str()), "{r:?} leaked {m:?}: {text}");
        }
        if names_a {
            prop_assert_eq!(reply.status, 404, "{:?} answered {}", r, text);
        } else {
            prop_assert!(reply.status == 200, "{:?} answered {}", r, text);
        }
        if let Some(items) = reply.json.get("items").and_then(Value::as_array) {
            for item in items {
                let tenant = item.get("tenant").and_then(Value::as_str);
                prop_assert!(tenant.is_none() || tenant == Some("bravo"), "{r:?} listed {item}");
            }
        }
    }
    // A's jobs are exactly as they were.
    prop_assert_eq!(&w.a.get("/api/v1/jobs?limit=1000").json, &w.a_before);
    Ok(())
}

/// One daemon for all cases (a test, not a static, so the daemon stops when it ends).
#[test]
fn nothing_of_tenant_a_ever_reaches_tenant_b() {
    let w = world();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 48, ..ProptestConfig::default() });
    let outcome = runner.run(&proptest::collection::vec(req(), 1..12), |reqs| check(&w, &reqs));
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
