//! Validation: the rules an event must meet, with configurable limits.
//!
//! The edge runs [`parse_batch`] on the request body; the aggregator runs
//! [`validate_event`] again on what a frame carries (a trusted server may
//! send frames straight to it). A batch is accepted in part: each event that
//! breaks a rule yields one [`FieldError`] with its index, the others go on.
//! Whole-request problems (bad JSON, too many events) fail the request.

use std::collections::HashSet;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::{ErrorCode, FieldError};
use crate::event::{Event, Kind, Level, Properties, Timestamp};

/// Every bound validation applies. The defaults are the documented limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, after decompression, in bytes.
    pub max_body_bytes: usize,
    /// Largest single event as JSON, in bytes.
    pub max_event_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Longest `event_id`, `user_id`, `anonymous_id`, `session_id`, in bytes.
    pub max_id_bytes: usize,
    /// Longest `name`, in bytes.
    pub max_name_bytes: usize,
    /// Longest log `message`, in bytes.
    pub max_message_bytes: usize,
    /// Longest `context` value, in bytes.
    pub max_context_value_bytes: usize,
    /// Deepest nesting of objects and arrays inside `properties`
    /// (`{"a":1}` has depth 1, `{"a":{"b":1}}` depth 2).
    pub max_property_depth: usize,
    /// Most keys and array elements inside `properties`, counted at every level.
    pub max_property_entries: usize,
    /// Longest property key, in bytes.
    pub max_property_key_bytes: usize,
    /// How far before arrival a timestamp may lie, in seconds.
    pub max_past_secs: u64,
    /// How far after arrival a timestamp may lie (client clock skew), in seconds.
    pub max_future_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 512 * 1024,
            max_event_bytes: 32 * 1024,
            max_batch_events: 500,
            max_id_bytes: 128,
            max_name_bytes: 200,
            max_message_bytes: 16 * 1024,
            max_context_value_bytes: 200,
            max_property_depth: 8,
            max_property_entries: 1000,
            max_property_key_bytes: 200,
            max_past_secs: 30 * 24 * 3600,
            max_future_secs: 3600,
        }
    }
}

/// What a batch request yields: the events that passed, and one error per
/// event that did not.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutcome {
    /// Valid events, in request order, timestamps filled in.
    pub accepted: Vec<Event>,
    /// One entry per rejected event (with its index).
    pub rejected: Vec<FieldError>,
    /// The client's `sent_at`, if given.
    pub sent_at: Option<Timestamp>,
    /// A write key carried in the body (`navigator.sendBeacon` cannot set headers).
    pub write_key: Option<String>,
}

/// The body's top level, its `batch` array read as `T`s: raw events to be
/// judged one by one, or whole events when the batch is read in one pass.
struct RawBatch<T> {
    batch: Option<Vec<T>>,
    sent_at: Option<Timestamp>,
    write_key: Option<String>,
}

const BODY_FIELDS: &[&str] = &["batch", "sent_at", "write_key"];

/// Reads the body's object; `max` bounds the batch as [`BoundedArray`],
/// `capacity` is what its vector starts with.
struct BodySeed<T> {
    max: usize,
    capacity: usize,
    item: PhantomData<T>,
}

