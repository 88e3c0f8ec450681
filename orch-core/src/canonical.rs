//! Canonical JSON: the one byte form of a JSON value that orch hashes, signs and exports.
//!
//! Object keys are sorted by their UTF-8 bytes, there is no insignificant white space, strings
//! escape only `"`, `\` and control characters (as `serde_json` and Python's
//! `json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)` both do), and
//! numbers are written as `serde_json` writes them. For values made of strings, integers, booleans,
//! arrays and objects — everything orch itself writes — this is also the canonical JSON of TUF
//! and OLPC. Key order is enforced here rather than inherited from `serde_json`'s map type, so a
//! dependency switching on `serde_json/preserve_order` cannot change a hash.

use serde::Serialize;
use serde_json::Value;

/// Errors turning a value into canonical JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CanonicalError {
    /// The value could not be represented as JSON.
    #[error("cannot encode as JSON: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The canonical bytes of any serializable value.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    let v = serde_json::to_value(value)?;
    Ok(value_to_vec(&v))
}

/// The canonical bytes of a JSON value.
pub fn value_to_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_value(&mut out, v);
    out
}

/// The canonical text of a JSON value.
pub fn value_to_string(v: &Value) -> String {
    // Only valid UTF-8 is ever written.
    String::from_utf8(value_to_vec(v)).expect("canonical JSON is UTF-8")
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match esc {
            Some(e) => out.extend_from_slice(e),
            None => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_strips_space() {
        let v = json!({"b": 1, "a": {"z": [true, null], "é": "x", "A": -3}});
        assert_eq!(value_to_string(&v), r#"{"a":{"A":-3,"z":[true,null],"é":"x"},"b":1}"#);
    }

    #[test]
    fn escapes_like_python_json_dumps() {
        let v = json!("q\"\\\n\u{1}\u{7f}/ü");
        assert_eq!(value_to_string(&v), "\"q\\\"\\\\\\n\\u0001\u{7f}/ü\"");
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Canonical bytes parse back to the same value, and re-encoding them is a fixed point.
        #[test]
        fn canonical_round_trip(v in arb_json()) {
            let bytes = value_to_vec(&v);
            let back: Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(&back, &v);
            prop_assert_eq!(value_to_vec(&back), bytes);
        }
    }
}
