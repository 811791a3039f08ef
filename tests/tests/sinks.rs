//! The sinks against real servers: continuous aggregate values on TimescaleDB (PGlite),
//! concurrent replicas on PostgreSQL 15, Elasticsearch on both ES-API servers, dead
//! letters for what can never be written, and replays that change nothing.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use rdkafka::message::Message;
use sluice_core::headers;
use sluice_sinks::elasticsearch::config::EsOpType;
use sluice_tests::{
    caught_up, dead_letters, enriched, produce_enriched, produce_versioned, sink, sink_namespace,
    stack_config, stack_var, unique, RunningSink,
};

/// A known input: tenant acme's page views and clicks in two hours, and one tenant
/// globex view. Expected aggregates are written out in the test.
fn known_input() -> Vec<sluice_schemas::EnrichedEvent> {
    vec![
        enriched(1, "acme", "u1", "page_view", "/a", "2026-11-20T10:00:10Z"),
        enriched(2, "acme", "u2", "page_view", "/a", "2026-11-20T10:00:20Z"),
        enriched(3, "acme", "u1", "page_view", "/a", "2026-11-20T10:01:05Z"),
        enriched(4, "acme", "u3", "page_view", "/b", "2026-11-20T10:30:00Z"),
        enriched(5, "acme", "u4", "click", "/b", "2026-11-20T10:05:00Z"),
        enriched(6, "acme", "u1", "page_view", "/a", "2026-11-20T11:15:00Z"),
        enriched(7, "globex", "g1", "page_view", "/a", "2026-11-20T10:00:30Z"),
    ]
}

