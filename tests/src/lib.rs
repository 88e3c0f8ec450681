//! Helpers for the end-to-end tests: find the workspace's binaries, start `orchd` on a free
//! loopback port and stop it (gracefully or with SIGKILL); and the test oracles the fuzz targets
//! share ([`oracle`]).

pub mod oracle;

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
    /// Starts `orchd serve --db DB --listen 127.0.0.1:0 EXTRA…` (`EXTRA` may name its own
    /// `--listen`) and waits until it listens.
    pub fn start(db: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_env(db, extra, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables (`ORCHD_*` settings).
    pub fn start_env(db: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        // A free loopback port, unless the caller names an address.
        let listen: &[&str] = if extra.contains(&"--listen") { &[] } else { &["--listen", "127.0.0.1:0"] };
        let mut child = Command::new(bin("orchd"))
            .arg("serve")
            .args(listen)
            .arg("--db")
            .arg(db)
            .args(extra)
            .envs(env.iter().copied())
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

/// Makes an API token with `orchd token create`; panics if it fails.
pub fn token(db: &Path, tenant: &str, scopes: &str) -> String {
    let db = db.to_str().expect("UTF-8 path");
    let (code, out, err) = run("orchd", &["token", "create", "--db", db, "--tenant", tenant, "--scopes", scopes]);
    assert_eq!(code, 0, "token create failed: {err}");
    out.trim().to_string()
}

/// A small HTTP client for the control plane that never treats a status as an error.
pub mod api {
    use serde_json::Value;

    /// An answer.
    #[derive(Debug)]
    pub struct Reply {
        /// HTTP status.
        pub status: u16,
        /// Headers, lower-case names.
        pub headers: Vec<(String, String)>,
        /// The body as JSON (`Null` if it is not JSON).
        pub json: Value,
        /// The raw body.
        pub bytes: Vec<u8>,
    }

    impl Reply {
        /// A header's value.
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
        }

        /// The error envelope's code (panics with the body if it is not an envelope).
        pub fn code(&self) -> &str {
            self.json["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error envelope: {self:?}"))
        }
    }

    /// One Server-Sent Event.
    #[derive(Debug, Default, Clone)]
    pub struct SseMessage {
        /// `id:`, as a number.
        pub id: Option<u64>,
        /// `event:`.
        pub event: String,
        /// `data:` lines, joined.
        pub data: String,
    }

    /// An open event stream.
    pub struct Sse {
        rx: std::sync::mpsc::Receiver<SseMessage>,
    }

    impl Sse {
        /// The next message, if one comes within `timeout`.
        pub fn next(&self, timeout: std::time::Duration) -> Option<SseMessage> {
            self.rx.recv_timeout(timeout).ok()
        }
    }

    /// A client bound to one base URL and (optionally) one bearer token.
    #[derive(Clone)]
    pub struct Client {
        agent: ureq::Agent,
        base: String,
        token: Option<String>,
        headers: Vec<(String, String)>,
    }

    impl Client {
        /// A client for `base` (e.g. `http://127.0.0.1:4000`).
        pub fn new(base: &str, token: Option<&str>) -> Client {
            let config = ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).build();
            Client {
                agent: ureq::Agent::new_with_config(config),
                base: base.to_string(),
                token: token.map(str::to_string),
                headers: Vec::new(),
            }
        }

        /// The same client sending one more header on every request.
        pub fn with_header(&self, name: &str, value: &str) -> Client {
            let mut c = self.clone();
            c.headers.push((name.to_string(), value.to_string()));
            c
        }

        /// GET.
        pub fn get(&self, path: &str) -> Reply {
            self.send("GET", path, None, &[])
        }

        /// POST JSON.
        pub fn post(&self, path: &str, body: &Value) -> Reply {
            self.send("POST", path, Some(body.to_string().into_bytes()), &[])
        }

        /// PUT JSON.
        pub fn put(&self, path: &str, body: &Value) -> Reply {
            self.send("PUT", path, Some(body.to_string().into_bytes()), &[])
        }

        /// Opens a Server-Sent Events stream; messages arrive on the returned reader.
        pub fn sse(&self, path: &str, headers: &[(&str, &str)]) -> Sse {
            let url = format!("{}{}", self.base, path);
            let mut req = ureq::http::Request::builder().method("GET").uri(&url).header("accept", "text/event-stream");
            if let Some(t) = &self.token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = self.agent.run(req.body(()).expect("request")).unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert_eq!(resp.status().as_u16(), 200, "GET {url}");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                use std::io::BufRead;
                let reader = std::io::BufReader::new(resp.into_body().into_reader());
                let mut msg = SseMessage::default();
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    if line.is_empty() {
                        if (!msg.event.is_empty() || !msg.data.is_empty()) && tx.send(std::mem::take(&mut msg)).is_err()
                        {
                            break;
                        }
                        continue;
                    }
                    let (k, v) = line.split_once(':').unwrap_or((line.as_str(), ""));
                    let v = v.strip_prefix(' ').unwrap_or(v).to_string();
                    match k {
                        "id" => msg.id = v.parse().ok(),
                        "event" => msg.event = v,
                        "data" => msg.data.push_str(&v),
                        _ => {}
                    }
                }
            });
            Sse { rx }
        }

        /// Any request; a body is sent as `application/json` unless `headers` name a content type.
        pub fn send(&self, method: &str, path: &str, body: Option<Vec<u8>>, headers: &[(&str, &str)]) -> Reply {
            let url = format!("{}{}", self.base, path);
            let mut req = ureq::http::Request::builder().method(method).uri(&url);
            if let Some(t) = &self.token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            for (k, v) in &self.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let has_type = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
            if body.is_some() && !has_type {
                req = req.header("content-type", "application/json");
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = match body {
                Some(b) => self.agent.run(req.body(b).expect("request")),
                None => self.agent.run(req.body(()).expect("request")),
            }
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
                .collect();
            let bytes = resp.into_body().read_to_vec().expect("read body");
            let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Reply { status, headers, json, bytes }
        }
    }
}

