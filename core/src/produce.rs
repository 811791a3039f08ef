//! Sending one record until the broker takes it: what a dead letter, a session summary
//! and other records whose offsets wait on them need.

use std::time::Duration;

use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::events::{DeliveryRetrying, Emit};
use crate::retry::Backoff;

/// Send the record to `topic` until the broker acknowledges it, waiting a jittered
/// backoff (100 ms to 5 s) between attempts. Returns `false` when `shutdown` came first:
/// the caller must then not commit past the record.
pub async fn deliver(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: &OwnedHeaders,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let mut record = FutureRecord::to(topic)
            .payload(payload)
            .headers(headers.clone());
        if let Some(k) = key {
            record = record.key(k);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => return true,
            Err((e, _)) => {
                let retry_in = backoff.next_delay();
                DeliveryRetrying {
                    topic,
                    error: &e.to_string(),
                    retry_in,
                }
                .emit();
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(retry_in) => {}
                }
            }
        }
    }
}
