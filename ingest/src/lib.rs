//! The HTTP ingest endpoint. It authenticates a request, bounds it, stamps each line
//! with headers and writes the raw bytes to the raw topic. It does not parse events:
//! that is the parse stage's job, so a malformed line is kept raw and dead-lettered there.
//!
//! `POST /v1/events` answers `202` only once the broker acknowledged every record of
//! the request (idempotent producer, `acks=all`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use std::num::NonZeroU32;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::join_all;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Serialize;
use serde_json::value::RawValue;
use sluice_core::config::{IngestConfig, KafkaConfig};
use sluice_core::headers;
use tokio::net::TcpListener;

/// Why the ingest server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The Kafka producer could not be created.
    #[error("kafka producer: {0}")]
    Producer(#[from] KafkaError),
    /// The listen address could not be bound or serving failed.
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
}

/// A request rejected before or while writing it, with its HTTP status and JSON reason.
#[derive(Debug)]
pub struct Rejection {
    status: StatusCode,
    error: &'static str,
    reason: String,
    retry_after_s: Option<u64>,
}

impl Rejection {
    fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            error,
            reason: reason.into(),
            retry_after_s: None,
        }
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    reason: &'a str,
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        metrics::counter!("sluice_ingest_requests_total", "status" => self.status.as_u16().to_string())
            .increment(1);
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.error,
                reason: &self.reason,
            }),
        )
            .into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// The headers ingest stamps on each raw record.
#[derive(Debug, Clone, Copy)]
pub struct RawHeaders<'a> {
    /// Tenant of the API key.
    pub tenant: &'a str,
    /// The client's `X-Source`, or `http`.
    pub source: &'a str,
    /// Content type of the request.
    pub content_type: &'a str,
    /// Receipt time, Unix milliseconds, as text.
    pub received_at_ms: &'a str,
    /// Id of the request.
    pub ingest_id: &'a str,
    /// Id of the event.
    pub event_id: &'a str,
}

impl RawHeaders<'_> {
    /// As Kafka record headers.
    pub fn to_headers(&self) -> OwnedHeaders {
        [
            (headers::TENANT, self.tenant),
            (headers::SOURCE, self.source),
            (headers::CONTENT_TYPE, self.content_type),
            (headers::RECEIVED_AT_MS, self.received_at_ms),
            (headers::INGEST_ID, self.ingest_id),
            (headers::EVENT_ID, self.event_id),
        ]
        .into_iter()
        .fold(OwnedHeaders::new_with_capacity(6), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
    }
}

/// The answer to an accepted request.
#[derive(Debug, Serialize)]
pub struct Accepted {
    /// Records written.
    pub accepted: usize,
    /// Id of this request, also in every record's headers.
    pub ingest_id: String,
}

/// Shared state of the ingest server.
pub struct Ingest {
    /// Replaced when it fails for good (see [`Ingest::replace_if_failed`]).
    producer: RwLock<FutureProducer>,
    kafka: KafkaConfig,
    topic: String,
    config: IngestConfig,
    /// Bearer token → tenant.
    keys: HashMap<String, String>,
    /// Per-tenant token buckets, counted in events.
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    metrics: Option<PrometheusHandle>,
}

impl Ingest {
    /// Create the producer and the request handler state.
    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        config: IngestConfig,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Arc<Self>, IngestError> {
        let producer = new_producer(kafka, &config)?;
        // Exported at 0 from the start, so an alert on its increase has a series to watch.
        metrics::counter!("sluice_ingest_producer_replacements_total").increment(0);
        let keys = config
            .api_keys
            .iter()
            .map(|k| (k.key.clone(), k.tenant.clone()))
            .collect();
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
        Ok(Arc::new(Self {
            producer: RwLock::new(producer),
            kafka: kafka.clone(),
            topic: topic.into(),
            config,
            keys,
            limiter,
            metrics,
        }))
    }

