//! The aggregator's HTTP surface: `POST /v1/ingest`, health and metrics.
//! Every error answer is the shared envelope with a stable code, and every
//! answer carries `X-Request-Id` (the caller's when it is sane: one layer
//! sets it on every route). Every route but health and metrics counts
//! against `server.max_concurrent_requests` (past it: `503` +
//! `Retry-After`, at once) and is cut off after `server.request_timeout_ms`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use outpost_shared::error::AcceptedResponse;
use outpost_shared::frame::{self, FrameLimits, KeyRing};
use outpost_shared::seal::{
    PURPOSE_CLIENT_RECORD, SEALED_RECORD_CONTENT_TYPE, SealKey, client_record_context,
};
use outpost_shared::validate::{Limits, validate_event};
use outpost_shared::{ErrorCode, ErrorEnvelope, FieldError};
use prometheus_client::registry::Registry;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::clients::{ClientStore, verify_edge_request};
use crate::db::Db;
use crate::dedup::Dedup;
use crate::delivery::now_ms;
use crate::handoff::Checked;
use crate::sinks::Sink as _;
use crate::sinks::influxdb::InfluxSink;
use crate::spool::{Spool, SpoolEntry, SpoolError};
use crate::telemetry::{CodeLabel, Metrics};

/// Media type of an edge frame.
pub const FRAME_CONTENT_TYPE: &str = outpost_shared::frame::CONTENT_TYPE;
/// The request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// What the handlers share.
pub struct AppState {
    /// Accepted edge keys.
    pub ring: KeyRing,
    /// Frame bounds.
    pub frame_limits: FrameLimits,
    /// Event validation limits.
    pub limits: Limits,
    /// The spool.
    pub spool: Spool,
    /// Metrics handles.
    pub metrics: Metrics,
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Dedup (for readiness).
    pub dedup: Arc<Dedup>,
    /// The database events are read from (PostgreSQL or SQLite), when one
    /// is configured (for the read API and readiness).
    pub db: Option<Db>,
    /// Client records, when a database is configured.
    pub clients: Option<ClientStore>,
    /// Signs query cursors.
    pub cursor_key: crate::query::CursorKey,
    /// Per-address and per-caller rate-limit state of the read API (this
    /// instance only, bounded).
    pub read_limits: crate::limits::BoundedKv,
    /// The read API's per-address limit, before authentication.
    pub read_ip_limit: Option<outpost_shared::ratelimit::RateLimit>,
    /// Client-record lookups per edge key.
    pub lookup_limit: Option<outpost_shared::ratelimit::RateLimit>,
    /// The read API's cost limits.
    pub read_api: crate::config::ReadApiConfig,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: outpost_edge::net::NetList,
    /// The InfluxDB sink, when enabled (for readiness).
    pub influx: Option<InfluxSink>,
    /// `Retry-After` on `503`.
    pub retry_after_secs: u32,
    /// Longest a request may take (a stuck disk must not hang clients).
    pub request_timeout: std::time::Duration,
    /// Requests being handled, bounded by `server.max_concurrent_requests`.
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// The request id of a request, as the first layer settled it.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// The router, and `/openapi.json` describing exactly its routes.
pub fn router(state: Arc<AppState>) -> Router {
    let (router, api) =
        OpenApiRouter::with_openapi(<crate::openapi::ApiDoc as utoipa::OpenApi>::openapi())
            .routes(routes!(ingest))
            .routes(routes!(client_record))
            .routes(routes!(list_events))
            .routes(routes!(stats))
            .routes(routes!(live))
            .routes(routes!(ready))
            .routes(routes!(metrics))
            .routes(routes!(openapi_json))
            .split_for_parts();
    let _ = crate::openapi::DOCUMENT.set(api.to_pretty_json().unwrap_or_default());
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), bounded))
        .layer(axum::middleware::from_fn(with_request_ids))
        .with_state(state)
}

