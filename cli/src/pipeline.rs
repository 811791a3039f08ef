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
