//! The edge's body path on arbitrary bytes: the first byte picks the
//! content encoding (none, gzip, other), then the decoded body goes to the
//! batch parser and the single-event parser, with the edge's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_edge::body;
use outpost_shared::sample::SAMPLE_NOW;
use outpost_shared::validate::{Limits, parse_batch, parse_event};

fuzz_target!(|data: &[u8]| {
    let Some((first, raw)) = data.split_first() else { return };
    let encoding = match first % 3 {
        0 => None,
        1 => Some("gzip"),
        _ => Some("br"),
    };
    let limits = Limits { max_body_bytes: 64 * 1024, ..Limits::default() };
    if raw.len() > body::max_wire_bytes(limits.max_body_bytes) {
        return;
    }
    if let Ok(decoded) = body::decode(encoding, raw, limits.max_body_bytes) {
        assert!(decoded.len() <= limits.max_body_bytes);
        let _ = parse_batch(&decoded, &limits, SAMPLE_NOW);
        let _ = parse_event(&decoded, &limits, SAMPLE_NOW);
    }
});
