//! Wiring of each pipeline process from the configuration: the same functions serve the
//! `sluice` subcommands, the demo and the integration tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::PrometheusHandle;
use sluice_core::config::SchemaMode;
use sluice_core::config::TimescaleConfig;
use sluice_core::replay_scope::ReplayScope;
use sluice_core::{telemetry, Config};
use sluice_ingest::Ingest;
use sluice_schemas::{AvroRecord, Codec, RegistryAuth, SchemaRegistry};
use sluice_sinks::elasticsearch::{self as es, ElasticsearchWriter};
use sluice_sinks::timescale::{self, EventsWriter, SessionsWriter};
use sluice_sinks::{run_sink, BatchWriter, SinkSpec, SinkStats};
use sluice_stages::enrich::{Enricher, IpTable};
use sluice_stages::parse::{ParseRules, Parser};
use sluice_stages::sessionize::{run_sessionize, SessionizeSpec, Windows};
use sluice_stages::tenants::{Tenant, TenantDirectory};
use sluice_stages::{run_stage, StageSpec, StageStats};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The stages `sluice stage` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StageName {
    /// Raw JSON lines → ClickEvent.
    Parse,
    /// ClickEvent → EnrichedEvent.
    Enrich,
    /// EnrichedEvent → SessionSummary (event-time session windows per user).
    Sessionize,
}

/// The sinks `sluice sink` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkName {
    /// TimescaleDB / PostgreSQL.
    Timescale,
    /// Elasticsearch.
    Elasticsearch,
    /// Session summaries → the TimescaleDB / PostgreSQL sessions table.
    Sessions,
}

impl StageName {
    /// The stage's configured consumer group.
    pub fn group(self, config: &Config) -> &str {
        match self {
            StageName::Parse => &config.parse.group,
            StageName::Enrich => &config.enrich.group,
            StageName::Sessionize => &config.sessionize.group,
        }
    }

    /// The stage's name, as in logs, metrics and dead-letter headers.
    pub fn name(self) -> &'static str {
        match self {
            StageName::Parse => "parse",
            StageName::Enrich => "enrich",
            StageName::Sessionize => "sessionize",
        }
    }

    /// The topic the stage writes.
    pub fn output(self, config: &Config) -> &str {
        match self {
            StageName::Parse => &config.topics.parsed,
            StageName::Enrich => &config.topics.enriched,
            StageName::Sessionize => &config.topics.sessions,
        }
    }

    /// The topic the stage normally consumes.
    pub fn input(self, config: &Config) -> &str {
        match self {
            StageName::Parse => &config.topics.raw,
            StageName::Enrich => &config.topics.parsed,
            StageName::Sessionize => &config.topics.enriched,
        }
    }
}

impl SinkName {
    /// The sink's configured consumer group.
    pub fn group(self, config: &Config) -> &str {
        match self {
            SinkName::Timescale => &config.timescale.group,
            SinkName::Elasticsearch => &config.elasticsearch.group,
            SinkName::Sessions => &config.timescale.sessions_group,
        }
    }
}

/// How a replay changes a stage's or sink's normal wiring.
#[derive(Debug, Default, Clone)]
pub struct Rewiring {
    /// Consumer group instead of the configured one.
    pub group: Option<String>,
    /// Topic consumed instead of the usual input (dead letters still go where they usually do).
    pub input: Option<String>,
    /// End offsets, tenant filter and rate limit of the replay.
    pub scope: Option<Arc<ReplayScope>>,
    /// A stage's outputs go here instead (`replay --diff`'s scratch topic).
    pub output: Option<String>,
    /// A stage's dead letters go here instead.
    pub dlq: Option<String>,
}

impl Rewiring {
    fn apply_stage(&self, spec: &mut StageSpec) {
        if let Some(g) = &self.group {
            spec.group = g.clone();
        }
        if let Some(i) = &self.input {
            spec.input = i.clone();
        }
        if let Some(o) = &self.output {
            spec.output = o.clone();
        }
        if let Some(d) = &self.dlq {
            spec.dlq = d.clone();
        }
        spec.scope = self.scope.clone();
    }

