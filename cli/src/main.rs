//! `sluice`: run ingest, a stage or a sink, manage topics, or run the demo.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sluice::components::{self, Kind};
use sluice::demo::{self, DemoOptions};
use sluice::pipeline;
use sluice::replay;
use sluice::Config;
use sluice_core::telemetry;

/// Sluice: a Kafka-based multi-stage stream processor.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    /// Config file (TOML). Environment variables `SLUICE__SECTION__KEY` override it.
    #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP ingest endpoint.
    Ingest,
    /// Run a stage (its own consumer group).
    Stage {
        /// Which stage.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(components::names(Kind::Stage)))]
        name: String,
    },
    /// Run a sink (its own consumer group).
    Sink {
        /// Which sink.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(components::names(Kind::Sink)))]
        name: String,
    },
    /// List the stages and sinks (name, kind, topics, group, Helm component); `--json`
    /// for tools (the chart check compares it with the Helm values).
    Components {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Connect to everything a process needs (brokers, its topics, the schema registry,
    /// its database, Elasticsearch or object store), one line each; exits non-zero
    /// naming the first dependency that fails.
    Check {
        /// Only what this component needs: `ingest`, or a stage or sink by name or Helm
        /// name (default: everything).
        #[arg(long)]
        component: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Each component's consumer group: state, members, committed offsets and lag per
    /// partition, and its dead-letter topic's size.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create the pipeline's missing topics, then report how each one on the broker
    /// differs from the configuration (partitions, retention, cleanup policy).
    Topics {
        /// Only report; create nothing. Exits non-zero when a topic is missing or differs.
        #[arg(long)]
        check: bool,
    },
    /// Reprocess a range of a retained topic into a stage or sink (under a fresh consumer
    /// group, bounded by the end offsets at start), reset a group to the range's start,
    /// or copy the range to another topic.
    Replay(Box<ReplayArgs>),
    /// Schema tools.
    Schemas {
        /// What to do.
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// Print the effective configuration (file, stack settings and environment merged;
    /// secrets masked). Exits non-zero, naming the key, when it is invalid.
    Config,
    /// Reconcile event counts per tenant and time bucket (of ingest time) across the raw
    /// topic, the stage topics and their dead letters, TimescaleDB and Elasticsearch.
    /// Exits non-zero when events are missing or duplicated beyond what dead letters and
    /// in-flight records explain.
    Audit {
        /// First ingest time included (RFC 3339).
        #[arg(long, value_parser = replay::parse_time)]
        from: chrono::DateTime<chrono::Utc>,
        /// First ingest time excluded (RFC 3339; default: now).
        #[arg(long, value_parser = replay::parse_time)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Width of a time bucket, e.g. `1h` or `10m`.
        #[arg(long, value_parser = replay::parse_duration, default_value = "1h")]
        bucket: Duration,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Also compare every stored row and document, field by field, with the newest
        /// record of its event on the enriched topic (holds the window's records in memory).
        #[arg(long)]
        values: bool,
    },
    /// Run the demo pipeline end to end on a generated clickstream.
    Demo {
        /// Users per tenant.
        #[arg(long, default_value_t = 40)]
        users: usize,
        /// Tenants (1 to 5).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=5))]
        tenants: u8,
        /// Seed of the clickstream generator.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Longest wait, in seconds, for the pipeline to catch up.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
}

/// `sluice schemas` subcommands.
#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// Check that every schema in DIR reads data written with each released version
    /// (DIR/released/<name>/v<N>.avsc). Exits non-zero naming the incompatibility.
    Check {
        /// Directory of the current `.avsc` files.
        #[arg(long, default_value = "schemas/avro")]
        dir: PathBuf,
    },
}

/// Arguments of `sluice replay`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["stage", "sink", "copy_to"])))]
struct ReplayArgs {
    /// Source topic, or `raw`, `parsed`, `enriched` for the configured ones; `archive` for
    /// the archive of the raw topic; `auto` for the archive where Kafka no longer retains
    /// the range and Kafka for the rest. Default: the input of the target stage or sink.
    #[arg(long)]
    source: Option<String>,
    /// Start of the range: records at or after this RFC 3339 time (by record timestamp).
    #[arg(long, value_parser = replay::parse_time, conflicts_with_all = ["offsets", "last"])]
    from: Option<chrono::DateTime<chrono::Utc>>,
    /// End of the range: records before this RFC 3339 time.
    #[arg(long, value_parser = replay::parse_time, conflicts_with_all = ["offsets", "last"])]
    to: Option<chrono::DateTime<chrono::Utc>>,
    /// The range is the last DURATION up to now, e.g. `2h` or `30m`.
    #[arg(long, value_parser = replay::parse_duration, conflicts_with = "offsets")]
    last: Option<Duration>,
    /// Explicit offsets: `PARTITION=START..[END],...` (END excluded; open = the end now).
    #[arg(long, value_parser = OffsetRanges::parse)]
    offsets: Option<OffsetRanges>,
    /// Only these partitions (comma-separated).
    #[arg(long, value_delimiter = ',')]
    partitions: Option<Vec<i32>>,
    /// Only records of this tenant (by header); the others are skipped.
    #[arg(long)]
    tenant: Option<String>,
    /// Most records per second.
    #[arg(long)]
    rate: Option<std::num::NonZeroU32>,
    /// Replay through this stage.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(components::names(Kind::Stage)))]
    stage: Option<String>,
    /// Replay into this sink.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(components::names(Kind::Sink)))]
    sink: Option<String>,
    /// Copy the range as it is to this topic.
    #[arg(long)]
    copy_to: Option<String>,
    /// Instead of running here, move the stage's or sink's own group to the range start
    /// (refused while the group has active members).
    #[arg(long, conflicts_with_all = ["copy_to", "group", "tenant", "rate", "to"])]
    reset: bool,
    /// With --reset or --offsets-from: really move the group (without it, only the
    /// current and new offsets are shown).
    #[arg(long)]
    execute: bool,
    /// With --reset: where to save the group's previous offsets (default
    /// `<group>.offsets-<time>.json`).
    #[arg(long, requires = "reset")]
    offsets_file: Option<std::path::PathBuf>,
    /// Put back the offsets saved by a `--reset --execute` (needs --execute to act).
    #[arg(long, conflicts_with_all = ["reset", "stage", "sink", "copy_to", "diff", "offsets", "from", "last"])]
    offsets_from: Option<std::path::PathBuf>,
    /// Name of the fresh consumer group (default: `<group>-replay-<time>`).
    #[arg(long)]
    group: Option<String>,
    /// Print the partitions, offsets and record counts, and do nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run the target stage (and the stages after it) over the range into scratch
    /// topics, and print what would change in the sinks, per event and field; write
    /// nothing to the sinks.
    #[arg(long, conflicts_with_all = ["reset", "copy_to", "dry_run"])]
    diff: bool,
    /// With --diff: print the result as JSON.
    #[arg(long, requires = "diff")]
    json: bool,
}

/// The value of `--offsets`.
#[derive(Debug, Clone)]
struct OffsetRanges(Vec<replay::OffsetRange>);

impl OffsetRanges {
    fn parse(s: &str) -> Result<Self, String> {
        replay::parse_offsets(s).map(Self)
    }
}

async fn run_replay(config: &Config, args: ReplayArgs) -> Result<()> {
    use replay::archive::Source;
    use replay::{Mode, Range, Target};
    if let Some(file) = &args.offsets_from {
        return replay::restore(config, file, args.execute);
    }
    let component = |kind, name: &str| {
        components::find(kind, name).with_context(|| format!("no {name} in the registry"))
    };
    let target = match (&args.stage, &args.sink, &args.copy_to) {
        (Some(s), _, _) => Target::Component(component(Kind::Stage, s)?),
        (_, Some(s), _) => Target::Component(component(Kind::Sink, s)?),
        (_, _, Some(t)) => Target::Copy(t.clone()),
        _ => bail!("one of --stage, --sink or --copy-to is required"),
    };
    let t = &config.topics;
    // A topic, an alias of a configured one, a stage's name for its output, or the archive.
    let source = match args.source.as_deref() {
        Some("archive") => Source::Archive,
        Some("auto") => Source::Auto,
        Some("raw") => Source::Topic(t.raw.clone()),
        Some("parsed") => Source::Topic(t.parsed.clone()),
        Some("enriched") => Source::Topic(t.enriched.clone()),
        Some("sessions") => Source::Topic(t.sessions.clone()),
        Some(name) => Source::Topic(
            match components::find(Kind::Stage, name).and_then(|s| s.output(config)) {
                Some(output) => output.to_string(),
                None => name.to_string(),
            },
        ),
        None => match &target {
            Target::Component(c) => Source::Topic(c.input(config).to_string()),
            Target::Copy(_) => bail!("--source is required with --copy-to"),
        },
    };
    let range = match (args.offsets, args.last) {
        (Some(o), _) => Range::Offsets(o.0),
        (_, Some(last)) => Range::Times {
            from: Some(chrono::Utc::now() - chrono::Duration::from_std(last).context("--last")?),
            to: None,
        },
        _ => Range::Times {
            from: args.from,
            to: args.to,
        },
    };
    let from_archive = matches!(source, Source::Archive | Source::Auto);
    if from_archive {
        if let Target::Component(c) = target {
            if c.input(config) != t.raw {
                bail!(
                    "--source {}: the archive holds raw records; replay them through a stage that reads `{}` (--stage parse: its outputs flow on to the sinks) or --copy-to a topic",
                    args.source.as_deref().unwrap_or_default(),
                    t.raw
                );
            }
        }
        if args.reset {
            bail!(
                "--reset moves a consumer group on Kafka and cannot read the archive; drop --reset"
            );
        }
        if args.diff && source == Source::Auto {
            bail!("--diff reads one source: run it with --source archive and with --source raw");
        }
    }
    // What to replay, in order: the archive's part (put back on a scratch topic), then
    // Kafka's.
    let mut plans: Vec<replay::Plan> = Vec::new();
    let mut scratch: Vec<String> = Vec::new();
    let partitions = args.partitions.clone();
    let archive_part = match &source {
        Source::Topic(topic) => {
            let (kafka, topic, range) = (config.kafka.clone(), topic.clone(), range.clone());
            let parts = partitions.clone();
            let plan = tokio::task::block_in_place(move || {
                replay::resolve(&kafka, &topic, &range, parts.as_deref())
            })?;
            if !args.json {
                print!("{}", plan.table());
            }
            plans.push(plan);
            None
        }
        Source::Archive => Some(
            replay::archive::plan(
                config,
                &range,
                args.tenant.as_deref(),
                partitions.as_deref(),
                None,
            )
            .await?,
        ),
        Source::Auto => {
            let (kafka_plan, seam) =
                replay::archive::kafka_part(config, &range, partitions.as_deref())?;
            let part = replay::archive::plan(
                config,
                &range,
                args.tenant.as_deref(),
                partitions.as_deref(),
                Some(&seam),
            )
            .await?;
            print!("{}", kafka_plan.table());
            plans.push(kafka_plan);
            Some(part)
        }
    };
    if let Some(part) = &archive_part {
        if !args.json {
            print!("{}", part.table());
        }
    }
    if args.dry_run {
        println!("dry run: nothing was read or written");
        return Ok(());
    }
    // A replay into a stage is fed the archived records in-process; a diff or a copy
    // reads them from a scratch topic they are put back on first.
    let mut fed = None;
    if let Some(part) = archive_part.filter(|p| !p.is_empty()) {
        if matches!(target, Target::Component(_)) && !args.diff {
            fed = Some(part);
        } else {
            let topic = replay::archive::scratch_topic(config).await?;
            scratch.push(topic.topic.clone());
            let plan =
                replay::archive::fill(config, &part, &topic, &pipeline::shutdown_on_signals())
                    .await;
            plans.insert(0, dropping_scratch_on_error(config, &scratch, plan).await?);
        }
    }
    if fed.is_none() && plans.iter().all(|p| p.records() == 0) {
        println!("nothing to replay in that range");
        return Ok(());
    }
    let filters = replay::Filters {
        tenant: args.tenant.clone(),
        rate: args.rate,
    };
    if args.diff {
        let diff = replay::diff::run(
            config,
            &plans[0],
            &target,
            &filters,
            pipeline::shutdown_on_signals(),
        )
        .await?;
        drop_scratch(config, &scratch).await;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&diff).context("writing JSON")?
            );
        } else {
            print!("{}", diff.render());
        }
        return Ok(());
    }
    let base_group = match target {
        Target::Component(c) => c.group(config).to_string(),
        Target::Copy(_) => String::new(),
    };
    let group = args.group.unwrap_or_else(|| {
        format!(
            "{base_group}-replay-{}",
            chrono::Utc::now().format("%Y%m%d%H%M%S")
        )
    });
    let several = plans.len() + usize::from(fed.is_some()) > 1;
    if let Some(part) = fed {
        // The archive's part first: in `auto`, what Kafka no longer retains.
        let name = if several {
            format!("{group}-archive")
        } else {
            group.clone()
        };
        println!("from the archive, replay {name}");
        let outcome = replay::archive::replay(
            config,
            &part,
            &target,
            &name,
            &filters,
            pipeline::shutdown_on_signals(),
        )
        .await?;
        println!("{}", outcome.summary());
        if outcome.interrupted {
            std::process::exit(130);
        }
    }
    for plan in &plans {
        let restored = scratch.contains(&plan.topic);
        let mode = if args.reset {
            Mode::ResetGroup {
                execute: args.execute,
                save_to: args.offsets_file.clone(),
            }
        } else {
            Mode::FreshGroup(group.clone())
        };
        if several {
            if restored {
                println!("from the archive, via {}", plan.topic);
            } else {
                println!("from Kafka, {}", plan.topic);
            }
        }
        if let Mode::FreshGroup(g) = &mode {
            if !matches!(target, Target::Copy(_)) {
                println!("consumer group {g}");
            }
        }
        let outcome = replay::run(
            config,
            plan,
            &target,
            &mode,
            &filters,
            pipeline::shutdown_on_signals(),
        )
        .await;
        let outcome = dropping_scratch_on_error(config, &scratch, outcome).await?;
        if !args.reset {
            println!("{}", outcome.summary());
        }
        if outcome.interrupted {
            if restored {
                println!(
                    "the archived range stays on {}: resume with --source {} and the --offsets above",
                    plan.topic, plan.topic
                );
            }
            std::process::exit(130);
        }
        if restored {
            drop_scratch(config, std::slice::from_ref(&plan.topic)).await;
        }
    }
    Ok(())
}

