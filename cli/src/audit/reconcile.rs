//! Comparing the layers of each cell: what is missing, extra, duplicated or stale, and
//! what was written more than once.

use std::collections::{BTreeMap, HashMap, HashSet};

use sluice_schemas::fields::differences;
use sluice_schemas::EnrichedEvent;
use sluice_sinks::Stored;

use super::report::{Finding, Report, Row};
use super::AuditedSink;

/// The cells, by tenant and bucket.
pub(crate) type Cells = BTreeMap<(String, i64), Cell>;

/// One sink's view of one cell.
#[derive(Debug, Default)]
pub(crate) struct SinkCell {
    pub(crate) dlq: HashSet<String>,
    pub(crate) pending: HashSet<String>,
    /// What the sink holds, by event id (two entries: a duplicate).
    pub(crate) stored: HashMap<String, Vec<Stored>>,
}

/// The newest record of an enriched event.
#[derive(Debug, Clone)]
pub(crate) struct Latest {
    pub(crate) version: i64,
    /// Its bytes, when values are compared.
    pub(crate) payload: Option<Vec<u8>>,
}

/// Event ids seen in each layer for one tenant and bucket.
#[derive(Debug, Default)]
pub(crate) struct Cell {
    pub(crate) raw: HashSet<String>,
    /// Raw ids that reached the parsed topic.
    pub(crate) parsed_raw: HashSet<String>,
    pub(crate) parse_dlq: HashSet<String>,
    pub(crate) parse_pending: HashSet<String>,
    /// Event ids on the parsed topic.
    pub(crate) parsed: HashSet<String>,
    pub(crate) enriched: HashSet<String>,
    pub(crate) enrich_dlq: HashSet<String>,
    pub(crate) enrich_pending: HashSet<String>,
    pub(crate) latest: HashMap<String, Latest>,
    pub(crate) sinks: Vec<SinkCell>,
    /// Records per raw id outside replays, by topic layer.
    pub(crate) writes: BTreeMap<&'static str, HashMap<String, u32>>,
    /// Copies of each raw event in the archive, by raw id.
    pub(crate) archive: HashMap<String, u32>,
    /// Raw ids the archive group has yet to commit.
    pub(crate) archive_pending: HashSet<String>,
    /// Archived raw ids Kafka no longer retains (below the raw topic's start).
    pub(crate) archive_only: HashSet<String>,
}

impl Cell {
    pub(crate) fn sink(&mut self, i: usize) -> &mut SinkCell {
        if self.sinks.len() <= i {
            self.sinks.resize_with(i + 1, SinkCell::default);
        }
        &mut self.sinks[i]
    }
}

