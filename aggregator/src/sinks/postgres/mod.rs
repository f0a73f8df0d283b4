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
use std::io::Write as _;

use chrono::{DateTime, Datelike as _, Timelike as _};
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

/// The fast path's first statement ([`CopyText`] writes its rows).
const COPY: &str = concat!("COPY events (", columns!(), ") FROM STDIN");

/// The fast path's second statement: the per-minute counts of what the
/// `COPY` stored ([`Counts`]).
const COUNT: &str = r#"
INSERT INTO event_counts (client_id, dim, minute, value, events)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[])
-- One lock order for every writer (the same as INSERT's): concurrent writes
-- wait, never deadlock.
ORDER BY 1, 2, 3, 4
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
-- One lock order for every writer: concurrent writes wait, never deadlock.
ORDER BY 1, 2, 3, 4
ON CONFLICT ON CONSTRAINT event_counts_key DO UPDATE SET events = event_counts.events + EXCLUDED.events
"#
);

/// How much `COPY` text is gathered before it is sent (PostgreSQL parses
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
    /// Nothing tried: a timestamp outside years 1–9999, which the text
    /// format below does not write.
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
                .all(CopyText::writes_time)
        };
        if !rows.iter().all(writable) {
            return Ok(Copied::Unsuited);
        }
        let mut tx = self.pool.begin().await?;
        let mut copy = tx.copy_in_raw(COPY).await?;
        let mut text = CopyText::with_capacity(COPY_CHUNK + 16 * 1024);
        for r in rows {
            text.row(r);
            if text.buf.len() >= COPY_CHUNK {
                copy.send(text.buf.as_slice()).await?;
                text.buf.clear();
            }
        }
        if !text.buf.is_empty() {
            copy.send(text.buf.as_slice()).await?;
        }
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

/// Rows in `COPY`'s text format: tab between columns, newline after each
/// row, `\N` for NULL, and backslash escapes for backslash, tab, newline and
/// carriage return inside values. Every value is written as PostgreSQL
/// reads it back unchanged, so the fast path stores what the slow one would.
/// Bytes, not a `String`: only ASCII is ever escaped, which never occurs
/// inside a multi-byte UTF-8 character.
struct CopyText {
    buf: Vec<u8>,
    /// The next value is a row's first (no tab before it).
    row_start: bool,
    /// Reused for each JSON value before it is escaped into `buf`.
    json: Vec<u8>,
}

impl CopyText {
    fn with_capacity(n: usize) -> CopyText {
        CopyText {
            buf: Vec::with_capacity(n),
            row_start: true,
            json: Vec::with_capacity(4096),
        }
    }

    /// Whether [`CopyText::time`] can write this instant (years 1–9999).
    fn writes_time(ms: i64) -> bool {
        DateTime::from_timestamp_millis(ms).is_some_and(|t| (1..=9999).contains(&t.year()))
    }

    fn row(&mut self, r: &Row<'_>) {
        let e = r.event;
        let g = r.geo;
        self.text(r.client_id);
        self.text(&e.event_id);
        self.display(r.batch_id);
        self.text(r.edge_id);
        self.time(r.ts_ms());
        self.time(r.facts.received_at.millis());
        self.text(e.kind.as_str());
        self.opt(e.name.as_deref());
        self.opt(e.message.as_deref());
        self.opt(e.level.map(|l| l.as_str()));
        self.opt(e.user_id.as_deref());
        self.opt(e.anonymous_id.as_deref());
        self.opt(e.session_id.as_deref());
        // Already JSON text: escaped for COPY, never parsed here.
        self.text(e.properties.get());
        self.json(&e.context);
        self.opt(e.context.app_version.as_deref());
        self.opt(e.context.platform.as_deref());
        self.opt(e.trace_id.as_deref());
        self.opt(e.span_id.as_deref());
        self.int(r.seq());
        self.text(e.priority.as_str());
        self.opt(r.client_ip());
        self.opt(r.facts.user_agent.as_deref());
        self.opt(r.facts.pop.as_deref());
        self.opt(r.country());
        self.opt(g.and_then(|g| g.region.as_deref()));
        self.opt(g.and_then(|g| g.city.as_deref()));
        self.float(g.and_then(|g| g.latitude));
        self.float(g.and_then(|g| g.longitude));
        self.opt(g.and_then(|g| g.time_zone.as_deref()));
        self.int(g.and_then(|g| g.asn).map(i64::from));
        self.opt(g.and_then(|g| g.as_org.as_deref()));
        self.buf.push(b'\n');
        self.row_start = true;
    }

