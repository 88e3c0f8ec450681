//! The orch ledger model, shared by the daemon (`orchd`), the exporter (`orch-bundle`) and the
//! verifier (`orch-verify`).
//!
//! Everything here is pure: no files, sockets, databases or wall clock. The daemon records every
//! decision it makes (lease ids, retry times, jitter) as data in an [`Event`]; [`machine::apply`]
//! turns events into [`Job`] states, and is the *only* code that does, so that a history replayed
//! by an auditor yields exactly the jobs the daemon stored.
#![deny(missing_docs)]

pub mod bundle;
pub mod canonical;
pub mod chain;
pub mod clock;
pub mod dag;
pub mod dsse;
pub mod event;
pub mod failure;
pub mod flow;
pub mod hash;
pub mod job;
pub mod machine;
pub mod merkle;
pub mod retry;
pub mod schedule;
pub mod schema;
pub mod throttle;
pub mod time;
pub mod trust;

pub use clock::{Clock, ManualClock};
pub use event::{Event, EventDraft, EventKind};
pub use job::{Artifact, Job, JobError, JobId, JobSpec, JobState, Lease, ParentFailure};
pub use machine::{apply, replay, TransitionError};
pub use time::Timestamp;
