//! API keys for simple server-to-server calls.
//!
//! A key reads `opk_<client id>_<secret>`: the client id lets the edge find
//! the record without a second header; the record stores only the SHA-256 of
//! the whole key, so a database leak reveals no usable key. Comparison is
//! constant-time.

use core::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::client::is_valid_client_id;

/// Every API key starts with this.
pub const PREFIX: &str = "opk_";
/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// The SHA-256 of an API key: all a record keeps. Hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ApiKeyHash(pub [u8; 32]);

impl fmt::Debug for ApiKeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyHash({})", hex::encode(self.0))
    }
}

impl Serialize for ApiKeyHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for ApiKeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out)
            .map_err(|_| serde::de::Error::custom("expected 64 hex digits"))?;
        Ok(ApiKeyHash(out))
    }
}

/// Hashes a key for storage.
pub fn hash(key: &str) -> ApiKeyHash {
    ApiKeyHash(Sha256::digest(key.as_bytes()).into())
}

/// Whether `presented` is the key whose hash is `stored` (constant-time).
pub fn verify(presented: &str, stored: &ApiKeyHash) -> bool {
    if presented.len() > MAX_KEY_BYTES {
        return false;
    }
    hash(presented).0.ct_eq(&stored.0).into()
}

/// Builds a key from a client id and random secret bytes (the caller owns
/// the randomness: `shared` has no RNG). The secret is base64url.
pub fn format(client_id: &str, secret: &[u8]) -> String {
    use base64::Engine as _;
    let s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    format!("{PREFIX}{client_id}_{s}")
}

/// The client id inside a key, if the key has the right shape.
pub fn client_id(key: &str) -> Option<&str> {
    if key.len() > MAX_KEY_BYTES {
        return None;
    }
    let rest = key.strip_prefix(PREFIX)?;
    // Client ids hold no `_`, so the first one ends the id.
    let (id, secret) = rest.split_once('_')?;
    (is_valid_client_id(id) && !secret.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_verifies_only_against_its_own_hash() {
        let key = format("acme-web", &[7u8; 32]);
        assert!(key.starts_with("opk_acme-web_"));
        let stored = hash(&key);
        assert!(verify(&key, &stored));
        assert!(!verify(&format("acme-web", &[8u8; 32]), &stored));
        assert!(!verify("", &stored));
        assert!(!verify(&"x".repeat(MAX_KEY_BYTES + 1), &stored));
    }

    #[test]
    fn client_id_is_read_from_the_key() {
        assert_eq!(
            client_id("opk_acme-web_c2VjcmV0_with_underscores"),
            Some("acme-web")
        );
        for bad in [
            "acme_x",
            "opk_",
            "opk_acme",
            "opk_acme_",
            "opk_ACME_x",
            "opk__x",
        ] {
            assert_eq!(client_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn hash_serializes_as_hex_and_refuses_garbage() {
        let h = hash("opk_a_b");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json.len(), 66);
        assert_eq!(serde_json::from_str::<ApiKeyHash>(&json).unwrap(), h);
        assert!(serde_json::from_str::<ApiKeyHash>("\"abcd\"").is_err());
    }
}
