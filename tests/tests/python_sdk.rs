//! The Python worker SDK (`sdk/python/orch_worker.py`) driven as a worker would run it: Python
//! scripts import it, work queues of a real `orchd`, and the outcomes are read back over the
//! API — artifacts and their hashes, failure classes, retry delays, heartbeats and progress, a
//! lost lease, a graceful shutdown — plus the client's errors and the backoff on a daemon's 429
//! and 503 (against a stub, since a claim never answers those here).
//!
//! Without `python3` (3.9 or later) on PATH the tests print a `SKIP` line and pass, unless
//! `ORCH_REQUIRE_PYTHON` is set.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use orch_core::Timestamp;
use orch_e2e::api::{Client, Reply};
use orch_e2e::{token, Daemon};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Where `orch_worker.py` lives.
const SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk/python");

/// Whether the tests can run: `python3` 3.9+ is on PATH. Prints a `SKIP` line and returns
/// false when it is not, or panics when `ORCH_REQUIRE_PYTHON` asks for it.
fn have_python(test: &str) -> bool {
    let status = Command::new("python3")
        .args(["-c", "import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let why = match status {
        Ok(s) if s.success() => return true,
        Ok(_) => "python3 is older than 3.9",
        Err(_) => "no python3",
    };
    assert!(std::env::var_os("ORCH_REQUIRE_PYTHON").is_none(), "{test}: {why}, and ORCH_REQUIRE_PYTHON is set");
    println!("SKIP {test}: {why}");
    false
}

/// A daemon with a tenant token that can work and read.
struct Site {
    daemon: Daemon,
    api: Client,
    token: String,
    // Last: removed after the daemon has stopped.
    dir: tempfile::TempDir,
}

impl Site {
    fn start() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("orchd.db");
        let token = token(&db, "acme", "orch:work,orch:read");
        let daemon = Daemon::start(&db, &[]);
        let api = Client::new(&daemon.url, Some(&token));
        Site { daemon, api, token, dir }
    }

    fn enqueue(&self, queue: &str, payload: Value) -> i64 {
        let r = self.api.post("/api/v1/jobs", &json!({"queue": queue, "payload": payload, "max_attempts": 3}));
        ok(&r)["job"]["id"].as_i64().unwrap()
    }

    fn job(&self, id: i64) -> Value {
        ok(&self.api.get(&format!("/api/v1/jobs/{id}")))["job"].clone()
    }

    /// The job's events, oldest first.
    fn history(&self, id: i64) -> Vec<Value> {
        let r = self.api.get(&format!("/api/v1/history?job_id={id}&limit=1000"));
        ok(&r)["items"].as_array().unwrap().clone()
    }

    /// Waits until the job is in `state`.
    fn wait_for_state(&self, id: i64, state: &str, py: &mut Python) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.job(id)["state"] != state {
            if Instant::now() > deadline || py.child.try_wait().unwrap().is_some() {
                let job = self.job(id);
                let (_, out, err) = py.finish(Duration::ZERO);
                panic!("job {id} never reached {state}: {job:#}\nstdout:\n{out}\nstderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Runs `script` with the SDK importable, `ORCH_URL` and `ORCH_TOKEN` set.
    fn python(&self, name: &str, script: &str, args: &[&str]) -> Python {
        Python::spawn(
            self.dir.path(),
            name,
            script,
            args,
            &[("ORCH_URL", &self.daemon.url), ("ORCH_TOKEN", &self.token)],
        )
    }
}

fn ok(r: &Reply) -> &Value {
    assert!((200..300).contains(&r.status), "expected success, got {} {:?}", r.status, r.json);
    &r.json
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn millis(v: &Value) -> i64 {
    Timestamp::parse(v.as_str().unwrap_or_else(|| panic!("not a time: {v}"))).unwrap().as_millis()
}

fn events<'a>(history: &'a [Value], kind: &str) -> Vec<&'a Value> {
    history.iter().filter(|e| e["event"]["type"] == kind).collect()
}

/// The JSON lines a script printed on stdout.
fn json_lines(out: &str) -> Vec<Value> {
    out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The `{"stats": …}` line a worker script prints when `run()` returns.
fn stats(lines: &[Value], out: &str) -> Value {
    let line = lines.iter().find(|l| l.get("stats").is_some()).unwrap_or_else(|| panic!("no stats line in {out}"));
    line["stats"].clone()
}

/// A Python script running as a child process; its output goes to files, so it never blocks on
/// a full pipe.
struct Python {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Python {
    fn spawn(dir: &Path, name: &str, script: &str, args: &[&str], env: &[(&str, &str)]) -> Python {
        let path = dir.join(format!("{name}.py"));
        std::fs::write(&path, script).unwrap();
        let (stdout, stderr) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let child = Command::new("python3")
            .arg(&path)
            .args(args)
            .env("PYTHONPATH", SDK)
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            // The daemon is on loopback: a proxy from the environment must not be in the way.
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start python3");
        Python { child, stdout, stderr }
    }

    /// Waits up to `limit` for the script to exit (killing it after that); returns its status,
    /// stdout and stderr. `None` means it did not exit in time.
    fn finish(&mut self, limit: Duration) -> (Option<ExitStatus>, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        (status, read(&self.stdout), read(&self.stderr))
    }

    /// Like [`Python::finish`], asserting a clean exit; returns stdout.
    fn success(&mut self, limit: Duration) -> String {
        let (status, out, err) = self.finish(limit);
        match status {
            Some(s) if s.success() => out,
            Some(s) => panic!("script failed ({s}):\nstdout:\n{out}\nstderr:\n{err}"),
            None => panic!("script still running after {limit:?}:\nstdout:\n{out}\nstderr:\n{err}"),
        }
    }

    fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker whose handler does what each job's payload says.
const WORKER: &str = r#"
import json, logging, os, sys, time
import orch_worker as ow

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(levelname)s %(message)s")

def handle(ctx):
    p = ctx.payload
    do = p["do"]
    if do == "ok":
        sha = ctx.artifact("out.txt", "processed: " + p["text"], "text/plain")
        print(json.dumps({"job": ctx.job_id, "sha256": sha}))
        return None
    if do == "returns":
        body = json.dumps({"doubled": p["n"] * 2}, separators=(",", ":")).encode()
        return [ow.Artifact("report.json", body, "application/json")]
    if do == "permanent":
        raise ow.Permanent("payload lacks field 'url'", error_class="bad_payload")
    if do == "throttle":
        if ctx.attempt == 1:
            raise ow.UpstreamThrottled(7)
        ctx.artifact("after-throttle.txt", b"second attempt")
        return None
    if do == "crash":
        if ctx.attempt == 1:
            raise ValueError("boom")
        return None
    if do == "slow":
        for step in range(1, p["steps"] + 1):
            time.sleep(p["step_s"])
            ctx.progress({"step": step, "of": p["steps"]})
        return None
    if do == "cancel-me":
        deadline = time.monotonic() + 10
        while not ctx.lease_lost and time.monotonic() < deadline:
            time.sleep(0.02)
        print(json.dumps({"job": ctx.job_id, "lease_lost": ctx.lease_lost}))
        ctx.artifact("never.txt", b"must not be stored")
        return None
    raise ow.Permanent("unknown instruction " + do)

worker = ow.Worker(os.environ["ORCH_URL"], os.environ["ORCH_TOKEN"], "py-test", ["py"], handle,
                   concurrency=4, lease_seconds=2, poll_interval=0.2, max_poll_interval=0.5)
stats = worker.run(max_jobs=int(sys.argv[1]))
print(json.dumps({"stats": stats.as_dict()}))
"#;

#[test]
fn worker_acks_artifacts_maps_failures_heartbeats_and_drops_lost_leases() {
    if !have_python("worker_acks_artifacts_maps_failures_heartbeats_and_drops_lost_leases") {
        return;
    }
    let site = Site::start();
    let text = "héllo wörld";
    let ok_job = site.enqueue("py", json!({"do": "ok", "text": text}));
    let returns = site.enqueue("py", json!({"do": "returns", "n": 21}));
    let permanent = site.enqueue("py", json!({"do": "permanent"}));
    let throttle = site.enqueue("py", json!({"do": "throttle"}));
    let slow = site.enqueue("py", json!({"do": "slow", "steps": 4, "step_s": 0.7}));
    let crash = site.enqueue("py", json!({"do": "crash"}));
    let cancel = site.enqueue("py", json!({"do": "cancel-me"}));

    // Nine attempts: seven jobs, the throttled and the crashed one twice, the cancelled once.
    let mut py = site.python("worker", WORKER, &["9"]);
    site.wait_for_state(cancel, "running", &mut py);
    cancel_job(&site, cancel);
    let out = py.success(Duration::from_secs(25));
    let lines = json_lines(&out);
    let stats = stats(&lines, &out);
    assert_eq!(stats, json!({"claimed": 9, "succeeded": 5, "failed": 3, "released": 0, "dropped": 1}), "{out}");

    // An artifact added with ctx.artifact(): the hash the SDK computed, the daemon recorded and
    // this test computes agree, and the content round-trips.
    let content = format!("processed: {text}");
    let sha = sha256_hex(content.as_bytes());
    let job = site.job(ok_job);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(
        job["artifacts"],
        json!([{"name": "out.txt", "media_type": "text/plain", "size": content.len(), "sha256": sha}])
    );
    assert!(lines.contains(&json!({"job": ok_job, "sha256": sha})), "the SDK returns the hash it computed: {out}");
    let stored = site.api.get(&format!("/api/v1/jobs/{ok_job}/artifacts/out.txt"));
    assert_eq!(stored.bytes, content.as_bytes());

    // An artifact returned by the handler.
    let body = br#"{"doubled":42}"#;
    let job = site.job(returns);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["artifacts"][0]["name"], "report.json");
    assert_eq!(job["artifacts"][0]["media_type"], "application/json");
    assert_eq!(job["artifacts"][0]["sha256"], sha256_hex(body));

    // Permanent: dead after one attempt, with the handler's class and message.
    let job = site.job(permanent);
    assert_eq!(job["state"], "dead", "{job:#}");
    assert_eq!(job["attempt"], 1);
    assert_eq!(
        job["last_error"],
        json!({"class": "bad_payload", "message": "payload lacks field 'url'", "attempt": 1})
    );
    let failed = events(&site.history(permanent), "job.failed").into_iter().cloned().collect::<Vec<_>>();
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["event"]["data"].get("retry_at").is_none(), "not retryable: {:#}", failed[0]);

    // Throttled upstream: class http_429, and the daemon waited the upstream's Retry-After of
    // 7 s (plus at most 10 % jitter) before the second attempt, which succeeded.
    let history = site.history(throttle);
    let failed = events(&history, "job.failed");
    assert_eq!(failed.len(), 1, "{history:#?}");
    let data = &failed[0]["event"]["data"];
    assert_eq!(data["class"], "http_429");
    let delay = millis(&data["retry_at"]) - millis(&failed[0]["at"]);
    assert!((7_000..=7_700).contains(&delay), "retry delay {delay} ms, want Retry-After 7 s + jitter");
    let claims = events(&history, "job.claimed");
    assert_eq!(claims.len(), 2);
    assert!(millis(&claims[1]["at"]) >= millis(&data["retry_at"]), "retried before its time: {history:#?}");
    let job = site.job(throttle);
    assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(2)), "{job:#}");
    assert_eq!(job["artifacts"][0]["sha256"], sha256_hex(b"second attempt"));

    // Any other exception: class exception.<TypeName>, retryable; the retry succeeded.
    let history = site.history(crash);
    let failed = events(&history, "job.failed");
    assert_eq!(failed.len(), 1, "{history:#?}");
    assert_eq!(failed[0]["event"]["data"]["class"], "exception.ValueError");
    assert_eq!(failed[0]["event"]["data"]["message"], "ValueError: boom");
    assert!(failed[0]["event"]["data"]["retry_at"].is_string(), "retryable");
    let job = site.job(crash);
    assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(2)), "{job:#}");

    // Slow: it ran 2.8 s on a 2 s lease, kept alive by heartbeats every heartbeat_ms (2 s / 3),
    // each extending the lease by the asked 2 s; progress went along and the last one stuck.
    let history = site.history(slow);
    let beats = events(&history, "job.heartbeat");
    assert!(beats.len() >= 3, "{} heartbeats in 2.8 s at heartbeat_ms 666: {history:#?}", beats.len());
    for b in &beats {
        let extended = millis(&b["event"]["data"]["lease_expires_at"]) - millis(&b["at"]);
        assert_eq!(extended, 2_000, "heartbeats extend by lease_seconds: {b:#}");
    }
    let steps: Vec<u64> = beats.iter().filter_map(|b| b["event"]["data"]["progress"]["step"].as_u64()).collect();
    assert!(steps.len() >= 2 && steps.windows(2).all(|w| w[0] < w[1]), "progress steps {steps:?}");
    assert_eq!(steps.last(), Some(&4));
    let job = site.job(slow);
    assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(1)), "{job:#}");
    assert_eq!(job["progress"], json!({"step": 4, "of": 4}));
    assert_eq!(events(&history, "job.lease_expired").len(), 0);

    // Cancelled while running: the next heartbeat met 409 lease_lost, the handler saw
    // ctx.lease_lost, and its result was dropped, not acked.
    assert!(lines.contains(&json!({"job": cancel, "lease_lost": true})), "{out}");
    let job = site.job(cancel);
    assert_eq!(job["state"], "cancelled", "{job:#}");
    assert!(job.get("artifacts").is_none(), "{job:#}");
    let history = site.history(cancel);
    let kinds: Vec<&str> = history.iter().map(|e| e["event"]["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"job.enqueued"));
    assert_eq!(kinds.last(), Some(&"job.cancelled"), "{kinds:?}");
    assert!(!kinds.contains(&"job.succeeded") && !kinds.contains(&"job.failed"), "{kinds:?}");
}

fn cancel_job(site: &Site, id: i64) {
    ok(&site.api.post(&format!("/api/v1/jobs/{id}/cancel"), &json!({"reason": "test"})));
}

/// A worker with a handler that finishes within the grace period and one that never returns.
const SHUTDOWN: &str = r#"
import json, logging, os, sys, time
import orch_worker as ow

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(levelname)s %(message)s")

def handle(ctx):
    if ctx.payload["do"] == "block":
        time.sleep(60)  # ignores ctx.stopping on purpose
        ctx.artifact("late.txt", b"too late")
    else:
        time.sleep(ctx.payload["seconds"])
        ctx.artifact("done.txt", b"finished within the grace period", "text/plain")

worker = ow.Worker(os.environ["ORCH_URL"], os.environ["ORCH_TOKEN"], "py-shutdown", ["pyshut"], handle,
                   concurrency=2, shutdown_grace=float(sys.argv[1]), poll_interval=0.2, max_poll_interval=0.5)
stats = worker.run()
print(json.dumps({"stats": stats.as_dict()}))
"#;

#[test]
fn sigterm_lets_handlers_finish_within_the_grace_then_releases_the_rest() {
    if !have_python("sigterm_lets_handlers_finish_within_the_grace_then_releases_the_rest") {
        return;
    }
    let site = Site::start();
    let block = site.enqueue("pyshut", json!({"do": "block"}));
    let finish = site.enqueue("pyshut", json!({"do": "finish", "seconds": 1.5}));
    let grace = 3.0;
    let mut py = site.python("shutdown", SHUTDOWN, &[&grace.to_string()]);
    site.wait_for_state(block, "running", &mut py);
    site.wait_for_state(finish, "running", &mut py);

    py.sigterm();
    let sent = Instant::now();
    let out = py.success(Duration::from_secs(15));
    let took = sent.elapsed().as_secs_f64();
    // It waited for the grace period (the blocked handler never returns), and not much longer.
    assert!(took >= grace - 0.3 && took < grace + 2.0, "exited {took:.2} s after SIGTERM, grace {grace} s");
    let lines = json_lines(&out);
    let stats = stats(&lines, &out);
    assert_eq!(stats, json!({"claimed": 2, "succeeded": 1, "failed": 0, "released": 1, "dropped": 0}), "{out}");

    // The handler that finished within the grace period was acked.
    let job = site.job(finish);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["artifacts"][0]["sha256"], sha256_hex(b"finished within the grace period"));

    // The blocked one was handed back: queued, class worker_shutdown, ready at once...
    let job = site.job(block);
    assert_eq!(job["state"], "queued", "{job:#}");
    assert_eq!(job["last_error"]["class"], "worker_shutdown");
    assert!(job.get("lease").is_none());
    let history = site.history(block);
    let failed = events(&history, "job.failed");
    assert_eq!(failed.len(), 1, "{history:#?}");
    assert_eq!(millis(&failed[0]["event"]["data"]["retry_at"]), millis(&failed[0]["at"]), "retry_after_seconds 0");

    // ...so another worker claims it straight away, for its second attempt.
    let r = site.api.post("/api/v1/claims", &json!({"worker_id": "other", "queues": ["pyshut"], "limit": 10}));
    let allocs = ok(&r)["allocations"].as_array().unwrap();
    assert_eq!(allocs.len(), 1, "{allocs:#?}");
    assert_eq!((allocs[0]["job"]["id"].as_i64(), allocs[0]["attempt"].as_u64()), (Some(block), Some(2)));
}

