//! Structure fuzzing of the bundle reader: well-formed `tar.zst` archives made from a genuine
//! export with entries added, dropped, repeated, renamed (`../`, absolute, NUL-cut, long and
//! `roots/…` names), retyped (directories, links, FIFOs), with JSON lines inserted, dropped,
//! repeated, swapped or rewritten, with the manifest's range, tenant, chains or anchor changed,
//! or carrying a forged newer root; then the manifest is left alone, re-signed by a key the root
//! does not trust, or brought up to date and re-signed by the trusted key, so that only the
//! chain and replay checks can notice. `orch_verify::verify` must never panic, and passes only
//! an archive that holds the genuine export: byte for byte, or (re-signed by the trusted key,
//! which vouches for any bytes) the same history, base and jobs and the same sequence range,
//! tenant and chains. That promise is `orch_e2e::oracle::bundle::check_verdict`, which the fuzz
//! targets `bundle_verify` and `bundle_mutate` hold the verifier to as well.

use orch_core::bundle::{self, Manifest};
use orch_e2e::ledger::{bundle, key, root, workload};
use orch_e2e::oracle::bundle::{check_verdict, tar_header as header, Genuine};
use orch_store::Scope;
use orch_verify::{verify, VerifyOptions};
use proptest::prelude::*;
use serde_json::{json, Value};

/// A position in a list whose length is known only when it is used (proptest's `Index` cannot be
/// made from a number, which the fixed cases below need).
#[derive(Debug, Clone, Copy)]
struct At(usize);

impl At {
    fn of(self, len: usize) -> usize {
        self.0 % len
    }
}

fn at() -> impl Strategy<Value = At> {
    any::<usize>().prop_map(At)
}

fn opts() -> VerifyOptions {
    VerifyOptions {
        root: root("2036-01-01T00:00:00Z", &[&key(2)], 1),
        root_chain: Vec::new(),
        now: None,
        max_age_ms: None,
    }
}

/// How an entry is written into the archive.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Fifo,
    /// A regular file whose name comes from a preceding PAX `path` record, the ustar name
    /// being a decoy.
    PaxNamed,
}

#[derive(Debug, Clone)]
struct Entry {
    name: Vec<u8>,
    kind: Kind,
    content: Vec<u8>,
}

impl Entry {
    /// The name a tar reader sees: ustar name fields end at the first NUL.
    fn effective_name(&self) -> &[u8] {
        match self.kind {
            Kind::PaxNamed => &self.name,
            _ if self.name.len() > 100 => &self.name,
            _ => self.name.split(|&b| b == 0).next().unwrap_or_default(),
        }
    }
}

/// The genuine export: the test workload, signed by key 2.
fn genuine() -> &'static Genuine {
    static G: std::sync::OnceLock<Genuine> = std::sync::OnceLock::new();
    G.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        workload(&db);
        Genuine::new(bundle(&db, &[key(2)], Scope::All, 1, None), &opts(), &key(2))
    })
}

// ---- What the fuzzer does to a genuine export ------------------------------------------------

/// A name an entry may get.
fn name() -> impl Strategy<Value = Vec<u8>> {
    let pool: Vec<Vec<u8>> = [
        "../evil",
        "/etc/passwd",
        "./jobs.jsonl",
        "jobs.jsonl/",
        "roots/../jobs.jsonl",
        "notes.txt",
        "JOBS.JSONL",
        "history.jsonl\0.bak",
        "roots/1.root.json",
        "roots/2.root.json",
        "roots/02.root.json",
        "roots/.root.json",
        "roots/18446744073709551616.root.json",
        "\u{ff}.jsonl",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([vec![0xff, b'x'], format!("{}/../jobs.jsonl", "d".repeat(120)).into_bytes()])
    .chain(bundle::ALL_FILES.iter().map(|n| n.as_bytes().to_vec()))
    .collect();
    prop_oneof![4 => prop::sample::select(pool), 1 => "[a-z./]{0,12}".prop_map(String::into_bytes)]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(vec![Kind::Dir, Kind::Symlink, Kind::HardLink, Kind::Fifo, Kind::PaxNamed, Kind::File])
}

/// A JSON value to put in a field or on a line.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(vec![json!(0), json!(1), json!(2), json!(-1), json!(u64::MAX), json!(1.5)]),
        any::<i64>().prop_map(|n| json!(n)),
        prop::sample::select(vec![
            json!(""),
            json!("acme"),
            json!("globex"),
            json!("0".repeat(64)),
            json!("2026-11-01T00:00:00.000Z"),
            json!("job.acked"),
            json!("succeeded"),
        ]),
        "[a-z0-9._:-]{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A line to insert or to replace one with.
#[derive(Debug, Clone)]
enum Line {
    /// A copy of a line of some genuine file.
    CopyOf(At, At),
    Json(Value),
    Raw(Vec<u8>),
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        3 => (at(), at()).prop_map(|(f, l)| Line::CopyOf(f, l)),
        2 => value().prop_map(Line::Json),
        1 => prop::collection::vec(any::<u8>(), 0..24).prop_map(Line::Raw),
    ]
}

