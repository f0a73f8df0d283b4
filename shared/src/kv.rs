//! The key-value seam: the one storage interface `shared` rules may use.
//!
//! Cloudflare KV, Spin's key-value store and in-process maps all implement
//! [`Kv`]. Values are bytes; `ttl_secs` is a request to forget the entry
//! after that long. Implementations on stores without expiry (Spin) keep the
//! deadline inside the stored value; stores with a minimum TTL (Cloudflare:
//! 60 s) round up. Nothing here may rely on reading its own write at another
//! point of presence: KV is eventually consistent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

/// A small async key-value store. Futures need not be `Send` (Workers are
/// single-threaded).
#[allow(async_fn_in_trait)]
pub trait Kv {
    /// The store's error.
    type Error: core::fmt::Debug + core::fmt::Display;
    /// Reads a key; `None` when absent or expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Self::Error>;
    /// Writes a key, to be forgotten after `ttl_secs`.
    async fn put(&self, key: &str, value: &[u8], ttl_secs: u64) -> Result<(), Self::Error>;
}

/// Value, requested TTL in seconds, and the deadline in epoch milliseconds.
type Entry = (Vec<u8>, u64, i64);

/// An in-process [`Kv`] with expiry by a clock the caller sets: for tests
/// and single-process use (`outpost dev`). Not shared between processes.
#[derive(Debug, Default)]
pub struct MemoryKv {
    entries: Mutex<HashMap<String, Entry>>,
    now_ms: AtomicI64,
}

impl MemoryKv {
    /// Sets the store's notion of now (milliseconds since the epoch).
    pub fn set_now_ms(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::Relaxed);
    }

    /// The TTL the last write of `key` asked for (for tests).
    pub fn ttl_of(&self, key: &str) -> Option<u64> {
        self.lock().get(key).map(|(_, ttl, _)| *ttl)
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        let now = self.now_ms.load(Ordering::Relaxed);
        self.lock()
            .values()
            .filter(|(_, _, exp)| *exp > now)
            .count()
    }

    /// True when no live entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave a map half-written.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Kv for MemoryKv {
    type Error = core::convert::Infallible;

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Self::Error> {
        let now = self.now_ms.load(Ordering::Relaxed);
        let mut map = self.lock();
        match map.get(key) {
            Some((v, _, exp)) if *exp > now => Ok(Some(v.clone())),
            Some(_) => {
                map.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: &[u8], ttl_secs: u64) -> Result<(), Self::Error> {
        let now = self.now_ms.load(Ordering::Relaxed);
        let ttl_ms = i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        self.lock().insert(
            key.to_owned(),
            (value.to_vec(), ttl_secs, now.saturating_add(ttl_ms)),
        );
        Ok(())
    }
}

/// Runs a future that never waits on I/O (in-memory KV) to completion.
/// For tests and benches of the pure rules; not an executor.
pub fn block_on<F: core::future::Future>(fut: F) -> F::Output {
    let mut fut = core::pin::pin!(fut);
    let mut cx = core::task::Context::from_waker(core::task::Waker::noop());
    loop {
        if let core::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_kv_forgets_entries_after_their_ttl() {
        let kv = MemoryKv::default();
        kv.set_now_ms(1_000);
        block_on(kv.put("k", b"v", 2)).unwrap();
        assert_eq!(block_on(kv.get("k")).unwrap(), Some(b"v".to_vec()));
        kv.set_now_ms(2_999);
        assert!(block_on(kv.get("k")).unwrap().is_some());
        kv.set_now_ms(3_000);
        assert_eq!(block_on(kv.get("k")).unwrap(), None);
        assert!(kv.is_empty());
    }
}
