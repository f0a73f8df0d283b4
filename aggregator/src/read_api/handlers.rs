//! The read API's routes: the per-address limit before anything costs a
//! lookup, the caller, the caller's own limit, then the typed answer or
//! the error envelope.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use outpost_shared::client::ClientRecord;
use outpost_shared::{ErrorCode, ErrorEnvelope};
use serde::Serialize;

use super::{EventsPage, EventsParams, FilterParams, QueryError, StatsAnswer, StatsParams};
use crate::db::Db;
use crate::delivery::now_ms;
use crate::http::{AppState, error_response, rate_limited, request_id, with_request_id};

type RawQuery =
    Result<axum::extract::Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

/// Stored events, filtered, in keyset pages. Needs `read:events`; other
/// clients' events need `admin:events`.
#[utoipa::path(get, path = "/v1/events", tag = "query",
    params(FilterParams, EventsParams),
    responses(
        (status = 200, description = "A page", body = EventsPage),
        (status = 400, description = "Bad parameter (40014) or cursor (40015)", body = ErrorEnvelope),
        (status = 401, description = "Missing or bad credentials", body = ErrorEnvelope),
        (status = 403, description = "Permission denied (40301)", body = ErrorEnvelope),
        (status = 429, description = "The caller's rate limit (42901)", body = ErrorEnvelope),
        (status = 503, description = "Database unavailable", body = ErrorEnvelope)
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_events(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: RawQuery,
) -> Response {
    let a = match admit(&app, peer, &headers, params).await {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let page = super::events::events_page(a.db, &app.cursor_key, &a.who, &a.params)
        .await
        .map(|page| EventsPage {
            request_id: a.id.clone(),
            ..page
        });
    answer(&app, &a.id, page)
}

/// Events (and distinct users) per time bucket and group. Needs `read:stats`.
#[utoipa::path(get, path = "/v1/stats", tag = "query",
    params(FilterParams, StatsParams),
    responses(
        (status = 200, description = "The series", body = StatsAnswer),
        (status = 400, description = "Bad parameter (40014)", body = ErrorEnvelope),
        (status = 401, description = "Missing or bad credentials", body = ErrorEnvelope),
        (status = 403, description = "Permission denied (40301)", body = ErrorEnvelope),
        (status = 429, description = "The caller's rate limit (42901)", body = ErrorEnvelope),
        (status = 503, description = "Database unavailable", body = ErrorEnvelope)
    ),
    security(("bearer" = [])))]
pub(crate) async fn stats(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: RawQuery,
) -> Response {
    let a = match admit(&app, peer, &headers, params).await {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let series = super::stats::stats(a.db, &a.who, &a.params, a.now, &app.read_api)
        .await
        .map(|series| StatsAnswer {
            request_id: a.id.clone(),
            ..series
        });
    answer(&app, &a.id, series)
}

/// A request the read API has let through to its query.
struct Admitted<'a> {
    /// The request id.
    id: String,
    /// When it was admitted, Unix ms.
    now: i64,
    /// Where events are read from.
    db: &'a Db,
    /// Who asks, with the permissions the answer may use.
    who: ClientRecord,
    /// The decoded query string.
    params: Vec<(String, String)>,
}

/// The typed answer, or the error envelope (with `Retry-After` when
/// retrying may help).
fn answer<T: Serialize>(app: &AppState, id: &str, result: Result<T, QueryError>) -> Response {
    match result {
        Ok(body) => with_request_id(axum::Json(body).into_response(), id),
        Err(QueryError(code, message)) => {
            let retry = code.is_retryable().then_some(app.retry_after_secs);
            error_response(code, Some(message), id, retry)
        }
    }
}

/// Everything before the query: the per-address limit, a database, a
/// decodable query string, the caller, and the caller's own limit.
async fn admit<'a>(
    app: &'a AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    params: RawQuery,
) -> Result<Admitted<'a>, Response> {
    let id = request_id(headers);
    let now = now_ms();
    // Before anything costs a database lookup or a signature check.
    if let Some(limit) = &app.read_ip_limit {
        let ip = crate::server::client_ip(peer, headers, &app.trusted_proxies);
        let key = format!("rl:read-ip:{ip}");
        if let Ok(d) = outpost_shared::ratelimit::check(&app.read_limits, &key, limit, now, 1).await
            && !d.allowed
        {
            return Err(rate_limited(ErrorCode::RateLimitedIp, &d, &id));
        }
    }
    let (Some(store), Some(db)) = (&app.clients, &app.db) else {
        return Err(error_response(
            ErrorCode::DependencyUnavailable,
            Some("the query API needs PostgreSQL or SQLite".into()),
            &id,
            Some(app.retry_after_secs),
        ));
    };
    let Ok(axum::extract::Query(params)) = params else {
        return Err(error_response(
            ErrorCode::InvalidQueryParameter,
            Some("the query string does not decode".into()),
            &id,
            None,
        ));
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let who = match super::caller::caller(store, auth, now).await {
        Ok(who) => who,
        Err(QueryError(code, message)) => {
            return Err(error_response(
                code,
                Some(message),
                &id,
                code.is_retryable().then_some(app.retry_after_secs),
            ));
        }
    };
    // The caller's own rate limit, with the same GCRA as the edge.
    if let Some(limit) = &who.rate_limit {
        let key = format!("rl:read:{}", who.id);
        if let Ok(d) = outpost_shared::ratelimit::check(&app.read_limits, &key, limit, now, 1).await
            && !d.allowed
        {
            return Err(rate_limited(ErrorCode::RateLimitedClient, &d, &id));
        }
    }
    Ok(Admitted {
        id,
        now,
        db,
        who,
        params,
    })
}
