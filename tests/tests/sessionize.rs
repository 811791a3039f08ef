//! The sessionize stage on a real broker: the session summaries of a known clickstream,
//! a late event dead-lettered as `late`, and a restart mid-stream that neither loses nor
//! double-counts a session (state is rebuilt by re-reading from the committed position).
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use sluice::Config;
use sluice_core::{headers, kafka};
use sluice_schemas::{EnrichedEvent, SessionSummary, ENRICHED_EVENTS, SESSION_SUMMARIES};
use sluice_tests::{dead_letters, enriched, stack_config, stack_var, stage, unique, RunningSink};
use tokio_util::sync::CancellationToken;

const MIN: i64 = 60_000;
const T0: &str = "2026-11-23T08:00:00Z";

fn at(minutes: i64) -> String {
    let t0 = chrono::DateTime::parse_from_rfc3339(T0).unwrap();
    (t0 + chrono::Duration::minutes(minutes)).to_rfc3339()
}

/// Per user: two sessions (3 to 7 events, then 2 events 45 minutes later); events in
/// time order across users. Returns the events and the expected summaries.
fn clickstream(users: usize) -> (Vec<EnrichedEvent>, BTreeMap<String, SessionSummary>) {
    let mut timed: Vec<(i64, EnrichedEvent)> = Vec::new();
    let mut expected = BTreeMap::new();
    let mut i = 0;
    for u in 0..users {
        let user = format!("user-{u}");
        let first: Vec<i64> = (0..3 + u % 5).map(|k| u as i64 + 3 * k as i64).collect();
        let last = *first.last().unwrap();
        let second = [last + 45, last + 50];
        for (session, minutes) in [first.as_slice(), second.as_slice()]
            .into_iter()
            .enumerate()
        {
            let mut views = 0;
            for (k, m) in minutes.iter().enumerate() {
                let kind = if k % 2 == 0 { "page_view" } else { "click" };
                views += i32::from(kind == "page_view");
                timed.push((*m, enriched(i, "acme", &user, kind, "/p", &at(*m))));
                i += 1;
            }
            let (start, end) = (minutes[0], *minutes.last().unwrap());
            let t0 = chrono::DateTime::parse_from_rfc3339(T0)
                .unwrap()
                .timestamp_millis();
            let id = format!("{user}-{}", t0 + start * MIN);
            expected.insert(
                id.clone(),
                SessionSummary {
                    session_id: id,
                    tenant: "acme".into(),
                    user_id: user.clone(),
                    started_at: t0 + start * MIN,
                    ended_at: t0 + end * MIN,
                    page_views: views,
                    events: minutes.len() as i32,
                    duration_ms: (end - start) * MIN,
                },
            );
            let _ = session;
        }
    }
    timed.sort_by_key(|(m, _)| *m);
    (timed.into_iter().map(|(_, e)| e).collect(), expected)
}

async fn produce(config: &Config, events: &[EnrichedEvent], partition: Option<i32>) {
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    for e in events {
        let payload = ENRICHED_EVENTS.encode(e).unwrap();
        let key = format!("{}:{}", e.tenant, e.user_id);
        let mut record = FutureRecord::to(&config.topics.enriched)
            .key(&key)
            .payload(&payload);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
}

fn start(config: &Config) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let (c, s) = (config.clone(), stop.clone());
    let task = tokio::spawn(async move {
        stage("sessionize").run(&c, s).await.unwrap();
    });
    (stop, task)
}

async fn session_records(config: &Config) -> Vec<rdkafka::message::OwnedMessage> {
    let (k, t) = (config.kafka.clone(), config.topics.sessions.clone());
    tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap()
}

