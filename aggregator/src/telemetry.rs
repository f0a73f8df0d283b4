//! Telemetry, named once: every Prometheus metric the aggregator exports is
//! a field of [`Metrics`] (names `outpost_<component>_<what>_<unit>`), and
//! logging is set up in [`init_logging`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::config::{LogConfig, LogFormat};

/// Label: a stable error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The 5-digit code.
    pub code: u32,
}

/// Label: a sink.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    /// `postgres`, `influxdb`.
    pub sink: &'static str,
}

/// Label: a GeoIP lookup's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GeoLabel {
    /// `found`, `not_found`, `no_database`, `invalid_ip`.
    pub result: &'static str,
}

/// Label: where a sink got a decoded batch from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// `handoff` (decoded at ingest, in memory) or `spool` (decoded again).
    pub source: &'static str,
}

/// Label: why something was closed, refused or shed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A stable word (`header_timeout`, `evicted`, `refused`, `closed`,
    /// `error`; `concurrency`, `timeout`).
    pub reason: &'static str,
}

/// Every metric. Cheap to clone (each is an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Frames acknowledged (durable in the spool).
    pub ingest_frames: Counter,
    /// Events in acknowledged frames that passed validation.
    pub ingest_events: Counter,
    /// Events in acknowledged frames that failed validation (not stored).
    pub ingest_rejected_events: Counter,
    /// Ingest requests refused, by error code.
    pub ingest_errors: Family<CodeLabel, Counter>,
    /// Ingest request latency, seconds.
    pub ingest_duration: Histogram,
    /// Batches in the spool (acknowledged, not yet in every sink).
    pub spool_batches: Gauge,
    /// Bytes of frames in the spool.
    pub spool_bytes: Gauge<u64, AtomicU64>,
    /// Events written by a sink (duplicates excluded).
    pub sink_delivered_events: Family<SinkLabel, Counter>,
    /// Successful sink writes (one statement or request each): with
    /// `sink_delivered_events`, the events a write takes on average.
    pub sink_writes: Family<SinkLabel, Counter>,
    /// Failed sink writes (each is retried).
    pub sink_failures: Family<SinkLabel, Counter>,
    /// Batches given up on after the last try.
    pub sink_dead_letters: Family<SinkLabel, Counter>,
    /// Age of the oldest batch a sink has yet to write, seconds.
    pub sink_lag_seconds: Family<SinkLabel, Gauge>,
    /// Batches a sink has yet to write (JetStream: its consumer's pending
    /// and unacknowledged messages, over the whole fleet).
    pub sink_pending: Family<SinkLabel, Gauge>,
    /// Batches the sinks took, by where the decoded batch came from.
    pub delivery_batches: Family<SourceLabel, Counter>,
    /// Bytes (estimated) of decoded batches kept in memory for the sinks.
    pub handoff_bytes: Gauge<u64, AtomicU64>,
    /// Events dropped as duplicates.
    pub dedup_duplicates: Counter,
    /// Dedup lookups that failed (Redis down): those events went through.
    pub dedup_errors: Counter,
    /// GeoIP lookups by outcome (cache misses only).
    pub geoip_lookups: Family<GeoLabel, Counter>,
    /// GeoIP answers served from the cache.
    pub geoip_cache_hits: Counter,
    /// Dead letters held in the spool.
    pub dead_letters: Gauge,
    /// Bytes of the dead letters' payloads.
    pub dead_letter_bytes: Gauge,
    /// Dead letters dropped to stay within `spool.dead_letters_max_bytes`.
    pub dead_letters_dropped: Counter,
    /// Open HTTP connections.
    pub http_connections: Gauge,
    /// HTTP connections closed, by reason.
    pub http_connections_closed: Family<ReasonLabel, Counter>,
    /// Requests answered `503` at once to stay within the server's bounds.
    pub http_requests_shed: Family<ReasonLabel, Counter>,
    /// Days after today that PostgreSQL's `events` has a partition for.
    pub postgres_partition_days_ahead: Gauge,
    /// Partition maintenance runs that failed (retried a minute later).
    pub postgres_partition_failures: Counter,
}

