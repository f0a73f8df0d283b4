//! What the aggregator promises when things go wrong: clear codes for bad
//! frames, load shedding when the spool is full, and nothing acknowledged
//! lost to `kill -9` or a shutdown.

use std::collections::HashSet;

use outpost_shared::client::Secret;
use outpost_shared::frame::{self, EdgeKey, FrameMeta};
use outpost_tests::aggregator::{Aggregator, batch_id, events, eventually, frame_for, now};
use outpost_tests::stores::{TestDb, TestRedis, store_config, store_config_pg_down};
use serde_json::Value;

async fn error_of(resp: reqwest::Response) -> (u16, u64, bool) {
    let status = resp.status().as_u16();
    let has_id = resp.headers().contains_key("x-request-id");
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(body["success"], false, "{body}");
    assert!(body["request_id"].is_string(), "{body}");
    (status, body["code"].as_u64().unwrap_or(0), has_id)
}

#[tokio::test]
async fn bad_frames_get_their_documented_codes() {
    // Nothing here is accepted, but an aggregator needs a sink: the
    // embedded one will do.
    let store = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&format!(
        "[postgres]\nenabled = false\n\n[sqlite]\nenabled = true\npath = \"{}\"\n\n[dedup]\nbackend = \"off\"\n\n[server.frame]\nmax_frame_bytes = 1024\n",
        store.path().join("events.db").display()
    ))
    .await;
    let good = frame_for("acme-web", events(1, 0..2), batch_id());

    let wrong_key = {
        let mut b = outpost_shared::sample::typical_batch(2);
        b.facts.received_at = now();
        let key = EdgeKey {
            id: "test-edge".into(),
            secret: Secret::new(b"not-the-secret".to_vec()),
        };
        frame::encode(
            &FrameMeta {
                edge_id: "x",
                batch_id: batch_id(),
                created_at: now(),
                compress: false,
            },
            &b,
            &key,
        )
        .unwrap()
    };
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    let mut v9 = good.clone();
    v9[4] = 9;
    let big = frame_for("acme-web", events(2, 0..100), batch_id());
    assert!(
        big.len() > 1024,
        "the oversized frame must exceed the bound ({})",
        big.len()
    );

    let cases: Vec<(&str, Vec<u8>, u16, u64)> = vec![
        ("wrong edge key", wrong_key, 401, 40112),
        ("tampered byte", flipped, 401, 40112),
        ("truncated", good[..good.len() - 40].to_vec(), 400, 40020),
        ("garbage", b"hello, aggregator".to_vec(), 400, 40020),
        ("empty", Vec::new(), 400, 40020),
        ("unsupported version", v9, 400, 40021),
        ("oversized", big, 413, 41304),
    ];
    for (what, body, status, code) in cases {
        let got = error_of(agg.ingest(body).await).await;
        assert_eq!(got, (status, code, true), "{what}");
    }

    let client = reqwest::Client::new();
    let json = client
        .post(format!("{}/v1/ingest", agg.url))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(json).await, (415, 41501, true));
    let nowhere = client
        .get(format!("{}/v2/nothing", agg.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(nowhere).await, (404, 40401, true));
    let wrong_method = client
        .get(format!("{}/v1/ingest", agg.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(wrong_method).await, (405, 40501, true));
    // A caller's request id is echoed back.
    let echoed = client
        .post(format!("{}/v1/ingest", agg.url))
        .header("x-request-id", "trace-123")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "trace-123");
    // Every refused ingest is counted by code (404 and 405 are not ingest).
    assert_eq!(agg.metric("outpost_ingest_errors_total").await, 9.0);
}

#[tokio::test]
async fn a_full_spool_sheds_load_with_503_and_retry_after() {
    let redis = TestRedis::new();
    // PostgreSQL that does not answer: nothing drains, so the spool fills.
    let (pg_down, _) = store_config_pg_down(&redis);
    let first = frame_for("acme-web", events(3, 0..20), batch_id());
    let bound = first.len() + first.len() / 2;
    let agg =
        Aggregator::start_with_env(&pg_down, &[("OUTPOST_SPOOL_MAX_BYTES", &bound.to_string())])
            .await;
    agg.ingest_accepted(first).await;
    let resp = agg
        .ingest(frame_for("acme-web", events(3, 20..40), batch_id()))
        .await;
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned())
            .as_deref(),
        Some("5")
    );
    assert_eq!(error_of(resp).await, (503, 50302, true));
    let ready: Value = reqwest::get(format!("{}/health/ready", agg.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["postgres"], "down");
    assert_eq!(
        ready["status"], "degraded",
        "ingest still works while the sink is down"
    );
}

