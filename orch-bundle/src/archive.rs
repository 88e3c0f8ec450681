//! Deterministic `tar.zst` packing.

use std::io::Write;

/// The zstd level every bundle is written with (see docs/bundle-format.md for the measurement
/// behind the choice).
pub const ZSTD_LEVEL: i32 = 3;

/// Packs `(name, content)` entries, which must be sorted by name, into a `tar.zst`.
pub fn pack(entries: &[(&str, &[u8])], mtime_secs: u64) -> std::io::Result<Vec<u8>> {
    debug_assert!(entries.windows(2).all(|w| w[0].0 < w[1].0), "entries sorted");
    let mut tar = tar::Builder::new(Vec::new());
    for (name, content) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_path(name)?;
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_username("")?;
        h.set_groupname("")?;
        h.set_mtime(mtime_secs);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append(&h, *content)?;
    }
    let tar = tar.into_inner()?;
    let mut enc = zstd::stream::Encoder::new(Vec::with_capacity(tar.len() / 4), ZSTD_LEVEL)?;
    enc.include_checksum(true)?;
    enc.set_pledged_src_size(Some(tar.len() as u64))?;
    enc.write_all(&tar)?;
    enc.finish()
}

/// The zstd library version, as recorded in manifests.
pub fn zstd_version() -> String {
    let v = zstd::zstd_safe::version_number();
    format!("{}.{}.{}", v / 10_000, v / 100 % 100, v % 100)
}
