//! Sink throughput against bare loads of the same rows, on the same servers:
//! - PostgreSQL 15: the sink (Kafka → Avro decode → batched `unnest` upserts) against a
//!   bare `psql \copy` of the same rows into an identical table;
//! - Elasticsearch: the sink against a bare `curl _bulk` of the same documents (same
//!   ids, indices and versions), 1,000 per request, into identical indices.
//!
//! A round runs the bare load and the sink back to back (which goes first alternates),
//! each into tables or indices of its own, deleted after; the median of the per-round
//! ratios is reported with the lowest and highest. The sink's rate runs from its first
//! record (after joining its group and, for PostgreSQL, the migrations) to its last
//! commit, as the sinks report them. Also reported: what the hypertable layout costs on
//! the normal path, and a replay of every stored event with changed values.
//!
//! Run with the stack up: `cargo run --release -p sluice-bench --bin sinks`.

use anyhow::{Context, Result};
use clap::Parser;
use sluice::Config;
use sluice_bench::baselines::{
    curl_bulk, drop_indices, drop_schema, drop_topics, events, psql_copy,
};
use sluice_bench::{write_json, Rounds, Verdict};
use sluice_schemas::EnrichedEvent;
use sluice_sinks::timescale::config::DbMode;
use sluice_tests::{
    produce_enriched, produce_versioned, sink, sink_namespace, stack_config, stack_var, unique,
    RunningSink,
};

/// Sink benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Rows for the PostgreSQL comparison.
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Documents for the Elasticsearch comparison.
    #[arg(long, default_value_t = 40_000)]
    docs: usize,
    /// Rounds of each comparison (the default keeps a rerun's ratios within about ±0.05).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Only this comparison.
    #[arg(long, value_parser = ["postgres", "elasticsearch"])]
    only: Option<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    sluice_core::telemetry::init_logging();
    let rounds = args.rounds.max(1);
    let mut results = serde_json::json!({"bench": "sinks", "rounds": rounds});
    if args.only.as_deref() != Some("elasticsearch") {
        results["postgres"] = postgres(args.rows, rounds).await?;
    }
    if args.only.as_deref() != Some("postgres") {
        results["elasticsearch"] = elasticsearch(args.docs, rounds).await?;
    }
    if let Some(path) = &args.json {
        write_json(path, &results)?;
    }
    Ok(())
}

/// Run `a` then `b` in even rounds and `b` then `a` in odd ones (the server slows a
/// little as a round goes on); their results in the order `(a, b)`.
async fn alternate<A, B>(
    round: usize,
    a: impl std::future::Future<Output = Result<A>>,
    b: impl std::future::Future<Output = Result<B>>,
) -> Result<(A, B)> {
    if round % 2 == 0 {
        let a = a.await?;
        Ok((a, b.await?))
    } else {
        let b = b.await?;
        Ok((a.await?, b))
    }
}

async fn postgres(n: usize, rounds: usize) -> Result<serde_json::Value> {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.timescale.mode = DbMode::Postgres;
    // Four connections, as the Helm chart's default: PostgreSQL 15 serves them at once.
    config.timescale.batch_size = 5_000;
    config.timescale.pool_size = 4;
    let name = unique("bench_pg_");
    sink_namespace(&mut config, &name).await;
    let rows = events(n);
    produce_enriched(&config, &config.topics.enriched, &rows).await;

    let mut vs_copy = Rounds::new("timescale sink (PostgreSQL 15)", "bare psql \\copy");
    let mut layout = Rounds::new("hypertable layout (event_keys)", "plain-table layout");
    for round in 0..rounds {
        let mut c = config.clone();
        c.timescale.schema = format!("{name}_sink{round}");
        c.timescale.group = format!("{name}-sink{round}");
        let (bare, sunk) = alternate(
            round,
            psql_copy(&config, &rows, &format!("{name}_bare{round}")),
            sink_rate(&c, "timescale"),
        )
        .await?;
        // The same sink with a hypertable's layout (key with the time, plus event_keys),
        // which TimescaleDB needs, on the same server: what that layout costs.
        let mut k = config.clone();
        k.timescale.schema = format!("{name}_keyed{round}");
        k.timescale.group = format!("{name}-keyed{round}");
        let keyed = keyed_rate(&k).await?;
        drop_schema(&config, &k.timescale.schema).await;
        println!(
            "round {}: psql \\copy {bare:.0} rows/s, sink {sunk:.0} rows/s ({:.2}), hypertable layout {keyed:.0} rows/s ({:.2} of the plain one)",
            round + 1,
            sunk / bare,
            keyed / sunk
        );
        vs_copy.push(bare, sunk);
        layout.push(sunk, keyed);
        if round + 1 < rounds {
            drop_schema(&config, &c.timescale.schema).await;
        }
    }
    println!("postgres sink benchmark: {n} rows, {rounds} rounds");
    let copy = vs_copy.report(0.6);
    let keyed = layout.verdict(0.0);
    println!(
        "{:<34} {:>9.0}/s   {:<30} {:>9.0}/s   ratio {:.2} (rounds {:.2}..{:.2})",
        layout.name,
        keyed.measured,
        layout.baseline_name,
        keyed.baseline,
        keyed.ratio,
        keyed.min,
        keyed.max
    );

    // A correction: every stored row again, with other values and a newer processing,
    // into the last round's tables (the rows are overwritten in place).
    let mut c = config.clone();
    c.timescale.schema = format!("{name}_sink{}", rounds - 1);
    let first = vs_copy.pairs[rounds - 1].1;
    let replayed = replay_rate(&mut c, &rows, "timescale").await?;
    let replay = report_replay("timescale sink", n, first, replayed);
    drop_schema(&config, &c.timescale.schema).await;
    drop_bench_topics(&config).await;
    Ok(
        serde_json::json!({"rows": n, "sink_vs_copy": copy, "hypertable_layout": keyed, "replay_vs_first_write": replay}),
    )
}

