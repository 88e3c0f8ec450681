//! The peer side by side (`--peer-apalis PATH`): the same job count pushed and processed by
//! apalis on its SQLite backend (the standalone `bench/peer-apalis` binary, run as a child
//! process) and by orch's store, each on a fresh database file, in the same run.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde_json::Value;

/// One `peer-apalis` run: push `jobs`, then process them with `workers` apalis workers.
pub struct ApalisRun {
    pub push_per_sec: f64,
    pub process_per_sec: f64,
    /// Jobs acked before the time limit (all of them when `complete`).
    pub done: usize,
    pub complete: bool,
    /// The whole JSON document the binary printed.
    pub doc: Value,
}

/// Runs the peer binary on a fresh file in `dir`; `max_secs` bounds the processing phase.
pub fn apalis(bin: &Path, dir: &Path, jobs: usize, workers: usize, max_secs: u64) -> anyhow::Result<ApalisRun> {
    let out = Command::new(bin)
        .args(["--jobs", &jobs.to_string(), "--workers", &workers.to_string(), "--max-secs", &max_secs.to_string()])
        .arg("--dir")
        .arg(dir)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} exited with {}: {}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let doc: Value = serde_json::from_slice(&out.stdout).context("parsing peer-apalis output")?;
    let num = |k: &str| doc[k].as_f64().with_context(|| format!("peer-apalis output lacks {k}"));
    Ok(ApalisRun {
        push_per_sec: num("push_per_sec")?,
        process_per_sec: num("process_per_sec")?,
        done: num("done")? as usize,
        complete: doc["complete"].as_bool().unwrap_or(false),
        doc,
    })
}

/// orch doing what the peer does: a fresh ledger, `n` jobs enqueued in batches of 100, then
/// all `n` claimed and acked (`batch` a claim; acks one call each or in one `ack_many`).
/// Returns (enqueue /s, claim+ack /s).
pub fn orch(db: &Path, n: usize, batch: usize, batched_acks: bool) -> anyhow::Result<(f64, f64)> {
    let store = super::open(db)?;
    let enqueue = super::enqueue(&store, n)?;
    let process = super::claim_ack(&store, n, batch, batched_acks)?;
    Ok((enqueue, process))
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
