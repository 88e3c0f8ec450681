//! The daemon at the edge of its resources: a full disk refuses writes with a clear error and
//! loses nothing, and recovers when space is freed; an immutable ledger file stops the daemon
//! before it starts. These need a tmpfs mount and `chattr` (root with the capabilities); where
//! they are not available the test says so and skips, unless `ORCH_REQUIRE_MOUNT` is set.

use std::path::{Path, PathBuf};
use std::process::Command;

use orch_e2e::api::Client;
use orch_e2e::{run, token, Daemon};
use serde_json::json;

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn skip(test: &str, why: &str) {
    assert!(std::env::var_os("ORCH_REQUIRE_MOUNT").is_none(), "ORCH_REQUIRE_MOUNT is set but {why}");
    eprintln!("SKIP {test}: {why}");
}

#[test]
fn a_full_disk_refuses_writes_clearly_loses_nothing_and_recovers() {
    let Some(fs) = Tmpfs::mount("8m") else {
        return skip("a_full_disk_refuses_writes_clearly_loses_nothing_and_recovers", "cannot mount a tmpfs here");
    };
    let db = fs.path().join("orchd.db");
    let tok = token(&db, "acme", "orch:work,orch:read");
    let filler: PathBuf = fs.path().join("filler");
    // Half the space: freeing it later leaves room for the WAL to be checkpointed.
    std::fs::write(&filler, vec![0u8; 4 << 20]).unwrap();
    let daemon = Daemon::start(&db, &[]);
    let c = Client::new(&daemon.url, Some(&tok));
    let blob = "x".repeat(4000);
    let mut accepted = 0u64;
    let refused = loop {
        let jobs: Vec<_> = (0..20).map(|i| json!({"queue": "q", "payload": {"i": i, "blob": blob}})).collect();
        let r = c.post("/api/v1/jobs/batch", &json!({ "jobs": jobs }));
        if r.status >= 300 {
            break r;
        }
        accepted += 20;
        assert!(accepted < 100_000, "the disk never filled");
    };
    assert_eq!(refused.status, 507, "{:?}", refused.json);
    assert_eq!(refused.code(), "storage_full");
    assert!(refused.json["error"]["message"].as_str().unwrap().contains("disk is full"), "{:?}", refused.json);
    // Reads still work and every accepted job is there; the refused batch left nothing.
    assert_eq!(c.get("/healthz").status, 200);
    let stats = c.get("/api/v1/stats");
    assert_eq!(stats.json["jobs"]["queued"].as_u64(), Some(accepted), "{:?}", stats.json);

    // Free space: writes work again.
    std::fs::remove_file(&filler).unwrap();
    let r = c.post("/api/v1/jobs", &json!({"queue": "q"}));
    assert!((200..300).contains(&r.status), "after freeing space: {:?}", r.json);
    daemon.stop();
    let (code, out, err) = run("orchd", &["check", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{} jobs reproduced", accepted + 1)), "{out}");
}

#[test]
fn an_immutable_ledger_stops_the_daemon_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orchd.db");
    token(&db, "acme", "orch:read");
    let ok = Command::new("chattr").arg("+i").arg(&db).stderr(std::process::Stdio::null()).status();
    if !ok.is_ok_and(|s| s.success()) {
        return skip("an_immutable_ledger_stops_the_daemon_before_it_starts", "chattr +i is not possible here");
    }
    let before = std::fs::read(&db).unwrap();
    let (code, _, err) = run("orchd", &["serve", "--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()]);
    let _ = Command::new("chattr").arg("-i").arg(&db).status();
    assert_eq!(code, 2, "{err}");
    let last = err.trim().lines().last().unwrap_or_default().to_string();
    assert!(last.contains("orchd.db") && (last.contains("read-only") || last.contains("readonly")), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "the ledger is untouched");
}
