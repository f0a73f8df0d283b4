//! The distinct-user sketches the aggregator reads back from PostgreSQL
//! (`user_sketches.registers`), on arbitrary bytes: no panics; what is
//! accepted writes back the same bytes, estimates a finite count, and
//! merging it into itself changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_aggregator::sinks::postgres::hll::Sketch;

fuzz_target!(|data: &[u8]| {
    if let Ok(sketch) = Sketch::decode(data) {
        let estimate = sketch.estimate();
        assert!(estimate.is_finite() && estimate >= 0.0);
        let mut twice = sketch.clone();
        twice.merge(&sketch);
        assert_eq!(twice.estimate(), estimate);
        assert_eq!(Sketch::decode(&sketch.encode()).map(|s| s.estimate()), Ok(estimate));
    }
});
