//! The pipeline's `sluice` processes, as a benchmark runs them: each with the config
//! file, its metrics on a port of its own and its log in a directory.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::lag::Watched;
use anyhow::{bail, ensure, Context, Result};
use sluice::Config;
use sluice_ingest::config::ApiKey;
use sluice_sinks::timescale::config::DbMode;

/// A `sluice` process of the pipeline.
pub struct Process {
    /// Its component name.
    pub name: &'static str,
    /// Where its metrics are served.
    pub metrics: SocketAddr,
    /// The process.
    pub child: Child,
}

impl Process {
    /// Its process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The text of its `/metrics`.
    pub async fn scrape(&self, http: &reqwest::Client) -> Result<String> {
        Ok(http
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await?
            .text()
            .await?)
    }

    /// SIGTERM, then wait; SIGKILL after 30 s.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on the loopback.
pub fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The `sluice` binary next to this one (the same target directory and profile).
pub fn sluice_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("sluice");
    ensure!(
        bin.exists(),
        "{} is missing: cargo build --release -p sluice",
        bin.display()
    );
    Ok(bin)
}

/// Start `sluice <args>` with the config file, its metrics on a port of its own and its
/// log in `logs`.
pub fn spawn(name: &'static str, args: &[&str], config: &Path, logs: &Path) -> Result<Process> {
    let metrics = free_port()?;
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = Command::new(sluice_bin()?)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("SLUICE_STACK_ENV")
        .env("SLUICE__METRICS__LISTEN", metrics.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting sluice {}", args.join(" ")))?;
    Ok(Process {
        name,
        metrics,
        child,
    })
}

/// Wait until every process answers `/readyz` with 200.
pub async fn ready(http: &reqwest::Client, procs: &mut [Process], logs: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    for p in procs.iter_mut() {
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "{} exited ({status}); see {}",
                    p.name,
                    logs.join(format!("{}.log", p.name)).display()
                );
            }
            let url = format!("http://{}/readyz", p.metrics);
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{} not ready after 2 minutes",
                p.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// The pipeline's configuration: fresh topics, groups, schema and indices; the
/// TimescaleDB sink on PostgreSQL 15 (the TimescaleDB here is a single-session WASM
/// build, not a server to measure); one API key.
pub fn pipeline_config() -> Result<(Config, String)> {
    let prefix = sluice_tests::unique("bp-");
    let mut config = sluice_tests::stack_config().namespaced(&prefix, &prefix.replace('-', "_"));
    config.timescale.url = sluice_tests::stack_var("SLUICE_STACK_PG_URL");
    config.timescale.mode = DbMode::Postgres;
    config.timescale.pool_size = crate::CHART_PG_CONNECTIONS;
    let key = sluice_tests::unique("key-");
    config.ingest.api_keys = vec![ApiKey {
        tenant: "acme".into(),
        key: key.clone().into(),
    }];
    config.ingest.listen = free_port()?;
    Ok((config, key))
}

/// Start the deployed chain with `config` (written to `logs/sluice.toml`): ingest, parse,
/// enrich and both event sinks, each its own process. Returns them and each consumer's
/// group and input topic.
pub fn spawn_pipeline(config: &Config, logs: &Path) -> Result<(Vec<Process>, Vec<Watched>)> {
    use sluice::components::{self, Kind};
    let config_file = logs.join("sluice.toml");
    std::fs::write(&config_file, toml::to_string(config)?)?;
    let mut procs = vec![spawn("ingest", &["ingest"], &config_file, logs)?];
    let mut groups = Vec::new();
    for (kind, name) in [
        (Kind::Stage, "parse"),
        (Kind::Stage, "enrich"),
        (Kind::Sink, "timescale"),
        (Kind::Sink, "elasticsearch"),
    ] {
        let c = components::find(kind, name).context("component in the registry")?;
        let verb = if kind == Kind::Stage { "stage" } else { "sink" };
        procs.push(spawn(c.name, &[verb, name], &config_file, logs)?);
        groups.push(Watched {
            component: c.name.to_string(),
            group: c.group(config).to_string(),
            topic: c.input(config).to_string(),
        });
    }
    Ok((procs, groups))
}

/// Run `work` until it ends or the bench is stopped (Ctrl-C, SIGTERM). Either way the
/// caller then stops the pipeline's processes and deletes what they made: a bench killed
/// mid-run used to leave them running against the stack, loading the next run.
pub async fn until_stopped<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let stop = sluice::pipeline::shutdown_on_signals();
    tokio::select! {
        r = work => r,
        () = stop.cancelled() => bail!("stopped by a signal before the end"),
    }
}
