//! What the fuzz targets share: the golden bundle, its trust root and the test keys ([`bundle`]),
//! the daemon's router in process ([`site`]), and the oracles of the stable property tests
//! ([`oracle`]). `oracle` and `site` are the property tests' own files, compiled here again
//! (`#[path]`): this crate cannot depend on the `orch-e2e` test package, whose browser, NATS and
//! PostgreSQL clients would be built with sanitizer instrumentation, so each oracle exists once and
//! a finding here is a failure there. Everything is built once per process (`OnceLock`) and reused
//! by every input.

pub mod bundle;

#[path = "../../tests/src/oracle/mod.rs"]
pub mod oracle;

#[path = "../../orchd/tests/support/site.rs"]
pub mod site;

use std::path::PathBuf;
use std::sync::OnceLock;

/// `fixtures/<rel>` of the repository.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(rel)
}

/// The site every input is sent to, started once per fuzzing process.
pub fn site() -> &'static site::Site {
    static S: OnceLock<site::Site> = OnceLock::new();
    S.get_or_init(site::Site::new)
}

/// Panics (a finding) with the oracle's message if `check` failed.
pub fn holds(check: Result<(), String>) {
    if let Err(why) = check {
        panic!("{why}");
    }
}
