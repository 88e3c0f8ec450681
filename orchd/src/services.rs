//! Background services: the lease reaper, the idempotency-record sweeper, the event tailer, the
//! webhook and NATS publishers, the scheduler, and the re-reading of flow-control rules.
//! Each is a task that loops on an interval until the stop signal flips.
//!
//! Where several daemons share a ledger (PostgreSQL), the services that act for the whole site
//! (reaper, sweeper, scheduler, incident checks, webhook and NATS delivery) run only on the
//! elected leader, re-elected every second; the event tailer and the flow-rule reload serve the
//! daemon's own clients and run everywhere.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::AppState;

/// Starts every background service.
pub fn spawn_all(state: &AppState, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let interval = Duration::from_millis(state.settings.reaper_interval_ms);
    let ttl = state.settings.idempotency_ttl_ms;
    let election =
        spawn_periodic("leader-election", state.clone(), Duration::from_secs(1), stop.clone(), |st| async move {
            st.check_leadership().await;
        });
    let sweeper = spawn_leader_periodic(
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
    let reaper = spawn_leader_periodic("lease-reaper", state.clone(), interval, stop.clone(), |state| async move {
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
    let mut site_id = String::new();
    if let Err(e) = state.store.snapshot(&mut |snap| {
        site_id = snap.site_id()?;
        Ok(())
    }) {
        tracing::error!(error = %e, "reading the site id");
    }
    let outbox = std::sync::Arc::new(std::sync::Mutex::new(crate::hooks::Outbox::new(&site_id)));
    let hook_poll = Duration::from_millis(state.settings.webhooks.poll_ms);
    let webhooks = {
        let outbox = outbox.clone();
        spawn_leader_periodic("webhooks", state.clone(), hook_poll, stop.clone(), move |st| {
            let outbox = outbox.clone();
            async move {
                if let Err(e) = crate::hooks::deliver_once(&st, &outbox).await {
                    tracing::error!(error = %e, "webhook delivery failed");
                }
            }
        })
    };
    let scheduler =
        spawn_leader_periodic("scheduler", state.clone(), Duration::from_secs(1), stop.clone(), |st| async move {
            match crate::schedules::fire_due(&st).await {
                Ok(f) if f.enqueued > 0 => {
                    tracing::info!(enqueued = f.enqueued, skipped = f.skipped, "schedules fired")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "scheduler failed"),
            }
        });
    // Rules changed by `orchd` commands on the same database reach the claim path here.
    let reload = Duration::from_millis(state.flow.lock().map(|f| f.reload_ms()).unwrap_or(1_000));
    let flow = spawn_periodic("flow-rules", state.clone(), reload, stop.clone(), |st| async move {
        if let Err(e) = crate::flow::reload(&st).await {
            tracing::error!(error = %e, "re-reading flow-control rules failed");
        }
    });
    let check = Duration::from_millis(state.settings.flow.incidents.check_ms);
    let incidents = spawn_leader_periodic("incidents", state.clone(), check, stop.clone(), |st| async move {
        match crate::incidents::check(&st).await {
            Ok(c) => {
                for i in &c.opened {
                    tracing::warn!(tenant = %i.tenant, kind = %i.kind, key = %i.key, id = i.id, "incident opened");
                }
                for i in &c.closed {
                    tracing::info!(tenant = %i.tenant, kind = %i.kind, key = %i.key, id = i.id, "incident closed");
                }
            }
            Err(e) => tracing::error!(error = %e, "checking incidents failed"),
        }
    });
    let mut tasks = vec![election, reaper, sweeper, tailer, webhooks, scheduler, flow, incidents];
    if let Some(url) = state.settings.nats.url.clone() {
        tasks.push(spawn_nats(state.clone(), url, site_id, outbox, stop));
    }
    tasks
}

/// Connects to NATS (retrying), makes sure the stream exists, and publishes new events until
/// `stop`.
fn spawn_nats(
    state: AppState,
    url: String,
    site_id: String,
    outbox: std::sync::Arc<std::sync::Mutex<crate::hooks::Outbox>>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let settings = state.settings.nats.clone();
        let poll = Duration::from_millis(state.settings.events.poll_ms.max(50));
        'connect: loop {
            let js = async {
                let client = async_nats::connect(&url).await.map_err(|e| e.to_string())?;
                let js = async_nats::jetstream::new(client);
                js.get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: settings.stream.clone(),
                    subjects: vec![format!("{}.>", settings.subject_prefix)],
                    duplicate_window: Duration::from_secs(3600),
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
                Ok::<_, String>(js)
            };
            let js = tokio::select! {
                js = js => js,
                _ = stop.changed() => break 'connect,
            };
            let js = match js {
                Ok(js) => {
                    tracing::info!(%url, stream = %settings.stream, "publishing events to NATS JetStream");
                    js
                }
                Err(e) => {
                    tracing::warn!(%url, error = %e, "NATS unavailable; retrying in 5 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => continue 'connect,
                        _ = stop.changed() => break 'connect,
                    }
                }
            };
            loop {
                // Only the leader publishes (the stream would drop the others' copies by
                // `Nats-Msg-Id`, but they need not be sent).
                let published = if state.is_leader() {
                    crate::hooks::publish_once(&state, &js, &site_id, &outbox).await
                } else {
                    Ok(0)
                };
                match published {
                    Ok(500) => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "NATS publish failed; reconnecting");
                        continue 'connect;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.changed() => break 'connect,
                }
            }
        }
        tracing::debug!(service = "nats", "stopped");
    })
}

/// [`spawn_periodic`] for a once-per-site service: its ticks run only while this daemon leads.
pub fn spawn_leader_periodic<F, Fut>(
    name: &'static str,
    state: AppState,
    interval: Duration,
    stop: watch::Receiver<bool>,
    mut tick: F,
) -> JoinHandle<()>
where
    F: FnMut(AppState) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    spawn_periodic(name, state, interval, stop, move |st| {
        let run = st.is_leader().then(|| tick(st));
        async move {
            if let Some(run) = run {
                run.await;
            }
        }
    })
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