#[tokio::test]
async fn postgres_unreachable_at_first_then_back_delivers_everything_spooled() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    // Start against a port where nothing listens, spool some batches, then
    // restart against the real database: the spool survives and drains.
    let (pg_down, dead_pg) = store_config_pg_down(&redis);
    let mut agg = Aggregator::start(&pg_down).await;
    for tag in 0..5 {
        agg.ingest_accepted(frame_for("acme-web", events(20 + tag, 0..10), batch_id()))
            .await;
    }
    eventually(10, "sink failures counted", || async {
        agg.metric("outpost_sink_failures_total").await >= 1.0
    })
    .await;
    assert!(agg.metric("outpost_spool_batches").await >= 5.0);
    agg.terminate();
    agg.edit_config(|c| {
        c.replace(&dead_pg, &db.url)
            .replace("migrate_on_start = false\n", "")
    });
    agg.spawn().await;
    db.wait_rows("acme-web", 50, 20).await;
    agg.wait_spool_empty(5).await;
}

#[tokio::test]
async fn kill_9_under_load_loses_no_acknowledged_event() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let mut agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    let mut acked: HashSet<String> = HashSet::new();
    let client_id = "acme-web";
    // Send concurrently so the kill lands with requests and deliveries in flight.
    let url = agg.url.clone();
    let sender = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut acked = Vec::new();
        for tag in 0..400u32 {
            let evs = events(1000 + tag, 0..25);
            let ids: Vec<String> = evs.iter().map(|e| e.event_id.to_string()).collect();
            let resp = client
                .post(format!("{url}/v1/ingest"))
                .header("content-type", "application/vnd.outpost.frame")
                .body(frame_for(client_id, evs, batch_id()))
                .send()
                .await;
            match resp {
                Ok(r) if r.status() == 202 => acked.extend(ids),
                Ok(_) => {}
                Err(_) => break, // the process is gone
            }
        }
        acked
    });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    agg.kill();
    acked.extend(sender.await.unwrap());
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the kill"
    );
    agg.spawn().await;
    let stored_ids = || async {
        sqlx::query_scalar::<_, String>("SELECT event_id FROM events WHERE client_id = $1")
            .bind(client_id)
            .fetch_all(&db.pool)
            .await
            .unwrap()
    };
    // Every acknowledged id, not a row count: frames sent but unanswered
    // at the kill may be stored too, so a count can be reached while
    // acknowledged batches are still on their way from the spool.
    eventually(60, "every acknowledged event stored", || async {
        let stored: HashSet<String> = stored_ids().await.into_iter().collect();
        acked.iter().all(|id| stored.contains(id))
    })
    .await;
    let stored = stored_ids().await;
    let stored_set: HashSet<String> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), stored_set.len(), "an event is stored twice");
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !stored_set.contains(*id))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but missing: {missing:?} (of {})",
        acked.len()
    );
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let mut agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    for tag in 0..3 {
        agg.ingest_accepted(frame_for("acme-web", events(50 + tag, 0..10), batch_id()))
            .await;
    }
    let status = agg.terminate();
    assert!(status.success(), "exit status {status}:\n{}", agg.log());
    assert_eq!(db.count_events("acme-web").await, 30, "drained before exit");
    assert!(agg.log().contains("stopped"));
}

#[tokio::test]
async fn rows_postgres_refuses_are_dead_lettered_and_the_rest_stored() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    // Something PostgreSQL refuses for the data (SQLSTATE 23514), which
    // validation cannot know about: a constraint an operator added.
    db.refuse_poison().await;
    let mut evs = events(300, 0..5);
    evs[2].name = Some("poison".into());
    let poison_id = evs[2].event_id.clone();
    agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
        .await;
    db.wait_rows("acme-web", 4, 15).await;
    agg.wait_metric("outpost_sink_dead_letters_total", 1.0, 5)
        .await;
    agg.wait_spool_empty(5).await;
    let mut conn = agg.spool().await;
    let (event_id, error, payload): (String, String, Vec<u8>) =
        sqlx::query_as("SELECT event_id, error, payload FROM dead_letters")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(event_id, poison_id);
    assert!(error.contains("no_poison"), "{error}");
    let event: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(event["name"], "poison");
}

