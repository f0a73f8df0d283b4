//! The backends of Spin's `default` key-value store.
//!
//! The edge keeps rate-limit windows, seen nonces and cached client records
//! here. Spin's interface has no expiry, so the Outpost component puts each
//! value's deadline in its first 8 bytes (epoch milliseconds, big-endian;
//! `outpost_edge::kv_slots`) and keeps a bounded number of keys per use.
//! The host uses that deadline too, so that nothing it stores outlives its
//! use: the in-memory map forgets expired entries and, when full, the least
//! recently used one (it never refuses a write); Redis gets the deadline as
//! the key's expiry (`PX`). A value without a plausible deadline is kept
//! without one (the memory bound still holds).
//!
//! A backend only stores bytes; errors are plain strings because the guest
//! only sees them as `error::other` and decides per use what an outage
//! means (rate limits let requests through, nonces do not). Each error is
//! counted by use in [`KvStats`] and logged.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lru::LruCache;

use crate::config::KvConfig;

/// Most keys the in-memory store holds by default; past it the least
/// recently used key is forgotten.
pub const MEMORY_MAX_KEYS: usize = 200_000;

/// The deadline a value carries, when it carries a plausible one (between
/// 2001 and 2200: anything else is not one of ours).
fn deadline_of(value: &[u8]) -> Option<i64> {
    let d = i64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    (1_000_000_000_000..7_258_118_400_000)
        .contains(&d)
        .then_some(d)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the guest uses a key for: its first `:`-separated segment
/// (`client`, `noclient`, `rla`, `rlc`, `nonce`, …), or `other`.
pub(crate) fn use_of(key: &str) -> &'static str {
    const USES: &[&str] = &["client", "noclient", "rla", "rlc", "rlci", "rll", "nonce"];
    let first = key.split(':').next().unwrap_or("");
    USES.iter()
        .find(|u| **u == first)
        .copied()
        .unwrap_or("other")
}

/// Counters of one host's store, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct KvStats {
    /// Failed operations, by use.
    pub(crate) errors: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Entries the memory store dropped to stay within its bound.
    pub(crate) evicted: AtomicU64,
}

impl KvStats {
    fn error(&self, key: &str, e: &StoreError) {
        let used_for = use_of(key);
        tracing::warn!(used_for, error = %e, "key-value store operation failed");
        *self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(used_for)
            .or_default() += 1;
    }
}

/// A value and the deadline it carries, if any.
type Entry = (Vec<u8>, Option<i64>);

/// The in-memory store: a bounded LRU map of values and their deadlines.
pub(crate) struct MemoryKv {
    map: Mutex<LruCache<String, Entry>>,
}

impl MemoryKv {
    fn new(max_keys: usize) -> MemoryKv {
        let cap = NonZeroUsize::new(max_keys.max(1)).unwrap_or(NonZeroUsize::MIN);
        MemoryKv {
            map: Mutex::new(LruCache::new(cap)),
        }
    }

