//! Bug → fix → replay, end to end: events go through HTTP ingest, parse, enrich and both
//! sinks with a bug in place; the bug is fixed and the range replayed; then every sink
//! must hold exactly one row and one document per event with the corrected values, the
//! continuous aggregates must equal a fresh `GROUP BY` over the hypertable, and `sluice
//! audit --values` must pass. The sinks write to TimescaleDB (PGlite), one session at a
//! time, so the scenarios run one after another.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::Message;
use sluice::audit::{self, Window};

use sluice::replay::{self, Filters, Mode, Plan, Range, Target};
use sluice::Config;
use sluice_core::{headers, kafka};
use sluice_ingest::config::ApiKey;
use sluice_schemas::EnrichedEvent;
use sluice_sinks::{Selection, Stored};
use sluice_tests::running::{post_lines, Running};
use sluice_tests::{caught_up, sink, stack_config, stage, unique};
use tokio_util::sync::CancellationToken;

/// PGlite serves one session at a time: one scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TENANTS: [(&str, &str); 2] = [("acme", "key-acme"), ("globex", "key-globex")];
const DAY_MS: i64 = 86_400_000;

/// A namespace of its own on TimescaleDB (PGlite) and the ES API.
async fn namespace(name: &str) -> Config {
    let mut config = stack_config();
    config.timescale.batch_size = 500;
    config.timescale.linger_ms = 50;
    config.elasticsearch.bulk_max_docs = 500;
    config.elasticsearch.linger_ms = 50;
    // These scenarios correct last week's data, ingested now: a backfill, beyond the
    // default 7 days parse accepts.
    config.parse.max_past_skew_s = 30 * 86_400;
    config
        .kafka
        .consumer
        .insert("session.timeout.ms".into(), "6000".into());
    config = config.namespaced(&format!("t-{name}"), name);
    config.ingest.api_keys = TENANTS
        .iter()
        .map(|(t, k)| ApiKey {
            tenant: t.to_string(),
            key: (*k).into(),
        })
        .collect();
    config.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    sluice_tests::create_topics(&config).await;
    config
}

/// An IP table that puts 10.0.0.0/8 in `country`.
fn geo_table(country: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.csv", unique("geo-")));
    std::fs::write(
        &path,
        format!("cidr,network,country\n10.0.0.0/8,corp,{country}\n"),
    )
    .unwrap();
    path
}

/// Midnight (UTC) a week ago, in milliseconds: old enough that no refresh policy reaches it.
fn last_week() -> i64 {
    let now = Utc::now().timestamp_millis() - 7 * DAY_MS;
    now - now.rem_euclid(DAY_MS)
}

/// The whole pipeline in this process.
struct Pipeline {
    ingest: Running,
    addr: SocketAddr,
    parse: Option<Running>,
    enrich: Option<Running>,
    sinks: Vec<Running>,
}

impl Pipeline {
    async fn start(config: &Config) -> Self {
        let (addr, ingest) = Running::ingest(config).await;
        Self {
            ingest,
            addr,
            parse: Some(Running::stage(config, "parse")),
            enrich: Some(Running::stage(config, "enrich")),
            sinks: start_sinks(config),
        }
    }

    /// Post `lines[tenant]` for each tenant, 500 lines a request.
    async fn post(&self, lines: &[Vec<String>]) {
        for (t, lines) in lines.iter().enumerate() {
            for chunk in lines.chunks(500) {
                post_lines(self.addr, TENANTS[t].1, chunk).await;
            }
        }
    }

    /// Wait until every group caught up, then stop the sinks (they refresh the aggregates
    /// they touched as they stop, and PGlite serves the test's queries only then).
    async fn settle(&mut self, config: &Config) {
        let t = &config.topics;
        caught_up(config, &config.parse.group, &t.raw).await;
        caught_up(config, &config.enrich.group, &t.parsed).await;
        caught_up(config, &config.timescale.group, &t.enriched).await;
        caught_up(config, &config.elasticsearch.group, &t.enriched).await;
        for s in self.sinks.drain(..) {
            s.stop().await;
        }
    }

