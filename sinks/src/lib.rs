//! Sinks: consumer groups that write enriched events durably and idempotently to
//! TimescaleDB/PostgreSQL and Elasticsearch, and raw records to the archive, committing
//! offsets only after the write.

pub mod archive;
pub mod consumer;
pub mod elasticsearch;
pub mod timescale;

pub use consumer::{
    run_sink, BatchWriter, Partial, Rejected, SinkSpec, SinkStats, Versioned, WriteError,
    WriteResult,
};

/// What a sink holds of one event, read back for `sluice audit` and `replay --diff`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Tenant.
    pub tenant: String,
    /// Event id.
    pub event_id: String,
    /// When ingest received it, Unix milliseconds.
    pub received_at: i64,
    /// Its version ([`sluice_core::headers::version_of`]: replay epoch, then processing
    /// time); 0 when unknown.
    pub version: i64,
    /// The whole event, when asked for.
    pub event: Option<sluice_schemas::EnrichedEvent>,
}

/// Which stored events to read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Events received (by ingest) in `[from, to)`, Unix milliseconds, of one tenant or all.
    Received {
        /// First millisecond.
        from: i64,
        /// First millisecond after.
        to: i64,
        /// Only this tenant.
        tenant: Option<String>,
    },
    /// These events, by `(tenant, event_id)`.
    Events(Vec<(String, String)>),
}
