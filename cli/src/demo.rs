//! The end-to-end demo: a generated clickstream posted through HTTP ingest, parsed,
//! enriched and written to TimescaleDB and Elasticsearch, then counted at every layer.
//! The same generator and counting serve the integration tests.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::message::Message;
use serde_json::json;
use sluice_core::{headers, kafka};
use sluice_ingest::config::ApiKey;
use sluice_sinks::timescale;
use tokio_util::sync::CancellationToken;

use crate::components::{self, Config};
use crate::pipeline::start_ingest;

/// One NDJSON request of the generated clickstream.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Tenant that sends it.
    pub tenant: String,
    /// That tenant's API key.
    pub api_key: String,
    /// The request body.
    pub body: String,
    /// Lines in the body.
    pub lines: usize,
}

/// A generated clickstream and what it should produce.
#[derive(Debug, Clone, Default)]
pub struct Clickstream {
    /// The requests to post.
    pub batches: Vec<Batch>,
    /// Lines over all requests.
    pub lines: usize,
    /// Lines that the parse stage must dead-letter.
    pub malformed: usize,
    /// Those lines, in the order they were generated.
    pub malformed_lines: Vec<String>,
    /// Valid `page_view` events.
    pub page_views: usize,
    /// Distinct (tenant, user) pairs with valid events.
    pub users: usize,
}

const PAGES: &[&str] = &[
    "/",
    "/pricing",
    "/docs",
    "/docs/install",
    "/blog",
    "/signup",
    "/cart",
    "/checkout",
];
const AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:120.0) Gecko/20100101 Firefox/120.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36",
];
const IPS: &[&str] = &[
    "10.1.4.7",
    "10.20.0.3",
    "192.0.2.15",
    "198.51.100.23",
    "203.0.113.9",
    "2001:db8::42",
];

/// Lines that the parse stage must reject, one per kind of mistake.
const MALFORMED: &[&str] = &[
    r#"{"user_id":"u1","type":"page_view","ts":"#,
    r#"{"type":"page_view","ts":"2026-11-23T10:00:00Z","url":"/"}"#,
    r#"{"user_id":true,"type":"click","ts":1795428000000}"#,
    r#"["page_view","/pricing"]"#,
    r#"{"user_id":"u9","type":"click","ts":"half past ten"}"#,
];

/// Generate sessions of page views and clicks for `users` users of each tenant,
/// starting at `start_ms`, with a malformed line every 25 lines or so. Deterministic
/// for a seed.
pub fn generate(
    seed: u64,
    tenants: &[(String, String)],
    users: usize,
    start_ms: i64,
) -> Clickstream {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Clickstream::default();
    let mut seen_users = HashSet::new();
    for (tenant, key) in tenants {
        let mut lines = Vec::new();
        for u in 0..users {
            let user = format!("user-{u}");
            let agent = AGENTS[rng.random_range(0..AGENTS.len())];
            let ip = IPS[rng.random_range(0..IPS.len())];
            let mut t = start_ms + rng.random_range(0..600_000);
            for s in 0..rng.random_range(1..=3) {
                let session = format!("{tenant}-{user}-s{s}");
                for _ in 0..rng.random_range(3..=10) {
                    let page_view = rng.random_bool(0.6);
                    let mut event = json!({
                        "user_id": user, "session_id": session,
                        "type": if page_view { "page_view" } else { "click" },
                        "url": PAGES[rng.random_range(0..PAGES.len())],
                        "user_agent": agent, "ip": ip,
                    });
                    // Mix the accepted time formats.
                    event["ts"] = match rng.random_range(0..3) {
                        0 => json!(chrono::DateTime::from_timestamp_millis(t)
                            .unwrap_or_default()
                            .to_rfc3339()),
                        1 => json!(t),
                        _ => json!(t / 1000),
                    };
                    if !page_view {
                        event["element"] = json!(format!("button#cta-{}", rng.random_range(1..4)));
                    }
                    lines.push(event.to_string());
                    out.page_views += usize::from(page_view);
                    seen_users.insert((tenant.clone(), user.clone()));
                    if rng.random_range(0..25) == 0 {
                        let bad = MALFORMED[out.malformed % MALFORMED.len()].to_string();
                        lines.push(bad.clone());
                        out.malformed_lines.push(bad);
                        out.malformed += 1;
                    }
                    t += rng.random_range(2_000..90_000);
                }
                // Sessions are separated by more than 30 minutes of inactivity.
                t += rng.random_range(1_900_000..4_000_000);
            }
        }
        out.lines += lines.len();
        for chunk in lines.chunks(250) {
            out.batches.push(Batch {
                tenant: tenant.clone(),
                api_key: key.clone(),
                body: chunk.join("\n") + "\n",
                lines: chunk.len(),
            });
        }
    }
    out.users = seen_users.len();
    out
}

