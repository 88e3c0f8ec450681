//! The audit bundle's content model: file names, the provenance manifest, the secret-redaction
//! policy, and the "export view" of a history (redacted and re-chained) that both the exporter
//! and the verifier compute the same way.
//!
//! The archive itself (tar + zstd) is the business of `orch-bundle` (writing) and `orch-verify`
//! (reading); this module only says what goes in it.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use crate::event::{Event, EventKind};
use crate::hash::GENESIS_HASH;
use crate::job::Job;
use crate::Timestamp;

/// The bundle format this build writes and reads.
pub const FORMAT: &str = "orch-bundle/1";
/// DSSE payload type of a signed manifest.
pub const MANIFEST_PAYLOAD_TYPE: &str = "application/vnd.orch.bundle-manifest+json";

/// Job states after the last included event, of every job the included events touch.
pub const JOBS: &str = "jobs.jsonl";
/// The states of those jobs just before the first included event (empty for a bundle that starts
/// at the beginning of history): what replay starts from.
pub const BASE: &str = "base.jsonl";
/// The included events.
pub const HISTORY: &str = "history.jsonl";
/// Rate-limit decisions and bucket changes.
pub const THROTTLES: &str = "throttles.jsonl";
/// The provenance manifest (canonical JSON).
pub const MANIFEST: &str = "manifest.json";
/// The DSSE envelope over the manifest.
pub const MANIFEST_DSSE: &str = "manifest.dsse.json";
/// `sha256sum -c` checksums of every other data file.
pub const SHA256SUMS: &str = "SHA256SUMS";

/// Optional entries `roots/<N>.root.json`: newer trust roots carried to an offline site (each
/// must be signed by its predecessor; verifiers walk to them from the root they trust).
pub const ROOTS_DIR: &str = "roots/";

/// The version of a carried root from its entry name (`roots/2.root.json` → 2).
pub fn carried_root_version(name: &str) -> Option<u64> {
    let v = name.strip_prefix(ROOTS_DIR)?.strip_suffix(".root.json")?;
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Files listed in the manifest (and in `SHA256SUMS`), in archive order.
pub const DATA_FILES: [&str; 4] = [BASE, HISTORY, JOBS, THROTTLES];

/// Every entry of a bundle, in archive (byte) order.
pub const ALL_FILES: [&str; 7] = [SHA256SUMS, BASE, HISTORY, JOBS, MANIFEST, MANIFEST_DSSE, THROTTLES];

/// The provenance manifest: what the bundle holds, where it came from, and how it was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The program that wrote the bundle.
    pub producer: Producer,
    /// The site whose ledger this is.
    pub site_id: String,
    /// The tenant exported, or `None` for the whole site.
    pub tenant: Option<String>,
    /// First and last sequence numbers the bundle covers (inclusive); events of other tenants in
    /// a tenant-scoped bundle are absent from the range.
    pub from_seq: u64,
    /// See `from_seq`.
    pub to_seq: u64,
    /// Per tenant: the chain's hash before the first included event and after the last.
    pub chains: BTreeMap<String, ChainSpan>,
    /// Per data file: its digest, size and line count.
    pub files: BTreeMap<String, FileEntry>,
    /// RFC 6962 Merkle tree over the lines of `history.jsonl`.
    pub merkle: MerkleSummary,
    /// The instant the bundle vouches for.
    pub time_anchor: TimeAnchor,
    /// How secrets were removed.
    pub redaction: RedactionSummary,
    /// Compression.
    pub compression: Compression,
    /// The previous bundle of the same site and scope, for incremental chains.
    pub previous: Option<PreviousBundle>,
}

/// Who wrote a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Producer {
    /// Program name.
    pub name: String,
    /// Program version.
    pub version: String,
}

/// One tenant's chain within a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChainSpan {
    /// `prev_hash` of the tenant's first included event.
    pub first_prev_hash: String,
    /// `hash` of its first included event.
    pub first_hash: String,
    /// `hash` of its last included event.
    pub last_hash: String,
    /// Included events of the tenant.
    pub events: u64,
}

/// A file's digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// Newline-terminated lines.
    pub lines: u64,
}

/// The Merkle root over the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MerkleSummary {
    /// Hash algorithm: `rfc6962-sha256`.
    pub algorithm: String,
    /// Leaves (events).
    pub leaves: u64,
    /// Lowercase hex root.
    pub root: String,
}

/// The instant a bundle vouches for, against which staleness and key expiry are judged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeAnchor {
    /// The instant.
    pub at: Timestamp,
    /// `last-event` (the time of the last included event) or `operator` (given at export).
    pub source: String,
}

/// The compression used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// `zstd`.
    pub algorithm: String,
    /// The level.
    pub level: i32,
    /// The zstd library version that wrote it.
    pub library_version: String,
}

/// A link to the bundle this one continues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviousBundle {
    /// SHA-256 of the previous bundle's `manifest.json`.
    pub manifest_sha256: String,
    /// Its `to_seq`.
    pub to_seq: u64,
}

