//! Registry mode: Avro records in the Confluent wire format, with schemas registered in a
//! schema registry. No real registry can be installed here, so these tests run against
//! the **test fixture** in `tests/src/registry_fixture.rs` (a small in-memory server
//! speaking the Confluent REST API); the pipeline side is the real `sluice` code through
//! `schema_registry_converter`.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::time::Duration;

use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice::Config;
use sluice_core::config::SchemaMode;
use sluice_core::headers;
use sluice_schemas::setup::{reading_codec, writing_codec};
use sluice_schemas::{ClickEvent, Codec, EnrichedEvent, RegistryAuth, SchemaRegistry};
use sluice_tests::registry_fixture::RegistryFixture;
use sluice_tests::{caught_up, dead_letters, stack_config, stack_var, stage, unique, RunningSink};
use tokio_util::sync::CancellationToken;

/// A namespace in registry mode against `registry`.
async fn setup(registry: &RegistryFixture) -> Config {
    let mut config = stack_config();
    let name = unique("sr");
    config = config.namespaced(&format!("t-{name}"), &name);
    config.schemas.mode = SchemaMode::Registry;
    config.schemas.registry_url = registry.url();
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    sluice_tests::create_topics(&config).await;
    config
}

async fn produce(config: &Config, topic: &str, records: Vec<(String, Vec<u8>, OwnedHeaders)>) {
    let producer: FutureProducer = config.kafka.producer_config().create().unwrap();
    for (key, payload, h) in records {
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&payload)
                    .headers(h),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
}

fn frame(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// Raw events through parse → enrich → the PostgreSQL sink, all in registry mode: each
/// writer registers its schema under `<topic>-value`, every record carries that id, the
/// sink decodes them all, and each reader asked the registry once per id. A record
/// naming an id the registry does not have is dead-lettered with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_in_registry_mode() {
    let registry = RegistryFixture::start();
    let config = setup(&registry).await;
    let n = 200;
    let raw = (0..n)
        .map(|i| {
            let id = format!("ev-{i}");
            let line = format!(
                r#"{{"user_id":"u{}","type":"page_view","ts":{},"url":"/p/{i}"}}"#,
                i % 7,
                1_795_428_000_000u64 + i as u64
            );
            let h = sluice_tests::raw_headers("acme", &id, "1795428000000");
            (id, line.into_bytes(), h)
        })
        .collect();
    produce(&config, &config.topics.raw, raw).await;
    // A parsed record in the wire format with an id nobody registered.
    let poison = vec![(
        "poison".to_string(),
        frame(9999, &[2, 4, 6]),
        sluice_tests::raw_headers("acme", "poison", "1795428000000"),
    )];
    produce(&config, &config.topics.parsed, poison).await;

    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for name in [stage("parse"), stage("enrich")] {
        let (c, s) = (config.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { name.run(&c, s).await }));
    }
    let mut sink = RunningSink::start(&config, sluice_tests::sink("timescale"));
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    caught_up(&config, &config.enrich.group, &config.topics.parsed).await;
    sink.caught_up(&config, &config.timescale.group, &config.topics.enriched)
        .await;
    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = sink.stop().await;
    assert_eq!((stats.written, stats.dead_lettered), (n as u64, 0));

    // One id per subject, and every record framed with it.
    let parsed_ids = registry.ids(&format!("{}-value", config.topics.parsed));
    let enriched_ids = registry.ids(&format!("{}-value", config.topics.enriched));
    assert_eq!((parsed_ids.len(), enriched_ids.len()), (1, 1));
    assert_ne!(parsed_ids[0], enriched_ids[0]);
    for (topic, id, count) in [
        (&config.topics.parsed, parsed_ids[0], n + 1),
        (&config.topics.enriched, enriched_ids[0], n),
    ] {
        let records = dead_letters(&config, topic).await;
        assert_eq!(records.len(), count, "{topic}");
        let ours: Vec<_> = records
            .iter()
            .filter(|m| headers::get(m.headers(), headers::EVENT_ID) != Some("poison"))
            .collect();
        assert_eq!(ours.len(), n);
        for m in ours {
            assert_eq!(&m.payload().unwrap()[..5], &frame(id, &[])[..], "{topic}");
            assert_eq!(
                headers::get(m.headers(), headers::ENCODING),
                Some("avro-confluent")
            );
        }
    }

    // The rows are in PostgreSQL.
    let (client, conn) = tokio_postgres::connect(&config.timescale.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {}.events", config.timescale.schema),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, n as i64);

    // The poison record reached the DLQ with the registry's answer.
    let dead = dead_letters(&config, &config.topics.dlq(&config.topics.parsed)).await;
    assert_eq!(dead.len(), 1);
    let reason = headers::get(dead[0].headers(), headers::DLQ_REASON).unwrap();
    assert_eq!(
        headers::get(dead[0].headers(), headers::DLQ_ERROR_CLASS),
        Some("decode")
    );
    assert!(
        reason.contains("schema id 9999 is not in the registry"),
        "{reason}"
    );
    // Lookups by id: the parsed id (enrich), the enriched id (sink) and 9999; not one
    // per record. (Writers know their own id from registering it.)
    assert!(
        registry.lookups_by_id() <= 3,
        "{} lookups for {} records",
        registry.lookups_by_id(),
        2 * n
    );
}