async fn sessions(config: &Config) -> Vec<SessionSummary> {
    let (k, t) = (config.kafka.clone(), config.topics.sessions.clone());
    let records =
        tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap();
    records
        .iter()
        .map(|m| SESSION_SUMMARIES.decode(m.payload().unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_known_clickstream_survive_a_restart() {
    let mut config = stack_config();
    let schema = unique("ss");
    config = config.namespaced(&format!("t-{schema}"), &schema);
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.sessionize.gap_s = 30 * 60;
    config.sessionize.allowed_lateness_s = 5 * 60;
    config
        .kafka
        .consumer
        .insert("session.timeout.ms".into(), "6000".into());
    sluice_tests::create_topics(&config).await;
    let (events, expected) = clickstream(24);
    // Past the first sessions of most users: their second sessions close the first ones.
    let cut = events.len() * 85 / 100;

    // First run: 85% of the stream, then a stop mid-stream.
    produce(&config, &events[..cut], None).await;
    let (stop, task) = start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while sessions(&config).await.len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "no session emitted");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let before = sessions(&config).await.len();

    // Second run: the rest, then on every partition an event 10 hours later (its own
    // user) that moves the watermark past every session, and one late event.
    produce(&config, &events[cut..], None).await;
    for p in 0..config.topics.partitions {
        let tick = enriched(
            100_000 + p as usize,
            "acme",
            &format!("tick-{p}"),
            "click",
            "/",
            &at(600),
        );
        produce(&config, &[tick], Some(p)).await;
    }
    let late = enriched(200_000, "acme", "late-user", "click", "/", &at(1));
    produce(&config, &[late], Some(0)).await;
    let (stop, task) = start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = sessions(&config).await;
        let distinct: HashMap<&str, &SessionSummary> =
            got.iter().map(|s| (s.session_id.as_str(), s)).collect();
        if distinct.len() >= expected.len() || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop.cancel();
    task.await.unwrap();

    // Every expected session, with its exact counts; a re-emitted one is identical, to
    // the byte, and carries the same version (its newest event's, not a clock's).
    let mut by_id: BTreeMap<String, SessionSummary> = BTreeMap::new();
    for s in &got {
        by_id.insert(s.session_id.clone(), s.clone());
    }
    assert_eq!(by_id, expected);
    let mut records: BTreeMap<String, (Vec<u8>, Option<String>)> = BTreeMap::new();
    let mut re_emitted = 0;
    for m in session_records(&config).await {
        let id = SESSION_SUMMARIES
            .decode(m.payload().unwrap())
            .unwrap()
            .session_id;
        let this = (
            m.payload().unwrap().to_vec(),
            headers::get(m.headers(), headers::PROCESSED_AT_MS).map(str::to_string),
        );
        if let Some(previous) = records.insert(id.clone(), this.clone()) {
            re_emitted += 1;
            assert_eq!(
                previous, this,
                "session {id} re-emitted after the restart with other bytes or another version"
            );
        }
    }
    assert!(re_emitted > 0, "the restart re-emitted no session");
    println!(
        "{} sessions ({before} emitted before the restart, {} records in all, {re_emitted} re-emitted)",
        expected.len(),
        got.len()
    );

    // The sessions sink writes each session once, whatever was re-emitted.
    let mut sink = RunningSink::start(&config, sluice_tests::sink("sessions"));
    sink.caught_up(
        &config,
        &config.timescale.sessions_group,
        &config.topics.sessions,
    )
    .await;
    sink.stop().await;
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    let client = pool.get().await.unwrap();
    let rows = client
        .query(
            &format!("SELECT session_id, page_views, events, duration_ms FROM {schema}.sessions"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), expected.len());
    for r in rows {
        let id: String = r.get(0);
        let e = &expected[&id];
        assert_eq!(
            (r.get::<_, i32>(1), r.get::<_, i32>(2), r.get::<_, i64>(3)),
            (e.page_views, e.events, e.duration_ms)
        );
    }

    let t = &config.topics;
    let dlq = dead_letters(&config, &t.dlq(&t.enriched)).await;
    assert_eq!(dlq.len(), 1);
    let h = dlq[0].headers();
    assert_eq!(headers::get(h, headers::DLQ_ERROR_CLASS), Some("late"));
    assert!(headers::get(h, headers::DLQ_REASON)
        .unwrap()
        .contains("watermark"));
}

/// The sessions table's rows: user → (start minute, events, page views), sorted.
async fn session_rows(
    config: &Config,
    schema: &str,
    t0: i64,
) -> BTreeMap<String, Vec<(i64, i32, i32)>> {
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    let client = pool.get().await.unwrap();
    let rows = client
        .query(
            &format!(
                "SELECT user_id, (extract(epoch FROM started_at) * 1000)::bigint, events, page_views
                 FROM {schema}.sessions ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .unwrap();
    drop(client);
    pool.close();
    let mut out: BTreeMap<String, Vec<(i64, i32, i32)>> = BTreeMap::new();
    for r in rows {
        out.entry(r.get(0)).or_default().push((
            (r.get::<_, i64>(1) - t0) / MIN,
            r.get(2),
            r.get(3),
        ));
    }
    out
}

/// A changed gap, replayed: sessionize recomputes the sessions of the range in batch, and
/// the sessions sink replaces the sessions they overlap, so the table holds exactly the
/// sessions of the corrected settings: split when the gap shrinks, merged again when it
/// grows back. Sessions at the range's edges are left as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_a_changed_gap_splits_and_merges_sessions() {
    let mut config = stack_config();
    let schema = unique("sg");
    config = config.namespaced(&format!("t-{schema}"), &schema);
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.sessionize.gap_s = 30 * 60;
    config.sessionize.allowed_lateness_s = 5 * 60;
    config
        .kafka
        .consumer
        .insert("session.timeout.ms".into(), "6000".into());
    sluice_tests::create_topics(&config).await;
    let t0 = chrono::DateTime::parse_from_rfc3339(T0)
        .unwrap()
        .timestamp_millis();
    // Each user: events at +0, +5, +10, then +30, +35 minutes: one session with a
    // 30-minute gap, two with a 15-minute one. An early user and a late one mark the
    // edges of the range.
    let mut events = vec![enriched(0, "acme", "early", "page_view", "/", &at(-120))];
    let mut i = 1;
    for u in 0..6 {
        for m in [0, 5, 10, 30, 35] {
            let kind = if m % 10 == 0 { "page_view" } else { "click" };
            events.push(enriched(
                i,
                "acme",
                &format!("user-{u}"),
                kind,
                "/p",
                &at(u * 3 + m),
            ));
            i += 1;
        }
    }
    events.sort_by_key(|e| e.event_time);
    events.push(enriched(1_000, "acme", "late", "page_view", "/", &at(600)));
    produce(&config, &events, None).await;
    // Ticks, ten hours on, close every session of the live stage.
    for p in 0..config.topics.partitions {
        let tick = enriched(
            2_000 + p as usize,
            "acme",
            &format!("tick-{p}"),
            "click",
            "/",
            &at(1200),
        );
        produce(&config, &[tick], Some(p)).await;
    }
    let (stop, task) = start(&config);
    let mut sink = RunningSink::start(&config, sluice_tests::sink("sessions"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while sessions(&config).await.len() < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions not emitted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.cancel();
    task.await.unwrap();
    sink.caught_up(
        &config,
        &config.timescale.sessions_group,
        &config.topics.sessions,
    )
    .await;
    let merged = session_rows(&config, &schema, t0).await;
    for u in 0..6 {
        assert_eq!(
            merged[&format!("user-{u}")],
            vec![(u * 3, 5, 3)],
            "user-{u}"
        );
    }

    let replay_with_gap = |gap_s: u64| {
        let mut c = config.clone();
        c.sessionize.gap_s = gap_s;
        async move {
            let (k, t) = (c.kafka.clone(), c.topics.enriched.clone());
            let everything = sluice::replay::Range::Times {
                from: None,
                to: None,
            };
            let plan = tokio::task::spawn_blocking(move || {
                sluice::replay::resolve(&k, &t, &everything, None)
            })
            .await
            .unwrap()
            .unwrap();
            sluice::replay::run(
                &c,
                &plan,
                &sluice::replay::Target::Component(stage("sessionize")),
                &sluice::replay::Mode::FreshGroup(unique("sess-fix-")),
                &sluice::replay::Filters::default(),
                CancellationToken::new(),
            )
            .await
            .unwrap()
        }
    };
    // A 15-minute gap splits every user's session in two.
    let outcome = replay_with_gap(15 * 60).await;
    println!("{}", outcome.summary());
    // Twelve halves, and the late user's session (the ticks are the range's end).
    assert_eq!(outcome.written, 13, "{}", outcome.summary());
    assert!(
        outcome.summary().contains("left as they are"),
        "{}",
        outcome.summary()
    );
    sink.caught_up(
        &config,
        &config.timescale.sessions_group,
        &config.topics.sessions,
    )
    .await;
    let split = session_rows(&config, &schema, t0).await;
    for u in 0..6 {
        assert_eq!(
            split[&format!("user-{u}")],
            vec![(u * 3, 3, 2), (u * 3 + 30, 2, 1)],
            "user-{u}"
        );
    }
    assert_eq!(
        split["early"], merged["early"],
        "an edge session is left as it is"
    );
    // Back to 30 minutes: merged again, and the split halves are gone.
    replay_with_gap(30 * 60).await;
    sink.caught_up(
        &config,
        &config.timescale.sessions_group,
        &config.topics.sessions,
    )
    .await;
    sink.stop().await;
    assert_eq!(session_rows(&config, &schema, t0).await, merged);
}

/// A partition that goes quiet closes its open sessions after the gap plus the lateness
/// of processing time: before, only a newer event could move the watermark, and the
/// last session of a quiet partition stayed open (and pinned the commit point) for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_partition_closes_its_sessions() {
    let mut config = stack_config();
    let schema = unique("idle");
    config = config.namespaced(&format!("t-{schema}"), &schema);
    config.sessionize.gap_s = 2;
    config.sessionize.allowed_lateness_s = 1;
    sluice_tests::create_topics(&config).await;
    let now = chrono::Utc::now();
    let events: Vec<EnrichedEvent> = (0..3)
        .map(|i| {
            let t = (now + chrono::Duration::milliseconds(i * 500)).to_rfc3339();
            enriched(i as usize, "acme", "quiet-user", "page_view", "/", &t)
        })
        .collect();
    produce(&config, &events, Some(0)).await;
    let (stop, task) = start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        let got = sessions(&config).await;
        if !got.is_empty() {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the quiet partition's session was never emitted"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop.cancel();
    task.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].user_id.as_str(), got[0].events, got[0].page_views),
        ("quiet-user", 3, 3)
    );
}

/// Two sessions sinks (a live one and a replay's, or a pool of several connections)
/// writing overlapping versions of the same users' sessions at once leave one session per
/// user: the newest. Each write takes a per-user advisory lock (in sorted order) first;
/// under READ COMMITTED alone, each statement's "is a newer one stored?" missed the
/// other's uncommitted row, and both versions were kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_session_writers_leave_one_version() {
    use sluice_sinks::consumer::{BatchWriter, Versioned};
    use sluice_sinks::timescale::sessions::SessionsWriter;
    let mut config = stack_config();
    let schema = unique("sr");
    config = config.namespaced(&format!("t-{schema}"), &schema);
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    // A connection for each writer, as two sinks (or one with pool_size 2) have.
    config.timescale.pool_size = 2;
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    sluice_sinks::timescale::migrations::migrate(&pool, &config.timescale)
        .await
        .unwrap();
    let version = |round: usize, user: usize, start: i64, processed_at: i64| Versioned {
        record: SessionSummary {
            session_id: format!("s-{round}-{user}-{start}"),
            tenant: "acme".into(),
            user_id: format!("user-{round}-{user}"),
            started_at: 1_795_428_000_000 + start * 60_000,
            ended_at: 1_795_428_000_000 + (start + 10) * 60_000,
            page_views: 1,
            events: 2,
            duration_ms: 600_000,
        },
        version: processed_at,
    };
    const USERS: usize = 2_000;
    for round in 0..5 {
        // The newer version starts at minute 0, the older (overlapping) one at minute 5.
        let newer: Vec<_> = (0..USERS).map(|u| version(round, u, 0, 2_000)).collect();
        let older: Vec<_> = (0..USERS).map(|u| version(round, u, 5, 1_000)).collect();
        let (a, b) = (
            SessionsWriter::new(pool.clone(), &schema),
            SessionsWriter::new(pool.clone(), &schema),
        );
        let (ra, rb) = tokio::join!(a.write(&newer), b.write(&older));
        assert!(
            matches!(ra, sluice_core::retry::RetryAction::Successful(ref r) if r.is_empty()),
            "{ra:?}"
        );
        assert!(
            matches!(rb, sluice_core::retry::RetryAction::Successful(ref r) if r.is_empty()),
            "{rb:?}"
        );
    }
    let client = pool.get().await.unwrap();
    let rows = client
        .query(
            &format!("SELECT user_id, session_id FROM {schema}.sessions ORDER BY 1, 2"),
            &[],
        )
        .await
        .unwrap();
    let mut per_user: HashMap<String, Vec<String>> = HashMap::new();
    for r in rows {
        per_user.entry(r.get(0)).or_default().push(r.get(1));
    }
    let doubled: Vec<_> = per_user.iter().filter(|(_, s)| s.len() > 1).collect();
    assert_eq!(per_user.len(), 5 * USERS, "every user has a session");
    assert!(
        doubled.is_empty(),
        "{} users kept two overlapping versions, e.g. {:?}",
        doubled.len(),
        doubled.first()
    );
    for (user, s) in &per_user {
        assert!(s[0].ends_with("-0"), "{user} kept the older version {s:?}");
    }
}

/// The value of the sample `name{labels}` (labels as Prometheus writes them) at `addr`.
async fn metric(addr: std::net::SocketAddr, sample: &str) -> Option<f64> {
    let text = sluice_tests::metrics_text(addr).await?;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

/// Run sessionize as its own process over the flood in `config`'s enriched topic with
/// at most `cap` open sessions per partition; returns its peak RSS in MiB and the
/// sessions it evicted.
async fn flood_run(config: &Config, cap: usize, events: usize) -> (u64, u64) {
    let mut c = config.clone();
    c.sessionize.group = unique("flood-");
    c.sessionize.max_open_sessions = cap;
    c.sessionize.max_open_sessions_per_tenant = events;
    let (process, addr) =
        sluice_tests::process::SluiceProcess::spawn_serving(&c, &["stage", "sessionize"], "flood");
    let read = format!(
        "sluice_stage_records_in_total{{stage=\"sessionize\",topic=\"{}\"}}",
        c.topics.enriched
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while metric(addr, &read).await != Some(events as f64) {
        assert!(
            std::time::Instant::now() < deadline,
            "sessionize read {:?} of {events}; log {}",
            metric(addr, &read).await,
            process.log_file().display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let evicted = metric(
        addr,
        "sluice_sessionize_evicted_sessions_total{reason=\"max_open_sessions\"}",
    )
    .await
    .unwrap_or(0.0) as u64;
    (process.peak_rss_mib(), evicted)
}

/// A flood of distinct users (one tenant sending a new `user_id` per event, all within
/// one gap) grew sessionize without bound: every open session is held until the
/// watermark passes it. With `max_open_sessions` the state stays at the cap: the peak
/// RSS is a fraction of the same flood's without it, and each eviction is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_users_keeps_memory_bounded() {
    const USERS: usize = 300_000;
    const CAP: usize = 500;
    let name = unique("flood");
    let config = stack_config().namespaced(&format!("t-{name}"), &name);
    sluice_tests::create_topics(&config).await;
    let t0 = chrono::DateTime::parse_from_rfc3339(T0).unwrap();
    let events: Vec<EnrichedEvent> = (0..USERS)
        .map(|i| {
            // Ten minutes of events: no session ends by the gap.
            let at = (t0 + chrono::Duration::milliseconds((i * 2) as i64)).to_rfc3339();
            enriched(i, "noisy", &format!("user-{i}"), "page_view", "/p", &at)
        })
        .collect();
    sluice_tests::produce_enriched(&config, &config.topics.enriched, &events).await;
    let (unbounded_mib, none) = flood_run(&config, USERS, USERS).await;
    assert_eq!(none, 0, "nothing is evicted without a cap");
    let (bounded_mib, evicted) = flood_run(&config, CAP, USERS).await;
    println!("peak RSS: {bounded_mib} MiB at {CAP} sessions per partition, {unbounded_mib} MiB without a cap");
    let partitions = config.topics.partitions as usize;
    assert_eq!(evicted as usize, USERS - CAP * partitions);
    assert!(
        (bounded_mib as f64) < 0.5 * unbounded_mib as f64,
        "bounded {bounded_mib} MiB vs unbounded {unbounded_mib} MiB"
    );
}
