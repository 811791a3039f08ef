//! Versioned, idempotent schema migrations, run by the sinks at start-up, and the
//! TimescaleDB policies the configuration asks for.

use super::config::{DbMode, TimescaleConfig};

use super::aggregates::AGGREGATES;
use super::events::{Layout, COLUMNS};
use super::{DbError, Pool};

/// Which databases a migration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum For {
    Both,
    Timescale,
    Postgres,
}

/// One schema migration, for TimescaleDB, plain PostgreSQL or both.
struct Migration {
    version: i32,
    name: &'static str,
    on: For,
    /// Statements, run one by one (continuous aggregates cannot be created in a transaction).
    sql: &'static [&'static str],
}

/// `{s}` stands for the schema. Every statement is idempotent, so a migration that died
/// half-way is simply run again. Columns of the events table added after migration 6
/// need no migration: they come from the column table (see [`ensure_columns`]).
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events table",
        on: For::Both,
        sql: &["CREATE TABLE IF NOT EXISTS {s}.events (
            time timestamptz NOT NULL,
            event_id text NOT NULL,
            tenant text NOT NULL,
            user_id text NOT NULL,
            session_id text,
            event_type text NOT NULL,
            url text,
            referrer text,
            received_at timestamptz NOT NULL,
            user_agent text,
            ip text,
            browser text,
            browser_version text,
            os text,
            device text,
            network text,
            country text,
            extra jsonb NOT NULL DEFAULT '{}',
            PRIMARY KEY (time, event_id))",
            "CREATE INDEX IF NOT EXISTS events_tenant_time ON {s}.events (tenant, time DESC)"],
    },
    Migration {
        version: 2,
        name: "events hypertable",
        on: For::Timescale,
        sql: &["SELECT create_hypertable('{s}.events', 'time', chunk_time_interval => interval '1 day', if_not_exists => TRUE, migrate_data => TRUE)"],
    },
    Migration {
        version: 3,
        name: "continuous aggregates",
        on: For::Timescale,
        sql: &[
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {s}.page_views_1m WITH (timescaledb.continuous) AS
             SELECT time_bucket('1 minute', time) AS bucket, tenant, url, count(*) AS views
             FROM {s}.events WHERE event_type = 'page_view'
             GROUP BY 1, tenant, url WITH NO DATA",
            // Hierarchical: hourly views roll up the per-minute aggregate.
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {s}.page_views_1h WITH (timescaledb.continuous) AS
             SELECT time_bucket('1 hour', bucket) AS bucket, tenant, url, sum(views)::bigint AS views
             FROM {s}.page_views_1m GROUP BY 1, tenant, url WITH NO DATA",
            // Distinct counts cannot roll up, so unique users come from the hypertable.
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {s}.users_1h WITH (timescaledb.continuous) AS
             SELECT time_bucket('1 hour', time) AS bucket, tenant, count(DISTINCT user_id) AS users
             FROM {s}.events GROUP BY 1, tenant WITH NO DATA",
        ],
    },
    Migration {
        version: 4,
        name: "sessions table",
        on: For::Both,
        sql: &["CREATE TABLE IF NOT EXISTS {s}.sessions (
            tenant text NOT NULL,
            user_id text NOT NULL,
            session_id text NOT NULL,
            started_at timestamptz NOT NULL,
            ended_at timestamptz NOT NULL,
            page_views int NOT NULL,
            events int NOT NULL,
            duration_ms bigint NOT NULL,
            PRIMARY KEY (tenant, session_id, started_at))"],
    },
    Migration {
        version: 5,
        name: "tenant directory columns",
        on: For::Both,
        sql: &["ALTER TABLE {s}.events ADD COLUMN IF NOT EXISTS tenant_name text",
            "ALTER TABLE {s}.events ADD COLUMN IF NOT EXISTS tenant_plan text"],
    },
    Migration {
        version: 6,
        name: "processing versions and the aggregate refresh queue",
        on: For::Both,
        sql: &[
            "ALTER TABLE {s}.events ADD COLUMN IF NOT EXISTS processed_at timestamptz",
            "CREATE TABLE IF NOT EXISTS {s}.sluice_refresh_queue (
                id bigserial PRIMARY KEY,
                aggregate text NOT NULL,
                bucket_start timestamptz NOT NULL,
                bucket_end timestamptz NOT NULL,
                queued_at timestamptz NOT NULL DEFAULT now())",
            "ALTER TABLE {s}.sessions ADD COLUMN IF NOT EXISTS processed_at timestamptz",
            "CREATE INDEX IF NOT EXISTS sessions_user_time ON {s}.sessions (tenant, user_id, started_at)",
        ],
    },
    Migration {
        version: 7,
        name: "event identity (tenant, event_id), with event_keys",
        on: For::Timescale,
        sql: Layout::Keyed.ddl(),
    },
    Migration {
        version: 8,
        name: "event identity (tenant, event_id)",
        on: For::Postgres,
        sql: Layout::Direct.ddl(),
    },
    Migration {
        version: 9,
        name: "replay epochs in session and event versions",
        on: For::Both,
        sql: &[
            "ALTER TABLE {s}.sessions ADD COLUMN IF NOT EXISTS replay_epoch int NOT NULL DEFAULT 0",
            "ALTER TABLE IF EXISTS {s}.event_keys ADD COLUMN IF NOT EXISTS replay_epoch int NOT NULL DEFAULT 0",
        ],
    },
];

