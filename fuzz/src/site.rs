//! The daemon's own router over a SQLite ledger in a temporary directory, in process (as
//! `orchd/tests/auth_fuzz.rs` builds it), with an issued API token holding every scope and a JWT
//! verifier over `fixtures/jwt/jwks.json`. Built once per fuzzing process.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use orch_core::{ManualClock, Timestamp};
use orch_store::SqliteStore;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::fixture;

/// The JWT settings the fixture keys are for.
pub const ISSUER: &str = "https://authority.test";
/// The audience.
pub const AUDIENCE: &str = "orchd";

/// A daemon to send requests to.
pub struct Site {
    app: axum::Router,
    rt: tokio::runtime::Runtime,
    /// The issued credentials: an API token (tenant `acme`, every scope) and a JWT (tenant
    /// `acme`, `orch:read`, valid for an hour from start).
    pub issued: [String; 2],
    /// The JWT verifier the daemon uses.
    pub jwt: Arc<orchd::jwt::JwtVerifier>,
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

/// The JWT settings of the fixture keys.
pub fn jwt_settings() -> orchd::jwt::JwtSettings {
    orchd::jwt::JwtSettings { issuer: ISSUER.into(), audience: AUDIENCE.into(), ..Default::default() }
}

/// The signing key of a `fixtures/jwt` PEM file, and its algorithm and kid.
pub fn jwt_key(which: JwtKey) -> &'static (EncodingKey, Algorithm, &'static str) {
    static K: OnceLock<[(EncodingKey, Algorithm, &'static str); 2]> = OnceLock::new();
    let keys = K.get_or_init(|| {
        let pem = |f: &str| std::fs::read(fixture(&format!("jwt/{f}"))).unwrap();
        [
            (EncodingKey::from_ed_pem(&pem("ed25519.pem")).unwrap(), Algorithm::EdDSA, "orch-test-ed25519"),
            (EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap(), Algorithm::RS256, "orch-test-rs256"),
        ]
    });
    &keys[which as usize]
}

/// The keys of the test JWKS.
#[derive(Clone, Copy, Debug)]
pub enum JwtKey {
    /// `ed25519.pem`, EdDSA.
    Ed25519 = 0,
    /// `rsa.pem`, RS256.
    Rsa = 1,
}

/// Seconds since the epoch, the clock JWTs are checked against.
pub fn now_s() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// The shared site.
pub fn site() -> &'static Site {
    static S: OnceLock<Site> = OnceLock::new();
    S.get_or_init(Site::new)
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_793_577_600_000)));
        let store =
            SqliteStore::open(dir.path().join("ledger.db"), clock.clone(), Default::default(), Default::default())
                .unwrap();
        let jwks = std::fs::read_to_string(fixture("jwt/jwks.json")).unwrap();
        let verifier = orchd::jwt::JwtVerifier::from_jwks(&jwks, &jwt_settings()).unwrap();
        let state = orchd::AppState::new(Arc::new(store), clock, orchd::config::Settings::default())
            .with_jwt(Some(orchd::jwt::JwtVerifier::from_jwks(&jwks, &jwt_settings()).unwrap()));
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
        let (key, alg, kid) = jwt_key(JwtKey::Ed25519);
        let header = Header { kid: Some(kid.to_string()), ..Header::new(*alg) };
        let token = jsonwebtoken::encode(&header, &claims, key).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let site = Site {
            app: orchd::http::router(state),
            rt,
            issued: [api_token, token],
            jwt: Arc::new(verifier),
            _dir: dir,
        };
        // Something to act on: job 1, and a rate limit to throttle.
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
}

/// Panics unless `reply` is below 500 and, if a refusal, carries the JSON error envelope with a
/// stable code.
pub fn check_reply(what: &dyn std::fmt::Debug, reply: &Reply) {
    assert!(reply.status < 500, "{what:?} -> {} {}", reply.status, reply.json);
    if reply.status >= 400 {
        let code = reply.json["error"]["code"].as_str();
        assert!(
            code.is_some_and(crate::is_stable_code),
            "{what:?} -> {}: not an envelope: {}",
            reply.status,
            reply.json
        );
        assert!(reply.json["error"]["message"].is_string(), "{what:?} -> no message: {}", reply.json);
    }
}
