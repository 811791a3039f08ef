//! Reading documents back (for `sluice audit` and `replay --diff`): pages of a search
//! sorted by identity, with `search_after`.

use elasticsearch::{Elasticsearch, SearchParts};
use serde_json::{json, Value};
use sluice_schemas::fields::{json_texts, FieldKind, Stored as FieldStored, ENRICHED_FIELDS};
use sluice_schemas::EnrichedEvent;

use super::document::{document_field, PROCESSED_AT, REPLAY_EPOCH};
use super::EsError;
use crate::{Selection, Stored};

/// Documents per page.
const PAGE: usize = 5_000;

fn millis(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis()),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn iso(ms: i64) -> String {
    // Years 0..9999 hold every date Elasticsearch can parse.
    chrono::DateTime::from_timestamp_millis(ms.clamp(-62_167_219_200_000, 253_402_300_799_999))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The event a document holds.
pub fn event_of(source: &Value) -> EnrichedEvent {
    let mut e = EnrichedEvent::default();
    for f in ENRICHED_FIELDS {
        let v = &source[document_field(f.name)];
        let value = match f.kind {
            FieldKind::Time => FieldStored::Millis(millis(v).unwrap_or(0)),
            FieldKind::Json => FieldStored::Json(json_texts(v)),
            FieldKind::Key | FieldKind::Keyword | FieldKind::Text => {
                FieldStored::Str(v.as_str().map(str::to_string))
            }
        };
        (f.set)(&mut e, value);
    }
    e
}

/// Every document of `selection` under `<prefix>-*`; with `events`, the whole event of
/// each too. Two documents of one event (in two indices) are both returned.
pub async fn read_stored(
    client: &Elasticsearch,
    prefix: &str,
    selection: &Selection,
    events: bool,
) -> Result<Vec<Stored>, EsError> {
    let pattern = format!("{prefix}-*");
    client
        .indices()
        .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[
            &pattern,
        ]))
        .allow_no_indices(true)
        .send()
        .await?;
    let queries: Vec<Value> = match selection {
        Selection::Received { from, to, tenant } => {
            let mut filter =
                vec![json!({"range": {"received_at": {"gte": iso(*from), "lt": iso(*to)}}})];
            if let Some(t) = tenant {
                filter.push(json!({"term": {"tenant": t}}));
            }
            vec![json!({"bool": {"filter": filter}})]
        }
        Selection::Events(keys) => {
            let mut by_tenant: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
            for (t, id) in keys {
                by_tenant.entry(t).or_default().push(id);
            }
            by_tenant
                .into_iter()
                .flat_map(|(t, ids)| {
                    ids.chunks(1_000)
                        .map(|c| json!({"bool": {"filter": [{"term": {"tenant": t}}, {"terms": {"event_id": c}}]}}))
                        .collect::<Vec<_>>()
                })
                .collect()
        }
    };
    let source = if events {
        json!(true)
    } else {
        json!([
            "tenant",
            "event_id",
            "received_at",
            PROCESSED_AT,
            REPLAY_EPOCH
        ])
    };
    let mut out = Vec::new();
    for query in queries {
        let mut after: Option<Value> = None;
        loop {
            let mut body = json!({
                "size": PAGE,
                "_source": source,
                "query": query,
                "sort": [{"tenant": "asc"}, {"event_id": "asc"}, {"received_at": "asc"}, {PROCESSED_AT: "asc"}],
            });
            if let Some(a) = &after {
                body["search_after"] = a.clone();
            }
            let resp = client
                .search(SearchParts::Index(&[&pattern]))
                .allow_no_indices(true)
                .ignore_unavailable(true)
                .body(body)
                .send()
                .await?;
            let status = resp.status_code().as_u16();
            if status >= 300 {
                let body = resp.text().await.unwrap_or_default();
                return Err(EsError::Refused {
                    what: "search",
                    status,
                    body,
                });
            }
            let body: Value = resp.json().await?;
            let hits = body["hits"]["hits"].as_array().cloned().unwrap_or_default();
            for h in &hits {
                let s = &h["_source"];
                out.push(Stored {
                    tenant: s["tenant"].as_str().unwrap_or_default().to_string(),
                    event_id: s["event_id"].as_str().unwrap_or_default().to_string(),
                    received_at: millis(&s["received_at"]).unwrap_or(0),
                    version: sluice_core::headers::version_of(
                        s[REPLAY_EPOCH]
                            .as_u64()
                            .and_then(|e| u32::try_from(e).ok())
                            .unwrap_or(0),
                        millis(&s[PROCESSED_AT]).unwrap_or(0),
                    ),
                    event: events.then(|| event_of(s)),
                });
            }
            if hits.len() < PAGE {
                break;
            }
            after = hits.last().map(|h| h["sort"].clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elasticsearch::document::document;

    #[test]
    fn a_document_reads_back_as_its_event() {
        let mut e = EnrichedEvent::from_click(sluice_schemas::ClickEvent {
            event_id: "e1".into(),
            tenant: "acme".into(),
            user_id: "u".into(),
            event_type: "click".into(),
            event_time: 1_795_428_000_250,
            received_at: 1_795_428_001_000,
            extra: [("n".to_string(), "[1,2]".to_string())].into(),
            ..Default::default()
        });
        e.country = Some("DE".into());
        let back = event_of(&document(&e, 7));
        assert!(
            sluice_schemas::fields::differences(&e, &back).is_empty(),
            "{:?}",
            sluice_schemas::fields::differences(&e, &back)
        );
    }
}
