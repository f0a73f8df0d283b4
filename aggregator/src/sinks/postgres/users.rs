//! Distinct users per hour, kept as [`hll`] sketches in `user_sketches`
//! (migration 20261207000001): one per (client, dimension, hour, value),
//! the dimensions of `event_counts`.
//!
//! The sink adds the users of every write it committed to sketches held
//! in memory ([`Users::add`], microseconds, no database work), and a task
//! merges them into the table every [`FLUSH_EVERY`] ([`Users::flush`]):
//! one transaction that reads the stored sketches of the hours touched,
//! merges, and writes them back, under an advisory lock so that the
//! aggregators of a fleet take turns. A write made while more than
//! [`MAX_PENDING_BYTES`] wait flushes first, and fails (to be retried
//! like any sink outage) when that flush does: memory stays bounded
//! whatever the input.
//!
//! Adding a user twice changes no sketch, so a batch delivered again after
//! a crash is harmless, and what a crash loses (the last second's
//! additions) is rebuilt from the rows: at start-up the sketches of the
//! last [`REPAIR_MINUTES`] are rebuilt from `events` ([`rebuild`]), and
//! `outpost backfill-users` rebuilds any range (events stored before this
//! release have no sketches; `user_sketches_since` says from which hour the
//! sketches are complete, and earlier hours are counted from the rows).
//!
//! [`hll`]: super::hll

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::TryStreamExt as _;
use sqlx::PgPool;

use super::hll::Sketch;
use super::{Row, dimensions};

/// How often pending sketches are merged into the table.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Memory the pending sketches may hold before a write must flush them.
pub const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;
/// How far back the start-up repair rebuilds sketches from the rows.
pub const REPAIR_MINUTES: i64 = 10;
/// The advisory lock flushes take turns on (`hashtext('outpost.user_sketches')`
/// is not stable across versions; a constant is).
const LOCK_KEY: i64 = 0x6f75_7470_6f73_7475; // "outpostu"

const MS_PER_HOUR: i64 = 3_600_000;

/// (client, dimension, hour since the epoch, value).
type Key = (String, &'static str, i64, Option<String>);

/// A `user_sketches` row: the key's columns and the stored registers.
type StoredSketch = (String, String, i64, Option<String>, Vec<u8>);

/// Sketches waiting to be merged into the table.
#[derive(Default)]
struct Pending {
    sketches: HashMap<Key, Sketch>,
    bytes: usize,
}

impl Pending {
    fn merge(&mut self, key: Key, sketch: &Sketch) {
        self.update(key, |s| s.merge(sketch));
    }

    fn add_hash(&mut self, key: Key, hash: u64) {
        self.update(key, |s| s.add_hash(hash));
    }

    /// Changes the key's sketch (a new one if it has none), keeping
    /// [`Pending::bytes`] right.
    fn update(&mut self, key: Key, change: impl FnOnce(&mut Sketch)) {
        let key_bytes = key.0.len() + key.3.as_ref().map_or(0, String::len) + 64;
        let (s, before) = match self.sketches.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => {
                let s = o.into_mut();
                let before = s.heap_bytes();
                (s, before)
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                self.bytes += key_bytes;
                (v.insert(Sketch::default()), 0)
            }
        };
        change(s);
        self.bytes = self.bytes + s.heap_bytes() - before;
    }

    fn over_bound(&self) -> bool {
        self.bytes > MAX_PENDING_BYTES
    }
}

/// The sink's pending sketches and the pool they are flushed to.
pub struct Users {
    pool: PgPool,
    pending: Mutex<Pending>,
    /// One flush at a time in this process (the advisory lock orders
    /// processes).
    flushing: tokio::sync::Mutex<()>,
}

