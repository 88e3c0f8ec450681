//! The Rust worker SDK (`orch-worker`) against the real daemon: batches within the concurrency
//! limit, heartbeats that keep a lease longer than the lease alive, progress and artifacts,
//! failure mapping (permanent, upstream 429 with `Retry-After`, panic), lease loss, and
//! graceful shutdown both by `StopHandle` and by SIGTERM to a worker process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orch_e2e::api::Client as Api;
use orch_e2e::{bin, token, Daemon};
use orch_worker::{Client, Config, JobError, Outcome, Worker};
use serde_json::{json, Value};
use sha2::Digest;

struct Site {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    token: String,
}

impl Site {
    fn start() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("orchd.db");
        let token = token(&db, "acme", "orch:work,orch:read,orch:operate");
        let daemon = Daemon::start_env(&db, &[], &[("ORCHD_REAPER_INTERVAL_MS", "100")]);
        Site { _dir: dir, daemon, token }
    }

    fn api(&self) -> Api {
        Api::new(&self.daemon.url, Some(&self.token))
    }

    fn enqueue(&self, queue: &str, payload: Value, max_attempts: u32) -> i64 {
        let r =
            self.api().post("/api/v1/jobs", &json!({"queue": queue, "payload": payload, "max_attempts": max_attempts}));
        r.json["job"]["id"].as_i64().unwrap_or_else(|| panic!("{:?}", r.json))
    }

    fn job(&self, id: i64) -> Value {
        self.api().get(&format!("/api/v1/jobs/{id}")).json["job"].clone()
    }

    fn event_types(&self, id: i64) -> Vec<String> {
        let r = self.api().get(&format!("/api/v1/history?job_id={id}&limit=1000"));
        r.json["items"].as_array().unwrap().iter().map(|e| e["event"]["type"].as_str().unwrap().to_string()).collect()
    }
}

#[test]
fn a_worker_runs_jobs_concurrently_heartbeats_and_maps_failures() {
    let site = Site::start();
    let ok: Vec<i64> = (0..6).map(|i| site.enqueue("work", json!({"n": i, "sleep_ms": 300}), 3)).collect();
    let permanent = site.enqueue("work", json!({"fail": "permanent"}), 3);
    let throttled = site.enqueue("work", json!({"fail": "throttled"}), 3);
    let panics = site.enqueue("work", json!({"fail": "panic"}), 1);
    // Longer than its 1 s lease: only heartbeats keep it.
    let slow = site.enqueue("work", json!({"sleep_ms": 2500, "progress": true}), 1);

    let mut config = Config::new("sdk-test", &["work"]);
    config.concurrency = 3;
    config.batch = 2;
    config.lease_seconds = Some(1);
    config.idle_poll = Duration::from_millis(100);
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, p) = (now.clone(), peak.clone());
    let worker = Worker::new(Client::new(&site.daemon.url, &site.token), config, move |job, ctx| {
        let running = n.fetch_add(1, Ordering::SeqCst) + 1;
        p.fetch_max(running, Ordering::SeqCst);
        let result = (|| {
            match job.payload["fail"].as_str() {
                Some("permanent") => return Err(JobError::permanent("parse_error", "feed is not JSON")),
                Some("throttled") => {
                    return Err(JobError::http(429, Some(Duration::from_secs(7)), "upstream 429 Too Many Requests"))
                }
                Some("panic") => panic!("handler bug"),
                _ => {}
            }
            let total = job.payload["sleep_ms"].as_u64().unwrap_or(0);
            for step in 1..=5 {
                std::thread::sleep(Duration::from_millis(total / 5));
                if job.payload["progress"] == true {
                    ctx.progress(json!({"pct": step * 20}));
                }
            }
            ctx.artifact("out.json", "application/json", format!("{{\"job\": {}}}", job.id).into_bytes());
            Ok(())
        })();
        n.fetch_sub(1, Ordering::SeqCst);
        result
    });
    let summary = worker.run_until_idle().unwrap();

    assert_eq!(summary.jobs.len(), 10, "{summary:?}");
    let peak = peak.load(Ordering::SeqCst);
    assert!((2..=3).contains(&peak), "handlers ran concurrently, at most 3 at once: {peak}");
    for id in ok.iter().chain([&slow]) {
        let job = site.job(*id);
        assert_eq!(job["state"], "succeeded", "{job}");
        let want = hex::encode(sha2::Sha256::digest(format!("{{\"job\": {id}}}")));
        assert_eq!(job["artifacts"][0]["sha256"], want.as_str());
        let reported = summary.jobs.iter().find(|(j, _)| j == id).map(|(_, o)| o.clone());
        let Some(Outcome::Succeeded(arts)) = reported else { panic!("{reported:?}") };
        assert_eq!(arts[0].sha256, want, "the SDK hashes as the daemon does");
    }
    let slow_events = site.event_types(slow);
    assert!(slow_events.iter().filter(|t| *t == "job.heartbeat").count() >= 3, "{slow_events:?}");
    assert!(!slow_events.iter().any(|t| t == "job.lease_expired"), "heartbeats kept the lease: {slow_events:?}");
    assert_eq!(site.job(slow)["progress"], json!({"pct": 100}));
    // Each heartbeat extends the lease by the claim's lease length (1 s), not the daemon's default.
    let history = site.api().get(&format!("/api/v1/history?job_id={slow}&type=job.heartbeat"));
    for e in history.json["items"].as_array().unwrap() {
        let extended = chrono_ms(&e["event"]["data"]["lease_expires_at"]) - chrono_ms(&e["at"]);
        assert_eq!(extended, 1_000, "{e}");
    }

    let job = site.job(permanent);
    assert_eq!((job["state"].as_str(), job["last_error"]["class"].as_str()), (Some("dead"), Some("parse_error")));
    let job = site.job(throttled);
    assert_eq!((job["state"].as_str(), job["last_error"]["class"].as_str()), (Some("queued"), Some("http_429")));
    let retry_in = chrono_ms(&job["spec"]["run_after"]) - chrono_ms(&job["updated_at"]);
    assert!(
        (7_000..=7_700).contains(&retry_in),
        "retried after the upstream's Retry-After, plus up to 10 % jitter: {retry_in} ms"
    );
    let job = site.job(panics);
    assert_eq!((job["state"].as_str(), job["last_error"]["class"].as_str()), (Some("dead"), Some("panic")));
    assert!(job["last_error"]["message"].as_str().unwrap().contains("handler bug"));
}

