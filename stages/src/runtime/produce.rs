//! Producing that both stage runtimes share.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};

/// Send `record`, waiting while the producer's queue is full; any other error comes
/// back with the record.
#[allow(clippy::result_large_err)]
pub(crate) async fn send_queued<'a, C: ProducerContext + 'static>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'a, [u8], [u8], C::DeliveryOpaque>,
) -> Result<(), (KafkaError, BaseRecord<'a, [u8], [u8], C::DeliveryOpaque>)> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Lock `m`; a panic while holding it leaves counts that are still consistent.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
