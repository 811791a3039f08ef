//! `sluice replay`: reprocess a range of a retained topic into a stage or sink under a
//! fresh consumer group (bounded by the end offsets captured at start), reset an existing
//! group to the start of the range, or copy the range to another topic.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::replay_scope::{Admit, ReplayScope};
use sluice_core::Config;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{self, Rewiring, SinkName, StageName};

pub mod diff;

/// Header a copied record carries: `topic/partition/offset` of the record it copies.
pub const REPLAYED_FROM: &str = "sluice.replayed_from";

const TIMEOUT: Duration = Duration::from_secs(10);

/// Which records of the source topic to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Range {
    /// Records whose timestamps fall in `[from, to)`; an open side is the log start or end.
    Times {
        /// First time included.
        from: Option<DateTime<Utc>>,
        /// First time excluded.
        to: Option<DateTime<Utc>>,
    },
    /// Explicit offsets per partition.
    Offsets(Vec<OffsetRange>),
}

/// `partition=start..end` from `--offsets`; without an end, up to the end at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetRange {
    /// Partition.
    pub partition: i32,
    /// First offset included.
    pub start: i64,
    /// First offset excluded (`None`: the partition's end when the replay starts).
    pub end: Option<i64>,
}

/// Parse `--offsets`: `0=100..200,1=0..,2=5..7`.
pub fn parse_offsets(spec: &str) -> Result<Vec<OffsetRange>, String> {
    let mut out: Vec<OffsetRange> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("expected PARTITION=START..[END] such as 0=100..200, got `{part}`");
        let (p, range) = part.split_once('=').ok_or_else(bad)?;
        let (start, end) = range.split_once("..").ok_or_else(bad)?;
        let partition: i32 = p.trim().parse().map_err(|_| bad())?;
        let start: i64 = start.trim().parse().map_err(|_| bad())?;
        let end: Option<i64> = match end.trim() {
            "" => None,
            e => Some(e.parse().map_err(|_| bad())?),
        };
        if partition < 0 || start < 0 || end.is_some_and(|e| e < start) {
            return Err(format!("`{part}`: needs partition ≥ 0 and 0 ≤ START ≤ END"));
        }
        if out.iter().any(|r| r.partition == partition) {
            return Err(format!("partition {partition} is given twice"));
        }
        out.push(OffsetRange {
            partition,
            start,
            end,
        });
    }
    if out.is_empty() {
        return Err("expected at least one PARTITION=START..[END]".into());
    }
    Ok(out)
}

/// Parse an RFC 3339 time for `--from`/`--to`.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected an RFC 3339 time such as 2026-11-23T08:00:00Z ({e})"))
}

/// Parse a duration for `--last`, such as `2h` or `90m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("expected a duration such as 2h or 90m ({e})"))
}

/// The offsets of one partition a replay covers: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionPlan {
    /// Partition.
    pub partition: i32,
    /// First offset replayed.
    pub start: i64,
    /// First offset not replayed (captured when the replay starts).
    pub end: i64,
}

/// What a replay will read: the source topic and its partition ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Source topic.
    pub topic: String,
    /// Every partition of the topic, in order.
    pub partitions_total: usize,
    /// The ranges, one per replayed partition.
    pub ranges: Vec<PartitionPlan>,
}

impl Plan {
    /// Records in the plan (before any tenant filter).
    pub fn records(&self) -> i64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// End offset per replayed partition.
    pub fn ends(&self) -> HashMap<i32, i64> {
        self.ranges.iter().map(|r| (r.partition, r.end)).collect()
    }

    /// A table of partitions, offsets and record counts.
    pub fn table(&self) -> String {
        let mut s = format!(
            "topic {}\n{:>9} {:>14} {:>14} {:>12}\n",
            self.topic, "partition", "start", "end", "records"
        );
        for r in &self.ranges {
            s += &format!(
                "{:>9} {:>14} {:>14} {:>12}\n",
                r.partition,
                r.start,
                r.end,
                r.end - r.start
            );
        }
        s += &format!(
            "{:>9} {:>14} {:>14} {:>12}\n",
            "total",
            "",
            "",
            self.records()
        );
        s
    }

