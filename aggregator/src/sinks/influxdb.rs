//! The InfluxDB sink: line protocol, escaped exactly as InfluxData's
//! `influxdb-line-protocol` builder does (the tests hold the two equal),
//! posted on hyper 1, through the v2 (`/api/v2/write`, default),
//! v1 (`/write`) or v3 (`/api/v3/write_lp`) write API.
//!
//! One point per event, measurement `influxdb.measurement`:
//!
//! * tags — low cardinality only: `client`, `kind`, `name`, `level`,
//!   `country`, `platform`, `app_version`. Never user, session or event ids.
//! * fields — `count=1i` (so `sum(count)` counts events) and every top-level
//!   numeric property as `p_<key>` (always a float, so an integer in one
//!   event and a float in the next cannot conflict).
//! * timestamp — nanoseconds: the event's millisecond plus a value derived
//!   from its event id, so that two events with the same tags in the same
//!   millisecond stay two points, and a replayed event overwrites itself.
//!
//! No value can break a line, whatever validation let through: the
//! writer escapes commas, spaces, `=` and backslashes; a line break or
//! other control character, which line protocol cannot carry in a key or
//! tag at all, becomes a space in a tag value, and a property whose key
//! holds one (or ends with a backslash, which readers refuse) is left out
//! of the point (validation refuses control characters with `40017`; this
//! is the second line of defence). The measurement name is checked when
//! the configuration is.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Row, Sink, SinkError};
use crate::redacted::Redacted;

/// Which write API to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteApi {
    /// InfluxDB 2 and Cloud: `/api/v2/write`, org, bucket, token.
    V2,
    /// InfluxDB 1.x: `/write`, database, retention policy, user/password.
    V1,
    /// InfluxDB 3: `/api/v3/write_lp`, database (`bucket`), token.
    V3,
}

/// `[influxdb]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfluxConfig {
    /// Whether the InfluxDB sink is on.
    pub enabled: bool,
    /// `v2`, `v1` or `v3`.
    pub api: WriteApi,
    /// Base URL (`http://influxdb:8086`); plain HTTP.
    pub url: String,
    /// v2: organisation.
    pub org: String,
    /// v2: bucket; v3: database.
    pub bucket: String,
    /// v2/v3: API token.
    pub token: Redacted,
    /// v1: database.
    pub database: String,
    /// v1: retention policy (empty: the database's default).
    pub retention_policy: String,
    /// v1: user (empty: no authentication).
    pub username: String,
    /// v1: password.
    pub password: Redacted,
    /// Measurement name.
    pub measurement: String,
    /// Longest a write may take, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        InfluxConfig {
            enabled: false,
            api: WriteApi::V2,
            url: "http://127.0.0.1:8086".into(),
            org: "outpost".into(),
            bucket: "events".into(),
            token: Redacted::default(),
            database: "outpost".into(),
            retention_policy: String::new(),
            username: String::new(),
            password: Redacted::default(),
            measurement: "outpost_events".into(),
            timeout_ms: 10_000,
        }
    }
}

/// The sink.
#[derive(Clone)]
pub struct InfluxSink {
    client: crate::http_client::HttpClient,
    write_uri: hyper::Uri,
    auth: Option<String>,
    measurement: String,
    timeout: Duration,
}

