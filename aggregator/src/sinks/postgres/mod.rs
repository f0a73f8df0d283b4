//! The PostgreSQL sink. A write is one transaction: the rows go in with
//! `COPY events FROM STDIN` (PostgreSQL's fastest way in: about 1.5 times
//! the rows per second of an `INSERT` on this table), and one upsert adds
//! them to the per-minute counts of `event_counts` (the rollups
//! `GET /v1/stats` reads), counted here from the very rows copied, so the
//! counts are exact.
//!
//! `COPY` has no `ON CONFLICT`: a write holding an event PostgreSQL already
//! has (a batch replayed after a crash, a duplicate Redis did not catch)
//! fails on the unique key, is rolled back, and is made again with the
//! slower `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING`, which
//! counts the rows it really inserted (`RETURNING`) in the same statement.
//! Both paths store the same values and count them the same way.
//!
//! `events` and `event_counts` are partitioned by day; [`partitions`]
//! keeps the days ahead and applies `retention_days`.
//!
//! Errors are sorted by SQLSTATE class into the data's fault, the
//! database's, or neither for sure ([`SinkError`]); the delivery workers
//! narrow the first and the last down to rows.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{Row, Sink, SinkError};
use crate::redacted::Redacted;

pub mod hll;
pub mod partitions;
pub mod users;

/// `[postgres]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Whether the PostgreSQL sink is on.
    pub enabled: bool,
    /// Connection URL (may hold the password; never printed).
    pub url: Redacted,
    /// Run `migrations/postgres` at start-up.
    pub migrate_on_start: bool,
    /// Connection pool size.
    pub max_connections: u32,
    /// Days of events (and their rollups) to keep, counted in whole UTC
    /// days before today; 0 keeps everything. Expired days are dropped
    /// hourly, as whole partitions.
    pub retention_days: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            enabled: true,
            url: Redacted::from("postgres://postgres@127.0.0.1:5432/outpost"),
            migrate_on_start: true,
            max_connections: 8,
            retention_days: 0,
        }
    }
}

/// Embedded migrations (`migrations/postgres`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The sink.
#[derive(Clone)]
pub struct PostgresSink {
    pool: PgPool,
    /// The distinct-user sketches of what this sink stored.
    users: std::sync::Arc<users::Users>,
}

/// The `events` columns both write paths fill, in the order they fill them.
macro_rules! columns {
    () => {
        "client_id, event_id, batch_id, edge_id, ts, received_at, kind, name, message, level, \
         user_id, anonymous_id, session_id, properties, context, app_version, platform, \
         trace_id, span_id, seq, priority, client_ip, user_agent, pop, country, \
         region, city, latitude, longitude, time_zone, asn, as_org"
    };
}

/// The fast path's first statement ([`CopyRows`] writes its rows).
const COPY: &str = concat!("COPY events (", columns!(), ") FROM STDIN (FORMAT binary)");

/// The fast path's second statement: the per-minute counts of what the
/// `COPY` stored ([`Counts`]).
const COUNT: &str = r#"
INSERT INTO event_counts (client_id, dim, minute, value, events)
SELECT c, d, m, v, n FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[])
    AS x(c, d, m, v, n)
-- One lock order for every writer (the same as INSERT's, the key's byte
-- order): concurrent writes wait, never deadlock.
ORDER BY c COLLATE "C", d COLLATE "C", m, v COLLATE "C"
ON CONFLICT ON CONSTRAINT event_counts_key DO UPDATE SET events = event_counts.events + EXCLUDED.events
"#;

/// The slow path: one statement that skips the events already stored and
/// counts the ones it inserted.
const INSERT: &str = concat!(
    "WITH inserted AS (\nINSERT INTO events (",
    columns!(),
    r#")
SELECT c, e, b::uuid, ed, to_timestamp(t / 1000.0), to_timestamp(r / 1000.0), k, n, m, l,
       u, a, s, p::jsonb, cx::jsonb, av, pl, tr, sp, sq, pr, ip::inet, ua, pop, co,
       rg, ci, la, lo, tz, asn, aso
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::text[], $8::text[],
            $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
            $16::text[], $17::text[], $18::text[], $19::text[], $20::int8[], $21::text[], $22::text[],
            $23::text[], $24::text[], $25::text[], $26::text[], $27::text[], $28::float8[], $29::float8[],
            $30::text[], $31::int8[], $32::text[])
     AS x(c, e, b, ed, t, r, k, n, m, l, u, a, s, p, cx, av, pl, tr, sp, sq, pr, ip, ua, pop, co,
          rg, ci, la, lo, tz, asn, aso)
