//! The whole pipeline under a steady offered load: HTTP ingest → parse → enrich → the
//! TimescaleDB sink (on PostgreSQL 15) and the Elasticsearch sink, each its own `sluice`
//! process as deployed, fed by a paced HTTP load generator.
//!
//! 1. The baseline, measured first in the same run on the same servers: a bare producer,
//!    two consume→produce pass-throughs, `psql \copy` and `curl _bulk`. Each event goes
//!    through all five, on the same two cores, so the bare chain's rate is their
//!    harmonic combination, 1 / Σ (1 / rate).
//! 2. The sustainable maximum: the offered load doubles until the lag of the pipeline's
//!    consumer groups grows (or ingest falls behind the offer) over a hold of 60 s, then
//!    a binary search narrows it. Lag counts as bounded when, over the hold's second
//!    half (the mean lag of its last 10 s against that of the 10 s around its middle,
//!    which smooths the sawtooth of the sinks' commits), it grows by less than 2 % of the
//!    offered rate per second or stays under five seconds' worth of events (the
//!    Elasticsearch sink's commits alone draw a sawtooth of about four), and it stays
//!    below ten seconds' worth. A verdict names the consumer whose lag grew most: the
//!    component that set the maximum. Before each load the pipeline catches up and what
//!    it is done with is trimmed (committed records deleted, indices dropped), so every
//!    load meets the servers in the same state (noida-db's cost grows with what it holds).
//! 3. At 50 % and 80 % of that maximum: end-to-end latency (ingest's receipt to the
//!    sink's commit) p50/p99/p99.9 from each sink's `sluice_end_to_end_latency_seconds`
//!    histogram (the difference of two scrapes), and CPU seconds and resident memory
//!    per component per million events, from `/proc`, for the servers too.
//!
//! Prints one table and writes the results as JSON. Run on a freshly started stack, with
//! the release `sluice` binary built:
//! `cargo build --release -p sluice -p sluice-bench && target/release/pipeline`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sluice::components::{self, Kind};
use sluice::Config;
use sluice_bench::baselines::{
    curl_bulk, delete_indices, drop_namespace, drop_pipeline, events, pass_through, produce_raw,
    psql_copy, raw_line,
};
use sluice_bench::lag::{LagWatch, Watched};
use sluice_bench::latency::Buckets;
use sluice_bench::processes::{
    pipeline_config, ready, sluice_bin, spawn_pipeline, until_stopped, Process,
};
use sluice_bench::procstat::{
    cpu_seconds, own_cpu_seconds, rss_bytes, service_pid, tree_cpu_seconds,
};
use sluice_bench::{results_path, write_json};

/// Whole-pipeline benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds each offered load is held.
    #[arg(long, default_value_t = 60)]
    hold: u64,
    /// The first offered load, in events per second.
    #[arg(long, default_value_t = 1000.0)]
    start: f64,
    /// Binary-search steps after the doubling found a load the pipeline cannot sustain.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Lines per HTTP request of the load generator.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Events of each bare pass (the Elasticsearch one takes a fifth of them).
    #[arg(long, default_value_t = 100_000)]
    baseline_events: usize,
    /// Where to write the results as JSON (default: target/bench-results/pipeline-<time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Skip the search: take this as the sustainable maximum (an earlier run's), in events
    /// per second, and only measure the latencies at its shares (to compare settings).
    #[arg(long)]
    max: Option<f64>,
}

/// The bare rates the pipeline is compared with, events per second.
#[derive(Debug, Clone, Copy, Serialize)]
struct Baseline {
    producer: f64,
    raw_pass_through: f64,
    parsed_pass_through: f64,
    psql_copy: f64,
    curl_bulk: f64,
    /// The five combined: 1 / Σ (1 / rate).
    chain: f64,
}

