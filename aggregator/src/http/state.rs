//! What the handlers share.

use std::sync::Arc;

use outpost_shared::frame::{FrameLimits, KeyRing};
use outpost_shared::validate::Limits;
use prometheus_client::registry::Registry;

use crate::clients::ClientStore;
use crate::db::Db;
use crate::dedup::Dedup;
use crate::spool::Spool;
use crate::telemetry::Metrics;

/// What the handlers share.
pub struct AppState {
    /// Accepted edge keys.
    pub ring: KeyRing,
    /// Frame bounds.
    pub frame_limits: FrameLimits,
    /// Event validation limits.
    pub limits: Limits,
    /// The spool.
    pub spool: Spool,
    /// Metrics handles.
    pub metrics: Metrics,
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Dedup (for readiness).
    pub dedup: Arc<Dedup>,
    /// The database events are read from (PostgreSQL or SQLite), when one
    /// is configured (for the read API and readiness).
    pub db: Option<Db>,
    /// Client records, when a database is configured.
    pub clients: Option<ClientStore>,
    /// Signs query cursors.
    pub cursor_key: crate::read_api::CursorKey,
    /// Per-address and per-caller rate-limit state of the read API (this
    /// instance only, bounded).
    pub read_limits: crate::limits::BoundedKv,
    /// The read API's per-address limit, before authentication.
    pub read_ip_limit: Option<outpost_shared::ratelimit::RateLimit>,
    /// Client-record lookups per edge key.
    pub lookup_limit: Option<outpost_shared::ratelimit::RateLimit>,
    /// The read API's cost limits.
    pub read_api: crate::config::ReadApiConfig,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: outpost_edge::net::NetList,
    /// The configured sinks' readiness probes.
    pub sinks: Vec<crate::sinks::Probe>,
    /// `Retry-After` on `503`.
    pub retry_after_secs: u32,
    /// Longest a request may take (a stuck disk must not hang clients).
    pub request_timeout: std::time::Duration,
    /// Requests being handled, bounded by `server.max_concurrent_requests`.
    pub in_flight: Arc<tokio::sync::Semaphore>,
}
