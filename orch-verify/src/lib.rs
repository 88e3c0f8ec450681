//! Offline verification of orch audit bundles.
//!
//! [`verify`] is pure: bundle bytes and a trust root in, a [`Report`] out. It never prints or
//! exits; the `orch-verify` binary prints the report (as text, or as the `--json` document whose
//! schema is `schemas/verify-report.schema.json`) and maps it to an exit code.

pub mod archive;
pub mod proof;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use orch_core::bundle::{self, Manifest};
use orch_core::chain::ChainVerifier;
use orch_core::trust::Root;
use orch_core::{Job, JobId, Timestamp};
use serde::Serialize;

/// What to trust and when "now" is.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The trusted root (version N).
    pub root: Root,
    /// Newer roots (N+1, N+2, …) to walk to, each signed by its predecessor's threshold.
    pub root_chain: Vec<Root>,
    /// The verifier's "now", for the anchor's staleness (default: the anchor itself, i.e. no
    /// staleness check unless `max_age_ms` and `now` are both given).
    pub now: Option<Timestamp>,
    /// The oldest an anchor may be, relative to `now`, in milliseconds.
    pub max_age_ms: Option<u64>,
}

/// Reads a trusted `root.json` and, from `chain_dir`, the newer roots (`N.root.json`) to rotate
/// to, in version order. Errors name the file.
pub fn load_roots(root: &std::path::Path, chain_dir: Option<&std::path::Path>) -> Result<(Root, Vec<Root>), String> {
    let read_root = |path: &std::path::Path| -> Result<Root, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a root.json: {e}", path.display()))
    };
    let trusted = read_root(root)?;
    let mut chain = Vec::new();
    if let Some(dir) = chain_dir {
        let mut files: Vec<(u64, std::path::PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))? {
            let path = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(v) = name.strip_suffix(".root.json").and_then(|v| v.parse().ok()) {
                files.push((v, path));
            }
        }
        files.sort();
        for (v, path) in files {
            if v > trusted.signed.version {
                chain.push(read_root(&path)?);
            }
        }
    }
    Ok((trusted, chain))
}

/// Reads an allowed anchor age (`--max-age`) in humantime's syntax (`30d`, `1h 30m`) as
/// milliseconds. An age longer than `u64` milliseconds (some 584 million years) is forever
/// (`u64::MAX`), not a wrapped-around value; one humantime itself cannot hold is an error.
pub fn parse_max_age(text: &str) -> Result<u64, humantime::DurationError> {
    let d = humantime::parse_duration(text)?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One failed check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Failure {
    /// The check: `archive`, `manifest`, `signature`, `root`, `files`, `chain`, `merkle`,
    /// `anchor` or `replay`.
    pub check: String,
    /// The entry (file, event seq, job id, key id) it concerns.
    pub entry: String,
    /// What is wrong.
    pub message: String,
}

/// What a bundle says about itself, once it is known to be readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Summary {
    /// The site.
    pub site_id: String,
    /// Tenant scope, if any.
    pub tenant: Option<String>,
    /// Sequence range.
    pub from_seq: u64,
    /// Sequence range.
    pub to_seq: u64,
    /// Events in the history.
    pub events: u64,
    /// Jobs in `jobs.jsonl`.
    pub jobs: u64,
    /// Merkle root.
    pub merkle_root: String,
    /// Time anchor.
    pub anchor: Timestamp,
    /// Root version the signatures were checked against.
    pub root_version: u64,
    /// Key ids whose signatures counted.
    pub signed_by: Vec<String>,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Report {
    /// Whether every check passed.
    pub ok: bool,
    /// The checks that ran, in order.
    pub checks: Vec<String>,
    /// What failed.
    pub failures: Vec<Failure>,
    /// The bundle's own description, when it could be read.
    pub summary: Option<Summary>,
}

struct Ctx {
    checks: Vec<String>,
    failures: Vec<Failure>,
}

impl Ctx {
    fn check(&mut self, name: &str) {
        self.checks.push(name.to_string());
    }
    fn fail(&mut self, check: &str, entry: impl Into<String>, message: impl Into<String>) {
        self.failures.push(Failure { check: check.into(), entry: entry.into(), message: message.into() });
    }
}

/// Parses JSON lines, reporting the first bad line.
/// The lines of a JSON Lines file: UTF-8, each line ended by a newline.
fn lines_of<'a>(content: &'a [u8], file: &str) -> Result<Vec<&'a str>, (String, String)> {
    let text = std::str::from_utf8(content).map_err(|_| (file.to_string(), "not UTF-8".to_string()))?;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err((file.to_string(), "last line is not newline-terminated".into()));
    }
    Ok(text.lines().collect())
}

