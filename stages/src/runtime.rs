//! The stage runtime: consume one topic in a consumer group, transform each record,
//! publish the outputs to the next topic, and dead-letter what fails.
//!
//! At-least-once: an offset is stored for commit only once every output of it (and of
//! every earlier record of its partition) was acked by the broker. Records are
//! transformed in order and their outputs enqueued in order, so per-key order holds;
//! acks are awaited concurrently, up to `max_in_flight` records.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::consumer_metrics::MeteredConsumer;
use sluice_core::replay_scope::{Admit, ReplayScope};
use tokio_util::sync::CancellationToken;

use crate::offsets::OffsetTracker;
use sluice_core::failure::{DeadLetter, Failure};

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
    /// Reading a range of a topic failed.
    #[error("{0}")]
    Admin(#[from] sluice_core::kafka::KafkaAdminError),
    /// An output does not encode (a defect of the stage).
    #[error("encoding an output: {0}")]
    Encode(String),
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
    /// Exactly-once: most records in one transaction.
    pub transaction_max_records: usize,
    /// Exactly-once: longest a transaction stays open.
    pub transaction_linger: Duration,
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

/// One consumed record whose outputs are on their way to the broker.
#[derive(Debug)]
struct InFlight {
    partition: i32,
    offset: i64,
    /// Outputs not acked yet.
    outputs: AtomicUsize,
}

/// An output whose delivery failed, kept to be sent again.
struct Resend {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: OwnedHeaders,
    record: Arc<InFlight>,
}

/// What the delivery callbacks share with the stage loop. It outlives a producer: a
/// producer that fails for good is replaced, and its undelivered outputs re-sent.
struct AckState {
    input: String,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Records in flight, for the `max_in_flight` bound.
    in_flight: AtomicUsize,
    /// Committable positions that moved since the loop last stored them.
    moved: Mutex<HashMap<i32, i64>>,
    /// Outputs whose delivery failed, for the loop to re-send.
    failed: Mutex<Vec<Resend>>,
}

impl AckState {
    /// One output of `record` was acked.
    fn acked(&self, record: &InFlight) {
        if record.outputs.fetch_sub(1, Ordering::AcqRel) == 1 {
            let through =
                lock(&self.tracker).complete(&self.input, record.partition, record.offset);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            if let Some(through) = through {
                lock(&self.moved).insert(record.partition, through);
            }
        }
    }
}

/// The producer's delivery callbacks: they complete offsets on the producer's polling
/// thread, so an ack wakes no task (a wake-up per record cost more than the transforms),
/// and they work while the consumer's rebalance callback waits for a drain.
struct Acks(Arc<AckState>);

impl rdkafka::ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = Arc<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, record: Arc<InFlight>) {
        match result {
            Ok(_) => self.0.acked(&record),
            Err((e, msg)) => {
                tracing::warn!(topic = msg.topic(), error = %e, "delivery failed; re-sending");
                lock(&self.0.failed).push(Resend {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().unwrap_or_default().to_vec(),
                    headers: msg.headers().map(|h| h.detach()).unwrap_or_default(),
                    record,
                });
            }
        }
    }
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
    // Shared with the delivery callbacks (which complete offsets) and the revoke hook
    // (which drains revoked partitions and commits them before they move on).
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
    let acks = Arc::new(AckState {
        input: spec.input.clone(),
        tracker: tracker.clone(),
        in_flight: AtomicUsize::new(0),
        moved: Mutex::new(HashMap::new()),
        failed: Mutex::new(Vec::new()),
    });
    let mut producer: ThreadedProducer<Acks> = kafka
        .producer_config()
        .create_with_context(Acks(acks.clone()))?;
    let max_in_flight = spec.max_in_flight.max(1);
    let mut stats = StageStats::default();
    let mut retry = crate::retry::Retry::new(spec.retry.clone(), name);
    // Handles resolved once: a labelled lookup per record is measurable.
    let records_in = metrics::counter!("sluice_stage_records_in_total", "stage" => name, "topic" => spec.input.clone());
    let records_out = metrics::counter!("sluice_stage_records_out_total", "stage" => name, "topic" => spec.output.clone());
    let processing =
        metrics::histogram!("sluice_stage_processing_duration_seconds", "stage" => name);
    let replacements =
        metrics::counter!("sluice_stage_producer_replacements_total", "stage" => name);
    // Exported at 0 from the start, so an alert on its increase has a series to watch.
    replacements.increment(0);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(stage = name, input = %spec.input, output = %spec.output, group = %spec.group, "stage started");

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                settle(kafka, &replacements, &consumer, &mut producer, &acks).await;
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
                while acks.in_flight.load(Ordering::Acquire) >= max_in_flight {
                    settle(kafka, &replacements, &consumer, &mut producer, &acks).await;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                stats.consumed += 1;
                records_in.increment(1);
                lock(&tracker).begin(msg.topic(), msg.partition(), msg.offset());
                acks.in_flight.fetch_add(1, Ordering::AcqRel);
                let started = std::time::Instant::now();
                let mut result = match admit {
                    Admit::Process => transform.process(&msg),
                    _ => Ok(Vec::new()),
                };
                processing.record(started.elapsed().as_secs_f64());
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
                let (outputs, topic) = match result {
                    Ok(outputs) => {
                        stats.published += outputs.len() as u64;
                        records_out.increment(outputs.len() as u64);
                        (stamped(outputs, spec), &spec.output)
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
                        (vec![Output { key: dl.key, payload: dl.payload, headers: dl.headers }], &spec.dlq)
                    }
                };
                let (partition, offset) = match &msg {
                    Held::Borrowed(m) => (m.partition(), m.offset()),
                    Held::Owned(m) => (m.partition(), m.offset()),
                };
                drop(msg);
                // Nothing to wait for (e.g. filtered out by a replay): completed at once.
                let record = Arc::new(InFlight { partition, offset, outputs: AtomicUsize::new(outputs.len().max(1)) });
                if outputs.is_empty() {
                    acks.acked(&record);
                    continue;
                }
                for o in outputs {
                    enqueue(&producer, &acks, topic, o.key.as_deref(), &o.payload, o.headers, &record).await;
                }
            }
        }
    }

    // Drain: wait (bounded) for every in-flight record's acks, then commit.
    let deadline = tokio::time::Instant::now() + spec.drain_timeout;
    while acks.in_flight.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
        settle(kafka, &replacements, &consumer, &mut producer, &acks).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    settle(kafka, &replacements, &consumer, &mut producer, &acks).await;
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

