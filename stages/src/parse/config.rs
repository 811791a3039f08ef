//! Settings of the parse stage (`[parse]`).

use serde::{Deserialize, Serialize};

/// The parse stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParseConfig {
    /// Consumer group.
    pub group: String,
    /// Records processed concurrently (awaiting broker acks).
    pub max_in_flight: usize,
    /// Longer raw events are dead-lettered (class `oversized`) instead of parsed.
    pub max_event_bytes: usize,
    /// Kafka transactions: outputs, dead letters and offsets commit together.
    pub exactly_once: bool,
    /// Exactly-once: most records in one transaction.
    pub transaction_max_records: usize,
    /// Exactly-once: longest a transaction stays open, in milliseconds (outputs become
    /// visible to `read_committed` readers when it commits).
    pub transaction_ms: u64,
    /// Fields holding the event time, tried in order.
    pub time_fields: Vec<String>,
    /// IANA time zone of times written without an offset (`2026-11-23 10:00:00`).
    pub timezone: String,
}

impl Default for ParseConfig {
    fn default() -> Self {
        Self {
            group: "sluice-parse".into(),
            max_in_flight: 10_000,
            max_event_bytes: 1024 * 1024,
            exactly_once: false,
            transaction_max_records: 10_000,
            transaction_ms: 500,
            time_fields: vec!["ts".into(), "timestamp".into(), "event_time".into()],
            timezone: "UTC".into(),
        }
    }
}
