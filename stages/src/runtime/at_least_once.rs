//! The at-least-once stage runtime: consume one topic in a consumer group, transform
//! each record, publish the outputs to the next topic, and dead-letter what fails.
//!
//! At-least-once: an offset is stored for commit only once every output of it (and of
//! every earlier record of its partition) was acked by the broker. Records are
//! transformed in order and their outputs enqueued in order, so per-key order holds;
//! acks are awaited concurrently, up to `max_in_flight` records.
//!
//! A replay of the archive feeds the same loop in-process ([`run_fed`]): records read
//! from the archive are transformed and published as consumed ones are, without a
//! round trip through a topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::consume::{close_within, Receiver, CLOSE_WAIT};
use sluice_core::consumer_metrics::MeteredConsumer;
use sluice_core::events::{DeliveryRetrying, Emit, ProducerReplaced};
use sluice_core::replay_scope::Admit;
use tokio_util::sync::CancellationToken;

use super::produce::{lock, send_queued};
use crate::offsets::OffsetTracker;
use crate::transform::{process, Held, Meters, StageError, StageSpec, StageStats, Transform};

/// One consumed record whose outputs are on their way to the broker.
#[derive(Debug)]
struct InFlight {
    partition: i32,
    offset: i64,
    /// Outputs not acked yet.
    outputs: AtomicUsize,
    /// Bytes of its outputs, for the `max_in_flight_bytes` bound.
    bytes: usize,
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
    /// Bytes of their outputs, for the `max_in_flight_bytes` bound.
    in_flight_bytes: AtomicUsize,
    /// Committable positions that moved since the loop last stored them.
    moved: Mutex<HashMap<i32, i64>>,
    /// Outputs whose delivery failed, for the loop to re-send.
    failed: Mutex<Vec<Resend>>,
    /// Cancelled once a shutdown's drain time is over: ends the waits for the producer's
    /// queue, so shutdown is never stuck behind a broker that does not answer (but the
    /// drain still gets its time to deliver what it can).
    give_up: CancellationToken,
}