/// Counts at every layer of the pipeline after a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Lines accepted by ingest (answered 202).
    pub ingested: u64,
    /// Records on the raw topic.
    pub raw: u64,
    /// Records on the parsed topic.
    pub parsed: u64,
    /// Dead letters of the parse stage, by error class.
    pub parse_dead_letters: BTreeMap<String, u64>,
    /// Records on the enriched topic.
    pub enriched: u64,
    /// Dead letters of the enrich stage.
    pub enrich_dead_letters: u64,
    /// Dead letters of each sink, by sink.
    pub sink_dead_letters: BTreeMap<String, u64>,
    /// Rows in the events table.
    pub db_rows: u64,
    /// Rows of `page_view` events in the events table.
    pub db_page_view_rows: u64,
    /// Whether TimescaleDB (and so the continuous aggregates) was used.
    pub timescale: bool,
    /// Total views in the hourly continuous aggregate (hierarchical, from per-minute).
    pub cagg_views: u64,
    /// Rows of the hourly continuous aggregate.
    pub cagg_rows: u64,
    /// Documents in Elasticsearch.
    pub es_docs: u64,
    /// Raw records in the archive (every copy counted); none when it was not run.
    pub archived: Option<u64>,
}

impl Summary {
    /// Dead letters of the parse stage.
    pub fn parse_dead_lettered(&self) -> u64 {
        self.parse_dead_letters.values().sum()
    }

    /// Each way the counts must add up, with whether they do.
    pub fn checks(&self) -> Vec<(String, bool)> {
        let sink_dl = |s: &str| self.sink_dead_letters.get(s).copied().unwrap_or(0);
        let mut checks = vec![
            (
                format!("ingested {} = raw {}", self.ingested, self.raw),
                self.ingested == self.raw,
            ),
            (
                format!(
                    "raw {} = parsed {} + dead-lettered {}",
                    self.raw,
                    self.parsed,
                    self.parse_dead_lettered()
                ),
                self.raw == self.parsed + self.parse_dead_lettered(),
            ),
            (
                format!(
                    "parsed {} = enriched {} + dead-lettered {}",
                    self.parsed, self.enriched, self.enrich_dead_letters
                ),
                self.parsed == self.enriched + self.enrich_dead_letters,
            ),
            (
                format!(
                    "enriched {} = TimescaleDB rows {} + dead-lettered {}",
                    self.enriched,
                    self.db_rows,
                    sink_dl("timescale")
                ),
                self.enriched == self.db_rows + sink_dl("timescale"),
            ),
            (
                format!(
                    "enriched {} = Elasticsearch docs {} + dead-lettered {}",
                    self.enriched,
                    self.es_docs,
                    sink_dl("elasticsearch")
                ),
                self.enriched == self.es_docs + sink_dl("elasticsearch"),
            ),
        ];
        if let Some(archived) = self.archived {
            checks.push((
                format!("raw {} = archived {archived}", self.raw),
                self.raw == archived,
            ));
        }
        if self.timescale {
            checks.push((
                format!(
                    "page-view rows {} = views in the hourly aggregate {}",
                    self.db_page_view_rows, self.cagg_views
                ),
                self.db_page_view_rows == self.cagg_views,
            ));
        }
        checks
    }

