//! What every stage and sink is started with besides its own settings: the shared
//! sections of the configuration, and how a replay rewires it.

use std::sync::{Arc, Mutex};

use rdkafka::message::OwnedMessage;
use tokio::sync::mpsc;

use crate::config::{KafkaConfig, SchemasConfig, TopicsConfig};
use crate::replay_scope::ReplayScope;

/// The sections of the configuration every stage and sink reads.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    /// Kafka connection and client properties.
    pub kafka: KafkaConfig,
    /// The pipeline's topics.
    pub topics: TopicsConfig,
    /// How Avro records are framed.
    pub schemas: SchemasConfig,
}

/// How a replay (or a `--diff`) changes a stage's or sink's usual wiring.
#[derive(Debug, Default, Clone)]
pub struct Rewiring {
    /// Consumer group instead of the configured one.
    pub group: Option<String>,
    /// Topic consumed instead of the usual input (dead letters still go where they
    /// usually do).
    pub input: Option<String>,
    /// End offsets, tenant filter and rate limit of the replay.
    pub scope: Option<Arc<ReplayScope>>,
    /// A stage's outputs go here instead (`replay --diff`'s scratch topic).
    pub output: Option<String>,
    /// A stage's dead letters go here instead.
    pub dlq: Option<String>,
    /// Records handed to a stage in-process instead of consumed (a replay of the
    /// archive): it transforms them, publishes the outputs and stops when they end.
    pub feed: Option<Feed>,
}

/// Records fed to a stage from outside Kafka, in batches, each record with the topic,
/// partition, offset, timestamp and headers it had there; the stage ends when the
/// sender is dropped.
#[derive(Clone)]
pub struct Feed(Arc<Mutex<Option<mpsc::Receiver<Vec<OwnedMessage>>>>>);

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Feed")
    }
}

impl Feed {
    /// A feed and its sender, holding at most `batches` batches not yet taken.
    pub fn channel(batches: usize) -> (mpsc::Sender<Vec<OwnedMessage>>, Self) {
        let (tx, rx) = mpsc::channel(batches.max(1));
        (tx, Self(Arc::new(Mutex::new(Some(rx)))))
    }

    /// The receiving end; `None` once a stage took it (a feed is read by one stage).
    pub fn take(&self) -> Option<mpsc::Receiver<Vec<OwnedMessage>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl Rewiring {
    /// `usual`, unless the rewiring replaces it with `by`.
    pub fn or(by: &Option<String>, usual: &str) -> String {
        by.clone().unwrap_or_else(|| usual.to_string())
    }

    /// Whether this runs a replay (its outputs are stamped as such).
    pub fn is_replay(&self) -> bool {
        self.scope.is_some()
    }
}
