//! A raw event's top-level fields, read without building a map: keys are borrowed from
//! the line where they hold no escapes, values are `serde_json::Value`s. Parse takes the
//! fields it knows one by one and keeps the rest as `extra`; a `serde_json::Map` cost
//! an allocation per key and a tree insert and remove per field, a fifth of the stage's
//! transform on typical events.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A JSON document's top level: an object's fields, or what it is instead.
pub(super) enum Document<'a> {
    /// An object.
    Object(Fields<'a>),
    /// Anything else.
    Other(Value),
}

impl<'a> Document<'a> {
    /// Read one JSON document (and nothing after it) from `line`.
    pub(super) fn read(line: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

/// An object's fields in input order. A repeated key counts once, with its last value
/// (as in a `serde_json::Map`); a taken field's value is `None`.
pub(super) struct Fields<'a>(Vec<(Cow<'a, str>, Option<Value>)>);

impl Fields<'_> {
    /// Remove the field `name` (every repeat of it); its value.
    pub(super) fn take(&mut self, name: &str) -> Option<Value> {
        let mut last = None;
        for (key, value) in &mut self.0 {
            if key == name {
                if let Some(v) = value.take() {
                    last = Some(v);
                }
            }
        }
        last
    }

    /// The value of the field `name`, if it was not taken.
    pub(super) fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .rev()
            .find(|(key, value)| key == name && value.is_some())
            .and_then(|(_, value)| value.as_ref())
    }

    /// The fields not taken, each value as compact JSON text.
    pub(super) fn into_extra(self) -> HashMap<String, String> {
        // In input order, so a repeated key ends with its last value.
        self.0
            .into_iter()
            .filter_map(|(key, value)| Some((key.into_owned(), value?.to_string())))
            .collect()
    }
}

#[cfg(test)]
impl From<serde_json::Map<String, Value>> for Fields<'static> {
    fn from(map: serde_json::Map<String, Value>) -> Self {
        Self(
            map.into_iter()
                .map(|(k, v)| (Cow::Owned(k), Some(v)))
                .collect(),
        )
    }
}

impl<'de> Deserialize<'de> for Document<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON document")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(0).max(8));
        while let Some(Key(key)) = map.next_key()? {
            fields.push((key, Some(map.next_value::<Value>()?)));
        }
        Ok(Document::Object(Fields(fields)))
    }

    // Anything else is read as the value it is, for the caller to name (parse's `kind`).
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Document::Other(Value::Array(items)))
    }

    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Document::Other(Value::Bool(b)))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Self::Value, E> {
        Ok(Document::Other(Value::from(i)))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Self::Value, E> {
        Ok(Document::Other(Value::from(u)))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Self::Value, E> {
        // JSON holds only finite numbers, so this is never `Null`.
        Ok(Document::Other(Value::from(f)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Document::Other(Value::from(s)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Document::Other(Value::Null))
    }
}

/// An object key, borrowed from the input when it holds no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Key(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Key(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Key(Cow::Owned(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(s: &str) -> Fields<'_> {
        match Document::read(s.as_bytes()) {
            Ok(Document::Object(f)) => f,
            Ok(Document::Other(v)) => panic!("{s}: {v}"),
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn a_repeated_key_counts_once_with_its_last_value() {
        let mut f = fields(r#"{"a":1,"b":2,"a":3}"#);
        assert_eq!(f.get("a"), Some(&Value::from(3)));
        assert_eq!(f.take("a"), Some(Value::from(3)));
        assert_eq!(f.get("a"), None, "every repeat is taken");
        assert_eq!(f.take("a"), None);
        let mut g = fields(r#"{"x":"1","x":{"y":[1,2]},"k\u0041":true}"#);
        assert_eq!(g.take("kA"), Some(Value::Bool(true)), "an escaped key");
        assert_eq!(
            g.into_extra(),
            HashMap::from([("x".to_string(), r#"{"y":[1,2]}"#.to_string())])
        );
    }

    #[test]
    fn anything_but_an_object_is_read_as_its_value() {
        for doc in [
            "[1,{\"a\":[]}]",
            "\"s\"",
            "\"\\u00e9\"",
            "-1",
            "18446744073709551615",
            "1.5e3",
            "true",
            "null",
        ] {
            let want: Value = serde_json::from_str(doc).unwrap();
            assert!(
                matches!(Document::read(doc.as_bytes()), Ok(Document::Other(v)) if v == want),
                "{doc}"
            );
        }
        for bad in ["", "{", "[1,", "{\"a\":1} x", "{\"a\" 1}", "{1:2}"] {
            assert!(Document::read(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
