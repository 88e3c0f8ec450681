//! Checking a history: each event's own hash, the per-tenant hash chain, gap-free sequence
//! numbers, and that replaying it reproduces a given set of jobs.
//!
//! One mechanism for the daemon's `orchd check`, the bundle verifier and the importer.
//!
//! Reading a line and checking its own hash needs no other event, so [`read_events`] does that
//! part for many lines at once, on the machine's cores, and hands the events back in order to a
//! [`ChainVerifier`], which checks what does depend on order. The verdict is the same as reading
//! the lines one by one.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::mpsc;

use crate::event::{Event, EventError};
use crate::hash::GENESIS_HASH;
use crate::job::{Job, JobId};
use crate::machine::{replay_one, replay_owned, ReplayError};

/// Why a history is not a valid chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// An event's hash does not match its content.
    #[error("event {seq}: hash does not match content")]
    BadHash {
        /// The event.
        seq: u64,
    },
    /// An event's `prev_hash` is not the hash of its tenant's previous event.
    #[error("event {seq}: prev_hash does not link to tenant {tenant:?}'s previous event")]
    BrokenLink {
        /// The event.
        seq: u64,
        /// Its tenant.
        tenant: String,
    },
    /// Sequence numbers are not strictly increasing (or, where required, contiguous).
    #[error("event {seq}: expected sequence {expected}")]
    BadSequence {
        /// The event's sequence number.
        seq: u64,
        /// What was expected.
        expected: u64,
    },
    /// The history does not replay.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

/// Checks events one at a time, in order, keeping only each tenant's head and the replayed jobs.
#[derive(Debug, Default, Clone)]
pub struct ChainVerifier {
    heads: BTreeMap<String, String>,
    last_seq: Option<u64>,
    contiguous: bool,
    jobs: BTreeMap<JobId, Job>,
    events: u64,
    /// Where each event is encoded to check its hash.
    scratch: Vec<u8>,
}

impl ChainVerifier {
    /// A verifier for a whole history: chains start at the genesis hash and sequence numbers
    /// start at 1 with no gaps.
    pub fn new() -> Self {
        ChainVerifier { contiguous: true, ..Default::default() }
    }

    /// A verifier for a part of a history: tenants' chains continue from `heads` (a tenant not
    /// named starts at genesis), jobs from `jobs`, and sequence numbers must increase but may skip
    /// (another tenant's events are left out of a tenant-scoped export).
    pub fn resume(heads: BTreeMap<String, String>, jobs: BTreeMap<JobId, Job>, after_seq: u64) -> Self {
        ChainVerifier { heads, last_seq: Some(after_seq), contiguous: false, jobs, events: 0, scratch: Vec::new() }
    }

    /// Checks and applies the next event.
    pub fn push(&mut self, ev: &Event) -> Result<(), ChainError> {
        self.check(ev, None)?;
        self.apply(ev)
    }

    /// Replays a checked event and moves its tenant's head to it.
    fn apply(&mut self, ev: &Event) -> Result<(), ChainError> {
        replay_one(&mut self.jobs, ev)?;
        // The tenant's head changes in place: no new key for every event.
        match self.heads.get_mut(&ev.tenant) {
            Some(head) => ev.hash.clone_into(head),
            None => {
                self.heads.insert(ev.tenant.clone(), ev.hash.clone());
            }
        }
        self.advance(ev.seq);
        Ok(())
    }

    /// [`push`](Self::push) for an event whose own hash the caller has checked, with
    /// [`Event::hash_is_valid_with`] (whose buffer then holds the event's canonical line).
    pub fn push_hashed(&mut self, ev: &Event, hash_valid: bool) -> Result<(), ChainError> {
        self.check(ev, Some(hash_valid))?;
        self.apply(ev)
    }

    /// [`push`](Self::push) for an event the caller has no more use for: what it carries moves
    /// into the job it creates, and its hash becomes its tenant's head.
    pub fn push_owned(&mut self, ev: Event) -> Result<(), ChainError> {
        self.consume(ev, None)
    }

