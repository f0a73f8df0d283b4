//! `GET /v1/events`: one page of stored events, by keyset over (`ts`,
//! `id`), and an optional bounded total.

use outpost_shared::ErrorCode;
use outpost_shared::client::ClientRecord;
use outpost_shared::event::Timestamp;
use serde::Serialize;
use sqlx::{Database, Encode, QueryBuilder, Type};
use utoipa::ToSchema;

use super::QueryError;
use super::cursor::{CursorBody, CursorKey, digest};
use super::params::{Query, parse_query, scope_to_caller};
use super::sql::{Dialect, dialect, push_filters, unavailable};
use crate::db::Db;

/// One stored event, as `GET /v1/events` returns it.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredEvent {
    /// The client's id for the event.
    pub event_id: String,
    /// The client that sent it.
    pub client_id: String,
    /// The event's time (RFC 3339, UTC, milliseconds).
    #[schema(value_type = String)]
    pub timestamp: Timestamp,
    /// When the edge received it.
    #[schema(value_type = String)]
    pub received_at: Timestamp,
    /// `event` or `log`.
    pub kind: String,
    /// `normal` or `high`.
    pub priority: String,
    /// The event's properties.
    #[schema(value_type = Object)]
    pub properties: serde_json::Value,
    /// The event's context (`app_version`, `platform`, …).
    #[schema(value_type = Object)]
    pub context: serde_json::Value,
    /// Event name, or logger for logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Log message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Log level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// User id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Anonymous id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// Session id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// W3C trace id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// W3C span id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// The client's sequence number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// Country (GeoIP, else the edge platform's hint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Region (GeoIP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// City (GeoIP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// Autonomous system number (GeoIP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asn: Option<i64>,
}

/// A page of `GET /v1/events`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventsPage {
    /// The events, in the query's order.
    pub data: Vec<StoredEvent>,
    /// Whether `next` leads further.
    pub has_next: bool,
    /// Whether `prev` leads back.
    pub has_prev: bool,
    /// Cursor of the next page (`cursor=`), or null.
    pub next: Option<String>,
    /// Cursor of the previous page, or null.
    pub prev: Option<String>,
    /// With `total=true`: the rows matching the query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
    /// With `total=true`: whether `total` is an estimate (past 100,000 rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_estimated: Option<bool>,
    /// The request id.
    pub request_id: String,
}

/// One page of events (its `request_id` is the handler's to fill in).
pub async fn events_page(
    db: &Db,
    key: &CursorKey,
    who: &ClientRecord,
    params: &[(String, String)],
) -> Result<EventsPage, QueryError> {
    if !who.permissions.allows("read", "events") {
        return Err(QueryError(
            ErrorCode::PermissionDenied,
            "needs read:events".into(),
        ));
    }
    let (mut q, options) = parse_query(params)?;
    scope_to_caller(&mut q, who)?;
    let qd = digest(&q);
    let cursor = match options.cursor {
        Some(c) => Some(key.open(&c).filter(|c| c.q == qd).ok_or_else(|| {
            QueryError(
                ErrorCode::InvalidCursor,
                "the cursor is invalid or belongs to another query".into(),
            )
        })?),
        None => None,
    };
    // Walking backward runs the query in the opposite order, then flips the page.
    let forward = cursor.as_ref().is_none_or(|c| c.forward);
    let asc = q.asc == forward;

    let d = dialect(db);
    let key_after = cursor.as_ref().map(|c| (c.ts, c.id));
    let mut rows: Vec<EventRow> = match db {
        Db::Postgres(p) => {
            let mut sql = page_sql::<sqlx::Postgres>(d, &q, key_after, asc);
            sql.build_query_as().fetch_all(p).await
        }
        Db::Sqlite(p) => {
            let mut sql = page_sql::<sqlx::Sqlite>(d, &q, key_after, asc);
            sql.build_query_as().fetch_all(p).await
        }
    }
    .map_err(unavailable)?;
    let more = rows.len() as i64 > q.limit;
    rows.truncate(q.limit as usize);
    if !forward {
        rows.reverse();
    }
    let keys: Vec<(i64, i64)> = rows.iter().map(|r| (r.ts_us, r.id)).collect();
    let data: Vec<StoredEvent> = rows.into_iter().map(StoredEvent::from).collect();
    // In the query's order: there is a next page after the last row when
    // walking forward found more, or when we came back from one.
    let (has_next, has_prev) = if forward {
        (more, cursor.is_some())
    } else {
        (true, more)
    };
    let seal = |k: &(i64, i64), forward: bool| {
        key.seal(&CursorBody {
            ts: k.0,
            id: k.1,
            forward,
            q: qd.clone(),
        })
    };
    let mut page = EventsPage {
        data,
        has_next: has_next && !keys.is_empty(),
        has_prev: has_prev && !keys.is_empty(),
        next: keys.last().filter(|_| has_next).map(|k| seal(k, true)),
        prev: keys.first().filter(|_| has_prev).map(|k| seal(k, false)),
        total: None,
        total_estimated: None,
        request_id: String::new(),
    };
    if options.total {
        let (total, estimated) = total(db, d, &q).await?;
        page.total = Some(total);
        page.total_estimated = Some(estimated);
    }
    Ok(page)
}

