//! Shared pieces of every Sluice process: configuration, Kafka client settings and topic
//! administration, record header names, and logging/metrics set-up.

pub mod config;
pub mod consume;
pub mod consumer_metrics;
pub mod events;
pub mod failure;
pub mod headers;
pub mod kafka;
pub mod kafka_probe;
pub mod produce;
pub mod redact;
pub mod replay_scope;
pub mod retry;
pub mod secret;
pub mod telemetry;
pub mod timing;
pub mod tls;
pub mod wiring;

/// Milliseconds since the Unix epoch, now, by this host's clock.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis() + *CLOCK_OFFSET_MS
}

/// Fault injection: `SLUICE_FAULT_CLOCK_OFFSET_MS` moves this process's clock by that many
/// milliseconds (a host whose clock runs fast or slow). Tests set it on a child process;
/// nothing in production does.
static CLOCK_OFFSET_MS: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| {
    std::env::var("SLUICE_FAULT_CLOCK_OFFSET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
});

/// Why `name` cannot be a tenant, if it cannot: names starting with `_` are Sluice's own
/// (the archive files records without a tenant under `_unknown`), so a tenant named so
/// would share their place.
pub fn tenant_name_problem(name: &str) -> Option<String> {
    if name.trim().is_empty() {
        Some("a tenant name must not be empty".into())
    } else if name.starts_with('_') {
        Some(format!(
            "tenant {name:?}: names starting with `_` are reserved (the archive's `_unknown`)"
        ))
    } else {
        None
    }
}
