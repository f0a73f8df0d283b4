//! Compiling the component once, and running it once per request.
//!
//! [`EdgeHost::new`] does all the slow work (Cranelift compile, linking,
//! type-checking the imports against our implementations) so that a bad
//! component or a WIT mismatch fails at start-up, not on a request. Each
//! request then gets a fresh [`Store`] and instance from the
//! [`ServicePre`]: instantiation costs tens of microseconds and gives full
//! isolation, so no request can see another's memory or outlive its budget.
//!
//! The budget is enforced twice because neither mechanism covers both
//! cases: epoch interruption stops guest code that is *running* (a loop
//! never returns to the executor, so no timer could fire), and a timer
//! around the whole call stops a guest that is *waiting* (epochs are only
//! checked while wasm runs). A running guest also yields to the executor at
//! every epoch tick, so one busy guest cannot starve the other requests'
//! I/O on the same worker thread.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use outpost_shared::error::{ErrorCode, is_acceptable_request_id};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi_http::Error as HttpError;
use wasmtime_wasi_http::p3::bindings::ServicePre;
use wasmtime_wasi_http::p3::bindings::http::types::ErrorCode as WasiErrorCode;

use crate::config::{HostConfig, Limits};
use crate::envelope;
use crate::kv::Kv;
use crate::spin::{self, Shared};
use crate::state::RequestState;

/// How often the engine's epoch advances: the granularity of the deadline,
/// and how often a busy guest yields to the executor.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How long after its deadline a request whose guest is waiting (not
/// running) is abandoned. A running guest is interrupted within one
/// [`EPOCH_TICK`] of the deadline, with a precise trap; the grace lets that
/// happen first, so the timer only catches guests stuck on I/O.
pub const DEADLINE_GRACE_MS: u64 = 250;

/// Spin's `spin-*` request headers. Callers may not set any of them: the
/// guest trusts `spin-client-addr` as the TCP peer (rate limits, block
/// lists), so every incoming `spin-*` header is dropped and these are set
/// by the host.
const CLIENT_ADDR: HeaderName = HeaderName::from_static("spin-client-addr");
const FULL_URL: HeaderName = HeaderName::from_static("spin-full-url");
const PATH_INFO: HeaderName = HeaderName::from_static("spin-path-info");
const MATCHED_ROUTE: HeaderName = HeaderName::from_static("spin-matched-route");
const BASE_PATH: HeaderName = HeaderName::from_static("spin-base-path");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The body type [`EdgeHost::handle`] answers with: the guest streams its
/// response, the host collects it (bounded) before answering.
pub type ResponseBody = Full<Bytes>;

/// The edge component, compiled and linked, ready to serve requests.
///
/// Cheap to share: [`EdgeHost::serve`] wraps it in an [`Arc`] and every
/// request runs in its own store. [`EdgeHost::handle`] and
/// [`EdgeHost::serve`] must run on a tokio runtime with I/O and timers
/// enabled (the guest's outbound HTTP and the deadline use them).
pub struct EdgeHost {
    pre: ServicePre<RequestState>,
    /// One permit per slot of the instance pool.
    instances: Arc<tokio::sync::Semaphore>,
    /// One permit per open client connection.
    connections: Arc<tokio::sync::Semaphore>,
    shared: Arc<Shared>,
    limits: Limits,
    /// The component's own body limit (its `max_body_bytes`), named when
    /// the host refuses a body before the component sees it.
    guest_body_limit: String,
    counters: Arc<Counters>,
    /// The instance pool's own counts (instances alive, memory kept).
    pool: Option<wasmtime::PoolingAllocatorMetrics>,
}

/// Requests answered, by status class, and connections turned away.
#[derive(Default)]
struct Counters {
    by_class: [AtomicU64; 5],
    connections_refused: AtomicU64,
}

/// A handle on the host's metrics, usable after [`EdgeHost::serve`] took
/// the host.
#[derive(Clone)]
pub struct HostMetrics {
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    connections: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
    pool: Option<wasmtime::PoolingAllocatorMetrics>,
}

