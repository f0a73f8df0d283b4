//! Frames in, rows in PostgreSQL: the aggregator against the machine's real
//! PostgreSQL and Redis, driven over HTTP.

use outpost_shared::frame::BatchId;
use outpost_tests::aggregator::{Aggregator, batch_id, events, eventually, frame_for};
use outpost_tests::stores::{TestDb, TestRedis, store_config};
use serde_json::Value;

#[tokio::test]
async fn acknowledged_frames_become_rows_with_every_field() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;

    for tag in 1..=3 {
        let resp = agg
            .ingest(frame_for("acme-web", events(tag, 0..10), batch_id()))
            .await;
        assert_eq!(resp.status(), 202);
        let request_id = resp
            .headers()
            .get("x-request-id")
            .expect("request id")
            .to_str()
            .unwrap()
            .to_owned();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["success"], true);
        assert_eq!(body["accepted"], 10);
        assert_eq!(body["request_id"], request_id.as_str());
    }
    db.wait_rows("acme-web", 30, 15).await;

    type Stored = (
        String,
        Option<String>,
        Value,
        Value,
        Option<String>,
        Option<String>,
        String,
        String,
    );
    let row: Stored = sqlx::query_as(
        "SELECT event_id, name, properties, context, host(client_ip), country, kind, priority FROM events \
         WHERE event_id = '00000002-0000-4000-8000-000000000003'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row.1.as_deref(), Some("page_view"));
    assert_eq!(row.2["path"], "/products/0");
    assert_eq!(row.3["app_version"], "4.12.0");
    assert_eq!(row.4.as_deref(), Some("203.0.113.7"));
    assert_eq!(row.5.as_deref(), Some("DE"));
    assert_eq!((row.6.as_str(), row.7.as_str()), ("event", "normal"));
    assert_eq!(
        agg.metric("outpost_sink_delivered_events_total").await,
        30.0
    );
}

/// The columns a write stores from a frame (not `client_id`, `batch_id`,
/// `received_at`), compared between paths.
const STORED: &str = "event_id, ts, kind, name, message, level, user_id, anonymous_id, \
    session_id, properties, context, app_version, platform, trace_id, span_id, seq, priority, \
    host(client_ip), user_agent, pop, country, region, city, latitude, longitude, time_zone, asn, \
    as_org, edge_id";

