//! Property tests of the places bytes come in besides HTTP (no servers needed): Avro
//! decoding of arbitrary bytes and of records whose length prefixes lie, the IP table
//! CSV, and configuration values from the environment. Each input gives a value or a
//! clear error: never a panic, never an allocation the input asked for.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use proptest::prelude::*;
use sluice::Config;
use sluice_schemas::{ClickEvent, CLICK_EVENTS, ENRICHED_EVENTS, SESSION_SUMMARIES};

/// Avro's zig-zag varint of `n`.
fn varint(n: i64) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// The single-object header of ClickEvent: marker and schema fingerprint.
fn click_header() -> Vec<u8> {
    let bytes = CLICK_EVENTS
        .encode(&ClickEvent {
            event_id: "e".into(),
            ..ClickEvent::default()
        })
        .unwrap();
    bytes[..10].to_vec()
}

#[test]
fn a_length_prefix_claiming_hundreds_of_megabytes_is_refused_unallocated() {
    for claim in [400_000_000i64, 100_000_000, 1 << 40] {
        let mut record = click_header();
        record.extend(varint(claim));
        record.extend(b"only a few bytes follow");
        let e = CLICK_EVENTS.decode(&record).unwrap_err().to_string();
        assert!(
            e.to_lowercase().contains("allocat"),
            "claim {claim}: refused before allocating, not on reading past the end: {e}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = CLICK_EVENTS.decode(&bytes);
        let _ = ENRICHED_EVENTS.decode(&bytes);
        let _ = SESSION_SUMMARIES.decode(&bytes);
    }

    #[test]
    fn a_valid_header_with_an_arbitrary_datum_fails_cleanly(
        datum in prop::collection::vec(any::<u8>(), 0..128),
        claims in prop::collection::vec(any::<i64>(), 0..4),
    ) {
        let mut record = click_header();
        for c in claims {
            record.extend(varint(c));
        }
        record.extend(datum);
        let _ = CLICK_EVENTS.decode(&record);
    }

    #[test]
    fn a_registry_frame_with_any_id_fails_cleanly_in_embedded_mode(
        id in any::<u32>(),
        datum in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut record = vec![0u8];
        record.extend(id.to_be_bytes());
        record.extend(datum);
        prop_assert!(CLICK_EVENTS.decode(&record).is_err());
    }

    #[test]
    fn any_ip_table_loads_or_names_the_bad_line(text in "(([0-9a-f:./]{0,20}|[ -~]{0,20}),[ -~]{0,10},[ -~]{0,4}\n){0,20}") {
        let dir = std::env::temp_dir().join(format!("sluice-fuzz-ip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.csv");
        std::fs::write(&file, format!("cidr,network,country\n{text}")).unwrap();
        match sluice_stages::enrich::IpTable::load(&file) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn any_environment_value_loads_or_names_the_key(
        key in prop_oneof![
            Just("SLUICE__TOPICS__PARTITIONS"),
            Just("SLUICE__INGEST__API_KEYS"),
            Just("SLUICE__KAFKA__CONSUMER"),
            Just("SLUICE__KAFKA__SECURITY__PROTOCOL"),
            Just("SLUICE__PARSE__TIME_FIELDS"),
            Just("SLUICE__TIMESCALE__MODE"),
            Just("SLUICE__METRICS__LISTEN"),
            Just("SLUICE__NOPE__X"),
            Just("SLUICE__TOPICS"),
        ],
        value in prop_oneof!["[ -~]{0,40}", "\\PC{0,10}", Just("[{tenant=\"a\",key=\"\"}]".to_string())],
    ) {
        match Config::load_with(None, [(key.to_string(), value.clone())]) {
            Ok(_) => {}
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!text.is_empty());
            }
        }
    }
}

/// Header keys a record may carry: Sluice's own, the dead-letter ones, and others.
fn header_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(sluice_core::headers::TENANT.to_string()),
        Just(sluice_core::headers::EVENT_ID.to_string()),
        Just(sluice_core::headers::DLQ_REASON.to_string()),
        Just(sluice_core::headers::DLQ_TOPIC.to_string()),
        Just(sluice_core::headers::DLQ_ATTEMPTS.to_string()),
        Just(sluice_core::headers::PROCESSED_AT_MS.to_string()),
        "x-[a-z]{1,8}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    /// A dead letter re-driven (read again as a stage's input) forwards the original's
    /// headers, none of the dead-letter ones; failing again, it carries one set of
    /// dead-letter headers, not two; and one too large becomes a stub that fits.
    #[test]
    fn dead_letters_re_drive_cleanly(
        headers in prop::collection::vec((header_key(), prop::option::of(prop::collection::vec(any::<u8>(), 0..64))), 0..12),
        payload in prop::collection::vec(any::<u8>(), 0..2048),
        max in 256usize..4096,
    ) {
        use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage, Timestamp};
        use sluice_core::failure::{DeadLetter, Failure};
        use sluice_core::headers as h;
        let mut original = OwnedHeaders::new();
        for (k, v) in &headers {
            original = original.insert(Header { key: k.as_str(), value: v.as_deref() });
        }
        let msg = OwnedMessage::new(
            Some(payload.clone()), Some(b"k".to_vec()), "t.raw".into(),
            Timestamp::CreateTime(1), 0, 7, Some(original.clone()),
        );
        let failure = Failure::new("validation", "bad");
        let dl = DeadLetter::of(&msg, "parse", &failure, 1);
        prop_assert_eq!(&dl.payload, &payload);
        let redriven = OwnedMessage::new(
            Some(dl.payload.clone()), dl.key.clone(), "t.raw.dlq".into(),
            Timestamp::CreateTime(2), 0, 0, Some(dl.headers.clone()),
        );
        let forwarded = h::forward(redriven.headers(), &[]);
        for header in forwarded.iter() {
            prop_assert!(!h::DEAD_LETTER.contains(&header.key), "{} forwarded", header.key);
        }
        let kept = |k: &str| !h::DEAD_LETTER.contains(&k) && !h::STAGE_STAMPS.contains(&k);
        prop_assert_eq!(
            forwarded.count(),
            headers.iter().filter(|(k, _)| kept(k)).count()
        );
        let again = DeadLetter::of(&redriven, "parse", &failure, 2);
        prop_assert_eq!(
            again.headers.iter().filter(|x| x.key == h::DLQ_REASON).count(),
            1
        );
        let fitted = DeadLetter::of(&msg, "parse", &failure, 1).fit(max + 8 * 1024);
        prop_assert!(fitted.size() <= max + 8 * 1024);
    }

    #[test]
    fn any_config_file_loads_or_names_the_problem(text in "([a-z_\\[\\]=\" .0-9\n]{0,200})") {
        let dir = std::env::temp_dir().join(format!("sluice-fuzz-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, &text).unwrap();
        if let Err(e) = Config::load_with(Some(&file), Vec::<(String, String)>::new()) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
