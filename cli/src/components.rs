//! The pipeline's stages and sinks, each described once, and the configuration they
//! make up. Everything that lists components iterates over [`COMPONENTS`]: the `sluice
//! stage` and `sluice sink` commands, replay targets and their chains, the audit's sinks,
//! the demo, `sluice components` (which `scripts/helm-check` compares with the chart),
//! and the tests' namespacing.
//!
//! Adding a stage: its folder in `stages/src/` (settings, transform, `run`), its `mod`
//! line in `stages/src/lib.rs`, and here one settings field and one entry; then its
//! Helm values. A sink likewise, in `sinks/src/`.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sluice_core::config::{
    ConfigError, KafkaConfig, LogConfig, MetricsConfig, SchemasConfig, TopicsConfig,
};
use sluice_core::wiring::{Rewiring, Shared};
use sluice_ingest::config::IngestConfig;
use sluice_sinks::archive::config::ArchiveConfig;
use sluice_sinks::elasticsearch::config::ElasticsearchConfig;
use sluice_sinks::timescale::config::TimescaleConfig;
use sluice_sinks::{Selection, Stored};
use sluice_stages::enrich::config::EnrichConfig;
use sluice_stages::parse::config::ParseConfig;
use sluice_stages::sessionize::config::SessionizeConfig;
use tokio_util::sync::CancellationToken;

/// The whole configuration: the sections every process shares, then each component's.
/// The loader and its rules are in [`sluice_core::config`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Kafka connection and client properties.
    pub kafka: KafkaConfig,
    /// Pipeline topic names and their creation settings.
    pub topics: TopicsConfig,
    /// The Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// Log line format.
    pub log: LogConfig,
    /// How Avro records are framed: embedded schemas or a schema registry.
    pub schemas: SchemasConfig,
    /// The HTTP ingest endpoint.
    pub ingest: IngestConfig,
    /// The parse stage.
    pub parse: ParseConfig,
    /// The enrich stage.
    pub enrich: EnrichConfig,
    /// The sessionize stage.
    pub sessionize: SessionizeConfig,
    /// The TimescaleDB / PostgreSQL sinks (events and sessions).
    pub timescale: TimescaleConfig,
    /// The Elasticsearch sink.
    pub elasticsearch: ElasticsearchConfig,
    /// The archive sink.
    pub archive: ArchiveConfig,
}

