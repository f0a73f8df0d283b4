//! The browser client (`clients/js`) in headless Chromium against `outpost
//! dev`: both builds (ES module and script tag) send events and a log
//! through the real edge, survive a `503` + `Retry-After` by retrying the
//! same event ids, hand what is queued to `sendBeacon` when the page goes
//! away (and the beacon is accepted), and every event, the beacon's too, is
//! found exactly once through the query API. Needs
//! Debian's chromium and `npm ci` (playwright-core, esbuild), which
//! scripts/test installs.

use std::process::Command;
use std::time::{Duration, Instant};

use outpost_tests::dev::Dev;
use serde_json::Value;

#[test]
fn the_browser_client_delivers_events_through_the_edge_with_retries() {
    let root = outpost_tests::repo_root();
    let chromium = outpost_tests::require_tool("chromium");
    outpost_tests::require_tool("node");
    let esbuild = root.join("node_modules/.bin/esbuild");
    assert!(esbuild.exists(), "run `npm ci` (scripts/test does)");
    // The script-tag build, from the module, as `npm run build:client` makes it.
    outpost_tests::run_ok(
        Command::new("npm")
            .args(["run", "-s", "build:client"])
            .current_dir(&root),
    );

    let dir = tempfile::tempdir().unwrap();
    let port = outpost_tests::aggregator::free_port();
    let edge_port = outpost_tests::aggregator::free_port();
    let dev = Dev::start(dir.path(), port, edge_port);
    let creds: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("credentials.json")).unwrap(),
    )
    .unwrap();

    let out = Command::new("node")
        .arg(root.join("clients/js/test/browser-test.mjs"))
        .arg(format!("http://127.0.0.1:{edge_port}"))
        .arg(creds["write_key"].as_str().unwrap())
        .env("CHROMIUM", &chromium)
        .current_dir(&root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser run failed:\n{stderr}");
    let result: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));

    let key = creds["read_api_key"].as_str().unwrap().to_owned();
    let read = |query: &str| -> Value {
        let out = Command::new("curl")
            .args(["-s", "-H", &format!("Authorization: Bearer {key}")])
            .arg(format!("http://127.0.0.1:{port}/v1/events?{query}"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for build in ["module", "global"] {
        let r = &result[build];
        assert_eq!(r["refusals"], 1, "{build}: the first send was refused");
        assert_eq!(r["stats"]["queued"], 0, "{build}: {r}");
        let ids: Vec<&str> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 3);
        let beacon = &r["beacon"];
        assert_eq!(
            (beacon["before"].as_i64(), beacon["after"].as_i64()),
            (Some(1), Some(0)),
            "{build}: pagehide hands the queue to sendBeacon: {r}"
        );
        assert_eq!(
            beacon["status"], 202,
            "{build}: the edge accepted the beacon: {r}"
        );
        let user = format!("user-{build}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let page = loop {
            let page = read(&format!("user_id={user}&order=asc&limit=100"));
            if page["data"].as_array().map(Vec::len) == Some(4) || Instant::now() > deadline {
                break page;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let data = page["data"].as_array().unwrap();
        let beacon_id = beacon["id"].as_str().unwrap();
        let mut got: Vec<&str> = data
            .iter()
            .map(|e| e["event_id"].as_str().unwrap())
            .filter(|id| *id != beacon_id)
            .collect();
        got.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(got, want, "{build}: each event exactly once\n{page}");
        assert_eq!(
            data.iter()
                .filter(|e| e["event_id"].as_str() == Some(beacon_id))
                .count(),
            1,
            "{build}: the beacon's event exactly once\n{page}"
        );
        for e in data {
            assert_eq!(e["client_id"], "demo-web");
            assert_eq!(e["properties"]["build"], build);
            assert_eq!(e["context"]["library_name"], "outpost-js");
            assert_eq!(e["context"]["platform"], "web");
        }
        let log = data.iter().find(|e| e["kind"] == "log").unwrap();
        assert_eq!(
            (
                log["level"].as_str(),
                log["message"].as_str(),
                log["name"].as_str()
            ),
            (Some("warn"), Some("slow checkout"), Some("cart"))
        );
        assert_eq!(log["properties"]["ms"], 2300);
    }
    dev.stop();
}