/// What the redaction policy was and what it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedactionSummary {
    /// The policy.
    pub policy: RedactionPolicy,
    /// SHA-256 of the redaction key (so two bundles can be seen to share one), or `none`.
    pub key_id: String,
    /// Values replaced in the bundle's history.
    pub redacted_values: u64,
}

/// Which payload values are secrets. A value is redacted when its key matches one of `fields`
/// (case-insensitive, anywhere in the payload) or, for strings, when it starts with one of
/// `value_prefixes`. A redacted value becomes `"redacted:hmac-sha256:<hex>"`, keyed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedactionPolicy {
    /// Object keys whose values are secrets.
    pub fields: Vec<String>,
    /// String prefixes that mark a value as a secret wherever it appears.
    pub value_prefixes: Vec<String>,
}

impl Default for RedactionPolicy {
    fn default() -> Self {
        RedactionPolicy {
            fields: ["api_key", "apikey", "authorization", "password", "passwd", "private_key", "secret", "token"]
                .map(String::from)
                .to_vec(),
            value_prefixes: ["Bearer ", "Basic ", "eyJ", "ghp_", "glpat-", "xoxb-", "AKIA", "-----BEGIN"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// A redaction policy with its key.
#[derive(Clone)]
pub struct Redactor {
    policy: RedactionPolicy,
    key: Vec<u8>,
    count: u64,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor").field("policy", &self.policy).field("key", &"<hidden>").finish()
    }
}

impl Redactor {
    /// A redactor with a key (empty: unkeyed, which only hides values that cannot be guessed).
    pub fn new(policy: RedactionPolicy, key: Vec<u8>) -> Self {
        Redactor { policy, key, count: 0 }
    }

    /// The summary for the manifest.
    pub fn summary(&self) -> RedactionSummary {
        RedactionSummary {
            policy: self.policy.clone(),
            key_id: if self.key.is_empty() { "none".into() } else { crate::hash::sha256_hex(&self.key) },
            redacted_values: self.count,
        }
    }

    fn mask(&mut self, v: &Value) -> Value {
        self.count += 1;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&crate::canonical::value_to_vec(v));
        Value::String(format!("redacted:hmac-sha256:{}", hex::encode(mac.finalize().into_bytes())))
    }

    fn is_secret_field(&self, k: &str) -> bool {
        self.policy.fields.iter().any(|f| f.eq_ignore_ascii_case(k))
    }

    fn is_secret_value(&self, s: &str) -> bool {
        self.policy.value_prefixes.iter().any(|p| s.starts_with(p.as_str()))
    }

    /// Redacts secrets in a payload; returns the new value.
    pub fn redact_value(&mut self, v: &Value) -> Value {
        match v {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, item)| {
                        let item = if self.is_secret_field(k) && !is_masked(item) {
                            self.mask(item)
                        } else {
                            self.redact_value(item)
                        };
                        (k.clone(), item)
                    })
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|i| self.redact_value(i)).collect()),
            Value::String(s) if self.is_secret_value(s) => self.mask(v),
            other => other.clone(),
        }
    }

    /// Redacts the payloads an event carries (the job spec of `job.enqueued`, progress, audit
    /// details); returns whether it changed any. A changed event is left unsealed: re-chain it
    /// with [`Rechainer`].
    pub fn redact_event(&mut self, ev: &mut Event) -> bool {
        let before = self.count;
        match &mut ev.event {
            EventKind::Enqueued(spec) => spec.payload = self.redact_value(&spec.payload),
            EventKind::Heartbeat { progress: Some(p), .. } => *p = self.redact_value(p),
            EventKind::Audit { details, .. } => *details = self.redact_value(details),
            _ => {}
        }
        // A value changes only where it is masked, and each mask is counted.
        self.count != before
    }

    /// Redacts a job's payload and progress the same way its events were.
    pub fn redact_job(&mut self, job: &mut Job) {
        let before = self.count;
        job.spec.payload = self.redact_value(&job.spec.payload);
        if let Some(p) = &job.progress {
            job.progress = Some(self.redact_value(p));
        }
        // Jobs repeat what events already counted.
        self.count = before;
    }
}

fn is_masked(v: &Value) -> bool {
    matches!(v, Value::String(s) if s.starts_with("redacted:"))
}

/// Re-computes hashes and links of (possibly redacted) events in order, per tenant. With nothing
/// redacted it reproduces the ledger's hashes exactly.
#[derive(Clone, Debug, Default)]
pub struct Rechainer {
    heads: BTreeMap<String, String>,
}

impl Rechainer {
    /// A rechainer at the start of history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Links and seals the next event.
    pub fn push(&mut self, ev: &mut Event) {
        ev.prev_hash = self.heads.get(&ev.tenant).cloned().unwrap_or_else(|| GENESIS_HASH.to_string());
        ev.hash = ev.compute_hash();
        self.heads.insert(ev.tenant.clone(), ev.hash.clone());
    }