/// Run the migrations that have not run yet, then add the columns of the column table
/// that the events table lacks. Returns whether TimescaleDB is used.
pub async fn migrate(pool: &Pool, config: &TimescaleConfig) -> Result<bool, DbError> {
    let s = &config.schema;
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DbError::SchemaName(s.clone()));
    }
    let client = pool.get().await.map_err(DbError::connect)?;
    let available = client
        .query_one(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await?
        .get::<_, i64>(0)
        > 0;
    let timescale = match config.mode {
        DbMode::Postgres => false,
        DbMode::Timescale if !available => return Err(DbError::NoTimescale),
        DbMode::Timescale => true,
        DbMode::Auto => available,
    };
    // Replicas starting together must not race on CREATE … IF NOT EXISTS.
    client
        .batch_execute("SELECT pg_advisory_lock(hashtext('sluice-migrations'))")
        .await?;
    let result = migrate_locked(&client, config, s, available, timescale).await;
    client
        .batch_execute("SELECT pg_advisory_unlock(hashtext('sluice-migrations'))")
        .await?;
    result?;
    Ok(timescale)
}

async fn migrate_locked(
    client: &tokio_postgres::Client,
    config: &TimescaleConfig,
    s: &str,
    available: bool,
    timescale: bool,
) -> Result<(), DbError> {
    if timescale {
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            .await?;
    } else {
        tracing::info!(
            "timescaledb extension {}: using plain PostgreSQL tables without continuous aggregates",
            if available {
                "not wanted (mode = postgres)"
            } else {
                "not available"
            }
        );
    }
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.sluice_migrations (
               version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    let done: Vec<i32> = client
        .query(&format!("SELECT version FROM {s}.sluice_migrations"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for m in MIGRATIONS {
        let wanted = match m.on {
            For::Both => true,
            For::Timescale => timescale,
            For::Postgres => !timescale,
        };
        if done.contains(&m.version) || !wanted {
            continue;
        }
        for stmt in m.sql {
            client.batch_execute(&stmt.replace("{s}", s)).await?;
        }
        client
            .execute(
                &format!("INSERT INTO {s}.sluice_migrations (version, name) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
                &[&m.version, &m.name],
            )
            .await?;
        tracing::info!(schema = %s, version = m.version, name = m.name, "migration applied");
    }
    ensure_columns(client, s).await?;
    if timescale {
        apply_policies(client, config).await?;
    }
    Ok(())
}

/// Add every column of the column table that the events table lacks (nullable: rows
/// written before have no value), and log it.
async fn ensure_columns(client: &tokio_postgres::Client, s: &str) -> Result<(), DbError> {
    let present: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = 'events'",
            &[&s],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for c in COLUMNS
        .iter()
        .filter(|c| !present.iter().any(|p| p == c.name))
    {
        client
            .batch_execute(&format!(
                "ALTER TABLE {s}.events ADD COLUMN IF NOT EXISTS {} {}",
                c.name,
                c.sql_type()
            ))
            .await?;
        tracing::info!(schema = %s, column = c.name, "events column added");
    }
    Ok(())
}

/// Add the refresh, retention and compression policies the config asks for. Adding one
/// that exists is a no-op (`if_not_exists`), so this runs at every start.
async fn apply_policies(
    client: &tokio_postgres::Client,
    config: &TimescaleConfig,
) -> Result<(), DbError> {
    let s = &config.schema;
    if config.refresh_policies {
        for a in AGGREGATES {
            client
                .batch_execute(&format!(
                    "SELECT add_continuous_aggregate_policy('{s}.{}', start_offset => INTERVAL '{} seconds',
                       end_offset => INTERVAL '{} seconds', schedule_interval => INTERVAL '{} seconds', if_not_exists => TRUE)",
                    a.name, a.policy_start_s, a.policy_end_s, a.schedule_s
                ))
                .await?;
        }
    }
    if let Some(days) = config.compress_after_days {
        client
            .batch_execute(&format!(
                "ALTER TABLE {s}.events SET (timescaledb.compress, timescaledb.compress_segmentby = 'tenant',
                   timescaledb.compress_orderby = 'time DESC, event_id');
                 SELECT add_compression_policy('{s}.events', INTERVAL '{days} days', if_not_exists => TRUE)"
            ))
            .await?;
    }
    if let Some(days) = config.retention_days {
        client
            .batch_execute(&format!(
                "SELECT add_retention_policy('{s}.events', INTERVAL '{days} days', if_not_exists => TRUE)"
            ))
            .await?;
    }
    Ok(())
}