/// The producer side: enqueue (with an idempotency key), batches, reads and errors.
const CLIENT: &str = r#"
import json, os
import orch_worker as ow

url, token = os.environ["ORCH_URL"], os.environ["ORCH_TOKEN"]
c = ow.Client(url, token)

def error(call):
    try:
        call()
    except ow.ApiError as e:
        return {"type": type(e).__name__, "status": e.status, "code": e.code, "request_id": e.request_id}
    return None

first = c.enqueue("pyclient", {"n": 1}, idempotency_key="k-1", max_attempts=2, priority=5, source="nvd")
again = c.enqueue("pyclient", {"n": 1}, idempotency_key="k-1")
batch = c.enqueue_batch([
    {"queue": "pyclient", "payload": {"n": 2}},
    {"queue": "pyclient", "payload": {"n": 3}, "depends_on": [first.job["id"]]},
])
print(json.dumps({
    "first": [first.job["id"], first.created],
    "again": [again.job["id"], again.created],
    "batch": [[e.job["id"], e.created] for e in batch],
    "spec": c.get_job(first.job["id"])["spec"],
    "missing": error(lambda: c.get_job(10**9)),
    "invalid": error(lambda: c.enqueue("bad queue")),
    "unauthenticated": error(lambda: ow.Client(url, "not-a-token").get_job(1)),
    "unreachable": error(lambda: ow.Client("http://127.0.0.1:9", token, timeout=2).get_job(1)),
}))
"#;

