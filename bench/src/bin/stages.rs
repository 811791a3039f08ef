//! Stage throughput: each stage (parse at-least-once and exactly-once, enrich) against a
//! bare rdkafka consume→produce pass-through of the same input records (no transform),
//! on the same broker. Every pass starts a fresh consumer group and ends when a
//! `read_committed` reader has seen all its outputs; its topics are deleted after it.
//! A round runs every pass once, back to back; the median of the per-round ratios is
//! reported with the lowest and highest. An identity stage (the stage runtime with a
//! transform that forwards each record as it is) is measured too: it separates what the
//! runtime costs (offset tracking, acks, stamps) from what a transform costs.
//!
//! Each pass also measures the CPU a record cost this process (the bench and the stage
//! it runs) and the broker, over the same window as its rate. The two cores are
//! saturated during a pass, so a pass's rate follows its total CPU per record: the
//! split says where a ratio comes from.
//!
//! Run with the stack up: `cargo run --release -p sluice-bench --bin stages`.

use anyhow::{Context, Result};
use clap::Parser;
use sluice::Config;
use sluice_bench::baselines::{
    drop_namespace, drop_topics, finished, geo_table, pass_through, produce_raw, Window,
};
use sluice_bench::procstat::ThreadSplit;
use sluice_bench::{median, rate, write_json, Rounds};
use tokio_util::sync::CancellationToken;

/// The stage runtime's share alone: each record forwarded unchanged (key, value,
/// headers), as the pass-through does, but through offset tracking, delivery acks and
/// the stage's stamps.
struct Identity;

impl sluice_stages::Transform for Identity {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn process<M: rdkafka::Message>(
        &self,
        m: &M,
    ) -> Result<Vec<sluice_stages::Output>, sluice_stages::Failure> {
        Ok(vec![sluice_stages::Output {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers: sluice_core::headers::forward(m.headers(), &[]),
        }])
    }
}

/// Stages benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Raw records per pass. A pass must last seconds, not a fraction of one: the test
    /// broker's periodic saves take about half a core, and a pass that short meets one
    /// or misses it, which moved the copy's rate 2× from pass to pass at 200,000.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Rounds of every pass (the default keeps a rerun's ratios within about ±0.05).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Rows of the geo table enrich looks every event's IP up in (0: no table). A real
    /// country-level table has a few hundred thousand.
    #[arg(long, default_value_t = 250_000)]
    geo_rows: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    sluice_core::telemetry::init_logging();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

