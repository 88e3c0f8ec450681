//! Offline Kit import between two sites, each with its own daemon and ledger file: site A runs
//! jobs and exports a chain of bundles; site B imports them with `orchd import` and over the API.

use std::path::Path;

use orch_e2e::api::Client;
use orch_e2e::{run, token, Daemon};
use serde_json::{json, Value};

struct Kit {
    dir: tempfile::TempDir,
}

impl Kit {
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    fn ok(&self, bin: &str, args: &[&str]) -> String {
        let (code, out, err) = run(bin, args);
        assert_eq!(code, 0, "{bin} {args:?}: {out}{err}");
        out
    }

    /// Keys r1, r2, signer; root v1 (root key r1, bundle key signer); root v2 rotated to r2.
    fn new() -> Kit {
        let kit = Kit { dir: tempfile::tempdir().unwrap() };
        for name in ["r1", "r2", "signer"] {
            kit.ok("orch-bundle", &["keygen", "--out", &kit.p("k"), "--name", name]);
        }
        let (root, signer) = (kit.p("k/r1.pub.json"), kit.p("k/signer.pub.json"));
        let args = ["root", "init", "--out", &kit.p("1.root.json"), "--root-key", &root, "--bundle-key", &signer];
        kit.ok("orch-bundle", &[&args[..], &["--expires", "2036-01-01T00:00:00Z"]].concat());
        kit.ok("orch-bundle", &["root", "sign", &kit.p("1.root.json"), "--key", &kit.p("k/r1.key")]);
        std::fs::create_dir(kit.p("chain")).unwrap();
        let v2 = kit.p("chain/2.root.json");
        let r2 = kit.p("k/r2.pub.json");
        kit.ok("orch-bundle", &["root", "rotate", "--from", &kit.p("1.root.json"), "--out", &v2, "--root-key", &r2]);
        for key in ["k/r1.key", "k/r2.key"] {
            kit.ok("orch-bundle", &["root", "sign", &v2, "--key", &kit.p(key)]);
        }
        kit
    }

    /// Exports A's events from `from` on, continuing `previous`; returns the bundle's `to_seq`.
    fn export(&self, db: &str, out: &str, from: u64, previous: Option<&str>, extra: &[&str]) -> u64 {
        let from = from.to_string();
        let key = self.p("k/signer.key");
        let mut args = vec!["export", "--db", db, "--key", &key];
        let out = self.p(out);
        args.extend(["--out", &out, "--from-seq", &from, "--json"]);
        let prev = previous.map(|p| self.p(p));
        if let Some(p) = &prev {
            args.extend(["--previous", p]);
        }
        args.extend(extra);
        let summary: Value = serde_json::from_str(&self.ok("orch-bundle", &args)).unwrap();
        summary["to_seq"].as_u64().unwrap()
    }

    fn import(&self, db: &str, bundle: &str, extra: &[&str]) -> (i32, String, String) {
        let bundle = self.p(bundle);
        let root = self.p("1.root.json");
        run("orchd", &[&["import", &bundle, "--db", db, "--root", &root][..], extra].concat())
    }
}

/// Runs some jobs on a site over HTTP.
fn work(client: &Client, n: usize, tag: &str) {
    let jobs: Vec<Value> = (0..n).map(|i| json!({"queue": "ingest", "payload": {"tag": tag, "i": i}})).collect();
    assert_eq!(client.post("/api/v1/jobs/batch", &json!({ "jobs": jobs })).status, 200);
    let r = client.post("/api/v1/claims", &json!({"worker_id": "a-worker", "queues": ["ingest"], "limit": n}));
    for (i, a) in r.json["allocations"].as_array().unwrap().iter().enumerate() {
        let (id, lease) = (a["job"]["id"].as_i64().unwrap(), a["lease_id"].as_str().unwrap());
        let r = if i % 3 == 2 {
            client.post(&format!("/api/v1/jobs/{id}/fail"), &json!({"lease_id": lease, "error_class": "http_503"}))
        } else {
            client.post(&format!("/api/v1/jobs/{id}/ack"), &json!({"lease_id": lease}))
        };
        assert_eq!(r.status, 200, "{:?}", r.json);
    }
}

fn lines(db: &str, sql: &str) -> Vec<String> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c.prepare(sql).unwrap();
    stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
}

fn imported_events(db: &str) -> usize {
    lines(db, "SELECT line FROM imported_history").len()
}

