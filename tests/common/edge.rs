//! The edge under test: the Spin component under `outpost edge` (wasmtime)
//! and the Worker under `wrangler dev` (workerd), both forwarding to a
//! stand-in aggregator that decodes frames with `outpost-shared`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use outpost_shared::ErrorCode;
use outpost_shared::auth::signature;
use outpost_shared::client::ClientRecord;
use outpost_shared::error::{AcceptedResponse, ErrorEnvelope};
use outpost_shared::frame::{self, Frame, FrameLimits, KeyRing};

use crate::aggregator::{EDGE_KEY_ID, EDGE_SECRET, edge_key, free_port};
use crate::{outpost_bin, repo_root};

/// How the stand-in aggregator answers frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `202`, every event accepted.
    Accept,
    /// `503` with the envelope: the spool is full.
    Refuse,
    /// No answer for longer than the edge waits.
    Stall,
}

#[derive(Default)]
struct Seen {
    frames: Vec<Frame>,
    /// Frames answered `503` in [`Mode::Refuse`].
    refused: Vec<Frame>,
    lookups: HashMap<String, usize>,
    bad_lookup_signatures: usize,
}

/// A stand-in for the aggregator: client records from a table, frames
/// decoded and kept.
pub struct StandIn {
    pub url: String,
    clients: HashMap<String, ClientRecord>,
    mode: Mutex<Mode>,
    seen: Mutex<Seen>,
}

impl StandIn {
    pub async fn start(clients: Vec<ClientRecord>) -> Arc<StandIn> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = Arc::new(StandIn {
            url: format!("http://{addr}"),
            clients: clients.into_iter().map(|c| (c.id.to_string(), c)).collect(),
            mode: Mutex::new(Mode::Accept),
            seen: Mutex::new(Seen::default()),
        });
        let app = axum::Router::new()
            .route("/v1/ingest", axum::routing::post(ingest))
            .route("/internal/v1/clients/{id}", axum::routing::get(client))
            .with_state(me.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        me
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Frames received so far, removed.
    pub fn take_frames(&self) -> Vec<Frame> {
        std::mem::take(&mut self.seen.lock().unwrap().frames)
    }

    /// Frames refused (`503`) so far, removed.
    pub fn take_refused(&self) -> Vec<Frame> {
        std::mem::take(&mut self.seen.lock().unwrap().refused)
    }

    /// How often the edge asked for a client.
    pub fn lookups(&self, id: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .lookups
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// Every lookup so far, of any id.
    pub fn total_lookups(&self) -> usize {
        self.seen.lock().unwrap().lookups.values().sum()
    }

    /// Lookups that were not signed with the edge key.
    pub fn bad_lookup_signatures(&self) -> usize {
        self.seen.lock().unwrap().bad_lookup_signatures
    }
}

fn envelope(status: StatusCode, code: ErrorCode) -> Response {
    (status, axum::Json(ErrorEnvelope::new(code, "stand-in"))).into_response()
}

async fn ingest(State(me): State<Arc<StandIn>>, body: Bytes) -> Response {
    let ring = KeyRing {
        keys: vec![edge_key()],
    };
    let mode = *me.mode.lock().unwrap();
    match mode {
        Mode::Refuse => {
            if let Ok(f) = frame::decode(&body, &ring, &FrameLimits::default()) {
                me.seen.lock().unwrap().refused.push(f);
            }
            return envelope(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Overloaded);
        }
        Mode::Stall => tokio::time::sleep(Duration::from_secs(30)).await,
        Mode::Accept => {}
    }
    match frame::decode(&body, &ring, &FrameLimits::default()) {
        Ok(f) => {
            let n = f.batch.events.len();
            me.seen.lock().unwrap().frames.push(f);
            (
                StatusCode::ACCEPTED,
                axum::Json(AcceptedResponse {
                    success: true,
                    accepted: n,
                    rejected: 0,
                    errors: Vec::new(),
                    request_id: "stand-in".into(),
                }),
            )
                .into_response()
        }
        Err(e) => envelope(StatusCode::BAD_REQUEST, e.code()),
    }
}

async fn client(
    State(me): State<Arc<StandIn>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let path = format!("/internal/v1/clients/{id}");
    let signed = signature::SignedRequest {
        method: "GET",
        path_and_query: &path,
        timestamp: h(signature::HEADER_TIMESTAMP),
        nonce: None,
        body: b"",
        signature: h(signature::HEADER_SIGNATURE),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut seen = me.seen.lock().unwrap();
    if h(signature::HEADER_KEY) != EDGE_KEY_ID
        || signature::verify(&signed, [EDGE_SECRET], now, 300).is_err()
    {
        seen.bad_lookup_signatures += 1;
        return envelope(StatusCode::UNAUTHORIZED, ErrorCode::InvalidSignature);
    }
    *seen.lookups.entry(id.clone()).or_default() += 1;
    match me.clients.get(&id) {
        // Sealed for the edge key and this lookup, as the aggregator does.
        Some(r) => {
            let ts: i64 = h(signature::HEADER_TIMESTAMP).parse().unwrap_or(0);
            let key = outpost_shared::seal::SealKey::derive(
                EDGE_SECRET,
                outpost_shared::seal::PURPOSE_CLIENT_RECORD,
            );
            let nonce: [u8; 12] = fastrand::u128(..).to_be_bytes()[..12].try_into().unwrap();
            let sealed = key.seal(
                nonce,
                &outpost_shared::seal::client_record_context(&id, ts),
                &serde_json::to_vec(r).unwrap(),
            );
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    outpost_shared::seal::SEALED_RECORD_CONTENT_TYPE,
                )],
                sealed,
            )
                .into_response()
        }
        None => envelope(StatusCode::NOT_FOUND, ErrorCode::ClientNotFound),
    }
}

