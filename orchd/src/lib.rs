//! The orch daemon as a library: settings, the HTTP control plane, background services and the
//! demo workload. `main.rs` only parses the command line and calls into here.

pub mod config;
pub mod demo;
pub mod events;
pub mod flow;
pub mod hooks;
pub mod http;
pub mod import;
pub mod incidents;
pub mod jwt;
pub mod metrics;
pub mod recent;
pub mod schedules;
pub mod services;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use orch_core::Clock;
use orch_store::Store;

/// What every handler and service shares: a cheap-to-clone handle.
#[derive(Clone)]
pub struct AppState {
    /// The ledger.
    pub store: Arc<dyn Store>,
    /// The daemon's clock.
    pub clock: Arc<dyn Clock>,
    /// The validated settings.
    pub settings: Arc<config::Settings>,
    /// Verifies JWTs of the configured Authority, if one is.
    pub jwt: Option<Arc<jwt::JwtVerifier>>,
    /// Events tailed from the history, for streams.
    pub events: events::Hub,
    /// Prometheus metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Flow-control rules and live state (buckets, breakers).
    pub flow: Arc<std::sync::Mutex<flow::FlowControl>>,
    /// Taken by a re-read of the flow-control rules, so that re-reads take turns.
    flow_reloads: Arc<std::sync::Mutex<()>>,
    /// API tokens already read, while the ledger says none changed.
    pub tokens: Arc<http::auth::TokenCache>,
    ready: Arc<AtomicBool>,
    leader: Arc<AtomicBool>,
}

impl AppState {
    /// A state over an opened store; not ready until [`AppState::set_ready`].
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, settings: config::Settings) -> Self {
        let events =
            events::Hub::new(settings.events.buffer_size, settings.events.retention_ms, settings.events.max_lag)
                .with_max_bytes(settings.events.buffer_bytes);
        let metrics = Arc::new(metrics::Metrics::new(settings.slo_success_objective));
        let flow = flow::FlowControl::load(settings.flow.clone(), &*store).unwrap_or_else(|e| {
            tracing::error!(error = %e, "flow-control rules could not be read; retrying in the background");
            flow::FlowControl::empty(settings.flow.clone())
        });
        AppState {
            flow: Arc::new(std::sync::Mutex::new(flow)),
            flow_reloads: Arc::default(),
            tokens: Arc::default(),
            store,
            clock,
            settings: Arc::new(settings),
            jwt: None,
            events,
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            leader: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Accepts JWTs checked by `verifier`.
    pub fn with_jwt(mut self, verifier: Option<jwt::JwtVerifier>) -> Self {
        self.jwt = verifier.map(Arc::new);
        self
    }

    /// Marks the daemon ready to serve (migrations ran, services started).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Whether the daemon is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Whether this daemon runs the once-per-site services (see [`Store::leads`]).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Asks the store whether this daemon leads, and remembers the answer. A store that cannot
    /// tell (its database unreachable) makes it a follower until it can.
    pub async fn check_leadership(&self) -> bool {
        let leads = self.blocking(|s| s.leads()).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot tell whether this orchd leads; following");
            false
        });
        let was = self.leader.swap(leads, Ordering::SeqCst);
        if was && !leads {
            tracing::warn!("this orchd no longer runs the site's background services");
        }
        leads
    }

    /// Runs a short store call (a worker's claim, ack without artifacts, fail, heartbeat or
    /// enqueue of one job) in place on this async thread if it can run without waiting for
    /// anything (see [`orch_store::wait`]), and on the blocking pool if not. The hop to the pool
    /// and back costs about as much as such a call itself; waiting in place, for a lock another
    /// call holds, could stop the control plane. `f` may run twice: in place, failing before it
    /// writes anything, then on the pool. A batch stays on the pool ([`AppState::blocking`]): its
    /// own work dwarfs the hop, and in place it would hold an async thread for milliseconds.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl Fn(&dyn Store) -> Result<T, orch_store::StoreError> + Send + 'static,
    ) -> Result<T, orch_store::StoreError> {
        match orch_store::wait::without_waiting(|| f(&*self.store)) {
            Err(orch_store::StoreError::WouldWait) => self.blocking(f).await,
            done => done,
        }
    }

    /// Runs a blocking store call on the blocking pool, never holding a connection across `.await`.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, orch_store::StoreError> + Send + 'static,
    ) -> Result<T, orch_store::StoreError> {
        let store = self.store.clone();
        off_thread(move || f(&*store)).await
    }
}

/// Runs `f` on the blocking pool and returns what it returns; a panic in `f` is resumed here.
pub async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> orch_core::Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        orch_core::Timestamp::from_millis(ms)
    }
}

/// Serves the control plane on `listener` and runs the background services until `shutdown`
/// resolves; then stops accepting requests, lets running ones finish and stops the services.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The event hub starts a buffer's length behind the head, so that clients can resume across
    // a restart and the metrics see the recent past.
    let mut head = 0;
    state.store.snapshot(&mut |snap| {
        head = snap.head_seq()?;
        Ok(())
    })?;
    state.events.start_at(head.saturating_sub(state.settings.events.buffer_size as u64));
    state.check_leadership().await;
    let services = services::spawn_all(&state, stop_rx.clone());
    state.set_ready();
    let app = http::router(state.clone());
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "orchd listening");
    // The one line serve prints on stdout: where it listens (tests and scripts read it).
    println!("orchd listening on http://{addr}");
    let mut http_stop = stop_rx;
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = http_stop.changed().await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    server.await??;
    for s in services {
        let _ = s.await;
    }
    Ok(())
}
