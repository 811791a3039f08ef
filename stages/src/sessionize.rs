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
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::consumer_metrics::MeteredConsumer;
use sluice_schemas::{Codec, EnrichedEvent, SessionSummary};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::{DeadLetter, Failure};
use crate::runtime::{StageError, StageStats};

/// Window settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Inactivity that ends a session, milliseconds.
    pub gap_ms: i64,
    /// How far behind the newest event time an event may be, milliseconds.
    pub allowed_lateness_ms: i64,
}

#[derive(Debug, Clone)]
struct Open {
    start: i64,
    end: i64,
    page_views: i32,
    events: i32,
    first_offset: i64,
    last_offset: i64,
}

/// The sessions of one partition.
#[derive(Debug)]
pub struct Sessionizer {
    windows: Windows,
    open: HashMap<(String, String), Open>,
    newest: Option<i64>,
    /// Offset ranges of emitted sessions that may still straddle the commit point.
    closed: Vec<(i64, i64)>,
}

/// An event older than the watermark that no open session takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Late {
    /// The partition's watermark when it arrived.
    pub watermark: i64,
}

impl Sessionizer {
    /// No sessions yet.
    pub fn new(windows: Windows) -> Self {
        Self {
            windows,
            open: HashMap::new(),
            newest: None,
            closed: Vec::new(),
        }
    }

    /// The newest event time minus the allowed lateness.
    pub fn watermark(&self) -> Option<i64> {
        self.newest.map(|n| n - self.windows.allowed_lateness_ms)
    }

    /// Add one event at `offset`. Returns the session it closed, if it started a new one
    /// for a user whose previous session had ended.
    pub fn add(
        &mut self,
        tenant: &str,
        user: &str,
        page_view: bool,
        at: i64,
        offset: i64,
    ) -> Result<Option<SessionSummary>, Late> {
        let gap = self.windows.gap_ms;
        let key = (tenant.to_string(), user.to_string());
        let fits = |s: &Open| at >= s.start - gap && at <= s.end + gap;
        let watermark = self.watermark();
        let mut closed = None;
        match self.open.get_mut(&key) {
            Some(s) if fits(s) => {
                s.start = s.start.min(at);
                s.end = s.end.max(at);
                s.events += 1;
                s.page_views += i32::from(page_view);
                s.last_offset = offset;
            }
            existing => {
                if let Some(w) = watermark {
                    let before_open = existing.as_ref().is_some_and(|s| at < s.start);
                    if at < w || before_open {
                        return Err(Late { watermark: w });
                    }
                }
                if let Some(prev) = self.open.remove(&key) {
                    closed = Some(self.emit(&key, prev));
                }
                self.open.insert(
                    key,
                    Open {
                        start: at,
                        end: at,
                        page_views: i32::from(page_view),
                        events: 1,
                        first_offset: offset,
                        last_offset: offset,
                    },
                );
            }
        }
        self.newest = Some(self.newest.map_or(at, |n| n.max(at)));
        Ok(closed)
    }

    fn emit(&mut self, key: &(String, String), s: Open) -> SessionSummary {
        self.closed.push((s.first_offset, s.last_offset));
        SessionSummary {
            session_id: format!("{}-{}", key.1, s.start),
            tenant: key.0.clone(),
            user_id: key.1.clone(),
            started_at: s.start,
            ended_at: s.end,
            page_views: s.page_views,
            events: s.events,
            duration_ms: s.end - s.start,
        }
    }

    /// Close and return every session the watermark has passed (end + gap), oldest first.
    pub fn close_due(&mut self) -> Vec<SessionSummary> {
        let Some(w) = self.watermark() else {
            return Vec::new();
        };
        let gap = self.windows.gap_ms;
        let mut due: Vec<(String, String)> = self
            .open
            .iter()
            .filter(|(_, s)| s.end + gap < w)
            .map(|(k, _)| k.clone())
            .collect();
        due.sort_by_key(|k| self.open.get(k).map_or(0, |s| s.start));
        due.into_iter()
            .filter_map(|k| self.open.remove(&k).map(|s| self.emit(&k, s)))
            .collect()
    }