impl Users {
    /// Nothing pending yet.
    pub fn new(pool: PgPool) -> Users {
        Users {
            pool,
            pending: Mutex::new(Pending::default()),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    /// Adds the users of rows the database now holds. Returns whether the
    /// pending sketches are over [`MAX_PENDING_BYTES`] (the caller flushes).
    pub fn add(&self, rows: &[Row<'_>]) -> bool {
        // Sketch the write first with borrowed keys (a batch touches a few
        // dozen), then merge each into the pending ones once.
        // Bounded by rows × 8 keys, like the rollup counts: a fast hash.
        let mut local: HashMap<
            (&str, &'static str, i64, Option<&str>),
            Sketch,
            foldhash::fast::RandomState,
        > = HashMap::default();
        for r in rows {
            let Some(user) = r.event.user_id.as_deref() else {
                continue;
            };
            let hash = super::hll::hash(user);
            let hour = r.ts_ms().div_euclid(MS_PER_HOUR);
            for (dim, value) in dimensions(r) {
                local
                    .entry((r.client_id.as_str(), dim, hour, value))
                    .or_default()
                    .add_hash(hash);
            }
        }
        if local.is_empty() {
            return false;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for ((client, dim, hour, value), sketch) in local {
            pending.merge(
                (client.to_owned(), dim, hour, value.map(str::to_owned)),
                &sketch,
            );
        }
        pending.over_bound()
    }

    /// Merges what is pending into `user_sketches`. On failure it stays
    /// pending (merged with what arrived meanwhile) for the next flush.
    pub async fn flush(&self) -> Result<usize, sqlx::Error> {
        let _turn = self.flushing.lock().await;
        let taken = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *pending)
        };
        if taken.sketches.is_empty() {
            return Ok(0);
        }
        let n = taken.sketches.len();
        match store(&self.pool, taken.sketches.iter()).await {
            Ok(()) => Ok(n),
            Err(e) => {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                for (key, sketch) in taken.sketches {
                    pending.merge(key, &sketch);
                }
                Err(e)
            }
        }
    }

    /// Flushes every [`FLUSH_EVERY`] until `stop`. The last flush is the
    /// sink's to make after its workers have stopped ([`Users::flush`]).
    pub async fn run(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut failing = false;
        while !*stop.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
                _ = stop.changed() => break,
            }
            match self.flush().await {
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "user sketches not stored; kept and retried");
                }
                Err(_) => {}
            }
        }
    }
}

