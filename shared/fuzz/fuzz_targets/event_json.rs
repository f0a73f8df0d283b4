//! The edge's request parser on arbitrary bytes, as a batch and as one event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::sample::SAMPLE_NOW;
use outpost_shared::validate::{Limits, parse_batch, parse_event};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(out) = parse_batch(data, &limits, SAMPLE_NOW) {
        // Whatever was accepted must serialize and re-validate.
        for mut e in out.accepted {
            let json = serde_json::to_string(&e).expect("events serialize");
            assert!(parse_event(json.as_bytes(), &limits, SAMPLE_NOW).is_ok(), "accepted event does not re-parse: {json}");
            let _ = outpost_shared::validate::validate_event(&mut e, &limits, SAMPLE_NOW);
        }
    }
    let _ = parse_event(data, &limits, SAMPLE_NOW);
});
