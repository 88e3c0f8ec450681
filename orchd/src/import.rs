//! Offline Kit import: a bundle carried across the air gap is verified exactly as `orch-verify`
//! verifies it, planned against what this ledger already imported from its site (new, already
//! present, or refused: a gap, an overlap, a rollback to an older bundle, anchor or trust root),
//! and applied in one transaction. The same code serves `orchd import` and the API.

use orch_core::bundle::{self, Manifest};
use orch_core::hash::GENESIS_HASH;
use orch_core::trust::Root;
use orch_core::{Event, Job, Timestamp};
use orch_store::{ImportBatch, ImportOutcome, ImportState, Store, StoreError};
use serde::Serialize;
use serde_json::json;

/// What the importer trusts and how strict it is.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The trusted root.
    pub root: Root,
    /// Newer roots to rotate to (each signed by its predecessor).
    pub root_chain: Vec<Root>,
    /// The local clock's "now"; the importer never uses an earlier one than the newest time
    /// anchor it has imported.
    pub now: Timestamp,
    /// The oldest a bundle's time anchor may be, relative to now.
    pub max_age_ms: Option<u64>,
    /// Accept a bundle whose anchor or trust root is older than what was imported before
    /// (needs `reason` and `ticket`; recorded in the audit event).
    pub allow_rollback: bool,
    /// Why (required with `allow_rollback`).
    pub reason: Option<String>,
    /// The change ticket (required with `allow_rollback`).
    pub ticket: Option<String>,
}

/// What a bundle would do (or did) to this ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The origin site.
    pub site_id: String,
    /// `*` or the tenant of a tenant bundle.
    pub scope: String,
    /// The bundle's sequence range.
    pub from_seq: u64,
    /// Its last sequence number.
    pub to_seq: u64,
    /// SHA-256 of its `manifest.json`.
    pub manifest_sha256: String,
    /// `new` (would be applied) or `already_imported` (nothing to do).
    pub status: String,
    /// Events it appends.
    pub events: u64,
    /// Jobs it creates or changes, by replay.
    pub jobs: u64,
    /// Its time anchor.
    pub anchor: Timestamp,
    /// The trust root version that verified it.
    pub root_version: u64,
    /// Where this site's import stood before: the last sequence number imported.
    pub imported_to_seq: Option<u64>,
    /// Protections overridden with `allow_rollback` (empty normally).
    pub overrides: Vec<String>,
}

/// Why a bundle is not imported. Nothing is written when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The bundle does not verify.
    #[error("the bundle does not verify: {}", .0.join("; "))]
    Verify(Vec<String>),
    /// Importing it would leave a hole in the site's history.
    #[error("site {site}: events {from}..={to} are missing; import the bundle(s) holding them first")]
    Gap {
        /// Origin site.
        site: String,
        /// First missing sequence number.
        from: u64,
        /// Last missing sequence number.
        to: u64,
    },
    /// The bundle starts inside what was imported already, or does not continue it.
    #[error("site {site}: {why}")]
    NotContiguous {
        /// Origin site.
        site: String,
        /// Why.
        why: String,
    },
    /// Older than what was imported (anchor or trust root), without an override.
    #[error("site {site}: {why} (an operator may override with --allow-rollback, a reason and a ticket)")]
    Rollback {
        /// Origin site.
        site: String,
        /// What is older.
        why: String,
    },
    /// An override without its reason and ticket.
    #[error("--allow-rollback needs --reason and --ticket")]
    ReasonRequired,
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImportError {
    /// A stable code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            ImportError::Verify(_) => "bundle_invalid",
            ImportError::Gap { .. } => "import_gap",
            ImportError::NotContiguous { .. } => "import_not_contiguous",
            ImportError::Rollback { .. } => "import_rollback",
            ImportError::ReasonRequired => "reason_required",
            ImportError::Store(e) => e.code(),
        }
    }
}