#[tokio::test]
async fn a_write_refused_as_a_whole_is_retried_then_narrowed_to_the_failing_row() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let config = store_config(&db.url, &redis) + "max_attempts = 3\nworkers_per_sink = 1\n";
    let agg = Aggregator::start(&config).await;
    // An error that blames no row and is not an outage: a trigger's
    // exception (SQLSTATE XX000) fails the whole multi-row insert.
    for statement in [
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.name = 'poison' THEN \
         RAISE EXCEPTION 'poison row refused' USING ERRCODE = 'XX000'; END IF; \
         RETURN NEW; END $$",
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON events \
         FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ] {
        sqlx::query(statement).execute(&db.pool).await.unwrap();
    }
    let mut evs = events(310, 0..5);
    evs[3].name = Some("poison".into());
    let poison_id = evs[3].event_id.clone();
    agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
        .await;
    agg.ingest_accepted(frame_for("acme-web", events(311, 0..5), batch_id()))
        .await;
    db.wait_rows("acme-web", 9, 20).await;
    agg.wait_spool_empty(5).await;
    assert_eq!(agg.metric("outpost_sink_dead_letters_total").await, 1.0);
    // Given up on only after the configured tries, each of them counted.
    assert!(
        agg.metric("outpost_sink_failures_total").await >= 3.0,
        "{}",
        agg.log()
    );
    let mut conn = agg.spool().await;
    let (event_id, error): (String, String) =
        sqlx::query_as("SELECT event_id, error FROM dead_letters")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(event_id, poison_id);
    assert!(error.contains("poison row refused"), "{error}");
}

#[tokio::test]
async fn high_priority_batches_are_delivered_first_from_a_backlog() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let (pg_down, dead_pg) = store_config_pg_down(&redis);
    let backlog = pg_down + "max_batches_per_write = 1\nworkers_per_sink = 1\n";
    let mut agg = Aggregator::start(&backlog).await;
    for tag in 0..5 {
        agg.ingest_accepted(frame_for("acme-web", events(400 + tag, 0..3), batch_id()))
            .await;
    }
    let mut urgent = events(450, 0..3);
    for e in &mut urgent {
        e.priority = outpost_shared::event::Priority::High;
    }
    agg.ingest_accepted(frame_for("acme-web", urgent, batch_id()))
        .await;
    agg.terminate();
    agg.edit_config(|c| {
        c.replace(&dead_pg, &db.url)
            .replace("migrate_on_start = false\n", "")
    });
    agg.spawn().await;
    db.wait_rows("acme-web", 18, 20).await;
    // Insertion order is the BIGSERIAL id: the high-priority batch came first.
    let first: Vec<String> = sqlx::query_scalar("SELECT priority FROM events ORDER BY id LIMIT 3")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(first, ["high", "high", "high"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_load_then_back_loses_nothing_and_ingest_never_stops() {
    let redis = TestRedis::new();
    let pg = outpost_tests::stores::PrivatePostgres::start();
    let agg = Aggregator::start(&store_config(&pg.url(), &redis)).await;
    let url = agg.url.clone();
    // Load for the whole outage: frames every 20 ms from one sender.
    let sender = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let (mut acked, mut refused) = (Vec::new(), 0);
        for tag in 0..150u32 {
            let evs = events(5000 + tag, 0..10);
            let ids: Vec<String> = evs.iter().map(|e| e.event_id.to_string()).collect();
            let resp = client
                .post(format!("{url}/v1/ingest"))
                .header("content-type", "application/vnd.outpost.frame")
                .body(frame_for("acme-web", evs, batch_id()))
                .send()
                .await
                .unwrap();
            if resp.status() == 202 {
                acked.extend(ids)
            } else {
                refused += 1
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        (acked, refused)
    });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    tokio::task::block_in_place(|| pg.stop());
    eventually(10, "the sink notices", || async {
        agg.metric("outpost_sink_failures_total").await >= 1.0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    tokio::task::block_in_place(|| pg.start_again());
    let (acked, refused) = sender.await.unwrap();
    assert_eq!(
        refused, 0,
        "ingest must keep acknowledging while PostgreSQL is away"
    );
    assert_eq!(acked.len(), 1500);
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    eventually(30, "every acknowledged event stored once", || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(DISTINCT event_id) FROM events")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
            == 1500
    })
    .await;
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, 1500, "no event stored twice");
}
