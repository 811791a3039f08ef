//! Input Sluice did not write or would rather not get: records other producers put on
//! the raw topic (no `sluice.*` headers), and event times no clock could mean.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice::Config;
use sluice_core::headers;
use sluice_ingest::config::ApiKey;
use sluice_stages::parse::config::SourceConfig;
use sluice_tests::running::{post_lines, Running};
use sluice_tests::{caught_up, create_topics, stack_config, unique};

fn read(config: &Config, topic: &str) -> Vec<OwnedMessage> {
    sluice_core::kafka::read_all(&config.kafka, topic, Duration::from_secs(30)).unwrap()
}

/// Event id → tenant of what the parse stage wrote.
fn parsed(config: &Config) -> Vec<(String, String)> {
    read(config, &config.topics.parsed)
        .iter()
        .map(|m| {
            let e = sluice_schemas::CLICK_EVENTS
                .decode(m.payload().unwrap())
                .unwrap();
            (e.event_id, e.tenant)
        })
        .collect()
}

async fn run_parse(config: &Config) {
    let parse = Running::stage(config, "parse");
    caught_up(config, &config.parse.group, &config.topics.raw).await;
    parse.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_sluice_headers_are_parsed_with_ids_from_their_place() {
    let name = unique("foreign");
    let mut config = stack_config().namespaced(&format!("t-{name}"), &name);
    config.parse.tenant_field = Some("org".into());
    config.parse.default_tenant = Some("shared".into());
    create_topics(&config).await;
    let now = chrono::Utc::now() - chrono::Duration::minutes(1);
    // What Filebeat or a plain client writes, and what Logstash's json codec writes.
    let mut lines = Vec::new();
    for i in 0..20 {
        lines.push(format!(
            r#"{{"user_id":"u{i}","type":"click","ts":{},"org":"globex"}}"#,
            now.timestamp_millis()
        ));
        lines.push(format!(
            r#"{{"user_id":"u{i}","type":"click","ts":{}}}"#,
            now.timestamp_millis()
        ));
        let own_id = if i < 5 {
            format!(r#","event_id":"ls-{i}""#)
        } else {
            String::new()
        };
        lines.push(format!(
            r#"{{"@timestamp":"{}","@version":"1","host":{{"name":"web-1"}},"message":"GET /p/{i}","user_id":"u{i}","type":"page_view","org":"initech"{own_id}}}"#,
            now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ));
    }
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    for (i, line) in lines.iter().enumerate() {
        producer
            .send(
                FutureRecord::<str, str>::to(&config.topics.raw)
                    .key(&format!("k{}", i % 7))
                    .payload(line),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // Expected from the raw records themselves: their own id, or their place in the log.
    let raw = read(&config, &config.topics.raw);
    assert_eq!(raw.len(), 60);
    assert!(raw
        .iter()
        .all(|m| m.headers().is_none_or(|h| h.count() == 0)));
    let expected: BTreeMap<String, String> =
        raw.iter()
            .map(|m| {
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                let id = v["event_id"].as_str().map(String::from).unwrap_or_else(|| {
                    format!("kafka:{}:{}:{}", m.topic(), m.partition(), m.offset())
                });
                let tenant = v["org"].as_str().unwrap_or("shared").to_string();
                (id, tenant)
            })
            .collect();

    run_parse(&config).await;
    let first: BTreeMap<String, String> = parsed(&config).into_iter().collect();
    assert_eq!(
        first, expected,
        "every foreign record parsed, with its id and tenant"
    );
    assert!(
        read(&config, &config.topics.dlq(&config.topics.raw)).is_empty(),
        "nothing dead-lettered"
    );

    // A replay of the same raw records makes the same ids, so the sinks store them once.
    let starts: Vec<(i32, i64)> = (0..config.topics.partitions).map(|p| (p, 0)).collect();
    let (k, g, t) = (
        config.kafka.clone(),
        config.parse.group.clone(),
        config.topics.raw.clone(),
    );
    tokio::task::spawn_blocking(move || sluice::replay::commit_group(&k, &g, &t, &starts))
        .await
        .unwrap()
        .unwrap();
    run_parse(&config).await;
    let again = parsed(&config);
    assert_eq!(again.len(), 120, "the replay wrote every record again");
    let ids: BTreeMap<String, String> = again.into_iter().collect();
    assert_eq!(ids, expected, "and with the same ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_times_no_clock_could_mean_are_dead_lettered_as_out_of_range() {
    let name = unique("range");
    let mut config = stack_config().namespaced(&format!("t-{name}"), &name);
    config.ingest.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.ingest.api_keys = vec![ApiKey {
        tenant: "acme".into(),
        key: "k-acme".into(),
    }];
    create_topics(&config).await;
    let now = chrono::Utc::now().timestamp_millis();
    let lines: Vec<String> = [
        ("now", now.to_string()),
        ("future", "\"9999-12-31T23:59:59Z\"".to_string()),
        ("past", (now - 30 * 86_400_000).to_string()),
        ("soon", (now + 60_000).to_string()),
    ]
    .iter()
    .map(|(id, ts)| format!(r#"{{"event_id":"{id}","user_id":"u","type":"click","ts":{ts}}}"#))
    .collect();
    let (addr, ingest) = Running::ingest(&config).await;
    post_lines(addr, "k-acme", &lines).await;
    ingest.stop().await;
    run_parse(&config).await;
    let mut ok: Vec<String> = parsed(&config).into_iter().map(|(id, _)| id).collect();
    ok.sort();
    assert_eq!(ok, vec!["now", "soon"]);
    let dead = read(&config, &config.topics.dlq(&config.topics.raw));
    let reasons: BTreeMap<String, (String, String)> = dead
        .iter()
        .map(|m| {
            let h = m.headers();
            let line: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            (
                line["event_id"].as_str().unwrap().to_string(),
                (
                    headers::get(h, headers::DLQ_ERROR_CLASS)
                        .unwrap()
                        .to_string(),
                    headers::get(h, headers::DLQ_REASON).unwrap().to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(
        reasons.keys().collect::<Vec<_>>(),
        vec!["future", "past"],
        "{reasons:?}"
    );
    for (class, reason) in reasons.values() {
        assert_eq!(class, "out_of_range", "{reason}");
    }
    assert!(reasons["future"].1.contains("9999-12-31"), "{reasons:?}");
}

/// A raw record another producer wrote, far above `topics.max_event_bytes`: its dead
/// letter cannot fit a record either, so a stub takes its place (where it is, why, how
/// big), and the stage goes on with the next records instead of retrying for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_even_to_dead_letter_leaves_a_stub_and_no_stall() {
    let name = unique("huge");
    let config = stack_config().namespaced(&format!("t-{name}"), &name);
    create_topics(&config).await;
    // The other producer allows 3 MB records (so does the broker).
    let mut big_config = config.kafka.clone();
    big_config
        .producer
        .insert("message.max.bytes".into(), "3000000".into());
    let producer: FutureProducer = big_config.producer_config().create().unwrap();
    let huge = format!(
        r#"{{"user_id":"u","type":"click","ts":1,"pad":"{}"}}"#,
        "x".repeat(2_000_000)
    );
    let now = chrono::Utc::now().timestamp_millis();
    let mut sent = Vec::new();
    for (i, line) in std::iter::once(huge.clone())
        .chain((0..10).map(|i| format!(r#"{{"user_id":"u{i}","type":"click","ts":{now}}}"#)))
        .enumerate()
    {
        let id = format!("ev-{i}");
        let delivery = producer
            .send(
                FutureRecord::to(&config.topics.raw)
                    .key("same-partition")
                    .payload(&line)
                    .headers(sluice_tests::raw_headers("acme", &id, &now.to_string())),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        sent.push((id, delivery.partition, delivery.offset));
    }
    let started = std::time::Instant::now();
    run_parse(&config).await;
    println!("parse caught up and stopped in {:?}", started.elapsed());
    let mut ok: Vec<String> = parsed(&config).into_iter().map(|(id, _)| id).collect();
    ok.sort();
    let mut want: Vec<String> = (1..=10).map(|i| format!("ev-{i}")).collect();
    want.sort();
    assert_eq!(ok, want, "the records after the huge one were parsed");
    let dead = read(&config, &config.topics.dlq(&config.topics.raw));
    assert_eq!(dead.len(), 1);
    let h = dead[0].headers();
    let get = |k| headers::get(h, k).unwrap_or_default().to_string();
    assert!(dead[0].payload().is_none_or(<[u8]>::is_empty), "a stub");
    assert_eq!(get(headers::DLQ_ERROR_CLASS), "oversized");
    assert_eq!(get(headers::EVENT_ID), "ev-0");
    assert_eq!(get(headers::DLQ_TOPIC), config.topics.raw);
    assert_eq!(get(headers::DLQ_PARTITION), sent[0].1.to_string());
    assert_eq!(get(headers::DLQ_OFFSET), sent[0].2.to_string());
    let dropped: usize = get(headers::DLQ_DROPPED_BYTES).parse().unwrap();
    assert!(dropped > 2_000_000, "{dropped}");
}

/// Parse reads other producers' topics beside the raw one (`topics.raw_extra`), in the
/// same group; their bad records go to their own dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_producers_topics_feed_parse_beside_the_raw_one() {
    let name = unique("extra");
    let mut config = stack_config().namespaced(&format!("t-{name}"), &name);
    let extra = format!("t-{name}.logstash");
    config.topics.raw_extra = vec![extra.clone()];
    config.parse.sources.insert(
        extra.clone(),
        SourceConfig {
            tenant: Some("shipped".into()),
            ..SourceConfig::default()
        },
    );
    // The other producer's topic exists already; Sluice creates its dead-letter topic.
    sluice_core::kafka::create_topics(&config.kafka, 2, 1, &[(extra.clone(), "3600000".into())])
        .await
        .unwrap();
    create_topics(&config).await;
    let now = chrono::Utc::now().timestamp_millis();
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    for i in 0..10 {
        let line = format!(r#"{{"user_id":"l{i}","type":"click","ts":{now}}}"#);
        producer
            .send(
                FutureRecord::<str, str>::to(&extra).payload(&line),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        let id = format!("ingested-{i}");
        producer
            .send(
                FutureRecord::to(&config.topics.raw)
                    .key(&id)
                    .payload(&format!(
                        r#"{{"user_id":"r{i}","type":"click","ts":{now}}}"#
                    ))
                    .headers(sluice_tests::raw_headers("acme", &id, &now.to_string())),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    producer
        .send(
            FutureRecord::<str, str>::to(&extra).payload("not json"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let parse = Running::stage(&config, "parse");
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    caught_up(&config, &config.parse.group, &extra).await;
    parse.stop().await;
    let got = parsed(&config);
    let from_extra: Vec<&(String, String)> = got
        .iter()
        .filter(|(id, _)| id.starts_with(&format!("kafka:{extra}:")))
        .collect();
    assert_eq!(from_extra.len(), 10, "{got:?}");
    assert!(from_extra.iter().all(|(_, tenant)| tenant == "shipped"));
    assert_eq!(
        got.iter()
            .filter(|(id, _)| id.starts_with("ingested-"))
            .count(),
        10
    );
    let dead = read(&config, &config.topics.dlq(&extra));
    assert_eq!(
        dead.len(),
        1,
        "the bad record of the other topic, in its own DLQ"
    );
    assert!(read(&config, &config.topics.dlq(&config.topics.raw)).is_empty());
}

/// Another producer's topic is a trust boundary: its records' `sluice.*` headers are
/// dropped, so a producer forging `sluice.tenant: victim` (and an event id, and a receive
/// time of 0 to skip the clock check) files nothing under `victim`. A field-named
/// tenant must be one the topic may write as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_producer_cannot_write_as_another_tenant() {
    let name = unique("forge");
    let mut config = stack_config().namespaced(&format!("t-{name}"), &name);
    let (fixed, named) = (format!("t-{name}.fixed"), format!("t-{name}.named"));
    config.topics.raw_extra = vec![fixed.clone(), named.clone()];
    config.parse.sources.insert(
        fixed.clone(),
        SourceConfig {
            tenant: Some("shipped".into()),
            ..SourceConfig::default()
        },
    );
    config.parse.sources.insert(
        named.clone(),
        SourceConfig {
            tenant_field: Some("org".into()),
            tenants: vec!["globex".into()],
            ..SourceConfig::default()
        },
    );
    config.check().unwrap();
    let retention = "3600000".to_string();
    sluice_core::kafka::create_topics(
        &config.kafka,
        2,
        1,
        &[
            (fixed.clone(), retention.clone()),
            (named.clone(), retention),
        ],
    )
    .await
    .unwrap();
    create_topics(&config).await;
    let now = chrono::Utc::now().timestamp_millis();
    let old = now - 30 * 86_400_000;
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    let send =
        |topic: &str, line: String, i: usize| send_forged(&producer, topic.to_string(), line, i);
    for i in 0..5 {
        let line = format!(r#"{{"user_id":"f{i}","type":"click","ts":{now}}}"#);
        send(&fixed, line, i).await;
        let line = format!(r#"{{"user_id":"n{i}","type":"click","ts":{now},"org":"globex"}}"#);
        send(&named, line, i).await;
        let line = format!(r#"{{"user_id":"v{i}","type":"click","ts":{now},"org":"victim"}}"#);
        send(&named, line, i).await;
    }
    // Thirty days old, with a forged receive time of 0 (which used to skip the check).
    send(
        &fixed,
        format!(r#"{{"user_id":"o","type":"click","ts":{old}}}"#),
        9,
    )
    .await;

    let parse = Running::stage(&config, "parse");
    caught_up(&config, &config.parse.group, &fixed).await;
    caught_up(&config, &config.parse.group, &named).await;
    parse.stop().await;
    let out = read(&config, &config.topics.parsed);
    let tenants: BTreeMap<String, usize> = out.iter().fold(BTreeMap::new(), |mut m, r| {
        let e = sluice_schemas::CLICK_EVENTS
            .decode(r.payload().unwrap())
            .unwrap();
        assert_eq!(
            headers::get(r.headers(), headers::TENANT),
            Some(e.tenant.as_str())
        );
        assert!(
            e.event_id.starts_with("kafka:"),
            "a forged id was taken: {}",
            e.event_id
        );
        assert_ne!(e.received_at, 0, "the forged receive time was taken");
        assert!(
            headers::get(r.headers(), headers::INGEST_ID).is_none(),
            "a forged header was forwarded"
        );
        *m.entry(e.tenant).or_default() += 1;
        m
    });
    assert_eq!(
        tenants,
        BTreeMap::from([("globex".to_string(), 5), ("shipped".to_string(), 5)])
    );
    let class =
        |m: &OwnedMessage| headers::get(m.headers(), headers::DLQ_ERROR_CLASS).map(String::from);
    let named_dead: Vec<Option<String>> = read(&config, &config.topics.dlq(&named))
        .iter()
        .map(class)
        .collect();
    assert_eq!(named_dead, vec![Some("tenant".to_string()); 5]);
    let fixed_dead: Vec<Option<String>> = read(&config, &config.topics.dlq(&fixed))
        .iter()
        .map(class)
        .collect();
    assert_eq!(fixed_dead, [Some("out_of_range".to_string())]);
}

/// Send `line` to `topic` with forged ingest headers, as a hostile producer would.
async fn send_forged(producer: &FutureProducer, topic: String, line: String, i: usize) {
    let id = format!("forged-{i}");
    let forged = sluice_tests::raw_headers("victim", &id, "0").insert(rdkafka::message::Header {
        key: headers::INGEST_ID,
        value: Some("forged"),
    });
    producer
        .send(
            FutureRecord::<str, str>::to(&topic)
                .payload(&line)
                .headers(forged),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}
