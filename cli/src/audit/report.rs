//! The audit's result: a row per tenant and bucket, the findings, and how they print.

use chrono::DateTime;

/// One line of the audit table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    /// Tenant.
    pub tenant: String,
    /// Start of the bucket, Unix milliseconds.
    pub bucket: i64,
    /// Distinct events on the raw topic.
    pub raw: usize,
    /// Of those, how many reached the parsed topic.
    pub parsed: usize,
    /// Dead-lettered by parse.
    pub parse_dlq: usize,
    /// Distinct events on the enriched topic.
    pub enriched: usize,
    /// Dead-lettered by enrich.
    pub enrich_dlq: usize,
    /// Dead-lettered by the sinks.
    pub sink_dlq: usize,
    /// Distinct events in each audited sink, by sink name.
    pub sinks: Vec<(&'static str, usize)>,
    /// Distinct raw events in the archive (when audited).
    pub archive: usize,
    /// Events not yet processed by some layer (past a group's committed offset).
    pub in_flight: usize,
    /// Events written more than once to a topic layer outside replays.
    pub repeated: usize,
}

impl Row {
    /// Distinct events in the sink named `name`.
    pub fn sink(&self, name: &str) -> usize {
        self.sinks
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, c)| *c)
    }
}

/// A discrepancy no dead letter or in-flight record explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Layer: `parse`, `enrich`, a sink's name, `archive`, or a topic layer for repeats.
    pub layer: &'static str,
    /// `missing`, `duplicated`, `extra`, `stale` or (a warning) `repeated`.
    pub kind: &'static str,
    /// Tenant.
    pub tenant: String,
    /// Start of the bucket, Unix milliseconds.
    pub bucket: i64,
    /// How many events.
    pub count: u64,
    /// One of the events, when known, with what is wrong with it.
    pub example: Option<String>,
}

impl Finding {
    /// Whether it is only a warning (the audit still passes).
    pub fn is_warning(&self) -> bool {
        self.kind == "repeated"
    }
}

/// The result of an audit.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One row per tenant and bucket.
    pub rows: Vec<Row>,
    /// Discrepancies and warnings.
    pub findings: Vec<Finding>,
    /// The audited sinks, in column order.
    pub sinks: Vec<&'static str>,
    /// Whether the archive was audited (its column shows).
    pub archive: bool,
}

pub(crate) fn time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%MZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn sink_column(name: &str) -> &str {
    match name {
        "elasticsearch" => "es",
        other => other,
    }
}

impl Report {
    /// Whether nothing is missing, duplicated, extra or stale.
    pub fn ok(&self) -> bool {
        self.findings.iter().all(Finding::is_warning)
    }

    /// Findings of one layer and kind, summed.
    pub fn count(&self, layer: &str, kind: &str) -> u64 {
        self.findings
            .iter()
            .filter(|f| f.layer == layer && f.kind == kind)
            .map(|f| f.count)
            .sum()
    }

    /// The table and the findings, as printed.
    pub fn render(&self) -> String {
        let line = |cells: Vec<String>| -> String {
            let widths = [16, 17, 7, 7, 9, 8, 10, 8];
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let w = widths.get(i).copied().unwrap_or(9);
                if i < 2 {
                    s += &format!("{c:<w$} ");
                } else {
                    s += &format!("{c:>w$} ");
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut head: Vec<String> = [
            "tenant",
            "bucket",
            "raw",
            "parsed",
            "parse-dlq",
            "enriched",
            "enrich-dlq",
            "sink-dlq",
        ]
        .map(String::from)
        .to_vec();
        head.extend(self.sinks.iter().map(|s| sink_column(s).to_string()));
        if self.archive {
            head.push("archive".into());
        }
        head.extend(["in-flight".to_string(), "repeated".to_string()]);
        let mut s = line(head);
        let mut total = Row {
            tenant: "total".into(),
            sinks: self.sinks.iter().map(|n| (*n, 0)).collect(),
            ..Row::default()
        };
        let cells = |r: &Row, bucket: String| -> Vec<String> {
            let mut v = vec![
                r.tenant.clone(),
                bucket,
                r.raw.to_string(),
                r.parsed.to_string(),
                r.parse_dlq.to_string(),
                r.enriched.to_string(),
                r.enrich_dlq.to_string(),
                r.sink_dlq.to_string(),
            ];
            v.extend(self.sinks.iter().map(|n| r.sink(n).to_string()));
            if self.archive {
                v.push(r.archive.to_string());
            }
            v.extend([r.in_flight.to_string(), r.repeated.to_string()]);
            v
        };
        for r in &self.rows {
            s += &line(cells(r, time(r.bucket)));
            total.raw += r.raw;
            total.parsed += r.parsed;
            total.parse_dlq += r.parse_dlq;
            total.enriched += r.enriched;
            total.enrich_dlq += r.enrich_dlq;
            total.sink_dlq += r.sink_dlq;
            for (name, n) in &mut total.sinks {
                *n += r.sink(name);
            }
            total.archive += r.archive;
            total.in_flight += r.in_flight;
            total.repeated += r.repeated;
        }
        s += &line(cells(&total, String::new()));
        for f in &self.findings {
            s += &format!(
                "{} {}: {} event(s) {} for tenant {} in bucket {}{}{}\n",
                f.kind.to_uppercase(),
                f.layer,
                f.count,
                match f.kind {
                    "stale" => "hold an older processing than the enriched topic's newest record",
                    "repeated" => "written more than once outside replays (at-least-once redelivery; the sinks keep one)",
                    other => other,
                },
                f.tenant,
                time(f.bucket),
                f.example
                    .as_ref()
                    .map(|e| format!(" (e.g. {e})"))
                    .unwrap_or_default(),
                if f.is_warning() { " [warning]" } else { "" },
            );
        }
        let failing = self.findings.iter().filter(|f| !f.is_warning()).count();
        s += &if failing == 0 {
            "audit: every event is accounted for\n".to_string()
        } else {
            format!("audit: {failing} finding(s)\n")
        };
        s
    }
}
