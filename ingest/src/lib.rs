//! The HTTP ingest endpoint. It authenticates a request, bounds it, stamps each line
//! with headers and writes the raw bytes to the raw topic. It does not parse events:
//! that is the parse stage's job, so a malformed line is kept raw and dead-lettered there.
//!
//! `POST /v1/events` answers `202` only once the broker acknowledged every record of
//! the request (idempotent producer, `acks=all`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
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
    producer: FutureProducer,
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
        let mut pc = kafka.producer_config();
        // Fail deliveries that the broker cannot ack in time, so the client gets a 503.
        pc.set("message.timeout.ms", config.ack_timeout_ms.to_string());
        let producer: FutureProducer = pc.create()?;
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
            producer,
            topic: topic.into(),
            config,
            keys,
            limiter,
            metrics,
        }))
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
        let producer = self.producer.clone();
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
        let ingest_id = uuid::Uuid::now_v7().to_string();
        let received_at = sluice_core::now_ms().to_string();
        let mut deliveries = Vec::with_capacity(lines.len());
        for line in &lines {
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
            match self.producer.send_result(record) {
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
    let producer = ingest.producer.clone();
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
