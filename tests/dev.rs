//! `outpost dev`: one command, no server to install. The test starts the
//! real binary with the real edge component, runs the curl examples it
//! prints exactly as printed, and reads the events back through the query
//! API it points at; then restarts it on the same directory.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Dev {
    child: Child,
    printed: String,
}

impl Dev {
    fn start(dir: &std::path::Path, port: u16, edge_port: u16) -> Dev {
        let mut child = Command::new(outpost_tests::outpost_bin())
            .args(["dev", "--dir"])
            .arg(dir)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--edge-listen",
                &format!("127.0.0.1:{edge_port}"),
                "--component",
            ])
            .arg(outpost_tests::edge::spin_component())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut printed = String::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !printed.contains("Stop with Ctrl-C.") {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    printed.push_str(&line);
                    printed.push('\n');
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("outpost dev printed no examples:\n{printed}");
                }
            }
        }
        Dev { child, printed }
    }

    /// The `curl` lines it printed, in order.
    fn curls(&self) -> Vec<String> {
        self.printed
            .lines()
            .filter(|l| l.starts_with("curl "))
            .map(str::to_owned)
            .collect()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "outpost dev exited with {status}");
    }
}

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