#[test]
fn client_enqueues_reads_and_raises_api_errors() {
    if !have_python("client_enqueues_reads_and_raises_api_errors") {
        return;
    }
    let site = Site::start();
    let out = site.python("client", CLIENT, &[]).success(Duration::from_secs(15));
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));

    let id = v["first"][0].as_i64().unwrap();
    assert_eq!(v["first"][1], true);
    assert_eq!(v["again"], json!([id, false]), "the idempotency key returns the first job");
    let batch: Vec<i64> = v["batch"].as_array().unwrap().iter().map(|e| e[0].as_i64().unwrap()).collect();
    assert_eq!(v["batch"], json!([[batch[0], true], [batch[1], true]]));
    assert!(!batch.contains(&id));
    let spec = &v["spec"];
    assert_eq!(
        (&spec["queue"], &spec["priority"], &spec["max_attempts"], &spec["source"], &spec["idempotency_key"]),
        (&json!("pyclient"), &json!(5), &json!(2), &json!("nvd"), &json!("k-1"))
    );
    assert_eq!(site.job(batch[1])["spec"]["depends_on"], json!([id]));
    assert_eq!(site.job(batch[0])["spec"]["payload"], json!({"n": 2}));

    for (key, status, code) in [
        ("missing", 404, "not_found"),
        ("invalid", 422, "invalid_request"),
        ("unauthenticated", 401, "unauthenticated"),
    ] {
        let e = &v[key];
        assert_eq!(
            (e["type"].as_str(), e["status"].as_u64(), e["code"].as_str()),
            (Some("ApiError"), Some(status), Some(code)),
            "{key}: {e}"
        );
        assert!(e["request_id"].as_str().is_some_and(|r| r.starts_with("req-")), "{key}: {e}");
    }
    assert_eq!(
        v["unreachable"],
        json!({"type": "Unreachable", "status": 0, "code": "unreachable", "request_id": null})
    );
}

