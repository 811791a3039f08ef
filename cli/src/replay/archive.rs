//! Replaying from the archive. A replay into a stage is fed the archived records of the
//! range in-process: each is handed to the stage as the message it was on the raw topic
//! (partition, offset, key, headers, timestamp), so the stage transforms it as if it
//! consumed it. A diff or a copy reads them from a scratch topic of their own they are
//! put back on first (with `sluice.replayed_from`). `--source auto` takes from the
//! archive only the offsets Kafka no longer retains, and the rest from Kafka: the seam
//! is, per partition, the first offset Kafka retains, so nothing is read twice or
//! skipped.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use sluice_sinks::archive::{self, Archive, ArchiveRange, ArchivedFile, ArchivedRecord};
use tokio_util::sync::CancellationToken;

use super::plan::{resolve, OffsetRange, Plan, Range};
use sluice_core::replay_scope::ReplayScope;
use sluice_core::wiring::{Feed, Rewiring};

use super::run::{blocking, progress};
use super::{Filters, Outcome, Target, REPLAYED_FROM};
use crate::components::Config;

/// Where a replay reads its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A retained topic.
    Topic(String),
    /// The archive of the raw topic.
    Archive,
    /// The archive for what Kafka no longer retains of the raw topic, Kafka for the rest.
    Auto,
}

/// The archived records a replay reads.
#[derive(Debug, Clone)]
pub struct ArchivePart {
    archive: Archive,
    range: ArchiveRange,
    /// The files that may hold them.
    pub files: Vec<ArchivedFile>,
    /// Per partition, the offsets taken: `[start, end)`; a partition absent is not taken.
    bounds: HashMap<i32, (i64, i64)>,
}

impl ArchivePart {
    fn keeps(&self, r: &ArchivedRecord) -> bool {
        self.bounds
            .get(&r.partition)
            .is_some_and(|(start, end)| r.offset >= *start && r.offset < *end)
    }

    /// Files, offsets and bytes, as the dry run prints them.
    pub fn table(&self) -> String {
        let files: Vec<&ArchivedFile> = self
            .files
            .iter()
            .filter(|f| {
                self.bounds
                    .get(&f.span.partition)
                    .is_some_and(|(s, e)| f.span.last >= *s && f.span.first < *e)
            })
            .collect();
        let mut s = format!(
            "archive {} (topic {})\n",
            self.archive.url, self.range.topic
        );
        s += &format!(
            "{:>9} {:>14} {:>14} {:>7} {:>12}\n",
            "partition", "first", "last", "files", "bytes"
        );
        let mut partitions: Vec<i32> = files.iter().map(|f| f.span.partition).collect();
        partitions.dedup();
        for p in partitions {
            let of: Vec<&&ArchivedFile> = files.iter().filter(|f| f.span.partition == p).collect();
            s += &format!(
                "{:>9} {:>14} {:>14} {:>7} {:>12}\n",
                p,
                of.iter().map(|f| f.span.first).min().unwrap_or(0),
                of.iter().map(|f| f.span.last).max().unwrap_or(0),
                of.len(),
                of.iter().map(|f| f.size).sum::<u64>()
            );
        }
        s += &format!(
            "{:>9} {:>14} {:>14} {:>7} {:>12}\n",
            "total",
            "",
            "",
            files.len(),
            files.iter().map(|f| f.size).sum::<u64>()
        );
        s
    }

    /// The spans of files holding the part's records, in partition and offset order.
    fn spans(&self) -> Vec<Vec<ArchivedFile>> {
        archive::spans(&self.files)
            .into_iter()
            .filter(|s| {
                self.bounds
                    .get(&s[0].span.partition)
                    .is_some_and(|(start, end)| s[0].span.last >= *start && s[0].span.first < *end)
            })
            .collect()
    }

    /// Whether nothing is to be read from the archive.
    pub fn is_empty(&self) -> bool {
        self.bounds.values().all(|(s, e)| s >= e)
            || !self
                .files
                .iter()
                .any(|f| self.bounds.contains_key(&f.span.partition))
    }
}

