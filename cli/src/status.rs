//! `sluice status`: each component's consumer group as `kafka-consumer-groups --describe`
//! shows it (state, members, committed offset and lag per partition) and the size of
//! each dead-letter topic.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use crate::components::{Component, Config, COMPONENTS};

/// One component's group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    /// The component (`stage parse`, `sink timescale`).
    pub component: String,
    /// Its consumer group.
    pub group: String,
    /// The broker's view of the group: `Stable`, `Empty`, `PreparingRebalance`, `Dead`…
    pub state: String,
    /// Members: client id and host.
    pub members: Vec<String>,
    /// The topic it consumes.
    pub topic: String,
    /// Per partition: committed offset (none: nothing committed), end offset, lag.
    pub partitions: Vec<PartitionStatus>,
    /// Sum of the partitions' lag.
    pub lag: i64,
    /// Its dead-letter topic and the records it retains.
    pub dlq: DlqStatus,
}

/// One partition of a group's input.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: i32,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// The partition's end (high watermark).
    pub end: i64,
    /// Records not yet committed (from the start of what is retained when nothing is
    /// committed).
    pub lag: i64,
}

/// A dead-letter topic.
#[derive(Debug, Clone, Serialize)]
pub struct DlqStatus {
    /// Its name.
    pub topic: String,
    /// Records it retains (end minus start, over partitions); none when it is missing.
    pub records: Option<i64>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// The status of every component's group (blocking).
pub fn collect(config: &Config) -> Result<Vec<GroupStatus>> {
    let admin: BaseConsumer = config
        .kafka
        .consumer_config("sluice-status")
        .create()
        .context("creating a Kafka client")?;
    let list = admin
        .fetch_group_list(None, TIMEOUT)
        .with_context(|| format!("listing consumer groups on {}", config.kafka.brokers))?;
    COMPONENTS.iter().map(|c| one(config, c, &list)).collect()
}

fn one(config: &Config, c: &Component, list: &rdkafka::groups::GroupList) -> Result<GroupStatus> {
    let group = c.group(config).to_string();
    let topic = c.input(config).to_string();
    let described = list.groups().iter().find(|g| g.name() == group);
    let state = described.map_or("Unknown".to_string(), |g| g.state().to_string());
    let members = described
        .map(|g| {
            g.members()
                .iter()
                .map(|m| format!("{} ({})", m.client_id(), m.client_host()))
                .collect()
        })
        .unwrap_or_default();
    let marks = sluice_core::kafka::watermarks(&config.kafka, &topic).unwrap_or_default();
    let committed = committed(config, &group, &topic)?;
    let partitions: Vec<PartitionStatus> = marks
        .iter()
        .map(|&(p, low, high)| {
            let at = committed
                .iter()
                .find(|(q, _)| *q == p)
                .and_then(|(_, o)| *o);
            PartitionStatus {
                partition: p,
                committed: at,
                end: high,
                lag: (high - at.unwrap_or(low).max(low)).max(0),
            }
        })
        .collect();
    let dlq = c.dlq(config);
    let records = sluice_core::kafka::watermarks(&config.kafka, &dlq)
        .ok()
        .filter(|m| !m.is_empty())
        .map(|m| m.iter().map(|(_, low, high)| high - low).sum());
    Ok(GroupStatus {
        component: format!("{} {}", c.kind_name(), c.name),
        group,
        state,
        members,
        topic,
        lag: partitions.iter().map(|p| p.lag).sum(),
        partitions,
        dlq: DlqStatus {
            topic: dlq,
            records,
        },
    })
}

/// Committed offsets, `None` where the group has committed nothing.
fn committed(config: &Config, group: &str, topic: &str) -> Result<Vec<(i32, Option<i64>)>> {
    let consumer: BaseConsumer = config.kafka.consumer_config(group).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    let offsets = consumer
        .committed_offsets(tpl, TIMEOUT)
        .with_context(|| format!("committed offsets of group {group}"))?;
    Ok(offsets
        .elements()
        .iter()
        .map(|e| {
            (
                e.partition(),
                match e.offset() {
                    rdkafka::Offset::Offset(o) => Some(o),
                    _ => None,
                },
            )
        })
        .collect())
}

/// The table `sluice status` prints.
pub fn render(groups: &[GroupStatus]) -> String {
    let mut out = String::new();
    for g in groups {
        out += &format!(
            "{}  group {}  {}  {} member(s)  lag {}  dlq {} {}\n",
            g.component,
            g.group,
            g.state,
            g.members.len(),
            g.lag,
            g.dlq.topic,
            g.dlq
                .records
                .map_or("(missing)".to_string(), |n| format!("{n} record(s)"))
        );
        for m in &g.members {
            out += &format!("    member {m}\n");
        }
        for p in &g.partitions {
            out += &format!(
                "    {}[{}]  committed {}  end {}  lag {}\n",
                g.topic,
                p.partition,
                p.committed.map_or("-".to_string(), |o| o.to_string()),
                p.end,
                p.lag
            );
        }
    }
    out
}
