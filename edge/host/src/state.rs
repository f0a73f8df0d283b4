//! The data of one request's store: WASI, `wasi:http`, the Spin view and
//! the limits.
//!
//! A store lives for exactly one request, so nothing here needs clearing:
//! a guest cannot leak state, handles or memory from one request into the
//! next. Only [`Shared`] (variables, the key-value store and the outbound
//! connection pool) outlives it.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

use crate::config::Limits;
use crate::spin::{Shared, SpinView};

/// Most entries in one request's resource table. The edge needs a few
/// dozen (fields, bodies, a store handle); the bound stops a guest that
/// allocates handles in a loop before it costs the host memory.
const MAX_TABLE_ENTRIES: usize = 16_384;

pub(crate) struct RequestState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundHooks,
    pub(crate) limiter: Limiter,
    shared: Arc<Shared>,
}

impl RequestState {
    pub(crate) fn new(shared: Arc<Shared>, limits: &Limits) -> RequestState {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_TABLE_ENTRIES);
        RequestState {
            table,
            // No environment, arguments, files or sockets: the component
            // reaches the world only through wasi:http and Spin. Its stderr
            // (a panic message) goes to ours, as under Spin.
            wasi: WasiCtxBuilder::new().inherit_stderr().build(),
            http: WasiHttpCtx::new(),
            hooks: OutboundHooks {
                timeout: Duration::from_millis(limits.outbound_timeout_ms),
                client: shared.outbound.clone(),
            },
            limiter: Limiter::new(limits.memory_bytes),
            shared,
        }
    }

    pub(crate) fn hooks(&mut self) -> &mut dyn WasiHttpHooks {
        &mut self.hooks
    }

    pub(crate) fn spin_view(&mut self) -> SpinView<'_> {
        SpinView {
            table: &mut self.table,
            shared: &self.shared,
        }
    }
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RequestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// [`StoreLimits`], remembering whether it refused memory, so that an
/// out-of-memory trap can be told apart from a guest bug in the answer
/// and the log.
pub(crate) struct Limiter {
    inner: StoreLimits,
    pub(crate) memory_refused: bool,
}

impl Limiter {
    fn new(memory_bytes: usize) -> Limiter {
        Limiter {
            // A refused grow traps rather than returning -1: the guest
            // would abort on it anyway, and the trap names the cause.
            inner: StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            memory_refused: false,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.memory_refused = true;
        }
        r
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_refused = true;
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The connection pool behind every guest's outbound HTTP. Instances live
/// for one request, the pool for the host: the aggregator (the only host
/// the edge calls) is reached over kept-alive connections instead of a new
/// TCP (and TLS) handshake per request, which was most of the edge's
/// per-request time (BENCHMARKS.md).
pub(crate) type OutboundClient = Client<HttpsConnector<HttpConnector>, WasiBody>;

/// Builds the pool; `connect_timeout` caps every connection attempt.
pub(crate) fn outbound_client(connect_timeout: Duration) -> OutboundClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let connector = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        // Only fails for a provider without safe defaults; ring has them.
        .expect("ring supports the default protocol versions")
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build(connector)
}

/// The guest's outbound HTTP over the host's pool, with every timeout
/// capped by the host. The guest sets its timeouts from its
/// `upstream_timeout_ms` variable; a guest that sets none would otherwise
/// wait for as long as the pool's defaults allow.
struct OutboundHooks {
    timeout: Duration,
    client: OutboundClient,
}

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        // `fut` reports how the guest consumed the response; the pool has
        // no use for it.
        drop(fut);
        let cap = self.timeout;
        let asked = options.unwrap_or_default();
        let first_byte = asked.first_byte_timeout.map_or(cap, |t| t.min(cap));
        let between_bytes = asked.between_bytes_timeout.map_or(cap, |t| t.min(cap));
        let client = self.client.clone();
        Box::new(async move {
            if request.uri().authority().is_none() {
                return Err(HttpError::HttpRequestUriInvalid);
            }
            let resp = tokio::time::timeout(first_byte, client.request(request))
                .await
                .map_err(|_| HttpError::ConnectionReadTimeout)?
                .map_err(|e| {
                    if e.is_connect() {
                        HttpError::ConnectionRefused
                    } else {
                        HttpError::HttpProtocolError
                    }
                })?;
            let resp = resp.map(|body| {
                BetweenBytes {
                    body,
                    timeout: between_bytes,
                    sleep: None,
                }
                .boxed_unsync()
            });
            Ok((
                resp,
                Box::new(async { Ok(()) })
                    as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
    }
}

/// A response body that fails when no bytes arrive for `timeout`.
struct BetweenBytes {
    body: hyper::body::Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for BetweenBytes {
    type Data = bytes::Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, HttpError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(|_| HttpError::HttpProtocolError)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_remembers_refusing_memory() {
        let mut l = Limiter::new(1 << 20);
        assert!(matches!(l.memory_growing(0, 1 << 20, None), Ok(true)));
        assert!(!l.memory_refused);
        assert!(l.memory_growing(1 << 20, 2 << 20, None).is_err());
        assert!(l.memory_refused);
    }
}
