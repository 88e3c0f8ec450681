//! DSSE v1 envelopes (secure-systems-lab/dsse `protocol.md`): signatures over
//! `PAE(payloadType, payload)` so that a signature can never be reinterpreted as one over another
//! type of payload.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::trust::SigningKey;

/// Pre-Authentication Encoding: `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A signed envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Base64 (standard) of the payload.
    pub payload: String,
    /// The payload's type.
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Signatures over the PAE.
    pub signatures: Vec<Signature>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The signing key's id (a hint only).
    pub keyid: String,
    /// Base64 (standard) of the Ed25519 signature.
    pub sig: String,
}

/// A payload that is not valid base64.
#[derive(Debug, Clone, thiserror::Error)]
#[error("envelope payload is not base64: {0}")]
pub struct PayloadError(String);

impl Envelope {
    /// Signs `payload` with each key.
    pub fn sign(payload_type: &str, payload: &[u8], keys: &[SigningKey]) -> Envelope {
        let msg = pae(payload_type, payload);
        Envelope {
            payload: B64.encode(payload),
            payload_type: payload_type.to_string(),
            signatures: keys.iter().map(|k| Signature { keyid: k.key_id(), sig: B64.encode(k.sign(&msg)) }).collect(),
        }
    }

    /// The decoded payload.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, PayloadError> {
        B64.decode(&self.payload).map_err(|e| PayloadError(e.to_string()))
    }

    /// The bytes the signatures are over.
    pub fn pae(&self) -> Result<Vec<u8>, PayloadError> {
        Ok(pae(&self.payload_type, &self.payload_bytes()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_spec_example() {
        // protocol.md: PAE("http://example.com/HelloWorld", "hello world")
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn envelope_round_trips_with_spec_field_names() {
        let k = SigningKey::from_seed([7; 32]);
        let env = Envelope::sign("text/plain", b"hi", std::slice::from_ref(&k));
        let json = serde_json::to_value(&env).unwrap();
        assert!(json.get("payloadType").is_some());
        assert_eq!(json["signatures"][0]["keyid"], k.key_id());
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back.payload_bytes().unwrap(), b"hi");
    }
}
