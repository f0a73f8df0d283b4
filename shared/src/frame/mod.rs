//! The edge → aggregator frame: one signed, versioned, compact batch.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "OPBF"
//! 4       1     version (1)
//! 5       1     flags (bit 0: body is raw DEFLATE; other bits must be 0)
//! 6       2     header_len: bytes of header fields that follow (u16 BE)
//! 8       1+n   edge id (length-prefixed UTF-8, 1..=64 bytes)
//!         1+n   key id  (length-prefixed UTF-8, 1..=64 bytes)
//!         16    batch id (128 bits: a UUID or ULID)
//!         8     created-at, Unix milliseconds (i64 BE)
//!         4     event count (u32 BE)
//!         4     body length (u32 BE)
//!         …     fields a later v1 writer appends; a reader skips them
//!         n     body: protobuf `Body` (see `wire`), DEFLATE'd when flagged
//!         32    HMAC-SHA256 under the key id's secret, over every byte before it
//! ```
//!
//! Integers are big-endian. The body is protobuf so that adding an optional
//! field never breaks an older reader (it skips unknown tags), and it is
//! compact: field names never travel. Event properties travel as JSON bytes
//! inside it, which DEFLATE then squeezes along with the repeated context.
//!
//! Decoding checks, in this order: size bound, magic, version, header
//! layout, key id and MAC (constant-time), count bound, decompressed-size
//! bound, body. No byte of the body is parsed before its MAC verified.

mod wire;

use hmac::{Hmac, Mac};
use prost::Message as _;
use sha2::Sha256;

use crate::client::Secret;
use crate::error::ErrorCode;
use crate::event::{EdgeFacts, Event, Timestamp};
use crate::id::ClientId;

/// The frame's first four bytes.
pub const MAGIC: [u8; 4] = *b"OPBF";
/// The version this code writes and reads.
pub const VERSION: u8 = 1;
/// Flag: the body is raw DEFLATE.
pub const FLAG_DEFLATE: u8 = 0b0000_0001;
const KNOWN_FLAGS: u8 = FLAG_DEFLATE;
const MAC_LEN: usize = 32;
const PREFIX_LEN: usize = 8;
/// The fixed part of the header after the two ids.
const FIXED_TAIL: usize = 16 + 8 + 4 + 4;
/// Longest edge id or key id, in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// The media type a frame is sent with (`POST /v1/ingest`).
pub const CONTENT_TYPE: &str = "application/vnd.outpost.frame";
/// Bodies shorter than this are not worth compressing.
const COMPRESS_MIN_BYTES: usize = 256;

/// Bounds a decoder enforces. The defaults fit the edge's own limits with
/// room for the edge facts; the aggregator may raise them for trusted senders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrameLimits {
    /// Largest frame on the wire, in bytes.
    pub max_frame_bytes: usize,
    /// Largest body after decompression, in bytes.
    pub max_body_bytes: usize,
    /// Most events in one frame.
    pub max_events: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            max_frame_bytes: 1024 * 1024,
            max_body_bytes: 2 * 1024 * 1024,
            max_events: 500,
        }
    }
}

/// A batch's 128-bit id, chosen by the edge (a UUID or ULID's bytes). The
/// aggregator's dedup claims event ids with it, so a replay of the same
/// batch is recognised as itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub [u8; 16]);

impl core::fmt::Display for BatchId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut buf = uuid::Uuid::encode_buffer();
        f.write_str(
            uuid::Uuid::from_bytes(self.0)
                .hyphenated()
                .encode_lower(&mut buf),
        )
    }
}

/// The frame header, readable before the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    /// Which edge deployment sent it.
    pub edge_id: String,
    /// Which key of the ring signed it.
    pub key_id: String,
    /// The batch's id.
    pub batch_id: BatchId,
    /// When the edge built it.
    pub created_at: Timestamp,
    /// How many events the body holds.
    pub event_count: u32,
    /// The flags byte.
    pub flags: u8,
}

/// What a frame carries: one client's validated events and the edge facts.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The authenticated client the events belong to.
    pub client_id: ClientId,
    /// What the edge knows about the request.
    pub facts: EdgeFacts,
    /// The events.
    pub events: Vec<Event>,
    /// The client's `sent_at`, if it gave one.
    pub sent_at: Option<Timestamp>,
}

/// A decoded, verified frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The header.
    pub header: FrameHeader,
    /// The batch.
    pub batch: Batch,
}

/// An edge signing key: its id and secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EdgeKey {
    /// Key id (1..=64 bytes), named in every frame it signs.
    pub id: String,
    /// The secret.
    pub secret: Secret,
}

/// The keys a reader accepts: several at once, so that a new key can be
/// added everywhere before edges start to sign with it, and the old one
/// removed after.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRing {
    /// The accepted keys.
    pub keys: Vec<EdgeKey>,
}

impl KeyRing {
    /// The secret for a key id.
    pub fn get(&self, id: &str) -> Option<&Secret> {
        self.keys.iter().find(|k| k.id == id).map(|k| &k.secret)
    }
}

