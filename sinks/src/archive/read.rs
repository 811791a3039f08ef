//! Reading the archive back: the files of a topic over a time range (and a tenant), and
//! their records, for `sluice replay --source archive|auto` and `sluice audit`.

use std::collections::HashSet;

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};
use futures::TryStreamExt;
use object_store::path::Path;

use super::layout::{folder_value, parse_file_name, Folder, Span};
use super::record::{decode, ArchivedRecord};
use super::store::Archive;
use super::ArchiveError;

/// Which archived records to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveRange {
    /// The archived topic.
    pub topic: String,
    /// First time included (Kafka timestamp, Unix ms); none: the oldest.
    pub from: Option<i64>,
    /// First time excluded; none: the newest.
    pub to: Option<i64>,
    /// Only this tenant.
    pub tenant: Option<String>,
}

const HOUR_MS: i64 = 3_600_000;

impl ArchiveRange {
    /// Whether a record falls in the range (by its Kafka timestamp, else its ingest time).
    pub fn contains(&self, r: &ArchivedRecord) -> bool {
        let at = r.timestamp.unwrap_or(r.received_at);
        self.from.is_none_or(|f| at >= f)
            && self.to.is_none_or(|t| at < t)
            && self.tenant.as_deref().is_none_or(|t| t == r.tenant)
            && r.topic == self.topic
    }

    /// Whether the hour folder starting at `start` (Unix ms) may hold records of the
    /// range: folders are by ingest time, which is within moments of the Kafka
    /// timestamp, so an hour's margin on each side is plenty.
    fn may_hold(&self, start: i64) -> bool {
        self.from.is_none_or(|f| start + HOUR_MS > f - HOUR_MS)
            && self.to.is_none_or(|t| start < t + HOUR_MS)
    }
}

/// One archived file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedFile {
    /// Its path in the store.
    pub path: Path,
    /// Its folder.
    pub folder: Folder,
    /// The offsets it covers.
    pub span: Span,
    /// Its size in bytes.
    pub size: u64,
}

async fn subfolders(archive: &Archive, at: &Path, key: &str) -> Result<Vec<String>, ArchiveError> {
    let listing = archive.store.list_with_delimiter(Some(at)).await?;
    Ok(listing
        .common_prefixes
        .iter()
        .filter_map(|p| {
            p.filename()
                .and_then(|n| folder_value(n, key))
                .map(str::to_string)
        })
        .collect())
}

/// The files of the range's topic in the folders the range may touch, ordered by
/// partition and offset.
pub async fn list_files(
    archive: &Archive,
    range: &ArchiveRange,
) -> Result<Vec<ArchivedFile>, ArchiveError> {
    let tenants = match &range.tenant {
        Some(t) => vec![t.clone()],
        None => subfolders(archive, &archive.prefix, "tenant").await?,
    };
    let mut files = Vec::new();
    for tenant in tenants {
        let tenant_path = archive.prefix.child(format!("tenant={tenant}"));
        for date in subfolders(archive, &tenant_path, "date").await? {
            let Ok(day) = NaiveDate::parse_from_str(&date, "%Y-%m-%d") else {
                continue;
            };
            let day_start = NaiveDateTime::new(day, NaiveTime::MIN)
                .and_utc()
                .timestamp_millis();
            if !(0..24).any(|h| range.may_hold(day_start + h * HOUR_MS)) {
                continue;
            }
            let date_path = tenant_path.child(format!("date={date}"));
            for hour in subfolders(archive, &date_path, "hour").await? {
                let Ok(h) = hour.parse::<u32>() else {
                    continue;
                };
                if !range.may_hold(day_start + i64::from(h) * HOUR_MS) {
                    continue;
                }
                let folder = Folder {
                    tenant: tenant.clone(),
                    date: date.clone(),
                    hour: h,
                };
                let dir = date_path.child(format!("hour={hour}"));
                let objects: Vec<_> = archive.store.list(Some(&dir)).try_collect().await?;
                for o in objects {
                    let Some(name) = o.location.filename() else {
                        continue;
                    };
                    if let Some((topic, span)) = parse_file_name(name) {
                        if topic == range.topic {
                            files.push(ArchivedFile {
                                path: o.location.clone(),
                                folder: folder.clone(),
                                span,
                                size: o.size,
                            });
                        }
                    }
                }
            }
        }
    }
    files.sort_by_key(|f| (f.span.partition, f.span.first, f.folder.clone()));
    Ok(files)
}

/// `files` grouped by the span they belong to (a span's records are split among its
/// folders' files), in partition and offset order.
pub fn spans(files: &[ArchivedFile]) -> Vec<Vec<ArchivedFile>> {
    let mut sorted = files.to_vec();
    sorted.sort_by_key(|f| (f.span.partition, f.span.first, f.span.last));
    let mut out: Vec<Vec<ArchivedFile>> = Vec::new();
    for f in sorted {
        match out.last_mut() {
            Some(group) if group[0].span == f.span => group.push(f),
            _ => out.push(vec![f]),
        }
    }
    out
}

/// The records of one span's files that fall in `range` and that `keep` keeps, each once,
/// in offset order: what a replay puts back, one span at a time, so that memory holds
/// one span, not the range.
pub async fn read_span(
    archive: &Archive,
    span: &[ArchivedFile],
    range: &ArchiveRange,
    keep: impl Fn(&ArchivedRecord) -> bool,
) -> Result<Vec<ArchivedRecord>, ArchiveError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for f in span {
        let bytes = archive.store.get(&f.path).await?.bytes().await?;
        let records =
            decode(bytes).map_err(|e| ArchiveError::Format(format!("{}: {e}", f.path)))?;
        for r in records {
            if range.contains(&r) && keep(&r) && seen.insert((r.partition, r.offset)) {
                out.push(r);
            }
        }
    }
    out.sort_by_key(|r| r.offset);
    Ok(out)
}

/// The records of `files` that fall in `range` and that `keep` keeps, each once, ordered
/// by partition and offset (all in memory: for small ranges).
pub async fn read_records(
    archive: &Archive,
    files: &[ArchivedFile],
    range: &ArchiveRange,
    keep: impl Fn(&ArchivedRecord) -> bool,
) -> Result<Vec<ArchivedRecord>, ArchiveError> {
    let mut out = Vec::new();
    for span in spans(files) {
        out.extend(read_span(archive, &span, range, &keep).await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_an_hour_either_side_may_hold_the_range() {
        let r = ArchiveRange {
            topic: "raw".into(),
            from: Some(10 * HOUR_MS),
            to: Some(12 * HOUR_MS),
            tenant: None,
        };
        assert!(!r.may_hold(8 * HOUR_MS - 1));
        assert!(r.may_hold(9 * HOUR_MS));
        assert!(r.may_hold(12 * HOUR_MS));
        assert!(!r.may_hold(13 * HOUR_MS));
        assert!(
            ArchiveRange::default().may_hold(0),
            "an open range holds everything"
        );
    }
}
