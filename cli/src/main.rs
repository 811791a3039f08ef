//! `sluice`: run ingest, a stage or a sink, manage topics, or run the demo.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sluice::demo::{self, DemoOptions};
use sluice::pipeline::{self, SinkName, StageName};
use sluice_core::telemetry;

/// Sluice: a Kafka-based multi-stage stream processor.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    /// Config file (TOML). Environment variables `SLUICE__SECTION__KEY` override it.
    #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP ingest endpoint.
    Ingest,
    /// Run a stage (its own consumer group).
    Stage {
        /// Which stage.
        #[arg(value_enum)]
        name: StageName,
    },
    /// Run a sink (its own consumer group).
    Sink {
        /// Which sink.
        #[arg(value_enum)]
        name: SinkName,
    },
    /// Create the pipeline's missing topics, then report how each one on the broker
    /// differs from the configuration (partitions, retention, cleanup policy).
    Topics {
        /// Only report; create nothing. Exits non-zero when a topic is missing or differs.
        #[arg(long)]
        check: bool,
    },
    /// Run the demo pipeline end to end on a generated clickstream.
    Demo {
        /// Users per tenant.
        #[arg(long, default_value_t = 40)]
        users: usize,
        /// Tenants (1 to 5).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=5))]
        tenants: u8,
        /// Seed of the clickstream generator.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Longest wait, in seconds, for the pipeline to catch up.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging();
    let config = pipeline::load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Ingest => {
            let handle = telemetry::install_metrics(None).context("metrics")?;
            let shutdown = pipeline::shutdown_on_signals();
            let (_, task) = pipeline::start_ingest(&config, Some(handle), shutdown).await?;
            task.await??;
        }
        Command::Stage { name } => {
            telemetry::install_metrics(config.metrics.listen).context("metrics endpoint")?;
            let stats =
                pipeline::run_stage_named(&config, name, pipeline::shutdown_on_signals()).await?;
            tracing::info!(?stats, "done");
        }
        Command::Sink { name } => {
            telemetry::install_metrics(config.metrics.listen).context("metrics endpoint")?;
            let stats =
                pipeline::run_sink_named(&config, name, pipeline::shutdown_on_signals()).await?;
            tracing::info!(?stats, "done");
        }
        Command::Topics { check } => {
            let created = if check {
                Vec::new()
            } else {
                sluice_core::kafka::ensure_topics(&config.kafka, &config.topics).await?
            };
            let report = sluice_core::kafka::check_topics(&config.kafka, &config.topics).await?;
            let mut bad = 0;
            for t in &report {
                let state = match (
                    created.contains(&t.topic),
                    t.exists,
                    t.differences.is_empty(),
                ) {
                    (true, _, _) => "created".to_string(),
                    (_, true, true) => "ok".to_string(),
                    _ => {
                        bad += 1;
                        t.differences.join("; ")
                    }
                };
                println!("{:<40} {state}", t.topic);
            }
            if check && bad > 0 {
                bail!("{bad} topic(s) missing or different from the configuration");
            }
        }
        Command::Demo {
            users,
            tenants,
            seed,
            timeout,
        } => {
            let mut config = config;
            let run = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
            demo::use_namespace(&mut config, &format!("demo-{run}"), "demo");
            // Sinks use a fixed schema and index prefix so each run replaces the last one.
            config.elasticsearch.index_prefix = "demo-events".into();
            if config.enrich.geo_csv.is_none() {
                config.enrich.geo_csv =
                    Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/ip-networks.csv").into());
            }
            let options = DemoOptions {
                users,
                tenants: tenants.into(),
                seed,
                timeout: Duration::from_secs(timeout),
            };
            let (summary, _) = demo::run_pipeline(config, &options).await?;
            summary.print();
            if summary.checks().iter().any(|(_, ok)| !ok) {
                bail!("the counts do not add up");
            }
        }
    }
    Ok(())
}
