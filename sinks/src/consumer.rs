//! The sink loop shared by every sink: consume enriched events in batches bounded by
//! count and linger time, write each batch, dead-letter the records that can never be
//! written, and only then commit the batch's offsets.
//!
//! A transient failure (database or cluster unavailable) retries the same batch with
//! exponential backoff and jitter, and nothing is committed meanwhile: no loss. Writers
//! are idempotent, so a re-delivered batch after a crash creates no duplicates.

use std::collections::HashMap;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::consume::{close_within, Receiver, CLOSE_WAIT};
use sluice_core::consumer_metrics::MeteredConsumer;
use sluice_core::events::{
    BatchRetrying, Component, DeadLettered, Emit, ItemsRetrying, VersionsAhead, MAX_CLOCK_SKEW_MS,
};
use sluice_core::failure::{DeadLetter, Failure};
use sluice_core::headers;
use sluice_core::produce::deliver;
use sluice_core::replay_scope::ReplayScope;
use sluice_core::retry::{retry, Backoff, RetryAction};
use sluice_schemas::{AvroRecord, Codec};
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

/// Records that can never be written (index into the batch, and why): dead-lettered.
pub type Rejected = Vec<(usize, Failure)>;

/// A batch written in part: what was rejected, and the records to write again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partial {
    /// Records that can never be written.
    pub rejected: Rejected,
    /// Records refused for load, to write again (index into the batch).
    pub retry: Vec<usize>,
}

/// What a batch write did, as the sink loop's retry decision: written (with the records
/// rejected), to retry whole (destination down), to retry in part (some records refused
/// for load), or failed for good (the sink stops).
pub type WriteResult = RetryAction<Rejected, Partial>;

impl From<WriteError> for WriteResult {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Transient(why) => RetryAction::Retry(why),
            WriteError::Fatal(why) => RetryAction::DontRetry(why),
        }
    }
}

/// A record decoded from the input topic, with its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<R> {
    /// The record.
    pub record: R,
    /// Its version ([`headers::version`]: replay epoch, then processing time): of two
    /// versions of one event, the greater wins.
    pub version: i64,
}

/// A destination for batches of records (enriched events, session summaries).
pub trait BatchWriter: Send {
    /// The record type written, decoded from the input topic.
    type Record: AvroRecord + Clone + Send + Sync + 'static;
    /// Name used in metrics, logs and dead-letter headers.
    fn name(&self) -> &'static str;
    /// Write `records` idempotently: the newest processing of each event wins, and an
    /// older one arriving later changes nothing. Says what to do next (see
    /// [`WriteResult`]); the sink loop does the waiting and retrying.
    fn write(
        &self,
        records: &[Versioned<Self::Record>],
    ) -> impl std::future::Future<Output = WriteResult> + Send;
    /// Do the work that writes deferred (e.g. refreshing the continuous aggregates they
    /// touched). Called every few seconds and once more when the sink stops; returns
    /// what it did, one line each, for the operator.
    fn settle(&self) -> impl std::future::Future<Output = Result<Vec<String>, WriteError>> + Send {
        async { Ok(Vec::new()) }
    }
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
    /// The sink could not start: its destination could not be prepared, or a codec
    /// could not be set up.
    #[error("{0}")]
    Setup(String),
}

/// Default [`SinkSpec::max_batch_bytes`]: 2 MiB. A batch's records are held several
/// times over while it is written (the records, their decoded events, the encoded rows or
/// documents), so with large events the bytes, not the count, bound a sink's memory:
/// with 960 KiB events under an unpaced flood, 8 MiB batches peaked the TimescaleDB
/// sink at 296–342 MiB, 2 MiB ones at 163 MiB.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// Batches' worth of records (by count) a sink holds besides those being written; beyond
/// it, it takes no more until a write finishes. Four keep the destination busy: the
/// TimescaleDB sink's ratio to `\copy` was 0.66–0.67 with four, 0.60–0.64 with two, on
/// Apache Kafka.
const WAITING_BATCHES: usize = 4;