/// A minimal HTTP receiver for webhooks: answers every request with a settable status and
/// hands over what it received.
pub mod receiver {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::{mpsc, Arc, Mutex};
    use std::time::Duration;

    /// One request.
    #[derive(Debug, Clone)]
    pub struct Received {
        /// Headers, lower-case names.
        pub headers: Vec<(String, String)>,
        /// The body.
        pub body: Vec<u8>,
        /// The status it was answered with.
        pub status: u16,
    }

    impl Received {
        /// A header's value.
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
        }
    }

    /// A running receiver.
    pub struct Receiver {
        /// Its URL.
        pub url: String,
        status: Arc<AtomicU16>,
        rx: Mutex<mpsc::Receiver<Received>>,
    }

    impl Receiver {
        /// Listens on a free loopback port, answering 200.
        pub fn start() -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/hook", listener.local_addr().unwrap());
            let status = Arc::new(AtomicU16::new(200));
            let (tx, rx) = mpsc::channel();
            let st = status.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let (tx, st) = (tx.clone(), st.clone());
                    std::thread::spawn(move || {
                        let mut reader = BufReader::new(stream.try_clone().unwrap());
                        let mut headers = Vec::new();
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                                break;
                            }
                            if let Some((k, v)) = line.trim_end().split_once(':') {
                                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                            }
                        }
                        let len = headers
                            .iter()
                            .find(|(k, _)| k == "content-length")
                            .and_then(|(_, v)| v.parse().ok())
                            .unwrap_or(0usize);
                        let mut body = vec![0; len];
                        let _ = reader.read_exact(&mut body);
                        let status = st.load(Ordering::SeqCst);
                        let _ = write!(stream, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                        let _ = tx.send(Received { headers, body, status });
                    });
                }
            });
            Receiver { url, status, rx: Mutex::new(rx) }
        }

        /// What it answers from now on.
        pub fn set_status(&self, status: u16) {
            self.status.store(status, Ordering::SeqCst);
        }

        /// The next request, if one comes within `timeout`.
        pub fn next(&self, timeout: Duration) -> Option<Received> {
            self.rx.lock().unwrap().recv_timeout(timeout).ok()
        }
    }
}

/// Building ledgers and bundles for tests, deterministically where it matters.
pub mod ledger {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use orch_core::trust::{Root, RootSigned, SigningKey};
    use orch_core::{ManualClock, Timestamp};
    use orch_store::*;
    use serde_json::json;

    /// Test time zero: 2026-11-01T00:00:00Z.
    pub const T0: Timestamp = Timestamp::from_millis(1_793_491_200_000);

    /// A fixed key, from a seed byte.
    pub fn key(n: u8) -> SigningKey {
        SigningKey::from_seed([n; 32])
    }