async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get::<_, String>(i))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescale_aggregates_dead_letters_and_replay() {
    let mut config = stack_config();
    let name = unique("ts");
    sink_namespace(&mut config, &name).await;
    config.timescale.retention_days = Some(400);
    config.timescale.compress_after_days = Some(7);
    let mut input = known_input();
    // PostgreSQL text cannot hold NUL: this row can never be written.
    let mut bad = enriched(
        8,
        "acme",
        "u\u{0}x",
        "page_view",
        "/a",
        "2026-11-20T10:00:40Z",
    );
    bad.url = Some("/a".into());
    input.push(bad);
    produce_enriched(&config, &config.topics.enriched, &input).await;

    let sink = RunningSink::start(&config, sluice_tests::sink("timescale"));
    caught_up(&config, &config.timescale.group, &config.topics.enriched).await;
    let stats = sink.stop().await;
    assert_eq!(stats.dead_lettered, 1);

    let dlq = dead_letters(&config, &config.topics.dlq(&config.topics.enriched)).await;
    assert_eq!(dlq.len(), 1);
    let h = dlq[0].headers();
    assert_eq!(headers::get(h, headers::DLQ_STAGE), Some("timescale"));
    assert_eq!(headers::get(h, headers::DLQ_ERROR_CLASS), Some("write"));
    // Refused before the database sees it (which would fail the whole batch).
    assert!(
        headers::get(h, headers::DLQ_REASON)
            .unwrap()
            .contains("field `user_id` holds a NUL character"),
        "{:?}",
        headers::get(h, headers::DLQ_REASON)
    );

    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    let client = pool.get().await.unwrap();
    let s = &name;
    sluice_sinks::timescale::refresh_aggregates(&client, s)
        .await
        .unwrap();
    let count = |n: i64| n.to_string();
    let events: i64 = client
        .query_one(&format!("SELECT count(*) FROM {s}.events"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count(events), "7");
    assert_eq!(
        rows(&client, &format!("SELECT to_char(bucket AT TIME ZONE 'UTC', 'HH24:MI'), tenant, url, views::text FROM {s}.page_views_1m ORDER BY 1, 2, 3")).await,
        ["10:00 acme /a 2", "10:00 globex /a 1", "10:01 acme /a 1", "10:30 acme /b 1", "11:15 acme /a 1"]
    );
    assert_eq!(
        rows(&client, &format!("SELECT to_char(bucket AT TIME ZONE 'UTC', 'HH24:MI'), tenant, url, views::text FROM {s}.page_views_1h ORDER BY 1, 2, 3")).await,
        ["10:00 acme /a 3", "10:00 acme /b 1", "10:00 globex /a 1", "11:00 acme /a 1"]
    );
    assert_eq!(
        rows(&client, &format!("SELECT to_char(bucket AT TIME ZONE 'UTC', 'HH24:MI'), tenant, users::text FROM {s}.users_1h ORDER BY 1, 2")).await,
        ["10:00 acme 4", "10:00 globex 1", "11:00 acme 1"]
    );
    let jobs = rows(
        &client,
        &format!(
            "SELECT proc_name::text FROM timescaledb_information.jobs
             WHERE hypertable_schema = '{s}' OR hypertable_name IN (
               SELECT materialization_hypertable_name FROM timescaledb_information.continuous_aggregates
               WHERE view_schema = '{s}') ORDER BY 1"
        ),
    )
    .await;
    assert_eq!(
        jobs,
        [
            "policy_compression",
            "policy_refresh_continuous_aggregate",
            "policy_refresh_continuous_aggregate",
            "policy_refresh_continuous_aggregate",
            "policy_retention"
        ]
    );
    drop(client);
    pool.close();

    // Replay: the same records again, under a fresh group, change nothing.
    produce_enriched(&config, &config.topics.enriched, &input).await;
    config.timescale.group = unique("replay-");
    let sink = RunningSink::start(&config, sluice_tests::sink("timescale"));
    caught_up(&config, &config.timescale.group, &config.topics.enriched).await;
    let stats = sink.stop().await;
    assert_eq!(stats.consumed, 16, "both copies were read");
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    let client = pool.get().await.unwrap();
    sluice_sinks::timescale::refresh_aggregates(&client, s)
        .await
        .unwrap();
    let events: i64 = client
        .query_one(&format!("SELECT count(*) FROM {s}.events"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 7);
    let views: i64 = client
        .query_one(
            &format!("SELECT sum(views)::bigint FROM {s}.page_views_1h"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(views, 6);
    drop(client);
    pool.close();
}

/// Two replicas of the sink in one group, each with a pool of 4, on plain PostgreSQL 15,
/// over records with duplicates: every event is written exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_replicas_write_each_event_once() {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.timescale.pool_size = 4;
    config.timescale.batch_size = 300;
    let name = unique("pgc");
    sink_namespace(&mut config, &name).await;
    let events: Vec<_> = (0..3_000)
        .map(|i| {
            let at = format!(
                "2026-11-20T{:02}:{:02}:{:02}Z",
                8 + i / 3600 % 10,
                i / 60 % 60,
                i % 60
            );
            enriched(
                i,
                ["acme", "globex", "initech"][i % 3],
                &format!("u{}", i % 97),
                "page_view",
                "/x",
                &at,
            )
        })
        .collect();
    let a = RunningSink::start(&config, sluice_tests::sink("timescale"));
    let b = RunningSink::start(&config, sluice_tests::sink("timescale"));
    produce_enriched(&config, &config.topics.enriched, &events).await;
    // At-least-once re-delivery: the first 500 again.
    produce_enriched(&config, &config.topics.enriched, &events[..500]).await;
    caught_up(&config, &config.timescale.group, &config.topics.enriched).await;
    let (sa, sb) = (a.stop().await, b.stop().await);
    assert_eq!(sa.consumed + sb.consumed, 3_500);
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            &format!("SELECT count(*), count(DISTINCT event_id) FROM {name}.events"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (3_000, 3_000));
}

async fn es_json(
    config: &sluice::Config,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let url = format!("{}/{path}", config.elasticsearch.url);
    let http = reqwest::Client::new();
    let req = match body {
        Some(b) => http.post(url).json(&b),
        None => http.post(url),
    };
    req.send().await.unwrap().json().await.unwrap()
}

async fn es_count(config: &sluice::Config, query: serde_json::Value) -> u64 {
    let pattern = format!("{}-*", config.elasticsearch.index_prefix);
    es_json(config, &format!("{pattern}/_refresh"), None).await;
    let r = es_json(
        config,
        &format!("{pattern}/_count"),
        Some(serde_json::json!({ "query": query })),
    )
    .await;
    r["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("count answer {r}"))
}

async fn elasticsearch_sink_on(url: String, op_type: EsOpType) {
    let mut config = stack_config();
    config.elasticsearch.url = url;
    config.elasticsearch.op_type = op_type;
    config.elasticsearch.bulk_max_docs = 40;
    let name = unique("es");
    sink_namespace(&mut config, &name).await;
    let mut events: Vec<_> = (0..200)
        .map(|i| {
            let day = if i % 2 == 0 { "20" } else { "21" };
            let at = format!("2026-11-{day}T10:{:02}:00Z", i % 60);
            enriched(
                i,
                ["acme", "globex"][i % 4 / 2],
                &format!("u{}", i % 7),
                "page_view",
                "/p",
                &at,
            )
        })
        .collect();
    for e in &mut events {
        e.extra.insert("price".into(), "5".into());
    }
    let sink = RunningSink::start(&config, sluice_tests::sink("elasticsearch"));
    produce_enriched(&config, &config.topics.enriched, &events).await;
    caught_up(
        &config,
        &config.elasticsearch.group,
        &config.topics.enriched,
    )
    .await;
    // Same index as event 0 (acme, 20th), but `extra.price` is not a number there.
    let mut conflict = enriched(
        1_000,
        "acme",
        "u1",
        "page_view",
        "/p",
        "2026-11-20T11:00:00Z",
    );
    conflict
        .extra
        .insert("price".into(), "{\"amount\":5}".into());
    produce_enriched(&config, &config.topics.enriched, &[conflict]).await;
    caught_up(
        &config,
        &config.elasticsearch.group,
        &config.topics.enriched,
    )
    .await;
    let stats = sink.stop().await;
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");

    assert_eq!(
        es_count(&config, serde_json::json!({"match_all": {}})).await,
        200
    );
    // acme on the 20th: i % 4 == 0 → 50 events.
    let term_and_range = serde_json::json!({"bool": {"filter": [
        {"term": {"tenant": "acme"}},
        {"range": {"@timestamp": {"gte": "2026-11-20T00:00:00Z", "lt": "2026-11-21T00:00:00Z"}}}
    ]}});
    assert_eq!(es_count(&config, term_and_range.clone()).await, 50);

    let dlq = dead_letters(&config, &config.topics.dlq(&config.topics.enriched)).await;
    assert_eq!(dlq.len(), 1);
    let h = dlq[0].headers();
    assert_eq!(headers::get(h, headers::DLQ_STAGE), Some("elasticsearch"));
    let reason = headers::get(h, headers::DLQ_REASON).unwrap();
    assert!(
        reason.starts_with("400 ") && reason.contains("exception"),
        "{reason}"
    );

    // Replay everything under a fresh group: no duplicates.
    produce_enriched(&config, &config.topics.enriched, &events).await;
    config.elasticsearch.group = unique("replay-");
    let sink = RunningSink::start(&config, sluice_tests::sink("elasticsearch"));
    caught_up(
        &config,
        &config.elasticsearch.group,
        &config.topics.enriched,
    )
    .await;
    let replay = sink.stop().await;
    // Already-present documents are successes (overwritten, or 409 under `create`);
    // only the conflicting document, read again, is dead-lettered again.
    assert_eq!(
        (replay.written, replay.dead_lettered),
        (400, 1),
        "{replay:?}"
    );
    assert_eq!(
        es_count(&config, serde_json::json!({"match_all": {}})).await,
        200
    );
    assert_eq!(es_count(&config, term_and_range).await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_sink_on_noida() {
    elasticsearch_sink_on(stack_config().elasticsearch.url, EsOpType::Index).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_sink_on_osmem() {
    // With `create`, the replay's items answer 409, which must count as written.
    elasticsearch_sink_on(stack_var("SLUICE_STACK_ES_ALT_URL"), EsOpType::Create).await;
}

/// What a sink holds: (tenant, event id) → each copy's (event time, country).
type Held = std::collections::BTreeMap<(String, String), Vec<(i64, Option<String>)>>;

/// Every row and document each sink holds.
async fn held(config: &sluice::Config) -> Vec<Held> {
    let all = sluice_sinks::Selection::Received {
        from: 0,
        to: i64::MAX,
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
    [db, docs]
        .into_iter()
        .map(|rows| {
            let mut m = Held::default();
            for r in rows {
                let e = r.event.unwrap();
                m.entry((r.tenant, r.event_id))
                    .or_default()
                    .push((e.event_time, e.country));
            }
            m
        })
        .collect()
}

async fn run_both_sinks(config: &sluice::Config) {
    for sink in [sink("timescale"), sink("elasticsearch")] {
        let mut running = RunningSink::start(config, sink);
        let group = sink.group(config);
        running
            .caught_up(config, group, &config.topics.enriched)
            .await;
        running.stop().await;
    }
}

/// Two tenants that choose the same client `event_id` for events at the same millisecond
/// both keep their rows and documents (the old key, `(time, event_id)`, let one
/// suppress the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_with_the_same_event_id_and_time_both_keep_theirs() {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    let name = unique("tid");
    sink_namespace(&mut config, &name).await;
    let at = "2026-11-20T10:00:00Z";
    let mut a = enriched(1, "acme", "u1", "page_view", "/a", at);
    let mut b = enriched(1, "globex", "u1", "page_view", "/a", at);
    a.country = Some("DE".into());
    b.country = Some("FR".into());
    // A tenant whose name holds the separator of document ids, and one whose index name
    // is acme's (index names are lowercase).
    let mut c = enriched(1, "acme:eu", "u1", "page_view", "/a", at);
    c.country = Some("NL".into());
    let mut d = enriched(1, "ACME", "u1", "page_view", "/a", at);
    d.country = Some("US".into());
    produce_enriched(&config, &config.topics.enriched, &[a, b, c, d]).await;
    run_both_sinks(&config).await;
    for (sink, held) in ["timescale", "elasticsearch"]
        .iter()
        .zip(held(&config).await)
    {
        let got: Vec<(&str, Option<&str>)> = held
            .iter()
            .map(|((t, _), v)| {
                assert_eq!(v.len(), 1, "{sink}: {t} stored {} times", v.len());
                (t.as_str(), v[0].1.as_deref())
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("ACME", Some("US")),
                ("acme", Some("DE")),
                ("acme:eu", Some("NL")),
                ("globex", Some("FR"))
            ],
            "{sink}"
        );
    }
}

/// A late re-delivery of an older processing (a sink replay, an at-least-once repeat of
/// an old record) arrives after a newer processing: it changes nothing, even when the old
/// processing had the event at another time; the newer values and time stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_processing_arriving_later_does_not_overwrite() {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    let name = unique("stale");
    sink_namespace(&mut config, &name).await;
    let old_at = "2026-11-20T23:30:00Z";
    let new_at = "2026-11-21T04:30:00Z";
    let mut old = enriched(7, "acme", "u1", "page_view", "/a", old_at);
    old.country = Some("XX".into());
    let mut new = enriched(7, "acme", "u1", "page_view", "/a", new_at);
    new.country = Some("DE".into());
    new.received_at = old.received_at;
    // The old processing first, then the correction: the event moves and changes.
    produce_versioned(
        &config,
        &config.topics.enriched,
        &[(old.clone(), Some(1_000)), (new.clone(), Some(2_000))],
    )
    .await;
    run_both_sinks(&config).await;
    let want = (new.event_time, Some("DE".to_string()));
    for held in held(&config).await {
        assert_eq!(held.values().collect::<Vec<_>>(), vec![&vec![want.clone()]]);
    }
    // Then the old processing again, in a later batch: nothing changes.
    produce_versioned(&config, &config.topics.enriched, &[(old, Some(1_000))]).await;
    run_both_sinks(&config).await;
    for (sink, held) in ["timescale", "elasticsearch"]
        .iter()
        .zip(held(&config).await)
    {
        assert_eq!(
            held.values().collect::<Vec<_>>(),
            vec![&vec![want.clone()]],
            "{sink}: the older processing overwrote the newer one"
        );
    }
}

/// One event with a NUL character in a batch of 200: it alone is dead-lettered, with a
/// reason naming the field (before, the database refused the whole batch, which was then
/// written row by row and the reason was PostgreSQL's encoding error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_a_nul_character_is_dead_lettered_alone() {
    let mut config = stack_config();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    config.timescale.batch_size = 500;
    let name = unique("nul");
    sink_namespace(&mut config, &name).await;
    let mut events: Vec<_> = (0..200)
        .map(|i| enriched(i, "acme", "u1", "page_view", "/x", "2026-11-20T08:00:00Z"))
        .collect();
    events[77].url = Some("/a\u{0}b".into());
    events[78]
        .extra
        .insert("note".into(), r#""nul \u0000 escaped""#.into());
    let mut sink = RunningSink::start(&config, sluice_tests::sink("timescale"));
    produce_enriched(&config, &config.topics.enriched, &events).await;
    sink.caught_up(&config, &config.timescale.group, &config.topics.enriched)
        .await;
    sink.stop().await;
    let pool = sluice_sinks::timescale::pool(&config.timescale).unwrap();
    let client = pool.get().await.unwrap();
    let stored: std::collections::BTreeSet<String> = client
        .query(&format!("SELECT event_id FROM {name}.events"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: std::collections::BTreeSet<String> = (0..200)
        .filter(|i| *i != 77 && *i != 78)
        .map(|i| format!("ev-{i}"))
        .collect();
    assert_eq!(stored, want);
    let dlq = dead_letters(&config, &config.topics.dlq(&config.topics.enriched)).await;
    let reasons: Vec<String> = dlq
        .iter()
        .map(|m| {
            headers::get(m.headers(), headers::DLQ_REASON)
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("field `url` holds a NUL"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("field `extra` holds a NUL"),
        "{reasons:?}"
    );
}

/// Records the sizes of the batches the sink loop hands it (a destination that stores
/// nothing: this is about the loop's batching).
struct BatchSizes(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

impl sluice_sinks::BatchWriter for BatchSizes {
    type Record = sluice_schemas::EnrichedEvent;

    fn name(&self) -> &'static str {
        "batch-sizes"
    }

    async fn write(
        &self,
        records: &[sluice_sinks::Versioned<sluice_schemas::EnrichedEvent>],
    ) -> sluice_sinks::WriteResult {
        self.0.lock().unwrap().push(records.len());
        sluice_core::retry::RetryAction::Successful(Vec::new())
    }
}

/// Batches are bounded by bytes as well as by count: 40 events of about 20 KB each in
/// batches of at most 100 KB, so a flood of large records cannot fill memory
/// `batch_size` records at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_bounded_by_bytes_as_well_as_by_count() {
    let mut config = stack_config();
    let name = unique("bytes");
    sink_namespace(&mut config, &name).await;
    let events: Vec<_> = (0..40)
        .map(|i| {
            let mut e = enriched(i, "acme", "u1", "page_view", "/x", "2026-11-20T08:00:00Z");
            e.user_agent = Some("a".repeat(20_000));
            e
        })
        .collect();
    produce_enriched(&config, &config.topics.enriched, &events).await;
    let mut spec = sluice_sinks::SinkSpec::new(
        &config.topics,
        &config.timescale.group,
        &config.topics.enriched,
        &Default::default(),
    );
    spec.batch_size = 2_000;
    spec.max_batch_bytes = 100_000;
    spec.linger = std::time::Duration::from_millis(500);
    let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let (k, s, w, st) = (
        config.kafka.clone(),
        spec.clone(),
        BatchSizes(sizes.clone()),
        stop.clone(),
    );
    let task = tokio::spawn(async move {
        sluice_sinks::run_sink(&k, &s, w, sluice_schemas::ENRICHED_EVENTS.clone(), st).await
    });
    caught_up(&config, &config.timescale.group, &config.topics.enriched).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 40, "{sizes:?}");
    assert!(
        sizes.iter().all(|n| *n <= 5),
        "at most 5 records of 20 KB in 100 KB: {sizes:?}"
    );
}

/// A cluster refusing request bodies over 20 KB (413): the sink halves the bulk requests
/// until they pass, and dead-letters the one document that alone is too large, instead of
/// failing the batch for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_from_elasticsearch_splits_the_bulk_request() {
    let mut config = stack_config();
    let name = unique("split");
    sink_namespace(&mut config, &name).await;
    let proxy = sluice_tests::faults::SizeLimitProxy::start(
        stack_var("SLUICE__ELASTICSEARCH__URL"),
        20_000,
    )
    .await;
    config.elasticsearch.url = format!("http://{}", proxy.addr);
    config.elasticsearch.bulk_max_bytes = 5 * 1024 * 1024;
    let mut events: Vec<_> = (0..60)
        .map(|i| {
            let mut e = enriched(i, "acme", "u1", "page_view", "/x", "2026-11-20T08:00:00Z");
            e.user_agent = Some("a".repeat(900));
            e
        })
        .collect();
    events[30].user_agent = Some("b".repeat(30_000));
    produce_enriched(&config, &config.topics.enriched, &events).await;
    let mut sink = RunningSink::start(&config, sluice_tests::sink("elasticsearch"));
    sink.caught_up(
        &config,
        &config.elasticsearch.group,
        &config.topics.enriched,
    )
    .await;
    sink.stop().await;
    assert!(proxy.refused.load(std::sync::atomic::Ordering::Relaxed) > 0);
    let all = sluice_sinks::Selection::Received {
        from: 0,
        to: i64::MAX,
        tenant: None,
    };
    let read = sluice_tests::sink("elasticsearch").read_stored.unwrap();
    let stored: std::collections::BTreeSet<String> = read(config.clone(), all, false)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.event_id)
        .collect();
    let want: std::collections::BTreeSet<String> = (0..60)
        .filter(|i| *i != 30)
        .map(|i| format!("ev-{i}"))
        .collect();
    assert_eq!(stored, want);
    let dlq = dead_letters(&config, &config.topics.dlq(&config.topics.enriched)).await;
    assert_eq!(dlq.len(), 1);
    let h = dlq[0].headers();
    assert_eq!(headers::get(h, headers::DLQ_ERROR_CLASS), Some("oversized"));
    let refused = sluice_schemas::ENRICHED_EVENTS
        .decode(dlq[0].payload().unwrap())
        .unwrap();
    assert_eq!(refused.event_id, "ev-30");
}

/// A tenant's index pattern (what a search, or a role granting one, names) reaches its
/// own documents only: `acme-*` once matched `acme-eu`'s indices, and `Acme`, `a.b` and
/// `a_b` shared an index with `acme`, `a_b` and `a.b`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_index_pattern_sees_only_its_own_documents() {
    use std::collections::{BTreeMap, BTreeSet};
    let mut config = stack_config();
    let name = unique("es-iso");
    sink_namespace(&mut config, &name).await;
    let tenants = ["acme", "acme-eu", "Acme", "a.b", "a_b"];
    let events: Vec<_> = (0..50)
        .map(|i| {
            let at = format!("2026-11-20T10:{:02}:00Z", i % 60);
            enriched(i, tenants[i % tenants.len()], "u", "page_view", "/p", &at)
        })
        .collect();
    let mut expected: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for e in &events {
        expected
            .entry(tenants.iter().find(|t| **t == e.tenant).unwrap())
            .or_default()
            .insert(e.event_id.clone());
    }
    let sink = RunningSink::start(&config, sluice_tests::sink("elasticsearch"));
    produce_enriched(&config, &config.topics.enriched, &events).await;
    caught_up(
        &config,
        &config.elasticsearch.group,
        &config.topics.enriched,
    )
    .await;
    sink.stop().await;
    let prefix = &config.elasticsearch.index_prefix;
    es_json(&config, &format!("{prefix}-*/_refresh"), None).await;
    for tenant in tenants {
        let pattern = sluice_sinks::elasticsearch::tenant_pattern(prefix, tenant);
        let r = es_json(
            &config,
            &format!("{pattern}/_search"),
            Some(serde_json::json!({"size": 100, "_source": ["tenant", "event_id"]})),
        )
        .await;
        let hits = r["hits"]["hits"]
            .as_array()
            .unwrap_or_else(|| panic!("search answer {r}"));
        let seen: BTreeSet<(String, String)> = hits
            .iter()
            .map(|h| {
                let s = &h["_source"];
                (
                    s["tenant"].as_str().unwrap().into(),
                    s["event_id"].as_str().unwrap().into(),
                )
            })
            .collect();
        let want: BTreeSet<(String, String)> = expected[tenant]
            .iter()
            .map(|id| (tenant.to_string(), id.clone()))
            .collect();
        assert_eq!(seen, want, "{pattern}");
    }
}
