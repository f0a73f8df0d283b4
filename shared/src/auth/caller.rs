//! One check of a caller's credential against its client record, the same
//! for the edge pipeline and the aggregator's read API: the credential
//! verifies with one of the record's current keys, the record's method is
//! the credential's kind, and the client may act now.

use super::permission::Permissions;
use super::{api_key, jwt, signature};
use crate::ErrorCode;
use crate::client::{AuthMethod, ClientRecord};
use crate::event::Timestamp;

/// The credential a request presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// A browser write key: the client id itself. Names the client,
    /// proves nothing (the client's origins and limits do the rest).
    WriteKey(&'a str),
    /// An HMAC request signature, `X-Outpost-Key` naming the client.
    Signature {
        /// The client id.
        client_id: &'a str,
    },
    /// A JWT whose `kid` names the client.
    Jwt(&'a str),
    /// An API key (`opk_…`, which names the client).
    ApiKey(&'a str),
}

impl<'a> Credential<'a> {
    /// The credential of an `Authorization` header: `Bearer` with an API
    /// key or a JWT; `None` for any other scheme.
    pub fn bearer(authorization: &'a str) -> Option<Credential<'a>> {
        let token = authorization
            .strip_prefix("Bearer ")
            .or_else(|| authorization.strip_prefix("bearer "))?
            .trim();
        Some(if token.starts_with(api_key::PREFIX) {
            Credential::ApiKey(token)
        } else {
            Credential::Jwt(token)
        })
    }

    /// The client id the credential names, when it names one.
    pub fn client_id(&self) -> Option<String> {
        match self {
            Credential::WriteKey(id) | Credential::Signature { client_id: id } => {
                Some((*id).to_owned())
            }
            Credential::ApiKey(key) => api_key::client_id(key).map(str::to_owned),
            Credential::Jwt(token) => jwt::token_key_id(token),
        }
    }

    /// The method a client record must have for this credential.
    pub fn method(&self) -> AuthMethod {
        match self {
            Credential::WriteKey(_) => AuthMethod::WriteKey,
            Credential::Signature { .. } => AuthMethod::Hmac,
            Credential::Jwt(_) => AuthMethod::Jwt,
            Credential::ApiKey(_) => AuthMethod::ApiKey,
        }
    }
}

/// What a verified credential says besides naming its client.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    /// For a JWT, the permissions the token itself grants: a token speaks
    /// for a user of the client and may do only what both the record and
    /// the token allow.
    pub token_permissions: Option<Permissions>,
}

/// Checks `credential` against `record` at `now_ms`. An HMAC signature is
/// checked over `signed` (the edge builds it from the request; without it
/// a signature cannot verify), within `signature_window_secs`.
pub fn verify(
    credential: &Credential<'_>,
    record: &ClientRecord,
    signed: Option<&signature::SignedRequest<'_>>,
    now_ms: i64,
    signature_window_secs: u64,
) -> Result<Verified, ErrorCode> {
    let now = Timestamp(now_ms);
    let mut verified = Verified::default();
    match credential {
        Credential::WriteKey(_) => {}
        Credential::ApiKey(key) => {
            if !record.api_key_hashes(now).any(|h| api_key::verify(key, h)) {
                return Err(ErrorCode::InvalidSignature);
            }
        }
        Credential::Jwt(token) => {
            let policy = record.jwt.clone().unwrap_or_default();
            let mut result = Err(ErrorCode::UnknownKey);
            for k in &record.jwt_keys(now) {
                result = jwt::verify(token, k, &policy, now_ms / 1000);
                if result.is_ok() {
                    break;
                }
            }
            verified.token_permissions = Some(result?.permissions);
        }
        Credential::Signature { .. } => {
            let signed = signed.ok_or(ErrorCode::MissingCredentials)?;
            signature::verify(
                signed,
                record.hmac_secrets(now),
                now_ms / 1000,
                signature_window_secs,
            )?;
        }
    }
    if record.method != credential.method() {
        return Err(ErrorCode::UnknownKey);
    }
    record.usable_at(now)?;
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Credential as Material, KeyMaterial};

    fn api_key_client(key: &str) -> ClientRecord {
        ClientRecord {
            id: "acme-server".into(),
            name: "Acme server".into(),
            method: AuthMethod::ApiKey,
            credentials: vec![Material {
                key: KeyMaterial::ApiKeyHash {
                    sha256: api_key::hash(key),
                },
                not_after: None,
            }],
            jwt: None,
            permissions: Permissions::parse(["read:events"]).unwrap(),
            rate_limit: None,
            ip_rate_limit: None,
            allowed_origins: Vec::new(),
            active: true,
            expires_at: None,
        }
    }

    #[test]
    fn bearer_credentials_are_api_keys_or_jwts() {
        let key = api_key::format("acme-server", b"0123456789abcdef");
        let header = format!("Bearer {key}");
        assert_eq!(Credential::bearer(&header), Some(Credential::ApiKey(&key)));
        assert_eq!(
            Credential::bearer("bearer eyJ.x.y"),
            Some(Credential::Jwt("eyJ.x.y"))
        );
        assert_eq!(Credential::bearer("Basic dXNlcjpwdw=="), None);
        assert_eq!(
            Credential::ApiKey(&key).client_id().as_deref(),
            Some("acme-server")
        );
    }

    #[test]
    fn every_credential_kind_must_match_the_records_method() {
        let key = api_key::format("acme-server", b"0123456789abcdef");
        let record = api_key_client(&key);
        let now = 1_800_000_000_000;
        verify(&Credential::ApiKey(&key), &record, None, now, 300).unwrap();
        let wrong = api_key::format("acme-server", b"fedcba9876543210");
        assert_eq!(
            verify(&Credential::ApiKey(&wrong), &record, None, now, 300).unwrap_err(),
            ErrorCode::InvalidSignature
        );
        // The same record named by a write key or a JWT is refused: the
        // record's method decides how its client proves itself, whatever
        // the credential (the read API once checked it for API keys only).
        assert_eq!(
            verify(
                &Credential::WriteKey("acme-server"),
                &record,
                None,
                now,
                300
            )
            .unwrap_err(),
            ErrorCode::UnknownKey
        );
        assert_eq!(
            verify(&Credential::Jwt("eyJ.x.y"), &record, None, now, 300).unwrap_err(),
            ErrorCode::UnknownKey
        );
        // A signature with no signed request cannot verify.
        let sig = Credential::Signature {
            client_id: "acme-server",
        };
        assert_eq!(
            verify(&sig, &record, None, now, 300).unwrap_err(),
            ErrorCode::MissingCredentials
        );
        // A revoked client is refused after its credential verifies.
        let revoked = ClientRecord {
            active: false,
            ..record
        };
        assert_eq!(
            verify(&Credential::ApiKey(&key), &revoked, None, now, 300).unwrap_err(),
            ErrorCode::ClientInactive
        );
    }
}
