//! Page cursors: opaque, signed, bound to the query they belong to.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::params::Query;

#[derive(Serialize, Deserialize)]
pub(super) struct CursorBody {
    /// Key of the row the page starts after: (ts in µs, id).
    pub(super) ts: i64,
    pub(super) id: i64,
    /// Walk forward (in the query's order) or backward.
    pub(super) forward: bool,
    /// Digest of the query it belongs to.
    pub(super) q: String,
}

/// Signs and checks cursors.
pub struct CursorKey(Vec<u8>);

impl CursorKey {
    /// A key derived from a server secret (domain-separated).
    pub fn derive(secret: &[u8]) -> CursorKey {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
        m.update(b"outpost query cursor v1");
        CursorKey(m.finalize().into_bytes().to_vec())
    }

    /// A short digest of the key, to tell two keys apart without showing
    /// either (tests, logs).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        hex::encode(&Sha256::digest(&self.0)[..8])
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length")
    }

    pub(super) fn seal(&self, c: &CursorBody) -> String {
        let body = serde_json::to_vec(c).unwrap_or_default();
        let mut m = self.mac();
        m.update(&body);
        format!(
            "{}.{}",
            B64.encode(&body),
            B64.encode(m.finalize().into_bytes())
        )
    }

    pub(super) fn open(&self, s: &str) -> Option<CursorBody> {
        let (body, tag) = s.split_once('.')?;
        let body = B64.decode(body).ok()?;
        let tag = B64.decode(tag).ok()?;
        let mut m = self.mac();
        m.update(&body);
        m.verify_slice(&tag).ok()?;
        serde_json::from_slice(&body).ok()
    }
}

/// What a cursor belongs to: the query's filters, range and order. The
/// page size is not part of it: a client may ask for larger or smaller
/// pages as it goes (README, "Reading events").
pub(super) fn digest(q: &Query) -> String {
    use sha2::Digest as _;
    let mut without_limit = q.clone();
    without_limit.limit = 0;
    hex::encode(&Sha256::digest(serde_json::to_vec(&without_limit).unwrap_or_default())[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_refuse_tampering_and_other_keys() {
        let key = CursorKey::derive(b"secret");
        let c = key.seal(&CursorBody {
            ts: 5,
            id: 7,
            forward: true,
            q: "abc".into(),
        });
        assert_eq!(key.open(&c).map(|b| (b.ts, b.id)), Some((5, 7)));
        let mut tampered = c.clone().into_bytes();
        tampered[3] ^= 1;
        assert!(key.open(&String::from_utf8_lossy(&tampered)).is_none());
        assert!(CursorKey::derive(b"other").open(&c).is_none());
        assert!(key.open("garbage").is_none());
    }
}