/// Why a frame was refused; each maps to one [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Larger than `max_frame_bytes`.
    #[error("frame is larger than {0} bytes")]
    TooLarge(usize),
    /// Truncated, wrong magic, bad lengths, unknown flags.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A version this reader does not speak.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// Unknown key id, or the MAC does not verify.
    #[error("frame signature does not verify")]
    BadSignature,
    /// More events than `max_events`.
    #[error("frame holds {0} events, more than allowed")]
    TooManyEvents(u32),
    /// The body decompresses to more than `max_body_bytes`, or not at all.
    #[error("frame body does not decompress within {0} bytes")]
    BodyTooLarge(usize),
    /// The body is not a valid protobuf `Body` or disagrees with the header.
    #[error("malformed frame body: {0}")]
    BadBody(String),
    /// Something given to the encoder is out of bounds.
    #[error("cannot encode frame: {0}")]
    Encode(&'static str),
}

impl FrameError {
    /// The stable error code to answer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge(_) => ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) | FrameError::BadBody(_) => ErrorCode::MalformedFrame,
            FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedFrameVersion,
            FrameError::BadSignature => ErrorCode::InvalidEdgeSignature,
            FrameError::TooManyEvents(_) => ErrorCode::TooManyEvents,
            FrameError::BodyTooLarge(_) => ErrorCode::BodyTooLarge,
            FrameError::Encode(_) => ErrorCode::Internal,
        }
    }
}

/// What the encoder needs besides the batch.
#[derive(Debug, Clone)]
pub struct FrameMeta<'a> {
    /// The edge deployment's id.
    pub edge_id: &'a str,
    /// The batch id.
    pub batch_id: BatchId,
    /// When the frame is built.
    pub created_at: Timestamp,
    /// Whether to DEFLATE the body (done only when it makes it smaller).
    pub compress: bool,
}

fn mac(secret: &Secret) -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(secret.expose()).expect("HMAC accepts any key length")
}

fn push_id(out: &mut Vec<u8>, id: &str) -> Result<(), FrameError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(FrameError::Encode(
            "edge id and key id must be 1..=64 bytes",
        ));
    }
    out.push(id.len() as u8);
    out.extend_from_slice(id.as_bytes());
    Ok(())
}

/// Encodes and signs a frame.
pub fn encode(meta: &FrameMeta<'_>, batch: &Batch, key: &EdgeKey) -> Result<Vec<u8>, FrameError> {
    let count =
        u32::try_from(batch.events.len()).map_err(|_| FrameError::Encode("too many events"))?;
    // Room for a typical event's fields besides its properties.
    let guess = batch.events.iter().map(|e| e.properties.len() + 256).sum();
    let mut body = Vec::with_capacity(guess);
    wire::write_body(batch, &mut body).map_err(FrameError::Encode)?;
    let (flags, body) = if meta.compress && body.len() >= COMPRESS_MIN_BYTES {
        // Level 1: at the edge CPU time is the scarce resource; level 6 saves
        // only a few more percent on event batches (see BENCHMARKS.md).
        let packed = miniz_oxide::deflate::compress_to_vec(&body, 1);
        if packed.len() < body.len() {
            (FLAG_DEFLATE, packed)
        } else {
            (0, body)
        }
    } else {
        (0, body)
    };
    let body_len = u32::try_from(body.len()).map_err(|_| FrameError::Encode("body too large"))?;

    let mut header = Vec::with_capacity(2 + meta.edge_id.len() + key.id.len() + FIXED_TAIL);
    push_id(&mut header, meta.edge_id)?;
    push_id(&mut header, &key.id)?;
    header.extend_from_slice(&meta.batch_id.0);
    header.extend_from_slice(&meta.created_at.millis().to_be_bytes());
    header.extend_from_slice(&count.to_be_bytes());
    header.extend_from_slice(&body_len.to_be_bytes());

    let mut out = Vec::with_capacity(PREFIX_LEN + header.len() + body.len() + MAC_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(flags);
    out.extend_from_slice(&(header.len() as u16).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
    let mut m = mac(&key.secret);
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    Ok(out)
}

/// A cursor that never reads past its slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Malformed("truncated header"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn id(&mut self) -> Result<String, FrameError> {
        let [len] = self.array::<1>()?;
        if len == 0 || usize::from(len) > MAX_ID_BYTES {
            return Err(FrameError::Malformed("id length out of range"));
        }
        let bytes = self.take(usize::from(len))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::Malformed("id is not UTF-8"))
    }
}

