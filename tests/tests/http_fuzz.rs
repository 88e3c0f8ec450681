//! Fuzzing the control plane through the real daemon: random JSON bodies (valid JSON of any
//! shape, near-miss bodies with fields of the wrong type, and bytes that are not JSON) to every
//! endpoint that takes a body, and random query strings to the lists. Nothing may answer 5xx
//! or kill the daemon, every refusal is the JSON error envelope, and the ledger still verifies.

use orch_e2e::api::{Client, Reply};
use orch_e2e::{run, token, Daemon};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const POSTS: [&str; 14] = [
    "/api/v1/jobs",
    "/api/v1/jobs/batch",
    "/api/v1/claims",
    "/api/v1/jobs/1/heartbeat",
    "/api/v1/jobs/1/ack",
    "/api/v1/acks",
    "/api/v1/jobs/1/fail",
    "/api/v1/jobs/1/cancel",
    "/api/v1/jobs/retry",
    "/api/v1/runs",
    "/api/v1/backfills",
    "/api/v1/webhooks",
    "/api/v1/rate-limits/tenant/throttle",
    "/api/v1/pauses/queue:q",
];

const PUTS: [&str; 7] = [
    "/api/v1/sources/s",
    "/api/v1/quotas/q",
    "/api/v1/rate-limits/tenant",
    "/api/v1/concurrency/queue:q",
    "/api/v1/blackouts/b",
    "/api/v1/schedules/s",
    "/api/v1/rate-limits/host:h",
];

const GETS: [&str; 6] =
    ["/api/v1/jobs", "/api/v1/history", "/api/v1/runs", "/api/v1/incidents", "/api/v1/throttles", "/api/v1/errors"];

/// Field names the API uses, so that random objects often come close to valid bodies.
const FIELDS: [&str; 24] = [
    "queue",
    "payload",
    "jobs",
    "worker_id",
    "queues",
    "limit",
    "lease_id",
    "error_class",
    "message",
    "retryable",
    "retry_after_seconds",
    "artifacts",
    "items",
    "key",
    "depends_on",
    "from",
    "to",
    "window_seconds",
    "reason",
    "ticket",
    "rate_per_s",
    "burst",
    "cron",
    "window",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        "[a-z:*0-9 -]{0,12}".prop_map(Value::String),
        Just(json!("2026-10-01T00:00:00Z")),
        Just(json!(u64::MAX)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(&FIELDS[..]), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())),
        ]
    })
}

#[derive(Debug, Clone)]
enum Req {
    Post(usize, Body),
    Put(usize, Body),
    Get(usize, String),
}

#[derive(Debug, Clone)]
enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        4 => value().prop_map(Body::Json),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Body::Bytes),
    ]
}

fn req() -> impl Strategy<Value = Req> {
    prop_oneof![
        (0..POSTS.len(), body()).prop_map(|(i, b)| Req::Post(i, b)),
        (0..PUTS.len(), body()).prop_map(|(i, b)| Req::Put(i, b)),
        (0..GETS.len(), "[a-z_=&%0-9:.-]{0,40}").prop_map(|(i, q)| Req::Get(i, q)),
    ]
}

fn send(c: &Client, r: &Req) -> Reply {
    let bytes = |b: &Body| match b {
        Body::Json(v) => v.to_string().into_bytes(),
        Body::Bytes(b) => b.clone(),
    };
    match r {
        Req::Post(i, b) => c.send("POST", POSTS[*i], Some(bytes(b)), &[]),
        Req::Put(i, b) => c.send("PUT", PUTS[*i], Some(bytes(b)), &[]),
        Req::Get(i, q) => c.send("GET", &format!("{}?{q}", GETS[*i]), None, &[]),
    }
}

#[test]
fn random_requests_never_get_a_5xx_and_refusals_are_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orchd.db");
    let all = "orch:read,orch:work,orch:operate,orch:quota,orch:backfill,orch:admin";
    let c_token = token(&db, "acme", all);
    let daemon = Daemon::start(&db, &[]);
    let c = Client::new(&daemon.url, Some(&c_token));
    // Something to act on: job 1, a rate limit to throttle.
    assert!(c.post("/api/v1/jobs", &json!({"queue": "q"})).status < 300);
    assert!(c.put("/api/v1/rate-limits/tenant", &json!({"rate_per_s": 1000.0, "burst": 1000})).status < 300);

    let config = ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(r in req())| {
        let reply = send(&c, &r);
        prop_assert!(reply.status < 500, "{r:?} -> {} {:?}", reply.status, reply.json);
        if reply.status >= 400 {
            let code = reply.json["error"]["code"].as_str();
            prop_assert!(code.is_some_and(|c| !c.is_empty()), "{r:?} -> not an envelope: {:?}", reply.json);
        }
    });
    assert_eq!(c.get("/healthz").status, 200, "still alive");
    daemon.stop();
    let (code, out, err) = run("orchd", &["check", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 0, "whatever was accepted left a ledger that verifies: {out}{err}");
}
