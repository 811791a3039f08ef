//! Does the broker honour the consumers' fetch limits? Writes a backlog of 300 records of
//! 900 KB (random bytes: the limits count compressed bytes) to a fresh topic, then, in a child process of its own for each setting, reads
//! five with a bare librdkafka consumer and reports how much the process's resident
//! memory grew. Settings: librdkafka's defaults (`fetch.max.bytes` 50 MiB,
//! `queued.max.messages.kbytes` 64 MiB), and tight limits (1 MiB a fetch, 4 MiB of
//! prefetch). A broker that honours them keeps the growth near the limits (the ratio of
//! the growth to the configured bound stays small); one that answers a fetch with the
//! whole partition (noida-db does) puts the whole 270 MB backlog in memory.
//!
//! `target/release/fetch_probe [--json FILE]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_bench::procstat::rss_bytes;
use sluice_bench::{results_path, write_json};

const RECORDS: usize = 300;
const RECORD_BYTES: usize = 900_000;

/// librdkafka properties, as (name, value).
type Settings = &'static [(&'static str, &'static str)];

/// The consumer settings tried, and the prefetch they should bound memory to (MiB):
/// `queued.max.messages.kbytes` plus one fetch (`fetch.max.bytes`).
const CASES: [(&str, Settings, u64); 2] = [
    ("librdkafka defaults", &[], 64 + 50),
    (
        "tight limits",
        &[
            ("fetch.max.bytes", "1048576"),
            ("max.partition.fetch.bytes", "1048576"),
            ("queued.max.messages.kbytes", "4096"),
        ],
        4 + 1,
    ),
];

/// Fetch limits against a large backlog.
#[derive(Debug, Parser)]
struct Args {
    /// Internal: read five records of this topic with case `--case` and print the growth.
    #[arg(long, hide = true)]
    read: Option<String>,
    /// Internal: the index of the case in `CASES`.
    #[arg(long, hide = true, default_value_t = 0)]
    case: usize,
    /// Where to write the results as JSON (default: target/bench-results/fetch_probe-<time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

fn rss_mib() -> Result<u64> {
    Ok(rss_bytes(std::process::id() as i32)?.0 >> 20)
}

/// In the child: read five records with `CASES[case]`'s settings; print the growth in MiB.
fn read(topic: &str, case: usize) -> Result<()> {
    let config = sluice_tests::stack_config();
    let mut settings = config
        .kafka
        .consumer_config(&sluice_tests::unique("probe-group-"));
    for (k, v) in CASES[case].1 {
        settings.set(*k, *v);
    }
    let before = rss_mib()?;
    let consumer: BaseConsumer = settings.create()?;
    consumer.subscribe(&[topic])?;
    let mut got = 0;
    let started = Instant::now();
    while got < 5 && started.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(500)) {
            got += 1;
        }
    }
    // Time for the prefetch to fill up to whatever the broker and settings allow.
    std::thread::sleep(Duration::from_secs(3));
    println!("{got} {}", rss_mib()?.saturating_sub(before));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(topic) = &args.read {
        return read(topic, args.case);
    }
    let config = sluice_tests::stack_config();
    let topic = sluice_tests::unique("probe-");
    sluice_core::kafka::create_topics(&config.kafka, 1, 1, &[(topic.clone(), "3600000".into())])
        .await?;
    let producer: FutureProducer = config.kafka.producer_config().create()?;
    // Incompressible: the fetch limits count compressed bytes, and 900 KB of one byte
    // repeated compresses to almost nothing, so a 1 MiB fetch would carry the backlog.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let payload: Vec<u8> = (0..RECORD_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    let mut acks = Vec::new();
    for _ in 0..RECORDS {
        acks.push(
            producer
                .send_result(FutureRecord::<str, _>::to(&topic).payload(&payload))
                .map_err(|(e, _)| e)?,
        );
    }
    for a in acks {
        let _ = a.await;
    }
    drop(producer);
    println!(
        "backlog: {RECORDS} records of {} KB on one partition",
        RECORD_BYTES / 1000
    );
    let mut results = Vec::new();
    for (i, (name, settings, bound)) in CASES.iter().enumerate() {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--read", &topic, "--case", &i.to_string()])
            .output()
            .context("running the reading child")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        let (got, grew): (u64, u64) = (
            words.next().and_then(|w| w.parse().ok()).unwrap_or(0),
            words.next().and_then(|w| w.parse().ok()).unwrap_or(0),
        );
        println!(
            "{name:<20} read {got} records: resident memory grew {grew} MiB; the settings bound prefetch to about {bound} MiB (ratio {:.2})",
            grew as f64 / *bound as f64
        );
        results.push(serde_json::json!({
            "case": name, "settings": settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "records_read": got, "rss_growth_mib": grew, "bound_mib": bound,
            "ratio_to_bound": grew as f64 / *bound as f64,
        }));
    }
    sluice_core::kafka::delete_topics(&config.kafka, &[&topic]).await?;
    let path = results_path("fetch_probe", args.json)?;
    write_json(
        &path,
        &serde_json::json!({"bench": "fetch_probe", "backlog_mib": (RECORDS * RECORD_BYTES) >> 20, "cases": results}),
    )?;
    Ok(())
}
