//! The bare baselines, measured on the same servers as what they are compared with: a
//! bare producer, an rdkafka consume→produce pass-through, `psql \copy` and `curl _bulk`.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, Producer, ThreadedProducer,
};
use sluice::Config;
use sluice_schemas::EnrichedEvent;
use sluice_sinks::elasticsearch::{doc_id, document, index_name};

use crate::procstat::{CpuSplit, ThreadSplit};
use crate::{rate, timed};

/// A raw event line as clients send them: about 300 bytes.
pub fn raw_line(i: usize) -> String {
    // Event times an hour before the run: inside parse's bounds around the receive time.
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| sluice_core::now_ms() - 3_600_000);
    format!(
        r#"{{"user_id":"u{}","type":"{}","ts":{},"url":"/p/{}","user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36","ip":"10.1.2.{}"}}"#,
        i % 5000,
        if i % 3 == 0 { "click" } else { "page_view" },
        base + i as i64,
        i % 40,
        i % 250
    )
}

/// Write a geo table of `rows` rows (`cidr,network,country`), the size of a real one
/// (a country-level table has a few hundred thousand), to `path`. Four in five rows are
/// IPv4 /24s spread over the space, the rest IPv6 /48s; `10.0.0.0/8` and `10.1.2.0/24`
/// are among them, so [`raw_line`]'s addresses match at a nested prefix, as real ones do.
pub fn geo_table(path: &Path, rows: usize) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "cidr,network,country")?;
    writeln!(f, "10.0.0.0/8,corp,DE")?;
    writeln!(f, "10.1.2.0/24,lab,FR")?;
    for i in 0..rows.saturating_sub(2) as u32 {
        // Knuth's multiplicative hash: distinct, scattered networks.
        let h = i.wrapping_mul(2_654_435_761);
        if i % 5 == 4 {
            writeln!(
                f,
                "2001:{:x}:{:x}::/48,net{i},C{}",
                h >> 16,
                h & 0xffff,
                i % 250
            )?;
        } else {
            let [a, b, c, _] = h.to_be_bytes();
            // 10/8 is the lab's own, above: keep the generated rows out of it.
            let a = if a == 10 { 11 } else { a };
            writeln!(f, "{a}.{b}.{c}.0/24,net{i},C{}", i % 250)?;
        }
    }
    f.flush()?;
    Ok(())
}

/// Produce `n` raw records (the lines of [`raw_line`], with the headers ingest sets) to
/// the raw topic of `config`; its rate, from the first send to the last ack.
pub async fn produce_raw(config: &Config, n: usize) -> Result<f64> {
    let producer: FutureProducer = config.kafka.producer_config().create()?;
    let received = sluice_core::now_ms().to_string();
    let started = Instant::now();
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("ev-{i}");
        let line = raw_line(i);
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
    Ok(rate(n, started.elapsed()))
}

/// The pass-through: consume `input` in a fresh group and produce every record unchanged
/// to `output` (the leanest rdkafka copy: no per-record delivery future, one flush at the
/// end); its time as [`finished`] measures it.
pub async fn pass_through(config: &Config, input: &str, output: &str, n: usize) -> Result<Window> {
    let (c, i, o) = (config.clone(), input.to_string(), output.to_string());
    let copy = tokio::spawn(async move { copy(&c, &i, &o, n).await });
    let window = finished(config, output, n, None).await?;
    copy.await??;
    Ok(window)
}

/// A pass, from its first output record to its last: how long it took, and the CPU this
/// process and the broker used meanwhile, in all and by thread.
#[derive(Debug, Clone)]
pub struct Window {
    /// The time.
    pub elapsed: Duration,
    /// The CPU used.
    pub cpu: CpuSplit,
    /// The CPU used by each kind of thread.
    pub threads: ThreadSplit,
}

