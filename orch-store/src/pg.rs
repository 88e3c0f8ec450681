//! The PostgreSQL backend, for sites whose daemons outgrow one machine: several orchd processes
//! share one database. All SQL of the PostgreSQL backend lives in this module.
//!
//! How it stays one ledger with many writers:
//! - Appends are serialised by a transaction-scoped advisory lock (the *ledger lock*), taken
//!   before a sequence number or chain head is read; commits therefore land in sequence order,
//!   and a reader never sees a gap that a slower writer fills later.
//! - Rows are locked before the ledger lock: a claim picks its jobs with
//!   `FOR UPDATE SKIP LOCKED`, so concurrent claims (of any process) pass over each other's
//!   jobs instead of waiting or double-claiming; worker and operator verbs lock their job. (A
//!   claim under concurrency limits or quotas counts running jobs under the ledger lock first,
//!   so that the limits hold across processes; it still never waits for a locked job.)
//! - The once-per-site services run on the process that holds a session advisory lock (the
//!   *leader lock*); when it dies, its session ends and another process takes over.
//! - Exports read one `REPEATABLE READ` snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use orch_core::throttle::ThrottleRecord;
use orch_core::{Artifact, Clock, Event, Job, JobId, Timestamp};
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row, Statement};
use sha2::{Digest, Sha256};
use tracing::instrument;

use crate::ledger::{self, Tx, Writer};
use crate::ledger::{
    check_run, check_token, check_webhook, decode_event, decode_job, decode_throttle, delivery_status, failure_record,
    new_token,
};
use crate::types::*;
use crate::{SnapshotReader, Store, StoreError, Synchronous};

/// Numbered migrations of the PostgreSQL schema; the n-th brings it to version n.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_init.sql"),
    include_str!("../migrations/postgres/0002_error_class.sql"),
];

/// The PostgreSQL schema version this build writes (`meta.schema_version`).
pub const PG_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Idle connections kept for reuse.
const POOL: usize = 16;

type Param<'a> = &'a (dyn ToSql + Sync);

/// A ledger in a PostgreSQL schema (the connection's `search_path`, `public` by default).
pub struct PgStore {
    config: postgres::Config,
    /// The server and database, without credentials, for messages.
    display: String,
    pool: Mutex<Vec<Conn>>,
    /// The session that holds (or tries for) the leader lock, and whether it holds it.
    leader: Mutex<Option<(Client, bool)>>,
    sync: Synchronous,
    ledger_key: i64,
    leader_key: i64,
    clock: Arc<dyn Clock>,
    opts: StoreOptions,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("db", &self.display).finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing a connection drives the client's own runtime, which cannot run on a thread
        // that drives another: close them on a thread of their own.
        let pool = std::mem::take(&mut *lock(&self.pool));
        let leader = lock(&self.leader).take();
        let _ = std::thread::spawn(move || drop((pool, leader))).join();
    }
}

/// A pooled connection with its prepared statements.
struct Conn {
    client: Client,
    stmts: HashMap<String, Statement>,
}

/// Runs blocking database work from any thread: on a runtime worker thread it steps out of the
/// runtime first (the `postgres` client drives its own).
fn off_runtime<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `postgres://user@host:port/db` without the password.
pub(crate) fn display_url(config: &postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("postgres://{}@{host}:{port}/{}", config.get_user().unwrap_or(""), config.get_dbname().unwrap_or(""))
}

/// A new session, committing as `sync` says.
fn connect(config: &postgres::Config, sync: Synchronous) -> Result<Client, StoreError> {
    let mut client = config.connect(NoTls)?;
    if sync == Synchronous::Normal {
        client.batch_execute("SET synchronous_commit = off")?;
    }
    Ok(client)
}

