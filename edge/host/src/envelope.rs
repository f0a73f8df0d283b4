//! The host's own answers, in Outpost's error envelope.
//!
//! When the guest cannot answer (it trapped, ran past its deadline, ran out
//! of memory, or returned a `wasi:http` error instead of a response) the
//! caller still gets the same JSON shape and `x-request-id` the edge's own
//! errors have, so a client needs one error path and an operator one id to
//! grep for.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use outpost_shared::error::{ErrorCode, ErrorEnvelope};

/// A complete error response: status from the code, JSON body, request id,
/// and `Retry-After` when given.
pub(crate) fn response(
    code: ErrorCode,
    message: impl Into<String>,
    request_id: &str,
    retry_after_secs: Option<u32>,
) -> Response<Full<Bytes>> {
    let envelope = ErrorEnvelope::new(code, request_id).with_message(message);
    // Serializing plain strings and numbers cannot fail; should it, the
    // status and headers still tell the story.
    let body = serde_json::to_vec(&envelope).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Request ids are generated here or vetted by
    // `is_acceptable_request_id`, so they are always valid header values.
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", v);
    }
    if let Some(secs) = retry_after_secs {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deadline_answer_has_the_envelope_and_retry_after() {
        use http_body_util::BodyExt as _;

        let r = response(ErrorCode::Overloaded, "too slow", "req-1", Some(2));
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["x-request-id"], "req-1");
        let body: serde_json::Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"success": false, "code": 50302, "message": "too slow",
                "request_id": "req-1", "errors": []})
        );
    }
}
