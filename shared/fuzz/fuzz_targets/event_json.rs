//! The edge's request parser on arbitrary bytes, as a batch and as one
//! event. The batch is read both ways (one pass for valid batches, event by
//! event for the rest): the answers must be the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::sample::SAMPLE_NOW;
use outpost_shared::validate::{Limits, parse_batch, parse_batch_by_event, parse_event};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let batch = parse_batch(data, &limits, SAMPLE_NOW);
    assert_eq!(batch, parse_batch_by_event(data, &limits, SAMPLE_NOW), "the two readings differ");
    if let Ok(out) = batch {
        // Whatever was accepted must serialize and re-validate.
        for mut e in out.accepted {
            let json = serde_json::to_string(&e).expect("events serialize");
            assert!(parse_event(json.as_bytes(), &limits, SAMPLE_NOW).is_ok(), "accepted event does not re-parse: {json}");
            let _ = outpost_shared::validate::validate_event(&mut e, &limits, SAMPLE_NOW);
        }
    }
    let _ = parse_event(data, &limits, SAMPLE_NOW);
});
