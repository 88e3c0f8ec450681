//! Checking a history: each event's own hash, the per-tenant hash chain, gap-free sequence
//! numbers, and that replaying it reproduces a given set of jobs.
//!
//! One mechanism for the daemon's `orchd check`, the bundle verifier and the importer.

use std::collections::BTreeMap;

use crate::event::Event;
use crate::hash::GENESIS_HASH;
use crate::job::{Job, JobId};
use crate::machine::{replay_one, ReplayError};

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
        let expected = self.last_seq.map_or(1, |s| s + 1);
        let seq_ok = if self.contiguous { ev.seq == expected } else { ev.seq >= expected };
        if !seq_ok {
            return Err(ChainError::BadSequence { seq: ev.seq, expected });
        }
        if !ev.hash_is_valid_with(&mut self.scratch) {
            return Err(ChainError::BadHash { seq: ev.seq });
        }
        let head = self.heads.get(&ev.tenant).map_or(GENESIS_HASH, String::as_str);
        if ev.prev_hash != head {
            return Err(ChainError::BrokenLink { seq: ev.seq, tenant: ev.tenant.clone() });
        }
        replay_one(&mut self.jobs, ev)?;
        // The tenant's head changes in place: no new key for every event.
        match self.heads.get_mut(&ev.tenant) {
            Some(head) => ev.hash.clone_into(head),
            None => {
                self.heads.insert(ev.tenant.clone(), ev.hash.clone());
            }
        }
        self.last_seq = Some(ev.seq);
        self.events += 1;
        Ok(())
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
