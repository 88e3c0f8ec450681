//! What the time flags (`orch-verify --now/--max-age`, `orchd import --max-age`) must mean, for
//! `tests/tests/time_flags_fuzz.rs` and the fuzz target `duration`: an age of `<n><unit>` in
//! humantime's units, computed here in nanoseconds without overflow (and refused where humantime's
//! own arithmetic overflows), and when a bundle is stale.

use orch_core::Timestamp;

/// A second in nanoseconds.
pub const SECOND: u128 = 1_000_000_000;

/// humantime's units and their length in nanoseconds (a month is 30.44 days, a year 365.25).
pub const UNITS: [(&str, u128); 10] = [
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

/// `n` units of `unit_ns` nanoseconds each, in nanoseconds; `None` where humantime's arithmetic
/// overflows (it counts units below a second in u64 nanoseconds, the others in u64 seconds).
pub fn age_ns(n: u128, unit_ns: u128) -> Option<u128> {
    let total = n.checked_mul(unit_ns)?;
    let fits = if unit_ns < SECOND { total <= u128::from(u64::MAX) } else { total / SECOND <= u128::from(u64::MAX) };
    fits.then_some(total)
}

/// `<digits><unit>` (up to 30 digits) read by hand: `None` for any other text, `Some(None)` where
/// it overflows ([`age_ns`]).
pub fn read_age(s: &str) -> Option<Option<u128>> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    let unit_ns = UNITS.iter().find(|(u, _)| *u == unit)?.1;
    let n: u128 = n.parse().ok().filter(|_| digits <= 30)?;
    Some(age_ns(n, unit_ns))
}

/// Whether a bundle anchored at `anchor` is stale at `now` when `max_age_ms` is allowed: more than
/// that past its anchor.
pub fn is_stale(now: Timestamp, anchor: Timestamp, max_age_ms: u128) -> bool {
    let age_ms = i128::from(now.as_millis()) - i128::from(anchor.as_millis());
    age_ms > i128::try_from(max_age_ms).unwrap_or(i128::MAX)
}
