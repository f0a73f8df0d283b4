//! A bounded key space over a store that never forgets: Spin's key-value.
//!
//! Spin's store has no expiry, and the edge writes keys that callers
//! choose — a made-up write key is cached as "no such client", a new
//! address gets a rate-limit bucket. On such a store every key would live
//! for ever, so [`SlottedKv`] never writes the caller's key: each key maps,
//! by a keyed hash, to one of `slots` slots of its *use* (the key's first
//! `:`-separated segment: `client`, `noclient`, `rla`, `nonce`, …), and the
//! slot holds the entry, its deadline and a tag of the key it belongs to.
//! A slot taken by another key reads as empty; writing takes the slot over.
//! So the store holds at most `slots` keys per use, whatever the traffic,
//! and a flood of one use (unknown ids) cannot push out another (cached
//! records, a client's rate limit).
//!
//! The price is that two live keys of one use can share a slot and evict
//! each other: a rate-limit bucket then starts afresh, a cached record is
//! fetched again, a nonce is forgotten early (the aggregator's duplicate
//! check still drops a replayed batch's events). The hash is keyed with a
//! secret, so a caller cannot aim at another key's slot.
//!
//! Stored value: the deadline (epoch milliseconds, 8 bytes big-endian),
//! the key's tag (8 bytes), then the value. The deadline comes first so
//! that a host that can expire entries (`outpost edge`) can read it.

use hmac::{Hmac, Mac};
use outpost_shared::kv::Kv;
use sha2::Sha256;

const HEADER: usize = 16;

/// A [`Kv`] over `K` (whose own TTL, if any, is still passed on) that
/// keeps at most `slots` keys per use.
pub struct SlottedKv<K, C> {
    inner: K,
    clock: C,
    slots: u32,
    hash_key: [u8; 32],
}

impl<K: Kv, C: Fn() -> i64> SlottedKv<K, C> {
    /// Wraps `inner`; `secret` keys the slot hash (the edge key's secret
    /// will do), `clock` gives epoch milliseconds.
    pub fn new(inner: K, clock: C, slots: u32, secret: &[u8]) -> Self {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
        m.update(b"outpost kv slots v1");
        SlottedKv {
            inner,
            clock,
            slots: slots.max(1),
            hash_key: m.finalize().into_bytes().into(),
        }
    }

    /// The store key of `key`'s slot, and `key`'s tag.
    fn slot(&self, key: &str) -> (String, [u8; 8]) {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.hash_key)
            .expect("HMAC takes keys of any length");
        m.update(key.as_bytes());
        let h = m.finalize().into_bytes();
        let slot = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
            % u64::from(self.slots);
        let tag = [h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]];
        let category = key.split(':').next().unwrap_or("");
        (format!("{category}:{slot:x}"), tag)
    }
}

impl<K: Kv, C: Fn() -> i64> Kv for SlottedKv<K, C> {
    type Error = K::Error;

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, K::Error> {
        let (slot, tag) = self.slot(key);
        let Some(stored) = self.inner.get(&slot).await? else {
            return Ok(None);
        };
        if stored.len() < HEADER || stored[8..HEADER] != tag {
            return Ok(None);
        }
        let deadline = i64::from_be_bytes(stored[..8].try_into().unwrap_or_default());
        if deadline <= (self.clock)() {
            return Ok(None);
        }
        Ok(Some(stored[HEADER..].to_vec()))
    }

    async fn put(&self, key: &str, value: &[u8], ttl_secs: u64) -> Result<(), K::Error> {
        let (slot, tag) = self.slot(key);
        let ttl_ms = i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let deadline = (self.clock)().saturating_add(ttl_ms);
        let mut stored = Vec::with_capacity(HEADER + value.len());
        stored.extend_from_slice(&deadline.to_be_bytes());
        stored.extend_from_slice(&tag);
        stored.extend_from_slice(value);
        self.inner.put(&slot, &stored, ttl_secs).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::kv::{MemoryKv, block_on};
    use std::cell::Cell;

    fn slotted(slots: u32, now: &Cell<i64>) -> SlottedKv<MemoryKv, impl Fn() -> i64 + '_> {
        let kv = MemoryKv::default();
        // The inner store never expires anything here: Spin's does not.
        kv.set_now_ms(0);
        SlottedKv::new(kv, move || now.get(), slots, b"edge-secret")
    }

    #[test]
    fn entries_round_trip_and_expire_by_their_own_deadline() {
        let now = Cell::new(1_000_000);
        let kv = slotted(1024, &now);
        block_on(kv.put("client:web", b"record", 60)).unwrap();
        assert_eq!(
            block_on(kv.get("client:web")).unwrap(),
            Some(b"record".to_vec())
        );
        assert_eq!(block_on(kv.get("client:app")).unwrap(), None);
        now.set(1_000_000 + 59_999);
        assert!(block_on(kv.get("client:web")).unwrap().is_some());
        now.set(1_000_000 + 60_000);
        assert_eq!(block_on(kv.get("client:web")).unwrap(), None);
    }

    #[test]
    fn a_flood_of_keys_fills_its_own_slots_only() {
        let now = Cell::new(1_000_000);
        let kv = slotted(256, &now);
        block_on(kv.put("client:web", b"record", 600)).unwrap();
        block_on(kv.put("rlc:web", b"bucket", 600)).unwrap();
        for i in 0..100_000 {
            block_on(kv.put(&format!("noclient:ghost-{i}"), b"", 600)).unwrap();
            block_on(kv.put(&format!("rla:10.{}.{}.1", i / 256, i % 256), b"x", 600)).unwrap();
        }
        let keys = kv.inner.len();
        assert!(keys <= 2 * 256 + 2, "{keys} keys for 200,002 writes");
        assert_eq!(
            block_on(kv.get("client:web")).unwrap(),
            Some(b"record".to_vec())
        );
        assert_eq!(
            block_on(kv.get("rlc:web")).unwrap(),
            Some(b"bucket".to_vec())
        );
    }

    #[test]
    fn a_key_that_lost_its_slot_reads_as_absent_never_as_another_keys_value() {
        let now = Cell::new(1_000_000);
        let kv = slotted(1, &now);
        block_on(kv.put("nonce:c:a", b"1", 600)).unwrap();
        block_on(kv.put("nonce:c:b", b"2", 600)).unwrap();
        assert_eq!(block_on(kv.get("nonce:c:a")).unwrap(), None);
        assert_eq!(block_on(kv.get("nonce:c:b")).unwrap(), Some(b"2".to_vec()));
    }

    #[test]
    fn slots_depend_on_the_secret() {
        let now = Cell::new(0);
        let a = SlottedKv::new(MemoryKv::default(), || now.get(), 1 << 16, b"one");
        let b = SlottedKv::new(MemoryKv::default(), || now.get(), 1 << 16, b"two");
        let differ = (0..32)
            .filter(|i| a.slot(&format!("rla:{i}")).0 != b.slot(&format!("rla:{i}")).0)
            .count();
        assert!(differ > 24, "{differ}");
        assert!(a.slot("rla:1.2.3.4").0.starts_with("rla:"));
    }
}