    /// Print the summary table and the checks.
    pub fn print(&self) {
        let n = |v: u64| v.to_string();
        let reasons: Vec<String> = self
            .parse_dead_letters
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!();
        println!("Sluice demo summary");
        println!(
            "  {:<34}{:>8}",
            "events ingested (HTTP 202)",
            n(self.ingested)
        );
        println!("  {:<34}{:>8}", "parsed", n(self.parsed));
        println!(
            "  {:<34}{:>8}   ({})",
            "dead-lettered by parse",
            n(self.parse_dead_lettered()),
            reasons.join(", ")
        );
        println!("  {:<34}{:>8}", "enriched", n(self.enriched));
        println!(
            "  {:<34}{:>8}",
            "rows in TimescaleDB (events)",
            n(self.db_rows)
        );
        if self.timescale {
            println!(
                "  {:<34}{:>8}   (page_views_1h: {} views)",
                "rows in continuous aggregate",
                n(self.cagg_rows),
                self.cagg_views
            );
        } else {
            println!(
                "  {:<34}{:>8}",
                "continuous aggregate", "n/a (plain PostgreSQL)"
            );
        }
        println!("  {:<34}{:>8}", "docs in Elasticsearch", n(self.es_docs));
        match self.archived {
            Some(a) => println!("  {:<34}{:>8}", "raw records in the archive", n(a)),
            None => println!("  {:<34}{:>8}", "archive", "not run"),
        }
        println!();
        for (what, ok) in self.checks() {
            println!("  [{}] {what}", if ok { "ok" } else { "MISMATCH" });
        }
    }
}

fn sum(offsets: &[(i32, i64)]) -> u64 {
    offsets.iter().map(|(_, o)| (*o).max(0) as u64).sum()
}

/// Records on `topic` now.
pub async fn topic_count(config: &Config, topic: &str) -> Result<u64> {
    let (k, t) = (config.kafka.clone(), topic.to_string());
    let ends = tokio::task::spawn_blocking(move || kafka::end_offsets(&k, &t)).await??;
    Ok(sum(&ends))
}

/// Wait until `group` has committed everything on `topic`, or fail after `timeout`.
pub async fn wait_caught_up(
    config: &Config,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (k, g, t) = (config.kafka.clone(), group.to_string(), topic.to_string());
        let lag = tokio::task::spawn_blocking(move || kafka::lag(&k, &g, &t)).await??;
        if lag <= 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("group {group} still has {lag} records to process on {topic} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Dead letters on `topic`, counted by the header `by`.
pub async fn dead_letters_by(
    config: &Config,
    topic: &str,
    by: &'static str,
) -> Result<BTreeMap<String, u64>> {
    let (k, t) = (config.kafka.clone(), topic.to_string());
    let records =
        tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(30)))
            .await??;
    let mut out = BTreeMap::new();
    for r in &records {
        let key = headers::get(r.headers(), by)
            .unwrap_or("unknown")
            .to_string();
        *out.entry(key).or_insert(0) += 1;
    }
    Ok(out)
}

/// Post the clickstream to ingest at `addr`. Returns the lines accepted.
pub async fn post_clickstream(addr: std::net::SocketAddr, stream: &Clickstream) -> Result<u64> {
    let http = reqwest::Client::new();
    let mut accepted = 0u64;
    for b in &stream.batches {
        let resp = http
            .post(format!("http://{addr}/v1/events"))
            .bearer_auth(&b.api_key)
            .header("content-type", "application/x-ndjson")
            .body(b.body.clone())
            .send()
            .await
            .context("posting to ingest")?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if status.as_u16() != 202 {
            bail!("ingest answered {status}: {body}");
        }
        accepted += body["accepted"].as_u64().unwrap_or(0);
    }
    Ok(accepted)
}