fn encode_query(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

impl InfluxSink {
    /// Builds the client; nothing is contacted until the first write.
    pub fn new(config: &InfluxConfig) -> anyhow::Result<InfluxSink> {
        let base = config.url.trim_end_matches('/');
        let (path, query, auth) = match config.api {
            WriteApi::V2 => (
                "/api/v2/write",
                encode_query(&[
                    ("org", &config.org),
                    ("bucket", &config.bucket),
                    ("precision", "ns"),
                ]),
                (!config.token.0.is_empty()).then(|| format!("Token {}", config.token.0)),
            ),
            WriteApi::V1 => (
                "/write",
                encode_query(&[
                    ("db", &config.database),
                    ("rp", &config.retention_policy),
                    ("u", &config.username),
                    ("p", &config.password.0),
                    ("precision", "ns"),
                ]),
                None,
            ),
            WriteApi::V3 => (
                "/api/v3/write_lp",
                encode_query(&[("db", &config.bucket), ("precision", "nanosecond")]),
                (!config.token.0.is_empty()).then(|| format!("Bearer {}", config.token.0)),
            ),
        };
        let write_uri: hyper::Uri = format!("{base}{path}?{query}").parse()?;
        anyhow::ensure!(
            matches!(write_uri.scheme_str(), Some("http" | "https")),
            "influxdb.url must be http:// or https://"
        );
        let client = crate::http_client::client();
        Ok(InfluxSink {
            client,
            write_uri,
            auth,
            measurement: config.measurement.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
        })
    }

    /// Line protocol for rows.
    pub fn lines(&self, rows: &[Row<'_>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(rows.len() * 192);
        for r in rows {
            let e = r.event;
            escape_into(&mut out, &self.measurement, MEASUREMENT_SPECIAL);
            for (k, v) in tags(r) {
                if let Some(v) = v {
                    tag_into(&mut out, k, &v);
                }
            }
            out.extend_from_slice(b" count=1i");
            for (k, n) in e.properties.numbers() {
                if writable_key(&k) && n.is_finite() {
                    out.extend_from_slice(b",p_");
                    escape_into(&mut out, &k, KEY_SPECIAL);
                    out.push(b'=');
                    display_into(&mut out, n);
                }
            }
            out.push(b' ');
            display_into(
                &mut out,
                point_time_ns(
                    e.timestamp.unwrap_or(r.facts.received_at).millis(),
                    &e.event_id,
                ),
            );
            out.push(b'\n');
        }
        out
    }

    async fn post(&self, body: Vec<u8>) -> Result<(u16, String), PostError> {
        let mut req = hyper::Request::post(self.write_uri.clone())
            .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))?;
        if let Some(a) = &self.auth {
            let v = hyper::header::HeaderValue::from_str(a)?;
            req.headers_mut().insert(hyper::header::AUTHORIZATION, v);
        }
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| PostError::TimedOut)??;
        let status = resp.status().as_u16();
        let body = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| PostError::TimedOut)??
            .to_bytes();
        Ok((
            status,
            String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        ))
    }
}

/// A point's tags, in order: the client and kind always, the others when
/// they have a value left after [`tag_value`] (`None`: no tag).
fn tags<'a>(r: &Row<'a>) -> [(&'static str, Option<Cow<'a, str>>); 7] {
    let e = r.event;
    let optional = |v: Option<&'a str>| v.map(tag_value).filter(|v| !v.is_empty());
    [
        ("client", Some(tag_value(r.client_id))),
        ("kind", Some(Cow::Borrowed(e.kind.as_str()))),
        ("name", optional(e.name.as_deref())),
        ("level", optional(e.level.map(|l| l.as_str()))),
        ("country", optional(r.country())),
        ("platform", optional(e.context.platform.as_deref())),
        ("app_version", optional(e.context.app_version.as_deref())),
    ]
}

/// What line protocol escapes in a measurement name (besides `\\`).
const MEASUREMENT_SPECIAL: &[u8] = b", ";
/// What it escapes in a tag key, tag value or field key (besides `\\`).
const KEY_SPECIAL: &[u8] = b",= ";

/// Writes `s` with a backslash before each of `special` and each
/// backslash, as InfluxData's builder does (a test holds the two equal),
/// copying the runs in between whole where the builder goes through `fmt`
/// one character at a time. The special characters are ASCII, so a byte
/// never splits a character.
fn escape_into(out: &mut Vec<u8>, s: &str, special: &[u8]) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'\\' || special.contains(b) {
            out.extend_from_slice(&bytes[start..i]);
            out.push(b'\\');
            start = i;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// `,key=value`, both escaped.
fn tag_into(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b',');
    escape_into(out, key, KEY_SPECIAL);
    out.push(b'=');
    escape_into(out, value, KEY_SPECIAL);
}

/// A number as `Display` writes it (a float in full digits, never an
/// exponent: what line protocol reads).
fn display_into(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{n}");
}

/// A control character: line protocol has no escape for a line break.
fn has_control(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == 0x7f)
}

/// Whether a property key can be a field key: no control character, and
/// no trailing backslash (line protocol's readers refuse a key ending in
/// one, escaped or not).
fn writable_key(k: &str) -> bool {
    !has_control(k) && !k.ends_with('\\')
}

/// `influxdb.measurement` must be a name line protocol can carry.
pub fn check_measurement(m: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !m.is_empty() && !has_control(m) && !m.starts_with('_'),
        "influxdb.measurement {m:?}: not empty, no control characters, not starting with `_`"
    );
    Ok(())
}