fn key(what: &str, db: &str, schema: &str) -> i64 {
    let d = Sha256::digest(format!("orch:{what}:{db}:{schema}").as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Prepares `sql` once per connection.
fn prepared(
    stmts: &mut HashMap<String, Statement>,
    c: &mut impl GenericClient,
    sql: &str,
) -> Result<Statement, StoreError> {
    if let Some(s) = stmts.get(sql) {
        return Ok(s.clone());
    }
    let s = c.prepare(sql)?;
    stmts.insert(sql.to_string(), s.clone());
    Ok(s)
}

/// Statements on a client or transaction, prepared once per connection.
struct Db<'a, C> {
    c: &'a mut C,
    stmts: &'a mut HashMap<String, Statement>,
}

impl<C: GenericClient> Db<'_, C> {
    fn query(&mut self, sql: &str, p: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let st = prepared(self.stmts, self.c, sql)?;
        Ok(self.c.query(&st, p)?)
    }

    fn opt(&mut self, sql: &str, p: &[Param<'_>]) -> Result<Option<Row>, StoreError> {
        let st = prepared(self.stmts, self.c, sql)?;
        Ok(self.c.query_opt(&st, p)?)
    }

    fn one(&mut self, sql: &str, p: &[Param<'_>]) -> Result<Row, StoreError> {
        let st = prepared(self.stmts, self.c, sql)?;
        Ok(self.c.query_one(&st, p)?)
    }

    fn exec(&mut self, sql: &str, p: &[Param<'_>]) -> Result<u64, StoreError> {
        let st = prepared(self.stmts, self.c, sql)?;
        Ok(self.c.execute(&st, p)?)
    }

    /// Runs a built query.
    fn built(&mut self, q: &Query) -> Result<Vec<Row>, StoreError> {
        let args: Vec<Param<'_>> = q.args.iter().map(|a| a.as_ref() as Param<'_>).collect();
        self.query(&q.sql, &args)
    }
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL or a key=value string), creating
    /// and migrating the ledger's tables in its schema if needed.
    pub fn open(url: &str, clock: Arc<dyn Clock>, opts: StoreOptions) -> Result<PgStore, StoreError> {
        PgStore::open_with(url, clock, opts, Synchronous::Normal, true)
    }

    /// [`PgStore::open`]; without `create`, a schema that holds no ledger is
    /// [`StoreError::Missing`] and nothing is created. `sync` means what it means for SQLite:
    /// [`Synchronous::Normal`] commits without waiting for the server's WAL flush
    /// (`synchronous_commit = off`: a crash of the server may lose the last commits, never
    /// corrupt), [`Synchronous::Full`] waits for it.
    pub fn open_with(
        url: &str,
        clock: Arc<dyn Clock>,
        opts: StoreOptions,
        sync: Synchronous,
        create: bool,
    ) -> Result<PgStore, StoreError> {
        let mut config: postgres::Config =
            url.parse().map_err(|e| StoreError::Invalid(format!("PostgreSQL URL: {e}")))?;
        if config.get_application_name().is_none() {
            config.application_name("orchd");
        }
        config.connect_timeout(std::time::Duration::from_secs(10));
        let display = display_url(&config);
        off_runtime(|| {
            let mut client = connect(&config, sync)?;
            let row = client.query_one("SELECT current_database(), current_schema()", &[])?;
            let db: String = row.get(0);
            let schema: Option<String> = row.get(1);
            let schema = schema.ok_or_else(|| {
                StoreError::Invalid(format!("{display}: no schema of the search_path exists; create it first"))
            })?;
            let store = PgStore {
                config,
                display,
                pool: Mutex::new(Vec::new()),
                leader: Mutex::new(None),
                sync,
                ledger_key: key("ledger", &db, &schema),
                leader_key: key("leader", &db, &schema),
                clock,
                opts,
            };
            store.migrate(&mut client, &schema, create)?;
            lock(&store.pool).push(Conn { client, stmts: HashMap::new() });
            Ok(store)
        })
    }

    /// The server and database, without credentials.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The options the store runs with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    fn migrate(&self, client: &mut Client, schema: &str, create: bool) -> Result<(), StoreError> {
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&self.ledger_key])?;
        let tables: i64 = tx
            .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()", &[])?
            .get(0);
        let has_meta: bool = tx.query_one("SELECT to_regclass('meta') IS NOT NULL", &[])?.get(0);
        let mut version = 0i64;
        if has_meta {
            let app: Option<String> =
                tx.query_opt("SELECT value FROM meta WHERE key = 'application'", &[])?.map(|r| r.get(0));
            if app.as_deref() != Some("orch") {
                return Err(StoreError::NotALedgerSchema { url: self.display.clone(), schema: schema.into() });
            }
            version = tx
                .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])?
                .and_then(|r| r.get::<_, String>(0).parse().ok())
                .unwrap_or(0);
        } else if tables > 0 {
            return Err(StoreError::NotALedgerSchema { url: self.display.clone(), schema: schema.into() });
        } else if !create {
            return Err(StoreError::Missing { what: "ledger", id: format!("{} (schema {schema})", self.display) });
        }
        if version > PG_SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: PathBuf::from(&self.display),
                found: version,
                supported: PG_SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&(i + 1).to_string()],
            )?;
            tracing::info!(version = i + 1, schema, "applied ledger migration (PostgreSQL)");
        }
        tx.execute("INSERT INTO meta (key, value) VALUES ('application', 'orch') ON CONFLICT DO NOTHING", &[])?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('site_id', $1) ON CONFLICT DO NOTHING",
            &[&format!("site-{}", &new_token()[..16])],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Fills this (empty) ledger in one transaction, table by table, from the rows `dump`
    /// hands over for each table of [`crate::copy::TABLES`]; returns the rows per table.
    pub(crate) fn load(&self, dump: &mut crate::copy::Dump<'_>) -> Result<Vec<u64>, StoreError> {
        use crate::copy::{copy_text, Cell, TABLES};
        use std::io::Write;
        self.with_conn(|conn| {
            let mut tx = conn.client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&self.ledger_key])?;
            let used: i64 =
                tx.query_one("SELECT (SELECT count(*) FROM history) + (SELECT count(*) FROM jobs)", &[])?.get(0);
            if used > 0 {
                return Err(StoreError::Refused(format!("{}: the target ledger is not empty", self.display)));
            }
            let mut counts = vec![0u64; TABLES.len()];
            for (i, (name, cols)) in TABLES.iter().enumerate() {
                if *name == "meta" {
                    // The site keeps its id (and the target keeps its own schema version).
                    let mut rows = Vec::new();
                    dump(i, &mut |row| {
                        rows.push(row);
                        Ok(())
                    })?;
                    for row in &rows {
                        if let [Cell::Text(k), Cell::Text(v)] = row.as_slice() {
                            if k != "schema_version" && k != "application" {
                                tx.execute(
                                    "INSERT INTO meta (key, value) VALUES ($1, $2)
                                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                    &[k, v],
                                )?;
                            }
                        }
                    }
                    counts[i] = rows.len() as u64;
                    continue;
                }
                let mut w = tx.copy_in(&format!("COPY {name} ({}) FROM STDIN", cols.join(", ")))?;
                let mut line = String::new();
                let mut n = 0u64;
                dump(i, &mut |row| {
                    line.clear();
                    for (k, c) in row.iter().enumerate() {
                        if k > 0 {
                            line.push('\t');
                        }
                        copy_text(c, &mut line);
                    }
                    line.push('\n');
                    n += 1;
                    w.write_all(line.as_bytes()).map_err(|e| StoreError::Refused(format!("copying {name}: {e}")))
                })?;
                w.finish()?;
                counts[i] = n;
            }
            for table in ["runs", "schedules", "incidents", "webhooks"] {
                tx.execute(
                    &format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                         (SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)"
                    ),
                    &[],
                )?;
            }
            tx.commit()?;
            Ok(counts)
        })
    }

    fn connect(&self) -> Result<Conn, StoreError> {
        Ok(Conn { client: connect(&self.config, self.sync)?, stmts: HashMap::new() })
    }

    /// Runs `f` on a pooled connection.
    fn with_conn<R>(&self, f: impl FnOnce(&mut Conn) -> Result<R, StoreError>) -> Result<R, StoreError> {
        // Every call waits for the server.
        if !crate::wait::allowed() {
            return Err(StoreError::WouldWait);
        }
        off_runtime(|| {
            let pooled = lock(&self.pool).pop();
            let mut conn = match pooled {
                Some(c) if !c.client.is_closed() => c,
                _ => self.connect()?,
            };
            let out = f(&mut conn);
            if !conn.client.is_closed() {
                let mut pool = lock(&self.pool);
                if pool.len() < POOL {
                    pool.push(conn);
                }
            }
            out
        })
    }

    /// Runs `f` outside a transaction (each statement on its own).
    fn read<R>(&self, f: impl FnOnce(&mut Db<'_, Client>) -> Result<R, StoreError>) -> Result<R, StoreError> {
        self.with_conn(|conn| f(&mut Db { c: &mut conn.client, stmts: &mut conn.stmts }))
    }

    /// Runs `f` in one transaction; commits only if it succeeds.
    fn write<R>(&self, f: impl FnOnce(&mut Writer<'_, PgTx<'_>>) -> Result<R, StoreError>) -> Result<R, StoreError> {
        self.with_conn(|conn| {
            let tx = conn.client.transaction()?;
            let mut ptx = PgTx {
                tx,
                stmts: &mut conn.stmts,
                ledger_key: self.ledger_key,
                maxima: None,
                events: Vec::new(),
                projects: BTreeSet::new(),
                held: HashMap::new(),
                pending: BTreeMap::new(),
            };
            let mut w = Writer::new(&mut ptx, self.clock.now(), &self.opts);
            let out = f(&mut w)?;
            w.finish()?;
            ptx.flush_jobs()?;
            ptx.flush_events()?;
            ptx.tx.commit()?;
            Ok(out)
        })
    }
}

/// The PostgreSQL side of a write transaction. Round trips are what it costs, so it saves them:
/// the ledger's maxima are read once, right after the ledger lock; the jobs it locks are kept
/// (`held`), so that reading one again costs nothing; job rows are written in one statement
/// before the next statement that reads jobs (or the commit), and history rows in one statement
/// before the commit (nothing reads them back in between).
struct PgTx<'a> {
    tx: postgres::Transaction<'a>,
    stmts: &'a mut HashMap<String, Statement>,
    ledger_key: i64,
    /// Once the ledger lock is held: the highest history seq, job id and throttle seq.
    maxima: Option<(u64, JobId, u64)>,
    /// History rows to write before the commit.
    events: Vec<(Event, String)>,
    /// Projects recorded in this transaction.
    projects: BTreeSet<(String, String)>,
    /// Jobs this transaction locked or wrote, as they stand in it.
    held: HashMap<JobId, Job>,
    /// Job rows to write: their canonical document and whether the row is new.
    pending: BTreeMap<JobId, (String, bool)>,
}

impl<'a> PgTx<'a> {
    fn db(&mut self) -> Db<'_, postgres::Transaction<'a>> {
        Db { c: &mut self.tx, stmts: self.stmts }
    }

