//! Names of the Kafka record headers Sluice sets, and helpers to read them.

use rdkafka::message::{Headers, OwnedHeaders};

/// Tenant that sent the event.
pub const TENANT: &str = "sluice.tenant";
/// Where the event came from (the client's `X-Source` header, or `http`).
pub const SOURCE: &str = "sluice.source";
/// Content type of the request that carried the event.
pub const CONTENT_TYPE: &str = "sluice.content_type";
/// When ingest received the event, in Unix milliseconds (end-to-end latency starts here).
pub const RECEIVED_AT_MS: &str = "sluice.received_at_ms";
/// Id of the ingest request that carried the event.
pub const INGEST_ID: &str = "sluice.ingest_id";
/// Unique id of the event, kept by every stage and used by sinks for idempotence.
pub const EVENT_ID: &str = "sluice.event_id";
/// The id ingest stamped on the raw record, kept by every later stage even when the
/// client chose its own `event_id`: `sluice audit` traces records back to raw with it.
pub const RAW_EVENT_ID: &str = "sluice.raw_event_id";
/// Encoding of the record value (`json`, `avro-single-object`, `avro-confluent`).
pub const ENCODING: &str = "sluice.encoding";

/// Dead letters: topic the failed record came from.
pub const DLQ_TOPIC: &str = "sluice.dlq.topic";
/// Dead letters: partition the failed record came from.
pub const DLQ_PARTITION: &str = "sluice.dlq.partition";
/// Dead letters: offset of the failed record.
pub const DLQ_OFFSET: &str = "sluice.dlq.offset";
/// Dead letters: the stage or sink that failed.
pub const DLQ_STAGE: &str = "sluice.dlq.stage";
/// Dead letters: the class of the error (`decode`, `validation`, `transform`, `write`...).
pub const DLQ_ERROR_CLASS: &str = "sluice.dlq.error_class";
/// Dead letters: a human-readable reason.
pub const DLQ_REASON: &str = "sluice.dlq.reason";
/// Dead letters: how many attempts were made.
pub const DLQ_ATTEMPTS: &str = "sluice.dlq.attempts";
/// Dead letters: when the record was dead-lettered, Unix milliseconds.
pub const DLQ_FAILED_AT_MS: &str = "sluice.dlq.failed_at_ms";
/// Dead letters: the original record's timestamp, Unix milliseconds.
pub const DLQ_RECORD_TS_MS: &str = "sluice.dlq.record_ts_ms";

/// Every dead-letter header: replaced when a dead letter fails again, dropped when a
/// re-driven one succeeds.
pub const DEAD_LETTER: &[&str] = &[
    DLQ_TOPIC,
    DLQ_PARTITION,
    DLQ_OFFSET,
    DLQ_STAGE,
    DLQ_ERROR_CLASS,
    DLQ_REASON,
    DLQ_ATTEMPTS,
    DLQ_FAILED_AT_MS,
    DLQ_RECORD_TS_MS,
];

/// The value of header `name` as UTF-8, if present and valid.
pub fn get<'a, H: Headers>(headers: Option<&'a H>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Headers without any whose key is in `drop`.
pub fn without<H: Headers>(headers: Option<&H>, drop: &[&str]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(h) = headers {
        for header in h.iter().filter(|h| !drop.contains(&h.key)) {
            out = out.insert(header);
        }
    }
    out
}