fn parse_lines<T: serde::de::DeserializeOwned>(content: &[u8], file: &str) -> Result<Vec<T>, (String, String)> {
    lines_of(content, file)?
        .into_iter()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| (format!("{file}:{}", i + 1), e.to_string())))
        .collect()
}

/// Where replayed jobs (in id order) and the lines of `jobs.jsonl` first disagree: a replayed
/// job must be written as exactly its line, so the bytes are compared and only a line that
/// differs is parsed, to say how. Returns the failure's entry and message.
fn first_jobs_difference<'a>(replayed: impl Iterator<Item = &'a Job>, lines: &[&str]) -> Option<(String, String)> {
    let show = |j: Option<&Job>| j.map_or("nothing".to_string(), |j| serde_json::to_string(j).unwrap_or_default());
    let mut replayed = replayed.peekable();
    for (i, line) in lines.iter().enumerate() {
        let next = replayed.peek().copied();
        if next.and_then(|j| orch_core::canonical::to_vec(j).ok()).as_deref() == Some(line.as_bytes()) {
            replayed.next();
            continue;
        }
        let stored: Job = match serde_json::from_str(line) {
            Ok(j) => j,
            Err(e) => return Some((format!("{}:{}", bundle::JOBS, i + 1), e.to_string())),
        };
        if next == Some(&stored) {
            return Some((format!("{}:{}", bundle::JOBS, i + 1), "not the canonical form of its job".into()));
        }
        let (id, replayed, stored) = match next {
            Some(r) if r.id < stored.id => (r.id, Some(r), None),
            Some(r) if r.id == stored.id => (r.id, Some(r), Some(&stored)),
            _ => (stored.id, None, Some(&stored)),
        };
        return Some((
            format!("job {id}"),
            format!("replay gives {} but jobs.jsonl has {}", show(replayed), show(stored)),
        ));
    }
    replayed
        .next()
        .map(|r| (format!("job {}", r.id), format!("replay gives {} but jobs.jsonl has nothing", show(Some(r)))))
}

/// The data files' digests and line counts, and the history's Merkle tree.
struct Hashed {
    /// Per data file: lowercase hex SHA-256 and newline count.
    files: BTreeMap<&'static str, (String, u64)>,
    merkle: orch_core::merkle::MerkleBuilder,
}

fn hash_files(files: &BTreeMap<String, Vec<u8>>, history: &[u8]) -> Hashed {
    let empty = Vec::new();
    let files = bundle::DATA_FILES
        .iter()
        .map(|&name| {
            let content = files.get(name).unwrap_or(&empty);
            let lines = content.iter().filter(|&&b| b == b'\n').count() as u64;
            (name, (orch_core::hash::sha256_hex(content), lines))
        })
        .collect();
    let mut merkle = orch_core::merkle::MerkleBuilder::new();
    for line in history_lines(history) {
        merkle.push_leaf(line);
    }
    Hashed { files, merkle }
}

/// The lines of `history.jsonl`, each a Merkle leaf. Every line is an event: a blank one is an
/// error, not skipped (`orchd import` refuses it); a last line without its newline is a line.
fn history_lines(history: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = history.strip_suffix(b"\n").unwrap_or(history);
    (!history.is_empty()).then(|| body.split(|&b| b == b'\n')).into_iter().flatten()
}

/// What checking the chain and replaying it found.
struct Chain {
    /// Failures of the `chain` check (and of `replay` for base.jsonl and events that do not
    /// apply, reported with the chain as before).
    failures: Vec<Failure>,
    /// Failures of the `replay` check proper: jobs.jsonl against the replayed jobs.
    replay_failures: Vec<Failure>,
    /// The last event's sequence number and time.
    last: Option<(u64, Timestamp)>,
    /// Lines of jobs.jsonl.
    jobs: u64,
}

