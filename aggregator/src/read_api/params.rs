//! Query strings into a [`Query`]: the filters both endpoints share, each
//! endpoint's own parameters, and their description for `/openapi.json`.

use std::collections::BTreeMap;

use outpost_shared::ErrorCode;
use outpost_shared::client::ClientRecord;
use outpost_shared::event::Timestamp;
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use super::QueryError;
use super::cursor::{CursorKey, digest};

/// Largest page.
pub const MAX_LIMIT: i64 = 1000;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 50;

pub(super) const TEXT_FILTERS: &[(&str, &str)] = &[
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

/// The parsed query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Query {
    pub(super) filters: BTreeMap<String, String>,
    pub(super) from_us: Option<i64>,
    pub(super) to_us: Option<i64>,
    pub(super) asc: bool,
    pub(super) limit: i64,
}

pub(super) fn parse_time(name: &str, v: &str, end_of_day: bool) -> Result<i64, QueryError> {
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
pub(super) fn common_param(q: &mut Query, k: &str, v: &str) -> Result<bool, QueryError> {
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
pub(super) fn check_filter_value(name: &str, v: &str) -> Result<(), QueryError> {
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
pub(super) struct PageOptions {
    /// The cursor of a previous page.
    pub(super) cursor: Option<String>,
    /// Count the matching rows too (bounded, see [`MAX_EXACT_TOTAL`]).
    pub(super) total: bool,
}

pub(super) fn parse_query(params: &[(String, String)]) -> Result<(Query, PageOptions), QueryError> {
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
pub(super) fn scope_to_caller(q: &mut Query, who: &ClientRecord) -> Result<(), QueryError> {
    if who.permissions.allows("admin", "events") {
        return Ok(());
    }
    match q.filters.get("client_id") {
        Some(c) if c != who.id.as_str() => Err(QueryError(
            ErrorCode::PermissionDenied,
            "only admin:events reads other clients".into(),
        )),
        _ => {
            q.filters.insert("client_id".into(), who.id.to_string());
            Ok(())
        }
    }
}

pub(super) const GROUPS: &[(&str, &str)] = &[
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
pub(super) type StatsQuery = (
    Query,
    &'static str,
    Option<&'static (&'static str, &'static str)>,
    bool,
);

pub(super) fn parse_stats(params: &[(String, String)]) -> Result<StatsQuery, QueryError> {
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

/// The filters `GET /v1/events` and `GET /v1/stats` share.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilterParams {
    /// `event` or `log`.
    pub kind: Option<String>,
    /// Event name.
    pub name: Option<String>,
    /// User id.
    pub user_id: Option<String>,
    /// Session id.
    pub session_id: Option<String>,
    /// App version.
    pub app_version: Option<String>,
    /// `normal` or `high`.
    pub priority: Option<String>,
    /// Log level.
    pub level: Option<String>,
    /// Country code.
    pub country: Option<String>,
    /// Client id (other clients need `admin:events`).
    pub client_id: Option<String>,
    /// W3C trace id.
    pub trace_id: Option<String>,
}

/// Parameters of `GET /v1/events` (with [`FilterParams`]).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Inclusive start: RFC 3339 or `YYYY-MM-DD`.
    pub from: Option<String>,
    /// Exclusive end: RFC 3339, or `YYYY-MM-DD` for the end of that day.
    pub to: Option<String>,
    /// `desc` (default) or `asc`.
    pub order: Option<String>,
    /// Page size, 1 to 1000 (default 50).
    pub limit: Option<u32>,
    /// `next` or `prev` of a previous page of the same query.
    pub cursor: Option<String>,
    /// Add `total` (exact up to 100,000 rows, else estimated).
    pub total: Option<bool>,
}

/// Parameters of `GET /v1/stats` (with [`FilterParams`]).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// `minute`, `hour` (default) or `day`, in UTC.
    pub bucket: Option<String>,
    /// `name`, `kind`, `country`, `platform`, `app_version`, `client`,
    /// `level` or `priority`.
    pub group_by: Option<String>,
    /// Add distinct users per point (on PostgreSQL estimated from hourly
    /// sketches, ~1 %; per minute, or on SQLite, counted from the rows).
    pub users: Option<bool>,
    /// Inclusive start (default: 24 hours ago).
    pub from: Option<String>,
    /// Exclusive end.
    pub to: Option<String>,
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
}
