//! Request bodies and query strings for the control plane, through the daemon's own router in
//! process (`orch_fuzz::site`, the site of `orchd/tests/auth_fuzz.rs`). The first byte picks the
//! endpoint (and whether a `content-type: application/json` header is sent), the rest is the body
//! of a POST or PUT, or the query string of a GET. Nothing may answer 5xx, and every 4xx is the
//! JSON error envelope with a stable code (`check_reply`). Seeds (`fuzz/seeds/http_body/`) are
//! valid bodies behind their selector.
#![no_main]

use axum::body::Body;
use libfuzzer_sys::fuzz_target;
use orch_fuzz::site::check_reply;
use orch_fuzz::{holds, site};

/// Endpoints that take a JSON body; the same lists as `tests/tests/http_fuzz.rs`.
const BODIES: [(&str, &str); 21] = [
    ("POST", "/api/v1/jobs"),
    ("POST", "/api/v1/jobs/batch"),
    ("POST", "/api/v1/claims"),
    ("POST", "/api/v1/jobs/1/heartbeat"),
    ("POST", "/api/v1/jobs/1/ack"),
    ("POST", "/api/v1/acks"),
    ("POST", "/api/v1/jobs/1/fail"),
    ("POST", "/api/v1/jobs/1/cancel"),
    ("POST", "/api/v1/jobs/retry"),
    ("POST", "/api/v1/runs"),
    ("POST", "/api/v1/backfills"),
    ("POST", "/api/v1/webhooks"),
    ("POST", "/api/v1/rate-limits/tenant/throttle"),
    ("POST", "/api/v1/pauses/queue:q"),
    ("PUT", "/api/v1/sources/s"),
    ("PUT", "/api/v1/quotas/q"),
    ("PUT", "/api/v1/rate-limits/tenant"),
    ("PUT", "/api/v1/concurrency/queue:q"),
    ("PUT", "/api/v1/blackouts/b"),
    ("PUT", "/api/v1/schedules/s"),
    ("PUT", "/api/v1/rate-limits/host:h"),
];

/// Lists that take a query string.
const QUERIES: [&str; 6] =
    ["/api/v1/jobs", "/api/v1/history", "/api/v1/runs", "/api/v1/incidents", "/api/v1/throttles", "/api/v1/errors"];

/// Bytes a query string may hold as they are; the others are percent-encoded.
fn query_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let site = site();
    let json_header = selector & 0x80 == 0;
    let which = usize::from(selector & 0x7f) % (BODIES.len() + QUERIES.len());
    let (what, req) = if let Some(&(method, path)) = BODIES.get(which) {
        let mut req = site.request(method, path);
        if json_header {
            req = req.header("content-type", "application/json");
        }
        (format!("{method} {path} {:?}", String::from_utf8_lossy(rest)), req.body(Body::from(rest.to_vec())))
    } else {
        let path = QUERIES[which - BODIES.len()];
        let query: String =
            rest.iter().map(|&b| if query_safe(b) { char::from(b).to_string() } else { format!("%{b:02X}") }).collect();
        let uri = format!("{path}?{query}");
        (format!("GET {uri}"), site.request("GET", &uri).body(Body::empty()))
    };
    let Ok(req) = req else { return };
    holds(check_reply(&what, &site.send(req)));
});
