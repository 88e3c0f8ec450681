//! `orch-bench`: how fast the ledger and the bundle tools are on this machine, measured against
//! what the same hardware can do without our code (raw SQLite; sha256 + zstd alone).
//!
//! Prints a table and writes `target/bench/results.json`. Figures are wall-clock, single process.
//! With `--peer-apalis`, the same job counts also go through apalis on SQLite (a separate binary)
//! for a side-by-side ratio.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use orch_core::{ManualClock, Timestamp};
use orch_store::*;
use serde_json::{json, Value};

mod http;
mod peer;

/// The allocator of the binaries measured here (`orchd`, `orch-verify`), so that the figures in
/// process are theirs.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// orch-bench — ledger and bundle benchmarks.
#[derive(Parser)]
struct Cli {
    /// Job counts to run at (each ledger holds 3 events per job).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    jobs: Vec<usize>,
    /// Worker threads for the HTTP benchmarks, and apalis workers in the peer benchmark's
    /// second configuration.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Also run a sustained load over HTTP for this many seconds (0: none), reporting errors
    /// other than backpressure and the daemon's memory over time.
    #[arg(long, default_value_t = 0)]
    load_secs: u64,
    /// Skip the HTTP benchmarks (they need the release `orchd` beside this binary).
    #[arg(long)]
    no_http: bool,
    /// Also measure the daemon's memory with a deep queue: enqueue this many jobs over HTTP
    /// into a fresh `orchd`, reporting RSS idle and at a tenth, half and all of them queued.
    /// With `--jobs 0` only the daemon benchmarks run.
    #[arg(long, default_value_t = 0)]
    deep_queue: usize,
    /// The enqueue rate, jobs/s, of the enqueue→claim latency rows (0: half of the peak one job
    /// per request just measured). A fixed rate compares two builds at the same load.
    #[arg(long, default_value_t = 0.0)]
    latency_rate: f64,
    /// Also measure orchd on this PostgreSQL database (a `postgres://` URL or key=value
    /// string): HTTP claim+ack with one and with two orchd processes sharing one ledger, each
    /// run in a schema of its own that is dropped afterwards.
    #[arg(long)]
    postgres: Option<String>,
    /// Also run the peer benchmark: this `peer-apalis` binary (built by `scripts/bench` from
    /// bench/peer-apalis) pushes and processes the same job counts with apalis on SQLite, next to
    /// orch doing the same on a fresh ledger; ratio rows give orch/apalis.
    #[arg(long)]
    peer_apalis: Option<std::path::PathBuf>,
    /// Bound on each apalis processing phase, in seconds; a run stopped by it reports the jobs
    /// acked by then.
    #[arg(long, default_value_t = 120)]
    peer_max_secs: u64,
    /// Run only these groups of benchmarks (comma-separated): `ledger` measures the raw SQLite
    /// ceilings and orch's in-process enqueue and claim+ack; `bundles` builds a ledger (claims
    /// batched, untimed unless `ledger` is chosen too) and measures export, verify and replay;
    /// `http` runs the HTTP benchmarks. Without it, all of them, and the peer figures too.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Group>,
    /// Also write each exported bundle here (`{jobs}` in the name is replaced by the job count),
    /// for `--bundle` or `orch-verify` to read again.
    #[arg(long)]
    save_bundle: Option<String>,
    /// Measure verify and replay on this bundle (written by `--save-bundle`, so signed by the
    /// bench's key) instead of exporting one: a fixed input, e.g. for callgrind.
    #[arg(long)]
    bundle: Option<std::path::PathBuf>,
    /// Where to write the results.
    #[arg(long, default_value = "target/bench/results.json")]
    out: std::path::PathBuf,
}

/// A group of benchmarks for `--only`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Group {
    /// Raw SQLite ceilings, in-process enqueue and claim+ack.
    Ledger,
    /// Export, verify and replay.
    Bundles,
    /// A real `orchd` over loopback: enqueue, claim+ack, latency, RSS.
    Http,
}

const T0: Timestamp = Timestamp::from_millis(1_793_491_200_000);

