//! The sessionize stage: event-time session windows per user over the enriched topic,
//! emitting one [`SessionSummary`] per session to the sessions topic.
//!
//! A session is a user's events separated by less than the inactivity gap. The watermark
//! of a partition is its newest event time minus the allowed lateness; a session closes
//! (and is emitted) once the watermark passes its end plus the gap. An event older than
//! the watermark that no open session can take is dead-lettered as `late`.
//!
//! State survives a restart by re-reading: the committed offset of a partition never cuts
//! through a session that is still open, nor through an emitted one whose events reach
//! past it. A restart therefore re-reads every such session whole, rebuilds the open ones,
//! and re-emits closed ones identically (same events, same `session_id`), which the
//! sessions table absorbs. Nothing is lost or counted twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::consume::Receiver;
use sluice_core::consumer_metrics::MeteredConsumer;
use sluice_core::events::{Component, DeadLettered, Emit};
use sluice_core::headers;
use sluice_core::kafka::PartitionRange;
use sluice_core::produce::deliver;
use sluice_core::replay_scope::ReplayScope;
use sluice_core::wiring::{Rewiring, Shared};
use sluice_schemas::setup::{reading_codec, writing_codec};
use sluice_schemas::{Codec, EnrichedEvent, SessionSummary};

pub mod config;
mod windows;

use tokio_util::sync::CancellationToken;
pub use windows::{sessions_of, Click, Late, Sessionizer, Windows};

use crate::transform::{StageError, StageStats};
use sluice_core::failure::{DeadLetter, Failure};

/// Where the sessionize stage reads and writes.
#[derive(Debug, Clone)]
pub struct SessionizeSpec {
    /// Consumer group.
    pub group: String,
    /// The enriched topic.
    pub input: String,
    /// The sessions topic.
    pub output: String,
    /// Dead letters (late events).
    pub dlq: String,
    /// Window settings.
    pub windows: Windows,
    /// How enriched events are read.
    pub input_codec: std::sync::Arc<Codec<EnrichedEvent>>,
    /// How session summaries are written.
    pub output_codec: std::sync::Arc<Codec<SessionSummary>>,
}

impl SessionizeSpec {
    /// The stage's wiring from its settings, as `rewiring` changes it.
    pub async fn of(
        shared: &Shared,
        settings: &config::SessionizeConfig,
        rewiring: &Rewiring,
    ) -> Result<Self, StageError> {
        let t = &shared.topics;
        Ok(Self {
            group: Rewiring::or(&rewiring.group, &settings.group),
            input: Rewiring::or(&rewiring.input, &t.enriched),
            output: Rewiring::or(&rewiring.output, &t.sessions),
            dlq: Rewiring::or(&rewiring.dlq, &t.dlq(&t.enriched)),
            windows: Windows {
                gap_ms: (settings.gap_s * 1000) as i64,
                allowed_lateness_ms: (settings.allowed_lateness_s * 1000) as i64,
            },
            input_codec: reading_codec(&shared.schemas)?,
            output_codec: writing_codec(&shared.schemas, &t.sessions).await?,
        })
    }
}

/// Run the sessionize stage (enriched → sessions) with `settings` until `shutdown`.
pub async fn run(
    shared: &Shared,
    settings: &config::SessionizeConfig,
    rewiring: &Rewiring,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    let spec = SessionizeSpec::of(shared, settings, rewiring).await?;
    sluice_core::telemetry::process_readiness().set(true);
    run_sessionize(&shared.kafka, &spec, shutdown).await
}