impl Config {
    /// Load the configuration: the TOML file (if any), then the stack settings file
    /// named by `SLUICE_STACK_ENV` (if set), then the process's `SLUICE__*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let config: Self = sluice_core::config::load(file)?;
        config.check()?;
        Ok(config)
    }

    /// Settings that parse but do not fit together.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.kafka.security.check()?;
        self.kafka.check_event_size(self.topics.max_event_bytes)?;
        // The schema is spliced into SQL as an identifier (it cannot be a bind parameter),
        // so only a plain, unquoted one is taken.
        let schema = &self.timescale.schema;
        let plain = schema.len() <= 63
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !plain {
            return Err(ConfigError::Setting {
                key: "timescale.schema",
                reason: format!(
                    "{schema:?} is not a plain SQL identifier (lowercase letters, digits and _, at most 63, not starting with a digit)"
                ),
            });
        }
        self.ingest.check().map_err(|reason| ConfigError::Setting {
            key: "ingest",
            reason,
        })?;
        let t = &self.topics;
        sluice_stages::parse::ParseRules::of(
            &self.parse,
            t.max_event_bytes,
            &t.raw_extra,
            &self.tenants(),
        )
        .map_err(|e| ConfigError::Setting {
            key: "parse",
            reason: e.to_string(),
        })?;
        Ok(())
    }

    /// The tenants ingest has API keys for: the directory other producers' tenant
    /// fields are checked against.
    pub fn tenants(&self) -> Vec<String> {
        self.ingest
            .api_keys
            .iter()
            .map(|k| k.tenant.clone())
            .collect()
    }

    /// Load from a file (if any) and the given variables, in order.
    pub fn load_with(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let config: Self = sluice_core::config::load_with(file, vars)?;
        config.check()?;
        Ok(config)
    }

    /// The sections every stage and sink reads.
    pub fn shared(&self) -> Shared {
        Shared {
            kafka: self.kafka.clone(),
            topics: self.topics.clone(),
            schemas: self.schemas.clone(),
        }
    }

    /// The configuration as TOML with every secret masked: settings whose names say they
    /// hold one (keys, passwords, tokens, librdkafka's `sasl.password` …) and the
    /// passwords inside URLs, wherever they sit.
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        let mut value = toml::Value::try_from(self)?;
        sluice_core::redact::toml_value(&mut value);
        toml::to_string(&value)
    }

    /// Point the configuration at a namespace of its own: topics `<prefix>.raw` etc.,
    /// each component's group `<prefix>-<component>`, database schema `schema`, indices
    /// `<prefix>-events-*`. The demo and the tests use it to keep runs apart.
    pub fn namespaced(mut self, prefix: &str, schema: &str) -> Self {
        let t = &mut self.topics;
        t.raw = format!("{prefix}.raw");
        t.parsed = format!("{prefix}.parsed");
        t.enriched = format!("{prefix}.enriched");
        t.sessions = format!("{prefix}.sessions");
        t.replays = format!("{prefix}.replays");
        for c in COMPONENTS {
            *(c.group_mut)(&mut self) = format!("{prefix}-{}", c.helm);
        }
        self.timescale.schema = schema.to_string();
        self.elasticsearch.index_prefix = format!("{prefix}-events");
        self
    }
}

/// What a component does with records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Reads a topic, writes another (`sluice stage NAME`).
    Stage,
    /// Reads a topic, writes a destination (`sluice sink NAME`).
    Sink,
}

impl Kind {
    /// `stage` or `sink`, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stage => "stage",
            Self::Sink => "sink",
        }
    }
}

/// What a stage or sink did, when it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Records consumed.
    pub consumed: u64,
    /// Records written (a stage: outputs published).
    pub written: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// What else it did, one line each (e.g. aggregate ranges refreshed).
    pub notes: Vec<String>,
    /// A sink's rate, records per second from its first record to its last commit.
    pub throughput: Option<u64>,
}

impl From<sluice_stages::StageStats> for RunStats {
    fn from(s: sluice_stages::StageStats) -> Self {
        Self {
            consumed: s.consumed,
            written: s.published,
            dead_lettered: s.dead_lettered,
            notes: Vec::new(),
            throughput: None,
        }
    }
}

impl From<sluice_sinks::SinkStats> for RunStats {
    fn from(s: sluice_sinks::SinkStats) -> Self {
        Self {
            consumed: s.consumed,
            written: s.written,
            dead_lettered: s.dead_lettered,
            throughput: s.throughput().map(|r| r as u64),
            notes: s.settled,
        }
    }
}

/// A future a component's functions return.
pub type Pending<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

/// How a component starts: with the whole configuration, as a replay rewires it, until
/// the token is cancelled.
pub type Start = fn(Config, Rewiring, CancellationToken) -> Pending<RunStats>;

/// How `sluice check` reaches what a component needs beside Kafka (a sink's destination,
/// enrich's tenant directory): what it found (none: nothing to check), or the failure.
pub type CheckDependency = fn(Config) -> Pending<Option<String>>;

/// How a sink's stored events are read back (for `sluice audit` and `replay --diff`):
/// the selection, and whether whole events are wanted.
pub type ReadStored = fn(Config, Selection, bool) -> Pending<Vec<Stored>>;