/// Batches' worth of record bytes a sink holds besides those being written: fewer than
/// [`WAITING_BATCHES`], since large events are held several times over (see
/// [`DEFAULT_MAX_BATCH_BYTES`]).
const WAITING_BATCHES_OF_BYTES: usize = 2;

fn record_bytes(m: &OwnedMessage) -> usize {
    m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len) + 64
}

impl SinkSpec {
    /// A sink in `group` reading `input`, its dead letters to `<input>.dlq`, as
    /// `rewiring` changes it (a replayed record's dead letters still go to the usual DLQ).
    pub fn new(
        topics: &sluice_core::config::TopicsConfig,
        group: &str,
        input: &str,
        rewiring: &sluice_core::wiring::Rewiring,
    ) -> Self {
        use sluice_core::wiring::Rewiring;
        Self {
            group: Rewiring::or(&rewiring.group, group),
            input: Rewiring::or(&rewiring.input, input),
            dlq: Rewiring::or(&rewiring.dlq, &topics.dlq(input)),
            batch_size: 2_000,
            linger: Duration::from_millis(200),
            write_concurrency: 1,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            scope: rewiring.scope.clone(),
        }
    }
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
    /// Batches written at once (committed in order all the same).
    pub write_concurrency: usize,
    /// Most bytes of records in one batch: with large records, memory is bounded by
    /// bytes, not counts (received records wait for at most two batches' worth of bytes).
    pub max_batch_bytes: usize,
    /// Bounds of a replay run (end offsets, tenant, rate); `None` for a normal run.
    pub scope: Option<std::sync::Arc<ReplayScope>>,
}

/// Counts of what a sink did, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SinkStats {
    /// Records consumed.
    pub consumed: u64,
    /// Events written (including ones already present: writes are idempotent).
    pub written: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Batches written.
    pub batches: u64,
    /// When the first record was received (after joining the group).
    pub first_record_at: Option<std::time::Instant>,
    /// When the last batch was committed.
    pub last_commit_at: Option<std::time::Instant>,
    /// What the writer's deferred work did (see [`BatchWriter::settle`]), one line each.
    pub settled: Vec<String>,
}

impl SinkStats {
    /// Records per second from the first record to the last commit.
    pub fn throughput(&self) -> Option<f64> {
        let span = self
            .last_commit_at?
            .duration_since(self.first_record_at?)
            .as_secs_f64();
        (span > 0.0).then(|| self.consumed as f64 / span)
    }
}

/// What became of one batch's write.
enum Written {
    /// Written; these records (index into the batch) are dead letters.
    Done(Vec<(usize, Failure)>, usize),
    /// Shutdown came while the destination was down: not written, not to be committed.
    Abandoned,
}