/// A client's stored rows, `columns` of each, as one JSON text in event id order.
async fn stored_rows(db: &TestDb, client: &str, columns: &str) -> String {
    sqlx::query_scalar(&format!(
        "SELECT jsonb_agg(jsonb_build_array({columns}) ORDER BY event_id)::text \
         FROM events WHERE client_id = $1"
    ))
    .bind(client)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Events whose text `COPY` must escape (tab, newline, carriage return,
/// backslash, `\N`, `\.`), with non-ASCII text, over four minutes, with
/// levels, priorities and a missing platform.
fn awkward_events(tag: u32) -> Vec<outpost_shared::event::Event> {
    use outpost_shared::event::{Kind, Level, Priority, Timestamp};
    let mut evs = events(tag, 0..12);
    let start = outpost_tests::aggregator::now().0 - 4 * 60_000;
    for (i, e) in evs.iter_mut().enumerate() {
        e.timestamp = Some(Timestamp(start + i as i64 * 20_000 + 7));
        match i % 4 {
            0 => {
                e.kind = Kind::Log;
                e.level = Some(Level::Error);
                e.name = Some("crash".into());
                e.message = Some("line one\n\tline two \\ with \\N and \\.\r\nend".into());
            }
            1 => {
                e.name = Some("café ☕ 日本".into());
                e.user_id = Some("tab\there\\".into());
            }
            2 => {
                e.properties
                    .insert("path".into(), serde_json::json!("C:\\temp\\x\ty\n"));
                e.properties.insert("emoji".into(), serde_json::json!("🎉"));
            }
            _ => {
                e.priority = Priority::High;
                e.context.platform = None;
            }
        }
    }
    evs
}

#[tokio::test]
async fn copy_and_its_insert_fallback_store_and_count_the_same_values() {
    // Dedup off: a repeated event reaches PostgreSQL and makes COPY fail.
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let config = store_config(&db.url, &redis).replace("backend = \"redis\"", "backend = \"off\"");
    let agg = Aggregator::start(&config).await;

    // One write of new events: COPY.
    let sent = awkward_events(21);
    let resp = agg
        .ingest(frame_for("copy-path", sent.clone(), batch_id()))
        .await;
    assert_eq!(resp.status(), 202);
    // The same events for another client, one of them stored first: its
    // second write holds an event PostgreSQL has, COPY fails on the unique
    // key, and INSERT … ON CONFLICT stores the other eleven.
    let resp = agg
        .ingest(frame_for("insert-path", sent[3..4].to_vec(), batch_id()))
        .await;
    assert_eq!(resp.status(), 202);
    db.wait_rows("insert-path", 1, 15).await;
    let resp = agg
        .ingest(frame_for("insert-path", sent.clone(), batch_id()))
        .await;
    assert_eq!(resp.status(), 202);
    eventually(15, "12 rows for both clients", || async {
        db.count_events("copy-path").await == 12 && db.count_events("insert-path").await == 12
    })
    .await;

    // Text comes back exactly as sent.
    type Text = (Option<String>, Option<String>, Option<String>, Value);
    let stored: Vec<Text> = sqlx::query_as(
        "SELECT name, message, user_id, properties FROM events WHERE client_id = 'copy-path' ORDER BY event_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (e, (name, message, user_id, properties)) in sent.iter().zip(&stored) {
        assert_eq!(name, &e.name);
        assert_eq!(message, &e.message);
        assert_eq!(user_id, &e.user_id);
        assert_eq!(properties, &Value::Object(e.properties.clone()));
    }

    // Both paths store the same values, column by column.
    assert_eq!(
        stored_rows(&db, "copy-path", STORED).await,
        stored_rows(&db, "insert-path", STORED).await
    );

    // Both keep the rollups exact: what the events recount to, the repeated
    // event counted once.
    let counted = |client: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT jsonb_agg(jsonb_build_array(dim, minute, value, events) ORDER BY dim, minute, value)::text \
                 FROM event_counts WHERE client_id = $1",
            )
            .bind(client)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let recounted: String = sqlx::query_scalar(
        "SELECT jsonb_agg(jsonb_build_array(dim, minute, value, n) ORDER BY dim, minute, value)::text FROM ( \
           SELECT d.dim, floor(extract(epoch from e.ts) / 60)::int8 AS minute, d.value, count(*) AS n \
           FROM events e, LATERAL (VALUES ('', NULL), ('kind', e.kind), ('name', e.name), ('country', e.country), \
             ('platform', e.platform), ('app_version', e.app_version), ('level', e.level), \
             ('priority', e.priority)) AS d(dim, value) \
           WHERE e.client_id = 'copy-path' GROUP BY 1, 2, 3) c",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(counted("copy-path").await, recounted);
    assert_eq!(counted("insert-path").await, recounted);
    let minutes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM event_counts WHERE client_id = 'copy-path' AND dim = ''",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(minutes >= 4, "the events span several minutes: {minutes}");
}

/// A frame of `events` for `client_id` that arrived at `received_at`.
fn frame_at(
    client_id: &str,
    events: Vec<outpost_shared::event::Event>,
    received_at: outpost_shared::event::Timestamp,
) -> Vec<u8> {
    let mut batch = outpost_shared::sample::typical_batch(0);
    batch.client_id = client_id.into();
    batch.facts.received_at = received_at;
    batch.events = events;
    let meta = outpost_shared::frame::FrameMeta {
        edge_id: "test",
        batch_id: batch_id(),
        created_at: received_at,
        compress: true,
    };
    outpost_shared::frame::encode(&meta, &batch, &outpost_tests::aggregator::edge_key()).unwrap()
}

#[tokio::test]
async fn batches_decoded_again_from_the_spool_are_stored_like_handed_off_ones() {
    // Two aggregators on one database: one hands ingest's decoded batches
    // to its sink in memory, the other has the hand-off turned off and
    // decodes every spooled frame again. The same frames (as far as the
    // client goes) must end up as the same rows.
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let config = store_config(&db.url, &redis);
    let memory = Aggregator::start(&config).await;
    let again = Aggregator::start(&config.replace(
        "[delivery]
",
        "[delivery]
handoff_max_bytes = 0
",
    ))
    .await;

    // What validation fills in or refuses: an event without a timestamp
    // (it gets the arrival time), a log without a level (`info`), an
    // invalid id (not stored); then a second frame repeating two ids
    // (duplicates, dropped).
    let received_at = outpost_tests::aggregator::now();
    let mut sent = awkward_events(31);
    sent[1].timestamp = None;
    sent[4].level = None;
    sent[6].event_id = "not-an-event-id".into();
    let repeat = vec![sent[2].clone(), sent[3].clone()];
    for (agg, client) in [(&memory, "handoff-path"), (&again, "spool-path")] {
        let resp = agg
            .ingest(frame_at(client, sent.clone(), received_at))
            .await;
        assert_eq!(resp.status(), 202);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            (body["accepted"].as_u64(), body["rejected"].as_u64()),
            (Some(11), Some(1))
        );
        db.wait_rows(client, 11, 15).await;
        let resp = agg
            .ingest(frame_at(client, repeat.clone(), received_at))
            .await;
        assert_eq!(resp.status(), 202);
        agg.wait_metric("outpost_dedup_duplicates_total", 2.0, 15)
            .await;
    }
    // `metric` takes one labelled series as well as a name.
    const HANDOFF: &str = r#"outpost_delivery_batches_total{source="handoff"}"#;
    const SPOOL: &str = r#"outpost_delivery_batches_total{source="spool"}"#;
    assert_eq!(
        (memory.metric(HANDOFF).await, memory.metric(SPOOL).await),
        (2.0, 0.0)
    );
    assert_eq!(
        (again.metric(HANDOFF).await, again.metric(SPOOL).await),
        (0.0, 2.0)
    );
    assert_eq!(
        memory.metric("outpost_handoff_bytes").await,
        0.0,
        "released once delivered"
    );

    // Both frames arrived at the same instant: `received_at` compares too.
    let columns = format!("received_at, {STORED}");
    assert_eq!(
        stored_rows(&db, "handoff-path", &columns).await,
        stored_rows(&db, "spool-path", &columns).await
    );
    let level: Option<String> = sqlx::query_scalar(
        "SELECT level FROM events WHERE client_id = 'handoff-path' AND event_id = $1",
    )
    .bind(sent[4].event_id.as_str())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(level.as_deref(), Some("info"));
}

#[tokio::test]
async fn duplicate_event_ids_across_batches_are_stored_once_and_counted() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;

    agg.ingest_accepted(frame_for("acme-web", events(7, 0..10), batch_id()))
        .await;
    db.wait_rows("acme-web", 10, 15).await;
    // A retry with new and old ids, as a client resends after a lost answer.
    agg.ingest_accepted(frame_for("acme-web", events(7, 5..15), batch_id()))
        .await;
    db.wait_rows("acme-web", 15, 15).await;
    // Redis, not only the unique key, dropped the five repeats.
    agg.wait_metric("outpost_dedup_duplicates_total", 5.0, 5)
        .await;
    // The same ids from another client are that client's own events.
    agg.ingest_accepted(frame_for("other-app", events(7, 0..3), batch_id()))
        .await;
    db.wait_rows("other-app", 3, 15).await;
}

