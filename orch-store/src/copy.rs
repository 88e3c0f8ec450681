//! Moving a site's ledger from SQLite to PostgreSQL when it outgrows one machine: every row of
//! every table, as it is, in one PostgreSQL transaction. The history keeps its sequence numbers,
//! hashes and canonical lines and the site keeps its id, so bundles exported before and after
//! the move are the same bytes.

use crate::{PgStore, SqliteStore, Store, StoreError};

/// One column value, as both backends store it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// Every table of the ledger with its columns, parents before children. Both schemas have
/// exactly these (the PostgreSQL schema mirrors the SQLite one).
pub(crate) const TABLES: &[(&str, &[&str])] = &[
    ("meta", &["key", "value"]),
    ("tenants", &["id", "head_seq", "head_hash"]),
    ("projects", &["tenant", "id"]),
    ("sources", &["tenant", "id", "host", "config"]),
    ("runs", &["id", "tenant", "project", "state", "doc"]),
    (
        "jobs",
        &[
            "id",
            "tenant",
            "project",
            "queue",
            "source",
            "state",
            "priority",
            "run_after",
            "lease_id",
            "lease_expires_at",
            "idempotency_key",
            "correlation_id",
            "updated_at",
            "doc",
            "run_id",
            "last_error_class",
        ],
    ),
    ("artifacts", &["sha256", "size", "content"]),
    ("job_artifacts", &["job_id", "name", "media_type", "size", "sha256"]),
    ("dag_edges", &["parent", "child"]),
    ("quotas", &["tenant", "queue", "doc"]),
    ("schedules", &["id", "tenant", "doc"]),
    ("incidents", &["id", "tenant", "kind", "opened_at", "closed_at", "doc", "key"]),
    ("history", &["seq", "tenant", "job_id", "type", "at", "correlation_id", "hash", "line"]),
    ("throttles", &["seq", "tenant", "host", "at", "line"]),
    ("api_tokens", &["id", "tenant", "scopes", "label", "hash", "created_at", "expires_at", "revoked_at"]),
    ("idempotency", &["tenant", "key", "fingerprint", "status", "response", "created_at"]),
    (
        "import_sites",
        &["site_id", "scope", "to_seq", "manifest_sha256", "anchor_at", "root_version", "bundles", "updated_at"],
    ),
    (
        "import_bundles",
        &["manifest_sha256", "site_id", "scope", "from_seq", "to_seq", "events", "imported_at", "actor"],
    ),
    ("imported_history", &["site_id", "seq", "tenant", "job_id", "hash", "line"]),
    ("imported_jobs", &["site_id", "id", "tenant", "doc"]),
    ("imported_throttles", &["site_id", "seq", "tenant", "line"]),
    ("webhooks", &["id", "tenant", "url", "secret", "filter", "cursor", "next_at", "created_at"]),
    ("webhook_deliveries", &["webhook_id", "seq", "status", "attempts", "last_code", "last_error", "updated_at"]),
    ("publishers", &["name", "cursor"]),
    ("flow_settings", &["tenant", "kind", "id", "doc"]),
    ("schedule_state", &["tenant", "id", "last_fired", "last_job"]),
];

/// Hands every row of table `TABLES[i]` to a sink, in one read snapshot across calls.
pub(crate) type Dump<'a> =
    dyn FnMut(usize, &mut dyn FnMut(Vec<Cell>) -> Result<(), StoreError>) -> Result<(), StoreError> + 'a;

/// What a copy moved.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    /// Rows per table, in copy order.
    pub tables: Vec<(String, u64)>,
    /// The site id the ledger keeps.
    pub site_id: String,
}

/// Copies a SQLite ledger into an empty PostgreSQL ledger, all or nothing. A target that holds
/// any history or job is refused and left as it was.
pub fn copy_ledger(from: &SqliteStore, to: &PgStore) -> Result<CopyReport, StoreError> {
    let counts = from.with_dump(|dump| to.load(dump))?;
    let mut site_id = String::new();
    to.snapshot(&mut |snap| {
        site_id = snap.site_id()?;
        Ok(())
    })?;
    let tables = TABLES.iter().zip(counts).map(|((t, _), n)| (t.to_string(), n)).collect();
    Ok(CopyReport { tables, site_id })
}

/// Text-format COPY of one value.
pub(crate) fn copy_text(cell: &Cell, out: &mut String) {
    match cell {
        Cell::Null => out.push_str("\\N"),
        Cell::Int(i) => out.push_str(&i.to_string()),
        Cell::Text(s) => {
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c => out.push(c),
                }
            }
        }
        Cell::Blob(b) => {
            out.push_str("\\\\x");
            out.push_str(&hex::encode(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_reads_specially() {
        let mut s = String::new();
        for c in [Cell::Text("a\tb\nc\\d\re".into()), Cell::Null, Cell::Int(-7), Cell::Blob(vec![0, 255])] {
            copy_text(&c, &mut s);
            s.push('|');
        }
        assert_eq!(s, "a\\tb\\nc\\\\d\\re|\\N|-7|\\\\x00ff|");
    }
}
