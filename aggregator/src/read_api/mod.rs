//! The read API: `GET /v1/events` (stored events, filtered, in pages) and
//! `GET /v1/stats` (counts per time bucket and group). Every piece has one
//! home here:
//!
//! * `handlers` — the routes: the per-address limit, the caller, the
//!   caller's own limit, the typed answer or the error envelope.
//! * `caller` — who is asking (`Authorization: Bearer` API key or JWT).
//! * `params` — query strings into a [`Query`](params::Query); the
//!   documented parameters (`FilterParams`, …) for `/openapi.json`.
//! * `cursor` — signed page cursors.
//! * `sql` — where PostgreSQL's and SQLite's SQL differ, and the filters.
//! * `events` — pages of stored events, [`EventsPage`].
//! * `stats` — series from the per-minute rollups or the rows, [`StatsAnswer`].
//!
//! * Filters: `kind`, `name`, `user_id`, `session_id`, `app_version`,
//!   `priority`, `level`, `country`, `client_id`, `trace_id`, and a time
//!   range `from` (inclusive) / `to` (exclusive), each RFC 3339 or a
//!   `YYYY-MM-DD` day (`to=2026-11-26` means up to the end of that day).
//!   Every value is a bound parameter; an unknown parameter or a bad value
//!   is `400` with code 40014 naming it.
//! * Order: `order=desc` (default, newest first) or `asc`, by (`ts`, `id`).
//! * Pages: keyset pagination, never OFFSET. `limit` 1..=1000 (default 50).
//!   `next` and `prev` are opaque cursors, signed so that an altered cursor
//!   or one from another query is refused (40015).
//! * Who: `Authorization: Bearer` with an API key or a JWT of a client whose
//!   permissions allow `read:events` (for a JWT, the token's `permissions`/
//!   `scope` must allow it too: the record caps what its tokens grant). A
//!   client sees only its own events unless it may `admin` events
//!   (`admin:events`, `*:*`).

use outpost_shared::ErrorCode;

mod caller;
mod cursor;
mod events;
pub(crate) mod handlers;
mod params;
mod sql;
mod stats;

pub use cursor::CursorKey;
pub use events::{EventsPage, MAX_EXACT_TOTAL, StoredEvent};
pub use params::{
    DEFAULT_LIMIT, EventsParams, FilterParams, MAX_LIMIT, StatsParams, fuzz_query_string,
};
pub use stats::{MAX_STATS_ROWS, StatsAnswer, StatsPoint};

/// A refused query: the code and what to tell the caller.
#[derive(Debug)]
pub struct QueryError(pub ErrorCode, pub String);

impl QueryError {
    pub(crate) fn param(name: &str, why: &str) -> QueryError {
        QueryError(ErrorCode::InvalidQueryParameter, format!("{name}: {why}"))
    }
}