#[tokio::test]
async fn a_replayed_batch_whose_ids_it_already_claimed_is_not_lost() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    // Simulate a crash after the dedup claim and before the write: the
    // claims exist, holding this batch's id, but no row does.
    let batch = BatchId([0x42; 16]);
    let mut conn = redis.conn().await;
    for e in events(9, 0..4) {
        let key = format!("{}{{acme-web}}:{}", redis.prefix, e.event_id);
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(batch.to_string())
            .arg("EX")
            .arg(600)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    agg.ingest_accepted(frame_for("acme-web", events(9, 0..4), batch))
        .await;
    db.wait_rows("acme-web", 4, 15).await;
    assert_eq!(agg.metric("outpost_dedup_duplicates_total").await, 0.0);
    // A different batch with those ids is a duplicate.
    agg.ingest_accepted(frame_for("acme-web", events(9, 0..4), batch_id()))
        .await;
    agg.wait_metric("outpost_dedup_duplicates_total", 4.0, 5)
        .await;
    assert_eq!(db.count_events("acme-web").await, 4);
}

#[tokio::test]
async fn invalid_events_in_a_frame_are_reported_and_not_stored() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    let mut evs = events(11, 0..3);
    evs[1].name = None; // an event without a name
    let resp = agg.ingest(frame_for("acme-web", evs, batch_id())).await;
    assert_eq!(resp.status(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(body["errors"][0]["index"], 1);
    assert_eq!(body["errors"][0]["code"], 40002);
    db.wait_rows("acme-web", 2, 15).await;
}

#[tokio::test]
async fn redis_down_fails_open_and_postgres_still_drops_duplicates() {
    let db = TestDb::new().await;
    let dead_redis = format!(
        "redis://127.0.0.1:{}",
        outpost_tests::aggregator::free_port()
    );
    let agg = Aggregator::start(&format!(
        "[postgres]\nurl = \"{}\"\n\n[dedup]\nbackend = \"redis\"\nredis_urls = [\"{dead_redis}\"]\n",
        db.url
    ))
    .await;
    let ready: Value = reqwest::get(format!("{}/health/ready", agg.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["checks"]["redis"], "down");
    agg.ingest_accepted(frame_for("acme-web", events(13, 0..5), batch_id()))
        .await;
    agg.ingest_accepted(frame_for("acme-web", events(13, 0..5), batch_id()))
        .await;
    db.wait_rows("acme-web", 5, 15).await;
    eventually(5, "dedup errors counted", || async {
        agg.metric("outpost_dedup_errors_total").await >= 1.0
    })
    .await;
    // The stats rollups count what was stored, not what was written twice.
    let counted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT dim, sum(events)::int8 FROM event_counts WHERE client_id = 'acme-web' GROUP BY dim ORDER BY dim",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        counted.len(),
        8,
        "all events and seven dimensions: {counted:?}"
    );
    assert!(counted.iter().all(|(_, n)| *n == 5), "{counted:?}");
}

#[tokio::test]
async fn the_readme_metrics_table_is_what_metrics_exports() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    agg.ingest_accepted(frame_for("acme-web", events(31, 0..2), batch_id()))
        .await;
    db.wait_rows("acme-web", 2, 15).await;
    // A refused frame, so that the per-code error family has a series.
    assert_eq!(agg.ingest(b"not a frame".to_vec()).await.status(), 400);
    let text = reqwest::get(format!("{}/metrics", agg.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Families as exported: `# TYPE <name> <type>`; counters are sampled as `<name>_total`.
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split(' ');
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            }
        })
        .collect();
    let readme = outpost_tests::section(&outpost_tests::readme(), "metrics");
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|l| l.split(['`', '{']).next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        documented, exported,
        "README metrics table and /metrics differ"
    );
}

