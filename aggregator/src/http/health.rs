//! `GET /health/live`, `GET /health/ready` and `GET /metrics`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

/// `GET /health/live`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Live {
    /// `ok`.
    pub status: &'static str,
}

/// `GET /health/ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// `ok`, `degraded` (a sink or Redis is down: ingest still works) or
    /// `unavailable` (the spool fails).
    pub status: &'static str,
    /// `ok` or `down` per dependency: `spool`, `postgres` or `sqlite`,
    /// `influxdb`, `redis`.
    pub checks: BTreeMap<&'static str, &'static str>,
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

/// The process runs.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "Alive", body = Live)))]
pub(super) async fn live() -> Response {
    axum::Json(Live { status: "ok" }).into_response()
}

/// Whether this instance can take traffic, per dependency.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "`ok`, or `degraded` (ingest works, delivery waits)", body = Ready),
        (status = 503, description = "The spool fails", body = Ready)
    ))]
pub(super) async fn ready(State(app): State<Arc<AppState>>) -> Response {
    // Ingest needs only the spool: a sink or Redis being down delays
    // delivery (or fails dedup open) but acknowledged data is safe, so the
    // instance stays ready and reports itself "degraded".
    let mut checks = BTreeMap::new();
    let spool = app.spool.ping().await;
    checks.insert(app.spool.check_name(), status(spool));
    let mut degraded = false;
    for sink in &app.sinks {
        let up = sink.ping().await;
        degraded |= !up;
        checks.insert(sink.name, status(up));
    }
    if let Some(up) = app.dedup.ping().await {
        degraded |= !up;
        checks.insert("redis", status(up));
    }
    let (code, word) = match (spool, degraded) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (true, true) => (StatusCode::OK, "degraded"),
        (true, false) => (StatusCode::OK, "ok"),
    };
    // Not a readiness condition (ingest works), but something an operator
    // should see: what sinks gave up on, waiting for `outpost dead-letters`.
    let dead_letters =
        app.spool
            .dead_letter_summary()
            .await
            .ok()
            .map(|(count, bytes, max_bytes)| DeadLetterSummary {
                count,
                bytes,
                max_bytes,
            });
    let ready = Ready {
        status: word,
        checks,
        dead_letters,
    };
    (code, axum::Json(ready)).into_response()
}

fn status(up: bool) -> &'static str {
    if up { "ok" } else { "down" }
}

/// Prometheus metrics (README, "Metrics").
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
pub(super) async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    // The operator commands change the dead letters from outside.
    app.spool.refresh_gauges().await;
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