/// Tag values cannot hold line breaks, and a trailing backslash would
/// escape the separator after it. Most values are clean and are borrowed.
fn tag_value(v: &str) -> Cow<'_, str> {
    let clean = |v: &str| v.trim_end_matches('\\').trim().len() == v.len();
    if !v.chars().any(char::is_control) && clean(v) {
        return Cow::Borrowed(v);
    }
    let cleaned: String = v
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Cow::Owned(cleaned.trim_end_matches('\\').trim().to_owned())
}

/// The event's millisecond, plus a sub-millisecond offset from its id.
fn point_time_ns(millis: i64, event_id: &str) -> i64 {
    let h = Sha256::digest(event_id.as_bytes());
    let offset = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 1_000_000;
    millis
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(offset))
}

impl Sink for InfluxSink {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn write(&self, rows: &[Row<'_>]) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (status, answer) = self
            .post(self.lines(rows))
            .await
            .map_err(|e| SinkError::Unavailable(e.to_string()))?;
        match status {
            200..=299 => Ok(()),
            // The server refused the data itself (bad line, field type
            // conflict). It may have written the good lines of a partial
            // write; writing them again point by point is harmless (same
            // series and time), and leaves only the bad ones refused.
            400 | 422 => Err(SinkError::Rejected(format!("influxdb {status}: {answer}"))),
            // Too large for the server's limit: perhaps one huge point, so
            // retried a bounded number of times, then written point by point.
            413 => Err(SinkError::Refused(format!("influxdb {status}: {answer}"))),
            // Authentication, a missing bucket, overload, outage: the data is
            // fine and waits in the spool until the server is.
            _ => Err(SinkError::Unavailable(format!(
                "influxdb {status}: {answer}"
            ))),
        }
    }

    async fn ping(&self) -> bool {
        // An empty write is valid on every API and checks auth and bucket.
        matches!(
            self.post(Vec::new()).await,
            Ok((200..=299, _)) | Ok((400, _))
        )
    }
}

/// Why a write request got no answer.
#[derive(Debug, thiserror::Error)]
enum PostError {
    /// The request could not be built (a bad URL or header).
    #[error("{0}")]
    Request(#[from] hyper::http::Error),
    /// The credentials are not a valid header value.
    #[error("the credentials are not a valid header value")]
    Header(#[from] hyper::header::InvalidHeaderValue),
    /// No answer within `influxdb.timeout_ms`.
    #[error("timed out")]
    TimedOut,
    /// Connecting or sending failed.
    #[error("{0}")]
    Send(#[from] hyper_util::client::legacy::Error),
    /// The answer broke off.
    #[error("reading the answer: {0}")]
    Answer(#[from] hyper::Error),
}

/// This sink's name.
pub const NAME: &str = "influxdb";

/// The InfluxDB sink, for `sinks::KINDS`.
pub const KIND: super::Kind = super::Kind {
    name: NAME,
    enabled: |config| config.influxdb.enabled,
    build,
};

fn build(config: &crate::config::Config) -> super::Building<'_> {
    Box::pin(async move {
        Ok(super::Configured::new(
            InfluxSink::new(&config.influxdb)?,
            None,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::sample::typical_batch;

    fn sink(api: WriteApi) -> InfluxSink {
        InfluxSink::new(&InfluxConfig {
            enabled: true,
            api,
            token: Redacted::from("t0k"),
            ..InfluxConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn each_api_gets_its_path_parameters_and_auth() {
        let v2 = sink(WriteApi::V2);
        assert_eq!(
            v2.write_uri.to_string(),
            "http://127.0.0.1:8086/api/v2/write?org=outpost&bucket=events&precision=ns"
        );
        assert_eq!(v2.auth.as_deref(), Some("Token t0k"));
        let v1 = InfluxSink::new(&InfluxConfig {
            api: WriteApi::V1,
            username: "u".into(),
            password: Redacted::from("p w"),
            ..InfluxConfig::default()
        })
        .unwrap();
        assert_eq!(
            v1.write_uri.to_string(),
            "http://127.0.0.1:8086/write?db=outpost&u=u&p=p%20w&precision=ns"
        );
        let v3 = sink(WriteApi::V3);
        assert_eq!(
            v3.write_uri.to_string(),
            "http://127.0.0.1:8086/api/v3/write_lp?db=events&precision=nanosecond"
        );
        assert_eq!(v3.auth.as_deref(), Some("Bearer t0k"));
        // InfluxDB Cloud is https; anything else is refused.
        let cloud = InfluxSink::new(&InfluxConfig {
            url: "https://eu-central-1-1.aws.cloud2.influxdata.com".into(),
            ..InfluxConfig::default()
        })
        .unwrap();
        assert_eq!(cloud.write_uri.scheme_str(), Some("https"));
        assert!(
            InfluxSink::new(&InfluxConfig {
                url: "ftp://x".into(),
                ..InfluxConfig::default()
            })
            .is_err()
        );
    }

    /// The v2 line protocol of `batch`'s events, as client `acme-web`.
    fn v2_lines(batch: &outpost_shared::frame::Batch) -> String {
        let batch = outpost_shared::frame::Batch {
            client_id: "acme-web".into(),
            ..batch.clone()
        };
        let rows = Row::of_batch(&batch, None);
        String::from_utf8(sink(WriteApi::V2).lines(&rows)).unwrap()
    }

    #[test]
    fn points_carry_low_cardinality_tags_and_numeric_fields_only() {
        let batch = typical_batch(10);
        let text = v2_lines(&batch);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10);
        assert!(
            lines[0].starts_with("outpost_events,client=acme-web,kind=event,name=page_view,country=DE,platform=web,app_version=4.12.0 count=1i,p_price=49.95,p_viewport_width=1280 "),
            "{}",
            lines[0]
        );
        assert!(
            lines[9].contains(",kind=log,name=checkout,level=warn,"),
            "{}",
            lines[9]
        );
        for l in &lines {
            for forbidden in ["user", "session", "event_id", "anonymous"] {
                assert!(!l.contains(forbidden), "{forbidden} in {l}");
            }
        }
        let ts: i64 = lines[0].rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(ts / 1_000_000, batch.events[0].timestamp.unwrap().millis());
    }

    /// The line protocol of `rows` as InfluxData's builder writes it: the
    /// reference `lines` must equal byte for byte.
    fn builder_lines(sink: &InfluxSink, rows: &[Row<'_>]) -> Vec<u8> {
        let mut b = influxdb_line_protocol::LineProtocolBuilder::new();
        for r in rows {
            let e = r.event;
            let mut line = b.measurement(&sink.measurement);
            for (k, v) in tags(r) {
                if let Some(v) = v {
                    line = line.tag(k, &v);
                }
            }
            let mut fields = line.field("count", 1i64);
            for (k, n) in e.properties.numbers() {
                if writable_key(&k) && n.is_finite() {
                    fields = fields.field(&format!("p_{k}"), n);
                }
            }
            let ts = point_time_ns(
                e.timestamp.unwrap_or(r.facts.received_at).millis(),
                &e.event_id,
            );
            b = fields.timestamp(ts).close_line();
        }
        b.build()
    }

    /// Rows of `batch` as client `client`, with `country` from GeoIP.
    fn assert_same_as_builder(
        measurement: &str,
        client: &str,
        country: Option<&str>,
        batch: &outpost_shared::frame::Batch,
    ) {
        let sink = InfluxSink {
            measurement: measurement.to_owned(),
            ..sink(WriteApi::V2)
        };
        let batch = outpost_shared::frame::Batch {
            client_id: client.into(),
            ..batch.clone()
        };
        let geo = crate::geoip::Geo {
            country: country.map(str::to_owned),
            ..Default::default()
        };
        let rows = Row::of_batch(&batch, Some(&geo));
        let ours = sink.lines(&rows);
        let theirs = builder_lines(&sink, &rows);
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
        assert_eq!(ours, theirs);
    }

    #[test]
    fn lines_are_escaped_exactly_as_influxdatas_builder_escapes_them() {
        assert_same_as_builder(
            "outpost_events",
            "acme-web",
            Some("DE"),
            &typical_batch(100),
        );
        let mut batch = typical_batch(4);
        let awkward = [
            "a,b",
            "a=b",
            "a b",
            "a\\b",
            "\\",
            "\\,",
            ",=\\ ",
            "ünï cödé",
            "\"q\"",
            "",
            " ",
        ];
        for (i, e) in batch.events.iter_mut().enumerate() {
            let mut props = serde_json::Map::new();
            for (j, k) in awkward.iter().enumerate() {
                props.insert((*k).to_owned(), ((i * 100 + j) as f64 * 0.37 - 3.0).into());
            }
            props.insert("big".into(), 1e300.into());
            props.insert("tiny".into(), (-1e-300).into());
            props.insert("int".into(), u64::MAX.into());
            e.properties = props.into();
            e.name = Some(awkward[i % awkward.len()].into());
            e.context.platform = Some(awkward[(i + 3) % awkward.len()].into());
            e.context.app_version = Some("1.0 beta,2=x".into());
        }
        assert_same_as_builder("my events,x", "client,=\\ id", Some("a b,c"), &batch);
    }

    proptest::proptest! {
        /// Any text in any place a value goes: the same bytes as the builder.
        #[test]
        fn any_text_is_escaped_as_the_builder_escapes_it(
            measurement in "[a-z ,=\\\\\"é]{1,8}",
            client in "[a-z ,=\\\\\"é]{0,8}",
            name in "[a-z ,=\\\\\"é\n]{0,8}",
            country in "[A-Z ,=\\\\]{0,4}",
            key in "[a-z ,=\\\\\"é]{0,8}",
            value in proptest::num::f64::ANY,
        ) {
            let mut batch = typical_batch(2);
            for e in &mut batch.events {
                let mut props = serde_json::Map::new();
                if let Some(n) = serde_json::Number::from_f64(value) {
                    props.insert(key.clone(), n.into());
                }
                e.properties = props.into();
                e.name = Some(name.clone());
            }
            assert_same_as_builder(&measurement, &client, Some(&country), &batch);
        }
    }

    #[test]
    fn tag_values_cannot_break_the_line() {
        assert_eq!(tag_value("a\nb\\"), "a b");
        assert_eq!(tag_value("\t"), "");
    }

    /// Rows straight to the sink, as if validation had let anything
    /// through: every line still parses, one point per row, and each
    /// field and tag is what it was meant to be.
    #[test]
    fn no_value_breaks_a_line_whatever_validation_allowed() {
        let hostile_keys = [
            "a\nb",
            "c\r\nd",
            "tab\tkey",
            "del\u{7f}",
            "nul\u{0}",
            "back\\",
            "a=b",
            "a,b",
            "a b",
            "\"quoted\"",
            "ünï",
            "\u{2028}sep",
            "",
        ];
        let mut batch = typical_batch(3);
        for e in &mut batch.events {
            let mut props = serde_json::Map::new();
            for (i, k) in hostile_keys.iter().enumerate() {
                props.insert((*k).to_owned(), (i as f64).into());
            }
            e.properties = props.into();
            e.name = Some("evil\nname,x=1 y".into());
            e.context.platform = Some("web\\".into());
            e.context.app_version = Some("1.0\r\n2".into());
        }
        let text = v2_lines(&batch);
        assert_eq!(text.lines().count(), 3, "{text}");
        let parsed: Vec<_> = influxdb_line_protocol::parse_lines(&text)
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(parsed.len(), 3);
        for line in &parsed {
            assert_eq!(line.series.measurement.as_str(), "outpost_events");
            let tags: Vec<(String, String)> = line
                .series
                .tag_set
                .iter()
                .flatten()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert!(
                tags.contains(&("name".into(), "evil name,x=1 y".into())),
                "{tags:?}"
            );
            let keys: Vec<String> = line.field_set.iter().map(|(k, _)| k.to_string()).collect();
            for clean in [
                "p_a=b",
                "p_a,b",
                "p_a b",
                "p_\"quoted\"",
                "p_ünï",
                "p_\u{2028}sep",
                "p_",
            ] {
                assert!(keys.contains(&clean.to_owned()), "{clean} in {keys:?}");
            }
            assert!(
                keys.iter()
                    .all(|k| !k.bytes().any(|b| b < 0x20 || b == 0x7f) && !k.ends_with('\\')),
                "{keys:?}"
            );
            assert_eq!(
                keys.len(),
                1 + 7,
                "count and the seven writable keys: {keys:?}"
            );
        }
    }

    #[test]
    fn a_measurement_name_must_be_writable() {
        assert!(check_measurement("outpost_events").is_ok());
        for bad in ["", "a\nb", "_internal"] {
            assert!(check_measurement(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn point_times_are_distinct_per_event_and_stable_per_id() {
        assert_ne!(point_time_ns(5, "a"), point_time_ns(5, "b"));
        assert_eq!(point_time_ns(5, "a"), point_time_ns(5, "a"));
        assert_eq!(point_time_ns(5, "a") / 1_000_000, 5);
    }
}