    /// The `--offsets` value that replays what is left after `done` (partition → next offset).
    pub fn resume_offsets(&self, done: &HashMap<i32, i64>) -> String {
        self.ranges
            .iter()
            .filter_map(|r| {
                let next = done
                    .get(&r.partition)
                    .copied()
                    .unwrap_or(r.start)
                    .max(r.start);
                (next < r.end).then(|| format!("{}={}..{}", r.partition, next, r.end))
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Resolve `range` on `topic` into offsets (blocking: call from a blocking context).
/// `partitions` limits the replay to some partitions.
pub fn resolve(
    kafka: &KafkaConfig,
    topic: &str,
    range: &Range,
    partitions: Option<&[i32]>,
) -> Result<Plan> {
    let consumer: BaseConsumer = kafka.consumer_config("sluice-replay-plan").create()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .with_context(|| format!("metadata of topic {topic}"))?;
    let all: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if all.is_empty() {
        bail!("--source: topic `{topic}` does not exist");
    }
    if let Some(wanted) = partitions {
        if let Some(p) = wanted.iter().find(|p| !all.contains(p)) {
            bail!(
                "--partitions: topic `{topic}` has partitions 0..{}, not {p}",
                all.len()
            );
        }
    }
    let chosen = |p: i32| partitions.is_none_or(|w| w.contains(&p));
    let mut ranges = Vec::new();
    match range {
        Range::Times { from, to } => {
            if let (Some(f), Some(t)) = (from, to) {
                if f >= t {
                    bail!("--from ({f}) must be before --to ({t})");
                }
            }
            let at = |time: Option<DateTime<Utc>>| -> Result<HashMap<i32, Option<i64>>> {
                let Some(time) = time else {
                    return Ok(HashMap::new());
                };
                let mut tpl = TopicPartitionList::new();
                for &p in &all {
                    tpl.add_partition_offset(topic, p, Offset::Offset(time.timestamp_millis()))?;
                }
                let found = consumer
                    .offsets_for_times(tpl, TIMEOUT)
                    .context("looking up offsets for times")?;
                Ok(found
                    .elements()
                    .iter()
                    .map(|e| match e.offset() {
                        Offset::Offset(o) => (e.partition(), Some(o)),
                        // No record at or after that time: the end.
                        _ => (e.partition(), None),
                    })
                    .collect())
            };
            let starts = at(*from)?;
            let ends = at(*to)?;
            for &p in all.iter().filter(|p| chosen(**p)) {
                let (low, high) = consumer.fetch_watermarks(topic, p, TIMEOUT)?;
                let start = match from {
                    None => low,
                    Some(_) => starts.get(&p).copied().flatten().unwrap_or(high),
                };
                let end = match to {
                    None => high,
                    Some(_) => ends.get(&p).copied().flatten().unwrap_or(high),
                };
                let start = start.clamp(low, high);
                ranges.push(PartitionPlan {
                    partition: p,
                    start,
                    end: end.clamp(start, high),
                });
            }
        }
        Range::Offsets(given) => {
            for r in given {
                if !all.contains(&r.partition) {
                    bail!(
                        "--offsets: topic `{topic}` has partitions 0..{}, not {}",
                        all.len(),
                        r.partition
                    );
                }
                if !chosen(r.partition) {
                    continue;
                }
                let (low, high) = consumer.fetch_watermarks(topic, r.partition, TIMEOUT)?;
                if r.start < low {
                    bail!(
                        "--offsets: partition {} starts at offset {low} (older records were deleted by retention), not {}",
                        r.partition, r.start
                    );
                }
                let end = r.end.unwrap_or(high);
                if end > high || r.start > high {
                    bail!(
                        "--offsets: partition {} ends at offset {high}, not {}",
                        r.partition,
                        end.max(r.start)
                    );
                }
                ranges.push(PartitionPlan {
                    partition: r.partition,
                    start: r.start,
                    end,
                });
            }
        }
    }
    Ok(Plan {
        topic: topic.to_string(),
        partitions_total: all.len(),
        ranges,
    })
}

/// Where the replayed records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Through a stage.
    Stage(StageName),
    /// Into a sink.
    Sink(SinkName),
    /// Copied as they are to another topic.
    Copy(String),
}

/// How a stage or sink target is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Run it here under this fresh consumer group, stopping at the plan's end offsets.
    FreshGroup(String),
    /// Move its configured group to the start of the range; its own processes reprocess.
    ResetGroup,
}

/// Filters of a replay.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Only records with this tenant header are processed (the rest are skipped).
    pub tenant: Option<String>,
    /// Most records per second.
    pub rate: Option<NonZeroU32>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Records read from the source.
    pub read: u64,
    /// Records skipped by the tenant filter.
    pub skipped: u64,
    /// Records (or outputs) written to the target.
    pub written: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Whether it was interrupted before the end of the range.
    pub interrupted: bool,
    /// After an interruption, the `--offsets` value that resumes it.
    pub resume: Option<String>,
    /// What else it did, one line each (e.g. the aggregate ranges it refreshed).
    pub notes: Vec<String>,
}

impl Outcome {
    /// The end-of-run summary lines.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "read {}  written {}  dead-lettered {}  skipped (tenant filter) {}",
            self.read, self.written, self.dead_lettered, self.skipped
        );
        for note in &self.notes {
            s += &format!("\n{note}");
        }
        if let Some(resume) = &self.resume {
            s += &format!("\ninterrupted; to resume, run the same command with --offsets {resume}");
        } else if self.interrupted {
            s += "\ninterrupted";
        }
        s
    }
}

