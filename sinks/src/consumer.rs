//! The sink loop shared by every sink: consume enriched events in batches bounded by
//! count and linger time, write each batch, dead-letter the records that can never be
//! written, and only then commit the batch's offsets.
//!
//! A transient failure (database or cluster unavailable) retries the same batch with
//! exponential backoff and jitter, and nothing is committed meanwhile: no loss. Writers
//! are idempotent, so a re-delivered batch after a crash creates no duplicates.

use std::collections::HashMap;
use std::time::Duration;

use rand::Rng;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_schemas::{EnrichedEvent, ENRICHED_EVENTS};
use sluice_stages::{DeadLetter, Failure};
use tokio_util::sync::CancellationToken;

/// A failure of a whole batch write.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Worth retrying the same batch later (server down, connection lost, overloaded).
    #[error("transient: {0}")]
    Transient(String),
    /// Not worth retrying: the sink must stop (e.g. wrong credentials, missing schema).
    #[error("fatal: {0}")]
    Fatal(String),
}

/// A destination for batches of enriched events.
pub trait BatchWriter: Send {
    /// Name used in metrics, logs and dead-letter headers.
    fn name(&self) -> &'static str;
    /// Write `events` idempotently. Returns the indices of events that can never be
    /// written, with why; they are dead-lettered and the rest count as written.
    fn write(
        &mut self,
        events: &[EnrichedEvent],
    ) -> impl std::future::Future<Output = Result<Vec<(usize, Failure)>, WriteError>> + Send;
}

/// Why a sink stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The writer hit a fatal error.
    #[error("{sink} sink: {source}")]
    Write {
        /// The sink.
        sink: &'static str,
        /// The error.
        source: WriteError,
    },
}

/// Where a sink reads from and how it batches.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    /// Consumer group.
    pub group: String,
    /// Topic of enriched events.
    pub input: String,
    /// Dead-letter topic.
    pub dlq: String,
    /// Most events in one batch.
    pub batch_size: usize,
    /// Longest wait for a batch to fill.
    pub linger: Duration,
}

/// Counts of what a sink did, returned when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SinkStats {
    /// Records consumed.
    pub consumed: u64,
    /// Events written (including ones already present: writes are idempotent).
    pub written: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Batches written.
    pub batches: u64,
}

/// Run a sink until `shutdown` is cancelled. The batch being written when it is
/// cancelled is finished (or, while the destination is down, left uncommitted).
pub async fn run_sink<W: BatchWriter>(
    kafka: &KafkaConfig,
    spec: &SinkSpec,
    mut writer: W,
    shutdown: CancellationToken,
) -> Result<SinkStats, SinkError> {
    let name = writer.name();
    let consumer: StreamConsumer = kafka.consumer_config(&spec.group).create()?;
    consumer.subscribe(&[&spec.input])?;
    let producer: FutureProducer = kafka.producer_config().create()?;
    let mut stats = SinkStats::default();
    // Records received while paused, for the next batch.
    let mut carry: Vec<OwnedMessage> = Vec::new();
    tracing::info!(sink = name, input = %spec.input, group = %spec.group, "sink started");

    'batches: loop {
        let Some(batch) = next_batch(&consumer, spec, &shutdown, &mut carry).await else {
            break;
        };
        stats.consumed += batch.len() as u64;
        metrics::histogram!("sluice_sink_batch_size_records", "sink" => name)
            .record(batch.len() as f64);

        // Decode; what does not decode is dead-lettered without reaching the writer.
        let mut events = Vec::with_capacity(batch.len());
        let mut sources = Vec::with_capacity(batch.len());
        let mut dead: Vec<(usize, Failure)> = Vec::new();
        for (i, msg) in batch.iter().enumerate() {
            match ENRICHED_EVENTS.decode(msg.payload().unwrap_or_default()) {
                Ok(e) => {
                    events.push(e);
                    sources.push(i);
                }
                Err(e) => dead.push((i, Failure::new("decode", e.to_string()))),
            }
        }

        let mut backoff = Duration::from_millis(100);
        let failures = loop {
            let started = std::time::Instant::now();
            match writer.write(&events).await {
                Ok(f) => {
                    if backoff > Duration::from_millis(100) {
                        resume(&consumer);
                    }
                    metrics::histogram!("sluice_sink_write_duration_seconds", "sink" => name)
                        .record(started.elapsed().as_secs_f64());
                    break f;
                }
                Err(WriteError::Transient(why)) => {
                    metrics::counter!("sluice_sink_retries_total", "sink" => name).increment(1);
                    tracing::warn!(sink = name, error = %why, retry_in = ?backoff, "write failed; retrying the batch");
                    let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            tracing::warn!(sink = name, "stopping with an unwritten batch; it stays uncommitted");
                            break 'batches;
                        }
                        _ = wait_paused(&consumer, &mut carry, backoff + Duration::from_millis(jitter)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(fatal) => {
                    return Err(SinkError::Write {
                        sink: name,
                        source: fatal,
                    })
                }
            }
        };
        stats.written += (events.len() - failures.len()) as u64;
        dead.extend(failures.into_iter().map(|(i, f)| (sources[i], f)));
        for (i, failure) in &dead {
            metrics::counter!("sluice_sink_dead_letters_total", "sink" => name, "class" => failure.class).increment(1);
            tracing::debug!(sink = name, %failure, "dead-lettered");
            send_dead_letter(
                &producer,
                &spec.dlq,
                DeadLetter::of(&batch[*i], name, failure, 1),
            )
            .await;
        }
        stats.dead_lettered += dead.len() as u64;
        stats.batches += 1;
        commit(&consumer, &batch);
        metrics::counter!("sluice_sink_records_written_total", "sink" => name)
            .increment(batch.len() as u64);
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(sink = name, error = %e, "final commit");
    }
    tracing::info!(sink = name, ?stats, "sink stopped");
    Ok(stats)
}

