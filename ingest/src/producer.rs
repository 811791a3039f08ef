//! Writing a request's lines to the raw topic: stamped, keyed, acknowledged, and a
//! producer that failed for good replaced.

use std::collections::HashMap;
use std::time::Duration;

use axum::http::StatusCode;
use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::value::RawValue;
use sluice_core::config::KafkaConfig;
use sluice_core::events::{Emit, ProducerReplaced};
use sluice_core::headers;

use crate::config::IngestConfig;
use crate::http::{broker_unavailable, Accepted, Rejection};
use crate::Ingest;

/// The headers ingest stamps on each raw record.
#[derive(Debug, Clone, Copy)]
pub struct RawHeaders<'a> {
    /// Tenant of the API key.
    pub tenant: &'a str,
    /// The client's `X-Source`, or `http`.
    pub source: &'a str,
    /// Content type of the request.
    pub content_type: &'a str,
    /// Receipt time, Unix milliseconds, as text.
    pub received_at_ms: &'a str,
    /// Id of the request.
    pub ingest_id: &'a str,
    /// Id of the event.
    pub event_id: &'a str,
}

impl RawHeaders<'_> {
    /// As Kafka record headers.
    pub fn to_headers(&self) -> OwnedHeaders {
        [
            (headers::TENANT, self.tenant),
            (headers::SOURCE, self.source),
            (headers::CONTENT_TYPE, self.content_type),
            (headers::RECEIVED_AT_MS, self.received_at_ms),
            (headers::INGEST_ID, self.ingest_id),
            (headers::EVENT_ID, self.event_id),
        ]
        .into_iter()
        .fold(OwnedHeaders::new_with_capacity(6), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
    }
}

/// Longest key field value used as it is; a longer one is keyed by its digest.
const MAX_KEY_VALUE_BYTES: usize = 256;

impl Ingest {
    /// The producer in use now; a new one replaces it after a fatal error.
    pub fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replace `failed` if it has a fatal error and is still the one in use. An
    /// idempotent producer fails for good when the broker lost its sequence state (a
    /// restarted broker can): without a new one, every request would get a 503 until
    /// the process restarts. Requests it failed got a 503 and are retried by clients.
    fn replace_if_failed(&self, failed: &FutureProducer) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut current = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.client().native_ptr() != failed.client().native_ptr() {
            return; // another request replaced it already
        }
        match new_producer(&self.kafka, &self.config) {
            Ok(fresh) => {
                ProducerReplaced {
                    stage: None,
                    reason: &format!("{code:?}: {reason}"),
                }
                .emit();
                let old = std::mem::replace(&mut *current, fresh);
                // Destroying a client blocks; other requests may still hold clones.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => tracing::warn!(error = %e, "cannot create a producer; will retry"),
        }
    }

    /// Key of a record: tenant plus the first configured key field present in the line.
    fn record_key(&self, tenant: &str, line: &str, event_id: &str) -> String {
        // Zero-copy scan of the top-level fields; a line that does not scan (malformed,
        // or with escaped field names) is keyed by its event id.
        let fields: Option<HashMap<&str, &RawValue>> = serde_json::from_str(line).ok();
        let value = fields.as_ref().and_then(|f| {
            self.config.partition_key_fields.iter().find_map(|k| {
                let raw = f.get(k.as_str())?.get();
                let v = raw.trim_matches('"');
                (!v.is_empty() && v != "null").then_some(v)
            })
        });
        let value = value.unwrap_or(event_id);
        // The key rides beside the line: a long field value would make the record exceed
        // what the broker takes although the line fits (an endless 503 for the client).
        // A digest keeps the partitioning (same value, same key) at a bounded size.
        if value.len() > MAX_KEY_VALUE_BYTES {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(value.as_bytes());
            return format!("{tenant}:sha256:{}", hex::encode(&digest[..16]));
        }
        format!("{tenant}:{value}")
    }

