//! The stage runtime: consume one topic in a consumer group, transform each record,
//! publish the outputs to the next topic, and dead-letter what fails.
//!
//! At-least-once: an offset is stored for commit only once every output of it (and of
//! every earlier record of its partition) was acked by the broker. Records are
//! transformed in order and their outputs enqueued in order, so per-key order holds;
//! acks are awaited concurrently, up to `max_in_flight` records.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::consumer_metrics::MeteredConsumer;
use sluice_core::replay_scope::{Admit, ReplayScope};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::{DeadLetter, Failure};
use crate::offsets::OffsetTracker;

/// One record a transform produces for the stage's output topic.
#[derive(Debug, Clone)]
pub struct Output {
    /// Record key (decides the partition).
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub payload: Vec<u8>,
    /// Record headers.
    pub headers: OwnedHeaders,
}

/// What a stage does to each record.
pub trait Transform: Send + Sync + 'static {
    /// Name used in metrics, logs and dead-letter headers.
    fn name(&self) -> &'static str;
    /// Turn one input record into zero or more outputs, or say why it cannot be.
    fn process<M: Message>(&self, msg: &M) -> Result<Vec<Output>, Failure>;
}

/// Why a stage stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Where a stage reads from and writes to.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Consumer group.
    pub group: String,
    /// Topic consumed.
    pub input: String,
    /// Topic the outputs go to.
    pub output: String,
    /// Topic the dead letters go to.
    pub dlq: String,
    /// Most records awaiting broker acks at once.
    pub max_in_flight: usize,
    /// Longest wait for in-flight records when partitions are revoked or at shutdown.
    pub drain_timeout: Duration,
    /// Bounds of a replay run (end offsets, tenant, rate); `None` for a normal run.
    pub scope: Option<Arc<ReplayScope>>,
    /// Kafka transactions around read-process-write instead of at-least-once.
    pub exactly_once: bool,
    /// How transient failures are retried before a record is dead-lettered.
    pub retry: crate::retry::RetryPolicy,
}

/// The record being processed: borrowed from the consumer, or detached for retries.
pub(crate) enum Held<'a> {
    Borrowed(rdkafka::message::BorrowedMessage<'a>),
    Owned(rdkafka::message::OwnedMessage),
}

/// Counts of what a stage did, returned when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StageStats {
    /// Records consumed.
    pub consumed: u64,
    /// Output records published.
    pub published: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
}

/// A record enqueued to the producer, kept so it can be re-sent if its delivery fails.
struct Pending {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: OwnedHeaders,
}

/// Run `transform` as a stage until `shutdown` is cancelled; then drain in-flight
/// records, commit, and return what was done.
pub async fn run_stage<T: Transform>(
    kafka: &KafkaConfig,
    spec: &StageSpec,
    transform: Arc<T>,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    if spec.exactly_once {
        return crate::exactly_once::run_exactly_once(kafka, spec, transform, shutdown).await;
    }
    let name = transform.name();
    // Shared with the delivery tasks (which complete offsets) and the revoke hook (which
    // drains revoked partitions and commits them before they move to another replica).
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let hook_tracker = tracker.clone();
    let drain_timeout = spec.drain_timeout;
    let consumer = kafka.draining_consumer(
        &spec.group,
        Box::new(move |consumer, revoked| {
            drain_revoked(&hook_tracker, consumer, revoked, drain_timeout)
        }),
    )?;
    consumer.subscribe(&[&spec.input])?;
    let producer: FutureProducer = kafka.producer_config().create()?;
    let permits = Arc::new(Semaphore::new(spec.max_in_flight.max(1)));
    // Partitions whose committable offset moved: (partition, last done offset).
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(i32, i64)>();
    let mut stats = StageStats::default();
    let mut retry = crate::retry::Retry::new(spec.retry.clone(), name);
    tracing::info!(stage = name, input = %spec.input, output = %spec.output, group = %spec.group, "stage started");

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some((partition, through)) = done_rx.recv() => {
                store(&consumer, &spec.input, partition, through);
            }
            msg = consumer.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(stage = name, error = %e, "consume error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let admit = spec.scope.as_ref().map_or(Admit::Process, |s| s.admit(msg.partition(), msg.offset(), msg.headers()));
                if admit == Admit::PastEnd {
                    // A replay's end: leave the rest of this partition alone.
                    pause_partition(&consumer, msg.topic(), msg.partition());
                    continue;
                }
                if let Some(scope) = &spec.scope {
                    scope.throttle().await;
                }
                let permit = permits.clone().acquire_owned().await.expect("semaphore is never closed");
                stats.consumed += 1;
                metrics::counter!("sluice_stage_records_in_total", "stage" => name, "topic" => spec.input.clone()).increment(1);
                lock(&tracker).begin(msg.topic(), msg.partition(), msg.offset());
                let started = std::time::Instant::now();
                let mut result = match admit {
                    Admit::Process => transform.process(&msg),
                    _ => Ok(Vec::new()),
                };
                metrics::histogram!("sluice_stage_processing_duration_seconds", "stage" => name)
                    .record(started.elapsed().as_secs_f64());
                let mut attempts = 1;
                let msg = match &result {
                    // A transient failure: retry (the record is detached, as waiting must
                    // not hold the consumer's borrowed message).
                    Err(f) if f.transient => {
                        let owned = msg.detach();
                        drop(msg);
                        (result, attempts) = retry.run(&*transform, &owned, result).await;
                        Held::Owned(owned)
                    }
                    _ => Held::Borrowed(msg),
                };
                let pending = match result {
                    Ok(outputs) => {
                        stats.published += outputs.len() as u64;
                        metrics::counter!("sluice_stage_records_out_total", "stage" => name, "topic" => spec.output.clone())
                            .increment(outputs.len() as u64);
                        outputs
                            .into_iter()
                            .map(|o| Pending { topic: spec.output.clone(), key: o.key, payload: o.payload, headers: o.headers })
                            .collect()
                    }
                    Err(failure) => {
                        stats.dead_lettered += 1;
                        metrics::counter!("sluice_stage_dead_letters_total", "stage" => name, "reason" => failure.class)
                            .increment(1);
                        tracing::debug!(stage = name, %failure, attempts, "dead-lettered");
                        let dl = match &msg {
                            Held::Borrowed(m) => DeadLetter::of(m, name, &failure, attempts),
                            Held::Owned(m) => DeadLetter::of(m, name, &failure, attempts),
                        };
                        vec![Pending { topic: spec.dlq.clone(), key: dl.key, payload: dl.payload, headers: dl.headers }]
                    }
                };
                let (partition, offset) = match &msg {
                    Held::Borrowed(m) => (m.partition(), m.offset()),
                    Held::Owned(m) => (m.partition(), m.offset()),
                };
                drop(msg);
                let mut deliveries = Vec::with_capacity(pending.len());
                for p in pending {
                    deliveries.push(enqueue(&producer, p).await);
                }
                let (done, tracker, topic) = (done_tx.clone(), tracker.clone(), spec.input.clone());
                tokio::spawn(async move {
                    join_all(deliveries).await;
                    if let Some(through) = lock(&tracker).complete(&topic, partition, offset) {
                        let _ = done.send((partition, through));
                    }
                    drop(permit);
                });
            }
        }
    }

    // Drain: wait (bounded) for every in-flight record's acks, then commit.
    drop(done_tx);
    let deadline = tokio::time::Instant::now() + spec.drain_timeout;
    while lock(&tracker).in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while let Ok((partition, through)) = done_rx.try_recv() {
        store(&consumer, &spec.input, partition, through);
    }
    // A few tries: a coordinator that is busy (e.g. with the rebalance this shutdown
    // causes) would otherwise make the next owner repeat everything since the last
    // auto-commit.
    for attempt in 1..=3 {
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => break,
            // Nothing stored since the last auto-commit: nothing to do.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => break,
            Err(e) => {
                tracing::warn!(stage = name, attempt, error = %e, "final commit failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    tracing::info!(stage = name, ?stats, "stage stopped");
    Ok(stats)
}

fn store(consumer: &StreamConsumer<MeteredConsumer>, topic: &str, partition: i32, through: i64) {
    // Fails only for a partition revoked meanwhile; the revoke hook committed it.
    if let Err(e) = consumer.store_offset(topic, partition, through) {
        tracing::debug!(topic, partition, error = %e, "offset not stored");
    }
}

fn pause_partition(consumer: &StreamConsumer<MeteredConsumer>, topic: &str, partition: i32) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::debug!(topic, partition, error = %e, "pause");
    }
}

