//! The durable spool: a batch is acknowledged only once it is in here, and
//! it stays until every sink has it. Two backends keep that promise:
//!
//! * [`sqlite`] (the default): one file on this node's disk, fsynced at
//!   every commit. One node; a replaced node needs its volume back.
//! * [`jetstream`]: a NATS JetStream stream, replicated by the NATS
//!   cluster. Any number of nodes share it; each sink is one durable
//!   consumer the nodes take turns on, so a node that dies has its share
//!   redelivered to the others and needs no disk of its own.
//!
//! Ingest appends; one delivery worker per sink (and part) asks for what is
//! [`Spool::due`], writes it, and reports it [`Spool::delivered`] — the same
//! calls on either backend. What they promise alike: a slow sink never
//! holds back another, high priority first, the size bound answered with
//! `503`, dead letters kept within their own bound.

pub mod jetstream;
pub mod sqlite;

use std::time::Duration;

use std::sync::Arc;

use crate::handoff::Checked;

pub use jetstream::{JetStreamConfig, JetStreamSpool};
pub use sqlite::{
    MissingSink, SqliteSpool, dead_letter_totals, delete_dead_letters, drop_sink,
    list_dead_letters, open_for_admin, purge_dead_letters, sink_backlogs,
};

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
    /// Per event: whether ingest accepted it (the verdict delivery keeps,
    /// whatever the limits are by then).
    pub valid: Vec<bool>,
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
    /// The frame as received, to decode, with ingest's verdict per event
    /// (`None` for batches spooled before verdicts were kept).
    Frame(Vec<u8>, Option<Vec<bool>>),
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
    /// What the edge knew about the request (JSON), for a replay.
    pub facts: Option<String>,
    /// The edge that forwarded it.
    pub edge_id: Option<&'a str>,
    /// When.
    pub at_ms: i64,
}

/// A stored dead letter, as `outpost dead-letters` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredDeadLetter {
    /// Its id in the table.
    pub id: i64,
    /// The sink that gave up on it.
    pub sink: String,
    /// The batch it came in.
    pub batch_id: String,
    /// The same, as bytes.
    #[serde(skip)]
    pub batch_bytes: [u8; 16],
    /// Its client.
    pub client_id: String,
    /// The event, when it is one event (else the payload is a whole frame).
    pub event_id: Option<String>,
    /// Why.
    pub error: String,
    /// When, epoch milliseconds.
    pub at_ms: i64,
    /// Payload size, bytes.
    pub bytes: i64,
    /// The event as JSON, or the frame's bytes (only when asked for).
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// The edge's facts (JSON), when kept.
    #[serde(skip)]
    pub facts: Option<String>,
    /// The edge id, when kept.
    #[serde(skip)]
    pub edge_id: Option<String>,
}

/// Why an append failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// Over `max_bytes`: shed load.
    #[error("spool is full")]
    Full,
    /// The disk or SQLite failed; nothing was acknowledged.
    #[error("spool write failed: {0}")]
    Storage(String),
}

/// How a spool is opened.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Size bound of the frames held (ingest answers `503` past it).
    pub max_bytes: u64,
    /// Most frames sharing one commit.
    pub max_frames_per_commit: usize,
    /// Memory for decoded batches kept for the sinks.
    pub handoff_max_bytes: u64,
    /// Size bound of the dead letters kept (oldest dropped past it).
    pub dead_letters_max_bytes: u64,
}

/// Which spool holds acknowledged batches (`spool.backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A SQLite file on this node (`spool.path`).
    #[default]
    Sqlite,
    /// A NATS JetStream stream shared by a fleet (`[spool.jetstream]`).
    Jetstream,
}

/// Handle to the spool, whichever backend; clone freely.
#[derive(Clone)]
pub enum Spool {
    /// On this node's disk.
    Sqlite(Arc<SqliteSpool>),
    /// In a JetStream stream.
    JetStream(JetStreamSpool),
}

fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

