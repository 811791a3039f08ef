//! The TimescaleDB / PostgreSQL sinks: enriched events into a hypertable with continuous
//! aggregates for dashboards, and session summaries into the sessions table. Without the
//! timescaledb extension they use ordinary tables with the same keys and no aggregates.
//!
//! Writes are `INSERT … SELECT FROM unnest(…) ON CONFLICT … DO UPDATE`: one statement
//! per batch, idempotent, newest processing wins, and it works on PGlite, which has no
//! `COPY FROM STDIN`.

pub mod aggregates;
pub mod config;
pub mod errors;
pub mod events;
pub mod migrations;
pub mod read;
pub mod sessions;

use config::TimescaleConfig;
/// The connection pool of the database sinks.
pub use deadpool_postgres::Pool;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};

pub use aggregates::{refresh_aggregates, AGGREGATES};
pub use events::EventsWriter;
pub use migrations::migrate;
pub use sessions::SessionsWriter;

/// Why the database could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The connection URL or the TLS settings are wrong.
    #[error("timescale: {0}")]
    Url(#[from] sluice_core::tls::TlsError),
    /// The pool could not be built.
    #[error("connection pool: {0}")]
    Pool(String),
    /// A statement failed.
    #[error("database: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// TimescaleDB was required but is not available.
    #[error("mode = \"timescale\" but the timescaledb extension is not available on this server")]
    NoTimescale,
    /// The schema name is not a plain identifier.
    #[error("schema name {0:?}: use letters, digits and _ only")]
    SchemaName(String),
}

impl DbError {
    /// A failed connection, with what to do when the server's certificate is not trusted.
    pub fn connect(e: deadpool_postgres::PoolError) -> Self {
        // The TLS failure's reason sits in the source chain, not in the top message.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let more = s.to_string();
            if !text.contains(&more) {
                text = format!("{text}: {more}");
            }
            source = s.source();
        }
        let hint = if text.contains("certificate") {
            "; the server's TLS certificate is not trusted: set timescale.ca_file \
             (or sslrootcert in the URL) to the CA that signed it"
        } else {
            ""
        };
        Self::Pool(format!("cannot connect: {text}{hint}"))
    }
}

/// Connect once and say what is there: the server version and whether TimescaleDB is
/// (as `mode` requires).
pub async fn check(config: &TimescaleConfig) -> Result<String, DbError> {
    let pool = pool(config)?;
    let client = pool.get().await.map_err(DbError::connect)?;
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    let timescale: Option<String> = client
        .query_opt(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    drop(client);
    pool.close();
    match (timescale, config.mode) {
        (None, config::DbMode::Timescale) => Err(DbError::NoTimescale),
        (None, _) => Ok(format!(
            "PostgreSQL {version}, no timescaledb (plain tables)"
        )),
        (Some(v), _) => Ok(format!("PostgreSQL {version}, timescaledb {v}")),
    }
}

/// Connect a pool to the configured database.
pub fn pool(config: &TimescaleConfig) -> Result<Pool, DbError> {
    let (pg, tls) = sluice_core::tls::postgres(&config.url, config.ca_file.as_deref())?;
    let manager = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_size.max(1))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// A sink into the database (migrations first): `group` reads `topic`, and the writer
/// `make` builds (from the pool, the settings and whether TimescaleDB is used) writes it.
async fn run_database_sink<W: crate::BatchWriter + Sync + 'static>(
    shared: &sluice_core::wiring::Shared,
    settings: &TimescaleConfig,
    group: &str,
    topic: &str,
    rewiring: &sluice_core::wiring::Rewiring,
    shutdown: tokio_util::sync::CancellationToken,
    make: impl FnOnce(Pool, &TimescaleConfig, bool) -> W,
) -> Result<crate::SinkStats, crate::consumer::SinkError> {
    use crate::consumer::SinkError;
    let setup = |what: &str, e: &dyn std::fmt::Display| SinkError::Setup(format!("{what}: {e}"));
    let pool = pool(settings).map_err(|e| setup("timescale.url", &e))?;
    let timescale = migrate(&pool, settings)
        .await
        .map_err(|e| setup("database migrations", &e))?;
    tracing::info!(timescale, schema = %settings.schema, "database ready");
    let mut spec = crate::SinkSpec::new(&shared.topics, group, topic, rewiring);
    spec.batch_size = settings.batch_size;
    spec.max_batch_bytes = settings.max_batch_bytes;
    spec.linger = std::time::Duration::from_millis(settings.linger_ms);
    // One batch per pooled connection.
    spec.write_concurrency = settings.pool_size;
    let codec =
        sluice_schemas::setup::reading_codec(&shared.schemas).map_err(|e| setup("schemas", &e))?;
    sluice_core::telemetry::process_readiness().set(true);
    let stats = crate::run_sink(
        &shared.kafka,
        &spec,
        make(pool.clone(), settings, timescale),
        codec,
        shutdown,
    )
    .await?;
    // Release the connection: PGlite serves one session at a time.
    pool.close();
    Ok(stats)
}

/// Run the events sink (enriched → the events table) until `shutdown`.
pub async fn run_events(
    shared: &sluice_core::wiring::Shared,
    settings: &TimescaleConfig,
    rewiring: &sluice_core::wiring::Rewiring,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<crate::SinkStats, crate::consumer::SinkError> {
    let replay = rewiring.is_replay();
    run_database_sink(
        shared,
        settings,
        &settings.group,
        &shared.topics.enriched,
        rewiring,
        shutdown,
        |pool, c, timescale| EventsWriter::new(pool, c, timescale, replay),
    )
    .await
}

/// Run the sessions sink (sessions → the sessions table) until `shutdown`.
pub async fn run_sessions(
    shared: &sluice_core::wiring::Shared,
    settings: &TimescaleConfig,
    rewiring: &sluice_core::wiring::Rewiring,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<crate::SinkStats, crate::consumer::SinkError> {
    run_database_sink(
        shared,
        settings,
        &settings.sessions_group,
        &shared.topics.sessions,
        rewiring,
        shutdown,
        |pool, c, _| SessionsWriter::new(pool, &c.schema),
    )
    .await
}
