//! `GET /v1/events`: events that went in through the real ingest path come
//! back out, filtered and paged, only to callers allowed to see them.

use std::collections::HashSet;

use outpost_aggregator::read_api::MAX_EXACT_TOTAL;
use outpost_shared::auth::api_key;
use outpost_shared::auth::permission::Permissions;
use outpost_shared::client::{AuthMethod, ClientRecord, Credential, KeyMaterial};
use outpost_shared::event::Timestamp;
use outpost_tests::aggregator::{Aggregator, batch_id, events, eventually, frame_for, now};
use outpost_tests::stores::{TestDb, TestRedis, store_config};
use serde_json::Value;

const DAY_MS: i64 = 86_400_000;

fn key(id: &str) -> String {
    api_key::format(id, id.as_bytes())
}

/// Where the aggregator keeps events and clients in a test.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Postgres,
    Sqlite,
}

/// The store, as the test reaches it directly (to add clients and count
/// rows): a PostgreSQL database of its own, or the SQLite file the
/// aggregator created and migrated in a temporary directory.
enum Store {
    Postgres(TestDb),
    Sqlite {
        _dir: tempfile::TempDir,
        pool: sqlx::SqlitePool,
    },
}

impl Store {
    async fn count_events(&self, client: &str) -> i64 {
        match self {
            Store::Postgres(db) => db.count_events(client).await,
            Store::Sqlite { pool, .. } => {
                sqlx::query_scalar("SELECT count(*) FROM events WHERE client_id = ?")
                    .bind(client)
                    .fetch_one(pool)
                    .await
                    .unwrap()
            }
        }
    }
}

async fn add_client(db: &Store, id: &str, permissions: &[&str]) {
    add_limited_client(db, id, permissions, None).await
}

async fn add_limited_client(
    db: &Store,
    id: &str,
    permissions: &[&str],
    rate_limit: Option<outpost_shared::ratelimit::RateLimit>,
) {
    let record = ClientRecord {
        id: id.into(),
        name: id.into(),
        method: AuthMethod::ApiKey,
        credentials: vec![Credential {
            key: KeyMaterial::ApiKeyHash {
                sha256: api_key::hash(&key(id)),
            },
            not_after: None,
        }],
        jwt: None,
        permissions: Permissions::parse(permissions.iter().copied()).unwrap(),
        rate_limit,
        ip_rate_limit: None,
        allowed_origins: vec![],
        active: true,
        expires_at: None,
    };
    match db {
        Store::Postgres(db) => {
            sqlx::query("INSERT INTO clients (id, record) VALUES ($1, $2)")
                .bind(id)
                .bind(sqlx::types::Json(&record))
                .execute(&db.pool)
                .await
                .unwrap();
        }
        Store::Sqlite { pool, .. } => {
            sqlx::query("INSERT INTO clients (id, record, updated_at) VALUES (?, ?, 0)")
                .bind(id)
                .bind(sqlx::types::Json(&record))
                .execute(pool)
                .await
                .unwrap();
        }
    }
}

struct Fixture {
    agg: Aggregator,
    db: Store,
    _redis: TestRedis,
    /// (event id, timestamp ms, name, user id) of acme-web's events.
    acme: Vec<(String, i64, String, String)>,
}

async fn fixture() -> Fixture {
    fixture_on(Kind::Postgres).await
}

async fn fixture_on(kind: Kind) -> Fixture {
    let redis = TestRedis::new();
    let (agg, db) = match kind {
        Kind::Postgres => {
            // A locale that does not order text by bytes, as in production.
            let db = TestDb::in_locale("en-US").await;
            let agg = Aggregator::start(&store_config(&db.url, &redis)).await;
            (agg, Store::Postgres(db))
        }
        Kind::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("events.db");
            let config = store_config("postgres://unused", &redis).replace(
                "[postgres]\n",
                &format!(
                    "[sqlite]\nenabled = true\npath = \"{}\"\n\n[postgres]\nenabled = false\n",
                    file.display()
                ),
            );
            let agg = Aggregator::start(&config).await;
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", file.display()))
                .await
                .unwrap();
            (agg, Store::Sqlite { _dir: dir, pool })
        }
    };
    add_client(
        &db,
        "acme-web",
        &["write:events", "read:events", "read:stats"],
    )
    .await;
    add_client(&db, "other-app", &["write:events", "read:events"]).await;
    add_client(&db, "ops", &["admin:*"]).await;
    add_client(&db, "writer", &["write:events"]).await;
    let base = now().millis();
    let mut acme = Vec::new();
    for (client, tags) in [("acme-web", 0..6u32), ("other-app", 6..8u32)] {
        for tag in tags {
            let mut evs = events(700 + tag, 0..50);
            for (i, e) in evs.iter_mut().enumerate() {
                // Three days, several events per millisecond, two names.
                e.timestamp = Some(Timestamp(
                    base - (tag as i64 % 3) * DAY_MS - (i as i64 / 3) * 1000,
                ));
                e.name = Some(if i % 4 == 0 { "checkout" } else { "page_view" }.into());
                e.user_id = Some(format!("u{}", i % 7));
                if client == "acme-web" {
                    acme.push((
                        e.event_id.to_string(),
                        e.timestamp.unwrap().millis(),
                        e.name.clone().unwrap(),
                        format!("u{}", i % 7),
                    ));
                }
            }
            agg.ingest_accepted(frame_for(client, evs, batch_id()))
                .await;
        }
    }
    eventually(20, "all 400 rows", || async {
        db.count_events("acme-web").await == 300 && db.count_events("other-app").await == 100
    })
    .await;
    Fixture {
        agg,
        db,
        _redis: redis,
        acme,
    }
}

