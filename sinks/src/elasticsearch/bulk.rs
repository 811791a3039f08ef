//! Writing batches with `_bulk`: each document serialized once, requests sized by their
//! serialized bytes, several in flight, and every item's answer read on its own.
//!
//! Documents are versioned with the event's processing stamp (`version_type =
//! external_gte`): a newer processing overwrites, the same one re-delivered rewrites the
//! same document, and an older one is refused with a version conflict, which counts as
//! done (the newer one stays).

use super::config::{ElasticsearchConfig, EsOpType};
use bytes::Bytes;
use elasticsearch::{BulkParts, Elasticsearch};
use futures::StreamExt;
use serde_json::{json, Value};
use sluice_core::failure::Failure;
use sluice_schemas::EnrichedEvent;
use std::ops::Range;

use super::document::{doc_id, index_name, write_document};
use crate::consumer::{BatchWriter, Partial, Rejected, Versioned, WriteError, WriteResult};
use sluice_core::retry::RetryAction;

/// What became of one bulk item.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    /// Stored.
    Written,
    /// Not stored, as intended: a newer version is there (or, under `create`, any).
    Kept,
    /// Refused for load (429, 5xx): send it again.
    Retry,
    /// Refused for its content: dead-letter it.
    Reject(Failure),
}

/// The outcome of an item answered `status` with `error` (null on success).
pub fn classify(op_type: EsOpType, status: u16, error: &Value) -> ItemOutcome {
    match status {
        200..=299 => ItemOutcome::Written,
        409 => {
            let kind = error["type"].as_str().unwrap_or("");
            match op_type {
                // `create`: the document is there already, as wanted.
                EsOpType::Create => ItemOutcome::Kept,
                // A newer processing of the event is stored: keep it.
                EsOpType::Index if kind == "version_conflict_engine_exception" => ItemOutcome::Kept,
                EsOpType::Index => reject(status, error),
            }
        }
        429 | 500..=599 => ItemOutcome::Retry,
        _ => reject(status, error),
    }
}

fn reject(status: u16, error: &Value) -> ItemOutcome {
    let kind = error["type"].as_str().unwrap_or("error");
    let reason = error["reason"].as_str().unwrap_or("no reason given");
    ItemOutcome::Reject(Failure::new("write", format!("{status} {kind}: {reason}")))
}

