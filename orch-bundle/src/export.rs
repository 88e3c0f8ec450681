//! Building a bundle's content from a ledger snapshot.

use std::collections::{BTreeMap, BTreeSet};

use orch_core::bundle::{
    self, ChainSpan, Compression, FileEntry, Manifest, MerkleSummary, PreviousBundle, Producer, Rechainer, Redactor,
    TimeAnchor,
};
use orch_core::chain::ChainVerifier;
use orch_core::{canonical, hash, Event, JobId, Timestamp};
use orch_store::{Scope, SnapshotReader, Store, StoreError};

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The whole site or one tenant.
    pub scope: Scope,
    /// First sequence number (1 for a full bundle).
    pub from_seq: u64,
    /// Last sequence number (default: the ledger's head at the snapshot).
    pub to_seq: Option<u64>,
    /// The site's id recorded in the manifest (default: the ledger's own).
    pub site_id: Option<String>,
    /// The time anchor (default: the time of the last included event).
    pub anchor: Option<Timestamp>,
    /// Secret redaction.
    pub redactor: Redactor,
    /// The bundle this one continues.
    pub previous: Option<PreviousBundle>,
    /// Export the history imported from this origin site instead of the ledger's own (to
    /// reproduce that site's bundles from a ledger rebuilt by imports).
    pub origin: Option<String>,
}

/// Why an export failed. Nothing is written when it does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The range holds no events.
    #[error("no events to export in seq {from}..={to} (ledger head is {head})")]
    Empty {
        /// Requested start.
        from: u64,
        /// Effective end.
        to: u64,
        /// The ledger's last sequence.
        head: u64,
    },
    /// The ledger does not verify; a bundle of it would not either.
    #[error("the ledger does not verify, refusing to export it: {0}")]
    Corrupt(String),
    /// Packing failed.
    #[error("packing the archive: {0}")]
    Io(#[from] std::io::Error),
}

/// A bundle's content before signing.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The manifest.
    pub manifest: Manifest,
    /// Data files by name ([`bundle::DATA_FILES`]).
    pub files: BTreeMap<&'static str, Vec<u8>>,
}

impl Exported {
    /// The manifest's canonical bytes (what the DSSE envelope signs).
    pub fn manifest_bytes(&self) -> Vec<u8> {
        canonical::to_vec(&self.manifest).expect("manifests encode")
    }

    /// Packs the bundle with its signed envelope (`manifest.dsse.json` bytes).
    pub fn pack(&self, envelope: &[u8]) -> std::io::Result<Vec<u8>> {
        self.pack_with_roots(envelope, &[])
    }

    /// Packs the bundle carrying newer trust roots (`(version, root.json bytes)`) for offline
    /// sites, as `roots/<version>.root.json`.
    pub fn pack_with_roots(&self, envelope: &[u8], roots: &[(u64, Vec<u8>)]) -> std::io::Result<Vec<u8>> {
        let manifest = self.manifest_bytes();
        let names: Vec<String> = roots.iter().map(|(v, _)| format!("{}{v}.root.json", bundle::ROOTS_DIR)).collect();
        let sums = bundle::sha256sums(bundle::DATA_FILES.iter().map(|n| (*n, &self.manifest.files[*n])));
        let mut entries: Vec<(&str, &[u8])> = vec![
            (bundle::SHA256SUMS, sums.as_bytes()),
            (bundle::MANIFEST, &manifest),
            (bundle::MANIFEST_DSSE, envelope),
        ];
        entries.extend(self.files.iter().map(|(n, c)| (*n, c.as_slice())));
        entries.extend(names.iter().zip(roots).map(|(n, (_, c))| (n.as_str(), c.as_slice())));
        entries.sort_by(|a, b| a.0.cmp(b.0));
        let mtime = (self.manifest.time_anchor.at.as_millis().max(0) / 1000) as u64;
        crate::archive::pack(&entries, mtime)
    }
}