/// The names of the active members of `group`, if any (blocking).
pub fn active_members(kafka: &KafkaConfig, group: &str) -> Result<Vec<String>> {
    let consumer: BaseConsumer = kafka.admin_config().create()?;
    let list = consumer
        .fetch_group_list(Some(group), TIMEOUT)
        .with_context(|| format!("describing consumer group {group}"))?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| {
            g.members()
                .iter()
                .map(|m| format!("{} ({})", m.client_id(), m.client_host()))
        })
        .collect())
}

/// Commit `offsets` (partition → offset) of `topic` for `group`, which must have no
/// active members (blocking).
pub fn commit_group(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    offsets: &[(i32, i64)],
) -> Result<()> {
    let consumer: BaseConsumer = kafka.consumer_config(group).create()?;
    let mut tpl = TopicPartitionList::new();
    for &(p, o) in offsets {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .with_context(|| format!("committing the start offsets of group {group}"))?;
    Ok(())
}

pub(crate) fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::block_in_place(f)
}

/// Run a replay of `plan` into `target`. `stop` interrupts it (Ctrl-C); what was done
/// is committed and the outcome says how to resume.
pub async fn run(
    config: &Config,
    plan: &Plan,
    target: &Target,
    mode: &Mode,
    filters: &Filters,
    stop: CancellationToken,
) -> Result<Outcome> {
    let (group, input) = match target {
        Target::Copy(to) => return copy(&config.kafka, plan, to, filters, stop).await,
        Target::Stage(s) => (s.group(config), s.input(config)),
        Target::Sink(s) => (s.group(config), config.topics.enriched.as_str()),
    };
    if let (Target::Stage(StageName::Sessionize), Mode::FreshGroup(name)) = (target, mode) {
        // Sessions of a bounded range are recomputed in batch (a streaming run's commits
        // wait for open sessions, and corrected events arrive out of order).
        return replay_sessions(config, plan, name, filters, stop).await;
    }
    match mode {
        Mode::ResetGroup => reset(config, plan, group, input).map(|()| Outcome::default()),
        Mode::FreshGroup(fresh_group) => {
            fresh(config, plan, target, fresh_group, filters, stop).await
        }
    }
}

