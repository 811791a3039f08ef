//! Sinks: consumer groups that write enriched events durably and idempotently to
//! TimescaleDB/PostgreSQL and Elasticsearch, committing offsets only after the write.

pub mod consumer;
pub mod elasticsearch;
pub mod timescale;

pub use consumer::{run_sink, BatchWriter, SinkSpec, SinkStats, WriteError};
