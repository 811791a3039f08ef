//! The enrich stage's tenant lookup in PostgreSQL (a directory cached with a TTL), its
//! transient failures (retried with backoff, then dead-lettered with the attempt count),
//! and re-driving those dead letters through enrich with `sluice replay` once the
//! directory is back.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::time::Duration;

use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use sluice::replay::{self, Filters, Mode, Range, Target};
use sluice::Config;
use sluice_core::{headers, kafka};
use sluice_schemas::ENRICHED_EVENTS;
use sluice_tests::{caught_up, dead_letters, stack_config, stack_var, stage, unique};
use tokio_util::sync::CancellationToken;

/// A namespace whose enrich stage reads tenants from a fresh table in PostgreSQL 15.
async fn setup(tenants_url: Option<&str>) -> Config {
    let mut config = stack_config();
    let name = unique("tn");
    config = config.namespaced(&format!("t-{name}"), &name);
    sluice_tests::create_topics(&config).await;
    let pg = stack_var("SLUICE_STACK_PG_URL");
    let (client, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {name}; CREATE TABLE {name}.tenants (tenant text PRIMARY KEY, name text, plan text);
             INSERT INTO {name}.tenants VALUES ('acme', 'Acme Inc.', 'enterprise')"
        ))
        .await
        .unwrap();
    config.enrich.tenants_url = Some(tenants_url.unwrap_or(&pg).to_string());
    config.enrich.tenants_query = format!("SELECT tenant, name, plan FROM {name}.tenants");
    config.enrich.tenants_ttl_s = 5;
    config
}

async fn produce_raw(config: &Config, n: usize) {
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    for i in 0..n {
        let (id, tenant) = (format!("ev-{i}"), ["acme", "globex"][i % 2]);
        let line = format!(
            r#"{{"user_id":"u{i}","type":"click","ts":{}}}"#,
            1_795_428_000_000u64 + i as u64
        );
        let h = sluice_tests::raw_headers(tenant, &id, "1795428000000");
        producer
            .send(
                FutureRecord::to(&config.topics.raw)
                    .key(&id)
                    .payload(&line)
                    .headers(h),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
}

async fn run_stages(config: &Config) {
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for name in [stage("parse"), stage("enrich")] {
        let (c, s) = (config.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { name.run(&c, s).await }));
    }
    caught_up(config, &config.parse.group, &config.topics.raw).await;
    caught_up(config, &config.enrich.group, &config.topics.parsed).await;
    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// (tenant, tenant_name, tenant_plan) of every enriched record.
async fn enriched(config: &Config) -> Vec<(String, Option<String>, Option<String>)> {
    let (k, t) = (config.kafka.clone(), config.topics.enriched.clone());
    let records =
        tokio::task::spawn_blocking(move || kafka::read_all(&k, &t, Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap();
    records
        .iter()
        .map(|m| {
            let e = ENRICHED_EVENTS.decode(m.payload().unwrap()).unwrap();
            (e.tenant, e.tenant_name, e.tenant_plan)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_looked_up_in_postgres() {
    let config = setup(None).await;
    produce_raw(&config, 40).await;
    run_stages(&config).await;
    let out = enriched(&config).await;
    assert_eq!(out.len(), 40);
    for (tenant, name, plan) in out {
        match tenant.as_str() {
            "acme" => assert_eq!(
                (name.as_deref(), plan.as_deref()),
                (Some("Acme Inc."), Some("enterprise"))
            ),
            _ => assert_eq!(
                (name, plan),
                (None, None),
                "a tenant the directory does not list"
            ),
        }
    }
}

/// The directory's database is unreachable: the first record is retried with backoff and
/// dead-lettered after 5 attempts; the next ones go straight to the DLQ (cooldown), so
/// the stage keeps moving. Once the directory is back, a replay of the DLQ through enrich
/// enriches every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_down_are_retried_dead_lettered_and_re_driven() {
    let mut config = setup(Some(
        "postgres://postgres@127.0.0.1:1/postgres?connect_timeout=1",
    ))
    .await;
    produce_raw(&config, 20).await;
    let started = std::time::Instant::now();
    run_stages(&config).await;
    println!(
        "20 records through a directory that is down in {:?}",
        started.elapsed()
    );
    assert!(enriched(&config).await.is_empty());
    let t = &config.topics;
    let dlq = dead_letters(&config, &t.dlq(&t.parsed)).await;
    assert_eq!(dlq.len(), 20);
    let attempts: Vec<u32> = dlq
        .iter()
        .map(|d| {
            headers::get(d.headers(), headers::DLQ_ATTEMPTS)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(
        attempts.iter().filter(|a| **a == 5).count(),
        1,
        "{attempts:?}"
    );
    assert_eq!(
        attempts.iter().filter(|a| **a == 1).count(),
        19,
        "{attempts:?}"
    );
    for d in &dlq {
        assert_eq!(
            headers::get(d.headers(), headers::DLQ_ERROR_CLASS),
            Some("lookup")
        );
        let reason = headers::get(d.headers(), headers::DLQ_REASON).unwrap();
        assert!(reason.contains("tenant directory"), "{reason}");
    }

    // The directory is back: re-drive the dead letters through enrich.
    config.enrich.tenants_url = Some(stack_var("SLUICE_STACK_PG_URL"));
    let dlq_topic = t.dlq(&t.parsed);
    let (k, topic) = (config.kafka.clone(), dlq_topic.clone());
    let everything = Range::Times {
        from: None,
        to: None,
    };
    let plan = tokio::task::spawn_blocking(move || replay::resolve(&k, &topic, &everything, None))
        .await
        .unwrap()
        .unwrap();
    let outcome = replay::run(
        &config,
        &plan,
        &Target::Component(stage("enrich")),
        &Mode::FreshGroup(unique("redrive-")),
        &Filters::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (outcome.read, outcome.written, outcome.dead_lettered),
        (20, 20, 0)
    );
    let out = enriched(&config).await;
    assert_eq!(out.len(), 20);
    assert_eq!(
        out.iter()
            .filter(|(_, n, _)| n.as_deref() == Some("Acme Inc."))
            .count(),
        10
    );
}

/// The operator's `tenants_query` is theirs to write: a row whose id is NULL is skipped
/// (the rest of the directory loads), a NULL name or plan is a missing value, and a
/// column of the wrong type fails the load with its number, never the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_with_nulls_or_wrong_types_does_not_panic() {
    use sluice_stages::enrich::tenants::{load, Tenant, TenantDirectory};
    let url = stack_var("SLUICE_STACK_PG_URL");
    let dir = TenantDirectory::new(Duration::from_secs(60));
    load(
        &url,
        "SELECT NULL::text, 'Nobody', 'free' UNION ALL SELECT 'acme', NULL, 'pro'",
        &dir,
    )
    .await;
    assert_eq!(
        dir.lookup("acme").unwrap(),
        Some(Tenant {
            name: None,
            plan: Some("pro".into())
        })
    );
    let typed = TenantDirectory::new(Duration::from_millis(1));
    load(&url, "SELECT 42, 'Answer', 'free'", &typed).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let err = typed.lookup("42").unwrap_err();
    assert!(
        err.reason
            .contains("enrich.tenants_query: column 1 (tenant id)"),
        "{err}"
    );
}