    async fn restart_parse(&mut self, config: &Config) {
        if let Some(p) = self.parse.take() {
            p.stop().await;
        }
        self.parse = Some(Running::stage(config, "parse"));
    }

    async fn restart_enrich(&mut self, config: &Config) {
        if let Some(e) = self.enrich.take() {
            e.stop().await;
        }
        self.enrich = Some(Running::stage(config, "enrich"));
    }

    async fn stop(self) {
        for s in self.sinks {
            s.stop().await;
        }
        for s in [self.enrich, self.parse].into_iter().flatten() {
            s.stop().await;
        }
        self.ingest.stop().await;
    }
}

fn start_sinks(config: &Config) -> Vec<Running> {
    vec![
        Running::sink(config, "timescale"),
        Running::sink(config, "elasticsearch"),
    ]
}

async fn plan_of(config: &Config, topic: &str) -> Plan {
    let (k, t) = (config.kafka.clone(), topic.to_string());
    let everything = Range::Times {
        from: None,
        to: None,
    };
    tokio::task::spawn_blocking(move || replay::resolve(&k, &t, &everything, None))
        .await
        .unwrap()
        .unwrap()
}

/// Replay all of `topic` through `stage` under a fresh group, as `sluice replay` does.
async fn replay_stage(config: &Config, name: &str, topic: &str) -> replay::Outcome {
    let plan = plan_of(config, topic).await;
    replay::run(
        config,
        &plan,
        &Target::Component(stage(name)),
        &Mode::FreshGroup(unique("fix-")),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

/// The (tenant, event id) of every raw record: the server's ids unless a line has its own.
async fn raw_ids(config: &Config) -> BTreeSet<(String, String)> {
    let (k, t) = (config.kafka.clone(), config.topics.raw.clone());
    let records =
        tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(60)))
            .await
            .unwrap()
            .unwrap();
    records
        .iter()
        .map(|m| {
            let h = m.headers();
            let own = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap())
                .ok()
                .and_then(|v| v["event_id"].as_str().map(str::to_string));
            (
                headers::get(h, headers::TENANT).unwrap().to_string(),
                own.unwrap_or_else(|| headers::get(h, headers::EVENT_ID).unwrap().to_string()),
            )
        })
        .collect()
}

/// Everything each sink holds, by event.
async fn stored(config: &Config) -> [HashMap<(String, String), Vec<Stored>>; 2] {
    let all = Selection::Received {
        from: 0,
        to: i64::MAX / 2,
        tenant: None,
    };
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    let db =
        sluice_sinks::timescale::read::read_stored(&pool, &config.timescale.schema, &all, true)
            .await
            .unwrap();
    pool.close();
    let es = sluice_sinks::elasticsearch::client(&config.elasticsearch).unwrap();
    let docs = sluice_sinks::elasticsearch::read::read_stored(
        &es,
        &config.elasticsearch.index_prefix,
        &all,
        true,
    )
    .await
    .unwrap();
    let group = |rows: Vec<Stored>| {
        let mut m: HashMap<(String, String), Vec<Stored>> = HashMap::new();
        for r in rows {
            m.entry((r.tenant.clone(), r.event_id.clone()))
                .or_default()
                .push(r);
        }
        m
    };
    [group(db), group(docs)]
}

/// Each sink holds exactly `ids`, once each, and every event passes `check`.
async fn assert_exactly(
    config: &Config,
    ids: &BTreeSet<(String, String)>,
    check: impl Fn(&EnrichedEvent) -> Result<(), String>,
) {
    for (sink, held) in ["timescale", "elasticsearch"]
        .iter()
        .zip(stored(config).await)
    {
        let got: BTreeSet<(String, String)> = held.keys().cloned().collect();
        let missing: Vec<_> = ids.difference(&got).take(3).collect();
        let extra: Vec<_> = got.difference(ids).take(3).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{sink}: missing {missing:?}, extra {extra:?}"
        );
        for (id, rows) in &held {
            assert_eq!(rows.len(), 1, "{sink}: {id:?} stored {} times", rows.len());
            let event = rows[0].event.as_ref().unwrap();
            if let Err(why) = check(event) {
                panic!("{sink}: {id:?}: {why}");
            }
        }
    }
}