    /// The producer in use now; a new one replaces it after a fatal error.
    pub fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replace `failed` if it has a fatal error and is still the one in use. An
    /// idempotent producer fails for good when the broker lost its sequence state (a
    /// restarted broker can): without a new one, every request would get a 503 until
    /// the process restarts. Requests it failed got a 503 and are retried by clients.
    fn replace_if_failed(&self, failed: &FutureProducer) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut current = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.client().native_ptr() != failed.client().native_ptr() {
            return; // another request replaced it already
        }
        match new_producer(&self.kafka, &self.config) {
            Ok(fresh) => {
                tracing::warn!(?code, reason, "the producer failed for good; replaced it");
                metrics::counter!("sluice_ingest_producer_replacements_total").increment(1);
                let old = std::mem::replace(&mut *current, fresh);
                // Destroying a client blocks; other requests may still hold clones.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => tracing::warn!(error = %e, "cannot create a producer; will retry"),
        }
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/events", post(post_events))
            .route(
                "/healthz",
                get(|| async { Json(serde_json::json!({"status": "ok"})) }),
            )
            .route("/readyz", get(readyz))
            .route("/metrics", get(render_metrics))
            // Limit enforced by us, with a JSON answer; axum's own limit is lifted to it.
            .layer(DefaultBodyLimit::max(
                self.config.max_body_bytes.saturating_add(1),
            ))
            .with_state(self.clone())
    }

    /// Serve on `listener` until `shutdown` resolves, then flush the producer.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), IngestError> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await?;
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

    fn tenant_of(&self, headers: &HeaderMap) -> Result<&str, Rejection> {
        let unauthorized = |r: &str| Rejection::new(StatusCode::UNAUTHORIZED, "unauthorized", r);
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <api key>"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("Authorization must be `Bearer <api key>`"))?;
        self.keys
            .get(token.trim())
            .map(String::as_str)
            .ok_or_else(|| unauthorized("unknown API key"))
    }

    /// Take `events` tokens from the tenant's bucket, or say when to retry.
    fn admit(&self, tenant: &str, events: usize) -> Result<(), Rejection> {
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
                    format!(
                        "tenant {tenant} is over its rate of {} events/s",
                        limiter_rate(&self.config)
                    ),
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

    /// Key of a record: tenant plus the first configured key field present in the line.
    fn record_key(&self, tenant: &str, line: &str, event_id: &str) -> String {
        // Zero-copy scan of the top-level fields; a line that does not scan (malformed,
        // or with escaped field names) is keyed by its event id.
        let fields: Option<HashMap<&str, &RawValue>> = serde_json::from_str(line).ok();
        let value = fields.as_ref().and_then(|f| {
            self.config.partition_key_fields.iter().find_map(|k| {
                let raw = f.get(k.as_str())?.get();
                let v = raw.trim_matches('"');
                (!v.is_empty() && v != "null").then_some(v)
            })
        });
        format!("{tenant}:{}", value.unwrap_or(event_id))
    }

    async fn write(
        &self,
        tenant: &str,
        source: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Accepted, Rejection> {
        let text = std::str::from_utf8(body).map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("body is not UTF-8 (first bad byte at {})", e.valid_up_to()),
            )
        })?;
        let lines: Vec<&str> = text.split('\n').filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "empty_body",
                "no events in the body",
            ));
        }
        if lines.len() > self.config.max_lines {
            return Err(Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_lines",
                format!(
                    "{} lines; at most {} per request",
                    lines.len(),
                    self.config.max_lines
                ),
            ));
        }
        self.admit(tenant, lines.len())?;
        let producer = self.producer();
        let result = self
            .send_lines(&producer, tenant, source, content_type, &lines)
            .await;
        if result.is_err() {
            self.replace_if_failed(&producer);
        }
        result
    }

    /// Write one request's lines and wait for the broker to acknowledge all of them.
    async fn send_lines(
        &self,
        producer: &FutureProducer,
        tenant: &str,
        source: &str,
        content_type: &str,
        lines: &[&str],
    ) -> Result<Accepted, Rejection> {
        let ingest_id = uuid::Uuid::now_v7().to_string();
        let received_at = sluice_core::now_ms().to_string();
        let mut deliveries = Vec::with_capacity(lines.len());
        for line in lines {
            let event_id = uuid::Uuid::now_v7().to_string();
            let key = self.record_key(tenant, line, &event_id);
            let hdrs = RawHeaders {
                tenant,
                source,
                content_type,
                received_at_ms: &received_at,
                ingest_id: &ingest_id,
                event_id: &event_id,
            }
            .to_headers();
            let record = FutureRecord::to(&self.topic)
                .key(&key)
                .payload(line.as_bytes())
                .headers(hdrs);
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Err(Rejection::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "producer queue is full; retry later (records of this request may be partly written)",
                    )
                    .retry_after(1));
                }
                Err((e, _)) => {
                    return Err(Rejection::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "kafka_error",
                        e.to_string(),
                    )
                    .retry_after(1));
                }
            }
        }
        let timeout = Duration::from_millis(self.config.ack_timeout_ms);
        let results = tokio::time::timeout(timeout + Duration::from_secs(1), join_all(deliveries))
            .await
            .map_err(|_| broker_unavailable("broker did not acknowledge in time"))?;
        for r in results {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(broker_unavailable(&e.to_string())),
                Err(_) => return Err(broker_unavailable("delivery cancelled")),
            }
        }
        metrics::counter!("sluice_ingest_events_total", "tenant" => tenant.to_string())
            .increment(lines.len() as u64);
        Ok(Accepted {
            accepted: lines.len(),
            ingest_id,
        })
    }
}

