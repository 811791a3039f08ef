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

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
