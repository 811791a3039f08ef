//! Kafka client configuration and topic administration.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::{KafkaConfig, TopicsConfig};

/// Why a Kafka administration call failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaAdminError {
    /// The client could not be created or the request failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The broker refused to create a topic.
    #[error("cannot create topic {topic}: {code}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
    /// New topics' partitions had no leader in time.
    #[error("new topics without partition leaders after 30 s: {0}")]
    Leaders(String),
    /// The broker refused to delete a topic.
    #[error("cannot delete topic {topic}: {code}")]
    DeleteTopic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
}

impl KafkaConfig {
    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in self.security.properties() {
            c.set(k, v);
        }
        // Pass-through properties come last: they can still override anything.
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// Settings of a durable producer: idempotent, `acks=all`, plus the configured properties.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4");
        for (k, v) in &self.producer {
            c.set(k, v);
        }
        c
    }

    /// Settings of a consumer in `group` that commits only offsets it stored itself.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.partition.eof", "false")
            .set(
                "statistics.interval.ms",
                crate::consumer_metrics::STATISTICS_INTERVAL_MS,
            );
        for (k, v) in &self.consumer {
            c.set(k, v);
        }
        c
    }

    /// A metered consumer in `group` that keeps at most about `records` records per
    /// partition fetched ahead (librdkafka's `queued.min.messages`, 100,000 by default),
    /// unless the settings name that property themselves. For a consumer that takes its
    /// records a batch (a sink) or a bounded number in flight (a stage) at a time: a
    /// deeper prefetch only costs memory, and on a broker that answers an empty fetch at
    /// once (no `fetch.wait.max.ms` wait) a queue below the target keeps the consumer
    /// and the broker fetching nothing in a loop.
    pub fn metered_consumer_prefetching(
        &self,
        group: &str,
        records: usize,
    ) -> Result<
        rdkafka::consumer::StreamConsumer<crate::consumer_metrics::MeteredConsumer>,
        KafkaError,
    > {
        self.prefetching_consumer_config(group, records)
            .create_with_context(crate::consumer_metrics::MeteredConsumer::new(group))
    }

    /// The settings of [`Self::metered_consumer_prefetching`]. With the prefetch bound
    /// comes a short `fetch.queue.backoff.ms` (unless the settings name it): librdkafka
    /// waits that long (1 s by default) before it fetches again for a partition whose
    /// queue reached the bound, so a bound of N records held every consumer to about N
    /// records a partition a second (measured on Apache Kafka: a bare consumer read
    /// 137 k records/s with a bound of 10,000 and 2.9 M/s with the bound and 10 ms).
    pub fn prefetching_consumer_config(&self, group: &str, records: usize) -> ClientConfig {
        let mut c = self.consumer_config(group);
        let named =
            |key: &str| self.consumer.contains_key(key) || self.properties.contains_key(key);
        if !named("queued.min.messages") {
            // librdkafka accepts 1 to 10,000,000.
            c.set(
                "queued.min.messages",
                records.clamp(1, 10_000_000).to_string(),
            );
        }
        if !named("fetch.queue.backoff.ms") {
            c.set("fetch.queue.backoff.ms", PREFETCH_BACKOFF_MS);
        }
        if !named("max.partition.fetch.bytes") {
            c.set("max.partition.fetch.bytes", PREFETCH_PARTITION_FETCH_BYTES);
        }
        c
    }

    /// A metered consumer that calls `hook` with partitions about to be revoked, keeping
    /// about `records` records per partition fetched ahead, as
    /// [`Self::metered_consumer_prefetching`] does.
    pub fn draining_consumer(
        &self,
        group: &str,
        records: usize,
        hook: crate::consumer_metrics::RevokeHook,
    ) -> Result<
        rdkafka::consumer::StreamConsumer<crate::consumer_metrics::MeteredConsumer>,
        KafkaError,
    > {
        let context = crate::consumer_metrics::MeteredConsumer::new(group).with_revoke_hook(hook);
        self.prefetching_consumer_config(group, records)
            .create_with_context(context)
    }

    /// Settings of an admin client.
    pub fn admin_config(&self) -> ClientConfig {
        self.base()
    }
}