/// Settles the request id (the caller's when sane, else a new one), hands
/// it to the handler, and puts it on the answer if the handler did not.
async fn with_request_ids(mut req: Request, next: axum::middleware::Next) -> Response {
    let id = request_id(req.headers());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if !resp.headers().contains_key(REQUEST_ID)
        && let Ok(v) = HeaderValue::from_str(&id)
    {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Health and metrics stay answerable under any load.
fn exempt(path: &str) -> bool {
    path.starts_with("/health/") || path == "/metrics"
}

/// The concurrency bound and the time limit of every route.
async fn bounded(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    if exempt(req.uri().path()) {
        return next.run(req).await;
    }
    let Ok(_permit) = app.in_flight.clone().try_acquire_owned() else {
        app.metrics
            .http_requests_shed
            .get_or_create(&crate::telemetry::ReasonLabel {
                reason: "concurrency",
            })
            .inc();
        return error_response(
            ErrorCode::Overloaded,
            Some("too many requests in flight; retry later".into()),
            &id,
            Some(app.retry_after_secs),
        );
    };
    // A second behind the ingest's own limit, which answers more precisely.
    let limit = app.request_timeout + std::time::Duration::from_secs(1);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            app.metrics
                .http_requests_shed
                .get_or_create(&crate::telemetry::ReasonLabel { reason: "timeout" })
                .inc();
            error_response(
                ErrorCode::Overloaded,
                Some("the request took too long and was stopped; retry later".into()),
                &id,
                Some(app.retry_after_secs),
            )
        }
    }
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    let mut resp = Response::new(Body::from(
        crate::openapi::DOCUMENT.get().cloned().unwrap_or_default(),
    ));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A request id: the caller's when it is sane, else a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| outpost_shared::error::is_acceptable_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:012x}{:016x}", now_ms(), fastrand::u64(..)))
}

fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// An error answer in the shared envelope.
pub fn error_response(
    code: ErrorCode,
    message: Option<String>,
    request_id: &str,
    retry_after: Option<u32>,
) -> Response {
    error_response_with(code, message, Vec::new(), request_id, retry_after)
}

/// An error answer in the shared envelope, with details.
fn error_response_with(
    code: ErrorCode,
    message: Option<String>,
    errors: Vec<FieldError>,
    request_id: &str,
    retry_after: Option<u32>,
) -> Response {
    let mut env = ErrorEnvelope::new(code, request_id).with_errors(errors);
    if let Some(m) = message {
        env = env.with_message(m);
    }
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, axum::Json(env)).into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    with_request_id(resp, request_id)
}

/// Takes one signed frame from an edge; `202` once it is durable.
#[utoipa::path(post, path = "/v1/ingest", tag = "ingest",
    request_body(content = String, content_type = "application/vnd.outpost.frame",
        description = "One edge frame (README, \"The edge → aggregator frame\"), signed with an edge key"),
    responses(
        (status = 202, description = "Durable (fsynced); events that failed validation are listed", body = AcceptedResponse),
        (status = 400, description = "Malformed frame (40020, 40021)", body = ErrorEnvelope),
        (status = 401, description = "Bad frame signature or unknown edge key (40112)", body = ErrorEnvelope),
        (status = 413, description = "Frame too large (41304)", body = ErrorEnvelope),
        (status = 415, description = "Wrong content type (41501)", body = ErrorEnvelope),
        (status = 503, description = "Spool full or stuck (50302); retry after Retry-After", body = ErrorEnvelope,
            headers(("Retry-After" = u32, description = "Seconds to wait")))
    ))]
async fn ingest(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let id = request_id(req.headers());
    let resp = match tokio::time::timeout(app.request_timeout, ingest_inner(&app, req, &id)).await {
        Ok(r) => r,
        Err(_) => Err((
            ErrorCode::Overloaded,
            Some("the request timed out; nothing was acknowledged".into()),
        )
            .into()),
    };
    app.metrics
        .ingest_duration
        .observe(started.elapsed().as_secs_f64());
    match resp {
        Ok(r) => r,
        Err(IngestError {
            code,
            message,
            errors,
        }) => {
            app.metrics
                .ingest_errors
                .get_or_create(&CodeLabel { code: code.code() })
                .inc();
            let retry = code.is_retryable().then_some(app.retry_after_secs);
            if code.http_status() >= 500 {
                tracing::warn!(request_id = %id, code = code.code(), message = message.as_deref().unwrap_or(""), "ingest failed");
            }
            error_response_with(code, message, errors, &id, retry)
        }
    }
}

