//! Keys and trust roots in the TUF 1.0 `root.json` format: key ids, role thresholds, root
//! rotation, expiry, and checking DSSE envelopes against a role.
//!
//! Counting rule: a role's threshold is met by distinct *keys* of the role that produced a valid
//! signature. A signature's `keyid` is a hint: the key it names is tried first, then the role's
//! other keys, so a wrong hint neither hides a valid signature nor lets one key count twice.
//! Signatures by keys outside the role are ignored.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};

use crate::dsse::Envelope;
use crate::Timestamp;

/// The role whose keys sign roots.
pub const ROOT_ROLE: &str = "root";
/// The role whose keys sign bundle manifests.
pub const BUNDLE_ROLE: &str = "bundle";

/// Why a root or signature is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The root has no such role.
    #[error("root v{version} has no role {role:?}")]
    NoRole {
        /// Root version.
        version: u64,
        /// The role.
        role: String,
    },
    /// Too few valid signatures.
    #[error("role {role:?} of root v{version} needs {threshold} valid signature(s), found {found} ({keys:?})")]
    Threshold {
        /// Root version.
        version: u64,
        /// The role.
        role: String,
        /// Needed.
        threshold: u32,
        /// Counted.
        found: usize,
        /// The keys counted.
        keys: Vec<String>,
    },
    /// A rotation that is not to the next version.
    #[error("root v{new} cannot follow v{old}: versions must increase by exactly 1")]
    VersionSkip {
        /// Trusted version.
        old: u64,
        /// Offered version.
        new: u64,
    },
    /// The root expired.
    #[error("root v{version} expired at {expires}, before {at}")]
    Expired {
        /// Root version.
        version: u64,
        /// Its expiry.
        expires: String,
        /// The reference time.
        at: Timestamp,
    },
    /// Malformed root content.
    #[error("root v{version}: {reason}")]
    Invalid {
        /// Root version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// A malformed key file or secret.
    #[error("invalid key: {0}")]
    BadKey(String),
}

/// A public key as TUF writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Key {
    /// `ed25519`.
    pub keytype: String,
    /// `ed25519`.
    pub scheme: String,
    /// The key material.
    pub keyval: KeyVal,
}

/// A public key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyVal {
    /// Hex of the 32-byte public key.
    pub public: String,
}

impl Key {
    /// The key object of an Ed25519 public key.
    pub fn ed25519(public: &[u8; 32]) -> Key {
        Key { keytype: "ed25519".into(), scheme: "ed25519".into(), keyval: KeyVal { public: hex::encode(public) } }
    }

    /// The key id: hex SHA-256 of the key object's canonical JSON (as TUF computes it).
    pub fn key_id(&self) -> String {
        crate::hash::sha256_hex(&crate::canonical::to_vec(self).expect("keys encode"))
    }

    fn verifying_key(&self) -> Option<ed25519_dalek::VerifyingKey> {
        if self.keytype != "ed25519" || self.scheme != "ed25519" {
            return None;
        }
        let bytes: [u8; 32] = hex::decode(&self.keyval.public).ok()?.try_into().ok()?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()
    }

    /// Whether `sig` is this key's signature of `msg`.
    pub fn verifies(&self, msg: &[u8], sig: &[u8]) -> bool {
        let (Some(k), Ok(sig)) = (self.verifying_key(), ed25519_dalek::Signature::from_slice(sig)) else {
            return false;
        };
        k.verify(msg, &sig).is_ok()
    }
}

/// An Ed25519 secret key with its id. Its text form is the hex of the 32-byte seed.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.key_id())
    }
}

