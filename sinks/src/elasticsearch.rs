//! The Elasticsearch sink: enriched events into time-based indices
//! `<prefix>-<tenant>-YYYY.MM.DD`, with the event id as `_id`, so a re-delivered event
//! overwrites itself and never duplicates.
//!
//! Each bulk response is read item by item: items refused for their content (mapping or
//! parsing errors) are dead-lettered with the server's error type and reason; items
//! refused for load (429, 5xx) are re-sent alone with backoff; the whole batch is retried
//! when the cluster cannot be reached.

use std::time::Duration;

use elasticsearch::http::request::JsonBody;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::indices::IndicesPutIndexTemplateParts;
use elasticsearch::{BulkParts, Elasticsearch};
use futures::StreamExt;
use serde_json::{json, Value};
use sluice_core::config::{ElasticsearchConfig, EsOpType};
use sluice_schemas::EnrichedEvent;
use sluice_stages::Failure;

use crate::consumer::{BatchWriter, WriteError};
use crate::timescale::extra_json;

/// Why the Elasticsearch sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum EsError {
    /// The URL is wrong.
    #[error("invalid elasticsearch url: {0}")]
    Url(String),
    /// A request failed.
    #[error("elasticsearch: {0}")]
    Request(#[from] elasticsearch::Error),
    /// The server refused the index template.
    #[error("index template refused ({status}): {body}")]
    Template {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
}

/// A client for the configured cluster.
pub fn client(config: &ElasticsearchConfig) -> Result<Elasticsearch, EsError> {
    let url =
        elasticsearch::http::Url::parse(&config.url).map_err(|e| EsError::Url(e.to_string()))?;
    // A request to a server that hangs fails after the timeout and is retried, instead
    // of stalling the sink for good.
    let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
        .timeout(Duration::from_millis(config.request_timeout_ms.max(1)))
        .build()
        .map_err(|e| EsError::Url(e.to_string()))?;
    Ok(Elasticsearch::new(transport))
}

/// Name of the index template for `prefix`.
pub fn template_name(prefix: &str) -> String {
    format!("{prefix}-template")
}

/// Create or update the index template with explicit mappings for `<prefix>-*` indices.
pub async fn put_template(
    client: &Elasticsearch,
    config: &ElasticsearchConfig,
) -> Result<(), EsError> {
    let keyword = json!({"type": "keyword"});
    let body = json!({
        "index_patterns": [format!("{}-*", config.index_prefix)],
        "template": {
            "settings": {"number_of_shards": 1},
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "event_id": keyword, "tenant": keyword, "user_id": keyword, "session_id": keyword,
                    "event_type": keyword, "url": keyword, "referrer": keyword,
                    "@timestamp": {"type": "date"}, "received_at": {"type": "date"},
                    "user_agent": {"type": "text"}, "ip": keyword,
                    "browser": keyword, "browser_version": keyword, "os": keyword, "device": keyword,
                    "network": keyword, "country": keyword,
                    "tenant_name": keyword, "tenant_plan": keyword,
                    // Unknown client fields are searchable but typed by first use.
                    "extra": {"type": "object", "dynamic": true}
                }
            }
        }
    });
    let resp = client
        .indices()
        .put_index_template(IndicesPutIndexTemplateParts::Name(&template_name(
            &config.index_prefix,
        )))
        .body(body)
        .send()
        .await?;
    let status = resp.status_code().as_u16();
    if status >= 300 {
        let body = resp.text().await.unwrap_or_default();
        return Err(EsError::Template { status, body });
    }
    Ok(())
}

/// The index an event goes to: `<prefix>-<tenant>-YYYY.MM.DD` (UTC, event time).
pub fn index_name(prefix: &str, e: &EnrichedEvent) -> String {
    let day = chrono::DateTime::from_timestamp_millis(e.event_time)
        .map(|t| t.format("%Y.%m.%d").to_string())
        .unwrap_or_else(|| "invalid-date".into());
    // Index names must be lowercase and free of a few characters.
    let tenant: String = e
        .tenant
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}-{tenant}-{day}")
}

