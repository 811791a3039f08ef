//! The configuration loader (one TOML file, then the stack settings file, then
//! `SLUICE__*` environment variables, each overriding the one before) and the sections
//! every process shares: Kafka, topics, metrics and schemas. Each stage and sink keeps
//! its own section's settings next to its code.
//!
//! An environment variable `SLUICE__SECTION__KEY=value` sets `section.key`. The value is
//! read as a TOML value when it parses as one (numbers, booleans, arrays) and as a string
//! otherwise. For tables of client properties (`kafka.properties`, `kafka.producer`,
//! `kafka.consumer`) the value is a comma-separated list of `name=value` pairs that is
//! merged into the table, because librdkafka property names contain dots.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
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
    /// Settings that do not fit together.
    #[error("{key}: {reason}")]
    Setting {
        /// The setting at fault.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Kafka connection settings and librdkafka properties passed through as they are.
#[derive(Clone, Serialize, Deserialize)]
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
    /// TLS and SASL towards the brokers (also rendered as KEDA's TriggerAuthentication).
    pub security: KafkaSecurity,
}

/// How clients reach a secured cluster: `kafka.security`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: SecurityProtocol,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (the SASL protocols).
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user.
    pub username: Option<String>,
    /// SASL password.
    pub password: Option<crate::secret::Secret>,
    /// PEM file of the CA that signed the brokers' certificates (`ssl.ca.location`).
    pub ca_file: Option<PathBuf>,
}

/// `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's (and KEDA's) name of it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// `sasl.mechanisms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// User and password in clear (over TLS, hopefully).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's name of it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Room a record needs beside its event: key, Sluice's headers, a dead letter's headers
/// and the protocol's framing.
pub const RECORD_ROOM_BYTES: usize = 16 * 1024;

impl KafkaConfig {
    /// The producers' `message.max.bytes` (librdkafka's default 1,000,000 unless set).
    pub fn max_message_bytes(&self) -> usize {
        self.producer
            .get("message.max.bytes")
            .or_else(|| self.properties.get("message.max.bytes"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1_000_000)
    }

    /// Whether an event of `max_event_bytes` plus its headers fits a record.
    pub fn check_event_size(&self, max_event_bytes: usize) -> Result<(), ConfigError> {
        let max = self.max_message_bytes();
        if max_event_bytes.saturating_add(RECORD_ROOM_BYTES) > max {
            return Err(ConfigError::Setting {
                key: "topics.max_event_bytes",
                reason: format!(
                    "{max_event_bytes} bytes plus {RECORD_ROOM_BYTES} for key and headers exceed the producers' message.max.bytes ({max}); lower it to at most {} or raise message.max.bytes (and the brokers' and topics' limits)",
                    max.saturating_sub(RECORD_ROOM_BYTES)
                ),
            });
        }
        Ok(())
    }
}

impl KafkaSecurity {
    /// The librdkafka properties these settings stand for.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let mut p = vec![("security.protocol", self.protocol.as_str().to_string())];
        if let Some(m) = self.sasl_mechanism {
            p.push(("sasl.mechanisms", m.as_str().to_string()));
        }
        if let Some(u) = &self.username {
            p.push(("sasl.username", u.clone()));
        }
        if let Some(pw) = &self.password {
            p.push(("sasl.password", pw.expose().to_string()));
        }
        if let Some(ca) = &self.ca_file {
            p.push(("ssl.ca.location", ca.display().to_string()));
        }
        p
    }

    /// Settings that do not fit together, named.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Setting {
                key,
                reason: reason.to_string(),
            })
        };
        if self.protocol.sasl() {
            if self.sasl_mechanism.is_none() {
                return bad(
                    "kafka.security.sasl_mechanism",
                    "required by a sasl_* protocol",
                );
            }
            if self.username.is_none() || self.password.is_none() {
                return bad(
                    "kafka.security.username",
                    "a sasl_* protocol needs username and password",
                );
            }
        } else if self.sasl_mechanism.is_some() || self.username.is_some() {
            return bad(
                "kafka.security.protocol",
                "SASL settings are given but the protocol is not sasl_plaintext or sasl_ssl",
            );
        }
        // Whether the CA file exists is `sluice check`'s question: the config is also read
        // where the file is not mounted (rendering, `sluice config`).
        if self.ca_file.is_some()
            && !matches!(
                self.protocol,
                SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
            )
        {
            return bad(
                "kafka.security.ca_file",
                "given but the protocol uses no TLS",
            );
        }
        Ok(())
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            properties: BTreeMap::new(),
            producer: BTreeMap::new(),
            consumer: BTreeMap::new(),
            security: KafkaSecurity::default(),
        }
    }
}