fn open(path: &Path) -> anyhow::Result<SqliteStore> {
    let clock = Arc::new(ManualClock::new(T0));
    Ok(SqliteStore::open(path, clock, StoreOptions::default(), Synchronous::Normal)?)
}

fn per_sec(n: usize, t: Instant) -> f64 {
    n as f64 / t.elapsed().as_secs_f64()
}

fn enqueue(store: &SqliteStore, n: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    for chunk in 0..n.div_ceil(100) {
        let jobs = (0..100.min(n - chunk * 100))
            .map(|i| {
                NewJob::new(
                    ["acme", "globex"][i % 2],
                    "bench",
                    "ingest",
                    json!({"url": "https://feeds.example/item", "n": chunk * 100 + i}),
                )
            })
            .collect();
        store.enqueue("bench", jobs)?;
    }
    Ok(per_sec(n, t))
}

/// Claims `batch` at a time and acks each claim's jobs one call each, or (`batched_acks`) in
/// one `ack_many` (what `POST /api/v1/acks` does).
fn claim_ack(store: &SqliteStore, n: usize, batch: usize, batched_acks: bool) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let req = ClaimRequest {
            scope: Scope::All,
            queues: vec!["ingest".into()],
            worker: "w".into(),
            limit: batch.min(n - done),
            lease_ms: None,
        };
        let allocs = store.claim(&req)?;
        anyhow::ensure!(!allocs.is_empty(), "ran out of jobs after {done}");
        let acks: Vec<(i64, Ack)> = allocs
            .into_iter()
            .map(|a| (a.job.id, Ack { lease_id: a.job.lease.map(|l| l.id).unwrap_or_default(), artifacts: vec![] }))
            .collect();
        done += acks.len();
        if batched_acks {
            for r in store.ack_many(&Scope::All, acks)? {
                r?;
            }
        } else {
            for (id, ack) in acks {
                store.ack(&Scope::All, id, ack)?;
            }
        }
    }
    Ok(per_sec(n, t))
}

/// The ceiling: bare `UPDATE … RETURNING` claims and acks, one history insert per change, no
/// domain code. `batched_acks`: all acks of a claim in one transaction (else one each, as orch's
/// API does).
fn raw_claim_ack(path: &Path, n: usize, batch: usize, batched_acks: bool) -> anyhow::Result<f64> {
    let mut c = rusqlite::Connection::open(path)?;
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE jobs (id INTEGER PRIMARY KEY, queue TEXT, state TEXT, priority INTEGER, run_after INTEGER, lease TEXT);
         CREATE INDEX ready ON jobs (queue, priority DESC, run_after, id) WHERE state = 'queued';
         CREATE TABLE history (seq INTEGER PRIMARY KEY, job_id INTEGER, line TEXT);",
    )?;
    let line = "x".repeat(400);
    {
        let tx = c.transaction()?;
        for i in 0..n {
            tx.execute(
                "INSERT INTO jobs (id, queue, state, priority, run_after) VALUES (?1, 'ingest', 'queued', 0, 0)",
                [i as i64 + 1],
            )?;
        }
        tx.commit()?;
    }
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let ids: Vec<i64> = tx
            .prepare_cached(
                "UPDATE jobs SET state = 'running', lease = 'l' WHERE id IN
                 (SELECT id FROM jobs WHERE state = 'queued' AND queue = 'ingest' AND run_after <= 1
                  ORDER BY priority DESC, run_after, id LIMIT ?1) RETURNING id",
            )?
            .query_map([batch as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for id in &ids {
            tx.prepare_cached("INSERT INTO history (job_id, line) VALUES (?1, ?2)")?
                .execute(rusqlite::params![id, line])?;
        }
        tx.commit()?;
        let ack = |tx: &rusqlite::Transaction<'_>, id: i64| -> rusqlite::Result<()> {
            tx.prepare_cached("UPDATE jobs SET state = 'succeeded', lease = NULL WHERE id = ?1")?.execute([id])?;
            tx.prepare_cached("INSERT INTO history (job_id, line) VALUES (?1, ?2)")?
                .execute(rusqlite::params![id, line])?;
            Ok(())
        };
        if batched_acks {
            let tx = c.transaction()?;
            for id in &ids {
                ack(&tx, *id)?;
            }
            tx.commit()?;
        } else {
            for id in &ids {
                let tx = c.transaction()?;
                ack(&tx, *id)?;
                tx.commit()?;
            }
        }
        done += ids.len();
    }
    Ok(per_sec(n, t))
}

