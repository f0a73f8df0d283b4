//! Client records: who may send events, how they prove it, and their limits.
//!
//! The aggregator's database is the one source of truth; the edge fetches a
//! record on a cache miss and keeps it in KV for a short TTL. Records travel
//! as JSON between them, so secrets are in them — [`Secret`] never prints.

use core::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

use crate::auth::api_key::ApiKeyHash;
use crate::auth::jwt::{JwtAlgorithm, JwtKey, JwtPolicy, KeyError};
use crate::auth::permission::Permissions;
use crate::error::ErrorCode;
use crate::event::Timestamp;
pub use crate::id::ClientId;
use crate::ratelimit::RateLimit;

/// Secret bytes: base64url in JSON, `Secret(***)` in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// The bytes; call only where they are used.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s.as_bytes())
            .map(Secret)
            .map_err(|_| serde::de::Error::custom("expected base64url (no padding)"))
    }
}

/// How a client authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// Public write key (browsers): the client id itself; not secret, so
    /// paired with allowed origins and per-IP limits.
    WriteKey,
    /// HMAC request signatures.
    Hmac,
    /// JWT bearer tokens.
    Jwt,
    /// API keys, stored as SHA-256.
    ApiKey,
}

impl AuthMethod {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuthMethod::WriteKey => "write_key",
            AuthMethod::Hmac => "hmac",
            AuthMethod::Jwt => "jwt",
            AuthMethod::ApiKey => "api_key",
        }
    }
}

/// Key material for one credential of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyMaterial {
    /// The shared secret of HMAC request signing.
    HmacSecret {
        /// The secret.
        secret: Secret,
    },
    /// An HS256 JWT secret.
    JwtSecret {
        /// The secret (at least 32 bytes).
        secret: Secret,
    },
    /// A JWT public key, pinned to its algorithm.
    JwtPublicKey {
        /// RS256, ES256 or EdDSA.
        alg: JwtAlgorithm,
        /// SubjectPublicKeyInfo PEM.
        pem: String,
    },
    /// The SHA-256 of an API key.
    ApiKeyHash {
        /// Hex digest.
        sha256: ApiKeyHash,
    },
}

impl KeyMaterial {
    fn method(&self) -> AuthMethod {
        match self {
            KeyMaterial::HmacSecret { .. } => AuthMethod::Hmac,
            KeyMaterial::JwtSecret { .. } | KeyMaterial::JwtPublicKey { .. } => AuthMethod::Jwt,
            KeyMaterial::ApiKeyHash { .. } => AuthMethod::ApiKey,
        }
    }
}

/// One credential. A record holds several during a rotation: the old one
/// with `not_after` set to the end of its grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// The material.
    pub key: KeyMaterial,
    /// When this credential stops working; `None`: until rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Timestamp>,
}

/// A client: one app or server that sends events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRecord {
    /// The id: `[a-z0-9][a-z0-9-]{0,63}`. For write keys it *is* the key.
    pub id: ClientId,
    /// A display name.
    pub name: String,
    /// How it authenticates.
    pub method: AuthMethod,
    /// Its credentials (none for write keys).
    #[serde(default)]
    pub credentials: Vec<Credential>,
    /// Token rules, for `jwt` clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtPolicy>,
    /// What it may do (`write:events`, `read:events`, …).
    pub permissions: Permissions,
    /// Requests per period for the whole client, per point of presence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Requests per period for each client IP, per point of presence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_rate_limit: Option<RateLimit>,
    /// Browser origins allowed to send with this key (`https://app.example`,
    /// `https://*.example.com`, `*`); empty: no browser origin is allowed.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// `false` once revoked.
    pub active: bool,
    /// When the whole client stops working, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

/// Why a record is not well-formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The id breaks the id rule.
    #[error("client id must match [a-z0-9][a-z0-9-]{{0,63}}")]
    BadId,
    /// A credential belongs to another method.
    #[error("credential of type {0} does not belong to method {1}")]
    WrongMaterial(&'static str, &'static str),
    /// A method that needs a credential has none.
    #[error("method {0} needs at least one credential")]
    NoCredential(&'static str),
    /// A JWT key is unusable.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// An allowed origin is not an origin.
    #[error("allowed origin {0:?} must be *, scheme://host[:port] or scheme://*.domain[:port]")]
    BadOrigin(String),
}

/// Whether `id` is a valid client id.
pub fn is_valid_client_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