/// Wait for one record, then gather more until the batch is full or the linger ends.
async fn next_batch(
    consumer: &StreamConsumer,
    spec: &SinkSpec,
    shutdown: &CancellationToken,
    carry: &mut Vec<OwnedMessage>,
) -> Option<Vec<OwnedMessage>> {
    let mut batch = std::mem::take(carry);
    while batch.is_empty() {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            m = consumer.recv() => match m {
                Ok(m) => batch.push(m.detach()),
                Err(e) => {
                    tracing::warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + spec.linger;
    while batch.len() < spec.batch_size {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) => tracing::warn!(error = %e, "consume error"),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Wait out a retry backoff with consumption paused: the consumer keeps polling (so it
/// stays in its group) but fetches nothing new; whatever was already fetched is kept.
async fn wait_paused(consumer: &StreamConsumer, carry: &mut Vec<OwnedMessage>, wait: Duration) {
    if let Ok(assigned) = consumer.assignment() {
        if let Err(e) = consumer.pause(&assigned) {
            tracing::debug!(error = %e, "pause");
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(m) = tokio::time::timeout_at(deadline, consumer.recv()).await {
        match m {
            Ok(m) => carry.push(m.detach()),
            Err(e) => tracing::debug!(error = %e, "consume error while paused"),
        }
    }
}

fn resume(consumer: &StreamConsumer) {
    if let Ok(assigned) = consumer.assignment() {
        if let Err(e) = consumer.resume(&assigned) {
            tracing::warn!(error = %e, "resume");
        }
    }
}

/// Commit, per partition, the offset after the batch's last record.
fn commit(consumer: &StreamConsumer, batch: &[OwnedMessage]) {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in batch {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .is_err()
        {
            continue;
        }
    }
    // Async: the writes are durable already; a lost commit only means an idempotent re-write.
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::warn!(error = %e, "commit failed; the batch may be re-delivered (idempotent)");
    }
}

/// Send a dead letter and wait for its ack, retrying until the broker takes it.
pub async fn send_dead_letter(producer: &FutureProducer, topic: &str, dl: DeadLetter) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut record = FutureRecord::to(topic)
            .payload(&dl.payload)
            .headers(dl.headers.clone());
        if let Some(k) = &dl.key {
            record = record.key(k);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => return,
            Err((e, _)) => {
                tracing::warn!(topic, error = %e, "dead letter not delivered; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
