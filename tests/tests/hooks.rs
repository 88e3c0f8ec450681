//! Outbound hooks against the real daemon: signed webhooks delivered to a local receiver
//! (exactly once in order while it answers, retried while it fails, resumed after a SIGKILL),
//! and the NATS JetStream publisher (skipped, saying why, where no NATS server listens).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use orch_e2e::api::Client;
use orch_e2e::receiver::{Received, Receiver};
use orch_e2e::{token, Daemon};
use serde_json::{json, Value};

const SECRET: &str = "whsec_test_0123456789abcdef";

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("ORCHD_WEBHOOKS__POLL_MS", "50"),
        ("ORCHD_WEBHOOKS__RETRY__BASE_MS", "100"),
        ("ORCHD_WEBHOOKS__RETRY__MAX_MS", "200"),
        ("ORCHD_EVENTS__POLL_MS", "20"),
    ]
}

/// Checks the signature and returns the envelope.
fn verified(r: &Received) -> Value {
    let sig = r.header("orch-signature").expect("signed");
    let (t, v1) = sig.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    assert_eq!(hex::encode(mac.finalize().into_bytes()), v1, "signature");
    let e: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(r.header("orch-event-id").unwrap(), e["seq"].to_string());
    e
}

fn run_jobs(c: &Client, n: usize, fail_last: bool) -> Vec<i64> {
    let jobs: Vec<Value> = (0..n).map(|i| json!({"queue": "ingest", "payload": {"i": i}})).collect();
    c.post("/api/v1/jobs/batch", &json!({ "jobs": jobs }));
    let r = c.post("/api/v1/claims", &json!({"worker_id": "w-1", "queues": ["ingest"], "limit": n}));
    let allocs = r.json["allocations"].as_array().unwrap().clone();
    let mut ids = Vec::new();
    for (i, a) in allocs.iter().enumerate() {
        let (id, lease) = (a["job"]["id"].as_i64().unwrap(), a["lease_id"].as_str().unwrap());
        ids.push(id);
        if fail_last && i == allocs.len() - 1 {
            c.post(
                &format!("/api/v1/jobs/{id}/fail"),
                &json!({"lease_id": lease, "error_class": "bad", "retryable": false}),
            );
        } else {
            c.post(&format!("/api/v1/jobs/{id}/ack"), &json!({ "lease_id": lease }));
        }
    }
    ids
}

#[test]
fn webhooks_are_signed_ordered_retried_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orchd.db");
    let (admin, globex_t) = (token(&db, "acme", "orch:admin"), token(&db, "globex", "orch:work"));
    let env = env();
    let daemon = Daemon::start_env(&db, &[], &env);
    let acme = Client::new(&daemon.url, Some(&admin));
    let globex = Client::new(&daemon.url, Some(&globex_t));
    let rx = Receiver::start();

    let r = acme.post("/api/v1/webhooks", &json!({"url": "http://example.com/hook", "secret": SECRET}));
    assert_eq!((r.status, r.code()), (422, "invalid_request"), "hosts outside the allow-list are refused");
    let r = acme.post("/api/v1/webhooks", &json!({"url": rx.url, "secret": SECRET}));
    assert_eq!(r.status, 201, "{:?}", r.json);
    let hook = r.json["id"].as_i64().unwrap();

    // Every state change of acme's jobs, exactly once, in order per job; nothing of globex.
    let ids = run_jobs(&acme, 3, true);
    run_jobs(&globex, 2, false);
    let mut per_job: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for _ in 0..9 {
        let r = rx.next(Duration::from_secs(10)).expect("a delivery within 10 s");
        let e = verified(&r);
        assert_eq!(e["tenant"], "acme", "{e}");
        assert_eq!(e["v"], 1);
        assert!(seen.insert(e["seq"].as_u64().unwrap()), "delivered twice: {e}");
        per_job.entry(e["job_id"].as_i64().unwrap()).or_default().push(e["type"].as_str().unwrap().into());
    }
    assert!(rx.next(Duration::from_millis(500)).is_none(), "nothing more (globex's events are not acme's)");
    assert_eq!(per_job.keys().copied().collect::<Vec<_>>(), ids);
    for (i, id) in ids.iter().enumerate() {
        let last = if i == 2 { "job.failed" } else { "job.succeeded" };
        assert_eq!(per_job[id], ["job.enqueued", "job.claimed", last], "job {id}");
    }

    // A failing receiver gets the same event again (with backoff) until it answers 2xx.
    rx.set_status(500);
    let r = acme.post("/api/v1/jobs", &json!({"queue": "ingest"}));
    let failing = r.json["job"]["id"].as_i64().unwrap();
    let first = verified(&rx.next(Duration::from_secs(10)).unwrap());
    let again = verified(&rx.next(Duration::from_secs(10)).unwrap());
    assert_eq!((first["job_id"].as_i64(), again["seq"].clone()), (Some(failing), first["seq"].clone()));
    rx.set_status(200);
    let delivered = loop {
        let r = rx.next(Duration::from_secs(10)).expect("redelivered");
        if r.status == 200 {
            break verified(&r);
        }
    };
    assert_eq!(delivered["seq"], first["seq"]);
    std::thread::sleep(Duration::from_millis(200));
    let log = acme.get(&format!("/api/v1/webhooks/{hook}/deliveries")).json;
    let row = log["items"].as_array().unwrap().iter().find(|d| d["seq"] == first["seq"]).unwrap().clone();
    assert_eq!(row["status"], "delivered");
    assert!(row["attempts"].as_u64().unwrap() >= 3, "{row}");
    // Manual redelivery of a delivered event.
    let seq = first["seq"].as_u64().unwrap();
    let r = acme.post(&format!("/api/v1/webhooks/{hook}/deliveries/{seq}/redeliver"), &json!({}));
    assert_eq!(r.json["status"], "delivered", "{:?}", r.json);
    assert_eq!(verified(&rx.next(Duration::from_secs(5)).unwrap())["seq"].as_u64(), Some(seq));
    // Another tenant cannot see or touch the subscription.
    let globex_admin = Client::new(&daemon.url, Some(&token(&db, "globex", "orch:admin")));
    assert_eq!(globex_admin.get(&format!("/api/v1/webhooks/{hook}/deliveries")).status, 404);
    assert_eq!(globex_admin.get("/api/v1/webhooks").json["items"], json!([]));

    // Killed mid-delivery: after a restart the rest is delivered (at least once, same ids).
    rx.set_status(503);
    let jobs: Vec<Value> = (0..3).map(|i| json!({"queue": "ingest", "payload": {"late": i}})).collect();
    let r = acme.post("/api/v1/jobs/batch", &json!({ "jobs": jobs }));
    let want: BTreeSet<i64> =
        r.json["items"].as_array().unwrap().iter().map(|e| e["job"]["id"].as_i64().unwrap()).collect();
    rx.next(Duration::from_secs(10)).expect("an attempt before the crash");
    daemon.kill();
    rx.set_status(200);
    let daemon = Daemon::start_env(Path::new(&db), &[], &env);
    let mut got = BTreeSet::new();
    while got != want {
        let r = rx.next(Duration::from_secs(10)).expect("delivered after the restart");
        if r.status == 200 {
            got.insert(verified(&r)["job_id"].as_i64().unwrap());
        }
    }
    drop(daemon);
}

