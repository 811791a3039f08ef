//! Process plumbing shared by the `sluice` subcommands, the demo and the tests: loading
//! the configuration, stopping on signals, and serving ingest. Stages and sinks start
//! through the registry ([`crate::components`]).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use sluice_ingest::Ingest;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::components::Config;

/// How long a process start waits for the brokers' first answer.
const REACH_KAFKA_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Reach the brokers before starting work. Settings the brokers refuse (a password, a
/// certificate, a protocol their listener does not speak) stop the process with the
/// setting named, instead of librdkafka retrying them for ever; brokers that do not
/// answer yet are only warned about, and the process waits for them as it runs.
pub async fn reach_kafka(config: &Config) -> Result<()> {
    let kafka = config.kafka.clone();
    let reached = tokio::task::spawn_blocking(move || {
        sluice_core::kafka_probe::probe(&kafka, REACH_KAFKA_WITHIN)
    })
    .await?;
    match reached {
        Ok(r) => {
            tracing::info!(
                brokers = r.brokers,
                protocol = config.kafka.security.protocol.as_str(),
                took_ms = r.took.as_millis() as u64,
                "kafka reached"
            );
            Ok(())
        }
        Err(e) if e.is_permanent() => Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "kafka not reachable yet; starting anyway");
            Ok(())
        }
    }
}

/// Start the HTTP ingest server; returns its address and the task serving it.
/// Its metrics are served on the ops port (`metrics.listen`), never on the public one.
pub async fn start_ingest(
    config: &Config,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<Result<()>>)> {
    let ingest = Ingest::new(
        &config.kafka,
        &config.topics.raw,
        config.topics.max_event_bytes,
        config.ingest.clone(),
    )?;
    let (listener, addr) = ingest
        .bind()
        .await
        .with_context(|| format!("binding {}", config.ingest.listen))?;
    tracing::info!(%addr, topic = %config.topics.raw, "ingest listening");
    let task = tokio::spawn(async move {
        ingest
            .serve(listener, async move { shutdown.cancelled().await })
            .await?;
        Ok(())
    });
    Ok((addr, task))
}

/// Load the configuration from `file` (if any) plus the stack settings and environment.
pub fn load_config(file: Option<&Path>) -> Result<Config> {
    Config::load(file).context("loading configuration")
}

/// A token cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}
