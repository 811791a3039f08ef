//! The HTTP ingest endpoint. It authenticates a request, bounds it, stamps each line
//! with headers and writes the raw bytes to the raw topic. It does not parse events:
//! that is the parse stage's job, so a malformed line is kept raw and dead-lettered there.
//!
//! `POST /v1/events` answers `202` only once the broker acknowledged every record of
//! the request (idempotent producer, `acks=all`).

pub mod config;

mod auth;
mod http;
mod limits;
mod producer;
mod readiness;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use sluice_core::config::KafkaConfig;
use tokio::net::TcpListener;

use crate::config::IngestConfig;
pub use crate::http::{Accepted, Rejection};
pub use crate::producer::RawHeaders;

/// Why the ingest server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The Kafka producer could not be created.
    #[error("kafka producer: {0}")]
    Producer(#[from] KafkaError),
    /// The listen address could not be bound or serving failed.
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
    /// The settings cannot work.
    #[error("{0}")]
    Config(String),
}

/// `bytes` in KiB permits (rounded up), within what a semaphore holds.
pub(crate) fn kib(bytes: usize) -> usize {
    bytes
        .div_ceil(1024)
        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS)
}

fn config_permits(config: &IngestConfig) -> usize {
    config
        .max_concurrent_requests
        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS)
}

/// Shared state of the ingest server.
pub struct Ingest {
    /// Replaced when it fails for good (see [`Ingest::replace_if_failed`]).
    producer: RwLock<FutureProducer>,
    kafka: KafkaConfig,
    topic: String,
    config: IngestConfig,
    /// Longest line (`topics.max_event_bytes`).
    max_event_bytes: usize,
    /// The accepted API keys.
    keys: auth::Keys,
    /// The per-tenant rate limit.
    limits: limits::RateLimit,
    /// Requests being handled; a request that finds none free is answered 503.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Bytes of bodies being handled, in KiB permits.
    body_budget: Arc<tokio::sync::Semaphore>,
    /// `/readyz`'s shared, briefly kept answer.
    readiness: readiness::Readiness,
    /// Refused bodies being drained (`max_draining`).
    draining: Arc<tokio::sync::Semaphore>,
}

impl Ingest {
    /// Create the producer and the request handler state. Lines longer than
    /// `max_event_bytes` are refused (413), and that size must fit a record.
    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        max_event_bytes: usize,
        config: IngestConfig,
    ) -> Result<Arc<Self>, IngestError> {
        config.check().map_err(IngestError::Config)?;
        kafka
            .check_event_size(max_event_bytes)
            .map_err(|e| IngestError::Config(e.to_string()))?;
        let producer = producer::new_producer(kafka, &config)?;
        // Exported at 0 from the start, so an alert on its increase has a series to watch.
        metrics::counter!("sluice_ingest_producer_replacements_total").increment(0);
        let keys = auth::Keys::new(&config.api_keys);
        let limits = limits::RateLimit::new(&config);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(config_permits(&config)));
        let body_budget = Arc::new(tokio::sync::Semaphore::new(kib(config.max_in_flight_bytes)));
        let draining = Arc::new(tokio::sync::Semaphore::new(
            config.max_draining.min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        Ok(Arc::new(Self {
            producer: RwLock::new(producer),
            kafka: kafka.clone(),
            topic: topic.into(),
            config,
            max_event_bytes,
            keys,
            limits,
            in_flight,
            body_budget,
            readiness: readiness::Readiness::new(Duration::from_secs(1)),
            draining,
        }))
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/events", post(http::post_events))
            .route(
                "/healthz",
                get(|| async { Json(serde_json::json!({"status": "ok"})) }),
            )
            .route("/readyz", get(http::readyz))
            // Limit enforced by us, with a JSON answer; axum's own limit is lifted to it.
            .layer(DefaultBodyLimit::max(
                self.config.max_body_bytes.saturating_add(1),
            ))
            .with_state(self.clone())
    }

    /// Serve on `listener` until `shutdown` resolves, then let requests in progress
    /// finish (10 s at most) and flush the producer. A connection that does not send a
    /// whole request head within `header_read_timeout_ms` is closed.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), IngestError> {
        use hyper_util::rt::{TokioIo, TokioTimer};
        let service = hyper_util::service::TowerToHyperService::new(self.router());
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(
                self.config.header_read_timeout_ms.max(1),
            ));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let connections = Arc::new(tokio::sync::Semaphore::new(
            self.config
                .max_connections
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let refused = metrics::counter!("sluice_ingest_connections_refused_total");
        refused.increment(0);
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(s) => s,
                    // Out of file descriptors and the like: pause, keep serving the rest.
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // At the cap the newest connection is closed (dropped) at once: file
            // descriptors and memory stay bounded whatever clients hold open.
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                refused.increment(1);
                continue;
            };
            let conn = http.serve_connection(TokioIo::new(stream), service.clone());
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                // Timeouts and resets end here; they concern that client only.
                let _ = conn.await;
                drop(permit);
            });
        }
        drop(listener);
        let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
        // Requests that got a 202 were already acked; this only drains stragglers.
        let producer = self.producer();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
            .await
            .ok();
        Ok(())
    }

    /// Bind the configured address.
    pub async fn bind(&self) -> Result<(TcpListener, SocketAddr), IngestError> {
        let listener = TcpListener::bind(self.config.listen).await?;
        let addr = listener.local_addr()?;
        Ok((listener, addr))
    }
}