impl SigningKey {
    /// The key with this seed (RFC 8032 secret key). Randomness is the caller's.
    pub fn from_seed(seed: [u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Parses the text form (hex seed, surrounding white space ignored).
    pub fn from_text(s: &str) -> Result<SigningKey, TrustError> {
        let bytes = hex::decode(s.trim()).map_err(|e| TrustError::BadKey(e.to_string()))?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| TrustError::BadKey("a key is 32 bytes".into()))?;
        Ok(SigningKey::from_seed(seed))
    }

    /// The text form, newline-terminated.
    pub fn to_text(&self) -> String {
        format!("{}\n", hex::encode(self.0.to_bytes()))
    }

    /// The public key.
    pub fn public(&self) -> Key {
        Key::ed25519(self.0.verifying_key().as_bytes())
    }

    /// The key id.
    pub fn key_id(&self) -> String {
        self.public().key_id()
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

/// A role: which keys, and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Key ids.
    pub keyids: Vec<String>,
    /// Signatures needed.
    pub threshold: u32,
}

/// The signed part of a root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RootSigned {
    /// `root`.
    #[serde(rename = "_type")]
    pub type_: String,
    /// `1.0.0`.
    pub spec_version: String,
    /// Starts at 1; each rotation adds 1.
    pub version: u64,
    /// Expiry, RFC 3339.
    pub expires: String,
    /// Keys by id.
    pub keys: BTreeMap<String, Key>,
    /// Roles by name: `root` and `bundle`.
    pub roles: BTreeMap<String, Role>,
    /// Always false (TUF field).
    pub consistent_snapshot: bool,
}

/// A signature of a root, hex as TUF writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RootSignature {
    /// The key id (a hint).
    pub keyid: String,
    /// Hex Ed25519 signature over the canonical JSON of `signed`.
    pub sig: String,
}

/// A trust root (`root.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// What is signed.
    pub signed: RootSigned,
    /// Signatures.
    pub signatures: Vec<RootSignature>,
}

impl RootSigned {
    /// A root naming `root_keys` and `bundle_keys` with their thresholds.
    pub fn new(version: u64, expires: &str, root: (&[Key], u32), bundle: (&[Key], u32)) -> RootSigned {
        let mut keys = BTreeMap::new();
        let mut role = |ks: &[Key], threshold: u32| {
            let mut ids: Vec<String> = ks.iter().map(Key::key_id).collect();
            ids.sort();
            ids.dedup();
            for k in ks {
                keys.insert(k.key_id(), k.clone());
            }
            Role { keyids: ids, threshold }
        };
        let roles = BTreeMap::from([
            (ROOT_ROLE.to_string(), role(root.0, root.1)),
            (BUNDLE_ROLE.to_string(), role(bundle.0, bundle.1)),
        ]);
        RootSigned {
            type_: "root".into(),
            spec_version: "1.0.0".into(),
            version,
            expires: expires.to_string(),
            keys,
            roles,
            consistent_snapshot: false,
        }
    }

    /// The bytes root signatures are over.
    pub fn signing_bytes(&self) -> Vec<u8> {
        crate::canonical::to_vec(self).expect("roots encode")
    }

    /// Checks that signatures `(keyid hint, signature bytes)` over `msg` meet `role`'s threshold;
    /// returns the distinct key ids that counted.
    pub fn verify_role<'a>(
        &self,
        role: &str,
        msg: &[u8],
        sigs: impl IntoIterator<Item = (&'a str, Vec<u8>)>,
    ) -> Result<Vec<String>, TrustError> {
        let r = self.roles.get(role).ok_or_else(|| TrustError::NoRole { version: self.version, role: role.into() })?;
        if r.threshold == 0 {
            return Err(TrustError::Invalid {
                version: self.version,
                reason: format!("role {role:?} has threshold 0"),
            });
        }
        let role_keys: Vec<(&String, &Key)> =
            r.keyids.iter().filter_map(|id| self.keys.get(id).filter(|k| &k.key_id() == id).map(|k| (id, k))).collect();
        let mut counted = BTreeSet::new();
        for (hint, sig) in sigs {
            let hinted = role_keys.iter().filter(|(id, _)| id.as_str() == hint);
            let others = role_keys.iter().filter(|(id, _)| id.as_str() != hint);
            if let Some((id, _)) = hinted.chain(others).find(|(_, k)| k.verifies(msg, &sig)) {
                counted.insert((*id).clone());
            }
        }
        let keys: Vec<String> = counted.into_iter().collect();
        if keys.len() < r.threshold as usize {
            return Err(TrustError::Threshold {
                version: self.version,
                role: role.into(),
                threshold: r.threshold,
                found: keys.len(),
                keys,
            });
        }
        Ok(keys)
    }

    /// The expiry instant.
    pub fn expires_at(&self) -> Result<Timestamp, TrustError> {
        Timestamp::parse(&self.expires)
            .map_err(|e| TrustError::Invalid { version: self.version, reason: e.to_string() })
    }
}

