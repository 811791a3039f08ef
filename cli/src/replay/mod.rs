//! `sluice replay`: reprocess a range of a retained topic into a stage or sink under a
//! fresh consumer group (bounded by the end offsets captured at start), reset an existing
//! group to the start of the range, or copy the range to another topic.

use std::num::NonZeroU32;

use crate::components::Component;

pub mod archive;
mod copy;
pub mod diff;
pub mod epoch;
pub mod plan;
mod run;

/// Header a copied record carries: `topic/partition/offset` of the record it copies.
pub use sluice_core::headers::REPLAYED_FROM;

/// Where the replayed records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Through a stage, or into a sink.
    Component(&'static Component),
    /// Copied as they are to another topic.
    Copy(String),
}

/// How a stage or sink target is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Run it here under this fresh consumer group, stopping at the plan's end offsets.
    FreshGroup(String),
    /// Move its configured group to the start of the range; its own processes reprocess.
    /// Without `execute`, only show the current and new offsets. The previous offsets are
    /// saved to `save_to` (default `<group>.offsets-<time>.json`) before anything moves.
    ResetGroup {
        /// Commit the new offsets.
        execute: bool,
        /// Where the previous offsets go.
        save_to: Option<std::path::PathBuf>,
    },
}

/// Filters of a replay.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Only records with this tenant header are processed (the rest are skipped).
    pub tenant: Option<String>,
    /// Most records per second.
    pub rate: Option<NonZeroU32>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Records read from the source.
    pub read: u64,
    /// Records skipped by the tenant filter.
    pub skipped: u64,
    /// Records (or outputs) written to the target.
    pub written: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Whether it was interrupted before the end of the range.
    pub interrupted: bool,
    /// After an interruption, the `--offsets` value that resumes it.
    pub resume: Option<String>,
    /// What else it did, one line each (e.g. the aggregate ranges it refreshed).
    pub notes: Vec<String>,
}

impl Outcome {
    /// The end-of-run summary lines.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "read {}  written {}  dead-lettered {}  skipped (tenant filter) {}",
            self.read, self.written, self.dead_lettered, self.skipped
        );
        for note in &self.notes {
            s += &format!("\n{note}");
        }
        if let Some(resume) = &self.resume {
            s += &format!("\ninterrupted; to resume, run the same command with --offsets {resume}");
        } else if self.interrupted {
            s += "\ninterrupted";
        }
        s
    }
}

pub use plan::{
    parse_duration, parse_offsets, parse_time, resolve, OffsetRange, PartitionPlan, Plan, Range,
};
pub use run::{active_members, commit_group, restore, run, SavedOffsets};
pub(crate) use run::{blocking, fresh_rewired};