/// Names of the pipeline's topics and how they are created.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicsConfig {
    /// Raw events as received by ingest.
    pub raw: String,
    /// More raw topics parse reads, written by other producers (Logstash, Fluent Bit…);
    /// each has its own dead-letter topic. Sluice does not create them.
    pub raw_extra: Vec<String>,
    /// Parsed events (Avro).
    pub parsed: String,
    /// Enriched events (Avro).
    pub enriched: String,
    /// Session summaries (Avro), from the sessionize stage.
    pub sessions: String,
    /// The replay log: one record per replay run, whose offset is the replay's epoch (the
    /// high-order part of the versions it stamps). One partition, kept for ever.
    pub replays: String,
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
    /// Largest event, in bytes: ingest answers 413 for a longer line, parse dead-letters
    /// a longer raw record (`oversized`). It must leave room for headers and key below
    /// the producers' `message.max.bytes`, which is checked at start.
    pub max_event_bytes: usize,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            raw: "sluice.raw".into(),
            raw_extra: Vec::new(),
            parsed: "sluice.parsed".into(),
            enriched: "sluice.enriched".into(),
            sessions: "sluice.sessions".into(),
            replays: "sluice.replays".into(),
            dlq_suffix: ".dlq".into(),
            partitions: 6,
            replication_factor: 1,
            raw_retention_ms: 7 * 24 * 3600 * 1000,
            retention_ms: 3 * 24 * 3600 * 1000,
            max_event_bytes: 960 * 1024,
        }
    }
}