impl Root {
    /// Signs `signed` with each key.
    pub fn sign(signed: RootSigned, keys: &[SigningKey]) -> Root {
        let mut root = Root { signed, signatures: Vec::new() };
        for k in keys {
            root.add_signature(k);
        }
        root
    }

    /// Adds (or replaces) one key's signature.
    pub fn add_signature(&mut self, key: &SigningKey) {
        let id = key.key_id();
        self.signatures.retain(|s| s.keyid != id);
        self.signatures.push(RootSignature { keyid: id, sig: hex::encode(key.sign(&self.signed.signing_bytes())) });
        self.signatures.sort_by(|a, b| a.keyid.cmp(&b.keyid));
    }

    /// Checks this root's signatures against `by`'s root role (itself, or its predecessor).
    pub fn verify_signed_by(&self, by: &RootSigned) -> Result<Vec<String>, TrustError> {
        let msg = self.signed.signing_bytes();
        by.verify_role(
            ROOT_ROLE,
            &msg,
            self.signatures.iter().map(|s| (s.keyid.as_str(), hex::decode(&s.sig).unwrap_or_default())),
        )
    }

    /// Checks the root is signed by a threshold of its own root keys and is well-formed.
    pub fn verify_self(&self) -> Result<(), TrustError> {
        if self.signed.type_ != "root" {
            return Err(TrustError::Invalid {
                version: self.signed.version,
                reason: format!("_type {:?}", self.signed.type_),
            });
        }
        self.signed.expires_at()?;
        self.verify_signed_by(&self.signed).map(|_| ())
    }
}

/// Checks one rotation (tuf-spec §5.3.4–5.3.5): version exactly +1, signed by a threshold of the
/// old root's root keys and of the new root's own.
pub fn verify_rotation(old: &Root, new: &Root) -> Result<(), TrustError> {
    if new.signed.version != old.signed.version + 1 {
        return Err(TrustError::VersionSkip { old: old.signed.version, new: new.signed.version });
    }
    new.verify_signed_by(&old.signed)?;
    new.verify_self()
}

/// Walks from a trusted root through newer roots; returns the newest. The trusted root itself
/// must be self-signed.
pub fn verify_chain(trusted: &Root, chain: &[Root]) -> Result<Root, TrustError> {
    trusted.verify_self()?;
    let mut cur = trusted;
    for next in chain {
        verify_rotation(cur, next)?;
        cur = next;
    }
    Ok(cur.clone())
}

/// Checks a root has not expired at `at`.
pub fn check_expiry(root: &Root, at: Timestamp) -> Result<(), TrustError> {
    let exp = root.signed.expires_at()?;
    if exp <= at {
        return Err(TrustError::Expired { version: root.signed.version, expires: root.signed.expires.clone(), at });
    }
    Ok(())
}

