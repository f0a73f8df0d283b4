//! The one table of error codes, and the JSON envelope every error travels in.
//!
//! Every error Outpost answers with, at the edge or the aggregator, is one of
//! the [`ErrorCode`] variants below. The numeric code is stable forever (a
//! client may switch on it); its first three digits are the HTTP status, so a
//! code can never drift from the status it is sent with. Messages may be
//! improved; codes and names may not change meaning. The README publishes
//! this table, generated from [`ErrorCode::ALL`].

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $name:literal, $message:literal; )+) => {
        /// A stable, documented error. See the module documentation.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )+
        }

        impl ErrorCode {
            /// Every code, in table order (used to publish the table and to test it).
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )+ ];

            /// The stable 5-digit code; its first three digits are the HTTP status.
            pub const fn code(self) -> u32 {
                match self { $( ErrorCode::$variant => $code, )+ }
            }

            /// The stable snake_case name, for logs and metrics labels.
            pub const fn name(self) -> &'static str {
                match self { $( ErrorCode::$variant => $name, )+ }
            }

            /// The default human-readable message.
            pub const fn message(self) -> &'static str {
                match self { $( ErrorCode::$variant => $message, )+ }
            }

            /// Looks a numeric code up (for clients and tests).
            pub fn from_code(code: u32) -> Option<ErrorCode> {
                match code { $( $code => Some(ErrorCode::$variant), )+ _ => None }
            }
        }
    };
}

