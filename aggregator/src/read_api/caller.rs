//! Who is asking: `Authorization: Bearer` with an API key or a JWT.

use outpost_shared::ErrorCode;
use outpost_shared::auth::caller::{self, Credential};
use outpost_shared::auth::permission::Permissions;
use outpost_shared::client::ClientRecord;

use super::QueryError;
use crate::clients::ClientStore;

/// Every permission the read API checks, as (action, resource).
const READ_API_GRANTS: &[(&str, &str)] =
    &[("read", "events"), ("read", "stats"), ("admin", "events")];

/// Who is asking, from `Authorization: Bearer …` (API key or JWT),
/// checked by the same rule as the edge (`outpost_shared::auth::caller`).
/// For a JWT the answer's permissions are those the client record and the
/// token both grant.
pub async fn caller(
    store: &ClientStore,
    authorization: Option<&str>,
    now_ms: i64,
) -> Result<ClientRecord, QueryError> {
    let credential = authorization.and_then(Credential::bearer).ok_or_else(|| {
        QueryError(
            ErrorCode::MissingCredentials,
            "send Authorization: Bearer <API key or JWT>".into(),
        )
    })?;
    let id = credential.client_id().ok_or_else(|| match credential {
        Credential::Jwt(_) => QueryError(ErrorCode::MalformedToken, "no kid in the token".into()),
        _ => QueryError(ErrorCode::UnknownKey, "unknown key".into()),
    })?;
    let mut record = store
        .get(&id)
        .await
        .map_err(|e| {
            let message = e.to_string();
            QueryError(ErrorCode::from(e), message)
        })?
        .ok_or_else(|| QueryError(ErrorCode::UnknownKey, "unknown key".into()))?;
    // No signature window: the read API takes bearer credentials only.
    let verified = caller::verify(&credential, &record, None, now_ms, 0).map_err(|c| {
        let message = match c {
            ErrorCode::InvalidSignature => "the API key does not verify",
            other => other.message(),
        };
        QueryError(c, message.into())
    })?;
    if let Some(token) = verified.token_permissions {
        record.permissions = Permissions::parse(
            READ_API_GRANTS
                .iter()
                .filter(|(a, r)| record.permissions.allows(a, r) && token.allows(a, r))
                .map(|(a, r)| match (*a, *r) {
                    ("read", "events") => "read:events",
                    ("read", "stats") => "read:stats",
                    _ => "admin:events",
                }),
        )
        .unwrap_or_default();
    }
    Ok(record)
}
