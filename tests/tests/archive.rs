//! The archive sink and replays from the archive, on the stack's S3 API (SeaweedFS):
//! every raw event archived exactly once across a SIGKILL between a span's files and its
//! commit, and across an outage of the store; records Kafka no longer retains replayed
//! from the archive into the sinks, ids and values (records of other producers keep
//! their ids, also in a `--diff`); `--source auto` reading each event once across the
//! seam; a replay from the archive under a tenant filter, and interrupted; the files
//! readable by another Parquet reader. The outage test stops the store,
//! so the scenarios run one after another.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use sluice::Config;
use sluice_core::{headers, kafka};
use sluice_ingest::config::ApiKey;
use sluice_sinks::archive::layout::parse_file_name;
use sluice_sinks::archive::{self, record::decode, Archive, ArchivedRecord};
use sluice_sinks::timescale::config::DbMode;
use sluice_sinks::Selection;
use sluice_tests::faults::stack;
use sluice_tests::process::SluiceProcess;
use sluice_tests::running::{post_lines, Running};
use sluice_tests::{caught_up, sluice_bin, stack_config, stack_env_path, stack_var, unique};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const KEY: &str = "archive-test-key";

/// A namespace of its own, with small spans so that a run writes many, and the TimescaleDB
/// sink on PostgreSQL 15 (several sessions at once).
async fn namespace(tag: &str) -> Config {
    let name = unique(tag);
    let mut config = stack_config().namespaced(&name, &name.replace('-', "_"));
    config.archive.flush_records = 2_000;
    config.archive.rotate_interval_ms = 1_000;
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.timescale.mode = DbMode::Postgres;
    config.ingest.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.ingest.api_keys = vec![ApiKey {
        tenant: "acme".into(),
        key: KEY.into(),
    }];
    sluice_tests::create_topics(&config).await;
    config
}

