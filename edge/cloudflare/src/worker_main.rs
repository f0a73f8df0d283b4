use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::future::{Either, select};
use outpost_edge::config::Settings;
use outpost_edge::kv_cache::{CachedKv, KvCacheState, KvLimits};
use outpost_edge::pipeline::{self, EdgeEnv, EdgeRequest, EdgeResponse};
use outpost_edge::shared::kv::Kv;
use outpost_edge::upstream::{self, Aggregator, OutboundRequest, Transport, TransportError};
use worker::{
    AbortController, Context, Date, Delay, Env, Fetch, Headers, Method, Request, RequestInit,
    Response, event, js_sys, kv::KvStore,
};

/// The KV namespace binding in `wrangler.toml`.
const KV_BINDING: &str = "OUTPOST_KV";

/// Workers KV: one write per key per second, TTL at least 60 s.
const CLOUDFLARE_KV: KvLimits = KvLimits {
    min_ttl_secs: 60,
    write_interval_ms: 1000,
    max_entries: 10_000,
};

thread_local! {
    // An isolate serves many requests: keep the KV cache between them.
    static KV_CACHE: KvCacheState = KvCacheState::default();
}

#[event(fetch)]
async fn fetch(mut req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    let platform_ip = req
        .headers()
        .get("cf-connecting-ip")
        .ok()
        .flatten()
        .and_then(|v| v.parse::<IpAddr>().ok());
    let url = req.url()?;
    let path_and_query = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let headers = req
        .headers()
        .entries()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let cf = req.cf();
    let mut edge_req = EdgeRequest {
        method: req.method().to_string().to_ascii_uppercase(),
        path_and_query,
        headers,
        body: Vec::new(),
        // Workers never see the TCP peer; Cloudflare vouches for the client
        // address in CF-Connecting-IP.
        peer_ip: platform_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        platform_ip,
        pop: cf.map(|c| c.colo()).filter(|c| !c.is_empty()),
        country_hint: cf.and_then(|c| c.country()),
    };

    let env_ = WorkerEnv;
    let settings = match Settings::from_lookup(|name| {
        env.var(&name.to_ascii_uppercase())
            .ok()
            .map(|v| v.to_string())
    }) {
        Ok(s) => s,
        Err(e) => return into_response(pipeline::misconfigured(&edge_req, e.to_string(), &env_)),
    };
    edge_req.body = read_bounded(&mut req, settings.edge.max_wire_bytes() + 1).await;

    let upstream = Aggregator {
        urls: &settings.aggregator_urls,
        cfg: &settings.edge,
        now_ms: env_.now_ms(),
        transport: WorkerFetch {
            timeout_ms: settings.upstream_timeout_ms,
        },
    };
    let resp = match env.kv(KV_BINDING) {
        Ok(store) => {
            let kv = CachedKv::with_state(
                WorkerKv(store),
                || WorkerEnv.now_ms(),
                CLOUDFLARE_KV,
                KV_CACHE.with(Clone::clone),
            );
            pipeline::handle(edge_req, &settings.edge, &kv, &upstream, &env_).await
        }
        Err(e) => {
            return into_response(pipeline::misconfigured(
                &edge_req,
                format!("no KV namespace bound as {KV_BINDING}: {e}"),
                &env_,
            ));
        }
    };
    into_response(resp)
}

/// Keeps at most `max` bytes: the pipeline answers 413 when the bound is
/// reached, and a huge body is never buffered. The rest is read and
/// dropped, up to [`DRAIN_LIMIT_BYTES`]: answering before the body is
/// consumed leaves the connection behind the runtime's HTTP front end
/// unusable (under `wrangler dev` the next request on it gets a bare 503).
async fn read_bounded(req: &mut Request, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let Ok(mut stream) = req.stream() else {
        return out;
    };
    let mut seen = 0usize;
    while seen < DRAIN_LIMIT_BYTES {
        match stream.next().await {
            Some(Ok(chunk)) => {
                seen = seen.saturating_add(chunk.len());
                if out.len() < max {
                    let take = chunk.len().min(max - out.len());
                    out.extend_from_slice(&chunk[..take]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    out
}

/// Most bytes of an oversized body read (and dropped) before answering.
const DRAIN_LIMIT_BYTES: usize = 16 << 20;

fn into_response(resp: EdgeResponse) -> worker::Result<Response> {
    let headers = Headers::new();
    for (k, v) in &resp.headers {
        headers.append(k, v)?;
    }
    Ok(Response::from_bytes(resp.body)?
        .with_status(resp.status)
        .with_headers(headers))
}

struct WorkerEnv;

impl EdgeEnv for WorkerEnv {
    fn now_ms(&self) -> i64 {
        Date::now().as_millis() as i64
    }

    fn random(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        // crypto.getRandomValues does not fail for 16 bytes; if it ever did,
        // ids would still be unique enough from the clock.
        if getrandom::getrandom(&mut out).is_err() {
            out[..8].copy_from_slice(&self.now_ms().to_be_bytes());
        }
        out
    }

    /// Workers Logs keep console output.
    fn warn(&self, event: &str, detail: &str) {
        worker::console_warn!("outpost-edge warn {event}: {detail}");
    }
}

/// Workers KV, which keeps its own expiry.
struct WorkerKv(KvStore);

impl Kv for WorkerKv {
    type Error = worker::kv::KvError;

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Self::Error> {
        self.0.get(key).bytes().await
    }

    async fn put(&self, key: &str, value: &[u8], ttl_secs: u64) -> Result<(), Self::Error> {
        self.0
            .put_bytes(key, value)?
            .expiration_ttl(ttl_secs)
            .execute()
            .await
    }
}

/// `fetch`, abandoned after the settings' timeout.
struct WorkerFetch {
    timeout_ms: u64,
}

impl Transport for WorkerFetch {
    async fn send(&self, r: OutboundRequest) -> Result<(u16, Vec<u8>), TransportError> {
        let headers = Headers::new();
        for (k, v) in &r.headers {
            headers.set(k, v).map_err(|e| e.to_string())?;
        }
        let mut init = RequestInit::new();
        init.with_method(if r.method == "POST" {
            Method::Post
        } else {
            Method::Get
        })
        .with_headers(headers);
        if !r.body.is_empty() {
            init.with_body(Some(js_sys::Uint8Array::from(r.body.as_slice()).into()));
        }
        let request = Request::new_with_init(&r.url, &init).map_err(|e| e.to_string())?;
        let controller = AbortController::default();
        let signal = controller.signal();
        let call = async {
            let fetch = Fetch::Request(request);
            let mut resp = fetch
                .send_with_signal(&signal)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status_code();
            let mut body = Vec::new();
            let mut stream = resp.stream().map_err(|e| e.to_string())?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                if body.len() + chunk.len() > upstream::MAX_ANSWER_BYTES {
                    return Err("the aggregator's answer is too large".to_owned());
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, body))
        };
        let timeout = Delay::from(Duration::from_millis(self.timeout_ms));
        match select(std::pin::pin!(call), timeout).await {
            Either::Left((result, _)) => result.map_err(TransportError),
            Either::Right(((), _)) => {
                controller.abort();
                Err(TransportError(format!(
                    "no answer within {} ms",
                    self.timeout_ms
                )))
            }
        }
    }
}
