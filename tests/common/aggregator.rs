//! The real `outpost serve` process, configured for one test, and frames to
//! send it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_shared::Timestamp;
use outpost_shared::client::Secret;
use outpost_shared::event::Event;
use outpost_shared::frame::{self, BatchId, EdgeKey, FrameMeta};
use outpost_shared::sample::{SAMPLE_NOW, typical_batch};

/// The edge key every test aggregator accepts.
pub const EDGE_KEY_ID: &str = "test-edge";
/// Its secret.
pub const EDGE_SECRET: &[u8] = b"test-edge-secret-test-edge-secret";

/// The test edge key.
pub fn edge_key() -> EdgeKey {
    EdgeKey {
        id: EDGE_KEY_ID.into(),
        secret: Secret::new(EDGE_SECRET.to_vec()),
    }
}

/// A running aggregator; killed when dropped.
pub struct Aggregator {
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// Its base URL.
    pub url: String,
    port: u16,
    /// Its working directory (spool, config, log).
    pub dir: PathBuf,
    config_path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// The port an aggregator was given was bound by another process first.
struct PortTaken;

/// Picks a free local port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Aggregator {
    /// Starts `outpost serve` with `extra` TOML appended to a base config
    /// (listen address, edge key, spool in a temp dir), and waits until live.
    pub async fn start(extra: &str) -> Aggregator {
        Aggregator::start_with_env(extra, &[]).await
    }

    /// As [`Aggregator::start`], with `OUTPOST_*` environment overrides.
    pub async fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Aggregator {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[[edge_keys]]\nid = \"{EDGE_KEY_ID}\"\nsecret = \"{}\"\n\n[spool]\npath = \"{}\"\n\n{extra}\n",
            base64url(EDGE_SECRET),
            dir.join("spool.db").display()
        );
        let config_path = dir.join("outpost.toml");
        std::fs::write(&config_path, config).expect("write config");
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut a = Aggregator {
            child: None,
            env,
            url: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            config_path,
            _tmp: Some(tmp),
        };
        // `free_port` releases the port it found: another test's process
        // can bind it before this server does. Then take another one.
        for _ in 0..5 {
            match a.try_spawn().await {
                Ok(()) => return a,
                Err(PortTaken) => {
                    let old = format!("listen = \"127.0.0.1:{}\"", a.port);
                    a.port = free_port();
                    let new = format!("listen = \"127.0.0.1:{}\"", a.port);
                    a.edit_config(|text| text.replacen(&old, &new, 1));
                    a.url = format!("http://127.0.0.1:{}", a.port);
                }
            }
        }
        panic!("outpost found no free port in five tries:\n{}", a.log());
    }

    /// Starts (again) with the same config and spool.
    pub async fn spawn(&mut self) {
        if self.try_spawn().await.is_err() {
            panic!(
                "outpost could not bind port {}: another process holds it:\n{}",
                self.port,
                self.log()
            );
        }
    }

    /// Starts the process and waits until it serves. Live means *this*
    /// child logged that it listens and then answered: a `/health/live`
    /// answer alone could come from another test's server that took the
    /// port while this one was starting.
    async fn try_spawn(&mut self) -> Result<(), PortTaken> {
        let log_path = self.dir.join("outpost.log");
        let log_from = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log");
        let child = Command::new(crate::outpost_bin())
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info,sqlx=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn outpost");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = reqwest::Client::new();
        loop {
            let this_run = self.log().get(log_from..).unwrap_or_default().to_owned();
            if this_run.contains("outpost aggregator listening")
                && let Ok(r) = client.get(format!("{}/health/live", self.url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                if this_run.contains("Address already in use") {
                    return Err(PortTaken);
                }
                panic!("outpost exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "outpost did not become live:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Edits the config file (for the next [`Aggregator::spawn`]).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("config");
        std::fs::write(&self.config_path, edit(text)).expect("write config");
    }

    /// The running server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().expect("wait")
    }

    /// The spool database, read-only (dead letters, cursors).
    pub async fn spool(&self) -> sqlx::SqliteConnection {
        let url = format!("sqlite://{}?mode=ro", self.dir.join("spool.db").display());
        <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .expect("open the spool")
    }

    /// The process log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("outpost.log")).unwrap_or_default()
    }

    /// `POST /v1/ingest`.
    pub async fn ingest(&self, frame: Vec<u8>) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v1/ingest", self.url))
            .header("content-type", "application/vnd.outpost.frame")
            .body(frame)
            .send()
            .await
            .expect("ingest request")
    }

    /// `POST /v1/ingest`, which must answer `202` (durable).
    pub async fn ingest_accepted(&self, frame: Vec<u8>) {
        let resp = self.ingest(frame).await;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 202, "ingest refused: {body}");
    }

    /// Waits up to `secs` until every sink has every batch (the spool
    /// holds none).
    pub async fn wait_spool_empty(&self, secs: u64) {
        self.wait_metric("outpost_spool_batches", 0.0, secs).await;
    }

    /// Waits up to `secs` until `name` reads `value`.
    pub async fn wait_metric(&self, name: &str, value: f64, secs: u64) {
        eventually(secs, &format!("{name} = {value}"), || async {
            self.metric(name).await == value
        })
        .await;
    }

    /// One metric's value from `/metrics` (summed over label sets).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- outpost log ({}) ---\n{}",
                self.dir.display(),
                self.log()
            );
        }
    }
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Events with ids `<tag>-<i>` made UUID-shaped, so tests can pick overlaps.
pub fn events(tag: u32, range: std::ops::Range<u32>) -> Vec<Event> {
    let sample = typical_batch(1).events.remove(0);
    range
        .map(|i| {
            let mut e = sample.clone();
            e.event_id = format!("{tag:08x}-0000-4000-8000-{i:012x}").into();
            e.seq = Some(u64::from(i));
            e.timestamp = Some(now());
            e
        })
        .collect()
}

/// Now, as a timestamp.
pub fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(SAMPLE_NOW.0),
    )
}

/// A signed frame for `client_id` carrying `events`, received now.
pub fn frame_for(client_id: &str, events: Vec<Event>, batch_id: BatchId) -> Vec<u8> {
    frame_from_ip(client_id, events, batch_id, "203.0.113.7")
}

/// [`frame_for`], from another client address.
pub fn frame_from_ip(client_id: &str, events: Vec<Event>, batch_id: BatchId, ip: &str) -> Vec<u8> {
    let mut batch = typical_batch(0);
    batch.facts.client_ip = Some(ip.into());
    batch.client_id = client_id.into();
    batch.facts.received_at = now();
    batch.events = events;
    let meta = FrameMeta {
        edge_id: "test",
        batch_id,
        created_at: now(),
        compress: true,
    };
    frame::encode(&meta, &batch, &edge_key()).expect("encode")
}

/// A random batch id.
pub fn batch_id() -> BatchId {
    BatchId(fastrand::u128(..).to_be_bytes())
}

/// Polls `f` until it returns true or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
