//! The edge pipeline: one request in, one response out, and at most one
//! signed frame forwarded to the aggregator on the way.
//!
//! Everything platform-specific sits behind three small seams: [`Kv`] (the
//! platform's key-value store), [`Upstream`] (HTTP to the aggregator) and
//! [`EdgeEnv`] (clock, randomness, logging). Adapters translate their
//! platform's request into an [`EdgeRequest`] (reading the body with the
//! bound from [`EdgeConfig::max_wire_bytes`]) and the [`EdgeResponse`]
//! back; every rule lives here or in `outpost-shared`.
//!
//! Order of work for `POST /v1/batch` and `POST /v1/event`: client address,
//! block list and the per-address limit (before anything costs more than a
//! KV read) → body type and decoding → parse and validate → who is calling
//! (write key, HMAC signature, JWT or API key; the client record comes
//! from KV or, on a miss and within the lookup budget, from the
//! aggregator) → permission and origin → the client's rate limits → one
//! frame to the aggregator → `202` once it acknowledged, `503` +
//! `Retry-After` when it did not, `400` when no event was accepted.
//!
//! What a KV failure means depends on what the state is for. Rate limits
//! (per address, per client, the lookup budget) fail open: the store is
//! best effort, and an outage of it must not become an outage of ingest.
//! A nonce fails closed (`503` 50303): a signed request whose nonce cannot
//! be remembered could be replayed. A cached client record that cannot be
//! read or written costs a lookup. Every failure is logged through
//! [`EdgeEnv::warn`].
//!
//! CORS: answers carry `Access-Control-Allow-Origin` only for an origin the
//! calling client allows. A preflight naming a write key in its query is
//! answered for that key's origins; one naming none (a JWT, HMAC or API
//! key caller, whose credentials a preflight does not carry) is answered
//! for any origin, and the request itself is then checked.

use std::future::Future;
use std::net::IpAddr;

use outpost_shared::ErrorCode;
use outpost_shared::auth::caller::{self, Credential};
use outpost_shared::auth::signature;
use outpost_shared::client::{AuthMethod, ClientRecord};
use outpost_shared::error::{AcceptedResponse, ErrorEnvelope, FieldError};
use outpost_shared::event::{EdgeFacts, Timestamp};
use outpost_shared::frame::{self, Batch, BatchId, EdgeKey, FrameMeta};
use outpost_shared::kv::Kv;
use outpost_shared::ratelimit::{self, Decision, RateLimit};
use outpost_shared::seal::SealKey;
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
    /// Opens the aggregator's sealed client-record answers (derived from
    /// the edge key).
    pub record_key: SealKey,
    /// Seals client records cached in KV (derived from the edge key).
    pub cache_key: SealKey,
    /// Event limits.
    pub limits: Limits,
    /// Proxies whose `X-Forwarded-For` entries are believed.
    pub trusted_proxies: NetList,
    /// Addresses and ranges refused with `403`.
    pub blocklist: NetList,
    /// Requests per client address, checked first (`None`: off).
    pub ip_limit: Option<RateLimit>,
    /// Client records fetched from the aggregator (`None`: unbounded).
    pub lookup_limit: Option<RateLimit>,
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
    /// Headers; names in lower case; a header sent on several lines is
    /// several entries, in order.
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

    /// Every line of a list-valued header, joined with `, ` in the order
    /// received (RFC 9110: the same as one line holding them all). A proxy
    /// may append its own line instead of extending the client's.
    pub fn header_joined(&self, name: &str) -> Option<String> {
        let mut lines = self
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str());
        let first = lines.next()?;
        Some(lines.fold(first.to_owned(), |mut all, line| {
            all.push_str(", ");
            all.push_str(line);
            all
        }))
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
    /// `GET /internal/v1/clients/{id}`, signed with the edge key, its
    /// sealed answer opened: `Ok(None)` for `404`.
    fn client(&self, id: &str) -> impl Future<Output = Result<Option<ClientRecord>, Self::Error>>;
}

