//! `GET /v1/events`: stored events, filtered, in pages.
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

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use outpost_shared::ErrorCode;
use outpost_shared::auth::permission::Permissions;
use outpost_shared::auth::{api_key, jwt};
use outpost_shared::client::{AuthMethod, ClientRecord};
use outpost_shared::event::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::{Database, Encode, QueryBuilder, Type};

use crate::clients::ClientStore;
use crate::db::Db;

/// Largest page.
pub const MAX_LIMIT: i64 = 1000;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 50;

const TEXT_FILTERS: &[(&str, &str)] = &[
    ("kind", "kind"),
    ("name", "name"),
    ("user_id", "user_id"),
    ("session_id", "session_id"),
    ("app_version", "app_version"),
    ("priority", "priority"),
    ("level", "level"),
    ("country", "country"),
    ("client_id", "client_id"),
    ("trace_id", "trace_id"),
];

/// A refused query: the code and what to tell the caller.
#[derive(Debug)]
pub struct QueryError(pub ErrorCode, pub String);

impl QueryError {
    fn param(name: &str, why: &str) -> QueryError {
        QueryError(ErrorCode::InvalidQueryParameter, format!("{name}: {why}"))
    }
}

/// The parsed query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Query {
    filters: BTreeMap<String, String>,
    from_us: Option<i64>,
    to_us: Option<i64>,
    asc: bool,
    limit: i64,
}

#[derive(Serialize, Deserialize)]
struct CursorBody {
    /// Key of the row the page starts after: (ts in µs, id).
    ts: i64,
    id: i64,
    /// Walk forward (in the query's order) or backward.
    forward: bool,
    /// Digest of the query it belongs to.
    q: String,
}

fn parse_time(name: &str, v: &str, end_of_day: bool) -> Result<i64, QueryError> {
    if let Some(t) = Timestamp::parse_rfc3339(v) {
        return Ok(t.millis() * 1000);
    }
    let day = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| QueryError::param(name, "expected RFC 3339 or YYYY-MM-DD"))?;
    let day = if end_of_day {
        day.succ_opt()
            .ok_or_else(|| QueryError::param(name, "out of range"))?
    } else {
        day
    };
    let t = day
        .and_hms_opt(0, 0, 0)
        .ok_or_else(|| QueryError::param(name, "out of range"))?
        .and_utc();
    Ok(t.timestamp_micros())
}