/// Why an ingest was refused.
struct IngestError {
    code: ErrorCode,
    message: Option<String>,
    errors: Vec<FieldError>,
}

impl From<(ErrorCode, Option<String>)> for IngestError {
    fn from((code, message): (ErrorCode, Option<String>)) -> IngestError {
        IngestError {
            code,
            message,
            errors: Vec::new(),
        }
    }
}

impl IngestError {
    /// Every event failed validation: `400` listing each.
    fn batch_rejected(errors: Vec<FieldError>) -> IngestError {
        IngestError {
            code: ErrorCode::BatchRejected,
            message: Some(format!(
                "none of the {} events was accepted; see errors",
                errors.len()
            )),
            errors,
        }
    }
}

async fn ingest_inner(app: &AppState, req: Request, id: &str) -> Result<Response, IngestError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case(FRAME_CONTENT_TYPE)
            && !essence.eq_ignore_ascii_case("application/octet-stream")
        {
            return Err((
                ErrorCode::UnsupportedMediaType,
                Some(format!("send frames as {FRAME_CONTENT_TYPE}")),
            )
                .into());
        }
    }
    if req
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return Err((
            ErrorCode::UnsupportedContentEncoding,
            Some("frames carry their own compression".into()),
        )
            .into());
    }
    let limit = app.frame_limits.max_frame_bytes;
    // Read at most one byte past the bound: an oversized body is refused
    // while reading, never buffered whole.
    let bytes = axum::body::to_bytes(req.into_body(), limit + 1)
        .await
        .map_err(|_| {
            IngestError::from((
                ErrorCode::FrameTooLarge,
                Some(format!("frames are at most {limit} bytes")),
            ))
        })?;
    if bytes.len() > limit {
        return Err((
            ErrorCode::FrameTooLarge,
            Some(format!("frames are at most {limit} bytes")),
        )
            .into());
    }
    let mut decoded = frame::decode(&bytes, &app.ring, &app.frame_limits)
        .map_err(|e| IngestError::from((e.code(), Some(e.to_string()))))?;

    let received_at = decoded.batch.facts.received_at;
    let mut rejected: Vec<FieldError> = Vec::new();
    let mut valid = Vec::with_capacity(decoded.batch.events.len());
    let mut high = false;
    for (index, event) in decoded.batch.events.iter_mut().enumerate() {
        match validate_event(event, &app.limits, received_at) {
            Ok(()) => {
                valid.push(true);
                high |= event.priority == outpost_shared::event::Priority::High;
            }
            Err(mut e) => {
                valid.push(false);
                e.index = Some(index);
                e.event_id = Some(event.event_id.clone());
                rejected.push(e);
            }
        }
    }
    let accepted = valid.len() - rejected.len();
    let batch_id = decoded.header.batch_id;
    if accepted == 0 {
        // Nothing to keep: not a success (a client must not believe
        // anything was stored), and nothing to retry either.
        app.metrics
            .ingest_rejected_events
            .inc_by(rejected.len() as u64);
        return Err(IngestError::batch_rejected(rejected));
    }
    let entry = SpoolEntry {
        batch_id: batch_id.0,
        client_id: decoded.batch.client_id.clone(),
        priority: i64::from(high),
        event_count: i64::from(decoded.header.event_count),
        frame: bytes.to_vec(),
        received_at_ms: now_ms(),
        valid: valid.clone(),
        // The sinks take the batch as validated here, not decoding the
        // frame again (see `handoff`).
        checked: app
            .spool
            .wants_checked()
            .then(|| Arc::new(Checked::new(decoded, valid))),
    };
    app.spool.append(entry).await.map_err(|e| {
        IngestError::from(match e {
            SpoolError::Full => (
                ErrorCode::Overloaded,
                Some("the spool is full; retry later".into()),
            ),
            SpoolError::Storage(m) => (
                ErrorCode::DependencyUnavailable,
                Some(format!("spool: {m}")),
            ),
        })
    })?;
    app.metrics.ingest_frames.inc();
    app.metrics.ingest_events.inc_by(accepted as u64);
    app.metrics
        .ingest_rejected_events
        .inc_by(rejected.len() as u64);
    tracing::debug!(request_id = %id, %batch_id, accepted, rejected = rejected.len(), "frame spooled");
    let body = AcceptedResponse {
        success: true,
        accepted,
        rejected: rejected.len(),
        errors: rejected,
        request_id: id.to_owned(),
    };
    Ok(with_request_id(
        (StatusCode::ACCEPTED, axum::Json(body)).into_response(),
        id,
    ))
}