/// Run the sessionize stage until `shutdown`; open sessions are left to be rebuilt.
pub async fn run_sessionize(
    kafka: &KafkaConfig,
    spec: &SessionizeSpec,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    let mut consumer_config = kafka.consumer_config(&spec.group);
    consumer_config.set("enable.auto.commit", "false");
    let consumer: StreamConsumer<MeteredConsumer> =
        consumer_config.create_with_context(MeteredConsumer::new(&spec.group))?;
    consumer.subscribe(&[&spec.input])?;
    let receiver = Receiver::new(&consumer, None, NAME);
    let producer: FutureProducer = kafka.producer_config().create()?;
    let mut partitions: HashMap<i32, (Sessionizer, i64)> = HashMap::new();
    let mut stats = StageStats::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let records_in = metrics::counter!("sluice_stage_records_in_total", "stage" => NAME, "topic" => spec.input.clone());
    let replayed_late = metrics::counter!("sluice_stage_skipped_total", "stage" => NAME, "reason" => "replayed_late");
    replayed_late.increment(0);
    tracing::info!(input = %spec.input, output = %spec.output, group = %spec.group, "sessionize started");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => commit(&consumer, &spec.input, &mut partitions),
            (msg, _) = receiver.next() => {
                stats.consumed += 1;
                records_in.increment(1);
                let (p, offset) = (msg.partition(), msg.offset());
                let entry = partitions
                    .entry(p)
                    .or_insert_with(|| (Sessionizer::new(spec.windows), offset));
                entry.1 = offset + 1;
                let failure = match spec.input_codec.decode(msg.payload().unwrap_or_default()) {
                    Err(e) => Some(Failure::from(e)),
                    Ok(e) => match entry.0.add(&Click::of(&e, headers::processed_at(&msg)), offset) {
                        Ok(closed) => {
                            let mut out: Vec<SessionSummary> = closed.into_iter().collect();
                            out.extend(entry.0.close_due());
                            let now = sluice_core::now_ms();
                            for s in out {
                                emit(&producer, &spec.output, &spec.output_codec, &s, now, None, &shutdown).await?;
                                stats.published += 1;
                            }
                            None
                        }
                        // A replay's correction of old events is too late for the live
                        // sessions: `sluice replay --stage sessionize` recomputes them.
                        Err(_) if headers::get(msg.headers(), headers::REPLAY).is_some() => {
                            replayed_late.increment(1);
                            None
                        }
                        Err(late) => Some(Failure::new(
                            "late",
                            format!(
                                "late: event time {} is before the watermark {} (newest event time minus the allowed lateness) and no open session takes it",
                                e.event_time, late.watermark
                            ),
                        )),
                    },
                };
                if let Some(f) = failure {
                    stats.dead_lettered += 1;
                    DeadLettered { component: Component::Stage(NAME), class: f.class, reason: &f.reason }.emit();
                    let dl = DeadLetter::of(&msg, NAME, &f, 1).fit(kafka.max_message_bytes());
                    if !deliver(&producer, &spec.dlq, dl.key.as_deref(), &dl.payload, &dl.headers, &shutdown).await {
                        // Nothing more is committed: a restart reads this record again.
                        return Err(StageError::Undelivered(spec.dlq.clone()));
                    }
                }
            }
        }
    }
    commit(&consumer, &spec.input, &mut partitions);
    tracing::info!(
        consumed = stats.consumed,
        published = stats.published,
        dead_lettered = stats.dead_lettered,
        "sessionize stopped"
    );
    Ok(stats)
}

/// The stage's name in metrics, logs and dead letters.
const NAME: &str = "sessionize";

/// Send one summary, stamped with `processed_at` (and the replay, if any), and wait for
/// its ack (sessions are few; commits follow acks). A summary that does not encode is a
/// defect of this stage: it stops; so does one still undelivered at shutdown (nothing
/// more is committed, so a restart emits it again).
async fn emit(
    producer: &FutureProducer,
    topic: &str,
    codec: &Codec<SessionSummary>,
    s: &SessionSummary,
    processed_at: i64,
    replay: Option<&str>,
    shutdown: &CancellationToken,
) -> Result<(), StageError> {
    let payload = codec
        .encode(s)
        .map_err(|e| StageError::Encode(e.to_string()))?;
    let key = format!("{}:{}", s.tenant, s.user_id);
    let h = headers::stamp(
        OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: headers::TENANT,
                value: Some(s.tenant.as_str()),
            })
            .insert(Header {
                key: headers::ENCODING,
                value: Some(codec.encoding().as_str()),
            }),
        processed_at,
        replay,
    );
    if deliver(
        producer,
        topic,
        Some(key.as_bytes()),
        &payload,
        &h,
        shutdown,
    )
    .await
    {
        Ok(())
    } else {
        Err(StageError::Undelivered(topic.to_string()))
    }
}

