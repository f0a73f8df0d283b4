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
pub use crate::redacted::Redacted;
pub use crate::sinks::influxdb::{InfluxConfig, WriteApi};
pub use crate::sinks::postgres::PostgresConfig;
pub use crate::sinks::sqlite::SqliteConfig;
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
    /// Cost limits of the read API (`/v1/events`, `/v1/stats`).
    pub read_api: ReadApiConfig,
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
    /// Time a connection has to send a request's headers (also between
    /// requests on a kept-alive connection), in milliseconds.
    pub header_timeout_ms: u64,
    /// Most open connections; past it the oldest idle one is closed.
    pub max_connections: usize,
    /// Most requests handled at once (health and metrics not counted);
    /// past it `503` + `Retry-After`.
    pub max_concurrent_requests: usize,
    /// Proxies (IPs/CIDRs) whose `X-Forwarded-For` names the client, for
    /// the read API's per-address limit.
    pub trusted_proxies: Vec<String>,
    /// Client-record lookups each edge key may make per minute
    /// (`/internal/v1/clients/{id}`; past it `503`); `0`: no bound.
    pub client_lookups_per_minute: u32,
    /// TLS for the listener (off unless both files are set).
    pub tls: TlsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            frame: FrameLimits::default(),
            retry_after_secs: 5,
            request_timeout_ms: 10_000,
            header_timeout_ms: 10_000,
            max_connections: 4096,
            max_concurrent_requests: 512,
            trusted_proxies: Vec::new(),
            client_lookups_per_minute: 60_000,
            tls: TlsConfig::default(),
        }
    }
}

/// `[server.tls]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; TLS is on when this and `key_path` are set.
    pub cert_path: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
    /// How often the files are checked for a new certificate, in seconds.
    pub reload_check_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
            reload_check_secs: 60,
        }
    }
}

impl TlsConfig {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert_path.as_os_str().is_empty() || !self.key_path.as_os_str().is_empty()
    }
}

/// `[read_api]`: what one query may cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadApiConfig {
    /// Requests per minute from one address, checked before the caller is
    /// authenticated (`0`: off).
    pub ip_requests_per_minute: u32,
    /// PostgreSQL `statement_timeout` of every read query, in milliseconds.
    pub statement_timeout_ms: u64,
    /// Longest `to - from` of a query that reads rows instead of rollups
    /// (`/v1/stats` with `users=true` or filters the rollups cannot
    /// answer), in seconds.
    pub max_scan_span_secs: u64,
    /// Most events a `/v1/stats` query that reads rows may read, as the
    /// PostgreSQL per-minute counts tell before it runs (`0`: no bound).
    pub max_scan_events: u64,
    /// Signs query cursors (base64url, at least 32 bytes): the same on
    /// every aggregator behind one address, so a cursor from one opens on
    /// another. Empty: a key derived from the first edge key (rotating
    /// that key then invalidates open cursors).
    pub cursor_secret: Redacted,
}

impl Default for ReadApiConfig {
    fn default() -> Self {
        ReadApiConfig {
            ip_requests_per_minute: 600,
            statement_timeout_ms: 10_000,
            max_scan_span_secs: 7 * 86_400,
            max_scan_events: 500_000,
            cursor_secret: Redacted::default(),
        }
    }
}

impl ReadApiConfig {
    /// `cursor_secret` decoded; `None` when it is not set.
    fn cursor_secret_bytes(&self) -> anyhow::Result<Option<Vec<u8>>> {
        use base64::Engine as _;
        if self.cursor_secret.0.is_empty() {
            return Ok(None);
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.cursor_secret.0.trim_end_matches('='))
            .context("read_api.cursor_secret: expected base64url")?;
        if bytes.len() < 32 {
            bail!("read_api.cursor_secret must be at least 32 bytes (base64url)");
        }
        Ok(Some(bytes))
    }
}