/// How long a prefetching consumer waits before fetching again for a partition whose
/// queue is full: short enough that a partition refills well ahead of any stage or sink
/// (a bound of 10,000 records refilled every 20 ms is 500 k records/s), long enough not to
/// wake up for nothing.
const PREFETCH_BACKOFF_MS: &str = "20";

/// The compressed bytes one fetch brings a prefetching consumer per partition (the broker
/// still sends a larger batch whole). librdkafka decompresses every fetched batch at once
/// and keeps it until its last record is consumed, and the record-count bound only stops
/// the *next* fetch, so a lagging consumer holds about partitions × this × the
/// compression ratio. At librdkafka's 1 MiB an Elasticsearch sink behind on 6 partitions
/// of small lz4 records held 330 MiB of decompressed batches (jemalloc heap profile of
/// `bench flood`); a quarter of that still brings thousands of records a fetch.
const PREFETCH_PARTITION_FETCH_BYTES: &str = "262144";

/// Create the `wanted` topics (name, retention ms) that do not exist yet, with the
/// partitions and replication of `topics`; existing ones are left alone. Returns the
/// names of the topics it created.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
    wanted: &[(String, i64)],
) -> Result<Vec<String>, KafkaAdminError> {
    let wanted: Vec<(String, String)> = wanted
        .iter()
        .map(|(name, retention)| (name.clone(), retention.to_string()))
        .collect();
    create_topics(kafka, topics.partitions, topics.replication_factor, &wanted).await
}

/// Create `topics` (name, retention ms) with the given partitions; existing ones are kept.
pub async fn create_topics(
    kafka: &KafkaConfig,
    partitions: i32,
    replication: i32,
    topics: &[(String, String)],
) -> Result<Vec<String>, KafkaAdminError> {
    let admin: AdminClient<DefaultClientContext> = kafka.admin_config().create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, retention)| {
            NewTopic::new(name, partitions, TopicReplication::Fixed(replication))
                .set("retention.ms", retention)
                .set("cleanup.policy", "delete")
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut created = Vec::new();
    for result in admin.create_topics(new.iter(), &opts).await? {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaAdminError::CreateTopic { topic, code }),
        }
    }
    if !created.is_empty() {
        let (kafka, names) = (kafka.clone(), created.clone());
        tokio::task::spawn_blocking(move || await_leaders(&kafka, &names, LEADERS_WITHIN))
            .await
            .map_err(|_| KafkaAdminError::Leaders(created.join(", ")))??;
    }
    Ok(created)
}

/// How long [`create_topics`] waits for a new topic's partitions to have leaders.
const LEADERS_WITHIN: Duration = Duration::from_secs(30);

