//! The day partitions of `events` and `event_counts` (migration
//! `20261206000001_partition_by_day.sql`): the keeper creates the coming
//! days before rows need them and drops the days `postgres.retention_days`
//! has expired.
//!
//! Every aggregator of a fleet runs it, hourly; an advisory lock makes them
//! take turns. Each step is its own short transaction with a lock timeout,
//! so a long query in the way postpones a step to the next round instead of
//! queueing the writers behind it. Rows no day partition holds (late
//! events, older than yesterday) land in the default partition and stay
//! there until retention deletes them; rows already in the default
//! partition for a day being created move into it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::telemetry::Metrics;

/// Days before today that get their own partition. Late events (an app
/// that was offline) mostly arrive by the next day; older ones go to the
/// default partition rather than making a start-up create a month of
/// empty tables.
const DAYS_BACK: i64 = 1;
/// Days after today created ahead: an event may lie an hour in the future
/// (`limits.max_future_secs`), and two spare days let the keeper miss a
/// day of runs without a row landing in the default partition.
const DAYS_AHEAD: i64 = 2;
/// How often an aggregator runs the keeper.
const EVERY: Duration = Duration::from_secs(3600);
/// How soon after a failed run it tries again.
const RETRY: Duration = Duration::from_secs(60);
/// Rows one `DELETE` removes from a partition that straddles the cut-off.
const DELETE_CHUNK: i64 = 10_000;
/// The advisory lock the keepers of a fleet take turns with.
const LOCK_KEY: i64 = 0x6f75_7470_6f73_7470;
const MINUTES_PER_DAY: i64 = 1440;

/// A partitioned table the keeper looks after.
struct Table {
    name: &'static str,
    /// Its partition key column.
    column: &'static str,
    /// SQL turning a bound (text, as the catalog prints it) into minutes.
    to_minutes: &'static str,
    /// SQL turning `$1` (minutes) into a value of the partition key.
    from_minutes: &'static str,
    /// Storage parameters of a new partition.
    storage: &'static str,
}

const TABLES: [Table; 2] = [
    Table {
        name: "events",
        column: "ts",
        to_minutes: "floor(extract(epoch FROM v::timestamptz) / 60)::int8",
        from_minutes: "to_timestamp($1::int8 * 60)",
        storage: "",
    },
    Table {
        name: "event_counts",
        column: "minute",
        to_minutes: "v::int8",
        from_minutes: "$1::int8",
        // The counters are updated in place: room for HOT updates.
        storage: " WITH (fillfactor = 50)",
    },
];