    /// The offset to commit, given that everything before `next` was read: not past the
    /// first event of an open session, nor through an emitted session that reaches past it.
    pub fn commit_point(&mut self, next: i64) -> i64 {
        let mut point = self
            .open
            .values()
            .map(|s| s.first_offset)
            .min()
            .unwrap_or(next)
            .min(next);
        loop {
            let straddling = self
                .closed
                .iter()
                .filter(|(first, last)| *first < point && *last >= point)
                .map(|(first, _)| *first)
                .min();
            match straddling {
                Some(first) => point = first,
                None => break,
            }
        }
        // Emitted sessions wholly before the point can never be re-read: forget them.
        self.closed.retain(|(_, last)| *last >= point);
        point
    }
}

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

/// Run the sessionize stage until `shutdown`; open sessions are left to be rebuilt.
pub async fn run_sessionize(
    kafka: &KafkaConfig,
    spec: &SessionizeSpec,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    const NAME: &str = "sessionize";
    let mut consumer_config = kafka.consumer_config(&spec.group);
    consumer_config.set("enable.auto.commit", "false");
    let consumer: StreamConsumer<MeteredConsumer> =
        consumer_config.create_with_context(MeteredConsumer::new(&spec.group))?;
    consumer.subscribe(&[&spec.input])?;
    let producer: FutureProducer = kafka.producer_config().create()?;
    let mut partitions: HashMap<i32, (Sessionizer, i64)> = HashMap::new();
    let mut stats = StageStats::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tracing::info!(input = %spec.input, output = %spec.output, group = %spec.group, "sessionize started");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => commit(&consumer, &spec.input, &mut partitions),
            msg = consumer.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "consume error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                stats.consumed += 1;
                metrics::counter!("sluice_stage_records_in_total", "stage" => NAME, "topic" => spec.input.clone()).increment(1);
                let (p, offset) = (msg.partition(), msg.offset());
                let entry = partitions
                    .entry(p)
                    .or_insert_with(|| (Sessionizer::new(spec.windows), offset));
                entry.1 = offset + 1;
                let failure = match spec.input_codec.decode(msg.payload().unwrap_or_default()) {
                    Err(e) => Some(Failure::of_decode(e)),
                    Ok(e) => match entry.0.add(&e.tenant, &e.user_id, e.event_type == "page_view", e.event_time, offset) {
                        Ok(closed) => {
                            let mut out: Vec<SessionSummary> = closed.into_iter().collect();
                            out.extend(entry.0.close_due());
                            let dl = None;
                            for s in out {
                                emit(&producer, &spec.output, &spec.output_codec, &s).await;
                                stats.published += 1;
                            }
                            dl
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
                    metrics::counter!("sluice_stage_dead_letters_total", "stage" => NAME, "reason" => f.class).increment(1);
                    let dl = DeadLetter::of(&msg, NAME, &f, 1);
                    let mut record = FutureRecord::to(&spec.dlq).payload(&dl.payload).headers(dl.headers.clone());
                    if let Some(k) = &dl.key {
                        record = record.key(k);
                    }
                    if let Err((e, _)) = producer.send(record, Duration::from_secs(30)).await {
                        return Err(e.into());
                    }
                }
            }
        }
    }
    commit(&consumer, &spec.input, &mut partitions);
    tracing::info!(?stats, "sessionize stopped");
    Ok(stats)
}