impl<T> BodySeed<T> {
    fn new(max: usize, capacity: usize) -> Self {
        BodySeed {
            max,
            capacity: capacity.min(max),
            item: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for BodySeed<T> {
    type Value = RawBatch<T>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for BodySeed<T> {
    type Value = RawBatch<T>;
    fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("a JSON object: {\"batch\": [...]}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = RawBatch {
            batch: None,
            sent_at: None,
            write_key: None,
        };
        let mut seen = [false; 3];
        while let Some(key) = map.next_key::<String>()? {
            let Some(i) = BODY_FIELDS.iter().position(|f| *f == key) else {
                return Err(serde::de::Error::unknown_field(&key, BODY_FIELDS));
            };
            if std::mem::replace(&mut seen[i], true) {
                return Err(serde::de::Error::duplicate_field(BODY_FIELDS[i]));
            }
            match i {
                0 => out.batch = map.next_value_seed(self.array())?,
                1 => out.sent_at = map.next_value()?,
                _ => out.write_key = map.next_value()?,
            }
        }
        Ok(out)
    }
}

/// `batch`: `null` is as good as absent. Reads a JSON array, stopping as
/// soon as it holds more than `max` (so a body of tiny elements cannot make
/// a huge vector).
struct BoundedArray<T> {
    max: usize,
    capacity: usize,
    item: PhantomData<T>,
}

impl<T> BodySeed<T> {
    fn array(&self) -> BoundedArray<T> {
        BoundedArray {
            max: self.max,
            capacity: self.capacity,
            item: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for BoundedArray<T> {
    type Value = Option<Vec<T>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedArray<T> {
    type Value = Option<Vec<T>>;
    fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(EXPECTED_ARRAY)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(self.capacity);
        while let Some(item) = seq.next_element::<T>()? {
            if out.len() == self.max {
                return Err(serde::de::Error::custom(TOO_MANY));
            }
            out.push(item);
        }
        Ok(Some(out))
    }
}

const TOO_MANY: &str = "outpost: too many events";
const EXPECTED_ARRAY: &str = "an array of events";

/// Parses and validates a `POST /v1/batch` body:
/// `{"batch":[event, …], "sent_at": …, "write_key": …}`.
///
/// `body` must already be bounded by [`Limits::max_body_bytes`] (the reader
/// stops there); this checks again so that no caller can forget.
pub fn parse_batch(
    body: &[u8],
    limits: &Limits,
    received_at: Timestamp,
) -> Result<BatchOutcome, FieldError> {
    // Nearly every batch is valid through and through: one pass reads it.
    // Anything that pass cannot vouch for is read again event by event,
    // which gives every answer with an error in it.
    match parse_valid_batch(body, limits, received_at) {
        Some(outcome) => Ok(outcome),
        None => parse_batch_by_event(body, limits, received_at),
    }
}

/// A batch read in one pass straight into events, or `None` when anything
/// about it — a rule broken, a shape not expected — needs
/// [`parse_batch_by_event`] to answer. It accepts exactly what that would
/// accept, with the same events: every event passes [`validate_event`];
/// the body is no deeper than where [`parse_batch_by_event`] skips the
/// per-event depth scan; each event's size is measured by the same depth
/// scan, on the events it found.
fn parse_valid_batch(body: &[u8], limits: &Limits, received_at: Timestamp) -> Option<BatchOutcome> {
    let shallow = event_max_depth(limits).saturating_add(2);
    if body.len() > limits.max_body_bytes
        || first_byte(body) != Some(b'{')
        || shallow > MAX_REQUEST_DEPTH
    {
        return None;
    }
    // Once the body has parsed as a batch, the containers that open at
    // depth 3 (inside its object and the `batch` array) are its events:
    // nothing else in a batch can hold one.
    let (mut start, mut events, mut refused) = (0, 0usize, false);
    let depth = walk_nesting(body, shallow, |at, depth| {
        if depth != 3 {
            return;
        }
        match body.get(at) {
            Some(b'{') => start = at,
            Some(b'}') => {
                events += 1;
                refused |= at.saturating_sub(start) >= limits.max_event_bytes;
            }
            // An array where an event should be.
            _ => refused = true,
        }
    });
    if depth > shallow || refused {
        return None;
    }
    // One check of the whole body is cheaper than one per string.
    let text = core::str::from_utf8(body).ok()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = BodySeed::<Event>::new(limits.max_batch_events, events)
        .deserialize(&mut de)
        .ok()?;
    de.end().ok()?;
    let mut accepted = raw.batch?;
    if accepted.is_empty() || accepted.len() != events {
        return None;
    }
    for event in &mut accepted {
        validate_event(event, limits, received_at).ok()?;
    }
    let mut ids = HashSet::with_capacity(accepted.len());
    if !accepted.iter().all(|e| ids.insert(e.event_id.as_str())) {
        return None;
    }
    Some(BatchOutcome {
        accepted,
        rejected: Vec::new(),
        sent_at: raw.sent_at,
        write_key: raw.write_key,
    })
}

/// [`parse_batch`] one event at a time: each event is cut out of the body
/// and judged on its own, so that one bad event is refused with its index
/// and the others go on. Gives the same answer as [`parse_batch`] for every
/// body (public for the differential fuzz target); slower on valid ones.
pub fn parse_batch_by_event(
    body: &[u8],
    limits: &Limits,
    received_at: Timestamp,
) -> Result<BatchOutcome, FieldError> {
    if body.len() > limits.max_body_bytes {
        return Err(FieldError::new(
            ErrorCode::BodyTooLarge,
            None,
            format!("the body is larger than {} bytes", limits.max_body_bytes),
        ));
    }
    let depth = check_request_shape(body, "the body must be a JSON object: {\"batch\": [...]}")?;
    // The batch object and its array hold the events: a body no deeper
    // than an event may be plus those two needs no scan of each event.
    let events_shallow = depth <= event_max_depth(limits).saturating_add(2);
    let mut de = serde_json::Deserializer::from_slice(body);
    let raw = BodySeed::<&RawValue>::new(limits.max_batch_events, 0)
        .deserialize(&mut de)
        .and_then(|raw| de.end().map(|()| raw))
        .map_err(|e| {
            let msg = e.to_string();
            if msg.starts_with(TOO_MANY) {
                FieldError::new(
                    ErrorCode::TooManyEvents,
                    Some("batch"),
                    format!("a batch holds at most {} events", limits.max_batch_events),
                )
            } else if e.classify() == serde_json::error::Category::Data
                && msg.contains(EXPECTED_ARRAY)
            {
                FieldError::new(
                    ErrorCode::InvalidField,
                    Some("batch"),
                    "batch must be an array",
                )
            } else {
                request_error(&e)
            }
        })?;
    let items = raw.batch.ok_or_else(|| {
        FieldError::new(ErrorCode::MissingField, Some("batch"), "batch is required")
    })?;
    if items.is_empty() {
        return Err(FieldError::new(
            ErrorCode::EmptyBatch,
            Some("batch"),
            "batch is empty",
        ));
    }

    let mut accepted = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    let mut seen = HashSet::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let result =
            parse_event_raw(item.get(), limits, received_at, !events_shallow).and_then(|event| {
                if seen.insert(event.event_id.clone()) {
                    Ok(event)
                } else {
                    Err(FieldError::new(
                        ErrorCode::DuplicateEventId,
                        Some("event_id"),
                        "an earlier event in this batch has the same event_id",
                    )
                    .with_event_id(Some(event.event_id.into_string())))
                }
            });
        match result {
            Ok(event) => accepted.push(event),
            Err(mut err) => {
                err.index = Some(index);
                if err.event_id.is_none() {
                    err.event_id = peek_event_id(item.get());
                }
                rejected.push(err);
            }
        }
    }
    Ok(BatchOutcome {
        accepted,
        rejected,
        sent_at: raw.sent_at,
        write_key: raw.write_key,
    })
}

/// Parses and validates a `POST /v1/event` body: one event object.
pub fn parse_event(
    body: &[u8],
    limits: &Limits,
    received_at: Timestamp,
) -> Result<Event, FieldError> {
    let text = core::str::from_utf8(body)
        .map_err(|_| FieldError::new(ErrorCode::MalformedJson, None, "the body is not UTF-8"))?;
    let depth = check_request_shape(body, "the body must be one event, a JSON object")?;
    // A lone event must still be a JSON value before per-field rules apply.
    serde_json::from_str::<&RawValue>(text).map_err(|e| request_error(&e))?;
    let deep = depth > event_max_depth(limits);
    parse_event_raw(text, limits, received_at, deep).map_err(|e| {
        let id = peek_event_id(text);
        e.with_event_id(id)
    })
}

/// The deepest an event may nest: an object holding `properties` (one
/// level), so one more than the properties' own depth.
fn event_max_depth(limits: &Limits) -> usize {
    limits.max_property_depth.saturating_add(1)
}

/// One event's JSON. `check_depth`: scan it for nesting first — needless
/// when the whole body is known to be shallow enough.
fn parse_event_raw(
    json: &str,
    limits: &Limits,
    received_at: Timestamp,
    check_depth: bool,
) -> Result<Event, FieldError> {
    if json.len() > limits.max_event_bytes {
        return Err(FieldError::new(
            ErrorCode::EventTooLarge,
            None,
            format!("the event is larger than {} bytes", limits.max_event_bytes),
        ));
    }
    if first_byte(json.as_bytes()) != Some(b'{') {
        return Err(FieldError::new(
            ErrorCode::MalformedJson,
            None,
            "an event must be a JSON object",
        ));
    }
    // Checked before parsing, so that nesting anywhere in the event,
    // however deep, gets the depth code.
    let max_depth = event_max_depth(limits);
    if check_depth && nesting_depth(json.as_bytes(), max_depth) > max_depth {
        return Err(too_deep(limits));
    }
    let mut event = match Event::deserialize(&mut serde_json::Deserializer::from_str(json)) {
        Ok(event) => event,
        // Only a refused event is parsed again, to name the field at fault:
        // tracking the path of every value cost a quarter of a valid
        // event's parse.
        Err(plain) => {
            let mut de = serde_json::Deserializer::from_str(json);
            return Err(
                match serde_path_to_error::deserialize::<_, Event>(&mut de) {
                    Err(e) => field_error(&e),
                    Ok(_) => request_error(&plain),
                },
            );
        }
    };
    validate_event(&mut event, limits, received_at)?;
    Ok(event)
}

fn peek_event_id(json: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        event_id: Option<Value>,
    }
    let id = serde_json::from_str::<IdOnly>(json).ok()?.event_id?;
    // Echo the id back only when it is a short string: the error list must stay small.
    id.as_str().filter(|s| s.len() <= 128).map(str::to_owned)
}

/// Nesting past this depth is refused before the body is parsed at all:
/// serde_json stops at 128 levels, and no valid request comes near it (an
/// event is at most `max_property_depth` + 3 deep inside a batch).
const MAX_REQUEST_DEPTH: usize = 100;

/// The whole-body checks every parse starts with: the body is a JSON
/// object (serde would also take an array of the fields in order) and is
/// not nested past [`MAX_REQUEST_DEPTH`]. Gives the body's depth.
fn check_request_shape(body: &[u8], not_object: &str) -> Result<usize, FieldError> {
    let depth = nesting_depth(body, MAX_REQUEST_DEPTH);
    if depth > MAX_REQUEST_DEPTH {
        return Err(FieldError::new(
            ErrorCode::PropertiesTooDeep,
            None,
            format!("the body nests deeper than {MAX_REQUEST_DEPTH} levels"),
        ));
    }
    match first_byte(body) {
        Some(b'{') => Ok(depth),
        // Not JSON at all: let the parser say what is wrong.
        None | Some(b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n' | b'[') => {
            Err(FieldError::new(ErrorCode::MalformedJson, None, not_object))
        }
        Some(_) => Ok(depth),
    }
}

/// The first byte that is not JSON whitespace.
fn first_byte(json: &[u8]) -> Option<u8> {
    json.iter()
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// The deepest nesting of arrays and objects in `json`, skipping strings;
/// stops counting once it passes `cap`. Malformed JSON gets some number;
/// the parser reports what is wrong with it. Strings are most of a body's
/// bytes: they are skipped with `memchr` to their closing quote.
pub fn nesting_depth(json: &[u8], cap: usize) -> usize {
    walk_nesting(json, cap, |_, _| {})
}

/// [`nesting_depth`], telling `at` of each bracket outside strings: its
/// offset and the depth inside it (1 for the outermost).
fn walk_nesting(json: &[u8], cap: usize, mut at: impl FnMut(usize, usize)) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        i += 1;
        match b {
            b'"' => loop {
                let Some(rest) = json.get(i..) else {
                    return max;
                };
                match memchr::memchr2(b'"', b'\\', rest) {
                    // Past the escaped byte, whatever it is.
                    Some(k) if rest[k] == b'\\' => i += k + 2,
                    Some(k) => {
                        i += k + 1;
                        break;
                    }
                    // An unterminated string: nothing after it counts.
                    None => return max,
                }
            },
            b'[' | b'{' => {
                depth += 1;
                at(i - 1, depth);
                if depth > max {
                    max = depth;
                    if max > cap {
                        return max;
                    }
                }
            }
            b']' | b'}' => {
                at(i - 1, depth);
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
    }
    max
}

fn too_deep(limits: &Limits) -> FieldError {
    FieldError::new(
        ErrorCode::PropertiesTooDeep,
        Some("properties"),
        format!(
            "properties nest deeper than {} levels",
            limits.max_property_depth
        ),
    )
}

/// U+0000–U+001F and U+007F: never meaningful in a key, a name or a
/// context value, and a line break there would split a line of InfluxDB's
/// line protocol downstream.
fn has_control(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == 0x7f)
}

fn control_error(field: &str, what: &str) -> FieldError {
    FieldError::new(
        ErrorCode::InvalidCharacter,
        Some(field),
        format!("{what} must not contain control characters (U+0000-U+001F, U+007F)"),
    )
}

/// An error about the whole request body.
fn request_error(e: &serde_json::Error) -> FieldError {
    let msg = strip_position(&e.to_string());
    if let Some(field) = quoted_after(&msg, "unknown field `") {
        return FieldError::new(ErrorCode::UnknownField, Some(&field), msg);
    }
    if e.classify() == serde_json::error::Category::Data {
        if msg.contains("timestamp") {
            return FieldError::new(ErrorCode::InvalidTimestamp, Some("sent_at"), msg);
        }
        return FieldError::new(ErrorCode::MalformedJson, None, msg);
    }
    FieldError::new(ErrorCode::MalformedJson, None, msg)
}

/// An error about one event, with the path to the field at fault.
fn field_error(e: &serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let inner = e.inner();
    let msg = strip_position(&inner.to_string());
    let path = e.path().to_string();
    let join = |name: &str| {
        if path == "." || path.is_empty() {
            name.to_owned()
        } else if path.ends_with(name) {
            path.clone()
        } else {
            format!("{path}.{name}")
        }
    };
    if let Some(name) = quoted_after(&msg, "missing field `") {
        return FieldError::new(ErrorCode::MissingField, Some(&join(&name)), msg);
    }
    if let Some(name) = quoted_after(&msg, "unknown field `") {
        return FieldError::new(ErrorCode::UnknownField, Some(&join(&name)), msg);
    }
    if inner.classify() != serde_json::error::Category::Data {
        return FieldError::new(ErrorCode::MalformedJson, None, msg);
    }
    let code = if path == "timestamp" {
        ErrorCode::InvalidTimestamp
    } else {
        ErrorCode::InvalidField
    };
    let field = if path == "." {
        None
    } else {
        Some(path.as_str())
    };
    FieldError::new(code, field, msg)
}

fn quoted_after(msg: &str, prefix: &str) -> Option<String> {
    let rest = msg.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name.to_owned())
}

/// serde_json appends " at line 1 column 7"; the field path says more.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// Applies every rule to one event, filling defaults (`timestamp` from
/// `received_at`, `level: info` for logs).
pub fn validate_event(
    event: &mut Event,
    limits: &Limits,
    received_at: Timestamp,
) -> Result<(), FieldError> {
    let err = |code, field: &str, message: String| Err(FieldError::new(code, Some(field), message));

    fill_defaults(event, received_at);
    if !is_uuid(&event.event_id) && !is_ulid(&event.event_id) {
        return err(
            ErrorCode::InvalidEventId,
            "event_id",
            "event_id must be a hyphenated UUID or a 26-character ULID".into(),
        );
    }
    match event.kind {
        Kind::Event => {
            if event.name.as_deref().is_none_or(|n| n.trim().is_empty()) {
                return err(
                    ErrorCode::MissingField,
                    "name",
                    "name is required for kind \"event\"".into(),
                );
            }
        }
        Kind::Log => {
            if event.message.as_deref().is_none_or(str::is_empty) {
                return err(
                    ErrorCode::MissingField,
                    "message",
                    "message is required for kind \"log\"".into(),
                );
            }
        }
    }
    check_str("name", event.name.as_deref(), limits.max_name_bytes, false)?;
    if event.name.as_deref().is_some_and(has_control) {
        return Err(control_error("name", "name"));
    }
    check_str(
        "message",
        event.message.as_deref(),
        limits.max_message_bytes,
        false,
    )?;
    check_str(
        "user_id",
        event.user_id.as_deref(),
        limits.max_id_bytes,
        true,
    )?;
    check_str(
        "anonymous_id",
        event.anonymous_id.as_deref(),
        limits.max_id_bytes,
        true,
    )?;
    check_str(
        "session_id",
        event.session_id.as_deref(),
        limits.max_id_bytes,
        true,
    )?;
    for (name, value) in event.context.fields() {
        check_context(name, value, limits.max_context_value_bytes)?;
    }
    if let Some(t) = &event.trace_id
        && !is_lower_hex_id(t, 32)
    {
        return err(
            ErrorCode::InvalidTraceContext,
            "trace_id",
            "trace_id must be 32 lower-case hex digits, not all zero".into(),
        );
    }
    if let Some(s) = &event.span_id
        && !is_lower_hex_id(s, 16)
    {
        return err(
            ErrorCode::InvalidTraceContext,
            "span_id",
            "span_id must be 16 lower-case hex digits, not all zero".into(),
        );
    }

    // Stored as a signed 64-bit integer (SQL BIGINT).
    if event.seq.is_some_and(|s| i64::try_from(s).is_err()) {
        return err(
            ErrorCode::InvalidField,
            "seq",
            "seq must be at most 9223372036854775807".into(),
        );
    }

    let ts = event.timestamp.unwrap_or(received_at);
    let earliest = received_at
        .millis()
        .saturating_sub(secs_to_millis(limits.max_past_secs));
    let latest = received_at
        .millis()
        .saturating_add(secs_to_millis(limits.max_future_secs));
    if ts.millis() < earliest || ts.millis() > latest {
        return err(
            ErrorCode::TimestampOutOfRange,
            "timestamp",
            format!(
                "timestamp {ts} must lie between {} before and {} after arrival ({received_at})",
                human_secs(limits.max_past_secs),
                human_secs(limits.max_future_secs)
            ),
        );
    }

    check_properties(&event.properties, limits)
}

/// Fills in what an event may leave out: `timestamp` (the edge's arrival
/// time) and, for logs, `level: info`. [`validate_event`] does this first;
/// on its own it is for events that were accepted before and are not
/// judged again (the aggregator's redelivery from its spool).
pub fn fill_defaults(event: &mut Event, received_at: Timestamp) {
    event.timestamp.get_or_insert(received_at);
    if event.kind == Kind::Log {
        event.level.get_or_insert(Level::Info);
    }
}

fn secs_to_millis(secs: u64) -> i64 {
    i64::try_from(secs)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000)
}

fn human_secs(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{} d", s / 86_400),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s => format!("{s} s"),
    }
}

fn check_str(
    field: &str,
    value: Option<&str>,
    max: usize,
    non_empty: bool,
) -> Result<(), FieldError> {
    let Some(v) = value else { return Ok(()) };
    if v.len() > max {
        return Err(FieldError::new(
            ErrorCode::StringTooLong,
            Some(field),
            format!("{field} is longer than {max} bytes"),
        ));
    }
    if non_empty && v.is_empty() {
        return Err(FieldError::new(
            ErrorCode::InvalidField,
            Some(field),
            format!("{field} must not be empty; omit it instead"),
        ));
    }
    if v.contains('\0') {
        return Err(nul_error(field));
    }
    Ok(())
}

fn check_context(name: &str, value: Option<&str>, max: usize) -> Result<(), FieldError> {
    let Some(v) = value else { return Ok(()) };
    // The field's name is built only for an error (this runs 8 times per event).
    let field = || format!("context.{name}");
    if v.len() > max {
        let field = field();
        return Err(FieldError::new(
            ErrorCode::StringTooLong,
            Some(&field),
            format!("{field} is longer than {max} bytes"),
        ));
    }
    if has_control(v) {
        let field = field();
        return Err(control_error(&field, &field));
    }
    Ok(())
}

// PostgreSQL text and JSONB cannot hold U+0000: reject it here, with a clear
// error, rather than dead-letter the row later.
fn nul_error(field: &str) -> FieldError {
    FieldError::new(
        ErrorCode::InvalidField,
        Some(field),
        format!("{field} must not contain U+0000"),
    )
}

/// Checks `properties` in one pass over its text, building nothing:
/// nesting depth, the number of keys and elements, each key's length and
/// characters, no U+0000 in any string.
fn check_properties(properties: &Properties, limits: &Limits) -> Result<(), FieldError> {
    if properties.is_empty() || plainly_within_limits(properties.get().as_bytes(), limits) {
        return Ok(());
    }
    scan_properties(properties, limits)
}

/// Most properties are plain: no escapes in their strings, no exponents in
/// their numbers. Those are checked here by one loop over their bytes,
/// without a parser, for every rule [`scan_properties`] applies. `true`:
/// within the limits. `false`: not plain, or over a limit — the parser's
/// scan decides (and names the rule).
///
/// `text` is JSON already checked by serde_json (it was captured as a
/// `RawValue`), so strings hold no raw control characters, literals are
/// `true`/`false`/`null`, and brackets pair up.
fn plainly_within_limits(text: &[u8], limits: &Limits) -> bool {
    // One bit per level: set where the container is an object.
    let max_depth = limits.max_property_depth.min(63);
    let (mut depth, mut objects, mut entries, mut key_next) = (0usize, 0u64, 0usize, false);
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        i += 1;
        match b {
            b'"' => {
                let rest = text.get(i..).unwrap_or_default();
                let Some(len) = memchr::memchr2(b'"', b'\\', rest) else {
                    return false;
                };
                let s = rest.get(..len).unwrap_or_default();
                // An escape may decode to anything: the parser reads it.
                if rest.get(len) != Some(&b'"') {
                    return false;
                }
                if std::mem::take(&mut key_next) {
                    entries += 1;
                    // DEL is the one control character JSON lets through raw.
                    if s.len() > limits.max_property_key_bytes || s.contains(&0x7f) {
                        return false;
                    }
                }
                i += len + 1;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return false;
                }
                if b == b'{' {
                    objects |= 1 << depth;
                    key_next = true;
                } else {
                    objects &= !(1 << depth);
                    if first_byte(text.get(i..).unwrap_or_default()) != Some(b']') {
                        entries += 1;
                    }
                }
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                key_next = false;
            }
            b',' if objects & (1 << depth) != 0 => key_next = true,
            b',' => entries += 1,
            b'-' | b'0'..=b'9' => {
                let rest = text.get(i..).unwrap_or_default();
                let len = rest
                    .iter()
                    .position(|c| !matches!(c, b'0'..=b'9' | b'.' | b'-' | b'+' | b'e' | b'E'))
                    .unwrap_or(rest.len());
                let number = rest.get(..len).unwrap_or_default();
                // Only an exponent or hundreds of digits can pass f64's range.
                if len > 300 || number.iter().any(|c| matches!(c, b'e' | b'E')) {
                    return false;
                }
                i += len;
            }
            b't' | b'n' => i += 3,
            b'f' => i += 4,
            _ => {}
        }
    }
    entries <= limits.max_property_entries
}