/// History, in one pass over its lines, keeping no parsed event: each event's hash, tenant link
/// and sequence are checked and it is replayed over base.jsonl; then the replayed jobs are
/// compared with jobs.jsonl.
fn check_chain(manifest: &Manifest, base: &[u8], history: &[u8], jobs_file: &[u8]) -> Chain {
    let mut cx = Ctx { checks: Vec::new(), failures: Vec::new() };
    let base: Vec<Job> = parse_lines(base, bundle::BASE).unwrap_or_else(|(entry, msg)| {
        cx.fail("replay", entry, msg);
        Vec::new()
    });
    let heads: BTreeMap<String, String> =
        manifest.chains.iter().map(|(t, s)| (t.clone(), s.first_prev_hash.clone())).collect();
    let base_map: BTreeMap<JobId, Job> = base.into_iter().map(|j| (j.id, j)).collect();
    let mut verifier = ChainVerifier::resume(heads, base_map, manifest.from_seq.saturating_sub(1));
    let mut chain_ok = true;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut firsts: BTreeMap<String, String> = BTreeMap::new();
    let mut touched: BTreeSet<JobId> = BTreeSet::new();
    let mut last: Option<(u64, Timestamp)> = None;
    if !history.is_empty() && !history.ends_with(b"\n") {
        cx.fail("chain", bundle::HISTORY, "last line is not newline-terminated");
        chain_ok = false;
    }
    // Lines are read and their own hashes checked on all cores; the rest, in order, here.
    let lines = history_lines(if chain_ok { history } else { b"" });
    let mut next_index = 0u64;
    orch_core::chain::read_events(lines, orch_core::chain::readers(), |read| {
        let index = next_index;
        next_index += 1;
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                cx.fail("chain", format!("{}:{}", bundle::HISTORY, index + 1), e.to_string());
                chain_ok = false;
                return ControlFlow::Break(());
            }
        };
        let ev = &read.event;
        if manifest.tenant.is_none() && ev.seq != manifest.from_seq + index {
            cx.fail("chain", format!("event {}", ev.seq), format!("expected seq {}", manifest.from_seq + index));
            chain_ok = false;
            return ControlFlow::Break(());
        }
        if let Some(t) = &manifest.tenant {
            if &ev.tenant != t {
                cx.fail(
                    "chain",
                    format!("event {}", ev.seq),
                    format!("tenant {:?} in a bundle of tenant {t:?}", ev.tenant),
                );
            }
        }
        // Counted before the verifier uses the event up; if it refuses the event, the chain
        // failed and the counts are not looked at. A tenant's name is copied once, not for
        // every event.
        match counts.get_mut(&ev.tenant) {
            Some(n) => *n += 1,
            None => {
                counts.insert(ev.tenant.clone(), 1);
                firsts.insert(ev.tenant.clone(), ev.hash.clone());
            }
        }
        let (seq, at, job_id) = (ev.seq, ev.at, ev.job_id);
        if let Err(e) = verifier.push_read(read) {
            let (check, entry) = match &e {
                orch_core::chain::ChainError::Replay(r) => ("replay", format!("event {}", r.seq)),
                _ => ("chain", format!("event {seq}")),
            };
            cx.fail(check, entry, e.to_string());
            chain_ok = false;
            return ControlFlow::Break(());
        }
        touched.extend(job_id);
        last = Some((seq, at));
        ControlFlow::Continue(())
    });
    if chain_ok {
        // A site bundle ends exactly at to_seq; a tenant's may end earlier (later events were
        // other tenants'), never later.
        let last_seq = last.map(|(s, _)| s);
        let ends_ok = match manifest.tenant {
            None => last_seq == Some(manifest.to_seq),
            Some(_) => last_seq.is_some_and(|l| l <= manifest.to_seq),
        };
        if !ends_ok {
            cx.fail("chain", bundle::HISTORY, format!("does not end at seq {}", manifest.to_seq));
        }
        for (tenant, span) in &manifest.chains {
            if verifier.heads().get(tenant) != Some(&span.last_hash)
                || firsts.get(tenant) != Some(&span.first_hash)
                || counts.get(tenant).copied().unwrap_or(0) != span.events
            {
                cx.fail("chain", format!("tenant {tenant}"), "chain start, end or length differs from the manifest");
            }
        }
        if counts.len() != manifest.chains.len() {
            cx.fail("chain", bundle::MANIFEST, "the manifest's chains do not match the history's tenants");
        }
    }
    let failures = std::mem::take(&mut cx.failures);
    let jobs = lines_of(jobs_file, bundle::JOBS).unwrap_or_else(|(entry, msg)| {
        cx.fail("replay", entry, msg);
        Vec::new()
    });
    if chain_ok {
        let replayed = verifier.jobs().values().filter(|j| touched.contains(&j.id));
        if let Some((entry, msg)) = first_jobs_difference(replayed, &jobs) {
            cx.fail("replay", entry, msg);
        }
    }
    Chain { failures, replay_failures: cx.failures, last, jobs: jobs.len() as u64 }
}

