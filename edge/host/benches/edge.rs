//! The edge's cost per request, measured on the real Spin component under
//! this host (build the component first: `./scripts/build-edge spin`).
//!
//! * `hmac_batch_100`: one `POST /v1/batch` of 100 typical events (the
//!   `shared` benches' sample, 59 KB), HMAC-signed,
//!   through `EdgeHost::handle` in-process — a fresh instance, the guest's
//!   whole pipeline (parse, verify, rate limit in KV, encode and sign the
//!   frame) and the forward to a local stand-in aggregator over loopback.
//! * `hmac_batch_100_refused`: the same with a wrong signature — parsed and
//!   verified, then refused: no KV, no frame, no forward.
//! * `write_key_batch_100`: the same batch as a browser sends it, under a
//!   public write key from an allowed origin (no signature to check).
//! * `not_found`: the smallest request (instantiate, read the settings,
//!   answer 404): the floor under every request.
//! * `http_concurrent/N`: 200 batches over real HTTP connections to the
//!   served host, N at a time — requests/s of the local host are
//!   200 / the reported time.
//!
//! `cargo bench -p outpost-edge-host --bench edge`; numbers in BENCHMARKS.md.
//! `OUTPOST_EDGE_COMPONENT` picks another component,
//! `BENCH_KEEP_RESIDENT_BYTES` another `limits.keep_resident_bytes`, and
//! `OUTPOST_EDGE_PERFMAP=1` lets `perf` name the guest's functions.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use outpost_edge_host::{EdgeHost, HostConfig};
use outpost_shared::auth::permission::Permissions;
use outpost_shared::auth::signature;
use outpost_shared::client::{AuthMethod, ClientRecord, Credential, KeyMaterial, Secret};
use outpost_shared::seal::{
    PURPOSE_CLIENT_RECORD, SEALED_RECORD_CONTENT_TYPE, SealKey, client_record_context,
};
use tokio::net::TcpListener;

const EDGE_SECRET: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY";
/// `EDGE_SECRET` decoded (base64url).
const EDGE_SECRET_BYTES: &[u8] = b"0123456789abcdef0123456789abcdef";
const CLIENT_SECRET: &[u8] = b"bench-client-hmac-secret";
const WRITE_KEY: &str = "web-bench";
const ORIGIN: &str = "https://shop.example";

fn component() -> PathBuf {
    std::env::var_os("OUTPOST_EDGE_COMPONENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
                .join("wasm32-wasip2/wasm/outpost_edge_spin.wasm")
        })
}

/// The host's defaults, but for `BENCH_KEEP_RESIDENT_BYTES` (`=0` compares
/// with every page given back after each request).
fn host_config() -> HostConfig {
    let mut cfg = HostConfig::new(component());
    if let Some(n) = std::env::var("BENCH_KEEP_RESIDENT_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.limits.keep_resident_bytes = n;
    }
    cfg
}