error_codes! {
    // 400xx: the request or an event is malformed or breaks a rule.
    /// The body is not valid JSON or not the expected shape.
    MalformedJson = 40001, "malformed_json", "the body is not valid JSON of the expected shape";
    /// A required field is absent.
    MissingField = 40002, "missing_field", "a required field is missing";
    /// A field has the wrong type or an unknown enumeration value.
    InvalidField = 40003, "invalid_field", "a field has an invalid type or value";
    /// A field that the schema does not know (typos are caught, not dropped).
    UnknownField = 40004, "unknown_field", "the object has a field that is not part of the schema";
    /// The event id is not a UUID or a ULID.
    InvalidEventId = 40005, "invalid_event_id", "event_id must be a UUID or a ULID";
    /// The timestamp cannot be parsed.
    InvalidTimestamp = 40006, "invalid_timestamp", "timestamp must be RFC 3339 or Unix milliseconds";
    /// The timestamp is too far in the past or the future.
    TimestampOutOfRange = 40007, "timestamp_out_of_range", "timestamp is too far in the past or the future";
    /// A string is longer than its limit.
    StringTooLong = 40008, "string_too_long", "a string is longer than its limit";
    /// Properties nest deeper than the limit.
    PropertiesTooDeep = 40009, "properties_too_deep", "properties nest deeper than allowed";
    /// Properties hold more keys or elements than the limit.
    TooManyProperties = 40010, "too_many_properties", "properties hold more entries than allowed";
    /// A batch with no events.
    EmptyBatch = 40011, "empty_batch", "the batch holds no events";
    /// Two events in one batch share an event id.
    DuplicateEventId = 40012, "duplicate_event_id", "the batch holds this event_id twice";
    /// A trace or span id is not lower-case hex of the W3C length.
    InvalidTraceContext = 40013, "invalid_trace_context", "trace_id must be 32 and span_id 16 lower-case hex digits";
    /// A query parameter is unknown or has a bad value.
    InvalidQueryParameter = 40014, "invalid_query_parameter", "a query parameter is unknown or has an invalid value";
    /// A pagination cursor was altered or belongs to another query.
    InvalidCursor = 40015, "invalid_cursor", "the cursor is invalid";
    /// The body's compression could not be decoded.
    InvalidContentEncoding = 40016, "invalid_content_encoding", "the body could not be decompressed";
    /// A property key, an event name or a context value holds a control
    /// character (U+0000–U+001F, U+007F): these become field keys and tags
    /// downstream, where a line break would split a record.
    InvalidCharacter = 40017, "invalid_character", "a property key, name or context value contains a control character";
    /// Every event of the batch was rejected; `errors` says why for each.
    BatchRejected = 40018, "batch_rejected", "no event of the batch was accepted; see errors";
    /// A read-API query that reads rows spans more time than allowed.
    QueryRangeTooLarge = 40019, "query_range_too_large", "the query spans more time than allowed for it; narrow from/to";
    /// An edge frame is truncated or its layout is wrong.
    MalformedFrame = 40020, "malformed_frame", "the edge frame is malformed";
    /// An edge frame of a version this reader does not speak.
    UnsupportedFrameVersion = 40021, "unsupported_frame_version", "the edge frame version is not supported";

    // 401xx: who is calling could not be established.
    /// No credentials were presented.
    MissingCredentials = 40101, "missing_credentials", "no credentials were presented";
    /// The key, client or key id is not known (or not active).
    UnknownKey = 40102, "unknown_key", "the key is not known";
    /// A request signature, token signature or API key did not verify.
    InvalidSignature = 40103, "invalid_signature", "the signature does not verify";
    /// The signed timestamp is outside the accepted window.
    TimestampOutsideWindow = 40104, "timestamp_outside_window", "the signed timestamp is outside the accepted window";
    /// The signed nonce was seen before within the window (a replay).
    NonceReused = 40105, "nonce_reused", "the nonce was already used";
    /// The token has expired.
    TokenExpired = 40106, "token_expired", "the token has expired";
    /// The token's `nbf` lies in the future.
    TokenNotYetValid = 40107, "token_not_yet_valid", "the token is not valid yet";
    /// The token cannot be parsed, or misses a required claim.
    MalformedToken = 40108, "malformed_token", "the token is malformed or misses a required claim";
    /// The token's algorithm is not the one pinned for its key.
    AlgorithmNotAllowed = 40109, "algorithm_not_allowed", "the token algorithm is not allowed for this key";
    /// The token's `iss` or `aud` is not the expected one.
    WrongIssuerOrAudience = 40110, "wrong_issuer_or_audience", "the token issuer or audience is not accepted";
    /// The client has been revoked or has expired.
    ClientInactive = 40111, "client_inactive", "the client is revoked or expired";
    /// The edge frame's HMAC did not verify, or its key id is unknown.
    InvalidEdgeSignature = 40112, "invalid_edge_signature", "the edge frame signature does not verify";

    // 403xx: the caller is known but not allowed.
    /// The caller lacks the permission the action needs.
    PermissionDenied = 40301, "permission_denied", "the caller lacks the permission for this action";
    /// The browser origin is not allowed for this key.
    OriginNotAllowed = 40302, "origin_not_allowed", "the origin is not allowed for this key";
    /// The client IP is on the block list.
    IpBlocked = 40303, "ip_blocked", "requests from this address are blocked";

    // 404xx and 405xx: no such endpoint.
    /// No endpoint at this path.
    NotFound = 40401, "not_found", "there is no endpoint at this path";
    /// No client record has this id (the edge caches this answer).
    ClientNotFound = 40402, "client_not_found", "there is no client with this id";
    /// The endpoint exists but not for this method.
    MethodNotAllowed = 40501, "method_not_allowed", "the endpoint does not take this method";

    // 413xx: something is larger than its bound.
    /// One event is larger than the per-event limit.
    EventTooLarge = 41301, "event_too_large", "the event is larger than the per-event limit";
    /// The request body (after decompression) is larger than the limit.
    BodyTooLarge = 41302, "body_too_large", "the request body is larger than the limit";
    /// The batch holds more events than the limit.
    TooManyEvents = 41303, "too_many_events", "the batch holds more events than the limit";
    /// The edge frame is larger than the limit.
    FrameTooLarge = 41304, "frame_too_large", "the edge frame is larger than the limit";

    // 415xx: a body the endpoint does not take.
    /// The content type is not accepted.
    UnsupportedMediaType = 41501, "unsupported_media_type", "the content type is not supported";
    /// The content encoding is not accepted.
    UnsupportedContentEncoding = 41502, "unsupported_content_encoding", "the content encoding is not supported";

    // 429xx: too many requests.
    /// The client's rate limit is spent.
    RateLimitedClient = 42901, "rate_limited_client", "the client's rate limit is exhausted";
    /// The per-IP rate limit is spent.
    RateLimitedIp = 42902, "rate_limited_ip", "the rate limit for this address is exhausted";

    // 500xx: our fault.
    /// An unexpected internal failure (a bug; the request id finds its log line).
    Internal = 50001, "internal", "an internal error occurred";

    // 503xx: try again later; nothing was acknowledged.
    /// The aggregator did not acknowledge the batch in time.
    UpstreamUnavailable = 50301, "upstream_unavailable", "the aggregator did not acknowledge the batch; retry with the same event ids";
    /// The aggregator's spool is full; it sheds load.
    Overloaded = 50302, "overloaded", "the service is overloaded; retry later";
    /// A dependency (database, KV) is unavailable.
    DependencyUnavailable = 50303, "dependency_unavailable", "a dependency is unavailable; retry later";
}

impl ErrorCode {
    /// The HTTP status this code is sent with: its first three digits.
    pub const fn http_status(self) -> u16 {
        (self.code() / 100) as u16
    }

    /// Whether a client should retry the same request later (429 and 503).
    pub const fn is_retryable(self) -> bool {
        matches!(self.http_status(), 429 | 503)
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.code(), self.name())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.code())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = u32::deserialize(deserializer)?;
        ErrorCode::from_code(code)
            .ok_or_else(|| serde::de::Error::custom(format_args!("unknown error code {code}")))
    }
}

