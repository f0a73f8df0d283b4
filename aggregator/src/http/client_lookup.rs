//! `GET /internal/v1/clients/{id}`: client records for the edges, which
//! cache them; signed with an edge key, bounded per edge key, answered
//! sealed.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use outpost_shared::seal::{
    PURPOSE_CLIENT_RECORD, SEALED_RECORD_CONTENT_TYPE, SealKey, client_record_context,
};
use outpost_shared::{ErrorCode, ErrorEnvelope};

use super::{AppState, error_response, request_id, with_request_id};
use crate::clients::verify_edge_request;
use crate::delivery::now_ms;

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
pub(super) async fn client_record(
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