impl Spool {
    /// The backend's name, as readiness reports it.
    pub fn check_name(&self) -> &'static str {
        match self {
            Spool::Sqlite(_) => "spool",
            Spool::JetStream(_) => "jetstream",
        }
    }

    /// Appends a frame; returns once it is durable (fsynced, or
    /// acknowledged by JetStream).
    pub async fn append(&self, entry: SpoolEntry) -> Result<(), SpoolError> {
        match self {
            Spool::Sqlite(s) => s.append(entry).await,
            Spool::JetStream(s) => s.append(entry).await,
        }
    }

    /// Whether appends should carry their decoded batch (the hand-off is on).
    pub fn wants_checked(&self) -> bool {
        match self {
            Spool::Sqlite(s) => s.wants_checked(),
            Spool::JetStream(s) => s.wants_checked(),
        }
    }

    /// Waits until something is appended (or a short while has passed).
    pub async fn wait_for_work(&self, max_wait: Duration) {
        match self {
            Spool::Sqlite(s) => s.wait_for_work(max_wait).await,
            Spool::JetStream(s) => s.wait_for_work(max_wait).await,
        }
    }

    /// Up to `limit` batches `sink` may write now, high priority first.
    /// `part` of `parts` names the worker asking: no two workers get the
    /// same batch at once.
    pub async fn due(
        &self,
        sink: &'static str,
        limit: u32,
        part: u32,
        parts: u32,
    ) -> Result<Vec<Pending>, SpoolError> {
        match self {
            Spool::Sqlite(s) => s.due(sink, limit, part, parts).await.map_err(storage),
            Spool::JetStream(s) => s.due(sink, limit, part).await,
        }
    }

    /// Records that `sink` has the batches `seqs` (from [`Spool::due`]).
    pub async fn delivered(&self, sink: &'static str, seqs: &[i64]) -> Result<(), SpoolError> {
        match self {
            Spool::Sqlite(s) => s.delivered(sink, seqs).await.map_err(storage),
            Spool::JetStream(s) => s.delivered(sink, seqs).await,
        }
    }

    /// Stores what a sink could not write, with the reason, within
    /// `spool.dead_letters_max_bytes` (the oldest go first).
    pub async fn dead_letter(&self, letters: &[DeadLetter<'_>]) -> Result<(), SpoolError> {
        match self {
            Spool::Sqlite(s) => s.dead_letter(letters).await.map_err(storage),
            Spool::JetStream(s) => s.dead_letter(letters).await,
        }
    }

    /// Sets the gauges that change from outside this process (dead letters
    /// the operator commands remove; a stream other nodes share).
    pub async fn refresh_gauges(&self) {
        match self {
            Spool::Sqlite(s) => {
                let _ = s.refresh_dead_letter_gauges().await;
            }
            Spool::JetStream(s) => s.refresh_gauges().await,
        }
    }

    /// Dead letters held now (count, payload bytes) and their bound.
    pub async fn dead_letter_summary(&self) -> Result<(i64, i64, u64), SpoolError> {
        match self {
            Spool::Sqlite(s) => s.dead_letter_summary().await.map_err(storage),
            Spool::JetStream(s) => s.dead_letter_summary().await,
        }
    }

    /// Whether the spool can take appends (readiness).
    pub async fn ping(&self) -> bool {
        match self {
            Spool::Sqlite(s) => s.ping().await,
            Spool::JetStream(s) => s.ping().await,
        }
    }

    /// Shutting down: hand out nothing new, only what a worker still holds.
    pub fn begin_drain(&self) {
        if let Spool::JetStream(s) = self {
            s.begin_drain();
        }
    }

    /// After the workers stopped: give back what they did not finish, so
    /// that another node takes it at once.
    pub async fn release_held(&self) {
        if let Spool::JetStream(s) = self {
            s.release_held().await;
        }
    }
}

/// The dead letters as `outpost dead-letters` reads and changes them: the
/// SQLite spool's table, or the JetStream dead-letter stream. Ids are the
/// table's ids or the stream's sequence numbers.
pub enum DeadLetters {
    /// `spool.path`'s `dead_letters` table.
    Sqlite(sqlx::SqlitePool),
    /// The stream `<stream>_DEAD`.
    JetStream(Box<jetstream::DeadLetterStream>),
}

impl DeadLetters {
    /// Opens the dead letters of the configured backend.
    pub async fn open(config: &crate::config::SpoolConfig) -> anyhow::Result<DeadLetters> {
        Ok(match config.backend {
            Backend::Sqlite => DeadLetters::Sqlite(open_for_admin(&config.path).await?),
            Backend::Jetstream => DeadLetters::JetStream(Box::new(
                jetstream::DeadLetterStream::open(&config.jetstream).await?,
            )),
        })
    }

    /// Up to `limit` letters with an id above `after_id`, oldest first,
    /// of one sink or all.
    pub async fn list(
        &self,
        sink: Option<&str>,
        after_id: i64,
        limit: i64,
        with_payload: bool,
    ) -> anyhow::Result<Vec<StoredDeadLetter>> {
        Ok(match self {
            DeadLetters::Sqlite(pool) => {
                list_dead_letters(pool, sink, after_id, limit, with_payload).await?
            }
            DeadLetters::JetStream(s) => s.list(sink, after_id, limit, with_payload).await?,
        })
    }

    /// Deletes letters by id; returns how many went.
    pub async fn delete(&self, ids: &[i64]) -> anyhow::Result<u64> {
        Ok(match self {
            DeadLetters::Sqlite(pool) => delete_dead_letters(pool, ids).await?,
            DeadLetters::JetStream(s) => s.delete(ids).await?,
        })
    }

    /// Deletes every letter (of one sink, older than a time); returns how
    /// many went.
    pub async fn purge(&self, sink: Option<&str>, before_ms: Option<i64>) -> anyhow::Result<u64> {
        Ok(match self {
            DeadLetters::Sqlite(pool) => purge_dead_letters(pool, sink, before_ms).await?,
            DeadLetters::JetStream(s) => s.purge(sink, before_ms).await?,
        })
    }
}