    /// Writes the buffered history rows in one statement.
    fn flush_events(&mut self) -> Result<(), StoreError> {
        if self.events.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut self.events);
        let seq: Vec<i64> = events.iter().map(|(e, _)| e.seq as i64).collect();
        let tenant: Vec<&str> = events.iter().map(|(e, _)| e.tenant.as_str()).collect();
        let job: Vec<Option<i64>> = events.iter().map(|(e, _)| e.job_id).collect();
        let kind: Vec<&str> = events.iter().map(|(e, _)| e.event.type_name()).collect();
        let at: Vec<i64> = events.iter().map(|(e, _)| e.at.as_millis()).collect();
        let corr: Vec<&str> = events.iter().map(|(e, _)| e.correlation_id.as_str()).collect();
        let hash: Vec<&str> = events.iter().map(|(e, _)| e.hash.as_str()).collect();
        let line: Vec<&str> = events.iter().map(|(_, l)| l.as_str()).collect();
        self.db().exec(
            "INSERT INTO history (seq, tenant, job_id, type, at, correlation_id, hash, line)
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[],
                                  $7::text[], $8::text[])",
            &[&seq, &tenant, &job, &kind, &at, &corr, &hash, &line],
        )?;
        Ok(())
    }

    /// Writes the pending job rows: new ones in one statement, changed ones in another.
    fn flush_jobs(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        for insert in [true, false] {
            let rows: Vec<(&Job, &str)> = pending
                .iter()
                .filter(|(_, (_, i))| *i == insert)
                .map(|(id, (doc, _))| (&self.held[id], doc.as_str()))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let id: Vec<i64> = rows.iter().map(|(j, _)| j.id).collect();
            let tenant: Vec<&str> = rows.iter().map(|(j, _)| j.tenant.as_str()).collect();
            let project: Vec<&str> = rows.iter().map(|(j, _)| j.project.as_str()).collect();
            let queue: Vec<&str> = rows.iter().map(|(j, _)| j.spec.queue.as_str()).collect();
            let source: Vec<Option<&str>> = rows.iter().map(|(j, _)| j.spec.source.as_deref()).collect();
            let state: Vec<&str> = rows.iter().map(|(j, _)| j.state.as_str()).collect();
            let priority: Vec<i64> = rows.iter().map(|(j, _)| i64::from(j.spec.priority)).collect();
            let run_after: Vec<i64> = rows.iter().map(|(j, _)| j.spec.run_after.as_millis()).collect();
            let lease_id: Vec<Option<&str>> =
                rows.iter().map(|(j, _)| j.lease.as_ref().map(|l| l.id.as_str())).collect();
            let lease_exp: Vec<Option<i64>> =
                rows.iter().map(|(j, _)| j.lease.as_ref().map(|l| l.expires_at.as_millis())).collect();
            let key: Vec<Option<&str>> = rows.iter().map(|(j, _)| j.spec.idempotency_key.as_deref()).collect();
            let corr: Vec<&str> = rows.iter().map(|(j, _)| j.correlation_id.as_str()).collect();
            let updated: Vec<i64> = rows.iter().map(|(j, _)| j.updated_at.as_millis()).collect();
            let doc: Vec<&str> = rows.iter().map(|(_, d)| *d).collect();
            let run: Vec<Option<i64>> = rows.iter().map(|(j, _)| j.spec.run).collect();
            let error_class: Vec<Option<&str>> =
                rows.iter().map(|(j, _)| j.last_error.as_ref().map(|e| e.class.as_str())).collect();
            let unnest =
                "UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                                 $8::bigint[], $9::text[], $10::bigint[], $11::text[], $12::text[], $13::bigint[],
                                 $14::text[], $15::bigint[], $16::text[])";
            let sql = if insert {
                format!(
                    "INSERT INTO jobs (id, tenant, project, queue, source, state, priority, run_after, lease_id,
                                       lease_expires_at, idempotency_key, correlation_id, updated_at, doc, run_id,
                                       last_error_class)
                     SELECT * FROM {unnest}"
                )
            } else {
                // Only what a state change can change (see `Tx::write_job`).
                format!(
                    "UPDATE jobs SET state = u.state, run_after = u.run_after, lease_id = u.lease_id,
                        lease_expires_at = u.lease_expires_at, updated_at = u.updated_at, doc = u.doc,
                        last_error_class = u.last_error_class
                     FROM {unnest} AS u (id, tenant, project, queue, source, state, priority, run_after, lease_id,
                        lease_expires_at, idempotency_key, correlation_id, updated_at, doc, run_id, last_error_class)
                     WHERE jobs.id = u.id"
                )
            };
            let params: [Param<'_>; 16] = [
                &id,
                &tenant,
                &project,
                &queue,
                &source,
                &state,
                &priority,
                &run_after,
                &lease_id,
                &lease_exp,
                &key,
                &corr,
                &updated,
                &doc,
                &run,
                &error_class,
            ];
            let st = prepared(self.stmts, &mut self.tx, &sql)?;
            self.tx.execute(&st, &params)?;
        }
        Ok(())
    }

    /// Keeps jobs this transaction locked.
    fn hold(&mut self, jobs: Vec<Job>) -> Vec<Job> {
        for j in &jobs {
            self.held.entry(j.id).or_insert_with(|| j.clone());
        }
        jobs
    }

    /// The ledger's maxima, read under the ledger lock.
    fn maxima(&mut self) -> Result<&mut (u64, JobId, u64), StoreError> {
        self.lock_ledger()?;
        Ok(self.maxima.as_mut().expect("read with the lock"))
    }

    /// Jobs a locking query selects (after the pending rows are written), held.
    fn jobs(&mut self, sql: &str, p: &[Param<'_>]) -> Result<Vec<Job>, StoreError> {
        self.flush_jobs()?;
        let jobs = self.db().query(sql, p)?.iter().map(|r| decode_job(r.get(0))).collect::<Result<Vec<_>, _>>()?;
        Ok(self.hold(jobs))
    }
}