impl TopicsConfig {
    /// The dead-letter topic of `topic`.
    pub fn dlq(&self, topic: &str) -> String {
        format!("{topic}{}", self.dlq_suffix)
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event, fields as `key=value`.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message` and the fields.
    Json,
}

/// Logging (`[log]`); the level comes from `RUST_LOG`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
}

/// The Prometheus metrics endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address; none turns the listener off.
    pub listen: Option<SocketAddr>,
    /// A gauge not updated for this many seconds is no longer exported: the lag of a
    /// partition this process gave up in a rebalance.
    pub idle_timeout_s: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            idle_timeout_s: 30,
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
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchemasConfig {
    /// `embedded` or `registry`.
    pub mode: SchemaMode,
    /// The registry's URL; several, comma-separated, are tried in order.
    pub registry_url: String,
    /// HTTP basic user (Confluent Cloud: the API key); none sends no credentials.
    pub registry_username: Option<String>,
    /// HTTP basic password (Confluent Cloud: the API secret).
    pub registry_password: Option<crate::secret::Secret>,
    /// Bearer token, instead of basic credentials.
    pub registry_token: Option<crate::secret::Secret>,
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

/// `scheme://user:secret@host/...` → `scheme://user:***@host/...` (see [`crate::redact::url`]).
pub fn redact_url_password(url: &str) -> String {
    crate::redact::url(url)
}

/// Tables whose overrides merge `name=value` lists instead of replacing the value.
const PROPERTY_TABLES: &[&str] = &["kafka.properties", "kafka.producer", "kafka.consumer"];

/// Load a configuration: the TOML file (if any), then the stack settings file named by
/// `SLUICE_STACK_ENV` (if set), then the process's `SLUICE__*` variables.
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> Result<T, ConfigError> {
    let mut vars: Vec<(String, String)> = Vec::new();
    if let Ok(stack_env) = std::env::var("SLUICE_STACK_ENV") {
        vars.extend(read_env_file(Path::new(&stack_env))?);
    }
    vars.extend(std::env::vars());
    load_with(file, vars)
}

/// Load a configuration from a file (if any) and the given variables, in order.
pub fn load_with<T: DeserializeOwned>(
    file: Option<&Path>,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
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

    /// A configuration of the shared sections and one more, as a process has.
    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Test {
        kafka: KafkaConfig,
        topics: TopicsConfig,
        limits: Limits,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Limits {
        max_lines: usize,
        mode: String,
    }

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_without_file() {
        let c: Test = load_with(None, vec![]).unwrap();
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
            "[kafka]\nbrokers = \"a:1\"\n[kafka.properties]\n\"client.id\" = \"x\"\n[limits]\nmax_lines = 5\n",
        )
        .unwrap();
        let c: Test = load_with(
            Some(&file),
            vars(&[
                ("SLUICE__KAFKA__BROKERS", "b:2"),
                (
                    "SLUICE__KAFKA__PROPERTIES",
                    "receive.message.max.bytes=100, linger.ms=5",
                ),
                ("SLUICE__LIMITS__MAX_LINES", "7"),
                ("SLUICE__LIMITS__MODE", "postgres"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "b:2");
        assert_eq!(c.kafka.properties["client.id"], "x");
        assert_eq!(c.kafka.properties["receive.message.max.bytes"], "100");
        assert_eq!(c.kafka.properties["linger.ms"], "5");
        assert_eq!(c.limits.max_lines, 7);
        assert_eq!(c.limits.mode, "postgres");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = load_with::<Test>(None, vars(&[("SLUICE__LIMITS__MAX_LINEZ", "7")])).unwrap_err();
        assert!(err.to_string().contains("max_linez"), "{err}");
    }

    #[test]
    fn bad_type_is_an_error() {
        let err =
            load_with::<Test>(None, vars(&[("SLUICE__LIMITS__MAX_LINES", "lots")])).unwrap_err();
        assert!(err.to_string().contains("invalid configuration"), "{err}");
    }

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            redact_url_password("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url_password("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn env_file_lines() {
        let v = parse_env_lines("# c\n\nA=1\nB = two=2\n");
        assert_eq!(
            v,
            vec![("A".into(), "1".into()), ("B".into(), "two=2".into())]
        );
    }

    #[test]
    fn kafka_security_renders_librdkafka_properties() {
        let c: Test = load_with(
            None,
            [
                (
                    "SLUICE__KAFKA__SECURITY__PROTOCOL".into(),
                    "sasl_ssl".into(),
                ),
                (
                    "SLUICE__KAFKA__SECURITY__SASL_MECHANISM".into(),
                    "SCRAM-SHA-512".into(),
                ),
                ("SLUICE__KAFKA__SECURITY__USERNAME".into(), "svc".into()),
                ("SLUICE__KAFKA__SECURITY__PASSWORD".into(), "pw".into()),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.kafka.security.check().is_ok());
        let p = c.kafka.security.properties();
        for want in [
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "svc"),
            ("sasl.password", "pw"),
        ] {
            assert!(
                p.iter().any(|(k, v)| *k == want.0 && v == want.1),
                "{want:?} in {p:?}"
            );
        }
        let client = c.kafka.consumer_config("g");
        assert_eq!(client.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
    }

    #[test]
    fn kafka_security_that_does_not_fit_is_named() {
        let mut s = KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            ..Default::default()
        };
        let e = s.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("kafka.security.sasl_mechanism"), "{e}");
        s.sasl_mechanism = Some(SaslMechanism::Plain);
        let e = s.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("kafka.security.username"), "{e}");
        let s = KafkaSecurity {
            username: Some("u".into()),
            ..Default::default()
        };
        assert!(s.check().is_err(), "SASL user on a plaintext protocol");
        let s = KafkaSecurity {
            ca_file: Some("/etc/ca.pem".into()),
            ..Default::default()
        };
        let e = s.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("kafka.security.ca_file"), "{e}");
        let bad: Result<Test, _> = load_with(
            None,
            [("SLUICE__KAFKA__SECURITY__PROTOCOL".into(), "tls".into())],
        );
        assert!(bad.is_err(), "an unknown protocol is refused");
    }

    #[test]
    fn the_event_size_must_leave_room_below_message_max_bytes() {
        let mut k = KafkaConfig::default();
        assert_eq!(k.max_message_bytes(), 1_000_000);
        assert!(k
            .check_event_size(TopicsConfig::default().max_event_bytes)
            .is_ok());
        let e = k.check_event_size(1024 * 1024).unwrap_err().to_string();
        assert!(
            e.contains("topics.max_event_bytes") && e.contains("message.max.bytes"),
            "{e}"
        );
        k.producer
            .insert("message.max.bytes".into(), "4000000".into());
        assert!(k.check_event_size(1024 * 1024).is_ok());
    }
}

crate::redacted_debug!(KafkaConfig);

crate::redacted_debug!(SchemasConfig);
