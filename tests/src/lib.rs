//! Helpers for the end-to-end tests: find the workspace's binaries, start `orchd` on a free
//! loopback port and stop it (gracefully or with SIGKILL).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The path of a workspace binary built by `cargo test --workspace` (or `cargo build`).
pub fn bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds every binary",
        path.display()
    );
    path
}

/// A running `orchd serve`.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// Lines the daemon wrote on stderr so far are sent here.
    pub stderr: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `orchd serve --db DB --listen 127.0.0.1:0 EXTRA…` and waits until it listens.
    pub fn start(db: &Path, extra: &[&str]) -> Daemon {
        let mut child = Command::new(bin("orchd"))
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(db)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start orchd");
        let (tx, stderr) = mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let out = child.stdout.take().expect("stdout");
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = line_tx.send(line);
        });
        let line = line_rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let url = line
            .trim()
            .strip_prefix("orchd listening on ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                let logs: Vec<String> = stderr.try_iter().collect();
                panic!("orchd did not start: {line:?}\n{}", logs.join("\n"))
            })
            .to_string();
        Daemon { child, url, stderr }
    }

    /// Kills the daemon with SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.child.kill().expect("kill orchd");
        self.child.wait().expect("reap orchd");
    }

    /// Asks the daemon to stop (SIGTERM) and waits for it.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("send SIGTERM");
        wait_timeout(&mut self.child, Duration::from_secs(20)).expect("orchd did not stop within 20 s")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Runs a binary to completion, returning (exit code, stdout, stderr).
pub fn run(name: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin(name)).args(args).output().expect("run binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