/// An idempotent producer whose deliveries fail once the broker cannot ack them in time,
/// so the client gets a 503 rather than waiting.
fn new_producer(kafka: &KafkaConfig, config: &IngestConfig) -> Result<FutureProducer, KafkaError> {
    let mut pc = kafka.producer_config();
    pc.set("message.timeout.ms", config.ack_timeout_ms.to_string());
    pc.create()
}

fn limiter_rate(config: &IngestConfig) -> u32 {
    config.rate_limit_per_sec.unwrap_or(0)
}

fn broker_unavailable(why: &str) -> Rejection {
    Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        format!("events not stored: {why}; retry later"),
    )
    .retry_after(5)
}

/// Content types accepted by `POST /v1/events`.
const ACCEPTED_TYPES: &[&str] = &[
    "application/json",
    "application/x-ndjson",
    "application/jsonl",
];

async fn post_events(
    State(ingest): State<Arc<Ingest>>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Accepted>), Rejection> {
    let tenant = ingest.tenant_of(&headers)?.to_string();
    if let Some(claimed) = headers.get("x-tenant").and_then(|v| v.to_str().ok()) {
        if claimed != tenant {
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "wrong_tenant",
                format!("this API key writes as tenant {tenant}, not {claimed}"),
            ));
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if !ACCEPTED_TYPES.contains(&content_type.as_str()) {
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
            format!(
                "content type `{content_type}`; send one of {}",
                ACCEPTED_TYPES.join(", ")
            ),
        ));
    }
    let limit = ingest.config.max_body_bytes;
    let too_large = || {
        Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("body over {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large()
        } else {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                format!("cannot read the body: {e}"),
            )
        }
    })?;
    let source = headers
        .get("x-source")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http")
        .to_string();
    let accepted = ingest.write(&tenant, &source, &content_type, &body).await?;
    metrics::counter!("sluice_ingest_requests_total", "status" => "202").increment(1);
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

async fn readyz(State(ingest): State<Arc<Ingest>>) -> Response {
    let producer = ingest.producer();
    let topic = ingest.topic.clone();
    let check = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(2))
            .map(|_| ())
    })
    .await;
    match check {
        Ok(Ok(())) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Ok(Err(e)) => Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", e.to_string())
            .into_response(),
        Err(e) => Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", e.to_string())
            .into_response(),
    }
}

async fn render_metrics(State(ingest): State<Arc<Ingest>>) -> Response {
    match &ingest.metrics {
        Some(h) => h.render().into_response(),
        None => {
            Rejection::new(StatusCode::NOT_FOUND, "no_metrics", "metrics are off").into_response()
        }
    }
}