    /// A root (version 1, expiring at `expires`) whose root role is key 1 and bundle role keys
    /// `bundle` with `threshold`, signed by key 1.
    pub fn root(expires: &str, bundle: &[&SigningKey], threshold: u32) -> Root {
        let rk = [key(1).public()];
        let bk: Vec<_> = bundle.iter().map(|k| k.public()).collect();
        Root::sign(RootSigned::new(1, expires, (&rk, 1), (&bk, threshold)), &[key(1)])
    }

    /// Fills a ledger with a small workload for two tenants: successes with artifacts, a retry,
    /// a dead letter, a cancel, a lapsed lease, and a secret in one payload.
    pub fn workload(db: &Path) -> Arc<ManualClock> {
        let clock = Arc::new(ManualClock::new(T0));
        let store = SqliteStore::open(db, clock.clone(), StoreOptions::default(), Synchronous::Normal).unwrap();
        for round in 0..3u64 {
            let mut jobs = Vec::new();
            for (i, tenant) in ["acme", "globex"].iter().enumerate() {
                let mut j = NewJob::new(
                    tenant,
                    "feeds",
                    "ingest",
                    json!({"round": round, "i": i, "url": "https://feeds.example/x"}),
                );
                j.max_attempts = Some(2);
                j.correlation_id = Some(format!("corr-{round}-{i}"));
                j.idempotency_key = Some(format!("k-{round}-{i}"));
                jobs.push(j);
            }
            let mut secret =
                NewJob::new("acme", "feeds", "ingest", json!({"password": "hunter2", "auth": "Bearer abc.def"}));
            secret.correlation_id = Some(format!("corr-{round}-secret"));
            jobs.push(secret);
            store.enqueue("api", jobs).unwrap();
            clock.advance(Duration::from_secs(1));
            let allocs = store
                .claim(&ClaimRequest {
                    scope: Scope::All,
                    queues: vec!["ingest".into()],
                    worker: "w1".into(),
                    limit: 10,
                    lease_ms: Some(30_000),
                })
                .unwrap();
            for (n, a) in allocs.into_iter().enumerate() {
                let scope = Scope::Tenant(a.job.tenant.clone());
                let lease_id = a.job.lease.clone().unwrap().id;
                clock.advance(Duration::from_millis(250));
                match n % 4 {
                    0 | 1 => {
                        let ack = Ack {
                            lease_id,
                            artifacts: vec![ArtifactInput {
                                name: "out.json".into(),
                                media_type: "application/json".into(),
                                content: format!("{{\"n\":{n}}}").into_bytes(),
                            }],
                        };
                        store.ack(&scope, a.job.id, ack).unwrap();
                    }
                    2 => {
                        let f = Failure {
                            lease_id,
                            class: "http_429".into(),
                            message: "slow down".into(),
                            retryable: true,
                            retry_after_ms: Some(5_000),
                        };
                        store.fail(&scope, a.job.id, f).unwrap();
                    }
                    _ => {
                        store
                            .heartbeat(
                                &scope,
                                a.job.id,
                                Heartbeat { lease_id, progress: Some(json!({"pct": 40})), extend_ms: Some(2_000) },
                            )
                            .unwrap();
                    }
                }
            }
            clock.advance(Duration::from_secs(10));
            store.reap_expired_leases(100).unwrap();
        }
        let first = store
            .jobs(
                &Scope::All,
                &JobFilter { state: Some(orch_core::JobState::Queued), ..Default::default() },
                PageRequest::default(),
            )
            .unwrap();
        if let Some(j) = first.items.first() {
            store.cancel(&Scope::Tenant(j.tenant.clone()), j.id, "operator", Some("duplicate feed".into())).unwrap();
        }
        clock
    }

    /// Exports a bundle of `db` signed by `keys`, with the given scope and range.
    pub fn bundle(db: &Path, keys: &[SigningKey], scope: Scope, from_seq: u64, to_seq: Option<u64>) -> Vec<u8> {
        let store = SqliteStore::open(db, Arc::new(ManualClock::new(T0)), StoreOptions::default(), Synchronous::Normal)
            .unwrap();
        let opts = orch_bundle::ExportOptions {
            scope,
            from_seq,
            to_seq,
            site_id: Some("site-test".into()),
            anchor: None,
            redactor: orch_core::bundle::Redactor::new(Default::default(), b"redaction-key".to_vec()),
            previous: None,
            origin: None,
        };
        let exported = orch_bundle::export(&store, opts).unwrap();
        let env = orch_bundle::keys::sign_manifest(&exported.manifest_bytes(), keys);
        exported.pack(&env).unwrap()
    }
}
