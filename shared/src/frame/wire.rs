//! The frame body's protobuf schema, written out with `prost` derives (no
//! `.proto` build step, no `protoc`). Tags are forever: never reuse or
//! renumber one; add new fields as optional with new tags.
//!
//! The derived structs read a body; [`write_body`] writes one straight
//! from the domain types (no copy of every string). A new field goes in
//! three places: its struct below, `write_body`, and the tests' random
//! events — a property test then holds the two encodings byte-equal.
//!
//! ```proto
//! message Body    { string client_id = 1; Facts facts = 2; repeated Event events = 3; optional int64 sent_at_ms = 4; }
//! message Facts   { optional string client_ip = 1; optional string user_agent = 2; int64 received_at_ms = 3;
//!                   optional string pop = 4; optional string country_hint = 5; optional string origin = 6; }
//! message Event   { string event_id = 1; int64 timestamp_ms = 2; uint32 kind = 3; optional string name = 4;
//!                   optional string message = 5; optional uint32 level = 6; optional string user_id = 7;
//!                   optional string anonymous_id = 8; optional string session_id = 9; bytes properties_json = 10;
//!                   Context context = 11; bytes trace_id = 12; bytes span_id = 13; optional uint64 seq = 14;
//!                   uint32 priority = 15; }
//! message Context { optional string app_version = 1; … library_version = 8; }
//! ```
//!
//! Trace and span ids travel as raw bytes (16 and 8), not hex.

