//! Soak: the whole pipeline under steady HTTP load for ten minutes while its parse group
//! churns and the broker restarts, then a count of every event in every layer.
//!
//! Ingest, parse (exactly-once), enrich and both event sinks run as `sluice` processes,
//! as deployed, fed by a paced HTTP load. Every `--churn` seconds a second parse member
//! joins or leaves, in turn: it joins, leaves with SIGTERM, joins again, is SIGKILLed.
//! Half-way through, the broker is stopped and started again (its data kept). Then the
//! load stops, every group catches up, and each layer is read back by event id (the ids
//! ingest generated, so the truth is the raw topic): the parsed topic with read_committed,
//! the enriched topic, the events table and the search index. Each must hold every raw
//! event, once. The enriched topic's repeats are reported, not failed: enrich runs
//! at-least-once, and the broker restart may make it repeat what it had not committed
//! (the sinks absorb those, and the count shows how many there were).
//!
//! The ratio printed is what the pipeline delivered against what was offered; a fault
//! that hit nothing live proves nothing, so each kill and the restart are reported with
//! the parse group's lag (records read but not committed) at that moment.
//!
//! `cargo build --release -p sluice -p sluice-bench && target/release/soak`

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rdkafka::message::Message;
use serde::Serialize;
use sluice::Config;
use sluice_bench::baselines::{drop_pipeline, raw_line};
use sluice_bench::processes::{
    pipeline_config, ready, sluice_bin, spawn, spawn_pipeline, until_stopped, Process,
};
use sluice_bench::{results_path, write_json};
use sluice_core::headers;
use sluice_sinks::{Selection, Stored};

/// Ten minutes of load, churn and a broker restart, then every layer counted.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds of load.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Offered load, events per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Lines per HTTP request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Seconds between parse members joining or leaving.
    #[arg(long, default_value_t = 30)]
    churn: u64,
    /// Where to write the results as JSON (default: target/bench-results/soak-<time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One fault and the parse group's uncommitted records when it landed.
#[derive(Debug, Clone, Serialize)]
struct Fault {
    at_s: f64,
    what: String,
    parse_lag: i64,
}

/// What one layer holds, by event id, against the raw topic.
#[derive(Debug, Clone, Serialize)]
struct Layer {
    name: &'static str,
    records: usize,
    missing: usize,
    repeated: usize,
    unknown: usize,
    strict: bool,
}

impl Layer {
    fn of(
        name: &'static str,
        strict: bool,
        raw: &HashMap<String, u32>,
        ids: &HashMap<String, u32>,
    ) -> Self {
        Self {
            name,
            records: ids.values().map(|&n| n as usize).sum(),
            missing: raw.keys().filter(|id| !ids.contains_key(*id)).count(),
            repeated: ids.values().filter(|&&n| n > 1).count(),
            unknown: ids.keys().filter(|id| !raw.contains_key(*id)).count(),
            strict,
        }
    }

    fn ok(&self) -> bool {
        self.missing == 0 && self.unknown == 0 && (self.repeated == 0 || !self.strict)
    }
}

#[derive(Debug, Serialize)]
struct Results {
    bench: &'static str,
    finished_at: String,
    duration_s: u64,
    offered_events: u64,
    accepted_events: u64,
    refused_requests: u64,
    raw_records: usize,
    delivered_ratio: f64,
    faults: Vec<Fault>,
    layers: Vec<Layer>,
}

