//! Group commit for the SQLite writer. A write call that finds others queued behind it leaves
//! its transaction open for them: each of them runs in a savepoint of its own inside the one
//! transaction, and the call that finds no one behind it (or the group full) commits. Every call
//! that succeeded is answered only once the commit has happened, with the commit's outcome, so a
//! caller never sees a result that is not durable; a call that fails is answered at once, its
//! savepoint rolled back, and takes nothing of the others with it.
//!
//! Calls run one at a time, in the order they take the writer, on the caller's own thread (no
//! closure crosses threads): a group is exactly what the same calls would have written one
//! after another, in one commit instead of many.

use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};

use rusqlite::{ffi, Connection};

use super::lock;
use crate::{wait, StoreError};

/// The most write calls one transaction takes: bounds how long the first waits for its commit.
pub(super) const MAX_GROUP: usize = 32;

/// The writer connection and the bookkeeping that lets queued write calls share its transaction.
pub(super) struct GroupCommit {
    slot: Mutex<Slot>,
    /// Calls that wait for the slot. While some do, a call that ends leaves the group open.
    waiting: AtomicUsize,
    outcomes: Mutex<Outcomes>,
    ended: Condvar,
}

/// The writer connection, and the group whose transaction it holds open, if any.
pub(super) struct Slot {
    /// The writer connection.
    pub conn: Connection,
    open: Option<Open>,
    last_id: u64,
}

/// The group in progress.
struct Open {
    id: u64,
    /// Calls that ran in it.
    calls: usize,
    /// Calls that succeeded and left it open: they wait for its outcome.
    waiters: usize,
}

/// How groups ended: they end in the order they began, one at a time.
#[derive(Default)]
struct Outcomes {
    /// The id of the last group that ended.
    ended: u64,
    /// Groups that did not commit: the failure, and how many waiters have yet to take it.
    failed: HashMap<u64, (usize, Failure)>,
}

/// Why a group's transaction did not commit, kept so that each of its waiters gets the error
/// (`rusqlite::Error` cannot be cloned). The code is kept, so a full disk is still `storage_full`.
struct Failure {
    code: ffi::Error,
    message: String,
}

impl Failure {
    fn of(e: &StoreError) -> Failure {
        match e {
            StoreError::Backend(rusqlite::Error::SqliteFailure(code, message)) => {
                Failure { code: *code, message: message.clone().unwrap_or_else(|| code.to_string()) }
            }
            other => Failure { code: ffi::Error::new(ffi::SQLITE_ERROR), message: other.to_string() },
        }
    }

    fn error(&self) -> StoreError {
        let message = format!("the write was not committed: {}", self.message);
        StoreError::Backend(rusqlite::Error::SqliteFailure(self.code, Some(message)))
    }
}

impl GroupCommit {
    pub fn new(conn: Connection) -> GroupCommit {
        GroupCommit {
            slot: Mutex::new(Slot { conn, open: None, last_id: 0 }),
            waiting: AtomicUsize::new(0),
            outcomes: Mutex::new(Outcomes::default()),
            ended: Condvar::new(),
        }
    }