use super::Batch;
use crate::event::{
    Context as EventContext, EdgeFacts, Event as DomainEvent, Kind, Level, Priority, Timestamp,
};
use crate::properties::{Properties, PropertiesError};
use prost::encoding::{WireType, encode_key, encode_varint};

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Body {
    #[prost(string, tag = "1")]
    pub client_id: String,
    #[prost(message, optional, tag = "2")]
    pub facts: Option<Facts>,
    #[prost(message, repeated, tag = "3")]
    pub events: Vec<Event>,
    #[prost(int64, optional, tag = "4")]
    pub sent_at_ms: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Facts {
    #[prost(string, optional, tag = "1")]
    pub client_ip: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub user_agent: Option<String>,
    #[prost(int64, tag = "3")]
    pub received_at_ms: i64,
    #[prost(string, optional, tag = "4")]
    pub pop: Option<String>,
    #[prost(string, optional, tag = "5")]
    pub country_hint: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub origin: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Event {
    #[prost(string, tag = "1")]
    pub event_id: String,
    #[prost(int64, tag = "2")]
    pub timestamp_ms: i64,
    #[prost(uint32, tag = "3")]
    pub kind: u32,
    #[prost(string, optional, tag = "4")]
    pub name: Option<String>,
    #[prost(string, optional, tag = "5")]
    pub message: Option<String>,
    #[prost(uint32, optional, tag = "6")]
    pub level: Option<u32>,
    #[prost(string, optional, tag = "7")]
    pub user_id: Option<String>,
    #[prost(string, optional, tag = "8")]
    pub anonymous_id: Option<String>,
    #[prost(string, optional, tag = "9")]
    pub session_id: Option<String>,
    #[prost(bytes = "vec", tag = "10")]
    pub properties_json: Vec<u8>,
    #[prost(message, optional, tag = "11")]
    pub context: Option<Context>,
    #[prost(bytes = "vec", tag = "12")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "13")]
    pub span_id: Vec<u8>,
    #[prost(uint64, optional, tag = "14")]
    pub seq: Option<u64>,
    #[prost(uint32, tag = "15")]
    pub priority: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Context {
    #[prost(string, optional, tag = "1")]
    pub app_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub platform: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub device_model: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub os: Option<String>,
    #[prost(string, optional, tag = "5")]
    pub os_version: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub locale: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub library_name: Option<String>,
    #[prost(string, optional, tag = "8")]
    pub library_version: Option<String>,
}

fn kind_to_wire(k: Kind) -> u32 {
    match k {
        Kind::Event => 0,
        Kind::Log => 1,
    }
}

/// Why a decoded body is not a batch.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The body has no edge facts.
    #[error("missing facts")]
    MissingFacts,
    /// An enumeration holds a number no version wrote.
    #[error("unknown {field} {value}")]
    Unknown {
        /// `kind`, `level` or `priority`.
        field: &'static str,
        /// The number.
        value: u32,
    },
    /// `properties` is not a JSON object.
    #[error("properties are not a JSON object")]
    PropertiesNotObject,
    /// `properties` is not UTF-8.
    #[error("properties are not UTF-8")]
    PropertiesNotUtf8,
    /// `properties` is not JSON.
    #[error("properties: {0}")]
    Properties(#[from] serde_json::Error),
    /// A trace or span id of the wrong length.
    #[error("{field} has {len} bytes, expected {expected}")]
    IdLength {
        /// `trace_id` or `span_id`.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The length it must have.
        expected: usize,
    },
    /// One event of the body is not an event.
    #[error("event {index}: {source}")]
    Event {
        /// Its position in the body.
        index: usize,
        /// Why.
        source: Box<WireError>,
    },
}

fn kind_from_wire(v: u32) -> Result<Kind, WireError> {
    match v {
        0 => Ok(Kind::Event),
        1 => Ok(Kind::Log),
        value => Err(WireError::Unknown {
            field: "kind",
            value,
        }),
    }
}

fn level_from_wire(v: u32) -> Result<Level, WireError> {
    Level::ALL
        .get(v as usize)
        .copied()
        .ok_or(WireError::Unknown {
            field: "level",
            value: v,
        })
}

fn level_to_wire(l: Level) -> u32 {
    Level::ALL.iter().position(|x| *x == l).unwrap_or_default() as u32
}

fn priority_to_wire(p: Priority) -> u32 {
    match p {
        Priority::Normal => 0,
        Priority::High => 1,
    }
}

fn priority_from_wire(v: u32) -> Result<Priority, WireError> {
    match v {
        0 => Ok(Priority::Normal),
        1 => Ok(Priority::High),
        value => Err(WireError::Unknown {
            field: "priority",
            value,
        }),
    }
}

/// Validation guarantees lower-case hex of the right length; anything else
/// is refused rather than sent in a form that would decode to another value.
fn hex_to_wire<const N: usize>(id: Option<&str>) -> Result<Option<[u8; N]>, &'static str> {
    let Some(s) = id else { return Ok(None) };
    if s.len() != N * 2 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("trace_id and span_id must be lower-case hex of W3C length");
    }
    let mut out = [0; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| "trace_id and span_id must be hex")?;
    Ok(Some(out))
}

fn hex_from_wire(
    bytes: &[u8],
    expected: usize,
    field: &'static str,
) -> Result<Option<String>, WireError> {
    match bytes.len() {
        0 => Ok(None),
        n if n == expected => Ok(Some(hex::encode(bytes))),
        len => Err(WireError::IdLength {
            field,
            len,
            expected,
        }),
    }
}

/// Writes `batch` as a protobuf `Body`: the bytes prost's derive writes
/// for the same batch (a property test holds them equal), without first
/// copying every string of every event into the structs above, which are
/// for reading. Fields go in tag order; a proto3 field without `optional`
/// is left out when it holds its default, an `optional` one is written
/// whenever it is set — as the derive does.
pub(super) fn write_body(batch: &Batch, out: &mut Vec<u8>) -> Result<(), &'static str> {
    let f = &batch.facts;
    put_bytes(out, 1, batch.client_id.as_bytes());
    nested(out, 2, |out| {
        put_opt_str(out, 1, f.client_ip.as_deref());
        put_opt_str(out, 2, f.user_agent.as_deref());
        put_varint(out, 3, f.received_at.millis() as u64);
        put_opt_str(out, 4, f.pop.as_deref());
        put_opt_str(out, 5, f.country_hint.as_deref());
        put_opt_str(out, 6, f.origin.as_deref());
    });
    for e in &batch.events {
        nested(out, 3, |out| write_event(out, e, f.received_at))?;
    }
    if let Some(t) = batch.sent_at {
        put_opt_varint(out, 4, Some(t.millis() as u64));
    }
    Ok(())
}