/// Post `rate` events a second for `duration`, counting accepted lines and refused requests.
async fn load(
    http: reqwest::Client,
    url: String,
    key: String,
    rate: f64,
    batch: usize,
    duration: Duration,
) -> (u64, u64, u64) {
    let (accepted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let (mut offered, mut next) = (0u64, 0usize);
    let mut tasks = tokio::task::JoinSet::new();
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (rate * started.elapsed().as_secs_f64()) as u64;
        while offered + batch as u64 <= due {
            // Ingest (or the broker behind it) is behind: wait for a slot, as a client would.
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            offered += batch as u64;
            let body: String = (next..next + batch).map(|i| raw_line(i) + "\n").collect();
            next += batch;
            let (http, url, key) = (http.clone(), url.clone(), key.clone());
            let (accepted, refused) = (accepted.clone(), refused.clone());
            tasks.spawn(async move {
                if sluice_bench::post_ndjson(&http, &url, &key, body).await {
                    accepted.fetch_add(batch as u64, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    (
        offered,
        accepted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    )
}

/// The parse group's records read but not committed, now.
async fn parse_lag(config: &Config) -> i64 {
    let (k, g, t) = (
        config.kafka.clone(),
        config.parse.group.clone(),
        config.topics.raw.clone(),
    );
    tokio::task::spawn_blocking(move || sluice_core::kafka::lag(&k, &g, &t))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(-1)
}

/// Churn the parse group and restart the broker half-way, until `duration` has passed.
async fn faults(
    config: &Config,
    config_file: &std::path::Path,
    logs: &std::path::Path,
    churn: Duration,
    duration: Duration,
) -> Result<Vec<Fault>> {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut extra: Option<Process> = None;
    let mut step = 0u32;
    let mut restarted = false;
    let mut next_churn = started + churn;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let at_s = started.elapsed().as_secs_f64();
        if !restarted && started.elapsed() >= duration / 2 {
            restarted = true;
            let lag = parse_lag(config).await;
            tokio::task::spawn_blocking(|| {
                sluice_tests::faults::stack("stop", "kafka");
                std::thread::sleep(Duration::from_secs(5));
                sluice_tests::faults::stack("start", "kafka");
            })
            .await?;
            println!("{at_s:6.0} s  broker restarted (parse lag {lag})");
            // The churn goes on at its pace from here, without catching up at once.
            next_churn = Instant::now() + churn;
            out.push(Fault {
                at_s,
                what: "broker restart".into(),
                parse_lag: lag,
            });
            continue;
        }
        if Instant::now() < next_churn {
            continue;
        }
        next_churn += churn;
        let lag = parse_lag(config).await;
        let what = match (step % 4, extra.take()) {
            (0 | 2, None) => {
                extra = Some(spawn("parse-2", &["stage", "parse"], config_file, logs)?);
                "parse member joined"
            }
            (1, Some(p)) => {
                p.stop();
                "parse member left (SIGTERM)"
            }
            (3, Some(mut p)) => {
                p.child.kill()?;
                p.child.wait()?;
                "parse member SIGKILLed"
            }
            (_, p) => {
                extra = p;
                "nothing"
            }
        };
        step += 1;
        println!("{at_s:6.0} s  {what} (parse lag {lag})");
        out.push(Fault {
            at_s,
            what: what.into(),
            parse_lag: lag,
        });
    }
    if let Some(p) = extra {
        p.stop();
    }
    Ok(out)
}

/// Each event id of `topic` (read_committed), with how many records carry it.
async fn topic_ids(config: &Config, topic: &str) -> Result<HashMap<String, u32>> {
    let (k, t) = (config.kafka.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let mut ids: HashMap<String, u32> = HashMap::new();
        let complete = sluice_core::kafka::scan(&k, &t, None, Duration::from_secs(600), |m| {
            if let Some(id) = headers::get(m.headers(), headers::EVENT_ID) {
                *ids.entry(id.to_string()).or_default() += 1;
            }
        })?;
        if !complete {
            bail!("{t} not read to its end within 10 minutes");
        }
        Ok(ids)
    })
    .await?
}

fn stored_ids(rows: Vec<Stored>) -> HashMap<String, u32> {
    let mut ids: HashMap<String, u32> = HashMap::new();
    for r in rows {
        *ids.entry(r.event_id).or_default() += 1;
    }
    ids
}

/// Every layer by event id, against the raw topic's.
async fn count_layers(config: &Config) -> Result<(usize, Vec<Layer>)> {
    let t = &config.topics;
    let raw = topic_ids(config, &t.raw).await?;
    let raw_records = raw.values().map(|&n| n as usize).sum();
    let parsed = topic_ids(config, &t.parsed).await?;
    let enriched = topic_ids(config, &t.enriched).await?;
    let all = Selection::Received {
        from: 0,
        to: i64::MAX / 2,
        tenant: None,
    };
    let mut sinks = Vec::new();
    for sink in sluice::components::event_sinks() {
        let read = sink.read_stored.context("an event sink reads back")?;
        let ids = stored_ids(read(config.clone(), all.clone(), false).await?);
        sinks.push(Layer::of(sink.name, true, &raw, &ids));
    }
    let mut layers = vec![
        Layer::of("raw topic (server ids: unique)", true, &raw, &raw),
        Layer::of("parsed topic (read_committed)", true, &raw, &parsed),
        Layer::of("enriched topic (at-least-once)", false, &raw, &enriched),
    ];
    layers.extend(sinks);
    Ok((raw_records, layers))
}

/// Records of `topic` a `read_committed` reader finds between `group`'s committed offsets
/// and the end (the lag that counts), and the offsets between. Transaction markers (and
/// aborted records) after the last record a group was given are no records it can
/// read; librdkafka's position does not always move past a trailing marker, which
/// leaves a group one offset behind on such a partition.
fn readable_lag(config: &Config, group: &str, topic: &str) -> Result<(i64, i64)> {
    let ends = sluice_core::kafka::end_offsets(&config.kafka, topic)?;
    let committed: HashMap<i32, i64> =
        sluice_core::kafka::committed_offsets(&config.kafka, group, topic)?
            .into_iter()
            .collect();
    let ranges: Vec<sluice_core::kafka::PartitionRange> = ends
        .iter()
        .map(|&(partition, end)| sluice_core::kafka::PartitionRange {
            partition,
            start: committed.get(&partition).copied().unwrap_or(0).max(0),
            end,
        })
        .filter(|r| r.start < r.end)
        .collect();
    let offsets: i64 = ranges.iter().map(|r| r.end - r.start).sum();
    let mut readable = 0i64;
    let deadline = Instant::now() + Duration::from_secs(30);
    sluice_core::kafka::read_ranges(
        &config.kafka,
        topic,
        &ranges,
        || Instant::now() > deadline,
        |_| {
            readable += 1;
            Ok::<(), std::convert::Infallible>(())
        },
    )
    .map_err(|e| anyhow::anyhow!("reading {topic}: {e}"))?;
    Ok((readable, offsets))
}

/// Wait until every group of the pipeline has committed everything (at most 10 minutes).
async fn drain(config: &Config) -> Result<()> {
    let t = &config.topics;
    let deadline = Instant::now() + Duration::from_secs(600);
    for (group, topic) in [
        (&config.parse.group, &t.raw),
        (&config.enrich.group, &t.parsed),
        (&config.timescale.group, &t.enriched),
        (&config.elasticsearch.group, &t.enriched),
    ] {
        loop {
            let (c, g, tp) = (config.clone(), group.clone(), topic.clone());
            let (lag, offsets) =
                tokio::task::spawn_blocking(move || readable_lag(&c, &g, &tp)).await??;
            if lag == 0 {
                if offsets > 0 {
                    println!("{group}: caught up; the {offsets} offsets after its commits are transaction markers");
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("{group} still {lag} records behind after 10 minutes");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    Ok(())
}

async fn run(
    args: &Args,
    config: &Config,
    key: &str,
    procs: &mut [Process],
    logs: &std::path::Path,
) -> Result<Results> {
    let http = reqwest::Client::new();
    ready(&http, procs, logs).await?;
    let duration = Duration::from_secs(args.duration);
    println!(
        "soak: {:.0} events/s for {} s; a parse member joins or leaves every {} s; the broker restarts at {} s",
        args.rate,
        args.duration,
        args.churn,
        args.duration / 2
    );
    let loading = tokio::spawn(load(
        http.clone(),
        format!("http://{}/v1/events", config.ingest.listen),
        key.to_string(),
        args.rate,
        args.batch.max(1),
        duration,
    ));
    let faults = faults(
        config,
        &logs.join("sluice.toml"),
        logs,
        Duration::from_secs(args.churn.max(1)),
        duration,
    )
    .await?;
    let (offered, accepted, refused) = loading.await?;
    println!(
        "load done: {accepted} of {offered} events accepted, {refused} requests refused; draining"
    );
    drain(config).await?;
    let (raw_records, layers) = count_layers(config).await?;
    Ok(Results {
        bench: "soak",
        finished_at: chrono::Utc::now().to_rfc3339(),
        duration_s: args.duration,
        offered_events: offered,
        accepted_events: accepted,
        refused_requests: refused,
        raw_records,
        delivered_ratio: layers.last().map_or(0, |l| l.records) as f64 / offered.max(1) as f64,
        faults,
        layers,
    })
}

fn print_table(r: &Results) {
    println!();
    println!(
        "offered {} events, accepted {}, {} requests refused; raw records {}",
        r.offered_events, r.accepted_events, r.refused_requests, r.raw_records
    );
    let hit = r.faults.iter().filter(|f| f.parse_lag > 0).count();
    println!(
        "{} faults, {hit} of them while the parse group had uncommitted records",
        r.faults.len()
    );
    println!("| layer | records | missing | repeated ids | unknown ids | verdict |");
    println!("|---|---:|---:|---:|---:|---|");
    for l in &r.layers {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            l.name,
            l.records,
            l.missing,
            l.repeated,
            l.unknown,
            if l.ok() { "ok" } else { "FAILED" }
        );
    }
    println!("delivered / offered (last sink): {:.4}", r.delivered_ratio);
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    sluice_core::telemetry::init_logging();
    sluice_bin()?;
    let (mut config, key) = pipeline_config()?;
    config.parse.exactly_once = true;
    sluice_tests::create_topics(&config).await;
    let logs = std::env::temp_dir().join(sluice_tests::unique("bench-soak-"));
    std::fs::create_dir_all(&logs)?;
    let (mut procs, _) = spawn_pipeline(&config, &logs)?;
    let outcome = until_stopped(run(&args, &config, &key, &mut procs, &logs)).await;
    for p in procs {
        p.stop();
    }
    // Leave the servers as they were found, whatever the outcome.
    drop_pipeline(&config).await;
    let results = outcome.with_context(|| format!("process logs: {}", logs.display()))?;
    print_table(&results);
    let path = results_path("soak", args.json)?;
    write_json(&path, &serde_json::to_value(&results)?)?;
    println!("process logs: {}", logs.display());
    if results.layers.iter().any(|l| !l.ok()) {
        bail!("events were lost or repeated; see the table");
    }
    Ok(())
}
