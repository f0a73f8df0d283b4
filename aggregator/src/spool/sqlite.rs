//! The SQLite spool (the default, one node): a batch is acknowledged only
//! once it is in here, and it stays until every sink has it.
//!
//! Storage is SQLite in WAL mode. Appends are committed with
//! `synchronous=FULL`, so an acknowledged frame has been fsynced (see
//! ARCHITECTURE.md for why SQLite). The bookkeeping after delivery (cursor
//! moves, dead letters) is committed with `synchronous=NORMAL`: no fsync of
//! its own, made durable by the next append's fsync (the WAL is one file,
//! written in order). Power lost in between only forgets that some batches
//! were delivered, and they are delivered again — every sink stores a
//! batch once however often it gets it.
//! Frames are appended by one writer task that commits whatever has queued
//! up since the last fsync in one transaction (group commit): under load
//! many frames share one fsync; when idle a frame waits for none.
//!
//! Each sink has its own rows in `pending` — its cursor — so a slow or dead
//! sink never holds back another. A spooled batch is deleted when its last
//! pending row is. High-priority batches are handed out first.
//!
//! Next to the file, the spool keeps what ingest decoded of recent frames
//! in memory ([`Handoff`]), so the sinks need not decode them again.

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection as _, Row as _, SqliteConnection};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::handoff::Handoff;
use crate::telemetry::Metrics;

use super::{DeadLetter, Pending, SpoolEntry, SpoolError, SpoolOptions, Spooled, StoredDeadLetter};

/// Bytes of the spool's bound held for one frame on its way in. Dropped,
/// it gives them back — whoever holds it then: the ingest request (it gave
/// up before the frame reached the writer), the channel (the writer is
/// gone) or the writer (the commit failed). Only a commit keeps them, by
/// [`Reservation::keep`].
struct Reservation {
    bytes: Arc<AtomicU64>,
    size: u64,
}

impl Reservation {
    /// The frame is committed: its bytes stay counted until delivered.
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.bytes.fetch_sub(self.size, Ordering::SeqCst);
    }
}

