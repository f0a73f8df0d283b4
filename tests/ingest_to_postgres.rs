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
        assert_eq!(properties, &Value::Object(e.properties.to_map()));
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

/// `delivery.linger_ms`: after a write of fewer batches than it could
/// take, the sink waits before it looks again, so frames that trickle in
/// meanwhile share the next write.
#[tokio::test]
async fn frames_arriving_while_a_sink_lingers_share_its_next_write() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    // One worker, so every batch goes through the same loop; a linger far
    // longer than sending five frames takes on a slow machine.
    let config = format!(
        "{}linger_ms = 3000\nworkers_per_sink = 1\n",
        store_config(&db.url, &redis)
    );
    let agg = Aggregator::start(&config).await;
    const WRITES: &str = "outpost_sink_writes_total{sink=\"postgres\"}";

    agg.ingest_accepted(frame_for("acme-web", events(11, 0..10), batch_id()))
        .await;
    db.wait_rows("acme-web", 10, 15).await;
    agg.wait_metric(WRITES, 1.0, 15).await;
    // The worker lingers now (or is about to): five more frames,
    // acknowledged at once, wait for its next look.
    let sent = std::time::Instant::now();
    for i in 1..=5 {
        agg.ingest_accepted(frame_for(
            "acme-web",
            events(11, i * 10..i * 10 + 10),
            batch_id(),
        ))
        .await;
    }
    assert!(
        sent.elapsed() < std::time::Duration::from_millis(2500),
        "the five frames took {:?}: longer than the linger allows for",
        sent.elapsed()
    );
    db.wait_rows("acme-web", 60, 15).await;
    agg.wait_metric("outpost_sink_delivered_events_total", 60.0, 15)
        .await;
    assert_eq!(
        agg.metric(WRITES).await,
        2.0,
        "the five frames in one write"
    );
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

