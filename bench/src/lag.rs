//! Consumer lag of a set of groups, polled through clients made once (a client per
//! poll costs a connection and a metadata round trip each time).

use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sluice::Config;

/// One group and the topic it consumes.
struct Group {
    name: String,
    topic: String,
    partitions: Vec<i32>,
    consumer: BaseConsumer,
}

/// Watches the lag of consumer groups.
pub struct LagWatch {
    groups: Vec<Group>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl LagWatch {
    /// Watch `groups`, each a (group, topic) pair. Blocking.
    pub fn new(config: &Config, groups: &[(String, String)]) -> Result<Self> {
        let mut out = Vec::new();
        for (name, topic) in groups {
            let consumer: BaseConsumer = config.kafka.consumer_config(name).create()?;
            let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
            let partitions = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            out.push(Group {
                name: name.clone(),
                topic: topic.clone(),
                partitions,
                consumer,
            });
        }
        Ok(Self { groups: out })
    }

    /// Records each group has yet to commit, by group. Blocking.
    pub fn lags(&self) -> Result<Vec<(String, i64)>> {
        let mut out = Vec::new();
        for g in &self.groups {
            let mut tpl = TopicPartitionList::new();
            let mut ends = Vec::new();
            for &p in &g.partitions {
                tpl.add_partition(&g.topic, p);
                ends.push(g.consumer.fetch_watermarks(&g.topic, p, TIMEOUT)?.1);
            }
            let committed = g.consumer.committed_offsets(tpl, TIMEOUT)?;
            let lag = committed
                .elements()
                .iter()
                .zip(ends)
                .map(|(e, end)| match e.offset() {
                    Offset::Offset(o) => (end - o).max(0),
                    _ => end,
                })
                .sum();
            out.push((g.name.clone(), lag));
        }
        Ok(out)
    }

    /// Records all groups have yet to commit. Blocking.
    pub fn total(&self) -> Result<i64> {
        Ok(self.lags()?.iter().map(|(_, l)| l).sum())
    }
}
