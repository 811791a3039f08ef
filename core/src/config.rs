//! Sluice configuration: one TOML file, then the stack settings file, then `SLUICE__*`
//! environment variables, each overriding the one before.
//!
//! An environment variable `SLUICE__SECTION__KEY=value` sets `section.key`. The value is
//! read as a TOML value when it parses as one (numbers, booleans, arrays) and as a string
//! otherwise. For tables of client properties (`kafka.properties`, `kafka.producer`,
//! `kafka.consumer`) the value is a comma-separated list of `name=value` pairs that is
//! merged into the table, because librdkafka property names contain dots.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("invalid TOML in {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: toml::de::Error,
    },
    /// An override names a key that is not a table where a table is needed.
    #[error("override {var}: `{key}` is not a table")]
    NotATable {
        /// The variable that asked for the override.
        var: String,
        /// The key that is not a table.
        key: String,
    },
    /// A merged configuration has a wrong type or unknown key.
    #[error("invalid configuration: {0}")]
    Invalid(toml::de::Error),
}

/// The whole Sluice configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Kafka connection and client properties.
    pub kafka: KafkaConfig,
    /// Pipeline topic names and their creation settings.
    pub topics: TopicsConfig,
    /// The HTTP ingest endpoint.
    pub ingest: IngestConfig,
    /// The parse stage.
    pub parse: ParseConfig,
    /// The enrich stage.
    pub enrich: EnrichConfig,
    /// The sessionize stage.
    pub sessionize: SessionizeConfig,
    /// The TimescaleDB / PostgreSQL sink.
    pub timescale: TimescaleConfig,
    /// The Elasticsearch sink.
    pub elasticsearch: ElasticsearchConfig,
    /// The Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// How Avro records are framed: embedded schemas or a schema registry.
    pub schemas: SchemasConfig,
}

/// Kafka connection settings and librdkafka properties passed through as they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// librdkafka properties for every client.
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for producers only.
    pub producer: BTreeMap<String, String>,
    /// librdkafka properties for consumers only.
    pub consumer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            properties: BTreeMap::new(),
            producer: BTreeMap::new(),
            consumer: BTreeMap::new(),
        }
    }
}

/// Names of the pipeline's topics and how they are created.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicsConfig {
    /// Raw events as received by ingest.
    pub raw: String,
    /// Parsed events (Avro).
    pub parsed: String,
    /// Enriched events (Avro).
    pub enriched: String,
    /// Session summaries (Avro), from the sessionize stage.
    pub sessions: String,
    /// Suffix of each topic's dead-letter topic.
    pub dlq_suffix: String,
    /// Partitions of each topic created by Sluice.
    pub partitions: i32,
    /// Replication factor of each topic created by Sluice.
    pub replication_factor: i32,
    /// Retention of the raw topic, in milliseconds (kept long, for replays).
    pub raw_retention_ms: i64,
    /// Retention of every other topic, in milliseconds.
    pub retention_ms: i64,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            raw: "sluice.raw".into(),
            parsed: "sluice.parsed".into(),
            enriched: "sluice.enriched".into(),
            sessions: "sluice.sessions".into(),
            dlq_suffix: ".dlq".into(),
            partitions: 6,
            replication_factor: 1,
            raw_retention_ms: 7 * 24 * 3600 * 1000,
            retention_ms: 3 * 24 * 3600 * 1000,
        }
    }
}

impl TopicsConfig {
    /// The dead-letter topic of `topic`.
    pub fn dlq(&self, topic: &str) -> String {
        format!("{topic}{}", self.dlq_suffix)
    }

    /// Every topic of the pipeline with its retention, raw first.
    pub fn all(&self) -> Vec<(String, i64)> {
        vec![
            (self.raw.clone(), self.raw_retention_ms),
            (self.dlq(&self.raw), self.raw_retention_ms),
            (self.parsed.clone(), self.retention_ms),
            (self.dlq(&self.parsed), self.retention_ms),
            (self.enriched.clone(), self.retention_ms),
            (self.dlq(&self.enriched), self.retention_ms),
            (self.sessions.clone(), self.retention_ms),
            (self.dlq(&self.sessions), self.retention_ms),
        ]
    }
}

/// One tenant's API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The tenant this key writes as.
    pub tenant: String,
    /// The bearer token.
    pub key: String,
}

