//! The edge's settings, read from the platform's variables and secrets.
//!
//! Every adapter reads the same names through a lookup function: Spin
//! variables are these names as written (`aggregator_url`), Cloudflare
//! vars and secrets the same names in upper case (`AGGREGATOR_URL`).
//! Parsing lives here so that the platforms cannot disagree on a default.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use outpost_shared::client::Secret;
use outpost_shared::frame::EdgeKey;
use outpost_shared::ratelimit::RateLimit;
use outpost_shared::seal::{PURPOSE_CLIENT_RECORD, PURPOSE_EDGE_CACHE, SealKey};
use outpost_shared::validate::Limits;

use crate::net::NetList;
use crate::pipeline::EdgeConfig;

/// Every variable the edge reads, with its default (`None`: required).
pub const VARIABLES: &[(&str, Option<&str>, &str)] = &[
    (
        "aggregator_url",
        None,
        "Base URL of the aggregator (`/v1/ingest`, `/internal/v1/clients/{id}`), or several, comma-separated, in order of preference: a call that gets no answer or `503` is made again to the next (the same frame, so the same batch id).",
    ),
    (
        "edge_id",
        Some("edge"),
        "Names this deployment in every frame.",
    ),
    ("edge_key_id", None, "Id of the key frames are signed with."),
    (
        "edge_key_secret",
        None,
        "The key's secret, base64url without padding (a secret variable).",
    ),
    (
        "max_body_bytes",
        Some("524288"),
        "Largest request body after decompression.",
    ),
    ("max_event_bytes", Some("32768"), "Largest single event."),
    ("max_batch_events", Some("500"), "Most events per batch."),
    (
        "trusted_proxies",
        Some(""),
        "Comma-separated IPs/CIDRs whose `X-Forwarded-For` is believed.",
    ),
    (
        "blocklist",
        Some(""),
        "Comma-separated IPs/CIDRs refused with 40303.",
    ),
    (
        "client_cache_ttl_secs",
        Some("60"),
        "How long a client record (or its absence) stays cached in KV.",
    ),
    (
        "signature_window_secs",
        Some("300"),
        "Accepted clock difference for HMAC-signed requests.",
    ),
    (
        "retry_after_secs",
        Some("5"),
        "`Retry-After` when the aggregator did not acknowledge.",
    ),
    (
        "upstream_timeout_ms",
        Some("5000"),
        "How long to wait for the aggregator before answering 503.",
    ),
    (
        "ip_requests_per_minute",
        Some("600"),
        "Requests one client address may make per minute (bursts up to it), checked before the body is read or a client looked up; answered 429 with 42902. IPv6 addresses count per /64. `0`: off.",
    ),
    (
        "client_lookups_per_minute",
        Some("600"),
        "Client records this edge may fetch from the aggregator per minute (cache misses, bursts up to it); past it an uncached client is answered 503 with 50302 and `Retry-After`. Bounds what a flood of made-up keys costs the aggregator. `0`: no bound.",
    ),
    (
        "allow_insecure_http",
        Some("false"),
        "`true` lets `aggregator_url` be plain `http://` to a host other than loopback (a private network). Otherwise it must be `https://`.",
    ),
    (
        "kv_slots",
        Some("65536"),
        "Spin only (its key-value store has no expiry): keys per use (client records, unknown ids, each kind of rate limit, nonces); a new key takes the slot its keyed hash picks, so the store never holds more than a few times this many keys.",
    ),
];

/// A setting that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("edge setting {name}: {problem}")]
pub struct ConfigError {
    /// The variable's name.
    pub name: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// What an adapter needs beyond [`EdgeConfig`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// The pipeline's configuration.
    pub edge: EdgeConfig,
    /// Aggregator base URLs, without a trailing slash, in order of
    /// preference (at least one).
    pub aggregator_urls: Vec<String>,
    /// Time limit for each call to the aggregator, milliseconds.
    pub upstream_timeout_ms: u64,
    /// Spin: key slots per use of the store (see [`crate::kv_slots`]).
    pub kv_slots: u32,
}