async fn baseline(config: &Config, n: usize) -> Result<Baseline> {
    let scratch = config
        .clone()
        .namespaced(&sluice_tests::unique("bp-base-"), "unused");
    sluice_tests::create_topics(&scratch).await;
    let producer = produce_raw(&scratch, n).await?;
    let t = scratch.topics.clone();
    let raw_pt = sluice_bench::rate(
        n,
        pass_through(&scratch, &t.raw, &t.parsed, n).await?.elapsed,
    );
    let parsed_pt = sluice_bench::rate(
        n,
        pass_through(&scratch, &t.parsed, &t.enriched, n)
            .await?
            .elapsed,
    );
    drop_namespace(&scratch, &[]).await;
    let rows = events(n);
    let pg = psql_copy(config, &rows, &format!("{}_bare", config.timescale.schema)).await?;
    let docs = &rows[..(n / 5).max(1)];
    let es = curl_bulk(
        config,
        docs,
        &format!("{}-bare", config.elasticsearch.index_prefix),
    )
    .await?;
    let chain = 1.0
        / [producer, raw_pt, parsed_pt, pg, es]
            .iter()
            .map(|r| 1.0 / r)
            .sum::<f64>();
    Ok(Baseline {
        producer,
        raw_pass_through: raw_pt,
        parsed_pass_through: parsed_pt,
        psql_copy: pg,
        curl_bulk: es,
        chain,
    })
}

/// What one held load did.
#[derive(Debug, Clone, Serialize)]
struct Trial {
    offered: f64,
    /// Events ingest accepted per second.
    achieved: f64,
    /// Requests refused or failed.
    errors: u64,
    /// Lag over the hold's second half, records per second.
    lag_growth: f64,
    /// Lag at the end of the hold.
    lag_end: i64,
    /// Each consumer's part of the lag: which one fell behind.
    lag_by_component: BTreeMap<String, ComponentLag>,
    sustained: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    why: Option<String>,
}