/// [`check_properties`] by serde_json's parser: exact for every text,
/// escapes decoded.
fn scan_properties(properties: &Properties, limits: &Limits) -> Result<(), FieldError> {
    let mut scan = PropertyScan {
        entries: 0,
        limits,
        refused: None,
    };
    let mut de = serde_json::Deserializer::from_str(properties.get());
    let scanned = ScanValue {
        scan: &mut scan,
        depth: 0,
    }
    .deserialize(&mut de);
    match (scanned, scan.refused) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(refused)) => Err(refused),
        // What only a full parse finds (a lone surrogate escape, a number
        // out of range): refused as the whole-event parse used to refuse it.
        (Err(e), None) if e.classify() == serde_json::error::Category::Data => {
            Err(FieldError::new(
                ErrorCode::InvalidField,
                Some("properties"),
                strip_position(&e.to_string()),
            ))
        }
        (Err(e), None) => Err(FieldError::new(
            ErrorCode::MalformedJson,
            None,
            strip_position(&e.to_string()),
        )),
    }
}

/// What the scan has counted, and the rule it found broken.
struct PropertyScan<'a> {
    entries: usize,
    limits: &'a Limits,
    refused: Option<FieldError>,
}

impl PropertyScan<'_> {
    /// Records why the scan stops; the parser's own error is only a signal.
    fn refuse<E: serde::de::Error>(&mut self, e: FieldError) -> E {
        self.refused = Some(e);
        E::custom("refused")
    }

    fn count<E: serde::de::Error>(&mut self) -> Result<(), E> {
        self.entries += 1;
        if self.entries > self.limits.max_property_entries {
            let max = self.limits.max_property_entries;
            return Err(self.refuse(FieldError::new(
                ErrorCode::TooManyProperties,
                Some("properties"),
                format!("properties hold more than {max} keys and elements"),
            )));
        }
        Ok(())
    }

    fn key<E: serde::de::Error>(&mut self, key: &str) -> Result<(), E> {
        self.count()?;
        let max = self.limits.max_property_key_bytes;
        if key.len() > max {
            return Err(self.refuse(FieldError::new(
                ErrorCode::StringTooLong,
                Some("properties"),
                format!("a property key is longer than {max} bytes"),
            )));
        }
        if has_control(key) {
            return Err(self.refuse(control_error("properties", "a property key")));
        }
        Ok(())
    }

    /// A container opens inside one at `depth`.
    fn open<E: serde::de::Error>(&mut self, depth: usize) -> Result<(), E> {
        if depth + 1 > self.limits.max_property_depth {
            let e = too_deep(self.limits);
            return Err(self.refuse(e));
        }
        Ok(())
    }
}