#[tokio::test]
async fn outpost_bench_sends_waits_for_delivery_and_compares_with_copy() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    let secret = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(outpost_tests::aggregator::EDGE_SECRET)
    };
    let (url, db_url) = (agg.url.clone(), db.url.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(outpost_tests::outpost_bin())
            .args([
                "bench",
                "--url",
                &url,
                "--frames",
                "20",
                "--events-per-frame",
                "10",
                "--concurrency",
                "4",
            ])
            .args([
                "--client-id",
                "bench-test",
                "--baseline-postgres",
                &db_url,
                "--json",
            ])
            .env(
                "OUTPOST_EDGE_KEYS",
                format!("{}={secret}", outpost_tests::aggregator::EDGE_KEY_ID),
            )
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["frames_ok"], 20);
    assert_eq!(report["events_ok"], 200);
    assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(report["end_to_end_events_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["ratio_to_copy"].as_f64().unwrap() > 0.0);
    assert_eq!(
        db.count_events("bench-test").await,
        200,
        "every benchmark event is stored"
    );
    let leftover: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_tables WHERE tablename LIKE 'outpost_bench_baseline_%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(leftover, 0, "the baseline table is dropped");
}

/// Runs the README's retention block with `keep` in place of its 90 days.
fn run_retention(db_url: &str, keep: &str) {
    outpost_tests::require_tool("psql");
    let block = outpost_tests::fenced_block_after(&outpost_tests::readme(), "example: retention");
    assert!(block.contains("keep='90 days'"), "{block}");
    outpost_tests::run_ok(
        std::process::Command::new("bash")
            .arg("-c")
            .arg(block.replace("keep='90 days'", &format!("keep='{keep}'")))
            .env("OUTPOST_POSTGRES_URL", db_url),
    );
}

#[tokio::test]
async fn the_readme_retention_block_deletes_old_events_with_their_rollups() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    agg.ingest_accepted(frame_for("acme-web", events(41, 0..6), batch_id()))
        .await;
    db.wait_rows("acme-web", 6, 15).await;
    let counted = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT coalesce(sum(events), 0)::int8 FROM event_counts WHERE dim = ''",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(counted(db.pool.clone()).await, 6);

    // Today's events are younger than 90 days: nothing goes.
    run_retention(&db.url, "90 days");
    assert_eq!(db.count_events("acme-web").await, 6);
    assert_eq!(counted(db.pool.clone()).await, 6);

    // A cut-off after tomorrow's midnight: every row and every count goes.
    run_retention(&db.url, "-2 days");
    assert_eq!(db.count_events("acme-web").await, 0);
    assert_eq!(counted(db.pool.clone()).await, 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM event_counts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "rollups of deleted minutes remain");
}