/// Wait until every partition of `topics` has a leader. A broker answers CreateTopics
/// before it has elected them; until then a metadata or offset request about the topic
/// fails (`NotLeaderForPartition`, `LeaderNotAvailable`), which a process started at once
/// would take for a fault. Blocking.
pub fn await_leaders(
    kafka: &KafkaConfig,
    topics: &[String],
    within: Duration,
) -> Result<(), KafkaAdminError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka.consumer_config("sluice-inspect").create()?;
    let deadline = std::time::Instant::now() + within;
    loop {
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(5))?;
        let ready = topics.iter().all(|name| {
            metadata.topics().iter().any(|t| {
                t.name() == name
                    && t.error().is_none()
                    && !t.partitions().is_empty()
                    && t.partitions()
                        .iter()
                        .all(|p| p.error().is_none() && p.leader() >= 0)
            })
        });
        // The metadata can name a leader a moment before the partition answers as one;
        // an offsets request is what clients will ask first.
        if ready
            && topics.iter().all(|name| {
                metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == name)
                    .flat_map(|t| t.partitions())
                    .all(|p| {
                        consumer
                            .fetch_watermarks(name, p.id(), Duration::from_secs(5))
                            .is_ok()
                    })
            })
        {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(KafkaAdminError::Leaders(topics.join(", ")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Delete `topics` (scratch topics of a `replay --diff`); ones already gone are fine.
pub async fn delete_topics(kafka: &KafkaConfig, topics: &[&str]) -> Result<(), KafkaAdminError> {
    let admin: AdminClient<DefaultClientContext> = kafka.admin_config().create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => return Err(KafkaAdminError::DeleteTopic { topic, code }),
        }
    }
    Ok(())
}

/// The end offset (high watermark) of every partition of `topic`, by partition.
/// Blocking: call from a blocking context.
pub fn end_offsets(kafka: &KafkaConfig, topic: &str) -> Result<Vec<(i32, i64)>, KafkaAdminError> {
    Ok(watermarks(kafka, topic)?
        .into_iter()
        .map(|(p, _, high)| (p, high))
        .collect())
}

/// The first offset still retained (low watermark) and the end offset (high watermark)
/// of every partition of `topic`: `(partition, low, high)`. Blocking: call from a
/// blocking context.
pub fn watermarks(
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<Vec<(i32, i64, i64)>, KafkaAdminError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka.consumer_config("sluice-inspect").create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut out = Vec::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
            out.push((p.id(), low, high));
        }
    }
    Ok(out)
}

/// The offsets `group` committed on each partition of `topic` (0 where none).
/// Blocking: call from a blocking context.
pub fn committed_offsets(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
) -> Result<Vec<(i32, i64)>, KafkaAdminError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = kafka.consumer_config(group).create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            (
                e.partition(),
                if let Offset::Offset(o) = e.offset() {
                    o
                } else {
                    0
                },
            )
        })
        .collect())
}

/// Records of `topic` that `group` has yet to commit, over all partitions (from the
/// end offsets and the group's committed offsets). Blocking.
pub fn lag(kafka: &KafkaConfig, group: &str, topic: &str) -> Result<i64, KafkaAdminError> {
    let ends = end_offsets(kafka, topic)?;
    let committed = committed_offsets(kafka, group, topic)?;
    Ok(ends
        .iter()
        .map(|(p, end)| {
            (end - committed
                .iter()
                .find(|(q, _)| q == p)
                .map_or(0, |(_, c)| *c))
            .max(0)
        })
        .sum())
}

/// Every record of `topic` from the beginning up to its end offsets at call time.
/// Blocking: call from a blocking context.
pub fn read_all(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<rdkafka::message::OwnedMessage>, KafkaAdminError> {
    let mut out = Vec::new();
    scan(kafka, topic, None, timeout, |m| out.push(m.detach()))?;
    Ok(out)
}

/// Call `each` with every record of `topic` from the first one stamped at or after
/// `since_ms` (or from the beginning) up to the end offsets at call time, in partition
/// order. Returns whether it read them all before `timeout`.
/// Blocking: call from a blocking context.
pub fn scan(
    kafka: &KafkaConfig,
    topic: &str,
    since_ms: Option<i64>,
    timeout: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<bool, KafkaAdminError> {
    let ranges = ranges_since(kafka, topic, since_ms)?;
    let deadline = std::time::Instant::now() + timeout;
    let next = read_ranges(
        kafka,
        topic,
        &ranges,
        || std::time::Instant::now() >= deadline,
        |m| {
            each(m);
            Ok::<(), std::convert::Infallible>(())
        },
    )
    .map_err(|e| match e {
        ReadError::Kafka(k) => k,
        ReadError::Each(never) => match never {},
    })?;
    Ok(ranges
        .iter()
        .all(|r| next.get(&r.partition).is_some_and(|n| *n >= r.end)))
}

/// The range of every partition of `topic` from the first record stamped at or after
/// `since_ms` (or from the log start) to the end now. Blocking.
pub fn ranges_since(
    kafka: &KafkaConfig,
    topic: &str,
    since_ms: Option<i64>,
) -> Result<Vec<PartitionRange>, KafkaAdminError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let ends = end_offsets(kafka, topic)?;
    let consumer: BaseConsumer = kafka.consumer_config("sluice-inspect").create()?;
    let timeout = Duration::from_secs(10);
    let mut starts = TopicPartitionList::new();
    for &(p, _) in &ends {
        starts.add_partition_offset(
            topic,
            p,
            since_ms.map_or(Offset::Beginning, Offset::Offset),
        )?;
    }
    if since_ms.is_some() {
        starts = consumer.offsets_for_times(starts, timeout)?;
    }
    let mut out = Vec::new();
    for e in starts.elements() {
        let end = ends
            .iter()
            .find(|(q, _)| *q == e.partition())
            .map_or(0, |(_, end)| *end);
        let (low, _) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        let start = match e.offset() {
            Offset::Offset(o) => o.max(low),
            Offset::Beginning => low,
            // No record at or after `since_ms`.
            _ => end,
        };
        out.push(PartitionRange {
            partition: e.partition(),
            start,
            end,
        });
    }
    Ok(out)
}

/// Offsets `[start, end)` of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    /// Partition.
    pub partition: i32,
    /// First offset.
    pub start: i64,
    /// First offset after.
    pub end: i64,
}

