//! `GET /v1/stats`: events (and distinct users) per time bucket, grouped
//! by at most one dimension. Counts come from PostgreSQL's per-minute
//! rollups (`event_counts`) and distinct users from its hourly sketches
//! (`user_sketches`, see `sinks::postgres::users`) when they can answer;
//! otherwise both come from the rows, within a bounded time span.

use std::collections::BTreeMap;

use outpost_shared::ErrorCode;
use outpost_shared::client::ClientRecord;
use outpost_shared::event::Timestamp;
use serde::Serialize;
use sqlx::{Database, Encode, QueryBuilder, Type};
use utoipa::ToSchema;

use super::QueryError;
use super::params::{Query, parse_stats, scope_to_caller};
use super::sql::{Dialect, dialect, push_filters, unavailable};
use crate::config::ReadApiConfig;
use crate::db::Db;
use crate::sinks::postgres::{DIMENSIONS, users};

/// One point of `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsPoint {
    /// Start of the bucket (RFC 3339, UTC).
    #[schema(value_type = String)]
    pub bucket: Timestamp,
    /// Events in it.
    pub events: i64,
    /// With `users=true`: distinct user ids in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<i64>,
    /// With `group_by`: the group's value, under the dimension's name
    /// (`name`, `kind`, `country`, `platform`, `app_version`, `client`,
    /// `level` or `priority`); null for events without one.
    #[serde(flatten)]
    #[schema(required = false)]
    pub group: BTreeMap<String, Option<String>>,
}

/// The answer of `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsAnswer {
    /// `minute`, `hour` or `day`.
    pub bucket: &'static str,
    /// The grouped dimension, or null.
    pub group_by: Option<&'static str>,
    /// `rollup` (PostgreSQL's per-minute counts) or `events` (the rows).
    pub source: &'static str,
    /// The points, by bucket, then by group in byte order.
    pub series: Vec<StatsPoint>,
    /// The request id.
    pub request_id: String,
}

/// Most rows (buckets × groups) one stats answer may hold.
pub const MAX_STATS_ROWS: i64 = 10_000;