impl ClientRecord {
    /// Checks the record's own consistency (done when it is created or
    /// changed, and when the edge receives it).
    pub fn check(&self) -> Result<(), RecordError> {
        if !is_valid_client_id(&self.id) {
            return Err(RecordError::BadId);
        }
        for c in &self.credentials {
            if c.key.method() != self.method {
                let name = match &c.key {
                    KeyMaterial::HmacSecret { .. } => "hmac_secret",
                    KeyMaterial::JwtSecret { .. } => "jwt_secret",
                    KeyMaterial::JwtPublicKey { .. } => "jwt_public_key",
                    KeyMaterial::ApiKeyHash { .. } => "api_key_hash",
                };
                return Err(RecordError::WrongMaterial(name, self.method.as_str()));
            }
            if let Some(k) = jwt_key(&c.key) {
                k?;
            }
        }
        if self.method != AuthMethod::WriteKey && self.credentials.is_empty() {
            return Err(RecordError::NoCredential(self.method.as_str()));
        }
        for o in &self.allowed_origins {
            if !valid_origin_pattern(o) {
                return Err(RecordError::BadOrigin(o.clone()));
            }
        }
        Ok(())
    }

    /// Whether the client may be used at `now`: active and not expired.
    pub fn usable_at(&self, now: Timestamp) -> Result<(), ErrorCode> {
        if !self.active || self.expires_at.is_some_and(|e| e <= now) {
            return Err(ErrorCode::ClientInactive);
        }
        Ok(())
    }

    /// Credentials still valid at `now`.
    pub fn live_credentials(&self, now: Timestamp) -> impl Iterator<Item = &KeyMaterial> {
        self.credentials
            .iter()
            .filter(move |c| c.not_after.is_none_or(|t| t > now))
            .map(|c| &c.key)
    }

    /// HMAC secrets valid at `now`.
    pub fn hmac_secrets(&self, now: Timestamp) -> impl Iterator<Item = &[u8]> {
        self.live_credentials(now).filter_map(|k| match k {
            KeyMaterial::HmacSecret { secret } => Some(secret.expose()),
            _ => None,
        })
    }

    /// JWT keys valid at `now` (malformed ones are skipped; `check` refuses them on write).
    pub fn jwt_keys(&self, now: Timestamp) -> Vec<JwtKey> {
        self.live_credentials(now)
            .filter_map(|k| jwt_key(k)?.ok())
            .collect()
    }

    /// API key hashes valid at `now`.
    pub fn api_key_hashes(&self, now: Timestamp) -> impl Iterator<Item = &ApiKeyHash> {
        self.live_credentials(now).filter_map(|k| match k {
            KeyMaterial::ApiKeyHash { sha256 } => Some(sha256),
            _ => None,
        })
    }

    /// Whether a browser `Origin` may use this key.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .any(|p| origin_matches(p, origin))
    }
}

fn jwt_key(k: &KeyMaterial) -> Option<Result<JwtKey, KeyError>> {
    match k {
        KeyMaterial::JwtSecret { secret } => Some(JwtKey::hs256(secret.expose())),
        KeyMaterial::JwtPublicKey { alg, pem } => Some(JwtKey::from_public_pem(*alg, pem)),
        _ => None,
    }
}

fn split_origin(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    let ok_scheme = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+' || b == b'-');
    ok_scheme.then_some((scheme, rest))
}

fn valid_host_port(hp: &str) -> bool {
    let (host, port) = match hp.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hp, None),
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether an allowed-origin entry is well-formed.
pub fn valid_origin_pattern(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    let Some((_, rest)) = split_origin(p) else {
        return false;
    };
    let hp = rest.strip_prefix("*.").unwrap_or(rest);
    valid_host_port(hp)
}

