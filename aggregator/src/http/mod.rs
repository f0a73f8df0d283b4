//! The aggregator's HTTP surface: the router and the layers every route
//! goes through. Every error answer is the shared envelope with a stable
//! code, and every answer carries `X-Request-Id` (the caller's when it is
//! sane: one layer sets it on every route). Every route but health and
//! metrics counts against `server.max_concurrent_requests` (past it:
//! `503` with `Retry-After`, at once) and is cut off after
//! `server.request_timeout_ms`.
//!
//! One file per concern: `state` (what the handlers share), `respond`
//! (request ids and the error envelope), `ingest` (`POST /v1/ingest`),
//! `client_lookup` (the edges' `/internal/v1/clients/{id}`), `health`
//! (`/health/*`, `/metrics`). The read API's routes live in
//! [`crate::read_api`].

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use outpost_shared::ErrorCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod client_lookup;
mod health;
mod ingest;
mod respond;
mod state;

pub use health::{DeadLetterSummary, Live, Ready};
pub use respond::error_response;
pub(crate) use respond::{error_response_with, rate_limited, request_id, with_request_id};
pub use state::AppState;

/// Media type of an edge frame.
pub const FRAME_CONTENT_TYPE: &str = outpost_shared::frame::CONTENT_TYPE;
/// The request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// The request id of a request, as the first layer settled it.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// The router, and `/openapi.json` describing exactly its routes.
pub fn router(state: Arc<AppState>) -> Router {
    let (router, api) =
        OpenApiRouter::with_openapi(<crate::openapi::ApiDoc as utoipa::OpenApi>::openapi())
            .routes(routes!(ingest::ingest))
            .routes(routes!(client_lookup::client_record))
            .routes(routes!(crate::read_api::handlers::list_events))
            .routes(routes!(crate::read_api::handlers::stats))
            .routes(routes!(health::live))
            .routes(routes!(health::ready))
            .routes(routes!(health::metrics))
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

async fn not_found(headers: HeaderMap) -> Response {
    let id = request_id(&headers);
    error_response(ErrorCode::NotFound, None, &id, None)
}

async fn method_not_allowed(headers: HeaderMap) -> Response {
    let id = request_id(&headers);
    error_response(ErrorCode::MethodNotAllowed, None, &id, None)
}
