//! The bearer-credential path of the daemon's own router, in-process: arbitrary `Authorization`
//! values, and an issued API token and JWT that are mutated, cut, padded or put after other
//! schemes. Nothing answers 5xx; every refusal is a 401 with the error envelope and
//! `WWW-Authenticate: Bearer`; and a request passes only with an issued credential, exactly as
//! issued, after `Bearer` (or `bearer`) and white space.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Request};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use orch_core::{ManualClock, Timestamp};
use orch_store::SqliteStore;
use proptest::prelude::*;
use serde_json::{json, Value};
use tower::ServiceExt;

const JWT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/jwt");

struct Site {
    app: axum::Router,
    /// The issued credentials: an API token and a JWT.
    issued: [String; 2],
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        // JWTs are checked against the wall clock; the ledger's clock does not matter here.
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_793_577_600_000)));
        let store =
            SqliteStore::open(dir.path().join("ledger.db"), clock.clone(), Default::default(), Default::default())
                .unwrap();
        let settings = orchd::jwt::JwtSettings {
            issuer: "https://authority.test".into(),
            audience: "orchd".into(),
            ..Default::default()
        };
        let jwks = std::fs::read_to_string(format!("{JWT_DIR}/jwks.json")).unwrap();
        let verifier = orchd::jwt::JwtVerifier::from_jwks(&jwks, &settings).unwrap();
        let state =
            orchd::AppState::new(Arc::new(store), clock, orchd::config::Settings::default()).with_jwt(Some(verifier));
        state.set_ready();
        let (id, api_token) = orchd::http::auth::mint_token();
        state
            .store
            .put_token(orch_store::NewToken {
                id,
                tenant: "acme".into(),
                scopes: vec!["orch:read".into()],
                label: String::new(),
                expires_at: None,
                hash: orchd::http::auth::token_hash(&api_token),
            })
            .unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({"sub": "svc", "tenant": "acme", "scope": "orch:read", "iss": "https://authority.test",
                            "aud": "orchd", "exp": now + 600});
        let key = EncodingKey::from_ed_pem(&std::fs::read(format!("{JWT_DIR}/ed25519.pem")).unwrap()).unwrap();
        let header = Header { kid: Some("orch-test-ed25519".into()), ..Header::new(Algorithm::EdDSA) };
        let jwt = encode(&header, &claims, &key).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Site { app: orchd::http::router(state), issued: [api_token, jwt], rt, _dir: dir }
    }

    /// `GET /api/v1/jobs` with this `Authorization` value: (status, WWW-Authenticate, body).
    fn get(&self, authorization: &HeaderValue) -> (u16, Option<String>, Value) {
        let req = Request::builder()
            .uri("/api/v1/jobs")
            .header("host", "localhost")
            .header("authorization", authorization)
            .body(Body::empty())
            .unwrap();
        self.rt.block_on(async {
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            (status, challenge, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        })
    }
}

/// What may come before the credential.
const SCHEMES: [&str; 10] =
    ["Bearer ", "bearer ", "Bearer  ", "BEARER ", "Bearer", "Bearer\t", " Bearer ", "Basic ", "Token ", ""];

/// What may stick to a credential on its way: white space, base64 padding, separators.
const PADDING: &[u8] = b" \t=.~,;\"";