/// One test per store for a test body taking a [`Kind`].
macro_rules! on_both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn on_postgres() {
                super::$name(super::Kind::Postgres).await
            }
            #[tokio::test]
            async fn on_sqlite() {
                super::$name(super::Kind::Sqlite).await
            }
        }
    };
}

/// `GET <path>?<query>` as client `who`: status and JSON body.
async fn call(f: &Fixture, path: &str, who: &str, query: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(format!("{}{path}?{query}", f.agg.url))
        .header("authorization", format!("Bearer {}", key(who)))
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

async fn get(f: &Fixture, who: &str, query: &str) -> (u16, Value) {
    call(f, "/v1/events", who, query).await
}

fn ids(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_total_past_the_exact_bound_is_postgres_estimate_and_says_so() {
    let f = fixture().await;
    let Store::Postgres(db) = &f.db else {
        unreachable!("fixture() is on PostgreSQL")
    };
    // More matching rows than an exact total counts, written straight into
    // the table (the ingest path is not what is under test).
    let bulk = MAX_EXACT_TOTAL + 20_000;
    sqlx::query(
        "INSERT INTO events (client_id, event_id, batch_id, edge_id, ts, received_at, kind, name, priority) \
         SELECT 'acme-web', 'bulk-' || g, '00000000-0000-0000-0000-000000000000', 'edge', \
                now() - g * interval '1 ms', now(), 'event', 'bulk', 'normal' \
         FROM generate_series(1, $1) AS g",
    )
    .bind(bulk)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE events")
        .execute(&db.pool)
        .await
        .unwrap();
    let (status, page) = get(&f, "acme-web", "name=bulk&limit=5&total=true").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total_estimated"], true, "{page}");
    let total = page["total"].as_i64().unwrap();
    // Never less than what was counted before giving up, and the planner's
    // figure after ANALYZE is near the truth.
    assert!(total > MAX_EXACT_TOTAL, "{page}");
    assert!(
        (bulk * 7 / 10..=bulk * 13 / 10).contains(&total),
        "{total} for {bulk}"
    );
    // Under the bound the same query is exact.
    let (_, small) = get(&f, "acme-web", "name=checkout&limit=5&total=true").await;
    assert_eq!(small["total_estimated"], false);
}

on_both_stores!(paging_forward_then_back_visits_every_row_once_in_order);
async fn paging_forward_then_back_visits_every_row_once_in_order(kind: Kind) {
    let f = fixture_on(kind).await;
    for order in ["desc", "asc"] {
        let mut pages = Vec::new();
        let (status, mut page) = get(&f, "acme-web", &format!("order={order}&limit=37")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["has_prev"], false);
        loop {
            pages.push(ids(&page));
            if page["has_next"] != true {
                break;
            }
            let next = page["next"].as_str().unwrap().to_owned();
            page = get(
                &f,
                "acme-web",
                &format!("order={order}&limit=37&cursor={next}"),
            )
            .await
            .1;
            assert_eq!(page["has_prev"], true);
        }
        let all: Vec<String> = pages.concat();
        assert_eq!(all.len(), 300, "{order}: every row");
        assert_eq!(
            all.iter().collect::<HashSet<_>>().len(),
            300,
            "{order}: no row twice"
        );
        // The order is by timestamp (then insertion).
        let ts: std::collections::HashMap<&str, i64> = f
            .acme
            .iter()
            .map(|(id, t, _, _)| (id.as_str(), *t))
            .collect();
        let times: Vec<i64> = all.iter().map(|id| ts[id.as_str()]).collect();
        let mut sorted = times.clone();
        sorted.sort();
        if order == "desc" {
            sorted.reverse();
        }
        assert_eq!(times, sorted, "{order}: ordered by timestamp");
        // And back: prev cursors from the last page return the same pages.
        let mut back = vec![ids(&page)];
        while page["has_prev"] == true {
            let prev = page["prev"].as_str().unwrap().to_owned();
            page = get(
                &f,
                "acme-web",
                &format!("order={order}&limit=37&cursor={prev}"),
            )
            .await
            .1;
            back.push(ids(&page));
        }
        back.reverse();
        assert_eq!(back, pages, "{order}: backward pages equal forward pages");
    }
}

on_both_stores!(filters_select_exactly_the_matching_rows);
async fn filters_select_exactly_the_matching_rows(kind: Kind) {
    let f = fixture_on(kind).await;
    let day = |ms: i64| chrono_day(ms);
    let newest = f.acme.iter().map(|e| e.1).max().unwrap();
    let today = day(newest);
    let expected = f
        .acme
        .iter()
        .filter(|(_, t, n, _)| n == "checkout" && day(*t) == today)
        .count();
    let (status, page) = get(
        &f,
        "acme-web",
        &format!("name=checkout&from={today}&to={today}&limit=1000"),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), expected);
    assert!(
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] == "checkout")
    );
    let (_, all_checkouts) = get(&f, "acme-web", "name=checkout&limit=1000").await;
    assert_eq!(
        all_checkouts["data"].as_array().unwrap().len(),
        f.acme.iter().filter(|e| e.2 == "checkout").count()
    );
    assert!(all_checkouts.get("total").is_none(), "only when asked");
    // A total, when asked, counts every match, not just the page; the next
    // page's cursor is still good without it.
    let (_, small) = get(&f, "acme-web", "name=checkout&limit=5&total=true").await;
    assert_eq!(
        small["total"].as_u64(),
        Some(f.acme.iter().filter(|e| e.2 == "checkout").count() as u64),
        "{small}"
    );
    assert_eq!(small["total_estimated"], false);
    let next = small["next"].as_str().unwrap();
    let (status, _) = get(
        &f,
        "acme-web",
        &format!("name=checkout&limit=5&cursor={next}"),
    )
    .await;
    assert_eq!(status, 200);
}

