use super::testing::raw_frame;
use super::*;
use crate::event::{Context, Kind, Level, Priority};
use crate::sample::{SAMPLE_NOW, typical_batch};
use proptest::prelude::*;

fn key(id: &str, secret: &[u8]) -> EdgeKey {
    EdgeKey {
        id: id.into(),
        secret: Secret::new(secret.to_vec()),
    }
}

fn meta(compress: bool) -> FrameMeta<'static> {
    FrameMeta {
        edge_id: "cf-prod",
        batch_id: BatchId([9; 16]),
        created_at: SAMPLE_NOW,
        compress,
    }
}

fn ring() -> KeyRing {
    KeyRing {
        keys: vec![key("k-old", b"old-secret"), key("k-new", b"new-secret")],
    }
}

#[test]
fn encode_then_decode_is_identity_with_and_without_compression() {
    let batch = typical_batch(100);
    for compress in [false, true] {
        let bytes = encode(&meta(compress), &batch, &key("k-new", b"new-secret")).unwrap();
        let frame = decode(&bytes, &ring(), &FrameLimits::default()).unwrap();
        assert_eq!(frame.batch, batch);
        assert_eq!(frame.header.edge_id, "cf-prod");
        assert_eq!(frame.header.key_id, "k-new");
        assert_eq!(frame.header.batch_id, BatchId([9; 16]));
        assert_eq!(frame.header.created_at, SAMPLE_NOW);
        assert_eq!(frame.header.event_count, 100);
        assert_eq!(frame.header.flags & FLAG_DEFLATE != 0, compress);
    }
}

#[test]
fn frame_is_at_most_a_third_of_the_json() {
    let batch = typical_batch(100);
    let json = crate::sample::batch_request_json(&batch.events);
    let bytes = encode(&meta(true), &batch, &key("k", b"s")).unwrap();
    assert!(
        bytes.len() * 3 <= json.len(),
        "frame {} bytes vs JSON {} bytes",
        bytes.len(),
        json.len()
    );
}

#[test]
fn any_key_of_the_ring_verifies_and_others_do_not() {
    let batch = typical_batch(2);
    let old = encode(&meta(false), &batch, &key("k-old", b"old-secret")).unwrap();
    assert!(decode(&old, &ring(), &FrameLimits::default()).is_ok());
    let unknown = encode(&meta(false), &batch, &key("k-gone", b"old-secret")).unwrap();
    assert_eq!(
        decode(&unknown, &ring(), &FrameLimits::default()),
        Err(FrameError::BadSignature)
    );
    let wrong_secret = encode(&meta(false), &batch, &key("k-new", b"old-secret")).unwrap();
    assert_eq!(
        decode(&wrong_secret, &ring(), &FrameLimits::default()),
        Err(FrameError::BadSignature)
    );
}

#[test]
fn spooled_frames_decode_without_the_key_that_signed_them() {
    let batch = typical_batch(3);
    let bytes = encode(&meta(true), &batch, &key("k-retired", b"gone")).unwrap();
    assert_eq!(
        decode(&bytes, &ring(), &FrameLimits::default()),
        Err(FrameError::BadSignature)
    );
    assert_eq!(
        decode_verified(&bytes, &FrameLimits::default())
            .unwrap()
            .batch,
        batch
    );
}

#[test]
fn every_flipped_byte_is_detected() {
    let bytes = encode(&meta(true), &typical_batch(3), &key("k-new", b"new-secret")).unwrap();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        assert!(
            decode(&bad, &ring(), &FrameLimits::default()).is_err(),
            "flip at {i} went unnoticed"
        );
    }
}

#[test]
fn truncation_at_every_length_is_an_error() {
    let bytes = encode(
        &meta(false),
        &typical_batch(2),
        &key("k-new", b"new-secret"),
    )
    .unwrap();
    for n in 0..bytes.len() {
        let err = decode(&bytes[..n], &ring(), &FrameLimits::default()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedFrame, "cut at {n}: {err}");
    }
}

#[test]
fn bounds_are_enforced() {
    let batch = typical_batch(20);
    let k = key("k-new", b"new-secret");
    let plain = encode(&meta(false), &batch, &k).unwrap();
    let packed = encode(&meta(true), &batch, &k).unwrap();
    let limits = FrameLimits {
        max_frame_bytes: plain.len() - 1,
        ..FrameLimits::default()
    };
    assert_eq!(
        decode(&plain, &ring(), &limits),
        Err(FrameError::TooLarge(plain.len() - 1))
    );
    let limits = FrameLimits {
        max_events: 19,
        ..FrameLimits::default()
    };
    assert_eq!(
        decode(&plain, &ring(), &limits),
        Err(FrameError::TooManyEvents(20))
    );
    // A compressed body that inflates past the bound is refused (zip bomb).
    let limits = FrameLimits {
        max_body_bytes: 1000,
        ..FrameLimits::default()
    };
    assert_eq!(
        decode(&packed, &ring(), &limits),
        Err(FrameError::BodyTooLarge(1000))
    );
    assert_eq!(
        decode(&plain, &ring(), &limits),
        Err(FrameError::BodyTooLarge(1000))
    );
}