/// Merges `sketches` into the stored ones, in one transaction.
async fn store<'a>(
    pool: &PgPool,
    sketches: impl Iterator<Item = (&'a Key, &'a Sketch)>,
) -> Result<(), sqlx::Error> {
    let mut merged: HashMap<&Key, Sketch> = sketches.map(|(k, s)| (k, s.clone())).collect();
    let (mut client, mut dim, mut hour, mut value) = (vec![], vec![], vec![], vec![]);
    for (c, d, h, v) in merged.keys() {
        client.push(c.as_str());
        dim.push(*d);
        hour.push(*h);
        value.push(v.as_deref());
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let stored: Vec<StoredSketch> = sqlx::query_as(
        "SELECT s.client_id, s.dim, s.hour, s.value, s.registers FROM user_sketches s \
         JOIN UNNEST($1::text[], $2::text[], $3::int8[], $4::text[]) AS x(c, d, h, v) \
           ON s.client_id = x.c AND s.dim = x.d AND s.hour = x.h AND s.value IS NOT DISTINCT FROM x.v",
    )
    .bind(&client)
    .bind(&dim)
    .bind(&hour)
    .bind(&value)
    .fetch_all(&mut *tx)
    .await?;
    for (c, d, h, v, bytes) in stored {
        let Some(d) = super::DIMENSIONS.iter().find(|x| **x == d).copied() else {
            continue;
        };
        let key: Key = (c, d, h, v);
        let Some(s) = merged.get_mut(&key) else {
            continue;
        };
        match Sketch::decode(&bytes) {
            Ok(old) => s.merge(&old),
            // Not ours (written by hand?): replaced by what is known now;
            // `outpost backfill-users` rebuilds the hour from the rows.
            Err(e) => tracing::warn!(client = key.0, dim = d, hour = h, error = %e,
                "stored user sketch unreadable; replaced"),
        }
    }
    let (mut client, mut dim, mut hour, mut value, mut registers) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut rows: Vec<_> = merged.into_iter().collect();
    // One lock order for every writer.
    rows.sort_by(|a, b| a.0.cmp(b.0));
    for ((c, d, h, v), s) in &rows {
        client.push(c.as_str());
        dim.push(*d);
        hour.push(*h);
        value.push(v.as_deref());
        registers.push(s.encode());
    }
    sqlx::query(
        "INSERT INTO user_sketches (client_id, dim, hour, value, registers) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::bytea[]) \
         ON CONFLICT ON CONSTRAINT user_sketches_key DO UPDATE SET registers = EXCLUDED.registers",
    )
    .bind(&client)
    .bind(&dim)
    .bind(&hour)
    .bind(&value)
    .bind(&registers)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The first hour from which the sketches hold every stored event's user
/// (`user_sketches_since`); `None` when the table says nothing.
pub async fn complete_since(pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT hour FROM user_sketches_since")
        .fetch_optional(pool)
        .await
}

/// What [`rebuild`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Events with a user id read.
    pub events: u64,
    /// Sketches merged into the table.
    pub sketches: u64,
}

/// Rebuilds the sketches of events with `from_ms <= ts < to_ms` from the
/// rows, merging into what is stored (nothing is lost, nothing counted
/// twice). Memory is bounded as the sink's is: it flushes whenever what it
/// has sketched is over [`MAX_PENDING_BYTES`].
pub async fn rebuild(pool: &PgPool, from_ms: i64, to_ms: i64) -> Result<Rebuilt, sqlx::Error> {
    let mut done = Rebuilt::default();
    let mut rows = sqlx::query_as::<_, RebuildRow>(
        "SELECT client_id, (extract(epoch from ts) * 1000)::int8 AS ts_ms, kind, name, country, \
                platform, app_version, level, priority, user_id \
         FROM events WHERE ts >= to_timestamp($1 / 1000.0) AND ts < to_timestamp($2 / 1000.0) \
           AND user_id IS NOT NULL",
    )
    .bind(from_ms)
    .bind(to_ms)
    .fetch(pool);
    let mut local = Pending::default();
    while let Some(r) = rows.try_next().await? {
        let hash = super::hll::hash(&r.user_id);
        let hour = r.ts_ms.div_euclid(MS_PER_HOUR);
        // The values in the order of the sink's one list of dimensions.
        let values = [
            None,
            Some(&r.kind),
            r.name.as_ref(),
            r.country.as_ref(),
            r.platform.as_ref(),
            r.app_version.as_ref(),
            r.level.as_ref(),
            Some(&r.priority),
        ];
        let dims = super::DIMENSIONS.into_iter().zip(values);
        for (dim, value) in dims {
            local.add_hash((r.client_id.clone(), dim, hour, value.cloned()), hash);
        }
        done.events += 1;
        if local.over_bound() {
            done.sketches += local.sketches.len() as u64;
            store(pool, local.sketches.iter()).await?;
            local = Pending::default();
        }
    }
    drop(rows);
    if !local.sketches.is_empty() {
        done.sketches += local.sketches.len() as u64;
        store(pool, local.sketches.iter()).await?;
    }
    Ok(done)
}

/// Rebuilds from `from_ms` up to now (the whole hour now is in) and, when
/// that reaches back past `user_sketches_since`, moves it back to
/// `from_ms`'s hour: `outpost backfill-users`.
pub async fn backfill(pool: &PgPool, from_ms: i64, now_ms: i64) -> Result<Rebuilt, sqlx::Error> {
    let from_ms = from_ms.div_euclid(MS_PER_HOUR) * MS_PER_HOUR;
    let to_ms = (now_ms.div_euclid(MS_PER_HOUR) + 2) * MS_PER_HOUR;
    let done = rebuild(pool, from_ms, to_ms).await?;
    sqlx::query(
        "INSERT INTO user_sketches_since (hour) VALUES ($1) \
         ON CONFLICT (only_row) DO UPDATE SET hour = least(user_sketches_since.hour, EXCLUDED.hour)",
    )
    .bind(from_ms / MS_PER_HOUR)
    .execute(pool)
    .await?;
    Ok(done)
}

#[derive(sqlx::FromRow)]
struct RebuildRow {
    client_id: String,
    ts_ms: i64,
    kind: String,
    name: Option<String>,
    country: Option<String>,
    platform: Option<String>,
    app_version: Option<String>,
    level: Option<String>,
    priority: String,
    user_id: String,
}

/// Distinct users per (bucket start in ms, group key), for a stats query
/// the sketches can answer: `dim` and `value` as in `event_counts`,
/// `by_client` to group by client instead of by value, hours
/// `from_hour..to_hour`, buckets of `bucket_hours`. Reads the sketches in
/// bucket and group order, so one merged sketch is in memory at a time.
pub async fn users_per_bucket(
    pool: &PgPool,
    q: &UsersQuery<'_>,
) -> Result<HashMap<(i64, Option<String>), i64>, sqlx::Error> {
    let key = match (q.by_client, q.by_value) {
        (true, _) => "client_id",
        (false, true) => "value",
        (false, false) => "NULL::text",
    };
    // `key` and `n` come from fixed values, never from input.
    let n = q.bucket_hours;
    let mut sql = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "SELECT (hour / {n}) * {n} * {MS_PER_HOUR} AS b, {key} AS k, registers \
         FROM user_sketches WHERE dim = "
    ));
    sql.push_bind(q.dim);
    if let Some(v) = q.value {
        sql.push(" AND value = ").push_bind(v);
    }
    if let Some(c) = q.client {
        sql.push(" AND client_id = ").push_bind(c);
    }
    if let Some(f) = q.from_hour {
        sql.push(" AND hour >= ").push_bind(f);
    }
    if let Some(t) = q.to_hour {
        sql.push(" AND hour < ").push_bind(t);
    }
    sql.push(" ORDER BY 1, 2");
    let mut rows = sql
        .build_query_as::<(i64, Option<String>, Vec<u8>)>()
        .fetch(pool);
    let mut out = HashMap::new();
    let mut current: Option<((i64, Option<String>), Sketch)> = None;
    while let Some((b, k, bytes)) = rows.try_next().await? {
        let sketch = match Sketch::decode(&bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "stored user sketch unreadable; skipped");
                continue;
            }
        };
        match &mut current {
            Some((group, s)) if group.0 == b && group.1 == k => s.merge(&sketch),
            _ => {
                if let Some((group, s)) = current.replace(((b, k), sketch)) {
                    out.insert(group, s.users());
                }
                if out.len() > q.max_points {
                    break;
                }
            }
        }
    }
    if let Some((group, s)) = current {
        out.insert(group, s.users());
    }
    Ok(out)
}

