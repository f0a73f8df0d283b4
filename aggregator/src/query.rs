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
use sqlx::{PgPool, QueryBuilder, Row as _};

use crate::clients::ClientStore;

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
            if q.filters.insert(name.to_owned(), v.to_owned()).is_some() {
                return Err(QueryError::param(name, "given twice"));
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn parse_query(params: &[(String, String)]) -> Result<(Query, Option<String>), QueryError> {
    let mut q = Query {
        filters: BTreeMap::new(),
        from_us: None,
        to_us: None,
        asc: false,
        limit: DEFAULT_LIMIT,
    };
    let mut cursor = None;
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
            "cursor" => cursor = Some(v.clone()),
            other => return Err(QueryError::param(other, "unknown parameter")),
        }
    }
    Ok((q, cursor))
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

/// `AND column = $n …` for the filters and time range, all bound.
fn push_filters(sql: &mut QueryBuilder<'_, sqlx::Postgres>, q: &Query) {
    for (name, column) in TEXT_FILTERS {
        if let Some(v) = q.filters.get(*name) {
            sql.push(format_args!(" AND {column} = "))
                .push_bind(v.clone());
        }
    }
    if let Some(f) = q.from_us {
        sql.push(" AND ts >= to_timestamp(")
            .push_bind(f as f64 / 1e6)
            .push(")");
    }
    if let Some(t) = q.to_us {
        sql.push(" AND ts < to_timestamp(")
            .push_bind(t as f64 / 1e6)
            .push(")");
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

/// `GET /v1/stats`: events and distinct users per time bucket, optionally
/// grouped by one dimension, with the same filters as `/v1/events`. Without
/// `from`, the last 24 hours.
pub async fn stats(
    pool: &PgPool,
    who: &ClientRecord,
    params: &[(String, String)],
    now_ms: i64,
) -> Result<serde_json::Value, QueryError> {
    if !who.permissions.allows("read", "stats") {
        return Err(QueryError(
            ErrorCode::PermissionDenied,
            "needs read:stats".into(),
        ));
    }
    let mut q = Query {
        filters: BTreeMap::new(),
        from_us: None,
        to_us: None,
        asc: true,
        limit: 0,
    };
    let (mut bucket, mut group) = ("hour", None);
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
    scope_to_caller(&mut q, who)?;
    q.from_us
        .get_or_insert(now_ms.saturating_sub(86_400_000) * 1000);
    // `bucket` and `column` come from the fixed lists above, never from input.
    let column = group.map_or("NULL::text", |(_, c)| c);
    let mut sql = QueryBuilder::<sqlx::Postgres>::new(format!(
        "SELECT (extract(epoch from date_trunc('{bucket}', ts AT TIME ZONE 'UTC')) * 1000)::int8 AS b, {column} AS k, \
         count(*)::int8 AS events, count(DISTINCT user_id)::int8 AS users FROM events WHERE true"
    ));
    push_filters(&mut sql, &q);
    sql.push(" GROUP BY 1, 2 ORDER BY 1, 2 LIMIT ")
        .push_bind(MAX_STATS_ROWS + 1);
    let rows = sql
        .build()
        .fetch_all(pool)
        .await
        .map_err(|e| QueryError(ErrorCode::DependencyUnavailable, e.to_string()))?;
    if rows.len() as i64 > MAX_STATS_ROWS {
        return Err(QueryError::param(
            "bucket",
            "too many buckets and groups: narrow the range or use a larger bucket",
        ));
    }
    let series: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::json!({
                "bucket": Timestamp(r.get::<i64, _>("b")),
                "events": r.get::<i64, _>("events"),
                "users": r.get::<i64, _>("users"),
            });
            if let Some((name, _)) = group {
                v[*name] = serde_json::Value::from(r.get::<Option<String>, _>("k"));
            }
            v
        })
        .collect();
    Ok(serde_json::json!({"bucket": bucket, "group_by": group.map(|(n, _)| *n), "series": series}))
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
    pool: &PgPool,
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
    let (mut q, cursor) = parse_query(params)?;
    scope_to_caller(&mut q, who)?;
    let qd = digest(&q);
    let cursor = match cursor {
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

    let mut sql = QueryBuilder::<sqlx::Postgres>::new(
        "SELECT id, (extract(epoch from ts) * 1000000)::int8 AS ts_us, client_id, event_id, kind, name, message, level, \
         user_id, anonymous_id, session_id, properties, context, trace_id, span_id, seq, priority, \
         (extract(epoch from received_at) * 1000)::int8 AS received_ms, country, region, city, asn FROM events WHERE true",
    );
    push_filters(&mut sql, &q);
    if let Some(c) = &cursor {
        // A row comparison on (ts, id) uses the (…, ts, id) indexes; the
        // cursor's microseconds are added to the epoch exactly.
        let op = if asc { ">" } else { "<" };
        sql.push(format_args!(" AND (ts, id) {op} ('epoch'::timestamptz + ("))
            .push_bind(c.ts)
            .push("::int8 * interval '1 microsecond'), ")
            .push_bind(c.id)
            .push(")");
    }
    let dir = if asc { "ASC" } else { "DESC" };
    sql.push(format_args!(" ORDER BY ts {dir}, id {dir} LIMIT "))
        .push_bind(q.limit + 1);
    let mut rows = sql
        .build()
        .fetch_all(pool)
        .await
        .map_err(|e| QueryError(ErrorCode::DependencyUnavailable, e.to_string()))?;
    let more = rows.len() as i64 > q.limit;
    rows.truncate(q.limit as usize);
    if !forward {
        rows.reverse();
    }
    let keys: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| (r.get::<i64, _>("ts_us"), r.get::<i64, _>("id")))
        .collect();
    let data: Vec<serde_json::Value> = rows.iter().map(row_json).collect();
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
    Ok(serde_json::json!({
        "data": data,
        "has_next": has_next && !keys.is_empty(),
        "has_prev": has_prev && !keys.is_empty(),
        "next": keys.last().filter(|_| has_next).map(|k| seal(k, true)),
        "prev": keys.first().filter(|_| has_prev).map(|k| seal(k, false)),
    }))
}

fn row_json(r: &sqlx::postgres::PgRow) -> serde_json::Value {
    let ts_us: i64 = r.get("ts_us");
    let received_ms: i64 = r.get("received_ms");
    let mut v = serde_json::json!({
        "event_id": r.get::<String, _>("event_id"),
        "client_id": r.get::<String, _>("client_id"),
        "timestamp": Timestamp(ts_us / 1000),
        "received_at": Timestamp(received_ms),
        "kind": r.get::<String, _>("kind"),
        "priority": r.get::<String, _>("priority"),
        "properties": r.get::<serde_json::Value, _>("properties"),
        "context": r.get::<serde_json::Value, _>("context"),
    });
    if let Some(obj) = v.as_object_mut() {
        for col in [
            "name",
            "message",
            "level",
            "user_id",
            "anonymous_id",
            "session_id",
            "trace_id",
            "span_id",
            "country",
            "region",
            "city",
        ] {
            if let Some(s) = r.get::<Option<String>, _>(col) {
                obj.insert(col.into(), s.into());
            }
        }
        if let Some(s) = r.get::<Option<i64>, _>("seq") {
            obj.insert("seq".into(), s.into());
        }
        if let Some(a) = r.get::<Option<i64>, _>("asn") {
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