/// `[spool]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Where acknowledged batches wait for the sinks: `sqlite` (a file on
    /// this node, `path`) or `jetstream` (a NATS JetStream stream a fleet
    /// shares, `[spool.jetstream]`).
    pub backend: crate::spool::Backend,
    /// SQLite file holding acknowledged batches until every sink has them.
    pub path: PathBuf,
    /// Size bound: above it, ingest answers `503` + `Retry-After`.
    pub max_bytes: u64,
    /// Most frames committed (one fsync) together.
    pub max_frames_per_commit: usize,
    /// Size bound of the dead letters kept (their payloads); past it the
    /// oldest are dropped.
    pub dead_letters_max_bytes: u64,
    /// The JetStream stream, when `backend = "jetstream"`.
    pub jetstream: crate::spool::JetStreamConfig,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            backend: crate::spool::Backend::Sqlite,
            path: PathBuf::from("data/spool.db"),
            max_bytes: 1 << 30,
            max_frames_per_commit: 256,
            dead_letters_max_bytes: 64 << 20,
            jetstream: crate::spool::JetStreamConfig::default(),
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
    /// After a write that took fewer than `max_batches_per_write` batches,
    /// how long a sink's worker waits before it looks for more, in
    /// milliseconds: under moderate load a write then takes the batches of
    /// that time together instead of one or two, which costs far less CPU
    /// per event (one statement, one commit of the spool's bookkeeping).
    /// Delays storage, never the acknowledgement; a full write and a sink
    /// catching up do not wait. 0: look again at once.
    pub linger_ms: u64,
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
            linger_ms: 20,
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
    "read_api", "log",
];

/// Tables inside a section, reached with one more name segment
/// (`OUTPOST_SERVER_TLS_CERT_PATH`).
const NESTED: &[(&str, &str)] = &[
    ("server", "frame"),
    ("server", "tls"),
    ("spool", "jetstream"),
];

/// Keys whose value is a list (comma-separated in the environment).
const LISTS: &[&str] = &["redis_urls", "trusted_proxies", "urls"];

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
    ///
    /// figment layers the file under the environment and reads the result
    /// into the typed configuration. Every `OUTPOST_*` value goes in as a
    /// string and its field's type decides what it becomes: a number or a
    /// boolean only where the field is one, so a password of `123456`
    /// stays the string it is.
    pub fn load_with_env(
        path: Option<&Path>,
        vars: impl Iterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("parsing {}", p.display()))?
            }
            None => toml::Table::new(),
        };
        Config::layered(file, vars)
    }

    /// The file's table under the environment's overrides, typed.
    fn layered(
        file: toml::Table,
        vars: impl Iterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let env = EnvOverrides::read(vars)?;
        figment::Figment::from(figment::providers::Serialized::defaults(file))
            .merge(env)
            .extract_lossy()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
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
        // Ingest would acknowledge batches that go nowhere.
        if self.sink_names().is_empty() {
            bail!(
                "no sink is enabled: turn on [postgres], [sqlite] or [influxdb] (ingest would acknowledge events that go nowhere)"
            );
        }
        let tls = &self.server.tls;
        if tls.enabled()
            && (tls.cert_path.as_os_str().is_empty() || tls.key_path.as_os_str().is_empty())
        {
            bail!("[server.tls] needs both cert_path and key_path");
        }
        outpost_edge::net::NetList::parse(self.server.trusted_proxies.iter().map(String::as_str))
            .map_err(|e| anyhow::anyhow!("server.trusted_proxies: {e}"))?;
        if self.server.max_connections == 0 || self.server.max_concurrent_requests == 0 {
            bail!("server.max_connections and server.max_concurrent_requests must be at least 1");
        }
        crate::sinks::influxdb::check_measurement(&self.influxdb.measurement)?;
        self.read_api.cursor_secret_bytes()?;
        Ok(())
    }

    /// The sinks this configuration enables, by name.
    pub fn sink_names(&self) -> Vec<&'static str> {
        crate::sinks::enabled_names(self)
    }

    /// The key query cursors are signed with: from
    /// `read_api.cursor_secret`, else derived from the first edge key.
    pub fn cursor_key(&self) -> anyhow::Result<crate::read_api::CursorKey> {
        let secret = match self.read_api.cursor_secret_bytes()? {
            Some(bytes) => bytes,
            None => self
                .edge_keys
                .first()
                .map(|k| k.secret.expose().to_vec())
                .unwrap_or_default(),
        };
        Ok(crate::read_api::CursorKey::derive(&secret))
    }

    /// The edge key ring.
    pub fn key_ring(&self) -> KeyRing {
        KeyRing {
            keys: self.edge_keys.clone(),
        }
    }
}