/// Applies a parameter every query takes (equality filters, time range);
/// `Ok(false)` when `k` is not one of them.
fn common_param(q: &mut Query, k: &str, v: &str) -> Result<bool, QueryError> {
    match k {
        "from" => q.from_us = Some(parse_time(k, v, false)?),
        "to" => q.to_us = Some(parse_time(k, v, v.len() == 10)?),
        name if TEXT_FILTERS.iter().any(|(n, _)| *n == name) => {
            if v.is_empty() || v.len() > 256 {
                return Err(QueryError::param(name, "1 to 256 bytes"));
            }
            check_filter_value(name, v)?;
            if q.filters.insert(name.to_owned(), v.to_owned()).is_some() {
                return Err(QueryError::param(name, "given twice"));
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Filters on a closed set of values take only those values: a value no
/// event can have is a mistake to name (`40014`), not an empty answer.
fn check_filter_value(name: &str, v: &str) -> Result<(), QueryError> {
    use outpost_shared::event::Level;
    let ok = match name {
        "kind" => matches!(v, "event" | "log"),
        "priority" => matches!(v, "normal" | "high"),
        "level" => Level::ALL.iter().any(|l| l.as_str() == v),
        "trace_id" => {
            v.len() == 32
                && v.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        "country" => v.len() == 2 && v.bytes().all(|b| b.is_ascii_uppercase()),
        "client_id" => outpost_shared::client::is_valid_client_id(v),
        _ => true,
    };
    if ok {
        return Ok(());
    }
    let expected = match name {
        "kind" => "event or log",
        "priority" => "normal or high",
        "level" => "trace, debug, info, warn, error or fatal",
        "trace_id" => "32 lower-case hex digits",
        "country" => "an ISO 3166-1 alpha-2 code in upper case (DE)",
        _ => "a client id ([a-z0-9][a-z0-9-]{0,63})",
    };
    Err(QueryError::param(name, expected))
}

/// What a page request asks besides the query itself.
#[derive(Debug, Default)]
struct PageOptions {
    /// The cursor of a previous page.
    cursor: Option<String>,
    /// Count the matching rows too (bounded, see [`MAX_EXACT_TOTAL`]).
    total: bool,
}

fn parse_query(params: &[(String, String)]) -> Result<(Query, PageOptions), QueryError> {
    let mut q = Query {
        filters: BTreeMap::new(),
        from_us: None,
        to_us: None,
        asc: false,
        limit: DEFAULT_LIMIT,
    };
    let mut options = PageOptions::default();
    for (k, v) in params {
        if common_param(&mut q, k, v)? {
            continue;
        }
        match k.as_str() {
            "order" => {
                q.asc = match v.as_str() {
                    "asc" => true,
                    "desc" => false,
                    _ => return Err(QueryError::param(k, "asc or desc")),
                }
            }
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| QueryError::param(k, "1 to 1000"))?
            }
            "cursor" => options.cursor = Some(v.clone()),
            "total" => {
                options.total = match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(QueryError::param(k, "true or false")),
                }
            }
            other => return Err(QueryError::param(other, "unknown parameter")),
        }
    }
    Ok((q, options))
}

/// A caller that may not administer events reads only its own client.
fn scope_to_caller(q: &mut Query, who: &ClientRecord) -> Result<(), QueryError> {
    if who.permissions.allows("admin", "events") {
        return Ok(());
    }
    match q.filters.get("client_id") {
        Some(c) if c != &who.id => Err(QueryError(
            ErrorCode::PermissionDenied,
            "only admin:events reads other clients".into(),
        )),
        _ => {
            q.filters.insert("client_id".into(), who.id.clone());
            Ok(())
        }
    }
}

/// Where the two databases' SQL differs. Everything else is the same text.
struct Dialect {
    /// The time column as stored (`timestamptz` or integer µs).
    ts: &'static str,
    /// Turns a bound integer of microseconds into a value comparable to `ts`.
    micros: (&'static str, &'static str),
    /// The event columns of a page, named as [`EventRow`] expects.
    columns: &'static str,
    /// A typed NULL (the group column when there is no group).
    null_text: &'static str,
    /// Cast of an aggregate to a 64-bit integer.
    int8: &'static str,
}

const POSTGRES: Dialect = Dialect {
    ts: "ts",
    // An immutable expression of the parameter: the (…, ts, id) indexes apply.
    micros: (
        "('epoch'::timestamptz + (",
        "::int8 * interval '1 microsecond'))",
    ),
    columns: "id, (extract(epoch from ts) * 1000000)::int8 AS ts_us, client_id, event_id, kind, name, \
              message, level, user_id, anonymous_id, session_id, properties::text AS properties, \
              context::text AS context, trace_id, span_id, seq, priority, \
              (extract(epoch from received_at) * 1000)::int8 AS received_ms, country, region, city, asn",
    null_text: "NULL::text",
    int8: "::int8",
};

const SQLITE: Dialect = Dialect {
    ts: "ts_us",
    micros: ("(", ")"),
    columns: "id, ts_us, client_id, event_id, kind, name, message, level, user_id, anonymous_id, \
              session_id, properties, context, trace_id, span_id, seq, priority, received_ms, \
              country, region, city, asn",
    null_text: "NULL",
    int8: "",
};

fn dialect(db: &Db) -> &'static Dialect {
    match db {
        Db::Postgres(_) => &POSTGRES,
        Db::Sqlite(_) => &SQLITE,
    }
}

/// `AND column = $n …` for the filters and time range, all bound.
fn push_filters<'a, DB: Database>(sql: &mut QueryBuilder<'a, DB>, d: &Dialect, q: &Query)
where
    String: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
{
    for (name, column) in TEXT_FILTERS {
        if let Some(v) = q.filters.get(*name) {
            sql.push(format_args!(" AND {column} = "))
                .push_bind(v.clone());
        }
    }
    let (open, close) = d.micros;
    if let Some(f) = q.from_us {
        sql.push(format_args!(" AND {} >= {open}", d.ts))
            .push_bind(f)
            .push(close);
    }
    if let Some(t) = q.to_us {
        sql.push(format_args!(" AND {} < {open}", d.ts))
            .push_bind(t)
            .push(close);
    }
}

