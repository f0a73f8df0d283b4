//! The PostgreSQL sink: one `INSERT … SELECT FROM UNNEST(…)` per write (one
//! round trip, every value a bound parameter), `ON CONFLICT DO NOTHING` on
//! (client, event id) so replays and duplicates are stored once. The same
//! statement adds the rows it really inserted to the per-minute counts of
//! `event_counts` (the rollups `GET /v1/stats` reads), so they stay exact.
//!
//! Errors are sorted by SQLSTATE class into the data's fault, the
//! database's, or neither for sure ([`SinkError`]); the delivery workers
//! narrow the first and the last down to rows.

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{Row, Sink, SinkError};
use crate::config::PostgresConfig;

/// Embedded migrations (`migrations/postgres`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The sink.
#[derive(Clone)]
pub struct PostgresSink {
    pool: PgPool,
}

const INSERT: &str = r#"
WITH inserted AS (
INSERT INTO events (client_id, event_id, batch_id, edge_id, ts, received_at, kind, name, message, level,
                    user_id, anonymous_id, session_id, properties, context, app_version, platform,
                    trace_id, span_id, seq, priority, client_ip, user_agent, pop, country,
                    region, city, latitude, longitude, time_zone, asn, as_org)
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
ON CONFLICT (client_id, event_id) DO NOTHING
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
"#;

impl PostgresSink {
    /// Connects lazily (start-up does not wait for the database) and, if
    /// configured, runs the migrations.
    pub async fn connect(config: &PostgresConfig) -> anyhow::Result<PostgresSink> {
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_lazy(&config.url.0)?;
        let sink = PostgresSink { pool };
        if config.migrate_on_start {
            MIGRATOR.run(&sink.pool).await?;
        }
        Ok(sink)
    }

    /// The pool (for the query API and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

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

fn sink_error(e: &sqlx::Error) -> SinkError {
    match blame(e) {
        Blame::Row => SinkError::Rejected(e.to_string()),
        Blame::Sink => SinkError::Unavailable(e.to_string()),
        Blame::Unknown => SinkError::Refused(e.to_string()),
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn write(&self, rows: &[Row<'_>]) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.insert(rows).await.map_err(|e| sink_error(&e))
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
        self.client_id.push(r.client_id.to_owned());
        self.event_id.push(e.event_id.clone());
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
        self.properties.push(r.properties_json());
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
