//! Where the two databases' SQL differs, the filters every query shares,
//! and what a database error means to the caller.

use outpost_shared::ErrorCode;
use sqlx::{Database, Encode, QueryBuilder, Type};

use super::QueryError;
use super::params::{Query, TEXT_FILTERS};
use crate::db::Db;

/// Where the two databases' SQL differs. Everything else is the same text.
pub(super) struct Dialect {
    /// The time column as stored (`timestamptz` or integer µs).
    pub(super) ts: &'static str,
    /// Turns a bound integer of microseconds into a value comparable to `ts`.
    pub(super) micros: (&'static str, &'static str),
    /// The event columns of a page, named as [`EventRow`] expects.
    pub(super) columns: &'static str,
    /// A typed NULL (the group column when there is no group).
    pub(super) null_text: &'static str,
    /// Cast of an aggregate to a 64-bit integer.
    pub(super) int8: &'static str,
}

pub(super) const POSTGRES: Dialect = Dialect {
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

pub(super) const SQLITE: Dialect = Dialect {
    ts: "ts_us",
    micros: ("(", ")"),
    columns: "id, ts_us, client_id, event_id, kind, name, message, level, user_id, anonymous_id, \
              session_id, properties, context, trace_id, span_id, seq, priority, received_ms, \
              country, region, city, asn",
    null_text: "NULL",
    int8: "",
};

pub(super) fn dialect(db: &Db) -> &'static Dialect {
    match db {
        Db::Postgres(_) => &POSTGRES,
        Db::Sqlite(_) => &SQLITE,
    }
}

/// `AND column = $n …` for the filters and time range, all bound.
pub(super) fn push_filters<'a, DB: Database>(sql: &mut QueryBuilder<'a, DB>, d: &Dialect, q: &Query)
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

pub(super) fn unavailable(e: sqlx::Error) -> QueryError {
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
