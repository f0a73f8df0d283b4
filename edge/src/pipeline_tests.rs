use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::Mac as _;
use outpost_shared::auth::permission::Permissions;
use outpost_shared::client::{Credential as Cred, KeyMaterial, Secret};
use outpost_shared::frame::{Frame, FrameLimits, KeyRing};
use outpost_shared::kv::{MemoryKv, block_on};
use outpost_shared::ratelimit::RateLimit;
use serde_json::{Value, json};

use super::*;

const NOW: i64 = 1_795_701_600_000;
const EDGE_SECRET: &[u8] = b"edge-secret-edge-secret-edge-sec";
const HMAC_SECRET: &[u8] = b"client-hmac-secret";
const JWT_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

struct TestUpstream {
    clients: HashMap<String, ClientRecord>,
    frames: RefCell<Vec<Frame>>,
    lookups: Cell<u32>,
    down: Cell<bool>,
    reject_index: Option<usize>,
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
        Ok(self.clients.get(id).cloned())
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
    EdgeConfig {
        edge_id: "test-edge".into(),
        edge_key: edge_key(),
        limits: Limits::default(),
        trusted_proxies: NetList::parse(["10.0.0.0/8"]).unwrap(),
        blocklist: NetList::parse(["198.51.100.0/24"]).unwrap(),
        client_cache_ttl_secs: 60,
        signature_window_secs: 300,
        retry_after_secs: 7,
    }
}

fn record(id: &str, method: AuthMethod, key: Option<KeyMaterial>) -> ClientRecord {
    ClientRecord {
        id: id.into(),
        name: id.into(),
        method,
        credentials: key
            .map(|k| {
                vec![Cred {
                    key: k,
                    not_after: None,
                }]
            })
            .unwrap_or_default(),
        jwt: None,
        permissions: Permissions::parse(["write:events"]).unwrap(),
        rate_limit: None,
        ip_rate_limit: None,
        allowed_origins: vec!["https://shop.example".into()],
        active: true,
        expires_at: None,
    }
}

fn upstream() -> TestUpstream {
    let mut clients = HashMap::new();
    for r in [
        record("web", AuthMethod::WriteKey, None),
        record(
            "server",
            AuthMethod::Hmac,
            Some(KeyMaterial::HmacSecret {
                secret: Secret::new(HMAC_SECRET.to_vec()),
            }),
        ),
        record(
            "app",
            AuthMethod::Jwt,
            Some(KeyMaterial::JwtSecret {
                secret: Secret::new(JWT_SECRET.to_vec()),
            }),
        ),
        record(
            "backend",
            AuthMethod::ApiKey,
            Some(KeyMaterial::ApiKeyHash {
                sha256: api_key::hash(&api_key::format("backend", b"s3cret")),
            }),
        ),
        ClientRecord {
            active: false,
            ..record("revoked", AuthMethod::WriteKey, None)
        },
        ClientRecord {
            rate_limit: Some(RateLimit {
                limit: 2,
                period_secs: 60,
            }),
            ..record("limited", AuthMethod::WriteKey, None)
        },
        ClientRecord {
            permissions: Permissions::parse(["read:events"]).unwrap(),
            ..record("readonly", AuthMethod::WriteKey, None)
        },
    ] {
        clients.insert(r.id.clone(), r);
    }
    TestUpstream {
        clients,
        frames: RefCell::new(Vec::new()),
        lookups: Cell::new(0),
        down: Cell::new(false),
        reject_index: None,
    }
}

fn event(i: u32) -> Value {
    json!({"event_id": format!("0192f0c1-7b3a-7cc2-9a57-{i:012x}"), "name": "signup"})
}

fn body(events: &[Value]) -> Vec<u8> {
    json!({"batch": events}).to_string().into_bytes()
}

fn post(path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> EdgeRequest {
    EdgeRequest {
        method: "POST".into(),
        path_and_query: path.into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
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
                ..post("/v1/batch?write_key=web", &[BROWSER], body(&[event(1)]))
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
        assert_eq!(
            run.send(post(
                "/v1/batch?write_key=web",
                &[BROWSER],
                body(&[event(1)])
            ))
            .0,
            202
        );
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
    let (status, json, _) = run.send(post("/v1/batch?write_key=web", &[BROWSER], body(&events)));
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
    let (status, json, resp) = run.send(post(
        "/v1/batch?write_key=web",
        &[BROWSER],
        body(&[event(1)]),
    ));
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
