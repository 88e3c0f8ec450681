//! orchd on PostgreSQL, through the binaries: several daemons share one database without
//! double work and elect one to run the site's services; a SQLite ledger moved to PostgreSQL
//! exports the very same bundle bytes; a re-read of the rules that waits for the server holds up
//! no other request.
//!
//! Uses `ORCH_TEST_POSTGRES` (default: `host=127.0.0.1 user=postgres dbname=test`), each test in
//! a schema of its own. Where no server answers, each test prints SKIP and passes, unless
//! `ORCH_REQUIRE_POSTGRES=1` (as in CI) makes that a failure.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use orch_e2e::{run, Daemon};
use serde_json::json;

fn base() -> String {
    std::env::var("ORCH_TEST_POSTGRES").unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

/// A schema of its own on the test server, dropped afterwards; `None` (after printing why)
/// where there is no server.
struct Schema {
    name: String,
}

impl Schema {
    fn new() -> Option<Schema> {
        let mut c = match postgres::Client::connect(&base(), postgres::NoTls) {
            Ok(c) => c,
            Err(e) => {
                let why = format!("no PostgreSQL at {:?}: {e}", base());
                assert!(
                    std::env::var("ORCH_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                    "ORCH_REQUIRE_POSTGRES=1 but {why}"
                );
                eprintln!("SKIP: {why}");
                return None;
            }
        };
        let name = format!("orch_e2e_{:016x}", rand_u64());
        c.batch_execute(&format!("CREATE SCHEMA {name}")).unwrap();
        Some(Schema { name })
    }

    /// The ledger's URL, as a user would write it.
    fn url(&self) -> String {
        let c: postgres::Config = base().parse().unwrap();
        let host = match &c.get_hosts()[0] {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = c.get_ports().first().copied().unwrap_or(5432);
        format!(
            "postgres://{}@{host}:{port}/{}?options=-c%20search_path%3D{}",
            c.get_user().unwrap_or("postgres"),
            c.get_dbname().unwrap_or("postgres"),
            self.name
        )
    }

    fn client(&self) -> postgres::Client {
        let mut c = postgres::Client::connect(&base(), postgres::NoTls).unwrap();
        c.batch_execute(&format!("SET search_path = {}", self.name)).unwrap();
        c
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&base(), postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    h.finish()
}

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

#[test]
fn a_ledger_moved_to_postgres_exports_the_same_bundle_bytes() {
    let Some(schema) = Schema::new() else { return };
    let url = schema.url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("golden.db");
    std::fs::copy(fixtures().join("ledger/golden.db"), &db).unwrap();

    let (code, out, err) = run("orchd", &["copy-ledger", "--from", db.to_str().unwrap(), "--to", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: ") && out.contains("reproduced by replay"), "{out}");

    // The golden bundle was exported from the SQLite ledger with these options.
    let redaction = dir.path().join("redaction.key");
    std::fs::write(&redaction, b"redaction-key").unwrap();
    let key = fixtures().join("keys/test-2.key");
    let export = |db: &str, out: &Path| {
        let args = [
            "export",
            "--db",
            db,
            "--key",
            key.to_str().unwrap(),
            "--site-id",
            "site-test",
            "--redaction-key",
            redaction.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        let (code, o, e) = run("orch-bundle", &args);
        assert_eq!(code, 0, "{o}{e}");
        std::fs::read(out).unwrap()
    };
    let golden = std::fs::read(fixtures().join("bundles/valid/bundle.tar.zst")).unwrap();
    let from_sqlite = export(db.to_str().unwrap(), &dir.path().join("sqlite.tar.zst"));
    let from_postgres = export(&url, &dir.path().join("postgres.tar.zst"));
    assert_eq!(from_sqlite, golden, "the SQLite export is the golden bundle");
    assert!(from_postgres == golden, "the PostgreSQL export differs from the golden bundle");

    // A second copy into a ledger that is no longer empty is refused and changes nothing.
    let before: i64 = schema.client().query_one("SELECT count(*) FROM history", &[]).unwrap().get(0);
    let (code, _, err) = run("orchd", &["copy-ledger", "--from", db.to_str().unwrap(), "--to", &url]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not empty"), "{err}");
    let after: i64 = schema.client().query_one("SELECT count(*) FROM history", &[]).unwrap().get(0);
    assert_eq!(before, after);
    let (code, out, err) = run("orchd", &["check", "--db", &url]);
    assert_eq!(code, 0, "{out}{err}");
}

fn ready(d: &Daemon) -> serde_json::Value {
    orch_e2e::api::Client::new(&d.url, None).get("/readyz").json
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_daemons_share_one_database_and_one_leader() {
    use orch_worker::{Client as Sdk, Config, Worker};

    let Some(schema) = Schema::new() else { return };
    let url = schema.url();
    let token = orch_e2e::token(Path::new(&url), "acme", "orch:work,orch:read,orch:operate");
    let env = [("ORCHD_REAPER_INTERVAL_MS", "100")];
    let a = Daemon::start_env(Path::new(&url), &[], &env);
    let b = Daemon::start_env(Path::new(&url), &[], &env);
    wait_for("one daemon leads", Duration::from_secs(10), || {
        ready(&a)["leader"].as_bool().unwrap() ^ ready(&b)["leader"].as_bool().unwrap()
    });

    const JOBS: usize = 300;
    let api_a = orch_e2e::api::Client::new(&a.url, Some(&token));
    for chunk in 0..3 {
        let jobs: Vec<_> = (0..100).map(|i| json!({"queue": "shared", "payload": {"n": chunk * 100 + i}})).collect();
        let r = api_a.post("/api/v1/jobs/batch", &json!({ "jobs": jobs }));
        assert_eq!(r.status, 200, "{}", r.json);
    }
    // One worker on each daemon: both see the same queue.
    let workers: Vec<_> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut config = Config::new(&format!("worker-{i}"), &["shared"]);
            config.concurrency = 4;
            config.batch = 5;
            config.idle_poll = Duration::from_millis(20);
            let worker = Worker::new(Sdk::new(&d.url, &token), config, |job, ctx| {
                ctx.artifact("n.txt", "text/plain", job.payload["n"].to_string().into_bytes());
                Ok(())
            });
            let stop = worker.stop_handle();
            (stop, std::thread::spawn(move || worker.run_until_stopped()))
        })
        .collect();
    let api_b = orch_e2e::api::Client::new(&b.url, Some(&token));
    wait_for("every job succeeded", Duration::from_secs(60), || {
        api_b.get("/api/v1/stats").json["jobs"]["succeeded"].as_u64() == Some(JOBS as u64)
    });
    let mut per_worker = BTreeMap::new();
    for (i, (stop, runner)) in workers.into_iter().enumerate() {
        stop.stop();
        let summary = runner.join().unwrap().unwrap();
        per_worker.insert(i, summary.count(|o| matches!(o, orch_worker::Outcome::Succeeded(_))) as u64);
    }
    assert!(per_worker.values().all(|n| *n > 0), "both daemons served work: {per_worker:?}");
    assert_eq!(per_worker.values().sum::<u64>(), JOBS as u64, "{per_worker:?}");

    let mut c = schema.client();
    let count = |c: &mut postgres::Client, sql: &str| c.query_one(sql, &[]).unwrap().get::<_, i64>(0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM (SELECT job_id FROM history WHERE type = 'job.claimed' GROUP BY job_id HAVING count(*) > 1) d"),
        0,
        "no job was claimed twice"
    );
    assert_eq!(count(&mut c, "SELECT count(DISTINCT job_id) FROM history WHERE type = 'job.succeeded'"), JOBS as i64);
    assert_eq!(count(&mut c, "SELECT max(seq) - count(*) FROM history"), 0, "the history has no gap");

    // The leader goes away without warning: the other daemon takes over the site's services.
    // A lease taken through the survivor and then abandoned is reaped only by a leader.
    let (leader, follower) = if ready(&a)["leader"] == true { (a, b) } else { (b, a) };
    leader.kill();
    wait_for("the survivor leads", Duration::from_secs(10), || ready(&follower)["leader"] == true);
    let api = orch_e2e::api::Client::new(&follower.url, Some(&token));
    let job = api.post("/api/v1/jobs", &json!({"queue": "abandoned", "payload": {}, "max_attempts": 1}));
    assert_eq!(job.status, 201, "{}", job.json);
    let id = job.json["job"]["id"].as_i64().unwrap();
    let claim = api.post("/api/v1/claims", &json!({"worker_id": "gone", "queues": ["abandoned"], "lease_seconds": 1}));
    assert_eq!(claim.json["allocations"][0]["job"]["id"].as_i64(), Some(id), "{}", claim.json);
    wait_for("the abandoned lease is reaped", Duration::from_secs(10), || {
        api.get(&format!("/api/v1/jobs/{id}")).json["job"]["state"] == "dead"
    });

    let (code, out, err) = run("orchd", &["check", "--db", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{} jobs reproduced", JOBS + 1)), "{out}");
}

#[test]
fn commands_and_errors_on_a_postgres_ledger() {
    let Some(schema) = Schema::new() else { return };
    let url = schema.url();
    // Commands that need a ledger refuse an empty schema and create nothing.
    let (code, _, err) = run("orchd", &["check", "--db", &url]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no such ledger"), "{err}");
    let tables: i64 = schema
        .client()
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()", &[])
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
    // An unreachable server is one line naming it, exit 2.
    let (code, _, err) = run("orchd", &["check", "--db", "postgres://postgres@127.0.0.1:1/test"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with("orchd: opening postgres://postgres@127.0.0.1:1/test"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A URL with a password never shows it.
    let (code, _, err) = run("orchd", &["check", "--db", "postgres://orch:s3cret@127.0.0.1:1/test"]);
    assert_eq!(code, 2);
    assert!(!err.contains("s3cret"), "{err}");
    // A malformed URL is a usage error.
    let (code, _, err) = run("orchd", &["check", "--db", "postgres://127.0.0.1:notaport/test"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a PostgreSQL URL"), "{err}");

    // Operator commands work on PostgreSQL as on SQLite, audited in the history.
    let d = Daemon::start(Path::new(&url), &[]);
    let (code, out, err) =
        run("orchd", &["pause", "--db", &url, "--tenant", "acme", "--queue", "ingest", "--reason", "upstream down"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("paused queue:ingest of tenant acme"), "{out}");
    drop(d);
    let n: i64 = schema
        .client()
        .query_one("SELECT count(*) FROM history WHERE line LIKE '%\"pause.put\"%' AND line LIKE '%cli:%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// Re-reading the flow-control rules waits for the server, but not while holding flow control:
/// while another session locks the table the rules are read from, `/metrics` and enqueues (which
/// count the queue under the flow-control lock) still answer. Once the lock is gone, a rule
/// changed meanwhile takes effect.
#[test]
fn a_rules_read_that_waits_for_the_server_holds_up_neither_metrics_nor_enqueues() {
    use std::sync::mpsc;
    let Some(schema) = Schema::new() else { return };
    let url = schema.url();
    let token = orch_e2e::token(Path::new(&url), "acme", "orch:work,orch:read,orch:quota");
    let d = Daemon::start_env(Path::new(&url), &[], &[("ORCHD_FLOW__RELOAD_MS", "50")]);
    let api = orch_e2e::api::Client::new(&d.url, Some(&token));
    assert_eq!(api.post("/api/v1/jobs", &json!({"queue": "q", "payload": {}})).status, 201);

    let mut holder = schema.client();
    let mut tx = holder.transaction().unwrap();
    tx.batch_execute("LOCK TABLE sources IN ACCESS EXCLUSIVE MODE").unwrap();
    let mut watcher = schema.client();
    wait_for("a rules read waits for the lock", Duration::from_secs(10), || {
        let waiting: i64 = watcher
            .query_one("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'sources'::regclass", &[])
            .unwrap()
            .get(0);
        waiting > 0
    });
    let (answer_tx, answer_rx) = mpsc::channel();
    let client = api.clone();
    std::thread::spawn(move || {
        let metrics = client.get("/metrics").status;
        let enqueued = client.post("/api/v1/jobs", &json!({"queue": "q", "payload": {}})).status;
        let _ = answer_tx.send((metrics, enqueued));
    });
    let answered = answer_rx.recv_timeout(Duration::from_secs(5));
    // A quota set meanwhile is written, and applied once its own re-read gets through.
    let (quota_tx, quota_rx) = mpsc::channel();
    let client = api.clone();
    std::thread::spawn(move || {
        let body = json!({"max_queued": 2, "reason": "upstream asked", "ticket": "CHG-1"});
        let _ = quota_tx.send(client.put("/api/v1/quotas/q", &body).status);
    });
    std::thread::sleep(Duration::from_millis(300));
    tx.rollback().unwrap();
    assert_eq!(answered, Ok((200, 201)), "metrics and enqueues answer while the rules read waits");
    assert_eq!(quota_rx.recv_timeout(Duration::from_secs(10)), Ok(200));
    let r = api.post("/api/v1/jobs", &json!({"queue": "q", "payload": {}}));
    assert_eq!(r.status, 429, "the quota applies: {}", r.json);
}
