//! Frames in, points in InfluxDB: the real aggregator against Debian's
//! `influxd` 1.x (v1 write API) and VictoriaMetrics (v2 write API), next to
//! the real PostgreSQL.

use outpost_tests::aggregator::{Aggregator, batch_id, events, eventually, frame_for, free_port};
use outpost_tests::influx::InfluxServer;
use outpost_tests::stores::{TestDb, TestRedis, store_config};

fn config(db: &TestDb, redis: &TestRedis, influx: &str) -> String {
    format!(
        "{}\n[influxdb]\nenabled = true\n{influx}\n",
        store_config(&db.url, redis)
    )
}
use serde_json::Value;

/// Points of client `acme-web` in influxd's database `outpost`.
async fn acme_points(influx: &InfluxServer) -> Option<i64> {
    let rows = influx
        .query_v1(
            "outpost",
            "SELECT count(\"count\") FROM outpost_events WHERE client = 'acme-web'",
        )
        .await;
    rows.first()
        .and_then(|r| r.get("count"))
        .and_then(Value::as_i64)
}

#[tokio::test]
async fn frames_become_points_in_influxdb_1x_through_the_v1_api_and_rows_in_postgres() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let influx = InfluxServer::influxdb_v1(free_port(), "outpost").await;
    let agg = Aggregator::start(&config(
        &db,
        &redis,
        &format!(
            "api = \"v1\"\nurl = \"{}\"\ndatabase = \"outpost\"\n",
            influx.url
        ),
    ))
    .await;
    for tag in 0..3 {
        agg.ingest_accepted(frame_for("acme-web", events(60 + tag, 0..10), batch_id()))
            .await;
    }
    eventually(20, "30 points", || async {
        acme_points(&influx).await == Some(30)
    })
    .await;
    assert_eq!(db.count_events("acme-web").await, 30);
    let points = influx
        .query_v1("outpost", "SELECT * FROM outpost_events LIMIT 1")
        .await;
    let p = &points[0];
    assert_eq!(p["name"], "page_view");
    assert_eq!(p["country"], "DE");
    assert_eq!(p["platform"], "web");
    assert_eq!(p["p_price"], 49.95);
    assert!(
        !p.keys()
            .any(|k| k.contains("user") || k.contains("session")),
        "{p:?}"
    );
    // A duplicate batch adds no points.
    agg.ingest_accepted(frame_for("acme-web", events(60, 0..10), batch_id()))
        .await;
    // Both sinks took it (the spool is empty), with one claim between them.
    eventually(10, "10 duplicates dropped by both sinks", || async {
        agg.metric("outpost_spool_batches").await == 0.0
            && agg.metric("outpost_dedup_duplicates_total").await == 10.0
    })
    .await;
    let rows = influx
        .query_v1("outpost", "SELECT count(\"count\") FROM outpost_events")
        .await;
    assert_eq!(rows[0]["count"], 30);
}

#[tokio::test]
async fn frames_become_points_in_victoria_metrics_through_the_v2_api() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let vm = InfluxServer::victoria_metrics(free_port()).await;
    let agg = Aggregator::start(&config(
        &db,
        &redis,
        &format!(
            "api = \"v2\"\nurl = \"{}\"\norg = \"acme\"\nbucket = \"events\"\ntoken = \"secret\"\n",
            vm.url
        ),
    ))
    .await;
    agg.ingest_accepted(frame_for("acme-web", events(70, 0..10), batch_id()))
        .await;
    eventually(20, "10 counts exported", || async {
        let series = vm
            .export_vm("{__name__=\"outpost_events_count\",client=\"acme-web\"}")
            .await;
        let total: f64 = series
            .iter()
            .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_f64())
            .sum();
        total == 10.0
    })
    .await;
    let prices = vm.export_vm("{__name__=\"outpost_events_p_price\"}").await;
    assert!(!prices.is_empty());
    assert_eq!(prices[0]["metric"]["name"], "page_view");
}

#[tokio::test]
async fn influxdb_down_does_not_delay_postgres_and_catches_up_when_back() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let port = free_port();
    let agg = Aggregator::start(&config(
        &db,
        &redis,
        &format!("api = \"v1\"\nurl = \"http://127.0.0.1:{port}\"\ndatabase = \"outpost\"\n"),
    ))
    .await;
    for tag in 0..4 {
        agg.ingest_accepted(frame_for("acme-web", events(80 + tag, 0..10), batch_id()))
            .await;
    }
    eventually(
        10,
        "postgres has every row while influxdb is down",
        || async { db.count_events("acme-web").await == 40 },
    )
    .await;
    eventually(10, "influxdb failures counted", || async {
        agg.metric("outpost_sink_failures_total").await >= 1.0
    })
    .await;
    assert_eq!(
        agg.metric("outpost_spool_batches").await,
        4.0,
        "kept for the influxdb sink"
    );
    let ready: Value = reqwest::get(format!("{}/health/ready", agg.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            ready["status"].as_str(),
            ready["checks"]["influxdb"].as_str()
        ),
        (Some("degraded"), Some("down"))
    );

    let influx = InfluxServer::influxdb_v1(port, "outpost").await;
    eventually(20, "influxdb caught up", || async {
        let rows = influx
            .query_v1("outpost", "SELECT count(\"count\") FROM outpost_events")
            .await;
        rows.first()
            .and_then(|r| r.get("count"))
            .and_then(Value::as_i64)
            == Some(40)
    })
    .await;
    agg.wait_spool_empty(5).await;
}

#[tokio::test]
async fn points_influxdb_refuses_are_dead_lettered_and_the_rest_written() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let influx = InfluxServer::influxdb_v1(free_port(), "outpost").await;
    // Another writer made `p_ms` a string field in this shard: the sink's
    // number for it is a field type conflict, which influxd answers with a
    // 400 for the whole write (a partial write).
    influx.make_p_ms_a_string("outpost").await;
    let agg = Aggregator::start(&config(
        &db,
        &redis,
        &format!(
            "api = \"v1\"\nurl = \"{}\"\ndatabase = \"outpost\"\n",
            influx.url
        ),
    ))
    .await;
    let mut evs = events(70, 0..5);
    evs[2].properties.insert("ms".into(), 2300.into());
    let bad_id = evs[2].event_id.clone();
    agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
        .await;
    eventually(20, "4 points and 1 dead letter", || async {
        acme_points(&influx).await == Some(4)
            && agg.metric("outpost_sink_dead_letters_total").await == 1.0
    })
    .await;
    // PostgreSQL had nothing against the row.
    assert_eq!(db.count_events("acme-web").await, 5);
    let mut conn = agg.spool().await;
    let (sink, event_id, error): (String, String, String) =
        sqlx::query_as("SELECT sink, event_id, error FROM dead_letters")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        (sink.as_str(), event_id),
        ("influxdb", bad_id.into_string())
    );
    assert!(error.contains("conflict"), "{error}");
}