impl HostMetrics {
    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let kv = &self.shared.kv;
        out.push_str("# HELP outpost_edge_kv_errors_total Key-value operations that failed, by what the key is for (client, noclient, rla, rlc, rlci, rll, nonce).\n# TYPE outpost_edge_kv_errors_total counter\n");
        let errors = kv
            .stats
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (used_for, n) in &errors {
            let _ = writeln!(
                out,
                "outpost_edge_kv_errors_total{{use=\"{used_for}\"}} {n}"
            );
        }
        out.push_str("# HELP outpost_edge_kv_evictions_total Entries the in-memory store forgot to stay within kv.max_keys.\n# TYPE outpost_edge_kv_evictions_total counter\n");
        let _ = writeln!(
            out,
            "outpost_edge_kv_evictions_total {}",
            kv.stats.evicted.load(Ordering::Relaxed)
        );
        if let Some(n) = kv.memory_len() {
            out.push_str("# HELP outpost_edge_kv_keys Keys the in-memory store holds.\n# TYPE outpost_edge_kv_keys gauge\n");
            let _ = writeln!(out, "outpost_edge_kv_keys {n}");
        }
        out.push_str("# HELP outpost_edge_requests_total Requests answered, by status class.\n# TYPE outpost_edge_requests_total counter\n");
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            let _ = writeln!(
                out,
                "outpost_edge_requests_total{{status=\"{class}\"}} {}",
                self.counters.by_class[i].load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP outpost_edge_connections Client connections open now (at most limits.max_connections).\n# TYPE outpost_edge_connections gauge\n");
        let open = self
            .max_connections
            .saturating_sub(self.connections.available_permits());
        let _ = writeln!(out, "outpost_edge_connections {open}");
        out.push_str("# HELP outpost_edge_connections_refused_total Client connections closed on arrival because limits.max_connections were open.\n# TYPE outpost_edge_connections_refused_total counter\n");
        let _ = writeln!(
            out,
            "outpost_edge_connections_refused_total {}",
            self.counters.connections_refused.load(Ordering::Relaxed)
        );
        if let Some(pool) = &self.pool {
            out.push_str("# HELP outpost_edge_instances Instances of the component alive now (at most limits.max_instances).\n# TYPE outpost_edge_instances gauge\n");
            let _ = writeln!(out, "outpost_edge_instances {}", pool.component_instances());
            out.push_str("# HELP outpost_edge_pool_resident_bytes Memory the instance pool keeps resident in slots no instance uses now (at most limits.max_instances × limits.keep_resident_bytes, and their tables).\n# TYPE outpost_edge_pool_resident_bytes gauge\n");
            let _ = writeln!(
                out,
                "outpost_edge_pool_resident_bytes {}",
                pool.unused_memory_bytes_resident() + pool.unused_table_bytes_resident()
            );
        }
        out
    }
}

/// Core instances, memories and tables one instance of the component may
/// use: wit-component links the guest's module with a few small shims and
/// adapters (each a core instance with a table or a memory); the pool
/// reserves this many per slot.
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;
const MEMORIES_PER_COMPONENT: u32 = 2;
const TABLES_PER_COMPONENT: u32 = 16;
/// A component's tables are small (a few function references each).
const TABLE_KEEP_RESIDENT_BYTES: usize = 64 << 10;

/// The instance pool: `limits.max_instances` slots, each with room for one
/// instance of the component and `limits.memory_bytes` of linear memory.
fn pool(limits: &Limits) -> PoolingAllocationConfig {
    let n = limits.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .total_memories(n.saturating_mul(MEMORIES_PER_COMPONENT))
        .total_tables(n.saturating_mul(TABLES_PER_COMPONENT))
        .total_stacks(n)
        .max_memory_size(limits.memory_bytes);
    // A slot's memory is zeroed with memset up to this size when its
    // instance ends, instead of handed back to the kernel: the next
    // instance then takes no page faults there (BENCHMARKS.md).
    pool.linear_memory_keep_resident(limits.keep_resident_bytes)
        .table_keep_resident(limits.keep_resident_bytes.min(TABLE_KEEP_RESIDENT_BYTES));
    pool
}

