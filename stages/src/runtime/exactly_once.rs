//! The exactly-once stage runtime: Kafka transactions around read-process-write.
//!
//! Records are consumed `read_committed`, transformed, and their outputs (and dead
//! letters) produced inside a transaction, together with the consumed offsets
//! (`send_offsets_to_transaction`). Committing the transaction publishes both at once, so a
//! crash or a rebalance either publishes a batch and its offsets or neither: downstream
//! `read_committed` consumers see every output exactly once.
//!
//! A failed commit (e.g. the partitions were revoked meanwhile) aborts the transaction and
//! rewinds to the batch's first offsets; a fenced producer (another instance took over the
//! transactional id) stops the stage.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::consume::{close_within, Receiver, CLOSE_WAIT};
use sluice_core::consumer_metrics::MeteredConsumer;
use tokio_util::sync::CancellationToken;

use crate::transform::{process, Held, Meters, StageError, StageSpec, StageStats, Transform};

/// Timeout of transaction calls.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// The transactional id: stable across restarts of the same static member (so a restart
/// fences the crashed instance and aborts its open transaction at once), unique otherwise.
fn transactional_id(kafka: &KafkaConfig, group: &str) -> String {
    match kafka.consumer.get("group.instance.id") {
        Some(instance) => format!("{group}-{instance}"),
        None => format!("{group}-{}", uuid::Uuid::new_v4()),
    }
}

/// The state of the open transaction.
#[derive(Default)]
struct Batch {
    open: bool,
    records: usize,
    /// Per partition: first offset in the batch (to rewind to) and next offset to commit.
    offsets: HashMap<i32, (i64, i64)>,
    stats: StageStats,
}

/// Run `transform` with Kafka transactions until `shutdown`; the open transaction is
/// committed before returning.
pub async fn run<T: Transform>(
    kafka: &KafkaConfig,
    spec: &StageSpec,
    transform: Arc<T>,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    let run_started = std::time::Instant::now();
    let name = transform.name();
    // Fetched ahead: about a transaction's worth of records per partition.
    let mut consumer_config =
        kafka.prefetching_consumer_config(&spec.group, spec.transaction_max_records);
    consumer_config
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false");
    let consumer: StreamConsumer<MeteredConsumer> =
        consumer_config.create_with_context(MeteredConsumer::new(&spec.group))?;
    consumer.subscribe(&[&spec.input])?;
    let mut producer_config = kafka.producer_config();
    producer_config
        .set("transactional.id", transactional_id(kafka, &spec.group))
        .set("transaction.timeout.ms", "30000");
    // Deliveries need no per-record callback: the commit fails if any of them did.
    let producer: ThreadedProducer<DefaultProducerContext> = producer_config.create()?;
    tokio::task::block_in_place(|| producer.init_transactions(TXN_TIMEOUT))?;
    let mut stats = StageStats::default();
    let mut retry = crate::retry::Retry::new(spec.retry.clone(), name);
    let mut batch = Batch::default();
    let mut deadline = tokio::time::Instant::now() + spec.transaction_linger;
    let meters = Meters::of(name, spec);
    let receiver = Receiver::new(&consumer, spec.scope.as_deref(), name);
    tracing::info!(stage = name, input = %spec.input, output = %spec.output, group = %spec.group, "exactly-once stage started");

    loop {
        let due = batch.open
            && (batch.records >= spec.transaction_max_records.max(1)
                || tokio::time::Instant::now() >= deadline);
        if due {
            finish(name, &producer, &consumer, spec, &mut batch, &mut stats)?;
            continue;
        }
        let wake = if batch.open {
            deadline
        } else {
            tokio::time::Instant::now() + Duration::from_secs(3600)
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(wake) => {}
            (msg, admit) = receiver.next() => {
                let mut next = Some((msg, admit));
                let mut taken = 0;
                // Take what else is already fetched without going back through
                // `select!` (a wake-up per record costs more than the transforms), up to
                // the transaction's size.
                while let Some((msg, admit)) = next.take() {
                    receiver.throttle().await;
                    if !batch.open {
                        producer.begin_transaction()?;
                        batch.open = true;
                        deadline = tokio::time::Instant::now() + spec.transaction_linger;
                    }
                    let entry = batch.offsets.entry(msg.partition()).or_insert((msg.offset(), msg.offset()));
                    entry.1 = msg.offset() + 1;
                    batch.records += 1;
                    batch.stats.consumed += 1;
                    meters.records_in.increment(1);
                    // Outputs (or the dead letter) are produced in the open transaction.
                    let done = process(&*transform, &mut retry, spec, Held::Borrowed(msg), admit, &mut batch.stats, &meters).await;
                    drop(done.held);
                    for o in done.outputs {
                        produce(&producer, done.topic, o.key.as_deref(), &o.payload, o.headers).await?;
                    }
                    taken += 1;
                    if taken < super::BURST && batch.records < spec.transaction_max_records.max(1) {
                        next = receiver.next().now_or_never();
                    }
                }
            }
        }
    }
    if batch.open {
        finish(name, &producer, &consumer, spec, &mut batch, &mut stats)?;
    }
    close_within(consumer, &spec.group, CLOSE_WAIT).await;
    stats.log_stopped(name, run_started, "exactly-once stage stopped");
    Ok(stats)
}