/// Count what the sinks hold: rows, page-view rows and the aggregates (TimescaleDB),
/// and documents (Elasticsearch). Call with the sinks stopped: PGlite serves one session.
pub async fn count_sinks(config: &Config, summary: &mut Summary) -> Result<()> {
    let pool = timescale::pool(&config.timescale)?;
    let client = pool.get().await.context("connecting to the database")?;
    let s = &config.timescale.schema;
    summary.db_rows = client
        .query_one(&format!("SELECT count(*) FROM {s}.events"), &[])
        .await?
        .get::<_, i64>(0) as u64;
    summary.db_page_view_rows = client
        .query_one(
            &format!("SELECT count(*) FROM {s}.events WHERE event_type = 'page_view'"),
            &[],
        )
        .await?
        .get::<_, i64>(0) as u64;
    summary.timescale = client
        .query_one(
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await?
        .get::<_, i64>(0)
        > 0;
    if summary.timescale {
        timescale::refresh_aggregates(&client, s).await?;
        let row = client
            .query_one(
                &format!("SELECT count(*), coalesce(sum(views), 0)::bigint FROM {s}.page_views_1h"),
                &[],
            )
            .await?;
        summary.cagg_rows = row.get::<_, i64>(0) as u64;
        summary.cagg_views = row.get::<_, i64>(1) as u64;
    }
    drop(client);
    pool.close();

    let es = sluice_sinks::elasticsearch::client(&config.elasticsearch)?;
    let pattern = format!("{}-*", config.elasticsearch.index_prefix);
    es.indices()
        .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[
            &pattern,
        ]))
        .send()
        .await
        .context("elasticsearch refresh")?;
    let resp = es
        .count(elasticsearch::CountParts::Index(&[&pattern]))
        .send()
        .await
        .context("elasticsearch count")?;
    let body: serde_json::Value = resp.json().await?;
    summary.es_docs = body["count"]
        .as_u64()
        .context("elasticsearch count has no `count`")?;
    Ok(())
}

/// Remove what an earlier run left in the database schema and the indices.
pub async fn reset_sinks(config: &Config) -> Result<()> {
    let pool = timescale::pool(&config.timescale)?;
    let client = pool.get().await.context("connecting to the database")?;
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            config.timescale.schema
        ))
        .await?;
    drop(client);
    pool.close();
    let es = sluice_sinks::elasticsearch::client(&config.elasticsearch)?;
    let pattern = format!("{}-*", config.elasticsearch.index_prefix);
    es.indices()
        .delete(elasticsearch::indices::IndicesDeleteParts::Index(&[
            &pattern,
        ]))
        .send()
        .await
        .context("deleting old demo indices")?;
    Ok(())
}

/// Tenants of the demo, at most this many.
pub const TENANTS: &[&str] = &["acme", "globex", "initech", "umbrella", "hooli"];

/// Options of a demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Users per tenant.
    pub users: usize,
    /// Tenants (at most [`TENANTS`]'s length).
    pub tenants: usize,
    /// Generator seed.
    pub seed: u64,
    /// Longest wait for the pipeline to catch up.
    pub timeout: Duration,
}