#[test]
fn a_signed_zip_bomb_is_refused_without_inflating_it() {
    // 64 MiB of zeros deflates to ~64 KiB; even correctly signed it must not
    // be inflated past the limit.
    let zeros = vec![0u8; 64 << 20];
    let bomb = miniz_oxide::deflate::compress_to_vec(&zeros, 10);
    let bytes = raw_frame(FLAG_DEFLATE, 1, &bomb, b"new-secret", &[]);
    assert_eq!(
        decode(&bytes, &ring(), &FrameLimits::default()),
        Err(FrameError::BodyTooLarge(2 * 1024 * 1024))
    );
}

#[test]
fn version_magic_and_flags_are_checked() {
    let bytes = encode(
        &meta(false),
        &typical_batch(1),
        &key("k-new", b"new-secret"),
    )
    .unwrap();
    let mut v2 = bytes.clone();
    v2[4] = 2;
    assert_eq!(
        decode(&v2, &ring(), &FrameLimits::default()),
        Err(FrameError::UnsupportedVersion(2))
    );
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert_eq!(
        decode(&magic, &ring(), &FrameLimits::default()),
        Err(FrameError::Malformed("bad magic"))
    );
    let mut flags = bytes.clone();
    flags[5] = 0x80;
    assert_eq!(
        decode(&flags, &ring(), &FrameLimits::default()),
        Err(FrameError::Malformed("unknown flags"))
    );
}

#[test]
fn a_count_that_disagrees_with_the_body_is_refused() {
    let body = wire::Body::from_batch(&typical_batch(2))
        .unwrap()
        .encode_to_vec();
    let bytes = raw_frame(0, 3, &body, b"new-secret", &[]);
    assert!(matches!(
        decode(&bytes, &ring(), &FrameLimits::default()),
        Err(FrameError::BadBody(_))
    ));
}

#[test]
fn header_fields_appended_by_a_newer_writer_are_skipped() {
    let batch = typical_batch(2);
    let body = wire::Body::from_batch(&batch).unwrap().encode_to_vec();
    let bytes = raw_frame(0, 2, &body, b"new-secret", b"\x07future");
    let frame = decode(&bytes, &ring(), &FrameLimits::default()).unwrap();
    assert_eq!(frame.batch, batch);
}

/// What a newer writer might send: the same messages with extra fields.
mod newer {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Body {
        #[prost(string, tag = "1")]
        pub client_id: String,
        #[prost(message, optional, tag = "2")]
        pub facts: Option<super::wire::Facts>,
        #[prost(message, repeated, tag = "3")]
        pub events: Vec<Event>,
        #[prost(string, optional, tag = "99")]
        pub region: Option<String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(string, tag = "1")]
        pub event_id: String,
        #[prost(int64, tag = "2")]
        pub timestamp_ms: i64,
        #[prost(string, optional, tag = "4")]
        pub name: Option<String>,
        #[prost(double, optional, tag = "16")]
        pub sample_rate: Option<f64>,
        #[prost(message, optional, tag = "17")]
        pub geo: Option<Geo>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Geo {
        #[prost(string, tag = "1")]
        pub city: String,
    }
}

#[test]
fn an_older_reader_ignores_fields_a_newer_writer_added() {
    let newer = newer::Body {
        client_id: "acme-web".into(),
        facts: Some(wire::Facts {
            received_at_ms: SAMPLE_NOW.millis(),
            ..Default::default()
        }),
        events: vec![newer::Event {
            event_id: "0192f0c1-7b3a-7cc2-9a57-000000000001".into(),
            timestamp_ms: SAMPLE_NOW.millis(),
            name: Some("signup".into()),
            sample_rate: Some(0.5),
            geo: Some(newer::Geo {
                city: "Zürich".into(),
            }),
        }],
        region: Some("eu".into()),
    };
    let bytes = raw_frame(0, 1, &newer.encode_to_vec(), b"new-secret", &[]);
    let frame = decode(&bytes, &ring(), &FrameLimits::default()).unwrap();
    assert_eq!(frame.batch.client_id, "acme-web");
    let e = &frame.batch.events[0];
    assert_eq!(e.name.as_deref(), Some("signup"));
    assert_eq!(e.kind, Kind::Event);
    assert_eq!(e.timestamp, Some(SAMPLE_NOW));
}

#[test]
fn invalid_trace_ids_are_refused_by_the_encoder_not_mangled() {
    let mut batch = typical_batch(1);
    batch.events[0].trace_id = Some("z".repeat(32));
    assert!(matches!(
        encode(&meta(false), &batch, &key("k", b"s")),
        Err(FrameError::Encode(_))
    ));
}

#[test]
fn ids_of_the_wrong_length_are_refused_by_the_encoder() {
    let long = "e".repeat(65);
    let m = FrameMeta {
        edge_id: &long,
        ..meta(false)
    };
    assert!(matches!(
        encode(&m, &typical_batch(1), &key("k", b"s")),
        Err(FrameError::Encode(_))
    ));
    assert!(matches!(
        encode(&meta(false), &typical_batch(1), &key("", b"s")),
        Err(FrameError::Encode(_))
    ));
}

