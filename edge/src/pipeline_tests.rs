use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::Mac as _;
use outpost_shared::auth::api_key;
use outpost_shared::client::{KeyMaterial, Secret};
use outpost_shared::frame::{Frame, FrameLimits, KeyRing};
use outpost_shared::kv::{MemoryKv, block_on};
use outpost_shared::ratelimit::RateLimit;
use serde_json::{Value, json};

use super::*;
use crate::fixtures::{self, HMAC_SECRET, JWT_SECRET, record};

const NOW: i64 = 1_795_701_600_000;
const EDGE_SECRET: &[u8] = b"edge-secret-edge-secret-edge-sec";

struct TestUpstream {
    clients: RefCell<HashMap<String, ClientRecord>>,
    frames: RefCell<Vec<Frame>>,
    lookups: Cell<u32>,
    down: Cell<bool>,
    reject_index: Option<usize>,
    /// Answer `400` 40018 to every frame (the aggregator refused all).
    reject_all: Cell<bool>,
}

impl Upstream for TestUpstream {
    type Error = String;
    async fn forward(&self, bytes: Vec<u8>) -> Result<UpstreamAnswer, String> {
        if self.down.get() {
            return Err("connection refused".into());
        }
        let ring = KeyRing {
            keys: vec![edge_key()],
        };
        let frame =
            frame::decode(&bytes, &ring, &FrameLimits::default()).map_err(|e| e.to_string())?;
        if self.reject_all.get() {
            let errors = (0..frame.batch.events.len())
                .map(|i| FieldError {
                    index: Some(i),
                    ..FieldError::new(ErrorCode::StringTooLong, Some("name"), "too long here")
                })
                .collect();
            return Ok(UpstreamAnswer::Refused(
                400,
                Some(ErrorEnvelope::new(ErrorCode::BatchRejected, "agg").with_errors(errors)),
            ));
        }
        let errors = self
            .reject_index
            .map(|i| {
                vec![FieldError {
                    index: Some(i),
                    ..FieldError::new(ErrorCode::InvalidField, Some("name"), "refused upstream")
                }]
            })
            .unwrap_or_default();
        let n = frame.batch.events.len();
        self.frames.borrow_mut().push(frame);
        Ok(UpstreamAnswer::Accepted(AcceptedResponse {
            success: true,
            accepted: n - errors.len(),
            rejected: errors.len(),
            errors,
            request_id: "agg".into(),
        }))
    }
    async fn client(&self, id: &str) -> Result<Option<ClientRecord>, String> {
        self.lookups.set(self.lookups.get() + 1);
        if self.down.get() {
            return Err("connection refused".into());
        }
        Ok(self.clients.borrow().get(id).cloned())
    }
}

struct TestEnv(Cell<u64>);

impl EdgeEnv for TestEnv {
    fn now_ms(&self) -> i64 {
        NOW
    }
    fn random(&self) -> [u8; 16] {
        self.0.set(self.0.get() + 1);
        u128::from(self.0.get()).to_be_bytes()
    }
}

fn edge_key() -> EdgeKey {
    EdgeKey {
        id: "edge-1".into(),
        secret: Secret::new(EDGE_SECRET.to_vec()),
    }
}

fn config() -> EdgeConfig {
    use outpost_shared::seal::{PURPOSE_CLIENT_RECORD, PURPOSE_EDGE_CACHE, SealKey};
    EdgeConfig {
        edge_id: "test-edge".into(),
        edge_key: edge_key(),
        record_key: SealKey::derive(EDGE_SECRET, PURPOSE_CLIENT_RECORD),
        cache_key: SealKey::derive(EDGE_SECRET, PURPOSE_EDGE_CACHE),
        limits: Limits::default(),
        trusted_proxies: NetList::parse(["10.0.0.0/8"]).unwrap(),
        blocklist: NetList::parse(["198.51.100.0/24"]).unwrap(),
        ip_limit: Some(RateLimit {
            limit: 600,
            period_secs: 60,
        }),
        lookup_limit: Some(RateLimit {
            limit: 600,
            period_secs: 60,
        }),
        client_cache_ttl_secs: 60,
        signature_window_secs: 300,
        retry_after_secs: 7,
    }
}