    /// A poisoned lock only means another request panicked mid-update of a
    /// plain map; its contents are still a valid map, so keep serving.
    fn lock(&self) -> MutexGuard<'_, LruCache<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut map = self.lock();
        match map.get(key) {
            Some((_, Some(d))) if *d <= now_ms() => {
                map.pop(key);
                None
            }
            Some((v, _)) => Some(v.clone()),
            None => None,
        }
    }

    /// Stores `value`; true when another entry had to make room.
    fn set(&self, key: &str, value: Vec<u8>) -> bool {
        let deadline = deadline_of(&value);
        let mut map = self.lock();
        let full = map.len() == map.cap().get() && !map.contains(key);
        if full {
            // Forget an expired entry rather than a live one, if the least
            // recently used end has one.
            let now = now_ms();
            let expired = map
                .iter()
                .rev()
                .take(16)
                .find(|(_, (_, d))| d.is_some_and(|d| d <= now))
                .map(|(k, _)| k.clone());
            if let Some(k) = expired {
                map.pop(&k);
            }
        }
        let evicted = map.push(key.to_owned(), (value, deadline));
        full && evicted.is_some_and(|(k, _)| k != key)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One host's `default` store.
pub(crate) struct Kv {
    backend: Backend,
    pub(crate) stats: Arc<KvStats>,
}

enum Backend {
    Memory(MemoryKv),
    // Boxed: one per host, and it keeps the common in-memory case small.
    Redis(Box<RedisKv>),
}

impl Kv {
    /// Builds the backend; Redis connects on first use, so a host starts
    /// (and answers, failing open) while Redis is down.
    pub(crate) fn new(cfg: &KvConfig, op_timeout: Duration) -> anyhow::Result<Kv> {
        let backend = match cfg {
            KvConfig::Memory { max_keys } => Backend::Memory(MemoryKv::new(*max_keys)),
            KvConfig::Redis { url, prefix } => Backend::Redis(Box::new(RedisKv {
                client: redis::Client::open(url.as_str())
                    .map_err(|e| anyhow::anyhow!("kv redis url {url:?}: {e}"))?,
                prefix: prefix.clone(),
                op_timeout,
                conn: tokio::sync::OnceCell::new(),
            })),
        };
        Ok(Kv {
            backend,
            stats: Arc::default(),
        })
    }

    fn counted<T>(&self, key: &str, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &r {
            self.stats.error(key, e);
        }
        r
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let r = match &self.backend {
            Backend::Memory(m) => Ok(m.get(key)),
            Backend::Redis(r) => r.query(redis::cmd("GET").arg(r.key(key))).await,
        };
        self.counted(key, r)
    }

    pub(crate) async fn set(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let r = match &self.backend {
            Backend::Memory(m) => {
                if m.set(key, value) {
                    self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Backend::Redis(r) => match deadline_of(&value).map(|d| d - now_ms()) {
                // Already past its deadline: nothing to keep.
                Some(ms) if ms <= 0 => r
                    .query::<i64>(redis::cmd("DEL").arg(r.key(key)))
                    .await
                    .map(drop),
                Some(ms) => {
                    r.query(
                        redis::cmd("SET")
                            .arg(r.key(key))
                            .arg(value)
                            .arg("PX")
                            .arg(ms),
                    )
                    .await
                }
                None => r.query(redis::cmd("SET").arg(r.key(key)).arg(value)).await,
            },
        };
        self.counted(key, r)
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let r = match &self.backend {
            Backend::Memory(m) => {
                m.lock().pop(key);
                Ok(())
            }
            Backend::Redis(r) => r
                .query::<i64>(redis::cmd("DEL").arg(r.key(key)))
                .await
                .map(drop),
        };
        self.counted(key, r)
    }

    pub(crate) async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let r = match &self.backend {
            Backend::Memory(m) => Ok(m.get(key).is_some()),
            Backend::Redis(r) => r.query(redis::cmd("EXISTS").arg(r.key(key))).await,
        };
        self.counted(key, r)
    }

    pub(crate) async fn keys(&self) -> Result<Vec<String>, StoreError> {
        match &self.backend {
            Backend::Memory(m) => {
                let now = now_ms();
                Ok(m.lock()
                    .iter()
                    .filter(|(_, (_, d))| d.is_none_or(|d| d > now))
                    .map(|(k, _)| k.clone())
                    .collect())
            }
            Backend::Redis(r) => r.keys().await,
        }
    }

    /// Keys held now, for the memory store (Redis: `None`, ask Redis).
    pub(crate) fn memory_len(&self) -> Option<usize> {
        match &self.backend {
            Backend::Memory(m) => Some(m.len()),
            Backend::Redis(_) => None,
        }
    }
}

/// Why a KV operation failed (the edge then decides per use: rate limits
/// let the request through, nonces fail closed).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused the command or the connection failed.
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    /// Redis did not answer within the host's operation timeout.
    #[error("redis: timed out")]
    TimedOut,
}

pub(crate) struct RedisKv {
    client: redis::Client,
    prefix: String,
    /// Bounds each command, so that a stalled Redis costs a request its
    /// state (fail open), not its deadline.
    op_timeout: Duration,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
}

impl RedisKv {
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, StoreError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.op_timeout))
                    .set_response_timeout(Some(self.op_timeout))
                    .set_number_of_retries(1);
                self.client.get_connection_manager_with_config(cfg).await
            })
            .await
            .map_err(StoreError::Redis)?;
        Ok(conn.clone())
    }

    async fn query<V: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<V, StoreError> {
        let mut conn = self.connection().await?;
        match tokio::time::timeout(self.op_timeout, cmd.query_async(&mut conn)).await {
            Ok(r) => r.map_err(StoreError::Redis),
            Err(_) => Err(StoreError::TimedOut),
        }
    }

    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let pattern = format!("{}*", glob_escape(&self.prefix));
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500),
                )
                .await?;
            out.extend(
                batch
                    .into_iter()
                    .filter_map(|k| k.strip_prefix(&self.prefix).map(str::to_owned)),
            );
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}

