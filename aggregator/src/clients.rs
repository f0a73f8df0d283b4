//! Client records as the edges see them: `GET /internal/v1/clients/{id}`,
//! authenticated with an edge key through the shared request-signature
//! scheme (`X-Outpost-Key` = edge key id), answered from the `clients`
//! table. Unknown ids get `404` with code 40402, which the edge caches as a
//! negative answer.

use outpost_shared::ErrorCode;
use outpost_shared::auth::signature::{self, SignedRequest};
use outpost_shared::client::{ClientRecord, is_valid_client_id};
use outpost_shared::frame::KeyRing;
use sqlx::PgPool;

/// Where records live.
#[derive(Clone)]
pub struct ClientStore {
    pool: PgPool,
}

impl ClientStore {
    /// A store on the aggregator's PostgreSQL.
    pub fn new(pool: PgPool) -> ClientStore {
        ClientStore { pool }
    }

    /// The record for `id`; `Ok(None)` when there is none.
    pub async fn get(&self, id: &str) -> Result<Option<ClientRecord>, sqlx::Error> {
        if !is_valid_client_id(id) {
            return Ok(None);
        }
        let row: Option<sqlx::types::Json<ClientRecord>> =
            sqlx::query_scalar("SELECT record FROM clients WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.0))
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