/// Compare the layers of every cell. With `codec`, stored values are compared with the
/// enriched topic's newest record of each event. With `archived`, the archive too: each
/// raw event in it once.
pub(crate) fn reconcile(
    cells: &Cells,
    sinks: &[AuditedSink],
    codec: Option<&sluice_schemas::Codec<EnrichedEvent>>,
    archived: bool,
) -> Report {
    let mut report = Report {
        sinks: sinks.iter().map(|s| s.name).collect(),
        archive: archived,
        ..Report::default()
    };
    let empty = SinkCell::default();
    for ((tenant, bucket), c) in cells {
        let mut finding = |layer: &'static str, kind: &'static str, mut examples: Vec<String>| {
            if !examples.is_empty() {
                examples.sort();
                report.findings.push(Finding {
                    layer,
                    kind,
                    tenant: tenant.clone(),
                    bucket: *bucket,
                    count: examples.len() as u64,
                    example: examples.into_iter().next(),
                });
            }
        };
        let mut in_flight: HashSet<&String> = HashSet::new();
        // parse: every raw event is parsed, dead-lettered or not yet consumed.
        let mut missing = Vec::new();
        for id in &c.raw {
            if c.parsed_raw.contains(id) || c.parse_dlq.contains(id) {
                continue;
            }
            if c.parse_pending.contains(id) {
                in_flight.insert(id);
            } else {
                missing.push(id.clone());
            }
        }
        finding("parse", "missing", missing);
        // enrich: every parsed event is enriched, dead-lettered or not yet consumed.
        let mut missing = Vec::new();
        for id in &c.parsed {
            if c.enriched.contains(id) || c.enrich_dlq.contains(id) {
                continue;
            }
            if c.enrich_pending.contains(id) {
                in_flight.insert(id);
            } else {
                missing.push(id.clone());
            }
        }
        finding("enrich", "missing", missing);
        // Each sink: exactly the enriched events it did not dead-letter, each once, at the
        // newest version (and values) the enriched topic has.
        let mut counts = Vec::new();
        let mut sink_dlq = 0;
        for (i, sink) in sinks.iter().enumerate() {
            let s = c.sinks.get(i).unwrap_or(&empty);
            sink_dlq += s.dlq.len();
            let mut missing = Vec::new();
            for id in &c.enriched {
                if s.stored.contains_key(id) || s.dlq.contains(id) {
                    continue;
                }
                if s.pending.contains(id) {
                    in_flight.insert(id);
                } else {
                    missing.push(id.clone());
                }
            }
            finding(sink.name, "missing", missing);
            let duplicated = s
                .stored
                .iter()
                .filter(|(_, v)| v.len() > 1)
                .map(|(id, _)| id.clone())
                .collect();
            finding(sink.name, "duplicated", duplicated);
            let extra = s
                .stored
                .keys()
                .filter(|id| !c.enriched.contains(*id))
                .cloned()
                .collect();
            finding(sink.name, "extra", extra);
            let mut stale = Vec::new();
            for (id, versions) in &s.stored {
                let (Some(latest), Some(stored)) = (c.latest.get(id), versions.first()) else {
                    continue;
                };
                if s.pending.contains(id) {
                    continue; // its newest record is still on its way
                }
                // 0: written before versions were stored; only values can tell.
                if stored.version != 0 && stored.version < latest.version {
                    stale.push(format!(
                        "{id}: version {} < {}",
                        stored.version, latest.version
                    ));
                    continue;
                }
                let (Some(codec), Some(bytes), Some(held)) =
                    (codec, &latest.payload, &stored.event)
                else {
                    continue;
                };
                let Ok(newest) = codec.decode(bytes) else {
                    continue;
                };
                if let Some((field, want, got)) = differences(&newest, held).into_iter().next() {
                    let v = |x: Option<String>| x.unwrap_or_else(|| "null".into());
                    stale.push(format!("{id}: {field} {} ≠ {}", v(got), v(want)));
                }
            }
            finding(sink.name, "stale", stale);
            counts.push((sink.name, s.stored.len()));
        }
        if archived {
            // The archive: every raw event once (or not yet committed by its group);
            // nothing else but what Kafka no longer retains.
            let mut missing = Vec::new();
            for id in &c.raw {
                if c.archive.contains_key(id) {
                    continue;
                }
                if c.archive_pending.contains(id) {
                    in_flight.insert(id);
                } else {
                    missing.push(id.clone());
                }
            }
            finding("archive", "missing", missing);
            let duplicated = c
                .archive
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, n)| format!("{id} ×{n}"))
                .collect();
            finding("archive", "duplicated", duplicated);
            let extra = c
                .archive
                .keys()
                .filter(|id| !c.raw.contains(*id) && !c.archive_only.contains(*id))
                .cloned()
                .collect();
            finding("archive", "extra", extra);
        }
        let mut repeated = 0;
        for (layer, writes) in &c.writes {
            let ids: Vec<String> = writes
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, n)| format!("{id} ×{n}"))
                .collect();
            repeated += ids.len();
            finding(layer, "repeated", ids);
        }
        report.rows.push(Row {
            tenant: tenant.clone(),
            bucket: *bucket,
            raw: c.raw.len(),
            parsed: c.raw.iter().filter(|id| c.parsed_raw.contains(*id)).count(),
            parse_dlq: c.parse_dlq.len(),
            enriched: c.enriched.len(),
            enrich_dlq: c.enrich_dlq.len(),
            sink_dlq,
            sinks: counts,
            archive: c.archive.len(),
            in_flight: in_flight.len(),
            repeated,
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn stored(id: &str, version: i64) -> Stored {
        Stored {
            tenant: "acme".into(),
            event_id: id.into(),
            received_at: 0,
            version,
            event: None,
        }
    }

    fn sinks() -> Vec<AuditedSink> {
        ["timescale", "elasticsearch"]
            .map(|name| AuditedSink {
                name,
                group: String::new(),
                read: |_, _, _| Box::pin(async { Ok(Vec::new()) }),
            })
            .to_vec()
    }

    #[test]
    fn accounted_and_unaccounted() {
        let mut cells = Cells::new();
        let c = cells.entry(("acme".into(), 0)).or_default();
        c.raw = ids(&["r1", "r2", "r3", "r4"]);
        c.parsed_raw = ids(&["r1", "r2"]);
        c.parse_dlq = ids(&["r3"]);
        c.parsed = ids(&["e1", "e2"]);
        c.enriched = ids(&["e1", "e2"]);
        for id in ["e1", "e2"] {
            c.latest.insert(
                id.into(),
                Latest {
                    version: 5,
                    payload: None,
                },
            );
        }
        c.sink(0).stored = HashMap::from([
            ("e1".to_string(), vec![stored("e1", 5)]),
            ("e2".to_string(), vec![stored("e2", 5), stored("e2", 5)]),
        ]);
        // Elasticsearch: e1 at an old version, e2 in flight, and a document no topic has.
        c.sink(1).stored = HashMap::from([
            ("e1".to_string(), vec![stored("e1", 3)]),
            ("zz".to_string(), vec![stored("zz", 5)]),
        ]);
        c.sink(1).pending = ids(&["e2"]);
        c.writes
            .insert("parsed", HashMap::from([("r1".to_string(), 2)]));
        let report = reconcile(&cells, &sinks(), None, false);
        assert_eq!(
            report.count("parse", "missing"),
            1,
            "r4 is neither parsed nor dead-lettered"
        );
        assert_eq!(report.count("timescale", "duplicated"), 1);
        assert_eq!(
            report.count("elasticsearch", "missing"),
            0,
            "e2 is in flight"
        );
        assert_eq!(
            report.count("elasticsearch", "extra"),
            1,
            "a missing and an extra do not cancel out"
        );
        assert_eq!(report.count("elasticsearch", "stale"), 1);
        assert_eq!(report.count("parsed", "repeated"), 1);
        assert_eq!(report.rows[0].in_flight, 1);
        assert_eq!(report.rows[0].repeated, 1);
        assert!(!report.ok());
        let text = report.render();
        assert!(
            text.contains("STALE elasticsearch: 1 event(s)") && text.contains("e1: version 3 < 5"),
            "{text}"
        );
        assert!(text.contains("[warning]"), "{text}");
    }

    #[test]
    fn values_are_compared_field_by_field() {
        let codec = sluice_schemas::ENRICHED_EVENTS.clone();
        let mut newest = EnrichedEvent {
            event_id: "e1".into(),
            tenant: "acme".into(),
            ..Default::default()
        };
        newest.country = Some("DE".into());
        let mut held = newest.clone();
        held.country = Some("XX".into());
        let mut cells = Cells::new();
        let c = cells.entry(("acme".into(), 0)).or_default();
        c.enriched = ids(&["e1"]);
        c.latest.insert(
            "e1".into(),
            Latest {
                version: 5,
                payload: Some(codec.encode(&newest).unwrap()),
            },
        );
        let mut s = stored("e1", 5);
        s.event = Some(held);
        c.sink(0).stored = HashMap::from([("e1".to_string(), vec![s.clone()])]);
        s.event = Some(newest);
        c.sink(1).stored = HashMap::from([("e1".to_string(), vec![s])]);
        let report = reconcile(&cells, &sinks(), Some(&codec), false);
        assert_eq!(report.count("timescale", "stale"), 1);
        assert_eq!(report.count("elasticsearch", "stale"), 0);
        assert_eq!(
            report.findings[0].example.as_deref(),
            Some("e1: country XX ≠ DE")
        );
    }

    #[test]
    fn the_archive_holds_each_raw_event_once() {
        let mut cells = Cells::new();
        let c = cells.entry(("acme".into(), 0)).or_default();
        c.raw = ids(&["r1", "r2", "r3", "r4"]);
        c.parsed_raw = c.raw.clone();
        c.archive = HashMap::from([
            ("r1".to_string(), 1),
            ("r2".to_string(), 2),
            ("old".to_string(), 1),
            ("zz".to_string(), 1),
        ]);
        c.archive_pending = ids(&["r4"]);
        c.archive_only = ids(&["old"]);
        let report = reconcile(&cells, &[], None, true);
        assert_eq!(report.count("archive", "missing"), 1, "r3; r4 is in flight");
        assert_eq!(report.count("archive", "duplicated"), 1, "r2");
        assert_eq!(
            report.count("archive", "extra"),
            1,
            "zz; `old` is only beyond Kafka's retention"
        );
        assert_eq!(report.rows[0].archive, 4);
        assert!(report.render().contains("archive"), "{}", report.render());
        let without = reconcile(&cells, &[], None, false);
        assert!(without.ok(), "not audited without the archive");
    }
}
