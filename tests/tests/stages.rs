//! Stage replicas as real processes (`sluice stage parse`) sharing a consumer group:
//! a replica stopped with SIGTERM mid-stream hands its partitions over with nothing lost
//! and nothing repeated; a replica killed with SIGKILL and restarted loses nothing (its
//! uncommitted records are repeated, with the same event ids).
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice::Config;
use sluice_core::{headers, kafka};
use sluice_tests::{caught_up, sluice_bin, stack_config, stack_env_path, unique};

fn spawn_parse(config: &Config) -> Replica {
    spawn_parse_as(config, None, false)
}

/// A parse replica; with `instance`, a static group member of that id (a restarted
/// replica with the same id takes the place of a killed one at once).
fn spawn_parse_as(config: &Config, instance: Option<&str>, exactly_once: bool) -> Replica {
    spawn_parse_with(config, instance, exactly_once, "", &[])
}

/// [`spawn_parse_as`], with more consumer properties (`key=value,…`) and environment.
fn spawn_parse_with(
    config: &Config,
    instance: Option<&str>,
    exactly_once: bool,
    properties: &str,
    env: &[(&str, &str)],
) -> Replica {
    let mut consumer = "session.timeout.ms=6000,heartbeat.interval.ms=500".to_string();
    if !properties.is_empty() {
        consumer += &format!(",{properties}");
    }
    if let Some(id) = instance {
        consumer += &format!(",group.instance.id={id}");
    }
    let mut workarounds = std::collections::BTreeMap::new();
    sluice_tests::noida_group_workarounds(&mut workarounds);
    for (k, v) in workarounds {
        consumer += &format!(",{k}={v}");
    }
    let log = std::env::temp_dir().join(format!("{}-{}.log", config.parse.group, unique("r")));
    Command::new(sluice_bin())
        .args(["stage", "parse"])
        .env("SLUICE_STACK_ENV", stack_env_path())
        .env("SLUICE__TOPICS__RAW", &config.topics.raw)
        .env("SLUICE__TOPICS__PARSED", &config.topics.parsed)
        .env("SLUICE__PARSE__GROUP", &config.parse.group)
        .env("SLUICE__METRICS__LISTEN", "127.0.0.1:0")
        .env("SLUICE__KAFKA__CONSUMER", consumer)
        .env("SLUICE__PARSE__EXACTLY_ONCE", exactly_once.to_string())
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(|child| Replica(child, log))
        .unwrap()
}

/// A replica process, killed if the test ends early, and its log.
struct Replica(Child, std::path::PathBuf);

impl Replica {
    fn id(&self) -> u32 {
        self.0.id()
    }

    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }

    /// What it logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Replica, sig: &str) {
    Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
}

async fn setup(n: usize) -> (Config, Vec<String>) {
    let mut config = stack_config();
    let p = unique("t-stage-");
    config = config.namespaced(&p, "unused");
    sluice_tests::create_topics(&config).await;
    let lines = (0..n)
        .map(|i| {
            format!(
                r#"{{"user_id":"u{}","type":"click","ts":{}}}"#,
                i % 50,
                1_795_428_000_000u64 + i as u64
            )
        })
        .collect();
    (config, lines)
}

/// Produce raw records over about `seconds`, so replicas change mid-stream.
async fn produce_raw(config: &Config, lines: &[String], seconds: f64) {
    produce_raw_in_chunks(config, lines, seconds, 500).await;
}

/// [`produce_raw`], `chunk` records at a time (small chunks keep records in flight in
/// the stages most of the time).
async fn produce_raw_in_chunks(config: &Config, lines: &[String], seconds: f64, chunk: usize) {
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    let pause = Duration::from_secs_f64(seconds / (lines.len() / chunk).max(1) as f64);
    for (c, part) in lines.chunks(chunk).enumerate() {
        let mut acks = Vec::new();
        for (j, line) in part.iter().enumerate() {
            let id = format!("ev-{}", c * chunk + j);
            // Received when they happened: within parse's skew bounds.
            let h = sluice_tests::raw_headers("acme", &id, "1795428000000");
            acks.push(
                producer
                    .send_result(
                        FutureRecord::to(&config.topics.raw)
                            .key(&id)
                            .payload(line)
                            .headers(h),
                    )
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap().unwrap();
        }
        tokio::time::sleep(pause).await;
    }
}

/// Event id → how many parsed records carry it.
async fn parsed_ids(config: &Config) -> HashMap<String, usize> {
    let (k, t) = (config.kafka.clone(), config.topics.parsed.clone());
    let records =
        tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(60)))
            .await
            .unwrap()
            .unwrap();
    let mut ids = HashMap::new();
    for r in &records {
        *ids.entry(
            headers::get(r.headers(), headers::EVENT_ID)
                .unwrap()
                .to_string(),
        )
        .or_insert(0) += 1;
    }
    ids
}

