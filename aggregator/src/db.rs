//! The database the events are read from and client records live in:
//! PostgreSQL (`[postgres]`, production) or SQLite (`[sqlite]`, the embedded
//! store of `outpost dev`). The two schemas hold the same rows; what differs
//! is spelled out where the SQL is (`read_api/sql.rs`, `clients.rs`, `sinks/`).

use sqlx::{PgPool, SqlitePool};

/// A connection pool on one of the two databases.
#[derive(Clone, Debug)]
pub enum Db {
    /// PostgreSQL.
    Postgres(PgPool),
    /// SQLite (embedded).
    Sqlite(SqlitePool),
}

impl Db {
    /// `postgres` or `sqlite` (readiness checks, logs).
    pub fn name(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        match self {
            Db::Postgres(p) => sqlx::query("SELECT 1").execute(p).await.is_ok(),
            Db::Sqlite(p) => sqlx::query("SELECT 1").execute(p).await.is_ok(),
        }
    }
}

/// The configured database for commands that only need it (`clients`,
/// `migrate`): SQLite when `[sqlite]` is on, else PostgreSQL. Both are
/// migrated first when configured to (SQLite always is).
pub async fn open(config: &crate::config::Config) -> anyhow::Result<Db> {
    if config.sqlite.enabled {
        let sink = crate::sinks::sqlite::SqliteSink::open(&config.sqlite).await?;
        Ok(Db::Sqlite(sink.pool().clone()))
    } else {
        let sink = crate::sinks::postgres::PostgresSink::connect(&config.postgres).await?;
        Ok(Db::Postgres(sink.pool().clone()))
    }
}

/// A PostgreSQL pool for reads (the read API, client records) whose every
/// statement is cut off after `statement_timeout_ms`.
pub fn read_pool(
    config: &crate::config::PostgresConfig,
    statement_timeout_ms: u64,
) -> anyhow::Result<PgPool> {
    use std::str::FromStr as _;
    let options = sqlx::postgres::PgConnectOptions::from_str(&config.url.0)?
        .options([("statement_timeout", statement_timeout_ms.to_string())]);
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy_with(options))
}