#[derive(Debug, Clone)]
enum Credential {
    /// One of the issued credentials, with these edits.
    Issued(usize, Vec<Edit>),
    Random(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Edit {
    Set(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Truncate(prop::sample::Index),
    Prepend(u8),
    Append(u8),
}

fn credential() -> impl Strategy<Value = Credential> {
    // Bytes a header value may hold: tab, printable ASCII and non-ASCII (not UTF-8 on its own).
    let byte = prop_oneof![
        6 => prop::sample::select(b"abcAZ09-_.=/+~ orch_".to_vec()),
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ];
    let index = any::<prop::sample::Index>;
    let edit = prop_oneof![
        3 => (index(), byte.clone()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => index().prop_map(Edit::Delete),
        1 => index().prop_map(Edit::Truncate),
        2 => prop::sample::select(PADDING.to_vec()).prop_map(Edit::Prepend),
        2 => prop::sample::select(PADDING.to_vec()).prop_map(Edit::Append),
    ];
    prop_oneof![
        2 => (0..2usize).prop_map(|i| Credential::Issued(i, Vec::new())),
        4 => (0..2usize, prop::collection::vec(edit, 1..4)).prop_map(|(i, edits)| Credential::Issued(i, edits)),
        1 => prop::collection::vec(byte, 0..40).prop_map(|mut b| {
            b.splice(0..0, b"orch_".iter().copied());
            Credential::Random(b)
        }),
        1 => prop::collection::vec(0x20u8..0x7f, 0..60).prop_map(Credential::Random),
    ]
}

fn resolve(site: &Site, c: &Credential) -> Vec<u8> {
    match c {
        Credential::Issued(i, edits) => {
            let mut t = site.issued[*i].clone().into_bytes();
            for e in edits {
                let n = t.len();
                match e {
                    Edit::Set(at, b) if n > 0 => t[at.index(n)] = *b,
                    Edit::Delete(at) if n > 0 => {
                        t.remove(at.index(n));
                    }
                    Edit::Truncate(at) if n > 0 => t.truncate(at.index(n)),
                    Edit::Prepend(b) => t.insert(0, *b),
                    Edit::Append(b) => t.push(*b),
                    _ => {}
                }
            }
            t
        }
        Credential::Random(b) => b.clone(),
    }
}

/// Whether `value` is an issued credential after the `Bearer` scheme (whose name RFC 7235 makes
/// case-insensitive) and white space: the only thing that may pass.
fn names_issued(site: &Site, value: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(value) else { return false };
    let mut words = text.split([' ', '\t']).filter(|w| !w.is_empty());
    let (scheme, credential, rest) = (words.next(), words.next(), words.next());
    scheme.is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
        && rest.is_none()
        && site.issued.iter().any(|c| Some(c.as_str()) == credential)
}

#[test]
fn only_issued_credentials_pass_and_every_refusal_is_a_401_envelope() {
    let site = Site::new();
    for c in &site.issued {
        let (status, _, body) = site.get(&HeaderValue::from_str(&format!("Bearer {c}")).unwrap());
        assert_eq!(status, 200, "{c}: {body}");
        for pad in PADDING.iter().map(|&b| b as char).filter(|p| !p.is_whitespace()) {
            for value in [format!("Bearer {pad}{c}"), format!("Bearer {c}{pad}")] {
                assert_eq!(site.get(&HeaderValue::from_str(&value).unwrap()).0, 401, "{value}");
            }
        }
    }
    let config = ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() };
    let tails = prop::sample::select(vec!["", " ", "\t"]);
    proptest!(config, |(scheme in prop::sample::select(&SCHEMES[..]), c in credential(), tail in tails)| {
        let mut value = scheme.as_bytes().to_vec();
        value.extend(resolve(&site, &c));
        value.extend(tail.as_bytes());
        let Ok(header) = HeaderValue::from_bytes(&value) else {
            // Not a header value (a leading or trailing tab, say): no request can carry it.
            return Ok(());
        };
        let (status, challenge, body) = site.get(&header);
        let shown = String::from_utf8_lossy(&value);
        let as_issued = matches!(&c, Credential::Issued(_, edits) if edits.is_empty());
        if as_issued && matches!(scheme, "Bearer " | "bearer ") {
            prop_assert_eq!(status, 200, "{:?} refused: {}", shown, body);
        }
        prop_assert!(status == 200 || status == 401, "{:?} -> {}: {}", shown, status, body);
        if status == 200 {
            prop_assert!(names_issued(&site, &value), "{:?} passed", shown);
        } else {
            let code = body["error"]["code"].as_str();
            prop_assert!(code.is_some_and(|c| !c.is_empty()), "{:?}: not an envelope: {}", shown, body);
            prop_assert_eq!(challenge.as_deref(), Some("Bearer"));
        }
    });
}