/// Enqueue one record in the open transaction, waiting while the queue is full.
async fn produce(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: rdkafka::message::OwnedHeaders,
) -> Result<(), StageError> {
    let mut record = BaseRecord::to(topic).payload(payload).headers(headers);
    if let Some(k) = key {
        record = record.key(k);
    }
    // The commit waits for every delivery; no need to await each one here.
    super::produce::send_queued(producer, record)
        .await
        .map_err(|(e, _)| e.into())
}

/// Commit the open transaction with its offsets; on a failure that needs it, abort and
/// rewind to the batch's start, so the records are processed again in a new transaction.
fn finish(
    name: &'static str,
    producer: &ThreadedProducer<DefaultProducerContext>,
    consumer: &StreamConsumer<MeteredConsumer>,
    spec: &StageSpec,
    batch: &mut Batch,
    stats: &mut StageStats,
) -> Result<(), StageError> {
    let done = std::mem::take(batch);
    let mut next = TopicPartitionList::new();
    for (&p, &(_, n)) in &done.offsets {
        next.add_partition_offset(&spec.input, p, Offset::Offset(n))?;
    }
    let started = std::time::Instant::now();
    let result = tokio::task::block_in_place(|| -> Result<(), KafkaError> {
        let metadata = consumer
            .group_metadata()
            // Only missing before the consumer has a group; a defect, not a retry case.
            .ok_or(KafkaError::ConsumerCommit(RDKafkaErrorCode::InvalidGroupId))?;
        // Wait for the deliveries here: the flush inside the commit waits in 100 ms
        // steps when the producer's own thread serves the delivery reports.
        let flushed_by = std::time::Instant::now() + TXN_TIMEOUT;
        while producer.in_flight_count() > 0 && std::time::Instant::now() < flushed_by {
            std::thread::sleep(Duration::from_millis(1));
        }
        producer.send_offsets_to_transaction(&next, &metadata, TXN_TIMEOUT)?;
        producer.commit_transaction(TXN_TIMEOUT)
    });
    metrics::histogram!("sluice_stage_transaction_commit_seconds", "stage" => name)
        .record(started.elapsed().as_secs_f64());
    tracing::debug!(
        records = done.records,
        commit_ms = started.elapsed().as_millis() as u64,
        "transaction committed"
    );
    match result {
        Ok(()) => {
            stats.consumed += done.stats.consumed;
            stats.published += done.stats.published;
            stats.dead_lettered += done.stats.dead_lettered;
            Ok(())
        }
        Err(KafkaError::Transaction(e)) if !e.is_fatal() => {
            tracing::warn!(error = %e, records = done.records, "transaction failed; aborting and reprocessing the batch");
            tokio::task::block_in_place(|| producer.abort_transaction(TXN_TIMEOUT))?;
            for (&p, &(first, _)) in &done.offsets {
                // A partition revoked meanwhile is no longer ours: its next owner starts
                // from the last committed offset.
                if let Err(e) = consumer.seek(
                    &spec.input,
                    p,
                    Offset::Offset(first),
                    Duration::from_secs(5),
                ) {
                    tracing::debug!(partition = p, error = %e, "rewind skipped");
                }
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
