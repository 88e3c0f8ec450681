//! Operator controls as an operator meets them: `orchd pause|resume|throttle|retry|cancel|replay`
//! on the ledger of a running daemon, which picks the change up without a restart, and
//! backpressure over real HTTP. (Rates, windows and breaker timings are checked with an
//! injected clock in `orchd/tests/flow.rs`.)

use std::time::{Duration, Instant};

use orch_e2e::api::{Client, Reply};
use orch_e2e::{run, token, Daemon};
use serde_json::{json, Value};

struct Site {
    _dir: tempfile::TempDir,
    db: String,
    daemon: Daemon,
}

impl Site {
    fn start(env: &[(&str, &str)]) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("orchd.db");
        token(&db, "bootstrap", "orch:read");
        let mut env = env.to_vec();
        env.push(("ORCHD_FLOW__RELOAD_MS", "100"));
        let daemon = Daemon::start_env(&db, &[], &env);
        Site { db: db.to_str().unwrap().to_string(), _dir: dir, daemon }
    }

    fn client(&self, tenant: &str, scopes: &str) -> Client {
        Client::new(&self.daemon.url, Some(&token(std::path::Path::new(&self.db), tenant, scopes)))
    }

    /// Runs `orchd ARGS… --db DB`; returns (exit code, stdout, stderr).
    fn orchd(&self, args: &[&str]) -> (i32, String, String) {
        let mut a = args.to_vec();
        a.extend(["--db", &self.db]);
        run("orchd", &a)
    }
}

fn ok(r: &Reply) -> &Value {
    assert!((200..300).contains(&r.status), "expected success, got {} {:?}", r.status, r.json);
    &r.json
}