fn file_entry(content: &[u8]) -> FileEntry {
    FileEntry {
        sha256: hash::sha256_hex(content),
        size: content.len() as u64,
        lines: content.iter().filter(|&&b| b == b'\n').count() as u64,
    }
}

fn push_line(buf: &mut Vec<u8>, line: &[u8]) {
    buf.extend_from_slice(line);
    buf.push(b'\n');
}

/// Reads a consistent snapshot of `store` and builds the bundle's content.
pub fn export(store: &dyn Store, opts: ExportOptions) -> Result<Exported, ExportError> {
    export_with_progress(store, opts, &mut |_, _| {})
}

/// [`export`], reporting `(events done, events in range)` now and then as the range is read.
pub fn export_with_progress(
    store: &dyn Store,
    opts: ExportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Exported, ExportError> {
    let mut out: Option<Result<Exported, ExportError>> = None;
    store.snapshot(&mut |snap| {
        out = Some(match &opts.origin {
            Some(origin) => {
                snap.imported(origin).map_err(ExportError::from).and_then(|s| build(&*s, opts.clone(), progress))
            }
            None => build(snap, opts.clone(), progress),
        });
        Ok(())
    })?;
    out.expect("snapshot ran")
}

fn build(
    snap: &dyn SnapshotReader,
    opts: ExportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Exported, ExportError> {
    let head = snap.head_seq()?;
    let to = opts.to_seq.unwrap_or(head).min(head);
    let from = opts.from_seq.max(1);
    let mut redactor = opts.redactor;
    // The ledger must verify from its start: the exporter checks what it signs.
    let mut verifier = match opts.scope {
        Scope::All => ChainVerifier::new(),
        Scope::Tenant(_) => ChainVerifier::resume(BTreeMap::new(), BTreeMap::new(), 0),
    };
    let mut rechainer = Rechainer::new();
    let corrupt = |e: orch_core::chain::ChainError| ExportError::Corrupt(e.to_string());
    let mut failure: Option<ExportError> = None;
    // Checking an event's hash encodes it here: its canonical line, hash included.
    let mut line = Vec::new();

    // Events before the range: replayed for the base states and chain heads only.
    snap.for_each_event(&opts.scope, 1, from - 1, &mut |mut ev| {
        if failure.is_none() {
            let hash_valid = ev.hash_is_valid_with(&mut line);
            if let Err(e) = verifier.push_hashed(&ev, hash_valid) {
                failure = Some(corrupt(e));
            }
            if redactor.redact_event(&mut ev) || !rechainer.keep(&ev) {
                rechainer.push(&mut ev);
            }
        }
        Ok(())
    })?;
    if let Some(f) = failure.take() {
        return Err(f);
    }
    let before_count = redactor.summary().redacted_values;

    let mut history = Vec::new();
    let mut leaves = Vec::new();
    let mut chains: BTreeMap<String, ChainSpan> = BTreeMap::new();
    let mut base: BTreeMap<JobId, orch_core::Job> = BTreeMap::new();
    let mut touched: BTreeSet<JobId> = BTreeSet::new();
    let mut last_at: Option<Timestamp> = None;
    let mut events = 0u64;
    snap.for_each_event(&opts.scope, from, to, &mut |ev: Event| {
        if failure.is_some() {
            return Ok(());
        }
        if let Some(id) = ev.job_id {
            if touched.insert(id) {
                if let Some(j) = verifier.jobs().get(&id) {
                    base.insert(id, j.clone());
                }
            }
        }
        let hash_valid = ev.hash_is_valid_with(&mut line);
        if let Err(e) = verifier.push_hashed(&ev, hash_valid) {
            failure = Some(corrupt(e));
            return Ok(());
        }
        let mut e = ev;
        let prev = rechainer.heads().get(&e.tenant).cloned().unwrap_or_else(|| hash::GENESIS_HASH.to_string());
        // An event that redaction leaves as it was, in a chain it changed nothing of before,
        // keeps its hash and the line just encoded; any other is sealed and encoded again.
        if redactor.redact_event(&mut e) || !rechainer.keep(&e) {
            rechainer.push(&mut e);
            line = e.to_line().into_bytes();
        }
        let span = chains.entry(e.tenant.clone()).or_insert_with(|| ChainSpan {
            first_prev_hash: prev,
            first_hash: e.hash.clone(),
            last_hash: String::new(),
            events: 0,
        });
        span.last_hash = e.hash.clone();
        span.events += 1;
        leaves.push(orch_core::merkle::leaf_hash(&line));
        push_line(&mut history, &line);
        last_at = Some(e.at);
        events += 1;
        if events.is_multiple_of(4096) {
            progress(e.seq + 1 - from, to + 1 - from);
        }
        Ok(())
    })?;
    if let Some(f) = failure {
        return Err(f);
    }
    if events == 0 {
        return Err(ExportError::Empty { from, to, head });
    }
    let redacted_in_range = redactor.summary().redacted_values - before_count;

    // At the head, replay must agree with the stored jobs.
    if to == head {
        let mut stored = Vec::new();
        snap.for_each_job(&opts.scope, &mut |j| {
            stored.push(j);
            Ok(())
        })?;
        if let Some(d) = orch_core::chain::first_job_difference(verifier.jobs(), &stored) {
            return Err(ExportError::Corrupt(format!("job {}: the jobs table does not match its history", d.id)));
        }
    }

    let jobs_line = |redactor: &mut Redactor, j: &orch_core::Job| {
        let mut j = j.clone();
        redactor.redact_job(&mut j);
        canonical::to_vec(&j).expect("jobs encode")
    };
    let mut jobs = Vec::new();
    let mut base_file = Vec::new();
    for id in &touched {
        if let Some(j) = verifier.jobs().get(id) {
            push_line(&mut jobs, &jobs_line(&mut redactor, j));
        }
        if let Some(j) = base.get(id) {
            push_line(&mut base_file, &jobs_line(&mut redactor, j));
        }
    }
    let mut throttles = Vec::new();
    snap.for_each_throttle(&opts.scope, 1, u64::MAX, &mut |v| {
        push_line(&mut throttles, &canonical::value_to_vec(&v));
        Ok(())
    })?;

    let files: BTreeMap<&'static str, Vec<u8>> =
        [(bundle::BASE, base_file), (bundle::HISTORY, history), (bundle::JOBS, jobs), (bundle::THROTTLES, throttles)]
            .into_iter()
            .collect();
    let anchor = match opts.anchor {
        Some(at) => TimeAnchor { at, source: "operator".into() },
        None => TimeAnchor { at: last_at.expect("non-empty"), source: "last-event".into() },
    };
    let mut redaction = redactor.summary();
    redaction.redacted_values = redacted_in_range;
    let manifest = Manifest {
        format: bundle::FORMAT.into(),
        producer: Producer { name: "orch-bundle".into(), version: env!("CARGO_PKG_VERSION").into() },
        site_id: match opts.site_id {
            Some(s) => s,
            None => snap.site_id()?,
        },
        tenant: opts.scope.tenant().map(str::to_string),
        from_seq: from,
        to_seq: to,
        chains,
        files: files.iter().map(|(n, c)| (n.to_string(), file_entry(c))).collect(),
        merkle: MerkleSummary {
            algorithm: "rfc6962-sha256".into(),
            leaves: leaves.len() as u64,
            root: hex::encode(orch_core::merkle::root(&leaves)),
        },
        time_anchor: anchor,
        redaction,
        compression: Compression {
            algorithm: "zstd".into(),
            level: crate::archive::ZSTD_LEVEL,
            library_version: crate::archive::zstd_version(),
        },
        previous: opts.previous,
    };
    Ok(Exported { manifest, files })
}
