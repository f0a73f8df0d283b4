//! GeoIP enrichment end to end: the real aggregator reads test databases
//! built with `mmdb-writer`, stores what they say with each row, and picks
//! up a replaced database without a restart.

use std::process::Command;

use outpost_tests::aggregator::{Aggregator, batch_id, events, eventually, frame_for};
use outpost_tests::geo::{CityEntry, write_asn_db, write_atomically, write_city_db};
use outpost_tests::stores::{TestDb, TestRedis, store_config};

fn config(db: &TestDb, redis: &TestRedis, geo_dir: &std::path::Path) -> String {
    format!(
        "{}\n[geoip]\ncity_db = \"{}\"\nasn_db = \"{}\"\nreload_check_secs = 1\n",
        store_config(&db.url, redis),
        geo_dir.join("city.mmdb").display(),
        geo_dir.join("asn.mmdb").display()
    )
}

const ZURICH: CityEntry<'static> = CityEntry {
    net: "203.0.113.0/24",
    country: "CH",
    region: "ZH",
    city: "Zürich",
    location: (47.3769, 8.5417),
    time_zone: "Europe/Zurich",
};

type GeoRow = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

async fn geo_of(db: &TestDb, event_id: &str) -> GeoRow {
    sqlx::query_as("SELECT country, region, city, latitude, time_zone, asn, as_org FROM events WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn rows_carry_city_and_asn_of_the_client_ip() {
    let (db, redis, dir) = (
        TestDb::new().await,
        TestRedis::new(),
        tempfile::tempdir().unwrap(),
    );
    write_city_db(&dir.path().join("city.mmdb"), &[ZURICH]);
    write_asn_db(
        &dir.path().join("asn.mmdb"),
        &[("203.0.113.0/24", 64_500, "Example Net AG")],
    );
    let agg = Aggregator::start(&config(&db, &redis, dir.path())).await;
    let evs = events(90, 0..3);
    let id = evs[0].event_id.clone();
    assert_eq!(
        agg.ingest(frame_for("acme-web", evs, batch_id()))
            .await
            .status(),
        202
    );
    eventually(15, "3 rows", || async {
        db.count_events("acme-web").await == 3
    })
    .await;
    let g = geo_of(&db, &id).await;
    assert_eq!(
        g.0.as_deref(),
        Some("CH"),
        "GeoIP's country wins over the edge's hint (DE)"
    );
    assert_eq!(g.1.as_deref(), Some("ZH"));
    assert_eq!(g.2.as_deref(), Some("Zürich"));
    assert_eq!(g.3, Some(47.3769));
    assert_eq!(g.4.as_deref(), Some("Europe/Zurich"));
    assert_eq!(
        (g.5, g.6.as_deref()),
        (Some(64_500), Some("Example Net AG"))
    );
    // One lookup per batch, the rest from the cache.
    let text = reqwest::get(format!("{}/metrics", agg.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("outpost_geoip_lookups_total{result=\"found\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_replaced_database_is_used_without_a_restart_and_a_broken_one_is_not() {
    let (db, redis, dir) = (
        TestDb::new().await,
        TestRedis::new(),
        tempfile::tempdir().unwrap(),
    );
    let city = dir.path().join("city.mmdb");
    write_city_db(&city, &[ZURICH]);
    let agg = Aggregator::start(&config(&db, &redis, dir.path())).await;
    let first = events(91, 0..1);
    assert_eq!(
        agg.ingest(frame_for("acme-web", first.clone(), batch_id()))
            .await
            .status(),
        202
    );
    eventually(15, "first row", || async {
        db.count_events("acme-web").await == 1
    })
    .await;
    assert_eq!(
        geo_of(&db, &first[0].event_id).await.2.as_deref(),
        Some("Zürich")
    );

    write_city_db(
        &city,
        &[CityEntry {
            city: "Basel",
            region: "BS",
            ..ZURICH
        }],
    );
    let mut tag = 92;
    eventually(15, "Basel after the reload", || {
        tag += 1;
        let evs = events(tag, 0..1);
        let id = evs[0].event_id.clone();
        let (agg, db) = (&agg, &db);
        async move {
            assert_eq!(
                agg.ingest(frame_for("acme-web", evs, batch_id()))
                    .await
                    .status(),
                202
            );
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            sqlx::query_scalar::<_, Option<String>>("SELECT city FROM events WHERE event_id = $1")
                .bind(&id)
                .fetch_optional(&db.pool)
                .await
                .unwrap()
                .flatten()
                .as_deref()
                == Some("Basel")
        }
    })
    .await;

    // A half-written or corrupt file is refused; Basel stays.
    write_atomically(&city, b"this is not an mmdb file");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let evs = events(200, 0..1);
    let id = evs[0].event_id.clone();
    assert_eq!(
        agg.ingest(frame_for("acme-web", evs, batch_id()))
            .await
            .status(),
        202
    );
    eventually(15, "row stored", || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM events WHERE event_id = $1")
            .bind(&id)
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    assert_eq!(geo_of(&db, &id).await.2.as_deref(), Some("Basel"));
    assert!(agg.log().contains("does not open; keeping the one in use"));
}

#[tokio::test]
async fn without_a_database_events_are_stored_unenriched() {
    let (db, redis, dir) = (
        TestDb::new().await,
        TestRedis::new(),
        tempfile::tempdir().unwrap(),
    );
    let agg = Aggregator::start(&config(&db, &redis, dir.path())).await;
    let evs = events(95, 0..2);
    let id = evs[0].event_id.clone();
    assert_eq!(
        agg.ingest(frame_for("acme-web", evs, batch_id()))
            .await
            .status(),
        202
    );
    eventually(15, "2 rows", || async {
        db.count_events("acme-web").await == 2
    })
    .await;
    let g = geo_of(&db, &id).await;
    assert_eq!(g.0.as_deref(), Some("DE"), "the edge's country hint");
    assert_eq!((g.2, g.5), (None, None));
    assert!(agg.log().contains("GeoIP database not readable"));
}

#[test]
fn outpost_geoip_lookup_and_status_print_json() {
    let dir = tempfile::tempdir().unwrap();
    write_city_db(&dir.path().join("city.mmdb"), &[ZURICH]);
    let cfg = dir.path().join("outpost.toml");
    std::fs::write(
        &cfg,
        format!(
            "[geoip]\ncity_db = \"{}\"\n",
            dir.path().join("city.mmdb").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(outpost_tests::outpost_bin())
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let hit = run(&["geoip", "lookup", "203.0.113.99"]);
    assert_eq!(hit["geo"]["city"], "Zürich");
    assert_eq!(hit["geo"]["country"], "CH");
    let miss = run(&["geoip", "lookup", "198.51.100.1"]);
    assert!(miss["geo"].is_null());
    let status = run(&["geoip", "status"]);
    assert_eq!(status["city"]["loaded"], true);
    assert_eq!(status["city"]["database_type"], "GeoIP2-City");
    assert_eq!(status["asn"]["configured"], false);
}