/// Most rows (buckets × groups) one stats answer may hold.
pub const MAX_STATS_ROWS: i64 = 10_000;

const GROUPS: &[(&str, &str)] = &[
    ("name", "name"),
    ("kind", "kind"),
    ("country", "country"),
    ("platform", "platform"),
    ("app_version", "app_version"),
    ("client", "client_id"),
    ("level", "level"),
    ("priority", "priority"),
];

/// A stats query's parameters: the filters, the bucket, the group and
/// whether distinct users are asked for.
type StatsQuery = (
    Query,
    &'static str,
    Option<&'static (&'static str, &'static str)>,
    bool,
);

fn parse_stats(params: &[(String, String)]) -> Result<StatsQuery, QueryError> {
    let mut q = Query {
        filters: BTreeMap::new(),
        from_us: None,
        to_us: None,
        asc: true,
        limit: 0,
    };
    let (mut bucket, mut group, mut with_users) = ("hour", None, false);
    for (k, v) in params {
        if common_param(&mut q, k, v)? {
            continue;
        }
        match k.as_str() {
            "bucket" => {
                bucket = match v.as_str() {
                    "minute" => "minute",
                    "hour" => "hour",
                    "day" => "day",
                    _ => return Err(QueryError::param(k, "minute, hour or day")),
                }
            }
            "users" => {
                with_users = match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(QueryError::param(k, "true or false")),
                }
            }
            "group_by" => {
                group = Some(GROUPS.iter().find(|(n, _)| *n == v).ok_or_else(|| {
                    QueryError::param(
                        k,
                        "name, kind, country, platform, app_version, client, level or priority",
                    )
                })?)
            }
            other => return Err(QueryError::param(other, "unknown parameter")),
        }
    }
    Ok((q, bucket, group, with_users))
}

/// The read API's parameter parsing on an arbitrary query string, as the
/// server gets it (for the fuzz target; no database involved): decoded as
/// axum decodes it, then parsed as both endpoints parse it, and a cursor
/// opened with a fixed key.
#[doc(hidden)]
pub fn fuzz_query_string(query: &str) {
    let Ok(uri) = format!("/v1/events?{query}").parse::<axum::http::Uri>() else {
        return;
    };
    let Ok(axum::extract::Query(params)) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
    else {
        return;
    };
    if let Ok((q, options)) = parse_query(&params) {
        let _ = digest(&q);
        if let Some(c) = options.cursor {
            let _ = CursorKey::derive(b"fuzz").open(&c);
        }
    }
    let _ = parse_stats(&params);
}