fn write_event(
    out: &mut Vec<u8>,
    e: &DomainEvent,
    received_at: Timestamp,
) -> Result<(), &'static str> {
    let trace_id = hex_to_wire::<16>(e.trace_id.as_deref())?;
    let span_id = hex_to_wire::<8>(e.span_id.as_deref())?;
    put_bytes(out, 1, e.event_id.as_bytes());
    // Validation always fills the timestamp; an unvalidated event gets
    // the arrival time, as validation would give it.
    put_varint(out, 2, e.timestamp.unwrap_or(received_at).millis() as u64);
    put_varint(out, 3, kind_to_wire(e.kind).into());
    put_opt_str(out, 4, e.name.as_deref());
    put_opt_str(out, 5, e.message.as_deref());
    put_opt_varint(out, 6, e.level.map(|l| level_to_wire(l).into()));
    put_opt_str(out, 7, e.user_id.as_deref());
    put_opt_str(out, 8, e.anonymous_id.as_deref());
    put_opt_str(out, 9, e.session_id.as_deref());
    // As the client sent it: the edge never re-serialises it.
    if !e.properties.is_empty() {
        put_bytes(out, 10, e.properties.get().as_bytes());
    }
    let c = &e.context;
    if !c.is_empty() {
        nested(out, 11, |out| {
            for (tag, (_, value)) in (1..).zip(c.fields()) {
                put_opt_str(out, tag, value);
            }
        });
    }
    put_bytes(out, 12, trace_id.as_ref().map_or(&[][..], |id| &id[..]));
    put_bytes(out, 13, span_id.as_ref().map_or(&[][..], |id| &id[..]));
    put_opt_varint(out, 14, e.seq);
    put_varint(out, 15, priority_to_wire(e.priority).into());
    Ok(())
}

/// A length-delimited field holding what `write` appends: written in
/// place, then its length is moved in front of it.
fn nested<R>(out: &mut Vec<u8>, tag: u32, write: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    encode_key(tag, WireType::LengthDelimited, out);
    let start = out.len();
    let written = write(out);
    let len = out.len() - start;
    encode_varint(len as u64, out);
    let prefix = out.len() - start - len;
    out[start..].rotate_right(prefix);
    written
}

/// A `string` or `bytes` field without `optional`: left out when empty.
fn put_bytes(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        put_opt_str_bytes(out, tag, value);
    }
}

/// An `optional string`: written whenever set, even when empty.
fn put_opt_str(out: &mut Vec<u8>, tag: u32, value: Option<&str>) {
    if let Some(v) = value {
        put_opt_str_bytes(out, tag, v.as_bytes());
    }
}

fn put_opt_str_bytes(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.extend_from_slice(value);
}

/// An integer field without `optional` (`int64` as its two's complement):
/// left out when zero.
fn put_varint(out: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        put_opt_varint(out, tag, Some(value));
    }
}