fn upstream() -> TestUpstream {
    let mut clients = HashMap::new();
    for r in fixtures::clients() {
        clients.insert(r.id.to_string(), r);
    }
    TestUpstream {
        clients: RefCell::new(clients),
        frames: RefCell::new(Vec::new()),
        lookups: Cell::new(0),
        down: Cell::new(false),
        reject_index: None,
        reject_all: Cell::new(false),
    }
}

fn event(i: u32) -> Value {
    json!({"event_id": format!("0192f0c1-7b3a-7cc2-9a57-{i:012x}"), "name": "signup"})
}

fn body(events: &[Value]) -> Vec<u8> {
    json!({"batch": events}).to_string().into_bytes()
}

/// A POST with `headers`, and `content-type: application/json` unless
/// they name one.
fn post(path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> EdgeRequest {
    let mut headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if !headers.iter().any(|(k, _)| k == "content-type") {
        headers.push(("content-type".into(), "application/json".into()));
    }
    EdgeRequest {
        method: "POST".into(),
        path_and_query: path.into(),
        headers,
        body,
        peer_ip: "203.0.113.9".parse().unwrap(),
        platform_ip: None,
        pop: Some("fra".into()),
        country_hint: Some("DE".into()),
    }
}

struct Run {
    kv: MemoryKv,
    up: TestUpstream,
    env: TestEnv,
    cfg: EdgeConfig,
}

impl Run {
    fn new() -> Run {
        let kv = MemoryKv::default();
        kv.set_now_ms(NOW);
        Run {
            kv,
            up: upstream(),
            env: TestEnv(Cell::new(0)),
            cfg: config(),
        }
    }
    fn send(&self, req: EdgeRequest) -> (u16, Value, EdgeResponse) {
        let resp = block_on(handle(req, &self.cfg, &self.kv, &self.up, &self.env));
        let json = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        (resp.status, json, resp)
    }
}

fn header<'a>(resp: &'a EdgeResponse, name: &str) -> Option<&'a str> {
    resp.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

const BROWSER: (&str, &str) = ("origin", "https://shop.example");

/// `POST /v1/batch?write_key=web` from the browser origin with `events`.
fn browser_batch(events: &[Value]) -> EdgeRequest {
    post("/v1/batch?write_key=web", &[BROWSER], body(events))
}

