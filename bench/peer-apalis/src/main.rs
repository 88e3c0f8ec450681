//! `peer-apalis`: the peer side of orch's benchmark. Pushes N jobs into apalis's SQLite backend
//! and processes them with apalis workers running a no-op handler, on a fresh database file,
//! then prints one JSON object with the rates on stdout.
//!
//! Not a member of orch's workspace, so orch's own build and tests never compile apalis;
//! `scripts/bench` builds it and `orch-bench --peer-apalis PATH` runs it.
//!
//! What it measures:
//! - push: `push_bulk` of 100 jobs a call; apalis writes each call in one transaction, one
//!   `INSERT` a job (the same batching as orch's `enqueue` benchmark);
//! - process: from the workers' start until every job's row says it is done (or `--max-secs`).
//!   The workers run under apalis's `Monitor` with apalis's default `Config`: each fetches
//!   `--batch` jobs a transaction (`UPDATE … RETURNING`), marks them running and, once the
//!   handler returns, acks them; locks and acks travel over a channel and are written in one
//!   transaction per drain. The handler only counts.
//!
//! Durability: apalis's `setup()` switches the file to WAL and sets `synchronous = OFF` on
//! whichever pooled connection runs it (the others keep SQLite's default, FULL). Here the
//! migrations run on a pool of their own that is then closed, and every connection of the
//! measured pool is opened with WAL and `--synchronous` (default `normal`, orch's setting).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_sqlite::{Config, SqliteStorage};
use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// The versions pinned in Cargo.toml (`=`), reported with the figures.
const APALIS_VERSION: &str = "1.0.0";
const APALIS_SQLITE_VERSION: &str = "1.0.0";

