//! The fields of an [`EnrichedEvent`], described once: the sinks derive their table
//! columns, insert statements, index mappings and documents from this table, and
//! `sluice audit --values` compares stored values field by field through it. A test
//! checks it against the Avro schema, so adding a field means adding it to the schema,
//! to the rule that fills it, and here.

use std::collections::HashMap;

use crate::EnrichedEvent;

/// How a field is typed and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A required string matched exactly (a keyword in search, `text NOT NULL` in SQL).
    Key,
    /// An optional string matched exactly.
    Keyword,
    /// An optional string searched as full text.
    Text,
    /// A required time, Unix milliseconds.
    Time,
    /// A map of names to JSON texts (unknown client fields).
    Json,
}

impl FieldKind {
    /// Whether every event has a value.
    pub const fn required(self) -> bool {
        matches!(self, FieldKind::Key | FieldKind::Time | FieldKind::Json)
    }
}

/// The value of one field of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValue<'a> {
    /// A string, or none.
    Str(Option<&'a str>),
    /// A time, Unix milliseconds.
    Millis(i64),
    /// The map of unknown fields.
    Json(&'a HashMap<String, String>),
}

impl FieldValue<'_> {
    /// The value as a string, for comparisons and messages; `None` for no value.
    pub fn to_text(&self) -> Option<String> {
        match self {
            FieldValue::Str(s) => s.map(str::to_string),
            FieldValue::Millis(ms) => Some(ms.to_string()),
            FieldValue::Json(map) => Some(json_object(map).to_string()),
        }
    }
}

/// A field's value as read back from a sink, to set on an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A string, or none.
    Str(Option<String>),
    /// A time, Unix milliseconds.
    Millis(i64),
    /// A map of names to JSON texts.
    Json(HashMap<String, String>),
}

/// One field of [`EnrichedEvent`].
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The field's name in the Avro schema (and, unless a sink renames it, everywhere).
    pub name: &'static str,
    /// Its type.
    pub kind: FieldKind,
    /// Its value in an event.
    pub get: for<'a> fn(&'a EnrichedEvent) -> FieldValue<'a>,
    /// Set it from a value read back (a value of another kind is ignored).
    pub set: fn(&mut EnrichedEvent, Stored),
}

fn s(v: &str) -> FieldValue<'_> {
    FieldValue::Str(Some(v))
}

fn o(v: &Option<String>) -> FieldValue<'_> {
    FieldValue::Str(v.as_deref())
}

fn req(to: &mut String, v: Stored) {
    if let Stored::Str(Some(s)) = v {
        *to = s;
    }
}

fn opt(to: &mut Option<String>, v: Stored) {
    if let Stored::Str(s) = v {
        *to = s;
    }
}

fn ms(to: &mut i64, v: Stored) {
    if let Stored::Millis(m) = v {
        *to = m;
    }
}

/// Every field of an enriched event, in the Avro schema's order.
#[rustfmt::skip]
pub const ENRICHED_FIELDS: &[Field] = &[
    Field { name: "event_id", kind: FieldKind::Key, get: |e| s(&e.event_id), set: |e, v| req(&mut e.event_id, v) },
    Field { name: "tenant", kind: FieldKind::Key, get: |e| s(&e.tenant), set: |e, v| req(&mut e.tenant, v) },
    Field { name: "user_id", kind: FieldKind::Key, get: |e| s(&e.user_id), set: |e, v| req(&mut e.user_id, v) },
    Field { name: "session_id", kind: FieldKind::Keyword, get: |e| o(&e.session_id), set: |e, v| opt(&mut e.session_id, v) },
    Field { name: "event_type", kind: FieldKind::Key, get: |e| s(&e.event_type), set: |e, v| req(&mut e.event_type, v) },
    Field { name: "url", kind: FieldKind::Keyword, get: |e| o(&e.url), set: |e, v| opt(&mut e.url, v) },
    Field { name: "referrer", kind: FieldKind::Keyword, get: |e| o(&e.referrer), set: |e, v| opt(&mut e.referrer, v) },
    Field { name: "event_time", kind: FieldKind::Time, get: |e| FieldValue::Millis(e.event_time), set: |e, v| ms(&mut e.event_time, v) },
    Field { name: "received_at", kind: FieldKind::Time, get: |e| FieldValue::Millis(e.received_at), set: |e, v| ms(&mut e.received_at, v) },
    Field { name: "user_agent", kind: FieldKind::Text, get: |e| o(&e.user_agent), set: |e, v| opt(&mut e.user_agent, v) },
    Field { name: "ip", kind: FieldKind::Keyword, get: |e| o(&e.ip), set: |e, v| opt(&mut e.ip, v) },
    Field { name: "extra", kind: FieldKind::Json, get: |e| FieldValue::Json(&e.extra), set: |e, v| if let Stored::Json(m) = v { e.extra = m } },
    Field { name: "browser", kind: FieldKind::Keyword, get: |e| o(&e.browser), set: |e, v| opt(&mut e.browser, v) },
    Field { name: "browser_version", kind: FieldKind::Keyword, get: |e| o(&e.browser_version), set: |e, v| opt(&mut e.browser_version, v) },
    Field { name: "os", kind: FieldKind::Keyword, get: |e| o(&e.os), set: |e, v| opt(&mut e.os, v) },
    Field { name: "device", kind: FieldKind::Keyword, get: |e| o(&e.device), set: |e, v| opt(&mut e.device, v) },
    Field { name: "network", kind: FieldKind::Keyword, get: |e| o(&e.network), set: |e, v| opt(&mut e.network, v) },
    Field { name: "country", kind: FieldKind::Keyword, get: |e| o(&e.country), set: |e, v| opt(&mut e.country, v) },
    Field { name: "tenant_name", kind: FieldKind::Keyword, get: |e| o(&e.tenant_name), set: |e, v| opt(&mut e.tenant_name, v) },
    Field { name: "tenant_plan", kind: FieldKind::Keyword, get: |e| o(&e.tenant_plan), set: |e, v| opt(&mut e.tenant_plan, v) },
];

