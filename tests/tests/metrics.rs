//! Every metric documented in docs/metrics.md, and every metric the Grafana dashboard and
//! the alert rules query, is exported by a running pipeline.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::time::Duration;

use sluice::demo::{self, DemoOptions};
use sluice_tests::{stack_config, stack_var, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_metrics_are_exported() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let handle =
        sluice_core::telemetry::install_metrics("test", std::time::Duration::from_secs(30))
            .unwrap();
    let readiness = sluice_core::telemetry::process_readiness().clone();
    sluice_core::telemetry::serve_ops(([127, 0, 0, 1], port).into(), handle, readiness)
        .await
        .unwrap();
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.elasticsearch.url = stack_var("SLUICE_STACK_ES_ALT_URL");
    config
        .kafka
        .consumer
        .insert("statistics.interval.ms".into(), "200".into());
    let name = unique("met");
    config = config.namespaced(&format!("t-{name}"), &name);
    let options = DemoOptions {
        users: 3,
        tenants: 2,
        seed: 3,
        timeout: Duration::from_secs(120),
    };
    demo::run_pipeline(config, &options).await.unwrap();

    // Ingest's requests go through HTTP in the demo; its counters share the recorder.
    let text = sluice_tests::metrics_text(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("the demo's metrics endpoint answers");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    let documented: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("sluice_"))
        .collect();
    assert!(documented.len() >= 15, "{documented:?}");
    let missing: Vec<&&str> = documented
        .iter()
        .filter(|n| !text.contains(&format!("\n{n}")))
        .collect();
    // Rebalance durations need a revocation, which a single run without replicas lacks;
    // transaction commits need an exactly-once stage, which the demo does not run.
    let missing: Vec<_> = missing
        .into_iter()
        .filter(|n| {
            **n != "sluice_consumer_rebalance_duration_seconds"
                && **n != "sluice_stage_transaction_commit_seconds"
                // Continuous aggregates need TimescaleDB; this run writes to PostgreSQL 15.
                && **n != "sluice_sink_aggregate_refreshes_total"
                // Only the sessionize stage skips records; the demo does not run it.
                && **n != "sluice_stage_skipped_total"
        })
        .collect();
    assert!(
        missing.is_empty(),
        "documented but not exported: {missing:?}\n{text}"
    );
    assert!(
        text.contains("sluice_end_to_end_latency_seconds_bucket"),
        "a histogram, not a summary"
    );

    // What the dashboard and the alerts query must exist, and be documented.
    let mut referenced = std::collections::BTreeSet::new();
    for file in ["files/dashboard.json", "files/alerts.yaml"] {
        let path = format!("{}/../helm/sluice/{file}", env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read_to_string(&path).unwrap();
        for (i, _) in body.match_indices("sluice_") {
            let name: String = body[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            referenced.insert(name);
        }
    }
    assert!(referenced.len() >= 10, "{referenced:?}");
    for name in &referenced {
        assert!(
            text.contains(&format!("\n{name}{{")) || text.contains(&format!("\n{name} ")),
            "{name} is queried by the dashboard or alerts but not exported"
        );
        let base = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(
            documented.contains(&base),
            "{base} is queried but not in docs/metrics.md"
        );
    }
}