/// Run the whole pipeline in one process on a generated clickstream and count every
/// layer. `config` must already point at its namespace (see [`use_namespace`]).
pub async fn run_pipeline(
    mut config: Config,
    options: &DemoOptions,
) -> Result<(Summary, Clickstream)> {
    let tenants: Vec<(String, String)> = TENANTS
        .iter()
        .take(options.tenants)
        .map(|t| (t.to_string(), format!("key-{t}-{}", options.seed)))
        .collect();
    config.ingest.api_keys = tenants
        .iter()
        .map(|(t, k)| ApiKey {
            tenant: t.clone(),
            key: k.clone().into(),
        })
        .collect();
    config.ingest.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let created = kafka::ensure_topics(&config.kafka, &config.topics, &components::topics(&config))
        .await
        .context("creating topics")?;
    tracing::info!(created = %created.join(","), "topics ready");
    reset_sinks(&config).await?;

    let shutdown = CancellationToken::new();
    let (addr, ingest) = start_ingest(&config, shutdown.clone()).await?;
    let stage_stop = CancellationToken::new();
    let sink_stop = CancellationToken::new();
    // The stages from the raw topic to the sinks of events, and those sinks.
    let chain = components::chain_from(&config, &config.topics.raw);
    let mut stages = Vec::new();
    for &stage in &chain {
        let (c, s) = (config.clone(), stage_stop.clone());
        stages.push(tokio::spawn(async move { stage.run(&c, s).await }));
    }
    let mut sinks = Vec::new();
    for sink in components::event_sinks() {
        let (c, s) = (config.clone(), sink_stop.clone());
        sinks.push(tokio::spawn(async move { sink.run(&c, s).await }));
    }
    // The archive too, in short spans so that the demo need not wait, where its store
    // answers.
    config.archive.rotate_interval_ms = 2_000;
    let archive = archive_sink(&config).await;
    if let Some(archive) = archive {
        let (c, s) = (config.clone(), sink_stop.clone());
        sinks.push(tokio::spawn(async move { archive.run(&c, s).await }));
    }

    let start = chrono::Utc::now().timestamp_millis() - 3 * 3600 * 1000;
    let stream = generate(options.seed, &tenants, options.users, start);
    println!(
        "posting {} lines ({} malformed) for {} tenants to http://{addr}/v1/events",
        stream.lines,
        stream.malformed,
        tenants.len()
    );
    let mut summary = Summary {
        ingested: post_clickstream(addr, &stream).await?,
        ..Default::default()
    };

    for c in chain
        .iter()
        .copied()
        .chain(components::event_sinks())
        .chain(archive)
    {
        wait_caught_up(&config, c.group(&config), c.input(&config), options.timeout).await?;
    }

    sink_stop.cancel();
    for s in sinks {
        s.await.context("sink task")??;
    }
    stage_stop.cancel();
    for s in stages {
        s.await.context("stage task")??;
    }
    shutdown.cancel();
    ingest.await.context("ingest task")??;

    let t = &config.topics;
    summary.raw = topic_count(&config, &t.raw).await?;
    summary.parsed = topic_count(&config, &t.parsed).await?;
    summary.enriched = topic_count(&config, &t.enriched).await?;
    summary.parse_dead_letters =
        dead_letters_by(&config, &t.dlq(&t.raw), headers::DLQ_ERROR_CLASS).await?;
    summary.enrich_dead_letters = topic_count(&config, &t.dlq(&t.parsed)).await?;
    summary.sink_dead_letters =
        dead_letters_by(&config, &t.dlq(&t.enriched), headers::DLQ_STAGE).await?;
    count_sinks(&config, &mut summary).await?;
    if archive.is_some() {
        summary.archived = Some(count_archived(&config).await?);
    }
    Ok((summary, stream))
}

/// The archive sink, when its store answers (the stack's S3 API, or a writable
/// directory); otherwise the demo runs without it and says so.
async fn archive_sink(config: &Config) -> Option<&'static components::Component> {
    let checked = match sluice_sinks::archive::open(&config.archive) {
        Ok(a) => a.check().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match checked {
        Ok(()) => components::find(components::Kind::Sink, "archive"),
        Err(why) => {
            println!("archive: not run ({why})");
            None
        }
    }
}

/// Raw records of the run in the archive, every copy counted.
async fn count_archived(config: &Config) -> Result<u64> {
    use sluice_sinks::archive::{self, record::decode, ArchiveRange};
    let archive = archive::open(&config.archive)?;
    let range = ArchiveRange {
        topic: config.topics.raw.clone(),
        ..ArchiveRange::default()
    };
    let mut n = 0;
    for f in archive::list_files(&archive, &range).await? {
        let bytes = archive.store.get(&f.path).await?.bytes().await?;
        n += decode(bytes)?.len() as u64;
    }
    Ok(n)
}
