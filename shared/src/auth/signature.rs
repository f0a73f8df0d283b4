//! HMAC-SHA256 request signatures, for servers and mobile apps.
//!
//! The caller sends four headers:
//!
//! | header | value |
//! | --- | --- |
//! | `X-Outpost-Key` | the client id |
//! | `X-Outpost-Timestamp` | Unix seconds when the request was signed |
//! | `X-Outpost-Nonce` | optional: a unique string, at most 64 bytes of `[A-Za-z0-9._~-]` |
//! | `X-Outpost-Signature` | lower-case hex HMAC-SHA256 of the canonical string |
//!
//! The canonical string is six lines joined by `\n` (no trailing newline):
//!
//! ```text
//! OUTPOST-HMAC-SHA256
//! <METHOD, upper case>
//! <path and query exactly as sent, e.g. /v1/batch?x=1>
//! <timestamp, decimal Unix seconds>
//! <nonce, or empty>
//! <lower-case hex SHA-256 of the exact body bytes>
//! ```
//!
//! The first line separates these signatures from any other use of the key.
//! The README has a worked test vector, verified in CI with Python's own
//! `hmac`, so every client language can be checked against it.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::ErrorCode;
use crate::kv::Kv;

/// The first line of the canonical string.
pub const SCHEME: &str = "OUTPOST-HMAC-SHA256";
/// Header carrying the client id.
pub const HEADER_KEY: &str = "x-outpost-key";
/// Header carrying the signing time, Unix seconds.
pub const HEADER_TIMESTAMP: &str = "x-outpost-timestamp";
/// Header carrying the optional nonce.
pub const HEADER_NONCE: &str = "x-outpost-nonce";
/// Header carrying the hex signature.
pub const HEADER_SIGNATURE: &str = "x-outpost-signature";
/// Longest nonce accepted, in bytes.
pub const MAX_NONCE_BYTES: usize = 64;
/// The default accepted clock difference, either way, in seconds.
pub const DEFAULT_WINDOW_SECS: u64 = 300;

/// What a signed request claims; read from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path and query as sent.
    pub path_and_query: &'a str,
    /// Claimed signing time, Unix seconds (the header, unparsed).
    pub timestamp: &'a str,
    /// Optional nonce.
    pub nonce: Option<&'a str>,
    /// Exact body bytes.
    pub body: &'a [u8],
    /// The hex signature presented.
    pub signature: &'a str,
}

/// Hex SHA-256 of a body (the last line of the canonical string).
pub fn body_sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Builds the canonical string (see the module documentation).
pub fn canonical_string(
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: Option<&str>,
    body: &[u8],
) -> String {
    canonical_with_hash(
        method,
        path_and_query,
        &timestamp.to_string(),
        nonce,
        &body_sha256_hex(body),
    )
}

fn canonical_with_hash(
    method: &str,
    path_and_query: &str,
    timestamp: &str,
    nonce: Option<&str>,
    body_hash: &str,
) -> String {
    format!(
        "{SCHEME}\n{}\n{path_and_query}\n{timestamp}\n{}\n{body_hash}",
        method.to_ascii_uppercase(),
        nonce.unwrap_or("")
    )
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts any key length")
}