    fn apply_sink(&self, spec: &mut SinkSpec) {
        if let Some(g) = &self.group {
            spec.group = g.clone();
        }
        if let Some(i) = &self.input {
            spec.input = i.clone();
        }
        spec.scope = self.scope.clone();
    }
}

/// The schema registry in registry mode; `None` in embedded mode.
pub fn schema_registry(config: &Config) -> Option<Arc<SchemaRegistry>> {
    let c = &config.schemas;
    if c.mode != SchemaMode::Registry {
        return None;
    }
    let auth = match (&c.registry_token, &c.registry_username) {
        (Some(token), _) => RegistryAuth::Token(token.clone()),
        (None, Some(username)) => RegistryAuth::Basic {
            username: username.clone(),
            password: c.registry_password.clone().unwrap_or_default(),
        },
        (None, None) => RegistryAuth::None,
    };
    let urls = c
        .registry_url
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect();
    Some(Arc::new(SchemaRegistry::new(
        urls,
        auth,
        Duration::from_millis(c.registry_timeout_ms),
    )))
}

/// The codec a process writes `T` to `topic` with: in registry mode, `T`'s schema is
/// registered (after the registry's compatibility check) under the subject `<topic>-value`
/// (Confluent's TopicNameStrategy).
pub async fn writing_codec<T: AvroRecord>(config: &Config, topic: &str) -> Result<Arc<Codec<T>>> {
    Ok(Arc::new(match schema_registry(config) {
        None => Codec::embedded()?,
        Some(registry) => {
            let subject = format!("{topic}-value");
            Codec::writing(registry, &subject)
                .await
                .with_context(|| format!("registering {} under subject `{subject}`", T::NAME))?
        }
    }))
}

/// The codec a process reads `T` with (either encoding; registry lookups in registry mode).
pub fn reading_codec<T: AvroRecord>(config: &Config) -> Result<Arc<Codec<T>>> {
    Ok(Arc::new(match schema_registry(config) {
        None => Codec::embedded()?,
        Some(registry) => Codec::reading(registry)?,
    }))
}

/// Run a stage until `shutdown`.
pub async fn run_stage_named(
    config: &Config,
    name: StageName,
    shutdown: CancellationToken,
) -> Result<StageStats> {
    run_stage_rewired(config, name, &Rewiring::default(), shutdown).await
}