/// What [`users_per_bucket`] is asked.
pub struct UsersQuery<'a> {
    /// `event_counts.dim` ('' for all of a client's events).
    pub dim: &'a str,
    /// Only this value of `dim`.
    pub value: Option<&'a str>,
    /// Only this client.
    pub client: Option<&'a str>,
    /// Group by client.
    pub by_client: bool,
    /// Group by the value of `dim`.
    pub by_value: bool,
    /// First hour (since the epoch), inclusive.
    pub from_hour: Option<i64>,
    /// Last hour, exclusive.
    pub to_hour: Option<i64>,
    /// Hours per bucket (1 or 24).
    pub bucket_hours: i64,
    /// Stop past this many points (the caller refuses the answer).
    pub max_points: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::sample::typical_batch;

    /// A pool on a port where nothing listens (never connected until used).
    fn unreachable_pool() -> PgPool {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(300))
            .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/none"))
            .unwrap()
    }

    fn add_batch(users: &Users, client: &str, user_ids: impl Fn(usize) -> Option<String>) -> bool {
        let mut batch = typical_batch(100);
        for (i, e) in batch.events.iter_mut().enumerate() {
            e.user_id = user_ids(i);
        }
        batch.client_id = client.into();
        users.add(&Row::of_batch(&batch, None))
    }

    fn pending(users: &Users) -> (usize, usize) {
        let p = users.pending.lock().unwrap();
        (p.sketches.len(), p.bytes)
    }

    #[tokio::test]
    async fn events_without_a_user_add_nothing_and_a_batch_twice_adds_no_memory() {
        let users = Users::new(unreachable_pool());
        assert!(!add_batch(&users, "acme-web", |_| None));
        assert_eq!(pending(&users), (0, 0));
        assert!(!add_batch(&users, "acme-web", |i| Some(format!("u{i}"))));
        let once = pending(&users);
        assert!(once.0 >= 8, "one sketch per dimension at least: {once:?}");
        assert!(!add_batch(&users, "acme-web", |i| Some(format!("u{i}"))));
        assert_eq!(pending(&users), once, "the same users again");
    }

    #[tokio::test]
    async fn pending_memory_is_bounded_by_asking_for_a_flush_which_keeps_everything_when_it_fails()
    {
        let users = Users::new(unreachable_pool());
        // Hostile input: every batch a new client id, so new sketches
        // (clients are authenticated, but names and versions are free).
        let mut asked_at = None;
        for b in 0..100_000usize {
            if add_batch(&users, &format!("c{b}"), |i| Some(format!("u{b}-{i}"))) {
                asked_at = Some(b);
                break;
            }
        }
        let (sketches, bytes) = pending(&users);
        assert!(
            asked_at.is_some(),
            "never asked to flush: {sketches} sketches, {bytes} B"
        );
        assert!(
            bytes > MAX_PENDING_BYTES && bytes < MAX_PENDING_BYTES + 1024 * 1024,
            "asked as soon as over the bound: {bytes} B"
        );
        // The database is away: the flush fails and nothing is dropped.
        let before = users.pending.lock().unwrap().sketches.clone();
        assert!(users.flush().await.is_err());
        let after = pending(&users);
        assert_eq!(after.0, sketches);
        assert!(after.1 <= bytes, "{} B after, {bytes} B before", after.1);
        assert!(users.pending.lock().unwrap().sketches == before);
    }

    #[test]
    fn pending_bytes_count_every_key_and_sketch_as_they_grow() {
        // What `rebuild` (and the sink's merges) bound memory by: the count
        // must follow sketches that grow, switch to dense, and new keys.
        let mut p = Pending::default();
        let hash = super::super::hll::hash;
        for i in 0..20_000u64 {
            // Three sketches that go dense, and fifty that stay sparse.
            let value = Some(format!("v{}", i % 3));
            p.add_hash(("acme".into(), "name", 0, value), hash(&i.to_string()));
            if i < 500 {
                let value = Some(format!("small{}", i % 50));
                p.add_hash(("acme".into(), "name", 1, value), hash(&i.to_string()));
            }
        }
        assert_eq!(p.sketches.len(), 53);
        let counted: usize = p
            .sketches
            .iter()
            .map(|(k, s)| k.0.len() + k.3.as_ref().map_or(0, String::len) + 64 + s.heap_bytes())
            .sum();
        assert_eq!(p.bytes, counted);
        let dense = p.sketches.values().filter(|s| s.heap_bytes() == 16_384);
        assert_eq!(dense.count(), 3, "the big three went dense");
        assert!(!p.over_bound());
    }
}
