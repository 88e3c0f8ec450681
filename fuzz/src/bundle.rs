//! The golden bundle (`fixtures/bundles/valid`), the trust root it verifies against and the test
//! keys, for the bundle targets; the oracle of `tests/tests/bundle_fuzz.rs`
//! ([`oracle::bundle`], the same file) applied to them; and raw tar writing for byte edits.

use std::sync::OnceLock;

use orch_core::trust::{Root, SigningKey};
use orch_verify::{Report, VerifyOptions};

use crate::oracle::bundle::Genuine;
use crate::{fixture, oracle};

/// The golden bundle, read and checked once.
pub fn golden() -> &'static Genuine {
    static G: OnceLock<Genuine> = OnceLock::new();
    G.get_or_init(|| {
        let bytes = std::fs::read(fixture("bundles/valid/bundle.tar.zst")).expect("the golden bundle");
        Genuine::new(bytes, opts(), key(2))
    })
}

/// The fixture trust root (`fixtures/bundles/root.json`: key 2 signs bundles), no staleness check.
pub fn opts() -> &'static VerifyOptions {
    static O: OnceLock<VerifyOptions> = OnceLock::new();
    O.get_or_init(|| {
        let root: Root = serde_json::from_slice(&std::fs::read(fixture("bundles/root.json")).unwrap()).unwrap();
        VerifyOptions { root, root_chain: Vec::new(), now: None, max_age_ms: None }
    })
}

/// Test key `n` (`fixtures/keys/test-<n>.key`): 2 is the root's bundle key, 3 is trusted by nobody.
pub fn key(n: u8) -> &'static SigningKey {
    static K: OnceLock<[SigningKey; 2]> = OnceLock::new();
    let keys = K.get_or_init(|| {
        let read = |n: u8| {
            let text = std::fs::read_to_string(fixture(&format!("keys/test-{n}.key"))).unwrap();
            SigningKey::from_text(text.trim()).unwrap()
        };
        [read(2), read(3)]
    });
    &keys[usize::from(n == 3)]
}

/// Checks the verdict on `bytes` with the shared oracle ([`oracle::bundle::check_verdict`]):
/// panics (a finding) unless the report is coherent and a pass means the archive holds the golden
/// export. `resigned`: whether the trusted key may have signed another manifest.
pub fn check_verdict(bytes: &[u8], report: &Report, resigned: bool) {
    crate::holds(oracle::bundle::check_verdict(golden(), bytes, report, resigned));
}

/// Brings the manifest up to date with the data files and signs it with test key `signer`
/// ([`oracle::bundle::reseal`]).
pub fn reseal(files: &mut [(String, Vec<u8>)], signer: u8) {
    oracle::bundle::reseal(files.iter_mut().map(|(name, content)| (name.as_bytes(), content)), key(signer));
}

/// Writes files as a ustar archive, names as given (up to 100 bytes).
pub fn pack_tar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let header = oracle::bundle::tar_header(name.as_bytes(), tar::EntryType::Regular, content.len());
        tar.append(&header, content.as_slice()).unwrap();
    }
    tar.into_inner().unwrap()
}

/// A zstd frame around `bytes` (level 1: the verifier does not care, the fuzzer likes speed).
pub fn compress(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 1).unwrap()
}

/// Recomputes the header checksum of every header a tar reader would visit, so that byte edits
/// of a header reach the checks behind the checksum.
pub fn fix_tar_checksums(tar: &mut [u8]) {
    let mut at = 0usize;
    while at + 512 <= tar.len() {
        let block = &mut tar[at..at + 512];
        if block.iter().all(|&b| b == 0) {
            return;
        }
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        let text = format!("{sum:06o}\0 ");
        block[148..156].copy_from_slice(&text.as_bytes()[..8]);
        let size = std::str::from_utf8(&block[124..136])
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok())
            .unwrap_or(0);
        let Some(next) = size.div_ceil(512).checked_mul(512).and_then(|s| s.checked_add(at as u64 + 512)) else {
            return;
        };
        at = usize::try_from(next).unwrap_or(usize::MAX);
    }
}
