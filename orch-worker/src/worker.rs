//! The worker loop: claim in batches up to the free slots, run each job's handler on its own
//! thread while a supervisor heartbeats for it, then ack or fail; stop claiming on a stop
//! request and release what cannot finish within the grace period.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use orch_core::Artifact;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{Client, Error};

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The worker's id, recorded as the actor of its events.
    pub worker_id: String,
    /// Job types it runs.
    pub queues: Vec<String>,
    /// Handlers running at once.
    pub concurrency: usize,
    /// Most jobs asked for per claim (at most the free slots).
    pub batch: usize,
    /// Lease length to ask for; `None` takes the daemon's default (`default_lease_ms`).
    pub lease_seconds: Option<u64>,
    /// How long to wait before claiming again when there was no work (with jitter).
    pub idle_poll: Duration,
    /// On stop, how long running handlers get to finish before their jobs are released.
    pub grace: Duration,
}

impl Config {
    /// Defaults: 4 at once, batches of 4, the daemon's lease, 1 s idle poll, 30 s grace.
    pub fn new(worker_id: &str, queues: &[&str]) -> Config {
        Config {
            worker_id: worker_id.into(),
            queues: queues.iter().map(|q| q.to_string()).collect(),
            concurrency: 4,
            batch: 4,
            lease_seconds: None,
            idle_poll: Duration::from_secs(1),
            grace: Duration::from_secs(30),
        }
    }
}

/// A leased job, as the handler sees it.
#[derive(Clone, Debug)]
pub struct Job {
    /// Its id.
    pub id: i64,
    /// Its tenant.
    pub tenant: String,
    /// Its type.
    pub queue: String,
    /// Its source, if any.
    pub source: Option<String>,
    /// Its input.
    pub payload: Value,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    /// Attempts left after this one.
    pub attempts_left: u32,
    /// The job's idempotency key, for the handler's own side effects.
    pub idempotency_key: Option<String>,
    /// The correlation id to pass on.
    pub correlation_id: String,
    lease_id: String,
    heartbeat: Duration,
}

#[derive(Deserialize)]
struct AllocationDoc {
    job: JobDoc,
    lease_id: String,
    attempt: u32,
    attempts_left: u32,
    idempotency_key: Option<String>,
    heartbeat_ms: u64,
}

#[derive(Deserialize)]
struct JobDoc {
    id: i64,
    tenant: String,
    correlation_id: String,
    spec: SpecDoc,
}

#[derive(Deserialize)]
struct SpecDoc {
    queue: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    payload: Value,
}

impl Job {
    fn from_allocation(v: Value) -> Result<Job, Error> {
        let a: AllocationDoc = serde_json::from_value(v).map_err(|e| Error::Decode(format!("allocation: {e}")))?;
        Ok(Job {
            id: a.job.id,
            tenant: a.job.tenant,
            queue: a.job.spec.queue,
            source: a.job.spec.source,
            payload: a.job.spec.payload,
            attempt: a.attempt,
            attempts_left: a.attempts_left,
            idempotency_key: a.idempotency_key,
            correlation_id: a.job.correlation_id,
            lease_id: a.lease_id,
            heartbeat: Duration::from_millis(a.heartbeat_ms.max(50)),
        })
    }
}

/// Why a handler did not succeed, as orchd records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobError {
    /// The failure class (1-128 of `[A-Za-z0-9-_.:]`), e.g. `http_429`, `parse_error`.
    pub class: String,
    /// What went wrong.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// The wish for the delay before it (e.g. the upstream's `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl JobError {
    /// A failure another attempt may fix (retried with the daemon's backoff).
    pub fn retry(class: &str, message: impl Into<String>) -> JobError {
        JobError { class: class.into(), message: message.into(), retryable: true, retry_after: None }
    }

    /// A failure no attempt will fix: the job is dead-lettered.
    pub fn permanent(class: &str, message: impl Into<String>) -> JobError {
        JobError { class: class.into(), message: message.into(), retryable: false, retry_after: None }
    }

    /// The upstream throttled (HTTP 429): class `http_429`, retried after its `Retry-After`
    /// if it sent one. orchd also lowers the source host's rate limit on it.
    pub fn throttled(retry_after: Option<Duration>, message: impl Into<String>) -> JobError {
        JobError { class: "http_429".into(), message: message.into(), retryable: true, retry_after }
    }

    /// An upstream HTTP status: 429 and 5xx are retryable (`http_429`, `http_5xx`), other 4xx
    /// are not (`http_4xx`).
    pub fn http(status: u16, retry_after: Option<Duration>, message: impl Into<String>) -> JobError {
        match status {
            429 => JobError::throttled(retry_after, message),
            500..=599 => JobError { retry_after, ..JobError::retry("http_5xx", message) },
            _ => JobError::permanent("http_4xx", message),
        }
    }
}

