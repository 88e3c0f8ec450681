//! Raw bytes as a bundle, verified against the fixture trust root: `orch_verify::verify` never
//! panics, its report is coherent, and it passes only an archive that holds the genuine export
//! (the oracle of `tests/tests/bundle_fuzz.rs`, `orch_fuzz::oracle::bundle::check_verdict`; bytes
//! from anywhere may carry a manifest the trusted key re-signed). Seeded with the golden bundle and
//! the named bad cases of `fixtures/bundles/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orch_fuzz::bundle::{check_verdict, golden, opts};

fuzz_target!(|data: &[u8]| {
    let _ = golden();
    let report = orch_verify::verify(data, opts());
    check_verdict(data, &report, true);
});
