//! GeoIP enrichment end to end: the real aggregator reads test databases
//! built with `mmdb-writer`, stores what they say with each row, and picks
//! up a replaced database without a restart.

use std::process::Command;

use outpost_tests::aggregator::{
    Aggregator, batch_id, events, eventually, frame_for, frame_from_ip,
};
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

/// Waits until the event with `event_id` is stored.
async fn wait_stored(db: &TestDb, event_id: &str) {
    eventually(15, "row stored", || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM events WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 1
    })
    .await;
}

/// An aggregator whose City database knows only Zürich, and the path of
/// that database (`dir` holds it).
async fn start_with_zurich(
    db: &TestDb,
    redis: &TestRedis,
    dir: &std::path::Path,
) -> (Aggregator, std::path::PathBuf) {
    let city = dir.join("city.mmdb");
    write_city_db(&city, &[ZURICH]);
    (Aggregator::start(&config(db, redis, dir)).await, city)
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
    agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
        .await;
    db.wait_rows("acme-web", 3, 15).await;
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
    let (agg, city) = start_with_zurich(&db, &redis, dir.path()).await;
    let first = events(91, 0..1);
    agg.ingest_accepted(frame_for("acme-web", first.clone(), batch_id()))
        .await;
    db.wait_rows("acme-web", 1, 15).await;
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
            agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            sqlx::query_scalar::<_, Option<String>>("SELECT city FROM events WHERE event_id = $1")
                .bind(id.as_str())
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
    agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
        .await;
    wait_stored(&db, &id).await;
    assert_eq!(geo_of(&db, &id).await.2.as_deref(), Some("Basel"));
    assert!(agg.log().contains("does not open; keeping the one in use"));
}

/// The database in use is a private copy: a file truncated or rewritten
/// in place (not renamed over) changes nothing under the lookups — a
/// mapping of the file itself would fault on the vanished pages and kill
/// the process.
#[tokio::test]
async fn a_database_truncated_in_place_leaves_the_copy_in_use_serving() {
    let (db, redis, dir) = (
        TestDb::new().await,
        TestRedis::new(),
        tempfile::tempdir().unwrap(),
    );
    let (agg, city) = start_with_zurich(&db, &redis, dir.path()).await;
    let first = events(300, 0..1);
    agg.ingest_accepted(frame_for("acme-web", first.clone(), batch_id()))
        .await;
    db.wait_rows("acme-web", 1, 15).await;

    // Same inode, now empty.
    std::fs::File::create(&city).unwrap();
    // Addresses the lookup cache has not seen: read from the database.
    for (tag, ip) in [(301, "203.0.113.99"), (302, "203.0.113.100")] {
        let evs = events(tag, 0..1);
        let id = evs[0].event_id.clone();
        agg.ingest_accepted(frame_from_ip("acme-web", evs, batch_id(), ip))
            .await;
        wait_stored(&db, &id).await;
        assert_eq!(geo_of(&db, &id).await.2.as_deref(), Some("Zürich"), "{ip}");
        // The second address comes after the reload check refused the
        // empty file.
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    }
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
    agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
        .await;
    db.wait_rows("acme-web", 2, 15).await;
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
        let out = outpost_tests::run_ok(
            Command::new(outpost_tests::outpost_bin())
                .args(args)
                .arg("--config")
                .arg(&cfg),
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

/// Serves `files` (path → bytes) over HTTP; records the Authorization
/// header of each request.
async fn file_server(
    files: Vec<(&'static str, Vec<u8>)>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::extract::{Path, State};
    let files: std::collections::HashMap<String, Vec<u8>> =
        files.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let auth = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = auth.clone();
    let app = axum::Router::new()
        .route(
            "/{name}",
            axum::routing::get(
                move |State(files): State<
                    std::sync::Arc<std::collections::HashMap<String, Vec<u8>>>,
                >,
                      Path(name): Path<String>,
                      headers: axum::http::HeaderMap| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push(
                            headers
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned(),
                        );
                        match files.get(&name) {
                            Some(b) => (axum::http::StatusCode::OK, b.clone()),
                            None => (axum::http::StatusCode::NOT_FOUND, Vec::new()),
                        }
                    }
                },
            ),
        )
        .with_state(std::sync::Arc::new(files));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, auth)
}

fn tar_gz(name: &str, bytes: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    b.append_data(&mut header, format!("GeoLite2-City_20261124/{name}"), bytes)
        .unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outpost_geoip_download_checks_unpacks_and_swaps_in() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let built = dir.path().join("built.mmdb");
    write_city_db(&built, &[ZURICH]);
    let mmdb = std::fs::read(&built).unwrap();
    let archive = tar_gz("GeoLite2-City.mmdb", &mmdb);
    let sha = format!(
        "{}  GeoLite2-City_20261124.tar.gz\n",
        hex::encode(sha2::Sha256::digest(&archive))
    );
    let (url, auth) = file_server(vec![
        ("city.tar.gz", archive),
        ("city.tar.gz.sha256", sha.into_bytes()),
        (
            "wrong.sha256",
            format!("{}  x\n", "0".repeat(64)).into_bytes(),
        ),
        (
            "notadb.tar.gz",
            tar_gz("GeoLite2-City.mmdb", b"not a database"),
        ),
    ])
    .await;
    let target = dir.path().join("geo/city.mmdb");
    let download = |city_url: &str, sha_url: &str| {
        let cfg = dir.path().join("outpost.toml");
        std::fs::write(
            &cfg,
            format!(
                "[geoip]\ncity_db = \"{}\"\ncity_url = \"{url}/{city_url}\"\ncity_sha256_url = \"{sha_url}\"\ndownload_username = \"42\"\n",
                target.display()
            ),
        )
        .unwrap();
        Command::new(outpost_tests::outpost_bin())
            .args(["geoip", "download", "--config"])
            .arg(&cfg)
            .env("OUTPOST_GEOIP_DOWNLOAD_PASSWORD", "licence-key")
            .output()
            .unwrap()
    };

    // A wrong checksum: refused, nothing written.
    let out =
        tokio::task::block_in_place(|| download("city.tar.gz", &format!("{url}/wrong.sha256")));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHA-256 mismatch"));
    assert!(!target.exists());

    // Not a database: refused, nothing written.
    let out = tokio::task::block_in_place(|| download("notadb.tar.gz", ""));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a MaxMind database"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!target.exists());

    // The real thing: verified, unpacked, in place, and used by lookups.
    let out = tokio::task::block_in_place(|| {
        download("city.tar.gz", &format!("{url}/city.tar.gz.sha256"))
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report[0]["verified"], true, "{report}");
    assert_eq!(report[0]["database_type"], "GeoIP2-City");
    assert_eq!(std::fs::read(&target).unwrap(), mmdb);
    // Basic auth from the config user and the environment's password.
    use base64::Engine as _;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("42:licence-key")
    );
    assert!(auth.lock().unwrap().iter().all(|a| *a == expected));
    let cfg = dir.path().join("outpost.toml");
    let out = Command::new(outpost_tests::outpost_bin())
        .args(["geoip", "lookup", "203.0.113.99", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let hit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hit["geo"]["city"], "Zürich");
}
