//! The HTTP side of ingest: the routes, the request handler, and every rejection as a
//! status with a JSON reason.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rdkafka::producer::Producer;
use serde::Serialize;

use crate::Ingest;

/// A request rejected before or while writing it, with its HTTP status and JSON reason.
#[derive(Debug)]
pub struct Rejection {
    status: StatusCode,
    error: &'static str,
    reason: String,
    retry_after_s: Option<u64>,
    /// Close the connection after the answer (its body is not read).
    close: bool,
}

impl Rejection {
    pub(crate) fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            error,
            reason: reason.into(),
            retry_after_s: None,
            close: false,
        }
    }

    /// Answer, then close the connection rather than read the rest of the body.
    pub(crate) fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    pub(crate) fn retry_after(mut self, seconds: u64) -> Self {
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
        if self.close {
            // hyper closes the connection after an answer that says so.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
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

pub(crate) fn broker_unavailable(why: &str) -> Rejection {
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

pub(crate) async fn post_events(
    State(ingest): State<Arc<Ingest>>,
    headers: HeaderMap,
    mut body: Body,
) -> Result<(StatusCode, Json<Accepted>), Rejection> {
    match accept(&ingest, &headers, &mut body).await {
        Ok(accepted) => Ok(accepted),
        // A body that timed out is not arriving: nothing to wait for.
        Err(r) if r.status == StatusCode::REQUEST_TIMEOUT => Err(r),
        // Who did not authenticate gets no bandwidth: the answer, then the socket closes.
        Err(r) if matches!(r.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            Err(r.closing())
        }
        Err(r) => match ingest.draining.clone().try_acquire_owned() {
            Ok(_permit) => {
                drain(&mut body, &ingest.config).await;
                Err(r)
            }
            Err(_) => Err(r.closing()),
        },
    }
}

/// Read and drop what is left of a refused request's body, at most
/// `max_refused_body_bytes` within `body_read_timeout_ms`. A socket closed with unread
/// data is reset, and a client still sending its body then gets a broken pipe instead
/// of the answer; with the body read, it gets the status and the JSON reason. Nothing is
/// kept, so this costs bandwidth, not memory. Past the bound the connection is closed.
async fn drain(body: &mut Body, config: &crate::config::IngestConfig) {
    use http_body_util::BodyExt;
    let mut left = config.max_refused_body_bytes;
    let _ = tokio::time::timeout(config.body_read_timeout(), async {
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if data.len() > left {
                return;
            }
            left -= data.len();
        }
    })
    .await;
}

/// The answer to `POST /v1/events`; `body` is read only once the request passed every
/// check that needs no body.
async fn accept(
    ingest: &Ingest,
    headers: &HeaderMap,
    body: &mut Body,
) -> Result<(StatusCode, Json<Accepted>), Rejection> {
    // Bounded work at once: a request beyond it is refused before its body is read.
    let _permit = ingest.in_flight.clone().try_acquire_owned().map_err(|_| {
        Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{} requests in progress (ingest.max_concurrent_requests); retry later",
                ingest.config.max_concurrent_requests
            ),
        )
        .retry_after(1)
    })?;
    let tenant = ingest.keys.tenant_of(headers)?.to_string();
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
    // Memory bounded by bytes: the body's size is reserved before it is read.
    let need = declared.map_or(limit, |n| n as usize).min(limit);
    let _budget = ingest
        .body_budget
        .clone()
        .try_acquire_many_owned(u32::try_from(crate::kib(need)).unwrap_or(u32::MAX))
        .map_err(|_| {
            Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "{} bytes of requests in progress (ingest.max_in_flight_bytes); retry later",
                    ingest.config.max_in_flight_bytes
                ),
            )
            .retry_after(1)
        })?;
    let max = ingest.config.max_header_value_bytes;
    let source = bounded_header(headers, "x-source", max)?
        .unwrap_or("http")
        .to_string();
    let idempotency_key = bounded_header(headers, "idempotency-key", max)?.map(str::to_string);
    // A tenant over its rate is refused before its body is read (one event's worth is
    // taken now, the rest once the lines are counted).
    ingest.limits.admit(&tenant, 1)?;
    let timeout = ingest.config.body_read_timeout();
    // Read through a reference: a body refused half-way is drained before the answer.
    let read = tokio::time::timeout(
        timeout,
        http_body_util::BodyExt::collect(http_body_util::Limited::new(&mut *body, limit)),
    )
    .await
    .map_err(|_| {
        Rejection::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the body did not arrive within {} ms (ingest.body_read_timeout_ms)",
                timeout.as_millis()
            ),
        )
    })?;
    let body = read.map(http_body_util::Collected::to_bytes).map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                format!("cannot read the body: {e}"),
            )
        }
    })?;
    let accepted = ingest
        .write(
            &tenant,
            &source,
            idempotency_key.as_deref(),
            &content_type,
            &body,
        )
        .await?;
    metrics::counter!("sluice_ingest_requests_total", "status" => "202").increment(1);
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// Ready when the brokers answer a metadata request for the raw topic. The answer is
/// shared and kept for a second; the public body is generic (the broker's error, which
/// names hosts, goes to the log).
pub(crate) async fn readyz(State(ingest): State<Arc<Ingest>>) -> Response {
    let ready = ingest
        .readiness
        .ready(|| async {
            let producer = ingest.producer();
            let topic = ingest.topic.clone();
            let check = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(error) = &check {
                tracing::warn!(%error, topic = %ingest.topic, "not ready: the brokers did not answer a metadata request");
            }
            check.is_ok()
        })
        .await;
    if ready {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the event store is not reachable".to_string(),
        )
        .into_response()
    }
}

/// A client-controlled header value copied onto records: at most `max` bytes of visible
/// ASCII, or a 400 naming the header.
fn bounded_header<'a>(
    headers: &'a HeaderMap,
    name: &str,
    max: usize,
) -> Result<Option<&'a str>, Rejection> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let bad = |why: String| Rejection::new(StatusCode::BAD_REQUEST, "invalid_header", why);
    if value.len() > max {
        return Err(bad(format!(
            "header {name}: at most {max} bytes (ingest.max_header_value_bytes), got {}",
            value.len()
        )));
    }
    let text = value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .ok_or_else(|| bad(format!("header {name}: visible ASCII only")))?;
    Ok(Some(text))
}
