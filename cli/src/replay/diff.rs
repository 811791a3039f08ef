//! `sluice replay --diff`: what a replay would change, before it changes anything.
//!
//! The target stage runs over the range under a fresh group, as a replay would, but
//! writes to scratch topics (`<output>.diff-<time>` and its `.dlq`); the stages after it,
//! up to the sinks' input, run over those. The results are compared, event by event,
//! with what each sink holds now: which fields change (and from what to what), which
//! events move in time, which are new (e.g. rescued dead letters), which would now be
//! dead-lettered, and which records yield nothing at all. Nothing is written to the
//! sinks; the scratch topics are deleted at the end.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Context, Result};
use rdkafka::message::{Message, OwnedMessage};
use serde::Serialize;
use sluice_core::headers;
use sluice_schemas::fields::{differences, field, FieldKind};
use sluice_schemas::EnrichedEvent;
use sluice_sinks::{Selection, Stored};
use tokio_util::sync::CancellationToken;

use super::{blocking, fresh_rewired, resolve, Filters, Plan, Range, Target};
use crate::components::{chain_from, Component, Config, Kind};
use sluice_core::wiring::Rewiring;

/// How one field changes over the compared events.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldChange {
    /// The field.
    pub field: &'static str,
    /// Events whose value changes.
    pub events: u64,
    /// The most frequent changes: old value, new value, events (for a time: `""`, the
    /// shift, events).
    pub top: Vec<(String, String, u64)>,
}

/// What the replay would change in one sink.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SinkDiff {
    /// The sink.
    pub sink: &'static str,
    /// Events the replay outputs that the sink holds, with other values.
    pub changed: u64,
    /// Events the replay outputs that the sink holds, unchanged.
    pub unchanged: u64,
    /// Of the changed ones, events whose time moves.
    pub moved: u64,
    /// Of those, events that move to another day (UTC).
    pub moved_across_days: u64,
    /// Events the replay outputs that the sink does not hold (e.g. rescued dead letters).
    pub new: u64,
    /// Events the sink holds that the replay would dead-letter.
    pub newly_dead_lettered: u64,
    /// Per field, how many events change it.
    pub fields: Vec<FieldChange>,
    /// A few changed events, with their changes.
    pub examples: Vec<String>,
}

/// The result of `replay --diff`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Diff {
    /// The source topic.
    pub source: String,
    /// The stages run, in order.
    pub stages: Vec<&'static str>,
    /// Records read from the source.
    pub read: u64,
    /// Records skipped by the tenant filter.
    pub skipped: u64,
    /// Events the replay outputs for the sinks.
    pub outputs: u64,
    /// Records the replay dead-letters.
    pub dead_lettered: u64,
    /// Records that yield neither an output nor a dead letter.
    pub lost: u64,
    /// A few dead letters, with their reasons.
    pub dead_letter_examples: Vec<String>,
    /// Per sink.
    pub sinks: Vec<SinkDiff>,
}

