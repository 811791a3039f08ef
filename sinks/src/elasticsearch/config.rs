//! Settings of the Elasticsearch sink (`[elasticsearch]`).

use serde::{Deserialize, Serialize};
use sluice_core::secret::Secret;

/// The Elasticsearch sink.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ElasticsearchConfig {
    /// Base URL of the cluster; `https://user:password@host:9200` is basic auth too.
    pub url: String,
    /// Basic auth user (with `password`).
    pub username: Option<String>,
    /// Basic auth password.
    pub password: Option<Secret>,
    /// An API key as Elasticsearch shows it once created (`encoded`: base64 of `id:key`).
    pub api_key: Option<Secret>,
    /// A bearer token (a service-account token, OAuth), instead of the above.
    pub bearer_token: Option<Secret>,
    /// PEM file of the CA that signed the cluster's certificate (beside the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// Indices are named `<index_prefix>-<tenant>-YYYY.MM.DD` of the ingest day, the tenant
    /// escaped so that no tenant's pattern `<index_prefix>-<tenant>-*` matches another's.
    pub index_prefix: String,
    /// Consumer group.
    pub group: String,
    /// A request slower than this fails and is retried, in milliseconds.
    pub request_timeout_ms: u64,
    /// Most documents in one `_bulk` request.
    pub bulk_max_docs: usize,
    /// Most bytes in one `_bulk` request.
    pub bulk_max_bytes: usize,
    /// Longest wait for a bulk request to fill, in milliseconds.
    pub linger_ms: u64,
    /// Bulk requests in flight at once.
    pub bulk_in_flight: usize,
    /// `index` (versioned by the processing stamp: the newest processing of an event
    /// wins) or `create` (an existing document is refused with 409, which counts as
    /// success: the first write wins, and a replay corrects nothing).
    pub op_type: EsOpType,
}

/// How Elasticsearch bulk items are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EsOpType {
    /// Overwrite with a version at least as new.
    Index,
    /// Create only; an existing `_id` answers 409.
    Create,
}

impl Default for ElasticsearchConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:9200".into(),
            username: None,
            password: None,
            api_key: None,
            bearer_token: None,
            ca_file: None,
            index_prefix: "sluice-events".into(),
            group: "sluice-sink-elasticsearch".into(),
            request_timeout_ms: 30_000,
            bulk_max_docs: 1_000,
            bulk_max_bytes: 5 * 1024 * 1024,
            linger_ms: 200,
            bulk_in_flight: 2,
            op_type: EsOpType::Index,
        }
    }
}

sluice_core::redacted_debug!(ElasticsearchConfig);