/// `GET /v1/stats`: events and distinct users per time bucket, optionally
/// grouped by one dimension, with the same filters as `/v1/events`. Without
/// `from`, the last 24 hours.
///
/// A query the rollups cannot answer reads rows: its `to - from` may be at
/// most `max_scan_span_secs` (`40019` beyond).
pub async fn stats(
    db: &Db,
    who: &ClientRecord,
    params: &[(String, String)],
    now_ms: i64,
    max_scan_span_secs: u64,
) -> Result<serde_json::Value, QueryError> {
    if !who.permissions.allows("read", "stats") {
        return Err(QueryError(
            ErrorCode::PermissionDenied,
            "needs read:stats".into(),
        ));
    }
    let (mut q, bucket, group, with_users) = parse_stats(params)?;
    scope_to_caller(&mut q, who)?;
    // The last 24 hours, from the start of that minute.
    q.from_us
        .get_or_insert((now_ms.saturating_sub(86_400_000) / 60_000) * 60_000_000);
    let series = match db {
        Db::Postgres(p) if !with_users => match rollup_plan(&q, group) {
            Some(plan) => Some(rollup_stats(p, &plan, &q, bucket).await?),
            None => None,
        },
        _ => None,
    };
    let (rows, source) = match series {
        Some(rows) => (rows, "rollup"),
        None => {
            let from = q.from_us.unwrap_or(0);
            let to = q.to_us.unwrap_or(now_ms.saturating_mul(1000));
            let span_secs = u64::try_from(to.saturating_sub(from) / 1_000_000).unwrap_or(0);
            if span_secs > max_scan_span_secs {
                return Err(QueryError(
                    ErrorCode::QueryRangeTooLarge,
                    format!(
                        "this query reads every matching event (distinct users, or a filter the per-minute counts cannot answer): its from..to may span at most {} s (read_api.max_scan_span_secs), this one spans {span_secs} s",
                        max_scan_span_secs
                    ),
                ));
            }
            (
                scan_stats(db, &q, bucket, group, with_users).await?,
                "events",
            )
        }
    };
    if rows.len() as i64 > MAX_STATS_ROWS {
        return Err(QueryError::param(
            "bucket",
            "too many buckets and groups: narrow the range or use a larger bucket",
        ));
    }
    let series: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| {
            let mut v = serde_json::json!({
                "bucket": Timestamp(r.b),
                "events": r.events,
            });
            if with_users {
                v["users"] = serde_json::Value::from(r.users);
            }
            if let Some((name, _)) = group {
                v[*name] = serde_json::Value::from(r.k);
            }
            v
        })
        .collect();
    Ok(serde_json::json!({
        "bucket": bucket,
        "group_by": group.map(|(n, _)| *n),
        "source": source,
        "series": series,
    }))
}

/// Stats dimensions the PostgreSQL rollups (`event_counts.dim`) count by.
const ROLLUP_DIMS: &[&str] = &[
    "kind",
    "name",
    "country",
    "platform",
    "app_version",
    "level",
    "priority",
];

/// How a stats query is answered from the rollups.
struct RollupPlan {
    /// `event_counts.dim`.
    dim: &'static str,
    /// `event_counts.value` must equal this (a filter on that dimension).
    value: Option<String>,
    /// The group key column.
    key: &'static str,
}

/// Whether the rollups can answer exactly: whole minutes, and no filter
/// but the client and at most one dimension — the grouped one, if any.
fn rollup_plan(q: &Query, group: Option<&(&str, &str)>) -> Option<RollupPlan> {
    const MINUTE_US: i64 = 60_000_000;
    if q.from_us.is_some_and(|f| f % MINUTE_US != 0) || q.to_us.is_some_and(|t| t % MINUTE_US != 0)
    {
        return None;
    }
    let mut dim_filter = None;
    for name in q.filters.keys() {
        if name == "client_id" {
            continue;
        }
        let dim = ROLLUP_DIMS.iter().find(|d| **d == name)?;
        if dim_filter.replace(*dim).is_some() {
            return None;
        }
    }
    let value = dim_filter.and_then(|d| q.filters.get(d).cloned());
    match (group.map(|(n, _)| *n), dim_filter) {
        (None, f) => Some(RollupPlan {
            dim: f.unwrap_or(""),
            value,
            key: "NULL::text",
        }),
        (Some("client"), f) => Some(RollupPlan {
            dim: f.unwrap_or(""),
            value,
            key: "client_id",
        }),
        (Some(g), f) if f.is_none_or(|f| f == g) => Some(RollupPlan {
            dim: ROLLUP_DIMS.iter().find(|d| **d == g)?,
            value,
            key: "value",
        }),
        _ => None,
    }
}

