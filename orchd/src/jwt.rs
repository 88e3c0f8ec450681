//! JWTs of an external Authority, checked offline: the Authority's public keys come from a
//! local JWKS file (an air-gapped site never fetches anything). Only asymmetric algorithms are
//! accepted, the algorithm must fit the key, and `iss`, `aud`, `exp`, `nbf` and the tenant claim
//! are checked; scopes come from `scope` (space-separated) and/or `scp`.

use std::path::PathBuf;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `[jwt]` settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// The Authority's JWKS; unset, JWTs are not accepted.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of them, if a list).
    pub audience: String,
    /// The claim naming the tenant a token is bound to (`*`: site administrator).
    pub tenant_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            jwks_file: None,
            issuer: String::new(),
            audience: String::new(),
            tenant_claim: "tenant".into(),
            leeway_s: 30,
        }
    }
}

/// Who a valid JWT says the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtPrincipal {
    /// `sub`.
    pub subject: String,
    /// The tenant claim.
    pub tenant: String,
    /// From `scope` and `scp`, sorted, without duplicates.
    pub scopes: Vec<String>,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
}

/// Why a JWKS or a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The JWKS file is unreadable or holds no usable key.
    #[error("JWKS {path}: {why}")]
    Jwks {
        /// The file (or `inline`).
        path: String,
        /// Why.
        why: String,
    },
    /// The settings cannot work.
    #[error("jwt settings: {0}")]
    Settings(String),
    /// The token is not a well-formed JWT.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// No key of the set has the token's `kid`.
    #[error("no key {0:?} in the JWKS")]
    UnknownKey(String),
    /// The algorithm is not accepted, or does not fit the key.
    #[error("algorithm {0:?} is not accepted for this key")]
    Algorithm(String),
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is still ahead.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// Wrong `iss`.
    #[error("wrong issuer")]
    Issuer,
    /// Wrong `aud`.
    #[error("wrong audience")]
    Audience,
    /// A required claim is missing or malformed.
    #[error("claim {0:?} is missing or invalid")]
    Claim(String),
}

impl JwtError {
    /// The stable code of the API error envelope.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Jwks { .. } | JwtError::Settings(_) => "jwks_invalid",
            JwtError::Expired => "token_expired",
            _ => "token_invalid",
        }
    }
}

struct Key {
    kid: Option<String>,
    /// Algorithms this key may verify.
    algs: Vec<Algorithm>,
    key: DecodingKey,
}

/// Checks JWTs against a fixed set of keys.
pub struct JwtVerifier {
    keys: Vec<Key>,
    settings: JwtSettings,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("keys", &self.keys.len()).field("issuer", &self.settings.issuer).finish()
    }
}

/// The algorithms a JWK may verify, or none for keys we do not accept (symmetric, encryption).
fn algorithms(jwk: &Jwk) -> Vec<Algorithm> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))) {
        return Vec::new();
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
        _ => vec![],
    };
    match &jwk.common.key_algorithm {
        None => by_type,
        Some(named) => by_type.into_iter().filter(|a| key_algorithm(*a) == Some(*named)).collect(),
    }
}

fn key_algorithm(a: Algorithm) -> Option<KeyAlgorithm> {
    Some(match a {
        Algorithm::RS256 => KeyAlgorithm::RS256,
        Algorithm::RS384 => KeyAlgorithm::RS384,
        Algorithm::RS512 => KeyAlgorithm::RS512,
        Algorithm::PS256 => KeyAlgorithm::PS256,
        Algorithm::PS384 => KeyAlgorithm::PS384,
        Algorithm::PS512 => KeyAlgorithm::PS512,
        Algorithm::ES256 => KeyAlgorithm::ES256,
        Algorithm::ES384 => KeyAlgorithm::ES384,
        Algorithm::EdDSA => KeyAlgorithm::EdDSA,
        _ => return None,
    })
}