/// A client record, for edges (which cache it), sealed under a key
/// derived from the edge key that signed the lookup (it carries the
/// client's secrets; see `outpost_shared::seal`).
#[utoipa::path(get, path = "/internal/v1/clients/{id}", tag = "ingest",
    params(("id" = String, Path, description = "Client id")),
    responses(
        (status = 200, description = "The shared ClientRecord JSON, sealed (ChaCha20-Poly1305) under a key derived from the edge key, bound to the client id and the lookup's timestamp", content_type = "application/vnd.outpost.sealed-client", body = String),
        (status = 401, description = "Missing or bad edge signature", body = ErrorEnvelope),
        (status = 404, description = "No such client (40402)", body = ErrorEnvelope),
        (status = 503, description = "Client store unavailable", body = ErrorEnvelope)
    ),
    security(("edge_signature" = [])))]
async fn client_record(
    State(app): State<Arc<AppState>>,
    axum::extract::Path(client_id): axum::extract::Path<String>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    // Headers, not the whole request: the body type is not `Sync`, and the
    // borrowed header values live across the lookup's await.
    let id = request_id(&headers);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(key_id), Some(timestamp), Some(sig)) = (
        header(outpost_shared::auth::signature::HEADER_KEY),
        header(outpost_shared::auth::signature::HEADER_TIMESTAMP),
        header(outpost_shared::auth::signature::HEADER_SIGNATURE),
    ) else {
        return error_response(
            ErrorCode::MissingCredentials,
            Some("sign with an edge key".into()),
            &id,
            None,
        );
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    let signed = outpost_shared::auth::signature::SignedRequest {
        method: method.as_str(),
        path_and_query: path,
        timestamp,
        nonce: header(outpost_shared::auth::signature::HEADER_NONCE),
        body: b"",
        signature: sig,
    };
    if let Err(code) = verify_edge_request(&app.ring, &signed, key_id, now_ms() / 1000) {
        return error_response(code, None, &id, None);
    }
    // Each edge's lookups are bounded here too, atomically: the edges'
    // own budget is best effort (their KV has no atomic update).
    if let Some(limit) = &app.lookup_limit {
        let key = format!("rl:lookup:{key_id}");
        let now = now_ms();
        if let Ok(d) = outpost_shared::ratelimit::check(&app.read_limits, &key, limit, now, 1).await
            && !d.allowed
        {
            let retry = u32::try_from(d.retry_after_secs.unwrap_or(1)).unwrap_or(u32::MAX);
            return error_response(
                ErrorCode::Overloaded,
                Some("too many client lookups from this edge key; retry later".into()),
                &id,
                Some(retry),
            );
        }
    }
    let Some(store) = &app.clients else {
        return error_response(
            ErrorCode::DependencyUnavailable,
            Some("no client store is configured".into()),
            &id,
            Some(app.retry_after_secs),
        );
    };
    match store.get(&client_id).await {
        Ok(Some(record)) => {
            // Sealed for the edge that asked, bound to this very lookup:
            // the record's secrets never travel in clear, and an answer
            // cannot be replayed to a later lookup.
            let (Some(secret), Ok(ts)) = (app.ring.get(key_id), timestamp.parse::<i64>()) else {
                return error_response(ErrorCode::InvalidEdgeSignature, None, &id, None);
            };
            let key = SealKey::derive(secret.expose(), PURPOSE_CLIENT_RECORD);
            let plain = serde_json::to_vec(&record).unwrap_or_default();
            let sealed = key.seal(
                crate::clients::random_bytes::<12>(),
                &client_record_context(&client_id, ts),
                &plain,
            );
            let mut resp = Response::new(Body::from(sealed));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(SEALED_RECORD_CONTENT_TYPE),
            );
            with_request_id(resp, &id)
        }
        Ok(None) => error_response(
            ErrorCode::ClientNotFound,
            Some(format!("no client {client_id:?}")),
            &id,
            None,
        ),
        Err(e) => {
            tracing::warn!(request_id = %id, error = %e, "client lookup failed");
            let code = ErrorCode::from(e);
            error_response(
                code,
                Some("client store unavailable".into()),
                &id,
                code.is_retryable().then_some(app.retry_after_secs),
            )
        }
    }
}