/// Run a stage, rewired by a replay, until `shutdown`.
pub async fn run_stage_rewired(
    config: &Config,
    name: StageName,
    rewiring: &Rewiring,
    shutdown: CancellationToken,
) -> Result<StageStats> {
    let t = &config.topics;
    let stats = match name {
        StageName::Parse => {
            let mut spec = StageSpec {
                group: config.parse.group.clone(),
                input: t.raw.clone(),
                output: t.parsed.clone(),
                dlq: t.dlq(&t.raw),
                max_in_flight: config.parse.max_in_flight,
                drain_timeout: Duration::from_secs(10),
                scope: None,
                exactly_once: config.parse.exactly_once,
                transaction_max_records: config.parse.transaction_max_records,
                transaction_linger: Duration::from_millis(config.parse.transaction_ms),
                retry: Default::default(),
            };
            rewiring.apply_stage(&mut spec);
            telemetry::process_readiness().set(true);
            run_stage(
                &config.kafka,
                &spec,
                Arc::new(
                    Parser::new(ParseRules::of(&config.parse)?)
                        .with_codec(writing_codec(config, &t.parsed).await?),
                ),
                shutdown,
            )
            .await?
        }
        StageName::Enrich => {
            let ips = match &config.enrich.geo_csv {
                Some(path) => IpTable::load(path)?,
                None => IpTable::default(),
            };
            let mut spec = StageSpec {
                group: config.enrich.group.clone(),
                input: t.parsed.clone(),
                output: t.enriched.clone(),
                dlq: t.dlq(&t.parsed),
                max_in_flight: config.enrich.max_in_flight,
                drain_timeout: Duration::from_secs(10),
                scope: None,
                exactly_once: config.enrich.exactly_once,
                transaction_max_records: config.enrich.transaction_max_records,
                transaction_linger: Duration::from_millis(config.enrich.transaction_ms),
                retry: Default::default(),
            };
            rewiring.apply_stage(&mut spec);
            let mut enricher = Enricher::new(ips).with_codecs(
                reading_codec(config)?,
                writing_codec(config, &t.enriched).await?,
            );
            if let Some(url) = &config.enrich.tenants_url {
                let ttl = Duration::from_secs(config.enrich.tenants_ttl_s.max(1));
                let directory = Arc::new(TenantDirectory::new(ttl));
                load_tenants(url, &config.enrich.tenants_query, &directory).await;
                tokio::spawn(refresh_tenants(
                    url.clone(),
                    config.enrich.tenants_query.clone(),
                    directory.clone(),
                    shutdown.clone(),
                ));
                enricher = enricher.with_tenants(directory);
            }
            telemetry::process_readiness().set(true);
            run_stage(&config.kafka, &spec, Arc::new(enricher), shutdown).await?
        }
        StageName::Sessionize => {
            let mut spec = sessionize_spec(config).await?;
            if let Some(g) = &rewiring.group {
                spec.group = g.clone();
            }
            if let Some(i) = &rewiring.input {
                spec.input = i.clone();
            }
            telemetry::process_readiness().set(true);
            run_sessionize(&config.kafka, &spec, shutdown).await?
        }
    };
    Ok(stats)
}

/// The sessionize stage's wiring from the configuration.
pub async fn sessionize_spec(config: &Config) -> Result<SessionizeSpec> {
    let (c, t) = (&config.sessionize, &config.topics);
    Ok(SessionizeSpec {
        group: c.group.clone(),
        input: t.enriched.clone(),
        output: t.sessions.clone(),
        dlq: t.dlq(&t.enriched),
        windows: Windows {
            gap_ms: (c.gap_s * 1000) as i64,
            allowed_lateness_ms: (c.allowed_lateness_s * 1000) as i64,
        },
        input_codec: reading_codec(config)?,
        output_codec: writing_codec(config, &t.sessions).await?,
    })
}

/// Load the tenant directory once; a failure is logged and recorded (lookups fail
/// transiently once the last good load is older than the TTL).
async fn load_tenants(url: &str, query: &str, directory: &TenantDirectory) {
    let load = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let rows = client.query(query, &[]).await?;
        Ok::<_, tokio_postgres::Error>(
            rows.iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        Tenant {
                            name: r.get(1),
                            plan: r.get(2),
                        },
                    )
                })
                .collect(),
        )
    };
    match tokio::time::timeout(Duration::from_secs(10), load).await {
        Ok(Ok(entries)) => directory.loaded(entries),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "tenant directory load failed");
            directory.failed(e.to_string());
        }
        Err(_) => {
            tracing::warn!("tenant directory load timed out");
            directory.failed("timed out after 10 s".into());
        }
    }
}

/// Reload the tenant directory every half TTL until `shutdown`.
async fn refresh_tenants(
    url: String,
    query: String,
    directory: Arc<TenantDirectory>,
    shutdown: CancellationToken,
) {
    let every = (directory.ttl() / 2).max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => load_tenants(&url, &query, &directory).await,
        }
    }
}

/// Run a sink until `shutdown` (migrations or the index template first).
pub async fn run_sink_named(
    config: &Config,
    name: SinkName,
    shutdown: CancellationToken,
) -> Result<SinkStats> {
    run_sink_rewired(config, name, &Rewiring::default(), shutdown).await
}

