//! Property-based fuzzing of the HTTP ingest endpoint on a real broker: random
//! credentials, tenants, content types and bodies (arbitrary bytes, NDJSON of arbitrary
//! JSON, oversized and over-long bodies). Every answer is a 202 or a clear 4xx with a JSON
//! `error` and `reason`, never a 5xx, and the server keeps serving.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::net::SocketAddr;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use sluice_core::kafka;
use sluice_ingest::config::ApiKey;
use sluice_tests::{stack_config, unique};
use tokio_util::sync::CancellationToken;

const KEY: &str = "fuzz-key";
const MAX_BODY: usize = 16 * 1024;
const MAX_LINES: usize = 40;
/// Lines longer than this get 413 (`topics.max_event_bytes`).
const MAX_EVENT: usize = 2048;

/// One generated request.
#[derive(Debug, Clone)]
struct Case {
    auth: Option<String>,
    tenant: Option<String>,
    content_type: Option<String>,
    /// Client headers copied onto records: `x-source`, `idempotency-key`.
    copied: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn json_line() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        "\"[^\"\\\\]{0,10}\"",
        Just(r#""2026-11-23T10:00:00Z""#.to_string()),
    ];
    let field = prop_oneof![
        Just("user_id"),
        Just("type"),
        Just("ts"),
        Just("event_id"),
        Just("url"),
        Just("x"),
    ];
    prop_oneof![
        prop::collection::vec((field, leaf), 0..6).prop_map(|kv| {
            let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", body.join(","))
        }),
        ".{0,40}",
    ]
}

fn case() -> impl Strategy<Value = Case> {
    // Mostly the right key, so the checks after authentication are reached too.
    let auth = prop_oneof![
        1 => Just(None),
        8 => Just(Some(format!("Bearer {KEY}"))),
        1 => Just(Some("Bearer wrong".to_string())),
        1 => Just(Some(KEY.to_string())),
        1 => "[ -~]{0,30}".prop_map(Some),
    ];
    let tenant = prop_oneof![
        4 => Just(None),
        2 => Just(Some("fuzz".to_string())),
        1 => "[a-z]{1,8}".prop_map(Some),
    ];
    let content_type = prop_oneof![
        Just(Some("application/x-ndjson".to_string())),
        Just(Some("application/json".to_string())),
        Just(Some("application/json; charset=utf-8".to_string())),
        Just(None),
        "[ -~]{0,30}".prop_map(Some),
    ];
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        prop::collection::vec(json_line(), 0..8).prop_map(|l| l.join("\n").into_bytes()),
        prop::collection::vec(json_line(), MAX_LINES + 1..MAX_LINES + 5)
            .prop_map(|l| l.join("\n").into_bytes()),
        (MAX_BODY + 1..MAX_BODY + 2048).prop_map(|n| vec![b'a'; n]),
        // A line over the event size among good ones.
        (0..3usize, MAX_EVENT..MAX_EVENT * 3).prop_map(|(before, n)| {
            let mut lines = vec![r#"{"user_id":"u","type":"t","ts":1}"#.to_string(); before];
            lines.push(format!(
                r#"{{"user_id":"u","type":"t","ts":1,"p":"{}"}}"#,
                "x".repeat(n)
            ));
            lines.join("\n").into_bytes()
        }),
    ];
    let header_value = prop_oneof![
        "[ -~]{1,40}",
        (200..4000usize).prop_map(|n| "s".repeat(n)),
        "\\PC{1,20}",
    ];
    let copied = prop::collection::vec(
        (
            prop_oneof![Just("x-source"), Just("idempotency-key")],
            header_value,
        ),
        0..3,
    );
    (auth, tenant, content_type, copied, body).prop_map(
        |(auth, tenant, content_type, copied, body)| Case {
            auth,
            tenant,
            content_type,
            copied,
            body,
        },
    )
}

async fn send(
    addr: SocketAddr,
    case: &Case,
    seen: &std::sync::Mutex<std::collections::BTreeMap<u16, u32>>,
) -> Result<(), TestCaseError> {
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}/v1/events"))
        .body(case.body.clone());
    if let Some(a) = &case.auth {
        req = req.header("authorization", a);
    }
    if let Some(t) = &case.tenant {
        req = req.header("x-tenant", t);
    }
    if let Some(c) = &case.content_type {
        req = req.header("content-type", c);
    }
    for (name, value) in &case.copied {
        req = req.header(*name, value);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        // reqwest refuses some generated header values before sending: not the server's.
        Err(e) if e.is_builder() => return Ok(()),
        Err(e) => return Err(TestCaseError::fail(format!("no answer: {e}"))),
    };
    let status = resp.status().as_u16();
    *seen.lock().unwrap().entry(status).or_default() += 1;
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| TestCaseError::fail(format!("{status}: the answer is not JSON: {e}")))?;
    match status {
        202 => prop_assert!(body["accepted"].as_u64().is_some_and(|n| n > 0), "{body}"),
        400 | 401 | 403 | 413 | 415 | 429 => {
            prop_assert!(
                body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{body}"
            );
            prop_assert!(
                body["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{body}"
            );
        }
        other => prop_assert!(false, "status {other}: {body}"),
    }
    Ok(())
}

#[test]
fn every_answer_is_a_202_or_a_clear_4xx() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = CancellationToken::new();
    let addr = rt.block_on(async {
        let mut config = stack_config();
        config.topics.raw = unique("t-fuzz-");
        config.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.ingest.max_body_bytes = MAX_BODY;
        config.ingest.max_lines = MAX_LINES;
        config.topics.max_event_bytes = MAX_EVENT;
        config.ingest.api_keys = vec![ApiKey {
            tenant: "fuzz".into(),
            key: KEY.into(),
        }];
        kafka::create_topics(
            &config.kafka,
            1,
            1,
            &[(config.topics.raw.clone(), "3600000".into())],
        )
        .await
        .unwrap();
        let (addr, _task) = sluice::pipeline::start_ingest(&config, stop.clone())
            .await
            .unwrap();
        addr
    });
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 500,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::new());
    runner
        .run(&case(), |c| rt.block_on(send(addr, &c, &seen)))
        .unwrap();
    let seen = seen.into_inner().unwrap();
    println!("answers by status: {seen:?}");
    for status in [202, 400, 401, 413, 415] {
        assert!(seen.contains_key(&status), "no {status} among {seen:?}");
    }
    let rss_mb = procfs_rss_mb();
    println!("resident memory after the fuzzing: {rss_mb} MB");
    let health = rt
        .block_on(reqwest::get(format!("http://{addr}/healthz")))
        .unwrap();
    assert_eq!(health.status(), 200, "still serving after the fuzzing");
    stop.cancel();
}

/// This process's resident memory (the ingest server runs in it), in MiB.
fn procfs_rss_mb() -> u64 {
    sluice_tests::proc_memory_mib("self", "VmRSS")
}
