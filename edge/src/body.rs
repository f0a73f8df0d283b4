//! Request bodies: which content types the edge takes, and decoding
//! `Content-Encoding: gzip` with a bound on the decompressed size, so that a
//! small compressed body cannot expand into a huge one (a zip bomb).
//!
//! The adapters read the raw body with a bound too (see
//! [`max_wire_bytes`]); the decompressed bound is the event limits'
//! `max_body_bytes`.

use std::borrow::Cow;
use std::io::Read as _;

use outpost_shared::ErrorCode;

/// What kind of body a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json` (with or without parameters).
    Json,
    /// `text/plain`: what `navigator.sendBeacon` sends for a string; the
    /// body is still JSON.
    Beacon,
}

/// Classifies `Content-Type`. A missing one is refused, as curl's default
/// form type is, so that a mistake is visible: every browser and SDK sends
/// one (`sendBeacon` with a string sends `text/plain`).
pub fn body_kind(content_type: Option<&str>) -> Result<BodyKind, ErrorCode> {
    let Some(ct) = content_type else {
        return Err(ErrorCode::UnsupportedMediaType);
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(BodyKind::Json)
    } else if essence.eq_ignore_ascii_case("text/plain") {
        Ok(BodyKind::Beacon)
    } else {
        Err(ErrorCode::UnsupportedMediaType)
    }
}

/// The most raw bytes an adapter should read for a body whose decoded size
/// may be `max_body_bytes`: gzip of JSON is rarely larger than its input,
/// so the decoded bound (plus gzip's framing) bounds the wire too.
pub fn max_wire_bytes(max_body_bytes: usize) -> usize {
    max_body_bytes.saturating_add(1024)
}

/// Decodes a body by its `Content-Encoding` (`identity` or `gzip`, case
/// insensitive), refusing anything that decodes past `max_body_bytes`. An
/// unencoded body is borrowed, not copied.
pub fn decode<'a>(
    content_encoding: Option<&str>,
    raw: &'a [u8],
    max_body_bytes: usize,
) -> Result<Cow<'a, [u8]>, ErrorCode> {
    match content_encoding.map(str::trim) {
        None | Some("") => bounded(raw, max_body_bytes),
        Some(e) if e.eq_ignore_ascii_case("identity") => bounded(raw, max_body_bytes),
        Some(e) if e.eq_ignore_ascii_case("gzip") || e.eq_ignore_ascii_case("x-gzip") => {
            gunzip(raw, max_body_bytes).map(Cow::Owned)
        }
        Some(_) => Err(ErrorCode::UnsupportedContentEncoding),
    }
}

fn bounded(raw: &[u8], max: usize) -> Result<Cow<'_, [u8]>, ErrorCode> {
    if raw.len() > max {
        Err(ErrorCode::BodyTooLarge)
    } else {
        Ok(Cow::Borrowed(raw))
    }
}

fn gunzip(raw: &[u8], max: usize) -> Result<Vec<u8>, ErrorCode> {
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(max));
    // Read one byte past the bound: reaching it means the body is too large,
    // and no more than that is ever inflated.
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::MultiGzDecoder::new(raw)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|_| ErrorCode::InvalidContentEncoding)?;
    if out.len() > max {
        return Err(ErrorCode::BodyTooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write as _;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn content_types_table() {
        let cases = [
            (None, Err(ErrorCode::UnsupportedMediaType)),
            (Some("application/json"), Ok(BodyKind::Json)),
            (Some("Application/JSON; charset=utf-8"), Ok(BodyKind::Json)),
            (Some("text/plain;charset=UTF-8"), Ok(BodyKind::Beacon)),
            (
                Some("application/x-www-form-urlencoded"),
                Err(ErrorCode::UnsupportedMediaType),
            ),
            (
                Some("multipart/form-data; boundary=x"),
                Err(ErrorCode::UnsupportedMediaType),
            ),
        ];
        for (ct, expected) in cases {
            assert_eq!(body_kind(ct), expected, "{ct:?}");
        }
    }

    #[test]
    fn gzip_bodies_decode_within_the_bound() {
        let json = br#"{"batch":[{"event_id":"0192f0c1-7b3a-7cc2-9a57-1d2e3f4a5b6c","name":"x"}]}"#;
        assert_eq!(decode(Some("gzip"), &gzip(json), 1024).unwrap(), &json[..]);
        assert_eq!(
            decode(Some("GZIP"), &gzip(json), json.len())
                .unwrap()
                .as_ref(),
            json,
            "exactly at the bound"
        );
        assert_eq!(
            decode(Some("gzip"), &gzip(json), json.len() - 1),
            Err(ErrorCode::BodyTooLarge)
        );
        assert!(
            matches!(decode(None, json, 1024), Ok(Cow::Borrowed(b)) if b == json),
            "an unencoded body is borrowed"
        );
        assert_eq!(
            decode(Some("identity"), json, 10),
            Err(ErrorCode::BodyTooLarge)
        );
        assert_eq!(
            decode(Some("br"), json, 1024),
            Err(ErrorCode::UnsupportedContentEncoding)
        );
    }

    #[test]
    fn a_gzip_bomb_is_refused_without_inflating_it() {
        // 64 MiB of zeros in a few dozen KiB; the decoder must stop at the bound.
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..64 {
            e.write_all(&chunk).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        assert_eq!(
            decode(Some("gzip"), &bomb, 512 * 1024),
            Err(ErrorCode::BodyTooLarge)
        );
    }

    #[test]
    fn truncated_or_garbage_gzip_is_a_clear_error() {
        let good = gzip(b"{\"batch\":[]}");
        assert_eq!(
            decode(Some("gzip"), &good[..good.len() / 2], 1024),
            Err(ErrorCode::InvalidContentEncoding)
        );
        assert_eq!(
            decode(Some("gzip"), b"not gzip at all", 1024),
            Err(ErrorCode::InvalidContentEncoding)
        );
        assert_eq!(
            decode(Some("gzip"), &[], 1024),
            Err(ErrorCode::InvalidContentEncoding),
            "empty is not gzip"
        );
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode(Some("gzip"), &raw, 4096);
            let _ = decode(None, &raw, 4096);
        }
    }
}