#[test]
fn a_browser_batch_with_a_write_key_is_forwarded_and_acknowledged() {
    let run = Run::new();
    let (status, json, resp) = run.send(post(
        "/v1/batch?write_key=web",
        &[BROWSER, ("user-agent", "Firefox")],
        body(&[event(1), event(2)]),
    ));
    assert_eq!(status, 202, "{json}");
    assert_eq!(
        (json["accepted"].as_u64(), json["rejected"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    assert!(header(&resp, "x-request-id").is_some());
    let frames = run.up.frames.borrow();
    let b = &frames[0].batch;
    assert_eq!(b.client_id, "web");
    assert_eq!(frames[0].header.edge_id, "test-edge");
    assert_eq!(b.facts.client_ip.as_deref(), Some("203.0.113.9"));
    assert_eq!(b.facts.user_agent.as_deref(), Some("Firefox"));
    assert_eq!(b.facts.origin.as_deref(), Some("https://shop.example"));
    assert_eq!(
        (b.facts.pop.as_deref(), b.facts.country_hint.as_deref()),
        (Some("fra"), Some("DE"))
    );
    assert_eq!(b.events.len(), 2);
}

#[test]
fn refusals_table() {
    let signed = |secret: &[u8], ts: i64, nonce: Option<&str>| {
        let b = body(&[event(1)]);
        let sig = signature::sign(secret, "POST", "/v1/batch", ts / 1000, nonce, &b);
        (sig, (ts / 1000).to_string(), b)
    };
    let (good_sig, good_ts, good_body) = signed(HMAC_SECRET, NOW, None);
    let (bad_sig, _, _) = signed(b"wrong", NOW, None);
    let (old_sig, old_ts, _) = signed(HMAC_SECRET, NOW - 400_000, None);
    let gzip_bomb = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![b' '; 8 << 20]).unwrap();
        e.finish().unwrap()
    };
    let cases: Vec<(&str, EdgeRequest, u16, u64)> = vec![
        (
            "no credentials",
            post("/v1/batch", &[BROWSER], body(&[event(1)])),
            401,
            40101,
        ),
        (
            "unknown write key",
            post("/v1/batch?write_key=nobody", &[BROWSER], body(&[event(1)])),
            401,
            40102,
        ),
        (
            "revoked client",
            post("/v1/batch?write_key=revoked", &[BROWSER], body(&[event(1)])),
            401,
            40111,
        ),
        (
            "write key without an origin",
            post("/v1/batch?write_key=web", &[], body(&[event(1)])),
            403,
            40302,
        ),
        (
            "origin not allowed",
            post(
                "/v1/batch?write_key=web",
                &[("origin", "https://evil.example")],
                body(&[event(1)]),
            ),
            403,
            40302,
        ),
        (
            "no write permission",
            post(
                "/v1/batch?write_key=readonly",
                &[BROWSER],
                body(&[event(1)]),
            ),
            403,
            40301,
        ),
        (
            "write key used as hmac id",
            post(
                "/v1/batch",
                &[
                    ("x-outpost-key", "web"),
                    ("x-outpost-timestamp", &good_ts),
                    ("x-outpost-signature", &good_sig),
                ],
                good_body.clone(),
            ),
            401,
            40103,
        ),
        (
            "bad signature",
            post(
                "/v1/batch",
                &[
                    ("x-outpost-key", "server"),
                    ("x-outpost-timestamp", &good_ts),
                    ("x-outpost-signature", &bad_sig),
                ],
                good_body.clone(),
            ),
            401,
            40103,
        ),
        (
            "stale signature",
            post(
                "/v1/batch",
                &[
                    ("x-outpost-key", "server"),
                    ("x-outpost-timestamp", &old_ts),
                    ("x-outpost-signature", &old_sig),
                ],
                good_body.clone(),
            ),
            401,
            40104,
        ),
        (
            "wrong api key",
            post(
                "/v1/batch",
                &[("authorization", "Bearer opk_backend_bm9wZQ")],
                body(&[event(1)]),
            ),
            401,
            40103,
        ),
        (
            "blocked ip",
            EdgeRequest {
                peer_ip: "198.51.100.4".parse().unwrap(),
                ..browser_batch(&[event(1)])
            },
            403,
            40303,
        ),
        (
            "form body",
            post(
                "/v1/batch?write_key=web",
                &[
                    BROWSER,
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                body(&[event(1)]),
            ),
            415,
            41501,
        ),
        (
            "gzip bomb",
            post(
                "/v1/batch?write_key=web",
                &[BROWSER, ("content-encoding", "gzip")],
                gzip_bomb,
            ),
            413,
            41302,
        ),
        (
            "malformed json",
            post(
                "/v1/batch?write_key=web",
                &[BROWSER],
                b"{\"batch\": [".to_vec(),
            ),
            400,
            40001,
        ),
        (
            "unknown path",
            post("/v2/batch", &[], Vec::new()),
            404,
            40401,
        ),
        (
            "wrong method",
            EdgeRequest {
                method: "GET".into(),
                ..post("/v1/batch", &[], Vec::new())
            },
            405,
            40501,
        ),
    ];
    for (what, req, status, code) in cases {
        let run = Run::new();
        let (s, json, _) = run.send(req);
        assert_eq!(
            (s, json["code"].as_u64().unwrap_or(0)),
            (status, code),
            "{what}: {json}"
        );
        assert_eq!(json["success"], false, "{what}");
        assert!(
            run.up.frames.borrow().is_empty(),
            "{what}: nothing may be forwarded"
        );
    }
}

#[test]
fn hmac_signed_requests_are_accepted_once_per_nonce() {
    let run = Run::new();
    let b = body(&[event(1)]);
    let ts = (NOW / 1000).to_string();
    let sig = signature::sign(
        HMAC_SECRET,
        "POST",
        "/v1/batch",
        NOW / 1000,
        Some("n-1"),
        &b,
    );
    let req = || {
        post(
            "/v1/batch",
            &[
                ("x-outpost-key", "server"),
                ("x-outpost-timestamp", &ts),
                ("x-outpost-nonce", "n-1"),
                ("x-outpost-signature", &sig),
            ],
            b.clone(),
        )
    };
    assert_eq!(run.send(req()).0, 202);
    let (status, json, _) = run.send(req());
    assert_eq!(
        (status, json["code"].as_u64()),
        (401, Some(40105)),
        "replayed nonce"
    );
}

fn hs256(claims: Value, alg: &str) -> String {
    let head = B64.encode(json!({"alg": alg, "kid": "app"}).to_string());
    let input = format!("{head}.{}", B64.encode(claims.to_string()));
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(JWT_SECRET).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

#[test]
fn jwt_and_api_key_callers() {
    let exp = NOW / 1000 + 600;
    let cases = [
        (
            "valid jwt",
            format!("Bearer {}", hs256(json!({"exp": exp}), "HS256")),
            202,
            0,
        ),
        (
            "expired jwt",
            format!(
                "Bearer {}",
                hs256(json!({"exp": NOW / 1000 - 3600}), "HS256")
            ),
            401,
            40106,
        ),
        (
            "alg none",
            format!("Bearer {}", hs256(json!({"exp": exp}), "none")),
            401,
            40109,
        ),
        (
            "valid api key",
            format!("Bearer {}", api_key::format("backend", b"s3cret")),
            202,
            0,
        ),
    ];
    for (what, auth, status, code) in cases {
        let run = Run::new();
        let (s, json, _) = run.send(post(
            "/v1/batch",
            &[("authorization", &auth)],
            body(&[event(1)]),
        ));
        assert_eq!(
            (s, json["code"].as_u64().unwrap_or(0)),
            (status, code),
            "{what}: {json}"
        );
    }
}

#[test]
fn unknown_clients_are_cached_so_a_flood_costs_one_lookup() {
    let run = Run::new();
    for _ in 0..5 {
        assert_eq!(
            run.send(post(
                "/v1/batch?write_key=ghost",
                &[BROWSER],
                body(&[event(1)])
            ))
            .0,
            401
        );
    }
    for _ in 0..3 {
        assert_eq!(run.send(browser_batch(&[event(1)])).0, 202);
    }
    assert_eq!(run.up.lookups.get(), 2, "one lookup per id, then KV");
}

#[test]
fn partial_acceptance_maps_every_error_to_the_clients_own_positions() {
    let mut run = Run::new();
    // The edge refuses the client's second event; the aggregator refuses the
    // second event it receives, which is the client's third.
    run.up.reject_index = Some(1);
    let events = [
        event(1),
        json!({"event_id": "bad", "name": "x"}),
        event(3),
        event(4),
    ];
    let (status, json, _) = run.send(browser_batch(&events));
    assert_eq!(status, 202, "{json}");
    assert_eq!(
        (json["accepted"].as_u64(), json["rejected"].as_u64()),
        (Some(2), Some(2)),
        "{json}"
    );
    let indexes: Vec<u64> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [1, 2]);
}

#[test]
fn a_beacon_carries_its_key_in_the_body() {
    let run = Run::new();
    let b = json!({"batch": [event(1)], "write_key": "web"})
        .to_string()
        .into_bytes();
    let (status, json, _) = run.send(post(
        "/v1/batch",
        &[BROWSER, ("content-type", "text/plain;charset=UTF-8")],
        b,
    ));
    assert_eq!(status, 202, "{json}");
}

#[test]
fn rate_limits_answer_429_with_their_headers() {
    let run = Run::new();
    let req = || post("/v1/batch?write_key=limited", &[BROWSER], body(&[event(1)]));
    let (_, _, first) = run.send(req());
    assert_eq!(header(&first, "ratelimit-limit"), Some("2"));
    assert_eq!(header(&first, "ratelimit-remaining"), Some("1"));
    assert_eq!(run.send(req()).0, 202);
    let (status, json, resp) = run.send(req());
    assert_eq!((status, json["code"].as_u64()), (429, Some(42901)));
    assert_eq!(header(&resp, "retry-after"), Some("30"));
    assert_eq!(header(&resp, "ratelimit-remaining"), Some("0"));
    assert_eq!(run.up.frames.borrow().len(), 2);
}

#[test]
fn the_aggregator_down_means_503_and_nothing_acknowledged() {
    let run = Run::new();
    run.up.down.set(true);
    let (status, json, resp) = run.send(browser_batch(&[event(1)]));
    assert_eq!((status, json["code"].as_u64()), (503, Some(50301)));
    assert_eq!(header(&resp, "retry-after"), Some("7"));
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let run = Run::new();
    // From an untrusted peer, a header naming a blocked address changes nothing.
    let spoof = post(
        "/v1/batch?write_key=web",
        &[BROWSER, ("x-forwarded-for", "198.51.100.1")],
        body(&[event(1)]),
    );
    assert_eq!(run.send(spoof).0, 202);
    assert_eq!(
        run.up.frames.borrow()[0].batch.facts.client_ip.as_deref(),
        Some("203.0.113.9")
    );
    // Through a trusted proxy, the client behind it is the one judged.
    let proxied = EdgeRequest {
        peer_ip: "10.0.0.2".parse().unwrap(),
        ..post(
            "/v1/batch?write_key=web",
            &[BROWSER, ("x-forwarded-for", "198.51.100.1")],
            body(&[event(1)]),
        )
    };
    assert_eq!(run.send(proxied).1["code"], 40303);
}

#[test]
fn preflight_is_answered_without_credentials() {
    let run = Run::new();
    let req = EdgeRequest {
        method: "OPTIONS".into(),
        ..post("/v1/batch", &[BROWSER], Vec::new())
    };
    let (status, _, resp) = run.send(req);
    assert_eq!(status, 204);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    assert!(
        header(&resp, "access-control-allow-headers")
            .unwrap()
            .contains("x-outpost-signature")
    );
}

#[test]
fn a_single_event_endpoint_takes_one_event() {
    let run = Run::new();
    let (status, json, _) = run.send(post(
        "/v1/event?write_key=web",
        &[BROWSER],
        event(5).to_string().into_bytes(),
    ));
    assert_eq!((status, json["accepted"].as_u64()), (202, Some(1)));
}

/// A KV store whose reads and writes fail for keys with chosen prefixes.
struct FlakyKv {
    inner: MemoryKv,
    failing: Vec<&'static str>,
}

impl Kv for FlakyKv {
    type Error = String;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        if self.failing.iter().any(|p| key.starts_with(p)) {
            return Err("store unavailable".into());
        }
        Ok(self.inner.get(key).await.unwrap_or_default())
    }
    async fn put(&self, key: &str, value: &[u8], ttl: u64) -> Result<(), String> {
        if self.failing.iter().any(|p| key.starts_with(p)) {
            return Err("store unavailable".into());
        }
        let _ = self.inner.put(key, value, ttl).await;
        Ok(())
    }
}

fn send_with<K: Kv>(run: &Run, kv: &K, req: EdgeRequest) -> (u16, Value, EdgeResponse) {
    let resp = block_on(handle(req, &run.cfg, kv, &run.up, &run.env));
    let json = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp.status, json, resp)
}

