//! Settings of the enrich stage (`[enrich]`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The enrich stage.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichConfig {
    /// Consumer group.
    pub group: String,
    /// Records processed concurrently (awaiting broker acks).
    pub max_in_flight: usize,
    /// Most bytes of outputs awaiting broker acks.
    pub max_in_flight_bytes: usize,
    /// CSV of `cidr,network,country` rows for IP lookups; none means no IP enrichment.
    pub geo_csv: Option<PathBuf>,
    /// Kafka transactions: outputs, dead letters and offsets commit together.
    pub exactly_once: bool,
    /// Exactly-once: most records in one transaction.
    pub transaction_max_records: usize,
    /// Exactly-once: longest a transaction stays open, in milliseconds.
    pub transaction_ms: u64,
    /// PostgreSQL URL of the tenant directory; none means no tenant lookup.
    pub tenants_url: Option<String>,
    /// Query returning `tenant, name, plan` rows.
    pub tenants_query: String,
    /// Seconds a directory load stays valid; it is reloaded every half of it.
    pub tenants_ttl_s: u64,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        Self {
            group: "sluice-enrich".into(),
            max_in_flight: 10_000,
            max_in_flight_bytes: 64 * 1024 * 1024,
            geo_csv: None,
            exactly_once: false,
            transaction_max_records: 10_000,
            transaction_ms: 500,
            tenants_url: None,
            tenants_query: "SELECT tenant, name, plan FROM tenants".into(),
            tenants_ttl_s: 60,
        }
    }
}

sluice_core::redacted_debug!(EnrichConfig);
