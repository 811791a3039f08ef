//! The Elasticsearch sink: enriched events into indices `<prefix>-<tenant>-YYYY.MM.DD`
//! (of ingest time), one document per event with id `tenant:event_id`, versioned by the
//! event's processing stamp, so a replay overwrites and nothing duplicates.
//!
//! Each bulk response is read item by item: items refused for their content (mapping or
//! parsing errors) are dead-lettered with the server's error type and reason; items
//! refused for load (429, 5xx) are re-sent alone with backoff; the whole batch is retried
//! when the cluster cannot be reached.

pub mod bulk;
pub mod config;
pub mod document;
pub mod read;

use std::time::Duration;

use config::ElasticsearchConfig;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::indices::{IndicesPutIndexTemplateParts, IndicesPutMappingParts};
use elasticsearch::Elasticsearch;
use serde_json::json;

pub use bulk::ElasticsearchWriter;
pub use document::{doc_id, document, index_name};

/// Why the Elasticsearch sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum EsError {
    /// The URL is wrong.
    #[error("invalid elasticsearch url: {0}")]
    Url(String),
    /// A request failed.
    #[error("elasticsearch: {0}")]
    Request(#[from] elasticsearch::Error),
    /// The server refused the index template or a mapping update.
    #[error("{what} refused ({status}): {body}")]
    Refused {
        /// What was refused.
        what: &'static str,
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

async fn refused(what: &'static str, resp: elasticsearch::http::response::Response) -> EsError {
    let status = resp.status_code().as_u16();
    let body = resp.text().await.unwrap_or_default();
    EsError::Refused { what, status, body }
}

/// Create or update the index template with explicit mappings for `<prefix>-*`
/// indices, and add fields the indices that exist already lack (a field added to the
/// event would otherwise be refused by their strict mapping until the next day's index).
pub async fn put_template(
    client: &Elasticsearch,
    config: &ElasticsearchConfig,
) -> Result<(), EsError> {
    let mapping = document::mapping();
    let body = json!({
        "index_patterns": [format!("{}-*", config.index_prefix)],
        "template": {
            "settings": {"number_of_shards": 1},
            "mappings": mapping,
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
    if resp.status_code().as_u16() >= 300 {
        return Err(refused("index template", resp).await);
    }
    let pattern = format!("{}-*", config.index_prefix);
    let resp = client
        .indices()
        .put_mapping(IndicesPutMappingParts::Index(&[&pattern]))
        .allow_no_indices(true)
        .body(json!({"properties": mapping["properties"]}))
        .send()
        .await?;
    // 404: no index matches yet.
    if resp.status_code().as_u16() >= 300 && resp.status_code().as_u16() != 404 {
        return Err(refused("mapping update of existing indices", resp).await);
    }
    Ok(())
}

/// Run the Elasticsearch sink (enriched → the indices) until `shutdown` (the index
/// template first).
pub async fn run(
    shared: &sluice_core::wiring::Shared,
    settings: &ElasticsearchConfig,
    rewiring: &sluice_core::wiring::Rewiring,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<crate::SinkStats, crate::consumer::SinkError> {
    use crate::consumer::SinkError;
    let es = client(settings).map_err(|e| SinkError::Setup(format!("elasticsearch.url: {e}")))?;
    put_template(&es, settings)
        .await
        .map_err(|e| SinkError::Setup(format!("elasticsearch index template: {e}")))?;
    let t = &shared.topics;
    let mut spec = crate::SinkSpec::new(t, &settings.group, &t.enriched, rewiring);
    // One bulk request per batch, several in flight.
    spec.batch_size = settings.bulk_max_docs;
    spec.linger = Duration::from_millis(settings.linger_ms);
    spec.write_concurrency = settings.bulk_in_flight;
    let codec = sluice_schemas::setup::reading_codec(&shared.schemas)
        .map_err(|e| SinkError::Setup(format!("schemas: {e}")))?;
    sluice_core::telemetry::process_readiness().set(true);
    crate::run_sink(
        &shared.kafka,
        &spec,
        ElasticsearchWriter::new(es, settings.clone()),
        codec,
        shutdown,
    )
    .await
}
