//! Request ids and the error envelope every route answers with.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use outpost_shared::{ErrorCode, ErrorEnvelope, FieldError};

use super::REQUEST_ID;
use crate::delivery::now_ms;

/// A request id: the caller's when it is sane, else a new one.
pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| outpost_shared::error::is_acceptable_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:012x}{:016x}", now_ms(), fastrand::u64(..)))
}

pub(crate) fn with_request_id(mut resp: Response, id: &str) -> Response {
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
pub(crate) fn error_response_with(
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

/// A `429` with the limit's headers.
pub(crate) fn rate_limited(
    code: ErrorCode,
    d: &outpost_shared::ratelimit::Decision,
    id: &str,
) -> Response {
    let retry = u32::try_from(d.retry_after_secs.unwrap_or(1)).unwrap_or(u32::MAX);
    let mut resp = error_response(code, None, id, Some(retry));
    for (k, v) in d.headers() {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}
