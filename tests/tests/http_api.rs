//! The control plane over HTTP, driven against the real daemon on 127.0.0.1:0: a worker loop,
//! scopes, tenancy, audited operations, idempotency, pagination, bad input, legacy aliases and
//! discovery.

use base64::Engine;
use orch_e2e::api::{Client, Reply};
use orch_e2e::{run, token, Daemon};
use serde_json::{json, Value};
use sha2::Digest;

struct Site {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    daemon: Daemon,
}

impl Site {
    fn start(env: &[(&str, &str)]) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("orchd.db");
        // Tokens are made before the daemon starts (the CLI creates and migrates the ledger).
        token(&db, "bootstrap", "orch:read");
        let daemon = Daemon::start_env(&db, &[], env);
        Site { _dir: dir, db, daemon }
    }

    fn client(&self, tenant: &str, scopes: &str) -> Client {
        Client::new(&self.daemon.url, Some(&token(&self.db, tenant, scopes)))
    }

    fn events(&self) -> u64 {
        let admin = self.client("*", "orch:read");
        admin.get("/api/v1/stats").json["events"].as_u64().unwrap()
    }
}

fn ok(r: &Reply) -> &Value {
    assert!((200..300).contains(&r.status), "expected success, got {} {:?}", r.status, r.json);
    &r.json
}

