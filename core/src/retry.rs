//! Retries, one way for every loop: an attempt returns a typed decision, and waits
//! between attempts come from one backoff (exponential with jitter, through `backon`)
//! that gives up early when the process is shutting down.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio_util::sync::CancellationToken;

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryAction<T, P = ()> {
    /// It worked: here is the result.
    Successful(T),
    /// It failed for a reason that may pass: try the whole thing again.
    Retry(String),
    /// Part of it failed for a reason that may pass: try that part again.
    RetryPartial(P, String),
    /// It failed for good: do not try again.
    DontRetry(String),
}

/// Waits between attempts: exponential from `min` to `max`, each with up to as much
/// again of random jitter, without end.
#[derive(Debug)]
pub struct Backoff {
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    /// From `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            delays: backon::ExponentialBuilder::default()
                .with_min_delay(min)
                .with_max_delay(max)
                .with_jitter()
                .without_max_times()
                .build(),
        }
    }

    /// 100 ms doubling up to 10 s: for destinations that are down.
    pub fn standard() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// The next wait (without waiting).
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(Duration::from_secs(10))
    }

    /// Wait the next delay. Returns `false`, at once, when `shutdown` is cancelled first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Why [`retry`] gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GaveUp {
    /// An attempt failed for good.
    #[error("{0}")]
    Failed(String),
    /// Shutdown came while waiting to try again.
    #[error("shutting down while retrying: {0}")]
    ShuttingDown(String),
}

/// Run `attempt` until it succeeds or fails for good, waiting `backoff` between
/// attempts and calling `retrying` with why and how long before each new one. Stops at
/// once on `shutdown`. [`RetryAction::RetryPartial`] is treated as a whole retry here.
pub async fn retry<T, F, Fut>(
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
    mut attempt: F,
    mut retrying: impl FnMut(&str, Duration),
) -> Result<T, GaveUp>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = RetryAction<T>>,
{
    loop {
        let why = match attempt().await {
            RetryAction::Successful(t) => return Ok(t),
            RetryAction::DontRetry(why) => return Err(GaveUp::Failed(why)),
            RetryAction::Retry(why) | RetryAction::RetryPartial((), why) => why,
        };
        let delay = backoff.next_delay();
        retrying(&why, delay);
        tokio::select! {
            _ = shutdown.cancelled() => return Err(GaveUp::ShuttingDown(why)),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_maximum_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert!(
            delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200),
            "{delays:?}"
        );
        // Never above the maximum plus its jitter, and never ending.
        assert!(
            delays.iter().all(|d| *d <= Duration::from_millis(800)),
            "{delays:?}"
        );
        assert!(delays[5] >= Duration::from_millis(400), "{delays:?}");
    }

    #[tokio::test]
    async fn retries_until_success_and_stops_on_a_final_failure_or_shutdown() {
        let mut calls = 0;
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
        let stop = CancellationToken::new();
        let mut seen = Vec::new();
        let got = retry(
            &mut b,
            &stop,
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        RetryAction::Retry(format!("down {n}"))
                    } else {
                        RetryAction::Successful(n)
                    }
                }
            },
            |why, _| seen.push(why.to_string()),
        )
        .await;
        assert_eq!(got, Ok(3));
        assert_eq!(seen, ["down 1", "down 2"]);

        let failed: Result<(), _> = retry(
            &mut b,
            &stop,
            || async { RetryAction::DontRetry("bad".into()) },
            |_, _| {},
        )
        .await;
        assert_eq!(failed, Err(GaveUp::Failed("bad".into())));

        stop.cancel();
        let mut slow = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let stopped: Result<(), _> = retry(
            &mut slow,
            &stop,
            || async { RetryAction::Retry("down".into()) },
            |_, _| {},
        )
        .await;
        assert_eq!(stopped, Err(GaveUp::ShuttingDown("down".into())));
    }
}
