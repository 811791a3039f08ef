//! What an operator relies on: lag exported only by the consumer that owns a partition,
//! the per-component `absent` alert, JSON logs, `sluice check` and `sluice config`.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_core::config::LogFormat;
use sluice_tests::process::SluiceProcess;
use sluice_tests::{create_topics, sluice_bin, stack_config, unique};

/// One sample of the text exposition format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

async fn scrape(addr: SocketAddr) -> Option<Vec<Sample>> {
    let text = sluice_tests::metrics_text(addr).await?;
    Some(text.lines().filter_map(sample).collect())
}

fn sample(line: &str) -> Option<Sample> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => (n, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let labels = labels
        .split("\",")
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.split_once("=\"")?;
            Some((k.to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect();
    Some((name.to_string(), labels, value.parse().ok()?))
}

/// The partitions whose lag a process exports for `group`.
fn lag_partitions(samples: &[Sample], group: &str) -> BTreeSet<i32> {
    samples
        .iter()
        .filter(|(n, l, _)| n == "sluice_consumer_lag_records" && l["group"] == group)
        .filter_map(|(_, l, _)| l["partition"].parse().ok())
        .collect()
}

/// The chart's per-component rule, `absent(sluice_build_info{namespace="NS",
/// component="C"})` (scripts/helm-check holds the chart to this form), evaluated on the
/// samples Prometheus would hold: each scraped target's series plus its namespace label.
fn absent_fires(targets: &[Vec<Sample>], namespace: &str, component: &str) -> bool {
    !targets.iter().flatten().any(|(n, l, _)| {
        let mut l = l.clone();
        l.insert("namespace".into(), namespace.into());
        n == "sluice_build_info"
            && l["namespace"] == namespace
            && l.get("component").map(String::as_str) == Some(component)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_exported_by_the_owner_only_and_absent_fires_when_all_are_gone() {
    let mut config = stack_config();
    let name = unique("ops");
    config = config.namespaced(&format!("t-{name}"), &name);
    config.topics.partitions = 4;
    config.metrics.idle_timeout_s = 2;
    config.log.format = LogFormat::Json;
    // Lag is computed from statistics: emit them often.
    config
        .kafka
        .consumer
        .insert("statistics.interval.ms".into(), "200".into());
    create_topics(&config).await;
    // Records on every partition, so that each has a committed offset and a lag (0 once
    // parsed): librdkafka reports no lag for a partition nothing was committed on.
    {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
        for i in 0..40 {
            let id = format!("ev-{i}");
            let line = format!(r#"{{"user_id":"u{i}","type":"page_view","ts":1795428000000}}"#);
            producer
                .send(
                    FutureRecord::to(&config.topics.raw)
                        .partition(i % 4)
                        .key(&id)
                        .payload(&line)
                        .headers(sluice_tests::raw_headers("acme", &id, "1795428000000")),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    let group = config.parse.group.clone();
    let all: BTreeSet<i32> = (0..4).collect();

    let (a, a_addr) = SluiceProcess::spawn_serving(&config, &["stage", "parse"], "a");
    let wait = |what: &'static str| {
        let deadline = Instant::now() + Duration::from_secs(90);
        move || assert!(Instant::now() < deadline, "timed out waiting for {what}")
    };
    let check = wait("the first replica to own every partition");
    loop {
        if let Some(s) = scrape(a_addr).await {
            if lag_partitions(&s, &group) == all {
                break;
            }
        }
        check();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (mut b, b_addr) = SluiceProcess::spawn_serving(&config, &["stage", "parse"], "b");
    // After the rebalance each replica exports only what it owns: disjoint, together all.
    let check = wait("the two replicas to split the partitions");
    let (from_a, from_b) = loop {
        if let (Some(sa), Some(sb)) = (scrape(a_addr).await, scrape(b_addr).await) {
            let (pa, pb) = (lag_partitions(&sa, &group), lag_partitions(&sb, &group));
            if !pa.is_empty() && !pb.is_empty() && pa.is_disjoint(&pb) && &pa | &pb == all {
                break (pa, pb);
            }
        }
        check();
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(from_a.len() + from_b.len(), 4, "{from_a:?} {from_b:?}");
    // sum by (group) of the raw series no longer counts any partition twice.

    // The absent() rule: quiet while one replica runs, firing once none does.
    let targets = vec![scrape(a_addr).await.unwrap(), scrape(b_addr).await.unwrap()];
    let info: Vec<&Sample> = targets
        .iter()
        .flatten()
        .filter(|(n, _, _)| n.starts_with("sluice_build"))
        .collect();
    assert!(!absent_fires(&targets, "pipe", "parse"), "{info:?}");
    assert!(
        absent_fires(&targets, "pipe", "enrich"),
        "nothing runs enrich"
    );
    b.kill9();
    let targets = vec![scrape(a_addr).await.unwrap()];
    assert!(
        !absent_fires(&targets, "pipe", "parse"),
        "one replica is left"
    );
    let log = a.log_file().to_path_buf();
    drop(a);
    let targets: Vec<Vec<Sample>> = [scrape(a_addr).await, scrape(b_addr).await]
        .into_iter()
        .flatten()
        .collect();
    assert!(targets.is_empty(), "both processes are gone");
    assert!(absent_fires(&targets, "pipe", "parse"));

    // log.format = "json": every line is one JSON object; the rebalance is one line of
    // plain fields.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    for l in &lines {
        assert!(l["level"].is_string() && l["timestamp"].is_string(), "{l}");
        assert!(
            !l.to_string().contains("TopicPartitionListElem"),
            "a Debug dump: {l}"
        );
    }
    let assigned = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "partitions assigned" || l["message"] == "partitions assigned"
        })
        .unwrap_or_else(|| panic!("no rebalance line in {text}"));
    assert!(
        assigned
            .to_string()
            .contains(&format!("{}[", config.topics.raw)),
        "{assigned}"
    );
}

#[test]
fn check_names_the_dependency_that_is_down() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = free.local_addr().unwrap();
    drop(free);
    let out = Command::new(sluice_bin())
        .args(["check", "--component", "sink-elasticsearch"])
        .env("SLUICE_STACK_ENV", sluice_tests::stack_env_path())
        .env("SLUICE__ELASTICSEARCH__URL", format!("http://{down}"))
        .env("SLUICE__ELASTICSEARCH__REQUEST_TIMEOUT_MS", "3000")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("ok   kafka"),
        "the brokers answer: {stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("FAIL elasticsearch")),
        "{stdout}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("Error: failed:") && l.contains("elasticsearch")),
        "{stderr}"
    );
}

#[test]
fn config_shows_no_secret_of_any_kind() {
    let secrets = [
        ("SLUICE__KAFKA__SECURITY__PROTOCOL", "sasl_ssl", None),
        ("SLUICE__KAFKA__SECURITY__SASL_MECHANISM", "PLAIN", None),
        ("SLUICE__KAFKA__SECURITY__USERNAME", "svc", None),
        (
            "SLUICE__KAFKA__SECURITY__PASSWORD",
            "kafka-pw-1",
            Some("kafka-pw-1"),
        ),
        (
            "SLUICE__KAFKA__PROPERTIES",
            "sasl.oauthbearer.client.secret=oauth-pw-2",
            Some("oauth-pw-2"),
        ),
        (
            "SLUICE__ELASTICSEARCH__URL",
            "https://elastic:es%40pw-3@es:9200",
            Some("pw-3"),
        ),
        (
            "SLUICE__ELASTICSEARCH__API_KEY",
            "es-key-4",
            Some("es-key-4"),
        ),
        (
            "SLUICE__SCHEMAS__REGISTRY_URL",
            "https://u:reg-pw-5@sr:8081",
            Some("reg-pw-5"),
        ),
        (
            "SLUICE__SCHEMAS__REGISTRY_PASSWORD",
            "reg-pw-6",
            Some("reg-pw-6"),
        ),
        (
            "SLUICE__ENRICH__TENANTS_URL",
            "postgres://t:p@ss-7@db/tenants",
            Some("ss-7"),
        ),
        (
            "SLUICE__TIMESCALE__URL",
            "postgres://s:db-pw-8@db/metrics",
            Some("db-pw-8"),
        ),
        (
            "SLUICE__INGEST__API_KEYS",
            "[{tenant=\"a\",key=\"api-key-9\"}]",
            Some("api-key-9"),
        ),
        (
            "SLUICE__ARCHIVE__SECRET_ACCESS_KEY",
            "s3-secret-10",
            Some("s3-secret-10"),
        ),
    ];
    let mut cmd = Command::new(sluice_bin());
    cmd.arg("config").env_remove("SLUICE_STACK_ENV");
    for (k, v, _) in &secrets {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (k, _, secret) in &secrets {
        if let Some(secret) = secret {
            assert!(!text.contains(secret), "{k} shows {secret}:\n{text}");
        }
    }
    // What is not secret stays readable.
    assert!(text.contains("https://elastic:***@es:9200"), "{text}");
    assert!(text.contains("sasl_ssl") && text.contains("svc"), "{text}");
}
