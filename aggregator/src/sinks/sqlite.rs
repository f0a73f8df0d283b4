//! The SQLite sink: the embedded store that stands in for PostgreSQL in
//! `outpost dev` and small single-machine installs. Same rows, same
//! idempotence (`INSERT OR IGNORE` on the (client, event id) unique key),
//! one transaction per write. The file is in WAL mode with
//! `synchronous=NORMAL`: the spool, not this file, is what makes an
//! acknowledged batch durable, and a batch is redelivered until this
//! write has committed.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use super::{Row, Sink, SinkError};

/// `[sqlite]`: events, client records and the query API in one SQLite
/// file instead of PostgreSQL, for one machine (`outpost dev`, small
/// installs). Turn `[postgres]` off when this is on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteConfig {
    /// Whether the SQLite store is on.
    pub enabled: bool,
    /// The database file (created, with its directory, when missing).
    pub path: PathBuf,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            enabled: false,
            path: PathBuf::from("data/events.db"),
        }
    }
}

/// Embedded migrations (`migrations/sqlite`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Columns per row; SQLite allows 32,766 bound values per statement.
const COLUMNS: usize = 32;
/// Rows per `INSERT` statement.
const ROWS_PER_STATEMENT: usize = 32_766 / COLUMNS;

/// The sink.
#[derive(Clone)]
pub struct SqliteSink {
    pool: SqlitePool,
}

impl SqliteSink {
    /// Opens (creating the file and its directory) and migrates.
    pub async fn open(config: &SqliteConfig) -> anyhow::Result<SqliteSink> {
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(&config.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteSink { pool })
    }

    /// The pool (for the query API and client records).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn insert(&self, rows: &[Row<'_>]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut sql = QueryBuilder::<Sqlite>::new(
                "INSERT OR IGNORE INTO events (client_id, event_id, batch_id, edge_id, ts_us, received_ms, \
                 kind, name, message, level, user_id, anonymous_id, session_id, properties, context, \
                 app_version, platform, trace_id, span_id, seq, priority, client_ip, user_agent, pop, \
                 country, region, city, latitude, longitude, time_zone, asn, as_org) ",
            );
            sql.push_values(chunk, |mut b, r| {
                let e = r.event;
                let g = r.geo;
                b.push_bind(r.client_id.to_string())
                    .push_bind(e.event_id.to_string())
                    .push_bind(r.batch_id.to_string())
                    .push_bind(r.edge_id.to_owned())
                    .push_bind(r.ts_ms().saturating_mul(1000))
                    .push_bind(r.facts.received_at.millis())
                    .push_bind(e.kind.as_str())
                    .push_bind(e.name.clone())
                    .push_bind(e.message.clone())
                    .push_bind(e.level.map(|l| l.as_str()))
                    .push_bind(e.user_id.clone())
                    .push_bind(e.anonymous_id.clone())
                    .push_bind(e.session_id.clone())
                    .push_bind(r.properties_json().to_owned())
                    .push_bind(r.context_json())
                    .push_bind(e.context.app_version.clone())
                    .push_bind(e.context.platform.clone())
                    .push_bind(e.trace_id.clone())
                    .push_bind(e.span_id.clone())
                    .push_bind(r.seq())
                    .push_bind(e.priority.as_str())
                    .push_bind(r.client_ip().map(str::to_owned))
                    .push_bind(r.facts.user_agent.clone())
                    .push_bind(r.facts.pop.clone())
                    .push_bind(r.country().map(str::to_owned))
                    .push_bind(g.and_then(|g| g.region.clone()))
                    .push_bind(g.and_then(|g| g.city.clone()))
                    .push_bind(g.and_then(|g| g.latitude))
                    .push_bind(g.and_then(|g| g.longitude))
                    .push_bind(g.and_then(|g| g.time_zone.clone()))
                    .push_bind(g.and_then(|g| g.asn).map(i64::from))
                    .push_bind(g.and_then(|g| g.as_org.clone()));
            });
            sql.build().execute(&mut *tx).await?;
        }
        tx.commit().await
    }
}

impl Sink for SqliteSink {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn write(&self, rows: &[Row<'_>]) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        // Every column is loosely typed and duplicates are ignored: SQLite
        // has no reason to refuse a validated row, so any error is the
        // store's (busy, disk full) and the write is retried.
        self.insert(rows)
            .await
            .map_err(|e| SinkError::Unavailable(e.to_string()))
    }

    async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

/// This sink's name.
pub const NAME: &str = "sqlite";

/// The SQLite store, for `sinks::KINDS`.
pub const KIND: super::Kind = super::Kind {
    name: NAME,
    enabled: |config| config.sqlite.enabled,
    build,
};

fn build(config: &crate::config::Config) -> super::Building<'_> {
    Box::pin(async move {
        let sink = SqliteSink::open(&config.sqlite).await.map_err(|e| {
            e.context(format!(
                "opening the SQLite store at {}",
                config.sqlite.path.display()
            ))
        })?;
        let db = crate::db::Db::Sqlite(sink.pool().clone());
        Ok(super::Configured::new(sink, Some(db)))
    })
}
