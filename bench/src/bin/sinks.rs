//! Sink throughput against bare loads of the same rows, on the same servers:
//! - PostgreSQL 15: the sink (Kafka → Avro decode → batched `unnest` upserts) against a
//!   bare `psql \copy` of the same rows into an identical table;
//! - Elasticsearch: the sink against a bare `curl _bulk` of the same documents (same
//!   ids, indices and versions), 1,000 per request, into identical indices;
//! - the archive: the sink (Kafka → spans → Parquet files in the stack's S3 API) against
//!   the same records written by the same Parquet writer to the same store with no Kafka;
//!   and a replay through parse from the archive against one from Kafka.
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
    curl_bulk, drop_indices, drop_schema, drop_topics, events, produce_raw, psql_copy,
};
use sluice_bench::{rate, write_json, Rounds, Verdict, CHART_PG_CONNECTIONS};
use sluice_schemas::EnrichedEvent;
use sluice_sinks::timescale::config::{DbMode, TimescaleConfig};
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
    /// The PostgreSQL sink's `timescale.batch_size` (default: the configuration's, which
    /// the Helm chart keeps).
    #[arg(long, default_value_t = TimescaleConfig::default().batch_size as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pg_batch_size: u64,
    /// The PostgreSQL sink's `timescale.pool_size`, its connections (default: the Helm
    /// chart's).
    #[arg(long, default_value_t = CHART_PG_CONNECTIONS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pg_connections: u64,
    /// Documents for the Elasticsearch comparison.
    #[arg(long, default_value_t = 40_000)]
    docs: usize,
    /// Rounds of each comparison (the default keeps a rerun's ratios within about ±0.05).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Raw records for the archive comparisons (with 200,000, passes of under a second
    /// made the ratios scatter by ±0.3 between rounds).
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Only this comparison.
    #[arg(long, value_parser = ["postgres", "elasticsearch", "archive"])]
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
    let runs = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    if runs("postgres") {
        let sink = PgSink {
            batch_size: args.pg_batch_size as usize,
            connections: args.pg_connections as usize,
        };
        results["postgres"] = postgres(args.rows, sink, rounds).await?;
    }
    if runs("elasticsearch") {
        results["elasticsearch"] = elasticsearch(args.docs, rounds).await?;
    }
    if runs("archive") {
        results["archive"] = archive(args.records, rounds).await?;
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

/// How the PostgreSQL sink is set up for the comparison.
#[derive(Debug, Clone, Copy)]
struct PgSink {
    batch_size: usize,
    connections: usize,
}

async fn postgres(n: usize, sink: PgSink, rounds: usize) -> Result<serde_json::Value> {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.timescale.mode = DbMode::Postgres;
    // By default as the Helm chart deploys it (see the flags).
    config.timescale.batch_size = sink.batch_size;
    config.timescale.pool_size = sink.connections;
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
    println!(
        "postgres sink benchmark: {n} rows, {rounds} rounds, batches of {} rows on {} connections",
        sink.batch_size, sink.connections
    );
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
        serde_json::json!({"rows": n, "batch_size": sink.batch_size, "connections": sink.connections, "sink_vs_copy": copy, "hypertable_layout": keyed, "replay_vs_first_write": replay}),
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
        max_batch_bytes: sluice_sinks::consumer::DEFAULT_MAX_BATCH_BYTES,
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
        .caught_up(config, &group, component.input(config))
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

/// The archive sink against a bare write of the same records (same spans, folders,
/// Parquet writer and store, no Kafka); a replay through parse from the archive against
/// one from Kafka.
async fn archive(n: usize, rounds: usize) -> Result<serde_json::Value> {
    use sluice_sinks::archive::{self, layout::Folder, record::encode, ArchivedRecord};
    let name = unique("bench-ar-");
    let mut config = stack_config().namespaced(&name, "unused");
    // Spans filled by count, as under a steady load (two or three per partition); the
    // last ones wait a short rotation.
    config.archive.flush_records = 15_000;
    config.archive.rotate_interval_ms = 50;
    sluice_tests::create_topics(&config).await;
    produce_raw(&config, n).await?;
    // The records as the sink archives them, read back once (not timed).
    let (k, t) = (config.kafka.clone(), config.topics.raw.clone());
    let records: Vec<ArchivedRecord> = tokio::task::spawn_blocking(move || {
        sluice_core::kafka::read_all(&k, &t, std::time::Duration::from_secs(120))
    })
    .await??
    .iter()
    .map(ArchivedRecord::of)
    .collect();
    let base_url = config.archive.url.clone();
    let store = archive::open(&config.archive)?;

    let mut vs_bare = Rounds::new("archive sink", "bare Parquet write");
    for round in 0..rounds {
        let bare_prefix = store.prefix.child(format!("{name}-bare{round}"));
        let bare = async {
            let started = std::time::Instant::now();
            let mut by_partition: std::collections::BTreeMap<i32, Vec<&ArchivedRecord>> =
                Default::default();
            for r in &records {
                by_partition.entry(r.partition).or_default().push(r);
            }
            for (p, of) in by_partition {
                for (i, span) in of.chunks(config.archive.flush_records).enumerate() {
                    let mut folders: std::collections::BTreeMap<Folder, Vec<&ArchivedRecord>> =
                        Default::default();
                    for r in span {
                        folders
                            .entry(Folder::of(&r.tenant, r.received_at))
                            .or_default()
                            .push(r);
                    }
                    for (folder, rs) in folders {
                        let path = folder.path(&bare_prefix).child(format!("{p}-{i}.parquet"));
                        store.store.put(&path, encode(&rs)?.into()).await?;
                    }
                }
            }
            anyhow::Ok(rate(n, started.elapsed()))
        };
        let mut c = config.clone();
        c.archive.url = format!("{base_url}/{name}-sink{round}");
        c.archive.group = format!("{name}-sink{round}");
        let (b, sunk) = alternate(round, bare, sink_rate(&c, "archive")).await?;
        println!(
            "round {}: bare Parquet write {b:.0} records/s, archive sink {sunk:.0} records/s ({:.2})",
            round + 1,
            sunk / b
        );
        vs_bare.push(b, sunk);
        drop_objects(&store, &bare_prefix).await;
        if round + 1 < rounds {
            drop_objects(&store, &store.prefix.child(format!("{name}-sink{round}"))).await;
        }
    }
    println!("archive benchmark: {n} raw records, {rounds} rounds");
    let sink = vs_bare.report(0.7);

    // Replays through parse of the whole raw topic: from Kafka, and from the last round's
    // archive.
    config.archive.url = format!("{base_url}/{name}-sink{}", rounds - 1);
    let parse = sluice_tests::stage("parse");
    let mut vs_kafka = Rounds::new("replay from the archive", "replay from Kafka");
    for round in 0..rounds {
        let everything = sluice::replay::Range::Times {
            from: None,
            to: None,
        };
        let from_kafka = async {
            let (k, t, r) = (
                config.kafka.clone(),
                config.topics.raw.clone(),
                everything.clone(),
            );
            let plan =
                tokio::task::spawn_blocking(move || sluice::replay::resolve(&k, &t, &r, None))
                    .await??;
            let started = std::time::Instant::now();
            replay_into(&config, &plan, parse, &format!("{name}-k{round}")).await?;
            anyhow::Ok(rate(n, started.elapsed()))
        };
        let from_archive = async {
            let started = std::time::Instant::now();
            let part =
                sluice::replay::archive::plan(&config, &everything, None, None, None).await?;
            // As `sluice replay --source archive` does it: parse is fed the archived
            // records in-process.
            let outcome = sluice::replay::archive::replay(
                &config,
                &part,
                &sluice::replay::Target::Component(parse),
                &format!("{name}-a{round}"),
                &sluice::replay::Filters::default(),
                tokio_util::sync::CancellationToken::new(),
            )
            .await?;
            anyhow::ensure!(
                outcome.read == n as u64,
                "the replay from the archive read {} of {n} records",
                outcome.read
            );
            anyhow::Ok(rate(n, started.elapsed()))
        };
        let (k, a) = alternate(round, from_kafka, from_archive).await?;
        println!(
            "round {}: replay from Kafka {k:.0} records/s, from the archive {a:.0} records/s ({:.2})",
            round + 1,
            a / k
        );
        vs_kafka.push(k, a);
    }
    let replay = vs_kafka.report(0.7);
    drop_objects(
        &store,
        &store.prefix.child(format!("{name}-sink{}", rounds - 1)),
    )
    .await;
    sluice_bench::baselines::drop_namespace(&config, &[]).await;
    Ok(serde_json::json!({"records": n, "sink_vs_bare_write": sink, "replay_vs_kafka": replay}))
}

/// Replay `plan` through `stage` under the fresh group `group`, to its end.
async fn replay_into(
    config: &Config,
    plan: &sluice::replay::Plan,
    stage: &'static sluice::components::Component,
    group: &str,
) -> Result<()> {
    let outcome = sluice::replay::run(
        config,
        plan,
        &sluice::replay::Target::Component(stage),
        &sluice::replay::Mode::FreshGroup(group.to_string()),
        &sluice::replay::Filters::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await?;
    anyhow::ensure!(!outcome.interrupted, "the replay was interrupted");
    Ok(())
}

/// Delete every object under `prefix` (the bench leaves the store as it found it).
async fn drop_objects(store: &sluice_sinks::archive::Archive, prefix: &object_store::path::Path) {
    use futures::{StreamExt, TryStreamExt};
    let locations = store
        .store
        .list(Some(prefix))
        .map_ok(|o| o.location)
        .boxed();
    let _ = store
        .store
        .delete_stream(locations)
        .try_collect::<Vec<_>>()
        .await;
}