/// The stats answer (its `request_id` is the handler's to fill in):
/// events and distinct users per time bucket, optionally
/// grouped by one dimension, with the same filters as `/v1/events`. Without
/// `from`, the last 24 hours.
///
/// A query the rollups and sketches cannot answer reads rows: its
/// `to - from` may be at most `max_scan_span_secs`, and on PostgreSQL the
/// events it reads at most `max_scan_events` (`40019` beyond either).
pub async fn stats(
    db: &Db,
    who: &ClientRecord,
    params: &[(String, String)],
    now_ms: i64,
    limits: &ReadApiConfig,
) -> Result<StatsAnswer, QueryError> {
    if !who.permissions.allows("read", "stats") {
        return Err(QueryError(
            ErrorCode::PermissionDenied,
            "needs read:stats".into(),
        ));
    }
    let (mut q, bucket, group, with_users) = parse_stats(params)?;
    scope_to_caller(&mut q, who)?;
    // The last 24 hours, from the start of that hour (of that minute with
    // minute buckets), so that the first bucket is whole.
    let unit_ms = if bucket == "minute" {
        60_000
    } else {
        3_600_000
    };
    q.from_us
        .get_or_insert((now_ms.saturating_sub(86_400_000) / unit_ms) * unit_ms * 1000);
    let series = match (db, rollup_plan(&q, group)) {
        (Db::Postgres(p), Some(plan)) if !with_users => {
            Some(rollup_stats(p, &plan, &q, bucket).await?)
        }
        (Db::Postgres(p), Some(plan)) => match sketch_hours(p, &q, bucket).await? {
            Some((from_hour, to_hour)) => {
                let mut rows = rollup_stats(p, &plan, &q, bucket).await?;
                let users = users::users_per_bucket(
                    p,
                    &users::UsersQuery {
                        dim: plan.dim,
                        value: plan.value.as_deref(),
                        client: q.filters.get("client_id").map(String::as_str),
                        by_client: plan.key == "client_id",
                        by_value: plan.key == "value",
                        from_hour: Some(from_hour),
                        to_hour,
                        bucket_hours: if bucket == "day" { 24 } else { 1 },
                        max_points: MAX_STATS_ROWS as usize,
                    },
                )
                .await
                .map_err(unavailable)?;
                for r in &mut rows {
                    r.users = users.get(&(r.b, r.k.clone())).copied().unwrap_or(0);
                }
                Some(rows)
            }
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
            if span_secs > limits.max_scan_span_secs {
                return Err(QueryError(
                    ErrorCode::QueryRangeTooLarge,
                    format!(
                        "this query reads every matching event (a filter the per-minute counts cannot answer, or distinct users the hourly sketches cannot): its from..to may span at most {} s (read_api.max_scan_span_secs), this one spans {span_secs} s",
                        limits.max_scan_span_secs
                    ),
                ));
            }
            if let Db::Postgres(p) = db
                && limits.max_scan_events > 0
                && let Some(events) = scan_bound(p, &q, to).await?
                && events > limits.max_scan_events
            {
                return Err(QueryError(
                    ErrorCode::QueryRangeTooLarge,
                    format!(
                        "this query reads every matching event (a filter the per-minute counts cannot answer, or distinct users the hourly sketches cannot), and the per-minute counts say it would read {events} of them: at most {} may be read (read_api.max_scan_events); narrow from..to",
                        limits.max_scan_events
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
    let series = rows
        .into_iter()
        .map(|r| StatsPoint {
            bucket: Timestamp(r.b),
            events: r.events,
            users: with_users.then_some(r.users),
            group: group
                .map(|(name, _)| BTreeMap::from([((*name).to_owned(), r.k)]))
                .unwrap_or_default(),
        })
        .collect();
    Ok(StatsAnswer {
        bucket,
        group_by: group.map(|(n, _)| *n),
        source,
        series,
        request_id: String::new(),
    })
}

/// At most how many events a row scan of `q` (up to `to_us`) reads, as the
/// per-minute counts tell: the events of its minutes (rounded outwards)
/// under its most selective filter on a dimension they count by, or all of
/// them. `None` when a filter on a user or a session picks the rows through
/// that column's own index (few rows, and no count of them is kept).
async fn scan_bound(pool: &sqlx::PgPool, q: &Query, to_us: i64) -> Result<Option<u64>, QueryError> {
    if q.filters.contains_key("user_id") || q.filters.contains_key("session_id") {
        return Ok(None);
    }
    const MINUTE_US: i64 = 60_000_000;
    let from_minute = q.from_us.unwrap_or(0).div_euclid(MINUTE_US);
    let to_minute = to_us.div_euclid(MINUTE_US) + 1;
    let mut dims: Vec<(&str, Option<&String>)> = ROLLUP_DIMS
        .iter()
        .filter_map(|d| Some((*d, Some(q.filters.get(*d)?))))
        .collect();
    if dims.is_empty() {
        dims.push(("", None));
    }
    let mut bound = u64::MAX;
    for (dim, value) in dims {
        let mut sql = QueryBuilder::<sqlx::Postgres>::new(
            "SELECT coalesce(sum(events), 0)::int8 FROM event_counts WHERE ",
        );
        push_counts_where(
            &mut sql,
            dim,
            value.cloned(),
            q,
            Some(from_minute),
            Some(to_minute),
        );
        let events: i64 = sql
            .build_query_scalar()
            .fetch_one(pool)
            .await
            .map_err(unavailable)?;
        bound = bound.min(u64::try_from(events).unwrap_or(0));
    }
    Ok(Some(bound))
}

/// Whether the user sketches can answer distinct users over `q`'s range
/// in `bucket`s: hour or day buckets, `from` and `to` on whole hours, and
/// no earlier than the sketches are complete (`user_sketches_since`).
/// Returns the hours to read.
async fn sketch_hours(
    pool: &sqlx::PgPool,
    q: &Query,
    bucket: &str,
) -> Result<Option<(i64, Option<i64>)>, QueryError> {
    const HOUR_US: i64 = 3_600_000_000;
    let Some(from) = q.from_us else {
        return Ok(None);
    };
    if bucket == "minute" || from % HOUR_US != 0 || q.to_us.is_some_and(|t| t % HOUR_US != 0) {
        return Ok(None);
    }
    let since = users::complete_since(pool).await.map_err(unavailable)?;
    let from_hour = from.div_euclid(HOUR_US);
    Ok(since
        .is_some_and(|s| from_hour >= s)
        .then(|| (from_hour, q.to_us.map(|t| t.div_euclid(HOUR_US)))))
}

/// Stats dimensions the PostgreSQL rollups (`event_counts.dim`) count by:
/// the sink's dimensions but '' (all of a client's events).
const ROLLUP_DIMS: &[&str] = match DIMENSIONS.as_slice().split_first() {
    Some((_, rest)) => rest,
    None => &[],
};

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
         0::int8 AS users FROM event_counts WHERE ",
        plan.key
    ));
    push_counts_where(
        &mut sql,
        plan.dim,
        plan.value.clone(),
        q,
        q.from_us.map(|f| f / 60_000_000),
        q.to_us.map(|t| t / 60_000_000),
    );
    sql.push(" GROUP BY 1, 2 ORDER BY 1, 2 LIMIT ")
        .push_bind(MAX_STATS_ROWS + 1);
    sql.build_query_as()
        .fetch_all(pool)
        .await
        .map_err(unavailable)
}

/// The `event_counts` rows of one dimension (and value), of `q`'s client
/// if it names one, in minutes `from_minute..to_minute`.
fn push_counts_where(
    sql: &mut QueryBuilder<'_, sqlx::Postgres>,
    dim: &'static str,
    value: Option<String>,
    q: &Query,
    from_minute: Option<i64>,
    to_minute: Option<i64>,
) {
    sql.push("dim = ").push_bind(dim);
    if let Some(v) = value {
        sql.push(" AND value = ").push_bind(v);
    }
    if let Some(c) = q.filters.get("client_id") {
        sql.push(" AND client_id = ").push_bind(c.clone());
    }
    if let Some(f) = from_minute {
        sql.push(" AND minute >= ").push_bind(f);
    }
    if let Some(t) = to_minute {
        sql.push(" AND minute < ").push_bind(t);
    }
}

/// Stats from the events themselves (SQLite; distinct users per minute or
/// before the sketches began; filters the
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
