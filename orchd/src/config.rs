//! Settings: defaults, then a TOML file, then `ORCHD_*` environment variables, then command-line
//! flags, into one typed [`Settings`] that is validated before anything starts.
//!
//! Environment variables map onto keys by lower-casing what follows `ORCHD_`, with `__` for a
//! nested table: `ORCHD_LISTEN=0.0.0.0:8080`, `ORCHD_RETRY__BASE_MS=500`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use orch_core::retry::RetryPolicy;
use orch_store::{StoreOptions, Synchronous};
use serde::{Deserialize, Serialize};

/// Everything orchd can be told.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The ledger: a SQLite file, or a `postgres://` URL that several orchd may share.
    pub db: orch_store::Location,
    /// Where the control plane listens.
    pub listen: SocketAddr,
    /// `normal` (survives a crash of orchd) or `full` (survives power loss; slower).
    pub synchronous: String,
    /// Lease length when a claim names none, in milliseconds.
    pub default_lease_ms: u64,
    /// Longest lease a worker may ask for, in milliseconds.
    pub max_lease_ms: u64,
    /// Attempts when a job names none.
    pub default_max_attempts: u32,
    /// Largest job payload, in bytes of JSON.
    pub max_payload_bytes: usize,
    /// Largest HTTP request body, in bytes (larger ones get 413 `body_too_large`).
    pub max_body_bytes: usize,
    /// How long the response to an `Idempotency-Key` is kept, in milliseconds.
    pub idempotency_ttl_ms: u64,
    /// JWTs of an external Authority, checked against a local JWKS file.
    pub jwt: crate::jwt::JwtSettings,
    /// Bundle import over the API (`POST /api/v1/imports`).
    pub import: ImportSettings,
    /// Event streams (SSE, WebSocket) and their resume buffer.
    pub events: EventSettings,
    /// Signed webhooks.
    pub webhooks: crate::hooks::WebhookSettings,
    /// The NATS JetStream publisher.
    pub nats: crate::hooks::NatsSettings,
    /// Flow control: breakers, backpressure.
    pub flow: crate::flow::FlowSettings,
    /// The job success objective behind `orch_slo_burn_rate` (e.g. 0.99).
    pub slo_success_objective: f64,
    /// Backoff after failures.
    pub retry: RetryPolicy,
    /// How often the reaper looks for lapsed leases, in milliseconds.
    pub reaper_interval_ms: u64,
    /// `text` or `json` logs (on stderr).
    pub log_format: String,
    /// Run a small demo workload (jobs for two tenants and an in-process worker).
    pub demo: bool,
}

impl Default for Settings {
    fn default() -> Self {
        let store = StoreOptions::default();
        Settings {
            db: orch_store::Location::Sqlite(PathBuf::from("orchd.db")),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            synchronous: "normal".into(),
            default_lease_ms: store.default_lease_ms,
            max_lease_ms: store.max_lease_ms,
            default_max_attempts: store.default_max_attempts,
            max_payload_bytes: store.max_payload_bytes,
            max_body_bytes: 2 << 20,
            idempotency_ttl_ms: 24 * 3_600_000,
            jwt: crate::jwt::JwtSettings::default(),
            import: ImportSettings::default(),
            events: EventSettings::default(),
            slo_success_objective: 0.99,
            webhooks: crate::hooks::WebhookSettings::default(),
            nats: crate::hooks::NatsSettings::default(),
            flow: crate::flow::FlowSettings::default(),
            retry: store.retry,
            reaper_interval_ms: 1_000,
            log_format: "text".into(),
            demo: false,
        }
    }
}

/// The event hub's bounds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// Events kept for `Last-Event-ID` resumption.
    pub buffer_size: usize,
    /// The most memory (estimated, in bytes) those events may take; the oldest go first.
    pub buffer_bytes: usize,
    /// How long (event time, milliseconds) they are kept.
    pub retention_ms: u64,
    /// How far (in events) a live client may fall behind before it is dropped.
    pub max_lag: usize,
    /// How often the ledger's history is tailed, in milliseconds.
    pub poll_ms: u64,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            buffer_size: 10_000,
            buffer_bytes: 16 << 20,
            retention_ms: 3_600_000,
            max_lag: 1_024,
            poll_ms: 100,
        }
    }
}

/// What the API's importer trusts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImportSettings {
    /// The trusted root.json; imports over the API are refused until it is set.
    pub root: Option<PathBuf>,
    /// A directory of newer roots (`N.root.json`) to rotate to.
    pub root_chain: Option<PathBuf>,
    /// The oldest a bundle's time anchor may be, in milliseconds.
    pub max_age_ms: Option<u64>,
    /// Largest bundle accepted over the API, in bytes.
    pub max_bundle_bytes: usize,
}