#[test]
fn batch_id_displays_as_a_uuid() {
    assert_eq!(
        BatchId([0xab; 16]).to_string(),
        "abababab-abab-abab-abab-abababababab"
    );
}

fn arb_opt_string() -> impl Strategy<Value = Option<String>> {
    prop::option::of(".{0,24}")
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        ".{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

prop_compose! {
    fn arb_event()(
        id in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        ts in any::<i64>(),
        log in any::<bool>(),
        name in arb_opt_string(),
        message in arb_opt_string(),
        level in prop::option::of(prop::sample::select(Level::ALL.to_vec())),
        user_id in arb_opt_string(),
        anonymous_id in arb_opt_string(),
        session_id in arb_opt_string(),
        props in prop::collection::btree_map("[a-z_]{1,8}", arb_json(), 0..5),
        ctx in prop::collection::vec(arb_opt_string(), 8),
        trace in prop::option::of("[0-9a-f]{32}"),
        span in prop::option::of("[0-9a-f]{16}"),
        seq in prop::option::of(any::<u64>()),
        high in any::<bool>(),
    ) -> Event {
        Event {
            event_id: id.into(),
            timestamp: Some(Timestamp(ts)),
            kind: if log { Kind::Log } else { Kind::Event },
            name, message, level, user_id, anonymous_id, session_id,
            properties: props.into_iter().collect::<serde_json::Map<_, _>>().into(),
            context: Context {
                app_version: ctx[0].clone(), platform: ctx[1].clone(), device_model: ctx[2].clone(), os: ctx[3].clone(),
                os_version: ctx[4].clone(), locale: ctx[5].clone(), library_name: ctx[6].clone(), library_version: ctx[7].clone(),
            },
            trace_id: trace, span_id: span, seq,
            priority: if high { Priority::High } else { Priority::Normal },
        }
    }
}

prop_compose! {
    fn arb_batch()(
        client_id in "[a-z0-9-]{1,20}",
        ip in arb_opt_string(), ua in arb_opt_string(), pop in arb_opt_string(), country in arb_opt_string(), origin in arb_opt_string(),
        received in any::<i64>(),
        events in prop::collection::vec(arb_event(), 0..12),
        sent_at in prop::option::of(any::<i64>()),
    ) -> Batch {
        Batch {
            client_id: client_id.into(),
            facts: EdgeFacts { client_ip: ip, user_agent: ua, received_at: Timestamp(received), pop, country_hint: country, origin },
            events,
            sent_at: sent_at.map(Timestamp),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn prop_encode_decode_is_identity(batch in arb_batch(), compress in any::<bool>(), created in any::<i64>(), id in any::<[u8; 16]>()) {
        let m = FrameMeta { edge_id: "edge", batch_id: BatchId(id), created_at: Timestamp(created), compress };
        let bytes = encode(&m, &batch, &key("k-new", b"new-secret")).unwrap();
        let frame = decode(&bytes, &ring(), &FrameLimits { max_frame_bytes: usize::MAX, max_body_bytes: usize::MAX, max_events: u32::MAX }).unwrap();
        prop_assert_eq!(frame.batch, batch);
        prop_assert_eq!(frame.header.batch_id, BatchId(id));
        prop_assert_eq!(frame.header.created_at, Timestamp(created));
    }

    #[test]
    fn prop_the_body_writer_writes_what_the_derive_writes(mut batch in arb_batch()) {
        // Unvalidated events without a timestamp too: both take the arrival time.
        for e in batch.events.iter_mut().step_by(3) {
            e.timestamp = None;
        }
        let mut written = Vec::new();
        wire::write_body(&batch, &mut written).unwrap();
        prop_assert_eq!(written, wire::Body::from_batch(&batch).unwrap().encode_to_vec());
    }

    #[test]
    fn prop_decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes, &ring(), &FrameLimits::default());
    }

    #[test]
    fn prop_decode_never_panics_on_mutated_frames(pos in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&meta(true), &typical_batch(5), &key("k-new", b"new-secret")).unwrap();
        let mut bad = bytes.clone();
        let i = pos.index(bad.len());
        bad[i] = val;
        let _ = decode(&bad, &ring(), &FrameLimits::default());
        let _ = decode(&bytes[..cut.index(bytes.len())], &ring(), &FrameLimits::default());
    }
}

/// With a key the attacker knows, the body decoder itself must survive
/// anything: this signs arbitrary bodies so the fuzzing reaches past the MAC.
mod signed_garbage {
    use super::*;
    proptest! {
        #[test]
        fn prop_body_decoder_never_panics(body in prop::collection::vec(any::<u8>(), 0..1024), count in 0u32..8, deflate in any::<bool>()) {
            let flags = if deflate { FLAG_DEFLATE } else { 0 };
            let bytes = raw_frame(flags, count, &body, b"new-secret", &[]);
            let _ = decode(&bytes, &ring(), &FrameLimits::default());
        }
    }
}