/// The HTTP ingest endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Most lines accepted in one NDJSON request.
    pub max_lines: usize,
    /// How long to wait for the broker to acknowledge a request's records.
    pub ack_timeout_ms: u64,
    /// Fields of an event, tried in order, whose value keys its record.
    pub partition_key_fields: Vec<String>,
    /// Accepted API keys.
    pub api_keys: Vec<ApiKey>,
    /// Per-tenant sustained rate, in events per second; none means unlimited.
    pub rate_limit_per_sec: Option<u32>,
    /// Per-tenant burst, in events (the token bucket's size); defaults to one second's rate.
    pub rate_limit_burst: Option<u32>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 * 1024 * 1024,
            max_lines: 10_000,
            ack_timeout_ms: 10_000,
            partition_key_fields: vec!["user_id".into(), "session_id".into()],
            api_keys: Vec::new(),
            rate_limit_per_sec: None,
            rate_limit_burst: None,
        }
    }
}

/// The parse stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParseConfig {
    /// Consumer group.
    pub group: String,
    /// Records processed concurrently (awaiting broker acks).
    pub max_in_flight: usize,
    /// Longer raw events are dead-lettered (class `oversized`) instead of parsed.
    pub max_event_bytes: usize,
    /// Kafka transactions: outputs, dead letters and offsets commit together.
    pub exactly_once: bool,
    /// Exactly-once: most records in one transaction.
    pub transaction_max_records: usize,
    /// Exactly-once: longest a transaction stays open, in milliseconds (outputs become
    /// visible to `read_committed` readers when it commits).
    pub transaction_ms: u64,
    /// Fields holding the event time, tried in order.
    pub time_fields: Vec<String>,
    /// IANA time zone of times written without an offset (`2026-11-23 10:00:00`).
    pub timezone: String,
}

impl Default for ParseConfig {
    fn default() -> Self {
        Self {
            group: "sluice-parse".into(),
            max_in_flight: 10_000,
            max_event_bytes: 1024 * 1024,
            exactly_once: false,
            transaction_max_records: 10_000,
            transaction_ms: 500,
            time_fields: vec!["ts".into(), "timestamp".into(), "event_time".into()],
            timezone: "UTC".into(),
        }
    }
}

/// The enrich stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichConfig {
    /// Consumer group.
    pub group: String,
    /// Records processed concurrently (awaiting broker acks).
    pub max_in_flight: usize,
    /// CSV of `cidr,network,country` rows for IP lookups; none means no IP enrichment.
    pub geo_csv: Option<PathBuf>,
    /// Kafka transactions: outputs, dead letters and offsets commit together.
    pub exactly_once: bool,
    /// Exactly-once: most records in one transaction.
    pub transaction_max_records: usize,
    /// Exactly-once: longest a transaction stays open, in milliseconds.
    pub transaction_ms: u64,
    /// PostgreSQL URL of the tenant directory; none means no tenant lookup.
    pub tenants_url: Option<String>,
    /// Query returning `tenant, name, plan` rows.
    pub tenants_query: String,
    /// Seconds a directory load stays valid; it is reloaded every half of it.
    pub tenants_ttl_s: u64,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        Self {
            group: "sluice-enrich".into(),
            max_in_flight: 10_000,
            geo_csv: None,
            exactly_once: false,
            transaction_max_records: 10_000,
            transaction_ms: 500,
            tenants_url: None,
            tenants_query: "SELECT tenant, name, plan FROM tenants".into(),
            tenants_ttl_s: 60,
        }
    }
}

/// Which database features the TimescaleDB sink uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbMode {
    /// TimescaleDB when the extension is available, plain PostgreSQL otherwise.
    Auto,
    /// Require TimescaleDB.
    Timescale,
    /// Plain PostgreSQL tables, no continuous aggregates.
    Postgres,
}

/// The sessionize stage: event-time session windows per user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionizeConfig {
    /// Consumer group.
    pub group: String,
    /// A gap of inactivity longer than this ends a session, in seconds.
    pub gap_s: u64,
    /// How far behind the newest event time an event may arrive and still count, in
    /// seconds; older ones are dead-lettered as `late`.
    pub allowed_lateness_s: u64,
}

impl Default for SessionizeConfig {
    fn default() -> Self {
        Self {
            group: "sluice-sessionize".into(),
            gap_s: 1800,
            allowed_lateness_s: 300,
        }
    }
}

