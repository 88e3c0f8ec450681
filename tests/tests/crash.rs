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