/// An `optional` integer field: written whenever set, even when zero.
fn put_opt_varint(out: &mut Vec<u8>, tag: u32, value: Option<u64>) {
    if let Some(v) = value {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

impl Body {
    /// The batch as the derive's struct: the reference [`write_body`] is
    /// tested against.
    #[cfg(test)]
    pub(super) fn from_batch(batch: &Batch) -> Result<Body, &'static str> {
        let f = &batch.facts;
        Ok(Body {
            client_id: batch.client_id.to_string(),
            facts: Some(Facts {
                client_ip: f.client_ip.clone(),
                user_agent: f.user_agent.clone(),
                received_at_ms: f.received_at.millis(),
                pop: f.pop.clone(),
                country_hint: f.country_hint.clone(),
                origin: f.origin.clone(),
            }),
            events: batch
                .events
                .iter()
                .map(|e| Event::from_domain(e, f.received_at))
                .collect::<Result<_, _>>()?,
            sent_at_ms: batch.sent_at.map(Timestamp::millis),
        })
    }

    pub(super) fn into_batch(self) -> Result<Batch, WireError> {
        let f = self.facts.ok_or(WireError::MissingFacts)?;
        let facts = EdgeFacts {
            client_ip: f.client_ip,
            user_agent: f.user_agent,
            received_at: Timestamp(f.received_at_ms),
            pop: f.pop,
            country_hint: f.country_hint,
            origin: f.origin,
        };
        let events = self
            .events
            .into_iter()
            .enumerate()
            .map(|(index, e)| {
                e.into_domain().map_err(|source| WireError::Event {
                    index,
                    source: Box::new(source),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Batch {
            client_id: self.client_id.into(),
            facts,
            events,
            sent_at: self.sent_at_ms.map(Timestamp),
        })
    }
}

impl Event {
    #[cfg(test)]
    fn from_domain(e: &DomainEvent, received_at: Timestamp) -> Result<Event, &'static str> {
        let c = &e.context;
        let context = (!c.is_empty()).then(|| Context {
            app_version: c.app_version.clone(),
            platform: c.platform.clone(),
            device_model: c.device_model.clone(),
            os: c.os.clone(),
            os_version: c.os_version.clone(),
            locale: c.locale.clone(),
            library_name: c.library_name.clone(),
            library_version: c.library_version.clone(),
        });
        Ok(Event {
            event_id: e.event_id.to_string(),
            // Validation always fills the timestamp; an unvalidated event
            // gets the arrival time, as validation would give it.
            timestamp_ms: e.timestamp.unwrap_or(received_at).millis(),
            kind: kind_to_wire(e.kind),
            name: e.name.clone(),
            message: e.message.clone(),
            level: e.level.map(level_to_wire),
            user_id: e.user_id.clone(),
            anonymous_id: e.anonymous_id.clone(),
            session_id: e.session_id.clone(),
            // As the client sent it: the edge never re-serialises it.
            properties_json: if e.properties.is_empty() {
                Vec::new()
            } else {
                e.properties.get().as_bytes().to_vec()
            },
            context,
            trace_id: hex_to_wire::<16>(e.trace_id.as_deref())?.map_or_else(Vec::new, Vec::from),
            span_id: hex_to_wire::<8>(e.span_id.as_deref())?.map_or_else(Vec::new, Vec::from),
            seq: e.seq,
            priority: priority_to_wire(e.priority),
        })
    }

    fn into_domain(self) -> Result<DomainEvent, WireError> {
        let properties = if self.properties_json.is_empty() {
            Properties::default()
        } else {
            let text = String::from_utf8(self.properties_json)
                .map_err(|_| WireError::PropertiesNotUtf8)?;
            Properties::from_json(text).map_err(|e| match e {
                PropertiesError::NotObject => WireError::PropertiesNotObject,
                PropertiesError::Json(e) => WireError::Properties(e),
            })?
        };
        let context = self
            .context
            .map_or_else(EventContext::default, |c| EventContext {
                app_version: c.app_version,
                platform: c.platform,
                device_model: c.device_model,
                os: c.os,
                os_version: c.os_version,
                locale: c.locale,
                library_name: c.library_name,
                library_version: c.library_version,
            });
        Ok(DomainEvent {
            event_id: self.event_id.into(),
            timestamp: Some(Timestamp(self.timestamp_ms)),
            kind: kind_from_wire(self.kind)?,
            name: self.name,
            message: self.message,
            level: self.level.map(level_from_wire).transpose()?,
            user_id: self.user_id,
            anonymous_id: self.anonymous_id,
            session_id: self.session_id,
            properties,
            context,
            trace_id: hex_from_wire(&self.trace_id, 16, "trace_id")?,
            span_id: hex_from_wire(&self.span_id, 8, "span_id")?,
            seq: self.seq,
            priority: priority_from_wire(self.priority)?,
        })
    }
}
