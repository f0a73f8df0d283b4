//! Duplicate detection: one claim per event id per client, remembered for a
//! window (default 24 h).
//!
//! A claim is `SET <prefix>{<client>}:<event id> <batch id> NX GET EX <window>`,
//! pipelined for a whole batch in one round trip. The value is the batch id,
//! so a batch delivered twice (a crash between a sink's write and its
//! cursor update, or two sinks claiming for the same batch) sees its own
//! claims and is not mistaken for a duplicate. The `{client}` hash tag keeps
//! one batch's keys in one Redis Cluster slot.
//!
//! Redis unreachable or slow: the claim fails open (every event passes,
//! `outpost_dedup_errors_total` counts it); the PostgreSQL unique key on
//! (client, event id) still holds. Needs Redis ≥ 7.0 (`SET … NX GET`).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use outpost_shared::frame::BatchId;
use outpost_shared::id::{ClientId, EventId};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

use crate::config::{DedupBackend, DedupConfig};
use crate::telemetry::Metrics;

/// Longest a claim may take before it fails open.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// The configured duplicate detector.
pub enum Dedup {
    /// Redis or Redis Cluster.
    Redis(Box<RedisDedup>, DedupSettings),
    /// This process only.
    Memory(MemoryDedup, DedupSettings),
    /// None.
    Off,
}

/// Where Redis is.
enum RedisTarget {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

#[derive(Clone)]
enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A Redis connection made on first use, so that an aggregator starts (and
/// fails open) while Redis is down, and connects once it is back.
pub struct RedisDedup {
    target: RedisTarget,
    conn: tokio::sync::Mutex<(Option<RedisConn>, Option<Instant>)>,
}

/// Why Redis could not answer a claim or a release (dedup then fails open).
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// No connection, and the last attempt was less than a second ago.
    #[error("not connected")]
    NotConnected,
    /// Redis did not answer within the claim timeout.
    #[error("timed out")]
    TimedOut,
    /// Redis answered with an error, or the connection failed.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// How often to try connecting while Redis is down.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

impl RedisDedup {
    async fn connection(&self) -> Result<RedisConn, ClaimError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = &guard.0 {
            return Ok(c.clone());
        }
        if guard.1.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
            return Err(ClaimError::NotConnected);
        }
        guard.1 = Some(Instant::now());
        let conn = tokio::time::timeout(CLAIM_TIMEOUT, async {
            match &self.target {
                RedisTarget::Single(client) => {
                    // The manager reconnects by itself after this first connection.
                    let cfg = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(CLAIM_TIMEOUT))
                        .set_response_timeout(Some(CLAIM_TIMEOUT));
                    ConnectionManager::new_with_config(client.clone(), cfg)
                        .await
                        .map(RedisConn::Single)
                }
                RedisTarget::Cluster(client) => {
                    client.get_async_connection().await.map(RedisConn::Cluster)
                }
            }
        })
        .await
        .map_err(|_| ClaimError::TimedOut)??;
        guard.0 = Some(conn.clone());
        Ok(conn)
    }
}

/// What every backend needs besides its connection.
#[derive(Debug, Clone)]
pub struct DedupSettings {
    key_prefix: String,
    window_secs: u64,
}

/// In-process claims, bounded in number: past the bound the least
/// recently claimed id is forgotten (O(1), no scan), so the window is
/// shorter under a flood of ids but the newest ids are always remembered.
pub struct MemoryDedup {
    claims: Mutex<LruCache<String, ([u8; 16], i64)>>,
}

