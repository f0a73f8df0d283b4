//! The edge pipeline: one request in, one response out, and at most one
//! signed frame forwarded to the aggregator on the way.
//!
//! Everything platform-specific sits behind three small seams: [`Kv`] (the
//! platform's key-value store), [`Upstream`] (HTTP to the aggregator) and
//! [`EdgeEnv`] (clock and randomness). Adapters translate their platform's
//! request into an [`EdgeRequest`] (reading the body with the bound from
//! [`EdgeConfig::max_wire_bytes`]) and the [`EdgeResponse`] back; every
//! rule lives here or in `outpost-shared`.
//!
//! Order of work for `POST /v1/batch` and `POST /v1/event`: client address
//! and block list → body type and decoding → parse and validate → who is
//! calling (write key, HMAC signature, JWT or API key; the client record
//! comes from KV or, on a miss, from the aggregator) → permission and origin
//! → rate limits → one frame to the aggregator → `202` once it acknowledged,
//! `503` + `Retry-After` when it did not.

use std::future::Future;
use std::net::IpAddr;

use outpost_shared::ErrorCode;
use outpost_shared::auth::{api_key, jwt, signature};
use outpost_shared::client::{AuthMethod, ClientRecord};
use outpost_shared::error::{AcceptedResponse, ErrorEnvelope, FieldError};
use outpost_shared::event::{EdgeFacts, Timestamp};
use outpost_shared::frame::{self, Batch, BatchId, EdgeKey, FrameMeta};
use outpost_shared::kv::Kv;
use outpost_shared::ratelimit::{self, Decision};
use outpost_shared::validate::{self, Limits};

use crate::body;
use crate::net::{NetList, client_ip};

/// What the edge is configured with (from the platform's variables and secrets).
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Names this deployment in every frame.
    pub edge_id: String,
    /// The key frames are signed with (and internal requests).
    pub edge_key: EdgeKey,
    /// Event limits.
    pub limits: Limits,
    /// Proxies whose `X-Forwarded-For` entries are believed.
    pub trusted_proxies: NetList,
    /// Addresses and ranges refused with `403`.
    pub blocklist: NetList,
    /// How long a client record stays cached in KV, seconds (revocation
    /// reaches this edge within it).
    pub client_cache_ttl_secs: u64,
    /// Accepted clock difference for signed requests, seconds.
    pub signature_window_secs: u64,
    /// `Retry-After` when the aggregator did not acknowledge.
    pub retry_after_secs: u32,
}

impl EdgeConfig {
    /// The most raw body bytes an adapter should read.
    pub fn max_wire_bytes(&self) -> usize {
        body::max_wire_bytes(self.limits.max_body_bytes)
    }
}

/// A request, as the adapter saw it.
#[derive(Debug, Clone)]
pub struct EdgeRequest {
    /// HTTP method, upper case.
    pub method: String,
    /// Path and query, as sent.
    pub path_and_query: String,
    /// Headers; names in lower case.
    pub headers: Vec<(String, String)>,
    /// The raw body (bounded by the adapter).
    pub body: Vec<u8>,
    /// The TCP peer's address.
    pub peer_ip: IpAddr,
    /// An address the platform vouches for (`CF-Connecting-IP`), if any.
    pub platform_ip: Option<IpAddr>,
    /// The platform's point of presence, if it says.
    pub pop: Option<String>,
    /// The platform's country guess, if it gives one.
    pub country_hint: Option<String>,
}

impl EdgeRequest {
    /// A header's value (the first, if repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        let (_, query) = self.path_and_query.split_once('?')?;
        query.split('&').find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v)
        })
    }

    fn path(&self) -> &str {
        self.path_and_query.split('?').next().unwrap_or("")
    }
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body (JSON, or empty).
    pub body: Vec<u8>,
}