impl JwtVerifier {
    /// `None` when no JWKS is configured; otherwise reads and checks it.
    pub fn from_settings(s: &JwtSettings) -> Result<Option<JwtVerifier>, JwtError> {
        let Some(path) = &s.jwks_file else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| JwtError::Jwks { path: path.display().to_string(), why: e.to_string() })?;
        JwtVerifier::from_jwks(&text, s)
            .map_err(|e| match e {
                JwtError::Jwks { why, .. } => JwtError::Jwks { path: path.display().to_string(), why },
                other => other,
            })
            .map(Some)
    }

    /// A verifier over the keys of a JWKS document.
    pub fn from_jwks(jwks_json: &str, s: &JwtSettings) -> Result<JwtVerifier, JwtError> {
        if s.issuer.trim().is_empty() || s.audience.trim().is_empty() {
            return Err(JwtError::Settings("jwt.issuer and jwt.audience must be set with jwt.jwks_file".into()));
        }
        if s.tenant_claim.trim().is_empty() {
            return Err(JwtError::Settings("jwt.tenant_claim must not be empty".into()));
        }
        let inline = |why: String| JwtError::Jwks { path: "inline".into(), why };
        let set: JwkSet = serde_json::from_str(jwks_json).map_err(|e| inline(format!("not a JWKS: {e}")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let algs = algorithms(jwk);
            if algs.is_empty() {
                continue;
            }
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| inline(format!("key {:?}: {e}", jwk.common.key_id.as_deref().unwrap_or("(no kid)"))))?;
            keys.push(Key { kid: jwk.common.key_id.clone(), algs, key });
        }
        if keys.is_empty() {
            return Err(inline("no usable signing key (asymmetric, for signatures)".into()));
        }
        Ok(JwtVerifier { keys, settings: s.clone() })
    }

    /// How many keys were loaded.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Checks a token and says who it is for.
    pub fn verify(&self, token: &str) -> Result<JwtPrincipal, JwtError> {
        let header = decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?,
            None if self.keys.len() == 1 => &self.keys[0],
            None => return Err(JwtError::UnknownKey("(no kid)".into())),
        };
        if !key.algs.contains(&header.alg) {
            return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
        }
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.settings.issuer]);
        v.set_audience(&[&self.settings.audience]);
        v.leeway = self.settings.leeway_s;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = decode::<Value>(token, &key.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => JwtError::Expired,
                K::ImmatureSignature => JwtError::NotYetValid,
                K::InvalidIssuer => JwtError::Issuer,
                K::InvalidAudience => JwtError::Audience,
                K::InvalidSignature => JwtError::Signature,
                K::InvalidAlgorithm | K::InvalidAlgorithmName => JwtError::Algorithm(format!("{:?}", header.alg)),
                K::MissingRequiredClaim(c) => JwtError::Claim(c.clone()),
                _ => JwtError::Malformed(e.to_string()),
            }
        })?;
        let claims = data.claims;
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| JwtError::Claim(name.to_string()))
        };
        let subject = text("sub")?;
        let tenant = text(&self.settings.tenant_claim)?;
        let mut scopes: Vec<String> = Vec::new();
        if let Some(s) = claims.get("scope") {
            let s = s.as_str().ok_or_else(|| JwtError::Claim("scope".into()))?;
            scopes.extend(s.split_whitespace().map(str::to_string));
        }
        match claims.get("scp") {
            None => {}
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_string)),
            Some(Value::Array(items)) => {
                for item in items {
                    scopes.push(item.as_str().ok_or_else(|| JwtError::Claim("scp".into()))?.to_string());
                }
            }
            Some(_) => return Err(JwtError::Claim("scp".into())),
        }
        scopes.sort();
        scopes.dedup();
        let expires_at = claims.get("exp").and_then(Value::as_i64).ok_or_else(|| JwtError::Claim("exp".into()))?;
        Ok(JwtPrincipal { subject, tenant, scopes, expires_at })
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/jwt");

    fn settings() -> JwtSettings {
        JwtSettings { issuer: "https://authority.test".into(), audience: "orchd".into(), ..JwtSettings::default() }
    }

    fn verifier() -> JwtVerifier {
        JwtVerifier::from_jwks(&std::fs::read_to_string(format!("{DIR}/jwks.json")).unwrap(), &settings()).unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn claims() -> Value {
        json!({"sub": "svc", "tenant": "acme", "iss": "https://authority.test", "aud": ["orchd", "other"],
               "exp": now() + 600, "scope": "orch:read orch:work", "scp": ["orch:read", "orch:quota"]})
    }

    fn sign(pem: &str, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let bytes = std::fs::read(format!("{DIR}/{pem}")).unwrap();
        let key = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&bytes).unwrap(),
            _ => EncodingKey::from_rsa_pem(&bytes).unwrap(),
        };
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, claims, &key).unwrap()
    }

    #[test]
    fn accepts_eddsa_and_rs256_and_merges_scopes() {
        let v = verifier();
        assert_eq!(v.key_count(), 2, "the symmetric key is ignored");
        for token in [
            sign("ed25519.pem", Algorithm::EdDSA, Some("orch-test-ed25519"), &claims()),
            sign("rsa.pem", Algorithm::RS256, Some("orch-test-rs256"), &claims()),
        ] {
            let p = v.verify(&token).unwrap();
            assert_eq!((p.subject.as_str(), p.tenant.as_str()), ("svc", "acme"));
            assert_eq!(p.scopes, ["orch:quota", "orch:read", "orch:work"]);
        }
    }

    #[test]
    fn refuses_what_it_must() {
        let v = verifier();
        let ed = |c: &Value| sign("ed25519.pem", Algorithm::EdDSA, Some("orch-test-ed25519"), c);
        let with = |k: &str, val: Value| {
            let mut c = claims();
            c[k] = val;
            c
        };
        assert!(matches!(v.verify(&ed(&with("exp", json!(now() - 3600)))), Err(JwtError::Expired)));
        assert!(matches!(v.verify(&ed(&with("nbf", json!(now() + 3600)))), Err(JwtError::NotYetValid)));
        assert!(matches!(v.verify(&ed(&with("iss", json!("https://evil.test")))), Err(JwtError::Issuer)));
        assert!(matches!(v.verify(&ed(&with("aud", json!("someone")))), Err(JwtError::Audience)));
        let mut no_tenant = claims();
        no_tenant.as_object_mut().unwrap().remove("tenant");
        assert!(matches!(v.verify(&ed(&no_tenant)), Err(JwtError::Claim(c)) if c == "tenant"));
        let other = sign("other-ed25519.pem", Algorithm::EdDSA, Some("orch-test-ed25519"), &claims());
        assert!(matches!(v.verify(&other), Err(JwtError::Signature)));
        let unknown = sign("ed25519.pem", Algorithm::EdDSA, Some("nope"), &claims());
        assert!(matches!(v.verify(&unknown), Err(JwtError::UnknownKey(_))));
        // Algorithm confusion: an RSA signature presented under the Ed25519 key's id.
        let confused = sign("rsa.pem", Algorithm::RS256, Some("orch-test-ed25519"), &claims());
        assert!(matches!(v.verify(&confused), Err(JwtError::Algorithm(_))));
        let hmac = encode(&Header::new(Algorithm::HS256), &claims(), &EncodingKey::from_secret(b"secret")).unwrap();
        assert!(v.verify(&hmac).is_err());
        // alg "none", crafted by hand.
        let b64 = |v: &Value| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, v.to_string());
        let none = format!("{}.{}.", b64(&json!({"alg": "none", "kid": "orch-test-ed25519"})), b64(&claims()));
        assert!(v.verify(&none).is_err());
        assert!(matches!(v.verify("not-a-jwt"), Err(JwtError::Malformed(_))));
        assert_eq!(JwtError::Expired.code(), "token_expired");
        assert_eq!(JwtError::Signature.code(), "token_invalid");
    }

    #[test]
    fn settings_and_key_sets_are_checked() {
        assert!(JwtVerifier::from_settings(&JwtSettings::default()).unwrap().is_none());
        let only_hmac = r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#;
        assert!(matches!(JwtVerifier::from_jwks(only_hmac, &settings()), Err(JwtError::Jwks { .. })));
        let jwks = std::fs::read_to_string(format!("{DIR}/jwks.json")).unwrap();
        let no_issuer = JwtSettings { issuer: String::new(), ..settings() };
        assert!(matches!(JwtVerifier::from_jwks(&jwks, &no_issuer), Err(JwtError::Settings(_))));
        let missing = JwtSettings { jwks_file: Some("/nonexistent/jwks.json".into()), ..settings() };
        let err = JwtVerifier::from_settings(&missing).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/jwks.json"), "{err}");
    }
}