/// Decode a batch and write it, retrying transient failures with exponential backoff
/// and jitter until it is written or `shutdown` is cancelled.
async fn write_batch<W: BatchWriter>(
    writer: &W,
    codec: &Codec<W::Record>,
    batch: &[OwnedMessage],
    scope: Option<&ReplayScope>,
    shutdown: &CancellationToken,
) -> Result<Written, WriteError> {
    let sink = writer.name();
    let retrying = |why: &str, retry_in| {
        BatchRetrying {
            sink,
            error: why,
            retry_in,
        }
        .emit()
    };
    // What does not decode is dead-lettered without reaching the writer; a schema
    // registry that cannot be reached is waited for, like a destination that is down.
    let decoded = retry(
        &mut Backoff::standard(),
        shutdown,
        || async {
            match decode_batch(codec, batch, scope) {
                Ok(decoded) => RetryAction::Successful(decoded),
                Err(e) => RetryAction::Retry(format!("schema registry unavailable: {e}")),
            }
        },
        retrying,
    )
    .await;
    let (events, sources, mut dead) = match decoded {
        Ok(d) => d,
        Err(_) => return Ok(Written::Abandoned),
    };
    count_versions_ahead(sink, &events, sluice_core::now_ms());
    // Write, then write again what was refused for load (all of it, or some records),
    // until nothing is left, the writer fails for good, or shutdown comes.
    let mut backoff = Backoff::standard();
    let mut pending: Vec<usize> = (0..events.len()).collect();
    let mut count = 0;
    loop {
        let subset: std::borrow::Cow<'_, [Versioned<W::Record>]> = if pending.len() == events.len()
        {
            std::borrow::Cow::Borrowed(&events)
        } else {
            std::borrow::Cow::Owned(pending.iter().map(|&i| events[i].clone()).collect())
        };
        let started = std::time::Instant::now();
        let rejected = |r: Rejected, pending: &[usize], dead: &mut Vec<(usize, Failure)>| {
            let n = r.len();
            dead.extend(r.into_iter().map(|(i, f)| (sources[pending[i]], f)));
            n
        };
        let (retry, why) = match writer.write(&subset).await {
            RetryAction::Successful(r) => {
                metrics::histogram!("sluice_sink_write_duration_seconds", "sink" => sink)
                    .record(started.elapsed().as_secs_f64());
                tracing::debug!(
                    sink,
                    records = subset.len(),
                    write_ms = started.elapsed().as_millis() as u64,
                    "batch written"
                );
                let failed = rejected(r, &pending, &mut dead);
                count += pending.len() - failed;
                return Ok(Written::Done(dead, count));
            }
            RetryAction::DontRetry(why) => return Err(WriteError::Fatal(why)),
            RetryAction::Retry(why) => (pending.clone(), why),
            RetryAction::RetryPartial(p, why) => {
                let failed = rejected(p.rejected, &pending, &mut dead);
                let again: Vec<usize> = p.retry.iter().map(|&i| pending[i]).collect();
                count += pending.len() - failed - again.len();
                (again, why)
            }
        };
        let retry_in = backoff.next_delay();
        if retry.len() == pending.len() {
            retrying(&why, retry_in);
        } else {
            ItemsRetrying {
                sink,
                items: retry.len(),
                retry_in,
            }
            .emit();
        }
        pending = retry;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(Written::Abandoned),
            _ = tokio::time::sleep(retry_in) => {}
        }
    }
}

/// Count the records stamped more than [`MAX_CLOCK_SKEW_MS`] ahead of `now` (the sink's
/// clock); returns how many.
fn count_versions_ahead<R>(sink: &'static str, events: &[Versioned<R>], now: i64) -> usize {
    let ahead: Vec<i64> = events
        .iter()
        .map(|v| headers::split_version(v.version).1 - now)
        .filter(|&a| a > MAX_CLOCK_SKEW_MS)
        .collect();
    if let Some(&furthest) = ahead.iter().max() {
        VersionsAhead {
            sink,
            records: ahead.len(),
            ahead_ms: furthest,
        }
        .emit();
    }
    ahead.len()
}

