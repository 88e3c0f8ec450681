//! The web console in a real browser (headless Chromium): it loads against a running daemon and
//! shows a job move from queued to succeeded without a reload. Skips, saying why, where no
//! Chromium is installed, unless `ORCH_REQUIRE_CHROMIUM=1` (as `.ci/run` sets) makes that a failure.

use std::path::PathBuf;
use std::time::Duration;

use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions};
use orch_e2e::api::Client;
use orch_e2e::{token, Daemon};
use serde_json::json;

fn chromium() -> Option<PathBuf> {
    let candidates =
        [std::env::var("CHROMIUM").ok(), Some("/usr/bin/chromium".into()), Some("/usr/bin/chromium-browser".into())];
    candidates.into_iter().flatten().map(PathBuf::from).find(|p| p.exists())
}

fn string(tab: &headless_chrome::Tab, js: &str) -> String {
    tab.evaluate(js, false).unwrap().value.and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

#[test]
fn the_console_shows_a_job_succeed_live() {
    let Some(browser_path) = chromium() else {
        assert!(
            std::env::var_os("ORCH_REQUIRE_CHROMIUM").is_none(),
            "ORCH_REQUIRE_CHROMIUM is set but no Chromium was found"
        );
        eprintln!("SKIP the_console_shows_a_job_succeed_live: no Chromium (install Debian's chromium package, or set CHROMIUM)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orchd.db");
    let viewer = token(&db, "*", "orch:read,orch:operate");
    let worker = token(&db, "acme", "orch:work");
    let env = [("ORCHD_EVENTS__POLL_MS", "20"), ("ORCHD_FLOW__INCIDENTS__CHECK_MS", "200")];
    let daemon = Daemon::start_env(&db, &[], &env);
    let w = Client::new(&daemon.url, Some(&worker));
    let id = w.post("/api/v1/jobs", &json!({"queue": "ingest", "payload": {"url": "https://example.test"}})).json
        ["job"]["id"]
        .as_i64()
        .unwrap();

    let options = LaunchOptions::default_builder()
        .path(Some(browser_path))
        .headless(true)
        .sandbox(false)
        .window_size(Some((1400, 1000)))
        .idle_browser_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let browser = Browser::new(options).expect("start Chromium");
    let tab = browser.new_tab().unwrap();
    tab.navigate_to(&format!("{}/#token={viewer}", daemon.url)).unwrap().wait_until_navigated().unwrap();
    let row = |state: &str| format!(r#"#jobs tr[data-id="{id}"][data-state="{state}"]"#);
    tab.wait_for_element_with_custom_timeout(&row("queued"), Duration::from_secs(20)).expect("the job shows as queued");
    let page = string(&tab, "window.__orchPageId");
    assert!(!page.is_empty());

    // A worker runs the job over the API; the page learns of it from the event stream.
    let r = w.post("/api/v1/claims", &json!({"worker_id": "w-1", "queues": ["ingest"], "limit": 1}));
    let lease = r.json["allocations"][0]["lease_id"].as_str().unwrap().to_string();
    assert_eq!(w.post(&format!("/api/v1/jobs/{id}/ack"), &json!({ "lease_id": lease })).status, 200);
    tab.wait_for_element_with_custom_timeout(&row("succeeded"), Duration::from_secs(20))
        .expect("the job shows as succeeded");
    assert_eq!(string(&tab, "window.__orchPageId"), page, "the page was not reloaded");
    assert_eq!(string(&tab, r##"document.querySelector("#status").textContent"##), "live");

    // Flow control: a host failing with 503s trips its breaker; the console shows the breaker
    // open and the incident it opened.
    let admin = Client::new(&daemon.url, Some(&token(&db, "acme", "orch:admin,orch:work")));
    assert_eq!(admin.put("/api/v1/sources/nvd", &json!({"host": "services.nvd.nist.gov"})).status, 200);
    for _ in 0..10 {
        w.post("/api/v1/jobs", &json!({"queue": "ingest", "source": "nvd"}));
        let r = w.post("/api/v1/claims", &json!({"worker_id": "w-1", "queues": ["ingest"], "limit": 1}));
        let a = &r.json["allocations"][0];
        let body =
            json!({"lease_id": a["lease_id"], "error_class": "http_503", "message": "HTTP 503", "retryable": false});
        assert_eq!(w.post(&format!("/api/v1/jobs/{}/fail", a["job"]["id"]), &body).status, 200);
    }
    tab.wait_for_element_with_custom_timeout("#breakers .state.dead", Duration::from_secs(20))
        .expect("the breaker shows as open");
    let incidents = tab
        .wait_for_element_with_custom_timeout("#incidents tbody tr", Duration::from_secs(20))
        .expect("the incident shows")
        .get_inner_text()
        .unwrap();
    assert!(incidents.contains("breaker_open") && incidents.contains("host:services.nvd.nist.gov"), "{incidents}");

    let png = tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("console screenshot: {}", out.display());
}
