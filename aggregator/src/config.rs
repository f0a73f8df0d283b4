//! Typed configuration: a TOML file, then `OUTPOST_<SECTION>_<KEY>`
//! environment overrides, then defaults — all in this one place. Every
//! field's doc comment is its reference entry (README, "Configuration").
//!
//! Environment names: the section, then the key, upper-cased
//! (`OUTPOST_POSTGRES_URL`, `OUTPOST_SPOOL_MAX_BYTES`). Edge keys, which are
//! a list, are `OUTPOST_EDGE_KEYS="id=base64url-secret,id2=…"`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use outpost_shared::client::Secret;
use outpost_shared::frame::{EdgeKey, FrameLimits, KeyRing};
use outpost_shared::validate::Limits;

pub use crate::geoip::GeoIpConfig;
pub use crate::sinks::influxdb::{InfluxConfig, WriteApi};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP server.
    pub server: ServerConfig,
    /// Keys the edges sign frames with (several at once, for rotation).
    pub edge_keys: Vec<EdgeKey>,
    /// The durable spool between ingest and the sinks.
    pub spool: SpoolConfig,
    /// Retries and dead letters, shared by all sinks.
    pub delivery: DeliveryConfig,
    /// Duplicate detection.
    pub dedup: DedupConfig,
    /// The PostgreSQL sink.
    pub postgres: PostgresConfig,
    /// The embedded SQLite store, in place of PostgreSQL (`outpost dev`).
    pub sqlite: SqliteConfig,
    /// The InfluxDB sink.
    pub influxdb: InfluxConfig,
    /// GeoIP enrichment.
    pub geoip: GeoIpConfig,
    /// Event validation limits; keep them equal to the edge's.
    pub limits: Limits,
    /// Logging.
    pub log: LogConfig,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Bounds on incoming frames (`max_frame_bytes`, `max_body_bytes`, `max_events`).
    pub frame: FrameLimits,
    /// `Retry-After` sent with `503` when the spool is full, in seconds.
    pub retry_after_secs: u32,
    /// Longest a request may take before it is answered `503`, in milliseconds.
    pub request_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            frame: FrameLimits::default(),
            retry_after_secs: 5,
            request_timeout_ms: 10_000,
        }
    }
}

/// `[spool]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// SQLite file holding acknowledged batches until every sink has them.
    pub path: PathBuf,
    /// Size bound: above it, ingest answers `503` + `Retry-After`.
    pub max_bytes: u64,
    /// Most frames committed (one fsync) together.
    pub max_frames_per_commit: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: PathBuf::from("data/spool.db"),
            max_bytes: 1 << 30,
            max_frames_per_commit: 256,
        }
    }
}

/// `[delivery]`. A sink that is down is retried for ever with backoff
/// (nothing is dropped because a database was away); rows a sink refuses
/// for their content go to dead letters at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// First retry delay, in milliseconds; doubles each try, with jitter.
    pub backoff_initial_ms: u64,
    /// Longest retry delay, in milliseconds.
    pub backoff_max_ms: u64,
    /// Most spooled batches a sink takes in one write.
    pub max_batches_per_write: u32,
    /// Bytes (estimated) of batches ingest decoded that are kept in memory
    /// until every sink has them; beyond it sinks decode from the spool.
    /// Filled only while the sinks lag behind ingest; at 1 KiB or so per
    /// typical event, the default holds a burst of about 120,000 events.
    pub handoff_max_bytes: u64,
    /// Concurrent writers per sink (each takes its own share of the backlog).
    pub workers_per_sink: u32,
    /// Tries of a write that a reachable sink refuses as a whole before it
    /// is narrowed down row by row (the failing rows go to dead letters);
    /// 0: retry for ever. A sink that is down is always retried for ever.
    pub max_attempts: u32,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            backoff_initial_ms: 200,
            backoff_max_ms: 30_000,
            max_batches_per_write: 32,
            handoff_max_bytes: 128 * 1024 * 1024,
            workers_per_sink: 2,
            max_attempts: 10,
        }
    }
}

/// Which duplicate detection to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DedupBackend {
    /// Redis (or Redis Cluster): shared by every aggregator.
    Redis,
    /// In this process only (for `outpost dev` and single instances).
    Memory,
    /// None: the PostgreSQL unique key alone drops duplicates.
    Off,
}

