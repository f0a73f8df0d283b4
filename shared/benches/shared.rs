//! Hot paths of the shared rules: what the edge does per request and the
//! aggregator per batch. Run with `cargo bench -p outpost-shared`; results
//! and the machine they came from are in BENCHMARKS.md.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use outpost_shared::auth::signature::{self, SignedRequest};
use outpost_shared::client::Secret;
use outpost_shared::frame::{self, BatchId, EdgeKey, FrameLimits, FrameMeta, KeyRing};
use outpost_shared::sample::{SAMPLE_NOW, batch_request_json, typical_batch};
use outpost_shared::validate::{Limits, parse_batch};

fn benches(c: &mut Criterion) {
    let batch = typical_batch(100);
    let json = batch_request_json(&batch.events);
    let key = EdgeKey {
        id: "k1".into(),
        secret: Secret::new(b"edge-secret-edge-secret".to_vec()),
    };
    let ring = KeyRing {
        keys: vec![key.clone()],
    };

    let mut g = c.benchmark_group("hmac");
    g.throughput(Throughput::Bytes(json.len() as u64));
    let now = SAMPLE_NOW.millis() / 1000;
    let sig = signature::sign(
        b"client-secret",
        "POST",
        "/v1/batch",
        now,
        Some("n1"),
        json.as_bytes(),
    );
    let ts = now.to_string();
    g.bench_function("verify_100_event_body", |b| {
        b.iter(|| {
            let req = SignedRequest {
                method: "POST",
                path_and_query: "/v1/batch",
                timestamp: &ts,
                nonce: Some("n1"),
                body: black_box(json.as_bytes()),
                signature: &sig,
            };
            signature::verify(&req, [&b"client-secret"[..]], now, 300).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("validate");
    g.throughput(Throughput::Elements(100));
    g.bench_function("parse_batch_100_events", |b| {
        b.iter(|| parse_batch(black_box(json.as_bytes()), &Limits::default(), SAMPLE_NOW).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(100));
    for (label, compress) in [("deflate", true), ("plain", false)] {
        let meta = FrameMeta {
            edge_id: "cf-fra",
            batch_id: BatchId([7; 16]),
            created_at: SAMPLE_NOW,
            compress,
        };
        let bytes = frame::encode(&meta, &batch, &key).unwrap();
        eprintln!(
            "frame size ({label}): {} bytes for 100 events; JSON request {} bytes; ratio {:.3}",
            bytes.len(),
            json.len(),
            bytes.len() as f64 / json.len() as f64
        );
        g.bench_function(format!("encode_100_events_{label}"), |b| {
            b.iter(|| frame::encode(&meta, black_box(&batch), &key).unwrap())
        });
        g.bench_function(format!("decode_100_events_{label}"), |b| {
            b.iter(|| frame::decode(black_box(&bytes), &ring, &FrameLimits::default()).unwrap())
        });
    }
    g.finish();
}

criterion_group!(shared, benches);
criterion_main!(shared);