/// Why reading a range stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    /// The consumer failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaAdminError),
    /// The caller's handler failed.
    #[error("{0}")]
    Each(E),
}

impl<E> From<KafkaError> for ReadError<E> {
    fn from(e: KafkaError) -> Self {
        Self::Kafka(e.into())
    }
}

/// Call `each` with every record of `ranges` of `topic`, in offset order per partition,
/// until every range is read, `stop()` is true, or `each` fails. Returns, per partition,
/// the offset after the last record handed over (where a later read resumes). Gaps at a
/// range's end (transaction markers) count as read. Uses no consumer group.
/// Blocking: call from a blocking context.
pub fn read_ranges<E>(
    kafka: &KafkaConfig,
    topic: &str,
    ranges: &[PartitionRange],
    stop: impl Fn() -> bool,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<(), E>,
) -> Result<std::collections::HashMap<i32, i64>, ReadError<E>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let mut next: std::collections::HashMap<i32, i64> =
        ranges.iter().map(|r| (r.partition, r.start)).collect();
    let end_of = |p: i32| {
        ranges
            .iter()
            .find(|r| r.partition == p)
            .map_or(0, |r| r.end)
    };
    let mut tpl = TopicPartitionList::new();
    for r in ranges.iter().filter(|r| r.start < r.end) {
        tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.start))?;
    }
    if tpl.count() == 0 {
        return Ok(next);
    }
    let consumer: BaseConsumer = kafka.consumer_config("sluice-inspect").create()?;
    consumer.assign(&tpl)?;
    let done = |next: &std::collections::HashMap<i32, i64>| {
        ranges
            .iter()
            .all(|r| next.get(&r.partition).is_some_and(|n| *n >= r.end))
    };
    while !done(&next) && !stop() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let p = m.partition();
                if m.offset() < end_of(p) && next.get(&p).is_some_and(|n| m.offset() >= *n) {
                    each(&m).map_err(ReadError::Each)?;
                    next.insert(p, m.offset() + 1);
                } else if m.offset() >= end_of(p) {
                    next.insert(p, end_of(p).max(*next.get(&p).unwrap_or(&0)));
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => {
                // Gaps at the end of a range (transaction markers) leave no record.
                if let Ok(position) = consumer.position() {
                    for e in position.elements() {
                        if let (Offset::Offset(o), Some(n)) =
                            (e.offset(), next.get_mut(&e.partition()))
                        {
                            if o > *n {
                                *n = o.min(end_of(e.partition()));
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(next)
}

/// How a topic on the broker differs from what the configuration asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicCheck {
    /// The topic.
    pub topic: String,
    /// Whether it exists.
    pub exists: bool,
    /// Differences, as `setting: wanted X, found Y`.
    pub differences: Vec<String>,
}

/// Compare the `wanted` topics (name, retention ms) on the broker with the
/// configuration: partitions, `retention.ms` and `cleanup.policy`.
pub async fn check_topics(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
    wanted: &[(String, i64)],
) -> Result<Vec<TopicCheck>, KafkaAdminError> {
    use rdkafka::admin::ResourceSpecifier;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let admin: AdminClient<DefaultClientContext> = kafka.admin_config().create()?;
    let probe: BaseConsumer = kafka.consumer_config("sluice-inspect").create()?;
    let metadata =
        tokio::task::block_in_place(|| probe.fetch_metadata(None, Duration::from_secs(10)))?;
    let mut out = Vec::new();
    for (name, retention) in wanted {
        let Some(meta) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
        else {
            out.push(TopicCheck {
                topic: name.clone(),
                exists: false,
                differences: vec!["missing".into()],
            });
            continue;
        };
        let mut differences = Vec::new();
        let partitions = meta.partitions().len() as i32;
        if partitions != topics.partitions {
            differences.push(format!(
                "partitions: wanted {}, found {partitions}",
                topics.partitions
            ));
        }
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let described = admin
            .describe_configs([&ResourceSpecifier::Topic(name)], &opts)
            .await?;
        if let Some(Ok(resource)) = described.first() {
            let value = |key: &str| {
                resource
                    .get(key)
                    .and_then(|e| e.value.clone())
                    .unwrap_or_else(|| "unset".into())
            };
            let found = value("retention.ms");
            if found != retention.to_string() {
                differences.push(format!("retention.ms: wanted {retention}, found {found}"));
            }
            let policy = value("cleanup.policy");
            if policy != "delete" {
                differences.push(format!("cleanup.policy: wanted delete, found {policy}"));
            }
        }
        out.push(TopicCheck {
            topic: name.clone(),
            exists: true,
            differences,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefetch_bound_applies_unless_the_settings_name_one() {
        let mut kafka = KafkaConfig::default();
        let c = kafka.prefetching_consumer_config("g", 2_000);
        assert_eq!(c.get("queued.min.messages"), Some("2000"));
        assert_eq!(
            kafka.consumer_config("g").get("queued.min.messages"),
            None,
            "other consumers keep librdkafka's default"
        );
        kafka
            .consumer
            .insert("queued.min.messages".into(), "50000".into());
        let c = kafka.prefetching_consumer_config("g", 2_000);
        assert_eq!(c.get("queued.min.messages"), Some("50000"));
        kafka.consumer.clear();
        kafka
            .properties
            .insert("queued.min.messages".into(), "7".into());
        let c = kafka.prefetching_consumer_config("g", 2_000);
        assert_eq!(c.get("queued.min.messages"), Some("7"));
        let c = KafkaConfig::default().prefetching_consumer_config("g", 0);
        assert_eq!(c.get("queued.min.messages"), Some("1"));
    }

    /// A prefetching consumer sets `key` to `default`; other consumers leave it to
    /// librdkafka; settings that name it (in `kafka.consumer` or `kafka.properties`) win.
    fn assert_prefetch_default(key: &str, default: &str) {
        let mut kafka = KafkaConfig::default();
        let prefetching = |k: &KafkaConfig| k.prefetching_consumer_config("g", 2_000);
        assert_eq!(prefetching(&kafka).get(key), Some(default));
        assert_eq!(
            kafka.consumer_config("g").get(key),
            None,
            "other consumers keep librdkafka's default"
        );
        kafka.consumer.insert(key.into(), "100".into());
        assert_eq!(prefetching(&kafka).get(key), Some("100"));
        kafka.consumer.clear();
        kafka.properties.insert(key.into(), "1048576".into());
        assert_eq!(prefetching(&kafka).get(key), Some("1048576"));
    }

    #[test]
    fn a_prefetch_bound_comes_with_a_short_fetch_backoff() {
        assert_prefetch_default("fetch.queue.backoff.ms", PREFETCH_BACKOFF_MS);
    }

    #[test]
    fn a_prefetch_bound_comes_with_smaller_partition_fetches() {
        assert_prefetch_default("max.partition.fetch.bytes", PREFETCH_PARTITION_FETCH_BYTES);
    }
}