/// Checks a DSSE envelope's signatures against `role` of `root`; returns the key ids counted.
pub fn verify_envelope(env: &Envelope, root: &Root, role: &str) -> Result<Vec<String>, TrustError> {
    use base64::Engine;
    let msg = env.pae().map_err(|e| TrustError::Invalid { version: root.signed.version, reason: e.to_string() })?;
    let b64 = base64::engine::general_purpose::STANDARD;
    root.signed.verify_role(
        role,
        &msg,
        env.signatures.iter().map(|s| (s.keyid.as_str(), b64.decode(&s.sig).unwrap_or_default())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed([n; 32])
    }

    /// RFC 8032 §7.1 test vectors: secret key → public key and signature.
    #[test]
    fn rfc8032_ed25519_vectors() {
        let cases = [
            (
                "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
                "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                "",
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
            ),
            (
                "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
                "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
                "72",
                "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
            ),
            (
                "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
                "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
                "af82",
                "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
            ),
        ];
        for (sk, pk, msg, sig) in cases {
            let k = SigningKey::from_text(sk).unwrap();
            assert_eq!(k.public().keyval.public, pk);
            let msg = hex::decode(msg).unwrap();
            assert_eq!(hex::encode(k.sign(&msg)), sig);
            assert!(k.public().verifies(&msg, &hex::decode(sig).unwrap()));
            assert!(!k.public().verifies(b"other", &hex::decode(sig).unwrap()));
        }
    }

    fn root(version: u64, root_keys: &[&SigningKey], threshold: u32, signers: &[&SigningKey]) -> Root {
        let pubs: Vec<Key> = root_keys.iter().map(|k| k.public()).collect();
        let signed = RootSigned::new(version, "2030-01-01T00:00:00Z", (&pubs, threshold), (&pubs, 1));
        Root::sign(signed, &signers.iter().map(|k| (*k).clone()).collect::<Vec<_>>())
    }

    #[test]
    fn thresholds_count_distinct_role_keys_only() {
        let (a, b, c, x) = (key(1), key(2), key(3), key(9));
        assert!(root(1, &[&a, &b, &c], 2, &[&a, &b]).verify_self().is_ok());
        let one = root(1, &[&a, &b, &c], 2, &[&a]);
        assert!(matches!(one.verify_self(), Err(TrustError::Threshold { found: 1, .. })));
        // The same key's signature twice counts once.
        let mut dup = one.clone();
        dup.signatures.push(dup.signatures[0].clone());
        assert!(matches!(dup.verify_self(), Err(TrustError::Threshold { found: 1, .. })));
        // A signature by a key outside the role is ignored, even hinted as a role key.
        let mut outsider = root(1, &[&a, &b, &c], 2, &[&a, &x]);
        assert!(outsider.verify_self().is_err());
        outsider.signatures[1].keyid = b.key_id();
        assert!(outsider.verify_self().is_err());
        // A wrong hint does not hide a valid signature, nor count a key twice.
        let mut hinted = root(1, &[&a, &b, &c], 2, &[&a, &b]);
        for s in &mut hinted.signatures {
            s.keyid = "nonsense".into();
        }
        assert!(hinted.verify_self().is_ok());
        // Tampering with `signed` invalidates every signature.
        let mut t = root(1, &[&a, &b, &c], 2, &[&a, &b]);
        t.signed.expires = "2099-01-01T00:00:00Z".into();
        assert!(t.verify_self().is_err());
    }

    #[test]
    fn rotation_needs_old_and_new_thresholds_and_the_next_version() {
        let (a, b, c) = (key(1), key(2), key(3));
        let v1 = root(1, &[&a], 1, &[&a]);
        let v2 = root(2, &[&b], 1, &[&a, &b]);
        assert!(verify_rotation(&v1, &v2).is_ok());
        assert_eq!(verify_chain(&v1, std::slice::from_ref(&v2)).unwrap().signed.version, 2);
        let only_new = root(2, &[&b], 1, &[&b]);
        assert!(matches!(verify_rotation(&v1, &only_new), Err(TrustError::Threshold { .. })));
        let only_old = root(2, &[&b], 1, &[&a]);
        assert!(matches!(verify_rotation(&v1, &only_old), Err(TrustError::Threshold { .. })));
        let skip = root(3, &[&c], 1, &[&a, &c]);
        assert!(matches!(verify_rotation(&v1, &skip), Err(TrustError::VersionSkip { old: 1, new: 3 })));
        assert!(verify_chain(&v1, &[skip]).is_err());
    }

    #[test]
    fn expiry_is_judged_at_the_given_instant() {
        let a = key(1);
        let r = root(1, &[&a], 1, &[&a]);
        assert!(check_expiry(&r, Timestamp::parse("2029-12-31T23:59:59Z").unwrap()).is_ok());
        assert!(matches!(
            check_expiry(&r, Timestamp::parse("2030-01-01T00:00:00Z").unwrap()),
            Err(TrustError::Expired { .. })
        ));
    }

    #[test]
    fn envelopes_verify_against_the_bundle_role() {
        let (a, b) = (key(1), key(2));
        let pubs = [a.public()];
        let bundle = [b.public()];
        let r =
            Root::sign(RootSigned::new(1, "2030-01-01T00:00:00Z", (&pubs, 1), (&bundle, 1)), std::slice::from_ref(&a));
        let env = Envelope::sign("t", b"m", std::slice::from_ref(&b));
        assert_eq!(verify_envelope(&env, &r, BUNDLE_ROLE).unwrap(), vec![b.key_id()]);
        // A root key is not a bundle key.
        let env = Envelope::sign("t", b"m", &[a]);
        assert!(verify_envelope(&env, &r, BUNDLE_ROLE).is_err());
    }
}
