//! The SQLite backend: one file in WAL mode, numbered migrations, one writer connection whose
//! concurrent write calls commit together ([`group`]), and a small pool of readers. All SQL of
//! the SQLite backend lives in this module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use orch_core::throttle::ThrottleRecord;
use orch_core::{Artifact, Clock, Event, Job, JobId};
use rusqlite::{params, params_from_iter, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use tracing::instrument;

use crate::ledger::{self, Tx, Writer};
use crate::ledger::{
    check_run, check_token, check_webhook, decode_event, decode_job, decode_throttle, delivery_status, failure_record,
    new_token,
};
use crate::types::*;
use crate::wait;
use crate::{SnapshotReader, Store, StoreError};

mod group;
use group::GroupCommit;

/// The schema version this build writes (SQLite `user_version`).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `PRAGMA application_id` of an orch ledger ("ORCH").
const APPLICATION_ID: i64 = 0x4F52_4348;

/// Numbered migrations; the n-th brings the schema to version n.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_api.sql"),
    include_str!("../migrations/0003_import.sql"),
    include_str!("../migrations/0004_hooks.sql"),
    include_str!("../migrations/0005_flow.sql"),
    include_str!("../migrations/0006_error_class.sql"),
];

/// How hard SQLite works to make commits durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Survives a crash of orchd; the last commits may be lost on power failure (WAL `NORMAL`).
    #[default]
    Normal,
    /// Survives power failure too, at the cost of an fsync per commit (`FULL`).
    Full,
}

/// A ledger in one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    writer: GroupCommit,
    /// [`Store::token_stamp`]: moves on every token write of this store and whenever the
    /// writer's `data_version` shows a commit by another connection.
    token_epoch: std::sync::atomic::AtomicU64,
    /// The writer's `PRAGMA data_version` when last looked at (only read under its lock).
    seen_version: std::sync::atomic::AtomicI64,
    /// Set while a write transaction that has looked at `data_version` holds SQLite's write
    /// lock: no other connection can commit then, so the epoch is current.
    checked: std::sync::atomic::AtomicBool,
    readers: Mutex<Vec<Connection>>,
    clock: Arc<dyn Clock>,
    opts: StoreOptions,
    sync: Synchronous,
    checkpointer: Checkpointer,
}

/// WAL pages past which the writer checkpoints in its own commit: only if the [`Checkpointer`]
/// falls behind (SQLite's default is 1,000 pages, in the commit that crosses them).
const WRITER_CHECKPOINT_PAGES: u32 = 8_000;

/// Copies committed pages from the WAL back into the database file on a thread of its own, a
/// few times a second while there are commits, so that writers holding the ledger's lock do
/// not. Stops when the store is dropped.
struct Checkpointer {
    shared: Arc<CheckpointShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct CheckpointShared {
    commits: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
}

impl Checkpointer {
    fn start(path: &Path, sync: Synchronous) -> Checkpointer {
        use std::sync::atomic::Ordering::Relaxed;
        let shared = Arc::new(CheckpointShared::default());
        let (path, state) = (path.to_path_buf(), shared.clone());
        let thread = std::thread::Builder::new().name("orch-checkpoint".into()).spawn(move || {
            let conn = match open_connection(&path, false, sync) {
                Ok(c) => c,
                Err(e) => return tracing::debug!(error = %e, "no checkpoint thread; writers checkpoint"),
            };
            let (mut seen, mut idle) = (0, 0);
            while !state.stop.load(Relaxed) {
                std::thread::park_timeout(std::time::Duration::from_millis(25));
                let commits = state.commits.load(Relaxed);
                idle += 1;
                // While commits come, every 25 ms; otherwise once a second.
                if commits != seen || idle >= 40 {
                    (seen, idle) = (commits, 0);
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::debug!(error = %e, "checkpoint failed");
                    }
                }
            }
        });
        Checkpointer { shared, thread: thread.ok() }
    }

    fn committed(&self) {
        self.shared.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn open_connection(path: &Path, create: bool, sync: Synchronous) -> Result<Connection, StoreError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e))?;
    conn.busy_handler(Some(busy))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(|e| classify(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Invalid(format!("{}: cannot switch to WAL mode (got {mode})", path.display())));
    }
    let sync = match sync {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.execute_batch(&format!("PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;"))?;
    conn.set_prepared_statement_cache_capacity(64);
    // One plan per statement, whatever its parameters: otherwise SQLite re-plans a cached
    // statement (parse and all) each time a new value is bound to a parameter that a partial
    // index's condition could match, which the claim query did on every claim.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(conn)
}

/// How long a call waits for another process's lock on the ledger before it fails as `busy`.
const BUSY_TIMEOUT_MS: u64 = 10_000;

/// The connections' busy handler: waits for another connection's lock with SQLite's own
/// back-off (what `busy_timeout` does) for up to [`BUSY_TIMEOUT_MS`], and not at all inside
/// [`wait::without_waiting`].
fn busy(retries: i32) -> bool {
    const DELAYS_MS: [u64; 12] = [1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100];
    if !wait::allowed() {
        return false;
    }
    let n = usize::try_from(retries).unwrap_or(0);
    let waited = DELAYS_MS.iter().take(n).sum::<u64>() + n.saturating_sub(DELAYS_MS.len()) as u64 * 100;
    let delay = DELAYS_MS.get(n).copied().unwrap_or(100).min(BUSY_TIMEOUT_MS.saturating_sub(waited));
    if delay == 0 {
        return false;
    }
    std::thread::sleep(std::time::Duration::from_millis(delay));
    true
}

/// A busy database met inside [`wait::without_waiting`] is a call that would have waited.
fn deferred(e: StoreError) -> StoreError {
    let busy = matches!(&e, StoreError::Backend(b)
        if matches!(b.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)));
    if busy && !wait::allowed() {
        StoreError::WouldWait
    } else {
        e
    }
}

