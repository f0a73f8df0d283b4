//! The aggregator's ingest decoder on arbitrary bytes. The first byte picks
//! whether the input is used as a whole frame (mostly stopped by the MAC) or
//! as a body that gets correctly signed, so the fuzzer reaches the body
//! decoder, the decompressor and the event conversion behind the MAC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::client::Secret;
use outpost_shared::frame::{self, EdgeKey, FrameLimits, KeyRing};

fuzz_target!(|data: &[u8]| {
    let key = EdgeKey { id: "k-new".into(), secret: Secret::new(b"fuzz".to_vec()) };
    let ring = KeyRing { keys: vec![key] };
    let limits = FrameLimits::default();
    match data.split_first() {
        Some((0, rest)) if rest.len() >= 5 => {
            let (hdr, body) = rest.split_at(5);
            let bytes = frame::testing::raw_frame(hdr[0] & 1, u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) % 600, body, b"fuzz", &[]);
            let _ = frame::decode(&bytes, &ring, &limits);
        }
        _ => {
            let _ = frame::decode(data, &ring, &limits);
        }
    }
});