ON CONFLICT (client_id, event_id, ts) DO NOTHING
RETURNING client_id, ts, kind, name, country, platform, app_version, level, priority
), per_minute AS (
SELECT client_id, floor(extract(epoch from ts) / 60)::int8 AS minute, kind, name, country, platform,
       app_version, level, priority, count(*) AS n
FROM inserted GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
)
INSERT INTO event_counts (client_id, dim, minute, value, events)
SELECT client_id, d.dim, minute, d.value, sum(n)
FROM per_minute,
     LATERAL (VALUES ('', NULL), ('kind', kind), ('name', name), ('country', country),
                     ('platform', platform), ('app_version', app_version), ('level', level),
                     ('priority', priority)) AS d(dim, value)
GROUP BY 1, 2, 3, 4
-- One lock order for every writer (the key's byte order): concurrent writes
-- wait, never deadlock.
ORDER BY client_id COLLATE "C", d.dim COLLATE "C", minute, d.value COLLATE "C"
ON CONFLICT ON CONSTRAINT event_counts_key DO UPDATE SET events = event_counts.events + EXCLUDED.events
"#
);

/// How much `COPY` data is gathered before it is sent (PostgreSQL reads
/// one piece while the next is written).
const COPY_CHUNK: usize = 256 * 1024;

/// What the fast path did with a write.
#[derive(Debug, PartialEq, Eq)]
enum Copied {
    /// Stored and counted.
    Stored,
    /// Nothing stored: PostgreSQL already holds one of the events (or the
    /// write holds one twice).
    Conflict,
    /// Nothing stored: a timestamp outside PostgreSQL's range, or a value
    /// longer than the binary format's length field holds (the `INSERT`
    /// then stores what it can, or reports the row's fault).
    Unsuited,
}

impl PostgresSink {
    /// Connects lazily (start-up does not wait for the database) and, if
    /// configured, runs the migrations.
    pub async fn connect(config: &PostgresConfig) -> anyhow::Result<PostgresSink> {
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_lazy(&config.url.0)?;
        let sink = PostgresSink {
            users: std::sync::Arc::new(users::Users::new(pool.clone())),
            pool,
        };
        if config.migrate_on_start {
            MIGRATOR.run(&sink.pool).await?;
        }
        Ok(sink)
    }

    /// The pool (for the query API and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The fast path: `COPY` and the counts' upsert in one transaction.
    async fn copy(&self, rows: &[Row<'_>]) -> Result<Copied, sqlx::Error> {
        let writable = |r: &Row<'_>| {
            [r.ts_ms(), r.facts.received_at.millis()]
                .into_iter()
                .all(CopyRows::writes_time)
        };
        if !rows.iter().all(writable) {
            return Ok(Copied::Unsuited);
        }
        let mut tx = self.pool.begin().await?;
        let mut copy = tx.copy_in_raw(COPY).await?;
        let mut data = CopyRows::with_capacity(COPY_CHUNK + 16 * 1024);
        for r in rows {
            if data.row(r).is_err() {
                copy.abort("a value too long for COPY").await?;
                return Ok(Copied::Unsuited);
            }
            if data.buf.len() >= COPY_CHUNK {
                copy.send(data.buf.as_slice()).await?;
                data.buf.clear();
            }
        }
        data.finish();
        copy.send(data.buf.as_slice()).await?;
        match copy.finish().await {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                tx.rollback().await?;
                return Ok(Copied::Conflict);
            }
            Err(e) => return Err(e),
        }
        Counts::of(rows)
            .bind(sqlx::query(COUNT))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Copied::Stored)
    }

    /// The slow path, for writes the fast path could not store.
    async fn insert(&self, rows: &[Row<'_>]) -> Result<(), sqlx::Error> {
        let mut cols = Columns::default();
        for r in rows {
            cols.push(r);
        }
        cols.bind(sqlx::query(INSERT)).execute(&self.pool).await?;
        Ok(())
    }
}

/// Who an error blames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    /// The row's data (SQLSTATE classes 22, 23): retrying the same row
    /// cannot help, so it is dead-lettered at once.
    Row,
    /// The server, the connection or the setup (classes 08 connection, 25
    /// and 40 transaction state/rollback, 28 and 3D/3F authorisation and
    /// missing database or schema, 42 missing table/column or privilege,
    /// 53 resources, 55 locks, 57 shutdown/cancel, 58 system; and every
    /// error that is not PostgreSQL's answer, like a refused connection or a
    /// pool timeout): retried for as long as it takes.
    Sink,
    /// Anything else (54 program limits, XX internal errors, P0 trigger
    /// exceptions, …): possibly one row's doing, so retried a bounded
    /// number of times and then narrowed down to rows.
    Unknown,
}