impl Tx for PgTx<'_> {
    fn lock_ledger(&mut self) -> Result<(), StoreError> {
        if self.maxima.is_none() {
            let key = self.ledger_key;
            self.db().exec("SELECT pg_advisory_xact_lock($1)", &[&key])?;
            // A statement of its own: in READ COMMITTED it sees every commit made before the
            // lock was granted.
            let r = self.db().one(
                "SELECT (SELECT COALESCE(MAX(seq), 0) FROM history), (SELECT COALESCE(MAX(id), 0) FROM jobs),
                        (SELECT COALESCE(MAX(seq), 0) FROM throttles)",
                &[],
            )?;
            self.maxima = Some((r.get::<_, i64>(0) as u64, r.get(1), r.get::<_, i64>(2) as u64));
        }
        Ok(())
    }

    fn max_seq(&mut self) -> Result<u64, StoreError> {
        Ok(self.maxima()?.0)
    }

    fn max_job_id(&mut self) -> Result<JobId, StoreError> {
        Ok(self.maxima()?.1)
    }

    fn max_throttle_seq(&mut self) -> Result<u64, StoreError> {
        Ok(self.maxima()?.2)
    }

    fn tenant_head(&mut self, tenant: &str) -> Result<Option<String>, StoreError> {
        Ok(self.db().opt("SELECT head_hash FROM tenants WHERE id = $1", &[&tenant])?.map(|r| r.get(0)))
    }

    fn set_tenant_head(&mut self, tenant: &str, seq: u64, hash: &str) -> Result<(), StoreError> {
        self.db().exec(
            "INSERT INTO tenants (id, head_seq, head_hash) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET head_seq = excluded.head_seq, head_hash = excluded.head_hash",
            &[&tenant, &(seq as i64), &hash],
        )?;
        Ok(())
    }

    fn insert_event(&mut self, ev: &Event, line: &str) -> Result<(), StoreError> {
        let m = self.maxima()?;
        m.0 = m.0.max(ev.seq);
        self.events.push((ev.clone(), line.to_string()));
        Ok(())
    }

    fn write_job(&mut self, job: &Job, doc: &str, insert: bool) -> Result<(), StoreError> {
        if insert {
            let m = self.maxima()?;
            m.1 = m.1.max(job.id);
        }
        self.held.insert(job.id, job.clone());
        let entry = self.pending.entry(job.id).or_insert_with(|| (String::new(), insert));
        entry.0 = doc.to_string();
        Ok(())
    }

    fn load_job(&mut self, scope: &Scope, id: JobId) -> Result<Job, StoreError> {
        if !self.held.contains_key(&id) {
            let row = self.db().opt("SELECT doc FROM jobs WHERE id = $1 FOR UPDATE", &[&id])?;
            let Some(r) = row else { return Err(StoreError::NotFound(id)) };
            self.held.insert(id, decode_job(r.get(0))?);
        }
        match self.held.get(&id) {
            Some(job) if scope.allows(&job.tenant) => Ok(job.clone()),
            _ => Err(StoreError::NotFound(id)),
        }
    }

    fn lock_jobs(&mut self, ids: &[JobId]) -> Result<(), StoreError> {
        let ids: Vec<JobId> = ids.iter().copied().filter(|id| !self.held.contains_key(id)).collect();
        if !ids.is_empty() {
            self.jobs("SELECT doc FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE", &[&ids])?;
        }
        Ok(())
    }

    fn job_by_key(&mut self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError> {
        let held = self.held.values().find(|j| j.tenant == tenant && j.spec.idempotency_key.as_deref() == Some(key));
        if let Some(job) = held {
            return Ok(Some(job.clone()));
        }
        let row = self.db().opt("SELECT doc FROM jobs WHERE tenant = $1 AND idempotency_key = $2", &[&tenant, &key])?;
        row.map(|r| decode_job(r.get(0))).transpose()
    }

    fn job_tenant_state(&mut self, id: JobId) -> Result<Option<(String, String)>, StoreError> {
        if let Some(j) = self.held.get(&id) {
            return Ok(Some((j.tenant.clone(), j.state.as_str().to_string())));
        }
        Ok(self.db().opt("SELECT tenant, state FROM jobs WHERE id = $1", &[&id])?.map(|r| (r.get(0), r.get(1))))
    }

    fn add_project(&mut self, tenant: &str, project: &str) -> Result<(), StoreError> {
        if self.projects.insert((tenant.to_string(), project.to_string())) {
            self.db().exec(
                "INSERT INTO projects (tenant, id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&tenant, &project],
            )?;
        }
        Ok(())
    }

    fn add_edge(&mut self, parent: JobId, child: JobId) -> Result<(), StoreError> {
        self.flush_jobs()?;
        self.db().exec("INSERT INTO dag_edges (parent, child) VALUES ($1, $2)", &[&parent, &child])?;
        Ok(())
    }

    fn add_artifact(&mut self, job: JobId, m: &Artifact, content: &[u8]) -> Result<(), StoreError> {
        let size = m.size as i64;
        self.db().exec(
            "INSERT INTO artifacts (sha256, size, content) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&m.sha256, &size, &content],
        )?;
        self.db().exec(
            "INSERT INTO job_artifacts (job_id, name, media_type, size, sha256) VALUES ($1, $2, $3, $4, $5)",
            &[&job, &m.name, &m.media_type, &size, &m.sha256],
        )?;
        Ok(())
    }

    fn insert_throttle(&mut self, r: &ThrottleRecord, line: &str) -> Result<(), StoreError> {
        let m = self.maxima()?;
        m.2 = m.2.max(r.seq);
        self.db().exec(
            "INSERT INTO throttles (seq, tenant, host, at, line) VALUES ($1, $2, $3, $4, $5)",
            &[&(r.seq as i64), &r.tenant, &r.host, &r.at.as_millis(), &line],
        )?;
        Ok(())
    }

    fn queued_children(&mut self, parent: JobId) -> Result<Vec<Job>, StoreError> {
        self.jobs(
            "SELECT j.doc FROM dag_edges e JOIN jobs j ON j.id = e.child
             WHERE e.parent = $1 AND j.state = 'queued' ORDER BY j.id FOR UPDATE OF j",
            &[&parent],
        )
    }

    fn ready_jobs(
        &mut self,
        req: &ClaimRequest,
        now: Timestamp,
        excluded: &BTreeSet<Exclusion>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let mut candidates: Vec<Job> = Vec::new();
        for queue in &req.queues {
            let mut q = Query::new("SELECT doc FROM jobs WHERE state = 'queued'");
            q.cond("queue =", queue.clone());
            q.cond("run_after <=", now.as_millis());
            if let Some(t) = req.scope.tenant() {
                q.cond("tenant =", t.to_string());
            }
            for x in excluded {
                match x {
                    Exclusion::Tenant(t) => q.cond("tenant <>", t.clone()),
                    Exclusion::Queue(t, qu) if qu == queue => q.cond("tenant <>", t.clone()),
                    Exclusion::Queue(..) => {}
                    Exclusion::Source(t, src) => {
                        let (a, b) = (q.arg(t.clone()), q.arg(src.clone()));
                        q.sql.push_str(&format!(" AND NOT (tenant = {a} AND source IS NOT DISTINCT FROM {b})"));
                    }
                }
            }
            let n = q.arg(limit as i64);
            q.sql.push_str(&format!(
                " AND NOT EXISTS (SELECT 1 FROM dag_edges e JOIN jobs p ON p.id = e.parent
                                  WHERE e.child = jobs.id AND p.state <> 'succeeded')
                 ORDER BY priority DESC, run_after, id LIMIT {n} FOR UPDATE OF jobs SKIP LOCKED"
            ));
            self.flush_jobs()?;
            for r in self.db().built(&q)? {
                candidates.push(decode_job(r.get(0))?);
            }
        }
        if req.queues.len() > 1 {
            candidates.sort_by(|a, b| {
                b.spec
                    .priority
                    .cmp(&a.spec.priority)
                    .then(a.spec.run_after.cmp(&b.spec.run_after))
                    .then(a.id.cmp(&b.id))
            });
            candidates.truncate(limit);
        }
        Ok(self.hold(candidates))
    }

    fn running_counts(&mut self) -> Result<Vec<RunningCount>, StoreError> {
        self.flush_jobs()?;
        let rows = self
            .db()
            .query("SELECT tenant, queue, source, count(*) FROM jobs WHERE state = 'running' GROUP BY 1, 2, 3", &[])?;
        Ok(rows
            .iter()
            .map(|r| RunningCount {
                tenant: r.get(0),
                queue: r.get(1),
                source: r.get(2),
                count: r.get::<_, i64>(3) as u64,
            })
            .collect())
    }

    fn expired_leases(&mut self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.jobs(
            "SELECT doc FROM jobs WHERE state = 'running' AND lease_expires_at <= $1
             ORDER BY lease_expires_at, id LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[&now.as_millis(), &(limit as i64)],
        )
    }

    fn put_setting_row(&mut self, change: &SettingChange, host: Option<&str>, doc: &str) -> Result<(), StoreError> {
        let (t, id) = (&change.tenant, &change.id);
        match change.kind {
            SettingKind::Source => self.db().exec(
                "INSERT INTO sources (tenant, id, host, config) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant, id) DO UPDATE SET host = excluded.host, config = excluded.config",
                &[t, id, &host, &doc],
            )?,
            SettingKind::Quota => self.db().exec(
                "INSERT INTO quotas (tenant, queue, doc) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant, queue) DO UPDATE SET doc = excluded.doc",
                &[t, id, &doc],
            )?,
            kind => self.db().exec(
                "INSERT INTO flow_settings (tenant, kind, id, doc) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant, kind, id) DO UPDATE SET doc = excluded.doc",
                &[t, &kind.as_str(), id, &doc],
            )?,
        };
        Ok(())
    }

    fn delete_setting_row(&mut self, change: &SettingChange) -> Result<u64, StoreError> {
        let (t, id) = (&change.tenant, &change.id);
        let n = match change.kind {
            SettingKind::Source => self.db().exec("DELETE FROM sources WHERE tenant = $1 AND id = $2", &[t, id])?,
            SettingKind::Quota => self.db().exec("DELETE FROM quotas WHERE tenant = $1 AND queue = $2", &[t, id])?,
            kind => self.db().exec(
                "DELETE FROM flow_settings WHERE tenant = $1 AND kind = $2 AND id = $3",
                &[t, &kind.as_str(), id],
            )?,
        };
        if change.kind == SettingKind::Schedule {
            self.db().exec("DELETE FROM schedule_state WHERE tenant = $1 AND id = $2", &[t, id])?;
        }
        Ok(n)
    }

    fn open_incidents(&mut self) -> Result<Vec<Incident>, StoreError> {
        self.db()
            .query(
                "SELECT id, tenant, kind, key, opened_at, closed_at, doc FROM incidents WHERE closed_at IS NULL",
                &[],
            )?
            .iter()
            .map(incident_row)
            .collect()
    }

    fn insert_incident(&mut self, c: &IncidentSpec, at: Timestamp) -> Result<i64, StoreError> {
        let doc = ledger::incident_doc(c)?;
        Ok(self
            .db()
            .one(
                "INSERT INTO incidents (tenant, kind, key, opened_at, doc) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[&c.tenant, &c.kind, &c.key, &at.as_millis(), &doc],
            )?
            .get(0))
    }

    fn close_incident(&mut self, id: i64, at: Timestamp) -> Result<(), StoreError> {
        self.db().exec("UPDATE incidents SET closed_at = $1 WHERE id = $2", &[&at.as_millis(), &id])?;
        Ok(())
    }

    fn dead_jobs(&mut self, scope: &Scope, queue: Option<&str>, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.jobs(
            "SELECT doc FROM jobs WHERE state = 'dead' AND ($1::text IS NULL OR tenant = $1)
             AND ($2::text IS NULL OR queue = $2) ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
            &[&scope.tenant(), &queue, &(limit as i64)],
        )
    }
}

/// A SELECT built from optional conditions, with numbered parameters.
struct Query {
    sql: String,
    args: Vec<Box<dyn ToSql + Sync>>,
}

impl Query {
    fn new(base: &str) -> Query {
        Query { sql: base.to_string(), args: Vec::new() }
    }

    /// Adds a parameter; returns its placeholder.
    fn arg(&mut self, v: impl ToSql + Sync + 'static) -> String {
        self.args.push(Box::new(v));
        format!("${}", self.args.len())
    }

    /// ` AND <lhs> $n`.
    fn cond(&mut self, lhs: &str, v: impl ToSql + Sync + 'static) {
        let p = self.arg(v);
        self.sql.push_str(&format!(" AND {lhs} {p}"));
    }

    fn conds(&mut self, conds: Vec<ledger::Cond>) {
        for (lhs, v) in conds {
            match v {
                ledger::Arg::Text(t) => self.cond(lhs, t),
                ledger::Arg::Int(i) => self.cond(lhs, i),
            }
        }
    }

