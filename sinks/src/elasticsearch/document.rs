//! What the Elasticsearch sink stores: index names, document ids, documents and their
//! mapping, all derived from the event's field table.

use serde::ser::{SerializeMap, Serializer};
use serde_json::{json, Value};
use sluice_schemas::fields::{json_object, FieldKind, FieldValue, ENRICHED_FIELDS};
use sluice_schemas::EnrichedEvent;

/// The document field a field of the event is stored in: its own name, but the event
/// time is `@timestamp` (what Kibana and most tools look for).
pub fn document_field(field: &str) -> &str {
    match field {
        "event_time" => "@timestamp",
        other => other,
    }
}

/// The document field holding the event's version (processing stamp).
pub const PROCESSED_AT: &str = "processed_at";
/// The document field holding the replay epoch part of its version.
pub const REPLAY_EPOCH: &str = "replay_epoch";

/// The index an event goes to: `<prefix>-<tenant>-YYYY.MM.DD` of the day ingest received
/// it (UTC), the tenant written by [`index_tenant`]. The ingest time never changes when a
/// replay corrects an event, so a corrected event (even one whose event time moved to
/// another day) overwrites its document in place, like a data stream's backing indices,
/// which also follow write time. A tenant's searches (and a role granting them) use
/// [`tenant_pattern`], which matches no other tenant's indices.
pub fn index_name(prefix: &str, tenant: &str, received_at_ms: i64) -> String {
    let day = chrono::DateTime::from_timestamp_millis(received_at_ms)
        .map(|t| t.format("%Y.%m.%d").to_string())
        .unwrap_or_else(|| "invalid-date".into());
    format!("{prefix}-{}-{day}", index_tenant(tenant))
}

/// The index pattern of one tenant's indices, `<prefix>-<tenant>-*`.
pub fn tenant_pattern(prefix: &str, tenant: &str) -> String {
    format!("{prefix}-{}-*", index_tenant(tenant))
}

/// Longest tenant part of an index name before it becomes a digest (index names hold
/// at most 255 bytes).
const MAX_INDEX_TENANT: usize = 180;

/// A tenant as a part of an index name, one to one: lowercase ASCII letters and digits
/// stay, every other byte (capitals, `-`, `_`, `.`, UTF-8) becomes `_` and two hex digits.
/// No two tenants share a part (`Acme`, `acme`, `a.b` and `a_b` are four), and a part
/// never holds `-`, so `<prefix>-acme-*` cannot match `acme-eu`'s indices. A part
/// longer than [`MAX_INDEX_TENANT`] is `_h` and a SHA-256 prefix (`h` is no hex digit).
pub fn index_tenant(tenant: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(tenant.len());
    for b in tenant.bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "_{b:02x}");
        }
    }
    if out.len() > MAX_INDEX_TENANT {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(tenant.as_bytes());
        out = format!("_h{}", hex::encode(&digest[..16]));
    }
    out
}

/// The document id of an event: its identity `(tenant, event_id)` as `tenant:event_id`,
/// the tenant's `%` and `:` escaped so that no two identities share an id. Ids longer
/// than Elasticsearch's 512 bytes become a hash of the identity.
pub fn doc_id(tenant: &str, event_id: &str) -> String {
    let id = format!(
        "{}:{event_id}",
        tenant.replace('%', "%25").replace(':', "%3A")
    );
    if id.len() <= 512 {
        id
    } else {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(id.as_bytes());
        format!("sha256:{}", hex::encode(digest))
    }
}

