//! `GET /openapi.json`: the OpenAPI 3.1 description of every route. utoipa
//! builds it from the `#[utoipa::path]` annotation on each handler in
//! `http.rs` and the schema types here, and utoipa-axum builds the router
//! from the same `routes!` list, so a route cannot be served without being
//! described. The error and acceptance bodies are `shared`'s own types.
//!
//! The read API's handlers assemble their JSON from database rows; the
//! types below are the schema of those answers, and a test checks real
//! answers against them (every key described, every required key sent).

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

pub use outpost_shared::error::{AcceptedResponse, ErrorEnvelope, FieldError};

/// The document's fixed part; `http::router` adds the paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Outpost aggregator",
        description = "Verified frames from the edges in; stored events out. \
                       Every error is the shared envelope with a stable code (README, \"Errors\")."
    ),
    components(schemas(ErrorEnvelope, FieldError, AcceptedResponse)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "ingest", description = "From the edges: frames and client records"),
        (name = "query", description = "Reading stored events"),
        (name = "operations", description = "Health, metrics and this document")
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`opk_…`) or a JWT of a client with the needed permission",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "edge_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Outpost-Signature",
                "HMAC-SHA256 with an edge key, with X-Outpost-Key (the edge key id) and \
                 X-Outpost-Timestamp, over the canonical request (README, \"HMAC request signatures\")",
            ))),
        );
    }
}

/// One stored event, as `GET /v1/events` returns it.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredEvent {
    /// The client's id for the event.
    pub event_id: String,
    /// The client that sent it.
    pub client_id: String,
    /// The event's time (RFC 3339, UTC, milliseconds).
    pub timestamp: String,
    /// When the edge received it.
    pub received_at: String,
    /// `event` or `log`.
    pub kind: String,
    /// `normal` or `high`.
    pub priority: String,
    /// The event's properties.
    #[schema(value_type = Object)]
    pub properties: serde_json::Value,
    /// The event's context (`app_version`, `platform`, …).
    #[schema(value_type = Object)]
    pub context: serde_json::Value,
    /// Event name, or logger for logs.
    pub name: Option<String>,
    /// Log message.
    pub message: Option<String>,
    /// Log level.
    pub level: Option<String>,
    /// User id.
    pub user_id: Option<String>,
    /// Anonymous id.
    pub anonymous_id: Option<String>,
    /// Session id.
    pub session_id: Option<String>,
    /// W3C trace id.
    pub trace_id: Option<String>,
    /// W3C span id.
    pub span_id: Option<String>,
    /// The client's sequence number.
    pub seq: Option<i64>,
    /// Country (GeoIP, else the edge platform's hint).
    pub country: Option<String>,
    /// Region (GeoIP).
    pub region: Option<String>,
    /// City (GeoIP).
    pub city: Option<String>,
    /// Autonomous system number (GeoIP).
    pub asn: Option<i64>,
}

/// A page of `GET /v1/events`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventsPage {
    /// The events, in the query's order.
    pub data: Vec<StoredEvent>,
    /// Whether `next` leads further.
    pub has_next: bool,
    /// Whether `prev` leads back.
    pub has_prev: bool,
    /// Cursor of the next page (`cursor=`), or null.
    pub next: Option<String>,
    /// Cursor of the previous page, or null.
    pub prev: Option<String>,
    /// With `total=true`: the rows matching the query.
    #[schema(required = false)]
    pub total: Option<i64>,
    /// With `total=true`: whether `total` is an estimate (past 100,000 rows).
    #[schema(required = false)]
    pub total_estimated: Option<bool>,
    /// The request id.
    pub request_id: String,
}

/// One point of `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsPoint {
    /// Start of the bucket (RFC 3339, UTC).
    pub bucket: String,
    /// Events in it.
    pub events: i64,
    /// With `users=true`: distinct user ids in it.
    #[schema(required = false)]
    pub users: Option<i64>,
    /// With `group_by`: the group's value, under the dimension's name
    /// (`name`, `kind`, `country`, `platform`, `app_version`, `client`,
    /// `level` or `priority`); null for events without one.
    #[serde(flatten)]
    #[schema(required = false)]
    pub group: BTreeMap<String, Option<String>>,
}

/// The answer of `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsAnswer {
    /// `minute`, `hour` or `day`.
    pub bucket: String,
    /// The grouped dimension, or null.
    pub group_by: Option<String>,
    /// `rollup` (PostgreSQL's per-minute counts) or `events` (the rows).
    pub source: String,
    /// The points, by bucket then group.
    pub series: Vec<StatsPoint>,
    /// The request id.
    pub request_id: String,
}

/// `GET /health/live`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Live {
    /// `ok`.
    pub status: String,
}

/// `GET /health/ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// `ok`, `degraded` (a sink or Redis is down: ingest still works) or
    /// `unavailable` (the spool fails).
    pub status: String,
    /// `ok` or `down` per dependency: `spool`, `postgres` or `sqlite`,
    /// `influxdb`, `redis`.
    pub checks: BTreeMap<String, String>,
    /// What the sinks gave up on (`outpost dead-letters`); `null` when the
    /// spool cannot say.
    pub dead_letters: Option<DeadLetterSummary>,
}

/// The dead letters kept in the spool.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterSummary {
    /// How many.
    pub count: i64,
    /// Their payloads' size, bytes.
    pub bytes: i64,
    /// `spool.dead_letters_max_bytes`: past it the oldest are dropped.
    pub max_bytes: u64,
}

/// The filters `GET /v1/events` and `GET /v1/stats` share.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilterParams {
    /// `event` or `log`.
    pub kind: Option<String>,
    /// Event name.
    pub name: Option<String>,
    /// User id.
    pub user_id: Option<String>,
    /// Session id.
    pub session_id: Option<String>,
    /// App version.
    pub app_version: Option<String>,
    /// `normal` or `high`.
    pub priority: Option<String>,
    /// Log level.
    pub level: Option<String>,
    /// Country code.
    pub country: Option<String>,
    /// Client id (other clients need `admin:events`).
    pub client_id: Option<String>,
    /// W3C trace id.
    pub trace_id: Option<String>,
}

/// Parameters of `GET /v1/events` (with [`FilterParams`]).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Inclusive start: RFC 3339 or `YYYY-MM-DD`.
    pub from: Option<String>,
    /// Exclusive end: RFC 3339, or `YYYY-MM-DD` for the end of that day.
    pub to: Option<String>,
    /// `desc` (default) or `asc`.
    pub order: Option<String>,
    /// Page size, 1 to 1000 (default 50).
    pub limit: Option<u32>,
    /// `next` or `prev` of a previous page of the same query.
    pub cursor: Option<String>,
    /// Add `total` (exact up to 100,000 rows, else estimated).
    pub total: Option<bool>,
}

/// Parameters of `GET /v1/stats` (with [`FilterParams`]).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// `minute`, `hour` (default) or `day`, in UTC.
    pub bucket: Option<String>,
    /// `name`, `kind`, `country`, `platform`, `app_version`, `client`,
    /// `level` or `priority`.
    pub group_by: Option<String>,
    /// Add distinct users per point (reads every matching row).
    pub users: Option<bool>,
    /// Inclusive start (default: 24 hours ago).
    pub from: Option<String>,
    /// Exclusive end.
    pub to: Option<String>,
}

/// The document, once the router has added the paths.
pub static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