/// Whether `url` (`http://host[:port]/…`) names this machine.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Settings {
    /// Reads every variable through `lookup` (which returns `None` for an
    /// unset variable; an empty value counts as unset for required ones).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let get = |name: &'static str| -> Result<String, ConfigError> {
            let default = VARIABLES
                .iter()
                .find(|(n, _, _)| *n == name)
                .and_then(|(_, d, _)| *d);
            match (lookup(name).filter(|v| !v.trim().is_empty()), default) {
                (Some(v), _) => Ok(v.trim().to_owned()),
                (None, Some(d)) => Ok(d.to_owned()),
                (None, None) => Err(ConfigError {
                    name,
                    problem: "required, not set".into(),
                }),
            }
        };
        fn number<T: std::str::FromStr>(name: &'static str, v: String) -> Result<T, ConfigError> {
            v.parse().map_err(|_| ConfigError {
                name,
                problem: format!("expected a non-negative integer, got {v:?}"),
            })
        }
        fn nets(name: &'static str, v: &str) -> Result<NetList, ConfigError> {
            NetList::parse(v.split(',').map(str::trim).filter(|s| !s.is_empty())).map_err(|e| {
                ConfigError {
                    name,
                    problem: format!("not an IP address or CIDR range: {:?}", e.0),
                }
            })
        }

        fn flag(name: &'static str, v: &str) -> Result<bool, ConfigError> {
            match v {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(ConfigError {
                    name,
                    problem: format!("expected true or false, got {other:?}"),
                }),
            }
        }
        fn per_minute(n: u32) -> Option<RateLimit> {
            (n > 0).then_some(RateLimit {
                limit: n,
                period_secs: 60,
            })
        }

        // Frames and client lookups cross this hop; in clear text only on
        // this machine, or where the operator says the network is private.
        let insecure_ok = flag("allow_insecure_http", &get("allow_insecure_http")?)?;
        let mut aggregator_urls = Vec::new();
        for url in get("aggregator_url")?.split(',').map(str::trim) {
            let url = url.trim_end_matches('/').to_owned();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError {
                    name: "aggregator_url",
                    problem: format!("expected http:// or https:// URLs, got {url:?}"),
                });
            }
            if url.starts_with("http://") && !insecure_ok && !is_loopback_url(&url) {
                return Err(ConfigError {
                    name: "aggregator_url",
                    problem: format!(
                        "{url:?} is plain http:// to another host: use https://, or set allow_insecure_http = true for a private network"
                    ),
                });
            }
            aggregator_urls.push(url);
        }
        let key_id = get("edge_key_id")?;
        if key_id.len() > outpost_shared::frame::MAX_ID_BYTES {
            return Err(ConfigError {
                name: "edge_key_id",
                problem: "longer than 64 bytes".into(),
            });
        }
        let secret = B64
            .decode(get("edge_key_secret")?.as_bytes())
            .map_err(|_| ConfigError {
                name: "edge_key_secret",
                problem: "expected base64url without padding".into(),
            })?;
        if secret.len() < 16 {
            return Err(ConfigError {
                name: "edge_key_secret",
                problem: "shorter than 16 bytes".into(),
            });
        }
        let edge_id = get("edge_id")?;
        if edge_id.len() > outpost_shared::frame::MAX_ID_BYTES {
            return Err(ConfigError {
                name: "edge_id",
                problem: "longer than 64 bytes".into(),
            });
        }
        let limits = Limits {
            max_body_bytes: number("max_body_bytes", get("max_body_bytes")?)?,
            max_event_bytes: number("max_event_bytes", get("max_event_bytes")?)?,
            max_batch_events: number("max_batch_events", get("max_batch_events")?)?,
            ..Limits::default()
        };
        let kv_slots: u32 = number("kv_slots", get("kv_slots")?)?;
        if kv_slots == 0 {
            return Err(ConfigError {
                name: "kv_slots",
                problem: "must be at least 1".into(),
            });
        }
        Ok(Settings {
            edge: EdgeConfig {
                edge_id,
                record_key: SealKey::derive(&secret, PURPOSE_CLIENT_RECORD),
                cache_key: SealKey::derive(&secret, PURPOSE_EDGE_CACHE),
                edge_key: EdgeKey {
                    id: key_id,
                    secret: Secret::new(secret),
                },
                ip_limit: per_minute(number(
                    "ip_requests_per_minute",
                    get("ip_requests_per_minute")?,
                )?),
                lookup_limit: per_minute(number(
                    "client_lookups_per_minute",
                    get("client_lookups_per_minute")?,
                )?),
                limits,
                trusted_proxies: nets("trusted_proxies", &get("trusted_proxies")?)?,
                blocklist: nets("blocklist", &get("blocklist")?)?,
                client_cache_ttl_secs: number(
                    "client_cache_ttl_secs",
                    get("client_cache_ttl_secs")?,
                )?,
                signature_window_secs: number(
                    "signature_window_secs",
                    get("signature_window_secs")?,
                )?,
                retry_after_secs: number("retry_after_secs", get("retry_after_secs")?)?,
            },
            aggregator_urls,
            upstream_timeout_ms: number("upstream_timeout_ms", get("upstream_timeout_ms")?)?,
            kv_slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const MINIMAL: &[(&str, &str)] = &[
        ("aggregator_url", "http://127.0.0.1:8080/"),
        ("edge_key_id", "edge-1"),
        ("edge_key_secret", "ZWRnZS1zZWNyZXQtZWRnZS1zZWNyZXQ"),
    ];

    #[test]
    fn defaults_fill_everything_but_the_required_three() {
        let s = Settings::from_lookup(vars(MINIMAL)).unwrap();
        assert_eq!(s.aggregator_urls, ["http://127.0.0.1:8080"]);
        assert_eq!(s.edge.edge_id, "edge");
        assert_eq!(s.edge.edge_key.secret.expose(), b"edge-secret-edge-secret");
        assert_eq!(s.edge.limits, Limits::default());
        assert!(s.edge.blocklist.is_empty() && s.edge.trusted_proxies.is_empty());
        assert_eq!(s.edge.client_cache_ttl_secs, 60);
        assert_eq!(s.upstream_timeout_ms, 5000);
    }

    #[test]
    fn each_required_variable_is_named_when_missing() {
        for missing in ["aggregator_url", "edge_key_id", "edge_key_secret"] {
            let pairs: Vec<_> = MINIMAL
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let e = Settings::from_lookup(vars(&pairs)).unwrap_err();
            assert_eq!(e.name, missing);
        }
    }

    #[test]
    fn malformed_values_are_refused_with_their_name() {
        for (name, value) in [
            ("aggregator_url", "ftp://x"),
            ("edge_key_secret", "not base64!"),
            ("edge_key_secret", "c2hvcnQ"),
            ("max_body_bytes", "-1"),
            ("blocklist", "10.0.0.0/99"),
            ("trusted_proxies", "proxy.example"),
            ("aggregator_url", "http://aggregator.example.com"),
            ("aggregator_url", "http://10.0.0.5:8080"),
            ("allow_insecure_http", "yes"),
            ("kv_slots", "0"),
            ("ip_requests_per_minute", "-5"),
        ] {
            let mut pairs: Vec<_> = MINIMAL
                .iter()
                .copied()
                .filter(|(k, _)| *k != name)
                .collect();
            pairs.push((name, value));
            let e = Settings::from_lookup(vars(&pairs)).unwrap_err();
            assert_eq!(e.name, name, "{value}");
        }
    }

    #[test]
    fn plain_http_is_for_this_machine_or_a_network_marked_private() {
        let with = |url: &str, insecure: Option<&str>| {
            let mut pairs: Vec<_> = MINIMAL
                .iter()
                .copied()
                .filter(|(k, _)| *k != "aggregator_url")
                .collect();
            pairs.push(("aggregator_url", url));
            if let Some(v) = insecure {
                pairs.push(("allow_insecure_http", v));
            }
            Settings::from_lookup(vars(&pairs))
        };
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://[::1]:8080",
            "https://aggregator.example.com",
            "https://10.0.0.5",
        ] {
            assert!(with(ok, None).is_ok(), "{ok}");
        }
        for remote in [
            "http://aggregator.example.com",
            "http://10.0.0.5:8080",
            "http://127.0.0.1.evil.example",
            "http://localhost@evil.example",
        ] {
            assert_eq!(
                with(remote, None).unwrap_err().name,
                "aggregator_url",
                "{remote}"
            );
            assert!(
                with(remote, Some("true")).is_ok(),
                "{remote} marked insecure"
            );
        }
    }

    #[test]
    fn several_aggregators_are_listed_in_order_and_each_is_checked() {
        let with = |url: &str| {
            let mut pairs: Vec<_> = MINIMAL
                .iter()
                .copied()
                .filter(|(k, _)| *k != "aggregator_url")
                .collect();
            pairs.push(("aggregator_url", url));
            Settings::from_lookup(vars(&pairs))
        };
        let s = with("https://a.example/, https://b.example:8443").unwrap();
        assert_eq!(
            s.aggregator_urls,
            ["https://a.example", "https://b.example:8443"]
        );
        for bad in [
            "https://a.example, http://10.0.0.5",
            "https://a.example,",
            "https://a.example, ftp://b",
        ] {
            assert_eq!(with(bad).unwrap_err().name, "aggregator_url", "{bad}");
        }
    }

    #[test]
    fn flood_bounds_default_on_and_zero_turns_them_off() {
        let s = Settings::from_lookup(vars(MINIMAL)).unwrap();
        assert_eq!(
            s.edge.ip_limit.map(|l| (l.limit, l.period_secs)),
            Some((600, 60))
        );
        assert_eq!(s.edge.lookup_limit.map(|l| l.limit), Some(600));
        assert_eq!(s.kv_slots, 65536);
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("ip_requests_per_minute", "0"));
        pairs.push(("client_lookups_per_minute", "0"));
        let off = Settings::from_lookup(vars(&pairs)).unwrap();
        assert!(off.edge.ip_limit.is_none() && off.edge.lookup_limit.is_none());
    }

    #[test]
    fn lists_are_parsed() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("blocklist", "203.0.113.7, 198.51.100.0/24"));
        pairs.push(("trusted_proxies", "10.0.0.0/8"));
        let s = Settings::from_lookup(vars(&pairs)).unwrap();
        assert!(s.edge.blocklist.contains("198.51.100.9".parse().unwrap()));
        assert!(s.edge.trusted_proxies.contains("10.1.2.3".parse().unwrap()));
    }
}