fn assert_envelope(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{:?}", r.json);
    assert_eq!(r.code(), code, "{:?}", r.json);
    assert!(r.json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    let id = r.json["error"]["request_id"].as_str().unwrap();
    assert!(!id.is_empty());
    assert_eq!(r.header("x-request-id"), Some(id));
    assert_eq!(r.header("orch-api-version"), Some("1"));
}

#[test]
fn a_worker_loop_over_http_enqueues_claims_heartbeats_acks_and_fails() {
    let site = Site::start(&[]);
    let w = site.client("acme", "orch:work,orch:read");

    let r = w.post("/api/v1/jobs", &json!({"queue": "ingest", "payload": {"n": 0}, "correlation_id": "corr-1"}));
    assert_eq!(r.status, 201);
    assert_eq!(r.header("orch-api-version"), Some("1"));
    let first = r.json["job"]["id"].as_i64().unwrap();
    let batch: Vec<Value> = (1..=4).map(|n| json!({"queue": "ingest", "payload": {"n": n}})).collect();
    let r = w.post("/api/v1/jobs/batch", &json!({ "jobs": batch }));
    assert_eq!(ok(&r)["items"].as_array().unwrap().len(), 4);

    let r =
        w.post("/api/v1/claims", &json!({"worker_id": "w-1", "queues": ["ingest"], "limit": 3, "lease_seconds": 60}));
    let allocs = ok(&r)["allocations"].as_array().unwrap().clone();
    assert_eq!(allocs.len(), 3);
    assert_eq!(allocs[0]["job"]["id"].as_i64(), Some(first), "oldest first at equal priority");
    for a in &allocs {
        assert_eq!(a["attempt"], 1);
        assert_eq!(a["attempts_left"], 4);
        assert!(a["lease_id"].as_str().is_some_and(|l| !l.is_empty()));
        assert!(a["heartbeat_ms"].as_u64().unwrap() > 0);
    }
    let (id, lease) = (allocs[0]["job"]["id"].as_i64().unwrap(), allocs[0]["lease_id"].as_str().unwrap());

    let r = w.post(&format!("/api/v1/jobs/{id}/heartbeat"), &json!({"lease_id": lease, "progress": {"pct": 40}}));
    assert_eq!(ok(&r)["job"]["progress"], json!({"pct": 40}));
    let r = w.post(&format!("/api/v1/jobs/{id}/heartbeat"), &json!({"lease_id": "not-the-lease"}));
    assert_envelope(&r, 409, "lease_lost");

    let content = b"{\"records\": 7}";
    let b64 = base64::engine::general_purpose::STANDARD.encode(content);
    let r = w.post(
        &format!("/api/v1/jobs/{id}/ack"),
        &json!({"lease_id": lease, "artifacts": [{"name": "out.json", "media_type": "application/json", "content_base64": b64}]}),
    );
    let job = &ok(&r)["job"];
    assert_eq!(job["state"], "succeeded");
    let sha = hex::encode(sha2::Sha256::digest(content));
    assert_eq!(job["artifacts"][0]["sha256"], sha.as_str());
    let art = w.get(&format!("/api/v1/jobs/{id}/artifacts/out.json"));
    assert_eq!(art.status, 200);
    assert_eq!(art.bytes, content);
    assert_eq!(art.header("etag").unwrap(), format!("\"sha256:{sha}\""));

    // A retryable failure goes back to the queue later; a fatal one dead-letters the job.
    let (id2, lease2) = (allocs[1]["job"]["id"].as_i64().unwrap(), allocs[1]["lease_id"].as_str().unwrap());
    let r = w.post(
        &format!("/api/v1/jobs/{id2}/fail"),
        &json!({"lease_id": lease2, "error_class": "http_429", "message": "throttled", "retry_after_seconds": 120}),
    );
    let job = &ok(&r)["job"];
    assert_eq!(job["state"], "queued");
    assert_eq!(job["last_error"]["class"], "http_429");
    assert!(job["spec"]["run_after"].as_str().unwrap() > job["updated_at"].as_str().unwrap());
    let (id3, lease3) = (allocs[2]["job"]["id"].as_i64().unwrap(), allocs[2]["lease_id"].as_str().unwrap());
    let r = w.post(
        &format!("/api/v1/jobs/{id3}/fail"),
        &json!({"lease_id": lease3, "error_class": "bad_input", "message": "no such feed", "retryable": false}),
    );
    assert_eq!(ok(&r)["job"]["state"], "dead");

    // Batch ack: each item on its own.
    let r = w.post("/api/v1/claims", &json!({"worker_id": "w-2", "queues": ["ingest"], "limit": 10}));
    let allocs = ok(&r)["allocations"].as_array().unwrap().clone();
    assert_eq!(allocs.len(), 2, "the job failed with retry_after 120 s is not ready yet");
    let items: Vec<Value> =
        allocs.iter().map(|a| json!({"job_id": a["job"]["id"], "lease_id": a["lease_id"]})).collect();
    let mut items_with_bad = items.clone();
    items_with_bad.push(json!({"job_id": id, "lease_id": lease}));
    let r = w.post("/api/v1/acks", &json!({ "items": items_with_bad }));
    let out = ok(&r)["items"].as_array().unwrap();
    assert_eq!(out[0]["job"]["state"], "succeeded");
    assert_eq!(out[1]["job"]["state"], "succeeded");
    assert_eq!(out[2]["error"]["code"], "lease_lost", "{:?}", out[2]);

    // Operators retry the dead job and cancel it.
    let op = site.client("acme", "orch:operate,orch:read");
    let r = op.post(&format!("/api/v1/jobs/{id3}/retry"), &json!({"reason": "feed restored"}));
    assert_eq!(ok(&r)["job"]["state"], "queued");
    let r = op.send("POST", &format!("/api/v1/jobs/{id3}/cancel"), None, &[]);
    assert_eq!(ok(&r)["job"]["state"], "cancelled");

    // Filters and the history.
    let r = w.get("/api/v1/jobs?state=succeeded&type=ingest");
    assert_eq!(ok(&r)["items"].as_array().unwrap().len(), 3);
    let r = w.get("/api/v1/jobs?correlation_id=corr-1");
    assert_eq!(ok(&r)["items"][0]["id"].as_i64(), Some(first));
    let r = w.get(&format!("/api/v1/history?job_id={id3}"));
    let types: Vec<&str> =
        ok(&r)["items"].as_array().unwrap().iter().map(|e| e["event"]["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["job.enqueued", "job.claimed", "job.failed", "job.retried", "job.cancelled"]);
    let r = w.get("/api/v1/stats");
    assert_eq!(ok(&r)["jobs"]["succeeded"], 3);

    // The ledger written over HTTP verifies and replays.
    let db = site.db.to_str().unwrap().to_string();
    site.daemon.stop();
    let (code, out, err) = run("orchd", &["check", "--db", &db]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn scopes_tokens_and_tenants_are_enforced() {
    let site = Site::start(&[]);
    let acme = site.client("acme", "orch:work,orch:read");
    let globex = site.client("globex", "orch:work,orch:read,orch:operate");
    let reader = site.client("acme", "orch:read");

    let r = acme.post("/api/v1/jobs", &json!({"queue": "ingest", "payload": {"secret": "acme-only"}}));
    let id = ok(&r)["job"]["id"].as_i64().unwrap();

    // Wrong scope: 403 with the envelope, and nothing written.
    let before = site.events();
    let r = reader.post("/api/v1/jobs", &json!({"queue": "ingest"}));
    assert_envelope(&r, 403, "forbidden");
    assert_eq!(r.json["error"]["details"]["required_scopes"], json!(["orch:work", "orch:operate"]));
    assert_eq!(site.events(), before);

    // Another tenant's job is a 404 exactly like a job that does not exist.
    let theirs = globex.get(&format!("/api/v1/jobs/{id}"));
    let missing = globex.get("/api/v1/jobs/999999");
    assert_envelope(&theirs, 404, "not_found");
    assert_envelope(&missing, 404, "not_found");
    assert_eq!(theirs.json["error"]["message"].as_str().unwrap().replace(&id.to_string(), "N"), "job N not found");
    for (path, body) in [
        (format!("/api/v1/jobs/{id}/cancel"), json!({})),
        (format!("/api/v1/jobs/{id}/retry"), json!({})),
        (format!("/api/v1/jobs/{id}/heartbeat"), json!({"lease_id": "x"})),
        (format!("/api/v1/jobs/{id}/ack"), json!({"lease_id": "x"})),
        (format!("/api/v1/jobs/{id}/fail"), json!({"lease_id": "x", "error_class": "e"})),
    ] {
        let r = globex.post(&path, &body);
        assert_envelope(&r, 404, "not_found");
    }
    assert_envelope(&globex.get(&format!("/api/v1/jobs/{id}/artifacts/x")), 404, "not_found");
    assert_envelope(&globex.get(&format!("/api/v0/jobs/{id}")), 404, "not_found");
    assert!(!ok(&globex.get("/api/v1/jobs")).to_string().contains("acme"));
    assert_eq!(ok(&globex.get("/api/v1/history")).get("items").unwrap(), &json!([]));
    let r = globex.post("/api/v1/claims", &json!({"worker_id": "g", "queues": ["ingest"], "limit": 10}));
    assert_eq!(ok(&r)["allocations"], json!([]));
    // Naming another tenant in Orch-Tenant with a tenant token reveals nothing either.
    let r = globex.with_header("orch-tenant", "acme").get("/api/v1/jobs");
    assert_envelope(&r, 404, "not_found");

    // Site administrators see everything, and act for one tenant with Orch-Tenant.
    let site_admin = site.client("*", "orch:admin");
    assert_eq!(ok(&site_admin.get(&format!("/api/v1/jobs/{id}")))["job"]["tenant"], "acme");
    let r = site_admin.post("/api/v1/jobs", &json!({"queue": "ingest"}));
    assert_envelope(&r, 422, "invalid_request");
    let r = site_admin.with_header("orch-tenant", "globex").post("/api/v1/jobs", &json!({"queue": "ingest"}));
    assert_eq!(ok(&r)["job"]["tenant"], "globex");

    // No token, a bad token, a revoked token, an expired token.
    let anon = Client::new(&site.daemon.url, None);
    let r = anon.get("/api/v1/jobs");
    assert_envelope(&r, 401, "unauthenticated");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_envelope(&Client::new(&site.daemon.url, Some("orch_nope_nope")).get("/api/v1/jobs"), 401, "unauthenticated");
    let db = site.db.to_str().unwrap();
    let (_, list, _) = run("orchd", &["token", "list", "--db", db, "--json"]);
    let tokens: Value = serde_json::from_str(&list).unwrap();
    assert!(!list.contains("orch_"), "token list must not show secrets");
    let reader_id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "acme" && t["scopes"] == json!(["orch:read"]))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out, _) = run("orchd", &["token", "revoke", "--db", db, &reader_id]);
    assert_eq!(code, 0, "{out}");
    assert_envelope(&reader.get("/api/v1/jobs"), 401, "token_revoked");
    let (code, _, err) = run("orchd", &["token", "revoke", "--db", db, "no-such-id"]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    let (code, out, _) = run(
        "orchd",
        &[
            "token",
            "create",
            "--db",
            db,
            "--tenant",
            "acme",
            "--scopes",
            "orch:read",
            "--expires",
            "2020-01-01T00:00:00Z",
        ],
    );
    assert_eq!(code, 0);
    assert_envelope(&Client::new(&site.daemon.url, Some(out.trim())).get("/api/v1/jobs"), 401, "token_expired");
    let (code, _, err) =
        run("orchd", &["token", "create", "--db", db, "--tenant", "acme", "--scopes", "orch:everything"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown scope") && err.lines().count() == 1, "{err}");
}

#[test]
fn quota_and_backfill_need_reason_and_ticket_and_are_audited() {
    let site = Site::start(&[]);
    let quota = site.client("acme", "orch:quota,orch:read");
    let backfill = site.client("acme", "orch:backfill,orch:read");
    let reader = site.client("acme", "orch:read");
    let before = site.events();

    let r = quota.put("/api/v1/quotas/ingest", &json!({"max_active": 5}));
    assert_envelope(&r, 422, "reason_required");
    assert_eq!(r.json["error"]["details"]["missing"], json!(["reason", "ticket"]));
    let r = quota.put("/api/v1/quotas/ingest", &json!({"max_active": 5, "reason": "upstream asked", "ticket": "  "}));
    assert_envelope(&r, 422, "reason_required");
    assert_eq!(r.json["error"]["details"]["missing"], json!(["ticket"]));
    let r = reader.put("/api/v1/quotas/ingest", &json!({"max_active": 5, "reason": "r", "ticket": "t"}));
    assert_envelope(&r, 403, "forbidden");
    let r = backfill.put("/api/v1/quotas/ingest", &json!({"max_active": 5, "reason": "r", "ticket": "t"}));
    assert_envelope(&r, 403, "forbidden");
    assert_eq!(site.events(), before, "refused changes write nothing");

    let r =
        quota.put("/api/v1/quotas/ingest", &json!({"max_active": 5, "reason": "upstream asked", "ticket": "CHG-1"}));
    let audit = ok(&r)["audit"].clone();
    assert_eq!(audit["event"]["type"], "audit");
    assert_eq!(audit["event"]["data"]["action"], "quota.put");
    assert_eq!(audit["event"]["data"]["details"]["reason"], "upstream asked");
    assert_eq!(audit["event"]["data"]["details"]["ticket"], "CHG-1");
    assert!(audit["actor"].as_str().unwrap().starts_with("token:"));
    let r = reader.get("/api/v1/quotas");
    assert_eq!(ok(&r)["items"][0]["value"]["max_active"], 5);

    let body = json!({
        "queue": "ingest", "source": "nvd", "from": "2026-10-01T00:00:00Z", "to": "2026-10-31T00:00:00Z",
        "window_seconds": 86400, "reason": "NVD outage", "ticket": "INC-7",
    });
    let mut no_ticket = body.clone();
    no_ticket.as_object_mut().unwrap().remove("ticket");
    let r = backfill.post("/api/v1/backfills", &no_ticket);
    assert_envelope(&r, 422, "reason_required");
    let mut dry = body.clone();
    dry["dry_run"] = json!(true);
    let r = backfill.post("/api/v1/backfills", &dry);
    assert_eq!(ok(&r)["windows"].as_array().unwrap().len(), 30);
    assert_eq!(ok(&reader.get("/api/v1/jobs")).get("items").unwrap(), &json!([]), "a dry run enqueues nothing");

    let r = backfill.post("/api/v1/backfills", &body);
    assert_eq!(r.status, 201);
    assert_eq!((r.json["enqueued"].as_u64(), r.json["existing"].as_u64()), (Some(30), Some(0)));
    let run_id = r.json["run"]["id"].as_i64().unwrap();
    assert_eq!(r.json["run"]["state"], "active");
    assert_eq!(r.json["run"]["jobs"]["queued"], 30);
    let r = backfill.post("/api/v1/backfills", &body);
    assert_eq!((r.json["enqueued"].as_u64(), r.json["existing"].as_u64()), (Some(0), Some(30)), "windows never re-run");
    let jobs = reader.get(&format!("/api/v1/jobs?run={run_id}&limit=100"));
    let jobs = ok(&jobs)["items"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 30);
    assert_eq!(jobs[0]["spec"]["payload"]["window_start"], "2026-10-01T00:00:00.000Z");
    assert_eq!(jobs[29]["spec"]["payload"]["window_end"], "2026-10-31T00:00:00.000Z");
    let r = reader.get(&format!("/api/v1/runs/{run_id}"));
    assert_eq!(ok(&r)["ticket"], "INC-7");
    assert_eq!(ok(&reader.get("/api/v1/runs")).get("items").unwrap().as_array().unwrap().len(), 2);

    let r = reader.get("/api/v1/history?type=audit");
    let actions: Vec<(String, String)> = ok(&r)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let data = &e["event"]["data"];
            (data["action"].as_str().unwrap().into(), data["details"]["ticket"].as_str().unwrap().into())
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("quota.put".into(), "CHG-1".into()),
            ("backfill.started".into(), "INC-7".into()),
            ("backfill.started".into(), "INC-7".into())
        ]
    );

    // Another tenant sees none of it.
    let globex = site.client("globex", "orch:read");
    assert_envelope(&globex.get(&format!("/api/v1/runs/{run_id}")), 404, "not_found");
    assert_eq!(ok(&globex.get("/api/v1/quotas"))["items"], json!([]));

    // The audit events are chained like any other: the ledger still verifies and replays.
    let db = site.db.to_str().unwrap().to_string();
    site.daemon.stop();
    let (code, out, err) = run("orchd", &["check", "--db", &db]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn idempotency_keys_replay_and_refuse_reuse() {
    let site = Site::start(&[]);
    let w = site.client("acme", "orch:work,orch:read");
    let body = json!({"queue": "ingest", "payload": {"n": 1}});
    let key = [("idempotency-key", "k-1")];
    let first = w.send("POST", "/api/v1/jobs", Some(body.to_string().into_bytes()), &key);
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), None);
    let events = site.events();
    let again = w.send("POST", "/api/v1/jobs", Some(body.to_string().into_bytes()), &key);
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.bytes, first.bytes, "the first response, byte for byte");
    assert_eq!(site.events(), events, "a replay writes nothing");

    let other = json!({"queue": "ingest", "payload": {"n": 2}});
    let r = w.send("POST", "/api/v1/jobs", Some(other.to_string().into_bytes()), &key);
    assert_envelope(&r, 422, "idempotency_key_reused");
    assert_eq!(site.events(), events);

    // Keys are per tenant.
    let g = site.client("globex", "orch:work");
    let r = g.send("POST", "/api/v1/jobs", Some(body.to_string().into_bytes()), &key);
    assert_eq!(r.status, 201);
    assert_eq!(r.json["job"]["tenant"], "globex");
    assert_eq!(r.header("idempotent-replayed"), None);
}

#[test]
fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let site = Site::start(&[("ORCHD_MAX_BODY_BYTES", "4096")]);
    let w = site.client("acme", "orch:work,orch:read");
    w.post("/api/v1/jobs", &json!({"queue": "ingest"}));
    let before = site.events();
    let cases: Vec<(Vec<u8>, &str, u16, &str)> = vec![
        (b"{\"queue\": ".to_vec(), "application/json", 400, "malformed_json"),
        (b"{\"queue\": \"ingest\", \"colour\": \"red\"}".to_vec(), "application/json", 422, "invalid_request"),
        (b"{\"queue\": 7}".to_vec(), "application/json", 422, "invalid_request"),
        (b"{\"queue\": \"in gest\"}".to_vec(), "application/json", 422, "invalid_request"),
        (b"queue=ingest".to_vec(), "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (
            format!("{{\"queue\": \"ingest\", \"payload\": \"{}\"}}", "x".repeat(8192)).into_bytes(),
            "application/json",
            413,
            "body_too_large",
        ),
    ];
    for (body, ctype, status, code) in cases {
        let r = w.send("POST", "/api/v1/jobs", Some(body.clone()), &[("content-type", ctype)]);
        assert_envelope(&r, status, code);
        // The same with an Idempotency-Key goes through the idempotency layer: same answers.
        let r = w.send("POST", "/api/v1/jobs", Some(body), &[("content-type", ctype), ("idempotency-key", code)]);
        assert_eq!(r.status, status, "{:?}", r.json);
    }
    let r = w.get("/api/v1/jobs?limit=0");
    assert_envelope(&r, 422, "invalid_request");
    assert_envelope(&w.get("/api/v1/jobs?cursor=bm90LWEtY3Vyc29y"), 400, "invalid_cursor");
    assert_envelope(&w.get("/api/v1/jobs?state=sleeping"), 422, "invalid_request");
    assert_envelope(&w.get("/api/v1/jobs?updated_since=yesterday"), 422, "invalid_request");
    assert_envelope(&w.get("/api/v1/nothing-here"), 404, "not_found");
    assert_envelope(&w.send("DELETE", "/api/v1/jobs", None, &[]), 405, "method_not_allowed");
    assert_envelope(&w.get("/api/v1/jobs/not-a-number"), 400, "bad_request");
    assert_eq!(site.events(), before, "no refused request wrote anything");
    assert_eq!(ok(&w.get("/api/v1/jobs"))["items"].as_array().unwrap().len(), 1);
}

#[test]
fn lists_page_with_cursors_and_link_headers() {
    let site = Site::start(&[]);
    let w = site.client("acme", "orch:work,orch:read");
    let jobs: Vec<Value> = (0..25).map(|n| json!({"queue": "ingest", "payload": {"n": n}})).collect();
    ok(&w.post("/api/v1/jobs/batch", &json!({ "jobs": jobs })));
    let mut seen = Vec::new();
    let mut path = "/api/v1/jobs?type=ingest&limit=10".to_string();
    let mut pages = 0;
    loop {
        let r = w.get(&path);
        let body = ok(&r).clone();
        pages += 1;
        seen.extend(body["items"].as_array().unwrap().iter().map(|j| j["id"].as_i64().unwrap()));
        match (body.get("next_cursor").and_then(Value::as_str), r.header("link")) {
            (Some(cursor), Some(link)) => {
                assert!(link.ends_with("; rel=\"next\""), "{link}");
                let next = link.trim_start_matches('<').split('>').next().unwrap().to_string();
                assert!(next.contains(&format!("cursor={cursor}")) && next.contains("type=ingest"), "{next}");
                path = next;
            }
            (None, None) => break,
            other => panic!("next_cursor and Link disagree: {other:?}"),
        }
    }
    assert_eq!(pages, 3);
    let want: Vec<i64> = (seen[0]..seen[0] + 25).collect();
    assert_eq!(seen, want, "every job once, in id order");
    let r = w.get("/api/v1/history?limit=7");
    assert_eq!(ok(&r)["items"].as_array().unwrap().len(), 7);
    assert!(r.header("link").is_some());
}

#[test]
fn legacy_aliases_announce_their_successor() {
    let site = Site::start(&[]);
    let w = site.client("acme", "orch:work,orch:read");
    let id = ok(&w.post("/api/v1/jobs", &json!({"queue": "ingest"})))["job"]["id"].as_i64().unwrap();
    let stable = w.get(&format!("/api/v1/jobs/{id}"));
    for path in [format!("/api/v0/jobs/{id}"), format!("/api/v0/jobs/{id}/summary")] {
        let r = w.get(&path);
        assert_eq!(r.status, 200);
        assert!(r.header("deprecation").is_some_and(|d| d.starts_with('@')));
        assert!(r.header("sunset").is_some_and(|s| s.ends_with("GMT")));
        assert_eq!(r.header("link").unwrap(), format!("</api/v1/jobs/{id}>; rel=\"successor-version\""));
    }
    assert_eq!(w.get(&format!("/api/v0/jobs/{id}")).json, stable.json["job"]);
    assert_eq!(w.get(&format!("/api/v0/jobs/{id}/summary")).json["state"], "queued");
    assert!(stable.header("deprecation").is_none());
}

#[test]
fn discovery_and_probes() {
    let site = Site::start(&[]);
    let anon = Client::new(&site.daemon.url, None);
    let r = anon.get("/healthz");
    assert_eq!((r.status, r.header("orch-api-version")), (200, Some("1")));
    assert_eq!(anon.get("/readyz").json["status"], "ready");
    let r = anon.get("/.well-known/openapi");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/openapi/orchestrator.json"));
    let served = anon.get("/openapi/orchestrator.json").json;
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/openapi/orchestrator.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(served, committed, "the served document is the committed one");
    assert!(served["paths"]["/api/v1/claims"]["post"].is_object());
}