/// Delete the scratch topics archived records were put back on.
async fn drop_scratch(config: &Config, topics: &[String]) {
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    if refs.is_empty() {
        return;
    }
    if let Err(e) = sluice_core::kafka::delete_topics(&config.kafka, &refs).await {
        tracing::warn!(error = %e, topics = %refs.join(","), "could not delete the scratch topics; delete them by hand");
    }
}

/// `result`; when it is an error, the scratch topics are deleted first (a restore that
/// failed leaves nothing to resume from them).
async fn dropping_scratch_on_error<T>(
    config: &Config,
    scratch: &[String],
    result: Result<T>,
) -> Result<T> {
    if result.is_err() {
        drop_scratch(config, scratch).await;
    }
    result
}

/// Install the metrics recorder for `component` and, when `metrics.listen` is set, serve
/// the ops endpoint.
async fn serve_ops(
    config: &Config,
    component: &str,
) -> Result<metrics_exporter_prometheus::PrometheusHandle> {
    let idle = Duration::from_secs(config.metrics.idle_timeout_s.max(1));
    let handle = telemetry::install_metrics(component, idle).context("metrics recorder")?;
    if let Some(listen) = config.metrics.listen {
        let addr = telemetry::serve_ops(
            listen,
            handle.clone(),
            telemetry::process_readiness().clone(),
        )
        .await
        .with_context(|| format!("metrics.listen: binding {listen}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    Ok(handle)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // The log format is a setting: the configuration is read first (its errors go to
    // stderr as they are).
    let config = pipeline::load_config(cli.config.as_deref())?;
    telemetry::init_logging_as(config.log.format);
    match cli.command {
        Command::Ingest => {
            // Metrics on the ops port only: the public port is the tenants'.
            serve_ops(&config, "ingest").await?;
            pipeline::reach_kafka(&config).await?;
            let shutdown = pipeline::shutdown_on_signals();
            let (_, task) = pipeline::start_ingest(&config, shutdown).await?;
            telemetry::process_readiness().set(true);
            task.await??;
        }
        command @ (Command::Stage { .. } | Command::Sink { .. }) => {
            let (kind, name) = match command {
                Command::Stage { name } => (Kind::Stage, name),
                Command::Sink { name } => (Kind::Sink, name),
                _ => unreachable!("matched above"),
            };
            let component = components::find(kind, &name)
                .with_context(|| format!("no {name} in the registry"))?;
            serve_ops(&config, component.helm).await?;
            pipeline::reach_kafka(&config).await?;
            let stats = component
                .run(&config, pipeline::shutdown_on_signals())
                .await?;
            tracing::info!(
                consumed = stats.consumed,
                written = stats.written,
                dead_lettered = stats.dead_lettered,
                "done"
            );
        }
        Command::Check { component, json } => {
            let (ingest, selected) = sluice::check::select(component.as_deref())?;
            let checked = sluice::check::run(&config, ingest, &selected).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&checked)?);
            } else {
                for c in &checked {
                    println!("{}", c.line());
                }
            }
            let failed: Vec<&str> = checked
                .iter()
                .filter(|c| !c.ok)
                .map(|c| c.dependency.as_str())
                .collect();
            if !failed.is_empty() {
                bail!("failed: {}", failed.join(", "));
            }
        }
        Command::Status { json } => {
            let c = config.clone();
            let groups = tokio::task::spawn_blocking(move || sluice::status::collect(&c)).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&groups)?);
            } else {
                print!("{}", sluice::status::render(&groups));
            }
        }
        Command::Components { json } => {
            let list: Vec<serde_json::Value> = components::COMPONENTS
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "name": c.name, "kind": c.kind, "about": c.about,
                        "input": c.input(&config), "output": c.output(&config),
                        "dlq": c.dlq(&config), "group": c.group(&config), "helm": c.helm,
                        "holds_events": c.read_stored.is_some(),
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for c in components::COMPONENTS {
                    println!(
                        "{:<6} {:<14} {:<22} → {:<22} group {:<28} {}",
                        format!("{:?}", c.kind).to_lowercase(),
                        c.name,
                        c.input(&config),
                        c.output(&config).unwrap_or("(destination)"),
                        c.group(&config),
                        c.about
                    );
                }
            }
        }
        Command::Topics { check } => {
            let created = if check {
                Vec::new()
            } else {
                sluice_core::kafka::ensure_topics(
                    &config.kafka,
                    &config.topics,
                    &components::topics(&config),
                )
                .await?
            };
            let report = sluice_core::kafka::check_topics(
                &config.kafka,
                &config.topics,
                &components::topics(&config),
            )
            .await?;
            let mut bad = 0;
            for t in &report {
                let state = match (
                    created.contains(&t.topic),
                    t.exists,
                    t.differences.is_empty(),
                ) {
                    (true, _, _) => "created".to_string(),
                    (_, true, true) => "ok".to_string(),
                    _ => {
                        bad += 1;
                        t.differences.join("; ")
                    }
                };
                println!("{:<40} {state}", t.topic);
            }
            if check && bad > 0 {
                bail!("{bad} topic(s) missing or different from the configuration");
            }
        }
        Command::Schemas {
            command: SchemasCommand::Check { dir },
        } => {
            let verdicts = sluice_schemas::compat::check_dir(&dir)
                .with_context(|| format!("--dir {}", dir.display()))?;
            let mut bad = 0;
            for v in &verdicts {
                match &v.incompatibility {
                    None => println!("ok   {} reads {}", v.schema.display(), v.released.display()),
                    Some(why) => {
                        bad += 1;
                        println!(
                            "FAIL {} cannot read {}: {why}",
                            v.schema.display(),
                            v.released.display()
                        );
                    }
                }
            }
            if bad > 0 {
                bail!("{bad} schema(s) not backward-compatible with a released version");
            }
        }
        Command::Config => print!(
            "{}",
            config
                .to_redacted_toml()
                .context("writing the configuration")?
        ),
        Command::Audit {
            from,
            to,
            bucket,
            tenant,
            values,
        } => {
            let to = to.unwrap_or_else(chrono::Utc::now);
            if from >= to {
                bail!("--from ({from}) must be before --to ({to})");
            }
            if bucket.is_zero() {
                bail!("--bucket must be longer than zero");
            }
            let window = sluice::audit::Window {
                from,
                to,
                bucket,
                tenant,
                values,
            };
            let report = sluice::audit::run(&config, &window).await?;
            print!("{}", report.render());
            if !report.ok() {
                std::process::exit(1);
            }
        }
        Command::Replay(args) => run_replay(&config, *args).await?,
        Command::Demo {
            users,
            tenants,
            seed,
            timeout,
        } => {
            let run = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
            let mut config = config.namespaced(&format!("demo-{run}"), "demo");
            // Sinks use a fixed schema and index prefix so each run replaces the last one.
            config.elasticsearch.index_prefix = "demo-events".into();
            if config.enrich.geo_csv.is_none() {
                config.enrich.geo_csv =
                    Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/ip-networks.csv").into());
            }
            let options = DemoOptions {
                users,
                tenants: tenants.into(),
                seed,
                timeout: Duration::from_secs(timeout),
            };
            let (summary, _) = demo::run_pipeline(config, &options).await?;
            summary.print();
            if summary.checks().iter().any(|(_, ok)| !ok) {
                bail!("the counts do not add up");
            }
        }
    }
    Ok(())
}
