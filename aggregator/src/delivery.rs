//! Delivery: one worker per sink takes due batches from the spool — as
//! ingest decoded and validated them when the hand-off still holds them,
//! else decoding the frame and re-applying validation — claims their event
//! ids with dedup (once per handed-off batch, for all sinks), writes the
//! rows, and advances that sink's cursor.
//!
//! A sink that is unavailable is retried with exponential backoff and full
//! jitter, without blaming any batch (nothing is dead-lettered because a
//! database was down). A write a sink rejects for its data
//! ([`SinkError::Rejected`]) is made again row by row at once; one it
//! refuses without blaming data or itself ([`SinkError::Refused`]) is
//! retried `delivery.max_attempts` times first. Either way only the rows
//! refused alone go to the spool's dead letters with the reason, so one
//! poison row does not hold up its share of the backlog; frames that no
//! longer decode go there too.

use std::sync::Arc;
use std::time::Duration;

use outpost_shared::frame::{self, FrameError, FrameLimits};
use outpost_shared::validate::{Limits, validate_event};
use tokio::sync::watch;

use crate::config::DeliveryConfig;
use crate::dedup::Dedup;
use crate::geoip::{Geo, GeoIp};
use crate::handoff::Checked;
use crate::sinks::{Row, Sink, SinkError};
use crate::spool::{DeadLetter, Pending, Spool, Spooled};
use crate::telemetry::{Metrics, SinkLabel, SourceLabel};

/// What every worker shares.
pub struct DeliveryContext {
    /// The spool.
    pub spool: Spool,
    /// Duplicate detection.
    pub dedup: std::sync::Arc<Dedup>,
    /// Retry settings.
    pub config: DeliveryConfig,
    /// Validation limits (the same as at ingest).
    pub limits: Limits,
    /// Frame bounds (the same as at ingest).
    pub frame_limits: FrameLimits,
    /// Metrics.
    pub metrics: Metrics,
    /// GeoIP enrichment.
    pub geoip: Arc<GeoIp>,
}

/// Exponential backoff with full jitter.
struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    failures: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let exp = self
            .initial_ms
            .saturating_mul(1u64 << self.failures.min(20));
        self.failures = self.failures.saturating_add(1);
        let cap = exp.min(self.max_ms).max(1);
        Duration::from_millis(fastrand::u64(cap / 2..=cap))
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Starts `delivery.workers_per_sink` workers for a sink.
pub fn spawn<S: Sink + Clone>(
    sink: &S,
    ctx: &Arc<DeliveryContext>,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let parts = ctx.config.workers_per_sink.max(1);
    (0..parts)
        .map(|part| tokio::spawn(run(sink.clone(), ctx.clone(), stop.clone(), part, parts)))
        .collect()
}