/// `[dedup]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// `redis`, `memory` or `off`.
    pub backend: DedupBackend,
    /// Redis URL(s); more than one means Redis Cluster.
    pub redis_urls: Vec<String>,
    /// Prefix of every key (lets several deployments or tests share a Redis).
    pub key_prefix: String,
    /// How long an event id is remembered, in seconds.
    pub window_secs: u64,
    /// Most event ids the memory backend remembers.
    pub memory_max_entries: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            backend: DedupBackend::Redis,
            redis_urls: vec!["redis://127.0.0.1:6379".into()],
            key_prefix: "outpost:dedup:".into(),
            window_secs: 24 * 3600,
            memory_max_entries: 1_000_000,
        }
    }
}

/// `[postgres]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Whether the PostgreSQL sink is on.
    pub enabled: bool,
    /// Connection URL (may hold the password; never printed).
    pub url: Redacted,
    /// Run `migrations/postgres` at start-up.
    pub migrate_on_start: bool,
    /// Connection pool size.
    pub max_connections: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            enabled: true,
            url: Redacted::from("postgres://postgres@127.0.0.1:5432/outpost"),
            migrate_on_start: true,
            max_connections: 8,
        }
    }
}

/// `[sqlite]`: events, client records and the query API in one SQLite
/// file instead of PostgreSQL, for one machine (`outpost dev`, small
/// installs). Turn `[postgres]` off when this is on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteConfig {
    /// Whether the SQLite store is on.
    pub enabled: bool,
    /// The database file (created, with its directory, when missing).
    pub path: PathBuf,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            enabled: false,
            path: PathBuf::from("data/events.db"),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `outpost=debug,sqlx=warn`); `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

const ENV_PREFIX: &str = "OUTPOST_";
const SECTIONS: &[&str] = &[
    "server", "spool", "delivery", "dedup", "postgres", "sqlite", "influxdb", "geoip", "limits",
    "log",
];

impl Config {
    /// Loads `path` (if given), applies the environment, checks the result.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let config = Config::load_unchecked(path)?;
        config.check()?;
        Ok(config)
    }

    /// As [`Config::load`], without [`Config::check`] (for commands that
    /// need only part of the configuration, like `migrate`).
    pub fn load_unchecked(path: Option<&Path>) -> anyhow::Result<Config> {
        Config::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load_unchecked`], with `vars` in place of the process
    /// environment (for tools and tests that check a deployment's settings).
    pub fn load_with_env(
        path: Option<&Path>,
        vars: impl Iterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("parsing {}", p.display()))?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, vars)?;
        toml::Value::Table(table)
            .try_into()
            .context("invalid configuration")
    }

    /// Rules a well-typed configuration can still break.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.edge_keys.is_empty() {
            bail!("no edge keys: set [[edge_keys]] or OUTPOST_EDGE_KEYS=id=base64url-secret");
        }
        for k in &self.edge_keys {
            if k.id.is_empty() || k.id.len() > outpost_shared::frame::MAX_ID_BYTES {
                bail!("edge key id {:?} must be 1..=64 bytes", k.id);
            }
            if k.secret.expose().len() < 32 {
                bail!("edge key {:?}: the secret must be at least 32 bytes", k.id);
            }
        }
        if self.postgres.enabled && self.sqlite.enabled {
            bail!(
                "[postgres] and [sqlite] are both enabled: events and client records live in one of them"
            );
        }
        if self.dedup.backend == DedupBackend::Redis && self.dedup.redis_urls.is_empty() {
            bail!("dedup.backend = \"redis\" needs dedup.redis_urls");
        }
        Ok(())
    }

    /// The edge key ring.
    pub fn key_ring(&self) -> KeyRing {
        KeyRing {
            keys: self.edge_keys.clone(),
        }
    }
}

/// A string that is a secret (or holds one, like a URL with a password):
/// `***` in `Debug`, itself in TOML and JSON.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

impl From<&str> for Redacted {
    fn from(s: &str) -> Redacted {
        Redacted(s.to_owned())
    }
}