#[test]
fn nats_jetstream_receives_the_same_envelopes() {
    if std::net::TcpStream::connect_timeout(&"127.0.0.1:4222".parse().unwrap(), Duration::from_millis(500)).is_err() {
        assert!(
            std::env::var_os("ORCH_REQUIRE_NATS").is_none(),
            "ORCH_REQUIRE_NATS is set but no NATS server listens on 127.0.0.1:4222"
        );
        eprintln!("SKIP nats_jetstream_receives_the_same_envelopes: no NATS server on 127.0.0.1:4222");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orchd.db");
    let admin = token(&db, "acme", "orch:admin");
    let unique = format!("{:08x}", rand_u32());
    let (stream, prefix) = (format!("ORCHTEST_{unique}"), format!("orchtest{unique}"));
    let mut env = env();
    env.extend([
        ("ORCHD_NATS__URL", "nats://127.0.0.1:4222"),
        ("ORCHD_NATS__STREAM", stream.as_str()),
        ("ORCHD_NATS__SUBJECT_PREFIX", prefix.as_str()),
    ]);
    let daemon = Daemon::start_env(&db, &[], &env);
    let acme = Client::new(&daemon.url, Some(&admin));
    let rx = Receiver::start();
    acme.post("/api/v1/webhooks", &json!({"url": rx.url, "secret": SECRET}));
    run_jobs(&acme, 2, false);
    let mut hooked = BTreeMap::new();
    for _ in 0..6 {
        let r = rx.next(Duration::from_secs(10)).expect("a webhook delivery");
        let e = verified(&r);
        hooked.insert(e["seq"].as_u64().unwrap(), r.body.clone());
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let from_nats: BTreeMap<u64, (String, Vec<u8>)> = rt.block_on(async {
        use futures_util::StreamExt;
        let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut out = BTreeMap::new();
        for _ in 0..100 {
            if let Ok(s) = js.get_stream(&stream).await {
                let consumer =
                    s.create_consumer(async_nats::jetstream::consumer::pull::Config::default()).await.unwrap();
                let mut msgs =
                    consumer.fetch().max_messages(100).expires(Duration::from_secs(1)).messages().await.unwrap();
                while let Some(Ok(m)) = msgs.next().await {
                    let e: Value = serde_json::from_slice(&m.payload).unwrap();
                    let id = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.to_string())
                        .unwrap_or_default();
                    assert_eq!(m.subject.as_str(), format!("{prefix}.acme.{}", e["type"].as_str().unwrap()));
                    out.insert(e["seq"].as_u64().unwrap(), (id, m.payload.to_vec()));
                }
                if out.len() >= 6 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = js.delete_stream(&stream).await;
        out
    });
    drop(daemon);
    assert_eq!(from_nats.keys().collect::<Vec<_>>(), hooked.keys().collect::<Vec<_>>(), "the same events");
    for (seq, (id, payload)) in &from_nats {
        assert!(id.ends_with(&format!(":{seq}")), "message id {id}");
        assert_eq!(payload, &hooked[seq], "the same envelope as the webhook's for event {seq}");
    }
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    t.subsec_nanos() ^ std::process::id()
}
