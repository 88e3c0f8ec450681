//! Over HTTP on loopback, against a real `orchd serve` (the release binary beside this one):
//! batched and one-job-per-request throughput with several worker threads, enqueue→start
//! latency at half the measured one-job peak, and the daemon's resident memory idle and with a
//! queue of jobs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

/// A daemon for one measurement.
pub struct Daemon {
    child: Child,
    /// Its base URL.
    pub url: String,
    /// A token with work and read scopes for tenant `bench`.
    pub token: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `orchd serve` on a fresh ledger in `dir`, with a tenant backlog bound of
    /// `max_queued` (past it, enqueue answers 429).
    pub fn start(dir: &Path, max_queued: u64) -> anyhow::Result<Daemon> {
        Daemon::start_on(dir.join("http.db").as_os_str(), max_queued)
    }

    /// [`Daemon::start`] on the ledger `db` (a file or a `postgres://` URL, maybe shared).
    pub fn start_on(db: &std::ffi::OsStr, max_queued: u64) -> anyhow::Result<Daemon> {
        let exe = std::env::current_exe()?.with_file_name("orchd");
        anyhow::ensure!(exe.exists(), "{} is missing: build it (scripts/bench does)", exe.display());
        let out = Command::new(&exe)
            .args(["token", "create", "--tenant", "bench", "--scopes", "orch:work,orch:read", "--db"])
            .arg(db)
            .output()?;
        anyhow::ensure!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout)?.trim().to_string();
        let mut child = Command::new(&exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(db)
            .env("RUST_LOG", "warn")
            .env("ORCHD_FLOW__MAX_QUEUED_PER_TENANT", max_queued.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let url = line.trim().strip_prefix("orchd listening on ").context("orchd did not start")?.to_string();
        Ok(Daemon { child, url, token })
    }

    /// Resident memory now, in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")?;
        Ok(kb * 1024)
    }

    /// CPU time the daemon has used so far (user + system, all threads), in seconds.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        cpu_secs(&format!("/proc/{}/stat", self.child.id()))
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder().http_status_as_error(false).build().into()
    }

    fn post(&self, agent: &ureq::Agent, path: &str, body: &Value) -> anyhow::Result<Value> {
        let mut resp = agent
            .post(format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {}", self.token))
            .send_json(body)?;
        let status = resp.status().as_u16();
        let v: Value = resp.body_mut().read_json()?;
        anyhow::ensure!((200..300).contains(&status), "POST {path}: {status} {v}");
        Ok(v)
    }

    /// Enqueues `n` jobs of `queue` in batches of 1000; returns jobs/s.
    pub fn enqueue(&self, queue: &str, n: usize) -> anyhow::Result<f64> {
        let agent = Daemon::agent();
        let t = Instant::now();
        let mut left = n;
        while left > 0 {
            let k = left.min(1000);
            let jobs: Vec<Value> = (0..k).map(|i| json!({"queue": queue, "payload": {"i": i}})).collect();
            self.post(&agent, "/api/v1/jobs/batch", &json!({ "jobs": jobs }))?;
            left -= k;
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    }

    /// Enqueues jobs of `queue` (batches of 1000) until each count of `marks` (ascending) is
    /// queued, and returns, per mark, the daemon's RSS in bytes a second after reaching it (so
    /// that the event tailer has caught up), then the enqueue rate over all of them in jobs/s.
    pub fn deep_queue(&self, queue: &str, marks: &[usize]) -> anyhow::Result<(Vec<u64>, f64)> {
        let mut rss = Vec::with_capacity(marks.len());
        let (mut done, mut busy) = (0, Duration::ZERO);
        for &mark in marks {
            let t = Instant::now();
            self.enqueue(queue, mark.saturating_sub(done))?;
            busy += t.elapsed();
            done = done.max(mark);
            std::thread::sleep(Duration::from_secs(1));
            rss.push(self.rss()?);
        }
        Ok((rss, done as f64 / busy.as_secs_f64()))
    }

    /// `workers` threads claim `batch` jobs at a time and ack them (in one `POST /api/v1/acks`
    /// when `batch` > 1) until `n` jobs are done; returns jobs/s. Claims never ask for more
    /// than is left of `n`, so the queue keeps what later measurements need.
    pub fn work(&self, queue: &str, n: usize, workers: usize, batch: usize) -> anyhow::Result<f64> {
        work_across(&[self], queue, n, workers, batch)
    }
    /// A producer enqueues one job at a time at `rate`/s for `secs`, while `workers` claim one
    /// at a time and ack; returns the (p50, p99) of enqueue→claim latency in milliseconds.
    pub fn latency(&self, queue: &str, rate: f64, secs: f64, workers: usize) -> anyhow::Result<(f64, f64)> {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::<f64>::new()));
        let origin = Instant::now();
        let now_us = move || origin.elapsed().as_micros() as u64;
        std::thread::scope(|s| -> anyhow::Result<()> {
            let mut handles = Vec::new();
            for w in 0..workers {
                let (stop, samples) = (stop.clone(), samples.clone());
                handles.push(s.spawn(move || -> anyhow::Result<()> {
                    let agent = Daemon::agent();
                    while !stop.load(Ordering::Relaxed) {
                        let body = json!({"worker_id": format!("lat-{w}"), "queues": [queue], "limit": 1});
                        let got = self.post(&agent, "/api/v1/claims", &body)?;
                        let Some(a) = got["allocations"].as_array().and_then(|a| a.first()).cloned() else {
                            continue;
                        };
                        let sent = a["job"]["spec"]["payload"]["t_us"].as_u64().unwrap_or(0);
                        samples.lock().unwrap().push((now_us() - sent) as f64 / 1000.0);
                        let path = format!("/api/v1/jobs/{}/ack", a["job"]["id"]);
                        self.post(&agent, &path, &json!({"lease_id": a["lease_id"]}))?;
                    }
                    Ok(())
                }));
            }
            let agent = Daemon::agent();
            let every = Duration::from_secs_f64(1.0 / rate);
            let start = Instant::now();
            let mut k = 0u32;
            while start.elapsed().as_secs_f64() < secs {
                let due = start + every * k;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                self.post(&agent, "/api/v1/jobs", &json!({"queue": queue, "payload": {"t_us": now_us()}}))?;
                k += 1;
            }
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))??;
            }
            Ok(())
        })?;
        let mut v = samples.lock().unwrap().clone();
        anyhow::ensure!(!v.is_empty(), "no job was claimed");
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
        Ok((pct(0.50), pct(0.99)))
    }
}

