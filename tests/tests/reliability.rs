//! The daemon at the edge of its resources: a full disk refuses writes with a clear error and
//! loses nothing, and recovers when space is freed; an immutable ledger file stops the daemon
//! before it starts; a ledger file damaged on disk is reported, not crashed on; while another
//! process holds the ledger's write lock, writes wait for it and everything else answers. The
//! first two need a tmpfs mount and `chattr` (root with the capabilities); where they are not
//! available the test says so and skips, unless `ORCH_REQUIRE_MOUNT` is set.

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

/// A ledger file damaged on disk (pages overwritten, as a failing disk or a stray `dd` would):
/// `orchd check` says so in one line and fails; a daemon on it answers what it cannot read with
/// an error envelope (`corrupt_ledger`) instead of dropping the connection, and keeps running.
#[test]
fn a_damaged_ledger_file_is_reported_not_crashed_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orchd.db");
    let admin = token(&db, "acme", "orch:read,orch:work");
    {
        let d = Daemon::start(&db, &[]);
        let api = Client::new(&d.url, Some(&admin));
        for chunk in 0..20 {
            let jobs: Vec<_> = (0..100)
                .map(|i| json!({"queue": "q", "payload": {"n": chunk * 100 + i, "pad": "x".repeat(200)}}))
                .collect();
            let r = api.post("/api/v1/jobs/batch", &json!({ "jobs": jobs }));
            assert_eq!(r.status, 200, "{}", r.json);
        }
        assert!(d.stop().success());
    }
    // Overwrite a stretch of pages past the schema pages.
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 256 * 1024, "the ledger is large enough to damage its middle: {}", bytes.len());
    let mid = bytes.len() / 2;
    for (i, b) in bytes[mid..mid + 64 * 1024].iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    std::fs::write(&db, &bytes).unwrap();

    let (code, out, err) = run("orchd", &["check", "--db", db.to_str().unwrap()]);
    assert_ne!(code, 0, "a damaged ledger does not pass: {out}{err}");
    let said = format!("{out}{err}");
    assert!(said.contains("malformed") || said.contains("corrupt") || said.contains("FAIL"), "{said}");

    // The daemon may refuse to start (one line, exit 2) or start; started, it answers reads that
    // touch the damaged pages with an envelope and stays up.
    let mut child = std::process::Command::new(orch_e2e::bin("orchd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let Some(url) = line.trim().strip_prefix("orchd listening on ").map(str::to_string) else {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.trim().lines().last().unwrap_or_default().starts_with("orchd: "), "{err}");
        return;
    };
    let api = Client::new(&url, Some(&admin));
    let mut errors = 0;
    for first in ["/api/v1/jobs?limit=500", "/api/v1/history?limit=1000"] {
        let mut path = first.to_string();
        loop {
            let r = api.get(&path);
            if r.status != 200 {
                assert_eq!(r.status, 503, "{}", r.json);
                assert_eq!(r.json["error"]["code"], "corrupt_ledger", "{}", r.json);
                errors += 1;
                break;
            }
            match r.header("link") {
                Some(link) => path = link.trim_start_matches('<').split('>').next().unwrap().to_string(),
                None => break,
            }
        }
    }
    assert!(errors > 0, "reading across the damaged pages is refused");
    assert_eq!(api.get("/healthz").status, 200, "the daemon is still up");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn while_another_process_holds_the_write_lock_writes_wait_and_the_control_plane_answers() {
    use std::sync::mpsc;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orchd.db");
    let tok = token(&db, "acme", "orch:work,orch:read");
    let daemon = Daemon::start(&db, &[]);
    let c = Client::new(&daemon.url, Some(&tok));
    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    // Workers' claims wait for the lock too; none of them may hold up the requests that follow
    // (an enqueue counts the queue under the flow-control lock that a claim takes).
    let claims = 4;
    let (claimed_tx, claimed_rx) = mpsc::channel();
    for w in 0..claims {
        let (c, claimed) = (c.clone(), claimed_tx.clone());
        std::thread::spawn(move || {
            let r = c.post("/api/v1/claims", &json!({"worker_id": format!("w{w}"), "queues": ["q"], "limit": 1}));
            let _ = claimed.send((r.status, r.json));
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    // Far more waiting writes than the daemon has async threads: none of them may hold one.
    let writes: u64 = 64;
    let (done_tx, done_rx) = mpsc::channel();
    for i in 0..writes {
        let (c, done) = (c.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let r = c.post("/api/v1/jobs", &json!({"queue": "q", "payload": {"i": i}}));
            let _ = done.send((r.status, r.json));
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    let (answer_tx, answer_rx) = mpsc::channel();
    let reader = c.clone();
    std::thread::spawn(move || {
        let statuses = ["/healthz", "/api/v1/stats", "/metrics"].map(|path| reader.get(path).status);
        let _ = answer_tx.send(statuses);
    });
    let answered = answer_rx.recv_timeout(Duration::from_secs(5));
    let early = (done_rx.try_recv().ok(), claimed_rx.try_recv().ok());
    other.execute_batch("COMMIT").unwrap();
    assert_eq!(answered, Ok([200; 3]), "health, reads and metrics answer while writes wait for the lock");
    assert_eq!(early, (None, None), "no write returned while the lock was held");
    for _ in 0..claims {
        let (status, body) = claimed_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(status, 200, "each claim went through once the lock was released: {body}");
    }
    for _ in 0..writes {
        let (status, body) = done_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(status, 201, "each write went through once the lock was released: {body}");
    }
    let stats = c.get("/api/v1/stats");
    let jobs = &stats.json["jobs"];
    let (queued, running) = (jobs["queued"].as_u64().unwrap_or(0), jobs["running"].as_u64().unwrap_or(0));
    assert_eq!(queued + running, writes, "every enqueued job is there: {:?}", stats.json);
    daemon.stop();
    let (code, out, err) = run("orchd", &["check", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}
