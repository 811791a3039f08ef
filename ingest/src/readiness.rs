//! Ingest's readiness answer (`/readyz`, on the public port): one broker check at a time,
//! its answer kept for a second. Without it every probe (or anyone on the internet) could
//! start a metadata request of up to 2 s against the brokers.

use std::future::Future;
use std::time::{Duration, Instant};

/// The last readiness answer and when it was found.
pub(crate) struct Readiness {
    ttl: Duration,
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl Readiness {
    /// Answers are kept for `ttl`.
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The last answer if younger than the TTL, else `check`'s. Callers that arrive while
    /// a check runs wait for it and share its answer (the lock is held across it).
    pub(crate) async fn ready<F, Fut>(&self, check: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, ready)) = *last {
            if at.elapsed() < self.ttl {
                return ready;
            }
        }
        let ready = check().await;
        *last = Some((Instant::now(), ready));
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_probes_share_one_check_per_ttl() {
        let readiness = Arc::new(Readiness::new(Duration::from_millis(300)));
        let checks = Arc::new(AtomicU32::new(0));
        let probe = |r: Arc<Readiness>, c: Arc<AtomicU32>| async move {
            r.ready(|| async move {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                true
            })
            .await
        };
        let many: Vec<_> = (0..100)
            .map(|_| tokio::spawn(probe(readiness.clone(), checks.clone())))
            .collect();
        for p in many {
            assert!(p.await.unwrap_or(false));
        }
        assert_eq!(checks.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(probe(readiness.clone(), checks.clone()).await);
        assert_eq!(
            checks.load(Ordering::SeqCst),
            2,
            "a stale answer is checked again"
        );
    }
}