    /// Takes an event whose hash is known to match its content as it is, if it is already
    /// linked to its tenant's head (nothing before it in its chain was changed): its hash
    /// becomes the head and `true` is returned. Otherwise nothing changes: seal it with
    /// [`push`](Self::push).
    pub fn keep(&mut self, ev: &Event) -> bool {
        match self.heads.get_mut(&ev.tenant) {
            Some(head) if *head == ev.prev_hash => ev.hash.clone_into(head),
            None if ev.prev_hash == GENESIS_HASH => {
                self.heads.insert(ev.tenant.clone(), ev.hash.clone());
            }
            _ => return false,
        }
        true
    }

    /// Each tenant's current head.
    pub fn heads(&self) -> &BTreeMap<String, String> {
        &self.heads
    }
}

/// The `SHA256SUMS` text for files in the given order: `<hex>  <name>\n` per file.
pub fn sha256sums<'a>(entries: impl IntoIterator<Item = (&'a str, &'a FileEntry)>) -> String {
    entries.into_iter().map(|(name, e)| format!("{}  {}\n", e.sha256, name)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::GENESIS_HASH;
    use serde_json::json;

    #[test]
    fn redacts_named_fields_and_token_looking_values_with_a_keyed_hash() {
        let mut r = Redactor::new(RedactionPolicy::default(), b"k".to_vec());
        let v = json!({"url": "https://x.test", "Password": "hunter2", "headers": ["Bearer abc", "ok"], "n": 3});
        let out = r.redact_value(&v);
        assert_eq!(out["url"], "https://x.test");
        assert_eq!(out["n"], 3);
        assert_eq!(out["headers"][1], "ok");
        for s in [&out["Password"], &out["headers"][0]] {
            assert!(s.as_str().unwrap().starts_with("redacted:hmac-sha256:"), "{s}");
        }
        assert_eq!(r.summary().redacted_values, 2);
        // Deterministic for a key, different across keys.
        let again = Redactor::new(RedactionPolicy::default(), b"k".to_vec()).redact_value(&v);
        assert_eq!(again, out);
        let other = Redactor::new(RedactionPolicy::default(), b"other".to_vec()).redact_value(&v);
        assert_ne!(other["Password"], out["Password"]);
    }

    /// Keeping the events that redaction leaves alone and sealing the others again gives the
    /// chains that sealing every event again gives, whichever events carry secrets: the first
    /// of a chain, one in the middle, none.
    #[test]
    fn keeping_unchanged_events_rechains_as_sealing_every_one_does() {
        let event = |seq: u64, tenant: &str, prev: &str, payload: Value| {
            let spec = crate::JobSpec::for_test(payload);
            let draft = crate::EventDraft {
                at: crate::Timestamp::from_millis(seq as i64),
                tenant: tenant.into(),
                project: "p".into(),
                job_id: Some(seq as i64),
                actor: "a".into(),
                correlation_id: "c".into(),
                kind: EventKind::Enqueued(spec),
            };
            draft.seal(seq, prev)
        };
        for secret_at in [None, Some(1), Some(3)] {
            let mut heads: BTreeMap<String, String> = BTreeMap::new();
            let history: Vec<Event> = (1..=6u64)
                .map(|seq| {
                    let tenant = if seq % 2 == 0 { "globex" } else { "acme" };
                    let payload = if Some(seq) == secret_at { json!({"password": "x"}) } else { json!({"n": seq}) };
                    let prev = heads.get(tenant).cloned().unwrap_or_else(|| GENESIS_HASH.to_string());
                    let ev = event(seq, tenant, &prev, payload);
                    heads.insert(tenant.into(), ev.hash.clone());
                    ev
                })
                .collect();
            let (mut sealed, mut kept) = (Rechainer::new(), Rechainer::new());
            let (mut r1, mut r2) =
                (Redactor::new(Default::default(), Vec::new()), Redactor::new(Default::default(), Vec::new()));
            for ev in &history {
                let (mut a, mut b) = (ev.clone(), ev.clone());
                r1.redact_event(&mut a);
                sealed.push(&mut a);
                let changed = r2.redact_event(&mut b);
                assert_eq!(changed, Some(ev.seq) == secret_at, "event {}", ev.seq);
                let keeps = !changed && kept.keep(&b);
                if !keeps {
                    kept.push(&mut b);
                }
                // Only acme's events after its secret are sealed again, and the secret's own.
                let acme_after_secret = ev.tenant == "acme" && secret_at.is_some_and(|s| ev.seq >= s);
                assert_eq!(keeps, !acme_after_secret, "event {}, secret at {secret_at:?}", ev.seq);
                assert_eq!(a, b, "event {}", ev.seq);
                assert!(b.hash_is_valid(), "event {}", ev.seq);
            }
            assert_eq!(sealed.heads(), kept.heads());
        }
    }
}
