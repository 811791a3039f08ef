//! Registry mode: Avro records in the Confluent wire format, with schemas registered in a
//! schema registry: the stack's Apicurio Registry, through its Confluent-compatible API
//! (global compatibility level BACKWARD, as Confluent's default). The pipeline side is
//! the real `sluice` code through `schema_registry_converter`. Where a test needs the
//! registry gone, a relay in front of it is taken down, so other tests keep theirs.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use std::time::Duration;

use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice::Config;
use sluice_core::config::SchemaMode;
use sluice_core::headers;
use sluice_schemas::setup::{reading_codec, schema_registry, writing_codec};
use sluice_schemas::{ClickEvent, Codec, EnrichedEvent, RegistryAuth, SchemaRegistry};
use sluice_tests::faults::Relay;
use sluice_tests::registry::StackRegistry;
use sluice_tests::{caught_up, dead_letters, stack_config, stack_var, stage, unique, RunningSink};
use tokio_util::sync::CancellationToken;

/// A namespace in registry mode against the registry at `url`.
async fn setup(url: String) -> Config {
    let mut config = stack_config();
    let name = unique("sr");
    config = config.namespaced(&format!("t-{name}"), &name);
    config.schemas.mode = SchemaMode::Registry;
    config.schemas.registry_url = url;
    config.timescale.url = stack_var("SLUICE_STACK_PG_URL");
    sluice_tests::create_topics(&config).await;
    config
}

/// A relay in front of the stack's registry, and the registry URL through it.
async fn relayed(registry: &StackRegistry) -> (Relay, String) {
    let url = reqwest::Url::parse(&registry.url()).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let relay = Relay::start(upstream.parse().unwrap()).await;
    let through = format!("http://{}{}", relay.addr, url.path());
    (relay, through)
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

fn raw_events(from: usize, to: usize) -> Vec<(String, Vec<u8>, OwnedHeaders)> {
    (from..to)
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
        .collect()
}

/// Raw events through parse → enrich → the PostgreSQL sink, all in registry mode: each
/// writer registers its schema under `<topic>-value` at start, every record carries that
/// id, and the sink decodes them all. A record naming an id the registry does not have is
/// dead-lettered with that reason. Then the registry goes away: the running processes
/// keep going on the schemas they cached, and the next events arrive all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_in_registry_mode_and_outlives_the_registry() {
    let registry = StackRegistry::new();
    let (relay, url) = relayed(&registry).await;
    let config = setup(url.clone()).await;
    let n = 200;
    produce(&config, &config.topics.raw, raw_events(0, n)).await;
    // A parsed record in the wire format with an id nobody registered.
    let unknown_id = 999_999;
    let poison = vec![(
        "poison".to_string(),
        frame(unknown_id, &[2, 4, 6]),
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

    // One id per subject, registered at start, and every record framed with it.
    let parsed_ids = registry
        .ids(&format!("{}-value", config.topics.parsed))
        .await;
    let enriched_ids = registry
        .ids(&format!("{}-value", config.topics.enriched))
        .await;
    assert_eq!((parsed_ids.len(), enriched_ids.len()), (1, 1));
    assert_ne!(parsed_ids[0], enriched_ids[0]);

    // The registry goes away; what runs has every schema it needs cached.
    relay.set_down(true);
    let more = 100;
    produce(&config, &config.topics.raw, raw_events(n, n + more)).await;
    caught_up(&config, &config.parse.group, &config.topics.raw).await;
    caught_up(&config, &config.enrich.group, &config.topics.parsed).await;
    sink.caught_up(&config, &config.timescale.group, &config.topics.enriched)
        .await;
    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = sink.stop().await;
    let total = n + more;
    assert_eq!((stats.written, stats.dead_lettered), (total as u64, 0));

    for (topic, id, count) in [
        (&config.topics.parsed, parsed_ids[0], total + 1),
        (&config.topics.enriched, enriched_ids[0], total),
    ] {
        let records = dead_letters(&config, topic).await;
        assert_eq!(records.len(), count, "{topic}");
        let ours: Vec<_> = records
            .iter()
            .filter(|m| headers::get(m.headers(), headers::EVENT_ID) != Some("poison"))
            .collect();
        assert_eq!(ours.len(), total);
        for m in ours {
            assert_eq!(&m.payload().unwrap()[..5], &frame(id, &[])[..], "{topic}");
            assert_eq!(
                headers::get(m.headers(), headers::ENCODING),
                Some("avro-confluent")
            );
        }
    }

    // Every event is in PostgreSQL, by id.
    let (client, conn) = tokio_postgres::connect(&config.timescale.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            &format!(
                "SELECT event_id FROM {}.events ORDER BY event_id",
                config.timescale.schema
            ),
            &[],
        )
        .await
        .unwrap();
    let stored: std::collections::BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
    let sent: std::collections::BTreeSet<String> = (0..total).map(|i| format!("ev-{i}")).collect();
    assert_eq!(stored, sent);

    // The poison record reached the DLQ with the registry's answer.
    let dead = dead_letters(&config, &config.topics.dlq(&config.topics.parsed)).await;
    assert_eq!(dead.len(), 1);
    let reason = headers::get(dead[0].headers(), headers::DLQ_REASON).unwrap();
    assert_eq!(
        headers::get(dead[0].headers(), headers::DLQ_ERROR_CLASS),
        Some("decode")
    );
    assert!(
        reason.contains(&format!("schema id {unknown_id} is not in the registry")),
        "{reason}"
    );
}

/// A writer that cannot reach the registry at start does not start, and says which
/// registry and subject it was trying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_down_at_start_is_a_clear_error() {
    let registry = StackRegistry::new();
    let (relay, url) = relayed(&registry).await;
    let config = setup(url.clone()).await;
    relay.set_down(true);
    let err = stage("parse")
        .run(&config, CancellationToken::new())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    let subject = format!("{}-value", config.topics.parsed);
    assert!(msg.contains(&subject), "{msg}");
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.contains("registration"), "{msg}");
    assert!(registry.ids(&subject).await.is_empty());
}