/// Verifies and plans a bundle; with `apply`, also applies it. Returns the plan (and, when
/// applied, what was written).
pub fn import(
    store: &dyn Store,
    actor: &str,
    bytes: &[u8],
    opts: &ImportOptions,
    apply: bool,
) -> Result<(Plan, Option<ImportOutcome>), ImportError> {
    if opts.allow_rollback && (blank(&opts.reason) || blank(&opts.ticket)) {
        return Err(ImportError::ReasonRequired);
    }
    let entries = orch_verify::archive::read(bytes).map_err(|e| ImportError::Verify(vec![e]))?;
    let manifest_bytes = entries.files.get(bundle::MANIFEST).cloned().unwrap_or_default();
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| ImportError::Verify(vec![format!("manifest.json: {e}")]))?;
    let scope = manifest.tenant.clone().unwrap_or_else(|| "*".into());
    let state = store.import_state(&manifest.site_id, &scope)?;
    // The time floor: never earlier than the newest anchor imported from this site.
    let floor = state.as_ref().map(|s| s.anchor_at);
    let now = floor.map_or(opts.now, |f| f.max(opts.now));
    let report = orch_verify::verify(
        bytes,
        &orch_verify::VerifyOptions {
            root: opts.root.clone(),
            root_chain: opts.root_chain.clone(),
            now: Some(now),
            max_age_ms: opts.max_age_ms,
        },
    );
    let summary = match (report.ok, report.summary) {
        (true, Some(s)) => s,
        (_, _) => {
            let failures = report.failures.iter().map(|f| format!("{} {}: {}", f.check, f.entry, f.message)).collect();
            return Err(ImportError::Verify(failures));
        }
    };
    let manifest_sha256 = orch_core::hash::sha256_hex(&manifest_bytes);
    let mut plan = Plan {
        site_id: manifest.site_id.clone(),
        scope: scope.clone(),
        from_seq: manifest.from_seq,
        to_seq: manifest.to_seq,
        manifest_sha256: manifest_sha256.clone(),
        status: "new".into(),
        events: summary.events,
        jobs: 0,
        anchor: manifest.time_anchor.at,
        root_version: summary.root_version,
        imported_to_seq: state.as_ref().map(|s| s.to_seq),
        overrides: Vec::new(),
    };
    if store.bundle_imported(&manifest_sha256)? {
        plan.status = "already_imported".into();
        return Ok((plan, None));
    }
    check_position(&manifest, state.as_ref())?;
    if let Some(s) = &state {
        let mut older = Vec::new();
        if manifest.time_anchor.at < s.anchor_at {
            older.push(format!(
                "its time anchor {} is older than {} already imported",
                manifest.time_anchor.at, s.anchor_at
            ));
        }
        if summary.root_version < s.root_version {
            older.push(format!(
                "it was verified with trust root version {} but version {} verified earlier imports",
                summary.root_version, s.root_version
            ));
        }
        if !older.is_empty() {
            if !opts.allow_rollback {
                return Err(ImportError::Rollback { site: manifest.site_id.clone(), why: older.join("; ") });
            }
            plan.overrides = older;
        }
    }
    let events = parse_lines::<Event>(&entries.files, bundle::HISTORY)?;
    let base = parse_lines::<Job>(&entries.files, bundle::BASE)?;
    let throttles = parse_lines::<orch_core::throttle::ThrottleRecord>(&entries.files, bundle::THROTTLES)?;
    let mut touched: Vec<i64> = events.iter().filter_map(|(e, _)| e.job_id).collect();
    touched.sort_unstable();
    touched.dedup();
    plan.jobs = touched.len() as u64;
    if !apply {
        return Ok((plan, None));
    }
    let batch = ImportBatch {
        site_id: manifest.site_id.clone(),
        scope,
        expect_to_seq: state.as_ref().map(|s| s.to_seq),
        from_seq: manifest.from_seq,
        to_seq: manifest.to_seq,
        manifest_sha256,
        anchor_at: manifest.time_anchor.at,
        root_version: summary.root_version,
        events,
        base: base.into_iter().map(|(j, _)| j).collect(),
        throttles: throttles.into_iter().map(|(t, line)| (t.seq, t.tenant, line)).collect(),
        details: json!({
            "anchor": manifest.time_anchor.at,
            "root_version": summary.root_version,
            "overrides": plan.overrides,
            "reason": opts.reason,
            "ticket": opts.ticket,
        }),
    };
    let outcome = store.apply_import(actor, batch)?;
    Ok((plan, Some(outcome)))
}

fn blank(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(|s| s.trim().is_empty())
}

/// The bundle must start right after what was imported from its site, continue the last
/// imported bundle, and continue each tenant's hash chain.
fn check_position(m: &Manifest, state: Option<&ImportState>) -> Result<(), ImportError> {
    let site = m.site_id.clone();
    let imported_to = state.map_or(0, |s| s.to_seq);
    if m.from_seq > imported_to + 1 {
        return Err(ImportError::Gap { site, from: imported_to + 1, to: m.from_seq - 1 });
    }
    if m.from_seq <= imported_to {
        let why = if m.to_seq <= imported_to {
            format!(
                "events {}..={} were imported already (from another bundle); this one is older",
                m.from_seq, m.to_seq
            )
        } else {
            format!("the bundle starts at {} but events up to {imported_to} were imported already", m.from_seq)
        };
        return Err(ImportError::NotContiguous { site, why });
    }
    if let Some(s) = state {
        let continues = m.previous.as_ref().is_some_and(|p| p.manifest_sha256 == s.manifest_sha256);
        if !continues {
            return Err(ImportError::NotContiguous {
                site,
                why: format!(
                    "the bundle does not name the last imported bundle (manifest {}) as its previous one",
                    &s.manifest_sha256[..12.min(s.manifest_sha256.len())]
                ),
            });
        }
    }
    for (tenant, span) in &m.chains {
        let head = state.and_then(|s| s.heads.get(tenant)).map_or(GENESIS_HASH, String::as_str);
        if span.first_prev_hash != head {
            return Err(ImportError::NotContiguous {
                site,
                why: format!("tenant {tenant}'s hash chain does not continue from the last imported event"),
            });
        }
    }
    Ok(())
}

fn parse_lines<T: serde::de::DeserializeOwned>(
    files: &std::collections::BTreeMap<String, Vec<u8>>,
    name: &str,
) -> Result<Vec<(T, String)>, ImportError> {
    let text = files.get(name).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .map(|v| (v, l.to_string()))
                .map_err(|e| ImportError::Verify(vec![format!("{name}: {e}")]))
        })
        .collect()
}