    /// The writer, if no call holds it right now (a group may be open between two calls).
    pub fn try_lock(&self) -> Option<MutexGuard<'_, Slot>> {
        match self.slot.try_lock() {
            Ok(slot) => Some(slot),
            Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        }
    }

    /// Runs `call` in the current group, beginning one (`BEGIN IMMEDIATE`, then `begun` with
    /// the connection) if none is open. Returns once the group has committed, or at once if the
    /// call failed. `ending` runs just before a group commits or rolls back. Inside
    /// [`wait::without_waiting`], fails with [`StoreError::WouldWait`] if another call holds
    /// or waits for the writer, and commits at the end of its own call.
    pub fn run<T>(
        &self,
        begun: impl FnOnce(&Connection),
        ending: impl FnOnce(),
        call: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // A call that may not wait takes the writer only if it is free and no call is queued
        // for it (it would starve them: a mutex is not fair), and ends the group itself: it
        // never waits for others, nor makes others wait for it.
        let may_wait = wait::allowed();
        let mut slot = if may_wait {
            self.waiting.fetch_add(1, SeqCst);
            let slot = lock(&self.slot);
            self.waiting.fetch_sub(1, SeqCst);
            slot
        } else if self.waiting.load(SeqCst) > 0 {
            return Err(StoreError::WouldWait);
        } else {
            wait::lock(&self.slot)?
        };
        if slot.open.is_none() {
            exec(&slot.conn, "BEGIN IMMEDIATE")?;
            begun(&slot.conn);
            slot.last_id += 1;
            slot.open = Some(Open { id: slot.last_id, calls: 0, waiters: 0 });
        }
        let first = slot.open.as_ref().is_some_and(|open| open.calls == 0);
        let out = isolated(&slot.conn, first, call);
        let alive = !slot.conn.is_autocommit();
        let open = slot.open.as_mut().expect("a group is open");
        open.calls += 1;
        let id = open.id;
        if alive && may_wait && open.calls < MAX_GROUP && self.waiting.load(SeqCst) > 0 {
            // Others are queued: the last of them commits for all.
            if matches!(out, Ok(Ok(_))) {
                open.waiters += 1;
            }
            drop(slot);
            let value = unwind(out)?;
            return self.wait(id).map(|()| value);
        }
        let waiters = open.waiters;
        slot.open = None;
        ending();
        let committed = if alive {
            exec(&slot.conn, "COMMIT").inspect_err(|_| {
                // A failed COMMIT may leave the transaction open: end it.
                if !slot.conn.is_autocommit() {
                    let _ = slot.conn.execute_batch("ROLLBACK");
                }
            })
        } else {
            // The first call failed, SQLite rolled the whole transaction back (a full disk, an
            // I/O error) or a savepoint could not be released: the call's own error says why.
            Err(match &out {
                Ok(Err(e)) => Failure::of(e).error(),
                _ => Failure::of(&StoreError::Refused("the transaction was rolled back".into())).error(),
            })
        };
        self.publish(id, waiters, committed.as_ref().err());
        drop(slot);
        let value = unwind(out)?;
        committed.map(|()| value)
    }

    /// Waits until group `id` has ended; its outcome.
    fn wait(&self, id: u64) -> Result<(), StoreError> {
        let mut outcomes = lock(&self.outcomes);
        while outcomes.ended < id {
            outcomes = self.ended.wait(outcomes).unwrap_or_else(|p| p.into_inner());
        }
        let Some((left, failure)) = outcomes.failed.get_mut(&id) else { return Ok(()) };
        let e = failure.error();
        *left -= 1;
        if *left == 0 {
            outcomes.failed.remove(&id);
        }
        Err(e)
    }

    /// Records how group `id` ended and wakes its waiters.
    fn publish(&self, id: u64, waiters: usize, failure: Option<&StoreError>) {
        let mut outcomes = lock(&self.outcomes);
        outcomes.ended = id;
        if let (Some(e), true) = (failure, waiters > 0) {
            outcomes.failed.insert(id, (waiters, Failure::of(e)));
        }
        drop(outcomes);
        if waiters > 0 {
            self.ended.notify_all();
        }
    }
}