impl Metrics {
    /// Creates every metric and registers it.
    pub fn new(registry: &mut Registry) -> Metrics {
        let latency_buckets = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let m = Metrics {
            ingest_frames: Counter::default(),
            ingest_events: Counter::default(),
            ingest_rejected_events: Counter::default(),
            ingest_errors: Family::default(),
            ingest_duration: Histogram::new(latency_buckets),
            spool_batches: Gauge::default(),
            spool_bytes: Gauge::default(),
            sink_delivered_events: Family::default(),
            sink_writes: Family::default(),
            sink_failures: Family::default(),
            sink_dead_letters: Family::default(),
            sink_lag_seconds: Family::default(),
            sink_pending: Family::default(),
            delivery_batches: Family::default(),
            handoff_bytes: Gauge::default(),
            dedup_duplicates: Counter::default(),
            dedup_errors: Counter::default(),
            geoip_lookups: Family::default(),
            geoip_cache_hits: Counter::default(),
            dead_letters: Gauge::default(),
            dead_letter_bytes: Gauge::default(),
            dead_letters_dropped: Counter::default(),
            http_connections: Gauge::default(),
            http_connections_closed: Family::default(),
            http_requests_shed: Family::default(),
            postgres_partition_days_ahead: Gauge::default(),
            postgres_partition_failures: Counter::default(),
        };
        // prometheus-client appends `_total` to counters and the unit to names.
        let r = registry.sub_registry_with_prefix("outpost");
        r.register(
            "ingest_frames",
            "Frames acknowledged (durable in the spool)",
            m.ingest_frames.clone(),
        );
        r.register(
            "ingest_events",
            "Valid events in acknowledged frames",
            m.ingest_events.clone(),
        );
        r.register(
            "ingest_rejected_events",
            "Events that failed validation at ingest",
            m.ingest_rejected_events.clone(),
        );
        r.register(
            "ingest_errors",
            "Ingest requests refused, by error code",
            m.ingest_errors.clone(),
        );
        r.register_with_unit(
            "ingest_request_duration",
            "Ingest request latency",
            prometheus_client::registry::Unit::Seconds,
            m.ingest_duration.clone(),
        );
        r.register(
            "spool_batches",
            "Batches in the spool",
            m.spool_batches.clone(),
        );
        r.register_with_unit(
            "spool",
            "Frame bytes in the spool",
            prometheus_client::registry::Unit::Bytes,
            m.spool_bytes.clone(),
        );
        r.register(
            "sink_delivered_events",
            "Events written by each sink",
            m.sink_delivered_events.clone(),
        );
        r.register(
            "sink_writes",
            "Successful writes of each sink",
            m.sink_writes.clone(),
        );
        r.register(
            "sink_failures",
            "Failed sink writes (retried)",
            m.sink_failures.clone(),
        );
        r.register(
            "sink_dead_letters",
            "Batches moved to dead letters",
            m.sink_dead_letters.clone(),
        );
        r.register_with_unit(
            "sink_lag",
            "Age of the oldest batch a sink has yet to write",
            prometheus_client::registry::Unit::Seconds,
            m.sink_lag_seconds.clone(),
        );
        r.register(
            "sink_pending_batches",
            "Batches a sink has yet to write (JetStream spool: its consumer's backlog, fleet-wide)",
            m.sink_pending.clone(),
        );
        r.register(
            "delivery_batches",
            "Batches taken by the sinks, by where they were decoded",
            m.delivery_batches.clone(),
        );
        r.register_with_unit(
            "handoff",
            "Decoded batches kept in memory for the sinks (estimate)",
            prometheus_client::registry::Unit::Bytes,
            m.handoff_bytes.clone(),
        );
        r.register(
            "dedup_duplicates",
            "Events dropped as duplicates",
            m.dedup_duplicates.clone(),
        );
        r.register(
            "dedup_errors",
            "Dedup lookups that failed open",
            m.dedup_errors.clone(),
        );
        r.register(
            "geoip_lookups",
            "GeoIP database lookups by outcome",
            m.geoip_lookups.clone(),
        );
        r.register(
            "geoip_cache_hits",
            "GeoIP answers served from the cache",
            m.geoip_cache_hits.clone(),
        );
        r.register(
            "dead_letters",
            "Dead letters held in the spool",
            m.dead_letters.clone(),
        );
        r.register_with_unit(
            "dead_letter",
            "Payload bytes of the dead letters held",
            prometheus_client::registry::Unit::Bytes,
            m.dead_letter_bytes.clone(),
        );
        r.register(
            "dead_letters_dropped",
            "Dead letters dropped (oldest first) to stay within spool.dead_letters_max_bytes",
            m.dead_letters_dropped.clone(),
        );
        r.register(
            "http_connections",
            "Open HTTP connections",
            m.http_connections.clone(),
        );
        r.register(
            "http_connections_closed",
            "HTTP connections closed, by reason",
            m.http_connections_closed.clone(),
        );
        r.register(
            "http_requests_shed",
            "Requests answered 503 at once to stay within the server's bounds, by reason",
            m.http_requests_shed.clone(),
        );
        r.register(
            "postgres_partition_days_ahead",
            "Days after today that PostgreSQL's events table has a partition for",
            m.postgres_partition_days_ahead.clone(),
        );
        r.register(
            "postgres_partition_failures",
            "PostgreSQL partition maintenance runs that failed",
            m.postgres_partition_failures.clone(),
        );
        // Every series from the start, at zero, for dashboards and alerts.
        for reason in ["concurrency", "timeout"] {
            let _ = m.http_requests_shed.get_or_create(&ReasonLabel { reason });
        }
        for reason in ["closed", "header_timeout", "evicted", "refused", "error"] {
            let _ = m
                .http_connections_closed
                .get_or_create(&ReasonLabel { reason });
        }
        m
    }
}

/// Sets up `tracing` output; `RUST_LOG` overrides the configured level.
pub fn init_logging(config: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