fn signed_post(nonce: &str) -> EdgeRequest {
    let b = body(&[event(1)]);
    let ts = (NOW / 1000).to_string();
    let sig = signature::sign(
        HMAC_SECRET,
        "POST",
        "/v1/batch",
        NOW / 1000,
        Some(nonce),
        &b,
    );
    post(
        "/v1/batch",
        &[
            ("x-outpost-key", "server"),
            ("x-outpost-timestamp", &ts),
            ("x-outpost-nonce", nonce),
            ("x-outpost-signature", &sig),
        ],
        b,
    )
}

#[test]
fn a_kv_outage_lets_rate_limits_through_but_not_nonces() {
    let run = Run::new();
    let kv = FlakyKv {
        inner: MemoryKv::default(),
        failing: vec!["rl", "nonce:"],
    };
    kv.inner.set_now_ms(NOW);
    // Rate limits fail open: the client's limit of 2 is not enforced.
    for _ in 0..4 {
        let (status, json, _) = send_with(
            &run,
            &kv,
            post("/v1/batch?write_key=limited", &[BROWSER], body(&[event(1)])),
        );
        assert_eq!(status, 202, "{json}");
    }
    // A nonce fails closed: 503, retry later; nothing forwarded.
    let frames = run.up.frames.borrow().len();
    let (status, json, resp) = send_with(&run, &kv, signed_post("n-kv"));
    assert_eq!(
        (status, json["code"].as_u64()),
        (503, Some(50303)),
        "{json}"
    );
    assert!(header(&resp, "retry-after").is_some());
    assert_eq!(run.up.frames.borrow().len(), frames);
}