impl EdgeResponse {
    fn json(status: u16, body: &impl serde::Serialize) -> EdgeResponse {
        EdgeResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(body).unwrap_or_default(),
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> EdgeResponse {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What the aggregator said to a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAnswer {
    /// `202`: durable. Its per-event errors index the frame's events.
    Accepted(AcceptedResponse),
    /// Any other status, with the envelope if there was one.
    Refused(u16, Option<ErrorEnvelope>),
}

/// The aggregator, over the platform's HTTP client.
pub trait Upstream {
    /// The transport's error (timeout, connection refused, …).
    type Error: core::fmt::Display;
    /// `POST /v1/ingest` with a frame, within the platform's timeout.
    fn forward(&self, frame: Vec<u8>) -> impl Future<Output = Result<UpstreamAnswer, Self::Error>>;
    /// `GET /internal/v1/clients/{id}`, signed with the edge key:
    /// `Ok(None)` for `404`.
    fn client(&self, id: &str) -> impl Future<Output = Result<Option<ClientRecord>, Self::Error>>;
}

/// Clock and randomness, from the platform.
pub trait EdgeEnv {
    /// Milliseconds since the epoch.
    fn now_ms(&self) -> i64;
    /// 16 random bytes (batch ids, request ids).
    fn random(&self) -> [u8; 16];
}

/// An error answer, with what the envelope needs.
struct Refusal {
    code: ErrorCode,
    message: Option<String>,
    errors: Vec<FieldError>,
    rate: Option<Decision>,
}

impl From<ErrorCode> for Refusal {
    fn from(code: ErrorCode) -> Refusal {
        Refusal {
            code,
            message: None,
            errors: Vec::new(),
            rate: None,
        }
    }
}

impl From<FieldError> for Refusal {
    fn from(e: FieldError) -> Refusal {
        Refusal {
            code: e.code,
            message: Some(e.message.clone()),
            errors: vec![e],
            rate: None,
        }
    }
}

const ALLOWED_HEADERS: &str = "content-type, content-encoding, authorization, x-outpost-key, x-outpost-timestamp, x-outpost-nonce, x-outpost-signature, x-request-id";

/// Handles one request.
pub async fn handle<K: Kv, U: Upstream, E: EdgeEnv>(
    req: EdgeRequest,
    cfg: &EdgeConfig,
    kv: &K,
    upstream: &U,
    env: &E,
) -> EdgeResponse {
    let request_id = request_id(&req, env);
    let origin = req.header("origin").map(str::to_owned);
    let mut resp = match (req.method.as_str(), req.path()) {
        // Preflight carries no credentials, so it is answered for any origin;
        // the real request is checked against the client's allowed origins.
        ("OPTIONS", "/v1/batch" | "/v1/event") => EdgeResponse {
            status: 204,
            headers: Vec::new(),
            body: Vec::new(),
        }
        .header("access-control-allow-methods", "POST, OPTIONS")
        .header("access-control-allow-headers", ALLOWED_HEADERS)
        .header("access-control-max-age", "600"),
        ("POST", "/v1/batch" | "/v1/event") => {
            match ingest(&req, cfg, kv, upstream, env, &request_id).await {
                Ok(r) => r,
                Err(refusal) => refusal_response(refusal, &request_id, cfg.retry_after_secs),
            }
        }
        (_, "/v1/batch" | "/v1/event") => refusal_response(
            ErrorCode::MethodNotAllowed.into(),
            &request_id,
            cfg.retry_after_secs,
        ),
        _ => refusal_response(
            ErrorCode::NotFound.into(),
            &request_id,
            cfg.retry_after_secs,
        ),
    };
    if let Some(o) = origin {
        resp = resp
            .header("access-control-allow-origin", o)
            .header("vary", "Origin")
            .header(
                "access-control-expose-headers",
                "x-request-id, ratelimit-limit, ratelimit-remaining, ratelimit-reset, retry-after",
            );
    }
    resp.header("x-request-id", request_id)
}

/// The answer when the edge cannot run at all (its settings are missing or
/// malformed): `500` with the envelope, naming what is wrong, so that an
/// operator sees it on the first request.
pub fn misconfigured<E: EdgeEnv>(req: &EdgeRequest, problem: String, env: &E) -> EdgeResponse {
    let request_id = request_id(req, env);
    let refusal = Refusal {
        code: ErrorCode::Internal,
        message: Some(format!("the edge is misconfigured: {problem}")),
        errors: Vec::new(),
        rate: None,
    };
    refusal_response(refusal, &request_id, 0).header("x-request-id", request_id)
}

fn request_id<E: EdgeEnv>(req: &EdgeRequest, env: &E) -> String {
    req.header("x-request-id")
        .filter(|v| outpost_shared::error::is_acceptable_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| hex(&env.random()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn refusal_response(r: Refusal, request_id: &str, retry_after: u32) -> EdgeResponse {
    let mut env = ErrorEnvelope::new(r.code, request_id).with_errors(r.errors);
    if let Some(m) = r.message {
        env = env.with_message(m);
    }
    let mut resp = EdgeResponse::json(r.code.http_status(), &env);
    if let Some(d) = &r.rate {
        for (k, v) in d.headers() {
            resp = resp.header(&k.to_ascii_lowercase(), v);
        }
    } else if r.code.is_retryable() {
        resp = resp.header("retry-after", retry_after.to_string());
    }
    resp
}

/// The credential a request presents.
enum Credential<'a> {
    WriteKey(&'a str),
    Signature { client_id: &'a str },
    Jwt(&'a str),
    ApiKey(&'a str),
}

fn credential<'a>(
    req: &'a EdgeRequest,
    body_write_key: Option<&'a str>,
) -> Result<Credential<'a>, ErrorCode> {
    if let Some(auth) = req.header("authorization") {
        let token = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
            .ok_or(ErrorCode::MissingCredentials)?
            .trim();
        return Ok(if token.starts_with(api_key::PREFIX) {
            Credential::ApiKey(token)
        } else {
            Credential::Jwt(token)
        });
    }
    if let Some(id) = req.header(signature::HEADER_KEY) {
        return Ok(Credential::Signature { client_id: id });
    }
    req.query_param("write_key")
        .or(body_write_key)
        .map(Credential::WriteKey)
        .ok_or(ErrorCode::MissingCredentials)
}

/// KV key of a cached client record; the value carries its own expiry
/// (Spin's store has none) and `null` for "no such client".
fn client_cache_key(id: &str) -> String {
    format!("client:{id}")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedClient {
    until_ms: i64,
    record: Option<ClientRecord>,
}

async fn client_record<K: Kv, U: Upstream>(
    id: &str,
    cfg: &EdgeConfig,
    kv: &K,
    upstream: &U,
    now_ms: i64,
) -> Result<ClientRecord, Refusal> {
    if !outpost_shared::client::is_valid_client_id(id) {
        return Err(ErrorCode::UnknownKey.into());
    }
    let key = client_cache_key(id);
    if let Ok(Some(bytes)) = kv.get(&key).await
        && let Ok(cached) = serde_json::from_slice::<CachedClient>(&bytes)
        && cached.until_ms > now_ms
    {
        return cached.record.ok_or_else(|| ErrorCode::UnknownKey.into());
    }
    let record = upstream.client(id).await.map_err(|e| Refusal {
        code: ErrorCode::UpstreamUnavailable,
        message: Some(format!("client lookup failed: {e}")),
        errors: Vec::new(),
        rate: None,
    })?;
    // A record that does not check out is treated as unknown.
    let record = record.filter(|r| r.id == id && r.check().is_ok());
    let cached = CachedClient {
        until_ms: now_ms + (cfg.client_cache_ttl_secs as i64) * 1000,
        record: record.clone(),
    };
    if let Ok(bytes) = serde_json::to_vec(&cached) {
        // Negative answers are cached too, so a flood of made-up ids does
        // not become a flood of lookups. A KV failure only costs a lookup.
        let _ = kv.put(&key, &bytes, cfg.client_cache_ttl_secs).await;
    }
    record.ok_or_else(|| ErrorCode::UnknownKey.into())
}

async fn authenticate<'a, K: Kv, U: Upstream>(
    req: &EdgeRequest,
    cred: Credential<'a>,
    cfg: &EdgeConfig,
    kv: &K,
    upstream: &U,
    now_ms: i64,
) -> Result<ClientRecord, Refusal> {
    let now = Timestamp(now_ms);
    let (record, method) = match cred {
        Credential::WriteKey(id) => (
            client_record(id, cfg, kv, upstream, now_ms).await?,
            AuthMethod::WriteKey,
        ),
        Credential::ApiKey(key) => {
            let id = api_key::client_id(key).ok_or(ErrorCode::UnknownKey)?;
            let record = client_record(id, cfg, kv, upstream, now_ms).await?;
            if !record.api_key_hashes(now).any(|h| api_key::verify(key, h)) {
                return Err(ErrorCode::InvalidSignature.into());
            }
            (record, AuthMethod::ApiKey)
        }
        Credential::Jwt(token) => {
            let id = jwt::token_key_id(token).ok_or(ErrorCode::MalformedToken)?;
            let record = client_record(&id, cfg, kv, upstream, now_ms).await?;
            let policy = record.jwt.clone().unwrap_or_default();
            let keys = record.jwt_keys(now);
            let mut last = ErrorCode::UnknownKey;
            let mut ok = false;
            for k in &keys {
                match jwt::verify(token, k, &policy, now_ms / 1000) {
                    Ok(_) => {
                        ok = true;
                        break;
                    }
                    Err(code) => last = code,
                }
            }
            if !ok {
                return Err(last.into());
            }
            (record, AuthMethod::Jwt)
        }
        Credential::Signature { client_id } => {
            let record = client_record(client_id, cfg, kv, upstream, now_ms).await?;
            let signed = signature::SignedRequest {
                method: &req.method,
                path_and_query: &req.path_and_query,
                timestamp: req
                    .header(signature::HEADER_TIMESTAMP)
                    .ok_or(ErrorCode::MissingCredentials)?,
                nonce: req.header(signature::HEADER_NONCE),
                body: &req.body,
                signature: req
                    .header(signature::HEADER_SIGNATURE)
                    .ok_or(ErrorCode::MissingCredentials)?,
            };
            signature::verify(
                &signed,
                record.hmac_secrets(now),
                now_ms / 1000,
                cfg.signature_window_secs,
            )?;
            if let Some(nonce) = signed.nonce {
                match signature::remember_nonce(kv, client_id, nonce, cfg.signature_window_secs)
                    .await
                {
                    Ok(()) => {}
                    Err(signature::NonceError::Reused) => return Err(ErrorCode::NonceReused.into()),
                    // KV down: the aggregator's dedup still stops a replay.
                    Err(signature::NonceError::Kv(_)) => {}
                }
            }
            (record, AuthMethod::Hmac)
        }
    };
    if record.method != method {
        return Err(ErrorCode::UnknownKey.into());
    }
    record.usable_at(now)?;
    Ok(record)
}

async fn limit<K: Kv>(
    kv: &K,
    key: &str,
    limit: &ratelimit::RateLimit,
    now_ms: i64,
    code: ErrorCode,
) -> Result<Option<Decision>, Refusal> {
    // KV trouble must not turn into an outage: the limit then lets the request through.
    match ratelimit::check(kv, key, limit, now_ms, 1).await {
        Ok(d) if d.allowed => Ok(Some(d)),
        Ok(d) => Err(Refusal {
            code,
            message: None,
            errors: Vec::new(),
            rate: Some(d),
        }),
        Err(_) => Ok(None),
    }
}

async fn ingest<K: Kv, U: Upstream, E: EdgeEnv>(
    req: &EdgeRequest,
    cfg: &EdgeConfig,
    kv: &K,
    upstream: &U,
    env: &E,
    request_id: &str,
) -> Result<EdgeResponse, Refusal> {
    let now_ms = env.now_ms();
    let ip = client_ip(
        req.platform_ip,
        req.peer_ip,
        req.header("x-forwarded-for"),
        &cfg.trusted_proxies,
    );
    if cfg.blocklist.contains(ip) {
        return Err(ErrorCode::IpBlocked.into());
    }
    body::body_kind(req.header("content-type"))?;
    if req.body.len() > cfg.max_wire_bytes() {
        return Err(ErrorCode::BodyTooLarge.into());
    }
    let decoded = body::decode(
        req.header("content-encoding"),
        req.body.clone(),
        cfg.limits.max_body_bytes,
    )?;
    let received_at = Timestamp(now_ms);
    let (events, mut rejected, sent_at, body_key) = if req.path() == "/v1/event" {
        let event = validate::parse_event(&decoded, &cfg.limits, received_at)?;
        (vec![event], Vec::new(), None, None)
    } else {
        let out = validate::parse_batch(&decoded, &cfg.limits, received_at)?;
        (out.accepted, out.rejected, out.sent_at, out.write_key)
    };

    let record = authenticate(
        req,
        credential(req, body_key.as_deref())?,
        cfg,
        kv,
        upstream,
        now_ms,
    )
    .await?;
    if !record.permissions.allows("write", "events") {
        return Err(ErrorCode::PermissionDenied.into());
    }
    let origin = req.header("origin");
    if let Some(o) = origin
        && !record.origin_allowed(o)
    {
        return Err(ErrorCode::OriginNotAllowed.into());
    }
    // A public write key is not a secret: it only works from a browser
    // origin the client allows.
    if record.method == AuthMethod::WriteKey
        && origin.is_none()
        && !record.allowed_origins.iter().any(|p| p == "*")
    {
        return Err(ErrorCode::OriginNotAllowed.into());
    }

    let mut rate = None;
    if let Some(l) = &record.rate_limit {
        rate = limit(
            kv,
            &format!("rl:c:{}", record.id),
            l,
            now_ms,
            ErrorCode::RateLimitedClient,
        )
        .await?;
    }
    if let Some(l) = &record.ip_rate_limit {
        let d = limit(
            kv,
            &format!("rl:ip:{}:{ip}", record.id),
            l,
            now_ms,
            ErrorCode::RateLimitedIp,
        )
        .await?;
        rate = rate.or(d);
    }

    let accepted_count = events.len();
    let mut upstream_rejected = 0;
    if accepted_count > 0 {
        let indexes: Vec<usize> = original_indexes(accepted_count, &rejected);
        let batch = Batch {
            client_id: record.id.clone(),
            facts: EdgeFacts {
                client_ip: Some(ip.to_string()),
                user_agent: req
                    .header("user-agent")
                    .map(|u| u.chars().take(512).collect()),
                received_at,
                pop: req.pop.clone(),
                country_hint: req.country_hint.clone(),
                origin: origin.map(str::to_owned),
            },
            events,
            sent_at,
        };
        let meta = FrameMeta {
            edge_id: &cfg.edge_id,
            batch_id: BatchId(env.random()),
            created_at: received_at,
            compress: true,
        };
        let bytes = frame::encode(&meta, &batch, &cfg.edge_key).map_err(|e| Refusal {
            code: ErrorCode::Internal,
            message: Some(e.to_string()),
            errors: Vec::new(),
            rate: None,
        })?;
        match upstream.forward(bytes).await {
            Ok(UpstreamAnswer::Accepted(answer)) => {
                upstream_rejected = answer.errors.len();
                // The aggregator's indexes count the frame's events; give the
                // client back the positions it sent.
                for mut e in answer.errors {
                    e.index = e.index.and_then(|i| indexes.get(i).copied());
                    rejected.push(e);
                }
            }
            Ok(UpstreamAnswer::Refused(status, envelope)) => {
                return Err(Refusal {
                    code: ErrorCode::UpstreamUnavailable,
                    message: Some(format!(
                        "the aggregator answered {status}{}; retry with the same event ids",
                        envelope
                            .map(|e| format!(" ({})", e.code))
                            .unwrap_or_default()
                    )),
                    errors: Vec::new(),
                    rate: None,
                });
            }
            Err(e) => {
                return Err(Refusal {
                    code: ErrorCode::UpstreamUnavailable,
                    message: Some(format!(
                        "the aggregator did not acknowledge ({e}); retry with the same event ids"
                    )),
                    errors: Vec::new(),
                    rate: None,
                });
            }
        }
    }
    rejected.sort_by_key(|e| e.index);
    let answer = AcceptedResponse {
        success: true,
        accepted: accepted_count.saturating_sub(upstream_rejected),
        rejected: rejected.len(),
        errors: rejected,
        request_id: request_id.to_owned(),
    };
    let mut resp = EdgeResponse::json(202, &answer);
    if let Some(d) = rate {
        for (k, v) in d.headers() {
            resp = resp.header(&k.to_ascii_lowercase(), v);
        }
    }
    Ok(resp)
}

/// Positions in the client's batch of the events that passed validation:
/// the events in between were rejected (their errors carry their index).
fn original_indexes(accepted: usize, rejected: &[FieldError]) -> Vec<usize> {
    let skipped: std::collections::BTreeSet<usize> =
        rejected.iter().filter_map(|e| e.index).collect();
    (0..)
        .filter(|i| !skipped.contains(i))
        .take(accepted)
        .collect()
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