/// One stage or sink.
pub struct Component {
    /// Its name: `sluice stage NAME` / `sluice sink NAME`, dead-letter headers, metrics.
    pub name: &'static str,
    /// Stage or sink.
    pub kind: Kind,
    /// One line on what it does.
    pub about: &'static str,
    /// The topic it consumes.
    pub input: fn(&Config) -> &str,
    /// The topic a stage writes.
    pub output: Option<fn(&Config) -> &str>,
    /// Its consumer group.
    pub group: fn(&Config) -> &str,
    /// Its consumer group, to change.
    pub group_mut: fn(&mut Config) -> &mut String,
    /// How it starts.
    pub start: Start,
    /// A sink that holds events: how to read them back. The audit and `--diff` compare
    /// every such sink with the topics.
    pub read_stored: Option<ReadStored>,
    /// Its component in the Helm chart (`components.<helm>` in the values).
    pub helm: &'static str,
    /// What `sluice check` connects to for it beside Kafka and the schema registry: the
    /// dependency's name and how.
    pub check: Option<(&'static str, CheckDependency)>,
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Component")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

impl PartialEq for Component {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.name == other.name
    }
}

impl Eq for Component {}

impl Component {
    /// The topic it consumes.
    pub fn input<'a>(&self, config: &'a Config) -> &'a str {
        (self.input)(config)
    }

    /// The topic a stage writes.
    pub fn output<'a>(&self, config: &'a Config) -> Option<&'a str> {
        self.output.map(|f| f(config))
    }

    /// Its consumer group.
    pub fn group<'a>(&self, config: &'a Config) -> &'a str {
        (self.group)(config)
    }

    /// Where its dead letters go.
    pub fn dlq(&self, config: &Config) -> String {
        config.topics.dlq(self.input(config))
    }

    /// Run it until `shutdown`.
    pub async fn run(&self, config: &Config, shutdown: CancellationToken) -> Result<RunStats> {
        self.run_rewired(config, Rewiring::default(), shutdown)
            .await
    }

    /// Run it, rewired by a replay, until `shutdown`.
    pub async fn run_rewired(
        &self,
        config: &Config,
        rewiring: Rewiring,
        shutdown: CancellationToken,
    ) -> Result<RunStats> {
        (self.start)(config.clone(), rewiring, shutdown)
            .await
            .with_context(|| format!("{} {}", self.kind_name(), self.name))
    }

    /// `stage` or `sink`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Stage => "stage",
            Kind::Sink => "sink",
        }
    }
}

