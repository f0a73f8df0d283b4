//! NATS servers of the test's own: `nats-server` processes with JetStream,
//! each on its own ports with its own store in a temp dir, which a test may
//! kill and start again — one server, or a cluster of three with routes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::aggregator::free_port;

/// One `nats-server` process; killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    config: PathBuf,
    dir: PathBuf,
    /// Its client port.
    pub port: u16,
}

/// Room for a 1 MiB frame and its headers (the aggregator checks it).
const MAX_PAYLOAD: &str = "2MB";

impl NatsServer {
    /// A single server with JetStream.
    pub fn start(dir: &std::path::Path) -> NatsServer {
        let port = free_port();
        let config = format!(
            "listen: 127.0.0.1:{port}\nmax_payload: {MAX_PAYLOAD}\njetstream {{\n  store_dir: \"{}\"\n}}\n",
            dir.join("js").display()
        );
        NatsServer::launch(dir, port, config)
    }

    /// Three servers with JetStream in one cluster (routes on loopback).
    pub fn cluster(dir: &std::path::Path) -> Vec<NatsServer> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, r)| format!("\"nats-route://127.0.0.1:{r}\""))
            .collect();
        ports
            .iter()
            .enumerate()
            .map(|(i, (port, route))| {
                let node = dir.join(format!("n{i}"));
                std::fs::create_dir_all(&node).expect("node dir");
                let config = format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{port}\nmax_payload: {MAX_PAYLOAD}\n\
                     jetstream {{\n  store_dir: \"{}\"\n}}\n\
                     cluster {{\n  name: outpost-test\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                    node.join("js").display(),
                    routes.join(", ")
                );
                NatsServer::launch(&node, *port, config)
            })
            .collect()
    }

    fn launch(dir: &std::path::Path, port: u16, config: String) -> NatsServer {
        let path = dir.join(format!("nats-{port}.conf"));
        std::fs::write(&path, config).expect("write nats config");
        let mut s = NatsServer {
            child: None,
            config: path,
            dir: dir.to_path_buf(),
            port,
        };
        s.start_again();
        s
    }

    /// Starts the killed server again, with its store.
    pub fn start_again(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("nats-{}.log", self.port)))
            .expect("nats log");
        let child = Command::new(crate::require_tool("nats-server"))
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The aggregator environment for a JetStream spool on `urls`, with a
/// stream name of the test's own and short timings.
pub fn jetstream_env(urls: &str, stream: &str, ack_wait_secs: u64) -> Vec<(String, String)> {
    vec![
        ("OUTPOST_SPOOL_BACKEND".into(), "jetstream".into()),
        ("OUTPOST_SPOOL_JETSTREAM_URLS".into(), urls.into()),
        ("OUTPOST_SPOOL_JETSTREAM_STREAM".into(), stream.into()),
        (
            "OUTPOST_SPOOL_JETSTREAM_SUBJECT".into(),
            format!("{}.batches", stream.to_ascii_lowercase()),
        ),
        (
            "OUTPOST_SPOOL_JETSTREAM_ACK_WAIT_SECS".into(),
            ack_wait_secs.to_string(),
        ),
    ]
}
