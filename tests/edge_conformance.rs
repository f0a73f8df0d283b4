//! One table of edge cases, run against both deployable artifacts: the
//! Spin component under `outpost edge` (wasmtime) and the Cloudflare Worker
//! under `wrangler dev` (workerd). Both forward to a stand-in aggregator
//! that verifies and decodes every frame with `outpost-shared`, so each
//! case checks the client's answer and what was (or was not) forwarded.

use std::io::Write as _;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use outpost_edge::fixtures::{HMAC_SECRET, JWT_SECRET, ORIGIN, clients};
use outpost_shared::auth::{api_key, signature};
use outpost_tests::edge::{Edge, Mode, Runtime, StandIn, edge_variables};
use serde_json::{Value, json};

const TRUSTED: &str = "127.0.0.1";
const UNTRUSTED: &str = "127.0.0.5";
const BLOCKED: &str = "127.0.0.9";

fn event(i: u32) -> Value {
    json!({"event_id": format!("0192f0c1-7b3a-7cc2-9a57-{i:012x}"), "name": "signup"})
}

fn batch(n: u32) -> Vec<u8> {
    json!({"batch": (0..n).map(event).collect::<Vec<_>>()})
        .to_string()
        .into_bytes()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn jwt(kid: &str, alg: &str, key: &[u8], claims: Value) -> String {
    outpost_tests::hmac_jwt(kid, alg, key, &claims)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// One request of a case.
struct Req {
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// The peer the request comes from.
    from: &'static str,
}

fn post(path: &str, headers: &[(&'static str, &str)], body: Vec<u8>) -> Req {
    Req {
        method: "POST",
        path: path.into(),
        headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        body,
        from: TRUSTED,
    }
}

fn browser(path: &str, body: Vec<u8>) -> Req {
    post(
        path,
        &[
            ("origin", ORIGIN),
            ("content-type", "application/json"),
            ("user-agent", "Conformance/1.0"),
        ],
        body,
    )
}

fn hmac_signed(nonce: Option<&str>, ts: i64, secret: &[u8]) -> Req {
    let body = batch(2);
    let sig = signature::sign(secret, "POST", "/v1/batch", ts, nonce, &body);
    let mut headers = vec![
        ("content-type", "application/json".to_owned()),
        (signature::HEADER_KEY, "server".to_owned()),
        (signature::HEADER_TIMESTAMP, ts.to_string()),
        (signature::HEADER_SIGNATURE, sig),
    ];
    if let Some(n) = nonce {
        headers.push((signature::HEADER_NONCE, n.to_owned()));
    }
    Req {
        method: "POST",
        path: "/v1/batch".into(),
        headers,
        body,
        from: TRUSTED,
    }
}

fn bearer(token: String) -> Req {
    post(
        "/v1/batch",
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {token}")),
        ],
        batch(1),
    )
}

/// What a frame forwarded for the request must hold.
struct FrameExpect {
    client_id: &'static str,
    events: usize,
    client_ip: &'static str,
}

/// What the answer must be.
struct Expect {
    status: u16,
    /// The envelope's code, for errors.
    code: Option<u64>,
    /// `(accepted, rejected)` for `202`.
    counts: Option<(u64, u64)>,
    /// Headers that must be present with this value (`None`: any value).
    headers: Vec<(&'static str, Option<&'static str>)>,
    /// Headers that must be absent.
    absent: Vec<&'static str>,
    /// The frame the stand-in must have received; `None`: nothing forwarded.
    frame: Option<FrameExpect>,
}

fn accepted(client_id: &'static str, events: usize) -> Expect {
    Expect {
        status: 202,
        code: None,
        counts: Some((events as u64, 0)),
        headers: vec![("x-request-id", None)],
        absent: Vec::new(),
        frame: Some(FrameExpect {
            client_id,
            events,
            client_ip: TRUSTED,
        }),
    }
}

fn refused(status: u16, code: u64) -> Expect {
    Expect {
        status,
        code: Some(code),
        counts: None,
        headers: vec![("x-request-id", None)],
        absent: Vec::new(),
        frame: None,
    }
}

impl Expect {
    fn header(mut self, name: &'static str, value: Option<&'static str>) -> Expect {
        self.headers.push((name, value));
        self
    }
    fn without(mut self, name: &'static str) -> Expect {
        self.absent.push(name);
        self
    }
    fn stamped_ip(mut self, ip: &'static str) -> Expect {
        if let Some(f) = &mut self.frame {
            f.client_ip = ip;
        }
        self
    }
}

struct Step {
    mode: Mode,
    req: Req,
    expect: Expect,
}

struct Case {
    name: &'static str,
    steps: Vec<Step>,
}

fn case(name: &'static str, req: Req, expect: Expect) -> Case {
    Case {
        name,
        steps: vec![Step {
            mode: Mode::Accept,
            req,
            expect,
        }],
    }
}

fn cases(runtime: Runtime) -> Vec<Case> {
    let now = now_secs();
    let exp = now + 600;
    let bomb = gzip(&vec![b' '; 8 << 20]);
    let big_event = json!({"batch": [event(1), {
        "event_id": "0192f0c1-7b3a-7cc2-9a57-00000000ffff",
        "name": "big",
        "properties": {"blob": "x".repeat(40 * 1024)}
    }]})
    .to_string()
    .into_bytes();
    let rs_public =
        std::fs::read(outpost_tests::repo_root().join("shared/src/auth/testdata/rs256.pub.pem"))
            .unwrap();
    let nonce = format!("n-{}", fastrand::u64(..));
    let mut beacon_in_body = browser(
        "/v1/batch",
        json!({"write_key": "web", "batch": [event(1)]})
            .to_string()
            .into_bytes(),
    );
    beacon_in_body.headers[1].1 = "text/plain;charset=UTF-8".into();
    let mut beacon_in_query = browser("/v1/batch?write_key=web", batch(1));
    beacon_in_query.headers[1].1 = "text/plain".into();
    let mut gzipped = browser("/v1/batch?write_key=web", gzip(&batch(3)));
    gzipped.headers.push(("content-encoding", "gzip".into()));
    let mut bombed = browser("/v1/batch?write_key=web", bomb);
    bombed.headers.push(("content-encoding", "gzip".into()));
    let mut denied_origin = browser("/v1/batch?write_key=web", batch(1));
    denied_origin.headers[0].1 = "https://evil.example".into();
    let mut no_origin = browser("/v1/batch?write_key=web", batch(1));
    no_origin.headers.remove(0);
    let mut xml = browser("/v1/batch?write_key=web", b"<batch/>".to_vec());
    xml.headers[1].1 = "application/xml".into();
    let mut blocked_peer = browser("/v1/batch?write_key=web", batch(1));
    blocked_peer.from = BLOCKED;
    let mut blocked_forwarded = browser("/v1/batch?write_key=web", batch(1));
    blocked_forwarded
        .headers
        .push(("x-forwarded-for", "198.51.100.7".into()));
    let mut spoofed = browser("/v1/batch?write_key=web", batch(1));
    spoofed
        .headers
        .push(("x-forwarded-for", "198.51.100.7".into()));
    spoofed.from = UNTRUSTED;
    let mut proxied = browser("/v1/batch?write_key=web", batch(1));
    proxied
        .headers
        .push(("x-forwarded-for", "203.0.113.50".into()));
    // The client sent its own line naming a blocked address; the trusted
    // proxy (HAProxy does this) appended a second line with the real one.
    let mut proxied_two_lines = browser("/v1/batch?write_key=web", batch(1));
    proxied_two_lines
        .headers
        .push(("x-forwarded-for", "198.51.100.7".into()));
    proxied_two_lines
        .headers
        .push(("x-forwarded-for", "203.0.113.51".into()));
    let mut no_content_type = browser("/v1/batch?write_key=web", batch(1));
    no_content_type.headers.remove(1);
    let mut upper_hex = hmac_signed(None, now, HMAC_SECRET);
    for h in &mut upper_hex.headers {
        if h.0 == signature::HEADER_SIGNATURE {
            h.1 = h.1.to_uppercase();
        }
    }
    let preflight_for = |path: &str, origin: &str| Req {
        method: "OPTIONS",
        path: path.into(),
        headers: vec![
            ("origin", origin.into()),
            ("access-control-request-method", "POST".into()),
        ],
        body: Vec::new(),
        from: TRUSTED,
    };

    vec![
        case(
            "write key from an allowed origin",
            browser("/v1/batch?write_key=web", batch(2)),
            accepted("web", 2)
                .header("access-control-allow-origin", Some(ORIGIN))
                .header("vary", Some("Origin")),
        ),
        case(
            "one event on /v1/event",
            browser("/v1/event?write_key=web", event(7).to_string().into_bytes()),
            accepted("web", 1),
        ),
        case(
            "unknown write key",
            browser("/v1/batch?write_key=nobody", batch(1)),
            refused(401, 40102),
        ),
        case(
            "revoked client",
            browser("/v1/batch?write_key=revoked", batch(1)),
            refused(401, 40111),
        ),
        case(
            "expired client",
            browser("/v1/batch?write_key=expired", batch(1)),
            refused(401, 40111),
        ),
        case(
            "API key past its rotation grace period",
            bearer(api_key::format("rotated", b"old")),
            refused(401, 40103),
        ),
        case(
            "client without write permission",
            browser("/v1/batch?write_key=readonly", batch(1)),
            refused(403, 40301),
        ),
        case(
            "no credentials",
            browser("/v1/batch", batch(1)),
            refused(401, 40101),
        ),
        case(
            "origin the client does not allow: no CORS headers either",
            denied_origin,
            refused(403, 40302).without("access-control-allow-origin"),
        ),
        case(
            "preflight naming a key restricted to other origins",
            preflight_for("/v1/batch?write_key=web", "https://evil.example"),
            refused(403, 40302).without("access-control-allow-origin"),
        ),
        case(
            "preflight naming a key, from one of its origins",
            preflight_for("/v1/batch?write_key=web", ORIGIN),
            Expect {
                status: 204,
                code: None,
                counts: None,
                headers: vec![("access-control-allow-origin", Some(ORIGIN))],
                absent: Vec::new(),
                frame: None,
            },
        ),
        case(
            "no Content-Type",
            no_content_type,
            refused(415, 41501),
        ),
        case(
            "HMAC signature in upper-case hex (documented: lower case)",
            upper_hex,
            refused(401, 40103),
        ),
        case(
            "every event rejected: 400, not success",
            browser(
                "/v1/batch?write_key=web",
                json!({"batch": [{"event_id": "nope", "name": "x"}, {"event_id": "0192f0c1-7b3a-7cc2-9a57-00000000abcd"}]})
                    .to_string()
                    .into_bytes(),
            ),
            refused(400, 40018).header("access-control-allow-origin", Some(ORIGIN)),
        ),
        case(
            "a body write key that is not the query's",
            browser(
                "/v1/batch?write_key=web",
                json!({"write_key": "limited", "batch": [event(1)]})
                    .to_string()
                    .into_bytes(),
            ),
            refused(400, 40003),
        ),
        case(
            "a newline in a property key",
            browser(
                "/v1/batch?write_key=web",
                json!({"batch": [{"event_id": "0192f0c1-7b3a-7cc2-9a57-00000000abce", "name": "x", "properties": {"a\nb": 1}}]})
                    .to_string()
                    .into_bytes(),
            ),
            refused(400, 40018),
        ),
        case(
            "write key without an origin",
            no_origin,
            refused(403, 40302),
        ),
        case(
            "preflight",
            Req {
                method: "OPTIONS",
                path: "/v1/batch".into(),
                headers: vec![
                    ("origin", ORIGIN.into()),
                    ("access-control-request-method", "POST".into()),
                ],
                body: Vec::new(),
                from: TRUSTED,
            },
            Expect {
                status: 204,
                code: None,
                counts: None,
                headers: vec![
                    ("access-control-allow-methods", Some("POST, OPTIONS")),
                    ("access-control-allow-origin", Some(ORIGIN)),
                    ("access-control-max-age", Some("600")),
                ],
                absent: Vec::new(),
                frame: None,
            },
        ),
        case(
            "beacon with the key in the body",
            beacon_in_body,
            accepted("web", 1),
        ),
        case(
            "beacon with the key in the query",
            beacon_in_query,
            accepted("web", 1),
        ),
        case(
            "HMAC signature",
            hmac_signed(None, now, HMAC_SECRET),
            accepted("server", 2),
        ),
        case(
            "HMAC signature with the wrong secret",
            hmac_signed(None, now, b"wrong"),
            refused(401, 40103),
        ),
        case(
            "HMAC signature outside the time window",
            hmac_signed(None, now - 400, HMAC_SECRET),
            refused(401, 40104),
        ),
        Case {
            name: "HMAC nonce replayed",
            steps: vec![
                Step {
                    mode: Mode::Accept,
                    req: hmac_signed(Some(&nonce), now, HMAC_SECRET),
                    expect: accepted("server", 2),
                },
                Step {
                    mode: Mode::Accept,
                    req: hmac_signed(Some(&nonce), now, HMAC_SECRET),
                    expect: refused(401, 40105),
                },
            ],
        },
        case(
            "JWT HS256",
            bearer(jwt("app", "HS256", JWT_SECRET, json!({"exp": exp}))),
            accepted("app", 1),
        ),
        case(
            "JWT expired",
            bearer(jwt("app", "HS256", JWT_SECRET, json!({"exp": now - 3600}))),
            refused(401, 40106),
        ),
        case(
            "JWT with a bad signature",
            bearer(jwt("app", "HS256", b"not-the-secret", json!({"exp": exp}))),
            refused(401, 40103),
        ),
        case(
            "JWT alg none",
            bearer({
                let t = jwt("app", "HS256", JWT_SECRET, json!({"exp": exp}));
                let mut parts = t.split('.');
                let _ = parts.next();
                let head = B64.encode(json!({"alg": "none", "kid": "app"}).to_string());
                format!("{head}.{}.", parts.next().unwrap())
            }),
            refused(401, 40109),
        ),
        case(
            "JWT alg confusion (HS256 keyed with the RS256 public key)",
            bearer(jwt("rsapp", "HS256", &rs_public, json!({"exp": exp}))),
            refused(401, 40109),
        ),
        case(
            "API key",
            bearer(api_key::format("backend", b"s3cret")),
            accepted("backend", 1),
        ),
        case(
            "API key with the wrong secret",
            bearer(api_key::format("backend", b"guess")),
            refused(401, 40103),
        ),
        case("gzip body", gzipped, accepted("web", 3)),
        case("gzip bomb", bombed, refused(413, 41302)),
        case(
            "body over the limit",
            browser("/v1/batch?write_key=web", vec![b' '; 600 * 1024]),
            refused(413, 41302),
        ),
        case(
            "too many events",
            browser("/v1/batch?write_key=web", batch(501)),
            refused(413, 41303),
        ),
        case(
            "malformed JSON",
            browser("/v1/batch?write_key=web", b"{\"batch\": [".to_vec()),
            refused(400, 40001),
        ),
        case("unsupported media type", xml, refused(415, 41501)),
        case(
            "oversize event: partial acceptance",
            browser("/v1/batch?write_key=web", big_event),
            Expect {
                status: 202,
                code: None,
                counts: Some((1, 1)),
                headers: vec![],
                absent: Vec::new(),
                frame: Some(FrameExpect {
                    client_id: "web",
                    events: 1,
                    client_ip: TRUSTED,
                }),
            },
        ),
        Case {
            name: "client rate limit reached",
            steps: vec![
                Step {
                    mode: Mode::Accept,
                    req: browser("/v1/batch?write_key=limited", batch(1)),
                    expect: accepted("limited", 1)
                        .header("ratelimit-limit", Some("2"))
                        .header("ratelimit-remaining", Some("1")),
                },
                Step {
                    mode: Mode::Accept,
                    req: browser("/v1/batch?write_key=limited", batch(1)),
                    expect: accepted("limited", 1).header("ratelimit-remaining", Some("0")),
                },
                Step {
                    mode: Mode::Accept,
                    req: browser("/v1/batch?write_key=limited", batch(1)),
                    expect: refused(429, 42901)
                        .header("retry-after", None)
                        .header("ratelimit-remaining", Some("0")),
                },
            ],
        },
        Case {
            name: "per-IP rate limit reached",
            steps: vec![
                Step {
                    mode: Mode::Accept,
                    req: browser("/v1/batch?write_key=perip", batch(1)),
                    expect: accepted("perip", 1).header("ratelimit-remaining", Some("0")),
                },
                Step {
                    mode: Mode::Accept,
                    req: browser("/v1/batch?write_key=perip", batch(1)),
                    expect: refused(429, 42902).header("retry-after", None),
                },
                // Another address has its own allowance.
                Step {
                    mode: Mode::Accept,
                    req: Req {
                        from: UNTRUSTED,
                        ..browser("/v1/batch?write_key=perip", batch(1))
                    },
                    expect: accepted("perip", 1).stamped_ip(UNTRUSTED),
                },
            ],
        },
        case("blocklisted peer", blocked_peer, refused(403, 40303)),
        // Behind Cloudflare the client address is CF-Connecting-IP, which
        // Cloudflare sets; X-Forwarded-For is never consulted there.
        case(
            "blocklisted client behind a trusted proxy (Workers: CF-Connecting-IP decides)",
            blocked_forwarded,
            match runtime {
                Runtime::Wasmtime => refused(403, 40303),
                Runtime::Workerd => accepted("web", 1),
            },
        ),
        case(
            "client address from a trusted proxy's X-Forwarded-For (Workers: CF-Connecting-IP decides)",
            proxied,
            match runtime {
                Runtime::Wasmtime => accepted("web", 1).stamped_ip("203.0.113.50"),
                Runtime::Workerd => accepted("web", 1),
            },
        ),
        case(
            "X-Forwarded-For on two lines: the proxy's line is read, not the client's (Workers: CF-Connecting-IP decides)",
            proxied_two_lines,
            match runtime {
                Runtime::Wasmtime => accepted("web", 1).stamped_ip("203.0.113.51"),
                Runtime::Workerd => accepted("web", 1),
            },
        ),
        case(
            "X-Forwarded-For from an untrusted peer is ignored",
            spoofed,
            accepted("web", 1).stamped_ip(UNTRUSTED),
        ),
        Case {
            name: "aggregator refuses: 503, nothing acknowledged",
            steps: vec![Step {
                mode: Mode::Refuse,
                req: browser("/v1/batch?write_key=web", batch(1)),
                expect: refused(503, 50301).header("retry-after", Some("7")),
            }],
        },
        Case {
            name: "aggregator does not answer in time: 503",
            steps: vec![Step {
                mode: Mode::Stall,
                req: browser("/v1/batch?write_key=web", batch(1)),
                expect: refused(503, 50301).header("retry-after", Some("7")),
            }],
        },
        case(
            "unknown path",
            post("/v2/whatever", &[], Vec::new()),
            refused(404, 40401),
        ),
        case(
            "wrong method",
            Req {
                method: "GET",
                path: "/v1/batch".into(),
                headers: Vec::new(),
                body: Vec::new(),
                from: TRUSTED,
            },
            refused(405, 40501),
        ),
    ]
}

/// Runs one step; returns what was wrong, if anything.
async fn run_step(edge: &Edge, stand_in: &StandIn, step: &Step) -> Result<(), String> {
    stand_in.set_mode(step.mode);
    let from: IpAddr = step.req.from.parse().unwrap();
    let client = edge.client_from(from);
    let method = reqwest::Method::from_bytes(step.req.method.as_bytes()).unwrap();
    let mut rb = client
        .request(method, format!("{}{}", edge.url, step.req.path))
        .body(step.req.body.clone());
    for (k, v) in &step.req.headers {
        rb = rb.header(*k, v);
    }
    if edge.runtime == Runtime::Workerd {
        // workerd sees no TCP peer: Cloudflare's front end vouches for it
        // in CF-Connecting-IP, which `wrangler dev` passes through.
        rb = rb.header("cf-connecting-ip", step.req.from);
    }
    let resp = rb
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    stand_in.set_mode(Mode::Accept);
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let e = &step.expect;
    let mut problems = Vec::new();
    if status != e.status {
        problems.push(format!("status {status}, expected {}", e.status));
    }
    if let Some(code) = e.code {
        if body["code"].as_u64() != Some(code) {
            problems.push(format!("code {}, expected {code}", body["code"]));
        }
        if body["success"] != json!(false) || body["request_id"].as_str().is_none() {
            problems.push("not the error envelope".into());
        }
    }
    if let Some((a, r)) = e.counts
        && (body["accepted"].as_u64(), body["rejected"].as_u64()) != (Some(a), Some(r))
    {
        problems.push(format!(
            "counts {}/{}, expected {a}/{r}",
            body["accepted"], body["rejected"]
        ));
    }
    for (name, value) in &e.headers {
        let got = headers.get(*name).and_then(|v| v.to_str().ok());
        match (got, value) {
            (None, _) => problems.push(format!("header {name} missing")),
            (Some(g), Some(v)) if g != *v => {
                problems.push(format!("header {name}: {g:?}, expected {v:?}"))
            }
            _ => {}
        }
    }
    for name in &e.absent {
        if let Some(v) = headers.get(*name) {
            problems.push(format!("header {name} present ({v:?}), expected none"));
        }
    }
    let frames = stand_in.take_frames();
    match (&e.frame, frames.as_slice()) {
        (None, []) => {}
        (None, f) => problems.push(format!("{} frame(s) forwarded, expected none", f.len())),
        (Some(want), [f]) => {
            let b = &f.batch;
            if b.client_id != want.client_id
                || b.events.len() != want.events
                || b.facts.client_ip.as_deref() != Some(want.client_ip)
                || f.header.edge_id != "conformance"
            {
                problems.push(format!(
                    "frame: client {} events {} ip {:?} edge {}; expected {} {} {}",
                    b.client_id,
                    b.events.len(),
                    b.facts.client_ip,
                    f.header.edge_id,
                    want.client_id,
                    want.events,
                    want.client_ip
                ));
            }
        }
        (Some(_), f) => problems.push(format!("{} frames forwarded, expected one", f.len())),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{} — body {body}", problems.join("; ")))
    }
}

async fn conformance(runtime: Runtime) {
    let stand_in = StandIn::start(clients()).await;
    let edge = Edge::start(runtime, &edge_variables(&stand_in.url)).await;
    let mut failures = Vec::new();
    let cases = cases(runtime);
    let total = cases.len();
    for case in &cases {
        for (i, step) in case.steps.iter().enumerate() {
            if let Err(e) = run_step(&edge, &stand_in, step).await {
                failures.push(format!("{} (step {}): {e}", case.name, i + 1));
                break;
            }
        }
    }

    // Unknown ids are cached too: a flood of them costs one lookup.
    for _ in 0..5 {
        let r = edge
            .client_from(TRUSTED.parse().unwrap())
            .post(format!("{}/v1/batch?write_key=ghost", edge.url))
            .header("origin", ORIGIN)
            .header("content-type", "application/json")
            .body(batch(1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    if stand_in.lookups("ghost") != 1 {
        failures.push(format!(
            "negative cache: {} lookups of an unknown id, expected 1",
            stand_in.lookups("ghost")
        ));
    }
    if stand_in.bad_lookup_signatures() != 0 {
        failures.push("client lookups not signed with the edge key".into());
    }
    assert!(
        failures.is_empty(),
        "{runtime:?}: {} of {total} cases failed:\n  {}\n--- edge log ---\n{}",
        failures.len(),
        failures.join("\n  "),
        edge.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_holds_for_the_spin_component_under_wasmtime() {
    conformance(Runtime::Wasmtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_holds_for_the_worker_under_workerd() {
    conformance(Runtime::Workerd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_edge_names_the_missing_setting() {
    for runtime in [Runtime::Wasmtime, Runtime::Workerd] {
        let stand_in = StandIn::start(clients()).await;
        let vars: Vec<_> = edge_variables(&stand_in.url)
            .into_iter()
            .filter(|(k, _)| *k != "edge_key_secret")
            .collect();
        let edge = Edge::start(runtime, &vars).await;
        let r = edge
            .client_from(TRUSTED.parse().unwrap())
            .post(format!("{}/v1/batch?write_key=web", edge.url))
            .body(batch(1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500, "{runtime:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], 50001, "{runtime:?}: {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("edge_key_secret"),
            "{runtime:?}: {body}"
        );
    }
}

#[tokio::test]
async fn an_edge_listing_several_aggregators_fails_over_keeping_the_batch_id() {
    // Nothing listens on the first; the second is full (503); the third
    // takes frames.
    let dead = format!(
        "http://127.0.0.1:{}",
        outpost_tests::aggregator::free_port()
    );
    let busy = StandIn::start(clients()).await;
    busy.set_mode(Mode::Refuse);
    let ok = StandIn::start(clients()).await;
    let vars = edge_variables(&format!("{dead}, {}, {}", busy.url, ok.url));
    let edge = Edge::start(Runtime::Wasmtime, &vars).await;
    let send = || {
        edge.client_from(TRUSTED.parse().unwrap())
            .post(format!("{}/v1/batch?write_key=web", edge.url))
            .header("origin", ORIGIN)
            .header("content-type", "application/json")
            .body(batch(3))
            .send()
    };
    let resp = send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let accepted = ok.take_frames();
    let refused = busy.take_refused();
    assert_eq!(accepted.len(), 1, "the third aggregator took the frame");
    assert_eq!(refused.len(), 1, "the second was asked first, and refused");
    assert_eq!(
        refused[0].header.batch_id, accepted[0].header.batch_id,
        "the same frame, so the same batch id"
    );
    // The client lookup failed over past the dead one to the next that
    // answers (lookups are not refused by a full spool).
    assert_eq!(busy.lookups("web"), 1);
    assert_eq!(ok.lookups("web"), 0);
    // When every one refuses, the client hears 503 with Retry-After.
    ok.set_mode(Mode::Refuse);
    let resp = send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(ok.take_refused().len(), 1);
}