/// The key the bench signs bundles with, and the root that trusts it.
fn bench_key() -> (orch_core::trust::SigningKey, orch_core::trust::Root) {
    let key = orch_core::trust::SigningKey::from_seed([2; 32]);
    let pubs = [key.public()];
    let root = orch_core::trust::Root::sign(
        orch_core::trust::RootSigned::new(1, "2036-01-01T00:00:00Z", (&pubs, 1), (&pubs, 1)),
        std::slice::from_ref(&key),
    );
    (key, root)
}

/// Verify against its ceiling (zstd decoding and SHA-256 alone), then replay of the history
/// alone; `size` is the bundle's decoded content, `label` the job count of the size row.
fn verify_and_replay(
    bytes: &[u8],
    history: &[u8],
    size: usize,
    label: usize,
    row: &mut impl FnMut(&str, usize, f64, &str, Option<f64>),
) -> anyhow::Result<()> {
    let (_, root) = bench_key();
    let events = history.iter().filter(|&&b| b == b'\n').count();
    let opts = orch_verify::VerifyOptions { root, root_chain: Vec::new(), now: None, max_age_ms: None };
    let t = Instant::now();
    let report = orch_verify::verify(bytes, &opts);
    let verify_secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(report.ok, "verification failed: {:?}", report.failures);
    // Ceiling: zstd decoding plus sha256 over the decoded bytes, nothing else: streamed through
    // one buffer, so that no allocator's way of growing a large one is in the figure.
    let t = Instant::now();
    let mut decoder = zstd::stream::Decoder::new(bytes)?;
    let mut sha = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 1 << 17];
    loop {
        let n = std::io::Read::read(&mut decoder, &mut buf)?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut sha, &buf[..n]);
    }
    std::hint::black_box(sha2::Digest::finalize(sha));
    let ceiling_secs = t.elapsed().as_secs_f64();
    row(
        "verify, MB/s of bundle content",
        events,
        size as f64 / 1e6 / verify_secs,
        "MB/s",
        Some(size as f64 / 1e6 / ceiling_secs),
    );
    row("verify, events", events, events as f64 / verify_secs, "/s", None);

    let lines: Vec<&[u8]> = history.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    // Replay as the verifier does it: lines read and their hashes checked on all cores, linked
    // and applied in order on this one; and on this one alone, for the figure per core.
    for readers in [orch_core::chain::readers(), 1] {
        let t = Instant::now();
        let mut v = orch_core::chain::ChainVerifier::new();
        let mut failure = None;
        orch_core::chain::read_events(lines.iter().copied(), readers, |read| {
            match read.map_err(anyhow::Error::from).and_then(|r| Ok(v.push_read(r)?)) {
                Ok(()) => std::ops::ControlFlow::Continue(()),
                Err(e) => {
                    failure = Some(e);
                    std::ops::ControlFlow::Break(())
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        anyhow::ensure!(v.events() as usize == lines.len(), "replay stopped early");
        let name = if readers == 1 { "replay on one core, events" } else { "replay (parse+hash+chain+apply), events" };
        row(name, lines.len(), per_sec(lines.len(), t), "/s", None);
    }
    // Where one core's time goes, stage by stage, on the first lines (at most 100k events, kept
    // in memory between stages). Measured apart, each stage also pays for the memory it fills
    // and reads back, so their sum is more than an event costs replay, which passes each event
    // on while it is still in cache.
    let sample = &lines[..lines.len().min(100_000)];
    let t = Instant::now();
    let parsed: Vec<orch_core::Event> =
        sample.iter().map(|l| orch_core::Event::from_line(std::str::from_utf8(l)?)).collect::<Result<_, _>>()?;
    let parse_us = t.elapsed().as_secs_f64() * 1e6 / sample.len() as f64;
    let t = Instant::now();
    let mut scratch = Vec::new();
    anyhow::ensure!(parsed.iter().all(|e| e.hash_is_valid_with(&mut scratch)), "a hash does not match");
    let hash_us = t.elapsed().as_secs_f64() * 1e6 / sample.len() as f64;
    let t = Instant::now();
    let mut jobs = std::collections::BTreeMap::new();
    for ev in parsed {
        orch_core::machine::replay_owned(&mut jobs, ev)?;
    }
    let apply_us = t.elapsed().as_secs_f64() * 1e6 / sample.len() as f64;
    row("  replay stage: parse a line, us/event", sample.len(), parse_us, "us", None);
    row("  replay stage: check its hash, us/event", sample.len(), hash_us, "us", None);
    row("  replay stage: apply (and free), us/event", sample.len(), apply_us, "us", None);
    row("bundle size, bytes", label, bytes.len() as f64, "B", None);
    Ok(())
}

/// A schema of its own for a PostgreSQL measurement.
mod pg_bench {
    pub struct Schema {
        name: String,
        base: String,
    }

    impl Schema {
        pub fn new(base: &str) -> anyhow::Result<Schema> {
            anyhow::ensure!(
                base.starts_with("postgres://") || base.starts_with("postgresql://"),
                "--postgres takes a postgres:// URL"
            );
            let name = format!("orch_bench_{}", std::process::id());
            let mut c = postgres::Client::connect(base, postgres::NoTls)?;
            c.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"))?;
            Ok(Schema { name, base: base.to_string() })
        }

        /// The base connection string with the schema as its search path.
        pub fn url(&self, base: &str) -> String {
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}options=-c%20search_path%3D{}", self.name)
        }
    }

    impl Drop for Schema {
        fn drop(&mut self) {
            if let Ok(mut c) = postgres::Client::connect(&self.base, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rows: Vec<Value> = Vec::new();
    let mut table = vec![format!("{:<44} {:>10} {:>16} {:>10}", "benchmark", "jobs", "rate", "vs ceiling")];
    let mut row = |name: &str, jobs: usize, value: f64, unit: &str, ceiling: Option<f64>| {
        let ratio = ceiling.map(|c| value / c);
        table.push(format!(
            "{:<44} {:>10} {:>12.1} {:<4}{:>9}",
            name,
            jobs,
            value,
            unit,
            ratio.map_or(String::new(), |r| format!("{:.0}%", r * 100.0))
        ));
        rows.push(
            json!({"name": name, "jobs": jobs, "value": value, "unit": unit, "ceiling": ceiling, "ratio": ratio}),
        );
    };
    let mut peer_runs: Vec<Value> = Vec::new();
    let all = cli.only.is_empty();
    let ledger = all || cli.only.contains(&Group::Ledger);
    let bundles = all || cli.only.contains(&Group::Bundles);
    let http = !cli.no_http && (all || cli.only.contains(&Group::Http));
    if let Some(path) = &cli.bundle {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let entries = orch_verify::archive::read(&bytes).map_err(anyhow::Error::msg)?;
        let size = orch_core::bundle::DATA_FILES.iter().filter_map(|f| entries.files.get(*f)).map(Vec::len).sum();
        let history = &entries.files[orch_core::bundle::HISTORY];
        let jobs = history.iter().filter(|&&b| b == b'\n').count() / 3;
        verify_and_replay(&bytes, history, size, jobs, &mut row)?;
    }
    for &n in cli.jobs.iter().filter(|&&n| n > 0 && cli.bundle.is_none()) {
        let dir = tempfile::tempdir()?;
        if ledger || bundles {
            let db = dir.path().join("ledger.db");
            let store = open(&db)?;
            if !ledger {
                // The same history (3 events per job), built the quick way and not timed.
                enqueue(&store, n)?;
                claim_ack(&store, n, 100, true)?;
            } else {
                let ceiling1 = raw_claim_ack(&dir.path().join("raw1.db"), n.min(20_000), 1, false)?;
                let ceiling100 = raw_claim_ack(&dir.path().join("raw100.db"), n, 100, true)?;
                let ceiling100_single = raw_claim_ack(&dir.path().join("raw100s.db"), n, 100, false)?;
                row("raw sqlite claim+ack, batch 1", n.min(20_000), ceiling1, "/s", None);
                row("raw sqlite claim+ack, batch 100 (acks batched)", n, ceiling100, "/s", None);
                row("raw sqlite claim+ack, batch 100 (ack per txn)", n, ceiling100_single, "/s", None);

                let rate = enqueue(&store, n)?;
                row("orch enqueue, batch 100", n, rate, "/s", None);
                let first = n.min(20_000).min(n / 4);
                let rate = claim_ack(&store, first, 1, false)?;
                row("orch claim+ack, batch 1", first, rate, "/s", Some(ceiling1));
                let half = (n - first) / 2;
                let rate = claim_ack(&store, half, 100, false)?;
                row("orch claim 100, ack one per call", half, rate, "/s", Some(ceiling100_single));
                let rate = claim_ack(&store, n - first - half, 100, true)?;
                row("orch claim 100, acks batched (ack_many)", n - first - half, rate, "/s", Some(ceiling100));
            }

            if bundles {
                // Bundles over the resulting history (3 events per job).
                let events = 3 * n;
                let t = Instant::now();
                let opts = orch_bundle::ExportOptions {
                    scope: Scope::All,
                    from_seq: 1,
                    to_seq: None,
                    site_id: Some("bench".into()),
                    anchor: None,
                    redactor: orch_core::bundle::Redactor::new(Default::default(), Vec::new()),
                    previous: None,
                    origin: None,
                };
                let exported = orch_bundle::export(&store, opts).context("export")?;
                let (key, _) = bench_key();
                let env = orch_bundle::keys::sign_manifest(&exported.manifest_bytes(), std::slice::from_ref(&key));
                let bytes = exported.pack(&env)?;
                let export_rate = per_sec(events, t);
                let raw_size: usize = exported.files.values().map(Vec::len).sum();
                row("export (read+replay+hash+pack), events", events, export_rate, "/s", None);
                row(
                    "export, MB/s of bundle content",
                    events,
                    raw_size as f64 / 1e6 / t.elapsed().as_secs_f64(),
                    "MB/s",
                    None,
                );
                // `orchd check` on the same ledger: every line read and hashed, the chains
                // linked, the history replayed and compared with the jobs table.
                let t = Instant::now();
                let report = orch_store::check_ledger(&store).context("check")?;
                anyhow::ensure!(report.ok(), "the bench's ledger does not check: {:?}", report.problems);
                row("check (read+hash+chain+replay+compare), events", events, per_sec(events, t), "/s", None);
                if let Some(path) = &cli.save_bundle {
                    let path = path.replace("{jobs}", &n.to_string());
                    std::fs::write(&path, &bytes).with_context(|| format!("writing {path}"))?;
                    eprintln!("wrote {path}");
                }
                verify_and_replay(&bytes, &exported.files[orch_core::bundle::HISTORY], raw_size, n, &mut row)?;
            }
        }

        if let (true, Some(bin)) = (all, &cli.peer_apalis) {
            // orch first (fresh ledgers, all n jobs through one path each), then apalis.
            let load_before = peer::load_average();
            eprintln!("peer: {n} jobs, load average {load_before}");
            let (orch_push, orch1) = peer::orch(&dir.path().join("peer-orch-1.db"), n, 1, false)?;
            let (_, orch100) = peer::orch(&dir.path().join("peer-orch-100.db"), n, 100, true)?;
            let w = cli.workers;
            let max = cli.peer_max_secs;
            let runs = peer::apalis(bin, &dir.path().join("apalis-1"), n, 1, max)
                .and_then(|one| Ok((one, peer::apalis(bin, &dir.path().join("apalis-w"), n, w, max)?)));
            match runs {
                Ok((one, many)) => {
                    for (r, workers) in [(&one, 1), (&many, w)] {
                        if !r.complete {
                            eprintln!(
                                "peer: apalis, {workers} worker(s): stopped after {max} s, {} of {n} acked",
                                r.done
                            );
                        }
                    }
                    row("apalis (SQLite) push, batches of 100", n, one.push_per_sec, "/s", None);
                    row("apalis (SQLite) process, 1 worker", one.done, one.process_per_sec, "/s", None);
                    row(&format!("apalis (SQLite) process, {w} workers"), many.done, many.process_per_sec, "/s", None);
                    // "ceiling" holds apalis's figure here, so "ratio" is orch / apalis.
                    let best = one.process_per_sec.max(many.process_per_sec);
                    row("orch/apalis: enqueue vs push, batches of 100", n, orch_push, "/s", Some(one.push_per_sec));
                    row("orch/apalis: claim+ack batch 1 vs apalis best", n, orch1, "/s", Some(best));
                    row("orch/apalis: claim 100 + ack_many vs apalis best", n, orch100, "/s", Some(best));
                    peer_runs.push(json!({
                        "jobs": n,
                        "load_average_before": load_before,
                        "load_average_after": peer::load_average(),
                        "orch": {"enqueue_per_sec": orch_push, "claim_ack_batch1_per_sec": orch1,
                                 "claim100_ack_many_per_sec": orch100},
                        "apalis": [one.doc, many.doc],
                    }));
                }
                Err(e) => eprintln!("peer: apalis at {n} jobs failed, no peer rows: {e:#}"),
            }
        }

        if http {
            let d = http::Daemon::start(dir.path(), 100_000_000)?;
            std::thread::sleep(std::time::Duration::from_millis(500));
            row("orchd RSS idle, MB", 0, d.rss()? as f64 / 1e6, "MB", None);
            // All n jobs are queued for the memory figure; the work figures use at most 200k.
            let h = n.min(200_000);
            row("HTTP enqueue, batches of 1000", n, d.enqueue("http", n)?, "/s", None);
            row("orchd RSS with the jobs queued, MB", n, d.rss()? as f64 / 1e6, "MB", None);
            let w = cli.workers;
            eprintln!("HTTP at {n} jobs: load average {}", peer::load_average());
            let (rate, cpu) = http::cpu_per_job(&d, h / 2, || d.work("http", h / 2, w, 100))?;
            row(&format!("HTTP claim+ack, batch 100, {w} workers"), h / 2, rate, "/s", None);
            row("  orchd CPU per job, batch 100, us", h / 2, cpu.daemon_us, "us", None);
            row("  client CPU per job, batch 100, us", h / 2, cpu.client_us, "us", None);
            let single = (h / 2).min(20_000);
            let (peak, cpu) = http::cpu_per_job(&d, single, || d.work("http", single, w, 1))?;
            row(&format!("HTTP claim+ack, 1 per request, {w} workers"), single, peak, "/s", None);
            row("  orchd CPU per job, 1 per request, us", single, cpu.daemon_us, "us", None);
            row("  client CPU per job, 1 per request, us", single, cpu.client_us, "us", None);
            // More workers than cores: the daemon's writes queue, and commit together.
            let many = (w * 4).max(16);
            d.enqueue("http", single)?;
            let (rate, cpu) = http::cpu_per_job(&d, single, || d.work("http", single, many, 1))?;
            row(&format!("HTTP claim+ack, 1 per request, {many} workers"), single, rate, "/s", None);
            row(&format!("  orchd CPU per job, {many} workers, us"), single, cpu.daemon_us, "us", None);
            let (rate, at) = match cli.latency_rate {
                r if r > 0.0 => (r, format!("{r} jobs/s")),
                _ => (peak / 2.0, "half peak".to_string()),
            };
            let (p50, p99) = d.latency("latency", rate, 5.0, w)?;
            row(&format!("HTTP enqueue->claim p50 at {at}, ms"), 0, p50, "ms", None);
            row(&format!("HTTP enqueue->claim p99 at {at}, ms"), 0, p99, "ms", None);
        }
    }
    if let Some(pg) = &cli.postgres {
        let n = cli.jobs.iter().copied().max().unwrap_or(10_000).min(100_000);
        let w = cli.workers;
        for procs in [1usize, 2] {
            let schema = pg_bench::Schema::new(pg)?;
            let url = schema.url(pg);
            let daemons = (0..procs)
                .map(|_| http::Daemon::start_on(std::ffi::OsStr::new(&url), 100_000_000))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ds: Vec<&http::Daemon> = daemons.iter().collect();
            row(
                &format!("PostgreSQL: HTTP enqueue, batches of 1000, {procs} orchd"),
                n,
                ds[0].enqueue("pg", n)?,
                "/s",
                None,
            );
            let rate = http::work_across(&ds, "pg", n / 2, w * procs, 100)?;
            row(
                &format!("PostgreSQL: HTTP claim+ack, batch 100, {procs} orchd, {} workers", w * procs),
                n / 2,
                rate,
                "/s",
                None,
            );
            let single = (n / 2).min(10_000);
            let rate = http::work_across(&ds, "pg", single, w * procs, 1)?;
            row(
                &format!("PostgreSQL: HTTP claim+ack, 1 per request, {procs} orchd, {} workers", w * procs),
                single,
                rate,
                "/s",
                None,
            );
        }
    }
    if cli.deep_queue > 0 {
        let n = cli.deep_queue;
        let dir = tempfile::tempdir()?;
        let d = http::Daemon::start(dir.path(), n as u64 + 1)?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        row("deep queue: orchd RSS idle, MB", 0, d.rss()? as f64 / 1e6, "MB", None);
        let marks = [n / 10, n / 2, n];
        let (rss, rate) = d.deep_queue("deep", &marks)?;
        row("deep queue: HTTP enqueue, batches of 1000", n, rate, "/s", None);
        for (mark, rss) in marks.iter().zip(rss) {
            row("deep queue: orchd RSS with the jobs queued, MB", *mark, rss as f64 / 1e6, "MB", None);
        }
    }
    let mut load_rss = Vec::new();
    if cli.load_secs > 0 {
        let dir = tempfile::tempdir()?;
        // A backlog bound, so that the producer meets backpressure and the queue stays bounded.
        let d = http::Daemon::start(dir.path(), 20_000)?;
        let r = d.load(cli.load_secs, cli.workers)?;
        let secs = cli.load_secs as usize;
        let last = r.rss_mb.last().copied().unwrap_or(0.0);
        let max = r.rss_mb.iter().copied().fold(0.0, f64::max);
        row(&format!("load {secs}s: jobs acked"), r.acked, r.acked as f64 / secs as f64, "/s", None);
        row("load: errors other than backpressure", r.errors, r.errors as f64, "", None);
        row("load: enqueues refused by backpressure", r.backpressure, r.backpressure as f64, "", None);
        // RSS after 1 s, then every minute (every quarter of runs shorter than two minutes).
        let step = if secs >= 120 { 60 } else { secs.div_ceil(4).max(1) };
        for at in std::iter::once(1).chain((step..secs).step_by(step)) {
            row(&format!("load: RSS after {at} s, MB"), 0, r.rss_at(at).unwrap_or(0.0), "MB", None);
        }
        row("load: RSS at the end, MB", 0, last, "MB", None);
        row("load: RSS max, MB", 0, max, "MB", None);
        row("load: RSS slope over the last half, MB/min", 0, r.late_slope_mb_per_min(), "MB/m", None);
        row("load: jobs left queued", r.enqueued - r.acked, (r.enqueued - r.acked) as f64, "", None);
        load_rss = r.rss_mb;
    }
    for l in &table {
        println!("{l}");
    }
    if let Some(dir) = cli.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut doc = json!({"machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)}, "results": rows});
    if cli.peer_apalis.is_some() {
        doc["peer_apalis"] = Value::Array(peer_runs);
    }
    if !load_rss.is_empty() {
        // Every sample of the sustained load, one a second, for plotting.
        doc["load_rss_mb"] = json!(load_rss);
    }
    std::fs::write(&cli.out, serde_json::to_string_pretty(&doc)? + "\n")?;
    eprintln!("wrote {}", cli.out.display());
    Ok(())
}