struct Append {
    entry: SpoolEntry,
    reservation: Reservation,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// Handle to the spool; clone freely.
#[derive(Clone)]
pub struct SqliteSpool {
    pool: SqlitePool,
    appends: mpsc::Sender<Append>,
    bytes: Arc<AtomicU64>,
    max_bytes: u64,
    dead_letters_max_bytes: u64,
    appended: Arc<Notify>,
    handoff: Arc<Handoff>,
    metrics: Metrics,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS spool (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id       BLOB    NOT NULL,
    client_id      TEXT    NOT NULL,
    priority       INTEGER NOT NULL,
    event_count    INTEGER NOT NULL,
    bytes          INTEGER NOT NULL,
    frame          BLOB    NOT NULL,
    received_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    sink     TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sinks (name TEXT PRIMARY KEY);
CREATE INDEX IF NOT EXISTS pending_order ON pending (sink, priority DESC, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    sink      TEXT    NOT NULL,
    batch_id  BLOB    NOT NULL,
    client_id TEXT    NOT NULL,
    event_id  TEXT,
    error     TEXT    NOT NULL,
    payload   BLOB    NOT NULL,
    at_ms     INTEGER NOT NULL
);
"#;

/// Columns added since the first spool files: added to older files at open.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("spool", "valid", "BLOB"),
    ("dead_letters", "facts", "TEXT"),
    ("dead_letters", "edge_id", "TEXT"),
];

async fn migrate(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(SCHEMA).execute(pool).await?;
    for (table, column, ty) in ADDED_COLUMNS {
        let present: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"
        ))
        .fetch_one(pool)
        .await?;
        if present == 0 {
            sqlx::query(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

/// A sink the spool holds batches for that the configuration no longer
/// names: starting would drop what it has yet to receive.
#[derive(Debug, thiserror::Error)]
#[error(
    "the spool holds {backlog} batch(es) for sink {sink:?}, which is not configured: enable it again to deliver them, or drop them with `outpost spool drop-sink {sink}`"
)]
pub struct MissingSink {
    /// The sink.
    pub sink: String,
    /// Batches it has yet to receive.
    pub backlog: i64,
}

/// A sink new to this spool must still receive what is already spooled; a
/// sink no longer configured may only go when it has nothing left to
/// deliver (else [`MissingSink`]: an operator decides).
async fn reconcile_sinks(pool: &SqlitePool, sinks: &[&'static str]) -> anyhow::Result<()> {
    let known: Vec<String> = sqlx::query_scalar("SELECT name FROM sinks")
        .fetch_all(pool)
        .await?;
    for gone in known.iter().filter(|k| !sinks.contains(&k.as_str())) {
        let backlog: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pending WHERE sink = ?")
            .bind(gone)
            .fetch_one(pool)
            .await?;
        if backlog > 0 {
            return Err(MissingSink {
                sink: gone.clone(),
                backlog,
            }
            .into());
        }
    }
    let mut tx = pool.begin().await?;
    for sink in sinks.iter().filter(|s| !known.iter().any(|k| k == *s)) {
        sqlx::query("INSERT INTO sinks (name) VALUES (?)")
            .bind(*sink)
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query("INSERT OR IGNORE INTO pending (sink, seq, priority) SELECT ?, seq, priority FROM spool")
            .bind(*sink)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tracing::info!(
            sink,
            backlog = n,
            "new sink: it will receive the spooled batches"
        );
    }
    for gone in known.iter().filter(|k| !sinks.contains(&k.as_str())) {
        sqlx::query("DELETE FROM sinks WHERE name = ?")
            .bind(gone)
            .execute(&mut *tx)
            .await?;
        tracing::info!(sink = %gone, "sink no longer configured and nothing left for it: forgotten");
    }
    sqlx::query(
        "DELETE FROM spool WHERE NOT EXISTS (SELECT 1 FROM pending p WHERE p.seq = spool.seq)",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Opens a spool file for the operator commands (`outpost spool`,
/// `outpost dead-letters`), beside a running aggregator if there is one:
/// SQLite's locks keep the two apart.
pub async fn open_for_admin(path: &Path) -> anyhow::Result<SqlitePool> {
    anyhow::ensure!(path.exists(), "no spool at {} (spool.path)", path.display());
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options(path)?.create_if_missing(false))
        .await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// Each sink the spool knows, with the batches it has yet to receive.
pub async fn sink_backlogs(pool: &SqlitePool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.name, (SELECT COUNT(*) FROM pending p WHERE p.sink = s.name) FROM sinks s ORDER BY s.name",
    )
    .fetch_all(pool)
    .await
}

/// Forgets a sink and drops what it had yet to receive (`outpost spool
/// drop-sink`); batches no other sink needs leave the spool. Returns the
/// number of batches dropped for it. Run it while no aggregator holds the
/// spool for that sink (a running one would write its rows back).
pub async fn drop_sink(pool: &SqlitePool, sink: &str) -> anyhow::Result<i64> {
    let mut tx = pool.begin().await?;
    let known: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sinks WHERE name = ?")
        .bind(sink)
        .fetch_one(&mut *tx)
        .await?;
    anyhow::ensure!(known == 1, "the spool has no sink {sink:?}");
    let dropped = sqlx::query("DELETE FROM pending WHERE sink = ?")
        .bind(sink)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM sinks WHERE name = ?")
        .bind(sink)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM spool WHERE NOT EXISTS (SELECT 1 FROM pending p WHERE p.seq = spool.seq)",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(i64::try_from(dropped).unwrap_or(i64::MAX))
}

/// The dead letters, oldest first, optionally of one sink; at most `limit`.
pub async fn list_dead_letters(
    pool: &SqlitePool,
    sink: Option<&str>,
    after_id: i64,
    limit: i64,
    with_payload: bool,
) -> Result<Vec<StoredDeadLetter>, sqlx::Error> {
    let payload = if with_payload { "payload" } else { "x''" };
    let rows = sqlx::query(&format!(
        "SELECT id, sink, batch_id, client_id, event_id, error, at_ms, length(payload), {payload}, facts, edge_id \
         FROM dead_letters WHERE id > ? AND (? IS NULL OR sink = ?) ORDER BY id LIMIT ?"
    ))
    .bind(after_id)
    .bind(sink)
    .bind(sink)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let batch_bytes: [u8; 16] = r.get::<Vec<u8>, _>(2).try_into().unwrap_or_default();
            (r, batch_bytes)
        })
        .map(|(r, batch_bytes)| StoredDeadLetter {
            id: r.get(0),
            sink: r.get(1),
            batch_id: outpost_shared::frame::BatchId(batch_bytes).to_string(),
            batch_bytes,
            client_id: r.get(3),
            event_id: r.get(4),
            error: r.get(5),
            at_ms: r.get(6),
            bytes: r.get(7),
            payload: r.get(8),
            facts: r.get(9),
            edge_id: r.get(10),
        })
        .collect())
}

/// Deletes dead letters by id; returns how many went.
pub async fn delete_dead_letters(pool: &SqlitePool, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
    Ok(
        sqlx::query("DELETE FROM dead_letters WHERE id IN (SELECT value FROM json_each(?))")
            .bind(list)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Deletes every dead letter (of one sink, older than a time); returns
/// how many went.
pub async fn purge_dead_letters(
    pool: &SqlitePool,
    sink: Option<&str>,
    before_ms: Option<i64>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM dead_letters WHERE (? IS NULL OR sink = ?) AND (? IS NULL OR at_ms < ?)",
    )
    .bind(sink)
    .bind(sink)
    .bind(before_ms)
    .bind(before_ms)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Count and payload bytes of the dead letters held.
pub async fn dead_letter_totals(pool: &SqlitePool) -> Result<(i64, i64), sqlx::Error> {
    let r = sqlx::query("SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM dead_letters")
        .fetch_one(pool)
        .await?;
    Ok((r.get(0), r.get(1)))
}

fn options(path: &Path) -> Result<SqliteConnectOptions, sqlx::Error> {
    Ok(
        SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: the WAL is fsynced at every commit, so an acknowledged
            // batch survives power loss, not just a process crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10)),
    )
}

impl SqliteSpool {
    /// Opens (or creates) the spool and starts its writer. `sinks` names
    /// every sink a new batch must reach; `handoff_max_bytes` bounds the
    /// decoded batches kept in memory for them.
    pub async fn open(
        path: &Path,
        opts_in: &SpoolOptions,
        sinks: Vec<&'static str>,
        metrics: Metrics,
    ) -> anyhow::Result<SqliteSpool> {
        let SpoolOptions {
            max_bytes,
            max_frames_per_commit,
            handoff_max_bytes,
            dead_letters_max_bytes,
        } = opts_in.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let opts = options(path)?;
        // The readers and the delivery bookkeeping; appends have their own
        // connection below, with every commit fsynced.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone().synchronous(SqliteSynchronous::Normal))
            .await?;
        migrate(&pool).await?;
        reconcile_sinks(&pool, &sinks).await?;
        let row = sqlx::query("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM spool")
            .fetch_one(&pool)
            .await?;
        let (count, bytes): (i64, i64) = (row.get(0), row.get(1));
        metrics.spool_batches.set(count);
        metrics.spool_bytes.set(bytes as u64);

        let writer = SqliteConnection::connect_with(&opts).await?;
        let (tx, rx) = mpsc::channel(max_frames_per_commit.max(1) * 4);
        let spool = SqliteSpool {
            pool,
            appends: tx,
            bytes: Arc::new(AtomicU64::new(bytes as u64)),
            max_bytes,
            dead_letters_max_bytes,
            appended: Arc::new(Notify::new()),
            handoff: Arc::new(Handoff::new(handoff_max_bytes, sinks.len())),
            metrics,
        };
        tokio::spawn(write_loop(
            writer,
            rx,
            sinks,
            max_frames_per_commit.max(1),
            spool.clone(),
        ));
        spool.refresh_dead_letter_gauges().await?;
        Ok(spool)
    }

    /// Appends a frame; returns once it is durable.
    ///
    /// Dropping the returned future (a request that timed out) never leaks
    /// the frame's share of `max_bytes`: the reservation goes back when the
    /// frame is not committed, wherever it is by then.
    pub async fn append(&self, entry: SpoolEntry) -> Result<(), SpoolError> {
        let size = entry.frame.len() as u64;
        // Reserve the bytes first so concurrent appends cannot all slip
        // under the bound together.
        let before = self.bytes.fetch_add(size, Ordering::SeqCst);
        let reservation = Reservation {
            bytes: self.bytes.clone(),
            size,
        };
        if before + size > self.max_bytes {
            return Err(SpoolError::Full);
        }
        let (done, wait) = oneshot::channel();
        let append = Append {
            entry,
            reservation,
            done,
        };
        let stopped = || SpoolError::Storage("spool writer stopped".into());
        match self.appends.send(append).await {
            Ok(()) => wait.await.unwrap_or_else(|_| Err(stopped()))?,
            Err(_) => return Err(stopped()),
        }
        self.metrics.spool_batches.inc();
        Ok(())
    }

    /// Whether appends should carry their decoded batch (the hand-off is on).
    pub fn wants_checked(&self) -> bool {
        self.handoff.enabled()
    }

    /// Waits until something is appended (or a short while has passed).
    pub async fn wait_for_work(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.appended.notified()).await;
    }

    /// Up to `limit` batches `sink` may write now, high priority first.
    /// `part` of `parts` splits a sink's backlog between its workers by
    /// sequence number, so that they never take the same batch.
    pub async fn due(
        &self,
        sink: &str,
        limit: u32,
        part: u32,
        parts: u32,
    ) -> Result<Vec<Pending>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT p.seq, s.received_at_ms FROM pending p JOIN spool s ON s.seq = p.seq \
             WHERE p.sink = ? AND p.seq % ? = ? ORDER BY p.priority DESC, p.seq LIMIT ?",
        )
        .bind(sink)
        .bind(i64::from(parts.max(1)))
        .bind(i64::from(part))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut due = Vec::with_capacity(rows.len());
        let mut unheld = Vec::new();
        for r in rows {
            let seq: i64 = r.get(0);
            let batch = match self.handoff.get(seq) {
                Some(c) => Spooled::Checked(c),
                None => {
                    unheld.push(seq);
                    Spooled::Frame(Vec::new(), None)
                }
            };
            due.push(Pending {
                seq,
                received_at_ms: r.get(1),
                batch,
            });
        }
        if unheld.is_empty() {
            return Ok(due);
        }
        // Only the frames the hand-off does not hold are read.
        let list = serde_json::to_string(&unheld).unwrap_or_else(|_| "[]".into());
        let mut frames: std::collections::HashMap<i64, (Vec<u8>, Option<Vec<u8>>)> = sqlx::query(
            "SELECT seq, frame, valid FROM spool WHERE seq IN (SELECT value FROM json_each(?))",
        )
        .bind(&list)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
        // A batch pending for this sink stays in the spool, so every frame
        // is there; one that is not is left for the next round.
        due.retain_mut(|p| match &mut p.batch {
            Spooled::Checked(_) => true,
            Spooled::Frame(f, valid) => frames
                .remove(&p.seq)
                .map(|(bytes, verdict)| {
                    *f = bytes;
                    *valid = verdict.map(|v| v.iter().map(|b| *b != 0).collect());
                })
                .is_some(),
        });
        Ok(due)
    }

