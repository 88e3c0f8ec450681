//! What a passing bundle verdict promises, for `tests/tests/bundle_fuzz.rs` and the fuzz targets
//! `bundle_verify` and `bundle_mutate`: the archive, decoded here on its own, holds the genuine
//! export — byte for byte, or, where the trusted key may have re-signed another manifest (which
//! vouches for any bytes), the same history, base and jobs and the same sequence range, tenant
//! and chains. Also what both use to build such archives: re-sealing, to reach the checks behind
//! the signature, and raw tar headers.

use std::collections::BTreeMap;
use std::io::Read;

use orch_core::bundle::{self, Manifest};
use orch_core::trust::SigningKey;
use orch_core::{Event, Job};
use orch_verify::{Report, VerifyOptions};
use serde_json::Value;

/// Returns `Err` with the message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
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
pub struct Ledger {
    /// `history.jsonl`.
    pub history: Vec<Event>,
    /// `base.jsonl`.
    pub base: Vec<Job>,
    /// `jobs.jsonl`.
    pub jobs: Vec<Job>,
}

impl Ledger {
    /// Parses the ledger files; `None` if one is missing or a line does not parse.
    pub fn parse(files: &BTreeMap<String, Vec<u8>>) -> Option<Ledger> {
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

/// The genuine export and what its files hold once parsed.
pub struct Genuine {
    /// The bundle file.
    pub bytes: Vec<u8>,
    /// Its entries in archive order.
    pub entries: Vec<(String, Vec<u8>)>,
    /// Its files by name.
    pub files: BTreeMap<String, Vec<u8>>,
    ledger: Ledger,
    manifest: Manifest,
    signer: String,
}

impl Genuine {
    /// Reads a genuine export, which must pass `opts` signed by `signer` alone (panics otherwise).
    pub fn new(bytes: Vec<u8>, opts: &VerifyOptions, signer: &SigningKey) -> Genuine {
        let report = orch_verify::verify(&bytes, opts);
        assert!(report.ok, "the genuine bundle verifies: {:?}", report.failures);
        let signer = signer.key_id();
        assert_eq!(report.summary.map(|s| s.signed_by), Some(vec![signer.clone()]), "signed by the signer alone");
        let entries = decode(&bytes).expect("the genuine bundle decodes");
        let entries: Vec<(String, Vec<u8>)> =
            entries.into_iter().map(|e| (String::from_utf8(e.name).unwrap(), e.content)).collect();
        let files: BTreeMap<String, Vec<u8>> = entries.iter().cloned().collect();
        assert_eq!(files.len(), bundle::ALL_FILES.len());
        let ledger = Ledger::parse(&files).expect("the genuine ledger parses");
        let manifest = serde_json::from_slice(&files[bundle::MANIFEST]).unwrap();
        Genuine { bytes, entries, files, ledger, manifest, signer }
    }
}

/// Checks the verdict on the archive `bytes`: the report is coherent, and a pass means the
/// archive holds the genuine export `g`. `resigned` says whether the trusted key may have signed
/// another manifest (the archive was re-sealed with it, or comes from anywhere): then a pass
/// with another manifest needs the genuine ledger, range, tenant and chains; otherwise, and
/// whenever the manifest is the genuine one, every file must be the genuine one (the DSSE
/// envelope up to what it leaves unsigned: see below).
pub fn check_verdict(g: &Genuine, bytes: &[u8], report: &Report, resigned: bool) -> Result<(), String> {
    ensure!(report.ok == report.failures.is_empty(), "ok and failures disagree: {report:?}");
    if !report.ok {
        return Ok(());
    }
    let Some(summary) = report.summary.as_ref() else { return Err("a passing report has no summary".into()) };
    ensure!(summary.root_version == 1, "no carried root may be trusted, yet root {} was", summary.root_version);
    ensure!(summary.signed_by == [g.signer.clone()], "signed by {:?}, not the bundle key only", summary.signed_by);
    let Some(entries) = decode(bytes) else { return Err("passed an archive that does not decode".into()) };
    // Carried roots aside, exactly the seven regular files, each once.
    let data: Vec<&Entry> = entries
        .iter()
        .filter(|e| std::str::from_utf8(&e.name).map_or(true, |n| bundle::carried_root_version(n).is_none()))
        .collect();
    let mut names: Vec<&[u8]> = data.iter().map(|e| e.name.as_slice()).collect();
    names.sort();
    let expected: Vec<&[u8]> = g.files.keys().map(|n| n.as_bytes()).collect();
    ensure!(names == expected, "passed with other entries: {:?}", names.iter().map(|n| String::from_utf8_lossy(n)));
    ensure!(data.iter().all(|e| e.kind == tar::EntryType::Regular), "passed a non-regular entry");
    let files: BTreeMap<String, Vec<u8>> =
        data.iter().map(|e| (String::from_utf8(e.name.clone()).unwrap(), e.content.clone())).collect();
    if !resigned || files[bundle::MANIFEST] == g.files[bundle::MANIFEST] {
        // Signed as exported, or the genuine manifest: every file must be the genuine one.
        for (name, want) in &g.files {
            if name == bundle::MANIFEST_DSSE {
                // A DSSE envelope is not itself signed; its payload, manifest.json, is. So its
                // white space and member order are free, and so are its signatures' `keyid`s and
                // signatures other than the genuine ones: the trust rule takes a `keyid` as a hint
                // and ignores a signature that counts for no key of the role (which keys counted
                // is `signed_by`, checked above). Everything else must be the genuine envelope.
                let want = serde_json::from_slice::<Value>(want).expect("the genuine envelope is JSON");
                let sigs: Vec<Value> =
                    want["signatures"].as_array().into_iter().flatten().map(|s| s["sig"].clone()).collect();
                let normal = |mut v: Value| {
                    if let Some(list) = v.get_mut("signatures").and_then(Value::as_array_mut) {
                        list.retain(|s| sigs.contains(&s["sig"]));
                        list.iter_mut().filter_map(Value::as_object_mut).for_each(|s| drop(s.remove("keyid")));
                    }
                    v
                };
                let got = serde_json::from_slice::<Value>(&files[name]).ok().map(&normal);
                ensure!(got == Some(normal(want)), "passed with another envelope");
            } else {
                ensure!(files[name] == *want, "passed with a changed {name}");
            }
        }
        return Ok(());
    }
    // Another manifest, signed by the trusted key: the signer vouches for the bytes, but not for a
    // ledger that does not hold together. It must be the genuine one.
    let Some(ledger) = Ledger::parse(&files) else { return Err("passed with unparsable ledger files".into()) };
    ensure!(ledger.history == g.ledger.history, "passed with another history");
    ensure!(ledger.base == g.ledger.base, "passed with another base");
    ensure!(ledger.jobs == g.ledger.jobs, "passed with other jobs");
    let m: Manifest =
        serde_json::from_slice(&files[bundle::MANIFEST]).map_err(|e| format!("passed an unreadable manifest: {e}"))?;
    let gm = &g.manifest;
    ensure!(
        (&m.tenant, m.from_seq, m.to_seq, &m.chains) == (&gm.tenant, gm.from_seq, gm.to_seq, &gm.chains),
        "passed with another range, tenant or chains: {:?}",
        (&m.tenant, m.from_seq, m.to_seq, &m.chains)
    );
    // The signer may vouch for another instant, but not for one before the last event.
    let last = g.ledger.history.last().map(|e| e.at).unwrap();
    ensure!(m.time_anchor.at >= last, "passed with anchor {} before the last event ({last})", m.time_anchor.at);
    Ok(())
}

/// Re-seals an archive's `entries` (each the name a reader sees and the content, in archive
/// order) the way an exporter would: brings the manifest up to date with the last copy of each
/// data file, signs it with `signer`, and writes it, its envelope and `SHA256SUMS` into every entry
/// of those names. Entries without a readable manifest are left alone.
pub fn reseal<'a, N: AsRef<[u8]>>(entries: impl IntoIterator<Item = (N, &'a mut Vec<u8>)>, signer: &SigningKey) {
    let mut entries: Vec<(N, &mut Vec<u8>)> = entries.into_iter().collect();
    let content =
        |name: &str| entries.iter().rev().find(|(n, _)| n.as_ref() == name.as_bytes()).map(|(_, c)| c.to_vec());
    let Some(mut m) = content(bundle::MANIFEST).and_then(|b| serde_json::from_slice::<Manifest>(&b).ok()) else {
        return;
    };
    for name in bundle::DATA_FILES {
        if let (Some(c), Some(e)) = (content(name), m.files.get_mut(name)) {
            e.sha256 = orch_core::hash::sha256_hex(&c);
            e.size = c.len() as u64;
            e.lines = c.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    let history = content(bundle::HISTORY).unwrap_or_default();
    let leaves: Vec<_> =
        history.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(orch_core::merkle::leaf_hash).collect();
    m.merkle.root = orch_core::merkle::root(&leaves).iter().map(|b| format!("{b:02x}")).collect();
    m.merkle.leaves = leaves.len() as u64;
    let manifest = orch_core::canonical::to_vec(&m).unwrap();
    let sums = bundle::sha256sums(bundle::DATA_FILES.iter().filter_map(|n| m.files.get(*n).map(|e| (*n, e))));
    let envelope = orch_bundle::keys::sign_manifest(&manifest, std::slice::from_ref(signer));
    for (name, c) in &mut entries {
        match std::str::from_utf8(name.as_ref()) {
            Ok(bundle::MANIFEST) => **c = manifest.clone(),
            Ok(bundle::MANIFEST_DSSE) => **c = envelope.clone(),
            Ok(bundle::SHA256SUMS) => **c = sums.clone().into_bytes(),
            _ => {}
        }
    }
}

/// A ustar header, checksummed, for an entry of `kind` and `size` bytes named `name` (its first 100
/// bytes, as they are: unlike `orch_bundle`'s writer, this takes any name).
pub fn tar_header(name: &[u8], kind: tar::EntryType, size: usize) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    let n = name.len().min(100);
    h.as_mut_bytes()[..n].copy_from_slice(&name[..n]);
    h.set_size(size as u64);
    h.set_mode(0o644);
    h.set_mtime(1_793_491_200);
    h.set_entry_type(kind);
    h.set_cksum();
    h
}