#[derive(Debug, Clone)]
enum LineEdit {
    Insert(At, Line),
    Replace(At, Line),
    Remove(At),
    Repeat(At),
    Swap(At, At),
    /// Sets (or with `None` removes) a member of the line's object, one level down if the
    /// second index picks an object member.
    SetField(At, At, Option<At>, Option<Value>),
    /// The same JSON, pretty-printed onto one line with spaces: equal content, other bytes.
    Reformat(At),
    DropLastNewline,
    CrLf,
}

fn line_edit() -> impl Strategy<Value = LineEdit> {
    let ix = at;
    prop_oneof![
        2 => (ix(), line()).prop_map(|(i, l)| LineEdit::Insert(i, l)),
        2 => (ix(), line()).prop_map(|(i, l)| LineEdit::Replace(i, l)),
        2 => ix().prop_map(LineEdit::Remove),
        1 => ix().prop_map(LineEdit::Repeat),
        1 => (ix(), ix()).prop_map(|(a, b)| LineEdit::Swap(a, b)),
        4 => (ix(), ix(), prop::option::of(ix()), prop::option::weighted(0.85, value()))
            .prop_map(|(l, k, inner, v)| LineEdit::SetField(l, k, inner, v)),
        1 => ix().prop_map(LineEdit::Reformat),
        1 => Just(LineEdit::DropLastNewline),
        1 => Just(LineEdit::CrLf),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Add(Vec<u8>, Kind, Line),
    Remove(At),
    Repeat(At),
    Rename(At, Vec<u8>),
    Retype(At, Kind),
    Swap(At, At),
    /// Edits the lines of the (first) entry of that name: a JSON lines file or a one-line JSON
    /// document.
    Lines(&'static str, LineEdit),
    /// Changes what the manifest says about the ledger.
    Manifest(ManifestEdit),
    /// Carries `roots/2.root.json` making key 3 (the untrusted signer) the bundle key, signed
    /// by key 3 alone instead of by root 1's root key.
    CarryForgedRoot,
}

/// A change to the manifest's account of the history that stays well-typed, so that with the
/// trusted signature only the chain checks can refuse it.
#[derive(Debug, Clone)]
enum ManifestEdit {
    FromSeq(i64),
    ToSeq(i64),
    Tenant(Option<&'static str>),
    /// Adds to one tenant's event count.
    ChainEvents(At, i64),
    /// Sets one of a tenant's three hashes to another hash of the manifest.
    ChainHash(At, At, At),
    DropChain(At),
    /// Moves the time anchor back by so many seconds.
    AnchorBack(u32),
}

fn manifest_edit() -> impl Strategy<Value = ManifestEdit> {
    let delta = prop_oneof![-2i64..=2, Just(i64::MIN), Just(i64::MAX)];
    prop_oneof![
        delta.clone().prop_map(ManifestEdit::FromSeq),
        delta.clone().prop_map(ManifestEdit::ToSeq),
        prop::option::of(prop::sample::select(vec!["acme", "globex", "initech"])).prop_map(ManifestEdit::Tenant),
        (at(), delta).prop_map(|(t, d)| ManifestEdit::ChainEvents(t, d)),
        (at(), at(), at()).prop_map(|(t, f, h)| ManifestEdit::ChainHash(t, f, h)),
        at().prop_map(ManifestEdit::DropChain),
        (0u32..100_000).prop_map(ManifestEdit::AnchorBack),
    ]
}

fn edit_manifest(content: &mut Vec<u8>, edit: &ManifestEdit) {
    // Only a manifest that still reads as one: the edits keep it well-typed.
    if serde_json::from_slice::<Manifest>(content).is_err() {
        return;
    }
    let mut m: Value = serde_json::from_slice(content).unwrap();
    let add = |v: &Value, d: i64| json!(v.as_u64().map_or(d, |n| (n as i64).saturating_add(d)));
    let tenants: Vec<String> = m["chains"].as_object().map_or(Vec::new(), |c| c.keys().cloned().collect());
    let tenant = |t: &At| (!tenants.is_empty()).then(|| tenants[t.of(tenants.len())].clone());
    match edit {
        ManifestEdit::FromSeq(d) => m["from_seq"] = add(&m["from_seq"], *d),
        ManifestEdit::ToSeq(d) => m["to_seq"] = add(&m["to_seq"], *d),
        ManifestEdit::Tenant(t) => m["tenant"] = json!(t),
        ManifestEdit::ChainEvents(t, d) => {
            if let Some(t) = tenant(t) {
                m["chains"][&t]["events"] = add(&m["chains"][&t]["events"], *d);
            }
        }
        ManifestEdit::ChainHash(t, field, from) => {
            const FIELDS: [&str; 3] = ["first_prev_hash", "first_hash", "last_hash"];
            if let Some(t) = tenant(t) {
                let hashes: Vec<Value> =
                    tenants.iter().flat_map(|t| FIELDS.map(|f| m["chains"][t][f].clone())).collect();
                m["chains"][&t][FIELDS[field.of(3)]] = hashes[from.of(hashes.len())].clone();
            }
        }
        ManifestEdit::DropChain(t) => {
            if let Some(t) = tenant(t) {
                m["chains"].as_object_mut().unwrap().remove(&t);
            }
        }
        ManifestEdit::AnchorBack(secs) => {
            if let Some(at) = m["time_anchor"]["at"].as_str().and_then(|a| orch_core::Timestamp::parse(a).ok()) {
                m["time_anchor"]["at"] = json!(at.plus_millis(-1000 * i64::from(*secs)).to_string());
            }
        }
    }
    *content = orch_core::canonical::value_to_vec(&m);
}

fn op() -> impl Strategy<Value = Op> {
    let ix = at;
    prop_oneof![
        2 => (name(), kind(), line()).prop_map(|(n, k, l)| Op::Add(n, k, l)),
        1 => ix().prop_map(Op::Remove),
        1 => ix().prop_map(Op::Repeat),
        1 => (ix(), name()).prop_map(|(i, n)| Op::Rename(i, n)),
        1 => (ix(), kind()).prop_map(|(i, k)| Op::Retype(i, k)),
        1 => (ix(), ix()).prop_map(|(a, b)| Op::Swap(a, b)),
        8 => (lines_target(), line_edit()).prop_map(|(n, e)| Op::Lines(n, e)),
        2 => manifest_edit().prop_map(Op::Manifest),
        1 => Just(Op::CarryForgedRoot),
    ]
}

/// Which entry to edit lines of: mostly the ledger files, which re-signing cannot cover for.
fn lines_target() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        4 => Just(bundle::HISTORY),
        3 => Just(bundle::JOBS),
        1 => Just(bundle::BASE),
        1 => Just(bundle::THROTTLES),
        1 => Just(bundle::MANIFEST),
        1 => Just(bundle::MANIFEST_DSSE),
        1 => Just(bundle::SHA256SUMS),
    ]
}

/// What happens to the manifest after the edits.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seal {
    /// Left as exported.
    AsIs,
    /// Brought up to date and signed by key 3, which the root does not trust.
    Untrusted,
    /// Brought up to date and signed by key 2, the root's bundle key.
    Trusted,
}