/// One problem with one part of the input: an event of a batch, or a field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FieldError {
    /// Index of the event in the batch, when the error belongs to one event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The event's id, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The stable code.
    #[cfg_attr(feature = "openapi", schema(value_type = u32, example = 40005))]
    pub code: ErrorCode,
    /// The field, as a dotted path (`context.app_version`, `properties.cart.items`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong, for a human.
    pub message: String,
}

impl FieldError {
    /// An error about `field` with the code's default message.
    pub fn new(code: ErrorCode, field: Option<&str>, message: impl Into<String>) -> Self {
        FieldError {
            index: None,
            event_id: None,
            code,
            field: field.map(str::to_owned),
            message: message.into(),
        }
    }
}

/// The JSON body of every error response:
/// `{"success":false,"code":40001,"message":"…","request_id":"…","errors":[…]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorEnvelope {
    /// Always `false`.
    pub success: bool,
    /// The stable numeric code.
    #[cfg_attr(feature = "openapi", schema(value_type = u32, example = 40001))]
    pub code: ErrorCode,
    /// What went wrong, for a human.
    pub message: String,
    /// The request id (also in the `X-Request-Id` header); quote it in reports.
    pub request_id: String,
    /// Details, one per offending event or field; may be empty.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

impl ErrorEnvelope {
    /// An envelope with the code's default message and no details.
    pub fn new(code: ErrorCode, request_id: impl Into<String>) -> Self {
        ErrorEnvelope {
            success: false,
            code,
            message: code.message().to_owned(),
            request_id: request_id.into(),
            errors: Vec::new(),
        }
    }

    /// Replaces the message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Attaches details.
    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    /// The HTTP status to send this envelope with.
    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }
}

/// Whether a caller's `X-Request-Id` is kept (echoed and logged) rather
/// than replaced: 1 to 128 characters of `[A-Za-z0-9-_.:]`, so that it is
/// safe in a header, a log line and a metric label.
pub fn is_acceptable_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The JSON body of a `202 Accepted` answer to a batch: what was taken, and
/// what was rejected and why (partial acceptance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AcceptedResponse {
    /// Always `true`.
    pub success: bool,
    /// Events accepted and acknowledged by the aggregator.
    pub accepted: usize,
    /// Events rejected; each has an entry in `errors`.
    pub rejected: usize,
    /// One entry per rejected event.
    #[serde(default)]
    pub errors: Vec<FieldError>,
    /// The request id (also in the `X-Request-Id` header).
    pub request_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_starts_with_its_http_status_class() {
        for code in ErrorCode::ALL {
            let status = code.http_status();
            assert!(
                matches!(
                    status,
                    400 | 401 | 403 | 404 | 405 | 413 | 415 | 429 | 500 | 503
                ),
                "{code} maps to unexpected status {status}"
            );
            assert_eq!(code.code() / 100, u32::from(status));
            assert!(
                (10_000..100_000).contains(&code.code()),
                "{code} is not 5 digits"
            );
        }
    }

    #[test]
    fn codes_and_names_are_unique_and_round_trip() {
        let mut codes = HashSet::new();
        let mut names = HashSet::new();
        for code in ErrorCode::ALL {
            assert!(codes.insert(code.code()), "duplicate code {code}");
            assert!(names.insert(code.name()), "duplicate name {code}");
            assert_eq!(ErrorCode::from_code(code.code()), Some(*code));
            assert!(!code.message().is_empty());
        }
        assert_eq!(ErrorCode::from_code(40000), None);
    }

    #[test]
    fn envelope_serializes_to_the_documented_shape() {
        let env = ErrorEnvelope::new(ErrorCode::MalformedJson, "req-1").with_errors(vec![
            FieldError::new(ErrorCode::MissingField, Some("name"), "name is required"),
        ]);
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "success": false,
                "code": 40001,
                "message": "the body is not valid JSON of the expected shape",
                "request_id": "req-1",
                "errors": [{"code": 40002, "field": "name", "message": "name is required"}]
            })
        );
        let back: ErrorEnvelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.http_status(), 400);
    }

    #[test]
    fn unknown_numeric_code_does_not_deserialize() {
        assert!(serde_json::from_str::<ErrorCode>("12345").is_err());
    }

    #[test]
    fn request_ids_are_kept_only_when_safe() {
        assert!(is_acceptable_request_id("01JDQ2Z8-abc_1.2:3"));
        for bad in ["", "a b", "a\nb", "é", &"x".repeat(129)] {
            assert!(!is_acceptable_request_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_429_and_503_are_retryable() {
        assert!(ErrorCode::RateLimitedIp.is_retryable());
        assert!(ErrorCode::UpstreamUnavailable.is_retryable());
        assert!(!ErrorCode::MalformedJson.is_retryable());
        assert!(!ErrorCode::Internal.is_retryable());
    }
}
