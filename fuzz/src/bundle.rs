//! The golden bundle (`fixtures/bundles/valid`), the trust root it verifies against, and the
//! oracle of `tests/tests/bundle_fuzz.rs` applied to whatever bytes `orch_verify::verify` passed:
//! the archive, decoded here on its own, holds the genuine export — byte for byte when its
//! manifest is the genuine one, or (a manifest re-signed by the trusted key, which vouches for
//! any bytes) the same history, base and jobs and the same sequence range, tenant and chains.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::OnceLock;

use orch_core::bundle::{self, Manifest};
use orch_core::trust::{Root, SigningKey};
use orch_core::{Event, Job};
use orch_verify::{Report, VerifyOptions};
use serde_json::Value;

use crate::fixture;

/// The genuine export and what its files hold once parsed.
pub struct Golden {
    /// The bundle file.
    pub bytes: Vec<u8>,
    /// Its entries in archive order.
    pub entries: Vec<(String, Vec<u8>)>,
    /// Its files by name.
    pub files: BTreeMap<String, Vec<u8>>,
    history: Vec<Event>,
    base: Vec<Job>,
    jobs: Vec<Job>,
    manifest: Manifest,
}

/// The golden bundle, read and checked once.
pub fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let bytes = std::fs::read(fixture("bundles/valid/bundle.tar.zst")).expect("the golden bundle");
        let report = orch_verify::verify(&bytes, opts());
        assert!(report.ok, "the golden bundle verifies: {:?}", report.failures);
        let entries = decode(&bytes).expect("the golden bundle decodes");
        let entries: Vec<(String, Vec<u8>)> =
            entries.into_iter().map(|e| (String::from_utf8(e.name).unwrap(), e.content)).collect();
        let files: BTreeMap<String, Vec<u8>> = entries.iter().cloned().collect();
        assert_eq!(files.len(), bundle::ALL_FILES.len());
        let ledger = Ledger::parse(&files).expect("the golden ledger parses");
        let manifest = serde_json::from_slice(&files[bundle::MANIFEST]).unwrap();
        Golden { bytes, entries, files, history: ledger.history, base: ledger.base, jobs: ledger.jobs, manifest }
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

/// One tar entry as a reader sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The name (after GNU long-name and PAX records).
    pub name: Vec<u8>,
    /// The header's entry type.
    pub kind: tar::EntryType,
    /// The content.
    pub content: Vec<u8>,
}

/// Decodes a `tar.zst` into every entry, in order, with nothing filtered out. `None` when it is
/// not a readable archive.
pub fn decode(bytes: &[u8]) -> Option<Vec<Entry>> {
    let tar_bytes = zstd::stream::decode_all(bytes).ok()?;
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut out = Vec::new();
    for entry in archive.entries().ok()? {
        let mut entry = entry.ok()?;
        let name = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).ok()?;
        out.push(Entry { name, kind, content });
    }
    Some(out)
}

/// The parsed ledger content of a bundle.
struct Ledger {
    history: Vec<Event>,
    base: Vec<Job>,
    jobs: Vec<Job>,
}

impl Ledger {
    fn parse(files: &BTreeMap<String, Vec<u8>>) -> Option<Ledger> {
        fn lines<T>(content: &[u8], parse: impl Fn(&str) -> Option<T>) -> Option<Vec<T>> {
            std::str::from_utf8(content).ok()?.lines().map(parse).collect()
        }
        let job = |l: &str| serde_json::from_str::<Job>(l).ok();
        Some(Ledger {
            history: lines(files.get(bundle::HISTORY)?, |l| Event::from_line(l).ok())?,
            base: lines(files.get(bundle::BASE)?, job)?,
            jobs: lines(files.get(bundle::JOBS)?, job)?,
        })
    }
}

