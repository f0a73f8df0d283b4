//! Client records: stored in the `clients` table (PostgreSQL or SQLite), managed with
//! `outpost clients …`, served to edges on `GET /internal/v1/clients/{id}`
//! (signed with an edge key).
//!
//! Secrets that must be readable again to verify requests (HMAC secrets,
//! HS256 JWT secrets) are sealed at rest with ChaCha20-Poly1305 under
//! `OUTPOST_SECRETS_KEY` (32 bytes, base64url), bound to their client id;
//! API keys are stored only as SHA-256, public keys as they are. A database
//! dump alone yields no usable credential.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use outpost_shared::ErrorCode;
use outpost_shared::auth::signature::{self, SignedRequest};
use outpost_shared::client::{ClientRecord, KeyMaterial, Secret, is_valid_client_id};
use outpost_shared::frame::KeyRing;
use sqlx::types::Json;

use crate::db::Db;

/// The environment variable holding the sealing key.
pub const SECRETS_KEY_ENV: &str = "OUTPOST_SECRETS_KEY";

/// Why a record could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A secret needs sealing or unsealing and no key is configured.
    #[error("{SECRETS_KEY_ENV} is not set: it is needed to store or read client secrets")]
    NoKey,
    /// A sealed secret does not open with the configured key.
    #[error("a client secret does not unseal with {SECRETS_KEY_ENV} (wrong key?)")]
    Unseal,
}

/// The key secrets are sealed with.
#[derive(Clone)]
pub struct SecretsKey(ChaCha20Poly1305);

impl SecretsKey {
    /// From base64url of 32 bytes.
    pub fn from_base64(s: &str) -> anyhow::Result<SecretsKey> {
        let bytes = B64
            .decode(s.trim().as_bytes())
            .map_err(|_| anyhow::anyhow!("{SECRETS_KEY_ENV} must be base64url"))?;
        anyhow::ensure!(
            bytes.len() == 32,
            "{SECRETS_KEY_ENV} must be 32 bytes (base64url)"
        );
        Ok(SecretsKey(
            ChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| anyhow::anyhow!("bad key"))?,
        ))
    }

    /// From the environment, if set.
    pub fn from_env() -> anyhow::Result<Option<SecretsKey>> {
        std::env::var(SECRETS_KEY_ENV)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| SecretsKey::from_base64(&v))
            .transpose()
    }

    fn seal(&self, client_id: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let nonce = random_bytes::<12>();
        let ct = self
            .0
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: client_id.as_bytes(),
                },
            )
            .map_err(|_| StoreError::Unseal)?;
        Ok([nonce.as_slice(), &ct].concat())
    }

    fn unseal(&self, client_id: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        if sealed.len() < 12 {
            return Err(StoreError::Unseal);
        }
        let (nonce, ct) = sealed.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| StoreError::Unseal)?;
        self.0
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: client_id.as_bytes(),
                },
            )
            .map_err(|_| StoreError::Unseal)
    }
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS generator failing is not something to continue past.
    getrandom::getrandom(&mut b).unwrap_or_else(|e| panic!("no OS randomness: {e}"));
    b
}

/// Seals (`seal`) or unseals every secret of a record in place.
fn map_secrets(record: &mut ClientRecord, key: &SecretsKey, seal: bool) -> Result<(), StoreError> {
    let id = record.id.clone();
    for c in &mut record.credentials {
        match &mut c.key {
            KeyMaterial::HmacSecret { secret } | KeyMaterial::JwtSecret { secret } => {
                let bytes = if seal {
                    key.seal(&id, secret.expose())?
                } else {
                    key.unseal(&id, secret.expose())?
                };
                *secret = Secret::new(bytes);
            }
            KeyMaterial::JwtPublicKey { .. } | KeyMaterial::ApiKeyHash { .. } => {}
        }
    }
    Ok(())
}

fn has_secrets(record: &ClientRecord) -> bool {
    record.credentials.iter().any(|c| {
        matches!(
            c.key,
            KeyMaterial::HmacSecret { .. } | KeyMaterial::JwtSecret { .. }
        )
    })
}

/// Where records live.
#[derive(Clone)]
pub struct ClientStore {
    db: Db,
    key: Option<SecretsKey>,
}

impl ClientStore {
    /// A store on the aggregator's database.
    pub fn new(db: Db, key: Option<SecretsKey>) -> ClientStore {
        ClientStore { db, key }
    }

