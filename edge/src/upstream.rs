//! The aggregator's side of the wire, for adapters: which requests to make
//! and how to read the answers. An adapter only moves bytes (the
//! platform's HTTP client); what is sent and what an answer means is
//! decided here, once.

use outpost_shared::ErrorCode;
use outpost_shared::auth::signature;
use outpost_shared::client::ClientRecord;
use outpost_shared::error::{AcceptedResponse, ErrorEnvelope};
use outpost_shared::seal::{SEALED_RECORD_CONTENT_TYPE, SealKey, client_record_context};

use std::future::Future;

use crate::pipeline::{EdgeConfig, Upstream, UpstreamAnswer};

/// Largest answer body an adapter should read from the aggregator.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// An HTTP request for the adapter to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRequest {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// Absolute URL.
    pub url: String,
    /// Headers to set.
    pub headers: Vec<(&'static str, String)>,
    /// Body (empty for `GET`).
    pub body: Vec<u8>,
}

/// `POST {aggregator}/v1/ingest` with a frame (the frame carries its own MAC).
pub fn ingest_request(aggregator_url: &str, frame: Vec<u8>) -> OutboundRequest {
    OutboundRequest {
        method: "POST",
        url: format!("{aggregator_url}/v1/ingest"),
        headers: vec![(
            "content-type",
            outpost_shared::frame::CONTENT_TYPE.to_owned(),
        )],
        body: frame,
    }
}

/// `GET {aggregator}/internal/v1/clients/{id}`, signed with the edge key.
/// `id` must already be a valid client id (the pipeline checks it), so it
/// needs no escaping.
pub fn client_request(
    aggregator_url: &str,
    cfg: &EdgeConfig,
    id: &str,
    now_secs: i64,
) -> OutboundRequest {
    let path = format!("/internal/v1/clients/{id}");
    let sig = signature::sign(
        cfg.edge_key.secret.expose(),
        "GET",
        &path,
        now_secs,
        None,
        b"",
    );
    OutboundRequest {
        method: "GET",
        url: format!("{aggregator_url}{path}"),
        headers: vec![
            (signature::HEADER_KEY, cfg.edge_key.id.clone()),
            (signature::HEADER_TIMESTAMP, now_secs.to_string()),
            (signature::HEADER_SIGNATURE, sig),
            ("accept", SEALED_RECORD_CONTENT_TYPE.to_owned()),
        ],
        body: Vec::new(),
    }
}

/// How a platform moves bytes: send a request, get the status and the
/// body (bounded by [`MAX_ANSWER_BYTES`]), within the platform's timeout.
pub trait Transport {
    /// Sends `req`; `Err` for anything that is not an HTTP answer.
    fn send(
        &self,
        req: OutboundRequest,
    ) -> impl Future<Output = Result<(u16, Vec<u8>), TransportError>>;
}

/// A request the platform could not complete — no HTTP answer — in the
/// platform's own words (its error types are its own).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

impl From<String> for TransportError {
    fn from(message: String) -> TransportError {
        TransportError(message)
    }
}

/// Why the aggregator gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The request got no HTTP answer.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A client record that does not open with this edge's key (or was
    /// sealed for another lookup).
    #[error("the client record does not open with this edge's key")]
    Unsealed,
    /// A client record that opens but does not parse.
    #[error("unreadable client record: {0}")]
    Unreadable(#[from] serde_json::Error),
    /// The lookup was answered with an error.
    #[error("client lookup answered {status}{}", code.map(|c| format!(" ({c})")).unwrap_or_default())]
    Answered {
        /// The HTTP status.
        status: u16,
        /// The error code of the answer's envelope, when it had one.
        code: Option<ErrorCode>,
    },
}

/// The aggregator as the pipeline sees it, over any [`Transport`]: which
/// requests to make and what the answers mean live here, once, so every
/// adapter forwards and looks up clients the same way.
///
/// With several URLs (a fleet without a load balancer in front), each call
/// goes to the first; one that gets no answer or `503` is made again to
/// the next, and so on. A frame is sent again as the same bytes — the same
/// batch id — so an aggregator that did take it after all drops the repeat.
pub struct Aggregator<'a, T> {
    /// Base URLs, without a trailing slash, in order of preference.
    pub urls: &'a [String],
    /// The pipeline's configuration (its edge key signs the lookups).
    pub cfg: &'a EdgeConfig,
    /// Milliseconds since the epoch, for signing lookups.
    pub now_ms: i64,
    /// The platform's HTTP client.
    pub transport: T,
}

impl<T: Transport> Aggregator<'_, T> {
    /// Sends the request `make` builds for each URL in turn until one
    /// answers with anything but `503`; the last outcome otherwise. `make`
    /// is told when it builds the last attempt (it may then move what it
    /// would otherwise copy).
    async fn send_with_failover(
        &self,
        mut make: impl FnMut(&str, bool) -> OutboundRequest,
    ) -> Result<(u16, Vec<u8>), TransportError> {
        let mut last = Err(TransportError("no aggregator URL".into()));
        for (i, url) in self.urls.iter().enumerate() {
            last = self
                .transport
                .send(make(url, i + 1 == self.urls.len()))
                .await;
            match &last {
                Ok((503, _)) | Err(_) => continue,
                Ok(_) => break,
            }
        }
        last
    }
}