    /// [`push_owned`](Self::push_owned) for an event read by [`ReadEvent::read`], whose own hash
    /// was checked then.
    pub fn push_read(&mut self, read: ReadEvent) -> Result<(), ChainError> {
        self.consume(read.event, Some(read.hash_valid))
    }

    fn consume(&mut self, mut ev: Event, hash_valid: Option<bool>) -> Result<(), ChainError> {
        self.check(&ev, hash_valid)?;
        let seq = ev.seq;
        let hash = std::mem::take(&mut ev.hash);
        // The head's slot is found before the event is used up; a new tenant's name is copied.
        let head = self.heads.get_mut(&ev.tenant);
        let new_tenant = head.is_none().then(|| ev.tenant.clone());
        replay_owned(&mut self.jobs, ev)?;
        match (head, new_tenant) {
            (Some(head), _) => *head = hash,
            (None, tenant) => {
                self.heads.insert(tenant.expect("copied when the tenant had no head"), hash);
            }
        }
        self.advance(seq);
        Ok(())
    }

    /// The checks that come before the event is applied, in their order; the event's own hash is
    /// checked here unless `hash_valid` says already whether it matches.
    fn check(&mut self, ev: &Event, hash_valid: Option<bool>) -> Result<(), ChainError> {
        let expected = self.last_seq.map_or(1, |s| s + 1);
        let seq_ok = if self.contiguous { ev.seq == expected } else { ev.seq >= expected };
        if !seq_ok {
            return Err(ChainError::BadSequence { seq: ev.seq, expected });
        }
        if !hash_valid.unwrap_or_else(|| ev.hash_is_valid_with(&mut self.scratch)) {
            return Err(ChainError::BadHash { seq: ev.seq });
        }
        let head = self.heads.get(&ev.tenant).map_or(GENESIS_HASH, String::as_str);
        if ev.prev_hash != head {
            return Err(ChainError::BrokenLink { seq: ev.seq, tenant: ev.tenant.clone() });
        }
        Ok(())
    }

    fn advance(&mut self, seq: u64) {
        self.last_seq = Some(seq);
        self.events += 1;
    }

    /// Events checked so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The last sequence number seen.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Each tenant's last hash.
    pub fn heads(&self) -> &BTreeMap<String, String> {
        &self.heads
    }

    /// The jobs replayed so far.
    pub fn jobs(&self) -> &BTreeMap<JobId, Job> {
        &self.jobs
    }

    /// Consumes the verifier, returning the replayed jobs.
    pub fn into_jobs(self) -> BTreeMap<JobId, Job> {
        self.jobs
    }
}

/// An event read from its line, with whether its hash matches its content.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadEvent {
    /// The event.
    pub event: Event,
    hash_valid: bool,
}

impl ReadEvent {
    /// Reads a line of `history.jsonl` (without its newline) and checks the event's own hash,
    /// encoding it in `scratch`.
    pub fn read(line: &[u8], scratch: &mut Vec<u8>) -> Result<ReadEvent, EventError> {
        let event = Event::from_line(std::str::from_utf8(line)?)?;
        let hash_valid = event.hash_is_valid_with(scratch);
        Ok(ReadEvent { event, hash_valid })
    }

    /// Whether the event's hash matches its content.
    pub fn hash_is_valid(&self) -> bool {
        self.hash_valid
    }
}

/// Lines handed to a reader thread at a time: enough to make a hand-over rare, few enough that
/// the events waiting to be checked stay small.
const CHUNK: usize = 256;

