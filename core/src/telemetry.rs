//! Logging and the Prometheus metrics endpoint shared by every Sluice process.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of every `*_seconds` histogram: 1 ms to 5 minutes.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Buckets of every `*_records` histogram (batch sizes).
const RECORDS_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Start logging to stderr (stdout is for command output), filtered by `RUST_LOG` (default `info`). Safe to call twice.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,tokio_postgres=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Install the global Prometheus recorder; with `listen`, also serve `/metrics` there.
/// Returns a handle that renders the metrics (for an HTTP route of the process's own).
pub fn install_metrics(listen: Option<SocketAddr>) -> Result<PrometheusHandle, BuildError> {
    // Histograms, not summaries, so they aggregate across replicas in Prometheus.
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_records".into()), RECORDS_BUCKETS)?;
    let recorder = match listen {
        Some(addr) => {
            let (recorder, exporter) = builder.with_http_listener(addr).build()?;
            tokio::spawn(exporter);
            recorder
        }
        None => builder.build_recorder(),
    };
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(BuildError::FailedToSetGlobalRecorder)?;
    Ok(handle)
}
