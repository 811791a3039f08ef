//! Which offsets of each partition may be committed: only those below the first record
//! still in flight, so a crash never skips a record whose outputs were not yet acked.

use std::collections::VecDeque;

/// In-flight and completed offsets of the partitions a stage consumes.
///
/// Called for every record from the stage loop and the producer's delivery thread, so
/// it is cheap: topics are few (one per stage) and found by comparing names,
/// partitions are indexed by number, and each partition keeps its records in offset
/// order in a deque (records begin in offset order and mostly complete in it too).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    topics: Vec<(String, Vec<PartitionOffsets>)>,
}

#[derive(Debug, Default)]
struct PartitionOffsets {
    /// Records begun and not yet passed by the committable position, in offset order,
    /// with whether each is done.
    records: VecDeque<(i64, bool)>,
    /// Records begun and not done.
    open: usize,
    /// Highest offset started so far.
    highest: Option<i64>,
    /// Last offset reported as committable (before any: the one below the first begun).
    reported: Option<i64>,
}

impl OffsetTracker {
    fn partition(&self, topic: &str, partition: i32) -> Option<&PartitionOffsets> {
        let (_, parts) = self.topics.iter().find(|(t, _)| t == topic)?;
        parts.get(usize::try_from(partition).ok()?)
    }

    fn partition_mut(&mut self, topic: &str, partition: i32) -> Option<&mut PartitionOffsets> {
        let (_, parts) = self.topics.iter_mut().find(|(t, _)| t == topic)?;
        parts.get_mut(usize::try_from(partition).ok()?)
    }

    /// A partition's offsets, created (with its topic) when first seen.
    fn partition_entry(&mut self, topic: &str, partition: i32) -> Option<&mut PartitionOffsets> {
        let index = usize::try_from(partition).ok()?;
        if !self.topics.iter().any(|(t, _)| t == topic) {
            self.topics.push((topic.to_string(), Vec::new()));
        }
        let (_, parts) = self.topics.iter_mut().find(|(t, _)| t == topic)?;
        if parts.len() <= index {
            parts.resize_with(index + 1, PartitionOffsets::default);
        }
        parts.get_mut(index)
    }