    /// Every value starts here: a tab before all but a row's first.
    fn sep(&mut self) {
        if !std::mem::take(&mut self.row_start) {
            self.buf.push(b'\t');
        }
    }

    fn null(&mut self) {
        self.sep();
        self.buf.extend_from_slice(b"\\N");
    }

    fn text(&mut self, s: &str) {
        self.sep();
        escape_into(&mut self.buf, s.as_bytes());
    }

    /// A value whose `Display` needs no escapes (numbers, ids).
    fn display(&mut self, v: impl std::fmt::Display) {
        self.sep();
        let _ = write!(self.buf, "{v}");
    }

    /// A value as JSON text (what `Row::properties_json` and
    /// `Row::context_json` give, without a `String` per row).
    fn json<T: serde::Serialize>(&mut self, value: &T) {
        self.json.clear();
        if serde_json::to_writer(&mut self.json, value).is_err() {
            self.json.clear();
            self.json.extend_from_slice(b"{}");
        }
        self.sep();
        escape_into(&mut self.buf, &self.json);
    }

    fn opt(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.text(s),
            None => self.null(),
        }
    }

    fn int(&mut self, n: Option<i64>) {
        match n {
            Some(n) => self.display(n),
            None => self.null(),
        }
    }

    fn float(&mut self, x: Option<f64>) {
        match x {
            // Rust writes the shortest digits that read back as the same
            // double, never an exponent: PostgreSQL reads them exactly.
            Some(x) if x.is_finite() => self.display(x),
            Some(x) if x.is_nan() => self.display("NaN"),
            Some(x) if x > 0.0 => self.display("Infinity"),
            Some(_) => self.display("-Infinity"),
            None => self.null(),
        }
    }

    /// An instant as `YYYY-MM-DD HH:MM:SS.mmm+00` (callers check
    /// [`CopyText::writes_time`] first).
    fn time(&mut self, ms: i64) {
        self.sep();
        if let Some(t) = DateTime::from_timestamp_millis(ms) {
            // By hand: `write!` here was a visible share of a write's CPU.
            let b = &mut self.buf;
            push_padded(b, t.year().unsigned_abs(), 4);
            b.push(b'-');
            push_padded(b, t.month(), 2);
            b.push(b'-');
            push_padded(b, t.day(), 2);
            b.push(b' ');
            push_padded(b, t.hour(), 2);
            b.push(b':');
            push_padded(b, t.minute(), 2);
            b.push(b':');
            push_padded(b, t.second(), 2);
            b.push(b'.');
            push_padded(b, ms.rem_euclid(1000) as u32, 3);
            b.extend_from_slice(b"+00");
        }
    }
}

