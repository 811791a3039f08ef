//! Replay epochs. A replay's outputs must beat every earlier processing of the same
//! events in every sink, whatever the hosts' clocks said when they processed them, so a
//! replay does not trust its own clock: it appends one record to the replay log (a
//! one-partition topic, kept for ever) and takes the record's offset plus one as its
//! epoch. Offsets only grow, so each replay's epoch is greater than every earlier one's,
//! and live processing has epoch 0. The log also tells operators which replays ran.

use anyhow::{bail, Context, Result};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use sluice_core::config::{KafkaConfig, TopicsConfig};
use sluice_core::headers::MAX_EPOCH;

/// What the replay log says about one replay.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry<'a> {
    /// The replay's consumer group (its name, stamped on its outputs).
    pub replay: &'a str,
    /// The stage or sink it runs, e.g. `stage enrich`.
    pub target: String,
    /// The topic it reads.
    pub topic: &'a str,
    /// When it started, Unix milliseconds (as the replaying host's clock says).
    pub started_at_ms: i64,
}

impl<'a> LogEntry<'a> {
    /// The entry of replay `replay` of `target` reading `topic`, starting now.
    pub fn of(replay: &'a str, target: &str, topic: &'a str) -> Self {
        Self {
            replay,
            target: target.to_string(),
            topic,
            started_at_ms: sluice_core::now_ms(),
        }
    }
}

/// Append `entry` to the replay log (created when missing) and return the replay's epoch.
pub async fn draw(kafka: &KafkaConfig, topics: &TopicsConfig, entry: &LogEntry<'_>) -> Result<u32> {
    let log = &topics.replays;
    sluice_core::kafka::create_topics(
        kafka,
        1,
        topics.replication_factor,
        &[(log.clone(), "-1".to_string())],
    )
    .await
    .with_context(|| format!("creating the replay log topic {log} (topics.replays)"))?;
    let producer: FutureProducer = kafka
        .producer_config()
        .create()
        .context("creating the replay log's producer")?;
    let value = serde_json::to_vec(entry)?;
    let offset = producer
        .send(
            FutureRecord::<str, [u8]>::to(log)
                .partition(0)
                .key(entry.replay)
                .payload(&value),
            std::time::Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .with_context(|| format!("appending to the replay log {log} (topics.replays)"))?
        .offset;
    let epoch = u32::try_from(offset + 1).unwrap_or(u32::MAX);
    if epoch > MAX_EPOCH {
        bail!("the replay log {log} holds {offset} replays, the most a version can order ({MAX_EPOCH})");
    }
    tracing::info!(replay = entry.replay, epoch, log = %log, "replay epoch drawn");
    Ok(epoch)
}