fn lock(tracker: &Mutex<OffsetTracker>) -> std::sync::MutexGuard<'_, OffsetTracker> {
    // A panic while holding the lock leaves counts that are still consistent.
    tracker
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Before partitions move to another replica: wait (bounded) until their in-flight
/// records are acked, then commit what is done, so the new owner neither skips nor
/// (beyond what timed out) repeats records.
fn drain_revoked(
    tracker: &Mutex<OffsetTracker>,
    consumer: &BaseConsumer<MeteredConsumer>,
    revoked: &TopicPartitionList,
    timeout: Duration,
) {
    let started = std::time::Instant::now();
    let parts: Vec<(String, i32)> = revoked
        .elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect();
    while parts
        .iter()
        .any(|(t, p)| lock(tracker).in_flight_of(t, *p) > 0)
    {
        if started.elapsed() > timeout {
            tracing::warn!(
                ?parts,
                "revoked partitions still had records in flight; the next owner repeats them"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut commit = TopicPartitionList::new();
    {
        let mut t = lock(tracker);
        for (topic, partition) in &parts {
            if let Some(through) = t.committable(topic, *partition) {
                let _ = commit.add_partition_offset(topic, *partition, Offset::Offset(through + 1));
            }
            t.forget(topic, *partition);
        }
    }
    if commit.count() > 0 {
        for attempt in 1..=3 {
            match consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => break,
                Err(e) if attempt == 3 => {
                    tracing::warn!(error = %e, "commit of revoked partitions failed; the next owner repeats from the last commit")
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "commit of revoked partitions failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    tracing::info!(partitions = parts.len(), drained_in = ?started.elapsed(), "revoked partitions drained");
}

/// Enqueue one record, waiting while the producer queue is full. Returns a future that
/// completes once the broker acked it, re-sending after a failed delivery.
async fn enqueue(
    producer: &FutureProducer,
    p: Pending,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let first = loop {
        match send(producer, &p) {
            Ok(d) => break d,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "produce failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let producer = producer.clone();
    async move {
        let mut delivery = first;
        let mut backoff = Duration::from_millis(100);
        loop {
            match delivery.await {
                Ok(Ok(_)) => return,
                Ok(Err((e, _))) => {
                    tracing::warn!(topic = %p.topic, error = %e, "delivery failed; re-sending")
                }
                Err(_) => tracing::warn!(topic = %p.topic, "delivery cancelled; re-sending"),
            }
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                match send(&producer, &p) {
                    Ok(d) => {
                        delivery = d;
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "re-send failed"),
                }
            }
        }
    }
}

fn send(
    producer: &FutureProducer,
    p: &Pending,
) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
    let mut record = FutureRecord::to(&p.topic)
        .payload(&p.payload)
        .headers(p.headers.clone());
    if let Some(k) = &p.key {
        record = record.key(k);
    }
    producer.send_result(record).map_err(|(e, _)| e)
}
