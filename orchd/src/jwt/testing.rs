//! Test support for [`JwtVerifier`](super::JwtVerifier), shared by its unit tests,
//! `orchd/tests/auth_fuzz.rs` and the `token` fuzz target: the test Authority of `fixtures/jwt/`
//! (its JWKS, the settings it fits and its signing keys), and the oracle of what an accepted
//! token promises. Not part of the API (it reads the repository's fixtures); public only so that
//! tests outside this crate use the same copy.

use std::path::PathBuf;
use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

use super::{JwtError, JwtPrincipal, JwtSettings, JwtVerifier};

/// The test Authority's `iss`.
pub const ISSUER: &str = "https://authority.test";
/// The audience its tokens are for.
pub const AUDIENCE: &str = "orchd";

/// `fixtures/jwt/<name>` of the repository.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/jwt")).join(name)
}

/// The settings that trust the test Authority (its JWKS given inline, not as a file).
pub fn settings() -> JwtSettings {
    JwtSettings { issuer: ISSUER.into(), audience: AUDIENCE.into(), ..JwtSettings::default() }
}

/// The test Authority's JWKS (`fixtures/jwt/jwks.json`: both [`TestKey`]s).
pub fn jwks() -> String {
    std::fs::read_to_string(fixture("jwks.json")).expect("fixtures/jwt/jwks.json")
}

/// A verifier of the test Authority's tokens.
pub fn verifier() -> JwtVerifier {
    JwtVerifier::from_jwks(&jwks(), &settings()).expect("the test JWKS")
}

/// Seconds since the epoch: the clock tokens are checked against.
pub fn now_s() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// The signing keys of the test JWKS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestKey {
    /// `ed25519.pem`, EdDSA.
    Ed25519,
    /// `rsa.pem`, RS256.
    Rsa,
}

impl TestKey {
    /// Its `kid` in the JWKS.
    pub fn kid(self) -> &'static str {
        match self {
            TestKey::Ed25519 => "orch-test-ed25519",
            TestKey::Rsa => "orch-test-rs256",
        }
    }

    /// The algorithm the JWKS allows it.
    pub fn alg(self) -> Algorithm {
        match self {
            TestKey::Ed25519 => Algorithm::EdDSA,
            TestKey::Rsa => Algorithm::RS256,
        }
    }

    /// The private key, read once.
    pub fn encoding_key(self) -> &'static EncodingKey {
        static KEYS: OnceLock<[EncodingKey; 2]> = OnceLock::new();
        let keys = KEYS.get_or_init(|| {
            let pem = |f: &str| std::fs::read(fixture(f)).expect("a fixtures/jwt key");
            [
                EncodingKey::from_ed_pem(&pem("ed25519.pem")).expect("ed25519.pem"),
                EncodingKey::from_rsa_pem(&pem("rsa.pem")).expect("rsa.pem"),
            ]
        });
        &keys[self as usize]
    }

    /// A token of these claims, signed by this key, with its `kid`.
    pub fn sign(self, claims: &Value) -> String {
        let header = Header { kid: Some(self.kid().into()), ..Header::new(self.alg()) };
        jsonwebtoken::encode(&header, claims, self.encoding_key()).expect("signing a test token")
    }

    /// A token whose claims segment is `payload`, any bytes, under this key's header
    /// (`{"alg":…,"kid":…,"typ":"JWT"}`), really signed by this key.
    pub fn sign_payload(self, payload: &[u8]) -> String {
        let header = format!(r#"{{"alg":"{:?}","kid":"{}","typ":"JWT"}}"#, self.alg(), self.kid());
        let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), self.encoding_key(), self.alg()).expect("signing");
        format!("{message}.{sig}")
    }
}

/// Returns `Err` with the message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
}

/// A refused token must be refused with a token error (which the API maps to 401), never a JWKS or
/// settings one.
pub fn token_error(e: &JwtError) -> Result<(), String> {
    ensure!(e.code().starts_with("token_"), "{e:?} has code {}", e.code());
    Ok(())
}

/// What an accepted token's claims `c` must say, by the module's contract: `sub` and the tenant
/// are non-empty strings and are the principal's, `iss` and `aud` name ours, `exp` has not passed
/// and `nbf` has (with the settings' leeway, and five seconds for the test's own run time), and
/// the scopes are those of `scope` and `scp`.
pub fn contract_holds(c: &Value, p: &JwtPrincipal) -> Result<(), String> {
    let names = |v: &Value, want: &str| v == want || v.as_array().is_some_and(|a| a.iter().any(|x| x == want));
    let (now, leeway) = (now_s(), settings().leeway_s as i64);
    ensure!(c["sub"].as_str().is_some_and(|s| !s.is_empty() && s == p.subject), "sub of {c}");
    ensure!(c["tenant"].as_str().is_some_and(|s| !s.is_empty() && s == p.tenant), "tenant of {c}");
    ensure!(names(&c["iss"], ISSUER), "iss of {c}");
    ensure!(names(&c["aud"], AUDIENCE), "aud of {c}");
    ensure!(c["exp"].as_i64().is_some_and(|e| e == p.expires_at && e >= now - leeway - 5), "exp of {c}");
    ensure!(c["nbf"].is_null() || c["nbf"].as_f64().is_some_and(|n| n <= (now + leeway + 5) as f64), "nbf of {c}");
    let mut scopes: Vec<String> = Vec::new();
    for name in ["scope", "scp"] {
        match c.get(name) {
            None => {}
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_string)),
            Some(Value::Array(items)) if name == "scp" => {
                for item in items {
                    let Some(item) = item.as_str() else { return Err(format!("scp item {item} of {c}")) };
                    scopes.push(item.to_string());
                }
            }
            Some(other) => return Err(format!("{name} {other} of {c}")),
        }
    }
    scopes.sort();
    scopes.dedup();
    ensure!(scopes == p.scopes, "scopes of {c}: {scopes:?}, but the principal has {:?}", p.scopes);
    Ok(())
}