/// The stages that turn records of the target's input into the input of the sinks
/// that hold events: from the target stage on (parse: parse and enrich); none for such
/// a sink.
fn chain(config: &Config, target: &Target) -> Result<Vec<&'static Component>> {
    let unsupported = || {
        anyhow::anyhow!(
            "--diff compares events: use it with a stage on the way to, or a sink of, events ({})",
            crate::components::event_sinks()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match target {
        Target::Copy(_) => bail!("--diff does not apply to --copy-to"),
        Target::Component(c) if c.kind == Kind::Sink => {
            if c.read_stored.is_some() {
                Ok(Vec::new())
            } else {
                Err(unsupported())
            }
        }
        Target::Component(c) => {
            let chain = chain_from(config, c.input(config));
            if chain.first().is_some_and(|s| s.name == c.name) {
                Ok(chain)
            } else {
                Err(unsupported())
            }
        }
    }
}

/// Run the diff of replaying `plan` into `target`.
pub async fn run(
    config: &Config,
    plan: &Plan,
    target: &Target,
    filters: &Filters,
    stop: CancellationToken,
) -> Result<Diff> {
    let stages = chain(config, target)?;
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let mut scratch: Vec<String> = Vec::new();
    let result = run_chain(config, plan, &stages, filters, &stamp, &mut scratch, stop).await;
    if !scratch.is_empty() {
        let topics: Vec<&str> = scratch.iter().map(String::as_str).collect();
        if let Err(e) = sluice_core::kafka::delete_topics(&config.kafka, &topics).await {
            tracing::warn!(error = %e, topics = %scratch.join(", "), "scratch topics not deleted");
        }
    }
    let (mut diff, outputs, dead) = result?;
    diff.source = plan.topic.clone();
    diff.stages = stages.iter().map(|s| s.name).collect();
    compare(config, &mut diff, &outputs, &dead).await?;
    Ok(diff)
}

/// An output event: the event and its version.
type Outputs = HashMap<(String, String), (EnrichedEvent, i64)>;

/// A dead letter: its tenant, event id, raw id and reason.
struct DeadLetter {
    tenant: String,
    event_id: String,
    raw_id: String,
    reason: String,
}

#[allow(clippy::too_many_arguments)]
async fn run_chain(
    config: &Config,
    plan: &Plan,
    stages: &[&'static Component],
    filters: &Filters,
    stamp: &str,
    scratch: &mut Vec<String>,
    stop: CancellationToken,
) -> Result<(Diff, Outputs, Vec<DeadLetter>)> {
    let mut diff = Diff::default();
    let mut input = plan.clone();
    let mut dlqs = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let output = format!("{}.diff-{stamp}", stage.output(config).unwrap_or_default());
        let dlq = format!("{output}.dlq");
        let topics = [
            (output.clone(), "3600000".to_string()),
            (dlq.clone(), "3600000".to_string()),
        ];
        sluice_core::kafka::create_topics(
            &config.kafka,
            config.topics.partitions,
            config.topics.replication_factor,
            &topics,
        )
        .await
        .context("creating the scratch topics")?;
        scratch.extend([output.clone(), dlq.clone()]);
        // The tenant filter and rate apply to the range; later stages take all of it.
        let f = if i == 0 {
            filters.clone()
        } else {
            Filters::default()
        };
        let group = format!("{}-diff-{stamp}", stage.group(config));
        let rewiring = Rewiring {
            output: Some(output.clone()),
            dlq: Some(dlq.clone()),
            ..Rewiring::default()
        };
        let done = fresh_rewired(
            config,
            &input,
            &super::Target::Component(stage),
            &group,
            &f,
            rewiring,
            stop.clone(),
        )
        .await?;
        if done.interrupted {
            bail!("interrupted: nothing was compared");
        }
        if i == 0 {
            diff.read = done.read;
            diff.skipped = done.skipped;
        }
        dlqs.push(dlq);
        let (k, t) = (config.kafka.clone(), output.clone());
        let everything = Range::Times {
            from: None,
            to: None,
        };
        input = blocking(move || resolve(&k, &t, &everything, None))?;
    }
    // The final records: the last stage's scratch output, or (a sink target) the range.
    let (k, last) = (config.kafka.clone(), input.clone());
    let records = read_plan(k, last).await?;
    if stages.is_empty() {
        diff.read = records.len() as u64;
    }
    let codec = sluice_schemas::setup::reading_codec::<EnrichedEvent>(&config.schemas)?;
    let mut outputs: Outputs = HashMap::new();
    let mut accounted: HashSet<String> = HashSet::new();
    for m in &records {
        if filters.tenant.is_some()
            && stages.is_empty()
            && headers::get(m.headers(), headers::TENANT) != filters.tenant.as_deref()
        {
            diff.skipped += 1;
            continue;
        }
        let Ok(e) = codec.decode(m.payload().unwrap_or_default()) else {
            continue;
        };
        if let Some(raw) = headers::get(m.headers(), headers::RAW_EVENT_ID) {
            accounted.insert(raw.to_string());
        }
        let version = headers::version(m);
        let key = (e.tenant.clone(), e.event_id.clone());
        if outputs.get(&key).is_none_or(|(_, v)| version >= *v) {
            outputs.insert(key, (e, version));
        }
    }
    let mut dead = Vec::new();
    for dlq in dlqs {
        let k = config.kafka.clone();
        for m in blocking(move || {
            Ok(sluice_core::kafka::read_all(
                &k,
                &dlq,
                std::time::Duration::from_secs(120),
            )?)
        })? {
            let d = dead_letter(&m);
            accounted.insert(d.raw_id.clone());
            dead.push(d);
        }
    }
    diff.outputs = outputs.len() as u64;
    diff.dead_lettered = dead.len() as u64;
    diff.dead_letter_examples = dead
        .iter()
        .take(3)
        .map(|d| format!("{}/{}: {}", d.tenant, d.event_id, d.reason))
        .collect();
    if !stages.is_empty() {
        diff.lost = (diff.read - diff.skipped).saturating_sub(accounted.len() as u64);
    }
    Ok((diff, outputs, dead))
}

async fn read_plan(
    kafka: sluice_core::config::KafkaConfig,
    plan: Plan,
) -> Result<Vec<OwnedMessage>> {
    blocking(move || {
        let ranges: Vec<sluice_core::kafka::PartitionRange> = plan.ranges.clone();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        sluice_core::kafka::read_ranges(
            &kafka,
            &plan.topic,
            &ranges,
            || std::time::Instant::now() > deadline,
            |m| {
                out.push(m.detach());
                Ok::<(), std::convert::Infallible>(())
            },
        )
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", plan.topic))?;
        Ok(out)
    })
}

/// Tenant, event id (as the sinks hold it), raw id and reason of a dead letter. A raw
/// record dead-lettered by parse has no parsed event id: the client's own `event_id`
/// field, if its JSON has one, else the id ingest stamped.
fn dead_letter(m: &OwnedMessage) -> DeadLetter {
    let h = m.headers();
    let get = |k: &str| headers::get(h, k).unwrap_or_default().to_string();
    let stage = get(headers::DLQ_STAGE);
    let (event_id, raw_id) = if stage == "parse" {
        let own = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default())
            .ok()
            .and_then(|v| v["event_id"].as_str().map(str::to_string));
        (
            own.unwrap_or_else(|| get(headers::EVENT_ID)),
            get(headers::EVENT_ID),
        )
    } else {
        (get(headers::EVENT_ID), get(headers::RAW_EVENT_ID))
    };
    DeadLetter {
        tenant: get(headers::TENANT),
        event_id,
        raw_id,
        reason: format!(
            "{}: {}",
            get(headers::DLQ_ERROR_CLASS),
            get(headers::DLQ_REASON)
        ),
    }
}