/// `n` raw lines; with `own_ids`, each carries its own event id.
fn lines(n: usize, offset: usize, own_ids: bool) -> Vec<String> {
    (offset..offset + n)
        .map(|i| {
            let id = if own_ids {
                format!(r#","event_id":"ev-{i}""#)
            } else {
                String::new()
            };
            format!(
                r#"{{"user_id":"u{}","type":"page_view","ts":{},"url":"/p/{}"{id}}}"#,
                i % 97,
                chrono::Utc::now().timestamp_millis(),
                i % 13
            )
        })
        .collect()
}

/// Post `lines` to a running ingest, 1,000 a request.
async fn post(addr: std::net::SocketAddr, lines: &[String]) {
    for chunk in lines.chunks(1_000) {
        post_lines(addr, KEY, chunk).await;
    }
}

/// The event ids on the raw topic, by (partition, offset).
async fn raw_ids(config: &Config) -> BTreeMap<(i32, i64), String> {
    let (k, t) = (config.kafka.clone(), config.topics.raw.clone());
    tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap()
        .iter()
        .map(|m| {
            (
                (m.partition(), m.offset()),
                headers::get(m.headers(), headers::EVENT_ID)
                    .unwrap()
                    .to_string(),
            )
        })
        .collect()
}

/// Every archived file of the raw topic, decoded one by one (no deduplication: a record
/// archived twice shows twice).
async fn archived(config: &Config) -> Vec<(String, Vec<ArchivedRecord>)> {
    let archive = archive::open(&config.archive).unwrap();
    let range = archive::ArchiveRange {
        topic: config.topics.raw.clone(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for f in archive::list_files(&archive, &range).await.unwrap() {
        let bytes = archive
            .store
            .get(&f.path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        out.push((f.path.to_string(), decode(bytes).unwrap()));
    }
    out
}

/// Each raw record in the archive exactly once, with its bytes and headers; the files of
/// each partition cover contiguous offsets from its start to its end.
async fn assert_archived_exactly_once(config: &Config) {
    let raw = raw_ids(config).await;
    let files = archived(config).await;
    let mut seen: BTreeMap<(i32, i64), u32> = BTreeMap::new();
    let mut spans: BTreeMap<i32, BTreeSet<(i64, i64)>> = BTreeMap::new();
    for (path, records) in &files {
        let name = path.rsplit('/').next().unwrap();
        let (_, span) = parse_file_name(name).unwrap();
        spans
            .entry(span.partition)
            .or_default()
            .insert((span.first, span.last));
        for r in records {
            assert_eq!(r.partition, span.partition, "{path}");
            assert!(
                r.offset >= span.first && r.offset <= span.last,
                "{path}: {}",
                r.offset
            );
            assert_eq!(
                raw.get(&(r.partition, r.offset)),
                Some(&r.event_id),
                "{path}: the record at {}/{} is not the raw topic's",
                r.partition,
                r.offset
            );
            *seen.entry((r.partition, r.offset)).or_default() += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "archived more than once: {twice:?}");
    let missing: Vec<_> = raw.keys().filter(|k| !seen.contains_key(k)).collect();
    assert!(
        missing.is_empty(),
        "not archived: {} e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let ends = {
        let (k, t) = (config.kafka.clone(), config.topics.raw.clone());
        tokio::task::spawn_blocking(move || kafka::watermarks(&k, &t))
            .await
            .unwrap()
            .unwrap()
    };
    for (p, low, high) in ends {
        let Some(spans) = spans.get(&p) else {
            assert_eq!(low, high, "partition {p} has records but no files");
            continue;
        };
        let mut next = low;
        for (first, last) in spans {
            assert_eq!(
                *first, next,
                "partition {p}: a gap or an overlap before {first}"
            );
            next = last + 1;
        }
        assert_eq!(next, high, "partition {p}: the files end at {}", next - 1);
    }
}

async fn archive_lag(config: &Config) -> i64 {
    let (k, g, t) = (
        config.kafka.clone(),
        config.archive.group.clone(),
        config.topics.raw.clone(),
    );
    tokio::task::spawn_blocking(move || kafka::lag(&k, &g, &t))
        .await
        .unwrap()
        .unwrap()
}

async fn committed(config: &Config) -> BTreeMap<i32, i64> {
    sluice_tests::committed(config, &config.archive.group, &config.topics.raw)
        .await
        .into_iter()
        .collect()
}

/// Manifests of spans that start at or past the committed offset: written, not committed.
async fn uncommitted_manifests(config: &Config, archive: &Archive) -> usize {
    use futures::TryStreamExt;
    let committed = committed(config).await;
    let dir = archive.prefix.child("_segments");
    let objects: Vec<_> = archive.store.list(Some(&dir)).try_collect().await.unwrap();
    objects
        .iter()
        .filter_map(|o| {
            let name = o.location.filename()?.strip_suffix(".json")?;
            let (rest, first) = name.rsplit_once('+')?;
            let (topic, p) = rest.rsplit_once('+')?;
            let (p, first): (i32, i64) = (p.parse().ok()?, first.parse().ok()?);
            (topic == config.topics.raw && first >= committed.get(&p).copied().unwrap_or(0))
                .then_some(())
        })
        .count()
}

/// 50,000 events through ingest; the archive sink (a `sluice` process, committing every
/// 5 s) is SIGKILLed while spans are written but not committed, and restarted: the
/// archive still holds each event once, in contiguous spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_files_and_commit_archives_each_event_once() {
    let _serial = SERIAL.lock().await;
    let mut config = namespace("ar-kill-").await;
    // Commits far apart: a kill lands between a span's files and its commit.
    config
        .kafka
        .consumer
        .insert("auto.commit.interval.ms".into(), "5000".into());
    let (addr, ingest) = Running::ingest(&config).await;
    let archive = archive::open(&config.archive).unwrap();
    let mut sink = SluiceProcess::spawn(&config, &["sink", "archive"], "a1");
    let all = lines(50_000, 0, false);
    let mut posted = 0;
    let mut killed_with = None;
    for chunk in all.chunks(5_000) {
        post(addr, chunk).await;
        posted += chunk.len();
        if posted >= 20_000 && killed_with.is_none() {
            // Wait until a span is written past the committed offset, then kill.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let written = uncommitted_manifests(&config, &archive).await;
                if written > 0 {
                    sink.kill9();
                    killed_with = Some((written, archive_lag(&config).await));
                    break;
                }
                assert!(Instant::now() < deadline, "no span written past the commit");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let (written, lag) = killed_with.unwrap();
    assert!(lag > 0, "the kill landed with records uncommitted");
    assert!(
        written > 0,
        "the kill landed between a span's files and its commit"
    );
    let restarted = SluiceProcess::spawn(&config, &["sink", "archive"], "a1");
    caught_up(&config, &config.archive.group, &config.topics.raw).await;
    restarted.terminate();
    ingest.stop().await;
    assert_archived_exactly_once(&config).await;
}

/// A graceful stop with records gathered and not yet written: the sink writes their
/// spans, waits for the files written in the background, and commits them all, so the
/// next run starts at the end. (It used to commit before the files were written: their
/// offsets stayed uncommitted, and the next run wrote them again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_commits_every_span_it_writes() {
    let _serial = SERIAL.lock().await;
    let mut config = namespace("ar-stop-").await;
    // No span is due by count or time before the stop.
    config.archive.flush_records = 1_000_000;
    config.archive.rotate_interval_ms = 600_000;
    let (addr, ingest) = Running::ingest(&config).await;
    let sink = Running::sink(&config, "archive");
    post(addr, &lines(3_000, 0, false)).await;
    // Consumed long before this; nothing written or committed yet.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        archive_lag(&config).await,
        3_000,
        "the stop meets gathered records"
    );
    sink.stop().await;
    assert_eq!(
        archive_lag(&config).await,
        0,
        "the final commit includes every span written at the stop"
    );
    ingest.stop().await;
    assert_archived_exactly_once(&config).await;
}

/// The store goes away for 5 s while events arrive: the sink retries, commits nothing
/// meanwhile, and once the store is back archives everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_store_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let config = namespace("ar-outage-").await;
    let (addr, ingest) = Running::ingest(&config).await;
    let sink = Running::sink(&config, "archive");
    post(addr, &lines(3_000, 0, false)).await;
    caught_up(&config, &config.archive.group, &config.topics.raw).await;
    stack("stop", "s3");
    post(addr, &lines(4_000, 3_000, false)).await;
    // What was stored before the stop is committed within a second; then nothing moves.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before = committed(&config).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        committed(&config).await,
        before,
        "nothing is committed while the store is down"
    );
    assert!(
        archive_lag(&config).await > 0,
        "the outage hit records in flight"
    );
    stack("start", "s3");
    caught_up(&config, &config.archive.group, &config.topics.raw).await;
    sink.stop().await;
    ingest.stop().await;
    assert_archived_exactly_once(&config).await;
}

/// Run `sluice replay ARGS` with `config`; its stdout.
fn replay(config: &Config, args: &[&str]) -> String {
    let file = std::env::temp_dir().join(format!("{}.toml", unique("replay-")));
    std::fs::write(&file, toml::to_string(config).unwrap()).unwrap();
    let out = Command::new(sluice_bin())
        .arg("--config")
        .arg(&file)
        .arg("replay")
        .args(args)
        .env_remove("SLUICE_STACK_ENV")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "sluice replay {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The events the TimescaleDB sink holds, by event id.
async fn stored(config: &Config) -> BTreeMap<String, sluice_schemas::EnrichedEvent> {
    let all = Selection::Received {
        from: 0,
        to: i64::MAX,
        tenant: None,
    };
    let read = sluice_tests::sink("timescale").read_stored.unwrap();
    read(config.clone(), all, true)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.event_id, s.event.unwrap()))
        .collect()
}

async fn wipe_sink(config: &Config) {
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    pool.get()
        .await
        .unwrap()
        .batch_execute(&format!("DELETE FROM {}.events", config.timescale.schema))
        .await
        .unwrap();
    pool.close();
}

/// Delete the raw topic's records below half of each partition, as retention would.
async fn expire_half(config: &Config) -> HashMap<i32, i64> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let (k, t) = (config.kafka.clone(), config.topics.raw.clone());
    let marks = tokio::task::spawn_blocking(move || kafka::watermarks(&k, &t))
        .await
        .unwrap()
        .unwrap();
    let admin: AdminClient<DefaultClientContext> = config.kafka.admin_config().create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut cut = HashMap::new();
    for (p, _, high) in marks {
        cut.insert(p, high / 2);
        tpl.add_partition_offset(&config.topics.raw, p, rdkafka::Offset::Offset(high / 2))
            .unwrap();
    }
    admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .unwrap();
    let (k, t) = (config.kafka.clone(), config.topics.raw.clone());
    let lows: HashMap<i32, i64> = tokio::task::spawn_blocking(move || kafka::watermarks(&k, &t))
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|(p, low, _)| (p, low))
        .collect();
    assert_eq!(lows, cut, "the broker deleted the records below the cut");
    cut
}