/// What one run did.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Partitions created.
    pub created: Vec<String>,
    /// Partitions dropped (every row in them had expired).
    pub dropped: Vec<String>,
    /// Expired rows deleted from partitions that also hold younger ones
    /// (the default partition, a table from before partitioning).
    pub deleted_rows: u64,
    /// Days after today that `events` has a partition for, in a row.
    pub days_ahead: i64,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// The table is still a plain one: the migration has not run.
    #[error("{0} is not a partitioned table: run `outpost migrate`")]
    NotPartitioned(&'static str),
    /// PostgreSQL refused or was away.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// One partition as the catalog has it; bounds in minutes since the epoch,
/// `None` for MINVALUE / MAXVALUE.
#[derive(Debug)]
struct Part {
    name: String,
    default: bool,
    lo: Option<i64>,
    hi: Option<i64>,
}

impl Part {
    fn overlaps(&self, lo: i64, hi: i64) -> bool {
        !self.default && self.lo.is_none_or(|l| l < hi) && self.hi.is_none_or(|h| h > lo)
    }
}

/// Creates the partitions of the days from yesterday to `DAYS_AHEAD`
/// after today (UTC) that no partition covers yet and, when
/// `retention_days` is not 0, removes every row from before the UTC
/// midnight that many days ago: whole partitions where they lie before
/// it, and in chunks from the others.
pub async fn maintain(
    pool: &PgPool,
    retention_days: u32,
    now: SystemTime,
) -> Result<Report, PartitionError> {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let today = secs.div_euclid(86_400);
    let cutoff = (retention_days > 0).then(|| today - i64::from(retention_days));
    let mut report = Report::default();
    for table in &TABLES {
        let parts = list(pool, table).await?;
        let default = parts.iter().find(|p| p.default).map(|p| p.name.as_str());
        for day in today - DAYS_BACK..=today + DAYS_AHEAD {
            let (lo, hi) = (day * MINUTES_PER_DAY, (day + 1) * MINUTES_PER_DAY);
            if cutoff.is_some_and(|c| day < c) || parts.iter().any(|p| p.overlaps(lo, hi)) {
                continue;
            }
            if let Some(name) = create(pool, table, day, default).await? {
                report.created.push(name);
            }
        }
        if let Some(cutoff) = cutoff {
            let cut = cutoff * MINUTES_PER_DAY;
            for p in &parts {
                if !p.default && p.hi.is_some_and(|h| h <= cut) {
                    drop_partition(pool, &p.name).await?;
                    report.dropped.push(p.name.clone());
                } else if p.default || p.lo.is_none_or(|l| l < cut) {
                    report.deleted_rows += delete_before(pool, table, &p.name, cut).await?;
                }
            }
        }
        if table.name == "events" {
            let parts = list(pool, table).await?;
            report.days_ahead = (1..)
                .take_while(|d| {
                    let lo = (today + d) * MINUTES_PER_DAY;
                    parts.iter().any(|p| p.overlaps(lo, lo + MINUTES_PER_DAY))
                })
                .count() as i64;
        }
    }
    // The distinct-user sketches are a plain table (a few rows per hour
    // and dimension value): expired hours are deleted.
    if let Some(cutoff) = cutoff {
        report.deleted_rows += sqlx::query("DELETE FROM user_sketches WHERE hour < $1")
            .bind(cutoff * 24)
            .execute(pool)
            .await?
            .rows_affected();
    }
    Ok(report)
}

/// Runs [`maintain`] now and every hour (every minute after a failure)
/// until `stop`.
pub fn spawn(
    pool: PgPool,
    retention_days: u32,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !*stop.borrow() {
            let wait = match maintain(&pool, retention_days, SystemTime::now()).await {
                Ok(report) => {
                    if !report.created.is_empty() || !report.dropped.is_empty() {
                        tracing::info!(
                            created = ?report.created,
                            dropped = ?report.dropped,
                            "PostgreSQL partitions"
                        );
                    }
                    if report.deleted_rows > 0 {
                        tracing::info!(rows = report.deleted_rows, "expired rows deleted");
                    }
                    metrics.postgres_partition_days_ahead.set(report.days_ahead);
                    EVERY
                }
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL partition maintenance failed; retrying in a minute");
                    metrics.postgres_partition_failures.inc();
                    RETRY
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    })
}

/// `table`'s partitions.
async fn list(pool: &PgPool, table: &Table) -> Result<Vec<Part>, PartitionError> {
    let partitioned: bool = sqlx::query_scalar(
        "SELECT coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)), false)",
    )
    .bind(table.name)
    .fetch_one(pool)
    .await?;
    if !partitioned {
        return Err(PartitionError::NotPartitioned(table.name));
    }
    let minutes = |side: usize| {
        format!(
            "(SELECT CASE WHEN v IN ('MINVALUE', 'MAXVALUE') THEN NULL ELSE {} END \
             FROM (SELECT trim(BOTH '''' FROM b[{side}]) AS v) x)",
            table.to_minutes
        )
    };
    let sql = format!(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT', {}, {} \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid, \
         LATERAL (SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid), \
                                      'FROM \\((.+)\\) TO \\((.+)\\)') AS b) m \
         WHERE i.inhparent = to_regclass($1) ORDER BY 1",
        minutes(1),
        minutes(2)
    );
    let rows: Vec<(String, bool, Option<i64>, Option<i64>)> = sqlx::query_as(&sql)
        .bind(table.name)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(name, default, lo, hi)| Part {
            name,
            default,
            lo,
            hi,
        })
        .collect())
}

/// A transaction that waits at most 5 s for any lock, holding the
/// keepers' advisory lock.
async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The partition of `day` (days since the epoch): `events_p20261206`.
fn partition_name(table: &Table, day: i64) -> String {
    let date = chrono::DateTime::from_timestamp(day * 86_400, 0)
        .map_or_else(|| day.to_string(), |t| t.format("%Y%m%d").to_string());
    format!("{}_p{date}", table.name)
}