/// One value inside `properties`; `depth` is the nesting level of the
/// container holding it (0 for the object itself).
struct ScanValue<'s, 'l> {
    scan: &'s mut PropertyScan<'l>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ScanValue<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScanValue<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        if s.contains('\0') {
            return Err(self.scan.refuse(nul_error("properties")));
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.scan.open(self.depth)?;
        loop {
            let item = ScanValue {
                scan: &mut *self.scan,
                depth: self.depth + 1,
            };
            if seq.next_element_seed(item)?.is_none() {
                return Ok(());
            }
            self.scan.count()?;
        }
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.scan.open(self.depth)?;
        while map.next_key_seed(ScanKey(&mut *self.scan))?.is_some() {
            map.next_value_seed(ScanValue {
                scan: &mut *self.scan,
                depth: self.depth + 1,
            })?;
        }
        Ok(())
    }
}

/// A key inside `properties`.
struct ScanKey<'s, 'l>(&'s mut PropertyScan<'l>);

impl<'de> DeserializeSeed<'de> for ScanKey<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for ScanKey<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<(), E> {
        self.0.key(key)
    }
}

/// A hyphenated UUID, any version (`8-4-4-4-12` hex digits, either case).
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::try_parse(s).is_ok()
}

/// A ULID: 26 Crockford base32 characters, the first at most `7` (128 bits).
pub fn is_ulid(s: &str) -> bool {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZabcdefghjkmnpqrstvwxyz";
    s.len() == 26 && s.as_bytes()[0] <= b'7' && s.bytes().all(|b| ALPHABET.contains(&b))
}