impl MemoryDedup {
    /// A store of at most `max_entries` claims.
    pub fn new(max_entries: usize) -> MemoryDedup {
        MemoryDedup {
            claims: Mutex::new(LruCache::new(
                NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, ([u8; 16], i64)>> {
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Dedup {
    /// Connects the configured backend.
    pub async fn connect(config: &DedupConfig) -> anyhow::Result<Dedup> {
        let settings = DedupSettings {
            key_prefix: config.key_prefix.clone(),
            window_secs: config.window_secs,
        };
        Ok(match config.backend {
            DedupBackend::Off => Dedup::Off,
            DedupBackend::Memory => {
                Dedup::Memory(MemoryDedup::new(config.memory_max_entries), settings)
            }
            DedupBackend::Redis => {
                let target = if config.redis_urls.len() > 1 {
                    let client = redis::cluster::ClusterClient::new(config.redis_urls.clone())?;
                    RedisTarget::Cluster(Box::new(client))
                } else {
                    let url = config
                        .redis_urls
                        .first()
                        .map(String::as_str)
                        .unwrap_or_default();
                    RedisTarget::Single(redis::Client::open(url)?)
                };
                let dedup = RedisDedup {
                    target,
                    conn: tokio::sync::Mutex::new((None, None)),
                };
                if let Err(e) = dedup.connection().await {
                    tracing::warn!(error = %e, "redis unreachable at start-up: dedup fails open until it is back");
                }
                Dedup::Redis(Box::new(dedup), settings)
            }
        })
    }

    /// Claims every event id for `batch`; `true` where the event should be
    /// delivered (new, or already claimed by this same batch).
    pub async fn claim(
        &self,
        client_id: &ClientId,
        event_ids: &[&EventId],
        batch: &BatchId,
        now_ms: i64,
        metrics: &Metrics,
    ) -> Vec<bool> {
        let client_id = client_id.as_str();
        let result = match self {
            Dedup::Off => return vec![true; event_ids.len()],
            Dedup::Memory(m, s) => Ok(m.claim(s, client_id, event_ids, batch, now_ms)),
            Dedup::Redis(r, s) => match r.connection().await {
                Ok(RedisConn::Single(mut c)) => {
                    redis_claim(&mut c, s, client_id, event_ids, batch).await
                }
                Ok(RedisConn::Cluster(mut c)) => {
                    redis_claim(&mut c, s, client_id, event_ids, batch).await
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(keep) => {
                metrics
                    .dedup_duplicates
                    .inc_by(keep.iter().filter(|k| !**k).count() as u64);
                keep
            }
            Err(e) => {
                metrics.dedup_errors.inc();
                tracing::warn!(error = %e, client_id, events = event_ids.len(), "dedup unavailable: failing open");
                vec![true; event_ids.len()]
            }
        }
    }

    /// Gives up the claims `batch` holds on `event_ids` (rows a sink could
    /// not store): a claim still holding this batch's id is deleted, so a
    /// corrected re-send with the same event id is not taken for a
    /// duplicate; one that another batch holds is left alone. Best effort:
    /// Redis down leaves the claims to expire with the window.
    pub async fn release(&self, client_id: &ClientId, event_ids: &[&EventId], batch: &BatchId) {
        let client_id = client_id.as_str();
        if event_ids.is_empty() {
            return;
        }
        let result = match self {
            Dedup::Off => Ok(()),
            Dedup::Memory(m, s) => {
                m.release(s, client_id, event_ids, batch);
                Ok(())
            }
            Dedup::Redis(r, s) => match r.connection().await {
                Ok(RedisConn::Single(mut c)) => {
                    redis_release(&mut c, s, client_id, event_ids, batch).await
                }
                Ok(RedisConn::Cluster(mut c)) => {
                    redis_release(&mut c, s, client_id, event_ids, batch).await
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, client_id, events = event_ids.len(), "could not release dedup claims; they expire with the window");
        }
    }

    /// For readiness: `None` when there is nothing to check.
    pub async fn ping(&self) -> Option<bool> {
        let Dedup::Redis(r, _) = self else {
            return None;
        };
        let ping = |r: redis::RedisResult<String>| r.is_ok();
        Some(match r.connection().await {
            Ok(RedisConn::Single(mut c)) => ping(redis::cmd("PING").query_async(&mut c).await),
            Ok(RedisConn::Cluster(mut c)) => ping(redis::cmd("PING").query_async(&mut c).await),
            Err(_) => false,
        })
    }
}

fn claim_key(s: &DedupSettings, client_id: &str, event_id: &str) -> String {
    format!("{}{{{client_id}}}:{event_id}", s.key_prefix)
}

async fn redis_claim<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    s: &DedupSettings,
    client_id: &str,
    event_ids: &[impl AsRef<str>],
    batch: &BatchId,
) -> Result<Vec<bool>, ClaimError> {
    if event_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mine = batch.to_string();
    let mut pipe = redis::pipe();
    for id in event_ids {
        pipe.cmd("SET")
            .arg(claim_key(s, client_id, id.as_ref()))
            .arg(&mine)
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(s.window_secs);
    }
    let previous: Vec<Option<String>> = tokio::time::timeout(CLAIM_TIMEOUT, pipe.query_async(conn))
        .await
        .map_err(|_| ClaimError::TimedOut)??;
    Ok(previous
        .into_iter()
        .map(|p| p.is_none_or(|v| v == mine))
        .collect())
}

/// Deletes a key only while it holds the given batch id (one round trip
/// per key, pipelined): `GET` and `DEL` in one script so that another
/// batch's claim made in between is never deleted.
const RELEASE_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

async fn redis_release<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    s: &DedupSettings,
    client_id: &str,
    event_ids: &[impl AsRef<str>],
    batch: &BatchId,
) -> Result<(), ClaimError> {
    let mine = batch.to_string();
    let mut pipe = redis::pipe();
    for id in event_ids {
        pipe.cmd("EVAL")
            .arg(RELEASE_SCRIPT)
            .arg(1)
            .arg(claim_key(s, client_id, id.as_ref()))
            .arg(&mine)
            .ignore();
    }
    tokio::time::timeout(CLAIM_TIMEOUT, pipe.query_async::<()>(conn))
        .await
        .map_err(|_| ClaimError::TimedOut)?
        .map_err(ClaimError::from)
}

impl MemoryDedup {
    fn release(
        &self,
        s: &DedupSettings,
        client_id: &str,
        event_ids: &[impl AsRef<str>],
        batch: &BatchId,
    ) {
        let mut claims = self.lock();
        for id in event_ids {
            let key = claim_key(s, client_id, id.as_ref());
            if claims
                .peek(&key)
                .is_some_and(|(owner, _)| owner == &batch.0)
            {
                claims.pop(&key);
            }
        }
    }

    fn claim(
        &self,
        s: &DedupSettings,
        client_id: &str,
        event_ids: &[impl AsRef<str>],
        batch: &BatchId,
        now_ms: i64,
    ) -> Vec<bool> {
        let expires = now_ms
            .saturating_add(i64::try_from(s.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX));
        let mut claims = self.lock();
        event_ids
            .iter()
            .map(|id| {
                let key = claim_key(s, client_id, id.as_ref());
                match claims.get(&key) {
                    Some((owner, exp)) if *exp > now_ms => owner == &batch.0,
                    _ => {
                        // Full: the least recently claimed id makes room.
                        claims.put(key, (batch.0, expires));
                        true
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(max: usize) -> (MemoryDedup, DedupSettings) {
        (
            MemoryDedup::new(max),
            DedupSettings {
                key_prefix: "t:".into(),
                window_secs: 10,
            },
        )
    }

    #[test]
    fn a_second_batch_with_the_same_event_id_is_a_duplicate_but_a_replay_is_not() {
        let (m, s) = memory(100);
        let (b1, b2) = (BatchId([1; 16]), BatchId([2; 16]));
        assert_eq!(m.claim(&s, "c", &["e1", "e2"], &b1, 0), [true, true]);
        assert_eq!(
            m.claim(&s, "c", &["e1", "e2"], &b1, 1),
            [true, true],
            "replay of the same batch"
        );
        assert_eq!(m.claim(&s, "c", &["e2", "e3"], &b2, 2), [false, true]);
        assert_eq!(
            m.claim(&s, "other", &["e2"], &b2, 3),
            [true],
            "ids are per client"
        );
        assert_eq!(
            m.claim(&s, "c", &["e2"], &b2, 10_001),
            [true],
            "after the window"
        );
    }

    #[test]
    fn a_full_memory_dedup_forgets_the_oldest_claim_and_keeps_the_newest() {
        let (m, s) = memory(2);
        let (b1, b2) = (BatchId([1; 16]), BatchId([2; 16]));
        assert_eq!(
            m.claim(&s, "c", &["a", "b", "c"], &b1, 0),
            [true, true, true]
        );
        assert_eq!(m.lock().len(), 2);
        // The newest ids are still claimed; the oldest was forgotten.
        assert_eq!(m.claim(&s, "c", &["c"], &b2, 1), [false]);
        assert_eq!(m.claim(&s, "c", &["a"], &b2, 2), [true]);
    }

    #[test]
    fn claims_a_batch_gives_up_are_released_but_not_another_batchs() {
        let (m, s) = memory(100);
        let (b1, b2) = (BatchId([1; 16]), BatchId([2; 16]));
        assert_eq!(m.claim(&s, "c", &["a", "b"], &b1, 0), [true, true]);
        assert_eq!(m.claim(&s, "c", &["x"], &b2, 0), [true]);
        m.release(&s, "c", &["a", "x"], &b1);
        assert_eq!(m.claim(&s, "c", &["a"], &b2, 1), [true], "released");
        assert_eq!(m.claim(&s, "c", &["b"], &b2, 1), [false], "kept");
        assert_eq!(m.claim(&s, "c", &["x"], &b1, 1), [false], "b2's, not b1's");
    }

    #[test]
    fn a_full_store_keeps_remembering_new_ids() {
        let (m, s) = memory(200_000);
        let (b1, b2) = (BatchId([1; 16]), BatchId([2; 16]));
        let ids: Vec<String> = (0..200_000).map(|i| format!("id-{i}")).collect();
        for chunk in ids.chunks(1000) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            m.claim(&s, "c", &refs, &b1, 0);
        }
        assert_eq!(m.lock().len(), 200_000);
        let more: Vec<String> = (0..20_000).map(|i| format!("new-{i}")).collect();
        let refs: Vec<&str> = more.iter().map(String::as_str).collect();
        assert!(m.claim(&s, "c", &refs, &b1, 1).iter().all(|k| *k));
        assert_eq!(m.lock().len(), 200_000);
        // Sent again by another batch: duplicates, every one.
        assert!(m.claim(&s, "c", &refs, &b2, 2).iter().all(|k| !*k));
    }

    #[test]
    fn keys_keep_one_client_in_one_cluster_slot() {
        let s = DedupSettings {
            key_prefix: "outpost:dedup:".into(),
            window_secs: 1,
        };
        assert_eq!(claim_key(&s, "acme", "e1"), "outpost:dedup:{acme}:e1");
    }
}