impl<E: std::error::Error> From<E> for JobError {
    /// Any other error: retryable, class `error`.
    fn from(e: E) -> JobError {
        JobError::retry("error", e.to_string())
    }
}

/// What a handler can do besides returning: report progress and attach artifacts.
pub struct Context {
    progress: Arc<Mutex<Option<Value>>>,
    artifacts: Vec<(Artifact, Vec<u8>)>,
    lease_lost: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
}

impl Context {
    /// Records progress; it goes to orchd with the next heartbeat.
    pub fn progress(&self, progress: Value) {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = Some(progress);
    }

    /// Attaches an output, sent with the ack. Returns its description with the SHA-256 the
    /// daemon will record (computed the same way, by `orch-core`).
    pub fn artifact(&mut self, name: &str, media_type: &str, content: Vec<u8>) -> Artifact {
        let meta = Artifact::of_content(name, media_type, &content);
        self.artifacts.push((meta.clone(), content));
        meta
    }

    /// Whether the lease was lost (the job timed out or was re-leased): the result will be
    /// dropped, so a long handler may give up.
    pub fn lease_lost(&self) -> bool {
        self.lease_lost.load(Ordering::Relaxed)
    }

    /// Whether the worker is shutting down: a long handler may wrap up.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

type Handler = dyn Fn(&Job, &mut Context) -> Result<(), JobError> + Send + Sync;

/// How a job ended for this worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acked, with these artifacts.
    Succeeded(Vec<Artifact>),
    /// Reported as failed.
    Failed(JobError),
    /// The lease was lost: nothing was reported.
    LeaseLost,
    /// Released at shutdown (failed as retryable `worker_shutdown`).
    Released,
    /// Acking or failing did not reach orchd; the lease will lapse and the job be retried.
    Unreported(String),
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Each job this worker leased and how it ended, in the order they ended.
    pub jobs: Vec<(i64, Outcome)>,
}

impl Summary {
    /// How many jobs ended with an outcome like `f`.
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.jobs.iter().filter(|(_, o)| f(o)).count()
    }
}

/// Stops a running worker from another thread (or a signal handler).
#[derive(Clone)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks the worker to stop: it claims nothing more, and lets running jobs finish within
    /// its grace period.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A worker over one daemon.
pub struct Worker {
    client: Client,
    config: Config,
    handler: Arc<Handler>,
    stop: Arc<AtomicBool>,
}

struct Running {
    lease_id: String,
    released: Arc<AtomicBool>,
}

impl Worker {
    /// A worker running `handler` for every job it leases.
    pub fn new(
        client: Client,
        config: Config,
        handler: impl Fn(&Job, &mut Context) -> Result<(), JobError> + Send + Sync + 'static,
    ) -> Worker {
        Worker { client, config, handler: Arc::new(handler), stop: Arc::new(AtomicBool::new(false)) }
    }

