//! SHA-256 as orch uses it: lowercase hex digests of artifacts and files, and the hash chain that
//! links each tenant's history events.

use sha2::{Digest, Sha256};

/// The `prev_hash` of the first event of a chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    // Into a buffer: `hex::encode` builds its string a char at a time, and every event is hashed.
    let mut text = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(bytes), &mut text).expect("64 hex digits for 32 bytes");
    String::from_utf8(text.to_vec()).expect("hex is ASCII")
}

/// Raw SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        // FIPS 180-2 example "abc".
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
