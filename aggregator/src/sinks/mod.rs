//! Sinks: where delivered events end up. Each sink implements [`Sink`] and
//! gets its own delivery worker and spool cursor (see `delivery.rs`), so a
//! slow or dead sink never blocks another.

pub mod influxdb;
pub mod postgres;
pub mod sqlite;

use std::future::Future;

use outpost_shared::event::{EdgeFacts, Event};
use outpost_shared::frame::BatchId;

use crate::geoip::Geo;

/// One event ready to write, with what the frame said about it.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// The client the event belongs to.
    pub client_id: &'a str,
    /// The batch that carried it.
    pub batch_id: &'a BatchId,
    /// The edge that forwarded it.
    pub edge_id: &'a str,
    /// The edge's facts about the request.
    pub facts: &'a EdgeFacts,
    /// The event (validated).
    pub event: &'a Event,
    /// What GeoIP knows about the client IP.
    pub geo: Option<&'a Geo>,
}

impl Row<'_> {
    /// The country: GeoIP's answer, else the edge platform's hint.
    pub fn country(&self) -> Option<&str> {
        self.geo
            .and_then(|g| g.country.as_deref())
            .or(self.facts.country_hint.as_deref())
    }

    /// The event's time in milliseconds: its own, else when the edge got it.
    pub fn ts_ms(&self) -> i64 {
        self.event
            .timestamp
            .unwrap_or(self.facts.received_at)
            .millis()
    }

    /// The client address, if the edge sent a valid one (a wrong one is
    /// dropped, not allowed to fail the row).
    pub fn client_ip(&self) -> Option<&str> {
        self.facts
            .client_ip
            .as_deref()
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
    }

    /// `properties` as JSON text.
    pub fn properties_json(&self) -> String {
        serde_json::to_string(&self.event.properties).unwrap_or_else(|_| "{}".into())
    }

    /// `context` as JSON text.
    pub fn context_json(&self) -> String {
        serde_json::to_string(&self.event.context).unwrap_or_else(|_| "{}".into())
    }

    /// The client's sequence number, when it fits a signed 64-bit column.
    pub fn seq(&self) -> Option<i64> {
        self.event.seq.and_then(|s| i64::try_from(s).ok())
    }
}

/// Why a write failed. The sinks say which kind; the delivery workers
/// (`delivery.rs`) decide what follows, the same way for every sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink itself is down, overloaded or misconfigured: the write is
    /// retried with backoff for as long as it takes, and no row is blamed
    /// (nothing is dead-lettered because a database was away).
    #[error("{0}")]
    Unavailable(String),
    /// The sink refused the data (PostgreSQL SQLSTATE classes 22 and 23; an
    /// InfluxDB 400 or 422) without saying which rows: the write is made
    /// again row by row at once, and the rows refused alone go to dead
    /// letters with the reason — retrying them cannot help.
    #[error("{0}")]
    Rejected(String),
    /// The sink is up but refused the write as a whole, for a reason that
    /// may lie in the data (a PostgreSQL program limit, internal error or
    /// trigger exception; an InfluxDB 413). Retried `delivery.max_attempts`
    /// times, then written row by row: the rows that still fail go to dead
    /// letters, the rest are stored.
    #[error("{0}")]
    Refused(String),
}

/// A destination for events.
pub trait Sink: Send + Sync + 'static {
    /// Stable name: spool cursor, metrics label, logs.
    fn name(&self) -> &'static str;
    /// Writes rows idempotently (a row written twice is stored once), all
    /// of them or none.
    fn write(&self, rows: &[Row<'_>]) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// For readiness.
    fn ping(&self) -> impl Future<Output = bool> + Send;
}
