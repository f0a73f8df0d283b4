use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http_body_util::{BodyExt as _, Full, Limited};
use outpost_edge::config::{ConfigError, Settings, VARIABLES};
use outpost_edge::kv_slots::SlottedKv;
use outpost_edge::pipeline::{self, EdgeEnv, EdgeRequest, EdgeResponse};
use outpost_edge::shared::kv::Kv;
use outpost_edge::upstream::{self, Aggregator, OutboundRequest, Transport, TransportError};
use spin_sdk::http::{HeaderName, HeaderValue, Request, StatusCode};
use spin_sdk::key_value::Store;
use spin_sdk::wasip3::http::types::RequestOptions;
use spin_sdk::wasip3::http_compat::RequestOptionsExtension;

/// The header Spin sets to the TCP peer (`ip:port`); anything a caller
/// sends under a `spin-` name is replaced by the runtime.
const CLIENT_ADDR: &str = "spin-client-addr";

#[spin_sdk::http_service]
async fn handle(req: Request) -> http::Response<Full<bytes::Bytes>> {
    let env = SpinEnv;
    let (parts, body) = req.into_parts();
    let peer_ip = parts
        .headers
        .get(CLIENT_ADDR)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.parse::<SocketAddr>()
                .map(|a| a.ip())
                .or_else(|_| v.parse::<IpAddr>())
                .ok()
        })
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let headers = parts
        .headers
        .iter()
        .filter(|(k, _)| !k.as_str().starts_with("spin-"))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let mut edge_req = EdgeRequest {
        method: parts.method.as_str().to_owned(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
        headers,
        body: Vec::new(),
        peer_ip,
        platform_ip: None,
        pop: None,
        country_hint: None,
    };

    let settings = match settings().await {
        Ok(s) => s,
        Err(problem) => {
            return into_http(pipeline::misconfigured(
                &edge_req,
                problem.to_string(),
                &env,
            ));
        }
    };
    // Read one byte past the bound at most: the pipeline answers 413 for
    // that, and a huge body is never buffered.
    edge_req.body = read_bounded(body, settings.edge.max_wire_bytes() + 1).await;

    // Spin's store never forgets a key: the edge keeps a bounded number of
    // slots per use in it instead of one key per client, address or nonce.
    let store = match Store::open_default().await {
        Ok(s) => Some(SlottedKv::new(
            SpinStore(s),
            || SpinEnv.now_ms(),
            settings.kv_slots,
            settings.edge.edge_key.secret.expose(),
        )),
        Err(e) => {
            env.warn("kv_open", &format!("{e:?}"));
            None
        }
    };
    let upstream = Aggregator {
        urls: &settings.aggregator_urls,
        cfg: &settings.edge,
        now_ms: env.now_ms(),
        transport: SpinHttp {
            timeout_ms: settings.upstream_timeout_ms,
        },
    };
    let resp = match &store {
        Some(kv) => pipeline::handle(edge_req, &settings.edge, kv, &upstream, &env).await,
        // Without a store the rules that need state (limits, nonces, the
        // client cache) fail open or fall back to lookups, as they would
        // when KV errors.
        None => pipeline::handle(edge_req, &settings.edge, &NoKv, &upstream, &env).await,
    };
    into_http(resp)
}

async fn settings() -> Result<Settings, ConfigError> {
    let mut values = HashMap::new();
    for (name, _, _) in VARIABLES {
        if let Ok(v) = spin_sdk::variables::get(name).await {
            values.insert(*name, v);
        }
    }
    Settings::from_lookup(|name| values.get(name).cloned())
}

async fn read_bounded<B>(body: B, max: usize) -> Vec<u8>
where
    B: http_body::Body,
    B::Data: bytes::Buf,
{
    let mut out = Vec::new();
    let mut body = std::pin::pin!(body);
    while out.len() < max {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(mut data) = frame.into_data() {
                    use bytes::Buf as _;
                    while data.has_remaining() && out.len() < max {
                        let chunk = data.chunk();
                        let take = chunk.len().min(max - out.len());
                        out.extend_from_slice(&chunk[..take]);
                        data.advance(take);
                    }
                }
            }
            // A body that breaks off is handled like a short one: the
            // parser reports it as malformed.
            Some(Err(_)) | None => break,
        }
    }
    out
}

fn into_http(resp: EdgeResponse) -> http::Response<Full<bytes::Bytes>> {
    let mut out = http::Response::new(Full::new(bytes::Bytes::from(resp.body)));
    *out.status_mut() =
        StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in resp.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            out.headers_mut().append(k, v);
        }
    }
    out
}

struct SpinEnv;

impl EdgeEnv for SpinEnv {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn random(&self) -> [u8; 16] {
        let bytes = spin_sdk::wasip3::random::random::get_random_bytes(16);
        let mut out = [0u8; 16];
        for (o, b) in out.iter_mut().zip(bytes) {
            *o = b;
        }
        out
    }

    /// Spin keeps a component's stderr as its log.
    fn warn(&self, event: &str, detail: &str) {
        eprintln!("outpost-edge warn {event}: {detail}");
    }
}

/// Spin's key-value store as it is: no expiry (the TTL is dropped here;
/// [`SlottedKv`] keeps each entry's deadline in its value instead).
struct SpinStore(Store);

impl Kv for SpinStore {
    type Error = spin_sdk::key_value::Error;

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Self::Error> {
        self.0.get(key).await
    }

    async fn put(&self, key: &str, value: &[u8], _ttl_secs: u64) -> Result<(), Self::Error> {
        self.0.set(key, value.to_vec()).await
    }
}

/// Used when the store cannot be opened: every operation fails, and the
/// pipeline treats that as it treats any KV outage.
struct NoKv;

impl Kv for NoKv {
    type Error = &'static str;

    async fn get(&self, _: &str) -> Result<Option<Vec<u8>>, Self::Error> {
        Err("no key-value store")
    }

    async fn put(&self, _: &str, _: &[u8], _: u64) -> Result<(), Self::Error> {
        Err("no key-value store")
    }
}

/// Spin's outbound HTTP, with the settings' timeout on every phase.
struct SpinHttp {
    timeout_ms: u64,
}

impl Transport for SpinHttp {
    async fn send(&self, r: OutboundRequest) -> Result<(u16, Vec<u8>), TransportError> {
        let mut req = http::Request::builder().method(r.method).uri(&r.url);
        for (k, v) in &r.headers {
            req = req.header(*k, v);
        }
        let options = RequestOptions::new();
        let timeout_ns = Some(self.timeout_ms.saturating_mul(1_000_000));
        // A host that does not support a timeout still has its own.
        let _ = options.set_connect_timeout(timeout_ns);
        let _ = options.set_first_byte_timeout(timeout_ns);
        let _ = options.set_between_bytes_timeout(timeout_ns);
        let req = req
            .extension(RequestOptionsExtension(options))
            .body(Full::new(bytes::Bytes::from(r.body)))
            .map_err(|e| format!("bad request: {e}"))?;
        let resp = spin_sdk::http::send(req)
            .await
            .map_err(|e| format!("{e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), upstream::MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body.to_vec()))
    }
}