/// The records of a batch that decode, their indices, and the dead letters; fails as a
/// whole when a schema could not be fetched from an unreachable registry.
#[allow(clippy::type_complexity)]
fn decode_batch<R: AvroRecord>(
    codec: &Codec<R>,
    batch: &[OwnedMessage],
    scope: Option<&ReplayScope>,
) -> Result<(Vec<Versioned<R>>, Vec<usize>, Vec<(usize, Failure)>), sluice_schemas::CodecError> {
    let mut events = Vec::with_capacity(batch.len());
    let mut sources = Vec::with_capacity(batch.len());
    let mut dead = Vec::new();
    for (i, msg) in batch.iter().enumerate() {
        if scope.is_some_and(|s| !s.keeps_tenant(msg.headers())) {
            continue;
        }
        match codec.decode(msg.payload().unwrap_or_default()) {
            Ok(record) => {
                events.push(Versioned {
                    record,
                    version: headers::version(msg),
                });
                sources.push(i);
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => dead.push((i, Failure::new("decode", e.to_string()))),
        }
    }
    Ok((events, sources, dead))
}

/// How long the sink may hold four unwritten batches before it pauses its partitions.
const STALLED_AFTER: Duration = Duration::from_secs(2);

/// Run a sink until `shutdown` is cancelled.
///
/// Records gather into batches bounded by `spec.batch_size` and `spec.linger`. Up to
/// `spec.write_concurrency` batches are written at once (each on its own connection or
/// bulk request), but batches are committed strictly in the order they were consumed,
/// so a commit never covers an unwritten record. When writes fall behind and four
/// batches (or two batches' bytes) wait, the sink takes no more records until one is
/// written; when that lasts (the destination is slow or down), consumption is paused:
/// the consumer keeps polling, so it stays in its group, but fetches nothing new.
pub async fn run_sink<W: BatchWriter + Sync + 'static>(
    kafka: &KafkaConfig,
    spec: &SinkSpec,
    writer: W,
    codec: std::sync::Arc<Codec<W::Record>>,
    shutdown: CancellationToken,
) -> Result<SinkStats, SinkError> {
    let name = writer.name();
    let writer = std::sync::Arc::new(writer);
    // The sink buffers up to four batches itself: a batch per partition fetched ahead
    // keeps it fed.
    let consumer = kafka.metered_consumer_prefetching(&spec.group, spec.batch_size)?;
    consumer.subscribe(&[&spec.input])?;
    let receiver = Receiver::new(&consumer, spec.scope.as_deref(), name);
    let producer: FutureProducer = kafka.producer_config().create()?;
    let max_message_bytes = kafka.max_message_bytes();
    let mut stats = SinkStats::default();
    let batch_size = spec.batch_size.max(1);
    let slots = spec.write_concurrency.max(1);
    // Received records not yet in a batch, and when the oldest of them must be sent.
    let mut pending: Vec<OwnedMessage> = Vec::new();
    let mut pending_bytes = 0usize;
    let max_batch_bytes = spec.max_batch_bytes.max(1);
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut in_flight = FuturesOrdered::new();
    let mut idle_positions: HashMap<i32, i64> = HashMap::new();
    let mut paused = false;
    let mut consuming = true;
    // Export the error counters from the start, so rate() and alerts see a zero.
    metrics::counter!("sluice_sink_retries_total", "sink" => name).increment(0);
    metrics::counter!("sluice_sink_versions_ahead_total", "sink" => name).increment(0);
    for reason in ["decode", "write"] {
        metrics::counter!("sluice_sink_dead_letters_total", "sink" => name, "reason" => reason)
            .increment(0);
    }
    tracing::info!(sink = name, input = %spec.input, group = %spec.group, slots, "sink started");

    let mut full_since: Option<tokio::time::Instant> = None;
    // The writer's deferred work runs beside the writes, one run at a time.
    let mut settle_tick = tokio::time::interval(SETTLE_EVERY);
    settle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut settling: Option<tokio::task::JoinHandle<Result<Vec<String>, WriteError>>> = None;
    while consuming || !in_flight.is_empty() {
        // Backpressure: with batches waiting, take no more records until a write
        // finishes. Only when that lasts (the destination is slow or down) are the
        // partitions paused, which keeps the consumer polling (in its group) without
        // fetching. Pausing at once would cost every busy moment a re-fetch, which
        // librdkafka spaces by a second.
        let full = pending.len() >= WAITING_BATCHES * batch_size
            || pending_bytes >= WAITING_BATCHES_OF_BYTES * max_batch_bytes;
        let now = tokio::time::Instant::now();
        full_since = if full { full_since.or(Some(now)) } else { None };
        let stalled = full_since.is_some_and(|t| now >= t + STALLED_AFTER);
        if stalled != paused {
            set_paused(&consumer, stalled);
            paused = stalled;
        }
        let due = deadline.is_some_and(|d| d <= tokio::time::Instant::now());
        if consuming
            && !pending.is_empty()
            && (pending.len() >= batch_size || pending_bytes >= max_batch_bytes || due)
            && in_flight.len() < slots
        {
            // As many records as fit the batch's count and bytes (one at least).
            let mut take = 0;
            let mut bytes = 0;
            while take < pending.len().min(batch_size)
                && (take == 0 || bytes + record_bytes(&pending[take]) <= max_batch_bytes)
            {
                bytes += record_bytes(&pending[take]);
                take += 1;
            }
            pending_bytes -= bytes;
            let rest = pending.split_off(take);
            let batch = std::mem::replace(&mut pending, rest);
            deadline = (!pending.is_empty()).then(|| tokio::time::Instant::now() + spec.linger);
            stats.consumed += batch.len() as u64;
            metrics::histogram!("sluice_sink_batch_size_records", "sink" => name)
                .record(batch.len() as f64);
            let (w, stop, scope) = (writer.clone(), shutdown.clone(), spec.scope.clone());
            let codec = codec.clone();
            let batch = std::sync::Arc::new(batch);
            let b = batch.clone();
            let task =
                tokio::spawn(
                    async move { write_batch(&*w, &codec, &b, scope.as_deref(), &stop).await },
                );
            in_flight.push_back(async move { (batch, task.await) });
            continue;
        }
        let wake = match full_since {
            // Full but not paused yet: wake up to pause once it counts as stalled.
            Some(t) if !paused => Some(t + STALLED_AFTER),
            _ => deadline.filter(|d| *d > tokio::time::Instant::now()),
        };
        tokio::select! {
            biased;
            Some((batch, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let written = match result {
                    Ok(Ok(w)) => w,
                    Ok(Err(fatal)) => return Err(SinkError::Write { sink: name, source: fatal }),
                    Err(e) => return Err(SinkError::Write { sink: name, source: WriteError::Fatal(format!("write task: {e}")) }),
                };
                let Written::Done(dead, count) = written else {
                    tracing::warn!(sink = name, "stopping with unwritten batches; they stay uncommitted");
                    break;
                };
                stats.written += count as u64;
                let mut delivered = true;
                for (i, failure) in &dead {
                    DeadLettered { component: Component::Sink(name), class: failure.class, reason: &failure.reason }.emit();
                    delivered = delivered
                        && send_dead_letter(&producer, &spec.dlq, DeadLetter::of(&batch[*i], name, failure, 1).fit(max_message_bytes), &shutdown).await;
                }
                if !delivered {
                    tracing::warn!(sink = name, "stopping with dead letters undelivered; their batch stays uncommitted");
                    break;
                }
                stats.dead_lettered += dead.len() as u64;
                stats.batches += 1;
                let started = std::time::Instant::now();
                commit(&consumer, &batch);
                metrics::histogram!("sluice_sink_commit_duration_seconds", "sink" => name)
                    .record(started.elapsed().as_secs_f64());
                stats.last_commit_at = Some(std::time::Instant::now());
                record_end_to_end(name, &batch, spec.scope.is_some());
                metrics::counter!("sluice_sink_records_written_total", "sink" => name).increment(count as u64);
            }
            _ = shutdown.cancelled(), if consuming => consuming = false,
            _ = settle_tick.tick(), if settling.is_none() => {
                if pending.is_empty() && in_flight.is_empty() && spec.scope.is_none() {
                    commit_positions(&consumer, &mut idle_positions);
                }
                let w = writer.clone();
                settling = Some(tokio::spawn(async move { w.settle().await }));
            }
            done = async { settling.as_mut().expect("guarded").await }, if settling.is_some() => {
                settling = None;
                settled(name, done, &mut stats.settled);
            }
            (m, _) = receiver.next(), if consuming && (!full || paused) => {
                receiver.throttle().await;
                stats
                    .first_record_at
                    .get_or_insert_with(std::time::Instant::now);
                // Skipped records (other tenants) are committed with their batch, unwritten.
                let m = m.detach();
                pending_bytes += record_bytes(&m);
                pending.push(m);
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + spec.linger);
            }
            _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if consuming && wake.is_some() => {}
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(sink = name, error = %e, "final commit");
    }
    // Last, the deferred work of everything written (e.g. a replay's aggregates).
    if let Some(running) = settling.take() {
        settled(name, running.await, &mut stats.settled);
    }
    settled(name, Ok(writer.settle().await), &mut stats.settled);
    close_within(consumer, &spec.group, CLOSE_WAIT).await;
    tracing::info!(
        sink = name,
        consumed = stats.consumed,
        written = stats.written,
        dead_lettered = stats.dead_lettered,
        batches = stats.batches,
        records_per_s = stats.throughput().unwrap_or(0.0).round(),
        "sink stopped"
    );
    Ok(stats)
}

/// How often a sink runs its writer's deferred work.
const SETTLE_EVERY: Duration = Duration::from_secs(5);

/// Log and keep what a run of the writer's deferred work did; a failed run is retried at
/// the next one.
fn settled(
    sink: &'static str,
    result: Result<Result<Vec<String>, WriteError>, tokio::task::JoinError>,
    into: &mut Vec<String>,
) {
    match result {
        Ok(Ok(lines)) => {
            for line in &lines {
                tracing::info!(sink, "{line}");
            }
            into.extend(lines);
        }
        Ok(Err(e)) => tracing::warn!(sink, error = %e, "deferred work failed; retrying later"),
        Err(e) => tracing::warn!(sink, error = %e, "deferred work panicked; retrying later"),
    }
}

/// End-to-end latency of each committed record: from ingest's receipt to now.
/// Replayed records (stamped by a replaying stage, or written by a replay of the sink
/// itself) are counted apart: their age is the replay's, not the pipeline's latency, and
/// would trip the latency alert.
fn record_end_to_end(sink: &'static str, batch: &[OwnedMessage], replaying: bool) {
    let now = sluice_core::now_ms();
    let histogram = metrics::histogram!("sluice_end_to_end_latency_seconds", "sink" => sink);
    let replayed = metrics::counter!("sluice_sink_replayed_records_total", "sink" => sink);
    for m in batch {
        if replaying || headers::get(m.headers(), headers::REPLAY).is_some() {
            replayed.increment(1);
            continue;
        }
        if let Some(at) =
            headers::get(m.headers(), headers::RECEIVED_AT_MS).and_then(|v| v.parse::<i64>().ok())
        {
            histogram.record((now - at).max(0) as f64 / 1000.0);
        }
    }
}

/// Pause or resume fetching on every assigned partition.
fn set_paused(consumer: &StreamConsumer<MeteredConsumer>, pause: bool) {
    let Ok(assigned) = consumer.assignment() else {
        return;
    };
    let result = if pause {
        consumer.pause(&assigned)
    } else {
        consumer.resume(&assigned)
    };
    if let Err(e) = result {
        tracing::debug!(pause, error = %e, "pause/resume");
    }
}

/// With nothing pending or being written, commit the consumer's position where it is
/// past what was committed: the records between were never handed over (transaction
/// markers and aborted records of a transactional input). Without this, a sink reading
/// an exactly-once stage's output stays a record behind per partition, and its lag
/// never reaches 0. `last` remembers what was committed this way.
fn commit_positions(consumer: &StreamConsumer<MeteredConsumer>, last: &mut HashMap<i32, i64>) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    let mut tpl = TopicPartitionList::new();
    for e in positions.elements() {
        if let Offset::Offset(next) = e.offset() {
            if last.insert(e.partition(), next) != Some(next) {
                let _ = tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(next));
            }
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "commit of positions failed");
        }
    }
}

/// Commit, per partition, the offset after the batch's last record.
fn commit(consumer: &StreamConsumer<MeteredConsumer>, batch: &[OwnedMessage]) {
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

/// Send a dead letter and wait for its ack, retrying until the broker takes it. Returns
/// `false` when `shutdown` came first (the record's batch must then stay uncommitted).
pub async fn send_dead_letter(
    producer: &FutureProducer,
    topic: &str,
    dl: DeadLetter,
    shutdown: &CancellationToken,
) -> bool {
    deliver(
        producer,
        topic,
        dl.key.as_deref(),
        &dl.payload,
        &dl.headers,
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stamps_beyond_the_skew_count_as_ahead_whatever_their_epoch() {
        let now = 1_800_000_000_000;
        let at = |epoch, ms| Versioned {
            record: (),
            version: headers::version_of(epoch, ms),
        };
        let batch = [
            at(0, now),
            at(0, now + MAX_CLOCK_SKEW_MS),
            at(0, now + MAX_CLOCK_SKEW_MS + 1),
            at(7, now + 600_000),
            at(7, now - 600_000),
        ];
        assert_eq!(count_versions_ahead("test", &batch, now), 2);
        assert_eq!(count_versions_ahead("test", &batch[..2], now), 0);
    }
}