#[derive(Debug, Clone)]
struct Case {
    ops: Vec<Op>,
    seal: Seal,
}

fn case() -> impl Strategy<Value = Case> {
    // Half the cases only edit lines and the manifest, so that a shape problem does not hide what
    // a deeper check would say.
    let lines_only = prop_oneof![
        4 => (lines_target(), line_edit()).prop_map(|(n, e)| Op::Lines(n, e)),
        1 => manifest_edit().prop_map(Op::Manifest),
    ];
    (
        prop_oneof![prop::collection::vec(op(), 1..5), prop::collection::vec(lines_only, 1..4)],
        prop_oneof![1 => Just(Seal::AsIs), 1 => Just(Seal::Untrusted), 3 => Just(Seal::Trusted)],
    )
        .prop_map(|(ops, seal)| Case { ops, seal })
}

fn resolve(line: &Line) -> Vec<u8> {
    match line {
        Line::CopyOf(f, l) => {
            let g = &genuine().entries;
            let lines: Vec<&[u8]> = g[f.of(g.len())].1.split(|&b| b == b'\n').collect();
            lines[l.of(lines.len())].to_vec()
        }
        Line::Json(v) => orch_core::canonical::value_to_vec(v),
        Line::Raw(b) => b.clone(),
    }
}

/// Applies a line edit; the content is treated as `\n`-separated lines.
fn edit_lines(content: &mut Vec<u8>, edit: &LineEdit) {
    let ends_with_newline = content.ends_with(b"\n");
    let body = if ends_with_newline { &content[..content.len() - 1] } else { &content[..] };
    let mut lines: Vec<Vec<u8>> =
        if body.is_empty() { Vec::new() } else { body.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect() };
    let pick = |i: &At, n: usize| (n > 0).then(|| i.of(n));
    let mut newline = ends_with_newline || lines.is_empty();
    match edit {
        LineEdit::Insert(i, l) => lines.insert(i.of(lines.len() + 1), resolve(l)),
        LineEdit::Replace(i, l) => match pick(i, lines.len()) {
            Some(i) => lines[i] = resolve(l),
            None => lines.push(resolve(l)),
        },
        LineEdit::Remove(i) => {
            if let Some(i) = pick(i, lines.len()) {
                lines.remove(i);
            }
        }
        LineEdit::Repeat(i) => {
            if let Some(i) = pick(i, lines.len()) {
                lines.insert(i, lines[i].clone());
            }
        }
        LineEdit::Swap(a, b) => {
            if let (Some(a), Some(b)) = (pick(a, lines.len()), pick(b, lines.len())) {
                lines.swap(a, b);
            }
        }
        LineEdit::SetField(l, k, inner, v) => {
            let Some(l) = pick(l, lines.len()) else { return };
            let Ok(mut doc) = serde_json::from_slice::<Value>(&lines[l]) else { return };
            set_field(&mut doc, *k, *inner, v.clone());
            lines[l] = orch_core::canonical::value_to_vec(&doc);
        }
        LineEdit::Reformat(l) => {
            let Some(l) = pick(l, lines.len()) else { return };
            let Ok(doc) = serde_json::from_slice::<Value>(&lines[l]) else { return };
            lines[l] = serde_json::to_string_pretty(&doc).unwrap().replace('\n', " ").into_bytes();
        }
        LineEdit::DropLastNewline => newline = false,
        LineEdit::CrLf => {
            for l in &mut lines {
                l.push(b'\r');
            }
        }
    }
    *content = lines.join(&b'\n');
    if newline && !content.is_empty() {
        content.push(b'\n');
    }
}

