//! The daemon remembers API tokens it has read (`TokenCache`) while the ledger says no token
//! can have changed. A revocation must still take effect on the very next request, whoever
//! makes it: `orchd token revoke` in another process, another connection to the same file, or
//! this daemon's own store.

use std::process::Command;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use orch_core::{ManualClock, Timestamp};
use orch_store::{NewToken, SqliteStore, Store};
use serde_json::Value;
use tower::ServiceExt;

struct Site {
    app: axum::Router,
    state: orchd::AppState,
    db: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_793_577_600_000)));
        let store = SqliteStore::open(&db, clock.clone(), Default::default(), Default::default()).unwrap();
        let state = orchd::AppState::new(Arc::new(store), clock, orchd::config::Settings::default());
        state.set_ready();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        Site { app: orchd::http::router(state.clone()), state, db, rt, _dir: dir }
    }

    /// Issues a read token of tenant `acme` through `store`; returns (id, secret).
    fn issue(&self, store: &dyn Store) -> (String, String) {
        let (id, token) = orchd::http::auth::mint_token();
        store
            .put_token(NewToken {
                id: id.clone(),
                tenant: "acme".into(),
                scopes: vec!["orch:read".into()],
                label: String::new(),
                expires_at: None,
                hash: orchd::http::auth::token_hash(&token),
            })
            .unwrap();
        (id, token)
    }

    /// `GET /api/v1/jobs` with this token: (status, error code).
    fn get(&self, token: &str) -> (u16, Option<String>) {
        let req = Request::builder()
            .uri("/api/v1/jobs")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        self.rt.block_on(async {
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            (status, body["error"]["code"].as_str().map(str::to_string))
        })
    }

    /// Asserts that the token works, twice (the second time from the cache).
    fn works(&self, token: &str) {
        assert_eq!(self.get(token), (200, None));
        assert_eq!(self.get(token), (200, None));
    }
}

fn refused(got: (u16, Option<String>)) {
    assert_eq!(got, (401, Some("token_revoked".to_string())));
}

#[test]
fn revoking_from_another_process_takes_effect_on_the_next_request() {
    let site = Site::new();
    let (id, token) = site.issue(&*site.state.store);
    let (_, other) = site.issue(&*site.state.store);
    site.works(&token);
    site.works(&other);
    let out = Command::new(env!("CARGO_BIN_EXE_orchd"))
        .args(["token", "revoke", "--db"])
        .arg(&site.db)
        .arg(&id)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    refused(site.get(&token));
    refused(site.get(&token));
    // Tokens nobody touched keep working.
    site.works(&other);
}

#[test]
fn revoking_through_another_connection_or_this_store_takes_effect_on_the_next_request() {
    let site = Site::new();
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_793_577_600_000)));
    let second = SqliteStore::open(&site.db, clock, Default::default(), Default::default()).unwrap();
    // Issued through the other connection, revoked through it.
    let (id, token) = site.issue(&second);
    site.works(&token);
    second.revoke_token(&id).unwrap();
    refused(site.get(&token));
    // Issued and revoked through the daemon's own store.
    let (id, token) = site.issue(&*site.state.store);
    site.works(&token);
    site.state.store.revoke_token(&id).unwrap();
    refused(site.get(&token));
}

#[test]
fn the_stamp_moves_on_foreign_commits_and_own_token_writes_only() {
    let site = Site::new();
    let store = &site.state.store;
    let stamp = store.token_stamp().expect("an idle SQLite store can tell");
    // The daemon's own writes that are not tokens leave it.
    let job = orch_store::NewJob {
        tenant: "acme".into(),
        project: "default".into(),
        queue: "q".into(),
        source: None,
        payload: Value::Null,
        priority: 0,
        run_after: None,
        max_attempts: None,
        correlation_id: None,
        idempotency_key: None,
        run: None,
        depends_on: Vec::new(),
        on_parent_failure: Default::default(),
    };
    store.enqueue("test", vec![job]).unwrap();
    assert_eq!(store.token_stamp(), Some(stamp));
    // Any commit through another connection moves it, whatever it wrote.
    let c = rusqlite::Connection::open(&site.db).unwrap();
    c.execute_batch("CREATE TABLE scratch (x); INSERT INTO scratch VALUES (1);").unwrap();
    let moved = store.token_stamp().unwrap();
    assert!(moved > stamp);
    assert_eq!(store.token_stamp(), Some(moved));
    // Its own token writes move it too.
    site.issue(&**store);
    assert!(store.token_stamp().unwrap() > moved);
}
