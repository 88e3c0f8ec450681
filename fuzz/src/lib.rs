//! What the fuzz targets share: the golden bundle and the oracle that says what a passing verdict
//! promises, an in-process daemon to send requests to, and the JWT test keys. Everything is
//! built once per process (`OnceLock`) and reused by every input.

pub mod bundle;
pub mod site;

use std::path::PathBuf;

/// `fixtures/<rel>` of the repository.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(rel)
}

/// Whether `code` looks like a stable error code: a non-empty snake_case ASCII word.
pub fn is_stable_code(code: &str) -> bool {
    code.starts_with(|c: char| c.is_ascii_lowercase())
        && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
