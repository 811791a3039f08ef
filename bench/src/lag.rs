//! Consumer lag of a set of groups, polled through clients made once (a client per
//! poll costs a connection and a metadata round trip each time).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sluice::Config;

/// A consumer to watch: the component, its group and the topic it consumes.
#[derive(Debug, Clone)]
pub struct Watched {
    /// The component's name (`parse`, `elasticsearch`, ...).
    pub component: String,
    /// Its consumer group.
    pub group: String,
    /// The topic it consumes.
    pub topic: String,
}

/// One group and the topic it consumes.
struct Group {
    component: String,
    topic: String,
    partitions: Vec<i32>,
    consumer: BaseConsumer,
}

/// Watches the lag of consumer groups.
pub struct LagWatch {
    groups: Vec<Group>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl Group {
    /// The group's committed offsets of its topic's partitions, in partition order.
    fn committed(&self) -> Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for &p in &self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        Ok(self.consumer.committed_offsets(tpl, TIMEOUT)?)
    }
}

impl LagWatch {
    /// Watch the groups of `consumers`. Blocking.
    pub fn new(config: &Config, consumers: &[Watched]) -> Result<Self> {
        let mut out = Vec::new();
        for w in consumers {
            let consumer: BaseConsumer = config.kafka.consumer_config(&w.group).create()?;
            let metadata = consumer.fetch_metadata(Some(&w.topic), TIMEOUT)?;
            let partitions = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            out.push(Group {
                component: w.component.clone(),
                topic: w.topic.clone(),
                partitions,
                consumer,
            });
        }
        Ok(Self { groups: out })
    }

    /// Records each group has yet to commit, by component. Blocking.
    pub fn lags(&self) -> Result<Vec<(String, i64)>> {
        let mut out = Vec::new();
        for g in &self.groups {
            let mut ends = Vec::new();
            for &p in &g.partitions {
                ends.push(g.consumer.fetch_watermarks(&g.topic, p, TIMEOUT)?.1);
            }
            let lag = g
                .committed()?
                .elements()
                .iter()
                .zip(ends)
                .map(|(e, end)| match e.offset() {
                    Offset::Offset(o) => (end - o).max(0),
                    _ => end,
                })
                .sum();
            out.push((g.component.clone(), lag));
        }
        Ok(out)
    }

    /// Per topic and partition, the lowest offset any watched group has committed there:
    /// what every consumer of it is done with. Partitions without a commit are left
    /// out. Blocking.
    pub fn committed_floor(&self) -> Result<BTreeMap<(String, i32), i64>> {
        let mut floor = BTreeMap::new();
        let mut uncommitted = BTreeSet::new();
        for g in &self.groups {
            for e in g.committed()?.elements() {
                let at = (e.topic().to_string(), e.partition());
                match e.offset() {
                    Offset::Offset(o) => {
                        let f = floor.entry(at).or_insert(o);
                        *f = (*f).min(o);
                    }
                    _ => {
                        uncommitted.insert(at);
                    }
                }
            }
        }
        floor.retain(|at, _| !uncommitted.contains(at));
        Ok(floor)
    }

    /// Records all groups have yet to commit. Blocking.
    pub fn total(&self) -> Result<i64> {
        Ok(self.lags()?.iter().map(|(_, l)| l).sum())
    }
}