/// Reads `lines` as [`ReadEvent`]s and calls `each` with each result, in the order of the lines,
/// until it returns [`ControlFlow::Break`] or the lines end. `readers` threads read (see
/// [`readers`]); with fewer than two, or lines that fit in one chunk, the calling thread reads
/// them itself. `each` runs on the calling thread.
pub fn read_events<'a>(
    lines: impl Iterator<Item = &'a [u8]>,
    readers: usize,
    mut each: impl FnMut(Result<ReadEvent, EventError>) -> ControlFlow<()>,
) {
    type Chunk<'a> = Vec<&'a [u8]>;
    type Read = Vec<Result<ReadEvent, EventError>>;
    let mut lines = lines.peekable();
    let mut next_chunk = move || {
        lines.peek()?;
        Some(lines.by_ref().take(CHUNK).collect::<Chunk<'a>>())
    };
    let head: Vec<Chunk<'a>> = std::iter::from_fn(&mut next_chunk).take(2).collect();
    if readers < 2 || head.len() < 2 {
        // One reader, or lines that fit in one chunk (a small bundle, a proof): no thread would
        // pay for itself.
        let mut scratch = Vec::new();
        for line in head.into_iter().chain(std::iter::from_fn(next_chunk)).flatten() {
            if each(ReadEvent::read(line, &mut scratch)).is_break() {
                return;
            }
        }
        return;
    }
    let mut head = head.into_iter();
    let mut next_chunk = move || head.next().or_else(&mut next_chunk);
    std::thread::scope(|s| {
        // Chunk n goes to reader n % readers and comes back from it in the order sent, so taking
        // one result from each reader in turn keeps the order of the lines. Each reader holds at
        // most two chunks ahead of the one taken.
        let mut to_readers = Vec::with_capacity(readers);
        let mut from_readers = Vec::with_capacity(readers);
        for _ in 0..readers {
            let (to, from_main) = mpsc::sync_channel::<Chunk<'a>>(2);
            let (to_main, from) = mpsc::sync_channel::<Read>(2);
            s.spawn(move || {
                let mut scratch = Vec::new();
                for chunk in from_main {
                    let read = chunk.iter().map(|l| ReadEvent::read(l, &mut scratch)).collect();
                    if to_main.send(read).is_err() {
                        return;
                    }
                }
            });
            to_readers.push(to);
            from_readers.push(from);
        }
        let mut sent = 0usize;
        for _ in 0..2 * readers {
            match next_chunk() {
                Some(chunk) => {
                    to_readers[sent % readers].send(chunk).expect("readers wait for their chunks");
                    sent += 1;
                }
                None => break,
            }
        }
        let mut taken = 0usize;
        while taken < sent {
            let read = from_readers[taken % readers].recv().expect("a reader thread panicked");
            taken += 1;
            if let Some(chunk) = next_chunk() {
                to_readers[sent % readers].send(chunk).expect("readers wait for their chunks");
                sent += 1;
            }
            for r in read {
                if each(r).is_break() {
                    // Dropping the channels stops the readers.
                    return;
                }
            }
        }
    });
}

/// How many threads [`read_events`] should use on this machine: one per core, at most four.
pub fn readers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

/// The first difference between replayed jobs and stored ones (given in ascending id order), if
/// any: a job that differs, or one that only one side has.
pub fn first_job_difference<'a>(
    replayed: &BTreeMap<JobId, Job>,
    stored: impl IntoIterator<Item = &'a Job>,
) -> Option<JobDifference> {
    let mut rep = replayed.values().peekable();
    for job in stored {
        // Replayed jobs with smaller ids than this stored one were not stored.
        if let Some(r) = rep.next_if(|r| r.id < job.id) {
            return Some(JobDifference { id: r.id, replayed: Some(r.clone()), stored: None });
        }
        match rep.next_if(|r| r.id == job.id) {
            Some(r) if r == job => {}
            r => return Some(JobDifference { id: job.id, replayed: r.cloned(), stored: Some(job.clone()) }),
        }
    }
    rep.next().map(|r| JobDifference { id: r.id, replayed: Some(r.clone()), stored: None })
}