    /// Records that `sink` has the batches `seqs`; drops batches every sink has.
    pub async fn delivered(&self, sink: &str, seqs: &[i64]) -> Result<(), sqlx::Error> {
        if seqs.is_empty() {
            return Ok(());
        }
        let list = serde_json::to_string(seqs).unwrap_or_else(|_| "[]".into());
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM pending WHERE sink = ? AND seq IN (SELECT value FROM json_each(?))",
        )
        .bind(sink)
        .bind(&list)
        .execute(&mut *tx)
        .await?;
        let freed = sqlx::query(
            "DELETE FROM spool WHERE seq IN (SELECT value FROM json_each(?)) \
             AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.seq = spool.seq) RETURNING bytes",
        )
        .bind(&list)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        self.handoff.release(seqs);
        self.metrics.handoff_bytes.set(self.handoff.bytes());
        let bytes: i64 = freed.iter().map(|r| r.get::<i64, _>(0)).sum();
        self.bytes.fetch_sub(bytes as u64, Ordering::SeqCst);
        self.metrics
            .spool_bytes
            .set(self.bytes.load(Ordering::SeqCst));
        self.metrics.spool_batches.dec_by(freed.len() as i64);
        Ok(())
    }

    /// Stores what a sink could not write, with the reason, for an
    /// operator (`outpost dead-letters`), in one transaction; then keeps
    /// the table within `spool.dead_letters_max_bytes` by dropping the
    /// oldest (counted in `outpost_dead_letters_dropped_total`).
    pub async fn dead_letter(&self, letters: &[DeadLetter<'_>]) -> Result<(), sqlx::Error> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for d in letters {
            sqlx::query(
                "INSERT INTO dead_letters (sink, batch_id, client_id, event_id, error, payload, at_ms, facts, edge_id) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(d.sink)
            .bind(&d.batch_id[..])
            .bind(d.client_id)
            .bind(d.event_id)
            .bind(d.error)
            .bind(d.payload)
            .bind(d.at_ms)
            .bind(d.facts.as_deref())
            .bind(d.edge_id)
            .execute(&mut *tx)
            .await?;
        }
        // The newest letters that fit the bound stay; everything older goes.
        let dropped = sqlx::query(
            "DELETE FROM dead_letters WHERE id <= (SELECT id FROM \
               (SELECT id, SUM(length(payload)) OVER (ORDER BY id DESC) AS kept FROM dead_letters) \
             WHERE kept > ? ORDER BY id DESC LIMIT 1)",
        )
        .bind(i64::try_from(self.dead_letters_max_bytes).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if dropped > 0 {
            self.metrics.dead_letters_dropped.inc_by(dropped);
            tracing::warn!(
                dropped,
                bound = self.dead_letters_max_bytes,
                "dead letters over spool.dead_letters_max_bytes: the oldest were dropped"
            );
        }
        self.refresh_dead_letter_gauges().await
    }

    /// Sets the dead-letter gauges from the table (which the operator
    /// commands change too).
    pub async fn refresh_dead_letter_gauges(&self) -> Result<(), sqlx::Error> {
        let (count, bytes) = dead_letter_totals(&self.pool).await?;
        self.metrics.dead_letters.set(count);
        self.metrics.dead_letter_bytes.set(bytes);
        Ok(())
    }

    /// Dead letters held now (count, payload bytes) and their bound, for
    /// readiness.
    pub async fn dead_letter_summary(&self) -> Result<(i64, i64, u64), sqlx::Error> {
        let (count, bytes) = dead_letter_totals(&self.pool).await?;
        self.metrics.dead_letters.set(count);
        self.metrics.dead_letter_bytes.set(bytes);
        Ok((count, bytes, self.dead_letters_max_bytes))
    }

    /// Whether the spool answers a trivial query (readiness).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Frame bytes held now.
    pub fn usage_bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

async fn write_loop(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Append>,
    sinks: Vec<&'static str>,
    max_per_commit: usize,
    spool: SqliteSpool,
) {
    let mut group = Vec::with_capacity(max_per_commit);
    while let Some(first) = rx.recv().await {
        group.push(first);
        while group.len() < max_per_commit {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let result = commit_group(&mut conn, &group, &sinks, &spool.handoff)
            .await
            .map_err(|e| SpoolError::Storage(e.to_string()));
        spool.metrics.handoff_bytes.set(spool.handoff.bytes());
        if let Err(e) = &result {
            tracing::error!(error = %e, frames = group.len(), "spool commit failed; frames not acknowledged");
        }
        for a in group.drain(..) {
            if result.is_ok() {
                a.reservation.keep();
            }
            // A failed commit drops the reservation here, whether or not
            // the request that sent the frame is still waiting.
            let _ = a.done.send(result.clone());
        }
        spool
            .metrics
            .spool_bytes
            .set(spool.bytes.load(Ordering::SeqCst));
        spool.appended.notify_waiters();
    }
}

/// Commits `group` in one transaction. Each batch goes into the hand-off
/// before the commit makes it visible to the sinks (so none can miss it),
/// and out again when the commit fails (its sequence number will be reused).
async fn commit_group(
    conn: &mut SqliteConnection,
    group: &[Append],
    sinks: &[&'static str],
    handoff: &Handoff,
) -> Result<(), sqlx::Error> {
    let mut handed = Vec::new();
    let result = insert_group(conn, group, sinks, handoff, &mut handed).await;
    if result.is_err() {
        handoff.forget(&handed);
    }
    result
}

async fn insert_group(
    conn: &mut SqliteConnection,
    group: &[Append],
    sinks: &[&'static str],
    handoff: &Handoff,
    handed: &mut Vec<i64>,
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    for a in group {
        let e = &a.entry;
        let valid: Vec<u8> = e.valid.iter().map(|v| u8::from(*v)).collect();
        let seq: i64 = sqlx::query(
            "INSERT INTO spool (batch_id, client_id, priority, event_count, bytes, frame, received_at_ms, valid) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(&e.batch_id[..])
        .bind(&e.client_id)
        .bind(e.priority)
        .bind(e.event_count)
        .bind(e.frame.len() as i64)
        .bind(&e.frame)
        .bind(e.received_at_ms)
        .bind(valid)
        .fetch_one(&mut *tx)
        .await?
        .get(0);
        for sink in sinks {
            sqlx::query("INSERT INTO pending (sink, seq, priority) VALUES (?, ?, ?)")
                .bind(*sink)
                .bind(seq)
                .bind(e.priority)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(c) = &e.checked
            && handoff.put(seq, c.clone())
        {
            handed.push(seq);
        }
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options_for_tests() -> SpoolOptions {
        SpoolOptions {
            max_bytes: 1 << 20,
            max_frames_per_commit: 16,
            handoff_max_bytes: 0,
            dead_letters_max_bytes: 1 << 20,
        }
    }

    fn metrics() -> Metrics {
        Metrics::new(&mut prometheus_client::registry::Registry::default())
    }

    fn entry(bytes: usize) -> SpoolEntry {
        SpoolEntry {
            batch_id: [1; 16],
            client_id: "c".into(),
            priority: 0,
            event_count: 1,
            frame: vec![7; bytes],
            received_at_ms: 0,
            valid: vec![true],
            checked: None,
        }
    }

    #[tokio::test]
    async fn a_commit_that_fails_after_the_caller_gave_up_returns_the_reserved_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let spool = SqliteSpool::open(&path, &options_for_tests(), vec!["s"], metrics())
            .await
            .unwrap();
        // Another connection holds the write lock: the commit waits.
        let mut other = SqliteConnection::connect_with(&options(&path).unwrap())
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap();
        let gave_up =
            tokio::time::timeout(Duration::from_millis(200), spool.append(entry(1000))).await;
        assert!(gave_up.is_err(), "the caller timed out");
        assert_eq!(
            spool.usage_bytes(),
            1000,
            "still reserved while in the writer"
        );
        // Then the commit fails.
        sqlx::query(
            "CREATE TRIGGER fail BEFORE INSERT ON spool BEGIN SELECT RAISE(ABORT, 'forced'); END",
        )
        .execute(&mut other)
        .await
        .unwrap();
        sqlx::query("COMMIT").execute(&mut other).await.unwrap();
        for _ in 0..100 {
            if spool.usage_bytes() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(spool.usage_bytes(), 0, "the reservation came back");
        sqlx::query("DROP TRIGGER fail")
            .execute(&mut other)
            .await
            .unwrap();
        spool.append(entry(1000)).await.unwrap();
        assert_eq!(spool.usage_bytes(), 1000, "a commit keeps it");
    }

    #[tokio::test]
    async fn a_full_spool_refuses_without_keeping_a_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions {
            max_bytes: 1500,
            ..options_for_tests()
        };
        let spool = SqliteSpool::open(&dir.path().join("s.db"), &opts, vec!["s"], metrics())
            .await
            .unwrap();
        spool.append(entry(1000)).await.unwrap();
        assert!(matches!(
            spool.append(entry(1000)).await,
            Err(SpoolError::Full)
        ));
        assert_eq!(spool.usage_bytes(), 1000);
    }

    #[tokio::test]
    async fn dead_letters_keep_the_newest_within_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions {
            dead_letters_max_bytes: 2500,
            ..options_for_tests()
        };
        let spool = SqliteSpool::open(&dir.path().join("s.db"), &opts, vec!["s"], metrics())
            .await
            .unwrap();
        let payload = vec![b'x'; 1000];
        for round in 0..3 {
            let ids: Vec<String> = (0..4).map(|i| format!("e{round}-{i}")).collect();
            let letters: Vec<DeadLetter<'_>> = ids
                .iter()
                .map(|id| DeadLetter {
                    sink: "s",
                    batch_id: &[1; 16],
                    client_id: "c",
                    event_id: Some(id),
                    error: "refused",
                    payload: &payload,
                    facts: None,
                    edge_id: None,
                    at_ms: 0,
                })
                .collect();
            spool.dead_letter(&letters).await.unwrap();
        }
        let kept = list_dead_letters(&spool.pool, None, 0, 100, false)
            .await
            .unwrap();
        let ids: Vec<_> = kept.iter().filter_map(|d| d.event_id.clone()).collect();
        assert_eq!(ids, ["e2-2", "e2-3"], "the two newest fit 2500 bytes");
        assert_eq!(spool.metrics.dead_letters_dropped.get(), 10);
        assert_eq!(spool.metrics.dead_letters.get(), 2);
        assert_eq!(spool.metrics.dead_letter_bytes.get(), 2000);
    }

    #[tokio::test]
    async fn a_sink_with_a_backlog_cannot_be_configured_away_only_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let spool = SqliteSpool::open(&path, &options_for_tests(), vec!["a", "b"], metrics())
                .await
                .unwrap();
            spool.append(entry(10)).await.unwrap();
            let due = spool.due("a", 10, 0, 1).await.unwrap();
            spool
                .delivered("a", &due.iter().map(|p| p.seq).collect::<Vec<_>>())
                .await
                .unwrap();
        }
        // `a` has everything; `b` has a backlog of one batch.
        let err = SqliteSpool::open(&path, &options_for_tests(), vec!["a"], metrics())
            .await
            .err()
            .expect("refused");
        let missing = err.downcast_ref::<MissingSink>().expect("MissingSink");
        assert_eq!((missing.sink.as_str(), missing.backlog), ("b", 1));
        assert!(
            SqliteSpool::open(&path, &options_for_tests(), vec!["b"], metrics())
                .await
                .is_ok(),
            "a sink with nothing left may go"
        );
        let pool = open_for_admin(&path).await.unwrap();
        assert_eq!(sink_backlogs(&pool).await.unwrap(), [("b".to_owned(), 1)]);
        assert_eq!(drop_sink(&pool, "b").await.unwrap(), 1);
        assert!(sink_backlogs(&pool).await.unwrap().is_empty());
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM spool")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(left, 0);
        assert!(
            SqliteSpool::open(&path, &options_for_tests(), vec!["a"], metrics())
                .await
                .is_ok()
        );
    }
}