/// Wait until `output` holds `n` records and, when `committed` names a group and its
/// input, until that group committed the input through its end (an exactly-once stage's
/// outputs count once their transaction committed, which commits the offsets too).
/// Returns the time from the first output record to then, and the CPU used meanwhile:
/// joining a consumer group is start-up, not throughput. Polls high watermarks and
/// committed offsets through clients made once, instead of reading the topic, so no
/// extra consumer competes for the two cores (an idle consumer costs most of one here:
/// the test broker answers empty fetches at once).
pub async fn finished(
    config: &Config,
    output: &str,
    n: usize,
    committed: Option<(&str, &str)>,
) -> Result<Window> {
    let (config, output) = (config.clone(), output.to_string());
    let committed = committed.map(|(g, i)| (g.to_string(), i.to_string()));
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let partitions = |c: &BaseConsumer, topic: &str| -> Result<Vec<i32>> {
            let m = c.fetch_metadata(Some(topic), timeout)?;
            Ok(m.topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect())
        };
        let watcher: BaseConsumer = config
            .kafka
            .consumer_config("sluice-bench-watch")
            .create()?;
        let out_parts = partitions(&watcher, &output)?;
        let input = match &committed {
            Some((group, input)) => {
                let c: BaseConsumer = config.kafka.consumer_config(group).create()?;
                let mut ends = rdkafka::TopicPartitionList::new();
                for p in partitions(&c, input)? {
                    let (_, high) = retried(|| c.fetch_watermarks(input, p, timeout))?;
                    ends.add_partition_offset(input, p, rdkafka::Offset::Offset(high))?;
                }
                Some((c, ends))
            }
            None => None,
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut first: Option<(Instant, CpuSplit, ThreadSplit)> = None;
        loop {
            let mut written = 0;
            for &p in &out_parts {
                written += retried(|| watcher.fetch_watermarks(&output, p, timeout))?.1;
            }
            let now = Instant::now();
            if written > 0 && first.is_none() {
                first = Some((now, CpuSplit::now(), ThreadSplit::now()));
            }
            let mut done = written >= n as i64;
            if let (true, Some((c, ends))) = (done, &input) {
                let at = retried(|| c.committed_offsets(ends.clone(), timeout))?;
                done = at
                    .elements()
                    .iter()
                    .zip(ends.elements())
                    .all(|(a, e)| a.offset() == e.offset());
            }
            if done {
                let (start, cpu, threads) =
                    first.unwrap_or_else(|| (now, CpuSplit::now(), ThreadSplit::now()));
                return Ok(Window {
                    elapsed: now - start,
                    cpu: CpuSplit::now().since(&cpu),
                    threads: ThreadSplit::now().since(&threads),
                });
            }
            ensure!(
                now < deadline,
                "{output} has {written} of {n} records after 10 minutes"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .await?
}

/// `ask`, asked again (up to 5 times, 100 ms apart) while it fails: a broker busy creating
/// an internal topic (the transaction log, on the first exactly-once pass) can answer a
/// request about a partition with NotLeaderForPartition.
fn retried<T>(
    mut ask: impl FnMut() -> rdkafka::error::KafkaResult<T>,
) -> rdkafka::error::KafkaResult<T> {
    let mut tries = 1;
    loop {
        match ask() {
            Err(e) if tries < 5 => {
                eprintln!("{e}; asking again");
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}

async fn copy(config: &Config, input: &str, output: &str, n: usize) -> Result<()> {
    // Fetching ahead as a stage does (about its `max_in_flight` records per partition):
    // with librdkafka's default, a consumer holding the backlog keeps this broker
    // answering empty fetches, which costs the copy more CPU than the copying.
    let consumer: StreamConsumer = config
        .kafka
        .prefetching_consumer_config(&sluice_tests::unique("b-copy-"), config.parse.max_in_flight)
        .create()?;
    consumer.subscribe(&[input])?;
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

/// Delete topics a pass created (noida-db saves all it holds, which slows it as it fills).
pub async fn drop_topics(config: &Config, topics: &[&str]) {
    if let Err(e) = sluice_core::kafka::delete_topics(&config.kafka, topics).await {
        println!("(could not delete the bench topics: {e})");
    }
}

/// Delete every pipeline topic of a pass's namespaced `config` but those in `keep`.
pub async fn drop_namespace(config: &Config, keep: &[&str]) {
    let names: Vec<String> = sluice::components::topics(config)
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| !keep.contains(&t.as_str()))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    drop_topics(config, &refs).await;
}

/// Enriched events as the sinks benchmarks write them: three tenants, three days.
pub fn events(n: usize) -> Vec<EnrichedEvent> {
    (0..n)
        .map(|i| {
            let at = format!(
                "2026-11-2{}T{:02}:{:02}:{:02}Z",
                i % 3,
                i / 3600 % 24,
                i / 60 % 60,
                i % 60
            );
            let mut e = sluice_tests::enriched(
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

/// The bare database load: `rows` as CSV, `psql \copy` into a fresh events table of
/// `config`'s database (its schema `<schema>`, created by the migrations and dropped
/// after); rows per second.
pub async fn psql_copy(config: &Config, rows: &[EnrichedEvent], schema: &str) -> Result<f64> {
    let csv = std::env::temp_dir().join(format!("{schema}.csv"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&csv)?);
    let ts = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339()
    };
    for e in rows {
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
    let mut bare = config.timescale.clone();
    bare.schema = schema.to_string();
    let pool = sluice_sinks::timescale::pool(&bare)?;
    sluice_sinks::timescale::migrate(&pool, &bare).await?;
    let copy = format!(
        "\\copy {schema}.events (time, event_id, tenant, user_id, session_id, event_type, url, received_at, browser, os, extra, referrer) FROM '{}' WITH (FORMAT csv)",
        csv.display()
    );
    let (status, elapsed) = timed(async {
        Command::new("psql")
            .arg(&config.timescale.url)
            .arg("-qc")
            .arg(&copy)
            .status()
    })
    .await;
    ensure!(status?.success(), "psql \\copy failed");
    let _ = std::fs::remove_file(&csv);
    drop_schema(config, schema).await;
    pool.close();
    Ok(rate(rows.len(), elapsed))
}

/// Drop a schema the bench created.
pub async fn drop_schema(config: &Config, schema: &str) {
    if let Ok(pool) = sluice_sinks::timescale::pool(&config.timescale) {
        if let Ok(client) = pool.get().await {
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await;
        }
        pool.close();
    }
}

/// The bare search load: `docs` as the sink writes them (same ids, indices, versions
/// and documents), 1,000 per `curl _bulk`, into fresh indices `<prefix>-*` (deleted
/// after); documents per second.
pub async fn curl_bulk(config: &Config, docs: &[EnrichedEvent], prefix: &str) -> Result<f64> {
    let client = sluice_sinks::elasticsearch::client(&config.elasticsearch)?;
    let mut bare = config.elasticsearch.clone();
    bare.index_prefix = prefix.to_string();
    sluice_sinks::elasticsearch::put_template(&client, &bare).await?;
    let dir = std::env::temp_dir().join(prefix);
    std::fs::create_dir_all(&dir)?;
    let mut files = Vec::new();
    for (i, chunk) in docs.chunks(1_000).enumerate() {
        let path = dir.join(format!("{i}.ndjson"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for e in chunk {
            let action = serde_json::json!({"index": {
                "_index": index_name(prefix, &e.tenant, e.received_at),
                "_id": doc_id(&e.tenant, &e.event_id),
                "version": e.received_at, "version_type": "external_gte"}});
            writeln!(f, "{action}\n{}", document(e, e.received_at))?;
        }
        f.flush()?;
        files.push(path);
    }
    let url = format!("{}/_bulk", config.elasticsearch.url);
    let (result, elapsed) = timed(async { curl_all(&url, &files) }).await;
    result?;
    let _ = std::fs::remove_dir_all(&dir);
    drop_indices(config, prefix).await;
    Ok(rate(docs.len(), elapsed))
}

/// Delete the indices `<prefix>-*` the bench created, and their template.
pub async fn drop_indices(config: &Config, prefix: &str) {
    if let Err(e) = delete_indices(config, prefix).await {
        println!("(could not delete the bench indices: {e})");
    }
    if let Ok(client) = sluice_sinks::elasticsearch::client(&config.elasticsearch) {
        let template = sluice_sinks::elasticsearch::template_name(prefix);
        let _ = client
            .indices()
            .delete_index_template(
                elasticsearch::indices::IndicesDeleteIndexTemplateParts::Name(&template),
            )
            .send()
            .await;
    }
}

/// The names of the indices matching `pattern` (e.g. `bp-1234-*`).
pub async fn index_names(config: &Config, pattern: &str) -> Result<Vec<String>> {
    let client = sluice_sinks::elasticsearch::client(&config.elasticsearch)?;
    let listed: Vec<serde_json::Value> = client
        .cat()
        .indices(elasticsearch::cat::CatIndicesParts::Index(&[pattern]))
        .format("json")
        .h(&["index"])
        .send()
        .await?
        .error_for_status_code()?
        .json()
        .await?;
    Ok(listed
        .iter()
        .filter_map(|i| i["index"].as_str().map(str::to_string))
        .collect())
}

/// Delete the indices named `<prefix>-*`, keeping their template (a sink writing there
/// creates them again from it).
pub async fn delete_indices(config: &Config, prefix: &str) -> Result<()> {
    let client = sluice_sinks::elasticsearch::client(&config.elasticsearch)?;
    // By name: Elasticsearch 8 refuses to delete by a wildcard
    // (`action.destructive_requires_name`).
    let owned = index_names(config, &format!("{prefix}-*")).await?;
    let names: Vec<&str> = owned.iter().map(String::as_str).collect();
    // A few at a time, to keep the URL short.
    for chunk in names.chunks(20) {
        client
            .indices()
            .delete(elasticsearch::indices::IndicesDeleteParts::Index(chunk))
            .send()
            .await?
            .error_for_status_code()?;
    }
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

/// Delete what a whole-pipeline run made: its topics, database schema and indices.
pub async fn drop_pipeline(config: &Config) {
    drop_namespace(config, &[]).await;
    drop_schema(config, &config.timescale.schema).await;
    drop_indices(config, &config.elasticsearch.index_prefix).await;
}
