//! Retries of transient failures (a lookup that is down): exponential backoff with
//! jitter, bounded, then the record is dead-lettered with its attempt count. After a
//! record exhausted its attempts, the next ones are dead-lettered at once for a cooldown,
//! so an outage does not stall the stage one record at a time; re-drive them from the DLQ
//! with `sluice replay` once the dependency is back.

use std::time::{Duration, Instant};

use rdkafka::message::Message;
use sluice_core::events::{Emit, RecordRetrying};
use sluice_core::failure::Failure;
use sluice_core::retry::Backoff;

use crate::transform::{Output, Transform};

/// How transient failures are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled each time (with up to as much again of
    /// jitter).
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// After a record exhausted its attempts, how long the next ones skip retrying.
    pub cooldown: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            cooldown: Duration::from_secs(30),
        }
    }
}

/// The retry state of one stage.
#[derive(Debug)]
pub struct Retry {
    policy: RetryPolicy,
    stage: &'static str,
    open_until: Option<Instant>,
}

impl Retry {
    /// Retries for `stage` under `policy`.
    pub fn new(policy: RetryPolicy, stage: &'static str) -> Self {
        // Exported from the start, so rate() and alerts see a zero.
        metrics::counter!("sluice_stage_retries_total", "stage" => stage).increment(0);
        Self {
            policy,
            stage,
            open_until: None,
        }
    }

    /// Retry `first` (a transient failure of `msg`) until it passes, fails for good, or
    /// the attempts run out. Returns the last result and the attempts made.
    pub async fn run<T: Transform, M: Message>(
        &mut self,
        transform: &T,
        msg: &M,
        first: Result<Vec<Output>, Failure>,
    ) -> (Result<Vec<Output>, Failure>, u32) {
        let mut result = first;
        let mut attempts = 1;
        if self.open_until.is_some_and(|t| Instant::now() < t) {
            return (result, attempts);
        }
        let mut backoff = Backoff::new(self.policy.initial_backoff, self.policy.max_backoff);
        while attempts < self.policy.max_attempts && matches!(&result, Err(f) if f.transient) {
            let retry_in = backoff.next_delay();
            if let Err(f) = &result {
                RecordRetrying {
                    stage: self.stage,
                    attempts,
                    failure: &f.to_string(),
                    retry_in,
                }
                .emit();
            }
            tokio::time::sleep(retry_in).await;
            attempts += 1;
            result = transform.process(msg);
        }
        match &result {
            Err(f) if f.transient => {
                tracing::warn!(stage = self.stage, attempts, failure = %f, cooldown_ms = self.policy.cooldown.as_millis() as u64,
                    "transient failure persisted; dead-lettering without retries for the cooldown");
                self.open_until = Some(Instant::now() + self.policy.cooldown);
            }
            _ => self.open_until = None,
        }
        (result, attempts)
    }
}
