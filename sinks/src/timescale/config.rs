//! Settings of the TimescaleDB / PostgreSQL sinks (`[timescale]`).

use serde::{Deserialize, Serialize};

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

/// The TimescaleDB / PostgreSQL sink.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimescaleConfig {
    /// Connection URL (`postgres://user:pass@host:port/db?sslmode=require`); libpq's
    /// `sslmode` and `sslrootcert` are understood. TLS connections are always verified.
    pub url: String,
    /// PEM file of the CA that signed the server's certificate (beside the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
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
    /// Most bytes of records in one batch (large events make smaller batches).
    pub max_batch_bytes: usize,
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
            ca_file: None,
            schema: "sluice".into(),
            mode: DbMode::Auto,
            group: "sluice-sink-timescale".into(),
            sessions_group: "sluice-sink-sessions".into(),
            pool_size: 1,
            batch_size: 2_000,
            max_batch_bytes: crate::consumer::DEFAULT_MAX_BATCH_BYTES,
            linger_ms: 200,
            refresh_policies: true,
            retention_days: None,
            compress_after_days: None,
        }
    }
}

sluice_core::redacted_debug!(TimescaleConfig);
