//! `POST /v1/ingest`: one signed frame from an edge, verified, validated
//! and made durable in the spool before the `202`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use outpost_shared::error::AcceptedResponse;
use outpost_shared::frame;
use outpost_shared::validate::validate_event;
use outpost_shared::{ErrorCode, ErrorEnvelope, FieldError};

use super::{AppState, FRAME_CONTENT_TYPE, error_response_with, request_id, with_request_id};
use crate::delivery::now_ms;
use crate::handoff::Checked;
use crate::spool::{SpoolEntry, SpoolError};
use crate::telemetry::CodeLabel;

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
pub(super) async fn ingest(State(app): State<Arc<AppState>>, req: Request) -> Response {
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
                e.event_id = Some(event.event_id.to_string());
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
        client_id: decoded.batch.client_id.to_string(),
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