/// A map of JSON texts from a JSON object (how a sink stores `extra`).
pub fn json_texts(v: &serde_json::Value) -> HashMap<String, String> {
    v.as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.to_string())).collect())
        .unwrap_or_default()
}

/// The field named `name`.
pub fn field(name: &str) -> Option<&'static Field> {
    ENRICHED_FIELDS.iter().find(|f| f.name == name)
}

/// The `extra` map as one JSON object, each value parsed back from its JSON text (a
/// value that is not JSON stays a string), keys sorted.
pub fn json_object(extra: &HashMap<String, String>) -> serde_json::Value {
    let sorted: std::collections::BTreeMap<&String, &String> = extra.iter().collect();
    serde_json::Value::Object(
        sorted
            .into_iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::from_str(v)
                        .unwrap_or_else(|_| serde_json::Value::String(v.clone())),
                )
            })
            .collect(),
    )
}

/// The fields in which two events differ, with both values (as text).
pub fn differences(
    a: &EnrichedEvent,
    b: &EnrichedEvent,
) -> Vec<(&'static str, Option<String>, Option<String>)> {
    ENRICHED_FIELDS
        .iter()
        .filter_map(|f| {
            let (x, y) = ((f.get)(a), (f.get)(b));
            let same = match (x, y) {
                (FieldValue::Json(m), FieldValue::Json(n)) => json_object(m) == json_object(n),
                _ => x == y,
            };
            (!same).then(|| (f.name, x.to_text(), y.to_text()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::Schema;

    /// The table and the Avro schema name the same fields, in the same order, with the
    /// same optionality: a field added to one and not the other fails here.
    #[test]
    fn the_table_matches_the_avro_schema() {
        let schema = Schema::parse_str(crate::ENRICHED_EVENT_AVSC).unwrap();
        let Schema::Record(record) = schema else {
            panic!("EnrichedEvent is a record")
        };
        let avro: Vec<(String, bool)> = record
            .fields
            .iter()
            .map(|f| {
                let optional = matches!(&f.schema, Schema::Union(u) if u.is_nullable());
                (f.name.clone(), !optional)
            })
            .collect();
        let table: Vec<(String, bool)> = ENRICHED_FIELDS
            .iter()
            .map(|f| (f.name.to_string(), f.kind.required()))
            .collect();
        assert_eq!(table, avro);
    }

    /// Reading every field back through its setter gives the same event.
    #[test]
    fn every_field_round_trips_through_its_setter() {
        let mut a = EnrichedEvent::from_click(crate::tests::click());
        a.country = Some("DE".into());
        let mut b = EnrichedEvent::default();
        for f in ENRICHED_FIELDS {
            let v = match (f.get)(&a) {
                FieldValue::Str(s) => Stored::Str(s.map(str::to_string)),
                FieldValue::Millis(m) => Stored::Millis(m),
                FieldValue::Json(m) => Stored::Json(json_texts(&json_object(m))),
            };
            (f.set)(&mut b, v);
        }
        assert!(differences(&a, &b).is_empty(), "{:?}", differences(&a, &b));
    }

    /// ClickEvent's schema is EnrichedEvent's common part: the same fields, in order.
    #[test]
    fn the_click_schema_is_the_enriched_schemas_common_part() {
        let names = |avsc: &str| -> Vec<String> {
            match Schema::parse_str(avsc).unwrap() {
                Schema::Record(r) => r.fields.iter().map(|f| f.name.clone()).collect(),
                _ => panic!("a record"),
            }
        };
        let click = names(crate::CLICK_EVENT_AVSC);
        let enriched = names(crate::ENRICHED_EVENT_AVSC);
        assert_eq!(click, enriched[..click.len()]);
    }

    #[test]
    fn differences_name_the_field_and_both_values() {
        let mut a = EnrichedEvent::from_click(crate::tests::click());
        a.country = Some("XX".into());
        let mut b = a.clone();
        b.country = Some("DE".into());
        b.extra = a.extra.clone();
        assert_eq!(
            differences(&a, &b),
            vec![("country", Some("XX".into()), Some("DE".into()))]
        );
        assert!(differences(&a, &a).is_empty());
    }
}
