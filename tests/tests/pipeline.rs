//! End to end on the real local stack: HTTP ingest → raw topic → parse → enrich →
//! TimescaleDB and Elasticsearch, with exact counts at every layer.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::time::Duration;

use rdkafka::message::Message;
use sluice::demo::{self, DemoOptions};
use sluice_core::{headers, kafka};
use sluice_tests::{stack_config, stack_var, unique};

fn options(seed: u64) -> DemoOptions {
    DemoOptions {
        users: 8,
        tenants: 2,
        seed,
        timeout: Duration::from_secs(120),
    }
}

/// TimescaleDB (PGlite) with continuous aggregates, and the first ES-API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_into_timescale_and_elasticsearch() {
    let mut config = stack_config();
    let name = unique("e2e");
    config = config.namespaced(&format!("t-{name}"), &name);
    let (summary, stream) = demo::run_pipeline(config.clone(), &options(11))
        .await
        .unwrap();

    let good = (stream.lines - stream.malformed) as u64;
    assert!(
        stream.malformed > 0 && good > 100,
        "generator made {stream:?}"
    );
    assert_eq!(summary.ingested, stream.lines as u64);
    assert_eq!(summary.raw, stream.lines as u64);
    assert_eq!(summary.parse_dead_lettered(), stream.malformed as u64);
    assert_eq!(summary.parsed, good);
    assert_eq!(summary.enriched, good);
    assert_eq!(summary.db_rows, good, "rows in TimescaleDB");
    assert_eq!(summary.es_docs, good, "documents in Elasticsearch");
    assert!(summary.timescale, "the PGlite server has timescaledb");
    assert_eq!(summary.db_page_view_rows, stream.page_views as u64);
    assert_eq!(
        summary.cagg_views, stream.page_views as u64,
        "views in the hourly continuous aggregate"
    );
    assert!(
        summary.checks().iter().all(|(_, ok)| *ok),
        "{:?}",
        summary.checks()
    );

    // Every malformed line is in the parse DLQ, byte for byte, with its reason.
    let t = &config.topics;
    let (k, dlq) = (config.kafka.clone(), t.dlq(&t.raw));
    let dead =
        tokio::task::spawn_blocking(move || kafka::read_all(&k, &dlq, Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(dead.len(), stream.malformed);
    for d in &dead {
        let h = d.headers();
        let payload = std::str::from_utf8(d.payload().unwrap()).unwrap();
        assert!(
            stream.malformed_lines.iter().any(|l| l == payload),
            "dead letter {payload:?} was not a malformed line"
        );
        assert_eq!(headers::get(h, headers::DLQ_STAGE), Some("parse"));
        assert_eq!(headers::get(h, headers::DLQ_TOPIC), Some(t.raw.as_str()));
        assert!(headers::get(h, headers::DLQ_OFFSET)
            .unwrap()
            .parse::<i64>()
            .is_ok());
        assert!(
            headers::get(h, headers::TENANT).is_some(),
            "original headers are kept"
        );
        let class = headers::get(h, headers::DLQ_ERROR_CLASS).unwrap();
        let reason = headers::get(h, headers::DLQ_REASON).unwrap();
        match class {
            "decode" => assert!(reason.starts_with("malformed JSON"), "{reason}"),
            "validation" => assert!(
                reason.contains("field `") || reason.contains("JSON object"),
                "{reason}"
            ),
            other => panic!("unexpected class {other}: {reason}"),
        }
    }
}

/// Plain PostgreSQL 15 (no timescaledb: ordinary tables) and the second ES-API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_into_plain_postgres_and_opensearch() {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.timescale.pool_size = 4;
    config.elasticsearch.url = stack_var("SLUICE_STACK_ES_ALT_URL");
    let name = unique("pg");
    config = config.namespaced(&format!("t-{name}"), &name);
    let (summary, stream) = demo::run_pipeline(config, &options(12)).await.unwrap();
    let good = (stream.lines - stream.malformed) as u64;
    assert!(!summary.timescale);
    assert_eq!(summary.ingested, stream.lines as u64);
    assert_eq!(summary.parse_dead_lettered(), stream.malformed as u64);
    assert_eq!(summary.db_rows, good);
    assert_eq!(summary.db_page_view_rows, stream.page_views as u64);
    assert_eq!(summary.es_docs, good);
}
