//! A whole pipeline in one test process, for the fault scenarios and the secured
//! pipeline: HTTP ingest → parse → enrich → PostgreSQL and Elasticsearch, fed known
//! events with unique client `event_id`s, and the checks that every event is exactly
//! once in each sink (id sets) and that `sluice audit` accounts for everything.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::Utc;
use sluice::audit::{self, Report, Window};
use sluice::Config;
use sluice_ingest::config::ApiKey;

use crate::running::Running;
use crate::{caught_up, stack_config, stack_var};

/// The tenants and their API keys.
pub const TENANTS: [(&str, &str); 2] = [("acme", "key-acme"), ("globex", "key-globex")];

/// A namespace of its own on the shared stack, with PostgreSQL 15 as the database.
pub async fn pipeline_config(name: &str) -> Config {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.timescale.pool_size = 2;
    config.timescale.batch_size = 500;
    config.timescale.linger_ms = 50;
    config.elasticsearch.bulk_max_docs = 500;
    config.elasticsearch.linger_ms = 50;
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
    ] {
        config.kafka.consumer.insert(k.into(), v.into());
    }
    config = config.namespaced(&format!("t-{name}"), name);
    config.ingest.api_keys = TENANTS
        .iter()
        .map(|(t, k)| ApiKey {
            tenant: t.to_string(),
            key: (*k).into(),
        })
        .collect();
    config.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config
}

/// Create the pipeline's topics (logging only when `RUST_LOG` asks for it).
pub async fn create_topics(config: &Config) {
    // Logs only when asked for (RUST_LOG), to keep the test output readable.
    if std::env::var_os("RUST_LOG").is_some() {
        sluice_core::telemetry::init_logging();
    }
    crate::create_topics(config).await;
}

/// The whole pipeline in this process; sinks are left out when `sinks` is false.
pub async fn start_all(config: &Config, sinks: bool) -> (SocketAddr, Vec<Running>) {
    let (addr, ingest) = Running::ingest(config).await;
    let mut tasks = vec![
        ingest,
        Running::stage(config, "parse"),
        Running::stage(config, "enrich"),
    ];
    if sinks {
        tasks.push(Running::sink(config, "timescale"));
        tasks.push(Running::sink(config, "elasticsearch"));
    }
    (addr, tasks)
}

/// Stop the components, last started first.
pub async fn stop_all(tasks: Vec<Running>) {
    for t in tasks.into_iter().rev() {
        t.stop().await;
    }
}

/// `n` good events with ids `<prefix>-<i>`, alternating tenants: (tenant index, id, line).
pub fn events(prefix: &str, n: usize) -> Vec<(usize, String, String)> {
    let ts = Utc::now().timestamp_millis();
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let line = format!(
                r#"{{"event_id":"{id}","user_id":"u{}","type":"page_view","ts":{},"url":"/p/{}"}}"#,
                i % 17,
                ts + i as i64,
                i % 5
            );
            (i % 2, id, line)
        })
        .collect()
}

/// POST lines of one tenant; on 503 or 429 (broker away, rate limit) retry after a pause,
/// as a client does. Returns how many 503s it saw.
pub async fn post(addr: SocketAddr, tenant: usize, lines: &[&str]) -> u64 {
    let client = reqwest::Client::new();
    let body = lines.join("\n");
    let mut unavailable = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let resp = client
            .post(format!("http://{addr}/v1/events"))
            .bearer_auth(TENANTS[tenant].1)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await;
        match resp.map(|r| r.status().as_u16()) {
            Ok(202) => return unavailable,
            Ok(503) | Ok(429) | Err(_) => {
                unavailable += 1;
                assert!(Instant::now() < deadline, "ingest never accepted the batch");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(other) => panic!("unexpected status {other}"),
        }
    }
}

/// POST every event in batches of `batch`, spread over about `seconds`.
pub async fn post_events(
    addr: SocketAddr,
    events: &[(usize, String, String)],
    batch: usize,
    seconds: f64,
) -> u64 {
    let chunks = events.len().div_ceil(batch).max(1);
    let pause = Duration::from_secs_f64(seconds / chunks as f64);
    let mut unavailable = 0;
    for chunk in events.chunks(batch) {
        for tenant in 0..TENANTS.len() {
            let lines: Vec<&str> = chunk
                .iter()
                .filter(|(t, _, _)| *t == tenant)
                .map(|(_, _, l)| l.as_str())
                .collect();
            if !lines.is_empty() {
                unavailable += post(addr, tenant, &lines).await;
            }
        }
        tokio::time::sleep(pause).await;
    }
    unavailable
}

/// Wait until every group has committed everything on its input.
pub async fn settle(config: &Config) {
    let t = &config.topics;
    caught_up(config, &config.parse.group, &t.raw).await;
    caught_up(config, &config.enrich.group, &t.parsed).await;
    caught_up(config, &config.timescale.group, &t.enriched).await;
    caught_up(config, &config.elasticsearch.group, &t.enriched).await;
}

/// Every id is exactly once in PostgreSQL and in Elasticsearch, and nothing else is
/// (id sets, and a count per id: a missing and an extra one do not cancel out).
pub async fn assert_exactly_once(config: &Config, ids: &BTreeSet<String>) {
    for store in ["timescale", "elasticsearch"] {
        let all = sluice_sinks::Selection::Received {
            from: 0,
            to: i64::MAX,
            tenant: None,
        };
        let read = crate::sink(store).read_stored.unwrap();
        let stored = read(config.clone(), all, false).await.unwrap();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for s in stored {
            *counts.entry(s.event_id).or_default() += 1;
        }
        let held: BTreeSet<String> = counts.keys().cloned().collect();
        let missing: Vec<_> = ids.difference(&held).take(5).collect();
        let extra: Vec<_> = held.difference(ids).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{store}: {} missing {missing:?}…, {} extra {extra:?}…",
            ids.difference(&held).count(),
            held.difference(ids).count()
        );
        let repeated: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
        assert!(
            repeated.is_empty(),
            "{store}: events held twice {repeated:?}"
        );
    }
}

/// `sluice audit` over everything since `from`: nothing unaccounted for.
pub async fn audit_ok(config: &Config, from: chrono::DateTime<Utc>) -> Report {
    let window = Window {
        values: true,
        ..Window::new(from, Utc::now() + chrono::Duration::minutes(1))
    };
    let report = audit::run(config, &window).await.unwrap();
    assert!(report.ok(), "{}", report.render());
    report
}

/// The ids of `events`.
pub fn ids_of(events: &[(usize, String, String)]) -> BTreeSet<String> {
    events.iter().map(|(_, id, _)| id.clone()).collect()
}
