//! Failure clusters: a worker's error class and message, sorted into the few kinds an operator
//! acts on differently (slow down, wait for upstream, fix a parser…).

use serde::{Deserialize, Serialize};

/// The kind of a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Cluster {
    /// Upstream throttling (HTTP 429, "rate limit", "too many requests").
    Http429,
    /// Upstream server errors (HTTP 5xx).
    Http5xx,
    /// Timeouts, including leases that lapsed.
    Timeout,
    /// The data did not have the expected shape.
    SchemaMismatch,
    /// The data could not be parsed at all.
    ParseError,
    /// Anything else.
    Other,
}

impl Cluster {
    /// Every cluster.
    pub const ALL: [Cluster; 6] = [
        Cluster::Http429,
        Cluster::Http5xx,
        Cluster::Timeout,
        Cluster::SchemaMismatch,
        Cluster::ParseError,
        Cluster::Other,
    ];

    /// Its name in APIs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Cluster::Http429 => "http_429",
            Cluster::Http5xx => "http_5xx",
            Cluster::Timeout => "timeout",
            Cluster::SchemaMismatch => "schema_mismatch",
            Cluster::ParseError => "parse_error",
            Cluster::Other => "other",
        }
    }
}

/// Sorts a failure by its class first (what the worker said it was), then by its message.
pub fn classify(class: &str, message: &str) -> Cluster {
    let class = class.to_ascii_lowercase();
    let message = message.to_ascii_lowercase();
    let status = |text: &str| -> Option<u16> {
        let digits: String = text
            .split(|c: char| !c.is_ascii_digit())
            .find(|d| d.len() == 3 && (d.starts_with('4') || d.starts_with('5')))?
            .to_string();
        digits.parse().ok()
    };
    let has = |text: &str, words: &[&str]| words.iter().any(|w| text.contains(w));
    for text in [&class, &message] {
        match status(text) {
            Some(429) => return Cluster::Http429,
            Some(s) if (500..600).contains(&s) => return Cluster::Http5xx,
            _ => {}
        }
        if has(text, &["rate limit", "rate_limit", "ratelimit", "too many requests", "throttl"]) {
            return Cluster::Http429;
        }
        if has(text, &["timeout", "timed out", "time out", "deadline", "lease_expired", "lease expired"]) {
            return Cluster::Timeout;
        }
        if has(text, &["schema", "missing field", "unknown field", "unexpected field", "invalid type", "validation"]) {
            return Cluster::SchemaMismatch;
        }
        if has(text, &["parse", "syntax", "malformed", "unexpected token", "invalid json", "decode", "eof while"]) {
            return Cluster::ParseError;
        }
    }
    Cluster::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_class_then_message() {
        assert_eq!(classify("http_429", ""), Cluster::Http429);
        assert_eq!(classify("upstream", "429 Too Many Requests"), Cluster::Http429);
        assert_eq!(classify("fetch", "rate limit exceeded"), Cluster::Http429);
        assert_eq!(classify("http_503", "Service Unavailable"), Cluster::Http5xx);
        assert_eq!(classify("fetch", "server answered 502"), Cluster::Http5xx);
        assert_eq!(classify("timeout", ""), Cluster::Timeout);
        assert_eq!(classify("lease_expired", ""), Cluster::Timeout);
        assert_eq!(classify("io", "operation timed out after 30s"), Cluster::Timeout);
        assert_eq!(classify("validate", "missing field `cve_id`"), Cluster::SchemaMismatch);
        assert_eq!(classify("json", "expected value at line 1 column 1: EOF while parsing"), Cluster::ParseError);
        assert_eq!(classify("bad_input", "no such feed"), Cluster::Other);
        assert_eq!(classify("http_404", "not found"), Cluster::Other, "4xx other than 429 is not a server error");
    }
}