/// Which read endpoint.
#[derive(Clone, Copy)]
enum ReadApi {
    Events,
    Stats,
}

type RawQuery =
    Result<axum::extract::Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

/// Stored events, filtered, in keyset pages. Needs `read:events`; other
/// clients' events need `admin:events`.
#[utoipa::path(get, path = "/v1/events", tag = "query",
    params(crate::openapi::FilterParams, crate::openapi::EventsParams),
    responses(
        (status = 200, description = "A page", body = crate::openapi::EventsPage),
        (status = 400, description = "Bad parameter (40014) or cursor (40015)", body = ErrorEnvelope),
        (status = 401, description = "Missing or bad credentials", body = ErrorEnvelope),
        (status = 403, description = "Permission denied (40301)", body = ErrorEnvelope),
        (status = 429, description = "The caller's rate limit (42901)", body = ErrorEnvelope),
        (status = 503, description = "Database unavailable", body = ErrorEnvelope)
    ),
    security(("bearer" = [])))]
async fn list_events(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: RawQuery,
) -> Response {
    read_api(&app, peer, &headers, params, ReadApi::Events).await
}

/// Events (and distinct users) per time bucket and group. Needs `read:stats`.
#[utoipa::path(get, path = "/v1/stats", tag = "query",
    params(crate::openapi::FilterParams, crate::openapi::StatsParams),
    responses(
        (status = 200, description = "The series", body = crate::openapi::StatsAnswer),
        (status = 400, description = "Bad parameter (40014)", body = ErrorEnvelope),
        (status = 401, description = "Missing or bad credentials", body = ErrorEnvelope),
        (status = 403, description = "Permission denied (40301)", body = ErrorEnvelope),
        (status = 429, description = "The caller's rate limit (42901)", body = ErrorEnvelope),
        (status = 503, description = "Database unavailable", body = ErrorEnvelope)
    ),
    security(("bearer" = [])))]
async fn stats(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: RawQuery,
) -> Response {
    read_api(&app, peer, &headers, params, ReadApi::Stats).await
}

