//! `outpost dev` as a child process: started on a directory and two ports,
//! with what it printed (its examples) captured.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `outpost dev`.
pub struct Dev {
    child: Child,
    /// Everything it printed up to "Stop with Ctrl-C.".
    pub printed: String,
}

impl Dev {
    /// Starts it with the component scripts/test built; waits for its examples.
    pub fn start(dir: &std::path::Path, port: u16, edge_port: u16) -> Dev {
        let mut child = Command::new(crate::outpost_bin())
            .args(["dev", "--dir"])
            .arg(dir)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--edge-listen",
                &format!("127.0.0.1:{edge_port}"),
                "--component",
            ])
            .arg(crate::edge::spin_component())
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
    pub fn curls(&self) -> Vec<String> {
        self.printed
            .lines()
            .filter(|l| l.starts_with("curl "))
            .map(str::to_owned)
            .collect()
    }

    /// SIGTERM; it must exit cleanly.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "outpost dev exited with {status}");
    }
}

impl Drop for Dev {
    /// A test that fails before `stop` must not leave `outpost dev`
    /// running: it holds the test's stderr, which would keep CI's pipe open.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
