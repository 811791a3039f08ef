//! Memory under a flood of the worst requests a client can send: the whole pipeline
//! (ingest → parse → enrich → the TimescaleDB and Elasticsearch sinks, each its own
//! `sluice` process, as deployed) while clients send, as fast as they are answered,
//! requests of the largest allowed shapes: 10,000 tiny lines with the longest
//! `X-Source`, bodies of lines at the largest event size, and bodies over the limits.
//!
//! Reports each component's peak resident memory against the Helm chart's default
//! limit (512 MiB) as a ratio, and the answers by status. The claim it checks: memory is
//! bounded by bytes (ingest's body budget and producer queue, the stages' in-flight
//! bytes, the sinks' batch bytes), not by what clients choose to send.
//!
//! `cargo build --release -p sluice -p sluice-bench && target/release/flood --seconds 300`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use serde::Serialize;
use sluice::components;
use sluice_bench::baselines::drop_pipeline;
use sluice_bench::processes::{
    pipeline_config, ready, sluice_bin, spawn_pipeline, until_stopped, Process,
};
use sluice_bench::procstat::rss_bytes;
use sluice_bench::{results_path, write_json};

/// The chart's default memory limit of every component.
const HELM_LIMIT_BYTES: u64 = 512 * 1024 * 1024;