/// A writer whose schema is not compatible with what its subject holds does not start,
/// and says which subject and registry refused it, and why in the registry's own words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_schema_is_refused_at_start_with_the_registrys_reason() {
    let registry = StackRegistry::new();
    let config = setup(registry.url()).await;
    let subject = format!("{}-value", config.topics.parsed);
    // Someone registered a ClickEvent whose user_id is a number: today's ClickEvent
    // (user_id a string) cannot read those records.
    registry
        .register(
            &subject,
            r#"{"type":"record","name":"ClickEvent","namespace":"io.sluice","fields":[
            {"name":"event_id","type":"string"},{"name":"user_id","type":"long"}]}"#,
        )
        .await;
    let err = stage("parse")
        .run(&config, CancellationToken::new())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("not compatible"), "{msg}");
    assert!(msg.contains(&subject), "{msg}");
    assert!(msg.contains(&registry.url()), "{msg}");
    // Apicurio's explanation names the field's type clash.
    assert!(msg.contains("the registry says:"), "{msg}");
    assert!(msg.contains("not compatible with writer type"), "{msg}");
    assert_eq!(
        registry.ids(&subject).await.len(),
        1,
        "nothing was registered"
    );
}

/// The record of `fields` without the fields `v1` does not have.
fn v1_fields(event: &EnrichedEvent) -> Vec<(String, apache_avro::types::Value)> {
    let apache_avro::types::Value::Record(fields) = apache_avro::to_value(event).unwrap() else {
        panic!("a record");
    };
    fields
        .into_iter()
        .filter(|(k, _)| !k.starts_with("tenant_"))
        .collect()
}

/// Schema evolution through the registry. The released v1 of EnrichedEvent is registered
/// first (by an older enrich); today's v2 adds optional fields and is accepted beside it
/// under BACKWARD. Today's reader decodes v1 records (the new fields at their defaults),
/// v2 records and the embedded encoding (a topic switching modes); a consumer still on v1
/// reads v2 records through the writer schema it fetches by id. An unreachable registry
/// is a transient error (retried), not a bad record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evolution_is_read_by_old_and_new_consumers() {
    let registry = StackRegistry::new();
    let config = setup(registry.url()).await;
    let subject = format!("{}-value", config.topics.enriched);
    let v1_text = include_str!("../../schemas/avro/released/enriched_event/v1.avsc");
    let v1_id = registry.register(&subject, v1_text).await;
    let writer: std::sync::Arc<Codec<EnrichedEvent>> =
        writing_codec(&config.schemas, &config.topics.enriched)
            .await
            .unwrap();
    let v2_id = writer.schema_id().unwrap();
    assert_ne!(v1_id, v2_id);
    assert_eq!(registry.ids(&subject).await, vec![v1_id, v2_id]);

    let mut event = sluice_tests::enriched(1, "acme", "u1", "click", "/a", "2026-11-23T10:00:00Z");
    event.browser = Some("Firefox".into());
    // Written by the older enrich: the v1 fields only.
    let v1 = Schema::parse_str(v1_text).unwrap();
    let datum = GenericDatumWriter::builder(&v1)
        .build()
        .unwrap()
        .write_value_to_vec(apache_avro::types::Value::Record(v1_fields(&event)))
        .unwrap();

    let reader: std::sync::Arc<Codec<EnrichedEvent>> = reading_codec(&config.schemas).unwrap();
    assert_eq!(reader.decode(&frame(v1_id, &datum)).unwrap(), event);
    event.tenant_name = Some("Acme Inc.".into());
    let current = writer.encode(&event).unwrap();
    assert_eq!(&current[..5], &frame(v2_id, &[])[..]);
    assert_eq!(reader.decode(&current).unwrap(), event);
    let embedded = sluice_schemas::ENRICHED_EVENTS.encode(&event).unwrap();
    assert_eq!(reader.decode(&embedded).unwrap(), event);

    // A consumer built with v1 reads the v2 record: the writer schema comes from the
    // registry by the record's id, and resolution drops the fields v1 does not know.
    let fetched = schema_registry(&config.schemas)
        .unwrap()
        .schema(v2_id)
        .unwrap();
    let old_view = apache_avro::reader::datum::GenericDatumReader::builder(&fetched)
        .reader_schema(&v1)
        .build()
        .unwrap()
        .read_value(&mut &current[5..])
        .unwrap();
    let expected = apache_avro::types::Value::Record(v1_fields(&event))
        .resolve(&v1)
        .unwrap();
    assert_eq!(old_view, expected);

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

/// Records naming a schema id the registry does not have ask it once per id, not once
/// per record (a producer writing made-up ids turned every record into a registry
/// request); each still fails with the registry's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_schema_id_is_asked_for_once() {
    let registry = StackRegistry::new();
    let (relay, url) = relayed(&registry).await;
    let mut config = stack_config();
    config.schemas.mode = SchemaMode::Registry;
    config.schemas.registry_url = url;
    let codec = sluice_schemas::setup::reading_codec::<EnrichedEvent>(&config.schemas).unwrap();
    let before = relay.connections();
    for round in 0..200 {
        let id = 900_000 + round % 2;
        let err = codec
            .decode(&frame(id, &[2, 4, 6]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("schema id {id} is not in the registry")),
            "{err}"
        );
    }
    assert_eq!(relay.connections() - before, 2, "one lookup per unknown id");
}