/// Turns "file is not a database" into an error that names the file.
fn classify(path: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotADatabase { path: path.to_path_buf() },
        _ => StoreError::Backend(e),
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| classify(path, e))?;
    let app: i64 = tx.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let tables: i64 = tx.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    if app != APPLICATION_ID && (app != 0 || tables > 0) {
        return Err(StoreError::NotALedger { path: path.to_path_buf() });
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { path: path.to_path_buf(), found: version, supported: SCHEMA_VERSION });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tracing::info!(version = i + 1, "applied ledger migration");
    }
    tx.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID}"))?;
    tx.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('site_id', ?1)",
        [format!("site-{}", &new_token()[..16])],
    )?;
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the ledger at `path`.
    pub fn open(
        path: impl AsRef<Path>,
        clock: Arc<dyn Clock>,
        opts: StoreOptions,
        sync: Synchronous,
    ) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut writer = open_connection(&path, true, sync)?;
        migrate(&mut writer, &path)?;
        writer.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
        let checkpointer = Checkpointer::start(&path, sync);
        let version = data_version(&writer)?;
        Ok(SqliteStore {
            path,
            writer: GroupCommit::new(writer),
            token_epoch: Default::default(),
            seen_version: version.into(),
            checked: Default::default(),
            readers: Mutex::new(Vec::new()),
            clock,
            opts,
            sync,
            checkpointer,
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options the store runs with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// Runs `f` in the writer's transaction, which the write calls queued at the same time share
    /// (see [`group`]); returns once that transaction has committed, or at once if `f` fails,
    /// with nothing of `f` written.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Writer<'_, SqliteTx<'_>>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.writer
            .run(
                // With SQLite's write lock held, no other connection commits until this group
                // does: take in the commits that came before, so token_stamp can answer meanwhile.
                |conn| self.checked.store(self.note_version(conn).is_ok(), SeqCst),
                || {
                    self.checked.store(false, SeqCst);
                    self.checkpointer.committed();
                },
                |conn| {
                    let mut stx = SqliteTx(conn);
                    let mut w = Writer::new(&mut stx, self.clock.now(), &self.opts);
                    let out = f(&mut w)?;
                    w.finish()?;
                    Ok(out)
                },
            )
            .map_err(deferred)
    }

    /// Runs `f` with a [`crate::copy::Dump`] of this ledger: every row of a table of
    /// [`crate::copy::TABLES`], all read in one transaction.
    pub(crate) fn with_dump<R>(
        &self,
        f: impl FnOnce(&mut crate::copy::Dump<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        use crate::copy::{Cell, TABLES};
        use rusqlite::types::ValueRef;
        self.read(|c| {
            c.execute_batch("BEGIN DEFERRED")?;
            let mut dump = |table: usize, sink: &mut dyn FnMut(Vec<Cell>) -> Result<(), StoreError>| {
                let (name, cols) = TABLES[table];
                let mut stmt = c.prepare(&format!("SELECT {} FROM {name}", cols.join(", ")))?;
                let mut rows = stmt.query([])?;
                while let Some(r) = rows.next()? {
                    let mut row = Vec::with_capacity(cols.len());
                    for k in 0..cols.len() {
                        row.push(match r.get_ref(k)? {
                            ValueRef::Null => Cell::Null,
                            ValueRef::Integer(v) => Cell::Int(v),
                            ValueRef::Real(v) => Cell::Text(v.to_string()),
                            ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                            ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
                        });
                    }
                    sink(row)?;
                }
                Ok(())
            };
            let out = f(&mut dump);
            c.execute_batch("COMMIT")?;
            out
        })
    }

    /// Compares the writer's `data_version` (`conn` is the writer) with the last one seen;
    /// a change means another connection committed, which may have changed a token.
    fn note_version(&self, conn: &Connection) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let version = data_version(conn)?;
        if self.seen_version.swap(version, SeqCst) != version {
            self.token_epoch.fetch_add(1, SeqCst);
        }
        Ok(())
    }

    /// Moves the token stamp after this store committed a token write. After the commit, not
    /// inside the transaction: a request may take the stamp while the transaction runs (see
    /// `token_stamp`) and read the token as it was before; only a stamp that moves after the
    /// commit keeps that read from being remembered as current.
    fn token_written(&self) {
        self.token_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Runs `f` on a pooled read connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let conn = lock(&self.readers).pop();
        let conn = match conn {
            Some(c) => c,
            None => open_connection(&self.path, false, self.sync)?,
        };
        let out = f(&conn);
        let mut pool = lock(&self.readers);
        if pool.len() < 8 {
            pool.push(conn);
        }
        out.map_err(deferred)
    }
}

