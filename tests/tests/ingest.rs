//! HTTP ingest against a real broker: every status code, the records' exact bytes and
//! headers, and a broker that goes down and comes back.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use reqwest::StatusCode;
use serde_json::Value;
use sluice::Config;
use sluice_core::{headers, kafka, telemetry};
use sluice_ingest::config::ApiKey;
use sluice_ingest::Ingest;
use sluice_tests::{inject_fatal_error, stack_config, unique, PrivateBroker};
use tokio_util::sync::CancellationToken;

const KEY_A: &str = "key-tenant-a";
const KEY_B: &str = "key-tenant-b";

fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            telemetry::install_metrics("ingest", std::time::Duration::from_secs(30)).unwrap()
        })
        .clone()
}

/// An ingest server on a free port writing to a topic of its own.
struct Server {
    ingest: Arc<Ingest>,
    addr: SocketAddr,
    topic: String,
    config: Config,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(config: Config) -> Self {
        Self::start_on(config, unique("t-ingest-")).await
    }

    /// A server writing to `topic` (which a server before it may have written to).
    async fn start_on(mut config: Config, topic: String) -> Self {
        config.topics.raw = topic.clone();
        config.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.ingest.api_keys = vec![
            ApiKey {
                tenant: "tenant-a".into(),
                key: KEY_A.into(),
            },
            ApiKey {
                tenant: "tenant-b".into(),
                key: KEY_B.into(),
            },
        ];
        kafka::create_topics(&config.kafka, 3, 1, &[(topic.clone(), "3600000".into())])
            .await
            .unwrap();
        // The recorder first, so that the first request's counters land in it.
        let _ = metrics_handle();
        let ingest = Ingest::new(
            &config.kafka,
            &topic,
            config.topics.max_event_bytes,
            config.ingest.clone(),
        )
        .unwrap();
        let (listener, addr) = ingest.bind().await.unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let serving = Arc::clone(&ingest);
        let task = tokio::spawn(async move {
            serving
                .serve(listener, async move { s.cancelled().await })
                .await
                .unwrap();
        });
        Self {
            ingest,
            addr,
            topic,
            config,
            stop,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn post(
        &self,
        key: Option<&str>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = reqwest::Client::new()
            .post(self.url("/v1/events"))
            .header("content-type", content_type)
            .body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    async fn records(&self) -> Vec<rdkafka::message::OwnedMessage> {
        let (k, t) = (self.config.kafka.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap()
    }

    /// The process's metrics (what the ops port serves; the public port has none).
    async fn metrics(&self) -> String {
        let public = reqwest::get(self.url("/metrics")).await.unwrap();
        assert_eq!(public.status(), 404, "/metrics is not on the public port");
        metrics_handle().render()
    }

    /// The records' payloads, as text.
    async fn payloads(&self) -> Vec<String> {
        self.records()
            .await
            .iter()
            .map(|r| String::from_utf8(r.payload().unwrap().to_vec()).unwrap())
            .collect()
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, error: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"], error, "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "JSON reason: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_records_keep_their_bytes_and_get_headers() {
    let server = Server::start(stack_config()).await;
    // Odd but valid bytes: unicode, escapes, a trailing \r, and a malformed line, which
    // ingest must keep (parsing is the parse stage's job).
    let lines = [
        r#"{"user_id":"u1","type":"page_view","ts":1,"note":"héllo ✓"}"#,
        "{\"user_id\":42,\"type\":\"click\",\"ts\":2,\"esc\":\"a\\\"b\"}\r",
        r#"{"session_id":"s9","type":"click","ts":3}"#,
        r#"{"user_id":"u1","type":"#,
    ];
    let body = lines.join("\n") + "\n\n";
    let (status, _, resp) = server
        .post(Some(KEY_A), "application/x-ndjson", body.clone())
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    assert_eq!(resp["accepted"], 4);
    let ingest_id = resp["ingest_id"].as_str().unwrap().to_string();

    let records = server.records().await;
    assert_eq!(records.len(), 4);
    let mut event_ids = HashSet::new();
    for r in &records {
        let payload = r.payload().unwrap();
        assert!(
            lines.iter().any(|l| l.as_bytes() == payload),
            "bytes changed: {:?}",
            String::from_utf8_lossy(payload)
        );
        let h = r.headers();
        assert_eq!(headers::get(h, headers::TENANT), Some("tenant-a"));
        assert_eq!(headers::get(h, headers::SOURCE), Some("http"));
        assert_eq!(
            headers::get(h, headers::CONTENT_TYPE),
            Some("application/x-ndjson")
        );
        assert_eq!(
            headers::get(h, headers::INGEST_ID),
            Some(ingest_id.as_str())
        );
        let received: i64 = headers::get(h, headers::RECEIVED_AT_MS)
            .unwrap()
            .parse()
            .unwrap();
        assert!((sluice_core::now_ms() - received).abs() < 60_000);
        event_ids.insert(headers::get(h, headers::EVENT_ID).unwrap().to_string());
        let key = std::str::from_utf8(r.key().unwrap()).unwrap();
        match std::str::from_utf8(payload).unwrap() {
            l if l.contains("\"u1\",\"type\":\"page_view\"") => assert_eq!(key, "tenant-a:u1"),
            l if l.contains("42") => assert_eq!(key, "tenant-a:42"),
            l if l.contains("s9") => assert_eq!(key, "tenant-a:s9", "falls back to session_id"),
            _ => assert!(
                key.starts_with("tenant-a:"),
                "malformed line keyed by its event id: {key}"
            ),
        }
    }
    assert_eq!(event_ids.len(), 4, "event ids are unique");

    // One JSON event with application/json; a source header.
    let resp = reqwest::Client::new()
        .post(server.url("/v1/events"))
        .bearer_auth(KEY_B)
        .header("content-type", "application/json; charset=utf-8")
        .header("x-source", "mobile-sdk")
        .body(r#"{"user_id":"b1","type":"click","ts":5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let records = server.records().await;
    let b = records
        .iter()
        .find(|r| headers::get(r.headers(), headers::TENANT) == Some("tenant-b"))
        .unwrap();
    assert_eq!(
        headers::get(b.headers(), headers::SOURCE),
        Some("mobile-sdk")
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_a_clear_json_error() {
    let mut config = stack_config();
    config.ingest.max_body_bytes = 2_000;
    config.ingest.max_lines = 5;
    let server = Server::start(config).await;
    let ok_line = r#"{"user_id":"u","type":"click","ts":1}"#;

    let (s, _, b) = server.post(None, "application/json", ok_line).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
    let (s, _, b) = server.post(Some("nope"), "application/json", ok_line).await;
    assert_error(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");

    let resp = reqwest::Client::new()
        .post(server.url("/v1/events"))
        .bearer_auth(KEY_A)
        .header("x-tenant", "tenant-b")
        .header("content-type", "application/json")
        .body(ok_line)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_error(
        status,
        &resp.json().await.unwrap(),
        StatusCode::FORBIDDEN,
        "wrong_tenant",
    );

    let (s, _, b) = server.post(Some(KEY_A), "text/csv", "a,b\n").await;
    assert_error(
        s,
        &b,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_content_type",
    );

    let (s, _, b) = server
        .post(Some(KEY_A), "application/json", "x".repeat(2_001))
        .await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    // Chunked, with no Content-Length: the limit holds while reading.
    let chunks: Vec<Result<String, std::io::Error>> =
        (0..30).map(|_| Ok("y".repeat(100))).collect();
    let stream = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let (s, _, b) = server.post(Some(KEY_A), "application/json", stream).await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");

    let six = [ok_line; 6].join("\n");
    let (s, _, b) = server.post(Some(KEY_A), "application/x-ndjson", six).await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "too_many_lines");

    let (s, _, b) = server
        .post(Some(KEY_A), "application/json", vec![0xff, 0xfe, b'{'])
        .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_body");
    let (s, _, b) = server.post(Some(KEY_A), "application/json", "\n  \n").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "empty_body");

    assert!(
        server.records().await.is_empty(),
        "nothing rejected reaches the topic"
    );

    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = reqwest::get(server.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("sluice_ingest_requests_total"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_rate_limit_answers_429_with_retry_after() {
    let mut config = stack_config();
    config.ingest.rate_limit_per_sec = Some(2);
    config.ingest.rate_limit_burst = Some(10);
    let server = Server::start(config).await;
    let line = r#"{"user_id":"u","type":"click","ts":1}"#;
    let ten = [line; 10].join("\n");
    let (s, _, b) = server
        .post(Some(KEY_A), "application/x-ndjson", ten.clone())
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let (s, h, b) = server
        .post(Some(KEY_A), "application/x-ndjson", ten.clone())
        .await;
    assert_error(s, &b, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = h
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=6).contains(&retry), "retry-after {retry}");
    // Another tenant has its own bucket.
    let (s, _, b) = server.post(Some(KEY_B), "application/x-ndjson", ten).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    // A batch larger than the burst can never pass (once the bucket has a token again:
    // a tenant over its rate is refused before its body is read).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let eleven = [line; 11].join("\n");
    let (s, _, b) = server
        .post(Some(KEY_B), "application/x-ndjson", eleven)
        .await;
    assert_error(s, &b, StatusCode::TOO_MANY_REQUESTS, "batch_over_burst");
    assert_eq!(server.records().await.len(), 20);
    server.shutdown().await;
}

/// The `sluice.event_id` of each record.
fn event_ids(records: &[rdkafka::message::OwnedMessage]) -> Vec<String> {
    records
        .iter()
        .map(|m| {
            headers::get(m.headers(), headers::EVENT_ID)
                .unwrap()
                .to_string()
        })
        .collect()
}

/// The stack's settings with a producer queue of five records, to make it full.
fn small_producer_queue() -> Config {
    let mut config = stack_config();
    config
        .kafka
        .producer
        .insert("queue.buffering.max.messages".into(), "5".into());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_producer_queue_answers_503() {
    let mut config = small_producer_queue();
    config
        .kafka
        .producer
        .insert("linger.ms".into(), "1000".into());
    let server = Server::start(config).await;
    let line = r#"{"user_id":"u","type":"click","ts":1}"#;
    let (s, h, b) = server
        .post(Some(KEY_A), "application/x-ndjson", [line; 50].join("\n"))
        .await;
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    assert!(h.contains_key("retry-after"));
    server.shutdown().await;
}

/// The broker stops: requests get 503 (never 202) and readiness fails; it comes back:
/// requests get 202 again, and every event that got a 202 is on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_answers_503_then_recovers() {
    let mut broker = PrivateBroker::start();
    let mut config = stack_config();
    config.kafka.brokers = broker.brokers();
    config.ingest.ack_timeout_ms = 2_000;
    config
        .kafka
        .properties
        .insert("reconnect.backoff.max.ms".into(), "500".into());
    let server = Server::start(config).await;
    let line = |i: usize| format!(r#"{{"user_id":"u{i}","type":"click","ts":{i}}}"#);

    let mut acked = Vec::new();
    let (s, _, b) = server.post(Some(KEY_A), "application/json", line(0)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    acked.push(line(0));

    broker.stop();
    let (s, h, b) = server.post(Some(KEY_A), "application/json", line(1)).await;
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable");
    assert!(h.contains_key("retry-after"));
    let ready = reqwest::get(server.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The public answer names no host, port or client error: those go to the log.
    let body = ready.text().await.unwrap();
    assert!(body.contains("the event store is not reachable"), "{body}");
    for leak in ["127.0.0.1", &broker.brokers(), "Broker", "Transport"] {
        assert!(!body.contains(leak), "{leak} in {body}");
    }

    broker.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut i = 2;
    loop {
        let (s, _, b) = server.post(Some(KEY_A), "application/json", line(i)).await;
        if s == StatusCode::ACCEPTED {
            acked.push(line(i));
            break;
        }
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
        assert!(tokio::time::Instant::now() < deadline, "no recovery: {b}");
        i += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let on_topic = server.payloads().await;
    for a in &acked {
        assert!(
            on_topic.contains(a),
            "acked event {a} lost; topic has {on_topic:?}"
        );
    }
    server.shutdown().await;
}

/// The producer fails for good, as an idempotent one does when a restarted broker lost
/// its sequence state: the request it failed gets a 503, the next one is written by a
/// new producer, and nothing is written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_that_failed_for_good_is_replaced() {
    let server = Server::start(stack_config()).await;
    let line = |i: usize| format!(r#"{{"user_id":"u{i}","type":"click","ts":{i}}}"#);
    let (s, _, b) = server.post(Some(KEY_A), "application/json", line(0)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");

    let failed = server.ingest.producer();
    inject_fatal_error(failed.client());
    let (s, h, b) = server.post(Some(KEY_A), "application/json", line(1)).await;
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "kafka_error");
    assert!(h.contains_key("retry-after"));

    let (s, _, b) = server.post(Some(KEY_A), "application/json", line(2)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let fresh = server.ingest.producer();
    assert_ne!(fresh.client().native_ptr(), failed.client().native_ptr());
    assert!(fresh.client().fatal_error().is_none());
    let metrics = server.metrics().await;
    let replacements: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_ingest_producer_replacements_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no replacement counter: {metrics}"));
    assert_eq!(replacements, 1.0);

    let mut on_topic = server.payloads().await;
    on_topic.sort();
    assert_eq!(on_topic, vec![line(0), line(2)]);
    server.shutdown().await;
}

/// Send raw bytes on a fresh connection; return what the server answers until it closes
/// the connection or `wait` passes.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(wait, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_time_out_while_others_are_served() {
    let mut config = stack_config();
    config.ingest.header_read_timeout_ms = 500;
    config.ingest.body_read_timeout_ms = 500;
    let server = Server::start(config).await;
    let addr = server.addr;
    // Slowloris: a request head that never ends. The server closes the connection...
    let slow = tokio::spawn(async move {
        raw_exchange(
            addr,
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n",
            Duration::from_secs(5),
        )
        .await
    });
    // ...and meanwhile answers others.
    let line = r#"{"user_id":"u","type":"click","ts":1}"#;
    let (s, _, b) = server.post(Some(KEY_A), "application/x-ndjson", line).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let (_, closed) = slow.await.unwrap();
    assert!(closed, "a connection stuck in its headers is closed");
    // A body that stops half-way: 408 with a JSON reason.
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/x-ndjson\r\nContent-Length: 100\r\n\r\n{{\"user_id\""
    );
    let (answer, _) = raw_exchange(addr, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("body_timeout"),
        "{answer}"
    );
    assert_eq!(server.records().await.len(), 1, "only the whole request");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_concurrency_limit_get_503_at_once() {
    let mut config = stack_config();
    config.ingest.max_concurrent_requests = 1;
    config.ingest.body_read_timeout_ms = 3_000;
    let server = Server::start(config).await;
    let addr = server.addr;
    // One request holds the only slot while its body trickles in.
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/x-ndjson\r\nContent-Length: 100\r\n\r\n{{"
    );
    let holder =
        tokio::spawn(
            async move { raw_exchange(addr, head.as_bytes(), Duration::from_secs(6)).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let line = r#"{"user_id":"u","type":"click","ts":1}"#;
    let (s, h, b) = server.post(Some(KEY_A), "application/x-ndjson", line).await;
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    assert!(h.get("retry-after").is_some());
    let (answer, _) = holder.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The slot is free again.
    let (s, _, b) = server.post(Some(KEY_A), "application/x-ndjson", line).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_header_values_are_bounded_and_idempotency_keys_repeat_ids() {
    let server = Server::start(stack_config()).await;
    let lines = [r#"{"user_id":"u","type":"click","ts":1}"#; 3].join("\n");
    // A 64 KB X-Source would be copied onto every record: refused, the reason says why.
    let resp = reqwest::Client::new()
        .post(server.url("/v1/events"))
        .bearer_auth(KEY_A)
        .header("content-type", "application/x-ndjson")
        .header("x-source", "s".repeat(64 * 1024))
        .body(lines.clone())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_header");
    assert!(
        body["reason"].as_str().unwrap().contains("x-source"),
        "{body}"
    );
    // The same request twice with an Idempotency-Key (a retry after a 503): same ids.
    for _ in 0..2 {
        let resp = reqwest::Client::new()
            .post(server.url("/v1/events"))
            .bearer_auth(KEY_A)
            .header("content-type", "application/x-ndjson")
            .header("idempotency-key", "batch-7")
            .body(lines.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }
    let records = server.records().await;
    assert_eq!(records.len(), 6, "both requests were written");
    let ids = event_ids(&records);
    let distinct: HashSet<&String> = ids.iter().collect();
    let want: HashSet<String> = (0..3).map(|i| format!("idem-batch-7-{i}")).collect();
    assert_eq!(
        distinct.into_iter().cloned().collect::<HashSet<_>>(),
        want,
        "the retry stamped the same three ids"
    );
    server.shutdown().await;
}

#[test]
fn an_empty_api_key_is_refused_at_start() {
    let mut config = stack_config();
    config.ingest.api_keys = vec![ApiKey {
        tenant: "ghost".into(),
        key: "".into(),
    }];
    let e = Ingest::new(&config.kafka, "unused", 1024, config.ingest.clone())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("ghost") && e.contains("empty"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_over_the_event_size_is_refused_naming_it() {
    let mut config = stack_config();
    config.topics.max_event_bytes = 1_000;
    let server = Server::start(config).await;
    let small = r#"{"user_id":"u","type":"click","ts":1}"#.to_string();
    let big = format!(
        r#"{{"user_id":"u","type":"click","ts":1,"pad":"{}"}}"#,
        "x".repeat(2_000)
    );
    let body = [small.clone(), small, big].join("\n");
    let (s, _, b) = server.post(Some(KEY_A), "application/x-ndjson", body).await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "event_too_large");
    assert!(b["reason"].as_str().unwrap().starts_with("line 3:"), "{b}");
    assert!(
        server.records().await.is_empty(),
        "nothing of the request is written"
    );
    server.shutdown().await;
}

/// A key field as long as the line allows is keyed by its digest: the record (line plus
/// key) still fits what the broker takes, so the client gets a 202, not an endless 503;
/// and the same value keeps the same key (its partition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_key_field_is_keyed_by_its_digest() {
    let mut config = stack_config();
    let largest = config.kafka.max_message_bytes() - sluice_core::config::RECORD_ROOM_BYTES;
    config.topics.max_event_bytes = largest;
    let server = Server::start(config).await;
    let user = "u".repeat(largest - 100);
    let line = format!(r#"{{"user_id":"{user}","type":"click","ts":1}}"#);
    for _ in 0..2 {
        let (s, _, b) = server
            .post(Some(KEY_A), "application/json", line.clone())
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    }
    let records = server.records().await;
    assert_eq!(records.len(), 2);
    let keys: Vec<&[u8]> = records.iter().map(|r| r.key().unwrap()).collect();
    assert!(keys[0].len() < 100, "{} bytes of key", keys[0].len());
    assert_eq!(keys[0], keys[1]);
    assert_eq!(records[0].payload().unwrap(), line.as_bytes());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_flight_are_bounded_by_bytes() {
    let mut config = stack_config();
    config.ingest.max_body_bytes = 64 * 1024;
    config.ingest.max_in_flight_bytes = 96 * 1024;
    config.ingest.body_read_timeout_ms = 3_000;
    let server = Server::start(config).await;
    let addr = server.addr;
    // A request declaring 60 KiB holds that much of the budget while its body trickles.
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/x-ndjson\r\nContent-Length: 61440\r\n\r\n{{"
    );
    let holder =
        tokio::spawn(
            async move { raw_exchange(addr, head.as_bytes(), Duration::from_secs(6)).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 40 KiB more does not fit the 96 KiB: refused before its body is read.
    let line = format!(
        r#"{{"user_id":"u","type":"click","ts":1,"p":"{}"}}"#,
        "x".repeat(400)
    );
    let body = vec![line.as_str(); 90].join("\n");
    assert!(body.len() > 36 * 1024);
    let (s, h, b) = server
        .post(Some(KEY_A), "application/x-ndjson", body.clone())
        .await;
    assert_error(s, &b, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains("max_in_flight_bytes"),
        "{b}"
    );
    assert!(h.get("retry-after").is_some());
    // A small one still fits.
    let (s, _, b) = server
        .post(Some(KEY_A), "application/x-ndjson", line.clone())
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let (answer, _) = holder.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The budget is back once the stalled body gave up.
    let (s, _, b) = server.post(Some(KEY_A), "application/x-ndjson", body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    server.shutdown().await;
}

/// A 503 can come after part of a request was queued (here: a producer queue of five
/// records); the client's retry with the same Idempotency-Key (here on another ingest
/// replica) stamps the same ids, so the sinks, keyed by (tenant, event id), store each
/// event once: no new event ids appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_partial_503_adds_no_new_event_ids() {
    let topic = unique("t-ingest-");
    let a = Server::start_on(small_producer_queue(), topic.clone()).await;
    let lines = [r#"{"user_id":"u","type":"click","ts":1}"#; 50].join("\n");
    let post = |server: &Server| {
        reqwest::Client::new()
            .post(server.url("/v1/events"))
            .bearer_auth(KEY_A)
            .header("content-type", "application/x-ndjson")
            .header("idempotency-key", "order-42")
            .body(lines.clone())
            .send()
    };
    let first = post(&a).await.unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    // What was queued before the 503 is written all the same.
    a.shutdown().await;
    let b = Server::start_on(stack_config(), topic).await;
    let retry = post(&b).await.unwrap();
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let records = b.records().await;
    let ids: HashSet<String> = event_ids(&records).into_iter().collect();
    assert!(
        records.len() > 50,
        "part of the first request was written: {}",
        records.len()
    );
    let want: HashSet<String> = (0..50).map(|i| format!("idem-order-42-{i}")).collect();
    assert_eq!(ids, want, "the retry repeated ids, it made no new ones");
    b.shutdown().await;
}

/// A refused request whose body is large still gets its status and JSON reason: the
/// server reads (and drops) the rest of the body before it answers, instead of closing a
/// socket with unread data, which resets the connection under a client still sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_refused_body_still_gets_its_json_answer() {
    let mut config = stack_config();
    config.ingest.max_body_bytes = 2_000;
    let server = Server::start(config).await;
    let big = "x".repeat(8 * 1024 * 1024);
    let client = reqwest::Client::new();
    // Chunked, with no Content-Length: refused once the limit is passed while reading.
    let chunked = || {
        let chunks: Vec<Result<String, std::io::Error>> =
            (0..128).map(|_| Ok("y".repeat(64 * 1024))).collect();
        reqwest::Body::wrap_stream(futures::stream::iter(chunks))
    };
    for attempt in 0..5 {
        for (key, content_type, body, want, error) in [
            (
                Some(KEY_A),
                "application/x-ndjson",
                reqwest::Body::from(big.clone()),
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
            ),
            (
                Some(KEY_A),
                "application/x-ndjson",
                chunked(),
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
            ),
            (
                Some(KEY_A),
                "text/csv",
                big.clone().into(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_type",
            ),
        ] {
            let mut req = client
                .post(server.url("/v1/events"))
                .header("content-type", content_type)
                .body(body);
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("attempt {attempt}, {want}: no answer: {e:?}"));
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert_error(status, &body, want, error);
        }
    }
    assert!(
        server.records().await.is_empty(),
        "nothing of a refused request is written"
    );
    server.shutdown().await;
}

/// The head of a POST declaring a body of `length` bytes, with `extra` header lines.
fn post_head(extra: &str, length: usize) -> String {
    format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\n{extra}Content-Type: application/x-ndjson\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Who does not authenticate gets the answer and a closed connection at once: the body
/// is not read. It used to be drained like any refused body (up to 64 MiB, for up to
/// `body_read_timeout_ms`), so an unauthenticated client held a connection and took
/// bandwidth for as long as it liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_request_is_answered_and_closed_without_reading_its_body() {
    let mut config = stack_config();
    config.ingest.body_read_timeout_ms = 120_000;
    let server = Server::start(config).await;
    for (extra, status) in [
        (String::new(), "401"),
        ("Authorization: Bearer wrong\r\n".to_string(), "401"),
        (
            format!("Authorization: Bearer {KEY_A}\r\nX-Tenant: tenant-b\r\n"),
            "403",
        ),
    ] {
        let head = post_head(&extra, 10_000_000);
        let (answer, closed) =
            raw_exchange(server.addr, head.as_bytes(), Duration::from_secs(20)).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{extra:?}: {answer:?}"
        );
        assert!(answer.contains("\"reason\""), "{answer}");
        assert!(
            closed,
            "{extra:?}: the connection stays open, waiting for the body"
        );
    }
    server.shutdown().await;
}

/// Refused bodies are drained (so a client still sending gets its answer) only within a
/// small budget of their own: beyond `max_draining`, a refusal closes its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_bodies_are_drained_within_their_own_budget() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = stack_config();
    config.ingest.max_draining = 1;
    config.ingest.max_body_bytes = 100;
    config.ingest.body_read_timeout_ms = 120_000;
    let server = Server::start(config).await;
    let head = post_head(&format!("Authorization: Bearer {KEY_A}\r\n"), 1_000);
    // The first refusal takes the drain budget: its answer waits for its body.
    let mut first = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    first.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    assert!(
        tokio::time::timeout(Duration::from_secs(2), first.read(&mut buf))
            .await
            .is_err(),
        "the first refusal is drained before its answer"
    );
    // The second finds no budget: answered and closed at once.
    let (answer, closed) =
        raw_exchange(server.addr, head.as_bytes(), Duration::from_secs(20)).await;
    assert!(
        answer.starts_with("HTTP/1.1 413") && closed,
        "{answer:?} closed {closed}"
    );
    // The first, its body sent, gets its answer.
    first.write_all(&[b'x'; 1_000]).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(20), first.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"));
    server.shutdown().await;
}

/// Beyond `max_connections` a new connection is closed at once, and counted; when
/// connections end, clients are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let mut config = stack_config();
    config.ingest.max_connections = 20;
    let server = Server::start(config).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let (answer, closed) = raw_exchange(
        server.addr,
        post_head("", 0).as_bytes(),
        Duration::from_secs(20),
    )
    .await;
    assert!(answer.is_empty() && closed, "{answer:?}");
    drop(idle);
    let line = r#"{"user_id":"u","type":"click","ts":1}"#;
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        // The server notices the closed connections on its next read of each.
        match reqwest::Client::new()
            .post(server.url("/v1/events"))
            .bearer_auth(KEY_A)
            .header("content-type", "application/x-ndjson")
            .body(line)
            .send()
            .await
        {
            Ok(r) => {
                status = r.status();
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(status, StatusCode::ACCEPTED);
    let refused = metrics_handle().render().lines().find_map(|l| {
        l.strip_prefix("sluice_ingest_connections_refused_total ")?
            .parse::<f64>()
            .ok()
    });
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    server.shutdown().await;
}

/// Median time of `n` authenticated one-line requests, one after another.
async fn median_post_ms(server: &Server, n: usize) -> f64 {
    let line = r#"{"user_id":"u","type":"click","ts":1}"#;
    let mut times = Vec::new();
    for _ in 0..n {
        let t = std::time::Instant::now();
        let (status, _, body) = server.post(Some(KEY_A), "application/x-ndjson", line).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    times[n / 2]
}

/// 5,000 unauthenticated connections trickling their request heads (one byte a second,
/// within the head timeout) leave an authenticated client served within its usual
/// latency, and 200 more sending a wrong key are closed without their bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_unauthenticated_connections_do_not_slow_a_real_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TRICKLERS: usize = 5_000;
    let mut config = stack_config();
    config.ingest.header_read_timeout_ms = 120_000;
    config.ingest.body_read_timeout_ms = 120_000;
    let server = Server::start(config).await;
    let usual = median_post_ms(&server, 30).await;
    let stop = CancellationToken::new();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tricklers = Vec::new();
    for _ in 0..TRICKLERS {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            .await
            .unwrap();
        let (stop, open) = (stop.clone(), open.clone());
        tricklers.push(tokio::spawn(async move {
            open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if tcp.write_all(b"a").await.is_err() {
                    open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
            }
        }));
    }
    let wrong_key = post_head("Authorization: Bearer wrong\r\n", 50_000_000);
    let mut refused = Vec::new();
    for _ in 0..200 {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(wrong_key.as_bytes()).await.unwrap();
        refused.push(tcp);
    }
    let loaded = median_post_ms(&server, 30).await;
    let still_open = open.load(std::sync::atomic::Ordering::Relaxed);
    println!("median authenticated request: {usual:.2} ms alone, {loaded:.2} ms beside {still_open} trickling connections");
    assert!(
        still_open >= TRICKLERS * 9 / 10,
        "only {still_open} tricklers held on"
    );
    assert!(
        loaded < usual * 5.0 + 5.0,
        "{loaded:.2} ms vs {usual:.2} ms alone"
    );
    // Every wrong-key connection was answered 401 and closed, its body never sent.
    for mut tcp in refused {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut got))
            .await
            .expect("closed by the server")
            .ok();
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 401"));
    }
    stop.cancel();
    for t in tricklers {
        t.await.unwrap();
    }
    server.shutdown().await;
}
