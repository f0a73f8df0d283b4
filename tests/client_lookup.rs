//! `GET /internal/v1/clients/{id}`: the edge's view of client records,
//! signed with an edge key, served by the real aggregator from PostgreSQL.

use base64::Engine as _;
use outpost_shared::auth::signature;
use outpost_shared::client::{AuthMethod, ClientRecord};
use outpost_tests::aggregator::{Aggregator, EDGE_KEY_ID, EDGE_SECRET};
use outpost_tests::stores::{TestDb, TestRedis, store_config};
use serde_json::Value;

async fn get(agg: &Aggregator, path: &str, key: &str, secret: &[u8], ts: i64) -> reqwest::Response {
    let sig = signature::sign(secret, "GET", path, ts, None, b"");
    reqwest::Client::new()
        .get(format!("{}{path}", agg.url))
        .header("x-outpost-key", key)
        .header("x-outpost-timestamp", ts.to_string())
        .header("x-outpost-signature", sig)
        .send()
        .await
        .unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn code(resp: reqwest::Response) -> (u16, u64) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (status, body["code"].as_u64().unwrap_or(0))
}

#[tokio::test]
async fn an_edge_reads_client_records_with_its_signed_key_and_nothing_else_does() {
    let (db, redis) = (TestDb::new().await, TestRedis::new());
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([42u8; 32]);
    let agg = Aggregator::start_with_env(
        &store_config(&db.url, &redis),
        &[("OUTPOST_SECRETS_KEY", &key)],
    )
    .await;
    let created = std::process::Command::new(outpost_tests::outpost_bin())
        .args([
            "clients",
            "create",
            "--name",
            "Acme backend",
            "--id",
            "acme-server",
            "--method",
            "hmac",
            "--json",
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
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    let secret = created["secret"].as_str().unwrap().as_bytes().to_vec();

    let path = "/internal/v1/clients/acme-server";
    let ts = now();
    let ok = get(&agg, path, EDGE_KEY_ID, EDGE_SECRET, ts).await;
    assert_eq!(ok.status(), 200);
    let sealed = ok.bytes().await.unwrap();
    assert!(
        !sealed.windows(secret.len()).any(|w| w == secret.as_slice()),
        "the secret travels sealed"
    );
    let plain = outpost_shared::seal::SealKey::derive(
        EDGE_SECRET,
        outpost_shared::seal::PURPOSE_CLIENT_RECORD,
    )
    .open(
        &outpost_shared::seal::client_record_context("acme-server", ts),
        &sealed,
    )
    .expect("sealed for the edge key and this lookup");
    let got: ClientRecord = serde_json::from_slice(&plain).unwrap();
    assert_eq!(got.id, "acme-server");
    assert_eq!(got.method, AuthMethod::Hmac);
    // The edge gets the secret itself (sealed for it), to verify signatures.
    assert_eq!(
        got.hmac_secrets(outpost_shared::Timestamp(0)).next(),
        Some(secret.as_slice())
    );

    assert_eq!(
        code(
            get(
                &agg,
                "/internal/v1/clients/nobody",
                EDGE_KEY_ID,
                EDGE_SECRET,
                now()
            )
            .await
        )
        .await,
        (404, 40402)
    );
    assert_eq!(
        code(get(&agg, path, EDGE_KEY_ID, b"not-the-edge-secret", now()).await).await,
        (401, 40103)
    );
    assert_eq!(
        code(get(&agg, path, "other-edge", EDGE_SECRET, now()).await).await,
        (401, 40103)
    );
    assert_eq!(
        code(get(&agg, path, EDGE_KEY_ID, EDGE_SECRET, now() - 600).await).await,
        (401, 40104)
    );
    // A signature for one client's path does not open another's.
    let sig = signature::sign(EDGE_SECRET, "GET", path, now(), None, b"");
    let other = reqwest::Client::new()
        .get(format!("{}/internal/v1/clients/nobody", agg.url))
        .header("x-outpost-key", EDGE_KEY_ID)
        .header("x-outpost-timestamp", now().to_string())
        .header("x-outpost-signature", sig)
        .send()
        .await
        .unwrap();
    assert_eq!(code(other).await, (401, 40103));
    let unsigned = reqwest::get(format!("{}{path}", agg.url)).await.unwrap();
    assert_eq!(code(unsigned).await, (401, 40101));
}