/// Run a sink, rewired by a replay, until `shutdown`.
pub async fn run_sink_rewired(
    config: &Config,
    name: SinkName,
    rewiring: &Rewiring,
    shutdown: CancellationToken,
) -> Result<SinkStats> {
    let t = &config.topics;
    let stats = match name {
        SinkName::Timescale => {
            let topic = &t.enriched;
            database_sink(
                config,
                &config.timescale.group,
                topic,
                rewiring,
                shutdown,
                |pool, c, timescale| {
                    EventsWriter::new(pool, c, timescale, rewiring.scope.is_some())
                },
            )
            .await?
        }
        SinkName::Elasticsearch => {
            let c = &config.elasticsearch;
            let client = es::client(c)?;
            es::put_template(&client, c)
                .await
                .context("elasticsearch index template")?;
            let mut spec = SinkSpec {
                group: c.group.clone(),
                input: t.enriched.clone(),
                dlq: t.dlq(&t.enriched),
                // One bulk request per batch, several in flight.
                batch_size: c.bulk_max_docs,
                linger: Duration::from_millis(c.linger_ms),
                write_concurrency: c.bulk_in_flight,
                scope: None,
            };
            rewiring.apply_sink(&mut spec);
            telemetry::process_readiness().set(true);
            run_sink(
                &config.kafka,
                &spec,
                ElasticsearchWriter::new(client, c.clone()),
                reading_codec(config)?,
                shutdown,
            )
            .await?
        }
        SinkName::Sessions => {
            let (group, topic) = (&config.timescale.sessions_group, &t.sessions);
            database_sink(config, group, topic, rewiring, shutdown, |pool, c, _| {
                SessionsWriter::new(pool, &c.schema)
            })
            .await?
        }
    };
    Ok(stats)
}

/// A sink into the TimescaleDB / PostgreSQL database (migrations first): `group` reads
/// `topic` and the writer `make` builds writes it.
async fn database_sink<W: BatchWriter + Sync + 'static>(
    config: &Config,
    group: &str,
    topic: &str,
    rewiring: &Rewiring,
    shutdown: CancellationToken,
    make: impl FnOnce(timescale::Pool, &TimescaleConfig, bool) -> W,
) -> Result<SinkStats> {
    let c = &config.timescale;
    let pool = timescale::pool(c)?;
    let timescale = timescale::migrate(&pool, c)
        .await
        .context("database migrations")?;
    tracing::info!(timescale, schema = %c.schema, "database ready");
    let mut spec = SinkSpec {
        group: group.to_string(),
        input: topic.to_string(),
        dlq: config.topics.dlq(topic),
        batch_size: c.batch_size,
        linger: Duration::from_millis(c.linger_ms),
        // One batch per pooled connection.
        write_concurrency: c.pool_size,
        scope: None,
    };
    rewiring.apply_sink(&mut spec);
    telemetry::process_readiness().set(true);
    let stats = run_sink(
        &config.kafka,
        &spec,
        make(pool.clone(), c, timescale),
        reading_codec(config)?,
        shutdown,
    )
    .await?;
    // Release the connection: PGlite serves one session at a time.
    pool.close();
    Ok(stats)
}

/// Start the HTTP ingest server; returns its address and the task serving it.
pub async fn start_ingest(
    config: &Config,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<Result<()>>)> {
    let ingest = Ingest::new(
        &config.kafka,
        &config.topics.raw,
        config.ingest.clone(),
        metrics,
    )?;
    let (listener, addr) = ingest
        .bind()
        .await
        .with_context(|| format!("binding {}", config.ingest.listen))?;
    tracing::info!(%addr, topic = %config.topics.raw, "ingest listening");
    let task = tokio::spawn(async move {
        ingest
            .serve(listener, async move { shutdown.cancelled().await })
            .await?;
        Ok(())
    });
    Ok((addr, task))
}

/// Load the configuration from `file` (if any) plus the stack settings and environment.
pub fn load_config(file: Option<&Path>) -> Result<Config> {
    Config::load(file).context("loading configuration")
}

/// A token cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}