#[test]
fn a_flood_from_one_address_stops_before_the_body_is_read_or_a_client_looked_up() {
    let mut run = Run::new();
    run.cfg.ip_limit = Some(RateLimit {
        limit: 5,
        period_secs: 60,
    });
    let mut codes = Vec::new();
    for i in 0..20 {
        let (status, json, _) = run.send(post(
            &format!("/v1/batch?write_key=ghost-{i}"),
            &[BROWSER],
            b"not even json".to_vec(),
        ));
        codes.push((status, json["code"].as_u64().unwrap_or(0)));
    }
    assert!(codes[..5].iter().all(|c| *c == (400, 40001)), "{codes:?}");
    assert!(codes[5..].iter().all(|c| *c == (429, 42902)), "{codes:?}");
    // Another address is not affected, and no lookup was made for any of it.
    let other = EdgeRequest {
        peer_ip: "203.0.113.10".parse().unwrap(),
        ..browser_batch(&[event(1)])
    };
    assert_eq!(run.send(other).0, 202);
    assert_eq!(run.up.lookups.get(), 1);
}

#[test]
fn ipv6_addresses_share_a_per_address_budget_by_slash_64() {
    let mut run = Run::new();
    run.cfg.ip_limit = Some(RateLimit {
        limit: 2,
        period_secs: 60,
    });
    let from = |ip: &str| EdgeRequest {
        peer_ip: ip.parse().unwrap(),
        ..browser_batch(&[event(1)])
    };
    assert_eq!(run.send(from("2001:db8:1:2::1")).0, 202);
    assert_eq!(run.send(from("2001:db8:1:2::ffff")).0, 202);
    assert_eq!(run.send(from("2001:db8:1:2:abcd::9")).1["code"], 42902);
    assert_eq!(run.send(from("2001:db8:1:3::1")).0, 202, "another /64");
}