/// Reads the header without verifying anything else: for routing, logging
/// and metrics before the MAC is checked. Never trust it on its own.
pub fn peek_header(bytes: &[u8], limits: &FrameLimits) -> Result<(FrameHeader, usize), FrameError> {
    if bytes.len() > limits.max_frame_bytes {
        return Err(FrameError::TooLarge(limits.max_frame_bytes));
    }
    if bytes.len() < PREFIX_LEN {
        return Err(FrameError::Malformed("truncated prefix"));
    }
    if bytes[..4] != MAGIC {
        return Err(FrameError::Malformed("bad magic"));
    }
    if bytes[4] != VERSION {
        return Err(FrameError::UnsupportedVersion(bytes[4]));
    }
    let flags = bytes[5];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::Malformed("unknown flags"));
    }
    let header_len = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
    let header_end = PREFIX_LEN + header_len;
    if bytes.len() < header_end {
        return Err(FrameError::Malformed("truncated header"));
    }
    let mut r = Reader {
        buf: &bytes[PREFIX_LEN..header_end],
    };
    let edge_id = r.id()?;
    let key_id = r.id()?;
    let batch_id = BatchId(r.array()?);
    let created_at = Timestamp(i64::from_be_bytes(r.array()?));
    let event_count = u32::from_be_bytes(r.array()?);
    let body_len = u32::from_be_bytes(r.array()?) as usize;
    // Whatever remains in `r` are header fields from a newer v1 writer.
    let expected = header_end
        .checked_add(body_len)
        .and_then(|n| n.checked_add(MAC_LEN));
    if expected != Some(bytes.len()) {
        return Err(FrameError::Malformed(
            "lengths do not add up to the frame size",
        ));
    }
    Ok((
        FrameHeader {
            edge_id,
            key_id,
            batch_id,
            created_at,
            event_count,
            flags,
        },
        header_end,
    ))
}

/// Verifies and decodes a frame. See the module documentation for the order
/// of checks.
pub fn decode(bytes: &[u8], ring: &KeyRing, limits: &FrameLimits) -> Result<Frame, FrameError> {
    let (header, body_start) = peek_header(bytes, limits)?;
    let secret = ring.get(&header.key_id).ok_or(FrameError::BadSignature)?;
    let (signed, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut m = mac(secret);
    m.update(signed);
    m.verify_slice(tag).map_err(|_| FrameError::BadSignature)?;

    decode_body(header, &signed[body_start..], limits)
}

/// Decodes a frame this process verified before, without checking its MAC
/// again: for the aggregator's own spool, whose frames may outlive the key
/// that signed them (the key was rotated out while a sink was down). Never
/// call it on bytes from the network.
pub fn decode_verified(bytes: &[u8], limits: &FrameLimits) -> Result<Frame, FrameError> {
    let (header, body_start) = peek_header(bytes, limits)?;
    decode_body(header, &bytes[body_start..bytes.len() - MAC_LEN], limits)
}

fn decode_body(header: FrameHeader, raw: &[u8], limits: &FrameLimits) -> Result<Frame, FrameError> {
    if header.event_count > limits.max_events {
        return Err(FrameError::TooManyEvents(header.event_count));
    }
    let inflated;
    let body: &[u8] = if header.flags & FLAG_DEFLATE != 0 {
        inflated = miniz_oxide::inflate::decompress_to_vec_with_limit(raw, limits.max_body_bytes)
            .map_err(|_| FrameError::BodyTooLarge(limits.max_body_bytes))?;
        &inflated
    } else {
        if raw.len() > limits.max_body_bytes {
            return Err(FrameError::BodyTooLarge(limits.max_body_bytes));
        }
        raw
    };
    let body = wire::Body::decode(body).map_err(|e| FrameError::BadBody(e.to_string()))?;
    if body.events.len() != header.event_count as usize {
        return Err(FrameError::BadBody(format!(
            "header says {} events, body holds {}",
            header.event_count,
            body.events.len()
        )));
    }
    let batch = body
        .into_batch()
        .map_err(|e| FrameError::BadBody(e.to_string()))?;
    Ok(Frame { header, batch })
}

/// Frame building blocks for tests and fuzzing: frames that the encoder
/// would never write, correctly signed.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// A frame around an arbitrary `body`, edge id `e1`, key id `k-new`,
    /// signed with `secret`, with `extra_header` appended to the header as
    /// a newer v1 writer might.
    pub fn raw_frame(
        flags: u8,
        count: u32,
        body: &[u8],
        secret: &[u8],
        extra_header: &[u8],
    ) -> Vec<u8> {
        let mut header = vec![2];
        header.extend_from_slice(b"e1");
        header.push(5);
        header.extend_from_slice(b"k-new");
        header.extend_from_slice(&[1; 16]);
        header.extend_from_slice(&crate::sample::SAMPLE_NOW.millis().to_be_bytes());
        header.extend_from_slice(&count.to_be_bytes());
        header.extend_from_slice(&(body.len() as u32).to_be_bytes());
        header.extend_from_slice(extra_header);
        let mut out = MAGIC.to_vec();
        out.push(VERSION);
        out.push(flags);
        out.extend_from_slice(&(header.len() as u16).to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(body);
        let mut m = mac(&Secret::new(secret.to_vec()));
        m.update(&out);
        out.extend_from_slice(&m.finalize().into_bytes());
        out
    }
}

#[cfg(test)]
mod tests;