const USAGE: &str = "usage: peer-apalis --jobs N [--dir DIR] [--workers W] [--batch B] [--synchronous normal|off|full]
                   [--analyze] [--max-secs S]

  --jobs N         jobs to push and then process (required)
  --dir DIR        where to create the database file apalis.db (default: a new directory under
                   the system's temporary directory, removed afterwards)
  --workers W      apalis workers processing at once, each with its own name (default 1)
  --batch B        jobs a worker fetches per query: apalis's Config::batch_size (default 10,
                   apalis's default)
  --synchronous S  PRAGMA synchronous on every connection (default normal)
  --analyze        run ANALYZE between push and process (timed apart), so that SQLite's planner
                   has statistics for apalis's queries; apalis itself never runs it
  --max-secs S     stop processing after S seconds and report the jobs done by then (default 600)";

struct Args {
    jobs: usize,
    dir: Option<PathBuf>,
    workers: usize,
    batch: usize,
    synchronous: String,
    analyze: bool,
    max_secs: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args =
        Args { jobs: 0, dir: None, workers: 1, batch: 10, synchronous: "normal".into(), analyze: false, max_secs: 600 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if flag == "--analyze" {
            args.analyze = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--jobs" => args.jobs = number(&value)?,
            "--dir" => args.dir = Some(PathBuf::from(value)),
            "--workers" => args.workers = number(&value)?,
            "--batch" => args.batch = number(&value)?,
            "--synchronous" => args.synchronous = value.to_ascii_lowercase(),
            "--max-secs" => args.max_secs = number(&value)? as u64,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if args.jobs == 0 || args.workers == 0 || args.batch == 0 {
        return Err("--jobs, --workers and --batch must be at least 1".into());
    }
    if !["normal", "off", "full"].contains(&args.synchronous.as_str()) {
        return Err(format!("--synchronous {}: expected normal, off or full", args.synchronous));
    }
    Ok(args)
}

/// Jobs the handler has run, across all workers.
static HANDLED: AtomicUsize = AtomicUsize::new(0);

/// Workers the monitor restarted after an error.
static RESTARTS: AtomicUsize = AtomicUsize::new(0);

/// The no-op job: count it and succeed (apalis then acks it as done).
async fn handle(job: Value) -> Result<(), BoxDynError> {
    std::hint::black_box(job);
    HANDLED.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn count_done(pool: &sqlx::SqlitePool) -> Result<i64, Error> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM Jobs WHERE done_at IS NOT NULL").fetch_one(pool).await?)
}

async fn run(args: &Args, db: &std::path::Path) -> Result<Value, Error> {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let base = SqliteConnectOptions::new().filename(db).create_if_missing(true);

    // apalis's migrations (its own PRAGMAs included) on a pool that is closed afterwards.
    let setup_pool = SqlitePoolOptions::new().max_connections(1).connect_with(base.clone()).await?;
    SqliteStorage::setup(&setup_pool).await?;
    setup_pool.close().await;

    let sync = SqliteSynchronous::from_str(&args.synchronous)?;
    let options = base.journal_mode(SqliteJournalMode::Wal).synchronous(sync);
    let pool = SqlitePoolOptions::new().connect_with(options.clone()).await?;
    let sqlite_version: String = sqlx::query_scalar("SELECT sqlite_version()").fetch_one(&pool).await?;
    let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&pool).await?;

    let config = Config::default().queue("ingest").batch_size(args.batch);
    let mut storage = SqliteStorage::<Value>::new(&pool).with_config(config.clone());

    let n = args.jobs;
    let push_batch = 100;
    let t = Instant::now();
    for chunk in 0..n.div_ceil(push_batch) {
        let jobs = (chunk * push_batch..n.min((chunk + 1) * push_batch))
            .map(|i| json!({"url": "https://feeds.example/item", "n": i}))
            .collect();
        storage.push_bulk(jobs).await?;
    }
    let push_secs = t.elapsed().as_secs_f64();
    let pushed: i64 = sqlx::query_scalar("SELECT count(*) FROM Jobs").fetch_one(&pool).await?;
    if pushed != n as i64 {
        return Err(format!("pushed {n} jobs but the table holds {pushed}").into());
    }

    let analyze_secs = if args.analyze {
        let t = Instant::now();
        sqlx::query("ANALYZE").execute(&pool).await?;
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };
    // A fresh pool for the workers, as after a restart: SQLite reads the planner's statistics
    // when a connection loads the schema.
    pool.close().await;
    let pool = SqlitePoolOptions::new().connect_with(options).await?;

    let t = Instant::now();
    let deadline = t + Duration::from_secs(args.max_secs);
    // Workers run under apalis's Monitor, which restarts a worker that fails (SQLite's
    // "database is locked" stops a worker when several share the file); a restarted worker
    // takes a new name, since apalis refuses a name seen within the heartbeat interval.
    let factory_pool = pool.clone();
    let monitor = Monitor::new()
        .register_n(args.workers, move |index, restarts| {
            let backend = SqliteStorage::<Value>::new(&factory_pool).with_config(config.clone());
            WorkerBuilder::new(format!("peer-{index}-{restarts}")).backend(backend).build(handle)
        })
        .should_restart(|_, error| {
            RESTARTS.fetch_add(1, Ordering::Relaxed);
            eprintln!("peer-apalis: restarting a worker after: {error}");
            true
        });
    let monitor = tokio::spawn(monitor.run());
    // The handler's count first (no queries while the workers run), then the acks in the table.
    let mut handled_secs = None;
    let mut done = 0;
    while Instant::now() < deadline {
        if monitor.is_finished() {
            return Err(format!("apalis's monitor stopped early: {:?}", monitor.await).into());
        }
        if handled_secs.is_none() {
            if HANDLED.load(Ordering::Relaxed) >= n {
                handled_secs = Some(t.elapsed().as_secs_f64());
            }
        } else {
            done = count_done(&pool).await?;
            if done >= n as i64 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let process_secs = t.elapsed().as_secs_f64();
    let complete = done >= n as i64;
    if !complete {
        done = count_done(&pool).await?;
    }
    monitor.abort();
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM Jobs GROUP BY status").fetch_all(&pool).await?;
    pool.close().await;

    Ok(json!({
        "apalis_version": APALIS_VERSION,
        "apalis_sqlite_version": APALIS_SQLITE_VERSION,
        "sqlite_version": sqlite_version,
        "journal_mode": journal_mode,
        "synchronous": args.synchronous,
        "jobs": n,
        "workers": args.workers,
        "fetch_batch": args.batch,
        "push_batch": push_batch,
        "push_secs": push_secs,
        "push_per_sec": n as f64 / push_secs,
        "analyze_secs": analyze_secs,
        "complete": complete,
        "worker_restarts": RESTARTS.load(Ordering::Relaxed),
        "done": done,
        "handled_secs": handled_secs,
        "process_secs": process_secs,
        "process_per_sec": done as f64 / process_secs,
        "statuses": statuses.into_iter().map(|(s, c)| (s, json!(c))).collect::<serde_json::Map<_, _>>(),
    }))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("peer-apalis: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let (dir, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("peer-apalis-{}", std::process::id())), true),
    };
    let result = std::fs::create_dir_all(&dir).map_err(Error::from).and_then(|()| {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        rt.block_on(run(&args, &dir.join("apalis.db")))
    });
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match result {
        Ok(doc) => println!("{doc}"),
        Err(e) => {
            eprintln!("peer-apalis: {e}");
            std::process::exit(1);
        }
    }
}