/// Applies `OUTPOST_<SECTION>_<KEY>=value` overrides to a TOML table.
/// Values are read as TOML scalars when they parse as one (`8`, `true`),
/// otherwise as strings; a comma-separated list for list-valued keys.
fn apply_env(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        if rest == "edge_keys" {
            table.insert("edge_keys".into(), parse_edge_keys(&value)?);
            continue;
        }
        let Some((section, key)) = SECTIONS.iter().find_map(|s| {
            rest.strip_prefix(s)
                .and_then(|k| k.strip_prefix('_'))
                .map(|k| (*s, k.to_owned()))
        }) else {
            continue;
        };
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            bail!("[{section}] in the config file is not a table");
        };
        let parsed = if key.ends_with("_urls") {
            toml::Value::Array(
                value
                    .split(',')
                    .map(|s| toml::Value::String(s.trim().to_owned()))
                    .collect(),
            )
        } else {
            scalar(&value)
        };
        // Nested tables (server.frame) use one more segment: OUTPOST_SERVER_FRAME_MAX_EVENTS.
        if let Some(inner_key) = key.strip_prefix("frame_") {
            let frame = section_table
                .entry("frame")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = frame {
                t.insert(inner_key.to_owned(), parsed);
            }
        } else {
            section_table.insert(key, parsed);
        }
    }
    Ok(())
}

fn scalar(value: &str) -> toml::Value {
    if let Ok(i) = value.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = value.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(f) = value.parse::<f64>() {
        return toml::Value::Float(f);
    }
    toml::Value::String(value.to_owned())
}

fn parse_edge_keys(value: &str) -> anyhow::Result<toml::Value> {
    let mut keys = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, secret) = part
            .split_once('=')
            .context("OUTPOST_EDGE_KEYS: expected id=base64url-secret[,…]")?;
        let mut t = toml::Table::new();
        t.insert("id".into(), toml::Value::String(id.to_owned()));
        t.insert("secret".into(), toml::Value::String(secret.to_owned()));
        keys.push(toml::Value::Table(t));
    }
    Ok(toml::Value::Array(keys))
}

/// An edge key from raw secret bytes (for `outpost dev` and tests).
pub fn edge_key(id: &str, secret: &[u8]) -> EdgeKey {
    EdgeKey {
        id: id.into(),
        secret: Secret::new(secret.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn environment_overrides_the_file_and_types_values() {
        let mut t: toml::Table = "[postgres]\nurl = \"postgres://file\"\nmax_connections = 2\n"
            .parse()
            .unwrap();
        apply_env(
            &mut t,
            env(&[
                ("OUTPOST_POSTGRES_URL", "postgres://env"),
                ("OUTPOST_SPOOL_MAX_BYTES", "1000"),
                ("OUTPOST_DEDUP_REDIS_URLS", "redis://a:1, redis://b:2"),
                ("OUTPOST_SERVER_FRAME_MAX_EVENTS", "7"),
                (
                    "OUTPOST_EDGE_KEYS",
                    "e1=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY",
                ),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        let c: Config = toml::Value::Table(t).try_into().unwrap();
        assert_eq!(c.postgres.url.0, "postgres://env");
        assert_eq!(c.postgres.max_connections, 2);
        assert_eq!(c.spool.max_bytes, 1000);
        assert_eq!(c.dedup.redis_urls, ["redis://a:1", "redis://b:2"]);
        assert_eq!(c.server.frame.max_events, 7);
        assert_eq!(c.edge_keys[0].id, "e1");
        assert_eq!(c.edge_keys[0].secret.expose().len(), 32);
        c.check().unwrap();
    }

    #[test]
    fn every_section_can_be_set_from_the_environment() {
        let value = toml::Value::try_from(Config::default()).unwrap();
        for (section, v) in value.as_table().unwrap() {
            if v.is_table() {
                assert!(
                    SECTIONS.contains(&section.as_str()),
                    "OUTPOST_{}_* is not read",
                    section.to_uppercase()
                );
            }
        }
    }

    #[test]
    fn unknown_keys_and_weak_edge_keys_are_refused() {
        let t: toml::Table = "[postgres]\nurll = \"x\"\n".parse().unwrap();
        assert!(toml::Value::Table(t).try_into::<Config>().is_err());
        let mut c = Config::default();
        assert!(c.check().is_err(), "no edge keys");
        c.edge_keys = vec![edge_key("e", b"short")];
        assert!(c.check().is_err());
        c.edge_keys = vec![edge_key("e", &[1; 32])];
        c.check().unwrap();
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config {
            edge_keys: vec![edge_key("e", b"0123456789abcdef0123456789abcdef")],
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }
}
