//! Where archived records go: Hive-style folders by tenant and ingest date and hour
//! (UTC), files named by the topic, partition and offset range they hold, and a manifest
//! per file set under `_segments/`.
//!
//! `<prefix>/tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>/<topic>+<partition>+<first>-<last>.parquet`

use chrono::{DateTime, Timelike};
use object_store::path::Path;
use serde::{Deserialize, Serialize};

/// A Hive partition of the archive: one tenant's records of one hour of ingest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Folder {
    /// Tenant.
    pub tenant: String,
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    /// Hour of the day, UTC.
    pub hour: u32,
}

impl Folder {
    /// The folder of a record of `tenant` received at `received_at` (Unix ms).
    pub fn of(tenant: &str, received_at: i64) -> Self {
        let t = DateTime::from_timestamp_millis(received_at).unwrap_or_default();
        Self {
            tenant: tenant.to_string(),
            date: t.format("%Y-%m-%d").to_string(),
            hour: t.hour(),
        }
    }

    /// Its path under `prefix`.
    pub fn path(&self, prefix: &Path) -> Path {
        prefix
            .child(format!("tenant={}", self.tenant))
            .child(format!("date={}", self.date))
            .child(format!("hour={:02}", self.hour))
    }
}

/// The offsets of one partition that one set of files holds: `[first, last]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// Partition.
    pub partition: i32,
    /// First offset.
    pub first: i64,
    /// Last offset, included.
    pub last: i64,
}

/// The file name of the records of `topic` in `span`.
pub fn file_name(topic: &str, span: Span) -> String {
    format!(
        "{topic}+{}+{}-{}.parquet",
        span.partition, span.first, span.last
    )
}

/// The topic and span of a file name made by [`file_name`] (Kafka topic names hold no
/// `+`).
pub fn parse_file_name(name: &str) -> Option<(&str, Span)> {
    let stem = name.strip_suffix(".parquet")?;
    let (rest, range) = stem.rsplit_once('+')?;
    let (topic, partition) = rest.rsplit_once('+')?;
    let (first, last) = range.split_once('-')?;
    Some((
        topic,
        Span {
            partition: partition.parse().ok()?,
            first: first.parse().ok()?,
            last: last.parse().ok()?,
        },
    ))
}

/// What one written span holds: written before its files, so that whoever writes the
/// span again (after a crash, or on the partition's next owner) ends it at the same
/// offset and so writes the same files under the same names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Topic.
    pub topic: String,
    /// The span.
    pub span: Span,
    /// Records in it.
    pub records: u64,
    /// Its files, relative to the archive's prefix.
    pub files: Vec<String>,
}

/// Where the manifest of the span of `topic` starting at `first` on `partition` is.
pub fn manifest_path(prefix: &Path, topic: &str, partition: i32, first: i64) -> Path {
    prefix
        .child("_segments")
        .child(format!("{topic}+{partition}+{first}.json"))
}

/// The value of a `key=value` folder name, if it is one for `key`.
pub fn folder_value<'a>(name: &'a str, key: &str) -> Option<&'a str> {
    name.strip_prefix(key)?.strip_prefix('=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_by_tenant_and_hour_of_ingest() {
        let f = Folder::of("acme", 1_795_428_000_000 + 3 * 3_600_000);
        let p = f.path(&Path::from("archive"));
        assert_eq!(p.as_ref(), "archive/tenant=acme/date=2026-11-23/hour=13");
        // A tenant name cannot escape its folder.
        let odd = Folder::of("a/b", 0).path(&Path::from("x"));
        assert_eq!(odd.parts().count(), 4, "{odd}");
    }

    #[test]
    fn file_names_round_trip() {
        let span = Span {
            partition: 3,
            first: 100,
            last: 199,
        };
        let name = file_name("sluice.raw-events", span);
        assert_eq!(name, "sluice.raw-events+3+100-199.parquet");
        assert_eq!(parse_file_name(&name), Some(("sluice.raw-events", span)));
        for bad in [
            "x.parquet",
            "t+1+2.parquet",
            "t+a+1-2.parquet",
            "t+1+1-2.json",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn folder_values() {
        assert_eq!(folder_value("tenant=acme", "tenant"), Some("acme"));
        assert_eq!(folder_value("date=2026-11-24", "tenant"), None);
    }
}
