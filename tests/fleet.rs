//! The JetStream spool (`spool.backend = "jetstream"`): several aggregators
//! share one stream, so what one acknowledged is delivered whichever node
//! dies, and a node needs no disk of its own. Real `nats-server`
//! processes (each test its own), real `outpost serve` nodes, real
//! PostgreSQL and Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outpost_tests::aggregator::{Aggregator, batch_id, events, eventually, frame_for};
use outpost_tests::nats::{NatsServer, jetstream_env};
use outpost_tests::stores::{
    PrivatePostgres, TestDb, TestRedis, store_config, store_config_pg_down, unique,
};
use serde_json::Value;

const CLIENT: &str = "acme-web";

async fn start_node(config: &str, env: &[(String, String)]) -> Aggregator {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Aggregator::start_with_env(config, &env).await
}

/// The stream's last sequence number: one per batch it stored.
async fn last_sequence(url: &str, stream: &str) -> u64 {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let info = js
        .get_stream(stream)
        .await
        .expect("the stream exists")
        .get_info()
        .await
        .expect("stream info");
    info.state.last_sequence
}

/// Every stored event id of `CLIENT`, and how many rows there are.
async fn stored(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events WHERE client_id = $1")
        .bind(CLIENT)
        .fetch_one(pool)
        .await
        .unwrap_or((0, 0))
}

#[tokio::test]
async fn the_jetstream_spool_stores_each_acknowledged_event_once_and_a_retried_frame_once() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(tmp.path());
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let stream = unique("OUTPOST").to_ascii_uppercase();
    let node = start_node(
        &store_config(&db.url, &redis),
        &jetstream_env(&nats.url(), &stream, 30),
    )
    .await;

    let ready: Value = reqwest::get(format!("{}/health/ready", node.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["jetstream"], "ok", "{ready}");

    let first = frame_for(CLIENT, events(1, 0..10), batch_id());
    node.ingest_accepted(first.clone()).await;
    for tag in 2..=20 {
        node.ingest_accepted(frame_for(CLIENT, events(tag, 0..10), batch_id()))
            .await;
    }
    // The edge retries a frame it got no answer for: same bytes, same
    // batch id. JetStream takes it for the duplicate it is.
    node.ingest_accepted(first).await;
    db.wait_rows(CLIENT, 200, 30).await;
    assert_eq!(
        last_sequence(&nats.url(), &stream).await,
        20,
        "the retried frame was stored a second time"
    );
    assert_eq!(stored(&db.pool).await, (200, 200));
    node.wait_spool_empty(10).await;
}

#[tokio::test]
async fn a_node_killed_holding_batches_has_them_delivered_by_the_survivor() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(tmp.path());
    let pg = PrivatePostgres::start();
    let redis = TestRedis::new();
    let stream = unique("OUTPOST").to_ascii_uppercase();
    let env = jetstream_env(&nats.url(), &stream, 3);
    let config = store_config(&pg.url(), &redis);
    let mut a = start_node(&config, &env).await;
    let b = start_node(&config, &env).await;

    // The database goes away: both nodes keep acknowledging (the stream
    // holds the batches), and both take batches to write and hold them.
    pg.stop();
    for tag in 0..30u32 {
        let node = if tag % 2 == 0 { &a } else { &b };
        node.ingest_accepted(frame_for(CLIENT, events(tag, 0..10), batch_id()))
            .await;
    }
    eventually(20, "node A tried to write what it holds", || async {
        a.metric("outpost_sink_failures_total").await >= 1.0
    })
    .await;
    a.kill();
    pg.start_again();

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await
        .unwrap();
    eventually(60, "every acknowledged event stored", || async {
        stored(&pool).await.0 >= 300
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(stored(&pool).await, (300, 300), "each event exactly once");
    // A wrote nothing (the database was down until it died): the survivor
    // delivered everything, A's share included.
    assert_eq!(
        b.metric("outpost_sink_delivered_events_total").await,
        300.0,
        "{}",
        b.log()
    );
}

#[tokio::test]
async fn a_node_started_without_any_disk_delivers_what_a_dead_node_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(tmp.path());
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let stream = unique("OUTPOST").to_ascii_uppercase();
    let env = jetstream_env(&nats.url(), &stream, 3);
    let (down, _) = store_config_pg_down(&redis);
    let mut a = start_node(&down, &env).await;
    for tag in 0..10u32 {
        a.ingest_accepted(frame_for(CLIENT, events(tag, 0..10), batch_id()))
            .await;
    }
    a.kill();
    drop(a); // its directory (config, log) goes too

    // A new node, new directory, working database.
    let b = start_node(&store_config(&db.url, &redis), &env).await;
    db.wait_rows(CLIENT, 100, 60).await;
    assert_eq!(stored(&db.pool).await, (100, 100));
    b.wait_spool_empty(10).await;
}

