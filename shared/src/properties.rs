//! An event's free-form `properties`: a JSON object kept as the text the
//! client sent, never built into a tree.
//!
//! The edge checks it with one bounded scan ([`crate::validate`]), the frame
//! carries the text as it is, PostgreSQL and SQLite store it as it is, and
//! only the InfluxDB sink looks inside (at the top-level numbers). Building
//! a `serde_json::Value` per event only to write it out again was a third
//! of the edge's validation time.

use core::fmt;
use std::borrow::Cow;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A JSON object, as text. Empty (`{}` or absent) is `Properties::default()`.
///
/// ```
/// use outpost_shared::properties::Properties;
/// let p: Properties = serde_json::from_str(r#"{"total": 99.5, "coupon": "XMAS"}"#).unwrap();
/// assert_eq!(p.get(), r#"{"total": 99.5, "coupon": "XMAS"}"#);
/// assert_eq!(p.numbers().collect::<Vec<_>>(), [("total".into(), 99.5)]);
/// ```
#[derive(Clone, Default)]
pub struct Properties(Option<Box<RawValue>>);

/// Why text is not properties.
#[derive(Debug, thiserror::Error)]
pub enum PropertiesError {
    /// Valid JSON, but not an object.
    #[error("properties must be a JSON object")]
    NotObject,
    /// Not JSON.
    #[error("properties are not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl Properties {
    /// Checks that `json` is one JSON object (syntax only: the limits are
    /// [`crate::validate`]'s).
    pub fn from_json(json: String) -> Result<Properties, PropertiesError> {
        Properties::from_raw(RawValue::from_string(json)?)
    }

    fn from_raw(raw: Box<RawValue>) -> Result<Properties, PropertiesError> {
        let text = raw.get().as_bytes();
        match text.first() {
            Some(b'{') => {}
            _ => return Err(PropertiesError::NotObject),
        }
        // `{}` with any whitespace inside: nothing to keep.
        let inner = text
            .get(1..text.len().saturating_sub(1))
            .unwrap_or_default();
        if inner.iter().all(u8::is_ascii_whitespace) {
            return Ok(Properties(None));
        }
        Ok(Properties(Some(raw)))
    }

    /// The object as JSON text (`{}` when empty).
    pub fn get(&self) -> &str {
        self.0.as_deref().map_or("{}", RawValue::get)
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The text's length in bytes.
    pub fn len(&self) -> usize {
        self.0.as_deref().map_or(0, |r| r.get().len())
    }

    /// The object as a tree (for tests and rare readers; the hot paths
    /// never need one).
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(self.get()).unwrap_or_default()
    }

    /// Sets one top-level entry, rebuilding the text (for tests and tools
    /// that make events; the hot paths never change properties).
    pub fn insert(&mut self, key: String, value: Value) {
        let mut map = self.to_map();
        map.insert(key, value);
        *self = map.into();
    }

    /// The top-level entries whose value is a number, as `f64` (what a
    /// time-series field can hold). Keys with escapes are decoded.
    pub fn numbers(&self) -> impl Iterator<Item = (Cow<'_, str>, f64)> {
        let entries = match &self.0 {
            Some(raw) => serde_json::from_str::<TopLevel<'_>>(raw.get())
                .map(|t| t.0)
                .unwrap_or_default(),
            None => Vec::new(),
        };
        entries.into_iter().filter_map(|(k, v)| {
            let text = v.get();
            matches!(text.as_bytes().first(), Some(b'-' | b'0'..=b'9'))
                .then(|| text.parse::<f64>().ok())
                .flatten()
                .map(|n| (k, n))
        })
    }
}

/// The top-level entries of an object, values left as text.
struct TopLevel<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    out.push((k.0, map.next_value::<&'de RawValue>()?));
                }
                Ok(TopLevel(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A key borrowed from the text when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Properties::from_raw(raw).map_err(|_| {
            de::Error::invalid_type(de::Unexpected::Other("a non-object"), &"a JSON object")
        })
    }
}

impl Serialize for Properties {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(raw) => raw.serialize(s),
            None => s.collect_map(core::iter::empty::<((), ())>()),
        }
    }
}

impl PartialEq for Properties {
    /// The same object: the same text, or the same tree however spaced.
    fn eq(&self, other: &Properties) -> bool {
        self.get() == other.get() || self.to_map() == other.to_map()
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl From<Map<String, Value>> for Properties {
    fn from(map: Map<String, Value>) -> Properties {
        if map.is_empty() {
            return Properties(None);
        }
        let text = serde_json::to_string(&map).expect("a map with string keys always serialises");
        Properties(Some(
            RawValue::from_string(text).expect("serde_json's own output is JSON"),
        ))
    }
}

impl TryFrom<Value> for Properties {
    type Error = PropertiesError;
    fn try_from(v: Value) -> Result<Properties, PropertiesError> {
        match v {
            Value::Object(m) => Ok(m.into()),
            _ => Err(PropertiesError::NotObject),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_text_is_kept_as_sent_and_an_empty_object_is_empty() {
        let p: Properties = serde_json::from_str(r#"{ "a" : [1, {"b": null}] }"#).unwrap();
        assert_eq!(p.get(), r#"{ "a" : [1, {"b": null}] }"#);
        assert!(!p.is_empty());
        for empty in ["{}", "{ }", "{\n\t}"] {
            let p: Properties = serde_json::from_str(empty).unwrap();
            assert!(p.is_empty(), "{empty:?}");
            assert_eq!(p.get(), "{}");
        }
        assert_eq!(serde_json::to_string(&Properties::default()).unwrap(), "{}");
    }

    #[test]
    fn anything_but_an_object_is_refused() {
        for bad in ["[1]", "null", "1", "\"x\"", "true"] {
            assert!(serde_json::from_str::<Properties>(bad).is_err(), "{bad}");
            assert!(matches!(
                Properties::from_json(bad.into()),
                Err(PropertiesError::NotObject)
            ));
        }
        for broken in ["{", "{\"a\":}", "{\"a\":1}}", ""] {
            assert!(Properties::from_json(broken.into()).is_err(), "{broken}");
        }
    }

    #[test]
    fn numbers_are_the_top_level_numeric_entries_with_decoded_keys() {
        let p = Properties::from_json(
            r#"{"n":-1.5e2,"s":"7","b":true,"o":{"x":1},"a\u00e9":3,"big":18446744073709551616}"#
                .into(),
        )
        .unwrap();
        let got: Vec<(String, f64)> = p.numbers().map(|(k, n)| (k.into_owned(), n)).collect();
        assert_eq!(
            got,
            [
                ("n".to_owned(), -150.0),
                ("a\u{e9}".to_owned(), 3.0),
                ("big".to_owned(), 18_446_744_073_709_551_616.0)
            ]
        );
        assert_eq!(Properties::default().numbers().count(), 0);
    }

    #[test]
    fn equal_objects_compare_equal_however_spaced() {
        let a = Properties::from_json(r#"{"a": 1, "b": [true]}"#.into()).unwrap();
        let b: Properties = json!({"b": [true], "a": 1}).try_into().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, Properties::default());
        assert_eq!(b.to_map()["a"], json!(1));
    }
}