/// Plan what a replay of `range` reads from the archive of the raw topic: every
/// partition (or `partitions`), each below `below` when given (auto: the first offset
/// Kafka retains), of `tenant` when given.
pub async fn plan(
    config: &Config,
    range: &Range,
    tenant: Option<&str>,
    partitions: Option<&[i32]>,
    below: Option<&HashMap<i32, i64>>,
) -> Result<ArchivePart> {
    let archive = archive::open(&config.archive).context("opening the archive")?;
    let (from, to, offsets): (Option<i64>, Option<i64>, Option<&[OffsetRange]>) = match range {
        Range::Times { from, to } => (
            from.map(|t| t.timestamp_millis()),
            to.map(|t| t.timestamp_millis()),
            None,
        ),
        Range::Offsets(o) => (None, None, Some(o)),
    };
    let range = ArchiveRange {
        topic: config.topics.raw.clone(),
        from,
        to,
        tenant: tenant.map(str::to_string),
    };
    let files = archive::list_files(&archive, &range)
        .await
        .with_context(|| format!("listing the archive {}", archive.url))?;
    let mut all: Vec<i32> = files.iter().map(|f| f.span.partition).collect();
    all.sort_unstable();
    all.dedup();
    let mut bounds = HashMap::new();
    for p in all {
        if partitions.is_some_and(|w| !w.contains(&p)) {
            continue;
        }
        let (mut start, mut end) = (0, i64::MAX);
        if let Some(offsets) = offsets {
            let Some(r) = offsets.iter().find(|r| r.partition == p) else {
                continue;
            };
            start = r.start;
            end = r.end.unwrap_or(i64::MAX);
        }
        if let Some(below) = below {
            end = end.min(below.get(&p).copied().unwrap_or(0));
        }
        if start < end {
            bounds.insert(p, (start, end));
        }
    }
    Ok(ArchivePart {
        archive,
        range,
        files,
        bounds,
    })
}

/// The new topic archived records are put back on for a replay to read.
#[derive(Debug, Clone)]
pub struct Scratch {
    /// `<raw>.restore-<time>`.
    pub topic: String,
    /// The raw topic's partitions.
    pub partitions: usize,
}

/// Create the scratch topic `<raw>.restore-<time>`, with the raw topic's partitions.
pub async fn scratch_topic(config: &Config) -> Result<Scratch> {
    let raw = config.topics.raw.clone();
    let (kafka, r) = (config.kafka.clone(), raw.clone());
    let partitions = blocking(move || Ok(sluice_core::kafka::watermarks(&kafka, &r)?.len()))?;
    if partitions == 0 {
        bail!("--source: topic `{raw}` does not exist");
    }
    let topic = format!(
        "{raw}.restore-{}",
        chrono::Utc::now().format("%Y%m%d%H%M%S")
    );
    sluice_core::kafka::create_topics(
        &config.kafka,
        partitions as i32,
        config.topics.replication_factor,
        &[(topic.clone(), "86400000".into())],
    )
    .await?;
    Ok(Scratch { topic, partitions })
}

/// The part's spans in partition and offset order, each fetched, decoded and turned
/// into `T` by `convert` on a task of its own (so on another core) while the caller
/// takes the one before: reading is as fast as the slower of the two, not their sum.
/// Memory holds READ_AHEAD + 1 spans. Also returns how many offsets the spans cover.
fn read_ahead<T: Send + 'static>(
    part: &ArchivePart,
    convert: fn(Vec<ArchivedRecord>) -> T,
) -> (u64, impl futures::Stream<Item = Result<(u64, T)>>) {
    let spans = part.spans();
    let width = |s: &[ArchivedFile]| (s[0].span.last - s[0].span.first + 1) as u64;
    let covered = spans.iter().map(|s| width(s)).sum();
    let shared = Arc::new(part.clone());
    let reads = futures::stream::iter(spans.into_iter().map(move |span| {
        let part = shared.clone();
        tokio::spawn(async move {
            let records = archive::read_span(&part.archive, &span, &part.range, |r| part.keeps(r))
                .await
                .with_context(|| format!("reading the archive {}", part.archive.url))?;
            Ok((width(&span), convert(records)))
        })
    }))
    .buffered(READ_AHEAD)
    .map(|read| read.context("reading the archive: task failed")?);
    (covered, reads)
}

/// Put the part's records on `scratch` (each on its partition, with its key, headers and
/// timestamp, plus where it came from); the plan that replays all of them.
pub async fn fill(
    config: &Config,
    part: &ArchivePart,
    scratch: &Scratch,
    stop: &CancellationToken,
) -> Result<Plan> {
    let (topic, partitions) = (scratch.topic.clone(), scratch.partitions);
    let started = std::time::Instant::now();
    let acks = Arc::new(PutBackAcks::default());
    let producer: ThreadedProducer<PutBack> = config
        .kafka
        .producer_config()
        .create_with_context(PutBack(acks.clone()))?;
    let (covered, reads) = read_ahead(part, |records| records);
    let bar = progress(covered as i64);
    let mut reads = std::pin::pin!(reads);
    let mut sent = 0u64;
    while let Some(read) = reads.next().await {
        let (width, records) = read?;
        for r in &records {
            if stop.is_cancelled() {
                bail!("interrupted while putting archived records back on {topic}");
            }
            put_back(&producer, &topic, partitions, r).await?;
        }
        acks.check()?;
        sent += records.len() as u64;
        bar.inc(width);
    }
    tokio::task::block_in_place(|| producer.flush(std::time::Duration::from_secs(300)))
        .context("putting records back: not all were delivered within 5 minutes")?;
    acks.check()?;
    let restored = acks.delivered.load(Ordering::Acquire);
    if restored != sent {
        bail!("putting records back: {restored} of {sent} delivered");
    }
    bar.finish_and_clear();
    let took = started.elapsed().as_secs_f64();
    println!(
        "{restored} archived record(s) put back on scratch topic {topic} in {took:.1} s ({:.0} records/s)",
        restored as f64 / took.max(1e-3)
    );
    let (kafka, t) = (config.kafka.clone(), topic.clone());
    blocking(move || {
        resolve(
            &kafka,
            &t,
            &Range::Times {
                from: None,
                to: None,
            },
            None,
        )
    })
}