/// The continuous aggregates equal a fresh GROUP BY over the hypertable, and hold rows.
async fn assert_aggregates(config: &Config) {
    let s = &config.timescale.schema;
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    let client = pool.get().await.unwrap();
    let checks = [
        (
            format!("SELECT bucket, tenant, url, views FROM {s}.page_views_1m"),
            format!("SELECT time_bucket('1 minute', time), tenant, url, count(*) FROM {s}.events WHERE event_type = 'page_view' GROUP BY 1, 2, 3"),
        ),
        (
            format!("SELECT bucket, tenant, url, views FROM {s}.page_views_1h"),
            format!("SELECT time_bucket('1 hour', time), tenant, url, count(*) FROM {s}.events WHERE event_type = 'page_view' GROUP BY 1, 2, 3"),
        ),
        (
            format!("SELECT bucket, tenant, NULL::text, users FROM {s}.users_1h"),
            format!("SELECT time_bucket('1 hour', time), tenant, NULL::text, count(DISTINCT user_id) FROM {s}.events GROUP BY 1, 2"),
        ),
    ];
    for (aggregate, fresh) in checks {
        let differ: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM (({aggregate}) EXCEPT ({fresh}) UNION ALL (({fresh}) EXCEPT ({aggregate}))) d"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let rows: i64 = client
            .query_one(&format!("SELECT count(*) FROM ({aggregate}) a"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(rows > 0, "{aggregate}: empty");
        assert_eq!(differ, 0, "{aggregate} differs from {fresh}");
    }
    drop(client);
    pool.close();
}

async fn audit_values(config: &Config, from: DateTime<Utc>) -> audit::Report {
    let window = Window {
        values: true,
        ..Window::new(from, Utc::now() + chrono::Duration::minutes(1))
    };
    audit::run(config, &window).await.unwrap()
}

/// Lines of `n` events per tenant with IPs in 10.0.0.0/8, a minute apart from `t0`.
fn geo_lines(n: usize, t0: i64) -> Vec<Vec<String>> {
    (0..TENANTS.len())
        .map(|t| {
            (0..n)
                .map(|i| {
                    format!(
                        r#"{{"user_id":"u{}","type":"{}","ts":{},"url":"/p/{}","ip":"10.{}.0.1"}}"#,
                        i % 13,
                        if i % 3 == 0 { "click" } else { "page_view" },
                        t0 + (i * 60_000 + t * 7_000) as i64,
                        i % 4,
                        i % 200
                    )
                })
                .collect()
        })
        .collect()
}

/// The enrichment bug: a wrong IP table put `country = XX` on every event. `--diff`
/// reports the exact change and writes nothing; a sink that the replay did not reach
/// fails the audit; the replay corrects both sinks. Server-generated event ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_attribute_is_corrected_in_both_sinks() {
    let _serial = SERIAL.lock().await;
    let from = Utc::now() - chrono::Duration::minutes(1);
    let mut config = namespace(&unique("cgeo")).await;
    config.enrich.geo_csv = Some(geo_table("XX"));
    let mut pipeline = Pipeline::start(&config).await;
    pipeline
        .post(&geo_lines(400, last_week() + 8 * 3_600_000))
        .await;
    pipeline.settle(&config).await;
    let ids = raw_ids(&config).await;
    assert_eq!(ids.len(), 800);
    assert_exactly(&config, &ids, |e| match e.country.as_deref() {
        Some("XX") => Ok(()),
        other => Err(format!("country {other:?} before the fix")),
    })
    .await;
    assert_aggregates(&config).await;
    assert!(audit_values(&config, from).await.ok());

    // The fix: the right table, deployed to the enrich stage.
    let mut fixed = config.clone();
    fixed.enrich.geo_csv = Some(geo_table("DE"));
    pipeline.restart_enrich(&fixed).await;

    // The preview: exactly every event changes country XX→DE, and nothing is written.
    let plan = plan_of(&fixed, &fixed.topics.parsed).await;
    let diff = replay::diff::run(
        &fixed,
        &plan,
        &Target::Component(stage("enrich")),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    println!("{}", diff.render());
    assert_eq!(
        (diff.read, diff.outputs, diff.dead_lettered, diff.lost),
        (800, 800, 0, 0)
    );
    for sink in &diff.sinks {
        assert_eq!(
            (
                sink.changed,
                sink.unchanged,
                sink.new,
                sink.moved,
                sink.newly_dead_lettered
            ),
            (800, 0, 0, 0, 0),
            "{}",
            sink.sink
        );
        assert_eq!(sink.fields.len(), 1, "{:?}", sink.fields);
        assert_eq!(sink.fields[0].field, "country");
        assert_eq!(sink.fields[0].top, vec![("XX".into(), "DE".into(), 800)]);
    }
    assert_exactly(&config, &ids, |e| match e.country.as_deref() {
        Some("XX") => Ok(()),
        other => Err(format!("--diff changed a sink: country {other:?}")),
    })
    .await;

    let outcome = replay_stage(&fixed, "enrich", &fixed.topics.parsed).await;
    assert_eq!((outcome.read, outcome.written), (800, 800));
    // Only the TimescaleDB sink catches up; Elasticsearch's group is moved past the
    // corrected records as if it had taken them: the audit must see it holds old values.
    let t = &fixed.topics;
    let ends = {
        let (k, topic) = (fixed.kafka.clone(), t.enriched.clone());
        tokio::task::spawn_blocking(move || kafka::end_offsets(&k, &topic))
            .await
            .unwrap()
            .unwrap()
    };
    let ts = Running::sink(&fixed, "timescale");
    caught_up(&fixed, &fixed.timescale.group, &t.enriched).await;
    ts.stop().await;
    let (k, g, topic) = (
        fixed.kafka.clone(),
        fixed.elasticsearch.group.clone(),
        t.enriched.clone(),
    );
    tokio::task::spawn_blocking(move || replay::commit_group(&k, &g, &topic, &ends))
        .await
        .unwrap()
        .unwrap();
    let report = audit_values(&fixed, from).await;
    assert!(!report.ok(), "{}", report.render());
    assert_eq!(
        report.count("elasticsearch", "stale"),
        800,
        "{}",
        report.render()
    );
    assert_eq!(report.count("timescale", "stale"), 0, "{}", report.render());

    // A sink replay of the enriched topic brings Elasticsearch up to date.
    let plan = plan_of(&fixed, &t.enriched).await;
    replay::run(
        &fixed,
        &plan,
        &Target::Component(sink("elasticsearch")),
        &Mode::FreshGroup(unique("es-fix-")),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_exactly(&fixed, &ids, |e| match e.country.as_deref() {
        Some("DE") => Ok(()),
        other => Err(format!("country {other:?} after the replay")),
    })
    .await;
    assert_aggregates(&fixed).await;
    let report = audit_values(&fixed, from).await;
    assert!(report.ok(), "{}", report.render());
    pipeline.stop().await;
}

/// The time-zone bug: times without an offset were read as UTC instead of Asia/Kolkata
/// (UTC+5:30), so every event sits 5½ hours late, most on the wrong day. After the fix and
/// a replay of parse, each event has one row and one document at its corrected time, and
/// the aggregates of both the old and the new buckets are right. Client event ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_time_moved_across_a_day_boundary_leaves_one_row() {
    let _serial = SERIAL.lock().await;
    let from = Utc::now() - chrono::Duration::minutes(1);
    let mut config = namespace(&unique("ctz")).await;
    config.parse.timezone = "UTC".into();
    let day = last_week();
    let date = DateTime::from_timestamp_millis(day)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string();
    // 00:00 to 04:59 local time: 18:30 to 23:29 UTC of the day before, once corrected.
    let lines: Vec<Vec<String>> = (0..TENANTS.len())
        .map(|t| {
            (0..300)
                .map(|i| {
                    let minute = i % 300;
                    format!(
                        r#"{{"event_id":"tz-{t}-{i}","user_id":"u{}","type":"page_view","ts":"{date}T{:02}:{:02}:{:02}","url":"/p/{}"}}"#,
                        i % 11,
                        minute / 60,
                        minute % 60,
                        t * 7,
                        i % 3
                    )
                })
                .collect()
        })
        .collect();
    let mut pipeline = Pipeline::start(&config).await;
    pipeline.post(&lines).await;
    pipeline.settle(&config).await;
    let ids = raw_ids(&config).await;
    assert_eq!(ids.len(), 600);
    let wrong: HashMap<(String, String), i64> = stored(&config).await[0]
        .iter()
        .map(|(k, v)| (k.clone(), v[0].event.as_ref().unwrap().event_time))
        .collect();
    assert!(wrong.values().all(|t| t.div_euclid(DAY_MS) * DAY_MS == day));
    assert_aggregates(&config).await;

    let mut fixed = config.clone();
    fixed.parse.timezone = "Asia/Kolkata".into();
    pipeline.restart_parse(&fixed).await;
    let plan = plan_of(&fixed, &fixed.topics.raw).await;
    let diff = replay::diff::run(
        &fixed,
        &plan,
        &Target::Component(stage("parse")),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    println!("{}", diff.render());
    for sink in &diff.sinks {
        assert_eq!(
            (sink.changed, sink.moved, sink.moved_across_days),
            (600, 600, 600),
            "{}",
            sink.sink
        );
        assert_eq!(sink.fields[0].field, "event_time");
        assert_eq!(
            sink.fields[0].top,
            vec![(String::new(), "-5h 30m".into(), 600)]
        );
    }
    let outcome = replay_stage(&fixed, "parse", &fixed.topics.raw).await;
    assert_eq!(outcome.read, 600);
    pipeline.sinks = start_sinks(&fixed);
    pipeline.settle(&fixed).await;
    let shift = 5 * 3_600_000 + 30 * 60_000;
    assert_exactly(&fixed, &ids, |e| {
        let before = wrong[&(e.tenant.clone(), e.event_id.clone())];
        if e.event_time == before - shift {
            Ok(())
        } else {
            Err(format!("time {} expected {}", e.event_time, before - shift))
        }
    })
    .await;
    assert_aggregates(&fixed).await;
    let report = audit_values(&fixed, from).await;
    assert!(report.ok(), "{}", report.render());
    pipeline.stop().await;
}

/// The parse bug: only `ts` was read as the event time, so events sending `timestamp`
/// were dead-lettered. After the fix, re-driving the dead letters through parse puts
/// every event in both sinks once. Server-generated event ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_fix_rescues_dead_letters_by_re_drive() {
    let _serial = SERIAL.lock().await;
    let from = Utc::now() - chrono::Duration::minutes(1);
    let mut config = namespace(&unique("credrive")).await;
    config.parse.time_fields = vec!["ts".into()];
    let t0 = last_week() + 3 * 3_600_000;
    let lines: Vec<Vec<String>> = (0..TENANTS.len())
        .map(|t| {
            (0..200)
                .map(|i| {
                    let field = if i % 2 == 0 { "ts" } else { "timestamp" };
                    format!(
                        r#"{{"user_id":"u{}","type":"page_view","{field}":{},"url":"/r/{}"}}"#,
                        i % 9,
                        t0 + (i * 30_000 + t * 1_000) as i64,
                        i % 5
                    )
                })
                .collect()
        })
        .collect();
    let mut pipeline = Pipeline::start(&config).await;
    pipeline.post(&lines).await;
    pipeline.settle(&config).await;
    let ids = raw_ids(&config).await;
    let t = &config.topics;
    let dead = sluice_tests::dead_letters(&config, &t.dlq(&t.raw)).await;
    assert_eq!(dead.len(), 200, "every `timestamp` event was dead-lettered");
    let (held, _) = {
        let [db, es] = stored(&config).await;
        (db.len(), es.len())
    };
    assert_eq!(held, 200);

    let mut fixed = config.clone();
    fixed.parse.time_fields = vec!["ts".into(), "timestamp".into()];
    pipeline.restart_parse(&fixed).await;
    let outcome = replay_stage(&fixed, "parse", &t.dlq(&t.raw)).await;
    assert_eq!(
        (outcome.read, outcome.written, outcome.dead_lettered),
        (200, 200, 0)
    );
    pipeline.sinks = start_sinks(&fixed);
    pipeline.settle(&fixed).await;
    assert_exactly(&fixed, &ids, |e| {
        if e.event_time >= t0 && e.event_time < t0 + DAY_MS {
            Ok(())
        } else {
            Err(format!("time {}", e.event_time))
        }
    })
    .await;
    assert_aggregates(&fixed).await;
    let report = audit_values(&fixed, from).await;
    assert!(report.ok(), "{}", report.render());
    pipeline.stop().await;
}

/// A replay interrupted by SIGKILL of the sink, while it held corrected records it had
/// not committed, and the sink restarted: the end state is still exactly the corrected
/// data (PostgreSQL 15 here, so the sink runs as its own process beside PGlite users).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_sink_is_killed_and_restarted_ends_correct() {
    use sluice_tests::process::{slow_inserts, SluiceProcess};
    let _serial = SERIAL.lock().await;
    let from = Utc::now() - chrono::Duration::minutes(1);
    let mut config = namespace(&unique("ckill")).await;
    config.timescale.url = sluice_tests::stack_var("SLUICE_STACK_PG_URL");
    config.timescale.pool_size = 2;
    config.timescale.batch_size = 100;
    config.enrich.geo_csv = Some(geo_table("XX"));
    let mut pipeline = Pipeline::start(&config).await;
    pipeline
        .post(&geo_lines(1_000, last_week() + 5 * 3_600_000))
        .await;
    pipeline.settle(&config).await;
    let ids = raw_ids(&config).await;
    assert_eq!(ids.len(), 2_000);

    let mut fixed = config.clone();
    fixed.enrich.geo_csv = Some(geo_table("DE"));
    pipeline.restart_enrich(&fixed).await;
    let outcome = replay_stage(&fixed, "enrich", &fixed.topics.parsed).await;
    assert_eq!(outcome.written, 2_000);
    let es = Running::sink(&fixed, "elasticsearch");

    // Every batch of 100 rows sits 200 ms in the database: the kill lands part-way.
    slow_inserts(&fixed, true).await;
    // A count in SQL: cheap enough to poll while the sink writes.
    let pool = sluice_sinks::timescale::pool(&fixed.timescale).unwrap();
    let sql = format!(
        "SELECT count(*) FROM {}.events WHERE country = 'DE'",
        fixed.timescale.schema
    );
    let corrected = || async {
        let n: i64 = pool
            .get()
            .await
            .unwrap()
            .query_one(&sql, &[])
            .await
            .unwrap()
            .get(0);
        n as usize
    };
    let mut sink = SluiceProcess::spawn(&fixed, &["sink", "timescale"], "sink-ts-0");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while corrected().await < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sink corrected nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sink.kill9();
    let at_kill = corrected().await;
    let t = &fixed.topics;
    let (k, g, topic) = (
        fixed.kafka.clone(),
        fixed.timescale.group.clone(),
        t.enriched.clone(),
    );
    let (committed, ends) = tokio::task::spawn_blocking(move || {
        (
            kafka::committed_offsets(&k, &g, &topic).unwrap(),
            kafka::end_offsets(&k, &topic).unwrap(),
        )
    })
    .await
    .unwrap();
    let behind: i64 = ends
        .iter()
        .map(|(p, end)| {
            end - committed
                .iter()
                .find(|(q, _)| q == p)
                .map_or(0, |(_, c)| *c)
        })
        .sum();
    assert!(
        at_kill < 2_000 && behind > 0,
        "killed too late to matter: {at_kill} rows corrected, {behind} records uncommitted"
    );
    pool.close();
    slow_inserts(&fixed, false).await;
    let sink = SluiceProcess::spawn(&fixed, &["sink", "timescale"], "sink-ts-0");
    caught_up(&fixed, &fixed.timescale.group, &t.enriched).await;
    caught_up(&fixed, &fixed.elasticsearch.group, &t.enriched).await;
    sink.terminate();
    es.stop().await;
    assert_exactly(&fixed, &ids, |e| match e.country.as_deref() {
        Some("DE") => Ok(()),
        other => Err(format!("country {other:?} after the restarted replay")),
    })
    .await;
    let report = audit_values(&fixed, from).await;
    assert!(report.ok(), "{}", report.render());
    println!("killed with {at_kill} of 2000 rows corrected and {behind} records uncommitted; 0 lost, 0 duplicated");
    pipeline.stop().await;
}

/// A clock running fast: the live enrich stage runs as its own process on a "host" whose
/// clock is 10 minutes ahead, so every version it stamps lies in the future. Its host is
/// then fixed (the stage restarted with the right table and clock) and the correction
/// replayed from a host with a right clock. Versions that were wall-clock stamps lost to
/// the fast ones in both sinks (Elasticsearch's 409 counted as kept); the replay's epoch
/// from the replay log beats them. Server-generated event ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_corrects_what_a_fast_clock_stamped() {
    const FAST_MS: i64 = 10 * 60_000;
    let _serial = SERIAL.lock().await;
    let mut config = namespace(&unique("cskew")).await;
    let wrong = geo_table("XX");
    config.enrich.geo_csv = Some(wrong.clone());
    let (addr, ingest) = Running::ingest(&config).await;
    let log = std::env::temp_dir().join(format!("{}.log", unique("fast-enrich-")));
    let mut fast_enrich = std::process::Command::new(sluice_tests::sluice_bin())
        .args(["stage", "enrich"])
        .env("SLUICE_STACK_ENV", sluice_tests::stack_env_path())
        .env("SLUICE__TOPICS__PARSED", &config.topics.parsed)
        .env("SLUICE__TOPICS__ENRICHED", &config.topics.enriched)
        .env("SLUICE__ENRICH__GROUP", &config.enrich.group)
        .env("SLUICE__ENRICH__GEO_CSV", &wrong)
        .env("SLUICE__METRICS__LISTEN", "127.0.0.1:0")
        .env("SLUICE_FAULT_CLOCK_OFFSET_MS", FAST_MS.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut pipeline = Pipeline {
        ingest,
        addr,
        parse: Some(Running::stage(&config, "parse")),
        enrich: None,
        sinks: start_sinks(&config),
    };
    pipeline
        .post(&geo_lines(200, last_week() + 8 * 3_600_000))
        .await;
    pipeline.settle(&config).await;
    let ids = raw_ids(&config).await;
    assert_eq!(ids.len(), 400);
    assert_exactly(&config, &ids, |e| match e.country.as_deref() {
        Some("XX") => Ok(()),
        other => Err(format!("country {other:?} before the fix")),
    })
    .await;
    // The fault hit: every stored version is stamped minutes ahead of the real clock.
    let now = sluice_core::now_ms();
    for (sink, held) in ["timescale", "elasticsearch"]
        .iter()
        .zip(stored(&config).await)
    {
        for (id, rows) in &held {
            let (epoch, at) = headers::split_version(rows[0].version);
            assert!(
                epoch == 0 && at > now + FAST_MS / 2,
                "{sink}: {id:?} stamped {at} (epoch {epoch}), now {now}"
            );
        }
    }

    // The fix: the right table, and the host's clock corrected (a stage without the fault).
    let _ = fast_enrich.kill();
    let _ = fast_enrich.wait();
    let mut fixed = config.clone();
    fixed.enrich.geo_csv = Some(geo_table("DE"));
    pipeline.enrich = Some(Running::stage(&fixed, "enrich"));
    let outcome = replay_stage(&fixed, "enrich", &fixed.topics.parsed).await;
    assert_eq!((outcome.read, outcome.written), (400, 400));
    pipeline.sinks = start_sinks(&fixed);
    pipeline.settle(&fixed).await;
    assert_exactly(&fixed, &ids, |e| match e.country.as_deref() {
        Some("DE") => Ok(()),
        other => Err(format!(
            "country {other:?} after the replay: the fast clock's stamps won"
        )),
    })
    .await;
    for (sink, held) in ["timescale", "elasticsearch"]
        .iter()
        .zip(stored(&fixed).await)
    {
        for (id, rows) in &held {
            let (epoch, _) = headers::split_version(rows[0].version);
            assert!(epoch > 0, "{sink}: {id:?} holds epoch {epoch}");
        }
    }
    pipeline.stop().await;
}
