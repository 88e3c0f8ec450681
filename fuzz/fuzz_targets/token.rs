//! Bearer credentials. The first byte picks a mode, the rest is its input:
//! 0. any text to `JwtVerifier::verify`: refused with a token error, or accepted only if its
//!    signature is the one the JWKS key named by its `kid` makes over its first two segments
//!    (EdDSA and RS256 signatures are deterministic, so the fixture keys recompute it);
//! 1. byte edits to a genuine token (one signed by the fixture Ed25519 key): only the untouched
//!    token passes;
//! 2. arbitrary claims, really signed by the Ed25519 key: accepted only if they keep the contract
//!    (`sub` and the tenant non-empty strings, our `iss` and `aud`, `exp` ahead, `nbf` passed,
//!    scopes from `scope` and `scp`);
//! 3. any `Authorization` value, through the daemon's router: 200 only for an issued API token
//!    or JWT, as issued, after `Bearer` and white space; otherwise a 401 envelope with
//!    `WWW-Authenticate: Bearer`.
#![no_main]

use axum::body::Body;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;
use orch_fuzz::site::{jwt_key, now_s, site, JwtKey, AUDIENCE, ISSUER};
use orchd::jwt::{JwtError, JwtPrincipal};
use serde_json::Value;

fn token_error(token: &str, e: &JwtError) {
    assert!(e.code().starts_with("token_"), "{token:?}: {e:?} has code {}", e.code());
}

/// The signature the fixture key named by `kid` makes for `alg` over `message`, if any.
fn recomputed(alg: &Value, kid: &Value, message: &str) -> Option<String> {
    let which = match (alg.as_str()?, kid.as_str()) {
        ("EdDSA", Some("orch-test-ed25519") | None) => JwtKey::Ed25519,
        ("RS256", Some("orch-test-rs256")) => JwtKey::Rsa,
        _ => return None,
    };
    let (key, alg, _) = jwt_key(which);
    jsonwebtoken::crypto::sign(message.as_bytes(), key, *alg).ok()
}

/// What an accepted token's claims must say.
fn contract_holds(c: &Value, p: &JwtPrincipal) {
    let names = |v: &Value, want: &str| v == want || v.as_array().is_some_and(|a| a.iter().any(|x| x == want));
    let (now, leeway) = (now_s(), 30);
    assert!(c["sub"].as_str().is_some_and(|s| !s.is_empty() && s == p.subject), "sub of {c}");
    assert!(c["tenant"].as_str().is_some_and(|s| !s.is_empty() && s == p.tenant), "tenant of {c}");
    assert!(names(&c["iss"], ISSUER), "iss of {c}");
    assert!(names(&c["aud"], AUDIENCE), "aud of {c}");
    assert!(c["exp"].as_i64().is_some_and(|e| e == p.expires_at && e >= now - leeway - 5), "exp of {c}");
    assert!(c["nbf"].is_null() || c["nbf"].as_f64().is_some_and(|n| n <= (now + leeway + 5) as f64), "nbf of {c}");
    let mut scopes: Vec<String> = Vec::new();
    for name in ["scope", "scp"] {
        match c.get(name) {
            None => {}
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_string)),
            Some(Value::Array(items)) if name == "scp" => {
                for item in items {
                    scopes.push(item.as_str().expect("scp items are strings").to_string());
                }
            }
            Some(other) => panic!("{name} {other} of {c}"),
        }
    }
    scopes.sort();
    scopes.dedup();
    assert_eq!(scopes, p.scopes, "scopes of {c}");
}

fn any_text(token: &str) {
    match site().jwt.verify(token) {
        Err(e) => token_error(token, &e),
        Ok(p) => {
            let mut parts = token.split('.');
            let (h, c, sig) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            assert!(parts.next().is_none(), "accepted {token:?} with more than three segments");
            let json = |s: &str| URL_SAFE_NO_PAD.decode(s).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            let header = json(h).expect("accepted an unreadable header");
            let claims = json(c).expect("accepted unreadable claims");
            let want = recomputed(&header["alg"], &header["kid"], &format!("{h}.{c}"));
            assert_eq!(want.as_deref(), Some(sig), "accepted {token:?} ({p:?}) not signed by the JWKS keys");
            contract_holds(&claims, &p);
        }
    }
}

fn mutated(edits: &[u8]) {
    let genuine = &site().issued[1];
    let mut t = genuine.as_bytes().to_vec();
    for e in edits.chunks(3) {
        let (op, at, b) = (e[0], e.get(1).copied().unwrap_or(0), e.get(2).copied().unwrap_or(b'A'));
        let n = t.len();
        let at = usize::from(at) * n.max(1) / 256;
        match op % 4 {
            0 if n > 0 => t[at.min(n - 1)] = b,
            1 => t.insert(at.min(n), b),
            2 if n > 0 => {
                t.remove(at.min(n - 1));
            }
            3 => t.truncate(at),
            _ => {}
        }
    }
    let Ok(token) = std::str::from_utf8(&t) else { return };
    match site().jwt.verify(token) {
        Ok(p) => assert_eq!(token, genuine, "accepted an edited token as {p:?}"),
        Err(e) => token_error(token, &e),
    }
}

fn signed_claims(payload: &[u8]) {
    let (key, alg, kid) = jwt_key(JwtKey::Ed25519);
    let header = format!(r#"{{"alg":"EdDSA","kid":"{kid}","typ":"JWT"}}"#);
    let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, *alg).unwrap();
    assert_eq!(*alg, Algorithm::EdDSA);
    let token = format!("{message}.{sig}");
    match site().jwt.verify(&token) {
        Ok(p) => contract_holds(&serde_json::from_slice(payload).expect("accepted claims that are not JSON"), &p),
        Err(e) => token_error(&token, &e),
    }
}

/// Whether `value` is an issued credential after `Bearer` (any case) and white space.
fn names_issued(value: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(value) else { return false };
    let mut words = text.split([' ', '\t']).filter(|w| !w.is_empty());
    let (scheme, credential, rest) = (words.next(), words.next(), words.next());
    scheme.is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
        && rest.is_none()
        && site().issued.iter().any(|c| Some(c.as_str()) == credential)
}

fn authorization(value: &[u8]) {
    let site = site();
    // Short inputs stand for an issued credential with a prefix and a suffix around it.
    let value: Vec<u8> = match value.split_first() {
        Some((&n, rest)) if n < 8 => {
            let (pre, post) = rest.split_at(rest.len() / 2);
            [pre, site.issued[usize::from(n % 2)].as_bytes(), post].concat()
        }
        _ => value.to_vec(),
    };
    let req = axum::http::Request::get("/api/v1/jobs").header("host", "localhost");
    let Ok(req) = req.header("authorization", value.as_slice()).body(Body::empty()) else {
        return;
    };
    let reply = site.send(req);
    let shown = String::from_utf8_lossy(&value);
    assert!(reply.status == 200 || reply.status == 401, "{shown:?} -> {reply:?}");
    if reply.status == 200 {
        assert!(names_issued(&value), "{shown:?} passed");
    } else {
        orch_fuzz::site::check_reply(&shown, &reply);
        assert_eq!(reply.challenge.as_deref(), Some("Bearer"), "{shown:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => any_text(&String::from_utf8_lossy(rest)),
        1 => mutated(rest),
        2 => signed_claims(rest),
        _ => authorization(rest),
    }
});