/// Recompute the sessions of the plan's range in batch and emit them to the sessions
/// topic, where the sessions sink replaces the sessions they overlap.
async fn replay_sessions(
    config: &Config,
    plan: &Plan,
    name: &str,
    filters: &Filters,
    stop: CancellationToken,
) -> Result<Outcome> {
    let mut spec = pipeline::sessionize_spec(config).await?;
    spec.input = plan.topic.clone();
    let scope = Arc::new(ReplayScope::new(
        plan.ends(),
        filters.tenant.clone(),
        filters.rate,
    ));
    let ranges = plan
        .ranges
        .iter()
        .map(|r| sluice_core::kafka::PartitionRange {
            partition: r.partition,
            start: r.start,
            end: r.end,
        })
        .collect();
    let done =
        sluice_stages::sessionize::replay_sessions(&config.kafka, &spec, ranges, scope, name, stop)
            .await
            .context("sessionize replay")?;
    let mut notes = Vec::new();
    if done.at_edges > 0 {
        notes.push(format!(
            "{} session(s) within one gap ({} s) of the range's first or last event time were left as they are: they may continue outside the range; widen it to recompute them",
            done.at_edges, config.sessionize.gap_s
        ));
    }
    if done.undecodable > 0 {
        notes.push(format!(
            "{} record(s) did not decode and were left out",
            done.undecodable
        ));
    }
    if done.interrupted {
        notes.push(
            "interrupted before the end of the range: nothing was emitted; run it again".into(),
        );
    }
    Ok(Outcome {
        read: done.read,
        skipped: done.skipped,
        written: done.sessions,
        dead_lettered: 0,
        interrupted: done.interrupted,
        resume: None,
        notes,
    })
}

/// Move the target's own group to the start of the range, refusing while it has members.
fn reset(config: &Config, plan: &Plan, group: &str, input: &str) -> Result<()> {
    if input != plan.topic {
        bail!(
            "--reset: group {group} consumes `{input}`, not `{}`; drop --reset to replay `{}` under a fresh group",
            plan.topic,
            plan.topic
        );
    }
    let kafka = config.kafka.clone();
    let g = group.to_string();
    let members = blocking(move || active_members(&kafka, &g))?;
    if !members.is_empty() {
        bail!(
            "--reset: consumer group {group} has {} active member(s): {}. Stop them first, or drop --reset to replay under a fresh group",
            members.len(),
            members.join(", ")
        );
    }
    let starts: Vec<(i32, i64)> = plan.ranges.iter().map(|r| (r.partition, r.start)).collect();
    let (kafka, g, topic) = (config.kafka.clone(), group.to_string(), plan.topic.clone());
    blocking(move || commit_group(&kafka, &g, &topic, &starts))?;
    println!(
        "group {group} now starts at the range start on {} partition(s) of {}; its processes reprocess from there to the live end",
        plan.ranges.len(),
        plan.topic
    );
    Ok(())
}

