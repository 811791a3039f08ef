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
