//! The scheduler: fires cron schedules (tenant settings) by enqueueing a job from each one's
//! template. A firing's job has the idempotency key `schedule:<name>:<fire time ms>`, so a
//! crash between enqueueing and moving the schedule's cursor never enqueues twice. Missed
//! firings (the daemon was down) are caught up to a bound, the most recent first kept.

use orch_core::schedule::{catch_up, CronSpec, OverlapPolicy};
use orch_core::{JobState, Timestamp};
use orch_store::{NewJob, Scope, SettingKind, StoreError};
use serde_json::json;

use crate::http::flow::StoredSchedule;
use crate::AppState;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fired {
    /// Jobs enqueued.
    pub enqueued: usize,
    /// Firings skipped because the previous job was still going (`overlap: skip`).
    pub skipped: usize,
    /// Firings dropped by the catch-up bound.
    pub missed: usize,
}

/// Fires every schedule that is due at the daemon's `now`.
pub async fn fire_due(st: &AppState) -> Result<Fired, StoreError> {
    let now = st.clock.now();
    st.blocking(move |s| {
        let mut out = Fired::default();
        for setting in s.settings(&Scope::All, SettingKind::Schedule)? {
            let sched: StoredSchedule = match serde_json::from_value(setting.doc.clone()) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(tenant = %setting.tenant, schedule = %setting.id, error = %e, "unreadable schedule");
                    continue;
                }
            };
            let spec = match CronSpec::parse(&sched.cron, &sched.tz) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(tenant = %setting.tenant, schedule = %setting.id, error = %e, "bad schedule");
                    continue;
                }
            };
            let (tenant, name) = (setting.tenant.as_str(), setting.id.as_str());
            let state = s.schedule_fired(tenant, name)?;
            let plan = catch_up(&spec, state.map(|(at, _)| at), sched.created_at, now, sched.max_catch_up);
            out.missed += plan.missed;
            if plan.missed > 0 {
                tracing::warn!(
                    tenant,
                    schedule = name,
                    missed = plan.missed,
                    "missed firings beyond the catch-up bound"
                );
            }
            let mut last_job = state.and_then(|(_, j)| j);
            for at in plan.fire {
                let running = match last_job {
                    Some(id) => s.job(&Scope::Tenant(tenant.into()), id).ok().filter(|j| !j.state.is_terminal()),
                    None => None,
                };
                match (running, sched.overlap) {
                    (Some(_), OverlapPolicy::Skip) => {
                        out.skipped += 1;
                        tracing::info!(tenant, schedule = name, %at, "skipped: the previous firing's job is not done");
                        s.set_schedule_fired(tenant, name, at, last_job)?;
                        continue;
                    }
                    (Some(prev), OverlapPolicy::CancelPrevious)
                        if prev.state == JobState::Queued || prev.state == JobState::Running =>
                    {
                        let why = format!("schedule {name} fired again at {at}");
                        s.cancel(&Scope::Tenant(tenant.into()), prev.id, "scheduler", Some(why))?;
                    }
                    _ => {}
                }
                let job = template_job(tenant, name, &sched, at);
                let enqueued = s.enqueue("scheduler", vec![job])?;
                let made = enqueued.into_iter().next().map(|e| {
                    out.enqueued += usize::from(e.created);
                    e.job.id
                });
                last_job = made.or(last_job);
                s.set_schedule_fired(tenant, name, at, last_job)?;
            }
        }
        Ok(out)
    })
    .await
}

fn template_job(tenant: &str, name: &str, sched: &StoredSchedule, at: Timestamp) -> NewJob {
    let t = &sched.job;
    let mut payload = t.payload.clone();
    if let Some(obj) = payload.as_object_mut() {
        obj.insert("scheduled_for".into(), json!(at));
    }
    NewJob {
        source: t.source.clone(),
        priority: t.priority,
        max_attempts: t.max_attempts,
        idempotency_key: Some(format!("schedule:{name}:{}", at.as_millis())),
        ..NewJob::new(tenant, t.project.as_deref().unwrap_or("default"), &t.queue, payload)
    }
}