/// The `OUTPOST_<SECTION>_<KEY>=value` variables, as a figment provider:
/// each value a string (a list for list-valued keys) at the key path its
/// name spells. Which segment ends the section is decided by the known
/// section and nested-table names, since keys hold underscores themselves.
struct EnvOverrides(figment::value::Dict);

impl EnvOverrides {
    fn read(vars: impl Iterator<Item = (String, String)>) -> anyhow::Result<EnvOverrides> {
        use figment::value::{Dict, Value};
        let mut root = Dict::new();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            if rest == "edge_keys" {
                root.insert("edge_keys".into(), parse_edge_keys(&value)?);
                continue;
            }
            let Some((section, key)) = SECTIONS.iter().find_map(|s| {
                rest.strip_prefix(s)
                    .and_then(|k| k.strip_prefix('_'))
                    .map(|k| (*s, k))
            }) else {
                continue;
            };
            // Nested tables (server.frame) use one more segment:
            // OUTPOST_SERVER_FRAME_MAX_EVENTS.
            let nested = NESTED.iter().find_map(|(sec, table)| {
                (*sec == section)
                    .then(|| key.strip_prefix(table).and_then(|k| k.strip_prefix('_')))
                    .flatten()
                    .map(|inner| (*table, inner))
            });
            let leaf = nested.map_or(key, |(_, k)| k);
            let parsed = if LISTS.contains(&leaf) {
                Value::from(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>(),
                )
            } else {
                Value::from(value)
            };
            let mut path = vec![section];
            path.extend(nested.map(|(table, _)| table));
            insert_at(&mut root, &path, leaf, parsed)?;
        }
        Ok(EnvOverrides(root))
    }
}

/// Puts `value` at `path.key` in `dict`, making the tables on the way.
fn insert_at(
    dict: &mut figment::value::Dict,
    path: &[&str],
    key: &str,
    value: figment::value::Value,
) -> anyhow::Result<()> {
    use figment::value::{Dict, Tag, Value};
    let Some((first, rest)) = path.split_first() else {
        dict.insert(key.to_owned(), value);
        return Ok(());
    };
    let entry = dict
        .entry((*first).to_owned())
        .or_insert_with(|| Value::Dict(Tag::Default, Dict::new()));
    let Value::Dict(_, inner) = entry else {
        bail!(
            "OUTPOST_{}: {first} is not a table",
            first.to_ascii_uppercase()
        );
    };
    insert_at(inner, rest, key, value)
}

impl figment::Provider for EnvOverrides {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("OUTPOST_* environment variables")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.0.clone()))
    }
}

