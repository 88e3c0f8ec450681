//! What can go wrong in a store, with enough context to tell a user what to do.

use std::path::PathBuf;

use orch_core::JobId;

/// A store operation's failure. Nothing is written when one is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The job does not exist in the caller's scope.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// Something other than a job does not exist in the caller's scope.
    #[error("{what} {id:?} not found")]
    Missing {
        /// What was looked for: `run`, `source`, `token`…
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The artifact does not exist.
    #[error("job {job} has no artifact named {name:?}")]
    ArtifactNotFound {
        /// The job.
        job: JobId,
        /// The artifact name asked for.
        name: String,
    },
    /// The worker's lease is not (or no longer) the job's current lease.
    #[error("lease lost on job {job}: {reason}")]
    LeaseLost {
        /// The job.
        job: JobId,
        /// Why.
        reason: String,
    },
    /// The job is not in a state that allows the operation.
    #[error("job {job}: {reason}")]
    Conflict {
        /// The job.
        job: JobId,
        /// Why.
        reason: String,
    },
    /// The operation conflicts with the ledger's state (not a job's): e.g. an import that
    /// another import overtook.
    #[error("{0}")]
    Refused(String),
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The file is not a SQLite database.
    #[error("{path}: not a SQLite database")]
    NotADatabase {
        /// The file.
        path: PathBuf,
    },
    /// The file is a SQLite database of another application.
    #[error("{path}: a SQLite database, but not an orch ledger")]
    NotALedger {
        /// The file.
        path: PathBuf,
    },
    /// The ledger was written by a newer orchd.
    #[error("{path}: ledger schema version {found} is newer than this orchd supports ({supported}); upgrade orchd")]
    SchemaTooNew {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// Stored data does not decode or does not follow the rules: the ledger was altered outside orchd.
    #[error("corrupt ledger: {0}")]
    Corrupt(String),
    /// The PostgreSQL schema holds tables, but not an orch ledger.
    #[error("{url}: the database (schema {schema:?}) holds tables, but not an orch ledger")]
    NotALedgerSchema {
        /// The server and database (without password).
        url: String,
        /// The schema.
        schema: String,
    },
    /// The call would have had to wait, inside [`crate::wait::without_waiting`]; it wrote
    /// nothing and may run again where waiting is allowed.
    #[error("the store is busy and this call may not wait")]
    WouldWait,
    /// The SQLite database refused an operation.
    #[error("database error: {0}")]
    Backend(#[from] rusqlite::Error),
    /// The PostgreSQL server refused an operation, or could not be reached.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] postgres::Error),
}

impl StoreError {
    /// A short stable code for this kind of error, for APIs and exit codes.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::NotFound(_) | StoreError::Missing { .. } | StoreError::ArtifactNotFound { .. } => "not_found",
            StoreError::LeaseLost { .. } => "lease_lost",
            StoreError::Conflict { .. } | StoreError::Refused(_) => "conflict",
            StoreError::Invalid(_) => "invalid_request",
            StoreError::NotADatabase { .. } => "not_a_database",
            StoreError::NotALedger { .. } | StoreError::NotALedgerSchema { .. } => "not_a_ledger",
            StoreError::SchemaTooNew { .. } => "schema_too_new",
            StoreError::Corrupt(_) => "corrupt_ledger",
            StoreError::WouldWait => "busy",
            StoreError::Backend(e) => match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DiskFull) => "storage_full",
                Some(rusqlite::ErrorCode::ReadOnly) => "read_only",
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => "busy",
                Some(rusqlite::ErrorCode::DatabaseCorrupt) => "corrupt_ledger",
                _ => "backend_error",
            },
            StoreError::Postgres(e) => match e.code().map(postgres::error::SqlState::code) {
                Some("53100") => "storage_full",
                Some("XX001" | "XX002") => "corrupt_ledger",
                Some("25006") => "read_only",
                // Serialisation failures, deadlocks, lock timeouts, shutdowns, too many clients.
                Some("40001" | "40P01" | "55P03" | "57P01" | "57P03" | "53300") => "busy",
                Some(_) => "backend_error",
                None => "unavailable",
            },
        }
    }

    /// Whether the database itself failed (rather than the request or the ledger's rules).
    pub fn is_backend(&self) -> bool {
        matches!(self, StoreError::Backend(_) | StoreError::Postgres(_))
    }
}