    /// A record started processing.
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64) {
        let Some(p) = self.partition_entry(topic, partition) else {
            return;
        };
        // Nothing below the first record seen here is ours to commit.
        p.reported.get_or_insert(offset - 1);
        match p.records.back() {
            Some(&(last, _)) if last >= offset => {
                // Out of order (not seen in practice): keep the deque sorted.
                let at = p.records.partition_point(|&(o, _)| o < offset);
                if p.records.get(at).is_some_and(|&(o, _)| o == offset) {
                    return;
                }
                p.records.insert(at, (offset, false));
            }
            _ => p.records.push_back((offset, false)),
        }
        p.open += 1;
        p.highest = Some(p.highest.map_or(offset, |h| h.max(offset)));
    }

    /// A record's outputs are all acked. Returns the offset of the last record of this
    /// partition that can now be committed, when that moved forward.
    pub fn complete(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partition_mut(topic, partition)?;
        let at = p.records.binary_search_by_key(&offset, |&(o, _)| o).ok()?;
        if std::mem::replace(&mut p.records[at].1, true) {
            return None;
        }
        p.open -= 1;
        while p.records.front().is_some_and(|&(_, done)| done) {
            p.records.pop_front();
        }
        let done_through = match p.records.front() {
            Some(&(first, _)) => first - 1,
            None => p.highest?,
        };
        if p.reported.is_some_and(|r| r >= done_through) || done_through < 0 {
            return None;
        }
        p.reported = Some(done_through);
        Some(done_through)
    }

    /// Records still in flight, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.topics
            .iter()
            .flat_map(|(_, parts)| parts.iter())
            .map(|p| p.open)
            .sum()
    }

    /// Records of one partition still in flight.
    pub fn in_flight_of(&self, topic: &str, partition: i32) -> usize {
        self.partition(topic, partition).map_or(0, |p| p.open)
    }

    /// The last offset of a partition reported as committable, if any.
    pub fn committable(&self, topic: &str, partition: i32) -> Option<i64> {
        self.partition(topic, partition)?
            .reported
            .filter(|r| *r >= 0)
    }

    /// The consumer's position in a partition is `next`: every record before it was
    /// handed to the stage. When none of them is in flight and the committable position
    /// is below `next`, the gap holds only records a `read_committed` consumer is never
    /// given (transaction markers, aborted records); returns `true` and moves the
    /// committable position to `next` (the caller stores it). Without this, a group
    /// reading a transactional topic stays a record behind per partition for good, and
    /// its lag never reaches 0.
    pub fn skip_to(&mut self, topic: &str, partition: i32, next: i64) -> bool {
        let Some(p) = self.partition_entry(topic, partition) else {
            return false;
        };
        if p.open > 0 || p.reported.is_some_and(|r| r + 1 >= next) || next <= 0 {
            return false;
        }
        p.records.clear();
        p.reported = Some(next - 1);
        p.highest = Some(p.highest.map_or(next - 1, |h| h.max(next - 1)));
        true
    }

    /// Forget a partition (after it was revoked).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        if let Some(p) = self.partition_mut(topic, partition) {
            *p = PartitionOffsets::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::OffsetTracker as Tracker;

    #[test]
    fn a_gap_after_the_last_record_is_skipped_only_when_nothing_is_in_flight() {
        let mut t = Tracker::default();
        t.begin("in", 0, 10);
        t.begin("in", 0, 11);
        // Offset 12 is a transaction marker: the consumer's position is 13.
        assert!(!t.skip_to("in", 0, 13), "records in flight");
        assert_eq!(t.complete("in", 0, 10), Some(10));
        assert!(!t.skip_to("in", 0, 13), "11 still in flight");
        assert_eq!(t.complete("in", 0, 11), Some(11));
        assert!(t.skip_to("in", 0, 13));
        assert_eq!(t.committable("in", 0), Some(12));
        assert!(!t.skip_to("in", 0, 13), "already there");
        // The next record after the gap is tracked from there.
        t.begin("in", 0, 14);
        assert_eq!(t.complete("in", 0, 14), Some(14));
        // A partition whose first records were all markers.
        assert!(t.skip_to("in", 3, 2));
        assert_eq!(t.committable("in", 3), Some(1));
    }

    use super::*;

    #[test]
    fn commits_only_contiguous_prefix() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.begin("t", 0, o);
        }
        assert_eq!(t.complete("t", 0, 12), None, "10 and 11 still in flight");
        assert_eq!(t.complete("t", 0, 10), Some(10));
        assert_eq!(t.complete("t", 0, 11), Some(12), "12 was already done");
        assert_eq!(t.complete("t", 0, 14), None);
        assert_eq!(t.complete("t", 0, 13), Some(14));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 0);
        t.begin("t", 1, 5);
        assert_eq!(t.complete("t", 1, 5), Some(5));
        assert_eq!(t.in_flight(), 1);
        t.forget("t", 0);
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.complete("t", 0, 0), None, "forgotten partition");
    }

    #[test]
    fn out_of_order_begins_and_repeated_completions() {
        let mut t = OffsetTracker::default();
        t.begin("t", 2, 7);
        t.begin("t", 2, 5);
        t.begin("t", 2, 5);
        assert_eq!(t.in_flight_of("t", 2), 2, "a repeated begin counts once");
        assert_eq!(t.complete("t", 2, 7), None, "5 still in flight");
        assert_eq!(t.complete("t", 2, 7), None, "already done");
        assert_eq!(t.complete("t", 2, 5), Some(7));
        assert_eq!(t.committable("t", 2), Some(7));
        assert_eq!(t.complete("t", 2, 9), None, "never begun");
        assert_eq!(t.complete("other", 2, 7), None, "unknown topic");
    }
}
