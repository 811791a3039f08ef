//! Stages: independent consumer-group processes that read one topic, transform each
//! record and publish to the next, dead-lettering what fails. Holds the runtime and the
//! built-in parse and enrich stages.

pub mod enrich;
pub mod offsets;
pub mod parse;
pub mod retry;
pub mod runtime;
pub mod sessionize;
pub mod transform;

pub use runtime::run_stage;
pub use sluice_core::failure::{DeadLetter, Failure};
pub use transform::{Output, StageError, StageSpec, StageStats, Transform};
