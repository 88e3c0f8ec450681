//! `orch-verify`'s command line: help, usage errors and unreadable input. (Verification itself is
//! driven end to end in tests/tests/bundles.rs.)

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_orch-verify")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn help_usage_and_unreadable_input() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for word in ["--root", "--root-chain", "--max-age", "--json", "prove", "check-proof"] {
        assert!(out.contains(word), "{word} in:\n{out}");
    }
    assert_eq!(run(&[]).0, 2);
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.tar.zst");
    std::fs::write(&junk, b"not a bundle").unwrap();
    let root = dir.path().join("root.json");
    std::fs::write(&root, b"{}").unwrap();
    let (code, _, err) = run(&[junk.to_str().unwrap(), "--root", root.to_str().unwrap()]);
    assert_eq!(code, 2, "an unreadable root is a usage error");
    assert!(err.contains("not a root.json"), "{err}");
    let (code, _, err) = run(&[junk.to_str().unwrap(), "--root", root.to_str().unwrap(), "--max-age", "soon"]);
    assert_eq!(code, 2, "{err}");
}