fn progress(total: i64) -> ProgressBar {
    let bar = ProgressBar::new(total.max(0) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} records  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Run the target stage or sink here under a fresh group until its commits reach the
/// plan's end offsets.
async fn fresh(
    config: &Config,
    plan: &Plan,
    target: &Target,
    group: &str,
    filters: &Filters,
    stop: CancellationToken,
) -> Result<Outcome> {
    fresh_rewired(
        config,
        plan,
        target,
        group,
        filters,
        Rewiring::default(),
        stop,
    )
    .await
}

/// [`fresh`], with a stage's outputs and dead letters sent where `outputs` says.
pub(crate) async fn fresh_rewired(
    config: &Config,
    plan: &Plan,
    target: &Target,
    group: &str,
    filters: &Filters,
    outputs: Rewiring,
    stop: CancellationToken,
) -> Result<Outcome> {
    let kafka = config.kafka.clone();
    let g = group.to_string();
    let members = blocking(move || active_members(&kafka, &g))?;
    if !members.is_empty() {
        bail!("--group: consumer group {group} has active members; choose another name");
    }
    // Start where the range starts; partitions outside it start (and stay) at their end.
    let (kafka, topic) = (config.kafka.clone(), plan.topic.clone());
    let ranged: HashMap<i32, i64> = plan.ranges.iter().map(|r| (r.partition, r.start)).collect();
    let total = plan.partitions_total as i32;
    let starts: Vec<(i32, i64)> = blocking(move || {
        let ends = sluice_core::kafka::end_offsets(&kafka, &topic)?;
        Ok((0..total)
            .map(|p| {
                let end = ends.iter().find(|(q, _)| *q == p).map_or(0, |(_, e)| *e);
                (p, ranged.get(&p).copied().unwrap_or(end))
            })
            .collect())
    })?;
    let (kafka, g, topic) = (config.kafka.clone(), group.to_string(), plan.topic.clone());
    blocking(move || commit_group(&kafka, &g, &topic, &starts))?;

    let scope = Arc::new(ReplayScope::new(
        plan.ends(),
        filters.tenant.clone(),
        filters.rate,
    ));
    let rewiring = Rewiring {
        group: Some(group.to_string()),
        input: Some(plan.topic.clone()),
        scope: Some(scope.clone()),
        ..outputs
    };
    let runner = CancellationToken::new();
    let (cfg, r, token) = (config.clone(), rewiring, runner.clone());
    let target = target.clone();
    let task = tokio::spawn(async move {
        match target {
            Target::Stage(name) => pipeline::run_stage_rewired(&cfg, name, &r, token)
                .await
                .map(|s| (s.consumed, s.published, s.dead_lettered, Vec::new())),
            Target::Sink(name) => pipeline::run_sink_rewired(&cfg, name, &r, token)
                .await
                .map(|s| (s.consumed, s.written, s.dead_lettered, s.settled)),
            Target::Copy(to) => anyhow::bail!("copying to {to} runs no stage or sink"),
        }
    });
    let bar = progress(plan.records());
    let mut interrupted = false;
    let mut committed: HashMap<i32, i64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => { interrupted = true; break; }
            _ = tick.tick() => {}
        }
        bar.set_position(scope.admitted() + scope.skipped());
        if task.is_finished() {
            break;
        }
        committed = group_positions(config, group, &plan.topic)?;
        if plan
            .ranges
            .iter()
            .all(|r| committed.get(&r.partition).is_some_and(|c| *c >= r.end))
        {
            break;
        }
    }
    runner.cancel();
    let (read, written, dead_lettered, notes) = task.await.context("replay task")??;
    bar.finish_and_clear();
    if interrupted {
        committed = group_positions(config, group, &plan.topic)?;
    }
    let resume = plan.resume_offsets(&committed);
    Ok(Outcome {
        read,
        skipped: scope.skipped(),
        written,
        dead_lettered,
        interrupted,
        resume: (interrupted && !resume.is_empty()).then_some(resume),
        notes,
    })
}

/// The offsets `group` committed on `topic`, by partition.
fn group_positions(config: &Config, group: &str, topic: &str) -> Result<HashMap<i32, i64>> {
    let (kafka, g, t) = (config.kafka.clone(), group.to_string(), topic.to_string());
    let committed = blocking(move || Ok(sluice_core::kafka::committed_offsets(&kafka, &g, &t)?))?;
    Ok(committed.into_iter().collect())
}