    pub(crate) async fn write(
        &self,
        tenant: &str,
        source: &str,
        idempotency_key: Option<&str>,
        content_type: &str,
        body: &[u8],
    ) -> Result<Accepted, Rejection> {
        let text = std::str::from_utf8(body).map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("body is not UTF-8 (first bad byte at {})", e.valid_up_to()),
            )
        })?;
        let lines: Vec<&str> = text.split('\n').filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "empty_body",
                "no events in the body",
            ));
        }
        if lines.len() > self.config.max_lines {
            return Err(Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_lines",
                format!(
                    "{} lines; at most {} per request",
                    lines.len(),
                    self.config.max_lines
                ),
            ));
        }
        if let Some((i, line)) = lines
            .iter()
            .enumerate()
            .find(|(_, l)| l.len() > self.max_event_bytes)
        {
            return Err(Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "event_too_large",
                format!(
                    "line {}: {} bytes; at most {} per event (topics.max_event_bytes)",
                    i + 1,
                    line.len(),
                    self.max_event_bytes
                ),
            ));
        }
        // One event was admitted before the body was read.
        self.limits.admit_rest(tenant, lines.len())?;
        let producer = self.producer();
        let result = self
            .send_lines(
                &producer,
                tenant,
                source,
                idempotency_key,
                content_type,
                &lines,
            )
            .await;
        if result.is_err() {
            self.replace_if_failed(&producer);
        }
        result
    }

    /// Write one request's lines and wait for the broker to acknowledge all of them.
    async fn send_lines(
        &self,
        producer: &FutureProducer,
        tenant: &str,
        source: &str,
        idempotency_key: Option<&str>,
        content_type: &str,
        lines: &[&str],
    ) -> Result<Accepted, Rejection> {
        let ingest_id = uuid::Uuid::now_v7().to_string();
        let received_at = sluice_core::now_ms().to_string();
        let mut deliveries = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            // With an Idempotency-Key a retried request stamps the same ids, which the
            // sinks then store once (a 503 can come after part of a request was written).
            let event_id = match idempotency_key {
                Some(k) => format!("idem-{k}-{i}"),
                None => uuid::Uuid::now_v7().to_string(),
            };
            let key = self.record_key(tenant, line, &event_id);
            let hdrs = RawHeaders {
                tenant,
                source,
                content_type,
                received_at_ms: &received_at,
                ingest_id: &ingest_id,
                event_id: &event_id,
            }
            .to_headers();
            let record = FutureRecord::to(&self.topic)
                .key(&key)
                .payload(line.as_bytes())
                .headers(hdrs);
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Err(Rejection::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "producer queue is full; retry later (records of this request may be partly written)",
                    )
                    .retry_after(1));
                }
                Err((e, _)) => {
                    return Err(Rejection::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "kafka_error",
                        e.to_string(),
                    )
                    .retry_after(1));
                }
            }
        }
        let timeout = Duration::from_millis(self.config.ack_timeout_ms);
        let results = tokio::time::timeout(timeout + Duration::from_secs(1), join_all(deliveries))
            .await
            .map_err(|_| broker_unavailable("broker did not acknowledge in time"))?;
        for r in results {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(broker_unavailable(&e.to_string())),
                Err(_) => return Err(broker_unavailable("delivery cancelled")),
            }
        }
        metrics::counter!("sluice_ingest_events_total", "tenant" => tenant.to_string())
            .increment(lines.len() as u64);
        Ok(Accepted {
            accepted: lines.len(),
            ingest_id,
        })
    }
}

/// An idempotent producer whose deliveries fail once the broker cannot ack them in time,
/// so the client gets a 503 rather than waiting.
pub(crate) fn new_producer(
    kafka: &KafkaConfig,
    config: &IngestConfig,
) -> Result<FutureProducer, KafkaError> {
    let mut pc = kafka.producer_config();
    pc.set("message.timeout.ms", config.ack_timeout_ms.to_string());
    // librdkafka queues up to 1 GiB by default; ingest's pods have 512 MiB. A full queue
    // answers 503 (Retry-After) instead.
    if !kafka.producer.contains_key("queue.buffering.max.kbytes")
        && !kafka.properties.contains_key("queue.buffering.max.kbytes")
    {
        pc.set("queue.buffering.max.kbytes", "131072");
    }
    pc.create()
}