/// Clock, randomness and logging, from the platform.
pub trait EdgeEnv {
    /// Milliseconds since the epoch.
    fn now_ms(&self) -> i64;
    /// 16 random bytes (batch ids, request ids, sealing nonces).
    fn random(&self) -> [u8; 16];
    /// Logs something an operator should know (a KV failure): `event` is a
    /// stable name, `detail` free text. The platform's log; nothing by
    /// default.
    fn warn(&self, event: &str, detail: &str) {
        let _ = (event, detail);
    }
}

/// An error answer, with what the envelope needs.
struct Refusal {
    code: ErrorCode,
    message: Option<String>,
    errors: Vec<FieldError>,
    rate: Option<Decision>,
    /// `Retry-After` for a retryable refusal that is not a rate limit's.
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            message: Some(message.into()),
            ..Refusal::from(code)
        }
    }
}

impl From<ErrorCode> for Refusal {
    fn from(code: ErrorCode) -> Refusal {
        Refusal {
            code,
            message: None,
            errors: Vec::new(),
            rate: None,
            retry_after: None,
        }
    }
}

impl From<FieldError> for Refusal {
    fn from(e: FieldError) -> Refusal {
        Refusal {
            message: Some(e.message.clone()),
            errors: vec![e.clone()],
            ..Refusal::from(e.code)
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
    let mut cors = false;
    let resp = match (req.method.as_str(), req.path()) {
        ("OPTIONS", "/v1/batch" | "/v1/event") => {
            match preflight(&req, cfg, kv, upstream, env).await {
                Ok(()) => {
                    cors = origin.is_some();
                    EdgeResponse {
                        status: 204,
                        headers: Vec::new(),
                        body: Vec::new(),
                    }
                    .header("access-control-allow-methods", "POST, OPTIONS")
                    .header("access-control-allow-headers", ALLOWED_HEADERS)
                    .header("access-control-max-age", "600")
                }
                Err(refusal) => refusal_response(refusal, &request_id, cfg.retry_after_secs),
            }
        }
        ("POST", "/v1/batch" | "/v1/event") => {
            let mut caller = None;
            let resp = match ingest(&req, cfg, kv, upstream, env, &request_id, &mut caller).await {
                Ok(r) => r,
                Err(refusal) => refusal_response(refusal, &request_id, cfg.retry_after_secs),
            };
            if let Some(o) = &origin {
                cors = match &caller {
                    Some(record) => record.origin_allowed(o),
                    // Refused before the caller was established: the
                    // record the request names, if this edge has it cached.
                    None => cached_origin_allowed(&req, o, cfg, kv, env).await,
                };
            }
            resp
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
    let mut resp = resp;
    if let Some(o) = origin {
        // Whether the answer allows this origin depends on it: caches must
        // keep answers to different origins apart.
        resp = resp.header("vary", "Origin");
        if cors {
            resp = resp.header("access-control-allow-origin", o).header(
                "access-control-expose-headers",
                "x-request-id, ratelimit-limit, ratelimit-remaining, ratelimit-reset, retry-after",
            );
        }
    }
    resp.header("x-request-id", request_id)
}

/// The answer when the edge cannot run at all (its settings are missing or
/// malformed): `500` with the envelope, naming what is wrong, so that an
/// operator sees it on the first request.
pub fn misconfigured<E: EdgeEnv>(req: &EdgeRequest, problem: String, env: &E) -> EdgeResponse {
    let request_id = request_id(req, env);
    let refusal = Refusal::new(
        ErrorCode::Internal,
        format!("the edge is misconfigured: {problem}"),
    );
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
    } else if let Some(secs) = r.retry_after {
        resp = resp.header("retry-after", secs.to_string());
    } else if r.code.is_retryable() {
        resp = resp.header("retry-after", retry_after.to_string());
    }
    resp
}

fn credential<'a>(
    req: &'a EdgeRequest,
    body_write_key: Option<&'a str>,
) -> Result<Credential<'a>, Refusal> {
    if let Some(auth) = req.header("authorization") {
        return Credential::bearer(auth).ok_or_else(|| ErrorCode::MissingCredentials.into());
    }
    if let Some(id) = req.header(signature::HEADER_KEY) {
        return Ok(Credential::Signature { client_id: id });
    }
    match (req.query_param("write_key"), body_write_key) {
        (Some(q), Some(b)) if q != b => Err(Refusal::from(FieldError::new(
            ErrorCode::InvalidField,
            Some("write_key"),
            "the body's write_key differs from the query's: send one",
        ))),
        (Some(k), _) | (None, Some(k)) => Ok(Credential::WriteKey(k)),
        (None, None) => Err(ErrorCode::MissingCredentials.into()),
    }
}

// KV keys. The first segment names the use: on Spin each use has its own
// slots (`kv_slots`), so a flood of one cannot evict another.

/// A cached client record (sealed, with its expiry inside).
fn client_key(id: &str) -> String {
    format!("client:{id}")
}

/// "No such client", cached so that a repeated unknown id costs one lookup.
fn no_client_key(id: &str) -> String {
    format!("noclient:{id}")
}

/// The lookup budget's one bucket.
const LOOKUP_BUDGET_KEY: &str = "rll:lookups";

/// The per-address bucket: IPv4 addresses one by one, IPv6 by /64 (what
/// one subscriber usually holds).
fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("rla:{a}"),
        IpAddr::V6(a) => {
            let s = a.segments();
            format!("rla:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// After a credential fails against a cached record at least this old,
/// the record is fetched again once (a rotation, an activation).
const REFRESH_AFTER_MS: i64 = 5_000;

/// How long a client record stays in KV after it stops being fresh. A
/// known client whose entry went stale is fetched again outside the
/// lookup budget, so that a flood of made-up keys, which drains the
/// budget, cannot lock real clients out once their entries expire; that
/// is at most one lookup per known client per `client_cache_ttl_secs`.
const STALE_KEEP_SECS: u64 = 3_600;

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedClient {
    /// When the entry stops being used.
    until_ms: i64,
    /// When the record was fetched from the aggregator.
    fetched_ms: i64,
    record: ClientRecord,
}

/// A client record and when it was fetched.
struct Found {
    record: ClientRecord,
    fetched_ms: i64,
}

/// What the KV cache says about a client id.
enum Cached {
    /// Fresh: use it.
    Record(Box<Found>),
    /// Known, but past its freshness: fetch again, outside the budget.
    Stale(Box<Found>),
    Unknown,
    Miss,
}

async fn cached_client<K: Kv, E: EdgeEnv>(
    id: &str,
    cfg: &EdgeConfig,
    kv: &K,
    env: &E,
    now_ms: i64,
) -> Cached {
    let key = client_key(id);
    let mut stale = None;
    match kv.get(&key).await {
        Ok(Some(sealed)) => {
            if let Some(c) = cfg
                .cache_key
                .open(key.as_bytes(), &sealed)
                .and_then(|plain| serde_json::from_slice::<CachedClient>(&plain).ok())
                .filter(|c| c.record.id == id)
            {
                let found = Box::new(Found {
                    record: c.record,
                    fetched_ms: c.fetched_ms,
                });
                if c.until_ms > now_ms {
                    return Cached::Record(found);
                }
                stale = Some(found);
            }
        }
        Ok(None) => {}
        Err(e) => env.warn("kv_client_cache", &format!("reading {key}: {e}")),
    }
    // "No such client" is read before a stale record is used: a client
    // deleted since is looked up once per TTL, not on every request.
    match kv.get(&no_client_key(id)).await {
        Ok(Some(until)) => {
            if <[u8; 8]>::try_from(until.as_slice()).is_ok_and(|b| i64::from_be_bytes(b) > now_ms) {
                return Cached::Unknown;
            }
        }
        Ok(None) => {}
        Err(e) => env.warn(
            "kv_client_cache",
            &format!("reading {}: {e}", no_client_key(id)),
        ),
    }
    match stale {
        Some(found) => Cached::Stale(found),
        None => Cached::Miss,
    }
}

/// Fetches a record from the aggregator (within the lookup budget when
/// `budgeted`) and caches the answer.
async fn fetch_client<K: Kv, U: Upstream, E: EdgeEnv>(
    id: &str,
    cfg: &EdgeConfig,
    kv: &K,
    upstream: &U,
    env: &E,
    now_ms: i64,
    budgeted: bool,
) -> Result<Found, Refusal> {
    if let Some(l) = cfg.lookup_limit.as_ref().filter(|_| budgeted) {
        take_lookup(kv, env, l, now_ms).await?;
    }
    let record = upstream.client(id).await.map_err(|e| {
        Refusal::new(
            ErrorCode::UpstreamUnavailable,
            format!("client lookup failed: {e}"),
        )
    })?;
    // A record that does not check out is treated as unknown.
    let record = record.filter(|r| r.id == id && r.check().is_ok());
    let ttl = cfg.client_cache_ttl_secs;
    let until_ms = now_ms.saturating_add(i64::try_from(ttl.saturating_mul(1000)).unwrap_or(0));
    match record {
        Some(record) => {
            let key = client_key(id);
            let entry = CachedClient {
                until_ms,
                fetched_ms: now_ms,
                record,
            };
            if let Ok(plain) = serde_json::to_vec(&entry) {
                let nonce = env.random();
                let mut n12 = [0u8; 12];
                n12.copy_from_slice(&nonce[..12]);
                let sealed = cfg.cache_key.seal(n12, key.as_bytes(), &plain);
                if let Err(e) = kv.put(&key, &sealed, ttl + STALE_KEEP_SECS).await {
                    env.warn("kv_client_cache", &format!("writing {key}: {e}"));
                }
            }
            Ok(Found {
                record: entry.record,
                fetched_ms: now_ms,
            })
        }
        None => {
            // Unknown ids are cached too, so a repeated one costs one
            // lookup (made-up ones are bounded by the lookup budget).
            let key = no_client_key(id);
            if let Err(e) = kv.put(&key, &until_ms.to_be_bytes(), ttl).await {
                env.warn("kv_client_cache", &format!("writing {key}: {e}"));
            }
            Err(ErrorCode::UnknownKey.into())
        }
    }
}

/// Takes one client lookup from the budget (GCRA in KV). KV has no
/// atomic update, so requests that read the bucket together could all
/// pass; each writes its new state with a tag of its own and reads it
/// back, and one that finds another's tag lost the race and is refused
/// too. What is left is the few that write and read back one after the
/// other between the same two reads: the budget holds closely, not
/// exactly. A KV failure lets the lookup happen (logged).
async fn take_lookup<K: Kv, E: EdgeEnv>(
    kv: &K,
    env: &E,
    limit: &RateLimit,
    now_ms: i64,
) -> Result<(), Refusal> {
    let over = |retry_after| Refusal {
        retry_after,
        ..Refusal::new(
            ErrorCode::Overloaded,
            "this edge looks up too many unknown clients right now; retry later",
        )
    };
    let stored = match kv.get(LOOKUP_BUDGET_KEY).await {
        Ok(v) => v,
        Err(e) => {
            env.warn("kv_lookup_budget", &e.to_string());
            return Ok(());
        }
    };
    let tat = stored
        .as_deref()
        .and_then(|v| v.get(..8))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_le_bytes);
    let (decision, new_tat) = ratelimit::decide(limit, tat, now_ms, 1);
    if !decision.allowed {
        return Err(over(decision.retry_after_secs));
    }
    let Some(new_tat) = new_tat else {
        return Ok(());
    };
    let mut value = new_tat.to_le_bytes().to_vec();
    value.extend_from_slice(&env.random()[..8]);
    let ttl = u64::try_from((new_tat / 1000 - now_ms).max(1000) / 1000).unwrap_or(1);
    if let Err(e) = kv.put(LOOKUP_BUDGET_KEY, &value, ttl).await {
        env.warn("kv_lookup_budget", &e.to_string());
        return Ok(());
    }
    match kv.get(LOOKUP_BUDGET_KEY).await {
        Ok(Some(back)) if back != value => Err(over(Some(1))),
        Ok(_) => Ok(()),
        Err(e) => {
            env.warn("kv_lookup_budget", &e.to_string());
            Ok(())
        }
    }
}

async fn client_record<K: Kv, U: Upstream, E: EdgeEnv>(
    id: &str,
    cfg: &EdgeConfig,
    kv: &K,
    upstream: &U,
    env: &E,
    now_ms: i64,
) -> Result<Found, Refusal> {
    if !outpost_shared::client::is_valid_client_id(id) {
        return Err(ErrorCode::UnknownKey.into());
    }
    match cached_client(id, cfg, kv, env, now_ms).await {
        Cached::Record(found) => Ok(*found),
        Cached::Stale(_) => fetch_client(id, cfg, kv, upstream, env, now_ms, false).await,
        Cached::Unknown => Err(ErrorCode::UnknownKey.into()),
        Cached::Miss => fetch_client(id, cfg, kv, upstream, env, now_ms, true).await,
    }
}

/// Whether the client a refused request names (by query write key or a
/// credential header) allows `origin`, by this edge's cache alone: a
/// refusal costs no lookup.
async fn cached_origin_allowed<K: Kv, E: EdgeEnv>(
    req: &EdgeRequest,
    origin: &str,
    cfg: &EdgeConfig,
    kv: &K,
    env: &E,
) -> bool {
    let Some(id) = credential(req, None).ok().and_then(|c| c.client_id()) else {
        return false;
    };
    if !outpost_shared::client::is_valid_client_id(&id) {
        return false;
    }
    match cached_client(&id, cfg, kv, env, env.now_ms()).await {
        Cached::Record(found) | Cached::Stale(found) => found.record.origin_allowed(origin),
        _ => false,
    }
}

/// Checks the credential against a record, without touching KV (the nonce
/// is remembered once the caller is settled).
/// The one caller check (`outpost_shared::auth::caller`), with the
/// request's signature when the credential is one.
fn verify(
    req: &EdgeRequest,
    cred: &Credential<'_>,
    record: &ClientRecord,
    cfg: &EdgeConfig,
    now_ms: i64,
) -> Result<(), ErrorCode> {
    let signed = match cred {
        Credential::Signature { .. } => Some(signature::SignedRequest {
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
        }),
        _ => None,
    };
    caller::verify(
        cred,
        record,
        signed.as_ref(),
        now_ms,
        cfg.signature_window_secs,
    )
    .map(drop)
}

/// Refusals a newer record could turn around: a new secret or key after a
/// rotation, a client activated again.
fn may_be_stale(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::InvalidSignature
            | ErrorCode::AlgorithmNotAllowed
            | ErrorCode::UnknownKey
            | ErrorCode::ClientInactive
    )
}

async fn authenticate<K: Kv, U: Upstream, E: EdgeEnv>(
    req: &EdgeRequest,
    cred: Credential<'_>,
    cfg: &EdgeConfig,
    kv: &K,
    upstream: &U,
    env: &E,
    now_ms: i64,
) -> Result<ClientRecord, Refusal> {
    let id = match &cred {
        Credential::Jwt(_) => cred.client_id().ok_or(ErrorCode::MalformedToken)?,
        _ => cred.client_id().ok_or(ErrorCode::UnknownKey)?,
    };
    let found = client_record(&id, cfg, kv, upstream, env, now_ms).await?;
    let record = match verify(req, &cred, &found.record, cfg, now_ms) {
        Ok(()) => found.record,
        // A cached record may predate a rotation: fetch it again, at most
        // once per client every REFRESH_AFTER_MS (the fresh entry is new),
        // and within the lookup budget.
        Err(code) if may_be_stale(code) && now_ms - found.fetched_ms >= REFRESH_AFTER_MS => {
            let fresh = fetch_client(&id, cfg, kv, upstream, env, now_ms, true).await?;
            verify(req, &cred, &fresh.record, cfg, now_ms)?;
            fresh.record
        }
        Err(code) => return Err(code.into()),
    };
    if let Credential::Signature { client_id } = cred
        && let Some(nonce) = req.header(signature::HEADER_NONCE)
    {
        match signature::remember_nonce(kv, client_id, nonce, cfg.signature_window_secs).await {
            Ok(()) => {}
            Err(signature::NonceError::Reused) => return Err(ErrorCode::NonceReused.into()),
            // Fail closed: a nonce that cannot be remembered cannot stop a
            // replay. The client retries with the same nonce.
            Err(signature::NonceError::Kv(e)) => {
                env.warn("kv_nonce", &e.to_string());
                return Err(Refusal::new(
                    ErrorCode::DependencyUnavailable,
                    "the nonce could not be recorded; retry",
                ));
            }
        }
    }
    Ok(record)
}

/// One rate limit; KV trouble lets the request through (logged).
async fn limit<K: Kv, E: EdgeEnv>(
    kv: &K,
    env: &E,
    key: &str,
    limit: &RateLimit,
    now_ms: i64,
    code: ErrorCode,
) -> Result<Option<Decision>, Refusal> {
    match ratelimit::check(kv, key, limit, now_ms, 1).await {
        Ok(d) if d.allowed => Ok(Some(d)),
        Ok(d) => Err(Refusal {
            rate: Some(d),
            ..Refusal::from(code)
        }),
        Err(e) => {
            env.warn("kv_rate_limit", &format!("{key}: {e}"));
            Ok(None)
        }
    }
}

/// The client's address, the block list and the per-address limit: what
/// every request passes before anything costs more than a KV read.
async fn admit<K: Kv, E: EdgeEnv>(
    req: &EdgeRequest,
    cfg: &EdgeConfig,
    kv: &K,
    env: &E,
    now_ms: i64,
) -> Result<IpAddr, Refusal> {
    let ip = client_ip(
        req.platform_ip,
        req.peer_ip,
        req.header_joined("x-forwarded-for").as_deref(),
        &cfg.trusted_proxies,
    );
    if cfg.blocklist.contains(ip) {
        return Err(ErrorCode::IpBlocked.into());
    }
    if let Some(l) = &cfg.ip_limit {
        limit(
            kv,
            env,
            &address_key(ip),
            l,
            now_ms,
            ErrorCode::RateLimitedIp,
        )
        .await?;
    }
    Ok(ip)
}

async fn preflight<K: Kv, U: Upstream, E: EdgeEnv>(
    req: &EdgeRequest,
    cfg: &EdgeConfig,
    kv: &K,
    upstream: &U,
    env: &E,
) -> Result<(), Refusal> {
    let now_ms = env.now_ms();
    admit(req, cfg, kv, env, now_ms).await?;
    let (Some(origin), Some(id)) = (req.header("origin"), req.query_param("write_key")) else {
        return Ok(());
    };
    let found = client_record(id, cfg, kv, upstream, env, now_ms).await?;
    if found.record.origin_allowed(origin) {
        Ok(())
    } else {
        Err(ErrorCode::OriginNotAllowed.into())
    }
}

fn body_too_large(cfg: &EdgeConfig) -> Refusal {
    Refusal::new(
        ErrorCode::BodyTooLarge,
        format!(
            "the request body is larger than {} bytes (after decompression)",
            cfg.limits.max_body_bytes
        ),
    )
}

/// `400` when no event of a batch was accepted, with every event's error.
fn batch_rejected(mut errors: Vec<FieldError>) -> Refusal {
    errors.sort_by_key(|e| e.index);
    Refusal {
        message: Some(format!(
            "none of the {} events was accepted; see errors",
            errors.len()
        )),
        errors,
        ..Refusal::from(ErrorCode::BatchRejected)
    }
}

async fn ingest<K: Kv, U: Upstream, E: EdgeEnv>(
    req: &EdgeRequest,
    cfg: &EdgeConfig,
    kv: &K,
    upstream: &U,
    env: &E,
    request_id: &str,
    caller: &mut Option<ClientRecord>,
) -> Result<EdgeResponse, Refusal> {
    let now_ms = env.now_ms();
    let ip = admit(req, cfg, kv, env, now_ms).await?;
    body::body_kind(req.header("content-type")).map_err(|code| {
        Refusal::new(
            code,
            "send Content-Type: application/json (text/plain for beacons)",
        )
    })?;
    if req.body.len() > cfg.max_wire_bytes() {
        return Err(body_too_large(cfg));
    }
    let decoded = body::decode(
        req.header("content-encoding"),
        &req.body,
        cfg.limits.max_body_bytes,
    )
    .map_err(|code| match code {
        ErrorCode::BodyTooLarge => body_too_large(cfg),
        other => other.into(),
    })?;
    let received_at = Timestamp(now_ms);
    let (events, mut rejected, sent_at, body_key) = if req.path() == "/v1/event" {
        let event = validate::parse_event(&decoded, &cfg.limits, received_at)?;
        (vec![event], Vec::new(), None, None)
    } else {
        let out = validate::parse_batch(&decoded, &cfg.limits, received_at)?;
        (out.accepted, out.rejected, out.sent_at, out.write_key)
    };

    let cred = credential(req, body_key.as_deref())?;
    let record = authenticate(req, cred, cfg, kv, upstream, env, now_ms).await?;
    *caller = Some(record.clone());
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
            env,
            &format!("rlc:{}", record.id),
            l,
            now_ms,
            ErrorCode::RateLimitedClient,
        )
        .await?;
    }
    if let Some(l) = &record.ip_rate_limit {
        let d = limit(
            kv,
            env,
            &format!("rlci:{}:{ip}", record.id),
            l,
            now_ms,
            ErrorCode::RateLimitedIp,
        )
        .await?;
        rate = rate.or(d);
    }

    let accepted_count = events.len();
    if accepted_count == 0 {
        return Err(batch_rejected(rejected));
    }
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
    let bytes = frame::encode(&meta, &batch, &cfg.edge_key)
        .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
    // The aggregator's indexes count the frame's events; give the client
    // back the positions it sent.
    let remap = |errors: Vec<FieldError>| {
        errors.into_iter().map(|mut e| {
            e.index = e.index.and_then(|i| indexes.get(i).copied());
            e
        })
    };
    let upstream_rejected = match upstream.forward(bytes).await {
        Ok(UpstreamAnswer::Accepted(answer)) => {
            let n = answer.errors.len();
            rejected.extend(remap(answer.errors));
            n
        }
        // Every event refused by the aggregator's own rules (its limits
        // may be stricter): the same answer as when the edge refuses all.
        Ok(UpstreamAnswer::Refused(400, Some(env))) if env.code == ErrorCode::BatchRejected => {
            rejected.extend(remap(env.errors));
            return Err(batch_rejected(rejected));
        }
        Ok(UpstreamAnswer::Refused(status, envelope)) => {
            return Err(Refusal::new(
                ErrorCode::UpstreamUnavailable,
                format!(
                    "the aggregator answered {status}{}; retry with the same event ids",
                    envelope
                        .map(|e| format!(" ({})", e.code))
                        .unwrap_or_default()
                ),
            ));
        }
        Err(e) => {
            return Err(Refusal::new(
                ErrorCode::UpstreamUnavailable,
                format!("the aggregator did not acknowledge ({e}); retry with the same event ids"),
            ));
        }
    };
    let accepted = accepted_count.saturating_sub(upstream_rejected);
    if accepted == 0 {
        return Err(batch_rejected(rejected));
    }
    rejected.sort_by_key(|e| e.index);
    let answer = AcceptedResponse {
        success: true,
        accepted,
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
