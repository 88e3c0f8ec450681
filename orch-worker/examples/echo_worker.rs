//! A runnable worker: `echo_worker URL TOKEN QUEUE…` (`ORCH_GRACE_MS` sets the shutdown
//! grace). Each job's payload comes back as its `echo.json` artifact, after `sleep_ms` if the
//! payload asks for it; `{"fail": "permanent"}` or `{"fail": "throttled"}` fail it instead.
//! Stop it with SIGTERM or Ctrl-C.

use std::time::Duration;

use orch_worker::{Client, Config, JobError, Worker};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token, queues @ ..] = args.as_slice() else {
        eprintln!("usage: echo_worker URL TOKEN QUEUE...");
        std::process::exit(2);
    };
    let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
    let mut config = Config::new("echo-worker", &queues);
    if let Some(ms) = std::env::var("ORCH_GRACE_MS").ok().and_then(|v| v.parse().ok()) {
        config.grace = Duration::from_millis(ms);
    }
    config.idle_poll = Duration::from_millis(200);
    let worker = Worker::new(Client::new(url, token), config, |job, ctx| {
        if let Some(ms) = job.payload["sleep_ms"].as_u64() {
            std::thread::sleep(Duration::from_millis(ms));
        }
        match job.payload["fail"].as_str() {
            Some("permanent") => return Err(JobError::permanent("bad_payload", "asked to fail")),
            Some("throttled") => {
                return Err(JobError::throttled(Some(Duration::from_secs(7)), "HTTP 429 from upstream"))
            }
            _ => {}
        }
        ctx.artifact("echo.json", "application/json", job.payload.to_string().into_bytes());
        Ok(())
    });
    println!("echo_worker running");
    match worker.run() {
        Ok(summary) => println!("echo_worker stopped: {} jobs", summary.jobs.len()),
        Err(e) => {
            eprintln!("echo_worker: {e}");
            std::process::exit(1);
        }
    }
}