/// Every stage and sink.
pub static COMPONENTS: &[Component] = &[
    Component {
        name: "parse",
        kind: Kind::Stage,
        about: "raw JSON lines → ClickEvent",
        input: |c| &c.topics.raw,
        output: Some(|c| &c.topics.parsed),
        group: |c| &c.parse.group,
        group_mut: |c| &mut c.parse.group,
        start: |c, r, s| {
            Box::pin(async move {
                Ok(
                    sluice_stages::parse::run(&c.shared(), &c.parse, &c.tenants(), &r, s)
                        .await?
                        .into(),
                )
            })
        },
        read_stored: None,
        helm: "parse",
        check: None,
    },
    Component {
        name: "enrich",
        kind: Kind::Stage,
        about: "ClickEvent → EnrichedEvent (user agent, network and country, tenant)",
        input: |c| &c.topics.parsed,
        output: Some(|c| &c.topics.enriched),
        group: |c| &c.enrich.group,
        group_mut: |c| &mut c.enrich.group,
        start: |c, r, s| {
            Box::pin(async move {
                Ok(sluice_stages::enrich::run(&c.shared(), &c.enrich, &r, s)
                    .await?
                    .into())
            })
        },
        read_stored: None,
        helm: "enrich",
        check: Some(("tenant directory", |c| {
            Box::pin(async move {
                let Some(url) = c.enrich.tenants_url.clone() else {
                    return Ok(None);
                };
                let dir = sluice_stages::enrich::tenants::TenantDirectory::new(
                    std::time::Duration::from_secs(60),
                );
                sluice_stages::enrich::tenants::load(&url, &c.enrich.tenants_query, &dir).await;
                match dir.status() {
                    (_, Some(e)) => Err(anyhow::anyhow!("tenant directory: {e}")),
                    (n, None) => Ok(Some(format!("{n} tenants"))),
                }
            })
        })),
    },
    Component {
        name: "sessionize",
        kind: Kind::Stage,
        about: "EnrichedEvent → SessionSummary (event-time session windows per user)",
        input: |c| &c.topics.enriched,
        output: Some(|c| &c.topics.sessions),
        group: |c| &c.sessionize.group,
        group_mut: |c| &mut c.sessionize.group,
        start: |c, r, s| {
            Box::pin(async move {
                Ok(
                    sluice_stages::sessionize::run(&c.shared(), &c.sessionize, &r, s)
                        .await?
                        .into(),
                )
            })
        },
        read_stored: None,
        helm: "sessionize",
        check: None,
    },
    Component {
        name: "timescale",
        kind: Kind::Sink,
        about: "enriched events → TimescaleDB / PostgreSQL (hypertable and aggregates)",
        input: |c| &c.topics.enriched,
        output: None,
        group: |c| &c.timescale.group,
        group_mut: |c| &mut c.timescale.group,
        start: |c, r, s| {
            Box::pin(async move {
                Ok(
                    sluice_sinks::timescale::run_events(&c.shared(), &c.timescale, &r, s)
                        .await?
                        .into(),
                )
            })
        },
        read_stored: Some(|c, selection, events| {
            Box::pin(async move {
                let pool = sluice_sinks::timescale::pool(&c.timescale)?;
                let rows = sluice_sinks::timescale::read::read_stored(
                    &pool,
                    &c.timescale.schema,
                    &selection,
                    events,
                )
                .await;
                pool.close();
                rows.context("reading the events table")
            })
        }),
        helm: "sink-timescale",
        check: Some(("database", |c| {
            Box::pin(async move {
                let found = sluice_sinks::timescale::check(&c.timescale).await?;
                Ok(Some(found))
            })
        })),
    },
    Component {
        name: "elasticsearch",
        kind: Kind::Sink,
        about: "enriched events → Elasticsearch (an index per tenant and day)",
        input: |c| &c.topics.enriched,
        output: None,
        group: |c| &c.elasticsearch.group,
        group_mut: |c| &mut c.elasticsearch.group,
        start: |c, r, s| {
            Box::pin(async move {
                Ok(
                    sluice_sinks::elasticsearch::run(&c.shared(), &c.elasticsearch, &r, s)
                        .await?
                        .into(),
                )
            })
        },
        read_stored: Some(|c, selection, events| {
            Box::pin(async move {
                let es = sluice_sinks::elasticsearch::client(&c.elasticsearch)?;
                sluice_sinks::elasticsearch::read::read_stored(
                    &es,
                    &c.elasticsearch.index_prefix,
                    &selection,
                    events,
                )
                .await
                .context("reading Elasticsearch")
            })
        }),
        helm: "sink-elasticsearch",
        check: Some(("elasticsearch", |c| {
            Box::pin(async move {
                let found = sluice_sinks::elasticsearch::check(&c.elasticsearch).await?;
                Ok(Some(found))
            })
        })),
    },
    Component {
        name: "sessions",
        kind: Kind::Sink,
        about: "session summaries → the sessions table",
        input: |c| &c.topics.sessions,
        output: None,
        group: |c| &c.timescale.sessions_group,
        group_mut: |c| &mut c.timescale.sessions_group,
        start: |c, r, s| {
            Box::pin(async move {
                Ok(
                    sluice_sinks::timescale::run_sessions(&c.shared(), &c.timescale, &r, s)
                        .await?
                        .into(),
                )
            })
        },
        read_stored: None,
        helm: "sink-sessions",
        check: Some(("database", |c| {
            Box::pin(async move {
                let found = sluice_sinks::timescale::check(&c.timescale).await?;
                Ok(Some(found))
            })
        })),
    },
    Component {
        name: "archive",
        kind: Kind::Sink,
        about: "raw records → Parquet files in object storage, kept beyond Kafka's retention",
        input: |c| &c.topics.raw,
        output: None,
        group: |c| &c.archive.group,
        group_mut: |c| &mut c.archive.group,
        start: |c, r, s| {
            Box::pin(async move {
                Ok(sluice_sinks::archive::run(&c.shared(), &c.archive, &r, s)
                    .await?
                    .into())
            })
        },
        read_stored: None,
        helm: "sink-archive",
        check: Some(("object store", |c| {
            Box::pin(async move {
                let archive = sluice_sinks::archive::store::open(&c.archive)?;
                archive.check().await?;
                Ok(Some(c.archive.url.clone()))
            })
        })),
    },
];

