//! Logging, Prometheus metrics and the ops endpoint (`/metrics`, `/healthz`, `/readyz`)
//! shared by every Sluice process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of every `*_seconds` histogram: 1 ms to 5 minutes.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Buckets of the end-to-end latency: finer where a healthy pipeline's latencies lie
/// (tens of milliseconds to a few seconds), so that its p50, p99 and p99.9 are read
/// from a bucket a few tens of percent wide at most.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0,
    1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets of every `*_records` histogram (batch sizes).
const RECORDS_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Start logging readable text to stderr (stdout is for command output), filtered by
/// `RUST_LOG` (default `info`). Safe to call twice.
pub fn init_logging() {
    init_logging_as(crate::config::LogFormat::Text);
}

/// Start logging to stderr in `format`: text, one readable line per event, or JSON, one
/// object per line (time, level, message and the event's fields) for log pipelines.
/// Filtered by `RUST_LOG` (default `info`). Safe to call twice.
pub fn init_logging_as(format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,tokio_postgres=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    let _ = match format {
        crate::config::LogFormat::Text => builder.try_init(),
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// The Prometheus recorder with Sluice's histogram buckets; gauges not updated for
/// `idle` expire.
fn recorder(idle: Duration) -> Result<metrics_exporter_prometheus::PrometheusRecorder, BuildError> {
    // Histograms, not summaries, so they aggregate across replicas in Prometheus.
    Ok(PrometheusBuilder::new()
        .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(idle))
        // A full name takes precedence over the suffix below.
        .set_buckets_for_metric(
            Matcher::Full("sluice_end_to_end_latency_seconds".into()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_records".into()), RECORDS_BUCKETS)?
        .build_recorder())
}

/// Install the global Prometheus recorder for the process running `component` (e.g.
/// `stage parse`): it exports `sluice_build_info{version, component}` (1, what an
/// absence alert watches), keeps its histograms drained, and lets gauges not updated for
/// `idle` expire. Returns a handle that renders the metrics (for [`serve_ops`] or a route
/// of the process's own). Call from within a Tokio runtime.
pub fn install_metrics(component: &str, idle: Duration) -> Result<PrometheusHandle, BuildError> {
    let recorder = recorder(idle)?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(BuildError::FailedToSetGlobalRecorder)?;
    let upkeep = handle.clone();
    let info = metrics::gauge!(
        "sluice_build_info",
        "version" => env!("CARGO_PKG_VERSION"), "component" => component.to_string()
    );
    tokio::spawn(async move {
        // Refreshed well within the idle timeout, or it would expire between refreshes.
        let every = (idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            // Set again each time: it is a gauge, and idle gauges expire.
            info.set(1.0);
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Whether a process is ready for work (its readiness probe). Liveness is the ops server
/// answering at all.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Mark the process ready or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    /// Whether it is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// This process's readiness: the pipeline sets it once a stage or sink is about to consume
/// (after migrations or the index template), and [`serve_ops`] reports it.
pub fn process_readiness() -> &'static Readiness {
    static READY: std::sync::OnceLock<Readiness> = std::sync::OnceLock::new();
    READY.get_or_init(Readiness::default)
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listen` in the background. Returns the
/// bound address (useful with port 0).
pub async fn serve_ops(
    listen: SocketAddr,
    handle: PrometheusHandle,
    readiness: Readiness,
) -> std::io::Result<SocketAddr> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if readiness.get() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "ops endpoint stopped");
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    #[test]
    fn end_to_end_latency_has_its_finer_buckets() {
        let recorder = super::recorder(std::time::Duration::from_secs(30)).unwrap();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("sluice_end_to_end_latency_seconds", "sink" => "s").record(0.07);
            metrics::histogram!("sluice_sink_write_duration_seconds", "sink" => "s").record(0.07);
        });
        let text = handle.render();
        assert!(
            text.contains("sluice_end_to_end_latency_seconds_bucket{sink=\"s\",le=\"0.075\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("sluice_sink_write_duration_seconds_bucket{sink=\"s\",le=\"0.075\"}"),
            "other durations keep the general buckets: {text}"
        );
    }
}
