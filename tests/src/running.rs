//! Pipeline components running inside a test process, each stopped on its own, and a
//! client that posts to ingest.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice::components::Component;
use sluice::pipeline;
use sluice::Config;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A stage, sink or ingest running in this process until [`Running::stop`].
pub struct Running {
    stop: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Start a stage or sink with `config`.
    pub fn component(config: &Config, component: &'static Component) -> Self {
        let stop = CancellationToken::new();
        let (c, s) = (config.clone(), stop.clone());
        let handle = tokio::spawn(async move {
            component.run(&c, s).await?;
            Ok(())
        });
        Self { stop, handle }
    }

    /// Start the stage named `name` with `config`.
    pub fn stage(config: &Config, name: &str) -> Self {
        Self::component(config, crate::stage(name))
    }

    /// Start the sink named `name` with `config`.
    pub fn sink(config: &Config, name: &str) -> Self {
        Self::component(config, crate::sink(name))
    }

    /// Start ingest with `config` (listening where it says; port 0 picks one).
    pub async fn ingest(config: &Config) -> (SocketAddr, Self) {
        let stop = CancellationToken::new();
        let (addr, task) = pipeline::start_ingest(config, stop.clone())
            .await
            .expect("ingest starts");
        let handle = tokio::spawn(async move { task.await? });
        (addr, Self { stop, handle })
    }

    /// Stop it (as on SIGTERM) and wait; panics with its error if it failed.
    pub async fn stop(self) {
        self.stop.cancel();
        match self.handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("component failed: {e:#}"),
            Err(e) => panic!("component panicked: {e}"),
        }
    }
}

/// POST `lines` as NDJSON with `api_key`, retrying 503s and 429s as a client does, and
/// return the request's answer.
pub async fn post_lines(addr: SocketAddr, api_key: &str, lines: &[String]) -> serde_json::Value {
    let client = reqwest::Client::new();
    let body = lines.join("\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = client
            .post(format!("http://{addr}/v1/events"))
            .bearer_auth(api_key)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await
            .expect("ingest answers");
        let status = resp.status().as_u16();
        let answer: serde_json::Value = resp.json().await.unwrap_or_default();
        match status {
            202 => return answer,
            503 | 429 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            other => panic!("ingest answered {other}: {answer}"),
        }
    }
}