/// Stamp a record's outputs with this processing (and the replay running it, if any).
pub(crate) fn stamped(outputs: Vec<Output>, spec: &StageSpec) -> Vec<Output> {
    let now = sluice_core::now_ms();
    let replay = spec.scope.is_some().then_some(spec.group.as_str());
    outputs
        .into_iter()
        .map(|o| Output {
            headers: sluice_core::headers::stamp(o.headers, now, replay),
            ..o
        })
        .collect()
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves counts that are still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// Enqueue one output of `record`, waiting while the producer queue is full; its
/// delivery callback completes it. A producer that failed for good takes nothing more:
/// the output waits, with the failed ones, for its replacement.
async fn enqueue(
    producer: &ThreadedProducer<Acks>,
    acks: &AckState,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: OwnedHeaders,
    record: &Arc<InFlight>,
) {
    let mut r = BaseRecord::with_opaque_to(topic, record.clone())
        .payload(payload)
        .headers(headers);
    if let Some(k) = key {
        r = r.key(k);
    }
    loop {
        match send_queued(producer, r).await {
            Ok(()) => return,
            Err((e, back)) => {
                if producer.client().fatal_error().is_some() {
                    lock(&acks.failed).push(Resend {
                        topic: topic.to_string(),
                        key: key.map(<[u8]>::to_vec),
                        payload: payload.to_vec(),
                        headers: back.headers.unwrap_or_default(),
                        record: record.clone(),
                    });
                    return;
                }
                r = back;
                tracing::warn!(topic, error = %e, "produce failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

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

/// Store the offsets that became committable; replace a producer that failed for good
/// (e.g. an idempotence error after the broker lost its producer state); re-send the
/// outputs whose delivery failed.
async fn settle(
    kafka: &KafkaConfig,
    replacements: &metrics::Counter,
    consumer: &StreamConsumer<MeteredConsumer>,
    producer: &mut ThreadedProducer<Acks>,
    acks: &Arc<AckState>,
) {
    let moved = std::mem::take(&mut *lock(&acks.moved));
    for (partition, through) in moved {
        store(consumer, &acks.input, partition, through);
    }
    if let Some((code, reason)) = producer.client().fatal_error() {
        tracing::warn!(
            ?code,
            reason,
            "the producer failed for good; replacing it and re-sending what it had not delivered"
        );
        match kafka
            .producer_config()
            .create_with_context(Acks(acks.clone()))
        {
            Ok(fresh) => {
                replacements.increment(1);
                let old = std::mem::replace(producer, fresh);
                // Dropping it purges its queue: every output still in it comes back
                // through its delivery callback as failed, to be re-sent below.
                let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot create a producer; retrying"),
        }
    }
    let failed = std::mem::take(&mut *lock(&acks.failed));
    if !failed.is_empty() {
        // Let a broker that failed them recover a little before trying again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for f in failed {
        enqueue(
            producer,
            acks,
            &f.topic,
            f.key.as_deref(),
            &f.payload,
            f.headers,
            &f.record,
        )
        .await;
    }
}
