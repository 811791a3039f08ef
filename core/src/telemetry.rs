//! Logging and the Prometheus metrics endpoint shared by every Sluice process.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

/// Start logging to stderr, filtered by `RUST_LOG` (default `info`). Safe to call twice.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,tokio_postgres=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

/// Install the global Prometheus recorder; with `listen`, also serve `/metrics` there.
/// Returns a handle that renders the metrics (for an HTTP route of the process's own).
pub fn install_metrics(listen: Option<SocketAddr>) -> Result<PrometheusHandle, BuildError> {
    let recorder = match listen {
        Some(addr) => {
            let (recorder, exporter) = PrometheusBuilder::new().with_http_listener(addr).build()?;
            tokio::spawn(exporter);
            recorder
        }
        None => PrometheusBuilder::new().build_recorder(),
    };
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(BuildError::FailedToSetGlobalRecorder)?;
    Ok(handle)
}
