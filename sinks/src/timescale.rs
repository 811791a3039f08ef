//! The TimescaleDB / PostgreSQL sink: enriched events into a hypertable keyed by
//! (time, event_id), with continuous aggregates for dashboards. Without the timescaledb
//! extension it uses ordinary tables with the same keys and no aggregates.
//!
//! Writes are `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING`: one round trip
//! per batch, idempotent, and it works on PGlite, which has no `COPY FROM STDIN`.

use std::str::FromStr;

use chrono::{DateTime, Utc};
/// The connection pool of the database sinks.
pub use deadpool_postgres::Pool;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
use sluice_core::config::{DbMode, TimescaleConfig};
use sluice_schemas::{EnrichedEvent, SessionSummary};
use sluice_stages::Failure;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use crate::consumer::{BatchWriter, WriteError};

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

/// One schema migration; `timescale_only` ones are skipped on plain PostgreSQL.
struct Migration {
    version: i32,
    name: &'static str,
    timescale_only: bool,
    /// Statements, run one by one (continuous aggregates cannot be created in a transaction).
    sql: &'static [&'static str],
}

/// `{s}` stands for the schema. Every statement is idempotent, so a migration that died
/// half-way is simply run again.
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
];

/// Refresh policies: (aggregate, start offset, end offset, schedule).
const REFRESH_POLICIES: &[(&str, &str, &str, &str)] = &[
    ("page_views_1m", "2 hours", "1 minute", "1 minute"),
    ("page_views_1h", "3 days", "1 hour", "30 minutes"),
    ("users_1h", "3 days", "1 hour", "30 minutes"),
];

/// Continuous aggregates in refresh order (a hierarchical one after its source).
pub const AGGREGATES: &[&str] = &["page_views_1m", "page_views_1h", "users_1h"];

/// Run the migrations that have not run yet. Returns whether TimescaleDB is used.
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
    if timescale {
        apply_policies(client, config).await?;
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
        for (agg, start, end, every) in REFRESH_POLICIES {
            client
                .batch_execute(&format!(
                    "SELECT add_continuous_aggregate_policy('{s}.{agg}', start_offset => INTERVAL '{start}',
                       end_offset => INTERVAL '{end}', schedule_interval => INTERVAL '{every}', if_not_exists => TRUE)"
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

/// Refresh every continuous aggregate over all time (tests and the demo; production
/// relies on refresh policies).
pub async fn refresh_aggregates(
    client: &tokio_postgres::Client,
    schema: &str,
) -> Result<(), DbError> {
    for agg in AGGREGATES {
        client
            .batch_execute(&format!(
                "CALL refresh_continuous_aggregate('{schema}.{agg}', NULL, NULL)"
            ))
            .await?;
    }
    Ok(())
}

/// Writes batches of enriched events to the events table.
pub struct TimescaleWriter {
    pool: Pool,
    insert: String,
}

impl TimescaleWriter {
    /// A writer into `schema`'s tables through `pool` (already migrated).
    pub fn new(pool: Pool, schema: &str) -> Self {
        let insert = format!(
            "INSERT INTO {schema}.events (time, event_id, tenant, user_id, session_id, event_type, url, referrer,
               received_at, user_agent, ip, browser, browser_version, os, device, network, country, extra,
               tenant_name, tenant_plan)
             SELECT t, id, te, u, se, ty, ur, re, ra, ua, ip, br, bv, os, de, ne, co, ex::jsonb, tn, tp
             FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
               $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::text[], $12::text[], $13::text[],
               $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::text[])
               AS r(t, id, te, u, se, ty, ur, re, ra, ua, ip, br, bv, os, de, ne, co, ex, tn, tp)
             ON CONFLICT DO NOTHING"
        );
        Self { pool, insert }
    }

    async fn insert(&self, rows: &[&EnrichedEvent]) -> Result<(), InsertError> {
        let client = self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => InsertError::Db(e),
            other => InsertError::Pool(other.to_string()),
        })?;
        let cols = Columns::of(rows);
        let params: [&(dyn ToSql + Sync); 20] = [
            &cols.time,
            &cols.event_id,
            &cols.tenant,
            &cols.user_id,
            &cols.session_id,
            &cols.event_type,
            &cols.url,
            &cols.referrer,
            &cols.received_at,
            &cols.user_agent,
            &cols.ip,
            &cols.browser,
            &cols.browser_version,
            &cols.os,
            &cols.device,
            &cols.network,
            &cols.country,
            &cols.extra,
            &cols.tenant_name,
            &cols.tenant_plan,
        ];
        let stmt = client
            .prepare_cached(&self.insert)
            .await
            .map_err(InsertError::Db)?;
        client
            .execute(&stmt, &params)
            .await
            .map_err(InsertError::Db)?;
        Ok(())
    }
}

