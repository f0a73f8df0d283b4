//! The backends of Spin's `default` key-value store.
//!
//! The edge keeps rate-limit windows, seen nonces and cached client records
//! here, each value carrying its own expiry (Spin's store has none). A
//! backend only stores bytes; errors are plain strings because the guest
//! only sees them as `error::other` and treats every one as an outage
//! (rules that need state fail open), so their text is for logs.
//!
//! The in-memory map is bounded by a key count: expired entries are only
//! removed when the guest reads them, and a caller rotating source
//! addresses would otherwise grow it without end. Redis bounds itself
//! (`maxmemory`) and is shared by every host pointed at it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::config::KvConfig;

/// Most keys the in-memory store holds; `set` of a new key past it fails
/// (the guest then fails open, as on any store outage).
pub const MEMORY_MAX_KEYS: usize = 200_000;

/// One host's `default` store.
pub(crate) enum Kv {
    Memory(Arc<Mutex<HashMap<String, Vec<u8>>>>),
    // Boxed: one per host, and it keeps the common in-memory case small.
    Redis(Box<RedisKv>),
}

impl Kv {
    /// Builds the backend; Redis connects on first use, so a host starts
    /// (and answers, failing open) while Redis is down.
    pub(crate) fn new(cfg: &KvConfig, op_timeout: Duration) -> anyhow::Result<Kv> {
        Ok(match cfg {
            KvConfig::Memory => Kv::Memory(Arc::default()),
            KvConfig::Redis { url, prefix } => Kv::Redis(Box::new(RedisKv {
                client: redis::Client::open(url.as_str())
                    .map_err(|e| anyhow::anyhow!("kv redis url {url:?}: {e}"))?,
                prefix: prefix.clone(),
                op_timeout,
                conn: tokio::sync::OnceCell::new(),
            })),
        })
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        match self {
            Kv::Memory(m) => Ok(lock(m).get(key).cloned()),
            Kv::Redis(r) => r.query(redis::cmd("GET").arg(r.key(key))).await,
        }
    }

    pub(crate) async fn set(&self, key: &str, value: Vec<u8>) -> Result<(), String> {
        match self {
            Kv::Memory(m) => {
                let mut map = lock(m);
                if map.len() >= MEMORY_MAX_KEYS && !map.contains_key(key) {
                    return Err(format!("in-memory store is full ({MEMORY_MAX_KEYS} keys)"));
                }
                map.insert(key.to_owned(), value);
                Ok(())
            }
            Kv::Redis(r) => r.query(redis::cmd("SET").arg(r.key(key)).arg(value)).await,
        }
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), String> {
        match self {
            Kv::Memory(m) => {
                lock(m).remove(key);
                Ok(())
            }
            Kv::Redis(r) => r
                .query::<i64>(redis::cmd("DEL").arg(r.key(key)))
                .await
                .map(drop),
        }
    }

    pub(crate) async fn exists(&self, key: &str) -> Result<bool, String> {
        match self {
            Kv::Memory(m) => Ok(lock(m).contains_key(key)),
            Kv::Redis(r) => r.query(redis::cmd("EXISTS").arg(r.key(key))).await,
        }
    }

    pub(crate) async fn keys(&self) -> Result<Vec<String>, String> {
        match self {
            Kv::Memory(m) => Ok(lock(m).keys().cloned().collect()),
            Kv::Redis(r) => r.keys().await,
        }
    }
}

/// A poisoned lock only means another request panicked mid-update of a
/// plain map; its contents are still a valid map, so keep serving.
fn lock(m: &Mutex<HashMap<String, Vec<u8>>>) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, String> {
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
            .map_err(|e| format!("redis: {e}"))?;
        Ok(conn.clone())
    }

    async fn query<V: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<V, String> {
        let mut conn = self.connection().await?;
        match tokio::time::timeout(self.op_timeout, cmd.query_async(&mut conn)).await {
            Ok(r) => r.map_err(|e| format!("redis: {e}")),
            Err(_) => Err("redis: timed out".into()),
        }
    }

    async fn keys(&self) -> Result<Vec<String>, String> {
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

    #[tokio::test]
    async fn memory_store_round_trips_and_is_bounded() {
        let kv = Kv::new(&KvConfig::Memory, Duration::from_secs(1)).unwrap();
        assert_eq!(kv.get("a").await, Ok(None));
        kv.set("a", b"1".to_vec()).await.unwrap();
        assert_eq!(kv.get("a").await, Ok(Some(b"1".to_vec())));
        assert_eq!(kv.exists("a").await, Ok(true));
        assert_eq!(kv.keys().await, Ok(vec!["a".to_owned()]));
        kv.delete("a").await.unwrap();
        kv.delete("a").await.unwrap();
        assert_eq!(kv.exists("a").await, Ok(false));

        let Kv::Memory(map) = &kv else { unreachable!() };
        lock(map).extend((0..MEMORY_MAX_KEYS).map(|i| (i.to_string(), Vec::new())));
        assert!(kv.set("new", Vec::new()).await.is_err());
        // Overwriting a key that exists never needs room.
        kv.set("7", b"x".to_vec()).await.unwrap();
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
        assert_eq!(b.get("rl:c:x").await, Ok(Some(b"\x00\x01".to_vec())));
        assert_eq!(b.exists("rl:c:x").await, Ok(true));
        assert_eq!(other.get("rl:c:x").await, Ok(None));
        other.set("y", b"2".to_vec()).await.unwrap();
        // `other`'s keys sit under `a`'s prefix too; listing shows them
        // (as Spin would for overlapping prefixes), reading by name does not
        // confuse them.
        let mut keys = a.keys().await.unwrap();
        keys.sort();
        assert_eq!(keys, ["other:y", "rl:c:x"]);
        a.delete("rl:c:x").await.unwrap();
        other.delete("y").await.unwrap();
        assert_eq!(b.get("rl:c:x").await, Ok(None));
        assert_eq!(a.keys().await, Ok(Vec::new()));
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_not_a_hang() {
        let cfg = KvConfig::Redis {
            url: "redis://127.0.0.1:1/0".into(),
            prefix: "p:".into(),
        };
        let kv = Kv::new(&cfg, Duration::from_millis(300)).unwrap();
        let started = std::time::Instant::now();
        assert!(kv.get("k").await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
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
