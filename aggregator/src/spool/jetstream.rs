//! The JetStream spool (`spool.backend = "jetstream"`): acknowledged
//! batches live in a NATS JetStream stream that every aggregator of a
//! fleet shares, replicated by the NATS cluster — no node keeps anything
//! that matters on its own disk.
//!
//! * **Append**: ingest publishes the verified frame and answers `202` only
//!   after JetStream's publish acknowledgement (with `replicas = 3`, after a
//!   quorum of the cluster stored it). The batch id (with the frame's MAC)
//!   is the `Nats-Msg-Id`, so an edge retrying the same frame — on this
//!   node or another — is stored once within `duplicate_window_secs`; past
//!   that window Redis dedup drops its events. The stream's `max_bytes` (= `spool.max_bytes`,
//!   discard-new) is the size bound: a publish past it is answered `503` +
//!   `Retry-After`, as a full SQLite spool is.
//! * **Delivery**: each sink is two durable pull consumers (high and normal
//!   priority subjects) shared by every node: whichever node fetches a
//!   message writes it, and acknowledges it only after the sink committed.
//!   A node that dies holding messages has them redelivered to the others
//!   after `ack_wait_secs`; while a node holds messages (a long write, a
//!   sink down and retried with backoff) it sends in-progress
//!   acknowledgements so they are not redelivered under it. The stream
//!   keeps a message until every sink's consumer acknowledged it
//!   (interest retention), so one slow sink never holds back another.
//! * **Dead letters** go to their own stream (`<stream>_DEAD`), bounded by
//!   `spool.dead_letters_max_bytes` with the oldest dropped first.
//! * **Drain**: on SIGTERM the workers finish what they hold and fetch
//!   nothing new; what is left unfinished is handed back (negative ack),
//!   so another node takes it at once instead of after `ack_wait_secs`.
//!
//! The hand-off (decoded batches in memory) serves the node that received a
//! batch when its own workers fetch it; any other node decodes the frame.
//! The stream is the one copy that counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::handoff::Handoff;
use crate::telemetry::{Metrics, SinkLabel};

use super::{DeadLetter, Pending, SpoolEntry, SpoolError, SpoolOptions, Spooled};

/// `[spool.jetstream]`: the stream a fleet shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamConfig {
    /// NATS server URLs (any of the cluster's; the client learns the rest).
    pub urls: Vec<String>,
    /// The stream holding acknowledged batches (created if missing); dead
    /// letters go to `<stream>_DEAD`.
    pub stream: String,
    /// Subject prefix: batches are published to `<subject>.high` and
    /// `<subject>.normal`, dead letters to `<subject>.dead`.
    pub subject: String,
    /// Copies of each message the NATS cluster keeps (3 in a cluster of
    /// three; 1 on a single server).
    pub replicas: usize,
    /// How long JetStream remembers a batch id to drop an edge's retry of
    /// the same frame, in seconds.
    pub duplicate_window_secs: u64,
    /// How long a node may hold a batch without acknowledging it before
    /// JetStream hands it to another node, in seconds (a node still
    /// working on it extends this with in-progress acknowledgements).
    pub ack_wait_secs: u64,
    /// Most batches handed out and not yet acknowledged, per sink and
    /// priority, over the whole fleet.
    pub max_ack_pending: i64,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            urls: vec!["nats://127.0.0.1:4222".into()],
            stream: "OUTPOST_BATCHES".into(),
            subject: "outpost.batches".into(),
            replicas: 1,
            duplicate_window_secs: 120,
            ack_wait_secs: 30,
            max_ack_pending: 4096,
        }
    }
}

/// Bytes of a message beyond the frame (the headers): the NATS server's
/// `max_payload` must leave this much room above `server.frame.max_frame_bytes`.
pub const HEADER_ROOM: usize = 4096;

const HEADER_VALID: &str = "Outpost-Valid";
const HEADER_RECEIVED: &str = "Outpost-Received-At";