/// The edge's variables for a conformance run (names as Spin spells them;
/// the Worker reads them upper-cased).
pub fn edge_variables(aggregator_url: &str) -> Vec<(&'static str, String)> {
    use base64::Engine as _;
    vec![
        ("aggregator_url", aggregator_url.to_owned()),
        ("edge_id", "conformance".into()),
        ("edge_key_id", EDGE_KEY_ID.into()),
        (
            "edge_key_secret",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(EDGE_SECRET),
        ),
        ("trusted_proxies", "127.0.0.1".into()),
        ("blocklist", "127.0.0.9, 198.51.100.0/24".into()),
        ("retry_after_secs", "7".into()),
        ("upstream_timeout_ms", "1500".into()),
    ]
}

/// Which runtime runs the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// The Spin component under `outpost edge` (wasmtime).
    Wasmtime,
    /// The Worker under `wrangler dev` (workerd).
    Workerd,
}

/// A running edge.
pub struct Edge {
    pub url: String,
    pub runtime: Runtime,
    child: Child,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Drop for Edge {
    fn drop(&mut self) {
        // SIGTERM lets wrangler stop its workerd child too.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the Spin component is (built by scripts/test with `--profile wasm`).
pub fn spin_component() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let p = target.join("wasm32-wasip2/wasm/outpost_edge_spin.wasm");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p outpost-edge-spin --target wasm32-wasip2 --profile wasm` (scripts/test does)",
        p.display()
    );
    p
}

impl Edge {
    pub async fn start(runtime: Runtime, variables: &[(&'static str, String)]) -> Edge {
        Edge::start_with_host(runtime, variables, "", "").await
    }

    /// As [`Edge::start`]; under `outpost edge`, `top` (top-level keys such
    /// as `metrics_listen`) and `tables` (`[kv]`, `[limits]`) go into the
    /// host's configuration file.
    pub async fn start_with_host(
        runtime: Runtime,
        variables: &[(&'static str, String)],
        top: &str,
        tables: &str,
    ) -> Edge {
        // `free_port` releases the port it found: another test's process can
        // bind it before the edge does. Then start again on another one.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let log = dir.path().join("edge.log");
            let out = std::fs::File::create(&log).unwrap();
            let child = match runtime {
                Runtime::Wasmtime => {
                    let mut cfg = format!(
                        "component = {:?}\nlisten = \"127.0.0.1:{port}\"\n{top}\n\n[variables]\n",
                        spin_component()
                    );
                    for (k, v) in variables {
                        cfg.push_str(&format!("{k} = {v:?}\n"));
                    }
                    cfg.push_str(tables);
                    let path = dir.path().join("edge.toml");
                    std::fs::write(&path, cfg).unwrap();
                    Command::new(outpost_bin())
                        .args(["edge", "--config"])
                        .arg(&path)
                        .stdout(Stdio::from(out.try_clone().unwrap()))
                        .stderr(Stdio::from(out))
                        .spawn()
                        .unwrap()
                }
                Runtime::Workerd => {
                    let root = repo_root();
                    let worker = root.join("build/index.js");
                    assert!(
                        worker.exists(),
                        "{} is missing: build the Worker with scripts/build-worker (scripts/test does)",
                        worker.display()
                    );
                    let mut cmd = Command::new(root.join("node_modules/.bin/wrangler"));
                    cmd.current_dir(&root)
                        .args(["dev", "--ip", "127.0.0.1", "--port", &port.to_string()])
                        .args(["--inspector-port", &free_port().to_string()])
                        .arg("--persist-to")
                        .arg(dir.path().join("state"))
                        .args([
                            "--log-level",
                            "warn",
                            "--show-interactive-dev-session=false",
                        ])
                        .env("WRANGLER_SEND_METRICS", "false")
                        .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
                        .env("WRANGLER_LOG_PATH", dir.path().join("wrangler-logs"))
                        .env("CI", "1");
                    for (k, v) in variables {
                        cmd.arg("--var")
                            .arg(format!("{}:{v}", k.to_ascii_uppercase()));
                    }
                    cmd.stdin(Stdio::null())
                        .stdout(Stdio::from(out.try_clone().unwrap()))
                        .stderr(Stdio::from(out))
                        .spawn()
                        .unwrap()
                }
            };
            let mut edge = Edge {
                url: format!("http://127.0.0.1:{port}"),
                runtime,
                child,
                _dir: dir,
                log,
            };
            if edge.wait_ready().await {
                return edge;
            }
        }
        panic!("the edge found no free port in five tries");
    }

    /// Waits until the edge serves; false when its port was taken.
    async fn wait_ready(&mut self) -> bool {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(Some(status)) = self.child.try_wait() {
                if self.log().contains("Address already in use") {
                    return false;
                }
                panic!("the edge exited ({status}):\n{}", self.log());
            }
            // Under `outpost edge`, an answer counts only once this process
            // has logged that it listens: before that it could come from
            // another test's server on the same port. (`wrangler dev` at
            // log level warn says nothing; there any answer counts.)
            let own = self.runtime == Runtime::Workerd || self.log().contains("edge listening");
            // Any answer means the runtime is serving (a misconfigured
            // edge answers 500 to everything, on purpose).
            if own
                && client
                    .get(format!("{}/ready-probe", self.url))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the edge did not start:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An HTTP client whose connections come from `from` (any 127.x
    /// address works on Linux loopback), so cases can play different
    /// peers. On Workers the peer is what Cloudflare puts in
    /// `CF-Connecting-IP`; `wrangler dev` takes it from the request.
    pub fn client_from(&self, from: IpAddr) -> reqwest::Client {
        reqwest::Client::builder()
            .local_address(from)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }

    pub fn addr(&self) -> SocketAddr {
        self.url.trim_start_matches("http://").parse().unwrap()
    }
}
