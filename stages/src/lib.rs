//! Stages: independent consumer-group processes that read one topic, transform each
//! record and publish to the next, dead-lettering what fails. Holds the runtime and the
//! built-in parse and enrich stages.

pub mod enrich;
pub mod exactly_once;
pub mod offsets;
pub mod parse;
pub mod retry;
pub mod runtime;
pub mod sessionize;
pub mod tenants;

pub use runtime::{run_stage, Output, StageSpec, StageStats, Transform};
pub use sluice_core::failure::{DeadLetter, Failure};
