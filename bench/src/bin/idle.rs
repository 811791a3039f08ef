//! What an idle pipeline costs: ingest, parse, enrich, sessionize and the four sinks as
//! deployed (each its own `sluice` process), started, caught up and then left without
//! traffic. Reports each process's CPU as a share of one core over the idle window,
//! against a bare librdkafka consumer subscribed to an empty topic in the same window
//! (the floor any Kafka consumer pays for heartbeats and empty fetches), and the broker's.
//! Goal: at most 2 % of a core per component.
//!
//! `cargo build --release -p sluice -p sluice-bench && target/release/idle --seconds 60`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use sluice::components::{self, Kind};
use sluice_bench::baselines::drop_pipeline;
use sluice_bench::processes::{pipeline_config, ready, spawn, until_stopped, Process};
use sluice_bench::procstat::{cpu_seconds, service_pid};
use sluice_bench::{results_path, write_json};

/// The goal: each component's share of one core while idle.
const GOAL_SHARE_OF_A_CORE: f64 = 0.02;

/// Idle cost of the pipeline.
#[derive(Debug, Parser)]
struct Args {
    /// How long the idle window lasts, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Where to write the results as JSON (default: target/bench-results/idle-<time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One process's idle CPU.
#[derive(Debug, Serialize)]
struct Idle {
    process: String,
    share_of_a_core: f64,
    ratio_to_bare_consumer: f64,
    meets_goal: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (config, _key) = pipeline_config()?;
    sluice_tests::create_topics(&config).await;
    let logs = std::env::temp_dir().join(sluice_tests::unique("bench-idle-"));
    std::fs::create_dir_all(&logs)?;
    let config_file = logs.join("sluice.toml");
    std::fs::write(&config_file, toml::to_string(&config)?)?;
    let mut procs = vec![spawn("ingest", &["ingest"], &config_file, &logs)?];
    for c in components::COMPONENTS {
        let verb = if c.kind == Kind::Stage {
            "stage"
        } else {
            "sink"
        };
        procs.push(spawn(c.name, &[verb, c.name], &config_file, &logs)?);
    }
    let result = until_stopped(measure(&args, &config, &mut procs, &logs)).await;
    for p in procs {
        p.stop();
    }
    drop_pipeline(&config).await;
    let _ = std::fs::remove_dir_all(&logs);
    let idle = result?;
    let path = results_path("idle", args.json)?;
    write_json(
        &path,
        &serde_json::json!({ "bench": "idle", "seconds": args.seconds, "processes": idle }),
    )?;
    Ok(())
}

async fn measure(
    args: &Args,
    config: &sluice::Config,
    procs: &mut [Process],
    logs: &std::path::Path,
) -> Result<Vec<Idle>> {
    let http = reqwest::Client::new();
    ready(&http, procs, logs).await?;
    // The bare baseline: a consumer in a group of its own on one of the pipeline's
    // (empty) topics, polled as an application would.
    let bare: BaseConsumer = config
        .kafka
        .consumer_config(&sluice_tests::unique("bench-idle-bare-"))
        .create()?;
    bare.subscribe(&[&config.topics.raw])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_bare = stop.clone();
    let bare_thread = std::thread::spawn(move || {
        while !stop_bare.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = bare.poll(Duration::from_millis(100));
        }
    });
    // Let every group join and settle before the window opens.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let own = std::process::id() as i32;
    let broker = service_pid("kafka");
    let before: Vec<f64> = procs
        .iter()
        .map(|p| cpu_seconds(p.pid()))
        .collect::<Result<_>>()?;
    let own_before = cpu_seconds(own)?;
    let broker_before = broker.map(cpu_seconds).transpose()?;
    let started = Instant::now();
    println!(
        "idle for {} s: {} processes, a bare consumer and the broker",
        args.seconds,
        procs.len()
    );
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let window = started.elapsed().as_secs_f64();
    let own_share = (cpu_seconds(own)? - own_before) / window;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    bare_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the bare consumer's thread panicked"))?;
    // This process does nothing else in the window than run the bare consumer (and a
    // timer), so its CPU is the bare consumer's.
    let floor = own_share.max(1e-6);
    let mut out = Vec::new();
    println!(
        "{:<16} {:>14} {:>22} {:>6}",
        "process", "% of a core", "ratio to bare consumer", "goal"
    );
    let mut row = |name: String, share: f64, goal: bool| {
        println!(
            "{:<16} {:>13.2}% {:>22.2} {:>6}",
            name,
            share * 100.0,
            share / floor,
            if !goal {
                "—"
            } else if share <= GOAL_SHARE_OF_A_CORE {
                "met"
            } else {
                "MISSED"
            }
        );
        out.push(Idle {
            process: name,
            share_of_a_core: share,
            ratio_to_bare_consumer: share / floor,
            meets_goal: share <= GOAL_SHARE_OF_A_CORE,
        });
    };
    row("bare consumer".into(), own_share, false);
    for (p, b) in procs.iter().zip(before) {
        let share = (cpu_seconds(p.pid()).context(p.name)? - b) / window;
        row(p.name.to_string(), share, true);
    }
    if let (Some(pid), Some(b)) = (broker, broker_before) {
        row(
            "kafka broker".into(),
            (cpu_seconds(pid)? - b) / window,
            false,
        );
    }
    Ok(out)
}
