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

/// How long a stage or sink waits for its consumer to close at shutdown.
pub const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Drop `consumer` (closing it: leave the group, serve its last rebalance) on a thread of
/// its own and wait for that at most `timeout`. librdkafka can wait for ever inside a
/// close (confluentinc/librdkafka#4884: a rebalance call whose request it dropped); a
/// stage or sink that hung there would never exit, and a caller awaiting it never go on.
/// Past the wait the close is left to finish, or not, on its own thread. Returns whether
/// it finished in time. Everything worth keeping was committed before the close.
pub async fn close_within<T: Send + 'static>(consumer: T, group: &str, timeout: Duration) -> bool {
    let (done, closed) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("consumer-close".into())
        .spawn(move || {
            drop(consumer);
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        // No thread to spare: `spawn` has already dropped the closure, so the consumer
        // was closed here, unbounded, as a plain drop would.
        tracing::warn!(group, error = %e, "cannot start a thread to close the consumer; closed it inline");
        return true;
    }
    if tokio::time::timeout(timeout, closed).await.is_ok() {
        return true;
    }
    tracing::warn!(
        group,
        waited_s = timeout.as_secs(),
        "consumer did not close in time (librdkafka stuck in its close); going on without it"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Stands for a consumer whose close takes `for_` (or for ever, near enough).
    struct SlowClose {
        for_: Duration,
        closed: Arc<AtomicBool>,
    }

    impl SlowClose {
        /// One whose close takes `for_`, and the flag its close sets.
        fn taking(for_: Duration) -> (Self, Arc<AtomicBool>) {
            let closed = Arc::new(AtomicBool::new(false));
            let slow = Self {
                for_,
                closed: closed.clone(),
            };
            (slow, closed)
        }
    }

    impl Drop for SlowClose {
        fn drop(&mut self) {
            std::thread::sleep(self.for_);
            self.closed.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_close_that_hangs_is_left_behind_after_the_wait() {
        let (hanging, closed) = SlowClose::taking(Duration::from_secs(30));
        assert!(!close_within(hanging, "g", Duration::from_millis(200)).await);
        // The caller goes on while the close still hangs.
        assert!(!closed.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_close_that_finishes_is_waited_for() {
        let (quick, closed) = SlowClose::taking(Duration::from_millis(300));
        assert!(close_within(quick, "g", Duration::from_secs(20)).await);
        assert!(closed.load(Ordering::SeqCst));
    }
}