/// The component named `name` of `kind`.
pub fn find(kind: Kind, name: &str) -> Option<&'static Component> {
    COMPONENTS.iter().find(|c| c.kind == kind && c.name == name)
}

/// The names of the components of `kind`.
pub fn names(kind: Kind) -> Vec<&'static str> {
    COMPONENTS
        .iter()
        .filter(|c| c.kind == kind)
        .map(|c| c.name)
        .collect()
}

/// The sinks that hold events (the audit and `--diff` compare them with the topics).
pub fn event_sinks() -> impl Iterator<Item = &'static Component> {
    COMPONENTS.iter().filter(|c| c.read_stored.is_some())
}

/// The stages a record of `topic` passes through until it reaches the input of the
/// sinks that hold events, in order: from the raw topic, parse then enrich.
pub fn chain_from(config: &Config, topic: &str) -> Vec<&'static Component> {
    let sinks_input: Vec<&str> = event_sinks().map(|s| s.input(config)).collect();
    let mut chain = Vec::new();
    let mut at = topic.to_string();
    while !sinks_input.contains(&at.as_str()) {
        let Some(next) = COMPONENTS.iter().find(|c| {
            c.kind == Kind::Stage
                && c.input(config) == at
                && !chain.iter().any(|x: &&Component| x.name == c.name)
        }) else {
            break;
        };
        chain.push(next);
        match next.output(config) {
            Some(out) => at = out.to_string(),
            None => break,
        }
    }
    chain
}

