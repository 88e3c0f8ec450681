//! JWTs of an external Authority, checked offline: the Authority's public keys come from a
//! local JWKS file (an air-gapped site never fetches anything). Only asymmetric algorithms are
//! accepted, the algorithm must fit the key, and `iss`, `aud`, `exp`, `nbf` and the tenant claim
//! are checked; scopes come from `scope` (space-separated) and/or `scp`.

use std::path::PathBuf;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{decode, decode_header, Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[doc(hidden)]
pub mod testing;

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

/// Why a JWKS, the settings or a token was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The JWKS is unreadable, not a JWKS, or holds no usable key.
    #[error("JWKS {}: {why}", path.as_ref().map_or("(inline)".into(), |p| p.display().to_string()))]
    Jwks {
        /// The file, when the JWKS came from one.
        path: Option<PathBuf>,
        /// Why.
        why: String,
    },
    /// The `[jwt]` settings cannot work.
    #[error("jwt settings: {0}")]
    Settings(String),
    /// The token is not a well-formed JWT.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// No key of the set has the token's `kid` (or the token has none and the set has several keys).
    #[error("no key {0:?} in the JWKS")]
    UnknownKey(String),
    /// The algorithm is never accepted (`none`, HMAC), or does not fit the key.
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
            JwtError::Jwks { .. } => "jwks_invalid",
            JwtError::Settings(_) => "jwt_settings_invalid",
            JwtError::Expired => "token_expired",
            JwtError::NotYetValid => "token_not_yet_valid",
            _ => "token_invalid",
        }
    }
}

/// Only asymmetric signatures are accepted: never HMAC (and `none` is not even an [`Algorithm`]).
fn accepted(alg: Algorithm) -> bool {
    alg.family() != AlgorithmFamily::Hmac
}

struct Key {
    kid: Option<String>,
    /// Algorithms this key may verify.
    algs: Vec<Algorithm>,
    key: DecodingKey,
}

/// Checks JWTs against a fixed set of public keys.
pub struct JwtVerifier {
    keys: Vec<Key>,
    settings: JwtSettings,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| k.kid.as_deref().unwrap_or("(no kid)")).collect();
        f.debug_struct("JwtVerifier").field("kids", &kids).field("issuer", &self.settings.issuer).finish()
    }
}

/// The algorithms a JWK may verify; none for keys we do not accept (symmetric, encryption, other curves).
fn algorithms(jwk: &Jwk) -> Vec<Algorithm> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))) {
        return Vec::new();
    }
    let by_type: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => &[Algorithm::ES256],
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => &[Algorithm::ES384],
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
        _ => &[],
    };
    // A JWK `alg` names the one algorithm it is for; compare by name (both enums spell them alike).
    let named = jwk.common.key_algorithm.map(|a| format!("{a:?}"));
    by_type.iter().copied().filter(|a| named.as_ref().is_none_or(|n| *n == format!("{a:?}"))).collect()
}

