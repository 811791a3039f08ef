//! How much a tenant may send: a token bucket per tenant, counted in events.

use std::num::NonZeroU32;

use axum::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::IngestConfig;
use crate::http::Rejection;

/// The per-tenant rate limit, if one is configured.
pub(crate) struct RateLimit {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    rate: u32,
    burst: u32,
}

impl RateLimit {
    /// The limit of the configuration (none when `rate_limit_per_sec` is unset).
    pub(crate) fn new(config: &IngestConfig) -> Self {
        let limiter = config
            .rate_limit_per_sec
            .and_then(NonZeroU32::new)
            .map(|rate| {
                let burst = config
                    .rate_limit_burst
                    .and_then(NonZeroU32::new)
                    .unwrap_or(rate);
                DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
            });
        let rate = config.rate_limit_per_sec.unwrap_or(0);
        Self {
            limiter,
            rate,
            burst: config.rate_limit_burst.filter(|b| *b > 0).unwrap_or(rate),
        }
    }

    /// After [`RateLimit::admit`] took one event before the body was read: take the
    /// rest of a request of `events`, refusing a batch larger than the burst for good.
    pub(crate) fn admit_rest(&self, tenant: &str, events: usize) -> Result<(), Rejection> {
        if self.limiter.is_none() || events <= 1 {
            return Ok(());
        }
        if events > self.burst as usize {
            return Err(Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                "batch_over_burst",
                format!(
                    "{events} events in one request; the burst allows at most {}",
                    self.burst
                ),
            ));
        }
        self.admit(tenant, events - 1)
    }

    /// Take `events` tokens from the tenant's bucket, or say when to retry.
    pub(crate) fn admit(&self, tenant: &str, events: usize) -> Result<(), Rejection> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let n =
            NonZeroU32::new(u32::try_from(events).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match limiter.check_key_n(&tenant.to_string(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(Rejection::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("tenant {tenant} is over its rate of {} events/s", self.rate),
                )
                .retry_after(wait.as_secs() + 1))
            }
            Err(capacity) => Err(Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                "batch_over_burst",
                format!(
                    "{events} events in one request; the burst allows at most {}",
                    capacity.0
                ),
            )),
        }
    }
}