/// Escapes Redis glob metacharacters, so that a prefix matches literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_deadline(deadline: i64, value: &[u8]) -> Vec<u8> {
        [&deadline.to_be_bytes()[..], value].concat()
    }

    #[tokio::test]
    async fn memory_store_round_trips() {
        let kv = Kv::new(&KvConfig::default(), Duration::from_secs(1)).unwrap();
        assert_eq!(kv.get("a").await.unwrap(), None);
        kv.set("a", b"1".to_vec()).await.unwrap();
        assert_eq!(kv.get("a").await.unwrap(), Some(b"1".to_vec()));
        assert!(kv.exists("a").await.unwrap());
        assert_eq!(kv.keys().await.unwrap(), vec!["a".to_owned()]);
        kv.delete("a").await.unwrap();
        kv.delete("a").await.unwrap();
        assert!(!kv.exists("a").await.unwrap());
    }

    #[tokio::test]
    async fn a_full_memory_store_forgets_the_oldest_key_instead_of_refusing() {
        let kv = Kv::new(&KvConfig::Memory { max_keys: 100 }, Duration::from_secs(1)).unwrap();
        for i in 0..10_000 {
            kv.set(&format!("rla:{i}"), b"x".to_vec()).await.unwrap();
        }
        assert_eq!(kv.memory_len(), Some(100));
        assert_eq!(kv.stats.evicted.load(Ordering::Relaxed), 9_900);
        assert_eq!(kv.get("rla:9999").await.unwrap(), Some(b"x".to_vec()));
        assert_eq!(kv.get("rla:0").await.unwrap(), None);
        // Overwriting a key that exists evicts nothing.
        kv.set("rla:9999", b"y".to_vec()).await.unwrap();
        assert_eq!(kv.stats.evicted.load(Ordering::Relaxed), 9_900);
    }

    #[tokio::test]
    async fn memory_entries_expire_at_the_deadline_their_value_carries() {
        let kv = Kv::new(&KvConfig::default(), Duration::from_secs(1)).unwrap();
        let now = now_ms();
        kv.set("rla:a", with_deadline(now - 1, b"old"))
            .await
            .unwrap();
        kv.set("rla:b", with_deadline(now + 60_000, b"new"))
            .await
            .unwrap();
        assert_eq!(kv.get("rla:a").await.unwrap(), None);
        assert!(kv.get("rla:b").await.unwrap().is_some());
        assert_eq!(kv.keys().await.unwrap(), vec!["rla:b".to_owned()]);
        assert_eq!(deadline_of(b"short"), None);
        assert_eq!(deadline_of(&7u64.to_be_bytes()), None, "not a deadline");
    }

    #[test]
    fn uses_are_the_first_segment() {
        assert_eq!(use_of("nonce:3f"), "nonce");
        assert_eq!(use_of("rla:10.0.0.1"), "rla");
        assert_eq!(use_of("whatever"), "other");
    }

    /// Runs against the machine's Redis (`OUTPOST_TEST_REDIS_URL`, default
    /// `redis://127.0.0.1:6379`, which scripts/test starts): keys under a
    /// random prefix are written and removed.
    #[tokio::test]
    async fn redis_store_is_shared_between_hosts_and_prefixed() {
        let url = std::env::var("OUTPOST_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let prefix = format!("outpost-test:{:016x}:", fastrand::u64(..));
        let cfg = KvConfig::Redis {
            url: url.clone(),
            prefix: prefix.clone(),
        };
        let a = Kv::new(&cfg, Duration::from_secs(2)).unwrap();
        let b = Kv::new(&cfg, Duration::from_secs(2)).unwrap();
        let other = Kv::new(
            &KvConfig::Redis {
                url,
                prefix: format!("{prefix}other:"),
            },
            Duration::from_secs(2),
        )
        .unwrap();

        a.set("rl:c:x", b"\x00\x01".to_vec()).await.unwrap();
        assert_eq!(b.get("rl:c:x").await.unwrap(), Some(b"\x00\x01".to_vec()));
        assert!(b.exists("rl:c:x").await.unwrap());
        assert_eq!(other.get("rl:c:x").await.unwrap(), None);
        other.set("y", b"2".to_vec()).await.unwrap();
        // `other`'s keys sit under `a`'s prefix too; listing shows them
        // (as Spin would for overlapping prefixes), reading by name does not
        // confuse them.
        let mut keys = a.keys().await.unwrap();
        keys.sort();
        assert_eq!(keys, ["other:y", "rl:c:x"]);
        a.delete("rl:c:x").await.unwrap();
        other.delete("y").await.unwrap();
        assert_eq!(b.get("rl:c:x").await.unwrap(), None);
        assert!(a.keys().await.unwrap().is_empty());

        // A value's deadline becomes the key's expiry in Redis itself.
        let now = now_ms();
        a.set("rla:x", with_deadline(now + 30_000, b"v"))
            .await
            .unwrap();
        let Backend::Redis(r) = &a.backend else {
            unreachable!()
        };
        let pttl: i64 = r
            .query(redis::cmd("PTTL").arg(r.key("rla:x")))
            .await
            .unwrap();
        assert!((1..=30_000).contains(&pttl), "{pttl}");
        a.set("rla:x", with_deadline(now - 1, b"v")).await.unwrap();
        assert!(!a.exists("rla:x").await.unwrap(), "written already expired");
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_not_a_hang() {
        let cfg = KvConfig::Redis {
            url: "redis://127.0.0.1:1/0".into(),
            prefix: "p:".into(),
        };
        let kv = Kv::new(&cfg, Duration::from_millis(300)).unwrap();
        let started = std::time::Instant::now();
        assert!(kv.get("nonce:k").await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(kv.stats.errors.lock().unwrap().get("nonce"), Some(&1));
        assert!(
            Kv::new(
                &KvConfig::Redis {
                    url: "nope".into(),
                    prefix: String::new()
                },
                Duration::from_secs(1)
            )
            .is_err()
        );
    }

    #[test]
    fn prefixes_match_literally() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