fn chrono_day(ms: i64) -> String {
    Timestamp(ms).to_rfc3339().unwrap()[..10].to_owned()
}

on_both_stores!(callers_see_only_what_they_may);
async fn callers_see_only_what_they_may(kind: Kind) {
    let f = fixture_on(kind).await;
    let (_, own) = get(&f, "acme-web", "limit=1000").await;
    assert!(
        own["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["client_id"] == "acme-web")
    );
    assert_eq!(
        get(&f, "acme-web", "client_id=other-app").await.1["code"],
        40301
    );
    let (_, everything) = get(&f, "ops", "limit=1000").await;
    assert_eq!(
        everything["data"].as_array().unwrap().len(),
        400,
        "admin:* sees every client"
    );
    let (_, other) = get(&f, "ops", "client_id=other-app&limit=1000").await;
    assert_eq!(other["data"].as_array().unwrap().len(), 100);
    let (status, body) = get(&f, "writer", "").await;
    assert_eq!(
        (status, body["code"].as_u64()),
        (403, Some(40301)),
        "write:events alone cannot read"
    );

    let anonymous = reqwest::get(format!("{}/v1/events", f.agg.url))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = reqwest::Client::new()
        .get(format!("{}/v1/events", f.agg.url))
        .header(
            "authorization",
            format!("Bearer {}", api_key::format("acme-web", b"guess")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.json::<Value>().await.unwrap()["code"], 40103);
}

on_both_stores!(bad_parameters_and_altered_cursors_are_refused);
async fn bad_parameters_and_altered_cursors_are_refused(kind: Kind) {
    let f = fixture_on(kind).await;
    let (status, body) = get(&f, "acme-web", "colour=red").await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(40014)));
    assert!(body["message"].as_str().unwrap().contains("colour"));
    assert_eq!(get(&f, "acme-web", "limit=5000").await.1["code"], 40014);
    assert_eq!(get(&f, "acme-web", "from=last-week").await.1["code"], 40014);
    let next = get(&f, "acme-web", "limit=10").await.1["next"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut altered = next.clone().into_bytes();
    altered[5] = if altered[5] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    assert_eq!(
        get(&f, "acme-web", &format!("limit=10&cursor={altered}"))
            .await
            .1["code"],
        40015
    );
    // A cursor belongs to its query: another filter refuses it.
    assert_eq!(
        get(
            &f,
            "acme-web",
            &format!("limit=10&name=checkout&cursor={next}")
        )
        .await
        .1["code"],
        40015
    );
    // The same query with another page size keeps it.
    assert_eq!(
        get(&f, "acme-web", &format!("limit=20&cursor={next}"))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn the_readme_query_example_runs() {
    let f = fixture().await;
    outpost_tests::require_tool("curl");
    let example =
        outpost_tests::fenced_block_after(&outpost_tests::readme(), "example: query-events");
    let agg_url = f.agg.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(&example)
            .env("OUTPOST_URL", agg_url)
            .env("OUTPOST_KEY", key("acme-web"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    let data = page["data"].as_array().unwrap();
    assert!(!data.is_empty(), "{page}");
    assert!(
        data.iter()
            .all(|e| e["name"] == "checkout" && e["client_id"] == "acme-web")
    );
}

async fn stats(f: &Fixture, who: &str, query: &str) -> (u16, Value) {
    call(f, "/v1/stats", who, query).await
}

on_both_stores!(stats_count_events_per_bucket_and_group);
async fn stats_count_events_per_bucket_and_group(kind: Kind) {
    let f = fixture_on(kind).await;
    let from = chrono_day(f.acme.iter().map(|e| e.1).min().unwrap());
    let query = format!("bucket=day&group_by=name&users=true&from={from}");
    // PostgreSQL's sketches trail the rows by up to a second.
    eventually(20, "every point's distinct users", || async {
        let (_, body) = stats(&f, "acme-web", &query).await;
        body["series"].as_array().is_some_and(|series| {
            series.iter().all(|point| {
                let day = &point["bucket"].as_str().unwrap_or_default()[..10];
                let users: HashSet<&str> = f
                    .acme
                    .iter()
                    .filter(|(_, t, n, _)| chrono_day(*t) == day && point["name"] == n.as_str())
                    .map(|e| e.3.as_str())
                    .collect();
                point["users"].as_u64() == Some(users.len() as u64)
            })
        })
    })
    .await;
    let (status, body) = stats(&f, "acme-web", &query).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["bucket"].as_str(), body["group_by"].as_str()),
        (Some("day"), Some("name"))
    );
    let series = body["series"].as_array().unwrap();
    // Every (day, name) count equals what was sent.
    for point in series {
        let day = &point["bucket"].as_str().unwrap()[..10];
        let name = point["name"].as_str().unwrap();
        let matching: Vec<_> = f
            .acme
            .iter()
            .filter(|(_, t, n, _)| chrono_day(*t) == day && n == name)
            .collect();
        assert_eq!(
            point["events"].as_u64(),
            Some(matching.len() as u64),
            "{day} {name}"
        );
        let users: HashSet<&str> = matching.iter().map(|e| e.3.as_str()).collect();
        assert_eq!(
            point["users"].as_u64(),
            Some(users.len() as u64),
            "{day} {name}: distinct users"
        );
    }
    let total: u64 = series.iter().map(|p| p["events"].as_u64().unwrap()).sum();
    assert_eq!(total, 300, "own events only, all of them");
    // PostgreSQL counts distinct users with the sink's sketches (exact
    // on a few users), SQLite from the rows.
    let users_source = match kind {
        Kind::Postgres => "rollup",
        Kind::Sqlite => "events",
    };
    assert_eq!(body["source"], users_source, "{body}");
    // Without users, PostgreSQL answers from the per-minute rollups: the
    // same counts as the rows give.
    let counts = |v: &Value| -> Vec<(String, String, u64)> {
        v["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["bucket"].as_str().unwrap().to_owned(),
                    p["name"].as_str().unwrap_or("").to_owned(),
                    p["events"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let (_, quick) = stats(
        &f,
        "acme-web",
        &format!("bucket=day&group_by=name&from={from}"),
    )
    .await;
    let expected_source = match kind {
        Kind::Postgres => "rollup",
        Kind::Sqlite => "events",
    };
    assert_eq!(quick["source"], expected_source, "{quick}");
    assert_eq!(counts(&quick), counts(&body));
    // A filter on the grouped dimension is answered from rollups too; one on
    // another dimension needs the rows. Both count the same.
    for (query, source) in [
        ("group_by=name&name=checkout", expected_source),
        ("group_by=name&level=info", "events"),
        ("group_by=name&user_id=u1", "events"),
    ] {
        let (_, filtered) = stats(&f, "acme-web", &format!("bucket=day&{query}&from={from}")).await;
        assert_eq!(filtered["source"], source, "{query}: {filtered}");
        let total: u64 = filtered["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["events"].as_u64().unwrap())
            .sum();
        let want = f
            .acme
            .iter()
            .filter(|e| match query {
                "group_by=name&name=checkout" => e.2 == "checkout",
                "group_by=name&user_id=u1" => e.3 == "u1",
                _ => false, // no event has a level
            })
            .count();
        assert_eq!(total as usize, want, "{query}");
    }
    // Ungrouped hours add up the same; distinct users only when asked.
    let (_, hourly) = stats(&f, "acme-web", &format!("bucket=hour&from={from}")).await;
    assert!(
        hourly["series"][0].get("users").is_none(),
        "users only with users=true: {hourly}"
    );
    let hourly_total: u64 = hourly["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["events"].as_u64().unwrap())
        .sum();
    assert_eq!(hourly_total, 300);
    // Filters apply.
    let (_, checkouts) = stats(
        &f,
        "acme-web",
        &format!("bucket=day&name=checkout&from={from}"),
    )
    .await;
    let n: u64 = checkouts["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["events"].as_u64().unwrap())
        .sum();
    assert_eq!(
        n as usize,
        f.acme.iter().filter(|e| e.2 == "checkout").count()
    );
}

on_both_stores!(stats_groups_come_in_byte_order);
/// Points of a bucket come in byte order of their group, from the rollups
/// and from the rows alike, whatever the database's locale (the fixture's
/// PostgreSQL sorts as `en-US` does: `alpha Beta éclair Zeta`).
async fn stats_groups_come_in_byte_order(kind: Kind) {
    let f = fixture_on(kind).await;
    // Four days back: a day no fixture event is in.
    let at = now().millis() - 4 * DAY_MS;
    let names = ["Zeta", "alpha", "Beta", "éclair", "_under", "Äpfel", "beta"];
    let mut evs = events(900, 0..names.len() as u32);
    for (e, name) in evs.iter_mut().zip(names) {
        e.timestamp = Some(Timestamp(at));
        e.name = Some(name.into());
        e.user_id = Some("u-order".into());
    }
    f.agg
        .ingest_accepted(frame_for("acme-web", evs, batch_id()))
        .await;
    let day = chrono_day(at); // `to` as a date is the end of that day
    let mut want: Vec<&str> = names.to_vec();
    want.sort_unstable(); // str's order is byte order
    let expected_source = match kind {
        Kind::Postgres => "rollup",
        Kind::Sqlite => "events",
    };
    // The rollups (with the sketches' users too), then the rows (a filter
    // on another dimension).
    for (extra, source) in [
        ("", expected_source),
        ("&users=true", expected_source),
        ("&user_id=u-order", "events"),
    ] {
        let query = format!("bucket=day&group_by=name&from={day}&to={day}{extra}");
        eventually(20, "the new day's seven points", || async {
            stats(&f, "acme-web", &query).await.1["series"]
                .as_array()
                .is_some_and(|s| s.len() == names.len())
        })
        .await;
        let (status, body) = stats(&f, "acme-web", &query).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["source"], source, "{query}: {body}");
        let got: Vec<&str> = body["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(got, want, "{query}");
    }
}

#[tokio::test]
async fn stats_need_read_stats_and_valid_parameters() {
    let f = fixture().await;
    assert_eq!(
        stats(&f, "other-app", "").await.1["code"],
        40301,
        "read:events alone is not read:stats"
    );
    assert_eq!(
        stats(&f, "ops", "group_by=client&bucket=day").await.0,
        200,
        "admin:* may"
    );
    for bad in ["bucket=week", "group_by=user_id", "order=asc", "users=yes"] {
        let (status, body) = stats(&f, "acme-web", bad).await;
        assert_eq!((status, body["code"].as_u64()), (400, Some(40014)), "{bad}");
    }
}

#[tokio::test]
async fn the_readme_stats_example_runs() {
    let f = fixture().await;
    let doc = outpost_tests::readme();
    let start = doc.find("### Counting: `GET /v1/stats`").unwrap();
    let block = &doc[start..];
    let cmd = block[block.find("```sh\n").unwrap() + 6..]
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let (url, key) = (f.agg.url.clone(), key("acme-web"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(cmd)
            .env("OUTPOST_URL", url)
            .env("OUTPOST_KEY", key)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = body["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["events"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 300, "{body}");
}

#[tokio::test]
async fn each_caller_is_held_to_its_rate_limit() {
    let f = fixture().await;
    add_limited_client(
        &f.db,
        "dashboard",
        &["read:events"],
        Some(outpost_shared::ratelimit::RateLimit {
            limit: 3,
            period_secs: 60,
        }),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(get(&f, "dashboard", "limit=1").await.0, 200);
    }
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/events?limit=1", f.agg.url))
        .header("authorization", format!("Bearer {}", key("dashboard")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "20");
    assert_eq!(resp.headers()["ratelimit-remaining"], "0");
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], 42901);
    assert_eq!(
        get(&f, "acme-web", "limit=1").await.0,
        200,
        "another caller is not affected"
    );
}

/// The `properties` and `required` of a component schema of the document.
fn schema_keys(doc: &Value, name: &str) -> (HashSet<String>, HashSet<String>) {
    let schema = &doc["components"]["schemas"][name];
    let props = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema {name}"))
        .keys()
        .cloned()
        .collect();
    let required = schema["required"]
        .as_array()
        .map(|r| r.iter().map(|k| k.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    (props, required)
}

/// Checks one JSON object against a schema: no undescribed key, no
/// missing required key.
fn conforms(doc: &Value, name: &str, value: &Value, extra: &[&str]) {
    let (props, required) = schema_keys(doc, name);
    let keys: HashSet<String> = value.as_object().unwrap().keys().cloned().collect();
    for k in &keys {
        assert!(
            props.contains(k) || extra.contains(&k.as_str()),
            "{name}: `{k}` is not described\n{value}"
        );
    }
    for k in &required {
        assert!(keys.contains(k), "{name}: required `{k}` missing\n{value}");
    }
}

#[tokio::test]
async fn the_openapi_document_covers_every_route_and_describes_real_answers() {
    let f = fixture().await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", f.agg.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    let documented: HashSet<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect();
    // The README's endpoint table lists the same routes.
    let readme = outpost_tests::readme();
    let section = &readme[readme.find("### Endpoints").unwrap()..];
    let in_readme: HashSet<String> = section
        .lines()
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(documented, in_readme, "README endpoints vs /openapi.json");
    // Every documented route is served (none falls through to 404/40401).
    let http = reqwest::Client::new();
    for route in &documented {
        let (method, path) = route.split_once(' ').unwrap();
        let url = format!("{}{}", f.agg.url, path.replace("{id}", "acme-web"));
        let resp = http
            .request(method.parse().unwrap(), url)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(
            !(status == 404 && body["code"] == 40401),
            "{route} is documented but not served"
        );
    }
    // Every documented parameter is one the handler takes.
    for (path, who) in [("/v1/events", "acme-web"), ("/v1/stats", "acme-web")] {
        for p in doc["paths"][path]["get"]["parameters"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap();
            let (_, body) = call(&f, path, who, &format!("{name}=x")).await;
            assert_ne!(
                body["message"].as_str().unwrap_or(""),
                format!("{name}: unknown parameter"),
                "{path} documents {name}"
            );
        }
    }
    // The shared filters and each route's own parameters are all there.
    for (path, own) in [("/v1/events", "cursor"), ("/v1/stats", "bucket")] {
        let names: Vec<&str> = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        for needed in ["kind", "name", "client_id", "trace_id", "from", "to", own] {
            assert!(names.contains(&needed), "{path} lacks {needed}: {names:?}");
        }
    }
    // Real answers have the documented shape.
    let (_, page) = get(&f, "acme-web", "limit=3&total=true").await;
    conforms(&doc, "EventsPage", &page, &[]);
    for event in page["data"].as_array().unwrap() {
        conforms(&doc, "StoredEvent", event, &[]);
    }
    let (_, answer) = stats(&f, "acme-web", "bucket=day&group_by=name&users=true").await;
    conforms(&doc, "StatsAnswer", &answer, &[]);
    for point in answer["series"].as_array().unwrap() {
        conforms(&doc, "StatsPoint", point, &["name"]);
    }
    let (_, refused) = get(&f, "acme-web", "colour=red").await;
    conforms(&doc, "ErrorEnvelope", &refused, &[]);
    let ready: Value = reqwest::get(format!("{}/health/ready", f.agg.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    conforms(&doc, "Ready", &ready, &[]);
}

/// Restarts `agg` with a new edge key in front of the old ones (the first
/// step of an edge-key rotation, README "Rotating the edge key").
async fn rotate_first_edge_key(agg: &mut Aggregator, id: &str) {
    agg.kill();
    let secret = format!("{id}-edge-secret-{id}-edge-secret-{id}");
    let secret = base64url(secret.as_bytes());
    agg.edit_config(|c| {
        c.replacen(
            "[[edge_keys]]\n",
            &format!("[[edge_keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n\n[[edge_keys]]\n"),
            1,
        )
    });
    agg.spawn().await;
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn cursors_signed_with_the_cursor_secret_survive_an_edge_key_rotation_and_open_on_another_node()
 {
    let mut f = fixture().await;
    // Without a cursor secret, cursors are signed with a key derived from
    // the first edge key: rotating that key invalidates them.
    let (_, page) = get(&f, "acme-web", "limit=2").await;
    let before = page["next"].as_str().unwrap().to_owned();
    rotate_first_edge_key(&mut f.agg, "rotated-1").await;
    let (status, refused) = get(&f, "acme-web", &format!("limit=2&cursor={before}")).await;
    assert_eq!((status, refused["code"].as_i64()), (400, Some(40015)));

    // With `read_api.cursor_secret`, the cursor outlives the rotation.
    let secret = base64url(b"cursor-secret-cursor-secret-cursor-secret");
    f.agg.kill();
    f.agg
        .edit_config(|c| format!("{c}\n[read_api]\ncursor_secret = \"{secret}\"\n"));
    f.agg.spawn().await;
    let (_, page) = get(&f, "acme-web", "limit=2").await;
    let next = page["next"].as_str().unwrap().to_owned();
    let (status, second) = get(&f, "acme-web", &format!("limit=2&cursor={next}")).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(ids(&second).len(), 2);
    rotate_first_edge_key(&mut f.agg, "rotated-2").await;
    let (status, again) = get(&f, "acme-web", &format!("limit=2&cursor={next}")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        ids(&again),
        ids(&second),
        "the same page after the rotation"
    );

    // And on another aggregator with other edge keys but the same secret.
    let Store::Postgres(db) = &f.db else {
        unreachable!("fixture() is on PostgreSQL")
    };
    let other = Aggregator::start(&format!(
        "{}\n[read_api]\ncursor_secret = \"{secret}\"\n",
        store_config(&db.url, &f._redis)
    ))
    .await;
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/events?limit=2&cursor={next}", other.url))
        .header("authorization", format!("Bearer {}", key("acme-web")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let elsewhere: Value = resp.json().await.unwrap();
    assert_eq!(
        ids(&elsewhere),
        ids(&second),
        "the same page on another node"
    );
}

/// `GET /v1/stats?<query>` as client `who` on `agg`.
async fn stats_on(agg: &Aggregator, who: &str, query: &str) -> Value {
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/stats?{query}", agg.url))
        .header("authorization", format!("Bearer {}", key(who)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Exact distinct users of acme-web's events, per name, at or after `from_ms`
/// and before `to_ms`.
async fn exact_users(db: &TestDb, from_ms: i64, to_ms: i64) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT name, count(DISTINCT user_id) FROM events WHERE client_id = 'acme-web' \
         AND ts >= to_timestamp($1 / 1000.0) AND ts < to_timestamp($2 / 1000.0) GROUP BY 1 ORDER BY 1",
    )
    .bind(from_ms)
    .bind(to_ms)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// (name, users) of a stats answer grouped by name, and its source.
fn users_by_name(answer: &Value) -> (String, Vec<(String, i64)>) {
    let mut points: Vec<(String, i64)> = answer["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["users"].as_i64().unwrap(),
            )
        })
        .collect();
    points.sort();
    (answer["source"].as_str().unwrap().to_owned(), points)
}

/// Distinct users come from the HyperLogLog sketches the sink keeps (README
/// "Counting"): within 2 % of the exact count on thousands of users;
/// rebuilt from the rows after a crash took the sketches away; and the
/// hours stored before the sketches existed are counted from the rows until
/// `outpost backfill-users` builds theirs.
#[tokio::test]
async fn distinct_users_come_from_sketches_rebuilt_after_a_crash_and_backfilled() {
    let redis = TestRedis::new();
    let db = TestDb::new().await;
    let mut agg = Aggregator::start(&store_config(&db.url, &redis)).await;
    let store = Store::Postgres(db);
    add_client(&store, "acme-web", &["write:events", "read:stats"]).await;
    let Store::Postgres(db) = &store else {
        unreachable!()
    };
    const HOUR_MS: i64 = 3_600_000;
    let now_ms = now().millis();
    let this_hour = now_ms / HOUR_MS * HOUR_MS;
    // 6,000 events of 4,000 users in this hour (never in the future), and
    // 300 events of 50 users two days ago.
    let old_hour = this_hour - 2 * DAY_MS;
    for b in 0..60u32 {
        let mut evs = events(900 + b, 0..100);
        for (i, e) in evs.iter_mut().enumerate() {
            let n = b as usize * 100 + i;
            e.timestamp = Some(Timestamp((now_ms - n as i64).max(this_hour)));
            e.name = Some(
                if n.is_multiple_of(3) {
                    "checkout"
                } else {
                    "page_view"
                }
                .into(),
            );
            e.user_id = Some(format!("user-{}", n % 4_000));
        }
        agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
            .await;
    }
    for b in 0..3u32 {
        let mut evs = events(990 + b, 0..100);
        for (i, e) in evs.iter_mut().enumerate() {
            e.timestamp = Some(Timestamp(old_hour + i as i64 * 1000));
            e.name = Some("signup".into());
            e.user_id = Some(format!("old-{}", i % 50));
        }
        agg.ingest_accepted(frame_for("acme-web", evs, batch_id()))
            .await;
    }
    db.wait_rows("acme-web", 6_300, 30).await;
    let exact = exact_users(db, this_hour, this_hour + HOUR_MS).await;
    assert_eq!(exact.len(), 2);
    let from = Timestamp(this_hour).to_rfc3339().unwrap();
    let query = format!("bucket=hour&group_by=name&users=true&from={from}");
    let within = |got: &[(String, i64)]| {
        got.len() == exact.len()
            && got
                .iter()
                .zip(&exact)
                .all(|((n, u), (en, eu))| n == en && ((*u - *eu).abs() as f64) <= 0.02 * *eu as f64)
    };
    eventually(20, "users of this hour from the sketches", || async {
        let (source, got) = users_by_name(&stats_on(&agg, "acme-web", &query).await);
        source == "rollup" && within(&got)
    })
    .await;
    let all = stats_on(
        &agg,
        "acme-web",
        &format!("bucket=day&users=true&from={from}"),
    )
    .await;
    assert_eq!(all["source"], "rollup", "{all}");
    let users = all["series"][0]["users"].as_i64().unwrap();
    assert!(
        (users - 4_000).abs() <= 80,
        "4,000 users counted as {users}"
    );
    assert_eq!(all["series"][0]["events"], 6_000);

    // A crash took every sketch: the restart rebuilds the last minutes.
    agg.kill();
    sqlx::query("DELETE FROM user_sketches WHERE hour = $1")
        .bind(this_hour / HOUR_MS)
        .execute(&db.pool)
        .await
        .unwrap();
    agg.spawn().await;
    eventually(20, "users of this hour rebuilt from the rows", || async {
        let (source, got) = users_by_name(&stats_on(&agg, "acme-web", &query).await);
        source == "rollup" && within(&got)
    })
    .await;

    // Two days ago, as if stored before this release: no sketches, and
    // the sketches complete only from this hour.
    let old_query = format!(
        "bucket=hour&group_by=name&users=true&from={}&to={}",
        Timestamp(old_hour).to_rfc3339().unwrap(),
        Timestamp(old_hour + HOUR_MS).to_rfc3339().unwrap()
    );
    eventually(20, "users of two days ago from the sketches", || async {
        users_by_name(&stats_on(&agg, "acme-web", &old_query).await)
            == ("rollup".into(), vec![("signup".into(), 50)])
    })
    .await;
    sqlx::query("DELETE FROM user_sketches WHERE hour = $1")
        .bind(old_hour / HOUR_MS)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE user_sketches_since SET hour = $1")
        .bind(this_hour / HOUR_MS)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        users_by_name(&stats_on(&agg, "acme-web", &old_query).await),
        ("events".into(), vec![("signup".into(), 50)]),
        "before the sketches: counted from the rows"
    );
    // README's command, from that day.
    let example =
        outpost_tests::fenced_block_after(&outpost_tests::readme(), "example: backfill-users");
    let args: Vec<String> = example
        .split_whitespace()
        .skip(1)
        .map(|a| {
            if a == "2026-11-01" {
                chrono_day(old_hour)
            } else {
                a.to_owned()
            }
        })
        .collect();
    assert_eq!(args[..2], ["backfill-users", "--from"], "{example}");
    let out = std::process::Command::new(outpost_tests::outpost_bin())
        .args(&args)
        .arg("--config")
        .arg(agg.dir.join("outpost.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["events"], 6_300, "{report}");
    assert_eq!(
        users_by_name(&stats_on(&agg, "acme-web", &old_query).await),
        ("rollup".into(), vec![("signup".into(), 50)]),
        "backfilled"
    );
    let since: i64 = sqlx::query_scalar("SELECT hour FROM user_sketches_since")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(since, (old_hour - old_hour.rem_euclid(DAY_MS)) / HOUR_MS);
    // This hour's sketches merged with the rebuild: unchanged.
    let (_, got) = users_by_name(&stats_on(&agg, "acme-web", &query).await);
    assert!(within(&got), "{got:?} vs {exact:?}");
}
