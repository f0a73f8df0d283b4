//! Sealing: authenticated encryption for client records outside the
//! aggregator's own sealed store.
//!
//! A client record holds secrets (HMAC and HS256 secrets). The aggregator
//! keeps them sealed under `OUTPOST_SECRETS_KEY`; on their way to an edge
//! (`GET /internal/v1/clients/{id}`) and in the edge's KV cache they are
//! sealed too, under keys derived from the edge key, so that neither a
//! proxy that logs bodies nor someone who can read the platform's KV learns
//! a usable credential. Each use has its own derived key (the `purpose`),
//! and each sealed value is bound to where it belongs (the `context`: the
//! record's id and the request it answers, or the KV key), so a value cannot
//! be moved to another place and still open.
//!
//! Format: one version byte (`1`), a 12-byte nonce, then the
//! ChaCha20-Poly1305 ciphertext with its 16-byte tag. The nonce is the
//! caller's fresh randomness: this crate reads none.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key of `/internal/v1/clients/{id}` answers.
pub const PURPOSE_CLIENT_RECORD: &str = "client record";
/// The key of the edge's cached client records.
pub const PURPOSE_EDGE_CACHE: &str = "edge cache";
/// Media type of a sealed client record answer.
pub const SEALED_RECORD_CONTENT_TYPE: &str = "application/vnd.outpost.sealed-client";

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
/// Bytes a sealed value adds to its plain text.
pub const OVERHEAD: usize = 1 + NONCE_LEN + 16;

/// A derived sealing key.
#[derive(Clone)]
pub struct SealKey(ChaCha20Poly1305);

impl core::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SealKey(***)")
    }
}

impl SealKey {
    /// The key for `purpose`, derived from `secret` (an edge key's):
    /// HMAC-SHA256(secret, "outpost seal v1 " + purpose).
    pub fn derive(secret: &[u8], purpose: &str) -> SealKey {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
        m.update(b"outpost seal v1 ");
        m.update(purpose.as_bytes());
        let key = m.finalize().into_bytes();
        SealKey(ChaCha20Poly1305::new(&key))
    }

    /// Seals `plain`, bound to `context`, with `nonce` (fresh random bytes:
    /// a nonce must never be used twice with one key).
    pub fn seal(&self, nonce: [u8; NONCE_LEN], context: &[u8], plain: &[u8]) -> Vec<u8> {
        let ciphertext = self
            .0
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: context,
                },
            )
            .expect("records are far below ChaCha20-Poly1305's 256 GiB bound");
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// The plain text of a value sealed with this key and `context`;
    /// `None` for anything else (another key or context, altered bytes,
    /// another version, too short).
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != VERSION || rest.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        self.0
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .ok()
    }
}

/// What a sealed client-record answer is bound to: the record's id and the
/// signed timestamp of the lookup it answers, so that an old answer (say,
/// from before a revocation) cannot be replayed for a later lookup.
pub fn client_record_context(client_id: &str, lookup_timestamp: i64) -> Vec<u8> {
    format!("client-record\n{client_id}\n{lookup_timestamp}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_context() {
        let key = SealKey::derive(b"edge-secret", PURPOSE_CLIENT_RECORD);
        let ctx = client_record_context("web", 1_800_000_000);
        let sealed = key.seal([7; 12], &ctx, b"{\"id\":\"web\"}");
        assert_eq!(sealed.len(), OVERHEAD + 12);
        assert_eq!(
            key.open(&ctx, &sealed).as_deref(),
            Some(&b"{\"id\":\"web\"}"[..])
        );

        let other_purpose = SealKey::derive(b"edge-secret", PURPOSE_EDGE_CACHE);
        let other_secret = SealKey::derive(b"other-secret", PURPOSE_CLIENT_RECORD);
        assert_eq!(other_purpose.open(&ctx, &sealed), None);
        assert_eq!(other_secret.open(&ctx, &sealed), None);
        assert_eq!(
            key.open(&client_record_context("web", 1_800_000_001), &sealed),
            None,
            "an answer to another lookup"
        );
        assert_eq!(
            key.open(&client_record_context("app", 1_800_000_000), &sealed),
            None
        );
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 1;
            assert_eq!(key.open(&ctx, &altered), None, "byte {i} altered");
        }
        assert_eq!(key.open(&ctx, &sealed[..sealed.len() - 1]), None);
        assert_eq!(key.open(&ctx, &[]), None);
    }

    #[test]
    fn the_plain_text_does_not_show() {
        let key = SealKey::derive(b"k", PURPOSE_EDGE_CACHE);
        let sealed = key.seal([1; 12], b"client:web", b"super-secret-hmac-key");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(format!("{key:?}"), "SealKey(***)");
    }
}
