//! A per-instance cache in front of a platform's KV store.
//!
//! Cloudflare KV takes at most one write per key per second and refuses
//! TTLs under 60 s; every rate-limited request would otherwise write its
//! key. [`CachedKv`] answers reads from memory first, and writes through to
//! the store at most once per key per `write_interval_ms`, keeping newer
//! values in memory in between (the next write after the interval carries
//! the latest). TTLs are raised to the store's minimum. What a dying
//! instance had not written through is lost: fine for rate-limit state,
//! which is per-PoP best effort anyway; a key written once (a nonce, a
//! cached client record) always goes through at once.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use outpost_shared::kv::Kv;

/// Settings for one platform.
#[derive(Debug, Clone, Copy)]
pub struct KvLimits {
    /// The store's shortest TTL, seconds (Cloudflare: 60; Spin: 0).
    pub min_ttl_secs: u64,
    /// Shortest time between two writes of one key, ms (Cloudflare: 1000).
    pub write_interval_ms: i64,
    /// Most keys kept in memory.
    pub max_entries: usize,
}

struct Entry {
    value: Vec<u8>,
    expires_ms: i64,
    last_write_ms: i64,
}

/// The cached entries, kept apart from the store so that they can outlive
/// one request: a platform that reuses an instance for many requests (a
/// Workers isolate) keeps one of these in a thread-local and hands a clone
/// to each request's [`CachedKv`]. Clones share the entries.
#[derive(Clone, Default)]
pub struct KvCacheState(Rc<RefCell<HashMap<String, Entry>>>);

/// The cache. Single-threaded, as edge instances are.
pub struct CachedKv<K, C> {
    inner: K,
    clock: C,
    limits: KvLimits,
    entries: KvCacheState,
}

impl<K: Kv, C: Fn() -> i64> CachedKv<K, C> {
    /// Wraps `inner`; `clock` gives milliseconds since the epoch.
    pub fn new(inner: K, clock: C, limits: KvLimits) -> Self {
        Self::with_state(inner, clock, limits, KvCacheState::default())
    }

    /// Wraps `inner`, keeping entries in `state` (shared with earlier
    /// requests on this instance).
    pub fn with_state(inner: K, clock: C, limits: KvLimits, state: KvCacheState) -> Self {
        CachedKv {
            inner,
            clock,
            limits,
            entries: state,
        }
    }

    /// The store underneath.
    pub fn inner(&self) -> &K {
        &self.inner
    }

    fn remember(&self, key: &str, value: &[u8], expires_ms: i64, last_write_ms: i64) {
        let now = (self.clock)();
        let mut entries = self.entries.0.borrow_mut();
        if entries.len() >= self.limits.max_entries && !entries.contains_key(key) {
            entries.retain(|_, e| e.expires_ms > now);
            if entries.len() >= self.limits.max_entries {
                // Still full of live entries: forget them all rather than grow;
                // the store still has what was written through.
                entries.clear();
            }
        }
        entries.insert(
            key.to_owned(),
            Entry {
                value: value.to_vec(),
                expires_ms,
                last_write_ms,
            },
        );
    }
}

impl<K: Kv, C: Fn() -> i64> Kv for CachedKv<K, C> {
    type Error = K::Error;

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, K::Error> {
        let now = (self.clock)();
        if let Some(e) = self.entries.0.borrow().get(key)
            && e.expires_ms > now
        {
            return Ok(Some(e.value.clone()));
        }
        let value = self.inner.get(key).await?;
        if let Some(v) = &value {
            // The store keeps its own expiry; cache briefly so the next
            // request on this instance needs no round trip. last_write 0:
            // a write of this key may go through at once.
            self.remember(key, v, now + self.limits.write_interval_ms.max(1000), 0);
        }
        Ok(value)
    }

