//! Stage throughput: each stage (parse at-least-once and exactly-once, enrich) against a
//! bare rdkafka consume→produce pass-through of the same input records (no transform) in
//! the same run, on the same broker. Every pass starts a fresh consumer group and ends
//! when a `read_committed` reader has seen all its outputs. Passes alternate for a few
//! rounds and their medians are compared.
//!
//! Run with the stack up: `cargo run --release -p sluice-bench --bin stages`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, Producer, ThreadedProducer,
};

use sluice::Config;
use sluice_bench::{median, rate, report};
use tokio_util::sync::CancellationToken;

/// Stages benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Raw records per pass.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Alternating rounds of every pass.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    sluice_core::telemetry::init_logging();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

/// A config whose topics and groups are new (`tag` keeps passes apart), reading `raw`
/// (or a new raw topic).
async fn namespace(tag: &str, raw: Option<&str>) -> Result<Config> {
    let mut config = sluice_tests::stack_config();
    config
        .kafka
        .consumer
        .insert("session.timeout.ms".into(), "6000".into());
    config = config.namespaced(&sluice_tests::unique(tag), "unused");
    if let Some(raw) = raw {
        config.topics.raw = raw.to_string();
    }
    sluice_tests::create_topics(&config).await;
    Ok(config)
}

async fn produce_raw(config: &Config, n: usize) -> Result<()> {
    let producer: FutureProducer = config.kafka.producer_config().create()?;
    let received = sluice_core::now_ms().to_string();
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("ev-{i}");
        let line = format!(
            r#"{{"user_id":"u{}","type":"page_view","ts":{},"url":"/p/{}","user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36","ip":"10.1.2.{}"}}"#,
            i % 5000,
            1_795_428_000_000u64 + i as u64,
            i % 40,
            i % 250
        );
        let h = sluice_tests::raw_headers("acme", &id, &received);
        loop {
            let rec = FutureRecord::to(&config.topics.raw)
                .key(&id)
                .payload(&line)
                .headers(h.clone());
            match producer.send_result(rec) {
                Ok(d) => {
                    acks.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for a in acks {
        a.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The baseline: consume `input` in a fresh group and produce every record unchanged to
/// `output`; done when a reader has seen all `n` there.
async fn pass_through(config: &Config, input: &str, output: &str, n: usize) -> Result<Duration> {
    let started = Instant::now();
    let (c, i, o) = (config.clone(), input.to_string(), output.to_string());
    let copy = tokio::spawn(async move { copy(&c, &i, &o, n).await });
    count_until(config, output, n).await?;
    let elapsed = started.elapsed();
    copy.await??;
    Ok(elapsed)
}

async fn copy(config: &Config, input: &str, output: &str, n: usize) -> Result<()> {
    let consumer: StreamConsumer = config
        .kafka
        .consumer_config(&sluice_tests::unique("b-copy-"))
        .create()?;
    consumer.subscribe(&[input])?;
    // The leanest produce path: no per-record delivery future; one flush at the end.
    let producer: ThreadedProducer<DefaultProducerContext> =
        config.kafka.producer_config().create()?;
    for _ in 0..n {
        let m = consumer.recv().await?;
        let mut rec = BaseRecord::to(output).payload(m.payload().unwrap_or_default());
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(h) = m.headers() {
            rec = rec.headers(h.detach());
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    tokio::task::block_in_place(|| producer.flush(Duration::from_secs(60)))?;
    Ok(())
}

/// One stage in a fresh group until every output reached `output`.
async fn run_stage(config: &Config, name: &str, output: &str, n: usize) -> Result<Duration> {
    let name = sluice_tests::stage(name);
    let started = Instant::now();
    let stop = CancellationToken::new();
    let (c, s) = (config.clone(), stop.clone());
    let tasks = vec![tokio::spawn(async move { name.run(&c, s).await })];
    // Done when a read_committed reader has seen every output (a transaction's records
    // count only once committed).
    count_until(config, output, n).await?;
    let elapsed = started.elapsed();
    stop.cancel();
    for t in tasks {
        t.await.context("stage task")??;
    }
    Ok(elapsed)
}

/// Read `topic` from the beginning, `read_committed`, until `n` records were seen.
async fn count_until(config: &Config, topic: &str, n: usize) -> Result<()> {
    let mut c = config
        .kafka
        .consumer_config(&sluice_tests::unique("b-reader-"));
    c.set("isolation.level", "read_committed");
    let reader: StreamConsumer = c.create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..config.topics.partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    reader.assign(&tpl)?;
    let mut seen = 0;
    while seen < n {
        reader.recv().await?;
        seen += 1;
    }
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let n = args.events;
    let source = namespace("b-src-", None).await?;
    let raw = source.topics.raw.clone();
    produce_raw(&source, n)
        .await
        .context("producing the raw records")?;
    println!("{n} raw records on {raw}");
    // The parsed records enrich reads: the output of one parse pass, complete.
    let parsed_src = namespace("b-parsed-", Some(&raw)).await?;
    run_stage(&parsed_src, "parse", &parsed_src.topics.parsed, n).await?;
    let parsed = parsed_src.topics.parsed.clone();
    let mut r: [Vec<f64>; 5] = Default::default();
    for round in 0..args.rounds {
        let c = namespace("b-pt-", Some(&raw)).await?;
        r[0].push(rate(n, pass_through(&c, &raw, &c.topics.parsed, n).await?));
        let c = namespace("b-parse-", Some(&raw)).await?;
        r[1].push(rate(n, run_stage(&c, "parse", &c.topics.parsed, n).await?));
        let mut c = namespace("b-eos-", Some(&raw)).await?;
        c.parse.exactly_once = true;
        r[2].push(rate(n, run_stage(&c, "parse", &c.topics.parsed, n).await?));
        let mut c = namespace("b-pt2-", None).await?;
        c.topics.parsed = parsed.clone();
        r[3].push(rate(
            n,
            pass_through(&c, &parsed, &c.topics.enriched, n).await?,
        ));
        let mut c = namespace("b-enrich-", None).await?;
        c.topics.parsed = parsed.clone();
        r[4].push(rate(
            n,
            run_stage(&c, "enrich", &c.topics.enriched, n).await?,
        ));
        println!(
            "round {}: raw pass-through {:.0}/s, parse {:.0}/s, parse exactly-once {:.0}/s; parsed pass-through {:.0}/s, enrich {:.0}/s",
            round + 1, r[0][round], r[1][round], r[2][round], r[3][round], r[4][round]
        );
    }
    let [mut raw_pt, mut parse, mut eos, mut parsed_pt, mut enrich] = r;
    let base = median(&mut raw_pt);
    report(
        "parse (at-least-once)",
        "pass-through of raw",
        base,
        median(&mut parse),
        0.6,
    );
    report(
        "parse (exactly-once)",
        "pass-through of raw",
        base,
        median(&mut eos),
        0.5,
    );
    report(
        "enrich (at-least-once)",
        "pass-through of parsed",
        median(&mut parsed_pt),
        median(&mut enrich),
        0.6,
    );
    Ok(())
}
