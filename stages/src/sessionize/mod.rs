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
//! A restart decides as the first reading did: the watermark as of the committed offset
//! is kept in the commit's metadata, an event moves the watermark at most a minute past
//! its own ingest time (so one event from a clock far ahead cannot make everyone else's
//! late, and no wall clock is consulted), and a session's version is its newest event's.
//! So the re-emitted sessions are byte-identical and carry the same versions. One
//! exception: a partition without events for longer than the gap plus the lateness
//! (processing time) closes its open sessions, which a re-read may not repeat.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
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
pub use windows::{
    sessions_of, Click, CommitPoint, Emitted, Eviction, Late, Limits, Sessionizer, Windows,
    CLOCK_SLACK_MS,
};

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
                limits: Limits {
                    open_sessions: settings.max_open_sessions,
                    open_sessions_per_tenant: settings.max_open_sessions_per_tenant,
                    session_events: settings.max_session_events,
                },
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
    let mut pending = Pending::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let records_in = metrics::counter!("sluice_stage_records_in_total", "stage" => NAME, "topic" => spec.input.clone());
    let replayed_late = metrics::counter!("sluice_stage_skipped_total", "stage" => NAME, "reason" => "replayed_late");
    replayed_late.increment(0);
    for why in [
        Eviction::OpenSessions,
        Eviction::TenantOpenSessions,
        Eviction::SessionEvents,
    ] {
        metrics::counter!(EVICTED, "reason" => why.as_str()).increment(0);
    }
    tracing::info!(input = %spec.input, output = %spec.output, group = %spec.group, "sessionize started");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                for (p, state) in partitions.iter_mut() {
                    if state.idle_for() >= idle_after && state.sessions.has_open() {
                        let closed = state.sessions.close_all();
                        tracing::debug!(partition = *p, sessions = closed.len(), "idle partition: sessions closed");
                        for s in closed {
                            pending.push(emit(&producer, &spec.output, &spec.output_codec, &s.summary, s.version, None, &shutdown)?);
                            stats.published += 1;
                        }
                    }
                }
                // Commits follow the acks of every session emitted before them.
                settle(&mut pending).await?;
                commit(&consumer, &spec.input, &mut partitions)
            }
            Some(acked) = pending.next(), if !pending.is_empty() => acked?,
            (msg, _) = receiver.next() => {
                stats.consumed += 1;
                records_in.increment(1);
                let (p, offset) = (msg.partition(), msg.offset());
                if partitions.get(&p).is_none_or(|s| offset < s.next) {
                    // First read of the partition, or a re-read from its commit point (a
                    // re-assignment or seek): its sessions are rebuilt from the records,
                    // as after a restart, with the watermark the commit recorded.
                    if let Some(s) = partitions.get(&p) {
                        tracing::info!(partition = p, from = offset, expected = s.next, "partition re-read from an earlier offset; its sessions are rebuilt");
                    }
                    let newest = committed_newest(&consumer, &spec.input, p, offset);
                    partitions.insert(p, PartitionState::new(spec.windows, offset, newest));
                }
                let Some(entry) = partitions.get_mut(&p) else { continue };
                entry.at(offset);
                let failure = match spec.input_codec.decode(msg.payload().unwrap_or_default()) {
                    Err(e) => Some(Failure::from(e)),
                    Ok(e) => match entry.sessions.add(&Click::of(&e, headers::version(&msg)), offset) {
                        Ok(mut out) => {
                            out.extend(entry.sessions.close_due());
                            for s in out {
                                if let Some(why) = s.evicted {
                                    evicted(p, why);
                                }
                                pending.push(emit(&producer, &spec.output, &spec.output_codec, &s.summary, s.version, None, &shutdown)?);
                                stats.published += 1;
                                if pending.len() >= MAX_PENDING {
                                    if let Some(acked) = pending.next().await {
                                        acked?;
                                    }
                                }
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
    settle(&mut pending).await?;
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

/// Sessions closed before the watermark passed them, to keep state within its limits.
const EVICTED: &str = "sluice_sessionize_evicted_sessions_total";

/// Count a session closed early, and say so (at most once a minute: a flood evicts on
/// every event).
fn evicted(partition: i32, why: Eviction) {
    static LAST_WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    metrics::counter!(EVICTED, "reason" => why.as_str()).increment(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_WARNED.load(std::sync::atomic::Ordering::Relaxed);
    if now >= last + 60
        && LAST_WARNED
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::warn!(
            partition,
            limit = why.as_str(),
            "session closed early to bound sessionize's memory (more in {EVICTED})"
        );
    }
}

/// One summary's delivery: it ends with the broker's ack.
type Delivery = Pin<Box<dyn Future<Output = Result<(), StageError>> + Send>>;

/// Summaries sent and not yet acknowledged; a commit waits for all of them.
type Pending = FuturesUnordered<Delivery>;

/// Most summaries awaiting acks. Each used to be awaited before the next record: a
/// flood that evicts a session per event then ran at one broker round trip per event.
const MAX_PENDING: usize = 10_000;

/// Wait for every pending summary's ack.
async fn settle(pending: &mut Pending) -> Result<(), StageError> {
    while let Some(acked) = pending.next().await {
        acked?;
    }
    Ok(())
}

/// Send one summary, stamped with `version` (and the replay, if any); the returned
/// future ends with its ack (commits follow acks). A summary that does not encode is a
/// defect of this stage: it stops; so does one still undelivered at shutdown (nothing
/// more is committed, so a restart emits it again).
fn emit(
    producer: &FutureProducer,
    topic: &str,
    codec: &Codec<SessionSummary>,
    s: &SessionSummary,
    version: i64,
    replay: Option<&str>,
    shutdown: &CancellationToken,
) -> Result<Delivery, StageError> {
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
        version,
        replay,
    );
    let (producer, topic, shutdown) = (producer.clone(), topic.to_string(), shutdown.clone());
    Ok(Box::pin(async move {
        if deliver(
            &producer,
            &topic,
            Some(key.as_bytes()),
            &payload,
            &h,
            &shutdown,
        )
        .await
        {
            Ok(())
        } else {
            Err(StageError::Undelivered(topic))
        }
    }))
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
                    Ok(e) => clicks.push(Click::of(&e, headers::version(m))),
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
    // The replay's epoch: its sessions replace the live ones whatever the clocks say.
    let now = headers::version_of(scope.epoch(), sluice_core::now_ms());
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
        )?
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
    /// A partition read from `offset`, whose newest event time before it was `newest`.
    fn new(windows: Windows, offset: i64, newest: Option<i64>) -> Self {
        Self {
            sessions: Sessionizer::resume(windows, newest),
            next: offset,
            last_event: std::time::Instant::now(),
        }
    }

    /// A record at `offset` arrives.
    fn at(&mut self, offset: i64) {
        self.next = offset + 1;
        self.last_event = std::time::Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_event.elapsed()
    }
}

/// Prefix of the commit metadata that records a partition's newest event time as of the
/// committed offset.
const NEWEST: &str = "sluice.newest=";

/// The newest event time the group's commit of `partition` recorded, when reading starts
/// exactly at that commit (otherwise nothing is known and the watermark starts afresh).
fn committed_newest(
    consumer: &StreamConsumer<MeteredConsumer>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(partition, error = %e, "could not read the committed watermark; it starts afresh");
            return None;
        }
    };
    let e = committed.find_partition(topic, partition)?;
    if e.offset() != Offset::Offset(offset) {
        return None;
    }
    e.metadata().strip_prefix(NEWEST)?.parse().ok()
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
            let _ = tpl.add_partition_offset(topic, e.partition(), Offset::Offset(point.offset));
            if let (Some(newest), Some(mut elem)) =
                (point.newest, tpl.find_partition(topic, e.partition()))
            {
                elem.set_metadata(format!("{NEWEST}{newest}"));
            }
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
            received_at: at,
            // Versions differ per event: a session's version is its newest event's.
            version: 1_000 + offset,
        }
    }

    /// Feed `events` from offset `from` into `state`; returns the sessions emitted (with
    /// the offset of the event that closed each) and the offsets of late events.
    #[allow(clippy::type_complexity)]
    fn feed(
        state: &mut PartitionState,
        events: &[(&str, i64)],
        from: usize,
    ) -> (Vec<(i64, Emitted)>, Vec<i64>) {
        let (mut emitted, mut late) = (Vec::new(), Vec::new());
        for (offset, (user, at)) in events.iter().enumerate().skip(from) {
            let offset = offset as i64;
            state.at(offset);
            match state.sessions.add(&click(user, offset, *at), offset) {
                Ok(closed) => emitted.extend(closed.into_iter().map(|c| (offset, c))),
                Err(_) => late.push(offset),
            }
            emitted.extend(state.sessions.close_due().into_iter().map(|c| (offset, c)));
        }
        (emitted, late)
    }

    /// A restart resumes at the commit point with the watermark the commit recorded, so
    /// the re-read decides exactly as the first reading did: the same late event, and
    /// byte-identical sessions with the same versions. Without the recorded watermark,
    /// the re-read starts lower and takes the late event into a's session.
    #[test]
    fn a_restart_from_the_commit_point_decides_and_emits_the_same() {
        let w = Windows {
            gap_ms: 30 * MIN,
            allowed_lateness_ms: 5 * MIN,
            limits: Limits::default(),
        };
        let events = [
            ("z", 300 * MIN),  // 0: moves the watermark to 295
            ("a", 296 * MIN),  // 1: a's session opens (the commit point)
            ("c", 292 * MIN),  // 2: late: before 295, and c has no open session
            ("z", 331 * MIN),  // 3: past z's gap: z's first session (offset 0) closes
            ("y", 1000 * MIN), // 4: closes everything
        ];
        let mut first = PartitionState::new(w, 0, None);
        let (emitted, late) = feed(&mut first, &events[..4], 0);
        assert_eq!(late, vec![2]);
        assert_eq!(emitted.len(), 1, "z's first session");
        let point = first.sessions.commit_point(first.next);
        assert_eq!(
            point,
            CommitPoint {
                offset: 1,
                newest: Some(300 * MIN)
            },
            "a's open session holds the point; the watermark there came from z at 300"
        );
        let (rest, late_rest) = feed(&mut first, &events, 4);
        assert!(late_rest.is_empty());
        // The process stops after offset 3; the next one resumes at the point.
        let mut again = PartitionState::new(w, point.offset, point.newest);
        let (re_emitted, re_late) = feed(&mut again, &events, point.offset as usize);
        assert_eq!(re_late, vec![2], "the same event is late again");
        // z's first session lies wholly before the point: emitted once, never re-read.
        let after_point: Vec<&Emitted> = emitted
            .iter()
            .chain(&rest)
            .map(|(_, e)| e)
            .filter(|e| e.session_id != "z-18000000")
            .collect();
        assert_eq!(after_point.len(), 2);
        let re: Vec<&Emitted> = re_emitted.iter().map(|(_, e)| e).collect();
        assert_eq!(re, after_point, "identical sessions, identical versions");
        assert_eq!(re[0].session_id, "a-17760000");
        assert_eq!(re[0].version, 1_001);
    }
}
