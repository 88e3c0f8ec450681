//! The store conformance suite on the SQLite backend, plus SQLite-specific cases.

use std::sync::Arc;

use orch_core::ManualClock;
use orch_store::{SqliteStore, Store, StoreError, StoreOptions, Synchronous};

fn open(clock: Arc<ManualClock>, opts: StoreOptions) -> (Arc<dyn Store>, Box<dyn std::any::Any>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ledger.db"), clock, opts, Synchronous::Normal).unwrap();
    (Arc::new(store), Box::new(dir))
}

orch_store::store_conformance!(open);

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(orch_store::conformance::T0))
}

#[test]
fn refuses_a_file_that_is_not_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.db");
    let text = b"these are my notes, not a database, and they are long enough to look like a file".repeat(20);
    std::fs::write(&path, &text).unwrap();
    let err = SqliteStore::open(&path, clock(), StoreOptions::default(), Synchronous::Normal).unwrap_err();
    assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
    assert!(err.to_string().contains("not a SQLite database"));
    assert_eq!(std::fs::read(&path).unwrap(), text, "the file is left as it was");
}

#[test]
fn refuses_another_applications_database_and_newer_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x)").unwrap();
    let err = SqliteStore::open(&other, clock(), StoreOptions::default(), Synchronous::Normal).unwrap_err();
    assert!(matches!(err, StoreError::NotALedger { .. }), "{err:?}");

    let newer = dir.path().join("newer.db");
    drop(SqliteStore::open(&newer, clock(), StoreOptions::default(), Synchronous::Normal).unwrap());
    rusqlite::Connection::open(&newer).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
    let err = SqliteStore::open(&newer, clock(), StoreOptions::default(), Synchronous::Normal).unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }), "{err:?}");
    assert!(err.to_string().contains("upgrade orchd"));
}

#[test]
fn reopening_keeps_everything_and_migrates_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let s = SqliteStore::open(&path, clock(), StoreOptions::default(), Synchronous::Full).unwrap();
    s.enqueue("t", vec![orch_store::NewJob::new("acme", "p", "q", serde_json::json!({}))]).unwrap();
    drop(s);
    let s = SqliteStore::open(&path, clock(), StoreOptions::default(), Synchronous::Normal).unwrap();
    assert_eq!(s.stats(&orch_store::Scope::All).unwrap().events, 1);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, orch_store::SCHEMA_VERSION);
    assert!(orch_store::check_ledger(&s).unwrap().ok());
}

#[test]
fn tampering_with_the_jobs_table_or_history_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let s = SqliteStore::open(&path, clock(), StoreOptions::default(), Synchronous::Normal).unwrap();
    s.enqueue("t", vec![orch_store::NewJob::new("acme", "p", "q", serde_json::json!({"a": 1}))]).unwrap();
    s.enqueue("t", vec![orch_store::NewJob::new("acme", "p", "q", serde_json::json!({"a": 2}))]).unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE jobs SET doc = replace(doc, '\"queued\"', '\"succeeded\"') WHERE id = 2", []).unwrap();
    let report = orch_store::check_ledger(&s).unwrap();
    assert!(report.problems.iter().any(|p| p.starts_with("job 2:")), "{:?}", report.problems);
    raw.execute("UPDATE history SET line = replace(line, '\"a\":1', '\"a\":9') WHERE seq = 1", []).unwrap();
    let report = orch_store::check_ledger(&s).unwrap();
    assert_eq!(report.problems, vec!["event 1: hash does not match content".to_string()]);
}

/// Commits reach the database file itself without a writer checkpointing: the store's own
/// thread copies them out of the WAL (a writer checkpoints only past 8,000 WAL pages).
#[test]
fn a_background_thread_checkpoints_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let s = SqliteStore::open(&path, clock(), StoreOptions::default(), Synchronous::Normal).unwrap();
    let jobs = (0..50).map(|i| orch_store::NewJob::new("acme", "p", "q", serde_json::json!({ "n": i }))).collect();
    s.enqueue("t", jobs).unwrap();
    // `immutable=1` reads the database file alone, ignoring the WAL.
    let in_file = || -> i64 {
        let uri = format!("file:{}?immutable=1", path.display());
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let c = rusqlite::Connection::open_with_flags(&uri, flags).unwrap();
        // Before the first checkpoint the file has no tables at all.
        c.query_row("SELECT count(*) FROM history", [], |r| r.get(0)).unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while in_file() < 50 {
        assert!(std::time::Instant::now() < deadline, "the events never reached the database file");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(in_file(), 50);
    drop(s);
}

#[test]
fn a_call_that_may_not_wait_gives_way_to_another_process_lock_and_writes_nothing() {
    use orch_store::{wait, Scope};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let s = SqliteStore::open(&path, clock(), StoreOptions::default(), Synchronous::Normal).unwrap();
    let job = || vec![orch_store::NewJob::new("acme", "p", "q", serde_json::json!({}))];
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let refused = wait::without_waiting(|| s.enqueue("t", job()));
    assert!(matches!(refused, Err(StoreError::WouldWait)), "{refused:?}");
    assert_eq!(wait::without_waiting(|| s.stats(&Scope::All)).unwrap().events, 0, "reads go on");
    std::thread::scope(|t| {
        let waiting = t.spawn(|| s.enqueue("t", job()));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!waiting.is_finished(), "a call that may wait waits for the other connection's lock");
        other.execute_batch("COMMIT").unwrap();
        assert_eq!(waiting.join().unwrap().unwrap().len(), 1);
    });
    assert_eq!(s.stats(&Scope::All).unwrap().events, 1, "the refused call wrote nothing");
    assert!(orch_store::check_ledger(&s).unwrap().ok());
}