/// Checks the verdict on `bytes`: the report is coherent, and a pass means the archive holds the
/// genuine export. Panics (a fuzzer finding) otherwise.
pub fn check_verdict(bytes: &[u8], report: &Report) {
    assert_eq!(report.ok, report.failures.is_empty(), "{report:?}");
    if !report.ok {
        return;
    }
    let g = golden();
    let summary = report.summary.as_ref().expect("a passing report has a summary");
    assert_eq!(summary.root_version, 1, "no carried root may be trusted");
    assert_eq!(summary.signed_by, vec![key(2).key_id()], "signed by the bundle key only");
    let entries = decode(bytes).expect("passed an archive that does not decode");
    // Carried roots aside, exactly the seven regular files, each once.
    let data: Vec<&Entry> = entries
        .iter()
        .filter(|e| std::str::from_utf8(&e.name).map_or(true, |n| bundle::carried_root_version(n).is_none()))
        .collect();
    let mut names: Vec<&[u8]> = data.iter().map(|e| e.name.as_slice()).collect();
    names.sort();
    let expected: Vec<&[u8]> = g.files.keys().map(|n| n.as_bytes()).collect();
    assert_eq!(names, expected, "passed with other entries");
    assert!(data.iter().all(|e| e.kind == tar::EntryType::Regular), "passed a non-regular entry");
    let files: BTreeMap<String, Vec<u8>> =
        data.iter().map(|e| (String::from_utf8(e.name.clone()).unwrap(), e.content.clone())).collect();
    if files[bundle::MANIFEST] == g.files[bundle::MANIFEST] {
        // The genuine manifest: every file must be the genuine one.
        for (name, want) in &g.files {
            if name == bundle::MANIFEST_DSSE {
                // A DSSE envelope is not itself signed (its payload, manifest.json, is): the same
                // JSON written with other white space or member order is the same envelope.
                let json = |b: &[u8]| serde_json::from_slice::<Value>(b).ok();
                assert!(json(&files[name]) == json(want), "passed with another envelope");
            } else {
                assert!(files[name] == *want, "passed with a changed {name}");
            }
        }
        return;
    }
    // Another manifest, signed by the trusted key: the signer vouches for the bytes, but not for a
    // ledger that does not hold together. It must be the genuine one.
    let ledger = Ledger::parse(&files).expect("passed with unparsable ledger files");
    assert!(ledger.history == g.history, "passed with another history");
    assert!(ledger.base == g.base, "passed with another base");
    assert!(ledger.jobs == g.jobs, "passed with other jobs");
    let m: Manifest = serde_json::from_slice(&files[bundle::MANIFEST]).expect("passed an unreadable manifest");
    assert_eq!(
        (&m.tenant, m.from_seq, m.to_seq, &m.chains),
        (&g.manifest.tenant, g.manifest.from_seq, g.manifest.to_seq, &g.manifest.chains),
        "passed with another range, tenant or chains"
    );
    // The signer may vouch for another instant, but not for one before the last event.
    let last = g.history.last().map(|e| e.at).unwrap();
    assert!(m.time_anchor.at >= last, "passed with anchor {} before the last event ({last})", m.time_anchor.at);
}

/// Brings the manifest up to date with the data files, the way an exporter would, and signs it
/// with test key `signer`. Files without a readable manifest are left alone.
pub fn reseal(files: &mut [(String, Vec<u8>)], signer: u8) {
    let content = |files: &[(String, Vec<u8>)], name: &str| files.iter().find(|(n, _)| n == name).map(|e| e.1.clone());
    let Some(mut m) = content(files, bundle::MANIFEST).and_then(|b| serde_json::from_slice::<Manifest>(&b).ok()) else {
        return;
    };
    for name in bundle::DATA_FILES {
        if let (Some(c), Some(e)) = (content(files, name), m.files.get_mut(name)) {
            e.sha256 = orch_core::hash::sha256_hex(&c);
            e.size = c.len() as u64;
            e.lines = c.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    let history = content(files, bundle::HISTORY).unwrap_or_default();
    let leaves: Vec<_> =
        history.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(orch_core::merkle::leaf_hash).collect();
    m.merkle.root = hex(&orch_core::merkle::root(&leaves));
    m.merkle.leaves = leaves.len() as u64;
    let manifest = orch_core::canonical::to_vec(&m).unwrap();
    let sums = bundle::sha256sums(bundle::DATA_FILES.iter().filter_map(|n| m.files.get(*n).map(|e| (*n, e))));
    let envelope = orch_bundle::keys::sign_manifest(&manifest, std::slice::from_ref(key(signer)));
    for (name, c) in files.iter_mut() {
        match name.as_str() {
            bundle::MANIFEST => *c = manifest.clone(),
            bundle::MANIFEST_DSSE => *c = envelope.clone(),
            bundle::SHA256SUMS => *c = sums.clone().into_bytes(),
            _ => {}
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes files as a ustar archive, names as given (up to 100 bytes).
pub fn pack_tar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut h = tar::Header::new_ustar();
        let n = name.len().min(100);
        h.as_mut_bytes()[..n].copy_from_slice(&name.as_bytes()[..n]);
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_793_577_600);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append(&h, content.as_slice()).unwrap();
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