/// Replay the part through `target` (a stage reading the raw topic) in-process: the
/// archived records are read, decoded and handed to the stage, which transforms and
/// publishes them as if it consumed them, under the replay name `group` (stamped on its
/// outputs). No scratch topic: a produce, a broker write and a consume per record saved.
pub async fn replay(
    config: &Config,
    part: &ArchivePart,
    target: &Target,
    group: &str,
    filters: &Filters,
    stop: CancellationToken,
) -> Result<Outcome> {
    let Target::Component(component) = target else {
        bail!("a copy reads the archive through a scratch topic");
    };
    let started = std::time::Instant::now();
    let ends = part.bounds.iter().map(|(p, (_, end))| (*p, *end)).collect();
    let what = format!("{} {}", component.kind.as_str(), component.name);
    let entry = super::epoch::LogEntry::of(group, &what, &config.topics.raw);
    let epoch = super::epoch::draw(&config.kafka, &config.topics, &entry).await?;
    let scope =
        Arc::new(ReplayScope::new(ends, filters.tenant.clone(), filters.rate).with_epoch(epoch));
    let (sender, records) = Feed::channel(FEED_AHEAD);
    let rewiring = Rewiring {
        group: Some(group.to_string()),
        input: Some(config.topics.raw.clone()),
        scope: Some(scope.clone()),
        feed: Some(records),
        ..Rewiring::default()
    };
    let runner = CancellationToken::new();
    let (cfg, token, component) = (config.clone(), runner.clone(), *component);
    let mut stage = tokio::spawn(async move { component.run_rewired(&cfg, rewiring, token).await });
    let (covered, reads) = read_ahead(part, as_messages);
    let bar = progress(covered as i64);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let feeding = feed(reads, sender, &stop);
    tokio::pin!(feeding);
    let mut fed = false;
    let done = loop {
        tokio::select! {
            read = &mut feeding, if !fed => match read {
                // The sender is dropped: the stage ends once it published what it took.
                Ok(_) => fed = true,
                Err(e) => {
                    runner.cancel();
                    let _ = stage.await;
                    bar.finish_and_clear();
                    return Err(e);
                }
            },
            done = &mut stage => break done.context("replay task")?,
            _ = stop.cancelled(), if !runner.is_cancelled() => runner.cancel(),
            _ = tick.tick() => bar.set_position(scope.admitted() + scope.skipped()),
        }
    };
    bar.finish_and_clear();
    let done = done?;
    let interrupted = stop.is_cancelled();
    let took = started.elapsed().as_secs_f64();
    let mut notes = done.notes;
    if interrupted {
        notes.push("interrupted: what was replayed stays; run the replay again to finish (repeats are idempotent)".into());
    } else {
        println!(
            "{} archived record(s) replayed from {} in {took:.1} s ({:.0} records/s)",
            done.consumed,
            part.archive.url,
            done.consumed as f64 / took.max(1e-3)
        );
    }
    Ok(Outcome {
        read: done.consumed,
        skipped: scope.skipped(),
        written: done.written,
        dead_lettered: done.dead_lettered,
        interrupted,
        resume: None,
        notes,
    })
}

/// Batches read ahead of a fed stage.
const FEED_AHEAD: usize = 8;

/// Hand the spans `reads` yields to a stage that replays them in-process (`feed`), in
/// batches of the messages the records were on the raw topic ([`as_messages`]). Ends
/// early when `stop` is cancelled or the stage stopped taking them.
async fn feed(
    reads: impl futures::Stream<Item = Result<(u64, Vec<Vec<OwnedMessage>>)>>,
    feed: tokio::sync::mpsc::Sender<Vec<OwnedMessage>>,
    stop: &CancellationToken,
) -> Result<()> {
    let mut reads = std::pin::pin!(reads);
    while let Some(read) = reads.next().await {
        let (_, batches) = read?;
        for batch in batches {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                sent = feed.send(batch) => if sent.is_err() { return Ok(()) },
            }
        }
    }
    Ok(())
}