fn set_field(doc: &mut Value, k: At, inner: Option<At>, v: Option<Value>) {
    let Some(obj) = doc.as_object_mut().filter(|o| !o.is_empty()) else { return };
    let key = obj.keys().nth(k.of(obj.len())).unwrap().clone();
    match (inner, obj.get_mut(&key).and_then(Value::as_object_mut).filter(|o| !o.is_empty())) {
        (Some(i), Some(nested)) => {
            let nested_key = nested.keys().nth(i.of(nested.len())).unwrap().clone();
            match v {
                Some(v) => nested.insert(nested_key, v),
                None => nested.remove(&nested_key),
            };
        }
        _ => {
            match v {
                Some(v) => obj.insert(key, v),
                None => obj.remove(&key),
            };
        }
    }
}

fn apply(ops: &[Op]) -> Vec<Entry> {
    // In archive order, as exported.
    let mut entries: Vec<Entry> = genuine()
        .entries
        .iter()
        .map(|(n, c)| Entry { name: n.as_bytes().to_vec(), kind: Kind::File, content: c.clone() })
        .collect();
    for op in ops {
        let n = entries.len();
        let pick = |i: &At| (n > 0).then(|| i.of(n));
        match op {
            Op::Add(name, kind, content) => {
                let content =
                    if *kind == Kind::File || *kind == Kind::PaxNamed { resolve(content) } else { Vec::new() };
                entries.push(Entry { name: name.clone(), kind: *kind, content });
            }
            Op::Remove(i) => {
                if let Some(i) = pick(i) {
                    entries.remove(i);
                }
            }
            Op::Repeat(i) => {
                if let Some(i) = pick(i) {
                    entries.insert(i, entries[i].clone());
                }
            }
            Op::Rename(i, name) => {
                if let Some(i) = pick(i) {
                    entries[i].name = name.clone();
                }
            }
            Op::Retype(i, kind) => {
                if let Some(i) = pick(i) {
                    entries[i].kind = *kind;
                }
            }
            Op::Swap(a, b) => {
                if let (Some(a), Some(b)) = (pick(a), pick(b)) {
                    entries.swap(a, b);
                }
            }
            Op::Lines(name, edit) => {
                if let Some(e) = entries.iter_mut().find(|e| e.effective_name() == name.as_bytes()) {
                    edit_lines(&mut e.content, edit);
                }
            }
            Op::CarryForgedRoot => {
                let signer = [key(3).public()];
                let forged = orch_core::trust::RootSigned::new(2, "2036-01-01T00:00:00Z", (&signer, 1), (&signer, 1));
                let content = orch_bundle::keys::root_file(&orch_core::trust::Root::sign(forged, &[key(3)]));
                entries.push(Entry { name: b"roots/2.root.json".to_vec(), kind: Kind::File, content });
            }
            Op::Manifest(edit) => {
                if let Some(e) = entries.iter_mut().find(|e| e.effective_name() == bundle::MANIFEST.as_bytes()) {
                    edit_manifest(&mut e.content, edit);
                }
            }
        }
    }
    entries
}