/// Creates the partition of `day`, moving in the rows the default
/// partition holds for it; `None` when another aggregator was first.
async fn create(
    pool: &PgPool,
    table: &Table,
    day: i64,
    default: Option<&str>,
) -> Result<Option<String>, sqlx::Error> {
    let name = partition_name(table, day);
    let (lo, hi) = (day * MINUTES_PER_DAY, (day + 1) * MINUTES_PER_DAY);
    let mut tx = begin(pool).await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&name)
        .fetch_one(&mut *tx)
        .await?;
    if exists {
        return Ok(None);
    }
    let (parent, column) = (table.name, table.column);
    sqlx::query(&format!(
        "CREATE TABLE {name} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS){}",
        table.storage
    ))
    .execute(&mut *tx)
    .await?;
    let from = |n: usize| table.from_minutes.replace("$1", &format!("${n}"));
    let strays =
        match default {
            Some(default) => sqlx::query_scalar::<_, bool>(&format!(
                "SELECT EXISTS (SELECT 1 FROM {default} WHERE {column} >= {} AND {column} < {})",
                from(1),
                from(2)
            ))
            .bind(lo)
            .bind(hi)
            .fetch_one(&mut *tx)
            .await?,
            None => false,
        };
    if let (Some(default), true) = (default, strays) {
        // Rows move: nobody may read or write the table meanwhile, or a
        // query planned before the new partition was attached would look
        // for them only where they were (the default partition) and miss
        // them. Rare: the keeper creates days before rows need them.
        sqlx::query(&format!("LOCK TABLE {parent} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "WITH moved AS (DELETE FROM {default} WHERE {column} >= {} AND {column} < {} RETURNING *) \
             INSERT INTO {name} SELECT * FROM moved",
            from(1),
            from(2)
        ))
        .bind(lo)
        .bind(hi)
        .execute(&mut *tx)
        .await?;
    }
    // Bounds as literals (DDL takes no parameters), written in UTC.
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut *tx)
        .await?;
    let bound: String = sqlx::query_scalar(&format!(
        "SELECT format('FROM (%L) TO (%L)', {}, {})",
        table.from_minutes,
        table.from_minutes.replace("$1", "$2")
    ))
    .bind(lo)
    .bind(hi)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES {bound}"
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(name))
}

async fn drop_partition(pool: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    let mut tx = begin(pool).await?;
    sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Deletes `partition`'s rows from before `cut` (minutes), a chunk per
/// statement so no transaction grows with the backlog.
async fn delete_before(
    pool: &PgPool,
    table: &Table,
    partition: &str,
    cut: i64,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "DELETE FROM {partition} WHERE ctid = ANY(ARRAY(\
         SELECT ctid FROM {partition} WHERE {} < {} LIMIT {DELETE_CHUNK}))",
        table.column, table.from_minutes
    );
    let mut deleted = 0;
    loop {
        let n = sqlx::query(&sql)
            .bind(cut)
            .execute(pool)
            .await?
            .rows_affected();
        deleted += n;
        if n < DELETE_CHUNK as u64 {
            return Ok(deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_named_by_their_utc_day() {
        let day = 20_429; // 2025-12-07
        assert_eq!(partition_name(&TABLES[0], day), "events_p20251207");
        assert_eq!(partition_name(&TABLES[1], day), "event_counts_p20251207");
    }

    #[test]
    fn a_day_overlaps_a_partition_sharing_any_minute_but_never_the_default() {
        let part = |lo, hi| Part {
            name: String::new(),
            default: false,
            lo,
            hi,
        };
        let day = (1440, 2880);
        assert!(part(None, Some(1441)).overlaps(day.0, day.1));
        assert!(!part(None, Some(1440)).overlaps(day.0, day.1));
        assert!(part(Some(2879), None).overlaps(day.0, day.1));
        assert!(!part(Some(2880), Some(4320)).overlaps(day.0, day.1));
        let default = Part {
            default: true,
            ..part(None, None)
        };
        assert!(!default.overlaps(day.0, day.1));
    }
}