    async fn put(&self, key: &str, value: &[u8], ttl_secs: u64) -> Result<(), K::Error> {
        let now = (self.clock)();
        let ttl = ttl_secs.max(self.limits.min_ttl_secs);
        let expires =
            now.saturating_add(i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX));
        let last = self
            .entries
            .0
            .borrow()
            .get(key)
            .map_or(i64::MIN, |e| e.last_write_ms);
        if now.saturating_sub(last) < self.limits.write_interval_ms {
            // Too soon for the store: keep the newer value here only.
            self.remember(key, value, expires, last);
            return Ok(());
        }
        self.inner.put(key, value, ttl).await?;
        self.remember(key, value, expires, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::kv::{MemoryKv, block_on};
    use outpost_shared::ratelimit::{RateLimit, check};
    use std::cell::Cell;

    /// Counts writes that reach the store.
    #[derive(Default)]
    struct CountingKv {
        inner: MemoryKv,
        writes: Cell<u32>,
        ttls: RefCell<Vec<u64>>,
    }

    impl Kv for CountingKv {
        type Error = core::convert::Infallible;
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Self::Error> {
            self.inner.get(key).await
        }
        async fn put(&self, key: &str, value: &[u8], ttl: u64) -> Result<(), Self::Error> {
            self.writes.set(self.writes.get() + 1);
            self.ttls.borrow_mut().push(ttl);
            self.inner.put(key, value, ttl).await
        }
    }

    const CLOUDFLARE: KvLimits = KvLimits {
        min_ttl_secs: 60,
        write_interval_ms: 1000,
        max_entries: 1000,
    };

    #[test]
    fn a_hot_key_is_written_through_at_most_once_a_second() {
        let now = Cell::new(1_000_000i64);
        let kv = CachedKv::new(CountingKv::default(), || now.get(), CLOUDFLARE);
        let limit = RateLimit {
            limit: 1000,
            period_secs: 1,
        };
        for i in 0..100 {
            now.set(1_000_000 + i * 25); // 100 requests over 2.5 s
            assert!(
                block_on(check(&kv, "rl:c:web", &limit, now.get(), 1))
                    .unwrap()
                    .allowed
            );
        }
        assert_eq!(kv.inner().writes.get(), 3, "writes at 0, 1.0 and 2.0 s");
        assert!(
            kv.inner().ttls.borrow().iter().all(|t| *t >= 60),
            "Cloudflare's minimum TTL"
        );
    }

    #[test]
    fn the_limit_still_holds_on_the_instance_between_write_throughs() {
        let now = Cell::new(5_000_000i64);
        let kv = CachedKv::new(CountingKv::default(), || now.get(), CLOUDFLARE);
        let limit = RateLimit {
            limit: 3,
            period_secs: 60,
        };
        let allowed: Vec<bool> = (0..5)
            .map(|_| {
                block_on(check(&kv, "rl:c:x", &limit, now.get(), 1))
                    .unwrap()
                    .allowed
            })
            .collect();
        assert_eq!(allowed, [true, true, true, false, false]);
        assert_eq!(kv.inner().writes.get(), 1);
    }

    #[test]
    fn keys_written_once_go_through_at_once_and_reads_fall_back_to_the_store() {
        let now = Cell::new(0i64);
        let store = CountingKv::default();
        block_on(store.inner.put("client:web", b"record", 60)).unwrap();
        let kv = CachedKv::new(store, || now.get(), CLOUDFLARE);
        assert_eq!(
            block_on(kv.get("client:web")).unwrap(),
            Some(b"record".to_vec())
        );
        block_on(kv.put("nonce:a", b"1", 600)).unwrap();
        block_on(kv.put("nonce:b", b"1", 600)).unwrap();
        assert_eq!(kv.inner().writes.get(), 2);
        assert_eq!(block_on(kv.get("missing")).unwrap(), None);
    }

    #[test]
    fn memory_stays_bounded() {
        let now = Cell::new(0i64);
        let kv = CachedKv::new(
            CountingKv::default(),
            || now.get(),
            KvLimits {
                max_entries: 10,
                ..CLOUDFLARE
            },
        );
        for i in 0..100 {
            block_on(kv.put(&format!("k{i}"), b"v", 600)).unwrap();
        }
        assert!(kv.entries.0.borrow().len() <= 10);
    }
}