/// What a sessionize replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionReplay {
    /// Records read.
    pub read: u64,
    /// Records skipped by the tenant filter.
    pub skipped: u64,
    /// Records that did not decode (left alone; the live stage dead-letters them).
    pub undecodable: u64,
    /// Sessions emitted.
    pub sessions: u64,
    /// Sessions within one gap of the range's first or last event time, not emitted.
    pub at_edges: u64,
    /// Whether it was interrupted (nothing was emitted then).
    pub interrupted: bool,
}

/// Recompute the sessions of the events in `ranges` of the input topic, in batch, and
/// emit them (stamped as produced by replay `replay`): the newest version of each event
/// counts, whatever order the versions come in. The sessions sink replaces the stored
/// sessions they overlap. Sessions within one gap of the range's earliest or latest
/// event time may continue outside it and are left alone (see [`sessions_of`]).
pub async fn replay_sessions(
    kafka: &KafkaConfig,
    spec: &SessionizeSpec,
    ranges: Vec<PartitionRange>,
    scope: Arc<ReplayScope>,
    replay: &str,
    stop: CancellationToken,
) -> Result<SessionReplay, StageError> {
    let mut out = SessionReplay::default();
    let (k, topic, codec, s, halt) = (
        kafka.clone(),
        spec.input.clone(),
        spec.input_codec.clone(),
        scope.clone(),
        stop.clone(),
    );
    let (clicks, read) = tokio::task::spawn_blocking(move || {
        let mut clicks = Vec::new();
        let mut counts = SessionReplay::default();
        sluice_core::kafka::read_ranges(
            &k,
            &topic,
            &ranges,
            || halt.is_cancelled(),
            |m| {
                counts.read += 1;
                if !s.keeps_tenant(m.headers()) {
                    counts.skipped += 1;
                    return Ok::<(), std::convert::Infallible>(());
                }
                match codec.decode(m.payload().unwrap_or_default()) {
                    Ok(e) => clicks.push(Click::of(&e, headers::processed_at(m))),
                    Err(_) => counts.undecodable += 1,
                }
                Ok(())
            },
        )
        .map_err(|e| match e {
            sluice_core::kafka::ReadError::Kafka(k) => StageError::Admin(k),
            sluice_core::kafka::ReadError::Each(never) => match never {},
        })?;
        Ok::<_, StageError>((clicks, counts))
    })
    .await
    .map_err(|e| StageError::Encode(format!("reading the range: {e}")))??;
    out.read = read.read;
    out.skipped = read.skipped;
    out.undecodable = read.undecodable;
    if stop.is_cancelled() {
        out.interrupted = true;
        return Ok(out);
    }
    let (sessions, edges) = sessions_of(&clicks, spec.windows.gap_ms);
    out.at_edges = edges as u64;
    let producer: FutureProducer = kafka.producer_config().create()?;
    let now = sluice_core::now_ms();
    for s in &sessions {
        scope.throttle().await;
        emit(
            &producer,
            &spec.output,
            &spec.output_codec,
            s,
            now,
            Some(replay),
            &stop,
        )
        .await?;
        out.sessions += 1;
    }
    Ok(out)
}

fn commit(
    consumer: &StreamConsumer<MeteredConsumer>,
    topic: &str,
    partitions: &mut HashMap<i32, (Sessionizer, i64)>,
) {
    let Ok(assigned) = consumer.assignment() else {
        return;
    };
    let mut tpl = TopicPartitionList::new();
    for e in assigned.elements() {
        if let Some((s, next)) = partitions.get_mut(&e.partition()) {
            let point = s.commit_point(*next);
            let _ = tpl.add_partition_offset(topic, e.partition(), Offset::Offset(point));
        }
    }
    // Partitions no longer ours are rebuilt by their new owner from its commits.
    partitions.retain(|p, _| assigned.elements().iter().any(|e| e.partition() == *p));
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "sessionize commit");
        }
    }
}