async fn rollup_stats(
    pool: &sqlx::PgPool,
    plan: &RollupPlan,
    q: &Query,
    bucket: &str,
) -> Result<Vec<StatsRow>, QueryError> {
    // `m` and `key` come from fixed lists, never from input.
    let m = bucket_micros(bucket) / 60_000_000;
    let mut sql = QueryBuilder::<sqlx::Postgres>::new(format!(
        "SELECT (minute / {m}) * {m} * 60000 AS b, {} AS k, sum(events)::int8 AS events, \
         0::int8 AS users FROM event_counts WHERE dim = ",
        plan.key
    ));
    sql.push_bind(plan.dim);
    if let Some(v) = &plan.value {
        sql.push(" AND value = ").push_bind(v.clone());
    }
    if let Some(c) = q.filters.get("client_id") {
        sql.push(" AND client_id = ").push_bind(c.clone());
    }
    if let Some(f) = q.from_us {
        sql.push(" AND minute >= ").push_bind(f / 60_000_000);
    }
    if let Some(t) = q.to_us {
        sql.push(" AND minute < ").push_bind(t / 60_000_000);
    }
    sql.push(" GROUP BY 1, 2 ORDER BY 1, 2 LIMIT ")
        .push_bind(MAX_STATS_ROWS + 1);
    sql.build_query_as()
        .fetch_all(pool)
        .await
        .map_err(unavailable)
}

/// Stats from the events themselves (SQLite; distinct users; filters the
/// rollups do not keep).
async fn scan_stats(
    db: &Db,
    q: &Query,
    bucket: &str,
    group: Option<&(&str, &str)>,
    with_users: bool,
) -> Result<Vec<StatsRow>, QueryError> {
    // `bucket` and `column` come from the fixed lists above, never from input.
    let d = dialect(db);
    let column = group.map_or(d.null_text, |(_, c)| c);
    let bucket_ms = match db {
        Db::Postgres(_) => format!(
            "(extract(epoch from date_trunc('{bucket}', ts AT TIME ZONE 'UTC')) * 1000)::int8"
        ),
        Db::Sqlite(_) => {
            let us = bucket_micros(bucket);
            format!("(ts_us / {us}) * {us} / 1000")
        }
    };
    let users = if with_users {
        "count(DISTINCT user_id)"
    } else {
        "0"
    };
    let int8 = d.int8;
    let select = format!(
        "SELECT {bucket_ms} AS b, {column} AS k, count(*){int8} AS events, {users}{int8} AS users \
         FROM events WHERE true"
    );
    match db {
        Db::Postgres(p) => {
            let mut sql = stats_sql::<sqlx::Postgres>(select, d, q);
            sql.build_query_as().fetch_all(p).await
        }
        Db::Sqlite(p) => {
            let mut sql = stats_sql::<sqlx::Sqlite>(select, d, q);
            sql.build_query_as().fetch_all(p).await
        }
    }
    .map_err(unavailable)
}

/// One row of a stats answer.
#[derive(sqlx::FromRow)]
struct StatsRow {
    b: i64,
    k: Option<String>,
    events: i64,
    users: i64,
}

fn bucket_micros(bucket: &str) -> i64 {
    match bucket {
        "minute" => 60_000_000,
        "day" => 86_400_000_000,
        _ => 3_600_000_000,
    }
}

fn unavailable(e: sqlx::Error) -> QueryError {
    // 57014: cut off by `statement_timeout` (read_api.statement_timeout_ms).
    if let sqlx::Error::Database(d) = &e
        && d.code().as_deref() == Some("57014")
    {
        return QueryError(
            ErrorCode::DependencyUnavailable,
            "the query ran past read_api.statement_timeout_ms and was cancelled (statement timeout): narrow it, or retry when the database is less busy".into(),
        );
    }
    QueryError(ErrorCode::DependencyUnavailable, e.to_string())
}

fn stats_sql<'a, DB: Database>(select: String, d: &Dialect, q: &Query) -> QueryBuilder<'a, DB>
where
    String: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
    DB::Arguments<'a>: Default,
{
    let mut sql = QueryBuilder::new(select);
    push_filters(&mut sql, d, q);
    sql.push(" GROUP BY 1, 2 ORDER BY 1, 2 LIMIT ")
        .push_bind(MAX_STATS_ROWS + 1);
    sql
}

/// Signs and checks cursors.
pub struct CursorKey(Vec<u8>);