/// Decodes unpadded base64url; `None` if it is not.
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in s.bytes() {
        acc = (acc << 6 | ALPHABET.iter().position(|&a| a == c)? as u32) & 0xfff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The `alg` of a header that jsonwebtoken could not parse (`none`, unknown names), if it has one.
fn raw_alg(token: &str) -> Option<String> {
    let header: Value = serde_json::from_slice(&b64url_decode(token.split('.').next()?)?).ok()?;
    header.get("alg")?.as_str().map(str::to_string)
}

impl JwtVerifier {
    /// `None` when no JWKS is configured; otherwise reads and checks it. Errors name the file.
    pub fn from_settings(s: &JwtSettings) -> Result<Option<JwtVerifier>, JwtError> {
        let Some(path) = &s.jwks_file else { return Ok(None) };
        check_settings(s)?;
        let named = |why: String| JwtError::Jwks { path: Some(path.clone()), why };
        let text = std::fs::read_to_string(path).map_err(|e| named(e.to_string()))?;
        match JwtVerifier::from_jwks(&text, s) {
            Ok(v) => Ok(Some(v)),
            Err(JwtError::Jwks { why, .. }) => Err(named(why)),
            Err(other) => Err(other),
        }
    }

    /// A verifier over the usable keys of a JWKS document; other keys are skipped.
    pub fn from_jwks(jwks_json: &str, s: &JwtSettings) -> Result<JwtVerifier, JwtError> {
        check_settings(s)?;
        let invalid = |why: String| JwtError::Jwks { path: None, why };
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<Value>,
        }
        let set: Set = serde_json::from_str(jwks_json).map_err(|e| invalid(format!("not a JWKS: {e}")))?;
        let mut keys = Vec::new();
        // Keys of a kind jsonwebtoken cannot even parse (other `kty`, curves, `alg`s) are skipped like the rest.
        for jwk in set.keys.into_iter().filter_map(|k| serde_json::from_value::<Jwk>(k).ok()) {
            let algs = algorithms(&jwk);
            if algs.is_empty() {
                continue;
            }
            let kid = jwk.common.key_id.clone();
            let key = DecodingKey::from_jwk(&jwk)
                .map_err(|e| invalid(format!("key {:?}: {e}", kid.as_deref().unwrap_or("(no kid)"))))?;
            keys.push(Key { kid, algs, key });
        }
        if keys.is_empty() {
            return Err(invalid("no usable key (asymmetric, for signatures)".into()));
        }
        Ok(JwtVerifier { keys, settings: s.clone() })
    }

    /// How many keys were loaded.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Checks a token's signature, algorithm, `iss`, `aud`, `exp` and `nbf`, and says who it is for.
    pub fn verify(&self, token: &str) -> Result<JwtPrincipal, JwtError> {
        let header = decode_header(token).map_err(|e| match raw_alg(token) {
            Some(alg) if alg.parse::<Algorithm>().map_or(true, |a| !accepted(a)) => JwtError::Algorithm(alg),
            _ => JwtError::Malformed(e.to_string()),
        })?;
        let alg_error = || JwtError::Algorithm(format!("{:?}", header.alg));
        if !accepted(header.alg) {
            return Err(alg_error());
        }
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
            return Err(alg_error());
        }
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.settings.issuer]);
        v.set_audience(&[&self.settings.audience]);
        v.leeway = self.settings.leeway_s;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = decode::<Value>(token, &key.key, &v)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => JwtError::Expired,
                    K::ImmatureSignature => JwtError::NotYetValid,
                    K::InvalidIssuer => JwtError::Issuer,
                    K::InvalidAudience => JwtError::Audience,
                    K::InvalidSignature => JwtError::Signature,
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => alg_error(),
                    K::MissingRequiredClaim(c) => JwtError::Claim(c.clone()),
                    _ => JwtError::Malformed(e.to_string()),
                }
            })?
            .claims;
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
        for name in ["scope", "scp"] {
            let bad = || JwtError::Claim(name.into());
            match claims.get(name) {
                None => {}
                Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_string)),
                Some(Value::Array(items)) if name == "scp" => {
                    for item in items {
                        scopes.push(item.as_str().ok_or_else(bad)?.to_string());
                    }
                }
                Some(_) => return Err(bad()),
            }
        }
        scopes.sort();
        scopes.dedup();
        let expires_at = claims.get("exp").and_then(Value::as_i64).ok_or_else(|| JwtError::Claim("exp".into()))?;
        Ok(JwtPrincipal { subject, tenant, scopes, expires_at })
    }
}