/// A connection's `PRAGMA data_version`: it changes when, and only when, another connection
/// (of this process or any other) commits to the database.
fn data_version(c: &Connection) -> Result<i64, StoreError> {
    Ok(c.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves no half-done transaction (it rolled back on drop).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The SQLite side of a write transaction. SQLite's write transactions are exclusive
/// (`BEGIN IMMEDIATE`), so the ledger needs no lock of its own.
struct SqliteTx<'t>(&'t Connection);

impl std::ops::Deref for SqliteTx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl Tx for SqliteTx<'_> {
    fn lock_ledger(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn max_seq(&mut self) -> Result<u64, StoreError> {
        Ok(self.0.prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM history")?.query_row([], |r| r.get::<_, i64>(0))?
            as u64)
    }

    fn max_job_id(&mut self) -> Result<JobId, StoreError> {
        Ok(self.0.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM jobs")?.query_row([], |r| r.get(0))?)
    }

    fn max_throttle_seq(&mut self) -> Result<u64, StoreError> {
        Ok(self
            .0
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM throttles")?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    }

    fn tenant_head(&mut self, tenant: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .0
            .prepare_cached("SELECT head_hash FROM tenants WHERE id = ?1")?
            .query_row([tenant], |r| r.get(0))
            .optional()?)
    }

    fn set_tenant_head(&mut self, tenant: &str, seq: u64, hash: &str) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "INSERT INTO tenants (id, head_seq, head_hash) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET head_seq = excluded.head_seq, head_hash = excluded.head_hash",
            )?
            .execute(params![tenant, seq as i64, hash])?;
        Ok(())
    }

    fn insert_event(&mut self, ev: &Event, line: &str) -> Result<(), StoreError> {
        self.0
            .prepare_cached(
                "INSERT INTO history (seq, tenant, job_id, type, at, correlation_id, hash, line)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                ev.seq as i64,
                ev.tenant,
                ev.job_id,
                ev.event.type_name(),
                ev.at.as_millis(),
                ev.correlation_id,
                ev.hash,
                line,
            ])?;
        Ok(())
    }

    fn write_job(&mut self, job: &Job, doc: &str, insert: bool) -> Result<(), StoreError> {
        let lease = job.lease.as_ref();
        if !insert {
            // Only what a state change can change (see `orch_core::apply`): an UPDATE that names
            // a column rewrites every index on it, so naming the fixed ones (tenant, queue,
            // correlation…) would rewrite their indexes on every claim and ack for nothing.
            self.0
                .prepare_cached(
                    "UPDATE jobs SET state = ?2, run_after = ?3, lease_id = ?4, lease_expires_at = ?5,
                                     updated_at = ?6, doc = ?7, last_error_class = ?8
                     WHERE id = ?1",
                )?
                .execute(params![
                    job.id,
                    job.state.as_str(),
                    job.spec.run_after.as_millis(),
                    lease.map(|l| &l.id),
                    lease.map(|l| l.expires_at.as_millis()),
                    job.updated_at.as_millis(),
                    doc,
                    job.last_error.as_ref().map(|e| &e.class),
                ])?;
            return Ok(());
        }
        self.0
            .prepare_cached(
                "INSERT INTO jobs (id, tenant, project, queue, source, state, priority, run_after, lease_id,
                                   lease_expires_at, idempotency_key, correlation_id, updated_at, doc, run_id,
                                   last_error_class)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                job.id,
                job.tenant,
                job.project,
                job.spec.queue,
                job.spec.source,
                job.state.as_str(),
                job.spec.priority,
                job.spec.run_after.as_millis(),
                lease.map(|l| &l.id),
                lease.map(|l| l.expires_at.as_millis()),
                job.spec.idempotency_key,
                job.correlation_id,
                job.updated_at.as_millis(),
                doc,
                job.spec.run,
                job.last_error.as_ref().map(|e| &e.class),
            ])?;
        Ok(())
    }

    fn load_job(&mut self, scope: &Scope, id: JobId) -> Result<Job, StoreError> {
        load_job(self.0, scope, id)
    }

    fn lock_jobs(&mut self, _: &[JobId]) -> Result<(), StoreError> {
        Ok(())
    }

    fn job_by_key(&mut self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError> {
        job_by_key(self.0, tenant, key)
    }

    fn job_tenant_state(&mut self, id: JobId) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .0
            .prepare_cached("SELECT tenant, state FROM jobs WHERE id = ?1")?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    fn add_project(&mut self, tenant: &str, project: &str) -> Result<(), StoreError> {
        self.0
            .prepare_cached("INSERT OR IGNORE INTO projects (tenant, id) VALUES (?1, ?2)")?
            .execute(params![tenant, project])?;
        Ok(())
    }

    fn add_edge(&mut self, parent: JobId, child: JobId) -> Result<(), StoreError> {
        self.0
            .prepare_cached("INSERT INTO dag_edges (parent, child) VALUES (?1, ?2)")?
            .execute(params![parent, child])?;
        Ok(())
    }

    fn add_artifact(&mut self, job: JobId, m: &Artifact, content: &[u8]) -> Result<(), StoreError> {
        self.0
            .prepare_cached("INSERT OR IGNORE INTO artifacts (sha256, size, content) VALUES (?1, ?2, ?3)")?
            .execute(params![m.sha256, m.size as i64, content])?;
        self.0
            .prepare_cached(
                "INSERT INTO job_artifacts (job_id, name, media_type, size, sha256) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![job, m.name, m.media_type, m.size as i64, m.sha256])?;
        Ok(())
    }

    fn insert_throttle(&mut self, r: &ThrottleRecord, line: &str) -> Result<(), StoreError> {
        self.0
            .prepare_cached("INSERT INTO throttles (seq, tenant, host, at, line) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![r.seq as i64, r.tenant, r.host, r.at.as_millis(), line])?;
        Ok(())
    }

    fn queued_children(&mut self, parent: JobId) -> Result<Vec<Job>, StoreError> {
        let docs: Vec<String> = self
            .0
            .prepare_cached(
                "SELECT j.doc FROM dag_edges e JOIN jobs j ON j.id = e.child
                 WHERE e.parent = ?1 AND j.state = 'queued' ORDER BY j.id",
            )?
            .query_map([parent], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        docs.iter().map(|d| decode_job(d)).collect()
    }

    fn ready_jobs(
        &mut self,
        req: &ClaimRequest,
        now: orch_core::Timestamp,
        excluded: &BTreeSet<Exclusion>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        ready_jobs(self.0, req, now, excluded, limit)
    }

    fn running_counts(&mut self) -> Result<Vec<RunningCount>, StoreError> {
        let rows = self
            .0
            .prepare_cached(
                "SELECT tenant, queue, source, count(*) FROM jobs WHERE state = 'running' GROUP BY 1, 2, 3",
            )?
            .query_map([], |r| {
                Ok(RunningCount {
                    tenant: r.get(0)?,
                    queue: r.get(1)?,
                    source: r.get(2)?,
                    count: r.get::<_, i64>(3)? as u64,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn expired_leases(&mut self, now: orch_core::Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        let docs: Vec<String> = self
            .0
            .prepare_cached(
                "SELECT doc FROM jobs WHERE state = 'running' AND lease_expires_at <= ?1
                 ORDER BY lease_expires_at, id LIMIT ?2",
            )?
            .query_map(params![now.as_millis(), limit as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        docs.iter().map(|d| decode_job(d)).collect()
    }

    fn put_setting_row(&mut self, change: &SettingChange, host: Option<&str>, doc: &str) -> Result<(), StoreError> {
        let (t, id) = (&change.tenant, &change.id);
        match change.kind {
            SettingKind::Source => self.0.execute(
                "INSERT INTO sources (tenant, id, host, config) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant, id) DO UPDATE SET host = excluded.host, config = excluded.config",
                params![t, id, host, doc],
            )?,
            SettingKind::Quota => self.0.execute(
                "INSERT INTO quotas (tenant, queue, doc) VALUES (?1, ?2, ?3)
                 ON CONFLICT (tenant, queue) DO UPDATE SET doc = excluded.doc",
                params![t, id, doc],
            )?,
            kind => self.0.execute(
                "INSERT INTO flow_settings (tenant, kind, id, doc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant, kind, id) DO UPDATE SET doc = excluded.doc",
                params![t, kind.as_str(), id, doc],
            )?,
        };
        Ok(())
    }

    fn delete_setting_row(&mut self, change: &SettingChange) -> Result<u64, StoreError> {
        let (t, id) = (&change.tenant, &change.id);
        let n = match change.kind {
            SettingKind::Source => {
                self.0.execute("DELETE FROM sources WHERE tenant = ?1 AND id = ?2", params![t, id])?
            }
            SettingKind::Quota => {
                self.0.execute("DELETE FROM quotas WHERE tenant = ?1 AND queue = ?2", params![t, id])?
            }
            kind => self.0.execute(
                "DELETE FROM flow_settings WHERE tenant = ?1 AND kind = ?2 AND id = ?3",
                params![t, kind.as_str(), id],
            )?,
        };
        if change.kind == SettingKind::Schedule {
            self.0.execute("DELETE FROM schedule_state WHERE tenant = ?1 AND id = ?2", params![t, id])?;
        }
        Ok(n as u64)
    }

    fn open_incidents(&mut self) -> Result<Vec<Incident>, StoreError> {
        self.incident_rows()
    }

    fn insert_incident(&mut self, c: &IncidentSpec, at: orch_core::Timestamp) -> Result<i64, StoreError> {
        self.0
            .prepare_cached("INSERT INTO incidents (tenant, kind, key, opened_at, doc) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![c.tenant, c.kind, c.key, at.as_millis(), ledger::incident_doc(c)?])?;
        Ok(self.0.last_insert_rowid())
    }

    fn close_incident(&mut self, id: i64, at: orch_core::Timestamp) -> Result<(), StoreError> {
        self.0
            .prepare_cached("UPDATE incidents SET closed_at = ?1 WHERE id = ?2")?
            .execute(params![at.as_millis(), id])?;
        Ok(())
    }

    fn dead_jobs(&mut self, scope: &Scope, queue: Option<&str>, limit: usize) -> Result<Vec<Job>, StoreError> {
        let docs: Vec<String> = self
            .0
            .prepare_cached(
                "SELECT doc FROM jobs WHERE state = 'dead' AND (?1 IS NULL OR tenant = ?1)
                 AND (?2 IS NULL OR queue = ?2) ORDER BY id LIMIT ?3",
            )?
            .query_map(params![scope.tenant(), queue, limit as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        docs.iter().map(|d| decode_job(d)).collect()
    }
}

impl SqliteTx<'_> {
    fn incident_rows(&self) -> Result<Vec<Incident>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT id, tenant, kind, key, opened_at, closed_at, doc FROM incidents WHERE closed_at IS NULL",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(incident_row(r)?);
        }
        Ok(out)
    }
}

fn job_by_key(c: &Connection, tenant: &str, key: &str) -> Result<Option<Job>, StoreError> {
    let doc: Option<String> = c
        .prepare_cached("SELECT doc FROM jobs WHERE tenant = ?1 AND idempotency_key = ?2")?
        .query_row(params![tenant, key], |r| r.get(0))
        .optional()?;
    doc.map(|d| decode_job(&d)).transpose()
}

/// One job, if it exists in the scope: another tenant's job is `NotFound`, like a missing one.
fn load_job(c: &Connection, scope: &Scope, id: JobId) -> Result<Job, StoreError> {
    let doc: Option<(String, String)> = c
        .prepare_cached("SELECT tenant, doc FROM jobs WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match doc {
        Some((tenant, doc)) if scope.allows(&tenant) => decode_job(&doc),
        _ => Err(StoreError::NotFound(id)),
    }
}

fn incident_row(r: &rusqlite::Row<'_>) -> Result<Incident, StoreError> {
    let doc: String = r.get(6)?;
    Ok(Incident {
        id: r.get(0)?,
        tenant: r.get(1)?,
        kind: r.get(2)?,
        key: r.get(3)?,
        opened_at: orch_core::Timestamp::from_millis(r.get(4)?),
        closed_at: r.get::<_, Option<i64>>(5)?.map(orch_core::Timestamp::from_millis),
        details: serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt(format!("incident doc: {e}")))?,
    })
}

impl Store for SqliteStore {
    ledger::write_verbs!();

    fn job(&self, scope: &Scope, id: JobId) -> Result<Job, StoreError> {
        self.read(|c| load_job(c, scope, id))
    }

    fn jobs(&self, scope: &Scope, filter: &JobFilter, page: PageRequest) -> Result<Page<Job>, StoreError> {
        let mut q = Query::new("SELECT id, doc FROM jobs WHERE id > ?", page.after);
        q.conds(ledger::job_conditions(scope, filter));
        self.read(|c| q.page(c, "id", page.limit, decode_job))
    }

    fn history(&self, scope: &Scope, filter: &HistoryFilter, page: PageRequest) -> Result<Page<Event>, StoreError> {
        let mut q = Query::new("SELECT seq, line FROM history WHERE seq > ?", page.after);
        q.conds(ledger::history_conditions(scope, filter));
        self.read(|c| q.page(c, "seq", page.limit, decode_event))
    }

    fn artifact(&self, scope: &Scope, job: JobId, name: &str) -> Result<(Artifact, Vec<u8>), StoreError> {
        self.job(scope, job)?;
        self.read(|c| {
            c.prepare_cached(
                "SELECT ja.media_type, ja.size, ja.sha256, a.content FROM job_artifacts ja
                 JOIN artifacts a ON a.sha256 = ja.sha256 WHERE ja.job_id = ?1 AND ja.name = ?2",
            )?
            .query_row(params![job, name], |r| {
                Ok((
                    Artifact {
                        name: name.to_string(),
                        media_type: r.get(0)?,
                        size: r.get::<_, i64>(1)? as u64,
                        sha256: r.get(2)?,
                    },
                    r.get(3)?,
                ))
            })
            .optional()?
            .ok_or_else(|| StoreError::ArtifactNotFound { job, name: name.to_string() })
        })
    }

    fn snapshot(&self, f: &mut dyn FnMut(&dyn SnapshotReader) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.read(|c| {
            // A deferred transaction holds one WAL snapshot from its first read to its end.
            c.execute_batch("BEGIN DEFERRED")?;
            let out = f(&SqliteSnapshot { conn: c, origin: None });
            c.execute_batch("COMMIT")?;
            out
        })
    }

    fn stats(&self, scope: &Scope) -> Result<Stats, StoreError> {
        self.read(|c| {
            let mut stats = Stats::default();
            let mut q = Query::new("SELECT state, count(*) FROM jobs WHERE id > ?", 0);
            q.opt("tenant = ?", scope.tenant().map(String::from));
            q.sql.push_str(" GROUP BY state");
            let mut stmt = c.prepare(&q.sql)?;
            let mut rows = stmt.query(params_from_iter(q.args.iter()))?;
            while let Some(r) = rows.next()? {
                stats.by_state.insert(r.get(0)?, r.get::<_, i64>(1)? as u64);
            }
            let mut q = Query::new("SELECT count(*) FROM history WHERE seq > ?", 0);
            q.opt("tenant = ?", scope.tenant().map(String::from));
            stats.events = c.query_row(&q.sql, params_from_iter(q.args.iter()), |r| r.get::<_, i64>(0))? as u64;
            Ok(stats)
        })
    }

    fn depth(&self, scope: &Scope) -> Result<Vec<Depth>, StoreError> {
        let mut q = Query::new("SELECT tenant, queue, state, count(*) FROM jobs WHERE id > ?", 0);
        q.opt("tenant = ?", scope.tenant().map(String::from));
        q.sql.push_str(" GROUP BY tenant, queue, state ORDER BY tenant, queue, state");
        self.read(|c| {
            let rows = c
                .prepare(&q.sql)?
                .query_map(params_from_iter(q.args.iter()), |r| {
                    Ok(Depth {
                        tenant: r.get(0)?,
                        queue: r.get(1)?,
                        state: r.get(2)?,
                        jobs: r.get::<_, i64>(3)? as u64,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn failures(
        &self,
        scope: &Scope,
        since: orch_core::Timestamp,
        limit: usize,
    ) -> Result<Vec<FailureRecord>, StoreError> {
        let mut q = Query::new(
            "SELECT h.line, j.source, j.queue FROM history h JOIN jobs j ON j.id = h.job_id
             WHERE h.type IN ('job.failed', 'job.lease_expired') AND h.at >= ?",
            since.as_millis(),
        );
        q.opt("h.tenant = ?", scope.tenant().map(String::from));
        q.sql.push_str(&format!(" ORDER BY h.seq DESC LIMIT {}", limit.clamp(1, 100_000)));
        self.read(|c| {
            let rows: Vec<(String, Option<String>, String)> = c
                .prepare(&q.sql)?
                .query_map(params_from_iter(q.args.iter()), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            rows.into_iter().rev().map(|(line, source, queue)| failure_record(&line, source, queue)).collect()
        })
    }

    #[instrument(skip_all, fields(kind = %run.kind, jobs = jobs.len()))]
    fn start_run(&self, actor: &str, run: NewRun, jobs: Vec<NewJob>) -> Result<(Run, Vec<Enqueued>), StoreError> {
        check_run(&self.opts, &run, &jobs)?;
        let (id, enqueued) = self.write(|w| {
            let doc = ledger::run_doc(&run, actor, w.now);
            w.tx.execute(
                "INSERT INTO runs (tenant, project, state, doc) VALUES (?1, ?2, 'started', ?3)",
                params![run.tenant, run.project, doc.to_string()],
            )?;
            let id = w.tx.last_insert_rowid();
            Ok((id, ledger::start_run(w, actor, id, &run, jobs)?))
        })?;
        Ok((self.run(&Scope::Tenant(run.tenant), id)?, enqueued))
    }

    fn run(&self, scope: &Scope, id: i64) -> Result<Run, StoreError> {
        self.read(|c| {
            let row: Option<(String, String, String)> = c
                .prepare_cached("SELECT tenant, project, doc FROM runs WHERE id = ?1")?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            match row {
                Some((tenant, project, doc)) if scope.allows(&tenant) => decode_run(c, id, tenant, project, &doc),
                _ => Err(StoreError::Missing { what: "run", id: id.to_string() }),
            }
        })
    }

    fn runs(&self, scope: &Scope, page: PageRequest) -> Result<Page<Run>, StoreError> {
        let limit = page.limit.clamp(1, 1000);
        self.read(|c| {
            let mut q = Query::new("SELECT id, tenant, project, doc FROM runs WHERE id > ?", page.after);
            q.opt("tenant = ?", scope.tenant().map(String::from));
            q.sql.push_str(&format!(" ORDER BY id LIMIT {}", limit + 1));
            let rows: Vec<(i64, String, String, String)> = c
                .prepare(&q.sql)?
                .query_map(params_from_iter(q.args.iter()), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<_, _>>()?;
            let more = rows.len() > limit;
            let mut items = Vec::new();
            for (id, tenant, project, doc) in rows.into_iter().take(limit) {
                items.push(decode_run(c, id, tenant, project, &doc)?);
            }
            let next_after = if more { items.last().map(|r| r.id) } else { None };
            Ok(Page { items, next_after })
        })
    }

    fn settings(&self, scope: &Scope, kind: SettingKind) -> Result<Vec<Setting>, StoreError> {
        let mut q = match kind {
            SettingKind::Source => {
                Query { sql: "SELECT tenant, id, config FROM sources WHERE 1 = 1".into(), args: Vec::new() }
            }
            SettingKind::Quota => {
                Query { sql: "SELECT tenant, queue, doc FROM quotas WHERE 1 = 1".into(), args: Vec::new() }
            }
            kind => Query {
                sql: "SELECT tenant, id, doc FROM flow_settings WHERE kind = ?".into(),
                args: vec![rusqlite::types::Value::Text(kind.as_str().into())],
            },
        };
        q.opt("tenant = ?", scope.tenant().map(String::from));
        q.sql.push_str(" ORDER BY 1, 2");
        self.read(|c| {
            let rows: Vec<(String, String, String)> = c
                .prepare(&q.sql)?
                .query_map(params_from_iter(q.args.iter()), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(tenant, id, doc)| {
                    let doc = serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt(format!("setting: {e}")))?;
                    Ok(Setting { tenant, kind, id, doc })
                })
                .collect()
        })
    }

    fn throttles(
        &self,
        scope: &Scope,
        page: PageRequest,
    ) -> Result<Page<orch_core::throttle::ThrottleRecord>, StoreError> {
        self.read(|c| {
            let mut q = Query::new("SELECT seq, line FROM throttles WHERE seq > ?", page.after);
            q.opt("tenant = ?", scope.tenant().map(String::from));
            q.page(c, "seq", page.limit, decode_throttle)
        })
    }

    fn job_by_key(&self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError> {
        self.read(|c| job_by_key(c, tenant, key))
    }

    fn queued(&self, tenant: &str, queue: Option<&str>, cap: u64) -> Result<u64, StoreError> {
        self.read(|c| {
            let n: i64 = c
                .prepare_cached(
                    "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant = ?1 AND state = 'queued'
                     AND (?2 IS NULL OR queue = ?2) LIMIT ?3)",
                )?
                .query_row(params![tenant, queue, cap.min(i64::MAX as u64) as i64], |r| r.get(0))?;
            Ok(n as u64)
        })
    }

    fn schedule_fired(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<(orch_core::Timestamp, Option<JobId>)>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached("SELECT last_fired, last_job FROM schedule_state WHERE tenant = ?1 AND id = ?2")?
                .query_row(params![tenant, id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)))
                .optional()?
                .map(|(at, job)| (orch_core::Timestamp::from_millis(at), job)))
        })
    }

    fn incidents(&self, scope: &Scope, open: Option<bool>, page: PageRequest) -> Result<Page<Incident>, StoreError> {
        self.read(|c| {
            let after = if page.after == 0 { i64::MAX } else { page.after };
            let mut sql =
                String::from("SELECT id, tenant, kind, key, opened_at, closed_at, doc FROM incidents WHERE id < ?1");
            let mut args: Vec<rusqlite::types::Value> = vec![after.into()];
            if let Some(t) = scope.tenant() {
                sql.push_str(" AND tenant = ?2");
                args.push(t.to_string().into());
            }
            match open {
                Some(true) => sql.push_str(" AND closed_at IS NULL"),
                Some(false) => sql.push_str(" AND closed_at IS NOT NULL"),
                None => {}
            }
            let limit = page.limit.clamp(1, 1000);
            sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));
            let mut stmt = c.prepare(&sql)?;
            let mut rows = stmt.query(params_from_iter(args.iter()))?;
            let mut items = Vec::new();
            while let Some(r) = rows.next()? {
                items.push(incident_row(r)?);
            }
            let more = items.len() > limit;
            items.truncate(limit);
            let next_after = if more { items.last().map(|i| i.id) } else { None };
            Ok(Page { items, next_after })
        })
    }

    fn stuck_jobs(
        &self,
        quiet_since: orch_core::Timestamp,
        lease_losses: u32,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        self.read(|c| {
            let mut out = Vec::new();
            let mut stmt = c.prepare_cached(
                "SELECT doc FROM jobs WHERE state = 'running' AND updated_at < ?1 ORDER BY id LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![quiet_since.as_millis(), limit as i64])?;
            while let Some(r) = rows.next()? {
                out.push(decode_job(r.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?)?);
            }
            // The partial index `jobs_lease_lost` holds exactly these rows.
            let mut stmt = c.prepare_cached(
                "SELECT doc, (SELECT count(*) FROM history h WHERE h.job_id = jobs.id AND h.type = 'job.lease_expired')
                 FROM jobs INDEXED BY jobs_lease_lost
                 WHERE state IN ('queued', 'running') AND last_error_class = 'lease_expired'
                 ORDER BY tenant, id",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                if out.len() >= limit {
                    break;
                }
                if r.get::<_, i64>(1)? >= i64::from(lease_losses) {
                    let job = decode_job(r.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?)?;
                    if !out.iter().any(|j: &Job| j.id == job.id) {
                        out.push(job);
                    }
                }
            }
            Ok(out)
        })
    }

    fn set_schedule_fired(
        &self,
        tenant: &str,
        id: &str,
        at: orch_core::Timestamp,
        job: Option<JobId>,
    ) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.execute(
                "INSERT INTO schedule_state (tenant, id, last_fired, last_job) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant, id) DO UPDATE SET last_fired = excluded.last_fired, last_job = excluded.last_job",
                params![tenant, id, at.as_millis(), job],
            )?;
            Ok(())
        })
    }

    fn put_token(&self, t: NewToken) -> Result<TokenRecord, StoreError> {
        check_token(&t)?;
        self.write(|w| {
            w.tx.execute(
                "INSERT INTO api_tokens (id, tenant, scopes, label, hash, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    t.id,
                    t.tenant,
                    t.scopes.join(" "),
                    t.label,
                    t.hash,
                    w.now.as_millis(),
                    t.expires_at.map(|e| e.as_millis())
                ],
            )?;
            Ok(())
        })?;
        self.token_written();
        self.read(|c| token_where(c, "id = ?1", &t.id))?.ok_or_else(|| StoreError::Corrupt("token vanished".into()))
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(|c| token_where(c, "hash = ?1", hash))
    }

    /// All of this process's writes go through the writer, whose `data_version` therefore
    /// moves only when another connection commits: some other process (`orchd token revoke`)
    /// or another store on the same file. Token writes of this store bump the epoch
    /// themselves. An idle writer is asked at once; a busy one answers for itself once its
    /// transaction has looked (see `write`), and until then the answer is `None`, not a wait.
    fn token_stamp(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        match self.writer.try_lock() {
            Some(slot) => self.note_version(&slot.conn).ok()?,
            None if self.checked.load(SeqCst) => {}
            None => return None,
        }
        Some(self.token_epoch.load(SeqCst))
    }

    fn revoke_token(&self, id: &str) -> Result<TokenRecord, StoreError> {
        let changed = self.write(|w| {
            Ok(w.tx.execute(
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, w.now.as_millis()],
            )?)
        })?;
        self.token_written();
        if changed == 0 {
            return Err(StoreError::Missing { what: "token", id: id.to_string() });
        }
        self.read(|c| token_where(c, "id = ?1", id))?.ok_or_else(|| StoreError::Corrupt("token vanished".into()))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!("{TOKEN_SELECT} ORDER BY id"))?;
            let rows = stmt.query_map([], token_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn idempotency_begin(&self, tenant: &str, key: &str, fingerprint: &str) -> Result<IdempotencyBegin, StoreError> {
        self.write(|w| {
            let row: Option<(String, Option<i64>, Option<Vec<u8>>)> = w
                .tx
                .prepare_cached("SELECT fingerprint, status, response FROM idempotency WHERE tenant = ?1 AND key = ?2")?
                .query_row(params![tenant, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            Ok(match row {
                None => {
                    w.tx.prepare_cached(
                        "INSERT INTO idempotency (tenant, key, fingerprint, created_at) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![tenant, key, fingerprint, w.now.as_millis()])?;
                    IdempotencyBegin::Started
                }
                Some((f, _, _)) if f != fingerprint => IdempotencyBegin::Mismatch,
                Some((_, Some(status), body)) => {
                    IdempotencyBegin::Replay { status: status as u16, body: body.unwrap_or_default() }
                }
                Some((_, None, _)) => IdempotencyBegin::InFlight,
            })
        })
    }

    fn idempotency_finish(&self, tenant: &str, key: &str, status: u16, body: &[u8]) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.prepare_cached("UPDATE idempotency SET status = ?3, response = ?4 WHERE tenant = ?1 AND key = ?2")?
                .execute(params![tenant, key, status, body])?;
            Ok(())
        })
    }

    fn idempotency_release(&self, tenant: &str, key: &str) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.prepare_cached("DELETE FROM idempotency WHERE tenant = ?1 AND key = ?2 AND status IS NULL")?
                .execute(params![tenant, key])?;
            Ok(())
        })
    }

    fn purge_idempotency(&self, before: orch_core::Timestamp) -> Result<usize, StoreError> {
        self.write(|w| Ok(w.tx.execute("DELETE FROM idempotency WHERE created_at < ?1", [before.as_millis()])?))
    }

    fn import_state(&self, site_id: &str, scope: &str) -> Result<Option<ImportState>, StoreError> {
        self.read(|c| {
            let row: Option<(i64, String, i64, i64, i64)> = c
                .prepare_cached(
                    "SELECT to_seq, manifest_sha256, anchor_at, root_version, bundles FROM import_sites
                     WHERE site_id = ?1 AND scope = ?2",
                )?
                .query_row(params![site_id, scope], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
                .optional()?;
            let Some((to_seq, manifest_sha256, anchor_at, root_version, bundles)) = row else { return Ok(None) };
            let mut heads = std::collections::BTreeMap::new();
            let mut stmt = c.prepare_cached(
                "SELECT h.tenant, h.hash FROM imported_history h
                 JOIN (SELECT tenant, MAX(seq) AS seq FROM imported_history WHERE site_id = ?1 GROUP BY tenant) m
                   ON m.tenant = h.tenant AND m.seq = h.seq
                 WHERE h.site_id = ?1",
            )?;
            let mut rows = stmt.query([site_id])?;
            while let Some(r) = rows.next()? {
                let tenant: String = r.get(0)?;
                if scope == "*" || scope == tenant {
                    heads.insert(tenant, r.get(1)?);
                }
            }
            Ok(Some(ImportState {
                site_id: site_id.to_string(),
                scope: scope.to_string(),
                to_seq: to_seq as u64,
                manifest_sha256,
                anchor_at: orch_core::Timestamp::from_millis(anchor_at),
                root_version: root_version as u64,
                bundles: bundles as u64,
                heads,
            }))
        })
    }

    fn bundle_imported(&self, manifest_sha256: &str) -> Result<bool, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached("SELECT 1 FROM import_bundles WHERE manifest_sha256 = ?1")?
                .query_row([manifest_sha256], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }

    #[instrument(skip_all, fields(site = %batch.site_id, from = batch.from_seq, to = batch.to_seq))]
    fn apply_import(&self, actor: &str, batch: ImportBatch) -> Result<ImportOutcome, StoreError> {
        self.write(|w| {
            let current: Option<i64> = w
                .tx
                .prepare_cached("SELECT to_seq FROM import_sites WHERE site_id = ?1 AND scope = ?2")?
                .query_row(params![batch.site_id, batch.scope], |r| r.get(0))
                .optional()?;
            if current.map(|v| v as u64) != batch.expect_to_seq {
                return Err(StoreError::Refused(format!(
                    "the import state of site {} changed while this bundle was planned; plan it again",
                    batch.site_id
                )));
            }
            let seen: Option<i64> = w
                .tx
                .prepare_cached("SELECT 1 FROM import_bundles WHERE manifest_sha256 = ?1")?
                .query_row([&batch.manifest_sha256], |r| r.get(0))
                .optional()?;
            if seen.is_some() {
                return Err(StoreError::Refused("this bundle was imported already".into()));
            }
            for (ev, line) in &batch.events {
                let inserted = w
                    .tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO imported_history (site_id, seq, tenant, job_id, hash, line)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![batch.site_id, ev.seq as i64, ev.tenant, ev.job_id, ev.hash, line])?;
                if inserted == 0 {
                    return Err(StoreError::Refused(format!(
                        "event {} of site {} is already imported",
                        ev.seq, batch.site_id
                    )));
                }
            }
            let jobs = ledger::replay_import(&batch, |id| {
                let stored: Option<String> = w
                    .tx
                    .prepare_cached("SELECT doc FROM imported_jobs WHERE site_id = ?1 AND id = ?2")?
                    .query_row(params![batch.site_id, id], |r| r.get(0))
                    .optional()?;
                stored.map(|d| decode_job(&d)).transpose()
            })?;
            for (seq, tenant, line) in &batch.throttles {
                w.tx.prepare_cached(
                    "INSERT OR IGNORE INTO imported_throttles (site_id, seq, tenant, line) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![batch.site_id, *seq as i64, tenant, line])?;
            }
            let mut changed = 0u64;
            for job in &jobs {
                let doc = orch_core::canonical::to_vec(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                w.tx.prepare_cached(
                    "INSERT INTO imported_jobs (site_id, id, tenant, doc) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (site_id, id) DO UPDATE SET tenant = excluded.tenant, doc = excluded.doc",
                )?
                .execute(params![batch.site_id, job.id, job.tenant, String::from_utf8_lossy(&doc)])?;
                changed += 1;
            }
            let now = w.now.as_millis();
            w.tx.execute(
                "INSERT INTO import_sites (site_id, scope, to_seq, manifest_sha256, anchor_at, root_version, bundles, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7)
                 ON CONFLICT (site_id, scope) DO UPDATE SET to_seq = excluded.to_seq,
                   manifest_sha256 = excluded.manifest_sha256,
                   anchor_at = MAX(anchor_at, excluded.anchor_at),
                   root_version = MAX(root_version, excluded.root_version),
                   bundles = bundles + 1, updated_at = excluded.updated_at",
                params![
                    batch.site_id,
                    batch.scope,
                    batch.to_seq as i64,
                    batch.manifest_sha256,
                    batch.anchor_at.as_millis(),
                    batch.root_version as i64,
                    now
                ],
            )?;
            w.tx.execute(
                "INSERT INTO import_bundles (manifest_sha256, site_id, scope, from_seq, to_seq, events, imported_at, actor)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    batch.manifest_sha256,
                    batch.site_id,
                    batch.scope,
                    batch.from_seq as i64,
                    batch.to_seq as i64,
                    batch.events.len() as i64,
                    now,
                    actor
                ],
            )?;
            let details = ledger::import_details(&batch);
            let audit = w.audit(SITE_TENANT, "imports", actor, "import.applied".into(), details)?;
            Ok(ImportOutcome { events: batch.events.len() as u64, jobs: changed, audit_seq: audit.seq })
        })
    }

    fn imported_history(&self, site_id: &str, from: u64, to: u64) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let rows = c
                .prepare_cached(
                    "SELECT line FROM imported_history WHERE site_id = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq",
                )?
                .query_map(params![site_id, from as i64, to.min(i64::MAX as u64) as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn create_webhook(
        &self,
        tenant: &str,
        url: &str,
        secret: &str,
        filter: serde_json::Value,
    ) -> Result<Webhook, StoreError> {
        check_webhook(tenant, url, &filter)?;
        let id = self.write(|w| {
            let head = w.tx.max_seq()? as i64;
            w.tx.execute(
                "INSERT INTO webhooks (tenant, url, secret, filter, cursor, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![tenant, url, secret, filter.to_string(), head, w.now.as_millis()],
            )?;
            Ok(w.tx.last_insert_rowid())
        })?;
        self.webhooks(&Scope::Tenant(tenant.to_string()))?
            .into_iter()
            .find(|h| h.id == id)
            .ok_or_else(|| StoreError::Corrupt("webhook vanished".into()))
    }

    fn webhooks(&self, scope: &Scope) -> Result<Vec<Webhook>, StoreError> {
        let mut q = Query::new(
            "SELECT id, tenant, url, secret, filter, cursor, next_at, created_at FROM webhooks WHERE id > ?",
            0,
        );
        q.opt("tenant = ?", scope.tenant().map(String::from));
        q.sql.push_str(" ORDER BY id");
        self.read(|c| {
            let rows: Vec<(Webhook, String)> = c
                .prepare(&q.sql)?
                .query_map(params_from_iter(q.args.iter()), |r| {
                    let hook = Webhook {
                        id: r.get(0)?,
                        tenant: r.get(1)?,
                        url: r.get(2)?,
                        secret: r.get(3)?,
                        filter: serde_json::Value::Null,
                        cursor: r.get::<_, i64>(5)? as u64,
                        next_at: orch_core::Timestamp::from_millis(r.get(6)?),
                        created_at: orch_core::Timestamp::from_millis(r.get(7)?),
                    };
                    Ok((hook, r.get(4)?))
                })?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(mut hook, filter)| {
                    hook.filter = serde_json::from_str(&filter)
                        .map_err(|e| StoreError::Corrupt(format!("webhook {} filter: {e}", hook.id)))?;
                    Ok(hook)
                })
                .collect()
        })
    }

    fn delete_webhook(&self, scope: &Scope, id: i64) -> Result<(), StoreError> {
        let tenant = scope.tenant().map(String::from);
        let n = self.write(|w| {
            Ok(w.tx
                .execute("DELETE FROM webhooks WHERE id = ?1 AND (?2 IS NULL OR tenant = ?2)", params![id, tenant])?)
        })?;
        if n == 0 {
            return Err(StoreError::Missing { what: "webhook", id: id.to_string() });
        }
        Ok(())
    }

    fn record_delivery(&self, webhook: i64, seq: u64, outcome: DeliveryOutcome) -> Result<Delivery, StoreError> {
        self.write(|w| {
            let before: u32 =
                w.tx.prepare_cached("SELECT attempts FROM webhook_deliveries WHERE webhook_id = ?1 AND seq = ?2")?
                    .query_row(params![webhook, seq as i64], |r| r.get::<_, i64>(0))
                    .optional()?
                    .unwrap_or(0) as u32;
            let attempts = before + 1;
            let (status, code, error, next_at) = delivery_status(&outcome, attempts);
            w.tx.execute(
                "INSERT INTO webhook_deliveries (webhook_id, seq, status, attempts, last_code, last_error, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (webhook_id, seq) DO UPDATE SET status = excluded.status, attempts = excluded.attempts,
                   last_code = excluded.last_code, last_error = excluded.last_error, updated_at = excluded.updated_at",
                params![webhook, seq as i64, status, attempts, code, error, w.now.as_millis()],
            )?;
            let cursor = if status == "pending" { 0 } else { seq as i64 };
            w.tx.execute(
                "UPDATE webhooks SET cursor = MAX(cursor, ?2), next_at = ?3 WHERE id = ?1",
                params![webhook, cursor, next_at],
            )?;
            Ok(Delivery { seq, status: status.into(), attempts, last_code: code, last_error: error, updated_at: w.now })
        })
    }

    fn skip_to(&self, webhook: i64, seq: u64) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.execute("UPDATE webhooks SET cursor = MAX(cursor, ?2) WHERE id = ?1", params![webhook, seq as i64])?;
            Ok(())
        })
    }

    fn deliveries(&self, scope: &Scope, webhook: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        if !self.webhooks(scope)?.iter().any(|h| h.id == webhook) {
            return Err(StoreError::Missing { what: "webhook", id: webhook.to_string() });
        }
        self.read(|c| {
            let rows = c
                .prepare_cached(
                    "SELECT seq, status, attempts, last_code, last_error, updated_at FROM webhook_deliveries
                     WHERE webhook_id = ?1 ORDER BY seq DESC LIMIT ?2",
                )?
                .query_map(params![webhook, limit.clamp(1, 10_000) as i64], |r| {
                    Ok(Delivery {
                        seq: r.get::<_, i64>(0)? as u64,
                        status: r.get(1)?,
                        attempts: r.get::<_, i64>(2)? as u32,
                        last_code: r.get::<_, Option<i64>>(3)?.map(|c| c as u16),
                        last_error: r.get(4)?,
                        updated_at: orch_core::Timestamp::from_millis(r.get(5)?),
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn publisher_cursor(&self, name: &str) -> Result<u64, StoreError> {
        self.read(|c| {
            let v: Option<i64> = c
                .prepare_cached("SELECT cursor FROM publishers WHERE name = ?1")?
                .query_row([name], |r| r.get(0))
                .optional()?;
            Ok(v.unwrap_or(0) as u64)
        })
    }

    fn set_publisher_cursor(&self, name: &str, seq: u64) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.execute(
                "INSERT INTO publishers (name, cursor) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)",
                params![name, seq as i64],
            )?;
            Ok(())
        })
    }

    fn imported_jobs(&self, site_id: &str) -> Result<Vec<Job>, StoreError> {
        self.read(|c| {
            let docs: Vec<String> = c
                .prepare_cached("SELECT doc FROM imported_jobs WHERE site_id = ?1 ORDER BY id")?
                .query_map([site_id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            docs.iter().map(|d| decode_job(d)).collect()
        })
    }
}

const TOKEN_SELECT: &str = "SELECT id, tenant, scopes, label, created_at, expires_at, revoked_at FROM api_tokens";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let scopes: String = r.get(2)?;
    Ok(TokenRecord {
        id: r.get(0)?,
        tenant: r.get(1)?,
        scopes: scopes.split_whitespace().map(str::to_string).collect(),
        label: r.get(3)?,
        created_at: orch_core::Timestamp::from_millis(r.get(4)?),
        expires_at: r.get::<_, Option<i64>>(5)?.map(orch_core::Timestamp::from_millis),
        revoked_at: r.get::<_, Option<i64>>(6)?.map(orch_core::Timestamp::from_millis),
    })
}

fn token_where(c: &Connection, cond: &str, arg: &str) -> Result<Option<TokenRecord>, StoreError> {
    Ok(c.prepare_cached(&format!("{TOKEN_SELECT} WHERE {cond}"))?.query_row([arg], token_row).optional()?)
}

/// The best `limit` ready jobs of each of the request's queues, merged in claim order, passing
/// over excluded classes and jobs whose parents have not all succeeded.
fn ready_jobs(
    tx: &Connection,
    req: &ClaimRequest,
    now: orch_core::Timestamp,
    excluded: &BTreeSet<Exclusion>,
    limit: usize,
) -> Result<Vec<Job>, StoreError> {
    use rusqlite::types::Value as Sql;
    let mut candidates: Vec<Job> = Vec::new();
    for queue in &req.queues {
        let mut sql = String::from("SELECT doc FROM jobs WHERE state = 'queued' AND queue = ? AND run_after <= ?");
        let mut args: Vec<Sql> = vec![Sql::Text(queue.clone()), Sql::Integer(now.as_millis())];
        if let Some(t) = req.scope.tenant() {
            sql.push_str(" AND tenant = ?");
            args.push(Sql::Text(t.to_string()));
        }
        for x in excluded {
            match x {
                Exclusion::Tenant(t) => {
                    sql.push_str(" AND tenant <> ?");
                    args.push(Sql::Text(t.clone()));
                }
                Exclusion::Queue(t, q) if q == queue => {
                    sql.push_str(" AND tenant <> ?");
                    args.push(Sql::Text(t.clone()));
                }
                Exclusion::Queue(..) => {}
                Exclusion::Source(t, src) => {
                    sql.push_str(" AND NOT (tenant = ? AND source IS ?)");
                    args.extend([Sql::Text(t.clone()), Sql::Text(src.clone())]);
                }
            }
        }
        sql.push_str(
            " AND NOT EXISTS (SELECT 1 FROM dag_edges e JOIN jobs p ON p.id = e.parent
                              WHERE e.child = jobs.id AND p.state <> 'succeeded')
             ORDER BY priority DESC, run_after, id LIMIT ?",
        );
        args.push(Sql::Integer(limit as i64));
        let mut stmt = tx.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(args.iter()))?;
        while let Some(row) = rows.next()? {
            candidates.push(decode_job(row.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?)?);
        }
    }
    if req.queues.len() > 1 {
        candidates.sort_by(|a, b| {
            b.spec.priority.cmp(&a.spec.priority).then(a.spec.run_after.cmp(&b.spec.run_after)).then(a.id.cmp(&b.id))
        });
        candidates.truncate(limit);
    }
    Ok(candidates)
}

/// A run with its job counts.
fn decode_run(c: &Connection, id: i64, tenant: String, project: String, doc: &str) -> Result<Run, StoreError> {
    let mut jobs = BTreeMap::new();
    let mut stmt =
        c.prepare_cached("SELECT state, count(*) FROM jobs WHERE tenant = ?1 AND run_id = ?2 GROUP BY state")?;
    let mut rows = stmt.query(params![tenant, id])?;
    while let Some(r) = rows.next()? {
        jobs.insert(r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64);
    }
    ledger::decode_run(id, tenant, project, doc, jobs)
}

/// A filtered, keyset-paginated SELECT built from optional conditions.
struct Query {
    sql: String,
    args: Vec<rusqlite::types::Value>,
}

impl Query {
    fn new(base: &str, after: i64) -> Query {
        Query { sql: base.to_string(), args: vec![after.into()] }
    }

    fn conds(&mut self, conds: Vec<ledger::Cond>) {
        for (lhs, v) in conds {
            self.sql.push_str(&format!(" AND {lhs} ?"));
            self.args.push(match v {
                ledger::Arg::Text(t) => t.into(),
                ledger::Arg::Int(i) => i.into(),
            });
        }
    }

    fn opt<T: Into<rusqlite::types::Value>>(&mut self, cond: &str, v: Option<T>) {
        if let Some(v) = v {
            self.sql.push_str(" AND ");
            self.sql.push_str(cond);
            self.args.push(v.into());
        }
    }

    fn page<T>(
        mut self,
        c: &Connection,
        key: &str,
        limit: usize,
        decode: impl Fn(&str) -> Result<T, StoreError>,
    ) -> Result<Page<T>, StoreError> {
        let limit = limit.clamp(1, 1000);
        self.sql.push_str(&format!(" ORDER BY {key} LIMIT {}", limit + 1));
        let mut stmt = c.prepare(&self.sql)?;
        let mut rows = stmt.query(params_from_iter(self.args.iter()))?;
        let mut items = Vec::new();
        let mut last = None;
        let mut more = false;
        while let Some(r) = rows.next()? {
            if items.len() == limit {
                more = true;
                break;
            }
            last = Some(r.get::<_, i64>(0)?);
            items.push(decode(r.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?)?);
        }
        Ok(Page { items, next_after: if more { last } else { None } })
    }
}

/// A read snapshot of this site's own ledger, or (with `origin`) of what was imported from
/// another site: the same queries on the `imported_*` tables.
struct SqliteSnapshot<'c> {
    conn: &'c Connection,
    origin: Option<String>,
}

impl SqliteSnapshot<'_> {
    fn each_line(
        &self,
        sql: &str,
        scope: &Scope,
        args: &[i64],
        f: &mut dyn FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut sql = sql.to_string();
        let mut params: Vec<rusqlite::types::Value> = args.iter().map(|&a| a.into()).collect();
        if let Some(origin) = &self.origin {
            sql = ledger::on_imported(&sql);
            sql.push_str(" AND site_id = ?");
            params.push(origin.clone().into());
        }
        if let Some(t) = scope.tenant() {
            sql.push_str(" AND tenant = ?");
            params.push(t.to_string().into());
        }
        let order = if sql.contains("jobs WHERE") { " ORDER BY id" } else { " ORDER BY seq" };
        sql.push_str(order);
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query(params_from_iter(params.iter()))?;
        while let Some(r) = rows.next()? {
            f(r.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?)?;
        }
        Ok(())
    }
}

impl SnapshotReader for SqliteSnapshot<'_> {
    fn site_id(&self) -> Result<String, StoreError> {
        match &self.origin {
            Some(origin) => Ok(origin.clone()),
            None => Ok(self.conn.query_row("SELECT value FROM meta WHERE key = 'site_id'", [], |r| r.get(0))?),
        }
    }

    fn head_seq(&self) -> Result<u64, StoreError> {
        let head: i64 = match &self.origin {
            Some(origin) => self.conn.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM imported_history WHERE site_id = ?1",
                [origin],
                |r| r.get(0),
            )?,
            None => self.conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM history", [], |r| r.get(0))?,
        };
        Ok(head as u64)
    }

    fn imported(&self, site_id: &str) -> Result<Box<dyn SnapshotReader + '_>, StoreError> {
        let known: Option<i64> = self
            .conn
            .query_row("SELECT 1 FROM import_sites WHERE site_id = ?1 LIMIT 1", [site_id], |r| r.get(0))
            .optional()?;
        if known.is_none() {
            return Err(StoreError::Missing { what: "imported site", id: site_id.to_string() });
        }
        Ok(Box::new(SqliteSnapshot { conn: self.conn, origin: Some(site_id.to_string()) }))
    }

    fn imported_sites(&self) -> Result<Vec<String>, StoreError> {
        let sites = self
            .conn
            .prepare("SELECT DISTINCT site_id FROM import_sites ORDER BY site_id")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(sites)
    }

    fn for_each_event_line(
        &self,
        scope: &Scope,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let sql = "SELECT line FROM history WHERE seq >= ? AND seq <= ?";
        self.each_line(sql, scope, &[from as i64, to.min(i64::MAX as u64) as i64], f)
    }

    fn for_each_job(&self, scope: &Scope, f: &mut dyn FnMut(Job) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.each_line("SELECT doc FROM jobs WHERE 1 = 1", scope, &[], &mut |d| f(decode_job(d)?))
    }

    fn for_each_throttle(
        &self,
        scope: &Scope,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(serde_json::Value) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let sql = "SELECT line FROM throttles WHERE seq >= ? AND seq <= ?";
        self.each_line(sql, scope, &[from as i64, to.min(i64::MAX as u64) as i64], &mut |l| f(decode_throttle(l)?))
    }
}