/// `sluice audit` has its archive column: `raw` events on the raw topic, `archived` in
/// the archive, and no archive finding.
async fn assert_archive_audits(config: &Config, raw: usize, archived: usize) {
    let now = chrono::Utc::now();
    let window = sluice::audit::Window::new(now - chrono::Duration::hours(2), now);
    let report = sluice::audit::run(config, &window).await.unwrap();
    assert!(report.archive, "the archive is audited where its sink runs");
    for kind in ["missing", "duplicated", "extra"] {
        assert_eq!(
            report.count("archive", kind),
            0,
            "{kind}: {}",
            report.render()
        );
    }
    let sum = |f: fn(&sluice::audit::Row) -> usize| report.rows.iter().map(f).sum::<usize>();
    assert_eq!(sum(|r| r.raw), raw, "{}", report.render());
    assert_eq!(sum(|r| r.archive), archived, "{}", report.render());
}

/// Every record on the parsed topic.
async fn read_parsed(config: &Config) -> Vec<rdkafka::message::OwnedMessage> {
    let (k, topic) = (config.kafka.clone(), config.topics.parsed.clone());
    tokio::task::spawn_blocking(move || kafka::read_all(&k, &topic, Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap()
}

/// The archive sink and the chain from raw to the TimescaleDB sink, running.
fn chain(config: &Config) -> [Running; 4] {
    [
        Running::sink(config, "archive"),
        Running::stage(config, "parse"),
        Running::stage(config, "enrich"),
        Running::sink(config, "timescale"),
    ]
}

/// Wait until every group of [`chain`] committed its input through its end.
async fn chain_caught_up(config: &Config) {
    let t = &config.topics;
    for (g, topic) in [
        (&config.archive.group, &t.raw),
        (&config.parse.group, &t.raw),
        (&config.enrich.group, &t.parsed),
        (&config.timescale.group, &t.enriched),
    ] {
        caught_up(config, g, topic).await;
    }
}

/// Records Kafka no longer retains come back from the archive into the sink, each with
/// its values; `--source auto` reads the archive below the seam and Kafka above it, each
/// event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_from_the_archive_restore_what_kafka_no_longer_holds() {
    let _serial = SERIAL.lock().await;
    let config = namespace("ar-replay-").await;
    let (addr, ingest) = Running::ingest(&config).await;
    let running = chain(&config);
    post(addr, &lines(3_000, 0, true)).await;
    let t = &config.topics;
    chain_caught_up(&config).await;
    let before = stored(&config).await;
    assert_eq!(before.len(), 3_000);
    let raw_before = raw_ids(&config).await;
    assert_archive_audits(&config, 3_000, 3_000).await;
    let cut = expire_half(&config).await;
    // What Kafka no longer holds is in the archive only: not a finding.
    let retained = raw_ids(&config).await.len();
    assert!(retained < 3_000);
    assert_archive_audits(&config, retained, 3_000).await;

    // From the archive alone: everything, Kafka's retained half included.
    wipe_sink(&config).await;
    let out = replay(&config, &["--source", "archive", "--stage", "parse"]);
    assert!(out.contains("archived record(s) replayed"), "{out}");
    caught_up(&config, &config.enrich.group, &t.parsed).await;
    caught_up(&config, &config.timescale.group, &t.enriched).await;
    let after = stored(&config).await;
    assert_eq!(
        after.keys().collect::<BTreeSet<_>>(),
        before.keys().collect::<BTreeSet<_>>(),
        "the same events"
    );
    for (id, e) in &before {
        let diff = sluice_schemas::fields::differences(e, &after[id]);
        assert!(diff.is_empty(), "{id}: {diff:?}");
    }

    // auto: the archive below the seam, Kafka from it; each event once.
    wipe_sink(&config).await;
    let group = unique("auto-");
    let out = replay(
        &config,
        &["--source", "auto", "--stage", "parse", "--group", &group],
    );
    assert!(
        out.contains("from the archive") && out.contains("from Kafka"),
        "{out}"
    );
    caught_up(&config, &config.enrich.group, &t.parsed).await;
    caught_up(&config, &config.timescale.group, &t.enriched).await;
    for r in running {
        r.stop().await;
    }
    ingest.stop().await;
    assert_eq!(stored(&config).await.len(), 3_000);
    // On the parsed topic, the auto replay's records: one per raw event, the part below
    // each partition's cut from the archive, the rest from Kafka.
    let parsed = read_parsed(&config).await;
    let mut per_event: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &parsed {
        let h = m.headers();
        let Some(by) = headers::get(h, headers::REPLAY).filter(|g| g.starts_with(&group)) else {
            continue;
        };
        per_event
            .entry(headers::get(h, headers::RAW_EVENT_ID).unwrap().to_string())
            .or_default()
            .push(by.to_string());
    }
    let mut from_archive = 0;
    for ((p, o), id) in &raw_before {
        let by = per_event
            .get(id)
            .unwrap_or_else(|| panic!("{id} not replayed"));
        assert_eq!(by.len(), 1, "{id} replayed {} times", by.len());
        let archived = by[0].ends_with("-archive");
        assert_eq!(
            archived,
            *o < cut[p],
            "{id} at {p}/{o}: from the archive? {archived}"
        );
        from_archive += usize::from(archived);
    }
    assert!(
        from_archive > 0 && from_archive < raw_before.len(),
        "{from_archive}"
    );
    assert_eq!(per_event.len(), raw_before.len());
}

/// Records another producer wrote (no `sluice.*` headers) get their id from their place
/// in the log; replayed from the archive, and compared by a `--diff` from it, they keep
/// it: the same events, not new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_records_replayed_from_the_archive_keep_their_ids() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let _serial = SERIAL.lock().await;
    let mut config = namespace("ar-foreign-").await;
    config.parse.default_tenant = Some("shared".into());
    let running = chain(&config);
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    for i in 0..40 {
        let line = format!(r#"{{"user_id":"u{i}","type":"click","ts":{now}}}"#);
        producer
            .send(
                FutureRecord::<str, str>::to(&config.topics.raw)
                    .key(&format!("k{}", i % 7))
                    .payload(&line),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let t = &config.topics;
    chain_caught_up(&config).await;
    let before: BTreeSet<String> = stored(&config).await.into_keys().collect();
    assert_eq!(before.len(), 40);
    assert!(
        before
            .iter()
            .all(|id| id.starts_with(&format!("kafka:{}:", t.raw))),
        "{before:?}"
    );

    // The diff reads them from a scratch topic: still the events the sink holds.
    let out = replay(
        &config,
        &[
            "--source", "archive", "--stage", "parse", "--diff", "--json",
        ],
    );
    let diff: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let timescale = diff["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sink"] == "timescale")
        .unwrap();
    assert_eq!(
        (&timescale["unchanged"], &timescale["new"]),
        (&serde_json::json!(40), &serde_json::json!(0)),
        "{out}"
    );

    // Replayed in-process: the same ids on the parsed topic.
    let group = unique("foreign-");
    let out = replay(
        &config,
        &["--source", "archive", "--stage", "parse", "--group", &group],
    );
    assert!(out.contains("40 archived record(s) replayed"), "{out}");
    for r in running {
        r.stop().await;
    }
    let parsed = read_parsed(&config).await;
    let replayed: Vec<String> = parsed
        .iter()
        .filter(|m| headers::get(m.headers(), headers::REPLAY) == Some(group.as_str()))
        .map(|m| {
            sluice_schemas::CLICK_EVENTS
                .decode(m.payload().unwrap())
                .unwrap()
                .event_id
        })
        .collect();
    assert_eq!(replayed.len(), 40, "each once");
    assert_eq!(replayed.into_iter().collect::<BTreeSet<_>>(), before);
}

/// A replay from the archive keeps only the tenant asked for, and an interruption
/// (Ctrl-C) stops it mid-way: what it did is published and said, and a second run
/// completes the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_replay_filters_tenants_and_stops_when_interrupted() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use sluice::replay::{Filters, Range, Target};
    use tokio_util::sync::CancellationToken;
    let _serial = SERIAL.lock().await;
    let config = namespace("ar-stop-").await;
    let archiver = Running::sink(&config, "archive");
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    let received = chrono::Utc::now().timestamp_millis().to_string();
    for (i, line) in lines(60, 0, false).iter().enumerate() {
        let (tenant, id) = (["acme", "globex"][i % 2], format!("ev-{i}"));
        producer
            .send(
                FutureRecord::to(&config.topics.raw)
                    .key(&id)
                    .payload(line)
                    .headers(sluice_tests::raw_headers(tenant, &id, &received)),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    caught_up(&config, &config.archive.group, &config.topics.raw).await;
    archiver.stop().await;
    let everything = Range::Times {
        from: None,
        to: None,
    };
    let part = sluice::replay::archive::plan(&config, &everything, None, None, None)
        .await
        .unwrap();
    let parse = Target::Component(sluice_tests::stage("parse"));
    let replay = |group: String, filters: Filters, stop: CancellationToken| {
        let (config, part, parse) = (&config, &part, &parse);
        async move {
            sluice::replay::archive::replay(config, part, parse, &group, &filters, stop)
                .await
                .unwrap()
        }
    };

    let acme = Filters {
        tenant: Some("acme".into()),
        rate: None,
    };
    let o = replay(unique("ar-acme-"), acme, CancellationToken::new()).await;
    assert_eq!((o.read, o.written, o.skipped), (60, 30, 30), "{o:?}");

    // At 5 records/s, stopped after 4 s.
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        s.cancel();
    });
    let slow = Filters {
        tenant: None,
        rate: std::num::NonZeroU32::new(5),
    };
    let group = unique("ar-slow-");
    let first = replay(group.clone(), slow, stop).await;
    assert!(first.interrupted, "{first:?}");
    assert!(first.read > 0 && first.read < 60, "{first:?}");
    assert!(
        first.summary().contains("run the replay again"),
        "{first:?}"
    );
    let published = read_parsed(&config)
        .await
        .iter()
        .filter(|m| headers::get(m.headers(), headers::REPLAY) == Some(group.as_str()))
        .count() as u64;
    assert_eq!(
        published, first.written,
        "what it did is on the parsed topic"
    );

    let second = replay(
        unique("ar-again-"),
        Filters::default(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!((second.interrupted, second.read), (false, 60), "{second:?}");
}

/// The files open in DuckDB with the documented columns and types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_open_in_another_reader() {
    let _serial = SERIAL.lock().await;
    let config = namespace("ar-duck-").await;
    let (addr, ingest) = Running::ingest(&config).await;
    let sink = Running::sink(&config, "archive");
    post(addr, &lines(500, 0, false)).await;
    caught_up(&config, &config.archive.group, &config.topics.raw).await;
    sink.stop().await;
    ingest.stop().await;
    let archive = archive::open(&config.archive).unwrap();
    let range = archive::ArchiveRange {
        topic: config.topics.raw.clone(),
        ..Default::default()
    };
    let dir = std::env::temp_dir().join(unique("duck-"));
    let mut total = 0;
    for f in archive::list_files(&archive, &range).await.unwrap() {
        let bytes = archive
            .store
            .get(&f.path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        // Keep the Hive folders: DuckDB reads tenant/date/hour from them.
        let local = dir.join(f.path.as_ref());
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        std::fs::write(&local, &bytes).unwrap();
        total += 1;
    }
    assert!(total > 0);
    let python = stack_env_path()
        .parent()
        .unwrap()
        .join("tools/venv/bin/python");
    let script = format!(
        r#"
import duckdb, json
con = duckdb.connect()
src = "read_parquet('{dir}/**/*.parquet', hive_partitioning = true)"
one = lambda sql: con.execute(sql).fetchall()
print(json.dumps({{
    "columns": {{r[0]: r[1] for r in one(f"describe select * from {{src}}")}},
    "rows": one(f"select count(*) from {{src}}")[0][0],
    "tenants": [r[0] for r in one(f"select distinct tenant from {{src}}")],
    "first": list(one(f"select decode(value), decode(headers['sluice.tenant']) from {{src}} order by \"partition\", \"offset\" limit 1")[0]),
}}))
"#,
        dir = dir.display()
    );
    let out = Command::new(python)
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["rows"], 500, "{seen}");
    let columns = &seen["columns"];
    for (name, ty) in [
        ("tenant", "VARCHAR"),
        ("event_id", "VARCHAR"),
        ("received_at", "TIMESTAMP WITH TIME ZONE"),
        ("key", "BLOB"),
        ("value", "BLOB"),
        ("headers", "MAP(VARCHAR, BLOB)"),
        ("topic", "VARCHAR"),
        ("partition", "INTEGER"),
        ("offset", "BIGINT"),
        ("timestamp", "TIMESTAMP WITH TIME ZONE"),
        ("date", "DATE"),
    ] {
        assert_eq!(columns[name], ty, "{name}: {seen}");
    }
    assert_eq!(seen["tenants"], serde_json::json!(["acme"]));
    assert!(
        seen["first"][0]
            .as_str()
            .unwrap()
            .contains("\"type\":\"page_view\""),
        "{seen}"
    );
    assert_eq!(seen["first"][1], "acme");
    let _ = std::fs::remove_dir_all(&dir);
}