/// The TimescaleDB / PostgreSQL sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimescaleConfig {
    /// Connection URL (`postgres://user:pass@host:port/db`).
    pub url: String,
    /// Schema that holds Sluice's tables.
    pub schema: String,
    /// Database features to use.
    pub mode: DbMode,
    /// Consumer group.
    pub group: String,
    /// Consumer group of the sessions sink (`sluice sink sessions`).
    pub sessions_group: String,
    /// Connections in the pool (PGlite serves one session: keep 1 there).
    pub pool_size: usize,
    /// Most rows in one INSERT.
    pub batch_size: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub linger_ms: u64,
    /// Add refresh policies to the continuous aggregates (TimescaleDB).
    pub refresh_policies: bool,
    /// Drop event chunks older than this many days (TimescaleDB); none keeps everything.
    pub retention_days: Option<u32>,
    /// Compress event chunks older than this many days (TimescaleDB); none never compresses.
    pub compress_after_days: Option<u32>,
}

impl Default for TimescaleConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            schema: "sluice".into(),
            mode: DbMode::Auto,
            group: "sluice-sink-timescale".into(),
            sessions_group: "sluice-sink-sessions".into(),
            pool_size: 1,
            batch_size: 2_000,
            linger_ms: 200,
            refresh_policies: true,
            retention_days: None,
            compress_after_days: None,
        }
    }
}

/// The Elasticsearch sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ElasticsearchConfig {
    /// Base URL of the cluster.
    pub url: String,
    /// Indices are named `<index_prefix>-<tenant>-YYYY.MM.DD` from the event time.
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

/// The Prometheus metrics endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address; none turns the listener off.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

/// Where the Avro records' schemas live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemaMode {
    /// Compiled in; records carry the schema's fingerprint (Avro single-object encoding).
    #[default]
    Embedded,
    /// A Confluent-compatible schema registry; records carry the schema id (Confluent
    /// wire format). Writers register their schema, checked for compatibility, at start.
    Registry,
}

/// How Avro records are framed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchemasConfig {
    /// `embedded` or `registry`.
    pub mode: SchemaMode,
    /// The registry's URL; several, comma-separated, are tried in order.
    pub registry_url: String,
    /// HTTP basic user (Confluent Cloud: the API key); none sends no credentials.
    pub registry_username: Option<String>,
    /// HTTP basic password (Confluent Cloud: the API secret).
    pub registry_password: Option<String>,
    /// Bearer token, instead of basic credentials.
    pub registry_token: Option<String>,
    /// Timeout of each registry request, in milliseconds.
    pub registry_timeout_ms: u64,
}

impl Default for SchemasConfig {
    fn default() -> Self {
        Self {
            mode: SchemaMode::Embedded,
            registry_url: "http://127.0.0.1:8081".into(),
            registry_username: None,
            registry_password: None,
            registry_token: None,
            registry_timeout_ms: 5000,
        }
    }
}

impl Config {
    /// The configuration as TOML with secrets masked: API keys and the database password.
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        let mut c = self.clone();
        for k in &mut c.ingest.api_keys {
            k.key = "***".into();
        }
        c.timescale.url = redact_url_password(&c.timescale.url);
        for secret in [
            &mut c.schemas.registry_password,
            &mut c.schemas.registry_token,
        ] {
            if secret.is_some() {
                *secret = Some("***".into());
            }
        }
        toml::to_string(&c)
    }
}

/// `scheme://user:secret@host/...` → `scheme://user:***@host/...`.
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((auth, host)) if auth.contains(':') => {
            let user = auth.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// Tables whose overrides merge `name=value` lists instead of replacing the value.
const PROPERTY_TABLES: &[&str] = &["kafka.properties", "kafka.producer", "kafka.consumer"];

impl Config {
    /// Load the configuration: the TOML file (if any), then the stack settings file
    /// named by `SLUICE_STACK_ENV` (if set), then the process's `SLUICE__*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut vars: Vec<(String, String)> = Vec::new();
        if let Ok(stack_env) = std::env::var("SLUICE_STACK_ENV") {
            vars.extend(read_env_file(Path::new(&stack_env))?);
        }
        vars.extend(std::env::vars());
        Self::load_with(file, vars)
    }

    /// Load from a file (if any) and the given variables, in order.
    pub fn load_with(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut root = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                toml::from_str::<toml::Value>(&text).map_err(|source| ConfigError::Parse {
                    path: path.into(),
                    source,
                })?
            }
            None => toml::Value::Table(Default::default()),
        };
        for (var, value) in vars {
            if let Some(rest) = var.strip_prefix("SLUICE__") {
                let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
                apply_override(&mut root, &var, &path, &value)?;
            }
        }
        root.try_into().map_err(ConfigError::Invalid)
    }
}