/// The two consumers of one sink.
struct SinkConsumers {
    high: PullConsumer,
    normal: PullConsumer,
}

/// A message a worker fetched and has not acknowledged yet.
struct Held {
    part: u32,
    message: jetstream::Message,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    config: JetStreamConfig,
    dead_stream: String,
    dead_subject: String,
    dead_letters_max_bytes: u64,
    consumers: HashMap<&'static str, SinkConsumers>,
    held: Mutex<HashMap<(&'static str, i64), Held>>,
    draining: AtomicBool,
    appended: Notify,
    handoff: Handoff,
    metrics: Metrics,
}

/// Handle to the JetStream spool; clone freely.
#[derive(Clone)]
pub struct JetStreamSpool {
    inner: Arc<Inner>,
}

fn storage(what: &str, e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(format!("{what}: {e}"))
}

/// The durable consumer of `sink` for one priority.
fn consumer_name(sink: &str, priority: &str) -> String {
    format!("{sink}-{priority}")
}

impl JetStreamSpool {
    /// Connects, creates (or updates) the streams and every sink's
    /// consumers, and starts the task that keeps held messages alive and
    /// the gauges current. Refuses to start when the server cannot carry a
    /// frame of `max_frame_bytes`, or when the stream holds a backlog for a
    /// sink this node does not name.
    pub async fn open(
        config: &JetStreamConfig,
        opts: &SpoolOptions,
        sinks: Vec<&'static str>,
        max_frame_bytes: usize,
        metrics: Metrics,
    ) -> anyhow::Result<JetStreamSpool> {
        let client = connect(config, "outpost-aggregator").await?;
        let max_payload = client.server_info().max_payload;
        if max_payload < max_frame_bytes + HEADER_ROOM {
            bail!(
                "the NATS server takes messages of at most {max_payload} bytes (max_payload), \
                 but a frame may be {max_frame_bytes} bytes (server.frame.max_frame_bytes): \
                 set max_payload to at least {} in the NATS server's configuration",
                max_frame_bytes + HEADER_ROOM
            );
        }
        let js = jetstream::new(client.clone());
        let subject = &config.subject;
        let stream = js
            .create_or_update_stream(stream::Config {
                name: config.stream.clone(),
                subjects: vec![format!("{subject}.high"), format!("{subject}.normal")],
                retention: RetentionPolicy::Interest,
                storage: StorageType::File,
                max_bytes: i64::try_from(opts.max_bytes).unwrap_or(i64::MAX),
                discard: DiscardPolicy::New,
                duplicate_window: Duration::from_secs(config.duplicate_window_secs),
                num_replicas: config.replicas,
                description: Some("Outpost: acknowledged batches until every sink has them".into()),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the JetStream stream {}", config.stream))?;
        tracing::info!(
            stream = %config.stream,
            batches = stream.state.messages,
            bytes = stream.state.bytes,
            replicas = config.replicas,
            "JetStream spool"
        );
        let dead_stream = format!("{}_DEAD", config.stream);
        let dead_subject = format!("{subject}.dead");
        js.create_or_update_stream(stream::Config {
            name: dead_stream.clone(),
            subjects: vec![dead_subject.clone()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_bytes: i64::try_from(opts.dead_letters_max_bytes).unwrap_or(i64::MAX),
            discard: DiscardPolicy::Old,
            num_replicas: config.replicas,
            description: Some("Outpost: rows a sink refused, for `outpost dead-letters`".into()),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the JetStream stream {dead_stream}"))?;

        let stream = js.get_stream(&config.stream).await?;
        reconcile_consumers(&stream, &sinks).await?;
        let mut consumers = HashMap::new();
        for sink in &sinks {
            consumers.insert(
                *sink,
                SinkConsumers {
                    high: create_consumer(&stream, config, sink, "high").await?,
                    normal: create_consumer(&stream, config, sink, "normal").await?,
                },
            );
        }
        let spool = JetStreamSpool {
            inner: Arc::new(Inner {
                client,
                js,
                config: config.clone(),
                dead_stream,
                dead_subject,
                dead_letters_max_bytes: opts.dead_letters_max_bytes,
                consumers,
                held: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                appended: Notify::new(),
                handoff: Handoff::new(opts.handoff_max_bytes, sinks.len()),
                metrics,
            }),
        };
        spool.refresh_gauges().await;
        tokio::spawn(keep_alive(Arc::downgrade(&spool.inner)));
        Ok(spool)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(&'static str, i64), Held>> {
        // Nothing here can be left half-updated by a panic.
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes a frame; returns once JetStream acknowledged it.
    pub async fn append(&self, entry: SpoolEntry) -> Result<(), SpoolError> {
        let inner = &self.inner;
        let priority = if entry.priority > 0 { "high" } else { "normal" };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", message_id(&entry).as_str());
        let verdict: String = entry
            .valid
            .iter()
            .map(|v| if *v { '1' } else { '0' })
            .collect();
        headers.insert(HEADER_VALID, verdict.as_str());
        headers.insert(HEADER_RECEIVED, entry.received_at_ms.to_string().as_str());
        let ack = inner
            .js
            .publish_with_headers(
                format!("{}.{priority}", inner.config.subject),
                headers,
                entry.frame.into(),
            )
            .await
            .map_err(|e| storage("publishing to JetStream", e))?
            .await
            .map_err(publish_error)?;
        if !ack.duplicate
            && let Some(checked) = entry.checked
        {
            let seq = i64::try_from(ack.sequence).unwrap_or(i64::MAX);
            inner.handoff.put(seq, checked);
            inner.metrics.handoff_bytes.set(inner.handoff.bytes());
        }
        inner.metrics.spool_batches.inc();
        inner.appended.notify_waiters();
        Ok(())
    }

    /// Whether appends should carry their decoded batch.
    pub fn wants_checked(&self) -> bool {
        self.inner.handoff.enabled()
    }

    /// Waits for an append on this node, or a quarter second at most:
    /// other nodes' appends are only seen by asking the stream again.
    pub async fn wait_for_work(&self, max_wait: Duration) {
        let wait = max_wait.min(Duration::from_millis(250));
        let _ = tokio::time::timeout(wait, self.inner.appended.notified()).await;
    }

    /// What worker `part` of `sink` holds from before (a write that
    /// failed, to try again), else up to `limit` new batches, high
    /// priority first. While draining, only what it holds.
    pub async fn due(
        &self,
        sink: &'static str,
        limit: u32,
        part: u32,
    ) -> Result<Vec<Pending>, SpoolError> {
        let mut again: Vec<(i64, jetstream::Message)> = self
            .held()
            .iter()
            .filter(|((s, _), h)| *s == sink && h.part == part)
            .map(|((_, seq), h)| (*seq, h.message.clone()))
            .collect();
        if !again.is_empty() {
            again.sort_by_key(|(seq, _)| *seq);
            return Ok(again.iter().map(|(seq, m)| self.pending(*seq, m)).collect());
        }
        if self.inner.draining.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let Some(consumers) = self.inner.consumers.get(sink) else {
            return Ok(Vec::new());
        };
        let limit = limit.max(1) as usize;
        let mut fetched = fetch(&consumers.high, limit).await?;
        if fetched.len() < limit {
            fetched.extend(fetch(&consumers.normal, limit - fetched.len()).await?);
        }
        let mut due = Vec::with_capacity(fetched.len());
        let mut held = self.held();
        for message in fetched {
            let Ok(info) = message.info() else {
                continue;
            };
            let seq = i64::try_from(info.stream_sequence).unwrap_or(i64::MAX);
            due.push(self.pending(seq, &message));
            held.insert((sink, seq), Held { part, message });
        }
        Ok(due)
    }

    fn pending(&self, seq: i64, message: &jetstream::Message) -> Pending {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let received_at_ms = header(HEADER_RECEIVED)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(crate::delivery::now_ms);
        let batch = match self.inner.handoff.get(seq) {
            Some(c) => Spooled::Checked(c),
            None => {
                let verdict = header(HEADER_VALID).map(|v| v.bytes().map(|b| b == b'1').collect());
                Spooled::Frame(message.payload.to_vec(), verdict)
            }
        };
        Pending {
            seq,
            received_at_ms,
            batch,
        }
    }

    /// Acknowledges `seqs` for `sink`: the sink committed them.
    pub async fn delivered(&self, sink: &'static str, seqs: &[i64]) -> Result<(), SpoolError> {
        let done: Vec<Held> = {
            let mut held = self.held();
            seqs.iter()
                .filter_map(|seq| held.remove(&(sink, *seq)))
                .collect()
        };
        for h in &done {
            // A lost acknowledgement only means the batch comes again,
            // and every sink stores a batch once however often it gets it.
            if let Err(e) = h.message.ack().await {
                tracing::warn!(sink, error = %e, "acknowledging a delivered batch failed; it will be delivered again");
            }
        }
        self.inner.handoff.release(seqs);
        self.inner
            .metrics
            .handoff_bytes
            .set(self.inner.handoff.bytes());
        Ok(())
    }

    /// Publishes dead letters to `<stream>_DEAD`, each acknowledged.
    pub async fn dead_letter(&self, letters: &[DeadLetter<'_>]) -> Result<(), SpoolError> {
        let inner = &self.inner;
        let mut acks = Vec::with_capacity(letters.len());
        for d in letters {
            let mut h = HeaderMap::new();
            h.insert(dead::SINK, d.sink);
            h.insert(dead::BATCH, hex::encode(d.batch_id).as_str());
            h.insert(dead::CLIENT, header_safe(d.client_id).as_str());
            if let Some(e) = d.event_id {
                h.insert(dead::EVENT, header_safe(e).as_str());
            }
            h.insert(dead::ERROR, header_safe(d.error).as_str());
            h.insert(dead::AT, d.at_ms.to_string().as_str());
            if let Some(f) = &d.facts {
                h.insert(dead::FACTS, header_safe(f).as_str());
            }
            if let Some(e) = d.edge_id {
                h.insert(dead::EDGE, header_safe(e).as_str());
            }
            let ack = inner
                .js
                .publish_with_headers(inner.dead_subject.clone(), h, d.payload.to_vec().into())
                .await
                .map_err(|e| storage("publishing a dead letter", e))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| storage("storing a dead letter", e))?;
        }
        if !letters.is_empty() {
            self.refresh_dead_letters().await;
        }
        Ok(())
    }

    async fn refresh_dead_letters(&self) -> Option<(i64, i64)> {
        let info = self
            .inner
            .js
            .get_stream(&self.inner.dead_stream)
            .await
            .ok()?
            .get_info()
            .await
            .ok()?;
        let count = i64::try_from(info.state.messages).unwrap_or(i64::MAX);
        let bytes = i64::try_from(info.state.bytes).unwrap_or(i64::MAX);
        self.inner.metrics.dead_letters.set(count);
        self.inner.metrics.dead_letter_bytes.set(bytes);
        Some((count, bytes))
    }

    /// Dead letters held (count, bytes with headers) and their bound.
    pub async fn dead_letter_summary(&self) -> Result<(i64, i64, u64), SpoolError> {
        let (count, bytes) = self
            .refresh_dead_letters()
            .await
            .ok_or_else(|| SpoolError::Storage("the dead-letter stream does not answer".into()))?;
        Ok((count, bytes, self.inner.dead_letters_max_bytes))
    }

    /// Sets the stream gauges (the fleet's, not this node's): batches and
    /// bytes in the stream, each sink's backlog, the dead letters; and
    /// lets go of hand-off entries the stream no longer holds.
    pub async fn refresh_gauges(&self) {
        let inner = &self.inner;
        let Ok(stream) = inner.js.get_stream(&inner.config.stream).await else {
            return;
        };
        if let Ok(info) = stream.get_info().await {
            inner
                .metrics
                .spool_batches
                .set(i64::try_from(info.state.messages).unwrap_or(i64::MAX));
            inner.metrics.spool_bytes.set(info.state.bytes);
            inner
                .handoff
                .forget_below(i64::try_from(info.state.first_sequence).unwrap_or(i64::MAX));
            inner.metrics.handoff_bytes.set(inner.handoff.bytes());
        }
        for sink in inner.consumers.keys() {
            let mut pending = 0i64;
            for priority in ["high", "normal"] {
                if let Ok(c) = stream.consumer_info(consumer_name(sink, priority)).await {
                    pending += i64::try_from(c.num_pending).unwrap_or(i64::MAX)
                        + i64::try_from(c.num_ack_pending).unwrap_or(i64::MAX);
                }
            }
            inner
                .metrics
                .sink_pending
                .get_or_create(&SinkLabel { sink })
                .set(pending);
        }
        self.refresh_dead_letters().await;
    }

    /// Whether NATS is connected and the stream answers.
    pub async fn ping(&self) -> bool {
        let inner = &self.inner;
        if inner.client.connection_state() != async_nats::connection::State::Connected {
            return false;
        }
        tokio::time::timeout(
            Duration::from_secs(2),
            inner.js.get_stream(&inner.config.stream),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// Shutting down: hand out nothing new.
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Hands back what the workers still hold (negative acknowledgement):
    /// another node takes it now rather than after `ack_wait_secs`.
    pub async fn release_held(&self) {
        let held: Vec<Held> = self.held().drain().map(|(_, h)| h).collect();
        let n = held.len();
        for h in held {
            let _ = h.message.ack_with(AckKind::Nak(None)).await;
        }
        if n > 0 {
            tracing::info!(batches = n, "handed unfinished batches back to JetStream");
        }
        let _ = self.inner.client.flush().await;
    }
}

/// Longest a fetch may take. A pull request sent while the connection was
/// being re-established gets no answer at all, and a fetch waiting for that
/// answer would hold its worker for ever.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `spool.jetstream.urls` as `name` (the aggregator and the
/// operator commands alike).
async fn connect(config: &JetStreamConfig, name: &str) -> anyhow::Result<async_nats::Client> {
    let addrs = config
        .urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("spool.jetstream.urls")?;
    anyhow::ensure!(!addrs.is_empty(), "spool.jetstream.urls is empty");
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to NATS at {}", config.urls.join(",")))
}

/// Up to `n` messages the consumer has now (no waiting for more), within
/// [`FETCH_TIMEOUT`]: what arrived by then is kept.
async fn fetch(consumer: &PullConsumer, n: usize) -> Result<Vec<jetstream::Message>, SpoolError> {
    let deadline = tokio::time::Instant::now() + FETCH_TIMEOUT;
    let request = consumer.fetch().max_messages(n).messages();
    let mut batch = match tokio::time::timeout_at(deadline, request).await {
        Ok(b) => b.map_err(|e| storage("fetching from JetStream", e))?,
        Err(_) => return Err(storage("fetching from JetStream", "no answer")),
    };
    let mut out = Vec::with_capacity(n);
    loop {
        let failure = match tokio::time::timeout_at(deadline, batch.next()).await {
            Ok(Some(Ok(m))) => {
                out.push(m);
                continue;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        if out.is_empty() {
            return Err(storage("fetching from JetStream", failure));
        }
        // Some arrived: keep them; the rest stays with JetStream.
        break;
    }
    Ok(out)
}

/// A full stream is the size bound (`503` + `Retry-After`); anything else
/// a storage failure (also `503`, nothing acknowledged).
fn publish_error(e: async_nats::jetstream::context::PublishError) -> SpoolError {
    if e.kind() == PublishErrorKind::Other
        && let Some(js) = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        && (js.error_code() == async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED
            || js.error_code() == async_nats::jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED)
        && js.to_string().contains("maximum")
    {
        return SpoolError::Full;
    }
    storage("JetStream did not store the batch", e)
}

async fn create_consumer(
    stream: &stream::Stream,
    config: &JetStreamConfig,
    sink: &str,
    priority: &str,
) -> anyhow::Result<PullConsumer> {
    let name = consumer_name(sink, priority);
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: format!("{}.{priority}", config.subject),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(config.ack_wait_secs.max(1)),
            deliver_policy: DeliverPolicy::All,
            max_deliver: -1,
            max_ack_pending: config.max_ack_pending,
            description: Some(format!("Outpost sink {sink}, {priority} priority")),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the JetStream consumer {name}"))
}

/// A consumer of a sink this node does not name: with a backlog, starting
/// would leave it to grow for ever (an operator decides, as with the
/// SQLite spool); without one it is removed, so the stream stops keeping
/// batches for it. Every node of a fleet must name the same sinks.
async fn reconcile_consumers(
    stream: &stream::Stream,
    sinks: &[&'static str],
) -> anyhow::Result<()> {
    let mut names = stream.consumer_names();
    let mut known = Vec::new();
    while let Some(name) = names.next().await {
        known.push(name?);
    }
    for name in known {
        let Some((sink, _)) = name.rsplit_once('-') else {
            continue;
        };
        if sinks.contains(&sink) {
            continue;
        }
        let info = stream.consumer_info(&name).await?;
        let backlog = info.num_pending + info.num_ack_pending as u64;
        if backlog > 0 {
            return Err(super::MissingSink {
                sink: sink.to_owned(),
                backlog: i64::try_from(backlog).unwrap_or(i64::MAX),
            }
            .into());
        }
        stream
            .delete_consumer(&name)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::info!(consumer = %name, "sink no longer configured and nothing left for it: consumer removed");
    }
    Ok(())
}

/// Every third of `ack_wait_secs`: tells JetStream the held messages are
/// still being worked on; every second: refreshes the gauges. Ends with
/// the spool.
async fn keep_alive(inner: std::sync::Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => Duration::from_millis(i.config.ack_wait_secs.max(1) * 1000 / 3),
        None => return,
    };
    let mut last_progress = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1).min(every)).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let spool = JetStreamSpool { inner };
        if last_progress.elapsed() >= every {
            last_progress = tokio::time::Instant::now();
            let messages: Vec<jetstream::Message> =
                spool.held().values().map(|h| h.message.clone()).collect();
            for m in messages {
                let _ = m.ack_with(AckKind::Progress).await;
            }
        }
        spool.refresh_gauges().await;
    }
}

/// The dead-letter stream, for `outpost dead-letters`.
pub struct DeadLetterStream {
    stream: stream::Stream,
}

impl DeadLetterStream {
    /// Connects and finds `<stream>_DEAD`.
    pub async fn open(config: &JetStreamConfig) -> anyhow::Result<DeadLetterStream> {
        let client = connect(config, "outpost-dead-letters").await?;
        let name = format!("{}_DEAD", config.stream);
        let stream = jetstream::new(client)
            .get_stream(&name)
            .await
            .with_context(|| format!("the dead-letter stream {name}"))?;
        Ok(DeadLetterStream { stream })
    }

    /// Up to `limit` letters after sequence `after_id`, of one sink or all.
    pub async fn list(
        &self,
        sink: Option<&str>,
        after_id: i64,
        limit: i64,
        with_payload: bool,
    ) -> anyhow::Result<Vec<super::StoredDeadLetter>> {
        let state = self.stream.get_info().await?.state;
        let from = u64::try_from(after_id.saturating_add(1))
            .unwrap_or(0)
            .max(state.first_sequence);
        let mut out = Vec::new();
        for seq in from..=state.last_sequence {
            if out.len() as i64 >= limit {
                break;
            }
            // A gap: deleted (replayed, purged), or dropped by the bound.
            let Ok(m) = self.stream.get_raw_message(seq).await else {
                continue;
            };
            let h = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
            let letter_sink = h(dead::SINK).unwrap_or_default();
            if sink.is_some_and(|s| s != letter_sink) {
                continue;
            }
            let batch_bytes: [u8; 16] = h(dead::BATCH)
                .and_then(|b| hex::decode(b).ok())
                .and_then(|b| b.try_into().ok())
                .unwrap_or_default();
            out.push(super::StoredDeadLetter {
                id: i64::try_from(seq).unwrap_or(i64::MAX),
                sink: letter_sink,
                batch_id: outpost_shared::frame::BatchId(batch_bytes).to_string(),
                batch_bytes,
                client_id: h(dead::CLIENT).unwrap_or_default(),
                event_id: h(dead::EVENT),
                error: h(dead::ERROR).unwrap_or_default(),
                at_ms: h(dead::AT).and_then(|a| a.parse().ok()).unwrap_or(0),
                bytes: i64::try_from(m.payload.len()).unwrap_or(i64::MAX),
                payload: if with_payload {
                    m.payload.to_vec()
                } else {
                    Vec::new()
                },
                facts: h(dead::FACTS),
                edge_id: h(dead::EDGE),
            });
        }
        Ok(out)
    }

    /// Deletes letters by sequence number; returns how many went.
    pub async fn delete(&self, ids: &[i64]) -> anyhow::Result<u64> {
        let mut n = 0;
        for id in ids {
            let Ok(seq) = u64::try_from(*id) else {
                continue;
            };
            if self.stream.delete_message(seq).await.unwrap_or(false) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes every letter (of one sink, older than a time).
    pub async fn purge(&self, sink: Option<&str>, before_ms: Option<i64>) -> anyhow::Result<u64> {
        if sink.is_none() && before_ms.is_none() {
            let purged = self
                .stream
                .purge()
                .await
                .map_err(|e| anyhow::anyhow!("purging the dead letters: {e}"))?;
            return Ok(purged.purged);
        }
        let mut ids = Vec::new();
        let mut after = 0;
        loop {
            let page = self.list(sink, after, 500, false).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            ids.extend(
                page.iter()
                    .filter(|d| before_ms.is_none_or(|b| d.at_ms < b))
                    .map(|d| d.id),
            );
        }
        self.delete(&ids).await
    }
}

/// The message id JetStream drops repeats by: the batch id and the end of
/// the frame's HMAC (a verified frame ends with its 32-byte tag). An edge
/// retrying a frame sends the same bytes, so the same id; a frame made
/// again under the same batch id (`outpost dead-letters replay`: only the
/// dead events, signed anew) is a different message and is stored.
fn message_id(entry: &SpoolEntry) -> String {
    let tag = &entry.frame[entry.frame.len().saturating_sub(16)..];
    format!("{}-{}", hex::encode(entry.batch_id), hex::encode(tag))
}

/// JetStream headers cannot hold line breaks.
fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Header names of a dead letter.
pub mod dead {
    /// The sink that gave up.
    pub const SINK: &str = "Outpost-Sink";
    /// The batch id, hex.
    pub const BATCH: &str = "Outpost-Batch";
    /// The client.
    pub const CLIENT: &str = "Outpost-Client";
    /// The event id.
    pub const EVENT: &str = "Outpost-Event";
    /// Why.
    pub const ERROR: &str = "Outpost-Error";
    /// When, epoch ms.
    pub const AT: &str = "Outpost-At";
    /// The edge's facts (JSON).
    pub const FACTS: &str = "Outpost-Facts";
    /// The edge.
    pub const EDGE: &str = "Outpost-Edge";
}
