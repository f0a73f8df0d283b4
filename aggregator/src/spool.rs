//! The durable spool: a batch is acknowledged only once it is in here, and
//! it stays until every sink has it.
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

use crate::handoff::{Checked, Handoff};
use crate::telemetry::Metrics;

/// One acknowledged frame, as stored.
#[derive(Debug, Clone)]
pub struct SpoolEntry {
    /// The frame's batch id.
    pub batch_id: [u8; 16],
    /// The client the events belong to.
    pub client_id: String,
    /// 1 when any event is high priority.
    pub priority: i64,
    /// Events in the frame.
    pub event_count: i64,
    /// The verified frame, exactly as received.
    pub frame: Vec<u8>,
    /// When the aggregator accepted it.
    pub received_at_ms: i64,
    /// What ingest decoded of it, for the hand-off.
    pub checked: Option<Arc<Checked>>,
}

/// A batch a sink has yet to write.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Spool sequence number.
    pub seq: i64,
    /// When the aggregator accepted it.
    pub received_at_ms: i64,
    /// The batch.
    pub batch: Spooled,
}

/// How a sink gets a spooled batch.
#[derive(Debug, Clone)]
pub enum Spooled {
    /// Decoded and validated at ingest, from the hand-off (the frame is
    /// not even read from the file).
    Checked(Arc<Checked>),
    /// The frame as received, to decode.
    Frame(Vec<u8>),
}

/// One dead letter: an event (or a whole frame) a sink could not write.
#[derive(Debug)]
pub struct DeadLetter<'a> {
    /// The sink.
    pub sink: &'a str,
    /// The batch it came in.
    pub batch_id: &'a [u8; 16],
    /// Its client (empty when the frame no longer decodes).
    pub client_id: &'a str,
    /// The event, when it is one event.
    pub event_id: Option<&'a str>,
    /// Why.
    pub error: &'a str,
    /// The event as JSON, or the whole frame.
    pub payload: &'a [u8],
    /// When.
    pub at_ms: i64,
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Over `max_bytes`: shed load.
    #[error("spool is full")]
    Full,
    /// The disk or SQLite failed; nothing was acknowledged.
    #[error("spool write failed: {0}")]
    Storage(String),
}

struct Append {
    entry: SpoolEntry,
    done: oneshot::Sender<Result<(), String>>,
}

/// Handle to the spool; clone freely.
#[derive(Clone)]
pub struct Spool {
    pool: SqlitePool,
    appends: mpsc::Sender<Append>,
    bytes: Arc<AtomicU64>,
    max_bytes: u64,
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

/// A sink new to this spool must still receive what is already spooled; a
/// sink no longer configured must stop holding batches in it.
async fn reconcile_sinks(pool: &SqlitePool, sinks: &[&'static str]) -> Result<(), sqlx::Error> {
    let known: Vec<String> = sqlx::query_scalar("SELECT name FROM sinks")
        .fetch_all(pool)
        .await?;
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
        let n = sqlx::query("DELETE FROM pending WHERE sink = ?")
            .bind(gone)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM sinks WHERE name = ?")
            .bind(gone)
            .execute(&mut *tx)
            .await?;
        tracing::warn!(sink = %gone, dropped = n, "sink no longer configured: its undelivered batches are dropped for it");
    }
    sqlx::query(
        "DELETE FROM spool WHERE NOT EXISTS (SELECT 1 FROM pending p WHERE p.seq = spool.seq)",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
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

impl Spool {
    /// Opens (or creates) the spool and starts its writer. `sinks` names
    /// every sink a new batch must reach; `handoff_max_bytes` bounds the
    /// decoded batches kept in memory for them.
    pub async fn open(
        path: &Path,
        max_bytes: u64,
        max_frames_per_commit: usize,
        handoff_max_bytes: u64,
        sinks: Vec<&'static str>,
        metrics: Metrics,
    ) -> anyhow::Result<Spool> {
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
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        reconcile_sinks(&pool, &sinks).await?;
        let row = sqlx::query("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM spool")
            .fetch_one(&pool)
            .await?;
        let (count, bytes): (i64, i64) = (row.get(0), row.get(1));
        metrics.spool_batches.set(count);
        metrics.spool_bytes.set(bytes as u64);

        let writer = SqliteConnection::connect_with(&opts).await?;
        let (tx, rx) = mpsc::channel(max_frames_per_commit.max(1) * 4);
        let spool = Spool {
            pool,
            appends: tx,
            bytes: Arc::new(AtomicU64::new(bytes as u64)),
            max_bytes,
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
        Ok(spool)
    }

    /// Appends a frame; returns once it is durable.
    pub async fn append(&self, entry: SpoolEntry) -> Result<(), SpoolError> {
        let size = entry.frame.len() as u64;
        // Reserve the bytes first so concurrent appends cannot all slip
        // under the bound together.
        let before = self.bytes.fetch_add(size, Ordering::SeqCst);
        if before + size > self.max_bytes {
            self.bytes.fetch_sub(size, Ordering::SeqCst);
            return Err(SpoolError::Full);
        }
        let (done, wait) = oneshot::channel();
        let result = match self.appends.send(Append { entry, done }).await {
            Ok(()) => wait
                .await
                .unwrap_or_else(|_| Err("spool writer stopped".into())),
            Err(_) => Err("spool writer stopped".into()),
        };
        match result {
            Ok(()) => {
                self.metrics
                    .spool_bytes
                    .set(self.bytes.load(Ordering::SeqCst));
                self.metrics.spool_batches.inc();
                Ok(())
            }
            Err(e) => {
                self.bytes.fetch_sub(size, Ordering::SeqCst);
                Err(SpoolError::Storage(e))
            }
        }
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
                    Spooled::Frame(Vec::new())
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
        let mut frames: std::collections::HashMap<i64, Vec<u8>> = sqlx::query(
            "SELECT seq, frame FROM spool WHERE seq IN (SELECT value FROM json_each(?))",
        )
        .bind(&list)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        // A batch pending for this sink stays in the spool, so every frame
        // is there; one that is not is left for the next round.
        due.retain_mut(|p| match &mut p.batch {
            Spooled::Checked(_) => true,
            Spooled::Frame(f) => frames.remove(&p.seq).map(|bytes| *f = bytes).is_some(),
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

    /// Stores what a sink could not write, with the reason, for an operator.
    pub async fn dead_letter(&self, d: &DeadLetter<'_>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO dead_letters (sink, batch_id, client_id, event_id, error, payload, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(d.sink)
        .bind(&d.batch_id[..])
        .bind(d.client_id)
        .bind(d.event_id)
        .bind(d.error)
        .bind(d.payload)
        .bind(d.at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
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
    spool: Spool,
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
            .map_err(|e| e.to_string());
        spool.metrics.handoff_bytes.set(spool.handoff.bytes());
        if let Err(e) = &result {
            tracing::error!(error = %e, frames = group.len(), "spool commit failed; frames not acknowledged");
        }
        for a in group.drain(..) {
            let _ = a.done.send(result.clone());
        }
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
        let seq: i64 = sqlx::query(
            "INSERT INTO spool (batch_id, client_id, priority, event_count, bytes, frame, received_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(&e.batch_id[..])
        .bind(&e.client_id)
        .bind(e.priority)
        .bind(e.event_count)
        .bind(e.frame.len() as i64)
        .bind(&e.frame)
        .bind(e.received_at_ms)
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