fn iso(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Append the JSON document of an event at `version` (see
/// [`sluice_core::headers::version_of`]) to `out`.
pub fn write_document(
    out: &mut Vec<u8>,
    e: &EnrichedEvent,
    version: i64,
) -> Result<(), serde_json::Error> {
    let (epoch, processed_at) = sluice_core::headers::split_version(version);
    let mut ser = serde_json::Serializer::new(out);
    let mut map = ser.serialize_map(Some(ENRICHED_FIELDS.len() + 2))?;
    for f in ENRICHED_FIELDS {
        let key = document_field(f.name);
        match (f.get)(e) {
            FieldValue::Str(v) => map.serialize_entry(key, &v)?,
            FieldValue::Millis(ms) => map.serialize_entry(key, &iso(ms))?,
            FieldValue::Json(m) => map.serialize_entry(key, &json_object(m))?,
        }
    }
    map.serialize_entry(PROCESSED_AT, &iso(processed_at))?;
    map.serialize_entry(REPLAY_EPOCH, &epoch)?;
    map.end()
}

/// The document of an event, as a value (tests and benchmarks).
pub fn document(e: &EnrichedEvent, version: i64) -> Value {
    let mut out = Vec::new();
    write_document(&mut out, e, version)
        .ok()
        .and_then(|()| serde_json::from_slice(&out).ok())
        .unwrap_or(Value::Null)
}

/// The explicit mapping of the event documents.
pub fn mapping() -> Value {
    let mut properties = serde_json::Map::new();
    for f in ENRICHED_FIELDS {
        let m = match f.kind {
            FieldKind::Key | FieldKind::Keyword => json!({"type": "keyword"}),
            FieldKind::Text => json!({"type": "text"}),
            FieldKind::Time => json!({"type": "date"}),
            // Unknown client fields are searchable but typed by first use.
            FieldKind::Json => json!({"type": "object", "dynamic": true}),
        };
        properties.insert(document_field(f.name).to_string(), m);
    }
    properties.insert(PROCESSED_AT.into(), json!({"type": "date"}));
    properties.insert(REPLAY_EPOCH.into(), json!({"type": "integer"}));
    json!({"dynamic": "strict", "properties": properties})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> EnrichedEvent {
        let mut e = EnrichedEvent::from_click(sluice_schemas::ClickEvent {
            event_id: "e1".into(),
            tenant: "Acme:EU".into(),
            user_id: "u1".into(),
            session_id: None,
            event_type: "page_view".into(),
            url: Some("/a".into()),
            referrer: None,
            event_time: 1_795_478_400_000,  // 2026-11-24T00:00:00Z
            received_at: 1_795_478_399_000, // the day before
            user_agent: None,
            ip: None,
            extra: [("price".to_string(), "5".to_string())].into(),
        });
        e.country = Some("DE".into());
        e
    }

    #[test]
    fn index_follows_the_ingest_day_and_an_escaped_tenant() {
        let e = event();
        assert_eq!(
            index_name("ev", &e.tenant, e.received_at),
            "ev-_41cme_3a_45_55-2026.11.23"
        );
        assert_eq!(index_name("ev", "acme", 0), "ev-acme-1970.01.01");
    }

    #[test]
    fn no_tenant_pattern_matches_another_tenants_index() {
        let tenants = [
            "acme",
            "acme-eu",
            "Acme",
            "ACME",
            "a.b",
            "a_b",
            "a_2eb",
            "a-",
            "café",
            "acme-",
            "x".repeat(300).as_str(),
            &format!("{}y", "x".repeat(300)),
        ]
        .map(String::from);
        for t in &tenants {
            let part = index_tenant(t);
            assert!(
                part.len() <= MAX_INDEX_TENANT && !part.contains('-'),
                "{t}: {part}"
            );
            assert!(part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            let pattern = tenant_pattern("ev", t);
            let prefix = pattern.trim_end_matches('*');
            for other in &tenants {
                let index = index_name("ev", other, 1_795_478_399_000);
                assert_eq!(
                    index.starts_with(prefix),
                    t == other,
                    "{pattern} vs {index}"
                );
            }
        }
    }

    #[test]
    fn ids_keep_tenants_apart() {
        assert_eq!(doc_id("acme", "e1"), "acme:e1");
        // Without escaping, these two would both be "a:b:c".
        assert_ne!(doc_id("a:b", "c"), doc_id("a", "b:c"));
        assert_ne!(doc_id("a%3Ab", "c"), doc_id("a:b", "c"));
        let long = doc_id("acme", &"x".repeat(600));
        assert!(long.starts_with("sha256:") && long.len() < 512, "{long}");
    }

    #[test]
    fn documents_hold_every_field_and_the_version() {
        let doc = document(&event(), 1_795_478_500_000);
        assert_eq!(doc["@timestamp"], "2026-11-24T00:00:00.000Z");
        assert_eq!(doc["country"], "DE");
        assert_eq!(doc["referrer"], Value::Null);
        assert_eq!(doc["extra"]["price"], 5);
        assert_eq!(doc[PROCESSED_AT], "2026-11-24T00:01:40.000Z");
        assert_eq!(doc[REPLAY_EPOCH], 0);
        let fields = doc.as_object().unwrap().len();
        assert_eq!(fields, ENRICHED_FIELDS.len() + 2);
        let replayed = document(
            &event(),
            sluice_core::headers::version_of(4, 1_795_478_500_000),
        );
        assert_eq!(replayed[PROCESSED_AT], "2026-11-24T00:01:40.000Z");
        assert_eq!(replayed[REPLAY_EPOCH], 4);
        // Every field of a document is in the mapping (which is strict).
        let mapping = mapping();
        for key in doc.as_object().unwrap().keys() {
            assert!(mapping["properties"].get(key).is_some(), "{key} unmapped");
        }
    }
}