#[test]
fn made_up_keys_cost_at_most_the_lookup_budget() {
    let mut run = Run::new();
    run.cfg.ip_limit = None;
    run.cfg.lookup_limit = Some(RateLimit {
        limit: 10,
        period_secs: 60,
    });
    // A client seen before the flood is cached and keeps being served.
    assert_eq!(run.send(browser_batch(&[event(1)])).0, 202);
    let mut refused_overloaded = 0;
    for i in 0..200 {
        let (status, json, resp) = run.send(post(
            &format!("/v1/batch?write_key=ghost-{i}"),
            &[BROWSER],
            body(&[event(1)]),
        ));
        match (status, json["code"].as_u64()) {
            (401, Some(40102)) => {}
            (503, Some(50302)) => {
                refused_overloaded += 1;
                assert!(header(&resp, "retry-after").is_some());
            }
            other => panic!("{other:?}: {json}"),
        }
    }
    assert_eq!(
        run.up.lookups.get(),
        1 + 9,
        "the budget of 10, one spent on web"
    );
    assert_eq!(refused_overloaded, 200 - 9);
    assert_eq!(
        run.send(browser_batch(&[event(2)])).0,
        202,
        "cached clients are not affected"
    );
}

#[test]
fn cached_records_are_sealed_in_kv() {
    let run = Run::new();
    let (status, _, _) = run.send(signed_post("n-seal"));
    assert_eq!(status, 202);
    let cached = block_on(run.kv.get("client:server"))
        .unwrap()
        .expect("cached");
    assert!(
        !cached.windows(HMAC_SECRET.len()).any(|w| w == HMAC_SECRET),
        "the HMAC secret is in clear in KV"
    );
    let b64 = B64.encode(HMAC_SECRET);
    assert!(!cached.windows(b64.len()).any(|w| w == b64.as_bytes()));
    // Moved to another key, it does not open: the client is looked up again.
    block_on(run.kv.put("client:web", &cached, 60)).unwrap();
    let lookups = run.up.lookups.get();
    assert_eq!(run.send(browser_batch(&[event(1)])).0, 202);
    assert_eq!(run.up.lookups.get(), lookups + 1);
}