/// Signs a request: the lower-case hex signature for `X-Outpost-Signature`.
pub fn sign(
    secret: &[u8],
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: Option<&str>,
    body: &[u8],
) -> String {
    let mut m = mac(secret);
    m.update(canonical_string(method, path_and_query, timestamp, nonce, body).as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// Verifies a signature against one or more secrets (several during a
/// rotation's grace period), then checks the timestamp window.
///
/// Pure: `now_secs` is the caller's clock. The nonce, if any, must then be
/// checked with [`remember_nonce`]; only a verified request may touch KV, so
/// that unauthenticated traffic cannot fill it.
pub fn verify<'s>(
    request: &SignedRequest<'_>,
    secrets: impl IntoIterator<Item = &'s [u8]>,
    now_secs: i64,
    window_secs: u64,
) -> Result<(), ErrorCode> {
    let ts: i64 = parse_timestamp(request.timestamp).ok_or(ErrorCode::TimestampOutsideWindow)?;
    if let Some(n) = request.nonce
        && !valid_nonce(n)
    {
        return Err(ErrorCode::InvalidSignature);
    }
    let presented = decode_signature(request.signature).ok_or(ErrorCode::InvalidSignature)?;
    let canonical = canonical_with_hash(
        request.method,
        request.path_and_query,
        request.timestamp,
        request.nonce,
        &body_sha256_hex(request.body),
    );
    let mut matched = false;
    for secret in secrets {
        let mut m = mac(secret);
        m.update(canonical.as_bytes());
        // verify_slice compares in constant time.
        matched |= m.verify_slice(&presented).is_ok();
    }
    if !matched {
        return Err(ErrorCode::InvalidSignature);
    }
    // The window is checked after the signature so that a forged request
    // learns nothing about the clock; both fail closed.
    let window = i64::try_from(window_secs).unwrap_or(i64::MAX);
    if now_secs.abs_diff(ts) > window.unsigned_abs() {
        return Err(ErrorCode::TimestampOutsideWindow);
    }
    Ok(())
}

/// Remembers a verified request's nonce for the window; a nonce seen before
/// is a replay. The KV key is scoped to the client.
///
/// KV is eventually consistent across points of presence: this stops
/// replays at one PoP, and the aggregator's dedup stops the rest.
pub async fn remember_nonce<K: Kv>(
    kv: &K,
    client_id: &str,
    nonce: &str,
    window_secs: u64,
) -> Result<(), NonceError<K::Error>> {
    let key = format!("nonce:{client_id}:{nonce}");
    if kv.get(&key).await.map_err(NonceError::Kv)?.is_some() {
        return Err(NonceError::Reused);
    }
    // Both sides of the window: a timestamp may be up to `window` early or late.
    kv.put(&key, b"1", window_secs.saturating_mul(2))
        .await
        .map_err(NonceError::Kv)
}

/// Why a nonce was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum NonceError<E> {
    /// Seen before within the window: a replay.
    Reused,
    /// The KV store failed.
    Kv(E),
}

