//! The archive sink: raw records, bytes and headers unchanged, in Parquet files in
//! object storage (S3 or S3-compatible, or a local directory), kept beyond Kafka's
//! retention and read back by `sluice replay --source archive|auto` and `sluice audit`.
//! [`sink`] says how each record lands in exactly one file, across crashes and
//! rebalances; [`layout`] where the files go; [`record`] their columns.

pub mod config;
pub mod layout;
pub mod read;
pub mod record;
pub mod sink;
pub mod store;

pub use read::{list_files, read_records, read_span, spans, ArchiveRange, ArchivedFile};
pub use record::ArchivedRecord;
pub use store::{open, Archive};

/// Why the archive could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The settings name no usable store.
    #[error("{0}")]
    Url(String),
    /// The store refused or failed a request.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// A Parquet file could not be written or read.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Columns could not be built.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// The store refused a request for good (credentials, permissions, a bad path).
    #[error("the store refused: {0}")]
    Refused(String),
    /// A file or manifest is not what the archive writes.
    #[error("{0}")]
    Format(String),
}

/// Run the archive sink (raw topic → the archive) until `shutdown`, after checking the
/// store answers.
pub async fn run(
    shared: &sluice_core::wiring::Shared,
    settings: &config::ArchiveConfig,
    rewiring: &sluice_core::wiring::Rewiring,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<crate::SinkStats, crate::consumer::SinkError> {
    use crate::consumer::SinkError;
    if rewiring.scope.is_some() {
        return Err(SinkError::Setup(
            "the archive holds each raw record once: a replay into it would archive the range a second time; replay from it with --source archive instead".into(),
        ));
    }
    let archive = open(settings).map_err(|e| SinkError::Setup(e.to_string()))?;
    archive.check().await.map_err(|e| {
        SinkError::Setup(format!(
            "archive.url {}: the store does not answer: {e}",
            settings.url
        ))
    })?;
    let t = &shared.topics;
    let spec = crate::SinkSpec::new(t, &settings.group, &t.raw, rewiring);
    sluice_core::telemetry::process_readiness().set(true);
    sink::run_archive(&shared.kafka, &spec, archive, settings, shutdown).await
}
