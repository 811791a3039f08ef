//! Sink throughput against bare loads of the same rows in the same run:
//! - PostgreSQL 15: the sink (Kafka → Avro decode → batched UNNEST inserts) against a
//!   bare `\copy` of the same rows with psql, into an identical table;
//! - Elasticsearch: the sink against a bare `_bulk` of the same documents (curl), into
//!   identical indices.
//!
//! The sink's rate runs from its first record (after joining its group and, for
//! PostgreSQL, the migrations) to its last commit, as the sinks report them.
//!
//! Run with the stack up: `cargo run --release -p sluice-bench --bin sinks`.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use sluice::Config;
use sluice_bench::{median_round, rate, report, timed};
use sluice_sinks::elasticsearch::{doc_id, document, index_name};
use sluice_sinks::timescale::config::DbMode;
use sluice_tests::{
    enriched, produce_enriched, produce_versioned, sink, sink_namespace, stack_config, stack_var,
    unique, RunningSink,
};

/// Sink benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Rows for the PostgreSQL comparison.
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Alternating rounds of each comparison (medians are compared).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Documents for the Elasticsearch comparison.
    #[arg(long, default_value_t = 20_000)]
    docs: usize,
    /// Only this comparison: `postgres` or `elasticsearch`.
    #[arg(long, value_parser = ["postgres", "elasticsearch"])]
    only: Option<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    sluice_core::telemetry::init_logging();
    if args.only.as_deref() != Some("elasticsearch") {
        postgres(args.rows, args.rounds.max(1)).await?;
    }
    if args.only.as_deref() != Some("postgres") {
        elasticsearch(args.docs, args.rounds.max(1)).await?;
    }
    Ok(())
}

fn events(n: usize) -> Vec<sluice_schemas::EnrichedEvent> {
    (0..n)
        .map(|i| {
            let at = format!(
                "2026-11-2{}T{:02}:{:02}:{:02}Z",
                i % 3,
                i / 3600 % 24,
                i / 60 % 60,
                i % 60
            );
            let mut e = enriched(
                i,
                ["acme", "globex", "initech"][i % 3],
                &format!("user-{}", i % 997),
                "page_view",
                "/docs/page",
                &at,
            );
            e.browser = Some("Firefox".into());
            e.os = Some("Linux".into());
            e
        })
        .collect()
}

fn csv_field(v: Option<&str>) -> String {
    match v {
        None => String::new(),
        Some(s) => format!("\"{}\"", s.replace('"', "\"\"")),
    }
}

async fn postgres(n: usize, rounds: usize) -> Result<()> {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.timescale.mode = DbMode::Postgres;
    config.timescale.batch_size = std::env::var("PG_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    // Four connections, as the Helm chart's default: PostgreSQL 15 serves them at once.
    config.timescale.pool_size = std::env::var("PG_POOL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let name = unique("bench_pg_");
    sink_namespace(&mut config, &name).await;
    let rows = events(n);
    produce_enriched(&config, &config.topics.enriched, &rows).await;

    // The bare load: the same rows as CSV, \copy into an identical table.
    let csv = std::env::temp_dir().join(format!("{name}.csv"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&csv)?);
    for e in &rows {
        let ts = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap_or_default()
                .to_rfc3339()
        };
        writeln!(
            f,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            ts(e.event_time),
            csv_field(Some(&e.event_id)),
            csv_field(Some(&e.tenant)),
            csv_field(Some(&e.user_id)),
            csv_field(e.session_id.as_deref()),
            csv_field(Some(&e.event_type)),
            csv_field(e.url.as_deref()),
            ts(e.received_at),
            csv_field(e.browser.as_deref()),
            csv_field(e.os.as_deref()),
            csv_field(Some("{}")),
            csv_field(e.referrer.as_deref()),
        )?;
    }
    f.flush()?;
    drop(f);

    // Alternating rounds, each into fresh tables (and the sink in a fresh group): the
    // machine is noisy, so the medians are compared.
    let (mut bare_rates, mut sink_rates, mut keyed_rates) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut bare = config.timescale.clone();
        bare.schema = format!("{name}_bare{round}");
        let pool = sluice_sinks::timescale::pool(&bare)?;
        sluice_sinks::timescale::migrate(&pool, &bare).await?;
        pool.close();
        let copy = format!(
            "\\copy {}.events (time, event_id, tenant, user_id, session_id, event_type, url, received_at, browser, os, extra, referrer) FROM '{}' WITH (FORMAT csv)",
            bare.schema,
            csv.display()
        );
        let (status, bare_time) = timed(async {
            Command::new("psql")
                .arg(&config.timescale.url)
                .arg("-qc")
                .arg(&copy)
                .status()
        })
        .await;
        ensure!(status?.success(), "psql \\copy failed");
        bare_rates.push(rate(n, bare_time));

        // From its first record to its last commit, like the ES sink: joining the group
        // and the migrations are start-up, not throughput.
        let mut c = config.clone();
        c.timescale.schema = format!("{name}_sink{round}");
        c.timescale.group = format!("{name}-sink{round}");
        sink_rates.push(sink_rate(&c, sink("timescale"), &c.timescale.group).await?);
        // The same sink with a hypertable's layout (key with the time, plus event_keys),
        // which TimescaleDB needs, on the same server: what that layout costs.
        c.timescale.schema = format!("{name}_keyed{round}");
        c.timescale.group = format!("{name}-keyed{round}");
        keyed_rates.push(keyed_rate(&c).await?);
        println!(
            "round {}: psql \\copy {:.0} rows/s, sink {:.0} rows/s, sink with the hypertable layout {:.0} rows/s",
            round + 1,
            bare_rates[round],
            sink_rates[round],
            keyed_rates[round]
        );
    }
    let _ = std::fs::remove_file(&csv);
    let pairs: Vec<(f64, f64)> = bare_rates
        .iter()
        .copied()
        .zip(sink_rates.iter().copied())
        .collect();
    let median_pair = median_round(&pairs);
    println!("postgres sink benchmark: {n} rows, PostgreSQL 15, the round with the median ratio of {rounds}");
    report(
        "sluice timescale sink (postgres mode)",
        "bare psql \\copy",
        median_pair.0,
        median_pair.1,
        0.5,
    );

    let keyed_pairs: Vec<(f64, f64)> = sink_rates
        .iter()
        .copied()
        .zip(keyed_rates.iter().copied())
        .collect();
    let (direct, keyed) = median_round(&keyed_pairs);
    println!(
        "hypertable layout (event_keys) on the normal path: {keyed:.0} rows/s, {:.2} of the plain-table layout ({direct:.0} rows/s)",
        keyed / direct.max(1e-9)
    );

    // A correction: every stored row again, with other values and a newer processing,
    // into the last round's tables (the rows are overwritten in place).
    let mut c = config.clone();
    c.timescale.schema = format!("{name}_sink{}", rounds - 1);
    let first = sink_rates[rounds - 1];
    let replayed = replay_rate(&mut c, &rows, sink("timescale")).await?;
    report_replay("timescale sink", n, first, replayed);
    drop_topics(&config).await;
    Ok(())
}