/// Why one INSERT failed.
#[derive(Debug, thiserror::Error)]
enum InsertError {
    /// No connection could be had (server down, pool timeout).
    #[error("no connection: {0}")]
    Pool(String),
    /// The statement failed.
    #[error("{}", db_reason(.0))]
    Db(tokio_postgres::Error),
}

/// How to treat a failed INSERT.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The connection or server state: retry the batch later.
    Transient,
    /// The data of a row: that row can never be written.
    Row,
    /// Anything else (missing table, permissions): stop.
    Fatal,
}

impl InsertError {
    fn verdict(&self) -> Verdict {
        let Self::Db(e) = self else {
            return Verdict::Transient;
        };
        match e.code() {
            None => Verdict::Transient,
            Some(code) => match &code.code()[..2] {
                "22" | "23" => Verdict::Row,
                "08" | "53" | "57" | "58" | "40" => Verdict::Transient,
                _ if *code == SqlState::LOCK_NOT_AVAILABLE => Verdict::Transient,
                _ => Verdict::Fatal,
            },
        }
    }
}

impl BatchWriter for TimescaleWriter {
    type Record = EnrichedEvent;

    fn name(&self) -> &'static str {
        "timescale"
    }

    async fn write(&self, events: &[EnrichedEvent]) -> Result<Vec<(usize, Failure)>, WriteError> {
        let mut failures = Vec::new();
        let mut rows = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            if DateTime::from_timestamp_millis(e.event_time).is_none()
                || DateTime::from_timestamp_millis(e.received_at).is_none()
            {
                failures.push((
                    i,
                    Failure::new("write", "event_time or received_at out of range"),
                ));
            } else {
                rows.push((i, e));
            }
        }
        let all: Vec<&EnrichedEvent> = rows.iter().map(|(_, e)| *e).collect();
        match self.insert(&all).await {
            Ok(()) => return Ok(failures),
            Err(e) => match e.verdict() {
                Verdict::Transient => return Err(WriteError::Transient(e.to_string())),
                Verdict::Fatal => return Err(WriteError::Fatal(e.to_string())),
                Verdict::Row => {
                    tracing::info!(error = %e, "batch rejected for its data; writing rows one by one")
                }
            },
        }
        // Find the rows the database refuses, so the rest of the batch goes on.
        for (i, e) in rows {
            if let Err(err) = self.insert(&[e]).await {
                match err.verdict() {
                    Verdict::Row => failures.push((i, Failure::new("write", err.to_string()))),
                    Verdict::Transient => return Err(WriteError::Transient(err.to_string())),
                    Verdict::Fatal => return Err(WriteError::Fatal(err.to_string())),
                }
            }
        }
        Ok(failures)
    }
}

fn db_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The batch as one array per column.
struct Columns {
    time: Vec<DateTime<Utc>>,
    event_id: Vec<String>,
    tenant: Vec<String>,
    user_id: Vec<String>,
    session_id: Vec<Option<String>>,
    event_type: Vec<String>,
    url: Vec<Option<String>>,
    referrer: Vec<Option<String>>,
    received_at: Vec<DateTime<Utc>>,
    user_agent: Vec<Option<String>>,
    ip: Vec<Option<String>>,
    browser: Vec<Option<String>>,
    browser_version: Vec<Option<String>>,
    os: Vec<Option<String>>,
    device: Vec<Option<String>>,
    network: Vec<Option<String>>,
    country: Vec<Option<String>>,
    extra: Vec<String>,
    tenant_name: Vec<Option<String>>,
    tenant_plan: Vec<Option<String>>,
}