impl AckState {
    /// One output of `record` was acked.
    fn acked(&self, record: &InFlight) {
        if record.outputs.fetch_sub(1, Ordering::AcqRel) == 1 {
            let through =
                lock(&self.tracker).complete(&self.input, record.partition, record.offset);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.in_flight_bytes
                .fetch_sub(record.bytes, Ordering::AcqRel);
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

/// The stage loop's state.
struct Stage<'a, T: Transform> {
    kafka: &'a KafkaConfig,
    spec: &'a StageSpec,
    transform: &'a T,
    /// `None` when fed in-process: nothing to store offsets in.
    consumer: Option<&'a StreamConsumer<MeteredConsumer>>,
    producer: ThreadedProducer<Acks>,
    acks: Arc<AckState>,
    retry: crate::retry::Retry,
    stats: StageStats,
    meters: Meters,
    /// Ends the wait for room, so shutdown is never stuck behind a broker that does
    /// not acknowledge.
    shutdown: CancellationToken,
}

impl<T: Transform> Stage<'_, T> {
    /// Process one record and enqueue its outputs (or dead letter). Returns whether it
    /// took the record: not at shutdown while the in-flight bounds are reached.
    async fn handle(&mut self, msg: Held<'_>, admit: Admit) -> bool {
        // Bounded in records and in bytes: a burst of large records must not queue
        // max_in_flight of them.
        while self.acks.in_flight.load(Ordering::Acquire) >= self.spec.max_in_flight.max(1)
            || self.acks.in_flight_bytes.load(Ordering::Acquire)
                >= self.spec.max_in_flight_bytes.max(1)
        {
            // Not taken yet: nothing is tracked for it, a restart reads it again.
            if self.shutdown.is_cancelled() {
                return false;
            }
            self.settle().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.stats.consumed += 1;
        self.meters.records_in.increment(1);
        let (partition, offset) = msg.position();
        lock(&self.acks.tracker).begin(&self.spec.input, partition, offset);
        self.acks.in_flight.fetch_add(1, Ordering::AcqRel);
        let done = process(
            self.transform,
            &mut self.retry,
            self.spec,
            msg,
            admit,
            &mut self.stats,
            &self.meters,
        )
        .await;
        drop(done.held);
        let bytes = done.bytes;
        self.acks.in_flight_bytes.fetch_add(bytes, Ordering::AcqRel);
        let record = Arc::new(InFlight {
            partition,
            offset,
            outputs: AtomicUsize::new(done.outputs.len().max(1)),
            bytes,
        });
        // Nothing to wait for (e.g. filtered out by a replay): completed at once.
        if done.outputs.is_empty() {
            self.acks.acked(&record);
            return true;
        }
        for o in done.outputs {
            enqueue(
                &self.producer,
                &self.acks,
                done.topic,
                o.key.as_deref(),
                &o.payload,
                o.headers,
                &record,
            )
            .await;
        }
        true
    }

    async fn settle(&mut self) {
        self.settle_and(false).await;
    }

    /// [`Self::settle`] from the loop between bursts, when every record handed over has
    /// been tracked: positions past records the stage is never given are stored too
    /// (not in a replay, whose records past its end are handed over and left alone).
    async fn settle_between_bursts(&mut self) {
        self.settle_and(self.spec.scope.is_none()).await;
    }

    async fn settle_and(&mut self, past_gaps: bool) {
        let name = self.transform.name();
        settle(
            self.kafka,
            name,
            self.consumer,
            &mut self.producer,
            &self.acks,
            past_gaps,
        )
        .await;
    }
}

impl<'a, T: Transform> Stage<'a, T> {
    /// The loop's state for `transform`, publishing with a new producer; `consumer` is
    /// where completed offsets are stored (none when fed in-process).
    fn new(
        kafka: &'a KafkaConfig,
        spec: &'a StageSpec,
        transform: &'a T,
        consumer: Option<&'a StreamConsumer<MeteredConsumer>>,
        tracker: Arc<Mutex<OffsetTracker>>,
        shutdown: &CancellationToken,
    ) -> Result<Self, StageError> {
        let name = transform.name();
        let acks = Arc::new(AckState {
            input: spec.input.clone(),
            tracker,
            in_flight: AtomicUsize::new(0),
            in_flight_bytes: AtomicUsize::new(0),
            moved: Mutex::new(HashMap::new()),
            failed: Mutex::new(Vec::new()),
            give_up: CancellationToken::new(),
        });
        let producer: ThreadedProducer<Acks> = kafka
            .producer_config()
            .create_with_context(Acks(acks.clone()))?;
        // Exported at 0 from the start, so an alert on its increase has a series to watch.
        metrics::counter!("sluice_stage_producer_replacements_total", "stage" => name).increment(0);
        Ok(Self {
            kafka,
            spec,
            transform,
            consumer,
            producer,
            acks,
            retry: crate::retry::Retry::new(spec.retry.clone(), name),
            stats: StageStats::default(),
            meters: Meters::of(name, spec),
            shutdown: shutdown.clone(),
        })
    }

    /// Wait until every in-flight record is acked, settling meanwhile; past `deadline`
    /// the waits for the producer's queue end too (what is still in flight is left
    /// uncommitted, for the next run to repeat).
    async fn drain(&mut self, deadline: tokio::time::Instant) {
        let give_up = self.acks.give_up.clone();
        // Aborted with the drain, also when the drain itself is dropped.
        let _timer = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            give_up.cancel();
        }));
        while self.acks.in_flight.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            self.settle().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.settle().await;
    }
}

