//! The daemon's own router in process, over a SQLite ledger in a temporary directory, with an
//! issued API token and JWT; and what its answers must be. Shared by `orchd/tests/auth_fuzz.rs`
//! and the fuzz targets `http_body` and `token`, which compile this very file (`#[path]`): so it
//! uses only crates both have (orchd, orch-core, orch-store, axum, jsonwebtoken, serde_json,
//! tempfile, tokio, tower), and its checks return `Err` where the caller decides how to fail.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use orch_core::{ManualClock, Timestamp};
use orch_store::SqliteStore;
use orchd::jwt::testing::{now_s, verifier, TestKey, AUDIENCE, ISSUER};
use serde_json::{json, Value};
use tower::ServiceExt;

/// A daemon to send requests to.
pub struct Site {
    app: axum::Router,
    rt: tokio::runtime::Runtime,
    /// The issued credentials: an API token (tenant `acme`, every scope) and a JWT of the test
    /// Authority (tenant `acme`, `orch:read`, valid for an hour from start).
    pub issued: [String; 2],
    _dir: tempfile::TempDir,
}

/// What came back.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `WWW-Authenticate`, if any.
    pub challenge: Option<String>,
    /// The body as JSON (`Null` if it is not JSON).
    pub json: Value,
}

impl Site {
    /// Starts the router (the ledger's clock is manual; JWTs are checked against the wall clock)
    /// and gives it something to act on: job 1, and a tenant rate limit to throttle.
    pub fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_793_577_600_000)));
        let store =
            SqliteStore::open(dir.path().join("ledger.db"), clock.clone(), Default::default(), Default::default())
                .unwrap();
        let state =
            orchd::AppState::new(Arc::new(store), clock, orchd::config::Settings::default()).with_jwt(Some(verifier()));
        state.set_ready();
        let (id, api_token) = orchd::http::auth::mint_token();
        state
            .store
            .put_token(orch_store::NewToken {
                id,
                tenant: "acme".into(),
                scopes: orchd::http::auth::ALL_SCOPES.iter().map(|s| s.to_string()).collect(),
                label: String::new(),
                expires_at: None,
                hash: orchd::http::auth::token_hash(&api_token),
            })
            .unwrap();
        let claims = json!({"sub": "svc", "tenant": "acme", "scope": "orch:read", "iss": ISSUER, "aud": AUDIENCE,
                            "exp": now_s() + 3600});
        let jwt = TestKey::Ed25519.sign(&claims);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let site = Site { app: orchd::http::router(state), rt, issued: [api_token, jwt], _dir: dir };
        let bearer = format!("Bearer {}", site.issued[0]);
        for (method, path, body) in [
            ("POST", "/api/v1/jobs", json!({"queue": "q"})),
            ("PUT", "/api/v1/rate-limits/tenant", json!({"rate_per_s": 1000.0, "burst": 1000})),
        ] {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
                .header("authorization", &bearer)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let r = site.send(req);
            assert!(r.status < 300, "{method} {path}: {r:?}");
        }
        site
    }

    /// Sends one request through the router.
    pub fn send(&self, req: Request<Body>) -> Reply {
        self.rt.block_on(async {
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let challenge =
                resp.headers().get("www-authenticate").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20).await.unwrap();
            Reply { status, challenge, json: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
        })
    }

    /// A request with the issued API token, for `send`.
    pub fn request(&self, method: &str, uri: &str) -> axum::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", self.issued[0]))
    }

    /// `GET /api/v1/jobs` with this `Authorization` value; `None` if no request can carry it (it
    /// is not a header value).
    pub fn get_with_authorization(&self, value: &[u8]) -> Option<Reply> {
        let req = Request::get("/api/v1/jobs").header("host", "localhost").header("authorization", value);
        Some(self.send(req.body(Body::empty()).ok()?))
    }

    /// Whether `value` is an issued credential after the `Bearer` scheme (whose name RFC 7235
    /// makes case-insensitive) and white space: the only `Authorization` that may pass.
    pub fn names_issued(&self, value: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(value) else { return false };
        let mut words = text.split([' ', '\t']).filter(|w| !w.is_empty());
        let (scheme, credential, rest) = (words.next(), words.next(), words.next());
        scheme.is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
            && rest.is_none()
            && self.issued.iter().any(|c| Some(c.as_str()) == credential)
    }

    /// The answer to a request with the `Authorization` value `value`: 200 only if it
    /// [names an issued credential](Site::names_issued); otherwise a 401 error envelope with
    /// `WWW-Authenticate: Bearer`.
    pub fn check_authorization(&self, value: &[u8], reply: &Reply) -> Result<(), String> {
        let shown = String::from_utf8_lossy(value);
        if !(reply.status == 200 || reply.status == 401) {
            return Err(format!("{shown:?} -> {} {}", reply.status, reply.json));
        }
        if reply.status == 200 {
            return if self.names_issued(value) { Ok(()) } else { Err(format!("{shown:?} passed")) };
        }
        check_reply(&shown, reply)?;
        match reply.challenge.as_deref() {
            Some("Bearer") => Ok(()),
            other => Err(format!("{shown:?} -> 401 with WWW-Authenticate {other:?}")),
        }
    }
}

impl Default for Site {
    fn default() -> Site {
        Site::new()
    }
}

/// Whether `code` looks like a stable error code: a non-empty snake_case ASCII word.
pub fn is_stable_code(code: &str) -> bool {
    code.starts_with(|c: char| c.is_ascii_lowercase())
        && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The answer to any request: below 500 and, if a refusal, the JSON error envelope with a
/// stable code and a message.
pub fn check_reply(what: &dyn std::fmt::Debug, reply: &Reply) -> Result<(), String> {
    if reply.status >= 500 {
        return Err(format!("{what:?} -> {} {}", reply.status, reply.json));
    }
    if reply.status >= 400 {
        let code = reply.json["error"]["code"].as_str();
        if !code.is_some_and(is_stable_code) {
            return Err(format!("{what:?} -> {}: not an envelope: {}", reply.status, reply.json));
        }
        if !reply.json["error"]["message"].is_string() {
            return Err(format!("{what:?} -> no message: {}", reply.json));
        }
    }
    Ok(())
}