#[test]
fn a_rotated_secret_works_at_once_and_bad_signatures_refresh_at_most_every_few_seconds() {
    let run = Run::new();
    assert_eq!(run.send(signed_post("n-1")).0, 202);
    let lookups = run.up.lookups.get();
    // Rotate: the aggregator now has a new secret only.
    let new_secret = b"rotated-hmac-secret";
    run.up.clients.borrow_mut().insert(
        "server".into(),
        record(
            "server",
            AuthMethod::Hmac,
            Some(KeyMaterial::HmacSecret {
                secret: Secret::new(new_secret.to_vec()),
            }),
        ),
    );
    let with_new = |nonce: &str| {
        let b = body(&[event(1)]);
        let ts = (NOW / 1000).to_string();
        let sig = signature::sign(new_secret, "POST", "/v1/batch", NOW / 1000, Some(nonce), &b);
        post(
            "/v1/batch",
            &[
                ("x-outpost-key", "server"),
                ("x-outpost-timestamp", &ts),
                ("x-outpost-nonce", nonce),
                ("x-outpost-signature", &sig),
            ],
            b,
        )
    };
    // The cached record was fetched at NOW: too fresh to refresh yet.
    assert_eq!(run.send(with_new("n-2")).1["code"], 40103);
    assert_eq!(run.up.lookups.get(), lookups);
    // Seconds later the first request signed with the new secret works.
    let env = ShiftedEnv(NOW + 6_000);
    run.kv.set_now_ms(NOW + 6_000);
    let resp = block_on(handle(with_new("n-3"), &run.cfg, &run.kv, &run.up, &env));
    assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(run.up.lookups.get(), lookups + 1);
    // A forger's bad signatures right after cost no further lookup.
    for i in 0..10 {
        let mut forged = with_new(&format!("f-{i}"));
        for h in &mut forged.headers {
            if h.0 == "x-outpost-signature" {
                h.1 = "00".repeat(32);
            }
        }
        let resp = block_on(handle(forged, &run.cfg, &run.kv, &run.up, &env));
        assert_eq!(resp.status, 401);
    }
    assert_eq!(run.up.lookups.get(), lookups + 1);
}

struct ShiftedEnv(i64);

impl EdgeEnv for ShiftedEnv {
    fn now_ms(&self) -> i64 {
        self.0
    }
    fn random(&self) -> [u8; 16] {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(1);
        u128::from(N.fetch_add(1, Ordering::Relaxed)).to_be_bytes()
    }
}

#[test]
fn cors_headers_only_for_origins_the_client_allows() {
    let run = Run::new();
    let allowed = run.send(browser_batch(&[event(1)]));
    assert_eq!(
        header(&allowed.2, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    let evil = ("origin", "https://evil.example");
    let (status, _, resp) = run.send(post("/v1/batch?write_key=web", &[evil], body(&[event(2)])));
    assert_eq!(status, 403);
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
    assert_eq!(header(&resp, "vary"), Some("Origin"));
    // Refused before authentication: a cached client's own origins decide.
    let (status, _, resp) = run.send(post("/v1/batch?write_key=web", &[BROWSER], b"{".to_vec()));
    assert_eq!(status, 400);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        Some("https://shop.example"),
        "the app can read its own error"
    );
    let (_, _, resp) = run.send(post("/v1/batch?write_key=web", &[evil], b"{".to_vec()));
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
    // Preflights: for the named key's origins only.
    let preflight = |path: &str, origin: (&'static str, &'static str)| EdgeRequest {
        method: "OPTIONS".into(),
        ..post(path, &[origin], Vec::new())
    };
    let (status, _, resp) = run.send(preflight("/v1/batch?write_key=web", evil));
    assert_eq!(status, 403);
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
    let (status, _, resp) = run.send(preflight("/v1/batch?write_key=web", BROWSER));
    assert_eq!(status, 204);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    let (status, _, _) = run.send(preflight("/v1/batch?write_key=nobody", BROWSER));
    assert_eq!(status, 401);
}

#[test]
fn a_proxy_that_adds_its_own_forwarded_for_line_is_not_fooled() {
    let run = Run::new();
    // The client sent its own X-Forwarded-For; the trusted proxy appended a
    // second line with the address it saw.
    let req = EdgeRequest {
        peer_ip: "10.0.0.2".parse().unwrap(),
        headers: vec![
            ("origin".into(), "https://shop.example".into()),
            ("content-type".into(), "application/json".into()),
            ("x-forwarded-for".into(), "198.51.100.1".into()),
            ("x-forwarded-for".into(), "203.0.113.77".into()),
        ],
        ..post("/v1/batch?write_key=web", &[], body(&[event(1)]))
    };
    assert_eq!(
        run.send(req).0,
        202,
        "the spoofed, blocked address is not the client"
    );
    assert_eq!(
        run.up.frames.borrow()[0].batch.facts.client_ip.as_deref(),
        Some("203.0.113.77")
    );
}

#[test]
fn a_batch_with_no_accepted_event_is_a_400_listing_each() {
    let run = Run::new();
    let events = [
        json!({"event_id": "bad", "name": "x"}),
        json!({"event_id": "0192f0c1-7b3a-7cc2-9a57-000000000001"}),
    ];
    let (status, json, _) = run.send(browser_batch(&events));
    assert_eq!(
        (status, json["code"].as_u64()),
        (400, Some(40018)),
        "{json}"
    );
    assert_eq!(json["success"], false);
    let codes: Vec<_> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_u64(), e["code"].as_u64()))
        .collect();
    assert_eq!(codes, [(Some(0), Some(40005)), (Some(1), Some(40002))]);
    assert!(run.up.frames.borrow().is_empty());
    // The same when the aggregator's rules refuse every event.
    run.up.reject_all.set(true);
    let (status, json, _) = run.send(browser_batch(&[event(1), event(2)]));
    assert_eq!(
        (status, json["code"].as_u64()),
        (400, Some(40018)),
        "{json}"
    );
    assert_eq!(json["errors"].as_array().unwrap().len(), 2);
}

