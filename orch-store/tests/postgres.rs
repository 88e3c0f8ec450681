//! The store conformance suite on the PostgreSQL backend, plus PostgreSQL-specific cases: many
//! stores on one database (as many orchd processes would be), leader election, schema checks.
//!
//! Runs against `ORCH_TEST_POSTGRES` (default: `host=127.0.0.1 user=postgres dbname=test`),
//! each test in a schema of its own that it drops afterwards. Where no server answers, every
//! test prints SKIP and passes, unless `ORCH_REQUIRE_POSTGRES=1` (as in CI) makes that a failure.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use orch_core::ManualClock;
use orch_store::{ClaimRequest, NewJob, PgStore, Scope, Store, StoreError, StoreOptions};
use serde_json::json;

fn base_url() -> String {
    std::env::var("ORCH_TEST_POSTGRES").unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

/// Why PostgreSQL cannot be tested here, if it cannot.
fn unavailable() -> Option<String> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    let why = WHY.get_or_init(|| match postgres::Client::connect(&base_url(), postgres::NoTls) {
        Ok(_) => None,
        Err(e) => Some(format!("no PostgreSQL at {:?}: {e}", base_url())),
    });
    if why.is_some() && std::env::var_os("ORCH_REQUIRE_POSTGRES").is_some_and(|v| v == "1") {
        panic!("ORCH_REQUIRE_POSTGRES=1 but {}", why.as_deref().unwrap_or_default());
    }
    why.clone()
}

/// A schema of its own, dropped when this is.
struct Schema {
    name: String,
}

