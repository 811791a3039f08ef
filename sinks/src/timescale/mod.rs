//! The TimescaleDB / PostgreSQL sinks: enriched events into a hypertable with continuous
//! aggregates for dashboards, and session summaries into the sessions table. Without the
//! timescaledb extension they use ordinary tables with the same keys and no aggregates.
//!
//! Writes are `INSERT … SELECT FROM unnest(…) ON CONFLICT … DO UPDATE`: one statement
//! per batch, idempotent, newest processing wins, and it works on PGlite, which has no
//! `COPY FROM STDIN`.

pub mod aggregates;
pub mod errors;
pub mod events;
pub mod migrations;
pub mod read;
pub mod sessions;

use std::str::FromStr;

/// The connection pool of the database sinks.
pub use deadpool_postgres::Pool;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
use sluice_core::config::TimescaleConfig;
use tokio_postgres::NoTls;

pub use aggregates::{refresh_aggregates, AGGREGATES};
pub use events::EventsWriter;
pub use migrations::migrate;
pub use sessions::SessionsWriter;

/// Why the database could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The connection URL is wrong.
    #[error("invalid database url: {0}")]
    Url(tokio_postgres::Error),
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

/// Connect a pool to the configured database.
pub fn pool(config: &TimescaleConfig) -> Result<Pool, DbError> {
    let pg = tokio_postgres::Config::from_str(&config.url).map_err(DbError::Url)?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_size.max(1))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}