fn parse_timestamp(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn valid_nonce(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NONCE_BYTES
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// Lower-case hex only, as documented: a signature in another form is a
/// client bug worth a clear `40103` rather than silent acceptance.
fn decode_signature(s: &str) -> Option<[u8; 32]> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemoryKv;

    const SECRET: &[u8] = b"outpost-test-secret";
    const NOW: i64 = 1_767_225_600;

    fn req<'a>(
        sig: &'a str,
        ts: &'a str,
        nonce: Option<&'a str>,
        body: &'a [u8],
    ) -> SignedRequest<'a> {
        SignedRequest {
            method: "POST",
            path_and_query: "/v1/batch",
            timestamp: ts,
            nonce,
            body,
            signature: sig,
        }
    }

    #[test]
    fn canonical_string_has_the_documented_six_lines() {
        let c = canonical_string("post", "/v1/batch?x=1", 1_767_225_600, Some("n-1"), b"");
        assert_eq!(
            c,
            "OUTPOST-HMAC-SHA256\nPOST\n/v1/batch?x=1\n1767225600\nn-1\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let no_nonce = canonical_string("GET", "/", 0, None, b"");
        assert_eq!(no_nonce.lines().count(), 6);
        assert_eq!(no_nonce.lines().nth(4), Some(""));
    }

    #[test]
    fn signature_verification_table() {
        let body = br#"{"batch":[]}"#;
        let good = sign(SECRET, "POST", "/v1/batch", NOW, Some("n-1"), body);
        let ts = NOW.to_string();
        let old = (NOW - 301).to_string();
        let old_sig = sign(SECRET, "POST", "/v1/batch", NOW - 301, Some("n-1"), body);
        let edge = (NOW + 300).to_string();
        let edge_sig = sign(SECRET, "POST", "/v1/batch", NOW + 300, Some("n-1"), body);
        let upper = good.to_uppercase();
        let cases: Vec<(&str, SignedRequest<'_>, Result<(), ErrorCode>)> = vec![
            ("valid", req(&good, &ts, Some("n-1"), body), Ok(())),
            (
                "other body",
                req(&good, &ts, Some("n-1"), b"{}"),
                Err(ErrorCode::InvalidSignature),
            ),
            (
                "other nonce",
                req(&good, &ts, Some("n-2"), body),
                Err(ErrorCode::InvalidSignature),
            ),
            (
                "nonce dropped",
                req(&good, &ts, None, body),
                Err(ErrorCode::InvalidSignature),
            ),
            (
                "bad nonce chars",
                req(&good, &ts, Some("a b"), body),
                Err(ErrorCode::InvalidSignature),
            ),
            (
                "garbage signature",
                req("zz", &ts, Some("n-1"), body),
                Err(ErrorCode::InvalidSignature),
            ),
            (
                "short signature",
                req(&good[..62], &ts, Some("n-1"), body),
                Err(ErrorCode::InvalidSignature),
            ),
            (
                "upper-case hex (documented: lower case)",
                req(&upper, &ts, Some("n-1"), body),
                Err(ErrorCode::InvalidSignature),
            ),
            (
                "non-numeric timestamp",
                req(&good, "soon", Some("n-1"), body),
                Err(ErrorCode::TimestampOutsideWindow),
            ),
            (
                // Found by the fuzzer: near i64::MIN, `ts - now` overflows.
                "timestamp near i64::MIN",
                req(&good, "-9223372036854775800", Some("n-1"), body),
                Err(ErrorCode::TimestampOutsideWindow),
            ),
            (
                "timestamp too long to be seconds",
                req(&good, "9223372036854775800", Some("n-1"), body),
                Err(ErrorCode::TimestampOutsideWindow),
            ),
            (
                "signed 301 s ago",
                req(&old_sig, &old, Some("n-1"), body),
                Err(ErrorCode::TimestampOutsideWindow),
            ),
            (
                "signed 300 s ahead",
                req(&edge_sig, &edge, Some("n-1"), body),
                Ok(()),
            ),
        ];
        for (what, r, expected) in cases {
            assert_eq!(
                verify(&r, [SECRET], NOW, DEFAULT_WINDOW_SECS),
                expected,
                "{what}"
            );
        }
    }

    #[test]
    fn any_secret_of_a_rotation_verifies() {
        let sig = sign(b"new", "POST", "/v1/batch", NOW, None, b"x");
        let ts = NOW.to_string();
        let r = req(&sig, &ts, None, b"x");
        assert_eq!(verify(&r, [&b"old"[..], &b"new"[..]], NOW, 300), Ok(()));
        assert_eq!(
            verify(&r, [&b"old"[..]], NOW, 300),
            Err(ErrorCode::InvalidSignature)
        );
        assert_eq!(
            verify(&r, std::iter::empty(), NOW, 300),
            Err(ErrorCode::InvalidSignature)
        );
    }

    #[test]
    fn replayed_nonce_is_rejected_within_window() {
        let kv = MemoryKv::default();
        let run = crate::kv::block_on;
        assert_eq!(run(remember_nonce(&kv, "c1", "n-1", 300)), Ok(()));
        assert_eq!(
            run(remember_nonce(&kv, "c1", "n-1", 300)),
            Err(NonceError::Reused)
        );
        // Another client's identical nonce is its own.
        assert_eq!(run(remember_nonce(&kv, "c2", "n-1", 300)), Ok(()));
        assert_eq!(kv.ttl_of("nonce:c1:n-1"), Some(600));
    }
}
