//! Delivery: one worker per sink takes due batches from the spool — as
//! ingest decoded and validated them when the hand-off still holds them,
//! else decoding the frame and re-applying validation — claims their event
//! ids with dedup (once per handed-off batch, for all sinks), writes the
//! rows, and advances that sink's cursor.
//!
//! A sink that is unavailable is retried with exponential backoff and full
//! jitter, without blaming any batch (nothing is dead-lettered because a
//! database was down). A write a sink rejects for its data
//! ([`SinkError::Rejected`]) is narrowed down at once by writing it again
//! in halves, and the halves that fail in halves again, so `k` bad rows
//! among `n` cost about `2k·log2(n)` writes, not `n`; one it refuses
//! without blaming data or itself ([`SinkError::Refused`]) is retried
//! `delivery.max_attempts` times first. Either way only the rows refused
//! alone go to the spool's dead letters with the reason, so one poison row
//! does not hold up its share of the backlog; frames that no longer decode
//! go there too. A dead-lettered row gives its dedup claim back, so the
//! client's corrected re-send with the same event id is stored.
//!
//! Only the events ingest accepted are claimed and written, by ingest's
//! own verdict: an event acknowledged under the limits of the day it
//! arrived is delivered even if the limits were tightened since (spool
//! rows from before verdicts were kept are judged again, and the events
//! that fail now are dead-lettered with the reason, never dropped
//! silently).

use std::sync::Arc;
use std::time::Duration;

use outpost_shared::frame::{self, FrameError, FrameLimits};
use outpost_shared::id::{ClientId, EventId};
use outpost_shared::validate::{Limits, fill_defaults, validate_event};
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