/// Verifies a bundle.
pub fn verify(bytes: &[u8], opts: &VerifyOptions) -> Report {
    let mut cx = Ctx { checks: Vec::new(), failures: Vec::new() };
    let summary = run(bytes, opts, &mut cx);
    Report { ok: cx.failures.is_empty(), checks: cx.checks, failures: cx.failures, summary }
}

fn run(bytes: &[u8], opts: &VerifyOptions, cx: &mut Ctx) -> Option<Summary> {
    // Archive shape.
    cx.check("archive");
    let entries = match archive::read(bytes) {
        Ok(e) => e,
        Err(msg) => {
            cx.fail("archive", "bundle", msg);
            return None;
        }
    };
    for (entry, msg) in &entries.problems {
        cx.fail("archive", entry.clone(), msg.clone());
    }
    let files = &entries.files;
    let empty = Vec::new();
    let file = |n: &str| files.get(n).unwrap_or(&empty);

    // Manifest.
    cx.check("manifest");
    let manifest_bytes = file(bundle::MANIFEST);
    let manifest: Manifest = match serde_json::from_slice(manifest_bytes) {
        Ok(m) => m,
        Err(e) => {
            cx.fail("manifest", bundle::MANIFEST, format!("unreadable: {e}"));
            return None;
        }
    };
    if manifest.format != bundle::FORMAT {
        cx.fail(
            "manifest",
            bundle::MANIFEST,
            format!("format {:?}, this verifier reads {}", manifest.format, bundle::FORMAT),
        );
        return None;
    }
    if orch_core::canonical::to_vec(&manifest).ok().as_deref() != Some(manifest_bytes.as_slice()) {
        cx.fail("manifest", bundle::MANIFEST, "not in canonical form");
    }

    // Trust root chain, then signatures against the newest root's bundle role.
    cx.check("root");
    let anchor = manifest.time_anchor.at;
    // Newer roots come from the verifier's chain and from the bundle itself (Offline Kit); each
    // must be signed by its predecessor, so a carried root cannot grant what the trusted one
    // did not.
    let mut chain: BTreeMap<u64, Root> = opts.root_chain.iter().map(|r| (r.signed.version, r.clone())).collect();
    for (version, bytes) in &entries.roots {
        if *version <= opts.root.signed.version || chain.contains_key(version) {
            continue;
        }
        match serde_json::from_slice::<Root>(bytes) {
            Ok(r) if r.signed.version == *version => {
                chain.insert(*version, r);
            }
            Ok(_) => cx.fail("root", format!("roots/{version}.root.json"), "its version differs from its name"),
            Err(e) => cx.fail("root", format!("roots/{version}.root.json"), format!("unreadable: {e}")),
        }
    }
    let chain: Vec<Root> = chain.into_values().collect();
    let root = match orch_core::trust::verify_chain(&opts.root, &chain) {
        Ok(r) => r,
        Err(e) => {
            cx.fail("root", "root-chain", e.to_string());
            opts.root.clone()
        }
    };
    if let Err(e) = orch_core::trust::check_expiry(&root, anchor) {
        cx.fail("root", format!("root v{}", root.signed.version), e.to_string());
    }
    cx.check("signature");
    let mut signed_by = Vec::new();
    match serde_json::from_slice::<orch_core::dsse::Envelope>(file(bundle::MANIFEST_DSSE)) {
        Err(e) => cx.fail("signature", bundle::MANIFEST_DSSE, format!("unreadable envelope: {e}")),
        Ok(env) => {
            if env.payload_type != bundle::MANIFEST_PAYLOAD_TYPE {
                cx.fail("signature", bundle::MANIFEST_DSSE, format!("payload type {:?}", env.payload_type));
            }
            match env.payload_bytes() {
                Ok(p) if p == *manifest_bytes => {}
                Ok(_) => cx.fail("signature", bundle::MANIFEST_DSSE, "signed payload is not manifest.json"),
                Err(e) => cx.fail("signature", bundle::MANIFEST_DSSE, e.to_string()),
            }
            match orch_core::trust::verify_envelope(&env, &root, orch_core::trust::BUNDLE_ROLE) {
                Ok(keys) => signed_by = keys,
                Err(e) => cx.fail("signature", bundle::MANIFEST_DSSE, e.to_string()),
            }
        }
    }

    // The data files' digests and the history's Merkle tree are pure hashing over bytes already
    // in memory: a second thread computes them while this one checks the chain and replays it.
    // Failures are reported in the order of the checks all the same.
    let history = file(bundle::HISTORY);
    let (hashed, chain) = std::thread::scope(|s| {
        let hashing = s.spawn(|| hash_files(files, history));
        let chain = check_chain(&manifest, file(bundle::BASE), history, file(bundle::JOBS));
        (hashing.join().expect("hashing does not panic"), chain)
    });

    // Files against the manifest and SHA256SUMS.
    cx.check("files");
    for name in bundle::DATA_FILES {
        let content = file(name);
        match manifest.files.get(name) {
            None => cx.fail("files", name, "not listed in the manifest"),
            Some(e) => {
                let (got, lines) = &hashed.files[name];
                if *got != e.sha256 {
                    cx.fail("files", name, format!("sha256 {got}, manifest says {}", e.sha256));
                }
                if content.len() as u64 != e.size {
                    cx.fail("files", name, format!("size {}, manifest says {}", content.len(), e.size));
                }
                if *lines != e.lines {
                    cx.fail("files", name, format!("{lines} lines, manifest says {}", e.lines));
                }
            }
        }
    }
    if manifest.files.len() != bundle::DATA_FILES.len() {
        cx.fail("files", bundle::MANIFEST, "the manifest lists files the bundle format does not have");
    }
    let listed: Vec<_> = bundle::DATA_FILES.iter().filter_map(|n| manifest.files.get(*n).map(|e| (*n, e))).collect();
    if file(bundle::SHA256SUMS).as_slice() != bundle::sha256sums(listed).as_bytes() {
        cx.fail("files", bundle::SHA256SUMS, "does not match the manifest's digests");
    }

    cx.check("chain");
    cx.failures.extend(chain.failures);
    cx.check("merkle");
    let merkle = hashed.merkle;
    let root_hex = hex::encode(merkle.root());
    if root_hex != manifest.merkle.root || merkle.len() != manifest.merkle.leaves {
        cx.fail(
            "merkle",
            bundle::HISTORY,
            format!(
                "root {root_hex} over {} leaves, manifest says {} over {}",
                merkle.len(),
                manifest.merkle.root,
                manifest.merkle.leaves
            ),
        );
    }

    // Time anchor staleness.
    cx.check("anchor");
    if let Some((_, at)) = chain.last {
        if manifest.time_anchor.at < at {
            cx.fail(
                "anchor",
                "time_anchor",
                format!("anchor {} is before the last event ({at})", manifest.time_anchor.at),
            );
        }
    }
    if let (Some(now), Some(max)) = (opts.now, opts.max_age_ms) {
        let age = now - manifest.time_anchor.at;
        // In i128: an allowed age beyond i64::MAX ms is no limit, not a negative one.
        if i128::from(age) > i128::from(max) {
            cx.fail(
                "anchor",
                "time_anchor",
                format!(
                    "anchor {} is {} s old, more than the allowed {} s",
                    manifest.time_anchor.at,
                    age / 1000,
                    max / 1000
                ),
            );
        }
    }

    // Replay: history folded over base must give jobs.jsonl exactly, byte for byte (compared
    // by `check_chain`, whose failures of this check come here).
    cx.check("replay");
    cx.failures.extend(chain.replay_failures);

    Some(Summary {
        site_id: manifest.site_id.clone(),
        tenant: manifest.tenant.clone(),
        from_seq: manifest.from_seq,
        to_seq: manifest.to_seq,
        events: merkle.len(),
        jobs: chain.jobs,
        merkle_root: manifest.merkle.root.clone(),
        anchor: manifest.time_anchor.at,
        root_version: root.signed.version,
        signed_by,
    })
}

/// The JSON Schema of [`Report`] (the `--json` output), as committed in
/// `schemas/verify-report.schema.json`.
pub fn report_schema() -> serde_json::Value {
    let mut s = serde_json::to_value(schemars::schema_for!(Report)).expect("schemas encode");
    s["$id"] = "https://orch.invalid/schemas/verify-report.schema.json".into();
    s
}

#[cfg(test)]
mod tests {
    /// The committed report schema is current (`ORCH_UPDATE_SCHEMAS=1` rewrites it).
    #[test]
    fn committed_report_schema_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/verify-report.schema.json");
        let want = orch_core::schema::to_file_text(&super::report_schema());
        if std::env::var_os("ORCH_UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        assert!(std::fs::read_to_string(&path).unwrap_or_default() == want, "{} is stale", path.display());
    }
}