impl Default for ImportSettings {
    fn default() -> Self {
        ImportSettings { root: None, root_chain: None, max_age_ms: None, max_bundle_bytes: 256 << 20 }
    }
}

impl Settings {
    /// Defaults, overlaid with the TOML file (if any), then with `ORCHD_*` variables from `env`.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Settings> {
        let mut table = toml::Table::try_from(Settings::default()).context("encoding defaults")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let file: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            merge(&mut table, file);
        }
        for (k, v) in env {
            let Some(key) = k.strip_prefix("ORCHD_") else { continue };
            let path: Vec<String> = key.to_ascii_lowercase().split("__").map(str::to_string).collect();
            // A value that parses as TOML (numbers, booleans) is taken as such, else as a string.
            let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(v));
            set_path(&mut table, &path, value);
        }
        let settings: Settings = table.try_into().context("invalid settings")?;
        settings.validate()?;
        Ok(settings)
    }

    /// Refuses settings that cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.default_lease_ms == 0 || self.default_lease_ms > self.max_lease_ms {
            bail!("default_lease_ms must be between 1 and max_lease_ms ({})", self.max_lease_ms);
        }
        if self.default_max_attempts == 0 {
            bail!("default_max_attempts must be at least 1");
        }
        if self.retry.base_ms == 0 || self.retry.base_ms > self.retry.max_ms {
            bail!("retry.base_ms must be between 1 and retry.max_ms ({})", self.retry.max_ms);
        }
        if self.max_body_bytes < 1024 {
            bail!("max_body_bytes must be at least 1024");
        }
        if self.events.buffer_size == 0
            || self.events.buffer_bytes == 0
            || self.events.max_lag == 0
            || self.events.poll_ms == 0
        {
            bail!("events.buffer_size, events.buffer_bytes, events.max_lag and events.poll_ms must be at least 1");
        }
        if !(0.0..1.0).contains(&self.slo_success_objective) {
            bail!("slo_success_objective must be in [0, 1), e.g. 0.99");
        }
        if self.webhooks.max_attempts == 0 || self.webhooks.poll_ms == 0 || self.webhooks.timeout_ms == 0 {
            bail!("webhooks.max_attempts, webhooks.poll_ms and webhooks.timeout_ms must be at least 1");
        }
        if self.idempotency_ttl_ms == 0 {
            bail!("idempotency_ttl_ms must be at least 1");
        }
        if self.reaper_interval_ms == 0 {
            bail!("reaper_interval_ms must be at least 1");
        }
        self.flow.validate()?;
        self.sync_mode()?;
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!("log_format must be \"text\" or \"json\", not {:?}", self.log_format);
        }
        Ok(())
    }

    /// The SQLite durability mode.
    pub fn sync_mode(&self) -> anyhow::Result<Synchronous> {
        match self.synchronous.as_str() {
            "normal" => Ok(Synchronous::Normal),
            "full" => Ok(Synchronous::Full),
            other => bail!("synchronous must be \"normal\" or \"full\", not {other:?}"),
        }
    }

    /// The store's share of the settings.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            retry: self.retry,
            default_lease_ms: self.default_lease_ms,
            max_lease_ms: self.max_lease_ms,
            default_max_attempts: self.default_max_attempts,
            max_payload_bytes: self.max_payload_bytes,
        }
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = entry {
                set_path(t, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("orchd.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\ndefault_lease_ms = 5000\n[retry]\nbase_ms = 200\n")
            .unwrap();
        let env = [("ORCHD_RETRY__BASE_MS".to_string(), "300".to_string()), ("ORCHD_DB".into(), "/tmp/x.db".into())];
        let s = Settings::load(Some(&file), env).unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.default_lease_ms, 5000);
        assert_eq!(s.retry.base_ms, 300);
        assert_eq!(s.retry.max_ms, RetryPolicy::default().max_ms);
        assert_eq!(s.db, orch_store::Location::Sqlite(PathBuf::from("/tmp/x.db")));
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let err = Settings::load(None, env("ORCHD_LISTN", "x")).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field `listn`"), "{err:#}");
        assert!(Settings::load(None, env("ORCHD_DEFAULT_LEASE_MS", "0")).is_err());
        assert!(Settings::load(None, env("ORCHD_SYNCHRONOUS", "sometimes")).is_err());
    }
}