fn blame(e: &sqlx::Error) -> Blame {
    const SINK_CLASSES: [&str; 13] = [
        "08", "25", "28", "3D", "3F", "40", "42", "53", "55", "57", "58", "HV", "F0",
    ];
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(c) if c.starts_with("22") || c.starts_with("23") => Blame::Row,
            Some(c) if SINK_CLASSES.iter().any(|class| c.starts_with(class)) => Blame::Sink,
            _ => Blame::Unknown,
        },
        _ => Blame::Sink,
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

fn sink_error(e: &sqlx::Error) -> SinkError {
    match blame(e) {
        Blame::Row => SinkError::Rejected(e.to_string()),
        Blame::Sink => SinkError::Unavailable(e.to_string()),
        Blame::Unknown => SinkError::Refused(e.to_string()),
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn write(&self, rows: &[Row<'_>]) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        match self.copy(rows).await {
            Ok(Copied::Stored) => {}
            Ok(how) => {
                tracing::debug!(
                    rows = rows.len(),
                    ?how,
                    "COPY did not store the write; INSERT … ON CONFLICT"
                );
                self.insert(rows).await.map_err(|e| sink_error(&e))?;
            }
            Err(e) => return Err(sink_error(&e)),
        }
        // Every row is in the database now (stored by this write or an
        // earlier one): its user goes into the sketches, where a second
        // time changes nothing. Past the memory bound the write waits for
        // a flush, and a failed flush fails the write, which is retried
        // (storing nothing twice) once the database is back.
        if self.users.add(rows) {
            self.users.flush().await.map_err(|e| sink_error(&e))?;
        }
        Ok(())
    }

    async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

/// Column arrays for UNNEST.
#[derive(Default)]
struct Columns {
    client_id: Vec<String>,
    event_id: Vec<String>,
    batch_id: Vec<String>,
    edge_id: Vec<String>,
    ts: Vec<i64>,
    received_at: Vec<i64>,
    kind: Vec<&'static str>,
    name: Vec<Option<String>>,
    message: Vec<Option<String>>,
    level: Vec<Option<&'static str>>,
    user_id: Vec<Option<String>>,
    anonymous_id: Vec<Option<String>>,
    session_id: Vec<Option<String>>,
    properties: Vec<String>,
    context: Vec<String>,
    app_version: Vec<Option<String>>,
    platform: Vec<Option<String>>,
    trace_id: Vec<Option<String>>,
    span_id: Vec<Option<String>>,
    seq: Vec<Option<i64>>,
    priority: Vec<&'static str>,
    client_ip: Vec<Option<String>>,
    user_agent: Vec<Option<String>>,
    pop: Vec<Option<String>>,
    country: Vec<Option<String>>,
    region: Vec<Option<String>>,
    city: Vec<Option<String>>,
    latitude: Vec<Option<f64>>,
    longitude: Vec<Option<f64>>,
    time_zone: Vec<Option<String>>,
    asn: Vec<Option<i64>>,
    as_org: Vec<Option<String>>,
    last_batch: Option<outpost_shared::frame::BatchId>,
}

impl Columns {
    fn push(&mut self, r: &Row<'_>) {
        let e = r.event;
        self.client_id.push(r.client_id.to_string());
        self.event_id.push(e.event_id.to_string());
        // Rows of one batch are adjacent: format its id once.
        match self.batch_id.last() {
            Some(prev) if self.last_batch == Some(*r.batch_id) => {
                let prev = prev.clone();
                self.batch_id.push(prev);
            }
            _ => {
                self.batch_id.push(r.batch_id.to_string());
                self.last_batch = Some(*r.batch_id);
            }
        }
        self.edge_id.push(r.edge_id.to_owned());
        self.ts.push(r.ts_ms());
        self.received_at.push(r.facts.received_at.millis());
        self.kind.push(e.kind.as_str());
        self.name.push(e.name.clone());
        self.message.push(e.message.clone());
        self.level.push(e.level.map(|l| l.as_str()));
        self.user_id.push(e.user_id.clone());
        self.anonymous_id.push(e.anonymous_id.clone());
        self.session_id.push(e.session_id.clone());
        self.properties.push(r.properties_json().to_owned());
        self.context.push(r.context_json());
        self.app_version.push(e.context.app_version.clone());
        self.platform.push(e.context.platform.clone());
        self.trace_id.push(e.trace_id.clone());
        self.span_id.push(e.span_id.clone());
        self.seq.push(r.seq());
        self.priority.push(e.priority.as_str());
        self.client_ip.push(r.client_ip().map(str::to_owned));
        self.user_agent.push(r.facts.user_agent.clone());
        self.pop.push(r.facts.pop.clone());
        self.country.push(r.country().map(str::to_owned));
        let g = r.geo;
        self.region.push(g.and_then(|g| g.region.clone()));
        self.city.push(g.and_then(|g| g.city.clone()));
        self.latitude.push(g.and_then(|g| g.latitude));
        self.longitude.push(g.and_then(|g| g.longitude));
        self.time_zone.push(g.and_then(|g| g.time_zone.clone()));
        self.asn.push(g.and_then(|g| g.asn).map(i64::from));
        self.as_org.push(g.and_then(|g| g.as_org.clone()));
    }

    fn bind<'q>(
        self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(self.client_id)
            .bind(self.event_id)
            .bind(self.batch_id)
            .bind(self.edge_id)
            .bind(self.ts)
            .bind(self.received_at)
            .bind(self.kind)
            .bind(self.name)
            .bind(self.message)
            .bind(self.level)
            .bind(self.user_id)
            .bind(self.anonymous_id)
            .bind(self.session_id)
            .bind(self.properties)
            .bind(self.context)
            .bind(self.app_version)
            .bind(self.platform)
            .bind(self.trace_id)
            .bind(self.span_id)
            .bind(self.seq)
            .bind(self.priority)
            .bind(self.client_ip)
            .bind(self.user_agent)
            .bind(self.pop)
            .bind(self.country)
            .bind(self.region)
            .bind(self.city)
            .bind(self.latitude)
            .bind(self.longitude)
            .bind(self.time_zone)
            .bind(self.asn)
            .bind(self.as_org)
    }
}

/// Rows in `COPY`'s binary format: a header, then per row the number of
/// columns and each value as its length (`-1` for NULL) and PostgreSQL's
/// binary form of it, then a trailer. Nothing is escaped and no number or
/// instant is formatted as text for PostgreSQL to parse back (~9 % less
/// of its time for a `COPY` of these rows alone; end to end, inside the
/// noise: BENCHMARKS.md). The binary forms are those of the column types
/// in `migrations/postgres` (a test reads them back from PostgreSQL's own
/// `COPY … TO … (FORMAT binary)`); text goes in as the UTF-8 it is, which
/// PostgreSQL checks as it would in the text format.
struct CopyRows {
    buf: Vec<u8>,
}

/// What a row's values may not be for [`CopyRows`]: longer than a length
/// field holds (far beyond any frame's bound; checked all the same).
#[derive(Debug)]
struct TooLong;

/// The number of columns of [`COPY`].
const COPY_COLUMNS: i16 = 32;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// PostgreSQL's `timestamptz` range in microseconds from its epoch
/// (4714-11-24 BC to before 294277 AD: `MIN_TIMESTAMP`, `END_TIMESTAMP`).
const PG_TIMESTAMPS: std::ops::Range<i64> = -211_813_488_000_000_000..9_223_371_331_200_000_000;

impl CopyRows {
    /// The signature, the flags (none) and the header extension's length (0).
    const HEADER: &'static [u8; 19] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

    /// A buffer that starts with the header.
    fn with_capacity(n: usize) -> CopyRows {
        let mut buf = Vec::with_capacity(n);
        buf.extend_from_slice(Self::HEADER);
        CopyRows { buf }
    }

    /// An instant (milliseconds since the Unix epoch) in PostgreSQL's
    /// binary form, if `timestamptz` holds it.
    fn pg_time(ms: i64) -> Option<i64> {
        let us = ms.checked_mul(1000)?.checked_sub(PG_EPOCH_US)?;
        PG_TIMESTAMPS.contains(&us).then_some(us)
    }

    /// Whether [`CopyRows::row`] can write this instant.
    fn writes_time(ms: i64) -> bool {
        Self::pg_time(ms).is_some()
    }

    /// One row. On an error, the buffer holds a part of the row: the caller
    /// abandons the `COPY`.
    fn row(&mut self, r: &Row<'_>) -> Result<(), TooLong> {
        let e = r.event;
        let g = r.geo;
        self.buf.extend_from_slice(&COPY_COLUMNS.to_be_bytes());
        self.text(r.client_id)?;
        self.text(&e.event_id)?;
        self.value(&r.batch_id.0);
        self.text(r.edge_id)?;
        self.time(r.ts_ms());
        self.time(r.facts.received_at.millis());
        self.text(e.kind.as_str())?;
        self.opt(e.name.as_deref())?;
        self.opt(e.message.as_deref())?;
        self.opt(e.level.map(|l| l.as_str()))?;
        self.opt(e.user_id.as_deref())?;
        self.opt(e.anonymous_id.as_deref())?;
        self.opt(e.session_id.as_deref())?;
        // Already JSON text: PostgreSQL parses it, as it would the text
        // format's, and nothing parses it here.
        self.jsonb(|b| b.extend_from_slice(e.properties.get().as_bytes()))?;
        self.jsonb(|b| {
            let start = b.len();
            if serde_json::to_writer(&mut *b, &e.context).is_err() {
                b.truncate(start);
                b.extend_from_slice(b"{}");
            }
        })?;
        self.opt(e.context.app_version.as_deref())?;
        self.opt(e.context.platform.as_deref())?;
        self.opt(e.trace_id.as_deref())?;
        self.opt(e.span_id.as_deref())?;
        self.int(r.seq());
        self.text(e.priority.as_str())?;
        self.inet(r.client_addr());
        self.opt(r.facts.user_agent.as_deref())?;
        self.opt(r.facts.pop.as_deref())?;
        self.opt(r.country())?;
        self.opt(g.and_then(|g| g.region.as_deref()))?;
        self.opt(g.and_then(|g| g.city.as_deref()))?;
        self.float(g.and_then(|g| g.latitude));
        self.float(g.and_then(|g| g.longitude));
        self.opt(g.and_then(|g| g.time_zone.as_deref()))?;
        self.int(g.and_then(|g| g.asn).map(i64::from));
        self.opt(g.and_then(|g| g.as_org.as_deref()))?;
        Ok(())
    }

    /// The end of the data.
    fn finish(&mut self) {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    /// A value of a fixed, small size.
    fn value(&mut self, bytes: &[u8]) {
        // At most 20 bytes here (an IPv6 `inet`): the length always fits.
        self.buf
            .extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// A value written by `write`, its length filled in afterwards.
    fn written(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), TooLong> {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        write(&mut self.buf);
        let len = i32::try_from(self.buf.len() - at - 4).map_err(|_| TooLong)?;
        self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    fn text(&mut self, s: &str) -> Result<(), TooLong> {
        self.written(|b| b.extend_from_slice(s.as_bytes()))
    }

    fn opt(&mut self, s: Option<&str>) -> Result<(), TooLong> {
        match s {
            Some(s) => self.text(s),
            None => {
                self.null();
                Ok(())
            }
        }
    }

    /// `jsonb`: a version byte (1), then the JSON text.
    fn jsonb(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), TooLong> {
        self.written(|b| {
            b.push(1);
            write(b);
        })
    }

    /// `int8`.
    fn int(&mut self, n: Option<i64>) {
        match n {
            Some(n) => self.value(&n.to_be_bytes()),
            None => self.null(),
        }
    }

    /// `float8`: the IEEE 754 bits, NaN and the infinities included.
    fn float(&mut self, x: Option<f64>) {
        match x {
            Some(x) => self.value(&x.to_bits().to_be_bytes()),
            None => self.null(),
        }
    }

    /// `timestamptz`: microseconds since 2000-01-01 UTC (callers check
    /// [`CopyRows::writes_time`] first; anything else is written as NULL,
    /// which the column refuses).
    fn time(&mut self, ms: i64) {
        match Self::pg_time(ms) {
            Some(us) => self.value(&us.to_be_bytes()),
            None => self.null(),
        }
    }

    /// `inet`: the family (2 for IPv4, 3 for IPv6), the prefix length (the
    /// whole address), not a `cidr` (0), the address's length and bytes.
    fn inet(&mut self, ip: Option<std::net::IpAddr>) {
        let mut v = [0u8; 20];
        let len = match ip {
            Some(std::net::IpAddr::V4(a)) => {
                v[..4].copy_from_slice(&[2, 32, 0, 4]);
                v[4..8].copy_from_slice(&a.octets());
                8
            }
            Some(std::net::IpAddr::V6(a)) => {
                v[..4].copy_from_slice(&[3, 128, 0, 16]);
                v[4..].copy_from_slice(&a.octets());
                20
            }
            None => return self.null(),
        };
        self.value(&v[..len]);
    }
}

/// The rollup counts of rows, as the slow path's SQL counts them: per
/// client and minute, one counter for all events (dimension `''`, value
/// NULL) and one per value (NULL included) of each stats dimension.
#[derive(Default)]
struct Counts<'a> {
    client_id: Vec<&'a str>,
    dim: Vec<&'static str>,
    minute: Vec<i64>,
    value: Vec<Option<&'a str>>,
    events: Vec<i64>,
}

impl<'a> Counts<'a> {
    fn of(rows: &'a [Row<'a>]) -> Counts<'a> {
        type Key<'a> = (&'a str, &'static str, i64, Option<&'a str>);
        // At most rows × 8 keys, so even keys made to collide cost a bounded
        // amount; a fast seeded hash (SipHash was 4 % of a write's CPU).
        let mut counts: HashMap<Key<'a>, i64, foldhash::fast::RandomState> = HashMap::default();
        for r in rows {
            let minute = r.ts_ms().div_euclid(60_000);
            let dims = dimensions(r);
            for (dim, value) in dims {
                *counts.entry((r.client_id, dim, minute, value)).or_default() += 1;
            }
        }
        let mut out = Counts::default();
        for ((client_id, dim, minute, value), n) in counts {
            out.client_id.push(client_id);
            out.dim.push(dim);
            out.minute.push(minute);
            out.value.push(value);
            out.events.push(n);
        }
        out
    }

    fn bind<'q>(
        self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        q.bind(self.client_id)
            .bind(self.dim)
            .bind(self.minute)
            .bind(self.value)
            .bind(self.events)
    }
}

