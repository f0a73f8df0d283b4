//! The real edge component, served by the host over real TCP, against a
//! small stand-in for the aggregator.
//!
//! These tests need the built component (they fail, rather than skip, when
//! it is missing, so that CI cannot pass without running them):
//!
//! ```sh
//! cargo build -p outpost-edge-spin --target wasm32-wasip2 --profile wasm
//! OUTPOST_EDGE_COMPONENT=$TARGET/wasm32-wasip2/wasm/outpost_edge_spin.wasm \
//!     cargo test -p outpost-edge-host
//! ```
//!
//! With `OUTPOST_TEST_REDIS_URL=redis://…` the first test keeps its
//! key-value store in that Redis (under a random prefix) instead of memory.
//! The component is `$CARGO_TARGET_DIR/wasm32-wasip2/wasm/outpost_edge_spin.wasm`
//! unless `OUTPOST_EDGE_COMPONENT` names another.
//!
//! Each host compiles the component once (seconds in a debug build), so
//! the tests group their checks by host configuration.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use outpost_edge_host::{EdgeHost, HostConfig, KvConfig, Limits};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

/// 32 bytes, base64url without padding: a valid `edge_key_secret`.
const SECRET: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY";

fn component() -> PathBuf {
    // scripts/test builds it into the target dir; OUTPOST_EDGE_COMPONENT
    // points elsewhere.
    let path = std::env::var_os("OUTPOST_EDGE_COMPONENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
                .join("wasm32-wasip2/wasm/outpost_edge_spin.wasm")
        });
    assert!(
        path.is_file(),
        "{} is missing: build the edge component with \
         `cargo build -p outpost-edge-spin --target wasm32-wasip2 --profile wasm` \
         (scripts/build-edge does) or set OUTPOST_EDGE_COMPONENT",
        path.display()
    );
    path
}

/// The aggregator stand-in: records every request as `METHOD path`, and
/// answers client lookups with 404 (`slow` after 200 ms, `hang` never).
struct Aggregator {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Aggregator {
    async fn start() -> Aggregator {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = Arc::clone(&connections);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let log = Arc::clone(&log);
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let log = Arc::clone(&log);
                    async move {
                        let path = req.uri().path().to_owned();
                        log.lock().unwrap().push(format!("{} {path}", req.method()));
                        match path.as_str() {
                            "/internal/v1/clients/slow" => {
                                tokio::time::sleep(Duration::from_millis(200)).await
                            }
                            "/internal/v1/clients/hang" => std::future::pending::<()>().await,
                            _ => {}
                        }
                        let body = r#"{"success":false,"code":40402,"message":"there is no client with this id","request_id":"agg","errors":[]}"#;
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(404)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(body.as_bytes())))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Aggregator {
            url,
            seen,
            connections,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn variables(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("aggregator_url".into(), self.url.clone()),
            ("edge_id".into(), "edge-test".into()),
            ("edge_key_id".into(), "edge-key-1".into()),
            ("edge_key_secret".into(), SECRET.into()),
            ("blocklist".into(), "127.0.0.2".into()),
        ])
    }
}

/// A running host: its address, and how to stop it.
struct Edge {
    addr: SocketAddr,
    metrics: outpost_edge_host::HostMetrics,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Edge {
    async fn start(cfg: HostConfig) -> Edge {
        let started = Instant::now();
        let host = EdgeHost::new(cfg).expect("the host accepts the component");
        eprintln!("EdgeHost::new (compile + link): {:?}", started.elapsed());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = host.metrics();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(host.serve(listener, async {
            let _ = stopped.await;
        }));
        Edge {
            addr,
            metrics,
            stop: Some(stop),
            done,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(Duration::from_secs(5), self.done)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    json: serde_json::Value,
}

impl Answer {
    fn code(&self) -> u64 {
        self.json["code"].as_u64().unwrap_or(0)
    }

    fn message(&self) -> &str {
        self.json["message"].as_str().unwrap_or("")
    }
}

/// One HTTP/1.1 request on a fresh connection, optionally from a given
/// local address (the whole of 127/8 is loopback on Linux).
async fn send(
    edge: SocketAddr,
    from: Option<&str>,
    req: http::request::Builder,
    body: &'static str,
) -> Answer {
    let stream = match from {
        Some(ip) => {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            socket.connect(edge).await.unwrap()
        }
        None => TcpStream::connect(edge).await.unwrap(),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = req
        .header("host", edge.to_string())
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        json: serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes))),
    }
}

fn get(path: &str) -> http::request::Builder {
    http::Request::get(path)
}

fn post_batch(path: &str) -> http::request::Builder {
    http::Request::post(path).header("content-type", "application/json")
}

