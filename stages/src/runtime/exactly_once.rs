//! The exactly-once stage runtime: Kafka transactions around read-process-write.
//!
//! Records are consumed `read_committed`, transformed, and their outputs (and dead
//! letters) produced inside a transaction, together with the consumed offsets
//! (`send_offsets_to_transaction`). Committing the transaction publishes both at once, so a
//! crash or a rebalance either publishes a batch and its offsets or neither: downstream
//! `read_committed` consumers see every output exactly once.
//!
//! Before partitions are revoked, the revoke callback commits the open transaction (or
//! aborts it), while the group's generation is still the one its records were read in:
//! otherwise the partitions' next owner (or this member, re-assigned at the committed
//! offset) would process the open transaction's records again, and both copies would be
//! committed.
//!
//! A failed commit aborts the transaction and rewinds the partitions still owned to the
//! batch's first offsets (a rewind that fails there stops the stage: going on would
//! commit past the aborted records); a fenced producer (another instance took over the
//! transactional id) stops the stage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::consume::{close_within, Receiver, CLOSE_WAIT};
use sluice_core::consumer_metrics::MeteredConsumer;
use tokio_util::sync::CancellationToken;

use super::produce::lock;
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

/// What the stage loop and the revoke callback share. The callback runs inside the
/// loop's own poll of the consumer, so neither waits on the other's lock.
struct Txn {
    name: &'static str,
    input: String,
    producer: ThreadedProducer<DefaultProducerContext>,
    batch: Mutex<Batch>,
    /// What committed transactions did.
    stats: Mutex<StageStats>,
    /// Why the revoke callback could not settle the open transaction, for the loop to stop on.
    failed: Mutex<Option<StageError>>,
}

impl Txn {
    /// Commit the open transaction, if any (or abort it and rewind the partitions that
    /// stay, all but `leaving`).
    fn settle<C: Consumer<MeteredConsumer>>(
        &self,
        consumer: &C,
        leaving: Option<&TopicPartitionList>,
    ) -> Result<(), StageError> {
        let done = std::mem::take(&mut *lock(&self.batch));
        if !done.open {
            return Ok(());
        }
        let committed = finish(self, consumer, done, leaving)?;
        *lock(&self.stats) += committed;
        Ok(())
    }

    /// The revoke callback: settle the open transaction before `revoked` go.
    fn on_revoke(&self, consumer: &BaseConsumer<MeteredConsumer>, revoked: &TopicPartitionList) {
        if let Err(e) = self.settle(consumer, Some(revoked)) {
            tracing::error!(stage = self.name, error = %e, "cannot settle the open transaction before a rebalance");
            lock(&self.failed).get_or_insert(e);
        }
    }
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
    let mut producer_config = kafka.producer_config();
    producer_config
        .set("transactional.id", transactional_id(kafka, &spec.group))
        .set("transaction.timeout.ms", "30000");
    // Deliveries need no per-record callback: the commit fails if any of them did.
    let producer: ThreadedProducer<DefaultProducerContext> = producer_config.create()?;
    tokio::task::block_in_place(|| producer.init_transactions(TXN_TIMEOUT))?;
    let txn = Arc::new(Txn {
        name,
        input: spec.input.clone(),
        producer,
        batch: Mutex::default(),
        stats: Mutex::default(),
        failed: Mutex::default(),
    });
    let hook_txn = txn.clone();
    let context =
        MeteredConsumer::new(&spec.group).with_revoke_hook(Box::new(move |consumer, revoked| {
            hook_txn.on_revoke(consumer, revoked)
        }));
    let consumer: StreamConsumer<MeteredConsumer> = consumer_config.create_with_context(context)?;
    consumer.subscribe(&[&spec.input])?;
    let mut retry = crate::retry::Retry::new(spec.retry.clone(), name);
    let mut deadline = tokio::time::Instant::now() + spec.transaction_linger;
    let meters = Meters::of(name, spec);
    let receiver = Receiver::new(&consumer, spec.scope.as_deref(), name);
    tracing::info!(stage = name, input = %spec.input, output = %spec.output, group = %spec.group, "exactly-once stage started");

    loop {
        if let Some(e) = lock(&txn.failed).take() {
            return Err(e);
        }
        let (open, records) = {
            let b = lock(&txn.batch);
            (b.open, b.records)
        };
        let due = open
            && (records >= spec.transaction_max_records.max(1)
                || tokio::time::Instant::now() >= deadline);
        if due {
            txn.settle(&consumer, None)?;
            continue;
        }
        let wake = if open {
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
                let mut burst = super::Burst::default();
                // Take what else is already fetched without going back through
                // `select!` (a wake-up per record costs more than the transforms), up to
                // the transaction's size.
                while let Some((msg, admit)) = next.take() {
                    receiver.throttle().await;
                    // A revoke callback (inside `receiver.next()`) may have settled the
                    // transaction since the last record: then this one opens a new one.
                    let records = {
                        let mut b = lock(&txn.batch);
                        if !b.open {
                            txn.producer.begin_transaction()?;
                            b.open = true;
                            deadline = tokio::time::Instant::now() + spec.transaction_linger;
                        }
                        let entry = b.offsets.entry(msg.partition()).or_insert((msg.offset(), msg.offset()));
                        entry.1 = msg.offset() + 1;
                        b.records += 1;
                        b.stats.consumed += 1;
                        b.records
                    };
                    meters.records_in.increment(1);
                    // Outputs (or the dead letter) are produced in the open transaction.
                    let mut counted = StageStats::default();
                    let done = process(&*transform, &mut retry, spec, Held::Borrowed(msg), admit, &mut counted, &meters).await;
                    drop(done.held);
                    for o in done.outputs {
                        produce(&txn.producer, done.topic, o.key.as_deref(), &o.payload, o.headers).await?;
                    }
                    lock(&txn.batch).stats += counted;
                    if burst.goes_on(true) && records < spec.transaction_max_records.max(1) {
                        next = receiver.next().now_or_never();
                    }
                }
            }
        }
    }
    txn.settle(&consumer, None)?;
    close_within(consumer, &spec.group, CLOSE_WAIT).await;
    if let Some(e) = lock(&txn.failed).take() {
        return Err(e);
    }
    let stats = *lock(&txn.stats);
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