/// Delete the bench's topics: the broker saves everything it holds periodically, which
/// costs a core once it holds a few hundred thousand records.
async fn drop_bench_topics(config: &Config) {
    let t = &config.topics;
    let names = [
        t.enriched.clone(),
        t.dlq(&t.enriched),
        format!("{}.replay", t.enriched),
    ];
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    drop_topics(config, &refs).await;
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

/// Rewrite `rows` with a changed value at a newer version through the sink named
/// `sink` (a replay of corrected events into tables or indices that hold them already);
/// its rate.
async fn replay_rate(config: &mut Config, rows: &[EnrichedEvent], sink_name: &str) -> Result<f64> {
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
    match sink_name {
        "timescale" => config.timescale.group = group,
        _ => config.elasticsearch.group = group,
    }
    sink_rate(config, sink_name).await
}

fn report_replay(sink: &str, n: usize, first: f64, replayed: f64) -> Verdict {
    let mut r = Rounds::new(&format!("replay into {sink}"), "first write");
    r.push(first, replayed);
    let v = r.verdict(0.0);
    println!(
        "replay of {n} stored events with changed values, {sink}: {replayed:.0} rows/s; ratio to the first write ({first:.0} rows/s) = {:.2}",
        v.ratio
    );
    v
}

/// Run the sink named `sink_name` in its configured group until it has committed the
/// whole enriched topic; its rate from its first record to its last commit.
async fn sink_rate(config: &Config, sink_name: &str) -> Result<f64> {
    let component = sink(sink_name);
    let group = (component.group)(config).to_string();
    let mut running = RunningSink::start(config, component);
    running
        .caught_up(config, &group, &config.topics.enriched)
        .await;
    running
        .stop()
        .await
        .throughput
        .map(|r| r as f64)
        .context("sink measured nothing")
}

async fn elasticsearch(n: usize, rounds: usize) -> Result<serde_json::Value> {
    let mut config = stack_config();
    let name = unique("bench-es-");
    sink_namespace(&mut config, &name).await;
    let docs = events(n);
    produce_enriched(&config, &config.topics.enriched, &docs).await;

    let mut vs_bulk = Rounds::new("elasticsearch sink", "bare curl _bulk");
    for round in 0..rounds {
        let mut c = config.clone();
        c.elasticsearch.group = format!("{name}-sink{round}");
        c.elasticsearch.index_prefix = format!("{name}-sink{round}");
        let (bare, sunk) = alternate(
            round,
            curl_bulk(&config, &docs, &format!("{name}-bare{round}")),
            sink_rate(&c, "elasticsearch"),
        )
        .await?;
        println!(
            "round {}: curl _bulk {bare:.0} docs/s, sink {sunk:.0} docs/s ({:.2})",
            round + 1,
            sunk / bare
        );
        vs_bulk.push(bare, sunk);
        if round + 1 < rounds {
            drop_indices(&config, &c.elasticsearch.index_prefix).await;
        }
    }
    println!("elasticsearch sink benchmark: {n} documents, {rounds} rounds");
    let bulk = vs_bulk.report(0.8);

    let mut c = config.clone();
    c.elasticsearch.index_prefix = format!("{name}-sink{}", rounds - 1);
    let first = vs_bulk.pairs[rounds - 1].1;
    let replayed = replay_rate(&mut c, &docs, "elasticsearch").await?;
    let replay = report_replay("elasticsearch sink", n, first, replayed);
    drop_bench_topics(&config).await;
    // The server slows as it fills: leave it as it was found.
    drop_indices(&config, &c.elasticsearch.index_prefix).await;
    Ok(serde_json::json!({"documents": n, "sink_vs_bulk": bulk, "replay_vs_first_write": replay}))
}