fn chrono_ms(v: &Value) -> i64 {
    serde_json::from_value::<orch_core::Timestamp>(v.clone()).unwrap().as_millis()
}

#[test]
fn stopping_releases_what_cannot_finish_and_a_lost_lease_is_not_acked() {
    let site = Site::start();
    let blocked = site.enqueue("block", json!({}), 5);
    let mut config = Config::new("sdk-stop", &["block"]);
    config.grace = Duration::from_millis(300);
    config.idle_poll = Duration::from_millis(50);
    let worker = Worker::new(Client::new(&site.daemon.url, &site.token), config, |_, _| {
        std::thread::sleep(Duration::from_secs(5));
        Ok(())
    });
    let stop = worker.stop_handle();
    let t = std::thread::spawn(move || worker.run_until_idle());
    let started = Instant::now();
    while site.job(blocked)["state"] != "running" {
        assert!(started.elapsed() < Duration::from_secs(10), "never claimed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopping = Instant::now();
    stop.stop();
    let summary = t.join().unwrap().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(2), "stopped within the grace period: {:?}", stopping.elapsed());
    assert_eq!(summary.jobs, vec![(blocked, Outcome::Released)]);
    let job = site.job(blocked);
    assert_eq!((job["state"].as_str(), job["last_error"]["class"].as_str()), (Some("queued"), Some("worker_shutdown")));

    // An operator cancels a running job: the next heartbeat finds the lease gone, the
    // handler sees it, and its late result is not acked.
    let cancelled = site.enqueue("cancel-me", json!({}), 5);
    let mut config = Config::new("sdk-cancel", &["cancel-me"]);
    config.lease_seconds = Some(1);
    let worker = Worker::new(Client::new(&site.daemon.url, &site.token), config, |_, ctx| {
        let started = Instant::now();
        while !ctx.lease_lost() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if ctx.lease_lost() {
            Ok(())
        } else {
            Err(JobError::permanent("test", "the lease was never reported lost"))
        }
    });
    let t = std::thread::spawn(move || worker.run_until_idle());
    let started = Instant::now();
    while site.job(cancelled)["state"] != "running" {
        assert!(started.elapsed() < Duration::from_secs(10), "never claimed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = site.api().post(&format!("/api/v1/jobs/{cancelled}/cancel"), &json!({"reason": "operator"}));
    assert_eq!(r.status, 200, "{:?}", r.json);
    let summary = t.join().unwrap().unwrap();
    assert_eq!(summary.jobs, vec![(cancelled, Outcome::LeaseLost)]);
    assert_eq!(site.job(cancelled)["state"], "cancelled");
    assert!(!site.event_types(cancelled).contains(&"job.succeeded".to_string()));
}

#[test]
fn sigterm_to_a_worker_process_releases_its_jobs_and_exits_cleanly() {
    let site = Site::start();
    let done = site.enqueue("echo", json!({"hello": "world"}), 3);
    let blocked = site.enqueue("echo", json!({"sleep_ms": 10_000}), 3);
    let exe = bin("examples/echo_worker");
    let mut child = std::process::Command::new(exe)
        .args([&site.daemon.url, &site.token, "echo"])
        .env("ORCH_GRACE_MS", "500")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while site.job(done)["state"] != "succeeded" || site.job(blocked)["state"] != "running" {
        assert!(started.elapsed() < Duration::from_secs(10), "{} / {}", site.job(done), site.job(blocked));
        std::thread::sleep(Duration::from_millis(50));
    }
    let echo = site.job(done);
    assert_eq!(
        echo["artifacts"][0]["sha256"],
        hex::encode(sha2::Sha256::digest(json!({"hello": "world"}).to_string()))
    );
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let stopping = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(stopping.elapsed() < Duration::from_secs(5), "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains("echo_worker stopped: 2 jobs"), "{out}");
    let job = site.job(blocked);
    assert_eq!((job["state"].as_str(), job["last_error"]["class"].as_str()), (Some("queued"), Some("worker_shutdown")));
}