/// A writer whose schema is not compatible with what its subject holds does not start,
/// and says which subject and registry refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_schema_is_refused_at_start() {
    let registry = RegistryFixture::start();
    let config = setup(&registry).await;
    let subject = format!("{}-value", config.topics.parsed);
    // Someone registered a ClickEvent whose user_id is a number: today's ClickEvent
    // (user_id a string) cannot read those records.
    registry.register(
        &subject,
        r#"{"type":"record","name":"ClickEvent","namespace":"io.sluice","fields":[
            {"name":"event_id","type":"string"},{"name":"user_id","type":"long"}]}"#,
    );
    let err = stage("parse")
        .run(&config, CancellationToken::new())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("not compatible"), "{msg}");
    assert!(msg.contains(&subject), "{msg}");
    assert!(msg.contains(&registry.url()), "{msg}");
    assert_eq!(registry.ids(&subject).len(), 1, "nothing was registered");
}

/// Schema evolution through the registry: records written with the released v1 of
/// EnrichedEvent (registered first, by an older enrich) still decode once today's v2 is
/// registered beside it, the new fields at their defaults; records in the embedded
/// encoding decode too (a topic switching modes); an unreachable registry is a transient
/// error (retried), not a bad record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_versions_and_both_encodings_decode() {
    let registry = RegistryFixture::start();
    let config = setup(&registry).await;
    let subject = format!("{}-value", config.topics.enriched);
    let v1_text = include_str!("../../schemas/avro/released/enriched_event/v1.avsc");
    let v1_id = registry.register(&subject, v1_text);
    let writer: std::sync::Arc<Codec<EnrichedEvent>> =
        writing_codec(&config.schemas, &config.topics.enriched)
            .await
            .unwrap();
    let v2_id = writer.schema_id().unwrap();
    assert_ne!(v1_id, v2_id);
    assert_eq!(registry.ids(&subject), vec![v1_id, v2_id]);

    let mut event = sluice_tests::enriched(1, "acme", "u1", "click", "/a", "2026-11-23T10:00:00Z");
    event.browser = Some("Firefox".into());
    // Written by the older enrich: the v1 fields only.
    let v1 = Schema::parse_str(v1_text).unwrap();
    let apache_avro::types::Value::Record(fields) = apache_avro::to_value(&event).unwrap() else {
        panic!("a record");
    };
    let old: Vec<_> = fields
        .into_iter()
        .filter(|(k, _)| !k.starts_with("tenant_"))
        .collect();
    let datum = GenericDatumWriter::builder(&v1)
        .build()
        .unwrap()
        .write_value_to_vec(apache_avro::types::Value::Record(old))
        .unwrap();

    let reader: std::sync::Arc<Codec<EnrichedEvent>> = reading_codec(&config.schemas).unwrap();
    assert_eq!(reader.decode(&frame(v1_id, &datum)).unwrap(), event);
    event.tenant_name = Some("Acme Inc.".into());
    let current = writer.encode(&event).unwrap();
    assert_eq!(&current[..5], &frame(v2_id, &[])[..]);
    assert_eq!(reader.decode(&current).unwrap(), event);
    let embedded = sluice_schemas::ENRICHED_EVENTS.encode(&event).unwrap();
    assert_eq!(reader.decode(&embedded).unwrap(), event);

    // The registry is unreachable: transient, so a stage retries and a sink waits.
    let down = SchemaRegistry::new(
        vec!["http://127.0.0.1:1".into()],
        RegistryAuth::None,
        Duration::from_secs(2),
    );
    let err = Codec::<ClickEvent>::reading(std::sync::Arc::new(down))
        .unwrap()
        .decode(&frame(5, &[0]))
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    let failure = sluice_stages::Failure::from(err);
    assert_eq!((failure.class, failure.transient), ("registry", true));
}