/// Commit the transaction `done` with its offsets, and return what it did; on a failure
/// that needs it, abort, and rewind the partitions that stay (all but `leaving`) to the
/// batch's start, so their records are processed again in a new transaction.
fn finish<C: Consumer<MeteredConsumer>>(
    txn: &Txn,
    consumer: &C,
    done: Batch,
    leaving: Option<&TopicPartitionList>,
) -> Result<StageStats, StageError> {
    let producer = &txn.producer;
    let mut next = TopicPartitionList::new();
    for (&p, &(_, n)) in &done.offsets {
        next.add_partition_offset(&txn.input, p, Offset::Offset(n))?;
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
    metrics::histogram!("sluice_stage_transaction_commit_seconds", "stage" => txn.name)
        .record(started.elapsed().as_secs_f64());
    tracing::debug!(
        records = done.records,
        commit_ms = started.elapsed().as_millis() as u64,
        before_revoke = leaving.is_some(),
        "transaction committed"
    );
    match result {
        Ok(()) => Ok(done.stats),
        Err(KafkaError::Transaction(e)) if !e.is_fatal() => {
            tracing::warn!(error = %e, records = done.records, "transaction failed; aborting and reprocessing the batch");
            tokio::task::block_in_place(|| producer.abort_transaction(TXN_TIMEOUT))?;
            let leaves = |p| leaving.is_some_and(|l| l.find_partition(&txn.input, p).is_some());
            rewind(
                &txn.input,
                &done.offsets,
                leaves,
                |p, first| {
                    consumer.seek(&txn.input, p, Offset::Offset(first), Duration::from_secs(5))
                },
                |p| owns(consumer, &txn.input, p),
            )?;
            Ok(StageStats::default())
        }
        Err(e) => Err(e.into()),
    }
}

/// Rewind the partitions of an aborted batch to their first offsets (`offsets`: first
/// and next per partition), all but those `leaving`. A rewind that fails on a partition
/// still `owned` is an error: its position is past the aborted records, and the next
/// transaction would commit over them (the stage stops and restarts from its committed
/// offsets). One that fails on a partition revoked meanwhile is skipped: its next owner
/// starts from the last committed offset.
fn rewind(
    topic: &str,
    offsets: &HashMap<i32, (i64, i64)>,
    leaving: impl Fn(i32) -> bool,
    mut seek: impl FnMut(i32, i64) -> Result<(), KafkaError>,
    owned: impl Fn(i32) -> bool,
) -> Result<(), StageError> {
    for (&p, &(first, _)) in offsets {
        if leaving(p) {
            continue;
        }
        let Err(e) = seek(p, first) else {
            continue;
        };
        if owned(p) {
            return Err(StageError::Rewind {
                topic: topic.to_string(),
                partition: p,
                offset: first,
                source: e,
            });
        }
        tracing::debug!(partition = p, error = %e, "rewind skipped: partition revoked");
    }
    Ok(())
}

/// Whether the consumer still owns `topic` [`partition`]; when its assignment cannot be
/// read, it is taken to (the safe side: a failed rewind then stops the stage).
fn owns<C: Consumer<MeteredConsumer>>(consumer: &C, topic: &str, partition: i32) -> bool {
    consumer
        .assignment()
        .map_or(true, |a| a.find_partition(topic, partition).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> KafkaError {
        KafkaError::Seek("Local: Erroneous state".into())
    }

    /// An aborted batch's partitions go back to their first offsets; a seek that fails on
    /// a partition still owned stops the stage (its position is past the aborted records),
    /// one that fails on a partition revoked meanwhile, or one leaving, is left alone.
    #[test]
    fn a_failed_rewind_of_an_owned_partition_is_an_error() {
        let offsets = HashMap::from([(0, (10, 20)), (1, (30, 40)), (2, (50, 60))]);
        let mut sought = Vec::new();
        let ok = rewind(
            "t",
            &offsets,
            |p| p == 2,
            |p, first| {
                sought.push((p, first));
                Ok(())
            },
            |_| true,
        );
        assert!(ok.is_ok());
        sought.sort();
        assert_eq!(
            sought,
            [(0, 10), (1, 30)],
            "the leaving partition is not sought"
        );

        let revoked = rewind("t", &offsets, |_| false, |_, _| Err(failed()), |_| false);
        assert!(
            revoked.is_ok(),
            "revoked meanwhile: its next owner starts from the commit"
        );

        let owned = rewind(
            "t",
            &offsets,
            |_| false,
            |p, _| if p == 1 { Err(failed()) } else { Ok(()) },
            |_| true,
        );
        match owned {
            Err(StageError::Rewind {
                partition, offset, ..
            }) => assert_eq!((partition, offset), (1, 30)),
            other => panic!("{other:?}"),
        }
    }
}
