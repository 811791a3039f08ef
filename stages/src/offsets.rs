//! Which offsets of each partition may be committed: only those below the first record
//! still in flight, so a crash never skips a record whose outputs were not yet acked.

use std::collections::{BTreeSet, HashMap};

/// In-flight and completed offsets of the partitions a stage consumes.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// By topic, then partition: looked up by `&str`, so the per-record calls allocate
    /// nothing.
    topics: HashMap<String, HashMap<i32, PartitionOffsets>>,
}

#[derive(Debug, Default)]
struct PartitionOffsets {
    in_flight: BTreeSet<i64>,
    /// Highest offset started so far.
    highest: Option<i64>,
    /// Last offset reported as committable (before any: the one below the first begun).
    reported: Option<i64>,
}

impl OffsetTracker {
    /// A record started processing.
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64) {
        if !self.topics.contains_key(topic) {
            self.topics.insert(topic.to_string(), HashMap::new());
        }
        let Some(partitions) = self.topics.get_mut(topic) else {
            return;
        };
        let p = partitions.entry(partition).or_default();
        // Nothing below the first record seen here is ours to commit.
        p.reported.get_or_insert(offset - 1);
        p.in_flight.insert(offset);
        p.highest = Some(p.highest.map_or(offset, |h| h.max(offset)));
    }

    /// A record's outputs are all acked. Returns the offset of the last record of this
    /// partition that can now be committed, when that moved forward.
    pub fn complete(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.topics.get_mut(topic)?.get_mut(&partition)?;
        p.in_flight.remove(&offset);
        let done_through = match p.in_flight.first() {
            Some(first) => first - 1,
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
            .values()
            .flat_map(HashMap::values)
            .map(|p| p.in_flight.len())
            .sum()
    }

    /// Records of one partition still in flight.
    pub fn in_flight_of(&self, topic: &str, partition: i32) -> usize {
        self.topics
            .get(topic)
            .and_then(|t| t.get(&partition))
            .map_or(0, |p| p.in_flight.len())
    }

    /// The last offset of a partition reported as committable, if any.
    pub fn committable(&self, topic: &str, partition: i32) -> Option<i64> {
        let p = self.topics.get(topic)?.get(&partition)?;
        p.reported.filter(|r| *r >= 0)
    }

    /// Forget a partition (after it was revoked).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.remove(&partition);
        }
    }
}

#[cfg(test)]
mod tests {
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
}
