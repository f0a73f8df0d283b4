//! The hand-off: batches ingest has just decoded and validated, kept in
//! memory for the delivery workers, so that they need not read, inflate,
//! decode and validate the spooled frame again — that was a fifth of the
//! aggregator's CPU with two sinks (see BENCHMARKS.md).
//!
//! The spool stays the one durable copy and the source of truth: a batch
//! is put here only as part of its spool commit, and a batch that is not
//! here (the memory bound was reached, the process restarted) is decoded
//! from its frame, with the same result. A batch leaves when every sink has
//! it, as it leaves the spool.

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::{Arc, Mutex, PoisonError};

use outpost_shared::event::Event;
use outpost_shared::frame::Frame;

/// A decoded frame with the outcome of validating each of its events.
#[derive(Debug)]
pub struct Checked {
    /// The frame, its events as validation left them (timestamps filled).
    pub frame: Frame,
    /// Per event: whether it passed validation.
    pub valid: Vec<bool>,
    /// About how much memory it holds, in bytes.
    pub bytes: u64,
    /// Per valid event, in order: whether dedup let it through, once the
    /// first sink to take the batch has claimed their ids (invalid events
    /// are never claimed). The other sinks take the same answer instead of
    /// asking Redis again (which would answer the same: the keys hold this
    /// batch's id), so all sinks drop the same events.
    pub claims: tokio::sync::OnceCell<Vec<bool>>,
}

impl Checked {
    /// Wraps a validated frame and measures it.
    pub fn new(frame: Frame, valid: Vec<bool>) -> Checked {
        let bytes = approx_bytes(&frame);
        Checked {
            frame,
            valid,
            bytes,
            claims: tokio::sync::OnceCell::new(),
        }
    }
}

struct Slot {
    batch: Arc<Checked>,
    /// Sinks that have yet to deliver it.
    left: usize,
}

struct Slots {
    by_seq: HashMap<i64, Slot>,
    bytes: u64,
}

/// Checked batches by spool sequence number, up to a memory bound.
pub struct Handoff {
    slots: Mutex<Slots>,
    max_bytes: u64,
    sinks: usize,
}