/// Delete the bench's topics: noida-db saves everything it holds periodically, which
/// costs a core once it holds a few hundred thousand records, and would slow what runs next.
async fn drop_topics(config: &Config) {
    let t = &config.topics;
    let names = [
        t.enriched.clone(),
        t.dlq(&t.enriched),
        format!("{}.replay", t.enriched),
    ];
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    if let Err(e) = sluice_core::kafka::delete_topics(&config.kafka, &refs).await {
        println!("(could not delete the bench topics: {e})");
    }
}

/// The events sink's rate into a table of the hypertable layout on plain PostgreSQL.
async fn keyed_rate(config: &Config) -> Result<f64> {
    use sluice_sinks::timescale::events::{EventsWriter, Layout};
    let c = &config.timescale;
    let pool = sluice_sinks::timescale::pool(c)?;
    sluice_sinks::timescale::migrate(&pool, c).await?;
    let client = pool.get().await?;
    for stmt in Layout::Keyed.ddl() {
        client
            .batch_execute(&stmt.replace("{s}", &c.schema))
            .await?;
    }
    drop(client);
    let spec = sluice_sinks::SinkSpec {
        group: c.group.clone(),
        input: config.topics.enriched.clone(),
        dlq: config.topics.dlq(&config.topics.enriched),
        batch_size: c.batch_size,
        linger: std::time::Duration::from_millis(c.linger_ms),
        write_concurrency: c.pool_size,
        scope: None,
    };
    let writer = EventsWriter::with_layout(pool.clone(), c, Layout::Keyed, None);
    let stop = tokio_util::sync::CancellationToken::new();
    let (k, s, t) = (config.kafka.clone(), stop.clone(), spec.clone());
    let task = tokio::spawn(async move {
        sluice_sinks::run_sink(&k, &t, writer, sluice_schemas::ENRICHED_EVENTS.clone(), s).await
    });
    sluice_tests::caught_up(config, &spec.group, &spec.input).await;
    stop.cancel();
    let stats = task.await??;
    pool.close();
    stats.throughput().context("keyed sink measured nothing")
}

/// Rewrite `rows` with a changed value at a newer version through `sink` (a replay of
/// corrected events into tables or indices that hold them already); its rate.
async fn replay_rate(
    config: &mut Config,
    rows: &[sluice_schemas::EnrichedEvent],
    sink: &'static sluice::components::Component,
) -> Result<f64> {
    let topic = format!("{}.replay", config.topics.enriched);
    sluice_core::kafka::create_topics(&config.kafka, 3, 1, &[(topic.clone(), "3600000".into())])
        .await?;
    let version = sluice_core::now_ms();
    let corrected: Vec<_> = rows
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.country = Some("DE".into());
            (e, Some(version))
        })
        .collect();
    produce_versioned(config, &topic, &corrected).await;
    config.topics.enriched = topic;
    let group = format!("{}-replay", unique("bench-"));
    match sink {
        s if s.name == "timescale" => config.timescale.group = group.clone(),
        _ => config.elasticsearch.group = group.clone(),
    }
    sink_rate(config, sink, &group).await
}

