//! How long the parse and enrich transforms take per record, without Kafka; enrich looks
//! IPs up in the geo table given as the argument, if any. Parse is timed twice: its JSON
//! step alone, and its whole `Transform::process` (the raw record's headers read, the
//! outputs' headers and key built, the Avro encoding) on in-memory messages.
#![allow(clippy::unwrap_used)] // fixed, valid input
use std::time::Instant;

use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

use sluice_schemas::{CLICK_EVENTS, ENRICHED_EVENTS};
use sluice_stages::enrich::{Enricher, IpTable};
use sluice_stages::parse::{Parser, RawMeta};
use sluice_stages::Transform;

/// When every record was received (Unix ms): after every event time, as ingest stamps it.
const RECEIVED_AT_MS: i64 = 1_795_428_060_000;

fn main() {
    let n = 50_000;
    let lines: Vec<String> = (0..n).map(|i| format!(r#"{{"user_id":"u{}","type":"page_view","ts":{},"url":"/p/{}","user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36","ip":"10.1.2.{}"}}"#, i % 5000, 1_795_428_000_000u64 + i as u64, i % 40, i % 250)).collect();
    let p = Parser::default();
    let t = Instant::now();
    let events: Vec<_> = lines
        .iter()
        .map(|l| {
            p.parse(
                l.as_bytes(),
                RawMeta {
                    tenant: Some("acme"),
                    event_id: "e",
                    received_at: RECEIVED_AT_MS,
                    source: None,
                },
            )
            .unwrap()
        })
        .collect();
    println!(
        "parse JSON      {:>8.2} µs/record",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    // The raw records as the stages bench writes them: the line, plus the three headers
    // parse reads (ingest adds three more it forwards: source, content type, ingest id).
    let received = RECEIVED_AT_MS.to_string();
    let messages: Vec<OwnedMessage> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let id = format!("ev-{i}");
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: sluice_core::headers::TENANT,
                    value: Some("acme"),
                })
                .insert(Header {
                    key: sluice_core::headers::EVENT_ID,
                    value: Some(id.as_str()),
                })
                .insert(Header {
                    key: sluice_core::headers::RECEIVED_AT_MS,
                    value: Some(received.as_str()),
                });
            OwnedMessage::new(
                Some(l.clone().into_bytes()),
                Some(id.into_bytes()),
                "raw".into(),
                Timestamp::NotAvailable,
                0,
                i as i64,
                Some(headers),
            )
        })
        .collect();
    let t = Instant::now();
    let outputs: Vec<_> = messages.iter().map(|m| p.process(m).unwrap()).collect();
    println!(
        "parse process   {:>8.2} µs/record ({} outputs)",
        t.elapsed().as_secs_f64() * 1e6 / n as f64,
        outputs.len()
    );
    drop(outputs);
    let t = Instant::now();
    let encoded: Vec<_> = events
        .iter()
        .map(|e| CLICK_EVENTS.encode(e).unwrap())
        .collect();
    println!(
        "avro encode     {:>8.2} µs/record",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let t = Instant::now();
    let decoded: Vec<_> = encoded
        .iter()
        .map(|b| CLICK_EVENTS.decode(b).unwrap())
        .collect();
    println!(
        "avro decode     {:>8.2} µs/record",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    // A geo table to look the IPs up in, if one is given (`transform_cost <table.csv>`).
    let ips = std::env::args()
        .nth(1)
        .map(|path| IpTable::load(std::path::Path::new(&path)).unwrap())
        .unwrap_or_default();
    let en = Enricher::new(ips);
    let t = Instant::now();
    let enriched: Vec<_> = decoded.into_iter().map(|e| en.enrich(e)).collect();
    println!(
        "enrich          {:>8.2} µs/record",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let t = Instant::now();
    let out: Vec<_> = enriched
        .iter()
        .map(|e| ENRICHED_EVENTS.encode(e).unwrap())
        .collect();
    println!(
        "avro encode (e) {:>8.2} µs/record ({} bytes)",
        t.elapsed().as_secs_f64() * 1e6 / n as f64,
        out[0].len()
    );
}
