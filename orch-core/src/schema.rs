//! JSON Schemas of the bundle's files, generated from the types that write and read them (so
//! they cannot drift); `schemas/` holds committed copies, checked by a test.

use serde_json::Value;

fn schema<T: schemars::JsonSchema>(id: &str) -> Value {
    let mut s = serde_json::to_value(schemars::schema_for!(T)).expect("schemas encode");
    if let Some(obj) = s.as_object_mut() {
        obj.insert("$id".into(), Value::String(format!("https://orch.invalid/schemas/{id}")));
    }
    s
}

/// `(file name under schemas/, schema)` for every bundle file format.
pub fn bundle_schemas() -> Vec<(&'static str, Value)> {
    vec![
        ("history.schema.json", schema::<crate::Event>("history.schema.json")),
        ("jobs.schema.json", schema::<crate::Job>("jobs.schema.json")),
        ("manifest.schema.json", schema::<crate::bundle::Manifest>("manifest.schema.json")),
        ("throttles.schema.json", schema::<crate::throttle::ThrottleRecord>("throttles.schema.json")),
    ]
}

/// Pretty JSON with a trailing newline, as committed.
pub fn to_file_text(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("schemas encode");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed schemas equal the generated ones. `ORCH_UPDATE_SCHEMAS=1` rewrites them.
    #[test]
    fn committed_schemas_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        for (name, s) in bundle_schemas() {
            let path = dir.join(name);
            let want = to_file_text(&s);
            if std::env::var_os("ORCH_UPDATE_SCHEMAS").is_some() {
                std::fs::write(&path, &want).unwrap();
            }
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(have == want, "{} is stale: run ORCH_UPDATE_SCHEMAS=1 cargo test -p orch-core", path.display());
        }
    }
}
