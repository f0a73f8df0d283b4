//! `outpost dev`: one command, no server to install. The test starts the
//! real binary with the real edge component, runs the curl examples it
//! prints exactly as printed, and reads the events back through the query
//! API it points at; then restarts it on the same directory.

use std::process::Command;
use std::time::{Duration, Instant};

use outpost_tests::dev::Dev;
use serde_json::Value;

fn sh(line: &str) -> String {
    let out = Command::new("bash").arg("-c").arg(line).output().unwrap();
    assert!(out.status.success(), "{line}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the read example until it shows `n` events.
fn read_back(curl: &str, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page: Value = serde_json::from_str(sh(curl).trim()).unwrap();
        if page["data"].as_array().map(Vec::len) == Some(n) || Instant::now() > deadline {
            return page;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn outpost_dev_runs_the_stack_and_its_printed_examples_work() {
    outpost_tests::require_tool("curl");
    let dir = tempfile::tempdir().unwrap();
    let port = outpost_tests::aggregator::free_port();
    let edge_port = outpost_tests::aggregator::free_port();

    let dev = Dev::start(dir.path(), port, edge_port);
    let curls = dev.curls();
    assert_eq!(curls.len(), 3, "write key, HMAC, read:\n{}", dev.printed);
    assert!(curls[0].contains(&format!("127.0.0.1:{edge_port}")));
    for send in &curls[..2] {
        let answer: Value = serde_json::from_str(sh(send).trim()).unwrap();
        assert_eq!(answer["success"], true, "{send}\n{answer}");
        assert_eq!(answer["accepted"], 1, "{answer}");
    }
    let page = read_back(&curls[2], 2);
    let data = page["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{page}");
    // Newest first: the signed one was sent second.
    assert_eq!(data[0]["client_id"], "demo-server");
    assert_eq!(data[0]["name"], "signup");
    assert_eq!(data[0]["properties"]["plan"], "pro");
    assert_eq!(data[1]["client_id"], "demo-web");
    assert_eq!(data[1]["name"], "page_view");
    assert_eq!(data[1]["properties"]["path"], "/");

    // Stats answer from the SQLite store too.
    let key = curls[2]
        .split("Bearer ")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .unwrap()
        .to_owned();
    let stats: Value = serde_json::from_str(&sh(&format!(
        "curl -s 'http://127.0.0.1:{port}/v1/stats?bucket=day&group_by=client&users=true' -H 'Authorization: Bearer {key}'"
    )))
    .unwrap();
    let series = stats["series"].as_array().unwrap();
    assert_eq!(series.len(), 2, "{stats}");
    assert!(series.iter().all(|s| s["events"] == 1), "{stats}");
    assert_eq!(
        series
            .iter()
            .map(|s| s["users"].as_i64().unwrap())
            .sum::<i64>(),
        1,
        "one event had a user: {stats}"
    );
    dev.stop();

    // A second run on the same directory keeps the clients and the events.
    let again = Dev::start(dir.path(), port, edge_port);
    assert_eq!(again.curls()[2], curls[2], "same reader key");
    let page = read_back(&again.curls()[2], 2);
    assert_eq!(page["data"].as_array().unwrap().len(), 2, "{page}");
    // The signed example is fresh (new timestamp and nonce) and works.
    let answer: Value = serde_json::from_str(sh(&again.curls()[1]).trim()).unwrap();
    assert_eq!(answer["success"], true, "{answer}");
    again.stop();
}

/// Runs `script` in bash in `dir`; returns its stdout, failing on an error.
fn bash_in(dir: &std::path::Path, script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn readme_signing_examples_send_signed_events_to_outpost_dev() {
    use outpost_tests::{fenced_block_after, readme};
    outpost_tests::require_tool("curl");
    outpost_tests::require_tool("openssl");
    outpost_tests::require_tool("python3");
    outpost_tests::require_tool("node");
    // The README's commands run from the directory holding `.outpost-dev`.
    let work = tempfile::tempdir().unwrap();
    let port = outpost_tests::aggregator::free_port();
    let edge_port = outpost_tests::aggregator::free_port();
    let dev = Dev::start(&work.path().join(".outpost-dev"), port, edge_port);

    let doc = readme();
    let block = |name: &str| fenced_block_after(&doc, &format!("example: {name}"));
    let env = block("signing-env").replace("127.0.0.1:3000", &format!("127.0.0.1:{edge_port}"));
    let runs = [
        (
            "python",
            format!(
                "python3 - <<'PY'\n{}\n{}\nPY",
                block("python-signing"),
                block("python-send")
            ),
        ),
        (
            "node",
            format!(
                "node --input-type=module <<'JS'\n{}\n{}\nJS",
                block("node-signing"),
                block("node-send")
            ),
        ),
        (
            "curl",
            format!(
                "{}\n{}\n{}",
                block("shell-request"),
                block("shell-signing"),
                block("shell-send")
            ),
        ),
    ];
    for (via, script) in &runs {
        let out = bash_in(work.path(), &format!("{env}\n{script}"));
        let answer: Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{via}: {e}: {out}"));
        assert_eq!(answer["success"], true, "{via}: {answer}");
        assert_eq!(answer["accepted"], 1, "{via}: {answer}");
    }

    let page = read_back(&dev.curls()[2], 3);
    let mut seen: Vec<String> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["client_id"], "demo-server", "{e}");
            e["properties"]["via"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, ["curl", "node", "python"], "{page}");
    dev.stop();
}
