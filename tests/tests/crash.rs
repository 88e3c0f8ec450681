//! Crash safety: `orchd` killed with SIGKILL in the middle of work loses no committed job or
//! event, and after a restart the hash chains verify and replay reproduces the jobs table.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orch_core::{JobState, ManualClock, Timestamp};
use orch_e2e::{run, Daemon};
use orch_store::{Scope, SqliteStore, Store};

/// Job ids the demo worker logged as succeeded (it logs after the ack committed).
fn acked_ids(d: &Daemon, into: &mut BTreeSet<i64>) {
    for line in d.stderr.try_iter() {
        if line.contains("demo job succeeded") {
            let id =
                line.split("job.id=").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok());
            into.insert(id.unwrap_or_else(|| panic!("unparsable log line {line:?}")));
        }
    }
}

#[test]
fn sigkill_mid_work_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let db_arg = db.to_str().unwrap();
    let mut acked = BTreeSet::new();
    let mut events_before_restart = 0;

    for round in 0..3 {
        let d = Daemon::start(&db, &["--demo"]);
        // Let work happen, then kill without warning while the worker is busy.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut round_acks = BTreeSet::new();
        while round_acks.len() < 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            acked_ids(&d, &mut round_acks);
        }
        std::thread::sleep(Duration::from_millis(round * 37));
        d.kill();
        assert!(round_acks.len() >= 10, "round {round}: the demo worker made no progress");
        acked.extend(round_acks);

        let (code, out, err) = run("orchd", &["check", "--db", db_arg]);
        assert_eq!(code, 0, "round {round}: ledger check failed after SIGKILL:\n{out}\n{err}");
        assert!(out.starts_with("ok: "), "{out}");

        let store = SqliteStore::open(
            &db,
            Arc::new(ManualClock::new(Timestamp::from_millis(0))),
            Default::default(),
            Default::default(),
        )
        .unwrap();
        for id in &acked {
            let job = store.job(&Scope::All, *id).unwrap();
            assert_eq!(job.state, JobState::Succeeded, "job {id} was acked before the kill");
        }
        let events = store.stats(&Scope::All).unwrap().events;
        assert!(events > events_before_restart, "round {round}: history grew");
        events_before_restart = events;
    }
}

#[test]
fn check_reports_a_tampered_ledger_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let d = Daemon::start(&db, &["--demo"]);
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        acked_ids(&d, &mut acked);
    }
    assert!(d.stop().success(), "orchd exits 0 on SIGTERM");
    tamper(&db);
    let (code, out, _) = run("orchd", &["check", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL event 2: hash does not match content"), "{out}");
    let (code, _, err) = run("orchd", &["check", "--db", dir.path().join("absent.db").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("no such ledger"), "{err}");
}

/// Flips the actor of event 2 in place, as someone with write access to the file could.
fn tamper(db: &std::path::Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let n = conn
        .execute("UPDATE history SET line = replace(line, '\"actor\":\"', '\"actor\":\"x') WHERE seq = 2", [])
        .unwrap();
    assert_eq!(n, 1);
}

/// External workers (the Rust SDK, over HTTP) keep working while the daemon is killed with
/// SIGKILL at arbitrary moments and restarted on the same address: in the end every job is
/// succeeded exactly once or dead-lettered, no lease is left behind, and the ledger verifies.
#[test]
fn workers_under_load_survive_repeated_sigkills() {
    use orch_worker::{Client as Sdk, Config, JobError, Worker};

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let token = orch_e2e::token(&db, "acme", "orch:work,orch:read");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let env = [("ORCHD_REAPER_INTERVAL_MS", "100")];
    let mut daemon = Daemon::start_env(&db, &["--listen", &listen], &env);
    let api = orch_e2e::api::Client::new(&daemon.url, Some(&token));
    const JOBS: u64 = 400;
    for chunk in 0..4 {
        let jobs: Vec<_> = (0..100)
            .map(|i| serde_json::json!({"queue": "crash", "payload": {"n": chunk * 100 + i}, "max_attempts": 10}))
            .collect();
        assert_eq!(api.post("/api/v1/jobs/batch", &serde_json::json!({ "jobs": jobs })).status, 200);
    }

    let mut config = Config::new("crash-worker", &["crash"]);
    config.concurrency = 4;
    config.lease_seconds = Some(2);
    config.idle_poll = Duration::from_millis(50);
    let worker = Worker::new(Sdk::new(&daemon.url, &token), config, |job, ctx| {
        std::thread::sleep(Duration::from_millis(5));
        if job.payload["n"].as_u64() == Some(7) {
            return Err(JobError::permanent("poison", "job 7 always fails"));
        }
        ctx.artifact("n.txt", "text/plain", job.payload["n"].to_string().into_bytes());
        Ok(())
    });
    let stop = worker.stop_handle();
    let runner = std::thread::spawn(move || worker.run_until_stopped());

    for round in 0..4u64 {
        std::thread::sleep(Duration::from_millis(300 + round * 170));
        daemon.kill();
        std::thread::sleep(Duration::from_millis(100));
        daemon = Daemon::start_env(&db, &["--listen", &listen], &env);
    }
    let api = orch_e2e::api::Client::new(&daemon.url, Some(&token));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = api.get("/api/v1/stats").json;
        let done = ["succeeded", "dead"].iter().map(|s| stats["jobs"][s].as_u64().unwrap_or(0)).sum::<u64>();
        if done == JOBS {
            break;
        }
        assert!(Instant::now() < deadline, "not every job finished: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.stop();
    runner.join().unwrap().unwrap();
    daemon.stop();

    let conn = rusqlite::Connection::open(&db).unwrap();
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(count("SELECT count(*) FROM jobs WHERE state = 'succeeded'"), JOBS as i64 - 1);
    assert_eq!(count("SELECT count(*) FROM jobs WHERE state = 'dead'"), 1);
    assert_eq!(count("SELECT count(*) FROM jobs WHERE lease_id IS NOT NULL"), 0, "no lease left behind");
    assert_eq!(
        count("SELECT count(*) FROM (SELECT job_id FROM history WHERE type = 'job.succeeded' GROUP BY job_id HAVING count(*) > 1)"),
        0,
        "no job succeeded twice"
    );
    assert_eq!(count("SELECT count(DISTINCT job_id) FROM history WHERE type = 'job.succeeded'"), JOBS as i64 - 1);
    let (code, out, err) = run("orchd", &["check", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}