/// The dimensions `event_counts` and `user_sketches` keep, by their
/// `dim` names ('' is all of a client's events).
pub const DIMENSIONS: [&str; 8] = [
    "",
    "kind",
    "name",
    "country",
    "platform",
    "app_version",
    "level",
    "priority",
];

/// A row's value of each of [`DIMENSIONS`], in that order.
pub fn dimensions<'a>(r: &'a Row<'a>) -> [(&'static str, Option<&'a str>); 8] {
    let e = r.event;
    let values = [
        None,
        Some(e.kind.as_str()),
        e.name.as_deref(),
        r.country(),
        e.context.platform.as_deref(),
        e.context.app_version.as_deref(),
        e.level.map(|l| l.as_str()),
        Some(e.priority.as_str()),
    ];
    let mut out = [("", None); 8];
    for (i, v) in values.into_iter().enumerate() {
        out[i] = (DIMENSIONS[i], v);
    }
    out
}

/// This sink's name.
pub const NAME: &str = "postgres";

/// The PostgreSQL sink, for `sinks::KINDS`.
pub const KIND: super::Kind = super::Kind {
    name: NAME,
    enabled: |config| config.postgres.enabled,
    build,
};

fn build(config: &crate::config::Config) -> super::Building<'_> {
    Box::pin(async move {
        let sink = PostgresSink::connect(&config.postgres).await?;
        // The read API and client lookups get their own pool, every
        // statement bounded by `read_api.statement_timeout_ms`: a costly
        // query is cut off, and it cannot take the sink's connections.
        let read = crate::db::read_pool(&config.postgres, config.read_api.statement_timeout_ms)?;
        let (pool, retention_days) = (sink.pool().clone(), config.postgres.retention_days);
        // Today's partitions before the first write, so that rows land in
        // their day rather than in the default partition and need moving
        // (bounded: a database that is away is the hourly task's to retry).
        let first = partitions::maintain(&pool, retention_days, std::time::SystemTime::now());
        match tokio::time::timeout(std::time::Duration::from_secs(10), first).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "PostgreSQL partitions not made at start; retrying in the background")
            }
            Err(_) => tracing::warn!(
                "PostgreSQL partitions not made within 10 s of start; retrying in the background"
            ),
        }
        // After a crash, the sketches may lack the last flush interval's
        // users: rebuild the last minutes from the rows (in the
        // background; merging changes nothing already there).
        let repair = pool.clone();
        tokio::spawn(async move {
            let now = crate::delivery::now_ms();
            let from = now - users::REPAIR_MINUTES * 60_000;
            match users::rebuild(&repair, from, now + 3_600_000).await {
                Ok(done) => tracing::debug!(?done, "user sketches of the last minutes rebuilt"),
                Err(e) => {
                    tracing::warn!(error = %e, "user sketches of the last minutes not rebuilt")
                }
            }
        });
        let (flusher, last) = (sink.users.clone(), sink.users.clone());
        Ok(
            super::Configured::new(sink, Some(crate::db::Db::Postgres(read)))
                .with_task(move |ctx, stop| {
                    partitions::spawn(pool, retention_days, ctx.metrics.clone(), stop.clone())
                })
                .with_task(move |_, stop| {
                    let stop = stop.clone();
                    tokio::spawn(async move { flusher.run(stop).await })
                })
                .after_workers(async move {
                    if let Err(e) = last.flush().await {
                        tracing::warn!(error = %e, "user sketches not stored at shutdown; the next start rebuilds the last minutes");
                    }
                }),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geoip::Geo;
    use outpost_shared::event::Timestamp;

    #[test]
    fn copy_rows_write_every_instant_timestamptz_holds_and_no_other() {
        let us = |ms| CopyRows::pg_time(ms);
        assert_eq!(us(946_684_800_000), Some(0), "PostgreSQL's epoch");
        assert_eq!(us(0), Some(-946_684_800_000_000));
        assert_eq!(us(1_795_701_600_123), Some(849_016_800_123_000));
        assert!(CopyRows::writes_time(253_402_300_800_000), "year 10000");
        assert!(CopyRows::writes_time(-210_866_803_200_000), "4714-11-24 BC");
        assert!(!CopyRows::writes_time(-210_866_803_200_001), "before it");
        assert!(!CopyRows::writes_time(i64::MAX), "microseconds overflow");
        assert!(!CopyRows::writes_time(i64::MIN));
        let mut rows = CopyRows::with_capacity(0);
        rows.buf.clear();
        rows.time(i64::MAX);
        assert_eq!(
            rows.buf,
            (-1i32).to_be_bytes(),
            "NULL, which the column refuses"
        );
    }

    #[test]
    fn copy_rows_frame_values_with_their_lengths_and_nulls() {
        let mut rows = CopyRows::with_capacity(0);
        assert_eq!(&rows.buf[..11], b"PGCOPY\n\xff\r\n\0");
        rows.buf.clear();
        rows.text("").unwrap();
        rows.opt(None).unwrap();
        rows.text("é\t").unwrap();
        rows.int(Some(-2));
        rows.inet(Some("10.0.0.1".parse().unwrap()));
        rows.jsonb(|b| b.extend_from_slice(b"{}")).unwrap();
        rows.finish();
        let mut expected = vec![
            0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 3, 0xc3, 0xa9, b'\t',
        ];
        expected.extend_from_slice(&[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
        expected.extend_from_slice(&[0, 0, 0, 8, 2, 32, 0, 4, 10, 0, 0, 1]);
        expected.extend_from_slice(&[0, 0, 0, 3, 1, b'{', b'}', 0xff, 0xff]);
        assert_eq!(rows.buf, expected);
    }

    /// A `COPY … (FORMAT binary)` stream as rows of values (NULL: `None`),
    /// checking the header and the trailer.
    fn parse_copy(data: &[u8]) -> Vec<Vec<Option<Vec<u8>>>> {
        assert_eq!(&data[..19], CopyRows::HEADER, "header");
        let mut at = 19;
        let mut take = |n: usize| {
            at += n;
            &data[at - n..at]
        };
        let mut rows = Vec::new();
        loop {
            let columns = i16::from_be_bytes(take(2).try_into().unwrap());
            if columns == -1 {
                break;
            }
            let row = (0..columns)
                .map(|_| {
                    let len = i32::from_be_bytes(take(4).try_into().unwrap());
                    (len >= 0).then(|| take(len as usize).to_vec())
                })
                .collect();
            rows.push(row);
        }
        assert_eq!(at, data.len(), "nothing after the trailer");
        rows
    }

    /// Rows whose every column the encoder writes, in every form it writes
    /// it: text that the text format had to escape, non-ASCII, NULLs, IPv4,
    /// IPv6 and an address that is not one, NaN and infinite coordinates,
    /// instants before 1970 and after 9999.
    fn varied_rows<'a>(
        batches: &'a [outpost_shared::frame::Batch],
        geos: &'a [Geo],
    ) -> Vec<Row<'a>> {
        batches
            .iter()
            .zip(geos)
            .flat_map(|(b, g)| Row::of_batch(b, Some(g)))
            .collect()
    }

    fn varied_batches() -> (Vec<outpost_shared::frame::Batch>, Vec<Geo>) {
        let ips = [
            Some("203.0.113.7"),
            Some("2001:db8::7"),
            Some("not an address"),
            None,
        ];
        let mut batches = Vec::new();
        let mut geos = Vec::new();
        for (i, ip) in ips.into_iter().enumerate() {
            let mut b = outpost_shared::sample::typical_batch(3);
            b.facts.client_ip = ip.map(str::to_owned);
            for (j, e) in b.events.iter_mut().enumerate() {
                e.event_id = format!("ev-{i}-{j}").into();
                match (i + j) % 3 {
                    0 => {
                        e.message = Some("tab\there\nnew line \\N \\. \r ☕ 日本".into());
                        e.seq = None;
                        e.timestamp = Some(Timestamp(-86_400_123));
                    }
                    1 => {
                        e.name = None;
                        e.seq = Some(u64::MAX / 2);
                        e.timestamp = Some(Timestamp(253_402_300_800_000));
                    }
                    _ => {
                        e.user_id = Some("ümlaut\\".into());
                    }
                }
            }
            batches.push(b);
            geos.push(Geo {
                country: Some("DE".into()),
                region: (i != 1).then(|| "DE-HE".into()),
                city: Some("Frankfurt am Main".into()),
                latitude: Some([50.110_924, f64::NAN, -0.0, 1e-300][i]),
                longitude: Some([8.682_127, f64::INFINITY, f64::NEG_INFINITY, -180.0][i]),
                time_zone: Some("Europe/Berlin".into()),
                asn: (i != 2).then_some(u32::MAX - i as u32),
                as_org: Some("Example\tAS".into()),
            });
        }
        (batches, geos)
    }

    /// A database of its own on the test PostgreSQL, migrated (dropped at
    /// the end of the test that made it).
    async fn scratch_database() -> (PgPool, String) {
        let admin = std::env::var("OUTPOST_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!(
            "outpost_copy_{}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let server = PgPool::connect(&format!("{admin}/postgres")).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&server)
            .await
            .unwrap();
        let pool = PgPool::connect(&format!("{admin}/{name}")).await.unwrap();
        MIGRATOR.run(&pool).await.unwrap();
        (pool, name)
    }

    async fn drop_database(pool: PgPool, name: &str) {
        pool.close().await;
        let admin = std::env::var("OUTPOST_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let server = PgPool::connect(&format!("{admin}/postgres")).await.unwrap();
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&server)
            .await
            .unwrap();
    }

    /// PostgreSQL's binary form of a client's stored rows, by event id.
    async fn copied_out(pool: &PgPool, client: &str) -> Result<Vec<u8>, sqlx::Error> {
        use futures_util::TryStreamExt as _;
        let mut conn = pool.acquire().await?;
        let statement = format!(
            "COPY (SELECT {} FROM events WHERE client_id = '{client}' ORDER BY event_id) \
             TO STDOUT (FORMAT binary)",
            columns!()
        );
        let out: Vec<bytes::Bytes> = conn.copy_out_raw(&statement).await?.try_collect().await?;
        Ok(out.concat())
    }

    #[tokio::test]
    async fn copy_rows_are_what_postgres_writes_back_and_what_the_insert_path_stores() {
        let (batches, geos) = varied_batches();
        let rows = varied_rows(&batches, &geos);
        // The same rows for another client, for the slow path.
        let mut others = batches.clone();
        for b in &mut others {
            b.client_id = "insert-path".into();
        }
        let other_rows = varied_rows(&others, &geos);
        let (pool, name) = scratch_database().await;
        let sink = PostgresSink {
            users: std::sync::Arc::new(users::Users::new(pool.clone())),
            pool: pool.clone(),
        };
        // Everything against the database first, then drop it, then check.
        let stored = async {
            let copied = sink.copy(&rows).await?;
            sink.insert(&other_rows).await?;
            let client = rows[0].client_id.as_str();
            Ok::<_, sqlx::Error>((
                copied,
                copied_out(&pool, client).await?,
                copied_out(&pool, "insert-path").await?,
            ))
        }
        .await;
        drop(sink);
        drop_database(pool, &name).await;
        let (copied, by_copy, by_insert) = stored.unwrap();
        assert_eq!(copied, Copied::Stored);
        let (by_copy, by_insert) = (parse_copy(&by_copy), parse_copy(&by_insert));

        let mut data = CopyRows::with_capacity(0);
        for r in &rows {
            data.row(r).unwrap();
        }
        data.finish();
        let mut ours = parse_copy(&data.buf);
        ours.sort_by(|a, b| a[1].cmp(&b[1]));
        assert_eq!(ours.len(), 12);
        assert_eq!(by_copy.len(), ours.len());
        assert_eq!(by_insert.len(), ours.len());
        let names: Vec<&str> = columns!().split(", ").map(str::trim).collect();
        assert_eq!(names.len(), COPY_COLUMNS as usize);
        for ((mine, copied), inserted) in ours.iter().zip(&by_copy).zip(&by_insert) {
            assert_eq!(mine.len(), COPY_COLUMNS as usize);
            let id = String::from_utf8_lossy(mine[1].as_deref().unwrap_or_default());
            for (i, name) in names.iter().enumerate() {
                // The stored value is the sent one, and the slow path (which
                // sends text for PostgreSQL to parse) stores the same value.
                if matches!(*name, "properties" | "context") {
                    // PostgreSQL writes `jsonb` back in its own layout
                    // (keys sorted, spaces): the same JSON, other bytes.
                    let json = |v: &Option<Vec<u8>>| {
                        let v = v.as_deref().unwrap();
                        assert_eq!(v[0], 1, "jsonb version");
                        serde_json::from_slice::<serde_json::Value>(&v[1..]).unwrap()
                    };
                    assert_eq!(json(&mine[i]), json(&copied[i]), "{name} of {id}");
                    assert_eq!(json(&mine[i]), json(&inserted[i]), "{name} of {id}");
                } else {
                    assert_eq!(mine[i], copied[i], "{name} of {id}");
                    if *name != "client_id" {
                        assert_eq!(mine[i], inserted[i], "{name} of {id} by INSERT");
                    }
                }
            }
        }
    }
}