impl CursorKey {
    /// A key derived from a server secret (domain-separated).
    pub fn derive(secret: &[u8]) -> CursorKey {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("any key length"));
        m.update(b"outpost query cursor v1");
        CursorKey(m.finalize().into_bytes().to_vec())
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("any key length"))
    }

    fn seal(&self, c: &CursorBody) -> String {
        let body = serde_json::to_vec(c).unwrap_or_default();
        let mut m = self.mac();
        m.update(&body);
        format!(
            "{}.{}",
            B64.encode(&body),
            B64.encode(m.finalize().into_bytes())
        )
    }

    fn open(&self, s: &str) -> Option<CursorBody> {
        let (body, tag) = s.split_once('.')?;
        let body = B64.decode(body).ok()?;
        let tag = B64.decode(tag).ok()?;
        let mut m = self.mac();
        m.update(&body);
        m.verify_slice(&tag).ok()?;
        serde_json::from_slice(&body).ok()
    }
}

/// What a cursor belongs to: the query's filters, range and order. The
/// page size is not part of it: a client may ask for larger or smaller
/// pages as it goes (README, "Reading events").
fn digest(q: &Query) -> String {
    use sha2::Digest as _;
    let mut without_limit = q.clone();
    without_limit.limit = 0;
    hex::encode(&Sha256::digest(serde_json::to_vec(&without_limit).unwrap_or_default())[..12])
}

/// Every permission the read API checks, as (action, resource).
const READ_API_GRANTS: &[(&str, &str)] =
    &[("read", "events"), ("read", "stats"), ("admin", "events")];

/// Who is asking, from `Authorization: Bearer …` (API key or JWT). For a
/// JWT the answer's permissions are those the client record and the token
/// both grant.
pub async fn caller(
    store: &ClientStore,
    authorization: Option<&str>,
    now_ms: i64,
) -> Result<ClientRecord, QueryError> {
    let token = authorization
        .and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| {
            QueryError(
                ErrorCode::MissingCredentials,
                "send Authorization: Bearer <API key or JWT>".into(),
            )
        })?;
    let unknown = || QueryError(ErrorCode::UnknownKey, "unknown key".into());
    let lookup = |id: String| async move {
        store
            .get(&id)
            .await
            .map_err(|e| {
                let message = e.to_string();
                QueryError(ErrorCode::from(e), message)
            })?
            .ok_or_else(unknown)
    };
    let now = Timestamp(now_ms);
    let record = if token.starts_with(api_key::PREFIX) {
        let id = api_key::client_id(token).ok_or_else(unknown)?;
        let record = lookup(id.to_owned()).await?;
        if record.method != AuthMethod::ApiKey
            || !record
                .api_key_hashes(now)
                .any(|h| api_key::verify(token, h))
        {
            return Err(QueryError(
                ErrorCode::InvalidSignature,
                "the API key does not verify".into(),
            ));
        }
        record
    } else {
        let id = jwt::token_key_id(token)
            .ok_or_else(|| QueryError(ErrorCode::MalformedToken, "no kid in the token".into()))?;
        let mut record = lookup(id).await?;
        let policy = record.jwt.clone().unwrap_or_default();
        let mut result = Err(ErrorCode::UnknownKey);
        for k in record.jwt_keys(now) {
            result = jwt::verify(token, &k, &policy, now_ms / 1000);
            if result.is_ok() {
                break;
            }
        }
        let verified = result.map_err(|c| QueryError(c, c.message().into()))?;
        // A token speaks for a user of the client: it may do what both the
        // client record and the token's own permissions allow.
        record.permissions = Permissions::parse(
            READ_API_GRANTS
                .iter()
                .filter(|(a, r)| {
                    record.permissions.allows(a, r) && verified.permissions.allows(a, r)
                })
                .map(|(a, r)| match (*a, *r) {
                    ("read", "events") => "read:events",
                    ("read", "stats") => "read:stats",
                    _ => "admin:events",
                }),
        )
        .unwrap_or_default();
        record
    };
    record
        .usable_at(now)
        .map_err(|c| QueryError(c, c.message().into()))?;
    Ok(record)
}