    fn opt<T: ToSql + Sync + 'static>(&mut self, lhs: &str, v: Option<T>) {
        if let Some(v) = v {
            self.cond(lhs, v);
        }
    }

    /// Keyset pagination on `key` (after `after`), with `decode` reading column 1.
    fn page<T>(
        mut self,
        db: &mut Db<'_, Client>,
        key: &str,
        after: i64,
        limit: usize,
        decode: impl Fn(&str) -> Result<T, StoreError>,
    ) -> Result<Page<T>, StoreError> {
        let limit = limit.clamp(1, 1000);
        self.cond(&format!("{key} >"), after);
        self.sql.push_str(&format!(" ORDER BY {key} LIMIT {}", limit + 1));
        let rows = db.built(&self)?;
        let more = rows.len() > limit;
        let mut items = Vec::with_capacity(limit.min(rows.len()));
        let mut last = None;
        for r in rows.iter().take(limit) {
            last = Some(r.get::<_, i64>(0));
            items.push(decode(r.get(1))?);
        }
        Ok(Page { items, next_after: if more { last } else { None } })
    }
}

fn incident_row(r: &Row) -> Result<Incident, StoreError> {
    let doc: &str = r.get(6);
    Ok(Incident {
        id: r.get(0),
        tenant: r.get(1),
        kind: r.get(2),
        key: r.get(3),
        opened_at: Timestamp::from_millis(r.get(4)),
        closed_at: r.get::<_, Option<i64>>(5).map(Timestamp::from_millis),
        details: serde_json::from_str(doc).map_err(|e| StoreError::Corrupt(format!("incident doc: {e}")))?,
    })
}

fn token_row(r: &Row) -> TokenRecord {
    let scopes: &str = r.get(2);
    TokenRecord {
        id: r.get(0),
        tenant: r.get(1),
        scopes: scopes.split_whitespace().map(str::to_string).collect(),
        label: r.get(3),
        created_at: Timestamp::from_millis(r.get(4)),
        expires_at: r.get::<_, Option<i64>>(5).map(Timestamp::from_millis),
        revoked_at: r.get::<_, Option<i64>>(6).map(Timestamp::from_millis),
    }
}

const TOKEN_SELECT: &str = "SELECT id, tenant, scopes, label, created_at, expires_at, revoked_at FROM api_tokens";

fn decode_run(db: &mut Db<'_, Client>, id: i64, tenant: String, project: String, doc: &str) -> Result<Run, StoreError> {
    let mut jobs = BTreeMap::new();
    for r in
        db.query("SELECT state, count(*) FROM jobs WHERE tenant = $1 AND run_id = $2 GROUP BY state", &[&tenant, &id])?
    {
        jobs.insert(r.get::<_, String>(0), r.get::<_, i64>(1) as u64);
    }
    ledger::decode_run(id, tenant, project, doc, jobs)
}

impl Store for PgStore {
    ledger::write_verbs!();

    fn job(&self, scope: &Scope, id: JobId) -> Result<Job, StoreError> {
        self.read(|db| match db.opt("SELECT tenant, doc FROM jobs WHERE id = $1", &[&id])? {
            Some(r) if scope.allows(r.get(0)) => decode_job(r.get(1)),
            _ => Err(StoreError::NotFound(id)),
        })
    }

    fn jobs(&self, scope: &Scope, filter: &JobFilter, page: PageRequest) -> Result<Page<Job>, StoreError> {
        let mut q = Query::new("SELECT id, doc FROM jobs WHERE true");
        q.conds(ledger::job_conditions(scope, filter));
        self.read(|db| q.page(db, "id", page.after, page.limit, decode_job))
    }

    fn history(&self, scope: &Scope, filter: &HistoryFilter, page: PageRequest) -> Result<Page<Event>, StoreError> {
        let mut q = Query::new("SELECT seq, line FROM history WHERE true");
        q.conds(ledger::history_conditions(scope, filter));
        self.read(|db| q.page(db, "seq", page.after, page.limit, decode_event))
    }

    fn artifact(&self, scope: &Scope, job: JobId, name: &str) -> Result<(Artifact, Vec<u8>), StoreError> {
        self.job(scope, job)?;
        self.read(|db| {
            let row = db.opt(
                "SELECT ja.media_type, ja.size, ja.sha256, a.content FROM job_artifacts ja
                 JOIN artifacts a ON a.sha256 = ja.sha256 WHERE ja.job_id = $1 AND ja.name = $2",
                &[&job, &name],
            )?;
            let r = row.ok_or_else(|| StoreError::ArtifactNotFound { job, name: name.to_string() })?;
            let meta = Artifact {
                name: name.to_string(),
                media_type: r.get(0),
                size: r.get::<_, i64>(1) as u64,
                sha256: r.get(2),
            };
            Ok((meta, r.get(3)))
        })
    }