/// Run `transform` as a stage until `shutdown` is cancelled; then drain in-flight
/// records, commit, and return what was done.
pub async fn run<T: Transform>(
    kafka: &KafkaConfig,
    spec: &StageSpec,
    transform: Arc<T>,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    let run_started = std::time::Instant::now();
    let name = transform.name();
    // Shared with the delivery callbacks (which complete offsets) and the revoke hook
    // (which drains revoked partitions and commits them before they move on).
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let hook_tracker = tracker.clone();
    let drain_timeout = spec.drain_timeout;
    let consumer = kafka.draining_consumer(
        &spec.group,
        spec.max_in_flight,
        Box::new(move |consumer, revoked| {
            drain_revoked(&hook_tracker, consumer, revoked, drain_timeout)
        }),
    )?;
    consumer.subscribe(&[&spec.input])?;
    let receiver = Receiver::new(&consumer, spec.scope.as_deref(), name);
    let mut stage = Stage::new(
        kafka,
        spec,
        &*transform,
        Some(&consumer),
        tracker,
        &shutdown,
    )?;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(stage = name, input = %spec.input, output = %spec.output, group = %spec.group, "stage started");

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => stage.settle_between_bursts().await,
            first = receiver.next() => {
                let mut burst = super::Burst::default();
                let mut next = Some(first);
                while let Some((msg, admit)) = next.take() {
                    receiver.throttle().await;
                    let took = stage.handle(Held::Borrowed(msg), admit).await;
                    if burst.goes_on(took) {
                        next = receiver.next().now_or_never();
                    }
                }
            }
        }
    }

    // Drain: wait (bounded) for every in-flight record's acks, then commit.
    stage
        .drain(tokio::time::Instant::now() + spec.drain_timeout)
        .await;
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
    let stats = stage.stats;
    drop(stage);
    close_within(consumer, &spec.group, CLOSE_WAIT).await;
    stats.log_stopped(name, run_started, "stage stopped");
    Ok(stats)
}

/// Run `transform` over the records of `spec.feed` (a replay of the archive) until they
/// end, publishing outputs and dead letters as a consuming run does; then wait for every
/// ack. At `shutdown` it stops taking records and drains as [`run`] does. An error
/// if an output is still undelivered at the end.
pub async fn run_fed<T: Transform>(
    kafka: &KafkaConfig,
    spec: &StageSpec,
    transform: Arc<T>,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    let run_started = std::time::Instant::now();
    let name = transform.name();
    let mut records = spec
        .feed
        .as_ref()
        .and_then(sluice_core::wiring::Feed::take)
        .ok_or_else(|| StageError::Settings("no records to feed the stage".into()))?;
    let scope = spec.scope.as_deref();
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let mut stage = Stage::new(kafka, spec, &*transform, None, tracker, &shutdown)?;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(stage = name, output = %spec.output, replay = %spec.group, "stage fed in-process");
    'feed: loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => stage.settle().await,
            batch = records.recv() => {
                let Some(batch) = batch else { break };
                for msg in batch {
                    if shutdown.is_cancelled() {
                        break 'feed;
                    }
                    let admit = scope.map_or(Admit::Process, |s| {
                        s.admit(msg.partition(), msg.offset(), msg.headers())
                    });
                    if admit == Admit::PastEnd {
                        continue;
                    }
                    if let Some(s) = scope {
                        s.throttle().await;
                    }
                    if !stage.handle(Held::Owned(msg), admit).await {
                        break 'feed;
                    }
                }
            }
        }
    }
    // At the feed's end every output is waited for; at a shutdown, the usual drain time.
    let deadline = if shutdown.is_cancelled() {
        tokio::time::Instant::now() + spec.drain_timeout
    } else {
        tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
    };
    tokio::select! {
        () = stage.drain(deadline) => {}
        () = shutdown.cancelled() => {
            stage.drain(tokio::time::Instant::now() + spec.drain_timeout).await;
        }
    }
    let stats = stage.stats;
    stats.log_stopped(name, run_started, "fed stage stopped");
    if stage.acks.in_flight.load(Ordering::Acquire) > 0 && !shutdown.is_cancelled() {
        return Err(StageError::Undelivered(spec.output.clone()));
    }
    Ok(stats)
}