fn report_replay(sink: &str, n: usize, first: f64, replayed: f64) {
    println!(
        "replay of {n} stored events with changed values, {sink}: {replayed:.0} rows/s; ratio to the first write ({first:.0} rows/s) = {:.2}",
        replayed / first.max(1e-9)
    );
}

/// Run `sink` in group `group` until it has committed the whole enriched topic; its rate
/// from its first record to its last commit.
async fn sink_rate(
    config: &Config,
    sink: &'static sluice::components::Component,
    group: &str,
) -> Result<f64> {
    let mut running = RunningSink::start(config, sink);
    running
        .caught_up(config, group, &config.topics.enriched)
        .await;
    running
        .stop()
        .await
        .throughput
        .map(|r| r as f64)
        .context("sink measured nothing")
}

async fn elasticsearch(n: usize, rounds: usize) -> Result<()> {
    let mut config = stack_config();
    config.elasticsearch.bulk_max_docs = 1_000;
    config.elasticsearch.bulk_in_flight = std::env::var("BULK_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let name = unique("bench-es-");
    sink_namespace(&mut config, &name).await;
    let docs = events(n);
    produce_enriched(&config, &config.topics.enriched, &docs).await;

    // The bare load: the same documents and ids, 1,000 per _bulk, into identical indices
    // of their own (templates with overlapping patterns are refused). Bare passes and
    // sink passes (each in a fresh group, into fresh indices) alternate, bare first and
    // last; each sink pass is compared with the mean of the bare passes around it, since
    // the server slows as it fills, and the medians are reported.
    let client = sluice_sinks::elasticsearch::client(&config.elasticsearch)?;
    let url = format!("{}/_bulk", config.elasticsearch.url);
    let (mut bare_rates, mut sink_rates) = (Vec::new(), Vec::new());
    for pass in 0..=rounds {
        if pass > 0 {
            let mut c = config.clone();
            c.elasticsearch.group = format!("{name}-sink{pass}");
            c.elasticsearch.index_prefix = format!("{name}-sink{pass}");
            sink_rates.push(sink_rate(&c, sink("elasticsearch"), &c.elasticsearch.group).await?);
        }
        let prefix = format!("{name}-bare{pass}");
        let mut bare_config = config.elasticsearch.clone();
        bare_config.index_prefix = prefix.clone();
        sluice_sinks::elasticsearch::put_template(&client, &bare_config).await?;
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let mut files = Vec::new();
        for (i, chunk) in docs.chunks(1_000).enumerate() {
            let path = dir.join(format!("{i}.ndjson"));
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
            for e in chunk {
                // The same request the sink makes: versioned by the processing stamp.
                let action = serde_json::json!({"index": {
                    "_index": index_name(&prefix, &e.tenant, e.received_at),
                    "_id": doc_id(&e.tenant, &e.event_id),
                    "version": e.received_at, "version_type": "external_gte"}});
                writeln!(f, "{action}\n{}", document(e, e.received_at))?;
            }
            f.flush()?;
            files.push(path);
        }
        let (result, bare_time) = timed(async { curl_all(&url, &files) }).await;
        result?;
        let _ = std::fs::remove_dir_all(&dir);
        bare_rates.push(rate(n, bare_time));
    }
    let baselines: Vec<f64> = bare_rates.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    for (i, (b, s)) in baselines.iter().zip(&sink_rates).enumerate() {
        println!(
            "round {}: curl _bulk {b:.0} docs/s (mean of the passes around), sink {s:.0} docs/s",
            i + 1
        );
    }
    let pairs: Vec<(f64, f64)> = baselines
        .iter()
        .copied()
        .zip(sink_rates.iter().copied())
        .collect();
    let median_pair = median_round(&pairs);
    println!(
        "elasticsearch sink benchmark: {n} documents, noida-db ES API, the round with the median ratio of {rounds}"
    );
    report(
        "sluice elasticsearch sink",
        "bare curl _bulk",
        median_pair.0,
        median_pair.1,
        0.8,
    );

    let mut c = config.clone();
    c.elasticsearch.index_prefix = format!("{name}-sink{rounds}");
    let first = sink_rates[rounds - 1];
    let replayed = replay_rate(&mut c, &docs, sink("elasticsearch")).await?;
    report_replay("elasticsearch sink", n, first, replayed);
    drop_topics(&config).await;
    // The server slows as it fills: leave it as it was found.
    let pattern = format!("{name}-*");
    let _ = client
        .indices()
        .delete(elasticsearch::indices::IndicesDeleteParts::Index(&[
            &pattern,
        ]))
        .send()
        .await;
    Ok(())
}

fn curl_all(url: &str, files: &[impl AsRef<Path>]) -> Result<()> {
    for f in files {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-f",
                "-H",
                "content-type: application/x-ndjson",
                "--data-binary",
            ])
            .arg(format!("@{}", f.as_ref().display()))
            .arg(url)
            .output()
            .context("running curl")?;
        ensure!(
            out.status.success(),
            "curl _bulk failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            !String::from_utf8_lossy(&out.stdout).contains("\"errors\":true"),
            "bulk items failed"
        );
    }
    Ok(())
}