    fn snapshot(&self, f: &mut dyn FnMut(&dyn SnapshotReader) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            let tx = conn
                .client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let tx = std::cell::RefCell::new(tx);
            let out = f(&PgSnapshot { tx: &tx, origin: None });
            tx.into_inner().commit()?;
            out
        })
    }

    fn stats(&self, scope: &Scope) -> Result<Stats, StoreError> {
        let tenant = scope.tenant();
        self.read(|db| {
            let mut stats = Stats::default();
            for r in db.query(
                "SELECT state, count(*) FROM jobs WHERE ($1::text IS NULL OR tenant = $1) GROUP BY state",
                &[&tenant],
            )? {
                stats.by_state.insert(r.get(0), r.get::<_, i64>(1) as u64);
            }
            stats.events = db
                .one("SELECT count(*) FROM history WHERE ($1::text IS NULL OR tenant = $1)", &[&tenant])?
                .get::<_, i64>(0) as u64;
            Ok(stats)
        })
    }

    fn depth(&self, scope: &Scope) -> Result<Vec<Depth>, StoreError> {
        let tenant = scope.tenant();
        self.read(|db| {
            let rows = db.query(
                "SELECT tenant, queue, state, count(*) FROM jobs WHERE ($1::text IS NULL OR tenant = $1)
                 GROUP BY tenant, queue, state ORDER BY tenant, queue, state",
                &[&tenant],
            )?;
            Ok(rows
                .iter()
                .map(|r| Depth { tenant: r.get(0), queue: r.get(1), state: r.get(2), jobs: r.get::<_, i64>(3) as u64 })
                .collect())
        })
    }

    fn failures(&self, scope: &Scope, since: Timestamp, limit: usize) -> Result<Vec<FailureRecord>, StoreError> {
        let tenant = scope.tenant();
        let limit = limit.clamp(1, 100_000) as i64;
        self.read(|db| {
            let rows = db.query(
                "SELECT h.line, j.source, j.queue FROM history h JOIN jobs j ON j.id = h.job_id
                 WHERE h.type IN ('job.failed', 'job.lease_expired') AND h.at >= $1
                   AND ($2::text IS NULL OR h.tenant = $2)
                 ORDER BY h.seq DESC LIMIT $3",
                &[&since.as_millis(), &tenant, &limit],
            )?;
            rows.iter().rev().map(|r| failure_record(r.get(0), r.get(1), r.get(2))).collect()
        })
    }

    #[instrument(skip_all, fields(kind = %run.kind, jobs = jobs.len()))]
    fn start_run(&self, actor: &str, run: NewRun, jobs: Vec<NewJob>) -> Result<(Run, Vec<Enqueued>), StoreError> {
        check_run(&self.opts, &run, &jobs)?;
        let (id, enqueued) = self.write(|w| {
            let doc = ledger::run_doc(&run, actor, w.now).to_string();
            let id: i64 =
                w.tx.db()
                    .one(
                        "INSERT INTO runs (tenant, project, state, doc) VALUES ($1, $2, 'started', $3) RETURNING id",
                        &[&run.tenant, &run.project, &doc],
                    )?
                    .get(0);
            Ok((id, ledger::start_run(w, actor, id, &run, jobs)?))
        })?;
        Ok((self.run(&Scope::Tenant(run.tenant), id)?, enqueued))
    }

    fn run(&self, scope: &Scope, id: i64) -> Result<Run, StoreError> {
        self.read(|db| match db.opt("SELECT tenant, project, doc FROM runs WHERE id = $1", &[&id])? {
            Some(r) if scope.allows(r.get(0)) => {
                let doc: String = r.get(2);
                decode_run(db, id, r.get(0), r.get(1), &doc)
            }
            _ => Err(StoreError::Missing { what: "run", id: id.to_string() }),
        })
    }

    fn runs(&self, scope: &Scope, page: PageRequest) -> Result<Page<Run>, StoreError> {
        let limit = page.limit.clamp(1, 1000);
        let tenant = scope.tenant();
        self.read(|db| {
            let rows = db.query(
                "SELECT id, tenant, project, doc FROM runs WHERE id > $1 AND ($2::text IS NULL OR tenant = $2)
                 ORDER BY id LIMIT $3",
                &[&page.after, &tenant, &(limit as i64 + 1)],
            )?;
            let more = rows.len() > limit;
            let mut items = Vec::new();
            for r in rows.iter().take(limit) {
                let doc: String = r.get(3);
                items.push(decode_run(db, r.get(0), r.get(1), r.get(2), &doc)?);
            }
            let next_after = if more { items.last().map(|r| r.id) } else { None };
            Ok(Page { items, next_after })
        })
    }

    fn settings(&self, scope: &Scope, kind: SettingKind) -> Result<Vec<Setting>, StoreError> {
        let tenant = scope.tenant();
        self.read(|db| {
            let rows = match kind {
                SettingKind::Source => db.query(
                    "SELECT tenant, id, config FROM sources WHERE ($1::text IS NULL OR tenant = $1) ORDER BY 1, 2",
                    &[&tenant],
                )?,
                SettingKind::Quota => db.query(
                    "SELECT tenant, queue, doc FROM quotas WHERE ($1::text IS NULL OR tenant = $1) ORDER BY 1, 2",
                    &[&tenant],
                )?,
                kind => db.query(
                    "SELECT tenant, id, doc FROM flow_settings WHERE kind = $2 AND ($1::text IS NULL OR tenant = $1)
                     ORDER BY 1, 2",
                    &[&tenant, &kind.as_str()],
                )?,
            };
            rows.iter()
                .map(|r| {
                    let doc =
                        serde_json::from_str(r.get(2)).map_err(|e| StoreError::Corrupt(format!("setting: {e}")))?;
                    Ok(Setting { tenant: r.get(0), kind, id: r.get(1), doc })
                })
                .collect()
        })
    }

    fn throttles(&self, scope: &Scope, page: PageRequest) -> Result<Page<ThrottleRecord>, StoreError> {
        let mut q = Query::new("SELECT seq, line FROM throttles WHERE true");
        q.opt("tenant =", scope.tenant().map(String::from));
        self.read(|db| q.page(db, "seq", page.after, page.limit, decode_throttle))
    }

    fn job_by_key(&self, tenant: &str, key: &str) -> Result<Option<Job>, StoreError> {
        self.read(|db| {
            let row = db.opt("SELECT doc FROM jobs WHERE tenant = $1 AND idempotency_key = $2", &[&tenant, &key])?;
            row.map(|r| decode_job(r.get(0))).transpose()
        })
    }

    fn queued(&self, tenant: &str, queue: Option<&str>, cap: u64) -> Result<u64, StoreError> {
        let cap = cap.min(i64::MAX as u64) as i64;
        self.read(|db| {
            let n: i64 = db
                .one(
                    "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant = $1 AND state = 'queued'
                     AND ($2::text IS NULL OR queue = $2) LIMIT $3) q",
                    &[&tenant, &queue, &cap],
                )?
                .get(0);
            Ok(n as u64)
        })
    }

    fn schedule_fired(&self, tenant: &str, id: &str) -> Result<Option<(Timestamp, Option<JobId>)>, StoreError> {
        self.read(|db| {
            let row = db.opt(
                "SELECT last_fired, last_job FROM schedule_state WHERE tenant = $1 AND id = $2",
                &[&tenant, &id],
            )?;
            Ok(row.map(|r| (Timestamp::from_millis(r.get(0)), r.get(1))))
        })
    }

    fn set_schedule_fired(&self, tenant: &str, id: &str, at: Timestamp, job: Option<JobId>) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.db().exec(
                "INSERT INTO schedule_state (tenant, id, last_fired, last_job) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant, id) DO UPDATE SET last_fired = excluded.last_fired, last_job = excluded.last_job",
                &[&tenant, &id, &at.as_millis(), &job],
            )?;
            Ok(())
        })
    }

    fn incidents(&self, scope: &Scope, open: Option<bool>, page: PageRequest) -> Result<Page<Incident>, StoreError> {
        let after = if page.after == 0 { i64::MAX } else { page.after };
        let limit = page.limit.clamp(1, 1000);
        let mut q = Query::new("SELECT id, tenant, kind, key, opened_at, closed_at, doc FROM incidents WHERE true");
        q.cond("id <", after);
        q.opt("tenant =", scope.tenant().map(String::from));
        match open {
            Some(true) => q.sql.push_str(" AND closed_at IS NULL"),
            Some(false) => q.sql.push_str(" AND closed_at IS NOT NULL"),
            None => {}
        }
        q.sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));
        self.read(|db| {
            let mut items = db.built(&q)?.iter().map(incident_row).collect::<Result<Vec<_>, _>>()?;
            let more = items.len() > limit;
            items.truncate(limit);
            let next_after = if more { items.last().map(|i| i.id) } else { None };
            Ok(Page { items, next_after })
        })
    }

    fn stuck_jobs(&self, quiet_since: Timestamp, lease_losses: u32, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.read(|db| {
            let mut out = Vec::new();
            for r in db.query(
                "SELECT doc FROM jobs WHERE state = 'running' AND updated_at < $1 ORDER BY id LIMIT $2",
                &[&quiet_since.as_millis(), &(limit as i64)],
            )? {
                out.push(decode_job(r.get(0))?);
            }
            // The partial index `jobs_lease_lost` holds exactly these rows.
            for r in db.query(
                "SELECT doc, (SELECT count(*) FROM history h WHERE h.job_id = jobs.id AND h.type = 'job.lease_expired')
                 FROM jobs
                 WHERE state IN ('queued', 'running') AND last_error_class = 'lease_expired'
                 ORDER BY tenant, id",
                &[],
            )? {
                if out.len() >= limit {
                    break;
                }
                if r.get::<_, i64>(1) >= i64::from(lease_losses) {
                    let job = decode_job(r.get(0))?;
                    if !out.iter().any(|j: &Job| j.id == job.id) {
                        out.push(job);
                    }
                }
            }
            Ok(out)
        })
    }

    fn put_token(&self, t: NewToken) -> Result<TokenRecord, StoreError> {
        check_token(&t)?;
        self.write(|w| {
            let row = w.tx.db().one(
                &format!(
                    "INSERT INTO api_tokens (id, tenant, scopes, label, hash, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     RETURNING {}",
                    &TOKEN_SELECT["SELECT ".len()..TOKEN_SELECT.len() - " FROM api_tokens".len()]
                ),
                &[
                    &t.id,
                    &t.tenant,
                    &t.scopes.join(" "),
                    &t.label,
                    &t.hash,
                    &w.now.as_millis(),
                    &t.expires_at.map(|e| e.as_millis()),
                ],
            )?;
            Ok(token_row(&row))
        })
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(|db| Ok(db.opt(&format!("{TOKEN_SELECT} WHERE hash = $1"), &[&hash])?.map(|r| token_row(&r))))
    }

    fn revoke_token(&self, id: &str) -> Result<TokenRecord, StoreError> {
        self.write(|w| {
            w.tx.db().exec(
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
                &[&id, &w.now.as_millis()],
            )?;
            w.tx.db()
                .opt(&format!("{TOKEN_SELECT} WHERE id = $1"), &[&id])?
                .map(|r| token_row(&r))
                .ok_or_else(|| StoreError::Missing { what: "token", id: id.to_string() })
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|db| Ok(db.query(&format!("{TOKEN_SELECT} ORDER BY id"), &[])?.iter().map(token_row).collect()))
    }

    fn idempotency_begin(&self, tenant: &str, key: &str, fingerprint: &str) -> Result<IdempotencyBegin, StoreError> {
        self.write(|w| {
            let now = w.now.as_millis();
            // Inserted or not, the row is then locked: concurrent requests with one key queue here.
            let inserted = w.tx.db().exec(
                "INSERT INTO idempotency (tenant, key, fingerprint, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&tenant, &key, &fingerprint, &now],
            )?;
            if inserted == 1 {
                return Ok(IdempotencyBegin::Started);
            }
            let r = w.tx.db().one(
                "SELECT fingerprint, status, response FROM idempotency WHERE tenant = $1 AND key = $2 FOR UPDATE",
                &[&tenant, &key],
            )?;
            let (f, status, body): (String, Option<i64>, Option<Vec<u8>>) = (r.get(0), r.get(1), r.get(2));
            Ok(match status {
                _ if f != fingerprint => IdempotencyBegin::Mismatch,
                Some(status) => IdempotencyBegin::Replay { status: status as u16, body: body.unwrap_or_default() },
                None => IdempotencyBegin::InFlight,
            })
        })
    }

    fn idempotency_finish(&self, tenant: &str, key: &str, status: u16, body: &[u8]) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.db().exec(
                "UPDATE idempotency SET status = $3, response = $4 WHERE tenant = $1 AND key = $2",
                &[&tenant, &key, &i64::from(status), &body],
            )?;
            Ok(())
        })
    }

    fn idempotency_release(&self, tenant: &str, key: &str) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.db()
                .exec("DELETE FROM idempotency WHERE tenant = $1 AND key = $2 AND status IS NULL", &[&tenant, &key])?;
            Ok(())
        })
    }

    fn purge_idempotency(&self, before: Timestamp) -> Result<usize, StoreError> {
        self.write(|w| {
            Ok(w.tx.db().exec("DELETE FROM idempotency WHERE created_at < $1", &[&before.as_millis()])? as usize)
        })
    }

    fn import_state(&self, site_id: &str, scope: &str) -> Result<Option<ImportState>, StoreError> {
        self.read(|db| {
            let Some(r) = db.opt(
                "SELECT to_seq, manifest_sha256, anchor_at, root_version, bundles FROM import_sites
                 WHERE site_id = $1 AND scope = $2",
                &[&site_id, &scope],
            )?
            else {
                return Ok(None);
            };
            let mut heads = BTreeMap::new();
            for h in db.query(
                "SELECT DISTINCT ON (tenant) tenant, hash FROM imported_history WHERE site_id = $1
                 ORDER BY tenant, seq DESC",
                &[&site_id],
            )? {
                let tenant: String = h.get(0);
                if scope == "*" || scope == tenant {
                    heads.insert(tenant, h.get(1));
                }
            }
            Ok(Some(ImportState {
                site_id: site_id.to_string(),
                scope: scope.to_string(),
                to_seq: r.get::<_, i64>(0) as u64,
                manifest_sha256: r.get(1),
                anchor_at: Timestamp::from_millis(r.get(2)),
                root_version: r.get::<_, i64>(3) as u64,
                bundles: r.get::<_, i64>(4) as u64,
                heads,
            }))
        })
    }

    fn bundle_imported(&self, manifest_sha256: &str) -> Result<bool, StoreError> {
        self.read(|db| {
            Ok(db.opt("SELECT 1 FROM import_bundles WHERE manifest_sha256 = $1", &[&manifest_sha256])?.is_some())
        })
    }

    #[instrument(skip_all, fields(site = %batch.site_id, from = batch.from_seq, to = batch.to_seq))]
    fn apply_import(&self, actor: &str, batch: ImportBatch) -> Result<ImportOutcome, StoreError> {
        self.write(|w| {
            w.tx.lock_ledger()?;
            let site = &batch.site_id;
            let current: Option<i64> = w
                .tx
                .db()
                .opt("SELECT to_seq FROM import_sites WHERE site_id = $1 AND scope = $2", &[site, &batch.scope])?
                .map(|r| r.get(0));
            if current.map(|v| v as u64) != batch.expect_to_seq {
                return Err(StoreError::Refused(format!(
                    "the import state of site {site} changed while this bundle was planned; plan it again"
                )));
            }
            if w.tx.db().opt("SELECT 1 FROM import_bundles WHERE manifest_sha256 = $1", &[&batch.manifest_sha256])?.is_some()
            {
                return Err(StoreError::Refused("this bundle was imported already".into()));
            }
            for (ev, line) in &batch.events {
                let inserted = w.tx.db().exec(
                    "INSERT INTO imported_history (site_id, seq, tenant, job_id, hash, line)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    &[site, &(ev.seq as i64), &ev.tenant, &ev.job_id, &ev.hash, line],
                )?;
                if inserted == 0 {
                    return Err(StoreError::Refused(format!("event {} of site {site} is already imported", ev.seq)));
                }
            }
            let jobs = ledger::replay_import(&batch, |id| {
                let row = w.tx.db().opt("SELECT doc FROM imported_jobs WHERE site_id = $1 AND id = $2", &[site, &id])?;
                row.map(|r| decode_job(r.get(0))).transpose()
            })?;
            for (seq, tenant, line) in &batch.throttles {
                w.tx.db().exec(
                    "INSERT INTO imported_throttles (site_id, seq, tenant, line) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                    &[site, &(*seq as i64), tenant, line],
                )?;
            }
            for job in &jobs {
                let doc = orch_core::canonical::to_vec(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let doc = String::from_utf8(doc).expect("canonical JSON is UTF-8");
                w.tx.db().exec(
                    "INSERT INTO imported_jobs (site_id, id, tenant, doc) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (site_id, id) DO UPDATE SET tenant = excluded.tenant, doc = excluded.doc",
                    &[site, &job.id, &job.tenant, &doc],
                )?;
            }
            let now = w.now.as_millis();
            w.tx.db().exec(
                "INSERT INTO import_sites AS s (site_id, scope, to_seq, manifest_sha256, anchor_at, root_version, bundles, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, 1, $7)
                 ON CONFLICT (site_id, scope) DO UPDATE SET to_seq = excluded.to_seq,
                   manifest_sha256 = excluded.manifest_sha256,
                   anchor_at = GREATEST(s.anchor_at, excluded.anchor_at),
                   root_version = GREATEST(s.root_version, excluded.root_version),
                   bundles = s.bundles + 1, updated_at = excluded.updated_at",
                &[
                    site,
                    &batch.scope,
                    &(batch.to_seq as i64),
                    &batch.manifest_sha256,
                    &batch.anchor_at.as_millis(),
                    &(batch.root_version as i64),
                    &now,
                ],
            )?;
            w.tx.db().exec(
                "INSERT INTO import_bundles (manifest_sha256, site_id, scope, from_seq, to_seq, events, imported_at, actor)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &batch.manifest_sha256,
                    site,
                    &batch.scope,
                    &(batch.from_seq as i64),
                    &(batch.to_seq as i64),
                    &(batch.events.len() as i64),
                    &now,
                    &actor,
                ],
            )?;
            let details = ledger::import_details(&batch);
            let audit = w.audit(SITE_TENANT, "imports", actor, "import.applied".into(), details)?;
            Ok(ImportOutcome { events: batch.events.len() as u64, jobs: jobs.len() as u64, audit_seq: audit.seq })
        })
    }

    fn imported_history(&self, site_id: &str, from: u64, to: u64) -> Result<Vec<String>, StoreError> {
        let (from, to) = (from.min(i64::MAX as u64) as i64, to.min(i64::MAX as u64) as i64);
        self.read(|db| {
            Ok(db
                .query(
                    "SELECT line FROM imported_history WHERE site_id = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq",
                    &[&site_id, &from, &to],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
    }

    fn imported_jobs(&self, site_id: &str) -> Result<Vec<Job>, StoreError> {
        self.read(|db| {
            db.query("SELECT doc FROM imported_jobs WHERE site_id = $1 ORDER BY id", &[&site_id])?
                .iter()
                .map(|r| decode_job(r.get(0)))
                .collect()
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
            // The cursor starts at the head: read under the ledger lock, so no event is missed.
            w.tx.lock_ledger()?;
            let head = w.tx.max_seq()? as i64;
            let id: i64 =
                w.tx.db()
                    .one(
                        "INSERT INTO webhooks (tenant, url, secret, filter, cursor, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                        &[&tenant, &url, &secret, &filter.to_string(), &head, &w.now.as_millis()],
                    )?
                    .get(0);
            Ok(id)
        })?;
        self.webhooks(&Scope::Tenant(tenant.to_string()))?
            .into_iter()
            .find(|h| h.id == id)
            .ok_or_else(|| StoreError::Corrupt("webhook vanished".into()))
    }

    fn webhooks(&self, scope: &Scope) -> Result<Vec<Webhook>, StoreError> {
        let tenant = scope.tenant();
        self.read(|db| {
            db.query(
                "SELECT id, tenant, url, secret, filter, cursor, next_at, created_at FROM webhooks
                 WHERE ($1::text IS NULL OR tenant = $1) ORDER BY id",
                &[&tenant],
            )?
            .iter()
            .map(|r| {
                let id: i64 = r.get(0);
                Ok(Webhook {
                    id,
                    tenant: r.get(1),
                    url: r.get(2),
                    secret: r.get(3),
                    filter: serde_json::from_str(r.get(4))
                        .map_err(|e| StoreError::Corrupt(format!("webhook {id} filter: {e}")))?,
                    cursor: r.get::<_, i64>(5) as u64,
                    next_at: Timestamp::from_millis(r.get(6)),
                    created_at: Timestamp::from_millis(r.get(7)),
                })
            })
            .collect()
        })
    }

    fn delete_webhook(&self, scope: &Scope, id: i64) -> Result<(), StoreError> {
        let tenant = scope.tenant();
        let n = self.write(|w| {
            w.tx.db().exec("DELETE FROM webhooks WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)", &[&id, &tenant])
        })?;
        if n == 0 {
            return Err(StoreError::Missing { what: "webhook", id: id.to_string() });
        }
        Ok(())
    }

    fn record_delivery(&self, webhook: i64, seq: u64, outcome: DeliveryOutcome) -> Result<Delivery, StoreError> {
        let seq_i = seq as i64;
        self.write(|w| {
            let before =
                w.tx.db()
                    .opt(
                        "SELECT attempts FROM webhook_deliveries WHERE webhook_id = $1 AND seq = $2 FOR UPDATE",
                        &[&webhook, &seq_i],
                    )?
                    .map_or(0, |r| r.get::<_, i64>(0) as u32);
            let attempts = before + 1;
            let (status, code, error, next_at) = delivery_status(&outcome, attempts);
            let code_i = code.map(i64::from);
            w.tx.db().exec(
                "INSERT INTO webhook_deliveries (webhook_id, seq, status, attempts, last_code, last_error, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (webhook_id, seq) DO UPDATE SET status = excluded.status, attempts = excluded.attempts,
                   last_code = excluded.last_code, last_error = excluded.last_error, updated_at = excluded.updated_at",
                &[&webhook, &seq_i, &status, &i64::from(attempts), &code_i, &error, &w.now.as_millis()],
            )?;
            let cursor = if status == "pending" { 0 } else { seq_i };
            w.tx.db().exec(
                "UPDATE webhooks SET cursor = GREATEST(cursor, $2), next_at = $3 WHERE id = $1",
                &[&webhook, &cursor, &next_at],
            )?;
            Ok(Delivery { seq, status: status.into(), attempts, last_code: code, last_error: error, updated_at: w.now })
        })
    }

    fn skip_to(&self, webhook: i64, seq: u64) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.db()
                .exec("UPDATE webhooks SET cursor = GREATEST(cursor, $2) WHERE id = $1", &[&webhook, &(seq as i64)])?;
            Ok(())
        })
    }

    fn deliveries(&self, scope: &Scope, webhook: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        if !self.webhooks(scope)?.iter().any(|h| h.id == webhook) {
            return Err(StoreError::Missing { what: "webhook", id: webhook.to_string() });
        }
        self.read(|db| {
            Ok(db
                .query(
                    "SELECT seq, status, attempts, last_code, last_error, updated_at FROM webhook_deliveries
                     WHERE webhook_id = $1 ORDER BY seq DESC LIMIT $2",
                    &[&webhook, &(limit.clamp(1, 10_000) as i64)],
                )?
                .iter()
                .map(|r| Delivery {
                    seq: r.get::<_, i64>(0) as u64,
                    status: r.get(1),
                    attempts: r.get::<_, i64>(2) as u32,
                    last_code: r.get::<_, Option<i64>>(3).map(|c| c as u16),
                    last_error: r.get(4),
                    updated_at: Timestamp::from_millis(r.get(5)),
                })
                .collect())
        })
    }

    fn publisher_cursor(&self, name: &str) -> Result<u64, StoreError> {
        self.read(|db| {
            Ok(db.opt("SELECT cursor FROM publishers WHERE name = $1", &[&name])?.map_or(0, |r| r.get::<_, i64>(0))
                as u64)
        })
    }

    fn set_publisher_cursor(&self, name: &str, seq: u64) -> Result<(), StoreError> {
        self.write(|w| {
            w.tx.db().exec(
                "INSERT INTO publishers AS p (name, cursor) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET cursor = GREATEST(p.cursor, excluded.cursor)",
                &[&name, &(seq as i64)],
            )?;
            Ok(())
        })
    }

    fn leads(&self) -> Result<bool, StoreError> {
        off_runtime(|| {
            let mut g = lock(&self.leader);
            if let Some((c, _)) = g.as_mut() {
                if c.is_closed() || c.simple_query("SELECT 1").is_err() {
                    // The session ended, and with it the lock (if it was held).
                    *g = None;
                }
            }
            if g.is_none() {
                *g = Some((self.config.connect(NoTls)?, false));
            }
            let (c, held) = g.as_mut().expect("a leader session");
            if !*held {
                *held = c.query_one("SELECT pg_try_advisory_lock($1)", &[&self.leader_key])?.get(0);
                if *held {
                    tracing::info!(db = %self.display, "this orchd now runs the site's background services");
                }
            }
            Ok(*held)
        })
    }
}