/// `outpost bench --json` with `args` and `env`, run off the async runtime
/// (the servers it loads may be this test's): its report.
async fn bench_report(args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut cmd = std::process::Command::new(outpost_tests::outpost_bin());
    cmd.arg("bench")
        .args(args)
        .arg("--json")
        .envs(env.iter().copied());
    let out = tokio::task::spawn_blocking(move || outpost_tests::run_ok(&mut cmd))
        .await
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
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
    let (url, db_url, pid) = (agg.url.clone(), db.url.clone(), agg.pid().to_string());
    let report = bench_report(
        &[
            "--url",
            &url,
            "--frames",
            "20",
            "--events-per-frame",
            "10",
            "--concurrency",
            "4",
            "--client-id",
            "bench-test",
            "--baseline-postgres",
            &db_url,
            "--server-pid",
            &pid,
            "--rss-every",
            "1",
        ],
        &[(
            "OUTPOST_EDGE_KEYS",
            &format!("{}={secret}", outpost_tests::aggregator::EDGE_KEY_ID),
        )],
    )
    .await;
    assert_eq!(report["frames_ok"], 20);
    assert_eq!(report["events_ok"], 200);
    assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(report["end_to_end_events_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["ratio_to_copy"].as_f64().unwrap() > 0.0);
    let peak = report["server_peak_rss_mib"].as_f64().unwrap();
    let samples = report["server_rss_samples"].as_array().unwrap();
    assert!(
        samples.len() >= 2,
        "RSS is sampled at the first request and when everything is delivered: {samples:?}"
    );
    let mut last_secs = -1.0;
    for s in samples {
        let (secs, mib) = (s["secs"].as_f64().unwrap(), s["mib"].as_f64().unwrap());
        assert!(secs >= last_secs, "samples in time order: {samples:?}");
        assert!(
            mib > 1.0 && mib <= peak + 0.1,
            "a sample is the server's resident memory, at most its peak {peak}: {samples:?}"
        );
        let (anon, file) = (
            s["anon_mib"].as_f64().unwrap(),
            s["file_mib"].as_f64().unwrap(),
        );
        assert!(
            anon > 0.0 && file > 0.0 && (anon + file - mib).abs() < 1.0,
            "anonymous and file-backed memory make up the resident memory: {samples:?}"
        );
        last_secs = secs;
    }
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

/// What the stand-in collector saw: each request's content type and events.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<String>)>>>;

#[tokio::test]
async fn outpost_bench_posts_json_arrays_to_another_collector_and_counts_its_rows() {
    // `--body json` is how Outpost is held against another collector on
    // the same load (BENCHMARKS.md, Vector): a stand-in here stores each
    // posted array in PostgreSQL's `events`, as Vector's postgres sink does.
    use axum::extract::State;
    let db = TestDb::new().await;
    outpost_tests::run_ok(
        std::process::Command::new(outpost_tests::outpost_bin())
            .arg("migrate")
            .env("OUTPOST_POSTGRES_URL", &db.url),
    );
    let seen: Seen = Default::default();
    let collect = |State((pool, seen)): State<(sqlx::PgPool, Seen)>,
                   headers: axum::http::HeaderMap,
                   body: axum::body::Bytes| async move {
        let Ok(events) = serde_json::from_slice::<Vec<outpost_shared::event::Event>>(&body) else {
            return axum::http::StatusCode::BAD_REQUEST;
        };
        let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
        sqlx::query(
            "INSERT INTO events (client_id, event_id, batch_id, edge_id, ts, received_at, kind, priority) \
             SELECT 'bench-json', id, gen_random_uuid(), 'stand-in', now(), now(), 'track', 'normal' FROM unnest($1::text[]) AS id",
        )
        .bind(&ids)
        .execute(&pool)
        .await
        .unwrap();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        seen.lock().unwrap().push((content_type, ids));
        axum::http::StatusCode::OK
    };
    let app = axum::Router::new()
        .route("/collect", axum::routing::post(collect))
        .with_state((db.pool.clone(), seen.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/collect", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let report = bench_report(
        &[
            "--body",
            "json",
            "--url",
            &url,
            "--count-rows",
            &db.url,
            "--client-id",
            "bench-json",
            "--frames",
            "10",
            "--events-per-frame",
            "20",
            "--concurrency",
            "2",
            "--cpu-of",
            "postgres",
        ],
        &[],
    )
    .await;
    assert_eq!(report["frames_ok"], 10);
    assert_eq!(report["events_ok"], 200);
    assert!(report["end_to_end_events_per_sec"].as_f64().unwrap() > 0.0);
    assert!(
        report["cpu_by_process"]["postgres"].as_f64().is_some(),
        "PostgreSQL's processes are found by name: {report}"
    );
    assert!(report["machine_cpu_secs"].as_f64().unwrap() >= 0.0);
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.len(), 10, "one request per frame");
    let mut ids = std::collections::BTreeSet::new();
    for (content_type, events) in seen.iter() {
        assert_eq!(content_type, "application/json");
        assert_eq!(events.len(), 20, "each request is one frame's events");
        ids.extend(events.iter().cloned());
    }
    assert_eq!(ids.len(), 200, "every event id is new");
    assert_eq!(db.count_events("bench-json").await, 200);
}

#[tokio::test]
async fn outpost_bench_with_json_bodies_refuses_to_wait_without_a_row_count() {
    let out = std::process::Command::new(outpost_tests::outpost_bin())
        .args([
            "bench",
            "--body",
            "json",
            "--url",
            "http://127.0.0.1:9/x",
            "--wait-delivery",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--count-rows"), "{stderr}");
}

/// `outpost partitions` with the aggregator's config and `env`: its report.
fn maintain_partitions(agg: &Aggregator, env: &[(&str, &str)]) -> Value {
    let out = outpost_tests::run_ok(
        std::process::Command::new(outpost_tests::outpost_bin())
            .args(["partitions", "--config"])
            .arg(agg.dir.join("outpost.toml"))
            .envs(env.iter().copied()),
    );
    serde_json::from_slice(&out.stdout).expect("the report is JSON")
}

/// The UTC day `offset` days from today, as partition names spell it.
async fn utc_day(db: &TestDb, offset: i32) -> String {
    sqlx::query_scalar("SELECT to_char((now() AT TIME ZONE 'UTC')::date + $1, 'YYYYMMDD')")
        .bind(offset)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The day partitions of `events` and `event_counts`, by name.
async fn day_partitions(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent IN ('events'::regclass, 'event_counts'::regclass) \
           AND c.relname ~ '_p[0-9]{8}$' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// `(table.column, collation)` of every text column in an index of the
/// event tables and their partitions.
async fn key_collations(db: &TestDb) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT DISTINCT c.relname || '.' || a.attname, co.collname::text \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
         JOIN pg_collation co ON co.oid = a.attcollation \
         WHERE a.atttypid = 'text'::regtype AND c.relname ~ '^(events|event_counts|user_sketches)' \
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Rows of `events` per partition holding them.
async fn rows_by_partition(db: &TestDb) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1 ORDER BY 1")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

async fn counted_events(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(events), 0)::int8 FROM event_counts WHERE dim = ''")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn events_are_partitioned_by_day_and_retention_drops_expired_days() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    // The keeper ran at start: yesterday to two days ahead, both tables.
    agg.wait_metric("outpost_postgres_partition_days_ahead", 2.0, 20)
        .await;
    let parts = day_partitions(&db).await;
    assert_eq!(parts.len(), 8, "{parts:?}");
    for offset in [-1, 0, 1, 2] {
        let day = utc_day(&db, offset).await;
        for table in ["events", "event_counts"] {
            assert!(parts.contains(&format!("{table}_p{day}")), "{parts:?}");
        }
    }
    assert_eq!(
        agg.metric("outpost_postgres_partition_failures_total")
            .await,
        0.0
    );

    // Today's events land in today's partition.
    agg.ingest_accepted(frame_for("acme-web", events(41, 0..6), batch_id()))
        .await;
    db.wait_rows("acme-web", 6, 15).await;
    let today = utc_day(&db, 0).await;
    assert_eq!(
        rows_by_partition(&db).await,
        [(format!("events_p{today}"), 6)]
    );

    // A day partition from ten days ago (as the keeper made it then) and
    // late events no day partition holds, each with its count.
    sqlx::query(
        "DO $$ DECLARE d date := (now() AT TIME ZONE 'UTC')::date - 10; BEGIN \
         EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)', \
             'events_p' || to_char(d, 'YYYYMMDD'), d::timestamp AT TIME ZONE 'UTC', \
             (d + 1)::timestamp AT TIME ZONE 'UTC'); \
         EXECUTE format('CREATE TABLE %I PARTITION OF event_counts FOR VALUES FROM (%s) TO (%s)', \
             'event_counts_p' || to_char(d, 'YYYYMMDD'), \
             (extract(epoch FROM d::timestamp) / 60)::int8, \
             (extract(epoch FROM (d + 1)::timestamp) / 60)::int8); END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "WITH old(event_id, ts) AS (VALUES ('old', now() - interval '10 days'), \
             ('late-5', now() - interval '5 days'), ('late-3', now() - interval '3 days')), \
         stored AS (INSERT INTO events (client_id, event_id, batch_id, edge_id, ts, received_at, kind, priority) \
             SELECT 'acme-web', event_id, gen_random_uuid(), 'test', ts, now(), 'event', 'normal' FROM old \
             RETURNING ts) \
         INSERT INTO event_counts (client_id, dim, minute, value, events) \
         SELECT 'acme-web', '', floor(extract(epoch FROM ts) / 60)::int8, NULL, 1 FROM stored",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let ten_days_ago = utc_day(&db, -10).await;
    assert_eq!(
        rows_by_partition(&db).await,
        [
            ("events_default".to_owned(), 2),
            (format!("events_p{ten_days_ago}"), 1),
            (format!("events_p{today}"), 6),
        ]
    );

    // The README's setting: 90 days keep all of it.
    let block = outpost_tests::fenced_block_after(&outpost_tests::readme(), "example: retention");
    let example: toml::Table = toml::from_str(&block).expect("README retention example");
    assert_eq!(example["postgres"]["retention_days"].as_integer(), Some(90));
    agg.edit_config(|c| c.replace("[postgres]\n", &format!("{block}\n")));
    let report = maintain_partitions(&agg, &[]);
    assert_eq!(report["dropped"], serde_json::json!([]), "{report}");
    assert_eq!(report["deleted_rows"], 0, "{report}");
    assert_eq!(report["days_ahead"], 2, "{report}");
    assert_eq!(db.count_events("acme-web").await, 9);

    // Four days: the day partitions before the cut-off go whole, the late
    // event before it goes from the default partitions, with its count.
    let report = maintain_partitions(&agg, &[("OUTPOST_POSTGRES_RETENTION_DAYS", "4")]);
    assert_eq!(
        report["dropped"],
        serde_json::json!([
            format!("events_p{ten_days_ago}"),
            format!("event_counts_p{ten_days_ago}")
        ]),
        "{report}"
    );
    assert_eq!(
        report["deleted_rows"], 2,
        "the late event and its count: {report}"
    );
    assert_eq!(report["created"], serde_json::json!([]), "{report}");
    assert_eq!(
        rows_by_partition(&db).await,
        [
            ("events_default".to_owned(), 1),
            (format!("events_p{today}"), 6),
        ]
    );
    assert_eq!(counted_events(&db).await, 7, "the rollups match the rows");
    assert_eq!(day_partitions(&db).await.len(), 8);
}

#[tokio::test]
async fn a_table_from_before_partitioning_is_attached_as_it_is_and_stays_deduplicated() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    // The schema the releases before partitioning left, with three days
    // of their events and counts.
    let old = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(outpost_tests::repo_root().join("migrations/postgres")).unwrap()
    {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < "20261206" {
            std::fs::copy(&path, old.path().join(name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(old.path())
        .await
        .unwrap()
        .run(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (client_id, event_id, batch_id, edge_id, ts, received_at, kind, priority) \
         SELECT 'acme-web', 'old-' || g, gen_random_uuid(), 'test', now() - g * interval '1 hour', now(), \
                'event', 'normal' FROM generate_series(1, 72) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO event_counts (client_id, dim, minute, value, events) \
         SELECT client_id, '', floor(extract(epoch FROM ts) / 60)::int8, NULL, count(*) \
         FROM events GROUP BY 1, 2, 3, 4",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let ids = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            // Not kept prepared: the migrations change `event_id`'s collation
            // under this pool, and PostgreSQL refuses to run a statement
            // prepared before that ("cached plan must not change result
            // type"; README, "Operating", on upgrading).
            sqlx::query_as::<_, (i64, String)>("SELECT id, event_id FROM events ORDER BY id")
                .persistent(false)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    let before = ids(&db).await;
    let file: i64 = sqlx::query_scalar("SELECT pg_relation_filenode('events')::int8")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    // This release migrates it on start (dedup off: PostgreSQL's key alone).
    let config = store_config(&db.url, &redis).replace("backend = \"redis\"", "backend = \"off\"");
    let agg = Aggregator::start(&config).await;
    agg.wait_metric("outpost_postgres_partition_days_ahead", 2.0, 20)
        .await;
    assert_eq!(ids(&db).await, before, "every row, with its id");
    let legacy_file: i64 = sqlx::query_scalar("SELECT pg_relation_filenode('events_legacy')::int8")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        legacy_file, file,
        "the old table is attached, not rewritten"
    );
    // It holds everything before the second UTC midnight from now; the
    // keeper made only the days after it.
    let bound_is_two_midnights_on: bool = sqlx::query_scalar(
        "SELECT pg_get_expr(c.relpartbound, c.oid) = format('FOR VALUES FROM (MINVALUE) TO (%L)', \
                date_trunc('day', now(), 'UTC') + interval '2 days') \
         FROM pg_class c WHERE c.relname = 'events_legacy'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(bound_is_two_midnights_on);
    let day2 = utc_day(&db, 2).await;
    assert_eq!(
        day_partitions(&db).await,
        [format!("event_counts_p{day2}"), format!("events_p{day2}")]
    );
    // Every text column in their keys compares bytes: in the old tables,
    // in the days made since, in the sketches.
    let keys = key_collations(&db).await;
    for column in [
        "events_legacy.client_id".to_owned(),
        "event_counts_legacy.value".to_owned(),
        format!("events_p{day2}.event_id"),
        format!("event_counts_p{day2}.dim"),
        "user_sketches.value".to_owned(),
    ] {
        assert!(keys.iter().any(|(c, _)| *c == column), "{column}: {keys:?}");
    }
    let by_locale: Vec<_> = keys.iter().filter(|(_, coll)| coll != "C").collect();
    assert!(by_locale.is_empty(), "{by_locale:?}");

    // New events land in it; the same frame twice, and an event resent
    // with its timestamp, are stored once; resent with another timestamp,
    // twice (only Redis's window stops that: README, "Duplicates").
    let mut evs = events(42, 0..3);
    let frame = frame_for("acme-web", evs.clone(), batch_id());
    agg.ingest_accepted(frame.clone()).await;
    agg.ingest_accepted(frame).await;
    agg.ingest_accepted(frame_for("acme-web", evs.clone(), batch_id()))
        .await;
    db.wait_rows("acme-web", 75, 15).await;
    evs.truncate(1);
    evs[0].timestamp = evs[0]
        .timestamp
        .map(|t| outpost_shared::event::Timestamp(t.0 - 1_000));
    agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
        .await;
    db.wait_rows("acme-web", 76, 15).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(db.count_events("acme-web").await, 76);
    assert_eq!(
        rows_by_partition(&db).await,
        [("events_legacy".to_owned(), 76)]
    );
    assert_eq!(counted_events(&db).await, 76, "the rollups match the rows");

    // Retention deletes its expired rows in place (it also holds younger
    // ones), with their counts, and keeps the table.
    let expired: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM events WHERE ts < c) \
              + (SELECT count(*) FROM event_counts WHERE minute < extract(epoch FROM c) / 60) \
         FROM (SELECT date_trunc('day', now(), 'UTC') - interval '1 day' AS c) x",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(expired > 0);
    let report = maintain_partitions(&agg, &[("OUTPOST_POSTGRES_RETENTION_DAYS", "1")]);
    assert_eq!(report["deleted_rows"], expired, "{report}");
    assert_eq!(report["dropped"], serde_json::json!([]), "{report}");
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE ts < date_trunc('day', now(), 'UTC') - interval '1 day'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    assert_eq!(
        counted_events(&db).await,
        db.count_events("acme-web").await,
        "the rollups still match the rows"
    );
}