const BATCH: &str =
    r#"{"batch":[{"event_id":"0192f0c1-7b3a-7cc2-9a57-000000000001","name":"signup"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_real_component_over_http() {
    let agg = Aggregator::start().await;
    let mut cfg = HostConfig::new(component());
    cfg.variables = agg.variables();
    // With a Redis at hand the key-value checks below go through it (the
    // other tests keep the in-memory store).
    if let Ok(url) = std::env::var("OUTPOST_TEST_REDIS_URL") {
        cfg.kv = KvConfig::Redis {
            url,
            prefix: format!("outpost-test:{:016x}:", fastrand::u64(..)),
        };
    }
    let edge = Edge::start(cfg).await;

    let nope = send(edge.addr, None, get("/nope"), "").await;
    assert_eq!(nope.status, 404, "{}", nope.json);
    assert_eq!(nope.code(), 40401);
    assert_eq!(nope.json["success"], false);
    let id = nope.json["request_id"].as_str().unwrap();
    assert_eq!(nope.headers["x-request-id"], id);

    let mine = send(
        edge.addr,
        None,
        get("/nope").header("x-request-id", "trace-me-1"),
        "",
    )
    .await;
    assert_eq!(mine.json["request_id"], "trace-me-1");

    let anonymous = send(edge.addr, None, post_batch("/v1/batch"), BATCH).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.json);
    assert_eq!(anonymous.code(), 40101);

    // The client lookup goes out through the guest's wasi:http client; the
    // answer (no such client) is cached in the host's key-value store, so
    // the second request, in a fresh instance, does not ask again.
    for _ in 0..2 {
        let unknown = send(
            edge.addr,
            None,
            post_batch("/v1/batch?write_key=web-test"),
            BATCH,
        )
        .await;
        assert_eq!(unknown.status, 401, "{}", unknown.json);
        assert_eq!(unknown.code(), 40102, "{}", unknown.json);
    }
    assert_eq!(agg.seen(), ["GET /internal/v1/clients/web-test"]);

    // The block list sees the TCP peer: a forged `spin-client-addr` neither
    // hides a blocked peer nor blocks an innocent one.
    let blocked = send(
        edge.addr,
        Some("127.0.0.2"),
        post_batch("/v1/batch").header("spin-client-addr", "198.51.100.1:1"),
        BATCH,
    )
    .await;
    assert_eq!(blocked.code(), 40303, "{}", blocked.json);
    let framed = send(
        edge.addr,
        None,
        post_batch("/v1/batch").header("spin-client-addr", "127.0.0.2:1"),
        BATCH,
    )
    .await;
    assert_eq!(framed.code(), 40101, "{}", framed.json);

    let huge = send(
        edge.addr,
        None,
        post_batch("/v1/batch").header("content-length", "999999999"),
        "",
    )
    .await;
    assert_eq!(huge.status, 413);
    assert_eq!(huge.code(), 41302);

    let n = 20;
    let started = Instant::now();
    for _ in 0..n {
        assert_eq!(send(edge.addr, None, get("/nope"), "").await.status, 404);
    }
    eprintln!(
        "GET /nope over HTTP, new connection each: {:?} per request",
        started.elapsed() / n
    );

    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_edge_names_the_missing_variable() {
    let agg = Aggregator::start().await;
    let mut cfg = HostConfig::new(component());
    cfg.variables = agg.variables();
    cfg.variables.remove("edge_key_secret");
    let edge = Edge::start(cfg).await;

    let resp = send(edge.addr, None, get("/anything"), "").await;
    assert_eq!(resp.status, 500, "{}", resp.json);
    assert_eq!(resp.code(), 50001);
    assert!(resp.message().contains("edge_key_secret"), "{}", resp.json);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_stopped_with_503() {
    let agg = Aggregator::start().await;
    let mut cfg = HostConfig::new(component());
    cfg.variables = agg.variables();
    // The guest's own upstream timeout must not answer first.
    cfg.variables
        .insert("upstream_timeout_ms".into(), "30000".into());
    cfg.limits.deadline_ms = 100;
    let edge = Edge::start(cfg).await;

    // Running guest: it waits 200 ms on the aggregator, which epochs do not
    // see; when it resumes, past its deadline, its next epoch check traps.
    let started = Instant::now();
    let slow = send(
        edge.addr,
        None,
        post_batch("/v1/batch?write_key=slow"),
        BATCH,
    )
    .await;
    assert_eq!(slow.status, 503, "{}", slow.json);
    assert_eq!(slow.code(), 50302);
    assert_eq!(slow.headers["retry-after"], "1");
    assert!(slow.message().contains("ran past"), "{}", slow.json);
    assert!(started.elapsed() < Duration::from_secs(2));

    // Waiting guest: the aggregator never answers; the timer around the
    // call gives up at the deadline plus the grace.
    let started = Instant::now();
    let hung = send(
        edge.addr,
        None,
        post_batch("/v1/batch?write_key=hang"),
        BATCH,
    )
    .await;
    assert_eq!(hung.status, 503, "{}", hung.json);
    assert_eq!(hung.code(), 50302);
    assert!(hung.message().contains("still waiting"), "{}", hung.json);
    assert!(started.elapsed() < Duration::from_secs(2));

    // A deadline does not poison the host: the next request is served.
    let nope = send(edge.addr, None, get("/nope"), "").await;
    assert_eq!(nope.status, 404);
    assert_eq!(
        agg.seen(),
        [
            "GET /internal/v1/clients/slow",
            "GET /internal/v1/clients/hang"
        ]
    );
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_finding_every_instance_busy_waits_until_its_deadline_then_gets_503() {
    let agg = Aggregator::start().await;
    let mut cfg = HostConfig::new(component());
    cfg.variables = agg.variables();
    cfg.variables
        .insert("upstream_timeout_ms".into(), "30000".into());
    cfg.limits.deadline_ms = 1_000;
    cfg.limits.max_instances = 1;
    let edge = Edge::start(cfg).await;

    // The one instance: a guest waiting on an aggregator that never
    // answers, until its deadline and the grace after it.
    let addr = edge.addr;
    let hung = tokio::spawn(async move {
        send(addr, None, post_batch("/v1/batch?write_key=hang"), BATCH).await
    });
    let until = Instant::now() + Duration::from_secs(5);
    while agg.seen().is_empty() {
        assert!(
            Instant::now() < until,
            "the guest never asked the aggregator"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(metric(&edge, "outpost_edge_instances"), 1);
    // Any other request waits for it, and gives up at its own deadline.
    let started = Instant::now();
    let waiting = send(edge.addr, None, get("/nope"), "").await;
    assert_eq!(waiting.status, 503, "{}", waiting.json);
    assert_eq!(waiting.code(), 50302);
    assert!(
        waiting.message().contains("1 instances stayed busy"),
        "{}",
        waiting.json
    );
    assert_eq!(waiting.headers["retry-after"], "1");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let hung = hung.await.unwrap();
    assert_eq!(hung.status, 503, "{}", hung.json);
    assert!(hung.message().contains("still waiting"), "{}", hung.json);

    // The instance is back in the pool: the next request is served.
    let nope = send(edge.addr, None, get("/nope"), "").await;
    assert_eq!(nope.status, 404, "{}", nope.json);
    // Its slot keeps some memory, zeroed, within `keep_resident_bytes`
    // for each of the component's memories and a little for its tables.
    assert_eq!(metric(&edge, "outpost_edge_instances"), 0);
    let kept = metric(&edge, "outpost_edge_pool_resident_bytes");
    let bound = 2 * Limits::default().keep_resident_bytes as u64 + (1 << 20);
    assert!(kept > 0 && kept <= bound, "{kept} bytes kept");
    edge.shutdown().await;
}

/// The value of one unlabelled metric.
fn metric(edge: &Edge, name: &str) -> u64 {
    let text = edge.metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_on_arrival_and_slow_senders_hold_no_more() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agg = Aggregator::start().await;
    let mut cfg = HostConfig::new(component());
    cfg.variables = agg.variables();
    cfg.limits.max_connections = 2;
    let edge = Edge::start(cfg).await;

    // Two senders announce a body and send none of it: each holds a
    // connection (and would hold the body's buffer), nothing more.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(edge.addr).await.unwrap();
        s.write_all(b"POST /v1/batch?write_key=slow HTTP/1.1\r\nhost: e\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{")
            .await
            .unwrap();
        slow.push(s);
    }
    let until = Instant::now() + Duration::from_secs(5);
    while metric(&edge, "outpost_edge_connections") < 2 {
        assert!(Instant::now() < until, "the slow senders never got in");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A third connection is closed before a byte of it is read.
    let mut third = TcpStream::connect(edge.addr).await.unwrap();
    let _ = third
        .write_all(b"GET /nope HTTP/1.1\r\nhost: e\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed at once, not left waiting");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the third connection was served: {read:?}"
    );
    assert_eq!(metric(&edge, "outpost_edge_connections_refused_total"), 1);
    assert_eq!(metric(&edge, "outpost_edge_connections"), 2);

    // One sender gives up: its slot is free again for a real client.
    drop(slow.pop());
    let until = Instant::now() + Duration::from_secs(5);
    while metric(&edge, "outpost_edge_connections") > 1 {
        assert!(
            Instant::now() < until,
            "the closed connection kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let nope = send(edge.addr, None, get("/nope"), "").await;
    assert_eq!(nope.status, 404, "{}", nope.json);
    drop(slow);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_come_and_go_but_connections_to_the_aggregator_are_kept_alive() {
    let agg = Aggregator::start().await;
    let mut cfg = HostConfig::new(component());
    cfg.variables = agg.variables();
    // And with nothing kept resident, each instance's memory goes back.
    cfg.limits.keep_resident_bytes = 0;
    let edge = Edge::start(cfg).await;
    // Each request asks the aggregator for another (unknown) client.
    for id in ["pool-a", "pool-b", "pool-c", "pool-d"] {
        let r = send(
            edge.addr,
            None,
            post_batch(&format!("/v1/batch?write_key={id}")).header("origin", "https://x.example"),
            BATCH,
        )
        .await;
        assert_eq!(r.code(), 40102, "{}", r.json);
    }
    let lookups = agg
        .seen()
        .iter()
        .filter(|s| s.starts_with("GET /internal/v1/clients/pool-"))
        .count();
    assert_eq!(lookups, 4);
    assert_eq!(
        agg.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "four requests from four instances should share one kept-alive connection"
    );
    assert_eq!(metric(&edge, "outpost_edge_pool_resident_bytes"), 0);
    edge.shutdown().await;
}