/// [`Daemon::work`] with the worker threads spread over several daemons of one ledger.
pub fn work_across(daemons: &[&Daemon], queue: &str, n: usize, workers: usize, batch: usize) -> anyhow::Result<f64> {
    let reserved = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let reserved = reserved.clone();
                let d = daemons[w % daemons.len()];
                s.spawn(move || -> anyhow::Result<()> {
                    let agent = Daemon::agent();
                    let mut empty = 0;
                    loop {
                        let Ok(before) = reserved.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                            (r < n).then(|| r + batch.min(n - r))
                        }) else {
                            return Ok(());
                        };
                        let want = batch.min(n - before);
                        let body = json!({"worker_id": format!("bench-{w}"), "queues": [queue], "limit": want});
                        let got = d.post(&agent, "/api/v1/claims", &body)?;
                        let allocs = got["allocations"].as_array().cloned().unwrap_or_default();
                        reserved.fetch_sub(want - allocs.len(), Ordering::SeqCst);
                        if allocs.is_empty() {
                            // Another daemon's claims may hold the last jobs for a moment.
                            empty += 1;
                            anyhow::ensure!(empty < 1_000, "the queue ran dry before {n} jobs");
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        empty = 0;
                        if batch == 1 {
                            let a = &allocs[0];
                            let path = format!("/api/v1/jobs/{}/ack", a["job"]["id"]);
                            d.post(&agent, &path, &json!({"lease_id": a["lease_id"]}))?;
                        } else {
                            let items: Vec<Value> = allocs
                                .iter()
                                .map(|a| json!({"job_id": a["job"]["id"], "lease_id": a["lease_id"]}))
                                .collect();
                            d.post(&agent, "/api/v1/acks", &json!({ "items": items }))?;
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        }
        Ok(())
    })?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// User + system CPU seconds of a process (all its threads, also those that exited) from its
/// `/proc/<pid>/stat`, whose times are in `USER_HZ` ticks: 100 per second on Linux.
pub fn cpu_secs(stat: &str) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(stat)?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = s.rsplit_once(')').context("unreadable stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) (utime, stime) are 11 and 12 after the state (field 3).
    let ticks: u64 = f.get(11).context("no utime")?.parse::<u64>()? + f.get(12).context("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// CPU time used while running `f`, by the daemon and by this (client) process, per job.
#[derive(Debug, Clone, Copy)]
pub struct CpuPerJob {
    /// Microseconds of the daemon's CPU per job.
    pub daemon_us: f64,
    /// Microseconds of the client's CPU (all its worker threads) per job.
    pub client_us: f64,
}

/// Runs `f` (which handles `jobs` jobs) and measures the CPU both sides spent on them.
pub fn cpu_per_job<T>(
    d: &Daemon,
    jobs: usize,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, CpuPerJob)> {
    let (d0, c0) = (d.cpu_secs()?, cpu_secs("/proc/self/stat")?);
    let out = f()?;
    let (d1, c1) = (d.cpu_secs()?, cpu_secs("/proc/self/stat")?);
    let per = |a: f64, b: f64| (b - a) * 1e6 / jobs.max(1) as f64;
    Ok((out, CpuPerJob { daemon_us: per(d0, d1), client_us: per(c0, c1) }))
}

/// What a sustained-load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Jobs enqueued and acked.
    pub enqueued: usize,
    /// Jobs acked.
    pub acked: usize,
    /// Enqueues refused with 429 backpressure (deliberate).
    pub backpressure: usize,
    /// Any other non-2xx answer or transport error.
    pub errors: usize,
    /// RSS samples, one a second, in MB.
    pub rss_mb: Vec<f64>,
}

impl LoadReport {
    /// RSS after `secs` seconds of load (the sample taken then), in MB.
    pub fn rss_at(&self, secs: usize) -> Option<f64> {
        self.rss_mb.get(secs.checked_sub(1)?).copied()
    }

    /// How fast RSS still grows over the second half of the run, in MB per minute: the
    /// least-squares slope of the samples there. Near zero means memory has levelled off.
    pub fn late_slope_mb_per_min(&self) -> f64 {
        let half = &self.rss_mb[self.rss_mb.len() / 2..];
        let n = half.len() as f64;
        if half.len() < 2 {
            return 0.0;
        }
        let mean_x = (n - 1.0) / 2.0;
        let mean_y = half.iter().sum::<f64>() / n;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (i, y) in half.iter().enumerate() {
            let dx = i as f64 - mean_x;
            sxy += dx * (y - mean_y);
            sxx += dx * dx;
        }
        sxy / sxx * 60.0
    }
}

impl Daemon {
    /// For `secs`, a producer enqueues batches of 100 as fast as it is allowed while `workers`
    /// claim 100 and batch-ack; RSS is sampled every second.
    pub fn load(&self, secs: u64, workers: usize) -> anyhow::Result<LoadReport> {
        let stop = Arc::new(AtomicBool::new(false));
        let (enqueued, acked, backpressure, errors) =
            (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
        let mut rss = Vec::new();
        std::thread::scope(|s| {
            let stop = &stop;
            let (enqueued, acked, backpressure, errors) = (&enqueued, &acked, &backpressure, &errors);
            s.spawn(move || {
                let agent = Daemon::agent();
                while !stop.load(Ordering::Relaxed) {
                    let jobs: Vec<Value> = (0..100).map(|i| json!({"queue": "load", "payload": {"i": i}})).collect();
                    match self.post(&agent, "/api/v1/jobs/batch", &json!({ "jobs": jobs })) {
                        Ok(_) => {
                            enqueued.fetch_add(100, Ordering::Relaxed);
                        }
                        Err(e) if e.to_string().contains(" 429 ") => {
                            backpressure.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
            for w in 0..workers {
                s.spawn(move || {
                    let agent = Daemon::agent();
                    while !stop.load(Ordering::Relaxed) {
                        let body = json!({"worker_id": format!("load-{w}"), "queues": ["load"], "limit": 100});
                        let allocs = match self.post(&agent, "/api/v1/claims", &body) {
                            Ok(v) => v["allocations"].as_array().cloned().unwrap_or_default(),
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        };
                        if allocs.is_empty() {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        let items: Vec<Value> = allocs
                            .iter()
                            .map(|a| json!({"job_id": a["job"]["id"], "lease_id": a["lease_id"]}))
                            .collect();
                        match self.post(&agent, "/api/v1/acks", &json!({ "items": items })) {
                            Ok(v) => {
                                let ok = v["items"]
                                    .as_array()
                                    .map_or(0, |i| i.iter().filter(|x| x["error"].is_null()).count());
                                acked.fetch_add(ok, Ordering::Relaxed);
                                errors.fetch_add(items.len() - ok, Ordering::Relaxed);
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
            for _ in 0..secs {
                std::thread::sleep(Duration::from_secs(1));
                rss.push(self.rss().map_or(0.0, |b| b as f64 / 1e6));
            }
            stop.store(true, Ordering::Relaxed);
        });
        Ok(LoadReport {
            enqueued: enqueued.into_inner(),
            acked: acked.into_inner(),
            backpressure: backpressure.into_inner(),
            errors: errors.into_inner(),
            rss_mb: rss,
        })
    }
}