/// A job on which replay and the stored state disagree.
#[derive(Debug, Clone, PartialEq)]
pub struct JobDifference {
    /// The job's id.
    pub id: JobId,
    /// What replay made of it.
    pub replayed: Option<Job>,
    /// What was stored.
    pub stored: Option<Job>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventDraft, EventKind};
    use crate::Timestamp;

    /// `n` chained events of one tenant, as lines, with some spoilt: every 97th has another
    /// actor than it was hashed with, every 389th is not JSON, every 577th is not UTF-8.
    fn lines(n: usize) -> Vec<Vec<u8>> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|i| {
                let draft = EventDraft {
                    at: Timestamp::from_millis(i as i64),
                    tenant: "acme".into(),
                    project: "p".into(),
                    job_id: None,
                    actor: "orchd".into(),
                    correlation_id: format!("c-{i}"),
                    kind: EventKind::Audit { action: "test".into(), details: serde_json::json!({"i": i}) },
                };
                let (ev, line) = draft.seal_with_line(i as u64, &prev);
                prev = ev.hash;
                let mut line = line.into_bytes();
                if i % 97 == 0 {
                    line = String::from_utf8(line).unwrap().replace("orchd", "other").into_bytes();
                }
                if i % 389 == 0 {
                    line.truncate(line.len() / 2);
                }
                if i % 577 == 0 {
                    line[3] = 0xff;
                }
                line
            })
            .collect()
    }

    /// What one result says, comparable across runs.
    fn outcome(r: Result<ReadEvent, EventError>) -> Result<(Event, bool), String> {
        r.map(|r| {
            let valid = r.hash_is_valid();
            (r.event, valid)
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn reading_on_threads_gives_the_lines_in_order_and_stops_when_told() {
        let lines = lines(3 * CHUNK * 4 + 17);
        let one_by_one: Vec<_> = lines.iter().map(|l| outcome(ReadEvent::read(l, &mut Vec::new()))).collect();
        assert!(one_by_one.iter().filter(|r| matches!(r, Ok((_, false)))).count() > 10);
        assert!(one_by_one.iter().filter(|r| r.is_err()).count() > 3);
        assert!(one_by_one.iter().filter(|r| matches!(r, Ok((_, true)))).count() > 3000);
        for readers in [0, 1, 2, 3, 4] {
            let mut got = Vec::new();
            read_events(lines.iter().map(Vec::as_slice), readers, |r| {
                got.push(outcome(r));
                ControlFlow::Continue(())
            });
            assert!(got == one_by_one, "{readers} readers");
            // Stopping at any point, at a chunk's edge or inside one, gives exactly that prefix.
            for stop in [1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 3, lines.len() - 1] {
                let mut got = Vec::new();
                read_events(lines.iter().map(Vec::as_slice), readers, |r| {
                    got.push(outcome(r));
                    if got.len() == stop {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                });
                assert!(got[..] == one_by_one[..stop], "{readers} readers, stop at {stop}");
            }
        }
        // A few lines, and exactly one chunk: read on the calling thread, with the same results.
        for n in [3, CHUNK] {
            let lines = &lines[..n];
            let mut got = Vec::new();
            read_events(lines.iter().map(Vec::as_slice), 4, |r| {
                got.push(outcome(r));
                ControlFlow::Continue(())
            });
            assert!(got[..] == one_by_one[..n], "{n} lines");
        }
        let mut none = 0;
        read_events(std::iter::empty(), 2, |_| {
            none += 1;
            ControlFlow::Continue(())
        });
        assert_eq!(none, 0);
    }

    #[test]
    fn a_read_event_is_checked_as_push_checks_it() {
        let lines = lines(200);
        let mut pushed = ChainVerifier::new();
        let mut read = ChainVerifier::new();
        for l in &lines {
            let Ok(ev) = Event::from_line(std::str::from_utf8(l).unwrap()) else { continue };
            let r = ReadEvent::read(l, &mut Vec::new()).unwrap();
            assert_eq!(pushed.push(&ev), read.push_read(r));
        }
        // The 97th event's hash is refused, and so is everything after it (its link is broken).
        assert_eq!(pushed.events(), 96);
        assert_eq!(read.events(), 96);
        assert_eq!(
            read.push_read(ReadEvent::read(&lines[96], &mut Vec::new()).unwrap()),
            Err(ChainError::BadHash { seq: 97 })
        );
    }

    /// Job events of two tenants, chained: each job enqueued, claimed and acked, the second
    /// tenant's first event after the first tenant's third.
    fn job_events(jobs: JobId) -> Vec<Event> {
        use crate::{JobSpec, Timestamp};
        let mut heads: BTreeMap<String, String> = BTreeMap::new();
        let mut out = Vec::new();
        let mut seal = |tenant: &str, id: JobId, kind: EventKind| {
            let seq = out.len() as u64 + 1;
            let draft = EventDraft {
                at: Timestamp::from_millis(seq as i64),
                tenant: tenant.into(),
                project: "p".into(),
                job_id: Some(id),
                actor: "w".into(),
                correlation_id: format!("c-{id}"),
                kind,
            };
            let prev = heads.get(tenant).map_or(GENESIS_HASH, String::as_str);
            let ev = draft.seal(seq, prev);
            heads.insert(tenant.into(), ev.hash.clone());
            out.push(ev);
        };
        for id in 1..=jobs {
            let tenant = if id % 2 == 0 { "globex" } else { "acme" };
            seal(tenant, id, EventKind::Enqueued(JobSpec::for_test(serde_json::json!({"n": id}))));
            let lease_id = format!("l{id}");
            let lease_expires_at = Timestamp::from_millis(1 << 40);
            seal(
                tenant,
                id,
                EventKind::Claimed { lease_id: lease_id.clone(), worker: "w".into(), lease_expires_at, attempt: 1 },
            );
            seal(tenant, id, EventKind::Succeeded { lease_id, artifacts: Vec::new() });
        }
        out
    }

    /// The owned path moves an enqueued job's parts instead of copying them: the jobs, heads and
    /// refusals it gives are push's, event by event, for a new job, a job that already exists
    /// and a spec that can never run.
    #[test]
    fn a_read_event_is_applied_as_push_applies_it() {
        let events = job_events(5);
        let read = |ev: &Event| ReadEvent::read(ev.to_line().as_bytes(), &mut Vec::new()).unwrap();
        let (mut pushed, mut owned, mut read_owned) =
            (ChainVerifier::new(), ChainVerifier::new(), ChainVerifier::new());
        for ev in &events {
            assert_eq!(pushed.push(ev), Ok(()));
            assert_eq!(owned.push_owned(ev.clone()), Ok(()));
            assert_eq!(read_owned.push_read(read(ev)), Ok(()));
            let state = |v: &ChainVerifier| (v.jobs().clone(), v.heads().clone(), v.last_seq(), v.events());
            assert_eq!(state(&pushed), state(&owned));
            assert_eq!(state(&pushed), state(&read_owned));
        }
        assert_eq!(owned.jobs().len(), 5);
        assert_eq!(owned.heads().len(), 2);
        assert!(owned.jobs().values().all(|j| j.state == crate::JobState::Succeeded));

        // Refused after every other check passed: the job exists, or its spec can never run.
        let again = |spec_edit: fn(&mut crate::JobSpec), id: JobId| {
            let EventKind::Enqueued(mut spec) = events[0].event.clone() else { unreachable!() };
            spec_edit(&mut spec);
            let draft = EventDraft {
                at: crate::Timestamp::from_millis(99),
                tenant: "acme".into(),
                project: "p".into(),
                job_id: Some(id),
                actor: "w".into(),
                correlation_id: "c".into(),
                kind: EventKind::Enqueued(spec),
            };
            draft.seal(events.len() as u64 + 1, &owned.heads()["acme"])
        };
        for (ev, refusal) in [
            (again(|_| {}, 1), crate::TransitionError::JobExists(1)),
            (
                again(|s| s.max_attempts = 0, 9),
                crate::TransitionError::InvalidSpec(9, "max_attempts must be at least 1"),
            ),
        ] {
            let want = Err(ChainError::Replay(ReplayError { seq: ev.seq, source: refusal }));
            let (mut p, mut o, mut r) = (pushed.clone(), owned.clone(), owned.clone());
            assert_eq!(p.push(&ev), want);
            assert_eq!(o.push_owned(ev.clone()), want);
            assert_eq!(r.push_read(read(&ev)), want);
            for v in [&p, &o, &r] {
                assert_eq!((v.jobs(), v.heads(), v.events()), (owned.jobs(), owned.heads(), owned.events()));
            }
        }
    }
}