impl Columns {
    fn of(rows: &[&EnrichedEvent]) -> Self {
        let ts = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
        Self {
            time: rows.iter().map(|e| ts(e.event_time)).collect(),
            event_id: rows.iter().map(|e| e.event_id.clone()).collect(),
            tenant: rows.iter().map(|e| e.tenant.clone()).collect(),
            user_id: rows.iter().map(|e| e.user_id.clone()).collect(),
            session_id: rows.iter().map(|e| e.session_id.clone()).collect(),
            event_type: rows.iter().map(|e| e.event_type.clone()).collect(),
            url: rows.iter().map(|e| e.url.clone()).collect(),
            referrer: rows.iter().map(|e| e.referrer.clone()).collect(),
            received_at: rows.iter().map(|e| ts(e.received_at)).collect(),
            user_agent: rows.iter().map(|e| e.user_agent.clone()).collect(),
            ip: rows.iter().map(|e| e.ip.clone()).collect(),
            browser: rows.iter().map(|e| e.browser.clone()).collect(),
            browser_version: rows.iter().map(|e| e.browser_version.clone()).collect(),
            os: rows.iter().map(|e| e.os.clone()).collect(),
            device: rows.iter().map(|e| e.device.clone()).collect(),
            network: rows.iter().map(|e| e.network.clone()).collect(),
            country: rows.iter().map(|e| e.country.clone()).collect(),
            extra: rows.iter().map(|e| extra_json(e).to_string()).collect(),
            tenant_name: rows.iter().map(|e| e.tenant_name.clone()).collect(),
            tenant_plan: rows.iter().map(|e| e.tenant_plan.clone()).collect(),
        }
    }
}

/// The `extra` map as one JSON object, each value parsed back from its JSON text.
pub fn extra_json(e: &EnrichedEvent) -> serde_json::Value {
    serde_json::Value::Object(
        e.extra
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::from_str(v)
                        .unwrap_or_else(|_| serde_json::Value::String(v.clone())),
                )
            })
            .collect(),
    )
}

/// Writes session summaries into the sessions table, idempotently: a session re-emitted
/// after a restart has the same key (tenant, session id, start) and is skipped.
pub struct SessionsWriter {
    pool: Pool,
    insert: String,
}

impl SessionsWriter {
    /// A writer into `schema`'s sessions table through `pool` (already migrated).
    pub fn new(pool: Pool, schema: &str) -> Self {
        let insert = format!(
            "INSERT INTO {schema}.sessions (tenant, user_id, session_id, started_at, ended_at, page_views, events, duration_ms)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
               $6::int[], $7::int[], $8::bigint[])
             ON CONFLICT DO NOTHING"
        );
        Self { pool, insert }
    }
}

impl SessionsWriter {
    async fn insert(
        &self,
        client: &deadpool_postgres::Client,
        rows: &[&SessionSummary],
    ) -> Result<(), tokio_postgres::Error> {
        let ts = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
        let tenant: Vec<&str> = rows.iter().map(|r| r.tenant.as_str()).collect();
        let user: Vec<&str> = rows.iter().map(|r| r.user_id.as_str()).collect();
        let id: Vec<&str> = rows.iter().map(|r| r.session_id.as_str()).collect();
        let start: Vec<DateTime<Utc>> = rows.iter().map(|r| ts(r.started_at)).collect();
        let end: Vec<DateTime<Utc>> = rows.iter().map(|r| ts(r.ended_at)).collect();
        let views: Vec<i32> = rows.iter().map(|r| r.page_views).collect();
        let events: Vec<i32> = rows.iter().map(|r| r.events).collect();
        let duration: Vec<i64> = rows.iter().map(|r| r.duration_ms).collect();
        client
            .execute(
                &self.insert,
                &[
                    &tenant, &user, &id, &start, &end, &views, &events, &duration,
                ],
            )
            .await
            .map(|_| ())
    }
}

impl BatchWriter for SessionsWriter {
    type Record = SessionSummary;

    fn name(&self) -> &'static str {
        "sessions"
    }

    async fn write(&self, rows: &[SessionSummary]) -> Result<Vec<(usize, Failure)>, WriteError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| WriteError::Transient(e.to_string()))?;
        let all: Vec<&SessionSummary> = rows.iter().collect();
        let verdict = match self.insert(&client, &all).await {
            Ok(()) => return Ok(Vec::new()),
            Err(e) => InsertError::Db(e),
        };
        match verdict.verdict() {
            Verdict::Transient => return Err(WriteError::Transient(verdict.to_string())),
            Verdict::Fatal => return Err(WriteError::Fatal(verdict.to_string())),
            Verdict::Row => {}
        }
        // Rejected for its data: row by row, so only the bad ones are dead-lettered.
        let mut failures = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if let Err(e) = self.insert(&client, &[row]).await {
                match InsertError::Db(e) {
                    e if e.verdict() == Verdict::Row => {
                        failures.push((i, Failure::new("write", e.to_string())))
                    }
                    e => return Err(WriteError::Transient(e.to_string())),
                }
            }
        }
        Ok(failures)
    }
}