#[tokio::test]
async fn a_full_stream_is_answered_503_with_retry_after_and_nats_down_too() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(tmp.path());
    let redis = TestRedis::new();
    let stream = unique("OUTPOST").to_ascii_uppercase();
    let mut env = jetstream_env(&nats.url(), &stream, 30);
    env.push(("OUTPOST_SPOOL_MAX_BYTES".into(), "40000".into()));
    let (down, _) = store_config_pg_down(&redis);
    let node = start_node(&down, &env).await;

    let mut accepted = 0;
    let full = loop {
        let resp = node
            .ingest(frame_for(CLIENT, events(accepted, 0..10), batch_id()))
            .await;
        if resp.status() != 202 {
            break resp;
        }
        accepted += 1;
        assert!(accepted < 1000, "the stream never filled");
    };
    assert!(accepted > 0, "nothing fit");
    assert_eq!(full.status(), 503);
    assert!(full.headers().contains_key("retry-after"));
    let body: Value = full.json().await.unwrap();
    assert_eq!(body["code"], 50302, "{body}");

    // NATS itself goes away: ingest answers 503 at once (nothing is
    // acknowledged that the stream did not take), readiness says so.
    nats.kill();
    let resp = node
        .ingest(frame_for(CLIENT, events(9_999, 0..1), batch_id()))
        .await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], 50303, "{body}");
    let ready = reqwest::get(format!("{}/health/ready", node.url))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["jetstream"], "down", "{ready}");

    // Back with its store: the node reconnects on its own.
    nats.start_again();
    eventually(30, "readiness after NATS came back", || async {
        reqwest::get(format!("{}/health/ready", node.url))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn refused_rows_go_to_the_dead_letter_stream_and_outpost_dead_letters_handles_them() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(tmp.path());
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let stream = unique("OUTPOST").to_ascii_uppercase();
    let node = start_node(
        &store_config(&db.url, &redis),
        &jetstream_env(&nats.url(), &stream, 30),
    )
    .await;
    // Migrations ran at start; now the operator's constraint.
    db.refuse_poison().await;
    let mut batch = events(7, 0..5);
    batch[2].name = Some("poison".into());
    node.ingest_accepted(frame_for(CLIENT, batch, batch_id()))
        .await;
    db.wait_rows(CLIENT, 4, 30).await;
    node.wait_metric("outpost_dead_letters", 1.0, 10).await;
    let ready: Value = reqwest::get(format!("{}/health/ready", node.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["dead_letters"]["count"], 1, "{ready}");
    node.wait_spool_empty(10).await;

    // `outpost dead-letters` reads and clears the dead-letter stream.
    let env = jetstream_env(&nats.url(), &stream, 30);
    let cli = |args: &[&str]| -> Value {
        let out = outpost_tests::run_ok(
            std::process::Command::new(outpost_tests::outpost_bin())
                .args(["dead-letters", "--config"])
                .arg(node.dir.join("outpost.toml"))
                .args(args)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        );
        serde_json::from_slice(&out.stdout).expect("JSON from outpost dead-letters")
    };
    let listed = cli(&["list"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["sink"], "postgres");
    assert!(listed[0]["error"].as_str().unwrap().contains("no_poison"));
    let id = listed[0]["id"].as_i64().unwrap().to_string();
    let shown = cli(&["show", &id]);
    assert_eq!(shown["payload"]["name"], "poison", "{shown}");
    sqlx::query("ALTER TABLE events DROP CONSTRAINT no_poison")
        .execute(&db.pool)
        .await
        .unwrap();
    let replayed = cli(&["replay"]);
    assert_eq!(replayed["replayed"], 1, "{replayed}");
    db.wait_rows(CLIENT, 5, 20).await;
    assert!(cli(&["list"]).as_array().unwrap().is_empty());

    // Purge deletes for good (the constraint again, for new rows only).
    sqlx::query(
        "ALTER TABLE events ADD CONSTRAINT no_poison CHECK (name IS DISTINCT FROM 'poison') NOT VALID",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut batch = events(8, 0..2);
    batch[1].name = Some("poison".into());
    node.ingest_accepted(frame_for(CLIENT, batch, batch_id()))
        .await;
    node.wait_metric("outpost_dead_letters", 1.0, 20).await;
    assert_eq!(cli(&["purge", "--yes"])["deleted"], 1);
    node.wait_metric("outpost_dead_letters", 0.0, 10).await;
}

/// Waits until a three-server cluster has formed and can place a stream
/// with three replicas.
async fn wait_for_jetstream_cluster(url: &str) {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    eventually(60, "a JetStream cluster that places three replicas", || {
        let js = js.clone();
        async move {
            let made = js
                .create_stream(async_nats::jetstream::stream::Config {
                    name: "READY_PROBE".into(),
                    subjects: vec!["ready.probe".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
                .is_ok();
            made && js.delete_stream("READY_PROBE").await.is_ok()
        }
    })
    .await;
}

/// Sends frames as an edge does: to the first node, else the next (the
/// same frame, same batch id), again after a pause when none acknowledges.
/// Returns the event ids acknowledged once `stop` turns true.
async fn edge_load(
    urls: Vec<String>,
    stop: tokio::sync::watch::Receiver<bool>,
    frames: Arc<AtomicUsize>,
) -> Vec<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut acked = Vec::new();
    let mut tag = 0u32;
    while !*stop.borrow() {
        tag += 1;
        let batch = events(100_000 + tag, 0..10);
        let ids: Vec<String> = batch.iter().map(|e| e.event_id.to_string()).collect();
        let frame = frame_for(CLIENT, batch, batch_id());
        'frame: loop {
            for url in &urls {
                let sent = http
                    .post(format!("{url}/v1/ingest"))
                    .header("content-type", "application/vnd.outpost.frame")
                    .body(frame.clone())
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status() == 202) {
                    acked.extend(ids);
                    frames.fetch_add(1, Ordering::SeqCst);
                    break 'frame;
                }
            }
            if *stop.borrow() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    acked
}

#[tokio::test]
async fn a_nats_cluster_and_two_nodes_lose_nothing_to_kill_9_and_a_database_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = NatsServer::cluster(tmp.path());
    let urls: Vec<String> = cluster.iter().map(NatsServer::url).collect();
    wait_for_jetstream_cluster(&urls[0]).await;
    let pg = PrivatePostgres::start();
    let redis = TestRedis::new();
    let stream = unique("OUTPOST").to_ascii_uppercase();
    let mut env = jetstream_env(&urls.join(","), &stream, 3);
    env.push(("OUTPOST_SPOOL_JETSTREAM_REPLICAS".into(), "3".into()));
    let config = store_config(&pg.url(), &redis);
    let mut a = start_node(&config, &env).await;
    let b = start_node(&config, &env).await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let frames = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(edge_load(
        vec![a.url.clone(), b.url.clone()],
        stop_rx,
        frames.clone(),
    ));
    let acked_since = |n: usize| {
        let frames = frames.clone();
        let start = frames.load(Ordering::SeqCst);
        async move {
            eventually(60, "frames acknowledged", || async {
                frames.load(Ordering::SeqCst) >= start + n
            })
            .await
        }
    };
    acked_since(20).await;

    // One NATS server dies and comes back with its store. When it led the
    // stream, ingest answers 503 until the others elect a new leader (the
    // edge retries); either way acknowledgements resume.
    cluster[0].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster[0].start_again();
    acked_since(20).await;

    // PostgreSQL goes away; meanwhile node A dies holding batches.
    pg.stop();
    let outage = std::time::Instant::now();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while a.metric("outpost_sink_failures_total").await < 1.0 {
        if std::time::Instant::now() > deadline {
            panic!(
                "node A never tried to write what it holds (A delivered {}, B delivered {}, B failed {}):\n{}\n---- B\n{}",
                a.metric("outpost_sink_delivered_events_total").await,
                b.metric("outpost_sink_delivered_events_total").await,
                b.metric("outpost_sink_failures_total").await,
                a.log(),
                b.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.kill();
    // Thirty seconds without the database in all.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    pg.start_again();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let acked = load.await.unwrap();
    assert!(acked.len() >= 100, "too little load: {}", acked.len());

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await
        .unwrap();
    let want = acked.len() as i64;
    eventually(90, "every acknowledged event stored", || async {
        stored(&pool).await.0 >= want
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rows: Vec<String> = sqlx::query_scalar("SELECT event_id FROM events WHERE client_id = $1")
        .bind(CLIENT)
        .fetch_all(&pool)
        .await
        .unwrap();
    let stored_ids: std::collections::HashSet<&str> = rows.iter().map(String::as_str).collect();
    assert_eq!(rows.len(), stored_ids.len(), "an event stored twice");
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !stored_ids.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost, e.g. {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(3)],
        b.log()
    );
    // Nothing stored that was not acknowledged either (an unanswered
    // frame the edge retried is acknowledged on its retry).
    assert_eq!(rows.len(), acked.len());
}

#[tokio::test]
async fn a_node_shut_down_hands_back_what_it_holds_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(tmp.path());
    let pg = PrivatePostgres::start();
    let redis = TestRedis::new();
    let stream = unique("OUTPOST").to_ascii_uppercase();
    // A minute before JetStream would hand A's batches to B on its own.
    let env = jetstream_env(&nats.url(), &stream, 60);
    let config = store_config(&pg.url(), &redis);
    let mut a = start_node(&config, &env).await;
    pg.stop();
    for tag in 0..10u32 {
        a.ingest_accepted(frame_for(CLIENT, events(tag, 0..10), batch_id()))
            .await;
    }
    eventually(20, "node A tried to write what it holds", || async {
        a.metric("outpost_sink_failures_total").await >= 1.0
    })
    .await;
    // B starts with the database still down (migrations are A's job).
    let b_config = config.replace("[postgres]\n", "[postgres]\nmigrate_on_start = false\n");
    let b = start_node(&b_config, &env).await;
    let status = a.terminate();
    assert!(status.success(), "{status}");
    assert!(
        a.log()
            .contains("handed unfinished batches back to JetStream"),
        "{}",
        a.log()
    );
    pg.start_again();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await
        .unwrap();
    // Well inside the minute: B had them at once.
    eventually(30, "B stored what A handed back", || async {
        stored(&pool).await.0 >= 100
    })
    .await;
    assert_eq!(stored(&pool).await, (100, 100));
    assert_eq!(b.metric("outpost_sink_delivered_events_total").await, 100.0);
}
