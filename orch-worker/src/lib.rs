//! A worker SDK for orchd's Task Runner bridge.
//!
//! A [`Worker`] claims jobs in batches (never more than its free slots), runs a handler per
//! job on its own thread, up to [`Config::concurrency`] at once, and heartbeats for each
//! running job at the interval the daemon asks for (`heartbeat_ms`, a third of the lease), so
//! lease lengths are the daemon's (`default_lease_ms`) unless [`Config::lease_seconds`] says
//! otherwise. A handler returns `Ok(())` to ack (with the artifacts it attached, hashed as
//! the daemon hashes them) or a [`JobError`] to fail: a class, a message, whether to retry,
//! and a wish for the delay (an upstream `Retry-After`). On SIGTERM/SIGINT ([`Worker::run`])
//! or [`StopHandle::stop`] it claims nothing more, gives running handlers [`Config::grace`]
//! to finish, and releases the rest: each is failed as retryable `worker_shutdown` with no
//! delay, so another worker picks it up at once (it counts as an attempt).
//!
//! ```no_run
//! use orch_worker::{Client, Config, JobError, Worker};
//!
//! let client = Client::new("http://127.0.0.1:8080", &std::env::var("ORCH_TOKEN").unwrap());
//! let worker = Worker::new(client, Config::new("worker-1", &["ingest"]), |job, ctx| {
//!     let url = job.payload["url"].as_str().ok_or_else(|| JobError::permanent("bad_payload", "no url"))?;
//!     ctx.progress(serde_json::json!({"fetching": url}));
//!     ctx.artifact("result.json", "application/json", br#"{"records": 7}"#.to_vec());
//!     Ok(())
//! });
//! worker.run().unwrap();
//! ```

mod client;
mod worker;

pub use client::{Client, Error};
pub use worker::{Config, Context, Job, JobError, Outcome, StopHandle, Summary, Worker};
