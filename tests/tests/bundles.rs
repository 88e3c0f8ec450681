//! Audit bundles end to end: export → verify, determinism, tamper detection, schemas, redaction,
//! scoped and incremental bundles, inclusion proofs, and the golden fixtures with their named bad
//! cases (driven through the real `orch-verify` binary).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use orch_core::bundle::{self, Manifest};
use orch_e2e::ledger::{bundle, key, root, workload, T0};
use orch_e2e::run;
use orch_store::Scope;
use orch_verify::{verify, VerifyOptions};
use proptest::prelude::*;

fn opts(root: orch_core::trust::Root) -> VerifyOptions {
    VerifyOptions { root, root_chain: Vec::new(), now: None, max_age_ms: None }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

struct Setup {
    _dir: tempfile::TempDir,
    db: PathBuf,
    bytes: Vec<u8>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    workload(&db);
    let bytes = bundle(&db, &[key(2)], Scope::All, 1, None);
    Setup { _dir: dir, db, bytes }
}

fn failures(bytes: &[u8]) -> Vec<String> {
    verify(bytes, &opts(root("2036-01-01T00:00:00Z", &[&key(2)], 1)))
        .failures
        .iter()
        .map(|f| format!("{} {}: {}", f.check, f.entry, f.message))
        .collect()
}

#[test]
fn export_verifies_and_is_byte_identical_across_exports() {
    let s = setup();
    assert_eq!(failures(&s.bytes), Vec::<String>::new());
    let again = bundle(&s.db, &[key(2)], Scope::All, 1, None);
    assert!(again == s.bytes, "two exports of one ledger differ");
    let report = verify(&s.bytes, &opts(root("2036-01-01T00:00:00Z", &[&key(2)], 1)));
    let summary = report.summary.unwrap();
    assert_eq!(summary.from_seq, 1);
    assert!(summary.events > 30 && summary.jobs == 9, "{summary:?}");
    assert_eq!(summary.signed_by, vec![key(2).key_id()]);
}

/// Whether a changed archive went unnoticed although what it holds changed. zstd streams have
/// some redundancy (e.g. unused bits in entropy tables): a flip there decodes to the very same
/// tar, whose signed contents are untouched, and passing verification is then right.
fn went_unnoticed(original: &[u8], changed: &[u8]) -> bool {
    let same_content = || {
        let decode = |b: &[u8]| zstd::stream::decode_all(b).ok();
        decode(changed).is_some() && decode(changed) == decode(original)
    };
    failures(changed).is_empty() && !same_content()
}

#[test]
fn every_flipped_byte_fails_verification() {
    let s = setup();
    // A sweep over the whole archive at a stride, plus random positions below.
    for pos in (0..s.bytes.len()).step_by(13) {
        let mut b = s.bytes.clone();
        b[pos] ^= 0x01;
        assert!(!went_unnoticed(&s.bytes, &b), "flipping byte {pos} of {} went unnoticed", s.bytes.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn any_single_byte_change_fails_verification(pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
        thread_local! { static S: Setup = setup(); }
        S.with(|s| {
            let mut b = s.bytes.clone();
            let i = pos.index(b.len());
            b[i] ^= mask;
            prop_assert!(!went_unnoticed(&s.bytes, &b), "byte {} ^ {:#x} went unnoticed", i, mask);
            Ok(())
        })?;
    }
}

fn unpack(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    orch_verify::archive::read(bytes).unwrap().files
}

#[test]
fn bundle_files_validate_against_the_committed_schemas() {
    let s = setup();
    let files = unpack(&s.bytes);
    let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let check = |schema: &str, docs: Vec<serde_json::Value>| {
        let schema: serde_json::Value = serde_json::from_slice(&std::fs::read(schemas.join(schema)).unwrap()).unwrap();
        let v = jsonschema::validator_for(&schema).unwrap();
        assert!(!docs.is_empty() || schema["$id"].as_str().unwrap().contains("throttles"));
        for d in docs {
            let errors: Vec<String> = v.iter_errors(&d).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{d} against {}: {errors:?}", schema["$id"]);
        }
    };
    let lines = |name: &str| -> Vec<serde_json::Value> {
        String::from_utf8(files[name].clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    check("history.schema.json", lines(bundle::HISTORY));
    check("jobs.schema.json", lines(bundle::JOBS));
    check("throttles.schema.json", lines(bundle::THROTTLES));
    check("manifest.schema.json", vec![serde_json::from_slice(&files[bundle::MANIFEST]).unwrap()]);
}

#[test]
fn secrets_are_redacted_and_the_bundle_still_verifies() {
    let s = setup();
    let files = unpack(&s.bytes);
    let history = String::from_utf8(files[bundle::HISTORY].clone()).unwrap();
    let jobs = String::from_utf8(files[bundle::JOBS].clone()).unwrap();
    for text in [&history, &jobs] {
        assert!(!text.contains("hunter2") && !text.contains("Bearer abc"), "a secret leaked");
        assert!(text.contains("redacted:hmac-sha256:"));
    }
    let m: Manifest = serde_json::from_slice(&files[bundle::MANIFEST]).unwrap();
    assert_eq!(m.redaction.redacted_values, 6, "3 secret jobs with 2 secrets each");
    assert_eq!(m.redaction.key_id, orch_core::hash::sha256_hex(b"redaction-key"));
}

#[test]
fn tenant_scoped_and_incremental_bundles_verify() {
    let s = setup();
    let acme = bundle(&s.db, &[key(2)], Scope::Tenant("acme".into()), 1, None);
    assert_eq!(failures(&acme), Vec::<String>::new());
    let files = unpack(&acme);
    assert!(!String::from_utf8_lossy(&files[bundle::HISTORY]).contains("globex"));
    assert!(!String::from_utf8_lossy(&files[bundle::JOBS]).contains("globex"));

    let head = verify(&s.bytes, &opts(root("2036-01-01T00:00:00Z", &[&key(2)], 1))).summary.unwrap().to_seq;
    let first = bundle(&s.db, &[key(2)], Scope::All, 1, Some(head / 2));
    let second = bundle(&s.db, &[key(2)], Scope::All, head / 2 + 1, None);
    assert_eq!(failures(&first), Vec::<String>::new());
    assert_eq!(failures(&second), Vec::<String>::new());
    let base = &unpack(&second)[bundle::BASE];
    assert!(!base.is_empty(), "an incremental bundle carries the base states of jobs it continues");
    // The chains join: the second bundle's first prev_hash is the first bundle's last hash.
    let m1: Manifest = serde_json::from_slice(&unpack(&first)[bundle::MANIFEST]).unwrap();
    let m2: Manifest = serde_json::from_slice(&unpack(&second)[bundle::MANIFEST]).unwrap();
    for (tenant, span) in &m2.chains {
        assert_eq!(span.first_prev_hash, m1.chains[tenant].last_hash, "tenant {tenant}");
    }
}

#[test]
fn cli_export_verify_inspect_prove() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (code, id, err) = run("orch-bundle", &["keygen", "--out", &p("keys"), "--name", "signer"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(id.trim().len(), 64);
    let mode = std::fs::metadata(dir.path().join("keys/signer.key")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
    let (code, _, err) = run("orch-bundle", &["keygen", "--out", &p("keys"), "--name", "root"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(
        "orch-bundle",
        &[
            "root",
            "init",
            "--out",
            &p("root.json"),
            "--root-key",
            &p("keys/root.pub.json"),
            "--bundle-key",
            &p("keys/signer.pub.json"),
            "--expires",
            "2036-01-01T00:00:00Z",
        ],
    );
    assert_eq!(code, 0, "{err}");
    // Unsigned, the root is refused.
    let db = s.db.to_str().unwrap();
    let (code, _, err) =
        run("orch-bundle", &["export", "--db", db, "--key", &p("keys/signer.key"), "--out", &p("a.tar.zst")]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run("orch-verify", &[&p("a.tar.zst"), "--root", &p("root.json")]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("FAIL root"), "{out}");
    let (code, _, err) = run("orch-bundle", &["root", "sign", &p("root.json"), "--key", &p("keys/root.key")]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run("orch-verify", &[&p("a.tar.zst"), "--root", &p("root.json")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: "), "{out}");
    let (code, out, _) = run("orch-verify", &[&p("a.tar.zst"), "--root", &p("root.json"), "--json"]);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(out.matches('\n').count(), 1, "one JSON document, newline-terminated");
    // Byte-identical second export through the binary.
    let (code, _, _) =
        run("orch-bundle", &["export", "--db", db, "--key", &p("keys/signer.key"), "--out", &p("b.tar.zst"), "--json"]);
    assert_eq!(code, 0);
    assert_eq!(std::fs::read(p("a.tar.zst")).unwrap(), std::fs::read(p("b.tar.zst")).unwrap());
    let (code, out, _) = run("orch-bundle", &["inspect", &p("a.tar.zst")]);
    assert_eq!(code, 0);
    assert!(out.contains("\"format\": \"orch-bundle/1\""), "{out}");
    assert!(out.starts_with("format      orch-bundle/1"), "{out}");
    assert!(out.contains("chain       acme: "), "{out}");
    // The same bytes under another time zone and umask.
    let script = format!(
        "umask 077; TZ=Pacific/Chatham {} export --db {db} --key {} --out {}",
        orch_e2e::bin("orch-bundle").display(),
        p("keys/signer.key"),
        p("tz.tar.zst")
    );
    assert!(std::process::Command::new("sh").arg("-c").arg(script).status().unwrap().success());
    assert_eq!(
        std::fs::read(p("tz.tar.zst")).unwrap(),
        std::fs::read(p("a.tar.zst")).unwrap(),
        "time zone or umask changed the bytes"
    );
    // A proof for one event, checked alone and against the signed bundle.
    let (code, proof, err) = run("orch-verify", &["prove", &p("a.tar.zst"), "--event", "7"]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(p("proof.json"), &proof).unwrap();
    let (code, out, _) =
        run("orch-verify", &["check-proof", &p("proof.json"), "--bundle", &p("a.tar.zst"), "--root", &p("root.json")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: event 7"), "{out}");
    let forged = proof.replacen("\\\"seq\\\":7", "\\\"seq\\\":8", 1).replacen("\"seq\": 7", "\"seq\": 8", 1);
    std::fs::write(p("forged.json"), forged).unwrap();
    let (code, out, _) = run("orch-verify", &["check-proof", &p("forged.json")]);
    assert_eq!(code, 1, "{out}");
    // Usage and IO errors exit 2 with one line.
    let (code, _, err) = run("orch-verify", &[&p("missing.tar.zst"), "--root", &p("root.json")]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, _) = run("orch-verify", &[&p("a.tar.zst")]);
    assert_eq!(code, 2, "--root is required");
    let (code, _, err) = run(
        "orch-bundle",
        &["export", "--db", &p("nope.db"), "--key", &p("keys/signer.key"), "--out", &p("c.tar.zst")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("no such ledger") && !dir.path().join("c.tar.zst").exists(), "{err}");
}

#[test]
fn root_rotation_through_the_cli() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    for name in ["r1", "r2", "signer"] {
        assert_eq!(run("orch-bundle", &["keygen", "--out", &p("k"), "--name", name]).0, 0);
    }
    assert_eq!(
        run(
            "orch-bundle",
            &[
                "root",
                "init",
                "--out",
                &p("1.root.json"),
                "--root-key",
                &p("k/r1.pub.json"),
                "--bundle-key",
                &p("k/signer.pub.json"),
                "--expires",
                "2036-01-01T00:00:00Z"
            ]
        )
        .0,
        0
    );
    assert_eq!(run("orch-bundle", &["root", "sign", &p("1.root.json"), "--key", &p("k/r1.key")]).0, 0);
    std::fs::create_dir(p("chain")).unwrap();
    let v2 = p("chain/2.root.json");
    assert_eq!(
        run(
            "orch-bundle",
            &["root", "rotate", "--from", &p("1.root.json"), "--out", &v2, "--root-key", &p("k/r2.pub.json")]
        )
        .0,
        0
    );
    assert_eq!(run("orch-bundle", &["root", "sign", &v2, "--key", &p("k/r2.key")]).0, 0);
    let bundle_path = p("b.tar.zst");
    assert_eq!(
        run(
            "orch-bundle",
            &["export", "--db", s.db.to_str().unwrap(), "--key", &p("k/signer.key"), "--out", &bundle_path]
        )
        .0,
        0
    );
    // Signed only by the new key: the rotation is refused.
    let (code, out, _) = run("orch-verify", &[&bundle_path, "--root", &p("1.root.json"), "--root-chain", &p("chain")]);
    assert_eq!(code, 1);
    assert!(out.contains("FAIL root root-chain"), "{out}");
    // Signed by the old key too: accepted.
    assert_eq!(run("orch-bundle", &["root", "sign", &v2, "--key", &p("k/r1.key")]).0, 0);
    let (code, out, _) = run("orch-verify", &[&bundle_path, "--root", &p("1.root.json"), "--root-chain", &p("chain")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("root v2"), "{out}");
}

// ---- Golden fixtures ----------------------------------------------------------------------

/// Re-packs a bundle after `edit` changed its files; with `resign`, the manifest is brought up to
/// date (digests, Merkle root) and signed again, so that only the deeper check can notice.
fn repack(bytes: &[u8], resign: bool, edit: impl FnOnce(&mut BTreeMap<String, Vec<u8>>)) -> Vec<u8> {
    let mut files = unpack(bytes);
    edit(&mut files);
    if resign {
        let mut m: Manifest = serde_json::from_slice(&files[bundle::MANIFEST]).unwrap();
        for name in bundle::DATA_FILES {
            let c = &files[name];
            let e = m.files.get_mut(name).unwrap();
            e.sha256 = orch_core::hash::sha256_hex(c);
            e.size = c.len() as u64;
            e.lines = c.iter().filter(|&&b| b == b'\n').count() as u64;
        }
        let leaves: Vec<_> = files[bundle::HISTORY]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(orch_core::merkle::leaf_hash)
            .collect();
        m.merkle.root = hex::encode(orch_core::merkle::root(&leaves));
        let mb = orch_core::canonical::to_vec(&m).unwrap();
        files.insert(
            bundle::SHA256SUMS.into(),
            bundle::sha256sums(bundle::DATA_FILES.iter().map(|n| (*n, &m.files[*n]))).into_bytes(),
        );
        files.insert(bundle::MANIFEST_DSSE.into(), orch_bundle::keys::sign_manifest(&mb, &[key(2)]));
        files.insert(bundle::MANIFEST.into(), mb);
    }
    pack_raw(&files)
}

/// Packs entries as given, including names `orch_bundle::archive::pack` would refuse (`..`).
fn pack_raw(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut h = tar::Header::new_ustar();
        h.as_mut_bytes()[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(T0.as_millis() as u64 / 1000);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append(&h, content.as_slice()).unwrap();
    }
    zstd::encode_all(tar.into_inner().unwrap().as_slice(), 3).unwrap()
}

fn edit_line(files: &mut BTreeMap<String, Vec<u8>>, file: &str, n: usize, f: impl FnOnce(&mut serde_json::Value)) {
    let text = String::from_utf8(files[file].clone()).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut v: serde_json::Value = serde_json::from_str(&lines[n]).unwrap();
    f(&mut v);
    lines[n] = orch_core::canonical::value_to_string(&v);
    files.insert(file.into(), format!("{}\n", lines.join("\n")).into_bytes());
}

/// Writes fixtures/ledger/golden.db, fixtures/bundles/root.json and one directory per case.
/// Run with `ORCH_UPDATE_FIXTURES=1 cargo test --workspace --test bundles -- --ignored`.
#[test]
#[ignore = "regenerates the committed golden fixtures"]
fn regenerate_golden_fixtures() {
    assert!(std::env::var_os("ORCH_UPDATE_FIXTURES").is_some(), "set ORCH_UPDATE_FIXTURES=1");
    let fx = fixture_dir();
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("golden.db");
    workload(&db);
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode = DELETE; VACUUM;").unwrap();
    drop(conn);
    std::fs::create_dir_all(fx.join("ledger")).unwrap();
    std::fs::copy(&db, fx.join("ledger/golden.db")).unwrap();
    std::fs::create_dir_all(fx.join("keys")).unwrap();
    for n in [1u8, 2, 3] {
        std::fs::write(fx.join(format!("keys/test-{n}.key")), key(n).to_text()).unwrap();
        std::fs::write(fx.join(format!("keys/test-{n}.pub.json")), orch_bundle::keys::public_key_file(&key(n)))
            .unwrap();
    }
    let valid = bundle(&db, &[key(2)], Scope::All, 1, None);
    let bundles = fx.join("bundles");
    let _ = std::fs::remove_dir_all(&bundles);
    std::fs::create_dir_all(&bundles).unwrap();
    std::fs::write(
        bundles.join("root.json"),
        orch_bundle::keys::root_file(&root("2036-01-01T00:00:00Z", &[&key(2)], 1)),
    )
    .unwrap();

    let case = |name: &str, bytes: &[u8], args: &[&str], exit: i32, message: &str, extra: &[(&str, Vec<u8>)]| {
        let d = bundles.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("bundle.tar.zst"), bytes).unwrap();
        for (n, c) in extra {
            if let Some(parent) = Path::new(n).parent() {
                std::fs::create_dir_all(d.join(parent)).unwrap();
            }
            std::fs::write(d.join(n), c).unwrap();
        }
        let expected = serde_json::json!({"args": args, "exit": exit, "stdout_contains": message});
        std::fs::write(d.join("expected.json"), serde_json::to_string_pretty(&expected).unwrap() + "\n").unwrap();
    };
    let root_file = |r: orch_core::trust::Root| orch_bundle::keys::root_file(&r);

    case("valid", &valid, &[], 0, "ok: ", &[]);
    case(
        "bad-signature",
        &repack(&valid, false, |f| {
            let mut env: serde_json::Value = serde_json::from_slice(&f[bundle::MANIFEST_DSSE]).unwrap();
            let sig = env["signatures"][0]["sig"].as_str().unwrap().to_string();
            let flipped = if sig.starts_with('A') { sig.replacen('A', "B", 1) } else { format!("A{}", &sig[1..]) };
            env["signatures"][0]["sig"] = flipped.into();
            f.insert(bundle::MANIFEST_DSSE.into(), orch_core::canonical::to_vec(&env).unwrap());
        }),
        &[],
        1,
        "FAIL signature manifest.dsse.json: role \"bundle\" of root v1 needs 1 valid signature(s), found 0",
        &[],
    );
    case(
        "below-threshold",
        &valid,
        &["--root", "root.json"],
        1,
        "needs 2 valid signature(s), found 1",
        &[("root.json", root_file(root("2036-01-01T00:00:00Z", &[&key(2), &key(3)], 2)))],
    );
    case(
        "tampered-file",
        &repack(&valid, false, |f| {
            edit_line(f, bundle::JOBS, 0, |v| v["project"] = "elsewhere".into());
        }),
        &[],
        1,
        "FAIL files jobs.jsonl: sha256",
        &[],
    );
    case(
        "missing-entry",
        &repack(&valid, false, |f| {
            f.remove(bundle::THROTTLES);
        }),
        &[],
        1,
        "FAIL archive throttles.jsonl: missing entry",
        &[],
    );
    case(
        "extra-entry",
        &repack(&valid, false, |f| {
            f.insert("notes.txt".into(), b"hello".to_vec());
        }),
        &[],
        1,
        "FAIL archive notes.txt: unexpected entry",
        &[],
    );
    case(
        "path-traversal",
        &repack(&valid, false, |f| {
            f.insert("../evil".into(), b"x".to_vec());
        }),
        &[],
        1,
        "FAIL archive ../evil: path escapes the bundle",
        &[],
    );
    case(
        "broken-hash-chain",
        &repack(&valid, true, |f| {
            edit_line(f, bundle::HISTORY, 4, |v| {
                v["prev_hash"] = "1".repeat(64).into();
                let mut body = v.clone();
                body.as_object_mut().unwrap().remove("hash");
                v["hash"] = orch_core::hash::sha256_hex(&orch_core::canonical::value_to_vec(&body)).into();
            });
        }),
        &[],
        1,
        "FAIL chain event 5: event 5: prev_hash does not link",
        &[],
    );
    case(
        "replay-mismatch",
        &repack(&valid, true, |f| {
            edit_line(f, bundle::JOBS, 1, |v| v["attempt"] = 7.into());
        }),
        &[],
        1,
        "FAIL replay job 2: replay gives",
        &[],
    );
    case(
        "expired-root",
        &valid,
        &["--root", "root.json"],
        1,
        "FAIL root root v1: root v1 expired at 2026-10-01T00:00:00Z",
        &[("root.json", root_file(root("2026-10-01T00:00:00Z", &[&key(2)], 1)))],
    );
    case(
        "stale-anchor",
        &valid,
        &["--now", "2027-06-01T00:00:00Z", "--max-age", "30d"],
        1,
        "FAIL anchor time_anchor: anchor 2026-11-01",
        &[],
    );
    // Version 3 after version 1: refused even though properly signed.
    let v3 = {
        let r1 = root("2036-01-01T00:00:00Z", &[&key(2)], 1);
        let mut s3 = r1.signed.clone();
        s3.version = 3;
        orch_core::trust::Root::sign(s3, &[key(1)])
    };
    case(
        "rotation-skips-version",
        &valid,
        &["--root-chain", "roots"],
        1,
        "FAIL root root-chain: root v3 cannot follow v1",
        &[("roots/3.root.json", root_file(v3))],
    );
}

#[test]
fn golden_ledger_exports_to_the_golden_bundle() {
    let fx = fixture_dir();
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("golden.db");
    std::fs::copy(fx.join("ledger/golden.db"), &db).unwrap();
    let again = bundle(&db, &[key(2)], Scope::All, 1, None);
    let golden = std::fs::read(fx.join("bundles/valid/bundle.tar.zst")).unwrap();
    if again != golden {
        // Show what differs, file by file.
        let (a, g) = (unpack(&again), unpack(&golden));
        for (name, content) in &g {
            if a.get(name) != Some(content) {
                panic!(
                    "golden bundle differs in {name}:\n--- golden\n{}\n--- exported now\n{}",
                    String::from_utf8_lossy(content),
                    String::from_utf8_lossy(a.get(name).map_or(&[][..], |v| v))
                );
            }
        }
        panic!("golden bundle differs in archive framing only");
    }
}

#[test]
fn golden_cases_give_their_exit_codes_and_messages() {
    let bundles = fixture_dir().join("bundles");
    let mut seen = 0;
    for entry in std::fs::read_dir(&bundles).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        let mut args: Vec<String> = vec![dir.join("bundle.tar.zst").to_str().unwrap().into()];
        let extra: Vec<String> =
            expected["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
        if !extra.iter().any(|a| a == "--root") {
            args.extend(["--root".into(), bundles.join("root.json").to_str().unwrap().into()]);
        }
        for a in extra {
            // Relative paths name files in the case's directory.
            args.push(if dir.join(&a).exists() { dir.join(&a).to_str().unwrap().into() } else { a });
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = run("orch-verify", &argv);
        let name = dir.file_name().unwrap().to_string_lossy();
        assert_eq!(code as i64, expected["exit"].as_i64().unwrap(), "{name}: {out}{err}");
        let want = expected["stdout_contains"].as_str().unwrap();
        assert!(out.contains(want), "{name}: expected {want:?} in:\n{out}");
        seen += 1;
    }
    assert!(seen >= 12, "all golden cases present ({seen})");
}

#[test]
fn export_is_consistent_while_orchd_runs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("live.db");
    let d = orch_e2e::Daemon::start(&db, &["--demo"]);
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    std::fs::write(p("signer.key"), key(2).to_text()).unwrap();
    std::fs::write(p("root.json"), orch_bundle::keys::root_file(&root("2036-01-01T00:00:00Z", &[&key(2)], 1))).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let mut seen = Vec::new();
    for i in 0..4 {
        let out = p(&format!("live-{i}.tar.zst"));
        let (code, _, err) = run(
            "orch-bundle",
            &["export", "--db", db.to_str().unwrap(), "--key", &p("signer.key"), "--out", &out, "--json"],
        );
        assert_eq!(code, 0, "{err}");
        let (code, stdout, _) = run("orch-verify", &[&out, "--root", &p("root.json")]);
        assert_eq!(code, 0, "export {i} taken while orchd wrote verifies:\n{stdout}");
        seen.push(
            verify(&std::fs::read(&out).unwrap(), &opts(root("2036-01-01T00:00:00Z", &[&key(2)], 1)))
                .summary
                .unwrap()
                .to_seq,
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    d.kill();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen[3] > seen[0], "the ledger grew between exports: {seen:?}");
}
