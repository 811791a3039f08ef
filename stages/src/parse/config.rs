//! Settings of the parse stage (`[parse]`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The parse stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParseConfig {
    /// Consumer group.
    pub group: String,
    /// Records processed concurrently (awaiting broker acks).
    pub max_in_flight: usize,
    /// Most bytes of outputs awaiting broker acks.
    pub max_in_flight_bytes: usize,
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
    /// Records on the raw topic without a `sluice.tenant` header (another producer
    /// shares it): their tenant is this JSON field's value…
    pub tenant_field: Option<String>,
    /// …or, failing that, this tenant. Without either such records are dead-lettered.
    pub default_tenant: Option<String>,
    /// Other producers' topics (`topics.raw_extra`), each by name: whose records it
    /// carries. Every such topic must be declared here.
    pub sources: BTreeMap<String, SourceConfig>,
    /// Event times further than this before the ingest time are dead-lettered as
    /// `out_of_range` (a broken client clock, a unit mix-up).
    pub max_past_skew_s: u64,
    /// Event times further than this after the ingest time are dead-lettered as
    /// `out_of_range` (one event from the year 9999 would otherwise close every session).
    pub max_future_skew_s: u64,
}

impl Default for ParseConfig {
    fn default() -> Self {
        Self {
            group: "sluice-parse".into(),
            max_in_flight: 10_000,
            max_in_flight_bytes: 64 * 1024 * 1024,
            exactly_once: false,
            transaction_max_records: 10_000,
            transaction_ms: 500,
            time_fields: vec![
                "ts".into(),
                "timestamp".into(),
                "event_time".into(),
                "@timestamp".into(),
            ],
            timezone: "UTC".into(),
            tenant_field: None,
            default_tenant: None,
            sources: BTreeMap::new(),
            max_past_skew_s: 7 * 24 * 3600,
            max_future_skew_s: 3600,
        }
    }
}

/// Whose records one of the other producers' topics carries (`[parse.sources."<topic>"]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// Every record of the topic is this tenant's…
    pub tenant: Option<String>,
    /// …or the record names its tenant in this JSON field…
    pub tenant_field: Option<String>,
    /// …which must be one of these or of the tenants in `ingest.api_keys`; a record
    /// naming another is dead-lettered as `tenant`.
    pub tenants: Vec<String>,
    /// With `tenant_field`: the tenant of a record without the field.
    pub default_tenant: Option<String>,
    /// Believe the records' `sluice.*` headers (a mirror of another Sluice's raw topic,
    /// which only that ingest writes). Otherwise they are dropped: a producer that can
    /// write the topic cannot file records as another tenant.
    pub trust_headers: bool,
}
