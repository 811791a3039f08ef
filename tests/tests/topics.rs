//! Topic creation and the check against the configuration, on the real broker.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use sluice::components::topics;
use sluice_core::kafka::{check_topics, ensure_topics};
use sluice_tests::{stack_config, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_missing_topics_and_reports_differences() {
    let mut config = stack_config();
    let p = unique("t-topics-");
    config = config.namespaced(&p, "unused");
    config.topics.partitions = 4;

    let before = check_topics(&config.kafka, &config.topics, &topics(&config))
        .await
        .unwrap();
    let wanted = topics(&config).len();
    assert_eq!(
        wanted, 8,
        "raw, parsed, enriched and sessions, with dead-letter topics"
    );
    assert_eq!(before.len(), wanted);
    assert!(before
        .iter()
        .all(|t| !t.exists && t.differences == ["missing"]));

    let created = ensure_topics(&config.kafka, &config.topics, &topics(&config))
        .await
        .unwrap();
    assert_eq!(created.len(), wanted);
    assert!(
        ensure_topics(&config.kafka, &config.topics, &topics(&config))
            .await
            .unwrap()
            .is_empty(),
        "idempotent"
    );
    let after = check_topics(&config.kafka, &config.topics, &topics(&config))
        .await
        .unwrap();
    assert!(
        after.iter().all(|t| t.exists && t.differences.is_empty()),
        "{after:?}"
    );

    // The raw topic keeps data longer than the others.
    config.topics.partitions = 2;
    config.topics.raw_retention_ms = 1234;
    let diff = check_topics(&config.kafka, &config.topics, &topics(&config))
        .await
        .unwrap();
    let raw = diff.iter().find(|t| t.topic == config.topics.raw).unwrap();
    assert_eq!(
        raw.differences,
        [
            "partitions: wanted 2, found 4",
            "retention.ms: wanted 1234, found 604800000"
        ]
    );
    let parsed = diff
        .iter()
        .find(|t| t.topic == config.topics.parsed)
        .unwrap();
    assert_eq!(parsed.differences, ["partitions: wanted 2, found 4"]);
}

/// Read `n` records of `topic` with `consumer`; the time from the first record to the last.
fn read_timed(consumer: &rdkafka::consumer::BaseConsumer, topic: &str, n: usize) -> f64 {
    use rdkafka::consumer::Consumer;
    consumer.subscribe(&[topic]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let (mut read, mut first) = (0, None);
    while read < n {
        assert!(std::time::Instant::now() < deadline, "read {read} of {n}");
        if let Some(Ok(_)) = consumer.poll(std::time::Duration::from_millis(100)) {
            first.get_or_insert_with(std::time::Instant::now);
            read += 1;
        }
    }
    first.unwrap().elapsed().as_secs_f64()
}

/// A consumer that fetches a bounded number of records ahead (every stage and sink)
/// reads a backlog about as fast as one with librdkafka's defaults. With the bound alone,
/// librdkafka waited its `fetch.queue.backoff.ms` (1 s) each time a partition's queue
/// reached it: about the bound's records a partition a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_prefetch_reads_a_backlog_at_full_speed() {
    const N: usize = 400_000;
    let mut config = stack_config();
    let p = unique("t-prefetch-");
    config = config.namespaced(&p, "unused");
    config.topics.partitions = 6;
    ensure_topics(&config.kafka, &config.topics, &topics(&config))
        .await
        .unwrap();
    let producer: rdkafka::producer::FutureProducer =
        config.kafka.producer_config().create().unwrap();
    let payload = "x".repeat(200);
    let mut acks = Vec::with_capacity(N);
    for i in 0..N {
        let key = i.to_string();
        let mut record = rdkafka::producer::FutureRecord::to(&config.topics.raw)
            .key(&key)
            .payload(payload.as_bytes());
        loop {
            match producer.send_result(record) {
                Ok(ack) => break acks.push(ack),
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
        }
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
    let (k, topic) = (config.kafka.clone(), config.topics.raw.clone());
    let (bounded, default) = tokio::task::spawn_blocking(move || {
        let bounded = k
            .prefetching_consumer_config(&unique("g-bounded-"), 1_000)
            .create()
            .unwrap();
        let default = k.consumer_config(&unique("g-default-")).create().unwrap();
        (
            read_timed(&bounded, &topic, N),
            read_timed(&default, &topic, N),
        )
    })
    .await
    .unwrap();
    let slowdown = bounded / default.max(1e-3);
    println!("a bounded prefetch read {N} records in {bounded:.3} s, librdkafka's default in {default:.3} s ({slowdown:.1}x)");
    // The old settings measured 22x slower here (1.04 s against 0.05 s for 120,000).
    assert!(slowdown < 5.0, "bounded prefetch {slowdown:.1}x slower");
}