fn check_settings(s: &JwtSettings) -> Result<(), JwtError> {
    let missing = [("issuer", &s.issuer), ("audience", &s.audience), ("tenant_claim", &s.tenant_claim)]
        .into_iter()
        .find(|(_, v)| v.trim().is_empty());
    match missing {
        Some((name, _)) => Err(JwtError::Settings(format!("jwt.{name} must be set when jwt.jwks_file is"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::testing::{fixture, jwks, now_s as now, settings, verifier, TestKey};
    use super::*;

    const ED: &str = "orch-test-ed25519";

    fn claims() -> Value {
        json!({"sub": "svc", "tenant": "acme", "iss": "https://authority.test", "aud": ["orchd", "other"],
               "exp": now() + 600, "scope": "orch:read orch:work", "scp": ["orch:read", "orch:quota"]})
    }

    fn with(k: &str, val: Value) -> Value {
        let mut c = claims();
        c[k] = val;
        c
    }

    fn sign(pem: &str, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let bytes = std::fs::read(fixture(pem)).unwrap();
        let key = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&bytes).unwrap(),
            _ => EncodingKey::from_rsa_pem(&bytes).unwrap(),
        };
        encode(&Header { kid: kid.map(str::to_string), ..Header::new(alg) }, claims, &key).unwrap()
    }

    fn ed(claims: &Value) -> String {
        TestKey::Ed25519.sign(claims)
    }

    fn refused(token: &str) -> JwtError {
        verifier().verify(token).unwrap_err()
    }

    #[test]
    fn valid_eddsa_token_gives_the_principal() {
        let p = verifier().verify(&ed(&claims())).unwrap();
        assert_eq!((p.subject.as_str(), p.tenant.as_str()), ("svc", "acme"));
        assert_eq!(p.scopes, ["orch:quota", "orch:read", "orch:work"]);
        assert_eq!(p.expires_at, claims()["exp"].as_i64().unwrap());
    }

    #[test]
    fn valid_rs256_token_gives_the_principal() {
        let c = with("scp", json!("orch:admin orch:read"));
        let p = verifier().verify(&sign("rsa.pem", Algorithm::RS256, Some("orch-test-rs256"), &c)).unwrap();
        assert_eq!(p.scopes, ["orch:admin", "orch:read", "orch:work"]);
        assert_eq!(p.tenant, "acme");
    }

    #[test]
    fn time_claims_are_checked_with_leeway() {
        assert!(matches!(refused(&ed(&with("exp", json!(now() - 3600)))), JwtError::Expired));
        assert_eq!(refused(&ed(&with("exp", json!(now() - 3600)))).code(), "token_expired");
        assert!(verifier().verify(&ed(&with("exp", json!(now() - 10)))).is_ok(), "within the 30 s leeway");
        assert!(matches!(refused(&ed(&with("nbf", json!(now() + 3600)))), JwtError::NotYetValid));
        let mut no_exp = claims();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(matches!(refused(&ed(&no_exp)), JwtError::Claim(c) if c == "exp"));
    }

    #[test]
    fn wrong_issuer_and_audience_are_refused() {
        assert!(matches!(refused(&ed(&with("iss", json!("https://evil.test")))), JwtError::Issuer));
        assert!(matches!(refused(&ed(&with("aud", json!("someone")))), JwtError::Audience));
    }

    #[test]
    fn unknown_kid_is_refused() {
        let token = sign("ed25519.pem", Algorithm::EdDSA, Some("nope"), &claims());
        assert!(matches!(refused(&token), JwtError::UnknownKey(k) if k == "nope"));
        let no_kid = sign("ed25519.pem", Algorithm::EdDSA, None, &claims());
        assert!(matches!(refused(&no_kid), JwtError::UnknownKey(_)), "two keys: a kid is needed");
        let one_key =
            r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "9_6dRcE10xPZJ_ydr9Aodas-FE8wBFe8VBAhSwEK4ok"}]}"#;
        assert!(JwtVerifier::from_jwks(one_key, &settings()).unwrap().verify(&no_kid).is_ok());
    }

    #[test]
    fn key_outside_the_set_is_refused() {
        let token = sign("other-ed25519.pem", Algorithm::EdDSA, Some(ED), &claims());
        assert!(matches!(refused(&token), JwtError::Signature));
        assert_eq!(refused(&token).code(), "token_invalid");
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        let token = sign("rsa.pem", Algorithm::RS256, Some(ED), &claims());
        assert!(matches!(refused(&token), JwtError::Algorithm(a) if a == "RS256"));
        let ps = sign("rsa.pem", Algorithm::PS256, Some("orch-test-rs256"), &claims());
        assert!(matches!(refused(&ps), JwtError::Algorithm(a) if a == "PS256"), "the JWK says RS256");
    }

    #[test]
    fn hs256_is_refused() {
        let h = Header { kid: Some(ED.into()), ..Header::new(Algorithm::HS256) };
        let token = encode(&h, &claims(), &EncodingKey::from_secret(b"secret")).unwrap();
        assert!(matches!(refused(&token), JwtError::Algorithm(a) if a == "HS256"));
    }

    #[test]
    fn alg_none_is_refused() {
        // The header is base64url of `{"alg":"none"}`; the claims are those of a valid token.
        let token = format!("eyJhbGciOiJub25lIn0.{}.", ed(&claims()).split('.').nth(1).unwrap());
        assert!(matches!(refused(&token), JwtError::Algorithm(a) if a == "none"));
        assert!(matches!(refused("not-a-jwt"), JwtError::Malformed(_)));
    }

    #[test]
    fn missing_tenant_is_refused() {
        let mut c = claims();
        c.as_object_mut().unwrap().remove("tenant");
        assert!(matches!(refused(&ed(&c)), JwtError::Claim(n) if n == "tenant"));
        assert!(matches!(refused(&ed(&with("tenant", json!("")))), JwtError::Claim(n) if n == "tenant"));
    }

    #[test]
    fn unusable_keys_are_skipped_and_a_set_without_usable_keys_is_an_error() {
        let mut set: Value = serde_json::from_str(&jwks()).unwrap();
        let junk = [
            json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
            json!({"kty": "RSA", "kid": "enc", "use": "enc", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "OKP", "crv": "X25519", "kid": "ecdh", "x": "AAAA"}),
        ];
        set["keys"].as_array_mut().unwrap().extend(junk.clone());
        assert_eq!(JwtVerifier::from_jwks(&set.to_string(), &settings()).unwrap().key_count(), 2);
        let only_junk = json!({ "keys": junk }).to_string();
        let err = JwtVerifier::from_jwks(&only_junk, &settings()).unwrap_err();
        assert!(matches!(err, JwtError::Jwks { path: None, .. }));
        assert_eq!(err.code(), "jwks_invalid");
    }

    #[test]
    fn from_settings_reads_the_file_or_gives_none() {
        assert!(JwtVerifier::from_settings(&JwtSettings::default()).unwrap().is_none());
        let file = JwtSettings { jwks_file: Some(fixture("jwks.json")), ..settings() };
        assert_eq!(JwtVerifier::from_settings(&file).unwrap().unwrap().key_count(), 2);
        let missing = JwtSettings { jwks_file: Some("/nonexistent/jwks.json".into()), ..settings() };
        let err = JwtVerifier::from_settings(&missing).unwrap_err();
        assert!(matches!(&err, JwtError::Jwks { path: Some(_), .. }) && err.to_string().contains("/nonexistent/"));
    }

    #[test]
    fn empty_issuer_is_a_settings_error() {
        let s = JwtSettings { jwks_file: Some(fixture("jwks.json")), issuer: String::new(), ..settings() };
        assert!(matches!(JwtVerifier::from_settings(&s), Err(JwtError::Settings(m)) if m.contains("issuer")));
        assert!(matches!(JwtVerifier::from_jwks(&jwks(), &s), Err(JwtError::Settings(_))));
    }

    // ---- Fuzzing ------------------------------------------------------------------------------
    // Whatever arrives after `Bearer `, `verify` must not panic, must refuse it with a token
    // error (never a JWKS or settings one), and may accept only a token its Authority signed,
    // byte for byte, whose claims pass every check.

    mod fuzz {
        use std::sync::OnceLock;

        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        use proptest::prelude::*;

        use super::*;
        use crate::jwt::testing::{contract_holds, token_error};

        /// Characters mutations draw from: the base64url alphabet, JWT and base64 punctuation,
        /// whitespace, a NUL and a non-ASCII letter.
        const CHARS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \t\0é";
        /// What may stick to a token on its way: whitespace, base64 padding, separators.
        const PADDING: &str = " \t\r\n\0=.";
        const ED_HEADER: &str = r#"{"alg":"EdDSA","kid":"orch-test-ed25519","typ":"JWT"}"#;

        fn shared() -> &'static JwtVerifier {
            static V: OnceLock<JwtVerifier> = OnceLock::new();
            V.get_or_init(verifier)
        }

        /// One valid token per key of the set, signed once (each valid for ten minutes).
        fn genuine() -> &'static [String; 2] {
            static T: OnceLock<[String; 2]> = OnceLock::new();
            T.get_or_init(|| [TestKey::Ed25519.sign(&claims()), TestKey::Rsa.sign(&claims())])
        }

        fn b64(bytes: &[u8]) -> String {
            URL_SAFE_NO_PAD.encode(bytes)
        }

        /// `verify` refuses `token` unless it is one of the genuine tokens.
        fn only_genuine_passes(token: &str) -> Result<(), TestCaseError> {
            match shared().verify(token) {
                Ok(p) => prop_assert!(genuine().iter().any(|g| g == token), "accepted {token:?} as {p:?}"),
                Err(e) => token_error(&e).map_err(TestCaseError::fail)?,
            }
            Ok(())
        }

        #[derive(Debug, Clone)]
        enum Edit {
            Replace(prop::sample::Index, char),
            Insert(prop::sample::Index, char),
            Delete(prop::sample::Index),
            SwapWithNext(prop::sample::Index),
            Truncate(prop::sample::Index),
            /// Appends a copy of one of the three segments (`.`-joined).
            RepeatSegment(prop::sample::Index),
            /// Adds a character at the start (`false`) or the end (`true`).
            Pad(bool, char),
        }

        fn edit() -> impl Strategy<Value = Edit> {
            let ch = prop::sample::select(CHARS.chars().collect::<Vec<_>>());
            prop_oneof![
                4 => (any::<prop::sample::Index>(), ch.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
                2 => (any::<prop::sample::Index>(), ch).prop_map(|(i, c)| Edit::Insert(i, c)),
                2 => any::<prop::sample::Index>().prop_map(Edit::Delete),
                1 => any::<prop::sample::Index>().prop_map(Edit::SwapWithNext),
                1 => any::<prop::sample::Index>().prop_map(Edit::Truncate),
                1 => any::<prop::sample::Index>().prop_map(Edit::RepeatSegment),
                2 => (any::<bool>(), prop::sample::select(PADDING.chars().collect::<Vec<_>>()))
                    .prop_map(|(end, c)| Edit::Pad(end, c)),
            ]
        }

        fn apply(token: &str, edits: &[Edit]) -> String {
            let mut t: Vec<char> = token.chars().collect();
            for e in edits {
                let n = t.len();
                if n == 0 {
                    break;
                }
                match e {
                    Edit::Replace(i, c) => t[i.index(n)] = *c,
                    Edit::Insert(i, c) => t.insert(i.index(n + 1), *c),
                    Edit::Delete(i) => {
                        t.remove(i.index(n));
                    }
                    Edit::SwapWithNext(i) => {
                        let i = i.index(n);
                        t.swap(i, (i + 1) % n);
                    }
                    Edit::Truncate(i) => t.truncate(i.index(n)),
                    Edit::RepeatSegment(i) => {
                        let text: String = t.iter().collect();
                        let segments: Vec<&str> = text.split('.').collect();
                        let again = format!(".{}", segments[i.index(segments.len())]);
                        t.extend(again.chars());
                    }
                    Edit::Pad(false, c) => t.insert(0, *c),
                    Edit::Pad(true, c) => t.push(*c),
                }
            }
            t.into_iter().collect()
        }

        /// A JSON value of the kinds claims are made of, often the right one for some claim.
        fn claim_value() -> impl Strategy<Value = Value> {
            let now = now();
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                prop::sample::select(vec![
                    json!(""),
                    json!("svc"),
                    json!("acme"),
                    json!("*"),
                    json!("orchd"),
                    json!("https://authority.test"),
                    json!("https://authority.test/"),
                    json!("orch:read orch:admin"),
                    json!(now + 600),
                    json!(now - 10),
                    json!(now - 3600),
                    json!(now + 3600),
                    json!((now + 600) as f64 + 0.5),
                    json!(0),
                    json!(-1),
                    json!(u64::MAX),
                    json!(i64::MIN),
                    json!(1e300),
                ]),
                any::<i64>().prop_map(|n| json!(n)),
                "[a-z:* ]{0,12}".prop_map(Value::String),
            ];
            leaf.prop_recursive(2, 8, 3, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        const CLAIMS: [&str; 10] = ["sub", "tenant", "iss", "aud", "exp", "nbf", "scope", "scp", "iat", "jti"];

        /// Well-typed values a claim must not have (`exp`: passed; `nbf`: not yet), or that are
        /// of the wrong type.
        fn wrong(claim: &str) -> Vec<Value> {
            let now = now();
            match claim {
                "sub" => vec![json!(""), json!(7), json!(["svc"])],
                "tenant" => vec![json!(""), json!(null), json!(["acme"]), json!(1)],
                "iss" => vec![json!("https://evil.test"), json!("https://authority.test/"), json!(["x"]), json!("")],
                "aud" => vec![json!("someone"), json!(["other"]), json!([]), json!(""), json!("ORCHD")],
                "exp" => vec![json!(now - 3600), json!(now - 31), json!(now as f64 + 600.5), json!("2099"), json!(-1)],
                "nbf" => vec![json!(now + 3600), json!(now + 36), json!("now")],
                "scope" => vec![json!(["orch:read"]), json!(7), json!(null)],
                "scp" => vec![json!([1]), json!({}), json!(null), json!("")],
                _ => vec![json!(null)],
            }
        }

        /// Claims as JSON text: valid claims with one made wrong, valid claims with others set or
        /// removed at random, or members drawn at random; sometimes with a name repeated.
        fn claims_text() -> impl Strategy<Value = Vec<u8>> {
            let member = || (prop::sample::select(&CLAIMS[..]), claim_value());
            let one_wrong = (valid_claims(), prop::sample::select(&CLAIMS[..8]), any::<prop::sample::Index>())
                .prop_map(|(mut c, k, i)| {
                    let w = wrong(k);
                    c[k] = w[i.index(w.len())].clone();
                    c
                });
            let edited = (valid_claims(), prop::collection::vec((member(), prop::bool::weighted(0.2)), 1..3)).prop_map(
                |(mut c, edits)| {
                    let obj = c.as_object_mut().unwrap();
                    for ((k, v), remove) in edits {
                        if remove {
                            obj.remove(k);
                        } else {
                            obj.insert(k.to_string(), v);
                        }
                    }
                    c
                },
            );
            let random = prop::collection::btree_map(prop::sample::select(&CLAIMS[..]), claim_value(), 0..8)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
            let member_text = |k: &str, v: &Value| format!("{}:{v}", Value::String(k.to_string()));
            (prop_oneof![3 => one_wrong, 2 => edited, 1 => random], prop::option::weighted(0.15, member())).prop_map(
                move |(c, repeated)| {
                    let mut body: Vec<String> = c.as_object().unwrap().iter().map(|(k, v)| member_text(k, v)).collect();
                    if let Some((k, v)) = repeated {
                        body.insert(0, member_text(k, &v));
                    }
                    format!("{{{}}}", body.join(",")).into_bytes()
                },
            )
        }

        /// Claims that pass every check, with optional claims and unknown ones mixed in.
        fn valid_claims() -> impl Strategy<Value = Value> {
            let now = now();
            let scopes = "(orch:[a-z]{1,8})( orch:[a-z]{1,8}){0,3}";
            (
                "[a-zA-Z0-9@._-]{1,16}",
                "[a-z*][a-z0-9-]{0,12}",
                prop_oneof![Just(json!("orchd")), Just(json!(["other", "orchd"]))],
                now..(now + 100_000),
                prop::option::of((now - 100_000)..(now + 20)),
                prop::option::of(scopes),
                prop::option::of(prop_oneof![
                    scopes.prop_map(Value::String),
                    prop::collection::vec("orch:[a-z]{1,8}", 0..4).prop_map(|v| json!(v)),
                ]),
                prop::collection::btree_map("x-[a-z]{1,6}", claim_value(), 0..3),
            )
                .prop_map(|(sub, tenant, aud, exp, nbf, scope, scp, extra)| {
                    let mut c = json!({"sub": sub, "tenant": tenant, "iss": "https://authority.test", "aud": aud,
                                       "exp": exp});
                    let optional = [("nbf", nbf.map(|n| json!(n))), ("scope", scope.map(Value::String)), ("scp", scp)];
                    let obj = c.as_object_mut().unwrap();
                    obj.extend(optional.into_iter().filter_map(|(k, v)| Some((k.to_string(), v?))));
                    obj.extend(extra);
                    c
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_strings_are_refused(s in prop_oneof![any::<String>(), "[A-Za-z0-9_.=+/ -]{0,120}"]) {
                let e = shared().verify(&s).expect_err("a random string is not a signed token");
                token_error(&e).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn three_base64url_segments_are_refused(
                parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 3),
                header in prop::option::of(prop::sample::select(vec![
                    ED_HEADER,
                    r#"{"alg":"RS256","kid":"orch-test-rs256"}"#,
                    r#"{"alg":"EdDSA"}"#,
                    r#"{"alg":"none","kid":"orch-test-ed25519"}"#,
                    r#"{"alg":"HS256","kid":"orch-test-ed25519"}"#,
                ])),
            ) {
                let head = header.map_or_else(|| b64(&parts[0]), |h| b64(h.as_bytes()));
                let token = format!("{head}.{}.{}", b64(&parts[1]), b64(&parts[2]));
                let e = shared().verify(&token).expect_err("nobody signed these segments");
                token_error(&e).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn signed_garbage_claims_are_refused_unless_they_keep_the_contract(
                payload in prop_oneof![4 => claims_text(), 1 => prop::collection::vec(any::<u8>(), 0..64)],
            ) {
                let verdict = match shared().verify(&TestKey::Ed25519.sign_payload(&payload)) {
                    Ok(p) => contract_holds(&serde_json::from_slice(&payload).unwrap(), &p),
                    Err(e) => token_error(&e),
                };
                verdict.map_err(TestCaseError::fail)?;
            }

            #[test]
            fn signed_valid_claims_are_accepted(c in valid_claims()) {
                let p = shared().verify(&ed(&c));
                prop_assert!(p.is_ok(), "{c} refused: {p:?}");
                contract_holds(&c, &p.unwrap()).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn mutated_genuine_tokens_are_refused(which in 0..2usize, edits in prop::collection::vec(edit(), 1..4)) {
                only_genuine_passes(&apply(&genuine()[which], &edits))?;
            }

            #[test]
            fn lenient_base64url_decoding_agrees_with_the_strict_one(
                s in "[A-Za-z0-9_-]{0,40}",
                bytes in any::<Vec<u8>>(),
            ) {
                if let Ok(strict) = URL_SAFE_NO_PAD.decode(&s) {
                    prop_assert_eq!(b64url_decode(&s), Some(strict));
                }
                prop_assert_eq!(b64url_decode(&b64(&bytes)), Some(bytes));
            }
        }

        #[test]
        fn every_truncation_and_padding_of_a_genuine_token_is_refused() {
            for token in genuine() {
                assert!(shared().verify(token).is_ok(), "the untouched token passes");
                let padded = PADDING.chars().flat_map(|c| [format!("{c}{token}"), format!("{token}{c}")]);
                let cut =
                    (0..token.len()).flat_map(|end| [token[..end].to_string(), token[token.len() - end..].to_string()]);
                for t in padded.chain(cut) {
                    let e = shared().verify(&t).expect_err(&t);
                    assert!(e.code().starts_with("token_"), "{t:?}: {e:?}");
                }
            }
        }

        /// The last character of a base64url segment carries spare bits; a decoder that ignored
        /// them would accept several spellings of one signature.
        #[test]
        fn no_other_last_character_of_any_segment_passes() {
            const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            for token in genuine() {
                let ends: Vec<usize> =
                    token.match_indices('.').map(|(i, _)| i).chain([token.len()]).map(|i| i - 1).collect();
                assert_eq!(ends.len(), 3);
                for end in ends {
                    for c in ALPHABET.chars().filter(|&c| c != token[end..].chars().next().unwrap()) {
                        let t = format!("{}{c}{}", &token[..end], &token[end + 1..]);
                        assert!(shared().verify(&t).is_err(), "{t} passes");
                    }
                }
            }
        }
    }
}