/// The geo table every pass's enrich loads, written once at the start.
static GEO_TABLE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// A config whose topics and groups are new (`tag` keeps passes apart), reading `raw`
/// (or a new raw topic).
async fn namespace(tag: &str, raw: Option<&str>) -> Result<Config> {
    let mut config = sluice_tests::stack_config();
    config.enrich.geo_csv = GEO_TABLE.get().cloned();
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

/// One stage in a fresh group until every output reached `output`; its time as
/// [`finished`] measures it.
async fn run_stage(
    config: &Config,
    name: &str,
    output: &str,
    n: usize,
    exactly_once: bool,
) -> Result<Window> {
    let stop = CancellationToken::new();
    if name == "identity" {
        let spec = sluice_stages::StageSpec::new(
            &config.topics,
            &format!("{}-identity", config.parse.group),
            &config.topics.raw,
            output,
            &Default::default(),
        );
        let (k, s) = (config.kafka.clone(), stop.clone());
        let task = tokio::spawn(async move {
            sluice_stages::run_stage(&k, &spec, std::sync::Arc::new(Identity), s).await
        });
        let window = finished(config, output, n, None).await?;
        stop.cancel();
        task.await.context("stage task")??;
        return Ok(window);
    }
    let component = sluice_tests::stage(name);
    let (c, s) = (config.clone(), stop.clone());
    let task = tokio::spawn(async move { component.run(&c, s).await });
    let committed = exactly_once.then(|| ((component.group)(config), component.input(config)));
    let window = finished(config, output, n, committed).await?;
    stop.cancel();
    task.await.context("stage task")??;
    Ok(window)
}

/// What a pass reads: the raw records, or the parsed ones.
#[derive(Clone, Copy)]
enum Reads<'a> {
    Raw(&'a str),
    Parsed(&'a str),
}

/// A stage pass (or the pass-through when `stage` is `None`) from the shared input to a
/// fresh namespace's next topic; its rate. The namespace's topics are deleted after it,
/// the shared input kept.
async fn pass(
    tag: &str,
    stage: Option<&str>,
    reads: Reads<'_>,
    exactly_once: bool,
    n: usize,
) -> Result<Pass> {
    let (mut c, input) = match reads {
        Reads::Raw(raw) => (namespace(tag, Some(raw)).await?, raw),
        Reads::Parsed(parsed) => (namespace(tag, None).await?, parsed),
    };
    let output = match reads {
        Reads::Raw(_) => c.topics.parsed.clone(),
        Reads::Parsed(parsed) => {
            c.topics.parsed = parsed.to_string();
            c.topics.enriched.clone()
        }
    };
    c.parse.exactly_once = exactly_once;
    let window = match stage {
        Some(s) => run_stage(&c, s, &output, n, exactly_once).await?,
        None => pass_through(&c, input, &output, n).await?,
    };
    let (process, broker) = window.cpu.per_record(n);
    drop_namespace(&c, &[input]).await;
    Ok(Pass {
        rate: rate(n, window.elapsed),
        process,
        broker,
        threads: window.threads,
        records: n,
    })
}

/// What one pass measured.
#[derive(Debug, Clone)]
struct Pass {
    /// Records per second.
    rate: f64,
    /// CPU microseconds per record of this process (the bench and the stage in it).
    process: f64,
    /// CPU microseconds per record of the broker.
    broker: f64,
    /// CPU seconds by kind of thread, of this process and of the broker.
    threads: ThreadSplit,
    /// Records it passed.
    records: usize,
}

/// The passes of a round, in the order they run.
const PASSES: [&str; 6] = [
    "raw pass-through",
    "identity stage",
    "parse",
    "parse exactly-once",
    "parsed pass-through",
    "enrich",
];

/// Print what a record cost each pass in CPU (the median of the rounds), and return it
/// for the JSON. On a saturated machine a pass's rate follows its total CPU per record,
/// so this says where a ratio comes from: the stage's own process, or the broker.
fn report_costs(costs: &std::collections::BTreeMap<&str, Vec<Pass>>) -> serde_json::Value {
    println!("CPU per record, median of the rounds (here: this process, the bench and the stage it runs; broker: the Kafka server, its periodic saves included):");
    let mut json = serde_json::Map::new();
    let mut totals = std::collections::BTreeMap::new();
    for name in PASSES {
        let passes = costs.get(name).map(Vec::as_slice).unwrap_or_default();
        let here = median(&mut passes.iter().map(|p| p.process).collect::<Vec<_>>());
        let broker = median(&mut passes.iter().map(|p| p.broker).collect::<Vec<_>>());
        println!(
            "  {name:<22} {here:>6.1} µs here + {broker:>5.1} µs broker = {:>5.1} µs",
            here + broker
        );
        totals.insert(name, here + broker);
        json.insert(
            name.to_string(),
            serde_json::json!({"here": here, "broker": broker}),
        );
    }
    // The throughput ratio a pass would have if CPU were all that limits it: steadier
    // than the rates, which the broker's saves shake (a short pass meets one or not).
    let mut ratios = serde_json::Map::new();
    let mut line = String::from("CPU cost ratios (baseline's CPU per record / the stage's):");
    for (stage, baseline) in [
        (PASSES[1], PASSES[0]),
        (PASSES[2], PASSES[0]),
        (PASSES[3], PASSES[0]),
        (PASSES[5], PASSES[4]),
    ] {
        let ratio = totals[baseline] / totals[stage].max(1e-9);
        line.push_str(&format!(" {stage} {ratio:.2};"));
        ratios.insert(stage.to_string(), ratio.into());
    }
    println!("{}", line.trim_end_matches(';'));
    json.insert("cost_ratios".into(), ratios.into());
    json.insert("threads_us_per_record".into(), report_threads(costs));
    json.into()
}

/// Print where each pass's CPU went, by kind of thread, over all its rounds: µs a record
/// of this process's threads (tokio workers running the stage, librdkafka's broker and
/// main threads, …) and of the broker's. Kinds under 0.05 µs are left out.
fn report_threads(costs: &std::collections::BTreeMap<&str, Vec<Pass>>) -> serde_json::Value {
    println!("CPU per record by thread, all rounds (here | broker), µs:");
    let mut json = serde_json::Map::new();
    for name in PASSES {
        let passes = costs.get(name).map(Vec::as_slice).unwrap_or_default();
        let mut sum = ThreadSplit::default();
        for p in passes {
            sum.add(&p.threads);
        }
        let records: usize = passes.iter().map(|p| p.records).sum::<usize>().max(1);
        let side = |m: &std::collections::BTreeMap<String, f64>| {
            let mut v: Vec<(String, f64)> = m
                .iter()
                .map(|(k, s)| (k.clone(), s * 1e6 / records as f64))
                .filter(|(_, us)| *us >= 0.05)
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            v
        };
        let (here, broker) = (side(&sum.process), side(&sum.broker));
        let show = |v: &[(String, f64)]| {
            v.iter()
                .map(|(k, us)| format!("{k} {us:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("  {name:<22} {} | {}", show(&here), show(&broker));
        json.insert(
            name.to_string(),
            serde_json::json!({"here": here, "broker": broker}),
        );
    }
    json.into()
}

async fn run(args: Args) -> Result<()> {
    let n = args.events;
    if args.geo_rows > 0 {
        let path =
            std::env::temp_dir().join(format!("sluice-bench-geo-{}.csv", std::process::id()));
        geo_table(&path, args.geo_rows).context("writing the geo table")?;
        GEO_TABLE.get_or_init(|| path);
    }
    let source = namespace("b-src-", None).await?;
    let raw = source.topics.raw.clone();
    produce_raw(&source, n)
        .await
        .context("producing the raw records")?;
    // The parsed records enrich reads: the output of one parse pass, complete.
    let parsed_src = namespace("b-parsed-", Some(&raw)).await?;
    run_stage(&parsed_src, "parse", &parsed_src.topics.parsed, n, false).await?;
    let parsed = parsed_src.topics.parsed.clone();
    println!(
        "{n} raw records on {raw}, parsed on {parsed}; {} rounds; enrich's geo table has {} rows",
        args.rounds, args.geo_rows
    );

    let mut alo = Rounds::new("parse (at-least-once)", "pass-through of raw");
    let mut eos = Rounds::new("parse (exactly-once)", "pass-through of raw");
    let mut enrich = Rounds::new("enrich (at-least-once)", "pass-through of parsed");
    let mut identity = Rounds::new("identity stage (runtime only)", "pass-through of raw");
    let mut costs: std::collections::BTreeMap<&str, Vec<Pass>> = Default::default();
    for round in 1..=args.rounds.max(1) {
        let raw_pt = pass("b-pt-", None, Reads::Raw(&raw), false, n).await?;
        let ident = pass("b-id-", Some("identity"), Reads::Raw(&raw), false, n).await?;
        let parse = pass("b-parse-", Some("parse"), Reads::Raw(&raw), false, n).await?;
        let parse_eos = pass("b-eos-", Some("parse"), Reads::Raw(&raw), true, n).await?;
        let parsed_pt = pass("b-pt2-", None, Reads::Parsed(&parsed), false, n).await?;
        let enriched = pass(
            "b-enrich-",
            Some("enrich"),
            Reads::Parsed(&parsed),
            false,
            n,
        )
        .await?;
        println!(
            "round {round}: raw pass-through {:.0}/s, identity stage {:.0}/s ({:.2}), parse {:.0}/s ({:.2}), parse exactly-once {:.0}/s ({:.2}); parsed pass-through {:.0}/s, enrich {:.0}/s ({:.2})",
            raw_pt.rate,
            ident.rate,
            ident.rate / raw_pt.rate,
            parse.rate,
            parse.rate / raw_pt.rate,
            parse_eos.rate,
            parse_eos.rate / raw_pt.rate,
            parsed_pt.rate,
            enriched.rate,
            enriched.rate / parsed_pt.rate
        );
        alo.push(raw_pt.rate, parse.rate);
        identity.push(raw_pt.rate, ident.rate);
        eos.push(raw_pt.rate, parse_eos.rate);
        enrich.push(parsed_pt.rate, enriched.rate);
        for (name, p) in PASSES
            .into_iter()
            .zip([raw_pt, ident, parse, parse_eos, parsed_pt, enriched])
        {
            costs.entry(name).or_default().push(p);
        }
    }
    drop_namespace(&parsed_src, &[]).await;
    drop_topics(&source, &[&raw]).await;
    if let Some(path) = GEO_TABLE.get() {
        let _ = std::fs::remove_file(path);
    }

    println!(
        "stages benchmark: {n} records per pass, {} rounds",
        args.rounds
    );
    let results = [alo.report(0.7), eos.report(0.5), enrich.report(0.6)];
    let mut vs_eos = Rounds::new("parse at-least-once", "parse exactly-once");
    for (a, e) in alo.pairs.iter().zip(&eos.pairs) {
        vs_eos.push(e.1, a.1);
    }
    let ordering = vs_eos.report(1.0);
    let runtime = identity.inform();
    let cpu = report_costs(&costs);
    if let Some(path) = &args.json {
        write_json(
            path,
            &serde_json::json!({
                "bench": "stages", "events": n, "rounds": args.rounds, "geo_rows": args.geo_rows,
                "parse_at_least_once": results[0], "parse_exactly_once": results[1],
                "enrich": results[2], "at_least_once_vs_exactly_once": ordering,
                "identity_stage": runtime, "cpu_us_per_record": cpu,
            }),
        )?;
    }
    Ok(())
}