impl Handoff {
    /// A hand-off for `sinks` sinks holding at most `max_bytes` (0: off).
    pub fn new(max_bytes: u64, sinks: usize) -> Handoff {
        Handoff {
            slots: Mutex::new(Slots {
                by_seq: HashMap::new(),
                bytes: 0,
            }),
            max_bytes,
            sinks,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // Nothing here can be left half-updated by a panic.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether it holds anything at all (a bound above 0, a sink to hold for).
    pub fn enabled(&self) -> bool {
        self.max_bytes > 0 && self.sinks > 0
    }

    /// Keeps `batch` for the sinks, unless that would pass the bound.
    pub fn put(&self, seq: i64, batch: Arc<Checked>) -> bool {
        if !self.enabled() {
            return false;
        }
        let mut s = self.slots();
        if s.bytes.saturating_add(batch.bytes) > self.max_bytes {
            return false;
        }
        s.bytes += batch.bytes;
        let old = s.by_seq.insert(
            seq,
            Slot {
                batch,
                left: self.sinks,
            },
        );
        if let Some(old) = old {
            s.bytes -= old.batch.bytes;
        }
        true
    }

    /// The batch at `seq`, if it is here.
    pub fn get(&self, seq: i64) -> Option<Arc<Checked>> {
        self.slots().by_seq.get(&seq).map(|s| s.batch.clone())
    }

    /// One sink has delivered `seqs`: each leaves once every sink has.
    pub fn release(&self, seqs: &[i64]) {
        let mut s = self.slots();
        for seq in seqs {
            let Some(slot) = s.by_seq.get_mut(seq) else {
                continue;
            };
            slot.left = slot.left.saturating_sub(1);
            if slot.left == 0
                && let Some(gone) = s.by_seq.remove(seq)
            {
                s.bytes -= gone.batch.bytes;
            }
        }
    }

    /// Drops `seqs` whatever the sinks did (their spool commit failed).
    pub fn forget(&self, seqs: &[i64]) {
        let mut s = self.slots();
        for seq in seqs {
            if let Some(gone) = s.by_seq.remove(seq) {
                s.bytes -= gone.batch.bytes;
            }
        }
    }

    /// Drops every batch below `seq` (a shared spool's sinks have them
    /// all, on whichever node; this node would wait for ever otherwise).
    pub fn forget_below(&self, seq: i64) {
        let mut s = self.slots();
        let gone: Vec<i64> = s.by_seq.keys().copied().filter(|k| *k < seq).collect();
        for k in gone {
            if let Some(slot) = s.by_seq.remove(&k) {
                s.bytes -= slot.batch.bytes;
            }
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.slots().bytes
    }
}

/// About how many bytes of memory a decoded frame holds: the structs, the
/// text, and the property trees (each node's own size plus an allowance
/// for the map that holds it). An estimate for a memory bound, not an
/// allocator's count.
pub fn approx_bytes(frame: &Frame) -> u64 {
    let b = &frame.batch;
    let facts = [
        &b.facts.client_ip,
        &b.facts.user_agent,
        &b.facts.pop,
        &b.facts.country_hint,
        &b.facts.origin,
    ]
    .into_iter()
    .map(text)
    .sum::<usize>();
    let events: usize = b.events.iter().map(event_bytes).sum();
    (size_of::<Frame>() + b.client_id.len() + facts + events) as u64
}

fn text(s: &Option<String>) -> usize {
    s.as_ref().map_or(0, String::len)
}

fn event_bytes(e: &Event) -> usize {
    let strings = e.event_id.len()
        + [
            &e.name,
            &e.message,
            &e.user_id,
            &e.anonymous_id,
            &e.session_id,
            &e.trace_id,
            &e.span_id,
        ]
        .into_iter()
        .map(text)
        .sum::<usize>()
        + e.context
            .fields()
            .iter()
            .map(|(_, v)| v.map_or(0, str::len))
            .sum::<usize>();
    // Properties are their JSON text, as the client sent it.
    size_of::<Event>() + size_of::<bool>() + strings + e.properties.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::frame::{BatchId, FrameHeader};
    use outpost_shared::sample::typical_batch;

    fn checked(events: usize) -> Arc<Checked> {
        let batch = typical_batch(events);
        let frame = Frame {
            header: FrameHeader {
                edge_id: "e1".into(),
                key_id: "k1".into(),
                batch_id: BatchId([7; 16]),
                created_at: batch.facts.received_at,
                event_count: events as u32,
                flags: 0,
            },
            batch,
        };
        Arc::new(Checked::new(frame, vec![true; events]))
    }

    #[test]
    fn a_batch_stays_until_every_sink_has_released_it() {
        let h = Handoff::new(u64::MAX, 2);
        let b = checked(3);
        assert!(h.put(1, b.clone()));
        assert_eq!(h.bytes(), b.bytes);
        h.release(&[1]);
        assert!(h.get(1).is_some(), "one of two sinks released it");
        h.release(&[1]);
        assert!(h.get(1).is_none());
        assert_eq!(h.bytes(), 0);
        // Releasing what is not here is harmless.
        h.release(&[1, 2]);
        assert_eq!(h.bytes(), 0);
    }

    #[test]
    fn the_memory_bound_turns_batches_away_instead_of_growing() {
        let b = checked(10);
        let h = Handoff::new(b.bytes * 2, 1);
        assert!(h.put(1, b.clone()));
        assert!(h.put(2, b.clone()));
        assert!(!h.put(3, b.clone()), "a third would pass the bound");
        assert!(h.get(3).is_none());
        h.release(&[1]);
        assert!(h.put(3, b.clone()), "room again once one has left");
        h.forget(&[2, 3]);
        assert_eq!(h.bytes(), 0);
        assert!(!Handoff::new(0, 1).put(1, b.clone()), "0 turns it off");
        assert!(
            !Handoff::new(u64::MAX, 0).put(1, b),
            "no sink, nothing to keep"
        );
    }

    #[test]
    fn the_estimate_grows_with_the_events_and_their_properties() {
        let one = checked(1).bytes;
        let hundred = checked(100).bytes;
        let per_event = (hundred - one) / 99;
        // Every event's struct, its text, and six properties.
        assert!(per_event > size_of::<Event>() as u64 + 300, "{per_event}");
        assert!(hundred > 60 * one && hundred < 100 * one, "{one} {hundred}");
        let mut big = checked(1).frame.clone();
        big.batch.events[0]
            .properties
            .insert("blob".into(), "x".repeat(10_000).into());
        assert!(approx_bytes(&big) > one + 10_000);
    }
}