/// Brings the manifest up to date with the (last copy of each) data file, the way an exporter
/// would, and signs it with `signer` (`orch_e2e::oracle::bundle::reseal`).
fn reseal(entries: &mut [Entry], signer: u8) {
    let entries = entries.iter_mut().map(|e| (e.effective_name().to_vec(), &mut e.content));
    orch_e2e::oracle::bundle::reseal(entries, &key(signer));
}

/// Writes the entries as a ustar archive (GNU long names and PAX records where asked) in a
/// zstd frame; unlike `orch_bundle`'s writer it takes any name.
fn pack(entries: &[Entry]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut name = e.name.as_slice();
        if e.kind == Kind::PaxNamed {
            let record = |len: usize| format!("{len} path=").into_bytes();
            let base = record(0).len() - 1 + name.len() + 1;
            let mut len = base;
            while record(len).len() - 1 + name.len() + 1 != len {
                len = record(len).len() - 1 + name.len() + 1;
            }
            let mut pax = record(len);
            pax.extend_from_slice(name);
            pax.push(b'\n');
            tar.append(&header(b"PaxHeaders/decoy", tar::EntryType::XHeader, pax.len()), pax.as_slice()).unwrap();
            name = b"decoy";
        } else if name.len() > 100 {
            let mut long = name.to_vec();
            long.push(0);
            tar.append(&header(b"././@LongLink", tar::EntryType::GNULongName, long.len()), long.as_slice()).unwrap();
        }
        let (kind, content): (_, &[u8]) = match e.kind {
            Kind::File | Kind::PaxNamed => (tar::EntryType::Regular, &e.content),
            Kind::Dir => (tar::EntryType::Directory, &[]),
            Kind::Symlink => (tar::EntryType::Symlink, &[]),
            Kind::HardLink => (tar::EntryType::Link, &[]),
            Kind::Fifo => (tar::EntryType::Fifo, &[]),
        };
        let mut h = header(name, kind, content.len());
        if matches!(e.kind, Kind::Symlink | Kind::HardLink) {
            h.set_link_name(bundle::JOBS).unwrap();
            h.set_cksum();
        }
        tar.append(&h, content).unwrap();
    }
    zstd::encode_all(tar.into_inner().unwrap().as_slice(), 3).unwrap()
}

