//! The event envelope: one type for analytics events *and* structured logs.
//!
//! This is the JSON a browser or app sends (snake_case field names, unknown
//! fields rejected so that a typo is an error rather than silently lost data)
//! and the record the aggregator stores. Rules about the values live in
//! [`crate::validate`]; this module only says what the fields are.

use core::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::id::EventId;
pub use crate::properties::Properties;

/// Milliseconds since the Unix epoch, UTC. In JSON: an RFC 3339 string
/// (`"2026-11-26T14:00:00.123Z"`, any offset accepted on input) or an integer
/// number of milliseconds; always written as RFC 3339 in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Milliseconds since the epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// Parses RFC 3339 (`2026-11-26T14:00:00Z`, `…+02:00`, fractional seconds).
    pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| Timestamp(t.timestamp_millis()))
    }

    /// RFC 3339 in UTC with milliseconds; `None` outside chrono's range.
    pub fn to_rfc3339(self) -> Option<String> {
        DateTime::<Utc>::from_timestamp_millis(self.0)
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_rfc3339() {
            Some(s) => f.write_str(&s),
            None => write!(f, "{}ms", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.to_rfc3339() {
            Some(s) => serializer.serialize_str(&s),
            None => serializer.serialize_i64(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp or Unix milliseconds")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v)
                    .ok_or_else(|| E::custom(format_args!("invalid RFC 3339 timestamp {v:?}")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Timestamp, E> {
                Ok(Timestamp(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Timestamp, E> {
                i64::try_from(v)
                    .map(Timestamp)
                    .map_err(|_| E::custom("timestamp out of range"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An analytics event (`name` required).
    #[default]
    Event,
    /// A structured log line (`message` required, `level` defaults to `info`).
    Log,
}

impl Kind {
    /// The wire and storage name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Log => "log",
        }
    }
}

/// Log severity, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Very fine-grained diagnostics.
    Trace,
    /// Diagnostics.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that was handled.
    Warn,
    /// A failure.
    Error,
    /// A failure that ends the program or session.
    Fatal,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 6] = [
        Level::Trace,
        Level::Debug,
        Level::Info,
        Level::Warn,
        Level::Error,
        Level::Fatal,
    ];

    /// The wire and storage name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
            Level::Fatal => "fatal",
        }
    }
}

/// Delivery priority: `high` events are delivered to the sinks before
/// `normal` ones when the aggregator has a backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// The default.
    #[default]
    Normal,
    /// Jumps the aggregator's backlog (errors, purchases).
    High,
}

impl Priority {
    /// The wire and storage name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// Where the event happened: the app and device. Every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// The app's version (`"4.2.0"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
    /// The platform (`"web"`, `"ios"`, `"android"`, `"server"`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The device model (`"iPhone15,2"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_model: Option<String>,
    /// The operating system (`"iOS"`, `"Windows"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// The operating system's version (`"18.1"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// The user's locale, BCP 47 (`"de-CH"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// The SDK that sent the event (`"outpost-js"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library_name: Option<String>,
    /// The SDK's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library_version: Option<String>,
}

impl Context {
    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self == &Context::default()
    }

    /// Each field with its name, for validation and storage.
    pub fn fields(&self) -> [(&'static str, Option<&str>); 8] {
        [
            ("app_version", self.app_version.as_deref()),
            ("platform", self.platform.as_deref()),
            ("device_model", self.device_model.as_deref()),
            ("os", self.os.as_deref()),
            ("os_version", self.os_version.as_deref()),
            ("locale", self.locale.as_deref()),
            ("library_name", self.library_name.as_deref()),
            ("library_version", self.library_version.as_deref()),
        ]
    }
}

/// Deserializes `T` from a JSON object only. serde's derive also takes an
/// array of the fields in order (`["web", "4.2.0"]`), which the schema
/// does not allow: a client sending one has made a mistake worth naming.
fn object_only<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectVisitor<T>(core::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_map(ObjectVisitor(core::marker::PhantomData))
}

/// One analytics event or log line, as the client sends it.
///
/// ```json
/// {"event_id":"0192f0c1-7b3a-7cc2-9a57-1d2e3f4a5b6c","timestamp":"2026-11-26T14:00:00.000Z",
///  "kind":"event","name":"checkout","user_id":"u-42","properties":{"total":99.5}}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Client-generated UUID (any version, hyphenated) or ULID. The
    /// aggregator drops a second event with the same id from the same
    /// client, so a retry must reuse it.
    pub event_id: EventId,
    /// When it happened, by the client's clock. When absent, the edge's
    /// time of arrival is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
    /// `event` (default) or `log`.
    #[serde(default)]
    pub kind: Kind,
    /// The event's name (`"checkout"`); required for `kind: event`. For
    /// logs: the logger or category, optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The log message; required for `kind: log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Log severity; defaults to `info` for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    /// The signed-in user's id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// A stable id for a device or browser before sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// The session the event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Free-form properties: a JSON object, bounded in depth and size,
    /// kept as the text the client sent.
    #[serde(default, skip_serializing_if = "Properties::is_empty")]
    pub properties: Properties,
    /// The app and device.
    #[serde(
        default,
        skip_serializing_if = "Context::is_empty",
        deserialize_with = "object_only"
    )]
    pub context: Context,
    /// W3C trace id: 32 lower-case hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// W3C span id: 16 lower-case hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// The client's sequence number, to order events with equal timestamps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// `normal` (default) or `high`.
    #[serde(default)]
    pub priority: Priority,
}

impl Event {
    /// A minimal analytics event (for tests, examples and SDK-like callers).
    pub fn new_event(event_id: impl Into<EventId>, name: impl Into<String>) -> Event {
        Event {
            event_id: event_id.into(),
            timestamp: None,
            kind: Kind::Event,
            name: Some(name.into()),
            message: None,
            level: None,
            user_id: None,
            anonymous_id: None,
            session_id: None,
            properties: Properties::default(),
            context: Context::default(),
            trace_id: None,
            span_id: None,
            seq: None,
            priority: Priority::Normal,
        }
    }
}

/// What only the edge knows about the request that carried a batch. It
/// travels next to the events in the edge frame; clients cannot set it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EdgeFacts {
    /// The client's IP address as the edge established it (never a header
    /// taken on trust).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// The request's `User-Agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// When the edge received the request.
    pub received_at: Timestamp,
    /// The point of presence or edge instance that took the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pop: Option<String>,
    /// The platform's country guess (ISO 3166-1 alpha-2), if it gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country_hint: Option<String>,
    /// The request's `Origin`, when a browser sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_from_rfc3339_with_any_offset_and_from_millis() {
        let cases = [
            ("\"2026-11-26T14:00:00Z\"", 1_795_701_600_000),
            ("\"2026-11-26T14:00:00.250Z\"", 1_795_701_600_250),
            ("\"2026-11-26T16:00:00+02:00\"", 1_795_701_600_000),
            ("1795701600000", 1_795_701_600_000),
        ];
        for (json, millis) in cases {
            let t: Timestamp = serde_json::from_str(json).unwrap();
            assert_eq!(t.millis(), millis, "{json}");
        }
        for bad in ["\"yesterday\"", "\"2026-13-01T00:00:00Z\"", "true", "1.5"] {
            assert!(serde_json::from_str::<Timestamp>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_are_written_as_utc_rfc3339_with_millis() {
        let t = Timestamp(1_795_701_600_250);
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"2026-11-26T14:00:00.250Z\""
        );
    }

    #[test]
    fn defaults_fill_kind_and_priority() {
        let e: Event = serde_json::from_str(r#"{"event_id":"x","name":"n"}"#).unwrap();
        assert_eq!(e.kind, Kind::Event);
        assert_eq!(e.priority, Priority::Normal);
        assert!(e.properties.is_empty());
    }

    #[test]
    fn unknown_fields_are_rejected_not_dropped() {
        let err = serde_json::from_str::<Event>(r#"{"event_id":"x","nmae":"n"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `nmae`"), "{err}");
        let err =
            serde_json::from_str::<Event>(r#"{"event_id":"x","context":{"osv":"1"}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `osv`"), "{err}");
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let json = r#"{"event_id":"01JDQ2Z8C6V4W3X2Y1Z0ABCDEF","timestamp":"2026-11-26T14:00:00.000Z","kind":"log","name":"payments","message":"card declined","level":"warn","user_id":"u1","anonymous_id":"a1","session_id":"s1","properties":{"code":51,"nested":{"ok":false}},"context":{"app_version":"1.2.3","platform":"ios","device_model":"iPhone15,2","os":"iOS","os_version":"18.1","locale":"de-CH","library_name":"outpost-swift","library_version":"0.1.0"},"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7","seq":7,"priority":"high"}"#;
        let e: Event = serde_json::from_str(json).unwrap();
        assert_eq!(e.level, Some(Level::Warn));
        assert_eq!(e.priority, Priority::High);
        assert_eq!(serde_json::to_string(&e).unwrap(), json);
    }
}