/// The document of an event.
pub fn document(e: &EnrichedEvent) -> Value {
    let ts = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    json!({
        "event_id": e.event_id, "tenant": e.tenant, "user_id": e.user_id, "session_id": e.session_id,
        "event_type": e.event_type, "url": e.url, "referrer": e.referrer,
        "@timestamp": ts(e.event_time), "received_at": ts(e.received_at),
        "user_agent": e.user_agent, "ip": e.ip, "browser": e.browser, "browser_version": e.browser_version,
        "os": e.os, "device": e.device, "network": e.network, "country": e.country,
        "tenant_name": e.tenant_name, "tenant_plan": e.tenant_plan,
        "extra": extra_json(e),
    })
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

    /// Write one bulk-sized chunk, re-sending only the items refused for load until
    /// none is left. Returns the items refused for their content.
    async fn write_chunk(
        &self,
        events: &[EnrichedEvent],
        mut pending: Vec<usize>,
    ) -> Result<Vec<(usize, Failure)>, WriteError> {
        let mut failures = Vec::new();
        let mut backoff = Duration::from_millis(100);
        while !pending.is_empty() {
            let answers = self.bulk(events, &pending).await?;
            let mut retry = Vec::new();
            for (&i, answer) in pending.iter().zip(answers) {
                match answer {
                    None => {}
                    Some((status, _)) if status == 429 || status >= 500 => retry.push(i),
                    Some((status, error)) => {
                        let kind = error["type"].as_str().unwrap_or("error");
                        let reason = error["reason"].as_str().unwrap_or("no reason given");
                        failures.push((
                            i,
                            Failure::new("write", format!("{status} {kind}: {reason}")),
                        ));
                    }
                }
            }
            if !retry.is_empty() {
                metrics::counter!("sluice_sink_retries_total", "sink" => "elasticsearch")
                    .increment(retry.len() as u64);
                tracing::warn!(items = retry.len(), retry_in = ?backoff, "bulk items refused for load; re-sending them");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            pending = retry;
        }
        Ok(failures)
    }

    /// One `_bulk` request for `items` (index into the batch). Returns, per item,
    /// `None` for success or the item's status and error.
    async fn bulk(
        &self,
        events: &[EnrichedEvent],
        items: &[usize],
    ) -> Result<Vec<Option<(u16, Value)>>, WriteError> {
        let op = match self.config.op_type {
            EsOpType::Index => "index",
            EsOpType::Create => "create",
        };
        let mut body: Vec<JsonBody<Value>> = Vec::with_capacity(items.len() * 2);
        for &i in items {
            let e = &events[i];
            body.push(json!({op: {"_index": index_name(&self.config.index_prefix, e), "_id": e.event_id}}).into());
            body.push(document(e).into());
        }
        let resp = self
            .client
            .bulk(BulkParts::None)
            .body(body)
            .send()
            .await
            .map_err(|e| WriteError::Transient(format!("bulk request: {e}")))?;
        let status = resp.status_code().as_u16();
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
        Ok(answers
            .into_iter()
            .map(|item| {
                let result = item
                    .as_object()
                    .and_then(|o| o.values().next())
                    .cloned()
                    .unwrap_or(Value::Null);
                let status = result["status"].as_u64().unwrap_or(500) as u16;
                // 409 under `create`: the document is there already, as wanted.
                let exists = status == 409 && op == "create";
                (status >= 300 && !exists).then(|| (status, result["error"].clone()))
            })
            .collect())
    }
}

impl BatchWriter for ElasticsearchWriter {
    type Record = EnrichedEvent;

    fn name(&self) -> &'static str {
        "elasticsearch"
    }

    async fn write(&self, events: &[EnrichedEvent]) -> Result<Vec<(usize, Failure)>, WriteError> {
        let mut failures = Vec::new();
        // Split into requests bounded by count and (approximate) bytes.
        let mut chunks: Vec<Vec<usize>> = vec![Vec::new()];
        let mut bytes = 0usize;
        for (i, e) in events.iter().enumerate() {
            let size = 200
                + e.event_id.len()
                + e.user_agent.as_ref().map_or(0, String::len)
                + e.url.as_ref().map_or(0, String::len)
                + e.extra.values().map(|v| v.len() + 16).sum::<usize>();
            let current = chunks.last_mut().expect("never empty");
            if !current.is_empty()
                && (current.len() >= self.config.bulk_max_docs
                    || bytes + size > self.config.bulk_max_bytes)
            {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            chunks.last_mut().expect("never empty").push(i);
        }
        let results: Vec<_> = futures::stream::iter(chunks.into_iter().filter(|c| !c.is_empty()))
            .map(|chunk| self.write_chunk(events, chunk))
            .buffer_unordered(self.config.bulk_in_flight.max(1))
            .collect()
            .await;
        for r in results {
            failures.extend(r?);
        }
        Ok(failures)
    }
}
