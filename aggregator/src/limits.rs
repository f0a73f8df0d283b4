//! Rate-limit state of the read API, in memory and bounded.
//!
//! The read API checks a per-address limit before it authenticates anyone
//! and the caller's own limit after, with the same GCRA as the edge
//! (`outpost_shared::ratelimit`). Addresses are the caller's to choose, so
//! the state lives in a map of at most [`READ_LIMIT_ENTRIES`] keys that
//! forgets the least recently used one when full: an address flood costs
//! old buckets (which start afresh), never memory. Each aggregator keeps
//! its own: read limits are per instance.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use lru::LruCache;
use outpost_shared::kv::Kv;

/// Keys the read-limit map holds.
pub const READ_LIMIT_ENTRIES: usize = 100_000;

/// A bounded in-memory [`Kv`] with expiry.
pub struct BoundedKv {
    map: Mutex<LruCache<String, (Vec<u8>, i64)>>,
}

impl BoundedKv {
    /// At most `max_entries` keys.
    pub fn new(max_entries: usize) -> BoundedKv {
        BoundedKv {
            map: Mutex::new(LruCache::new(
                NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, (Vec<u8>, i64)>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keys held (expired ones included until they are read or pushed out).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Kv for BoundedKv {
    type Error = core::convert::Infallible;

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Self::Error> {
        let mut map = self.lock();
        match map.get(key) {
            Some((_, until)) if *until <= now_ms() => {
                map.pop(key);
                Ok(None)
            }
            Some((v, _)) => Ok(Some(v.clone())),
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: &[u8], ttl_secs: u64) -> Result<(), Self::Error> {
        let ttl_ms = i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        self.lock().put(
            key.to_owned(),
            (value.to_vec(), now_ms().saturating_add(ttl_ms)),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::kv::block_on;
    use outpost_shared::ratelimit::{RateLimit, check};

    #[test]
    fn an_address_flood_costs_old_buckets_never_memory() {
        let kv = BoundedKv::new(1_000);
        let limit = RateLimit {
            limit: 2,
            period_secs: 60,
        };
        let now = now_ms();
        for i in 0..50_000u32 {
            let key = format!("rl:read-ip:{}", std::net::Ipv4Addr::from(i));
            assert!(block_on(check(&kv, &key, &limit, now, 1)).unwrap().allowed);
        }
        assert_eq!(kv.len(), 1_000);
        // A recent address is still limited.
        let recent = format!("rl:read-ip:{}", std::net::Ipv4Addr::from(49_999u32));
        assert!(
            block_on(check(&kv, &recent, &limit, now, 1))
                .unwrap()
                .allowed
        );
        assert!(
            !block_on(check(&kv, &recent, &limit, now, 1))
                .unwrap()
                .allowed
        );
    }
}