fn claim(c: &Client, queues: &[&str], limit: usize) -> Vec<(i64, String)> {
    let r = c.post("/api/v1/claims", &json!({"worker_id": "w1", "queues": queues, "limit": limit}));
    ok(&r)["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["job"]["id"].as_i64().unwrap(), a["lease_id"].as_str().unwrap().to_string()))
        .collect()
}

/// Waits until the daemon has re-read its rules (they are re-read every 100 ms here).
fn settle() {
    std::thread::sleep(Duration::from_millis(600));
}

#[test]
fn operator_commands_act_on_a_running_daemon_and_are_audited() {
    let site = Site::start(&[]);
    let acme = site.client("acme", "orch:work,orch:operate,orch:admin,orch:read");
    for i in 0..3 {
        ok(&acme.post("/api/v1/jobs", &json!({"queue": "ingest", "source": "nvd", "payload": {"i": i}})));
    }

    // pause / resume a job type
    let (code, out, err) = site.orchd(&["pause", "--tenant", "acme", "--queue", "ingest", "--reason", "NVD outage"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("paused queue:ingest of tenant acme"), "{out}");
    settle();
    assert!(claim(&acme, &["ingest"], 10).is_empty(), "paused: nothing is claimed");
    let (code, out, _) = site.orchd(&["resume", "--tenant", "acme", "--queue", "ingest"]);
    assert_eq!(code, 0);
    assert!(out.contains("resumed queue:ingest"), "{out}");
    settle();
    let got = claim(&acme, &["ingest"], 10);
    assert_eq!(got.len(), 3, "resumed: the jobs are claimed");
    let (code, _, err) = site.orchd(&["resume", "--tenant", "acme", "--queue", "ingest"]);
    assert_eq!(code, 1, "resuming what is not paused: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // retry: a dead-lettered job goes back to the queue
    let (dead, lease) = &got[0];
    let body = json!({"lease_id": lease, "error_class": "parse_error", "message": "bad feed", "retryable": false});
    assert_eq!(ok(&acme.post(&format!("/api/v1/jobs/{dead}/fail"), &body))["job"]["state"], "dead");
    let (code, out, err) = site.orchd(&["retry", "--tenant", "acme", "--all-dead", "--reason", "feed fixed"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("retried 1 dead-lettered jobs"), "{out}");
    assert_eq!(ok(&acme.get(&format!("/api/v1/jobs/{dead}")))["job"]["state"], "queued");

    // cancel, and another tenant's job is "not found"
    let (code, out, _) = site.orchd(&["cancel", "--tenant", "acme", "--job", &dead.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("cancelled"), "{out}");
    let (code, _, err) = site.orchd(&["cancel", "--tenant", "globex", "--job", &got[1].0.to_string()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(ok(&acme.get(&format!("/api/v1/jobs/{}", got[1].0)))["job"]["state"], "running");

    // throttle: needs a rate limit to lower
    let (code, _, err) = site.orchd(&["throttle", "--tenant", "acme", "--rate", "1", "--for", "10m", "--reason", "r"]);
    assert_ne!(code, 0);
    assert!(err.contains("has no rate limit tenant"), "{err}");
    ok(&acme.put("/api/v1/rate-limits/tenant", &json!({"rate_per_s": 50.0, "burst": 10})));
    // The same bounds as the API: at most 30 days.
    let (code, _, err) =
        site.orchd(&["throttle", "--tenant", "acme", "--rate", "0.5", "--for", "31days", "--reason", "too long"]);
    assert_ne!(code, 0);
    assert!(err.contains("1 s to 30 days"), "{err}");
    let (code, out, err) =
        site.orchd(&["throttle", "--tenant", "acme", "--rate", "0.5", "--for", "10m", "--reason", "upstream asked"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("throttled tenant to 0.5/s"), "{out}");
    let limits = acme.get("/api/v1/rate-limits");
    assert_eq!(ok(&limits)["items"][0]["value"]["throttle"]["rate_milli_per_s"], 500);
    settle();
    // The bucket (burst 10) now refills at 0.5/s: a burst, then next to nothing.
    for i in 0..20 {
        ok(&acme.post("/api/v1/jobs", &json!({"queue": "burst", "payload": {"i": i}})));
    }
    let first = claim(&acme, &["burst"], 20).len();
    let second = claim(&acme, &["burst"], 20).len();
    assert!(first <= 10 && second <= 1, "burst then throttled: {first}, {second}");
    let flow = acme.get("/api/v1/flow");
    let bucket = ok(&flow)["buckets"].as_array().unwrap().iter().find(|b| b["id"] == "tenant").unwrap().clone();
    assert_eq!(bucket["configured_milli_per_s"], 500, "{bucket}");
    let metrics = String::from_utf8(acme.get("/metrics").bytes).unwrap();
    let series = |name: &str| -> f64 {
        let prefix = format!("{name}{{tenant=\"acme\",bucket=\"tenant\"}} ");
        let line = metrics.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{prefix}\n{metrics}"));
        line[prefix.len()..].parse().unwrap()
    };
    assert_eq!(series("orch_rate_limit_refill_per_second"), 0.5);
    assert!(series("orch_rate_limited_total") >= 1.0);
    assert!(series("orch_rate_limit_tokens") < 1.0, "the bucket is spent");

    // replay a run
    let dag = acme.post(
        "/api/v1/runs",
        &json!({"jobs": [{"key": "a", "queue": "dag"}, {"key": "b", "queue": "dag", "depends_on": ["a"]}]}),
    );
    let run_id = ok(&dag)["run"]["id"].as_i64().unwrap().to_string();
    let (code, out, err) = site.orchd(&["replay", "--tenant", "acme", "--run", &run_id, "--reason", "rerun"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("replays run {run_id} with 2 jobs")), "{out}");
    let (code, _, _) = site.orchd(&["replay", "--tenant", "globex", "--run", &run_id]);
    assert_eq!(code, 1, "another tenant's run is not found");

    // Every command is an audit event with the operator as actor.
    let h = acme.get("/api/v1/history?type=audit&limit=100");
    let audit: Vec<(String, String)> = ok(&h)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["event"]["data"]["action"].as_str().unwrap().to_string(), e["actor"].as_str().unwrap().to_string()))
        .collect();
    let actions: Vec<&str> = audit.iter().map(|a| a.0.as_str()).collect();
    assert_eq!(
        actions,
        ["pause.put", "pause.delete", "rate_limit.put", "rate_limit.put", "dag.started", "replay.started"]
    );
    assert!(audit[0].1.starts_with("cli:") && audit[2].1.starts_with("token:"), "{audit:?}");
    let job_events = acme.get(&format!("/api/v1/history?job_id={dead}"));
    let types: Vec<&str> =
        ok(&job_events)["items"].as_array().unwrap().iter().map(|e| e["event"]["type"].as_str().unwrap()).collect();
    assert!(types.ends_with(&["job.failed", "job.retried", "job.cancelled"]), "{types:?}");

    site.daemon.stop();
    let (code, out, err) = run("orchd", &["check", "--db", &site.db]);
    assert_eq!(code, 0, "the ledger verifies after all of it: {out}{err}");

    // The bucket's changes and refusals are in the exported bundle's throttles.jsonl.
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (code, _, err) = run("orch-bundle", &["keygen", "--out", &p("keys"), "--name", "signer"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) =
        run("orch-bundle", &["export", "--db", &site.db, "--key", &p("keys/signer.key"), "--out", &p("b.tar.zst")]);
    assert_eq!(code, 0, "{err}");
    let files = orch_verify::archive::read(&std::fs::read(p("b.tar.zst")).unwrap()).unwrap().files;
    let throttles = String::from_utf8(files["throttles.jsonl"].clone()).unwrap();
    let denied: Vec<Value> = throttles
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|t| t["tenant"] == "acme" && t["action"] == "denied")
        .collect();
    assert!(!denied.is_empty(), "the refused claims are recorded:\n{throttles}");
    assert_eq!(denied[0]["refill_milli_per_s"], 500, "at the throttled rate: {}", denied[0]);
}

#[test]
fn backpressure_answers_429_with_retry_after_over_http() {
    let site =
        Site::start(&[("ORCHD_FLOW__MAX_QUEUED_PER_TENANT", "20"), ("ORCHD_FLOW__BACKPRESSURE_RETRY_AFTER_S", "7")]);
    let acme = site.client("acme", "orch:work,orch:read");
    let globex = site.client("globex", "orch:work,orch:read");
    let jobs: Vec<Value> = (0..20).map(|i| json!({"queue": "q", "payload": {"i": i}})).collect();
    ok(&acme.post("/api/v1/jobs/batch", &json!({ "jobs": jobs })));
    let started = Instant::now();
    let r = acme.post("/api/v1/jobs", &json!({"queue": "q"}));
    assert_eq!(r.status, 429, "{:?}", r.json);
    assert_eq!(r.code(), "backpressure");
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.json["error"]["details"]["retry_after_s"], 7);
    assert!(started.elapsed() < Duration::from_secs(5), "refused at once, not queued");
    ok(&globex.post("/api/v1/jobs", &json!({"queue": "q"})));
    let stats = acme.get("/api/v1/stats");
    assert_eq!(ok(&stats)["jobs"]["queued"], 20, "{:?}", stats.json);
}