/// A read snapshot of this site's own ledger, or (with `origin`) of what was imported from
/// another site: the same queries on the `imported_*` tables. Rows are fetched through a
/// portal in batches, so that a large history streams.
struct PgSnapshot<'a, 'c> {
    tx: &'a std::cell::RefCell<postgres::Transaction<'c>>,
    origin: Option<String>,
}

impl PgSnapshot<'_, '_> {
    fn each_line(
        &self,
        sql: &str,
        scope: &Scope,
        range: Option<(u64, u64)>,
        f: &mut dyn FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut q = Query::new(sql);
        if let Some(origin) = &self.origin {
            q.sql = ledger::on_imported(&q.sql);
            q.cond("site_id =", origin.clone());
        }
        if let Some((from, to)) = range {
            q.cond("seq >=", from.min(i64::MAX as u64) as i64);
            q.cond("seq <=", to.min(i64::MAX as u64) as i64);
        }
        q.opt("tenant =", scope.tenant().map(String::from));
        q.sql.push_str(if range.is_none() { " ORDER BY id" } else { " ORDER BY seq" });
        let portal = {
            let mut tx = self.tx.borrow_mut();
            let args: Vec<Param<'_>> = q.args.iter().map(|a| a.as_ref() as Param<'_>).collect();
            tx.bind(q.sql.as_str(), &args)?
        };
        loop {
            let rows = self.tx.borrow_mut().query_portal(&portal, 5_000)?;
            if rows.is_empty() {
                return Ok(());
            }
            for r in &rows {
                f(r.get(0))?;
            }
        }
    }

    fn one_i64(&self, sql: &str, p: &[Param<'_>]) -> Result<i64, StoreError> {
        Ok(self.tx.borrow_mut().query_one(sql, p)?.get(0))
    }
}

