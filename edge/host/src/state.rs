//! The data of one request's store: WASI, `wasi:http`, the Spin view and
//! the limits.
//!
//! A store lives for exactly one request, so nothing here needs clearing:
//! a guest cannot leak state, handles or memory from one request into the
//! next. Only [`Shared`] (variables and the key-value store) outlives it.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView, default_send_request,
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

/// The guest's outbound HTTP: wasmtime-wasi-http's own client, with every
/// timeout capped by the host. The guest sets its timeouts from its
/// `upstream_timeout_ms` variable; a guest that sets none would otherwise
/// get the library's 10-minute defaults.
struct OutboundHooks {
    timeout: Duration,
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
        // `fut` reports how the guest consumed the response; the default
        // client has no use for it either.
        drop(fut);
        let cap = self.timeout;
        let capped = |t: Option<Duration>| Some(t.map_or(cap, |t| t.min(cap)));
        let asked = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: capped(asked.connect_timeout),
            first_byte_timeout: capped(asked.first_byte_timeout),
            between_bytes_timeout: capped(asked.between_bytes_timeout),
        };
        Box::new(async move {
            let (res, io) = default_send_request(request, Some(options)).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
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