    /// The record for `id`, secrets unsealed; `Ok(None)` when there is none.
    pub async fn get(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
        if !is_valid_client_id(id) {
            return Ok(None);
        }
        let row: Option<Json<ClientRecord>> = match &self.db {
            Db::Postgres(p) => {
                sqlx::query_scalar("SELECT record FROM clients WHERE id = $1")
                    .bind(id)
                    .fetch_optional(p)
                    .await?
            }
            Db::Sqlite(p) => {
                sqlx::query_scalar("SELECT record FROM clients WHERE id = ?")
                    .bind(id)
                    .fetch_optional(p)
                    .await?
            }
        };
        let Some(mut record) = row.map(|r| r.0) else {
            return Ok(None);
        };
        if has_secrets(&record) {
            let key = self.key.as_ref().ok_or(StoreError::NoKey)?;
            map_secrets(&mut record, key, false)?;
        }
        Ok(Some(record))
    }

    /// Every record, secrets left sealed (for listings).
    pub async fn list(&self) -> Result<Vec<ClientRecord>, StoreError> {
        const SQL: &str = "SELECT record FROM clients ORDER BY id";
        let rows: Vec<Json<ClientRecord>> = match &self.db {
            Db::Postgres(p) => sqlx::query_scalar(SQL).fetch_all(p).await?,
            Db::Sqlite(p) => sqlx::query_scalar(SQL).fetch_all(p).await?,
        };
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Inserts or replaces a record, sealing its secrets.
    pub async fn put(&self, record: &ClientRecord) -> Result<(), StoreError> {
        let mut sealed = record.clone();
        if has_secrets(&sealed) {
            let key = self.key.as_ref().ok_or(StoreError::NoKey)?;
            map_secrets(&mut sealed, key, true)?;
        }
        match &self.db {
            Db::Postgres(p) => {
                sqlx::query(
                    "INSERT INTO clients (id, record) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record, updated_at = now()",
                )
                .bind(record.id.as_str())
                .bind(Json(&sealed))
                .execute(p)
                .await?;
            }
            Db::Sqlite(p) => {
                sqlx::query(
                    "INSERT INTO clients (id, record, updated_at) VALUES (?, ?, unixepoch()) \
                     ON CONFLICT (id) DO UPDATE SET record = excluded.record, updated_at = excluded.updated_at",
                )
                .bind(record.id.as_str())
                .bind(Json(&sealed))
                .execute(p)
                .await?;
            }
        }
        Ok(())
    }

    /// Deletes a record; whether one existed.
    pub async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let done = match &self.db {
            Db::Postgres(p) => sqlx::query("DELETE FROM clients WHERE id = $1")
                .bind(id)
                .execute(p)
                .await?
                .rows_affected(),
            Db::Sqlite(p) => sqlx::query("DELETE FROM clients WHERE id = ?")
                .bind(id)
                .execute(p)
                .await?
                .rows_affected(),
        };
        Ok(done > 0)
    }
}

impl From<StoreError> for ErrorCode {
    fn from(e: StoreError) -> ErrorCode {
        match e {
            StoreError::Db(_) => ErrorCode::DependencyUnavailable,
            StoreError::NoKey | StoreError::Unseal => ErrorCode::Internal,
        }
    }
}

/// Verifies that a request was signed by an edge key of the ring.
pub fn verify_edge_request(
    ring: &KeyRing,
    req: &SignedRequest<'_>,
    key_id: &str,
    now_secs: i64,
) -> Result<(), ErrorCode> {
    let secret = ring.get(key_id).ok_or(ErrorCode::InvalidSignature)?;
    signature::verify(
        req,
        [secret.expose()],
        now_secs,
        signature::DEFAULT_WINDOW_SECS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_client() {
        let key = SecretsKey::from_base64(&B64.encode([7u8; 32])).unwrap();
        let sealed = key.seal("acme", b"secret").unwrap();
        assert_ne!(&sealed[12..], b"secret");
        assert_eq!(key.unseal("acme", &sealed).unwrap(), b"secret");
        assert!(
            key.unseal("other", &sealed).is_err(),
            "bound to the client id"
        );
        let other = SecretsKey::from_base64(&B64.encode([8u8; 32])).unwrap();
        assert!(other.unseal("acme", &sealed).is_err());
        assert!(key.unseal("acme", &sealed[..5]).is_err());
        assert!(SecretsKey::from_base64("short").is_err());
    }
}
