//! The time flags of `orch-verify --now/--max-age` and `orchd import --max-age`, as `NOW\nMAX_AGE`.
//! `Timestamp::parse` agrees with chrono's RFC 3339 reading (within the years 0000-9999) and its
//! text reads back as the same instant; `orch_verify::parse_max_age` never panics, reads `<n><unit>`
//! exactly as humantime's units say (refusing what overflows), and its duration survives
//! humantime's formatting; and the golden bundle is stale exactly when `now` is more than the
//! allowed age past its anchor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orch_core::Timestamp;
use orch_fuzz::bundle::{golden, opts};

const SECOND: u128 = 1_000_000_000;
/// humantime's units and their length in nanoseconds (a month is 30.44 days, a year 365.25).
const UNITS: [(&str, u128); 10] = [
    ("ns", 1),
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", SECOND),
    ("m", 60 * SECOND),
    ("h", 3_600 * SECOND),
    ("d", 86_400 * SECOND),
    ("w", 604_800 * SECOND),
    ("M", 2_630_016 * SECOND),
    ("y", 31_557_600 * SECOND),
];

/// What chrono says `s` is, within the canonical years.
fn reference(s: &str) -> Option<i64> {
    let ms = chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_millis();
    (-62_167_219_200_000..=253_402_300_799_999).contains(&ms).then_some(ms)
}

/// `<digits><unit>` read by hand: `Some(None)` where humantime's arithmetic overflows (units below
/// a second count u64 nanoseconds, the others u64 seconds).
fn simple(s: &str) -> Option<Option<u128>> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    let ns = UNITS.iter().find(|(u, _)| *u == unit)?.1;
    let n: u128 = n.parse().ok().filter(|_| digits <= 30)?;
    let total = n.checked_mul(ns)?;
    let fits = if ns < SECOND { total <= u128::from(u64::MAX) } else { total / SECOND <= u128::from(u64::MAX) };
    Some(fits.then_some(total))
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
    if let Some(expected) = simple(age_text) {
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
        let stale = i128::from(now.as_millis()) - i128::from(anchor.as_millis()) > i128::from(max);
        assert_eq!(!report.ok, stale, "now {now}, max age {max} ms, anchor {anchor}: {:?}", report.failures);
        assert!(report.failures.iter().all(|f| f.check == "anchor"), "{:?}", report.failures);
    }
});
