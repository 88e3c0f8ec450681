//! The `orchd` command line as a user meets it: help, bad settings, bad ledger files.

use std::process::Command;

fn orchd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_orchd")).args(args).env_remove("RUST_LOG").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn help_documents_every_command() {
    let (code, out, _) = orchd(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["serve", "check"] {
        assert!(out.contains(cmd), "--help lists {cmd}:\n{out}");
    }
    let (code, out, _) = orchd(&["serve", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--db") && out.contains("--listen") && out.contains("--demo"), "{out}");
    let (code, _, err) = orchd(&["frobnicate"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_file_that_is_not_a_ledger_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes.db");
    let text = "not a database at all\n".repeat(100);
    std::fs::write(&notes, &text).unwrap();
    for args in [&["check", "--db"][..], &["serve", "--listen", "127.0.0.1:0", "--db"][..]] {
        let mut a = args.to_vec();
        a.push(notes.to_str().unwrap());
        let (code, _, err) = orchd(&a);
        assert_eq!(code, 2, "{a:?}: {err}");
        assert!(err.contains("not a SQLite database"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    }
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), text);
}

#[test]
fn a_ledger_from_a_newer_orchd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let (code, out, err) = orchd(&["check", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    // Create a real ledger, then pretend a newer orchd migrated it.
    drop(
        orch_store::SqliteStore::open(
            &db,
            std::sync::Arc::new(orch_core::ManualClock::new(orch_core::Timestamp::from_millis(0))),
            Default::default(),
            Default::default(),
        )
        .unwrap(),
    );
    rusqlite::Connection::open(&db).unwrap().execute_batch("PRAGMA user_version = 42").unwrap();
    let (code, _, err) = orchd(&["check", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("schema version 42 is newer"), "{err}");
}

#[test]
fn bad_settings_are_refused_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("orchd.toml");
    std::fs::write(&cfg, "default_lease_ms = 0\n").unwrap();
    let (code, _, err) =
        orchd(&["serve", "--config", cfg.to_str().unwrap(), "--db", dir.path().join("l.db").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("default_lease_ms"), "{err}");
    assert!(!dir.path().join("l.db").exists(), "nothing created on bad settings");
}
