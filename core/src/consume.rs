//! The receive step every consuming loop shares: take the next record, log and ride
//! out consume errors, and, in a replay, leave a partition alone once it reaches the
//! replay's end offset.

use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::TopicPartitionList;

use crate::events::{ConsumeFailed, Emit};
use crate::replay_scope::{Admit, ReplayScope};

/// Receives records for one stage or sink, within a replay's scope if it has one.
pub struct Receiver<'a, C: ConsumerContext + 'static> {
    consumer: &'a StreamConsumer<C>,
    scope: Option<&'a ReplayScope>,
    component: &'static str,
}

impl<'a, C: ConsumerContext + 'static> Receiver<'a, C> {
    /// Records of `consumer` for `component`, bounded by `scope` in a replay.
    pub fn new(
        consumer: &'a StreamConsumer<C>,
        scope: Option<&'a ReplayScope>,
        component: &'static str,
    ) -> Self {
        Self {
            consumer,
            scope,
            component,
        }
    }

    /// The next record to process ([`Admit::Process`]) or to count as done unprocessed
    /// ([`Admit::Skip`]). A record at or past the replay's end pauses its partition and
    /// is not returned. Cancel-safe: it holds no record across an await, so it can be a
    /// `select!` branch.
    pub async fn next(&self) -> (BorrowedMessage<'a>, Admit) {
        loop {
            let msg = match self.consumer.recv().await {
                Ok(m) => m,
                Err(e) => {
                    ConsumeFailed {
                        component: self.component,
                        error: &e.to_string(),
                    }
                    .emit();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admit = self.scope.map_or(Admit::Process, |s| {
                s.admit(msg.partition(), msg.offset(), msg.headers())
            });
            if admit == Admit::PastEnd {
                // A replay's end: the rest of this partition is not this replay's.
                self.pause(msg.topic(), msg.partition());
                continue;
            }
            return (msg, admit);
        }
    }

    /// Wait until the replay's rate limit lets one more record through (none outside
    /// replays). Call it after [`Receiver::next`], in the handler, not in a `select!`.
    pub async fn throttle(&self) {
        if let Some(s) = self.scope {
            s.throttle().await;
        }
    }

    fn pause(&self, topic: &str, partition: i32) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::debug!(topic, partition, error = %e, "pause");
        }
    }
}
