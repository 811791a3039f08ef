//! What a replay reads: a range of a retained topic (times, `--last`, or offsets)
//! resolved into partition offsets through the broker.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;

/// Timeout of each broker request.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

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

/// The offsets of one partition a replay covers: `[start, end)`, the end captured when
/// the replay starts.
pub type PartitionPlan = sluice_core::kafka::PartitionRange;

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
        // Saturating: a plan of a topic still being filled has open (i64::MAX) ends.
        self.ranges
            .iter()
            .fold(0i64, |n, r| n.saturating_add(r.end - r.start))
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
