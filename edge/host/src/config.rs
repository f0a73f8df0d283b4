//! What one host runs, and the bounds it puts on every request.
//!
//! The `outpost` command line reads this from a TOML file (or builds it from
//! flags), so every field has a serde default except the component path:
//! a minimal file is `component = "outpost_edge_spin.wasm"` plus the Spin
//! variables the edge needs. Unknown keys are refused so that a typo in a
//! limit is not silently ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Everything [`EdgeHost::new`](crate::EdgeHost::new) needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The compiled Spin component (`outpost_edge_spin.wasm`).
    pub component: PathBuf,
    /// Where [`EdgeHost::serve`](crate::EdgeHost::serve)'s caller should
    /// bind; the host itself takes a ready listener. Default `127.0.0.1:3000`
    /// (Spin's default).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The Spin variables, by name (`aggregator_url`, `edge_key_secret`, …;
    /// see `outpost_edge::config::VARIABLES`). A name not listed here is
    /// `undefined` to the component, which then uses its default.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Where the `default` key-value store lives.
    #[serde(default)]
    pub kv: KvConfig,
    /// Per-request bounds.
    #[serde(default)]
    pub limits: Limits,
    /// Where to serve the host's Prometheus metrics (`GET /metrics`: KV
    /// errors by use, keys held, requests by status); none by default.
    /// Keep it off the public interface.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

impl HostConfig {
    /// A configuration with every default, for `component`.
    pub fn new(component: impl Into<PathBuf>) -> HostConfig {
        HostConfig {
            component: component.into(),
            listen: default_listen(),
            variables: BTreeMap::new(),
            kv: KvConfig::default(),
            limits: Limits::default(),
            metrics_listen: None,
        }
    }

    /// Sets one Spin variable.
    pub fn variable(mut self, name: impl Into<String>, value: impl Into<String>) -> HostConfig {
        self.variables.insert(name.into(), value.into());
        self
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3000))
}

/// The backend of Spin's `default` key-value store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum KvConfig {
    /// A map in this process, shared by every request this host serves and
    /// lost when it stops. Rate limits and caches are then per host.
    Memory {
        /// Most keys held; past it the least recently used is forgotten.
        #[serde(default = "default_max_keys")]
        max_keys: usize,
    },
    /// A Redis server, so that several hosts share rate limits, nonces and
    /// the client cache (what one Spin app with a Redis store would do).
    Redis {
        /// `redis://host:port/db`.
        url: String,
        /// Prepended to every key, so that one Redis can hold several
        /// deployments (and nothing else of ours is touched).
        #[serde(default = "default_prefix")]
        prefix: String,
    },
}

impl Default for KvConfig {
    fn default() -> KvConfig {
        KvConfig::Memory {
            max_keys: default_max_keys(),
        }
    }
}

fn default_max_keys() -> usize {
    crate::kv::MEMORY_MAX_KEYS
}

fn default_prefix() -> String {
    "outpost:edge:".into()
}

/// Bounds on each request. They protect the host from the guest (a loop,
/// a leak) and from callers (a huge body); the guest has its own, smaller,
/// limits on what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Time budget of one request, from its arrival, in milliseconds. Guest
    /// code still running after it is interrupted (epoch interruption, so a
    /// spinning guest is stopped too); a guest still waiting on I/O
    /// [`DEADLINE_GRACE_MS`](crate::DEADLINE_GRACE_MS) later is dropped.
    /// Either way the caller gets `503` code 50302 with `Retry-After`.
    pub deadline_ms: u64,
    /// Most linear memory one instance may have, in bytes; growing past it
    /// traps (`500`).
    pub memory_bytes: usize,
    /// Most instances alive at once (requests inside the component). They
    /// come from a pool of this many slots, set up once and reused, not
    /// mapped afresh per request; a request finding every slot taken waits
    /// for one until its deadline, then gets `503` / 50302.
    pub max_instances: u32,
    /// Bytes of each slot's linear memory kept resident between the
    /// instances that use it: zeroed with `memset` when an instance ends
    /// instead of returned to the kernel, so that the next request takes no
    /// page faults there (a 100-event batch touches about 2 MiB; ~18 % of
    /// its time went to page faults). The host may keep up to
    /// `max_instances` × this resident after a burst; `0` gives every page
    /// back after each request.
    pub keep_resident_bytes: usize,
    /// Most open client connections. Each may hold a request body of up to
    /// `max_request_body_bytes` while it arrives, so this also bounds the
    /// memory that slow senders can take; a connection past it is closed
    /// at once (counted in `outpost_edge_connections_refused_total`).
    pub max_connections: u32,
    /// Largest request body handed to the guest, in bytes. Larger bodies
    /// are refused with `413` code 41302 (before the guest runs when
    /// `Content-Length` says so). Keep it above the guest's own bound
    /// (`max_body_bytes` + 1 KiB) so that the guest gives the precise answer.
    pub max_request_body_bytes: usize,
    /// Largest response body the host collects from the guest, in bytes.
    pub max_response_body_bytes: usize,
    /// Upper bound, in milliseconds, on each of the connect, first-byte and
    /// between-bytes timeouts of the guest's outbound HTTP requests (the
    /// guest may ask for shorter ones).
    pub outbound_timeout_ms: u64,
    /// `Retry-After` (seconds) sent with a deadline `503`.
    pub retry_after_secs: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            deadline_ms: 10_000,
            memory_bytes: 64 << 20,
            max_instances: 256,
            keep_resident_bytes: 2 << 20,
            max_connections: 1024,
            max_request_body_bytes: (1 << 20) + (64 << 10),
            max_response_body_bytes: 8 << 20,
            outbound_timeout_ms: 10_000,
            retry_after_secs: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_toml_file_takes_every_default() {
        let cfg: HostConfig = toml::from_str(
            r#"
            component = "edge.wasm"
            [variables]
            aggregator_url = "http://127.0.0.1:8080"
            "#,
        )
        .unwrap();
        assert_eq!(
            cfg,
            HostConfig::new("edge.wasm").variable("aggregator_url", "http://127.0.0.1:8080")
        );
    }

    #[test]
    fn redis_and_limits_parse_and_typos_are_refused() {
        let cfg: HostConfig = toml::from_str(
            r#"
            component = "edge.wasm"
            listen = "0.0.0.0:8000"
            kv = { backend = "redis", url = "redis://127.0.0.1:6379/0" }
            [limits]
            deadline_ms = 500
            keep_resident_bytes = 0
            "#,
        )
        .unwrap();
        assert_eq!(
            cfg.kv,
            KvConfig::Redis {
                url: "redis://127.0.0.1:6379/0".into(),
                prefix: "outpost:edge:".into()
            }
        );
        assert_eq!(cfg.limits.deadline_ms, 500);
        assert_eq!(cfg.limits.memory_bytes, 64 << 20);
        assert_eq!(cfg.limits.keep_resident_bytes, 0);
        assert_eq!(Limits::default().keep_resident_bytes, 2 << 20);
        assert!(
            toml::from_str::<HostConfig>("component = \"a\"\n[limits]\ndeadline = 5\n").is_err()
        );
    }
}
