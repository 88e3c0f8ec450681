//! The time flags of `orch-verify --now/--max-age` and `orchd import --max-age`, as `NOW\nMAX_AGE`.
//! `Timestamp::parse` agrees with chrono's RFC 3339 reading (within the years 0000-9999) and its
//! text reads back as the same instant; `orch_verify::parse_max_age` never panics, reads `<n><unit>`
//! exactly as humantime's units say (refusing what overflows), and its duration survives
//! humantime's formatting; and the golden bundle is stale exactly when `now` is more than the
//! allowed age past its anchor. The units and staleness are `tests/tests/time_flags_fuzz.rs`'s
//! (`orch_fuzz::oracle::time_flags`, the same file).
#![no_main]

use libfuzzer_sys::fuzz_target;
use orch_core::Timestamp;
use orch_fuzz::bundle::{golden, opts};
use orch_fuzz::oracle::time_flags::{is_stale, read_age};

/// What chrono says `s` is, within the canonical years.
fn reference(s: &str) -> Option<i64> {
    let ms = chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_millis();
    (-62_167_219_200_000..=253_402_300_799_999).contains(&ms).then_some(ms)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (now_text, age_text) = text.split_once('\n').unwrap_or((text, ""));

    let now = Timestamp::parse(now_text);
    assert_eq!(now.as_ref().ok().map(|t| t.as_millis()), reference(now_text), "{now_text:?}: {now:?}");
    if let Ok(t) = now {
        let shown = t.to_string();
        assert_eq!(shown.len(), 24, "{shown}");
        assert_eq!(Timestamp::parse(&shown).ok(), Some(t), "{shown} reads back");
    }

    let age = orch_verify::parse_max_age(age_text);
    if let Some(expected) = read_age(age_text) {
        let expected_ms = expected.map(|ns| u64::try_from(ns / 1_000_000).unwrap_or(u64::MAX));
        assert_eq!(age.as_ref().ok().copied(), expected_ms, "{age_text:?}: {age:?}");
    }
    if let Ok(d) = humantime::parse_duration(age_text) {
        assert_eq!(humantime::parse_duration(&humantime::format_duration(d).to_string()).ok(), Some(d));
    }

    if let (Ok(now), Ok(max)) = (now, age) {
        let g = golden();
        let mut o = opts().clone();
        (o.now, o.max_age_ms) = (Some(now), Some(max));
        let report = orch_verify::verify(&g.bytes, &o);
        let anchor = report.summary.as_ref().expect("the golden bundle reads").anchor;
        let stale = is_stale(now, anchor, u128::from(max));
        assert_eq!(!report.ok, stale, "now {now}, max age {max} ms, anchor {anchor}: {:?}", report.failures);
        assert!(report.failures.iter().all(|f| f.check == "anchor"), "{:?}", report.failures);
    }
});
