//! Settings of the archive sink (`[archive]`).

use serde::{Deserialize, Serialize};

/// The archive sink: raw records, bytes and headers unchanged, in Parquet files in
/// object storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Where the files go: `file:///var/lib/sluice/archive` (a local or mounted
    /// directory) or `s3://bucket/prefix` (S3 or an S3-compatible store).
    pub url: String,
    /// Consumer group.
    pub group: String,
    /// S3: the endpoint of an S3-compatible store (e.g. `http://127.0.0.1:8333`); none
    /// means AWS.
    pub endpoint: Option<String>,
    /// S3: region.
    pub region: String,
    /// S3: access key id; none takes the AWS environment (variables, web identity /
    /// IRSA, instance profile).
    pub access_key_id: Option<String>,
    /// S3: secret access key.
    pub secret_access_key: Option<sluice_core::secret::Secret>,
    /// S3: session token of temporary credentials.
    pub session_token: Option<sluice_core::secret::Secret>,
    /// S3: path-style requests (`endpoint/bucket/key`), which most S3-compatible stores
    /// need; false uses virtual-hosted style (`bucket.endpoint/key`).
    pub path_style: bool,
    /// S3: allow a plain-HTTP endpoint.
    pub allow_http: bool,
    /// A partition's file is written once it holds this many records.
    pub flush_records: usize,
    /// A partition's file is written once its records hold this many bytes.
    pub flush_bytes: usize,
    /// A partition's file is written at the latest this long after its first record, in
    /// milliseconds.
    pub rotate_interval_ms: u64,
    /// A storage request slower than this fails and is retried, in milliseconds.
    pub request_timeout_ms: u64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            url: "file:///var/lib/sluice/archive".into(),
            group: "sluice-sink-archive".into(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            path_style: true,
            allow_http: false,
            flush_records: 100_000,
            flush_bytes: 16 * 1024 * 1024,
            rotate_interval_ms: 60_000,
            request_timeout_ms: 30_000,
        }
    }
}