fn build(case: &Case) -> Vec<u8> {
    let mut entries = apply(&case.ops);
    match case.seal {
        Seal::AsIs => {}
        Seal::Untrusted => reseal(&mut entries, 3),
        Seal::Trusted => reseal(&mut entries, 2),
    }
    pack(&entries)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fuzzed_archives_never_panic_the_verifier_and_pass_only_the_genuine_export(c in case()) {
        let bytes = build(&c);
        let report = verify(&bytes, &opts());
        check_verdict(genuine(), &bytes, &report, c.seal == Seal::Trusted).map_err(TestCaseError::fail)?;
    }
}

/// The fuzzer can tell a pass from a refusal: untouched, each seal passes, and a structurally
/// valid edit that the checks must catch is refused (by the check that should catch it).
#[test]
fn the_fuzzer_itself_sees_passes_and_refusals() {
    for seal in [Seal::AsIs, Seal::Untrusted, Seal::Trusted] {
        let bytes = build(&Case { ops: Vec::new(), seal });
        let report = verify(&bytes, &opts());
        assert_eq!(report.ok, seal != Seal::Untrusted, "{seal:?}: {:?}", report.failures);
        check_verdict(genuine(), &bytes, &report, seal == Seal::Trusted).unwrap();
    }
    // Job 2's attempt, re-signed: only replay can notice.
    let line = genuine().files[bundle::JOBS].split(|&b| b == b'\n').nth(1).unwrap();
    let job: serde_json::Map<String, Value> = serde_json::from_slice(line).unwrap();
    let attempt = At(job.keys().position(|k| k == "attempt").unwrap());
    let edit = LineEdit::SetField(At(1), attempt, None, Some(json!(7)));
    let bytes = build(&Case { ops: vec![Op::Lines(bundle::JOBS, edit)], seal: Seal::Trusted });
    let report = verify(&bytes, &opts());
    assert!(report.failures.iter().any(|f| f.check == "replay" && f.entry == "job 2"), "{:?}", report.failures);
}

/// Found by the fuzzer: a blank line in `history.jsonl`, signed by the trusted key, once passed
/// (blank lines were skipped) although `orchd import` refuses such a bundle.
#[test]
fn a_blank_history_line_is_refused_even_when_signed() {
    let blank = Op::Lines(bundle::HISTORY, LineEdit::Insert(At(0), Line::Raw(Vec::new())));
    let bytes = build(&Case { ops: vec![blank], seal: Seal::Trusted });
    let report = verify(&bytes, &opts());
    assert!(report.failures.iter().any(|f| f.check == "chain" && f.entry == "history.jsonl:1"), "{:?}", report);
}

