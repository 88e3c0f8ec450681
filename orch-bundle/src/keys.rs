//! Key, root and manifest files as the CLI reads and writes them.

use std::path::Path;

use anyhow::{bail, Context};
use orch_core::bundle::{self, Manifest, PreviousBundle};
use orch_core::dsse::Envelope;
use orch_core::trust::{Key, Root, RootSigned, SigningKey, BUNDLE_ROLE, ROOT_ROLE};
use orch_core::{Clock, Timestamp};

/// A clock for tools that only read a ledger: they never need "now".
#[derive(Debug, Clone, Copy)]
pub struct NoClock;

impl Clock for NoClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(0)
    }
}

/// Reads a secret key file (hex seed).
pub fn read_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    SigningKey::from_text(&text).with_context(|| format!("{}", path.display()))
}

/// The public key file content: the TUF key object, pretty JSON.
pub fn public_key_file(key: &SigningKey) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(&key.public()).expect("keys encode");
    s.push('\n');
    s.into_bytes()
}

/// Reads a public key file.
pub fn read_public_key(path: &Path) -> anyhow::Result<Key> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a public key file", path.display()))
}

/// Reads a root file.
pub fn read_root(path: &Path) -> anyhow::Result<Root> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a root.json", path.display()))
}

/// A root file's content: pretty JSON (signatures are over the canonical form of `signed`).
pub fn root_file(root: &Root) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(root).expect("roots encode");
    s.push('\n');
    s.into_bytes()
}

fn check_threshold(role: &str, keys: &[Key], threshold: u32) -> anyhow::Result<()> {
    if threshold == 0 || threshold as usize > keys.len() {
        bail!("{role} threshold must be between 1 and the number of {role} keys ({}), got {threshold}", keys.len());
    }
    Ok(())
}

/// A new unsigned root.
pub fn new_root(
    version: u64,
    expires: &str,
    root_keys: &[Key],
    root_threshold: u32,
    bundle_keys: &[Key],
    bundle_threshold: u32,
) -> anyhow::Result<Root> {
    Timestamp::parse(expires).context("--expires")?;
    check_threshold(ROOT_ROLE, root_keys, root_threshold)?;
    check_threshold(BUNDLE_ROLE, bundle_keys, bundle_threshold)?;
    let signed = RootSigned::new(version, expires, (root_keys, root_threshold), (bundle_keys, bundle_threshold));
    Ok(Root { signed, signatures: Vec::new() })
}

/// The next version of a root, with roles replaced where asked.
pub fn next_root(
    old: &Root,
    root_keys: &[Key],
    root_threshold: Option<u32>,
    bundle_keys: &[Key],
    bundle_threshold: Option<u32>,
    expires: Option<&str>,
) -> anyhow::Result<Root> {
    let keys_of = |role: &str| -> Vec<Key> {
        old.signed
            .roles
            .get(role)
            .map_or(Vec::new(), |r| r.keyids.iter().filter_map(|id| old.signed.keys.get(id).cloned()).collect())
    };
    let threshold_of = |role: &str| old.signed.roles.get(role).map_or(1, |r| r.threshold);
    let rk = if root_keys.is_empty() { keys_of(ROOT_ROLE) } else { root_keys.to_vec() };
    let bk = if bundle_keys.is_empty() { keys_of(BUNDLE_ROLE) } else { bundle_keys.to_vec() };
    new_root(
        old.signed.version + 1,
        expires.unwrap_or(&old.signed.expires),
        &rk,
        root_threshold.unwrap_or(threshold_of(ROOT_ROLE)),
        &bk,
        bundle_threshold.unwrap_or(threshold_of(BUNDLE_ROLE)),
    )
}

/// The DSSE envelope over a manifest, as file bytes.
pub fn sign_manifest(manifest: &[u8], keys: &[SigningKey]) -> Vec<u8> {
    let env = Envelope::sign(bundle::MANIFEST_PAYLOAD_TYPE, manifest, keys);
    orch_core::canonical::to_vec(&env).expect("envelopes encode")
}

/// Reads the manifest of a bundle file (without verifying anything).
pub fn read_manifest(bundle_bytes: &[u8]) -> anyhow::Result<Manifest> {
    let dec = zstd::stream::Decoder::new(bundle_bytes).context("not a zstd stream")?;
    let mut ar = tar::Archive::new(dec);
    for entry in ar.entries().context("not a tar archive")? {
        let mut entry = entry.context("unreadable archive")?;
        if entry.path_bytes().as_ref() == bundle::MANIFEST.as_bytes() {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes)?;
            return serde_json::from_slice(&bytes).context("manifest.json is not a manifest");
        }
    }
    bail!("the archive has no manifest.json")
}

/// The link an incremental bundle records to the bundle it continues.
pub fn previous_link(path: &Path) -> anyhow::Result<PreviousBundle> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let m = read_manifest(&bytes).with_context(|| format!("{}", path.display()))?;
    let canonical = orch_core::canonical::to_vec(&m)?;
    Ok(PreviousBundle { manifest_sha256: orch_core::hash::sha256_hex(&canonical), to_seq: m.to_seq })
}
