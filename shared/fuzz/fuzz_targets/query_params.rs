//! The read API's query-string parsing (`/v1/events`, `/v1/stats`) on
//! arbitrary query strings, as the aggregator decodes them: no panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(query) = std::str::from_utf8(data) {
        outpost_aggregator::read_api::fuzz_query_string(query);
    }
});