#[test]
fn site_b_imports_site_a_bundles_in_order_once_and_refuses_the_rest() {
    let kit = Kit::new();
    let (a_db, b_db) = (kit.p("a.db"), kit.p("b.db"));
    let a_daemon = Daemon::start(Path::new(&a_db), &[]);
    let a = Client::new(&a_daemon.url, Some(&token(Path::new(&a_db), "acme", "orch:work,orch:read")));
    work(&a, 6, "first");
    let to1 = kit.export(&a_db, "b1.tar.zst", 1, None, &[]);
    work(&a, 4, "second");
    a_daemon.stop();
    let to2 = kit.export(&a_db, "b2.tar.zst", to1 + 1, Some("b1.tar.zst"), &[]);
    assert!(to2 > to1);

    // Site B: a daemon of its own, configured to accept imports over the API.
    let root = kit.p("1.root.json");
    let admin_token = token(Path::new(&b_db), "*", "orch:admin");
    let b_daemon = Daemon::start_env(Path::new(&b_db), &[], &[("ORCHD_IMPORT__ROOT", root.as_str())]);
    let b = Client::new(&b_daemon.url, Some(&admin_token));

    // Out of order: refused, naming the missing range; nothing written.
    let (code, _, err) = kit.import(&b_db, "b2.tar.zst", &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("events 1..={to1} are missing")), "{err}");
    assert_eq!(imported_events(&b_db), 0);

    // A dry run plans without writing.
    let (code, out, err) = kit.import(&b_db, "b1.tar.zst", &["--dry-run", "--json"]);
    assert_eq!(code, 0, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((plan["plan"]["status"].as_str(), plan["plan"]["to_seq"].as_u64()), (Some("new"), Some(to1)));
    assert!(plan["outcome"].is_null());
    assert_eq!(imported_events(&b_db), 0);

    // In order: bundle 1 with the CLI, then again (a no-op), then bundle 2 over the API.
    let (code, out, err) = kit.import(&b_db, "b1.tar.zst", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("imported site "), "{out}");
    let audits = lines(&b_db, "SELECT line FROM history WHERE tenant = '_site'").len();
    let (code, out, _) = kit.import(&b_db, "b1.tar.zst", &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("already imported"), "{out}");
    assert_eq!(lines(&b_db, "SELECT line FROM history WHERE tenant = '_site'").len(), audits);

    // A tampered bundle is refused with nothing written (over the API).
    let good = std::fs::read(kit.p("b2.tar.zst")).unwrap();
    let before = imported_events(&b_db);
    let mut refused = 0;
    for pos in (100..good.len()).step_by(97).take(8) {
        let mut bad = good.clone();
        bad[pos] ^= 0x20;
        let r = b.send("POST", "/api/v1/imports", Some(bad), &[("content-type", "application/zstd")]);
        if r.status != 201 {
            assert!(r.status == 422 || r.status == 409, "{:?}", r.json);
            refused += 1;
        }
        assert_eq!(imported_events(&b_db), before, "a refused bundle writes nothing");
    }
    assert!(refused >= 7, "tampered bundles were accepted");
    let r = b.send("POST", "/api/v1/imports", Some(good.clone()), &[("content-type", "application/zstd")]);
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_eq!(r.json["outcome"]["events"].as_u64(), Some(to2 - to1));

    // B's imported history is A's, line for line; its imported jobs are A's jobs.
    assert_eq!(
        lines(&b_db, "SELECT line FROM imported_history ORDER BY seq"),
        lines(&a_db, "SELECT line FROM history ORDER BY seq")
    );
    assert_eq!(
        lines(&b_db, "SELECT doc FROM imported_jobs ORDER BY id"),
        lines(&a_db, "SELECT doc FROM jobs ORDER BY id")
    );
    // Another tenant's token may not import.
    let tenant_admin = Client::new(&b_daemon.url, Some(&token(Path::new(&b_db), "acme", "orch:admin")));
    let r = tenant_admin.send("POST", "/api/v1/imports", Some(good), &[("content-type", "application/zstd")]);
    assert_eq!(r.status, 403);
    // The imports are audited in B's own chain, which still verifies.
    let r = b.get("/api/v1/history?type=audit");
    let actions: Vec<&str> =
        r.json["items"].as_array().unwrap().iter().map(|e| e["event"]["data"]["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["import.applied", "import.applied"]);
    b_daemon.stop();
    let (code, out, err) = run("orchd", &["check", "--db", &b_db]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("ok: {to2} imported events")), "{out}");
    // Imported history is checked like the site's own: an altered imported event is found.
    let c = rusqlite::Connection::open(&b_db).unwrap();
    c.execute("UPDATE imported_history SET line = replace(line, '\"http_503\"', '\"http_504\"') WHERE seq = (SELECT MIN(seq) FROM imported_history WHERE line LIKE '%http_503%')", []).unwrap();
    drop(c);
    let (code, out, _) = run("orchd", &["check", "--db", &b_db]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("imported from "), "{out}");
}

#[test]
fn roots_rotate_through_bundles_and_never_roll_back() {
    let kit = Kit::new();
    let (a_db, b_db) = (kit.p("a.db"), kit.p("b.db"));
    let a_daemon = Daemon::start(Path::new(&a_db), &[]);
    let a = Client::new(&a_daemon.url, Some(&token(Path::new(&a_db), "acme", "orch:work,orch:read")));
    work(&a, 3, "one");
    let to1 = kit.export(&a_db, "b1.tar.zst", 1, None, &[]);
    work(&a, 3, "two");
    // Bundle 2 carries root v2 (signed by r1 and r2): B, trusting only v1, rotates to it.
    let to2 = kit.export(&a_db, "b2.tar.zst", to1 + 1, Some("b1.tar.zst"), &["--root-chain", &kit.p("chain")]);
    work(&a, 3, "three");
    a_daemon.stop();
    kit.export(&a_db, "b3.tar.zst", to2 + 1, Some("b2.tar.zst"), &[]);

    assert_eq!(kit.import(&b_db, "b1.tar.zst", &[]).0, 0);
    let (code, out, err) = kit.import(&b_db, "b2.tar.zst", &["--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["plan"]["root_version"], 2, "the carried root was walked to");

    // Bundle 3 does not carry v2: checked against v1 alone it is an older root, refused...
    let (code, _, err) = kit.import(&b_db, "b3.tar.zst", &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("trust root version 1") && err.contains("--allow-rollback"), "{err}");
    let events = imported_events(&b_db);
    // ...unless the operator trusts v2 too (the chain directory)...
    let chain = kit.p("chain");
    let (code, out, err) = kit.import(&b_db, "b3.tar.zst", &["--root-chain", &chain, "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(imported_events(&b_db), events);
    // ...or overrides it, with a reason and a ticket, which the audit history keeps.
    let (code, _, err) = run(
        "orchd",
        &["import", &kit.p("b3.tar.zst"), "--db", &b_db, "--root", &kit.p("1.root.json"), "--allow-rollback"],
    );
    assert_eq!(code, 2, "{err}");
    let (code, out, err) =
        kit.import(&b_db, "b3.tar.zst", &["--allow-rollback", "--reason", "v2 lost", "--ticket", "INC-9"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("override: "), "{out}");
    let audit = lines(&b_db, "SELECT line FROM history WHERE tenant = '_site' ORDER BY seq").pop().unwrap();
    assert!(audit.contains("\"ticket\":\"INC-9\"") && audit.contains("trust root version 1"), "{audit}");

    // Replaying an old bundle changes nothing.
    let (code, out, _) = kit.import(&b_db, "b1.tar.zst", &[]);
    assert_eq!((code, out.starts_with("already imported")), (0, true));
}

#[test]
fn offline_replay_rebuilds_a_ledger_that_reexports_the_same_content() {
    let kit = Kit::new();
    let a_db = kit.p("a.db");
    let a_daemon = Daemon::start(Path::new(&a_db), &[]);
    let a = Client::new(&a_daemon.url, Some(&token(Path::new(&a_db), "acme", "orch:work,orch:read")));
    work(&a, 5, "one");
    let to1 = kit.export(&a_db, "b1.tar.zst", 1, None, &[]);
    work(&a, 5, "two");
    a_daemon.stop();
    kit.export(&a_db, "b2.tar.zst", to1 + 1, Some("b1.tar.zst"), &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/offline-replay.sh");
    let bin_dir = orch_e2e::bin("orchd").parent().unwrap().to_path_buf();
    let replay = |bundles: &[&str], db: &str| {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(script).args(["--root", &kit.p("1.root.json"), "--db", &kit.p(db)]);
        cmd.args(bundles.iter().map(|b| kit.p(b))).env("ORCH_BIN_DIR", &bin_dir);
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = replay(&["b1.tar.zst", "b2.tar.zst"], "rebuilt.db");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("reproduce").count(), 2, "{out}");
    assert_eq!(
        lines(&kit.p("rebuilt.db"), "SELECT line FROM imported_history ORDER BY seq"),
        lines(&a_db, "SELECT line FROM history ORDER BY seq")
    );
    let (code, out) = replay(&["b2.tar.zst", "b1.tar.zst"], "wrong-order.db");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL") && out.contains("import refused"), "{out}");
}