/// Split items of these serialized sizes into requests of at most `max_docs` items and
/// (unless one item alone is larger) `max_bytes` bytes.
pub fn chunks(sizes: &[usize], max_docs: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && (i - start >= max_docs.max(1) || bytes + size > max_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// One bulk item, serialized once: the action line and the document, each ending in a
/// newline.
#[derive(Debug, Clone)]
struct Item {
    /// Index of its record in the batch.
    record: usize,
    lines: Bytes,
}

/// Writes batches of enriched events with `_bulk`.
pub struct ElasticsearchWriter {
    client: Elasticsearch,
    config: ElasticsearchConfig,
}

impl ElasticsearchWriter {
    /// A writer through `client` (template already in place).
    pub fn new(client: Elasticsearch, config: ElasticsearchConfig) -> Self {
        Self { client, config }
    }

    fn item(&self, record: usize, v: &Versioned<EnrichedEvent>) -> Result<Item, Failure> {
        let e = &v.record;
        let mut meta = json!({
            "_index": index_name(&self.config.index_prefix, &e.tenant, e.received_at),
            "_id": doc_id(&e.tenant, &e.event_id),
        });
        let op = match self.config.op_type {
            EsOpType::Create => "create",
            EsOpType::Index => {
                meta["version"] = json!(v.version.max(0));
                meta["version_type"] = json!("external_gte");
                "index"
            }
        };
        let mut out = Vec::with_capacity(512);
        let encode = |e: serde_json::Error| Failure::new("encode", e.to_string());
        serde_json::to_writer(&mut out, &json!({ op: meta })).map_err(encode)?;
        out.push(b'\n');
        write_document(&mut out, e, v.version).map_err(encode)?;
        out.push(b'\n');
        Ok(Item {
            record,
            lines: Bytes::from(out),
        })
    }

    /// Send one request's items, halving a request the server refuses as too large.
    /// Returns the items refused for their content and those refused for load (to send
    /// again later).
    async fn write_chunk(&self, items: Vec<Item>) -> Result<(Rejected, Vec<Item>), WriteError> {
        let mut failures = Vec::new();
        let mut retry = Vec::new();
        let mut queue = vec![items];
        while let Some(pending) = queue.pop() {
            if pending.is_empty() {
                continue;
            }
            let answers = match self.bulk(&pending).await? {
                Some(answers) => answers,
                None if pending.len() == 1 => {
                    failures.push((
                        pending[0].record,
                        Failure::new(
                            "oversized",
                            format!(
                                "document of {} bytes refused by Elasticsearch as too large (413)",
                                pending[0].lines.len()
                            ),
                        ),
                    ));
                    continue;
                }
                None => {
                    // 413 for the whole request: send each half on its own.
                    let mut first = pending;
                    let second = first.split_off(first.len() / 2);
                    tracing::warn!(
                        items = first.len() + second.len(),
                        "bulk request too large for the server; splitting it"
                    );
                    queue.push(second);
                    queue.push(first);
                    continue;
                }
            };
            for (item, (status, error)) in pending.into_iter().zip(answers) {
                match classify(self.config.op_type, status, &error) {
                    ItemOutcome::Written | ItemOutcome::Kept => {}
                    ItemOutcome::Retry => retry.push(item),
                    ItemOutcome::Reject(f) => failures.push((item.record, f)),
                }
            }
        }
        Ok((failures, retry))
    }

    /// One `_bulk` request of `items`. Returns each item's status and error, or `None`
    /// when the server refused the request as too large (413).
    async fn bulk(&self, items: &[Item]) -> Result<Option<Vec<(u16, Value)>>, WriteError> {
        let body: Vec<Bytes> = items.iter().map(|i| i.lines.clone()).collect();
        let resp = self
            .client
            .bulk(BulkParts::None)
            .body(body)
            .send()
            .await
            .map_err(|e| WriteError::Transient(format!("bulk request: {e}")))?;
        let status = resp.status_code().as_u16();
        if status == 413 {
            return Ok(None);
        }
        if status == 429 || status >= 500 {
            return Err(WriteError::Transient(format!(
                "bulk request answered {status}"
            )));
        }
        if status >= 400 {
            let text = resp.text().await.unwrap_or_default();
            return Err(WriteError::Fatal(format!(
                "bulk request answered {status}: {text}"
            )));
        }
        let body: Value = resp
            .json()
            .await
            .map_err(|e| WriteError::Transient(format!("bulk response: {e}")))?;
        let answers = body["items"].as_array().cloned().unwrap_or_default();
        if answers.len() != items.len() {
            return Err(WriteError::Transient(format!(
                "bulk response has {} items for {} sent",
                answers.len(),
                items.len()
            )));
        }
        Ok(Some(
            answers
                .into_iter()
                .map(|item| {
                    let result = item
                        .as_object()
                        .and_then(|o| o.values().next())
                        .cloned()
                        .unwrap_or(Value::Null);
                    let status = result["status"].as_u64().unwrap_or(500) as u16;
                    (status, result["error"].clone())
                })
                .collect(),
        ))
    }
}

impl BatchWriter for ElasticsearchWriter {
    type Record = EnrichedEvent;

    fn name(&self) -> &'static str {
        "elasticsearch"
    }

    async fn write(&self, batch: &[Versioned<EnrichedEvent>]) -> WriteResult {
        let mut rejected = Vec::new();
        let mut items = Vec::with_capacity(batch.len());
        for (i, v) in batch.iter().enumerate() {
            match self.item(i, v) {
                Ok(item) => items.push(item),
                Err(f) => rejected.push((i, f)),
            }
        }
        let sizes: Vec<usize> = items.iter().map(|i| i.lines.len()).collect();
        let requests: Vec<Vec<Item>> = chunks(
            &sizes,
            self.config.bulk_max_docs,
            self.config.bulk_max_bytes,
        )
        .into_iter()
        .map(|r| items[r].to_vec())
        .collect();
        let results: Vec<_> = futures::stream::iter(requests)
            .map(|chunk| async move {
                let records: Vec<usize> = chunk.iter().map(|i| i.record).collect();
                (records, self.write_chunk(chunk).await)
            })
            .buffer_unordered(self.config.bulk_in_flight.max(1))
            .collect()
            .await;
        // Requests that failed whole, and items refused for load, are written again.
        let mut retry = Vec::new();
        let mut why = String::new();
        for (records, result) in results {
            match result {
                Ok((failures, again)) => {
                    rejected.extend(failures);
                    if !again.is_empty() {
                        why = format!("{} item(s) refused for load", again.len());
                    }
                    retry.extend(again.into_iter().map(|i| i.record));
                }
                Err(WriteError::Fatal(e)) => return RetryAction::DontRetry(e),
                Err(WriteError::Transient(e)) => {
                    why = e;
                    retry.extend(records);
                }
            }
        }
        if retry.is_empty() {
            RetryAction::Successful(rejected)
        } else if retry.len() == batch.len() {
            RetryAction::Retry(why)
        } else {
            retry.sort_unstable();
            RetryAction::RetryPartial(Partial { rejected, retry }, why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_bounded_by_docs_and_bytes() {
        assert_eq!(
            chunks(&[10, 10, 10, 10, 10], 2, 1000),
            vec![0..2, 2..4, 4..5]
        );
        assert_eq!(chunks(&[10, 10, 10, 10], 10, 25), vec![0..2, 2..4]);
        // An item larger than the limit still goes, alone.
        assert_eq!(chunks(&[5, 100, 5], 10, 50), vec![0..1, 1..2, 2..3]);
        assert!(chunks(&[], 10, 10).is_empty());
    }

    #[test]
    fn item_answers_are_classified() {
        let conflict = json!({"type": "version_conflict_engine_exception", "reason": "newer"});
        assert_eq!(
            classify(EsOpType::Index, 201, &Value::Null),
            ItemOutcome::Written
        );
        assert_eq!(classify(EsOpType::Index, 409, &conflict), ItemOutcome::Kept);
        assert_eq!(
            classify(EsOpType::Create, 409, &conflict),
            ItemOutcome::Kept
        );
        assert_eq!(
            classify(EsOpType::Index, 429, &Value::Null),
            ItemOutcome::Retry
        );
        assert_eq!(
            classify(EsOpType::Index, 503, &Value::Null),
            ItemOutcome::Retry
        );
        let parse = json!({"type": "document_parsing_exception", "reason": "bad price"});
        assert_eq!(
            classify(EsOpType::Index, 400, &parse),
            ItemOutcome::Reject(Failure::new(
                "write",
                "400 document_parsing_exception: bad price"
            ))
        );
    }
}
