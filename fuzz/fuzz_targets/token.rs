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
//!
//! The keys, the claims contract and the token-error rule are those of `orchd/src/jwt.rs`'s unit
//! tests (`orchd::jwt::testing`); mode 3's oracle is `orchd/tests/auth_fuzz.rs`'s
//! (`Site::check_authorization`).
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use orch_fuzz::{holds, site};
use orchd::jwt::testing::{contract_holds, token_error, verifier, TestKey};
use orchd::jwt::JwtVerifier;
use serde_json::Value;

/// The verifier of the test Authority (`fixtures/jwt`), as the daemon has it.
fn jwt() -> &'static JwtVerifier {
    static V: OnceLock<JwtVerifier> = OnceLock::new();
    V.get_or_init(verifier)
}

/// A refusal must be a token error.
fn refused(token: &str, e: &orchd::jwt::JwtError) {
    holds(token_error(e).map_err(|why| format!("{token:?}: {why}")));
}

/// The signature the test key named by `kid` makes for `alg` over `message`, if any.
fn recomputed(alg: &Value, kid: &Value, message: &str) -> Option<String> {
    let key = match (alg.as_str()?, kid.as_str()) {
        ("EdDSA", Some("orch-test-ed25519") | None) => TestKey::Ed25519,
        ("RS256", Some("orch-test-rs256")) => TestKey::Rsa,
        _ => return None,
    };
    jsonwebtoken::crypto::sign(message.as_bytes(), key.encoding_key(), key.alg()).ok()
}

fn any_text(token: &str) {
    match jwt().verify(token) {
        Err(e) => refused(token, &e),
        Ok(p) => {
            let mut parts = token.split('.');
            let (h, c, sig) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            assert!(parts.next().is_none(), "accepted {token:?} with more than three segments");
            let json = |s: &str| URL_SAFE_NO_PAD.decode(s).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            let header = json(h).expect("accepted an unreadable header");
            let claims = json(c).expect("accepted unreadable claims");
            let want = recomputed(&header["alg"], &header["kid"], &format!("{h}.{c}"));
            assert_eq!(want.as_deref(), Some(sig), "accepted {token:?} ({p:?}) not signed by the JWKS keys");
            holds(contract_holds(&claims, &p));
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
    match jwt().verify(token) {
        Ok(p) => assert_eq!(token, genuine, "accepted an edited token as {p:?}"),
        Err(e) => refused(token, &e),
    }
}

fn signed_claims(payload: &[u8]) {
    let token = TestKey::Ed25519.sign_payload(payload);
    match jwt().verify(&token) {
        Ok(p) => {
            holds(contract_holds(&serde_json::from_slice(payload).expect("accepted claims that are not JSON"), &p))
        }
        Err(e) => refused(&token, &e),
    }
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
    if let Some(reply) = site.get_with_authorization(&value) {
        holds(site.check_authorization(&value, &reply));
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
