//! Test oracles that the cargo-fuzz targets share: what a verdict or an answer must be, written
//! once. `fuzz/src/lib.rs` compiles this very directory again (`#[path]`) instead of depending on
//! this package, whose browser, NATS and PostgreSQL clients would otherwise be built with sanitizer
//! instrumentation. So the modules here use only crates both sides have (orch-core, orch-verify,
//! orch-bundle, serde_json, tar, zstd) and name nothing else of this package; panics and `Err`s are
//! findings, which the property tests turn into failures and the fuzz targets into crashes.

pub mod bundle;
pub mod time_flags;