impl Schema {
    fn new() -> Schema {
        let name = format!("orch_test_{:016x}", rand::random::<u64>());
        let mut c = postgres::Client::connect(&base_url(), postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE SCHEMA {name}")).unwrap();
        Schema { name }
    }

    fn url(&self) -> String {
        format!("{} options='-c search_path={}'", base_url(), self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&base_url(), postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

fn open(clock: Arc<ManualClock>, opts: StoreOptions) -> (Arc<dyn Store>, Box<dyn std::any::Any>) {
    let schema = Schema::new();
    let store = PgStore::open(&schema.url(), clock, opts).unwrap();
    (Arc::new(store), Box::new(schema))
}

// Each case opens a ledger in a fresh schema (about half a second of DDL), so the replay
// property tries fewer random sequences here than on SQLite.
orch_store::store_conformance!(open, skip = unavailable, cases = 24);

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(orch_store::conformance::T0))
}

macro_rules! require_postgres {
    () => {
        if let Some(why) = unavailable() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

#[test]
fn stores_on_one_database_never_claim_a_job_twice() {
    require_postgres!();
    let schema = Schema::new();
    let clock = clock();
    let stores: Vec<Arc<PgStore>> = (0..4)
        .map(|_| Arc::new(PgStore::open(&schema.url(), clock.clone(), StoreOptions::default()).unwrap()))
        .collect();
    let jobs: Vec<NewJob> = (0..400).map(|i| NewJob::new("acme", "p", "ingest", json!({ "i": i }))).collect();
    stores[0].enqueue("test", jobs).unwrap();
    // Four "processes", two threads each, claim in small batches until the queue is empty.
    let claimed: Vec<Vec<i64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let store = stores[t % 4].clone();
                s.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let got = store
                            .claim(&ClaimRequest {
                                scope: Scope::All,
                                queues: vec!["ingest".into()],
                                worker: format!("w{t}"),
                                limit: 7,
                                lease_ms: None,
                            })
                            .unwrap();
                        if got.is_empty() {
                            return mine;
                        }
                        for a in got {
                            let lease = a.job.lease.clone().unwrap();
                            store
                                .ack(&Scope::All, a.job.id, orch_store::Ack { lease_id: lease.id, artifacts: vec![] })
                                .unwrap();
                            mine.push(a.job.id);
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<i64> = claimed.iter().flatten().copied().collect();
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 400, "every job claimed once: {} claims", all.len());
    assert_eq!(unique.len(), 400, "no job claimed twice");
    assert!(claimed.iter().filter(|c| !c.is_empty()).count() > 1, "the work was shared");
    let report = orch_store::check_ledger(&*stores[1]).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.events, 1200, "enqueue, claim and ack of each job, in one gap-free history");
}

/// A claim holds the ledger lock before its gate is first asked anything: orchd's gate holds
/// the daemon's flow-control lock from its first question on, and must not hold it while the
/// claim waits for another process's write. So another store's write, started while the gate
/// is asked, waits for the claim to commit.
#[test]
fn a_claim_takes_the_ledger_lock_before_it_asks_its_gate() {
    require_postgres!();
    struct Gate {
        other: Arc<PgStore>,
        write: Option<std::thread::JoinHandle<()>>,
        done: Arc<std::sync::atomic::AtomicBool>,
        done_while_asked: Option<bool>,
    }
    impl orch_store::ClaimGate for Gate {
        fn wants_running(&self) -> bool {
            false
        }
        fn begin(&mut self, _: orch_core::Timestamp, _: &[orch_store::RunningCount]) -> Vec<orch_store::Exclusion> {
            let (other, done) = (self.other.clone(), self.done.clone());
            self.write = Some(std::thread::spawn(move || {
                other.enqueue("test", vec![NewJob::new("acme", "p", "later", json!({}))]).unwrap();
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            }));
            std::thread::sleep(std::time::Duration::from_millis(500));
            self.done_while_asked = Some(self.done.load(std::sync::atomic::Ordering::SeqCst));
            Vec::new()
        }
        fn admit(&mut self, _: &orch_core::Job) -> Result<(), orch_store::Exclusion> {
            Ok(())
        }
    }
    let schema = Schema::new();
    let open = || Arc::new(PgStore::open(&schema.url(), clock(), StoreOptions::default()).unwrap());
    let (claimer, other) = (open(), open());
    claimer.enqueue("test", vec![NewJob::new("acme", "p", "q", json!({}))]).unwrap();
    let mut gate = Gate { other, write: None, done: Arc::default(), done_while_asked: None };
    let req =
        ClaimRequest { scope: Scope::All, queues: vec!["q".into()], worker: "w".into(), limit: 1, lease_ms: None };
    let got = claimer.claim_gated(&req, &mut gate).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(gate.done_while_asked, Some(false), "another store's write waited for the claim's ledger lock");
    gate.write.take().unwrap().join().unwrap();
    let report = orch_store::check_ledger(&*claimer).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.events, 3);
}

#[test]
fn one_store_leads_and_another_takes_over_when_it_goes() {
    require_postgres!();
    let schema = Schema::new();
    let a = PgStore::open(&schema.url(), clock(), StoreOptions::default()).unwrap();
    let b = PgStore::open(&schema.url(), clock(), StoreOptions::default()).unwrap();
    assert!(a.leads().unwrap());
    assert!(a.leads().unwrap(), "leadership is kept");
    assert!(!b.leads().unwrap(), "only one leads");
    drop(a);
    let mut took_over = false;
    for _ in 0..50 {
        if b.leads().unwrap() {
            took_over = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(took_over, "the other store leads once the leader is gone");
    // Another ledger (schema) on the same server elects its own leader.
    let other = Schema::new();
    let c = PgStore::open(&other.url(), clock(), StoreOptions::default()).unwrap();
    assert!(c.leads().unwrap());
}

#[test]
fn refuses_a_schema_of_another_application_and_reopens_its_own() {
    require_postgres!();
    let schema = Schema::new();
    let mut c = postgres::Client::connect(&base_url(), postgres::NoTls).unwrap();
    c.batch_execute(&format!("CREATE TABLE {}.invoices (id int)", schema.name)).unwrap();
    let err = PgStore::open(&schema.url(), clock(), StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StoreError::NotALedgerSchema { .. }), "{err:?}");
    assert!(err.to_string().contains("not an orch ledger"), "{err}");

    let own = Schema::new();
    let s = PgStore::open(&own.url(), clock(), StoreOptions::default()).unwrap();
    s.enqueue("t", vec![NewJob::new("acme", "p", "q", json!({}))]).unwrap();
    drop(s);
    let s = PgStore::open(&own.url(), clock(), StoreOptions::default()).unwrap();
    assert_eq!(s.stats(&Scope::All).unwrap().events, 1, "reopening keeps the ledger");
    c.batch_execute(&format!("UPDATE {}.meta SET value = '99' WHERE key = 'schema_version'", own.name)).unwrap();
    let err = PgStore::open(&own.url(), clock(), StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }), "{err:?}");
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    let err = PgStore::open(
        "host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=2",
        clock(),
        StoreOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.code(), "unavailable", "{err:?}");
    assert!(err.to_string().starts_with("PostgreSQL:"), "{err}");
}
