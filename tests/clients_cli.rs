//! `outpost clients …` through the real binary against the real
//! PostgreSQL, and the effect of each command on a running aggregator.

use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use outpost_shared::auth::signature::{self, SignedRequest};
use outpost_tests::aggregator::Aggregator;
use outpost_tests::stores::{TestDb, TestRedis, store_config};
use serde_json::Value;

fn secrets_key() -> String {
    B64.encode([42u8; 32])
}

fn clients(db: &TestDb, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(outpost_tests::outpost_bin())
        .arg("clients")
        .args(args)
        .arg("--json")
        .env("OUTPOST_POSTGRES_URL", &db.url)
        .env("OUTPOST_SECRETS_KEY", secrets_key())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.success(),
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(db: &TestDb, args: &[&str]) -> Value {
    let (success, v, err) = clients(db, args);
    assert!(success, "outpost clients {args:?}: {err}");
    v
}

async fn read_events(agg: &Aggregator, key: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/events", agg.url))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn every_clients_subcommand_works_against_a_running_aggregator() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start_with_env(
        &store_config(&db.url, &redis),
        &[("OUTPOST_SECRETS_KEY", &secrets_key())],
    )
    .await;

    // create: an API key, printed once, works at once.
    let created = ok(
        &db,
        &[
            "create",
            "--name",
            "Ops dashboard",
            "--method",
            "api-key",
            "--permissions",
            "read:events",
        ],
    );
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ops-dashboard-"), "{id}");
    let key1 = created["api_key"].as_str().unwrap().to_owned();
    assert_eq!(read_events(&agg, &key1).await.0, 200);

    // list and show never print key material.
    let listed = ok(&db, &["list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id.as_str())
    );
    let shown = ok(&db, &["show", &id]);
    assert_eq!(shown["credentials"][0]["type"], "api_key_hash");
    assert!(!shown.to_string().contains(&key1));

    // revoke and activate.
    ok(&db, &["revoke", &id]);
    assert_eq!(read_events(&agg, &key1).await.1["code"], 40111);
    ok(&db, &["activate", &id]);
    assert_eq!(read_events(&agg, &key1).await.0, 200);

    // rotate: both keys during the grace period, then only the new one.
    let rotated = ok(&db, &["rotate", &id, "--grace-secs", "3600"]);
    let key2 = rotated["api_key"].as_str().unwrap().to_owned();
    assert_ne!(key1, key2);
    assert_eq!(
        read_events(&agg, &key1).await.0,
        200,
        "old key within the grace period"
    );
    assert_eq!(read_events(&agg, &key2).await.0, 200, "new key");
    let rotated = ok(&db, &["rotate", &id, "--grace-secs", "0"]);
    let key3 = rotated["api_key"].as_str().unwrap().to_owned();
    assert_eq!(
        read_events(&agg, &key2).await.1["code"],
        40103,
        "old key after its grace period"
    );
    assert_eq!(read_events(&agg, &key3).await.0, 200);

    // delete needs --force.
    let (refused, _, err) = clients(&db, &["delete", &id]);
    assert!(!refused && err.contains("--force"), "{err}");
    ok(&db, &["delete", &id, "--force"]);
    assert_eq!(read_events(&agg, &key3).await.1["code"], 40102);
}

#[tokio::test]
async fn hmac_secrets_are_sealed_at_rest_and_sign_produces_valid_headers() {
    let db = TestDb::new().await;
    let created = ok(
        &db,
        &[
            "create",
            "--name",
            "backend",
            "--id",
            "backend",
            "--method",
            "hmac",
            "--rate-limit",
            "100/60",
        ],
    );
    // The key is the secret's text, as printed.
    let secret = created["secret"].as_str().unwrap().as_bytes().to_vec();
    // What the table holds is not the secret.
    let stored: Value = sqlx::query_scalar("SELECT record FROM clients WHERE id = 'backend'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let at_rest = stored["credentials"][0]["key"]["secret"].as_str().unwrap();
    assert_ne!(at_rest.as_bytes(), secret);
    assert_ne!(B64.decode(at_rest).unwrap(), secret);
    assert!(
        !stored
            .to_string()
            .contains(created["secret"].as_str().unwrap())
    );
    assert_eq!(stored["rate_limit"]["limit"], 100);

    let headers = ok(
        &db,
        &[
            "sign",
            "backend",
            "--path",
            "/v1/batch",
            "--body",
            "{\"batch\":[]}",
            "--nonce",
            "n-9",
        ],
    );
    let req = SignedRequest {
        method: "POST",
        path_and_query: "/v1/batch",
        timestamp: headers["X-Outpost-Timestamp"].as_str().unwrap(),
        nonce: headers["X-Outpost-Nonce"].as_str(),
        body: b"{\"batch\":[]}",
        signature: headers["X-Outpost-Signature"].as_str().unwrap(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(
        signature::verify(&req, [secret.as_slice()], now, 300),
        Ok(())
    );

    // Without the sealing key nothing secret can be stored.
    let out = Command::new(outpost_tests::outpost_bin())
        .args([
            "clients", "create", "--name", "x", "--method", "hmac", "--json",
        ])
        .env("OUTPOST_POSTGRES_URL", &db.url)
        .env_remove("OUTPOST_SECRETS_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("OUTPOST_SECRETS_KEY"));
}

#[tokio::test]
async fn public_key_jwt_and_write_key_clients_are_created_and_checked() {
    let db = TestDb::new().await;
    let pem = outpost_tests::repo_root().join("shared/src/auth/testdata/es256.pub.pem");
    let created = ok(
        &db,
        &[
            "create",
            "--name",
            "app",
            "--id",
            "mobile-app",
            "--method",
            "jwt-es256",
            "--public-key-file",
            pem.to_str().unwrap(),
            "--jwt-issuer",
            "https://id.example",
        ],
    );
    assert_eq!(created["method"], "jwt");
    let shown = ok(&db, &["show", "mobile-app"]);
    assert_eq!(shown["credentials"][0]["type"], "jwt_public_key (ES256)");
    assert_eq!(shown["jwt"]["issuer"], "https://id.example");
    let web = ok(
        &db,
        &[
            "create",
            "--name",
            "site",
            "--id",
            "site",
            "--method",
            "write-key",
            "--origins",
            "https://shop.example,https://*.shop.example",
        ],
    );
    assert_eq!(web["write_key"], "site");
    // Bad input is refused with a reason, and nothing is stored.
    let (refused, _, err) = clients(
        &db,
        &[
            "create",
            "--name",
            "bad",
            "--id",
            "bad",
            "--method",
            "write-key",
            "--origins",
            "shop.example",
        ],
    );
    assert!(!refused && err.contains("allowed origin"), "{err}");
    let (refused, _, err) = clients(
        &db,
        &[
            "create",
            "--name",
            "dup",
            "--id",
            "site",
            "--method",
            "write-key",
        ],
    );
    assert!(!refused && err.contains("exists"), "{err}");
    assert_eq!(ok(&db, &["list"]).as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn the_readme_secrets_key_command_makes_a_key_the_cli_accepts() {
    let db = TestDb::new().await;
    let line = outpost_tests::fenced_block_after(&outpost_tests::readme(), "example: secrets-key");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{line}\nprintf %s \"$OUTPOST_SECRETS_KEY\""))
        .output()
        .unwrap();
    let key = String::from_utf8(out.stdout).unwrap();
    assert_eq!(B64.decode(&key).unwrap().len(), 32, "{key:?}");
    let created = Command::new(outpost_tests::outpost_bin())
        .args([
            "clients", "create", "--name", "k", "--method", "hmac", "--json",
        ])
        .env("OUTPOST_POSTGRES_URL", &db.url)
        .env("OUTPOST_SECRETS_KEY", &key)
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
}

/// An HS256 token for client `kid`, with these claims.
fn hs256(kid: &str, secret: &[u8], claims: Value) -> String {
    outpost_tests::hmac_jwt(kid, "HS256", secret, &claims)
}

#[tokio::test]
async fn jwt_callers_of_the_read_api_get_what_both_client_and_token_grant() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let agg = Aggregator::start_with_env(
        &store_config(&db.url, &redis),
        &[("OUTPOST_SECRETS_KEY", &secrets_key())],
    )
    .await;
    let created = ok(
        &db,
        &[
            "create",
            "--name",
            "Dashboard",
            "--id",
            "dash",
            "--method",
            "jwt-hs256",
            "--permissions",
            "read:events,read:stats",
        ],
    );
    let secret = created["jwt_secret"].as_str().unwrap().as_bytes().to_vec();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = |claims: Value| hs256("dash", &secret, claims);
    let stats = |t: String| {
        let url = format!(
            "{}/v1/stats?bucket=day&group_by=name&from=2026-11-01",
            agg.url
        );
        async move {
            let r = reqwest::Client::new()
                .get(url)
                .header("authorization", format!("Bearer {t}"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    // Allowed by both.
    let events_only = token(serde_json::json!({"exp": exp, "permissions": ["read:events"]}));
    assert_eq!(read_events(&agg, &events_only).await.0, 200);
    // Denied: the token does not grant read:stats, though the client could.
    let (status, body) = stats(events_only).await;
    assert_eq!((status, body["code"].as_u64()), (403, Some(40301)));
    // A wildcard in the token, capped by the record: stats yes, admin no.
    let everything = token(serde_json::json!({"exp": exp, "scope": "*:*"}));
    assert_eq!(stats(everything.clone()).await.0, 200);
    let (status, body) = read_events(&agg, &everything).await;
    assert_eq!(status, 200);
    let (status, body2) = {
        let r = reqwest::Client::new()
            .get(format!("{}/v1/events?client_id=someone-else", agg.url))
            .header("authorization", format!("Bearer {everything}"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(
        (status, body2["code"].as_u64()),
        (403, Some(40301)),
        "a wildcard token does not make a client an admin: {body}"
    );
    // No permissions in the token: nothing to read.
    let bare = token(serde_json::json!({"exp": exp}));
    assert_eq!(read_events(&agg, &bare).await.1["code"], 40301);
    // Expired, and signed with another secret.
    let expired = token(serde_json::json!({"exp": exp - 4000, "permissions": ["read:events"]}));
    assert_eq!(read_events(&agg, &expired).await.1["code"], 40106);
    let forged = hs256(
        "dash",
        b"not-the-secret",
        serde_json::json!({"exp": exp, "permissions": ["read:events"]}),
    );
    assert_eq!(read_events(&agg, &forged).await.1["code"], 40103);
}
