//! Versioned, idempotent schema migrations, run by the sinks at start-up, and the
//! TimescaleDB policies the configuration asks for.

use sluice_core::config::{DbMode, TimescaleConfig};

use super::aggregates::AGGREGATES;
use super::events::COLUMNS;
use super::{DbError, Pool};

/// One schema migration; `timescale_only` ones are skipped on plain PostgreSQL.
struct Migration {
    version: i32,
    name: &'static str,
    timescale_only: bool,
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
        timescale_only: false,
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
        timescale_only: true,
        sql: &["SELECT create_hypertable('{s}.events', 'time', chunk_time_interval => interval '1 day', if_not_exists => TRUE, migrate_data => TRUE)"],
    },
    Migration {
        version: 3,
        name: "continuous aggregates",
        timescale_only: true,
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
        timescale_only: false,
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
        timescale_only: false,
        sql: &["ALTER TABLE {s}.events ADD COLUMN IF NOT EXISTS tenant_name text",
            "ALTER TABLE {s}.events ADD COLUMN IF NOT EXISTS tenant_plan text"],
    },
    Migration {
        version: 6,
        name: "event identity (tenant, event_id) and processing versions",
        timescale_only: false,
        sql: &[
            "ALTER TABLE {s}.events ADD COLUMN IF NOT EXISTS processed_at timestamptz",
            // A unique key of a hypertable must hold its time column: (tenant, event_id)
            // alone is kept unique by event_keys, which also says where each event is.
            "ALTER TABLE {s}.events DROP CONSTRAINT IF EXISTS events_pkey",
            "ALTER TABLE {s}.events ADD PRIMARY KEY (tenant, event_id, time)",
            "CREATE TABLE IF NOT EXISTS {s}.event_keys (
                tenant text NOT NULL,
                event_id text NOT NULL,
                time timestamptz NOT NULL,
                processed_at timestamptz NOT NULL,
                prev_time timestamptz,
                PRIMARY KEY (tenant, event_id))",
            "CREATE INDEX IF NOT EXISTS event_keys_time ON {s}.event_keys (time)",
            // Rows written before: the latest time of each event is where it is; rows of
            // the same event at other times (a duplicate the old key allowed) go.
            "INSERT INTO {s}.event_keys (tenant, event_id, time, processed_at)
             SELECT DISTINCT ON (tenant, event_id) tenant, event_id, time, coalesce(processed_at, '-infinity')
             FROM {s}.events ORDER BY tenant, event_id, time DESC
             ON CONFLICT DO NOTHING",
            "DELETE FROM {s}.events e USING {s}.event_keys k
             WHERE e.tenant = k.tenant AND e.event_id = k.event_id AND e.time <> k.time",
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
];

/// Run the migrations that have not run yet, then add the columns of the column table
/// that the events table lacks. Returns whether TimescaleDB is used.
pub async fn migrate(pool: &Pool, config: &TimescaleConfig) -> Result<bool, DbError> {
    let s = &config.schema;
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DbError::SchemaName(s.clone()));
    }
    let client = pool.get().await.map_err(|e| DbError::Pool(e.to_string()))?;
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
        if done.contains(&m.version) || (m.timescale_only && !timescale) {
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