/// Runs one worker of a sink, for the batches whose sequence number is
/// `part` modulo `parts`, until `stop` turns true and nothing is due.
pub async fn run<S: Sink>(
    sink: S,
    ctx: Arc<DeliveryContext>,
    mut stop: watch::Receiver<bool>,
    part: u32,
    parts: u32,
) {
    let name = sink.name();
    let label = SinkLabel { sink: name };
    // Every series of this sink exists from the start, at zero, so that
    // dashboards and alerts see it before the first failure.
    let _ = ctx.metrics.sink_delivered_events.get_or_create(&label);
    let _ = ctx.metrics.sink_failures.get_or_create(&label);
    let _ = ctx.metrics.sink_dead_letters.get_or_create(&label);
    let _ = ctx.metrics.sink_lag_seconds.get_or_create(&label);
    let mut backoff = Backoff {
        initial_ms: ctx.config.backoff_initial_ms,
        max_ms: ctx.config.backoff_max_ms,
        failures: 0,
    };
    // Consecutive refusals (not outages) of this worker's writes.
    let mut refusals: u32 = 0;
    loop {
        let stopping = *stop.borrow();
        let due = match ctx
            .spool
            .due(name, ctx.config.max_batches_per_write, part, parts)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(sink = name, error = %e, "reading the spool failed");
                Vec::new()
            }
        };
        // The lowest sequence numbers are the oldest batches, and `due`
        // hands them out first (after high priority): the oldest of `due`
        // is the sink's lag, without a scan of the whole backlog.
        let oldest = due.iter().map(|p| p.received_at_ms).min();
        let lag = oldest.map_or(0, |t| (now_ms() - t).max(0) / 1000);
        ctx.metrics.sink_lag_seconds.get_or_create(&label).set(lag);
        if due.is_empty() {
            if stopping {
                return;
            }
            tokio::select! {
                _ = ctx.spool.wait_for_work(Duration::from_millis(500)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let narrow = ctx.config.max_attempts > 0 && refusals >= ctx.config.max_attempts;
        if narrow {
            tracing::warn!(
                sink = name,
                tries = refusals,
                batches = due.len(),
                "writes keep being refused; writing row by row"
            );
            refusals = 0;
        }
        match deliver(&sink, &ctx, &due, narrow).await {
            Ok(()) => {
                backoff.failures = 0;
                refusals = 0;
            }
            Err(e) => {
                if matches!(e, SinkError::Refused(_)) {
                    refusals = refusals.saturating_add(1);
                }
                ctx.metrics.sink_failures.get_or_create(&label).inc();
                let delay = backoff.next_delay();
                tracing::warn!(sink = name, error = %e, retry_in_ms = delay.as_millis() as u64, batches = due.len(), refused = matches!(e, SinkError::Refused(_)), "sink write failed");
                if stopping {
                    // Shutting down: what is left stays in the spool for the next start.
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// Writes each row on its own and returns the ones the sink refused, by
/// index, with the reason; an outage stops the lot (to be retried).
async fn write_row_by_row<S: Sink>(
    sink: &S,
    rows: &[Row<'_>],
) -> Result<Vec<(usize, String)>, SinkError> {
    let mut refused = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        match sink.write(std::slice::from_ref(row)).await {
            Ok(()) => {}
            Err(SinkError::Rejected(why) | SinkError::Refused(why)) => refused.push((i, why)),
            Err(e @ SinkError::Unavailable(_)) => return Err(e),
        }
    }
    Ok(refused)
}

struct Decoded {
    seq: i64,
    checked: Arc<Checked>,
    /// Valid and not a duplicate.
    keep: Vec<bool>,
    geo: Option<Arc<Geo>>,
}

/// Decodes a spooled frame and validates its events as ingest did (the
/// same limits, the same arrival time): what the hand-off would have held.
fn check(bytes: &[u8], ctx: &DeliveryContext) -> Result<Checked, FrameError> {
    let mut frame = frame::decode_verified(bytes, &ctx.frame_limits)?;
    let received_at = frame.batch.facts.received_at;
    let valid = frame
        .batch
        .events
        .iter_mut()
        .map(|e| validate_event(e, &ctx.limits, received_at).is_ok())
        .collect();
    Ok(Checked::new(frame, valid))
}

/// The spool failing is not the data's fault: retried like an outage.
fn spool_error(e: sqlx::Error) -> SinkError {
    SinkError::Unavailable(format!("spool: {e}"))
}

/// Delivers `due` in one write, or with `row_by_row` one row per write.
async fn deliver<S: Sink>(
    sink: &S,
    ctx: &DeliveryContext,
    due: &[Pending],
    row_by_row: bool,
) -> Result<(), SinkError> {
    let name = sink.name();
    let now = now_ms();
    let mut decoded = Vec::with_capacity(due.len());
    let mut done = Vec::with_capacity(due.len());
    for p in due {
        let source = match p.batch {
            Spooled::Checked(_) => "handoff",
            Spooled::Frame(_) => "spool",
        };
        ctx.metrics
            .delivery_batches
            .get_or_create(&SourceLabel { source })
            .inc();
        let checked = match &p.batch {
            Spooled::Checked(c) => c.clone(),
            Spooled::Frame(bytes) => match check(bytes, ctx) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    // It decoded when it was accepted; failing now means the
                    // spool file was damaged. Keep the bytes for an operator.
                    tracing::error!(sink = name, seq = p.seq, error = %e, "spooled frame no longer decodes; dead-lettered");
                    let error = format!("frame does not decode: {e}");
                    let letter = DeadLetter {
                        sink: name,
                        batch_id: &[0; 16],
                        client_id: "",
                        event_id: None,
                        error: &error,
                        payload: bytes,
                        at_ms: now,
                    };
                    ctx.spool.dead_letter(&letter).await.map_err(spool_error)?;
                    ctx.metrics
                        .sink_dead_letters
                        .get_or_create(&SinkLabel { sink: name })
                        .inc();
                    done.push(p.seq);
                    continue;
                }
            },
        };
        let frame = &checked.frame;
        // One client IP per batch: one lookup (usually cached).
        let geo = frame
            .batch
            .facts
            .client_ip
            .as_deref()
            .and_then(|ip| ctx.geoip.lookup(ip));
        let fresh = checked
            .claims
            .get_or_init(|| {
                let ids: Vec<&str> = frame
                    .batch
                    .events
                    .iter()
                    .map(|e| e.event_id.as_str())
                    .collect();
                async move {
                    ctx.dedup
                        .claim(
                            &frame.batch.client_id,
                            &ids,
                            &frame.header.batch_id,
                            now,
                            &ctx.metrics,
                        )
                        .await
                }
            })
            .await;
        let keep = checked
            .valid
            .iter()
            .zip(fresh)
            .map(|(v, f)| *v && *f)
            .collect();
        decoded.push(Decoded {
            seq: p.seq,
            checked,
            keep,
            geo,
        });
    }

    let rows: Vec<Row<'_>> = decoded
        .iter()
        .flat_map(|d| {
            let frame = &d.checked.frame;
            let b = &frame.batch;
            b.events
                .iter()
                .zip(&d.keep)
                .filter(|(_, k)| **k)
                .map(move |(event, _)| Row {
                    client_id: &b.client_id,
                    batch_id: &frame.header.batch_id,
                    edge_id: &frame.header.edge_id,
                    facts: &b.facts,
                    event,
                    geo: d.geo.as_deref(),
                })
        })
        .collect();
    let rejected = if row_by_row {
        write_row_by_row(sink, &rows).await?
    } else {
        match sink.write(&rows).await {
            Ok(()) => Vec::new(),
            Err(SinkError::Rejected(why)) => {
                tracing::warn!(sink = name, rows = rows.len(), error = %why, "the sink rejected the data; writing row by row");
                write_row_by_row(sink, &rows).await?
            }
            Err(e) => return Err(e),
        }
    };
    for (i, reason) in &rejected {
        let row = &rows[*i];
        let payload = serde_json::to_vec(row.event).unwrap_or_default();
        let letter = DeadLetter {
            sink: name,
            batch_id: &row.batch_id.0,
            client_id: row.client_id,
            event_id: Some(&row.event.event_id),
            error: reason,
            payload: &payload,
            at_ms: now,
        };
        ctx.spool.dead_letter(&letter).await.map_err(spool_error)?;
        tracing::warn!(sink = name, client_id = row.client_id, event_id = %row.event.event_id, reason = %reason, "row dead-lettered");
    }
    let label = SinkLabel { sink: name };
    ctx.metrics
        .sink_delivered_events
        .get_or_create(&label)
        .inc_by((rows.len() - rejected.len()) as u64);
    ctx.metrics
        .sink_dead_letters
        .get_or_create(&label)
        .inc_by(rejected.len() as u64);
    done.extend(decoded.iter().map(|d| d.seq));
    ctx.spool.delivered(name, &done).await.map_err(spool_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff {
            initial_ms: 100,
            max_ms: 1000,
            failures: 0,
        };
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert!((50..=100).contains(&delays[0]), "{delays:?}");
        assert!((100..=200).contains(&delays[1]), "{delays:?}");
        assert!(
            delays[6..].iter().all(|d| (500..=1000).contains(d)),
            "{delays:?}"
        );
    }
}
