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
//! sessions table absorbs. Nothing is lost or counted twice. A partition re-assigned
//! after a rebalance is rebuilt the same way (reading from before the offset expected
//! next drops its state).
//!
//! The watermark never passes the wall clock by more than a minute, so one event from a
//! clock far ahead cannot make everyone else's late; and a partition without events for
//! longer than the gap plus the lateness (processing time) closes its open sessions.

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
pub use windows::{sessions_of, Click, Late, Sessionizer, Windows, CLOCK_SLACK_MS};

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
    let max_message_bytes = kafka.max_message_bytes();
    let mut partitions: HashMap<i32, PartitionState> = HashMap::new();
    // A partition without events for this long closes its sessions (processing time).
    let idle_after = Duration::from_millis(
        (spec.windows.gap_ms + spec.windows.allowed_lateness_ms).max(0) as u64,
    );
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
            _ = tick.tick() => {
                let now = sluice_core::now_ms();
                for (p, state) in partitions.iter_mut() {
                    if state.idle_for() >= idle_after && state.sessions.has_open() {
                        let closed = state.sessions.close_all();
                        tracing::debug!(partition = *p, sessions = closed.len(), "idle partition: sessions closed");
                        for s in closed {
                            emit(&producer, &spec.output, &spec.output_codec, &s, now, None, &shutdown).await?;
                            stats.published += 1;
                        }
                    }
                }
                commit(&consumer, &spec.input, &mut partitions)
            }
            (msg, _) = receiver.next() => {
                stats.consumed += 1;
                records_in.increment(1);
                let (p, offset) = (msg.partition(), msg.offset());
                let entry = partitions
                    .entry(p)
                    .or_insert_with(|| PartitionState::new(spec.windows, offset));
                entry.at(p, offset, spec.windows);
                let failure = match spec.input_codec.decode(msg.payload().unwrap_or_default()) {
                    Err(e) => Some(Failure::from(e)),
                    Ok(e) => match entry.sessions.add(&Click::of(&e, headers::processed_at(&msg)), offset) {
                        Ok(closed) => {
                            let mut out: Vec<SessionSummary> = closed.into_iter().collect();
                            out.extend(entry.sessions.close_due());
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
                    let dl = DeadLetter::of(&msg, NAME, &f, 1).fit(max_message_bytes);
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

/// One partition's sessions, the offset expected next, and when it last had an event.
struct PartitionState {
    sessions: Sessionizer,
    next: i64,
    last_event: std::time::Instant,
}

impl PartitionState {
    fn new(windows: Windows, offset: i64) -> Self {
        Self {
            sessions: Sessionizer::new(windows),
            next: offset,
            last_event: std::time::Instant::now(),
        }
    }

    /// A record at `offset` arrives. Reading from before the expected offset means the
    /// partition was re-assigned (or sought) and is re-read from its commit point: its
    /// sessions are rebuilt from the records, as after a restart, instead of counting
    /// the re-read events a second time.
    fn at(&mut self, partition: i32, offset: i64, windows: Windows) {
        if offset < self.next {
            tracing::info!(
                partition,
                from = offset,
                expected = self.next,
                "partition re-read from an earlier offset; its sessions are rebuilt"
            );
            self.sessions = Sessionizer::new(windows);
        }
        self.next = offset + 1;
        self.last_event = std::time::Instant::now();
        self.sessions.set_clock(sluice_core::now_ms());
    }

    fn idle_for(&self) -> Duration {
        self.last_event.elapsed()
    }
}

fn commit(
    consumer: &StreamConsumer<MeteredConsumer>,
    topic: &str,
    partitions: &mut HashMap<i32, PartitionState>,
) {
    let Ok(assigned) = consumer.assignment() else {
        return;
    };
    let mut tpl = TopicPartitionList::new();
    for e in assigned.elements() {
        if let Some(state) = partitions.get_mut(&e.partition()) {
            let point = state.sessions.commit_point(state.next);
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn click(user: &str, offset: i64, at: i64) -> Click {
        Click {
            tenant: "t".into(),
            user: user.into(),
            event_id: format!("e{offset}"),
            at,
            page_view: true,
            version: 1,
        }
    }

    /// A partition re-assigned to this process is re-read from its commit point: its
    /// sessions are rebuilt, the re-read events are neither late nor counted twice, and
    /// the emitted session comes out again identical (which the sessions table absorbs).
    #[test]
    fn a_partition_read_again_from_its_commit_point_is_rebuilt() {
        let w = Windows {
            gap_ms: 30 * MIN,
            allowed_lateness_ms: 5 * MIN,
        };
        // a's first session closes when a comes back at minute 45; b's (minute 12) is
        // still open then, and holds the commit point before a's emitted events.
        let events = [
            ("a", 10 * MIN),
            ("b", 12 * MIN),
            ("a", 11 * MIN),
            ("a", 45 * MIN),
        ];
        // Feed the events from offset `from`; returns (sessions emitted, late events).
        let feed = |state: &mut PartitionState, from: usize| {
            let (mut emitted, mut late) = (Vec::new(), 0);
            for (offset, (user, at)) in events.iter().enumerate().skip(from) {
                state.at(0, offset as i64, w);
                match state
                    .sessions
                    .add(&click(user, offset as i64, *at), offset as i64)
                {
                    Ok(closed) => emitted.extend(closed),
                    Err(_) => late += 1,
                }
                emitted.extend(state.sessions.close_due());
            }
            let sessions: Vec<(String, i32)> = emitted
                .iter()
                .map(|s: &SessionSummary| (s.session_id.clone(), s.events))
                .collect();
            (sessions, late)
        };
        let mut state = PartitionState::new(w, 0);
        let (first, late) = feed(&mut state, 0);
        assert_eq!(
            (first.clone(), late),
            (vec![("a-600000".to_string(), 2)], 0)
        );
        let point = state.sessions.commit_point(state.next);
        assert_eq!(
            point, 0,
            "b's open session (and a's emitted one) hold the point"
        );
        // Revoked and assigned again: the consumer resumes at the commit point.
        let (again, late) = feed(&mut state, point as usize);
        assert_eq!(late, 0, "no re-read event is late");
        assert_eq!(again, first, "the same session, counted once");
    }
}