/// The load generator: `rate` events per second in NDJSON requests of `batch` lines, for
/// `hold`; counts the lines ingest accepted and the requests that failed.
async fn offer(
    http: reqwest::Client,
    url: String,
    key: String,
    rate: f64,
    batch: usize,
    hold: Duration,
    next_id: Arc<AtomicU64>,
) -> (u64, u64) {
    let accepted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Enough requests in flight for ingest's acks (a few ms each) at any rate here.
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut offered = 0.0f64;
    let mut tasks = tokio::task::JoinSet::new();
    while started.elapsed() < hold {
        tick.tick().await;
        let due = rate * started.elapsed().as_secs_f64();
        while offered + batch as f64 <= due {
            // No free slot: ingest is behind; the offer is not kept up, which shows.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break;
            };
            offered += batch as f64;
            let first = next_id.fetch_add(batch as u64, Ordering::Relaxed) as usize;
            let body: String = (first..first + batch).map(|i| raw_line(i) + "\n").collect();
            let (http, url, key) = (http.clone(), url.clone(), key.clone());
            let (accepted, errors) = (accepted.clone(), errors.clone());
            tasks.spawn(async move {
                if sluice_bench::post_ndjson(&http, &url, &key, body).await {
                    accepted.fetch_add(batch as u64, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    (
        accepted.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    )
}

/// Least-squares slope of `(seconds, lag)` samples.
fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (
        samples.iter().map(|s| s.0).sum::<f64>() / n,
        samples.iter().map(|s| s.1).sum::<f64>() / n,
    );
    let num: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
    let den: f64 = samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// One consumer's lag over a hold.
#[derive(Debug, Clone, Serialize)]
struct ComponentLag {
    /// Growth over the hold's second half, records per second (as [`growth`] judges it).
    growth: f64,
    /// At the end of the hold.
    end: i64,
}

async fn total_lag(watch: &Arc<LagWatch>) -> Result<i64> {
    let w = watch.clone();
    tokio::task::spawn_blocking(move || w.total()).await?
}

async fn lags(watch: &Arc<LagWatch>) -> Result<Vec<(String, i64)>> {
    let w = watch.clone();
    tokio::task::spawn_blocking(move || w.lags()).await?
}

/// The consumer whose lag grew most (or, with none growing, is largest), as a suffix
/// for the verdict: the component that set the maximum.
fn most_behind(by_component: &BTreeMap<String, ComponentLag>) -> String {
    let growing = by_component
        .iter()
        .filter(|(_, l)| l.growth > 0.0)
        .max_by(|a, b| a.1.growth.total_cmp(&b.1.growth));
    if let Some((name, l)) = growing {
        return format!(
            ", most in {name} ({:+.0}/s, {} at the end)",
            l.growth, l.end
        );
    }
    match by_component.iter().max_by_key(|(_, l)| l.end) {
        Some((name, l)) if l.end > 0 => format!(", most in {name} ({} at the end)", l.end),
        _ => String::new(),
    }
}

/// Wait (at most three minutes) until the pipeline has caught up.
async fn drain(watch: &Arc<LagWatch>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let lag = total_lag(watch).await?;
        if lag <= 2_000 {
            return Ok(());
        }
        if Instant::now() > deadline {
            println!("  (still {lag} records behind after 3 minutes; going on)");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Wait until the pipeline caught up, then trim what it is done with: the records every
/// group committed, and the documents indexed so far. The stack's servers (noida-db)
/// save all they hold in the background, at a cost that grows with what they hold;
/// without this each load would meet fuller, slower servers than the last, and the
/// search would judge its later loads on a different machine than its first.
async fn settle(load: &Load, watch: &Arc<LagWatch>) -> Result<()> {
    drain(watch).await?;
    let w = watch.clone();
    let floor = tokio::task::spawn_blocking(move || w.committed_floor()).await??;
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in floor.into_iter().filter(|(_, o)| *o > 0) {
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
    }
    if tpl.count() > 0 {
        let admin: AdminClient<DefaultClientContext> = load.config.kafka.admin_config().create()?;
        if let Err(e) = admin.delete_records(&tpl, &AdminOptions::new()).await {
            println!("  (could not trim the topics: {e})");
        }
    }
    if let Err(e) = delete_indices(&load.config, &load.config.elasticsearch.index_prefix).await {
        println!("  (could not delete the indices: {e})");
    }
    Ok(())
}

/// The generator's target and what it needs.
struct Load {
    config: Config,
    http: reqwest::Client,
    url: String,
    key: String,
    batch: usize,
    next_id: Arc<AtomicU64>,
}

/// How fast the lag grows over the hold's second half, records per second: from the
/// mean lag of the 10 s around the middle to the mean of the last 10 s. Means over
/// windows longer than the sinks' commit cadence (the Elasticsearch sink commits seconds
/// apart) smooth the sawtooth those commits draw, which made a fitted slope call loads
/// that were kept up with unsustainable at low rates. Also returns the last window's mean.
fn growth(samples: &[(f64, f64)], hold: f64) -> (f64, f64) {
    let half = hold / 2.0;
    let mean_in = |from: f64, to: f64| {
        let w: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 >= from && s.0 <= to)
            .map(|s| s.1)
            .collect();
        (!w.is_empty()).then(|| w.iter().sum::<f64>() / w.len() as f64)
    };
    match (
        mean_in(half - 5.0, half + 5.0),
        mean_in(hold - 10.0, hold + 1.0),
    ) {
        (Some(mid), Some(end)) => ((end - mid) / (hold - 5.0 - half).max(1.0), end),
        _ => (slope(samples), samples.last().map_or(0.0, |s| s.1)),
    }
}

/// Hold `rate` for `hold`, sampling the lag every second. Call [`settle`] first.
async fn trial(load: &Load, watch: &Arc<LagWatch>, rate: f64, hold: Duration) -> Result<Trial> {
    let generator = tokio::spawn(offer(
        load.http.clone(),
        load.url.clone(),
        load.key.clone(),
        rate,
        load.batch,
        hold,
        load.next_id.clone(),
    ));
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    while !generator.is_finished() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at = started.elapsed().as_secs_f64();
        let now = lags(watch).await?;
        samples.push((at, now.iter().map(|(_, l)| l).sum::<i64>() as f64));
        for (component, lag) in now {
            series.entry(component).or_default().push((at, lag as f64));
        }
    }
    let (accepted, errors) = generator.await?;
    let achieved = accepted as f64 / hold.as_secs_f64();
    let (lag_growth, lag_recent) = growth(&samples, hold.as_secs_f64());
    let lag_end = samples.last().map_or(0.0, |s| s.1) as i64;
    let lag_by_component: BTreeMap<String, ComponentLag> = series
        .into_iter()
        .map(|(component, s)| {
            let lag = ComponentLag {
                growth: growth(&s, hold.as_secs_f64()).0,
                end: s.last().map_or(0.0, |x| x.1) as i64,
            };
            (component, lag)
        })
        .collect();
    let why = if achieved < 0.95 * rate {
        Some(format!(
            "ingest took {achieved:.0}/s of {rate:.0}/s offered"
        ))
    } else if errors > 0 {
        Some(format!("{errors} requests failed"))
    } else if lag_growth > 0.02 * rate && lag_recent > 5.0 * rate {
        Some(format!(
            "lag grew {lag_growth:.0} records/s{}",
            most_behind(&lag_by_component)
        ))
    } else if lag_end as f64 > 10.0 * rate + 2_000.0 {
        Some(format!(
            "lag stayed at {lag_end} records{}",
            most_behind(&lag_by_component)
        ))
    } else {
        None
    };
    let t = Trial {
        offered: rate,
        achieved,
        errors,
        lag_growth,
        lag_end,
        lag_by_component,
        sustained: why.is_none(),
        why,
    };
    println!(
        "  {:>8.0} events/s offered: {:>8.0}/s accepted, lag {:>7} at the end, growing {:>6.0}/s: {}",
        t.offered,
        t.achieved,
        t.lag_end,
        t.lag_growth,
        t.why.as_deref().unwrap_or("sustained")
    );
    Ok(t)
}

/// Latency quantiles of one sink, seconds.
#[derive(Debug, Clone, Serialize)]
struct Latency {
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    events: f64,
}

/// What one component used.
#[derive(Debug, Clone, Serialize)]
struct Usage {
    cpu_seconds_per_million: f64,
    rss_mb: f64,
    peak_rss_mb: f64,
}

/// A held load with latency and resource use.
#[derive(Debug, Clone, Serialize)]
struct Measured {
    share_of_max: f64,
    trial: Trial,
    latency: BTreeMap<String, Latency>,
    usage: BTreeMap<String, Usage>,
}

const LATENCY: &str = "sluice_end_to_end_latency_seconds";

/// The stack's servers the pipeline uses, by the name the table gives them and their
/// `scripts/stack` service. PostgreSQL's CPU includes its backends; its memory is the
/// postmaster's alone.
const SERVERS: [(&str, &str); 3] = [
    ("kafka broker", "kafka"),
    ("elasticsearch server", "es"),
    ("postgresql server", "pg"),
];

async fn measured(
    load: &Load,
    watch: &Arc<LagWatch>,
    procs: &[Process],
    share: f64,
    max: f64,
    hold: Duration,
) -> Result<Measured> {
    let sinks: Vec<&Process> = procs
        .iter()
        .filter(|p| components::find(Kind::Sink, p.name).is_some())
        .collect();
    settle(load, watch).await?;
    let mut before = Vec::new();
    for p in &sinks {
        before.push(Buckets::of(
            &p.scrape(&load.http).await?,
            LATENCY,
            "sink",
            p.name,
        )?);
    }
    let cpu_before: Vec<f64> = procs
        .iter()
        .map(|p| cpu_seconds(p.pid()))
        .collect::<Result<_>>()?;
    let own_before = own_cpu_seconds()?;
    // The servers share the machine: what they spend per event is part of the picture.
    let servers: Vec<(&str, i32, f64)> = SERVERS
        .iter()
        .filter_map(|(name, service)| Some((*name, service_pid(service)?)))
        .map(|(name, pid)| Ok((name, pid, tree_cpu_seconds(pid)?)))
        .collect::<Result<_>>()?;
    let t = trial(load, watch, share * max, hold).await?;
    // Let what was accepted reach the sinks before reading their histograms.
    drain(watch).await?;
    let events = (t.achieved * hold.as_secs_f64()).max(1.0);
    let mut latency = BTreeMap::new();
    for (p, b) in sinks.iter().zip(before) {
        let window = Buckets::of(&p.scrape(&load.http).await?, LATENCY, "sink", p.name)?.since(&b);
        latency.insert(
            p.name.to_string(),
            Latency {
                p50: window.quantile(0.5),
                p99: window.quantile(0.99),
                p999: window.quantile(0.999),
                events: window.count(),
            },
        );
    }
    let mut usage = BTreeMap::new();
    for (p, before) in procs.iter().zip(cpu_before) {
        let (rss, peak) = rss_bytes(p.pid())?;
        usage.insert(
            p.name.to_string(),
            Usage {
                cpu_seconds_per_million: (cpu_seconds(p.pid())? - before) / events * 1e6,
                rss_mb: rss as f64 / 1e6,
                peak_rss_mb: peak as f64 / 1e6,
            },
        );
    }
    for (name, pid, before) in servers {
        let (rss, peak) = rss_bytes(pid)?;
        usage.insert(
            name.into(),
            Usage {
                cpu_seconds_per_million: (tree_cpu_seconds(pid)? - before) / events * 1e6,
                rss_mb: rss as f64 / 1e6,
                peak_rss_mb: peak as f64 / 1e6,
            },
        );
    }
    usage.insert(
        "load generator".into(),
        Usage {
            cpu_seconds_per_million: (own_cpu_seconds()? - own_before) / events * 1e6,
            rss_mb: rss_bytes(std::process::id() as i32)?.0 as f64 / 1e6,
            peak_rss_mb: rss_bytes(std::process::id() as i32)?.1 as f64 / 1e6,
        },
    );
    Ok(Measured {
        share_of_max: share,
        trial: t,
        latency,
        usage,
    })
}

/// The whole run's results, as written to JSON.
#[derive(Debug, Serialize)]
struct Results {
    bench: &'static str,
    finished_at: String,
    cores: usize,
    hold_seconds: u64,
    baseline: Baseline,
    sustainable_max: f64,
    ratio_to_bare_chain: f64,
    trials: Vec<Trial>,
    measured: Vec<Measured>,
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |s| format!("{:.0} ms", s * 1000.0))
}

fn print_table(r: &Results) {
    let b = &r.baseline;
    println!();
    println!(
        "pipeline benchmark: {} cores, each load held {} s",
        r.cores, r.hold_seconds
    );
    println!(
        "bare chain (same run): producer {:.0}/s, raw pass-through {:.0}/s, parsed pass-through {:.0}/s, psql \\copy {:.0}/s, curl _bulk {:.0}/s -> {:.0} events/s",
        b.producer, b.raw_pass_through, b.parsed_pass_through, b.psql_copy, b.curl_bulk, b.chain
    );
    println!(
        "sustainable maximum: {:.0} events/s = {:.2} of the bare chain",
        r.sustainable_max, r.ratio_to_bare_chain
    );
    println!();
    println!("| load | events/s | sink | p50 | p99 | p99.9 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for m in &r.measured {
        for (sink, l) in &m.latency {
            println!(
                "| {:.0} % | {:.0} | {sink} | {} | {} | {} |",
                m.share_of_max * 100.0,
                m.trial.achieved,
                ms(l.p50),
                ms(l.p99),
                ms(l.p999)
            );
        }
    }
    if let Some(m) = r.measured.last() {
        println!();
        println!(
            "| component (at {:.0} %) | CPU s per million events | RSS MB (peak) |",
            m.share_of_max * 100.0
        );
        println!("| --- | --- | --- |");
        for (name, u) in &m.usage {
            println!(
                "| {name} | {:.1} | {:.0} ({:.0}) |",
                u.cpu_seconds_per_million, u.rss_mb, u.peak_rss_mb
            );
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    sluice_core::telemetry::init_logging();
    sluice_bin()?;
    let hold = Duration::from_secs(args.hold.max(10));
    let (config, key) = pipeline_config()?;
    println!("baseline: bare passes of {} events", args.baseline_events);
    let base = baseline(&config, args.baseline_events).await?;

    sluice_tests::create_topics(&config).await;
    let logs = std::env::temp_dir().join(sluice_tests::unique("bench-pipeline-"));
    std::fs::create_dir_all(&logs)?;
    let (mut procs, groups) = spawn_pipeline(&config, &logs)?;
    let http = reqwest::Client::new();
    let outcome = until_stopped(run(
        &args, &config, &key, &http, &mut procs, &groups, &logs, hold, base,
    ))
    .await;
    for p in procs {
        p.stop();
    }
    // Leave the servers as they were found: they slow as they fill.
    drop_pipeline(&config).await;
    let results = outcome?;
    print_table(&results);
    let path = results_path("pipeline", args.json)?;
    write_json(&path, &serde_json::to_value(&results)?)?;
    println!("process logs: {}", logs.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run(
    args: &Args,
    config: &Config,
    key: &str,
    http: &reqwest::Client,
    procs: &mut [Process],
    groups: &[Watched],
    logs: &Path,
    hold: Duration,
    base: Baseline,
) -> Result<Results> {
    ready(http, procs, logs).await?;
    let (c, g) = (config.clone(), groups.to_vec());
    let watch = Arc::new(tokio::task::spawn_blocking(move || LagWatch::new(&c, &g)).await??);
    let load = Load {
        config: config.clone(),
        http: http.clone(),
        url: format!("http://{}/v1/events", config.ingest.listen),
        key: key.to_string(),
        batch: args.batch.max(1),
        next_id: Arc::new(AtomicU64::new(0)),
    };
    println!("warm-up: {:.0} events/s for 10 s", args.start);
    settle(&load, &watch).await?;
    trial(&load, &watch, args.start, Duration::from_secs(10)).await?;

    println!(
        "searching the sustainable maximum (each load held {} s):",
        hold.as_secs()
    );
    let mut trials = Vec::new();
    let (mut good, mut bad) = (0.0f64, None::<f64>);
    let mut rate = args.start;
    if let Some(max) = args.max {
        ensure!(max > 0.0, "--max: {max} is not an events-per-second rate");
        println!("taking {max:.0} events/s as the sustainable maximum (--max)");
        (good, bad) = (max, Some(max));
    }
    while bad.is_none() {
        settle(&load, &watch).await?;
        let t = trial(&load, &watch, rate, hold).await?;
        if t.sustained {
            good = rate;
            rate *= 2.0;
        } else {
            bad = Some(rate);
        }
        trials.push(t);
    }
    let mut high = bad.unwrap_or(rate);
    let steps = if args.max.is_some() { 0 } else { args.steps };
    for _ in 0..steps {
        let mid = (good + high) / 2.0;
        settle(&load, &watch).await?;
        let t = trial(&load, &watch, mid, hold).await?;
        if t.sustained {
            good = mid;
        } else {
            high = mid;
        }
        trials.push(t);
    }
    ensure!(
        good > 0.0,
        "not even {:.0} events/s were sustained",
        args.start
    );

    let mut measured_loads = Vec::new();
    for share in [0.5, 0.8] {
        println!("at {:.0} % of the maximum:", share * 100.0);
        measured_loads.push(measured(&load, &watch, procs, share, good, hold).await?);
    }
    Ok(Results {
        bench: "pipeline",
        finished_at: chrono::Utc::now().to_rfc3339(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        hold_seconds: hold.as_secs(),
        baseline: base,
        sustainable_max: good,
        ratio_to_bare_chain: good / base.chain,
        trials,
        measured: measured_loads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lags(of: &[(&str, f64, i64)]) -> BTreeMap<String, ComponentLag> {
        of.iter()
            .map(|(name, growth, end)| {
                let lag = ComponentLag {
                    growth: *growth,
                    end: *end,
                };
                (name.to_string(), lag)
            })
            .collect()
    }

    #[test]
    fn the_verdict_names_the_consumer_whose_lag_grew_most() {
        let l = lags(&[
            ("parse", -30.0, 400),
            ("elasticsearch", 241.0, 23_899),
            ("enrich", 6.0, 682),
        ]);
        assert_eq!(
            most_behind(&l),
            ", most in elasticsearch (+241/s, 23899 at the end)"
        );
    }

    #[test]
    fn with_no_lag_growing_the_verdict_names_the_largest_one() {
        let l = lags(&[("parse", -1.0, 400), ("timescale", -2.0, 9_000)]);
        assert_eq!(most_behind(&l), ", most in timescale (9000 at the end)");
        assert_eq!(most_behind(&lags(&[("parse", -1.0, 0)])), "");
        assert_eq!(most_behind(&BTreeMap::new()), "");
    }
}