/// Memory under hostile load.
#[derive(Debug, Parser)]
struct Args {
    /// How long the flood lasts, in seconds.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Clients sending at once.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Pause of each client after each answer, in milliseconds (0: as fast as answered).
    /// A pause the consumers keep up with measures the shapes without a backlog.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Where to write the results as JSON (default: target/bench-results/flood-<time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One component's memory.
#[derive(Debug, Clone, Serialize)]
struct Peak {
    component: &'static str,
    peak_rss_mib: f64,
    ratio_to_helm_limit: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    bench: &'static str,
    seconds: u64,
    clients: usize,
    pause_ms: u64,
    answers: BTreeMap<u16, u64>,
    events_accepted: u64,
    /// Each consumer group's lag when the flood ended: its backlog.
    lag_at_end: BTreeMap<String, i64>,
    peaks: Vec<Peak>,
}

/// The request shapes, taken in turn by each client.
fn bodies(max_lines: usize, max_event: usize, max_body: usize) -> Vec<(&'static str, Vec<u8>)> {
    let now = chrono::Utc::now().timestamp_millis();
    let tiny = format!(r#"{{"user_id":"u1","type":"click","ts":{now}}}"#);
    let many = vec![tiny.as_str(); max_lines].join("\n").into_bytes();
    // Lines just under the event size, as many as the body allows.
    let pad = max_event - 200;
    let long = format!(
        r#"{{"user_id":"u2","type":"click","ts":{now},"pad":"{}"}}"#,
        "x".repeat(pad)
    );
    let per_body = (max_body / (long.len() + 1)).max(1);
    let longs = vec![long.as_str(); per_body].join("\n").into_bytes();
    let over = vec![b'a'; max_body + 1];
    vec![
        ("many tiny lines", many.clone()),
        ("many tiny lines", many.clone()),
        ("many tiny lines", many),
        ("lines at the event size", longs),
        ("over the body limit", over),
    ]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    sluice_core::telemetry::init_logging();
    sluice_bin()?;
    let (config, key) = pipeline_config()?;
    sluice_tests::create_topics(&config).await;
    let logs = std::env::temp_dir().join(sluice_tests::unique("bench-flood-"));
    std::fs::create_dir_all(&logs)?;
    let (mut procs, _) = spawn_pipeline(&config, &logs)?;
    let http = reqwest::Client::new();
    let outcome = until_stopped(flood(&args, &config, &key, &http, &mut procs, &logs)).await;
    for p in procs {
        p.stop();
    }
    drop_pipeline(&config).await;
    let results = outcome?;
    println!("\n| component | peak RSS | of the Helm limit (512 MiB) |");
    println!("| --- | ---: | ---: |");
    for p in &results.peaks {
        println!(
            "| {} | {:.0} MiB | {:.2} |",
            p.component, p.peak_rss_mib, p.ratio_to_helm_limit
        );
    }
    println!(
        "answers by status: {:?}; events accepted: {}; lag at the end: {:?}",
        results.answers, results.events_accepted, results.lag_at_end
    );
    let path = results_path("flood", args.json)?;
    write_json(&path, &serde_json::to_value(&results)?)?;
    println!("process logs: {}", logs.display());
    Ok(())
}

async fn flood(
    args: &Args,
    config: &sluice::Config,
    key: &str,
    http: &reqwest::Client,
    procs: &mut [Process],
    logs: &std::path::Path,
) -> Result<Results> {
    ready(http, procs, logs).await?;
    let shapes = Arc::new(bodies(
        config.ingest.max_lines,
        config.topics.max_event_bytes,
        config.ingest.max_body_bytes,
    ));
    let source = "s".repeat(config.ingest.max_header_value_bytes);
    let url = format!("http://{}/v1/events", config.ingest.listen);
    let until = Instant::now() + Duration::from_secs(args.seconds);
    println!(
        "flooding for {} s with {} clients: {}",
        args.seconds,
        args.clients,
        shapes
            .iter()
            .map(|(name, b)| format!("{name} ({} KiB)", b.len() / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut clients = Vec::new();
    for c in 0..args.clients {
        let (http, url, key, source, shapes) = (
            http.clone(),
            url.clone(),
            key.to_string(),
            source.clone(),
            shapes.clone(),
        );
        let pause = Duration::from_millis(args.pause_ms);
        clients.push(tokio::spawn(async move {
            let mut answers: BTreeMap<u16, u64> = BTreeMap::new();
            let mut accepted = 0u64;
            let mut i = c;
            while Instant::now() < until {
                let (_, body) = &shapes[i % shapes.len()];
                i += 1;
                let sent = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/x-ndjson")
                    .header("x-source", &source)
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        *answers.entry(status).or_default() += 1;
                        if status == 202 {
                            let v: serde_json::Value = r.json().await.unwrap_or_default();
                            accepted += v["accepted"].as_u64().unwrap_or(0);
                        } else if status == 503 {
                            // As a client does: after Retry-After (1 s), but no longer.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    Err(_) => *answers.entry(0).or_default() += 1,
                }
                tokio::time::sleep(pause).await;
            }
            (answers, accepted)
        }));
    }
    // Sample every process's memory while the flood lasts.
    let mut peaks: BTreeMap<&'static str, u64> = BTreeMap::new();
    while Instant::now() < until {
        for p in procs.iter() {
            if let Ok((now, high)) = rss_bytes(p.pid()) {
                let peak = peaks.entry(p.name).or_default();
                *peak = (*peak).max(now).max(high);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut answers: BTreeMap<u16, u64> = BTreeMap::new();
    let mut events_accepted = 0;
    for c in clients {
        let (a, n) = c.await?;
        for (k, v) in a {
            *answers.entry(k).or_default() += v;
        }
        events_accepted += n;
    }
    for p in procs.iter() {
        if let Ok((_, high)) = rss_bytes(p.pid()) {
            let peak = peaks.entry(p.name).or_default();
            *peak = (*peak).max(high);
        }
    }
    let mut lag_at_end = BTreeMap::new();
    for c in components::COMPONENTS {
        if procs.iter().any(|p| p.name == c.name) {
            let (k, g, t) = (
                config.kafka.clone(),
                c.group(config).to_string(),
                c.input(config).to_string(),
            );
            let lag =
                tokio::task::spawn_blocking(move || sluice_core::kafka::lag(&k, &g, &t)).await??;
            lag_at_end.insert(c.name.to_string(), lag);
        }
    }
    Ok(Results {
        bench: "flood",
        seconds: args.seconds,
        clients: args.clients,
        pause_ms: args.pause_ms,
        answers,
        events_accepted,
        lag_at_end,
        peaks: procs
            .iter()
            .map(|p| {
                let bytes = peaks.get(p.name).copied().unwrap_or(0);
                Peak {
                    component: p.name,
                    peak_rss_mib: bytes as f64 / (1024.0 * 1024.0),
                    ratio_to_helm_limit: bytes as f64 / HELM_LIMIT_BYTES as f64,
                }
            })
            .collect(),
    })
}