/// Send one summary and wait for its ack (sessions are few; commits follow acks).
async fn emit(
    producer: &FutureProducer,
    topic: &str,
    codec: &Codec<SessionSummary>,
    s: &SessionSummary,
) {
    let payload = match codec.encode(s) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "session summary does not encode");
            return;
        }
    };
    let key = format!("{}:{}", s.tenant, s.user_id);
    let mut backoff = Duration::from_millis(100);
    loop {
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => return,
            Err((e, _)) => {
                tracing::warn!(error = %e, "session summary not delivered; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn windows() -> Windows {
        Windows {
            gap_ms: 30 * MIN,
            allowed_lateness_ms: 5 * MIN,
        }
    }

    #[test]
    fn gaps_split_sessions_and_the_watermark_closes_them() {
        let mut s = Sessionizer::new(windows());
        let mut out = Vec::new();
        for (i, (user, min, pv)) in [
            ("a", 0, true),
            ("a", 10, true),
            ("b", 12, false),
            ("a", 25, false),
            ("a", 70, true),
            ("b", 120, true),
        ]
        .into_iter()
        .enumerate()
        {
            out.extend(s.add("t", user, pv, min * MIN, i as i64).unwrap());
            out.extend(s.close_due());
        }
        let got: Vec<(String, i64, i64, i32, i32)> = out
            .iter()
            .map(|x| {
                (
                    x.user_id.clone(),
                    x.started_at / MIN,
                    x.ended_at / MIN,
                    x.page_views,
                    x.events,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 0, 25, 2, 3),
                ("b".into(), 12, 12, 0, 1),
                ("a".into(), 70, 70, 1, 1),
            ]
        );
        assert_eq!(out[0].session_id, "a-0");
        assert_eq!(out[0].duration_ms, 25 * MIN);
        // b's second session is still open: the commit point stays at its first event.
        assert_eq!(s.commit_point(6), 5);
    }

    #[test]
    fn late_events_are_refused() {
        let mut s = Sessionizer::new(windows());
        s.add("t", "a", true, 100 * MIN, 0).unwrap();
        // Within the lateness: a new session for another user is fine.
        s.add("t", "b", true, 96 * MIN, 1).unwrap();
        // Older than the watermark (newest - 5 min) and no open session takes it.
        assert_eq!(
            s.add("t", "c", true, 90 * MIN, 2),
            Err(Late {
                watermark: 95 * MIN
            })
        );
        // An open session within the gap still takes an old event.
        assert!(s.add("t", "a", true, 80 * MIN, 3).is_ok());
    }

    #[test]
    fn the_commit_point_never_cuts_a_session() {
        let mut s = Sessionizer::new(windows());
        // a: offsets 0 and 3 (one session); b: offsets 1, 2; b's session closes when b
        // starts a new one at offset 4, while a's (from 0) stays open.
        s.add("t", "a", true, 0, 0).unwrap();
        s.add("t", "b", true, 0, 1).unwrap();
        s.add("t", "b", true, MIN, 2).unwrap();
        s.add("t", "a", true, 2 * MIN, 3).unwrap();
        let closed = s.add("t", "b", true, 40 * MIN, 4).unwrap();
        assert!(closed.is_some());
        assert_eq!(s.commit_point(5), 0, "a's open session starts at offset 0");
        // Both old sessions close; a's new one (offset 5) holds the point.
        s.add("t", "a", true, 100 * MIN, 5).unwrap();
        assert_eq!(
            s.close_due().len(),
            1,
            "b's second session is past the watermark"
        );
        assert_eq!(s.commit_point(6), 5);
    }

    #[test]
    fn an_emitted_session_reaching_past_the_point_moves_it_back() {
        let mut s = Sessionizer::new(windows());
        s.add("t", "a", true, 0, 0).unwrap();
        s.add("t", "b", true, MIN, 1).unwrap();
        s.add("t", "a", true, 2 * MIN, 2).unwrap();
        // a's first session (offsets 0..2) is emitted; b's (from offset 1) stays open.
        assert!(s.add("t", "a", true, 40 * MIN, 3).unwrap().is_some());
        // Committing 1 would cut a's emitted session: a restart would re-read half of it.
        assert_eq!(s.commit_point(4), 0);
    }
}
