//! `sluice replay` and `sluice audit` on the real local stack: every range form, the dry
//! run, a bounded stop, an interrupted replay resumed, a copy, a refused reset of an
//! active group, idempotent replays into both sinks, and an audit that finds a deleted row.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice::audit::{self, Window};
use sluice::demo::{self, DemoOptions};

use sluice::replay::{self, Filters, Mode, OffsetRange, Plan, Range, Target};
use sluice::Config;
use sluice_core::{headers, kafka};
use sluice_tests::{
    committed, sink, sluice_bin, stack_config, stack_env_path, stack_var, stage, unique,
};
use tokio_util::sync::CancellationToken;

const TENANTS: [&str; 2] = ["acme", "globex"];

/// A namespace with its topics, and `n` raw records one second apart from `t0`,
/// alternating tenants, spread over the partitions by key.
async fn raw_topic(n: usize, t0: i64) -> Config {
    let mut config = stack_config();
    let p = unique("t-replay-");
    config = config.namespaced(&p, "unused");
    sluice_tests::create_topics(&config).await;
    produce_raw(&config, 0..n, t0).await;
    config
}

async fn produce_raw(config: &Config, range: std::ops::Range<usize>, t0: i64) {
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    let mut acks = Vec::new();
    for i in range {
        let (id, at) = (format!("ev-{i}"), t0 + i as i64 * 1000);
        let line = format!(r#"{{"user_id":"u{}","type":"click","ts":{at}}}"#, i % 7);
        let received = at.to_string();
        let h = sluice_tests::raw_headers(TENANTS[i % 2], &id, &received);
        let record = FutureRecord::to(&config.topics.raw)
            .key(&id)
            .payload(&line)
            .headers(h)
            .timestamp(at);
        acks.push(producer.send_result(record).unwrap());
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
}

async fn resolve(config: &Config, range: Range) -> Plan {
    resolve_on(config, &config.topics.raw, range).await
}

async fn resolve_on(config: &Config, topic: &str, range: Range) -> Plan {
    let (k, t) = (config.kafka.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || replay::resolve(&k, &t, &range, None))
        .await
        .unwrap()
        .unwrap()
}

async fn records(config: &Config, topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    let (k, t) = (config.kafka.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap()
}

fn ms(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t).unwrap()
}

fn fresh(name: &str) -> Mode {
    Mode::FreshGroup(unique(name))
}

async fn replay_parse(
    config: &Config,
    plan: &Plan,
    mode: &Mode,
    filters: &Filters,
) -> replay::Outcome {
    replay::run(
        config,
        plan,
        &Target::Component(stage("parse")),
        mode,
        filters,
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_resolve_to_exact_offsets() {
    let t0 = Utc::now().timestamp_millis() - 600_000;
    let config = raw_topic(60, t0).await;

    let all = resolve(
        &config,
        Range::Times {
            from: None,
            to: None,
        },
    )
    .await;
    assert_eq!(all.records(), 60);
    assert_eq!(all.ranges.len(), all.partitions_total);
    // Records stamped t0+20s .. t0+39s: the first at or after --from, up to before --to.
    let times = Range::Times {
        from: Some(ms(t0 + 20_000)),
        to: Some(ms(t0 + 40_000)),
    };
    assert_eq!(resolve(&config, times).await.records(), 20);
    let last = Range::Times {
        from: Some(Utc::now() - chrono::Duration::hours(2)),
        to: None,
    };
    assert_eq!(resolve(&config, last).await.records(), 60);
    let future = Range::Times {
        from: Some(Utc::now() + chrono::Duration::hours(1)),
        to: None,
    };
    assert_eq!(resolve(&config, future).await.records(), 0);
    let p0 = all.ranges[0];
    let offsets = Range::Offsets(vec![OffsetRange {
        partition: p0.partition,
        start: 1,
        end: Some(3),
    }]);
    let plan = resolve(&config, offsets).await;
    assert_eq!(plan.records(), 2);
    assert_eq!(plan.ranges.len(), 1);

    // Offsets beyond the end, or partitions that do not exist, are refused by name.
    let (k, t) = (config.kafka.clone(), config.topics.raw.clone());
    let err = tokio::task::spawn_blocking(move || {
        let beyond = Range::Offsets(vec![OffsetRange {
            partition: 0,
            start: 0,
            end: Some(10_000),
        }]);
        replay::resolve(&k, &t, &beyond, None)
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        format!("{err}").starts_with("--offsets: partition 0 ends at offset"),
        "{err}"
    );
}

/// The command line: a dry run prints the plan and does nothing; bad values are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_and_bad_flags() {
    let t0 = Utc::now().timestamp_millis() - 600_000;
    let config = raw_topic(30, t0).await;
    let run = |args: &[&str]| {
        Command::new(sluice_bin())
            .arg("replay")
            .args(args)
            .env("SLUICE_STACK_ENV", stack_env_path())
            .env("SLUICE__TOPICS__RAW", &config.topics.raw)
            .env("SLUICE__TOPICS__PARSED", &config.topics.parsed)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let from = ms(t0 + 10_000).to_rfc3339();
    let out = run(&["--stage", "parse", "--from", &from, "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("dry run"), "{stdout}");
    let total = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("total"))
        .unwrap();
    assert_eq!(total.split_whitespace().last(), Some("20"), "{stdout}");
    assert!(
        records(&config, &config.topics.parsed).await.is_empty(),
        "a dry run processes nothing"
    );

    for (args, flag) in [
        (vec!["--stage", "parse", "--from", "yesterday"], "--from"),
        (vec!["--stage", "parse", "--offsets", "0=5"], "--offsets"),
        (vec!["--stage", "parse", "--last", "2 parsecs"], "--last"),
        (
            vec!["--stage", "parse", "--partitions", "7"],
            "--partitions",
        ),
        (vec!["--stage", "lex"], "--stage"),
        (vec!["--from", &from], "--stage"),
    ] {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_replay_stops_at_the_captured_end_and_resumes_after_interruption() {
    let t0 = Utc::now().timestamp_millis() - 600_000;
    let config = raw_topic(60, t0).await;
    let plan = resolve(
        &config,
        Range::Times {
            from: None,
            to: None,
        },
    )
    .await;
    // Records arriving after the replay started are not part of it.
    produce_raw(&config, 60..90, t0).await;

    let mode = fresh("replay-bounded-");
    let outcome = replay_parse(&config, &plan, &mode, &Filters::default()).await;
    assert_eq!(
        (outcome.read, outcome.written, outcome.dead_lettered),
        (60, 60, 0)
    );
    let Mode::FreshGroup(group) = &mode else {
        unreachable!()
    };
    assert_eq!(
        committed(&config, group, &config.topics.raw).await,
        plan.ends()
    );
    let parsed = records(&config, &config.topics.parsed).await;
    assert_eq!(parsed.len(), 60);
    let mut ids: Vec<String> = parsed
        .iter()
        .map(|m| {
            headers::get(m.headers(), headers::EVENT_ID)
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort_by_key(|id| id[3..].parse::<usize>().unwrap());
    ids.dedup();
    assert_eq!(ids, (0..60).map(|i| format!("ev-{i}")).collect::<Vec<_>>());

    // A tenant filter processes only that tenant's records and skips the rest.
    let acme = Filters {
        tenant: Some("acme".into()),
        rate: None,
    };
    let outcome = replay_parse(&config, &plan, &fresh("replay-tenant-"), &acme).await;
    assert_eq!(
        (outcome.read, outcome.written, outcome.skipped),
        (60, 30, 30)
    );

    // Interrupted (Ctrl-C) at 5 records/s: what was done is committed, and the printed
    // resume offsets replay exactly the rest.
    let slow = Filters {
        tenant: None,
        rate: std::num::NonZeroU32::new(5),
    };
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(6)).await;
        s.cancel();
    });
    let group = unique("replay-resume-");
    let mode = Mode::FreshGroup(group.clone());
    let target = Target::Component(stage("parse"));
    let first = replay::run(&config, &plan, &target, &mode, &slow, stop)
        .await
        .unwrap();
    assert!(first.interrupted);
    let resume = first.resume.clone().expect("a resume hint");
    assert!(first.read > 0 && first.read < 60, "{first:?}");
    assert!(first.summary().contains(&format!("--offsets {resume}")));
    let rest = resolve(
        &config,
        Range::Offsets(replay::parse_offsets(&resume).unwrap()),
    )
    .await;
    let second = replay::run(
        &config,
        &rest,
        &target,
        &Mode::FreshGroup(group.clone()),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(!second.interrupted);
    assert_eq!(first.read + second.read, 60, "{first:?} then {second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_refused_reset_of_an_active_group() {
    let t0 = Utc::now().timestamp_millis() - 600_000;
    let config = raw_topic(40, t0).await;
    let times = Range::Times {
        from: Some(ms(t0 + 10_000)),
        to: Some(ms(t0 + 30_000)),
    };
    let plan = resolve(&config, times).await;
    assert_eq!(plan.records(), 20);

    // Copy: same payloads, keys and timestamps, plus where each came from.
    let copy_topic = format!("{}.copy", config.topics.raw);
    kafka::create_topics(
        &config.kafka,
        2,
        1,
        &[(copy_topic.clone(), "3600000".into())],
    )
    .await
    .unwrap();
    let target = Target::Copy(copy_topic.clone());
    let outcome = replay::run(
        &config,
        &plan,
        &target,
        &fresh("unused-"),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((outcome.read, outcome.written), (20, 20));
    let copies = records(&config, &copy_topic).await;
    assert_eq!(copies.len(), 20);
    for c in &copies {
        let ts = c.timestamp().to_millis().unwrap();
        assert!((t0 + 10_000..t0 + 30_000).contains(&ts));
        let from = headers::get(c.headers(), replay::REPLAYED_FROM).unwrap();
        assert!(from.starts_with(&config.topics.raw), "{from}");
        let id = headers::get(c.headers(), headers::EVENT_ID).unwrap();
        assert_eq!(c.key(), Some(id.as_bytes()));
    }

    // Reset: refused while the parse stage runs in its group, then done once it stopped.
    let stop = CancellationToken::new();
    let (c, s) = (config.clone(), stop.clone());
    let running = tokio::spawn(async move { stage("parse").run(&c, s).await });
    let group = config.parse.group.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (k, g) = (config.kafka.clone(), group.clone());
        let members = tokio::task::spawn_blocking(move || replay::active_members(&k, &g))
            .await
            .unwrap()
            .unwrap();
        if !members.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stage never joined"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let target = Target::Component(stage("parse"));
    let err = replay::run(
        &config,
        &plan,
        &target,
        &Mode::ResetGroup {
            execute: true,
            save_to: None,
        },
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err}").contains("active member"), "{err}");
    stop.cancel();
    running.await.unwrap().unwrap();
    // The stage committed everything. Without --execute the reset only shows the offsets.
    let before = committed(&config, &group, &config.topics.raw).await;
    assert!(
        plan.ranges.iter().any(|r| before[&r.partition] != r.start),
        "the group must sit elsewhere than the range start for this test to mean anything"
    );
    let reset = |execute, save_to| Mode::ResetGroup { execute, save_to };
    replay::run(
        &config,
        &plan,
        &target,
        &reset(false, None),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        committed(&config, &group, &config.topics.raw).await,
        before,
        "a reset without --execute changed the group"
    );
    // With --execute it saves the previous offsets, then moves the group to the range start.
    let saved = std::env::temp_dir().join(format!("{group}.offsets.json"));
    replay::run(
        &config,
        &plan,
        &target,
        &reset(true, Some(saved.clone())),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let now = committed(&config, &group, &config.topics.raw).await;
    for r in &plan.ranges {
        assert_eq!(now[&r.partition], r.start, "partition {}", r.partition);
    }
    let file: replay::SavedOffsets =
        serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(file.group, group);
    let saved_offsets: std::collections::HashMap<i32, i64> = file.offsets.into_iter().collect();
    assert_eq!(
        saved_offsets, before,
        "the file holds the offsets before the reset"
    );
    // --offsets-from puts them back (and only with --execute).
    replay::restore(&config, &saved, false).unwrap();
    assert_eq!(committed(&config, &group, &config.topics.raw).await, now);
    replay::restore(&config, &saved, true).unwrap();
    assert_eq!(committed(&config, &group, &config.topics.raw).await, before);

    // Sessionize's group is never reset: it would start mid-session, and the partial
    // sessions would replace complete ones. The refusal points to the batch replay. (The
    // plan is on sessionize's own input, so only that refusal stands in the way.)
    let sessionize = stage("sessionize");
    let input = sessionize.input(&config);
    let on_input = resolve_on(
        &config,
        input,
        Range::Times {
            from: None,
            to: None,
        },
    )
    .await;
    let err = replay::run(
        &config,
        &on_input,
        &Target::Component(sessionize),
        &reset(false, None),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let err = format!("{err}");
    assert!(
        err.contains("--reset cannot replay sessionize") && err.contains("mid-session"),
        "{err}"
    );
}

/// The whole pipeline once; then the audit balances, replays into both sinks change
/// nothing, a deleted row is found by the audit and restored by a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_sink_replays_and_an_audit_that_finds_a_deleted_row() {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.timescale.pool_size = 2;
    let name = unique("au");
    config = config.namespaced(&format!("t-{name}"), &name);
    let started = Utc::now() - chrono::Duration::minutes(1);
    let options = DemoOptions {
        users: 5,
        tenants: 2,
        seed: 21,
        timeout: Duration::from_secs(120),
    };
    let (summary, stream) = demo::run_pipeline(config.clone(), &options).await.unwrap();
    let good = (stream.lines - stream.malformed) as u64;
    assert_eq!(summary.db_rows, good);

    let window = Window::new(started, Utc::now() + chrono::Duration::minutes(1));
    let report = audit::run(&config, &window).await.unwrap();
    assert!(report.ok(), "{}", report.render());
    let total = |r: &audit::Report, f: fn(&audit::Row) -> u64| r.rows.iter().map(f).sum::<u64>();
    assert_eq!(total(&report, |r| r.raw as u64), stream.lines as u64);
    assert_eq!(
        total(&report, |r| r.parse_dlq as u64),
        stream.malformed as u64
    );
    assert_eq!(total(&report, |r| r.sink("timescale") as u64), good);
    assert_eq!(total(&report, |r| r.sink("elasticsearch") as u64), good);

    // Replaying everything into both sinks, and raw through parse, changes no count.
    let everything = Range::Times {
        from: None,
        to: None,
    };
    for (target, topic) in [
        (
            Target::Component(sink("timescale")),
            &config.topics.enriched,
        ),
        (
            Target::Component(sink("elasticsearch")),
            &config.topics.enriched,
        ),
        (Target::Component(stage("parse")), &config.topics.raw),
    ] {
        let plan = resolve_on(&config, topic, everything.clone()).await;
        let outcome = replay::run(
            &config,
            &plan,
            &target,
            &fresh("au-replay-"),
            &Filters::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(outcome.read, plan.records() as u64, "{target:?}");
    }
    let good = good as usize;
    assert_eq!(
        sluice_tests::stored_counts(&config).await,
        [("timescale", good), ("elasticsearch", good)]
    );
    let report = audit::run(&config, &window).await.unwrap();
    assert!(
        report.ok(),
        "re-parsed records are not duplicates:\n{}",
        report.render()
    );

    // A deleted row is found, and replaying that tenant into the sink restores it.
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    let client = pool.get().await.unwrap();
    let deleted: String = client
        .query_one(
            &format!(
                "DELETE FROM {name}.events WHERE event_id = (SELECT min(event_id) FROM {name}.events WHERE tenant = 'acme') RETURNING event_id"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(client);
    let report = audit::run(&config, &window).await.unwrap();
    assert_eq!(
        report.count("timescale", "missing"),
        1,
        "{}",
        report.render()
    );
    assert_eq!(report.findings.len(), 1, "{}", report.render());
    assert_eq!(
        report.findings[0].example.as_deref(),
        Some(deleted.as_str())
    );
    assert_eq!(report.findings[0].tenant, "acme");

    let plan = resolve_on(&config, &config.topics.enriched, everything).await;
    let acme = Filters {
        tenant: Some("acme".into()),
        rate: None,
    };
    let sink = Target::Component(sink("timescale"));
    let outcome = replay::run(
        &config,
        &plan,
        &sink,
        &fresh("au-fix-"),
        &acme,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(outcome.written + outcome.skipped, plan.records() as u64);
    let report = audit::run(&config, &window).await.unwrap();
    assert!(report.ok(), "{}", report.render());
}
