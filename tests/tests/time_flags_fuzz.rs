//! The time flags of `orch-verify` with arbitrary text and with durations of every size:
//! `--now` (RFC 3339) and `--max-age` (a humantime duration such as `30d`), against the golden
//! bundle. The binary never panics; text it cannot read is a usage error (exit 2, one line on
//! stderr); otherwise the bundle is stale (exit 1, `FAIL anchor`) exactly when `now` is more
//! than the allowed age past its anchor, computed in nanoseconds without overflow
//! (`orch_e2e::oracle::time_flags`, which the fuzz target `duration` holds the library to too).

use std::path::{Path, PathBuf};

use orch_core::Timestamp;
use orch_e2e::oracle::time_flags::{age_ns, is_stale, UNITS};
use orch_e2e::run;
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bundles")
}

/// The golden bundle's time anchor, as the library reads it.
fn anchor() -> Timestamp {
    let bytes = std::fs::read(fixtures().join("valid/bundle.tar.zst")).unwrap();
    let root = serde_json::from_slice(&std::fs::read(fixtures().join("root.json")).unwrap()).unwrap();
    let opts = orch_verify::VerifyOptions { root, root_chain: Vec::new(), now: None, max_age_ms: None };
    orch_verify::verify(&bytes, &opts).summary.unwrap().anchor
}

/// A flag value: text to pass, and what it means when it is well-formed.
#[derive(Debug, Clone)]
enum Flag<T> {
    Meaning(String, T),
    Garbage(String),
}

impl<T> Flag<T> {
    fn text(&self) -> &str {
        match self {
            Flag::Meaning(s, _) | Flag::Garbage(s) => s,
        }
    }
}

/// Arbitrary text (no NUL: it cannot be an argument) and near misses of what the flags take.
fn garbage() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| s.replace('\0', "")),
        "[0-9]{0,22}[a-zA-Z]{0,3}( [0-9]{1,3}[a-z]{0,2})?",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2})?[Zz]?",
    ]
}

/// A duration of any size: a count drawn evenly over the bit lengths of a u64, and a unit;
/// the meaning is `None` where it overflows humantime's arithmetic.
fn max_age() -> impl Strategy<Value = Flag<Option<u128>>> {
    let count = (0u32..=64, any::<u64>()).prop_map(|(bits, r)| r.checked_shr(64 - bits).unwrap_or(0));
    prop_oneof![
        4 => (count, prop::sample::select(UNITS.to_vec()))
            .prop_map(|(n, (unit, ns))| Flag::Meaning(format!("{n}{unit}"), age_ns(u128::from(n), ns))),
        1 => garbage().prop_map(Flag::Garbage),
    ]
}

/// An instant around the anchor (up to about ±550 years, within four-digit years), in its
/// canonical text or with an offset.
fn now(anchor: Timestamp) -> impl Strategy<Value = Flag<Timestamp>> {
    let delta = (0u32..=44, any::<i64>()).prop_map(|(bits, r)| r >> (63 - bits));
    prop_oneof![
        4 => (delta, any::<bool>()).prop_map(move |(d, offset)| {
            let t = anchor.plus_millis(d);
            let text = t.to_string();
            let text = if offset { text.replace('Z', "+00:00") } else { text };
            Flag::Meaning(text, t)
        }),
        1 => garbage().prop_map(Flag::Garbage),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn time_flags_are_read_exactly_or_refused((now, max_age) in now(anchor()).prop_flat_map(|n| (Just(n), max_age()))) {
        let (bundle, root) = (fixtures().join("valid/bundle.tar.zst"), fixtures().join("root.json"));
        let args = [
            bundle.to_str().unwrap().to_string(),
            format!("--root={}", root.display()),
            format!("--now={}", now.text()),
            format!("--max-age={}", max_age.text()),
        ];
        let (code, out, err) = run("orch-verify", &args.iter().map(String::as_str).collect::<Vec<_>>());
        match (&now, &max_age) {
            (Flag::Meaning(_, now), Flag::Meaning(_, Some(max_ns))) => {
                let stale = is_stale(*now, anchor(), max_ns / 1_000_000);
                prop_assert_eq!(code, if stale { 1 } else { 0 }, "{:?} {:?}: {}{}", now, max_age, out, err);
                prop_assert_eq!(out.contains("FAIL anchor"), stale, "{}", out);
            }
            (Flag::Meaning(..), Flag::Meaning(_, None)) => {
                prop_assert_eq!(code, 2, "{:?} overflows: {}{}", max_age, out, err);
                prop_assert!(err.contains("--max-age"), "{}", err);
            }
            // Random text may happen to be well-formed; whatever it means, no panic.
            _ => prop_assert!((0..=2).contains(&code), "{:?} {:?}: exit {}: {}", now, max_age, code, err),
        }
        if code == 2 {
            prop_assert_eq!(err.lines().count(), 1, "one line: {}", err);
        }
    }
}

/// Allowed ages beyond what fits in an i64 (or a u64) of milliseconds are as good as forever.
#[test]
fn huge_allowed_ages_do_not_wrap_into_tiny_ones() {
    let (bundle, root) = (fixtures().join("valid/bundle.tar.zst"), fixtures().join("root.json"));
    let now = anchor().plus_millis(1_000).to_string();
    // 9.5e18 ms (above i64::MAX), and 2^64 + 384 ms (a u64 of milliseconds wraps to 384).
    for age in ["300000000y", "18446744073709552s", "18446744073709551615s"] {
        let args = [bundle.to_str().unwrap(), "--root", root.to_str().unwrap(), "--now", &now, "--max-age", age];
        let (code, out, err) = run("orch-verify", &args);
        assert_eq!(code, 0, "--max-age {age}: {out}{err}");
    }
}