/// Copy the plan's records to `to`, keeping keys, headers and timestamps.
async fn copy(
    kafka: &KafkaConfig,
    plan: &Plan,
    to: &str,
    filters: &Filters,
    stop: CancellationToken,
) -> Result<Outcome> {
    if to == plan.topic {
        bail!("--copy-to: the target must differ from the source `{to}`");
    }
    let consumer: BaseConsumer = kafka.consumer_config("sluice-replay-copy").create()?;
    let exists = blocking({
        let kafka = kafka.clone();
        let to = to.to_string();
        move || Ok(!sluice_core::kafka::end_offsets(&kafka, &to)?.is_empty())
    })?;
    if !exists {
        bail!("--copy-to: topic `{to}` does not exist; create it first");
    }
    let producer: FutureProducer = kafka.producer_config().create()?;
    let scope = ReplayScope::new(plan.ends(), filters.tenant.clone(), filters.rate);
    let mut tpl = TopicPartitionList::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    for r in plan.ranges.iter().filter(|r| r.start < r.end) {
        tpl.add_partition_offset(&plan.topic, r.partition, Offset::Offset(r.start))?;
        next.insert(r.partition, r.start);
    }
    let mut outcome = Outcome::default();
    let bar = progress(plan.records());
    if tpl.count() > 0 {
        consumer.assign(&tpl)?;
    }
    let mut deliveries = Vec::new();
    let done = |next: &HashMap<i32, i64>| {
        plan.ranges
            .iter()
            .all(|r| next.get(&r.partition).is_none_or(|n| *n >= r.end))
    };
    while !done(&next) {
        if stop.is_cancelled() {
            outcome.interrupted = true;
            break;
        }
        let Some(msg) = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)))
        else {
            // Skip past gaps (e.g. transaction markers) at the end of a range.
            if let Ok(position) = consumer.position() {
                for e in position.elements() {
                    if let (Offset::Offset(o), Some(n)) = (e.offset(), next.get_mut(&e.partition()))
                    {
                        *n = (*n).max(o);
                    }
                }
            }
            continue;
        };
        let msg = msg?;
        let (p, o) = (msg.partition(), msg.offset());
        next.insert(p, o + 1);
        match scope.admit(p, o, msg.headers()) {
            Admit::PastEnd => {
                next.insert(p, i64::MAX);
                continue;
            }
            Admit::Skip => {
                outcome.skipped += 1;
                continue;
            }
            Admit::Process => {}
        }
        outcome.read += 1;
        scope.throttle().await;
        let origin = format!("{}/{p}/{o}", plan.topic);
        let mut headers = msg
            .headers()
            .map(|h| sluice_core::headers::without(Some(h), &[REPLAYED_FROM]))
            .unwrap_or_else(OwnedHeaders::new);
        headers = headers.insert(Header {
            key: REPLAYED_FROM,
            value: Some(origin.as_str()),
        });
        let mut record = FutureRecord::to(to)
            .payload(msg.payload().unwrap_or_default())
            .headers(headers);
        if let Some(key) = msg.key() {
            record = record.key(key);
        }
        if let Some(ts) = msg.timestamp().to_millis() {
            record = record.timestamp(ts);
        }
        let delivery = loop {
            match producer.send_result(record) {
                Ok(d) => break d,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    outcome.written += await_all(std::mem::take(&mut deliveries)).await?;
                    record = r;
                }
                Err((e, _)) => return Err(e).context("copying a record"),
            }
        };
        deliveries.push(delivery);
        if deliveries.len() >= 1000 {
            outcome.written += await_all(std::mem::take(&mut deliveries)).await?;
        }
        bar.set_position(outcome.read + outcome.skipped);
    }
    outcome.written += await_all(deliveries).await?;
    bar.finish_and_clear();
    if outcome.interrupted {
        let resume = plan.resume_offsets(&next);
        outcome.resume = (!resume.is_empty()).then_some(resume);
    }
    Ok(outcome)
}

async fn await_all(deliveries: Vec<rdkafka::producer::DeliveryFuture>) -> Result<u64> {
    let n = deliveries.len() as u64;
    for d in futures::future::join_all(deliveries).await {
        d.context("copying a record: delivery cancelled")?
            .map_err(|(e, _)| e)
            .context("copying a record")?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_spec() {
        assert_eq!(
            parse_offsets("0=100..200, 2=5..").unwrap(),
            vec![
                OffsetRange {
                    partition: 0,
                    start: 100,
                    end: Some(200)
                },
                OffsetRange {
                    partition: 2,
                    start: 5,
                    end: None
                }
            ]
        );
        for bad in ["", "0=5", "x=1..2", "0=5..3", "0=1..2,0=3..4", "-1=0..1"] {
            assert!(parse_offsets(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_and_durations() {
        assert!(parse_time("2026-11-23T08:00:00Z").is_ok());
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("2 parsecs").is_err());
    }

    #[test]
    fn resume_offsets_skip_finished_partitions() {
        let plan = Plan {
            topic: "t".into(),
            partitions_total: 3,
            ranges: vec![
                PartitionPlan {
                    partition: 0,
                    start: 10,
                    end: 20,
                },
                PartitionPlan {
                    partition: 1,
                    start: 0,
                    end: 5,
                },
            ],
        };
        assert_eq!(plan.records(), 15);
        let done = HashMap::from([(0, 15), (1, 5)]);
        assert_eq!(plan.resume_offsets(&done), "0=15..20");
        assert_eq!(plan.resume_offsets(&HashMap::new()), "0=10..20,1=0..5");
    }
}
