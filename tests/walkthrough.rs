//! The README's walkthrough, run as written — with the database name, port,
//! spool path and Redis prefix made unique to this test, and the binary
//! `scripts/test` built in place of `cargo run` (and of building the edge
//! component, which it did too).

use outpost_tests::stores::{TestRedis, pg_admin_url, unique};
use serde_json::Value;

#[test]
fn the_readme_walkthrough_runs_from_nothing_to_events_read_back() {
    for tool in ["openssl", "basenc", "createdb", "curl", "python3"] {
        outpost_tests::require_tool(tool);
    }
    let block = outpost_tests::fenced_block_after(&outpost_tests::readme(), "example: walkthrough");
    let db = unique("outpost_demo");
    let redis = TestRedis::new();
    let port = outpost_tests::aggregator::free_port();
    let edge_port = outpost_tests::aggregator::free_port();
    let dir = tempfile::tempdir().unwrap();
    let bin = outpost_tests::outpost_bin().display().to_string();
    let script = block
        .replace("cargo run -q --release --bin outpost --", &bin)
        .replace("outpost_demo", &db)
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("/tmp/outpost-demo", &dir.path().display().to_string())
        .replace("127.0.0.1:3000", &format!("127.0.0.1:{edge_port}"))
        // scripts/test built the component already, into its target dir.
        .replace("./scripts/build-edge spin", "true")
        .replace(
            "$PWD/target/wasm32-wasip2/wasm/outpost_edge_spin.wasm",
            &outpost_tests::edge::spin_component().display().to_string(),
        );
    let script = format!(
        "set -e\ntrap 'kill $server 2>/dev/null || true' EXIT\nexport OUTPOST_SERVER_LISTEN=127.0.0.1:{port} OUTPOST_DEDUP_KEY_PREFIX={} OUTPOST_LOG_LEVEL=warn\n{script}\nwait $server 2>/dev/null || true\n",
        redis.prefix
    );
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::process::Command::new("psql")
        .args([
            "-q",
            &format!("{}/postgres", pg_admin_url()),
            "-c",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        ])
        .output();
    assert!(
        out.status.success(),
        "walkthrough failed:\n{stdout}\n{stderr}"
    );
    // The last line of output is the page curl fetched.
    let page: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let data = page["data"].as_array().unwrap();
    assert_eq!(data.len(), 3, "{page}");
    assert!(data.iter().all(|e| e["client_id"] == "demo"));
    assert!(stdout.contains("ingest: 10 frames, 100 events"), "{stdout}");
    // The event sent through the edge was acknowledged by the aggregator.
    assert!(
        stdout.contains(r#""success":true,"accepted":1,"rejected":0"#),
        "{stdout}"
    );
}