/// Read `KEY=VALUE` lines, skipping blanks and `#` comments.
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    Ok(parse_env_lines(&text))
}

/// Parse `KEY=VALUE` lines, skipping blanks and `#` comments.
pub fn parse_env_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn apply_override(
    root: &mut toml::Value,
    var: &str,
    path: &[String],
    raw: &str,
) -> Result<(), ConfigError> {
    let dotted = path.join(".");
    let mut node = root;
    for (i, key) in path.iter().enumerate() {
        let table = node.as_table_mut().ok_or_else(|| ConfigError::NotATable {
            var: var.into(),
            key: path[..i].join("."),
        })?;
        if i + 1 == path.len() {
            if PROPERTY_TABLES.contains(&dotted.as_str()) {
                let entry = table
                    .entry(key.clone())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                let props = entry.as_table_mut().ok_or_else(|| ConfigError::NotATable {
                    var: var.into(),
                    key: dotted.clone(),
                })?;
                for pair in raw.split(',').filter(|p| !p.trim().is_empty()) {
                    if let Some((k, v)) = pair.split_once('=') {
                        props.insert(k.trim().into(), toml::Value::String(v.trim().into()));
                    }
                }
            } else {
                table.insert(key.clone(), parse_value(raw));
            }
            return Ok(());
        }
        node = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Ok(())
}

/// A TOML value if `raw` is one, otherwise the string itself.
fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_without_file() {
        let c = Config::load_with(None, vec![]).unwrap();
        assert_eq!(c.topics.raw, "sluice.raw");
        assert_eq!(c.topics.dlq("sluice.parsed"), "sluice.parsed.dlq");
    }

    #[test]
    fn env_overrides_file_and_merges_properties() {
        let dir = std::env::temp_dir().join(format!("sluice-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[kafka]\nbrokers = \"a:1\"\n[kafka.properties]\n\"client.id\" = \"x\"\n[ingest]\nmax_lines = 5\n",
        )
        .unwrap();
        let c = Config::load_with(
            Some(&file),
            vars(&[
                ("SLUICE__KAFKA__BROKERS", "b:2"),
                (
                    "SLUICE__KAFKA__PROPERTIES",
                    "receive.message.max.bytes=100, linger.ms=5",
                ),
                ("SLUICE__INGEST__MAX_LINES", "7"),
                ("SLUICE__TIMESCALE__MODE", "postgres"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "b:2");
        assert_eq!(c.kafka.properties["client.id"], "x");
        assert_eq!(c.kafka.properties["receive.message.max.bytes"], "100");
        assert_eq!(c.kafka.properties["linger.ms"], "5");
        assert_eq!(c.ingest.max_lines, 7);
        assert_eq!(c.timescale.mode, DbMode::Postgres);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::load_with(None, vars(&[("SLUICE__INGEST__MAX_LINEZ", "7")])).unwrap_err();
        assert!(err.to_string().contains("max_linez"), "{err}");
    }

    #[test]
    fn bad_type_is_an_error() {
        let err =
            Config::load_with(None, vars(&[("SLUICE__INGEST__MAX_LINES", "lots")])).unwrap_err();
        assert!(err.to_string().contains("invalid configuration"), "{err}");
    }

    #[test]
    fn redacted() {
        assert_eq!(
            redact_url_password("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url_password("postgres://h/db"), "postgres://h/db");
        let mut c = Config::default();
        c.ingest.api_keys.push(ApiKey {
            tenant: "a".into(),
            key: "secret-key".into(),
        });
        let text = c.to_redacted_toml().unwrap();
        assert!(
            !text.contains("secret-key") && text.contains("***"),
            "{text}"
        );
    }

    #[test]
    fn env_file_lines() {
        let v = parse_env_lines("# c\n\nA=1\nB = two=2\n");
        assert_eq!(
            v,
            vec![("A".into(), "1".into()), ("B".into(), "two=2".into())]
        );
    }
}