/// A stub daemon whose claims answer 429 (Retry-After: 1), then 503, then one job whose
/// heartbeat answers 409 lease_lost, then nothing; the worker runs until idle.
const BACKOFF: &str = r#"
import http.server, json, threading, time
import orch_worker as ow

calls = []  # (monotonic time, path, status)
claims = [
    (429, {"error": {"code": "rate_limited", "message": "slow down", "details": {"retry_after_s": 1}}}, {"Retry-After": "1"}),
    (503, {"error": {"code": "unavailable", "message": "busy", "details": {}}}, {}),
    (200, {"allocations": [{
        "job": {"id": 7, "spec": {"queue": "q", "payload": {}}, "attempt": 1, "state": "running"},
        "lease_id": "L", "lease_expires_at": "2026-01-01T00:00:00Z", "attempt": 1, "idempotency_key": None,
        "attempts_left": 2, "retry_backoff_ms": 1000, "heartbeat_ms": 100}]}, {}),
]

class Stub(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/api/v1/claims":
            status, body, headers = claims.pop(0) if claims else (200, {"allocations": []}, {})
        elif self.path.endswith("/heartbeat"):
            status, body, headers = 409, {"error": {"code": "lease_lost", "message": "gone", "details": {}}}, {}
        else:
            status, body, headers = 500, {"error": {"code": "internal", "message": "unexpected", "details": {}}}, {}
        calls.append((time.monotonic(), self.path, status))
        raw = json.dumps(body).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = "http://127.0.0.1:%d" % server.server_address[1]

def handle(ctx):
    while not ctx.lease_lost:
        time.sleep(0.02)
    return ow.Artifact("x", b"dropped")

worker = ow.Worker(url, "t", "stub", ["q"], handle, poll_interval=0.05)
stats = worker.run(until_idle=True)
t0 = calls[0][0]
print(json.dumps({"stats": stats.as_dict(), "calls": [[round(t - t0, 3), p, s] for t, p, s in calls]}))
"#;

#[test]
fn worker_honours_retry_after_and_backs_off_from_the_daemon() {
    if !have_python("worker_honours_retry_after_and_backs_off_from_the_daemon") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Python::spawn(dir.path(), "backoff", BACKOFF, &[], &[]).success(Duration::from_secs(15));
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let calls: Vec<(f64, &str, u64)> = v["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_f64().unwrap(), c[1].as_str().unwrap(), c[2].as_u64().unwrap()))
        .collect();
    let paths: Vec<(&str, u64)> = calls.iter().map(|c| (c.1, c.2)).collect();
    assert_eq!(
        paths,
        [
            ("/api/v1/claims", 429),
            ("/api/v1/claims", 503),
            ("/api/v1/claims", 200),
            ("/api/v1/jobs/7/heartbeat", 409),
            ("/api/v1/claims", 200)
        ],
        "one heartbeat, then no more and no ack once the lease is lost: {out}"
    );
    let after_429 = calls[1].0 - calls[0].0;
    assert!((1.0..2.0).contains(&after_429), "waited {after_429} s after Retry-After: 1");
    let after_503 = calls[2].0 - calls[1].0;
    assert!((0.75..2.0).contains(&after_503), "waited {after_503} s after a 503 (1 s backoff, ±20 %)");
    let beat = calls[3].0 - calls[2].0;
    assert!((0.08..1.0).contains(&beat), "first heartbeat after {beat} s, heartbeat_ms 100");
    assert_eq!(v["stats"], json!({"claimed": 1, "succeeded": 0, "failed": 0, "released": 0, "dropped": 1}));
}
