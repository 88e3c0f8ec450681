//! Background services: the lease reaper and the idempotency-record sweeper (and, as they land,
//! the scheduler and the breakers).
//! Each is a task that loops on an interval until the stop signal flips.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::AppState;

/// Starts every background service.
pub fn spawn_all(state: &AppState, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let interval = Duration::from_millis(state.settings.reaper_interval_ms);
    let ttl = state.settings.idempotency_ttl_ms;
    let sweeper = spawn_periodic(
        "idempotency-sweeper",
        state.clone(),
        Duration::from_secs(60),
        stop.clone(),
        move |st| async move {
            let before = st.clock.now().plus_millis(-(ttl.min(i64::MAX as u64) as i64));
            match st.blocking(move |s| s.purge_idempotency(before)).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(records = n, "forgot old idempotency records"),
                Err(e) => tracing::error!(error = %e, "idempotency sweeper failed"),
            }
        },
    );
    let reaper = spawn_periodic("lease-reaper", state.clone(), interval, stop.clone(), |state| async move {
        loop {
            match state.blocking(|s| s.reap_expired_leases(1_000)).await {
                Ok(1_000) => continue, // more may be waiting
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "lease reaper failed");
                    break;
                }
            }
        }
    });
    let enricher = std::sync::Arc::new(std::sync::Mutex::new(crate::events::Enricher::default()));
    let poll = Duration::from_millis(state.settings.events.poll_ms);
    let tailer = spawn_periodic("event-tailer", state.clone(), poll, stop.clone(), move |st| {
        let enricher = enricher.clone();
        async move {
            loop {
                match crate::events::tail_once(&st, &enricher).await {
                    Ok(1_000) => continue, // more may be waiting
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "event tailer failed");
                        break;
                    }
                }
            }
        }
    });
    vec![reaper, sweeper, tailer]
}

/// Runs `tick` every `interval` until `stop` becomes true.
pub fn spawn_periodic<F, Fut>(
    name: &'static str,
    state: AppState,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    mut tick: F,
) -> JoinHandle<()>
where
    F: FnMut(AppState) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = timer.tick() => tick(state.clone()).await,
                _ = stop.changed() => break,
            }
        }
        tracing::debug!(service = name, "stopped");
    })
}