impl SnapshotReader for PgSnapshot<'_, '_> {
    fn site_id(&self) -> Result<String, StoreError> {
        match &self.origin {
            Some(origin) => Ok(origin.clone()),
            None => Ok(self.tx.borrow_mut().query_one("SELECT value FROM meta WHERE key = 'site_id'", &[])?.get(0)),
        }
    }

    fn head_seq(&self) -> Result<u64, StoreError> {
        let head = match &self.origin {
            Some(origin) => {
                self.one_i64("SELECT COALESCE(MAX(seq), 0) FROM imported_history WHERE site_id = $1", &[origin])?
            }
            None => self.one_i64("SELECT COALESCE(MAX(seq), 0) FROM history", &[])?,
        };
        Ok(head as u64)
    }

    fn imported(&self, site_id: &str) -> Result<Box<dyn SnapshotReader + '_>, StoreError> {
        let known = self.one_i64("SELECT count(*) FROM import_sites WHERE site_id = $1", &[&site_id])?;
        if known == 0 {
            return Err(StoreError::Missing { what: "imported site", id: site_id.to_string() });
        }
        Ok(Box::new(PgSnapshot { tx: self.tx, origin: Some(site_id.to_string()) }))
    }

    fn imported_sites(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .tx
            .borrow_mut()
            .query("SELECT DISTINCT site_id FROM import_sites ORDER BY site_id", &[])?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn for_each_event_line(
        &self,
        scope: &Scope,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.each_line("SELECT line FROM history WHERE true", scope, Some((from, to)), f)
    }

    fn for_each_job(&self, scope: &Scope, f: &mut dyn FnMut(Job) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.each_line("SELECT doc FROM jobs WHERE true", scope, None, &mut |d| f(decode_job(d)?))
    }

    fn for_each_throttle(
        &self,
        scope: &Scope,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(serde_json::Value) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.each_line("SELECT line FROM throttles WHERE true", scope, Some((from, to)), &mut |l| {
            f(decode_throttle(l)?)
        })
    }
}
