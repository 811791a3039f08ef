//! Ingest throughput: events/s through HTTP (NDJSON batches) to acked Kafka records,
//! with the ingest server on one core, against a bare rdkafka producer writing the same
//! records (same bytes, keys and headers) in the same run, on the same broker. The two
//! passes alternate for a few rounds and their medians are compared.
//!
//! Run with the stack up: `cargo run --release -p sluice-bench --bin ingest`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use futures::stream::{self, StreamExt};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_bench::baselines::drop_topics;
use sluice_bench::{rate, timed, write_json, Rounds};
use sluice_core::kafka;
use sluice_ingest::config::ApiKey;
use sluice_ingest::{Ingest, RawHeaders};
use tokio_util::sync::CancellationToken;

/// Ingest benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Events per measured pass.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Lines per HTTP request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// HTTP requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Rounds of both passes (the default keeps a rerun's ratio within about ±0.05).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    sluice_core::telemetry::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// The bare baseline: produce every line with the headers ingest would set; wait for all acks.
async fn bare_pass(producer: &FutureProducer, topic: &str, lines: &[String]) -> Result<()> {
    let received = sluice_core::now_ms().to_string();
    let mut acks = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let id = uuid::Uuid::now_v7().to_string();
        let key = format!("acme:user-{}", i % 5000);
        let h = RawHeaders {
            tenant: "acme",
            source: "http",
            content_type: "application/x-ndjson",
            received_at_ms: &received,
            ingest_id: &id,
            event_id: &id,
        }
        .to_headers();
        loop {
            let rec = FutureRecord::to(topic)
                .key(&key)
                .payload(line.as_bytes())
                .headers(h.clone());
            match producer.send_result(rec) {
                Ok(d) => {
                    acks.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
            }
        }
    }
    for a in acks {
        a.await
            .ok()
            .and_then(|r| r.ok())
            .context("bare delivery failed")?;
    }
    Ok(())
}

/// Post every body to ingest, `concurrency` at a time; every answer must be 202.
async fn http_pass(
    client: &reqwest::Client,
    url: &str,
    bodies: &[String],
    concurrency: usize,
) -> Result<()> {
    let results: Vec<Result<()>> = stream::iter(bodies)
        .map(|body| async move {
            let resp = client
                .post(url)
                .bearer_auth("bench-key")
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
                .await?;
            anyhow::ensure!(
                resp.status().as_u16() == 202,
                "ingest answered {}",
                resp.status()
            );
            Ok(())
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn run(args: Args) -> Result<()> {
    let mut config = sluice_tests::stack_config();
    let lines: Vec<String> = (0..args.events)
        .map(|i| {
            format!(
                r#"{{"user_id":"user-{}","type":"page_view","ts":{},"url":"/docs/page-{}","session_id":"s-{}"}}"#,
                i % 5000,
                1_795_428_000_000u64 + i as u64,
                i % 50,
                i % 20000
            )
        })
        .collect();
    let base_topic = sluice_tests::unique("bench-bare-");
    let http_topic = sluice_tests::unique("bench-http-");
    let topics: Vec<(String, String)> = [&base_topic, &http_topic]
        .iter()
        .map(|t| (t.to_string(), "3600000".into()))
        .collect();
    kafka::create_topics(&config.kafka, 6, 1, &topics)
        .await
        .context("creating topics")?;

    // Same producer settings as ingest. Warm the broker up first.
    let producer: FutureProducer = config.kafka.producer_config().create()?;
    bare_pass(&producer, &base_topic, &lines[..lines.len().min(20_000)]).await?;

    // Sluice ingest on a current-thread runtime of its own: one core.
    config.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.ingest.api_keys = vec![ApiKey {
        tenant: "acme".into(),
        key: "bench-key".into(),
    }];
    config.ingest.max_lines = args.batch;
    let ingest = Ingest::new(
        &config.kafka,
        &http_topic,
        config.topics.max_event_bytes,
        config.ingest.clone(),
    )?;
    let stop = CancellationToken::new();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server_stop = stop.clone();
    let server = std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (listener, addr) = ingest.bind().await?;
            addr_tx.send(addr)?;
            Arc::clone(&ingest)
                .serve(listener, async move { server_stop.cancelled().await })
                .await?;
            anyhow::Ok(())
        })
    });
    let addr: SocketAddr = addr_rx.recv()?;
    let url = format!("http://{addr}/v1/events");
    let bodies: Vec<String> = lines.chunks(args.batch).map(|c| c.join("\n")).collect();
    let client = reqwest::Client::new();

    let mut rounds = Rounds::new("sluice ingest (HTTP, 1 core)", "bare rdkafka producer");
    for round in 1..=args.rounds.max(1) {
        let (r, t) = timed(bare_pass(&producer, &base_topic, &lines)).await;
        r?;
        let bare = rate(args.events, t);
        let (r, t) = timed(http_pass(&client, &url, &bodies, args.concurrency)).await;
        r?;
        let http = rate(args.events, t);
        println!(
            "round {round}: bare producer {bare:.0}/s, ingest {http:.0}/s ({:.2})",
            http / bare
        );
        rounds.push(bare, http);
    }
    stop.cancel();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    drop_topics(&config, &[&base_topic, &http_topic]).await;

    println!(
        "ingest benchmark: {} events x {} rounds, NDJSON batches of {}, {} requests in flight",
        args.events, args.rounds, args.batch, args.concurrency
    );
    let verdict = rounds.report(0.7);
    if let Some(path) = &args.json {
        write_json(
            path,
            &serde_json::json!({"bench": "ingest", "events": args.events, "ingest_vs_producer": verdict}),
        )?;
    }
    Ok(())
}