fn store(consumer: &StreamConsumer<MeteredConsumer>, topic: &str, partition: i32, through: i64) {
    // Fails only for a partition revoked meanwhile; the revoke hook committed it.
    if let Err(e) = consumer.store_offset(topic, partition, through) {
        tracing::debug!(topic, partition, error = %e, "offset not stored");
    }
}

/// Store the consumer's position where it passed records the stage is never given
/// (transaction markers and aborted records of a transactional input) with nothing in
/// flight (see [`OffsetTracker::skip_to`]). Only between bursts, when every record
/// handed over is tracked.
fn store_past_gaps(consumer: &StreamConsumer<MeteredConsumer>, acks: &AckState) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    let mut skipped = TopicPartitionList::new();
    {
        let mut t = lock(&acks.tracker);
        for e in positions.elements() {
            if let Offset::Offset(next) = e.offset() {
                if t.skip_to(e.topic(), e.partition(), next) {
                    let _ = skipped.add_partition_offset(
                        e.topic(),
                        e.partition(),
                        Offset::Offset(next),
                    );
                }
            }
        }
    }
    if skipped.count() > 0 {
        if let Err(e) = consumer.store_offsets(&skipped) {
            tracing::debug!(error = %e, "positions past skipped records not stored");
        }
    }
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
    if consumer.assignment_lost() {
        // The group already gave the partitions away (this member's session expired,
        // e.g. while the broker did not answer): a commit under the old generation is
        // refused, and a synchronous one waits on the coordinator for as long as it is
        // gone, holding this thread. The next owner repeats from the last commit.
        let mut t = lock(tracker);
        for (topic, partition) in &parts {
            t.forget(topic, *partition);
        }
        tracing::warn!(
            partitions = parts.len(),
            "assignment lost; the next owner repeats what was not committed"
        );
        return;
    }
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
        // Stored too: librdkafka commits the *stored* offsets of removed partitions once
        // the assignment changes (auto-commit), which would otherwise move this commit
        // back to the last offset the stage loop stored, up to `max_in_flight` records.
        if let Err(e) = consumer.store_offsets(&commit) {
            tracing::debug!(error = %e, "offsets of revoked partitions not stored");
        }
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
    tracing::info!(
        partitions = parts.len(),
        drained_in_ms = started.elapsed().as_millis() as u64,
        "revoked partitions drained"
    );
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
                // Left unacked: its offset is not committed, a restart processes it again.
                if acks.give_up.is_cancelled() {
                    return;
                }
                r = back;
                let retry_in = Duration::from_millis(200);
                DeliveryRetrying {
                    topic,
                    error: &e.to_string(),
                    retry_in,
                }
                .emit();
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

/// Store the offsets that became committable; replace a producer that failed for good
/// (e.g. an idempotence error after the broker lost its producer state); re-send the
/// outputs whose delivery failed.
async fn settle(
    kafka: &KafkaConfig,
    stage: &'static str,
    consumer: Option<&StreamConsumer<MeteredConsumer>>,
    producer: &mut ThreadedProducer<Acks>,
    acks: &Arc<AckState>,
    past_gaps: bool,
) {
    let moved = std::mem::take(&mut *lock(&acks.moved));
    if let Some(consumer) = consumer {
        for (partition, through) in moved {
            store(consumer, &acks.input, partition, through);
        }
        if past_gaps {
            store_past_gaps(consumer, acks);
        }
    }
    if let Some((_, reason)) = producer.client().fatal_error() {
        match kafka
            .producer_config()
            .create_with_context(Acks(acks.clone()))
        {
            Ok(fresh) => {
                ProducerReplaced {
                    stage: Some(stage),
                    reason: &reason,
                }
                .emit();
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