/// A stand-in aggregator: the HMAC client record, and `202` for every frame.
async fn stand_in() -> String {
    let record = ClientRecord {
        id: "server".into(),
        name: "bench".into(),
        method: AuthMethod::Hmac,
        credentials: vec![Credential {
            key: KeyMaterial::HmacSecret {
                secret: Secret::new(CLIENT_SECRET.to_vec()),
            },
            not_after: None,
        }],
        jwt: None,
        permissions: Permissions::parse(["write:events"]).unwrap(),
        rate_limit: None,
        ip_rate_limit: None,
        allowed_origins: Vec::new(),
        active: true,
        expires_at: None,
    };
    // A browser's client: a public write key, from one allowed origin.
    let web = ClientRecord {
        id: WRITE_KEY.into(),
        method: AuthMethod::WriteKey,
        credentials: Vec::new(),
        allowed_origins: vec![ORIGIN.into()],
        ..record.clone()
    };
    // Sealed per lookup, as the aggregator does: under a key derived from
    // the edge key, bound to the client id and the lookup's timestamp.
    let record = Bytes::from(serde_json::to_vec(&record).unwrap());
    let web = Bytes::from(serde_json::to_vec(&web).unwrap());
    let seal_key = std::sync::Arc::new(SealKey::derive(EDGE_SECRET_BYTES, PURPOSE_CLIENT_RECORD));
    let nonces = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let accepted = Bytes::from_static(
        br#"{"success":true,"accepted":100,"rejected":0,"errors":[],"request_id":"agg"}"#,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (record, web, accepted) = (record.clone(), web.clone(), accepted.clone());
            let (seal_key, nonces) = (seal_key.clone(), nonces.clone());
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (record, web, accepted) = (record.clone(), web.clone(), accepted.clone());
                    let (seal_key, nonces) = (seal_key.clone(), nonces.clone());
                    async move {
                        let lookup = req.uri().path().starts_with("/internal/").then(|| {
                            let ts = req
                                .headers()
                                .get(signature::HEADER_TIMESTAMP)
                                .and_then(|v| v.to_str().ok()?.parse::<i64>().ok())
                                .unwrap_or(0);
                            (req.uri().path().ends_with(WRITE_KEY), ts)
                        });
                        let _ = req.into_body().collect().await;
                        let (status, content_type, body) = match lookup {
                            Some((is_web, ts)) => {
                                let n = nonces.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let mut nonce = [0u8; 12];
                                nonce[..8].copy_from_slice(&n.to_le_bytes());
                                let (id, plain) = if is_web {
                                    (WRITE_KEY, &web)
                                } else {
                                    ("server", &record)
                                };
                                let sealed =
                                    seal_key.seal(nonce, &client_record_context(id, ts), plain);
                                (200, SEALED_RECORD_CONTENT_TYPE, Bytes::from(sealed))
                            }
                            None => (202, "application/json", accepted),
                        };
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", content_type)
                                .body(Full::new(body))
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
    url
}

/// The shared benches' typical batch (100 web events, 59 KB of JSON), with
/// timestamps moved to now so that the edge accepts them.
fn batch_100() -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut events = outpost_shared::sample::typical_events(100);
    for (i, e) in events.iter_mut().enumerate() {
        e.timestamp = Some(outpost_shared::event::Timestamp(
            now - 60_000 + i as i64 * 37,
        ));
    }
    serde_json::to_vec(&serde_json::json!({ "batch": events })).unwrap()
}

/// A signed `POST /v1/batch` (no nonce, so it can be sent again and again
/// within the signature window).
fn signed_request(body: &[u8]) -> http::Request<Full<Bytes>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sig = signature::sign(CLIENT_SECRET, "POST", "/v1/batch", now, None, body);
    http::Request::builder()
        .method("POST")
        .uri("/v1/batch")
        .header("content-type", "application/json")
        .header(signature::HEADER_KEY, "server")
        .header(signature::HEADER_TIMESTAMP, now.to_string())
        .header(signature::HEADER_SIGNATURE, sig)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = rt.block_on(stand_in());
    let vars = BTreeMap::from([
        ("aggregator_url".to_owned(), url),
        ("edge_key_id".to_owned(), "bench".to_owned()),
        ("edge_key_secret".to_owned(), EDGE_SECRET.to_owned()),
        // Thousands of requests from one address: the per-address limit
        // would answer most of them 429 before the pipeline runs.
        ("ip_requests_per_minute".to_owned(), "0".to_owned()),
    ]);
    let mut cfg = host_config();
    cfg.variables = vars;
    let started = Instant::now();
    let host = std::sync::Arc::new(EdgeHost::new(cfg).expect("build the component first"));
    eprintln!("component compile + link: {:?}", started.elapsed());
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let body = batch_100();
    eprintln!("batch body: {} bytes", body.len());

    // The answer must be the real thing, or the timing means nothing.
    let resp = rt.block_on(host.handle(signed_request(&body), peer));
    assert_eq!(resp.status(), 202, "{resp:?}");

    c.bench_function("edge/hmac_batch_100", |b| {
        b.to_async(&rt)
            .iter(|| host.handle(signed_request(&body), peer))
    });
    // And still after thousands of them (no limit kicked in).
    let resp = rt.block_on(host.handle(signed_request(&body), peer));
    assert_eq!(resp.status(), 202, "{resp:?}");
    // The same batch with a wrong signature: parsed and verified, then
    // refused — no KV, no frame, no forward. The difference to the above is
    // the frame and the round trip to the aggregator.
    assert_eq!(
        rt.block_on(host.handle(
            {
                let (mut parts, b) = signed_request(&body).into_parts();
                parts.headers.insert(
                    signature::HEADER_SIGNATURE,
                    http::HeaderValue::from_static("00"),
                );
                http::Request::from_parts(parts, b)
            },
            peer
        ))
        .status(),
        401
    );
    c.bench_function("edge/hmac_batch_100_refused", |b| {
        b.to_async(&rt).iter(|| {
            let (mut parts, body) = signed_request(&body).into_parts();
            parts.headers.insert(
                signature::HEADER_SIGNATURE,
                http::HeaderValue::from_static("00"),
            );
            host.handle(http::Request::from_parts(parts, body), peer)
        })
    });
    // What a browser sends: the same batch under a public write key, from
    // an allowed origin — no signature, so no SHA-256 of the body.
    let from_browser = || {
        http::Request::builder()
            .method("POST")
            .uri(format!("/v1/batch?write_key={WRITE_KEY}"))
            .header("content-type", "application/json")
            .header("origin", ORIGIN)
            .body(Full::new(Bytes::copy_from_slice(&body)))
            .unwrap()
    };
    let resp = rt.block_on(host.handle(from_browser(), peer));
    assert_eq!(resp.status(), 202, "{resp:?}");
    c.bench_function("edge/write_key_batch_100", |b| {
        b.to_async(&rt).iter(|| host.handle(from_browser(), peer))
    });
    let resp = rt.block_on(host.handle(from_browser(), peer));
    assert_eq!(resp.status(), 202, "{resp:?}");
    c.bench_function("edge/not_found", |b| {
        b.to_async(&rt).iter(|| {
            host.handle(
                http::Request::get("/nope")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
                peer,
            )
        })
    });

    // Served over HTTP: the same request from several connections at once.
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let served = EdgeHost::new({
        let mut cfg = host_config();
        cfg.variables = BTreeMap::from([
            ("aggregator_url".to_owned(), rt.block_on(stand_in())),
            ("edge_key_id".to_owned(), "bench".to_owned()),
            ("edge_key_secret".to_owned(), EDGE_SECRET.to_owned()),
            ("ip_requests_per_minute".to_owned(), "0".to_owned()),
        ]);
        cfg
    })
    .unwrap();
    rt.spawn(served.serve(listener, std::future::pending()));
    let mut group = c.benchmark_group("edge/http_concurrent");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    for concurrency in [1usize, 4, 16] {
        group.bench_function(format!("{concurrency}x200"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let body = body.clone();
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let tasks: Vec<_> = (0..concurrency)
                            .map(|t| {
                                let body = body.clone();
                                tokio::spawn(async move {
                                    let stream =
                                        tokio::net::TcpStream::connect(addr).await.unwrap();
                                    let (mut send, conn) =
                                        hyper::client::conn::http1::handshake(TokioIo::new(stream))
                                            .await
                                            .unwrap();
                                    tokio::spawn(conn);
                                    let n = 200 / concurrency + usize::from(t < 200 % concurrency);
                                    for _ in 0..n {
                                        let mut req = signed_request(&body);
                                        req.headers_mut()
                                            .insert("host", http::HeaderValue::from_static("edge"));
                                        let resp = send.send_request(req).await.unwrap();
                                        assert_eq!(resp.status(), 202);
                                        let _ = resp.into_body().collect().await;
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    }
                    start.elapsed()
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
