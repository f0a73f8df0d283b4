//! Typical events, for benchmarks, tests, fuzz seeds and documentation.
//! Deterministic: the same `n` always gives the same events.

use serde_json::json;

use crate::event::{Context, EdgeFacts, Event, Kind, Level, Priority, Timestamp};
use crate::frame::Batch;

/// 2026-11-26T14:00:00Z, the time the samples are set at.
pub const SAMPLE_NOW: Timestamp = Timestamp(1_795_701_600_000);

/// `n` events shaped like a web app's traffic: page views, clicks with a
/// handful of properties, the occasional log line, one shared context.
pub fn typical_events(n: usize) -> Vec<Event> {
    const NAMES: [&str; 5] = ["page_view", "click", "add_to_cart", "search", "checkout"];
    (0..n)
        .map(|i| {
            let mut e = Event::new_event(
                format!("0192f0c1-7b3a-7cc2-9a57-{i:012x}"),
                NAMES[i % NAMES.len()],
            );
            e.timestamp = Some(Timestamp(SAMPLE_NOW.millis() - 60_000 + (i as i64) * 37));
            e.user_id = (i % 3 != 0).then(|| format!("user-{}", i % 17));
            e.anonymous_id = Some("a7f3c2e1-90b4-4d8e-8c2a-5f1e3d7b9a06".into());
            e.session_id = Some(format!("sess-{}", i / 50));
            e.properties = json!({
                "path": format!("/products/{}", i % 40),
                "referrer": "https://www.example.com/search?q=shoes",
                "title": "Running shoes | Example Store",
                "viewport_width": 1280 + (i % 3) * 100,
                "price": 49.95 + (i % 7) as f64,
                "in_stock": i % 5 != 0,
            })
            .try_into()
            .expect("an object");
            e.context = Context {
                app_version: Some("4.12.0".into()),
                platform: Some("web".into()),
                device_model: None,
                os: Some("macOS".into()),
                os_version: Some("15.1".into()),
                locale: Some("en-US".into()),
                library_name: Some("outpost-js".into()),
                library_version: Some("0.1.0".into()),
            };
            e.seq = Some(i as u64);
            if i % 10 == 9 {
                e.kind = Kind::Log;
                e.name = Some("checkout".into());
                e.message = Some(format!("payment provider answered in {} ms", 100 + i));
                e.level = Some(Level::Warn);
                e.priority = Priority::High;
                e.trace_id = Some(format!("{:032x}", 0x4bf9_2f35_77b3_4da6_u128 + i as u128));
                e.span_id = Some(format!("{:016x}", 0x00f0_67aa_0ba9_02b7_u64 + i as u64));
            }
            e
        })
        .collect()
}

/// A batch of [`typical_events`] with edge facts.
pub fn typical_batch(n: usize) -> Batch {
    Batch {
        client_id: "acme-web".into(),
        facts: EdgeFacts {
            client_ip: Some("203.0.113.7".into()),
            user_agent: Some("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36".into()),
            received_at: SAMPLE_NOW,
            pop: Some("fra".into()),
            country_hint: Some("DE".into()),
            origin: Some("https://www.example.com".into()),
        },
        events: typical_events(n),
        sent_at: Some(SAMPLE_NOW),
    }
}

/// The batch request body a client would send for these events.
pub fn batch_request_json(events: &[Event]) -> String {
    json!({ "batch": events, "sent_at": SAMPLE_NOW }).to_string()
}