/// Two parse replicas in one group, with `n` raw records being produced over 6 s;
/// returns 3 s in, mid-stream.
async fn two_replicas_mid_stream(
    n: usize,
) -> (Config, Replica, Replica, tokio::task::JoinHandle<()>) {
    let (config, lines) = setup(n).await;
    let a = spawn_parse(&config);
    let b = spawn_parse(&config);
    let c = config.clone();
    let producing = tokio::spawn(async move { produce_raw(&c, &lines, 6.0).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    (config, a, b, producing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_handover_loses_and_repeats_nothing() {
    const N: usize = 12_000;

    // SIGTERM: the leaving replica drains and commits; the other continues exactly there.
    let (config, mut a, mut b, producing) = two_replicas_mid_stream(N).await;
    signal(&a, "-TERM");
    assert!(a.wait().unwrap().success(), "SIGTERM is a clean exit");
    producing.await.unwrap();
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    let ids = parsed_ids(&config).await;
    assert_eq!(ids.len(), N, "no event lost");
    let repeated = ids.values().filter(|c| **c > 1).count();
    println!("graceful hand-over: {repeated} of {N} records repeated");
    // On Apache Kafka, none. On noida-db, once on a loaded CI machine, it refused the
    // leaving replica's last commits and the next owner repeated 826 records (0.4 s of
    // input); the final commits are now retried, and anything beyond 1% is a failure.
    // noida-db also moves the group to a new generation as soon as a member leaves, so
    // the replica that stays may lose its own partitions, have its revocation's commit
    // refused (IllegalGeneration) and repeat what it did since its last auto-commit, up
    // to a second of its input (docs/reliability.md). Only that refusal allows more.
    // A revoked partition's drain is bounded (stage.drain_timeout): on a machine too
    // loaded to ack in time, the next owner repeats what was still in flight, and says so.
    let refused = b.log().contains("IllegalGeneration");
    let (log_a, log_b) = (a.log(), b.log());
    let timed_out = [&log_a, &log_b]
        .iter()
        .any(|l| l.contains("still had records in flight"));
    let allowed = match (sluice_tests::broker_is_noida(), refused || timed_out) {
        (false, false) => 0,
        (_, false) => N / 100,
        (_, true) => N / 6,
    };
    let warnings: Vec<&str> = log_a
        .lines()
        .chain(log_b.lines())
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        repeated <= allowed,
        "a graceful hand-over repeated {repeated} records (commit refused: {refused}, drain timed out: {timed_out}); warnings:\n{}",
        warnings.join("\n")
    );
    signal(&b, "-TERM");
    assert!(b.wait().unwrap().success());
}

/// A replica joins mid-stream: the busy one's revoked partitions are drained and
/// committed in its revoke hook, and the joiner starts exactly where that commit says.
/// librdkafka then commits the removed partitions' *stored* offsets (auto-commit): before
/// the hook stored what it committed, that moved the commit back to the stage loop's
/// last store and the joiner repeated what was acked since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_replica_repeats_nothing() {
    const N: usize = 12_000;
    let (config, lines) = setup(N).await;
    let mut a = spawn_parse(&config);
    let c = config.clone();
    // 20 records every 10 ms: the join meets records in flight.
    let producing = tokio::spawn(async move { produce_raw_in_chunks(&c, &lines, 6.0, 20).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut b = spawn_parse(&config);
    producing.await.unwrap();
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    let ids = parsed_ids(&config).await;
    assert_eq!(ids.len(), N, "no event lost");
    let repeated = ids.values().filter(|c| **c > 1).count();
    println!("a replica joining: {repeated} of {N} records repeated");
    let (log_a, log_b) = (a.log(), b.log());
    assert!(
        log_a.contains("revoked partitions drained"),
        "the join revoked partitions of the busy replica"
    );
    let timed_out = [&log_a, &log_b]
        .iter()
        .any(|l| l.contains("still had records in flight"));
    if !sluice_tests::broker_is_noida() && !timed_out {
        assert_eq!(
            repeated, 0,
            "the joiner repeated records the busy replica had done"
        );
    }
    for r in [&mut a, &mut b] {
        signal(r, "-TERM");
        assert!(r.wait().unwrap().success());
    }
}

/// SIGKILL of one of two static members, restarted with its `group.instance.id` (as a
/// StatefulSet would): nothing lost; what the killed one had not committed is repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_static_member_restarted_loses_nothing() {
    const N: usize = 12_000;
    let (config, lines) = setup(N).await;
    let mut a = spawn_parse_as(&config, Some("parse-a"), false);
    let mut b = spawn_parse_as(&config, Some("parse-b"), false);
    let c = config.clone();
    let producing = tokio::spawn(async move { produce_raw(&c, &lines, 6.0).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(&a, "-KILL");
    a.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut a2 = spawn_parse_as(&config, Some("parse-a"), false);
    producing.await.unwrap();
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    let ids = parsed_ids(&config).await;
    assert_eq!(ids.len(), N, "no event lost");
    let extra: usize = ids.values().map(|c| c - 1).sum();
    println!("SIGKILL of a static member: {extra} records repeated (same event ids), out of {N}");
    for r in [&mut b, &mut a2] {
        signal(r, "-TERM");
        assert!(r.wait().unwrap().success());
    }
}

/// SIGKILL of a dynamic member: nothing is lost; what the dead replica had not committed
/// is repeated. The broker expires the killed member's session and hands its partitions
/// to the survivor. Skipped on noida-db: it never expires the session, so the group stays
/// in a rebalance that cannot finish (seen: 7,000 records stuck for 120 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_replica_loses_nothing() {
    if sluice_tests::broker_is_noida() {
        println!("skipped: noida-db does not expire the sessions of killed group members");
        return;
    }
    const N: usize = 12_000;
    let (config, mut a, mut b, producing) = two_replicas_mid_stream(N).await;
    signal(&a, "-KILL");
    a.wait().unwrap();
    // A dynamic member is replaced by a new one, as a Deployment does.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _a2 = spawn_parse(&config);
    producing.await.unwrap();
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    let ids = parsed_ids(&config).await;
    assert_eq!(ids.len(), N, "no event lost");
    let extra: usize = ids.values().map(|c| c - 1).sum();
    println!("SIGKILL: {extra} records repeated (same event ids), out of {N}");
    signal(&b, "-TERM");
    assert!(b.wait().unwrap().success());
}

/// Exactly-once: a transactional parse replica is killed with SIGKILL mid-stream and
/// restarted (the same transactional id fences it and aborts its open transaction). A
/// `read_committed` reader sees every event, and every dead letter, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_a_sigkill() {
    const N: usize = 10_000;
    let (mut config, mut lines) = setup(N).await;
    // Every 100th line is malformed: its dead letter must also appear once.
    for line in lines.iter_mut().step_by(100) {
        *line = "{not json".into();
    }
    let bad = N.div_ceil(100);
    let mut a = spawn_parse_as(&config, Some("eos-a"), true);
    let c = config.clone();
    let producing = tokio::spawn(async move { produce_raw(&c, &lines, 4.0).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(&a, "-KILL");
    a.wait().unwrap();
    let mut a2 = spawn_parse_as(&config, Some("eos-a"), true);
    producing.await.unwrap();
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    signal(&a2, "-TERM");
    assert!(a2.wait().unwrap().success());

    config
        .kafka
        .consumer
        .insert("isolation.level".into(), "read_committed".into());
    let ids = parsed_ids(&config).await;
    assert_eq!(ids.len(), N - bad, "every good event");
    let repeated = ids.values().filter(|c| **c > 1).count();
    assert_eq!(repeated, 0, "read_committed sees no repeats");
    let t = &config.topics;
    let dlq = sluice_tests::dead_letters(&config, &t.dlq(&t.raw)).await;
    assert_eq!(dlq.len(), bad, "every dead letter once");

    // Uncommitted reads also see the aborted transaction's records.
    config
        .kafka
        .consumer
        .insert("isolation.level".into(), "read_uncommitted".into());
    let all: usize = parsed_ids(&config).await.values().sum();
    println!(
        "exactly-once: {} committed outputs; {} records including aborted ones",
        N - bad,
        all
    );
}

/// Exactly-once parse members joining, leaving (SIGTERM) and killed (SIGKILL, restarted
/// under its static id) under steady load, with `strategy`'s assignment: a
/// `read_committed` reader sees every event exactly once. Before the runtime settled its
/// open transaction in the revoke callback, a revoked partition's next owner (or the
/// same member, re-assigned at the committed offset) processed the records of the open
/// transaction again, and both copies were committed.
async fn exactly_once_through_membership_changes(strategy: &str) {
    const N: usize = 16_000;
    let (mut config, lines) = setup(N).await;
    // Transactions of up to 3 s (the default is 0.5 s), so every membership change
    // meets an open one.
    let props = format!("partition.assignment.strategy={strategy}");
    let eos = |instance: Option<&str>| {
        spawn_parse_with(
            &config,
            instance,
            true,
            &props,
            &[("SLUICE__PARSE__TRANSACTION_MS", "3000")],
        )
    };
    let mut a = eos(None);
    let c = config.clone();
    let producing = tokio::spawn(async move { produce_raw(&c, &lines, 8.0).await });
    let pause = |s: f64| tokio::time::sleep(Duration::from_secs_f64(s));
    pause(2.0).await;
    let mut b = eos(None);
    pause(1.5).await;
    let mut c = eos(Some("eos-c"));
    pause(1.5).await;
    signal(&b, "-TERM");
    assert!(b.wait().unwrap().success(), "SIGTERM is a clean exit");
    pause(1.0).await;
    signal(&c, "-KILL");
    c.wait().unwrap();
    pause(0.5).await;
    let mut c2 = eos(Some("eos-c"));
    producing.await.unwrap();
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    let rebalances = [&a, &b, &c, &c2]
        .iter()
        .map(|r| r.log().matches("partitions revoked").count())
        .sum::<usize>();
    for r in [&mut a, &mut c2] {
        signal(r, "-TERM");
        assert!(r.wait().unwrap().success());
    }
    config
        .kafka
        .consumer
        .insert("isolation.level".into(), "read_committed".into());
    let ids = parsed_ids(&config).await;
    let missing = (0..N)
        .filter(|i| !ids.contains_key(&format!("ev-{i}")))
        .count();
    let repeated: usize = ids.values().map(|c| c - 1).sum();
    println!("exactly-once, {strategy}: {missing} missing, {repeated} repeated ({rebalances} revocations)");
    assert_eq!(
        ids.len(),
        N,
        "every event, and nothing else ({missing} missing)"
    );
    assert_eq!(repeated, 0, "read_committed sees every event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_cooperative_rebalances() {
    exactly_once_through_membership_changes("cooperative-sticky").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_eager_rebalances() {
    exactly_once_through_membership_changes("range").await;
}

/// A stage stopped while its in-flight bound is reached (the producer lingers 3 s, so no
/// ack frees a slot) commits nothing past a record it did not take: every raw record
/// below the committed offset has its output, and a restart takes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_at_the_in_flight_bound_commits_no_record_it_did_not_take() {
    const N: usize = 2_000;
    let (config, lines) = setup(N).await;
    produce_raw(&config, &lines, 0.5).await;
    let mut held = config.clone();
    held.parse.max_in_flight = 20;
    held.kafka
        .producer
        .insert("linger.ms".into(), "3000".into());
    let parse = sluice_tests::running::Running::stage(&held, "parse");
    // The first 20 records' outputs linger; every later record waits for a slot.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    parse.stop().await;

    let (k, g, t) = (
        config.kafka.clone(),
        config.parse.group.clone(),
        config.topics.raw.clone(),
    );
    let committed: HashMap<i32, i64> = tokio::task::spawn_blocking(move || {
        kafka::committed_offsets(&k, &g, &t)
            .unwrap()
            .into_iter()
            .collect()
    })
    .await
    .unwrap();
    let (k, t) = (config.kafka.clone(), config.topics.raw.clone());
    let raw = tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    let parsed = parsed_ids(&config).await;
    let below: Vec<&str> = raw
        .iter()
        .filter(|m| {
            committed
                .get(&m.partition())
                .is_some_and(|c| m.offset() < *c)
        })
        .map(|m| headers::get(m.headers(), headers::EVENT_ID).unwrap())
        .collect();
    let untaken: Vec<&&str> = below
        .iter()
        .filter(|id| !parsed.contains_key(**id))
        .collect();
    assert!(
        untaken.is_empty(),
        "committed past {} records without output, e.g. {:?}",
        untaken.len(),
        untaken.first()
    );
    assert!(
        below.len() < N,
        "the stop landed after everything was taken ({} committed)",
        below.len()
    );
    println!(
        "stopped at the bound: {} of {N} committed, {} outputs",
        below.len(),
        parsed.len()
    );
    // The restart takes the rest.
    let parse = sluice_tests::running::Running::stage(&config, "parse");
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    parse.stop().await;
    assert_eq!(parsed_ids(&config).await.len(), N);
}