/// A `429` with the limit's headers.
fn rate_limited(code: ErrorCode, d: &outpost_shared::ratelimit::Decision, id: &str) -> Response {
    let retry = u32::try_from(d.retry_after_secs.unwrap_or(1)).unwrap_or(u32::MAX);
    let mut resp = error_response(code, None, id, Some(retry));
    for (k, v) in d.headers() {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

async fn read_api(
    app: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    params: RawQuery,
    api: ReadApi,
) -> Response {
    let id = request_id(headers);
    let now = now_ms();
    // Before anything costs a database lookup or a signature check.
    if let Some(limit) = &app.read_ip_limit {
        let ip = crate::server::client_ip(peer, headers, &app.trusted_proxies);
        let key = format!("rl:read-ip:{ip}");
        if let Ok(d) = outpost_shared::ratelimit::check(&app.read_limits, &key, limit, now, 1).await
            && !d.allowed
        {
            return rate_limited(ErrorCode::RateLimitedIp, &d, &id);
        }
    }
    let (Some(store), Some(db)) = (&app.clients, &app.db) else {
        return error_response(
            ErrorCode::DependencyUnavailable,
            Some("the query API needs PostgreSQL or SQLite".into()),
            &id,
            Some(app.retry_after_secs),
        );
    };
    let Ok(axum::extract::Query(params)) = params else {
        return error_response(
            ErrorCode::InvalidQueryParameter,
            Some("the query string does not decode".into()),
            &id,
            None,
        );
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let who = match crate::query::caller(store, auth, now).await {
        Ok(who) => who,
        Err(crate::query::QueryError(code, message)) => {
            return error_response(
                code,
                Some(message),
                &id,
                code.is_retryable().then_some(app.retry_after_secs),
            );
        }
    };
    // The caller's own rate limit, with the same GCRA as the edge.
    if let Some(limit) = &who.rate_limit {
        let key = format!("rl:read:{}", who.id);
        if let Ok(d) = outpost_shared::ratelimit::check(&app.read_limits, &key, limit, now, 1).await
            && !d.allowed
        {
            return rate_limited(ErrorCode::RateLimitedClient, &d, &id);
        }
    }
    let result = match api {
        ReadApi::Events => crate::query::events_page(db, &app.cursor_key, &who, &params).await,
        ReadApi::Stats => {
            crate::query::stats(db, &who, &params, now, app.read_api.max_scan_span_secs).await
        }
    };
    match result {
        Ok(mut page) => {
            page["request_id"] = serde_json::Value::from(id.clone());
            with_request_id(axum::Json(page).into_response(), &id)
        }
        Err(crate::query::QueryError(code, message)) => {
            let retry = code.is_retryable().then_some(app.retry_after_secs);
            error_response(code, Some(message), &id, retry)
        }
    }
}

/// The process runs.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "Alive", body = crate::openapi::Live)))]
async fn live() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

/// Whether this instance can take traffic, per dependency.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "`ok`, or `degraded` (ingest works, delivery waits)", body = crate::openapi::Ready),
        (status = 503, description = "The spool fails", body = crate::openapi::Ready)
    ))]
async fn ready(State(app): State<Arc<AppState>>) -> Response {
    // Ingest needs only the spool: a sink or Redis being down delays
    // delivery (or fails dedup open) but acknowledged data is safe, so the
    // instance stays ready and reports itself "degraded".
    let mut checks = serde_json::Map::new();
    let spool = app.spool.ping().await;
    checks.insert("spool".into(), status(spool));
    let mut degraded = false;
    if let Some(db) = &app.db {
        let up = db.ping().await;
        degraded |= !up;
        checks.insert(db.name().into(), status(up));
    }
    if let Some(influx) = &app.influx {
        let up = influx.ping().await;
        degraded |= !up;
        checks.insert("influxdb".into(), status(up));
    }
    if let Some(up) = app.dedup.ping().await {
        degraded |= !up;
        checks.insert("redis".into(), status(up));
    }
    let (code, word) = match (spool, degraded) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (true, true) => (StatusCode::OK, "degraded"),
        (true, false) => (StatusCode::OK, "ok"),
    };
    // Not a readiness condition (ingest works), but something an operator
    // should see: what sinks gave up on, waiting for `outpost dead-letters`.
    let dead_letters = match app.spool.dead_letter_summary().await {
        Ok((count, bytes, max_bytes)) => {
            serde_json::json!({"count": count, "bytes": bytes, "max_bytes": max_bytes})
        }
        Err(_) => serde_json::Value::Null,
    };
    (
        code,
        axum::Json(
            serde_json::json!({"status": word, "checks": checks, "dead_letters": dead_letters}),
        ),
    )
        .into_response()
}

fn status(up: bool) -> serde_json::Value {
    serde_json::Value::from(if up { "ok" } else { "down" })
}

/// Prometheus metrics (README, "Metrics").
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    // The operator commands change the dead letters from outside.
    let _ = app.spool.refresh_dead_letter_gauges().await;
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &app.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let mut resp = Response::new(Body::from(out));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

async fn not_found(headers: HeaderMap) -> Response {
    let id = request_id(&headers);
    error_response(ErrorCode::NotFound, None, &id, None)
}

async fn method_not_allowed(headers: HeaderMap) -> Response {
    let id = request_id(&headers);
    error_response(ErrorCode::MethodNotAllowed, None, &id, None)
}