impl<T: Transport> Upstream for Aggregator<'_, T> {
    type Error = UpstreamError;

    async fn forward(&self, frame: Vec<u8>) -> Result<UpstreamAnswer, UpstreamError> {
        // One copy of the frame per attempt but the last, which takes it:
        // with one aggregator URL (the usual case) the frame is never copied.
        let mut frame = Some(frame);
        let (status, body) = self
            .send_with_failover(|url, last| {
                let body = if last {
                    frame.take().unwrap_or_default()
                } else {
                    frame.clone().unwrap_or_default()
                };
                ingest_request(url, body)
            })
            .await?;
        Ok(ingest_answer(status, &body))
    }

    async fn client(&self, id: &str) -> Result<Option<ClientRecord>, UpstreamError> {
        let now_secs = self.now_ms / 1000;
        let (status, body) = self
            .send_with_failover(|url, _| client_request(url, self.cfg, id, now_secs))
            .await?;
        client_answer(status, &body, &self.cfg.record_key, id, now_secs)
    }
}

/// What the aggregator's answer to a frame means.
pub fn ingest_answer(status: u16, body: &[u8]) -> UpstreamAnswer {
    if status == 202
        && let Ok(a) = serde_json::from_slice::<AcceptedResponse>(body)
    {
        return UpstreamAnswer::Accepted(a);
    }
    // A 202 whose body cannot be read is not an acknowledgement we can
    // account for: report it as refused, and the client retries.
    UpstreamAnswer::Refused(status, serde_json::from_slice::<ErrorEnvelope>(body).ok())
}

/// What the aggregator's answer to a client lookup means: `Ok(None)` for
/// "no such client", `Err` for anything that is not an answer. A record
/// comes sealed under `key` (derived from the edge key) and bound to the
/// lookup (`id`, its signed `lookup_secs`): one that does not open — from
/// anyone but an aggregator holding this edge's key, or an old answer
/// replayed — is refused, never believed.
pub fn client_answer(
    status: u16,
    body: &[u8],
    key: &SealKey,
    id: &str,
    lookup_secs: i64,
) -> Result<Option<ClientRecord>, UpstreamError> {
    match status {
        200 => {
            let plain = key
                .open(&client_record_context(id, lookup_secs), body)
                .ok_or(UpstreamError::Unsealed)?;
            Ok(Some(serde_json::from_slice(&plain)?))
        }
        404 => Ok(None),
        status => Err(UpstreamError::Answered {
            status,
            code: serde_json::from_slice::<ErrorEnvelope>(body)
                .ok()
                .map(|env| env.code),
        }),
    }
}

#[cfg(test)]
mod tests {
    use outpost_shared::ErrorCode;
    use outpost_shared::client::Secret;
    use outpost_shared::frame::EdgeKey;

    use super::*;

    fn cfg() -> EdgeConfig {
        crate::config::Settings::from_lookup(|k| {
            match k {
                "aggregator_url" => Some("https://agg"),
                "edge_key_id" => Some("edge-1"),
                "edge_key_secret" => Some("ZWRnZS1zZWNyZXQtZWRnZS1zZWNyZXQ"),
                _ => None,
            }
            .map(str::to_owned)
        })
        .unwrap()
        .edge
    }

    #[test]
    fn client_lookup_is_signed_as_the_aggregator_verifies() {
        let cfg = cfg();
        let r = client_request("http://agg", &cfg, "web", 1_800_000_000);
        assert_eq!(r.url, "http://agg/internal/v1/clients/web");
        let h = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        assert_eq!(h(signature::HEADER_KEY), "edge-1");
        let signed = signature::SignedRequest {
            method: "GET",
            path_and_query: "/internal/v1/clients/web",
            timestamp: h(signature::HEADER_TIMESTAMP),
            nonce: None,
            body: b"",
            signature: h(signature::HEADER_SIGNATURE),
        };
        let key = EdgeKey {
            id: "edge-1".into(),
            secret: Secret::new(b"edge-secret-edge-secret".to_vec()),
        };
        signature::verify(&signed, [key.secret.expose()], 1_800_000_010, 300).unwrap();
    }

    #[test]
    fn answers_are_classified() {
        let ok = br#"{"success":true,"accepted":2,"rejected":0,"errors":[],"request_id":"r"}"#;
        assert!(matches!(ingest_answer(202, ok), UpstreamAnswer::Accepted(a) if a.accepted == 2));
        assert_eq!(
            ingest_answer(202, b"garbage"),
            UpstreamAnswer::Refused(202, None)
        );
        let env = serde_json::to_vec(&ErrorEnvelope::new(ErrorCode::Overloaded, "r")).unwrap();
        assert!(matches!(
            ingest_answer(503, &env),
            UpstreamAnswer::Refused(503, Some(e)) if e.code == ErrorCode::Overloaded
        ));
        let key = cfg().record_key;
        assert_eq!(client_answer(404, b"", &key, "web", 5).unwrap(), None);
        assert!(client_answer(500, b"", &key, "web", 5).is_err());
        assert!(client_answer(200, b"{}", &key, "web", 5).is_err());
    }

    #[test]
    fn a_client_record_is_believed_only_sealed_for_this_lookup() {
        let cfg = cfg();
        let record = serde_json::to_vec(&serde_json::json!({
            "id": "web", "name": "Web", "method": "write_key", "credentials": [],
            "permissions": ["write:events"], "allowed_origins": ["*"], "active": true
        }))
        .unwrap();
        let ctx = client_record_context("web", 1_800_000_000);
        let sealed = cfg.record_key.seal([3; 12], &ctx, &record);
        let got = client_answer(200, &sealed, &cfg.record_key, "web", 1_800_000_000).unwrap();
        assert_eq!(got.map(|r| r.id.into_string()), Some("web".to_owned()));
        // In clear text (a proxy's own record), or replayed for a later
        // lookup, or for another id: refused.
        assert!(client_answer(200, &record, &cfg.record_key, "web", 1_800_000_000).is_err());
        assert!(client_answer(200, &sealed, &cfg.record_key, "web", 1_800_000_001).is_err());
        assert!(client_answer(200, &sealed, &cfg.record_key, "app", 1_800_000_000).is_err());
    }
}
