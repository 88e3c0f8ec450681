//! Reading a bundle archive: zstd-decoded once, tar entries checked for shape as they stream by.

use std::collections::BTreeMap;
use std::io::Read;

use orch_core::bundle::ALL_FILES;

/// The largest bundle (decompressed) this verifier reads: 16 GiB.
const MAX_TOTAL: u64 = 16 << 30;
/// The most memory reserved ahead for one entry (see [`read`]).
const RESERVE_MAX: u64 = 1 << 30;

/// The entries of a bundle, by name, and what was wrong with its shape.
#[derive(Debug, Default)]
pub struct Entries {
    /// Content of each expected entry that was present.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Trust roots carried in the bundle (`roots/<N>.root.json`), by version.
    pub roots: BTreeMap<u64, Vec<u8>>,
    /// Shape problems: (entry, message).
    pub problems: Vec<(String, String)>,
}

/// Reads a `tar.zst`. `Err` means the bytes are not a readable archive at all.
pub fn read(bytes: &[u8]) -> Result<Entries, String> {
    let dec = zstd::stream::Decoder::new(bytes).map_err(|e| format!("not zstd: {e}"))?;
    let mut tar = tar::Archive::new(dec.take(MAX_TOTAL));
    let mut out = Entries::default();
    let entries = tar.entries().map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("unreadable archive: {e}"))?;
        let path = entry.path_bytes();
        let name = String::from_utf8_lossy(&path).into_owned();
        let carried = orch_core::bundle::carried_root_version(&name);
        if !ALL_FILES.contains(&name.as_str()) && carried.is_none() {
            let why = if name.contains("..") || name.starts_with('/') {
                "path escapes the bundle"
            } else {
                "unexpected entry"
            };
            out.problems.push((name, why.into()));
            continue;
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            out.problems.push((name, "not a regular file".into()));
            continue;
        }
        // The header's size, up to RESERVE_MAX, is reserved at once, so that a large history is
        // not copied as it grows. It is only a claim (a 1 KiB archive may declare a 1 TiB
        // entry): what cannot be reserved is not, memory beyond it grows with what is actually
        // read, and what is reserved but not read is never touched.
        let mut content = Vec::new();
        let _ = content.try_reserve_exact(entry.size().min(RESERVE_MAX) as usize);
        entry.read_to_end(&mut content).map_err(|e| format!("unreadable entry {name}: {e}"))?;
        if let Some(version) = carried {
            if out.roots.insert(version, content).is_some() {
                out.problems.push((name, "duplicate entry".into()));
            }
            continue;
        }
        if out.files.insert(name.clone(), content).is_some() {
            out.problems.push((name, "duplicate entry".into()));
        }
    }
    // Reading to the end also checks the zstd frame checksum.
    let mut rest = Vec::new();
    tar.into_inner().read_to_end(&mut rest).map_err(|e| format!("corrupt compressed stream: {e}"))?;
    for name in ALL_FILES {
        if !out.files.contains_key(name) {
            out.problems.push((name.to_string(), "missing entry".into()));
        }
    }
    Ok(out)
}
