//! A consumer context that turns librdkafka's own statistics and rebalance callbacks
//! into Prometheus metrics: lag per partition (high watermark minus position, as
//! librdkafka computes it, so it costs no extra requests) and rebalances.

use std::sync::Mutex;
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::TopicPartitionList;

/// Called when partitions are revoked, before they go: the owner drains and commits them.
pub type RevokeHook =
    Box<dyn Fn(&BaseConsumer<MeteredConsumer>, &TopicPartitionList) + Send + Sync>;

/// How often librdkafka reports statistics (and so lag), in milliseconds.
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// Context of every Sluice consumer.
pub struct MeteredConsumer {
    group: String,
    /// When the current rebalance started (revocation), to time it.
    rebalance_started: Mutex<Option<Instant>>,
    on_revoke: Option<RevokeHook>,
}

impl MeteredConsumer {
    /// A context for a consumer in `group`.
    pub fn new(group: &str) -> Self {
        Self {
            group: group.to_string(),
            rebalance_started: Mutex::new(None),
            on_revoke: None,
        }
    }

    /// Also call `hook` with the partitions being revoked, before they go.
    pub fn with_revoke_hook(mut self, hook: RevokeHook) -> Self {
        self.on_revoke = Some(hook);
        self
    }
}

impl ClientContext for MeteredConsumer {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // Only partitions this consumer owns and fetches: a revoked partition's
                // last value would otherwise stay exported next to its new owner's, and
                // `sum by (group)` count it twice. Its series is no longer updated and
                // expires (metrics.idle_timeout_s). -1 is librdkafka's internal partition.
                if *partition < 0 || !owned(p) {
                    continue;
                }
                metrics::gauge!(
                    "sluice_consumer_lag_records",
                    "group" => self.group.clone(), "topic" => topic.clone(), "partition" => partition.to_string()
                )
                .set(p.consumer_lag as f64);
            }
        }
    }
}

/// Whether librdkafka's statistics show a partition assigned to this consumer, fetching,
/// with a known lag.
pub fn owned(p: &rdkafka::statistics::Partition) -> bool {
    p.desired && p.fetch_state == "active" && p.consumer_lag >= 0
}

impl ConsumerContext for MeteredConsumer {
    /// rdkafka's rebalance (pre hook, assign or unassign, post hook), except when the
    /// consumer group sub-system has already terminated: a rebalance event that is served
    /// only while the consumer closes (it waited in the queue while the loop drained)
    /// would otherwise call `assign`, whose request librdkafka then drops unanswered, and
    /// the close waits for ever (confluentinc/librdkafka#4884). A terminated group has
    /// nothing left to assign, revoke or commit, so the event is only logged.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        if consumer.closed() {
            tracing::debug!(group = %self.group, partitions = %describe(tpl), "rebalance event after the consumer closed; ignored");
            return;
        }
        let tpl: &TopicPartitionList = tpl;
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            other => Rebalance::Error(KafkaError::Rebalance(other.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        // As rdkafka's own: anything but an assignment gives the partitions up.
        let assign = matches!(rebalance, Rebalance::Assign(_));
        let done = match (assign, cooperative) {
            (true, true) => consumer.incremental_assign(tpl),
            (true, false) => consumer.assign(tpl),
            (false, true) => consumer.incremental_unassign(tpl),
            (false, false) => consumer.unassign(),
        };
        if let Err(e) = done {
            tracing::warn!(group = %self.group, error = %e, "applying a rebalance failed");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Ok(mut started) = self.rebalance_started.lock() {
            started.get_or_insert_with(Instant::now);
        }
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(group = %self.group, partitions = %describe(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(group = %self.group, partitions = %describe(tpl), "partitions revoked")
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "rebalance failed")
            }
        }
        if let (Rebalance::Revoke(revoked), Some(hook)) = (rebalance, &self.on_revoke) {
            hook(consumer, revoked);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let kind = match rebalance {
            Rebalance::Assign(_) => "assign",
            Rebalance::Revoke(_) => "revoke",
            Rebalance::Error(_) => "error",
        };
        metrics::counter!("sluice_consumer_rebalances_total", "group" => self.group.clone(), "kind" => kind)
            .increment(1);
        if let Ok(mut started) = self.rebalance_started.lock() {
            if let Some(t) = started.take() {
                metrics::histogram!("sluice_consumer_rebalance_duration_seconds", "group" => self.group.clone())
                    .record(t.elapsed().as_secs_f64());
            }
        }
    }
}

/// Partitions as an operator reads them: `topic[0,1,2]`, topics separated by spaces.
pub fn describe(tpl: &rdkafka::TopicPartitionList) -> String {
    let mut by_topic: std::collections::BTreeMap<String, Vec<i32>> = Default::default();
    for e in tpl.elements() {
        by_topic
            .entry(e.topic().to_string())
            .or_default()
            .push(e.partition());
    }
    by_topic
        .into_iter()
        .map(|(t, mut ps)| {
            ps.sort_unstable();
            let ps: Vec<String> = ps.iter().map(i32::to_string).collect();
            format!("{t}[{}]", ps.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn partitions_read_as_topic_and_numbers() {
        let mut tpl = rdkafka::TopicPartitionList::new();
        for (t, p) in [("raw", 2), ("raw", 0), ("parsed", 1)] {
            tpl.add_partition(t, p);
        }
        assert_eq!(super::describe(&tpl), "parsed[1] raw[0,2]");
    }
}