/// Most rows an exact `total` counts; past it the total is an estimate.
pub const MAX_EXACT_TOTAL: i64 = 100_000;

/// How many rows match, at bounded cost: counted exactly up to
/// [`MAX_EXACT_TOTAL`]; beyond, PostgreSQL's planner estimate (never less
/// than what was counted) or, on SQLite, the bound itself — with
/// `estimated` set.
async fn total(db: &Db, d: &Dialect, q: &Query) -> Result<(i64, bool), QueryError> {
    let counted: i64 = match db {
        Db::Postgres(p) => {
            let mut sql = count_sql::<sqlx::Postgres>(d, q);
            sql.build_query_scalar().fetch_one(p).await
        }
        Db::Sqlite(p) => {
            let mut sql = count_sql::<sqlx::Sqlite>(d, q);
            sql.build_query_scalar().fetch_one(p).await
        }
    }
    .map_err(unavailable)?;
    if counted <= MAX_EXACT_TOTAL {
        return Ok((counted, false));
    }
    let estimate = match db {
        Db::Postgres(p) => {
            let mut sql = QueryBuilder::<sqlx::Postgres>::new(
                "EXPLAIN (FORMAT JSON) SELECT 1 FROM events WHERE true",
            );
            push_filters(&mut sql, d, q);
            let plan: serde_json::Value = sql
                .build_query_scalar()
                .fetch_one(p)
                .await
                .map_err(unavailable)?;
            plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0) as i64
        }
        Db::Sqlite(_) => 0,
    };
    Ok((estimate.max(counted), true))
}

/// `SELECT count(*)` of at most one row more than [`MAX_EXACT_TOTAL`].
fn count_sql<'a, DB: Database>(d: &Dialect, q: &Query) -> QueryBuilder<'a, DB>
where
    String: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
    DB::Arguments<'a>: Default,
{
    let mut sql = QueryBuilder::new("SELECT count(*) FROM (SELECT 1 FROM events WHERE true");
    push_filters(&mut sql, d, q);
    sql.push(" LIMIT ")
        .push_bind(MAX_EXACT_TOTAL + 1)
        .push(") AS bounded");
    sql
}

/// The page query: filters, then rows after the cursor's key in the order
/// walked, one more than the page to learn whether there are more.
fn page_sql<'a, DB: Database>(
    d: &Dialect,
    q: &Query,
    after: Option<(i64, i64)>,
    asc: bool,
) -> QueryBuilder<'a, DB>
where
    String: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
    DB::Arguments<'a>: Default,
{
    let mut sql = QueryBuilder::new(format!("SELECT {} FROM events WHERE true", d.columns));
    push_filters(&mut sql, d, q);
    if let Some((ts, id)) = after {
        // A row comparison on (ts, id) uses the (…, ts, id) indexes.
        let op = if asc { ">" } else { "<" };
        let (open, close) = d.micros;
        sql.push(format_args!(" AND ({}, id) {op} ({open}", d.ts))
            .push_bind(ts)
            .push(format_args!("{close}, "))
            .push_bind(id)
            .push(")");
    }
    let dir = if asc { "ASC" } else { "DESC" };
    sql.push(format_args!(" ORDER BY {} {dir}, id {dir} LIMIT ", d.ts))
        .push_bind(q.limit + 1);
    sql
}

/// One stored event, as both databases return it.
#[derive(sqlx::FromRow)]
pub(super) struct EventRow {
    id: i64,
    ts_us: i64,
    client_id: String,
    event_id: String,
    kind: String,
    name: Option<String>,
    message: Option<String>,
    level: Option<String>,
    user_id: Option<String>,
    anonymous_id: Option<String>,
    session_id: Option<String>,
    properties: String,
    context: String,
    trace_id: Option<String>,
    span_id: Option<String>,
    seq: Option<i64>,
    priority: String,
    received_ms: i64,
    country: Option<String>,
    region: Option<String>,
    city: Option<String>,
    asn: Option<i64>,
}

impl From<EventRow> for StoredEvent {
    fn from(r: EventRow) -> StoredEvent {
        let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap_or_default();
        StoredEvent {
            properties: json(&r.properties),
            context: json(&r.context),
            event_id: r.event_id,
            client_id: r.client_id,
            timestamp: Timestamp(r.ts_us / 1000),
            received_at: Timestamp(r.received_ms),
            kind: r.kind,
            priority: r.priority,
            name: r.name,
            message: r.message,
            level: r.level,
            user_id: r.user_id,
            anonymous_id: r.anonymous_id,
            session_id: r.session_id,
            trace_id: r.trace_id,
            span_id: r.span_id,
            seq: r.seq,
            country: r.country,
            region: r.region,
            city: r.city,
            asn: r.asn,
        }
    }
}