/// Appends the last `width` decimal digits of `n`, zero-padded.
fn push_padded(out: &mut Vec<u8>, mut n: u32, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for digit in out[start..].iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Appends `value` to `out` with `COPY`'s text escapes, copying the runs
/// between them whole. The next `\r` and the next of the other three are
/// each searched for (memchr) only once they have been passed, so the work
/// stays linear in the value whatever it holds.
fn escape_into(out: &mut Vec<u8>, value: &[u8]) {
    let others =
        |from: usize| memchr::memchr3(b'\\', b'\t', b'\n', &value[from..]).map(|i| from + i);
    let cr = |from: usize| memchr::memchr(b'\r', &value[from..]).map(|i| from + i);
    let (mut next_other, mut next_cr) = (others(0), cr(0));
    let mut start = 0;
    loop {
        let at = match (next_other, next_cr) {
            (Some(o), Some(c)) => o.min(c),
            (Some(i), None) | (None, Some(i)) => i,
            (None, None) => break,
        };
        out.extend_from_slice(&value[start..at]);
        out.extend_from_slice(match value[at] {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            _ => b"\\r",
        });
        start = at + 1;
        if next_cr == Some(at) {
            next_cr = cr(start);
        } else {
            next_other = others(start);
        }
    }
    out.extend_from_slice(&value[start..]);
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

    fn escaped(s: &str) -> String {
        let mut out = Vec::new();
        escape_into(&mut out, s.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn copy_text_escapes_only_what_copy_reads_specially() {
        assert_eq!(escaped("plain ümlaut 日本"), "plain ümlaut 日本");
        assert_eq!(escaped("a\tb\nc\rd\\e"), "a\\tb\\nc\\rd\\\\e");
        assert_eq!(escaped("\\."), "\\\\.", "never the end-of-data marker");
        assert_eq!(escaped("\\N"), "\\\\N", "never NULL");
        assert_eq!(escaped(""), "");
    }

    proptest::proptest! {
        /// Any mix of the four escaped bytes and others: each escaped
        /// alone, everything else copied as it is.
        #[test]
        fn copy_text_escapes_each_special_byte_and_nothing_else(
            value in proptest::collection::vec(proptest::sample::select(
                vec![b'\\', b'\t', b'\n', b'\r', b'a', b'N', b'.', 0xc3, 0xbc]), 0..64),
        ) {
            let mut expected = Vec::new();
            for b in &value {
                match b {
                    b'\\' => expected.extend_from_slice(b"\\\\"),
                    b'\t' => expected.extend_from_slice(b"\\t"),
                    b'\n' => expected.extend_from_slice(b"\\n"),
                    b'\r' => expected.extend_from_slice(b"\\r"),
                    other => expected.push(*other),
                }
            }
            let mut out = b"x".to_vec();
            escape_into(&mut out, &value);
            proptest::prop_assert_eq!(&out[1..], &expected[..]);
        }
    }

    #[test]
    fn copy_text_separates_values_even_when_the_first_is_empty() {
        let mut t = CopyText::with_capacity(16);
        t.text("");
        t.int(Some(1));
        t.opt(Some("x"));
        assert_eq!(t.buf, b"\t1\tx");
    }

    #[test]
    fn copy_text_writes_instants_numbers_and_nulls_as_postgres_reads_them() {
        let mut t = CopyText::with_capacity(64);
        t.time(1_795_701_600_123);
        t.time(-1);
        t.time(-62_135_596_800_000);
        t.time(253_402_300_799_999);
        t.float(Some(50.110_924));
        t.float(Some(f64::NAN));
        t.float(Some(f64::NEG_INFINITY));
        t.float(Some(1e21));
        t.int(Some(-42));
        t.opt(None);
        assert_eq!(
            String::from_utf8(t.buf).unwrap(),
            "2026-11-26 14:00:00.123+00\t1969-12-31 23:59:59.999+00\t0001-01-01 00:00:00.000+00\t\
             9999-12-31 23:59:59.999+00\t50.110924\tNaN\t-Infinity\t\
             1000000000000000000000\t-42\t\\N"
        );
        assert!(CopyText::writes_time(0));
        assert!(CopyText::writes_time(253_402_300_799_999), "9999-12-31");
        assert!(!CopyText::writes_time(253_402_300_800_000), "year 10000");
        assert!(!CopyText::writes_time(-62_135_596_800_001), "before year 1");
    }
}
