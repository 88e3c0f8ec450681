//! Audit bundle export: reads one consistent snapshot of a ledger, builds the bundle's files
//! (see [`orch_core::bundle`]) and packs them into a deterministic `tar.zst`.
//!
//! Determinism: canonical JSON lines; tar entries in byte order of their names, each with a
//! header built here (ustar, mode 0644, uid/gid 0, empty owner names, mtime = the bundle's time
//! anchor); one fixed zstd level, single-threaded. The same ledger and options give the same bytes.

pub mod archive;
pub mod export;
pub mod keys;

pub use export::{export, export_with_progress, ExportError, ExportOptions, Exported};
