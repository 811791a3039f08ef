//! The limits a replay puts on a stage or sink it runs: stop at the end offsets captured
//! when the replay started, keep only one tenant's records, and cap the record rate.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rdkafka::message::Headers;

use crate::headers;

/// What a stage or sink does with one record under a [`ReplayScope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Process it.
    Process,
    /// Outside the tenant filter: count it as done without processing it.
    Skip,
    /// At or past the partition's end offset: leave it unprocessed and uncommitted.
    PastEnd,
}

/// Bounds of a replay run: end offsets per partition, a tenant filter and a rate limit.
pub struct ReplayScope {
    ends: HashMap<i32, i64>,
    tenant: Option<String>,
    limiter: Option<DefaultDirectRateLimiter>,
    admitted: AtomicU64,
    skipped: AtomicU64,
    epoch: u32,
}

impl std::fmt::Debug for ReplayScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayScope")
            .field("ends", &self.ends)
            .field("tenant", &self.tenant)
            .field("rate_limited", &self.limiter.is_some())
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl ReplayScope {
    /// A scope ending at `ends` (partition → exclusive end offset); partitions not listed
    /// are entirely past the end.
    pub fn new(ends: HashMap<i32, i64>, tenant: Option<String>, rate: Option<NonZeroU32>) -> Self {
        Self {
            ends,
            tenant,
            limiter: rate.map(|r| RateLimiter::direct(Quota::per_second(r))),
            admitted: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            epoch: 0,
        }
    }

    /// The same scope, whose outputs carry replay epoch `epoch` (from the replay log).
    pub fn with_epoch(mut self, epoch: u32) -> Self {
        self.epoch = epoch;
        self
    }

    /// The replay epoch stamped on what this replay produces (0: none drawn).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Decide what to do with the record at `partition`/`offset` carrying `headers`.
    pub fn admit<H: Headers>(&self, partition: i32, offset: i64, headers: Option<&H>) -> Admit {
        if self.ends.get(&partition).is_none_or(|end| offset >= *end) {
            return Admit::PastEnd;
        }
        if !self.keeps_tenant(headers) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return Admit::Skip;
        }
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Admit::Process
    }

    /// Whether a record carrying `headers` passes the tenant filter.
    pub fn keeps_tenant<H: Headers>(&self, headers: Option<&H>) -> bool {
        self.tenant
            .as_deref()
            .is_none_or(|t| headers::get(headers, headers::TENANT) == Some(t))
    }

    /// Wait until the rate limit lets one more record through.
    pub async fn throttle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
    }

    /// Records admitted for processing so far.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Records skipped by the tenant filter so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders};

    #[test]
    fn ends_tenant_and_counts() {
        let scope = ReplayScope::new(HashMap::from([(0, 10), (1, 0)]), Some("acme".into()), None);
        let acme = OwnedHeaders::new().insert(Header {
            key: headers::TENANT,
            value: Some("acme"),
        });
        let other = OwnedHeaders::new().insert(Header {
            key: headers::TENANT,
            value: Some("globex"),
        });
        assert_eq!(scope.admit(0, 9, Some(&acme)), Admit::Process);
        assert_eq!(scope.admit(0, 3, Some(&other)), Admit::Skip);
        assert_eq!(scope.admit(0, 3, None::<&OwnedHeaders>), Admit::Skip);
        assert_eq!(scope.admit(0, 10, Some(&acme)), Admit::PastEnd);
        assert_eq!(scope.admit(1, 0, Some(&acme)), Admit::PastEnd);
        assert_eq!(scope.admit(2, 0, Some(&acme)), Admit::PastEnd);
        assert_eq!((scope.admitted(), scope.skipped()), (1, 2));
    }
}