/// Every topic of the pipeline with its retention, raw first: each component's input,
/// output and dead letters.
pub fn topics(config: &Config) -> Vec<(String, i64)> {
    let t = &config.topics;
    let mut out: Vec<(String, i64)> = Vec::new();
    let mut add = |name: String, retention: i64| {
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, retention));
        }
    };
    for c in COMPONENTS {
        let input = c.input(config).to_string();
        let retention = if input == t.raw {
            t.raw_retention_ms
        } else {
            t.retention_ms
        };
        add(input.clone(), retention);
        add(t.dlq(&input), retention);
        if let Some(out) = c.output(config) {
            add(out.to_string(), t.retention_ms);
        }
    }
    // Other producers' raw topics are theirs; their dead letters are Sluice's.
    for extra in &t.raw_extra {
        add(t.dlq(extra), t.raw_retention_ms);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Secrets in URLs and librdkafka properties stay out of `Debug` (logs, panics).
    #[test]
    fn debug_shows_no_secret() {
        let mut c = Config::default();
        c.timescale.url = "postgres://sluice:pg-secret-1@db/x".into();
        c.enrich.tenants_url = Some("host=db user=u password=pg-secret-2".into());
        c.elasticsearch.url = "https://elastic:es-secret-3@es:9200".into();
        c.schemas.registry_url = "https://u:sr-secret-4@sr".into();
        c.kafka
            .properties
            .insert("sasl.password".into(), "kafka-secret-5".into());
        c.kafka
            .consumer
            .insert("ssl.key.password".into(), "kafka-secret-6".into());
        let shown = format!("{c:?}");
        for secret in [
            "pg-secret-1",
            "pg-secret-2",
            "es-secret-3",
            "sr-secret-4",
            "kafka-secret-5",
            "kafka-secret-6",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("postgres://sluice:") && shown.contains("sasl.password"),
            "{shown}"
        );
        let auth = sluice_schemas::RegistryAuth::Basic {
            username: "u".into(),
            password: "sr-secret-7".into(),
        };
        assert!(!format!("{auth:?}").contains("sr-secret-7"));
    }

    #[test]
    fn names_are_unique_per_kind_and_lookups_find_them() {
        for kind in [Kind::Stage, Kind::Sink] {
            let mut names = names(kind);
            let n = names.len();
            names.dedup();
            assert_eq!(names.len(), n);
        }
        assert_eq!(find(Kind::Stage, "parse").map(|c| c.name), Some("parse"));
        assert!(find(Kind::Sink, "parse").is_none());
    }

    #[test]
    fn the_event_chain_runs_from_raw_to_the_event_sinks() {
        let c = Config::default();
        let chain: Vec<&str> = chain_from(&c, &c.topics.raw)
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(chain, ["parse", "enrich"]);
        let from_parsed: Vec<&str> = chain_from(&c, &c.topics.parsed)
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(from_parsed, ["enrich"]);
        assert!(chain_from(&c, &c.topics.enriched).is_empty());
        let sinks: Vec<&str> = event_sinks().map(|s| s.name).collect();
        assert_eq!(sinks, ["timescale", "elasticsearch"]);
    }

    #[test]
    fn topics_cover_every_component_once() {
        let c = Config::default();
        let names: Vec<String> = topics(&c).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "sluice.raw",
                "sluice.raw.dlq",
                "sluice.parsed",
                "sluice.parsed.dlq",
                "sluice.enriched",
                "sluice.enriched.dlq",
                "sluice.sessions",
                "sluice.sessions.dlq"
            ]
        );
    }

    #[test]
    fn a_namespace_renames_every_group() {
        let c = Config::default().namespaced("t-x", "x");
        for comp in COMPONENTS {
            assert!(comp.group(&c).starts_with("t-x-"), "{}", comp.name);
        }
        assert_eq!(c.topics.raw, "t-x.raw");
    }

    #[test]
    fn a_schema_that_is_not_a_plain_identifier_is_refused() {
        for bad in ["x; DROP TABLE y", "Sluice", "a-b", "1x", ""] {
            let mut c = Config::default();
            c.timescale.schema = bad.into();
            let err = c.check().unwrap_err().to_string();
            assert!(err.contains("timescale.schema"), "{bad}: {err}");
        }
        let mut c = Config::default();
        c.timescale.schema = "t_abc_123".into();
        c.check().unwrap();
    }

    #[test]
    fn one_key_for_two_tenants_is_refused() {
        let mut c = Config::default();
        for tenant in ["acme", "globex"] {
            c.ingest.api_keys.push(sluice_ingest::config::ApiKey {
                tenant: tenant.into(),
                key: "shared-key".into(),
            });
        }
        let err = c.check().unwrap_err().to_string();
        assert!(
            err.contains("\"acme\" and \"globex\" have the same key"),
            "{err}"
        );
        assert!(!err.contains("shared-key"), "{err}");
        // A tenant named like the archive's place for records without one is refused.
        let mut c = Config::default();
        c.ingest.api_keys.push(sluice_ingest::config::ApiKey {
            tenant: "_unknown".into(),
            key: "k".into(),
        });
        let err = c.check().unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
    }

    #[test]
    fn secrets_are_masked() {
        let mut c = Config::default();
        c.ingest.api_keys.push(sluice_ingest::config::ApiKey {
            tenant: "a".into(),
            key: "secret-key".into(),
        });
        c.timescale.url = "postgres://u:pw@h/db".into();
        c.archive.secret_access_key = Some("s3-secret".into());
        c.archive.session_token = Some("s3-token".into());
        let text = c.to_redacted_toml().unwrap_or_default();
        assert!(
            !text.contains("secret-key") && !text.contains(":pw@"),
            "{text}"
        );
        assert!(
            !text.contains("s3-secret") && !text.contains("s3-token"),
            "{text}"
        );
    }
}