    /// A handle that stops this worker.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Runs until SIGTERM or SIGINT (or [`StopHandle::stop`]), then shuts down gracefully.
    pub fn run(&self) -> Result<Summary, Error> {
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, self.stop.clone())
                .map_err(|e| Error::Transport(format!("cannot install a signal handler: {e}")))?;
        }
        self.work(false)
    }

    /// Runs until [`StopHandle::stop`], without touching signal handlers (for embedding).
    pub fn run_until_stopped(&self) -> Result<Summary, Error> {
        self.work(false)
    }

    /// Runs until a claim finds no work and nothing is running (or until stopped).
    pub fn run_until_idle(&self) -> Result<Summary, Error> {
        self.work(true)
    }

    fn work(&self, until_idle: bool) -> Result<Summary, Error> {
        let c = &self.config;
        let slots = c.concurrency.max(1);
        let (done_tx, done_rx) = mpsc::channel::<(i64, Outcome)>();
        let mut running: HashMap<i64, Running> = HashMap::new();
        let mut summary = Summary::default();
        let mut failures = 0u32;
        loop {
            while let Ok((id, outcome)) = done_rx.try_recv() {
                running.remove(&id);
                summary.jobs.push((id, outcome));
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let free = slots - running.len();
            if free == 0 {
                if let Ok((id, outcome)) = done_rx.recv_timeout(c.idle_poll) {
                    running.remove(&id);
                    summary.jobs.push((id, outcome));
                }
                continue;
            }
            let wait = match self.claim(free.min(c.batch.max(1))) {
                Ok(jobs) if jobs.is_empty() => {
                    failures = 0;
                    if until_idle && running.is_empty() {
                        break;
                    }
                    jitter(c.idle_poll)
                }
                Ok(jobs) => {
                    failures = 0;
                    for job in jobs {
                        let released = Arc::new(AtomicBool::new(false));
                        running.insert(job.id, Running { lease_id: job.lease_id.clone(), released: released.clone() });
                        self.start(job, released, done_tx.clone());
                    }
                    continue;
                }
                Err(e) => match e.retry_after() {
                    Some(after) => {
                        failures += 1;
                        let backoff = Duration::from_millis(500 * 2u64.pow(failures.min(4)));
                        tracing::warn!(error = %e, "claim failed; backing off");
                        after.max(jitter(backoff))
                    }
                    None => return Err(e),
                },
            };
            // Sleep, but wake for a finished job (a free slot) or a stop request.
            let until = Instant::now() + wait;
            while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                let step = (until - Instant::now()).min(Duration::from_millis(100));
                if let Ok((id, outcome)) = done_rx.recv_timeout(step) {
                    running.remove(&id);
                    summary.jobs.push((id, outcome));
                    break;
                }
            }
        }
        self.shut_down(running, done_rx, &mut summary);
        Ok(summary)
    }

    /// Lets running jobs finish within the grace period, then releases the rest.
    fn shut_down(
        &self,
        mut running: HashMap<i64, Running>,
        done: mpsc::Receiver<(i64, Outcome)>,
        summary: &mut Summary,
    ) {
        let deadline = Instant::now() + self.config.grace;
        while !running.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match done.recv_timeout(left) {
                Ok((id, outcome)) => {
                    running.remove(&id);
                    summary.jobs.push((id, outcome));
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        for (id, r) in running {
            r.released.store(true, Ordering::SeqCst);
            let body = json!({"lease_id": r.lease_id, "error_class": "worker_shutdown",
                "message": format!("worker {} shut down before the job finished", self.config.worker_id),
                "retryable": true, "retry_after_seconds": 0});
            let outcome = match self.client.post(&format!("/api/v1/jobs/{id}/fail"), &body) {
                Ok(_) => Outcome::Released,
                Err(e) if e.is_lease_lost() => Outcome::LeaseLost,
                Err(e) => Outcome::Unreported(e.to_string()),
            };
            summary.jobs.push((id, outcome));
        }
    }

    fn claim(&self, limit: usize) -> Result<Vec<Job>, Error> {
        let c = &self.config;
        let mut body = json!({"worker_id": c.worker_id, "queues": c.queues, "limit": limit});
        if let Some(s) = c.lease_seconds {
            body["lease_seconds"] = json!(s);
        }
        let mut out = self.client.post("/api/v1/claims", &body)?;
        let Value::Array(allocations) = out["allocations"].take() else {
            return Err(Error::Decode("claim answer without allocations".into()));
        };
        allocations.into_iter().map(Job::from_allocation).collect()
    }

    /// Runs one job: the handler on its own thread, heartbeats from this supervisor thread.
    fn start(&self, job: Job, released: Arc<AtomicBool>, done: mpsc::Sender<(i64, Outcome)>) {
        let client = self.client.clone();
        let handler = self.handler.clone();
        let stopping = self.stop.clone();
        let extend = self.config.lease_seconds;
        std::thread::spawn(move || {
            let id = job.id;
            let outcome = supervise(&client, handler, job, extend, &released, stopping);
            let _ = done.send((id, outcome));
        });
    }
}

/// Runs the handler; heartbeats every `job.heartbeat`, extending the lease by `extend`
/// seconds (the claim's lease length; `None`: the daemon's default).
fn supervise(
    client: &Client,
    handler: Arc<Handler>,
    job: Job,
    extend: Option<u64>,
    released: &AtomicBool,
    stopping: Arc<AtomicBool>,
) -> Outcome {
    let progress = Arc::new(Mutex::new(None::<Value>));
    let lease_lost = Arc::new(AtomicBool::new(false));
    let mut ctx =
        Context { progress: progress.clone(), artifacts: Vec::new(), lease_lost: lease_lost.clone(), stopping };
    let (tx, rx) = mpsc::channel();
    let run = job.clone();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&run, &mut ctx)));
        let result = result.unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the handler panicked".into());
            Err(JobError::retry("panic", msg))
        });
        let _ = tx.send((result, ctx.artifacts));
    });
    let path = |what: &str| format!("/api/v1/jobs/{}/{what}", job.id);
    let heartbeat = |final_beat: bool| {
        let p = progress.lock().unwrap_or_else(|p| p.into_inner()).take();
        if final_beat && p.is_none() {
            return;
        }
        let mut body = json!({"lease_id": job.lease_id, "progress": p});
        if let Some(s) = extend {
            body["extend_seconds"] = json!(s);
        }
        if let Err(e) = client.post(&path("heartbeat"), &body) {
            if e.is_lease_lost() {
                lease_lost.store(true, Ordering::SeqCst);
            } else {
                tracing::warn!(job = job.id, error = %e, "heartbeat failed");
            }
        }
    };
    let (result, artifacts) = loop {
        match rx.recv_timeout(job.heartbeat) {
            Ok(r) => break r,
            Err(RecvTimeoutError::Timeout) => {
                if released.load(Ordering::SeqCst) {
                    return Outcome::Released;
                }
                if !lease_lost.load(Ordering::SeqCst) {
                    heartbeat(false);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                break (Err(JobError::retry("panic", "the handler thread ended without a result")), Vec::new())
            }
        }
    };
    if released.load(Ordering::SeqCst) {
        return Outcome::Released;
    }
    if lease_lost.load(Ordering::SeqCst) {
        return Outcome::LeaseLost;
    }
    heartbeat(true);
    let (call, body, outcome) = match result {
        Ok(()) => {
            let b64 = base64::engine::general_purpose::STANDARD;
            let uploads: Vec<Value> = artifacts
                .iter()
                .map(|(m, content)| json!({"name": m.name, "media_type": m.media_type, "content_base64": b64.encode(content)}))
                .collect();
            let metas = artifacts.into_iter().map(|(m, _)| m).collect();
            ("ack", json!({"lease_id": job.lease_id, "artifacts": uploads}), Outcome::Succeeded(metas))
        }
        Err(e) => {
            let mut body = json!({"lease_id": job.lease_id, "error_class": e.class, "message": e.message, "retryable": e.retryable});
            if let Some(after) = e.retry_after {
                body["retry_after_seconds"] = json!(after.as_secs_f64().ceil() as u64);
            }
            ("fail", body, Outcome::Failed(e))
        }
    };
    match client.post(&path(call), &body) {
        Ok(_) => outcome,
        Err(e) if e.is_lease_lost() => Outcome::LeaseLost,
        Err(e) => Outcome::Unreported(e.to_string()),
    }
}

/// `d` with equal jitter: between half and all of it.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(orch_core::flow::equal_jitter_ms(ms, rand::random::<f64>()))
}