fn is_lower_hex_id(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

impl FieldError {
    /// Sets the event id this error is about.
    pub fn with_event_id(mut self, id: Option<String>) -> Self {
        self.event_id = id;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: Timestamp = Timestamp(1_795_701_600_000); // 2026-11-26T14:00:00Z
    const ID: &str = "0192f0c1-7b3a-7cc2-9a57-1d2e3f4a5b6c";

    fn ev(extra: Value) -> Value {
        let mut base = json!({"event_id": ID, "name": "checkout"});
        if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
            for (k, v) in e {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    b.insert(k, v);
                }
            }
        }
        base
    }

    fn one(event: Value) -> Result<Event, FieldError> {
        parse_event(event.to_string().as_bytes(), &Limits::default(), NOW)
    }

    fn deep(levels: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!({ "x": v });
        }
        v
    }

    #[test]
    fn event_rules_table() {
        let long = "x".repeat(201);
        // (what, input, expected error code and field; None: accepted)
        type Case<'a> = (&'a str, Value, Option<(ErrorCode, &'a str)>);
        let cases: Vec<Case<'_>> = vec![
            ("minimal event", ev(json!({})), None),
            (
                "ulid id",
                ev(json!({"event_id": "01JDQ2Z8C6V4W3X2Y1Z0ABCDEF"})),
                None,
            ),
            (
                "missing id",
                ev(json!({"event_id": null})),
                Some((ErrorCode::MissingField, "event_id")),
            ),
            (
                "bad id",
                ev(json!({"event_id": "42"})),
                Some((ErrorCode::InvalidEventId, "event_id")),
            ),
            (
                "ulid overflow",
                ev(json!({"event_id": "81JDQ2Z8C6V4W3X2Y1Z0ABCDEF"})),
                Some((ErrorCode::InvalidEventId, "event_id")),
            ),
            (
                "id wrong type",
                ev(json!({"event_id": 7})),
                Some((ErrorCode::InvalidField, "event_id")),
            ),
            (
                "missing name",
                ev(json!({"name": null})),
                Some((ErrorCode::MissingField, "name")),
            ),
            (
                "blank name",
                ev(json!({"name": "  "})),
                Some((ErrorCode::MissingField, "name")),
            ),
            (
                "long name",
                ev(json!({"name": long})),
                Some((ErrorCode::StringTooLong, "name")),
            ),
            (
                "log without message",
                ev(json!({"kind": "log"})),
                Some((ErrorCode::MissingField, "message")),
            ),
            (
                "log with message",
                ev(json!({"kind": "log", "message": "hi", "name": null})),
                None,
            ),
            (
                "bad kind",
                ev(json!({"kind": "metric"})),
                Some((ErrorCode::InvalidField, "kind")),
            ),
            (
                "bad level",
                ev(json!({"level": "loud"})),
                Some((ErrorCode::InvalidField, "level")),
            ),
            (
                "bad priority",
                ev(json!({"priority": "urgent"})),
                Some((ErrorCode::InvalidField, "priority")),
            ),
            (
                "unknown field",
                ev(json!({"nmae": "x"})),
                Some((ErrorCode::UnknownField, "nmae")),
            ),
            (
                "unknown context field",
                ev(json!({"context": {"osv": "1"}})),
                Some((ErrorCode::UnknownField, "context.osv")),
            ),
            (
                "context type",
                ev(json!({"context": {"app_version": 3}})),
                Some((ErrorCode::InvalidField, "context.app_version")),
            ),
            (
                "long context",
                ev(json!({"context": {"platform": long}})),
                Some((ErrorCode::StringTooLong, "context.platform")),
            ),
            (
                "empty user id",
                ev(json!({"user_id": ""})),
                Some((ErrorCode::InvalidField, "user_id")),
            ),
            (
                "nul in user id",
                ev(json!({"user_id": "a\u{0}b"})),
                Some((ErrorCode::InvalidField, "user_id")),
            ),
            (
                "nul in property",
                ev(json!({"properties": {"a": ["x\u{0}"]}})),
                Some((ErrorCode::InvalidField, "properties")),
            ),
            (
                "properties not object",
                ev(json!({"properties": [1]})),
                Some((ErrorCode::InvalidField, "properties")),
            ),
            (
                "line break in a property key",
                ev(json!({"properties": {"a\nb": 1}})),
                Some((ErrorCode::InvalidCharacter, "properties")),
            ),
            (
                "tab in a nested property key",
                ev(json!({"properties": {"cart": [{"sku\tid": "x"}]}})),
                Some((ErrorCode::InvalidCharacter, "properties")),
            ),
            (
                "DEL in a property key",
                ev(json!({"properties": {"a\u{7f}": 1}})),
                Some((ErrorCode::InvalidCharacter, "properties")),
            ),
            (
                "NUL in a property key",
                ev(json!({"properties": {"a\u{0}": 1}})),
                Some((ErrorCode::InvalidCharacter, "properties")),
            ),
            (
                "line breaks in a property value are fine",
                ev(json!({"properties": {"note": "two\nlines"}})),
                None,
            ),
            (
                "line break in the name",
                ev(json!({"name": "check\nout"})),
                Some((ErrorCode::InvalidCharacter, "name")),
            ),
            (
                "carriage return in a context value",
                ev(json!({"context": {"platform": "web\r"}})),
                Some((ErrorCode::InvalidCharacter, "context.platform")),
            ),
            (
                "line breaks in a log message are fine",
                ev(json!({"kind": "log", "message": "at a\nat b", "name": null})),
                None,
            ),
            (
                "context as an array",
                ev(json!({"context": ["4.2.0", "web"]})),
                Some((ErrorCode::InvalidField, "context")),
            ),
            ("depth at limit", ev(json!({"properties": deep(8)})), None),
            (
                "too deep",
                ev(json!({"properties": deep(9)})),
                Some((ErrorCode::PropertiesTooDeep, "properties")),
            ),
            (
                "long key",
                ev(json!({"properties": {long.clone(): 1}})),
                Some((ErrorCode::StringTooLong, "properties")),
            ),
            (
                "bad trace id",
                ev(json!({"trace_id": "4BF92F3577B34DA6A3CE929D0E0E4736"})),
                Some((ErrorCode::InvalidTraceContext, "trace_id")),
            ),
            (
                "zero span id",
                ev(json!({"span_id": "0000000000000000"})),
                Some((ErrorCode::InvalidTraceContext, "span_id")),
            ),
            (
                "good trace",
                ev(
                    json!({"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}),
                ),
                None,
            ),
            (
                "bad timestamp",
                ev(json!({"timestamp": "noon"})),
                Some((ErrorCode::InvalidTimestamp, "timestamp")),
            ),
            (
                "too old",
                ev(json!({"timestamp": "2026-10-26T13:59:59Z"})),
                Some((ErrorCode::TimestampOutOfRange, "timestamp")),
            ),
            (
                "30 days old",
                ev(json!({"timestamp": "2026-10-27T14:00:00Z"})),
                None,
            ),
            (
                "skew within an hour",
                ev(json!({"timestamp": "2026-11-26T15:00:00Z"})),
                None,
            ),
            (
                "far future",
                ev(json!({"timestamp": "2026-11-26T15:00:01Z"})),
                Some((ErrorCode::TimestampOutOfRange, "timestamp")),
            ),
            (
                "negative seq",
                ev(json!({"seq": -1})),
                Some((ErrorCode::InvalidField, "seq")),
            ),
        ];
        for (what, input, expected) in cases {
            let got = one(input);
            match (expected, got) {
                (None, Ok(_)) => {}
                (Some((code, field)), Err(e)) => {
                    assert_eq!(e.code, code, "{what}: {e:?}");
                    assert_eq!(e.field.as_deref(), Some(field), "{what}: {e:?}");
                }
                (expected, got) => panic!("{what}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let e = one(ev(json!({}))).unwrap();
        assert_eq!(e.timestamp, Some(NOW));
        let log = one(ev(json!({"kind": "log", "message": "m"}))).unwrap();
        assert_eq!(log.level, Some(Level::Info));
    }

    /// Properties are checked on their text, with no tree built: what
    /// only the text can hold must still be judged as a parser would.
    #[test]
    fn properties_text_is_judged_escapes_decoded_and_kept_verbatim() {
        let event =
            |props: &str| format!(r#"{{"event_id":"{ID}","name":"n","properties":{props}}}"#);
        let judge = |props: &str| parse_event(event(props).as_bytes(), &Limits::default(), NOW);
        let cases: [(&str, ErrorCode); 7] = [
            (r#"{"a":"x\u0000y"}"#, ErrorCode::InvalidField),
            (r#"{"a":["\u0000"]}"#, ErrorCode::InvalidField),
            (r#"{"a\u000ab":1}"#, ErrorCode::InvalidCharacter),
            (r#"{"a\u007f":1}"#, ErrorCode::InvalidCharacter),
            // PostgreSQL's jsonb refuses a lone surrogate: so must we.
            (r#"{"a":"\ud800"}"#, ErrorCode::MalformedJson),
            (r#"{"\udc00":1}"#, ErrorCode::MalformedJson),
            (r#"{"a":1e400}"#, ErrorCode::MalformedJson),
        ];
        for (props, code) in cases {
            let err = judge(props).expect_err(props);
            assert_eq!(err.code, code, "{props}: {err:?}");
        }
        // A key given twice counts twice.
        let limits = Limits {
            max_property_entries: 2,
            ..Limits::default()
        };
        let twice = event(r#"{"a":1,"a":2,"a":3}"#);
        let err = parse_event(twice.as_bytes(), &limits, NOW).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooManyProperties);
        // Accepted text is stored as sent: spacing, escapes, number spelling.
        let sent =
            r#"{ "price" : 1.10, "path":"\/a\u00e9", "big": 123456789012345678901234567890 }"#;
        let e = judge(sent).unwrap();
        assert_eq!(e.properties.get(), sent);
        assert_eq!(e.properties.to_map()["path"], "/a\u{e9}");
    }

    /// A refused event is parsed again to name its field; properties
    /// before the bad field must not get in the way of that.
    #[test]
    fn a_field_after_the_properties_is_still_named_when_refused() {
        let json = format!(
            r#"{{"event_id":"{ID}","name":"n","properties":{{"a":[1,{{"b":"c"}}]}},"level":"loud"}}"#
        );
        let err = parse_event(json.as_bytes(), &Limits::default(), NOW).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidField, "{err:?}");
        assert_eq!(err.field.as_deref(), Some("level"), "{err:?}");
        let json = format!(r#"{{"event_id":"{ID}","name":"n","properties":{{"a":1}},"nmae":1}}"#);
        let err = parse_event(json.as_bytes(), &Limits::default(), NOW).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnknownField, "{err:?}");
        assert_eq!(err.field.as_deref(), Some("nmae"), "{err:?}");
    }

    #[test]
    fn property_entries_are_counted_at_every_level() {
        let limits = Limits {
            max_property_entries: 4,
            ..Limits::default()
        };
        let ok = ev(json!({"properties": {"a": [1, 2], "b": 3}})); // a, 1, 2, b
        assert!(parse_event(ok.to_string().as_bytes(), &limits, NOW).is_ok());
        let over = ev(json!({"properties": {"a": [1, 2, 3], "b": 3}}));
        let e = parse_event(over.to_string().as_bytes(), &limits, NOW).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManyProperties);
    }

    #[test]
    fn batch_is_accepted_in_part_with_per_event_errors() {
        let body = json!({"batch": [
            ev(json!({})),
            ev(json!({"event_id": "not-an-id"})),
            ev(json!({"event_id": "0192f0c1-7b3a-7cc2-9a57-000000000002", "name": null})),
            ev(json!({})),
        ], "sent_at": "2026-11-26T14:00:00Z"});
        let out = parse_batch(body.to_string().as_bytes(), &Limits::default(), NOW).unwrap();
        assert_eq!(out.accepted.len(), 1);
        assert_eq!(out.sent_at, Some(NOW));
        let summary: Vec<_> = out
            .rejected
            .iter()
            .map(|e| (e.index, e.code, e.event_id.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    Some(1),
                    ErrorCode::InvalidEventId,
                    Some("not-an-id".to_owned())
                ),
                (
                    Some(2),
                    ErrorCode::MissingField,
                    Some("0192f0c1-7b3a-7cc2-9a57-000000000002".to_owned())
                ),
                (Some(3), ErrorCode::DuplicateEventId, Some(ID.to_owned())),
            ]
        );
    }

    #[test]
    fn whole_request_errors_table() {
        let limits = Limits {
            max_batch_events: 2,
            max_body_bytes: 4096,
            ..Limits::default()
        };
        let e = ev(json!({}));
        let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
            (
                "not json",
                b"{\"batch\": [".to_vec(),
                ErrorCode::MalformedJson,
            ),
            ("empty body", Vec::new(), ErrorCode::MalformedJson),
            ("not utf8", vec![0xff, 0xfe], ErrorCode::MalformedJson),
            ("array body", b"[]".to_vec(), ErrorCode::MalformedJson),
            ("no batch", b"{}".to_vec(), ErrorCode::MissingField),
            (
                "batch not array",
                br#"{"batch":{}}"#.to_vec(),
                ErrorCode::InvalidField,
            ),
            (
                "empty batch",
                br#"{"batch":[]}"#.to_vec(),
                ErrorCode::EmptyBatch,
            ),
            (
                "unknown key",
                br#"{"batch":[],"extra":1}"#.to_vec(),
                ErrorCode::UnknownField,
            ),
            (
                "bad sent_at",
                br#"{"batch":[],"sent_at":"soon"}"#.to_vec(),
                ErrorCode::InvalidTimestamp,
            ),
            (
                "too many",
                json!({"batch": [e, e, e]}).to_string().into_bytes(),
                ErrorCode::TooManyEvents,
            ),
            ("too large", vec![b' '; 4097], ErrorCode::BodyTooLarge),
        ];
        for (what, body, code) in cases {
            let got = parse_batch(&body, &limits, NOW).map(|_| ()).unwrap_err();
            assert_eq!(got.code, code, "{what}: {got:?}");
        }
    }

    #[test]
    fn oversized_event_is_rejected_alone() {
        let limits = Limits {
            max_event_bytes: 300,
            ..Limits::default()
        };
        let big = ev(json!({"properties": {"blob": "y".repeat(400)}}));
        let small = ev(json!({"event_id": "0192f0c1-7b3a-7cc2-9a57-000000000009"}));
        let body = json!({"batch": [big, small]}).to_string();
        let out = parse_batch(body.as_bytes(), &limits, NOW).unwrap();
        assert_eq!(out.accepted.len(), 1);
        assert_eq!(out.rejected[0].code, ErrorCode::EventTooLarge);
        assert_eq!(out.rejected[0].index, Some(0));
    }

    #[test]
    fn write_key_may_travel_in_the_body_for_beacons() {
        let body = json!({"batch": [ev(json!({}))], "write_key": "wk_demo"}).to_string();
        let out = parse_batch(body.as_bytes(), &Limits::default(), NOW).unwrap();
        assert_eq!(out.write_key.as_deref(), Some("wk_demo"));
    }

    #[test]
    fn hostile_nesting_gets_the_depth_code_at_every_depth() {
        let limits = Limits {
            max_body_bytes: 1 << 20,
            max_event_bytes: 1 << 20,
            ..Limits::default()
        };
        // Past the request bound (the whole body is refused) and below it
        // (the event alone is), including depths serde_json cannot parse.
        for levels in [9, 60, 97, 100, 126, 127, 200, 100_000] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let props = format!("{}1{}", open.repeat(levels), close.repeat(levels));
                let body = format!(
                    "{{\"batch\":[{{\"event_id\":\"{ID}\",\"name\":\"n\",\"properties\":{props}}}]}}"
                );
                match parse_batch(body.as_bytes(), &limits, NOW) {
                    Err(e) => assert_eq!(e.code, ErrorCode::PropertiesTooDeep, "{levels} {open}"),
                    Ok(out) => {
                        assert!(out.accepted.is_empty());
                        assert_eq!(
                            out.rejected[0].code,
                            ErrorCode::PropertiesTooDeep,
                            "{levels} {open}"
                        );
                    }
                }
                let one =
                    format!("{{\"event_id\":\"{ID}\",\"name\":\"n\",\"properties\":{props}}}");
                let e = parse_event(one.as_bytes(), &limits, NOW).unwrap_err();
                assert_eq!(e.code, ErrorCode::PropertiesTooDeep, "{levels} {open}");
            }
        }
        // Nesting inside strings is text, not depth.
        let deep_text = ev(json!({"properties": {"s": "[".repeat(10_000)}}));
        assert!(one(deep_text).is_ok());
    }

    #[test]
    fn arrays_are_not_objects() {
        // serde would read an array as the struct's fields in order.
        let as_array = json!([ID, "2026-11-26T14:00:00Z", "event", "checkout"]).to_string();
        let e = parse_event(as_array.as_bytes(), &Limits::default(), NOW).unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedJson);
        let nested = json!([[ev(json!({}))]]).to_string();
        let e = parse_batch(nested.as_bytes(), &Limits::default(), NOW).unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedJson);
        let event_as_array = json!({"batch": [[ID, null, "event", "checkout"], ev(json!({}))]});
        let out = parse_batch(
            event_as_array.to_string().as_bytes(),
            &Limits::default(),
            NOW,
        )
        .unwrap();
        assert_eq!(out.accepted.len(), 1);
        assert_eq!(out.rejected[0].code, ErrorCode::MalformedJson);
        assert_eq!(out.rejected[0].index, Some(0));
        let brackets = "[".repeat(100_000);
        let e = parse_batch(brackets.as_bytes(), &Limits::default(), NOW).unwrap_err();
        assert_eq!(e.code, ErrorCode::PropertiesTooDeep);
    }

    /// What the one-pass reading must give: the event-by-event answer
    /// when that accepts every event, else nothing (and the caller reads
    /// event by event).
    fn assert_one_pass_agrees(body: &[u8], limits: &Limits) -> Option<BatchOutcome> {
        let by_event = parse_batch_by_event(body, limits, NOW);
        let one_pass = parse_valid_batch(body, limits, NOW);
        let text = String::from_utf8_lossy(body);
        let expected = by_event.clone().ok().filter(|o| o.rejected.is_empty());
        assert_eq!(one_pass, expected, "{text}");
        assert_eq!(parse_batch(body, limits, NOW), by_event, "{text}");
        one_pass
    }

    #[test]
    fn valid_batches_are_read_in_one_pass_the_rest_event_by_event() {
        let sample = crate::sample::typical_events(100);
        let typical = crate::sample::batch_request_json(&sample);
        let out = assert_one_pass_agrees(typical.as_bytes(), &Limits::default())
            .expect("a valid batch is read in one pass");
        assert_eq!(out.accepted.len(), 100);
        assert_eq!(out.sent_at, Some(crate::sample::SAMPLE_NOW));

        let limits = Limits {
            max_batch_events: 3,
            max_event_bytes: 400,
            max_body_bytes: 4096,
            ..Limits::default()
        };
        let e = ev(json!({}));
        let e2 = ev(json!({"event_id": "0192f0c1-7b3a-7cc2-9a57-000000000002"}));
        let at_depth = |levels| ev(json!({"properties": deep(levels)}));
        // (what, body, read in one pass)
        let cases: Vec<(&str, String, bool)> = vec![
            ("two events", json!({"batch": [e, e2]}).to_string(), true),
            (
                "spaces, sent_at and write_key",
                format!(
                    " {{ \"write_key\" : \"wk\", \"batch\" : [ {e} , {e2} ] , \"sent_at\": 1795701600000 }} "
                ),
                true,
            ),
            ("batch null", r#"{"batch":null}"#.into(), false),
            ("no batch", "{}".into(), false),
            ("empty batch", r#"{"batch":[]}"#.into(), false),
            (
                "a bad event",
                json!({"batch": [e, ev(json!({"event_id": "x"}))]}).to_string(),
                false,
            ),
            (
                "a duplicate id",
                json!({"batch": [e, e]}).to_string(),
                false,
            ),
            (
                "too many",
                json!({"batch": [e, e2, e, e2]}).to_string(),
                false,
            ),
            (
                "an event too large",
                json!({"batch": [ev(json!({"properties": {"s": "y".repeat(400)}})), e2]})
                    .to_string(),
                false,
            ),
            (
                "an event exactly at the size limit",
                {
                    let base = ev(json!({"properties": {"s": ""}})).to_string();
                    let pad = "y".repeat(400 - base.len());
                    json!({"batch": [ev(json!({"properties": {"s": pad}})), e2]}).to_string()
                },
                true,
            ),
            (
                "an event a byte over the size limit",
                {
                    let base = ev(json!({"properties": {"s": ""}})).to_string();
                    let pad = "y".repeat(401 - base.len());
                    json!({"batch": [ev(json!({"properties": {"s": pad}})), e2]}).to_string()
                },
                false,
            ),
            (
                "properties at the depth limit",
                json!({"batch": [at_depth(8)]}).to_string(),
                true,
            ),
            (
                "properties past the depth limit",
                json!({"batch": [at_depth(9)]}).to_string(),
                false,
            ),
            (
                "an array for an event",
                json!({"batch": [[ID, null, "event", "n"]]}).to_string(),
                false,
            ),
            (
                "an array beside an event",
                json!({"batch": [e, [ID]]}).to_string(),
                false,
            ),
            (
                "a number for an event",
                json!({"batch": [e, 7]}).to_string(),
                false,
            ),
            ("an array body", json!([[e]]).to_string(), false),
            ("trailing bytes", format!("{{\"batch\":[{e}]}}x"), false),
            ("unclosed", format!("{{\"batch\":[{e}]"), false),
            (
                "unknown key",
                json!({"batch": [e], "x": [e]}).to_string(),
                false,
            ),
            (
                "sent_at an array",
                json!({"batch": [e], "sent_at": [e]}).to_string(),
                false,
            ),
            (
                "batch twice",
                format!("{{\"batch\":[{e}],\"batch\":[{e2}]}}"),
                false,
            ),
            (
                "brackets in strings",
                json!({"batch": [ev(json!({"name": "[{]}", "properties": {"a\"[": "}{"}}))]})
                    .to_string(),
                true,
            ),
            (
                "a NUL escape in properties",
                json!({"batch": [ev(json!({"properties": {"a": "\u{0}"}}))]}).to_string(),
                false,
            ),
            (
                "body too large",
                format!("{{\"batch\":[{e}]}}{}", " ".repeat(4096)),
                false,
            ),
        ];
        for (what, body, one_pass) in cases {
            let got = assert_one_pass_agrees(body.as_bytes(), &limits);
            assert_eq!(got.is_some(), one_pass, "{what}");
        }
        // Invalid UTF-8 inside a string.
        let mut body = json!({"batch": [ev(json!({"name": "ab"}))]})
            .to_string()
            .into_bytes();
        let at = body.windows(2).position(|w| w == b"ab").unwrap();
        body[at] = 0xff;
        assert!(assert_one_pass_agrees(&body, &limits).is_none());
    }

    proptest::proptest! {
        #[test]
        fn one_pass_and_event_by_event_agree_on_damaged_batches(
            n in 1usize..6,
            edits in proptest::collection::vec(
                (0usize..4000, proptest::sample::select(b"[]{}\"\\,:0a \x00\xff".to_vec())),
                0..4,
            ),
            remove in proptest::bool::ANY,
            max_event_bytes in 550usize..700,
        ) {
            let events = crate::sample::typical_events(n);
            let mut body = crate::sample::batch_request_json(&events).into_bytes();
            for (at, byte) in edits {
                let at = at % body.len();
                if remove { body.remove(at); } else { body[at] = byte; }
            }
            // Typical events are 560-700 bytes: some fit, some do not.
            let limits = Limits { max_event_bytes, ..Limits::default() };
            assert_one_pass_agrees(&body, &limits);
        }
    }

    fn small_limits(depth: usize, entries: usize, key: usize) -> Limits {
        Limits {
            max_property_depth: depth,
            max_property_entries: entries,
            max_property_key_bytes: key,
            ..Limits::default()
        }
    }

    fn as_properties(value: &Value, pretty: bool) -> Properties {
        let text = if pretty {
            serde_json::to_string_pretty(value)
        } else {
            serde_json::to_string(value)
        };
        Properties::from_json(text.unwrap()).unwrap()
    }

    /// Properties as JSON values: `plain` ones have no string that needs an
    /// escape and no number written with an exponent.
    fn properties_strategy(plain: bool) -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let text = if plain {
            "[a-c \u{7f}é]{0,8}"
        } else {
            "[a-c\"\\\u{0}\u{1}\u{7f}\u{1F600}é]{0,8}"
        };
        let number = if plain {
            any::<i64>().prop_map(Value::from).boxed()
        } else {
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                Just(Value::from(u64::MAX)),
            ]
            .boxed()
        };
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            number,
            text.prop_map(Value::from),
        ];
        let tree = leaf.prop_recursive(6, 40, 5, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                proptest::collection::btree_map(text, inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        proptest::collection::btree_map(text, tree, 1..5)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    /// Properties, written compactly or spaced, with small limits.
    fn properties_case(
        plain: bool,
    ) -> impl proptest::strategy::Strategy<Value = (Properties, Limits)> {
        use proptest::prelude::*;
        let limits = (1usize..7, 0usize..20, 2usize..12);
        (properties_strategy(plain), any::<bool>(), limits).prop_map(
            |(value, pretty, (depth, entries, key))| {
                (
                    as_properties(&value, pretty),
                    small_limits(depth, entries, key),
                )
            },
        )
    }

    proptest::proptest! {
        // A limit met exactly is a narrow case: more cases find it.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        #[test]
        fn the_plain_properties_check_never_passes_what_the_parser_refuses(
            (p, limits) in properties_case(false),
        ) {
            if plainly_within_limits(p.get().as_bytes(), &limits) {
                proptest::prop_assert!(scan_properties(&p, &limits).is_ok(), "{}", p.get());
            }
        }

        #[test]
        fn plain_properties_are_judged_alike_by_both_checks(
            (p, limits) in properties_case(true),
        ) {
            proptest::prop_assert_eq!(
                plainly_within_limits(p.get().as_bytes(), &limits),
                scan_properties(&p, &limits).is_ok(),
                "{}", p.get()
            );
        }
    }

    #[test]
    fn typical_properties_are_checked_without_the_parser() {
        for e in crate::sample::typical_events(10) {
            assert!(plainly_within_limits(
                e.properties.get().as_bytes(),
                &Limits::default()
            ));
        }
        // Not plain: the parser decides.
        for text in [r#"{"a\u0000":1}"#, r#"{"a":1e3}"#, r#"{"a":"\n"}"#] {
            assert!(
                !plainly_within_limits(text.as_bytes(), &Limits::default()),
                "{text}"
            );
        }
        // Limits met exactly, and DEL in a key (the cases the property
        // tests found when the loop was broken on purpose): both checks agree.
        let exact = [
            ("{\"\":{\"\u{7f}\":null}}", small_limits(2, 2, 1), false),
            (
                r#"{"":[null],"a":null,"é":null}"#,
                small_limits(2, 4, 2),
                true,
            ),
            (r#"{"":[null]}"#, small_limits(2, 2, 2), true),
            (r#"{"":[null]}"#, small_limits(2, 1, 2), false),
            (r#"{"ab":{"c":[1]}}"#, small_limits(3, 3, 2), true),
            (r#"{"ab":{"c":[1]}}"#, small_limits(2, 3, 2), false),
            (r#"{"abc":1}"#, small_limits(1, 1, 2), false),
        ];
        for (text, limits, within) in exact {
            let p = Properties::from_json(text.into()).unwrap();
            assert_eq!(
                plainly_within_limits(text.as_bytes(), &limits),
                within,
                "{text}"
            );
            assert_eq!(scan_properties(&p, &limits).is_ok(), within, "{text}");
        }
    }

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert_eq!(nesting_depth(b"{}", 10), 1);
        assert_eq!(nesting_depth(br#"{"a":[{"b":1}]}"#, 10), 3);
        assert_eq!(nesting_depth(br#"{"a":"[[[\"[["}"#, 10), 1);
        assert_eq!(nesting_depth(b"[[[[[[", 3), 4, "stops past the cap");
        assert_eq!(nesting_depth(b"]]]{", 10), 1);
        assert_eq!(nesting_depth(br#"{"a\\":["b\\\"[",{}]}"#, 10), 3);
        assert_eq!(nesting_depth(br#"["unterminated [[["#, 10), 1);
        assert_eq!(nesting_depth(b"[\"\\", 10), 1, "a final backslash");
    }

    /// The byte-at-a-time scan `nesting_depth` replaced, as the reference.
    fn depth_byte_by_byte(json: &[u8], cap: usize) -> usize {
        let (mut depth, mut max) = (0usize, 0usize);
        let (mut in_string, mut escaped) = (false, false);
        for &b in json {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max {
                        max = depth;
                        if max > cap {
                            return max;
                        }
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        max
    }

    proptest::proptest! {
        #[test]
        fn the_depth_scan_agrees_with_a_byte_by_byte_one(
            bytes in proptest::collection::vec(
                proptest::sample::select(b"[]{}\"\\a,:".to_vec()), 0..200),
            cap in 0usize..12,
        ) {
            proptest::prop_assert_eq!(nesting_depth(&bytes, cap), depth_byte_by_byte(&bytes, cap));
        }
    }

    #[test]
    fn defaults_are_filled_without_judging() {
        let mut e: Event =
            serde_json::from_value(json!({"event_id": "not-an-id", "kind": "log", "message": "m"}))
                .unwrap();
        fill_defaults(&mut e, NOW);
        assert_eq!((e.timestamp, e.level), (Some(NOW), Some(Level::Info)));
    }

    #[test]
    fn floats_survive_parsing_exactly() {
        let e = one(ev(json!({"properties": {"x": 904138111333.0605_f64}}))).unwrap();
        assert_eq!(e.properties.to_map()["x"].as_f64(), Some(904138111333.0605));
    }

    #[test]
    fn id_formats() {
        assert!(is_uuid(ID));
        assert!(is_uuid(&ID.to_uppercase()));
        assert!(!is_uuid("0192f0c17b3a7cc29a571d2e3f4a5b6c"));
        assert!(is_ulid("01JDQ2Z8C6V4W3X2Y1Z0ABCDEF"));
        assert!(!is_ulid("01JDQ2Z8C6V4W3X2Y1Z0ABCDEU")); // U is not Crockford
        assert!(!is_ulid("01JDQ2Z8C6V4W3X2Y1Z0ABCDE"));
    }
}