/// One page of events, as JSON.
pub async fn events_page(
    db: &Db,
    key: &CursorKey,
    who: &ClientRecord,
    params: &[(String, String)],
) -> Result<serde_json::Value, QueryError> {
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
    let data: Vec<serde_json::Value> = rows.into_iter().map(row_json).collect();
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
    let mut page = serde_json::json!({
        "data": data,
        "has_next": has_next && !keys.is_empty(),
        "has_prev": has_prev && !keys.is_empty(),
        "next": keys.last().filter(|_| has_next).map(|k| seal(k, true)),
        "prev": keys.first().filter(|_| has_prev).map(|k| seal(k, false)),
    });
    if options.total {
        let (total, estimated) = total(db, d, &q).await?;
        page["total"] = serde_json::Value::from(total);
        page["total_estimated"] = serde_json::Value::from(estimated);
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
struct EventRow {
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

fn row_json(r: EventRow) -> serde_json::Value {
    let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap_or_default();
    let mut v = serde_json::json!({
        "event_id": r.event_id,
        "client_id": r.client_id,
        "timestamp": Timestamp(r.ts_us / 1000),
        "received_at": Timestamp(r.received_ms),
        "kind": r.kind,
        "priority": r.priority,
        "properties": json(&r.properties),
        "context": json(&r.context),
    });
    if let Some(obj) = v.as_object_mut() {
        for (col, value) in [
            ("name", r.name),
            ("message", r.message),
            ("level", r.level),
            ("user_id", r.user_id),
            ("anonymous_id", r.anonymous_id),
            ("session_id", r.session_id),
            ("trace_id", r.trace_id),
            ("span_id", r.span_id),
            ("country", r.country),
            ("region", r.region),
            ("city", r.city),
        ] {
            if let Some(s) = value {
                obj.insert(col.into(), s.into());
            }
        }
        if let Some(s) = r.seq {
            obj.insert("seq".into(), s.into());
        }
        if let Some(a) = r.asn {
            obj.insert("asn".into(), a.into());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_table() {
        let ok = parse_query(&params(&[
            ("name", "checkout"),
            ("from", "2026-11-25"),
            ("to", "2026-11-26"),
            ("order", "asc"),
            ("limit", "10"),
        ]))
        .unwrap()
        .0;
        assert_eq!(ok.filters["name"], "checkout");
        assert_eq!(
            ok.to_us.unwrap() - ok.from_us.unwrap(),
            2 * 86_400_000_000,
            "a `to` day includes that day"
        );
        assert!(ok.asc);
        let rfc = parse_query(&params(&[("from", "2026-11-25T12:00:00+01:00")]))
            .unwrap()
            .0;
        assert_eq!(
            rfc.from_us,
            Some(1_795_604_400_000_000),
            "2026-11-25T11:00:00Z"
        );
        for (bad, field) in [
            (vec![("colour", "red")], "colour"),
            (vec![("limit", "0")], "limit"),
            (vec![("limit", "1001")], "limit"),
            (vec![("order", "up")], "order"),
            (vec![("from", "yesterday")], "from"),
            (vec![("name", "")], "name"),
            (vec![("name", "a"), ("name", "b")], "name"),
            (vec![("kind", "metric")], "kind"),
            (vec![("level", "banana")], "level"),
            (vec![("priority", "urgent")], "priority"),
            (
                vec![("trace_id", "4BF92F3577B34DA6A3CE929D0E0E4736")],
                "trace_id",
            ),
            (vec![("trace_id", "xyz")], "trace_id"),
            (vec![("country", "de")], "country"),
            (vec![("client_id", "Not A Client")], "client_id"),
        ] {
            let err = parse_query(&params(&bad)).unwrap_err();
            assert_eq!(err.0, ErrorCode::InvalidQueryParameter);
            assert!(err.1.starts_with(field), "{err:?}");
        }
    }

    #[test]
    fn cursors_refuse_tampering_and_other_keys() {
        let key = CursorKey::derive(b"secret");
        let c = key.seal(&CursorBody {
            ts: 5,
            id: 7,
            forward: true,
            q: "abc".into(),
        });
        assert_eq!(key.open(&c).map(|b| (b.ts, b.id)), Some((5, 7)));
        let mut tampered = c.clone().into_bytes();
        tampered[3] ^= 1;
        assert!(key.open(&String::from_utf8_lossy(&tampered)).is_none());
        assert!(CursorKey::derive(b"other").open(&c).is_none());
        assert!(key.open("garbage").is_none());
    }
}