fn shown(name: &str, v: Option<String>) -> String {
    let Some(v) = v else {
        return "null".into();
    };
    match field(name).map(|f| f.kind) {
        Some(FieldKind::Time) => v
            .parse::<i64>()
            .ok()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or(v),
        _ => v,
    }
}

/// Compare the outputs and dead letters with what each sink holds.
async fn compare(
    config: &Config,
    diff: &mut Diff,
    outputs: &Outputs,
    dead: &[DeadLetter],
) -> Result<()> {
    let mut keys: Vec<(String, String)> = outputs.keys().cloned().collect();
    keys.extend(dead.iter().map(|d| (d.tenant.clone(), d.event_id.clone())));
    keys.sort();
    keys.dedup();
    let selection = Selection::Events(keys);
    diff.sinks.clear();
    for sink in crate::components::event_sinks() {
        let Some(read) = sink.read_stored else {
            continue;
        };
        let held = read(config.clone(), selection.clone(), true).await?;
        diff.sinks.push(sink_diff(sink.name, held, outputs, dead));
    }
    Ok(())
}

/// How a field's value changes, as counted: old and new values, but for a time the
/// shift (`""` and e.g. `-5h 30m`), so that a time-zone fix reads as one change.
fn transition(f: &str, a: Option<String>, b: Option<String>) -> (String, String) {
    let is_time = field(f).is_some_and(|x| x.kind == FieldKind::Time);
    match (
        is_time,
        a.as_deref().and_then(|x| x.parse::<i64>().ok()),
        b.as_deref().and_then(|x| x.parse::<i64>().ok()),
    ) {
        (true, Some(x), Some(y)) => {
            let delta = y - x;
            let sign = if delta < 0 { "-" } else { "+" };
            let span =
                humantime::format_duration(std::time::Duration::from_millis(delta.unsigned_abs()));
            (String::new(), format!("{sign}{span}"))
        }
        _ => (shown(f, a), shown(f, b)),
    }
}

