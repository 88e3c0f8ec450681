//! JWTs of an external Authority, checked offline against a local JWKS file
//! (`fixtures/jwt/`: test-only keys, issuer `https://authority.test`, audience `orchd`).

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use orch_e2e::api::Client;
use orch_e2e::Daemon;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/jwt");
const ISSUER: &str = "https://authority.test";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn claims(tenant: &str, scope: &str) -> Value {
    json!({"sub": "svc-ingest", "tenant": tenant, "scope": scope, "iss": ISSUER, "aud": "orchd", "exp": now() + 600})
}

fn eddsa(claims: &Value) -> String {
    let key = EncodingKey::from_ed_pem(&std::fs::read(format!("{FIXTURES}/ed25519.pem")).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("orch-test-ed25519".into());
    encode(&header, claims, &key).unwrap()
}

fn rs256(claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(&std::fs::read(format!("{FIXTURES}/rsa.pem")).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("orch-test-rs256".into());
    encode(&header, claims, &key).unwrap()
}

fn start(dir: &std::path::Path) -> Daemon {
    let jwks = format!("{FIXTURES}/jwks.json");
    let env =
        [("ORCHD_JWT__JWKS_FILE", jwks.as_str()), ("ORCHD_JWT__ISSUER", ISSUER), ("ORCHD_JWT__AUDIENCE", "orchd")];
    Daemon::start_env(&dir.join("orchd.db"), &[], &env)
}

#[test]
fn jwts_are_checked_against_the_local_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path());
    let url = daemon.url.clone();
    let acme = Client::new(&url, Some(&eddsa(&claims("acme", "orch:work orch:read"))));
    let r = acme.post("/api/v1/jobs", &json!({"queue": "ingest"}));
    assert_eq!(r.status, 201, "{:?}", r.json);
    let id = r.json["job"]["id"].as_i64().unwrap();
    let history = acme.get(&format!("/api/v1/history?job_id={id}"));
    assert_eq!(history.json["items"][0]["actor"], "jwt:svc-ingest");

    // Another tenant's JWT (RS256 key) sees a 404; a read-only one may not write.
    let globex = Client::new(&url, Some(&rs256(&claims("globex", "orch:read"))));
    assert_eq!(globex.get(&format!("/api/v1/jobs/{id}")).status, 404);
    let r = globex.post("/api/v1/jobs", &json!({"queue": "ingest"}));
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let mut scp = claims("acme", "");
    scp["scp"] = json!(["orch:read"]);
    assert_eq!(Client::new(&url, Some(&eddsa(&scp))).get("/api/v1/jobs").status, 200);

    // Expired, wrong audience, wrong issuer, no tenant, HMAC, garbage: all 401 with the envelope.
    let mut expired = claims("acme", "orch:read");
    expired["exp"] = json!(now() - 3600);
    let mut audience = claims("acme", "orch:read");
    audience["aud"] = json!("someone-else");
    let mut issuer = claims("acme", "orch:read");
    issuer["iss"] = json!("https://evil.test");
    let mut no_tenant = claims("acme", "orch:read");
    no_tenant.as_object_mut().unwrap().remove("tenant");
    let hmac =
        encode(&Header::new(Algorithm::HS256), &claims("acme", "orch:read"), &EncodingKey::from_secret(b"guess"))
            .unwrap();
    for token in [eddsa(&expired), eddsa(&audience), eddsa(&issuer), eddsa(&no_tenant), hmac, "a.b.c".to_string()] {
        let r = Client::new(&url, Some(&token)).get("/api/v1/jobs");
        assert_eq!(r.status, 401, "{token}: {:?}", r.json);
        assert!(r.code().starts_with("token_") || r.code() == "unauthenticated", "{:?}", r.json);
    }
    let r = Client::new(&url, Some(&eddsa(&expired))).get("/api/v1/jobs");
    assert_eq!(r.code(), "token_expired");
}

#[test]
fn a_bad_jwks_file_stops_the_daemon_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let out = std::process::Command::new(orch_e2e::bin("orchd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.path().join("orchd.db"))
        .env("ORCHD_JWT__JWKS_FILE", &missing)
        .env("ORCHD_JWT__ISSUER", ISSUER)
        .env("ORCHD_JWT__AUDIENCE", "orchd")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.json"), "{err}");
    assert!(!dir.path().join("orchd.db").exists(), "nothing is created when the settings are wrong");
}