impl EdgeHost {
    /// Loads and compiles the component, links WASI, `wasi:http` and the
    /// Spin interfaces, and checks that everything the component imports is
    /// provided. Starts the epoch ticker thread (it ends with the host).
    ///
    /// Blocking (compilation takes ~0.3 s in a release build, seconds in a
    /// debug one): call it before serving, or in `spawn_blocking`.
    ///
    /// Errors: unreadable or invalid component, an import the host does not
    /// provide (or with another type), an unusable KV configuration.
    pub fn new(cfg: HostConfig) -> anyhow::Result<EdgeHost> {
        let mut config = wasmtime::Config::new();
        // WASIp3: spin-sdk 7 exports an async `wasi:http/handler` and its
        // imports are async functions.
        config.wasm_component_model_async(true);
        config.epoch_interruption(true);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool(&cfg.limits)));
        // For profiling the guest with `perf`: Cranelift's code is listed
        // in /tmp/perf-<pid>.map under the component's function names
        // (BENCHMARKS.md, "Speed, issue 18 — inside the guest").
        if std::env::var_os("OUTPOST_EDGE_PERFMAP").is_some_and(|v| v == "1") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let pool = engine.pooling_allocator_metrics();

        let started = Instant::now();
        let component = Component::from_file(&engine, &cfg.component).map_err(|e| {
            anyhow::Error::from(e).context(format!(
                "loading the edge component {}",
                cfg.component.display()
            ))
        })?;
        info!(
            component = %cfg.component.display(),
            compile_ms = started.elapsed().as_millis() as u64,
            "compiled the edge component"
        );

        let mut linker = Linker::<RequestState>::new(&engine);
        // std in the guest still uses WASI 0.2 (clocks, random, stderr);
        // wasi:http and the Spin interfaces are WASIp3.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi::p3::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
        spin::add_to_linker(&mut linker, RequestState::spin_view)?;
        let instance_pre = linker.instantiate_pre(&component).map_err(|e| {
            anyhow::Error::from(e)
                .context("the edge component imports something this host does not provide")
        })?;
        let pre = ServicePre::new(instance_pre).map_err(|e| {
            anyhow::Error::from(e)
                .context("the edge component does not export wasi:http/handler@0.3.0")
        })?;

        start_epoch_ticker(&engine)?;
        // A store operation is a local round trip; one that takes a second
        // is an outage, and the guest fails open on it rather than spend
        // the request's deadline waiting.
        let kv = Kv::new(
            &cfg.kv,
            Duration::from_millis(cfg.limits.outbound_timeout_ms.min(1_000)),
        )?;
        // The component's documented default when the variable is unset.
        let guest_body_limit = cfg
            .variables
            .get("max_body_bytes")
            .cloned()
            .unwrap_or_else(|| {
                outpost_edge::config::VARIABLES
                    .iter()
                    .find(|(n, _, _)| *n == "max_body_bytes")
                    .and_then(|(_, d, _)| *d)
                    .unwrap_or_default()
                    .to_owned()
            });
        Ok(EdgeHost {
            pre,
            instances: Arc::new(tokio::sync::Semaphore::new(
                cfg.limits.max_instances.max(1) as usize
            )),
            connections: Arc::new(tokio::sync::Semaphore::new(
                cfg.limits.max_connections.max(1) as usize,
            )),
            guest_body_limit,
            counters: Arc::default(),
            pool,
            shared: Arc::new(Shared {
                variables: cfg.variables,
                kv,
                outbound: crate::state::outbound_client(Duration::from_millis(
                    cfg.limits.outbound_timeout_ms,
                )),
            }),
            limits: cfg.limits,
        })
    }

    /// Runs one request through a fresh instance of the component.
    ///
    /// `peer` is the TCP peer; the guest sees it as `spin-client-addr`
    /// (caller-sent `spin-*` headers are dropped). Never fails: a trap, an
    /// exhausted memory bound or a `wasi:http` error from the guest becomes
    /// `500` code 50001; a deadline becomes `503` code 50302 with
    /// `Retry-After`; a body over the bound `413` code 41302. All in the
    /// error envelope with `x-request-id` (the caller's, if acceptable).
    pub async fn handle<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let resp = self.answer(req, peer).await;
        let class = usize::from(resp.status().as_u16() / 100).clamp(1, 5) - 1;
        self.counters.by_class[class].fetch_add(1, Ordering::Relaxed);
        resp
    }

    /// A handle on this host's metrics (`HostMetrics::render`).
    pub fn metrics(&self) -> HostMetrics {
        HostMetrics {
            shared: Arc::clone(&self.shared),
            counters: Arc::clone(&self.counters),
            connections: Arc::clone(&self.connections),
            max_connections: self.limits.max_connections.max(1) as usize,
            pool: self.pool.clone(),
        }
    }

    async fn answer<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let request_id = request_id(&parts.headers);
        let max_body = self.limits.max_request_body_bytes;
        if declared_length(&parts.headers).is_some_and(|n| n > max_body as u64) {
            return self.body_too_large(&request_id);
        }
        prepare(&mut parts, peer, &request_id);
        let deadline = Duration::from_millis(self.limits.deadline_ms);
        let interrupt_at = started + deadline;
        // The whole body is read before an instance is taken: a client
        // trickling its body holds a connection, never one of the pool's
        // instances (bounded by `max_request_body_bytes` and the deadline).
        let read = Limited::new(body, max_body).collect();
        let body = match tokio::time::timeout_at(interrupt_at.into(), read).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(e)) if e.is::<LengthLimitError>() => {
                return self.body_too_large(&request_id);
            }
            Ok(Err(e)) => {
                debug!(%request_id, error = %e, "reading the request body failed");
                return envelope::response(
                    ErrorCode::MalformedJson,
                    "the request body could not be read",
                    &request_id,
                    None,
                );
            }
            Err(_) => {
                return envelope::response(
                    ErrorCode::Overloaded,
                    format!(
                        "the request body did not arrive within the request's {} ms deadline",
                        self.limits.deadline_ms
                    ),
                    &request_id,
                    Some(self.limits.retry_after_secs),
                );
            }
        };
        let req = Request::from_parts(parts, Full::new(body).map_err(|never| match never {}));

        // A slot of the instance pool, held until the store is gone (it is
        // declared after, so it is dropped first).
        let Ok(Ok(_slot)) = tokio::time::timeout_at(
            interrupt_at.into(),
            Arc::clone(&self.instances).acquire_owned(),
        )
        .await
        else {
            warn!(%request_id, "every instance slot stayed taken until the deadline");
            return envelope::response(
                ErrorCode::Overloaded,
                format!(
                    "every one of the edge's {} instances stayed busy until the request's {} ms deadline; retry later",
                    self.limits.max_instances.max(1),
                    self.limits.deadline_ms
                ),
                &request_id,
                Some(self.limits.retry_after_secs),
            );
        };
        let mut store = Store::new(
            self.pre.engine(),
            RequestState::new(Arc::clone(&self.shared), &self.limits),
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= interrupt_at {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        store.set_epoch_deadline(1);

        let run = run(
            &self.pre,
            &mut store,
            req,
            self.limits.max_response_body_bytes,
        );
        let outcome =
            tokio::time::timeout(deadline + Duration::from_millis(DEADLINE_GRACE_MS), run).await;
        let elapsed_us = started.elapsed().as_micros() as u64;
        match outcome {
            Ok(Ok(Ok(resp))) => {
                debug!(%request_id, status = resp.status().as_u16(), elapsed_us, "served");
                resp
            }
            Ok(Ok(Err(code))) => {
                warn!(%request_id, error = ?code, "the edge component answered with a wasi:http error");
                envelope::response(
                    ErrorCode::Internal,
                    "the edge component failed to produce a response",
                    &request_id,
                    None,
                )
            }
            Ok(Err(e)) => self.failure(&e, store.data().limiter.memory_refused, &request_id),
            Err(_) => {
                warn!(%request_id, elapsed_us, "the edge component was still waiting at its deadline");
                self.deadline_response(&request_id, false)
            }
        }
    }

    fn failure(
        &self,
        e: &wasmtime::Error,
        memory_refused: bool,
        request_id: &str,
    ) -> Response<ResponseBody> {
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            warn!(%request_id, "the edge component ran past its deadline");
            return self.deadline_response(request_id, true);
        }
        let message = if memory_refused {
            warn!(%request_id, limit = self.limits.memory_bytes, error = ?e, "the edge component ran out of memory");
            "the edge component ran out of memory"
        } else {
            warn!(%request_id, error = ?e, "the edge component failed");
            "the edge component failed"
        };
        envelope::response(ErrorCode::Internal, message, request_id, None)
    }

    /// `running` tells which bound fired (the guest was interrupted, or it
    /// was still waiting); the caller's answer is the same, the message
    /// helps whoever reads the log or tunes the deadline.
    /// A body over the host's bound (declared or read), named as the
    /// component would name it: its limit is the documented one; this
    /// host's own bound only stops reading.
    fn body_too_large(&self, request_id: &str) -> Response<ResponseBody> {
        envelope::response(
            ErrorCode::BodyTooLarge,
            format!(
                "the request body is larger than {} bytes (after decompression)",
                self.guest_body_limit
            ),
            request_id,
            None,
        )
    }

    fn deadline_response(&self, request_id: &str, running: bool) -> Response<ResponseBody> {
        let what = if running {
            "ran past"
        } else {
            "was still waiting at"
        };
        envelope::response(
            ErrorCode::Overloaded,
            format!(
                "the edge component {what} the request's {} ms deadline; retry later",
                self.limits.deadline_ms
            ),
            request_id,
            Some(self.limits.retry_after_secs),
        )
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown` resolves, then stops
    /// accepting and lets requests in flight finish (each is bounded by its
    /// deadline, so this ends).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let host = Arc::new(self);
        let graceful = GracefulShutdown::new();
        let mut shutdown = pin!(shutdown);
        // Slow or idle clients must not pin connections forever.
        let header_timeout = Duration::from_secs(10);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually out of file descriptors: back off rather
                        // than spin on a listener that keeps failing.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // Past the cap the connection is closed before anything is
            // read from it: no request body, no descriptor held.
            let Ok(slot) = Arc::clone(&host.connections).try_acquire_owned() else {
                host.counters
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "connection refused: limits.max_connections are open");
                drop(stream);
                continue;
            };
            let host = Arc::clone(&host);
            let service = hyper::service::service_fn(move |req| {
                let host = Arc::clone(&host);
                async move { Ok::<_, Infallible>(host.handle(req, peer).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(slot);
            });
        }
        drop(listener);
        let drain =
            Duration::from_millis(host.limits.deadline_ms + DEADLINE_GRACE_MS) + header_timeout;
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("connections still open after the drain period; closing them");
        }
        Ok(())
    }
}

/// The guest's answer, or why there is none. The outer error is a trap or
/// a host failure; the inner one a `wasi:http` error code from the guest.
async fn run<B>(
    pre: &ServicePre<RequestState>,
    store: &mut Store<RequestState>,
    req: Request<B>,
    max_response_body: usize,
) -> wasmtime::Result<Result<Response<ResponseBody>, WasiErrorCode>>
where
    B: http_body::Body<Data = Bytes, Error = HttpError> + Send + 'static,
{
    let service = pre.instantiate_async(&mut *store).await?;
    let (req, request_io) =
        wasmtime_wasi_http::p3::Request::from_http(store.data_mut().hooks(), req);
    store
        .run_concurrent(async move |accessor| {
            let respond = async {
                let res = match service.handle(accessor, req).await? {
                    Ok(res) => res,
                    Err(code) => return Ok(Err(code)),
                };
                let res = accessor.with(|store| res.into_http(store, async { Ok(()) }))?;
                let (parts, body) = res.into_parts();
                // The guest writes its body after returning the response, so
                // it must be read inside the event loop that runs the guest.
                let body = Limited::new(body, max_response_body)
                    .collect()
                    .await
                    .map_err(|e| {
                        wasmtime::format_err!("reading the edge component's response body: {e}")
                    })?
                    .to_bytes();
                wasmtime::Result::<_>::Ok(Ok(Response::from_parts(parts, Full::new(body))))
            };
            // How the guest consumed the request body; only worth a log
            // line, its answer already says what it made of it.
            let consumed = async {
                if let Err(e) = request_io.await {
                    debug!(error = ?e, "the edge component reported a request body error");
                }
                Ok(())
            };
            let (res, ()) = tokio::try_join!(respond, consumed)?;
            Ok(res)
        })
        .await?
}

/// The caller's `x-request-id` when it is safe to echo, else a new one, so
/// that host errors, the guest's answer and both logs share one id.
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_acceptable_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:032x}", fastrand::u128(..)))
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Rewrites the request the way Spin presents it to a component: absolute
/// URI, `spin-*` headers set by the runtime only, and the request id.
fn prepare(parts: &mut http::request::Parts, peer: SocketAddr, request_id: &str) {
    let spin_headers: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("spin-"))
        .cloned()
        .collect();
    for name in spin_headers {
        parts.headers.remove(name);
    }

    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let authority = parts
        .uri
        .authority()
        .cloned()
        .or_else(|| {
            let host = parts.headers.get(HOST)?.to_str().ok()?;
            host.parse::<Authority>().ok()
        })
        .unwrap_or_else(|| Authority::from_static("localhost"));
    if let Ok(uri) = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority.clone())
        .path_and_query(path.clone())
        .build()
    {
        if let Ok(v) = HeaderValue::try_from(uri.to_string()) {
            parts.headers.insert(FULL_URL, v);
        }
        parts.uri = uri;
    }
    let headers = &mut parts.headers;
    if let Ok(v) = HeaderValue::try_from(path.path()) {
        headers.insert(PATH_INFO, v);
    }
    headers.insert(MATCHED_ROUTE, HeaderValue::from_static("/..."));
    headers.insert(BASE_PATH, HeaderValue::from_static("/"));
    if let Ok(v) = HeaderValue::try_from(peer.to_string()) {
        headers.insert(CLIENT_ADDR, v);
    }
    if let Ok(v) = HeaderValue::try_from(request_id) {
        headers.insert(REQUEST_ID, v);
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a thread of its own
/// (a tokio task would itself be starved by a busy guest on a small
/// runtime). The thread holds the engine weakly and ends with it.
fn start_epoch_ticker(engine: &Engine) -> anyhow::Result<()> {
    let engine = engine.weak();
    std::thread::Builder::new()
        .name("outpost-edge-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match engine.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => return,
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_headers_from_the_caller_are_replaced() {
        let req = Request::builder()
            .uri("/v1/batch?write_key=w")
            .header("host", "edge.example:3000")
            .header("spin-client-addr", "9.9.9.9:1")
            .header("spin-anything", "x")
            .header("x-request-id", "bad id")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        let id = request_id(&parts.headers);
        assert_eq!(id.len(), 32);
        prepare(&mut parts, "10.0.0.7:5555".parse().unwrap(), &id);
        let h = &parts.headers;
        assert_eq!(h["spin-client-addr"], "10.0.0.7:5555");
        assert!(h.get("spin-anything").is_none());
        assert_eq!(
            h["spin-full-url"],
            "http://edge.example:3000/v1/batch?write_key=w"
        );
        assert_eq!(h["spin-path-info"], "/v1/batch");
        assert_eq!(h["x-request-id"], id.as_str());
        assert_eq!(
            parts.uri.to_string(),
            "http://edge.example:3000/v1/batch?write_key=w"
        );
    }

    #[test]
    fn an_acceptable_request_id_is_kept() {
        let mut h = http::HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-1"));
        assert_eq!(request_id(&h), "abc-1");
    }

    #[test]
    fn an_ipv6_peer_is_written_as_spin_does() {
        let (mut parts, ()) = Request::new(()).into_parts();
        prepare(&mut parts, "[::1]:8080".parse().unwrap(), "r");
        assert_eq!(parts.headers["spin-client-addr"], "[::1]:8080");
    }
}
