//! The fixture clients of the edge's tests: `pipeline_tests.rs` and the
//! conformance suite both runtimes pass (`tests/edge_conformance.rs`) use
//! this one set, so a case means the same client in both. Test data only;
//! nothing in the edge calls it (and the wasm builds leave it out).

use outpost_shared::auth::api_key;
use outpost_shared::auth::jwt::JwtAlgorithm;
use outpost_shared::auth::permission::Permissions;
use outpost_shared::client::{AuthMethod, ClientRecord, Credential, KeyMaterial, Secret};
use outpost_shared::event::Timestamp;
use outpost_shared::ratelimit::RateLimit;

/// `server`'s HMAC secret.
pub const HMAC_SECRET: &[u8] = b"conformance-hmac-secret";
/// `app`'s HS256 secret.
pub const JWT_SECRET: &[u8] = b"conformance-jwt-secret-0123456789";
/// The one browser origin the clients allow.
pub const ORIGIN: &str = "https://shop.example";
/// The secret part of `backend`'s API key ([`api_key`]).
pub const API_KEY_SECRET: &[u8] = b"s3cret";
/// `rsapp`'s RS256 public key (the private one is beside it, for signing).
pub const RS256_PUBLIC_PEM: &str = include_str!("../../shared/src/auth/testdata/rs256.pub.pem");

/// `backend`'s API key.
pub fn api_key() -> String {
    api_key::format("backend", API_KEY_SECRET)
}

/// An active client allowed to write from [`ORIGIN`], with `key` as its
/// one credential.
pub fn record(id: &str, method: AuthMethod, key: Option<KeyMaterial>) -> ClientRecord {
    ClientRecord {
        id: id.into(),
        name: id.into(),
        method,
        credentials: key
            .map(|key| {
                vec![Credential {
                    key,
                    not_after: None,
                }]
            })
            .unwrap_or_default(),
        jwt: None,
        permissions: Permissions::parse(["write:events"]).unwrap_or_default(),
        rate_limit: None,
        ip_rate_limit: None,
        allowed_origins: vec![ORIGIN.into()],
        active: true,
        expires_at: None,
    }
}

/// Every fixture client: `web` (write key), `server` (HMAC), `app` (HS256
/// JWT), `rsapp` (RS256 JWT), `backend` (API key), `revoked`, `limited`
/// (2 per minute), `readonly` (no `write:events`), `perip` (1 per minute
/// per address), `expired`, and `rotated` (an API key past its grace).
pub fn clients() -> Vec<ClientRecord> {
    vec![
        record("web", AuthMethod::WriteKey, None),
        record(
            "server",
            AuthMethod::Hmac,
            Some(KeyMaterial::HmacSecret {
                secret: Secret::new(HMAC_SECRET.to_vec()),
            }),
        ),
        record(
            "app",
            AuthMethod::Jwt,
            Some(KeyMaterial::JwtSecret {
                secret: Secret::new(JWT_SECRET.to_vec()),
            }),
        ),
        record(
            "rsapp",
            AuthMethod::Jwt,
            Some(KeyMaterial::JwtPublicKey {
                alg: JwtAlgorithm::Rs256,
                pem: RS256_PUBLIC_PEM.to_owned(),
            }),
        ),
        record(
            "backend",
            AuthMethod::ApiKey,
            Some(KeyMaterial::ApiKeyHash {
                sha256: api_key::hash(&api_key()),
            }),
        ),
        ClientRecord {
            active: false,
            ..record("revoked", AuthMethod::WriteKey, None)
        },
        ClientRecord {
            rate_limit: Some(RateLimit {
                limit: 2,
                period_secs: 60,
            }),
            ..record("limited", AuthMethod::WriteKey, None)
        },
        ClientRecord {
            permissions: Permissions::parse(["read:events"]).unwrap_or_default(),
            ..record("readonly", AuthMethod::WriteKey, None)
        },
        ClientRecord {
            ip_rate_limit: Some(RateLimit {
                limit: 1,
                period_secs: 60,
            }),
            ..record("perip", AuthMethod::WriteKey, None)
        },
        ClientRecord {
            expires_at: Some(Timestamp(1_000)),
            ..record("expired", AuthMethod::WriteKey, None)
        },
        // An API key rotated away: the old credential's grace period is over.
        ClientRecord {
            credentials: vec![Credential {
                key: KeyMaterial::ApiKeyHash {
                    sha256: api_key::hash(&api_key::format("rotated", b"old")),
                },
                not_after: Some(Timestamp(1_000)),
            }],
            ..record("rotated", AuthMethod::ApiKey, None)
        },
    ]
}