/// Whether `origin` (as a browser sends it) matches the pattern. Scheme and
/// host compare case-insensitively; `*.` matches one or more labels.
pub fn origin_matches(pattern: &str, origin: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let origin = origin.to_ascii_lowercase();
    let Some((o_scheme, o_rest)) = split_origin(&origin) else {
        return false;
    };
    if !valid_host_port(o_rest) {
        return false;
    }
    let Some((p_scheme, p_rest)) = split_origin(pattern) else {
        return false;
    };
    if p_scheme != o_scheme {
        return false;
    }
    match p_rest.strip_prefix("*.") {
        Some(domain) => {
            o_rest.len() > domain.len() + 1
                && o_rest.ends_with(domain)
                && o_rest.as_bytes()[o_rest.len() - domain.len() - 1] == b'.'
        }
        None => p_rest == o_rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::api_key;

    fn record(method: AuthMethod, credentials: Vec<Credential>) -> ClientRecord {
        ClientRecord {
            id: "acme-web".into(),
            name: "Acme web".into(),
            method,
            credentials,
            jwt: None,
            permissions: Permissions::parse(["write:events"]).unwrap(),
            rate_limit: Some(RateLimit {
                limit: 100,
                period_secs: 60,
            }),
            ip_rate_limit: None,
            allowed_origins: vec![
                "https://acme.example".into(),
                "https://*.acme.example".into(),
            ],
            active: true,
            expires_at: None,
        }
    }

    fn hmac(secret: &[u8], not_after: Option<i64>) -> Credential {
        Credential {
            key: KeyMaterial::HmacSecret {
                secret: Secret::new(secret),
            },
            not_after: not_after.map(Timestamp),
        }
    }

    #[test]
    fn secrets_never_print_and_round_trip_as_base64url() {
        let r = record(AuthMethod::Hmac, vec![hmac(b"super-secret", None)]);
        assert!(!format!("{r:?}").contains("super-secret"));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("c3VwZXItc2VjcmV0"), "{json}");
        let back: ClientRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn rotation_keeps_the_old_secret_until_its_grace_period_ends() {
        let r = record(
            AuthMethod::Hmac,
            vec![hmac(b"old", Some(1_000)), hmac(b"new", None)],
        );
        assert_eq!(
            r.hmac_secrets(Timestamp(999)).collect::<Vec<_>>(),
            [b"old".as_slice(), b"new"]
        );
        assert_eq!(
            r.hmac_secrets(Timestamp(1_000)).collect::<Vec<_>>(),
            [b"new".as_slice()]
        );
    }

    #[test]
    fn inactive_or_expired_clients_are_unusable() {
        let mut r = record(AuthMethod::WriteKey, vec![]);
        assert_eq!(r.usable_at(Timestamp(5)), Ok(()));
        r.expires_at = Some(Timestamp(5));
        assert_eq!(r.usable_at(Timestamp(5)), Err(ErrorCode::ClientInactive));
        r.expires_at = None;
        r.active = false;
        assert_eq!(r.usable_at(Timestamp(5)), Err(ErrorCode::ClientInactive));
    }

    #[test]
    fn record_consistency_is_checked() {
        assert_eq!(record(AuthMethod::WriteKey, vec![]).check(), Ok(()));
        assert_eq!(
            record(AuthMethod::Hmac, vec![]).check(),
            Err(RecordError::NoCredential("hmac"))
        );
        assert!(matches!(
            record(AuthMethod::ApiKey, vec![hmac(b"x", None)]).check(),
            Err(RecordError::WrongMaterial(..))
        ));
        let short_jwt = Credential {
            key: KeyMaterial::JwtSecret {
                secret: Secret::new(b"short".to_vec()),
            },
            not_after: None,
        };
        assert_eq!(
            record(AuthMethod::Jwt, vec![short_jwt]).check(),
            Err(RecordError::Key(KeyError::SecretTooShort))
        );
        let mut bad_id = record(AuthMethod::WriteKey, vec![]);
        bad_id.id = "Acme_Web".into();
        assert_eq!(bad_id.check(), Err(RecordError::BadId));
        let mut bad_origin = record(AuthMethod::WriteKey, vec![]);
        bad_origin.allowed_origins = vec!["acme.example".into()];
        assert!(matches!(bad_origin.check(), Err(RecordError::BadOrigin(_))));
        let key = Credential {
            key: KeyMaterial::ApiKeyHash {
                sha256: api_key::hash("opk_acme-web_x"),
            },
            not_after: None,
        };
        let r = record(AuthMethod::ApiKey, vec![key]);
        assert_eq!(r.check(), Ok(()));
        assert!(api_key::verify(
            "opk_acme-web_x",
            r.api_key_hashes(Timestamp(0)).next().unwrap()
        ));
    }

    #[test]
    fn origin_table() {
        let cases = [
            ("https://acme.example", "https://acme.example", true),
            ("https://acme.example", "HTTPS://ACME.EXAMPLE", true),
            ("https://acme.example", "http://acme.example", false),
            ("https://acme.example", "https://acme.example:8443", false),
            ("https://acme.example", "https://acme.example.evil", false),
            ("https://*.acme.example", "https://app.acme.example", true),
            ("https://*.acme.example", "https://a.b.acme.example", true),
            ("https://*.acme.example", "https://acme.example", false),
            ("https://*.acme.example", "https://evilacme.example", false),
            (
                "https://*.acme.example",
                "https://x.acme.example/path",
                false,
            ),
            ("http://localhost:3000", "http://localhost:3000", true),
            ("*", "https://anything.example", true),
            ("https://acme.example", "null", false),
        ];
        for (pattern, origin, expected) in cases {
            assert_eq!(
                origin_matches(pattern, origin),
                expected,
                "{pattern} vs {origin}"
            );
        }
    }

    #[test]
    fn client_ids() {
        for ok in ["a", "acme-web", "0-1", &"a".repeat(64)] {
            assert!(is_valid_client_id(ok), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", &"a".repeat(65)] {
            assert!(!is_valid_client_id(bad), "{bad}");
        }
    }
}