/// Records handed to a fed stage at once: a channel send per record would cost more
/// than the transform.
const FEED_BATCH: usize = 1024;

/// Archived records as the messages they were, in batches of [`FEED_BATCH`].
fn as_messages(records: Vec<ArchivedRecord>) -> Vec<Vec<OwnedMessage>> {
    let mut batches = Vec::with_capacity(records.len() / FEED_BATCH + 1);
    let mut batch = Vec::with_capacity(FEED_BATCH.min(records.len()));
    for r in records {
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let timestamp = r
            .timestamp
            .map_or(Timestamp::NotAvailable, Timestamp::CreateTime);
        batch.push(OwnedMessage::new(
            r.value,
            r.key,
            r.topic,
            timestamp,
            r.partition,
            r.offset,
            Some(headers),
        ));
        if batch.len() == FEED_BATCH {
            batches.push(std::mem::replace(
                &mut batch,
                Vec::with_capacity(FEED_BATCH),
            ));
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Spans fetched and decoded ahead of the one being put back.
const READ_AHEAD: usize = 2;

/// What the scratch topic's deliveries came to: how many were delivered, and the first
/// failure.
#[derive(Default)]
struct PutBackAcks {
    delivered: AtomicU64,
    failed: Mutex<Option<String>>,
}

impl PutBackAcks {
    /// The first delivery failure, as an error.
    fn check(&self) -> Result<()> {
        match self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            Some(e) => bail!("putting a record back: {e}"),
            None => Ok(()),
        }
    }
}

/// The scratch producer's delivery callbacks: counting them costs no task wake-up or
/// future per record (a `FutureProducer` allocates both).
struct PutBack(Arc<PutBackAcks>);

impl rdkafka::ClientContext for PutBack {}

impl ProducerContext for PutBack {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.delivered.fetch_add(1, Ordering::AcqRel);
            }
            Err((e, _)) => {
                let mut failed = self
                    .0
                    .failed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                failed.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Send one archived record to its partition of the scratch topic, as it was, with the
/// place it came from; waits while the producer's queue is full.
async fn put_back(
    producer: &ThreadedProducer<PutBack>,
    topic: &str,
    partitions: usize,
    r: &ArchivedRecord,
) -> Result<()> {
    let origin = sluice_core::headers::origin(&r.topic, r.partition, r.offset);
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 1);
    for (k, v) in r.headers.iter().filter(|(k, _)| k != REPLAYED_FROM) {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    headers = headers.insert(Header {
        key: REPLAYED_FROM,
        value: Some(origin.as_str()),
    });
    // The raw topic may have fewer partitions now than when the record was archived.
    let partition = r.partition.rem_euclid(partitions as i32);
    let mut record = BaseRecord::to(topic).partition(partition).headers(headers);
    if let Some(v) = &r.value {
        record = record.payload(v);
    }
    if let Some(k) = &r.key {
        record = record.key(k);
    }
    if let Some(ts) = r.timestamp {
        record = record.timestamp(ts);
    }
    loop {
        match producer.send::<Vec<u8>, Vec<u8>>(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::error::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                record = back;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e).context("putting a record back"),
        }
    }
}

/// The Kafka part of an `auto` replay: `range` on the raw topic from the first offset
/// Kafka retains on each partition; and those offsets (the seam).
pub fn kafka_part(
    config: &Config,
    range: &Range,
    partitions: Option<&[i32]>,
) -> Result<(Plan, HashMap<i32, i64>)> {
    let raw = config.topics.raw.clone();
    let kafka = config.kafka.clone();
    let (range, partitions) = (range.clone(), partitions.map(<[i32]>::to_vec));
    let (plan, lows) = blocking(move || {
        let lows: HashMap<i32, i64> = sluice_core::kafka::watermarks(&kafka, &raw)?
            .into_iter()
            .map(|(p, low, _)| (p, low))
            .collect();
        // Offsets below the retained start come from the archive: start the Kafka part
        // at the seam instead of refusing them.
        let range = match &range {
            Range::Offsets(given) => Range::Offsets(
                given
                    .iter()
                    .map(|r| {
                        let low = lows.get(&r.partition).copied().unwrap_or(0);
                        let start = r.start.max(low);
                        OffsetRange {
                            start,
                            end: r.end.map(|e| e.max(start)),
                            ..*r
                        }
                    })
                    .collect(),
            ),
            other => other.clone(),
        };
        Ok((resolve(&kafka, &raw, &range, partitions.as_deref())?, lows))
    })?;
    Ok((plan, lows))
}