fn day(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// What replaying would change in one sink, given what it holds of the events.
fn sink_diff(
    sink: &'static str,
    stored: Vec<Stored>,
    outputs: &Outputs,
    dead: &[DeadLetter],
) -> SinkDiff {
    let held: HashMap<(String, String), EnrichedEvent> = stored
        .into_iter()
        .filter_map(|s| Some(((s.tenant, s.event_id), s.event?)))
        .collect();
    let mut d = SinkDiff {
        sink,
        ..SinkDiff::default()
    };
    // Per field: events changed, and how often each (old, new) pair occurs.
    type Transitions = HashMap<(String, String), u64>;
    let mut fields: BTreeMap<&'static str, (u64, Transitions)> = BTreeMap::new();
    let mut sorted: Vec<_> = outputs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (key, (new, _)) in sorted {
        let Some(old) = held.get(key) else {
            d.new += 1;
            continue;
        };
        let changes = differences(old, new);
        if changes.is_empty() {
            d.unchanged += 1;
            continue;
        }
        d.changed += 1;
        if old.event_time != new.event_time {
            d.moved += 1;
            if day(old.event_time) != day(new.event_time) {
                d.moved_across_days += 1;
            }
        }
        if d.examples.len() < 5 {
            let what: Vec<String> = changes
                .iter()
                .map(|(f, a, b)| format!("{f} {}→{}", shown(f, a.clone()), shown(f, b.clone())))
                .collect();
            d.examples
                .push(format!("{}/{}: {}", key.0, key.1, what.join(", ")));
        }
        for (f, a, b) in changes {
            let entry = fields.entry(f).or_default();
            entry.0 += 1;
            *entry.1.entry(transition(f, a, b)).or_insert(0) += 1;
        }
    }
    d.newly_dead_lettered = dead
        .iter()
        .filter(|x| held.contains_key(&(x.tenant.clone(), x.event_id.clone())))
        .count() as u64;
    d.fields = fields
        .into_iter()
        .map(|(f, (events, transitions))| {
            let mut top: Vec<(String, String, u64)> = transitions
                .into_iter()
                .map(|((a, b), n)| (a, b, n))
                .collect();
            top.sort_by(|x, y| y.2.cmp(&x.2).then_with(|| (&x.0, &x.1).cmp(&(&y.0, &y.1))));
            top.truncate(3);
            FieldChange {
                field: f,
                events,
                top,
            }
        })
        .collect();
    d
}

impl Diff {
    /// The summary an operator reads.
    pub fn render(&self) -> String {
        let through = if self.stages.is_empty() {
            "as it is".to_string()
        } else {
            format!("through {}", self.stages.join(" → "))
        };
        let mut s = format!(
            "diff of replaying {} {through}; nothing was written to the sinks\n\
             read {}  skipped (tenant filter) {}  outputs {}  dead-lettered {}  lost {}\n",
            self.source, self.read, self.skipped, self.outputs, self.dead_lettered, self.lost
        );
        for d in &self.sinks {
            s += &format!(
                "{}: {} event(s) change, {} unchanged, {} new; {} move in time ({} to another day); {} newly dead-lettered\n",
                d.sink, d.changed, d.unchanged, d.new, d.moved, d.moved_across_days, d.newly_dead_lettered
            );
            for f in &d.fields {
                let top: Vec<String> = f
                    .top
                    .iter()
                    .map(|(a, b, n)| {
                        if a.is_empty() {
                            format!("shifted {b} ×{n}")
                        } else {
                            format!("{a}→{b} ×{n}")
                        }
                    })
                    .collect();
                s += &format!("  {:<16} {:>8}  {}\n", f.field, f.events, top.join(", "));
            }
            for e in &d.examples {
                s += &format!("  e.g. {e}\n");
            }
        }
        for e in &self.dead_letter_examples {
            s += &format!("dead letter e.g. {e}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, country: &str, at: i64) -> EnrichedEvent {
        EnrichedEvent {
            event_id: id.into(),
            tenant: "acme".into(),
            event_time: at,
            country: Some(country.into()),
            ..Default::default()
        }
    }

    fn stored(e: &EnrichedEvent) -> Stored {
        Stored {
            tenant: e.tenant.clone(),
            event_id: e.event_id.clone(),
            received_at: 0,
            version: 1,
            event: Some(e.clone()),
        }
    }

    #[test]
    fn changes_moves_new_and_dead_letters_are_counted() {
        const DAY: i64 = 86_400_000;
        let held = vec![
            stored(&event("a", "XX", 10)),
            stored(&event("b", "XX", 10)),
            stored(&event("c", "DE", 10)),
            stored(&event("gone", "DE", 10)),
        ];
        let outputs: Outputs = [
            event("a", "DE", 10),
            event("b", "DE", 10 + DAY),
            event("c", "DE", 10),
            event("n", "DE", 10),
        ]
        .into_iter()
        .map(|e| ((e.tenant.clone(), e.event_id.clone()), (e, 2)))
        .collect();
        let dead = vec![DeadLetter {
            tenant: "acme".into(),
            event_id: "gone".into(),
            raw_id: "r".into(),
            reason: "validation: x".into(),
        }];
        let d = sink_diff("timescale", held, &outputs, &dead);
        assert_eq!(
            (
                d.changed,
                d.unchanged,
                d.new,
                d.moved,
                d.moved_across_days,
                d.newly_dead_lettered
            ),
            (2, 1, 1, 1, 1, 1)
        );
        let country = d.fields.iter().find(|f| f.field == "country").unwrap();
        assert_eq!(country.events, 2);
        assert_eq!(country.top, vec![("XX".into(), "DE".into(), 2)]);
        let time = d.fields.iter().find(|f| f.field == "event_time").unwrap();
        assert_eq!(time.top, vec![(String::new(), "+1day".into(), 1)]);
        assert_eq!(d.examples[0], "acme/a: country XX→DE");
    }
}