/// Runs `call` so that, if it fails or panics, nothing it wrote stays. The first call of a group
/// has the transaction to itself, so that is rolled back whole (a lone call pays for no
/// savepoint); a later one runs in a savepoint, released if it succeeds and rolled back if not.
/// If the savepoint cannot be released, the whole transaction is rolled back (the group fails)
/// rather than keep writes that the call's caller is told failed.
fn isolated<T>(
    conn: &Connection,
    first: bool,
    call: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> std::thread::Result<Result<T, StoreError>> {
    if !first {
        if let Err(e) = exec(conn, "SAVEPOINT call") {
            return Ok(Err(e));
        }
    }
    let out = catch_unwind(AssertUnwindSafe(|| call(conn)));
    if conn.is_autocommit() {
        return out;
    }
    let undo = !matches!(out, Ok(Ok(_)));
    if first {
        if undo {
            let _ = conn.execute_batch("ROLLBACK");
        }
        return out;
    }
    let undone = !undo || exec(conn, "ROLLBACK TO call").is_ok();
    if !undone || exec(conn, "RELEASE call").is_err() {
        let _ = conn.execute_batch("ROLLBACK");
        if !undo {
            return Ok(Err(StoreError::Refused("the write's savepoint could not be released".into())));
        }
    }
    out
}

/// The call's result, or its panic carried on in the caller's thread.
fn unwind<T>(out: std::thread::Result<Result<T, StoreError>>) -> Result<T, StoreError> {
    out.unwrap_or_else(|panic| resume_unwind(panic))
}

/// Runs a statement without parameters from the connection's statement cache (`BEGIN` and
/// `COMMIT` too: with one job per transaction, parsing them anew was about 5 % of the work).
fn exec(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;

    fn setup() -> (tempfile::TempDir, GroupCommit) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("g.db")).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (name TEXT NOT NULL)").unwrap();
        (dir, GroupCommit::new(conn))
    }

    /// The names another connection sees committed.
    fn committed(dir: &tempfile::TempDir) -> Vec<String> {
        let conn = Connection::open(dir.path().join("g.db")).unwrap();
        let mut stmt = conn.prepare("SELECT name FROM t ORDER BY rowid").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    fn insert(conn: &Connection, name: &str) -> Result<(), StoreError> {
        conn.execute("INSERT INTO t (name) VALUES (?1)", [name])?;
        Ok(())
    }

    /// Holds the call running in the writer until `n` more calls queue behind it.
    fn until_queued(g: &GroupCommit, n: usize) {
        let start = Instant::now();
        while g.waiting.load(SeqCst) < n {
            assert!(start.elapsed() < Duration::from_secs(10), "no call queued");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    type Call<'a> = Box<dyn FnOnce(&Connection) -> Result<(), StoreError> + Send + 'a>;

    /// What a call returned (or its panic), and the rows committed when it returned.
    type Answer = (std::thread::Result<Result<(), StoreError>>, Vec<String>);

    /// Runs the calls in order, each one queued behind the one before while that one runs, so
    /// they share groups; the answer to each, and how many groups began.
    fn run_queued(dir: &tempfile::TempDir, g: &GroupCommit, calls: Vec<Call<'_>>) -> (Vec<Answer>, u64) {
        let n = calls.len();
        let answers = std::thread::scope(|s| {
            let mut handles = Vec::new();
            let (started, running) = mpsc::channel();
            // The next call starts once the previous one runs; each one waits for the next to
            // queue before it finishes (the last does not).
            for (i, call) in calls.into_iter().enumerate() {
                let started = started.clone();
                handles.push(s.spawn(move || {
                    let out = catch_unwind(AssertUnwindSafe(|| {
                        g.run(
                            |_| {},
                            || {},
                            |conn| {
                                started.send(()).unwrap();
                                if i + 1 < n {
                                    until_queued(g, 1);
                                }
                                call(conn)
                            },
                        )
                    }));
                    (out, committed(dir))
                }));
                running.recv_timeout(Duration::from_secs(10)).expect("the call ran");
            }
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let groups = lock(&g.slot).last_id;
        (answers, groups)
    }

    #[test]
    fn queued_calls_share_one_commit_and_are_answered_after_it() {
        let (dir, g) = setup();
        let calls = ["a", "b", "c"].iter().map(|&n| Box::new(move |c: &Connection| insert(c, n)) as Call<'_>).collect();
        let (answers, groups) = run_queued(&dir, &g, calls);
        for (out, seen) in &answers {
            assert!(matches!(out, Ok(Ok(()))));
            assert_eq!(seen, &["a", "b", "c"], "each call is answered once all three are committed");
        }
        assert_eq!(groups, 1, "one transaction for the three calls");
        // Alone, a call commits at once.
        g.run(|_| {}, || {}, |c| insert(c, "d")).unwrap();
        assert_eq!(committed(&dir), ["a", "b", "c", "d"]);
        assert_eq!(lock(&g.slot).last_id, 2);
    }

    #[test]
    fn a_failed_or_panicking_call_takes_only_its_own_writes_back() {
        let (dir, g) = setup();
        let calls: Vec<Call<'_>> = vec![
            Box::new(|c| insert(c, "a")),
            Box::new(|c| {
                insert(c, "b")?;
                Err(StoreError::Invalid("refused".into()))
            }),
            Box::new(|c| {
                insert(c, "c").unwrap();
                panic!("a bug in a call");
            }),
            Box::new(|c| insert(c, "d")),
        ];
        let (answers, groups) = run_queued(&dir, &g, calls);
        assert!(matches!(answers[0].0, Ok(Ok(()))));
        assert!(matches!(answers[1].0, Ok(Err(StoreError::Invalid(_)))));
        assert!(answers[2].0.is_err(), "the panic reaches its caller");
        assert!(matches!(answers[3].0, Ok(Ok(()))));
        assert_eq!(groups, 1);
        assert_eq!(committed(&dir), ["a", "d"]);
    }

    #[test]
    fn a_failed_first_call_takes_the_transaction_back_alone() {
        let (dir, g) = setup();
        let calls: Vec<Call<'_>> = vec![
            Box::new(|c| {
                insert(c, "a")?;
                Err(StoreError::Invalid("refused".into()))
            }),
            Box::new(|c| insert(c, "b")),
            Box::new(|c| insert(c, "c")),
        ];
        let (answers, groups) = run_queued(&dir, &g, calls);
        assert!(matches!(answers[0].0, Ok(Err(StoreError::Invalid(_)))));
        assert!(answers[1..].iter().all(|(out, seen)| matches!(out, Ok(Ok(()))) && seen == &["b", "c"]));
        assert_eq!(groups, 2, "the calls queued behind it begin a transaction of their own");
    }

    #[test]
    fn a_lost_transaction_fails_every_call_that_waited_on_it() {
        let (dir, g) = setup();
        let calls: Vec<Call<'_>> = vec![
            Box::new(|c| insert(c, "a")),
            Box::new(|c| insert(c, "b")),
            // As SQLite does on some I/O errors and a full disk: the whole transaction goes.
            Box::new(|c| {
                c.execute_batch("ROLLBACK")?;
                Err(StoreError::Backend(rusqlite::Error::SqliteFailure(
                    ffi::Error::new(ffi::SQLITE_FULL),
                    Some("database or disk is full".into()),
                )))
            }),
            Box::new(|c| insert(c, "d")),
        ];
        let (answers, groups) = run_queued(&dir, &g, calls);
        for (out, _) in &answers[..3] {
            let Ok(Err(e)) = out else { panic!("{out:?}") };
            assert_eq!(e.code(), "storage_full", "{e}");
        }
        let Ok(Err(e)) = &answers[0].0 else { unreachable!() };
        assert!(e.to_string().contains("not committed"), "{e}");
        assert!(matches!(answers[3].0, Ok(Ok(()))), "the next call begins a new transaction");
        assert_eq!(groups, 2);
        assert_eq!(committed(&dir), ["d"]);
        assert!(lock(&g.outcomes).failed.is_empty(), "every waiter took its failure");
    }

    #[test]
    fn a_group_holds_at_most_max_group_calls() {
        let (dir, g) = setup();
        let names: Vec<String> = (0..MAX_GROUP + 3).map(|i| format!("n{i}")).collect();
        let calls = names.iter().map(|n| Box::new(move |c: &Connection| insert(c, n)) as Call<'_>).collect();
        let (answers, groups) = run_queued(&dir, &g, calls);
        assert!(answers.iter().all(|(out, _)| matches!(out, Ok(Ok(())))));
        assert_eq!(groups, 2);
        assert_eq!(committed(&dir), names);
    }

    #[test]
    fn a_call_that_may_not_wait_is_refused_while_the_writer_is_held_and_ends_its_own_group() {
        let (dir, g) = setup();
        let g = &g;
        let (release, released) = mpsc::channel::<()>();
        std::thread::scope(|s| {
            let (started, running) = mpsc::channel();
            let holder = s.spawn(move || {
                g.run(
                    |_| {},
                    || {},
                    move |c| {
                        started.send(()).unwrap();
                        released.recv().unwrap();
                        insert(c, "a")
                    },
                )
            });
            running.recv_timeout(Duration::from_secs(10)).unwrap();
            let (answer, answered) = mpsc::channel();
            s.spawn(move || {
                let out = wait::without_waiting(|| g.run(|_| {}, || {}, |c| insert(c, "x")));
                answer.send(out).unwrap();
            });
            let refused = answered.recv_timeout(Duration::from_secs(10));
            release.send(()).unwrap();
            assert!(matches!(refused, Ok(Err(StoreError::WouldWait))), "answered at once: {refused:?}");
            holder.join().unwrap().unwrap();
        });
        assert_eq!(committed(&dir), ["a"], "the refused call wrote nothing");

        // With another call queued behind it, a call that may not wait commits anyway rather
        // than wait for that one: the one behind begins a transaction of its own.
        std::thread::scope(|s| {
            let (started, running) = mpsc::channel();
            let first = s.spawn(move || {
                wait::without_waiting(|| {
                    g.run(
                        |_| {},
                        || {},
                        move |c| {
                            started.send(()).unwrap();
                            until_queued(g, 1);
                            insert(c, "b")
                        },
                    )
                })
            });
            running.recv_timeout(Duration::from_secs(10)).unwrap();
            let behind = s.spawn(move || g.run(|_| {}, || {}, |c| insert(c, "c")));
            first.join().unwrap().unwrap();
            behind.join().unwrap().unwrap();
        });
        assert_eq!(committed(&dir), ["a", "b", "c"]);
        assert_eq!(lock(&g.slot).last_id, 3, "three groups: a, b and c");
    }
}
