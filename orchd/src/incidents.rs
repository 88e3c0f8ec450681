//! Incidents: conditions that need an operator, opened when they start and closed when they
//! clear. A periodic check gathers what holds now — jobs stuck (no heartbeat for long, or a
//! lease lost again and again), breakers not closed, buckets throttled for long — and the
//! store reconciles the open incidents with it, filing `incident.opened` / `incident.closed`
//! audit events (so they reach streams, webhooks and bundles like any other event).

use orch_store::{IncidentChanges, IncidentSpec, StoreError};
use serde_json::json;

use crate::AppState;

/// The kinds of incident this module opens and closes.
pub const KINDS: [&str; 3] = ["job_stuck", "breaker_open", "throttled"];

/// At most this many stuck jobs are reported per check.
const MAX_STUCK: usize = 1000;

/// Checks every condition once and reconciles the incidents; returns what changed.
pub async fn check(st: &AppState) -> Result<IncidentChanges, StoreError> {
    let now = st.clock.now();
    let settings = st.settings.flow.incidents.clone();
    let mut specs = crate::flow::view_mut(st, |f, now| f.incident_conditions(now));
    let quiet_since = now.plus_millis(-(settings.stuck_after_ms.min(i64::MAX as u64) as i64));
    st.blocking(move |s| {
        for job in s.stuck_jobs(quiet_since, settings.stuck_lease_losses, MAX_STUCK)? {
            let lease_lost = job.last_error.as_ref().is_some_and(|e| e.class == "lease_expired");
            let why = if lease_lost {
                format!("its lease lapsed at least {} times", settings.stuck_lease_losses)
            } else {
                format!("running without a heartbeat since {}", job.updated_at)
            };
            specs.push(IncidentSpec {
                tenant: job.tenant.clone(),
                kind: "job_stuck".into(),
                key: format!("job:{}", job.id),
                details: json!({
                    "job_id": job.id, "job_type": job.spec.queue, "state": job.state,
                    "attempt": job.attempt, "why": why,
                }),
            });
        }
        s.sync_incidents(&KINDS, specs)
    })
    .await
}
