//! Sinks: where delivered events end up. Each sink implements [`Sink`] and
//! gets its own delivery workers and spool cursor (see `delivery.rs`), so a
//! slow or dead sink never blocks another.
//!
//! Each sink's module owns all of it: its configuration section, its
//! construction, its readiness probe and its name, published as one
//! [`Kind`]. [`KINDS`] lists them and [`build`] makes the configured ones;
//! nothing else names a sink. Adding one is a new module, its line in
//! [`KINDS`] and its section in `config::Config`.

pub mod influxdb;
pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::db::Db;
use crate::delivery::DeliveryContext;

use outpost_shared::event::{EdgeFacts, Event};
use outpost_shared::frame::BatchId;
use outpost_shared::id::ClientId;

use crate::geoip::Geo;

/// One event ready to write, with what the frame said about it.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// The client the event belongs to.
    pub client_id: &'a ClientId,
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

impl<'a> Row<'a> {
    /// The country: GeoIP's answer, else the edge platform's hint.
    pub fn country(&self) -> Option<&'a str> {
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
        self.client_addr().and(self.facts.client_ip.as_deref())
    }

    /// The client address, parsed (the one [`Row::client_ip`] gives).
    pub fn client_addr(&self) -> Option<std::net::IpAddr> {
        self.facts.client_ip.as_deref()?.parse().ok()
    }

    /// `properties` as JSON text, as the client sent it.
    pub fn properties_json(&self) -> &str {
        self.event.properties.get()
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

#[cfg(test)]
impl<'a> Row<'a> {
    /// Every event of `batch` as a row, as edge `e` forwarded it (tests).
    pub fn of_batch(batch: &'a outpost_shared::frame::Batch, geo: Option<&'a Geo>) -> Vec<Row<'a>> {
        static ID: BatchId = BatchId([1; 16]);
        batch
            .events
            .iter()
            .map(|event| Row {
                client_id: &batch.client_id,
                batch_id: &ID,
                edge_id: "e",
                facts: &batch.facts,
                event,
                geo,
            })
            .collect()
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

/// A future a sink's builder returns.
pub type Building<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Configured>> + Send + 'a>>;

/// One kind of sink, as its module publishes it.
pub struct Kind {
    /// Its name: spool cursor, metrics label, readiness check, logs.
    pub name: &'static str,
    /// Whether the configuration turns it on.
    pub enabled: fn(&Config) -> bool,
    /// Connects or opens it (only called when enabled).
    pub build: for<'a> fn(&'a Config) -> Building<'a>,
}

/// Every sink Outpost has, in start-up order.
pub const KINDS: &[Kind] = &[postgres::KIND, sqlite::KIND, influxdb::KIND];

/// The names of the sinks `config` turns on.
pub fn enabled_names(config: &Config) -> Vec<&'static str> {
    KINDS
        .iter()
        .filter(|k| (k.enabled)(config))
        .map(|k| k.name)
        .collect()
}

/// Builds every sink `config` turns on, in [`KINDS`] order.
pub async fn build(config: &Config) -> anyhow::Result<Vec<Configured>> {
    let mut built = Vec::new();
    for kind in KINDS.iter().filter(|k| (k.enabled)(config)) {
        let sink = (kind.build)(config)
            .await
            .map_err(|e| e.context(kind.name))?;
        built.push(sink);
    }
    Ok(built)
}

/// A sink built from the configuration, ready to wire: its readiness
/// probe, how to start its delivery workers, and — for a sink that stores
/// events the read API can query — the database to read them from.
pub struct Configured {
    /// Its readiness probe.
    pub probe: Probe,
    /// The database the read API and client records use, when this sink is
    /// the event store (PostgreSQL, SQLite).
    pub events_db: Option<Db>,
    start: Start,
}

/// Starts a sink's delivery workers.
type Start =
    Box<dyn FnOnce(&Arc<DeliveryContext>, &watch::Receiver<bool>) -> Vec<JoinHandle<()>> + Send>;

impl Configured {
    /// A sink with its workers to start and its probe.
    pub fn new<S: Sink + Clone>(sink: S, events_db: Option<Db>) -> Configured {
        let probe = Probe {
            name: sink.name(),
            sink: Arc::new(sink.clone()),
        };
        Configured {
            probe,
            events_db,
            start: Box::new(move |ctx, stop| crate::delivery::spawn(&sink, ctx, stop)),
        }
    }

    /// Adds a task of the sink's own (PostgreSQL's partition keeper),
    /// started with its delivery workers.
    pub fn with_task(
        mut self,
        task: impl FnOnce(&Arc<DeliveryContext>, &watch::Receiver<bool>) -> JoinHandle<()>
        + Send
        + 'static,
    ) -> Configured {
        let start = self.start;
        self.start = Box::new(move |ctx, stop| {
            let mut handles = start(ctx, stop);
            handles.push(task(ctx, stop));
            handles
        });
        self
    }

    /// Adds work to do once the sink's delivery workers have stopped (the
    /// last flush of what they left in memory); shutdown waits for it.
    pub fn after_workers(mut self, last: impl Future<Output = ()> + Send + 'static) -> Configured {
        let start = self.start;
        self.start = Box::new(move |ctx, stop| {
            let handles = start(ctx, stop);
            vec![tokio::spawn(async move {
                for h in handles {
                    let _ = h.await;
                }
                last.await;
            })]
        });
        self
    }

    /// Starts the sink's delivery workers.
    pub fn start(
        self,
        ctx: &Arc<DeliveryContext>,
        stop: &watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        (self.start)(ctx, stop)
    }
}

/// A sink's readiness probe, by name.
#[derive(Clone)]
pub struct Probe {
    /// The sink's name.
    pub name: &'static str,
    sink: Arc<dyn Ping>,
}

impl Probe {
    /// Whether the sink answers.
    pub async fn ping(&self) -> bool {
        self.sink.ping_boxed().await
    }
}

/// [`Sink::ping`], callable through `dyn`.
trait Ping: Send + Sync {
    fn ping_boxed(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

impl<S: Sink> Ping for S {
    fn ping_boxed(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(self.ping())
    }
}