fn parse_edge_keys(value: &str) -> anyhow::Result<figment::value::Value> {
    let mut keys = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, secret) = part
            .split_once('=')
            .context("OUTPOST_EDGE_KEYS: expected id=base64url-secret[,…]")?;
        let mut key = figment::value::Dict::new();
        key.insert("id".into(), id.into());
        key.insert("secret".into(), secret.into());
        keys.push(key);
    }
    Ok(keys.into())
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
        let t: toml::Table = "[postgres]\nurl = \"postgres://file\"\nmax_connections = 2\n"
            .parse()
            .unwrap();
        let c = Config::layered(
            t,
            env(&[
                ("OUTPOST_POSTGRES_URL", "postgres://env"),
                ("OUTPOST_SPOOL_MAX_BYTES", "1000"),
                ("OUTPOST_DEDUP_REDIS_URLS", "redis://a:1, redis://b:2"),
                ("OUTPOST_SERVER_FRAME_MAX_EVENTS", "7"),
                ("OUTPOST_SERVER_TLS_CERT_PATH", "/etc/outpost/cert.pem"),
                ("OUTPOST_SERVER_TLS_KEY_PATH", "/etc/outpost/key.pem"),
                ("OUTPOST_INFLUXDB_ENABLED", "true"),
                (
                    "OUTPOST_EDGE_KEYS",
                    "e1=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY",
                ),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.postgres.url.0, "postgres://env");
        assert_eq!(c.postgres.max_connections, 2);
        assert_eq!(c.spool.max_bytes, 1000);
        assert_eq!(c.dedup.redis_urls, ["redis://a:1", "redis://b:2"]);
        assert_eq!(c.server.frame.max_events, 7);
        assert_eq!(c.server.tls.cert_path, Path::new("/etc/outpost/cert.pem"));
        assert!(c.influxdb.enabled);
        assert_eq!(c.edge_keys[0].id, "e1");
        assert_eq!(c.edge_keys[0].secret.expose().len(), 32);
        c.check().unwrap();
    }

    #[test]
    fn a_value_that_looks_like_a_number_stays_a_string_where_the_key_is_one() {
        // The hand-written patcher guessed types from the value alone:
        // this password became an integer and the configuration failed.
        let c = Config::layered(
            toml::Table::new(),
            env(&[
                ("OUTPOST_INFLUXDB_PASSWORD", "123456"),
                ("OUTPOST_INFLUXDB_TOKEN", "true"),
                ("OUTPOST_INFLUXDB_MEASUREMENT", "2026"),
                ("OUTPOST_POSTGRES_URL", "1e3"),
            ]),
        )
        .unwrap();
        assert_eq!(c.influxdb.password.0, "123456");
        assert_eq!(c.influxdb.token.0, "true");
        assert_eq!(c.influxdb.measurement, "2026");
        assert_eq!(c.postgres.url.0, "1e3");
        // And a number where the key is a number is still checked as one.
        let err = Config::layered(
            toml::Table::new(),
            env(&[("OUTPOST_SPOOL_MAX_BYTES", "lots")]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("max_bytes"), "{err:#}");
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
        assert!(Config::layered(t, env(&[])).is_err());
        assert!(
            Config::layered(toml::Table::new(), env(&[("OUTPOST_POSTGRES_URLL", "x")])).is_err()
        );
        let mut c = Config::default();
        assert!(c.check().is_err(), "no edge keys");
        c.edge_keys = vec![edge_key("e", b"short")];
        assert!(c.check().is_err());
        c.edge_keys = vec![edge_key("e", &[1; 32])];
        c.check().unwrap();
    }

    #[test]
    fn a_cursor_secret_makes_cursors_independent_of_the_edge_keys() {
        let secret = "Y3Vyc29yLXNlY3JldC1jdXJzb3Itc2VjcmV0LWN1cnNvcg";
        let with = |first: &[u8]| Config {
            edge_keys: vec![edge_key("e", first)],
            read_api: ReadApiConfig {
                cursor_secret: Redacted::from(secret),
                ..ReadApiConfig::default()
            },
            ..Config::default()
        };
        let sealed = |c: &Config| c.cursor_key().unwrap().fingerprint();
        assert_eq!(sealed(&with(&[1; 32])), sealed(&with(&[2; 32])));
        let without = |first: &[u8]| Config {
            edge_keys: vec![edge_key("e", first)],
            ..Config::default()
        };
        assert_ne!(sealed(&without(&[1; 32])), sealed(&without(&[2; 32])));
        let short = Config {
            read_api: ReadApiConfig {
                cursor_secret: Redacted::from("c2hvcnQ"),
                ..ReadApiConfig::default()
            },
            ..with(&[1; 32])
        };
        assert!(short.check().is_err(), "a short cursor secret is refused");
        with(&[1; 32]).check().unwrap();
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
