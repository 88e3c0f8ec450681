//! `orch-bundle`'s command line: help and usage errors. (Export and key handling are driven end
//! to end in tests/tests/bundles.rs.)

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_orch-bundle")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn help_documents_every_command_and_bad_usage_exits_2() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["keygen", "root", "export", "inspect"] {
        assert!(out.contains(cmd), "{cmd} in:\n{out}");
    }
    let (code, out, _) = run(&["root", "--help"]);
    assert_eq!(code, 0);
    for cmd in ["init", "sign", "rotate"] {
        assert!(out.contains(cmd), "{cmd} in:\n{out}");
    }
    assert_eq!(run(&["export"]).0, 2, "missing --db/--key/--out");
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.key");
    std::fs::write(&bogus, "not hex").unwrap();
    let (code, _, err) = run(&["root", "sign", "nope.json", "--key", bogus.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn keygen_refuses_to_overwrite_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    assert_eq!(run(&["keygen", "--out", out]).0, 0);
    let before = std::fs::read(dir.path().join("bundle.key")).unwrap();
    let (code, _, err) = run(&["keygen", "--out", out]);
    assert_eq!(code, 2);
    assert!(err.contains("must not exist yet"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("bundle.key")).unwrap(), before);
}