pub fn now_ms() -> i64 {
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
    let _ = ctx.metrics.sink_writes.get_or_create(&label);
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
        let narrowing = ctx.config.max_attempts > 0 && refusals >= ctx.config.max_attempts;
        if narrowing {
            tracing::warn!(
                sink = name,
                tries = refusals,
                batches = due.len(),
                "writes keep being refused; narrowing them down by halves"
            );
            refusals = 0;
        }
        match deliver(&sink, &ctx, &due, narrowing).await {
            Ok(()) => {
                backoff.failures = 0;
                refusals = 0;
                ctx.metrics.sink_writes.get_or_create(&label).inc();
                // Not a full write: let more batches gather for the next
                // (delivery.linger_ms).
                let partial = due.len() < ctx.config.max_batches_per_write as usize;
                if partial && ctx.config.linger_ms > 0 && !stopping {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(ctx.config.linger_ms)) => {}
                        _ = stop.changed() => {}
                    }
                }
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

/// Narrows a write the sink refused down to the rows it refuses on their
/// own: writes each half of `rows`, and each half that fails in halves
/// again, down to single rows. Returns the refused rows by index with the
/// reason; an outage stops the lot (to be retried). Every sink write is
/// idempotent, so a half written before a failure is harmless to repeat.
async fn narrow<S: Sink>(sink: &S, rows: &[Row<'_>]) -> Result<Vec<(usize, String)>, SinkError> {
    let mut refused = Vec::new();
    let halves = |start: usize, end: usize| {
        let mid = start + (end - start) / 2;
        [(start, mid), (mid, end)]
    };
    let mut todo: Vec<(usize, usize)> = Vec::new();
    if rows.len() == 1 {
        todo.push((0, 1));
    } else if !rows.is_empty() {
        // The whole write already failed: start from its halves. The stack
        // takes the first half last, so it is written first.
        todo.extend(halves(0, rows.len()).into_iter().rev());
    }
    while let Some((start, end)) = todo.pop() {
        match sink.write(&rows[start..end]).await {
            Ok(()) => {}
            Err(SinkError::Rejected(why) | SinkError::Refused(why)) if end - start == 1 => {
                refused.push((start, why));
            }
            Err(SinkError::Rejected(_) | SinkError::Refused(_)) => {
                todo.extend(halves(start, end).into_iter().rev());
            }
            Err(e @ SinkError::Unavailable(_)) => return Err(e),
        }
    }
    refused.sort_by_key(|(i, _)| *i);
    Ok(refused)
}

struct Decoded {
    seq: i64,
    checked: Arc<Checked>,
    /// Valid and not a duplicate.
    keep: Vec<bool>,
    geo: Option<Arc<Geo>>,
}

/// Decodes a spooled frame into what the hand-off would have held: the
/// events ingest accepted, by its `verdict`, with the defaults validation
/// fills in (the same arrival time). Without a verdict (a batch spooled
/// before verdicts were kept) the events are judged again with today's
/// limits; those that fail are returned with the reason, to dead-letter.
fn check(
    bytes: &[u8],
    verdict: Option<&[bool]>,
    ctx: &DeliveryContext,
) -> Result<(Checked, Vec<(usize, String)>), FrameError> {
    let mut frame = frame::decode_verified(bytes, &ctx.frame_limits)?;
    let received_at = frame.batch.facts.received_at;
    let events = &mut frame.batch.events;
    let mut refused_now = Vec::new();
    let valid = match verdict.filter(|v| v.len() == events.len()) {
        Some(v) => {
            for (e, ok) in events.iter_mut().zip(v) {
                if *ok {
                    fill_defaults(e, received_at);
                }
            }
            v.to_vec()
        }
        None => events
            .iter_mut()
            .enumerate()
            .map(|(i, e)| match validate_event(e, &ctx.limits, received_at) {
                Ok(()) => true,
                Err(err) => {
                    refused_now.push((
                        i,
                        format!(
                            "refused on redelivery by today's limits: {} ({})",
                            err.message, err.code
                        ),
                    ));
                    false
                }
            })
            .collect(),
    };
    Ok((Checked::new(frame, valid), refused_now))
}

/// The spool failing is not the data's fault: retried like an outage.
fn spool_error(e: crate::spool::SpoolError) -> SinkError {
    SinkError::Unavailable(format!("spool: {e}"))
}

/// A row that goes to dead letters, and the claim it gives back.
struct Refused<'r> {
    row: &'r Row<'r>,
    reason: String,
}

/// Delivers `due` in one write, or with `narrowing` by halves from the
/// start (the sink keeps refusing the whole).
async fn deliver<S: Sink>(
    sink: &S,
    ctx: &DeliveryContext,
    due: &[Pending],
    narrowing: bool,
) -> Result<(), SinkError> {
    let name = sink.name();
    let now = now_ms();
    let mut decoded = Vec::with_capacity(due.len());
    let mut done = Vec::with_capacity(due.len());
    // Events refused on redelivery, per decoded batch: (batch, index, why).
    let mut refused_now: Vec<(usize, usize, String)> = Vec::new();
    for p in due {
        let source = match p.batch {
            Spooled::Checked(_) => "handoff",
            Spooled::Frame(..) => "spool",
        };
        ctx.metrics
            .delivery_batches
            .get_or_create(&SourceLabel { source })
            .inc();
        let checked = match &p.batch {
            Spooled::Checked(c) => c.clone(),
            Spooled::Frame(bytes, verdict) => match check(bytes, verdict.as_deref(), ctx) {
                Ok((c, refused)) => {
                    refused_now.extend(refused.into_iter().map(|(i, why)| (decoded.len(), i, why)));
                    Arc::new(c)
                }
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
                        facts: None,
                        edge_id: None,
                        at_ms: now,
                    };
                    ctx.spool
                        .dead_letter(std::slice::from_ref(&letter))
                        .await
                        .map_err(spool_error)?;
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
        // Only the events ingest accepted are claimed: an id it refused was
        // never stored, and the client's corrected re-send must not be
        // taken for a duplicate.
        let fresh = checked
            .claims
            .get_or_init(|| {
                let ids: Vec<&EventId> = frame
                    .batch
                    .events
                    .iter()
                    .zip(&checked.valid)
                    .filter(|(_, v)| **v)
                    .map(|(e, _)| &e.event_id)
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
        let mut fresh = fresh.iter();
        let keep = checked
            .valid
            .iter()
            .map(|v| *v && fresh.next().copied().unwrap_or(true))
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
    let rejected = if narrowing {
        narrow(sink, &rows).await?
    } else {
        match sink.write(&rows).await {
            Ok(()) => Vec::new(),
            Err(SinkError::Rejected(why)) => {
                tracing::warn!(sink = name, rows = rows.len(), error = %why, "the sink rejected the data; narrowing it down by halves");
                narrow(sink, &rows).await?
            }
            Err(e) => return Err(e),
        }
    };
    let mut refused: Vec<Refused<'_>> = rejected
        .into_iter()
        .map(|(i, reason)| Refused {
            row: &rows[i],
            reason,
        })
        .collect();
    // Events judged again (old spool rows) that fail today's limits.
    let now_rows: Vec<Row<'_>> = refused_now
        .iter()
        .map(|(d, i, _)| {
            let frame = &decoded[*d].checked.frame;
            Row {
                client_id: &frame.batch.client_id,
                batch_id: &frame.header.batch_id,
                edge_id: &frame.header.edge_id,
                facts: &frame.batch.facts,
                event: &frame.batch.events[*i],
                geo: None,
            }
        })
        .collect();
    refused.extend(
        now_rows
            .iter()
            .zip(&refused_now)
            .map(|(row, (_, _, why))| Refused {
                row,
                reason: why.clone(),
            }),
    );
    let payloads: Vec<(Vec<u8>, String)> = refused
        .iter()
        .map(|r| {
            (
                serde_json::to_vec(r.row.event).unwrap_or_default(),
                serde_json::to_string(r.row.facts).unwrap_or_default(),
            )
        })
        .collect();
    let letters: Vec<DeadLetter<'_>> = refused
        .iter()
        .zip(&payloads)
        .map(|(r, (payload, facts))| DeadLetter {
            sink: name,
            batch_id: &r.row.batch_id.0,
            client_id: r.row.client_id,
            event_id: Some(&r.row.event.event_id),
            error: &r.reason,
            payload,
            facts: Some(facts.clone()),
            edge_id: Some(r.row.edge_id),
            at_ms: now,
        })
        .collect();
    ctx.spool.dead_letter(&letters).await.map_err(spool_error)?;
    for r in &refused {
        tracing::warn!(sink = name, client_id = %r.row.client_id, event_id = %r.row.event.event_id, reason = %r.reason, "row dead-lettered");
    }
    // The refused rows were not stored: their claims go back, so that the
    // client's corrected re-send with the same ids is not a duplicate.
    let mut by_batch: std::collections::BTreeMap<(&ClientId, &[u8; 16]), Vec<&EventId>> =
        std::collections::BTreeMap::new();
    for r in &refused {
        by_batch
            .entry((r.row.client_id, &r.row.batch_id.0))
            .or_default()
            .push(&r.row.event.event_id);
    }
    for ((client, batch), ids) in by_batch {
        ctx.dedup
            .release(client, &ids, &outpost_shared::frame::BatchId(*batch))
            .await;
    }
    let label = SinkLabel { sink: name };
    let stored_refused = refused.len() - refused_now.len();
    ctx.metrics
        .sink_delivered_events
        .get_or_create(&label)
        .inc_by((rows.len() - stored_refused) as u64);
    ctx.metrics
        .sink_dead_letters
        .get_or_create(&label)
        .inc_by(refused.len() as u64);
    done.extend(decoded.iter().map(|d| d.seq));
    ctx.spool.delivered(name, &done).await.map_err(spool_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::sample::typical_batch;
    use std::sync::Mutex;

    /// A sink that refuses every write holding one of the `poison` rows
    /// (by event index), and counts its writes.
    struct PickySink {
        poison: Vec<usize>,
        writes: Mutex<u32>,
    }

    impl Sink for PickySink {
        fn name(&self) -> &'static str {
            "picky"
        }
        async fn write(&self, rows: &[Row<'_>]) -> Result<(), SinkError> {
            *self.writes.lock().unwrap() += 1;
            let bad = rows
                .iter()
                .any(|r| self.poison.contains(&(r.event.seq.unwrap_or(0) as usize)));
            if bad {
                Err(SinkError::Rejected("bad row".into()))
            } else {
                Ok(())
            }
        }
        async fn ping(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn narrowing_by_halves_finds_the_bad_rows_in_logarithmic_writes() {
        let mut batch = typical_batch(16_000);
        for (i, e) in batch.events.iter_mut().enumerate() {
            e.seq = Some(i as u64);
        }
        let rows = Row::of_batch(&batch, None);
        for poison in [vec![0], vec![15_999], vec![7_777], vec![3, 9_000, 12_345]] {
            let sink = PickySink {
                poison: poison.clone(),
                writes: Mutex::new(0),
            };
            let refused = narrow(&sink, &rows).await.unwrap();
            let found: Vec<usize> = refused.iter().map(|(i, _)| *i).collect();
            assert_eq!(found, poison);
            let writes = *sink.writes.lock().unwrap();
            // log2(16,000) is 14: two writes per level and bad row at most.
            assert!(
                writes <= 2 * 14 * poison.len() as u32 + 2,
                "{writes} writes for {poison:?}"
            );
        }
        let clean = PickySink {
            poison: vec![],
            writes: Mutex::new(0),
        };
        assert!(narrow(&clean, &rows).await.unwrap().is_empty());
        assert_eq!(*clean.writes.lock().unwrap(), 2, "the two halves");
    }

    #[tokio::test]
    async fn an_outage_while_narrowing_stops_it_for_a_retry() {
        struct Down;
        impl Sink for Down {
            fn name(&self) -> &'static str {
                "down"
            }
            async fn write(&self, _: &[Row<'_>]) -> Result<(), SinkError> {
                Err(SinkError::Unavailable("gone".into()))
            }
            async fn ping(&self) -> bool {
                false
            }
        }
        let batch = typical_batch(8);
        assert!(matches!(
            narrow(&Down, &Row::of_batch(&batch, None)).await,
            Err(SinkError::Unavailable(_))
        ));
    }

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
