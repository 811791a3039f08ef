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
use elasticsearch::auth::Credentials;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::indices::{IndicesPutIndexTemplateParts, IndicesPutMappingParts};
use elasticsearch::Elasticsearch;
use serde_json::json;

pub use bulk::ElasticsearchWriter;
pub use document::{doc_id, document, index_name, tenant_pattern};

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

/// A client for the configured cluster: its credentials (one kind at most) and CA.
pub fn client(config: &ElasticsearchConfig) -> Result<Elasticsearch, EsError> {
    let mut url =
        elasticsearch::http::Url::parse(&config.url).map_err(|e| EsError::Url(e.to_string()))?;
    let credentials = credentials(config, &mut url)?;
    // A request to a server that hangs fails after the timeout and is retried, instead
    // of stalling the sink for good.
    let mut transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
        .timeout(Duration::from_millis(config.request_timeout_ms.max(1)));
    if let Some(credentials) = credentials {
        transport = transport.auth(credentials);
    }
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| EsError::Url(format!("ca_file {}: {e}", path.display())))?;
        let cert = elasticsearch::cert::Certificate::from_pem(&pem)
            .map_err(|e| EsError::Url(format!("ca_file {}: {e}", path.display())))?;
        transport =
            transport.cert_validation(elasticsearch::cert::CertificateValidation::Full(cert));
    }
    let transport = transport.build().map_err(|e| EsError::Url(e.to_string()))?;
    Ok(Elasticsearch::new(transport))
}

/// The configured credentials; a user and password in the URL move out of it (the
/// client sends them as a header, and the URL is logged).
fn credentials(
    config: &ElasticsearchConfig,
    url: &mut elasticsearch::http::Url,
) -> Result<Option<Credentials>, EsError> {
    let from_url = (!url.username().is_empty()).then(|| {
        let user = percent_decode(url.username());
        let password = percent_decode(url.password().unwrap_or_default());
        (user, password)
    });
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let basic = match (&config.username, &config.password) {
        (Some(user), password) => Some(Credentials::Basic(
            user.clone(),
            password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default(),
        )),
        (None, Some(_)) => {
            return Err(EsError::Url(
                "elasticsearch.password is set without elasticsearch.username".into(),
            ))
        }
        (None, None) => from_url.map(|(u, p)| Credentials::Basic(u, p)),
    };
    let api_key = config
        .api_key
        .as_ref()
        .map(|k| Credentials::EncodedApiKey(k.expose().to_string()));
    let bearer = config
        .bearer_token
        .as_ref()
        .map(|t| Credentials::Bearer(t.expose().to_string()));
    let mut set: Vec<Credentials> = [basic, api_key, bearer].into_iter().flatten().collect();
    if set.len() > 1 {
        return Err(EsError::Url(
            "elasticsearch: set one of username/password (or a user in the url), api_key, \
             bearer_token"
                .into(),
        ));
    }
    Ok(set.pop())
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Ask the cluster who it is: its name and version, or why it refuses.
pub async fn check(config: &ElasticsearchConfig) -> Result<String, EsError> {
    let es = client(config)?;
    let resp = es.info().send().await?;
    if !resp.status_code().is_success() {
        return Err(refused("GET /", resp).await);
    }
    let body: serde_json::Value = resp.json().await?;
    Ok(format!(
        "{} {}",
        body["version"]["distribution"]
            .as_str()
            .unwrap_or("elasticsearch"),
        body["version"]["number"].as_str().unwrap_or("?")
    ))
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
    spec.max_batch_bytes = settings.bulk_max_bytes;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with(url: &str) -> (ElasticsearchConfig, elasticsearch::http::Url) {
        let config = ElasticsearchConfig {
            url: url.into(),
            ..Default::default()
        };
        let parsed = elasticsearch::http::Url::parse(url).unwrap_or_else(|e| panic!("{e}"));
        (config, parsed)
    }

    #[test]
    fn url_credentials_become_basic_auth_and_leave_the_url() {
        let (config, mut url) = with("https://elastic:p%40ss@es:9200/");
        let c = credentials(&config, &mut url).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c, Some(Credentials::Basic(u, p)) if u == "elastic" && p == "p@ss"));
        assert_eq!(url.as_str(), "https://es:9200/");
    }

    #[test]
    fn two_kinds_of_credentials_are_refused() {
        let (mut config, mut url) = with("https://es:9200");
        config.username = Some("u".into());
        config.api_key = Some("k".into());
        let e = credentials(&config, &mut url).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("set one of")));
        let (mut config, mut url) = with("https://es:9200");
        config.password = Some("p".into());
        assert!(
            credentials(&config, &mut url).is_err(),
            "a password needs a user"
        );
        let (mut config, mut url) = with("https://es:9200");
        config.bearer_token = Some("t".into());
        let c = credentials(&config, &mut url).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c, Some(Credentials::Bearer(t)) if t == "t"));
    }
}