#[test]
fn what_the_readme_says_is_refused_is_refused() {
    let run = Run::new();
    let cases: Vec<(&str, EdgeRequest, u16, u64)> = vec![
        (
            "no content type",
            EdgeRequest {
                headers: vec![("origin".into(), "https://shop.example".into())],
                ..post("/v1/batch?write_key=web", &[], body(&[event(1)]))
            },
            415,
            41501,
        ),
        (
            "a body write key that is not the query's",
            post(
                "/v1/batch?write_key=web",
                &[BROWSER],
                json!({"batch": [event(1)], "write_key": "limited"})
                    .to_string()
                    .into_bytes(),
            ),
            400,
            40003,
        ),
    ];
    for (what, req, status, code) in cases {
        let (s, json, _) = run.send(req);
        assert_eq!(
            (s, json["code"].as_u64()),
            (status, Some(code)),
            "{what}: {json}"
        );
    }
    let (_, json, _) = run.send(post(
        "/v1/batch?write_key=web",
        &[BROWSER],
        vec![b' '; 600 * 1024],
    ));
    assert_eq!(json["code"], 41302);
    assert!(
        json["message"].as_str().unwrap().contains("524288"),
        "the documented limit: {json}"
    );
}

#[test]
fn a_known_client_whose_entry_went_stale_is_fetched_outside_the_drained_budget() {
    let mut run = Run::new();
    run.cfg.ip_limit = None;
    run.cfg.lookup_limit = Some(RateLimit {
        limit: 3,
        period_secs: 3600,
    });
    assert_eq!(run.send(browser_batch(&[event(1)])).0, 202);
    // A flood of made-up keys drains the budget.
    for i in 0..10 {
        run.send(post(
            &format!("/v1/batch?write_key=ghost-{i}"),
            &[BROWSER],
            body(&[event(1)]),
        ));
    }
    // Two minutes on, web's entry is stale (60 s) but known: served.
    let later = ShiftedEnv(NOW + 120_000);
    run.kv.set_now_ms(NOW + 120_000);
    let resp = block_on(handle(
        browser_batch(&[event(2)]),
        &run.cfg,
        &run.kv,
        &run.up,
        &later,
    ));
    assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    // An id never seen is still bound by the budget.
    let resp = block_on(handle(
        post(
            "/v1/batch?write_key=ghost-new",
            &[BROWSER],
            body(&[event(3)]),
        ),
        &run.cfg,
        &run.kv,
        &run.up,
        &later,
    ));
    assert_eq!(resp.status, 503);
}

#[test]
fn a_client_deleted_since_it_was_cached_is_looked_up_once_per_ttl_not_per_request() {
    let run = Run::new();
    assert_eq!(run.send(browser_batch(&[event(1)])).0, 202);
    run.up.clients.borrow_mut().remove("web");
    let later = ShiftedEnv(NOW + 120_000);
    run.kv.set_now_ms(NOW + 120_000);
    let lookups = run.up.lookups.get();
    for i in 0..20 {
        let resp = block_on(handle(
            browser_batch(&[event(i)]),
            &run.cfg,
            &run.kv,
            &run.up,
            &later,
        ));
        assert_eq!(resp.status, 401);
    }
    assert_eq!(run.up.lookups.get(), lookups + 1);
}