/// Found by the `bundle_mutate` fuzz target: a bit flipped in the signature's `keyid` passed, and
/// the oracle called it another envelope. The verdict was right: a `keyid` is a hint, and a
/// signature that counts for no key of the role is ignored (`orch_core::trust`); the envelope is
/// not itself signed. The oracle now excuses exactly those two things, and nothing else.
#[test]
fn an_envelope_is_free_in_its_hints_only() {
    type EnvelopeEdit<'a> = (&'a str, &'a dyn Fn(&mut Value));
    let with_envelope = |edit: &dyn Fn(&mut Value)| {
        let mut entries = apply(&[]);
        let env = entries.iter_mut().find(|e| e.name == bundle::MANIFEST_DSSE.as_bytes()).unwrap();
        let mut v: Value = serde_json::from_slice(&env.content).unwrap();
        edit(&mut v);
        env.content = serde_json::to_vec(&v).unwrap();
        pack(&entries)
    };
    let manifest = &genuine().files[bundle::MANIFEST];
    let outsider: Value = serde_json::from_slice(&orch_bundle::keys::sign_manifest(manifest, &[key(3)])).unwrap();
    let outsider = outsider["signatures"][0].clone();
    let free: [EnvelopeEdit<'_>; 3] = [
        ("another keyid", &|v| v["signatures"][0]["keyid"] = json!("not-a-key")),
        ("the outsider's keyid", &|v| v["signatures"][0]["keyid"] = outsider["keyid"].clone()),
        ("an outsider's signature too", &|v| v["signatures"].as_array_mut().unwrap().push(outsider.clone())),
    ];
    for (what, edit) in free {
        let bytes = with_envelope(edit);
        let report = verify(&bytes, &opts());
        assert!(report.ok, "{what}: {:?}", report.failures);
        check_verdict(genuine(), &bytes, &report, false).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let bound: [EnvelopeEdit<'_>; 3] = [
        ("another payload type", &|v| v["payloadType"] = json!("application/json")),
        ("only the outsider's signature", &|v| v["signatures"] = json!([outsider.clone()])),
        ("an unknown member", &|v| v["note"] = json!("x")),
    ];
    for (what, edit) in bound {
        let bytes = with_envelope(edit);
        let report = verify(&bytes, &opts());
        assert!(!report.ok, "{what} passed");
        check_verdict(genuine(), &bytes, &report, false).unwrap();
    }
}

/// Found while fuzzing: the reader reserved an entry's declared size up front, so a 1.5 KiB
/// archive whose header claims a 1 TiB `jobs.jsonl` aborted `orch-verify` (and an `orchd`
/// importing it) on a failed allocation. It is an unreadable archive.
#[test]
fn a_huge_declared_entry_size_is_refused_not_an_abort() {
    let mut h = tar::Header::new_gnu();
    h.set_path(bundle::JOBS).unwrap();
    h.set_size(1 << 40);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    assert_eq!(h.size().unwrap(), 1 << 40);
    let mut tar = h.as_bytes().to_vec();
    tar.resize(tar.len() + 1024, 0);
    let bytes = zstd::encode_all(tar.as_slice(), 3).unwrap();
    // Through the binary, where an abort is an exit by signal rather than this test's own end.
    let dir = tempfile::tempdir().unwrap();
    let (file, root_file) = (dir.path().join("huge.tar.zst"), dir.path().join("root.json"));
    std::fs::write(&file, &bytes).unwrap();
    std::fs::write(&root_file, orch_bundle::keys::root_file(&opts().root)).unwrap();
    let (code, out, err) =
        orch_e2e::run("orch-verify", &[file.to_str().unwrap(), "--root", root_file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("FAIL archive bundle: unreadable archive"), "{out}");
}

/// One fuzzed archive through the real binary: its `--json` report is the library's, and the exit
/// code follows it.
#[test]
fn the_binary_reports_what_the_library_does() {
    let history = genuine().entries.iter().position(|(name, _)| name == bundle::HISTORY).unwrap();
    let case = Case {
        ops: vec![Op::Repeat(At(history)), Op::Add(b"../evil".to_vec(), Kind::File, Line::Raw(b"x".to_vec()))],
        seal: Seal::Trusted,
    };
    let bytes = build(&case);
    let dir = tempfile::tempdir().unwrap();
    let (file, root_file) = (dir.path().join("b.tar.zst"), dir.path().join("root.json"));
    std::fs::write(&file, &bytes).unwrap();
    std::fs::write(&root_file, orch_bundle::keys::root_file(&opts().root)).unwrap();
    let (code, out, err) =
        orch_e2e::run("orch-verify", &[file.to_str().unwrap(), "--root", root_file.to_str().unwrap(), "--json"]);
    let report = verify(&bytes, &opts());
    assert!(!report.ok);
    assert_eq!(code, 1, "{err}");
    assert_eq!(out, format!("{}\n", serde_json::to_string(&report).unwrap()));
    assert!(out.contains("duplicate entry") && out.contains("path escapes the bundle"), "{out}");
}
